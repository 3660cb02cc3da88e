//! Resolution: which policies select which local endpoint, which peer identities each rule
//! means, and the resulting desired map state.
//!
//! A pure function of (repository, local endpoints, identity and named-port tables, options).
//! It decides isolation per endpoint and direction (from the selecting policies and the
//! node's enforcement mode), resolves named ports (ingress: the selected pod's own ports;
//! egress: each peer identity's), and hands rule contributions to `mapstate`, which owns
//! deny precedence, key semantics and the merge of enforced and audit verdicts. Enforcing and
//! audit policies are resolved apart, so an audit policy can never change what is enforced.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;
use serde::Serialize;

use crate::identity::{ANY, HEALTH, HOST, INIT, KUBE_APISERVER, REMOTE_NODE, UNMANAGED, WORLD};
use crate::labels::Labels;
use crate::mapstate::{
    DesiredState, Direction, DirectionBuilder, DirectionEntries, EndpointPolicy, IsolatedBy,
    Isolation, L4Key, emit, merge_audit,
};
use crate::model::{Enforcement, Entity};
use crate::ports::{NamedPorts, PortPrefix};
use crate::repository::{L4, NamedPortMatch, Peers, Policy, Repository, Rule, Section};

/// A pod on this node, as the agent knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LocalEndpoint {
    pub endpoint_id: u32,
    pub namespace: String,
    pub name: String,
    pub identity: u32,
    /// Security labels (see `labels::security_labels`).
    pub labels: Labels,
    /// The pod's own named container ports (`Endpoint::named_ports`): ingress rules naming a
    /// port resolve through these.
    pub ports: NamedPorts,
}

/// The node-wide policy enforcement mode, as Cilium's `policy-enforcement` / `enable-policy`
/// (docs.cilium.io, "Policy Enforcement Modes").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum EnforcementMode {
    /// An endpoint is isolated in a direction once a policy selects it with a section for it.
    #[default]
    Default,
    /// Every endpoint is isolated in both directions, selected or not: only what policies
    /// allow passes. The node still reaches its own pods when `allow_host_ingress` is set, as
    /// Cilium's `allow-localhost` (which Kubernetes mode sets to `always`) applies whatever
    /// the enforcement mode.
    Always,
    /// No endpoint is isolated and no entry is written: everything passes, deny rules
    /// included. Policies are still parsed and reported (their `Enforced` condition is false).
    Never,
}

impl fmt::Display for EnforcementMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EnforcementMode::Default => "default",
            EnforcementMode::Always => "always",
            EnforcementMode::Never => "never",
        })
    }
}

/// Why an enforcement mode could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown policy enforcement mode {0:?} (hint: default, always or never, as Cilium's)")]
pub struct EnforcementModeError(pub String);

impl FromStr for EnforcementMode {
    type Err = EnforcementModeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "default" => Ok(EnforcementMode::Default),
            "always" => Ok(EnforcementMode::Always),
            "never" => Ok(EnforcementMode::Never),
            other => Err(EnforcementModeError(other.to_string())),
        }
    }
}

/// Knobs of resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResolveOptions {
    /// Allow the local node (`host`) to reach its pods in every isolated ingress direction,
    /// for kubelet health checks (Cilium's `allow-localhost=always`). Deny rules that match
    /// the host still win. Other nodes get no such exemption.
    pub allow_host_ingress: bool,
    /// The node-wide enforcement mode.
    pub enforcement_mode: EnforcementMode,
    /// Whether the node's L7 filter is running. Resolution does not change with it (ports
    /// with HTTP rules always redirect, and the datapath fails closed while the filter is
    /// down); `status` warns on every policy whose HTTP rules cannot be enforced.
    pub l7_available: bool,
}

impl Default for ResolveOptions {
    fn default() -> Self {
        ResolveOptions {
            allow_host_ingress: true,
            enforcement_mode: EnforcementMode::Default,
            l7_available: false,
        }
    }
}

/// `derived_from` text of the host exemption.
pub const HOST_INGRESS_RULE: &str = "reserved: the node may reach its own pods";

/// Everything resolution reads.
#[derive(Clone, Copy, Debug)]
pub struct ResolveInput<'a> {
    pub repository: &'a Repository,
    /// Endpoints of this node.
    pub endpoints: &'a [LocalEndpoint],
    /// Every pod identity of the cluster with its labels (`IdentityAllocator::pod_identities`).
    pub identities: &'a BTreeMap<u32, Labels>,
    /// `prefix -> CIDR identity` (`CidrIdentityAllocator::prefixes`).
    pub cidr_identities: &'a BTreeMap<IpNet, u32>,
    /// Named ports of every pod identity of the cluster
    /// (`ports::named_ports_by_identity`): egress rules naming a port resolve through the
    /// ports of each peer identity.
    pub named_ports: &'a BTreeMap<u32, NamedPorts>,
    pub options: ResolveOptions,
}

type PeerCache = BTreeMap<(usize, Section, usize), BTreeSet<u32>>;

/// The desired map state of every local endpoint.
#[must_use]
pub fn resolve(input: &ResolveInput<'_>) -> DesiredState {
    let mut state = DesiredState::default();
    let mut peer_cache = PeerCache::new();
    let policies: Vec<&Policy> = input.repository.iter().collect();
    let mode = input.options.enforcement_mode;
    // Collected, then built in one go: a map built from sorted entries has full nodes,
    // about two thirds of one filled entry by entry (it is the agent's largest structure).
    let mut entries = Vec::new();
    for ep in input.endpoints {
        let mut ep_policy = EndpointPolicy::default();
        if mode == EnforcementMode::Never {
            state.endpoints.insert(ep.endpoint_id, ep_policy);
            continue;
        }
        let selecting: Vec<(usize, &Policy)> = policies
            .iter()
            .enumerate()
            .filter(|(_, p)| selects(p, ep))
            .map(|(i, p)| (i, *p))
            .collect();
        for direction in [Direction::Ingress, Direction::Egress] {
            let (allow_sec, deny_sec) = sections(direction);
            let isolating: Vec<(usize, &Policy)> = selecting
                .iter()
                .filter(|(_, p)| p.rules(allow_sec).is_some() || p.rules(deny_sec).is_some())
                .copied()
                .collect();
            let (enforcing, audit): (Vec<_>, Vec<_>) = isolating
                .iter()
                .partition(|(_, p)| p.enforcement == Enforcement::Enforce);
            let enforced = !enforcing.is_empty() || mode == EnforcementMode::Always;
            if !enforced && audit.is_empty() {
                continue;
            }
            let isolated_by = IsolatedBy {
                enforcing: enforcing.iter().map(|(_, p)| p.id.clone()).collect(),
                audit: audit.iter().map(|(_, p)| p.id.clone()).collect(),
                mode_always: mode == EnforcementMode::Always,
            };
            let isolation = if enforced {
                Isolation::Enforced
            } else {
                Isolation::Audit
            };
            match direction {
                Direction::Ingress => ep_policy.ingress = isolation,
                Direction::Egress => ep_policy.egress = isolation,
            }
            let mut build = |set: &[(usize, &Policy)]| {
                direction_entries(input, ep, direction, set, &mut peer_cache)
            };
            // The enforced verdicts come from the enforcing policies alone; where audit
            // policies apply, the entries also carry what all of them together would decide.
            let direction_entries = if audit.is_empty() {
                build(&enforcing)
            } else {
                let enforced_entries = enforced.then(|| build(&enforcing));
                let full = build(&isolating);
                merge_audit(
                    enforced_entries.as_ref(),
                    &full,
                    &isolated_by.default_deny_text(direction),
                )
            };
            // Exactly: doubling would leave up to half of the largest buffer unused.
            entries.reserve_exact(direction_entries.values().map(BTreeMap::len).sum());
            emit(ep.endpoint_id, direction, direction_entries, &mut entries);
            state
                .isolated_by
                .insert((ep.endpoint_id, direction), isolated_by);
        }
        state.endpoints.insert(ep.endpoint_id, ep_policy);
    }
    entries.sort_unstable_by_key(|e| e.0);
    state.entries = entries.into_iter().collect();
    state
}

/// The entries one set of policies gives one direction of `ep` (as if only they existed).
fn direction_entries(
    input: &ResolveInput<'_>,
    ep: &LocalEndpoint,
    direction: Direction,
    policies: &[(usize, &Policy)],
    peer_cache: &mut PeerCache,
) -> DirectionEntries {
    let (allow_sec, deny_sec) = sections(direction);
    let mut builder = DirectionBuilder::default();
    if direction == Direction::Ingress && input.options.allow_host_ingress {
        builder.allow(
            HOST,
            (None, PortPrefix::ANY),
            None,
            false,
            HOST_INGRESS_RULE,
        );
    }
    for (pi, policy) in policies {
        for section in [allow_sec, deny_sec] {
            for rule in policy.rules(section).unwrap_or_default() {
                let peers = peer_cache
                    .entry((*pi, section, rule.index))
                    .or_insert_with(|| peer_identities(&rule.peers, input));
                let origin = format!("{} {}", policy.id, rule.path());
                let mut add = |identity: u32, (l4, l7): (L4Key, Option<u16>)| {
                    if section.is_deny() {
                        builder.deny(identity, l4, &origin);
                    } else {
                        let http = l7.and_then(|i| rule.http.get(usize::from(i)));
                        builder.allow(identity, l4, http, rule.auth_required, &origin);
                    }
                };
                let numbered = l4_keys(rule);
                for &identity in peers.iter() {
                    for &k in &numbered {
                        add(identity, k);
                    }
                }
                if rule.named_ports.is_empty() {
                    continue;
                }
                match direction {
                    // Ingress: the ports of the selected pod itself.
                    Direction::Ingress => {
                        let keys = named_keys(&rule.named_ports, Some(&ep.ports));
                        for &identity in peers.iter() {
                            for &k in &keys {
                                add(identity, k);
                            }
                        }
                    }
                    // Egress: the ports of each peer, so entries are per peer identity; a
                    // rule open to every peer reaches every pod identity that has the name.
                    Direction::Egress => {
                        let targets: Vec<u32> = if peers.contains(&ANY) {
                            input.named_ports.keys().copied().collect()
                        } else {
                            peers.iter().copied().collect()
                        };
                        for identity in targets {
                            for k in named_keys(&rule.named_ports, input.named_ports.get(&identity))
                            {
                                add(identity, k);
                            }
                        }
                    }
                }
            }
        }
    }
    builder.finish()
}

/// The (protocol, port) keys that a rule's named ports mean on a pod with `ports`. A name the
/// pod does not define, or defines with another protocol, means nothing (Kubernetes: the
/// port does not match).
fn named_keys(named: &[NamedPortMatch], ports: Option<&NamedPorts>) -> Vec<(L4Key, Option<u16>)> {
    let Some(ports) = ports else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for m in named {
        for pp in ports.get(&m.name).into_iter().flatten() {
            if pp.protocol == m.protocol {
                out.push(((Some(pp.protocol), PortPrefix::exact(pp.port)), m.l7));
            }
        }
    }
    out
}

fn sections(direction: Direction) -> (Section, Section) {
    match direction {
        Direction::Ingress => (Section::Ingress, Section::IngressDeny),
        Direction::Egress => (Section::Egress, Section::EgressDeny),
    }
}

/// Whether `policy` applies to `ep`. A namespaced policy only ever selects endpoints of its
/// own namespace (its subject selector is scoped, and the namespace is checked again here so
/// that labels alone can never pull a pod under another namespace's policy).
#[must_use]
pub fn selects(policy: &Policy, ep: &LocalEndpoint) -> bool {
    policy
        .id
        .namespace
        .as_deref()
        .is_none_or(|ns| ns == ep.namespace)
        && policy.subject.matches(&ep.labels)
}

/// The numbered L4 keys of a rule (named ports aside).
fn l4_keys(rule: &Rule) -> Vec<(L4Key, Option<u16>)> {
    match &rule.l4 {
        L4::Any => vec![((None, PortPrefix::ANY), None)],
        L4::Ports(ms) => ms
            .iter()
            .map(|m| ((Some(m.protocol), m.port), m.l7))
            .collect(),
    }
}

/// Reserved identities that are part of the `cluster` entity.
pub const CLUSTER_RESERVED: [u32; 6] = [HOST, REMOTE_NODE, HEALTH, INIT, UNMANAGED, KUBE_APISERVER];

/// The identities a rule's peers mean. Contains [`ANY`] alone when the rule matches every
/// peer (no peer field, or the `all` entity).
#[must_use]
pub fn peer_identities(peers: &Peers, input: &ResolveInput<'_>) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    if peers.any || peers.entities.contains(&Entity::All) {
        out.insert(ANY);
        return out;
    }
    for entity in &peers.entities {
        match entity {
            Entity::All => {}
            Entity::World => {
                out.insert(WORLD);
                out.extend(input.cidr_identities.values().copied());
            }
            Entity::Cluster => {
                out.extend(input.identities.keys().copied());
                out.extend(CLUSTER_RESERVED);
            }
            Entity::Host => {
                out.insert(HOST);
            }
            Entity::RemoteNode => {
                out.insert(REMOTE_NODE);
            }
            Entity::Health => {
                out.insert(HEALTH);
            }
            Entity::Init => {
                out.insert(INIT);
            }
            Entity::Unmanaged => {
                out.insert(UNMANAGED);
            }
            Entity::KubeApiserver => {
                out.insert(KUBE_APISERVER);
            }
        }
    }
    for sel in &peers.endpoints {
        out.extend(
            input
                .identities
                .iter()
                .filter(|(_, labels)| sel.matches(labels))
                .map(|(id, _)| *id),
        );
    }
    for c in &peers.cidrs {
        if c.cidr.prefix_len() == 0 {
            out.insert(WORLD);
        }
        out.extend(
            input
                .cidr_identities
                .iter()
                .filter(|(prefix, _)| {
                    c.cidr.contains(*prefix) && !c.except.iter().any(|e| e.contains(*prefix))
                })
                .map(|(_, id)| *id),
        );
    }
    out
}

#[cfg(test)]
mod tests;
