//! Properties of resolution, checked by simulating the datapath over the resolved state:
//! the LPM lookup on the exact identity, then on identity 0, then the direction's default.
//!
//! The reference is the policy language's meaning, evaluated directly on the rules: in an
//! enforced direction a packet is dropped if any deny rule of an enforcing policy matches it,
//! else passed if any allow rule of an enforcing policy matches, else dropped; in an audit
//! direction nothing is dropped and the same test says what is reported as would-be denied.

use proptest::prelude::*;

use super::*;
use crate::identity::{HOST, REMOTE_NODE, WORLD};
use crate::model::{
    Entity, IcmpField, IcmpRule, IngressDenyRule, IngressRule, LabelSelector,
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
                    type_: i64::from(*t),
                    family: Default::default(),
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
    }];
    let state = resolve(&ResolveInput {
        repository: &repo,
        endpoints: &endpoints,
        identities: ids.pod_identities(),
        cidr_identities: &BTreeMap::new(),
        options: ResolveOptions {
            allow_host_ingress: host,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Pass,
    /// Passed, but reported as would-be denied (audit).
    Flagged,
    Drop,
}

fn reference(policies: &[PolicyGen], host: bool, pod_ids: &[u32], q: Query) -> Outcome {
    let enforced = policies.iter().any(|p| !p.audit);
    let active: Vec<&PolicyGen> = policies.iter().filter(|p| !enforced || !p.audit).collect();
    if active.is_empty() {
        return Outcome::Pass;
    }
    let hit =
        |r: &RuleGen| peer_matches(&r.peer, q.id, pod_ids) && l4_matches(&r.l4, q.proto, q.port);
    let denied = active.iter().any(|p| p.denies.iter().any(hit));
    let allowed = active.iter().any(|p| p.allows.iter().any(hit)) || (host && q.id == HOST);
    match (denied || !allowed, enforced) {
        (false, _) => Outcome::Pass,
        (true, true) => Outcome::Drop,
        (true, false) => Outcome::Flagged,
    }
}

fn simulate(w: &World, q: Query) -> Outcome {
    match w
        .state
        .decide(EP, Direction::Ingress, q.id, q.proto, q.port)
    {
        Decision::Open => Outcome::Pass,
        Decision::Entry(_, e) => match e.verdict {
            Verdict::Deny => Outcome::Drop,
            Verdict::AuditDeny => Outcome::Flagged,
            _ => Outcome::Pass,
        },
        Decision::Default(Isolation::Enforced) => Outcome::Drop,
        Decision::Default(_) => Outcome::Flagged,
    }
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
        for q in queries(&w.pod_ids) {
            prop_assert_eq!(
                simulate(&w, q),
                reference(&policies, host, &w.pod_ids, q),
                "query {:?}", q
            );
        }
    }

    /// Audit-only policies never drop anything and produce no Deny entry.
    #[test]
    fn audit_never_drops(
        policies in prop::collection::vec(policy_gen(Just(true)), 1..4),
        host in any::<bool>(),
    ) {
        let w = build(&policies, host);
        prop_assert!(w.state.entries.values().all(|e| e.verdict != Verdict::Deny));
        for q in queries(&w.pod_ids) {
            prop_assert_ne!(simulate(&w, q), Outcome::Drop, "query {:?}", q);
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
            if simulate(&before, q) != Outcome::Drop {
                prop_assert_ne!(simulate(&after, q), Outcome::Drop, "query {:?}", q);
            }
        }
    }
}
