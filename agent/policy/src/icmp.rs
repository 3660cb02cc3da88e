//! ICMP and `ICMPv6` message types by name, exactly the names Cilium accepts in
//! `icmps[].fields[].type` (cilium `pkg/policy/api/icmp.go`, `icmpIpv4TypeNameToCode` and
//! `icmpIpv6TypeNameToCode`), so a `CiliumNetworkPolicy`'s ICMP rules carry over unchanged.
//!
//! Owns the two tables and the lookup; what a type means for map keys is `ports`' business.
//! The lists are Cilium's, quirks included: IPv4 has both `Echo` and `EchoRequest` for type 8
//! and calls type 10 `RouterSelection`; names are case-sensitive.

use crate::model::IcmpFamily;

/// `ICMPv4` type names and numbers (Cilium's table, in its order).
pub const ICMPV4_TYPES: [(&str, u8); 14] = [
    ("EchoReply", 0),
    ("DestinationUnreachable", 3),
    ("Redirect", 5),
    ("Echo", 8),
    ("EchoRequest", 8),
    ("RouterAdvertisement", 9),
    ("RouterSelection", 10),
    ("TimeExceeded", 11),
    ("ParameterProblem", 12),
    ("Timestamp", 13),
    ("TimestampReply", 14),
    ("Photuris", 40),
    ("ExtendedEchoRequest", 42),
    ("ExtendedEchoReply", 43),
];

/// `ICMPv6` type names and numbers (Cilium's table, in its order).
pub const ICMPV6_TYPES: [(&str, u8); 27] = [
    ("DestinationUnreachable", 1),
    ("PacketTooBig", 2),
    ("TimeExceeded", 3),
    ("ParameterProblem", 4),
    ("EchoRequest", 128),
    ("EchoReply", 129),
    ("MulticastListenerQuery", 130),
    ("MulticastListenerReport", 131),
    ("MulticastListenerDone", 132),
    ("RouterSolicitation", 133),
    ("RouterAdvertisement", 134),
    ("NeighborSolicitation", 135),
    ("NeighborAdvertisement", 136),
    ("RedirectMessage", 137),
    ("RouterRenumbering", 138),
    ("ICMPNodeInformationQuery", 139),
    ("ICMPNodeInformationResponse", 140),
    ("InverseNeighborDiscoverySolicitation", 141),
    ("InverseNeighborDiscoveryAdvertisement", 142),
    ("HomeAgentAddressDiscoveryRequest", 144),
    ("HomeAgentAddressDiscoveryReply", 145),
    ("MobilePrefixSolicitation", 146),
    ("MobilePrefixAdvertisement", 147),
    ("DuplicateAddressRequestCodeSuffix", 157),
    ("DuplicateAddressConfirmationCodeSuffix", 158),
    ("ExtendedEchoRequest", 160),
    ("ExtendedEchoReply", 161),
];

fn table(family: IcmpFamily) -> impl Iterator<Item = (&'static str, u8)> {
    let t: &'static [(&'static str, u8)] = match family {
        IcmpFamily::IPv4 => &ICMPV4_TYPES,
        IcmpFamily::IPv6 => &ICMPV6_TYPES,
    };
    t.iter().copied()
}

/// The number of the ICMP type `name` in `family`, if Cilium accepts that name there.
#[must_use]
pub fn type_by_name(family: IcmpFamily, name: &str) -> Option<u8> {
    table(family).find(|(n, _)| *n == name).map(|(_, t)| t)
}

/// Every accepted name of `family`, comma-separated, for error hints.
#[must_use]
pub fn names(family: IcmpFamily) -> String {
    table(family).map(|(n, _)| n).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_per_family() {
        let rows = [
            (IcmpFamily::IPv4, "EchoRequest", Some(8)),
            (IcmpFamily::IPv4, "Echo", Some(8)),
            (IcmpFamily::IPv4, "EchoReply", Some(0)),
            (IcmpFamily::IPv4, "DestinationUnreachable", Some(3)),
            (IcmpFamily::IPv4, "TimeExceeded", Some(11)),
            (IcmpFamily::IPv4, "RouterSelection", Some(10)),
            (IcmpFamily::IPv4, "PacketTooBig", None),
            (IcmpFamily::IPv4, "echoRequest", None),
            (IcmpFamily::IPv6, "EchoRequest", Some(128)),
            (IcmpFamily::IPv6, "EchoReply", Some(129)),
            (IcmpFamily::IPv6, "PacketTooBig", Some(2)),
            (IcmpFamily::IPv6, "NeighborSolicitation", Some(135)),
            (IcmpFamily::IPv6, "RedirectMessage", Some(137)),
            (IcmpFamily::IPv6, "Redirect", None),
            (IcmpFamily::IPv6, "", None),
        ];
        for (family, name, want) in rows {
            assert_eq!(type_by_name(family, name), want, "{family:?} {name}");
        }
        assert_eq!(table(IcmpFamily::IPv4).count(), 14);
        assert_eq!(table(IcmpFamily::IPv6).count(), 27);
        assert!(names(IcmpFamily::IPv6).starts_with("DestinationUnreachable, PacketTooBig"));
    }
}
