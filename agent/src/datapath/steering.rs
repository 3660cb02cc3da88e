//! The node's routing for L7 steering: packets that `from_pod` assigned to a socket of the
//! L7 filter carry `l7_mark::TO_PROXY`; a rule sends them to a table whose only route is
//! `local 0.0.0.0/0 dev lo`, so the node delivers them locally (to that socket) whatever
//! their destination, as TPROXY setups do. Idempotent: set up at every agent start.

use anyhow::Context;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::route::{
    RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use weft_common::l7_mark;

/// `lo` is interface 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
const EEXIST: i32 = 17;

/// Install the rule and the local route (IPv4; the filter listens on IPv4 only).
///
/// # Errors
/// When netlink refuses either.
pub fn ensure_routing() -> anyhow::Result<()> {
    let mut route = RouteMessage::default();
    route.header.address_family = AddressFamily::Inet;
    route.header.destination_prefix_length = 0;
    route.header.table = RouteHeader::RT_TABLE_UNSPEC;
    route.header.protocol = RouteProtocol::Static;
    route.header.scope = RouteScope::Host;
    route.header.kind = RouteType::Local;
    route
        .attributes
        .push(RouteAttribute::Table(l7_mark::ROUTE_TABLE));
    route.attributes.push(RouteAttribute::Oif(LOOPBACK_IFINDEX));
    request(
        RouteNetlinkMessage::NewRoute(route),
        NLM_F_CREATE | NLM_F_REPLACE,
    )
    .context("adding the L7 steering route (local 0.0.0.0/0 dev lo)")?;

    let mut rule = RuleMessage::default();
    rule.header.family = AddressFamily::Inet;
    rule.header.action = RuleAction::ToTable;
    rule.attributes
        .push(RuleAttribute::FwMark(l7_mark::TO_PROXY));
    rule.attributes.push(RuleAttribute::FwMask(u32::MAX));
    rule.attributes
        .push(RuleAttribute::Table(l7_mark::ROUTE_TABLE));
    rule.attributes
        .push(RuleAttribute::Priority(l7_mark::RULE_PRIORITY));
    match request(
        RouteNetlinkMessage::NewRule(rule),
        NLM_F_CREATE | NLM_F_EXCL,
    ) {
        Err(Refused(code)) if code == EEXIST => Ok(()),
        other => other,
    }
    .context("adding the L7 steering rule (fwmark lookup table)")
}

#[derive(Debug)]
struct Refused(i32);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

impl std::error::Error for Refused {}

fn request(message: RouteNetlinkMessage, flags: u16) -> Result<(), Refused> {
    let io = |e: std::io::Error| Refused(e.raw_os_error().unwrap_or(libc::EIO));
    let mut request = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(message));
    request.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    request.finalize();
    let mut bytes = vec![0; request.buffer_len()];
    request.serialize(&mut bytes);
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(io)?;
    socket.bind_auto().map_err(io)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(io)?;
    socket.send(&bytes, 0).map_err(io)?;
    let (answer, _) = socket.recv_from_full().map_err(io)?;
    let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer)
        .map_err(|_| Refused(libc::EBADMSG))?;
    match answer.payload {
        NetlinkPayload::Error(e) => match e.code {
            None => Ok(()),
            Some(code) => Err(Refused(-code.get())),
        },
        _ => Ok(()),
    }
}
