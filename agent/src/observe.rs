//! Flow observation: turns datapath flow events into named flows (pods, identities, drop
//! reasons by name), keeps a bounded ring of recent flows and fans out live ones to
//! `weft observe` clients. Owns nothing of the datapath; the daemon feeds it.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast;
use weft_common::{DropReason, FlowEvent, direction, flow_verdict};

use crate::api::{Flow, FlowPeer};
use crate::datapath::{addr_from_bytes, protocol_name};

/// How many recent flows the agent keeps for `weft observe` without `--follow`.
pub const RECENT_FLOWS: usize = 4096;

/// Names the enrichment needs, rebuilt by the daemon after each reconcile.
#[derive(Debug, Default, Clone)]
pub struct NameTable {
    /// endpoint id -> `namespace/pod`
    pub endpoints: HashMap<u32, String>,
    /// pod address -> `namespace/pod`
    pub addresses: HashMap<IpAddr, String>,
    /// identity -> display labels
    pub identities: HashMap<u32, Vec<String>>,
}

pub struct FlowHub {
    recent: Mutex<VecDeque<Flow>>,
    live: broadcast::Sender<Flow>,
    names: Mutex<NameTable>,
    /// Wall clock minus monotonic clock, to date kernel timestamps.
    wall_offset: Duration,
}

impl Default for FlowHub {
    fn default() -> Self {
        Self::new()
    }
}

impl FlowHub {
    pub fn new() -> Self {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let mono = Duration::from_nanos(crate::datapath::monotonic_ns());
        Self {
            recent: Mutex::new(VecDeque::with_capacity(RECENT_FLOWS)),
            live: broadcast::channel(1024).0,
            names: Mutex::new(NameTable::default()),
            wall_offset: now.saturating_sub(mono),
        }
    }

    pub fn set_names(&self, names: NameTable) {
        *self.names.lock().expect("names lock") = names;
    }

    /// Record one datapath event.
    pub fn record(&self, event: &FlowEvent) {
        let flow = {
            let names = self.names.lock().expect("names lock");
            enrich(event, &names, self.wall_offset)
        };
        let mut recent = self.recent.lock().expect("recent lock");
        if recent.len() == RECENT_FLOWS {
            recent.pop_front();
        }
        recent.push_back(flow.clone());
        drop(recent);
        // No subscribers is fine.
        let _ = self.live.send(flow);
    }

    pub fn recent(&self, last: usize) -> Vec<Flow> {
        let recent = self.recent.lock().expect("recent lock");
        let skip = recent.len().saturating_sub(last);
        recent.iter().skip(skip).cloned().collect()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Flow> {
        self.live.subscribe()
    }
}

/// Reserved identity names, as DESIGN.md lists them.
pub fn reserved_identity_name(identity: u32) -> Option<&'static str> {
    use weft_common::identity::*;
    Some(match identity {
        ANY => "any",
        HOST => "host",
        WORLD => "world",
        UNMANAGED => "unmanaged",
        HEALTH => "health",
        INIT => "init",
        REMOTE_NODE => "remote-node",
        KUBE_APISERVER => "kube-apiserver",
        _ => return None,
    })
}

fn enrich(event: &FlowEvent, names: &NameTable, wall_offset: Duration) -> Flow {
    let time = SystemTime::UNIX_EPOCH + wall_offset + Duration::from_nanos(event.timestamp_ns);
    let is_icmp = matches!(
        event.protocol,
        weft_common::IPPROTO_ICMP | weft_common::IPPROTO_ICMPV6
    );
    let has_ports = matches!(
        event.protocol,
        weft_common::IPPROTO_TCP | weft_common::IPPROTO_UDP | weft_common::IPPROTO_SCTP
    );
    let peer = |addr: [u8; 16], port: u16, identity: u32| {
        let ip = addr_from_bytes(addr);
        let labels = names.identities.get(&identity).cloned().unwrap_or_default();
        let name = names
            .addresses
            .get(&ip)
            .cloned()
            .or_else(|| reserved_identity_name(identity).map(str::to_owned))
            .or_else(|| labels.iter().find(|l| l.starts_with("cidr:")).cloned())
            .unwrap_or_else(|| format!("identity:{identity}"));
        FlowPeer {
            ip,
            port: has_ports.then_some(port),
            identity,
            name,
            labels,
        }
    };
    let verdict = match event.verdict {
        flow_verdict::FORWARDED => "forwarded",
        flow_verdict::DROPPED => "dropped",
        flow_verdict::AUDIT => "audit",
        _ => "unknown",
    };
    let drop_reason = DropReason::from_u8(event.drop_reason)
        .filter(|r| *r != DropReason::None)
        .map(|r| r.name().to_owned());
    let mut tcp_flags = Vec::new();
    if event.protocol == weft_common::IPPROTO_TCP {
        for (bit, name) in [
            (0x02, "SYN"),
            (0x10, "ACK"),
            (0x01, "FIN"),
            (0x04, "RST"),
            (0x08, "PSH"),
        ] {
            if event.tcp_flags & bit != 0 {
                tcp_flags.push(name.to_owned());
            }
        }
    }
    Flow {
        time: humantime::format_rfc3339_millis(time).to_string(),
        verdict: verdict.to_owned(),
        drop_reason,
        direction: if event.direction == direction::INGRESS {
            "ingress"
        } else {
            "egress"
        }
        .to_owned(),
        endpoint: names
            .endpoints
            .get(&event.endpoint_id)
            .cloned()
            .unwrap_or_else(|| format!("endpoint:{}", event.endpoint_id)),
        protocol: protocol_name(event.protocol),
        source: peer(event.src_addr, event.src_port, event.src_identity),
        destination: peer(event.dst_addr, event.dst_port, event.dst_identity),
        tcp_flags,
        icmp: is_icmp.then(|| format!("{}/{}", event.dst_port >> 8, event.dst_port & 0xff)),
    }
}

/// One line per flow, as `weft observe` prints it.
pub fn format_flow(flow: &Flow) -> String {
    let endpoint = |p: &FlowPeer| match p.port {
        Some(port) => format!("{} ({})", p.name, std::net::SocketAddr::new(p.ip, port)),
        None => format!("{} ({})", p.name, p.ip),
    };
    let detail = if let Some(icmp) = &flow.icmp {
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
    format!(
        "{} {:<9} {} {} -> {} {}{}{} identity {} -> {}",
        flow.time,
        flow.verdict.to_uppercase(),
        flow.direction,
        endpoint(&flow.source),
        endpoint(&flow.destination),
        flow.protocol,
        detail,
        reason,
        flow.source.identity,
        flow.destination.identity,
    )
}
