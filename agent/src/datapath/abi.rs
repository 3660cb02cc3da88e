//! The kernel ABI, encoded: the agent's typed desired state ([`super::desired`]) and the
//! policy core's keys into `weft-common` map layouts, and addresses to and from their 16-byte
//! form. The only place in the agent that knows those layouts.

use std::net::{IpAddr, Ipv6Addr};

use ipnet::IpNet;
use weft_common::{
    ClusterEntry, EndpointInfo, IPV4_MAPPED_PREFIX_BITS, IpcacheEntry, IpcacheKey, NodeEntry,
    POLICY_FIXED_BITS, PolicyEntry, PolicyKey, auth_type, cluster_flags, direction, endpoint_flags,
    ipcache_flags, node_flags, verdict,
};
use weft_policy::{Direction, EndpointPolicy, Isolation, MapEntry, PolicyMapKey, Verdict};

use super::desired::{ClusterSpec, EndpointSpec, IpcacheSpec, NodeSpec, Place};

// The policy core numbers reserved identities itself (it knows no ABI); the datapath must
// agree, or a rule for `world` would match another peer.
const _: () = {
    use weft_common::identity as abi;
    use weft_policy::identity as core;
    assert!(core::ANY == abi::ANY && core::HOST == abi::HOST && core::WORLD == abi::WORLD);
    assert!(core::UNMANAGED == abi::UNMANAGED && core::HEALTH == abi::HEALTH);
    assert!(core::INIT == abi::INIT && core::REMOTE_NODE == abi::REMOTE_NODE);
    assert!(core::KUBE_APISERVER == abi::KUBE_APISERVER);
    assert!(core::FIRST_POD_IDENTITY == abi::FIRST_ALLOCATED);
};

/// An LPM key as the maps hold it: (prefix length, data).
pub type LpmKey<K> = (u32, K);

/// 16-byte form of an address: IPv4 as IPv4-mapped IPv6 (the datapath's layout).
pub fn addr_bytes(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Inverse of [`addr_bytes`].
pub fn addr_from_bytes(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// ipcache LPM key of a prefix.
pub fn ipcache_key(prefix: IpNet) -> LpmKey<IpcacheKey> {
    let prefix = prefix.trunc();
    let bits = match prefix {
        IpNet::V4(p) => IPV4_MAPPED_PREFIX_BITS + u32::from(p.prefix_len()),
        IpNet::V6(p) => u32::from(p.prefix_len()),
    };
    (
        bits,
        IpcacheKey {
            addr: addr_bytes(prefix.addr()),
        },
    )
}

/// Inverse of [`ipcache_key`].
#[cfg(test)]
pub fn prefix_of_ipcache_key(bits: u32, key: &IpcacheKey) -> Option<IpNet> {
    let addr = addr_from_bytes(key.addr);
    let len = match addr {
        IpAddr::V4(_) => bits.checked_sub(IPV4_MAPPED_PREFIX_BITS)?,
        IpAddr::V6(_) => bits,
    };
    IpNet::new(addr, u8::try_from(len).ok()?).ok()
}

pub fn ipcache_entry(spec: &IpcacheSpec) -> IpcacheEntry {
    let (node_id, flags, ifindex) = match spec.place {
        Place::LocalPod { ifindex } => (0, ipcache_flags::LOCAL_POD, ifindex),
        Place::RemotePod { node } => (node, ipcache_flags::REMOTE_POD, 0),
        Place::LocalNode => (0, ipcache_flags::NODE, 0),
        Place::RemoteNode { node } => (node, ipcache_flags::NODE, 0),
        Place::Outside => (0, 0, 0),
    };
    IpcacheEntry {
        identity: spec.identity,
        node_id,
        flags,
        _pad: 0,
        ifindex,
        _reserved: 0,
    }
}

pub fn endpoint_info(spec: &EndpointSpec) -> EndpointInfo {
    EndpointInfo {
        endpoint_id: spec.endpoint_id,
        identity: spec.identity,
        flags: isolation_flags(spec.policy),
        _pad: 0,
    }
}

fn isolation_flags(policy: EndpointPolicy) -> u32 {
    let bits = |isolation, isolated, audit| match isolation {
        Isolation::Open => 0,
        Isolation::Enforced => isolated,
        Isolation::Audit => isolated | audit,
    };
    bits(
        policy.ingress,
        endpoint_flags::INGRESS_ISOLATED,
        endpoint_flags::INGRESS_AUDIT,
    ) | bits(
        policy.egress,
        endpoint_flags::EGRESS_ISOLATED,
        endpoint_flags::EGRESS_AUDIT,
    )
}

pub fn node_entry(spec: &NodeSpec) -> NodeEntry {
    NodeEntry {
        underlay_addr: addr_bytes(spec.underlay),
        flags: if spec.encrypt { node_flags::ENCRYPT } else { 0 },
        encrypt_ifindex: spec.encrypt_ifindex,
    }
}

pub fn cluster_entry(spec: ClusterSpec) -> ClusterEntry {
    let (node_id, flags) = match spec {
        ClusterSpec::Local => (0, cluster_flags::LOCAL),
        ClusterSpec::Node { node } => (node, 0),
        ClusterSpec::Unclaimed => (0, 0),
    };
    ClusterEntry {
        node_id,
        flags,
        _reserved: 0,
    }
}

/// LPM key of a policy-core map key: the fixed part, then 8 bits of protocol (if any), then
/// the port prefix in network byte order.
pub fn policy_key(key: &PolicyMapKey) -> LpmKey<PolicyKey> {
    let (protocol, port, bits) = match key.protocol {
        None => (0, 0u16, POLICY_FIXED_BITS),
        Some(proto) => {
            let len = u32::from(key.port.prefix_len.min(16));
            // Keep only the prefix bits, so equal prefixes make equal keys.
            let mask = if len == 0 { 0 } else { u16::MAX << (16 - len) };
            (proto, key.port.port & mask, POLICY_FIXED_BITS + 8 + len)
        }
    };
    (
        bits,
        PolicyKey {
            endpoint_id: key.endpoint_id,
            identity: key.identity,
            direction: match key.direction {
                Direction::Egress => direction::EGRESS,
                Direction::Ingress => direction::INGRESS,
            },
            protocol,
            dport: port.to_be(),
        },
    )
}

/// The map value of a policy-core entry. `proxy_port` is the node's L7 filter port for
/// `redirect-l7` entries (0 while there is none).
pub fn policy_entry(entry: &MapEntry, proxy_port: u16) -> PolicyEntry {
    let (verdict, auth, proxy_port) = match entry.verdict {
        Verdict::Allow => (verdict::ALLOW, auth_type::NONE, 0),
        Verdict::Deny => (verdict::DENY, auth_type::NONE, 0),
        Verdict::DefaultDeny => (verdict::DEFAULT_DENY, auth_type::NONE, 0),
        Verdict::AuditDeny => (verdict::AUDIT_DENY, auth_type::NONE, 0),
        Verdict::RedirectL7 { require_auth } => (
            verdict::REDIRECT_L7,
            if require_auth {
                auth_type::SPIFFE_MTLS
            } else {
                auth_type::NONE
            },
            proxy_port,
        ),
        Verdict::RequireAuth => (verdict::ALLOW, auth_type::SPIFFE_MTLS, 0),
    };
    PolicyEntry {
        verdict,
        audit_verdict: entry
            .audit
            .as_ref()
            .map_or(verdict::NONE, |a| match a.verdict {
                Verdict::Deny | Verdict::AuditDeny | Verdict::DefaultDeny => verdict::DENY,
                Verdict::Allow | Verdict::RequireAuth | Verdict::RedirectL7 { .. } => {
                    verdict::ALLOW
                }
            }),
        auth_type: auth,
        flags: 0,
        proxy_port,
        _pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_common::IPCACHE_KEY_BITS;
    use weft_policy::PortPrefix;

    #[test]
    fn ipcache_keys_round_trip_both_families() {
        for text in [
            "100.64.1.0/24",
            "10.0.0.0/8",
            "0.0.0.0/0",
            "fd00:64::/48",
            "::/0",
        ] {
            let net: IpNet = text.parse().unwrap();
            let (bits, key) = ipcache_key(net);
            assert_eq!(prefix_of_ipcache_key(bits, &key), Some(net), "{text}");
        }
        let (bits, _) = ipcache_key("100.64.1.7/32".parse().unwrap());
        assert_eq!(bits, IPCACHE_KEY_BITS);
    }

    #[test]
    fn addresses_round_trip() {
        for text in ["100.64.0.5", "fd00:64::5", "::1"] {
            let addr: IpAddr = text.parse().unwrap();
            assert_eq!(addr_from_bytes(addr_bytes(addr)), addr);
        }
    }

    #[test]
    fn isolation_becomes_flags_by_type_not_by_name() {
        let spec = |ingress, egress| EndpointSpec {
            endpoint_id: 1,
            identity: 300,
            policy: EndpointPolicy { ingress, egress },
        };
        assert_eq!(
            endpoint_info(&spec(Isolation::Open, Isolation::Open)).flags,
            0
        );
        assert_eq!(
            endpoint_info(&spec(Isolation::Audit, Isolation::Enforced)).flags,
            endpoint_flags::INGRESS_ISOLATED
                | endpoint_flags::INGRESS_AUDIT
                | endpoint_flags::EGRESS_ISOLATED
        );
    }

    #[test]
    fn policy_keys_are_prefixes_in_network_order() {
        let key = PolicyMapKey {
            endpoint_id: 3,
            identity: 300,
            direction: Direction::Ingress,
            protocol: Some(6),
            port: PortPrefix::exact(8080),
        };
        let (bits, raw) = policy_key(&key);
        assert_eq!(bits, POLICY_FIXED_BITS + 24);
        assert_eq!(raw.dport, 8080u16.to_be());
        let any = PolicyMapKey {
            protocol: None,
            port: PortPrefix::ANY,
            ..key
        };
        assert_eq!(policy_key(&any).0, POLICY_FIXED_BITS);
    }

    #[test]
    fn auth_and_l7_are_separate_fields() {
        let entry = |verdict| MapEntry {
            verdict,
            derived_from: std::sync::Arc::default(),
            audit: None,
            l7: None,
        };
        let v = policy_entry(&entry(Verdict::RequireAuth), 0);
        assert_eq!(
            (v.verdict, v.auth_type),
            (verdict::ALLOW, auth_type::SPIFFE_MTLS)
        );
        let v = policy_entry(
            &entry(Verdict::RedirectL7 {
                require_auth: false,
            }),
            15001,
        );
        assert_eq!((v.verdict, v.proxy_port), (verdict::REDIRECT_L7, 15001));
    }
}
