//! Pod traffic between nodes encrypted with WireGuard (`--encryption wireguard`): real
//! devices in the node namespaces, real handshakes, a capture on the underlay bridge, policy
//! by identity across encrypted nodes, node churn, and an agent killed mid-connection.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_tests::{
    Cluster, ClusterOptions, Node, TestPrefix, eventually, policy_yaml, skip_unless_privileged,
    tcp_roundtrip,
};

const T: Duration = Duration::from_millis(1500);
const PORT: u16 = 51871;
const MARKER: &[u8] = b"WEFT-ENCRYPTION-PLAINTEXT-MARKER";

fn encrypted_cluster(prefix: &TestPrefix, nodes: usize) -> Cluster {
    Cluster::start(
        prefix,
        &ClusterOptions {
            nodes,
            encryption: true,
            ..ClusterOptions::default()
        },
    )
}

fn encryption_status(node: &Node) -> Value {
    node.weft_json(&["encryption", "status"])
}

fn peer_names(status: &Value) -> Vec<String> {
    status["peers"]
        .as_array()
        .map(|peers| {
            peers
                .iter()
                .filter_map(|p| p["node"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn routes(status: &Value) -> Vec<String> {
    status["routes"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Every node has every other node as a peer.
fn wait_for_full_mesh(cluster: &Cluster) {
    for node in cluster.nodes() {
        let want: Vec<String> = cluster
            .nodes()
            .iter()
            .filter(|n| n.name() != node.name())
            .map(|n| n.name().to_owned())
            .collect();
        eventually(
            &format!("{} has every other node as a peer", node.name()),
            || {
                let mut have = peer_names(&encryption_status(node));
                have.sort();
                have == want
            },
        );
    }
}

/// The device the node's kernel would send `addr` out of.
fn route_device(node: &Node, addr: IpAddr) -> String {
    let out = node
        .netns()
        .exec("ip", &["-o", "route", "get", &addr.to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .unwrap_or("")
        .to_owned()
}

/// tcpdump on the underlay bridge, killed on drop.
struct Capture {
    child: Option<Child>,
}

impl Capture {
    fn start(cluster: &Cluster, pcap: &Path) -> Self {
        let mut command = cluster.underlay().command("tcpdump");
        command
            .args(["-i", "br0", "-nn", "-U", "-s", "0", "-c", "50000", "-w"])
            .arg(pcap)
            // Below IP routing: ARP, neighbour discovery, MLD.
            .arg(
                "not arp and not (icmp6 and ip6[40] >= 133 and ip6[40] <= 137) \
                 and not (ip6 and ip6[6] == 0)",
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = weft_tests::process::spawn_in_group(&mut command).expect("start tcpdump");
        let stderr = child.stderr.take().expect("tcpdump stderr");
        let capture = Self { child: Some(child) };
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stderr), &mut line)
            .expect("tcpdump ready");
        assert!(line.contains("listening"), "tcpdump: {line}");
        capture
    }

    fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            weft_tests::process::stop_child(child, Duration::from_secs(5));
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Send `size` bytes holding the marker over `stream` and read them back.
fn marked_transfer(stream: &mut std::net::TcpStream, size: usize) {
    let mut message = Vec::with_capacity(size);
    while message.len() < size {
        message.extend_from_slice(MARKER);
        message.push(b'\n');
    }
    let writer = {
        let mut stream = stream.try_clone().expect("clone stream");
        let message = message.clone();
        std::thread::spawn(move || stream.write_all(&message))
    };
    let mut back = vec![0u8; message.len()];
    stream.read_exact(&mut back).expect("echo of the transfer");
    writer.join().expect("writer").expect("transfer written");
    assert!(back == message, "the echo differs from what was sent");
}

#[test]
fn pods_on_encrypted_nodes_talk_tcp_udp_icmp_and_the_underlay_sees_only_wireguard() {
    if skip_unless_privileged("pods_on_encrypted_nodes_talk") {
        return;
    }
    let prefix = TestPrefix::new();
    let cluster = encrypted_cluster(&prefix, 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    let server = n2.add_pod("server", "shop", &[("app", "server")]);
    let client = n1.add_pod("client", "shop", &[("app", "client")]);
    server.spawn_tcp_echo(8080);
    server.spawn_udp_echo(8081);
    cluster.policy_wait();
    wait_for_full_mesh(&cluster);
    for addr in server.ips() {
        assert_eq!(
            route_device(n1, addr),
            "weft_wg0",
            "{addr} is routed through the tunnel"
        );
    }

    let pcap = cluster.dir().join("underlay.pcap");
    let mut capture = Capture::start(&cluster, &pcap);
    for addr in server.ips() {
        assert!(
            client.ping_retry(addr, 5),
            "ICMP across encrypted nodes ({addr})"
        );
        assert!(
            client.udp_probe(addr, 8081, T),
            "UDP across encrypted nodes ({addr})"
        );
        assert!(
            client.tcp_probe(addr, 8080, T),
            "TCP across encrypted nodes ({addr})"
        );
        let mut stream = client
            .tcp_connect(addr, 8080, Duration::from_secs(10))
            .expect("connect");
        // Full-size segments: the pod's 1500-byte MTU is larger than the tunnel's, so the
        // node's "fragmentation needed" must reach the pod and TCP must follow it.
        marked_transfer(&mut stream, 1 << 20);
        let path = client.exec("ip", &["route", "get", &addr.to_string()]);
        let path = String::from_utf8_lossy(&path.stdout);
        assert!(
            path.contains("mtu 1420"),
            "the pod learned the tunnel's path MTU for {addr}: {path}"
        );
    }
    capture.stop();

    let text = cluster.underlay().run_ok(
        "tcpdump",
        &["-r", pcap.to_str().expect("utf-8"), "-nn", "-q"],
    );
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.len() > 100,
        "the capture saw the transfers ({} packets)",
        lines.len()
    );
    let (u1, _) = cluster.node_underlay(0);
    let (u2, _) = cluster.node_underlay(1);
    let port = format!(".{PORT}");
    for l in &lines {
        assert!(
            l.contains("UDP")
                && l.matches(port.as_str()).count() == 2
                && l.contains(&u1.to_string())
                && l.contains(&u2.to_string()),
            "only WireGuard between the node addresses on the underlay, saw: {l}"
        );
    }
    let raw = std::fs::read(&pcap).expect("read the capture");
    assert!(
        !raw.windows(MARKER.len()).any(|w| w == MARKER),
        "the plaintext marker crossed the underlay"
    );

    // Both sides report the peer, its endpoint, a handshake and bytes both ways.
    for (node, other, underlay) in [(n1, n2, u2), (n2, n1, u1)] {
        let status = encryption_status(node);
        assert_eq!(status["mode"], "wireguard", "{status}");
        let peer = &status["peers"][0];
        assert_eq!(peer["node"], other.name(), "{status}");
        assert_eq!(peer["endpoint"], format!("{underlay}:{PORT}"), "{status}");
        assert!(peer["last_handshake_seconds_ago"].is_u64(), "{status}");
        assert!(
            peer["rx_bytes"].as_u64().unwrap_or(0) > 1 << 20
                && peer["tx_bytes"].as_u64().unwrap_or(0) > 1 << 20,
            "bytes counted both ways: {status}"
        );
        assert!(status["key_age_seconds"].is_u64(), "{status}");
        let text = node.weft_ok(&["status"]);
        assert!(
            text.contains("Encryption:      wireguard on weft_wg0"),
            "weft status has the encryption line: {text}"
        );
        // `wg` finds each node's device by its socket name, though both are weft_wg0.
        let shown = node.netns().run_ok("wg", &["show", &node.wg_interface()]);
        assert!(
            shown.contains(&format!(
                "peer: {}",
                peer["public_key"].as_str().unwrap_or("?")
            )),
            "{shown}"
        );
        assert!(shown.contains("latest handshake"), "{shown}");
        // The key: 0600 in the state dir, never in the log.
        let key_file = node.state_dir().join("wireguard.key");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&key_file)
                .expect("key file")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "the private key is root's only");
        let key = std::fs::read_to_string(&key_file).expect("key");
        assert!(
            !node.log().contains(key.trim()),
            "the private key was logged"
        );
    }
    drop((client, server));
}

#[test]
fn identity_policy_allows_and_denies_across_encrypted_nodes() {
    if skip_unless_privileged("identity_policy_across_encrypted_nodes") {
        return;
    }
    let prefix = TestPrefix::new();
    let cluster = encrypted_cluster(&prefix, 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    let server = n2.add_pod("server", "shop", &[("app", "server")]);
    let client = n1.add_pod("client", "shop", &[("app", "client")]);
    let other = n1.add_pod("other", "shop", &[("app", "other")]);
    server.spawn_tcp_echo(8080);
    let spec = "  endpointSelector:\n    matchLabels: {app: server}\n  ingress:\n  - fromEndpoints:\n    - matchLabels: {app: client}\n    toPorts:\n    - ports:\n      - {port: \"8080\", protocol: TCP}\n";
    cluster.apply("server.yaml", &policy_yaml("server-in", "shop", spec));
    cluster.policy_wait();
    wait_for_full_mesh(&cluster);
    for addr in server.ips() {
        assert_eq!(route_device(n1, addr), "weft_wg0");
        assert!(
            client.tcp_probe(addr, 8080, T),
            "allowed across encrypted nodes ({addr})"
        );
        assert!(
            !other.tcp_probe(addr, 8080, T),
            "denied across encrypted nodes ({addr})"
        );
    }
    let flows = n2.observed_until(
        &["--verdict", "dropped", "--pod", "server"],
        "the drop of traffic that came through the tunnel names the remote pod and node",
        |f| f["source"]["name"] == "shop/other" && f["source"]["node"] == n1.name(),
    );
    assert!(!flows.is_empty());
    drop((other, client, server));
}

#[test]
fn a_node_joining_and_leaving_updates_peers_and_routes_on_every_node() {
    if skip_unless_privileged("a_node_joining_and_leaving") {
        return;
    }
    let prefix = TestPrefix::new();
    let mut cluster = encrypted_cluster(&prefix, 2);
    wait_for_full_mesh(&cluster);
    let client = cluster
        .node(0)
        .add_pod("client", "shop", &[("app", "client")]);

    let i = cluster.add_node(&prefix);
    let joined_at = Instant::now();
    let (name, v4, v6) = {
        let n3 = cluster.node(i);
        (n3.name().to_owned(), n3.pod_subnet_v4(), n3.pod_subnet_v6())
    };
    wait_for_full_mesh(&cluster);
    println!(
        "a joining node was a peer of every node {:?} after its agent answered",
        joined_at.elapsed()
    );
    for node in &cluster.nodes()[..2] {
        let have = routes(&encryption_status(node));
        assert!(
            have.contains(&v4) && have.contains(&v6),
            "{} routes {name}'s pod CIDRs through the tunnel: {have:?}",
            node.name()
        );
    }
    let server = cluster
        .node(i)
        .add_pod("server", "shop", &[("app", "server")]);
    server.spawn_tcp_echo(8080);
    cluster.policy_wait();
    for addr in server.ips() {
        assert_eq!(route_device(cluster.node(0), addr), "weft_wg0");
        assert!(
            client.tcp_probe(addr, 8080, T),
            "a pod on the new node is reachable through the tunnel ({addr})"
        );
    }
    let key = cluster
        .nodes()
        .iter()
        .find(|n| n.name() == name)
        .map(|n| {
            encryption_status(n)["public_key"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .expect("the new node");
    let addrs = server.ips();
    drop(server);

    let left_at = Instant::now();
    cluster.remove_node(i);
    for node in cluster.nodes() {
        eventually(&format!("{} forgets {name}", node.name()), || {
            let status = encryption_status(node);
            let nodes = node.weft_json(&["node", "list"]);
            !peer_names(&status).contains(&name)
                && !routes(&status).iter().any(|r| *r == v4 || *r == v6)
                && !nodes
                    .as_array()
                    .is_some_and(|all| all.iter().any(|n| n["name"] == name.as_str()))
        });
        let shown = node
            .netns()
            .run_ok("wg", &["show", &node.wg_interface(), "peers"]);
        assert!(
            !shown.contains(&key),
            "{name}'s key is gone from the device: {shown}"
        );
        for cidr in [&v4, &v6] {
            let left = node.netns().run_ok("ip", &["route", "show", cidr]);
            assert!(left.trim().is_empty(), "a route to {cidr} was left: {left}");
        }
        for addr in addrs {
            assert_ne!(route_device(node, addr), "weft_wg0");
        }
    }
    println!(
        "a leaving node was gone from every node after {:?}",
        left_at.elapsed()
    );
    drop(client);
}

#[test]
fn an_agent_killed_and_restarted_keeps_cross_node_tcp_alive() {
    if skip_unless_privileged("an_agent_killed_and_restarted") {
        return;
    }
    let prefix = TestPrefix::new();
    let mut cluster = encrypted_cluster(&prefix, 2);
    let server = cluster
        .node(1)
        .add_pod("server", "shop", &[("app", "server")]);
    let client = cluster
        .node(0)
        .add_pod("client", "shop", &[("app", "client")]);
    server.spawn_tcp_echo(8080);
    cluster.policy_wait();
    wait_for_full_mesh(&cluster);
    let key_before = encryption_status(cluster.node(0))["public_key"].clone();
    // TCP retransmits with backoff while the device is gone: a generous read timeout.
    let mut streams: Vec<std::net::TcpStream> = server
        .ips()
        .iter()
        .map(|addr| {
            let mut s = client
                .tcp_connect(*addr, 8080, Duration::from_secs(30))
                .expect("connect");
            tcp_roundtrip(&mut s, b"before\n").expect("echo before the kill");
            s
        })
        .collect();

    let killed_at = Instant::now();
    cluster.nodes_mut()[0].kill_agent();
    cluster.nodes_mut()[0].start_agent();
    let restarted = killed_at.elapsed();
    for s in &mut streams {
        tcp_roundtrip(s, b"after\n").expect("the connection survived the agent's restart");
    }
    println!(
        "agent SIGKILLed and restarted: API back after {restarted:?}, established TCP echoed \
         again {:?} after the kill",
        killed_at.elapsed()
    );
    assert_eq!(
        encryption_status(cluster.node(0))["public_key"],
        key_before,
        "the restarted agent reuses the node's key"
    );
    drop((client, server));
}

#[test]
fn weft_encryption_rotate_replaces_the_key_and_connections_keep_going() {
    if skip_unless_privileged("weft_encryption_rotate") {
        return;
    }
    let prefix = TestPrefix::new();
    let cluster = encrypted_cluster(&prefix, 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    let server = n2.add_pod("server", "shop", &[("app", "server")]);
    let client = n1.add_pod("client", "shop", &[("app", "client")]);
    server.spawn_tcp_echo(8080);
    cluster.policy_wait();
    wait_for_full_mesh(&cluster);
    let mut stream = client
        .tcp_connect(server.ipv4, 8080, Duration::from_secs(30))
        .expect("connect");
    tcp_roundtrip(&mut stream, b"before\n").expect("echo before the rotation");
    let old = encryption_status(n1)["public_key"].clone();
    let key_file = std::fs::read_to_string(n1.state_dir().join("wireguard.key")).expect("key");

    let rotated_at = Instant::now();
    let rotated = n1.weft_json(&["encryption", "rotate"]);
    let new = rotated["public_key"].clone();
    assert_ne!(new, old, "a new key: {rotated}");
    // Traffic keeps flowing while the other node learns the new key and shakes hands with it.
    eventually("node 2 has node 1's new key with a handshake", || {
        tcp_roundtrip(&mut stream, b"during\n").expect("echo during the rotation");
        let status = encryption_status(n2);
        status["peers"].as_array().is_some_and(|peers| {
            peers
                .iter()
                .any(|p| p["public_key"] == new && p["last_handshake_seconds_ago"].is_u64())
        })
    });
    println!(
        "the other node shook hands with the rotated key {:?} after `weft encryption rotate`",
        rotated_at.elapsed()
    );
    tcp_roundtrip(&mut stream, b"after\n").expect("echo after the rotation");
    assert_eq!(encryption_status(n1)["public_key"], new);
    let published = std::fs::read_to_string(
        cluster
            .source_dir()
            .join(format!("node-{}.yaml", n1.name())),
    )
    .expect("node 1's Node object");
    assert!(
        published.contains(new.as_str().unwrap_or("?")),
        "the Node object carries the new key: {published}"
    );
    let stored = std::fs::read_to_string(n1.state_dir().join("wireguard.key")).expect("key");
    assert_ne!(stored, key_file, "the new key is stored for the next start");
    drop((client, server));
}

fn strict_cluster(prefix: &TestPrefix, nodes: usize, strict: bool) -> Cluster {
    Cluster::start(
        prefix,
        &ClusterOptions {
            nodes,
            encryption: true,
            agent_args: if strict {
                vec!["--encryption-strict".to_owned()]
            } else {
                Vec::new()
            },
            ..ClusterOptions::default()
        },
    )
}

/// Packets `node`'s datapath counted as dropped `unencrypted` (both directions).
fn unencrypted_drops(node: &Node) -> u64 {
    let status = node.weft_json(&["status"]);
    status["counters"].as_array().map_or(0, |rows| {
        rows.iter()
            .filter(|r| r["reason"] == "unencrypted")
            .filter_map(|r| r["packets"].as_u64())
            .sum()
    })
}

#[test]
fn strict_mode_drops_traffic_to_a_node_whose_key_was_removed_as_unencrypted() {
    if skip_unless_privileged("strict_mode_drops_traffic_to_a_node_whose_key_was_removed") {
        return;
    }
    let prefix = TestPrefix::new();
    let cluster = strict_cluster(&prefix, 2, true);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    let server = n2.add_pod("server", "shop", &[("app", "server")]);
    let client = n1.add_pod("client", "shop", &[("app", "client")]);
    server.spawn_tcp_echo(8080);
    server.spawn_udp_echo(8081);
    cluster.policy_wait();
    wait_for_full_mesh(&cluster);
    for node in [n1, n2] {
        assert_eq!(encryption_status(node)["strict"], true);
        let text = node.weft_ok(&["status"]);
        assert!(text.contains("strict mode on"), "weft status: {text}");
        let text = node.weft_ok(&["encryption", "status"]);
        assert!(
            text.contains("Strict mode: on"),
            "weft encryption status: {text}"
        );
    }
    // Through the tunnel, strict mode lets everything pass, both ways.
    let mut streams = Vec::new();
    for addr in server.ips() {
        eventually(&format!("TCP to {addr} through the tunnel"), || {
            client.tcp_probe(addr, 8080, T)
        });
        assert!(client.udp_probe(addr, 8081, T), "UDP to {addr}");
        assert!(client.ping_retry(addr, 5), "ICMP to {addr}");
        let mut s = client
            .tcp_connect(addr, 8080, Duration::from_secs(10))
            .expect("connect");
        tcp_roundtrip(&mut s, b"before\n").expect("echo before the key goes");
        s.set_read_timeout(Some(T)).expect("timeout");
        streams.push(s);
    }
    assert_eq!(
        unencrypted_drops(n1),
        0,
        "nothing dropped while peers are up"
    );

    // Node 2's key goes from its Node object: node 1 no longer has it as a peer.
    let file = cluster
        .source_dir()
        .join(format!("node-{}.yaml", n2.name()));
    let original = std::fs::read_to_string(&file).expect("node 2's Node object");
    assert!(original.contains("wireguardPublicKey"), "{original}");
    let mut keyless = String::new();
    for line in original
        .lines()
        .filter(|l| !l.contains("wireguardPublicKey"))
    {
        keyless.push_str(line);
        keyless.push('\n');
    }
    cluster.apply(&format!("node-{}.yaml", n2.name()), &keyless);
    eventually("node 1 drops node 2 as a peer", || {
        !peer_names(&encryption_status(n1)).contains(&n2.name().to_owned())
    });

    let pcap = cluster.dir().join("strict.pcap");
    let mut capture = Capture::start(&cluster, &pcap);
    // The denied traffic keeps trying and never gets through: new flows and established ones.
    for round in 0..3 {
        for addr in server.ips() {
            assert!(
                !client.tcp_probe(addr, 8080, T),
                "round {round}: TCP to {addr} passed without a peer"
            );
            assert!(
                !client.udp_probe(addr, 8081, T),
                "round {round}: UDP to {addr} passed without a peer"
            );
            assert!(!client.ping(addr), "round {round}: ICMP to {addr} passed");
        }
    }
    for s in &mut streams {
        assert!(
            tcp_roundtrip(s, b"after\n").is_err(),
            "an established connection kept going without a peer"
        );
    }
    capture.stop();
    let flows = n1.observed_until(
        &["--verdict", "dropped", "--pod", "client"],
        "the drops are reported as unencrypted",
        |f| f["drop_reason"] == "unencrypted" && f["direction"] == "egress",
    );
    assert!(!flows.is_empty());
    assert!(unencrypted_drops(n1) > 0, "the drops are counted");
    let text = cluster.underlay().run_ok(
        "tcpdump",
        &["-r", pcap.to_str().expect("utf-8"), "-nn", "-q"],
    );
    for addr in server.ips() {
        assert!(
            !text.contains(&format!("> {addr}")),
            "plaintext to {addr} crossed the underlay: {text}"
        );
    }

    // The key back: traffic passes again.
    cluster.apply(&format!("node-{}.yaml", n2.name()), &original);
    for addr in server.ips() {
        eventually(&format!("TCP to {addr} once the key is back"), || {
            client.tcp_probe(addr, 8080, T)
        });
    }
    drop(streams);
    drop((client, server));
}

/// A namespace on the underlay bridge that sends pod traffic in plaintext: it holds
/// addresses of node 2's pod CIDRs and routes node 1's pod subnets via node 1's underlay
/// address, as a host on the wire (or a node without its tunnel) would.
struct Injector {
    netns: weft_tests::NetNs,
}

impl Injector {
    fn start(prefix: &TestPrefix, cluster: &Cluster, sources: &[IpAddr]) -> Self {
        let netns = weft_tests::NetNs::create(&prefix.name("inj"));
        let underlay = cluster.underlay();
        underlay.run_ok(
            "ip",
            &[
                "link",
                "add",
                "ulinj",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                netns.name(),
            ],
        );
        underlay.run_ok("ip", &["link", "set", "ulinj", "master", "br0"]);
        underlay.run_ok("ip", &["link", "set", "ulinj", "up"]);
        netns.sysctl("net.ipv6.conf.all.accept_dad", "0");
        netns.sysctl("net.ipv6.conf.eth0.accept_dad", "0");
        netns.run_ok("ip", &["addr", "add", "100.65.0.200/24", "dev", "eth0"]);
        netns.run_ok(
            "ip",
            &["addr", "add", "fd00:65::c8/64", "dev", "eth0", "nodad"],
        );
        netns.run_ok("ip", &["link", "set", "eth0", "up"]);
        for source in sources {
            let host = if source.is_ipv4() { "/32" } else { "/128" };
            netns.run_ok(
                "ip",
                &["addr", "add", &format!("{source}{host}"), "dev", "lo"],
            );
        }
        let n1 = cluster.node(0);
        let (v4, v6) = cluster.node_underlay(0);
        netns.run_ok(
            "ip",
            &["route", "add", &n1.pod_subnet_v4(), "via", &v4.to_string()],
        );
        netns.run_ok(
            "ip",
            &["route", "add", &n1.pod_subnet_v6(), "via", &v6.to_string()],
        );
        Self { netns }
    }

    /// One UDP datagram from `from` to `to` in plaintext over the underlay.
    fn send(&self, from: std::net::SocketAddr, to: std::net::SocketAddr, payload: &[u8]) {
        self.netns.run(|| {
            let socket = std::net::UdpSocket::bind(from).expect("bind the forged source");
            socket.send_to(payload, to).expect("send");
        });
    }
}

/// Datagrams a socket in the pod received within `wait`, by payload.
fn received(socket: &std::net::UdpSocket, wait: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return got;
        }
        socket.set_read_timeout(Some(left)).expect("timeout");
        match socket.recv_from(&mut buf) {
            Ok((n, _)) => got.push(buf[..n].to_vec()),
            Err(_) => return got,
        }
    }
}

/// Plaintext injected on the underlay towards a pod of node 1, forging (a) the address
/// and port of node 2's pod in an established flow, (b) node 2's pod on a new flow, and
/// (c) an address of node 2's pod CIDR that no pod has. Returns what reached the pod.
fn inject_plaintext(strict: bool) -> (Vec<Vec<u8>>, Cluster, Node2Pods) {
    let prefix = TestPrefix::new();
    let cluster = strict_cluster(&prefix, 2, strict);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    let server = n1.add_pod("server", "shop", &[("app", "server")]);
    let client = n2.add_pod("client", "shop", &[("app", "client")]);
    cluster.policy_wait();
    wait_for_full_mesh(&cluster);
    // Node 1 takes packets whose source it routes elsewhere (as a router with asymmetric
    // paths does): the kernel's reverse-path filter must not be what stops the injection.
    n1.netns().sysctl("net.ipv4.conf.all.rp_filter", "0");
    n1.netns().sysctl("net.ipv4.conf.ul0.rp_filter", "0");
    let sockets: Vec<std::net::UdpSocket> = server
        .ips()
        .iter()
        .map(|addr| {
            server
                .netns()
                .run(|| std::net::UdpSocket::bind((*addr, 9000)))
                .expect("bind in the pod")
        })
        .collect();
    // A real flow through the tunnel first (node 1's datapath has its conntrack entry).
    for (addr, socket) in server.ips().iter().zip(&sockets) {
        let to = std::net::SocketAddr::new(*addr, 9000);
        let from = std::net::SocketAddr::new(
            if addr.is_ipv4() {
                client.ipv4
            } else {
                client.ipv6
            },
            40000,
        );
        let sender = client
            .netns()
            .run(|| std::net::UdpSocket::bind(from))
            .expect("bind in the client pod");
        eventually(&format!("UDP to {to} through the tunnel"), || {
            sender.send_to(b"TUNNEL", to).expect("send");
            received(socket, Duration::from_millis(300))
                .iter()
                .any(|d| d == b"TUNNEL")
        });
    }
    let unknown_v4: IpAddr = n2
        .pod_subnet_v4()
        .replace(".0/24", ".250")
        .parse()
        .expect("v4");
    let unknown_v6: IpAddr = n2
        .pod_subnet_v6()
        .replace("::/64", "::fa")
        .parse()
        .expect("v6");
    let injector = Injector::start(
        &prefix,
        &cluster,
        &[client.ipv4, client.ipv6, unknown_v4, unknown_v6],
    );
    let mut got = Vec::new();
    for (addr, socket) in server.ips().iter().zip(&sockets) {
        let (known, unknown) = if addr.is_ipv4() {
            (client.ipv4, unknown_v4)
        } else {
            (client.ipv6, unknown_v6)
        };
        let to = std::net::SocketAddr::new(*addr, 9000);
        for _ in 0..5 {
            injector.send((known, 40000).into(), to, b"INJECTED-ESTABLISHED");
            injector.send((known, 40001).into(), to, b"INJECTED-NEW");
            injector.send((unknown, 40000).into(), to, b"INJECTED-UNKNOWN");
            got.extend(received(socket, Duration::from_millis(200)));
        }
        got.extend(received(socket, T));
    }
    drop(injector);
    drop(sockets);
    (
        got,
        cluster,
        Node2Pods {
            _server: server,
            _client: client,
        },
    )
}

/// The pods of [`inject_plaintext`], dropped before the cluster.
struct Node2Pods {
    _server: weft_tests::Pod,
    _client: weft_tests::Pod,
}

#[test]
fn strict_mode_drops_plaintext_pod_traffic_injected_on_the_underlay() {
    if skip_unless_privileged("strict_mode_drops_plaintext_injected") {
        return;
    }
    let (got, cluster, pods) = inject_plaintext(true);
    let injected: Vec<String> = got
        .iter()
        .filter(|d| d.starts_with(b"INJECTED"))
        .map(|d| String::from_utf8_lossy(d).into_owned())
        .collect();
    assert!(
        injected.is_empty(),
        "plaintext from the underlay reached the pod: {injected:?}"
    );
    let n1 = cluster.node(0);
    let flows = n1.observed_until(
        &["--verdict", "dropped", "--pod", "server"],
        "the injected packets are reported as unencrypted",
        |f| f["drop_reason"] == "unencrypted" && f["direction"] == "ingress",
    );
    assert!(!flows.is_empty());
    assert!(unencrypted_drops(n1) > 0, "the drops are counted");
    drop(pods);
    drop(cluster);
}

#[test]
fn without_strict_mode_plaintext_injected_on_the_underlay_reaches_the_pod() {
    if skip_unless_privileged("without_strict_mode_plaintext_flows") {
        return;
    }
    let (got, cluster, pods) = inject_plaintext(false);
    for what in [
        &b"INJECTED-ESTABLISHED"[..],
        b"INJECTED-NEW",
        b"INJECTED-UNKNOWN",
    ] {
        assert!(
            got.iter().any(|d| d == what),
            "{} did not arrive without strict mode: {:?}",
            String::from_utf8_lossy(what),
            got.iter()
                .map(|d| String::from_utf8_lossy(d).into_owned())
                .collect::<Vec<_>>()
        );
    }
    assert_eq!(unencrypted_drops(cluster.node(0)), 0);
    drop(pods);
    drop(cluster);
}

/// A `wireguard-go` device configured by `wg`, in a namespace of its own on the underlay:
/// a WireGuard implementation weft did not write. Stopped (and its namespace, interface and
/// UAPI socket removed) on drop.
struct WireguardGo {
    netns: weft_tests::NetNs,
    interface: String,
    child: Option<Child>,
}

impl WireguardGo {
    /// `None` when `wireguard-go` is not installed (a failure under `CI=true`).
    fn start(prefix: &TestPrefix, cluster: &Cluster) -> Option<Self> {
        let found = std::process::Command::new("wireguard-go")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            assert!(
                !weft_tests::ci(),
                "wireguard-go is not installed (cargo xtask setup installs it from \
                 bookworm-backports): the interoperability test cannot run in CI"
            );
            eprintln!("SKIPPED weft_interoperates_with_wireguard_go: wireguard-go missing");
            return None;
        }
        let netns = weft_tests::NetNs::create(&prefix.name("wgo"));
        let underlay = cluster.underlay();
        underlay.run_ok(
            "ip",
            &[
                "link",
                "add",
                "ulwgo",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                netns.name(),
            ],
        );
        underlay.run_ok("ip", &["link", "set", "ulwgo", "master", "br0"]);
        underlay.run_ok("ip", &["link", "set", "ulwgo", "up"]);
        netns.run_ok("ip", &["addr", "add", "100.65.0.201/24", "dev", "eth0"]);
        netns.run_ok("ip", &["link", "set", "eth0", "up"]);
        // The UAPI socket directory is machine-wide: the name carries the test's prefix.
        let interface = prefix.name("go");
        let mut command = netns.command("wireguard-go");
        command
            .args(["-f", &interface])
            .env("WG_PROCESS_FOREGROUND", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = weft_tests::process::spawn_in_group(&mut command).expect("start wireguard-go");
        let go = Self {
            netns,
            interface,
            child: Some(child),
        };
        eventually("wireguard-go's UAPI socket answers `wg`", || {
            go.netns
                .exec("wg", &["show", &go.interface])
                .status
                .success()
        });
        Some(go)
    }

    fn wg(&self, args: &[&str]) -> String {
        self.netns.run_ok("wg", args)
    }
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            weft_tests::process::stop_child(child, Duration::from_secs(5));
        }
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.interface));
    }
}

#[test]
fn weft_interoperates_with_wireguard_go_configured_by_wg() {
    if skip_unless_privileged("weft_interoperates_with_wireguard_go") {
        return;
    }
    let prefix = TestPrefix::new();
    // Strict mode on: what comes out of wireguard-go's tunnel is what weft accepts.
    let cluster = strict_cluster(&prefix, 1, true);
    let n1 = cluster.node(0);
    let server = n1.add_pod("server", "shop", &[("app", "server")]);
    server.spawn_tcp_echo(8080);
    cluster.policy_wait();
    let Some(go) = WireguardGo::start(&prefix, &cluster) else {
        return;
    };
    let dir = cluster.dir().join("wgo");
    std::fs::create_dir_all(&dir).expect("dir");
    let key_file = dir.join("private.key");
    let private = go
        .netns
        .command("wg")
        .arg("genkey")
        .output()
        .expect("wg genkey");
    std::fs::write(&key_file, &private.stdout).expect("write key");
    let public = {
        let mut child = go
            .netns
            .command("wg")
            .arg("pubkey")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("wg pubkey");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&private.stdout)
            .expect("key to wg pubkey");
        let out = child.wait_with_output().expect("wg pubkey");
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_owned()
    };
    let weft_key = encryption_status(n1)["public_key"]
        .as_str()
        .expect("weft's public key")
        .to_owned();
    let (u1, _) = cluster.node_underlay(0);
    let (v4, v6) = (n1.pod_subnet_v4(), n1.pod_subnet_v6());
    go.wg(&[
        "set",
        &go.interface,
        "listen-port",
        "51871",
        "private-key",
        key_file.to_str().expect("utf-8"),
        "peer",
        &weft_key,
        "endpoint",
        &format!("{u1}:{PORT}"),
        "allowed-ips",
        &format!("{v4},{v6}"),
    ]);
    let ns = &go.netns;
    ns.run_ok(
        "ip",
        &["addr", "add", "100.64.200.1/32", "dev", &go.interface],
    );
    ns.run_ok(
        "ip",
        &[
            "addr",
            "add",
            "fd00:64:0:c8::1/128",
            "dev",
            &go.interface,
            "nodad",
        ],
    );
    ns.run_ok("ip", &["link", "set", &go.interface, "mtu", "1420", "up"]);
    ns.run_ok(
        "ip",
        &[
            "route",
            "add",
            &v4,
            "dev",
            &go.interface,
            "src",
            "100.64.200.1",
        ],
    );
    ns.run_ok(
        "ip",
        &[
            "route",
            "add",
            &v6,
            "dev",
            &go.interface,
            "src",
            "fd00:64:0:c8::1",
        ],
    );
    // weft learns the peer as it learns any node: from a `Node` object in the source.
    cluster.apply(
        "node-gonode.yaml",
        &format!(
            "apiVersion: weft.io/v1alpha1\nkind: Node\nmetadata: {{name: gonode}}\n\
             spec: {{addresses: [100.65.0.201], podCIDRs: [100.64.200.0/24, fd00:64:0:c8::/64], \
             wireguardPublicKey: {public}}}\n"
        ),
    );
    eventually("weft has the wireguard-go node as a peer", || {
        peer_names(&encryption_status(n1)).contains(&"gonode".to_owned())
    });

    // Traffic both ways through the handshake: ICMP and a TCP echo, v4 and v6, from the
    // wireguard-go side to the pod on the weft node.
    for addr in server.ips() {
        let ping = if addr.is_ipv4() { "ping" } else { "ping6" };
        eventually(&format!("ping {addr} from behind wireguard-go"), || {
            ns.exec(ping, &["-c", "1", "-W", "1", &addr.to_string()])
                .status
                .success()
        });
        let echoed = ns.run(|| -> std::io::Result<()> {
            let mut s = std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::new(addr, 8080),
                Duration::from_secs(5),
            )?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let message = vec![b'w'; 256 * 1024];
            let writer = {
                let mut s = s.try_clone()?;
                let m = message.clone();
                std::thread::spawn(move || s.write_all(&m))
            };
            let mut back = vec![0u8; message.len()];
            s.read_exact(&mut back)?;
            writer.join().expect("writer")?;
            assert!(back == message, "the echo differs");
            Ok(())
        });
        echoed.unwrap_or_else(|e| panic!("TCP echo of {addr} through wireguard-go: {e}"));
    }
    let shown = go.wg(&["show", &go.interface]);
    assert!(shown.contains("latest handshake"), "wg show: {shown}");
    assert!(
        shown.contains(&format!("peer: {weft_key}")),
        "wg show: {shown}"
    );
    let status = encryption_status(n1);
    let peer = status["peers"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["node"] == "gonode"))
        .cloned()
        .expect("gonode in weft encryption status");
    assert_eq!(peer["public_key"], public.as_str(), "{status}");
    assert!(peer["last_handshake_seconds_ago"].is_u64(), "{status}");
    assert!(
        peer["rx_bytes"].as_u64().unwrap_or(0) > 256 * 1024
            && peer["tx_bytes"].as_u64().unwrap_or(0) > 256 * 1024,
        "bytes both ways through the weft device: {status}"
    );
    assert_eq!(
        unencrypted_drops(n1),
        0,
        "nothing dropped under strict mode"
    );
    cluster.remove("node-gonode.yaml");
    drop(go);
    drop(server);
}

/// Deterministic bytes for the stream (xorshift), and a checksum over what is read back
/// (FNV-1a, 64 bit): a byte lost, duplicated or changed anywhere changes it.
struct Stream {
    state: u64,
}

impl Stream {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            let bytes = self.state.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

fn fnv1a(hash: &mut u64, data: &[u8]) {
    for b in data {
        *hash ^= u64::from(*b);
        *hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
}

#[test]
fn rotation_during_a_running_tcp_stream_keeps_it_whole() {
    const TOTAL: usize = 300 << 20;
    const CHUNK: usize = 64 << 10;
    if skip_unless_privileged("rotation_during_a_running_tcp_stream") {
        return;
    }
    let prefix = TestPrefix::new();
    let cluster = encrypted_cluster(&prefix, 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    let server = n2.add_pod("server", "shop", &[("app", "server")]);
    let client = n1.add_pod("client", "shop", &[("app", "client")]);
    server.spawn_tcp_echo(8080);
    cluster.policy_wait();
    wait_for_full_mesh(&cluster);
    let old = encryption_status(n1)["public_key"].clone();
    let mut stream = client
        .tcp_connect(server.ipv4, 8080, Duration::from_secs(30))
        .expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let started = Instant::now();
    let writer = {
        let mut stream = stream.try_clone().expect("clone");
        std::thread::spawn(move || -> std::io::Result<u64> {
            let mut source = Stream {
                state: 0x9e37_79b9_7f4a_7c15,
            };
            let mut hash = 0xcbf2_9ce4_8422_2325;
            let mut buf = vec![0u8; CHUNK];
            let mut sent = 0;
            while sent < TOTAL {
                source.fill(&mut buf);
                fnv1a(&mut hash, &buf);
                stream.write_all(&buf)?;
                sent += buf.len();
            }
            Ok(hash)
        })
    };
    let mut hash = 0xcbf2_9ce4_8422_2325;
    let mut buf = vec![0u8; CHUNK];
    let mut read = 0usize;
    let mut rotated = None;
    while read < TOTAL {
        let n = stream
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("the stream broke after {read} bytes: {e}"));
        assert!(n > 0, "the stream ended after {read} bytes");
        fnv1a(&mut hash, &buf[..n]);
        read += n;
        if rotated.is_none() && read >= TOTAL / 6 {
            let answer = n1.weft_json(&["encryption", "rotate"]);
            rotated = Some((answer["public_key"].clone(), read));
        }
    }
    let sent_hash = writer
        .join()
        .expect("writer")
        .expect("the stream was written");
    let elapsed = started.elapsed();
    assert_eq!(
        hash, sent_hash,
        "the echoed stream's checksum matches what was sent"
    );
    let (new, at) = rotated.expect("rotated during the stream");
    assert_ne!(new, old, "a new key");
    println!(
        "{} MiB echoed through a key rotation (at {} MiB) in {elapsed:?}; checksums match",
        TOTAL >> 20,
        at >> 20
    );
    // Both sides have the new key in use: node 1 as its own, node 2 for its peer, with a
    // handshake made with it.
    assert_eq!(encryption_status(n1)["public_key"], new);
    eventually("node 2 uses node 1's new key, with a handshake", || {
        encryption_status(n2)["peers"]
            .as_array()
            .is_some_and(|peers| {
                peers
                    .iter()
                    .any(|p| p["public_key"] == new && p["last_handshake_seconds_ago"].is_u64())
            })
    });
    drop(stream);
    drop((client, server));
}
