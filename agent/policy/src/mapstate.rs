//! Desired policy map state: the entries the datapath's `policy` LPM map must hold, per
//! endpoint, with the rules each entry came from; how rule contributions become entries
//! (deny beats allow); the datapath's lookup, simulated; and diffs between two states.
//!
//! Owns the key semantics and nothing about selection. It must mirror the datapath exactly:
//! the datapath does one longest-prefix lookup for the exact peer identity and falls back to
//! the wildcard identity (0) only when that lookup matches no prefix at all. So every
//! (endpoint, direction, identity) set of entries is made self-sufficient here: a deny that
//! applies to it is present in it, and no allow in it hides a deny.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use crate::identity::ANY;
use crate::ports::{PortPrefix, protocol_name};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Direction {
    /// Traffic leaving the endpoint.
    Egress,
    /// Traffic entering the endpoint.
    Ingress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        })
    }
}

/// A policy map key in the core's terms; the datapath module converts it to
/// `weft_common::PolicyKey` plus an LPM prefix length.
///
/// Prefix semantics (the datapath's LPM): endpoint, identity and direction are always exact;
/// `protocol: None` ends the prefix there (every protocol and port; `port` is then
/// [`PortPrefix::ANY`]); `protocol: Some(p)` adds 8 bits, and `port` adds its `prefix_len`.
/// The derived `Ord` groups keys by (endpoint, identity, direction).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PolicyMapKey {
    pub endpoint_id: u32,
    /// Peer identity; 0 = any peer (a second lookup in the datapath, not a prefix).
    pub identity: u32,
    pub direction: Direction,
    /// IP protocol; `None` = every protocol.
    pub protocol: Option<u8>,
    /// Destination port prefix (ICMP: `type << 8 | code`).
    pub port: PortPrefix,
}

impl PolicyMapKey {
    /// LPM prefix length past the fixed (endpoint, identity, direction) part: 0 for any
    /// protocol, else 8 + port prefix length.
    pub fn l4_prefix_len(&self) -> u8 {
        match self.protocol {
            None => 0,
            Some(_) => 8 + self.port.prefix_len,
        }
    }

    /// Whether this key's prefix holds every packet of `other`'s prefix (same endpoint,
    /// identity and direction; a key covers itself).
    pub fn covers(&self, other: &PolicyMapKey) -> bool {
        self.endpoint_id == other.endpoint_id
            && self.identity == other.identity
            && self.direction == other.direction
            && l4_covers((self.protocol, self.port), (other.protocol, other.port))
    }

    /// Whether a packet with this protocol and port (ICMP: `type << 8 | code`) falls in it.
    pub fn matches_packet(&self, protocol: u8, port: u16) -> bool {
        match self.protocol {
            None => true,
            Some(p) => p == protocol && self.port.contains_port(port),
        }
    }
}

fn l4_covers(a: (Option<u8>, PortPrefix), b: (Option<u8>, PortPrefix)) -> bool {
    match (a.0, b.0) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(pa), Some(pb)) => pa == pb && a.1.covers(b.1),
    }
}

impl fmt::Display for PolicyMapKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = self.protocol.map_or("any".to_string(), protocol_name);
        write!(
            f,
            "ep {} {} id {} {proto}/{}",
            self.endpoint_id, self.direction, self.identity, self.port
        )
    }
}

/// What the datapath does with a packet that hits an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Verdict {
    Allow,
    /// A deny rule of an enforcing policy.
    Deny,
    /// A deny rule in an audit-only direction: reported as a would-be drop, passed.
    AuditDeny,
    /// Allowed at L4, payload goes through the node's L7 filter (HTTP rules). The proxy port
    /// is the datapath's business. `require_auth` when the rule also requires authentication.
    RedirectL7 {
        require_auth: bool,
    },
    /// Allowed once mutual authentication between the identities succeeded.
    RequireAuth,
}

impl Verdict {
    pub fn is_deny(self) -> bool {
        matches!(self, Verdict::Deny | Verdict::AuditDeny)
    }

    /// Whether the packet is dropped (only [`Verdict::Deny`]; auth and L7 are later stages).
    pub fn drops(self) -> bool {
        self == Verdict::Deny
    }

    fn allow(l7: bool, auth: bool) -> Verdict {
        match (l7, auth) {
            (true, require_auth) => Verdict::RedirectL7 { require_auth },
            (false, true) => Verdict::RequireAuth,
            (false, false) => Verdict::Allow,
        }
    }
}

/// A desired map entry and the rules it came from (`WeftNetworkPolicy shop/api ingress[0]`),
/// for `weft policy explain`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapEntry {
    pub verdict: Verdict,
    pub derived_from: BTreeSet<String>,
}

/// Default behaviour of one direction of an endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum Isolation {
    /// No policy isolates this direction: everything passes, no entries.
    #[default]
    Open,
    /// Default deny; entries apply.
    Enforced,
    /// Only audit policies isolate: unmatched traffic is reported as would-be denied and
    /// passes; denies are [`Verdict::AuditDeny`].
    Audit,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EndpointPolicy {
    pub ingress: Isolation,
    pub egress: Isolation,
}

impl EndpointPolicy {
    pub fn isolation(&self, direction: Direction) -> Isolation {
        match direction {
            Direction::Ingress => self.ingress,
            Direction::Egress => self.egress,
        }
    }
}

/// Everything the datapath should hold for the local endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DesiredState {
    pub endpoints: BTreeMap<u32, EndpointPolicy>,
    pub entries: BTreeMap<PolicyMapKey, MapEntry>,
}

/// The outcome of a simulated datapath lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision<'a> {
    /// The endpoint is unknown or the direction is not isolated: the packet passes.
    Open,
    /// An entry matched (first the exact identity, else the wildcard).
    Entry(&'a PolicyMapKey, &'a MapEntry),
    /// Isolated, nothing matched: dropped (`Enforced`) or reported and passed (`Audit`).
    Default(Isolation),
}

impl Decision<'_> {
    /// Whether the packet is dropped at L3/L4.
    pub fn drops(&self) -> bool {
        match self {
            Decision::Open => false,
            Decision::Entry(_, e) => e.verdict.drops(),
            Decision::Default(i) => *i == Isolation::Enforced,
        }
    }
}

impl DesiredState {
    /// Longest-prefix match among the entries of one (endpoint, identity, direction).
    pub fn lookup_exact(
        &self,
        endpoint_id: u32,
        direction: Direction,
        identity: u32,
        protocol: u8,
        port: u16,
    ) -> Option<(&PolicyMapKey, &MapEntry)> {
        let lo = PolicyMapKey {
            endpoint_id,
            identity,
            direction,
            protocol: None,
            port: PortPrefix::ANY,
        };
        let hi = PolicyMapKey {
            protocol: Some(u8::MAX),
            port: PortPrefix::exact(u16::MAX),
            ..lo
        };
        self.entries
            .range(lo..=hi)
            .filter(|(k, _)| k.matches_packet(protocol, port))
            .max_by_key(|(k, _)| k.l4_prefix_len())
    }

    /// What the datapath decides for a packet: exact identity lookup, then the wildcard
    /// identity only if the first matched nothing, then the direction's default.
    pub fn decide(
        &self,
        endpoint_id: u32,
        direction: Direction,
        identity: u32,
        protocol: u8,
        port: u16,
    ) -> Decision<'_> {
        let isolation = self
            .endpoints
            .get(&endpoint_id)
            .map_or(Isolation::Open, |e| e.isolation(direction));
        if isolation == Isolation::Open {
            return Decision::Open;
        }
        let hit = self
            .lookup_exact(endpoint_id, direction, identity, protocol, port)
            .or_else(|| self.lookup_exact(endpoint_id, direction, ANY, protocol, port));
        match hit {
            Some((k, e)) => Decision::Entry(k, e),
            None => Decision::Default(isolation),
        }
    }
}

/// Map writes that turn one state into another. Apply `upserts` in order (denies come
/// first, so a tightened policy never opens a window), then `removals`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateDiff {
    /// New keys and keys whose verdict changed (a change of `derived_from` alone needs no
    /// map write and is not listed).
    pub upserts: Vec<(PolicyMapKey, MapEntry)>,
    pub removals: Vec<PolicyMapKey>,
    /// Endpoints whose isolation changed; `None` when the endpoint is gone.
    pub endpoint_changes: Vec<(u32, Option<EndpointPolicy>)>,
}

impl StateDiff {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removals.is_empty() && self.endpoint_changes.is_empty()
    }
}

/// The map writes from `old` to `new`.
pub fn diff(old: &DesiredState, new: &DesiredState) -> StateDiff {
    let mut upserts: Vec<(PolicyMapKey, MapEntry)> = new
        .entries
        .iter()
        .filter(|(k, e)| old.entries.get(k).is_none_or(|o| o.verdict != e.verdict))
        .map(|(k, e)| (*k, e.clone()))
        .collect();
    upserts.sort_by_key(|(k, e)| (!e.verdict.is_deny(), *k));
    let removals = old
        .entries
        .keys()
        .filter(|k| !new.entries.contains_key(k))
        .copied()
        .collect();
    let mut endpoint_changes: Vec<(u32, Option<EndpointPolicy>)> = new
        .endpoints
        .iter()
        .filter(|(id, p)| old.endpoints.get(id) != Some(p))
        .map(|(id, p)| (*id, Some(*p)))
        .collect();
    endpoint_changes.extend(
        old.endpoints
            .keys()
            .filter(|id| !new.endpoints.contains_key(id))
            .map(|id| (*id, None)),
    );
    StateDiff {
        upserts,
        removals,
        endpoint_changes,
    }
}

// === building entries from rule contributions ===

/// L4 part of a key: (protocol, port prefix).
pub(crate) type L4Key = (Option<u8>, PortPrefix);

#[derive(Default)]
struct Slot {
    deny: Option<BTreeSet<String>>,
    allow: Option<AllowAcc>,
}

#[derive(Default)]
struct AllowAcc {
    l7: bool,
    auth: bool,
    derived: BTreeSet<String>,
}

/// Rule contributions for one (endpoint, direction), turned into entries by
/// [`DirectionBuilder::finish`].
#[derive(Default)]
pub(crate) struct DirectionBuilder {
    sets: BTreeMap<u32, BTreeMap<L4Key, Slot>>,
}

impl DirectionBuilder {
    pub(crate) fn allow(&mut self, identity: u32, l4: L4Key, l7: bool, auth: bool, rule: &str) {
        let slot = self.slot(identity, l4);
        let acc = slot.allow.get_or_insert_with(AllowAcc::default);
        acc.l7 |= l7;
        acc.auth |= auth;
        acc.derived.insert(rule.to_string());
    }

    pub(crate) fn deny(&mut self, identity: u32, l4: L4Key, rule: &str) {
        self.slot(identity, l4)
            .deny
            .get_or_insert_with(BTreeSet::new)
            .insert(rule.to_string());
    }

    fn slot(&mut self, identity: u32, l4: L4Key) -> &mut Slot {
        self.sets
            .entry(identity)
            .or_default()
            .entry(l4)
            .or_default()
    }

    /// The entries of this direction. Denies become [`Verdict::AuditDeny`] when `audit`.
    ///
    /// 1. Wildcard-identity denies are copied into every exact-identity set, because the
    ///    datapath never consults the wildcard once the exact lookup matched something.
    /// 2. Within a set, an allow at a deny's key is dropped, and an allow whose prefix lies
    ///    inside a deny's prefix becomes that deny (it would otherwise win the LPM). A deny
    ///    inside a broader allow stays its own, more specific entry.
    /// 3. An allow inside a broader allow that requires authentication requires it too
    ///    (authentication is required if any rule allowing the flow requires it, as Cilium).
    pub(crate) fn finish(
        mut self,
        endpoint_id: u32,
        direction: Direction,
        audit: bool,
        out: &mut BTreeMap<PolicyMapKey, MapEntry>,
    ) {
        let deny_verdict = if audit {
            Verdict::AuditDeny
        } else {
            Verdict::Deny
        };
        let wildcard_denies: Vec<(L4Key, BTreeSet<String>)> = self
            .sets
            .get(&ANY)
            .map(|set| {
                set.iter()
                    .filter_map(|(k, s)| s.deny.clone().map(|d| (*k, d)))
                    .collect()
            })
            .unwrap_or_default();
        for (identity, set) in &mut self.sets {
            if *identity == ANY {
                continue;
            }
            for (k, rules) in &wildcard_denies {
                set.entry(*k)
                    .or_default()
                    .deny
                    .get_or_insert_with(BTreeSet::new)
                    .extend(rules.iter().cloned());
            }
        }
        for (identity, set) in self.sets {
            let denies: Vec<(L4Key, &BTreeSet<String>)> = set
                .iter()
                .filter_map(|(k, s)| s.deny.as_ref().map(|d| (*k, d)))
                .collect();
            let auth_allows: Vec<L4Key> = set
                .iter()
                .filter(|(_, s)| s.allow.as_ref().is_some_and(|a| a.auth))
                .map(|(k, _)| *k)
                .collect();
            for (l4, slot) in &set {
                let key = PolicyMapKey {
                    endpoint_id,
                    identity,
                    direction,
                    protocol: l4.0,
                    port: l4.1,
                };
                let entry = if let Some(d) = &slot.deny {
                    MapEntry {
                        verdict: deny_verdict,
                        derived_from: d.clone(),
                    }
                } else if let Some(a) = &slot.allow {
                    let covering: BTreeSet<String> = denies
                        .iter()
                        .filter(|(dk, _)| l4_covers(*dk, *l4))
                        .flat_map(|(_, d)| d.iter().cloned())
                        .collect();
                    if covering.is_empty() {
                        let auth = a.auth || auth_allows.iter().any(|ak| l4_covers(*ak, *l4));
                        MapEntry {
                            verdict: Verdict::allow(a.l7, auth),
                            derived_from: a.derived.clone(),
                        }
                    } else {
                        MapEntry {
                            verdict: deny_verdict,
                            derived_from: covering,
                        }
                    }
                } else {
                    continue;
                };
                out.insert(key, entry);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::{IPPROTO_TCP, IPPROTO_UDP};

    const EP: u32 = 7;
    const PEER: u32 = 300;

    fn state(b: DirectionBuilder, audit: bool) -> DesiredState {
        let mut s = DesiredState::default();
        s.endpoints.insert(
            EP,
            EndpointPolicy {
                ingress: if audit {
                    Isolation::Audit
                } else {
                    Isolation::Enforced
                },
                egress: Isolation::Open,
            },
        );
        b.finish(EP, Direction::Ingress, audit, &mut s.entries);
        s
    }

    fn verdict(s: &DesiredState, identity: u32, proto: u8, port: u16) -> Option<Verdict> {
        match s.decide(EP, Direction::Ingress, identity, proto, port) {
            Decision::Entry(_, e) => Some(e.verdict),
            _ => None,
        }
    }

    #[test]
    fn wildcard_deny_beats_exact_allow() {
        let mut b = DirectionBuilder::default();
        b.allow(
            PEER,
            (Some(IPPROTO_TCP), PortPrefix::exact(80)),
            false,
            false,
            "allow",
        );
        b.deny(ANY, (None, PortPrefix::ANY), "deny-all");
        let s = state(b, false);
        assert_eq!(verdict(&s, PEER, IPPROTO_TCP, 80), Some(Verdict::Deny));
        let key = PolicyMapKey {
            endpoint_id: EP,
            identity: PEER,
            direction: Direction::Ingress,
            protocol: Some(IPPROTO_TCP),
            port: PortPrefix::exact(80),
        };
        assert_eq!(
            s.entries[&key].derived_from,
            BTreeSet::from(["deny-all".to_string()]),
            "the converted entry names the deny that won"
        );
    }

    #[test]
    fn deny_range_covering_an_allowed_port_wins() {
        let mut b = DirectionBuilder::default();
        b.allow(
            PEER,
            (Some(IPPROTO_TCP), PortPrefix::exact(8080)),
            false,
            false,
            "a",
        );
        b.deny(PEER, (Some(IPPROTO_TCP), PortPrefix::new(8080, 8)), "d");
        let s = state(b, false);
        assert_eq!(verdict(&s, PEER, IPPROTO_TCP, 8080), Some(Verdict::Deny));
        assert_eq!(verdict(&s, PEER, IPPROTO_UDP, 8080), None);
    }

    #[test]
    fn narrow_deny_inside_broad_allow_stays_specific() {
        let mut b = DirectionBuilder::default();
        b.allow(
            PEER,
            (Some(IPPROTO_TCP), PortPrefix::ANY),
            false,
            false,
            "a",
        );
        b.deny(ANY, (Some(IPPROTO_TCP), PortPrefix::exact(22)), "d");
        let s = state(b, false);
        assert_eq!(verdict(&s, PEER, IPPROTO_TCP, 22), Some(Verdict::Deny));
        assert_eq!(verdict(&s, PEER, IPPROTO_TCP, 443), Some(Verdict::Allow));
        assert_eq!(verdict(&s, 999, IPPROTO_TCP, 22), Some(Verdict::Deny));
    }

    #[test]
    fn auth_is_inherited_from_a_broader_allow() {
        let mut b = DirectionBuilder::default();
        b.allow(
            PEER,
            (Some(IPPROTO_TCP), PortPrefix::ANY),
            false,
            true,
            "auth",
        );
        b.allow(
            PEER,
            (Some(IPPROTO_TCP), PortPrefix::exact(80)),
            true,
            false,
            "l7",
        );
        let s = state(b, false);
        assert_eq!(
            verdict(&s, PEER, IPPROTO_TCP, 80),
            Some(Verdict::RedirectL7 { require_auth: true })
        );
        assert_eq!(
            verdict(&s, PEER, IPPROTO_TCP, 81),
            Some(Verdict::RequireAuth)
        );
    }

    #[test]
    fn audit_turns_denies_into_audit_denies() {
        let mut b = DirectionBuilder::default();
        b.deny(ANY, (None, PortPrefix::ANY), "d");
        let s = state(b, true);
        assert_eq!(verdict(&s, PEER, IPPROTO_TCP, 80), Some(Verdict::AuditDeny));
        assert!(
            !s.decide(EP, Direction::Ingress, PEER, IPPROTO_TCP, 80)
                .drops()
        );
    }

    #[test]
    fn diff_lists_changed_verdicts_new_and_removed_keys() {
        let key = |port| PolicyMapKey {
            endpoint_id: EP,
            identity: PEER,
            direction: Direction::Ingress,
            protocol: Some(IPPROTO_TCP),
            port: PortPrefix::exact(port),
        };
        let entry = |verdict, rule: &str| MapEntry {
            verdict,
            derived_from: BTreeSet::from([rule.to_string()]),
        };
        let mut old = DesiredState::default();
        old.endpoints.insert(EP, EndpointPolicy::default());
        old.endpoints.insert(8, EndpointPolicy::default());
        old.entries.insert(key(80), entry(Verdict::Allow, "a"));
        old.entries.insert(key(81), entry(Verdict::Allow, "a"));
        old.entries.insert(key(82), entry(Verdict::Allow, "a"));
        let mut new = DesiredState::default();
        let ep = EndpointPolicy {
            ingress: Isolation::Enforced,
            egress: Isolation::Open,
        };
        new.endpoints.insert(EP, ep);
        new.entries.insert(key(80), entry(Verdict::Allow, "b")); // provenance only
        new.entries.insert(key(81), entry(Verdict::Deny, "d"));
        new.entries.insert(key(83), entry(Verdict::Allow, "a"));
        let d = diff(&old, &new);
        let upserted: Vec<u16> = d.upserts.iter().map(|(k, _)| k.port.port).collect();
        assert_eq!(upserted, vec![81, 83], "denies first, then allows");
        assert_eq!(d.removals, vec![key(82)]);
        assert_eq!(d.endpoint_changes, vec![(EP, Some(ep)), (8, None)]);
        assert!(diff(&new, &new).is_empty());
    }
}
