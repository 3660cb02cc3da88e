//! `cargo xtask up` / `cargo xtask down`: weft's demo on this machine, built with the test
//! harness (`weft-tests`): a cluster of network-namespace nodes (two by default) joined by an
//! underlay, one agent per node reading a shared source (`deploy/examples/` plus the pods'
//! `Endpoint` and the nodes' `Node` objects), and pods `frontend`, `api` and `db` of
//! namespace `shop` spread over the nodes, attached by the real CNI chain and running real
//! servers. It probes the interesting connections with real clients (curl, TCP echo) and
//! prints which pass and which are dropped, with the reason `weft observe` gives.
//!
//! Everything is named with the prefix `weftdm` and lives under `/var/run/weft-demo`;
//! `down` removes exactly that, also after an `up` that failed half way.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::Value;
use weft_tests::{Cluster, ClusterOptions, Node, Pod, TestPrefix, remove_prefix};

use crate::{build, cmd, setup};

/// Prefix of every name the demo creates (namespaces, nodes, links, pins).
const PREFIX: &str = "weftdm";
/// Everything on disk: the shared source, each node's state, IPAM leases, logs, sockets.
const STATE_DIR: &str = "/var/run/weft-demo";
/// The Kubernetes namespace of the demo's pods (the examples' `metadata.namespace`).
const POD_NAMESPACE: &str = "shop";
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Args)]
pub struct UpOptions {
    #[command(flatten)]
    pub setup: setup::Options,
    /// Build and run the release binaries (default: debug, shared with `cargo xtask test`).
    #[arg(long)]
    pub release: bool,
    /// How many nodes (pods are spread over them).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=9))]
    pub nodes: u8,
    /// Route pod traffic between nodes in plain text (the demo encrypts it with WireGuard by
    /// default).
    #[arg(long)]
    pub plain: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    /// `python3 -m http.server`.
    Http,
    /// `socat` echoing every connection back (a stand-in for a database's TCP service).
    TcpEcho,
}

struct PodSpec {
    name: &'static str,
    port: u16,
    server: Server,
    /// Which node it runs on, modulo the number of nodes.
    node: usize,
}

const PODS: [PodSpec; 3] = [
    PodSpec {
        name: "frontend",
        port: 80,
        server: Server::Http,
        node: 0,
    },
    PodSpec {
        name: "api",
        port: 8080,
        server: Server::Http,
        node: 1,
    },
    PodSpec {
        name: "db",
        port: 5432,
        server: Server::TcpEcho,
        node: 0,
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

fn bin_dir(release: bool) -> PathBuf {
    cmd::workspace_root()
        .join("target")
        .join(if release { "release" } else { "debug" })
}

pub fn up(opts: &UpOptions) -> anyhow::Result<()> {
    require_root()?;
    setup::run(&opts.setup)?;
    build::run(&build::Options {
        release: opts.release,
    })?;
    let bins = weft_tests::set_bin_dir(bin_dir(opts.release));
    for bin in ["weft-agent", "weft", "weft-cni"] {
        if !bins.join(bin).exists() {
            bail!("{} missing after the build", bins.join(bin).display());
        }
    }
    if demo_present() {
        eprintln!("up: a demo is already up; taking it down first");
        report_removed(&teardown());
    }
    let nodes = usize::from(opts.nodes);
    eprintln!("up: {nodes} node(s) on an underlay, one agent each");
    let prefix = TestPrefix::fixed(PREFIX);
    let cluster = Cluster::start(
        &prefix,
        &ClusterOptions {
            nodes,
            agents: true,
            dir: Some(PathBuf::from(STATE_DIR)),
            // Strict: pod traffic between nodes outside the tunnel is dropped.
            agent_args: if !opts.plain && nodes > 1 {
                vec!["--encryption-strict".to_owned()]
            } else {
                Vec::new()
            },
            encryption: !opts.plain && nodes > 1,
        },
    );
    copy_examples(cluster.source_dir())?;
    let mut pods = Vec::new();
    for spec in &PODS {
        let node = cluster.node(spec.node % nodes);
        eprintln!(
            "up: pod {POD_NAMESPACE}/{} on {} (CNI: loopback, ptp + host-local, weft-cni)",
            spec.name,
            node.name()
        );
        let pod = node.add_pod(spec.name, POD_NAMESPACE, &[("app", spec.name)]);
        start_server(&pod, spec);
        pods.push(pod);
    }
    cluster.policy_wait();
    let rows = probe_all(&cluster, &pods);
    print_pods(&cluster, &pods);
    print_table(&rows);
    print_encryption(&cluster);
    print_next_steps(&cluster, &pods);
    let mismatches = rows.iter().filter(|r| !r.as_expected()).count();
    // The demo runs on after this process: leave everything in place.
    for pod in pods {
        pod.keep();
    }
    cluster.keep();
    if mismatches > 0 {
        bail!(
            "{mismatches} connection(s) did not behave as the example policies say; the demo \
             stays up for inspection (agent logs under {STATE_DIR})"
        );
    }
    Ok(())
}

/// Copy `deploy/examples/*.yaml` into the shared source.
fn copy_examples(source: &Path) -> anyhow::Result<()> {
    let examples = cmd::workspace_root().join("deploy/examples");
    for entry in
        std::fs::read_dir(&examples).with_context(|| format!("reading {}", examples.display()))?
    {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let name = path.file_name().expect("a file name");
            std::fs::copy(&path, source.join(name))
                .with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}

/// Start the pod's server as a process (it outlives `up`).
fn start_server(pod: &Pod, spec: &PodSpec) {
    match spec.server {
        Server::Http => pod.spawn_http_server(spec.port),
        Server::TcpEcho => pod.spawn(
            "socat",
            &[
                &format!("TCP6-LISTEN:{},fork,reuseaddr,ipv6only=0", spec.port),
                "EXEC:cat",
            ],
        ),
    }
}

fn pod<'a>(pods: &'a [Pod], name: &str) -> &'a Pod {
    pods.iter()
        .find(|p| p.name == name)
        .expect("probes name demo pods")
}

fn spec(name: &str) -> &'static PodSpec {
    PODS.iter()
        .find(|p| p.name == name)
        .expect("probes name demo pods")
}

struct Row {
    probe: &'static Probe,
    target: SocketAddr,
    passed: bool,
    /// The nodes of source and destination.
    nodes: (String, String),
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

fn node_of<'a>(cluster: &'a Cluster, pod_name: &str) -> &'a Node {
    cluster.node(spec(pod_name).node % cluster.nodes().len())
}

fn probe_all(cluster: &Cluster, pods: &[Pod]) -> Vec<Row> {
    eprintln!("up: probing {} connections", PROBES.len());
    let mut rows = Vec::new();
    for probe in PROBES {
        let to = pod(pods, probe.to);
        let from = pod(pods, probe.from);
        let ip = if probe.ipv6 { to.ipv6 } else { to.ipv4 };
        let port = spec(probe.to).port;
        let passed = match spec(probe.to).server {
            Server::Http => {
                let out = from.curl(
                    &Pod::url(ip, port, "/"),
                    PROBE_TIMEOUT,
                    &["-o", "/dev/null", "-w", "%{http_code}"],
                );
                String::from_utf8_lossy(&out.stdout).trim() == "200"
            }
            Server::TcpEcho => from.tcp_probe(ip, port, PROBE_TIMEOUT),
        };
        rows.push(Row {
            probe,
            target: SocketAddr::new(ip, port),
            passed,
            nodes: (
                node_of(cluster, probe.from).name().to_owned(),
                node_of(cluster, probe.to).name().to_owned(),
            ),
            seen: Vec::new(),
        });
    }
    // Flow events reach each agent through a ring buffer drained every few tens of ms.
    std::thread::sleep(Duration::from_millis(300));
    let mut flows: Vec<Value> = Vec::new();
    for node in cluster.nodes() {
        flows.extend(node.observed(&[]));
    }
    for row in &mut rows {
        let from = pod(pods, row.probe.from);
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
    rows
}

/// Each node's WireGuard peers, as `weft encryption status` reports them.
fn print_encryption(cluster: &Cluster) {
    println!();
    for node in cluster.nodes() {
        let status = node.weft_json(&["encryption", "status"]);
        if status["mode"] != "wireguard" {
            println!(
                "Encryption on {}: off (pod traffic between nodes is plain)",
                node.name()
            );
            continue;
        }
        println!(
            "Encryption on {}: strict mode {}",
            node.name(),
            if status["strict"] == true {
                "on (pod traffic between nodes outside the tunnel drops as `unencrypted`)"
            } else {
                "off"
            }
        );
        for peer in status["peers"].as_array().into_iter().flatten() {
            let handshake = peer["last_handshake_seconds_ago"].as_u64().map_or_else(
                || "no handshake yet".to_owned(),
                |s| format!("handshake {s}s ago"),
            );
            println!(
                "Encryption {} -> {}: WireGuard via {} ({handshake}, {} bytes out, {} in; `wg show {}`)",
                node.name(),
                peer["node"].as_str().unwrap_or("?"),
                peer["endpoint"].as_str().unwrap_or("?"),
                peer["tx_bytes"],
                peer["rx_bytes"],
                status["wg_interface"].as_str().unwrap_or("?"),
            );
        }
    }
}

fn print_pods(cluster: &Cluster, pods: &[Pod]) {
    println!();
    println!("Pods of namespace {POD_NAMESPACE}:");
    for p in pods {
        let s = spec(&p.name);
        let server = match s.server {
            Server::Http => "HTTP (python3 -m http.server)",
            Server::TcpEcho => "TCP echo (socat)",
        };
        println!(
            "  {:<9} on {:<10} {:<14} {:<20} {server} on {}",
            p.name,
            node_of(cluster, &p.name).name(),
            p.ipv4,
            p.ipv6,
            s.port
        );
    }
}

fn print_table(rows: &[Row]) {
    let header = [
        "FROM",
        "TO",
        "NODES",
        "CLIENT",
        "EXPECTED",
        "RESULT",
        "WEFT OBSERVE SAYS",
        "BECAUSE",
    ];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|row| {
            let probe = row.probe;
            let client = match spec(probe.to).server {
                Server::Http => "curl",
                Server::TcpEcho => "tcp",
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
            let nodes = if row.nodes.0 == row.nodes.1 {
                "same node".to_owned()
            } else {
                "cross-node".to_owned()
            };
            [
                probe.from.to_string(),
                format!("{}:{}", probe.to, row.target.port()),
                nodes,
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
            out.push_str(match i {
                0 => "",
                1 => " -> ",
                _ => "  ",
            });
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(cell);
                out.push_str(&" ".repeat(w.saturating_sub(cell.chars().count())));
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

fn print_next_steps(cluster: &Cluster, pods: &[Pod]) {
    let node = cluster.node(0);
    let weft = format!(
        "{} --socket {}",
        weft_tests::bin_dir().join("weft").display(),
        node.socket().display()
    );
    let api = pod(pods, "api");
    let db = pod(pods, "db");
    let frontend = pod(pods, "frontend");
    println!();
    println!(
        "The demo stays up: nodes {}; pods in network namespaces {PREFIX}-<pod>.",
        cluster
            .nodes()
            .iter()
            .map(Node::name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "Look around (this is node {}; each node has its agent and socket):",
        node.name()
    );
    println!("  {weft} status");
    println!("  {weft} node list");
    println!("  {weft} endpoint list");
    println!("  {weft} policy get");
    println!("  {weft} observe -f                  # live flows; Ctrl-C to stop");
    println!("  {weft} observe --verdict dropped");
    println!("  {weft} observe --verdict audit");
    println!(
        "  bpftool map dump pinned {}/weft_policy_v1",
        node.bpffs_dir().display()
    );
    println!(
        "  ip netns exec {} curl http://{}/",
        frontend.netns_name,
        SocketAddr::new(api.ipv4, 8080)
    );
    println!(
        "  echo hi | ip netns exec {} socat - TCP:{}      # api -> db",
        api.netns_name,
        SocketAddr::new(db.ipv4, 5432)
    );
    println!(
        "Policies live in {} (edit, add or remove files: enforced within a second; `weft policy wait` says when).",
        cluster.source_dir().display()
    );
    for n in cluster.nodes() {
        println!("Agent log of {}: {}", n.name(), n.log_path().display());
    }
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
    if demo_present() {
        bail!("down: something of the demo is still there (see above)");
    }
    Ok(())
}

fn report_removed(removed: &[String]) {
    println!("down: removed");
    for item in removed {
        println!("  {item}");
    }
}

fn teardown() -> Vec<String> {
    remove_prefix(PREFIX, &[Path::new(STATE_DIR)])
}

/// Whether anything of a demo exists (complete or not).
fn demo_present() -> bool {
    let ours = |name: &str| name.starts_with(&format!("{PREFIX}-"));
    let netns = cmd::output(std::process::Command::new("ip").args(["netns", "list"]))
        .unwrap_or_default()
        .lines()
        .any(&ours);
    let pins = std::fs::read_dir("/sys/fs/bpf/weft")
        .is_ok_and(|d| d.flatten().any(|e| ours(&e.file_name().to_string_lossy())));
    let agents = weft_tests::agent_processes()
        .iter()
        .any(|(_, node)| ours(node));
    Path::new(STATE_DIR).exists() || netns || pins || agents
}

fn require_root() -> anyhow::Result<()> {
    if !setup::is_root() {
        bail!("the demo needs root (network namespaces, bpffs): run it as root");
    }
    Ok(())
}
