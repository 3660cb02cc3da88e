//! weft-l7: the node's shared HTTP filter.
//!
//! The agent runs it as its own process (`weft-l7`), pushes a [`Config`] over the control
//! socket ([`control`]) and reads readiness and [`AccessRecord`]s back from it. The datapath
//! steers `redirect-l7` flows to its [`Listener`]; the [`Filter`] asks an [`IdentityLookup`]
//! who the source is, applies the HTTP rules of (endpoint, port, peer identity) to every
//! request, forwards allowed ones to the original destination and answers denied ones 403.
//! Until configured it resets every connection.
#![forbid(unsafe_code)]

pub mod access;
pub mod config;
pub mod control;
pub mod filter;
pub mod listener;
mod sniff;

pub use access::{AccessRecord, L7Verdict, Metrics};
pub use config::{Config, ConfigError, EndpointConfig, PortPolicy, Snapshot};
pub use control::{ControlClient, ControlError, ControlEvent, ControlRequest, serve_control};
pub use filter::{ConfigAddresses, Filter, IdentityLookup, Limits, WORLD};
pub use listener::{Accepted, Listener, ListenerConfig, ListenerError, OriginalDestination};
