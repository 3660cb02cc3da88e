//! Scenario tests: YAML policies over a small cluster, checked through the simulated datapath
//! lookup (`DesiredState::decide`), i.e. what a packet would experience.

mod props;

use super::*;
use crate::identity::{CidrIdentityAllocator, FIRST_CIDR_IDENTITY, IdentityAllocator};
use crate::labels::security_labels;
use crate::mapstate::{Decision, Verdict};
use crate::parse::{Object, parse_documents};
use crate::ports::{IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

/// Pods of the test cluster: (namespace, name, app label, local endpoint id if on this node).
const PODS: &[(&str, &str, &str, Option<u32>)] = &[
    ("shop", "api", "api", Some(1)),
    ("shop", "frontend", "frontend", Some(2)),
    ("shop", "db", "db", None),
    ("other", "frontend", "frontend", Some(3)),
    ("other", "tool", "tool", None),
];

struct Cluster {
    state: DesiredState,
    pods: BTreeMap<String, u32>,
    cidrs: BTreeMap<IpNet, u32>,
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
        for (ns, name, app, ep) in PODS {
            let ns_labels = Labels::from([("env".to_string(), format!("{ns}-env"))]);
            let own = Labels::from([("app".to_string(), (*app).to_string())]);
            let labels = security_labels(&own, ns, "default", &ns_labels);
            let identity = ids.allocate(&labels).expect("allocate");
            pods.insert(format!("{ns}/{name}"), identity);
            if let Some(endpoint_id) = ep {
                endpoints.push(LocalEndpoint {
                    endpoint_id: *endpoint_id,
                    namespace: (*ns).to_string(),
                    name: (*name).to_string(),
                    identity,
                    labels,
                    ports: NamedPorts::new(),
                });
            }
        }
        let mut cidr_ids = CidrIdentityAllocator::new();
        cidr_ids
            .sync(&repo.cidr_prefixes())
            .expect("cidr identities");
        let state = resolve(&ResolveInput {
            repository: &repo,
            endpoints: &endpoints,
            identities: ids.pod_identities(),
            cidr_identities: cidr_ids.prefixes(),
            named_ports: &BTreeMap::new(),
            options,
        });
        Cluster {
            state,
            pods,
            cidrs: cidr_ids.prefixes().clone(),
        }
    }

    fn pod(&self, name: &str) -> u32 {
        self.pods[name]
    }

    fn cidr(&self, prefix: &str) -> u32 {
        self.cidrs[&prefix.parse::<IpNet>().expect("prefix")]
    }

    fn decide(&self, ep: u32, dir: Direction, peer: u32, proto: u8, port: u16) -> Decision<'_> {
        self.state.decide(ep, dir, peer, proto, port)
    }

    /// Whether a TCP packet to `port` from `peer` into endpoint `ep` passes.
    fn ingress_ok(&self, ep: u32, peer: u32, proto: u8, port: u16) -> bool {
        !self
            .decide(ep, Direction::Ingress, peer, proto, port)
            .drops()
    }

    fn egress_ok(&self, ep: u32, peer: u32, proto: u8, port: u16) -> bool {
        !self
            .decide(ep, Direction::Egress, peer, proto, port)
            .drops()
    }

    fn verdict(&self, ep: u32, dir: Direction, peer: u32, proto: u8, port: u16) -> Option<Verdict> {
        match self.decide(ep, dir, peer, proto, port) {
            Decision::Entry(_, e) => Some(e.verdict),
            _ => None,
        }
    }
}

const API: u32 = 1;
const FRONTEND: u32 = 2;
const OTHER_FRONTEND: u32 = 3;

fn wnp(name: &str, body: &str) -> String {
    format!(
        "---\napiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\n\
         metadata: {{name: {name}, namespace: shop}}\nspec:\n  \
         endpointSelector: {{matchLabels: {{app: api}}}}\n{body}"
    )
}

fn wcnp(name: &str, body: &str) -> String {
    format!(
        "---\napiVersion: weft.io/v1alpha1\nkind: WeftClusterwideNetworkPolicy\n\
         metadata: {{name: {name}}}\nspec:\n{body}"
    )
}

#[test]
fn namespaced_peer_selectors_stay_in_their_namespace() {
    let c = Cluster::new(&wnp(
        "p",
        "  ingress:\n  - fromEndpoints: [{matchLabels: {app: frontend}}]\n",
    ));
    assert!(c.ingress_ok(API, c.pod("shop/frontend"), IPPROTO_TCP, 80));
    assert!(!c.ingress_ok(API, c.pod("other/frontend"), IPPROTO_TCP, 80));
    assert!(!c.ingress_ok(API, WORLD_ID, IPPROTO_TCP, 80));
}

const WORLD_ID: u32 = crate::identity::WORLD;

#[test]
fn naming_the_namespace_label_selects_across_namespaces_per_selector() {
    let c = Cluster::new(&wnp(
        "p",
        "  ingress:
  - fromEndpoints:
    - matchLabels: {app: frontend, weft.io/namespace: other}
    - matchLabels: {app: db}
    - matchLabels: {app: tool}
",
    ));
    assert!(c.ingress_ok(API, c.pod("other/frontend"), IPPROTO_TCP, 80));
    assert!(!c.ingress_ok(API, c.pod("shop/frontend"), IPPROTO_TCP, 80));
    assert!(c.ingress_ok(API, c.pod("shop/db"), IPPROTO_TCP, 80));
    assert!(
        !c.ingress_ok(API, c.pod("other/tool"), IPPROTO_TCP, 80),
        "each selector of a list is scoped on its own"
    );
}

#[test]
fn namespace_labels_alone_do_not_escape_scoping() {
    let c = Cluster::new(&wnp(
        "p",
        "  ingress:\n  - fromEndpoints: [{matchLabels: {weft.io/ns.env: other-env}}]\n",
    ));
    assert!(!c.ingress_ok(API, c.pod("other/frontend"), IPPROTO_TCP, 80));
}

#[test]
fn empty_endpoint_selector_namespaced_vs_clusterwide() {
    let ns = Cluster::new(&wnp("p", "  ingress:\n  - fromEndpoints: [{}]\n"));
    assert!(ns.ingress_ok(API, ns.pod("shop/db"), IPPROTO_TCP, 1));
    assert!(!ns.ingress_ok(API, ns.pod("other/tool"), IPPROTO_TCP, 1));
    assert!(!ns.ingress_ok(API, WORLD_ID, IPPROTO_TCP, 1));

    let cw = Cluster::new(&wcnp(
        "p",
        "  endpointSelector: {matchLabels: {app: api}}\n  ingress:\n  - fromEndpoints: [{}]\n",
    ));
    assert!(cw.ingress_ok(API, cw.pod("shop/db"), IPPROTO_TCP, 1));
    assert!(cw.ingress_ok(API, cw.pod("other/tool"), IPPROTO_TCP, 1));
    assert!(!cw.ingress_ok(API, WORLD_ID, IPPROTO_TCP, 1), "never world");
    assert!(!cw.ingress_ok(API, crate::identity::REMOTE_NODE, IPPROTO_TCP, 1));
}

#[test]
fn namespaced_endpoint_selector_never_selects_another_namespace() {
    let c = Cluster::new(
        "apiVersion: weft.io/v1alpha1
kind: WeftNetworkPolicy
metadata: {name: p, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: frontend, weft.io/namespace: other}}
  ingress: []
",
    );
    assert_eq!(c.state.endpoints[&OTHER_FRONTEND].ingress, Isolation::Open);
    assert_eq!(c.state.endpoints[&FRONTEND].ingress, Isolation::Open);
}

#[test]
fn clusterwide_endpoint_selector_matches_every_namespace() {
    let c = Cluster::new(&wcnp(
        "p",
        "  endpointSelector: {matchExpressions: [{key: app, operator: In, values: [frontend]}]}\n  egress: []\n",
    ));
    assert_eq!(c.state.endpoints[&FRONTEND].egress, Isolation::Enforced);
    assert_eq!(
        c.state.endpoints[&OTHER_FRONTEND].egress,
        Isolation::Enforced
    );
    assert_eq!(c.state.endpoints[&API].egress, Isolation::Open);
}

#[test]
fn entities() {
    use crate::identity::{HEALTH, HOST, KUBE_APISERVER, REMOTE_NODE};
    let peers = |entity: &str| {
        let c = Cluster::with_options(
            &format!(
                "{}{}",
                wnp("p", &format!("  ingress:\n  - fromEntities: [{entity}]\n")),
                wnp("cidr", "  egress:\n  - toCIDR: [192.0.2.0/24]\n"),
            ),
            ResolveOptions {
                allow_host_ingress: false,
                ..ResolveOptions::default()
            },
        );
        let candidates = [
            ("host", HOST),
            ("world", WORLD_ID),
            ("remote-node", REMOTE_NODE),
            ("health", HEALTH),
            ("kube-apiserver", KUBE_APISERVER),
            ("cidr", c.cidr("192.0.2.0/24")),
            ("shop/db", c.pod("shop/db")),
            ("other/tool", c.pod("other/tool")),
            ("unknown", 99_999),
        ];
        candidates
            .iter()
            .filter(|(_, id)| c.ingress_ok(API, *id, IPPROTO_TCP, 80))
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
    };
    assert_eq!(peers("world"), vec!["world", "cidr"]);
    assert_eq!(
        peers("cluster"),
        vec![
            "host",
            "remote-node",
            "health",
            "kube-apiserver",
            "shop/db",
            "other/tool"
        ]
    );
    assert_eq!(peers("host"), vec!["host"]);
    assert_eq!(peers("remote-node"), vec!["remote-node"]);
    assert_eq!(peers("all").len(), 9, "all is every peer, known or not");
}

#[test]
fn cidr_with_except() {
    let c = Cluster::new(&format!(
        "{}{}",
        wnp(
            "p",
            "  egress:\n  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.96.0.0/12]}]\n"
        ),
        wnp(
            "q",
            "  ingress:\n  - fromCIDR: [10.1.0.0/16, 10.96.1.0/24, 192.168.0.0/16]\n"
        ),
    ));
    assert!(c.egress_ok(API, c.cidr("10.0.0.0/8"), IPPROTO_TCP, 443));
    assert!(
        c.egress_ok(API, c.cidr("10.1.0.0/16"), IPPROTO_TCP, 443),
        "a more specific prefix inside the cidr is part of it"
    );
    assert!(!c.egress_ok(API, c.cidr("10.96.0.0/12"), IPPROTO_TCP, 443));
    assert!(
        !c.egress_ok(API, c.cidr("10.96.1.0/24"), IPPROTO_TCP, 443),
        "prefixes inside an except are excepted too"
    );
    assert!(!c.egress_ok(API, c.cidr("192.168.0.0/16"), IPPROTO_TCP, 443));
    assert!(!c.egress_ok(API, WORLD_ID, IPPROTO_TCP, 443));
    assert!(c.cidrs.values().all(|id| *id >= FIRST_CIDR_IDENTITY));
}

#[test]
fn cidr_zero_means_world_and_gets_no_cidr_identity() {
    let c = Cluster::new(&wnp(
        "p",
        "  egress:\n  - toCIDRSet: [{cidr: 0.0.0.0/0, except: [10.0.0.0/8]}]\n",
    ));
    assert!(c.egress_ok(API, WORLD_ID, IPPROTO_UDP, 53));
    assert!(!c.egress_ok(API, c.cidr("10.0.0.0/8"), IPPROTO_UDP, 53));
    assert_eq!(c.cidrs.len(), 1, "only the except prefix needs an identity");
    assert!(
        !c.egress_ok(API, c.pod("shop/db"), IPPROTO_UDP, 53),
        "CIDR rules never match pods"
    );
}

#[test]
fn wildcard_deny_beats_exact_allow_across_policies() {
    let c = Cluster::new(&format!(
        "{}{}",
        wnp(
            "allow",
            "  ingress:\n  - fromEndpoints: [{matchLabels: {app: frontend}}]\n"
        ),
        wcnp(
            "deny-ssh",
            "  endpointSelector: {}\n  ingressDeny:\n  - toPorts: [{ports: [{port: \"22\", protocol: TCP}]}]\n"
        ),
    ));
    let fe = c.pod("shop/frontend");
    assert!(!c.ingress_ok(API, fe, IPPROTO_TCP, 22));
    assert!(c.ingress_ok(API, fe, IPPROTO_TCP, 23));
    assert!(
        c.ingress_ok(API, fe, IPPROTO_UDP, 22),
        "the deny is TCP only"
    );
    match c.decide(API, Direction::Ingress, fe, IPPROTO_TCP, 22) {
        Decision::Entry(k, e) => {
            assert_eq!(k.identity, fe, "the deny was copied into the exact set");
            assert_eq!(
                e.derived_from.iter().collect::<Vec<_>>(),
                vec!["WeftClusterwideNetworkPolicy deny-ssh ingressDeny[0]"]
            );
        }
        other => panic!("expected a deny entry, got {other:?}"),
    }
}

#[test]
fn deny_range_covering_an_allowed_port() {
    let c = Cluster::new(&wnp(
        "p",
        "  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: \"8080\", protocol: TCP}, {port: \"9090\", protocol: TCP}]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: \"8000\", endPort: 8999, protocol: TCP}]}]
",
    ));
    let fe = c.pod("shop/frontend");
    assert_eq!(
        c.verdict(API, Direction::Ingress, fe, IPPROTO_TCP, 8080),
        Some(Verdict::Deny)
    );
    assert!(c.ingress_ok(API, fe, IPPROTO_TCP, 9090));
    assert!(!c.ingress_ok(API, fe, IPPROTO_TCP, 8500));
}

#[test]
fn deny_only_policy_isolates() {
    let c = Cluster::new(&wnp("p", "  ingressDeny:\n  - fromEntities: [world]\n"));
    let ep = c.state.endpoints[&API];
    assert_eq!(ep.ingress, Isolation::Enforced);
    assert_eq!(ep.egress, Isolation::Open);
    assert!(
        !c.ingress_ok(API, c.pod("shop/frontend"), IPPROTO_TCP, 80),
        "default deny"
    );
    assert_eq!(
        c.verdict(API, Direction::Ingress, WORLD_ID, IPPROTO_TCP, 80),
        Some(Verdict::Deny)
    );
    assert!(c.egress_ok(API, WORLD_ID, IPPROTO_TCP, 80));
}

#[test]
fn present_empty_section_isolates_absent_section_does_not() {
    let c = Cluster::new(&wnp("p", "  egress: []\n"));
    let ep = c.state.endpoints[&API];
    assert_eq!(ep.egress, Isolation::Enforced);
    assert_eq!(ep.ingress, Isolation::Open);
    assert!(!c.egress_ok(API, c.pod("shop/db"), IPPROTO_TCP, 5432));
    assert_eq!(c.state.endpoints[&FRONTEND], EndpointPolicy::default());
}

#[test]
fn audit_only_reports_and_never_drops() {
    let c = Cluster::new(&wnp(
        "p",
        "  enforcement: audit
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: db}}]
",
    ));
    assert_eq!(c.state.endpoints[&API].ingress, Isolation::Audit);
    assert_eq!(
        c.verdict(
            API,
            Direction::Ingress,
            c.pod("shop/frontend"),
            IPPROTO_TCP,
            80
        ),
        Some(Verdict::Allow)
    );
    assert_eq!(
        c.verdict(API, Direction::Ingress, c.pod("shop/db"), IPPROTO_TCP, 80),
        Some(Verdict::AuditDeny)
    );
    assert_eq!(
        c.decide(API, Direction::Ingress, WORLD_ID, IPPROTO_TCP, 80),
        Decision::Default(Isolation::Audit)
    );
    assert!(c.state.entries.values().all(|e| e.verdict != Verdict::Deny));
    for peer in [c.pod("shop/db"), WORLD_ID, c.pod("other/tool")] {
        assert!(c.ingress_ok(API, peer, IPPROTO_TCP, 80));
    }
}

/// cilium#9580: a tightening policy in audit mode on top of enforced ones reports what it
/// would change (would-be drops and would-be allows) while the enforced verdict stands.
#[test]
fn audit_policies_report_next_to_enforcement() {
    use crate::mapstate::AuditChange;
    let c = Cluster::new(&format!(
        "{}{}",
        wnp(
            "enforced",
            "  ingress:\n  - fromEndpoints: [{matchLabels: {app: frontend}}]\n"
        ),
        wnp(
            "dry-run",
            "  enforcement: audit
  ingress:
  - fromEndpoints: [{matchLabels: {app: db}}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: \"22\", protocol: TCP}]}]
",
        ),
    ));
    assert_eq!(c.state.endpoints[&API].ingress, Isolation::Enforced);
    let fe = c.pod("shop/frontend");
    let db = c.pod("shop/db");
    let d = c.decide(API, Direction::Ingress, db, IPPROTO_TCP, 80);
    assert!(
        d.drops(),
        "an audit allow does not open an enforced direction"
    );
    assert_eq!(d.enforced_verdict(), Verdict::DefaultDeny);
    assert_eq!(d.audit_change(), Some(AuditChange::WouldAllow));
    let d = c.decide(API, Direction::Ingress, fe, IPPROTO_TCP, 22);
    assert_eq!(
        d.enforced_verdict(),
        Verdict::Allow,
        "an audit deny does not drop"
    );
    assert_eq!(d.audit_verdict(), Some(Verdict::Deny));
    assert_eq!(d.audit_change(), Some(AuditChange::WouldDeny));
    match d {
        Decision::Entry(_, e) => {
            assert_eq!(
                e.derived_from.iter().collect::<Vec<_>>(),
                vec!["WeftNetworkPolicy shop/enforced ingress[0]"]
            );
            assert_eq!(
                e.audit
                    .as_ref()
                    .expect("audit")
                    .derived_from
                    .iter()
                    .collect::<Vec<_>>(),
                vec!["WeftNetworkPolicy shop/dry-run ingressDeny[0]"]
            );
        }
        other => panic!("expected an entry, got {other:?}"),
    }
    let d = c.decide(API, Direction::Ingress, fe, IPPROTO_TCP, 80);
    assert_eq!((d.drops(), d.audit_change()), (false, None), "both allow");
    let d = c.decide(API, Direction::Ingress, WORLD_ID, IPPROTO_TCP, 80);
    assert_eq!((d.drops(), d.audit_change()), (true, None), "both deny");
    assert!(
        c.state
            .entries
            .values()
            .all(|e| e.derived_from.iter().all(|r| !r.contains("dry-run"))),
        "enforced verdicts never come from the audit policy"
    );
}

#[test]
fn enforcement_mode_always_isolates_every_endpoint() {
    use crate::identity::HOST;
    let options = ResolveOptions {
        enforcement_mode: EnforcementMode::Always,
        ..ResolveOptions::default()
    };
    let c = Cluster::with_options("", options);
    for ep in [API, FRONTEND, OTHER_FRONTEND] {
        assert_eq!(c.state.endpoints[&ep].ingress, Isolation::Enforced);
        assert_eq!(c.state.endpoints[&ep].egress, Isolation::Enforced);
        assert!(!c.ingress_ok(ep, WORLD_ID, IPPROTO_TCP, 80));
        assert!(!c.egress_ok(ep, WORLD_ID, IPPROTO_UDP, 53));
        assert!(
            c.ingress_ok(ep, HOST, IPPROTO_TCP, 80),
            "allow-localhost, as Cilium"
        );
    }
    assert!(c.state.isolated_by[&(API, Direction::Egress)].mode_always);
    let c = Cluster::with_options(
        &wnp(
            "p",
            "  egress:\n  - toEndpoints: [{matchLabels: {app: db}}]\n",
        ),
        options,
    );
    assert!(c.egress_ok(API, c.pod("shop/db"), IPPROTO_TCP, 5432));
    assert!(!c.egress_ok(FRONTEND, c.pod("shop/db"), IPPROTO_TCP, 5432));
    let no_host = Cluster::with_options(
        "",
        ResolveOptions {
            allow_host_ingress: false,
            ..options
        },
    );
    assert!(!no_host.ingress_ok(API, HOST, IPPROTO_TCP, 80));
}

#[test]
fn enforcement_mode_never_enforces_nothing() {
    let c = Cluster::with_options(
        &format!(
            "{}{}",
            wnp("p", "  ingress: []\n  egress: []\n"),
            wcnp(
                "d",
                "  endpointSelector: {}\n  ingressDeny: [{fromEntities: [all]}]\n"
            ),
        ),
        ResolveOptions {
            enforcement_mode: EnforcementMode::Never,
            ..ResolveOptions::default()
        },
    );
    assert!(c.state.entries.is_empty());
    assert_eq!(c.state.endpoints[&API], EndpointPolicy::default());
    assert!(
        c.ingress_ok(API, WORLD_ID, IPPROTO_TCP, 22),
        "deny rules are off too"
    );
    assert!("never".parse::<EnforcementMode>() == Ok(EnforcementMode::Never));
    assert!("sometimes".parse::<EnforcementMode>().is_err());
    assert_eq!(EnforcementMode::Always.to_string(), "always");
}

#[test]
fn icmp_types_by_name() {
    let c = Cluster::new(&wnp(
        "p",
        "  ingress:
  - icmps:
    - fields: [{type: EchoRequest}, {type: \"13\"}, {type: EchoRequest, family: IPv6}, {type: PacketTooBig, family: IPv6}]
",
    ));
    let fe = c.pod("shop/frontend");
    assert!(c.ingress_ok(API, fe, IPPROTO_ICMP, 8 << 8));
    assert!(c.ingress_ok(API, fe, IPPROTO_ICMP, 13 << 8));
    assert!(!c.ingress_ok(API, fe, IPPROTO_ICMP, 0));
    let icmpv6 = crate::ports::IPPROTO_ICMPV6;
    assert!(c.ingress_ok(API, fe, icmpv6, 128 << 8));
    assert!(c.ingress_ok(API, fe, icmpv6, 2 << 8));
    assert!(!c.ingress_ok(API, fe, icmpv6, 8 << 8));
}

#[test]
fn protocol_defaults() {
    let c = Cluster::new(&format!(
        "{}{}",
        wnp(
            "ports",
            "  ingress:\n  - fromEndpoints: [{matchLabels: {app: frontend}}]\n    toPorts: [{ports: [{port: \"53\"}]}]\n"
        ),
        wnp(
            "any",
            "  egress:\n  - toEndpoints: [{matchLabels: {app: db}}]\n"
        ),
    ));
    let fe = c.pod("shop/frontend");
    for proto in [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP] {
        assert!(c.ingress_ok(API, fe, proto, 53), "proto {proto}");
        assert!(!c.ingress_ok(API, fe, proto, 54), "proto {proto}");
    }
    assert!(
        !c.ingress_ok(API, fe, IPPROTO_ICMP, 8 << 8),
        "ports never allow ICMP"
    );
    let db = c.pod("shop/db");
    assert!(
        c.egress_ok(API, db, IPPROTO_ICMP, 8 << 8),
        "no ports: ICMP allowed"
    );
    assert!(c.egress_ok(API, db, IPPROTO_TCP, 5432));
}

#[test]
fn icmp_types() {
    let c = Cluster::new(&wnp(
        "p",
        "  ingress:\n  - fromEntities: [cluster]\n    icmps: [{fields: [{type: 8}]}]\n",
    ));
    let fe = c.pod("shop/frontend");
    assert!(c.ingress_ok(API, fe, IPPROTO_ICMP, 8 << 8));
    assert!(c.ingress_ok(API, fe, IPPROTO_ICMP, (8 << 8) | 3));
    assert!(!c.ingress_ok(API, fe, IPPROTO_ICMP, 13 << 8));
    assert!(!c.ingress_ok(API, fe, IPPROTO_TCP, 8 << 8));
}

#[test]
fn l7_and_authentication_verdicts() {
    let c = Cluster::new(&wnp(
        "p",
        "  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts:
    - ports: [{port: \"8080\", protocol: TCP}]
      rules: {http: [{method: GET, path: \"/orders(/.*)?\"}]}
  - fromEndpoints: [{matchLabels: {app: db}}]
    authentication: {mode: required}
",
    ));
    assert_eq!(
        c.verdict(
            API,
            Direction::Ingress,
            c.pod("shop/frontend"),
            IPPROTO_TCP,
            8080
        ),
        Some(Verdict::RedirectL7 {
            require_auth: false
        })
    );
    assert_eq!(
        c.verdict(API, Direction::Ingress, c.pod("shop/db"), IPPROTO_UDP, 1),
        Some(Verdict::RequireAuth)
    );
}

#[test]
fn the_node_reaches_its_own_pods_unless_denied() {
    use crate::identity::{HOST, REMOTE_NODE};
    let c = Cluster::new(&wnp("p", "  ingress: []\n"));
    assert!(c.ingress_ok(API, HOST, IPPROTO_TCP, 8080));
    assert!(
        !c.ingress_ok(API, REMOTE_NODE, IPPROTO_TCP, 8080),
        "other nodes are not exempt"
    );
    let denied = Cluster::new(&wnp("p", "  ingressDeny: [{fromEntities: [host]}]\n"));
    assert!(!denied.ingress_ok(API, HOST, IPPROTO_TCP, 8080));
    let off = Cluster::with_options(
        &wnp("p", "  ingress: []\n"),
        ResolveOptions {
            allow_host_ingress: false,
            ..ResolveOptions::default()
        },
    );
    assert!(!off.ingress_ok(API, HOST, IPPROTO_TCP, 8080));
}

#[test]
fn allows_merge_and_name_every_rule() {
    let c = Cluster::new(&format!(
        "{}{}",
        wnp(
            "a",
            "  ingress:\n  - fromEndpoints: [{matchLabels: {app: frontend}}]\n"
        ),
        wnp("b", "  ingress:\n  - fromEntities: [cluster]\n"),
    ));
    match c.decide(
        API,
        Direction::Ingress,
        c.pod("shop/frontend"),
        IPPROTO_TCP,
        80,
    ) {
        Decision::Entry(_, e) => assert_eq!(
            e.derived_from.iter().collect::<Vec<_>>(),
            vec![
                "WeftNetworkPolicy shop/a ingress[0]",
                "WeftNetworkPolicy shop/b ingress[0]"
            ]
        ),
        other => panic!("expected an entry, got {other:?}"),
    }
}

#[test]
fn removing_a_policy_diffs_to_removals_and_reopens_the_endpoint() {
    let yaml = wnp(
        "p",
        "  ingress:\n  - fromEndpoints: [{matchLabels: {app: frontend}}]\n",
    );
    let before = Cluster::new(&yaml);
    let after = Cluster::new("");
    let d = crate::mapstate::diff(&before.state, &after.state);
    assert!(d.upserts.is_empty());
    assert_eq!(d.removals.len(), before.state.entries.len());
    assert!(d.removals.iter().all(|k| k.endpoint_id == API));
    assert_eq!(
        d.endpoint_changes,
        vec![(API, Some(EndpointPolicy::default()))]
    );
    assert!(crate::mapstate::diff(&before.state, &Cluster::new(&yaml).state).is_empty());
}
