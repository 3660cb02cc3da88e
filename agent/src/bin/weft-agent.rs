//! `weft-agent`: the per-node daemon.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use weft_agent::config::EncryptionMode;
use weft_agent::daemon::{self, Config};

/// The eBPF object's conntrack size, the default of `--conntrack-max-entries`.
#[allow(clippy::cast_possible_truncation)]
const DEFAULT_CONNTRACK_ENTRIES: u32 = weft_common::CONNTRACK_MAX_ENTRIES as u32;

// Command-line switches are bools by nature.
#[allow(clippy::struct_excessive_bools)]
#[derive(Parser)]
#[command(name = "weft-agent", version, about = "weft node agent")]
struct Args {
    /// Node name (default: the host name).
    #[arg(long, env = "WEFT_NODE")]
    node: Option<String>,
    /// Network namespace of the node to run in (a path such as /var/run/netns/<name>); the
    /// agent stays in the host's mount namespace so it shares bpffs and the socket directory.
    #[arg(long)]
    netns: Option<PathBuf>,
    /// This node's underlay address (repeatable, or comma-separated; IPv4 and IPv6): with
    /// `--pod-cidr`, the agent publishes the node's `Node` object into the source.
    #[arg(long = "node-address", value_delimiter = ',')]
    node_addresses: Vec<std::net::IpAddr>,
    /// A pod CIDR of this node (repeatable, or comma-separated; IPv4 and IPv6).
    #[arg(long = "pod-cidr", value_delimiter = ',')]
    pod_cidrs: Vec<ipnet::IpNet>,
    /// Directory of YAML objects (the local source).
    #[arg(long, default_value = "/etc/weft/objects")]
    source_dir: PathBuf,
    /// State directory (default: /var/lib/weft/<node>).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// API socket (default: /var/run/weft/<node>/agent.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// bpffs directory for pinned maps and links (default: /sys/fs/bpf/weft/<node>).
    #[arg(long)]
    bpffs_dir: Option<PathBuf>,
    /// Conntrack garbage collection interval in seconds.
    #[arg(long, default_value_t = 30)]
    ct_gc_interval: u64,
    /// Entries of the conntrack map (a local flow takes one on each pod). Applies when the
    /// map is created: a pinned map keeps its size across restarts, so that no flow is lost.
    #[arg(long, default_value_t = DEFAULT_CONNTRACK_ENTRIES, value_parser = clap::value_parser!(u32).range(1_024..=16_777_216))]
    conntrack_max_entries: u32,
    /// Seconds a released identity waits before another label set may take its id.
    #[arg(long, default_value_t = 600)]
    identity_grace: u64,
    /// Most policy-map entries one endpoint may have; a policy needing more is refused for
    /// that endpoint, which keeps its previous policy.
    #[arg(long, default_value_t = 65_536)]
    policy_entries_per_endpoint: usize,
    /// Most API connections open at once; past it the one idle the longest is closed, and
    /// when none is idle a new one is answered `overloaded`. At most 64 requests are served
    /// at the same time.
    #[arg(long, default_value_t = 1024)]
    max_api_connections: usize,
    /// Seconds an API connection may wait without sending a request before it is closed.
    #[arg(long, default_value_t = 10)]
    api_idle_timeout: u64,
    /// Encrypt pod traffic between nodes: `wireguard` creates device `weft_wg0` with the
    /// other nodes as peers (every node of the cluster must run with it). Off by default.
    #[arg(long, value_enum, default_value_t = EncryptionMode::Off)]
    encryption: EncryptionMode,
    /// Strict encryption (needs `--encryption wireguard`): the datapath drops, as
    /// `unencrypted`, pod traffic to another node's pods that would not leave through the
    /// WireGuard device (its peer or key is missing) and pod traffic from another node's pods
    /// that did not come out of it (plaintext on the underlay). Off by default, as in Cilium.
    #[arg(long)]
    encryption_strict: bool,
    /// The cluster's pod address ranges (repeatable, or comma-separated): under strict
    /// encryption, addresses in them that no node claims are dropped, not routed in
    /// plaintext. Every node's published pod CIDRs count without this.
    #[arg(long = "cluster-pod-cidr", value_delimiter = ',')]
    cluster_pod_cidrs: Vec<ipnet::IpNet>,
    /// Print the kernel verifier log when a program is refused.
    #[arg(long)]
    verbose: bool,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
    /// The L7 filter binary (default: `weft-l7` next to this one).
    #[arg(long)]
    l7_binary: Option<PathBuf>,
    /// Port of the L7 filter's transparent listener on 127.0.0.1.
    #[arg(long, default_value_t = 15001)]
    l7_port: u16,
    /// Redirect the payload of allowed same-node TCP connections from socket to socket
    /// (`sock_ops` + `sk_msg`); on by default where the kernel has what it needs.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    socket_redirect: bool,
    /// The cgroup v2 directory that holds the node's pods (the `sock_ops` program attaches
    /// there; default: where `cgroup2` is mounted, e.g. /sys/fs/cgroup).
    #[arg(long)]
    cgroup: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // netlink-packet-route warns about every attribute newer than itself: not news.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,netlink_packet_route=error"));
    if args.log_json {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    // Enter the node's namespace before any thread exists, so every runtime thread is in it.
    if let Some(netns) = &args.netns {
        weft_agent::netns::enter(netns)?;
    }
    let node = match args.node {
        Some(node) => node,
        None => nix::unistd::gethostname()
            .context("reading the host name")?
            .to_string_lossy()
            .into_owned(),
    };
    anyhow::ensure!(
        weft_agent::config::valid_node_name(&node),
        "node name {node:?}: use letters, digits, '-', '.' and '_' (it names files and directories)"
    );
    anyhow::ensure!(
        !args.encryption_strict || args.encryption == EncryptionMode::Wireguard,
        "--encryption-strict needs --encryption wireguard (strict mode without a tunnel would \
         drop all pod traffic between nodes)"
    );
    let cfg = Config {
        node_addresses: args.node_addresses,
        pod_cidrs: args.pod_cidrs,
        state_dir: args
            .state_dir
            .unwrap_or_else(|| PathBuf::from(format!("/var/lib/weft/{node}"))),
        socket: args
            .socket
            .unwrap_or_else(|| PathBuf::from(weft_api::default_socket_path(&node))),
        bpffs_dir: args
            .bpffs_dir
            .unwrap_or_else(|| PathBuf::from(format!("/sys/fs/bpf/weft/{node}"))),
        source_dir: args.source_dir,
        verbose: args.verbose,
        ct_gc_interval: Duration::from_secs(args.ct_gc_interval.max(1)),
        conntrack_max_entries: args.conntrack_max_entries as usize,
        identity_grace: Duration::from_secs(args.identity_grace),
        policy_entries_per_endpoint: args.policy_entries_per_endpoint.max(1),
        verify_interval: Duration::from_secs(1),
        limits: weft_agent::config::ApiLimits {
            max_connections: args.max_api_connections.max(1),
            idle_timeout: Duration::from_secs(args.api_idle_timeout.max(1)),
            ..weft_agent::config::ApiLimits::default()
        },
        encryption: args.encryption,
        encryption_strict: args.encryption_strict,
        cluster_pod_cidrs: args.cluster_pod_cidrs,
        l7_binary: args
            .l7_binary
            .unwrap_or_else(weft_agent::l7::Settings::default_binary),
        l7_port: args.l7_port,
        socket_redirect: args.socket_redirect,
        cgroup: args.cgroup,
        node,
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(daemon::run(cfg))
}
