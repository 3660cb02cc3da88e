//! `weft-l7`: the node's HTTP filter process. The agent starts it, configures it over
//! `--control` and supervises it; access records go to stdout as JSON lines.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use weft_l7::{
    ConfigAddresses, Filter, Limits, Listener, ListenerConfig, OriginalDestination, serve_control,
};

#[derive(Parser, Debug)]
#[command(version, about = "weft's per-node HTTP filter")]
struct Args {
    /// Unix socket the agent configures the filter through (replaced if it exists).
    #[arg(long)]
    control: PathBuf,
    /// Address to accept steered connections on.
    #[arg(long, default_value = "127.0.0.1:15001")]
    listen: SocketAddr,
    /// Set `IP_TRANSPARENT` on the listener (tc `bpf_sk_assign` steering); the original
    /// destination is then each connection's local address.
    #[arg(long)]
    transparent: bool,
    /// Forward every connection to this address instead (no steering).
    #[arg(long, conflicts_with = "transparent")]
    destination: Option<SocketAddr>,
    /// Write one JSON access record per request to stdout.
    #[arg(long)]
    access_log: bool,
    /// With `--transparent`: connect upstream from each client's own address with this
    /// `SO_MARK` (the datapath lets such connections pass and steers their replies back).
    #[arg(long, requires = "transparent")]
    upstream_mark: Option<u32>,
    /// Exit when the process that started this one goes (the agent: no orphan filter, even
    /// when the agent is killed).
    #[arg(long)]
    exit_with_parent: bool,
    /// Largest request head accepted, in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    max_header_bytes: usize,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let workers = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let filter = Filter::new(
        ConfigAddresses,
        Limits {
            max_header_bytes: args.max_header_bytes,
            upstream_mark: args.upstream_mark,
            ..Limits::default()
        },
    );
    let listener = Listener::bind(ListenerConfig {
        address: args.listen,
        transparent: args.transparent,
        destination: args.destination.map_or(
            OriginalDestination::LocalAddress,
            OriginalDestination::Fixed,
        ),
    })?;
    let _ = std::fs::remove_file(&args.control);
    let control = tokio::net::UnixListener::bind(&args.control)
        .with_context(|| format!("bind control socket {}", args.control.display()))?;
    tracing::info!(listen = %listener.local_addr(), control = %args.control.display(), "weft-l7 up, not configured: connections are reset until it is");
    if args.access_log {
        let mut rx = filter.subscribe();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut out = tokio::io::stdout();
            while let Ok(r) = rx.recv().await {
                let mut line = serde_json::to_vec(&r).expect("records serialize");
                line.push(b'\n');
                if out.write_all(&line).await.is_err() {
                    break;
                }
            }
        });
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let parent = std::os::unix::process::parent_id();
    let orphaned = async move {
        if !args.exit_with_parent {
            return std::future::pending().await;
        }
        // Reparented (to init or a subreaper) once the parent died.
        while std::os::unix::process::parent_id() == parent {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        () = orphaned => tracing::warn!(parent, "the agent that started this filter is gone: exiting"),
        r = filter.serve(listener) => r.context("listener")?,
        r = serve_control(filter.clone(), control) => r.context("control socket")?,
        _ = term.recv() => tracing::info!("terminating"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
    }
    let _ = std::fs::remove_file(&args.control);
    Ok(())
}
