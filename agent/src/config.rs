//! The agent's settings, from the command line; everything has a default that fits a node
//! of a real cluster, and tests shorten the intervals.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

#[derive(Debug, Clone)]
pub struct Config {
    pub node: String,
    /// This node's underlay addresses and pod CIDRs: when given, the agent publishes the
    /// node's `Node` object from them (other agents learn the node from it).
    pub node_addresses: Vec<IpAddr>,
    pub pod_cidrs: Vec<IpNet>,
    pub source_dir: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub bpffs_dir: PathBuf,
    pub verbose: bool,
    pub ct_gc_interval: Duration,
    /// Entries of the conntrack map when the agent creates it.
    pub conntrack_max_entries: usize,
    /// How long a released identity waits before another label set may take its id.
    pub identity_grace: Duration,
    /// Most policy-map entries one endpoint may have.
    pub policy_entries_per_endpoint: usize,
    /// How often pinned objects and map contents are checked against what the agent wrote.
    pub verify_interval: Duration,
    pub limits: ApiLimits,
    /// Node-to-node encryption of pod traffic.
    pub encryption: EncryptionMode,
    /// Strict encryption: the datapath drops pod traffic to and from other nodes that does
    /// not go through the encryption device (`unencrypted`). Needs `encryption` on.
    pub encryption_strict: bool,
    /// The cluster's pod address ranges (all nodes' pod CIDRs lie in them): under strict
    /// encryption, traffic to or from an address in them that no node claims is dropped
    /// rather than routed in plaintext. The nodes' own pod CIDRs count without it.
    pub cluster_pod_cidrs: Vec<IpNet>,
    /// The `weft-l7` binary the agent runs when a rule needs it.
    pub l7_binary: PathBuf,
    /// Port of the L7 filter's transparent listener (on 127.0.0.1).
    pub l7_port: u16,
    /// Same-node socket redirection (`sock_ops` + `sk_msg`), where the kernel has what it needs.
    pub socket_redirect: bool,
    /// The cgroup v2 holding the node's pods (default: the `cgroup2` mount).
    pub cgroup: Option<PathBuf>,
}

/// How pod traffic to other nodes travels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum EncryptionMode {
    /// Plain routing over the underlay (the default, as in Cilium: it needs every node to
    /// run with it, and costs CPU per byte).
    #[default]
    Off,
    /// A WireGuard device (`weft_wg0`) with the other nodes as peers.
    Wireguard,
}

/// What one client may cost the agent.
#[derive(Debug, Clone, Copy)]
pub struct ApiLimits {
    /// Connections open at once: past it the one idle the longest is closed; when none is
    /// idle the new one is answered `overloaded`.
    pub max_connections: usize,
    /// A connection that sends no request for this long is closed.
    pub idle_timeout: Duration,
    /// Longest a request waits for the controller.
    pub request_timeout: Duration,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            idle_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
        }
    }
}

impl Config {
    /// The `Node` object this agent publishes, when it was told its addresses or pod CIDRs,
    /// with the node's WireGuard public key when encryption is on.
    pub fn own_node(
        &self,
        wireguard_public_key: Option<String>,
    ) -> Option<weft_policy::model::Node> {
        if self.node_addresses.is_empty() && self.pod_cidrs.is_empty() {
            return None;
        }
        Some(weft_policy::model::Node::new(
            &self.node,
            weft_policy::model::NodeSpec {
                addresses: self.node_addresses.clone(),
                pod_cidrs: self.pod_cidrs.clone(),
                wireguard_public_key,
            },
        ))
    }
}

/// Whether `name` can name a node: it becomes part of file and directory names.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}
