//! Every map of the tc datapath, as BTF map definitions so that `bpftool map dump` prints
//! field names. Export names are `weft_common::map_names`; the agent pins them by those names.
//! This module owns the definitions only: no logic.

use aya_ebpf::{
    btf_maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    macros::btf_map,
};
use weft_common::{
    CONNTRACK_MAX_ENTRIES, CtEntry, CtKey, EVENTS_RING_BYTES, EndpointInfo, FlowEvent,
    IPCACHE_MAX_ENTRIES, IpcacheEntry, IpcacheKey, MAX_ENDPOINTS, METRICS_ENTRIES, MetricValue,
    POLICY_MAX_ENTRIES, PolicyEntry, PolicyKey,
};

/// Host-side ifindex of a pod's interface -> endpoint.
#[btf_map(name = "endpoints")]
pub static ENDPOINTS: HashMap<u32, EndpointInfo, MAX_ENDPOINTS> = HashMap::new();

/// Remote address (IPv4-mapped for IPv4) -> identity. LPM tries need `BPF_F_NO_PREALLOC`,
/// which is `LpmTrie`'s default flag.
#[btf_map(name = "ipcache")]
pub static IPCACHE: LpmTrie<IpcacheKey, IpcacheEntry, IPCACHE_MAX_ENTRIES> = LpmTrie::new();

/// (endpoint, peer identity, direction, protocol, port prefix) -> verdict.
#[btf_map(name = "policy")]
pub static POLICY: LpmTrie<PolicyKey, PolicyEntry, POLICY_MAX_ENTRIES> = LpmTrie::new();

/// Connections per endpoint; LRU so that a full table evicts the coldest flow instead of
/// refusing new ones.
#[btf_map(name = "conntrack")]
pub static CONNTRACK: LruHashMap<CtKey, CtEntry, CONNTRACK_MAX_ENTRIES> = LruHashMap::new();

/// Flow records for the agent: first packet of each flow and every drop.
#[btf_map(name = "events")]
pub static EVENTS: RingBuf<FlowEvent, EVENTS_RING_BYTES> = RingBuf::new();

/// Per-CPU packet/byte counters, indexed by `weft_common::metrics_index`.
#[btf_map(name = "metrics")]
pub static METRICS: PerCpuArray<MetricValue, METRICS_ENTRIES> = PerCpuArray::new();

/// A key or value built on the stack, 8-byte aligned. The contract types are only 1- (LPM
/// `Key` is packed), 2- or 4-byte aligned, and LLVM splits stores into a less aligned stack
/// slot into narrower ones; the verifier also rejects misaligned stack access outright.
#[repr(C, align(8))]
pub struct Aligned<T>(pub T);
