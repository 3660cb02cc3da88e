//! YAML documents to validated objects: dispatch on `apiVersion`/`kind`, fill in the defaults
//! the API server would, validate, and compile policies into their resolved form.
//!
//! Every problem names the file, the object (`Kind namespace/name`) and the field path, and
//! hints at the fix. A file with any problem yields no objects at all: objects never
//! half-apply, and the caller keeps the last good content of that file. No I/O here: the
//! caller reads files.

use std::collections::BTreeSet;
use std::fmt;

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::labels::K8S_NAMESPACE_NAME_LABEL;
use crate::model::{
    API_VERSION, AuthMode, Authentication, CidrRule, EgressDenyRule, EgressRule, Endpoint, Entity,
    IcmpFamily, IcmpRule, IcmpType, IngressDenyRule, IngressRule, L7Rules, LabelSelector,
    Namespace, Node, PolicySpec, PortProtocol, Protocol, WeftClusterwideNetworkPolicy,
    WeftNetworkPolicy,
};
use crate::netpol::{self, NetworkPolicy};
use crate::ports::{
    IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, PORT_PROTOCOLS,
    PortPrefix, is_iana_svc_name, range_to_prefixes,
};
use crate::repository::{
    CidrSelector, HttpRules, L4, L4Match, NamedPortMatch, Peers, Policy, PolicyId, PolicyKind,
    Rule, Section, WrittenSpec,
};
use crate::selector::Selector;

/// Namespace given to namespaced objects that name none (as `kubectl apply` does).
pub const DEFAULT_NAMESPACE: &str = "default";

/// An object read from a file, validated and with defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    /// A `WeftNetworkPolicy` or `WeftClusterwideNetworkPolicy`, compiled.
    Policy(Box<Policy>),
    Endpoint(Box<Endpoint>),
    Node(Box<Node>),
    Namespace(Box<Namespace>),
}

impl Object {
    /// `Kind namespace/name` or `Kind name`.
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            Object::Policy(p) => p.id.to_string(),
            Object::Endpoint(e) => format!(
                "Endpoint {}/{}",
                e.metadata.namespace.as_deref().unwrap_or_default(),
                e.metadata.name.as_deref().unwrap_or_default()
            ),
            Object::Node(n) => format!("Node {}", n.metadata.name.as_deref().unwrap_or_default()),
            Object::Namespace(n) => format!(
                "Namespace {}",
                n.metadata.name.as_deref().unwrap_or_default()
            ),
        }
    }
}

/// One problem found in an object, with the field it is about (relative to the object root,
/// e.g. `spec.ingress[0].toPorts[0].ports[1].port`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldProblem {
    pub field: String,
    pub message: String,
    /// Why, or what to write instead.
    pub hint: Option<String>,
}

impl fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)?;
        } else {
            write!(f, "{}: {}", self.field, self.message)?;
        }
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

/// Why one object is invalid (without a file: the Kubernetes source uses this directly and
/// writes it into `status.conditions`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", render(&self.object, &self.problems))]
pub struct ValidationError {
    /// `Kind namespace/name`.
    pub object: String,
    pub problems: Vec<FieldProblem>,
}

fn render(object: &str, problems: &[FieldProblem]) -> String {
    problems
        .iter()
        .map(|p| format!("{object}: {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One problem of a file: the object is `None` when the document could not be identified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub object: Option<String>,
    pub problem: FieldProblem,
}

/// Why a file was rejected. Displays one line per problem:
/// `file: Kind ns/name: field: message (hint: ...)`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ParseError {
    pub file: String,
    pub problems: Vec<Problem>,
}

impl ParseError {
    fn render(&self) -> String {
        self.problems
            .iter()
            .map(|p| match &p.object {
                Some(o) => format!("{}: {o}: {}", self.file, p.problem),
                None => format!("{}: {}", self.file, p.problem),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

const KNOWN_KINDS: &str = "weft.io/v1alpha1 WeftNetworkPolicy, WeftClusterwideNetworkPolicy, \
                           Endpoint, Node; networking.k8s.io/v1 NetworkPolicy; v1 Namespace";

/// Parse a multi-document YAML file into objects.
///
/// # Errors
/// Every problem of every document, each naming `file`, the object and the field. On error no
/// object of the file is returned.
pub fn parse_documents(file: &str, text: &str) -> Result<Vec<Object>, ParseError> {
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let n = index + 1;
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                problems.push(Problem {
                    object: None,
                    problem: FieldProblem {
                        field: String::new(),
                        message: format!("document {n}: not valid YAML: {e}"),
                        hint: None,
                    },
                });
                // The YAML stream cannot be resynchronised after a syntax error.
                break;
            }
        };
        if value.is_null() {
            continue; // empty document, e.g. a trailing `---`
        }
        match parse_object(n, value) {
            Ok(obj) => {
                let name = obj.describe();
                if seen.insert(name.clone()) {
                    objects.push(obj);
                } else {
                    problems.push(Problem {
                        object: Some(name),
                        problem: FieldProblem {
                            field: "metadata.name".into(),
                            message: "defined twice in this file".into(),
                            hint: Some("each object needs a unique kind/namespace/name".into()),
                        },
                    });
                }
            }
            Err(mut p) => problems.append(&mut p),
        }
    }
    if problems.is_empty() {
        Ok(objects)
    } else {
        Err(ParseError {
            file: file.to_string(),
            problems,
        })
    }
}

fn str_at<'a>(value: &'a serde_yaml::Value, path: &[&str]) -> Option<&'a str> {
    let mut v = value;
    for p in path {
        v = v.get(*p)?;
    }
    v.as_str()
}

fn parse_object(n: usize, value: serde_yaml::Value) -> Result<Object, Vec<Problem>> {
    let api_version = str_at(&value, &["apiVersion"])
        .unwrap_or_default()
        .to_string();
    let kind = str_at(&value, &["kind"]).unwrap_or_default().to_string();
    let name = str_at(&value, &["metadata", "name"])
        .unwrap_or_default()
        .to_string();
    let namespace = str_at(&value, &["metadata", "namespace"]).map(str::to_string);
    let namespaced = matches!(
        kind.as_str(),
        "WeftNetworkPolicy" | "Endpoint" | "NetworkPolicy"
    );
    let object = match (namespaced, &namespace) {
        (true, ns) => format!(
            "{kind} {}/{name}",
            ns.as_deref().unwrap_or(DEFAULT_NAMESPACE)
        ),
        (false, _) => format!("{kind} {name}"),
    };
    let problem = |field: &str, message: String, hint: Option<String>| {
        vec![Problem {
            object: if kind.is_empty() {
                None
            } else {
                Some(object.clone())
            },
            problem: FieldProblem {
                field: field.to_string(),
                message,
                hint,
            },
        }]
    };
    if api_version.is_empty() || kind.is_empty() {
        return Err(problem(
            "",
            format!("document {n}: missing apiVersion or kind"),
            Some(format!(
                "every document needs both; known kinds: {KNOWN_KINDS}"
            )),
        ));
    }
    if name.is_empty() {
        return Err(problem("metadata.name", "is required".into(), None));
    }
    match (api_version.as_str(), kind.as_str()) {
        (API_VERSION, "WeftNetworkPolicy") => {
            let mut wnp: WeftNetworkPolicy = typed_in(&object, value)?;
            wnp.metadata.namespace = Some(namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.into()));
            let policy = compile_policy(&wnp).map_err(wrap)?;
            Ok(Object::Policy(Box::new(policy)))
        }
        (API_VERSION, "WeftClusterwideNetworkPolicy") => {
            if namespace.is_some() {
                return Err(problem(
                    "metadata.namespace",
                    "a cluster-scoped policy has no namespace".into(),
                    Some("remove it, or use a WeftNetworkPolicy to limit the policy to one namespace".into()),
                ));
            }
            let wcnp: WeftClusterwideNetworkPolicy = typed_in(&object, value)?;
            let policy = compile_clusterwide_policy(&wcnp).map_err(wrap)?;
            Ok(Object::Policy(Box::new(policy)))
        }
        (netpol::API_VERSION, "NetworkPolicy") => {
            let mut np: NetworkPolicy = typed_in(&object, value)?;
            np.metadata.namespace = Some(namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.into()));
            let policy = netpol::compile_network_policy(&np).map_err(wrap)?;
            Ok(Object::Policy(Box::new(policy)))
        }
        (API_VERSION, "Endpoint") => {
            let mut ep: Endpoint = typed_in(&object, value)?;
            ep.metadata.namespace = Some(namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.into()));
            validate_endpoint(&ep).map_err(wrap)?;
            Ok(Object::Endpoint(Box::new(ep)))
        }
        (API_VERSION, "Node") => {
            let node: Node = typed_in(&object, value)?;
            Ok(Object::Node(Box::new(node)))
        }
        ("v1", "Namespace") => {
            let mut ns: Namespace = typed_in(&object, value)?;
            ns.metadata
                .labels
                .get_or_insert_with(Default::default)
                .insert(K8S_NAMESPACE_NAME_LABEL.into(), name.clone());
            Ok(Object::Namespace(Box::new(ns)))
        }
        _ => Err(problem(
            "",
            format!("unknown kind {api_version}/{kind}"),
            Some(format!("known kinds: {KNOWN_KINDS}")),
        )),
    }
}

/// The problems of one object, for a file's list.
fn wrap(e: ValidationError) -> Vec<Problem> {
    e.problems
        .into_iter()
        .map(|p| Problem {
            object: Some(e.object.clone()),
            problem: p,
        })
        .collect()
}

/// [`typed`], with a failure attributed to `object`.
fn typed_in<T: DeserializeOwned>(
    object: &str,
    value: serde_yaml::Value,
) -> Result<T, Vec<Problem>> {
    typed(value).map_err(|p| {
        vec![Problem {
            object: Some(object.to_string()),
            problem: p,
        }]
    })
}

/// Deserialize with the path of the failing field.
pub(crate) fn typed<T: DeserializeOwned>(value: serde_yaml::Value) -> Result<T, FieldProblem> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        let message = e.inner().to_string();
        let hint = if message.starts_with("unknown field") {
            Some("check the spelling; weft rejects fields it does not know".into())
        } else {
            None
        };
        FieldProblem {
            field: if field == "." { String::new() } else { field },
            message,
            hint,
        }
    })
}

/// Validate an `Endpoint`'s container ports as the API server validates a Pod's: a name is
/// an `IANA_SVC_NAME` and unique in the pod, a port is 1-65535.
///
/// # Errors
/// Every problem found, with field paths.
pub fn validate_endpoint(ep: &Endpoint) -> Result<(), ValidationError> {
    let mut problems = Problems::default();
    let mut names = BTreeSet::new();
    for (i, p) in ep.spec.ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        if !(1..=65535).contains(&p.container_port) {
            problems.push(
                format!("{field}.containerPort"),
                format!("{} is not a port (1-65535)", p.container_port),
                None,
            );
        }
        if let Some(name) = &p.name {
            if !is_iana_svc_name(name) {
                problems.push(
                    format!("{field}.name"),
                    format!("{name:?} is not a valid port name"),
                    Some(IANA_SVC_NAME_HINT),
                );
            } else if !names.insert(name.as_str()) {
                problems.push(
                    format!("{field}.name"),
                    format!("port name {name:?} is used twice in this pod"),
                    Some("each named port of a pod needs its own name"),
                );
            }
        }
    }
    problems.into_result(&format!("Endpoint {}/{}", ep.namespace(), ep.name()))
}

/// What a port name must look like, for hints.
pub(crate) const IANA_SVC_NAME_HINT: &str = "a port name (IANA_SVC_NAME) has 1-15 characters \
    a-z, 0-9 and '-', at least one letter, and no '-' at either end or twice in a row";

// === policy compilation ===

/// Validate and compile a namespaced policy (its namespace must be set; the local source sets
/// `default` when missing).
///
/// # Errors
/// Every problem found, with field paths.
pub fn compile_policy(wnp: &WeftNetworkPolicy) -> Result<Policy, ValidationError> {
    let id = PolicyId {
        kind: PolicyKind::WeftNetworkPolicy,
        namespace: Some(
            wnp.metadata
                .namespace
                .clone()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.into()),
        ),
        name: wnp.metadata.name.clone().unwrap_or_default(),
    };
    compile_spec(id, &wnp.spec)
}

/// Validate and compile a clusterwide policy.
///
/// # Errors
/// Every problem found, with field paths.
pub fn compile_clusterwide_policy(
    wcnp: &WeftClusterwideNetworkPolicy,
) -> Result<Policy, ValidationError> {
    let id = PolicyId {
        kind: PolicyKind::WeftClusterwideNetworkPolicy,
        namespace: None,
        name: wcnp.metadata.name.clone().unwrap_or_default(),
    };
    compile_spec(id, wcnp.policy_spec())
}

/// Problems collected while validating one object.
#[derive(Default)]
pub(crate) struct Problems(pub(crate) Vec<FieldProblem>);

impl Problems {
    pub(crate) fn push(
        &mut self,
        field: impl Into<String>,
        message: impl Into<String>,
        hint: Option<&str>,
    ) {
        self.0.push(FieldProblem {
            field: field.into(),
            message: message.into(),
            hint: hint.map(str::to_string),
        });
    }

    pub(crate) fn into_result(self, object: &str) -> Result<(), ValidationError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ValidationError {
                object: object.to_string(),
                problems: self.0,
            })
        }
    }
}

fn compile_spec(id: PolicyId, spec: &PolicySpec) -> Result<Policy, ValidationError> {
    let mut problems = Problems::default();
    let ns = id.namespace.as_deref();
    let subject = match Selector::compile(&spec.endpoint_selector) {
        Ok(s) => match ns {
            Some(ns) => s.scoped_to(ns),
            None => s,
        },
        Err(e) => {
            problems.push(
                format!("spec.endpointSelector.{}", e.field),
                e.message,
                None,
            );
            Selector::default()
        }
    };
    let mut sections = std::collections::BTreeMap::new();
    let mut compile = |section: Section, views: Vec<RuleView<'_>>| -> Vec<Rule> {
        views
            .iter()
            .enumerate()
            .map(|(i, v)| compile_rule(&mut problems, ns, section, i, v))
            .collect()
    };
    if let Some(rules) = &spec.ingress {
        let views = rules.iter().map(RuleView::ingress).collect();
        sections.insert(Section::Ingress, compile(Section::Ingress, views));
    }
    if let Some(rules) = &spec.ingress_deny {
        let views = rules.iter().map(RuleView::ingress_deny).collect();
        sections.insert(Section::IngressDeny, compile(Section::IngressDeny, views));
    }
    if let Some(rules) = &spec.egress {
        let views = rules.iter().map(RuleView::egress).collect();
        sections.insert(Section::Egress, compile(Section::Egress, views));
    }
    if let Some(rules) = &spec.egress_deny {
        let views = rules.iter().map(RuleView::egress_deny).collect();
        sections.insert(Section::EgressDeny, compile(Section::EgressDeny, views));
    }
    if !problems.0.is_empty() {
        return Err(ValidationError {
            object: id.to_string(),
            problems: problems.0,
        });
    }
    Ok(Policy {
        id,
        enforcement: spec.enforcement,
        subject,
        sections,
        spec: WrittenSpec::Weft(spec.clone()),
        warnings: Vec::new(),
    })
}

/// The fields shared by the four kinds of rule, with ingress/egress naming abstracted away.
struct RuleView<'a> {
    endpoints: &'a [LabelSelector],
    entities: &'a [Entity],
    cidr: &'a [String],
    cidr_set: &'a [CidrRule],
    port_rules: Vec<(&'a [PortProtocol], Option<&'a L7Rules>)>,
    icmps: &'a [IcmpRule],
    authentication: Option<&'a Authentication>,
}

impl<'a> RuleView<'a> {
    fn ingress(r: &'a IngressRule) -> Self {
        RuleView {
            endpoints: &r.from_endpoints,
            entities: &r.from_entities,
            cidr: &r.from_cidr,
            cidr_set: &r.from_cidr_set,
            port_rules: r
                .to_ports
                .iter()
                .map(|p| (&p.ports[..], p.rules.as_ref()))
                .collect(),
            icmps: &r.icmps,
            authentication: r.authentication.as_ref(),
        }
    }

    fn ingress_deny(r: &'a IngressDenyRule) -> Self {
        RuleView {
            endpoints: &r.from_endpoints,
            entities: &r.from_entities,
            cidr: &r.from_cidr,
            cidr_set: &r.from_cidr_set,
            port_rules: r.to_ports.iter().map(|p| (&p.ports[..], None)).collect(),
            icmps: &r.icmps,
            authentication: None,
        }
    }

    fn egress(r: &'a EgressRule) -> Self {
        RuleView {
            endpoints: &r.to_endpoints,
            entities: &r.to_entities,
            cidr: &r.to_cidr,
            cidr_set: &r.to_cidr_set,
            port_rules: r
                .to_ports
                .iter()
                .map(|p| (&p.ports[..], p.rules.as_ref()))
                .collect(),
            icmps: &r.icmps,
            authentication: r.authentication.as_ref(),
        }
    }

    fn egress_deny(r: &'a EgressDenyRule) -> Self {
        RuleView {
            endpoints: &r.to_endpoints,
            entities: &r.to_entities,
            cidr: &r.to_cidr,
            cidr_set: &r.to_cidr_set,
            port_rules: r.to_ports.iter().map(|p| (&p.ports[..], None)).collect(),
            icmps: &r.icmps,
            authentication: None,
        }
    }
}

fn compile_rule(
    problems: &mut Problems,
    ns: Option<&str>,
    section: Section,
    index: usize,
    r: &RuleView<'_>,
) -> Rule {
    let base = format!("spec.{}[{index}]", section.field());
    let dir = match section {
        Section::Ingress | Section::IngressDeny => "from",
        Section::Egress | Section::EgressDeny => "to",
    };
    let peers = compile_peers(problems, ns, &base, dir, r);
    let mut named = BTreeSet::new();
    let mut http = Vec::new();
    let l4 = compile_l4(problems, &base, r, &mut named, &mut http);
    let auth_required = r
        .authentication
        .is_some_and(|a| a.mode == AuthMode::Required);
    if auth_required
        && (!r.cidr.is_empty() || !r.cidr_set.is_empty() || r.entities.contains(&Entity::World))
    {
        problems.push(
            format!("{base}.authentication"),
            format!("authentication is required, but {dir}CIDR/{dir}CIDRSet/world peers have no SPIFFE identity and could never authenticate"),
            Some("put peers outside the cluster in a rule without authentication"),
        );
    }
    Rule {
        section,
        index,
        peers,
        l4,
        named_ports: named.into_iter().collect(),
        auth_required,
        http,
    }
}

fn compile_peers(
    problems: &mut Problems,
    ns: Option<&str>,
    base: &str,
    dir: &str,
    r: &RuleView<'_>,
) -> Peers {
    let mut peers = Peers::default();
    for (j, sel) in r.endpoints.iter().enumerate() {
        match Selector::compile(sel) {
            Ok(s) => peers.endpoints.push(s.scoped_peer(ns)),
            Err(e) => problems.push(
                format!("{base}.{dir}Endpoints[{j}].{}", e.field),
                e.message,
                None,
            ),
        }
    }
    peers.entities = r.entities.iter().copied().collect();
    for (j, c) in r.cidr.iter().enumerate() {
        if let Some(net) = parse_cidr(problems, &format!("{base}.{dir}CIDR[{j}]"), c) {
            peers.cidrs.push(CidrSelector {
                cidr: net,
                except: Vec::new(),
            });
        }
    }
    for (j, set) in r.cidr_set.iter().enumerate() {
        let field = format!("{base}.{dir}CIDRSet[{j}]");
        let Some(cidr) = parse_cidr(problems, &format!("{field}.cidr"), &set.cidr) else {
            continue;
        };
        let mut except = Vec::new();
        for (k, e) in set.except.iter().enumerate() {
            let efield = format!("{field}.except[{k}]");
            let Some(enet) = parse_cidr(problems, &efield, e) else {
                continue;
            };
            if cidr.contains(&enet) {
                except.push(enet);
            } else {
                problems.push(
                    efield,
                    format!("{e:?} is not inside cidr {cidr}"),
                    Some(
                        "an except prefix carves addresses out of its cidr; it must lie inside it",
                    ),
                );
            }
        }
        peers.cidrs.push(CidrSelector { cidr, except });
    }
    peers.any = r.endpoints.is_empty()
        && r.entities.is_empty()
        && r.cidr.is_empty()
        && r.cidr_set.is_empty();
    peers
}

fn compile_l4(
    problems: &mut Problems,
    base: &str,
    r: &RuleView<'_>,
    named: &mut BTreeSet<NamedPortMatch>,
    http: &mut Vec<HttpRules>,
) -> L4 {
    if r.port_rules.is_empty() && r.icmps.is_empty() {
        return L4::Any;
    }
    let mut matches = BTreeSet::new();
    for (p, (ports, l7)) in r.port_rules.iter().enumerate() {
        let pfield = format!("{base}.toPorts[{p}]");
        let mut has_l7 = None;
        if let Some(l7) = l7 {
            validate_http(problems, &format!("{pfield}.rules"), l7);
            if !l7.http.is_empty() {
                has_l7 = Some(u16::try_from(http.len()).unwrap_or(u16::MAX));
                http.push(l7.http.clone().into());
            }
        }
        let implicit = [PortProtocol::default()];
        let ports: &[PortProtocol] = if ports.is_empty() { &implicit } else { ports };
        for (q, pp) in ports.iter().enumerate() {
            compile_port(
                problems,
                &format!("{pfield}.ports[{q}]"),
                pp,
                has_l7,
                &mut matches,
                named,
            );
        }
    }
    for (p, icmp) in r.icmps.iter().enumerate() {
        for (f, field) in icmp.fields.iter().enumerate() {
            let ffield = format!("{base}.icmps[{p}].fields[{f}].type");
            let Some(t) = icmp_type(problems, &ffield, &field.type_, field.family) else {
                continue;
            };
            let protocol = match field.family {
                IcmpFamily::IPv4 => IPPROTO_ICMP,
                IcmpFamily::IPv6 => IPPROTO_ICMPV6,
            };
            matches.insert(L4Match {
                protocol,
                port: PortPrefix::icmp_type(t),
                l7: None,
            });
        }
    }
    L4::Ports(matches.into_iter().collect())
}

/// An ICMP type by number (0-255, also as a decimal string, as Kubernetes' int-or-string
/// reads it) or by Cilium's name for the family.
fn icmp_type(problems: &mut Problems, field: &str, t: &IcmpType, family: IcmpFamily) -> Option<u8> {
    let number = match t {
        IcmpType::Number(n) => Some(*n),
        IcmpType::Name(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            Some(s.parse::<i64>().unwrap_or(i64::MAX))
        }
        IcmpType::Name(name) => {
            let found = crate::icmp::type_by_name(family, name);
            if found.is_none() {
                let hint = format!(
                    "write a type number 0-255 or one of the {family:?} names: {}",
                    crate::icmp::names(family)
                );
                problems.push(
                    field,
                    format!("{name:?} is not an {family:?} ICMP type name"),
                    Some(&hint),
                );
            }
            return found;
        }
    };
    let n = number?;
    let t = u8::try_from(n).ok();
    if t.is_none() {
        problems.push(field, format!("{n} is not an ICMP type (0-255)"), None);
    }
    t
}

fn parse_cidr(problems: &mut Problems, field: &str, text: &str) -> Option<IpNet> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Some(net.trunc());
    }
    if let Ok(ip) = text.parse::<std::net::IpAddr>() {
        return Some(IpNet::from(ip));
    }
    problems.push(
        field,
        format!("{text:?} is not a CIDR"),
        Some("write an address prefix like 10.0.0.0/8 or fd00::/64"),
    );
    None
}

fn compile_port(
    problems: &mut Problems,
    field: &str,
    pp: &PortProtocol,
    http: Option<u16>,
    out: &mut BTreeSet<L4Match>,
    named: &mut BTreeSet<NamedPortMatch>,
) {
    let l7 = http.is_some();
    let text = pp.port.as_deref().unwrap_or("0");
    let port: u16 = if text.chars().all(|c| c.is_ascii_digit()) && !text.is_empty() {
        if let Some(p) = text.parse::<u32>().ok().and_then(|p| u16::try_from(p).ok()) {
            p
        } else {
            problems.push(
                format!("{field}.port"),
                format!("{text:?} is not a port (1-65535)"),
                Some("\"0\" means every port"),
            );
            return;
        }
    } else if is_iana_svc_name(text) {
        compile_named_port(problems, field, pp, text, http, named);
        return;
    } else {
        problems.push(
            format!("{field}.port"),
            format!("{text:?} is neither a port number nor a port name"),
            Some(IANA_SVC_NAME_HINT),
        );
        return;
    };
    let end = match pp.end_port {
        None => port,
        Some(_) if port == 0 => {
            problems.push(
                format!("{field}.endPort"),
                "endPort needs a port to start the range",
                Some("port \"0\" already means every port"),
            );
            return;
        }
        Some(e) => match u16::try_from(e) {
            Ok(e) if e >= port => e,
            Ok(e) => {
                problems.push(
                    format!("{field}.endPort"),
                    format!("endPort {e} is below port {port}"),
                    Some("a range runs from port up to endPort"),
                );
                return;
            }
            Err(_) => {
                problems.push(
                    format!("{field}.endPort"),
                    format!("{e} is not a port (1-65535)"),
                    None,
                );
                return;
            }
        },
    };
    let protocols: Vec<u8> = match pp.protocol {
        Protocol::TCP => vec![IPPROTO_TCP],
        Protocol::UDP => vec![IPPROTO_UDP],
        Protocol::SCTP => vec![IPPROTO_SCTP],
        // HTTP runs over TCP only: an L7 rule on a port of any protocol is about its TCP side.
        Protocol::ANY if l7 => vec![IPPROTO_TCP],
        Protocol::ANY => PORT_PROTOCOLS.to_vec(),
        Protocol::ICMP | Protocol::ICMPv6 => {
            if port != 0 {
                problems.push(
                    format!("{field}.port"),
                    format!("ICMP has no ports, got {text:?}"),
                    Some("select ICMP message types with `icmps: [{fields: [{type: 8}]}]`"),
                );
                return;
            }
            vec![if pp.protocol == Protocol::ICMP {
                IPPROTO_ICMP
            } else {
                IPPROTO_ICMPV6
            }]
        }
    };
    if l7 && protocols != [IPPROTO_TCP] {
        problems.push(
            format!("{field}.protocol"),
            format!("HTTP rules need TCP, but this port is {:?}", pp.protocol),
            Some("L7 rules apply to TCP ports only; move the rules or change the protocol"),
        );
        return;
    }
    let prefixes = if port == 0 {
        vec![PortPrefix::ANY]
    } else {
        range_to_prefixes(port, end)
    };
    for protocol in protocols {
        for &prefix in &prefixes {
            out.insert(L4Match {
                protocol,
                port: prefix,
                l7: http,
            });
        }
    }
}

/// A weft port rule naming a port (`port: http`): resolved per pod by `resolve`. As with a
/// number, no protocol (or `ANY`) means TCP, UDP and SCTP (only TCP with HTTP rules); the
/// named container port must have the protocol to match.
fn compile_named_port(
    problems: &mut Problems,
    field: &str,
    pp: &PortProtocol,
    name: &str,
    http: Option<u16>,
    named: &mut BTreeSet<NamedPortMatch>,
) {
    let l7 = http.is_some();
    if pp.end_port.is_some() {
        problems.push(
            format!("{field}.endPort"),
            "endPort needs a numbered port to start the range",
            Some("a named port is one port; write numbers for a range"),
        );
        return;
    }
    let protocols: Vec<u8> = match pp.protocol {
        Protocol::TCP => vec![IPPROTO_TCP],
        Protocol::UDP => vec![IPPROTO_UDP],
        Protocol::SCTP => vec![IPPROTO_SCTP],
        Protocol::ANY if l7 => vec![IPPROTO_TCP],
        Protocol::ANY => PORT_PROTOCOLS.to_vec(),
        Protocol::ICMP | Protocol::ICMPv6 => {
            problems.push(
                format!("{field}.port"),
                format!("ICMP has no ports, got {name:?}"),
                Some("select ICMP message types with `icmps: [{fields: [{type: EchoRequest}]}]`"),
            );
            return;
        }
    };
    if l7 && protocols != [IPPROTO_TCP] {
        problems.push(
            format!("{field}.protocol"),
            format!("HTTP rules need TCP, but this port is {:?}", pp.protocol),
            Some("L7 rules apply to TCP ports only; move the rules or change the protocol"),
        );
        return;
    }
    for protocol in protocols {
        named.insert(NamedPortMatch {
            name: name.to_string(),
            protocol,
            l7: http,
        });
    }
}

fn validate_http(problems: &mut Problems, field: &str, l7: &L7Rules) {
    for (h, rule) in l7.http.iter().enumerate() {
        let hf = format!("{field}.http[{h}]");
        for (name, re) in [
            ("method", &rule.method),
            ("path", &rule.path),
            ("host", &rule.host),
        ] {
            if let Some(re) = re {
                check_regex(problems, &format!("{hf}.{name}"), re);
            }
        }
        for (i, header) in rule.headers.iter().enumerate() {
            if crate::http::split_header_rule(header).is_none() {
                problems.push(
                    format!("{hf}.headers[{i}]"),
                    format!("{header:?} is not a header rule"),
                    Some(
                        "write \"Name\" (header present) or \"Name: value\" (exact value); \
                         a name is an HTTP token, a value has no control characters",
                    ),
                );
            }
        }
    }
}

/// Rules match the whole value, so the regex is compiled anchored, as the L7 filter will.
fn check_regex(problems: &mut Problems, field: &str, re: &str) {
    if let Err(e) = crate::http::anchored(re) {
        let msg = e.to_string();
        let first = msg.lines().last().unwrap_or(&msg).trim().to_string();
        problems.push(
            field,
            format!("{re:?} is not a valid regular expression: {first}"),
            Some("rules are regular expressions matched against the whole value"),
        );
    }
}

#[cfg(test)]
mod tests;
