//! The validated, compiled form of policies and the repository that holds them, keyed by
//! kind/namespace/name.
//!
//! Only `parse` builds a [`Policy`] (so every policy here passed validation); `resolve` reads
//! them. The repository stores and replaces whole policies: it never merges or interprets.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

use crate::model::{Enforcement, Entity, HttpRule, PolicySpec};
use crate::netpol::NetworkPolicySpec;
use crate::parse::FieldProblem;
use crate::ports::PortPrefix;
use crate::selector::Selector;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum PolicyKind {
    WeftNetworkPolicy,
    WeftClusterwideNetworkPolicy,
    /// A Kubernetes `networking.k8s.io/v1` `NetworkPolicy`, translated by `netpol`.
    NetworkPolicy,
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyKind::WeftNetworkPolicy => "WeftNetworkPolicy",
            PolicyKind::WeftClusterwideNetworkPolicy => "WeftClusterwideNetworkPolicy",
            PolicyKind::NetworkPolicy => "NetworkPolicy",
        })
    }
}

/// Key of a policy: kind, namespace (namespaced kinds only) and name. Displays as
/// `WeftNetworkPolicy shop/api-ingress` or `WeftClusterwideNetworkPolicy deny-world`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PolicyId {
    pub kind: PolicyKind,
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// Which list of a policy a rule is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Section {
    Ingress,
    IngressDeny,
    Egress,
    EgressDeny,
}

impl Section {
    pub const ALL: [Section; 4] = [
        Section::Ingress,
        Section::IngressDeny,
        Section::Egress,
        Section::EgressDeny,
    ];

    /// The YAML field name (`ingressDeny`).
    #[must_use]
    pub fn field(self) -> &'static str {
        match self {
            Section::Ingress => "ingress",
            Section::IngressDeny => "ingressDeny",
            Section::Egress => "egress",
            Section::EgressDeny => "egressDeny",
        }
    }

    #[must_use]
    pub fn is_deny(self) -> bool {
        matches!(self, Section::IngressDeny | Section::EgressDeny)
    }
}

/// `cidr` minus every `except` prefix (each except lies inside `cidr`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CidrSelector {
    pub cidr: IpNet,
    pub except: Vec<IpNet>,
}

/// Peers of a rule: the union of its endpoint selectors (already namespace-scoped), entities
/// and CIDR selectors; `any` when the rule names no peer at all.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Peers {
    pub any: bool,
    pub endpoints: Vec<Selector>,
    pub entities: BTreeSet<Entity>,
    pub cidrs: Vec<CidrSelector>,
}

/// One (protocol, port prefix) a rule matches. `protocol` is an IP protocol number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct L4Match {
    pub protocol: u8,
    pub port: PortPrefix,
    /// The port rule carries HTTP rules (their index in [`Rule::http`]): traffic must go
    /// through the L7 filter.
    pub l7: Option<u16>,
}

/// A port named in a rule (`port: http`), kept by name: it means a number only once the pods
/// it applies to are known (`resolve`: the selected endpoint's ports for ingress, each peer
/// identity's ports for egress).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct NamedPortMatch {
    pub name: String,
    /// IP protocol the named port must have (a rule port of any protocol yields one match
    /// per protocol of [`crate::ports::PORT_PROTOCOLS`]).
    pub protocol: u8,
    /// The port rule carries HTTP rules (their index in [`Rule::http`]).
    pub l7: Option<u16>,
}

/// What a rule matches at L4.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum L4 {
    /// No `toPorts`/`ports` and no `icmps`: every protocol, ICMP included.
    Any,
    /// Exactly these (protocol, port) prefixes, plus the rule's `named_ports`. Empty only when
    /// every port the rule names is named.
    Ports(Vec<L4Match>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub section: Section,
    /// Position in its section, for `derived_from` (`ingress[0]`).
    pub index: usize,
    pub peers: Peers,
    pub l4: L4,
    /// Ports named instead of numbered (only with [`L4::Ports`]).
    pub named_ports: Vec<NamedPortMatch>,
    /// `authentication.mode: required`.
    pub auth_required: bool,
    /// The HTTP rules of the rule's `toPorts` entries that have some, indexed by
    /// [`L4Match::l7`] and [`NamedPortMatch::l7`].
    pub http: Vec<HttpRules>,
}

/// The HTTP rules of one `toPorts` entry, shared by every key it yields.
pub type HttpRules = Arc<[HttpRule]>;

impl Rule {
    /// `ingress[0]`: the rule's place in its policy, as `derived_from` and status name it.
    #[must_use]
    pub fn path(&self) -> String {
        format!("{}[{}]", self.section.field(), self.index)
    }
}

/// A validated policy, ready for resolution.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Policy {
    pub id: PolicyId,
    pub enforcement: Enforcement,
    /// The endpoint selector, scoped to the namespace for namespaced policies.
    pub subject: Selector,
    /// Rules per section; `None` when the section is absent (a present empty list isolates).
    /// A `NetworkPolicy` has a section exactly for each of its (defaulted) `policyTypes`.
    pub sections: BTreeMap<Section, Vec<Rule>>,
    /// The spec as written (with the API server's defaults filled in), for `weft policy get`.
    pub spec: WrittenSpec,
    /// What was accepted but deserves a word (a `NetworkPolicy` `egress` section that its
    /// `policyTypes` leave without effect, a selector on a label that is never part of an
    /// identity): shown in the `Enforced` condition by `status`.
    pub warnings: Vec<FieldProblem>,
}

/// The spec of a policy object, by dialect.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum WrittenSpec {
    Weft(PolicySpec),
    NetworkPolicy(NetworkPolicySpec),
}

impl Policy {
    pub fn rules(&self, section: Section) -> Option<&[Rule]> {
        self.sections.get(&section).map(Vec::as_slice)
    }

    /// Every prefix this policy names (`cidr` and `except`), which need CIDR identities.
    #[must_use]
    pub fn cidr_prefixes(&self) -> BTreeSet<IpNet> {
        let mut out = BTreeSet::new();
        for rule in self.sections.values().flatten() {
            for c in &rule.peers.cidrs {
                out.insert(c.cidr);
                out.extend(c.except.iter().copied());
            }
        }
        out
    }
}

/// All policies in force, keyed by [`PolicyId`], with a revision bumped on every change.
#[derive(Clone, Debug, Default)]
pub struct Repository {
    policies: BTreeMap<PolicyId, Policy>,
    revision: u64,
}

impl Repository {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Insert or replace a policy. Returns whether anything changed.
    pub fn upsert(&mut self, policy: Policy) -> bool {
        if self.policies.get(&policy.id) == Some(&policy) {
            return false;
        }
        self.policies.insert(policy.id.clone(), policy);
        self.revision += 1;
        true
    }

    pub fn remove(&mut self, id: &PolicyId) -> Option<Policy> {
        let removed = self.policies.remove(id);
        if removed.is_some() {
            self.revision += 1;
        }
        removed
    }

    #[must_use]
    pub fn get(&self, id: &PolicyId) -> Option<&Policy> {
        self.policies.get(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Policy> {
        self.policies.values()
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Bumped on every change; lets callers skip resolution when nothing changed.
    #[must_use]
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Every prefix any policy names: feed to `CidrIdentityAllocator::sync`. `/0` prefixes
    /// are left out: they mean the `world` identity, not a CIDR identity.
    pub fn cidr_prefixes(&self) -> BTreeSet<IpNet> {
        self.policies
            .values()
            .flat_map(Policy::cidr_prefixes)
            .filter(|p| p.prefix_len() > 0)
            .collect()
    }
}
