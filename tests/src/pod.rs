//! A pod: a network namespace attached through the real CNI plugins, as a runtime does it.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde_json::{Value, json};

use crate::netns::NetNs;
use crate::node::{NodeInfo, apply_file};

/// Network name of the chain `ptp` + `weft-cni` (what a conflist's `name` would be).
const NETWORK: &str = "weft";
const POD_IFNAME: &str = "eth0";

pub(crate) fn subnet_v4(index: u8) -> String {
    format!("100.64.{index}.0/24")
}

pub(crate) fn subnet_v6(index: u8) -> String {
    format!("fd00:64:0:{index:x}::/64")
}

/// A pod on a [`Node`](crate::Node). Dropping it stops its servers and processes, runs CNI DEL
/// in reverse order (`weft-cni`, `ptp`, `loopback`), removes its `Endpoint` object and deletes
/// its namespace.
#[allow(
    clippy::struct_excessive_bools,
    reason = "each flag records one step of set-up that drop must undo"
)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    /// `<prefix>-<pod name>`.
    pub netns_name: String,
    pub ipv4: IpAddr,
    pub ipv6: IpAddr,
    /// The host-side interface (in the node's namespace) ptp created.
    pub host_ifname: String,
    pub(crate) node: Arc<NodeInfo>,
    netns: Option<NetNs>,
    container_id: String,
    endpoint_file: Option<String>,
    with_weft: bool,
    loopback_added: bool,
    ptp_result: Option<Value>,
    weft_added: bool,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) threads: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) children: Mutex<Vec<Child>>,
    keep: bool,
}

impl Pod {
    pub(crate) fn create(
        node: &Arc<NodeInfo>,
        name: &str,
        namespace: &str,
        labels: &[(&str, &str)],
        with_weft: bool,
    ) -> Self {
        let netns_name = node.prefix.name(name);
        let mut pod = Self {
            name: name.to_string(),
            namespace: namespace.to_string(),
            netns_name: netns_name.clone(),
            ipv4: IpAddr::from([0, 0, 0, 0]),
            ipv6: IpAddr::from([0u16; 8]),
            host_ifname: String::new(),
            node: node.clone(),
            netns: None,
            container_id: format!("{netns_name}-{}", node.name),
            endpoint_file: None,
            with_weft,
            loopback_added: false,
            ptp_result: None,
            weft_added: false,
            stop: Arc::new(AtomicBool::new(false)),
            threads: Mutex::new(Vec::new()),
            children: Mutex::new(Vec::new()),
            keep: false,
        };
        // From here on a panic unwinds through `Pod::drop`, which undoes what was done.
        if with_weft {
            let file = format!("endpoint-{namespace}-{name}.yaml");
            apply_file(
                &node.source_dir,
                &file,
                &endpoint_yaml(name, namespace, labels, &node.name, &[], &[]),
            );
            pod.endpoint_file = Some(file);
        }
        let ns = NetNs::create(&netns_name);
        node.pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(netns_name.clone());
        // No DAD: the pod's v6 address is usable as soon as ptp returns.
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0");
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0");
        pod.netns = Some(ns);

        pod.cni("loopback", "ADD", "lo", &loopback_conf())
            .unwrap_or_else(|e| panic!("loopback ADD for pod {name}: {e}"));
        pod.loopback_added = true;

        let result = pod
            .cni("ptp", "ADD", POD_IFNAME, &pod.ptp_conf())
            .unwrap_or_else(|e| panic!("ptp ADD for pod {name}: {e}"));
        pod.ptp_result = Some(result.clone());
        pod.read_result(&result);
        if let Some(file) = &pod.endpoint_file {
            // With its addresses, so that the cluster's other nodes know the pod.
            apply_file(
                &node.source_dir,
                file,
                &endpoint_yaml(name, namespace, labels, &node.name, &pod.ips(), &[]),
            );
        }

        if with_weft {
            let conf = pod.weft_conf(Some(&result));
            pod.weft_added = true; // a failed ADD is still DEL'd, as a runtime does
            pod.cni("weft-cni", "ADD", POD_IFNAME, &conf)
                .unwrap_or_else(|e| panic!("weft-cni ADD for pod {name}: {e}"));
        }
        pod
    }

    fn read_result(&mut self, result: &Value) {
        for ip in result["ips"].as_array().into_iter().flatten() {
            let address = ip["address"].as_str().unwrap_or_default();
            let addr: IpAddr = address
                .split('/')
                .next()
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("ptp result has a bad address {address:?}: {result}"));
            if addr.is_ipv4() {
                self.ipv4 = addr;
            } else {
                self.ipv6 = addr;
            }
        }
        assert!(
            !self.ipv4.is_unspecified() && !self.ipv6.is_unspecified(),
            "ptp gave pod {} no IPv4 or no IPv6 address: {result}",
            self.name
        );
        self.host_ifname = result["interfaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|i| i.get("sandbox").is_none_or(|s| s.as_str() == Some("")))
            .and_then(|i| i["name"].as_str())
            .unwrap_or_default()
            .to_string();
    }

    /// The pod's addresses, IPv4 first.
    pub fn ips(&self) -> [IpAddr; 2] {
        [self.ipv4, self.ipv6]
    }

    pub fn netns(&self) -> &NetNs {
        self.netns.as_ref().expect("pod namespace exists")
    }

    /// `namespace/name`, as the CLI and flows name pods.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn container_id(&self) -> &str {
        &self.container_id
    }

    /// A command that runs `program` inside the pod: its network namespace, and its node's
    /// cgroup (where kubelet would put it; the node's `sock_ops` program sees its sockets).
    pub fn command(&self, program: &str) -> Command {
        let Some(cgroup) = &self.node.cgroup else {
            return self.netns().command(program);
        };
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            r#"echo $$ > "$0/cgroup.procs" && exec "$@""#,
            &cgroup.display().to_string(),
            "ip",
            "netns",
            "exec",
            &self.netns_name,
            program,
        ]);
        cmd
    }

    /// Run `program args` inside the pod (see [`Pod::command`]).
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program} in pod {}: {e}", self.name))
    }

    /// Start a long-running process inside the pod; it is killed when the pod drops.
    pub fn spawn(&self, program: &str, args: &[&str]) {
        let child = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program} in pod {}: {e}", self.name));
        self.children
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(child);
    }

    /// Run CNI `command` of the configured chain again (e.g. `CHECK` through `weft-cni`).
    pub fn cni_weft(&self, command: &str) -> Result<Value, String> {
        let conf = self.weft_conf(self.ptp_result.as_ref());
        self.cni("weft-cni", command, POD_IFNAME, &conf)
    }

    // === CNI ===

    fn ptp_conf(&self) -> Value {
        ptp_conf(
            &self.node.ipam_dir,
            &subnet_v4(self.node.subnet),
            &subnet_v6(self.node.subnet),
        )
    }

    fn weft_conf(&self, prev: Option<&Value>) -> Value {
        weft_cni_conf(&self.node, prev)
    }

    /// The primary plugin's (ptp's) result for this pod: what the runtime hands weft-cni.
    pub fn ptp_result(&self) -> Option<&Value> {
        self.ptp_result.as_ref()
    }

    /// Run one plugin inside the node's namespace as a runtime does; ADD's result as JSON.
    fn cni(
        &self,
        plugin: &str,
        command: &str,
        ifname: &str,
        conf: &Value,
    ) -> Result<Value, String> {
        run_cni(
            &self.node,
            &CniCall {
                plugin,
                command,
                container_id: &self.container_id,
                netns: &format!("/var/run/netns/{}", self.netns_name),
                ifname,
                pod_namespace: &self.namespace,
                pod_name: &self.name,
            },
            conf,
        )
    }
}

/// One CNI plugin invocation.
#[derive(Clone, Copy)]
pub struct CniCall<'a> {
    pub plugin: &'a str,
    pub command: &'a str,
    pub container_id: &'a str,
    /// `CNI_NETNS`.
    pub netns: &'a str,
    pub ifname: &'a str,
    pub pod_namespace: &'a str,
    pub pod_name: &'a str,
}

/// Run a CNI plugin (`weft-cni` from the build, the others from the reference plugins) in
/// `node`'s namespace with `conf` on stdin, as a runtime does; its result as JSON.
pub(crate) fn run_cni(node: &NodeInfo, call: &CniCall<'_>, conf: &Value) -> Result<Value, String> {
    let plugin = call.plugin;
    let command = call.command;
    let binary = if plugin == "weft-cni" {
        node.bin_dir.join(plugin)
    } else {
        crate::cni_plugin_dir().join(plugin)
    };
    let cni_path = format!(
        "{}:{}",
        crate::cni_plugin_dir().display(),
        node.bin_dir.display()
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", &node.name])
        .arg(&binary)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", call.container_id)
        .env("CNI_NETNS", call.netns)
        .env("CNI_IFNAME", call.ifname)
        .env("CNI_PATH", cni_path)
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
                call.pod_namespace, call.pod_name
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(conf.to_string().as_bytes())
        .map_err(|e| format!("writing the config to {plugin}: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for {plugin}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let mut msg = format!(
            "{plugin} {command} failed ({}): {}",
            out.status,
            stdout.trim()
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !stderr.trim().is_empty() {
            let _ = write!(msg, "\nstderr: {}", stderr.trim());
        }
        return Err(msg);
    }
    if stdout.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&stdout)
        .map_err(|e| format!("{plugin} {command} printed no JSON ({e}): {stdout}"))
}

/// The weft-cni network configuration for a node, with `prev` as prevResult.
pub(crate) fn weft_cni_conf(node: &NodeInfo, prev: Option<&Value>) -> Value {
    let mut conf = json!({
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "type": "weft-cni",
        "agentSocket": node.socket,
    });
    if let Some(prev) = prev {
        conf["prevResult"] = prev.clone();
    }
    conf
}

impl Pod {
    /// Leave the pod (its namespace, attachment and processes) in place when this value
    /// goes, for the demo.
    pub fn keep(mut self) {
        self.keep = true;
        // Processes are left to run; the namespace stays (its drop would delete it).
        std::mem::forget(std::mem::take(
            &mut *self
                .children
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        ));
        if let Some(ns) = self.netns.take() {
            std::mem::forget(ns);
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        self.stop.store(true, Ordering::SeqCst);
        for mut child in std::mem::take(
            &mut *self
                .children
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        ) {
            let _ = child.kill();
            let _ = child.wait();
        }
        for thread in std::mem::take(
            &mut *self
                .threads
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        ) {
            let _ = thread.join();
        }
        // DEL in reverse order of ADD; DEL errors are reported, never fatal (maybe unwinding).
        let report = |step: &str, r: Result<Value, String>| {
            if let Err(e) = r {
                eprintln!("pod {} cleanup, {step}: {e}", self.name);
            }
        };
        if self.weft_added && self.with_weft {
            let conf = self.weft_conf(self.ptp_result.as_ref());
            report(
                "weft-cni DEL",
                self.cni("weft-cni", "DEL", POD_IFNAME, &conf),
            );
        }
        if self.netns.is_some() {
            // ptp DEL also releases the host-local lease; run it even when ADD failed midway.
            report(
                "ptp DEL",
                self.cni("ptp", "DEL", POD_IFNAME, &self.ptp_conf()),
            );
        }
        if self.loopback_added {
            report(
                "loopback DEL",
                self.cni("loopback", "DEL", "lo", &loopback_conf()),
            );
        }
        if let Some(file) = self.endpoint_file.take() {
            let _ = std::fs::remove_file(self.node.source_dir.join(file));
        }
        drop(self.netns.take());
        self.node
            .pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.netns_name);
    }
}

fn loopback_conf() -> Value {
    json!({"cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback"})
}

/// A container port of a pod: name, number, protocol (`TCP`, `UDP`, `SCTP`).
pub type ContainerPort<'a> = (&'a str, u16, &'a str);

impl Pod {
    /// Rewrite the pod's `Endpoint` object with new `labels` and container `ports`, as the
    /// API server would show a relabelled pod (the agent sees the change; the pod keeps its
    /// interface and addresses). Returns once the file is in place, not once it is enforced.
    pub fn update_endpoint(&self, labels: &[(&str, &str)], ports: &[ContainerPort<'_>]) {
        let file = self
            .endpoint_file
            .as_ref()
            .unwrap_or_else(|| panic!("pod {} has no Endpoint object (no weft)", self.name));
        apply_file(
            &self.node.source_dir,
            file,
            &endpoint_yaml(
                &self.name,
                &self.namespace,
                labels,
                &self.node.name,
                &self.ips(),
                ports,
            ),
        );
    }
}

/// The `Endpoint` object of a pod, as the local source reads it: on `node`, with `addresses`
/// and container `ports`.
pub(crate) fn endpoint_yaml(
    name: &str,
    namespace: &str,
    labels: &[(&str, &str)],
    node: &str,
    addresses: &[IpAddr],
    ports: &[ContainerPort<'_>],
) -> String {
    // JSON strings are YAML strings: quoting through serde_json escapes anything odd.
    let q = |s: &str| Value::from(s).to_string();
    let mut yaml = format!(
        "apiVersion: weft.io/v1alpha1\nkind: Endpoint\nmetadata:\n  name: {}\n  namespace: {}\n",
        q(name),
        q(namespace)
    );
    if labels.is_empty() {
        yaml.push_str("  labels: {}\n");
    } else {
        yaml.push_str("  labels:\n");
        for (k, v) in labels {
            let _ = writeln!(yaml, "    {}: {}", q(k), q(v));
        }
    }
    let _ = writeln!(
        yaml,
        "spec:\n  serviceAccount: default\n  node: {}",
        q(node)
    );
    if !addresses.is_empty() {
        let list: Vec<String> = addresses.iter().map(|a| q(&a.to_string())).collect();
        let _ = writeln!(yaml, "  addresses: [{}]", list.join(", "));
    }
    if !ports.is_empty() {
        yaml.push_str("  ports:\n");
        for (port_name, number, protocol) in ports {
            let _ = writeln!(
                yaml,
                "  - {{name: {}, containerPort: {number}, protocol: {protocol}}}",
                q(port_name)
            );
        }
    }
    yaml
}

/// The `ptp` + `host-local` network config weft's pods use: one IPv4 and one IPv6 range, a
/// `dataDir` of the node's own (host-local's default is shared by the whole machine), and
/// default routes for both families.
pub fn ptp_conf(ipam_dir: &std::path::Path, subnet_v4: &str, subnet_v6: &str) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "type": "ptp",
        "ipam": {
            "type": "host-local",
            "dataDir": ipam_dir,
            "ranges": [[{"subnet": subnet_v4}], [{"subnet": subnet_v6}]],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
        },
    })
}
