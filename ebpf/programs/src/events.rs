//! Flow events (ring buffer) and per-CPU counters. Never makes a packet fail: a full ring
//! buffer loses the event, not the packet.

use weft_common::{FlowEvent, MetricValue};

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

/// Sends `event` to the agent. When the ring buffer is full the event is lost; the packet is
/// never dropped for that (its verdict is still counted in `metrics`).
#[inline(always)]
pub fn emit(event: &FlowEvent) {
    let _ = EVENTS.output(event, 0);
}
