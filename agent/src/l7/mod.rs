//! The L7 filter's supervisor: it owns the `weft-l7` process. When a local endpoint has an
//! HTTP rule in the published view it starts the filter, configures it over its control
//! socket from the view, waits for `ready`, and only then tells the controller the filter's
//! port (until then, and whenever the filter is gone, `redirect-l7` flows drop with
//! `l7-unavailable`). A filter that dies is started again with a bounded backoff (well
//! under a second); the filter is stopped when no rule needs it and on agent shutdown.

pub mod config;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tracing::{info, warn};
use weft_api::L7FilterReport;
use weft_l7::{Config, ControlClient};

use crate::controller::Handle;
use crate::view::View;

/// First wait before starting a dead filter again; doubled per quick death up to
/// [`MAX_BACKOFF`], reset once a filter stayed up for [`STABLE_AFTER`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_millis(800);
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// How long a started filter may take to open its control socket and take a configuration.
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stopped filter may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the view is looked at (it is compared by pointer; cheap).
const POLL: Duration = Duration::from_millis(50);
const PID_FILE: &str = "l7.pid";
pub const CONTROL_SOCKET: &str = "l7.sock";

/// How the agent runs the filter.
#[derive(Debug, Clone)]
pub struct Settings {
    pub binary: PathBuf,
    /// The filter's control socket and pid file live here (the agent's state directory).
    pub state_dir: PathBuf,
    /// Port of the filter's transparent listener on 127.0.0.1 (the datapath steers there).
    pub port: u16,
}

impl Settings {
    /// `weft-l7` next to the running agent binary.
    pub fn default_binary() -> PathBuf {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("weft-l7")))
            .unwrap_or_else(|| PathBuf::from("weft-l7"))
    }

    pub fn control(&self) -> PathBuf {
        self.state_dir.join(CONTROL_SOCKET)
    }
}

/// What `weft status` shows, published by the supervisor (its own state, not the view's).
pub type SharedStatus = Arc<ArcSwap<L7FilterReport>>;

pub fn new_status() -> SharedStatus {
    Arc::new(ArcSwap::from_pointee(L7FilterReport {
        state: "off".into(),
        ..L7FilterReport::default()
    }))
}

/// A running filter process.
struct Running {
    child: Child,
    pid: Option<u32>,
    started: Instant,
    control: Option<ControlClient>,
    /// The configuration in force in it (revision 0), once `ready`.
    applied: Option<Config>,
}

pub struct Supervisor {
    settings: Settings,
    controller: Handle,
    status: SharedStatus,
    running: Option<Running>,
    /// The port the controller was last told (0: not ready).
    told: Option<u16>,
    revision: u64,
    restarts: u64,
    backoff: Duration,
    /// No start before this (after a death).
    not_before: Instant,
    last_error: Option<String>,
    endpoints: usize,
}

impl Supervisor {
    pub fn new(settings: Settings, controller: Handle, status: SharedStatus) -> Self {
        Self {
            settings,
            controller,
            status,
            running: None,
            told: None,
            revision: 0,
            restarts: 0,
            backoff: FIRST_BACKOFF,
            not_before: Instant::now(),
            last_error: None,
            endpoints: 0,
        }
    }

    /// Supervise until `shutdown` turns true; the filter is stopped before returning.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        kill_stale(&self.settings.state_dir);
        let view = self.controller.shared_view();
        let mut seen: Option<Arc<View>> = None;
        let mut want = Config::default();
        loop {
            let current = view.load_full();
            if seen.as_ref().is_none_or(|s| !same_state(s, &current)) {
                want = config::from_view(&current);
                self.endpoints = want.endpoints.len();
                seen = Some(current);
            }
            self.step(&want).await;
            self.publish();
            let exited = async {
                match self.running.as_mut() {
                    Some(r) => r.child.wait().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.changed() => break,
                status = exited => self.died(status),
                () = tokio::time::sleep(POLL) => {}
            }
        }
        self.stop().await;
        self.tell_controller(0);
        self.publish();
    }

    /// Bring the process to what `want` needs: started, configured, or stopped.
    async fn step(&mut self, want: &Config) {
        if !config::needed(want) {
            if self.running.is_some() {
                info!("no HTTP rule on this node needs the L7 filter: stopping it");
                self.tell_controller(0);
                self.stop().await;
            }
            self.tell_controller(0);
            return;
        }
        if self.running.is_none() {
            if Instant::now() < self.not_before {
                return;
            }
            if let Err(e) = self.start() {
                warn!("starting the L7 filter: {e:#}");
                self.last_error = Some(format!("{e:#}"));
                self.schedule_restart();
                return;
            }
        }
        let settings = self.settings.clone();
        let Some(running) = self.running.as_mut() else {
            return;
        };
        if running.control.is_none() {
            match ControlClient::connect(&settings.control()).await {
                Ok(c) => running.control = Some(c),
                Err(_) if running.started.elapsed() < START_TIMEOUT => return,
                Err(e) => {
                    let msg = format!("the L7 filter did not open its control socket: {e}");
                    self.fail(msg).await;
                    return;
                }
            }
        }
        if running.applied.as_ref() == Some(want) {
            return;
        }
        self.revision += 1;
        let revision = self.revision;
        let control = running.control.as_mut().expect("connected above");
        let sent = Config {
            revision,
            ..want.clone()
        };
        match tokio::time::timeout(START_TIMEOUT, control.configure(sent)).await {
            Ok(Ok(Ok(r))) => {
                info!(
                    revision = r,
                    endpoints = want.endpoints.len(),
                    "L7 filter configured"
                );
                running.applied = Some(want.clone());
                let port = settings.port;
                self.tell_controller(port);
            }
            Ok(Ok(Err(reason))) => {
                // The filter keeps what it had (or, never configured, refuses everything);
                // the datapath keeps steering only if it was ready before.
                warn!("the L7 filter refused its configuration: {reason}");
                running.applied = Some(want.clone());
                self.last_error = Some(format!("configuration refused: {reason}"));
            }
            Ok(Err(e)) => self.fail(format!("configuring the L7 filter: {e}")).await,
            Err(_) => {
                self.fail("the L7 filter did not answer its configuration in time".into())
                    .await;
            }
        }
    }

    fn start(&mut self) -> anyhow::Result<()> {
        use anyhow::Context;
        let control = self.settings.control();
        let _ = std::fs::remove_file(&control);
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, self.settings.port));
        let child = Command::new(&self.settings.binary)
            .arg("--control")
            .arg(&control)
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--transparent")
            .arg("--upstream-mark")
            .arg(weft_common::l7_mark::FROM_PROXY.to_string())
            .arg("--access-log")
            .arg("--exit-with-parent")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("running {}", self.settings.binary.display()))?;
        let pid = child.id();
        if let Some(pid) = pid {
            let _ = std::fs::write(self.settings.state_dir.join(PID_FILE), pid.to_string());
        }
        info!(pid, binary = %self.settings.binary.display(), %listen, "L7 filter started");
        self.running = Some(Running {
            child,
            pid,
            started: Instant::now(),
            control: None,
            applied: None,
        });
        Ok(())
    }

    /// The filter exited by itself.
    fn died(&mut self, status: std::io::Result<ExitStatus>) {
        self.tell_controller(0);
        let Some(running) = self.running.take() else {
            return;
        };
        let how = match status {
            Ok(s) => s.to_string(),
            Err(e) => format!("waiting for it failed: {e}"),
        };
        warn!(
            pid = running.pid,
            "the L7 filter died ({how}): starting it again"
        );
        self.last_error = Some(format!("filter exited: {how}"));
        self.restarts += 1;
        if running.started.elapsed() >= STABLE_AFTER {
            self.backoff = FIRST_BACKOFF;
        }
        self.schedule_restart();
    }

    /// A filter that does not work as it should: kill it, start again later.
    async fn fail(&mut self, message: String) {
        warn!("{message}: restarting it");
        self.last_error = Some(message);
        self.tell_controller(0);
        self.stop().await;
        self.restarts += 1;
        self.schedule_restart();
    }

    fn schedule_restart(&mut self) {
        self.not_before = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`].
    async fn stop(&mut self) {
        let Some(mut running) = self.running.take() else {
            return;
        };
        if let Some(pid) = running.pid.and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(STOP_TIMEOUT, running.child.wait())
            .await
            .is_err()
        {
            let _ = running.child.kill().await;
        }
        let _ = std::fs::remove_file(self.settings.state_dir.join(PID_FILE));
        info!(pid = running.pid, "L7 filter stopped");
    }

    /// Steer `redirect-l7` flows to `port` (0: drop them). Sent on change only; a full
    /// queue is tried again on the next turn.
    fn tell_controller(&mut self, port: u16) {
        if self.told == Some(port) {
            return;
        }
        if self.controller.l7_port(port) {
            self.told = Some(port);
        }
    }

    fn publish(&self) {
        let state = match (&self.running, self.told) {
            (None, _) if self.endpoints == 0 => "off",
            (None, _) => "down",
            (Some(_), Some(p)) if p != 0 => "ready",
            (Some(_), _) => "starting",
        };
        let report = L7FilterReport {
            state: state.into(),
            restarts: self.restarts,
            pid: self.running.as_ref().and_then(|r| r.pid),
            revision: self
                .running
                .as_ref()
                .and_then(|r| r.applied.as_ref().map(|_| self.revision)),
            endpoints: self.endpoints,
            last_error: self.last_error.clone(),
        };
        if **self.status.load() != report {
            self.status.store(Arc::new(report));
        }
    }
}

/// Feed the filter's access records into the flow hub (`weft observe` shows them as L7
/// flows), following the filter across restarts, until the task is aborted.
pub async fn follow_access(control: PathBuf, hub: Arc<crate::observe::FlowHub>) {
    loop {
        if let Ok(mut client) = ControlClient::connect(&control).await
            && client
                .send(&weft_l7::ControlRequest::Subscribe)
                .await
                .is_ok()
        {
            loop {
                match client.next().await {
                    Ok(weft_l7::ControlEvent::Access { record }) => {
                        hub.record_flow(hub.access_flow(&record));
                    }
                    Ok(weft_l7::ControlEvent::Lagged { dropped }) => hub.note_lagged(dropped),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
        tokio::time::sleep(POLL * 4).await;
    }
}

/// Whether two views hold the same inputs of the filter configuration.
fn same_state(a: &View, b: &View) -> bool {
    Arc::ptr_eq(&a.plan, &b.plan) && Arc::ptr_eq(&a.endpoints, &b.endpoints)
}

/// A filter left behind by an agent that was killed: stop it (its pid file names it, and
/// it is only killed when its command line says it is that filter).
fn kill_stale(state_dir: &Path) {
    let file = state_dir.join(PID_FILE);
    let Ok(text) = std::fs::read_to_string(&file) else {
        return;
    };
    let _ = std::fs::remove_file(&file);
    let Ok(pid) = text.trim().parse::<i32>() else {
        return;
    };
    let control = state_dir.join(CONTROL_SOCKET);
    let ours = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| {
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        cmd.contains("weft-l7") && cmd.contains(&*control.to_string_lossy())
    });
    if ours {
        warn!(pid, "stopping the L7 filter a previous agent left behind");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}
