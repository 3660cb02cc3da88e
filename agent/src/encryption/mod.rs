//! Node-to-node encryption with WireGuard: the node's long-term key (generated on first
//! start, kept in the state directory at 0600, never logged), one device `weft_wg0` in the
//! node's network namespace, the other nodes as peers, and routes for their pod CIDRs
//! through the device.
//!
//! The module owns its state: a thread reads the controller's published view (never its
//! lock, never a datapath map), turns the node list into peers ([`peers::desired`]) and, when
//! that changes, sets the device's peers and the routes. What it did is published for the API
//! in its own [`Published`] snapshot.
//!
//! The device lives in this process (userspace WireGuard): when the agent dies the device and
//! the routes through it go with it, and the remote pod CIDRs have no route until the agent
//! is back (plaintext never takes over: the plain routes were replaced, not kept beside).
//! The restarted agent reuses the key, so peers only need a new handshake.

pub mod peers;
pub mod routes;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use arc_swap::ArcSwap;
use ipnet::IpNet;
use tracing::{info, warn};
use weft_api::{EncryptionPeerRow, EncryptionReport};
use weft_wg::{DEFAULT_LISTEN_PORT, DEFAULT_MTU, Device, DeviceConfig, PeerConfig, PrivateKey};

use crate::config::Config;
use crate::controller::Handle;
use crate::fsutil;
use crate::plan::EncryptionState;
use crate::source::local::write_node_object;
use crate::view::SharedView;

/// The device's name in the node's network namespace (each node has its own namespace).
pub const DEVICE_NAME: &str = "weft_wg0";
/// The private key's file in the agent's state directory.
pub const KEY_FILE: &str = "wireguard.key";
/// Where `wg` looks for userspace devices' UAPI sockets.
const UAPI_DIR: &str = "/var/run/wireguard";
/// How often the view is looked at: node churn reaches the device well within 2 s.
const POLL: Duration = Duration::from_millis(100);

/// The interface name `wg` knows this node's device by: `weft-<node>`, or for long node
/// names `weft-` and a hash of the name (interface names have at most 15 bytes). The UAPI
/// socket directory is machine-wide, so the name must differ per node, not per namespace.
pub fn wg_interface(node: &str) -> String {
    let name = format!("weft-{node}");
    if name.len() <= 15 {
        return name;
    }
    // FNV-1a: stable across runs and builds (the socket path must not change on restart).
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in node.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("weft-{:010x}", hash & 0xff_ffff_ffff)
}

/// The node's private key from `state_dir`, created (0600, atomically) on first start.
///
/// # Errors
/// When the key file cannot be read or written, or does not hold a key (the agent refuses
/// to start rather than silently replace a node's identity).
pub fn load_or_create_key(state_dir: &Path) -> anyhow::Result<PrivateKey> {
    let path = state_dir.join(KEY_FILE);
    match fsutil::read_capped(&path, 256) {
        Ok(Some(bytes)) => {
            // Tighten what someone loosened: the key is root's only.
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .with_context(|| format!("chmod 0600 {}", path.display()))?;
            let text = String::from_utf8_lossy(&bytes);
            text.trim().parse::<PrivateKey>().map_err(|e| {
                anyhow::anyhow!(
                    "{}: {e}; remove the file to give the node a new key",
                    path.display()
                )
            })
        }
        Ok(None) => anyhow::bail!("{} is larger than a WireGuard key", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = PrivateKey::generate();
            fsutil::atomic_write(&path, format!("{}\n", key.to_base64()).as_bytes())?;
            info!(file = %path.display(), public_key = %key.public_key(), "generated this node's WireGuard key");
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// What the reconcile thread last did, for the API.
#[derive(Debug, Clone, Default)]
pub struct Published {
    pub peers: Vec<peers::DesiredPeer>,
    pub routes: BTreeSet<IpNet>,
    pub problems: Vec<String>,
}

/// The running encryption of this node.
pub struct Encryption {
    device: Arc<Device>,
    config: Arc<Config>,
    key_file: PathBuf,
    /// One rotation at a time (key file, device and `Node` object change together).
    rotating: Mutex<()>,
    mtu: u32,
    published: Arc<ArcSwap<Published>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Encryption {
    /// Create the device in the calling thread's network namespace (the node's) and start
    /// following `view`.
    ///
    /// # Errors
    /// When the device cannot be created (another agent's device answers on the UAPI socket,
    /// the port is taken, no tun support).
    pub fn start(
        config: Arc<Config>,
        key: PrivateKey,
        view: SharedView,
        controller: Handle,
    ) -> anyhow::Result<Self> {
        let interface = wg_interface(&config.node);
        let device_config = DeviceConfig::new(
            DEVICE_NAME,
            key,
            Path::new(UAPI_DIR).join(format!("{interface}.sock")),
        );
        let mtu = device_config.mtu;
        debug_assert_eq!(mtu, DEFAULT_MTU);
        let device = Arc::new(
            Device::create(device_config)
                .with_context(|| format!("creating WireGuard device {DEVICE_NAME}"))?,
        );
        let ifindex = crate::podnet::link(DEVICE_NAME)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .ifindex;
        let published = Arc::new(ArcSwap::from_pointee(Published::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (device, published, stop) = (device.clone(), published.clone(), stop.clone());
            std::thread::Builder::new()
                .name("encryption".into())
                .spawn(move || {
                    Reconciler {
                        device,
                        ifindex,
                        last: None,
                        routes: BTreeSet::new(),
                        controller,
                        reported: None,
                    }
                    .run(&view, &published, &stop);
                })
                .context("starting the encryption thread")?
        };
        info!(
            device = DEVICE_NAME,
            wg_interface = %interface,
            port = device.listen_port(),
            mtu,
            "encryption on (WireGuard)"
        );
        Ok(Self {
            device,
            key_file: config.state_dir.join(KEY_FILE),
            config,
            rotating: Mutex::new(()),
            mtu,
            published,
            stop,
            thread: Some(thread),
        })
    }

    /// For `weft encryption status`.
    pub fn report(&self) -> EncryptionReport {
        let published = self.published.load();
        let stats = self.device.peers();
        let now = SystemTime::now();
        let peers = published
            .peers
            .iter()
            .map(|p| {
                let live = stats.iter().find(|s| s.public_key == p.public_key);
                EncryptionPeerRow {
                    node: p.node.clone(),
                    public_key: p.public_key.to_string(),
                    endpoint: live
                        .and_then(|s| s.endpoint)
                        .or(Some(p.endpoint))
                        .map(|e| e.to_string()),
                    allowed_ips: p.allowed_ips.clone(),
                    last_handshake_seconds_ago: live
                        .and_then(|s| s.last_handshake)
                        .map(|t| now.duration_since(t).unwrap_or_default().as_secs()),
                    rx_bytes: live.map_or(0, |s| s.rx_bytes),
                    tx_bytes: live.map_or(0, |s| s.tx_bytes),
                }
            })
            .collect();
        EncryptionReport {
            mode: "wireguard".into(),
            device: DEVICE_NAME.into(),
            wg_interface: wg_interface(&self.config.node),
            public_key: self.device.public_key().to_string(),
            listen_port: self.device.listen_port(),
            mtu: self.mtu,
            key_age_seconds: std::fs::metadata(&self.key_file)
                .and_then(|m| m.modified())
                .ok()
                .map(|t| now.duration_since(t).unwrap_or_default().as_secs()),
            peers,
            routes: published.routes.iter().copied().collect(),
            strict: self.config.encryption_strict,
            problems: published.problems.clone(),
        }
    }

    /// Replace the node's long-term key: stored first (a restart picks up the new key), then
    /// the device (the old key keeps answering peers that have not learned the new one, for
    /// at most 180 s), then the node's `Node` object (peers learn the new key from it).
    ///
    /// # Errors
    /// A message for the operator when the key cannot be stored or the object not written.
    pub fn rotate(&self) -> Result<String, String> {
        let _one = self.rotating.lock().unwrap_or_else(PoisonError::into_inner);
        let key = PrivateKey::generate();
        let public = key.public_key().to_string();
        fsutil::atomic_write(&self.key_file, format!("{}\n", key.to_base64()).as_bytes())
            .map_err(|e| format!("storing the new key: {e}"))?;
        self.device.set_private_key(key);
        if let Some(node) = self.config.own_node(Some(public.clone())) {
            write_node_object(&self.config.source_dir, &node)
                .map_err(|e| format!("publishing the new public key: {e:#}"))?;
        }
        info!(public_key = %public, "rotated this node's WireGuard key");
        Ok(public)
    }

    /// The line `weft status` prints.
    pub fn summary(&self) -> String {
        let report = self.report();
        let shaken = report
            .peers
            .iter()
            .filter(|p| p.last_handshake_seconds_ago.is_some())
            .count();
        let problems = match report.problems.len() {
            0 => String::new(),
            n => format!(", {n} problem(s)"),
        };
        format!(
            "wireguard on {} (wg interface {}, port {}, strict mode {}): {} peer(s), {shaken} with a handshake{problems}",
            report.device,
            report.wg_interface,
            report.listen_port,
            if report.strict { "on" } else { "off" },
            report.peers.len()
        )
    }

    /// Problems for `weft status`.
    pub fn problems(&self) -> Vec<String> {
        self.published
            .load()
            .problems
            .iter()
            .map(|p| format!("encryption: {p}"))
            .collect()
    }
}

impl Drop for Encryption {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The encryption thread's own state: what the device and the routes hold.
struct Reconciler {
    device: Arc<Device>,
    ifindex: u32,
    /// The peer set last applied completely; `None` before the first (or after a failure,
    /// so the next turn tries again).
    last: Option<peers::Desired>,
    routes: BTreeSet<IpNet>,
    /// Tells the controller which nodes the device carries (their `encrypt` flag in the
    /// datapath's node table, which strict encryption checks).
    controller: Handle,
    /// What the controller last accepted.
    reported: Option<EncryptionState>,
}

impl Reconciler {
    fn run(mut self, view: &SharedView, published: &ArcSwap<Published>, stop: &AtomicBool) {
        let port = DEFAULT_LISTEN_PORT;
        while !stop.load(Ordering::Relaxed) {
            let current = view.load();
            // Read every turn: a rotation changes it.
            let own_key = self.device.public_key();
            let desired = peers::desired(&current.plan.nodes, &own_key, port);
            if self.last.as_ref() != Some(&desired) {
                // Nodes leaving (or changing key) stop counting as encrypted before their
                // peer and routes go: strict mode drops their traffic from then on, never
                // sends it past a half-removed tunnel.
                let before = self.reported.as_ref().map(|r| r.peers.clone());
                if let Some(before) = before {
                    let staying = carried(&desired);
                    self.report(before.intersection(&staying).cloned().collect());
                }
                let failures = self.apply(&desired);
                let mut problems = desired.problems.clone();
                problems.extend(failures.iter().cloned());
                published.store(Arc::new(Published {
                    peers: desired.peers.clone(),
                    routes: self.routes.clone(),
                    problems,
                }));
                if failures.is_empty() {
                    self.report(carried(&desired));
                }
                self.last = failures.is_empty().then_some(desired);
            } else if self.reported.is_none() {
                // The controller's queue was full: tell it again.
                if let Some(last) = &self.last {
                    let peers = carried(last);
                    self.report(peers);
                }
            }
            std::thread::sleep(POLL);
        }
    }

    /// Hand the controller the nodes the device carries; on a full queue, `reported` stays
    /// unset and the next turn tries again (meanwhile the old, smaller set holds).
    fn report(&mut self, peers: BTreeSet<String>) {
        let state = EncryptionState {
            ifindex: self.ifindex,
            peers,
        };
        if self.reported.as_ref() == Some(&state) {
            return;
        }
        if self.controller.encryption_state(state.clone()) {
            self.reported = Some(state);
        } else {
            self.reported = None;
        }
    }

    /// Peers first, then routes: a route never points into the device before the peer that
    /// carries its prefix exists. Returns what failed (tried again on the next turn).
    fn apply(&mut self, desired: &peers::Desired) -> Vec<String> {
        let mut failures = Vec::new();
        let configs: Vec<PeerConfig> = desired
            .peers
            .iter()
            .map(|p| PeerConfig {
                public_key: p.public_key,
                endpoint: Some(p.endpoint),
                allowed_ips: p.allowed_ips.clone(),
                persistent_keepalive: None,
            })
            .collect();
        if let Err(e) = self.device.replace_peers(configs) {
            failures.push(format!("setting the device's peers: {e}"));
        }
        // Shake hands with new peers (a node that joined, restarted, or rotated its key) now,
        // rather than on the first packet: the other side may have tried with a key this
        // node did not know yet, and would only try again after WireGuard's 5 s rekey timeout.
        let known: Vec<weft_wg::PublicKey> = self
            .last
            .iter()
            .flat_map(|d| d.peers.iter().map(|p| p.public_key))
            .collect();
        for peer in desired
            .peers
            .iter()
            .filter(|p| !known.contains(&p.public_key))
        {
            if let Err(e) = self.device.rekey_peer(&peer.public_key) {
                warn!(node = %peer.node, "starting a handshake: {e}");
            }
        }
        let want: BTreeSet<IpNet> = desired
            .peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().copied())
            .collect();
        for cidr in self.routes.difference(&want).copied().collect::<Vec<_>>() {
            match routes::delete(cidr, self.ifindex) {
                Ok(()) => {
                    self.routes.remove(&cidr);
                }
                Err(e) => failures.push(e),
            }
        }
        for cidr in &want {
            if self.routes.contains(cidr) {
                continue;
            }
            match routes::replace(*cidr, self.ifindex) {
                Ok(()) => {
                    self.routes.insert(*cidr);
                }
                Err(e) => failures.push(e),
            }
        }
        for f in &failures {
            warn!("encryption: {f}");
        }
        info!(
            peers = desired.peers.len(),
            routes = self.routes.len(),
            "encryption peers and routes set"
        );
        failures
    }
}

/// The nodes whose pod CIDRs the device carries: peers with at least one routed prefix.
fn carried(desired: &peers::Desired) -> BTreeSet<String> {
    desired
        .peers
        .iter()
        .filter(|p| !p.allowed_ips.is_empty())
        .map(|p| p.node.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wg_interface_names_fit_and_stay_distinct() {
        assert_eq!(wg_interface("n1"), "weft-n1");
        assert_eq!(wg_interface("wt1a2b3-n1"), "weft-wt1a2b3-n1");
        let long = wg_interface("worker-node-17.example.com");
        assert!(long.len() <= 15, "{long}");
        assert_ne!(long, wg_interface("worker-node-18.example.com"));
        assert_eq!(long, wg_interface("worker-node-17.example.com"));
    }

    #[test]
    fn the_key_is_created_once_at_0600_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("weft-enc-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let first = load_or_create_key(&dir).expect("created");
        let mode = std::fs::metadata(dir.join(KEY_FILE))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = load_or_create_key(&dir).expect("read back");
        assert_eq!(first.public_key(), again.public_key());
        std::fs::write(dir.join(KEY_FILE), "not a key").expect("write");
        let err = load_or_create_key(&dir).expect_err("garbage is refused");
        assert!(err.to_string().contains(KEY_FILE), "{err}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
