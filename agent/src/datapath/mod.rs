//! The datapath: the only module that talks to aya and the only one that knows the kernel
//! ABI (`weft-common`). It loads the embedded eBPF object, pins maps and tc links under the
//! node's bpffs directory, adopts what an earlier agent pinned, writes the agent's typed
//! [`Desired`] state as diffs in an order that never opens a window, and hands out typed
//! flow records, counters, and handles for conntrack garbage collection.
//!
//! Fail-closed across restarts: maps and tc links are pinned, so when the agent exits the
//! programs stay attached and keep enforcing the last policy. A new agent reuses the pinned
//! maps (their contents untouched), atomically swaps its freshly loaded programs into the
//! pinned links, and then writes only entries that differ from what it wants. One node, one
//! agent: the pin directory is locked while the agent runs.
#![allow(
    unsafe_code,
    reason = "the datapath module is where weft meets the kernel ABI"
)]

mod abi;
mod attach;
pub mod conntrack;
pub mod desired;
pub mod events;
mod features;
mod sockredirect;
pub mod stats;
mod steering;
mod verifier;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use aya::maps::lpm_trie::Key;
use aya::maps::{Array, HashMap, IterableMap, LpmTrie, MapData, RingBuf};
use aya::programs::links::FdLink;
use aya::{Ebpf, EbpfLoader, VerifierLogLevel};
use tracing::{error, info, warn};
use weft_common::{
    ClusterEntry, DatapathConfig, EndpointInfo, IpcacheEntry, IpcacheKey, NodeEntry, PolicyEntry,
    PolicyKey, config_flags, global_names, map_names, program_names, verdict,
};

pub use abi::{addr_bytes, addr_from_bytes};
pub use attach::AttachMode;
pub use desired::{Capacity, ClusterSpec, Desired, EndpointSpec, IpcacheSpec, NodeSpec, Place};
pub use features::{Feature, FeatureKind, FeatureReport};
pub use sockredirect::{SocketRedirectSettings, SocketRedirectState, cgroup2_mount};

use crate::fsutil::DirLock;
use abi::LpmKey;

/// The eBPF object built by `build.rs`, embedded so one binary is all a node needs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("WEFT_EBPF_OBJ"));

/// Which clock the programs read, chosen at load time from the feature probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `bpf_ktime_get_coarse_ns` (Linux >= 5.11): a plain read.
    CoarseClock,
    /// `bpf_ktime_get_ns`, for kernels without the coarse clock helper (5.10).
    PreciseClock,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::CoarseClock => "coarse clock",
            Variant::PreciseClock => "precise clock (no bpf_ktime_get_coarse_ns before Linux 5.11)",
        }
    }
}

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    attach_mode: AttachMode,
    features: FeatureReport,
    variant: Variant,
    config: Array<MapData, DatapathConfig>,
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    ipcache: LpmTrie<MapData, IpcacheKey, IpcacheEntry>,
    nodes: HashMap<MapData, u32, NodeEntry>,
    policy: LpmTrie<MapData, PolicyKey, PolicyEntry>,
    cluster: LpmTrie<MapData, IpcacheKey, ClusterEntry>,
    /// What the maps hold, so that writes are diffs (loaded from the pinned maps at start).
    config_now: DatapathConfig,
    endpoints_now: BTreeMap<u32, EndpointInfo>,
    ipcache_now: BTreeMap<LpmKey<IpcacheKey>, IpcacheEntry>,
    nodes_now: BTreeMap<u32, NodeEntry>,
    policy_now: BTreeMap<LpmKey<PolicyKey>, PolicyEntry>,
    cluster_now: BTreeMap<LpmKey<IpcacheKey>, ClusterEntry>,
    /// TCX links held open, so that a removed pin never detaches a pod's programs.
    links: BTreeMap<(u32, &'static str), (String, FdLink)>,
    socket_redirect: SocketRedirectState,
    /// The `sock_ops` cgroup link and its pin, held open like the TCX links.
    sock_link: Option<(PathBuf, FdLink)>,
    _pin_lock: DirLock,
}

/// What the datapath sends to user space besides the controller's handle: flow events, the
/// programs' log records, and handles of their own for conntrack and counters.
pub struct Channels {
    pub events: RingBuf<MapData>,
    pub logger: aya_log::EbpfLogger<&'static dyn log::Log>,
    pub conntrack: conntrack::ConntrackHandle,
    pub stats: stats::StatsHandle,
    /// The conntrack thread's own view of the counters.
    pub conntrack_stats: stats::StatsHandle,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyStats {
    pub endpoints: SyncStats,
    pub ipcache: SyncStats,
    pub nodes: SyncStats,
    pub policy: SyncStats,
    pub cluster: SyncStats,
    /// The strict encryption setting or the encryption device changed.
    pub encryption_changed: bool,
    /// The policy revision after the apply (bumped when anything changed).
    pub revision: u32,
}

impl ApplyStats {
    pub fn changed(&self) -> bool {
        self.encryption_changed
            || [
                self.endpoints,
                self.ipcache,
                self.nodes,
                self.policy,
                self.cluster,
            ]
            .iter()
            .any(|s| s.written + s.removed > 0)
    }
}

/// Counts of one map write.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncStats {
    pub written: usize,
    pub removed: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The desired state does not fit a map: nothing was written.
    #[error("the {map} map holds at most {capacity} entries; {wanted} are needed: nothing written")]
    Capacity {
        map: &'static str,
        wanted: usize,
        capacity: usize,
    },
    /// The kernel refused a write; what was written before stays (and is in the mirror).
    #[error("writing the {map} map: {source}")]
    Kernel {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

impl Datapath {
    /// Load the programs, creating or adopting the pinned maps under `pin_dir`.
    ///
    /// Refuses, naming what is missing, on a kernel without a feature the datapath uses, and
    /// when another agent holds `pin_dir`.
    ///
    /// `conntrack_max_entries` sizes a conntrack map created now; an adopted map keeps the
    /// size it was created with (the agent says so when they differ).
    ///
    /// # Errors
    /// Kernel refusals, a locked pin directory, or pinned maps that cannot be adopted.
    pub fn load(
        pin_dir: &Path,
        verbose: bool,
        conntrack_max_entries: usize,
        redirect: &SocketRedirectSettings,
    ) -> anyhow::Result<(Self, Channels)> {
        let attach_mode = AttachMode::detect();
        let mut features = features::probe(attach_mode);
        log_features(&features);
        if let Some(refusal) = features.refusal() {
            bail!("{refusal}");
        }
        ensure_bpffs(pin_dir)?;
        // Before any program can steer: a steered packet must never be forwarded instead.
        steering::ensure_routing()?;
        std::fs::create_dir_all(pin_dir.join("links"))
            .with_context(|| format!("creating {}", pin_dir.display()))?;
        let pin_lock = DirLock::on_dir(pin_dir)?;
        let variant = if features::has_coarse_clock(&features) {
            Variant::CoarseClock
        } else {
            Variant::PreciseClock
        };
        let pins: Vec<(&str, PathBuf)> = map_names::ALL
            .iter()
            .map(|name| (*name, pin_dir.join(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        loader.map_max_entries(
            map_names::CONNTRACK,
            u32::try_from(conntrack_max_entries).context("conntrack map size")?,
        );
        if verbose {
            // DEBUG, not VERBOSE: the full per-instruction log outgrows the kernel's log
            // buffer, and older kernels then report ENOSPC instead of the real error.
            loader.verifier_log_level(VerifierLogLevel::DEBUG | VerifierLogLevel::STATS);
        }
        // aya-log levels: 1 error .. 5 trace. The programs log only on rare paths
        // (unknown endpoint, malformed packet); debug ones only with --verbose.
        let log_level: u8 = if verbose { 5 } else { 3 };
        loader.override_global(aya_log::LEVEL, &log_level, false);
        let coarse = u8::from(variant == Variant::CoarseClock);
        loader.override_global(global_names::USE_COARSE_CLOCK, &coarse, true);
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
        let config = Array::try_from(take_map(&mut ebpf, map_names::CONFIG)?)?;
        let endpoints = HashMap::try_from(take_map(&mut ebpf, map_names::ENDPOINTS)?)?;
        let ipcache = LpmTrie::try_from(take_map(&mut ebpf, map_names::IPCACHE)?)?;
        let nodes = HashMap::try_from(take_map(&mut ebpf, map_names::NODES)?)?;
        let policy = LpmTrie::try_from(take_map(&mut ebpf, map_names::POLICY)?)?;
        let cluster = LpmTrie::try_from(take_map(&mut ebpf, map_names::CLUSTER)?)?;
        let events = RingBuf::try_from(take_map(&mut ebpf, map_names::EVENTS)?)?;
        let conntrack = conntrack::ConntrackHandle::open(&pin_dir.join(map_names::CONNTRACK))?;
        if conntrack.capacity() != conntrack_max_entries {
            warn!(
                pinned = conntrack.capacity(),
                requested = conntrack_max_entries,
                "the pinned conntrack map keeps its size, so that established flows survive the \
                 restart; the new size applies once the map is recreated (remove its pin while \
                 no agent runs)"
            );
        }
        let stats = stats::StatsHandle::open(&pin_dir.join(map_names::METRICS))?;
        let conntrack_stats = stats::StatsHandle::open(&pin_dir.join(map_names::METRICS))?;

        // After tc is loaded, and never fatal: without it tc enforces as before.
        let (socket_redirect, sock_link) =
            sockredirect::setup(&mut ebpf, pin_dir, redirect, &features, verbose);
        let mut datapath = Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            attach_mode,
            features,
            variant,
            config,
            endpoints,
            ipcache,
            nodes,
            policy,
            cluster,
            config_now: DatapathConfig::default(),
            endpoints_now: BTreeMap::new(),
            ipcache_now: BTreeMap::new(),
            nodes_now: BTreeMap::new(),
            policy_now: BTreeMap::new(),
            cluster_now: BTreeMap::new(),
            links: BTreeMap::new(),
            socket_redirect,
            sock_link,
            _pin_lock: pin_lock,
        };
        datapath.read_back()?;
        // After tc is in place, and never fatal: without it tc enforces as before.
        datapath.write_redirect_flag()?;
        info!(
            pin_dir = %pin_dir.display(),
            attach_mode = datapath.attach_mode.name(),
            variant = datapath.variant.name(),
            revision = datapath.config_now.policy_revision,
            adopted_endpoints = datapath.endpoints_now.len(),
            adopted_policy_entries = datapath.policy_now.len(),
            "datapath loaded"
        );
        Ok((
            datapath,
            Channels {
                events,
                logger,
                conntrack,
                stats,
                conntrack_stats,
            },
        ))
    }

    /// The config flag the socket programs check, as [`Self::socket_redirect`] says.
    fn write_redirect_flag(&mut self) -> anyhow::Result<()> {
        let mut next = self.config_now;
        if self.socket_redirect.on {
            next.flags |= config_flags::SOCKET_REDIRECT;
        } else {
            next.flags &= !config_flags::SOCKET_REDIRECT;
        }
        if next != self.config_now {
            self.config
                .set(0, next, 0)
                .context("writing the datapath config")?;
            self.config_now = next;
        }
        Ok(())
    }

    /// Whether same-node socket redirection runs, and why not.
    pub fn socket_redirect(&self) -> &SocketRedirectState {
        &self.socket_redirect
    }

    /// Fill the mirrors from the maps (after adopting pinned maps, they hold the last policy).
    fn read_back(&mut self) -> anyhow::Result<()> {
        self.config_now = self.config.get(&0, 0).context("reading the config map")?;
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
        self.nodes_now = self
            .nodes
            .iter()
            .collect::<Result<_, _>>()
            .context("reading the nodes map")?;
        self.policy_now = self
            .policy
            .iter()
            .map(|r| r.map(|(k, v)| ((k.prefix_len(), k.data()), v)))
            .collect::<Result<_, _>>()
            .context("reading the policy map")?;
        self.cluster_now = self
            .cluster
            .iter()
            .map(|r| r.map(|(k, v)| ((k.prefix_len(), k.data()), v)))
            .collect::<Result<_, _>>()
            .context("reading the cluster map")?;
        Ok(())
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn attach_mode(&self) -> AttachMode {
        self.attach_mode
    }

    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// What the kernel offers, as probed at load.
    pub fn features(&self) -> &FeatureReport {
        &self.features
    }

    /// The policy revision conntrack entries are checked against.
    pub fn revision(&self) -> u32 {
        self.config_now.policy_revision
    }

    /// Entries in the maps now: (endpoints, ipcache, nodes, policy).
    pub fn map_sizes(&self) -> [(&'static str, usize, usize); 4] {
        let cap = Capacity::KERNEL;
        [
            (
                map_names::ENDPOINTS,
                self.endpoints_now.len(),
                cap.endpoints,
            ),
            (map_names::IPCACHE, self.ipcache_now.len(), cap.ipcache),
            (map_names::NODES, self.nodes_now.len(), cap.nodes),
            (map_names::POLICY, self.policy_now.len(), cap.policy),
        ]
    }

    /// Attach both programs to the pod's host-side interface, replacing whatever program a
    /// previous agent left in the pinned links (atomically, no gap).
    ///
    /// # Errors
    /// When the kernel refuses the attachment.
    pub fn attach(&mut self, ifname: &str, ifindex: u32) -> anyhow::Result<()> {
        let held = attach::attach_endpoint(
            &mut self.ebpf,
            &self.pin_dir,
            self.attach_mode,
            ifname,
            ifindex,
        )?;
        for (program, link) in held {
            self.links
                .insert((ifindex, program), (ifname.to_owned(), link));
        }
        Ok(())
    }

    /// Detach from an interface (pinned links removed, held links closed).
    ///
    /// # Errors
    /// When a link pin cannot be removed.
    pub fn detach(&mut self, ifname: &str, ifindex: u32) -> anyhow::Result<()> {
        attach::detach_endpoint(&self.pin_dir, self.attach_mode, ifname, ifindex)?;
        self.links.retain(|(index, _), _| *index != ifindex);
        Ok(())
    }

    /// Let go of links whose interface is gone (the kernel detached them with it) and that
    /// no endpoint in `keep` uses, and remove their pins. Links of deleted endpoints whose
    /// interface still exists stay: they drop everything until the interface goes.
    pub fn release_gone_links(&mut self, keep: &[(String, u32)]) {
        let gone: Vec<(u32, &'static str)> = self
            .links
            .iter()
            .filter(|((ifindex, _), (ifname, _))| {
                !keep.iter().any(|(n, i)| n == ifname && i == ifindex)
                    && !nix::net::if_::if_nametoindex(ifname.as_str()).is_ok_and(|i| i == *ifindex)
            })
            .map(|(k, _)| *k)
            .collect();
        for key in gone {
            if let Some((ifname, _link)) = self.links.remove(&key) {
                let _ =
                    std::fs::remove_file(attach::link_pin(&self.pin_dir, &ifname, key.0, key.1));
            }
        }
    }

    /// Remove pinned links of interfaces that are not in `keep` (left by deleted pods).
    ///
    /// # Errors
    /// When a stale pin cannot be removed.
    pub fn prune_links(&mut self, keep: &[(String, u32)]) -> anyhow::Result<usize> {
        attach::prune_links(&self.pin_dir, keep)
    }

    /// Bring the maps to `want`, writing only what differs; `proxy_port` is the L7 filter's
    /// port for `redirect-l7` entries.
    ///
    /// Order, so that no step opens a window: policy entries first, denies before allows
    /// (a policy that isolates an endpoint finds its entries in place, and a tightened rule
    /// is in force before anything it narrows), then ipcache entries (an address never gets
    /// an identity whose entries are missing), nodes, endpoints (which switch isolation on
    /// or off); then removals: endpoints, policy allows before policy denies (a deny never
    /// leaves while an allow it covers is still there), ipcache, nodes. Last, the policy
    /// revision is bumped, which makes every established flow check itself again once.
    ///
    /// # Errors
    /// [`ApplyError::Capacity`] before any write when `want` does not fit; a kernel error
    /// part way (the mirrors then say what was written).
    pub fn apply(&mut self, want: &Desired, proxy_port: u16) -> Result<ApplyStats, ApplyError> {
        let endpoints: BTreeMap<u32, EndpointInfo> = want
            .endpoints
            .iter()
            .map(|(ifindex, spec)| (*ifindex, abi::endpoint_info(spec)))
            .collect();
        let ipcache: BTreeMap<LpmKey<IpcacheKey>, IpcacheEntry> = want
            .ipcache
            .iter()
            .map(|(prefix, spec)| (abi::ipcache_key(*prefix), abi::ipcache_entry(spec)))
            .collect();
        let nodes: BTreeMap<u32, NodeEntry> = want
            .nodes
            .iter()
            .map(|(id, spec)| (u32::from(*id), abi::node_entry(spec)))
            .collect();
        let policy: BTreeMap<LpmKey<PolicyKey>, PolicyEntry> = want
            .policy
            .iter()
            .map(|(k, e)| (abi::policy_key(k), abi::policy_entry(e, proxy_port)))
            .collect();
        let cluster: BTreeMap<LpmKey<IpcacheKey>, ClusterEntry> = want
            .cluster
            .iter()
            .map(|(prefix, spec)| (abi::ipcache_key(*prefix), abi::cluster_entry(*spec)))
            .collect();
        let cap = Capacity::KERNEL;
        for (map, wanted, capacity) in [
            ("cluster", cluster.len(), weft_common::CLUSTER_MAX_ENTRIES),
            ("endpoints", endpoints.len(), cap.endpoints),
            ("ipcache", ipcache.len(), cap.ipcache),
            ("nodes", nodes.len(), cap.nodes),
            ("policy", policy.len(), cap.policy),
        ] {
            if wanted > capacity {
                return Err(ApplyError::Capacity {
                    map,
                    wanted,
                    capacity,
                });
            }
        }
        let kernel = |map: &'static str| move |source| ApplyError::Kernel { map, source };
        let mut stats = ApplyStats::default();

        // Endpoints that leave go first, record before entries: their traffic drops as an
        // unknown endpoint (fail closed), and their entries make room for what others gain
        // (`plan::fit` counts on this order).
        {
            let map = &mut self.endpoints;
            stats.endpoints.removed =
                remove_stale(&mut self.endpoints_now, &endpoints, None, |k| map.remove(k))
                    .map_err(kernel("endpoints"))?;
        }
        {
            let live: BTreeSet<u32> = endpoints.values().map(|e| e.endpoint_id).collect();
            let map = &mut self.policy;
            stats.policy.removed = remove_where(
                &mut self.policy_now,
                |k| !live.contains(&k.1.endpoint_id),
                |k| map.remove(&Key::new(k.0, k.1)),
            )
            .map_err(kernel("policy"))?;
        }
        let is_deny = |v: &PolicyEntry| v.verdict == verdict::DENY;
        {
            let map = &mut self.policy;
            stats.policy.written = upsert(&mut self.policy_now, &policy, Some(&is_deny), |k, v| {
                map.insert(&Key::new(k.0, k.1), v, 0)
            })
            .map_err(kernel("policy"))?;
        }
        {
            let map = &mut self.ipcache;
            stats.ipcache.written = upsert(&mut self.ipcache_now, &ipcache, None, |k, v| {
                map.insert(&Key::new(k.0, k.1), v, 0)
            })
            .map_err(kernel("ipcache"))?;
        }
        {
            let map = &mut self.cluster;
            stats.cluster.written = upsert(&mut self.cluster_now, &cluster, None, |k, v| {
                map.insert(&Key::new(k.0, k.1), v, 0)
            })
            .map_err(kernel("cluster"))?;
        }
        {
            let map = &mut self.nodes;
            stats.nodes.written = upsert(&mut self.nodes_now, &nodes, None, |k, v| {
                map.insert(k, v, 0)
            })
            .map_err(kernel("nodes"))?;
        }
        {
            let map = &mut self.endpoints;
            stats.endpoints.written = upsert(&mut self.endpoints_now, &endpoints, None, |k, v| {
                map.insert(k, v, 0)
            })
            .map_err(kernel("endpoints"))?;
        }
        {
            let map = &mut self.policy;
            // Allows first: a deny leaves only once nothing it narrows is left.
            let not_deny = |v: &PolicyEntry| v.verdict != verdict::DENY;
            stats.policy.removed +=
                remove_stale(&mut self.policy_now, &policy, Some(&not_deny), |k| {
                    map.remove(&Key::new(k.0, k.1))
                })
                .map_err(kernel("policy"))?;
        }
        {
            let map = &mut self.ipcache;
            stats.ipcache.removed = remove_stale(&mut self.ipcache_now, &ipcache, None, |k| {
                map.remove(&Key::new(k.0, k.1))
            })
            .map_err(kernel("ipcache"))?;
        }
        {
            let map = &mut self.nodes;
            stats.nodes.removed =
                remove_stale(&mut self.nodes_now, &nodes, None, |k| map.remove(k))
                    .map_err(kernel("nodes"))?;
        }
        {
            let map = &mut self.cluster;
            stats.cluster.removed = remove_stale(&mut self.cluster_now, &cluster, None, |k| {
                map.remove(&Key::new(k.0, k.1))
            })
            .map_err(kernel("cluster"))?;
        }
        let mut next = self.config_now;
        if want.strict_encryption {
            next.flags |= config_flags::STRICT_ENCRYPTION;
        } else {
            next.flags &= !config_flags::STRICT_ENCRYPTION;
        }
        next.encrypt_ifindex = want.encrypt_ifindex;
        stats.encryption_changed = next != self.config_now;
        if stats.changed() || self.config_now.policy_revision == 0 {
            // 0 is what entries of a map the agent never configured carry: skip it.
            next.policy_revision = next.policy_revision.wrapping_add(1).max(1);
            self.config.set(0, next, 0).map_err(kernel("config"))?;
            self.config_now = next;
        }
        stats.revision = self.config_now.policy_revision;
        Ok(stats)
    }

    /// Check that every pinned map and link still is ours, and that the small maps still
    /// hold what the agent wrote (someone with root may have removed pins or entries).
    /// Repairs what it can; returns one line per finding, for the log and `weft status`.
    pub fn verify(&mut self, deep: bool) -> Vec<String> {
        let mut findings = Vec::new();
        for (name, map) in self.ebpf.maps() {
            if !map_names::ALL.contains(&name) {
                continue;
            }
            findings.extend(verify_pin(&self.pin_dir.join(name), name, map));
        }
        for name in [
            map_names::CONFIG,
            map_names::ENDPOINTS,
            map_names::IPCACHE,
            map_names::NODES,
            map_names::POLICY,
            map_names::CLUSTER,
        ] {
            let path = self.pin_dir.join(name);
            let map = match name {
                map_names::CONFIG => self.config.map(),
                map_names::ENDPOINTS => self.endpoints.map(),
                map_names::IPCACHE => self.ipcache.map(),
                map_names::NODES => self.nodes.map(),
                map_names::CLUSTER => self.cluster.map(),
                _ => self.policy.map(),
            };
            findings.extend(verify_map_data_pin(&path, name, map));
        }
        let mut repinned = Vec::new();
        for ((ifindex, program), (ifname, link)) in &self.links {
            let pin = attach::link_pin(&self.pin_dir, ifname, *ifindex, program);
            if !attach::pinned_link_is(&pin, link) {
                repinned.push((*ifindex, *program));
            }
        }
        for key in repinned {
            let Some((ifname, link)) = self.links.remove(&key) else {
                continue;
            };
            let pin = attach::link_pin(&self.pin_dir, &ifname, key.0, key.1);
            let _ = std::fs::remove_file(&pin);
            match attach::pin_link(link, &pin) {
                Ok(link) => {
                    findings.push(format!(
                        "the {} link pin of {ifname} was removed or replaced by someone else: \
                         pinned again (the program never left the interface)",
                        key.1
                    ));
                    self.links.insert(key, (ifname, link));
                }
                Err(e) => findings.push(format!(
                    "the {} link pin of {ifname} is gone and cannot be restored: {e:#} (the \
                     program stays attached while this agent runs)",
                    key.1
                )),
            }
        }
        if let Some((pin, link)) = self.sock_link.take() {
            if attach::pinned_link_is(&pin, &link) {
                self.sock_link = Some((pin, link));
            } else {
                let _ = std::fs::remove_file(&pin);
                match attach::pin_link(link, &pin) {
                    Ok(link) => {
                        findings.push(
                            "the sock_ops link pin was removed or replaced by someone else: \
                             pinned again (the program never left the cgroup)"
                                .to_owned(),
                        );
                        self.sock_link = Some((pin, link));
                    }
                    Err(e) => findings.push(format!(
                        "the sock_ops link pin is gone and cannot be restored: {e:#} (socket \
                         redirection stays attached while this agent runs)"
                    )),
                }
            }
        }
        findings.extend(self.verify_contents(deep));
        for f in &findings {
            error!("{f}");
        }
        findings
    }

    /// Compare the maps with the mirrors and write back what differs. The policy map only
    /// when `deep` (it can be large).
    fn verify_contents(&mut self, deep: bool) -> Vec<String> {
        let mut findings = Vec::new();
        if self.config.get(&0, 0).ok() != Some(self.config_now)
            && self.config.set(0, self.config_now, 0).is_ok()
        {
            findings.push("the datapath config was changed by someone else: restored".into());
        }
        let current = self.endpoints.iter().collect::<Result<BTreeMap<_, _>, _>>();
        if let Ok(current) = current {
            let (put, del) = drift(&self.endpoints_now, &current);
            let n = put.len() + del.len();
            for (k, v) in put {
                let _ = self.endpoints.insert(k, v, 0);
            }
            for k in del {
                let _ = self.endpoints.remove(&k);
            }
            if n > 0 {
                findings.push(format!(
                    "{n} endpoint map entries were changed by someone else: restored"
                ));
            }
        }
        let current = self
            .ipcache
            .iter()
            .map(|r| r.map(|(k, v)| ((k.prefix_len(), k.data()), v)))
            .collect::<Result<BTreeMap<_, _>, _>>();
        if let Ok(current) = current {
            let (put, del) = drift(&self.ipcache_now, &current);
            let n = put.len() + del.len();
            for (k, v) in put {
                let _ = self.ipcache.insert(&Key::new(k.0, k.1), v, 0);
            }
            for k in del {
                let _ = self.ipcache.remove(&Key::new(k.0, k.1));
            }
            if n > 0 {
                findings.push(format!(
                    "{n} ipcache entries were changed by someone else: restored"
                ));
            }
        }
        let current = self
            .cluster
            .iter()
            .map(|r| r.map(|(k, v)| ((k.prefix_len(), k.data()), v)))
            .collect::<Result<BTreeMap<_, _>, _>>();
        if let Ok(current) = current {
            let (put, del) = drift(&self.cluster_now, &current);
            let n = put.len() + del.len();
            for (k, v) in put {
                let _ = self.cluster.insert(&Key::new(k.0, k.1), v, 0);
            }
            for k in del {
                let _ = self.cluster.remove(&Key::new(k.0, k.1));
            }
            if n > 0 {
                findings.push(format!(
                    "{n} cluster pod-CIDR entries were changed by someone else: restored"
                ));
            }
        }
        if deep {
            let current = self
                .policy
                .iter()
                .map(|r| r.map(|(k, v)| ((k.prefix_len(), k.data()), v)))
                .collect::<Result<BTreeMap<_, _>, _>>();
            if let Ok(current) = current {
                let (put, del) = drift(&self.policy_now, &current);
                let n = put.len() + del.len();
                // Denies back first, then allows; stray entries go last.
                let (denies, allows): (Vec<_>, Vec<_>) = put
                    .into_iter()
                    .partition(|(_, v)| v.verdict == verdict::DENY);
                for (k, v) in denies.into_iter().chain(allows) {
                    let _ = self.policy.insert(&Key::new(k.0, k.1), v, 0);
                }
                for k in del {
                    let _ = self.policy.remove(&Key::new(k.0, k.1));
                }
                if n > 0 {
                    findings.push(format!(
                        "{n} policy map entries were changed by someone else: restored"
                    ));
                }
            }
        }
        findings
    }
}

/// What `current` (a map's content) lacks or holds differently from `mirror` (what the
/// agent wrote), and what it has beyond it.
fn drift<K: Ord + Clone, V: PartialEq + Copy>(
    mirror: &BTreeMap<K, V>,
    current: &BTreeMap<K, V>,
) -> (Vec<(K, V)>, Vec<K>) {
    let put = mirror
        .iter()
        .filter(|(k, v)| current.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    let del = current
        .keys()
        .filter(|k| !mirror.contains_key(*k))
        .cloned()
        .collect();
    (put, del)
}

/// Whether the pin at `path` is `map`; pin it again when it is missing or someone else's.
fn verify_pin(path: &Path, name: &str, map: &aya::maps::Map) -> Option<String> {
    let data: &MapData = match map {
        aya::maps::Map::RingBuf(d)
        | aya::maps::Map::PerCpuArray(d)
        | aya::maps::Map::LruHashMap(d)
        | aya::maps::Map::HashMap(d)
        | aya::maps::Map::Array(d)
        | aya::maps::Map::LpmTrie(d) => d,
        _ => return None,
    };
    verify_map_data_pin(path, name, data)
}

fn verify_map_data_pin(path: &Path, name: &str, map: &MapData) -> Option<String> {
    let ours = map.info().ok()?.id();
    let pinned = MapData::from_pin(path)
        .ok()
        .and_then(|m| m.info().ok())
        .map(|i| i.id());
    if pinned == Some(ours) {
        return None;
    }
    let _ = std::fs::remove_file(path);
    Some(match map.pin(path) {
        Ok(()) => {
            format!("the pin of map {name} was removed or replaced by someone else: pinned again")
        }
        Err(e) => format!("the pin of map {name} is gone and cannot be restored: {e}"),
    })
}

/// Write entries of `want` that `now` (the map's mirror) lacks or holds differently; with
/// `first`, those it selects go before the rest. Returns how many were written.
fn upsert<K: Ord + Clone, V: PartialEq + Copy>(
    now: &mut BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
    first: Option<&dyn Fn(&V) -> bool>,
    mut insert: impl FnMut(&K, V) -> Result<(), aya::maps::MapError>,
) -> Result<usize, aya::maps::MapError> {
    let changed: Vec<(&K, &V)> = want
        .iter()
        .filter(|(k, v)| now.get(*k) != Some(*v))
        .collect();
    let (early, late): (Vec<_>, Vec<_>) = changed
        .into_iter()
        .partition(|(_, v)| first.is_some_and(|f| f(v)));
    let mut written = 0;
    for (key, value) in early.into_iter().chain(late) {
        insert(key, *value)?;
        now.insert(key.clone(), *value);
        written += 1;
    }
    Ok(written)
}

/// Delete the entries of `now` whose key `select` picks; returns how many.
fn remove_where<K: Ord + Clone, V>(
    now: &mut BTreeMap<K, V>,
    select: impl Fn(&K) -> bool,
    mut remove: impl FnMut(&K) -> Result<(), aya::maps::MapError>,
) -> Result<usize, aya::maps::MapError> {
    let picked: Vec<K> = now.keys().filter(|k| select(k)).cloned().collect();
    for key in &picked {
        match remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(e),
        }
        now.remove(key);
    }
    Ok(picked.len())
}

/// Delete entries of `now` that `want` does not have (with `first`, those it selects before
/// the rest); returns how many.
fn remove_stale<K: Ord + Clone, V: Copy>(
    now: &mut BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
    first: Option<&dyn Fn(&V) -> bool>,
    mut remove: impl FnMut(&K) -> Result<(), aya::maps::MapError>,
) -> Result<usize, aya::maps::MapError> {
    let stale: Vec<(K, V)> = now
        .iter()
        .filter(|(k, _)| !want.contains_key(*k))
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    let (early, late): (Vec<_>, Vec<_>) = stale
        .into_iter()
        .partition(|(_, v)| first.is_some_and(|f| f(v)));
    let mut removed = 0;
    for (key, _) in early.into_iter().chain(late) {
        match remove(&key) {
            // Already gone is what we wanted.
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(e),
        }
        now.remove(&key);
        removed += 1;
    }
    Ok(removed)
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
    u64::try_from(ts.tv_sec()).unwrap_or_default() * weft_common::NS_PER_SEC
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

/// Forward the programs' aya-log records to the agent's log until the task is dropped.
///
/// # Errors
/// When the log ring buffer cannot be watched.
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
