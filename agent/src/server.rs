//! The agent's unix socket (mode 0600 in a 0700 directory): accepts CLI and CNI connections
//! and answers [`Request`]s. Reads come from the published view (and the datapath's own
//! counter handle), never from the controller; writes (CNI, `policy wait`) go to the
//! controller's queue. What one client may cost is bounded: request size, connections,
//! idle time; overload is answered with an error, never by growing.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{Notify, Semaphore};
use tracing::{debug, warn};
use weft_api::{
    ApiError, ConntrackStats, CounterRow, EncryptionReport, ErrorCode, EventStats,
    MAX_REQUEST_BYTES, MapUsage, Request, Response, StatusReport,
};

use crate::config::ApiLimits;
use crate::controller::{Command, Handle};
use crate::datapath::stats::{Counters, StatsHandle};
use crate::encryption::Encryption;
use crate::fsutil;
use crate::observe::{FlowHub, RECENT_FLOWS};

/// Live conntrack entries as the last garbage collection counted them.
#[derive(Debug, Default)]
pub struct CtStatus {
    /// The conntrack map's size.
    pub capacity: AtomicUsize,
    pub live: AtomicUsize,
    /// Entries the LRU evicted since the agent started (see `EvictionLedger`).
    pub evicted: AtomicU64,
}

/// What the API serves from.
pub struct Api {
    pub handle: Handle,
    pub hub: Arc<FlowHub>,
    pub stats: Arc<StatsHandle>,
    pub ct: Arc<CtStatus>,
    pub started: Instant,
    pub limits: ApiLimits,
    /// Node-to-node encryption, when on.
    pub encryption: Option<Arc<Encryption>>,
    /// Published by the L7 supervisor.
    pub l7: crate::l7::SharedStatus,
}

/// # Errors
/// When another agent serves `path`, or the socket cannot be created.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fsutil::private_dir(dir)?;
    }
    // A socket file left by an earlier agent that is gone: replace it.
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another agent is already serving {} (stop it first)",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(listener)
}

/// The connections being served: which wait idle for a request (and since when), so that
/// a new client is never turned away while someone merely holds a connection open. Owned by
/// the server; a std mutex held for a few instructions, never across an await.
#[derive(Default)]
struct Connections {
    next: u64,
    /// id -> (idle since, or `None` while a request is being served; its closer)
    open: HashMap<u64, (Option<Instant>, Arc<Notify>)>,
}

impl Connections {
    /// Admit a new connection: a free slot, or the slot of the connection idle the longest
    /// (it is closed); `None` when every connection is busy.
    fn admit(&mut self, max: usize) -> Option<(u64, Arc<Notify>)> {
        if self.open.len() >= max {
            let oldest = self
                .open
                .iter()
                .filter_map(|(id, (idle, _))| idle.map(|t| (t, *id)))
                .min()?;
            if let Some((_, closer)) = self.open.remove(&oldest.1) {
                closer.notify_one();
            }
        }
        self.next += 1;
        let closer = Arc::new(Notify::new());
        self.open
            .insert(self.next, (Some(Instant::now()), closer.clone()));
        Some((self.next, closer))
    }

    fn set_idle(&mut self, id: u64, idle: bool) {
        if let Some(entry) = self.open.get_mut(&id) {
            entry.0 = idle.then(Instant::now);
        }
    }
}

/// Requests served at once; more wait for none: they are answered `overloaded`.
const MAX_BUSY: usize = 64;

pub async fn serve(listener: UnixListener, api: Arc<Api>) {
    let connections = Arc::new(Mutex::new(Connections::default()));
    let busy = Arc::new(Semaphore::new(MAX_BUSY.min(api.limits.max_connections)));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let api = api.clone();
                let admitted = connections
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .admit(api.limits.max_connections);
                if let Some((id, closer)) = admitted {
                    let connections = connections.clone();
                    let busy = busy.clone();
                    tokio::spawn(async move {
                        let served = tokio::select! {
                            r = handle(stream, &api, id, &connections, &busy) => r,
                            () = closer.notified() => Ok(()),
                        };
                        if let Err(e) = served {
                            debug!("api connection: {e:#}");
                        }
                        connections
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .open
                            .remove(&id);
                    });
                } else {
                    tokio::spawn(async move {
                        let (_, mut write) = stream.into_split();
                        let error = ApiError::new(
                            ErrorCode::Overloaded,
                            format!(
                                "the agent has {} connections open and serving: try again",
                                api.limits.max_connections
                            ),
                        );
                        let _ = send(&mut write, &Response::<()>::Error(error)).await;
                    });
                }
            }
            Err(e) => {
                warn!("accept on the api socket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Why reading a request stopped.
enum ReadError {
    Closed,
    Idle,
    TooLarge,
    Io(std::io::Error),
}

/// Read one request line of at most [`MAX_REQUEST_BYTES`], waiting at most `idle`.
async fn read_request(
    reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    line: &mut Vec<u8>,
    idle: Duration,
) -> Result<(), ReadError> {
    line.clear();
    let deadline = tokio::time::Instant::now() + idle;
    loop {
        let available = match tokio::time::timeout_at(deadline, reader.fill_buf()).await {
            Err(_) => return Err(ReadError::Idle),
            Ok(Err(e)) => return Err(ReadError::Io(e)),
            Ok(Ok([])) => return Err(ReadError::Closed),
            Ok(Ok(bytes)) => bytes,
        };
        let (take, done) = match available.iter().position(|b| *b == b'\n') {
            Some(at) => (at + 1, true),
            None => (available.len(), false),
        };
        if line.len() + take > MAX_REQUEST_BYTES + 1 {
            return Err(ReadError::TooLarge);
        }
        line.extend_from_slice(&available[..take]);
        reader.consume(take);
        if done {
            return Ok(());
        }
    }
}

async fn handle(
    stream: UnixStream,
    api: &Api,
    id: u64,
    connections: &Mutex<Connections>,
    busy: &Semaphore,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    // Small: an idle connection costs little; a request line grows `line` as it needs.
    let mut reader = BufReader::with_capacity(1024, read);
    let mut line = Vec::new();
    let set_idle = |idle| {
        connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .set_idle(id, idle);
    };
    loop {
        set_idle(true);
        let read = read_request(&mut reader, &mut line, api.limits.idle_timeout).await;
        set_idle(false);
        match read {
            Ok(()) => {}
            Err(ReadError::Closed | ReadError::Idle) => return Ok(()),
            Err(ReadError::Io(e)) => return Err(e.into()),
            Err(ReadError::TooLarge) => {
                let error = ApiError::new(
                    ErrorCode::TooLarge,
                    format!("requests are at most {MAX_REQUEST_BYTES} bytes"),
                );
                send(&mut write, &Response::<()>::Error(error)).await?;
                return Ok(());
            }
        }
        let request: Request = match serde_json::from_slice(&line) {
            Ok(r) => r,
            Err(e) => {
                let error = ApiError::new(ErrorCode::BadRequest, format!("bad request: {e}"));
                send(&mut write, &Response::<()>::Error(error)).await?;
                continue;
            }
        };
        let Ok(_permit) = busy.try_acquire() else {
            let error = ApiError::new(
                ErrorCode::Overloaded,
                format!("the agent is serving {MAX_BUSY} requests at once: try again"),
            );
            send(&mut write, &Response::<()>::Error(error)).await?;
            continue;
        };
        if let Request::Observe { follow, last } = request {
            return observe(&mut write, api, follow, last).await;
        }
        answer(&mut write, api, request).await?;
    }
}

async fn observe(
    write: &mut OwnedWriteHalf,
    api: &Api,
    follow: bool,
    last: Option<usize>,
) -> anyhow::Result<()> {
    // Subscribe before reading the backlog, so no flow falls in between.
    let mut live = api.hub.subscribe();
    for flow in api
        .hub
        .recent(last.unwrap_or(RECENT_FLOWS).min(RECENT_FLOWS))
    {
        send(write, &Response::Ok(flow)).await?;
    }
    if !follow {
        return Ok(());
    }
    loop {
        match live.recv().await {
            Ok(flow) => send(write, &Response::Ok(flow)).await?,
            Err(RecvError::Lagged(n)) => api.hub.note_lagged(n),
            Err(RecvError::Closed) => return Ok(()),
        }
    }
}

async fn answer(write: &mut OwnedWriteHalf, api: &Api, request: Request) -> anyhow::Result<()> {
    let timeout = api.limits.request_timeout;
    let line = match request {
        Request::Status => Response::from(status(api).await).to_line(),
        Request::EndpointList => Response::Ok(api.handle.view().endpoint_rows()).to_line(),
        Request::IdentityList => Response::Ok(api.handle.view().identity_rows()).to_line(),
        Request::NodeList => Response::Ok(api.handle.view().node_rows()).to_line(),
        Request::EncryptionStatus => {
            let report = api.encryption.as_ref().map_or_else(
                || EncryptionReport {
                    mode: "off".into(),
                    ..EncryptionReport::default()
                },
                |e| e.report(),
            );
            Response::Ok(report).to_line()
        }
        Request::EncryptionRotate => {
            let rotated = match api.encryption.clone() {
                None => Err(ApiError::new(
                    ErrorCode::Unavailable,
                    "encryption is off on this node (start the agent with --encryption wireguard)",
                )),
                Some(encryption) => tokio::task::spawn_blocking(move || {
                    encryption.rotate().map(|_| encryption.report())
                })
                .await
                .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))
                .and_then(|r| r.map_err(|e| ApiError::new(ErrorCode::Internal, e))),
            };
            Response::from(rotated).to_line()
        }
        Request::PolicyGet => {
            let view = api.handle.view();
            // Rendering every entry of a large map takes a while: not on the runtime.
            let report = tokio::task::spawn_blocking(move || view.policy_report()).await;
            match report {
                Ok(report) => Response::Ok(report).to_line(),
                Err(e) => Response::<()>::Error(ApiError::new(ErrorCode::Internal, e.to_string()))
                    .to_line(),
            }
        }
        Request::PolicyExplain(query) => Response::from(explain(api, &query)).to_line(),
        Request::PolicyWait { timeout_ms } => {
            let wait = timeout_ms
                .map_or(timeout, Duration::from_millis)
                .min(timeout);
            Response::from(api.handle.call(Command::Wait, wait).await).to_line()
        }
        Request::CniAdd(ep) => Response::from(
            api.handle
                .call(|reply| Command::CniAdd(ep, reply), timeout)
                .await,
        )
        .to_line(),
        Request::CniDel(r) => Response::from(
            api.handle
                .call(|reply| Command::CniDel(r, reply), timeout)
                .await,
        )
        .to_line(),
        Request::CniCheck(r) => Response::from(
            api.handle
                .call(|reply| Command::CniCheck(r, reply), timeout)
                .await,
        )
        .to_line(),
        Request::Observe { .. } => unreachable!("observe is served by `observe`"),
    };
    write.write_all(line.as_bytes()).await?;
    write.write_all(b"\n").await?;
    Ok(())
}

/// The core's explanation from the view, checked against the flows the datapath reported
/// since the maps last changed for the endpoints involved (older flows met other entries).
fn explain(api: &Api, query: &weft_api::ExplainQuery) -> Result<weft_api::ExplainReport, ApiError> {
    let view = api.handle.view();
    let mut report = crate::explain::explain(&view, query)?;
    let now = crate::datapath::monotonic_ns();
    let changed_at = |endpoint_id: u32| {
        view.policy_changed.get(&endpoint_id).map_or(0, |t| {
            now.saturating_sub(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX))
        })
    };
    let since = crate::explain::hop_endpoints(&view, &report)
        .into_iter()
        .map(|(endpoint, id)| (endpoint, changed_at(id)))
        .collect();
    crate::explain::check_flows(&mut report, &api.hub.recent_since(0), &since);
    Ok(report)
}

async fn status(api: &Api) -> Result<StatusReport, ApiError> {
    let stats = api.stats.clone();
    let counters = tokio::task::spawn_blocking(move || stats.read())
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?
        .unwrap_or_else(|e| {
            warn!("reading counters: {e:#}");
            Counters::default()
        });
    let view = api.handle.view();
    let (received, lagged) = api.hub.counts();
    let mut maps: Vec<MapUsage> = view
        .maps
        .iter()
        .map(|(name, entries, capacity)| MapUsage {
            name: name.clone(),
            entries: *entries,
            capacity: *capacity,
        })
        .collect();
    let ct_live = api.ct.live.load(Ordering::Relaxed);
    let ct_capacity = api.ct.capacity.load(Ordering::Relaxed).max(1);
    maps.push(MapUsage {
        name: weft_common::map_names::CONNTRACK.to_owned(),
        entries: ct_live,
        capacity: ct_capacity,
    });
    let mut problems = view.problems.as_ref().clone();
    if ct_live * 10 >= ct_capacity * 9 {
        problems.push(format!(
            "the conntrack map is {}% full: the least recently used flows are evicted first (an \
             evicted flow is checked against policy again on its next packet)",
            ct_live * 100 / ct_capacity
        ));
    }
    if let Some(e) = &api.encryption {
        problems.extend(e.problems());
    }
    if counters.events_lost > 0 {
        problems.push(format!(
            "{} flow events were lost because the ring buffer was full",
            counters.events_lost
        ));
    }
    let map_entries = |name: &str| {
        view.maps
            .iter()
            .find(|(n, _, _)| n == name)
            .map_or(0, |(_, e, _)| *e)
    };
    Ok(StatusReport {
        node: view.node.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        kernel: view.features.kernel.clone(),
        uptime_seconds: api.started.elapsed().as_secs(),
        source: view.source.clone(),
        pin_dir: view.pin_dir.clone(),
        attach_mode: view.attach_mode.clone(),
        datapath_variant: view.variant.clone(),
        kernel_features: view.features.features.clone(),
        endpoints: view.endpoints.len(),
        identities: view.plan.identity_labels.len(),
        policies: view.plan.policies.len(),
        policy_map_entries: map_entries(weft_common::map_names::POLICY),
        ipcache_entries: map_entries(weft_common::map_names::IPCACHE),
        conntrack_entries: ct_live,
        maps,
        config_revision: view.config_revision,
        applied_revision: view.applied_revision,
        last_apply_seconds_ago: view.last_apply.map(|t| t.elapsed().as_secs()),
        rejected: view.rejected.as_ref().clone(),
        problems,
        events: EventStats {
            received,
            lost: counters.events_lost,
            rate_limited: counters.events_rate_limited,
            observer_lagged: lagged,
        },
        conntrack: ConntrackStats {
            live: ct_live,
            capacity: ct_capacity,
            created: counters.ct_created,
            revalidated: counters.ct_revalidated,
            revoked: counters.ct_revoked,
            evicted: api.ct.evicted.load(Ordering::Relaxed),
            icmp_related: counters.icmp_related,
        },
        refusals_total: view.refusals_total,
        encryption: api
            .encryption
            .as_ref()
            .map_or_else(|| "off".to_owned(), |e| e.summary()),
        counters: counters
            .verdicts
            .iter()
            .map(|c| CounterRow {
                direction: c.direction.to_string(),
                verdict: c.verdict.name().to_owned(),
                reason: c.reason.map_or("none", |r| r.name()).to_owned(),
                packets: c.packets,
                bytes: c.bytes,
            })
            .collect(),
        l7_filter: api.l7.load().as_ref().clone(),
        socket_redirect: view.socket_redirect.clone(),
        sock_redirect: weft_api::report::SockRedirectStats {
            sockets: counters.sock_redirect_sockets,
            messages: counters.sock_redirect_msgs,
            bytes: counters.sock_redirect_bytes,
            fallbacks: counters.sock_redirect_fallbacks,
        },
    })
}

async fn send<T: Serialize>(
    write: &mut OwnedWriteHalf,
    response: &Response<T>,
) -> anyhow::Result<()> {
    let mut line = response.to_line().into_bytes();
    line.push(b'\n');
    write.write_all(&line).await?;
    Ok(())
}
