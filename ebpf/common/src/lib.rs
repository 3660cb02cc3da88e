//! Types shared by the eBPF programs and the agent's datapath module: map keys and values,
//! flow events, drop reasons and the numbers both sides must agree on. This is weft's kernel
//! ABI, version 1.
//!
//! Every struct here is `#[repr(C)]` with explicit padding so that its layout is the same for
//! `bpfel-unknown-none` and x86_64; the asserts at the bottom pin every field's offset, not
//! only the sizes. The agent adopts pinned maps across restarts, so a changed layout needs a
//! new map name: pinned names carry a version (`weft_policy_v1`), and a `_v2` map would live
//! beside a `_v1` one while an upgrade migrates. Numbers of `DropReason`, verdicts and flags
//! are never reused; a retired number stays a gap.
//!
//! In user space only the agent's `datapath` module uses this crate.
#![no_std]

// === names and sizes ===

/// Names of the pinned maps (bpffs file names under the node's pin directory, and the maps'
/// kernel names, so at most 15 characters).
pub mod map_names {
    pub const ENDPOINTS: &str = "weft_ep_v1";
    pub const IPCACHE: &str = "weft_ipc_v1";
    pub const NODES: &str = "weft_nodes_v1";
    pub const POLICY: &str = "weft_policy_v1";
    pub const CONNTRACK: &str = "weft_ct_v1";
    pub const FRAGMENTS: &str = "weft_frag_v1";
    pub const EVENT_LIMITS: &str = "weft_evrl_v1";
    pub const AUTH: &str = "weft_auth_v1";
    pub const CONFIG: &str = "weft_config_v1";
    pub const EVENTS: &str = "weft_events_v1";
    pub const METRICS: &str = "weft_metrics_v1";
    /// The cluster's pod CIDRs (which node each belongs to), for strict encryption.
    pub const CLUSTER: &str = "weft_cluster_v1";
    /// Same-node TCP sockets whose payload is redirected (sock_ops inserts, sk_msg reads),
    /// keyed by the socket's own [`super::CtKey`] (local side first).
    pub const SOCKHASH: &str = "weft_sock_v1";
    pub const ALL: [&str; 13] = [
        ENDPOINTS,
        IPCACHE,
        NODES,
        POLICY,
        CONNTRACK,
        FRAGMENTS,
        EVENT_LIMITS,
        AUTH,
        CONFIG,
        EVENTS,
        METRICS,
        CLUSTER,
        SOCKHASH,
    ];
}

/// Names of the programs in the object file.
pub mod program_names {
    /// tc ingress of the pod's host-side veth: packets leaving the pod.
    pub const FROM_POD: &str = "from_pod";
    /// tc egress of the pod's host-side veth: packets entering the pod.
    pub const TO_POD: &str = "to_pod";
    /// cgroup v2 sock_ops of the node's pods: puts established same-node TCP sockets whose
    /// flow is plainly allowed into [`super::map_names::SOCKHASH`].
    pub const SOCK_OPS: &str = "weft_sock_ops";
    /// sk_msg verdict of that map: redirects each message to the peer socket.
    pub const SK_MSG: &str = "weft_sk_msg";
}

/// Names of the read-only globals the agent sets when it loads the programs.
pub mod global_names {
    /// Non-zero: take time from `bpf_ktime_get_coarse_ns` (5.11); zero: `bpf_ktime_get_ns`.
    pub const USE_COARSE_CLOCK: &str = "WEFT_USE_COARSE_CLOCK";
}

pub const MAX_ENDPOINTS: usize = 4096;
pub const IPCACHE_MAX_ENTRIES: usize = 65536;
pub const MAX_NODES: usize = 1024;
pub const POLICY_MAX_ENTRIES: usize = 262_144;
pub const CONNTRACK_MAX_ENTRIES: usize = 262_144;
pub const FRAGMENTS_MAX_ENTRIES: usize = 8192;
pub const EVENT_LIMITS_MAX_ENTRIES: usize = 8192;
pub const AUTH_MAX_ENTRIES: usize = 16384;
pub const CLUSTER_MAX_ENTRIES: usize = 4096;
pub const EVENTS_RING_BYTES: usize = 1 << 22;
pub const SOCKHASH_MAX_ENTRIES: usize = 65536;

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

// === config: one entry, the node-wide settings the programs read per packet ===

pub mod config_flags {
    /// Pod traffic to or from another node that did not go through the encryption device is
    /// dropped (`unencrypted`).
    pub const STRICT_ENCRYPTION: u32 = 1 << 0;
    /// The node's L7 filter is configured and running; without it `redirect-l7` fails closed.
    pub const L7_READY: u32 = 1 << 1;
    /// Same-node TCP payload may be redirected between sockets (sock_ops/sk_msg).
    pub const SOCKET_REDIRECT: u32 = 1 << 2;
}

/// Value of the one-entry `config` array. An array lookup with a constant key is inlined by
/// the verifier into a few instructions: it costs the fast path a load, not a helper call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DatapathConfig {
    /// Bumped by the agent after every change of the policy, ipcache or endpoint maps.
    /// Conntrack entries remember the revision their flow was last checked against; a flow
    /// that meets a newer revision is checked again once, so revoked access stops
    /// established connections too.
    pub policy_revision: u32,
    /// [`config_flags`] bits.
    pub flags: u32,
    /// This node's id in the `nodes` map.
    pub local_node_id: u16,
    pub _pad: u16,
    /// ifindex of this node's encryption device (`weft_wg0`), 0 for none. With
    /// [`config_flags::STRICT_ENCRYPTION`], pod traffic from another node's pods must have
    /// come in through it (`__sk_buff.ingress_ifindex`), or it is dropped.
    pub encrypt_ifindex: u32,
    /// Room for settings of later features without a new map version.
    pub _reserved: [u32; 4],
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

pub mod ipcache_flags {
    /// A pod of this node (`ifindex` is its host-side interface).
    pub const LOCAL_POD: u8 = 1 << 0;
    /// A pod of another node (`node_id` says which).
    pub const REMOTE_POD: u8 = 1 << 1;
    /// An address of a node (this one: identity host; others: remote-node).
    pub const NODE: u8 = 1 << 2;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IpcacheEntry {
    pub identity: u32,
    /// The node hosting this prefix (key of the `nodes` map); 0 when local or not a pod.
    pub node_id: u16,
    /// [`ipcache_flags`] bits.
    pub flags: u8,
    pub _pad: u8,
    /// For a pod on this node: the ifindex of its host-side interface, which `from_pod`
    /// delivers local pod-to-pod traffic to directly; 0 otherwise.
    pub ifindex: u32,
    pub _reserved: u32,
}

// === cluster: the cluster's pod CIDRs -> which node ===

pub mod cluster_flags {
    /// A pod CIDR of this node.
    pub const LOCAL: u16 = 1 << 0;
}

/// Value of the `cluster` LPM trie (keyed like the ipcache): a pod CIDR of the cluster and
/// the node it belongs to. A configured cluster-wide range no node has claimed has node id 0
/// and no flags: under strict encryption, traffic to or from it is dropped (`unencrypted`),
/// since no peer carries it. Read only under strict encryption, and only on the slow path.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ClusterEntry {
    /// Key of the `nodes` map; 0 for this node or for no known node.
    pub node_id: u16,
    /// [`cluster_flags`] bits.
    pub flags: u16,
    pub _reserved: u32,
}

// === nodes: node id -> how to reach it ===

pub mod node_flags {
    /// Traffic to this node's pods goes through the encryption device: the node is a peer of
    /// the device with its key, and the routes to its pod CIDRs point into the device. Under
    /// strict encryption, pod traffic to a node without it is dropped (`unencrypted`).
    pub const ENCRYPT: u32 = 1 << 0;
}

/// Value of the `nodes` hash, keyed by the node id (u32) that ipcache entries carry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeEntry {
    /// Underlay address (IPv4-mapped for IPv4).
    pub underlay_addr: [u8; 16],
    /// [`node_flags`] bits.
    pub flags: u32,
    /// ifindex of this node's encryption device carrying traffic to it; 0 for none.
    pub encrypt_ifindex: u32,
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
    /// No verdict (only in `audit_verdict`: the audit policies have no opinion).
    pub const NONE: u8 = 0;
    pub const ALLOW: u8 = 1;
    /// Denied by a deny rule (or default deny, which has no entry).
    pub const DENY: u8 = 2;
    /// A deny rule of an audit-mode policy: reported as would-be drop, passed.
    pub const AUDIT_DENY: u8 = 3;
    /// Allowed at L4, payload must go through the node's L7 filter (`proxy_port`).
    pub const REDIRECT_L7: u8 = 4;
    /// Allowed once the `auth` map holds a fresh entry for the identity pair.
    pub const REQUIRE_AUTH: u8 = 5;
    /// Denied as if no entry matched (`policy-denied`): a key that exists to carry an
    /// `audit_verdict` in an enforcing direction.
    pub const DEFAULT_DENY: u8 = 6;
}

pub mod auth_type {
    pub const NONE: u8 = 0;
    /// SPIFFE mutual TLS between the two identities' agents.
    pub const SPIFFE_MTLS: u8 = 1;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct PolicyEntry {
    /// One of [`verdict`]: what is enforced.
    pub verdict: u8,
    /// What audit-mode policies on the same endpoint and direction would decide, reported
    /// beside the enforced verdict and never enforced; [`verdict::NONE`] when they have no
    /// opinion.
    pub audit_verdict: u8,
    /// One of [`auth_type`]: the authentication the flow needs before it passes.
    pub auth_type: u8,
    pub flags: u8,
    /// L7 filter port (host order) for [`verdict::REDIRECT_L7`], else 0.
    pub proxy_port: u16,
    pub _pad: u16,
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
    /// The flow goes through the node's L7 filter (`proxy_port`).
    pub const PROXY_REDIRECT: u32 = 1 << 5;
    /// Mutual authentication for the identity pair succeeded.
    pub const AUTH_OK: u32 = 1 << 6;
    /// Payload is redirected between local sockets (sock_ops/sk_msg).
    pub const SOCK_REDIRECT: u32 = 1 << 7;
    /// Policy no longer allows the flow: every packet of it is dropped, in both directions,
    /// until a newer policy allows it again. The entry stays (rather than going) so that a
    /// revoked TCP connection cannot come back as a "new" flow from its other end.
    pub const REVOKED: u32 = 1 << 8;
    /// A flow with a pod of another node under strict encryption: every packet of it that
    /// enters the pod must have come in through the encryption device (checked on the fast
    /// path too, so plaintext cannot join an established flow).
    pub const ENCRYPTED: u32 = 1 << 9;
    /// This endpoint's side of a redirected connection went back to the normal path (its
    /// policy revision went stale, or the peer socket was missing): it never comes back to
    /// the socket path, so that bytes sent both ways can never be reordered.
    pub const SOCK_FALLBACK: u32 = 1 << 10;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    pub created_ns: u64,
    /// Time of the last packet, refreshed at most every [`CT_REFRESH_NS`].
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
    /// [`ct_flags`] bits.
    pub flags: u32,
    /// Identity of the remote side when the flow was last checked.
    pub peer_identity: u32,
    pub endpoint_id: u32,
    /// [`DatapathConfig::policy_revision`] the flow was last checked against.
    pub revision: u32,
    /// Local pod-to-pod flows: the host-side ifindex of the other pod. `from_pod` delivers
    /// this endpoint's packets of the flow straight into that pod (`bpf_redirect_peer`),
    /// skipping the node's routing and the other pod's `to_pod`, so the other pod's ingress
    /// verdict is taken when the flow starts (and when it is checked again) and both pods get
    /// an entry then. 0 otherwise.
    pub redirect_ifindex: u32,
    /// The policy port of the packet that opened the flow (network order; `[type, code]` for
    /// ICMP), to check the flow again against a newer policy.
    pub policy_port: u16,
    /// L7 filter port for [`ct_flags::PROXY_REDIRECT`] flows.
    pub proxy_port: u16,
    /// The [`verdict`] that let the flow pass.
    pub verdict: u8,
    /// [`ct_flags::REVOKED`] flows: the [`DropReason`] of the check that revoked it, so
    /// every later packet is reported with it.
    pub revoked_reason: u8,
    pub _pad: [u8; 6],
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

/// How long an entry with `flags` for `protocol` lives after its last packet. A revoked TCP
/// connection is remembered as long as an established one, so that its retransmissions never
/// outlive the tombstone.
#[inline(always)]
pub const fn ct_lifetime_ns(protocol: u8, flags: u32) -> u64 {
    if protocol == IPPROTO_TCP && flags & ct_flags::REVOKED != 0 && flags & ct_flags::CLOSING == 0 {
        CT_LIFETIME_TCP_NS
    } else if protocol != IPPROTO_TCP {
        CT_LIFETIME_NONTCP_NS
    } else if flags & ct_flags::CLOSING != 0 {
        CT_LIFETIME_CLOSING_NS
    } else if flags & ct_flags::REPLY_SEEN != 0 {
        CT_LIFETIME_TCP_NS
    } else {
        CT_LIFETIME_SYN_NS
    }
}

// === fragments: the ports of a fragmented datagram, from its first fragment ===

/// Key of the `fragments` LRU: the datagram (addresses as the packet carries them, IP
/// identification, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct FragKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    /// IPv4 identification (16 bits) or the IPv6 Fragment header's identification (32).
    pub id: u32,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct FragEntry {
    /// Ports of the first fragment, network byte order (ICMP: the echo id in both).
    pub sport: u16,
    pub dport: u16,
    /// Its policy port (network order; `[type, code]` for ICMP).
    pub policy_port: u16,
    pub _pad: u16,
}

// === flow event rate limit: a drop flood is reported once per flow and second ===

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EventLimit {
    pub last_ns: u64,
    /// Events held back since `last_ns`.
    pub suppressed: u32,
    pub _pad: u32,
}

/// At most one drop event per flow in this interval.
pub const EVENT_LIMIT_INTERVAL_NS: u64 = NS_PER_SEC;

// === auth: (identities, node) -> expiry ===

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct AuthKey {
    pub local_identity: u32,
    pub remote_identity: u32,
    pub remote_node_id: u16,
    pub auth_type: u8,
    pub _pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AuthEntry {
    /// Monotonic time after which the authentication must be done again.
    pub expires_ns: u64,
}

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;

/// Packet marks between the datapath, the node's routing and the L7 filter.
pub mod l7_mark {
    /// Set by `from_pod` on a packet it hands to a socket of the L7 filter
    /// (`bpf_sk_assign`): the agent's rule for it routes such packets to [`ROUTE_TABLE`],
    /// whose local default route delivers them to that socket whatever their destination.
    pub const TO_PROXY: u32 = 0x0a70_0200;
    /// Set by the L7 filter (`SO_MARK`) on its upstream connections: `to_pod` lets them pass
    /// a `redirect-l7` entry (the filter has decided), and steers their replies back to it.
    /// Pods cannot forge it: a mark does not survive leaving a pod's namespace.
    pub const FROM_PROXY: u32 = 0x0a70_0300;
    /// The routing table of [`TO_PROXY`] packets (`local 0.0.0.0/0 dev lo`).
    pub const ROUTE_TABLE: u32 = 2004;
    /// Priority of the rule that selects it (before the main table's 32766).
    pub const RULE_PRIORITY: u32 = 2004;
}
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

// === drop reasons and flow events ===

/// Why a packet was dropped (or, with audit, would have been). A closed list: numbers are
/// never renumbered or reused; a retired reason stays as a gap. Shown by name everywhere
/// (`DropReason::name`); the agent's metrics labels and `weft observe` use these names.
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
    /// A non-first fragment whose first fragment was not seen (or was dropped).
    FragmentUnknown = 9,
    /// A packet leaving a pod with a source address that is not the pod's.
    SpoofedSource = 10,
}

impl DropReason {
    pub const MAX: u8 = 10;

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
            9 => Self::FragmentUnknown,
            10 => Self::SpoofedSource,
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
            Self::FragmentUnknown => "fragment-unknown",
            Self::SpoofedSource => "spoofed-source",
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

/// Extra facts about an event's packet ([`FlowEvent::notes`] bits).
pub mod event_notes {
    /// An ICMP error quoting a packet of a known flow (passed as part of that flow).
    pub const RELATED: u8 = 1 << 0;
    /// An established flow checked again against a newer policy and no longer allowed.
    pub const REVOKED: u8 = 1 << 1;
    /// A fragment of a datagram.
    pub const FRAGMENT: u8 = 1 << 2;
    /// An established same-node TCP socket whose payload is redirected socket to socket
    /// (sock_ops): its packets no longer cross the veth.
    pub const SOCK_REDIRECT: u8 = 1 << 3;
}

/// A record in the `events` ring buffer: emitted for the first packet of a flow (conntrack
/// miss), for every drop (at most one per flow and [`EVENT_LIMIT_INTERVAL_NS`]), never for
/// packets of established flows.
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
    /// Drop events of this flow held back since the previous one.
    pub suppressed: u32,
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
    /// [`event_notes`] bits.
    pub notes: u8,
    pub _pad: u8,
    /// The remote side's node (`nodes` key), 0 for this node or outside the cluster.
    pub remote_node_id: u16,
    pub _pad2: u16,
}

/// Index into the per-CPU `metrics` array: one slot per (drop reason, direction); reason 0
/// (`None`) counts forwarded packets. Audited would-be drops count under their reason in
/// the slots after [`METRICS_AUDIT_BASE`]; datapath-wide counters follow from
/// [`METRICS_GLOBAL_BASE`].
#[inline(always)]
pub const fn metrics_index(reason: u8, direction: u8, audit: bool) -> u32 {
    let base = if audit { METRICS_AUDIT_BASE } else { 0 };
    base + (reason as u32) * 2 + (direction as u32 & 1)
}
pub const METRICS_AUDIT_BASE: u32 = 32;
pub const METRICS_GLOBAL_BASE: u32 = 64;

/// Datapath-wide counters (slots from [`METRICS_GLOBAL_BASE`]; `packets` counts events).
pub mod metrics_slot {
    use super::METRICS_GLOBAL_BASE;
    /// Flow events lost because the ring buffer was full.
    pub const EVENTS_LOST: u32 = METRICS_GLOBAL_BASE;
    /// Drop events held back by the per-flow rate limit.
    pub const EVENTS_RATE_LIMITED: u32 = METRICS_GLOBAL_BASE + 1;
    /// Established flows checked again after a policy change.
    pub const CT_REVALIDATED: u32 = METRICS_GLOBAL_BASE + 2;
    /// Established flows a newer policy no longer allows.
    pub const CT_REVOKED: u32 = METRICS_GLOBAL_BASE + 3;
    /// ICMP errors passed because they belong to a known flow.
    pub const ICMP_RELATED: u32 = METRICS_GLOBAL_BASE + 4;
    /// Conntrack entries the datapath created (a new key, not one written over).
    pub const CT_CREATED: u32 = METRICS_GLOBAL_BASE + 5;
    /// Conntrack entries the datapath removed (their endpoint was gone).
    pub const CT_REMOVED: u32 = METRICS_GLOBAL_BASE + 6;
    /// Sockets sock_ops put into the socket redirect map (two per redirected connection).
    pub const SOCK_REDIRECT_SOCKETS: u32 = METRICS_GLOBAL_BASE + 7;
    /// Messages (and bytes) sk_msg redirected to the peer socket.
    pub const SOCK_REDIRECT_MSGS: u32 = METRICS_GLOBAL_BASE + 8;
    /// Redirected connection sides sent back to the normal path for good.
    pub const SOCK_REDIRECT_FALLBACK: u32 = METRICS_GLOBAL_BASE + 9;
}
pub const METRICS_ENTRIES: usize = 80;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MetricValue {
    pub packets: u64,
    pub bytes: u64,
}

// === layout checks: every field at the same offset on both sides ===
macro_rules! assert_layout {
    ($ty:ty, $size:expr, { $($field:ident : $offset:expr),* $(,)? }) => {
        const _: () = {
            assert!(core::mem::size_of::<$ty>() == $size);
            $(assert!(core::mem::offset_of!($ty, $field) == $offset);)*
        };
    };
}

assert_layout!(DatapathConfig, 32, {
    policy_revision: 0, flags: 4, local_node_id: 8, _pad: 10, encrypt_ifindex: 12,
    _reserved: 16,
});
assert_layout!(ClusterEntry, 8, { node_id: 0, flags: 2, _reserved: 4 });
assert_layout!(EndpointInfo, 16, { endpoint_id: 0, identity: 4, flags: 8, _pad: 12 });
assert_layout!(IpcacheKey, 16, { addr: 0 });
assert_layout!(IpcacheEntry, 16, {
    identity: 0, node_id: 4, flags: 6, _pad: 7, ifindex: 8, _reserved: 12,
});
assert_layout!(NodeEntry, 24, { underlay_addr: 0, flags: 16, encrypt_ifindex: 20 });
assert_layout!(PolicyKey, 12, {
    endpoint_id: 0, identity: 4, direction: 8, protocol: 9, dport: 10,
});
assert_layout!(PolicyEntry, 8, {
    verdict: 0, audit_verdict: 1, auth_type: 2, flags: 3, proxy_port: 4, _pad: 6,
});
assert_layout!(CtKey, 40, {
    local_addr: 0, remote_addr: 16, local_port: 32, remote_port: 34, protocol: 36, _pad: 37,
});
assert_layout!(CtEntry, 64, {
    created_ns: 0, last_seen_ns: 8, packets: 16, bytes: 24, flags: 32, peer_identity: 36,
    endpoint_id: 40, revision: 44, redirect_ifindex: 48, policy_port: 52, proxy_port: 54,
    verdict: 56, revoked_reason: 57, _pad: 58,
});
assert_layout!(FragKey, 40, { src_addr: 0, dst_addr: 16, id: 32, protocol: 36, _pad: 37 });
assert_layout!(FragEntry, 8, { sport: 0, dport: 2, policy_port: 4, _pad: 6 });
assert_layout!(EventLimit, 16, { last_ns: 0, suppressed: 8, _pad: 12 });
assert_layout!(AuthKey, 12, {
    local_identity: 0, remote_identity: 4, remote_node_id: 8, auth_type: 10, _pad: 11,
});
assert_layout!(AuthEntry, 8, { expires_ns: 0 });
assert_layout!(FlowEvent, 80, {
    timestamp_ns: 0, src_addr: 8, dst_addr: 24, src_port: 40, dst_port: 42,
    src_identity: 44, dst_identity: 48, endpoint_id: 52, ifindex: 56, packet_len: 60,
    suppressed: 64, protocol: 68, direction: 69, verdict: 70, drop_reason: 71,
    ip_version: 72, tcp_flags: 73, notes: 74, _pad: 75, remote_node_id: 76, _pad2: 78,
});
assert_layout!(MetricValue, 16, { packets: 0, bytes: 8 });

const _: () = {
    assert!((METRICS_AUDIT_BASE as usize) >= (DropReason::MAX as usize + 1) * 2);
    assert!(METRICS_GLOBAL_BASE >= METRICS_AUDIT_BASE * 2);
    assert!(METRICS_ENTRIES > metrics_slot::ICMP_RELATED as usize);
    assert!(METRICS_ENTRIES > metrics_slot::SOCK_REDIRECT_FALLBACK as usize);
};

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all types are repr(C), Copy, with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for IpcacheKey {}
    unsafe impl aya::Pod for IpcacheEntry {}
    unsafe impl aya::Pod for NodeEntry {}
    unsafe impl aya::Pod for ClusterEntry {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyEntry {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragEntry {}
    unsafe impl aya::Pod for EventLimit {}
    unsafe impl aya::Pod for AuthKey {}
    unsafe impl aya::Pod for AuthEntry {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl aya::Pod for MetricValue {}
}
