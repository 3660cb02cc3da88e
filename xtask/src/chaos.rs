//! `cargo xtask chaos`: faults and bad input while traffic flows, one row each, on the real
//! kernel: SIGKILL and restart, bad object files of every kind, ghost CNI commands, a second
//! agent, removed pins and entries, policy-map exhaustion, oversized requests and connection
//! floods. In every row allowed connections keep exchanging data and a denied peer keeps
//! probing; the table says how much load was held, how many allowed connections were cut,
//! how often the denied peer got through, how long recovery took, the agent's peak RSS and
//! the slowest `weft status`. A row fails when a denied peer got through, an allowed
//! connection was cut, the peak RSS reached 100 MiB, or `weft status` took a second or more.
//!
//! Everything is built with the test harness under one prefix and removed on drop; every
//! load loop is bounded.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use clap::{Args, ValueEnum};
use weft_tests::{CniCall, Node, Pod, Probe, Prober, TestPrefix, policy_yaml};

use crate::{build, setup};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Size {
    /// What CI runs: every row, smaller inputs.
    Small,
    /// The sizes: 50 MB files, 270,001 policy-map entries, 100 MB requests.
    Full,
}

#[derive(Debug, Args)]
pub struct Options {
    #[arg(long, value_enum, default_value_t = Size::Full)]
    pub size: Size,
    /// Use the debug binaries already built (`cargo xtask build`).
    #[arg(long)]
    pub skip_build: bool,
    /// Run only rows whose name contains this.
    #[arg(long)]
    pub only: Option<String>,
}

const RSS_LIMIT_KIB: u64 = 100 * 1024;
const STATUS_LIMIT: Duration = Duration::from_secs(1);

/// One row of the table.
struct Row {
    fault: String,
    held: usize,
    cut: usize,
    through: u64,
    recovery: Option<Duration>,
    peak_rss_kib: u64,
    status_max: Duration,
    note: String,
}

impl Row {
    fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        if self.through > 0 {
            f.push(format!(
                "the denied peer got through {} time(s)",
                self.through
            ));
        }
        if self.cut > 0 {
            f.push(format!("{} allowed connection(s) cut", self.cut));
        }
        if self.peak_rss_kib >= RSS_LIMIT_KIB {
            f.push(format!("peak RSS {} MiB", self.peak_rss_kib / 1024));
        }
        if self.status_max >= STATUS_LIMIT {
            f.push(format!("weft status took {:?}", self.status_max));
        }
        // Notes spell an expectation that did not hold as "NOT ...".
        if self.note.contains("NOT ") {
            f.push(self.note.clone());
        }
        f
    }
}

/// A node with a server, a client (allowed on 8080) and another pod (denied), traffic on.
struct Scene {
    load: Load,
    denied: [Prober; 2],
    sampler: StatusSampler,
    client: Pod,
    server: Pod,
    other: Pod,
    node: Node,
}

const SERVER_IN: &str = "  endpointSelector:\n    matchLabels: {app: server}\n  ingress:\n  - fromEndpoints:\n    - matchLabels: {app: client}\n    toPorts:\n    - ports:\n      - {port: \"8080\", protocol: TCP}\n";

impl Scene {
    fn start(prefix: &TestPrefix, agent_args: &[&str], connections: usize) -> Self {
        let node = Node::start_with_args(prefix, "n1", agent_args);
        let server = node.add_pod("server", "shop", &[("app", "server")]);
        let client = node.add_pod("client", "shop", &[("app", "client")]);
        let other = node.add_pod("other", "shop", &[("app", "other")]);
        server.spawn_tcp_echo(8080);
        server.spawn_tcp_echo(9090);
        server.spawn_udp_echo(5353);
        node.apply("server.yaml", &policy_yaml("server-in", "shop", SERVER_IN));
        node.policy_wait();
        let load = Load::start(&client, server.ipv4, 8080, connections);
        let denied = [
            Prober::start(&other, Probe::TcpEcho(server.ipv4, 9090)),
            Prober::start(&other, Probe::UdpEcho(server.ipv4, 5353)),
        ];
        let sampler = StatusSampler::start(node.socket());
        Self {
            load,
            denied,
            sampler,
            client,
            server,
            other,
            node,
        }
    }

    /// Let traffic run for `d` (bounded sleep).
    fn settle(d: Duration) {
        std::thread::sleep(d);
    }

    fn finish(self, recovery: Option<Duration>, note: String) -> Row {
        Scene::settle(Duration::from_millis(500));
        let (held, cut) = self.load.stop();
        let through: u64 = self.denied.into_iter().map(|p| p.stop().successes).sum();
        let status_max = self.sampler.stop();
        let peak_rss_kib = self.node.agent_peak_rss_kib().unwrap_or(0);
        drop((self.client, self.server, self.other));
        Row {
            fault: String::new(),
            held,
            cut,
            through,
            recovery,
            peak_rss_kib,
            status_max,
            note,
        }
    }
}

/// Allowed connections exchanging a message every 100 ms.
struct Load {
    stop: Arc<AtomicBool>,
    cut: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
    count: usize,
}

impl Load {
    fn start(client: &Pod, addr: std::net::IpAddr, port: u16, count: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for _ in 0..count {
            let mut stream = client
                .tcp_connect(addr, port, Duration::from_secs(2))
                .expect("an allowed connection opens");
            stream
                .set_read_timeout(Some(Duration::from_secs(3)))
                .expect("timeout");
            let (stop, cut) = (stop.clone(), cut.clone());
            threads.push(std::thread::spawn(move || {
                let started = Instant::now();
                while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_mins(10) {
                    if roundtrip(&mut stream).is_err() {
                        cut.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }));
        }
        Self {
            stop,
            cut,
            threads,
            count,
        }
    }

    /// Stop; (connections held, connections cut).
    fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
        let cut = usize::try_from(self.cut.load(Ordering::SeqCst)).unwrap_or(usize::MAX);
        (self.count.saturating_sub(cut), cut)
    }
}

fn roundtrip(stream: &mut TcpStream) -> std::io::Result<()> {
    stream.write_all(b"chaos\n")?;
    let mut buf = [0u8; 6];
    stream.read_exact(&mut buf)?;
    if &buf == b"chaos\n" {
        Ok(())
    } else {
        Err(std::io::Error::other("echo differs"))
    }
}

/// `weft status` over the socket every 200 ms, in process (no CLI start-up in the figure);
/// the slowest answer. A status that does not come within 5 s counts as 5 s.
struct StatusSampler {
    stop: Arc<AtomicBool>,
    worst_us: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl StatusSampler {
    fn start(socket: &std::path::Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let worst_us = Arc::new(AtomicU64::new(0));
        let socket = socket.to_owned();
        let thread = {
            let (stop, worst_us) = (stop.clone(), worst_us.clone());
            std::thread::spawn(move || {
                let started = Instant::now();
                while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_mins(10) {
                    let t = Instant::now();
                    let answered = status_once(&socket);
                    let took = if answered {
                        t.elapsed()
                    } else {
                        Duration::from_secs(5)
                    };
                    // Only while the agent runs: a row that restarts it waits for it itself.
                    if answered || socket.exists() {
                        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
                        worst_us.fetch_max(us, Ordering::SeqCst);
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        };
        Self {
            stop,
            worst_us,
            thread: Some(thread),
        }
    }

    fn pause(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn stop(mut self) -> Duration {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        Duration::from_micros(self.worst_us.load(Ordering::SeqCst))
    }
}

fn status_once(socket: &std::path::Path) -> bool {
    let Ok(mut conn) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    if conn.write_all(b"{\"op\":\"status\"}\n").is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let mut byte = vec![0u8; 65536];
    while let Ok(n) = conn.read(&mut byte) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&byte[..n]);
        if answer.ends_with(b"\n") {
            break;
        }
    }
    answer.starts_with(b"{\"ok\"")
}

type Fault = fn(&TestPrefix, usize, bool) -> Row;

pub fn run(opts: &Options) -> anyhow::Result<()> {
    ensure!(
        setup::is_root(),
        "cargo xtask chaos needs root (network namespaces, bpffs)"
    );
    if !opts.skip_build {
        setup::run(&setup::Options::default())?;
        build::run(&build::Options { release: false })?;
    }
    weft_tests::set_bin_dir(crate::cmd::workspace_root().join("target/debug"));
    for stale in weft_tests::sweep_stale() {
        eprintln!("chaos: removed leftover {stale}");
    }
    let full = opts.size == Size::Full;
    let connections = if full { 20 } else { 5 };
    let mut rows = Vec::new();
    let faults: [(&str, Fault); 11] = [
        ("agent SIGKILL + restart", kill_and_restart),
        ("policy file truncated, rewritten slowly", slow_rewrite),
        ("policy file emptied", emptied_file),
        ("second file redefines the policy", duplicate_file),
        ("oversized object file", oversized_file),
        ("binary object file", binary_file),
        ("ghost CNI ADD/DEL", ghost_cni),
        ("second agent; pins and entries removed", second_agent),
        ("policy over an endpoint's budget", endpoint_budget),
        ("policy map full", map_full),
        ("oversized request; connection flood", api_flood),
    ];
    for (name, fault) in faults {
        if opts.only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        eprintln!("chaos: {name}");
        let prefix = TestPrefix::new();
        let mut row = fault(&prefix, connections, full);
        name.clone_into(&mut row.fault);
        rows.push(row);
    }
    print_table(&rows);
    let failed: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            let f = r.failures();
            (!f.is_empty()).then(|| format!("{}: {}", r.fault, f.join("; ")))
        })
        .collect();
    if !failed.is_empty() {
        bail!(
            "chaos: {} row(s) failed:\n  {}",
            failed.len(),
            failed.join("\n  ")
        );
    }
    println!("chaos: all {} rows held", rows.len());
    Ok(())
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<42} {:>5} {:>4} {:>8} {:>9} {:>9} {:>9}  NOTE",
        "FAULT", "HELD", "CUT", "THROUGH", "RECOVERY", "PEAK RSS", "STATUS"
    );
    for r in rows {
        let recovery = r
            .recovery
            .map_or("-".to_owned(), |d| format!("{:.2}s", d.as_secs_f64()));
        println!(
            "{:<42} {:>5} {:>4} {:>8} {:>9} {:>7}Mi {:>7}ms  {}{}",
            r.fault,
            r.held,
            r.cut,
            r.through,
            recovery,
            r.peak_rss_kib / 1024,
            r.status_max.as_millis(),
            if r.failures().is_empty() {
                ""
            } else {
                "FAILED: "
            },
            r.note
        );
    }
    println!();
}

// === the faults ===

fn kill_and_restart(prefix: &TestPrefix, connections: usize, _full: bool) -> Row {
    let mut scene = Scene::start(prefix, &[], connections);
    Scene::settle(Duration::from_millis(500));
    scene.sampler.pause();
    scene.node.kill_agent();
    Scene::settle(Duration::from_secs(1));
    let started = Instant::now();
    scene.node.start_agent();
    let recovery = started.elapsed();
    // A fresh sampler for the restarted agent.
    let old = std::mem::replace(
        &mut scene.sampler,
        StatusSampler::start(scene.node.socket()),
    );
    let _ = old.stop();
    Scene::settle(Duration::from_secs(1));
    scene.finish(Some(recovery), "agent down 1 s, restarted".into())
}

fn slow_rewrite(prefix: &TestPrefix, connections: usize, _full: bool) -> Row {
    let scene = Scene::start(prefix, &[], connections);
    let path = scene.node.source_dir().join("server.yaml");
    let text = policy_yaml("server-in", "shop", SERVER_IN);
    let (head, tail) = text.split_at(text.len() / 2);
    let started = Instant::now();
    {
        let mut f = File::create(&path).expect("truncate");
        Scene::settle(Duration::from_millis(500));
        f.write_all(head.as_bytes()).expect("write");
        f.flush().expect("flush");
        Scene::settle(Duration::from_millis(800));
        f.write_all(tail.as_bytes()).expect("write");
    }
    scene.node.policy_wait();
    let recovery = started.elapsed();
    scene.finish(
        Some(recovery),
        "truncate, 1.3 s of writing in pieces".into(),
    )
}

fn emptied_file(prefix: &TestPrefix, connections: usize, _full: bool) -> Row {
    let scene = Scene::start(prefix, &[], connections);
    let path = scene.node.source_dir().join("server.yaml");
    File::create(&path).expect("empty");
    scene.node.policy_wait();
    Scene::settle(Duration::from_secs(1));
    let rejected = scene.node.weft_json(&["status"])["rejected"].to_string();
    let note = if rejected.contains("holds no object") {
        "rejected, last good content kept"
    } else {
        "NOT reported as rejected"
    };
    scene.finish(None, note.into())
}

fn duplicate_file(prefix: &TestPrefix, connections: usize, _full: bool) -> Row {
    let scene = Scene::start(prefix, &[], connections);
    let takeover = SERVER_IN
        .replace("app: client", "app: other")
        .replace("8080", "9090");
    scene.node.apply(
        "0-takeover.yaml",
        &policy_yaml("server-in", "shop", &takeover),
    );
    scene.node.policy_wait();
    Scene::settle(Duration::from_secs(1));
    let rejected = scene.node.weft_json(&["status"])["rejected"].to_string();
    let note = if rejected.contains("already defined in server.yaml") {
        "rejected, naming both files"
    } else {
        "NOT rejected"
    };
    scene.finish(None, note.into())
}

fn oversized_file(prefix: &TestPrefix, connections: usize, full: bool) -> Row {
    let scene = Scene::start(prefix, &[], connections);
    let size = if full { 50 << 20 } else { 5 << 20 };
    let started = Instant::now();
    {
        let mut f = File::create(scene.node.source_dir().join("huge.yaml")).expect("create");
        let doc = policy_yaml("huge", "shop", SERVER_IN);
        let mut written = 0;
        let mut n = 0;
        while written < size {
            let d = doc.replace("name: huge", &format!("name: huge-{n}"));
            f.write_all(d.as_bytes()).expect("write");
            f.write_all(b"---\n").expect("write");
            written += d.len() + 4;
            n += 1;
        }
    }
    scene.node.policy_wait();
    let recovery = started.elapsed();
    scene.finish(
        Some(recovery),
        format!("{} MB of policies in one file, rejected unread", size >> 20),
    )
}

fn binary_file(prefix: &TestPrefix, connections: usize, _full: bool) -> Row {
    let scene = Scene::start(prefix, &[], connections);
    let junk: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    fs::write(scene.node.source_dir().join("junk.yaml"), junk).expect("write");
    scene.node.policy_wait();
    let rejected = scene.node.weft_json(&["status"])["rejected"].to_string();
    let note = if rejected.contains("not UTF-8") {
        "rejected as not UTF-8"
    } else {
        "NOT reported"
    };
    scene.finish(None, note.into())
}

fn ghost_cni(prefix: &TestPrefix, connections: usize, _full: bool) -> Row {
    let scene = Scene::start(prefix, &[], connections);
    let prev = scene.server.ptp_result().cloned();
    let netns = format!("/var/run/netns/{}-ghost", scene.node.prefix());
    let mut refused = 0;
    for i in 0..20 {
        let id = format!("ghost-{i}");
        let call = CniCall {
            plugin: "weft-cni",
            command: "ADD",
            container_id: &id,
            netns: &netns,
            ifname: "eth0",
            pod_namespace: "shop",
            pod_name: "ghost",
        };
        if scene.node.weft_cni(&call, prev.as_ref()).is_err() {
            refused += 1;
        }
        let del = CniCall {
            command: "DEL",
            ..call
        };
        let _ = scene.node.weft_cni(&del, prev.as_ref());
    }
    scene.finish(
        None,
        format!("{refused}/20 forged ADDs refused; DELs removed nothing"),
    )
}

fn second_agent(prefix: &TestPrefix, connections: usize, _full: bool) -> Row {
    let scene = Scene::start(prefix, &[], connections);
    let out = scene.node.run_second_agent();
    let refused = !out.status.success()
        && String::from_utf8_lossy(&out.stderr).contains("locked by another weft agent");
    let started = Instant::now();
    let links = scene.node.bpffs_dir().join("links");
    let pins: Vec<_> = fs::read_dir(&links)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    for p in &pins {
        let _ = fs::remove_file(p);
    }
    let policy_pin = scene.node.bpffs_dir().join("weft_policy_v1");
    let _ = fs::remove_file(&policy_pin);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !(policy_pin.exists() && pins.iter().all(|p| p.exists())) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let recovery =
        (policy_pin.exists() && pins.iter().all(|p| p.exists())).then(|| started.elapsed());
    scene.finish(
        recovery,
        format!(
            "second agent {}; {} pins removed and restored",
            if refused { "refused" } else { "NOT refused" },
            pins.len() + 1
        ),
    )
}

/// `n` ports of TCP from the client, as a `toPorts` list.
fn many_ports(first: u16, n: u16) -> String {
    (first..first + n).fold(String::new(), |mut out, p| {
        out.push_str("      - {port: \"");
        out.push_str(&p.to_string());
        out.push_str("\", protocol: TCP}\n");
        out
    })
}

fn endpoint_budget(prefix: &TestPrefix, connections: usize, _full: bool) -> Row {
    let scene = Scene::start(
        prefix,
        &["--policy-entries-per-endpoint", "500"],
        connections,
    );
    let started = Instant::now();
    let big = format!("{SERVER_IN}{}", many_ports(9000, 1000));
    scene
        .node
        .apply("server.yaml", &policy_yaml("server-in", "shop", &big));
    let wait = scene.node.policy_wait();
    let recovery = started.elapsed();
    let refused = wait["refused"].to_string().contains("budget of 500");
    let opened = scene
        .other
        .tcp_probe(scene.server.ipv4, 9090, Duration::from_millis(500));
    let late = scene.node.add_pod("late", "shop", &[("app", "late")]);
    let admitted = scene
        .node
        .weft_json(&["endpoint", "list"])
        .to_string()
        .contains("\"late\"");
    drop(late);
    scene.finish(
        Some(recovery),
        format!(
            "1,001 entries for a 500 budget: {}; a new pod {}{}",
            if refused { "refused" } else { "NOT refused" },
            if admitted { "admitted" } else { "NOT admitted" },
            if opened { "; 9090 OPENED" } else { "" }
        ),
    )
}

/// Peer pods of another node, `n` distinct label sets: identities that policies can name.
fn peer_endpoints(n: usize) -> String {
    use std::fmt::Write;
    (0..n).fold(String::new(), |mut out, i| {
        let _ = write!(
            out,
            "apiVersion: weft.io/v1alpha1\nkind: Endpoint\nmetadata:\n  name: peer-{i}\n  namespace: shop\n  labels: {{role: peer, idx: \"{i}\"}}\nspec:\n  node: elsewhere\n  addresses: [\"10.99.{}.{}\"]\n---\n",
            i / 250,
            i % 250 + 1
        );
        out
    })
}

fn map_full(prefix: &TestPrefix, connections: usize, full: bool) -> Row {
    // Five pods each needing (peers × ports) entries: in the full size 270,000 together,
    // more than the map holds (262,144), so the biggest growers are refused and keep their
    // previous state; the small size (45,000) fits and shows the cost of a large policy.
    let (peers, ports) = if full { (270, 200) } else { (60, 150) };
    let scene = Scene::start(prefix, &[], connections);
    scene.node.apply("peers.yaml", &peer_endpoints(peers));
    let mut targets = Vec::new();
    for i in 0..5 {
        let name = format!("big{i}");
        targets.push(
            scene
                .node
                .add_pod(&name, "shop", &[("app", "big"), ("n", &i.to_string())]),
        );
    }
    scene.node.policy_wait();
    let started = Instant::now();
    let spec = format!(
        "  endpointSelector:\n    matchLabels: {{app: big}}\n  ingress:\n  - fromEndpoints:\n    - matchLabels: {{role: peer}}\n    toPorts:\n    - ports:\n{}",
        many_ports(20000, ports)
    );
    scene
        .node
        .apply("big.yaml", &policy_yaml("big-in", "shop", &spec));
    let wait = scene.node.policy_wait();
    let recovery = started.elapsed();
    let refused = wait["refused"].as_array().map_or(0, Vec::len);
    let entries = scene.node.weft_json(&["status"])["policy_map_entries"]
        .as_u64()
        .unwrap_or(0);
    let wanted = peers * usize::from(ports) * 5;
    // A pod leaving frees its entries before anything else is written: its DEL succeeds
    // even with the map near full, and the room goes to an endpoint refused before.
    let deleted = targets[0].cni_weft("DEL");
    let after = scene.node.policy_wait();
    let refused_after = after["refused"].as_array().map_or(0, Vec::len);
    let entries_after = scene.node.weft_json(&["status"])["policy_map_entries"]
        .as_u64()
        .unwrap_or(0);
    drop(targets);
    scene.finish(
        Some(recovery),
        format!(
            "{wanted} entries wanted, {entries} in the map, {refused} endpoint(s) refused; \
             one pod DEL {}, then {entries_after} in the map, {refused_after} refused{}",
            if deleted.is_ok() { "ok" } else { "NOT ok" },
            if refused_after > 0 {
                " (NOT admitted)"
            } else {
                ""
            }
        ),
    )
}

fn api_flood(prefix: &TestPrefix, connections: usize, full: bool) -> Row {
    let scene = Scene::start(prefix, &["--api-idle-timeout", "5"], connections);
    let started = Instant::now();
    let size = if full { 100 << 20 } else { 10 << 20 };
    let mut conn = UnixStream::connect(scene.node.socket()).expect("connect");
    conn.set_write_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let chunk = vec![b'x'; 1 << 20];
    let mut sent = 0usize;
    while sent < size && conn.write_all(&chunk).is_ok() {
        sent += chunk.len();
    }
    let flood: Vec<UnixStream> = (0..200)
        .filter_map(|_| UnixStream::connect(scene.node.socket()).ok())
        .collect();
    Scene::settle(Duration::from_secs(1));
    let answered = status_once(scene.node.socket());
    let recovery = started.elapsed();
    drop(flood);
    scene.finish(
        Some(recovery),
        format!(
            "{} MB line cut off after {} MB; 200 idle connections; status {}",
            size >> 20,
            sent >> 20,
            if answered { "served" } else { "NOT served" }
        ),
    )
}
