//! The `weft-cni` chained CNI plugin (CNI spec 1.0.0; 0.4.0 accepted).
//!
//! Runs after a primary plugin (for example `ptp` with `host-local` IPAM) created the pod's
//! interface. It reads the primary plugin's result (`prevResult`), finds the host-side interface
//! and the pod's addresses, and tells the node's agent over its unix socket. It never touches
//! interfaces, routes or BPF itself: attaching the datapath is the agent's job.
//!
//! Parsing and the command logic are pure ([`run`] takes the environment, stdin and an
//! [`Agent`]), so tests need neither env vars nor a running agent.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use weft_api::client::ClientError;
use weft_api::{ApiError, CniEndpoint, CniRef, ErrorCode, Request};

/// The versions this plugin accepts in `cniVersion`.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0"];
/// The version this plugin speaks when the config does not say.
pub const CNI_VERSION: &str = "1.0.0";

/// Well-known error codes of the CNI spec ("Error" section).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// Plugin-specific (>= 100): the agent answered and refused the request.
    pub const AGENT_REFUSED: u32 = 100;
}

/// A CNI error as the spec prints it on stdout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The JSON error object for stdout.
    pub fn to_json(&self, cni_version: &str) -> String {
        serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
        .to_string()
    }
}

// === environment ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

/// The `CNI_*` environment variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Command,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS` split into key/value pairs.
    pub args: BTreeMap<String, String>,
}

impl CniEnv {
    /// Read the environment through `var` (the binary passes `std::env::var`).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let get = |name: &str| var(name).filter(|v| !v.is_empty());
        let command = match get("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("VERSION") => Command::Version,
            Some(other) => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("unknown CNI_COMMAND {other:?}"),
                    "expected ADD, DEL, CHECK or VERSION",
                ));
            }
            None => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    "CNI_COMMAND is not set",
                    "weft-cni is a CNI plugin; a container runtime runs it",
                ));
            }
        };
        let required = |name: &str| {
            if command == Command::Version {
                return Ok(get(name).unwrap_or_default());
            }
            get(name)
                .ok_or_else(|| CniError::new(code::INVALID_ENV, format!("{name} is not set"), ""))
        };
        let container_id = required("CNI_CONTAINERID")?;
        let ifname = required("CNI_IFNAME")?;
        // DEL may come without a netns (the runtime may have removed it already).
        let netns = match command {
            Command::Add | Command::Check => required("CNI_NETNS")?,
            Command::Del | Command::Version => get("CNI_NETNS").unwrap_or_default(),
        };
        let args = parse_cni_args(&get("CNI_ARGS").unwrap_or_default())?;
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            args,
        })
    }
}

/// Parse `CNI_ARGS`: `K8S_POD_NAMESPACE=ns;K8S_POD_NAME=name;IgnoreUnknown=1`.
pub fn parse_cni_args(text: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut args = BTreeMap::new();
    for pair in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                format!("CNI_ARGS entry {pair:?} is not KEY=VALUE"),
                text.to_string(),
            )
        })?;
        args.insert(key.trim().to_string(), value.trim().to_string());
    }
    Ok(args)
}

// === network configuration ===

/// The plugin's network configuration (stdin).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    /// The node agent's socket, e.g. `/var/run/weft/<node>/agent.sock`.
    #[serde(default)]
    pub agent_socket: Option<String>,
    /// The previous plugin's result, printed back unchanged on ADD.
    #[serde(default)]
    pub prev_result: Option<Value>,
}

impl NetConf {
    pub fn parse(text: &str) -> Result<Self, CniError> {
        let conf: Self = serde_json::from_str(text).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                "cannot decode the network configuration",
                e.to_string(),
            )
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("unsupported cniVersion {:?}", conf.cni_version),
                format!("weft-cni supports {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        Ok(conf)
    }

    fn agent_socket(&self) -> Result<&str, CniError> {
        self.agent_socket
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                CniError::new(
                    code::INVALID_CONFIG,
                    "network configuration lacks agentSocket",
                    format!(
                        "set it to the node agent's socket, e.g. {}",
                        weft_api::default_socket_path("<node>")
                    ),
                )
            })
    }

    fn prev_result(&self) -> Result<PrevResult, CniError> {
        let value = self.prev_result.as_ref().ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                "network configuration lacks prevResult",
                "weft-cni is a chained plugin: list it after a primary plugin such as ptp",
            )
        })?;
        PrevResult::from_value(value)
    }
}

/// The parts of a CNI result weft-cni needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrevResult {
    /// The interface without `sandbox`: the host side of the pod's link.
    pub host_ifname: String,
    /// The pod's addresses with their prefix length.
    pub addresses: Vec<IpNet>,
}

#[derive(Deserialize)]
struct RawResult {
    #[serde(default)]
    interfaces: Vec<RawInterface>,
    #[serde(default)]
    ips: Vec<RawIp>,
}

#[derive(Deserialize)]
struct RawInterface {
    name: String,
    #[serde(default)]
    sandbox: Option<String>,
}

#[derive(Deserialize)]
struct RawIp {
    address: String,
    #[serde(default)]
    interface: Option<usize>,
}

impl PrevResult {
    pub fn from_value(value: &Value) -> Result<Self, CniError> {
        let raw: RawResult = serde_json::from_value(value.clone()).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                "cannot decode prevResult",
                e.to_string(),
            )
        })?;
        let in_sandbox = |i: &RawInterface| i.sandbox.as_deref().is_some_and(|s| !s.is_empty());
        let host_ifname = raw
            .interfaces
            .iter()
            .find(|i| !in_sandbox(i))
            .map(|i| i.name.clone())
            .ok_or_else(|| {
                CniError::new(
                    code::INVALID_CONFIG,
                    "prevResult has no host-side interface (an interface without sandbox)",
                    "the primary plugin must create a veth pair, as ptp does",
                )
            })?;
        let mut addresses = Vec::new();
        for ip in &raw.ips {
            // An address on the host-side interface is not the pod's.
            let on_host = ip
                .interface
                .and_then(|i| raw.interfaces.get(i))
                .is_some_and(|i| !in_sandbox(i));
            if on_host {
                continue;
            }
            let net: IpNet = ip.address.parse().map_err(|e| {
                CniError::new(
                    code::DECODE_FAILURE,
                    format!("prevResult ips[].address {:?} is not a CIDR", ip.address),
                    format!("{e}"),
                )
            })?;
            addresses.push(net);
        }
        if addresses.is_empty() {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "prevResult has no pod address in ips[]",
                "the primary plugin needs IPAM (e.g. host-local)",
            ));
        }
        Ok(Self {
            host_ifname,
            addresses,
        })
    }
}

// === commands ===

/// Why a call to the agent failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentError {
    /// No agent listens on the socket (or the connection broke).
    Unreachable(String),
    /// The agent answered with an error.
    Refused(ApiError),
}

/// The agent as the plugin sees it; [`SocketAgent`] in the binary, a fake in tests.
pub trait Agent {
    /// Send `request` to the agent at `socket` and wait for its answer.
    ///
    /// # Errors
    /// [`AgentError`]: unreachable, or refused with the agent's error code.
    fn call(&mut self, socket: &str, request: &Request) -> Result<(), AgentError>;
}

/// Talks to the agent over its unix socket.
pub struct SocketAgent;

impl Agent for SocketAgent {
    fn call(&mut self, socket: &str, request: &Request) -> Result<(), AgentError> {
        let mut client = weft_api::Client::connect(socket)
            .map_err(|e| AgentError::Unreachable(e.to_string()))?;
        match client.call::<()>(request) {
            Ok(()) => Ok(()),
            Err(ClientError::Refused(e)) => Err(AgentError::Refused(e)),
            Err(e) => Err(AgentError::Unreachable(e.to_string())),
        }
    }
}

/// Run one CNI command; returns what to print on stdout on success.
pub fn run(env: &CniEnv, stdin: &str, agent: &mut dyn Agent) -> Result<Option<String>, CniError> {
    match env.command {
        Command::Version => Ok(Some(version_json())),
        Command::Add => {
            let conf = NetConf::parse(stdin)?;
            let endpoint = endpoint(env, &conf)?;
            let socket = conf.agent_socket()?;
            agent
                .call(socket, &Request::CniAdd(endpoint))
                .map_err(|e| agent_error(&e, "ADD", socket))?;
            let prev = conf.prev_result.clone().unwrap_or(Value::Null);
            Ok(Some(prev.to_string()))
        }
        Command::Check => {
            let conf = NetConf::parse(stdin)?;
            // CHECK needs prevResult like ADD; validate it the same way.
            conf.prev_result()?;
            let socket = conf.agent_socket()?;
            agent
                .call(socket, &Request::CniCheck(cni_ref(env)))
                .map_err(|e| agent_error(&e, "CHECK", socket))?;
            Ok(None)
        }
        Command::Del => {
            let conf = NetConf::parse(stdin)?;
            let Ok(socket) = conf.agent_socket() else {
                // Nothing to tell anyone: DEL must not fail on what ADD would have refused.
                return Ok(None);
            };
            match agent.call(socket, &Request::CniDel(cni_ref(env))) {
                Ok(()) | Err(AgentError::Unreachable(_)) => Ok(None),
                // DEL is idempotent: the agent never had (or already removed) this pod.
                Err(AgentError::Refused(e)) if e.code == ErrorCode::NotFound => Ok(None),
                Err(e) => Err(agent_error(&e, "DEL", socket)),
            }
        }
    }
}

/// `VERSION`'s answer.
pub fn version_json() -> String {
    serde_json::json!({
        "cniVersion": CNI_VERSION,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
    .to_string()
}

/// The endpoint an ADD registers, from the environment and the configuration.
pub fn endpoint(env: &CniEnv, conf: &NetConf) -> Result<CniEndpoint, CniError> {
    let prev = conf.prev_result()?;
    let arg = |key: &str| {
        env.args
            .get(key)
            .filter(|v| !v.is_empty())
            .cloned()
            .ok_or_else(|| {
                CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_ARGS lacks {key}"),
                    "weft needs the pod's namespace and name to find its Endpoint object",
                )
            })
    };
    Ok(CniEndpoint {
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        ifname: env.ifname.clone(),
        host_ifname: prev.host_ifname,
        pod_name: arg("K8S_POD_NAME")?,
        pod_namespace: arg("K8S_POD_NAMESPACE")?,
        addresses: prev.addresses,
    })
}

fn cni_ref(env: &CniEnv) -> CniRef {
    CniRef {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    }
}

fn agent_error(error: &AgentError, command: &str, socket: &str) -> CniError {
    match error {
        AgentError::Unreachable(e) => CniError::new(
            code::TRY_AGAIN_LATER,
            format!("{command}: the weft agent at {socket} is unreachable"),
            e.clone(),
        ),
        AgentError::Refused(e) if e.code == ErrorCode::Overloaded => CniError::new(
            code::TRY_AGAIN_LATER,
            format!("{command}: the weft agent is busy: {}", e.message),
            e.code.to_string(),
        ),
        AgentError::Refused(e) => CniError::new(
            code::AGENT_REFUSED,
            format!("{command}: the weft agent refused: {}", e.message),
            e.code.to_string(),
        ),
    }
}

/// The `cniVersion` to put in an error: the config's if it parses, else ours.
pub fn error_version(stdin: &str) -> String {
    serde_json::from_str::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| CNI_VERSION.to_string())
}

#[cfg(test)]
mod tests;
