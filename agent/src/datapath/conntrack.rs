//! Conntrack from user space, on a map handle of its own (opened from the pin), so that
//! garbage collection and purges run on their own thread without touching the controller's
//! datapath handle.

use std::path::Path;

use anyhow::Context;
use aya::maps::{HashMap, MapData};
use tracing::debug;
use weft_common::{CtEntry, CtKey, ct_lifetime_ns};

pub struct ConntrackHandle {
    map: HashMap<MapData, CtKey, CtEntry>,
    /// The map's size as the kernel created it (a pinned map keeps its own).
    capacity: usize,
}

/// LRU evictions, which the kernel does not count. Every entry the datapath created is still
/// in the map, or was removed (by garbage collection, a purge or the datapath), or was
/// evicted; so evictions are what the counts leave unexplained, measured from the first
/// look (entries and counts from before this agent started are not attributed).
#[derive(Debug, Default)]
pub struct EvictionLedger {
    baseline: Option<i128>,
    removed_here: u64,
}

impl EvictionLedger {
    /// Entries this agent removed.
    pub fn removed(&mut self, n: usize) {
        self.removed_here += n as u64;
    }

    /// Evictions since the first call, given the datapath's counts and the entries in the
    /// map now. The counts are read apart from the walk, so a handful of flows created in
    /// between can show up late; never negative.
    pub fn evicted(&mut self, created: u64, removed_by_datapath: u64, entries: usize) -> u64 {
        let unexplained = i128::from(created)
            - i128::from(removed_by_datapath)
            - entries as i128
            - i128::from(self.removed_here);
        let baseline = *self.baseline.get_or_insert(unexplained);
        u64::try_from(unexplained - baseline).unwrap_or(0)
    }
}

/// What one garbage collection found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcStats {
    /// Entries before this collection removed any.
    pub seen: usize,
    pub live: usize,
    pub removed: usize,
    pub capacity: usize,
}

impl ConntrackHandle {
    /// # Errors
    /// When the pinned map cannot be opened.
    pub fn open(pin: &Path) -> anyhow::Result<Self> {
        let data = MapData::from_pin(pin)
            .with_context(|| format!("opening the conntrack map at {}", pin.display()))?;
        let capacity = data
            .info()
            .with_context(|| format!("reading the size of {}", pin.display()))?
            .max_entries() as usize;
        let map = HashMap::try_from(aya::maps::Map::LruHashMap(data))
            .context("the pinned conntrack map has another layout")?;
        Ok(Self { map, capacity })
    }

    /// How many entries the map holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Delete expired entries (the LRU evicts the least recently used flows first when it
    /// is full; this keeps it from filling with dead ones).
    ///
    /// A walk of a hash map starts over when the key it stands on is evicted under it, which
    /// a full map under new flows does all the time: the walk is bounded by the capacity, so
    /// it always ends, and what it counts never exceeds what the map can hold.
    pub fn gc(&mut self, now_ns: u64) -> GcStats {
        let mut expired = Vec::new();
        let mut live = 0;
        for item in self.map.iter().take(self.capacity) {
            let (key, entry) = match item {
                Ok(kv) => kv,
                // Entries can vanish (LRU eviction) while we iterate.
                Err(e) => {
                    debug!("conntrack iteration: {e}");
                    continue;
                }
            };
            if now_ns.saturating_sub(entry.last_seen_ns) > ct_lifetime_ns(key.protocol, entry.flags)
            {
                expired.push(key);
            } else {
                live += 1;
            }
        }
        let removed = expired
            .iter()
            .filter(|key| self.map.remove(key).is_ok())
            .count();
        GcStats {
            seen: live + expired.len(),
            live,
            removed,
            capacity: self.capacity,
        }
    }

    /// Forget the connections of a deleted endpoint, and the local flows of other pods that
    /// were delivered to its interface, so that a pod that later gets the same address or
    /// ifindex starts without them.
    pub fn purge_endpoint(&mut self, endpoint_id: u32, ifindex: u32) -> usize {
        // Bounded like `gc`: a walk restarted by evictions revisits entries, twice the
        // capacity is room for that and still ends.
        let doomed: Vec<CtKey> = self
            .map
            .iter()
            .take(2 * self.capacity)
            .filter_map(Result::ok)
            .filter(|(_, entry)| {
                entry.endpoint_id == endpoint_id || entry.redirect_ifindex == ifindex
            })
            .map(|(key, _)| key)
            .collect();
        doomed
            .iter()
            .filter(|key| self.map.remove(key).is_ok())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::EvictionLedger;

    #[test]
    fn evictions_are_what_the_counts_leave_unexplained() {
        let mut ledger = EvictionLedger::default();
        // 100 entries from before this agent: not attributed.
        assert_eq!(ledger.evicted(500, 10, 100), 0);
        // 50 created, 20 collected, still 130 in the map: nothing evicted.
        ledger.removed(20);
        assert_eq!(ledger.evicted(550, 10, 130), 0);
        // 40 more created, 5 removed by the datapath, the map holds 135: 30 were evicted.
        assert_eq!(ledger.evicted(590, 15, 135), 30);
        // A walk that saw more than the counts yet know of reads as none, not negative.
        let mut fresh = EvictionLedger::default();
        fresh.evicted(10, 0, 10);
        assert_eq!(fresh.evicted(10, 0, 12), 0);
    }
}
