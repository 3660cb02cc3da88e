//! What the kernel says about a pod's network: the interface inside its network namespace,
//! the veth peer on the node, and the addresses the pod really has. The agent believes a CNI
//! ADD only once these agree with it, so a forged ADD cannot take over another pod's
//! interface or addresses.

use std::fs::File;
use std::net::IpAddr;
use std::path::Path;

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use nix::sched::{CloneFlags, setns};

/// One end of a veth pair as seen from its own namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkEnd {
    pub ifindex: u32,
    /// `IFLA_LINK`: the ifindex of the other end, in the other end's namespace.
    pub peer_ifindex: Option<u32>,
}

/// The pod's side: its interface and its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSide {
    pub link: LinkEnd,
    pub addresses: Vec<IpAddr>,
}

/// Look up `ifname` in the calling thread's network namespace.
///
/// # Errors
/// A message for the operator: no such interface, or netlink failed.
pub fn link(ifname: &str) -> Result<LinkEnd, String> {
    let mut message = LinkMessage::default();
    message
        .attributes
        .push(LinkAttribute::IfName(ifname.to_owned()));
    let mut request = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::from(RouteNetlinkMessage::GetLink(message)),
    );
    request.header.flags = NLM_F_REQUEST;
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
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => Ok(LinkEnd {
            ifindex: link.header.index,
            peer_ifindex: link.attributes.iter().find_map(|a| match a {
                LinkAttribute::Link(index) => Some(*index),
                _ => None,
            }),
        }),
        NetlinkPayload::Error(e) => Err(format!("no interface {ifname}: {e}")),
        _ => Err(format!("no interface {ifname}: unexpected netlink answer")),
    }
}

/// Enter the network namespace at `netns` on a scratch thread and look at `ifname` there.
///
/// # Errors
/// When `netns` is not a network namespace, or has no such interface.
pub fn pod_side(netns: &Path, ifname: &str) -> Result<PodSide, String> {
    let file = File::open(netns)
        .map_err(|e| format!("network namespace {} does not exist: {e}", netns.display()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("{} is not a network namespace: {e}", netns.display()))?;
                let link = link(ifname).map_err(|e| format!("in {}: {e}", netns.display()))?;
                let addresses = nix::ifaddrs::getifaddrs()
                    .map_err(|e| format!("reading addresses in {}: {e}", netns.display()))?
                    .filter(|a| a.interface_name == ifname)
                    .filter_map(|a| {
                        let address = a.address?;
                        if let Some(v4) = address.as_sockaddr_in() {
                            Some(IpAddr::V4(v4.ip()))
                        } else {
                            address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                        }
                    })
                    .collect();
                Ok(PodSide { link, addresses })
            })
            .join()
            .unwrap_or_else(|_| Err("inspecting the pod's namespace panicked".to_owned()))
    })
}

/// Addresses of the calling thread's network namespace (the node's own): identity `host`.
pub fn local_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<IpAddr> = addrs
        .filter_map(|a| {
            let address = a.address?;
            if let Some(v4) = address.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .filter(|ip| match ip {
            IpAddr::V6(v6) => !v6.is_unicast_link_local(),
            IpAddr::V4(_) => true,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_found_and_a_missing_interface_is_named() {
        let lo = link("lo").expect("every namespace has lo");
        assert_eq!(lo.ifindex, 1);
        let err = link("weft-no-such0").expect_err("no such interface");
        assert!(err.contains("weft-no-such0"), "{err}");
    }

    #[test]
    fn a_missing_namespace_is_named() {
        let err = pod_side(Path::new("/var/run/netns/weft-no-such-ns"), "eth0")
            .expect_err("no such namespace");
        assert!(err.contains("does not exist"), "{err}");
    }
}
