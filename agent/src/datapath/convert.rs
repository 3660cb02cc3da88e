//! Policy-core and address types to and from the `weft-common` map layouts.

use std::net::{IpAddr, Ipv6Addr};

use ipnet::IpNet;
use weft_common::{
    IPCACHE_KEY_BITS, IPV4_MAPPED_PREFIX_BITS, IpcacheKey, POLICY_FIXED_BITS, PolicyEntry,
    PolicyKey, direction, verdict,
};
use weft_policy::{Direction, MapEntry, PolicyMapKey, Verdict};

use super::RawPolicyKey;

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
pub fn ipcache_key(prefix: IpNet) -> (u32, IpcacheKey) {
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
pub fn prefix_to_ipcache(bits: u32, key: &IpcacheKey) -> Option<IpNet> {
    let addr = addr_from_bytes(key.addr);
    let len = match addr {
        IpAddr::V4(_) => bits.checked_sub(IPV4_MAPPED_PREFIX_BITS)?,
        IpAddr::V6(_) => bits,
    };
    IpNet::new(addr, u8::try_from(len).ok()?).ok()
}

/// Whole-address ipcache key.
pub fn host_ipcache_key(addr: IpAddr) -> (u32, IpcacheKey) {
    (
        IPCACHE_KEY_BITS,
        IpcacheKey {
            addr: addr_bytes(addr),
        },
    )
}

/// LPM key of a policy-core map key: the fixed part, then 8 bits of protocol (if any), then
/// the port prefix in network byte order.
pub fn policy_key(key: &PolicyMapKey) -> RawPolicyKey {
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

pub fn policy_value(entry: &MapEntry) -> PolicyEntry {
    let (verdict, proxy_port) = match &entry.verdict {
        Verdict::Allow => (verdict::ALLOW, 0),
        Verdict::Deny => (verdict::DENY, 0),
        Verdict::AuditDeny => (verdict::AUDIT_DENY, 0),
        Verdict::RedirectL7 { .. } => (verdict::REDIRECT_L7, 0),
        Verdict::RequireAuth => (verdict::REQUIRE_AUTH, 0),
    };
    PolicyEntry {
        verdict,
        _pad: 0,
        proxy_port,
    }
}

/// Human form of a raw policy map entry: (direction, protocol, port, verdict).
pub fn policy_entry_row(bits: u32, key: &PolicyKey, value: &PolicyEntry) -> [String; 4] {
    let direction = if key.direction == direction::INGRESS {
        "ingress"
    } else {
        "egress"
    };
    let (protocol, port) = if bits <= POLICY_FIXED_BITS {
        ("any".to_owned(), "any".to_owned())
    } else {
        let port_bits = bits - POLICY_FIXED_BITS - 8;
        let port = u16::from_be(key.dport);
        let port = match port_bits {
            0 => "any".to_owned(),
            16 => port.to_string(),
            n => {
                let end = port | (u16::MAX >> n);
                format!("{port}-{end}")
            }
        };
        (protocol_name(key.protocol), port)
    };
    let verdict = match value.verdict {
        verdict::ALLOW => "allow",
        verdict::DENY => "deny",
        verdict::AUDIT_DENY => "audit-deny",
        verdict::REDIRECT_L7 => "redirect-l7",
        verdict::REQUIRE_AUTH => "require-auth",
        _ => "unknown",
    };
    [direction.to_owned(), protocol, port, verdict.to_owned()]
}

pub fn protocol_name(protocol: u8) -> String {
    match protocol {
        weft_common::IPPROTO_TCP => "TCP".into(),
        weft_common::IPPROTO_UDP => "UDP".into(),
        weft_common::IPPROTO_ICMP => "ICMP".into(),
        weft_common::IPPROTO_ICMPV6 => "ICMPv6".into(),
        weft_common::IPPROTO_SCTP => "SCTP".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            assert_eq!(prefix_to_ipcache(bits, &key), Some(net), "{text}");
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
}
