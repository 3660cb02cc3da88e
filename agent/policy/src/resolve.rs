//! Resolution: which policies select which local endpoint, which peer identities each rule
//! means, and the resulting desired map state.
//!
//! A pure function of (repository, local endpoints, identity tables). It decides isolation
//! and audit per endpoint and direction and hands rule contributions to `mapstate`, which
//! owns deny precedence and key semantics.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use serde::Serialize;

use crate::identity::{ANY, HEALTH, HOST, INIT, KUBE_APISERVER, REMOTE_NODE, UNMANAGED, WORLD};
use crate::labels::Labels;
use crate::mapstate::{
    DesiredState, Direction, DirectionBuilder, EndpointPolicy, Isolation, L4Key,
};
use crate::model::{Enforcement, Entity};
use crate::ports::PortPrefix;
use crate::repository::{L4, Peers, Policy, Repository, Rule, Section};

/// A pod on this node, as the agent knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LocalEndpoint {
    pub endpoint_id: u32,
    pub namespace: String,
    pub name: String,
    pub identity: u32,
    /// Security labels (see `labels::security_labels`).
    pub labels: Labels,
}

/// Knobs of resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResolveOptions {
    /// Allow the local node (`host`) to reach its pods in every isolated ingress direction,
    /// for kubelet health checks (Cilium's `allow-localhost=always`). Deny rules that match
    /// the host still win. Other nodes get no such exemption.
    pub allow_host_ingress: bool,
}

impl Default for ResolveOptions {
    fn default() -> Self {
        ResolveOptions {
            allow_host_ingress: true,
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
    pub options: ResolveOptions,
}

/// The desired map state of every local endpoint.
pub fn resolve(input: &ResolveInput<'_>) -> DesiredState {
    let mut state = DesiredState::default();
    let mut peer_cache: BTreeMap<(usize, Section, usize), BTreeSet<u32>> = BTreeMap::new();
    let policies: Vec<&Policy> = input.repository.iter().collect();
    for ep in input.endpoints {
        let selecting: Vec<(usize, &Policy)> = policies
            .iter()
            .enumerate()
            .filter(|(_, p)| selects(p, ep))
            .map(|(i, p)| (i, *p))
            .collect();
        let mut ep_policy = EndpointPolicy::default();
        for direction in [Direction::Ingress, Direction::Egress] {
            let (allow_sec, deny_sec) = sections(direction);
            let isolating: Vec<(usize, &Policy)> = selecting
                .iter()
                .filter(|(_, p)| p.rules(allow_sec).is_some() || p.rules(deny_sec).is_some())
                .copied()
                .collect();
            if isolating.is_empty() {
                continue;
            }
            let enforced = isolating
                .iter()
                .any(|(_, p)| p.enforcement == Enforcement::Enforce);
            let isolation = if enforced {
                Isolation::Enforced
            } else {
                Isolation::Audit
            };
            match direction {
                Direction::Ingress => ep_policy.ingress = isolation,
                Direction::Egress => ep_policy.egress = isolation,
            }
            let mut builder = DirectionBuilder::default();
            if direction == Direction::Ingress && input.options.allow_host_ingress {
                builder.allow(
                    HOST,
                    (None, PortPrefix::ANY),
                    false,
                    false,
                    HOST_INGRESS_RULE,
                );
            }
            // When an enforcing policy isolates this direction, audit policies are left out:
            // their denies would be reported only and their allows would open what the
            // enforcing policies keep closed, so a dry run could change enforcement.
            for (pi, policy) in isolating
                .iter()
                .filter(|(_, p)| !enforced || p.enforcement == Enforcement::Enforce)
            {
                for section in [allow_sec, deny_sec] {
                    for rule in policy.rules(section).unwrap_or_default() {
                        let peers = peer_cache
                            .entry((*pi, section, rule.index))
                            .or_insert_with(|| peer_identities(&rule.peers, input));
                        let origin = format!("{} {}[{}]", policy.id, section.field(), rule.index);
                        for &identity in peers.iter() {
                            for (l4, l7) in l4_keys(rule) {
                                if section.is_deny() {
                                    builder.deny(identity, l4, &origin);
                                } else {
                                    builder.allow(identity, l4, l7, rule.auth_required, &origin);
                                }
                            }
                        }
                    }
                }
            }
            builder.finish(ep.endpoint_id, direction, !enforced, &mut state.entries);
        }
        state.endpoints.insert(ep.endpoint_id, ep_policy);
    }
    state
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
pub fn selects(policy: &Policy, ep: &LocalEndpoint) -> bool {
    policy
        .id
        .namespace
        .as_deref()
        .is_none_or(|ns| ns == ep.namespace)
        && policy.subject.matches(&ep.labels)
}

fn l4_keys(rule: &Rule) -> Vec<(L4Key, bool)> {
    match &rule.l4 {
        L4::Any => vec![((None, PortPrefix::ANY), false)],
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
