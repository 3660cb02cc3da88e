//! Policy map capacity: which endpoints' new entry sets fit, before anything is written.
//!
//! The `policy` map has a fixed size shared by every endpoint of the node. Writing a set that
//! does not fit would fail part-way (Cilium then drops at random, cilium#46189); instead an
//! endpoint whose new set is over its share, or does not fit in what is left of the map, keeps
//! its previous, complete set (entries and isolation alike) and gets a [`CapacityRefusal`]
//! naming the policies that grew it. Every other endpoint gets its new set. Pure: the caller
//! diffs the returned state against what the map holds, logs the refusals and counts them.
//!
//! What must fit is the peak while the change is written, in the writer's order that never
//! opens a window: the entries of endpoints that leave go first; then every new entry is
//! written while the entries it replaces are still in place; stale entries go last. So a
//! kept endpoint holds its old entries plus the keys it gains, and a set that swaps its keys
//! needs room for both until the write ends. A set refused only for that transient room fits
//! in the next round, once the stale entries of the others are gone
//! ([`CapacityLimit::Total`] refusals say so; the caller runs another round).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::mapstate::{DesiredState, Direction, EndpointPolicy, Isolation, MapEntry, PolicyMapKey};

/// The map's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapacityLimits {
    /// Most entries one endpoint may have (both directions).
    pub per_endpoint: usize,
    /// Entries the whole map holds.
    pub total: usize,
}

/// Which limit a refused set broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum CapacityLimit {
    /// The endpoint's share.
    Endpoint { budget: usize },
    /// The map as a whole: `free` entries were left for this endpoint's `gained` ones while
    /// the change is written.
    Total {
        capacity: usize,
        free: usize,
        gained: usize,
    },
}

/// An endpoint whose new entry set was not written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("endpoint {endpoint_id}: {}", self.reason())]
pub struct CapacityRefusal {
    pub endpoint_id: u32,
    /// Entries the new set needs.
    pub wanted: usize,
    pub limit: CapacityLimit,
    /// Entries of the set kept in force instead (0 for a new endpoint).
    pub kept: usize,
    /// Whether the endpoint had a previous set; a new endpoint without one is kept isolated
    /// in both directions with no entry (fail closed) until its set fits.
    pub had_previous: bool,
    /// Policies with more entries in the new set than in the kept one, most growth first.
    pub grown_by: Vec<String>,
}

impl CapacityRefusal {
    /// Why, and what stays in force instead (the endpoint is the caller's to name).
    #[must_use]
    pub fn reason(&self) -> String {
        let limit = match self.limit {
            CapacityLimit::Endpoint { budget } => {
                format!("over the per-endpoint budget of {budget}")
            }
            CapacityLimit::Total {
                capacity,
                free,
                gained,
            } => format!(
                "{gained} of them new, and the policy map ({capacity} entries for all \
                 endpoints of the node) has room for {free} more"
            ),
        };
        let kept = if self.had_previous {
            format!("keeps its previous {} entries", self.kept)
        } else {
            "stays isolated with no entry (new endpoint)".to_string()
        };
        let by = if self.grown_by.is_empty() {
            String::new()
        } else {
            format!("; grown by {}", self.grown_by.join(", "))
        };
        format!(
            "policy needs {} entries, {limit}: the endpoint {kept}{by} (hint: narrow those policies' peers or port ranges, or raise the map size)",
            self.wanted
        )
    }

    /// Refused for room in the whole map, which the next round may have.
    #[must_use]
    pub fn for_room(&self) -> bool {
        matches!(self.limit, CapacityLimit::Total { .. })
    }
}

/// One side of a fit: the entries and the endpoints they belong to.
#[derive(Clone, Copy)]
pub struct EntrySets<'a> {
    pub entries: &'a BTreeMap<PolicyMapKey, MapEntry>,
    pub endpoints: &'a BTreeSet<u32>,
}

impl EntrySets<'_> {
    fn of(&self, id: u32) -> impl Iterator<Item = (&PolicyMapKey, &MapEntry)> {
        endpoint_range(self.entries, id)
    }
}

fn endpoint_range(
    entries: &BTreeMap<PolicyMapKey, MapEntry>,
    id: u32,
) -> impl Iterator<Item = (&PolicyMapKey, &MapEntry)> {
    entries
        .range(PolicyMapKey::first_of(id)..)
        .take_while(move |(k, _)| k.endpoint_id == id)
}

/// Which endpoints of `desired` keep their `previous` set (see the module docs for what must
/// fit). A set over the per-endpoint budget is refused; then, while the peak does not fit,
/// the set gaining the most new keys is refused (ties: the higher endpoint id, the newer
/// endpoint). Deterministic, so every reconcile refuses the same endpoints until something
/// changes.
#[must_use]
pub fn capacity_refusals(
    previous: EntrySets<'_>,
    desired: EntrySets<'_>,
    limits: CapacityLimits,
) -> Vec<CapacityRefusal> {
    let mut held = 0usize;
    let mut new_counts: BTreeMap<u32, usize> = BTreeMap::new();
    let mut gained: BTreeMap<u32, usize> = BTreeMap::new();
    for k in desired.entries.keys() {
        *new_counts.entry(k.endpoint_id).or_default() += 1;
        if !previous.entries.contains_key(k) {
            *gained.entry(k.endpoint_id).or_default() += 1;
        }
    }
    let kept_count = |id: u32| {
        if previous.endpoints.contains(&id) {
            previous.of(id).count()
        } else {
            0
        }
    };
    for &id in desired.endpoints {
        held += kept_count(id);
    }
    let mut refused: BTreeMap<u32, CapacityLimit> = BTreeMap::new();
    for (&id, &n) in &new_counts {
        if n > limits.per_endpoint {
            refused.insert(
                id,
                CapacityLimit::Endpoint {
                    budget: limits.per_endpoint,
                },
            );
        }
    }
    let mut peak = held
        + gained
            .iter()
            .filter(|(id, _)| !refused.contains_key(id))
            .map(|(_, n)| n)
            .sum::<usize>();
    let mut growers: Vec<(usize, u32)> = gained
        .iter()
        .filter(|(id, _)| !refused.contains_key(id))
        .map(|(id, n)| (*n, *id))
        .collect();
    growers.sort_unstable_by(|a, b| b.cmp(a));
    let mut for_room = Vec::new();
    for (n, id) in growers {
        if peak <= limits.total {
            break;
        }
        peak -= n;
        for_room.push((id, n));
    }
    let free = limits.total.saturating_sub(peak);
    for (id, n) in for_room {
        refused.insert(
            id,
            CapacityLimit::Total {
                capacity: limits.total,
                free,
                gained: n,
            },
        );
    }
    refused
        .into_iter()
        .map(|(id, limit)| CapacityRefusal {
            endpoint_id: id,
            wanted: new_counts.get(&id).copied().unwrap_or(0),
            limit,
            kept: kept_count(id),
            had_previous: previous.endpoints.contains(&id),
            grown_by: grown_by(previous, desired, id),
        })
        .collect()
}

/// What to write, and who was refused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CapacityPlan {
    /// The state to write: `desired`, except refused endpoints keep their `previous` set.
    pub state: DesiredState,
    pub refused: Vec<CapacityRefusal>,
}

/// [`capacity_refusals`] applied to a [`DesiredState`]: refused endpoints keep their
/// previous set, entries, isolation and the policies that isolate it; a new one is isolated
/// both ways with no entry.
#[must_use]
pub fn fit_capacity(
    previous: &DesiredState,
    mut desired: DesiredState,
    limits: CapacityLimits,
) -> CapacityPlan {
    let ids = |s: &DesiredState| s.endpoints.keys().copied().collect::<BTreeSet<u32>>();
    let (old_ids, new_ids) = (ids(previous), ids(&desired));
    let refused = capacity_refusals(
        EntrySets {
            entries: &previous.entries,
            endpoints: &old_ids,
        },
        EntrySets {
            entries: &desired.entries,
            endpoints: &new_ids,
        },
        limits,
    );
    let state = &mut desired;
    for r in &refused {
        let id = r.endpoint_id;
        state.entries.retain(|k, _| k.endpoint_id != id);
        state.isolated_by.retain(|(e, _), _| *e != id);
        if r.had_previous {
            state
                .entries
                .extend(previous.endpoint_entries(id).map(|(k, e)| (*k, e.clone())));
            state.endpoints.insert(id, previous.endpoints[&id]);
            for d in [Direction::Ingress, Direction::Egress] {
                if let Some(by) = previous.isolated_by.get(&(id, d)) {
                    state.isolated_by.insert((id, d), by.clone());
                }
            }
        } else {
            state.endpoints.insert(
                id,
                EndpointPolicy {
                    ingress: Isolation::Enforced,
                    egress: Isolation::Enforced,
                },
            );
        }
    }
    CapacityPlan {
        state: desired,
        refused,
    }
}

/// Policies named by more entries of `id` in `desired` than in `previous`.
fn grown_by(previous: EntrySets<'_>, desired: EntrySets<'_>, id: u32) -> Vec<String> {
    let tally = |s: EntrySets<'_>| {
        let mut t: BTreeMap<String, usize> = BTreeMap::new();
        for (_, e) in s.of(id) {
            for p in entry_policies(e) {
                *t.entry(p).or_default() += 1;
            }
        }
        t
    };
    let (old, new) = (tally(previous), tally(desired));
    let mut growth: Vec<(usize, String)> = new
        .into_iter()
        .filter_map(|(p, n)| {
            let o = old.get(&p).copied().unwrap_or(0);
            (n > o).then(|| (n - o, p))
        })
        .collect();
    growth.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    growth.into_iter().map(|(_, p)| p).collect()
}

/// The policies (`Kind ns/name`) an entry's enforced and audit verdicts came from.
fn entry_policies(e: &MapEntry) -> BTreeSet<String> {
    e.derived_from
        .iter()
        .chain(e.audit.iter().flat_map(|a| a.derived_from.iter()))
        .filter_map(|rule| policy_of_rule(rule))
        .map(str::to_string)
        .collect()
}

/// `WeftNetworkPolicy shop/api` of `WeftNetworkPolicy shop/api ingress[0]`; `None` for the
/// texts that name no rule (host exemption, default deny).
#[must_use]
pub fn policy_of_rule(rule: &str) -> Option<&str> {
    let (policy, path) = rule.rsplit_once(' ')?;
    let (section, index) = path.strip_suffix(']')?.split_once('[')?;
    let known = ["ingress", "ingressDeny", "egress", "egressDeny"].contains(&section);
    (known && !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit())).then_some(policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapstate::{MapEntry, PolicyMapKey, Verdict};
    use crate::ports::{IPPROTO_TCP, PortPrefix};

    fn with_entries(sets: &[(u32, &str, u16)]) -> DesiredState {
        let mut s = DesiredState::default();
        for &(ep, policy, n) in sets {
            s.endpoints.insert(
                ep,
                EndpointPolicy {
                    ingress: Isolation::Enforced,
                    egress: Isolation::Open,
                },
            );
            for port in 0..n {
                s.entries.insert(
                    PolicyMapKey {
                        endpoint_id: ep,
                        identity: 300,
                        direction: Direction::Ingress,
                        protocol: Some(IPPROTO_TCP),
                        port: PortPrefix::exact(1000 + port),
                    },
                    MapEntry::new(
                        Verdict::Allow,
                        BTreeSet::from([format!("WeftNetworkPolicy shop/{policy} ingress[0]")]),
                    ),
                );
            }
        }
        s
    }

    const LIMITS: CapacityLimits = CapacityLimits {
        per_endpoint: 10,
        total: 25,
    };

    #[test]
    fn sets_that_fit_are_written_whole() {
        let old = with_entries(&[(1, "a", 3)]);
        let new = with_entries(&[(1, "a", 8), (2, "b", 10)]);
        let plan = fit_capacity(&old, new.clone(), LIMITS);
        assert!(plan.refused.is_empty());
        assert_eq!(plan.state, new);
    }

    #[test]
    fn over_the_endpoint_budget_keeps_the_previous_set_and_names_the_grower() {
        let old = with_entries(&[(1, "a", 3), (2, "b", 2)]);
        let mut new = with_entries(&[(1, "a", 3), (2, "b", 2)]);
        new.entries.extend(
            with_entries(&[(1, "big", 9)])
                .entries
                .into_iter()
                .map(|(mut k, e)| {
                    k.port = PortPrefix::exact(k.port.port + 100);
                    (k, e)
                }),
        );
        let plan = fit_capacity(&old, new, LIMITS);
        assert_eq!(plan.refused.len(), 1);
        let r = &plan.refused[0];
        assert_eq!((r.endpoint_id, r.wanted, r.kept), (1, 12, 3));
        assert_eq!(r.limit, CapacityLimit::Endpoint { budget: 10 });
        assert_eq!(r.grown_by, vec!["WeftNetworkPolicy shop/big"]);
        let text = r.to_string();
        assert!(text.contains("keeps its previous 3 entries"), "{text}");
        assert!(
            text.contains("grown by WeftNetworkPolicy shop/big"),
            "{text}"
        );
        assert_eq!(
            plan.state.endpoint_entries(1).count(),
            3,
            "last complete set"
        );
        assert_eq!(plan.state.endpoint_entries(2).count(), 2);
    }

    #[test]
    fn the_peak_while_writing_must_fit_and_a_later_round_admits_the_rest() {
        let old = with_entries(&[(1, "a", 10), (2, "b", 5), (3, "c", 5)]);
        // 1 shrinks to 2, 2 and 3 grow by 5: 22 in the end, but while the change is written
        // 1 still holds its 10: 20 held + 10 gained = 30. The bigger id is refused ...
        let new = with_entries(&[(1, "a", 2), (2, "b", 10), (3, "c", 10)]);
        let first = fit_capacity(&old, new.clone(), LIMITS);
        assert_eq!(first.refused.len(), 1, "{:?}", first.refused);
        assert_eq!(first.refused[0].endpoint_id, 3);
        assert!(first.refused[0].for_room());
        assert_eq!(first.state.endpoint_entries(3).count(), 5);
        // ... and fits the next round, once endpoint 1's stale entries are gone.
        let second = fit_capacity(&first.state, new.clone(), LIMITS);
        assert!(second.refused.is_empty(), "{:?}", second.refused);
        assert_eq!(second.state, new);
        // With 1 unchanged the map is full for good: 10 + 10 + 5 = 25.
        let new = with_entries(&[(1, "a", 10), (2, "b", 10), (3, "c", 10)]);
        let plan = fit_capacity(&old, new, LIMITS);
        assert_eq!(plan.refused.len(), 1);
        assert_eq!(plan.refused[0].endpoint_id, 3);
        assert_eq!(
            plan.refused[0].limit,
            CapacityLimit::Total {
                capacity: 25,
                free: 0,
                gained: 5
            }
        );
        assert!(plan.state.entries.len() <= LIMITS.total);
        assert_eq!(plan.state.endpoint_entries(3).count(), 5);
    }

    #[test]
    fn an_endpoint_that_leaves_frees_its_entries_first() {
        let old = with_entries(&[(1, "a", 20)]);
        let new = with_entries(&[(2, "b", 10), (3, "c", 10)]);
        let plan = fit_capacity(&old, new.clone(), LIMITS);
        assert!(plan.refused.is_empty(), "{:?}", plan.refused);
        assert_eq!(plan.state, new);
    }

    #[test]
    fn a_new_endpoint_that_does_not_fit_fails_closed() {
        let old = DesiredState::default();
        let new = with_entries(&[(7, "huge", 11)]);
        let plan = fit_capacity(&old, new, LIMITS);
        assert_eq!(plan.refused.len(), 1);
        assert!(!plan.refused[0].had_previous);
        assert_eq!(plan.state.endpoint_entries(7).count(), 0);
        assert_eq!(
            plan.state.endpoints[&7],
            EndpointPolicy {
                ingress: Isolation::Enforced,
                egress: Isolation::Enforced
            }
        );
        assert!(
            plan.state
                .decide(7, Direction::Egress, 300, IPPROTO_TCP, 1000)
                .drops()
        );
    }

    #[test]
    fn rule_texts_name_their_policy() {
        for (text, want) in [
            (
                "WeftNetworkPolicy shop/api ingress[0]",
                Some("WeftNetworkPolicy shop/api"),
            ),
            ("NetworkPolicy a/b egress[12]", Some("NetworkPolicy a/b")),
            (
                "WeftClusterwideNetworkPolicy x egressDeny[1]",
                Some("WeftClusterwideNetworkPolicy x"),
            ),
            (crate::resolve::HOST_INGRESS_RULE, None),
            ("default deny: ingress isolated by NetworkPolicy a/b", None),
        ] {
            assert_eq!(policy_of_rule(text), want, "{text}");
        }
    }
}
