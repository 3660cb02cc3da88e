//! Datapath correctness on the real kernel: revoked access stops established flows, ICMP
//! errors belong to their flow, fragments are classified by their datagram's ports, a pod
//! cannot forge its source address, and drop floods are reported once per flow and second.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use weft_tests::shop::shop;
use weft_tests::{Outside, Pod, eventually, policy_yaml, tcp_roundtrip};

const T: Duration = Duration::from_millis(1500);

fn server_policy(ingress: &str) -> String {
    policy_yaml(
        "server-in",
        "shop",
        &format!("  endpointSelector:\n    matchLabels: {{app: server}}\n  ingress:\n{ingress}"),
    )
}

fn allow(app: &str, ports: &[(u16, &str)]) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|(p, proto)| format!("      - {{port: \"{p}\", protocol: {proto}}}\n"))
        .collect();
    format!(
        "  - fromEndpoints:\n    - matchLabels: {{app: {app}}}\n    toPorts:\n    - ports:\n{}",
        ports.concat()
    )
}

/// Whether a byte of the ticker arrives within `wait`.
fn tick_arrives(stream: &mut std::net::TcpStream, wait: Duration) -> bool {
    let _ = stream.set_read_timeout(Some(wait));
    let mut byte = [0u8; 64];
    matches!(stream.read(&mut byte), Ok(n) if n > 0)
}

#[test]
fn revoked_access_stops_established_flows_in_both_directions() {
    let Some(s) = shop("revoked_access_stops_established_flows_in_both_directions") else {
        return;
    };
    let v4 = s.server.ipv4;
    let both = format!(
        "{}{}",
        allow("client", &[(8080, "TCP"), (7070, "TCP")]),
        allow("other", &[(9090, "TCP")])
    );
    s.node.apply("server.yaml", &server_policy(&both));
    s.node.policy_wait();
    let mut echo = s
        .client
        .tcp_connect(v4, 8080, T)
        .expect("allowed connection opens");
    tcp_roundtrip(&mut echo, b"before\n").expect("echo before the change");
    let mut ticks = s
        .client
        .tcp_connect(v4, 7070, T)
        .expect("ticker connection opens");
    assert!(
        tick_arrives(&mut ticks, T),
        "the server's data arrives before the change"
    );
    let mut unrelated = s
        .other
        .tcp_connect(v4, 9090, T)
        .expect("other's connection opens");
    tcp_roundtrip(&mut unrelated, b"unrelated\n").expect("unrelated echo");

    // Revoke the client's access; the other pod's rule stays.
    s.node.apply(
        "server.yaml",
        &server_policy(&allow("other", &[(9090, "TCP")])),
    );
    let changed = Instant::now();
    s.node.policy_wait();
    // Client -> server: nothing the client sends is echoed any more.
    let _ = echo.set_read_timeout(Some(Duration::from_millis(300)));
    eventually("the revoked echo connection stops passing data", || {
        tcp_roundtrip(&mut echo, b"after\n").is_err()
    });
    // Server -> client: the server's own data stops too (drain what was in flight first).
    eventually("the revoked ticker connection stops passing data", || {
        !tick_arrives(&mut ticks, Duration::from_millis(400))
    });
    eprintln!("revoked within {:?} of the change", changed.elapsed());
    assert!(
        !tick_arrives(&mut ticks, Duration::from_secs(1)),
        "nothing more arrives once revoked"
    );
    let _ = unrelated.set_read_timeout(Some(T));
    tcp_roundtrip(&mut unrelated, b"still\n").expect("an unrelated flow is untouched");
    assert!(
        !s.client.tcp_probe(v4, 8080, T),
        "new connections are refused too"
    );
    s.node.observed_until(
        &["--verdict", "dropped", "--pod", "client"],
        "the revocation is reported",
        |f| f["notes"].to_string().contains("revoked"),
    );
    let status = s.node.weft_json(&["status"]);
    assert!(
        status["applied_revision"] == status["config_revision"],
        "the status says the change is in force: {status}"
    );
}

#[test]
fn icmp_errors_of_a_flow_reach_an_isolated_pod_and_path_mtu_discovery_works() {
    let Some(s) = shop("icmp_errors_of_a_flow_reach_an_isolated_pod_and_path_mtu_discovery_works")
    else {
        return;
    };
    let mut outside = Outside::attach(&s.node);
    outside.spawn_tcp_sink(6000);
    // The client may send only to the far network; nothing may reach it (its ingress is
    // isolated), so the router's ICMP errors get in only as part of the client's flows.
    let spec = "  endpointSelector:\n    matchLabels: {app: client}\n  ingress: []\n  egress:\n  - toCIDR: [10.0.0.0/8, \"fd00:201::/32\"]\n";
    s.node
        .apply("client.yaml", &policy_yaml("client-out", "shop", spec));
    s.node.policy_wait();
    assert!(
        !s.other.ping(s.client.ipv4),
        "the client is isolated for ingress"
    );
    for far in [outside.far_v4, outside.far_v6] {
        let payload = vec![b'p'; 256 * 1024];
        let mut stream = s
            .client
            .tcp_connect(far, 6000, T)
            .expect("connect to the far host");
        stream
            .set_write_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        stream.write_all(&payload).unwrap_or_else(|e| {
            panic!(
                "sending {} bytes to {far}: {e} (a PMTU black hole?)",
                payload.len()
            )
        });
        stream
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .unwrap_or_else(|e| panic!("no answer from {far}: {e} (a PMTU black hole?)"));
        assert_eq!(
            answer.trim(),
            payload.len().to_string(),
            "the far host got everything over the narrow link ({far})"
        );
    }
    let counters = s.node.weft_json(&["status"]);
    assert!(
        counters["problems"].as_array().is_some(),
        "status answers: {counters}"
    );
    drop(outside);
}

/// An ICMP error sent by `from` to `to`, quoting a UDP packet `to:sport_quoted ->
/// quoted_dst:dport_quoted` (sent with a raw socket by python3).
fn send_icmp_error(
    from: &Pod,
    to: IpAddr,
    quoted_dst: IpAddr,
    sport_quoted: u16,
    dport_quoted: u16,
) {
    let script = format!(
        r"
import socket, struct
def csum(b):
    if len(b) % 2: b += b'\0'
    s = sum(struct.unpack('!%dH' % (len(b)//2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return (~s) & 0xffff
src, dst = socket.inet_aton('{to}'), socket.inet_aton('{quoted_dst}')
udp = struct.pack('!HHHH', {sport_quoted}, {dport_quoted}, 8, 0)
ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 28, 1, 0x4000, 64, 17, 0, src, dst)
icmp = struct.pack('!BBHHH', 3, 3, 0, 0, 0) + ip + udp
icmp = icmp[:2] + struct.pack('!H', csum(icmp)) + icmp[4:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
for _ in range(3): s.sendto(icmp, ('{to}', 0))
"
    );
    let out = from.exec("python3", &["-c", &script]);
    assert!(
        out.status.success(),
        "python3 raw socket: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn icmp_errors_for_flows_that_do_not_exist_are_no_way_in() {
    let Some(s) = shop("icmp_errors_for_flows_that_do_not_exist_are_no_way_in") else {
        return;
    };
    s.node.apply(
        "server.yaml",
        &server_policy(&allow("client", &[(5353, "UDP")])),
    );
    s.node.policy_wait();
    assert!(
        s.client.udp_probe(s.server.ipv4, 5353, T),
        "the allowed flow works"
    );
    // A "port unreachable" from the denied pod, quoting a packet the server never sent.
    send_icmp_error(&s.other, s.server.ipv4, s.other.ipv4, 40000, 5555);
    let flows = s.node.observed_until(
        &["--verdict", "dropped", "--pod", "other"],
        "the forged ICMP error is dropped",
        |f| f["protocol"] == "ICMP" && f["icmp"] == "3/3",
    );
    assert!(
        flows
            .iter()
            .all(|f| f["verdict"] != "forwarded" || f["protocol"] != "ICMP"),
        "no ICMP from the denied pod got through: {flows:?}"
    );
}

#[test]
fn fragmented_datagrams_are_classified_by_their_first_fragment() {
    let Some(s) = shop("fragmented_datagrams_are_classified_by_their_first_fragment") else {
        return;
    };
    s.node.apply(
        "server.yaml",
        &server_policy(&allow("client", &[(5353, "UDP")])),
    );
    s.node.policy_wait();
    for addr in s.server.ips() {
        assert!(
            s.client.udp_roundtrip_of(addr, 5353, 4000, T),
            "a 4000-byte datagram to the allowed port arrives whole and its answer comes back ({addr})"
        );
        assert!(
            !s.client.udp_roundtrip_of(addr, 5354, 4000, T),
            "a 4000-byte datagram to a denied port does not arrive ({addr})"
        );
        assert!(
            !s.other.udp_roundtrip_of(addr, 5353, 4000, T),
            "a denied peer's fragments do not arrive ({addr})"
        );
    }
}

#[test]
fn a_pod_cannot_send_from_an_address_that_is_not_its_own() {
    let Some(s) = shop("a_pod_cannot_send_from_an_address_that_is_not_its_own") else {
        return;
    };
    // The client is allowed in; the other pod pretends to be the client.
    s.node.apply(
        "server.yaml",
        &server_policy(&allow("client", &[(5353, "UDP")])),
    );
    s.node.policy_wait();
    let script = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.SOL_IP, 19, 1)\n\
         s.bind(('{client}', 40001))\n\
         for _ in range(5): s.sendto(b'forged', ('{server}', 5353))\n",
        client = s.client.ipv4,
        server = s.server.ipv4
    );
    // IP_FREEBIND (19) lets the socket bind an address the pod does not have.
    let out = s.other.exec("python3", &["-c", &script]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.node.observed_until(
        &["--verdict", "dropped"],
        "the forged source is dropped as spoofed-source",
        |f| f["drop_reason"] == "spoofed-source" && f["endpoint"] == "shop/other",
    );
}

#[test]
fn a_drop_flood_is_reported_once_per_flow_and_second_and_counted() {
    let Some(s) = shop("a_drop_flood_is_reported_once_per_flow_and_second_and_counted") else {
        return;
    };
    s.node.apply(
        "server.yaml",
        &server_policy(&allow("client", &[(5353, "UDP")])),
    );
    s.node.policy_wait();
    // 2,000 datagrams of one flow in about a second, all dropped.
    let script = format!(
        "import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('0.0.0.0', 40002))\nend = time.time() + 1.2\nn = 0\n\
         while time.time() < end and n < 2000:\n    s.sendto(b'x', ('{}', 5354)); n += 1\n    time.sleep(0.0005)\n",
        s.server.ipv4
    );
    let out = s.other.exec("python3", &["-c", &script]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(1100));
    // One more after the second is over: it carries the count of those held back.
    let last = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('0.0.0.0', 40002))\ns.sendto(b'x', ('{}', 5354))\n",
        s.server.ipv4
    );
    assert!(s.other.exec("python3", &["-c", &last]).status.success());
    let flows = s.node.observed_until(
        &["--verdict", "dropped", "--port", "5354"],
        "the held-back events are counted on a later event",
        |f| f["suppressed"].as_u64().unwrap_or(0) > 0,
    );
    let events = flows
        .iter()
        .filter(|f| f["source"]["port"] == 40002)
        .count();
    assert!(
        (1..=4).contains(&events),
        "a flood of one flow yields a few events, not thousands: {events}"
    );
    let status = s.node.weft_json(&["status"]);
    assert!(
        status["events"]["rate_limited"].as_u64().unwrap_or(0) > 100,
        "weft status counts what was held back: {}",
        status["events"]
    );
}
