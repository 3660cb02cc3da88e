//! The filter: per connection, hyper serves HTTP/1.1 (keep-alive, pipelining) or HTTP/2
//! (prior knowledge); per request, the configuration in force decides, an allowed request is
//! forwarded to the original destination over the connection's own upstream connection, a
//! denied one is answered 403, a malformed one 400. Nothing is forwarded before a verdict.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1 as client1, http2 as client2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, broadcast};
use weft_policy::Direction;
use weft_policy::http::RequestView;

use crate::access::{AccessRecord, L7Verdict, Metrics};
use crate::config::{Config, ConfigError, Snapshot};
use crate::listener::{Accepted, Listener};

/// The `world` identity: a source the lookup does not know.
pub const WORLD: u32 = 2;

/// Tells the filter who a source is. The agent's implementation reads its ipcache (what the
/// datapath uses), never the packet's claims; [`ConfigAddresses`] answers from the address
/// table pushed with the configuration.
pub trait IdentityLookup: Send + Sync + 'static {
    /// The identity of `addr`; `None` means `world`.
    fn identity(&self, addr: IpAddr, snapshot: &Snapshot) -> Option<u32>;
}

/// Identities from the configuration's endpoints and address table.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConfigAddresses;

impl IdentityLookup for ConfigAddresses {
    fn identity(&self, addr: IpAddr, snapshot: &Snapshot) -> Option<u32> {
        snapshot.address_identity(addr)
    }
}

/// Knobs of the filter.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest request head (HTTP/1.1 buffer, HTTP/2 header list) accepted.
    pub max_header_bytes: usize,
    pub upstream_connect_timeout: Duration,
    /// Time allowed to send a request head (slow-loris bound).
    pub header_read_timeout: Duration,
    /// Access records buffered per subscriber before the oldest are dropped.
    pub event_buffer: usize,
    /// Transparent upstream: connect from the client's own address (`IP_TRANSPARENT`) with
    /// this `SO_MARK`, so that the destination's policy sees the client's identity and the
    /// datapath knows the connection as the filter's. `None`: from the node's address.
    pub upstream_mark: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            upstream_connect_timeout: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(30),
            event_buffer: 4096,
            upstream_mark: None,
        }
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

/// The HTTP filter. Cheap to clone; every clone shares the configuration, events and counters.
#[derive(Clone)]
pub struct Filter {
    inner: Arc<Inner>,
}

struct Inner {
    snapshot: ArcSwapOption<Snapshot>,
    lookup: Box<dyn IdentityLookup>,
    events: broadcast::Sender<AccessRecord>,
    metrics: Metrics,
    limits: Limits,
}

impl Filter {
    pub fn new(lookup: impl IdentityLookup, limits: Limits) -> Self {
        let (events, _) = broadcast::channel(limits.event_buffer.max(1));
        Filter {
            inner: Arc::new(Inner {
                snapshot: ArcSwapOption::empty(),
                lookup: Box::new(lookup),
                events,
                metrics: Metrics::new(),
                limits,
            }),
        }
    }

    /// Compile and put a configuration in force; the next request on every connection sees
    /// it. On error the previous one stays.
    pub fn apply(&self, config: &Config) -> Result<u64, ConfigError> {
        if let Some(cur) = self.inner.snapshot.load().as_ref()
            && config.revision < cur.revision
        {
            return Err(ConfigError::Stale {
                got: config.revision,
                current: cur.revision,
            });
        }
        let snapshot = Snapshot::compile(config)?;
        self.inner.snapshot.store(Some(Arc::new(snapshot)));
        Ok(config.revision)
    }

    /// The revision in force; `None` until the first configuration (connections are reset).
    pub fn revision(&self) -> Option<u64> {
        self.inner.snapshot.load().as_ref().map(|s| s.revision)
    }

    /// Access records from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<AccessRecord> {
        self.inner.events.subscribe()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Accept connections until the listener fails.
    pub async fn serve(&self, listener: Listener) -> std::io::Result<()> {
        let own = listener.local_addr();
        loop {
            let accepted = match listener.accept().await {
                Ok(a) => a,
                Err(e) if is_transient(&e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if accepted.destination == own {
                // A connection to the filter itself (not steered): forwarding would loop.
                refuse(&accepted.stream);
                continue;
            }
            let filter = self.clone();
            tokio::spawn(async move { filter.serve_connection(accepted).await });
        }
    }

    /// Serve one accepted connection to its end.
    pub async fn serve_connection(&self, accepted: Accepted) {
        let Accepted {
            stream,
            source,
            destination,
        } = accepted;
        if self.inner.snapshot.load().is_none() {
            self.inner.metrics.refused();
            refuse(&stream);
            return;
        }
        let _ = stream.set_nodelay(true);
        let flags = crate::sniff::Flags::new();
        let conn = Arc::new(Connection {
            source,
            destination,
            flags: flags.clone(),
            requests: AtomicU64::new(0),
            upstream: Upstream {
                address: destination,
                source: self.inner.limits.upstream_mark.map(|m| (source.ip(), m)),
                timeout: self.inner.limits.upstream_connect_timeout,
                h1: Mutex::new(None),
                h2: Mutex::new(None),
            },
        });
        let filter = self.clone();
        let service = hyper::service::service_fn(move |req| {
            let filter = filter.clone();
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(filter.handle(&conn, req).await) }
        });
        let limits = self.inner.limits;
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .keep_alive(true)
            .max_buf_size(limits.max_header_bytes.max(8192))
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout);
        builder.http2().timer(TokioTimer::new());
        let started = Instant::now();
        let io = crate::sniff::Sniff::new(stream, limits.max_header_bytes, flags);
        if let Err(e) = builder.serve_connection(TokioIo::new(io), service).await {
            // hyper answered a request it could not parse itself (400, 431 for an oversized
            // head) and closed: record it.
            if let Some(he) = e.downcast_ref::<hyper::Error>()
                && he.is_parse()
            {
                let status = if he.is_parse_too_large() { 431 } else { 400 };
                let snapshot = self.inner.snapshot.load_full();
                let (src_id, dst_id, revision) =
                    snapshot.as_deref().map_or((WORLD, WORLD, 0), |s| {
                        let (a, b) = self.identities(s, source, destination);
                        (a, b, s.revision)
                    });
                self.report(AccessRecord {
                    time_ms: now_ms(),
                    source,
                    source_identity: src_id,
                    source_endpoint: None,
                    destination,
                    destination_identity: dst_id,
                    destination_endpoint: None,
                    version: "HTTP/1.1".into(),
                    method: String::new(),
                    host: None,
                    path: String::new(),
                    status,
                    latency_us: micros(started.elapsed()),
                    verdict: L7Verdict::Malformed,
                    policy: Some(format!("malformed HTTP: {he}")),
                    revision,
                });
            } else {
                tracing::debug!(error = %e, %source, "connection ended");
            }
        }
    }

    fn identities(&self, s: &Snapshot, source: SocketAddr, destination: SocketAddr) -> (u32, u32) {
        let src = self.inner.lookup.identity(source.ip(), s).unwrap_or(WORLD);
        let dst = s
            .endpoint(destination.ip())
            .map(|e| e.identity)
            .or_else(|| self.inner.lookup.identity(destination.ip(), s))
            .unwrap_or(WORLD);
        (src, dst)
    }

    fn report(&self, record: AccessRecord) {
        self.inner.metrics.record(&record);
        let _ = self.inner.events.send(record);
    }

    async fn handle(&self, conn: &Connection, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let time_ms = now_ms();
        let snapshot = self
            .inner
            .snapshot
            .load_full()
            .expect("connections are served only once configured");
        let (src_id, dst_id) = self.identities(&snapshot, conn.source, conn.destination);
        let src_ep = snapshot.endpoint(conn.source.ip());
        let dst_ep = snapshot.endpoint(conn.destination.ip());
        let view = View::new(&req);
        let mut record = AccessRecord {
            time_ms,
            source: conn.source,
            source_identity: src_id,
            source_endpoint: src_ep.map(|e| e.name.clone()),
            destination: conn.destination,
            destination_identity: dst_id,
            destination_endpoint: dst_ep.map(|e| e.name.clone()),
            version: format!("{:?}", req.version()),
            method: req.method().as_str().to_string(),
            host: view.host.map(str::to_string),
            path: view.path.to_string(),
            status: 0,
            latency_us: 0,
            verdict: L7Verdict::Denied,
            policy: None,
            revision: snapshot.revision,
        };
        let finish = |record: &mut AccessRecord, resp: &Response<Body>, verdict| {
            record.status = resp.status().as_u16();
            record.verdict = verdict;
            record.latency_us = micros(started.elapsed());
        };
        let index = conn.requests.fetch_add(1, Ordering::Relaxed);
        let problem = if req.version() < Version::HTTP_2 && conn.flags.conflicting(index) {
            Some("both Transfer-Encoding and Content-Length")
        } else {
            malformed(&req)
        };
        if let Some(problem) = problem {
            let resp = text(StatusCode::BAD_REQUEST, format!("Bad Request: {problem}\n"));
            record.policy = Some(format!("malformed HTTP: {problem}"));
            finish(&mut record, &resp, L7Verdict::Malformed);
            self.report(record);
            return close(resp);
        }
        // Egress rules of a local source, then ingress rules of a local destination: both
        // must allow when both apply. Steered traffic with neither is refused (fail closed).
        let port = conn.destination.port();
        let checks = [
            src_ep.and_then(|e| e.rules(Direction::Egress, port, dst_id)),
            dst_ep.and_then(|e| e.rules(Direction::Ingress, port, src_id)),
        ];
        let mut allowed_by = Vec::new();
        let mut denied_by = None;
        if checks.iter().all(Option::is_none) {
            denied_by = Some("no HTTP policy for this destination".to_string());
        }
        for m in checks.iter().flatten() {
            if let Some(rule) = m.allowed_by(&view) {
                allowed_by.push(rule.to_string());
            } else {
                let mut names: Vec<&str> = m.policies().map(policy_of).collect();
                names.dedup();
                denied_by = Some(if names.is_empty() {
                    "no HTTP rule allows it".to_string()
                } else {
                    names.join(", ")
                });
                break;
            }
        }
        if let Some(policy) = denied_by {
            let resp = text(
                StatusCode::FORBIDDEN,
                format!("Access denied by {policy}\n"),
            );
            record.policy = Some(policy);
            finish(&mut record, &resp, L7Verdict::Denied);
            self.report(record);
            return resp;
        }
        record.policy = Some(allowed_by.join(", "));
        let mut req = req;
        strip_hop_by_hop(req.headers_mut());
        match conn.upstream.send(req).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                let resp = Response::from_parts(parts, body.boxed());
                finish(&mut record, &resp, L7Verdict::Forwarded);
                self.report(record);
                resp
            }
            Err(e) => {
                tracing::debug!(error = %e, destination = %conn.destination, "upstream failed");
                let resp = text(StatusCode::BAD_GATEWAY, "Upstream unavailable\n".into());
                finish(&mut record, &resp, L7Verdict::UpstreamError);
                self.report(record);
                resp
            }
        }
    }
}

/// The policy part of a rule's `derived_from` (`WeftNetworkPolicy ns/name ingress[0]` ->
/// `WeftNetworkPolicy ns/name`).
fn policy_of(derived_from: &str) -> &str {
    match derived_from.rsplit_once(' ') {
        Some((policy, rule)) if rule.ends_with(']') => policy,
        _ => derived_from,
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::Interrupted
            | std::io::ErrorKind::WouldBlock
    ) || e.raw_os_error().is_some_and(|c| c == 24 || c == 23) // EMFILE, ENFILE
}

/// Reset the connection (RST, not FIN): the client sees a refusal, not an empty answer.
fn refuse(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn close(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// What hyper lets through but must not pass (request smuggling vectors, RFC 9112 §6.1 and
/// RFC 9110 §7.2). Bad request lines, obs-fold, bare CR, oversized heads and differing
/// `Content-Length`s hyper rejects itself.
fn malformed(req: &Request<Incoming>) -> Option<&'static str> {
    let h = req.headers();
    if req.version() < Version::HTTP_2 {
        if h.contains_key(header::TRANSFER_ENCODING) && h.contains_key(header::CONTENT_LENGTH) {
            return Some("both Transfer-Encoding and Content-Length");
        }
        if req.version() == Version::HTTP_11 && !h.contains_key(header::HOST) {
            return Some("no Host header");
        }
    }
    if h.get_all(header::HOST).iter().count() > 1 {
        return Some("more than one Host header");
    }
    let mut lengths = h.get_all(header::CONTENT_LENGTH).iter();
    if let Some(first) = lengths.next()
        && (lengths.any(|v| v != first)
            || first
                .to_str()
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .is_none())
    {
        return Some("invalid Content-Length");
    }
    None
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        h.remove(name);
    }
    for name in HOP_BY_HOP {
        h.remove(name);
    }
}

/// A request as the matcher sees it.
struct View<'a> {
    method: &'a str,
    path: &'a str,
    host: Option<&'a str>,
    headers: &'a HeaderMap,
}

impl<'a> View<'a> {
    fn new(req: &'a Request<Incoming>) -> Self {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri().authority().map(http::uri::Authority::as_str));
        View {
            method: req.method().as_str(),
            path: req.uri().path_and_query().map_or("/", |p| p.as_str()),
            host,
            headers: req.headers(),
        }
    }
}

impl RequestView for View<'_> {
    fn method(&self) -> &str {
        self.method
    }
    fn path(&self) -> &str {
        self.path
    }
    fn host(&self) -> Option<&str> {
        self.host
    }
    fn has_header(&self, name: &str, value: Option<&str>) -> bool {
        let mut values = self.headers.get_all(name).iter();
        match value {
            None => values.next().is_some(),
            Some(want) => values.any(|v| v.as_bytes() == want.as_bytes()),
        }
    }
}

struct Connection {
    source: SocketAddr,
    destination: SocketAddr,
    /// HTTP/1 requests the byte-stream check flagged, and the count of requests seen.
    flags: Arc<crate::sniff::Flags>,
    requests: AtomicU64,
    upstream: Upstream,
}

/// The upstream side of one downstream connection: one HTTP/1.1 connection (requests of a
/// keep-alive connection arrive one at a time) or one HTTP/2 connection (streams multiplex),
/// opened on the first allowed request and again when the upstream closed it.
struct Upstream {
    address: SocketAddr,
    /// Connect from this address with this mark (transparent upstream).
    source: Option<(IpAddr, u32)>,
    timeout: Duration,
    h1: Mutex<Option<client1::SendRequest<Incoming>>>,
    h2: Mutex<Option<client2::SendRequest<Incoming>>>,
}

#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("connect to {0}: {1}")]
    Connect(SocketAddr, #[source] std::io::Error),
    #[error("connect to {0}: timed out")]
    Timeout(SocketAddr),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

impl Upstream {
    async fn open(&self) -> std::io::Result<TcpStream> {
        let Some((source, mark)) = self.source else {
            return TcpStream::connect(self.address).await;
        };
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(self.address),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_ip_transparent(true)?;
        socket.set_mark(mark)?;
        socket.set_nonblocking(true)?;
        socket.bind(&SocketAddr::new(source, 0).into())?;
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        socket.connect(self.address).await
    }

    async fn connect(&self) -> Result<TokioIo<TcpStream>, UpstreamError> {
        let stream = tokio::time::timeout(self.timeout, self.open())
            .await
            .map_err(|_| UpstreamError::Timeout(self.address))?
            .map_err(|e| UpstreamError::Connect(self.address, e))?;
        let _ = stream.set_nodelay(true);
        Ok(TokioIo::new(stream))
    }

    async fn send(&self, req: Request<Incoming>) -> Result<Response<Incoming>, UpstreamError> {
        if req.version() == Version::HTTP_2 {
            let mut sender = {
                let mut slot = self.h2.lock().await;
                if let Some(s) = slot.as_ref().filter(|s| !s.is_closed()) {
                    s.clone()
                } else {
                    let io = self.connect().await?;
                    let (s, conn) = client2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .handshake(io)
                        .await?;
                    tokio::spawn(conn);
                    slot.insert(s).clone()
                }
            };
            sender.ready().await?;
            return Ok(sender.send_request(req).await?);
        }
        let fut = {
            let mut slot = self.h1.lock().await;
            if let Some(s) = slot.as_mut()
                && s.ready().await.is_err()
            {
                *slot = None;
            }
            if slot.is_none() {
                let io = self.connect().await?;
                let (s, conn) = client1::handshake(io).await?;
                tokio::spawn(conn);
                slot.insert(s).ready().await?;
            }
            slot.as_mut().expect("connected above").send_request(req)
        };
        Ok(fut.await?)
    }
}
