//! Same-node socket redirection (`sock_ops` + `sk_msg`) end to end: real agent, real pods whose
//! processes run in the node's cgroup, real TCP. Each test builds its own node with a
//! per-test prefix; everything (cgroup included) is removed on drop, also on failure.

use std::fs::File;
use std::io::Read as _;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_tests::{Node, Pod, TestPrefix, eventually, eventually_within, policy_yaml};

const PEER: &str = include_str!("../fixtures/sockpeer.py");
const PORT: u16 = 8181;

/// The system's Python: a version manager's shim in `PATH` costs seconds per start on a busy
/// machine.
fn python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}
const RST_PORT: u16 = 8182;

/// One node, pods `server`, `client`, `other` of namespace `shop`, a Python echo server in
/// `server` (inside the node's cgroup, so its sockets are the node's).
struct Setup {
    client: Pod,
    server: Pod,
    other: Pod,
    node: Node,
}

fn setup(test: &str) -> Option<Setup> {
    if weft_tests::skip_unless_privileged(test) {
        return None;
    }
    let prefix = TestPrefix::new();
    let node = Node::start(&prefix, "n1");
    assert!(
        node.cgroup().is_some(),
        "the harness found no cgroup v2 mount: socket redirection cannot be tested"
    );
    let server = node.add_pod("server", "shop", &[("app", "server")]);
    let client = node.add_pod("client", "shop", &[("app", "client")]);
    let other = node.add_pod("other", "shop", &[("app", "other")]);
    for port in [PORT, RST_PORT] {
        let mode = if port == PORT { "serve" } else { "serve-rst" };
        server.spawn(python(), &["-c", PEER, mode, &port.to_string()]);
    }
    let addr = server.ipv4;
    eventually("the echo servers listen", || {
        server.run(|| {
            [PORT, RST_PORT].iter().all(|p| {
                TcpStream::connect_timeout(&(addr, *p).into(), Duration::from_millis(300)).is_ok()
            })
        })
    });
    let status = node.weft_ok(&["status"]);
    assert!(
        status.contains("Socket redirect: on"),
        "socket redirect should be on here:\n{status}"
    );
    Some(Setup {
        client,
        server,
        other,
        node,
    })
}

fn peer(pod: &Pod, args: &[&str]) -> (bool, String) {
    let mut all = vec!["-c", PEER];
    all.extend_from_slice(args);
    let out = pod.exec(python(), &all);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Send `bytes` from `from` to the server's echo, half-close, read them back, compare.
fn xfer(from: &Pod, to: &Pod, bytes: usize) -> (bool, String) {
    peer(
        from,
        &[
            "xfer",
            &to.ipv4.to_string(),
            &PORT.to_string(),
            &bytes.to_string(),
        ],
    )
}

fn redirect_stats(node: &Node) -> Value {
    node.weft_json(&["status"])["sock_redirect"].clone()
}

fn stat(node: &Node, name: &str) -> u64 {
    redirect_stats(node)[name].as_u64().unwrap_or_default()
}

/// Entries of the pinned socket map.
fn sockhash_len(node: &Node) -> usize {
    let pin = node.bpffs_dir().join("weft_sock_v1");
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&pin)
        .output()
        .expect("bpftool runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bpftool map dump {}: {}",
        pin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    weft_tests::json(&text).as_array().map_or(0, Vec::len)
}

/// A process of a pod whose stdout goes to a file; killed on drop.
struct Background {
    child: Child,
    out: PathBuf,
}

impl Background {
    fn start(mut cmd: Command, out: PathBuf) -> Self {
        let file = File::create(&out).expect("output file");
        let err = File::create(out.with_extension("err")).expect("error file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .expect("background process starts");
        Self { child, out }
    }

    fn output(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.out) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    fn errors(&self) -> String {
        std::fs::read_to_string(self.out.with_extension("err")).unwrap_or_default()
    }

    /// The last total a `stream` client printed.
    fn echoed(&self) -> u64 {
        self.output()
            .lines()
            .filter_map(|l| l.trim().parse::<u64>().ok())
            .next_back()
            .unwrap_or_default()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stream(node: &Node, from: &Pod, to: &Pod, secs: u32, name: &str) -> Background {
    let mut cmd = from.command(python());
    cmd.args([
        "-c",
        PEER,
        "stream",
        &to.ipv4.to_string(),
        &PORT.to_string(),
        &secs.to_string(),
    ]);
    Background::start(cmd, node.dir().join(name))
}

/// tcpdump on a host-side veth of the node, printing every TCP packet of port [`PORT`] that
/// carries payload.
fn payload_capture(node: &Node, ifname: &str) -> Background {
    let mut cmd = node.netns().command("tcpdump");
    cmd.args([
        "-i",
        ifname,
        "-nn",
        "-l",
        "--immediate-mode",
        &format!("tcp port {PORT} and (((ip[2:2] - ((ip[0]&0xf)<<2)) - ((tcp[12]&0xf0)>>2)) != 0)"),
    ]);
    let capture = Background::start(cmd, node.dir().join(format!("tcpdump-{ifname}")));
    eventually("tcpdump listens", || {
        capture.errors().contains("listening on")
    });
    capture
}

const SERVER_ALLOWS_OTHER: &str = "  endpointSelector:
    matchLabels: {app: server}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: other}
    toPorts:
    - ports:
      - {port: \"8181\", protocol: TCP}
";

#[test]
fn same_node_transfer_is_redirected_both_ways_without_payload_on_the_veths() {
    let Some(s) = setup("same_node_transfer_is_redirected_both_ways_without_payload_on_the_veths")
    else {
        return;
    };
    let captures = [
        payload_capture(&s.node, &s.client.host_ifname),
        payload_capture(&s.node, &s.server.host_ifname),
    ];
    let (ok, out) = xfer(&s.client, &s.server, 8 << 20);
    assert!(ok, "8 MiB echoed intact: {out}");
    let stats = redirect_stats(&s.node);
    assert!(
        stats["sockets"].as_u64() >= Some(2),
        "both sockets went on the socket path: {stats}"
    );
    assert!(
        stats["bytes"].as_u64() >= Some(16 << 20),
        "16 MiB (both directions) redirected: {stats}"
    );
    // Give tcpdump time to print what it saw (it is line buffered, packets are long gone).
    std::thread::sleep(Duration::from_millis(300));
    for (capture, pod) in captures.iter().zip([&s.client, &s.server]) {
        let seen = capture.output();
        assert!(
            seen.trim().is_empty(),
            "payload on {}'s veth after the handshake:\n{seen}",
            pod.name
        );
    }
    let flows = s.node.observed(&["--pod", "shop/client"]);
    assert!(
        flows.iter().any(|f| f["notes"]
            .as_array()
            .is_some_and(|n| n.iter().any(|x| x == "redirected"))),
        "weft observe shows the flow as redirected: {flows:?}"
    );
    eventually("closed connections leave the socket map empty", || {
        sockhash_len(&s.node) == 0
    });
    drop(captures);

    // The control: the same transfer from a process outside the node's cgroup (the pod's
    // namespace only) takes the normal path, and the capture does see its payload.
    let capture = payload_capture(&s.node, &s.client.host_ifname);
    let out = s
        .client
        .netns()
        .command(python())
        .args([
            "-c",
            PEER,
            "xfer",
            &s.server.ipv4.to_string(),
            &PORT.to_string(),
            "65536",
        ])
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "control transfer: {out:?}");
    eventually("the capture sees the control's payload", || {
        !capture.output().trim().is_empty()
    });
}

#[test]
fn an_l7_ruled_flow_is_never_redirected() {
    let Some(s) = setup("an_l7_ruled_flow_is_never_redirected") else {
        return;
    };
    s.server.spawn_http_server(8000);
    let rules = "  endpointSelector:
    matchLabels: {app: server}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: client}
    toPorts:
    - ports:
      - {port: \"8000\", protocol: TCP}
      rules:
        http:
        - {method: GET, path: \"/\"}
";
    s.node
        .apply("server.yaml", &policy_yaml("server-http", "shop", rules));
    s.node.policy_wait();
    eventually("the L7 filter is ready", || {
        s.node.weft_json(&["status"])["l7_filter"]["state"] == "ready"
    });
    let url = format!("http://{}:8000/", s.server.ipv4);
    let code = |method: &str| {
        let out = s.client.exec(
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
                "-X",
                method,
                &url,
            ],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(code("GET"), "200", "the allowed GET through the L7 filter");
    assert_eq!(code("DELETE"), "403", "the filter still sees every request");
    assert_eq!(
        stat(&s.node, "sockets"),
        0,
        "no socket of an L7-ruled flow is redirected: {}",
        redirect_stats(&s.node)
    );
}

#[test]
fn a_denied_flow_is_never_redirected() {
    let Some(s) = setup("a_denied_flow_is_never_redirected") else {
        return;
    };
    s.node.apply(
        "server.yaml",
        &policy_yaml("server-in", "shop", SERVER_ALLOWS_OTHER),
    );
    s.node.policy_wait();
    for _ in 0..2 {
        let (ok, out) = xfer(&s.client, &s.server, 64 << 10);
        assert!(!ok, "the denied client got through: {out}");
    }
    let (ok, out) = xfer(&s.other, &s.server, 1 << 20);
    assert!(ok, "the allowed peer: {out}");
    let stats = redirect_stats(&s.node);
    assert_eq!(
        stats["sockets"].as_u64(),
        Some(2),
        "only the allowed connection's two sockets were redirected: {stats}"
    );
}

#[test]
fn a_flow_allowed_then_denied_stops_within_a_second() {
    let Some(s) = setup("a_flow_allowed_then_denied_stops_within_a_second") else {
        return;
    };
    let client = stream(&s.node, &s.client, &s.server, 20, "stream");
    eventually("the stream is redirected", || {
        client.echoed() > 0 && stat(&s.node, "messages") > 0
    });
    s.node.apply(
        "server.yaml",
        &policy_yaml("server-in", "shop", SERVER_ALLOWS_OTHER),
    );
    s.node.policy_wait();
    let applied = Instant::now();
    eventually_within(
        "the denied stream stops passing data",
        Duration::from_secs(1),
        || {
            let before = client.echoed();
            std::thread::sleep(Duration::from_millis(250));
            client.echoed() == before
        },
    );
    let stopped_at = client.echoed();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        client.echoed(),
        stopped_at,
        "data passed after the deny (applied {:?} ago): {}",
        applied.elapsed(),
        client.errors()
    );
    assert!(
        stat(&s.node, "fallbacks") >= 1,
        "the redirected sides went back to the normal path: {}",
        redirect_stats(&s.node)
    );
}

#[test]
fn an_audit_flow_is_never_redirected() {
    let Some(s) = setup("an_audit_flow_is_never_redirected") else {
        return;
    };
    let audit = format!("  enforcement: audit\n{SERVER_ALLOWS_OTHER}");
    s.node
        .apply("server.yaml", &policy_yaml("server-in", "shop", &audit));
    s.node.policy_wait();
    let (ok, out) = xfer(&s.client, &s.server, 256 << 10);
    assert!(ok, "audit mode lets the client through: {out}");
    let (ok, out) = xfer(&s.other, &s.server, 256 << 10);
    assert!(ok, "and the allowed peer: {out}");
    assert_eq!(
        stat(&s.node, "sockets"),
        0,
        "no socket of an audited endpoint is redirected: {}",
        redirect_stats(&s.node)
    );
}

#[test]
fn half_close_and_reset_behave_as_without_redirection() {
    let Some(s) = setup("half_close_and_reset_behave_as_without_redirection") else {
        return;
    };
    // `xfer` half-closes and then reads the echo to its end: the server sees EOF, answers
    // the rest and closes its side.
    let (ok, out) = xfer(&s.client, &s.server, 1 << 20);
    assert!(ok, "half-close: {out}");
    let (ok, out) = peer(
        &s.client,
        &[
            "expect-reset",
            &s.server.ipv4.to_string(),
            &RST_PORT.to_string(),
        ],
    );
    assert!(
        ok && out.trim() == "reset",
        "the server's RST reaches the client: {out}"
    );
    assert!(
        stat(&s.node, "sockets") >= 4,
        "both connections were redirected: {}",
        redirect_stats(&s.node)
    );
    eventually(
        "closed and reset connections leave the socket map empty",
        || sockhash_len(&s.node) == 0,
    );
}

#[test]
fn an_agent_restart_keeps_redirection() {
    let Some(mut s) = setup("an_agent_restart_keeps_redirection") else {
        return;
    };
    let client = stream(&s.node, &s.client, &s.server, 30, "stream");
    eventually("the stream is redirected", || {
        client.echoed() > 0 && stat(&s.node, "messages") > 0
    });
    // Killed (no clean exit): the pinned cgroup link keeps sock_ops attached meanwhile.
    s.node.kill_agent();
    let cgroup = s.node.cgroup().expect("the node has a cgroup").to_owned();
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&cgroup)
        .output()
        .expect("bpftool runs");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("sock_ops"),
        "sock_ops stays attached while the agent is down: {shown}"
    );
    let echoed = client.echoed();
    eventually("the stream goes on while the agent is down", || {
        client.echoed() > echoed
    });
    s.node.start_agent();
    let (echoed, messages) = (client.echoed(), stat(&s.node, "messages"));
    eventually("the stream goes on, still redirected", || {
        client.echoed() > echoed && stat(&s.node, "messages") > messages
    });
    eventually("one sock_ops program on the cgroup after the swap", || {
        let out = Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&cgroup)
            .output()
            .expect("bpftool runs");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("sock_ops"))
            .count()
            == 1
    });
    let sockets = stat(&s.node, "sockets");
    let (ok, out) = xfer(&s.other, &s.server, 1 << 20);
    assert!(ok, "a new connection after the restart: {out}");
    assert!(
        stat(&s.node, "sockets") >= sockets + 2,
        "the new connection is redirected too: {}",
        redirect_stats(&s.node)
    );
    let status = s.node.weft_ok(&["status"]);
    assert!(status.contains("Socket redirect: on"), "{status}");
    drop(client);
}
