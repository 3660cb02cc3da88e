//! `cargo xtask up` / `cargo xtask down`: a one-node weft demo on this machine.
//!
//! `up` sets the machine up, builds the agent, then creates node `weft-demo-node` (a network
//! namespace of its own: the host's interfaces, routes and firewall are never touched) with one
//! detached `weft-agent` reading the local source `/var/run/weft-demo/source` (the objects of
//! `deploy/examples/` plus one `Endpoint` per pod), and pods `frontend`, `api` and `db` of
//! namespace `shop`: network namespaces attached by the real CNI chain (`loopback`, `ptp` +
//! `host-local`, `weft-cni`), invoked as a container runtime does, each running a real server.
//! It then probes the interesting connections with real clients (curl, socat) and prints which
//! pass and which are dropped, with the reason `weft observe` gives.
//!
//! Everything the demo creates is named `weft-demo*`. `down` removes exactly that (processes,
//! CNI attachments, namespaces, pinned objects, files), also after an `up` that failed halfway,
//! and does nothing when no demo is up. `up` on a machine where a demo is up takes it down first.

use std::fs::{self, File};
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};

use crate::{build, cmd, setup};

/// The node: its agent's name and its network namespace's name.
const NODE: &str = "weft-demo-node";
/// Prefix of every network namespace the demo creates (the node's and the pods').
const NETNS_PREFIX: &str = "weft-demo-";
/// Everything on disk: source dir, agent state, IPAM leases, logs, socket.
const STATE_DIR: &str = "/var/run/weft-demo";
/// The agent's pinned maps, programs and links.
const BPFFS_DIR: &str = "/sys/fs/bpf/weft/weft-demo-node";
/// The Kubernetes namespace of the demo's pods (the examples' `metadata.namespace`).
const POD_NAMESPACE: &str = "shop";
/// Pod ranges for `host-local`: inside 100.64.0.0/16 and clear of the harness' per-test ranges.
const SUBNET_V4: &str = "100.64.200.0/24";
const SUBNET_V6: &str = "fd00:64:0:c8::/64";
/// Where Debian's `containernetworking-plugins` puts the reference plugins.
const CNI_PLUGIN_DIR: &str = "/usr/lib/cni";
/// Network name of the chain `ptp` + `weft-cni`.
const NETWORK: &str = "weft";
const POD_IFNAME: &str = "eth0";
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(30);
const POLICY_READY_TIMEOUT: Duration = Duration::from_secs(15);
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(10);
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Connect timeout of each probe: a dropped SYN costs this long.
const PROBE_TIMEOUT_SECS: u32 = 3;

#[derive(Debug, Args)]
pub struct UpOptions {
    #[command(flatten)]
    pub setup: setup::Options,
    /// Build and run the release binaries (default: debug, shared with `cargo xtask test`).
    #[arg(long)]
    pub release: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    /// `python3 -m http.server`, serving a one-line index page.
    Http,
    /// `socat` echoing every connection back (a stand-in for a database's TCP service).
    TcpEcho,
}

struct PodSpec {
    name: &'static str,
    /// The pod's `app` label (what the example policies select on).
    app: &'static str,
    port: u16,
    server: Server,
}

const PODS: [PodSpec; 3] = [
    PodSpec {
        name: "frontend",
        app: "frontend",
        port: 80,
        server: Server::Http,
    },
    PodSpec {
        name: "api",
        app: "api",
        port: 8080,
        server: Server::Http,
    },
    PodSpec {
        name: "db",
        app: "db",
        port: 5432,
        server: Server::TcpEcho,
    },
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Pass,
    /// Passes, and `weft observe --verdict audit` reports it as a would-be drop.
    Audit,
    Drop,
}

struct Probe {
    from: &'static str,
    to: &'static str,
    ipv6: bool,
    expect: Expect,
    why: &'static str,
}

/// The connections worth looking at under the policies of `deploy/examples/`.
const PROBES: &[Probe] = &[
    Probe {
        from: "frontend",
        to: "api",
        ipv6: false,
        expect: Expect::Pass,
        why: "api-ingress allows app=frontend on 8080/TCP",
    },
    Probe {
        from: "api",
        to: "db",
        ipv6: false,
        expect: Expect::Pass,
        why: "db-ingress allows app=api on 5432/TCP",
    },
    Probe {
        from: "frontend",
        to: "db",
        ipv6: false,
        expect: Expect::Drop,
        why: "frontend-egress: egressDeny app=db beats its allow",
    },
    Probe {
        from: "db",
        to: "api",
        ipv6: false,
        expect: Expect::Drop,
        why: "api-ingress admits app=frontend only",
    },
    Probe {
        from: "api",
        to: "frontend",
        ipv6: false,
        expect: Expect::Pass,
        why: "no policy selects frontend's ingress: open",
    },
    Probe {
        from: "db",
        to: "frontend",
        ipv6: false,
        expect: Expect::Audit,
        why: "db-egress-audit (audit mode): would deny, lets pass",
    },
    Probe {
        from: "frontend",
        to: "api",
        ipv6: true,
        expect: Expect::Pass,
        why: "the same rules hold for IPv6",
    },
    Probe {
        from: "frontend",
        to: "db",
        ipv6: true,
        expect: Expect::Drop,
        why: "the same rules hold for IPv6",
    },
];

// === paths ===

fn state_dir() -> PathBuf {
    PathBuf::from(STATE_DIR)
}

fn source_dir() -> PathBuf {
    state_dir().join("source")
}

fn socket() -> PathBuf {
    state_dir().join("agent.sock")
}

fn agent_log() -> PathBuf {
    state_dir().join("agent.log")
}

fn agent_pid_file() -> PathBuf {
    state_dir().join("agent.pid")
}

/// Records which build's binaries `up` used (so `down` runs the same `weft-cni`).
fn bin_dir_file() -> PathBuf {
    state_dir().join("bin-dir")
}

fn ipam_dir() -> PathBuf {
    state_dir().join("ipam")
}

/// `ptp`'s ADD result for `pod`: the `prevResult` of `weft-cni`'s DEL.
fn ptp_result_file(pod: &str) -> PathBuf {
    state_dir().join("pods").join(format!("{pod}.json"))
}

fn pod_netns(pod: &str) -> String {
    format!("{NETNS_PREFIX}{pod}")
}

fn bin_dir(release: bool) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| cmd::workspace_root().join("target"), PathBuf::from);
    target.join(if release { "release" } else { "debug" })
}

// === up ===

pub fn up(opts: &UpOptions) -> anyhow::Result<()> {
    require_root()?;
    setup::run(&opts.setup)?;
    build::run(&build::Options {
        release: opts.release,
    })?;
    let bin_dir = bin_dir(opts.release);
    for bin in ["weft-agent", "weft", "weft-cni"] {
        if !bin_dir.join(bin).exists() {
            bail!("{} missing after the build", bin_dir.join(bin).display());
        }
    }
    if demo_present() {
        eprintln!("up: a demo is already up; taking it down first");
        report_removed(&teardown());
    }
    let demo = create(&bin_dir).context(
        "bringing the demo up failed; what was created stays for inspection \
         (`cargo xtask down` removes it)",
    )?;
    let rows = probe_all(&demo)?;
    print_pods(&demo);
    print_table(&rows);
    let mismatches = rows.iter().filter(|r| !r.as_expected()).count();
    print_next_steps(&demo);
    if mismatches > 0 {
        bail!(
            "{mismatches} connection(s) did not behave as the example policies say; the demo stays \
             up for inspection (agent log: {})",
            agent_log().display()
        );
    }
    Ok(())
}

struct Demo {
    bin_dir: PathBuf,
    pods: Vec<PodAddrs>,
}

struct PodAddrs {
    name: &'static str,
    port: u16,
    server: Server,
    ipv4: IpAddr,
    ipv6: IpAddr,
}

impl Demo {
    fn pod(&self, name: &str) -> &PodAddrs {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .expect("probes name demo pods")
    }

    fn weft(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("weft"));
        cmd.arg("--socket").arg(socket()).args(args);
        cmd
    }

    fn weft_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut cmd = self.weft(&["-o", "json"]);
        cmd.args(args);
        let out = cmd::output(&mut cmd)?;
        serde_json::from_str(&out).with_context(|| format!("weft {args:?} printed no JSON: {out}"))
    }
}

fn create(bin_dir: &Path) -> anyhow::Result<Demo> {
    for dir in [source_dir(), state_dir().join("agent-state"), ipam_dir()] {
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::create_dir_all(state_dir().join("pods"))?;
    fs::write(bin_dir_file(), bin_dir.display().to_string())?;
    let policies = copy_examples()?;

    eprintln!("up: node {NODE} (network namespace) and its agent");
    create_netns(NODE)?;
    netns_sysctl(NODE, "net.ipv4.ip_forward", "1")?;
    netns_sysctl(NODE, "net.ipv6.conf.all.forwarding", "1")?;
    // ptp creates the host-side veths here: without DAD their v6 addresses work at once.
    netns_sysctl(NODE, "net.ipv6.conf.all.accept_dad", "0")?;
    netns_sysctl(NODE, "net.ipv6.conf.default.accept_dad", "0")?;
    start_agent(bin_dir)?;

    let mut demo = Demo {
        bin_dir: bin_dir.to_path_buf(),
        pods: Vec::new(),
    };
    for spec in &PODS {
        eprintln!(
            "up: pod {POD_NAMESPACE}/{} (CNI: loopback, ptp + host-local, weft-cni)",
            spec.name
        );
        let pod = add_pod(bin_dir, spec).with_context(|| format!("creating pod {}", spec.name))?;
        start_server(&pod).with_context(|| format!("starting the server of pod {}", pod.name))?;
        demo.pods.push(pod);
    }
    wait_policy_ready(&demo, policies)?;
    Ok(demo)
}

/// Copy `deploy/examples/*.yaml` into the source dir; returns how many policies they hold.
fn copy_examples() -> anyhow::Result<usize> {
    let examples = cmd::workspace_root().join("deploy/examples");
    let mut files: Vec<PathBuf> = fs::read_dir(&examples)
        .with_context(|| format!("reading {}", examples.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut policies = 0;
    for file in files {
        let text = fs::read_to_string(&file)?;
        policies += text
            .lines()
            .filter(|l| {
                let l = l.trim();
                l == "kind: WeftNetworkPolicy" || l == "kind: WeftClusterwideNetworkPolicy"
            })
            .count();
        let name = file.file_name().expect("a file").to_string_lossy();
        write_atomic(&source_dir(), &name, &text)?;
    }
    Ok(policies)
}

/// Write `text` as `dir/name` through a hidden temp file and a rename, as an agent watching
/// `*.yaml` must see whole files only.
fn write_atomic(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

fn start_agent(bin_dir: &Path) -> anyhow::Result<()> {
    let log = File::create(agent_log())?;
    let log_err = log.try_clone()?;
    let binary = bin_dir.join("weft-agent");
    let netns = format!("/var/run/netns/{NODE}");
    let agent_state = state_dir().join("agent-state");
    // `setsid`: a session of its own, so the agent outlives this command and its terminal.
    let mut child = Command::new("setsid")
        .arg(&binary)
        .args(["--node", NODE, "--netns", &netns])
        .arg("--source-dir")
        .arg(source_dir())
        .arg("--state-dir")
        .arg(&agent_state)
        .arg("--socket")
        .arg(socket())
        .args(["--bpffs-dir", BPFFS_DIR])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    // setsid execs in place (we are not a process group leader): this is the agent's pid.
    fs::write(agent_pid_file(), child.id().to_string())?;
    let deadline = Instant::now() + AGENT_READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "weft-agent exited during start-up ({status})\n--- {} ---\n{}",
                agent_log().display(),
                fs::read_to_string(agent_log()).unwrap_or_default()
            );
        }
        let mut status = Command::new(bin_dir.join("weft"));
        status.arg("--socket").arg(socket()).arg("status");
        if cmd::succeeds(&mut status) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "weft-agent did not answer `weft status` within {AGENT_READY_TIMEOUT:?} (log: {})",
                agent_log().display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn add_pod(bin_dir: &Path, spec: &PodSpec) -> anyhow::Result<PodAddrs> {
    write_atomic(
        &source_dir(),
        &format!("endpoint-{POD_NAMESPACE}-{}.yaml", spec.name),
        &endpoint_yaml(spec.name, spec.app),
    )?;
    let netns = pod_netns(spec.name);
    create_netns(&netns)?;
    netns_sysctl(&netns, "net.ipv6.conf.all.accept_dad", "0")?;
    netns_sysctl(&netns, "net.ipv6.conf.default.accept_dad", "0")?;

    cni(
        bin_dir,
        spec.name,
        "loopback",
        "ADD",
        "lo",
        &loopback_conf(),
    )?;
    let result = cni(bin_dir, spec.name, "ptp", "ADD", POD_IFNAME, &ptp_conf())?;
    fs::write(ptp_result_file(spec.name), result.to_string())?;
    cni(
        bin_dir,
        spec.name,
        "weft-cni",
        "ADD",
        POD_IFNAME,
        &weft_conf(Some(&result)),
    )?;

    let mut ipv4 = None;
    let mut ipv6 = None;
    for ip in result["ips"].as_array().into_iter().flatten() {
        let address = ip["address"].as_str().unwrap_or_default();
        match address.split('/').next().and_then(|a| a.parse().ok()) {
            Some(a @ IpAddr::V4(_)) => ipv4 = Some(a),
            Some(a @ IpAddr::V6(_)) => ipv6 = Some(a),
            None => bail!("ptp result has a bad address {address:?}: {result}"),
        }
    }
    let (Some(ipv4), Some(ipv6)) = (ipv4, ipv6) else {
        bail!(
            "ptp gave pod {} no IPv4 or no IPv6 address: {result}",
            spec.name
        );
    };
    Ok(PodAddrs {
        name: spec.name,
        port: spec.port,
        server: spec.server,
        ipv4,
        ipv6,
    })
}

/// Start the pod's server detached (it outlives this command) and wait until it listens.
fn start_server(pod: &PodAddrs) -> anyhow::Result<()> {
    let netns = pod_netns(pod.name);
    let log = File::create(state_dir().join(format!("{}.log", pod.name)))?;
    let log_err = log.try_clone()?;
    let mut server = Command::new("setsid");
    server.args(["ip", "netns", "exec", &netns]);
    let port = pod.port.to_string();
    match pod.server {
        Server::Http => {
            let www = state_dir().join("www").join(pod.name);
            fs::create_dir_all(&www)?;
            fs::write(
                www.join("index.html"),
                format!("hello from {POD_NAMESPACE}/{}\n", pod.name),
            )?;
            server
                .args([
                    "python3",
                    "-m",
                    "http.server",
                    "--bind",
                    "::",
                    "--directory",
                ])
                .arg(&www)
                .arg(&port);
        }
        Server::TcpEcho => {
            server.args([
                "socat",
                &format!("TCP6-LISTEN:{port},ipv6only=0,fork,reuseaddr"),
                "EXEC:cat",
            ]);
        }
    }
    server
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .with_context(|| format!("starting the server in {netns}"))?;
    // Connect over the pod's own loopback (no policy applies there).
    let deadline = Instant::now() + SERVER_READY_TIMEOUT;
    loop {
        let mut connect = Command::new("ip");
        connect.args([
            "netns",
            "exec",
            &netns,
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/127.0.0.1/{port}"),
        ]);
        if cmd::succeeds(&mut connect) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the server of pod {} does not listen on {port} after {SERVER_READY_TIMEOUT:?}",
                pod.name
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Wait until the agent knows the three pods and every example policy selects a pod.
fn wait_policy_ready(demo: &Demo, policies: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + POLICY_READY_TIMEOUT;
    loop {
        let endpoints = demo.weft_json(&["endpoint", "list"])?;
        let report = demo.weft_json(&["policy", "get"])?;
        let rejected = report["rejected"].as_array().cloned().unwrap_or_default();
        if !rejected.is_empty() {
            bail!(
                "the agent rejected example objects:\n{}",
                rejected
                    .iter()
                    .map(|r| format!("  {}", r.as_str().unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        let known = endpoints.as_array().map_or(0, Vec::len);
        let active = report["policies"].as_array().cloned().unwrap_or_default();
        let all_select = active
            .iter()
            .all(|p| p["selects"].as_array().is_some_and(|s| !s.is_empty()));
        if known == PODS.len() && active.len() >= policies && all_select {
            // The entries are in the maps once the agent reports them; a moment more for
            // the ipcache and endpoint entries written in the same pass.
            std::thread::sleep(Duration::from_millis(500));
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "after {POLICY_READY_TIMEOUT:?} the agent knows {known} of {} pods and {} of \
                 {policies} policies (all selecting a pod: {all_select})",
                PODS.len(),
                active.len()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

// === probes ===

struct Row {
    probe: &'static Probe,
    target: SocketAddr,
    passed: bool,
    /// What `weft observe` reported for this connection: (verdict, reason, endpoint, direction).
    seen: Vec<(String, String, String, String)>,
}

impl Row {
    fn as_expected(&self) -> bool {
        let seen = |verdict: &str| self.seen.iter().any(|s| s.0 == verdict);
        match self.probe.expect {
            Expect::Pass => self.passed,
            Expect::Audit => self.passed && seen("audit"),
            Expect::Drop => !self.passed && seen("dropped"),
        }
    }
}

fn probe_all(demo: &Demo) -> anyhow::Result<Vec<Row>> {
    eprintln!("up: probing {} connections", PROBES.len());
    let mut rows = Vec::new();
    for probe in PROBES {
        let to = demo.pod(probe.to);
        let ip = if probe.ipv6 { to.ipv6 } else { to.ipv4 };
        let target = SocketAddr::new(ip, to.port);
        let passed = match to.server {
            Server::Http => http_probe(probe.from, target),
            Server::TcpEcho => tcp_probe(probe.from, target),
        };
        rows.push(Row {
            probe,
            target,
            passed,
            seen: Vec::new(),
        });
    }
    // Flow events reach the agent through a ring buffer: give the last ones a moment.
    std::thread::sleep(Duration::from_millis(500));
    let mut flows = Vec::new();
    for verdict in ["forwarded", "dropped", "audit"] {
        let out = cmd::output(&mut demo.weft(&[
            "-o",
            "json",
            "observe",
            "--verdict",
            verdict,
            "--last",
            "10000",
        ]))?;
        for line in out.lines().filter(|l| !l.trim().is_empty()) {
            flows.push(
                serde_json::from_str::<Value>(line)
                    .with_context(|| format!("weft observe printed a bad line: {line}"))?,
            );
        }
    }
    for row in &mut rows {
        let from = demo.pod(row.probe.from);
        let source = if row.probe.ipv6 { from.ipv6 } else { from.ipv4 };
        for flow in &flows {
            let ip = |peer: &str| {
                flow[peer]["ip"]
                    .as_str()
                    .and_then(|s| s.parse::<IpAddr>().ok())
            };
            if ip("source") != Some(source)
                || ip("destination") != Some(row.target.ip())
                || flow["destination"]["port"].as_u64() != Some(u64::from(row.target.port()))
            {
                continue;
            }
            let field = |k: &str| flow[k].as_str().unwrap_or("?").to_string();
            let seen = (
                field("verdict"),
                field("drop_reason"),
                field("endpoint"),
                field("direction"),
            );
            if !row.seen.contains(&seen) {
                row.seen.push(seen);
            }
        }
    }
    Ok(rows)
}

/// `curl` from pod `from`: passes when the server answers 200.
fn http_probe(from: &str, target: SocketAddr) -> bool {
    let timeout = PROBE_TIMEOUT_SECS.to_string();
    let max_time = (PROBE_TIMEOUT_SECS + 2).to_string();
    let url = format!("http://{target}/");
    let mut curl = Command::new("ip");
    curl.args(["netns", "exec", &pod_netns(from), "curl", "-sS", "-o"])
        .args(["/dev/null", "-w", "%{http_code}", "--connect-timeout"])
        .args([&timeout, "--max-time", &max_time, &url]);
    cmd::output(&mut curl).is_ok_and(|code| code.trim() == "200")
}

/// `socat` from pod `from` to the echo service: passes when the message comes back.
fn tcp_probe(from: &str, target: SocketAddr) -> bool {
    const MESSAGE: &str = "weft-demo\n";
    let child = Command::new("ip")
        .args(["netns", "exec", &pod_netns(from), "socat"])
        .arg(format!("-T{PROBE_TIMEOUT_SECS}"))
        .arg("-")
        .arg(format!("TCP:{target},connect-timeout={PROBE_TIMEOUT_SECS}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return false;
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(MESSAGE.as_bytes());
    }
    child
        .wait_with_output()
        .is_ok_and(|out| out.status.success() && out.stdout == MESSAGE.as_bytes())
}

fn print_pods(demo: &Demo) {
    println!();
    println!(
        "Node {NODE}, pods of namespace {POD_NAMESPACE} (network namespaces {NETNS_PREFIX}<pod>):"
    );
    for pod in &demo.pods {
        let server = match pod.server {
            Server::Http => "HTTP (python3 -m http.server)",
            Server::TcpEcho => "TCP echo (socat)",
        };
        println!(
            "  {:<9} app={:<9} {:<14} {:<20} {server} on {}",
            pod.name, pod.name, pod.ipv4, pod.ipv6, pod.port
        );
    }
}

fn print_table(rows: &[Row]) {
    let header = [
        "FROM",
        "TO",
        "CLIENT",
        "EXPECTED",
        "RESULT",
        "WEFT OBSERVE SAYS",
        "BECAUSE",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|row| {
            let probe = row.probe;
            let client = match PODS.iter().find(|p| p.name == probe.to).map(|p| p.server) {
                Some(Server::Http) => "curl",
                _ => "socat",
            };
            let family = if probe.ipv6 { "IPv6" } else { "IPv4" };
            let expected = match probe.expect {
                Expect::Pass => "pass",
                Expect::Audit => "pass (audit)",
                Expect::Drop => "drop",
            };
            let mut result = if row.passed { "PASS" } else { "DROPPED" }.to_string();
            if !row.as_expected() {
                result.push_str(" (!)");
            }
            let notable: Vec<_> = row.seen.iter().filter(|s| s.0 != "forwarded").collect();
            let seen = if notable.is_empty() {
                if row.seen.is_empty() {
                    "-"
                } else {
                    "forwarded"
                }
                .to_string()
            } else {
                notable
                    .iter()
                    .map(|(verdict, reason, endpoint, direction)| {
                        let pod = endpoint.rsplit('/').next().unwrap_or(endpoint);
                        format!("{verdict} {reason} ({pod} {direction})")
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            [
                probe.from.to_string(),
                format!("{}:{}", probe.to, row.target.port()),
                format!("{client} {family}"),
                expected.to_string(),
                result,
                seen,
                probe.why.to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            let sep = match i {
                0 => "",
                1 => " -> ",
                _ => "  ",
            };
            out.push_str(sep);
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}"));
            }
        }
        out
    };
    println!();
    println!("Connections in namespace {POD_NAMESPACE} under the policies of deploy/examples/:");
    println!();
    println!("{}", line(&header));
    for row in &cells {
        let refs: Vec<&str> = row.iter().map(String::as_str).collect();
        println!("{}", line(&refs));
    }
    let bad = rows.iter().filter(|r| !r.as_expected()).count();
    println!();
    if bad == 0 {
        println!(
            "All {} connections behaved as the policies say.",
            rows.len()
        );
    } else {
        println!(
            "{bad} of {} connections did NOT behave as expected (marked (!)).",
            rows.len()
        );
    }
}

fn print_next_steps(demo: &Demo) {
    let weft = format!(
        "{} --socket {}",
        demo.bin_dir.join("weft").display(),
        socket().display()
    );
    let api = demo.pod("api");
    let db = demo.pod("db");
    println!();
    println!("The demo stays up (node {NODE}, pods in network namespaces {NETNS_PREFIX}<pod>).");
    println!("Look around:");
    println!("  {weft} status");
    println!("  {weft} endpoint list");
    println!("  {weft} policy get");
    println!("  {weft} observe -f                  # live flows; Ctrl-C to stop");
    println!("  {weft} observe --verdict dropped");
    println!("  {weft} observe --verdict audit");
    println!("  bpftool map dump pinned {BPFFS_DIR}/policy");
    println!(
        "  ip netns exec {NETNS_PREFIX}frontend curl http://{}/",
        SocketAddr::new(api.ipv4, api.port)
    );
    println!(
        "  ip netns exec {NETNS_PREFIX}frontend curl --max-time 3 http://{}/     # frontend -> api over IPv6",
        SocketAddr::new(api.ipv6, api.port)
    );
    println!(
        "  echo hi | ip netns exec {NETNS_PREFIX}api socat - TCP:{}      # api -> db",
        SocketAddr::new(db.ipv4, db.port)
    );
    println!(
        "Policies live in {} (edit, add or remove files: enforced within a second).",
        source_dir().display()
    );
    println!("Agent log: {}", agent_log().display());
    println!("Tear down: cargo xtask down");
}

// === down ===

pub fn down() -> anyhow::Result<()> {
    require_root()?;
    let removed = teardown();
    if removed.is_empty() {
        println!("down: no demo is up; nothing to remove");
    } else {
        report_removed(&removed);
    }
    let left = leftovers();
    if !left.is_empty() {
        bail!("down: could not remove: {}", left.join(", "));
    }
    Ok(())
}

fn report_removed(removed: &[String]) {
    println!("down: removed");
    for item in removed {
        println!("  {item}");
    }
}

/// Whether anything of a demo exists (complete or not).
fn demo_present() -> bool {
    Path::new(STATE_DIR).exists()
        || Path::new(BPFFS_DIR).exists()
        || !demo_netns().is_empty()
        || !agent_pids().is_empty()
}

/// What is still there after a teardown (each named).
fn leftovers() -> Vec<String> {
    let mut left: Vec<String> = demo_netns()
        .into_iter()
        .map(|n| format!("netns {n}"))
        .collect();
    left.extend(agent_pids().into_iter().map(|p| format!("agent pid {p}")));
    for path in [STATE_DIR, BPFFS_DIR] {
        if Path::new(path).exists() {
            left.push(path.to_string());
        }
    }
    left
}

/// Remove the demo, whatever state it is in; returns what was removed. Never fails: each step
/// reports its own errors and the next one runs.
fn teardown() -> Vec<String> {
    let mut removed = Vec::new();
    let namespaces = demo_netns();
    let pod_namespaces: Vec<&String> = namespaces.iter().filter(|n| *n != NODE).collect();

    // 1. The pods' servers: every process inside a pod's namespace.
    for ns in &pod_namespaces {
        let pids = netns_pids(ns);
        if !pids.is_empty() {
            stop_pids(&pids, Duration::from_secs(3));
            removed.push(format!(
                "processes in netns {ns} (pid {})",
                join_pids(&pids)
            ));
        }
    }

    // 2. CNI DEL in reverse order of ADD, as a runtime does; the agent still runs for weft-cni.
    //    Only inside the node namespace: ptp DEL deletes the host-side veth wherever it runs.
    if namespaces.iter().any(|n| n == NODE) {
        let bin_dir = fs::read_to_string(bin_dir_file())
            .ok()
            .map(|s| PathBuf::from(s.trim()));
        for pod in PODS.iter().map(|p| p.name) {
            let has_netns = pod_namespaces.iter().any(|n| **n == pod_netns(pod));
            let prev: Option<Value> = fs::read_to_string(ptp_result_file(pod))
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok());
            if !has_netns && prev.is_none() {
                continue;
            }
            let bins = bin_dir.as_deref().unwrap_or(Path::new("/nonexistent"));
            let mut steps = Vec::new();
            if bin_dir.is_some() {
                steps.push(("weft-cni", POD_IFNAME, weft_conf(prev.as_ref())));
            }
            steps.push(("ptp", POD_IFNAME, ptp_conf()));
            steps.push(("loopback", "lo", loopback_conf()));
            for (plugin, ifname, conf) in steps {
                if let Err(e) = cni(bins, pod, plugin, "DEL", ifname, &conf) {
                    eprintln!("down: pod {pod}: {e:#}");
                }
            }
            removed.push(format!(
                "CNI DEL of pod {POD_NAMESPACE}/{pod} (weft-cni, ptp + host-local, loopback)"
            ));
        }
    }

    // 3. The agent (its threads live in the node's namespace), then anything else left there.
    let pids = agent_pids();
    if !pids.is_empty() {
        stop_pids(&pids, AGENT_STOP_TIMEOUT);
        removed.push(format!("weft-agent (pid {})", join_pids(&pids)));
    }
    if namespaces.iter().any(|n| n == NODE) {
        let pids = netns_pids(NODE);
        if !pids.is_empty() {
            stop_pids(&pids, Duration::from_secs(3));
            removed.push(format!(
                "processes in netns {NODE} (pid {})",
                join_pids(&pids)
            ));
        }
    }

    // 4. Namespaces: pods first, then the node.
    for ns in pod_namespaces
        .iter()
        .copied()
        .chain(namespaces.iter().filter(|n| *n == NODE))
    {
        match cmd::output(Command::new("ip").args(["netns", "del", ns])) {
            Ok(_) => removed.push(format!("netns {ns}")),
            Err(e) => eprintln!("down: {e:#}"),
        }
    }

    // 5. Pinned maps, programs and links; then the files.
    for dir in [BPFFS_DIR, STATE_DIR] {
        if Path::new(dir).exists() {
            match fs::remove_dir_all(dir) {
                Ok(()) => removed.push(dir.to_string()),
                Err(e) => eprintln!("down: cannot remove {dir}: {e}"),
            }
        }
    }
    // The agents' shared bpffs parent, once no other node uses it.
    if let Some(parent) = Path::new(BPFFS_DIR).parent() {
        let _ = fs::remove_dir(parent);
    }
    removed
}

/// The demo's network namespaces (`weft-demo-*`), as `ip netns list` shows them.
fn demo_netns() -> Vec<String> {
    let Ok(out) = cmd::output(Command::new("ip").args(["netns", "list"])) else {
        return Vec::new();
    };
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(NETNS_PREFIX))
        .map(str::to_string)
        .collect()
}

fn netns_pids(ns: &str) -> Vec<u32> {
    cmd::output(Command::new("ip").args(["netns", "pids", ns]))
        .map(|out| {
            out.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Running `weft-agent` processes of node `weft-demo-node`, found by command line (so also
/// one whose state dir, with `agent.pid`, is gone).
fn agent_pids() -> Vec<u32> {
    weft_tests::agent_processes()
        .into_iter()
        .filter(|(_, node)| node == NODE)
        .filter_map(|(pid, _)| u32::try_from(pid).ok())
        .filter(|pid| alive(*pid))
        .collect()
}

/// Whether `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // `pid (comm) state ...`; comm may hold spaces and parentheses.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

/// SIGTERM, wait up to `timeout` for all of them, then SIGKILL whoever is left.
fn stop_pids(pids: &[u32], timeout: Duration) {
    signal(pids, "TERM");
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !pids.iter().any(|p| alive(*p)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
    eprintln!(
        "down: pid {} ignored SIGTERM for {timeout:?}; killing",
        join_pids(&left)
    );
    signal(&left, "KILL");
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && left.iter().any(|p| alive(*p)) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(pids: &[u32], signal: &str) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .args(["-s", signal])
        .args(pids.iter().map(u32::to_string))
        .stderr(Stdio::null())
        .status();
}

fn join_pids(pids: &[u32]) -> String {
    pids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

// === namespaces and CNI ===

fn require_root() -> anyhow::Result<()> {
    let uid = cmd::output(Command::new("id").arg("-u")).unwrap_or_default();
    if uid.trim() != "0" {
        bail!("the demo needs root (network namespaces, bpffs): run it as root");
    }
    Ok(())
}

fn create_netns(name: &str) -> anyhow::Result<()> {
    cmd::output(Command::new("ip").args(["netns", "add", name]))?;
    cmd::output(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]))?;
    Ok(())
}

fn netns_sysctl(ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    cmd::output(Command::new("ip").args([
        "netns",
        "exec",
        ns,
        "sysctl",
        "-qw",
        &format!("{key}={value}"),
    ]))?;
    Ok(())
}

fn ptp_conf() -> Value {
    weft_tests::ptp_conf(&ipam_dir(), SUBNET_V4, SUBNET_V6)
}

fn weft_conf(prev: Option<&Value>) -> Value {
    let mut conf = json!({
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "type": "weft-cni",
        "agentSocket": socket(),
    });
    if let Some(prev) = prev {
        conf["prevResult"] = prev.clone();
    }
    conf
}

fn loopback_conf() -> Value {
    json!({"cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback"})
}

/// Run one CNI plugin for `pod` inside the node's namespace, as a container runtime does;
/// returns ADD's result.
fn cni(
    bin_dir: &Path,
    pod: &str,
    plugin: &str,
    command: &str,
    ifname: &str,
    conf: &Value,
) -> anyhow::Result<Value> {
    let binary = if plugin == "weft-cni" {
        bin_dir.join(plugin)
    } else {
        PathBuf::from(CNI_PLUGIN_DIR).join(plugin)
    };
    let netns = pod_netns(pod);
    let mut child = Command::new("ip")
        .args(["netns", "exec", NODE])
        .arg(&binary)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &netns)
        .env("CNI_NETNS", format!("/var/run/netns/{netns}"))
        .env("CNI_IFNAME", ifname)
        .env(
            "CNI_PATH",
            format!("{CNI_PLUGIN_DIR}:{}", bin_dir.display()),
        )
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={POD_NAMESPACE};K8S_POD_NAME={pod}"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", binary.display()))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(conf.to_string().as_bytes())
        .with_context(|| format!("writing the config to {plugin}"))?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{plugin} {command} failed ({}): {} {}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if stdout.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&stdout)
        .with_context(|| format!("{plugin} {command} printed no JSON: {stdout}"))
}

/// The pod's `Endpoint` object, as the local source reads it.
fn endpoint_yaml(name: &str, app: &str) -> String {
    format!(
        "apiVersion: weft.io/v1alpha1\n\
         kind: Endpoint\n\
         metadata:\n  name: {name}\n  namespace: {POD_NAMESPACE}\n  labels:\n    app: {app}\n\
         spec:\n  serviceAccount: {name}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_probe_names_demo_pods() {
        for probe in PROBES {
            for pod in [probe.from, probe.to] {
                assert!(PODS.iter().any(|p| p.name == pod), "{pod}");
            }
        }
    }

    #[test]
    fn every_name_carries_the_demo_prefix() {
        for pod in &PODS {
            let ns = pod_netns(pod.name);
            assert!(ns.starts_with(NETNS_PREFIX), "{ns}");
        }
        assert!(NODE.starts_with(NETNS_PREFIX));
        assert!(BPFFS_DIR.ends_with(NODE));
    }

    #[test]
    fn endpoint_object_shape() {
        let yaml = endpoint_yaml("api", "api");
        assert!(yaml.contains("kind: Endpoint\n"));
        assert!(yaml.contains("  namespace: shop\n"));
        assert!(yaml.contains("    app: api\n"));
    }
}
