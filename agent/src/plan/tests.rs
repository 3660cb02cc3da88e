use std::collections::BTreeSet;

use weft_policy::{
    Direction, EndpointPolicy, Isolation, MapEntry, PolicyMapKey, PortPrefix, Verdict,
};

use super::*;

fn entries(ep: u32, n: u16, rule: &str) -> BTreeMap<PolicyMapKey, MapEntry> {
    (0..n)
        .map(|port| {
            (
                PolicyMapKey {
                    endpoint_id: ep,
                    identity: 300,
                    direction: Direction::Ingress,
                    protocol: Some(6),
                    port: PortPrefix::exact(1000 + port),
                },
                MapEntry {
                    verdict: Verdict::Allow,
                    derived_from: std::sync::Arc::new(BTreeSet::from([format!(
                        "WeftNetworkPolicy shop/{rule} ingress[0]"
                    )])),
                    audit: None,
                    l7: None,
                },
            )
        })
        .collect()
}

fn endpoint(ifindex: u32, id: u32, isolated: bool) -> (u32, EndpointSpec) {
    let isolation = if isolated {
        Isolation::Enforced
    } else {
        Isolation::Open
    };
    (
        ifindex,
        EndpointSpec {
            endpoint_id: id,
            identity: 300 + id,
            policy: EndpointPolicy {
                ingress: isolation,
                egress: Isolation::Open,
            },
        },
    )
}

fn desired(eps: &[(u32, u32, bool)], policy: BTreeMap<PolicyMapKey, MapEntry>) -> Desired {
    Desired {
        endpoints: eps
            .iter()
            .map(|(i, id, iso)| endpoint(*i, *id, *iso))
            .collect(),
        policy,
        ..Desired::default()
    }
}

const SMALL: Capacity = Capacity {
    endpoints: 16,
    ipcache: 4,
    nodes: 4,
    policy: 10,
};

#[test]
fn a_change_that_fits_is_taken_whole() {
    let old = desired(&[(10, 1, false)], BTreeMap::new());
    let new = desired(&[(10, 1, true)], entries(1, 5, "a"));
    let fitted = fit(new.clone(), &old, SMALL, 8);
    assert_eq!(fitted.desired, new);
    assert!(fitted.refusals.is_empty() && fitted.ipcache_problem.is_none());
    assert!(!fitted.over_capacity);
}

#[test]
fn an_endpoint_over_its_budget_keeps_its_previous_state() {
    let mut old_policy = entries(1, 2, "old");
    old_policy.extend(entries(2, 2, "b"));
    let old = desired(&[(10, 1, true), (11, 2, true)], old_policy.clone());
    let mut new_policy = entries(1, 9, "big");
    new_policy.extend(entries(2, 1, "b"));
    let new = desired(&[(10, 1, true), (11, 2, true)], new_policy);
    let Fitted {
        desired: fitted,
        refusals,
        ..
    } = fit(new, &old, SMALL, 8);
    assert_eq!(refusals.len(), 1);
    let r = &refusals[0];
    assert_eq!((r.endpoint_id, r.kept_previous, r.wanted), (1, true, 9));
    assert_eq!(r.policies, ["WeftNetworkPolicy shop/big"]);
    assert!(r.reason.contains("budget of 8"), "{}", r.reason);
    // Endpoint 1 keeps its old entries; endpoint 2 gets its new ones.
    let ep1: Vec<_> = fitted
        .policy
        .keys()
        .filter(|k| k.endpoint_id == 1)
        .collect();
    assert_eq!(ep1.len(), 2);
    assert!(
        fitted
            .policy
            .values()
            .any(|e| e.derived_from.iter().any(|d| d.contains("old")))
    );
    assert_eq!(
        fitted.policy.keys().filter(|k| k.endpoint_id == 2).count(),
        1
    );
}

#[test]
fn the_biggest_grower_is_refused_when_the_map_is_full() {
    let old = desired(&[(10, 1, true), (11, 2, true)], entries(2, 3, "b"));
    let mut new_policy = entries(1, 6, "grow");
    new_policy.extend(entries(2, 6, "b2"));
    let new = desired(&[(10, 1, true), (11, 2, true)], new_policy);
    let Fitted {
        desired: fitted,
        refusals,
        ..
    } = fit(new, &old, SMALL, 8);
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(
        refusals[0].endpoint_id, 1,
        "endpoint 1 grows by 6, endpoint 2 by 3"
    );
    assert!(
        !refusals[0].kept_previous || fitted.endpoints[&10].policy.ingress == Isolation::Enforced
    );
    assert!(fitted.policy.len() <= SMALL.policy);
}

#[test]
fn a_new_endpoint_that_does_not_fit_is_not_admitted() {
    let old = desired(&[], BTreeMap::new());
    let new = desired(&[(10, 1, true)], entries(1, 9, "big"));
    let Fitted {
        desired: fitted,
        refusals,
        ..
    } = fit(new, &old, SMALL, 8);
    assert!(!refusals[0].kept_previous);
    assert!(fitted.policy.is_empty());
    assert_eq!(
        fitted.endpoints[&10].policy,
        EndpointPolicy {
            ingress: Isolation::Enforced,
            egress: Isolation::Enforced
        },
        "isolated both ways until it fits"
    );
}

#[test]
fn an_ipcache_that_does_not_fit_keeps_its_previous_content() {
    let mut old = desired(&[], BTreeMap::new());
    old.ipcache.insert(
        "10.0.0.0/8".parse().unwrap(),
        IpcacheSpec {
            identity: 1 << 24,
            place: Place::Outside,
        },
    );
    let mut new = old.clone();
    for i in 0..5u8 {
        new.ipcache.insert(
            format!("192.168.{i}.0/24").parse().unwrap(),
            IpcacheSpec {
                identity: (1 << 24) + u32::from(i),
                place: Place::Outside,
            },
        );
    }
    let fitted = fit(new, &old, SMALL, 8);
    assert_eq!(fitted.desired.ipcache, old.ipcache);
    assert!(
        fitted
            .ipcache_problem
            .expect("reported")
            .contains("holds at most 4")
    );
}

#[test]
fn an_endpoint_that_leaves_makes_room_in_the_same_change() {
    // Endpoint 1 (6 entries) leaves while endpoint 2 grows from 0 to 6: the apply removes
    // endpoint 1 first, so the peak is 6, not 12.
    let old = desired(&[(10, 1, true), (11, 2, true)], entries(1, 6, "a"));
    let new = desired(&[(11, 2, true)], entries(2, 6, "b"));
    let fitted = fit(new.clone(), &old, SMALL, 8);
    assert!(fitted.refusals.is_empty(), "{:?}", fitted.refusals);
    assert_eq!(fitted.desired, new);
}

#[test]
fn replaced_entries_count_twice_until_the_old_ones_are_gone() {
    // Both endpoints swap their 3 entries for 3 others: while the change is written each
    // holds 6 (12 > 10), so one is refused this round and fits the next.
    let mut old_policy = entries(1, 3, "a");
    old_policy.extend(entries(2, 3, "b"));
    let eps = [(10, 1, true), (11, 2, true)];
    let old = desired(&eps, old_policy);
    let shifted = |ep, rule| -> BTreeMap<_, _> {
        entries(ep, 6, rule)
            .into_iter()
            .filter(|(k, _)| k.port.port >= 1003)
            .collect()
    };
    let mut new_policy = shifted(1, "a2");
    new_policy.extend(shifted(2, "b2"));
    let new = desired(&eps, new_policy);
    let first = fit(new.clone(), &old, SMALL, 8);
    assert_eq!(first.refusals.len(), 1, "{:?}", first.refusals);
    assert!(first.over_capacity);
    assert!(first.refusals[0].kept_previous);
    let second = fit(new.clone(), &first.desired, SMALL, 8);
    assert!(second.refusals.is_empty(), "{:?}", second.refusals);
    assert_eq!(second.desired, new);
}

#[test]
fn endpoints_past_the_map_size_are_not_admitted_newest_first() {
    let old_eps: Vec<(u32, u32, bool)> = (0..15).map(|i| (100 + i, 1 + i, true)).collect();
    let old = desired(&old_eps, BTreeMap::new());
    let mut new_eps = old_eps.clone();
    new_eps.extend([(200, 40, true), (201, 41, true)]);
    let fitted = fit(desired(&new_eps, entries(41, 2, "n")), &old, SMALL, 8);
    assert_eq!(fitted.desired.endpoints.len(), SMALL.endpoints);
    assert_eq!(fitted.refusals.len(), 1, "{:?}", fitted.refusals);
    let r = &fitted.refusals[0];
    assert_eq!((r.endpoint_id, r.kept_previous), (41, false));
    assert!(r.reason.contains("at most 16 endpoints"), "{}", r.reason);
    assert!(!fitted.desired.endpoints.contains_key(&201));
    assert!(fitted.desired.policy.keys().all(|k| k.endpoint_id != 41));
}

#[test]
fn encryption_overlay_marks_only_carried_nodes_and_lists_cluster_ranges_under_strict() {
    let node = |name: &str, local: bool, cidr: &str| NodeSummary {
        name: name.into(),
        local,
        addresses: vec![],
        pod_cidrs: vec![cidr.parse().expect("cidr")],
        pods: 0,
        wireguard_public_key: None,
    };
    let nodes = [
        node("n1", true, "100.64.1.0/24"),
        node("n2", false, "100.64.2.0/24"),
        node("n3", false, "100.64.3.0/24"),
    ];
    let ids = BTreeMap::from([("n2".to_owned(), 1u16), ("n3".to_owned(), 2u16)]);
    let mut desired = Desired::default();
    for id in [1, 2] {
        desired.nodes.insert(
            id,
            NodeSpec {
                underlay: "100.65.0.9".parse().expect("addr"),
                encrypt: false,
                encrypt_ifindex: 0,
            },
        );
    }
    let state = EncryptionState {
        ifindex: 42,
        peers: BTreeSet::from(["n2".to_owned()]),
    };
    let cluster: Vec<IpNet> = vec!["100.64.0.0/16".parse().expect("cidr")];
    encryption_overlay(&mut desired, &nodes, &ids, Some(&state), true, &cluster);
    assert!(desired.nodes[&1].encrypt && desired.nodes[&1].encrypt_ifindex == 42);
    assert!(!desired.nodes[&2].encrypt, "n3 is no peer: not encrypted");
    assert!(desired.strict_encryption);
    assert_eq!(desired.encrypt_ifindex, 42);
    let net = |s: &str| s.parse::<IpNet>().expect("cidr");
    assert_eq!(
        desired.cluster,
        BTreeMap::from([
            (net("100.64.0.0/16"), ClusterSpec::Unclaimed),
            (net("100.64.1.0/24"), ClusterSpec::Local),
            (net("100.64.2.0/24"), ClusterSpec::Node { node: 1 }),
            (net("100.64.3.0/24"), ClusterSpec::Node { node: 2 }),
        ])
    );
    // Before the device reported, no node counts as encrypted; without strict, no ranges.
    encryption_overlay(&mut desired, &nodes, &ids, None, false, &cluster);
    assert!(!desired.nodes[&1].encrypt);
    assert!(desired.cluster.is_empty());
    assert_eq!(desired.encrypt_ifindex, 0);
}
