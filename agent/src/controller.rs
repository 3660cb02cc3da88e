//! The controller: the one writer of node state. It owns the datapath handle, the source,
//! the identity backend and the endpoint registry, takes [`Command`]s (source batches, CNI
//! commands with a reply channel, `policy wait`, ticks) on a thread of its own, and after
//! every change publishes an immutable [`View`] that every reader loads without touching the
//! writer. Nothing here is behind a lock; the only way in is the command queue, and a full
//! queue is answered `overloaded`, never by waiting in async code.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::oneshot;
use tracing::{error, info, info_span, warn};
use weft_api::{ApiError, CniEndpoint, CniRef, ErrorCode, Rejection, WaitReport};
use weft_policy::ResolveOptions;

use crate::config::Config;
use crate::datapath::{Capacity, Datapath};
use crate::endpoints::{self, Registry};
use crate::fsutil;
use crate::identity::IdentityBackend;
use crate::plan::{self, EncryptionState, Model, Plan, Refusal};
use crate::podnet;
use crate::source::{Source, SourceBatch, Sourced};
use crate::view::{Names, SharedView, View};

/// How many commands may wait for the controller.
const QUEUE: usize = 256;
/// Every this many verifications, the policy map's content is compared too.
const DEEP_VERIFY_EVERY: u32 = 10;
const NODE_IDS_FILE: &str = "node-ids.json";

pub type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

pub enum Command {
    /// The source has changes to take.
    SourceChanged,
    CniAdd(CniEndpoint, Reply<()>),
    CniDel(CniRef, Reply<()>),
    CniCheck(CniRef, Reply<()>),
    Wait(Reply<WaitReport>),
    /// The L7 filter's supervisor: steer `redirect-l7` flows to this port (0: the filter is
    /// not ready, drop them).
    L7Port(u16),
    /// The encryption reconciler: what the device carries now.
    Encryption(EncryptionState),
    Shutdown,
}

/// How the rest of the agent reaches the controller.
#[derive(Clone)]
pub struct Handle {
    tx: SyncSender<Command>,
    view: SharedView,
}

impl Handle {
    /// The state as last published.
    pub fn view(&self) -> Arc<View> {
        self.view.load_full()
    }

    pub fn shared_view(&self) -> SharedView {
        self.view.clone()
    }

    /// Queue a command and wait (asynchronously, bounded) for its answer.
    ///
    /// # Errors
    /// [`ErrorCode::Overloaded`] when the queue is full, [`ErrorCode::Timeout`] when the
    /// answer does not come in time, or the command's own error.
    pub async fn call<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> Command,
        timeout: Duration,
    ) -> Result<T, ApiError> {
        let (reply, answer) = oneshot::channel();
        match self.tx.try_send(make(reply)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(ApiError::new(
                    ErrorCode::Overloaded,
                    "the agent is busy: too many requests queued, try again",
                ));
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(ApiError::new(
                    ErrorCode::Unavailable,
                    "the agent is shutting down",
                ));
            }
        }
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ApiError::new(
                ErrorCode::Unavailable,
                "the agent is shutting down",
            )),
            Err(_) => Err(ApiError::new(
                ErrorCode::Timeout,
                format!("no answer within {}s", timeout.as_secs()),
            )),
        }
    }

    /// For the source's watcher thread: blocks while the queue is full (back-pressure on
    /// the watcher, never on the API).
    pub fn send_blocking(&self, command: Command) {
        let _ = self.tx.send(command);
    }

    /// For the L7 supervisor: `false` when the queue is full (it tries again).
    pub fn l7_port(&self, port: u16) -> bool {
        self.tx.try_send(Command::L7Port(port)).is_ok()
    }

    /// For the encryption reconciler: `false` when the queue is full (it tries again).
    pub fn encryption_state(&self, state: EncryptionState) -> bool {
        self.tx.try_send(Command::Encryption(state)).is_ok()
    }

    pub fn shutdown(&self) {
        let _ = self.tx.try_send(Command::Shutdown);
    }
}

/// Requests for the conntrack thread.
pub enum CtRequest {
    /// Forget the flows of a deleted endpoint.
    Purge { endpoint_id: u32, ifindex: u32 },
}

pub struct Controller {
    cfg: Arc<Config>,
    datapath: Datapath,
    source: Box<dyn Source>,
    identities: Box<dyn IdentityBackend>,
    registry: Registry,
    objects: BTreeMap<String, Sourced>,
    rejected: Vec<Rejection>,
    node_ids: BTreeMap<String, u16>,
    /// The plan whose desired state the maps hold (the last complete apply).
    plan: Arc<Plan>,
    refusals: Vec<Refusal>,
    /// Endpoints refused since the agent started (a refusal counts once until it clears).
    refusals_total: u64,
    /// Problems of the last reconcile (identity backend, ipcache capacity, apply errors).
    reconcile_problems: Vec<String>,
    /// Findings of the pinned-object checks (kept until the next check is clean).
    findings: Vec<String>,
    config_revision: u64,
    applied_revision: u64,
    last_apply: Option<Instant>,
    /// When an apply last changed each endpoint's entries or isolation (its flows from
    /// before met other entries), for `weft policy explain`.
    policy_changed: Arc<BTreeMap<u32, Instant>>,
    /// A reconcile failed: try again on the next tick.
    retry: bool,
    view: SharedView,
    ct: SyncSender<CtRequest>,
    verifications: u32,
    options: ResolveOptions,
    /// Where `redirect-l7` entries steer (the L7 filter's port), 0 while it is not ready.
    l7_port: u16,
    /// What the encryption device carries (`None` before its reconciler reported, and
    /// without encryption): no node's traffic counts as encrypted until then.
    encryption: Option<EncryptionState>,
}

impl Controller {
    /// Read everything, apply it once (before anything else may write), and return the
    /// controller with the handle to reach it.
    ///
    /// # Errors
    /// When the first state cannot be read or applied: the agent refuses to run rather than
    /// enforce a partial view.
    pub fn start(
        cfg: Arc<Config>,
        datapath: Datapath,
        mut source: Box<dyn Source>,
        identities: Box<dyn IdentityBackend>,
        ct: SyncSender<CtRequest>,
    ) -> anyhow::Result<(Self, Handle, Receiver<Command>)> {
        let mut registry = Registry::load(&cfg.state_dir)?;
        let gone = registry.readopt();
        let node_ids = fsutil::read_json(&cfg.state_dir.join(NODE_IDS_FILE))?.unwrap_or_default();
        let initial = source.initial()?;
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let view: SharedView = Arc::new(ArcSwap::from_pointee(View::empty(&cfg.node)));
        let mut controller = Self {
            cfg,
            datapath,
            source,
            identities,
            registry,
            objects: BTreeMap::new(),
            rejected: Vec::new(),
            node_ids,
            plan: Arc::default(),
            refusals: Vec::new(),
            refusals_total: 0,
            reconcile_problems: Vec::new(),
            findings: Vec::new(),
            config_revision: 0,
            applied_revision: 0,
            last_apply: None,
            policy_changed: Arc::default(),
            retry: false,
            view: view.clone(),
            ct,
            verifications: 0,
            options: ResolveOptions::default(),
            l7_port: 0,
            encryption: None,
        };
        controller.take_batch(initial);
        controller.config_revision = 1;
        // What the pinned maps hold now is the "last complete state" a change that does not
        // fit falls back to: start from what this configuration says, as it did before.
        controller.reconcile()?;
        controller.attach_all(&gone);
        if let Err(e) = controller.registry.persist() {
            warn!("persisting endpoints: {e}");
        }
        controller.publish();
        let wake_tx = tx.clone();
        controller.source.watch(Box::new(move || {
            // A full queue wakes the controller anyway; it takes source changes on every
            // turn of its loop.
            let _ = wake_tx.try_send(Command::SourceChanged);
        }))?;
        Ok((controller, Handle { tx, view }, rx))
    }

    fn attach_all(&mut self, gone: &[endpoints::EndpointRecord]) {
        let keep: Vec<(String, u32)> = self
            .registry
            .iter()
            .map(|e| (e.host_ifname.clone(), e.ifindex))
            .collect();
        for (ifname, ifindex) in &keep {
            if let Err(e) = self.datapath.attach(ifname, *ifindex) {
                warn!(ifname, "re-attaching: {e:#}");
            }
        }
        for ep in gone {
            let _ = self.ct.try_send(CtRequest::Purge {
                endpoint_id: ep.id,
                ifindex: ep.ifindex,
            });
        }
        match self.datapath.prune_links(&keep) {
            Ok(0) => {}
            Ok(n) => info!(removed = n, "removed link pins of deleted interfaces"),
            Err(e) => warn!("pruning link pins: {e:#}"),
        }
    }

    /// Serve commands until [`Command::Shutdown`] or until every handle is gone.
    pub fn run(mut self, rx: &Receiver<Command>) {
        // How often the controller wakes up by itself (pin checks, retries).
        let tick = self.cfg.verify_interval;
        let mut next_tick = Instant::now() + tick;
        loop {
            let command = rx.recv_timeout(next_tick.saturating_duration_since(Instant::now()));
            match command {
                Ok(Command::Shutdown) | Err(RecvTimeoutError::Disconnected) => return,
                Ok(Command::Wait(reply)) => self.wait(reply),
                Ok(command) => {
                    let mut dirty = self.handle(command);
                    dirty |= self.take_source();
                    if dirty {
                        self.reconcile_logged();
                    }
                    self.publish();
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if Instant::now() >= next_tick {
                next_tick = Instant::now() + tick;
                self.tick();
            }
        }
    }

    /// `policy wait`: read the source again, apply what changed (and what was queued before),
    /// answer with the revision now in force.
    fn wait(&mut self, reply: Reply<WaitReport>) {
        let batch = self.source.sync_now();
        self.take_batch(batch);
        if self.applied_revision != self.config_revision || self.retry {
            self.reconcile_logged();
        }
        self.publish();
        let view = self.view.load();
        let _ = reply.send(Ok(WaitReport {
            config_revision: self.config_revision,
            applied_revision: self.applied_revision,
            rejected: self.rejected.clone(),
            refused: view.refusal_lines(),
        }));
    }

    /// Handle one command; `true` when the desired state changed and a reconcile is due.
    fn handle(&mut self, command: Command) -> bool {
        match command {
            Command::SourceChanged => self.take_source(),
            // Published before the answer: whoever sent the command sees its effect.
            Command::CniAdd(ep, reply) => {
                let result = self.cni_add(&ep);
                self.publish();
                let _ = reply.send(result);
                false
            }
            Command::CniDel(r, reply) => {
                let result = self.cni_del(&r);
                self.publish();
                let _ = reply.send(result);
                false
            }
            Command::CniCheck(r, reply) => {
                let _ = reply.send(self.cni_check(&r));
                false
            }
            Command::Wait(reply) => {
                self.wait(reply);
                false
            }
            Command::L7Port(port) => {
                if port == self.l7_port {
                    return false;
                }
                info!(
                    port,
                    "L7 filter {}",
                    if port == 0 {
                        "not ready: redirect-l7 flows drop"
                    } else {
                        "ready: redirect-l7 flows steer to it"
                    }
                );
                self.l7_port = port;
                true
            }
            Command::Encryption(state) => {
                if self.encryption.as_ref() == Some(&state) {
                    return false;
                }
                info!(
                    ifindex = state.ifindex,
                    peers = state.peers.len(),
                    "encryption device peers changed"
                );
                self.encryption = Some(state);
                true
            }
            Command::Shutdown => false,
        }
    }

    /// Take what the source has; `true` when objects changed.
    fn take_source(&mut self) -> bool {
        let batch = self.source.take();
        self.take_batch(batch)
    }

    /// Apply a source batch to the object set; `true` when objects changed.
    fn take_batch(&mut self, batch: SourceBatch) -> bool {
        let changed = batch.changes_objects();
        for key in &batch.deletes {
            self.objects.remove(key);
        }
        for sourced in batch.upserts {
            self.objects.insert(sourced.key(), sourced);
        }
        if let Some(rejected) = batch.rejected {
            self.rejected = rejected;
        }
        if changed {
            self.config_revision += 1;
        }
        changed
    }

    fn reconcile_logged(&mut self) {
        if let Err(e) = self.reconcile() {
            error!("applying the configuration: {e:#}");
        }
    }

    /// Compute the desired state from everything known and write what differs. A change
    /// refused for want of room while its stale entries were still in the map gets further
    /// rounds: each one frees what the previous one replaced.
    fn reconcile(&mut self) -> anyhow::Result<()> {
        const ROUNDS: usize = 4;
        for _ in 1..ROUNDS {
            if !self.reconcile_round()? {
                return Ok(());
            }
        }
        self.reconcile_round().map(drop)
    }

    /// One round of [`Self::reconcile`]: true when another round may admit more.
    fn reconcile_round(&mut self) -> anyhow::Result<bool> {
        let span = info_span!("reconcile", revision = self.config_revision);
        let _enter = span.enter();
        let started = Instant::now();
        let host = podnet::local_addresses();
        let model = Model::new(
            &self.cfg.node,
            self.objects.values(),
            self.registry.iter(),
            &host,
        );
        let needed = model.needed();
        let (allocated, id_error) = self.identities.sync(&needed.pods, &needed.cidrs);
        let mut problems = Vec::new();
        if let Some(e) = id_error {
            problems.push(format!("identity allocation: {e}"));
        }
        number_nodes(
            &mut self.node_ids,
            &self.cfg.state_dir,
            model.remote_nodes().map(str::to_owned).collect(),
        );
        let mut plan = model.plan(&allocated, &self.node_ids, &self.options);
        problems.append(&mut plan.problems);
        let fitted = plan::fit(
            std::mem::take(&mut plan.desired),
            &self.plan.desired,
            Capacity::KERNEL,
            self.cfg.policy_entries_per_endpoint,
        );
        problems.extend(fitted.ipcache_problem);
        let refusals = fitted.refusals;
        let mut desired = fitted.desired;
        plan::encryption_overlay(
            &mut desired,
            &plan.nodes,
            &self.node_ids,
            self.encryption.as_ref(),
            self.cfg.encryption_strict,
            &self.cfg.cluster_pod_cidrs,
        );
        let result = self.datapath.apply(&desired, self.l7_port);
        match result {
            Ok(stats) => {
                let again = fitted.over_capacity && stats.changed();
                if stats.changed() {
                    let changed = plan::changed_endpoints(&self.plan.desired, &desired);
                    if !changed.is_empty() {
                        let now = Instant::now();
                        let times = Arc::make_mut(&mut self.policy_changed);
                        times.retain(|id, _| {
                            desired.endpoints.values().any(|e| e.endpoint_id == *id)
                        });
                        times.extend(changed.into_iter().map(|id| (id, now)));
                    }
                }
                plan.desired = desired;
                self.plan = Arc::new(plan);
                let fresh = refusals
                    .iter()
                    .filter(|r| !self.refusals.iter().any(|o| o.endpoint_id == r.endpoint_id))
                    .count();
                self.refusals_total += fresh as u64;
                self.refusals = refusals;
                self.applied_revision = self.config_revision;
                self.last_apply = Some(Instant::now());
                self.retry = false;
                self.reconcile_problems = problems;
                if stats.changed() {
                    info!(
                        policy_written = stats.policy.written,
                        policy_removed = stats.policy.removed,
                        ipcache_written = stats.ipcache.written,
                        ipcache_removed = stats.ipcache.removed,
                        endpoints_written = stats.endpoints.written,
                        endpoints_removed = stats.endpoints.removed,
                        datapath_revision = stats.revision,
                        elapsed_ms = started.elapsed().as_millis(),
                        "policy applied"
                    );
                } else {
                    tracing::debug!("policy unchanged");
                }
                for r in &self.refusals {
                    warn!(
                        endpoint_id = r.endpoint_id,
                        policies = ?r.policies,
                        "policy not applied: {}", r.reason
                    );
                }
                Ok(again)
            }
            Err(e) => {
                // The maps keep what was written (the mirrors know); the last complete state
                // stays the reference for the next try.
                problems.push(format!("applying the configuration failed: {e}"));
                self.reconcile_problems = problems;
                self.retry = true;
                Err(e.into())
            }
        }
    }

    fn cni_add(&mut self, ep: &CniEndpoint) -> Result<(), ApiError> {
        let pod = format!("{}/{}", ep.pod_namespace, ep.pod_name);
        let span = info_span!("cni_add", pod = %pod);
        let _enter = span.enter();
        let key = CniRef {
            container_id: ep.container_id.clone(),
            ifname: ep.ifname.clone(),
        };
        let existing = self.registry.get(&key).cloned();
        if existing.is_none() && self.registry.len() >= Capacity::KERNEL.endpoints {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                format!(
                    "this node has {} endpoints, the most the datapath holds: pod not admitted",
                    self.registry.len()
                ),
            ));
        }
        let record = self.registry.check_add(ep)?;
        info!(id = record.id, ifname = %record.host_ifname, "endpoint added");
        self.registry.insert(record.clone());
        self.config_revision += 1;
        // Maps first (identity, isolation, policy), then the programs: the pod is never
        // attached without its policy in place.
        let outcome = match self.reconcile() {
            Err(e) => Err(ApiError::new(ErrorCode::Internal, format!("{e:#}"))),
            Ok(()) => match self
                .refusals
                .iter()
                .find(|r| r.endpoint_id == record.id && !r.kept_previous)
            {
                Some(r) => Err(ApiError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "the policy of pod {} cannot be enforced: {} (policies: {})",
                        record.pod(),
                        r.reason,
                        r.policies.join(", ")
                    ),
                )),
                None => self
                    .datapath
                    .attach(&record.host_ifname, record.ifindex)
                    .map_err(|e| ApiError::new(ErrorCode::Internal, format!("{e:#}"))),
            },
        }
        .and_then(|()| {
            self.registry
                .persist()
                .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))
        });
        if let Err(e) = outcome {
            warn!("endpoint not admitted: {e}");
            if let Some(old) = existing {
                self.registry.insert(old);
            } else {
                self.registry.remove(&key);
                // Programs of a refused ADD come off again: the runtime will not start
                // the pod (its interface has no endpoint entry, so it drops all anyway).
                let _ = self.datapath.detach(&record.host_ifname, record.ifindex);
            }
            self.config_revision += 1;
            self.reconcile_logged();
            return Err(ApiError::new(
                e.code,
                format!("adding endpoint {}: {}", record.pod(), e.message),
            ));
        }
        Ok(())
    }

    fn cni_del(&mut self, r: &CniRef) -> Result<(), ApiError> {
        let Some(record) = self.registry.remove(r) else {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!(
                    "no endpoint for container {} ({})",
                    r.container_id, r.ifname
                ),
            ));
        };
        info!(pod = %record.pod(), id = record.id, "endpoint deleted");
        // The programs stay on the interface until it goes away (the primary plugin removes
        // it next): without an endpoint entry they drop everything, so the pod is never
        // unfiltered in between. The tick prunes their pins once the interface is gone.
        self.config_revision += 1;
        let result = self.reconcile();
        let _ = self.ct.try_send(CtRequest::Purge {
            endpoint_id: record.id,
            ifindex: record.ifindex,
        });
        let persisted = self.registry.persist();
        result.map_err(|e| ApiError::new(ErrorCode::Internal, format!("{e:#}")))?;
        persisted.map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))
    }

    fn cni_check(&self, r: &CniRef) -> Result<(), ApiError> {
        let record = self.registry.get(r).ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                format!("container {} is not a weft endpoint", r.container_id),
            )
        })?;
        if !endpoints::still_attached(record) {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "interface {} is gone or was replaced (ifindex {} no longer matches)",
                    record.host_ifname, record.ifindex
                ),
            ));
        }
        Ok(())
    }

    fn tick(&mut self) {
        if self.retry {
            self.reconcile_logged();
        }
        self.verifications += 1;
        let deep = self.verifications.is_multiple_of(DEEP_VERIFY_EVERY);
        let findings = self.datapath.verify(deep);
        if !findings.is_empty() || deep {
            self.findings = findings;
        }
        let keep: Vec<(String, u32)> = self
            .registry
            .iter()
            .map(|e| (e.host_ifname.clone(), e.ifindex))
            .collect();
        self.datapath.release_gone_links(&keep);
        self.publish();
    }

    /// Publish the current state for readers.
    fn publish(&self) {
        let plan = self.plan.clone();
        let mut names = Names::default();
        for ep in self.registry.iter() {
            names.endpoints.insert(ep.id, ep.pod());
            for net in &ep.addresses {
                names.addresses.insert(net.addr(), (ep.pod(), None));
            }
        }
        for (addr, remote) in &plan.remote_pods {
            names
                .addresses
                .insert(*addr, (remote.pod.clone(), Some(remote.node.clone())));
        }
        names.identities = plan
            .identity_labels
            .iter()
            .map(|(id, l)| (*id, l.clone()))
            .collect();
        let mut problems = self.reconcile_problems.clone();
        problems.extend(self.findings.iter().cloned());
        let mut view = View {
            node: self.cfg.node.clone(),
            source: self.source.describe(),
            identity_backend: self.identities.describe(),
            pin_dir: self.datapath.pin_dir().display().to_string(),
            attach_mode: self.datapath.attach_mode().name().to_owned(),
            variant: self.datapath.variant().name().to_owned(),
            features: self.datapath.features().clone(),
            socket_redirect: self.datapath.socket_redirect().line(),
            config_revision: self.config_revision,
            applied_revision: self.applied_revision,
            datapath_revision: self.datapath.revision(),
            last_apply: self.last_apply,
            policy_changed: self.policy_changed.clone(),
            endpoints: Arc::new(self.registry.iter().cloned().collect()),
            plan,
            rejected: Arc::new(self.rejected.clone()),
            refusals: Arc::new(self.refusals.clone()),
            refusals_total: self.refusals_total,
            problems: Arc::default(),
            maps: self
                .datapath
                .map_sizes()
                .iter()
                .map(|(n, e, c)| ((*n).to_owned(), *e, *c))
                .collect(),
            names: Arc::new(names),
        };
        problems.extend(view.refusal_lines());
        view.problems = Arc::new(problems);
        self.view.store(Arc::new(view));
    }
}

/// Give every remote node a stable id for the datapath's node table.
fn number_nodes(
    node_ids: &mut BTreeMap<String, u16>,
    state_dir: &std::path::Path,
    names: BTreeSet<String>,
) {
    let before = node_ids.clone();
    node_ids.retain(|name, _| names.contains(name));
    let used: BTreeSet<u16> = node_ids.values().copied().collect();
    let mut free = (1..=u16::try_from(Capacity::KERNEL.nodes).unwrap_or(u16::MAX))
        .filter(|id| !used.contains(id));
    for name in names {
        if !node_ids.contains_key(&name)
            && let Some(id) = free.next()
        {
            node_ids.insert(name, id);
        }
    }
    if *node_ids != before
        && let Err(e) = fsutil::write_json(&state_dir.join(NODE_IDS_FILE), node_ids)
    {
        warn!("persisting node ids: {e}");
    }
}
