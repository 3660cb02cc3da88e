//! The policy conformance suite: table-driven cases run against the real datapath. Pods in
//! network namespaces on one node (and a few cases across two nodes), real TCP, UDP and
//! ICMP connections, expected verdicts taken from the upstream source each case cites
//! (Kubernetes API reference and e2e tests, Cilium docs, weft's DESIGN.md where weft
//! decides). For every probe the suite also asks `weft policy explain` and checks that its
//! verdict is the one observed and that the datapath's own flows do not contradict it.
//!
//! Pods are built once per topic group; each case replaces one policy file, waits for the
//! agent to enforce it (`weft policy wait`) and probes. Probes expected to be dropped use a
//! short timeout, so a drop costs little; probes expected to pass get a generous one. The
//! suite prints a pass table by topic and fails with every failing probe listed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_tests::{
    Cluster, ClusterOptions, Node, Outside, Pod, TestPrefix, policy_yaml, skip_unless_privileged,
};

/// Timeout of a probe expected to pass (returns as soon as it does).
const PASS_TIMEOUT: Duration = Duration::from_secs(2);
/// Timeout of a probe expected to be dropped: what a drop costs.
const DROP_TIMEOUT: Duration = Duration::from_millis(300);
/// How long the suite waits for the datapath's flow of a probe to reach `weft policy
/// explain` (the agent reads the ring buffer asynchronously).
const FLOW_WAIT: Duration = Duration::from_secs(2);
/// The far host's TCP port (the `Outside` sink).
const FAR_PORT: u16 = 6000;

// === the table ===

/// One row: objects in force, optional relabelling, probes with expected verdicts.
struct Case {
    topic: &'static str,
    name: &'static str,
    /// Where the expected verdicts come from.
    source: &'static str,
    /// YAML documents of the case (replacing the previous case's).
    objects: Vec<String>,
    /// Pods (`ns/name`) with new labels for this case (restored afterwards).
    relabel: &'static [(&'static str, &'static [(&'static str, &'static str)])],
    /// Namespaces with new labels for this case (restored afterwards).
    namespaces: &'static [(&'static str, &'static [(&'static str, &'static str)])],
    /// `"<from> <to> <port>/<proto> ok|no"`: `from`/`to` are pods (`x/a`), or for `to` the
    /// outside hosts `far`, `far6`, `router`; protocols `tcp`, `udp`, `icmp` (IPv4) and
    /// `tcp6`, `udp6`, `icmp6` (IPv6); the port of ICMP is ignored (an echo request).
    probes: &'static [&'static str],
}

fn case(
    topic: &'static str,
    name: &'static str,
    source: &'static str,
    objects: Vec<String>,
    probes: &'static [&'static str],
) -> Case {
    Case {
        topic,
        name,
        source,
        objects,
        relabel: &[],
        namespaces: &[],
        probes,
    }
}

/// A `NetworkPolicy` named `name` in `namespace`; `spec` is YAML at column 0.
fn np(name: &str, namespace: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n{}",
        indent(spec)
    )
}

/// A `WeftNetworkPolicy`; `spec` is YAML at column 0.
fn wnp(name: &str, namespace: &str, spec: &str) -> String {
    policy_yaml(name, namespace, &indent(spec))
}

fn indent(spec: &str) -> String {
    spec.lines().fold(String::new(), |mut out, l| {
        let _ = writeln!(out, "  {l}");
        out
    })
}

// Upstream sources, cited by the cases.
const K8S_API: &str =
    "kubernetes.io/docs/reference/kubernetes-api/policy-resources/network-policy-v1";
const K8S_CONCEPTS: &str = "kubernetes.io/docs/concepts/services-networking/network-policies";
const K8S_DEFAULTS: &str =
    "kubernetes pkg/apis/networking/v1/defaults.go SetDefaults_NetworkPolicy";
const K8S_PORT_DEFAULTS: &str =
    "kubernetes pkg/apis/networking/v1/defaults.go SetDefaults_NetworkPolicyPort";
const E2E: &str = "kubernetes test/e2e/network/netpol/network_policy.go";
const CILIUM_L3: &str = "docs.cilium.io policy/language: Layer 3 examples";
const CILIUM_L4: &str = "docs.cilium.io policy/language: Layer 4 examples";
const CILIUM_DENY: &str = "docs.cilium.io policy/language: Deny Policies";
const CILIUM_ICMP: &str =
    "docs.cilium.io policy/language: ICMP/ICMPv6; cilium pkg/policy/api/icmp.go";
const WEFT_DESIGN: &str = "weft DESIGN.md, Policy: decisions where Cilium and Kubernetes differ";
const WEFT_README: &str = "weft agent/policy/README.md (implementation-defined points)";

const ALLOW_ALL_NS_X_INGRESS: &str = "podSelector: {}\ningress: [{}]\n";

#[allow(clippy::too_many_lines, reason = "the table")]
fn single_node_cases(subnet: u8) -> Vec<Case> {
    let only_a = "podSelector: {matchLabels: {pod: a}}\n";
    let from_b =
        format!("{only_a}ingress:\n- from: [{{podSelector: {{matchLabels: {{pod: b}}}}}}]\n");
    let mut cases = vec![
        // --- isolation and the API server's defaults ---
        case(
            "k8s isolation",
            "no policy: everything flows",
            K8S_CONCEPTS,
            vec![],
            &[
                "x/b x/a 80/tcp ok",
                "y/a x/a 81/udp ok",
                "x/a z/a 0/icmp ok",
                "z/a y/b 80/tcp6 ok",
            ],
        ),
        case(
            "k8s isolation",
            "default-deny-ingress",
            "e2e: should support a 'default-deny-ingress' policy",
            vec![np(
                "deny-in",
                "x",
                "podSelector: {}\npolicyTypes: [Ingress]\n",
            )],
            &[
                "x/b x/a 80/tcp no",
                "y/a x/b 80/tcp no",
                "x/c x/a 0/icmp no",
                "x/a y/a 80/tcp ok",
                "y/a y/b 81/udp ok",
            ],
        ),
        case(
            "k8s isolation",
            "default-deny-egress",
            "e2e: should deny egress from all pods in a namespace",
            vec![np(
                "deny-out",
                "x",
                "podSelector: {}\npolicyTypes: [Egress]\n",
            )],
            &[
                "x/a y/a 80/tcp no",
                "x/a x/b 80/tcp no",
                "x/a z/a 0/icmp no",
                "y/a x/a 80/tcp ok",
            ],
        ),
        case(
            "k8s isolation",
            "default-deny-all",
            "e2e: should support a 'default-deny-all' policy",
            vec![np(
                "deny-all",
                "x",
                "podSelector: {}\npolicyTypes: [Ingress, Egress]\n",
            )],
            &[
                "y/a x/a 80/tcp no",
                "x/a y/a 80/tcp no",
                "x/b x/c 81/udp no",
                "y/a y/b 80/tcp ok",
            ],
        ),
        case(
            "k8s isolation",
            "allow-all ingress ([{}])",
            K8S_CONCEPTS,
            vec![np("allow-in", "x", ALLOW_ALL_NS_X_INGRESS)],
            &[
                "y/a x/a 80/tcp ok",
                "z/a x/b 81/udp ok",
                "x/c x/a 0/icmp ok",
            ],
        ),
        case(
            "k8s isolation",
            "allow-all egress ([{}])",
            K8S_CONCEPTS,
            vec![np(
                "allow-out",
                "x",
                "podSelector: {}\npolicyTypes: [Egress]\negress: [{}]\n",
            )],
            &[
                "x/a y/a 80/tcp ok",
                "x/a z/a 0/icmp ok",
                "x/b y/b 81/udp ok",
            ],
        ),
        case(
            "k8s isolation",
            "ingress: [] isolates",
            K8S_API,
            vec![np("empty-in", "x", &format!("{only_a}ingress: []\n"))],
            &[
                "y/a x/a 80/tcp no",
                "x/b x/a 81/udp no",
                "y/a x/b 80/tcp ok",
            ],
        ),
        case(
            "k8s isolation",
            "an egress section defaults policyTypes to [Ingress, Egress]",
            K8S_DEFAULTS,
            vec![np(
                "a-out",
                "x",
                &format!("{only_a}egress:\n- to: [{{podSelector: {{matchLabels: {{pod: b}}}}}}]\n"),
            )],
            &[
                "x/a x/b 80/tcp ok",
                "x/a x/c 80/tcp no",
                "x/b x/a 80/tcp no",
            ],
        ),
        case(
            "k8s isolation",
            "an egress section under policyTypes [Ingress] has no effect",
            K8S_API,
            vec![np(
                "in-only",
                "x",
                &format!(
                    "{only_a}policyTypes: [Ingress]\ningress: [{{}}]\negress:\n- to: [{{podSelector: {{matchLabels: {{pod: b}}}}}}]\n"
                ),
            )],
            &[
                "x/a x/c 80/tcp ok",
                "x/a y/a 81/udp ok",
                "y/a x/a 80/tcp ok",
            ],
        ),
        case(
            "k8s isolation",
            "egress: [] adds no Egress type",
            K8S_DEFAULTS,
            vec![np(
                "no-out",
                "x",
                &format!("{only_a}ingress: [{{}}]\negress: []\n"),
            )],
            &["x/a y/a 80/tcp ok", "x/a x/b 0/icmp ok"],
        ),
        case(
            "k8s isolation",
            "policyTypes [Egress] with egress: [] denies all egress",
            K8S_API,
            vec![np(
                "out-none",
                "x",
                &format!("{only_a}policyTypes: [Egress]\negress: []\n"),
            )],
            &[
                "x/a x/b 80/tcp no",
                "x/a y/a 0/icmp no",
                "x/b x/a 80/tcp ok",
            ],
        ),
        case(
            "k8s isolation",
            "a podSelector matching no pod isolates nothing",
            K8S_API,
            vec![np(
                "nobody",
                "x",
                "podSelector: {matchLabels: {pod: nobody}}\ningress: []\n",
            )],
            &["x/b x/a 80/tcp ok", "y/a x/c 81/udp ok"],
        ),
        // --- peers ---
        case(
            "k8s peers",
            "podSelector: pods of the policy's namespace",
            "e2e: should enforce policy to allow traffic from pods within server namespace based on PodSelector",
            vec![np("from-b", "x", &from_b)],
            &[
                "x/b x/a 80/tcp ok",
                "x/c x/a 80/tcp no",
                "y/b x/a 80/tcp no",
            ],
        ),
        case(
            "k8s peers",
            "namespaceSelector",
            "e2e: should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector",
            vec![np(
                "from-y",
                "x",
                &format!(
                    "{only_a}ingress:\n- from: [{{namespaceSelector: {{matchLabels: {{ns: y}}}}}}]\n"
                ),
            )],
            &[
                "y/a x/a 80/tcp ok",
                "y/b x/a 81/udp ok",
                "x/b x/a 80/tcp no",
                "z/a x/a 80/tcp no",
            ],
        ),
        case(
            "k8s peers",
            "namespaceSelector {}: every namespace",
            K8S_API,
            vec![np(
                "from-all-ns",
                "x",
                &format!("{only_a}ingress:\n- from: [{{namespaceSelector: {{}}}}]\n"),
            )],
            &[
                "y/a x/a 80/tcp ok",
                "z/a x/a 80/tcp ok",
                "x/b x/a 80/tcp ok",
            ],
        ),
        case(
            "k8s peers",
            "namespaceSelector AND podSelector in one peer",
            "e2e: should enforce policy based on PodSelector and NamespaceSelector",
            vec![np(
                "and",
                "x",
                &format!(
                    "{only_a}ingress:\n- from: [{{namespaceSelector: {{matchLabels: {{ns: y}}}}, podSelector: {{matchLabels: {{pod: b}}}}}}]\n"
                ),
            )],
            &[
                "y/b x/a 80/tcp ok",
                "y/a x/a 80/tcp no",
                "x/b x/a 80/tcp no",
            ],
        ),
        case(
            "k8s peers",
            "namespaceSelector OR podSelector as two peers",
            "e2e: should enforce policy based on PodSelector or NamespaceSelector",
            vec![np(
                "or",
                "x",
                &format!(
                    "{only_a}ingress:\n- from:\n  - namespaceSelector: {{matchLabels: {{ns: y}}}}\n  - podSelector: {{matchLabels: {{pod: b}}}}\n"
                ),
            )],
            &[
                "y/a x/a 80/tcp ok",
                "x/b x/a 80/tcp ok",
                "x/c x/a 80/tcp no",
                "z/a x/a 80/tcp no",
            ],
        ),
        case(
            "k8s peers",
            "podSelector matchExpressions In",
            "e2e: should enforce policy based on PodSelector with MatchExpressions",
            vec![np(
                "in",
                "x",
                &format!(
                    "{only_a}ingress:\n- from: [{{podSelector: {{matchExpressions: [{{key: pod, operator: In, values: [b, c]}}]}}}}]\n"
                ),
            )],
            &[
                "x/b x/a 80/tcp ok",
                "x/c x/a 80/tcp ok",
                "y/b x/a 80/tcp no",
            ],
        ),
        case(
            "k8s peers",
            "podSelector matchExpressions NotIn",
            "e2e: should enforce policy based on PodSelector with MatchExpressions",
            vec![np(
                "notin",
                "x",
                &format!(
                    "{only_a}ingress:\n- from: [{{podSelector: {{matchExpressions: [{{key: pod, operator: NotIn, values: [b]}}]}}}}]\n"
                ),
            )],
            &["x/c x/a 80/tcp ok", "x/b x/a 80/tcp no"],
        ),
        case(
            "k8s peers",
            "namespaceSelector matchExpressions NotIn",
            "e2e: should enforce policy based on NamespaceSelector with MatchExpressions",
            vec![np(
                "ns-notin",
                "x",
                &format!(
                    "{only_a}ingress:\n- from: [{{namespaceSelector: {{matchExpressions: [{{key: ns, operator: NotIn, values: [x]}}]}}}}]\n"
                ),
            )],
            &[
                "y/a x/a 80/tcp ok",
                "z/a x/a 80/tcp ok",
                "x/b x/a 80/tcp no",
            ],
        ),
        case(
            "k8s peers",
            "namespaceSelector on kubernetes.io/metadata.name",
            "e2e: should enforce policy to allow traffic based on NamespaceSelector with MatchLabels using default ns label",
            vec![np(
                "by-name",
                "x",
                &format!(
                    "{only_a}ingress:\n- from: [{{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: z}}}}}}]\n"
                ),
            )],
            &["z/a x/a 80/tcp ok", "y/a x/a 80/tcp no"],
        ),
        case(
            "k8s peers",
            "podSelector matchExpressions DoesNotExist",
            K8S_API,
            vec![np(
                "dne",
                "x",
                &format!(
                    "{only_a}ingress:\n- from: [{{podSelector: {{matchExpressions: [{{key: role, operator: DoesNotExist}}]}}}}]\n"
                ),
            )],
            &["x/b x/a 80/tcp ok", "y/a x/a 80/tcp no"],
        ),
        case(
            "k8s peers",
            "egress to a pod of another namespace (AND)",
            "e2e: should enforce egress policy allowing traffic to a server in a different namespace based on PodSelector and NamespaceSelector",
            vec![np(
                "to-ya",
                "x",
                &format!(
                    "{only_a}policyTypes: [Egress]\negress:\n- to: [{{namespaceSelector: {{matchLabels: {{ns: y}}}}, podSelector: {{matchLabels: {{pod: a}}}}}}]\n"
                ),
            )],
            &[
                "x/a y/a 80/tcp ok",
                "x/a y/b 80/tcp no",
                "x/a x/b 80/tcp no",
            ],
        ),
        case(
            "k8s peers",
            "ingress and egress in one policy",
            "e2e: should work with Ingress, Egress specified together",
            vec![np(
                "both",
                "x",
                &format!(
                    "{only_a}ingress:\n- from: [{{podSelector: {{matchLabels: {{pod: b}}}}}}]\negress:\n- to: [{{podSelector: {{matchLabels: {{pod: b}}}}}}]\n"
                ),
            )],
            &[
                "x/b x/a 80/tcp ok",
                "x/c x/a 80/tcp no",
                "x/a x/b 81/udp ok",
                "x/a x/c 80/tcp no",
            ],
        ),
        // --- ports ---
        case(
            "k8s ports",
            "port 80 with protocol TCP",
            "e2e: should enforce policy based on Ports",
            vec![np(
                "p80",
                "x",
                &format!("{only_a}ingress:\n- ports: [{{port: 80, protocol: TCP}}]\n"),
            )],
            &[
                "x/b x/a 80/tcp ok",
                "x/b x/a 81/tcp no",
                "y/a x/a 80/udp no",
            ],
        ),
        case(
            "k8s ports",
            "port without protocol means TCP",
            K8S_PORT_DEFAULTS,
            vec![np(
                "p80-noproto",
                "x",
                &format!("{only_a}ingress:\n- ports: [{{port: 80}}]\n"),
            )],
            &["x/b x/a 80/tcp ok", "x/b x/a 80/udp no"],
        ),
        case(
            "k8s ports",
            "UDP port",
            "e2e: should not allow access by TCP when a policy specifies only UDP",
            vec![np(
                "u81",
                "x",
                &format!("{only_a}ingress:\n- ports: [{{port: 81, protocol: UDP}}]\n"),
            )],
            &[
                "x/b x/a 81/udp ok",
                "x/b x/a 81/tcp no",
                "x/b x/a 80/udp no",
            ],
        ),
        case(
            "k8s ports",
            "protocol without port: every port of that protocol",
            "e2e: should enforce ingress policy allowing any port traffic to a server on a specific protocol",
            vec![np(
                "udp-any",
                "x",
                &format!("{only_a}ingress:\n- ports: [{{protocol: UDP}}]\n"),
            )],
            &[
                "x/b x/a 80/udp ok",
                "y/a x/a 81/udp ok",
                "x/b x/a 80/tcp no",
            ],
        ),
        case(
            "k8s ports",
            "endPort range 80-81",
            "kubernetes API NetworkPolicyPort.endPort",
            vec![np(
                "range",
                "x",
                &format!("{only_a}ingress:\n- ports: [{{port: 80, endPort: 81, protocol: TCP}}]\n"),
            )],
            &[
                "x/b x/a 80/tcp ok",
                "x/b x/a 81/tcp ok",
                "x/b x/a 80/udp no",
            ],
        ),
        case(
            "k8s ports",
            "endPort range 79-80 excludes 81",
            K8S_API,
            vec![np(
                "range2",
                "x",
                &format!("{only_a}ingress:\n- ports: [{{port: 79, endPort: 80, protocol: TCP}}]\n"),
            )],
            &["x/b x/a 80/tcp ok", "x/b x/a 81/tcp no"],
        ),
        case(
            "k8s ports",
            "named port serve-80-tcp",
            "e2e: should allow ingress access on one named port",
            vec![np(
                "named80",
                "x",
                &format!("{only_a}ingress:\n- ports: [{{port: serve-80-tcp}}]\n"),
            )],
            &["x/b x/a 80/tcp ok", "x/b x/a 81/tcp no"],
        ),
        case(
            "k8s ports",
            "named UDP port serve-81-udp",
            "kubernetes API NetworkPolicyPort.port (named port, UDP)",
            vec![np(
                "named81u",
                "x",
                &format!("{only_a}ingress:\n- ports: [{{port: serve-81-udp, protocol: UDP}}]\n"),
            )],
            &[
                "x/b x/a 81/udp ok",
                "x/b x/a 80/udp no",
                "x/b x/a 81/tcp no",
            ],
        ),
        case(
            "k8s ports",
            "named egress port resolves through the destination's ports",
            "e2e: should allow egress access on one named port",
            vec![np(
                "named-out",
                "x",
                &format!(
                    "{only_a}policyTypes: [Egress]\negress:\n- ports: [{{port: serve-80-tcp}}]\n"
                ),
            )],
            &[
                "x/a x/b 80/tcp ok",
                "x/a y/a 80/tcp ok",
                "x/a x/b 81/tcp no",
            ],
        ),
        case(
            "k8s ports",
            "a port name no pod defines matches nothing",
            WEFT_README,
            vec![np(
                "named-none",
                "x",
                &format!("{only_a}ingress:\n- ports: [{{port: no-such-port}}]\n"),
            )],
            &["x/b x/a 80/tcp no", "x/b x/a 81/tcp no"],
        ),
        case(
            "k8s ports",
            "a rule with ports does not allow ICMP",
            WEFT_README,
            vec![np(
                "p80-icmp",
                "x",
                &format!("{only_a}ingress:\n- ports: [{{port: 80}}]\n"),
            )],
            &["x/b x/a 0/icmp no", "x/b x/a 80/tcp ok"],
        ),
        case(
            "k8s ports",
            "a rule without ports allows ICMP",
            WEFT_README,
            vec![np("from-b-icmp", "x", &from_b)],
            &["x/b x/a 0/icmp ok", "x/c x/a 0/icmp no"],
        ),
        case(
            "k8s ports",
            "several ports in one rule",
            K8S_API,
            vec![np(
                "multi",
                "x",
                &format!(
                    "{only_a}ingress:\n- ports: [{{port: 80, protocol: TCP}}, {{port: 81, protocol: UDP}}]\n"
                ),
            )],
            &[
                "x/b x/a 80/tcp ok",
                "x/b x/a 81/udp ok",
                "x/b x/a 81/tcp no",
            ],
        ),
        // --- stacked policies ---
        case(
            "k8s stacking",
            "two allows add up",
            "e2e: should enforce multiple, stacked policies with overlapping podSelectors",
            vec![
                np("from-b", "x", &from_b),
                np(
                    "from-y",
                    "x",
                    &format!(
                        "{only_a}ingress:\n- from: [{{namespaceSelector: {{matchLabels: {{ns: y}}}}}}]\n"
                    ),
                ),
            ],
            &[
                "x/b x/a 80/tcp ok",
                "y/a x/a 80/tcp ok",
                "x/c x/a 80/tcp no",
            ],
        ),
        case(
            "k8s stacking",
            "deny-all plus an allow",
            K8S_CONCEPTS,
            vec![
                np("deny-in", "x", "podSelector: {}\npolicyTypes: [Ingress]\n"),
                np("from-b", "x", &from_b),
            ],
            &[
                "x/b x/a 80/tcp ok",
                "x/c x/a 80/tcp no",
                "x/a x/b 80/tcp no",
            ],
        ),
        case(
            "k8s stacking",
            "allow-all ingress takes precedence",
            "e2e: should enforce multiple ingress policies with ingress allow-all policy taking precedence",
            vec![
                np(
                    "p80",
                    "x",
                    &format!("{only_a}ingress:\n- ports: [{{port: 80}}]\n"),
                ),
                np("allow-in", "x", ALLOW_ALL_NS_X_INGRESS),
            ],
            &["x/c x/a 81/tcp ok", "y/a x/a 81/udp ok"],
        ),
        case(
            "k8s stacking",
            "allow-all egress takes precedence",
            "e2e: should enforce multiple egress policies with egress allow-all policy taking precedence",
            vec![
                np(
                    "out80",
                    "x",
                    &format!("{only_a}egress:\n- ports: [{{port: 80}}]\n"),
                ),
                np(
                    "allow-out",
                    "x",
                    &format!("{only_a}policyTypes: [Egress]\negress: [{{}}]\n"),
                ),
            ],
            &["x/a x/c 81/tcp ok", "x/a y/a 81/udp ok"],
        ),
        case(
            "k8s stacking",
            "a policy of another namespace does not select x's pods",
            K8S_API,
            vec![np("deny-y", "y", "podSelector: {}\ningress: []\n")],
            &[
                "x/b x/a 80/tcp ok",
                "x/a y/a 80/tcp no",
                "y/b y/a 80/tcp no",
            ],
        ),
        // --- updates, deletes, relabelling ---
        case(
            "k8s updates",
            "an allow on port 80",
            "e2e: should enforce updated policy",
            vec![np(
                "upd",
                "x",
                &format!(
                    "{only_a}ingress:\n- from: [{{podSelector: {{matchLabels: {{pod: b}}}}}}]\n  ports: [{{port: 80}}]\n"
                ),
            )],
            &["x/b x/a 80/tcp ok", "x/b x/a 81/tcp no"],
        ),
        case(
            "k8s updates",
            "the same policy updated to port 81",
            "e2e: should enforce updated policy",
            vec![np(
                "upd",
                "x",
                &format!(
                    "{only_a}ingress:\n- from: [{{podSelector: {{matchLabels: {{pod: b}}}}}}]\n  ports: [{{port: 81}}]\n"
                ),
            )],
            &["x/b x/a 81/tcp ok", "x/b x/a 80/tcp no"],
        ),
        case(
            "k8s updates",
            "the same policy updated to another peer",
            "e2e: should enforce updated policy",
            vec![np(
                "upd",
                "x",
                &format!(
                    "{only_a}ingress:\n- from: [{{podSelector: {{matchLabels: {{pod: c}}}}}}]\n"
                ),
            )],
            &["x/c x/a 80/tcp ok", "x/b x/a 81/tcp no"],
        ),
        case(
            "k8s updates",
            "the policy deleted: traffic flows again",
            "e2e: should stop enforcing policies after they are deleted",
            vec![],
            &[
                "x/b x/a 80/tcp ok",
                "x/b x/a 81/tcp ok",
                "y/a x/a 0/icmp ok",
            ],
        ),
        Case {
            relabel: &[("x/c", &[("pod", "b")])],
            ..case(
                "k8s updates",
                "a peer relabelled into the allowed set",
                "e2e: should allow ingress access from updated pod",
                vec![np("from-b", "x", &from_b)],
                &["x/c x/a 80/tcp ok", "x/b x/a 80/tcp ok"],
            )
        },
        case(
            "k8s updates",
            "and relabelled back",
            "e2e: should allow ingress access from updated pod",
            vec![np("from-b", "x", &from_b)],
            &["x/c x/a 80/tcp no", "x/b x/a 80/tcp ok"],
        ),
        Case {
            relabel: &[("x/a", &[("pod", "a"), ("isolated", "yes")])],
            ..case(
                "k8s updates",
                "a pod relabelled into a deny-all policy",
                "e2e: should deny ingress access to updated pod",
                vec![np(
                    "iso",
                    "x",
                    "podSelector: {matchLabels: {isolated: \"yes\"}}\ningress: []\n",
                )],
                &["x/b x/a 80/tcp no", "x/b x/c 80/tcp ok"],
            )
        },
        Case {
            namespaces: &[("y", &[("ns", "y"), ("team", "blue")])],
            ..case(
                "k8s updates",
                "a namespace relabelled into the allowed set",
                "e2e: should allow ingress access from updated namespace",
                vec![np(
                    "from-blue",
                    "x",
                    &format!(
                        "{only_a}ingress:\n- from: [{{namespaceSelector: {{matchLabels: {{team: blue}}}}}}]\n"
                    ),
                )],
                &["y/a x/a 80/tcp ok", "z/a x/a 80/tcp no"],
            )
        },
        case(
            "k8s updates",
            "and relabelled back",
            "e2e: should allow ingress access from updated namespace",
            vec![np(
                "from-blue",
                "x",
                &format!(
                    "{only_a}ingress:\n- from: [{{namespaceSelector: {{matchLabels: {{team: blue}}}}}}]\n"
                ),
            )],
            &["y/a x/a 80/tcp no"],
        ),
        // --- IPv6 ---
        case(
            "k8s ipv6",
            "podSelector over IPv6",
            K8S_CONCEPTS,
            vec![np("from-b", "x", &from_b)],
            &[
                "x/b x/a 80/tcp6 ok",
                "x/c x/a 80/tcp6 no",
                "x/c x/a 81/udp6 no",
            ],
        ),
        case(
            "k8s ipv6",
            "default deny ingress over ICMPv6",
            K8S_CONCEPTS,
            vec![np(
                "deny-in",
                "x",
                "podSelector: {}\npolicyTypes: [Ingress]\n",
            )],
            &["y/a x/a 0/icmp6 no", "x/a y/a 0/icmp6 ok"],
        ),
        case(
            "k8s ipv6",
            "namespaceSelector over IPv6",
            K8S_CONCEPTS,
            vec![np(
                "from-y",
                "x",
                &format!(
                    "{only_a}ingress:\n- from: [{{namespaceSelector: {{matchLabels: {{ns: y}}}}}}]\n"
                ),
            )],
            &["y/b x/a 81/udp6 ok", "z/a x/a 80/tcp6 no"],
        ),
        // --- weft policies and NetworkPolicy on one pod ---
        case(
            "mixed",
            "a weft deny beats a NetworkPolicy allow",
            CILIUM_DENY,
            vec![
                np("allow-in", "x", ALLOW_ALL_NS_X_INGRESS),
                wnp(
                    "deny-c",
                    "x",
                    "endpointSelector: {matchLabels: {pod: a}}\ningressDeny:\n- fromEndpoints: [{matchLabels: {pod: c}}]\n",
                ),
            ],
            &[
                "x/c x/a 80/tcp no",
                "x/b x/a 80/tcp ok",
                "x/c x/b 80/tcp ok",
            ],
        ),
        case(
            "mixed",
            "allows of both kinds add up",
            WEFT_DESIGN,
            vec![
                np("from-b", "x", &from_b),
                wnp(
                    "from-c",
                    "x",
                    "endpointSelector: {matchLabels: {pod: a}}\ningress:\n- fromEndpoints: [{matchLabels: {pod: c}}]\n",
                ),
            ],
            &[
                "x/b x/a 80/tcp ok",
                "x/c x/a 81/udp ok",
                "y/a x/a 80/tcp no",
            ],
        ),
        case(
            "mixed",
            "a weft port without protocol is any protocol",
            WEFT_DESIGN,
            vec![wnp(
                "w80",
                "x",
                "endpointSelector: {matchLabels: {pod: a}}\ningress:\n- toPorts: [{ports: [{port: \"80\"}]}]\n",
            )],
            &[
                "x/b x/a 80/tcp ok",
                "x/b x/a 80/udp ok",
                "x/b x/a 81/udp no",
            ],
        ),
        case(
            "mixed",
            "a NetworkPolicy port without protocol is TCP",
            WEFT_DESIGN,
            vec![np(
                "n80",
                "x",
                &format!("{only_a}ingress:\n- ports: [{{port: 80}}]\n"),
            )],
            &["x/b x/a 80/tcp ok", "x/b x/a 80/udp no"],
        ),
        case(
            "mixed",
            "NetworkPolicy egress isolation opened by a weft egress allow",
            WEFT_DESIGN,
            vec![
                np("out-none", "x", &format!("{only_a}policyTypes: [Egress]\n")),
                wnp(
                    "to-b",
                    "x",
                    "endpointSelector: {matchLabels: {pod: a}}\negress:\n- toEndpoints: [{matchLabels: {pod: b}}]\n",
                ),
            ],
            &["x/a x/b 80/tcp ok", "x/a x/c 80/tcp no"],
        ),
        case(
            "mixed",
            "a weft deny-only policy isolates",
            WEFT_DESIGN,
            vec![wnp(
                "deny-only",
                "x",
                "endpointSelector: {matchLabels: {pod: a}}\ningressDeny:\n- fromEndpoints: [{matchLabels: {pod: c}}]\n",
            )],
            &["x/c x/a 80/tcp no", "x/b x/a 80/tcp no"],
        ),
        case(
            "mixed",
            "an audit weft policy never changes the enforced verdict",
            "weft issue 11 item 6; cilium#9580",
            vec![
                np("from-b", "x", &from_b),
                wnp(
                    "audit-c",
                    "x",
                    "endpointSelector: {matchLabels: {pod: a}}\nenforcement: audit\ningress:\n- fromEndpoints: [{matchLabels: {pod: c}}]\n",
                ),
            ],
            &["x/b x/a 80/tcp ok", "x/c x/a 80/tcp no"],
        ),
        case(
            "mixed",
            "a weft deny naming weft.io/namespace reaches another namespace",
            WEFT_DESIGN,
            vec![
                np(
                    "from-y",
                    "x",
                    &format!(
                        "{only_a}ingress:\n- from: [{{namespaceSelector: {{matchLabels: {{ns: y}}}}}}]\n"
                    ),
                ),
                wnp(
                    "deny-yb",
                    "x",
                    "endpointSelector: {matchLabels: {pod: a}}\ningressDeny:\n- fromEndpoints: [{matchLabels: {pod: b, weft.io/namespace: y}}]\n",
                ),
            ],
            &["y/b x/a 80/tcp no", "y/a x/a 80/tcp ok"],
        ),
        // --- weft L3/L4 language ---
        case(
            "weft l3/l4",
            "fromEndpoints with a TCP port",
            CILIUM_L4,
            vec![wnp(
                "l4",
                "x",
                "endpointSelector: {matchLabels: {pod: a}}\ningress:\n- fromEndpoints: [{matchLabels: {pod: b}}]\n  toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]\n",
            )],
            &[
                "x/b x/a 80/tcp ok",
                "x/b x/a 81/tcp no",
                "x/b x/a 0/icmp no",
                "x/c x/a 80/tcp no",
            ],
        ),
        case(
            "weft l3/l4",
            "endPort range",
            CILIUM_L4,
            vec![wnp(
                "range",
                "x",
                "endpointSelector: {matchLabels: {pod: a}}\ningress:\n- toPorts: [{ports: [{port: \"80\", endPort: 81, protocol: TCP}]}]\n",
            )],
            &["x/b x/a 81/tcp ok", "x/b x/a 81/udp no"],
        ),
        case(
            "weft l3/l4",
            "fromEndpoints [{}] with an ingressDeny",
            CILIUM_DENY,
            vec![wnp(
                "ns-but-c",
                "x",
                "endpointSelector: {matchLabels: {pod: a}}\ningress:\n- fromEndpoints: [{}]\ningressDeny:\n- fromEndpoints: [{matchLabels: {pod: c}}]\n",
            )],
            &[
                "x/c x/a 80/tcp no",
                "x/b x/a 80/tcp ok",
                "y/a x/a 80/tcp no",
            ],
        ),
        case(
            "weft l3/l4",
            "egressDeny beats an egress allow",
            CILIUM_DENY,
            vec![wnp(
                "out-but-b",
                "x",
                "endpointSelector: {matchLabels: {pod: a}}\negress:\n- toEndpoints: [{}]\negressDeny:\n- toEndpoints: [{matchLabels: {pod: b}}]\n",
            )],
            &["x/a x/b 80/tcp no", "x/a x/c 80/tcp ok"],
        ),
        case(
            "weft l3/l4",
            "a rule without toPorts allows every protocol",
            CILIUM_L3,
            vec![wnp(
                "l3",
                "x",
                "endpointSelector: {matchLabels: {pod: a}}\ningress:\n- fromEndpoints: [{matchLabels: {pod: b}}]\n",
            )],
            &[
                "x/b x/a 0/icmp ok",
                "x/b x/a 81/udp ok",
                "x/c x/a 0/icmp no",
            ],
        ),
        // --- ICMP types by name ---
        case(
            "weft icmp",
            "EchoRequest by name (IPv4)",
            CILIUM_ICMP,
            vec![wnp(
                "echo",
                "x",
                "endpointSelector: {matchLabels: {pod: a}}\ningress:\n- icmps: [{fields: [{type: EchoRequest, family: IPv4}]}]\n",
            )],
            &[
                "x/b x/a 0/icmp ok",
                "x/b x/a 80/tcp no",
                "x/b x/a 0/icmp6 no",
            ],
        ),
        case(
            "weft icmp",
            "EchoRequest by number",
            CILIUM_ICMP,
            vec![wnp(
                "echo8",
                "x",
                "endpointSelector: {matchLabels: {pod: a}}\ningress:\n- icmps: [{fields: [{type: 8, family: IPv4}]}]\n",
            )],
            &["x/b x/a 0/icmp ok", "x/b x/a 81/udp no"],
        ),
        case(
            "weft icmp",
            "EchoRequest by name (IPv6)",
            CILIUM_ICMP,
            vec![wnp(
                "echo6",
                "x",
                "endpointSelector: {matchLabels: {pod: a}}\ningress:\n- icmps: [{fields: [{type: EchoRequest, family: IPv6}]}]\n",
            )],
            &["x/b x/a 0/icmp6 ok", "x/b x/a 0/icmp no"],
        ),
        case(
            "weft icmp",
            "EchoReply does not allow an echo request",
            CILIUM_ICMP,
            vec![wnp(
                "reply",
                "x",
                "endpointSelector: {matchLabels: {pod: a}}\ningress:\n- icmps: [{fields: [{type: EchoReply, family: IPv4}]}]\n",
            )],
            &["x/b x/a 0/icmp no"],
        ),
        case(
            "weft icmp",
            "egress EchoRequest by name",
            CILIUM_ICMP,
            vec![wnp(
                "echo-out",
                "x",
                "endpointSelector: {matchLabels: {pod: a}}\negress:\n- toEndpoints: [{matchLabels: {pod: b}}]\n  icmps: [{fields: [{type: EchoRequest}]}]\n",
            )],
            &[
                "x/a x/b 0/icmp ok",
                "x/a x/b 80/tcp no",
                "x/a x/c 0/icmp no",
            ],
        ),
        // --- weft named ports ---
        case(
            "weft named ports",
            "toPorts with a named TCP port",
            "docs.cilium.io policy/language: named ports",
            vec![wnp(
                "named",
                "x",
                "endpointSelector: {matchLabels: {pod: a}}\ningress:\n- toPorts: [{ports: [{port: serve-80-tcp}]}]\n",
            )],
            &["x/b x/a 80/tcp ok", "x/b x/a 81/tcp no"],
        ),
        case(
            "weft named ports",
            "toPorts with a named UDP port",
            "docs.cilium.io policy/language: named ports",
            vec![wnp(
                "named-u",
                "x",
                "endpointSelector: {matchLabels: {pod: a}}\ningress:\n- toPorts: [{ports: [{port: serve-81-udp}]}]\n",
            )],
            &["x/b x/a 81/udp ok", "x/b x/a 81/tcp no"],
        ),
        case(
            "weft named ports",
            "a named port with another protocol matches nothing",
            WEFT_README,
            vec![wnp(
                "named-mismatch",
                "x",
                "endpointSelector: {matchLabels: {pod: a}}\ningress:\n- toPorts: [{ports: [{port: serve-80-tcp, protocol: UDP}]}]\n",
            )],
            &["x/b x/a 80/tcp no", "x/b x/a 80/udp no"],
        ),
        case(
            "weft named ports",
            "egress to a named port of the destination",
            WEFT_README,
            vec![wnp(
                "named-out",
                "x",
                "endpointSelector: {matchLabels: {pod: a}}\negress:\n- toEndpoints: [{matchLabels: {pod: b}}]\n  toPorts: [{ports: [{port: serve-81-tcp}]}]\n",
            )],
            &["x/a x/b 81/tcp ok", "x/a x/b 80/tcp no"],
        ),
    ];
    cases.extend(ip_block_cases(subnet));
    cases
}

/// `ipBlock` and `toCIDR`: the outside network (`Outside`: router 10.201.S.1, far host
/// 10.201.S.2, and their IPv6 twins).
fn ip_block_cases(s: u8) -> Vec<Case> {
    let only_a = "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Egress]\n";
    vec![
        case(
            "k8s ipBlock",
            "egress to a CIDR block",
            "e2e: should allow egress access to server in CIDR block",
            vec![np(
                "to-far",
                "x",
                &format!("{only_a}egress:\n- to: [{{ipBlock: {{cidr: 10.201.0.0/16}}}}]\n"),
            )],
            &[
                "x/a far 6000/tcp ok",
                "x/a router 0/icmp ok",
                "x/a x/b 80/tcp no",
            ],
        ),
        case(
            "k8s ipBlock",
            "except carves a host out",
            "e2e: should enforce except clause while egress access to server in CIDR block",
            vec![np(
                "to-far-except",
                "x",
                &format!(
                    "{only_a}egress:\n- to: [{{ipBlock: {{cidr: 10.201.0.0/16, except: [10.201.{s}.2/32]}}}}]\n"
                ),
            )],
            &["x/a far 6000/tcp no", "x/a router 0/icmp ok"],
        ),
        case(
            "k8s ipBlock",
            "an address in one block's except and another block is allowed",
            "e2e: should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed",
            vec![np(
                "overlap",
                "x",
                &format!(
                    "{only_a}egress:\n- to: [{{ipBlock: {{cidr: 10.201.0.0/16, except: [10.201.{s}.0/24]}}}}]\n- to: [{{ipBlock: {{cidr: 10.201.{s}.2/32}}}}]\n"
                ),
            )],
            &["x/a far 6000/tcp ok", "x/a router 0/icmp no"],
        ),
        case(
            "k8s ipBlock",
            "an ipBlock over pod addresses does not match pods",
            WEFT_README,
            vec![np(
                "to-pods-cidr",
                "x",
                &format!("{only_a}egress:\n- to: [{{ipBlock: {{cidr: 100.64.0.0/10}}}}]\n"),
            )],
            &["x/a x/b 80/tcp no", "x/a far 6000/tcp no"],
        ),
        case(
            "k8s ipBlock",
            "an ipBlock with a port",
            K8S_API,
            vec![np(
                "to-far-port",
                "x",
                &format!(
                    "{only_a}egress:\n- to: [{{ipBlock: {{cidr: 10.201.0.0/16}}}}]\n  ports: [{{port: 6000}}]\n"
                ),
            )],
            &["x/a far 6000/tcp ok", "x/a router 0/icmp no"],
        ),
        case(
            "k8s ipBlock",
            "an IPv6 block",
            K8S_API,
            vec![np(
                "to-far6",
                "x",
                &format!("{only_a}egress:\n- to: [{{ipBlock: {{cidr: \"fd00:201::/32\"}}}}]\n"),
            )],
            &["x/a far6 6000/tcp ok", "x/a far 6000/tcp no"],
        ),
        case(
            "weft l3/l4",
            "toCIDR",
            CILIUM_L3,
            vec![wnp(
                "cidr",
                "x",
                "endpointSelector: {matchLabels: {pod: a}}\negress:\n- toCIDR: [10.201.0.0/16]\n",
            )],
            &["x/a far 6000/tcp ok", "x/a far6 6000/tcp no"],
        ),
    ]
}

/// Cases across two nodes: x/a and x/c on node 0, x/b and y/a on node 1.
fn cluster_cases() -> Vec<Case> {
    let only_a = "podSelector: {matchLabels: {pod: a}}\n";
    vec![
        case(
            "cross-node",
            "no policy",
            K8S_CONCEPTS,
            vec![],
            &["x/b x/a 80/tcp ok", "x/a y/a 81/udp ok"],
        ),
        case(
            "cross-node",
            "podSelector across nodes",
            "e2e: should enforce policy to allow traffic from pods within server namespace based on PodSelector",
            vec![np(
                "from-b",
                "x",
                &format!(
                    "{only_a}ingress:\n- from: [{{podSelector: {{matchLabels: {{pod: b}}}}}}]\n"
                ),
            )],
            &[
                "x/b x/a 80/tcp ok",
                "x/c x/a 80/tcp no",
                "y/a x/a 80/tcp no",
            ],
        ),
        case(
            "cross-node",
            "default deny egress on the remote pod",
            "e2e: should deny egress from pods based on PodSelector",
            vec![np(
                "deny-out-b",
                "x",
                "podSelector: {matchLabels: {pod: b}}\npolicyTypes: [Egress]\n",
            )],
            &["x/b x/a 80/tcp no", "x/a x/b 80/tcp ok"],
        ),
        case(
            "cross-node",
            "namespaceSelector across nodes",
            "e2e: should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector",
            vec![np(
                "from-y",
                "x",
                &format!(
                    "{only_a}ingress:\n- from: [{{namespaceSelector: {{matchLabels: {{ns: y}}}}}}]\n"
                ),
            )],
            &["y/a x/a 80/tcp6 ok", "x/b x/a 80/tcp no"],
        ),
        case(
            "cross-node",
            "a weft deny beats a NetworkPolicy allow across nodes",
            CILIUM_DENY,
            vec![
                np("allow-in", "x", ALLOW_ALL_NS_X_INGRESS),
                wnp(
                    "deny-b",
                    "x",
                    "endpointSelector: {matchLabels: {pod: a}}\ningressDeny:\n- fromEndpoints: [{matchLabels: {pod: b}}]\n",
                ),
            ],
            &["x/b x/a 80/tcp no", "x/c x/a 80/tcp ok"],
        ),
    ]
}

// === the world the cases run in ===

/// The pods of the suite: `ns/pod` -> (namespace, name, labels, node index).
const PODS: &[(&str, &str, &str)] = &[
    ("x", "a", "xa"),
    ("x", "b", "xb"),
    ("x", "c", "xc"),
    ("y", "a", "ya"),
    ("y", "b", "yb"),
    ("z", "a", "za"),
];

/// The container ports every pod has, named as the Kubernetes e2e test pods name theirs.
const CONTAINER_PORTS: &[(&str, u16, &str)] = &[
    ("serve-80-tcp", 80, "TCP"),
    ("serve-81-tcp", 81, "TCP"),
    ("serve-80-udp", 80, "UDP"),
    ("serve-81-udp", 81, "UDP"),
];

struct World<'a> {
    nodes: Vec<&'a Node>,
    /// `ns/pod` -> (pod, index of its node).
    pods: BTreeMap<String, (&'a Pod, usize)>,
    outside: Option<&'a Outside>,
    source_dir: std::path::PathBuf,
    /// What each source file holds now: unchanged files are not written again.
    written: std::cell::RefCell<BTreeMap<String, String>>,
}

fn namespaces_yaml(overrides: &[(&str, &[(&str, &str)])]) -> String {
    let mut out = String::new();
    for ns in ["x", "y", "z"] {
        let labels: Vec<(&str, &str)> = overrides
            .iter()
            .find(|(n, _)| *n == ns)
            .map_or_else(|| vec![("ns", ns)], |(_, l)| l.to_vec());
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n"
        );
        for (k, v) in labels {
            let _ = writeln!(out, "    {k}: {v}");
        }
    }
    out
}

/// The router's address on the far link: the far host's with host part 1.
fn router_far_side(far: IpAddr) -> IpAddr {
    match far {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            IpAddr::from([a, b, c, 1])
        }
        IpAddr::V6(_) => far,
    }
}

fn spawn_servers(pod: &Pod) {
    pod.spawn_tcp_echo(80);
    pod.spawn_tcp_echo(81);
    pod.spawn_udp_echo(80);
    pod.spawn_udp_echo(81);
}

fn default_labels(pod: &str) -> Vec<(&str, &str)> {
    vec![("pod", pod)]
}

/// Write a file into the shared source directory atomically (temp name, then rename).
fn write_source(dir: &std::path::Path, file: &str, yaml: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, yaml).expect("write source file");
    std::fs::rename(&tmp, dir.join(file)).expect("rename source file");
}

/// One probe of the table, parsed.
struct ProbeSpec<'s> {
    text: &'s str,
    from: &'s str,
    to: &'s str,
    port: u16,
    protocol: &'s str,
    v6: bool,
    expect: bool,
}

fn parse_probe(text: &str) -> ProbeSpec<'_> {
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [from, to, port_proto, verdict] = parts[..] else {
        panic!("bad probe {text:?}");
    };
    let (port, proto) = port_proto.split_once('/').expect("port/proto");
    let (protocol, v6) = match proto.strip_suffix('6') {
        Some(p) => (p, true),
        None => (proto, false),
    };
    ProbeSpec {
        text,
        from,
        to,
        port: port.parse().expect("port"),
        protocol,
        v6,
        expect: match verdict {
            "ok" => true,
            "no" => false,
            other => panic!("bad verdict {other:?} in {text:?}"),
        },
    }
}

/// What one topic's run found.
#[derive(Default)]
struct Tally {
    cases: usize,
    cases_passed: usize,
    probes: usize,
    probes_passed: usize,
    explain_agreed: usize,
    /// Probes whose flow did not reach `weft policy explain` in time (not compared).
    explain_unobserved: usize,
}

impl World<'_> {
    fn pod(&self, name: &str) -> (&Pod, usize) {
        *self
            .pods
            .get(name)
            .unwrap_or_else(|| panic!("no pod {name} in this world"))
    }

    fn address(&self, end: &str, v6: bool) -> IpAddr {
        let outside = || self.outside.expect("this case needs the outside network");
        match end {
            "far" => outside().far_v4,
            "far6" => outside().far_v6,
            "router" => router_far_side(outside().far_v4),
            pod => {
                let (p, _) = self.pod(pod);
                if v6 { p.ipv6 } else { p.ipv4 }
            }
        }
    }

    /// Write `file` unless it already holds `yaml`.
    fn write_once(&self, file: &str, yaml: &str) -> bool {
        let mut written = self.written.borrow_mut();
        if written.get(file).is_some_and(|w| w == yaml) {
            return false;
        }
        written.insert(file.to_owned(), yaml.to_owned());
        true
    }

    fn apply_case(&self, case: &Case) {
        let dir = &self.source_dir;
        let objects = case.objects.join("---\n");
        if self.write_once("case.yaml", &objects) {
            if objects.is_empty() {
                let _ = std::fs::remove_file(dir.join("case.yaml"));
            } else {
                write_source(dir, "case.yaml", &objects);
            }
        }
        let namespaces = namespaces_yaml(case.namespaces);
        if self.write_once("namespaces.yaml", &namespaces) {
            write_source(dir, "namespaces.yaml", &namespaces);
        }
        for (ns_pod, (pod, _)) in &self.pods {
            let label = ns_pod.split_once('/').map_or("", |(_, p)| p);
            let labels = case
                .relabel
                .iter()
                .find(|(n, _)| n == ns_pod)
                .map_or_else(|| default_labels(label), |(_, l)| l.to_vec());
            if self.write_once(&format!("endpoint {ns_pod}"), &format!("{labels:?}")) {
                pod.update_endpoint(&labels, CONTAINER_PORTS);
            }
        }
        for node in &self.nodes {
            node.policy_wait();
        }
    }

    /// Probe once; `true` when the connection (or the echo) went through.
    fn probe(&self, p: &ProbeSpec<'_>) -> bool {
        let (from, _) = self.pod(p.from);
        let to = self.address(p.to, p.v6);
        let timeout = if p.expect { PASS_TIMEOUT } else { DROP_TIMEOUT };
        match (p.protocol, p.to) {
            ("tcp", "far" | "far6") => from.tcp_connect(to, p.port, timeout).is_ok(),
            ("tcp", _) => from.tcp_probe(to, p.port, timeout),
            ("udp", _) => from.udp_probe(to, p.port, timeout),
            ("icmp", _) => from.ping_within(to, timeout),
            (other, _) => panic!("unknown protocol {other} in {:?}", p.text),
        }
    }

    /// `weft policy explain` on every node that enforces a direction of the probe: its
    /// verdict (all hops) and whether the datapath agreed, disagreed or was not seen.
    fn explain(&self, p: &ProbeSpec<'_>) -> Result<(bool, bool), String> {
        let from = self.address(p.from, p.v6);
        let to = self.address(p.to, p.v6);
        let port = match p.protocol {
            "icmp" if p.v6 => "128/icmpv6".to_owned(),
            "icmp" => "8/icmp".to_owned(),
            proto => format!("{}/{proto}", p.port),
        };
        let (_, src_node) = self.pod(p.from);
        let mut nodes = vec![src_node];
        if let Some((_, dst_node)) = self.pods.get(p.to)
            && *dst_node != src_node
        {
            nodes.push(*dst_node);
        }
        let mut allowed = true;
        let mut observed = false;
        for node in nodes {
            if !allowed {
                break; // dropped before it reached this node
            }
            let args = [
                "policy",
                "explain",
                "--from",
                &from.to_string(),
                "--to",
                &to.to_string(),
                "--port",
                &port,
            ];
            let deadline = Instant::now() + FLOW_WAIT;
            let report: Value = loop {
                let report = self.nodes[node].weft_json(&args);
                if report["datapath"]["agreement"] != "no-recent-flows"
                    || Instant::now() >= deadline
                {
                    break report;
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            match report["datapath"]["agreement"].as_str() {
                Some("disagrees") => {
                    return Err(format!(
                        "explain on {} disagrees with the datapath: {}",
                        self.nodes[node].name(),
                        report["datapath"]["message"]
                    ));
                }
                Some("agrees") => observed = true,
                _ => {}
            }
            allowed &= report["verdict"] == "allowed";
        }
        Ok((allowed, observed))
    }

    fn run(
        &self,
        cases: &[Case],
        tallies: &mut BTreeMap<&'static str, Tally>,
        failures: &mut Vec<String>,
    ) {
        for case in cases {
            self.apply_case(case);
            let tally = tallies.entry(case.topic).or_default();
            tally.cases += 1;
            let mut case_ok = true;
            for text in case.probes {
                let p = parse_probe(text);
                tally.probes += 1;
                let got = self.probe(&p);
                let mut ok = got == p.expect;
                if !ok {
                    failures.push(format!(
                        "[{}] {}: {text}: the connection {} ({})",
                        case.topic,
                        case.name,
                        if got { "passed" } else { "was dropped" },
                        case.source
                    ));
                }
                match self.explain(&p) {
                    Err(e) => {
                        ok = false;
                        failures.push(format!("[{}] {}: {text}: {e}", case.topic, case.name));
                    }
                    Ok((allowed, observed)) => {
                        if allowed == got {
                            if observed {
                                tally.explain_agreed += 1;
                            } else {
                                tally.explain_unobserved += 1;
                                println!("unobserved: [{}] {}: {text}", case.topic, case.name);
                            }
                        } else {
                            ok = false;
                            failures.push(format!(
                                "[{}] {}: {text}: weft policy explain says {}, the connection {}",
                                case.topic,
                                case.name,
                                if allowed { "allowed" } else { "dropped" },
                                if got { "passed" } else { "was dropped" },
                            ));
                        }
                    }
                }
                if ok {
                    tally.probes_passed += 1;
                }
                case_ok &= ok;
            }
            if case_ok {
                tally.cases_passed += 1;
            }
        }
    }
}

fn print_table(tallies: &BTreeMap<&'static str, Tally>, elapsed: Duration) {
    println!("\n(cases citing \"e2e:\" name tests of {E2E})");
    println!(
        "\n{:<18} {:>6} {:>7} {:>7} {:>8} {:>16} {:>12}",
        "TOPIC", "CASES", "PASSED", "PROBES", "PASSED", "EXPLAIN AGREED", "UNOBSERVED"
    );
    let mut total = Tally::default();
    for (topic, t) in tallies {
        println!(
            "{:<18} {:>6} {:>7} {:>7} {:>8} {:>16} {:>12}",
            topic,
            t.cases,
            t.cases_passed,
            t.probes,
            t.probes_passed,
            t.explain_agreed,
            t.explain_unobserved
        );
        total.cases += t.cases;
        total.cases_passed += t.cases_passed;
        total.probes += t.probes;
        total.probes_passed += t.probes_passed;
        total.explain_agreed += t.explain_agreed;
        total.explain_unobserved += t.explain_unobserved;
    }
    println!(
        "{:<18} {:>6} {:>7} {:>7} {:>8} {:>16} {:>12}   ({:.1}s)",
        "TOTAL",
        total.cases,
        total.cases_passed,
        total.probes,
        total.probes_passed,
        total.explain_agreed,
        total.explain_unobserved,
        elapsed.as_secs_f64()
    );
}

#[test]
fn network_policy_conformance_on_the_real_datapath() {
    if skip_unless_privileged("network_policy_conformance_on_the_real_datapath") {
        return;
    }
    let started = Instant::now();
    let across = cluster_cases();
    let mut tallies = BTreeMap::new();
    let mut failures = Vec::new();
    {
        let prefix = TestPrefix::new();
        let node = Node::start(&prefix, "n1");
        let single = single_node_cases(node.subnet_index());
        assert!(
            single.len() + across.len() >= 80,
            "the suite has at least 80 cases ({} + {})",
            single.len(),
            across.len()
        );
        write_source(node.source_dir(), "namespaces.yaml", &namespaces_yaml(&[]));
        let pods: Vec<Pod> = PODS
            .iter()
            .map(|(ns, label, name)| node.add_pod(name, ns, &default_labels(label)))
            .collect();
        for pod in &pods {
            spawn_servers(pod);
        }
        let mut outside = Outside::attach(&node);
        outside.spawn_tcp_sink(FAR_PORT);
        let world = World {
            nodes: vec![&node],
            pods: PODS
                .iter()
                .zip(&pods)
                .map(|((ns, label, _), pod)| (format!("{ns}/{label}"), (pod, 0)))
                .collect(),
            outside: Some(&outside),
            source_dir: node.source_dir().to_path_buf(),
            written: std::cell::RefCell::default(),
        };
        world.run(&single, &mut tallies, &mut failures);
    }
    {
        let prefix = TestPrefix::new();
        let cluster = Cluster::start(&prefix, &ClusterOptions::default());
        write_source(
            cluster.source_dir(),
            "namespaces.yaml",
            &namespaces_yaml(&[]),
        );
        let placed: &[(&str, &str, &str, usize)] = &[
            ("x", "a", "xa", 0),
            ("x", "c", "xc", 0),
            ("x", "b", "xb", 1),
            ("y", "a", "ya", 1),
        ];
        let pods: Vec<Pod> = placed
            .iter()
            .map(|(ns, label, name, n)| cluster.node(*n).add_pod(name, ns, &default_labels(label)))
            .collect();
        for pod in &pods {
            spawn_servers(pod);
        }
        let world = World {
            nodes: cluster.nodes().iter().collect(),
            pods: placed
                .iter()
                .zip(&pods)
                .map(|((ns, label, _, n), pod)| (format!("{ns}/{label}"), (pod, *n)))
                .collect(),
            outside: None,
            source_dir: cluster.source_dir().to_path_buf(),
            written: std::cell::RefCell::default(),
        };
        world.run(&across, &mut tallies, &mut failures);
    }
    print_table(&tallies, started.elapsed());
    assert!(
        failures.is_empty(),
        "{} probe(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
