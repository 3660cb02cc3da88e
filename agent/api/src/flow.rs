//! Flows as `weft observe` shows them: a datapath event with names attached, and the one-line
//! text form.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// One flow record.
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
    /// What else the datapath said about the packet: `related` (an ICMP error of a known
    /// flow), `revoked` (an established flow that policy no longer allows), `fragment`, `redirected` (a same-node
    /// TCP socket whose payload goes socket to socket).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Events of the same flow the datapath did not send since the previous one (drop floods
    /// are reported once per flow and second).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub suppressed: u32,
    /// An L7 flow: one HTTP request the node's L7 filter decided (`verdict` is then the
    /// filter's: `forwarded`, `denied`, `malformed` or `upstream-error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpFlow>,
}

/// The HTTP part of an L7 flow.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HttpFlow {
    /// `HTTP/1.1`, `HTTP/2`.
    pub version: String,
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub path: String,
    pub status: u16,
    pub latency_us: u64,
    /// The rule that allowed the request, or the policies whose rules it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

#[allow(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if signature"
)]
fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FlowPeer {
    pub ip: IpAddr,
    pub port: Option<u16>,
    pub identity: u32,
    /// `namespace/pod` for pods, a reserved name (`world`, `host`...) otherwise.
    pub name: String,
    pub labels: Vec<String>,
    /// The node a pod runs on, when it is not this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// One line per flow, as `weft observe` prints it.
pub fn format_flow(flow: &Flow) -> String {
    let endpoint = |p: &FlowPeer| {
        let at = p
            .node
            .as_deref()
            .map(|n| format!("@{n}"))
            .unwrap_or_default();
        match p.port {
            Some(port) => format!("{}{at} ({})", p.name, SocketAddr::new(p.ip, port)),
            None => format!("{}{at} ({})", p.name, p.ip),
        }
    };
    let detail = if let Some(h) = &flow.http {
        let policy = h
            .policy
            .as_deref()
            .map(|p| format!(" by {p}"))
            .unwrap_or_default();
        format!(
            " {} {} {}{} -> {} ({} us){policy}",
            h.version,
            h.method,
            h.host.as_deref().unwrap_or(""),
            h.path,
            h.status,
            h.latency_us
        )
    } else if let Some(icmp) = &flow.icmp {
        format!(" icmp {icmp}")
    } else if !flow.tcp_flags.is_empty() {
        format!(" [{}]", flow.tcp_flags.join(","))
    } else {
        String::new()
    };
    let reason = flow
        .drop_reason
        .as_deref()
        .map(|r| format!(" reason={r}"))
        .unwrap_or_default();
    let notes = if flow.notes.is_empty() {
        String::new()
    } else {
        format!(" ({})", flow.notes.join(", "))
    };
    let suppressed = if flow.suppressed > 0 {
        format!(" +{} similar", flow.suppressed)
    } else {
        String::new()
    };
    format!(
        "{} {:<9} {} {} -> {} {}{detail}{reason}{notes}{suppressed} identity {} -> {}",
        flow.time,
        flow.verdict.to_uppercase(),
        flow.direction,
        endpoint(&flow.source),
        endpoint(&flow.destination),
        flow.protocol,
        flow.source.identity,
        flow.destination.identity,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, ip: &str, port: Option<u16>, identity: u32) -> FlowPeer {
        FlowPeer {
            ip: ip.parse().expect("ip"),
            port,
            identity,
            name: name.into(),
            labels: Vec::new(),
            node: None,
        }
    }

    #[test]
    fn a_dropped_flow_reads_as_one_line() {
        let mut flow = Flow {
            time: "2026-12-01T10:00:00.000Z".into(),
            verdict: "dropped".into(),
            drop_reason: Some("policy-denied".into()),
            direction: "ingress".into(),
            endpoint: "shop/api".into(),
            protocol: "TCP".into(),
            source: peer("shop/web", "fd00::5", Some(40000), 300),
            destination: peer("shop/api", "100.64.1.3", Some(8080), 301),
            tcp_flags: vec!["SYN".into()],
            icmp: None,
            notes: Vec::new(),
            suppressed: 0,
            http: None,
        };
        assert_eq!(
            format_flow(&flow),
            "2026-12-01T10:00:00.000Z DROPPED   ingress shop/web ([fd00::5]:40000) -> \
             shop/api (100.64.1.3:8080) TCP [SYN] reason=policy-denied identity 300 -> 301"
        );
        flow.suppressed = 41;
        flow.source.node = Some("n2".into());
        let line = format_flow(&flow);
        assert!(line.contains("shop/web@n2 ("), "{line}");
        assert!(line.contains("+41 similar"), "{line}");
    }
}
