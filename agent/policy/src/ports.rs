//! Port prefixes: how a port, a port range or an ICMP type becomes a set of LPM prefixes over
//! the 16-bit port field of a policy key, and how prefixes cover each other.
//!
//! Owns only arithmetic on `u16`; knows nothing about rules or identities.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::ContainerPort;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

/// The protocols a port rule with protocol `ANY` (or none) expands to: ports never allow ICMP.
pub const PORT_PROTOCOLS: [u8; 3] = [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP];

/// Short name of an IP protocol number, for display.
#[must_use]
pub fn protocol_name(protocol: u8) -> String {
    match protocol {
        IPPROTO_ICMP => "ICMP".into(),
        IPPROTO_TCP => "TCP".into(),
        IPPROTO_UDP => "UDP".into(),
        IPPROTO_ICMPV6 => "ICMPv6".into(),
        IPPROTO_SCTP => "SCTP".into(),
        other => other.to_string(),
    }
}

/// A concrete port of a pod: IP protocol and port number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProtoPort {
    pub protocol: u8,
    pub port: u16,
}

/// Named ports of a pod (or of every pod of one identity): `name -> {(protocol, port)}`.
///
/// A set per name because pods sharing an identity may number the same name differently;
/// policy then allows each of them (the datapath keys on identity, not on the pod).
pub type NamedPorts = BTreeMap<String, BTreeSet<ProtoPort>>;

/// The named ports among a pod's container ports. Unnamed ports and ports out of range are
/// left out (`parse` has rejected the latter already).
#[must_use]
pub fn named_ports(ports: &[ContainerPort]) -> NamedPorts {
    let mut out = NamedPorts::new();
    for p in ports {
        let (Some(name), Ok(port)) = (&p.name, u16::try_from(p.container_port)) else {
            continue;
        };
        out.entry(name.clone()).or_default().insert(ProtoPort {
            protocol: p.protocol.number(),
            port,
        });
    }
    out
}

/// Named ports per identity, from every pod of the cluster (`(identity, its container
/// ports)`), for `ResolveInput::named_ports`: egress rules naming a port resolve through the
/// ports of the peer identities.
pub fn named_ports_by_identity<'a>(
    pods: impl IntoIterator<Item = (u32, &'a [ContainerPort])>,
) -> BTreeMap<u32, NamedPorts> {
    let mut out: BTreeMap<u32, NamedPorts> = BTreeMap::new();
    for (identity, ports) in pods {
        let table = out.entry(identity).or_default();
        for (name, set) in named_ports(ports) {
            table.entry(name).or_default().extend(set);
        }
    }
    out.retain(|_, t| !t.is_empty());
    out
}

/// Whether `name` is an `IANA_SVC_NAME` (RFC 6335 section 5.1, as Kubernetes checks container
/// port names): 1-15 characters of `a-z`, `0-9` and `-`, at least one letter, no `-` at either
/// end and no `--`.
#[must_use]
pub fn is_iana_svc_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

/// The ports whose top `prefix_len` bits equal those of `port`. `prefix_len` 0 is every port,
/// 16 a single port. For ICMP, the "port" is `type << 8 | code` and a type is prefix 8.
///
/// Invariant: bits of `port` below the prefix are zero (constructors ensure it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortPrefix {
    pub port: u16,
    pub prefix_len: u8,
}

impl PortPrefix {
    /// Every port.
    pub const ANY: PortPrefix = PortPrefix {
        port: 0,
        prefix_len: 0,
    };

    /// Exactly `port`.
    #[must_use]
    pub const fn exact(port: u16) -> Self {
        PortPrefix {
            port,
            prefix_len: 16,
        }
    }

    /// Every code of ICMP message type `icmp_type`.
    #[must_use]
    pub const fn icmp_type(icmp_type: u8) -> Self {
        PortPrefix {
            port: (icmp_type as u16) << 8,
            prefix_len: 8,
        }
    }

    /// `port` masked to `prefix_len` bits (`prefix_len` is clamped to 16).
    #[must_use]
    pub fn new(port: u16, prefix_len: u8) -> Self {
        let prefix_len = prefix_len.min(16);
        PortPrefix {
            port: port & Self::mask(prefix_len),
            prefix_len,
        }
    }

    fn mask(prefix_len: u8) -> u16 {
        if prefix_len == 0 {
            0
        } else {
            u16::MAX << (16 - u32::from(prefix_len))
        }
    }

    #[must_use]
    pub fn is_any(self) -> bool {
        self.prefix_len == 0
    }

    /// First port of the prefix.
    #[must_use]
    pub fn first(self) -> u16 {
        self.port
    }

    /// Last port of the prefix.
    #[must_use]
    pub fn last(self) -> u16 {
        self.port | !Self::mask(self.prefix_len)
    }

    #[must_use]
    pub fn contains_port(self, port: u16) -> bool {
        port & Self::mask(self.prefix_len) == self.port
    }

    /// Whether every port of `other` is in `self` (a prefix covers itself).
    #[must_use]
    pub fn covers(self, other: PortPrefix) -> bool {
        self.prefix_len <= other.prefix_len && self.contains_port(other.port)
    }
}

impl fmt::Display for PortPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.prefix_len {
            0 => write!(f, "*"),
            16 => write!(f, "{}", self.port),
            _ => write!(f, "{}-{}", self.first(), self.last()),
        }
    }
}

/// The minimal set of aligned prefixes whose union is exactly `start..=end`, in ascending
/// order (empty when `start > end`). `0..=65535` is the single prefix [`PortPrefix::ANY`].
#[must_use]
pub fn range_to_prefixes(start: u16, end: u16) -> Vec<PortPrefix> {
    let mut out = Vec::new();
    if start > end {
        return out;
    }
    let end = u32::from(end);
    let mut cur = u32::from(start);
    while cur <= end {
        // Largest block aligned at `cur` that stays within the range.
        let mut size_bits = if cur == 0 {
            16
        } else {
            cur.trailing_zeros().min(16)
        };
        while size_bits > 0 && cur + (1u32 << size_bits) - 1 > end {
            size_bits -= 1;
        }
        #[expect(
            clippy::cast_possible_truncation,
            reason = "cur <= end < 2^16 and size_bits <= 16, so both casts are lossless"
        )]
        out.push(PortPrefix::new(cur as u16, (16 - size_bits) as u8));
        cur += 1u32 << size_bits;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn range_table() {
        /// (start, end, expected (port, `prefix_len`) list)
        type Row = (u16, u16, &'static [(u16, u8)]);
        let cases: &[Row] = &[
            (80, 80, &[(80, 16)]),
            (0, 65535, &[(0, 0)]),
            (8080, 8081, &[(8080, 15)]),
            (8079, 8081, &[(8079, 16), (8080, 15)]),
            (1, 3, &[(1, 16), (2, 15)]),
            (
                1024,
                65535,
                &[
                    (1024, 6),
                    (2048, 5),
                    (4096, 4),
                    (8192, 3),
                    (16384, 2),
                    (32768, 1),
                ],
            ),
            (0, 1, &[(0, 15)]),
            (65535, 65535, &[(65535, 16)]),
        ];
        for (start, end, want) in cases {
            let got: Vec<(u16, u8)> = range_to_prefixes(*start, *end)
                .into_iter()
                .map(|p| (p.port, p.prefix_len))
                .collect();
            assert_eq!(&got, want, "range {start}-{end}");
        }
        assert!(range_to_prefixes(10, 9).is_empty());
    }

    #[test]
    fn icmp_type_prefix_covers_every_code_of_the_type() {
        let echo = PortPrefix::icmp_type(8);
        assert!(echo.contains_port(8 << 8));
        assert!(echo.contains_port((8 << 8) | 255));
        assert!(!echo.contains_port(9 << 8));
        assert_eq!(echo.to_string(), "2048-2303");
    }

    #[test]
    fn covers_is_prefix_containment() {
        assert!(PortPrefix::ANY.covers(PortPrefix::exact(80)));
        assert!(PortPrefix::new(8080, 15).covers(PortPrefix::exact(8081)));
        assert!(!PortPrefix::exact(8081).covers(PortPrefix::new(8080, 15)));
        assert!(!PortPrefix::new(8080, 15).covers(PortPrefix::exact(8082)));
    }

    proptest! {
        #[test]
        fn prefixes_cover_exactly_the_range(a in any::<u16>(), b in any::<u16>(), probe in any::<u16>()) {
            let (start, end) = (a.min(b), a.max(b));
            let prefixes = range_to_prefixes(start, end);
            let inside = (start..=end).contains(&probe);
            let hits = prefixes.iter().filter(|p| p.contains_port(probe)).count();
            // Exactly one prefix holds a port of the range (disjoint), none holds one outside.
            prop_assert_eq!(hits, usize::from(inside));
            // Contiguous, aligned and minimal: at most 2 prefixes per bit length.
            prop_assert_eq!(prefixes.first().map(|p| p.first()), Some(start));
            prop_assert_eq!(prefixes.last().map(|p| p.last()), Some(end));
            for pair in prefixes.windows(2) {
                prop_assert_eq!(u32::from(pair[0].last()) + 1, u32::from(pair[1].first()));
            }
            for len in 0..=16u8 {
                prop_assert!(prefixes.iter().filter(|p| p.prefix_len == len).count() <= 2);
            }
        }
    }
}
