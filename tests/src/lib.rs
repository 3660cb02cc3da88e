//! The integration-test harness: nodes and pods in network namespaces on the real kernel.
//!
//! A [`Node`] is a network namespace with one `weft-agent` inside it (or none, for harness
//! smoke tests); a [`Pod`] is a network namespace attached by the real CNI plugins
//! (`loopback`, `ptp` + `host-local`, then `weft-cni`), invoked exactly as a container runtime
//! would. Everything carries a per-test [`TestPrefix`] and is removed on `Drop`, also when the
//! test panics. This crate never touches the host's own interfaces, routes or firewall.
//!
//! Tests panic (`expect` with a message) rather than return errors; a test that cannot run
//! here calls [`skip_unless_privileged`] and returns with a printed reason.

#![forbid(unsafe_code)]

mod netns;
mod node;
mod pod;
mod prefix;
mod probe;

pub use netns::{NetNs, in_netns};
pub use node::{Node, bin_dir, set_bin_dir};
pub use pod::{Pod, ptp_conf};
pub use prefix::{TestPrefix, agent_processes, sweep_stale};
pub use probe::tcp_roundtrip;

use std::path::Path;

/// Where Debian's `containernetworking-plugins` puts the reference plugins.
pub const CNI_PLUGIN_DIR: &str = "/usr/lib/cni";

/// `None` when this test can run here, or the reason it cannot (printed by the caller).
pub fn privileged_reason() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root (network namespaces, bpffs)".into());
    }
    if !Path::new(CNI_PLUGIN_DIR).join("ptp").exists() {
        return Some(format!(
            "{CNI_PLUGIN_DIR}/ptp missing: run `cargo xtask setup` (containernetworking-plugins)"
        ));
    }
    None
}

/// Print why the calling test is skipped and return `true` when it cannot run here.
///
/// ```ignore
/// if weft_tests::skip_unless_privileged("pods_ping") { return; }
/// ```
pub fn skip_unless_privileged(test: &str) -> bool {
    match privileged_reason() {
        Some(reason) => {
            eprintln!("SKIPPED {test}: {reason}");
            true
        }
        None => false,
    }
}
