//! weft's local API: JSON lines over the agent's unix socket (mode 0600, root only).
//!
//! Each request is one JSON object on one line of at most [`MAX_REQUEST_BYTES`]; the agent
//! answers with one line, `{"ok": ...}` or `{"error": {"code": ..., "message": ...}}`, except
//! `observe` with `follow`, which streams one `{"ok": <Flow>}` line per flow until the client
//! goes away. Errors carry an [`ErrorCode`] so that clients (the CLI, the CNI plugin, the L7
//! filter) decide on the code, never on the wording.
//!
//! This crate is the contract between the agent and its clients: plain data, the blocking
//! [`Client`], and the pure formatting both sides share. It links neither aya nor tokio.
#![forbid(unsafe_code)]

pub mod client;
pub mod features;
pub mod flow;
pub mod report;

use std::fmt;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use client::Client;
pub use features::{Feature, FeatureKind, FeatureReport};
pub use flow::{Flow, FlowPeer, HttpFlow};
pub use report::*;

/// Longest request line the agent reads; longer ones are answered with
/// [`ErrorCode::TooLarge`] and the connection is closed.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

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
    NodeList,
    PolicyGet,
    /// The verdict for one connection, which rules decided it, and whether the datapath's
    /// recent flows agree (`weft policy explain`).
    PolicyExplain(ExplainQuery),
    /// Answer once the maps hold the configuration as it is now: the source is read again
    /// first, so every file closed before the request is in force (or rejected) when the
    /// answer comes. `timeout_ms` bounds the wait (the agent caps it too).
    PolicyWait {
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
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
    EncryptionStatus,
    /// Replace the node's WireGuard key; answers the status after the change.
    EncryptionRotate,
}

impl Request {
    /// Short name for logs.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::EndpointList => "endpoint-list",
            Request::IdentityList => "identity-list",
            Request::NodeList => "node-list",
            Request::PolicyGet => "policy-get",
            Request::PolicyExplain(_) => "policy-explain",
            Request::PolicyWait { .. } => "policy-wait",
            Request::Observe { .. } => "observe",
            Request::CniAdd(_) => "cni-add",
            Request::CniDel(_) => "cni-del",
            Request::CniCheck(_) => "cni-check",
            Request::EncryptionStatus => "encryption-status",
            Request::EncryptionRotate => "encryption-rotate",
        }
    }
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

/// Names what one CNI ADD made: the container and its interface.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CniRef {
    pub container_id: String,
    pub ifname: String,
}

/// Why the agent refused a request. Clients act on the code.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The request is not valid JSON or not a known operation.
    BadRequest,
    /// The request line is longer than [`MAX_REQUEST_BYTES`].
    TooLarge,
    /// Too many connections or requests at once: try again later.
    Overloaded,
    /// The object named by the request does not exist (e.g. a CNI DEL for an unknown pod).
    NotFound,
    /// The request contradicts the agent's state (e.g. an interface owned by another pod).
    Conflict,
    /// The request's content is invalid (e.g. a pod without addresses).
    Invalid,
    /// The agent cannot do it now (starting up, shutting down, a component down).
    Unavailable,
    /// The operation did not finish in time.
    Timeout,
    /// Anything else: a bug or a kernel error; the message says what.
    Internal,
}

impl ErrorCode {
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad-request",
            ErrorCode::TooLarge => "too-large",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::NotFound => "not-found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Invalid => "invalid",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An error answer: a code to act on and a message for people.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Response<T> {
    Ok(T),
    Error(ApiError),
}

impl<T: Serialize> Response<T> {
    /// One wire line, without the newline. Never fails: an answer that cannot be encoded
    /// becomes an [`ErrorCode::Internal`] answer.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            serde_json::to_string(&Response::<()>::Error(ApiError::new(
                ErrorCode::Internal,
                format!("encoding the answer: {e}"),
            )))
            .unwrap_or_default()
        })
    }
}

impl<T> From<Result<T, ApiError>> for Response<T> {
    fn from(result: Result<T, ApiError>) -> Self {
        match result {
            Ok(value) => Response::Ok(value),
            Err(e) => Response::Error(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_with_their_op_tag() {
        for request in [
            Request::Status,
            Request::PolicyWait {
                timeout_ms: Some(1500),
            },
            Request::Observe {
                follow: true,
                last: None,
            },
            Request::CniDel(CniRef {
                container_id: "c1".into(),
                ifname: "eth0".into(),
            }),
        ] {
            let line = serde_json::to_string(&request).expect("encodes");
            assert!(
                line.contains(&format!("\"op\":\"{}\"", request.op())),
                "{line}"
            );
            let back: Request = serde_json::from_str(&line).expect("decodes");
            assert_eq!(back, request);
        }
    }

    #[test]
    fn errors_carry_a_code_on_the_wire() {
        let line =
            Response::<()>::Error(ApiError::new(ErrorCode::NotFound, "no such pod")).to_line();
        assert_eq!(
            line,
            r#"{"error":{"code":"not-found","message":"no such pod"}}"#
        );
        let back: Response<()> = serde_json::from_str(&line).expect("decodes");
        assert_eq!(
            back,
            Response::Error(ApiError::new(ErrorCode::NotFound, "no such pod"))
        );
    }
}
