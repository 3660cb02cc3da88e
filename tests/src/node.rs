//! A node: a network namespace with one `weft-agent` inside it.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::netns::{NetNs, delete_netns};
use crate::pod::{self, Pod};
use crate::prefix::TestPrefix;

/// Where the agents pin their maps, programs and links; each node has its own directory below.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf/weft";
/// How long an agent may take to answer `weft status` after it was started (generous: under
/// emulation in `cargo xtask vm-test` a start takes seconds, and it is only a bound).
const AGENT_READY_TIMEOUT: Duration = Duration::from_mins(1);
/// How long an agent may take to exit after SIGTERM before it gets SIGKILL.
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Set by [`set_bin_dir`]; wins over everything else.
static BIN_DIR_OVERRIDE: OnceLock<PathBuf> = OnceLock::new();

/// Make [`bin_dir`] return `dir` for the rest of this process, for tools that are not test
/// binaries (`cargo xtask bench` runs the release binaries). Only the first call counts; returns
/// the directory in force.
pub fn set_bin_dir(dir: PathBuf) -> PathBuf {
    BIN_DIR_OVERRIDE.get_or_init(|| dir).clone()
}

/// The directory holding `weft-agent`, `weft` and `weft-cni`: the one given to [`set_bin_dir`],
/// else `$WEFT_BIN_DIR`, else the target dir of this test binary
/// (`target/debug/deps/<test>` -> `target/debug`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = BIN_DIR_OVERRIDE.get() {
        return dir.clone();
    }
    if let Some(dir) = std::env::var_os("WEFT_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in <target>/<profile>/deps")
        .to_path_buf()
}

/// What a node's pods need to know about it (shared with each [`Pod`]).
#[derive(Debug)]
pub(crate) struct NodeInfo {
    /// `<prefix>-<name>`: the node name given to the agent and its network namespace's name.
    pub name: String,
    pub prefix: TestPrefix,
    /// Index of this node's pod subnets: `100.64.<i>.0/24`, `fd00:64:0:<i>::/64`.
    pub subnet: u8,
    pub dir: PathBuf,
    pub source_dir: PathBuf,
    pub ipam_dir: PathBuf,
    pub socket: PathBuf,
    /// The node's cgroup v2 (as kubelet's `kubepods`): every process the harness starts in
    /// one of its pods runs in it, and its agent attaches `sock_ops` there. `None` where the
    /// machine has no cgroup v2.
    pub cgroup: Option<PathBuf>,
    pub bin_dir: PathBuf,
    /// Network namespaces of this node's live pods, removed with the node if still there.
    pub pods: Mutex<BTreeSet<String>>,
}

/// A network namespace with (optionally) one `weft-agent` inside, and its files in a temp dir.
///
/// Dropping it stops the agent, deletes the namespace (and any pod namespaces still around),
/// removes the node's bpffs directory, and removes the temp dir unless `WEFT_KEEP=1`. When the
/// test is panicking, the agent's log is printed first.
pub struct Node {
    info: Arc<NodeInfo>,
    netns: Option<NetNs>,
    state_dir: PathBuf,
    log: PathBuf,
    bpffs_dir: PathBuf,
    agent: Option<Child>,
    /// Extra agent flags (`start_with_args`).
    extra_args: Vec<String>,
    /// Leave everything in place on drop (the demo).
    keep: bool,
}

/// How to build a [`Node`].
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// The source directory, when shared with other nodes (a cluster); else the node's own.
    pub source_dir: Option<PathBuf>,
    /// Where the node's directory goes (default: `weft-<name>` in the temp dir).
    pub base_dir: Option<PathBuf>,
    /// Extra agent flags.
    pub agent_args: Vec<String>,
}

impl Node {
    /// Create node `<prefix>-<name>` and start its agent; returns once `weft status` answers.
    pub fn start(prefix: &TestPrefix, name: &str) -> Self {
        Self::start_with_args(prefix, name, &[])
    }

    /// [`Node::start`] with extra agent flags (e.g. `--policy-entries-per-endpoint 500`).
    pub fn start_with_args(prefix: &TestPrefix, name: &str, extra: &[&str]) -> Self {
        let mut node = Self::without_agent(prefix, name);
        node.extra_args = extra.iter().map(ToString::to_string).collect();
        node.start_agent();
        node
    }

    /// More flags for this node's agent, from its next start on.
    pub fn add_agent_args(&mut self, args: impl IntoIterator<Item = String>) {
        self.extra_args.extend(args);
    }

    /// Create the node's namespace and directories but no agent (harness smoke tests, baselines).
    pub fn without_agent(prefix: &TestPrefix, name: &str) -> Self {
        Self::create(prefix, name, &NodeOptions::default())
    }

    /// Create the node as `options` say, without starting its agent.
    pub fn create(prefix: &TestPrefix, name: &str, options: &NodeOptions) -> Self {
        let full = prefix.name(name);
        // In the temp dir, `weft-<name>` (what a sweep looks for); in a given base dir (a
        // cluster's, the demo's), just the node's name.
        let dir = match &options.base_dir {
            Some(base) => base.join(&full),
            None => std::env::temp_dir().join(format!("weft-{full}")),
        };
        let _ = fs::remove_dir_all(&dir);
        let info = Arc::new(NodeInfo {
            name: full.clone(),
            prefix: prefix.clone(),
            subnet: prefix.next_subnet(),
            source_dir: options
                .source_dir
                .clone()
                .unwrap_or_else(|| dir.join("source")),
            ipam_dir: dir.join("ipam"),
            socket: dir.join("agent.sock"),
            cgroup: crate::cgroup::create(&full),
            bin_dir: bin_dir(),
            pods: Mutex::new(BTreeSet::new()),
            dir: dir.clone(),
        });
        let mut node = Self {
            netns: None,
            state_dir: dir.join("state"),
            log: dir.join("agent.log"),
            bpffs_dir: PathBuf::from(BPFFS_ROOT).join(&full),
            agent: None,
            extra_args: options.agent_args.clone(),
            keep: false,
            info,
        };
        for d in [&node.info.source_dir, &node.info.ipam_dir, &node.state_dir] {
            fs::create_dir_all(d).unwrap_or_else(|e| panic!("cannot create {}: {e}", d.display()));
        }
        // `node` owns what is created from here on: a panic below cleans up through Drop.
        let ns = NetNs::create(&full);
        ns.sysctl("net.ipv4.ip_forward", "1");
        ns.sysctl("net.ipv6.conf.all.forwarding", "1");
        // Host-side veths are created here by ptp; without DAD their v6 addresses are usable
        // at once (a tentative address makes the first pings fail).
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0");
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0");
        node.netns = Some(ns);
        node
    }

    /// The UAPI socket of this node's WireGuard device (`wg show weft-<name>`).
    pub fn wg_socket(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/wireguard/{}.sock", self.wg_interface()))
    }

    /// The interface name `wg` knows this node's WireGuard device by.
    pub fn wg_interface(&self) -> String {
        format!("weft-{}", self.info.name)
    }

    /// `<prefix>-<name>`: the agent's node name and the network namespace's name.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    pub fn netns(&self) -> &NetNs {
        self.netns.as_ref().expect("node namespace exists")
    }

    pub fn prefix(&self) -> &TestPrefix {
        &self.info.prefix
    }

    pub fn socket(&self) -> &Path {
        &self.info.socket
    }

    pub fn source_dir(&self) -> &Path {
        &self.info.source_dir
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The node's cgroup v2 (see [`NodeInfo::cgroup`]).
    pub fn cgroup(&self) -> Option<&Path> {
        self.info.cgroup.as_deref()
    }

    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs_dir
    }

    /// The index `i` of this node's pod subnets (and of other per-node address ranges).
    pub fn subnet_index(&self) -> u8 {
        self.info.subnet
    }

    /// This node's IPv4 pod subnet, `100.64.<i>.0/24`.
    pub fn pod_subnet_v4(&self) -> String {
        pod::subnet_v4(self.info.subnet)
    }

    /// This node's IPv6 pod subnet, `fd00:64:0:<i>::/64`.
    pub fn pod_subnet_v6(&self) -> String {
        pod::subnet_v6(self.info.subnet)
    }

    /// The agent's log so far (stdout and stderr, all runs).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    // === source objects ===

    /// Write `yaml` as `file_name` into the node's source dir, atomically (temp file + rename;
    /// the temp name ends in `.tmp`, so an agent reading only `*.yaml` never sees half a file).
    pub fn apply(&self, file_name: &str, yaml: &str) {
        apply_file(&self.info.source_dir, file_name, yaml);
    }

    /// Remove `file_name` from the source dir (no error when it is not there).
    pub fn remove(&self, file_name: &str) {
        let _ = fs::remove_file(self.info.source_dir.join(file_name));
    }

    // === pods ===

    /// Create pod `name` in `namespace` with `labels`: its `Endpoint` object, its network
    /// namespace, then the CNI chain `loopback`, `ptp` + `host-local`, `weft-cni`.
    pub fn add_pod(&self, name: &str, namespace: &str, labels: &[(&str, &str)]) -> Pod {
        assert!(
            self.agent.is_some() || self.info.socket.exists(),
            "add_pod needs a running agent (or something listening on {}); \
             use add_pod_without_weft on a node without one",
            self.info.socket.display()
        );
        Pod::create(&self.info, name, namespace, labels, true)
    }

    /// Like [`add_pod`](Self::add_pod) but without `weft-cni` (and no agent needed).
    pub fn add_pod_without_weft(
        &self,
        name: &str,
        namespace: &str,
        labels: &[(&str, &str)],
    ) -> Pod {
        Pod::create(&self.info, name, namespace, labels, false)
    }

    /// Run `weft-cni` in this node's namespace as a runtime would, with `call` (whose
    /// `plugin` is ignored) and `prev` as prevResult: for tests of what the agent accepts.
    pub fn weft_cni(
        &self,
        call: &pod::CniCall<'_>,
        prev: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, String> {
        let call = pod::CniCall {
            plugin: "weft-cni",
            ..*call
        };
        pod::run_cni(&self.info, &call, &pod::weft_cni_conf(&self.info, prev))
    }

    // === CLI ===

    /// Run `weft --socket <socket> <args>` and return its output.
    pub fn weft(&self, args: &[&str]) -> Output {
        Command::new(self.info.bin_dir.join("weft"))
            .arg("--socket")
            .arg(&self.info.socket)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run weft from {}: {e}", self.info.bin_dir.display()))
    }

    /// Run `weft <args>`, panicking with stderr and the agent log unless it succeeds; stdout.
    pub fn weft_ok(&self, args: &[&str]) -> String {
        let out = self.weft(args);
        assert!(
            out.status.success(),
            "weft {args:?} failed ({}): {}\n--- agent log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    // === agent lifecycle ===

    /// The agent's command line (without the binary).
    pub fn agent_args(&self) -> Vec<String> {
        let mut args: Vec<String> = ["--node", &self.info.name, "--netns"]
            .iter()
            .map(ToString::to_string)
            .collect();
        args.push(self.netns().path());
        for (flag, path) in [
            ("--source-dir", &self.info.source_dir),
            ("--state-dir", &self.state_dir),
            ("--socket", &self.info.socket),
            ("--bpffs-dir", &self.bpffs_dir),
        ] {
            args.push(flag.to_string());
            args.push(path.display().to_string());
        }
        if let Some(cgroup) = &self.info.cgroup {
            args.push("--cgroup".to_owned());
            args.push(cgroup.display().to_string());
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// Start the agent (again) with the same arguments and wait until `weft status` answers.
    pub fn start_agent(&mut self) {
        self.spawn_agent();
        self.wait_ready();
    }

    /// Start the agent where it must refuse to run: panics unless it exits with a failure
    /// status within [`AGENT_READY_TIMEOUT`] without ever answering `weft status`; returns its
    /// log (stdout and stderr of this run only).
    pub fn start_agent_expecting_failure(&mut self) -> String {
        let earlier = self.log().len();
        self.spawn_agent();
        let deadline = Instant::now() + AGENT_READY_TIMEOUT;
        let status = loop {
            let child = self.agent.as_mut().expect("agent started");
            if let Some(status) = child.try_wait().expect("poll agent") {
                self.agent = None;
                break status;
            }
            if Instant::now() >= deadline || self.weft(&["status"]).status.success() {
                self.stop_agent();
                panic!(
                    "weft-agent of {} was expected to refuse to start but is running\n\
                     --- agent log ---\n{}",
                    self.name(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let log = self.log().get(earlier..).unwrap_or_default().to_owned();
        assert!(
            !status.success(),
            "weft-agent of {} exited successfully ({status}) instead of refusing\n\
             --- agent log ---\n{log}",
            self.name()
        );
        log
    }

    fn spawn_agent(&mut self) {
        assert!(
            self.agent.is_none(),
            "agent of {} is already running",
            self.name()
        );
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log.display()));
        let log_err = log.try_clone().expect("clone log file handle");
        let binary = self.info.bin_dir.join("weft-agent");
        let child = crate::process::spawn_in_group(
            Command::new(&binary)
                .args(self.agent_args())
                // The log is a file: no colour codes in it.
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log_err),
        )
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {} ({e}); build it first: cargo xtask build",
                binary.display()
            )
        });
        self.agent = Some(child);
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + AGENT_READY_TIMEOUT;
        loop {
            let child = self.agent.as_mut().expect("agent started");
            if let Some(status) = child.try_wait().expect("poll agent") {
                self.agent = None;
                panic!(
                    "weft-agent of {} exited during start-up ({status})\n--- agent log ---\n{}",
                    self.name(),
                    self.log()
                );
            }
            if self.weft(&["status"]).status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "weft-agent of {} did not answer `weft status` within {AGENT_READY_TIMEOUT:?}\n\
                 --- agent log ---\n{}",
                self.name(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stop the agent with SIGTERM and wait for it (SIGKILL after a timeout). Pinned state stays.
    pub fn stop_agent(&mut self) {
        if let Some(child) = self.agent.take() {
            stop_child(child, AGENT_STOP_TIMEOUT);
        }
    }

    /// Kill the agent with SIGKILL (no chance to clean up), and reap it. Pinned state stays.
    pub fn kill_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            crate::process::kill_tree(child.id());
            let _ = child.wait();
        }
    }

    /// Stop the agent, then start it again with the same arguments (adoption tests).
    pub fn restart_agent(&mut self) {
        self.stop_agent();
        self.start_agent();
    }

    /// Run a second agent for this node (same node name, pin and source directories) with
    /// its own state directory and socket, and wait for it to exit (bounded); its output.
    /// One node, one agent: it must refuse.
    pub fn run_second_agent(&self) -> Output {
        let state = self.info.dir.join("second-state");
        let socket = self.info.dir.join("second.sock");
        let mut args = self.agent_args();
        for (flag, value) in [("--state-dir", &state), ("--socket", &socket)] {
            let at = args.iter().position(|a| a == flag).expect("flag present");
            args[at + 1] = value.display().to_string();
        }
        let mut child = Command::new(self.info.bin_dir.join("weft-agent"))
            .args(&args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start a second agent");
        let deadline = Instant::now() + AGENT_READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return child.wait_with_output().expect("second agent output");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let out = child.wait_with_output().expect("second agent output");
        panic!(
            "a second agent for {} kept running instead of refusing: {}{}",
            self.name(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The agent's process id, while it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// The agent's resident memory in KiB (`VmRSS`), while it runs.
    pub fn agent_rss_kib(&self) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.agent_pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// The agent's peak resident memory in KiB (`VmHWM`), while it runs.
    pub fn agent_peak_rss_kib(&self) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.agent_pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Whether the agent process is running.
    pub fn agent_running(&mut self) -> bool {
        self.agent
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
}

impl Node {
    /// Leave the node, its agent and its pods running when this value goes (the demo runs
    /// on after `cargo xtask up` exits; `cargo xtask down` removes it by its prefix).
    pub fn keep(mut self) {
        self.keep = true;
        if let Some(child) = self.agent.take() {
            // The agent outlives us; its pid is in the node's directory for `down`.
            let _ = fs::write(self.info.dir.join("agent.pid"), child.id().to_string());
            std::mem::forget(child);
        }
        // Fields drop after `Drop::drop`: the namespace must not go with them.
        if let Some(ns) = self.netns.take() {
            std::mem::forget(ns);
        }
    }

    /// The node's directory (state, logs, IPAM, socket).
    pub fn dir(&self) -> &Path {
        &self.info.dir
    }

    /// Path of the agent's log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let panicking = std::thread::panicking();
        if let Some(child) = self.agent.take() {
            stop_child(child, Duration::from_secs(5));
        }
        if panicking && self.log.exists() {
            eprintln!(
                "--- agent log of {} ({}) ---\n{}--- end of agent log ---",
                self.info.name,
                self.log.display(),
                self.log()
            );
        }
        let pods = std::mem::take(
            &mut *self
                .info
                .pods
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for pod_ns in pods {
            delete_netns(&pod_ns);
        }
        drop(self.netns.take());
        if let Some(cgroup) = &self.info.cgroup {
            crate::cgroup::remove(cgroup);
        }
        // A SIGKILLed agent's WireGuard device leaves its UAPI socket file behind.
        let _ = fs::remove_file(self.wg_socket());
        if self.bpffs_dir.exists()
            && let Err(e) = fs::remove_dir_all(&self.bpffs_dir)
        {
            eprintln!("cannot remove {}: {e}", self.bpffs_dir.display());
        }
        // The agents' shared parent directory goes too once no node uses it (fails, as it
        // should, while another test's node is still there).
        if let Some(parent) = self.bpffs_dir.parent() {
            let _ = fs::remove_dir(parent);
        }
        if std::env::var_os("WEFT_KEEP").is_some_and(|v| v == "1") {
            eprintln!("WEFT_KEEP=1: keeping {}", self.info.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.info.dir);
        }
    }
}

use crate::process::stop_child;

pub(crate) fn apply_file(dir: &Path, file_name: &str, text: &str) {
    assert!(
        !file_name.contains('/'),
        "object file name {file_name:?} must be a plain file name"
    );
    let tmp = dir.join(format!(".{file_name}.tmp"));
    let target = dir.join(file_name);
    {
        use std::io::Write;
        let mut f =
            File::create(&tmp).unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
        f.write_all(text.as_bytes()).expect("write object file");
        f.sync_all().expect("sync object file");
    }
    fs::rename(&tmp, &target)
        .unwrap_or_else(|e| panic!("cannot rename to {}: {e}", target.display()));
}
