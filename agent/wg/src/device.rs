//! The device: a tun interface, one UDP socket and a UAPI socket, driven by a fixed set of
//! threads (tun→UDP, UDP→tun, timers, UAPI). Owns the peer table; protocol state per peer is
//! boringtun's [`Tunn`], used as a pure state machine.
//!
//! Lock order: `state` (read for packets, write for configuration) is released before a peer's
//! `inner` mutex is taken on the packet paths, and never taken while one is held, so
//! configuration changes cannot deadlock with traffic.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use ipnet::IpNet;

use crate::allowed_ips::AllowedIps;
use crate::datapath;
use crate::error::Error;
use crate::key::{PrivateKey, PublicKey};
use crate::sys;
use crate::uapi;

/// weft's WireGuard UDP port.
pub const DEFAULT_LISTEN_PORT: u16 = 51871;
/// Device MTU: 1500 on the underlay minus 80 bytes of WireGuard over IPv6 overhead.
pub const DEFAULT_MTU: u32 = 1420;
/// Handshakes per second per device before cookies are demanded (boringtun's default).
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// How often timers run (boringtun's device uses the same tick).
const TIMER_TICK: Duration = Duration::from_millis(250);
/// After a key rotation, how long the old key's sessions keep being accepted once the new key
/// has a session (packets in flight), and at most in any case (WireGuard's reject-after-time).
const DRAIN_AFTER_NEW_SESSION: Duration = Duration::from_secs(5);
const DRAIN_MAX: Duration = Duration::from_mins(3);

/// How to create a [`Device`].
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Interface name (at most 15 bytes), e.g. `weft_wg0`, created in the caller's netns.
    pub name: String,
    pub private_key: PrivateKey,
    /// UDP port on all addresses (0: let the kernel choose; see [`Device::listen_port`]).
    pub listen_port: u16,
    /// `SO_MARK` on encrypted packets (0: none), so routing rules can keep them off the tunnel.
    pub fwmark: u32,
    pub mtu: u32,
    /// Where to serve the WireGuard UAPI. `wg` finds `/var/run/wireguard/<name>.sock` as
    /// interface `<name>`, so `/var/run/wireguard/weft-n1.sock` is `wg show weft-n1`; the
    /// device name is not used for the socket, so node namespaces with the same device name
    /// do not collide.
    pub uapi_socket: PathBuf,
    /// Batching offloads: tun `IFF_VNET_HDR` + TSO/USO, UDP GSO/GRO, TCP coalescing. On by
    /// default; off gives the one-packet-per-call path (for comparison and old kernels).
    pub offload: bool,
}

impl DeviceConfig {
    /// weft's defaults: port 51871, MTU 1420, no fwmark, offloads on.
    pub fn new(name: &str, private_key: PrivateKey, uapi_socket: PathBuf) -> Self {
        Self {
            name: name.to_string(),
            private_key,
            listen_port: DEFAULT_LISTEN_PORT,
            fwmark: 0,
            mtu: DEFAULT_MTU,
            uapi_socket,
            offload: true,
        }
    }
}

/// One peer's configuration (the peer is named by its public key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: PublicKey,
    /// Where to send; `None` until the peer is heard from (it then roams to the source).
    pub endpoint: Option<SocketAddr>,
    /// Inner addresses routed to this peer and accepted from it.
    pub allowed_ips: Vec<IpNet>,
    /// Seconds between keepalives when idle (`None`: off).
    pub persistent_keepalive: Option<u16>,
}

/// A peer as the device sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
    /// Wall-clock time of the current session's handshake (`None`: no session).
    pub last_handshake: Option<SystemTime>,
    /// UDP payload bytes received from and sent to this peer (WireGuard messages).
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

// === impl Device ===

/// A running WireGuard device; dropping it stops the threads, removes the tun device and the
/// UAPI socket.
pub struct Device {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) tun: File,
    pub(crate) udp: UdpSocket,
    pub(crate) listen_port: u16,
    /// Offloads the tun accepted (`TUN_F_*`); 0 with `offload: false`.
    pub(crate) tun_offload: u32,
    pub(crate) vnet_hdr: bool,
    pub(crate) udp_gro: bool,
    pub(crate) uapi_socket: PathBuf,
    state: RwLock<State>,
    stop: AtomicBool,
}

struct State {
    key: PrivateKey,
    public: x25519::PublicKey,
    /// The key before the last rotation and when it was replaced: peers that have not learned
    /// the new public key yet may still handshake with it, for [`DRAIN_MAX`].
    previous: Option<(PrivateKey, x25519::PublicKey, Instant)>,
    fwmark: u32,
    limiter: Arc<RateLimiter>,
    peers: HashMap<PublicKey, Arc<Peer>>,
    /// Tunn index (the receiver index without its low 8 session bits) → peer, for the current
    /// and the draining tunnel of each peer.
    by_index: HashMap<u32, Arc<Peer>>,
    allowed: HashMap<PublicKey, Vec<IpNet>>,
    routes: AllowedIps<Arc<Peer>>,
    next_index: u32,
}

pub(crate) struct Peer {
    public_key: PublicKey,
    keepalive: Option<u16>,
    pub(crate) rx_bytes: AtomicU64,
    pub(crate) tx_bytes: AtomicU64,
    pub(crate) inner: Mutex<PeerInner>,
}

pub(crate) struct PeerInner {
    current: Tunn,
    current_index: u32,
    /// The tunnel of the previous private key, kept so its sessions drain after a rotation.
    draining: Option<Draining>,
    pub(crate) endpoint: Option<SocketAddr>,
}

struct Draining {
    tunn: Tunn,
    index: u32,
    since: Instant,
    new_session_at: Option<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Device {
    /// Create the tun device and UDP socket in the calling thread's network namespace, serve
    /// the UAPI socket and start the I/O threads.
    pub fn create(config: DeviceConfig) -> Result<Self, Error> {
        let offload = if config.offload {
            sys::TUN_F_CSUM | sys::TUN_F_TSO4 | sys::TUN_F_TSO6 | sys::TUN_F_USO4 | sys::TUN_F_USO6
        } else {
            0
        };
        let (tun, tun_offload) =
            sys::open_tun(&config.name, config.offload, offload).map_err(|source| Error::Tun {
                name: config.name.clone(),
                source,
            })?;
        sys::set_mtu_and_up(&config.name, config.mtu).map_err(|source| Error::Interface {
            name: config.name.clone(),
            mtu: config.mtu,
            source,
        })?;
        let udp = bind_udp(config.listen_port).map_err(|source| Error::Bind {
            port: config.listen_port,
            source,
        })?;
        let listen_port = udp.local_addr().map_or(config.listen_port, |a| a.port());
        sys::set_buffers(udp.as_raw_fd(), 4 << 20);
        if config.fwmark != 0 {
            sys::set_mark(udp.as_raw_fd(), config.fwmark).map_err(|source| {
                Error::SocketOption {
                    what: "fwmark",
                    source,
                }
            })?;
        }
        let udp_gro = config.offload && sys::enable_udp_gro(udp.as_raw_fd());
        let listener = uapi::bind(&config.uapi_socket)?;
        let public = x25519::PublicKey::from(config.private_key.secret());
        let shared = Arc::new(Shared {
            name: config.name.clone(),
            tun,
            udp,
            listen_port,
            tun_offload,
            vnet_hdr: config.offload,
            udp_gro,
            uapi_socket: config.uapi_socket.clone(),
            state: RwLock::new(State {
                limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
                key: config.private_key,
                public,
                previous: None,
                fwmark: config.fwmark,
                peers: HashMap::new(),
                by_index: HashMap::new(),
                allowed: HashMap::new(),
                routes: AllowedIps::default(),
                next_index: initial_index(),
            }),
            stop: AtomicBool::new(false),
        });
        let mut device = Self {
            shared,
            threads: Vec::new(),
        };
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(f)
                .map_err(Error::Spawn)
        };
        let s = device.shared.clone();
        device
            .threads
            .push(spawn("wg-tun", Box::new(move || datapath::tun_loop(&s)))?);
        let s = device.shared.clone();
        device
            .threads
            .push(spawn("wg-udp", Box::new(move || datapath::udp_loop(&s)))?);
        let s = device.shared.clone();
        device
            .threads
            .push(spawn("wg-timers", Box::new(move || timer_loop(&s)))?);
        let s = device.shared.clone();
        device.threads.push(spawn(
            "wg-uapi",
            Box::new(move || uapi::serve(&s, &listener)),
        )?);
        tracing::info!(
            device = %device.shared.name,
            port = listen_port,
            public_key = %device.public_key(),
            offload = format_args!("{tun_offload:#x}"),
            udp_gro,
            "WireGuard device up"
        );
        Ok(device)
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The UDP port actually bound.
    pub fn listen_port(&self) -> u16 {
        self.shared.listen_port
    }

    pub fn public_key(&self) -> PublicKey {
        self.shared.public_key()
    }

    pub fn uapi_socket(&self) -> &std::path::Path {
        &self.shared.uapi_socket
    }

    /// Add a peer or update one (endpoint if given, allowed IPs replaced, keepalive).
    pub fn set_peer(&self, peer: PeerConfig) -> Result<(), Error> {
        self.shared.set_peer(peer)
    }

    /// Make `peers` the whole peer set: others are removed, listed ones added or updated
    /// (an unchanged peer keeps its session).
    pub fn replace_peers(&self, peers: Vec<PeerConfig>) -> Result<(), Error> {
        let keep: Vec<PublicKey> = peers.iter().map(|p| p.public_key).collect();
        for key in self.shared.peer_keys() {
            if !keep.contains(&key) {
                self.shared.remove_peer(&key);
            }
        }
        for peer in peers {
            self.shared.set_peer(peer)?;
        }
        Ok(())
    }

    /// Remove a peer and its sessions; `false` when there was none.
    pub fn remove_peer(&self, key: &PublicKey) -> bool {
        self.shared.remove_peer(key)
    }

    pub fn peers(&self) -> Vec<PeerStats> {
        self.shared.peers()
    }

    /// Rotate the long-term key: new handshakes use `key` at once; sessions made with the old
    /// key keep carrying traffic until the new key has a session with that peer.
    pub fn set_private_key(&self, key: PrivateKey) {
        self.shared.set_private_key(key);
    }

    /// Start a new handshake with `key` now (new session keys; the long-term keys stay).
    pub fn rekey_peer(&self, key: &PublicKey) -> Result<(), Error> {
        self.shared.rekey_peer(key)
    }

    /// Change the mark on encrypted packets.
    pub fn set_fwmark(&self, mark: u32) -> Result<(), Error> {
        self.shared.set_fwmark(mark)
    }

    /// The offloads in effect: (tun `TUN_F_*` flags, UDP GRO).
    pub fn offloads(&self) -> (u32, bool) {
        (self.shared.tun_offload, self.shared.udp_gro)
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("name", &self.shared.name)
            .field("listen_port", &self.shared.listen_port)
            .field("public_key", &self.public_key())
            .finish_non_exhaustive()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.shared.uapi_socket);
    }
}

fn bind_udp(port: u16) -> io::Result<UdpSocket> {
    // Dual stack when the namespace has IPv6; IPv4 only otherwise.
    UdpSocket::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
        .or_else(|_| UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], port))))
}

fn initial_index() -> u32 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (nanos ^ std::process::id().rotate_left(12)) & 0x00ff_ffff
}

// === impl Shared ===

/// Which of a peer's tunnels a packet belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Which {
    Current,
    /// A handshake made with the previous private key: the draining tunnel answers it.
    Previous,
    Index(u32),
}

impl Shared {
    pub(crate) fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn public_key(&self) -> PublicKey {
        PublicKey(self.read().public.to_bytes())
    }

    pub(crate) fn private_key(&self) -> PrivateKey {
        self.read().key.clone()
    }

    pub(crate) fn fwmark(&self) -> u32 {
        self.read().fwmark
    }

    pub(crate) fn peer_keys(&self) -> Vec<PublicKey> {
        self.read().peers.keys().copied().collect()
    }

    pub(crate) fn peer_config(&self, key: &PublicKey) -> Option<PeerConfig> {
        let (peer, allowed) = {
            let st = self.read();
            let peer = st.peers.get(key)?.clone();
            (peer, st.allowed.get(key).cloned().unwrap_or_default())
        };
        let endpoint = lock(&peer.inner).endpoint;
        Some(PeerConfig {
            public_key: *key,
            endpoint,
            allowed_ips: allowed,
            persistent_keepalive: peer.keepalive,
        })
    }

    pub(crate) fn set_fwmark(&self, mark: u32) -> Result<(), Error> {
        sys::set_mark(self.udp.as_raw_fd(), mark).map_err(|source| Error::SocketOption {
            what: "fwmark",
            source,
        })?;
        self.write().fwmark = mark;
        Ok(())
    }

    fn new_tunn(st: &mut State, peer: &PublicKey, keepalive: Option<u16>) -> (Tunn, u32) {
        let index = st.next_index;
        st.next_index = (st.next_index + 1) & 0x00ff_ffff;
        let tunn = Tunn::new(
            st.key.secret().clone(),
            x25519::PublicKey::from(peer.0),
            None,
            keepalive,
            index,
            Some(st.limiter.clone()),
        );
        (tunn, index)
    }

    pub(crate) fn set_peer(&self, config: PeerConfig) -> Result<(), Error> {
        let mut st = self.write();
        if config.public_key.0 == st.public.to_bytes() {
            return Err(Error::Unsupported(
                "a peer with the device's own public key",
            ));
        }
        let existing = st.peers.get(&config.public_key).cloned();
        match existing {
            Some(peer) if peer.keepalive == config.persistent_keepalive => {
                if let Some(endpoint) = config.endpoint {
                    lock(&peer.inner).endpoint = Some(endpoint);
                }
            }
            existing => {
                // New peer, or a keepalive change (boringtun fixes it at creation): a fresh
                // tunnel, keeping the byte counters and the endpoint.
                let (rx, tx, old_endpoint) = match &existing {
                    Some(old) => {
                        Self::unindex(&mut st, old);
                        (
                            old.rx_bytes.load(Ordering::Relaxed),
                            old.tx_bytes.load(Ordering::Relaxed),
                            lock(&old.inner).endpoint,
                        )
                    }
                    None => (0, 0, None),
                };
                let (tunn, index) =
                    Self::new_tunn(&mut st, &config.public_key, config.persistent_keepalive);
                let peer = Arc::new(Peer {
                    public_key: config.public_key,
                    keepalive: config.persistent_keepalive,
                    rx_bytes: AtomicU64::new(rx),
                    tx_bytes: AtomicU64::new(tx),
                    inner: Mutex::new(PeerInner {
                        current: tunn,
                        current_index: index,
                        draining: None,
                        endpoint: config.endpoint.or(old_endpoint),
                    }),
                });
                st.by_index.insert(index, peer.clone());
                st.peers.insert(config.public_key, peer);
                tracing::info!(peer = %config.public_key, "WireGuard peer added");
            }
        }
        st.allowed.insert(config.public_key, config.allowed_ips);
        Self::rebuild_routes(&mut st);
        Ok(())
    }

    fn unindex(st: &mut State, peer: &Arc<Peer>) {
        st.by_index.retain(|_, p| !Arc::ptr_eq(p, peer));
    }

    fn rebuild_routes(st: &mut State) {
        let State {
            peers,
            allowed,
            routes,
            ..
        } = st;
        *routes = AllowedIps::build(allowed.iter().flat_map(|(key, nets)| {
            let peer = peers.get(key).cloned();
            nets.iter()
                .filter_map(move |n| peer.clone().map(|p| (*n, p)))
        }));
    }

    pub(crate) fn remove_peer(&self, key: &PublicKey) -> bool {
        let mut st = self.write();
        let Some(peer) = st.peers.remove(key) else {
            return false;
        };
        Self::unindex(&mut st, &peer);
        st.allowed.remove(key);
        Self::rebuild_routes(&mut st);
        tracing::info!(peer = %key, "WireGuard peer removed");
        true
    }

    pub(crate) fn peers(&self) -> Vec<PeerStats> {
        let list: Vec<(Arc<Peer>, Vec<IpNet>)> = {
            let st = self.read();
            st.peers
                .values()
                .map(|p| {
                    (
                        p.clone(),
                        st.allowed.get(&p.public_key).cloned().unwrap_or_default(),
                    )
                })
                .collect()
        };
        let mut out: Vec<PeerStats> = list
            .into_iter()
            .map(|(peer, allowed_ips)| {
                let inner = lock(&peer.inner);
                let since = inner.current.time_since_last_handshake().or_else(|| {
                    inner
                        .draining
                        .as_ref()
                        .and_then(|d| d.tunn.time_since_last_handshake())
                });
                PeerStats {
                    public_key: peer.public_key,
                    endpoint: inner.endpoint,
                    allowed_ips,
                    persistent_keepalive: peer.keepalive,
                    last_handshake: since.and_then(|d| SystemTime::now().checked_sub(d)),
                    rx_bytes: peer.rx_bytes.load(Ordering::Relaxed),
                    tx_bytes: peer.tx_bytes.load(Ordering::Relaxed),
                }
            })
            .collect();
        out.sort_by_key(|p| p.public_key);
        out
    }

    pub(crate) fn set_private_key(&self, key: PrivateKey) {
        let mut st = self.write();
        let public = x25519::PublicKey::from(key.secret());
        if public == st.public {
            return;
        }
        let old_key = std::mem::replace(&mut st.key, key);
        let old_public = std::mem::replace(&mut st.public, public);
        st.previous = Some((old_key, old_public, Instant::now()));
        st.limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        let peers: Vec<Arc<Peer>> = st.peers.values().cloned().collect();
        let mut buf = vec![0u8; 256];
        for peer in peers {
            let (tunn, index) = Self::new_tunn(&mut st, &peer.public_key, peer.keepalive);
            st.by_index.insert(index, peer.clone());
            let mut inner = lock(&peer.inner);
            let old = std::mem::replace(&mut inner.current, tunn);
            let old_index = std::mem::replace(&mut inner.current_index, index);
            if let Some(prev) = inner.draining.take() {
                st.by_index.remove(&prev.index);
            }
            // Only a tunnel with a live session is worth draining.
            if old.time_since_last_handshake().is_some() {
                inner.draining = Some(Draining {
                    tunn: old,
                    index: old_index,
                    since: Instant::now(),
                    new_session_at: None,
                });
            } else {
                st.by_index.remove(&old_index);
            }
            // Start the new key's handshake now rather than on the next packet, which the
            // draining session would carry.
            if let Some(endpoint) = inner.endpoint
                && let TunnResult::WriteToNetwork(p) =
                    inner.current.format_handshake_initiation(&mut buf, false)
            {
                let _ = self.send_to(p, endpoint);
                peer.tx_bytes.fetch_add(p.len() as u64, Ordering::Relaxed);
            }
        }
        tracing::info!(public_key = %PublicKey(public.to_bytes()), "WireGuard private key rotated");
    }

    pub(crate) fn rekey_peer(&self, key: &PublicKey) -> Result<(), Error> {
        let peer = self
            .read()
            .peers
            .get(key)
            .cloned()
            .ok_or(Error::UnknownPeer(*key))?;
        let mut buf = [0u8; 256];
        let mut inner = lock(&peer.inner);
        if let Some(endpoint) = inner.endpoint
            && let TunnResult::WriteToNetwork(p) =
                inner.current.format_handshake_initiation(&mut buf, true)
        {
            let _ = self.send_to(p, endpoint);
            peer.tx_bytes.fetch_add(p.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Send one datagram (v4 endpoints go out as v4-mapped on the dual-stack socket).
    pub(crate) fn send_to(&self, buf: &[u8], dst: SocketAddr) -> io::Result<usize> {
        self.udp.send_to(buf, wire_addr(dst))
    }

    /// The peer owning inner destination `dst`.
    pub(crate) fn route(&self, dst: IpAddr) -> Option<Arc<Peer>> {
        self.read().routes.lookup(dst).cloned()
    }

    /// Whether `src` (an inner source address) is allowed from `peer`.
    pub(crate) fn allowed_from(&self, peer: &Arc<Peer>, src: IpAddr) -> bool {
        self.read()
            .routes
            .lookup(src)
            .is_some_and(|p| Arc::ptr_eq(p, peer))
    }

    /// Find the peer and tunnel an incoming WireGuard message belongs to.
    fn classify(&self, datagram: &[u8]) -> Option<(Arc<Peer>, Which)> {
        let packet = Tunn::parse_incoming_packet(datagram).ok()?;
        let st = self.read();
        let index = match packet {
            Packet::HandshakeInit(p) => {
                if let Ok(half) = parse_handshake_anon(st.key.secret(), &st.public, &p) {
                    let peer = st.peers.get(&PublicKey(half.peer_static_public))?;
                    return Some((peer.clone(), Which::Current));
                }
                let (key, public, since) = st.previous.as_ref()?;
                if since.elapsed() >= DRAIN_MAX {
                    return None;
                }
                let half = parse_handshake_anon(key.secret(), public, &p).ok()?;
                let peer = st.peers.get(&PublicKey(half.peer_static_public))?;
                return Some((peer.clone(), Which::Previous));
            }
            Packet::HandshakeResponse(p) => p.receiver_idx,
            Packet::PacketCookieReply(p) => p.receiver_idx,
            Packet::PacketData(p) => p.receiver_idx,
        };
        let peer = st.by_index.get(&(index >> 8))?;
        Some((peer.clone(), Which::Index(index >> 8)))
    }
}

/// The address to hand the (dual-stack) socket.
pub(crate) fn wire_addr(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) => {
            SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
        }
        SocketAddr::V6(_) => addr,
    }
}

/// Undo the v4-mapped form the dual-stack socket reports.
pub(crate) fn plain_addr(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, a.port())),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

// === impl Peer ===

/// What decrypting one datagram produced.
pub(crate) enum Decrypted {
    /// Nothing for the tun (handshake traffic, keepalive, or dropped).
    Nothing,
    /// A plaintext packet of this length at the start of the output buffer, from `src`.
    Packet { len: usize, src: IpAddr },
}

impl PeerInner {
    /// The tunnel to encrypt with: the current one, unless it has no session yet while the
    /// old key's does.
    fn sending(&mut self) -> &mut Tunn {
        let current_ready = self.current.time_since_last_handshake().is_some();
        match &mut self.draining {
            Some(d) if !current_ready && d.tunn.time_since_last_handshake().is_some() => {
                &mut d.tunn
            }
            _ => &mut self.current,
        }
    }

    fn tunn_for(&mut self, which: Which) -> Option<&mut Tunn> {
        match which {
            Which::Current => Some(&mut self.current),
            Which::Index(i) if i == self.current_index => Some(&mut self.current),
            Which::Previous => self.draining.as_mut().map(|d| &mut d.tunn),
            Which::Index(i) => match &mut self.draining {
                Some(d) if d.index == i => Some(&mut d.tunn),
                _ => None,
            },
        }
    }
}

impl Peer {
    /// Encrypt `packet` into `out`; returns the message length (0: nothing to send, e.g. no
    /// session yet and the packet was queued behind a handshake that went out instead).
    pub(crate) fn encrypt(&self, packet: &[u8], out: &mut [u8]) -> (usize, Option<SocketAddr>) {
        let mut inner = lock(&self.inner);
        let endpoint = inner.endpoint;
        match inner.sending().encapsulate(packet, out) {
            TunnResult::WriteToNetwork(p) => (p.len(), endpoint),
            _ => (0, endpoint),
        }
    }
}

impl Shared {
    /// Handle one incoming WireGuard message from `from`; replies (handshake responses,
    /// queued packets) are sent here, a plaintext packet is left in `out`.
    pub(crate) fn decrypt(&self, from: SocketAddr, datagram: &[u8], out: &mut [u8]) -> Decrypted {
        let Some((peer, which)) = self.classify(datagram) else {
            return Decrypted::Nothing;
        };
        peer.rx_bytes
            .fetch_add(datagram.len() as u64, Ordering::Relaxed);
        let from = plain_addr(from);
        let mut inner = lock(&peer.inner);
        let Some(tunn) = inner.tunn_for(which) else {
            return Decrypted::Nothing;
        };
        let result = match tunn.decapsulate(Some(from.ip()), datagram, out) {
            TunnResult::Done => Decrypted::Nothing,
            TunnResult::Err(e) => {
                tracing::trace!(error = ?e, "dropped WireGuard message");
                return Decrypted::Nothing;
            }
            TunnResult::WriteToNetwork(p) => {
                let _ = self.send_to(p, from);
                peer.tx_bytes.fetch_add(p.len() as u64, Ordering::Relaxed);
                // Packets queued behind the handshake go out now.
                while let TunnResult::WriteToNetwork(p) = tunn.decapsulate(None, &[], out) {
                    let _ = self.send_to(p, from);
                    peer.tx_bytes.fetch_add(p.len() as u64, Ordering::Relaxed);
                }
                Decrypted::Nothing
            }
            TunnResult::WriteToTunnelV4(p, src) => Decrypted::Packet {
                len: p.len(),
                src: IpAddr::V4(src),
            },
            TunnResult::WriteToTunnelV6(p, src) => Decrypted::Packet {
                len: p.len(),
                src: IpAddr::V6(src),
            },
        };
        // Authenticated: the peer is where this came from (roaming).
        inner.endpoint = Some(from);
        drop(inner);
        if let Decrypted::Packet { src, .. } = result
            && !self.allowed_from(&peer, src)
        {
            tracing::trace!(%src, "dropped packet from outside the peer's allowed IPs");
            return Decrypted::Nothing;
        }
        result
    }
}

// === timers ===

fn timer_loop(shared: &Shared) {
    let mut buf = vec![0u8; 2048];
    let mut last_reset = Instant::now();
    while !shared.stopped() {
        std::thread::sleep(TIMER_TICK);
        let (peers, limiter) = {
            let st = shared.read();
            (
                st.peers.values().cloned().collect::<Vec<_>>(),
                st.limiter.clone(),
            )
        };
        if last_reset.elapsed() >= Duration::from_secs(1) {
            limiter.reset_count();
            last_reset = Instant::now();
        }
        let mut retired = Vec::new();
        for peer in peers {
            let mut inner = lock(&peer.inner);
            let endpoint = inner.endpoint;
            if let TunnResult::WriteToNetwork(p) = inner.current.update_timers(&mut buf)
                && let Some(endpoint) = endpoint
            {
                let _ = shared.send_to(p, endpoint);
                peer.tx_bytes.fetch_add(p.len() as u64, Ordering::Relaxed);
            }
            let current_ready = inner.current.time_since_last_handshake().is_some();
            if let Some(d) = &mut inner.draining {
                if current_ready && d.new_session_at.is_none() {
                    d.new_session_at = Some(Instant::now());
                }
                let done = d.since.elapsed() >= DRAIN_MAX
                    || d.new_session_at
                        .is_some_and(|t| t.elapsed() >= DRAIN_AFTER_NEW_SESSION);
                if done {
                    retired.push(d.index);
                    inner.draining = None;
                }
            }
        }
        if !retired.is_empty() {
            let mut st = shared.write();
            for index in retired {
                st.by_index.remove(&index);
            }
        }
    }
}
