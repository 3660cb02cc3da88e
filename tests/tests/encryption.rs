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
