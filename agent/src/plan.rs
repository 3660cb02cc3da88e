//! From the configuration to the desired datapath state, pure: no I/O, no clock, no aya.
//!
//! The controller builds a [`Model`] from the source's objects and the registered
//! endpoints, asks it which identities it needs ([`Model::needed`]), has the identity
//! backend allocate them, and then computes the [`Plan`]: the typed [`Desired`] maps plus
//! what the CLI and the flow enrichment show. [`fit`] keeps a change that does not fit the
//! policy map from half-applying: the endpoints it refuses keep their last complete state.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use weft_policy::identity::{HOST, REMOTE_NODE, cidr_labels, reserved_labels};
use weft_policy::labels::label_strings;
use weft_policy::model::{Endpoint, Node};
use weft_policy::{
    CapacityLimits, CapacityRefusal, Direction, EndpointPolicy, EntrySets, IsolatedBy, Isolation,
    Labels, LocalEndpoint, Object, PolicyMapKey, Repository, ResolveInput, ResolveOptions,
};

use crate::datapath::{Capacity, ClusterSpec, Desired, EndpointSpec, IpcacheSpec, NodeSpec, Place};
use crate::endpoints::EndpointRecord;
use crate::identity::Allocated;
use crate::source::Sourced;

/// Namespace labels an object-less namespace still has (as the API server sets them).
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// Service account of a pod without an `Endpoint` object.
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// The configuration, indexed.
pub struct Model<'a> {
    node: &'a str,
    repository: Repository,
    origins: BTreeMap<String, String>,
    namespaces: BTreeMap<String, Labels>,
    /// (namespace, name) -> the pod's `Endpoint` object.
    pods: BTreeMap<(String, String), &'a Endpoint>,
    nodes: BTreeMap<String, &'a Node>,
    endpoints: Vec<&'a EndpointRecord>,
    host_addresses: &'a [IpAddr],
}

/// What the model needs allocated.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Needed {
    pub pods: BTreeSet<Labels>,
    pub cidrs: BTreeSet<IpNet>,
}

/// A policy as `weft policy get` lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicySummary {
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    pub origin: String,
    pub enforcement: String,
    /// Local endpoint ids the policy selects.
    pub selects: Vec<u32>,
}

/// A node as `weft node list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSummary {
    pub name: String,
    pub local: bool,
    pub addresses: Vec<IpAddr>,
    pub pod_cidrs: Vec<IpNet>,
    pub pods: usize,
    /// The WireGuard public key the node's `Node` object publishes (not yet checked).
    pub wireguard_public_key: Option<String>,
}

/// A pod of another node, for flow names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotePod {
    pub pod: String,
    pub node: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub desired: Desired,
    /// Local endpoint id -> its identity.
    pub endpoint_identity: BTreeMap<u32, u32>,
    /// Every identity in use with its labels, for display.
    pub identity_labels: BTreeMap<u32, Vec<String>>,
    pub policies: Vec<PolicySummary>,
    pub nodes: Vec<NodeSummary>,
    pub remote_pods: BTreeMap<IpAddr, RemotePod>,
    /// Which policies isolate each (endpoint, direction), for `weft policy explain`.
    pub isolated_by: BTreeMap<(u32, Direction), IsolatedBy>,
    /// Endpoints without an identity (the backend could not allocate one): not attached
    /// to any policy, so their traffic meets only default deny where isolated.
    pub problems: Vec<String>,
}

impl<'a> Model<'a> {
    pub fn new(
        node: &'a str,
        objects: impl Iterator<Item = &'a Sourced>,
        endpoints: impl Iterator<Item = &'a EndpointRecord>,
        host_addresses: &'a [IpAddr],
    ) -> Self {
        let mut model = Model {
            node,
            repository: Repository::new(),
            origins: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            pods: BTreeMap::new(),
            nodes: BTreeMap::new(),
            endpoints: endpoints.collect(),
            host_addresses,
        };
        for sourced in objects {
            match &sourced.object {
                Object::Policy(policy) => {
                    model
                        .origins
                        .insert(policy.id.to_string(), sourced.origin.clone());
                    model.repository.upsert((**policy).clone());
                }
                Object::Namespace(ns) => {
                    let name = ns.metadata.name.clone().unwrap_or_default();
                    let labels: Labels = ns.metadata.labels.clone().unwrap_or_default();
                    model.namespaces.insert(name, labels);
                }
                Object::Endpoint(ep) => {
                    let key = (
                        ep.metadata.namespace.clone().unwrap_or_default(),
                        ep.metadata.name.clone().unwrap_or_default(),
                    );
                    model.pods.insert(key, ep);
                }
                Object::Node(node) => {
                    let name = node.metadata.name.clone().unwrap_or_default();
                    model.nodes.insert(name, node);
                }
            }
        }
        model
    }

    fn namespace_labels(&self, ns: &str) -> Labels {
        let mut labels = self.namespaces.get(ns).cloned().unwrap_or_default();
        labels
            .entry(NAMESPACE_NAME_LABEL.into())
            .or_insert_with(|| ns.to_owned());
        labels
    }

    fn pod_labels(&self, ns: &str, name: &str, ep: Option<&Endpoint>) -> Labels {
        let (labels, sa) = ep.map_or_else(
            || (Labels::new(), DEFAULT_SERVICE_ACCOUNT.to_owned()),
            |ep| {
                (
                    ep.metadata.labels.clone().unwrap_or_default(),
                    ep.spec.service_account.clone(),
                )
            },
        );
        let _ = name;
        weft_policy::security_labels(&labels, ns, &sa, &self.namespace_labels(ns))
    }

    fn local_labels(&self, record: &EndpointRecord) -> Labels {
        let key = (record.pod_namespace.clone(), record.pod_name.clone());
        self.pod_labels(
            &record.pod_namespace,
            &record.pod_name,
            self.pods.get(&key).copied(),
        )
    }

    /// Names of the other nodes the source knows (the controller numbers them).
    pub fn remote_nodes(&self) -> impl Iterator<Item = &str> {
        self.nodes
            .keys()
            .map(String::as_str)
            .filter(|n| *n != self.node)
    }

    /// The identities this configuration needs: every pod's label set (local or not) and
    /// every CIDR prefix a policy names.
    pub fn needed(&self) -> Needed {
        let mut pods: BTreeSet<Labels> = self
            .pods
            .iter()
            .map(|((ns, name), ep)| self.pod_labels(ns, name, Some(ep)))
            .collect();
        pods.extend(self.endpoints.iter().map(|r| self.local_labels(r)));
        Needed {
            pods,
            cidrs: self.repository.cidr_prefixes(),
        }
    }

    /// The desired state, given the allocated identities and the node numbering.
    pub fn plan(
        &self,
        allocated: &Allocated,
        node_ids: &BTreeMap<String, u16>,
        options: &ResolveOptions,
    ) -> Plan {
        let mut plan = Plan::default();
        let identities: BTreeMap<u32, Labels> = allocated
            .pods
            .iter()
            .map(|(labels, id)| (*id, labels.clone()))
            .collect();

        // Local endpoints, with their identities.
        let mut local = Vec::new();
        for record in &self.endpoints {
            let labels = self.local_labels(record);
            let Some(id) = allocated.pods.get(&labels).copied() else {
                plan.problems.push(format!(
                    "pod {} has no identity (the identity table is full or unreachable): it \
                     matches no policy rule",
                    record.pod()
                ));
                continue;
            };
            plan.endpoint_identity.insert(record.id, id);
            let key = (record.pod_namespace.clone(), record.pod_name.clone());
            local.push(LocalEndpoint {
                endpoint_id: record.id,
                namespace: record.pod_namespace.clone(),
                name: record.pod_name.clone(),
                identity: id,
                labels,
                ports: self
                    .pods
                    .get(&key)
                    .map(|ep| ep.named_ports())
                    .unwrap_or_default(),
            });
        }

        // Named ports of every pod of the cluster, by identity (egress rules naming a port
        // resolve through the peers' ports).
        let named_ports = weft_policy::ports::named_ports_by_identity(self.pods.iter().filter_map(
            |((ns, name), ep)| {
                let labels = self.pod_labels(ns, name, Some(ep));
                let id = allocated.pods.get(&labels).copied()?;
                Some((id, ep.spec.ports.as_slice()))
            },
        ));
        let state = weft_policy::resolve(&ResolveInput {
            repository: &self.repository,
            endpoints: &local,
            identities: &identities,
            cidr_identities: &allocated.cidrs,
            named_ports: &named_ports,
            options: *options,
        });

        // ipcache, lowest precedence first: a later insert for the same prefix wins.
        let ipcache = &mut plan.desired.ipcache;
        for (prefix, id) in &allocated.cidrs {
            ipcache.insert(
                *prefix,
                IpcacheSpec {
                    identity: *id,
                    place: Place::Outside,
                },
            );
        }
        for (name, node) in &self.nodes {
            let Some(node_id) = node_ids.get(name).copied() else {
                continue;
            };
            if name == self.node {
                continue;
            }
            if let Some(underlay) = node.spec.addresses.first() {
                plan.desired.nodes.insert(
                    node_id,
                    NodeSpec {
                        underlay: *underlay,
                        encrypt: false,
                        encrypt_ifindex: 0,
                    },
                );
            }
            for addr in &node.spec.addresses {
                ipcache.insert(
                    host_prefix(*addr),
                    IpcacheSpec {
                        identity: REMOTE_NODE,
                        place: Place::RemoteNode { node: node_id },
                    },
                );
            }
        }
        let mut pods_per_node: BTreeMap<&str, usize> = BTreeMap::new();
        for ((ns, name), ep) in &self.pods {
            let node = ep.spec.node.as_deref().unwrap_or(self.node);
            *pods_per_node.entry(node).or_default() += 1;
            if node == self.node {
                continue;
            }
            let labels = self.pod_labels(ns, name, Some(ep));
            let Some(id) = allocated.pods.get(&labels).copied() else {
                continue;
            };
            let node_id = node_ids.get(node).copied().unwrap_or(0);
            for addr in &ep.spec.addresses {
                ipcache.insert(
                    host_prefix(*addr),
                    IpcacheSpec {
                        identity: id,
                        place: Place::RemotePod { node: node_id },
                    },
                );
                plan.remote_pods.insert(
                    *addr,
                    RemotePod {
                        pod: format!("{ns}/{name}"),
                        node: node.to_owned(),
                    },
                );
            }
        }
        for addr in self.host_addresses {
            ipcache.insert(
                host_prefix(*addr),
                IpcacheSpec {
                    identity: HOST,
                    place: Place::LocalNode,
                },
            );
        }
        for record in &self.endpoints {
            let Some(id) = plan.endpoint_identity.get(&record.id).copied() else {
                continue;
            };
            for net in &record.addresses {
                // The ifindex lets from_pod deliver pod-to-pod traffic straight to this pod,
                // and check that a pod sends from its own addresses.
                ipcache.insert(
                    host_prefix(net.addr()),
                    IpcacheSpec {
                        identity: id,
                        place: Place::LocalPod {
                            ifindex: record.ifindex,
                        },
                    },
                );
            }
            let policy = state.endpoints.get(&record.id).copied().unwrap_or_default();
            plan.desired.endpoints.insert(
                record.ifindex,
                EndpointSpec {
                    endpoint_id: record.id,
                    identity: id,
                    policy,
                },
            );
        }
        plan.desired.policy = state.entries;
        plan.isolated_by = state.isolated_by;

        // What the CLI shows.
        let mut shown: BTreeSet<u32> = (1..=7).collect();
        shown.extend(identities.keys().copied());
        for id in shown {
            let labels = reserved_labels(id).or_else(|| identities.get(&id).cloned());
            if let Some(labels) = labels {
                plan.identity_labels.insert(id, label_strings(&labels));
            }
        }
        for (prefix, id) in &allocated.cidrs {
            plan.identity_labels
                .insert(*id, label_strings(&cidr_labels(prefix)));
        }
        plan.policies = self
            .repository
            .iter()
            .map(|policy| PolicySummary {
                kind: policy.id.kind.to_string(),
                namespace: policy.id.namespace.clone(),
                name: policy.id.name.clone(),
                origin: self
                    .origins
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
        let mut names: BTreeSet<&str> = self.nodes.keys().map(String::as_str).collect();
        names.insert(self.node);
        plan.nodes = names
            .into_iter()
            .map(|name| {
                let node = self.nodes.get(name);
                NodeSummary {
                    name: name.to_owned(),
                    local: name == self.node,
                    addresses: node.map(|n| n.spec.addresses.clone()).unwrap_or_default(),
                    pod_cidrs: node.map(|n| n.spec.pod_cidrs.clone()).unwrap_or_default(),
                    pods: if name == self.node {
                        self.endpoints.len()
                    } else {
                        pods_per_node.get(name).copied().unwrap_or(0)
                    },
                    wireguard_public_key: node.and_then(|n| n.spec.wireguard_public_key.clone()),
                }
            })
            .collect();
        plan
    }
}

/// Endpoints whose policy entries or isolation differ between `old` and `new`.
pub fn changed_endpoints(old: &Desired, new: &Desired) -> BTreeSet<u32> {
    let mut changed = BTreeSet::new();
    let isolation = |d: &Desired| -> BTreeMap<u32, EndpointPolicy> {
        d.endpoints
            .values()
            .map(|e| (e.endpoint_id, e.policy))
            .collect()
    };
    let (old_iso, new_iso) = (isolation(old), isolation(new));
    for (id, policy) in &new_iso {
        if old_iso.get(id) != Some(policy) {
            changed.insert(*id);
        }
    }
    changed.extend(old_iso.keys().filter(|id| !new_iso.contains_key(id)));
    for (key, entry) in &new.policy {
        if old
            .policy
            .get(key)
            .is_none_or(|e| e.verdict != entry.verdict || e.audit != entry.audit)
        {
            changed.insert(key.endpoint_id);
        }
    }
    changed.extend(
        old.policy
            .keys()
            .filter(|k| !new.policy.contains_key(k))
            .map(|k| k.endpoint_id),
    );
    changed
}

fn host_prefix(addr: IpAddr) -> IpNet {
    IpNet::from(addr)
}

/// An endpoint whose new policy did not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub endpoint_id: u32,
    /// Whether the endpoint had a complete state before (it keeps that one); a new
    /// endpoint has none, and its CNI ADD is refused.
    pub kept_previous: bool,
    pub wanted: usize,
    pub reason: String,
    /// The policies whose entries it would need.
    pub policies: Vec<String>,
}

/// Keep a change that does not fit from half-applying: the policy core decides which
/// endpoints keep their previous entries and isolation (`old`), counting the peak while
/// [`crate::datapath::Datapath::apply`] writes (entries of endpoints that leave go first, new
/// entries are written before stale ones go); see `weft_policy::capacity_refusals`. An
/// ipcache that does not fit keeps its previous content whole.
pub fn fit(mut new: Desired, old: &Desired, capacity: Capacity, per_endpoint: usize) -> Fitted {
    // The endpoint map first: endpoints past its size, newest first, are not admitted.
    let mut refusals = Vec::new();
    if new.endpoints.len() > capacity.endpoints {
        let mut newcomers: Vec<(u32, u32)> = new
            .endpoints
            .iter()
            .filter(|(ifindex, _)| !old.endpoints.contains_key(ifindex))
            .map(|(ifindex, spec)| (spec.endpoint_id, *ifindex))
            .collect();
        newcomers.sort_unstable_by(|a, b| b.cmp(a));
        let excess = new.endpoints.len() - capacity.endpoints;
        for (endpoint_id, ifindex) in newcomers.into_iter().take(excess) {
            new.endpoints.remove(&ifindex);
            new.policy.retain(|k, _| k.endpoint_id != endpoint_id);
            refusals.push(Refusal {
                endpoint_id,
                kept_previous: false,
                wanted: 0,
                reason: format!(
                    "the endpoint map holds at most {} endpoints",
                    capacity.endpoints
                ),
                policies: Vec::new(),
            });
        }
    }
    let ids =
        |d: &Desired| -> BTreeSet<u32> { d.endpoints.values().map(|e| e.endpoint_id).collect() };
    let (old_ids, new_ids) = (ids(old), ids(&new));
    let refused = weft_policy::capacity_refusals(
        EntrySets {
            entries: &old.policy,
            endpoints: &old_ids,
        },
        EntrySets {
            entries: &new.policy,
            endpoints: &new_ids,
        },
        CapacityLimits {
            per_endpoint,
            total: capacity.policy,
        },
    );
    let over_capacity = refused.iter().any(CapacityRefusal::for_room);
    if !refused.is_empty() {
        let ids: BTreeSet<u32> = refused.iter().map(|r| r.endpoint_id).collect();
        new.policy.retain(|k, _| !ids.contains(&k.endpoint_id));
        for id in &ids {
            new.policy.extend(
                old.policy
                    .range(PolicyMapKey::first_of(*id)..)
                    .take_while(|(k, _)| k.endpoint_id == *id)
                    .map(|(k, e)| (*k, e.clone())),
            );
        }
        let old_policy: BTreeMap<u32, EndpointPolicy> = old
            .endpoints
            .values()
            .map(|e| (e.endpoint_id, e.policy))
            .collect();
        for spec in new.endpoints.values_mut() {
            if ids.contains(&spec.endpoint_id) {
                // A new endpoint has no previous policy: it is not admitted (its CNI ADD is
                // refused), and isolated both ways meanwhile.
                spec.policy =
                    old_policy
                        .get(&spec.endpoint_id)
                        .copied()
                        .unwrap_or(EndpointPolicy {
                            ingress: Isolation::Enforced,
                            egress: Isolation::Enforced,
                        });
            }
        }
    }
    refusals.extend(refused.into_iter().map(|r| Refusal {
        endpoint_id: r.endpoint_id,
        kept_previous: r.had_previous,
        wanted: r.wanted,
        reason: r.reason(),
        policies: r.grown_by,
    }));
    let mut ipcache_problem = None;
    if new.ipcache.len() > capacity.ipcache {
        ipcache_problem = Some(format!(
            "the ipcache needs {} entries and holds at most {}: it keeps its previous content",
            new.ipcache.len(),
            capacity.ipcache
        ));
        new.ipcache.clone_from(&old.ipcache);
    }
    Fitted {
        desired: new,
        refusals,
        ipcache_problem,
        over_capacity,
    }
}

/// What [`fit`] lets through.
#[derive(Debug)]
pub struct Fitted {
    pub desired: Desired,
    pub refusals: Vec<Refusal>,
    pub ipcache_problem: Option<String>,
    /// Some endpoint was refused for want of room: once the applied change has removed its
    /// stale entries, another round may have room for it.
    pub over_capacity: bool,
}

#[cfg(test)]
mod tests;

/// What this node's encryption device carries, as its reconciler last applied it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncryptionState {
    /// The device's ifindex.
    pub ifindex: u32,
    /// Nodes that are peers of the device with their key and whose pod CIDRs are routed
    /// into it.
    pub peers: BTreeSet<String>,
}

/// The encryption part of the desired state: which nodes' traffic goes through the device
/// (`encrypt`: only nodes the device has as peers now, per `state`; none without a device),
/// the strict setting, and under strict encryption the cluster's pod ranges: the configured
/// `cluster_cidrs` (unclaimed), every other node's pod CIDRs (that node's), this node's own
/// (local; they win over a remote node claiming the same prefix).
pub fn encryption_overlay(
    desired: &mut Desired,
    nodes: &[NodeSummary],
    node_ids: &BTreeMap<String, u16>,
    state: Option<&EncryptionState>,
    strict: bool,
    cluster_cidrs: &[IpNet],
) {
    let names: BTreeMap<u16, &str> = node_ids.iter().map(|(n, id)| (*id, n.as_str())).collect();
    for (id, spec) in &mut desired.nodes {
        let peer = state.is_some_and(|s| names.get(id).is_some_and(|n| s.peers.contains(*n)));
        spec.encrypt = peer;
        spec.encrypt_ifindex = if peer {
            state.map_or(0, |s| s.ifindex)
        } else {
            0
        };
    }
    desired.strict_encryption = strict;
    desired.encrypt_ifindex = state.map_or(0, |s| s.ifindex);
    desired.cluster.clear();
    if !strict {
        return;
    }
    for cidr in cluster_cidrs {
        desired.cluster.insert(cidr.trunc(), ClusterSpec::Unclaimed);
    }
    for node in nodes.iter().filter(|n| !n.local) {
        let spec = match node_ids.get(&node.name) {
            Some(id) => ClusterSpec::Node { node: *id },
            None => ClusterSpec::Unclaimed,
        };
        for cidr in &node.pod_cidrs {
            desired.cluster.insert(cidr.trunc(), spec);
        }
    }
    for node in nodes.iter().filter(|n| n.local) {
        for cidr in &node.pod_cidrs {
            desired.cluster.insert(cidr.trunc(), ClusterSpec::Local);
        }
    }
}
