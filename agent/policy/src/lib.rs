//! weft's pure policy core: the CRD model, parsing and validation, security labels and
//! identities, selection, and resolution of policies into desired `policy` map entries.
//!
//! Stages, one module each (after cilium `pkg/policy`): `model` (wire types) -> `parse`
//! (validate, default, compile; `netpol` for Kubernetes `NetworkPolicy`) -> `repository`
//! (policies by kind/namespace/name) -> `resolve` (selected endpoints, peer identities, named
//! ports, isolation, enforcement mode) -> `mapstate` (entries with deny precedence and audit
//! verdicts, datapath lookup simulation, diffs) -> `capacity` (what fits the map). Beside
//! them, reading the same inputs: `status` (per-policy conditions) and `explain` (why a
//! connection passes or drops). `labels`, `selector`, `identity`, `ports` and `icmp` are the
//! vocabulary they share.
//!
//! No I/O, no clock, no async, no aya: everything here is a pure function over plain data.
//! The datapath module converts [`mapstate::PolicyMapKey`] into `weft_common::PolicyKey`;
//! this crate deliberately does not depend on `weft-common`.
//!
//! ```
//! use std::collections::BTreeMap;
//! use weft_policy::{
//!     CidrIdentityAllocator, Direction, IdentityAllocator, LocalEndpoint, Object, Repository,
//!     ResolveInput, ResolveOptions, Verdict, diff, parse_documents, resolve,
//! };
//! use weft_policy::ports::IPPROTO_TCP;
//!
//! let yaml = r#"
//! apiVersion: weft.io/v1alpha1
//! kind: WeftNetworkPolicy
//! metadata: {name: api-ingress, namespace: shop}
//! spec:
//!   endpointSelector: {matchLabels: {app: api}}
//!   ingress:
//!   - fromEndpoints: [{matchLabels: {app: frontend}}]
//!     toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
//! ---
//! apiVersion: weft.io/v1alpha1
//! kind: Endpoint
//! metadata: {name: api-0, namespace: shop, labels: {app: api}}
//! spec: {serviceAccount: api}
//! ---
//! apiVersion: weft.io/v1alpha1
//! kind: Endpoint
//! metadata: {name: web-0, namespace: shop, labels: {app: frontend}}
//! spec: {node: other-node}
//! "#;
//! let mut repo = Repository::new();
//! let mut ids = IdentityAllocator::new();
//! let mut local = Vec::new();
//! let mut web = 0;
//! for obj in parse_documents("shop.yaml", yaml).expect("valid") {
//!     match obj {
//!         Object::Policy(p) => { repo.upsert(*p); }
//!         Object::Endpoint(ep) => {
//!             let labels = ep.security_labels(&Default::default());
//!             let identity = ids.allocate(&labels).expect("identity");
//!             if ep.name() == "web-0" {
//!                 web = identity;
//!             }
//!             if ep.spec.node.is_none() {
//!                 local.push(LocalEndpoint {
//!                     endpoint_id: 1, // from the datapath's endpoint table
//!                     namespace: ep.namespace().into(),
//!                     name: ep.name().into(),
//!                     identity,
//!                     labels,
//!                     ports: ep.named_ports(),
//!                 });
//!             }
//!         }
//!         _ => {}
//!     }
//! }
//! let mut cidrs = CidrIdentityAllocator::new();
//! cidrs.sync(&repo.cidr_prefixes()).expect("cidr identities"); // then write them to the ipcache
//! let state = resolve(&ResolveInput {
//!     repository: &repo,
//!     endpoints: &local,
//!     identities: ids.pod_identities(),
//!     cidr_identities: cidrs.prefixes(),
//!     named_ports: &BTreeMap::new(), // ports::named_ports_by_identity over every pod
//!     options: ResolveOptions::default(),
//! });
//! assert!(!state.decide(1, Direction::Ingress, web, IPPROTO_TCP, 8080).drops());
//! assert!(state.decide(1, Direction::Ingress, web, IPPROTO_TCP, 22).drops());
//! let writes = diff(&Default::default(), &state); // map writes for the datapath
//! assert!(writes.upserts.iter().all(|(_, e)| e.verdict == Verdict::Allow));
//! ```
#![forbid(unsafe_code)]

pub mod capacity;
pub mod explain;
pub mod http;
pub mod icmp;
pub mod identity;
pub mod labels;
pub mod mapstate;
pub mod model;
pub mod netpol;
pub mod parse;
pub mod ports;
pub mod repository;
pub mod resolve;
pub mod selector;
pub mod status;

pub use capacity::{
    CapacityLimit, CapacityLimits, CapacityPlan, CapacityRefusal, EntrySets, capacity_refusals,
    fit_capacity,
};
pub use explain::{Explanation, Peer, explain};
pub use http::{HttpAllow, HttpMatcher, HttpRuleError, L7Policy, RequestView};
pub use identity::{CidrIdentityAllocator, IdentityAllocator, IdentityError, PersistedIdentities};
pub use labels::{Labels, security_labels};
pub use mapstate::{
    AuditChange, AuditEntry, Decision, DesiredState, Direction, EndpointPolicy, IsolatedBy,
    Isolation, MapEntry, PolicyMapKey, StateDiff, Verdict, diff,
};
pub use parse::{Object, ParseError, ValidationError, parse_documents};
pub use ports::{NamedPorts, PortPrefix, named_ports_by_identity};
pub use repository::{Policy, PolicyId, PolicyKind, Repository};
pub use resolve::{EnforcementMode, LocalEndpoint, ResolveInput, ResolveOptions, resolve};
pub use status::{PolicyStatusReport, policy_status};
