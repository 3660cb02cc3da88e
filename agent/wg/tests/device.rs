//! The device on the real kernel: two network namespaces joined by a veth pair (the underlay),
//! a WireGuard device in each, traffic through the tunnel. Everything carries a per-test
//! prefix and is removed on drop, also when a test fails.
//!
//! Every wait is bounded; nothing asserts timing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use weft_tests::{NetNs, TestPrefix, ci};
use weft_wg::{Device, DeviceConfig, PeerConfig, PrivateKey, PublicKey};

const PORT: u16 = 51871;
const UAPI_DIR: &str = "/var/run/wireguard";
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// Bytes of the stream that lives through two key rotations.
const ROTATION_STREAM: usize = 96 << 20;

/// Node addresses: underlay on the veth, inner on the WireGuard device.
struct Addrs {
    underlay4: &'static str,
    underlay6: &'static str,
    inner4: &'static str,
    inner6: &'static str,
    /// The other node's inner ranges, routed through the device.
    remote4: &'static str,
    remote6: &'static str,
}

const A: Addrs = Addrs {
    underlay4: "100.65.0.1",
    underlay6: "fd65::1",
    inner4: "100.64.1.1",
    inner6: "fd64:1::1",
    remote4: "100.64.2.0/24",
    remote6: "fd64:2::/64",
};
const B: Addrs = Addrs {
    underlay4: "100.65.0.2",
    underlay6: "fd65::2",
    inner4: "100.64.2.1",
    inner6: "fd64:2::1",
    remote4: "100.64.1.0/24",
    remote6: "fd64:1::/64",
};

fn skip(test: &str, needs: &[&str]) -> bool {
    let mut reason = None;
    if !nix::unistd::Uid::effective().is_root() {
        reason = Some("needs root (network namespaces, tun)".to_string());
    } else if !Path::new("/dev/net/tun").exists() {
        reason = Some("needs /dev/net/tun".to_string());
    }
    for tool in needs {
        if reason.is_none() && !on_path(tool) {
            reason = Some(format!("{tool} missing: run `cargo xtask setup`"));
        }
    }
    match reason {
        Some(r) if ci() => panic!("{test} cannot run in CI: {r}"),
        Some(r) => {
            eprintln!("SKIPPED {test}: {r}");
            true
        }
        None => false,
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}

/// Two node namespaces joined by a veth pair `<prefix>a` / `<prefix>b`.
struct Underlay {
    a: NetNs,
    b: NetNs,
    veth_a: String,
}

impl Underlay {
    fn new(prefix: &TestPrefix) -> Self {
        let a = NetNs::create(&prefix.name("a"));
        let b = NetNs::create(&prefix.name("b"));
        let (veth_a, veth_b) = (prefix.name("va"), prefix.name("vb"));
        a.run_ok(
            "ip",
            &[
                "link",
                "add",
                &veth_a,
                "type",
                "veth",
                "peer",
                "name",
                &veth_b,
                "netns",
                b.name(),
            ],
        );
        for (ns, veth, addrs) in [(&a, &veth_a, &A), (&b, &veth_b, &B)] {
            ns.run_ok(
                "ip",
                &[
                    "addr",
                    "add",
                    &format!("{}/24", addrs.underlay4),
                    "dev",
                    veth,
                ],
            );
            ns.run_ok(
                "ip",
                &[
                    "addr",
                    "add",
                    &format!("{}/64", addrs.underlay6),
                    "dev",
                    veth,
                    "nodad",
                ],
            );
            ns.run_ok("ip", &["link", "set", veth, "up"]);
        }
        Self { a, b, veth_a }
    }
}

/// Inner addresses and routes to the other node on device `dev` in `ns`.
fn address(ns: &NetNs, dev: &str, addrs: &Addrs) {
    ns.run_ok(
        "ip",
        &["addr", "add", &format!("{}/32", addrs.inner4), "dev", dev],
    );
    ns.run_ok(
        "ip",
        &[
            "addr",
            "add",
            &format!("{}/128", addrs.inner6),
            "dev",
            dev,
            "nodad",
        ],
    );
    ns.run_ok("ip", &["link", "set", dev, "up"]);
    ns.run_ok(
        "ip",
        &[
            "route",
            "add",
            addrs.remote4,
            "dev",
            dev,
            "src",
            addrs.inner4,
        ],
    );
    ns.run_ok(
        "ip",
        &[
            "-6",
            "route",
            "add",
            addrs.remote6,
            "dev",
            dev,
            "src",
            addrs.inner6,
        ],
    );
}

fn socket_path(prefix: &TestPrefix, node: &str) -> PathBuf {
    Path::new(UAPI_DIR).join(format!("{}.sock", prefix.name(node)))
}

/// A weft device `weft_wg0` in `ns` (the same device name in every namespace) with a
/// per-node UAPI socket.
fn weft_device(ns: &NetNs, key: PrivateKey, socket: PathBuf, offload: bool) -> Device {
    let mut config = DeviceConfig::new("weft_wg0", key, socket);
    config.offload = offload;

    ns.run(|| Device::create(config)).expect("device created")
}

fn peer_of(key: PublicKey, addrs: &Addrs) -> PeerConfig {
    PeerConfig {
        public_key: key,
        endpoint: Some(SocketAddr::new(
            addrs.underlay4.parse().expect("address"),
            PORT,
        )),
        allowed_ips: vec![
            format!("{}/24", net_base(addrs.inner4))
                .parse()
                .expect("prefix"),
            format!("{}/64", net_base(addrs.inner6))
                .parse()
                .expect("prefix"),
        ],
        persistent_keepalive: None,
    }
}

/// `100.64.1.1` → `100.64.1.0`, `fd64:1::1` → `fd64:1::`.
fn net_base(addr: &str) -> String {
    if addr.contains(':') {
        addr.trim_end_matches('1').to_string()
    } else {
        let (head, _) = addr.rsplit_once('.').expect("dotted quad");
        format!("{head}.0")
    }
}

/// Two weft devices peered with each other over the underlay.
struct Pair {
    // Field order is drop order: devices before their namespaces.
    a: Device,
    b: Device,
    net: Underlay,
    prefix: TestPrefix,
}

impl Pair {
    fn new(offload_a: bool, offload_b: bool) -> Self {
        let prefix = TestPrefix::new();
        let net = Underlay::new(&prefix);
        let a = weft_device(
            &net.a,
            PrivateKey::generate(),
            socket_path(&prefix, "a"),
            offload_a,
        );
        let b = weft_device(
            &net.b,
            PrivateKey::generate(),
            socket_path(&prefix, "b"),
            offload_b,
        );
        address(&net.a, "weft_wg0", &A);
        address(&net.b, "weft_wg0", &B);
        a.set_peer(peer_of(b.public_key(), &B))
            .expect("peer b on a");
        b.set_peer(peer_of(a.public_key(), &A))
            .expect("peer a on b");
        Self { a, b, net, prefix }
    }
}

// === traffic helpers ===

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 11)) as u8
}

fn fnv(hash: &mut u64, data: &[u8]) {
    for b in data {
        *hash ^= u64::from(*b);
        *hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
}

fn expected_hash(bytes: usize) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325;
    let mut buf = vec![0u8; 65536];
    let mut done = 0;
    while done < bytes {
        let n = (bytes - done).min(buf.len());
        for (j, b) in buf[..n].iter_mut().enumerate() {
            *b = pattern(done + j);
        }
        fnv(&mut hash, &buf[..n]);
        done += n;
    }
    hash
}

/// Accept one connection on `listener` and read it to the end: (bytes, hash).
fn sink(listener: &TcpListener, progress: &AtomicUsize) -> (usize, u64) {
    let (mut conn, _) = listener.accept().expect("accept");
    conn.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let mut hash = 0xcbf2_9ce4_8422_2325;
    let mut buf = vec![0u8; 65536];
    let mut total = 0;
    loop {
        let n = conn.read(&mut buf).expect("read from the tunnel");
        if n == 0 {
            return (total, hash);
        }
        fnv(&mut hash, &buf[..n]);
        total += n;
        progress.store(total, Ordering::Relaxed);
    }
}

fn source(mut conn: TcpStream, bytes: usize, marker: &[u8]) {
    conn.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let mut buf = vec![0u8; 65536];
    let mut done = 0;
    while done < bytes {
        let n = (bytes - done).min(buf.len());
        for (j, b) in buf[..n].iter_mut().enumerate() {
            *b = pattern(done + j);
        }
        // A recognisable plaintext string at the start of every chunk (the capture looks
        // for it); the hash covers what was really sent.
        let m = marker.len().min(n);
        buf[..m].copy_from_slice(&marker[..m]);
        conn.write_all(&buf[..n]).expect("write into the tunnel");
        done += n;
    }
}

/// Send `bytes` over TCP from `client` to `addr` served in `server`; panics unless all bytes
/// arrive intact.
fn tcp_transfer(server: &NetNs, client: &NetNs, addr: SocketAddr, bytes: usize) {
    let listener = server.run(|| TcpListener::bind(addr)).expect("listen");
    let conn = client
        .run(|| TcpStream::connect_timeout(&addr, IO_TIMEOUT))
        .expect("connect through the tunnel");
    let progress = AtomicUsize::new(0);
    let (got, hash) = std::thread::scope(|s| {
        let reader = s.spawn(|| sink(&listener, &progress));
        source(conn, bytes, b"");
        reader.join().expect("reader")
    });
    assert_eq!(got, bytes, "bytes through the tunnel to {addr}");
    assert_eq!(hash, expected_hash(bytes), "payload intact to {addr}");
}

/// UDP datagrams of several sizes (up to one that fragments inside the tunnel) both ways.
fn udp_exchange(server: &NetNs, client: &NetNs, addr: SocketAddr) {
    let server_sock = server.run(|| UdpSocket::bind(addr)).expect("udp bind");
    let any: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("addr");
    let client_sock = client.run(|| UdpSocket::bind(any)).expect("udp bind");
    for sock in [&server_sock, &client_sock] {
        sock.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
    }
    for size in [1, 512, 1300, 4000] {
        let payload: Vec<u8> = (0..size).map(pattern).collect();
        // The first datagram may wait for a handshake: retry a few times, bounded.
        let mut buf = vec![0u8; 8192];
        let got = (0..5).find_map(|_| {
            client_sock.send_to(&payload, addr).expect("udp send");
            server_sock.recv_from(&mut buf).ok()
        });
        let (n, from) =
            got.unwrap_or_else(|| panic!("{size}-byte datagram to {addr} never arrived"));
        assert_eq!(&buf[..n], &payload[..], "datagram of {size} bytes intact");
        server_sock.send_to(&buf[..n], from).expect("udp echo");
        let (n, _) = client_sock
            .recv_from(&mut buf)
            .expect("echo back through the tunnel");
        assert_eq!(n, size);
    }
}

fn ping(ns: &NetNs, addr: &str) {
    let out = ns.exec("ping", &["-c", "3", "-i", "0.2", "-W", "2", addr]);
    assert!(
        out.status.success(),
        "ping {addr} from {}: {}",
        ns.name(),
        String::from_utf8_lossy(&out.stdout)
    );
}

fn sock(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(addr.parse().expect("address"), port)
}

/// `wg show <iface>` output, failing loudly.
fn wg_show(iface: &str) -> String {
    let out = Command::new("wg")
        .args(["show", iface])
        .output()
        .expect("run wg");
    assert!(
        out.status.success(),
        "wg show {iface}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A child process killed (with its group) on drop.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(child) = self.0.take() {
            weft_tests::process::stop_child(child, Duration::from_secs(2));
        }
    }
}

fn wait_for(what: &str, bound: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// === tests ===

#[test]
fn two_weft_devices_carry_tcp_udp_icmp_v4_v6_and_the_underlay_sees_only_wireguard() {
    if skip("two_weft_devices", &["ping", "tcpdump", "wg"]) {
        return;
    }
    let pair = Pair::new(true, true);
    let (ns_a, ns_b) = (&pair.net.a, &pair.net.b);

    // Capture the underlay (minus ARP, neighbour discovery and MLD, which sit below IP
    // routing) while traffic runs.
    let pcap = std::env::temp_dir().join(format!("{}-underlay.pcap", pair.prefix));
    let mut tcpdump = ns_a.command("tcpdump");
    tcpdump
        .args(["-i", &pair.net.veth_a, "-nn", "-U", "-c", "20000", "-w"])
        .arg(&pcap)
        .args([
            "not arp and not (icmp6 and ip6[40] >= 133 and ip6[40] <= 137) \
             and not (ip6 and ip6[6] == 0)",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = weft_tests::process::spawn_in_group(&mut tcpdump).expect("start tcpdump");
    let stderr = child.stderr.take().expect("tcpdump stderr");
    let capture = Guard(Some(child));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stderr), &mut line)
        .expect("tcpdump ready");
    assert!(line.contains("listening"), "tcpdump: {line}");

    ping(ns_a, B.inner4);
    ping(ns_b, A.inner4);
    ping(ns_a, B.inner6);
    ping(ns_b, A.inner6);
    tcp_transfer(ns_b, ns_a, sock(B.inner4, 5001), 24 << 20);
    tcp_transfer(ns_a, ns_b, sock(A.inner6, 5002), 24 << 20);
    udp_exchange(ns_b, ns_a, sock(B.inner4, 5004));
    udp_exchange(ns_a, ns_b, sock(A.inner6, 5005));
    drop(capture);

    let text = ns_a.run_ok(
        "tcpdump",
        &["-r", pcap.to_str().expect("utf-8 path"), "-nn", "-q"],
    );
    let _ = std::fs::remove_file(&pcap);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.len() > 100,
        "the capture saw the transfer ({} packets)",
        lines.len()
    );
    let port = format!(".{PORT}");
    for l in &lines {
        assert!(
            l.contains("UDP") && l.matches(port.as_str()).count() == 2,
            "only WireGuard UDP between port {PORT}s on the underlay, saw: {l}"
        );
    }
    // Both sides report the peer, its endpoint, a handshake and bytes both ways.
    for (device, other, addrs) in [(&pair.a, &pair.b, &B), (&pair.b, &pair.a, &A)] {
        let peers = device.peers();
        assert_eq!(peers.len(), 1);
        let p = &peers[0];
        assert_eq!(p.public_key, other.public_key());
        assert_eq!(p.endpoint, Some(sock(addrs.underlay4, PORT)));
        assert!(p.last_handshake.is_some(), "handshake recorded");
        assert!(
            p.rx_bytes > 20 << 20 && p.tx_bytes > 20 << 20,
            "bytes counted: {p:?}"
        );
    }

    // `wg` reaches each node's device by its socket name, although both devices are
    // called weft_wg0.
    let shown = wg_show(&pair.prefix.name("a"));
    assert!(
        shown.contains(&format!("peer: {}", pair.b.public_key())),
        "{shown}"
    );
    assert!(shown.contains("latest handshake"), "{shown}");
    assert!(
        shown.contains(&format!("listening port: {PORT}")),
        "{shown}"
    );
    assert!(!shown.contains(&PrivateKey::generate().to_base64()));
}

#[test]
fn marker_payload_never_crosses_the_underlay_in_clear() {
    if skip("marker_payload", &["tcpdump"]) {
        return;
    }
    let pair = Pair::new(true, true);
    let pcap = std::env::temp_dir().join(format!("{}-marker.pcap", pair.prefix));
    let mut tcpdump = pair.net.a.command("tcpdump");
    tcpdump
        .args(["-i", &pair.net.veth_a, "-nn", "-U", "-c", "5000", "-w"])
        .arg(&pcap)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = weft_tests::process::spawn_in_group(&mut tcpdump).expect("start tcpdump");
    let stderr = child.stderr.take().expect("tcpdump stderr");
    let capture = Guard(Some(child));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stderr), &mut line).expect("ready");
    let marker = b"WEFT-PLAINTEXT-MARKER";
    let addr = sock(B.inner4, 5010);
    let listener = pair.net.b.run(|| TcpListener::bind(addr)).expect("listen");
    let conn = pair
        .net
        .a
        .run(|| TcpStream::connect_timeout(&addr, IO_TIMEOUT))
        .expect("connect");
    let progress = AtomicUsize::new(0);
    let (got, _) = std::thread::scope(|s| {
        let reader = s.spawn(|| sink(&listener, &progress));
        source(conn, 2 << 20, marker);
        reader.join().expect("reader")
    });
    assert_eq!(got, 2 << 20);
    std::thread::sleep(Duration::from_millis(200));
    drop(capture);
    let raw = std::fs::read(&pcap).expect("capture file");
    let _ = std::fs::remove_file(&pcap);
    assert!(
        raw.len() > 1 << 20,
        "the capture holds the transfer ({} bytes)",
        raw.len()
    );
    assert!(
        !raw.windows(marker.len()).any(|w| w == marker),
        "plaintext marker seen on the underlay"
    );
}

#[test]
fn one_packet_path_and_batching_path_interoperate() {
    if skip("one_packet_path", &["ping"]) {
        return;
    }
    let pair = Pair::new(false, true);
    ping(&pair.net.a, B.inner4);
    ping(&pair.net.b, A.inner6);
    tcp_transfer(&pair.net.b, &pair.net.a, sock(B.inner4, 5020), 4 << 20);
    tcp_transfer(&pair.net.a, &pair.net.b, sock(A.inner6, 5021), 4 << 20);
    udp_exchange(&pair.net.b, &pair.net.a, sock(B.inner6, 5022));
}

#[test]
fn key_rotation_during_a_tcp_stream_keeps_it_alive() {
    if skip("key_rotation", &[]) {
        return;
    }
    let pair = Pair::new(true, true);
    let addr = sock(B.inner4, 5030);
    let listener = pair.net.b.run(|| TcpListener::bind(addr)).expect("listen");
    let conn = pair
        .net
        .a
        .run(|| TcpStream::connect_timeout(&addr, IO_TIMEOUT))
        .expect("connect");
    let progress = Arc::new(AtomicUsize::new(0));
    let wait_progress = |at: usize| {
        wait_for("stream progress", IO_TIMEOUT, || {
            progress.load(Ordering::Relaxed) >= at
        });
    };
    let (new_a, new_b) = (PrivateKey::generate(), PrivateKey::generate());
    let (got, hash) = std::thread::scope(|s| {
        let reader = s.spawn(|| sink(&listener, &progress));
        let writer = s.spawn(|| source(conn, ROTATION_STREAM, b""));
        wait_progress(8 << 20);
        // Node A rotates; B learns A's new key (as the agent would, from A's Node object).
        pair.a.set_private_key(new_a.clone());
        pair.b
            .replace_peers(vec![peer_of(new_a.public_key(), &A)])
            .expect("b learns a's new key");
        wait_progress(24 << 20);
        // Then node B rotates too, and a re-keys its session with B on request.
        pair.b.set_private_key(new_b.clone());
        pair.a
            .replace_peers(vec![peer_of(new_b.public_key(), &B)])
            .expect("a learns b's new key");
        wait_progress(40 << 20);
        pair.a.rekey_peer(&new_b.public_key()).expect("rekey");
        writer.join().expect("writer");
        reader.join().expect("reader")
    });
    assert_eq!(got, ROTATION_STREAM, "the stream survived both rotations");
    assert_eq!(
        hash,
        expected_hash(ROTATION_STREAM),
        "payload intact across rotations"
    );
    assert_eq!(pair.a.public_key(), new_a.public_key());
    let a_peers = pair.a.peers();
    assert_eq!(a_peers.len(), 1);
    assert_eq!(a_peers[0].public_key, new_b.public_key());
    assert!(a_peers[0].last_handshake.is_some());
    let b_peers = pair.b.peers();
    assert_eq!(b_peers[0].public_key, new_a.public_key());
    assert!(b_peers[0].last_handshake.is_some());
}

#[test]
fn configured_and_read_through_wireguard_control_and_refuses_a_taken_socket() {
    use wireguard_control::{Backend, DeviceUpdate, InterfaceName, Key, PeerConfigBuilder};
    if skip("wireguard_control", &["ping"]) {
        return;
    }
    let prefix = TestPrefix::new();
    let net = Underlay::new(&prefix);
    let a = weft_device(
        &net.a,
        PrivateKey::generate(),
        socket_path(&prefix, "a"),
        true,
    );
    let b = weft_device(
        &net.b,
        PrivateKey::generate(),
        socket_path(&prefix, "b"),
        true,
    );
    address(&net.a, "weft_wg0", &A);
    address(&net.b, "weft_wg0", &B);
    // B through the UAPI socket with wireguard-control, A through the typed API.
    let iface_b: InterfaceName = prefix.name("b").parse().expect("interface name");
    DeviceUpdate::new()
        .add_peer(
            PeerConfigBuilder::new(&Key(*a.public_key().as_bytes()))
                .set_endpoint(sock(A.underlay4, PORT))
                .add_allowed_ip("100.64.1.0".parse().expect("ip"), 24)
                .add_allowed_ip("fd64:1::".parse().expect("ip"), 64),
        )
        .apply(&iface_b, Backend::Userspace)
        .expect("configure b through its UAPI socket");
    a.set_peer(peer_of(b.public_key(), &B))
        .expect("peer b on a");
    ping(&net.a, B.inner4);
    ping(&net.b, A.inner6);
    let read = wireguard_control::Device::get(&iface_b, Backend::Userspace).expect("read b");
    assert_eq!(read.listen_port, Some(PORT));
    assert_eq!(
        read.public_key.map(|k| k.0),
        Some(*b.public_key().as_bytes())
    );
    assert_eq!(read.peers.len(), 1);
    let peer = &read.peers[0];
    assert_eq!(peer.config.public_key.0, *a.public_key().as_bytes());
    assert_eq!(peer.config.allowed_ips.len(), 2);
    assert!(peer.stats.last_handshake_time.is_some());
    assert!(peer.stats.rx_bytes > 0 && peer.stats.tx_bytes > 0);

    // A second device may not take a live device's socket (same path: a node collision).
    let c_ns = NetNs::create(&prefix.name("c"));
    let mut config = DeviceConfig::new(
        "weft_wg0",
        PrivateKey::generate(),
        socket_path(&prefix, "a"),
    );
    config.listen_port = 0;
    let err = c_ns
        .run(|| Device::create(config))
        .expect_err("socket taken");
    assert!(matches!(err, weft_wg::Error::UapiInUse { .. }), "{err}");
    drop(a);
    drop(b);
}

#[test]
fn interoperates_with_wireguard_go_configured_by_wg() {
    if skip("wireguard_go", &["wireguard-go", "wg", "ping"]) {
        return;
    }
    let prefix = TestPrefix::new();
    let net = Underlay::new(&prefix);
    let a = weft_device(
        &net.a,
        PrivateKey::generate(),
        socket_path(&prefix, "a"),
        true,
    );
    address(&net.a, "weft_wg0", &A);

    // wireguard-go in node B; its UAPI socket is named after its (prefixed) interface.
    let go_if = prefix.name("g");
    let mut cmd = net.b.command("wireguard-go");
    cmd.args(["-f", &go_if])
        .env("LOG_LEVEL", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let go = Guard(Some(
        weft_tests::process::spawn_in_group(&mut cmd).expect("start wireguard-go"),
    ));
    let go_sock = Path::new(UAPI_DIR).join(format!("{go_if}.sock"));
    wait_for(
        "wireguard-go's UAPI socket",
        Duration::from_secs(10),
        || go_sock.exists(),
    );
    let key_b = PrivateKey::generate();
    let key_file = std::env::temp_dir().join(format!("{prefix}-b.key"));
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key_file)
            .expect("key file");
        writeln!(f, "{}", key_b.to_base64()).expect("write key");
    }
    let set = net.b.exec(
        "wg",
        &[
            "set",
            &go_if,
            "listen-port",
            &PORT.to_string(),
            "private-key",
            key_file.to_str().expect("utf-8 path"),
            "peer",
            &a.public_key().to_string(),
            "endpoint",
            &format!("{}:{PORT}", A.underlay4),
            "allowed-ips",
            "100.64.1.0/24,fd64:1::/64",
        ],
    );
    let _ = std::fs::remove_file(&key_file);
    assert!(
        set.status.success(),
        "wg set: {}",
        String::from_utf8_lossy(&set.stderr)
    );
    net.b.run_ok("ip", &["link", "set", &go_if, "mtu", "1420"]);
    address(&net.b, &go_if, &B);
    a.set_peer(peer_of(key_b.public_key(), &B))
        .expect("peer b on a");

    ping(&net.a, B.inner4);
    ping(&net.b, A.inner4);
    ping(&net.a, B.inner6);
    tcp_transfer(&net.b, &net.a, sock(B.inner4, 5040), 16 << 20);
    tcp_transfer(&net.a, &net.b, sock(A.inner6, 5041), 16 << 20);
    udp_exchange(&net.b, &net.a, sock(B.inner4, 5042));

    let weft_side = wg_show(&prefix.name("a"));
    assert!(
        weft_side.contains(&format!("peer: {}", key_b.public_key())),
        "{weft_side}"
    );
    assert!(weft_side.contains("latest handshake"), "{weft_side}");
    let go_side = wg_show(&go_if);
    assert!(
        go_side.contains(&format!("peer: {}", a.public_key())),
        "{go_side}"
    );
    assert!(go_side.contains("latest handshake"), "{go_side}");
    drop(go);
    let _ = std::fs::remove_file(&go_sock);
}

#[test]
fn a_peer_that_has_not_learned_the_new_key_can_still_handshake() {
    if skip("half_rotated", &["ping"]) {
        return;
    }
    let pair = Pair::new(true, true);
    ping(&pair.net.b, A.inner4);
    let old_a = pair.a.public_key();
    pair.a.set_private_key(PrivateKey::generate());
    let before = pair.b.peers()[0].last_handshake.expect("first handshake");
    std::thread::sleep(Duration::from_millis(1100));
    // B still holds A's old public key and starts a new handshake with it.
    pair.b.rekey_peer(&old_a).expect("rekey");
    wait_for(
        "a handshake with the old key",
        Duration::from_secs(10),
        || {
            pair.b.peers()[0].last_handshake.is_some_and(|t| {
                t.duration_since(before)
                    .is_ok_and(|d| d >= Duration::from_secs(1))
            })
        },
    );
    tcp_transfer(&pair.net.a, &pair.net.b, sock(A.inner4, 5050), 2 << 20);
    tcp_transfer(&pair.net.b, &pair.net.a, sock(B.inner4, 5051), 2 << 20);
}

#[test]
fn udp_segmentation_offload_from_the_tun_is_split_into_datagrams() {
    use nix::sys::socket::{setsockopt, sockopt::UdpGsoSegment};
    if skip("udp_gso", &[]) {
        return;
    }
    let pair = Pair::new(true, true);
    let (flags, gro) = pair.a.offloads();
    eprintln!("tun offloads {flags:#x}, UDP GRO {gro}");
    for (v4, port) in [(true, 5060), (false, 5061)] {
        let addr = if v4 {
            sock(B.inner4, port)
        } else {
            sock(B.inner6, port)
        };
        let server = pair.net.b.run(|| UdpSocket::bind(addr)).expect("udp bind");
        server
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let any: SocketAddr = if v4 { "0.0.0.0:0" } else { "[::]:0" }
            .parse()
            .expect("addr");
        let client = pair.net.a.run(|| UdpSocket::bind(any)).expect("udp bind");
        // Warm the session up so the burst is not queued behind a handshake.
        let mut buf = vec![0u8; 4096];
        let warm = (0..5).any(|_| {
            client.send_to(b"warm", addr).expect("send");
            server.recv_from(&mut buf).is_ok()
        });
        assert!(warm, "no path to {addr}");
        // One 8 x 1000-byte write: with USO the tun hands weft one super-packet to split.
        setsockopt(&client, UdpGsoSegment, &1000).expect("UDP_SEGMENT");
        let burst: Vec<u8> = (0..8000).map(pattern).collect();
        client.send_to(&burst, addr).expect("gso send");
        for i in 0..8 {
            let (n, _) = server.recv_from(&mut buf).unwrap_or_else(|e| {
                panic!("datagram {i} of the burst to {addr} (tun offloads {flags:#x}): {e}")
            });
            assert_eq!(
                &buf[..n],
                &burst[i * 1000..(i + 1) * 1000],
                "datagram {i} intact"
            );
        }
    }
}
