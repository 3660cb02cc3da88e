//! Kubernetes `networking.k8s.io/v1` `NetworkPolicy`: its wire form (a serde mirror of exactly
//! the API's schema, rejecting unknown fields, which `k8s-openapi`'s types silently drop), the
//! API server's defaulting and validation, and its translation into the compiled [`Policy`]
//! model that weft policies compile into, so one resolver and one datapath enforce both.
//!
//! Owns the meaning of a `NetworkPolicy` and nothing else: no selection, no identities. The
//! translation, field by field, as the API documents it:
//!
//! - `podSelector` selects pods of the policy's namespace; `{}` (or absent) selects all of them.
//! - `policyTypes` decides isolation, after the API server's defaulting
//!   (`SetDefaults_NetworkPolicy`, kubernetes `pkg/apis/networking/v1/defaults.go`): unset or
//!   empty means `[Ingress]`, plus `Egress` when the policy has at least one egress rule (an
//!   `egress: []` adds nothing, as `len(spec.Egress) != 0` reads). A direction in
//!   `policyTypes` is isolated even with no rules; rules of a direction not in `policyTypes`
//!   have no effect (accepted, with a warning in the `Enforced` condition).
//! - A rule matches a peer if any of its `from`/`to` entries does; within an entry,
//!   `podSelector` and `namespaceSelector` must both hold. `podSelector` alone means pods of the policy's namespace; `namespaceSelector`
//!   alone means every pod of the selected namespaces (`{}`: of every namespace), never an
//!   address outside the cluster. Namespace selectors match the namespace's labels, which
//!   pods carry as `weft.io/ns.<key>` (`kubernetes.io/metadata.name` included).
//! - A rule with no (or an empty) `from`/`to` matches every peer, inside the cluster or not.
//! - `ipBlock` (`cidr` minus `except`) matches addresses outside the cluster's pods and nodes
//!   only: the **weft decision** (as Cilium), where Kubernetes lets a block cover pod IPs too
//!   ("implementation-defined"). Select pods with selectors; an ipBlock over the pod CIDR
//!   allows nothing inside the cluster.
//! - A rule matches a port if any `ports` entry does; `protocol` defaults to TCP (`SetDefaults_NetworkPolicyPort`);
//!   `port` is a number, a range up to `endPort`, or a named container port of the pods the
//!   rule applies to (resolved by `resolve`); an entry with only a protocol is every port of
//!   it. A rule with no `ports` matches every protocol, ICMP included; a rule with ports
//!   matches only those (weft's decision for ICMP, which the API leaves open, as weft rules do).
//! - Policies add up: their allows are a union; weft deny rules beat them (deny always wins).
//! - The node reaches its own pods whatever the policy ("traffic from the pod's local node"
//!   is always allowed, in the API's words): `ResolveOptions::allow_host_ingress`.

use std::collections::BTreeSet;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use crate::labels::{IGNORED_POD_LABELS, NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX};
use crate::model::{Enforcement, LabelSelector};
use crate::parse::{
    DEFAULT_NAMESPACE, FieldProblem, IANA_SVC_NAME_HINT, Problems, ValidationError,
};
use crate::ports::{
    IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, PortPrefix, is_iana_svc_name, range_to_prefixes,
};
use crate::repository::{
    CidrSelector, L4, L4Match, NamedPortMatch, Peers, Policy, PolicyId, PolicyKind, Rule, Section,
    WrittenSpec,
};
use crate::selector::{Requirement, Selector};

/// `apiVersion` of a `NetworkPolicy`.
pub const API_VERSION: &str = "networking.k8s.io/v1";

// === wire form ===

/// A `NetworkPolicy` object as written (`apiVersion`, `kind`, `metadata`, `spec`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicy {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: NetworkPolicySpec,
    /// Accepted and ignored, as the API server ignores it on create: Kubernetes 1.24-1.27 had
    /// a (never used) `status`, and `kubectl get -o yaml` of those clusters prints
    /// `status: {}`.
    #[serde(default, skip_serializing)]
    pub status: Option<serde::de::IgnoredAny>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicySpec {
    /// Pods of the policy's namespace it applies to; absent or `{}` = all of them.
    #[serde(default)]
    pub pod_selector: LabelSelector,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<NetworkPolicyIngressRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<NetworkPolicyEgressRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_types: Vec<PolicyType>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub enum PolicyType {
    Ingress,
    Egress,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicyIngressRule {
    /// Sources (any of them); empty or absent = every source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<NetworkPolicyPeer>,
    /// Ports (any of them); empty or absent = every port of every protocol.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<NetworkPolicyPort>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicyEgressRule {
    /// Destinations (any of them); empty or absent = every destination.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<NetworkPolicyPeer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<NetworkPolicyPort>,
}

/// One peer: `podSelector` and/or `namespaceSelector` (both must hold), or `ipBlock` alone.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicyPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpBlock {
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicyPort {
    /// `TCP` when absent (the API server's default; [`with_defaults`] fills it in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<NetworkPolicyProtocol>,
    /// A number or a container port name; absent = every port of the protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<IntOrString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i64>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub enum NetworkPolicyProtocol {
    TCP,
    UDP,
    SCTP,
}

impl NetworkPolicyProtocol {
    fn number(self) -> u8 {
        match self {
            NetworkPolicyProtocol::TCP => IPPROTO_TCP,
            NetworkPolicyProtocol::UDP => IPPROTO_UDP,
            NetworkPolicyProtocol::SCTP => IPPROTO_SCTP,
        }
    }
}

/// Kubernetes `IntOrString`: `port: 80` or `port: http`. A quoted number (`"80"`) is a
/// string, hence a port *name*, and invalid, exactly as the API server sees it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

// === defaulting ===

/// The spec with the defaults the API server fills in: `policyTypes` (`[Ingress]`, plus
/// `Egress` when there are egress rules, when unset or empty) and `protocol: TCP` on every
/// port. The local source applies this so that both sources mean the same object.
#[must_use]
pub fn with_defaults(spec: &NetworkPolicySpec) -> NetworkPolicySpec {
    let mut out = spec.clone();
    if out.policy_types.is_empty() {
        out.policy_types.push(PolicyType::Ingress);
        if !out.egress.is_empty() {
            out.policy_types.push(PolicyType::Egress);
        }
    }
    let ports = out
        .ingress
        .iter_mut()
        .flat_map(|r| r.ports.iter_mut())
        .chain(out.egress.iter_mut().flat_map(|r| r.ports.iter_mut()));
    for p in ports {
        p.protocol.get_or_insert(NetworkPolicyProtocol::TCP);
    }
    out
}

// === validation and translation ===

/// Validate and translate a `NetworkPolicy` as the Kubernetes source receives it (the
/// `k8s-openapi` type, which kube's watchers yield), through the same wire mirror and checks
/// as a file's.
///
/// # Errors
/// Every problem found, with field paths.
pub fn compile_api_network_policy(
    np: &k8s_openapi::api::networking::v1::NetworkPolicy,
) -> Result<Policy, ValidationError> {
    let object = format!(
        "NetworkPolicy {}/{}",
        np.metadata
            .namespace
            .as_deref()
            .unwrap_or(DEFAULT_NAMESPACE),
        np.metadata.name.as_deref().unwrap_or_default()
    );
    let fail = |problem: FieldProblem| ValidationError {
        object: object.clone(),
        problems: vec![problem],
    };
    let value = serde_yaml::to_value(np).map_err(|e| {
        fail(FieldProblem {
            field: String::new(),
            message: format!("cannot read the object: {e}"),
            hint: None,
        })
    })?;
    let mut wire: NetworkPolicy = crate::parse::typed(value).map_err(fail)?;
    wire.metadata
        .namespace
        .get_or_insert_with(|| DEFAULT_NAMESPACE.into());
    compile_network_policy(&wire)
}

/// Validate (as the API server's `ValidateNetworkPolicy` does) and translate a `NetworkPolicy`.
/// Its namespace must be set (the local source sets `default` when missing).
///
/// # Errors
/// Every problem found, each with its field path (`spec.ingress[0].from[0].ipBlock.cidr`).
pub fn compile_network_policy(np: &NetworkPolicy) -> Result<Policy, ValidationError> {
    let namespace = np
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    let name = np.metadata.name.clone().unwrap_or_default();
    let id = PolicyId {
        kind: PolicyKind::NetworkPolicy,
        namespace: Some(namespace.clone()),
        name: name.clone(),
    };
    let mut problems = Problems::default();
    let mut warnings = Vec::new();
    if !is_dns1123_subdomain(&name) {
        problems.push(
            "metadata.name",
            format!("{name:?} is not a valid NetworkPolicy name"),
            Some("a lowercase DNS-1123 subdomain: a-z, 0-9, '-' and '.', starting and ending with a letter or digit"),
        );
    }
    let spec = with_defaults(&np.spec);
    let subject = k8s_selector(
        &mut problems,
        &mut warnings,
        "spec.podSelector",
        &spec.pod_selector,
    )
    .unwrap_or_default()
    .scoped_to(&namespace);
    if spec.policy_types.len() > 2 {
        problems.push(
            "spec.policyTypes",
            "may not specify more than two policyTypes",
            Some("write [Ingress], [Egress] or [Ingress, Egress]"),
        );
    }
    let ingress_on = spec.policy_types.contains(&PolicyType::Ingress);
    let egress_on = spec.policy_types.contains(&PolicyType::Egress);
    for (on, rules, section, other) in [
        (ingress_on, spec.ingress.len(), "ingress", "Ingress"),
        (egress_on, spec.egress.len(), "egress", "Egress"),
    ] {
        if !on && rules > 0 {
            warnings.push(FieldProblem {
                field: format!("spec.{section}"),
                message: format!(
                    "has no effect: policyTypes {:?} does not include {other}",
                    spec.policy_types
                ),
                hint: Some(format!(
                    "add {other} to policyTypes to enforce these rules, or remove them"
                )),
            });
        }
    }
    let mut cx = Cx {
        problems: &mut problems,
        warnings: &mut warnings,
        namespace: &namespace,
    };
    let ingress: Vec<Rule> = spec
        .ingress
        .iter()
        .enumerate()
        .map(|(i, r)| cx.rule(Section::Ingress, i, &r.from, &r.ports))
        .collect();
    let egress: Vec<Rule> = spec
        .egress
        .iter()
        .enumerate()
        .map(|(i, r)| cx.rule(Section::Egress, i, &r.to, &r.ports))
        .collect();
    problems.into_result(&id.to_string())?;
    let mut sections = std::collections::BTreeMap::new();
    if ingress_on {
        sections.insert(Section::Ingress, ingress);
    }
    if egress_on {
        sections.insert(Section::Egress, egress);
    }
    Ok(Policy {
        id,
        enforcement: Enforcement::Enforce,
        subject,
        sections,
        spec: WrittenSpec::NetworkPolicy(spec),
        warnings,
    })
}

/// What translating one policy's rules needs.
struct Cx<'a> {
    problems: &'a mut Problems,
    warnings: &'a mut Vec<FieldProblem>,
    namespace: &'a str,
}

impl Cx<'_> {
    fn rule(
        &mut self,
        section: Section,
        index: usize,
        peers: &[NetworkPolicyPeer],
        ports: &[NetworkPolicyPort],
    ) -> Rule {
        let base = format!("spec.{}[{index}]", section.field());
        let peer_field = match section {
            Section::Ingress | Section::IngressDeny => "from",
            Section::Egress | Section::EgressDeny => "to",
        };
        let mut out = Peers {
            any: peers.is_empty(),
            ..Peers::default()
        };
        for (j, peer) in peers.iter().enumerate() {
            self.peer(&format!("{base}.{peer_field}[{j}]"), peer, &mut out);
        }
        let mut named = BTreeSet::new();
        let l4 = if ports.is_empty() {
            L4::Any
        } else {
            let mut matches = BTreeSet::new();
            for (j, p) in ports.iter().enumerate() {
                self.port(&format!("{base}.ports[{j}]"), p, &mut matches, &mut named);
            }
            L4::Ports(matches.into_iter().collect())
        };
        Rule {
            section,
            index,
            peers: out,
            l4,
            named_ports: named.into_iter().collect(),
            auth_required: false,
            http: Vec::new(),
        }
    }

    fn peer(&mut self, field: &str, peer: &NetworkPolicyPeer, out: &mut Peers) {
        let selectors = usize::from(peer.pod_selector.is_some())
            + usize::from(peer.namespace_selector.is_some());
        match (&peer.ip_block, selectors) {
            (None, 0) => self.problems.push(
                field,
                "must specify a peer",
                Some("give a podSelector, a namespaceSelector (or both), or an ipBlock; a rule with no from/to at all matches every peer"),
            ),
            (Some(_), 1..) => self.problems.push(
                field,
                "may not specify both ipBlock and another peer",
                Some("an ipBlock stands alone; put the selectors in a peer of their own"),
            ),
            (Some(block), 0) => {
                if let Some(c) = self.ip_block(&format!("{field}.ipBlock"), block) {
                    out.cidrs.push(c);
                }
            }
            (None, _) => {
                let pods = peer.pod_selector.as_ref().map(|s| {
                    k8s_selector(
                        self.problems,
                        self.warnings,
                        &format!("{field}.podSelector"),
                        s,
                    )
                });
                let namespaces = peer.namespace_selector.as_ref().map(|s| {
                    k8s_selector(
                        self.problems,
                        self.warnings,
                        &format!("{field}.namespaceSelector"),
                        s,
                    )
                });
                let mut requirements = Vec::new();
                match pods {
                    Some(Some(s)) => requirements.extend(s.requirements),
                    Some(None) => return,
                    None => {}
                }
                match namespaces {
                    Some(Some(s)) => {
                        requirements.extend(s.requirements.into_iter().map(namespace_requirement));
                    }
                    Some(None) => return,
                    // podSelector alone: pods of the policy's own namespace.
                    None => requirements.push(Requirement::In(
                        NAMESPACE_LABEL.into(),
                        BTreeSet::from([self.namespace.to_string()]),
                    )),
                }
                out.endpoints.push(Selector { requirements });
            }
        }
    }

    fn ip_block(&mut self, field: &str, block: &IpBlock) -> Option<CidrSelector> {
        let cidr = self.cidr(&format!("{field}.cidr"), &block.cidr)?;
        let mut except = Vec::new();
        for (k, e) in block.except.iter().enumerate() {
            let efield = format!("{field}.except[{k}]");
            let Some(enet) = self.cidr(&efield, e) else {
                continue;
            };
            if cidr.contains(&enet) && enet.prefix_len() > cidr.prefix_len() {
                except.push(enet);
            } else {
                self.problems.push(
                    efield,
                    format!("{e:?} must be a strict subset of cidr {cidr}"),
                    Some("an except prefix carves addresses out of its cidr: inside it and longer"),
                );
            }
        }
        Some(CidrSelector { cidr, except })
    }

    fn cidr(&mut self, field: &str, text: &str) -> Option<IpNet> {
        if text.is_empty() {
            self.problems.push(field, "is required", None);
            return None;
        }
        // A CIDR, not a bare address; host bits are ignored, as the API server's sloppy parse.
        if let Ok(net) = text.parse::<IpNet>() {
            Some(net.trunc())
        } else {
            self.problems.push(
                field,
                format!("{text:?} is not a valid CIDR"),
                Some("write an address prefix like 10.0.0.0/8 or 2001:db8::/64 (with the /length)"),
            );
            None
        }
    }

    fn port(
        &mut self,
        field: &str,
        p: &NetworkPolicyPort,
        matches: &mut BTreeSet<L4Match>,
        named: &mut BTreeSet<NamedPortMatch>,
    ) {
        let protocol = p.protocol.unwrap_or(NetworkPolicyProtocol::TCP).number();
        let port = match &p.port {
            None => {
                if p.end_port.is_some() {
                    self.problems.push(
                        format!("{field}.endPort"),
                        "may not be specified when `port` is not specified",
                        None,
                    );
                    return;
                }
                matches.insert(L4Match {
                    protocol,
                    port: PortPrefix::ANY,
                    l7: None,
                });
                return;
            }
            Some(IntOrString::String(name)) => {
                if p.end_port.is_some() {
                    self.problems.push(
                        format!("{field}.endPort"),
                        "may not be specified when `port` is non-numeric",
                        None,
                    );
                }
                if is_iana_svc_name(name) {
                    named.insert(NamedPortMatch {
                        name: name.clone(),
                        protocol,
                        l7: None,
                    });
                } else {
                    let hint = if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
                        "a quoted number is a port name; write the number without quotes"
                    } else {
                        IANA_SVC_NAME_HINT
                    };
                    self.problems.push(
                        format!("{field}.port"),
                        format!("{name:?} is not a valid port name"),
                        Some(hint),
                    );
                }
                return;
            }
            Some(IntOrString::Int(n)) => {
                if let Some(port) = valid_port(*n) {
                    port
                } else {
                    self.problems.push(
                        format!("{field}.port"),
                        format!("{n} is not a valid port number (1-65535)"),
                        Some("omit port to allow every port of the protocol"),
                    );
                    return;
                }
            }
        };
        let end = match p.end_port {
            None => port,
            Some(e) => match valid_port(e) {
                Some(end) if end >= port => end,
                Some(_) => {
                    self.problems.push(
                        format!("{field}.endPort"),
                        format!("{e} must be greater than or equal to `port` ({port})"),
                        None,
                    );
                    return;
                }
                None => {
                    self.problems.push(
                        format!("{field}.endPort"),
                        format!("{e} is not a valid port number (1-65535)"),
                        None,
                    );
                    return;
                }
            },
        };
        for prefix in range_to_prefixes(port, end) {
            matches.insert(L4Match {
                protocol,
                port: prefix,
                l7: None,
            });
        }
    }
}

fn valid_port(n: i64) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

/// A namespace selector's requirement, turned into one on the pod's copy of its namespace's
/// labels (`team` -> `weft.io/ns.team`). Every pod carries all of its namespace's labels, so
/// `NotIn`/`DoesNotExist` keep their meaning.
fn namespace_requirement(r: Requirement) -> Requirement {
    let key = |k: String| format!("{NAMESPACE_LABELS_PREFIX}{k}");
    match r {
        Requirement::In(k, v) => Requirement::In(key(k), v),
        Requirement::NotIn(k, v) => Requirement::NotIn(key(k), v),
        Requirement::Exists(k) => Requirement::Exists(key(k)),
        Requirement::DoesNotExist(k) => Requirement::DoesNotExist(key(k)),
    }
}

/// A Kubernetes label selector, checked as `ValidateLabelSelector` does (keys are qualified
/// names, values label values, operators consistent with their values), compiled.
fn k8s_selector(
    problems: &mut Problems,
    warnings: &mut Vec<FieldProblem>,
    field: &str,
    wire: &LabelSelector,
) -> Option<Selector> {
    let before = problems.0.len();
    for (k, v) in &wire.match_labels {
        let f = format!("{field}.matchLabels");
        check_key(problems, &f, k);
        if !is_label_value(v) {
            problems.push(
                f,
                format!("{v:?} (label {k}) is not a valid label value"),
                Some(LABEL_VALUE_HINT),
            );
        }
    }
    for (i, e) in wire.match_expressions.iter().enumerate() {
        let f = format!("{field}.matchExpressions[{i}]");
        check_key(problems, &format!("{f}.key"), &e.key);
        for (j, v) in e.values.iter().enumerate() {
            if !is_label_value(v) {
                problems.push(
                    format!("{f}.values[{j}]"),
                    format!("{v:?} is not a valid label value"),
                    Some(LABEL_VALUE_HINT),
                );
            }
        }
    }
    if problems.0.len() > before {
        return None;
    }
    match Selector::compile(wire) {
        Ok(s) => {
            for key in IGNORED_POD_LABELS {
                if s.names_key(key) && !field.ends_with("namespaceSelector") {
                    warnings.push(FieldProblem {
                        field: field.to_string(),
                        message: format!(
                            "label {key} changes with every rollout and is not part of a pod's identity in weft (as in Cilium): this selector matches no pod"
                        ),
                        hint: Some("select on the workload's own labels (app, tier, ...)".into()),
                    });
                }
            }
            Some(s)
        }
        Err(e) => {
            problems.push(format!("{field}.{}", e.field), e.message, None);
            None
        }
    }
}

const LABEL_VALUE_HINT: &str = "at most 63 characters a-z, A-Z, 0-9, '-', '_' and '.', starting and ending with a letter or digit";

fn check_key(problems: &mut Problems, field: &str, key: &str) {
    if !is_qualified_name(key) {
        problems.push(
            field,
            format!("{key:?} is not a valid label key"),
            Some("a name of at most 63 characters a-z, A-Z, 0-9, '-', '_', '.' (starting and ending with a letter or digit), optionally prefixed by a DNS subdomain and '/'"),
        );
    }
}

/// Kubernetes `IsQualifiedName`: `[prefix/]name`, prefix a DNS-1123 subdomain.
fn is_qualified_name(key: &str) -> bool {
    let mut parts = key.split('/');
    let (prefix, name) = match (parts.next(), parts.next(), parts.next()) {
        (Some(name), None, None) => (None, name),
        (Some(prefix), Some(name), None) => (Some(prefix), name),
        _ => return false,
    };
    !name.is_empty() && is_label_value(name) && prefix.is_none_or(is_dns1123_subdomain)
}

/// Kubernetes `IsValidLabelValue`: empty, or up to 63 characters `[A-Za-z0-9_.-]` starting and
/// ending with an alphanumeric.
fn is_label_value(v: &str) -> bool {
    let b = v.as_bytes();
    v.len() <= 63
        && (b.is_empty()
            || (b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))))
}

/// Kubernetes `IsDNS1123Subdomain`: up to 253 characters, dot-separated labels of `[a-z0-9-]`
/// starting and ending with an alphanumeric.
fn is_dns1123_subdomain(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 253
        && v.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

#[cfg(test)]
mod tests;
