//! The wire model: the weft custom resources (`WeftNetworkPolicy`, `WeftClusterwideNetworkPolicy`)
//! and the local-source objects (`Endpoint`, `Node`), exactly as users write them in YAML.
//!
//! This module owns the serde/schemars shape only. It must not interpret rules: validation and
//! compilation into the resolved form live in `parse`, semantics in `resolve`. Spec types reject
//! unknown fields so that a typo (`fromEndpoint`) is an error naming the field, not a silently
//! ignored rule.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

/// API group of every weft object.
pub const GROUP: &str = "weft.io";
/// API version of every weft object in this release.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` as written in YAML.
pub const API_VERSION: &str = "weft.io/v1alpha1";

// === policies ===

/// Which endpoints the policy applies to, and its allow and deny rules per direction.
///
/// A section that is present, even as an empty list (`ingress: []`), isolates the selected
/// endpoints in that direction (default deny); a missing section leaves the direction alone.
/// (Rust: the spec of `WeftNetworkPolicy`, namespaced, short name `wnp`.)
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "weft.io",
    version = "v1alpha1",
    kind = "WeftNetworkPolicy",
    plural = "weftnetworkpolicies",
    shortname = "wnp",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    doc = "Identity-based L3/L4/L7 network policy for the endpoints of one namespace"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySpec {
    /// Free text shown by `weft policy get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Endpoints this policy applies to. In a namespaced policy, only endpoints of the policy's
    /// namespace are ever selected.
    pub endpoint_selector: LabelSelector,
    /// `enforce` (default) drops what the policy denies; `audit` only reports would-be drops.
    #[serde(default)]
    pub enforcement: Enforcement,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<IngressRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_deny: Option<Vec<IngressDenyRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<EgressRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_deny: Option<Vec<EgressDenyRule>>,
}

/// Spec of a `WeftClusterwideNetworkPolicy` (cluster-scoped, short name `wcnp`): the same
/// fields as `PolicySpec`, with selectors that are not limited to one namespace.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "weft.io",
    version = "v1alpha1",
    kind = "WeftClusterwideNetworkPolicy",
    plural = "weftclusterwidenetworkpolicies",
    shortname = "wcnp",
    status = "PolicyStatus",
    derive = "PartialEq",
    doc = "Identity-based L3/L4/L7 network policy for endpoints of every namespace"
)]
#[serde(transparent)]
pub struct ClusterwidePolicySpec(pub PolicySpec);

/// Status written by the Kubernetes source: whether the policy was accepted.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<PolicyCondition>,
}

/// A `status.conditions` entry (same shape as `metav1.Condition`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyCondition {
    /// `Valid`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Enforcement {
    #[default]
    Enforce,
    /// Dry run: flows the policy would drop are reported as such and passed.
    Audit,
}

/// A Kubernetes label selector: all `matchLabels` and all `matchExpressions` must hold.
/// The empty selector selects everything in its scope.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    /// Required (non-empty) for `In`/`NotIn`, must be empty for `Exists`/`DoesNotExist`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// Named groups of peers (Cilium's entities).
#[derive(
    Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq, PartialOrd, Ord, Hash,
)]
#[serde(rename_all = "kebab-case")]
pub enum Entity {
    /// Everything outside the cluster: the `world` identity and every CIDR identity.
    World,
    /// Every pod of the cluster plus the host, remote nodes and the other reserved identities.
    Cluster,
    /// The local node.
    Host,
    /// Other nodes of the cluster.
    RemoteNode,
    /// Any peer at all (the wildcard identity).
    All,
    Health,
    Init,
    Unmanaged,
    KubeApiserver,
}

/// `{cidr, except}`: the addresses of `cidr` minus those of every `except` prefix.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CidrRule {
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum Protocol {
    TCP,
    UDP,
    SCTP,
    ICMP,
    ICMPv6,
    /// TCP, UDP and SCTP when a port is given (ports never allow ICMP).
    #[default]
    ANY,
}

/// One port (or range `port..=endPort`) and protocol. `port` is a decimal string (an integer
/// is accepted too); `"0"` or no port means every port.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortProtocol {
    #[serde(
        default,
        deserialize_with = "string_or_int",
        skip_serializing_if = "Option::is_none"
    )]
    pub port: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i64>,
    /// Absent means `ANY`, as in Cilium.
    #[serde(default)]
    pub protocol: Protocol,
}

/// Accepts `port: "80"` and `port: 80` alike.
fn string_or_int<'de, D: Deserializer<'de>>(de: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        S(String),
        I(i64),
    }
    Ok(Option::<Raw>::deserialize(de)?.map(|raw| match raw {
        Raw::S(s) => s,
        Raw::I(i) => i.to_string(),
    }))
}

/// Ports of an allow rule, with optional L7 rules that apply to exactly these ports.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortRule {
    /// Empty means every port of TCP, UDP and SCTP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortProtocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<L7Rules>,
}

/// Ports of a deny rule (deny rules carry no L7 rules).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortDenyRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortProtocol>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L7Rules {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpRule>,
}

/// One HTTP allow rule; every field given must match. `method`, `path` and `host` are regular
/// expressions matched against the whole value; a header is `"Name"` (present) or
/// `"Name: value"` (a value equal to `value`, as Cilium's exact header match).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IcmpRule {
    pub fields: Vec<IcmpField>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IcmpField {
    /// ICMP (or `ICMPv6`) message type: a number 0..=255 or, as Cilium accepts, its CamelCase
    /// name in Cilium's list for the family (`EchoRequest`, `EchoReply`, `PacketTooBig`, ...).
    #[serde(rename = "type")]
    pub type_: IcmpType,
    #[serde(default)]
    pub family: IcmpFamily,
}

/// An ICMP type as written: `type: 8`, `type: "8"` or `type: EchoRequest` (Kubernetes
/// int-or-string, as Cilium's `ICMPField.Type`). Checked against the family by `parse`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum IcmpType {
    Number(i64),
    Name(String),
}

impl Default for IcmpType {
    fn default() -> Self {
        IcmpType::Number(0)
    }
}

impl From<u8> for IcmpType {
    fn from(t: u8) -> Self {
        IcmpType::Number(i64::from(t))
    }
}

impl JsonSchema for IcmpType {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "IcmpType".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        int_or_string_schema()
    }

    fn inline_schema() -> bool {
        true
    }
}

/// `x-kubernetes-int-or-string`: the structural-schema way to say "a number or a string"
/// (without `anyOf`, which kube's structural rewrite would empty).
fn int_or_string_schema() -> schemars::Schema {
    schemars::json_schema!({
        "x-kubernetes-int-or-string": true
    })
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum IcmpFamily {
    #[default]
    IPv4,
    IPv6,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Authentication {
    pub mode: AuthMode,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// SPIFFE mTLS between the two identities before traffic passes.
    Required,
    #[default]
    Disabled,
}

/// Allow rule for traffic entering the selected endpoints. Peers are the union of every
/// `from*` field; a rule with no `from*` field at all allows every peer.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_endpoints: Vec<LabelSelector>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_entities: Vec<Entity>,
    #[serde(default, rename = "fromCIDR", skip_serializing_if = "Vec::is_empty")]
    pub from_cidr: Vec<String>,
    #[serde(default, rename = "fromCIDRSet", skip_serializing_if = "Vec::is_empty")]
    pub from_cidr_set: Vec<CidrRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_ports: Vec<PortRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub icmps: Vec<IcmpRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Authentication>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressDenyRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_endpoints: Vec<LabelSelector>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_entities: Vec<Entity>,
    #[serde(default, rename = "fromCIDR", skip_serializing_if = "Vec::is_empty")]
    pub from_cidr: Vec<String>,
    #[serde(default, rename = "fromCIDRSet", skip_serializing_if = "Vec::is_empty")]
    pub from_cidr_set: Vec<CidrRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_ports: Vec<PortDenyRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub icmps: Vec<IcmpRule>,
}

/// Allow rule for traffic leaving the selected endpoints. Peers are the union of every `to*`
/// field; a rule with no `to*` field at all allows every peer.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_endpoints: Vec<LabelSelector>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_entities: Vec<Entity>,
    #[serde(default, rename = "toCIDR", skip_serializing_if = "Vec::is_empty")]
    pub to_cidr: Vec<String>,
    #[serde(default, rename = "toCIDRSet", skip_serializing_if = "Vec::is_empty")]
    pub to_cidr_set: Vec<CidrRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_ports: Vec<PortRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub icmps: Vec<IcmpRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Authentication>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressDenyRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_endpoints: Vec<LabelSelector>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_entities: Vec<Entity>,
    #[serde(default, rename = "toCIDR", skip_serializing_if = "Vec::is_empty")]
    pub to_cidr: Vec<String>,
    #[serde(default, rename = "toCIDRSet", skip_serializing_if = "Vec::is_empty")]
    pub to_cidr_set: Vec<CidrRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_ports: Vec<PortDenyRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub icmps: Vec<IcmpRule>,
}

// === local-source objects ===

/// A pod, as the local source describes it (`kind: Endpoint`). `metadata.name` is the pod name.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[kube(
    group = "weft.io",
    version = "v1alpha1",
    kind = "Endpoint",
    namespaced,
    derive = "PartialEq",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSpec {
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// Node the pod runs on; absent means the local node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Pod addresses, needed for pods on other nodes (local pods report theirs through CNI).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpAddr>,
    /// The pod's container ports, as a Pod spec lists them: named ones are what
    /// `port: http` in a `NetworkPolicy` or a weft `toPorts` entry resolves through.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
}

/// One container port of a pod (`name`, `containerPort`, `protocol`), as in a Pod's
/// `spec.containers[].ports[]`. `parse` checks the name (an IANA service name, unique in the
/// pod) and the port (1-65535).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `containerPort` as in a Pod; `port` is accepted as a shorter spelling.
    #[serde(alias = "port")]
    pub container_port: i64,
    /// `TCP` when absent, as the API server defaults it.
    #[serde(default)]
    pub protocol: ContainerProtocol,
}

/// The protocols a container port can have.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum ContainerProtocol {
    #[default]
    TCP,
    UDP,
    SCTP,
}

impl ContainerProtocol {
    /// The IP protocol number.
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            ContainerProtocol::TCP => crate::ports::IPPROTO_TCP,
            ContainerProtocol::UDP => crate::ports::IPPROTO_UDP,
            ContainerProtocol::SCTP => crate::ports::IPPROTO_SCTP,
        }
    }
}

impl Endpoint {
    #[must_use]
    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }

    /// The namespace (`default` once parsed; the parser fills it in).
    #[must_use]
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    /// The pod's named ports (see [`crate::ports::named_ports`]).
    #[must_use]
    pub fn named_ports(&self) -> crate::ports::NamedPorts {
        crate::ports::named_ports(&self.spec.ports)
    }

    /// The labels that decide this pod's identity, given its namespace's labels.
    #[must_use]
    pub fn security_labels(
        &self,
        namespace_labels: &crate::labels::Labels,
    ) -> crate::labels::Labels {
        crate::labels::security_labels(
            &self.metadata.labels.clone().unwrap_or_default(),
            self.namespace(),
            &self.spec.service_account,
            namespace_labels,
        )
    }
}

fn default_service_account() -> String {
    "default".to_string()
}

/// A node of the cluster, as the local source describes it (`kind: Node`, group weft.io).
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[kube(
    group = "weft.io",
    version = "v1alpha1",
    kind = "Node",
    derive = "PartialEq",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpAddr>,
    #[serde(default, rename = "podCIDRs", skip_serializing_if = "Vec::is_empty")]
    pub pod_cidrs: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_public_key: Option<String>,
}

/// A namespace (`apiVersion: v1`, `kind: Namespace`).
pub use k8s_openapi::api::core::v1::Namespace;

// === CRD generation ===

/// The CRDs of the weft policy kinds as YAML documents, `(file stem, yaml)`, for
/// `cargo xtask gen-crds` (which writes them to `crds/`).
///
/// # Errors
/// Only if `serde_yaml` fails to serialize a CRD, which would be a bug.
pub fn crd_yamls() -> Result<Vec<(&'static str, String)>, serde_yaml::Error> {
    Ok(vec![
        (
            "weftnetworkpolicies.weft.io",
            serde_yaml::to_string(&WeftNetworkPolicy::crd())?,
        ),
        (
            "weftclusterwidenetworkpolicies.weft.io",
            serde_yaml::to_string(&WeftClusterwideNetworkPolicy::crd())?,
        ),
    ])
}

impl WeftClusterwideNetworkPolicy {
    /// The policy fields shared with [`WeftNetworkPolicy`].
    #[must_use]
    pub fn policy_spec(&self) -> &PolicySpec {
        &self.spec.0
    }
}
