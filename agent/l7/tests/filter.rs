//! weft-l7 with real clients (curl, h2load, raw sockets) in front of a real upstream server
//! (hyper), on loopback: 127.0.0.4 is the deathstar (upstream), 127.0.0.2 the tiefighter,
//! 127.0.0.3 the xwing; 127.0.0.1 (where the filter listens) is `world`. The configuration comes from Cilium's Star Wars policy through the
//! policy core, as the agent will build it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use weft_l7::{
    AccessRecord, Config, ConfigAddresses, ControlClient, ControlEvent, ControlRequest,
    EndpointConfig, Filter, L7Verdict, Limits, Listener, ListenerConfig, OriginalDestination,
    PortPolicy,
};
use weft_policy::{
    CidrIdentityAllocator, Direction, IdentityAllocator, LocalEndpoint, Object, Repository,
    ResolveInput, ResolveOptions, parse_documents, resolve,
};

const DEATHSTAR: &str = "127.0.0.4";
const TIEFIGHTER: &str = "127.0.0.2";
const XWING: &str = "127.0.0.3";

// === upstream ===

/// A real HTTP server (HTTP/1.1 and h2c) that records every request it sees.
struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Upstream {
    async fn start() -> Self {
        let listener = TcpListener::bind((DEATHSTAR, 0))
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                        let log = log.clone();
                        async move {
                            let line = format!("{} {}", req.method(), req.uri().path());
                            let _ = req.into_body().collect().await;
                            log.lock().expect("log").push(line);
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(
                                Bytes::from_static(b"Ship landed\n"),
                            )))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream { addr, seen }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().expect("log").clone()
    }
}

// === policy -> configuration, through the policy core ===

const STAR_WARS: &str = r#"
apiVersion: weft.io/v1alpha1
kind: WeftNetworkPolicy
metadata: {name: rule1, namespace: default}
spec:
  description: "L7 policy to restrict access to specific HTTP call"
  endpointSelector: {matchLabels: {org: empire, class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts:
    - ports: [{port: "PORT", protocol: TCP}]
      rules:
        http:
        - {method: POST, path: /v1/request-landing}
---
apiVersion: weft.io/v1alpha1
kind: Endpoint
metadata: {name: deathstar, namespace: default, labels: {org: empire, class: deathstar}}
spec: {}
---
apiVersion: weft.io/v1alpha1
kind: Endpoint
metadata: {name: tiefighter, namespace: default, labels: {org: empire, class: tiefighter}}
spec: {node: other}
---
apiVersion: weft.io/v1alpha1
kind: Endpoint
metadata: {name: xwing, namespace: default, labels: {org: alliance, class: xwing}}
spec: {node: other}
"#;

/// The filter configuration the agent would push for `yaml` (`PORT` replaced by the
/// upstream's port), and the identities of (deathstar, tiefighter, xwing).
fn star_wars_config(yaml: &str, port: u16, revision: u64) -> (Config, [u32; 3]) {
    let yaml = yaml.replace("PORT", &port.to_string());
    let mut repo = Repository::new();
    let mut ids = IdentityAllocator::new();
    let mut local = Vec::new();
    let mut by_name = BTreeMap::new();
    for obj in parse_documents("star-wars.yaml", &yaml).expect("valid policy") {
        match obj {
            Object::Policy(p) => {
                repo.upsert(*p);
            }
            Object::Endpoint(ep) => {
                let labels = ep.security_labels(&BTreeMap::default());
                let identity = ids.allocate(&labels).expect("identity");
                by_name.insert(ep.name().to_string(), identity);
                if ep.spec.node.is_none() {
                    local.push(LocalEndpoint {
                        endpoint_id: 1,
                        namespace: ep.namespace().into(),
                        name: ep.name().into(),
                        identity,
                        labels,
                        ports: ep.named_ports(),
                    });
                }
            }
            _ => {}
        }
    }
    let cidrs = CidrIdentityAllocator::new();
    let state = resolve(&ResolveInput {
        repository: &repo,
        endpoints: &local,
        identities: ids.pod_identities(),
        cidr_identities: cidrs.prefixes(),
        named_ports: &BTreeMap::new(),
        options: ResolveOptions::default(),
    });
    let [d, t, x] = ["deathstar", "tiefighter", "xwing"].map(|n| by_name[n]);
    let config = Config {
        revision,
        endpoints: vec![EndpointConfig {
            id: 1,
            name: "default/deathstar".into(),
            identity: d,
            addresses: vec![DEATHSTAR.parse().expect("ip")],
            ingress: PortPolicy::from_state(&state, 1, Direction::Ingress),
            egress: PortPolicy::from_state(&state, 1, Direction::Egress),
        }],
        identities: ids.pod_identities().clone(),
        addresses: BTreeMap::from([
            (TIEFIGHTER.parse::<IpAddr>().expect("ip"), t),
            (XWING.parse::<IpAddr>().expect("ip"), x),
        ]),
    };
    (config, [d, t, x])
}

// === the filter under test ===

struct Setup {
    upstream: Upstream,
    filter: Filter,
    proxy: SocketAddr,
    ids: [u32; 3],
}

async fn setup(configured: bool) -> Setup {
    let upstream = Upstream::start().await;
    let filter = Filter::new(ConfigAddresses, Limits::default());
    let (config, ids) = star_wars_config(STAR_WARS, upstream.addr.port(), 1);
    assert!(
        config.endpoints[0]
            .ingress
            .iter()
            .any(|p| p.peer == 0 || p.peer == ids[1]),
        "the policy core hands HTTP rules to the filter: {config:?}"
    );
    if configured {
        filter.apply(&config).expect("config applies");
    }
    let listener = Listener::bind(ListenerConfig {
        address: "127.0.0.1:0".parse().expect("addr"),
        transparent: false,
        destination: OriginalDestination::Fixed(upstream.addr),
    })
    .expect("listener");
    let proxy = listener.local_addr();
    let f = filter.clone();
    tokio::spawn(async move { f.serve(listener).await });
    Setup {
        upstream,
        filter,
        proxy,
        ids,
    }
}

async fn curl(args: &[&str]) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .args(args)
            .output(),
    )
    .await
    .expect("curl finished in time")
    .expect("curl runs (cargo xtask setup installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn url(s: &Setup, path: &str) -> String {
    format!("http://{}{path}", s.proxy)
}

/// Send raw bytes, read until the server closes (or 5 s pass).
async fn raw(proxy: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn records(rx: &mut tokio::sync::broadcast::Receiver<AccessRecord>) -> Vec<AccessRecord> {
    let mut out = Vec::new();
    while let Ok(r) = rx.try_recv() {
        out.push(r);
    }
    out
}

// === tests ===

#[tokio::test]
async fn star_wars_tiefighter_lands_and_cannot_reach_the_exhaust_port() {
    let s = setup(true).await;
    let mut events = s.filter.subscribe();
    let landing = url(&s, "/v1/request-landing");
    let body = curl(&["--interface", TIEFIGHTER, "-X", "POST", &landing]).await;
    assert_eq!(body, "Ship landed\n");
    let exhaust = url(&s, "/v1/exhaust-port");
    let out = curl(&[
        "--interface",
        TIEFIGHTER,
        "-X",
        "PUT",
        "-w",
        "%{http_code}",
        &exhaust,
    ])
    .await;
    assert_eq!(out, "Access denied by WeftNetworkPolicy default/rule1\n403");
    // The xwing has no rule on this port at all (its L4 drop is the datapath's).
    let out = curl(&[
        "--interface",
        XWING,
        "-X",
        "POST",
        "-w",
        "%{http_code}",
        &landing,
    ])
    .await;
    assert!(out.ends_with("403"), "{out}");
    assert_eq!(s.upstream.seen(), vec!["POST /v1/request-landing"]);
    let recs = records(&mut events);
    let got: Vec<(u32, &str, &str, u16, L7Verdict)> = recs
        .iter()
        .map(|r| {
            (
                r.source_identity,
                r.method.as_str(),
                r.path.as_str(),
                r.status,
                r.verdict,
            )
        })
        .collect();
    let [_, t, x] = s.ids;
    assert_eq!(
        got,
        vec![
            (t, "POST", "/v1/request-landing", 200, L7Verdict::Forwarded),
            (t, "PUT", "/v1/exhaust-port", 403, L7Verdict::Denied),
            (x, "POST", "/v1/request-landing", 403, L7Verdict::Denied),
        ]
    );
    assert_eq!(recs[0].destination_identity, s.ids[0]);
    assert_eq!(
        recs[0].destination_endpoint.as_deref(),
        Some("default/deathstar")
    );
    assert_eq!(
        recs[0].policy.as_deref(),
        Some("WeftNetworkPolicy default/rule1 ingress[0]")
    );
    let m = s.filter.metrics();
    assert_eq!(m.requests("POST", "2xx", L7Verdict::Forwarded), 1);
    assert_eq!(m.requests("PUT", "4xx", L7Verdict::Denied), 1);
    assert!(m.encode().contains("weft_l7_request_duration_seconds"));
}

#[tokio::test]
async fn http11_keep_alive_carries_a_verdict_per_request() {
    let s = setup(true).await;
    let (landing, exhaust) = (url(&s, "/v1/request-landing"), url(&s, "/v1/exhaust-port"));
    let w = "%{http_code} %{num_connects}\n";
    let out = curl(&[
        "--interface",
        TIEFIGHTER,
        "-o",
        "/dev/null",
        "-w",
        w,
        "-X",
        "POST",
        &landing,
        "--next",
        "--interface",
        TIEFIGHTER,
        "-o",
        "/dev/null",
        "-w",
        w,
        "-X",
        "PUT",
        &exhaust,
        "--next",
        "--interface",
        TIEFIGHTER,
        "-o",
        "/dev/null",
        "-w",
        w,
        "-X",
        "POST",
        &landing,
        "--next",
        "--interface",
        TIEFIGHTER,
        "-o",
        "/dev/null",
        "-w",
        w,
        "-X",
        "GET",
        &landing,
    ])
    .await;
    assert_eq!(
        out, "200 1\n403 0\n200 0\n403 0\n",
        "one connection, four verdicts"
    );
    assert_eq!(
        s.upstream.seen(),
        vec!["POST /v1/request-landing", "POST /v1/request-landing"]
    );
}

#[tokio::test]
async fn http11_pipelined_requests_get_a_verdict_each() {
    let s = setup(true).await;
    let host = s.proxy;
    let reqs = format!(
        "POST /v1/request-landing HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n\
         PUT /v1/exhaust-port HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n\
         POST /v1/request-landing HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    // Sent from the tiefighter's address.
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{TIEFIGHTER}:0").parse().expect("addr"))
        .expect("bind");
    let mut conn = sock.connect(s.proxy).await.expect("connect");
    conn.write_all(reqs.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut out))
        .await
        .expect("answered")
        .expect("read");
    let out = String::from_utf8_lossy(&out);
    let statuses: Vec<&str> = out.lines().filter(|l| l.starts_with("HTTP/1.1 ")).collect();
    assert_eq!(
        statuses,
        vec![
            "HTTP/1.1 200 OK",
            "HTTP/1.1 403 Forbidden",
            "HTTP/1.1 200 OK"
        ],
        "{out}"
    );
    assert_eq!(s.upstream.seen().len(), 2);
}

#[tokio::test]
async fn h2c_prior_knowledge_with_curl_nghttp_and_h2load() {
    let s = setup(true).await;
    let mut events = s.filter.subscribe();
    let (landing, exhaust) = (url(&s, "/v1/request-landing"), url(&s, "/v1/exhaust-port"));
    let w = "%{http_code} %{http_version}";
    let h2 = "--http2-prior-knowledge";
    let ti = ["--interface", TIEFIGHTER, "-o", "/dev/null", "-w", w];
    let out = curl(&[&[h2, "-X", "POST", &landing][..], &ti].concat()).await;
    assert_eq!(out, "200 2");
    let out = curl(&[&[h2, "-X", "PUT", &exhaust][..], &ti].concat()).await;
    assert_eq!(out, "403 2");
    assert!(records(&mut events).iter().all(|r| r.version == "HTTP/2.0"));
    // (curl 7.88 fails to reuse an h2c prior-knowledge connection for a second request, with
    // any server: several streams on one connection are nghttp's and h2load's job here.)
    // h2load and nghttp cannot pick their source address, so 127.0.0.1 is a tiefighter now.
    let (mut config, [_, t, _]) = star_wars_config(STAR_WARS, s.upstream.addr.port(), 2);
    config.addresses.insert("127.0.0.1".parse().expect("ip"), t);
    s.filter.apply(&config).expect("config");
    let before = s.upstream.seen().len();
    let dir = scratch("h2c");
    let empty = dir.join("empty");
    std::fs::write(&empty, b"").expect("write");
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        Command::new("nghttp")
            .arg("-ns")
            .arg("-d")
            .arg(&empty)
            .args([&landing, &exhaust])
            .output(),
    )
    .await
    .expect("nghttp finished")
    .expect("nghttp runs (nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut codes: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 7 && f[0].parse::<u32>().is_ok())
                .then(|| (f[6].to_string(), f[4].to_string()))
        })
        .collect();
    codes.sort();
    assert_eq!(
        codes,
        vec![
            ("/v1/exhaust-port".to_string(), "403".to_string()),
            ("/v1/request-landing".to_string(), "200".to_string()),
        ],
        "two streams on one connection, a verdict each: {text}"
    );
    assert_eq!(s.upstream.seen().len() - before, 1);
    let _ = std::fs::remove_dir_all(&dir);
    let before = s.upstream.seen().len();
    // h2load: 2 connections, 4 streams each in flight, 200 allowed then 100 denied requests.
    // (h2load cannot pick its source address, so the tiefighter's rule is given to 127.0.0.1
    // too.)
    for (path, method, n, expect) in [
        ("/v1/request-landing", "POST", 200, "200 2xx"),
        ("/v1/exhaust-port", "PUT", 100, "100 4xx"),
    ] {
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            Command::new("h2load")
                .args(["-n", &n.to_string(), "-c", "2", "-m", "4", "-H"])
                .arg(format!(":method: {method}"))
                .arg(url(&s, path))
                .output(),
        )
        .await
        .expect("h2load finished")
        .expect("h2load runs (nghttp2-client, cargo xtask setup)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("{n} total, {n} started, {n} done")),
            "h2load {method} {path}: {text}"
        );
        let codes = text
            .lines()
            .find(|l| l.starts_with("status codes:"))
            .unwrap_or_default()
            .to_string();
        let (count, class) = expect.split_once(' ').expect("pair");
        assert!(codes.contains(&format!("{count} {class}")), "{codes}");
    }
    assert_eq!(
        s.upstream.seen().len() - before,
        200,
        "denied streams never reached it"
    );
}

#[tokio::test]
async fn malformed_requests_get_400_and_never_reach_the_upstream() {
    let s = setup(true).await;
    // Every case is a request the policy would allow, but for its framing.
    let ok = "POST /v1/request-landing HTTP/1.1\r\nHost: deathstar\r\n";
    let big = format!(
        "{ok}X-Big: {}\r\nContent-Length: 0\r\n\r\n",
        "a".repeat(100_000)
    );
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "bad request line",
            "POST /v1/request-landing HTTP/1.1 extra\r\nHost: d\r\n\r\n".into(),
            "400",
        ),
        ("garbage request line", "GARBAGE\r\n\r\n".into(), "400"),
        ("oversized headers", big, "431"),
        (
            "Content-Length with Transfer-Encoding",
            format!("{ok}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            "400",
        ),
        (
            "two Content-Lengths",
            format!("{ok}Content-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
            "400",
        ),
        (
            "obs-fold",
            format!("{ok}X-A: a\r\n  folded\r\nContent-Length: 0\r\n\r\n"),
            "400",
        ),
        (
            "bare CR",
            format!("{ok}X-A: a\rb\r\nContent-Length: 0\r\n\r\n"),
            "400",
        ),
        (
            "no Host",
            "POST /v1/request-landing HTTP/1.1\r\nContent-Length: 0\r\n\r\n".into(),
            "400",
        ),
        (
            "two Hosts",
            format!("{ok}Host: other\r\nContent-Length: 0\r\n\r\n"),
            "400",
        ),
    ];
    for (name, req, status) in &cases {
        // All identities of loopback are the tiefighter's here, so only framing can refuse.
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind(format!("{TIEFIGHTER}:0").parse().expect("addr"))
            .expect("bind");
        let mut conn = sock.connect(s.proxy).await.expect("connect");
        conn.write_all(req.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut out)).await;
        let out = String::from_utf8_lossy(&out);
        assert!(
            out.starts_with(&format!("HTTP/1.1 {status} ")),
            "{name}: answered {out:?}"
        );
    }
    // The same request well-formed passes: the cases failed for their framing alone.
    let out = raw(
        s.proxy,
        format!("{ok}Content-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(
        out.starts_with("HTTP/1.1 403"),
        "127.0.0.1 has no rule: {out}"
    );
    assert!(
        s.upstream.seen().is_empty(),
        "the upstream saw {:?}",
        s.upstream.seen()
    );
    let m = s.filter.metrics();
    let malformed = m.requests("POST", "4xx", L7Verdict::Malformed)
        + m.requests("OTHER", "4xx", L7Verdict::Malformed);
    assert_eq!(malformed, cases.len() as u64, "each counted as malformed");
}

#[tokio::test]
async fn a_policy_change_applies_to_the_next_request_on_open_connections() {
    let s = setup(true).await;
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{TIEFIGHTER}:0").parse().expect("addr"))
        .expect("bind");
    let mut conn = sock.connect(s.proxy).await.expect("connect");
    let req = b"POST /v1/request-landing HTTP/1.1\r\nHost: d\r\nContent-Length: 0\r\n\r\n";
    let read_one = async |conn: &mut TcpStream| {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("answer")
            .expect("read");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    conn.write_all(req).await.expect("write");
    assert!(read_one(&mut conn).await.starts_with("HTTP/1.1 200"));
    // Revision 2: landing needs a header the request does not have.
    let yaml = STAR_WARS.replace(
        "{method: POST, path: /v1/request-landing}",
        "{method: POST, path: /v1/request-landing, headers: [\"X-Has-Force: yes\"]}",
    );
    let (config, _) = star_wars_config(&yaml, s.upstream.addr.port(), 2);
    s.filter.apply(&config).expect("config");
    conn.write_all(req).await.expect("write");
    assert!(read_one(&mut conn).await.starts_with("HTTP/1.1 403"));
    conn.write_all(b"POST /v1/request-landing HTTP/1.1\r\nHost: d\r\nX-Has-Force: yes\r\nContent-Length: 0\r\n\r\n")
        .await
        .expect("write");
    assert!(read_one(&mut conn).await.starts_with("HTTP/1.1 200"));
    assert_eq!(s.upstream.seen().len(), 2);
    // An older revision is refused.
    let (old, _) = star_wars_config(STAR_WARS, s.upstream.addr.port(), 1);
    assert!(s.filter.apply(&old).is_err());
}

#[tokio::test]
async fn unconfigured_filter_refuses_connections() {
    let s = setup(false).await;
    let out = curl(&[
        "--interface",
        TIEFIGHTER,
        "-X",
        "POST",
        "-w",
        "%{http_code}",
        &url(&s, "/v1/request-landing"),
    ])
    .await;
    assert_eq!(out, "000", "no HTTP answer at all");
    assert!(s.upstream.seen().is_empty());
    assert_eq!(s.filter.revision(), None);
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("weft-l7-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// The binary as the agent will run it: refuses until configured over the control socket,
/// reports readiness, rejects a bad configuration without losing the good one, streams
/// access records, serves metrics.
#[tokio::test]
async fn the_binary_is_configured_over_its_control_socket() {
    let upstream = Upstream::start().await;
    let dir = scratch("binary");
    let control = dir.join("control.sock");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        l.local_addr().expect("addr").port()
    };
    let listen = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_weft-l7"))
        .args([
            "--control",
            control.to_str().expect("utf-8"),
            "--listen",
            &listen,
        ])
        .args(["--destination", &upstream.addr.to_string()])
        .kill_on_drop(true)
        .spawn()
        .expect("spawn weft-l7");
    let mut client = None;
    for _ in 0..100 {
        if let Ok(c) = ControlClient::connect(&control).await {
            client = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = client.expect("control socket comes up");
    assert_eq!(
        client.next().await.expect("status"),
        ControlEvent::Status { revision: None }
    );
    let landing = format!("http://{listen}/v1/request-landing");
    let out = curl(&[
        "--interface",
        TIEFIGHTER,
        "-X",
        "POST",
        "-w",
        "%{http_code}",
        &landing,
    ])
    .await;
    assert_eq!(out, "000", "refused while unconfigured");
    let (config, _) = star_wars_config(STAR_WARS, upstream.addr.port(), 1);
    assert_eq!(
        client.configure(config.clone()).await.expect("answer"),
        Ok(1)
    );
    client
        .send(&ControlRequest::Subscribe)
        .await
        .expect("subscribe");
    // A bad regex (the policy core rejects these first; the filter does not trust it).
    let mut bad = config.clone();
    bad.revision = 2;
    bad.endpoints[0].ingress[0].http.rules[0].rule.path = Some("/v1/(".into());
    let err = client
        .configure(bad)
        .await
        .expect("answer")
        .expect_err("rejected");
    assert!(err.contains("not a valid regular expression"), "{err}");
    let out = curl(&["--interface", TIEFIGHTER, "-X", "POST", &landing]).await;
    assert_eq!(out, "Ship landed\n", "revision 1 still in force");
    let record = loop {
        if let ControlEvent::Access { record } = client.next().await.expect("event") {
            break record;
        }
    };
    assert_eq!((record.status, record.verdict), (200, L7Verdict::Forwarded));
    client
        .send(&ControlRequest::Metrics)
        .await
        .expect("metrics");
    let text = loop {
        if let ControlEvent::Metrics { text } = client.next().await.expect("event") {
            break text;
        }
    };
    assert!(
        text.contains(
            "weft_l7_requests_total{method=\"POST\",status_class=\"2xx\",verdict=\"Forwarded\"} 1"
        ),
        "{text}"
    );
    // An oversized line is refused with an error, not buffered.
    let mut raw_client = tokio::net::UnixStream::connect(&control)
        .await
        .expect("connect");
    let line = vec![b'x'; weft_l7::control::MAX_MESSAGE_BYTES + 10];
    let _ = raw_client.write_all(&line).await;
    let mut answer = Vec::new();
    let _ =
        tokio::time::timeout(Duration::from_secs(10), raw_client.read_to_end(&mut answer)).await;
    assert!(String::from_utf8_lossy(&answer).contains("longer than"));
    child.start_kill().expect("kill");
    let _ = child.wait().await;
    let _ = std::fs::remove_dir_all(&dir);
}
