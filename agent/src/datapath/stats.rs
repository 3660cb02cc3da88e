//! Datapath counters from user space, on a map handle of its own (opened from the pin), so
//! that `weft status` and metrics read them without the controller.

use std::path::Path;

use anyhow::Context;
use aya::maps::{MapData, PerCpuArray};
use weft_common::{
    DropReason, METRICS_AUDIT_BASE, METRICS_ENTRIES, METRICS_GLOBAL_BASE, MetricValue, metrics_slot,
};
use weft_policy::Direction;

use super::events::FlowVerdict;

pub struct StatsHandle {
    metrics: PerCpuArray<MapData, MetricValue>,
}

/// Packets and bytes of one (direction, verdict, reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerdictCount {
    pub direction: Direction,
    pub verdict: FlowVerdict,
    pub reason: Option<DropReason>,
    pub packets: u64,
    pub bytes: u64,
}

/// Every counter of the datapath, summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub verdicts: Vec<VerdictCount>,
    /// Flow events lost because the ring buffer was full.
    pub events_lost: u64,
    /// Drop events held back by the per-flow rate limit.
    pub events_rate_limited: u64,
    /// Established flows checked again after a policy change, and those revoked.
    pub ct_revalidated: u64,
    pub ct_revoked: u64,
    /// ICMP errors passed as part of a known flow.
    pub icmp_related: u64,
    /// Conntrack entries the datapath created and removed.
    pub ct_created: u64,
    pub ct_removed: u64,
    /// Same-node sockets put on the socket path, messages (and bytes) redirected, and
    /// connection sides sent back to the normal path.
    pub sock_redirect_sockets: u64,
    pub sock_redirect_msgs: u64,
    pub sock_redirect_bytes: u64,
    pub sock_redirect_fallbacks: u64,
}

impl StatsHandle {
    /// # Errors
    /// When the pinned map cannot be opened.
    pub fn open(pin: &Path) -> anyhow::Result<Self> {
        let data = MapData::from_pin(pin)
            .with_context(|| format!("opening the metrics map at {}", pin.display()))?;
        let metrics = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
            .context("the pinned metrics map has another layout")?;
        Ok(Self { metrics })
    }

    /// # Errors
    /// When the map cannot be read.
    pub fn read(&self) -> anyhow::Result<Counters> {
        let mut out = Counters::default();
        for (index, values) in self.metrics.iter().enumerate() {
            let values = values.context("reading the metrics map")?;
            let mut sum = MetricValue::default();
            for v in values.iter() {
                sum.packets += v.packets;
                sum.bytes += v.bytes;
            }
            if sum.packets == 0 {
                continue;
            }
            let index = u32::try_from(index)?;
            if index >= METRICS_GLOBAL_BASE {
                let slot = match index {
                    metrics_slot::EVENTS_LOST => &mut out.events_lost,
                    metrics_slot::EVENTS_RATE_LIMITED => &mut out.events_rate_limited,
                    metrics_slot::CT_REVALIDATED => &mut out.ct_revalidated,
                    metrics_slot::CT_REVOKED => &mut out.ct_revoked,
                    metrics_slot::ICMP_RELATED => &mut out.icmp_related,
                    metrics_slot::CT_CREATED => &mut out.ct_created,
                    metrics_slot::CT_REMOVED => &mut out.ct_removed,
                    metrics_slot::SOCK_REDIRECT_SOCKETS => &mut out.sock_redirect_sockets,
                    metrics_slot::SOCK_REDIRECT_FALLBACK => &mut out.sock_redirect_fallbacks,
                    metrics_slot::SOCK_REDIRECT_MSGS => {
                        out.sock_redirect_bytes = sum.bytes;
                        &mut out.sock_redirect_msgs
                    }
                    _ => continue,
                };
                *slot = sum.packets;
                continue;
            }
            let audit = index >= METRICS_AUDIT_BASE;
            let slot = index % METRICS_AUDIT_BASE;
            let reason = u8::try_from(slot / 2)
                .ok()
                .and_then(DropReason::from_u8)
                .filter(|r| *r != DropReason::None);
            out.verdicts.push(VerdictCount {
                direction: if slot % 2 == 1 {
                    Direction::Ingress
                } else {
                    Direction::Egress
                },
                verdict: match (audit, reason) {
                    (true, _) => FlowVerdict::Audit,
                    (false, None) => FlowVerdict::Forwarded,
                    (false, Some(_)) => FlowVerdict::Dropped,
                },
                reason,
                packets: sum.packets,
                bytes: sum.bytes,
            });
        }
        debug_assert!(METRICS_ENTRIES >= METRICS_GLOBAL_BASE as usize);
        Ok(out)
    }
}
