//! Flow events (ring buffer) and per-CPU counters. Never makes a packet fail: a full ring
//! buffer loses the event, not the packet.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::generated::bpf_ringbuf_query,
};
use weft_common::{EVENTS_RING_BYTES, FlowEvent, MetricValue};

use crate::maps::{EVENTS, METRICS};

/// Adds one packet of `len` bytes to the per-CPU counter at `index`
/// (`weft_common::metrics_index`).
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

/// Sends `event` to the agent. When the ring buffer is full the event is lost; the packet is
/// never dropped for that (its verdict is still counted in `metrics`).
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
    let _ = EVENTS.output(event, u64::from(flags));
}
