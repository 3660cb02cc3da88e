//! `cargo xtask bench`: netperf pod to pod through one node namespace, in three configurations
//! built side by side and kept for the whole run — no mesh, weft with 1,000 policy rules, and
//! iptables with the same 1,000 rules — interleaved round-robin, repeated, and summarised as
//! medians, spreads and ratios against the targets of issue 2.
//!
//! Everything lives in network namespaces named with one harness prefix (`weft-tests`), so
//! nothing of the host's network changes; the harness removes it on drop, which also runs on
//! an error, a panic, or Ctrl-C/SIGTERM (caught here and turned into an error). Every netperf
//! run is bounded in time.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use clap::{Args, ValueEnum};
use weft_tests::{Node, Pod, TestPrefix};

use crate::{build, cmd, setup};

/// netserver's control port.
const CONTROL_PORT: u16 = 12865;
/// The data connection's server port, pinned with the test-specific `-P ,<port>`.
const DATA_PORT: u16 = 12866;
/// Ports of the 999 rules that never match: 20000..=20998.
const DECOY_PORT_BASE: u16 = 20000;
const DECOY_RULES: u16 = 999;
/// A port no rule allows (for the enforcement check).
const UNLISTED_PORT: u16 = 21999;
/// The policy map must hold at least this many entries before we measure.
const MIN_POLICY_ENTRIES: u64 = 1000;
const NAMESPACE: &str = "bench";
/// Time a netperf run may take beyond its `-l`, for connection set-up and result exchange.
const RUN_GRACE: Duration = Duration::from_secs(30);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Args)]
pub struct Options {
    /// Seconds per netperf run (`-l`).
    #[arg(long, default_value_t = 5)]
    pub seconds: u32,
    /// How many times each (test, pinning, configuration) runs.
    #[arg(long, default_value_t = 5)]
    pub repeats: u32,
    /// Smoke run: 1 repeat of 2 s (overrides --seconds and --repeats).
    #[arg(long)]
    pub quick: bool,
    /// Tests to run: netperf's, and `policy-scale` (the policy core at cluster scale, no
    /// kernel needed; alone it needs neither root nor a build).
    #[arg(long, value_enum, value_delimiter = ',', ignore_case = true,
          default_values_t = [Test::Rr, Test::Crr, Test::Stream, Test::PolicyScale])]
    pub tests: Vec<Test>,
    /// CPU pinnings: `same` (`-T 0,0`, client and server on CPU 0) and/or `cross` (`-T 0,1`).
    #[arg(long, value_enum, value_delimiter = ',',
          default_values_t = [Pinning::Same, Pinning::Cross])]
    pub pinning: Vec<Pinning>,
    /// Use the binaries already in the release target dir: skip `setup` and `build --release`.
    #[arg(long)]
    pub skip_build: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Test {
    #[value(name = "TCP_RR")]
    Rr,
    #[value(name = "TCP_CRR")]
    Crr,
    #[value(name = "TCP_STREAM")]
    Stream,
    /// Not netperf: the policy core at 10,000 endpoints (`bench_scale`).
    #[value(name = "policy-scale")]
    PolicyScale,
}

impl Test {
    fn netperf_name(self) -> &'static str {
        match self {
            Test::Rr => "TCP_RR",
            Test::Crr => "TCP_CRR",
            Test::Stream => "TCP_STREAM",
            Test::PolicyScale => "policy-scale",
        }
    }

    /// Minimum weft/no-mesh ratio of the median.
    fn target(self) -> f64 {
        match self {
            Test::Rr | Test::Stream | Test::PolicyScale => 0.95,
            Test::Crr => 0.90,
        }
    }

    fn has_latency(self) -> bool {
        self != Test::Stream
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Pinning {
    /// `-T 0,0`: client and server on CPU 0 (the strict case).
    Same,
    /// `-T 0,1`: client on CPU 0, server on CPU 1.
    Cross,
}

impl Pinning {
    fn cpus(self) -> &'static str {
        match self {
            Pinning::Same => "0,0",
            Pinning::Cross => "0,1",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Pinning::Same => "-T 0,0 (same CPU)",
            Pinning::Cross => "-T 0,1 (different CPUs)",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Config {
    NoMesh,
    /// weft with its local delivery only (`--socket-redirect false`).
    Weft,
    Iptables,
    /// weft with same-node socket redirection (`sock_ops` + `sk_msg`); the client runs in the
    /// node's cgroup, as a pod would.
    WeftSockmap,
}

impl Config {
    const ALL: [Config; 4] = [
        Config::NoMesh,
        Config::Weft,
        Config::Iptables,
        Config::WeftSockmap,
    ];

    fn label(self) -> &'static str {
        match self {
            Config::NoMesh => "no-mesh",
            Config::Weft => "weft",
            Config::Iptables => "iptables",
            Config::WeftSockmap => "weft+sock",
        }
    }

    fn is_weft(self) -> bool {
        matches!(self, Config::Weft | Config::WeftSockmap)
    }

    /// Short tag for node and pod names (a pod's netns is `<prefix>-<pod>`, at most 15 chars).
    fn tag(self) -> &'static str {
        match self {
            Config::NoMesh => "nm",
            Config::Weft => "wf",
            Config::Iptables => "ip",
            Config::WeftSockmap => "ws",
        }
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// One netperf result.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Sample {
    throughput: f64,
    /// Median round-trip latency in µs (RR tests).
    p50_us: Option<f64>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    if opts.tests.contains(&Test::PolicyScale) {
        crate::bench_scale::run()?;
    }
    let netperf: Vec<Test> = opts
        .tests
        .iter()
        .copied()
        .filter(|t| *t != Test::PolicyScale)
        .collect();
    if netperf.is_empty() {
        return Ok(());
    }
    let opts = &Options {
        tests: netperf,
        pinning: opts.pinning.clone(),
        ..*opts
    };
    let (seconds, repeats) = if opts.quick {
        (2, 1)
    } else {
        (opts.seconds, opts.repeats)
    };
    ensure!(
        seconds > 0 && repeats > 0,
        "--seconds and --repeats must be > 0"
    );
    ensure!(
        !opts.tests.is_empty() && !opts.pinning.is_empty(),
        "nothing to run"
    );
    ensure!(
        nix_is_root(),
        "cargo xtask bench needs root (network namespaces, bpffs, iptables)"
    );
    if !opts.skip_build {
        setup::run(&setup::Options::default())?;
        build::run(&build::Options { release: true })?;
    }
    let bins = weft_tests::set_bin_dir(release_dir());
    for bin in ["weft-agent", "weft", "weft-cni"] {
        ensure!(
            bins.join(bin).exists(),
            "{} missing: run without --skip-build",
            bins.join(bin).display()
        );
    }
    catch_signals()?;
    for stale in weft_tests::sweep_stale() {
        eprintln!("bench: removed leftover {stale}");
    }

    let prefix = TestPrefix::new();
    eprintln!("bench: building the three configurations under prefix {prefix}");
    // Dropping a setup (also on an error or a panic) removes its node, pods and netserver.
    let mut setups = Vec::new();
    for config in Config::ALL {
        setups.push(Setup::build(&prefix, config)?);
        check_interrupted()?;
    }
    let descriptions: Vec<String> = setups.iter().map(|s| s.describe.clone()).collect();

    let cells: Vec<(Test, Pinning)> = opts
        .tests
        .iter()
        .flat_map(|t| opts.pinning.iter().map(move |p| (*t, *p)))
        .collect();
    let total = cells.len() * Config::ALL.len() * repeats as usize;
    let mut results: BTreeMap<(Test, Pinning, Config), Vec<Sample>> = BTreeMap::new();
    let mut done = 0;
    let started = Instant::now();
    for repeat in 0..repeats as usize {
        for (test, pinning) in &cells {
            // Round-robin, rotating which configuration goes first on each repeat.
            for i in 0..setups.len() {
                let setup = &setups[(i + repeat) % setups.len()];
                check_interrupted()?;
                done += 1;
                let sample = setup.netperf(*test, *pinning, seconds)?;
                eprintln!(
                    "bench: [{done}/{total}] {} {} {}: {:.1}{}",
                    test.netperf_name(),
                    pinning.describe(),
                    setup.config,
                    sample.throughput,
                    sample
                        .p50_us
                        .map(|p| format!(" (p50 {p:.0} µs)"))
                        .unwrap_or_default()
                );
                results
                    .entry((*test, *pinning, setup.config))
                    .or_default()
                    .push(sample);
            }
        }
    }
    let mut after = String::new();
    for setup in &setups {
        after.push_str(&setup.after_run()?);
    }

    let header = header(seconds, repeats, started.elapsed(), &descriptions)?;
    let table = report(&cells, &results);
    print!("{header}{after}{table}");
    io::stdout().flush()?;
    drop(setups);
    Ok(())
}

/// One configuration: a node namespace with a client and a server pod, netserver running.
/// Fields drop in order: the pods (CNI DEL needs the node's namespace) before the node.
struct Setup {
    client: Pod,
    server: Pod,
    node: Node,
    config: Config,
    describe: String,
}

impl Setup {
    fn build(prefix: &TestPrefix, config: Config) -> anyhow::Result<Self> {
        let tag = config.tag();
        let client_labels = [("app", "bench-client")];
        let server_labels = [("app", "bench-server")];
        let (node, server, client) = if config.is_weft() {
            let node = if config == Config::Weft {
                Node::start_with_args(prefix, tag, &["--socket-redirect", "false"])
            } else {
                Node::start(prefix, tag)
            };
            let server = node.add_pod(&format!("srv-{tag}"), NAMESPACE, &server_labels);
            let client = node.add_pod(&format!("cli-{tag}"), NAMESPACE, &client_labels);
            (node, server, client)
        } else {
            let node = Node::without_agent(prefix, tag);
            let server =
                node.add_pod_without_weft(&format!("srv-{tag}"), NAMESPACE, &server_labels);
            let client =
                node.add_pod_without_weft(&format!("cli-{tag}"), NAMESPACE, &client_labels);
            (node, server, client)
        };
        let mut setup = Self {
            client,
            server,
            node,
            config,
            describe: String::new(),
        };
        setup.describe = match config {
            Config::NoMesh => {
                "no-mesh : plain routing through the node namespace (no agent, pods without \
                 weft-cni, no firewall rules)\n"
                    .to_string()
            }
            Config::Weft => setup.apply_weft_policy()?,
            Config::WeftSockmap => {
                setup.apply_weft_policy()?;
                let status = setup.node.weft_ok(&["status"]);
                let line = status
                    .lines()
                    .find(|l| l.starts_with("Socket redirect:"))
                    .unwrap_or("Socket redirect: (not reported)")
                    .to_owned();
                ensure!(
                    line.contains(": on"),
                    "weft+sock needs socket redirection: {line}"
                );
                format!(
                    "weft+sock: weft's policy, with same-node socket redirection (weft runs with \
                     --socket-redirect false); netperf in the node's cgroup\n\
                     \x20         {}\n",
                    line.split_whitespace().collect::<Vec<_>>().join(" ")
                )
            }
            Config::Iptables => setup.apply_iptables()?,
        };
        setup.start_netserver()?;
        setup.check_enforcement()?;
        Ok(setup)
    }

    fn apply_weft_policy(&self) -> anyhow::Result<String> {
        self.node
            .apply("bench-server-in.yaml", &weft_server_policy());
        self.node.apply("bench-client-out.yaml", WEFT_CLIENT_POLICY);
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            let status: serde_json::Value =
                serde_json::from_str(&self.node.weft_ok(&["-o", "json", "status"]))
                    .context("weft status -o json is not JSON")?;
            let entries = status["policy_map_entries"].as_u64().unwrap_or(0);
            if entries >= MIN_POLICY_ENTRIES {
                break status;
            }
            ensure!(
                Instant::now() < deadline,
                "policy map has {entries} entries after 30 s, want >= {MIN_POLICY_ENTRIES}: \
                 {status}\n--- agent log ---\n{}",
                self.node.log()
            );
            check_interrupted()?;
            std::thread::sleep(Duration::from_millis(200));
        };
        let entries = status["policy_map_entries"].as_u64().unwrap_or(0);
        eprintln!("bench: weft policy map holds {entries} entries");
        let endpoints = self.node.weft_ok(&["endpoint", "list"]);
        eprintln!("{}", endpoints.trim_end());
        Ok(format!(
            "weft    : agent + weft-cni (release build); policy map entries: {entries} \
             (checked >= {MIN_POLICY_ENTRIES} before measuring)\n\
             \x20         server ingress: {DECOY_RULES} rules `fromEndpoints app=bench-client, \
             TCP <port>` for ports {DECOY_PORT_BASE}..={} (never used)\n\
             \x20         + 1 rule `fromEndpoints app=bench-client, TCP {CONTROL_PORT} and \
             {DATA_PORT}` (netperf control + data port)\n\
             \x20         client egress: isolated, 1 rule `toEndpoints app=bench-server` (any port)\n",
            DECOY_PORT_BASE + DECOY_RULES - 1
        ))
    }

    fn apply_iptables(&self) -> anyhow::Result<String> {
        let rules = iptables_rules(self.client.ipv4, self.server.ipv4);
        let mut child = self
            .node
            .netns()
            .command("iptables-restore")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start iptables-restore in the node namespace")?;
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(rules.as_bytes())?;
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "iptables-restore failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let forward = self.ipt_rule_count("FORWARD")?;
        let reply = self.ipt_rule_count(REPLY_CHAIN)?;
        ensure!(
            forward == 1001 && reply == 1001,
            "expected 1001 rules in FORWARD and {REPLY_CHAIN}, found {forward} and {reply}"
        );
        let (c, s) = (self.client.ipv4, self.server.ipv4);
        let last = DECOY_PORT_BASE + DECOY_RULES - 1;
        Ok(format!(
            "iptables: no agent, pods without weft-cni; node namespace filter table \
             (iptables-restore, {}), no conntrack/ESTABLISHED rule:\n\
             \x20         :FORWARD DROP   ({forward} rules: 1 dispatch + 1000)\n\
             \x20         -A FORWARD -s {s}/32 -d {c}/32 -j {REPLY_CHAIN}\n\
             \x20         -A FORWARD -s {c}/32 -d {s}/32 -p tcp -m tcp --dport {DECOY_PORT_BASE} -j ACCEPT\n\
             \x20         ...  ({DECOY_RULES} such rules, dport {DECOY_PORT_BASE}..={last}, never match)\n\
             \x20         -A FORWARD -s {c}/32 -d {s}/32 -p tcp -m multiport --dports {CONTROL_PORT},{DATA_PORT} -j ACCEPT\n\
             \x20         {REPLY_CHAIN} ({reply} rules: 1000 + final DROP), for return traffic:\n\
             \x20         -A {REPLY_CHAIN} -s {s}/32 -d {c}/32 -p tcp -m tcp --sport {DECOY_PORT_BASE} -j ACCEPT\n\
             \x20         ...  ({DECOY_RULES} such rules, sport {DECOY_PORT_BASE}..={last}, never match)\n\
             \x20         -A {REPLY_CHAIN} -s {s}/32 -d {c}/32 -p tcp -m multiport --sports {CONTROL_PORT},{DATA_PORT} -j ACCEPT\n\
             \x20         -A {REPLY_CHAIN} -j DROP\n\
             \x20         so every packet, both ways, walks 1000 rules before its ACCEPT\n",
            iptables_version()
        ))
    }

    fn ipt_rule_count(&self, chain: &str) -> anyhow::Result<usize> {
        let out = self.node.netns().exec("iptables", &["-S", chain]);
        ensure!(
            out.status.success(),
            "iptables -S {chain}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .count())
    }

    fn start_netserver(&self) -> anyhow::Result<()> {
        // -D: stay in the foreground (the pod kills it on drop); -f: no fork per test, so
        // that killing this one process leaves nothing behind.
        let port = CONTROL_PORT.to_string();
        self.server
            .spawn("netserver", &["-D", "-f", "-4", "-p", &port]);
        let deadline = Instant::now() + Duration::from_secs(10);
        let needle = format!(":{CONTROL_PORT} ");
        loop {
            let out = self.server.exec("ss", &["-Htln"]);
            if String::from_utf8_lossy(&out.stdout).contains(&needle) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "netserver in {} does not listen on {CONTROL_PORT}",
                self.server.netns_name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Checks the configuration enforces what it claims: a port of a never-matching rule is
    /// allowed (refused by the server's kernel), a port no rule allows is dropped (times out).
    /// Without a mesh both are refused.
    fn check_enforcement(&self) -> anyhow::Result<()> {
        let decoy = self.connect_outcome(DECOY_PORT_BASE);
        let unlisted = self.connect_outcome(UNLISTED_PORT);
        let want_unlisted = if self.config == Config::NoMesh {
            Outcome::Refused
        } else {
            Outcome::TimedOut
        };
        ensure!(
            decoy == Outcome::Refused && unlisted == want_unlisted,
            "{}: client -> server:{DECOY_PORT_BASE} {decoy:?} (want Refused), \
             :{UNLISTED_PORT} {unlisted:?} (want {want_unlisted:?})",
            self.config
        );
        eprintln!(
            "bench: {} checked: server:{DECOY_PORT_BASE} {decoy:?}, server:{UNLISTED_PORT} {unlisted:?}",
            self.config
        );
        Ok(())
    }

    fn connect_outcome(&self, port: u16) -> Outcome {
        match self
            .client
            .tcp_connect(self.server.ipv4, port, Duration::from_millis(1500))
        {
            Ok(_) => Outcome::Connected,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Outcome::Refused,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => Outcome::TimedOut,
            Err(e) => Outcome::Other(e.to_string()),
        }
    }

    fn netperf(&self, test: Test, pinning: Pinning, seconds: u32) -> anyhow::Result<Sample> {
        let mut last_err = None;
        // One retry: a single failed run should not throw away a long benchmark.
        for _ in 0..2 {
            match self.netperf_once(test, pinning, seconds) {
                Ok(sample) => return Ok(sample),
                Err(e) => {
                    check_interrupted()?;
                    eprintln!(
                        "bench: {} {} failed, retrying: {e:#}",
                        self.config,
                        test.netperf_name()
                    );
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.expect("two attempts"))
    }

    fn netperf_once(&self, test: Test, pinning: Pinning, seconds: u32) -> anyhow::Result<Sample> {
        let server = self.server.ipv4.to_string();
        // In the node's cgroup (as a pod) only where sock_ops should see the client.
        let mut cmd = if self.config == Config::WeftSockmap {
            self.client.command("netperf")
        } else {
            self.client.netns().command("netperf")
        };
        cmd.args(["-H", &server, "-p", &CONTROL_PORT.to_string()])
            .args(["-t", test.netperf_name(), "-l", &seconds.to_string()])
            .args(["-T", pinning.cpus(), "-P", "0", "--"])
            .args(["-P", &format!(",{DATA_PORT}")])
            .args(["-o", "THROUGHPUT,THROUGHPUT_UNITS,P50_LATENCY"]);
        let limit = Duration::from_secs(u64::from(seconds)) + RUN_GRACE;
        let out = run_bounded(&mut cmd, limit)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "netperf {} in {} exited {}: {}{}",
            test.netperf_name(),
            self.client.netns_name,
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let (sample, units) = parse_netperf(&stdout)?;
        let want = if test == Test::Stream {
            "10^6bits/s"
        } else {
            "Trans/s"
        };
        ensure!(
            units == want,
            "netperf {} reported {units}, want {want}",
            test.netperf_name()
        );
        Ok(Sample {
            p50_us: sample.p50_us.filter(|_| test.has_latency()),
            ..sample
        })
    }

    /// What the run left: weft's counters, or the iptables counters of the matching rules.
    fn after_run(&self) -> anyhow::Result<String> {
        match self.config {
            Config::NoMesh => Ok(String::new()),
            Config::Weft | Config::WeftSockmap => {
                let status: serde_json::Value =
                    serde_json::from_str(&self.node.weft_ok(&["-o", "json", "status"]))?;
                Ok(format!(
                    "{} after the run: policy_map_entries {}, ipcache_entries {}, \
                     conntrack_entries {}, socket redirect {}\n",
                    self.config,
                    status["policy_map_entries"],
                    status["ipcache_entries"],
                    status["conntrack_entries"],
                    status["sock_redirect"]
                ))
            }
            Config::Iptables => {
                let mut text =
                    String::from("iptables after the run (packets of the last rules):\n");
                for chain in ["FORWARD", REPLY_CHAIN] {
                    let out = self.node.netns().exec(
                        "iptables",
                        &["-L", chain, "-v", "-x", "-n", "--line-numbers"],
                    );
                    let listing = String::from_utf8_lossy(&out.stdout);
                    let lines: Vec<&str> = listing.lines().collect();
                    // Chain header, column header, first rule, ..., the last two rules.
                    let n = lines.len();
                    for (i, line) in lines.iter().enumerate() {
                        if i < 3 || i + 2 >= n {
                            let _ = writeln!(text, "  {line}");
                        } else if i == 3 {
                            let _ = writeln!(text, "  ...");
                        }
                    }
                }
                Ok(text)
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Connected,
    Refused,
    TimedOut,
    Other(String),
}

const REPLY_CHAIN: &str = "WEFT-BENCH-REPLY";

/// The server's ingress policy: 999 rules that never match, then the one netperf uses.
fn weft_server_policy() -> String {
    let mut yaml = format!(
        "apiVersion: weft.io/v1alpha1\nkind: WeftNetworkPolicy\nmetadata:\n  \
         name: bench-server-in\n  namespace: {NAMESPACE}\nspec:\n  endpointSelector:\n    \
         matchLabels: {{app: bench-server}}\n  ingress:\n"
    );
    let rule = |ports: &str| {
        format!(
            "  - fromEndpoints:\n    - matchLabels: {{app: bench-client}}\n    toPorts:\n    \
             - ports: [{ports}]\n"
        )
    };
    for i in 0..DECOY_RULES {
        yaml.push_str(&rule(&format!(
            "{{port: \"{}\", protocol: TCP}}",
            DECOY_PORT_BASE + i
        )));
    }
    yaml.push_str(&rule(&format!(
        "{{port: \"{CONTROL_PORT}\", protocol: TCP}}, {{port: \"{DATA_PORT}\", protocol: TCP}}"
    )));
    yaml
}

const WEFT_CLIENT_POLICY: &str = "apiVersion: weft.io/v1alpha1
kind: WeftNetworkPolicy
metadata:
  name: bench-client-out
  namespace: bench
spec:
  endpointSelector:
    matchLabels: {app: bench-client}
  egress:
  - toEndpoints:
    - matchLabels: {app: bench-server}
";

/// `iptables-restore` input: FORWARD (policy DROP) sends return traffic to its own chain and
/// holds the 1,000 client -> server rules itself; each list has 999 never-matching ACCEPTs and
/// the matching one last, so every packet walks 1,000 rules.
fn iptables_rules(client: IpAddr, server: IpAddr) -> String {
    let (c, s) = (client, server);
    let mut r = format!(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :{REPLY_CHAIN} - [0:0]\n-A FORWARD -s {s}/32 -d {c}/32 -j {REPLY_CHAIN}\n"
    );
    for i in 0..DECOY_RULES {
        let port = DECOY_PORT_BASE + i;
        let _ = writeln!(
            r,
            "-A FORWARD -s {c}/32 -d {s}/32 -p tcp -m tcp --dport {port} -j ACCEPT"
        );
    }
    let _ = writeln!(
        r,
        "-A FORWARD -s {c}/32 -d {s}/32 -p tcp -m multiport --dports {CONTROL_PORT},{DATA_PORT} -j ACCEPT"
    );
    for i in 0..DECOY_RULES {
        let port = DECOY_PORT_BASE + i;
        let _ = writeln!(
            r,
            "-A {REPLY_CHAIN} -s {s}/32 -d {c}/32 -p tcp -m tcp --sport {port} -j ACCEPT"
        );
    }
    let _ = writeln!(
        r,
        "-A {REPLY_CHAIN} -s {s}/32 -d {c}/32 -p tcp -m multiport --sports {CONTROL_PORT},{DATA_PORT} -j ACCEPT"
    );
    let _ = writeln!(r, "-A {REPLY_CHAIN} -j DROP\nCOMMIT");
    r
}

/// Parses netperf's `-P 0 -- -o THROUGHPUT,THROUGHPUT_UNITS,P50_LATENCY` output: one line
/// `70282.66,Trans/s,14`. Returns the sample and the units.
fn parse_netperf(stdout: &str) -> anyhow::Result<(Sample, String)> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .ok_or_else(|| anyhow!("netperf printed nothing"))?;
    let fields: Vec<&str> = line.split(',').map(str::trim).collect();
    let [throughput, units, rest @ ..] = fields.as_slice() else {
        bail!("netperf output {line:?} is not `throughput,units[,p50]`");
    };
    let throughput: f64 = throughput
        .parse()
        .with_context(|| format!("netperf throughput {throughput:?} in {line:?}"))?;
    ensure!(
        throughput.is_finite() && throughput > 0.0,
        "netperf throughput {throughput} in {line:?}"
    );
    let p50_us = rest
        .first()
        .and_then(|p| p.parse::<f64>().ok())
        .filter(|p| *p > 0.0);
    Ok((Sample { throughput, p50_us }, (*units).to_string()))
}

/// Median, min, max of `values` (not empty).
fn stats(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    };
    (median, v[0], v[n - 1])
}

fn median(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| stats(values).0)
}

fn header(
    seconds: u32,
    repeats: u32,
    elapsed: Duration,
    descriptions: &[String],
) -> anyhow::Result<String> {
    let kernel = cmd::output(Command::new("uname").arg("-r"))?;
    let netperf = Command::new("netperf")
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let mut h = String::new();
    let _ = writeln!(
        h,
        "\n== weft bench: netperf pod -> pod (IPv4) through one node namespace ==\n\
         kernel {}, {cpus} CPUs, {netperf}; {repeats} repeat(s) x {seconds} s per run, \
         configurations interleaved round-robin; {:.0} s in all\n\
         figures: median [min - max] over the repeats, spread = (max - min) / median; \
         ratios are of medians",
        kernel.trim(),
        elapsed.as_secs_f64()
    );
    let _ = writeln!(
        h,
        "command: netperf -H <server> -p {CONTROL_PORT} -t <TEST> -l {seconds} -T <pinning> \
         -P 0 -- -P ,{DATA_PORT} -o THROUGHPUT,THROUGHPUT_UNITS,P50_LATENCY"
    );
    h.push_str("configurations (one node namespace each, client and server pods via ptp):\n");
    for d in descriptions {
        let _ = write!(h, "  {d}");
    }
    Ok(h)
}

/// The result table with medians, spreads, ratios and the targets.
fn report(
    cells: &[(Test, Pinning)],
    results: &BTreeMap<(Test, Pinning, Config), Vec<Sample>>,
) -> String {
    let mut out = String::new();
    let mut verdicts = Vec::new();
    for (test, pinning) in cells {
        let get = |c: Config| {
            results
                .get(&(*test, *pinning, c))
                .cloned()
                .unwrap_or_default()
        };
        let units = if *test == Test::Stream {
            "Mbit/s"
        } else {
            "trans/s"
        };
        let _ = writeln!(
            out,
            "\n{} ({units}), {}",
            test.netperf_name(),
            pinning.describe()
        );
        let _ = writeln!(
            out,
            "  {:<9} {:>10}  {:>23}  {:>6}  {:>7}  {:>10}",
            "config", "median", "[min - max]", "spread", "p50 µs", "/ no-mesh"
        );
        let base = median(&throughputs(&get(Config::NoMesh)));
        let mut medians = BTreeMap::new();
        for config in Config::ALL {
            let samples = get(config);
            let values = throughputs(&samples);
            if values.is_empty() {
                continue;
            }
            let (med, min, max) = stats(&values);
            medians.insert(config, med);
            let p50: Vec<f64> = samples.iter().filter_map(|s| s.p50_us).collect();
            let p50 = median(&p50).map_or_else(|| "-".to_string(), |p| format!("{p:.0}"));
            let ratio = base.map_or_else(|| "-".to_string(), |b| format!("{:.3}", med / b));
            let _ = writeln!(
                out,
                "  {:<9} {med:>10.1}  {:>23}  {:>5.1}%  {p50:>7}  {ratio:>10}",
                config.label(),
                format!("[{min:.1} - {max:.1}]"),
                (max - min) / med * 100.0
            );
        }
        if let (Some(base), Some(weft)) = (base, medians.get(&Config::Weft)) {
            let ratio = weft / base;
            let ok = ratio >= test.target();
            let line = format!(
                "weft/no-mesh {ratio:.4} vs target >= {:.2}: {}",
                test.target(),
                if ok {
                    "HOLDS".to_string()
                } else {
                    format!("MISSED by {:.2} points", (test.target() - ratio) * 100.0)
                }
            );
            let _ = writeln!(out, "  {line}");
            verdicts.push((
                format!("{} {}", test.netperf_name(), pinning.describe()),
                line,
                ok,
            ));
            if let Some(ipt) = medians.get(&Config::Iptables) {
                let ok = weft > ipt;
                let line = format!(
                    "weft/iptables {:.4}: weft ahead of iptables {}",
                    weft / ipt,
                    if ok { "HOLDS" } else { "MISSED" }
                );
                let _ = writeln!(out, "  {line}");
                verdicts.push((
                    format!("{} {}", test.netperf_name(), pinning.describe()),
                    line,
                    ok,
                ));
            }
        }
    }
    for (test, pinning) in cells {
        let med = |c: Config| {
            median(&throughputs(
                &results
                    .get(&(*test, *pinning, c))
                    .cloned()
                    .unwrap_or_default(),
            ))
        };
        let (Some(base), Some(weft), Some(sock)) = (
            med(Config::NoMesh),
            med(Config::Weft),
            med(Config::WeftSockmap),
        ) else {
            continue;
        };
        // Issue 12's targets for socket redirection.
        let targets: &[(&str, f64, f64)] = match test {
            Test::Rr => &[("no-mesh", base, 1.6), ("weft", weft, 1.4)],
            Test::Stream => &[("no-mesh", base, 2.0)],
            Test::Crr => &[("weft", weft, 0.95)],
            Test::PolicyScale => &[],
        };
        for (name, against, target) in targets {
            let ratio = sock / against;
            let ok = ratio >= *target;
            let line = format!(
                "weft+sock/{name} {ratio:.4} vs target >= {target:.2}: {}",
                if ok { "HOLDS" } else { "MISSED" }
            );
            let _ = writeln!(
                out,
                "  {} {}: {line}",
                test.netperf_name(),
                pinning.describe()
            );
            verdicts.push((
                format!("{} {}", test.netperf_name(), pinning.describe()),
                line,
                ok,
            ));
        }
    }
    let held = verdicts.iter().filter(|v| v.2).count();
    let _ = writeln!(out, "\ntargets: {held}/{} hold", verdicts.len());
    for (cell, line, ok) in &verdicts {
        if !ok {
            let _ = writeln!(out, "  MISSED  {cell}: {line}");
        }
    }
    out
}

fn throughputs(samples: &[Sample]) -> Vec<f64> {
    samples.iter().map(|s| s.throughput).collect()
}

/// Runs `cmd` with piped output, killing it when it outlives `limit` or on Ctrl-C.
fn run_bounded(cmd: &mut Command, limit: Duration) -> anyhow::Result<Output> {
    let mut child = weft_tests::process::spawn_in_group(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .with_context(|| format!("cannot start {cmd:?}"))?;
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait()?.is_some() {
            // Output is a few lines: it fit in the pipes while the process ran.
            return Ok(child.wait_with_output()?);
        }
        let interrupted = INTERRUPTED.load(Ordering::SeqCst);
        if interrupted || Instant::now() >= deadline {
            weft_tests::process::kill_tree(child.id());
            let _ = child.wait();
            if interrupted {
                bail!("interrupted");
            }
            bail!("{cmd:?} did not finish within {limit:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Turn SIGINT/SIGTERM into a flag the run checks, so that it unwinds and the harness removes
/// the namespaces, agents and netservers instead of the process dying with them in place.
fn catch_signals() -> anyhow::Result<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use tokio::signal::unix::{SignalKind, signal};
        let result = (|| -> io::Result<_> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let _guard = rt.enter();
            let int = signal(SignalKind::interrupt())?;
            let term = signal(SignalKind::terminate())?;
            Ok((rt, int, term))
        })();
        match result {
            Ok((rt, mut int, mut term)) => {
                let _ = ready_tx.send(Ok(()));
                rt.block_on(async {
                    loop {
                        tokio::select! {
                            _ = int.recv() => {},
                            _ = term.recv() => {},
                        }
                        eprintln!("bench: interrupted; cleaning up");
                        INTERRUPTED.store(true, Ordering::SeqCst);
                    }
                });
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        }
    });
    ready_rx
        .recv()
        .context("signal thread ended")?
        .context("cannot install signal handlers")
}

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    cmd::output(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0")
}

fn release_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| cmd::workspace_root().join("target"), PathBuf::from)
        .join("release")
}

fn iptables_version() -> String {
    Command::new("iptables").arg("-V").output().map_or_else(
        |_| "iptables".into(),
        |o| String::from_utf8_lossy(&o.stdout).trim().to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_terse_netperf_output() {
        let (s, units) = parse_netperf("70282.66,Trans/s,14\n").expect("parses");
        assert_eq!(units, "Trans/s");
        assert!((s.throughput - 70282.66).abs() < 1e-9);
        assert_eq!(s.p50_us, Some(14.0));
        let (s, units) = parse_netperf("\n13561.72,10^6bits/s,\n\n").expect("parses");
        assert_eq!(units, "10^6bits/s");
        assert_eq!(s.p50_us, None);
        for bad in [
            "",
            "Trans/s",
            "abc,Trans/s,1",
            "0.00,Trans/s,1",
            "nan,Trans/s",
        ] {
            assert!(parse_netperf(bad).is_err(), "{bad:?} must not parse");
        }
    }

    #[test]
    fn median_min_max() {
        assert_eq!(stats(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(stats(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
        assert_eq!(stats(&[5.0]), (5.0, 5.0, 5.0));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn rule_sets_have_a_thousand_rules_per_direction() {
        let policy = weft_server_policy();
        assert_eq!(policy.matches("- fromEndpoints:").count(), 1000);
        assert!(policy.contains(&format!("port: \"{DATA_PORT}\"")));
        let rules = iptables_rules([100, 64, 1, 2].into(), [100, 64, 1, 3].into());
        let forward = rules
            .lines()
            .filter(|l| l.starts_with("-A FORWARD "))
            .count();
        let reply = rules
            .lines()
            .filter(|l| l.starts_with(&format!("-A {REPLY_CHAIN} ")))
            .count();
        assert_eq!((forward, reply), (1001, 1001));
        assert!(rules.ends_with("COMMIT\n"));
    }

    #[test]
    fn report_flags_missed_targets() {
        let mut results = BTreeMap::new();
        let s = |t| Sample {
            throughput: t,
            p50_us: Some(10.0),
        };
        let cell = (Test::Rr, Pinning::Same);
        results.insert(
            (cell.0, cell.1, Config::NoMesh),
            vec![s(100.0), s(102.0), s(98.0)],
        );
        results.insert(
            (cell.0, cell.1, Config::Weft),
            vec![s(90.0), s(91.0), s(92.0)],
        );
        results.insert((cell.0, cell.1, Config::Iptables), vec![s(70.0)]);
        let text = report(&[cell], &results);
        assert!(text.contains("weft/no-mesh 0.9100"), "{text}");
        assert!(text.contains("MISSED by 4.00 points"), "{text}");
        assert!(text.contains("targets: 1/2 hold"), "{text}");
    }
}
