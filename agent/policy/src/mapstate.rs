//! Desired policy map state: the entries the datapath's `policy` LPM map must hold, per
//! endpoint, with the rules each entry came from; how rule contributions become entries
//! (deny beats allow); the datapath's lookup, simulated; and diffs between two states.
//!
//! Owns the key semantics and nothing about selection. It must mirror the datapath exactly:
//! the datapath does one longest-prefix lookup for the exact peer identity and falls back to
//! the wildcard identity (0) only when that lookup matches no prefix at all. So every
//! (endpoint, direction, identity) set of entries is made self-sufficient here: a deny that
//! applies to it is present in it, and no allow in it hides a deny.
//!
//! Audit: each entry carries, beside the enforced verdict (what the enforcing policies
//! decide), the audit verdict (what the whole policy set would decide if the audit policies
//! were enforced too). Both come out of the same single lookup, so the two policy sets'
//! entries are merged onto one key set that is exact for both (`merge_audit`); the enforced
//! verdict never depends on an audit policy.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use smallvec::SmallVec;

use crate::http::{HttpAllow, L7Policy};
use crate::identity::ANY;
use crate::model::HttpRule;
use crate::ports::{PortPrefix, protocol_name};
use crate::repository::HttpRules;

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
    /// The smallest key of `endpoint_id`: its entries are the range from here.
    #[must_use]
    pub const fn first_of(endpoint_id: u32) -> Self {
        PolicyMapKey {
            endpoint_id,
            identity: 0,
            direction: Direction::Egress,
            protocol: None,
            port: PortPrefix::ANY,
        }
    }
}

impl PolicyMapKey {
    /// LPM prefix length past the fixed (endpoint, identity, direction) part: 0 for any
    /// protocol, else 8 + port prefix length.
    #[must_use]
    pub fn l4_prefix_len(&self) -> u8 {
        match self.protocol {
            None => 0,
            Some(_) => 8 + self.port.prefix_len,
        }
    }

    /// Whether this key's prefix holds every packet of `other`'s prefix (same endpoint,
    /// identity and direction; a key covers itself).
    #[must_use]
    pub fn covers(&self, other: &PolicyMapKey) -> bool {
        self.endpoint_id == other.endpoint_id
            && self.identity == other.identity
            && self.direction == other.direction
            && l4_covers((self.protocol, self.port), (other.protocol, other.port))
    }

    /// Whether a packet with this protocol and port (ICMP: `type << 8 | code`) falls in it.
    #[must_use]
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
    /// Dropped because no rule allows it (the isolated direction's default), at a key that
    /// exists only so that the entry can carry an audit verdict: an audit policy allows or
    /// denies this prefix more specifically. Drops like [`Verdict::Deny`]; the datapath
    /// reports it as `policy-denied` (default deny), not `policy-deny-rule`.
    DefaultDeny,
}

impl Verdict {
    #[must_use]
    pub fn is_deny(self) -> bool {
        matches!(
            self,
            Verdict::Deny | Verdict::AuditDeny | Verdict::DefaultDeny
        )
    }

    /// Whether the packet is dropped ([`Verdict::Deny`] and [`Verdict::DefaultDeny`]; auth
    /// and L7 are later stages).
    #[must_use]
    pub fn drops(self) -> bool {
        matches!(self, Verdict::Deny | Verdict::DefaultDeny)
    }

    fn allow(l7: bool, auth: bool) -> Verdict {
        match (l7, auth) {
            (true, require_auth) => Verdict::RedirectL7 { require_auth },
            (false, true) => Verdict::RequireAuth,
            (false, false) => Verdict::Allow,
        }
    }
}

/// The rules an entry came from (`WeftNetworkPolicy shop/api ingress[0]`). Shared: the
/// entries of one rule set point at one copy, so a policy with a hundred thousand entries
/// costs a pointer per entry, not a set.
pub type RuleSet = Arc<BTreeSet<String>>;

/// A desired map entry and the rules it came from (`WeftNetworkPolicy shop/api ingress[0]`),
/// for `weft policy explain`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapEntry {
    /// The enforced verdict: what the enforcing policies decide. In a direction only audit
    /// policies isolate it is [`Verdict::Allow`], or [`Verdict::AuditDeny`] where the audit
    /// set denies (so a datapath that ignores `audit` still reports those).
    pub verdict: Verdict,
    pub derived_from: RuleSet,
    /// Present where audit policies apply to this (endpoint, direction): what the policy set
    /// would decide with the audit policies enforced too (the datapath's `audit_verdict`).
    pub audit: Option<AuditEntry>,
    /// The HTTP rules the L7 filter applies to this entry's flows: present exactly when the
    /// enforced verdict is [`Verdict::RedirectL7`]. Not map content (the datapath only sees
    /// the verdict and the proxy port); the agent hands them to the filter.
    pub l7: Option<Arc<L7Policy>>,
}

impl MapEntry {
    /// An entry without audit verdict.
    #[must_use]
    pub fn new(verdict: Verdict, derived_from: BTreeSet<String>) -> Self {
        MapEntry {
            verdict,
            derived_from: Arc::new(derived_from),
            audit: None,
            l7: None,
        }
    }
}

/// The audit side of an entry: the verdict of enforcing and audit policies together, and the
/// rules that decided it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    /// Never [`Verdict::AuditDeny`]: denies are [`Verdict::Deny`] here.
    pub verdict: Verdict,
    pub derived_from: RuleSet,
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
    #[must_use]
    pub fn isolation(&self, direction: Direction) -> Isolation {
        match direction {
            Direction::Ingress => self.ingress,
            Direction::Egress => self.egress,
        }
    }
}

/// Why one direction of an endpoint is isolated (for `explain` and `weft policy get`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IsolatedBy {
    /// Enforcing policies that select the endpoint with a section for this direction.
    pub enforcing: Vec<crate::repository::PolicyId>,
    /// Audit policies that do.
    pub audit: Vec<crate::repository::PolicyId>,
    /// The node's enforcement mode is `always`.
    pub mode_always: bool,
}

impl IsolatedBy {
    /// `default deny: ingress isolated by NetworkPolicy shop/a, ...`, the text that default-deny
    /// verdicts are derived from.
    pub fn default_deny_text(&self, direction: Direction) -> String {
        let mut by: Vec<String> = self.enforcing.iter().map(ToString::to_string).collect();
        if self.mode_always {
            by.push("enforcement mode always".into());
        }
        if by.is_empty() {
            by = self.audit.iter().map(|p| format!("{p} (audit)")).collect();
        }
        format!("default deny: {direction} isolated by {}", by.join(", "))
    }
}

/// Everything the datapath should hold for the local endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DesiredState {
    pub endpoints: BTreeMap<u32, EndpointPolicy>,
    pub entries: BTreeMap<PolicyMapKey, MapEntry>,
    /// For each isolated (endpoint, direction), the policies that isolate it. Not map
    /// content: [`diff`] ignores it.
    #[serde(skip)]
    pub isolated_by: BTreeMap<(u32, Direction), IsolatedBy>,
}

impl DesiredState {
    /// Entries of one endpoint (both directions).
    pub fn endpoint_entries(
        &self,
        endpoint_id: u32,
    ) -> impl Iterator<Item = (&PolicyMapKey, &MapEntry)> {
        self.entries
            .range(PolicyMapKey::first_of(endpoint_id)..)
            .take_while(move |(k, _)| k.endpoint_id == endpoint_id)
    }
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

/// How the audit policies would change a packet's fate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum AuditChange {
    /// The enforced verdict passes it; with the audit policies enforced it would drop.
    WouldDeny,
    /// The enforced verdict drops it; with the audit policies enforced it would pass.
    WouldAllow,
}

impl Decision<'_> {
    /// Whether the packet is dropped at L3/L4 (by the enforced verdict).
    #[must_use]
    pub fn drops(&self) -> bool {
        self.enforced_verdict().drops()
    }

    /// The enforced verdict, normalized: [`Verdict::Allow`] for an open or audit-only
    /// direction (whatever the audit policies say), [`Verdict::DefaultDeny`] for the default
    /// of an enforced direction.
    #[must_use]
    pub fn enforced_verdict(&self) -> Verdict {
        match self {
            Decision::Open | Decision::Default(Isolation::Audit | Isolation::Open) => {
                Verdict::Allow
            }
            Decision::Default(Isolation::Enforced) => Verdict::DefaultDeny,
            Decision::Entry(_, e) if e.verdict == Verdict::AuditDeny => Verdict::Allow,
            Decision::Entry(_, e) => e.verdict,
        }
    }

    /// What the policy set would decide with its audit policies enforced too, where an audit
    /// policy applies to this lookup; `None` where none does (the enforced verdict stands;
    /// also for the default of an enforced direction, which audit policies cannot change).
    #[must_use]
    pub fn audit_verdict(&self) -> Option<Verdict> {
        match self {
            Decision::Open | Decision::Default(Isolation::Enforced | Isolation::Open) => None,
            Decision::Default(Isolation::Audit) => Some(Verdict::DefaultDeny),
            Decision::Entry(_, e) => e.audit.as_ref().map(|a| a.verdict),
        }
    }

    /// Whether the packet would be dropped with the audit policies enforced too.
    pub fn audit_drops(&self) -> bool {
        self.audit_verdict()
            .map_or_else(|| self.drops(), Verdict::drops)
    }

    /// A would-be drop or a would-be allow, if the audit policies change the packet's fate.
    #[must_use]
    pub fn audit_change(&self) -> Option<AuditChange> {
        match (self.drops(), self.audit_drops()) {
            (false, true) => Some(AuditChange::WouldDeny),
            (true, false) => Some(AuditChange::WouldAllow),
            _ => None,
        }
    }
}

impl DesiredState {
    /// Longest-prefix match among the entries of one (endpoint, identity, direction).
    #[must_use]
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
    #[must_use]
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
    /// New keys and keys whose verdict or audit verdict changed (a change of `derived_from`
    /// alone needs no map write and is not listed).
    pub upserts: Vec<(PolicyMapKey, MapEntry)>,
    pub removals: Vec<PolicyMapKey>,
    /// Endpoints whose isolation changed; `None` when the endpoint is gone.
    pub endpoint_changes: Vec<(u32, Option<EndpointPolicy>)>,
}

impl StateDiff {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removals.is_empty() && self.endpoint_changes.is_empty()
    }
}

/// The map writes from `old` to `new`.
#[must_use]
pub fn diff(old: &DesiredState, new: &DesiredState) -> StateDiff {
    let mut upserts: Vec<(PolicyMapKey, MapEntry)> = new
        .entries
        .iter()
        .filter(|(k, e)| {
            old.entries
                .get(k)
                .is_none_or(|o| o.verdict != e.verdict || audit_verdict(o) != audit_verdict(e))
        })
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

fn audit_verdict(e: &MapEntry) -> Option<Verdict> {
    e.audit.as_ref().map(|a| a.verdict)
}

// === building entries from rule contributions ===

/// L4 part of a key: (protocol, port prefix).
pub(crate) type L4Key = (Option<u8>, PortPrefix);

/// Rules by their index in [`DirectionBuilder::rules`], sorted and unique: most slots have
/// one or two, kept inline rather than as a set of strings per slot.
type RuleIds = SmallVec<[u32; 2]>;

fn add_rule(ids: &mut RuleIds, id: u32) {
    if let Err(at) = ids.binary_search(&id) {
        ids.insert(at, id);
    }
}

#[derive(Default)]
struct Slot {
    deny: Option<RuleIds>,
    allow: Option<AllowAcc>,
}

#[derive(Clone, Default)]
struct AllowAcc {
    /// HTTP rules contributed at this key, each with its rule.
    http: Vec<(u32, HttpRules)>,
    /// Rules that allow this very key without HTTP rules: on a port that is L7-filtered
    /// anyway they allow every request (Cilium: a selector without L7 rules allows all).
    plain: RuleIds,
    auth: bool,
    derived: RuleIds,
}

impl AllowAcc {
    fn l7(&self) -> bool {
        !self.http.is_empty()
    }
}

/// Rule contributions for one (endpoint, direction), turned into entries by
/// [`DirectionBuilder::finish`].
#[derive(Default)]
pub(crate) struct DirectionBuilder {
    sets: BTreeMap<u32, BTreeMap<L4Key, Slot>>,
    rules: Vec<String>,
    rule_ids: HashMap<String, u32>,
}

impl DirectionBuilder {
    pub(crate) fn allow(
        &mut self,
        identity: u32,
        l4: L4Key,
        http: Option<&HttpRules>,
        auth: bool,
        rule: &str,
    ) {
        let id = self.rule_id(rule);
        let slot = self.slot(identity, l4);
        let acc = slot.allow.get_or_insert_with(AllowAcc::default);
        match http {
            Some(h) => {
                if !acc.http.iter().any(|(i, x)| *i == id && Arc::ptr_eq(x, h)) {
                    acc.http.push((id, h.clone()));
                }
            }
            None => add_rule(&mut acc.plain, id),
        }
        acc.auth |= auth;
        add_rule(&mut acc.derived, id);
    }

    pub(crate) fn deny(&mut self, identity: u32, l4: L4Key, rule: &str) {
        let id = self.rule_id(rule);
        add_rule(
            self.slot(identity, l4)
                .deny
                .get_or_insert_with(RuleIds::new),
            id,
        );
    }

    fn rule_id(&mut self, rule: &str) -> u32 {
        if let Some(id) = self.rule_ids.get(rule) {
            return *id;
        }
        let id = u32::try_from(self.rules.len()).expect("fewer than 2^32 rules");
        self.rules.push(rule.to_owned());
        self.rule_ids.insert(rule.to_owned(), id);
        id
    }

    fn slot(&mut self, identity: u32, l4: L4Key) -> &mut Slot {
        self.sets
            .entry(identity)
            .or_default()
            .entry(l4)
            .or_default()
    }

    /// The entries of this direction, by peer identity.
    ///
    /// 1. Wildcard-identity denies are copied into every exact-identity set, because the
    ///    datapath never consults the wildcard once the exact lookup matched something.
    /// 2. Within a set, an allow at a deny's key is dropped, and an allow whose prefix lies
    ///    inside a deny's prefix becomes that deny (it would otherwise win the LPM). A deny
    ///    inside a broader allow stays its own, more specific entry.
    /// 3. An allow inside a broader allow that requires authentication requires it too
    ///    (authentication is required if any rule allowing the flow requires it, as Cilium).
    /// 4. A wildcard-identity allow with HTTP rules is not bypassed by a more specific L3
    ///    allow (Cilium's `__policy_check` ranks the L4-only proxy redirect first): an exact
    ///    set whose allows cover that key gets the redirect at the key itself, with the
    ///    wildcard's HTTP rules merged in. An exact allow of that very key without HTTP rules
    ///    allows all requests of its peer (Cilium's per-selector semantics); a broader one
    ///    (every port, a port range) does not.
    pub(crate) fn finish(mut self) -> DirectionEntries {
        let wildcard_denies: Vec<(L4Key, RuleIds)> = self
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
                let deny = set
                    .entry(*k)
                    .or_default()
                    .deny
                    .get_or_insert_with(RuleIds::new);
                for id in rules {
                    add_rule(deny, *id);
                }
            }
        }
        let wildcard_l7: Vec<(L4Key, AllowAcc)> = self
            .sets
            .get(&ANY)
            .map(|set| {
                set.iter()
                    .filter_map(|(k, s)| {
                        s.allow
                            .as_ref()
                            .filter(|a| a.l7() && s.deny.is_none())
                            .map(|a| (*k, a.clone()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        for (identity, set) in &mut self.sets {
            if *identity == ANY {
                continue;
            }
            for (k, w) in &wildcard_l7 {
                if let Some(acc) = set.get_mut(k).and_then(|s| s.allow.as_mut()) {
                    for h in &w.http {
                        if !acc
                            .http
                            .iter()
                            .any(|x| x.0 == h.0 && Arc::ptr_eq(&x.1, &h.1))
                        {
                            acc.http.push(h.clone());
                        }
                    }
                    acc.auth |= w.auth;
                    for id in &w.derived {
                        add_rule(&mut acc.derived, *id);
                    }
                    continue;
                }
                if set.contains_key(k) {
                    continue; // a deny of this very key: it wins.
                }
                let covered = set
                    .iter()
                    .any(|(ek, s)| s.allow.is_some() && l4_covers(*ek, *k));
                if covered {
                    set.insert(
                        *k,
                        Slot {
                            deny: None,
                            allow: Some(AllowAcc {
                                plain: RuleIds::new(),
                                ..w.clone()
                            }),
                        },
                    );
                }
            }
        }
        let mut out = DirectionEntries::new();
        // Equal rule lists share one set: a policy with a hundred thousand entries costs a
        // pointer per entry.
        let names = &self.rules;
        let mut shared: HashMap<RuleIds, RuleSet> = HashMap::new();
        let mut rule_set = |ids: RuleIds| -> RuleSet {
            shared
                .entry(ids)
                .or_insert_with_key(|ids| {
                    Arc::new(ids.iter().map(|i| names[*i as usize].clone()).collect())
                })
                .clone()
        };
        for (identity, set) in &self.sets {
            let denies: Vec<(L4Key, &RuleIds)> = set
                .iter()
                .filter_map(|(k, s)| s.deny.as_ref().map(|d| (*k, d)))
                .collect();
            let auth_allows: Vec<L4Key> = set
                .iter()
                .filter(|(_, s)| s.allow.as_ref().is_some_and(|a| a.auth))
                .map(|(k, _)| *k)
                .collect();
            let entries = out.entry(*identity).or_default();
            for (l4, slot) in set {
                let entry = if let Some(d) = &slot.deny {
                    MapEntry {
                        verdict: Verdict::Deny,
                        derived_from: rule_set(d.clone()),
                        audit: None,
                        l7: None,
                    }
                } else if let Some(a) = &slot.allow {
                    let mut covering = RuleIds::new();
                    for (_, d) in denies.iter().filter(|(dk, _)| l4_covers(*dk, *l4)) {
                        for id in *d {
                            add_rule(&mut covering, *id);
                        }
                    }
                    if covering.is_empty() {
                        let auth = a.auth || auth_allows.iter().any(|ak| l4_covers(*ak, *l4));
                        MapEntry {
                            verdict: Verdict::allow(a.l7(), auth),
                            derived_from: rule_set(a.derived.clone()),
                            audit: None,
                            l7: a.l7().then(|| Arc::new(l7_policy(a, names))),
                        }
                    } else {
                        MapEntry {
                            verdict: Verdict::Deny,
                            derived_from: rule_set(covering),
                            audit: None,
                            l7: None,
                        }
                    }
                } else {
                    continue;
                };
                entries.insert(*l4, entry);
            }
        }
        out.retain(|_, set| !set.is_empty());
        out
    }
}

/// The HTTP rules of an allow with some: every contributed rule, then an allow-all rule for
/// each plain allow of the same key.
fn l7_policy(a: &AllowAcc, names: &[String]) -> L7Policy {
    let mut rules: Vec<HttpAllow> = a
        .http
        .iter()
        .flat_map(|(id, rules)| {
            rules.iter().map(move |r| HttpAllow {
                rule: r.clone(),
                derived_from: names[*id as usize].clone(),
            })
        })
        .collect();
    rules.extend(a.plain.iter().map(|id| HttpAllow {
        rule: HttpRule::default(),
        derived_from: names[*id as usize].clone(),
    }));
    L7Policy { rules }
}

/// The entries of one (endpoint, direction): peer identity -> L4 prefix -> entry. Each
/// identity's set is self-sufficient for the datapath's lookup (see [`DirectionBuilder::finish`]).
pub(crate) type DirectionEntries = BTreeMap<u32, BTreeMap<L4Key, MapEntry>>;

/// Write one direction's entries as map keys.
pub(crate) fn emit(
    endpoint_id: u32,
    direction: Direction,
    entries: DirectionEntries,
    out: &mut impl Extend<(PolicyMapKey, MapEntry)>,
) {
    out.extend(entries.into_iter().flat_map(|(identity, set)| {
        set.into_iter().map(move |((protocol, port), entry)| {
            (
                PolicyMapKey {
                    endpoint_id,
                    identity,
                    direction,
                    protocol,
                    port,
                },
                entry,
            )
        })
    }));
}

fn l4_prefix_len(k: L4Key) -> u8 {
    match k.0 {
        None => 0,
        Some(_) => 8 + k.1.prefix_len,
    }
}

/// The entry of the longest key of `set` that covers the prefix `k`.
fn longest_covering(set: &BTreeMap<L4Key, MapEntry>, k: L4Key) -> Option<&MapEntry> {
    set.iter()
        .filter(|(kk, _)| l4_covers(**kk, k))
        .max_by_key(|(kk, _)| l4_prefix_len(**kk))
        .map(|(_, e)| e)
}

/// What the datapath would find in `entries` for every packet of prefix `k` from `identity`,
/// given that no longer key of the merged set covers those packets: the exact identity's
/// longest covering key, else (nothing covering in the exact set) the wildcard's.
fn eval(entries: &DirectionEntries, identity: u32, k: L4Key) -> Option<&MapEntry> {
    if let Some(hit) = entries
        .get(&identity)
        .and_then(|set| longest_covering(set, k))
    {
        return Some(hit);
    }
    if identity == ANY {
        return None;
    }
    entries.get(&ANY).and_then(|set| longest_covering(set, k))
}

/// One key set carrying two verdicts: `enforced` (the enforcing policies' entries, `None`
/// when they leave the direction open) and `full` (enforcing and audit policies together),
/// both already correct on their own for the datapath's lookup.
///
/// Why this is exact: the merged set holds every key of both, plus, in each exact-identity
/// set, the wildcard set's keys (else a packet that hits an exact key of one side would be
/// judged by a shorter exact key where that side falls back to the wildcard). For a packet
/// whose longest merged key is `k`, no key of either side longer than `k` covers it, so each
/// side's verdict is that side's lookup of the prefix `k` ([`eval`]), the same for every
/// packet of `k`. Copied wildcard keys that change nothing are pruned, shortest first: one
/// whose entry equals that of its longest covering key, or that no kept key covers (the
/// packets it would hold miss the exact set and both sides fall back to the wildcard, which
/// the merged wildcard set answers exactly).
///
/// `default_deny` is the `derived_from` text of the enforced side's default.
pub(crate) fn merge_audit(
    enforced: Option<&DirectionEntries>,
    full: &DirectionEntries,
    default_deny: &str,
) -> DirectionEntries {
    let empty = DirectionEntries::new();
    let side = enforced.unwrap_or(&empty);
    let default_text: RuleSet = Arc::new(BTreeSet::from([default_deny.to_string()]));
    let entry = |identity: u32, k: L4Key| -> MapEntry {
        let audit = match eval(full, identity, k) {
            Some(f) => AuditEntry {
                verdict: f.verdict,
                derived_from: f.derived_from.clone(),
            },
            None => AuditEntry {
                verdict: Verdict::DefaultDeny,
                derived_from: default_text.clone(),
            },
        };
        let (verdict, derived_from, l7) = match enforced {
            // Audit-only direction: the enforced verdict passes everything.
            None => (
                if audit.verdict.drops() {
                    Verdict::AuditDeny
                } else {
                    Verdict::Allow
                },
                audit.derived_from.clone(),
                None,
            ),
            Some(e) => match eval(e, identity, k) {
                Some(hit) => (hit.verdict, hit.derived_from.clone(), hit.l7.clone()),
                None => (Verdict::DefaultDeny, default_text.clone(), None),
            },
        };
        MapEntry {
            verdict,
            derived_from,
            l7,
            audit: Some(audit),
        }
    };
    let keys_of = |identity: u32| -> BTreeSet<L4Key> {
        [side, full]
            .iter()
            .filter_map(|sets| sets.get(&identity))
            .flat_map(|set| set.keys().copied())
            .collect()
    };
    let wildcard_keys = keys_of(ANY);
    let identities: BTreeSet<u32> = side.keys().chain(full.keys()).copied().collect();
    let mut out = DirectionEntries::new();
    for identity in identities {
        let originals = keys_of(identity);
        let mut set: BTreeMap<L4Key, MapEntry> = originals
            .iter()
            .map(|k| (*k, entry(identity, *k)))
            .collect();
        if identity != ANY {
            let mut copied: Vec<L4Key> = wildcard_keys.difference(&originals).copied().collect();
            copied.sort_by_key(|k| l4_prefix_len(*k));
            for k in copied {
                let candidate = entry(identity, k);
                let parent = set
                    .iter()
                    .filter(|(pk, _)| **pk != k && l4_covers(**pk, k))
                    .max_by_key(|(pk, _)| l4_prefix_len(**pk))
                    .map(|(_, e)| e);
                if parent.is_some_and(|p| *p != candidate) {
                    set.insert(k, candidate);
                }
            }
        }
        out.insert(identity, set);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::{IPPROTO_TCP, IPPROTO_UDP};

    const EP: u32 = 7;
    const PEER: u32 = 300;

    fn get_rules() -> HttpRules {
        vec![HttpRule {
            method: Some("GET".into()),
            ..HttpRule::default()
        }]
        .into()
    }

    fn entry(s: &DesiredState, identity: u32, proto: u8, port: u16) -> MapEntry {
        match s.decide(EP, Direction::Ingress, identity, proto, port) {
            Decision::Entry(_, e) => e.clone(),
            other => panic!("no entry: {other:?}"),
        }
    }

    fn l7_origins(e: &MapEntry) -> Vec<(Option<String>, String)> {
        e.l7.as_ref()
            .expect("HTTP rules")
            .rules
            .iter()
            .map(|r| (r.rule.method.clone(), r.derived_from.clone()))
            .collect()
    }

    #[test]
    fn http_rules_ride_on_redirect_entries() {
        let tcp80 = (Some(IPPROTO_TCP), PortPrefix::exact(80));
        let mut b = DirectionBuilder::default();
        b.allow(PEER, tcp80, Some(&get_rules()), false, "l7");
        b.allow(
            PEER,
            (Some(IPPROTO_TCP), PortPrefix::exact(81)),
            None,
            false,
            "l4",
        );
        let s = state(b, false);
        let e = entry(&s, PEER, IPPROTO_TCP, 80);
        assert_eq!(
            e.verdict,
            Verdict::RedirectL7 {
                require_auth: false
            }
        );
        assert_eq!(l7_origins(&e), vec![(Some("GET".into()), "l7".into())]);
        let e = entry(&s, PEER, IPPROTO_TCP, 81);
        assert_eq!((e.verdict, e.l7), (Verdict::Allow, None));
    }

    /// Cilium: a selector without L7 rules on a proxied port allows every request.
    #[test]
    fn a_plain_allow_of_the_same_port_allows_all_requests() {
        let tcp80 = (Some(IPPROTO_TCP), PortPrefix::exact(80));
        let mut b = DirectionBuilder::default();
        b.allow(PEER, tcp80, Some(&get_rules()), false, "l7");
        b.allow(PEER, tcp80, None, false, "l4");
        let s = state(b, false);
        let e = entry(&s, PEER, IPPROTO_TCP, 80);
        assert_eq!(
            e.verdict,
            Verdict::RedirectL7 {
                require_auth: false
            }
        );
        assert_eq!(
            l7_origins(&e),
            vec![(Some("GET".into()), "l7".into()), (None, "l4".into())]
        );
    }

    /// Cilium's `__policy_check` ranks the L4-only proxy redirect before an L3-only allow.
    #[test]
    fn a_wildcard_http_rule_is_not_bypassed_by_an_l3_allow() {
        let tcp80 = (Some(IPPROTO_TCP), PortPrefix::exact(80));
        let mut b = DirectionBuilder::default();
        b.allow(ANY, tcp80, Some(&get_rules()), false, "any-l7");
        b.allow(PEER, (None, PortPrefix::ANY), None, true, "peer-l3");
        b.allow(
            301,
            (Some(IPPROTO_TCP), PortPrefix::new(0, 1)),
            None,
            false,
            "range",
        );
        let s = state(b, false);
        for peer in [PEER, 301, 999] {
            let e = entry(&s, peer, IPPROTO_TCP, 80);
            assert!(
                matches!(e.verdict, Verdict::RedirectL7 { .. }),
                "{peer}: {e:?}"
            );
            assert_eq!(l7_origins(&e), vec![(Some("GET".into()), "any-l7".into())]);
        }
        assert_eq!(
            entry(&s, PEER, IPPROTO_TCP, 80).verdict,
            Verdict::RedirectL7 { require_auth: true },
            "the L3 rule's authentication still applies"
        );
        assert_eq!(
            verdict(&s, PEER, IPPROTO_TCP, 81),
            Some(Verdict::RequireAuth)
        );
        assert_eq!(
            verdict(&s, PEER, IPPROTO_UDP, 80),
            Some(Verdict::RequireAuth)
        );
    }

    #[test]
    fn a_wildcard_http_rule_merges_with_the_peers_own() {
        let tcp80 = (Some(IPPROTO_TCP), PortPrefix::exact(80));
        let post: HttpRules = vec![HttpRule {
            method: Some("POST".into()),
            ..HttpRule::default()
        }]
        .into();
        let mut b = DirectionBuilder::default();
        b.allow(ANY, tcp80, Some(&get_rules()), false, "any-l7");
        b.allow(PEER, tcp80, Some(&post), false, "peer-l7");
        let s = state(b, false);
        let mut got = l7_origins(&entry(&s, PEER, IPPROTO_TCP, 80));
        got.sort();
        assert_eq!(
            got,
            vec![
                (Some("GET".into()), "any-l7".into()),
                (Some("POST".into()), "peer-l7".into())
            ]
        );
    }

    #[test]
    fn deny_still_beats_a_wildcard_http_rule() {
        let tcp80 = (Some(IPPROTO_TCP), PortPrefix::exact(80));
        let mut b = DirectionBuilder::default();
        b.allow(ANY, tcp80, Some(&get_rules()), false, "any-l7");
        b.allow(PEER, (None, PortPrefix::ANY), None, false, "peer-l3");
        b.deny(PEER, (Some(IPPROTO_TCP), PortPrefix::ANY), "deny-tcp");
        let s = state(b, false);
        let e = entry(&s, PEER, IPPROTO_TCP, 80);
        assert_eq!((e.verdict, e.l7), (Verdict::Deny, None));
        assert!(matches!(
            verdict(&s, 999, IPPROTO_TCP, 80),
            Some(Verdict::RedirectL7 { .. })
        ));
    }

    /// `b` as an enforcing direction, or as the audit policies of an audit-only direction.
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
        let entries = b.finish();
        let entries = if audit {
            merge_audit(None, &entries, "default")
        } else {
            entries
        };
        emit(EP, Direction::Ingress, entries, &mut s.entries);
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
            None,
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
            Arc::new(BTreeSet::from(["deny-all".to_string()])),
            "the converted entry names the deny that won"
        );
    }

    #[test]
    fn deny_range_covering_an_allowed_port_wins() {
        let mut b = DirectionBuilder::default();
        b.allow(
            PEER,
            (Some(IPPROTO_TCP), PortPrefix::exact(8080)),
            None,
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
        b.allow(PEER, (Some(IPPROTO_TCP), PortPrefix::ANY), None, false, "a");
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
            None,
            true,
            "auth",
        );
        b.allow(
            PEER,
            (Some(IPPROTO_TCP), PortPrefix::exact(80)),
            Some(&get_rules()),
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

    /// The case that needs wildcard keys copied into exact sets: the enforcing side answers
    /// TCP/80 from PEER through the wildcard (PEER's own set has UDP only), while the audit
    /// side has a broader TCP key for PEER that would otherwise shadow it.
    #[test]
    fn merged_entries_are_exact_for_both_sides() {
        let mut enforced = DirectionBuilder::default();
        enforced.allow(
            ANY,
            (Some(IPPROTO_TCP), PortPrefix::exact(80)),
            None,
            false,
            "e-any",
        );
        enforced.allow(
            PEER,
            (Some(IPPROTO_UDP), PortPrefix::ANY),
            None,
            false,
            "e-peer",
        );
        let mut full = DirectionBuilder::default();
        full.allow(
            ANY,
            (Some(IPPROTO_TCP), PortPrefix::exact(80)),
            None,
            false,
            "e-any",
        );
        full.allow(
            PEER,
            (Some(IPPROTO_UDP), PortPrefix::ANY),
            None,
            false,
            "e-peer",
        );
        full.allow(
            PEER,
            (Some(IPPROTO_TCP), PortPrefix::ANY),
            None,
            false,
            "a-peer",
        );
        let merged = merge_audit(Some(&enforced.finish()), &full.finish(), "default");
        let mut s = state(DirectionBuilder::default(), false);
        emit(EP, Direction::Ingress, merged, &mut s.entries);
        let d = s.decide(EP, Direction::Ingress, PEER, IPPROTO_TCP, 80);
        assert_eq!(d.enforced_verdict(), Verdict::Allow);
        assert_eq!(d.audit_verdict(), Some(Verdict::Allow));
        let Decision::Entry(_, e) = d else {
            panic!("an entry")
        };
        assert_eq!(*e.derived_from, BTreeSet::from(["e-any".to_string()]));
        let d = s.decide(EP, Direction::Ingress, PEER, IPPROTO_TCP, 81);
        assert_eq!(d.enforced_verdict(), Verdict::DefaultDeny);
        assert_eq!(d.audit_change(), Some(AuditChange::WouldAllow));
        let d = s.decide(EP, Direction::Ingress, 999, IPPROTO_TCP, 81);
        assert_eq!((d.drops(), d.audit_change()), (true, None));
        // The copied wildcard key is kept only where it changes something.
        let peer_keys = s.entries.keys().filter(|k| k.identity == PEER).count();
        assert_eq!(peer_keys, 3, "UDP/*, TCP/* and the copied TCP/80");
    }

    #[test]
    fn an_audit_verdict_change_is_a_map_write() {
        let key = PolicyMapKey {
            endpoint_id: EP,
            identity: PEER,
            direction: Direction::Ingress,
            protocol: Some(IPPROTO_TCP),
            port: PortPrefix::exact(80),
        };
        let mut old = DesiredState::default();
        old.entries
            .insert(key, MapEntry::new(Verdict::Allow, BTreeSet::new()));
        let mut new = old.clone();
        new.entries.get_mut(&key).expect("entry").audit = Some(AuditEntry {
            verdict: Verdict::Deny,
            derived_from: Arc::default(),
        });
        assert_eq!(diff(&old, &new).upserts.len(), 1);
        assert!(diff(&new, &new).is_empty());
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
        let entry =
            |verdict, rule: &str| MapEntry::new(verdict, BTreeSet::from([rule.to_string()]));
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
