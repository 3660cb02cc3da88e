//! The agent process: locks the node's directories, loads the datapath, starts the
//! controller (the one writer), the conntrack thread, the flow-event reader and the API, and
//! runs until SIGTERM/SIGINT. Pinned programs and maps stay behind on exit and keep
//! enforcing.
//!
//! Threads and tasks, and what each owns:
//! - `controller` (thread): the datapath handle, source, identities, endpoints; publishes
//!   the view.
//! - `conntrack` (thread): its own conntrack map handle; garbage collection and purges.
//! - the source's watcher (thread, inside the source): reads and parses files, queues
//!   batches to the controller.
//! - tokio tasks: the API (reads the view, queues commands), flow events (ring buffer ->
//!   flow hub), eBPF log forwarding, the L7 supervisor (owns the `weft-l7` process).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::Context;
use tracing::{debug, info, warn};

pub use crate::config::Config;
use crate::config::EncryptionMode;
use crate::controller::{Controller, CtRequest};
use crate::datapath::conntrack::{ConntrackHandle, EvictionLedger};
use crate::datapath::stats::StatsHandle;
use crate::datapath::{self, Datapath};
use crate::encryption::{self, Encryption};
use crate::fsutil::{self, DirLock};
use crate::identity::LocalBackend;
use crate::observe::FlowHub;
use crate::server::{self, Api, CtStatus};
use crate::source::Source;
use crate::source::local::LocalSource;

/// Run the agent until SIGTERM/SIGINT.
///
/// # Errors
/// When the node's directories are locked by another agent, the kernel lacks a feature, or
/// the first configuration cannot be applied.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let started = Instant::now();
    fsutil::private_dir(&cfg.state_dir)?;
    // One node, one agent: the state directory first (its lock file names the holder),
    // then the pin directory (inside `Datapath::load`).
    let _state_lock = DirLock::acquire(&cfg.state_dir, "agent.lock")?;
    let (datapath, channels) = Datapath::load(
        &cfg.bpffs_dir,
        cfg.verbose,
        cfg.conntrack_max_entries,
        &datapath::SocketRedirectSettings {
            enabled: cfg.socket_redirect,
            cgroup: cfg.cgroup.clone(),
        },
    )?;
    let mut source = LocalSource::new(&cfg.source_dir, &cfg.state_dir)?;
    let wireguard_key = match cfg.encryption {
        EncryptionMode::Off => None,
        EncryptionMode::Wireguard => Some(encryption::load_or_create_key(&cfg.state_dir)?),
    };
    // Before the first read, so that this agent's first view already holds its own node.
    if let Some(node) = cfg.own_node(wireguard_key.as_ref().map(|k| k.public_key().to_string())) {
        source
            .publish_node(&node)
            .context("publishing this node's Node object")?;
    } else if wireguard_key.is_some() {
        warn!(
            "encryption is on but this node publishes no Node object (no --node-address or \
             --pod-cidr): the other nodes cannot learn its WireGuard key"
        );
    }
    let identities = LocalBackend::new(
        &cfg.node,
        &cfg.source_dir,
        &cfg.state_dir,
        cfg.identity_grace,
    )?;
    let listener = server::bind(&cfg.socket)?;
    let cfg = Arc::new(cfg);
    let (ct_tx, ct_rx) = std::sync::mpsc::sync_channel(256);
    let (controller, handle, rx) = Controller::start(
        cfg.clone(),
        datapath,
        Box::new(source),
        Box::new(identities),
        ct_tx,
    )?;
    let controller_thread = std::thread::Builder::new()
        .name("controller".into())
        .spawn(move || controller.run(&rx))
        .context("starting the controller thread")?;

    // After the controller's first publication: the first peers come from a complete view.
    let encryption = match wireguard_key {
        Some(key) => Some(Arc::new(Encryption::start(
            cfg.clone(),
            key,
            handle.shared_view(),
            handle.clone(),
        )?)),
        None => None,
    };

    let ct_status = Arc::new(CtStatus::default());
    ct_status
        .capacity
        .store(channels.conntrack.capacity(), Ordering::Relaxed);
    {
        let status = ct_status.clone();
        let interval = cfg.ct_gc_interval;
        let handle = channels.conntrack;
        let counts = channels.conntrack_stats;
        std::thread::Builder::new()
            .name("conntrack".into())
            .spawn(move || conntrack_loop(handle, &counts, &ct_rx, interval, &status))
            .context("starting the conntrack thread")?;
    }

    let hub = Arc::new(FlowHub::new(handle.shared_view()));
    let events_hub = hub.clone();
    let events = tokio::spawn(async move {
        if let Err(e) =
            datapath::events::read_events(channels.events, |r| events_hub.record(&r)).await
        {
            warn!("flow events stopped: {e:#}");
        }
    });
    let logs = tokio::spawn(async move {
        if let Err(e) = datapath::forward_logs(channels.logger).await {
            warn!("eBPF log forwarding stopped: {e:#}");
        }
    });
    let l7_status = crate::l7::new_status();
    let (l7_stop, l7_stopped) = tokio::sync::watch::channel(false);
    let supervisor = crate::l7::Supervisor::new(
        crate::l7::Settings {
            binary: cfg.l7_binary.clone(),
            state_dir: cfg.state_dir.clone(),
            port: cfg.l7_port,
        },
        handle.clone(),
        l7_status.clone(),
    );
    let l7 = tokio::spawn(supervisor.run(l7_stopped));
    let l7_access = tokio::spawn(crate::l7::follow_access(
        cfg.state_dir.join(crate::l7::CONTROL_SOCKET),
        hub.clone(),
    ));
    let api = Arc::new(Api {
        handle: handle.clone(),
        hub,
        stats: Arc::new(channels.stats),
        ct: ct_status,
        started,
        limits: cfg.limits,
        encryption: encryption.clone(),
        l7: l7_status,
    });
    info!(socket = %cfg.socket.display(), "weft agent ready");
    let server = tokio::spawn(server::serve(listener, api));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: exiting; pinned programs keep enforcing"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: exiting; pinned programs keep enforcing"),
    }
    for task in [events, logs, server, l7_access] {
        task.abort();
    }
    // The filter goes with the agent (no orphan); its flows then drop as l7-unavailable.
    let _ = l7_stop.send(true);
    if tokio::time::timeout(Duration::from_secs(5), l7)
        .await
        .is_err()
    {
        warn!("the L7 supervisor did not stop within 5s");
    }
    handle.shutdown();
    // The controller finishes what it is doing (a reconcile is never cut half-way).
    let joined = tokio::task::spawn_blocking(move || controller_thread.join());
    if tokio::time::timeout(Duration::from_secs(10), joined)
        .await
        .is_err()
    {
        warn!("the controller did not stop within 10s");
    }
    std::fs::remove_file(&cfg.socket).ok();
    // The device goes with the agent (userspace WireGuard); the key stays for the next start.
    drop(encryption);
    Ok(())
}

/// Garbage-collect conntrack every `interval` and purge deleted endpoints' flows, on the
/// thread's own map handle.
fn conntrack_loop(
    mut ct: ConntrackHandle,
    counts: &StatsHandle,
    rx: &Receiver<CtRequest>,
    interval: Duration,
    status: &CtStatus,
) {
    let mut next = Instant::now();
    let mut ledger = EvictionLedger::default();
    loop {
        if Instant::now() >= next {
            let gc = ct.gc(datapath::monotonic_ns());
            status.live.store(gc.live, Ordering::Relaxed);
            match counts.read() {
                Ok(c) => {
                    let evicted = ledger.evicted(c.ct_created, c.ct_removed, gc.seen);
                    status.evicted.store(evicted, Ordering::Relaxed);
                }
                Err(e) => debug!("conntrack counts: {e:#}"),
            }
            ledger.removed(gc.removed);
            if gc.removed > 0 {
                info!(live = gc.live, removed = gc.removed, "conntrack gc");
            } else {
                debug!(live = gc.live, "conntrack gc");
            }
            next = Instant::now() + interval;
        }
        match rx.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Ok(CtRequest::Purge {
                endpoint_id,
                ifindex,
            }) => {
                let n = ct.purge_endpoint(endpoint_id, ifindex);
                ledger.removed(n);
                debug!(endpoint_id, purged = n, "conntrack purge");
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}
