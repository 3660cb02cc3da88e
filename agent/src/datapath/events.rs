//! Flow events from the datapath's ring buffer, decoded into [`FlowRecord`]s: the rest of
//! the agent never sees a raw `FlowEvent`.

use std::net::IpAddr;

use anyhow::Context;
use aya::maps::{MapData, RingBuf};
use weft_common::{DropReason, FlowEvent, direction, event_notes, flow_verdict};
use weft_policy::Direction;

use super::abi::addr_from_bytes;

/// What happened to a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowVerdict {
    Forwarded,
    Dropped,
    /// Would have been dropped, passed because of audit mode.
    Audit,
}

impl FlowVerdict {
    pub fn name(self) -> &'static str {
        match self {
            FlowVerdict::Forwarded => "forwarded",
            FlowVerdict::Dropped => "dropped",
            FlowVerdict::Audit => "audit",
        }
    }
}

/// One flow event, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "each flag is one note of the event, as the datapath sets them"
)]
pub struct FlowRecord {
    /// Monotonic time of the packet (the datapath's clock), ns.
    pub monotonic_ns: u64,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Host order; for ICMP the echo id and `type << 8 | code`.
    pub src_port: u16,
    pub dst_port: u16,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub endpoint_id: u32,
    pub ifindex: u32,
    pub packet_len: u32,
    pub protocol: u8,
    /// Relative to the endpoint.
    pub direction: Direction,
    pub verdict: FlowVerdict,
    /// Why it was (or would have been) dropped; `None` when allowed.
    pub drop_reason: Option<DropReason>,
    pub tcp_flags: u8,
    pub related: bool,
    pub revoked: bool,
    pub fragment: bool,
    /// A same-node TCP socket put on the socket path (its payload skips the veths).
    pub redirected: bool,
    /// Drop events of this flow the datapath held back since the previous one.
    pub suppressed: u32,
    /// The remote side's node (datapath node id), 0 for none.
    pub remote_node_id: u16,
}

/// Decode one ring-buffer record; `None` for a record that is not a `FlowEvent` (shorter,
/// or with a verdict this agent does not know).
pub fn decode(bytes: &[u8]) -> Option<FlowRecord> {
    if bytes.len() < std::mem::size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: the record is at least one FlowEvent long; FlowEvent is plain data for which
    // every bit pattern is valid; read_unaligned makes no alignment claim.
    let e = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<FlowEvent>()) };
    let verdict = match e.verdict {
        flow_verdict::FORWARDED => FlowVerdict::Forwarded,
        flow_verdict::DROPPED => FlowVerdict::Dropped,
        flow_verdict::AUDIT => FlowVerdict::Audit,
        _ => return None,
    };
    Some(FlowRecord {
        monotonic_ns: e.timestamp_ns,
        src: addr_from_bytes(e.src_addr),
        dst: addr_from_bytes(e.dst_addr),
        src_port: e.src_port,
        dst_port: e.dst_port,
        src_identity: e.src_identity,
        dst_identity: e.dst_identity,
        endpoint_id: e.endpoint_id,
        ifindex: e.ifindex,
        packet_len: e.packet_len,
        protocol: e.protocol,
        direction: if e.direction == direction::INGRESS {
            Direction::Ingress
        } else {
            Direction::Egress
        },
        verdict,
        drop_reason: DropReason::from_u8(e.drop_reason).filter(|r| *r != DropReason::None),
        tcp_flags: e.tcp_flags,
        related: e.notes & event_notes::RELATED != 0,
        revoked: e.notes & event_notes::REVOKED != 0,
        fragment: e.notes & event_notes::FRAGMENT != 0,
        redirected: e.notes & event_notes::SOCK_REDIRECT != 0,
        suppressed: e.suppressed,
        remote_node_id: e.remote_node_id,
    })
}

/// How often the agent drains the event ring: the programs skip the wakeup per event (it is
/// the main cost of a new flow in the datapath) and only wake us when the ring fills up.
const EVENTS_DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// Read flow events from the ring buffer until the task is dropped, handing each to `sink`.
///
/// # Errors
/// When the ring buffer cannot be watched.
pub async fn read_events(
    ring: RingBuf<MapData>,
    mut sink: impl FnMut(FlowRecord),
) -> anyhow::Result<()> {
    // SAFETY: the AsyncFd owns the ring buffer and with it the fd, so the fd stays open and
    // cannot be reused for anything else while it is registered.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    }
    .context("watching the events ring buffer")?;
    loop {
        if let Ok(guard) = tokio::time::timeout(EVENTS_DRAIN_INTERVAL, fd.readable_mut()).await {
            let mut guard = guard?;
            drain(guard.get_inner_mut(), &mut sink);
            guard.clear_ready();
        } else {
            drain(fd.get_mut(), &mut sink);
        }
    }
}

fn drain(ring: &mut RingBuf<MapData>, sink: &mut impl FnMut(FlowRecord)) {
    while let Some(item) = ring.next() {
        if let Some(record) = decode(&item) {
            sink(record);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_event_decodes_with_names_for_every_field() {
        let raw = FlowEvent {
            timestamp_ns: 7,
            src_addr: super::super::abi::addr_bytes("100.64.1.2".parse().unwrap()),
            dst_addr: super::super::abi::addr_bytes("fd00::3".parse().unwrap()),
            src_port: 40000,
            dst_port: 8080,
            src_identity: 300,
            dst_identity: 301,
            endpoint_id: 2,
            ifindex: 9,
            packet_len: 60,
            suppressed: 5,
            protocol: 6,
            direction: direction::INGRESS,
            verdict: flow_verdict::DROPPED,
            drop_reason: DropReason::PolicyDenied as u8,
            ip_version: 4,
            tcp_flags: 0x02,
            notes: event_notes::REVOKED,
            ..FlowEvent::default()
        };
        // SAFETY: FlowEvent is plain data; viewing it as bytes is always valid.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&raw const raw).cast::<u8>(),
                std::mem::size_of::<FlowEvent>(),
            )
        };
        let r = decode(bytes).expect("decodes");
        assert_eq!(r.src, "100.64.1.2".parse::<IpAddr>().unwrap());
        assert_eq!(r.direction, Direction::Ingress);
        assert_eq!(r.verdict, FlowVerdict::Dropped);
        assert_eq!(r.drop_reason, Some(DropReason::PolicyDenied));
        assert!(r.revoked && !r.related);
        assert_eq!(r.suppressed, 5);
        assert_eq!(decode(&bytes[..10]), None, "short records are skipped");
    }
}
