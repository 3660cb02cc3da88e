//! Every map of the tc datapath, as BTF map definitions so that `bpftool map dump` prints
//! field names. Export names are `weft_common::map_names`; the agent pins them by those names.
//! This module owns the definitions (and the one read-only global) only: no logic.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockHash},
    macros::btf_map,
    maps::lpm_trie::Key,
};
use weft_common::{
    AUTH_MAX_ENTRIES, AuthEntry, AuthKey, CLUSTER_MAX_ENTRIES, CONNTRACK_MAX_ENTRIES, ClusterEntry,
    CtEntry, CtKey, DatapathConfig, EVENT_LIMITS_MAX_ENTRIES, EVENTS_RING_BYTES, EndpointInfo,
    EventLimit, FRAGMENTS_MAX_ENTRIES, FlowEvent, FragEntry, FragKey, IPCACHE_MAX_ENTRIES,
    IpcacheEntry, IpcacheKey, MAX_ENDPOINTS, MAX_NODES, METRICS_ENTRIES, MetricValue, NodeEntry,
    POLICY_MAX_ENTRIES, PolicyEntry, PolicyKey, SOCKHASH_MAX_ENTRIES, config_flags,
};

/// Node-wide settings, one entry (index 0).
#[btf_map(name = "weft_config_v1")]
pub static CONFIG: Array<DatapathConfig, 1> = Array::new();

/// Host-side ifindex of a pod's interface -> endpoint.
#[btf_map(name = "weft_ep_v1")]
pub static ENDPOINTS: HashMap<u32, EndpointInfo, MAX_ENDPOINTS> = HashMap::new();

/// Remote address (IPv4-mapped for IPv4) -> identity. LPM tries need `BPF_F_NO_PREALLOC`,
/// which is `LpmTrie`'s default flag.
#[btf_map(name = "weft_ipc_v1")]
pub static IPCACHE: LpmTrie<IpcacheKey, IpcacheEntry, IPCACHE_MAX_ENTRIES> = LpmTrie::new();

/// The cluster's pod CIDRs -> the node each belongs to (strict encryption, slow path only).
#[btf_map(name = "weft_cluster_v1")]
pub static CLUSTER: LpmTrie<IpcacheKey, ClusterEntry, CLUSTER_MAX_ENTRIES> = LpmTrie::new();

/// Node id -> underlay address and encryption settings.
#[btf_map(name = "weft_nodes_v1")]
pub static NODES: HashMap<u32, NodeEntry, MAX_NODES> = HashMap::new();

/// (endpoint, peer identity, direction, protocol, port prefix) -> verdict.
#[btf_map(name = "weft_policy_v1")]
pub static POLICY: LpmTrie<PolicyKey, PolicyEntry, POLICY_MAX_ENTRIES> = LpmTrie::new();

/// Connections per endpoint; LRU so that a full table evicts the coldest flow instead of
/// refusing new ones.
#[btf_map(name = "weft_ct_v1")]
pub static CONNTRACK: LruHashMap<CtKey, CtEntry, CONNTRACK_MAX_ENTRIES> = LruHashMap::new();

/// First fragment's ports by datagram, for the fragments that carry no L4 header.
#[btf_map(name = "weft_frag_v1")]
pub static FRAGMENTS: LruHashMap<FragKey, FragEntry, FRAGMENTS_MAX_ENTRIES> = LruHashMap::new();

/// When a flow last reported a drop, so that floods are reported once a second.
#[btf_map(name = "weft_evrl_v1")]
pub static EVENT_LIMITS: LruHashMap<CtKey, EventLimit, EVENT_LIMITS_MAX_ENTRIES> =
    LruHashMap::new();

/// Mutual authentication results: (identities, node) -> expiry. Written by the agent.
#[btf_map(name = "weft_auth_v1")]
pub static AUTH: HashMap<AuthKey, AuthEntry, AUTH_MAX_ENTRIES> = HashMap::new();

/// Flow records for the agent: first packet of each flow and drops.
#[btf_map(name = "weft_events_v1")]
pub static EVENTS: RingBuf<FlowEvent, EVENTS_RING_BYTES> = RingBuf::new();

/// Per-CPU packet/byte counters, indexed by `weft_common::metrics_index` and
/// `weft_common::metrics_slot`.
#[btf_map(name = "weft_metrics_v1")]
pub static METRICS: PerCpuArray<MetricValue, METRICS_ENTRIES> = PerCpuArray::new();

/// Same-node TCP sockets whose payload is redirected, keyed by their own conntrack key
/// (local side first): `sockops` inserts them, the kernel removes them on close.
#[btf_map(name = "weft_sock_v1")]
pub static SOCKHASH: SockHash<CtKey, SOCKHASH_MAX_ENTRIES> = SockHash::new();

/// Per-CPU room for the flow event a slow path builds: 80 bytes the stack (512 in all, per
/// call chain) cannot spare. Programs on one CPU never run nested at tc, so one slot is enough.
/// Not pinned: its content lives for one program run.
#[btf_map(name = "weft_scratch")]
pub static SCRATCH: PerCpuArray<FlowEvent, 1> = PerCpuArray::new();

/// Per-CPU room for the flow event of a redirected socket (`sock_ops`' frame cannot hold
/// it under 6.1's stack accounting). Its own slot, not [`SCRATCH`]: `sock_ops` can run in
/// process context, where a tc program may interrupt it on the same CPU.
#[btf_map(name = "weft_sock_scratch")]
pub static SOCK_SCRATCH: PerCpuArray<FlowEvent, 1> = PerCpuArray::new();

/// Per-CPU room for the conntrack entry a new flow writes (64 bytes), as [`SCRATCH`].
#[btf_map(name = "weft_ct_scratch")]
pub static CT_SCRATCH: PerCpuArray<CtEntry, 1> = PerCpuArray::new();

/// Per-CPU room for the `cluster` lookup key of the strict encryption check (its frame sits
/// below the new-flow path's, whose call chain has no stack to spare), as [`SCRATCH`].
#[btf_map(name = "weft_lpm_scratch")]
pub static LPM_SCRATCH: PerCpuArray<Key<IpcacheKey>, 1> = PerCpuArray::new();

/// Set by the agent at load time from its feature probes (`global_names::USE_COARSE_CLOCK`):
/// the verifier sees the frozen value and drops the branch not taken, so a kernel without
/// `bpf_ktime_get_coarse_ns` (5.10) loads the same object.
#[unsafe(no_mangle)]
static WEFT_USE_COARSE_CLOCK: u8 = 1;

/// Whether to read the coarse clock (see [`WEFT_USE_COARSE_CLOCK`]).
#[inline(always)]
pub fn use_coarse_clock() -> bool {
    // SAFETY: a plain read of a static; volatile so that the compiler keeps the load (the
    // value is patched in the object after compilation).
    unsafe { core::ptr::read_volatile(&raw const WEFT_USE_COARSE_CLOCK) != 0 }
}

/// The policy revision in force (0 before the agent wrote the config).
#[inline(always)]
pub fn policy_revision() -> u32 {
    match CONFIG.get(0) {
        Some(c) => c.policy_revision,
        None => 0,
    }
}

/// Under strict encryption, the ifindex packets from other nodes' pods must come in through
/// (0 when there is no device: none may come in); [`STRICT_OFF`] when strict encryption is
/// off. Read only where needed (an array lookup the verifier inlines), so the fast path of
/// same-node flows never pays for it.
#[inline(always)]
pub fn strict_ifindex() -> u32 {
    match CONFIG.get(0) {
        Some(c) if c.flags & config_flags::STRICT_ENCRYPTION != 0 => c.encrypt_ifindex,
        _ => STRICT_OFF,
    }
}

/// [`strict_ifindex`] when strict encryption is off.
pub const STRICT_OFF: u32 = u32::MAX;

/// A key or value built on the stack, 8-byte aligned. The contract types are only 1- (LPM
/// `Key` is packed), 2- or 4-byte aligned, and LLVM splits stores into a less aligned stack
/// slot into narrower ones; the verifier also rejects misaligned stack access outright.
#[repr(C, align(8))]
pub struct Aligned<T>(pub T);
