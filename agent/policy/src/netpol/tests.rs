//! `NetworkPolicy` scenarios, checked through the simulated datapath lookup. Each test names
//! the upstream text its expectation comes from: the `NetworkPolicy` API reference
//! (`k8s.io/api/networking/v1/types.go`, quoted in `k8s-openapi`'s docs), the concepts page
//! (kubernetes.io/docs/concepts/services-networking/network-policies), the API server's
//! defaulting (`pkg/apis/networking/v1/defaults.go`) and validation
//! (`pkg/apis/networking/validation/validation.go`), and the e2e suite
//! (`test/e2e/network/netpol/network_policy.go`).

mod props;

use std::collections::BTreeMap;

use ipnet::IpNet;

use super::*;
use crate::identity::{CidrIdentityAllocator, HOST, IdentityAllocator, REMOTE_NODE, WORLD};
use crate::labels::{K8S_NAMESPACE_NAME_LABEL, Labels, security_labels};
use crate::mapstate::{DesiredState, Direction, Isolation};
use crate::model::{ContainerPort, ContainerProtocol};
use crate::parse::{Object, parse_documents};
use crate::ports::{IPPROTO_ICMP, IPPROTO_UDP, named_ports, named_ports_by_identity};
use crate::repository::Repository;
use crate::resolve::{LocalEndpoint, ResolveInput, ResolveOptions, resolve};
use crate::status::policy_status;

struct Pod {
    ns: &'static str,
    name: &'static str,
    app: &'static str,
    ports: &'static [(&'static str, u16, ContainerProtocol)],
    endpoint: Option<u32>,
}

const TCP_: ContainerProtocol = ContainerProtocol::TCP;

/// The test cluster: three namespaces, pods with named ports, most of them on this node.
const PODS: &[Pod] = &[
    Pod {
        ns: "shop",
        name: "api",
        app: "api",
        ports: &[("http", 8080, TCP_), ("metrics", 9090, TCP_)],
        endpoint: Some(1),
    },
    Pod {
        ns: "shop",
        name: "web",
        app: "web",
        ports: &[("http", 80, TCP_), ("dns", 53, ContainerProtocol::UDP)],
        endpoint: Some(2),
    },
    Pod {
        ns: "shop",
        name: "db",
        app: "db",
        ports: &[("pg", 5432, TCP_)],
        endpoint: Some(3),
    },
    Pod {
        ns: "other",
        name: "web",
        app: "web",
        ports: &[("http", 8081, TCP_)],
        endpoint: Some(4),
    },
    Pod {
        ns: "other",
        name: "tool",
        app: "tool",
        ports: &[],
        endpoint: None,
    },
    Pod {
        ns: "prod",
        name: "api",
        app: "api",
        ports: &[("http", 8080, TCP_)],
        endpoint: None,
    },
];

const API: u32 = 1;
const WEB: u32 = 2;
const DB: u32 = 3;
const OTHER_WEB: u32 = 4;

fn namespace_labels(ns: &str) -> Labels {
    let mut l = Labels::from([(K8S_NAMESPACE_NAME_LABEL.to_string(), ns.to_string())]);
    let team = if ns == "other" { "b" } else { "a" };
    l.insert("team".into(), team.into());
    if ns == "prod" {
        l.insert("env".into(), "prod".into());
    }
    l
}

struct Cluster {
    state: DesiredState,
    pods: BTreeMap<String, u32>,
    cidrs: BTreeMap<IpNet, u32>,
    repo: Repository,
    endpoints: Vec<LocalEndpoint>,
    identities: IdentityAllocator,
    named: BTreeMap<u32, crate::ports::NamedPorts>,
    options: ResolveOptions,
}

impl Cluster {
    fn new(yaml: &str) -> Cluster {
        Self::with_options(yaml, ResolveOptions::default())
    }

    fn with_options(yaml: &str, options: ResolveOptions) -> Cluster {
        let mut repo = Repository::new();
        for obj in parse_documents("test.yaml", yaml).expect("test policies are valid") {
            if let Object::Policy(p) = obj {
                repo.upsert(*p);
            }
        }
        let mut ids = IdentityAllocator::new();
        let mut pods = BTreeMap::new();
        let mut endpoints = Vec::new();
        let mut all_ports = Vec::new();
        for pod in PODS {
            let own = Labels::from([("app".to_string(), pod.app.to_string())]);
            let labels = security_labels(&own, pod.ns, "default", &namespace_labels(pod.ns));
            let identity = ids.allocate(&labels).expect("allocate");
            pods.insert(format!("{}/{}", pod.ns, pod.name), identity);
            let ports: Vec<ContainerPort> = pod
                .ports
                .iter()
                .map(|(name, port, protocol)| ContainerPort {
                    name: Some((*name).to_string()),
                    container_port: i64::from(*port),
                    protocol: *protocol,
                })
                .collect();
            if let Some(endpoint_id) = pod.endpoint {
                endpoints.push(LocalEndpoint {
                    endpoint_id,
                    namespace: pod.ns.to_string(),
                    name: pod.name.to_string(),
                    identity,
                    labels,
                    ports: named_ports(&ports),
                });
            }
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
            options,
        });
        Cluster {
            state,
            pods,
            cidrs: cidr_ids.prefixes().clone(),
            repo,
            endpoints,
            identities: ids,
            named,
            options,
        }
    }

    fn pod(&self, name: &str) -> u32 {
        self.pods[name]
    }

    fn cidr(&self, prefix: &str) -> u32 {
        self.cidrs[&prefix.parse::<IpNet>().expect("prefix")]
    }

    fn ingress_ok(&self, ep: u32, peer: u32, proto: u8, port: u16) -> bool {
        !self
            .state
            .decide(ep, Direction::Ingress, peer, proto, port)
            .drops()
    }

    fn egress_ok(&self, ep: u32, peer: u32, proto: u8, port: u16) -> bool {
        !self
            .state
            .decide(ep, Direction::Egress, peer, proto, port)
            .drops()
    }

    fn status(&self) -> BTreeMap<PolicyId, crate::status::PolicyStatusReport> {
        policy_status(&ResolveInput {
            repository: &self.repo,
            endpoints: &self.endpoints,
            identities: self.identities.pod_identities(),
            cidr_identities: &self.cidrs,
            named_ports: &self.named,
            options: self.options,
        })
    }
}

fn np(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{name: {name}, namespace: shop}}\nspec:\n{spec}"
    )
}

const TCP: u8 = IPPROTO_TCP;

/// API reference, `ingress`: "If this field is empty then this `NetworkPolicy` does not allow
/// any traffic"; concepts page, "Default deny all ingress traffic"; e2e "should support a
/// 'default-deny-ingress' policy".
#[test]
fn default_deny_ingress_isolates_every_pod_of_the_namespace_only() {
    let c = Cluster::new(&np("deny", "  podSelector: {}\n  policyTypes: [Ingress]\n"));
    for ep in [API, WEB, DB] {
        assert_eq!(c.state.endpoints[&ep].ingress, Isolation::Enforced);
        assert_eq!(c.state.endpoints[&ep].egress, Isolation::Open);
        assert!(!c.ingress_ok(ep, c.pod("shop/web"), TCP, 80));
        assert!(!c.ingress_ok(ep, WORLD, TCP, 80));
    }
    assert_eq!(c.state.endpoints[&OTHER_WEB].ingress, Isolation::Open);
    assert!(c.egress_ok(API, WORLD, TCP, 443), "egress stays open");
}

/// Concepts page, "Allow all ingress traffic": `ingress: [{}]`; API reference, `from`: "If
/// this field is empty or missing, this rule matches all sources".
#[test]
fn an_empty_rule_allows_everything_inside_the_cluster_or_not() {
    let c = Cluster::new(&np("all", "  podSelector: {}\n  ingress: [{}]\n"));
    assert_eq!(c.state.endpoints[&API].ingress, Isolation::Enforced);
    for peer in [c.pod("other/tool"), WORLD, REMOTE_NODE, 99_999] {
        assert!(c.ingress_ok(API, peer, TCP, 1234), "peer {peer}");
        assert!(c.ingress_ok(API, peer, IPPROTO_ICMP, 8 << 8), "peer {peer}");
    }
    let c = Cluster::new(&np("all", "  ingress: [{from: [], ports: []}]\n"));
    assert!(
        c.ingress_ok(API, WORLD, IPPROTO_UDP, 53),
        "from: [] is all sources"
    );
}

/// Defaulting (`SetDefaults_NetworkPolicy`): no policyTypes means `[Ingress]`, plus `Egress`
/// when `len(spec.Egress) != 0`; so an absent or empty ingress isolates ingress, and an
/// `egress: []` without policyTypes leaves egress alone.
#[test]
fn policy_types_default_as_the_api_server_does() {
    for spec in [
        "  podSelector: {}\n",
        "  podSelector: {}\n  ingress: []\n",
        "  podSelector: {}\n  egress: []\n",
    ] {
        let c = Cluster::new(&np("p", spec));
        assert_eq!(
            c.state.endpoints[&API].ingress,
            Isolation::Enforced,
            "{spec}"
        );
        assert_eq!(c.state.endpoints[&API].egress, Isolation::Open, "{spec}");
    }
    let c = Cluster::new(&np(
        "p",
        "  podSelector: {}\n  egress: [{to: [{podSelector: {matchLabels: {app: db}}}]}]\n",
    ));
    assert_eq!(c.state.endpoints[&API].ingress, Isolation::Enforced);
    assert_eq!(c.state.endpoints[&API].egress, Isolation::Enforced);
    assert!(c.egress_ok(API, c.pod("shop/db"), TCP, 5432));
    assert!(!c.egress_ok(API, WORLD, TCP, 443));
    let objs = parse_documents("p.yaml", &np("p", "  egress: [{}]\n")).expect("valid");
    let Object::Policy(p) = &objs[0] else {
        panic!("a policy")
    };
    let WrittenSpec::NetworkPolicy(spec) = &p.spec else {
        panic!("a NetworkPolicy spec")
    };
    assert_eq!(
        spec.policy_types,
        vec![PolicyType::Ingress, PolicyType::Egress]
    );
}

/// API reference, `policyTypes`: "If you want to write an egress-only policy, you must
/// explicitly specify policyTypes `[Egress]`"; e2e "should enforce egress policy allowing
/// traffic to a server in a different namespace based on `PodSelector` and `NamespaceSelector`".
#[test]
fn egress_only_policy_leaves_ingress_open() {
    let c = Cluster::new(&np(
        "egress-only",
        "  podSelector: {matchLabels: {app: api}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: db}}}]\n",
    ));
    assert_eq!(c.state.endpoints[&API].ingress, Isolation::Open);
    assert_eq!(c.state.endpoints[&API].egress, Isolation::Enforced);
    assert!(c.ingress_ok(API, WORLD, TCP, 8080));
    assert!(c.egress_ok(API, c.pod("shop/db"), TCP, 5432));
    assert!(!c.egress_ok(API, c.pod("shop/web"), TCP, 80));
}

/// DESIGN.md decision and the API reference, `policyTypes`: an egress section under
/// `policyTypes: [Ingress]` has no effect; weft accepts it and says so.
#[test]
fn egress_rules_outside_policy_types_have_no_effect_and_are_reported() {
    let c = Cluster::new(&np(
        "p",
        "  podSelector: {}\n  policyTypes: [Ingress]\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8}}]}]\n",
    ));
    assert_eq!(c.state.endpoints[&API].egress, Isolation::Open);
    let status = c.status();
    let s = status.values().next().expect("one policy");
    assert_eq!(
        s.enforced.as_ref().expect("enforced").reason,
        "EnforcedWithWarnings"
    );
    assert!(
        s.warnings[0].to_string().starts_with(
            "spec.egress: has no effect: policyTypes [Ingress] does not include Egress"
        ),
        "{}",
        s.warnings[0]
    );
}

/// API reference, `NetworkPolicyPeer.podSelector`: "Otherwise it selects the pods matching
/// podSelector in the policy's own namespace"; e2e "should enforce policy to allow traffic
/// only from a pod in a different namespace based on `PodSelector` and `NamespaceSelector`".
#[test]
fn pod_selector_peers_are_pods_of_the_policy_namespace() {
    let c = Cluster::new(&np(
        "p",
        "  podSelector: {matchLabels: {app: api}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]\n",
    ));
    assert!(c.ingress_ok(API, c.pod("shop/web"), TCP, 8080));
    assert!(!c.ingress_ok(API, c.pod("other/web"), TCP, 8080));
    assert!(!c.ingress_ok(API, WORLD, TCP, 8080));
    assert_eq!(
        c.state.endpoints[&WEB].ingress,
        Isolation::Open,
        "podSelector picks api only"
    );
}

/// API reference, `namespaceSelector`: "if present but empty, it selects all namespaces";
/// "Otherwise it selects all pods in the namespaces selected by namespaceSelector". DESIGN:
/// pods only, never outside addresses.
#[test]
fn empty_namespace_selector_is_every_pod_and_nothing_else() {
    let c = Cluster::new(&np(
        "p",
        "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}}]}]\n",
    ));
    for pod in ["shop/web", "other/tool", "prod/api"] {
        assert!(c.ingress_ok(API, c.pod(pod), TCP, 1), "{pod}");
    }
    for peer in [WORLD, REMOTE_NODE, 99_999] {
        assert!(!c.ingress_ok(API, peer, TCP, 1), "peer {peer}");
    }
}

/// API reference, `NetworkPolicyPeer`: both selectors in one peer select "the pods matching
/// podSelector in the Namespaces selected by `NamespaceSelector`" (AND); separate peers are
/// alternatives ("Items in this list are combined using a logical OR"). Concepts page, "Behavior of
/// to and from selectors".
#[test]
fn selectors_in_one_peer_and_separate_peers_or() {
    let and = Cluster::new(&np(
        "p",
        "  podSelector: {}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {team: b}}\n      podSelector: {matchLabels: {app: web}}\n",
    ));
    assert!(and.ingress_ok(API, and.pod("other/web"), TCP, 1));
    assert!(!and.ingress_ok(API, and.pod("other/tool"), TCP, 1));
    assert!(!and.ingress_ok(API, and.pod("shop/web"), TCP, 1));
    let or = Cluster::new(&np(
        "p",
        "  podSelector: {}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {team: b}}\n    - podSelector: {matchLabels: {app: web}}\n",
    ));
    assert!(or.ingress_ok(API, or.pod("other/web"), TCP, 1));
    assert!(or.ingress_ok(API, or.pod("other/tool"), TCP, 1));
    assert!(or.ingress_ok(API, or.pod("shop/web"), TCP, 1));
    assert!(!or.ingress_ok(API, or.pod("prod/api"), TCP, 1));
}

/// Concepts page, "Targeting a Namespace by its name": the API server sets the immutable
/// label `kubernetes.io/metadata.name` on every namespace. e2e "should enforce policy based
/// on `NamespaceSelector` with `MatchExpressions`".
#[test]
fn namespace_selectors_by_name_and_by_expression() {
    let by_name = Cluster::new(&np(
        "p",
        "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: prod}}}]}]\n",
    ));
    assert!(by_name.ingress_ok(API, by_name.pod("prod/api"), TCP, 1));
    assert!(!by_name.ingress_ok(API, by_name.pod("other/tool"), TCP, 1));
    let not_in = Cluster::new(&np(
        "p",
        "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: env, operator: DoesNotExist}, {key: team, operator: NotIn, values: [b]}]}}]}]\n",
    ));
    assert!(not_in.ingress_ok(API, not_in.pod("shop/web"), TCP, 1));
    assert!(
        !not_in.ingress_ok(API, not_in.pod("prod/api"), TCP, 1),
        "env exists"
    );
    assert!(
        !not_in.ingress_ok(API, not_in.pod("other/web"), TCP, 1),
        "team b"
    );
}

/// API reference, `IPBlock`: "The except entry describes CIDRs that should not be included";
/// weft decision (DESIGN, as Cilium): CIDR rules match addresses outside the cluster's pods.
/// e2e "should allow egress access to server in CIDR block" / "...with except".
#[test]
fn ip_block_with_except_matches_outside_addresses_only() {
    let c = Cluster::new(&np(
        "p",
        "  podSelector: {matchLabels: {app: api}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.96.0.0/12]}}]\n  - to: [{ipBlock: {cidr: 0.0.0.0/0, except: [192.168.0.0/16]}}]\n    ports: [{port: 53, protocol: UDP}]\n",
    ));
    assert!(c.egress_ok(API, c.cidr("10.0.0.0/8"), TCP, 443));
    assert!(!c.egress_ok(API, c.cidr("10.96.0.0/12"), TCP, 443));
    assert!(
        c.egress_ok(API, WORLD, IPPROTO_UDP, 53),
        "0.0.0.0/0 is world"
    );
    assert!(!c.egress_ok(API, WORLD, TCP, 443));
    assert!(!c.egress_ok(API, c.cidr("192.168.0.0/16"), IPPROTO_UDP, 53));
    assert!(
        !c.egress_ok(API, c.pod("shop/db"), IPPROTO_UDP, 53),
        "an ipBlock never matches a pod, even 0.0.0.0/0"
    );
}

/// API reference, `NetworkPolicyPort.protocol`: "If not specified, this field defaults to
/// TCP"; `port`: "If this field is not provided, this matches all port names and numbers";
/// `endPort`; e2e "should enforce policy based on Ports", "should support allow-all policy
/// ... ports with protocol", "should enforce policy to allow traffic only from ... port range".
#[test]
fn ports_protocols_and_ranges() {
    let c = Cluster::new(&np(
        "p",
        "  podSelector: {matchLabels: {app: api}}\n  ingress:\n  - ports: [{port: 8080}]\n  - ports: [{protocol: UDP}]\n  - ports: [{port: 9000, endPort: 9010, protocol: SCTP}]\n",
    ));
    let web = c.pod("shop/web");
    assert!(c.ingress_ok(API, web, TCP, 8080));
    assert!(
        c.ingress_ok(API, web, IPPROTO_UDP, 8080),
        "UDP is allowed by the second rule"
    );
    assert!(
        !c.ingress_ok(API, web, crate::ports::IPPROTO_SCTP, 8080),
        "port without protocol is TCP only"
    );
    assert!(
        c.ingress_ok(API, web, IPPROTO_UDP, 1),
        "a protocol alone is all its ports"
    );
    assert!(c.ingress_ok(API, web, IPPROTO_UDP, 65535));
    assert!(!c.ingress_ok(API, web, TCP, 8081));
    for port in [9000, 9005, 9010] {
        assert!(
            c.ingress_ok(API, web, crate::ports::IPPROTO_SCTP, port),
            "{port}"
        );
    }
    assert!(!c.ingress_ok(API, web, crate::ports::IPPROTO_SCTP, 9011));
    assert!(!c.ingress_ok(API, web, TCP, 9005), "the range is SCTP");
}

/// Implementation-defined in the API (ICMP is not a `NetworkPolicy` protocol); weft decision,
/// as for its own rules: a rule without ports allows every protocol including ICMP, a rule
/// with ports only those ports.
#[test]
fn icmp_passes_port_less_rules_only() {
    let c = Cluster::new(&np(
        "p",
        "  podSelector: {matchLabels: {app: api}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: web}}}]\n  - from: [{podSelector: {matchLabels: {app: db}}}]\n    ports: [{port: 5432}]\n",
    ));
    assert!(c.ingress_ok(API, c.pod("shop/web"), IPPROTO_ICMP, 8 << 8));
    assert!(!c.ingress_ok(API, c.pod("shop/db"), IPPROTO_ICMP, 8 << 8));
    assert!(c.ingress_ok(API, c.pod("shop/db"), TCP, 5432));
}

/// API reference, `NetworkPolicyPort.port`: "This can either be a numerical or named port on
/// a pod"; ingress names resolve through the selected pod's own container ports. e2e "should
/// allow ingress access from updated pod / on one named port".
#[test]
fn named_ports_on_ingress_resolve_per_selected_pod() {
    let c = Cluster::new(&np(
        "p",
        "  podSelector: {}\n  ingress: [{ports: [{port: http}]}]\n",
    ));
    let peer = c.pod("other/tool");
    assert!(c.ingress_ok(API, peer, TCP, 8080));
    assert!(!c.ingress_ok(API, peer, TCP, 80));
    assert!(c.ingress_ok(WEB, peer, TCP, 80));
    assert!(!c.ingress_ok(WEB, peer, TCP, 8080));
    assert!(
        !c.ingress_ok(DB, peer, TCP, 5432),
        "db defines no http: nothing allowed"
    );
    assert!(!c.ingress_ok(DB, peer, TCP, 8080));
    let udp = Cluster::new(&np(
        "p",
        "  podSelector: {}\n  ingress: [{ports: [{port: dns}]}]\n",
    ));
    assert!(
        !udp.ingress_ok(WEB, peer, IPPROTO_UDP, 53) && !udp.ingress_ok(WEB, peer, TCP, 53),
        "dns is UDP on the pod, the policy port is TCP (default): no match"
    );
    let status = udp.status();
    let s = status.values().next().expect("one policy");
    assert_eq!(
        s.enforced.as_ref().expect("enforced").reason,
        "Enforced",
        "web defines dns"
    );
}

/// Egress names resolve through each destination pod's ports: per-peer-identity entries.
/// e2e "should allow egress access on one named port".
#[test]
fn named_ports_on_egress_resolve_per_peer() {
    let c = Cluster::new(&np(
        "p",
        "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress: [{ports: [{port: http}]}]\n",
    ));
    assert!(c.egress_ok(WEB, c.pod("shop/api"), TCP, 8080));
    assert!(!c.egress_ok(WEB, c.pod("shop/api"), TCP, 8081));
    assert!(c.egress_ok(WEB, c.pod("other/web"), TCP, 8081));
    assert!(!c.egress_ok(WEB, c.pod("other/web"), TCP, 8080));
    assert!(
        !c.egress_ok(WEB, c.pod("other/tool"), TCP, 8080),
        "tool has no http"
    );
    assert!(
        !c.egress_ok(WEB, WORLD, TCP, 8080),
        "outside addresses have no named ports"
    );
    let api_keys: Vec<_> = c
        .state
        .entries
        .keys()
        .filter(|k| k.endpoint_id == WEB && k.direction == Direction::Egress)
        .map(|k| (k.identity, k.port.port))
        .collect();
    assert!(
        api_keys.contains(&(c.pod("shop/api"), 8080)),
        "{api_keys:?}"
    );
    assert!(api_keys.iter().all(|(id, _)| *id != crate::identity::ANY));
}

#[test]
fn a_port_name_no_pod_defines_allows_nothing_and_is_reported() {
    let c = Cluster::new(&np(
        "p",
        "  podSelector: {matchLabels: {app: db}}\n  ingress: [{ports: [{port: grpc}]}]\n",
    ));
    assert_eq!(c.state.endpoints[&DB].ingress, Isolation::Enforced);
    assert!(
        c.state
            .entries
            .keys()
            .all(|k| k.endpoint_id != DB || k.identity == HOST)
    );
    let status = c.status();
    let s = status.values().next().expect("one policy");
    assert!(
        s.warnings[0].to_string().starts_with(
            "spec.ingress[0]: port name \"grpc\": no selected pod on this node defines it"
        ),
        "{}",
        s.warnings[0]
    );
}

/// API reference, `spec.ingress`: "the ingress rules for each are combined additively";
/// e2e "should allow ingress access from namespace on one named port" with stacked policies
/// ("should enforce multiple, stacked policies with overlapping podSelectors").
#[test]
fn policies_add_up() {
    let c = Cluster::new(&format!(
        "{}{}",
        np(
            "a",
            "  podSelector: {matchLabels: {app: api}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 8080}]}]\n"
        ),
        np(
            "b",
            "  podSelector: {}\n  ingress: [{from: [{podSelector: {matchLabels: {app: db}}}]}]\n"
        ),
    ));
    assert!(c.ingress_ok(API, c.pod("shop/web"), TCP, 8080));
    assert!(!c.ingress_ok(API, c.pod("shop/web"), TCP, 9090));
    assert!(c.ingress_ok(API, c.pod("shop/db"), TCP, 9090));
    assert!(c.ingress_ok(WEB, c.pod("shop/db"), TCP, 1));
    assert!(!c.ingress_ok(WEB, c.pod("shop/web"), TCP, 1));
}

/// DESIGN: "Deny rules beat every allow, whichever kind of policy the allow came from"
/// (Cilium docs, "Deny Policies": precedence over "even a Kubernetes Network Policy").
#[test]
fn weft_deny_rules_beat_network_policy_allows() {
    let c = Cluster::new(&format!(
        "{}---\napiVersion: weft.io/v1alpha1\nkind: WeftClusterwideNetworkPolicy\nmetadata: {{name: no-metrics}}\nspec:\n  endpointSelector: {{}}\n  ingressDeny:\n  - toPorts: [{{ports: [{{port: metrics, protocol: TCP}}]}}]\n",
        np("all", "  podSelector: {}\n  ingress: [{}]\n"),
    ));
    let web = c.pod("shop/web");
    assert!(c.ingress_ok(API, web, TCP, 8080));
    assert!(
        !c.ingress_ok(API, web, TCP, 9090),
        "the deny wins, by named port too"
    );
    match c.state.decide(API, Direction::Ingress, web, TCP, 9090) {
        crate::mapstate::Decision::Entry(_, e) => assert_eq!(
            e.derived_from.iter().collect::<Vec<_>>(),
            vec!["WeftClusterwideNetworkPolicy no-metrics ingressDeny[0]"]
        ),
        other => panic!("expected the deny entry, got {other:?}"),
    }
}

/// API reference, `spec.ingress`: traffic is allowed "if the traffic source is the pod's
/// local node"; other nodes get no exemption (DESIGN).
#[test]
fn the_local_node_always_reaches_its_pods() {
    let c = Cluster::new(&np("deny", "  podSelector: {}\n"));
    assert!(c.ingress_ok(API, HOST, TCP, 8080));
    assert!(!c.ingress_ok(API, REMOTE_NODE, TCP, 8080));
}

#[test]
fn derived_from_names_the_network_policy_rule() {
    let c = Cluster::new(&np(
        "p",
        "  podSelector: {matchLabels: {app: api}}\n  ingress: [{ports: [{port: 8080}]}]\n",
    ));
    match c.state.decide(API, Direction::Ingress, WORLD, TCP, 8080) {
        crate::mapstate::Decision::Entry(_, e) => assert_eq!(
            e.derived_from.iter().collect::<Vec<_>>(),
            vec!["NetworkPolicy shop/p ingress[0]"]
        ),
        other => panic!("expected an entry, got {other:?}"),
    }
}

/// Validation (`ValidateNetworkPolicySpec` and friends): the API server's messages, with
/// field paths.
#[test]
fn validation_errors_name_the_field() {
    let rows: &[(&str, &str)] = &[
        (
            "  ingress: [{from: [{}]}]\n",
            "spec.ingress[0].from[0]: must specify a peer",
        ),
        (
            "  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]\n",
            "spec.ingress[0].from[0]: may not specify both ipBlock and another peer",
        ),
        (
            "  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}]}]\n",
            "spec.egress[0].to[0].ipBlock.except[0]: \"10.0.0.0/8\" must be a strict subset of cidr 10.0.0.0/8",
        ),
        (
            "  ingress: [{ports: [{port: 0}]}]\n",
            "spec.ingress[0].ports[0].port: 0 is not a valid port number (1-65535)",
        ),
        (
            "  ingress: [{ports: [{port: \"80\"}]}]\n",
            "spec.ingress[0].ports[0].port: \"80\" is not a valid port name (hint: a quoted number is a port name",
        ),
        (
            "  ingress: [{ports: [{endPort: 90}]}]\n",
            "spec.ingress[0].ports[0].endPort: may not be specified when `port` is not specified",
        ),
        (
            "  ingress: [{ports: [{port: http, endPort: 90}]}]\n",
            "spec.ingress[0].ports[0].endPort: may not be specified when `port` is non-numeric",
        ),
        (
            "  ingress: [{ports: [{port: 90, endPort: 80}]}]\n",
            "spec.ingress[0].ports[0].endPort: 80 must be greater than or equal to `port` (90)",
        ),
        (
            "  ingress: [{ports: [{port: 80, protocol: ICMP}]}]\n",
            "spec.ingress[0].ports[0].protocol: unknown variant `ICMP`, expected one of `TCP`, `UDP`, `SCTP`",
        ),
        (
            "  policyTypes: [Ingress, Egress, Ingress]\n",
            "spec.policyTypes: may not specify more than two policyTypes",
        ),
        (
            "  policyTypes: [ingress]\n",
            "spec.policyTypes[0]: unknown variant `ingress`, expected `Ingress` or `Egress`",
        ),
        (
            "  podSelector: {matchLabels: {\"a b\": x}}\n",
            "spec.podSelector.matchLabels: \"a b\" is not a valid label key",
        ),
        (
            "  podSelector: {matchExpressions: [{key: app, operator: In}]}\n",
            "spec.podSelector.matchExpressions[0].values: operator In needs at least one value",
        ),
        (
            "  ingress: [{from: [{podSelector: {}}], port: [{port: 80}]}]\n",
            "spec.ingress[0].port: unknown field `port`",
        ),
    ];
    for (spec, want) in rows {
        let yaml = np("bad", spec);
        let err = parse_documents("np.yaml", &yaml).expect_err("invalid policy");
        let lines: Vec<String> = err.to_string().lines().map(str::to_string).collect();
        let want = format!("np.yaml: NetworkPolicy shop/bad: {want}");
        assert!(
            lines.iter().any(|l| l.starts_with(&want)),
            "for\n{spec}wanted a line starting with\n  {want}\ngot\n  {}",
            lines.join("\n  ")
        );
    }
}

#[test]
fn a_selector_on_a_rollout_label_is_reported() {
    let c = Cluster::new(&np(
        "p",
        "  podSelector: {matchLabels: {pod-template-hash: abc}}\n",
    ));
    let status = c.status();
    let s = status.values().next().expect("one policy");
    assert!(
        s.warnings[0]
            .message
            .contains("pod-template-hash changes with every rollout"),
        "{}",
        s.warnings[0]
    );
}

fn wnp(name: &str, body: &str) -> String {
    format!(
        "---\napiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\n\
         metadata: {{name: {name}, namespace: shop}}\nspec:\n{body}"
    )
}

/// Cilium's `toPorts` accepts named ports (`port: http`); as in `NetworkPolicy` they resolve
/// through the selected pod (ingress) or each peer (egress); no protocol means any, and the
/// container port's own protocol must match.
#[test]
fn weft_rules_with_named_ports() {
    let c = Cluster::new(&format!(
        "{}{}",
        wnp(
            "in",
            "  endpointSelector: {matchLabels: {app: api}}\n  ingress:\n  - toPorts: [{ports: [{port: http}]}]\n"
        ),
        wnp(
            "out",
            "  endpointSelector: {matchLabels: {app: web}}\n  egress:\n  - toEndpoints: [{}]\n    toPorts:\n    - ports: [{port: http}]\n      rules: {http: [{method: GET}]}\n"
        ),
    ));
    let tool = c.pod("other/tool");
    assert!(c.ingress_ok(API, tool, TCP, 8080));
    assert!(
        !c.ingress_ok(API, tool, IPPROTO_UDP, 8080),
        "http is a TCP port on api"
    );
    let v = c
        .state
        .decide(WEB, Direction::Egress, c.pod("shop/api"), TCP, 8080)
        .enforced_verdict();
    assert_eq!(
        v,
        crate::mapstate::Verdict::RedirectL7 {
            require_auth: false
        }
    );
    assert!(
        !c.egress_ok(WEB, c.pod("other/web"), TCP, 8081),
        "toEndpoints [{{}}] is shop only"
    );
    assert!(!c.egress_ok(WEB, c.pod("shop/api"), TCP, 80));
}

/// `weft policy explain`: per direction, the verdict and the rules behind it, from the same
/// state the datapath simulation reads, for a pod under a `NetworkPolicy`, a weft deny and an
/// audit policy at once.
#[test]
fn explain_names_the_rules_of_each_direction() {
    use crate::explain::{Peer, Reason, explain};
    use crate::mapstate::{AuditChange, Verdict};
    let c = Cluster::new(&format!(
        "{}{}{}",
        np(
            "web-in",
            "  podSelector: {matchLabels: {app: api}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: http}]}]\n"
        ),
        wnp(
            "no-ssh",
            "  endpointSelector: {matchLabels: {app: api}}\n  ingressDeny: [{toPorts: [{ports: [{port: \"22\"}]}]}]\n"
        ),
        wnp(
            "tighten",
            "  endpointSelector: {matchLabels: {app: api}}\n  enforcement: audit\n  ingressDeny: [{fromEndpoints: [{matchLabels: {app: web}}]}]\n"
        ),
    ));
    let web = Peer::Local {
        endpoint_id: WEB,
        identity: c.pod("shop/web"),
    };
    let api = Peer::Local {
        endpoint_id: API,
        identity: c.pod("shop/api"),
    };

    let e = explain(&c.state, web, api, TCP, 8080);
    assert!(e.allowed());
    assert_eq!(e.hops.len(), 2, "egress of web, ingress of api");
    assert_eq!(e.hops[0].direction, Direction::Egress);
    assert_eq!(e.hops[0].reason, Reason::NotIsolated);
    let hop = &e.hops[1];
    assert_eq!((hop.endpoint_id, hop.direction), (API, Direction::Ingress));
    assert_eq!(hop.verdict, Verdict::Allow);
    assert_eq!(
        hop.reason,
        Reason::Rules(vec!["NetworkPolicy shop/web-in ingress[0]".into()])
    );
    let audit = hop.audit.as_ref().expect("audit");
    assert_eq!(audit.verdict, Verdict::Deny);
    assert_eq!(
        audit.rules,
        vec!["WeftNetworkPolicy shop/tighten ingressDeny[0]"]
    );
    assert_eq!(audit.change, Some(AuditChange::WouldDeny));
    let text = e.to_string();
    assert!(text.starts_with("TCP/8080: allowed\n"), "{text}");
    assert!(
        text.contains(
            "audit: Deny (would be dropped), by WeftNetworkPolicy shop/tighten ingressDeny[0]"
        ),
        "{text}"
    );

    let e = explain(&c.state, web, api, TCP, 22);
    assert!(!e.allowed());
    assert_eq!(e.hops[1].verdict, Verdict::Deny);
    assert_eq!(
        e.hops[1].reason,
        Reason::Rules(vec!["WeftNetworkPolicy shop/no-ssh ingressDeny[0]".into()])
    );

    let e = explain(&c.state, web, api, TCP, 9090);
    assert_eq!(e.hops[1].verdict, Verdict::DefaultDeny);
    assert_eq!(
        e.hops[1].reason,
        Reason::DefaultDeny {
            isolated_by: vec![
                "WeftNetworkPolicy shop/no-ssh".into(),
                "NetworkPolicy shop/web-in".into(),
                "WeftNetworkPolicy shop/tighten (audit)".into(),
            ]
        }
    );

    let world = Peer::Remote { identity: WORLD };
    let e = explain(&c.state, world, api, TCP, 8080);
    assert_eq!(e.hops.len(), 1, "only the local end is enforced here");
    assert!(!e.allowed(), "web-in admits web only");

    // The explanation is the datapath's lookup: same verdict for every probe.
    for port in [22, 80, 8080, 9090] {
        for peer in [c.pod("shop/web"), c.pod("other/web"), WORLD, HOST] {
            let e = explain(&c.state, Peer::Remote { identity: peer }, api, TCP, port);
            let d = c.state.decide(API, Direction::Ingress, peer, TCP, port);
            assert_eq!(e.hops[0].verdict, d.enforced_verdict());
            assert_eq!(e.allowed(), !d.drops());
        }
    }
}

/// The Kubernetes source hands over `k8s-openapi` objects: the same checks and the same
/// compiled policy as the YAML of the object.
#[test]
fn api_objects_compile_like_files() {
    use k8s_openapi::api::networking::v1 as api;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector as ApiSelector;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString as ApiPort;
    let from_api = compile_api_network_policy(&api::NetworkPolicy {
        metadata: ObjectMeta {
            name: Some("p".into()),
            namespace: Some("shop".into()),
            ..Default::default()
        },
        spec: Some(api::NetworkPolicySpec {
            pod_selector: Some(ApiSelector {
                match_labels: Some([("app".to_string(), "api".to_string())].into()),
                ..Default::default()
            }),
            ingress: Some(vec![api::NetworkPolicyIngressRule {
                from: Some(vec![api::NetworkPolicyPeer {
                    namespace_selector: Some(ApiSelector::default()),
                    ..Default::default()
                }]),
                ports: Some(vec![api::NetworkPolicyPort {
                    port: Some(ApiPort::String("http".into())),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
            }]),
            policy_types: Some(vec!["Ingress".into()]),
            ..Default::default()
        }),
    })
    .expect("valid");
    let objs = parse_documents(
        "p.yaml",
        &np(
            "p",
            "  podSelector: {matchLabels: {app: api}}\n  policyTypes: [Ingress]\n  ingress: [{from: [{namespaceSelector: {}}], ports: [{port: http, protocol: TCP}]}]\n  # from an old cluster\nstatus: {}\n",
        ),
    )
    .expect("valid, status ignored");
    let Object::Policy(from_file) = &objs[0] else {
        panic!("a policy")
    };
    assert_eq!(&from_api, &**from_file);

    let err = compile_api_network_policy(&api::NetworkPolicy {
        metadata: ObjectMeta {
            name: Some("bad".into()),
            namespace: Some("shop".into()),
            ..Default::default()
        },
        spec: Some(api::NetworkPolicySpec {
            ingress: Some(vec![api::NetworkPolicyIngressRule {
                from: Some(vec![api::NetworkPolicyPeer::default()]),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    })
    .expect_err("an empty peer");
    assert_eq!(err.object, "NetworkPolicy shop/bad");
    assert_eq!(err.problems[0].field, "spec.ingress[0].from[0]");
}
