//! The agent daemon: owns the node's state (registered endpoints, the source snapshot,
//! identities, the desired policy) and drives the datapath towards it.
//!
//! Lock order: the daemon state sits behind one `Mutex<Agent>`; the flow hub has its own
//! locks and is never called with the agent locked except through `set_names`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{info, warn};
use weft_common::{EndpointInfo, IpcacheEntry, identity};

use crate::api::{
    CniEndpoint, CniRef, CounterRow, EndpointRow, IdentityRow, PolicyEntryRow, PolicyReport,
    PolicyRow, Request, StatusReport,
};
use crate::datapath::{self, Datapath, DesiredMaps};
use crate::observe::{FlowHub, NameTable, reserved_identity_name};
use crate::policy_view::{self, Identities, PolicyInputs, PolicyOutputs};
use crate::source::{Snapshot, Source, local::LocalSource};

#[derive(Debug, Clone)]
pub struct Config {
    pub node: String,
    pub source_dir: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub bpffs_dir: PathBuf,
    pub verbose: bool,
    pub ct_gc_interval: Duration,
}

/// A pod registered by the CNI plugin, persisted in the state directory so that a restarted
/// agent knows its endpoints (and keeps their ids, which the pinned maps are keyed by).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EndpointRecord {
    pub id: u32,
    pub container_id: String,
    pub ifname: String,
    pub host_ifname: String,
    pub ifindex: u32,
    pub netns: String,
    pub pod_name: String,
    pub pod_namespace: String,
    pub addresses: Vec<IpNet>,
}

impl EndpointRecord {
    fn pod(&self) -> String {
        format!("{}/{}", self.pod_namespace, self.pod_name)
    }
}

pub struct Agent {
    cfg: Config,
    datapath: Datapath,
    source: Box<dyn Source>,
    hub: Arc<FlowHub>,
    endpoints: BTreeMap<(String, String), EndpointRecord>,
    snapshot: Snapshot,
    identities: Identities,
    outputs: PolicyOutputs,
    started: Instant,
    last_apply: Option<Instant>,
}

const ENDPOINTS_FILE: &str = "endpoints.json";
const IDENTITIES_FILE: &str = "identities.json";

impl Agent {
    fn start(
        cfg: Config,
        datapath: Datapath,
        source: Box<dyn Source>,
        hub: Arc<FlowHub>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&cfg.state_dir)
            .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
        let endpoints: Vec<EndpointRecord> =
            read_json(&cfg.state_dir.join(ENDPOINTS_FILE))?.unwrap_or_default();
        let identities = match read_json(&cfg.state_dir.join(IDENTITIES_FILE))? {
            Some(persisted) => {
                Identities::restore(persisted).context("restoring persisted identities")?
            }
            None => Identities::default(),
        };
        let mut agent = Self {
            cfg,
            datapath,
            source,
            hub,
            endpoints: endpoints
                .into_iter()
                .map(|e| ((e.container_id.clone(), e.ifname.clone()), e))
                .collect(),
            snapshot: Snapshot::default(),
            identities,
            outputs: PolicyOutputs::default(),
            started: Instant::now(),
            last_apply: None,
        };
        // Read the whole source before the first write: applying an empty or partial view
        // would remove policy that the pinned maps still enforce.
        agent.snapshot = agent.source.snapshot();
        agent.readopt_endpoints();
        agent.reconcile()?;
        agent.attach_all();
        Ok(agent)
    }

    /// Endpoints from an earlier run: keep those whose interface still exists (with the same
    /// ifindex), forget the rest.
    fn readopt_endpoints(&mut self) {
        self.endpoints.retain(|_, ep| {
            let alive = nix::net::if_::if_nametoindex(ep.host_ifname.as_str())
                .is_ok_and(|index| index == ep.ifindex);
            if !alive {
                info!(pod = %ep.pod(), ifname = %ep.host_ifname, "endpoint's interface is gone; forgetting it");
            }
            alive
        });
    }

    fn attach_all(&mut self) {
        let keep: Vec<(String, u32)> = self
            .endpoints
            .values()
            .map(|e| (e.host_ifname.clone(), e.ifindex))
            .collect();
        for (ifname, ifindex) in &keep {
            if let Err(e) = self.datapath.attach(ifname, *ifindex) {
                warn!(ifname, "re-attaching: {e:#}");
            }
        }
        match self.datapath.prune_links(&keep) {
            Ok(0) => {}
            Ok(n) => info!(removed = n, "removed link pins of deleted interfaces"),
            Err(e) => warn!("pruning link pins: {e:#}"),
        }
    }

    /// Re-read the source and apply.
    pub fn refresh_source(&mut self) -> anyhow::Result<()> {
        self.snapshot = self.source.snapshot();
        self.reconcile()
    }

    /// Compute the desired maps from the current state and write the difference.
    pub fn reconcile(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let local_addresses = local_addresses();
        let inputs = PolicyInputs {
            node: &self.cfg.node,
            snapshot: &self.snapshot,
            endpoints: self.endpoints.values().collect(),
        };
        let outputs = policy_view::compute(&inputs, &mut self.identities);
        let want = self.desired_maps(&outputs, &local_addresses);
        let stats = self.datapath.apply(&want)?;
        self.outputs = outputs;
        self.last_apply = Some(Instant::now());
        if let Err(e) = write_json(
            &self.cfg.state_dir.join(IDENTITIES_FILE),
            &self.identities.persist(),
        ) {
            warn!("persisting identities: {e:#}");
        }
        self.hub.set_names(self.name_table());
        let changed = stats != datapath::ApplyStats::default();
        if !changed {
            tracing::debug!("policy unchanged");
            return Ok(());
        }
        info!(
            policy_written = stats.policy.written,
            policy_removed = stats.policy.removed,
            ipcache_written = stats.ipcache.written,
            ipcache_removed = stats.ipcache.removed,
            endpoints_written = stats.endpoints.written,
            elapsed_ms = started.elapsed().as_millis(),
            "policy applied"
        );
        Ok(())
    }

    fn desired_maps(&self, outputs: &PolicyOutputs, local_addresses: &[IpAddr]) -> DesiredMaps {
        let mut want = DesiredMaps::default();
        let entry = |identity| IpcacheEntry {
            identity,
            ..IpcacheEntry::default()
        };
        for (prefix, id) in &outputs.cidr_identities {
            want.ipcache
                .insert(datapath::ipcache_key(*prefix), entry(*id));
        }
        for addr in &outputs.remote_node_addresses {
            want.ipcache.insert(
                datapath::host_ipcache_key(*addr),
                entry(identity::REMOTE_NODE),
            );
        }
        for (addr, id) in &outputs.remote_pods {
            want.ipcache
                .insert(datapath::host_ipcache_key(*addr), entry(*id));
        }
        for addr in local_addresses {
            want.ipcache
                .insert(datapath::host_ipcache_key(*addr), entry(identity::HOST));
        }
        for ep in self.endpoints.values() {
            let Some(id) = outputs.endpoint_identity.get(&ep.id).copied() else {
                continue;
            };
            for net in &ep.addresses {
                // The ifindex lets from_pod deliver pod-to-pod traffic straight to this pod.
                let local = IpcacheEntry {
                    ifindex: ep.ifindex,
                    ..entry(id)
                };
                want.ipcache
                    .insert(datapath::host_ipcache_key(net.addr()), local);
            }
            let isolation = outputs.isolation.get(&ep.id).copied().unwrap_or_default();
            want.endpoints.insert(
                ep.ifindex,
                EndpointInfo {
                    endpoint_id: ep.id,
                    identity: id,
                    flags: isolation.flags(),
                    _pad: 0,
                },
            );
        }
        want.policy = outputs.policy.clone();
        want
    }

    fn name_table(&self) -> NameTable {
        let mut names = NameTable::default();
        for ep in self.endpoints.values() {
            names.endpoints.insert(ep.id, ep.pod());
            for net in &ep.addresses {
                names.addresses.insert(net.addr(), ep.pod());
            }
        }
        names.identities = self.outputs.identity_labels.clone();
        names
    }

    /// Answer an API request (everything but `observe`, which streams).
    pub fn answer(&mut self, request: Request) -> String {
        use crate::server::encode;
        match request {
            Request::Status => encode(Ok(self.status())),
            Request::EndpointList => encode(Ok(self.endpoint_rows())),
            Request::IdentityList => encode(Ok(self.identity_rows())),
            Request::PolicyGet => encode(Ok(self.policy_report())),
            Request::CniAdd(ep) => encode(self.cni_add(ep)),
            Request::CniDel(r) => encode(self.cni_del(&r)),
            Request::CniCheck(r) => encode(self.cni_check(&r)),
            Request::Observe { .. } => encode::<()>(Err(anyhow::anyhow!("observe streams"))),
        }
    }

    fn cni_add(&mut self, ep: CniEndpoint) -> anyhow::Result<()> {
        let key = (ep.container_id.clone(), ep.ifname.clone());
        let ifindex = nix::net::if_::if_nametoindex(ep.host_ifname.as_str()).with_context(|| {
            format!(
                "interface {} (host side of {}/{}) does not exist in the node's network namespace",
                ep.host_ifname, ep.pod_namespace, ep.pod_name
            )
        })?;
        if ep.addresses.is_empty() {
            bail!(
                "pod {}/{} has no addresses in prevResult",
                ep.pod_namespace,
                ep.pod_name
            );
        }
        let id = match self.endpoints.get(&key) {
            Some(existing) => existing.id,
            None => self.next_endpoint_id(),
        };
        let record = EndpointRecord {
            id,
            container_id: ep.container_id,
            ifname: ep.ifname,
            host_ifname: ep.host_ifname,
            ifindex,
            netns: ep.netns,
            pod_name: ep.pod_name,
            pod_namespace: ep.pod_namespace,
            addresses: ep.addresses,
        };
        info!(pod = %record.pod(), id, ifname = %record.host_ifname, "endpoint added");
        self.endpoints.insert(key.clone(), record.clone());
        // Maps first (identity, isolation, policy), then the programs: the pod is never
        // attached without its policy in place.
        let result = self
            .reconcile()
            .and_then(|()| self.datapath.attach(&record.host_ifname, ifindex));
        if let Err(e) = result {
            self.endpoints.remove(&key);
            let _ = self.datapath.detach(&record.host_ifname, ifindex);
            let _ = self.reconcile();
            return Err(e.context(format!("adding endpoint {}", record.pod())));
        }
        self.persist_endpoints()
    }

    fn cni_del(&mut self, r: &CniRef) -> anyhow::Result<()> {
        let key = (r.container_id.clone(), r.ifname.clone());
        let Some(record) = self.endpoints.remove(&key) else {
            // DEL is idempotent.
            return Ok(());
        };
        info!(pod = %record.pod(), id = record.id, "endpoint deleted");
        self.datapath.detach(&record.host_ifname, record.ifindex)?;
        self.reconcile()?;
        self.datapath
            .conntrack_purge_endpoint(record.id, record.ifindex);
        self.persist_endpoints()
    }

    fn cni_check(&self, r: &CniRef) -> anyhow::Result<()> {
        let key = (r.container_id.clone(), r.ifname.clone());
        let record = self
            .endpoints
            .get(&key)
            .with_context(|| format!("container {} is not a weft endpoint", r.container_id))?;
        let index = nix::net::if_::if_nametoindex(record.host_ifname.as_str())
            .with_context(|| format!("interface {} is gone", record.host_ifname))?;
        if index != record.ifindex {
            bail!(
                "interface {} changed (ifindex {} != {})",
                record.host_ifname,
                index,
                record.ifindex
            );
        }
        Ok(())
    }

    fn next_endpoint_id(&self) -> u32 {
        let used: BTreeSet<u32> = self.endpoints.values().map(|e| e.id).collect();
        (1..).find(|id| !used.contains(id)).unwrap_or(u32::MAX)
    }

    fn persist_endpoints(&self) -> anyhow::Result<()> {
        let records: Vec<&EndpointRecord> = self.endpoints.values().collect();
        write_json(&self.cfg.state_dir.join(ENDPOINTS_FILE), &records)
    }

    pub fn conntrack_gc(&mut self) {
        match self.datapath.conntrack_gc() {
            Ok((live, 0)) => tracing::debug!(live, "conntrack gc"),
            Ok((live, removed)) => info!(live, removed, "conntrack gc"),
            Err(e) => warn!("conntrack gc: {e:#}"),
        }
    }

    fn status(&self) -> StatusReport {
        let counters = self
            .datapath
            .metrics()
            .unwrap_or_default()
            .into_iter()
            .map(|(index, value)| {
                let audit = index >= weft_common::METRICS_AUDIT_BASE;
                let slot = index % weft_common::METRICS_AUDIT_BASE;
                let reason = u8::try_from(slot / 2)
                    .ok()
                    .and_then(weft_common::DropReason::from_u8)
                    .unwrap_or(weft_common::DropReason::None);
                CounterRow {
                    direction: if slot % 2 == 1 { "ingress" } else { "egress" }.into(),
                    verdict: if audit {
                        "audit"
                    } else if reason == weft_common::DropReason::None {
                        "forwarded"
                    } else {
                        "dropped"
                    }
                    .into(),
                    reason: reason.name().into(),
                    packets: value.packets,
                    bytes: value.bytes,
                }
            })
            .collect();
        StatusReport {
            node: self.cfg.node.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            kernel: self.datapath.features().kernel.clone(),
            uptime_seconds: self.started.elapsed().as_secs(),
            source: self.source.describe(),
            pin_dir: self.datapath.pin_dir().display().to_string(),
            attach_mode: self.datapath.attach_mode().name().into(),
            kernel_features: self.datapath.features().features.clone(),
            endpoints: self.endpoints.len(),
            identities: self.outputs.identity_labels.len(),
            policies: self.outputs.policies.len(),
            policy_map_entries: self.datapath.policy_entries().len(),
            ipcache_entries: self.datapath.ipcache_len(),
            conntrack_entries: self.datapath.conntrack_len(),
            last_apply_seconds_ago: self.last_apply.map(|t| t.elapsed().as_secs()),
            rejected: self.snapshot.rejected.clone(),
            counters,
        }
    }

    fn endpoint_rows(&self) -> Vec<EndpointRow> {
        self.endpoints
            .values()
            .map(|ep| {
                let isolation = self
                    .outputs
                    .isolation
                    .get(&ep.id)
                    .copied()
                    .unwrap_or_default();
                let identity = self
                    .outputs
                    .endpoint_identity
                    .get(&ep.id)
                    .copied()
                    .unwrap_or(identity::UNMANAGED);
                EndpointRow {
                    id: ep.id,
                    pod: ep.pod_name.clone(),
                    namespace: ep.pod_namespace.clone(),
                    identity,
                    labels: self
                        .outputs
                        .identity_labels
                        .get(&identity)
                        .cloned()
                        .unwrap_or_default(),
                    addresses: ep.addresses.iter().map(IpNet::addr).collect(),
                    host_ifname: ep.host_ifname.clone(),
                    ifindex: ep.ifindex,
                    ingress: isolation.ingress.into(),
                    egress: isolation.egress.into(),
                }
            })
            .collect()
    }

    fn identity_rows(&self) -> Vec<IdentityRow> {
        let mut rows: Vec<IdentityRow> = self
            .outputs
            .identity_labels
            .iter()
            .map(|(id, labels)| IdentityRow {
                id: *id,
                labels: labels.clone(),
                reserved: reserved_identity_name(*id).is_some(),
            })
            .collect();
        rows.sort_by_key(|r| r.id);
        rows
    }

    fn policy_report(&self) -> PolicyReport {
        let pods: BTreeMap<u32, String> =
            self.endpoints.values().map(|e| (e.id, e.pod())).collect();
        let entries = self
            .datapath
            .policy_entries()
            .iter()
            .map(|((bits, key), value)| {
                let [direction, protocol, port, verdict] =
                    datapath::policy_entry_row(*bits, key, value);
                PolicyEntryRow {
                    endpoint: pods
                        .get(&key.endpoint_id)
                        .cloned()
                        .unwrap_or_else(|| format!("endpoint:{}", key.endpoint_id)),
                    direction,
                    identity: key.identity,
                    protocol,
                    port,
                    verdict,
                    derived_from: self
                        .outputs
                        .derived_from
                        .get(&(*bits, *key))
                        .cloned()
                        .unwrap_or_default(),
                }
            })
            .collect();
        PolicyReport {
            policies: self
                .outputs
                .policies
                .iter()
                .map(|p| PolicyRow {
                    kind: p.kind.clone(),
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    source: p.origin.clone(),
                    enforcement: p.enforcement.clone(),
                    selects: p
                        .selects
                        .iter()
                        .filter_map(|id| pods.get(id).cloned())
                        .collect(),
                })
                .collect(),
            rejected: self.snapshot.rejected.clone(),
            entries,
        }
    }
}

/// Addresses of this node's own interfaces (its network namespace): identity `host`.
fn local_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| {
            let address = a.address?;
            if let Some(v4) = address.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .filter(|ip| match ip {
            IpAddr::V6(v6) => !v6.is_unicast_link_local(),
            IpAddr::V4(_) => true,
        })
        .collect()
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes)
                .with_context(|| format!("parsing {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Write atomically (temp file + rename), so a crash never leaves half a file.
fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// Run the agent until SIGTERM/SIGINT. Pinned programs and maps stay behind on exit.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let (datapath, channels) = Datapath::load(&cfg.bpffs_dir, cfg.verbose)?;
    let mut source = LocalSource::new(&cfg.source_dir, &cfg.state_dir)?;
    let (changed_tx, mut changed_rx) = mpsc::channel(1);
    source.watch(changed_tx)?;
    let hub = Arc::new(FlowHub::new());
    let listener = crate::server::bind(&cfg.socket)?;
    let socket = cfg.socket.clone();
    let gc_interval = cfg.ct_gc_interval;
    let agent = Arc::new(Mutex::new(Agent::start(
        cfg,
        datapath,
        Box::new(source),
        hub.clone(),
    )?));

    let events_hub = hub.clone();
    let events = tokio::spawn(async move {
        if let Err(e) =
            datapath::read_events(channels.events, |event| events_hub.record(&event)).await
        {
            warn!("flow events stopped: {e:#}");
        }
    });

    let logs = tokio::spawn(async move {
        if let Err(e) = datapath::forward_logs(channels.logger).await {
            warn!("eBPF log forwarding stopped: {e:#}");
        }
    });

    let source_agent = agent.clone();
    let watcher = tokio::spawn(async move {
        while changed_rx.recv().await.is_some() {
            // Editors write in several steps: let them finish.
            tokio::time::sleep(Duration::from_millis(30)).await;
            while changed_rx.try_recv().is_ok() {}
            let mut agent = source_agent.lock().expect("agent lock");
            if let Err(e) = agent.refresh_source() {
                warn!("applying the source change: {e:#}");
            }
        }
    });

    let gc_agent = agent.clone();
    let gc = tokio::spawn(async move {
        let mut tick = tokio::time::interval(gc_interval);
        loop {
            tick.tick().await;
            gc_agent.lock().expect("agent lock").conntrack_gc();
        }
    });

    info!(socket = %socket.display(), "weft agent ready");
    let server = tokio::spawn(crate::server::serve(listener, agent.clone(), hub));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: exiting; pinned programs keep enforcing"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: exiting; pinned programs keep enforcing"),
    }
    for task in [events, logs, watcher, gc, server] {
        task.abort();
    }
    std::fs::remove_file(&socket).ok();
    Ok(())
}
