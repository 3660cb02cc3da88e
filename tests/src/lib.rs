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

mod cgroup;
mod cluster;
mod netns;
mod node;
mod outside;
mod pod;
mod prefix;
mod probe;
mod prober;
pub mod process;
pub mod shop;
mod support;

pub use cluster::{Cluster, ClusterOptions};
pub use netns::{NetNs, in_netns};
pub use node::{Node, NodeOptions, bin_dir, set_bin_dir};
pub use outside::{NARROW_MTU, Outside};
pub use pod::{CniCall, ContainerPort, Pod, ptp_conf};
pub use prefix::{TestPrefix, agent_processes, remove_prefix, sweep_stale};
pub use probe::tcp_roundtrip;
pub use prober::{Probe, Prober, Tally};
pub use support::{CONVERGE, eventually, eventually_within, json, policy_yaml};

/// Where Debian's `containernetworking-plugins` puts the reference plugins.
pub const CNI_PLUGIN_DIR: &str = "/usr/lib/cni";

/// The reference plugins the harness runs: `$WEFT_CNI_PLUGIN_DIR` (a VM guest's tmpfs
/// copy, see `cargo xtask vm-test`) or [`CNI_PLUGIN_DIR`].
pub fn cni_plugin_dir() -> std::path::PathBuf {
    std::env::var_os("WEFT_CNI_PLUGIN_DIR")
        .map_or_else(|| CNI_PLUGIN_DIR.into(), std::path::PathBuf::from)
}

/// `None` when this test can run here, or the reason it cannot (printed by the caller).
pub fn privileged_reason() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root (network namespaces, bpffs)".into());
    }
    let plugins = cni_plugin_dir();
    if !plugins.join("ptp").exists() {
        return Some(format!(
            "{}/ptp missing: run `cargo xtask setup` (containernetworking-plugins)",
            plugins.display()
        ));
    }
    None
}

/// Print why the calling test is skipped and return `true` when it cannot run here.
///
/// ```ignore
/// if weft_tests::skip_unless_privileged("pods_ping") { return; }
/// ```
/// Under `CI=true` a test that cannot run is a failure, never a silent pass: this panics
/// instead of returning `true`.
pub fn skip_unless_privileged(test: &str) -> bool {
    match privileged_reason() {
        Some(reason) if ci() => panic!("{test} cannot run in CI: {reason}"),
        Some(reason) => {
            eprintln!("SKIPPED {test}: {reason}");
            true
        }
        None => false,
    }
}

/// Whether this runs in CI (`CI=true`), where nothing may be skipped.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}
