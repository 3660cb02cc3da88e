//! `NetworkPolicy` translation against an independent reference evaluator.
//!
//! The reference is written from the Kubernetes API documentation alone (the `NetworkPolicy`
//! types' field docs and the concepts page), on concrete pods, namespaces and addresses; it
//! shares no code with `netpol`, `selector` or `resolve`. It encodes weft's documented
//! decisions where the API leaves the choice to the implementation: an `ipBlock` matches
//! only addresses outside the cluster's pods, ICMP passes only rules without ports, and the
//! local node always reaches its pods. Random policies (written to YAML and parsed back, so
//! the wire mirror is exercised too), pods with labels and named ports in labelled
//! namespaces, and every connection of the generated cluster in both directions: the
//! datapath lookup over the resolved entries must agree with the reference on each.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use proptest::prelude::*;

use super::*;
use crate::identity::{HOST, WORLD};
use crate::model::{LabelSelectorRequirement, SelectorOperator};
use crate::ports::{IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_UDP, named_ports, named_ports_by_identity};

const NAMESPACES: [&str; 3] = ["a", "b", "c"];
const N_PODS: usize = 5;
const ADDRESSES: [Ipv4Addr; 4] = [
    Ipv4Addr::new(10, 1, 2, 3),
    Ipv4Addr::new(10, 200, 0, 1),
    Ipv4Addr::new(192, 168, 1, 1),
    Ipv4Addr::new(8, 8, 8, 8),
];
/// `(cidr, except)` pairs, each valid (excepts strictly inside).
const BLOCKS: [(&str, &[&str]); 5] = [
    ("10.0.0.0/8", &[]),
    ("10.0.0.0/8", &["10.1.0.0/16"]),
    ("10.1.0.0/16", &["10.1.2.0/24"]),
    ("0.0.0.0/0", &["10.0.0.0/8"]),
    ("192.168.0.0/16", &[]),
];
const PORTS: [u16; 5] = [53, 80, 85, 8080, 9999];

// === the generated cluster ===

#[derive(Clone, Debug)]
struct PodGen {
    ns: usize,
    labels: BTreeMap<String, String>,
    /// (name, port, protocol)
    ports: Vec<(String, u16, NetworkPolicyProtocol)>,
}

#[derive(Clone, Debug)]
struct ClusterGen {
    namespaces: Vec<BTreeMap<String, String>>,
    pods: Vec<PodGen>,
    policies: Vec<(usize, NetworkPolicySpec)>,
}

fn value(key: &str) -> BoxedStrategy<String> {
    let values: Vec<&str> = match key {
        "app" => vec!["web", "api", "db"],
        "tier" => vec!["fe", "be"],
        "team" => vec!["x", "y"],
        "env" => vec!["prod"],
        _ => vec!["a", "b", "c"],
    };
    prop::sample::select(values)
        .prop_map(str::to_string)
        .boxed()
}

fn selector(keys: &'static [&'static str]) -> impl Strategy<Value = LabelSelector> {
    let labels = prop::option::of(
        prop::sample::select(keys)
            .prop_flat_map(|k| value(k).prop_map(move |v| (k.to_string(), v))),
    )
    .prop_map(|l| l.into_iter().collect::<BTreeMap<_, _>>());
    let expr = (
        prop::sample::select(keys),
        prop::sample::select(vec![
            SelectorOperator::In,
            SelectorOperator::NotIn,
            SelectorOperator::Exists,
            SelectorOperator::DoesNotExist,
        ]),
    )
        .prop_flat_map(|(k, op)| {
            let vals = match op {
                SelectorOperator::In | SelectorOperator::NotIn => {
                    prop::collection::vec(value(k), 1..=2).boxed()
                }
                _ => Just(Vec::new()).boxed(),
            };
            vals.prop_map(move |values| LabelSelectorRequirement {
                key: k.to_string(),
                operator: op,
                values,
            })
        });
    (labels, prop::collection::vec(expr, 0..=1)).prop_map(|(match_labels, match_expressions)| {
        LabelSelector {
            match_labels,
            match_expressions,
        }
    })
}

const POD_KEYS: &[&str] = &["app", "tier"];
const NS_KEYS: &[&str] = &["team", "env", "kubernetes.io/metadata.name"];

fn peer() -> impl Strategy<Value = NetworkPolicyPeer> {
    prop_oneof![
        2 => selector(POD_KEYS).prop_map(|s| NetworkPolicyPeer {
            pod_selector: Some(s),
            ..Default::default()
        }),
        2 => selector(NS_KEYS).prop_map(|s| NetworkPolicyPeer {
            namespace_selector: Some(s),
            ..Default::default()
        }),
        2 => (selector(POD_KEYS), selector(NS_KEYS)).prop_map(|(p, n)| NetworkPolicyPeer {
            pod_selector: Some(p),
            namespace_selector: Some(n),
            ip_block: None,
        }),
        2 => prop::sample::select(BLOCKS.to_vec()).prop_map(|(cidr, except)| NetworkPolicyPeer {
            ip_block: Some(IpBlock {
                cidr: cidr.to_string(),
                except: except.iter().map(|e| (*e).to_string()).collect(),
            }),
            ..Default::default()
        }),
    ]
}

fn port() -> impl Strategy<Value = NetworkPolicyPort> {
    let protocol = prop::sample::select(vec![
        None,
        Some(NetworkPolicyProtocol::TCP),
        Some(NetworkPolicyProtocol::UDP),
        Some(NetworkPolicyProtocol::SCTP),
    ]);
    let port = prop_oneof![
        Just((None, None)),
        prop::sample::select(vec![53i64, 80, 8080]).prop_map(|p| (Some(IntOrString::Int(p)), None)),
        Just((Some(IntOrString::Int(80)), Some(90))),
        prop::sample::select(vec!["http", "dns", "grpc"])
            .prop_map(|n| (Some(IntOrString::String(n.to_string())), None)),
    ];
    (protocol, port).prop_map(|(protocol, (port, end_port))| NetworkPolicyPort {
        protocol,
        port,
        end_port,
    })
}

type RuleParts = (Vec<NetworkPolicyPeer>, Vec<NetworkPolicyPort>);

fn rule() -> impl Strategy<Value = RuleParts> {
    (
        prop::collection::vec(peer(), 0..=2),
        prop::collection::vec(port(), 0..=2),
    )
}

fn spec() -> impl Strategy<Value = NetworkPolicySpec> {
    (
        selector(POD_KEYS),
        prop::collection::vec(rule(), 0..=2),
        prop::collection::vec(rule(), 0..=2),
        prop::sample::select(vec![
            vec![],
            vec![PolicyType::Ingress],
            vec![PolicyType::Egress],
            vec![PolicyType::Ingress, PolicyType::Egress],
        ]),
    )
        .prop_map(
            |(pod_selector, ingress, egress, policy_types)| NetworkPolicySpec {
                pod_selector,
                ingress: ingress
                    .into_iter()
                    .map(|(from, ports)| NetworkPolicyIngressRule { from, ports })
                    .collect(),
                egress: egress
                    .into_iter()
                    .map(|(to, ports)| NetworkPolicyEgressRule { to, ports })
                    .collect(),
                policy_types,
            },
        )
}

fn pod() -> impl Strategy<Value = PodGen> {
    let named = prop::collection::vec(
        prop_oneof![
            prop::sample::select(vec![80u16, 8080]).prop_map(|p| (
                "http".to_string(),
                p,
                NetworkPolicyProtocol::TCP
            )),
            prop::sample::select(vec![NetworkPolicyProtocol::UDP, NetworkPolicyProtocol::TCP])
                .prop_map(|proto| ("dns".to_string(), 53, proto)),
        ],
        0..=2,
    )
    .prop_map(|mut v| {
        // Names are unique in a pod.
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.dedup_by(|a, b| a.0 == b.0);
        v
    });
    (
        0..NAMESPACES.len(),
        value("app"),
        prop::option::of(value("tier")),
        named,
    )
        .prop_map(|(ns, app, tier, ports)| {
            let mut labels = BTreeMap::from([("app".to_string(), app)]);
            if let Some(t) = tier {
                labels.insert("tier".into(), t);
            }
            PodGen { ns, labels, ports }
        })
}

fn cluster() -> impl Strategy<Value = ClusterGen> {
    let ns = (value("team"), prop::option::of(value("env")));
    (
        prop::collection::vec(ns, NAMESPACES.len()),
        prop::collection::vec(pod(), N_PODS),
        prop::collection::vec((0..NAMESPACES.len(), spec()), 1..=3),
    )
        .prop_map(|(namespaces, pods, policies)| ClusterGen {
            namespaces: namespaces
                .into_iter()
                .enumerate()
                .map(|(i, (team, env))| {
                    let mut l = BTreeMap::from([
                        ("team".to_string(), team),
                        (
                            K8S_NAMESPACE_NAME_LABEL.to_string(),
                            NAMESPACES[i].to_string(),
                        ),
                    ]);
                    if let Some(e) = env {
                        l.insert("env".into(), e);
                    }
                    l
                })
                .collect(),
            pods,
            policies,
        })
}

// === the reference: the Kubernetes API documentation, evaluated directly ===

#[derive(Clone, Copy, Debug)]
enum Source {
    Pod(usize),
    Address(Ipv4Addr),
    /// The local node.
    Host,
}

/// Label selector semantics (`metav1.LabelSelector`): every matchLabels pair and every
/// expression must hold; `NotIn` and `DoesNotExist` hold when the key is absent.
fn selector_matches(s: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    s.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
        && s.match_expressions.iter().all(|e| {
            let got = labels.get(&e.key);
            match e.operator {
                SelectorOperator::In => got.is_some_and(|v| e.values.contains(v)),
                SelectorOperator::NotIn => got.is_none_or(|v| !e.values.contains(v)),
                SelectorOperator::Exists => got.is_some(),
                SelectorOperator::DoesNotExist => got.is_none(),
            }
        })
}

fn in_cidr(ip: Ipv4Addr, cidr: &str) -> bool {
    let (net, len) = cidr.split_once('/').expect("cidr");
    let net: Ipv4Addr = net.parse().expect("address");
    let len: u32 = len.parse().expect("length");
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(ip) & mask == u32::from(net) & mask
}

/// "policyTypes ... If this field is not specified, it will default based on the existence of
/// ingress or egress rules" (as the API server's defaulting reads it: egress rules present).
fn affects(spec: &NetworkPolicySpec, ty: PolicyType) -> bool {
    if spec.policy_types.is_empty() {
        ty == PolicyType::Ingress || !spec.egress.is_empty()
    } else {
        spec.policy_types.contains(&ty)
    }
}

/// Does a peer list (`from`/`to`) of a policy in namespace `policy_ns` match `peer`?
fn peers_match(
    c: &ClusterGen,
    policy_ns: usize,
    peers: &[NetworkPolicyPeer],
    peer: Source,
) -> bool {
    // "If this field is empty or missing, this rule matches all sources/destinations."
    if peers.is_empty() {
        return true;
    }
    peers.iter().any(|p| match (peer, &p.ip_block) {
        // weft decision: an ipBlock matches addresses outside the cluster's pods and nodes.
        (Source::Address(ip), Some(b)) => {
            in_cidr(ip, &b.cidr) && !b.except.iter().any(|e| in_cidr(ip, e))
        }
        (Source::Pod(i), None) => {
            let pod = &c.pods[i];
            let pod_ok = p
                .pod_selector
                .as_ref()
                .is_none_or(|s| selector_matches(s, &pod.labels));
            let ns_ok = match &p.namespace_selector {
                Some(s) => selector_matches(s, &c.namespaces[pod.ns]),
                // "Otherwise it selects the pods matching podSelector in the policy's own
                // namespace."
                None => pod.ns == policy_ns,
            };
            pod_ok && ns_ok
        }
        _ => false,
    })
}

/// Does a `ports` list match a packet to `target` (the pod whose named ports count)?
fn ports_match(
    c: &ClusterGen,
    ports: &[NetworkPolicyPort],
    target: Option<usize>,
    proto: u8,
    port: u16,
) -> bool {
    // "If this field is empty or missing, this rule matches all ports" (ICMP included: weft).
    if ports.is_empty() {
        return true;
    }
    ports.iter().any(|p| {
        let protocol = p.protocol.unwrap_or(NetworkPolicyProtocol::TCP);
        let number = match protocol {
            NetworkPolicyProtocol::TCP => IPPROTO_TCP,
            NetworkPolicyProtocol::UDP => IPPROTO_UDP,
            NetworkPolicyProtocol::SCTP => IPPROTO_SCTP,
        };
        number == proto
            && match &p.port {
                None => true,
                Some(IntOrString::Int(n)) => {
                    let end = p.end_port.unwrap_or(*n);
                    (*n..=end).contains(&i64::from(port))
                }
                Some(IntOrString::String(name)) => target.is_some_and(|t| {
                    c.pods[t]
                        .ports
                        .iter()
                        .any(|(n, num, pr)| n == name && *num == port && *pr == protocol)
                }),
            }
    })
}

/// Is traffic from `src` to pod `dst` allowed into `dst`?
fn reference_ingress(c: &ClusterGen, src: Source, dst: usize, proto: u8, port: u16) -> bool {
    let pod = &c.pods[dst];
    let selecting: Vec<&(usize, NetworkPolicySpec)> = c
        .policies
        .iter()
        .filter(|(ns, spec)| {
            *ns == pod.ns
                && selector_matches(&spec.pod_selector, &pod.labels)
                && affects(spec, PolicyType::Ingress)
        })
        .collect();
    // "Traffic is allowed to a pod if there are no NetworkPolicies selecting the pod ..., OR
    // if the traffic source is the pod's local node, OR if the traffic matches at least one
    // ingress rule across all of the NetworkPolicy objects whose podSelector matches the pod."
    selecting.is_empty()
        || matches!(src, Source::Host)
        || selecting.iter().any(|(ns, spec)| {
            spec.ingress.iter().any(|r| {
                peers_match(c, *ns, &r.from, src)
                    && ports_match(c, &r.ports, Some(dst), proto, port)
            })
        })
}

/// Is traffic from pod `src` to `dst` allowed out of `src`?
fn reference_egress(c: &ClusterGen, src: usize, dst: Source, proto: u8, port: u16) -> bool {
    let pod = &c.pods[src];
    let selecting: Vec<&(usize, NetworkPolicySpec)> = c
        .policies
        .iter()
        .filter(|(ns, spec)| {
            *ns == pod.ns
                && selector_matches(&spec.pod_selector, &pod.labels)
                && affects(spec, PolicyType::Egress)
        })
        .collect();
    let target = match dst {
        Source::Pod(i) => Some(i),
        _ => None,
    };
    selecting.is_empty()
        || selecting.iter().any(|(ns, spec)| {
            spec.egress.iter().any(|r| {
                peers_match(c, *ns, &r.to, dst) && ports_match(c, &r.ports, target, proto, port)
            })
        })
}

// === the system under test ===

struct Built {
    state: DesiredState,
    pod_ids: Vec<u32>,
    cidrs: BTreeMap<IpNet, u32>,
}

fn build(c: &ClusterGen) -> Built {
    let mut yaml = String::new();
    for (i, (ns, spec)) in c.policies.iter().enumerate() {
        let np = NetworkPolicy {
            api_version: API_VERSION.into(),
            kind: "NetworkPolicy".into(),
            metadata: ObjectMeta {
                name: Some(format!("p{i}")),
                namespace: Some(NAMESPACES[*ns].into()),
                ..Default::default()
            },
            spec: spec.clone(),
            status: None,
        };
        yaml.push_str("---\n");
        yaml.push_str(&serde_yaml::to_string(&np).expect("serialize"));
    }
    let mut repo = Repository::new();
    for obj in parse_documents("gen.yaml", &yaml).expect("generated policies are valid") {
        if let Object::Policy(p) = obj {
            repo.upsert(*p);
        }
    }
    let mut ids = IdentityAllocator::new();
    let mut endpoints = Vec::new();
    let mut pod_ids = Vec::new();
    let mut all_ports = Vec::new();
    for (i, pod) in c.pods.iter().enumerate() {
        let mut own = pod.labels.clone();
        own.insert("id".into(), format!("p{i}"));
        let labels = security_labels(&own, NAMESPACES[pod.ns], "default", &c.namespaces[pod.ns]);
        let identity = ids.allocate(&labels).expect("allocate");
        let ports: Vec<ContainerPort> = pod
            .ports
            .iter()
            .map(|(name, port, proto)| ContainerPort {
                name: Some(name.clone()),
                container_port: i64::from(*port),
                protocol: match proto {
                    NetworkPolicyProtocol::TCP => ContainerProtocol::TCP,
                    NetworkPolicyProtocol::UDP => ContainerProtocol::UDP,
                    NetworkPolicyProtocol::SCTP => ContainerProtocol::SCTP,
                },
            })
            .collect();
        endpoints.push(LocalEndpoint {
            endpoint_id: u32::try_from(i + 1).expect("small"),
            namespace: NAMESPACES[pod.ns].into(),
            name: format!("p{i}"),
            identity,
            labels,
            ports: named_ports(&ports),
        });
        pod_ids.push(identity);
        all_ports.push((identity, ports));
    }
    let named = named_ports_by_identity(all_ports.iter().map(|(i, p)| (*i, p.as_slice())));
    let mut cidr_ids = CidrIdentityAllocator::new();
    cidr_ids
        .sync(&repo.cidr_prefixes())
        .expect("cidr identities");
    let state = resolve(&ResolveInput {
        repository: &repo,
        endpoints: &endpoints,
        identities: ids.pod_identities(),
        cidr_identities: cidr_ids.prefixes(),
        named_ports: &named,
        options: ResolveOptions::default(),
    });
    Built {
        state,
        pod_ids,
        cidrs: cidr_ids.prefixes().clone(),
    }
}

impl Built {
    /// The identity the datapath sees: a pod's, the host's, or what the ipcache gives an
    /// address (the longest policy-named prefix holding it, else `world`).
    fn identity(&self, s: Source) -> u32 {
        match s {
            Source::Pod(i) => self.pod_ids[i],
            Source::Host => HOST,
            Source::Address(ip) => self
                .cidrs
                .iter()
                .filter(|(p, _)| p.contains(&std::net::IpAddr::V4(ip)))
                .max_by_key(|(p, _)| p.prefix_len())
                .map_or(WORLD, |(_, id)| *id),
        }
    }
}

fn endpoint(i: usize) -> u32 {
    u32::try_from(i + 1).expect("small")
}

fn packets() -> Vec<(u8, u16)> {
    let mut out = vec![(IPPROTO_ICMP, 8 << 8)];
    for proto in [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP] {
        out.extend(PORTS.iter().map(|p| (proto, *p)));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Every connection of the generated cluster, both directions: the datapath lookup over
    /// the translated entries says what the Kubernetes API says.
    #[test]
    fn translated_entries_agree_with_the_api_reference(c in cluster()) {
        let b = build(&c);
        let sources: Vec<Source> = (0..N_PODS)
            .map(Source::Pod)
            .chain(ADDRESSES.iter().copied().map(Source::Address))
            .chain([Source::Host])
            .collect();
        for (proto, port) in packets() {
            for dst in 0..N_PODS {
                for &src in &sources {
                    let got = !b
                        .state
                        .decide(endpoint(dst), Direction::Ingress, b.identity(src), proto, port)
                        .drops();
                    prop_assert_eq!(
                        got,
                        reference_ingress(&c, src, dst, proto, port),
                        "ingress {:?} -> pod {} {}/{}", src, dst, proto, port
                    );
                }
            }
            for src in 0..N_PODS {
                for dst in sources.iter().copied().filter(|s| !matches!(s, Source::Host)) {
                    let got = !b
                        .state
                        .decide(endpoint(src), Direction::Egress, b.identity(dst), proto, port)
                        .drops();
                    prop_assert_eq!(
                        got,
                        reference_egress(&c, src, dst, proto, port),
                        "egress pod {} -> {:?} {}/{}", src, dst, proto, port
                    );
                }
            }
        }
    }
}
