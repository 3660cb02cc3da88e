//! The agent's local API: JSON lines over a unix socket (mode 0600, root only).
//!
//! Each request is one JSON object on one line; the agent answers with one line
//! (`{"ok": ...}` or `{"error": "..."}`), except `observe` with `follow`, which streams one
//! `{"ok": <Flow>}` line per flow until the client goes away. The CLI (`weft`) and the CNI
//! plugin (`weft-cni`) are the clients; both use the blocking [`Client`] here.

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use ipnet::IpNet;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

pub use crate::datapath::{Feature, FeatureKind, feature_summary};

/// Default socket path of an agent for node `node`.
pub fn default_socket_path(node: &str) -> String {
    format!("/var/run/weft/{node}/agent.sock")
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Status,
    EndpointList,
    IdentityList,
    PolicyGet,
    /// Recent flows (up to `last`), then, with `follow`, live ones.
    Observe {
        #[serde(default)]
        follow: bool,
        #[serde(default)]
        last: Option<usize>,
    },
    CniAdd(CniEndpoint),
    CniDel(CniRef),
    CniCheck(CniRef),
}

/// What the CNI plugin tells the agent about a pod after the primary plugin ran.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CniEndpoint {
    pub container_id: String,
    /// Path of the pod's network namespace (`CNI_NETNS`).
    pub netns: String,
    /// Interface name inside the pod (`CNI_IFNAME`).
    pub ifname: String,
    /// Host-side interface (in the node's namespace) the datapath attaches to.
    pub host_ifname: String,
    pub pod_name: String,
    pub pod_namespace: String,
    pub addresses: Vec<IpNet>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CniRef {
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Response<T> {
    Ok(T),
    Error(String),
}

// === payloads ===

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    pub node: String,
    pub version: String,
    pub kernel: String,
    pub uptime_seconds: u64,
    pub source: String,
    pub pin_dir: String,
    /// `tcx` or `netlink`.
    pub attach_mode: String,
    /// Kernel features the datapath uses (or will), as probed when the agent started.
    #[serde(default)]
    pub kernel_features: Vec<Feature>,
    pub endpoints: usize,
    pub identities: usize,
    pub policies: usize,
    pub policy_map_entries: usize,
    pub ipcache_entries: usize,
    pub conntrack_entries: usize,
    /// Seconds since the last successful policy apply.
    pub last_apply_seconds_ago: Option<u64>,
    /// Objects rejected at the last reading of the source, with the reason.
    pub rejected: Vec<String>,
    /// Forwarded / dropped / audited packet counters since load.
    pub counters: Vec<CounterRow>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CounterRow {
    pub direction: String,
    pub verdict: String,
    pub reason: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EndpointRow {
    pub id: u32,
    pub pod: String,
    pub namespace: String,
    pub identity: u32,
    pub labels: Vec<String>,
    pub addresses: Vec<IpAddr>,
    pub host_ifname: String,
    pub ifindex: u32,
    /// `open`, `enforced` or `audit`.
    pub ingress: String,
    pub egress: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IdentityRow {
    pub id: u32,
    pub labels: Vec<String>,
    pub reserved: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PolicyReport {
    pub policies: Vec<PolicyRow>,
    pub rejected: Vec<String>,
    pub entries: Vec<PolicyEntryRow>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PolicyRow {
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    pub source: String,
    pub enforcement: String,
    /// Pods this policy selects on this node (`namespace/name`).
    pub selects: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PolicyEntryRow {
    pub endpoint: String,
    pub direction: String,
    /// Peer identity (0 = any).
    pub identity: u32,
    pub protocol: String,
    /// `80`, `8000-8999` as a prefix `8000/13`, or `any`.
    pub port: String,
    pub verdict: String,
    pub derived_from: Vec<String>,
}

/// One flow as `weft observe` shows it: the datapath event with names attached.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Flow {
    /// RFC 3339 wall-clock time.
    pub time: String,
    /// `forwarded`, `dropped` or `audit` (would be dropped, passed).
    pub verdict: String,
    /// Named drop reason, for `dropped` and `audit`.
    pub drop_reason: Option<String>,
    /// `ingress` or `egress`, relative to `endpoint`.
    pub direction: String,
    /// The local endpoint whose hook saw the packet (`namespace/pod`).
    pub endpoint: String,
    pub protocol: String,
    pub source: FlowPeer,
    pub destination: FlowPeer,
    /// For TCP: SYN, ACK, FIN, RST, PSH as seen on the packet.
    pub tcp_flags: Vec<String>,
    /// For ICMP: `type/code`.
    pub icmp: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FlowPeer {
    pub ip: IpAddr,
    pub port: Option<u16>,
    pub identity: u32,
    /// `namespace/pod` for local pods, a reserved name (`world`, `host`...) otherwise.
    pub name: String,
    pub labels: Vec<String>,
}

// === client ===

/// A blocking connection to an agent's socket.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    pub fn connect(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).with_context(|| {
            format!(
                "cannot reach the weft agent at {} (is it running on this node?)",
                path.display()
            )
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let writer = stream.try_clone()?;
        Ok(Self {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Send one request and read one answer.
    pub fn call<T: DeserializeOwned>(&mut self, request: &Request) -> anyhow::Result<T> {
        self.send(request)?;
        self.read_next::<T>()?
            .context("the agent closed the connection without answering")
    }

    pub fn send(&mut self, request: &Request) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .context("writing to the agent socket")
    }

    /// Read the next answer of a stream; `None` at end of stream.
    pub fn read_next<T: DeserializeOwned>(&mut self) -> anyhow::Result<Option<T>> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        match serde_json::from_str::<Response<T>>(&line)
            .with_context(|| format!("malformed answer from the agent: {}", line.trim()))?
        {
            Response::Ok(value) => Ok(Some(value)),
            Response::Error(message) => bail!("{message}"),
        }
    }

    /// No read timeout: for `observe --follow`.
    pub fn without_timeout(self) -> anyhow::Result<Self> {
        self.reader.get_ref().set_read_timeout(None)?;
        Ok(self)
    }
}
