//! weft agent: the node daemon (`weft-agent`), the operator CLI (`weft`) and the chained CNI
//! plugin (`weft-cni`). The pure policy core lives in the `weft-policy` crate; `datapath` is
//! the only module that touches aya.
pub mod api;
pub mod cni;
pub mod daemon;
pub mod datapath;
pub mod netns;
pub mod observe;
pub mod policy_view;
pub mod server;
pub mod source;
