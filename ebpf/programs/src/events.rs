//! Flow events (ring buffer) and per-CPU counters. Never makes a packet fail: a full ring
//! buffer loses the event, not the packet, and the loss is counted.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::generated::bpf_ringbuf_query,
};
use weft_common::{
    CtKey, EVENT_LIMIT_INTERVAL_NS, EVENTS_RING_BYTES, EventLimit, FlowEvent, MetricValue,
    metrics_slot,
};

use crate::maps::{EVENT_LIMITS, EVENTS, METRICS};

/// Adds one packet of `len` bytes to the per-CPU counter at `index`
/// (`weft_common::metrics_index`, `weft_common::metrics_slot`).
#[inline(always)]
pub fn count(index: u32, len: u32) {
    if let Some(slot) = METRICS.get_ptr_mut(index) {
        let slot: *mut MetricValue = slot;
        // SAFETY: a per-CPU array slot of this CPU, valid for this program run; no other
        // program run touches it concurrently.
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += u64::from(len);
        }
    }
}

/// Wake the agent only once this much is waiting; it drains the ring on a short timer anyway.
/// A wakeup per event (the default) costs an irq_work self-interrupt per new flow, which is
/// most of what a new connection costs the datapath.
const WAKEUP_THRESHOLD_BYTES: u64 = (EVENTS_RING_BYTES / 8) as u64;

/// Sends `event` to the agent. When the ring buffer is full the event is lost and counted
/// ([`metrics_slot::EVENTS_LOST`]); the packet is never dropped for that.
#[inline(always)]
pub fn emit(event: &FlowEvent) {
    // SAFETY: EVENTS is a ring buffer map; the loader relocates its address.
    let waiting = unsafe {
        bpf_ringbuf_query(
            core::ptr::from_ref(&EVENTS).cast_mut().cast(),
            u64::from(BPF_RB_AVAIL_DATA),
        )
    };
    let flags = if waiting >= WAKEUP_THRESHOLD_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if EVENTS.output(event, u64::from(flags)).is_err() {
        count(metrics_slot::EVENTS_LOST, 0);
    }
}

/// What [`drop_event_allowed`] answers when the event is held back.
pub const HELD_BACK: u32 = u32::MAX;

/// Rate limit of drop events per flow: the number of the flow's events held back since the
/// last one went out when this one may go out too, or [`HELD_BACK`] (counted in
/// [`metrics_slot::EVENTS_RATE_LIMITED`]). Out of line: only drops pay for it.
#[inline(never)]
pub fn drop_event_allowed(key: &CtKey, now: u64) -> u32 {
    if let Some(limit) = EVENT_LIMITS.get_ptr_mut(key) {
        let limit: *mut EventLimit = limit;
        // SAFETY: a value pointer from bpf_map_lookup_elem, valid for this program run; a
        // lost update from another CPU only misses one count.
        unsafe {
            if now.saturating_sub((*limit).last_ns) < EVENT_LIMIT_INTERVAL_NS {
                (*limit).suppressed += 1;
                count(metrics_slot::EVENTS_RATE_LIMITED, 0);
                return HELD_BACK;
            }
            let held_back = (*limit).suppressed;
            (*limit).last_ns = now;
            (*limit).suppressed = 0;
            return held_back;
        }
    }
    let fresh = EventLimit {
        last_ns: now,
        suppressed: 0,
        _pad: 0,
    };
    let _ = EVENT_LIMITS.insert(key, fresh, 0);
    0
}
