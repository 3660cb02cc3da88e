//! Flow observation: turns the datapath's flow records into named flows (pods, nodes,
//! identities, drop reasons by name) with the names of the published view, keeps a bounded
//! ring of recent flows and fans out live ones to `weft observe` clients. Owns the ring and
//! the counters of what was received and missed; reads node state only through the view.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast;
use weft_api::{Flow, FlowPeer};
use weft_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};
use weft_policy::ports::protocol_name;

use crate::datapath::events::FlowRecord;
use crate::view::{Names, SharedView};

/// How many recent flows the agent keeps for `weft observe` without `--follow`.
pub const RECENT_FLOWS: usize = 4096;
/// Live flows a slow follower may fall behind by before it misses some (counted).
const LIVE_BUFFER: usize = 1024;

pub struct FlowHub {
    /// Recent flows with the datapath's monotonic time of their packet.
    recent: Mutex<VecDeque<(u64, Flow)>>,
    live: broadcast::Sender<Flow>,
    view: SharedView,
    /// Wall clock minus monotonic clock, to date kernel timestamps.
    wall_offset: Duration,
    received: AtomicU64,
    lagged: AtomicU64,
}

impl FlowHub {
    pub fn new(view: SharedView) -> Self {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let mono = Duration::from_nanos(crate::datapath::monotonic_ns());
        Self {
            recent: Mutex::new(VecDeque::with_capacity(RECENT_FLOWS)),
            live: broadcast::channel(LIVE_BUFFER).0,
            view,
            wall_offset: now.saturating_sub(mono),
            received: AtomicU64::new(0),
            lagged: AtomicU64::new(0),
        }
    }

    /// Record one datapath event.
    pub fn record(&self, record: &FlowRecord) {
        self.received.fetch_add(1, Ordering::Relaxed);
        let flow = enrich(record, &self.view.load().names, self.wall_offset);
        {
            let mut recent = self
                .recent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if recent.len() == RECENT_FLOWS {
                recent.pop_front();
            }
            recent.push_back((record.monotonic_ns, flow.clone()));
        }
        // No subscribers is fine.
        let _ = self.live.send(flow);
    }

    /// Record one L7 flow (an access record of the L7 filter, named by the supervisor).
    pub fn record_flow(&self, flow: Flow) {
        self.received.fetch_add(1, Ordering::Relaxed);
        {
            let mut recent = self
                .recent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if recent.len() == RECENT_FLOWS {
                recent.pop_front();
            }
            // Stamped on arrival: the filter's records carry wall time, not the kernel's clock.
            recent.push_back((crate::datapath::monotonic_ns(), flow.clone()));
        }
        let _ = self.live.send(flow);
    }

    /// The L7 flow of one access record of the filter.
    pub fn access_flow(&self, r: &weft_l7::AccessRecord) -> Flow {
        let view = self.view.load();
        let names = &view.names;
        let peer = |addr: std::net::SocketAddr, identity: u32| {
            let labels = names.identities.get(&identity).cloned().unwrap_or_default();
            let (name, node) = match names.addresses.get(&addr.ip()) {
                Some((pod, node)) => (pod.clone(), node.clone()),
                None => (
                    reserved_identity_name(identity)
                        .map_or_else(|| format!("identity:{identity}"), str::to_owned),
                    None,
                ),
            };
            weft_api::FlowPeer {
                ip: addr.ip(),
                port: Some(addr.port()),
                identity,
                name,
                labels,
                node,
            }
        };
        let time = SystemTime::UNIX_EPOCH + Duration::from_millis(r.time_ms);
        let (direction, endpoint) = match (&r.destination_endpoint, &r.source_endpoint) {
            (Some(dst), _) => ("ingress", dst.clone()),
            (None, Some(src)) => ("egress", src.clone()),
            (None, None) => ("ingress", String::new()),
        };
        Flow {
            time: humantime::format_rfc3339_millis(time).to_string(),
            verdict: r.verdict.as_str().to_owned(),
            drop_reason: None,
            direction: direction.to_owned(),
            endpoint,
            protocol: "TCP".to_owned(),
            source: peer(r.source, r.source_identity),
            destination: peer(r.destination, r.destination_identity),
            tcp_flags: Vec::new(),
            icmp: None,
            notes: vec!["l7".to_owned()],
            suppressed: 0,
            http: Some(weft_api::HttpFlow {
                version: r.version.clone(),
                method: r.method.clone(),
                host: r.host.clone(),
                path: r.path.clone(),
                status: r.status,
                latency_us: r.latency_us,
                policy: r.policy.clone(),
            }),
        }
    }

    pub fn recent(&self, last: usize) -> Vec<Flow> {
        let recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let skip = recent.len().saturating_sub(last);
        recent.iter().skip(skip).map(|(_, f)| f.clone()).collect()
    }

    /// Recent flows whose packet the datapath saw at or after `monotonic_ns`, oldest first,
    /// with that time.
    pub fn recent_since(&self, monotonic_ns: u64) -> Vec<(u64, Flow)> {
        let recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        recent
            .iter()
            .filter(|(t, _)| *t >= monotonic_ns)
            .cloned()
            .collect()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Flow> {
        self.live.subscribe()
    }

    /// A follower fell behind by `n` flows.
    pub fn note_lagged(&self, n: u64) {
        self.lagged.fetch_add(n, Ordering::Relaxed);
    }

    /// (received, missed by followers).
    pub fn counts(&self) -> (u64, u64) {
        (
            self.received.load(Ordering::Relaxed),
            self.lagged.load(Ordering::Relaxed),
        )
    }
}

/// Reserved identity names, as DESIGN.md lists them.
pub fn reserved_identity_name(identity: u32) -> Option<&'static str> {
    if identity == weft_common::identity::ANY {
        return Some("any");
    }
    weft_policy::identity::reserved_name(identity)
}

fn enrich(r: &FlowRecord, names: &Names, wall_offset: Duration) -> Flow {
    let time = SystemTime::UNIX_EPOCH + wall_offset + Duration::from_nanos(r.monotonic_ns);
    let is_icmp = matches!(r.protocol, IPPROTO_ICMP | IPPROTO_ICMPV6);
    let has_ports = matches!(r.protocol, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP);
    let peer = |ip: IpAddr, port: u16, identity: u32| {
        let labels = names.identities.get(&identity).cloned().unwrap_or_default();
        let (name, node) = match names.addresses.get(&ip) {
            Some((pod, node)) => (pod.clone(), node.clone()),
            None => (
                reserved_identity_name(identity)
                    .map(str::to_owned)
                    .or_else(|| labels.iter().find(|l| l.starts_with("cidr:")).cloned())
                    .unwrap_or_else(|| format!("identity:{identity}")),
                None,
            ),
        };
        FlowPeer {
            ip,
            port: has_ports.then_some(port),
            identity,
            name,
            labels,
            node,
        }
    };
    let mut tcp_flags = Vec::new();
    if r.protocol == IPPROTO_TCP {
        for (bit, name) in [
            (0x02, "SYN"),
            (0x10, "ACK"),
            (0x01, "FIN"),
            (0x04, "RST"),
            (0x08, "PSH"),
        ] {
            if r.tcp_flags & bit != 0 {
                tcp_flags.push(name.to_owned());
            }
        }
    }
    let mut notes = Vec::new();
    for (set, note) in [
        (r.related, "related"),
        (r.revoked, "revoked"),
        (r.fragment, "fragment"),
        (r.redirected, "redirected"),
    ] {
        if set {
            notes.push(note.to_owned());
        }
    }
    Flow {
        time: humantime::format_rfc3339_millis(time).to_string(),
        verdict: r.verdict.name().to_owned(),
        drop_reason: r.drop_reason.map(|d| d.name().to_owned()),
        direction: r.direction.to_string(),
        endpoint: names
            .endpoints
            .get(&r.endpoint_id)
            .cloned()
            .unwrap_or_else(|| format!("endpoint:{}", r.endpoint_id)),
        protocol: protocol_name(r.protocol),
        source: peer(r.src, r.src_port, r.src_identity),
        destination: peer(r.dst, r.dst_port, r.dst_identity),
        tcp_flags,
        icmp: is_icmp.then(|| format!("{}/{}", r.dst_port >> 8, r.dst_port & 0xff)),
        notes,
        suppressed: r.suppressed,
        http: None,
    }
}
