//! `weft-agent`: the per-node daemon.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use weft_agent::daemon::{self, Config};

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
    /// Print the kernel verifier log when a program is refused.
    #[arg(long)]
    verbose: bool,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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
    let cfg = Config {
        state_dir: args
            .state_dir
            .unwrap_or_else(|| PathBuf::from(format!("/var/lib/weft/{node}"))),
        socket: args
            .socket
            .unwrap_or_else(|| PathBuf::from(weft_agent::api::default_socket_path(&node))),
        bpffs_dir: args
            .bpffs_dir
            .unwrap_or_else(|| PathBuf::from(format!("/sys/fs/bpf/weft/{node}"))),
        source_dir: args.source_dir,
        verbose: args.verbose,
        ct_gc_interval: Duration::from_secs(args.ct_gc_interval.max(1)),
        node,
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(daemon::run(cfg))
}
