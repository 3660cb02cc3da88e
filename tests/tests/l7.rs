//! The node's L7 filter end to end: the agent spawns, configures and supervises `weft-l7`,
//! and the datapath steers `redirect-l7` flows to it. Real agent, real pods, real curl.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;
use weft_tests::{Node, Pod, TestPrefix, eventually, policy_yaml, skip_unless_privileged};

const T: Duration = Duration::from_secs(5);
const HTTP: u16 = 8000;

/// One node: `server` (app=server, HTTP on 8000 counting what reaches it), `client`
/// (app=client) and `other` (app=other), namespace `shop`.
struct Web {
    client: Pod,
    other: Pod,
    server: Pod,
    reached: Arc<AtomicU64>,
    node: Node,
}

fn web(test: &str) -> Option<Web> {
    if skip_unless_privileged(test) {
        return None;
    }
    let prefix = TestPrefix::new();
    let node = Node::start(&prefix, "n1");
    let server = node.add_pod("server", "shop", &[("app", "server")]);
    let client = node.add_pod("client", "shop", &[("app", "client")]);
    let other = node.add_pod("other", "shop", &[("app", "other")]);
    let reached = server.spawn_counting_http_server(HTTP);
    Some(Web {
        client,
        other,
        server,
        reached,
        node,
    })
}

/// `curl` from `pod` to `addr`: (status, body); status 0 when no HTTP answer came.
fn curl(pod: &Pod, method: &str, addr: IpAddr, path: &str) -> (u16, String) {
    curl_port(pod, method, addr, HTTP, path)
}

fn curl_port(pod: &Pod, method: &str, addr: IpAddr, port: u16, path: &str) -> (u16, String) {
    let out = pod.curl(
        &Pod::url(addr, port, path),
        T,
        &["-X", method, "-w", "\n%{http_code}"],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Requests on one curl invocation (one connection when keep-alive works): a line
/// `<status> <new connections>` per request.
fn keep_alive(pod: &Pod, addr: IpAddr, requests: &[(&str, &str)]) -> std::process::Output {
    let mut args: Vec<String> = vec!["-sS".into(), "--max-time".into(), "10".into()];
    for (i, (method, path)) in requests.iter().enumerate() {
        if i > 0 {
            args.push("--next".into());
        }
        for a in [
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{num_connects}\\n",
            "-X",
            method,
        ] {
            args.push(a.into());
        }
        args.push(Pod::url(addr, HTTP, path));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    pod.exec("curl", &args)
}

/// The filter is ready with the policy in `file` (the datapath steers from then on).
fn apply_and_wait_ready(node: &Node, file: &str, yaml: &str) {
    node.apply(file, yaml);
    node.policy_wait();
    eventually("the L7 filter is ready", || {
        filter(node)["state"] == "ready"
    });
}

/// The server (app=server) takes GET on /public and /orders/... from the client, only.
const SERVER_HTTP_RULES: &str = "  endpointSelector:
    matchLabels: {app: server}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: client}
    toPorts:
    - ports:
      - {port: \"8080\", protocol: TCP}
      rules:
        http:
        - {method: GET, path: \"/public\"}
";

fn server_http_rules() -> String {
    policy_yaml(
        "server-http",
        "shop",
        &SERVER_HTTP_RULES.replace("8080", "8000"),
    )
}

fn filter(node: &Node) -> Value {
    node.weft_json(&["status"])["l7_filter"].clone()
}

fn filter_pid(node: &Node) -> Option<u32> {
    let f = filter(node);
    (f["state"] == "ready")
        .then(|| f["pid"].as_u64().and_then(|p| u32::try_from(p).ok()))
        .flatten()
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn filter_is_started_for_http_rules_restarted_when_killed_and_stopped_without_them() {
    let Some(s) = weft_tests::shop::shop(
        "filter_is_started_for_http_rules_restarted_when_killed_and_stopped_without_them",
    ) else {
        return;
    };
    assert_eq!(filter(&s.node)["state"], "off", "no HTTP rule: no filter");
    s.node.apply(
        "server.yaml",
        &policy_yaml("server-http", "shop", SERVER_HTTP_RULES),
    );
    let mut pid = None;
    eventually("the filter is started and ready", || {
        pid = filter_pid(&s.node);
        pid.is_some()
    });
    let first = pid.expect("ready");
    assert_eq!(filter(&s.node)["endpoints"], 1);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(first).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the filter");
    eventually("the killed filter is started again and ready", || {
        pid = filter_pid(&s.node);
        pid.is_some_and(|p| p != first)
    });
    let second = pid.expect("ready");
    let f = filter(&s.node);
    assert!(f["restarts"].as_u64() >= Some(1), "restart counted: {f}");
    assert!(
        f["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("signal")),
        "the death is reported: {f}"
    );

    s.node.remove("server.yaml");
    eventually("no HTTP rule left: the filter is stopped", || {
        filter(&s.node)["state"] == "off" && !alive(second)
    });
}

#[test]
fn same_node_http_rules_pass_get_and_answer_delete_403_per_request() {
    let Some(w) = web("same_node_http_rules_pass_get_and_answer_delete_403_per_request") else {
        return;
    };
    let v4 = w.server.ipv4;
    assert_eq!(
        curl(&w.client, "DELETE", v4, "/public").0,
        200,
        "no policy yet"
    );
    apply_and_wait_ready(&w.node, "server.yaml", &server_http_rules());
    let before = w.reached.load(Ordering::SeqCst);
    let (code, body) = curl(&w.client, "GET", v4, "/public");
    assert_eq!(
        (code, body.trim()),
        (200, "server GET /public"),
        "allowed GET"
    );
    let (code, body) = curl(&w.client, "DELETE", v4, "/public");
    assert_eq!(code, 403, "DELETE is denied: {body}");
    assert!(
        body.contains("server-http"),
        "the 403 names the policy: {body}"
    );
    assert_eq!(curl(&w.client, "GET", v4, "/private").0, 403, "other path");
    assert_eq!(
        w.reached.load(Ordering::SeqCst),
        before + 1,
        "only the allowed request reached the server"
    );
    // Not an allowed peer at L4: dropped before any HTTP.
    assert_eq!(
        curl(&w.other, "GET", v4, "/public").0,
        0,
        "other is dropped at L4"
    );

    // One keep-alive connection: a verdict per request.
    let out = keep_alive(
        &w.client,
        v4,
        &[
            ("GET", "/public"),
            ("DELETE", "/public"),
            ("GET", "/public"),
        ],
    );
    let lines = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        lines.lines().collect::<Vec<_>>(),
        ["200 1", "403 0", "200 0"],
        "GET, DELETE, GET on one connection: {lines} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    w.node.observed_until(
        &["--port", "8000"],
        "the flows to the filter are reported as forwarded",
        |f| f["verdict"] == "forwarded",
    );
    // Each request is an L7 flow in `weft observe`, with identities and the deciding policy.
    let denied = w.node.observed_until(
        &["--http-status", "403", "--http-method", "DELETE"],
        "the denied DELETE is an L7 flow",
        |f| {
            f["verdict"] == "denied"
                && f["source"]["name"] == "shop/client"
                && f["destination"]["name"] == "shop/server"
                && f["http"]["path"] == "/public"
                && f["http"]["policy"]
                    .as_str()
                    .is_some_and(|p| p.contains("server-http"))
        },
    );
    assert!(
        denied.iter().all(|f| f["http"]["status"] == 403),
        "--http-status filters: {denied:?}"
    );
    let client_identity = w.node.identity_of("client");
    w.node.observed_until(
        &["--http", "--verdict", "forwarded"],
        "the allowed GET is an L7 flow with the client's identity",
        |f| {
            f["http"]["method"] == "GET"
                && f["http"]["status"] == 200
                && f["source"]["identity"] == client_identity
        },
    );
}

/// One request on an open keep-alive connection: (status, body); `None` when the
/// connection failed (reset, closed, timed out).
fn request(stream: &mut BufReader<TcpStream>, method: &str, path: &str) -> Option<(u16, String)> {
    let head = format!("{method} {path} HTTP/1.1\r\nhost: server\r\ncontent-length: 0\r\n\r\n");
    stream.get_mut().write_all(head.as_bytes()).ok()?;
    let mut line = String::new();
    stream.read_line(&mut line).ok()?;
    let status = line.split_whitespace().nth(1)?.parse().ok()?;
    let mut length = 0;
    loop {
        let mut header = String::new();
        if stream.read_line(&mut header).ok()? == 0 {
            return None;
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).ok()?;
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

fn connect(pod: &Pod, addr: IpAddr, port: u16) -> BufReader<TcpStream> {
    BufReader::new(
        pod.tcp_connect(addr, port, T)
            .expect("connect through the filter"),
    )
}

const STAR_WARS_POLICY: &str = "  endpointSelector:
    matchLabels: {org: empire, class: deathstar}
  ingress:
  - fromEndpoints:
    - matchLabels: {org: empire}
    toPorts:
    - ports:
      - {port: \"80\", protocol: TCP}
      rules:
        http:
        - {method: POST, path: \"/v1/request-landing\"}
";

/// Cilium's getting-started example: the empire's ships may request landing; nobody may
/// use the exhaust port; the alliance's xwing is not let in at all.
#[test]
fn star_wars_landing_is_allowed_the_exhaust_port_is_not_and_xwing_is_dropped() {
    if skip_unless_privileged(
        "star_wars_landing_is_allowed_the_exhaust_port_is_not_and_xwing_is_dropped",
    ) {
        return;
    }
    // Pod names are short (they name interfaces); the labels are the guide's.
    let prefix = TestPrefix::new();
    let node = Node::start(&prefix, "n1");
    let deathstar = node.add_pod(
        "dstar",
        "default",
        &[("org", "empire"), ("class", "deathstar")],
    );
    let tiefighter = node.add_pod(
        "tie",
        "default",
        &[("org", "empire"), ("class", "tiefighter")],
    );
    let xwing = node.add_pod(
        "xwing",
        "default",
        &[("org", "alliance"), ("class", "xwing")],
    );
    let reached = deathstar.spawn_counting_http_server(80);
    let ds = deathstar.ipv4;
    assert_eq!(
        curl_port(&xwing, "POST", ds, 80, "/v1/request-landing").0,
        200,
        "no policy: xwing lands"
    );
    apply_and_wait_ready(
        &node,
        "sw.yaml",
        &policy_yaml("rule1", "default", STAR_WARS_POLICY),
    );
    let before = reached.load(Ordering::SeqCst);
    let (code, body) = curl_port(&tiefighter, "POST", ds, 80, "/v1/request-landing");
    assert_eq!(
        (code, body.trim()),
        (200, "dstar POST /v1/request-landing"),
        "tiefighter lands"
    );
    let (code, body) = curl_port(&tiefighter, "PUT", ds, 80, "/v1/exhaust-port");
    assert_eq!(code, 403, "the exhaust port is denied: {body}");
    assert!(body.contains("Access denied"), "{body}");
    assert_eq!(
        curl_port(&xwing, "POST", ds, 80, "/v1/request-landing").0,
        0,
        "xwing is dropped at L4"
    );
    assert_eq!(
        reached.load(Ordering::SeqCst),
        before + 1,
        "only the landing reached the deathstar"
    );
    node.observed_until(
        &["--verdict", "dropped", "--port", "80"],
        "xwing's drop is reported as a policy drop",
        |f| f["source"]["name"] == "default/xwing" && f["drop_reason"] == "policy-denied",
    );
}

/// SIGKILL the filter while denied requests stream through it: none reaches the server,
/// during the gap either; it is back (a new process, ready) and allowed traffic resumes.
#[test]
fn killed_filter_is_restarted_and_nothing_passes_unfiltered_in_the_gap() {
    let Some(w) = web("killed_filter_is_restarted_and_nothing_passes_unfiltered_in_the_gap") else {
        return;
    };
    let v4 = w.server.ipv4;
    apply_and_wait_ready(&w.node, "server.yaml", &server_http_rules());
    assert_eq!(
        curl(&w.client, "GET", v4, "/public").0,
        200,
        "allowed before"
    );
    let baseline = w.reached.load(Ordering::SeqCst);

    // Denied requests only, as fast as they go, reconnecting whenever the connection fails.
    let stop = Arc::new(AtomicBool::new(false));
    let denied = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let load = {
        let (stop, denied, failed) = (stop.clone(), denied.clone(), failed.clone());
        let netns = w.client.netns_name.clone();
        std::thread::spawn(move || {
            weft_tests::in_netns(&netns, || {
                let deadline = std::time::Instant::now() + Duration::from_mins(1);
                let mut conn: Option<BufReader<TcpStream>> = None;
                while !stop.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                    if conn.is_none() {
                        conn = TcpStream::connect_timeout(
                            &(v4, HTTP).into(),
                            Duration::from_millis(300),
                        )
                        .ok()
                        .inspect(|s| {
                            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                        })
                        .map(BufReader::new);
                    }
                    let answer = conn.as_mut().and_then(|c| request(c, "DELETE", "/public"));
                    if answer.is_some_and(|(status, _)| status == 403) {
                        denied.fetch_add(1, Ordering::SeqCst);
                    } else {
                        failed.fetch_add(1, Ordering::SeqCst);
                        conn = None;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            });
        })
    };
    eventually("denied requests flow", || {
        denied.load(Ordering::SeqCst) >= 20
    });
    let first = filter_pid(&w.node).expect("ready");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(first).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the filter");
    eventually("the filter is back: a new process, ready", || {
        filter_pid(&w.node).is_some_and(|p| p != first)
    });
    let after_restart = denied.load(Ordering::SeqCst);
    eventually("denied requests get 403 from the new filter", || {
        denied.load(Ordering::SeqCst) >= after_restart + 20
    });
    stop.store(true, Ordering::SeqCst);
    load.join().expect("load thread");
    assert!(
        failed.load(Ordering::SeqCst) >= 1,
        "the kill was felt by the load"
    );
    assert_eq!(
        w.reached.load(Ordering::SeqCst),
        baseline,
        "no denied request reached the server, before, during or after the gap"
    );
    assert_eq!(
        curl(&w.client, "GET", v4, "/public").0,
        200,
        "allowed traffic resumes"
    );
    assert_eq!(w.reached.load(Ordering::SeqCst), baseline + 1);
}

/// A policy change applies to the next request of connections already open.
#[test]
fn policy_change_applies_to_the_next_request_on_an_open_connection() {
    let Some(w) = web("policy_change_applies_to_the_next_request_on_an_open_connection") else {
        return;
    };
    let v4 = w.server.ipv4;
    apply_and_wait_ready(&w.node, "server.yaml", &server_http_rules());
    let mut conn = connect(&w.client, v4, HTTP);
    assert_eq!(request(&mut conn, "GET", "/public").map(|r| r.0), Some(200));
    assert_eq!(
        request(&mut conn, "DELETE", "/public").map(|r| r.0),
        Some(403)
    );
    let revision = filter(&w.node)["revision"].as_u64().expect("configured");
    let widened = server_http_rules().replace(
        "        - {method: GET, path: \"/public\"}\n",
        "        - {method: GET, path: \"/public\"}\n        - {method: DELETE, path: \"/public\"}\n",
    );
    assert_ne!(widened, server_http_rules(), "the rule was widened");
    w.node.apply("server.yaml", &widened);
    w.node.policy_wait();
    eventually("the filter took the new rules", || {
        filter(&w.node)["revision"].as_u64() > Some(revision)
    });
    assert_eq!(
        request(&mut conn, "DELETE", "/public").map(|r| r.0),
        Some(200),
        "the same connection's next request sees the new rule"
    );
    w.node.apply("server.yaml", &server_http_rules());
    w.node.policy_wait();
    eventually("the filter took the narrowed rules", || {
        filter(&w.node)["revision"].as_u64() > Some(revision + 1)
    });
    assert_eq!(
        request(&mut conn, "DELETE", "/public").map(|r| r.0),
        Some(403),
        "narrowed again"
    );
}

/// The agent killed (`SIGKILL`): its filter does not outlive it, steered flows fail closed (nothing
/// reaches the server), and the next agent brings the filter back.
#[test]
fn killed_agent_takes_its_filter_along_and_steered_flows_fail_closed() {
    let Some(mut w) = web("killed_agent_takes_its_filter_along_and_steered_flows_fail_closed")
    else {
        return;
    };
    let v4 = w.server.ipv4;
    apply_and_wait_ready(&w.node, "server.yaml", &server_http_rules());
    let filter_pid = filter_pid(&w.node).expect("ready");
    let baseline = w.reached.load(Ordering::SeqCst);
    let agent = w.node.agent_pid().expect("agent runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(agent).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the agent alone");
    eventually("the filter exits with its agent", || !alive(filter_pid));
    w.node.kill_agent();
    for method in ["GET", "DELETE"] {
        assert_eq!(
            curl(&w.client, method, v4, "/public").0,
            0,
            "no agent, no filter: {method} gets no answer"
        );
    }
    assert_eq!(
        w.reached.load(Ordering::SeqCst),
        baseline,
        "nothing passed unfiltered"
    );
    w.node.start_agent();
    eventually("the new agent's filter is ready", || {
        filter(&w.node)["state"] == "ready"
    });
    eventually("steered traffic resumes", || {
        curl(&w.client, "GET", v4, "/public").0 == 200
    });
    assert_eq!(curl(&w.client, "DELETE", v4, "/public").0, 403);
}
