//! Properties of resolution, checked by simulating the datapath over the resolved state:
//! the LPM lookup on the exact identity, then on identity 0, then the direction's default.
//!
//! The reference is the policy language's meaning, evaluated directly on the rules, once for
//! the enforcing policies (the enforced verdict) and once for all of them (the audit verdict):
//! with no policy of the set the packet passes; else it is dropped if any deny rule of the set
//! matches it, else passed if any allow rule matches, else dropped.

use proptest::prelude::*;

use super::*;
use crate::explain::{Peer, explain};
use crate::identity::{HOST, REMOTE_NODE, WORLD};
use crate::model::{
    Entity, IcmpFamily, IcmpField, IcmpRule, IngressDenyRule, IngressRule, LabelSelector,
    LabelSelectorRequirement, PolicySpec, PortDenyRule, PortProtocol, PortRule, Protocol,
    SelectorOperator, WeftClusterwideNetworkPolicy,
};
use crate::parse::compile_clusterwide_policy;

const N_PODS: usize = 4;
const EP: u32 = 1;
const UNKNOWN: u32 = 1000;

#[derive(Clone, Debug)]
enum PeerGen {
    Any,
    Pods(Vec<usize>),
    Entity(Entity),
}

#[derive(Clone, Debug)]
enum L4Gen {
    Any,
    /// (protocol, port, endPort); port 0 = every port.
    Ports(Vec<(Protocol, u16, u16)>),
    Icmp(u8),
}

#[derive(Clone, Debug)]
struct RuleGen {
    peer: PeerGen,
    l4: L4Gen,
}

#[derive(Clone, Debug)]
struct PolicyGen {
    audit: bool,
    allows: Vec<RuleGen>,
    denies: Vec<RuleGen>,
}

fn peer_gen() -> impl Strategy<Value = PeerGen> {
    prop_oneof![
        1 => Just(PeerGen::Any),
        4 => prop::collection::btree_set(0..N_PODS, 1..=N_PODS)
            .prop_map(|s| PeerGen::Pods(s.into_iter().collect())),
        2 => prop::sample::select(vec![
            Entity::World,
            Entity::Cluster,
            Entity::Host,
            Entity::RemoteNode,
            Entity::All,
        ])
        .prop_map(PeerGen::Entity),
    ]
}

fn l4_gen() -> impl Strategy<Value = L4Gen> {
    let port = (
        prop::sample::select(vec![Protocol::TCP, Protocol::UDP, Protocol::ANY]),
        0u16..40,
        0u16..12,
    )
        .prop_map(|(p, start, len)| (p, start, if start == 0 { 0 } else { start + len }));
    prop_oneof![
        1 => Just(L4Gen::Any),
        4 => prop::collection::vec(port, 1..3).prop_map(L4Gen::Ports),
        1 => (0u8..4).prop_map(L4Gen::Icmp),
    ]
}

fn rule_gen() -> impl Strategy<Value = RuleGen> {
    (peer_gen(), l4_gen()).prop_map(|(peer, l4)| RuleGen { peer, l4 })
}

fn policy_gen(audit: impl Strategy<Value = bool>) -> impl Strategy<Value = PolicyGen> {
    (
        audit,
        prop::collection::vec(rule_gen(), 0..4),
        prop::collection::vec(rule_gen(), 0..3),
    )
        .prop_map(|(audit, allows, denies)| PolicyGen {
            audit,
            allows,
            denies,
        })
}

// === building real policies from the generated ones ===

fn pod_labels(i: usize) -> Labels {
    security_labels(
        &Labels::from([("id".to_string(), format!("p{i}"))]),
        "shop",
        "default",
        &Labels::new(),
    )
}

fn peers_wire(p: &PeerGen) -> (Vec<LabelSelector>, Vec<Entity>) {
    match p {
        PeerGen::Any => (vec![], vec![]),
        PeerGen::Pods(pods) => (
            vec![LabelSelector {
                match_expressions: vec![LabelSelectorRequirement {
                    key: "id".into(),
                    operator: SelectorOperator::In,
                    values: pods.iter().map(|i| format!("p{i}")).collect(),
                }],
                ..Default::default()
            }],
            vec![],
        ),
        PeerGen::Entity(e) => (vec![], vec![*e]),
    }
}

fn ports_wire(l4: &L4Gen) -> (Vec<PortProtocol>, Vec<IcmpRule>) {
    match l4 {
        L4Gen::Any => (vec![], vec![]),
        L4Gen::Ports(ps) => (
            ps.iter()
                .map(|(protocol, port, end)| PortProtocol {
                    port: Some(port.to_string()),
                    end_port: (*end > *port).then_some(i64::from(*end)),
                    protocol: *protocol,
                })
                .collect(),
            vec![],
        ),
        L4Gen::Icmp(t) => (
            vec![],
            vec![IcmpRule {
                fields: vec![IcmpField {
                    type_: (*t).into(),
                    family: IcmpFamily::default(),
                }],
            }],
        ),
    }
}

fn to_policy(i: usize, g: &PolicyGen) -> Policy {
    let allows = g
        .allows
        .iter()
        .map(|r| {
            let (from_endpoints, from_entities) = peers_wire(&r.peer);
            let (ports, icmps) = ports_wire(&r.l4);
            IngressRule {
                from_endpoints,
                from_entities,
                to_ports: if ports.is_empty() {
                    vec![]
                } else {
                    vec![PortRule { ports, rules: None }]
                },
                icmps,
                ..Default::default()
            }
        })
        .collect();
    let denies = g
        .denies
        .iter()
        .map(|r| {
            let (from_endpoints, from_entities) = peers_wire(&r.peer);
            let (ports, icmps) = ports_wire(&r.l4);
            IngressDenyRule {
                from_endpoints,
                from_entities,
                to_ports: if ports.is_empty() {
                    vec![]
                } else {
                    vec![PortDenyRule { ports }]
                },
                icmps,
                ..Default::default()
            }
        })
        .collect();
    let spec = PolicySpec {
        enforcement: if g.audit {
            Enforcement::Audit
        } else {
            Enforcement::Enforce
        },
        ingress: Some(allows),
        ingress_deny: Some(denies),
        ..Default::default()
    };
    let wcnp = WeftClusterwideNetworkPolicy::new(
        &format!("p{i}"),
        crate::model::ClusterwidePolicySpec(spec),
    );
    compile_clusterwide_policy(&wcnp).expect("generated policies are valid")
}

struct World {
    state: DesiredState,
    pod_ids: Vec<u32>,
}

fn build(policies: &[PolicyGen], host: bool) -> World {
    let mut repo = Repository::new();
    for (i, g) in policies.iter().enumerate() {
        repo.upsert(to_policy(i, g));
    }
    let mut ids = IdentityAllocator::new();
    let pod_ids: Vec<u32> = (0..N_PODS)
        .map(|i| ids.allocate(&pod_labels(i)).expect("allocate"))
        .collect();
    let endpoints = [LocalEndpoint {
        endpoint_id: EP,
        namespace: "shop".into(),
        name: "p0".into(),
        identity: pod_ids[0],
        labels: pod_labels(0),
        ports: NamedPorts::new(),
    }];
    let state = resolve(&ResolveInput {
        repository: &repo,
        endpoints: &endpoints,
        identities: ids.pod_identities(),
        cidr_identities: &BTreeMap::new(),
        named_ports: &BTreeMap::new(),
        options: ResolveOptions {
            allow_host_ingress: host,
            ..ResolveOptions::default()
        },
    });
    World { state, pod_ids }
}

// === the reference ===

fn peer_matches(p: &PeerGen, id: u32, pod_ids: &[u32]) -> bool {
    match p {
        PeerGen::Any | PeerGen::Entity(Entity::All) => true,
        PeerGen::Pods(pods) => pods.iter().any(|i| pod_ids[*i] == id),
        PeerGen::Entity(Entity::World) => id == WORLD,
        PeerGen::Entity(Entity::Cluster) => pod_ids.contains(&id) || CLUSTER_RESERVED.contains(&id),
        PeerGen::Entity(Entity::Host) => id == HOST,
        PeerGen::Entity(Entity::RemoteNode) => id == REMOTE_NODE,
        PeerGen::Entity(_) => unreachable!("not generated"),
    }
}

fn l4_matches(l4: &L4Gen, proto: u8, port: u16) -> bool {
    match l4 {
        L4Gen::Any => true,
        L4Gen::Ports(ps) => ps.iter().any(|(p, start, end)| {
            let proto_ok = match p {
                Protocol::TCP => proto == IPPROTO_TCP,
                Protocol::UDP => proto == IPPROTO_UDP,
                Protocol::ANY => [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP].contains(&proto),
                _ => unreachable!("not generated"),
            };
            proto_ok && (*start == 0 || (*start..=(*end).max(*start)).contains(&port))
        }),
        L4Gen::Icmp(t) => proto == IPPROTO_ICMP && (port >> 8) as u8 == *t,
    }
}

/// What happens to a packet: dropped by the enforced verdict, and by the audit verdict
/// (what all policies, audit ones included, would decide if enforced).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Outcome {
    drop: bool,
    audit_drop: bool,
}

/// Whether `set` drops the packet (`None`: the set is empty and isolates nothing).
fn set_drops(set: &[&PolicyGen], host: bool, pod_ids: &[u32], q: Query) -> bool {
    if set.is_empty() {
        return false;
    }
    let hit =
        |r: &RuleGen| peer_matches(&r.peer, q.id, pod_ids) && l4_matches(&r.l4, q.proto, q.port);
    let denied = set.iter().any(|p| p.denies.iter().any(hit));
    let allowed = set.iter().any(|p| p.allows.iter().any(hit)) || (host && q.id == HOST);
    denied || !allowed
}

fn reference(policies: &[PolicyGen], host: bool, pod_ids: &[u32], q: Query) -> Outcome {
    let enforcing: Vec<&PolicyGen> = policies.iter().filter(|p| !p.audit).collect();
    let all: Vec<&PolicyGen> = policies.iter().collect();
    Outcome {
        drop: set_drops(&enforcing, host, pod_ids, q),
        audit_drop: set_drops(&all, host, pod_ids, q),
    }
}

fn simulate(w: &World, q: Query) -> Outcome {
    let d = w
        .state
        .decide(EP, Direction::Ingress, q.id, q.proto, q.port);
    Outcome {
        drop: d.drops(),
        audit_drop: d.audit_drops(),
    }
}

fn verdicts(w: &World, q: Query) -> (Verdict, Verdict) {
    let d = w
        .state
        .decide(EP, Direction::Ingress, q.id, q.proto, q.port);
    (
        d.enforced_verdict(),
        d.audit_verdict().unwrap_or_else(|| d.enforced_verdict()),
    )
}

#[derive(Clone, Copy, Debug)]
struct Query {
    id: u32,
    proto: u8,
    port: u16,
}

/// Every identity, protocol and port that the generators can tell apart.
fn queries(pod_ids: &[u32]) -> Vec<Query> {
    let mut ids: Vec<u32> = pod_ids.to_vec();
    ids.extend([HOST, WORLD, REMOTE_NODE, UNKNOWN]);
    let mut out = Vec::new();
    for &id in &ids {
        for proto in [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP] {
            for port in 0..56 {
                out.push(Query { id, proto, port });
            }
        }
        for t in 0..5u16 {
            for code in [0u16, 7] {
                out.push(Query {
                    id,
                    proto: IPPROTO_ICMP,
                    port: (t << 8) | code,
                });
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The key property: the datapath's lookup over the resolved entries means exactly what
    /// the rules say (deny beats allow, default deny, audit reports), for every query.
    #[test]
    fn datapath_lookup_equals_reference(
        policies in prop::collection::vec(policy_gen(prop::bool::weighted(0.2)), 1..4),
        host in any::<bool>(),
    ) {
        let w = build(&policies, host);
        let me = Peer::Local { endpoint_id: EP, identity: w.pod_ids[0] };
        for q in queries(&w.pod_ids) {
            let got = simulate(&w, q);
            prop_assert_eq!(got, reference(&policies, host, &w.pod_ids, q), "query {:?}", q);
            // `explain` reads the same lookup: it cannot disagree.
            let e = explain(&w.state, Peer::Remote { identity: q.id }, me, q.proto, q.port);
            prop_assert_eq!(e.allowed(), !got.drop, "explain, query {:?}", q);
            let audit_drop = e.hops[0].audit.as_ref().map_or(got.drop, |a| a.verdict.drops());
            prop_assert_eq!(audit_drop, got.audit_drop, "explain audit, query {:?}", q);
        }
    }

    /// Audit-only policies never drop anything and produce no dropping entry.
    #[test]
    fn audit_never_drops(
        policies in prop::collection::vec(policy_gen(Just(true)), 1..4),
        host in any::<bool>(),
    ) {
        let w = build(&policies, host);
        prop_assert!(w.state.entries.values().all(|e| !e.verdict.drops()));
        for q in queries(&w.pod_ids) {
            prop_assert!(!simulate(&w, q).drop, "query {:?}", q);
        }
    }

    /// Audit policies never change an enforced verdict (not even its kind), and the audit
    /// verdict is exactly what the policies would decide with the audit ones enforced.
    #[test]
    fn audit_policies_never_change_enforcement(
        enforcing in prop::collection::vec(policy_gen(Just(false)), 0..3),
        audit in prop::collection::vec(policy_gen(Just(true)), 1..3),
        host in any::<bool>(),
    ) {
        let alone = build(&enforcing, host);
        let all: Vec<PolicyGen> = enforcing.iter().chain(&audit).cloned().collect();
        let with_audit = build(&all, host);
        let enforced_too: Vec<PolicyGen> = all
            .iter()
            .cloned()
            .map(|p| PolicyGen { audit: false, ..p })
            .collect();
        let everything_enforced = build(&enforced_too, host);
        for q in queries(&alone.pod_ids) {
            let (v, a) = verdicts(&with_audit, q);
            prop_assert_eq!(v, verdicts(&alone, q).0, "enforced verdict, query {:?}", q);
            prop_assert_eq!(a, verdicts(&everything_enforced, q).0, "audit verdict, query {:?}", q);
        }
    }

    /// Adding an allow rule to a policy never makes a passing packet drop.
    #[test]
    fn adding_an_allow_never_removes_one(
        policies in prop::collection::vec(policy_gen(any::<bool>()), 1..4),
        extra in rule_gen(),
        target in any::<prop::sample::Index>(),
    ) {
        let before = build(&policies, false);
        let mut more = policies.clone();
        let i = target.index(more.len());
        more[i].allows.push(extra);
        let after = build(&more, false);
        for q in queries(&before.pod_ids) {
            if !simulate(&before, q).drop {
                prop_assert!(!simulate(&after, q).drop, "query {:?}", q);
            }
        }
    }
}
