//! Answers of the inspection requests: what `weft status`, `weft endpoint list`, `weft
//! identity list`, `weft node list` and `weft policy get|wait|explain` print.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::features::Feature;

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
    /// Which build of the datapath programs runs, when the kernel made the agent choose.
    pub datapath_variant: String,
    /// Kernel features the datapath uses (or will), as probed when the agent started.
    #[serde(default)]
    pub kernel_features: Vec<Feature>,
    pub endpoints: usize,
    pub identities: usize,
    pub policies: usize,
    pub policy_map_entries: usize,
    pub ipcache_entries: usize,
    /// Live conntrack entries at the last garbage collection.
    pub conntrack_entries: usize,
    /// Every map's fill level.
    pub maps: Vec<MapUsage>,
    /// Revision of the configuration the agent has read (one step per change of the source).
    pub config_revision: u64,
    /// Revision of the configuration last written to the maps; equal to `config_revision`
    /// when the datapath enforces what the source says.
    pub applied_revision: u64,
    /// Seconds since the last successful apply.
    pub last_apply_seconds_ago: Option<u64>,
    /// Objects the source rejected; their last good version (if any) stays in force.
    pub rejected: Vec<Rejection>,
    /// Conditions that need attention (refused policy, map pressure, repaired pins, ...).
    pub problems: Vec<String>,
    pub events: EventStats,
    #[serde(default)]
    pub conntrack: ConntrackStats,
    /// Endpoints whose policy did not fit the map, since the agent started (each counted
    /// once until it fits).
    #[serde(default)]
    pub refusals_total: u64,
    /// One line on node-to-node encryption (`off`, or the device and its peers).
    #[serde(default)]
    pub encryption: String,
    /// Forwarded / dropped / audited packet counters since load.
    pub counters: Vec<CounterRow>,
    /// The node's L7 filter process.
    #[serde(default)]
    pub l7_filter: L7FilterReport,
    /// Same-node socket redirection: `on (cgroup ...)` or `off (why)`.
    #[serde(default)]
    pub socket_redirect: String,
    #[serde(default)]
    pub sock_redirect: SockRedirectStats,
}

/// Same-node socket redirection counters since load.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SockRedirectStats {
    /// Sockets put on the socket path (two per connection).
    pub sockets: u64,
    /// Messages and bytes handed from socket to socket.
    pub messages: u64,
    pub bytes: u64,
    /// Connection sides sent back to the normal path (policy changed, peer gone).
    pub fallbacks: u64,
}

/// The node's L7 filter as its supervisor in the agent sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct L7FilterReport {
    /// `off` (no rule needs it), `starting`, `ready` or `down` (flows that need it are
    /// dropped with `l7-unavailable` in every state but `ready`).
    pub state: String,
    /// Times the filter was started again after it died.
    pub restarts: u64,
    pub pid: Option<u32>,
    /// The configuration revision in force in the filter.
    pub revision: Option<u64>,
    /// Local endpoints with HTTP rules.
    pub endpoints: usize,
    /// Why it last failed (exit status, refused configuration, ...).
    pub last_error: Option<String>,
}

/// How full one pinned map is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MapUsage {
    pub name: String,
    pub entries: usize,
    pub capacity: usize,
}

/// Flow events: what the datapath sent and what got lost on the way, never silently.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct EventStats {
    /// Events read from the datapath's ring buffer.
    pub received: u64,
    /// Events the datapath could not send because the ring buffer was full.
    pub lost: u64,
    /// Events the datapath held back on purpose (more than one per flow and second).
    pub rate_limited: u64,
    /// Flows a slow `weft observe --follow` client missed.
    pub observer_lagged: u64,
}

/// Connection tracking: counts since the maps were created, except `evicted` (since the
/// agent started).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConntrackStats {
    /// Live entries at the last garbage collection.
    pub live: usize,
    pub capacity: usize,
    /// Flows the datapath recorded.
    pub created: u64,
    /// Established flows checked again after a policy change, and those it revoked.
    pub revalidated: u64,
    pub revoked: u64,
    /// Entries the full map gave up, least recently used first.
    pub evicted: u64,
    /// ICMP errors let through as part of a known flow.
    pub icmp_related: u64,
}

/// An object (or a whole file) the source refused, and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rejection {
    /// Where it came from: a file name, or a Kubernetes object reference.
    pub origin: String,
    /// `Kind namespace/name`, when the object could be identified.
    pub object: Option<String>,
    /// Field path inside the object (`spec.ingress[0].toPorts[0].ports[0].port`).
    pub field: Option<String>,
    pub reason: String,
    /// Everything above in one line, as logs print it.
    pub message: String,
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
pub struct NodeRow {
    pub name: String,
    /// This agent's own node.
    pub local: bool,
    pub addresses: Vec<IpAddr>,
    pub pod_cidrs: Vec<IpNet>,
    /// Pods of this node the source knows.
    pub pods: usize,
    /// The WireGuard public key the node publishes (base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_public_key: Option<String>,
}

/// `weft encryption status`: this node's WireGuard device and its peers.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EncryptionReport {
    /// `wireguard`, or `off` (then nothing else is set).
    pub mode: String,
    /// The device in the node's network namespace (`weft_wg0`).
    #[serde(default)]
    pub device: String,
    /// The interface name `wg show` knows the device by (its UAPI socket's name).
    #[serde(default)]
    pub wg_interface: String,
    #[serde(default)]
    pub public_key: String,
    #[serde(default)]
    pub listen_port: u16,
    #[serde(default)]
    pub mtu: u32,
    /// Seconds since the private key was generated (or last rotated).
    #[serde(default)]
    pub key_age_seconds: Option<u64>,
    #[serde(default)]
    pub peers: Vec<EncryptionPeerRow>,
    /// Remote pod CIDRs routed through the device.
    #[serde(default)]
    pub routes: Vec<IpNet>,
    /// Strict mode: pod traffic between nodes that does not go through the device is
    /// dropped by the datapath (`unencrypted`), both ways.
    #[serde(default)]
    pub strict: bool,
    /// Nodes or prefixes left out, and failures to configure the device or routes.
    #[serde(default)]
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EncryptionPeerRow {
    pub node: String,
    pub public_key: String,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<IpNet>,
    /// Seconds since the last completed handshake; `None` before the first.
    pub last_handshake_seconds_ago: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PolicyReport {
    pub policies: Vec<PolicyRow>,
    pub rejected: Vec<Rejection>,
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
    /// `Valid`, `Enforced`, ... as they would appear in `status.conditions`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// A status condition, as Kubernetes objects carry them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PolicyEntryRow {
    pub endpoint: String,
    pub direction: String,
    /// Peer identity (0 = any).
    pub identity: u32,
    pub protocol: String,
    /// `80`, a range `8000-8191`, or `any`.
    pub port: String,
    pub verdict: String,
    pub derived_from: Vec<String>,
}

/// The answer of `policy-wait`: the configuration revision now enforced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WaitReport {
    pub config_revision: u64,
    pub applied_revision: u64,
    /// Objects the source rejected when it was read for this wait.
    pub rejected: Vec<Rejection>,
    /// Policies that could not be enforced in full (map capacity), with the reason.
    pub refused: Vec<String>,
}

/// What `weft policy explain` asks: a connection from `from` to `to` on `protocol`/`port`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExplainQuery {
    /// A pod (`namespace/name`, or `name` when unique) or an IP address.
    pub from: String,
    pub to: String,
    /// `tcp`, `udp`, `sctp`, `icmp` or `icmpv6` (any case).
    pub protocol: String,
    /// The destination port; for ICMP, the type (code 0).
    pub port: u16,
}

/// The answer of `policy-explain`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExplainReport {
    pub from: ExplainEnd,
    pub to: ExplainEnd,
    /// `TCP`, `UDP`, `SCTP`, `ICMP`, `ICMPv6`.
    pub protocol: String,
    pub port: u16,
    /// `allowed` or `dropped`: what this node's maps decide for the connection (L3/L4).
    pub verdict: String,
    /// Every direction this node enforces, in packet order: the source's egress, then the
    /// destination's ingress. Empty when neither end is an endpoint of this node.
    pub hops: Vec<ExplainHop>,
    /// How the datapath's recent flows compare.
    pub datapath: DatapathCheck,
}

/// One end of the explained connection, as the agent resolved it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExplainEnd {
    /// What was asked.
    pub query: String,
    /// `namespace/pod`, a reserved identity name, or the CIDR the address falls in.
    pub name: String,
    pub addresses: Vec<IpAddr>,
    pub identity: u32,
    /// Whether it is an endpoint of this node (its direction is enforced here).
    pub local: bool,
}

/// The decision of one direction.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExplainHop {
    /// `namespace/pod` of the local endpoint.
    pub endpoint: String,
    /// `egress` or `ingress`, relative to `endpoint`.
    pub direction: String,
    pub peer_identity: u32,
    /// The enforced verdict (`allow`, `deny`, `default-deny`, `audit-deny`, `redirect-l7`,
    /// `require-auth`).
    pub verdict: String,
    /// Whether the packet is dropped here.
    pub drops: bool,
    /// `not-isolated`, `rules`, `default-deny` (isolated, no entry matched) or
    /// `audit-default` (only audit policies isolate this direction: passes, reported).
    pub decided_by: String,
    /// The rules of the entry hit (`WeftNetworkPolicy shop/api ingress[0]`, ...).
    pub rules: Vec<String>,
    /// The policies that isolate this direction (for the default verdicts).
    pub isolated_by: Vec<String>,
    /// The map entry hit, if any.
    pub entry: Option<String>,
    pub audit: Option<ExplainAudit>,
    /// The most recent matching flow the datapath reported for this direction since the
    /// last policy change, if any.
    pub observed: Option<ObservedFlow>,
}

/// What the audit policies would make of the same packet.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExplainAudit {
    pub verdict: String,
    /// `would-drop` or `would-allow` where the audit policies change the outcome.
    pub change: Option<String>,
    pub rules: Vec<String>,
}

/// A flow the datapath reported, compared with the explained verdict.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ObservedFlow {
    pub time: String,
    /// `forwarded`, `dropped` or `audit`.
    pub verdict: String,
    pub drop_reason: Option<String>,
    /// Whether it passed or dropped as the explained verdict says.
    pub agrees: bool,
}

/// The cross-check against the datapath.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DatapathCheck {
    /// `agrees` (every observed direction matches), `disagrees` (some does not) or
    /// `no-recent-flows` (nothing matching since the last policy change).
    pub agreement: String,
    /// Matching flows since the last policy change.
    pub flows: usize,
    pub message: String,
}
