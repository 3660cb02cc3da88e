//! The glue between the daemon's state and the pure policy core: gathers the source's
//! objects and the CNI-registered endpoints into the core's inputs, keeps the identity
//! tables (persisted by the daemon), and turns the core's desired state into datapath map
//! contents (through the datapath's converters) plus what the CLI shows.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tracing::warn;
use weft_common::{PolicyEntry, endpoint_flags};
use weft_policy::labels::{format_labels, label_strings};
use weft_policy::mapstate::Isolation;
use weft_policy::model::Endpoint;
use weft_policy::{
    CidrIdentityAllocator, IdentityAllocator, Labels, LocalEndpoint, Object, PersistedIdentities,
    Repository, ResolveInput, ResolveOptions,
};

use crate::daemon::EndpointRecord;
use crate::datapath::{self, RawPolicyKey};
use crate::source::Snapshot;

/// The identity tables: pod label sets and CIDR prefixes, stable across restarts.
#[derive(Default)]
pub struct Identities {
    pods: IdentityAllocator,
    cidrs: CidrIdentityAllocator,
}

impl Identities {
    pub fn restore(persisted: PersistedIdentities) -> anyhow::Result<Self> {
        Ok(Self {
            pods: IdentityAllocator::from_snapshot(persisted.pods)?,
            cidrs: CidrIdentityAllocator::from_snapshot(persisted.cidrs)?,
        })
    }

    pub fn persist(&self) -> PersistedIdentities {
        PersistedIdentities {
            pods: self.pods.snapshot(),
            cidrs: self.cidrs.snapshot(),
        }
    }
}

pub struct PolicyInputs<'a> {
    pub node: &'a str,
    pub snapshot: &'a Snapshot,
    pub endpoints: Vec<&'a EndpointRecord>,
}

/// Isolation of one endpoint, as text for the CLI and as datapath flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct IsolationView {
    pub ingress: &'static str,
    pub egress: &'static str,
}

impl IsolationView {
    fn from_core(ingress: Isolation, egress: Isolation) -> Self {
        let name = |i| match i {
            Isolation::Open => "open",
            Isolation::Enforced => "enforced",
            Isolation::Audit => "audit",
        };
        Self {
            ingress: name(ingress),
            egress: name(egress),
        }
    }

    pub fn flags(self) -> u32 {
        let mut flags = 0;
        match self.ingress {
            "enforced" => flags |= endpoint_flags::INGRESS_ISOLATED,
            "audit" => flags |= endpoint_flags::INGRESS_ISOLATED | endpoint_flags::INGRESS_AUDIT,
            _ => {}
        }
        match self.egress {
            "enforced" => flags |= endpoint_flags::EGRESS_ISOLATED,
            "audit" => flags |= endpoint_flags::EGRESS_ISOLATED | endpoint_flags::EGRESS_AUDIT,
            _ => {}
        }
        flags
    }
}

#[derive(Debug, Clone, Default)]
pub struct PolicySummary {
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    pub origin: String,
    pub enforcement: String,
    /// Local endpoint ids the policy selects.
    pub selects: Vec<u32>,
}

#[derive(Debug, Clone, Default)]
pub struct PolicyOutputs {
    /// endpoint id -> identity
    pub endpoint_identity: BTreeMap<u32, u32>,
    pub isolation: BTreeMap<u32, IsolationView>,
    pub policy: BTreeMap<RawPolicyKey, PolicyEntry>,
    pub derived_from: BTreeMap<RawPolicyKey, Vec<String>>,
    pub cidr_identities: Vec<(IpNet, u32)>,
    pub remote_node_addresses: Vec<IpAddr>,
    /// Pods of other nodes (from `Endpoint` objects with addresses): address -> identity.
    pub remote_pods: Vec<(IpAddr, u32)>,
    /// Every identity in use with its labels, for display.
    pub identity_labels: HashMap<u32, Vec<String>>,
    pub policies: Vec<PolicySummary>,
}

/// Compute everything the datapath and the CLI need from the current inputs.
pub fn compute(inputs: &PolicyInputs<'_>, ids: &mut Identities) -> PolicyOutputs {
    let mut out = PolicyOutputs::default();
    let mut repository = Repository::new();
    let mut origins: BTreeMap<String, String> = BTreeMap::new();
    let mut namespaces: BTreeMap<String, Labels> = BTreeMap::new();
    // (namespace, pod) -> its Endpoint object
    let mut pods: BTreeMap<(String, String), &Endpoint> = BTreeMap::new();
    for sourced in &inputs.snapshot.objects {
        match &sourced.object {
            Object::Policy(policy) => {
                origins.insert(policy.id.to_string(), sourced.origin.clone());
                repository.upsert((**policy).clone());
            }
            Object::Namespace(ns) => {
                let name = ns.metadata.name.clone().unwrap_or_default();
                let labels: Labels = ns.metadata.labels.clone().unwrap_or_default();
                namespaces.insert(name, labels);
            }
            Object::Endpoint(ep) => {
                let key = (
                    ep.metadata.namespace.clone().unwrap_or_default(),
                    ep.metadata.name.clone().unwrap_or_default(),
                );
                pods.insert(key, ep);
            }
            Object::Node(node) => {
                if node.metadata.name.as_deref() != Some(inputs.node) {
                    out.remote_node_addresses
                        .extend(node.spec.addresses.iter().copied());
                }
            }
        }
    }

    let namespace_labels = |ns: &str| -> Labels {
        let mut labels = namespaces.get(ns).cloned().unwrap_or_default();
        // As the API server sets it, also for namespaces without an object.
        labels
            .entry("kubernetes.io/metadata.name".into())
            .or_insert_with(|| ns.to_owned());
        labels
    };

    // Identities of every pod the source knows, local or not, and of local pods without an
    // Endpoint object (labels: namespace and service account only).
    let mut live: Vec<Labels> = Vec::new();
    let mut allocate = |labels: Labels, ids: &mut Identities| -> Option<u32> {
        match ids.pods.allocate(&labels) {
            Ok(id) => {
                live.push(labels);
                Some(id)
            }
            Err(e) => {
                warn!(
                    "cannot allocate an identity for {}: {e}",
                    format_labels(&labels)
                );
                None
            }
        }
    };
    for ((ns, _name), ep) in &pods {
        let labels = ep.metadata.labels.clone().unwrap_or_default();
        let security = weft_policy::security_labels(
            &labels,
            ns,
            &ep.spec.service_account,
            &namespace_labels(ns),
        );
        let Some(id) = allocate(security, ids) else {
            continue;
        };
        if ep.spec.node.as_deref().is_some_and(|n| n != inputs.node) {
            out.remote_pods
                .extend(ep.spec.addresses.iter().map(|a| (*a, id)));
        }
    }
    let mut local = Vec::new();
    for ep in &inputs.endpoints {
        let key = (ep.pod_namespace.clone(), ep.pod_name.clone());
        let (labels, sa) = pods
            .get(&key)
            .map(|ep| {
                (
                    ep.metadata.labels.clone().unwrap_or_default(),
                    ep.spec.service_account.clone(),
                )
            })
            .unwrap_or_else(|| (Labels::new(), "default".to_owned()));
        let security = weft_policy::security_labels(
            &labels,
            &ep.pod_namespace,
            &sa,
            &namespace_labels(&ep.pod_namespace),
        );
        let Some(id) = allocate(security.clone(), ids) else {
            continue;
        };
        out.endpoint_identity.insert(ep.id, id);
        local.push(LocalEndpoint {
            endpoint_id: ep.id,
            namespace: ep.pod_namespace.clone(),
            name: ep.pod_name.clone(),
            identity: id,
            labels: security,
        });
    }
    ids.pods.gc(live.iter());
    if let Err(e) = ids.cidrs.sync(repository.cidr_prefixes().iter()) {
        warn!("cannot allocate CIDR identities: {e}");
    }

    let state = weft_policy::resolve(&ResolveInput {
        repository: &repository,
        endpoints: &local,
        identities: ids.pods.pod_identities(),
        cidr_identities: ids.cidrs.prefixes(),
        options: ResolveOptions::default(),
    });

    for (key, entry) in &state.entries {
        let raw = datapath::policy_key(key);
        out.policy.insert(raw, datapath::policy_value(entry));
        out.derived_from
            .insert(raw, entry.derived_from.iter().cloned().collect());
    }
    for (id, ep_policy) in &state.endpoints {
        out.isolation.insert(
            *id,
            IsolationView::from_core(ep_policy.ingress, ep_policy.egress),
        );
    }
    out.cidr_identities = ids
        .cidrs
        .prefixes()
        .iter()
        .map(|(p, id)| (*p, *id))
        .collect();

    let mut shown: BTreeSet<u32> = (1..=7).collect();
    shown.extend(ids.pods.pod_identities().keys().copied());
    shown.extend(ids.cidrs.prefixes().values().copied());
    for id in shown {
        if let Some(labels) = weft_policy::identity::display_labels(id, &ids.pods, &ids.cidrs) {
            out.identity_labels.insert(id, label_strings(&labels));
        }
    }

    out.policies = repository
        .iter()
        .map(|policy| PolicySummary {
            kind: policy.id.kind.to_string(),
            namespace: policy.id.namespace.clone(),
            name: policy.id.name.clone(),
            origin: origins
                .get(&policy.id.to_string())
                .cloned()
                .unwrap_or_default(),
            enforcement: format!("{:?}", policy.enforcement).to_lowercase(),
            selects: local
                .iter()
                .filter(|ep| weft_policy::resolve::selects(policy, ep))
                .map(|ep| ep.endpoint_id)
                .collect(),
        })
        .collect();
    out
}
