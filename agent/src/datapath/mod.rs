//! The datapath: the only module that talks to aya. It loads the embedded eBPF object, pins
//! maps and tc links under the node's bpffs directory, adopts what an earlier agent pinned,
//! writes map contents as diffs against what the maps hold, and hands out the ring buffer.
//!
//! Fail-closed across restarts: maps and tc links are pinned, so when the agent exits the
//! programs stay attached and keep enforcing the last policy. A new agent reuses the pinned
//! maps (their contents untouched), atomically swaps its freshly loaded programs into the
//! pinned links, and then writes only entries that differ from what it wants.
//!
//! Converting policy-core keys into `weft-common` types happens here and nowhere else.

mod attach;
mod convert;
mod features;
mod verifier;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use aya::maps::lpm_trie::Key;
use aya::maps::{HashMap, LpmTrie, MapData, PerCpuArray, RingBuf};
use aya::{Ebpf, EbpfLoader, VerifierLogLevel};
use tracing::{debug, info, warn};
use weft_common::{
    CtEntry, CtKey, EndpointInfo, FlowEvent, IpcacheEntry, IpcacheKey, MetricValue, NS_PER_SEC,
    PolicyEntry, PolicyKey, ct_lifetime_ns, map_names, program_names,
};

pub use attach::AttachMode;
pub use convert::{
    addr_bytes, addr_from_bytes, host_ipcache_key, ipcache_key, policy_entry_row, policy_key,
    policy_value, prefix_to_ipcache, protocol_name,
};
pub use features::{Feature, FeatureKind, FeatureReport, summary as feature_summary};

/// The eBPF object built by `build.rs`, embedded so one binary is all a node needs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("WEFT_EBPF_OBJ"));

pub type RawPolicyKey = (u32, PolicyKey);
pub type RawIpcacheKey = (u32, IpcacheKey);

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    attach_mode: AttachMode,
    features: FeatureReport,
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    ipcache: LpmTrie<MapData, IpcacheKey, IpcacheEntry>,
    policy: LpmTrie<MapData, PolicyKey, PolicyEntry>,
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    metrics: PerCpuArray<MapData, MetricValue>,
    /// What the maps hold, so that writes are diffs (loaded from the pinned maps at start).
    endpoints_now: BTreeMap<u32, EndpointInfo>,
    ipcache_now: BTreeMap<RawIpcacheKey, IpcacheEntry>,
    policy_now: BTreeMap<RawPolicyKey, PolicyEntry>,
}

/// What the datapath sends to user space: flow events and the programs' log records.
pub struct Channels {
    pub events: RingBuf<MapData>,
    pub logger: aya_log::EbpfLogger<&'static dyn log::Log>,
}

/// The full contents the agent wants in the endpoints, ipcache and policy maps.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DesiredMaps {
    pub endpoints: BTreeMap<u32, EndpointInfo>,
    pub ipcache: BTreeMap<RawIpcacheKey, IpcacheEntry>,
    pub policy: BTreeMap<RawPolicyKey, PolicyEntry>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyStats {
    pub endpoints: SyncStats,
    pub ipcache: SyncStats,
    pub policy: SyncStats,
}

/// Counts of one map write.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncStats {
    pub written: usize,
    pub removed: usize,
}

impl Datapath {
    /// Load the programs, creating or adopting the pinned maps under `pin_dir`.
    ///
    /// Refuses, naming what is missing, on a kernel without a feature the datapath uses.
    pub fn load(pin_dir: &Path, verbose: bool) -> anyhow::Result<(Self, Channels)> {
        let attach_mode = AttachMode::detect();
        let mut features = features::probe(attach_mode);
        log_features(&features);
        if let Some(refusal) = features.refusal() {
            bail!("{refusal}");
        }
        ensure_bpffs(pin_dir)?;
        std::fs::create_dir_all(pin_dir.join("links"))
            .with_context(|| format!("creating {}", pin_dir.display()))?;
        let pins: Vec<(&str, PathBuf)> = map_names::ALL
            .iter()
            .map(|name| (*name, pin_dir.join(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        if verbose {
            // DEBUG, not VERBOSE: the full per-instruction log outgrows the kernel's log
            // buffer, and older kernels then report ENOSPC instead of the real error.
            loader.verifier_log_level(VerifierLogLevel::DEBUG | VerifierLogLevel::STATS);
        }
        // aya-log levels: 1 error .. 5 trace. The programs log only on rare paths
        // (unknown endpoint, malformed packet); debug ones only with --verbose.
        let log_level: u8 = if verbose { 5 } else { 3 };
        loader.override_global(aya_log::LEVEL, &log_level, false);
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the weft eBPF object (maps)")?;
        let logger =
            aya_log::EbpfLogger::init(&mut ebpf).context("opening the eBPF log ring buffer")?;
        for name in [program_names::FROM_POD, program_names::TO_POD] {
            attach::load_program(&mut ebpf, name, verbose)?;
        }
        if attach_mode == AttachMode::Netlink {
            // Only a loaded program can show that cls_bpf is there.
            let problem = attach::probe_netlink_attach(&mut ebpf)?;
            let after_clsact = features
                .features
                .iter()
                .position(|f| f.kind == FeatureKind::Attach)
                .map_or(features.features.len(), |at| at + 1);
            features
                .features
                .insert(after_clsact, features::cls_bpf_feature(problem));
            if let Some(refusal) = features.refusal() {
                bail!("{refusal}");
            }
        }
        let endpoints = HashMap::try_from(take_map(&mut ebpf, map_names::ENDPOINTS)?)?;
        let ipcache = LpmTrie::try_from(take_map(&mut ebpf, map_names::IPCACHE)?)?;
        let policy = LpmTrie::try_from(take_map(&mut ebpf, map_names::POLICY)?)?;
        let conntrack = HashMap::try_from(take_map(&mut ebpf, map_names::CONNTRACK)?)?;
        let metrics = PerCpuArray::try_from(take_map(&mut ebpf, map_names::METRICS)?)?;
        let events = RingBuf::try_from(take_map(&mut ebpf, map_names::EVENTS)?)?;

        let mut datapath = Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            attach_mode,
            features,
            endpoints,
            ipcache,
            policy,
            conntrack,
            metrics,
            endpoints_now: BTreeMap::new(),
            ipcache_now: BTreeMap::new(),
            policy_now: BTreeMap::new(),
        };
        datapath.read_back()?;
        info!(
            pin_dir = %pin_dir.display(),
            attach_mode = datapath.attach_mode.name(),
            adopted_endpoints = datapath.endpoints_now.len(),
            adopted_policy_entries = datapath.policy_now.len(),
            "datapath loaded"
        );
        Ok((datapath, Channels { events, logger }))
    }

    /// Fill the mirrors from the maps (after adopting pinned maps, they hold the last policy).
    fn read_back(&mut self) -> anyhow::Result<()> {
        self.endpoints_now = self
            .endpoints
            .iter()
            .collect::<Result<_, _>>()
            .context("reading the endpoints map")?;
        self.ipcache_now = self
            .ipcache
            .iter()
            .map(|r| r.map(|(k, v)| ((k.prefix_len(), k.data()), v)))
            .collect::<Result<_, _>>()
            .context("reading the ipcache map")?;
        self.policy_now = self
            .policy
            .iter()
            .map(|r| r.map(|(k, v)| ((k.prefix_len(), k.data()), v)))
            .collect::<Result<_, _>>()
            .context("reading the policy map")?;
        Ok(())
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn attach_mode(&self) -> AttachMode {
        self.attach_mode
    }

    /// What the kernel offers, as probed at load.
    pub fn features(&self) -> &FeatureReport {
        &self.features
    }

    /// Attach both programs to the pod's host-side interface, replacing whatever program a
    /// previous agent left in the pinned links (atomically, no gap).
    pub fn attach(&mut self, ifname: &str, ifindex: u32) -> anyhow::Result<()> {
        attach::attach_endpoint(
            &mut self.ebpf,
            &self.pin_dir,
            self.attach_mode,
            ifname,
            ifindex,
        )
    }

    /// Detach from an interface (pinned links removed).
    pub fn detach(&mut self, ifname: &str, ifindex: u32) -> anyhow::Result<()> {
        attach::detach_endpoint(&self.pin_dir, self.attach_mode, ifname, ifindex)
    }

    /// Remove pinned links of interfaces that are not in `keep` (left by deleted pods).
    pub fn prune_links(&mut self, keep: &[(String, u32)]) -> anyhow::Result<usize> {
        attach::prune_links(&self.pin_dir, keep)
    }

    /// Bring the endpoints, ipcache and policy maps to `want`, writing only what differs.
    ///
    /// Order matters for never opening a gap: new ipcache and policy entries first, then the
    /// endpoint entries (which switch isolation on or off), then stale policy and ipcache
    /// entries. A policy that isolates an endpoint thus finds its allow entries in place, and
    /// an entry being replaced is overwritten, never deleted and re-added.
    pub fn apply(&mut self, want: &DesiredMaps) -> anyhow::Result<ApplyStats> {
        let ipcache = &mut self.ipcache;
        let policy = &mut self.policy;
        let endpoints = &mut self.endpoints;
        let mut stats = ApplyStats {
            ipcache: upsert(&mut self.ipcache_now, &want.ipcache, |(len, data), v| {
                ipcache.insert(&Key::new(*len, *data), v, 0)
            })
            .context("writing the ipcache map")?,
            policy: upsert(&mut self.policy_now, &want.policy, |(len, data), v| {
                policy.insert(&Key::new(*len, *data), v, 0)
            })
            .context("writing the policy map")?,
            endpoints: upsert(&mut self.endpoints_now, &want.endpoints, |k, v| {
                endpoints.insert(k, v, 0)
            })
            .context("writing the endpoints map")?,
        };
        stats.endpoints.removed = remove_stale(&mut self.endpoints_now, &want.endpoints, |k| {
            endpoints.remove(k)
        })
        .context("deleting from the endpoints map")?;
        stats.policy.removed = remove_stale(&mut self.policy_now, &want.policy, |(len, data)| {
            policy.remove(&Key::new(*len, *data))
        })
        .context("deleting from the policy map")?;
        stats.ipcache.removed =
            remove_stale(&mut self.ipcache_now, &want.ipcache, |(len, data)| {
                ipcache.remove(&Key::new(*len, *data))
            })
            .context("deleting from the ipcache map")?;
        Ok(stats)
    }

    pub fn policy_entries(&self) -> &BTreeMap<RawPolicyKey, PolicyEntry> {
        &self.policy_now
    }

    pub fn ipcache_len(&self) -> usize {
        self.ipcache_now.len()
    }

    /// Delete expired conntrack entries. Returns (live, removed).
    pub fn conntrack_gc(&mut self) -> anyhow::Result<(usize, usize)> {
        let now = monotonic_ns();
        let mut expired = Vec::new();
        let mut live = 0;
        for item in self.conntrack.iter() {
            let (key, entry) = match item {
                Ok(kv) => kv,
                // Entries can vanish (LRU eviction) while we iterate.
                Err(e) => {
                    debug!("conntrack iteration: {e}");
                    continue;
                }
            };
            if now.saturating_sub(entry.last_seen_ns) > ct_lifetime_ns(key.protocol, entry.flags) {
                expired.push(key);
            } else {
                live += 1;
            }
        }
        let mut removed = 0;
        for key in &expired {
            if self.conntrack.remove(key).is_ok() {
                removed += 1;
            }
        }
        Ok((live, removed))
    }

    /// Forget the connections of a deleted endpoint, and the local flows of other pods that
    /// were delivered to its interface, so that a pod that later gets the same address or
    /// ifindex starts without them.
    pub fn conntrack_purge_endpoint(&mut self, endpoint_id: u32, ifindex: u32) -> usize {
        let doomed: Vec<CtKey> = self
            .conntrack
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, entry)| {
                entry.endpoint_id == endpoint_id || entry.redirect_ifindex == ifindex
            })
            .map(|(key, _)| key)
            .collect();
        doomed
            .iter()
            .filter(|key| self.conntrack.remove(key).is_ok())
            .count()
    }

    pub fn conntrack_len(&self) -> usize {
        self.conntrack.keys().filter(Result::is_ok).count()
    }

    /// Per-CPU metric slots summed over CPUs, by slot index.
    pub fn metrics(&self) -> anyhow::Result<Vec<(u32, MetricValue)>> {
        let mut out = Vec::new();
        for (index, values) in self.metrics.iter().enumerate() {
            let values = values.context("reading the metrics map")?;
            let mut sum = MetricValue::default();
            for v in values.iter() {
                sum.packets += v.packets;
                sum.bytes += v.bytes;
            }
            if sum.packets > 0 {
                out.push((u32::try_from(index)?, sum));
            }
        }
        Ok(out)
    }
}

/// Write entries of `want` that `now` (the map's mirror) lacks or holds differently.
fn upsert<K: Ord + Clone, V: PartialEq + Copy>(
    now: &mut BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
    mut insert: impl FnMut(&K, V) -> Result<(), aya::maps::MapError>,
) -> anyhow::Result<SyncStats> {
    let mut stats = SyncStats::default();
    for (key, value) in want {
        if now.get(key) != Some(value) {
            insert(key, *value)?;
            now.insert(key.clone(), *value);
            stats.written += 1;
        }
    }
    Ok(stats)
}

/// Delete entries of `now` that `want` does not have; returns how many.
fn remove_stale<K: Ord + Clone, V>(
    now: &mut BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
    mut remove: impl FnMut(&K) -> Result<(), aya::maps::MapError>,
) -> anyhow::Result<usize> {
    let stale: Vec<K> = now
        .keys()
        .filter(|k| !want.contains_key(*k))
        .cloned()
        .collect();
    for key in &stale {
        match remove(key) {
            // Already gone is what we wanted.
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(e.into()),
        }
        now.remove(key);
    }
    Ok(stale.len())
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<aya::maps::Map> {
    ebpf.take_map(name)
        .with_context(|| format!("the eBPF object has no map named {name}"))
}

/// One line with the verdict per feature, and the kernel it was probed on.
fn log_features(report: &FeatureReport) {
    info!(
        kernel = %report.kernel,
        attach_mode = %report.attach_mode,
        "kernel features: {}",
        features::summary(&report.features)
    );
}

/// `CLOCK_MONOTONIC` in ns: the clock of `bpf_ktime_get_ns` (and, a tick behind at most, of
/// `bpf_ktime_get_coarse_ns`, which conntrack uses).
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    u64::try_from(ts.tv_sec()).unwrap_or_default() * NS_PER_SEC
        + u64::try_from(ts.tv_nsec()).unwrap_or_default()
}

/// Mount bpffs at /sys/fs/bpf when nothing is mounted there and check `dir` is on a bpffs.
fn ensure_bpffs(dir: &Path) -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("reading mounts")?;
    let has_bpffs = mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("bpf"));
    if !has_bpffs {
        std::fs::create_dir_all("/sys/fs/bpf").ok();
        nix::mount::mount(
            Some("bpf"),
            "/sys/fs/bpf",
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .context("mounting bpffs at /sys/fs/bpf")?;
        info!("mounted bpffs at /sys/fs/bpf");
    }
    if !dir.starts_with("/sys/fs/bpf") {
        warn!(dir = %dir.display(), "pin directory is outside /sys/fs/bpf; it must be on a bpffs");
    }
    if dir.as_os_str().is_empty() {
        bail!("empty bpffs directory");
    }
    Ok(())
}

/// How often the agent drains the event ring: the programs skip the wakeup per event (it is
/// the main cost of a new flow in the datapath) and only wake us when the ring fills up.
const EVENTS_DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// Read flow events from the ring buffer until the task is dropped, handing each to `sink`.
pub async fn read_events(
    ring: RingBuf<MapData>,
    mut sink: impl FnMut(FlowEvent),
) -> anyhow::Result<()> {
    // SAFETY: the AsyncFd owns the ring buffer and with it the fd, so the fd stays open and
    // cannot be reused for anything else while it is registered.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    }
    .context("watching the events ring buffer")?;
    loop {
        match tokio::time::timeout(EVENTS_DRAIN_INTERVAL, fd.readable_mut()).await {
            Ok(guard) => {
                let mut guard = guard?;
                drain_events(guard.get_inner_mut(), &mut sink);
                guard.clear_ready();
            }
            Err(_elapsed) => drain_events(fd.get_mut(), &mut sink),
        }
    }
}

fn drain_events(ring: &mut RingBuf<MapData>, sink: &mut impl FnMut(FlowEvent)) {
    while let Some(item) = ring.next() {
        if item.len() >= std::mem::size_of::<FlowEvent>() {
            // SAFETY: the record is at least one FlowEvent long; FlowEvent is plain data for
            // which every bit pattern is valid; read_unaligned makes no alignment claim.
            let event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) };
            sink(event);
        }
    }
}

/// Forward the programs' aya-log records to the agent's log until the task is dropped.
pub async fn forward_logs(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
) -> anyhow::Result<()> {
    // SAFETY: the AsyncFd owns the logger and with it the ring buffer's fd, which stays open
    // and is not reused while registered.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .context("watching the eBPF log ring buffer")?;
    loop {
        let mut guard = fd.readable_mut().await?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
