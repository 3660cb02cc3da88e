//! Sources of configuration: where policies, endpoints' labels, namespaces and nodes come
//! from. Each source produces the same [`Snapshot`] of policy-core objects, so the daemon does
//! not care which one runs. `local` (a directory of YAML objects) is implemented; the
//! Kubernetes source (kube-rs reflectors) plugs in behind the same trait.

pub mod local;

use weft_policy::Object;

/// One object and where it came from (a file name, or a Kubernetes object reference).
#[derive(Debug, Clone)]
pub struct Sourced {
    pub origin: String,
    pub object: Object,
}

/// Everything a source currently holds. Objects that failed validation are not in
/// `objects`; when the source had a good version of them earlier, that version stays in
/// `objects` (the last good policy stays in force) and the failure is listed in `rejected`.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub objects: Vec<Sourced>,
    pub rejected: Vec<String>,
}

pub trait Source: Send {
    /// For `weft status`: `local:<dir>`, `kubernetes:<context>`.
    fn describe(&self) -> String;
    /// Read the current state (cheap when nothing changed).
    fn snapshot(&mut self) -> Snapshot;
}
