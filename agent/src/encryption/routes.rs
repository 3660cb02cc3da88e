//! Routes for remote pod CIDRs through the WireGuard device, set over rtnetlink in the
//! calling thread's network namespace (the node's). A route is replaced, not added, so it
//! takes the place of a plain route to the same prefix over the underlay.

use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Make `cidr` go out of interface `ifindex` (replacing any route to the same prefix).
///
/// # Errors
/// A message naming the prefix: netlink failed or the kernel refused.
pub fn replace(cidr: IpNet, ifindex: u32) -> Result<(), String> {
    request(
        RouteNetlinkMessage::NewRoute(message(cidr, ifindex)),
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
    )
    .map_err(|e| format!("route {cidr} via interface {ifindex}: {e}"))
}

/// Remove the route to `cidr` out of `ifindex`; a route that is already gone is fine.
///
/// # Errors
/// A message naming the prefix when the kernel refused for another reason.
pub fn delete(cidr: IpNet, ifindex: u32) -> Result<(), String> {
    match request(
        RouteNetlinkMessage::DelRoute(message(cidr, ifindex)),
        NLM_F_REQUEST | NLM_F_ACK,
    ) {
        Ok(()) => Ok(()),
        Err(e) if e.contains(&format!("errno {}", libc::ESRCH)) => Ok(()),
        Err(e) => Err(format!("removing route {cidr}: {e}")),
    }
}

fn message(cidr: IpNet, ifindex: u32) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = match cidr {
        IpNet::V4(_) => AddressFamily::Inet,
        IpNet::V6(_) => AddressFamily::Inet6,
    };
    msg.header.destination_prefix_length = cidr.prefix_len();
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.protocol = RouteProtocol::Static;
    msg.header.scope = RouteScope::Link;
    msg.header.kind = RouteType::Unicast;
    let destination = match cidr.network() {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    };
    msg.attributes
        .push(RouteAttribute::Destination(destination));
    msg.attributes.push(RouteAttribute::Oif(ifindex));
    msg
}

fn request(payload: RouteNetlinkMessage, flags: u16) -> Result<(), String> {
    let mut request = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(payload));
    request.header.flags = flags;
    request.finalize();
    let mut bytes = vec![0; request.buffer_len()];
    request.serialize(&mut bytes);
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| format!("netlink socket: {e}"))?;
    socket
        .bind_auto()
        .map_err(|e| format!("netlink bind: {e}"))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(|e| format!("netlink connect: {e}"))?;
    socket
        .send(&bytes, 0)
        .map_err(|e| format!("netlink send: {e}"))?;
    let (answer, _) = socket
        .recv_from_full()
        .map_err(|e| format!("netlink receive: {e}"))?;
    let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer)
        .map_err(|e| format!("netlink answer: {e}"))?;
    match answer.payload {
        NetlinkPayload::Error(e) => match e.code {
            None => Ok(()),
            Some(code) => Err(format!(
                "{} (errno {})",
                std::io::Error::from_raw_os_error(-code.get()),
                -code.get()
            )),
        },
        _ => Err("unexpected netlink answer".to_owned()),
    }
}
