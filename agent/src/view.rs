//! The node state as readers see it: an immutable [`View`] the controller publishes after
//! every change, and the rows the API prints, rendered from it on request. Readers (the API,
//! flow enrichment, later metrics, encryption and auth) load the current view without
//! touching the controller; nothing here reaches back into it.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use weft_api::{
    Condition, EndpointRow, FeatureReport, IdentityRow, NodeRow, PolicyEntryRow, PolicyReport,
    PolicyRow, Rejection,
};
use weft_policy::Isolation;
use weft_policy::ports::protocol_name;

use crate::endpoints::EndpointRecord;
use crate::plan::{Plan, Refusal};

/// Published node state. Cheap to publish: the big parts are shared.
#[derive(Debug, Clone)]
pub struct View {
    pub node: String,
    pub source: String,
    pub identity_backend: String,
    pub pin_dir: String,
    pub attach_mode: String,
    pub variant: String,
    pub features: FeatureReport,
    /// `on (cgroup ...)` or `off (why)`: same-node socket redirection.
    pub socket_redirect: String,
    /// One step per change of the configuration (source objects, endpoints).
    pub config_revision: u64,
    /// The configuration revision the maps hold.
    pub applied_revision: u64,
    /// The datapath's policy revision (conntrack entries are checked against it).
    pub datapath_revision: u32,
    pub last_apply: Option<Instant>,
    /// When each endpoint's entries or isolation last changed in the maps.
    pub policy_changed: Arc<BTreeMap<u32, Instant>>,
    pub endpoints: Arc<Vec<EndpointRecord>>,
    /// The plan whose (fitted) desired state the maps hold.
    pub plan: Arc<Plan>,
    pub rejected: Arc<Vec<Rejection>>,
    pub refusals: Arc<Vec<Refusal>>,
    /// Endpoints refused since the agent started.
    pub refusals_total: u64,
    /// Conditions that need attention, as `weft status` lists them.
    pub problems: Arc<Vec<String>>,
    /// (map, entries, capacity) of the maps the controller writes.
    pub maps: Vec<(String, usize, usize)>,
    pub names: Arc<Names>,
}

/// Names for flow enrichment.
#[derive(Debug, Default, Clone)]
pub struct Names {
    /// Endpoint id -> `namespace/pod`.
    pub endpoints: HashMap<u32, String>,
    /// Pod address -> (`namespace/pod`, node when not this one).
    pub addresses: HashMap<IpAddr, (String, Option<String>)>,
    /// Identity -> display labels.
    pub identities: HashMap<u32, Vec<String>>,
}

/// Where readers find the current view.
pub type SharedView = Arc<ArcSwap<View>>;

impl View {
    /// The view before the controller's first publication.
    pub fn empty(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            source: String::new(),
            identity_backend: String::new(),
            pin_dir: String::new(),
            attach_mode: String::new(),
            variant: String::new(),
            features: FeatureReport {
                kernel: String::new(),
                attach_mode: String::new(),
                features: Vec::new(),
            },
            socket_redirect: String::new(),
            config_revision: 0,
            applied_revision: 0,
            datapath_revision: 0,
            last_apply: None,
            policy_changed: Arc::default(),
            endpoints: Arc::default(),
            plan: Arc::default(),
            rejected: Arc::default(),
            refusals: Arc::default(),
            refusals_total: 0,
            problems: Arc::default(),
            maps: Vec::new(),
            names: Arc::default(),
        }
    }

    fn pod_of(&self, endpoint_id: u32) -> String {
        self.names
            .endpoints
            .get(&endpoint_id)
            .cloned()
            .unwrap_or_else(|| format!("endpoint:{endpoint_id}"))
    }

    pub fn endpoint_rows(&self) -> Vec<EndpointRow> {
        let isolation: BTreeMap<u32, weft_policy::EndpointPolicy> = self
            .plan
            .desired
            .endpoints
            .values()
            .map(|e| (e.endpoint_id, e.policy))
            .collect();
        self.endpoints
            .iter()
            .map(|ep| {
                let policy = isolation.get(&ep.id).copied().unwrap_or_default();
                let identity = self
                    .plan
                    .endpoint_identity
                    .get(&ep.id)
                    .copied()
                    .unwrap_or(weft_policy::identity::UNMANAGED);
                EndpointRow {
                    id: ep.id,
                    pod: ep.pod_name.clone(),
                    namespace: ep.pod_namespace.clone(),
                    identity,
                    labels: self
                        .plan
                        .identity_labels
                        .get(&identity)
                        .cloned()
                        .unwrap_or_default(),
                    addresses: ep.addresses.iter().map(IpNet::addr).collect(),
                    host_ifname: ep.host_ifname.clone(),
                    ifindex: ep.ifindex,
                    ingress: isolation_name(policy.ingress).into(),
                    egress: isolation_name(policy.egress).into(),
                }
            })
            .collect()
    }

    pub fn identity_rows(&self) -> Vec<IdentityRow> {
        self.plan
            .identity_labels
            .iter()
            .map(|(id, labels)| IdentityRow {
                id: *id,
                labels: labels.clone(),
                reserved: weft_policy::identity::reserved_name(*id).is_some(),
            })
            .collect()
    }

    pub fn node_rows(&self) -> Vec<NodeRow> {
        self.plan
            .nodes
            .iter()
            .map(|n| NodeRow {
                name: n.name.clone(),
                local: n.local,
                addresses: n.addresses.clone(),
                pod_cidrs: n.pod_cidrs.clone(),
                pods: n.pods,
                wireguard_public_key: n.wireguard_public_key.clone(),
            })
            .collect()
    }

    pub fn policy_report(&self) -> PolicyReport {
        let entries = self
            .plan
            .desired
            .policy
            .iter()
            .map(|(key, entry)| {
                let (protocol, port) = match key.protocol {
                    None => ("any".to_owned(), "any".to_owned()),
                    Some(p) => (
                        protocol_name(p),
                        if key.port.prefix_len == 0 {
                            "any".to_owned()
                        } else {
                            key.port.to_string()
                        },
                    ),
                };
                PolicyEntryRow {
                    endpoint: self.pod_of(key.endpoint_id),
                    direction: key.direction.to_string(),
                    identity: key.identity,
                    protocol,
                    port,
                    verdict: verdict_name(entry.verdict).into(),
                    derived_from: entry.derived_from.iter().cloned().collect(),
                }
            })
            .collect();
        let policies = self
            .plan
            .policies
            .iter()
            .map(|p| {
                let id = match &p.namespace {
                    Some(ns) => format!("{} {ns}/{}", p.kind, p.name),
                    None => format!("{} {}", p.kind, p.name),
                };
                let refusals: Vec<&Refusal> = self
                    .refusals
                    .iter()
                    .filter(|r| r.policies.contains(&id))
                    .collect();
                let mut conditions = vec![Condition {
                    type_: "Valid".into(),
                    status: "True".into(),
                    reason: "Accepted".into(),
                    message: format!("read from {}", p.origin),
                }];
                conditions.push(if refusals.is_empty() {
                    Condition {
                        type_: "Enforced".into(),
                        status: "True".into(),
                        reason: "Applied".into(),
                        message: format!(
                            "selects {} endpoint(s) on node {}",
                            p.selects.len(),
                            self.node
                        ),
                    }
                } else {
                    Condition {
                        type_: "Enforced".into(),
                        status: "False".into(),
                        reason: "MapCapacity".into(),
                        message: refusals
                            .iter()
                            .map(|r| format!("{}: {}", self.pod_of(r.endpoint_id), r.reason))
                            .collect::<Vec<_>>()
                            .join("; "),
                    }
                });
                PolicyRow {
                    kind: p.kind.clone(),
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    source: p.origin.clone(),
                    enforcement: p.enforcement.clone(),
                    selects: p.selects.iter().map(|id| self.pod_of(*id)).collect(),
                    conditions,
                }
            })
            .collect();
        PolicyReport {
            policies,
            rejected: self.rejected.as_ref().clone(),
            entries,
        }
    }

    /// One line per refused endpoint, for `weft status` and `weft policy wait`.
    pub fn refusal_lines(&self) -> Vec<String> {
        self.refusals
            .iter()
            .map(|r| {
                let kept = if r.kept_previous {
                    "it keeps its previous policy"
                } else {
                    "it was not admitted"
                };
                format!(
                    "policy of {} not applied: {} ({kept}; policies: {})",
                    self.pod_of(r.endpoint_id),
                    r.reason,
                    if r.policies.is_empty() {
                        "-".to_owned()
                    } else {
                        r.policies.join(", ")
                    }
                )
            })
            .collect()
    }
}

pub fn isolation_name(i: Isolation) -> &'static str {
    match i {
        Isolation::Open => "open",
        Isolation::Enforced => "enforced",
        Isolation::Audit => "audit",
    }
}

pub fn verdict_name(v: weft_policy::Verdict) -> &'static str {
    use weft_policy::Verdict;
    match v {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
        Verdict::DefaultDeny => "default-deny",
        Verdict::AuditDeny => "audit-deny",
        Verdict::RedirectL7 { .. } => "redirect-l7",
        Verdict::RequireAuth => "require-auth",
    }
}
