//! Types shared by the eBPF programs and the agent: map keys and values, flow events, drop
//! reasons and the numbers both sides must agree on.
//!
//! Every struct here is `#[repr(C)]` with explicit padding so that its layout is the same for
//! `bpfel-unknown-none` and x86_64 (checked by the size asserts at the bottom). Changing a
//! layout is a datapath ABI change: the agent adopts pinned maps across restarts, so a changed
//! struct needs a new map name. Numbers of `DropReason`, verdicts and flags are never reused.
#![no_std]

// === names and sizes ===

/// Names of the pinned maps (bpffs file names under the node's pin directory).
pub mod map_names {
    pub const ENDPOINTS: &str = "endpoints";
    pub const IPCACHE: &str = "ipcache";
    pub const POLICY: &str = "policy";
    pub const CONNTRACK: &str = "conntrack";
    pub const EVENTS: &str = "events";
    pub const METRICS: &str = "metrics";
    pub const ALL: [&str; 6] = [ENDPOINTS, IPCACHE, POLICY, CONNTRACK, EVENTS, METRICS];
}

/// Names of the tc programs in the object file.
pub mod program_names {
    /// tc ingress of the pod's host-side veth: packets leaving the pod.
    pub const FROM_POD: &str = "from_pod";
    /// tc egress of the pod's host-side veth: packets entering the pod.
    pub const TO_POD: &str = "to_pod";
}

pub const MAX_ENDPOINTS: usize = 4096;
pub const IPCACHE_MAX_ENTRIES: usize = 65536;
pub const POLICY_MAX_ENTRIES: usize = 262_144;
pub const CONNTRACK_MAX_ENTRIES: usize = 262_144;
pub const EVENTS_RING_BYTES: usize = 1 << 22;

// === identities ===

/// Reserved identities (DESIGN.md, "Identity"). Allocated identities start at
/// [`identity::FIRST_ALLOCATED`]. `ANY` (0) is the wildcard in policy keys.
pub mod identity {
    pub const ANY: u32 = 0;
    pub const HOST: u32 = 1;
    pub const WORLD: u32 = 2;
    pub const UNMANAGED: u32 = 3;
    pub const HEALTH: u32 = 4;
    pub const INIT: u32 = 5;
    pub const REMOTE_NODE: u32 = 6;
    pub const KUBE_APISERVER: u32 = 7;
    pub const FIRST_ALLOCATED: u32 = 256;
}

// === endpoints map: host-side ifindex -> EndpointInfo ===

/// Endpoint flags: which directions are isolated (default-deny), and whether the default
/// verdict of an isolated direction is only audited (reported, not enforced).
pub mod endpoint_flags {
    pub const INGRESS_ISOLATED: u32 = 1 << 0;
    pub const EGRESS_ISOLATED: u32 = 1 << 1;
    /// No enforcing policy isolates ingress: unmatched ingress is reported as audit, passed.
    pub const INGRESS_AUDIT: u32 = 1 << 2;
    pub const EGRESS_AUDIT: u32 = 1 << 3;
}

/// Value of the `endpoints` map, keyed by the ifindex (u32) of the pod's host-side interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EndpointInfo {
    pub endpoint_id: u32,
    pub identity: u32,
    /// [`endpoint_flags`] bits.
    pub flags: u32,
    pub _pad: u32,
}

// === ipcache: LPM prefix -> identity ===

/// Data part of an `ipcache` LPM key. IPv4 addresses are stored IPv4-mapped
/// (`::ffff:a.b.c.d`), so one trie serves both families: an IPv4 /n is prefix 96 + n.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, PartialOrd, Ord, Hash)]
pub struct IpcacheKey {
    pub addr: [u8; 16],
}

/// Full prefix length of an [`IpcacheKey`].
pub const IPCACHE_KEY_BITS: u32 = 128;
/// Prefix bits occupied by the IPv4-mapped marker (`::ffff:0:0/96`).
pub const IPV4_MAPPED_PREFIX_BITS: u32 = 96;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IpcacheEntry {
    pub identity: u32,
    /// IPv4 address (network order bytes as u32) of the node hosting this prefix, 0 if local
    /// or not a pod prefix.
    pub tunnel_endpoint: u32,
    /// WireGuard/encryption key index, 0 = none.
    pub encrypt_key: u8,
    pub flags: u8,
    pub _pad: [u8; 2],
    /// For a pod on this node: the ifindex of its host-side interface, which `from_pod`
    /// delivers local pod-to-pod traffic to directly; 0 otherwise.
    pub ifindex: u32,
}

// === policy: LPM over (endpoint, identity, direction, protocol, port) ===

pub mod direction {
    /// Traffic leaving the endpoint (its egress policy), seen at `from_pod`.
    pub const EGRESS: u8 = 0;
    /// Traffic entering the endpoint (its ingress policy), seen at `to_pod`.
    pub const INGRESS: u8 = 1;
}

/// Data part of a `policy` LPM key.
///
/// The field order is what makes wildcards work: the endpoint, peer identity and direction
/// are always fully specified (the first [`POLICY_FIXED_BITS`] bits); a rule for any protocol
/// stops the prefix there, a rule for one protocol and any port covers 8 more bits, and a port
/// range is a set of prefixes over `dport`, which is stored in network byte order so that its
/// most significant bit comes first. For ICMP the "port" is `[type, code]`, so a rule for one
/// ICMP type is a prefix of 8 bits over it. The wildcard identity ([`identity::ANY`]) is a
/// second lookup, not a prefix, because it sits in the middle of the key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    pub endpoint_id: u32,
    pub identity: u32,
    pub direction: u8,
    pub protocol: u8,
    /// Destination port, network byte order (`u16::to_be`), or `[type, code]` for ICMP.
    pub dport: u16,
}

/// Bits of a [`PolicyKey`] that every entry fully specifies (endpoint, identity, direction).
pub const POLICY_FIXED_BITS: u32 = 32 + 32 + 8;
/// Full prefix length of a [`PolicyKey`].
pub const POLICY_KEY_BITS: u32 = POLICY_FIXED_BITS + 8 + 16;

pub mod verdict {
    pub const ALLOW: u8 = 1;
    /// Denied by a deny rule (or default deny, which has no entry).
    pub const DENY: u8 = 2;
    /// A deny rule of an audit-mode policy: reported as would-be drop, passed.
    pub const AUDIT_DENY: u8 = 3;
    /// Allowed at L4, payload must go through the node's L7 filter (`proxy_port`).
    pub const REDIRECT_L7: u8 = 4;
    /// Allowed once the `auth` map holds a fresh entry for the identity pair.
    pub const REQUIRE_AUTH: u8 = 5;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct PolicyEntry {
    /// One of [`verdict`].
    pub verdict: u8,
    pub _pad: u8,
    /// L7 filter port (host order) for [`verdict::REDIRECT_L7`], else 0.
    pub proxy_port: u16,
}

// === conntrack ===

/// Conntrack key, relative to the endpoint whose hook sees the packet: `local` is the
/// endpoint's side of the connection. Both directions of a connection therefore share one
/// key, and each packet costs exactly one lookup; the two endpoints of a local connection
/// have one entry each (one for the client's egress, one for the server's ingress policy).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct CtKey {
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// Ports in network byte order; for ICMP echo both are the echo identifier.
    pub local_port: u16,
    pub remote_port: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

pub mod ct_flags {
    /// The endpoint opened the connection (egress policy allowed it).
    pub const ORIGIN_EGRESS: u32 = 1 << 0;
    /// The peer opened the connection (ingress policy allowed it).
    pub const ORIGIN_INGRESS: u32 = 1 << 1;
    /// A packet in the reply direction was seen (set from the start for local pod-to-pod
    /// flows, whose replies go straight into the pod and pass no hook of this endpoint).
    pub const REPLY_SEEN: u32 = 1 << 2;
    /// FIN or RST seen: short lifetime.
    pub const CLOSING: u32 = 1 << 3;
    /// Passed only because of audit mode.
    pub const AUDIT: u32 = 1 << 4;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    pub created_ns: u64,
    /// `bpf_ktime_get_ns` of the last packet, refreshed at most every [`CT_REFRESH_NS`].
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
    /// [`ct_flags`] bits.
    pub flags: u32,
    /// Identity of the remote side when the entry was created.
    pub peer_identity: u32,
    pub endpoint_id: u32,
    /// The [`verdict`] that created the entry.
    pub verdict: u8,
    pub _pad: [u8; 3],
    /// Local pod-to-pod flows: the host-side ifindex of the other pod. `from_pod` delivers
    /// this endpoint's packets of the flow straight into that pod (`bpf_redirect_peer`),
    /// skipping the node's routing and the other pod's `to_pod`, so the other pod's ingress
    /// verdict is taken when the flow starts and both pods get an entry then. 0 otherwise.
    pub redirect_ifindex: u32,
    pub _pad2: u32,
}

pub const NS_PER_SEC: u64 = 1_000_000_000;
/// Lifetimes as Cilium's defaults: established TCP 6 h, TCP before a reply 60 s, non-TCP 60 s,
/// closing TCP 10 s.
pub const CT_LIFETIME_TCP_NS: u64 = 21_600 * NS_PER_SEC;
pub const CT_LIFETIME_SYN_NS: u64 = 60 * NS_PER_SEC;
pub const CT_LIFETIME_NONTCP_NS: u64 = 60 * NS_PER_SEC;
pub const CT_LIFETIME_CLOSING_NS: u64 = 10 * NS_PER_SEC;
/// `last_seen_ns` is rewritten at most this often, to keep the cache line clean.
pub const CT_REFRESH_NS: u64 = NS_PER_SEC;

/// How long an entry with `flags` for `protocol` lives after its last packet.
#[inline(always)]
pub const fn ct_lifetime_ns(protocol: u8, flags: u32) -> u64 {
    if protocol != IPPROTO_TCP {
        CT_LIFETIME_NONTCP_NS
    } else if flags & ct_flags::CLOSING != 0 {
        CT_LIFETIME_CLOSING_NS
    } else if flags & ct_flags::REPLY_SEEN != 0 {
        CT_LIFETIME_TCP_NS
    } else {
        CT_LIFETIME_SYN_NS
    }
}

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

// === drop reasons and flow events ===

/// Why a packet was dropped (or, with audit, would have been). A closed list: numbers are
/// never renumbered or reused; a retired reason stays as a gap. Shown by name everywhere
/// (`DropReason::name`). Keep in step with `agent/src/observe` (metrics labels).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    None = 0,
    /// The endpoint is isolated in this direction and no rule allows the flow.
    PolicyDenied = 1,
    /// A deny rule matched.
    PolicyDenyRule = 2,
    AuthRequired = 3,
    Unencrypted = 4,
    /// The interface carries no known endpoint (fail closed).
    UnknownEndpoint = 5,
    /// The packet could not be parsed.
    Malformed = 6,
    CtInvalid = 7,
    /// The flow needs the L7 filter, which is not running.
    L7Unavailable = 8,
}

impl DropReason {
    pub const MAX: u8 = 8;

    pub const fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0 => Self::None,
            1 => Self::PolicyDenied,
            2 => Self::PolicyDenyRule,
            3 => Self::AuthRequired,
            4 => Self::Unencrypted,
            5 => Self::UnknownEndpoint,
            6 => Self::Malformed,
            7 => Self::CtInvalid,
            8 => Self::L7Unavailable,
            _ => return None,
        })
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::PolicyDenied => "policy-denied",
            Self::PolicyDenyRule => "policy-deny-rule",
            Self::AuthRequired => "auth-required",
            Self::Unencrypted => "unencrypted",
            Self::UnknownEndpoint => "unknown-endpoint",
            Self::Malformed => "malformed",
            Self::CtInvalid => "ct-invalid",
            Self::L7Unavailable => "l7-unavailable",
        }
    }
}

/// What happened to a flow, as reported in a [`FlowEvent`].
pub mod flow_verdict {
    pub const FORWARDED: u8 = 1;
    pub const DROPPED: u8 = 2;
    /// Would have been dropped, passed because of audit mode.
    pub const AUDIT: u8 = 3;
}

/// A record in the `events` ring buffer: emitted for the first packet of a flow (conntrack
/// miss) and for every drop, never for packets of established flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEvent {
    pub timestamp_ns: u64,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    /// Ports in host byte order; for ICMP, `src_port` is the echo id and `dst_port` is
    /// `type << 8 | code`.
    pub src_port: u16,
    pub dst_port: u16,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub endpoint_id: u32,
    pub ifindex: u32,
    pub packet_len: u32,
    pub protocol: u8,
    /// [`direction`] relative to the endpoint.
    pub direction: u8,
    /// [`flow_verdict`].
    pub verdict: u8,
    /// [`DropReason`] as u8 (also set for audit).
    pub drop_reason: u8,
    /// 4 for IPv4, 6 for IPv6.
    pub ip_version: u8,
    pub tcp_flags: u8,
    pub _pad: [u8; 2],
}

/// Index into the per-CPU `metrics` array: one slot per (drop reason, direction); reason 0
/// (`None`) counts forwarded packets. Audited would-be drops count under their reason in
/// the slots after [`METRICS_AUDIT_BASE`].
#[inline(always)]
pub const fn metrics_index(reason: u8, direction: u8, audit: bool) -> u32 {
    let base = if audit { METRICS_AUDIT_BASE } else { 0 };
    base + (reason as u32) * 2 + (direction as u32 & 1)
}
pub const METRICS_AUDIT_BASE: u32 = 32;
pub const METRICS_ENTRIES: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MetricValue {
    pub packets: u64,
    pub bytes: u64,
}

// === layout checks: same sizes on both sides ===
const _: () = {
    assert!(core::mem::size_of::<EndpointInfo>() == 16);
    assert!(core::mem::size_of::<IpcacheKey>() == 16);
    assert!(core::mem::size_of::<IpcacheEntry>() == 16);
    assert!(core::mem::size_of::<PolicyKey>() == 12);
    assert!(core::mem::size_of::<PolicyEntry>() == 4);
    assert!(core::mem::size_of::<CtKey>() == 40);
    assert!(core::mem::size_of::<CtEntry>() == 56);
    assert!(core::mem::size_of::<FlowEvent>() == 72);
    assert!(core::mem::size_of::<MetricValue>() == 16);
    assert!((METRICS_AUDIT_BASE as usize) >= (DropReason::MAX as usize + 1) * 2);
    assert!(METRICS_ENTRIES >= METRICS_AUDIT_BASE as usize * 2);
};

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all types are repr(C), Copy, with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for IpcacheKey {}
    unsafe impl aya::Pod for IpcacheEntry {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyEntry {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl aya::Pod for MetricValue {}
}
