//! weft-agent: the node daemon. The pure policy core lives in `weft-policy`, the wire
//! protocol in `weft-api`; here: the controller (the one writer of node state), the
//! datapath (the only user of aya and the only module that knows the kernel ABI), the
//! configuration sources, identity allocation, the endpoint registry, and the API.
//!
//! Data flows one way: source -> controller -> plan (pure) -> datapath; the API and flow
//! enrichment read the published view.
#![deny(unsafe_code)]

pub mod config;
pub mod controller;
pub mod daemon;
pub mod datapath;
pub mod encryption;
pub mod endpoints;
pub mod explain;
pub mod fsutil;
pub mod identity;
pub mod l7;
pub mod netns;
pub mod observe;
pub mod plan;
pub mod podnet;
pub mod server;
pub mod source;
pub mod view;
