//! L3/L4 identity policy end to end on one node: a real agent in a node namespace, pods
//! attached through the real CNI chain, real traffic. Each test builds its own node with a
//! per-test prefix; everything is removed on drop, also when the test fails.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::time::Duration;

use weft_tests::shop::shop;
use weft_tests::{Pod, eventually, json, policy_yaml, tcp_roundtrip};

const T: Duration = Duration::from_millis(1500);
fn policy(name: &str, spec: &str) -> String {
    policy_yaml(name, "shop", spec)
}

const SERVER_ALLOWS_CLIENT_8080: &str = "  endpointSelector:
    matchLabels: {app: server}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: client}
    toPorts:
    - ports:
      - {port: \"8080\", protocol: TCP}
";

fn tcp(from: &Pod, to: IpAddr, port: u16) -> bool {
    from.tcp_probe(to, port, T)
}

#[test]
fn selection_isolates_and_an_allow_opens_exactly_its_port() {
    let Some(s) = shop("selection_isolates_and_an_allow_opens_exactly_its_port") else {
        return;
    };
    let [v4, v6] = s.server.ips();
    // No policy: everything flows.
    assert!(tcp(&s.client, v4, 8080), "no policy: client -> server:8080");
    assert!(
        tcp(&s.other, v6, 9090),
        "no policy: other -> server:9090 (v6)"
    );
    assert!(s.client.udp_probe(v4, 5353, T), "no policy: UDP");
    assert!(s.client.ping_retry(v4, 3), "no policy: ping");

    s.node.apply(
        "server.yaml",
        &policy("server-in", SERVER_ALLOWS_CLIENT_8080),
    );
    eventually("server isolated: client -> server:9090 dropped", || {
        !tcp(&s.client, v4, 9090)
    });
    assert!(tcp(&s.client, v4, 8080), "the allowed port stays open (v4)");
    assert!(tcp(&s.client, v6, 8080), "the allowed port stays open (v6)");
    assert!(!tcp(&s.other, v4, 8080), "other pods are not allowed");
    assert!(!s.client.udp_probe(v4, 5353, T), "UDP is not allowed");
    assert!(!s.client.ping(v4), "a rule with ports does not allow ICMP");
    // Only the server's ingress is isolated: its egress stays open.
    assert!(
        s.server.ping_retry(s.other.ipv4, 3),
        "server egress stays open"
    );

    s.node.remove("server.yaml");
    eventually("policy removed: traffic restored", || {
        tcp(&s.other, v4, 9090)
    });
    assert!(s.client.udp_probe(v6, 5353, T), "UDP restored");
    assert!(s.client.ping_retry(v4, 3), "ICMP restored");
}

#[test]
fn deny_beats_allow() {
    let Some(s) = shop("deny_beats_allow") else {
        return;
    };
    let v4 = s.server.ipv4;
    // Everything in the namespace may reach the server, except client on 8080.
    let spec = "  endpointSelector:
    matchLabels: {app: server}
  ingress:
  - fromEndpoints:
    - {}
  ingressDeny:
  - fromEndpoints:
    - matchLabels: {app: client}
    toPorts:
    - ports:
      - {port: \"8080\", protocol: TCP}
";
    s.node.apply("server.yaml", &policy("server-in", spec));
    s.node.policy_wait();
    assert!(
        !tcp(&s.client, v4, 8080),
        "the deny rule closes client -> 8080"
    );
    assert!(
        tcp(&s.client, v4, 9090),
        "the allow still opens other ports"
    );
    assert!(tcp(&s.other, v4, 8080), "the deny names only client");
    s.node.observed_until(
        &["--verdict", "dropped", "--port", "8080"],
        "the drop is reported as policy-deny-rule",
        |f| f["drop_reason"] == "policy-deny-rule" && f["source"]["name"] == "shop/client",
    );
}

#[test]
fn udp_icmp_and_ipv6_are_enforced() {
    let Some(s) = shop("udp_icmp_and_ipv6_are_enforced") else {
        return;
    };
    let [v4, v6] = s.server.ips();
    let udp_only = "  endpointSelector:
    matchLabels: {app: server}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: client}
    toPorts:
    - ports:
      - {port: \"5353\", protocol: UDP}
";
    s.node.apply("server.yaml", &policy("server-in", udp_only));
    eventually("TCP dropped once only UDP is allowed", || {
        !tcp(&s.client, v4, 8080)
    });
    assert!(!tcp(&s.client, v6, 8080), "TCP over IPv6 dropped too");
    assert!(s.client.udp_probe(v4, 5353, T), "UDP allowed (v4)");
    assert!(s.client.udp_probe(v6, 5353, T), "UDP allowed (v6)");
    assert!(
        !s.other.udp_probe(v6, 5353, T),
        "UDP from other dropped (v6)"
    );
    assert!(!s.client.ping(v4), "ICMP dropped (v4)");
    assert!(!s.client.ping(v6), "ICMPv6 echo dropped");

    // A rule without ports allows every protocol, ICMP included.
    let any_port = "  endpointSelector:
    matchLabels: {app: server}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: client}
";
    s.node.apply("server.yaml", &policy("server-in", any_port));
    eventually("ICMP allowed by a rule without ports", || s.client.ping(v4));
    assert!(s.client.ping_retry(v6, 3), "ICMPv6 allowed");
    assert!(tcp(&s.client, v6, 9090), "TCP allowed (v6)");
    assert!(!s.other.ping(v6), "other still dropped (v6)");
}

#[test]
fn replies_pass_and_established_connections_survive_policy_changes() {
    let Some(s) = shop("replies_pass_and_established_connections_survive_policy_changes") else {
        return;
    };
    let v4 = s.server.ipv4;
    // Server: ingress from client on 8080 only; egress isolated with nothing allowed, so its
    // replies pass only because conntrack knows the connection.
    let spec = format!("{SERVER_ALLOWS_CLIENT_8080}  egress: []\n");
    s.node
        .apply("server.yaml", &policy("server-lockdown", &spec));
    eventually("server isolated", || !tcp(&s.other, v4, 8080));
    let mut conn = s
        .client
        .tcp_connect(v4, 8080, T)
        .expect("allowed connection opens");
    tcp_roundtrip(&mut conn, b"before\n").expect("replies of an allowed connection pass");
    assert!(
        !s.server.ping(s.client.ipv4),
        "the server cannot open flows of its own"
    );

    // An unrelated change: a policy for another pod, and a widened rule for the server.
    s.node.apply(
        "other.yaml",
        &policy(
            "other-in",
            "  endpointSelector:\n    matchLabels: {app: other}\n  ingress: []\n",
        ),
    );
    let widened = format!(
        "{SERVER_ALLOWS_CLIENT_8080}      - {{port: \"9090\", protocol: TCP}}\n  egress: []\n"
    );
    s.node
        .apply("server.yaml", &policy("server-lockdown", &widened));
    eventually("widened rule enforced", || tcp(&s.client, v4, 9090));
    tcp_roundtrip(&mut conn, b"after\n").expect("the established connection survives");

    // Streams of data both ways on the same connection.
    let payload = vec![b'x'; 200_000];
    let mut back = vec![0u8; payload.len()];
    let mut reader = conn.try_clone().expect("clone stream");
    let writer = std::thread::spawn(move || {
        conn.write_all(&payload).expect("write payload");
        conn
    });
    reader.read_exact(&mut back).expect("echo of the payload");
    writer.join().expect("writer thread");
    assert!(back.iter().all(|b| *b == b'x'));
}

#[test]
fn audit_reports_would_be_drops_and_lets_them_pass() {
    let Some(s) = shop("audit_reports_would_be_drops_and_lets_them_pass") else {
        return;
    };
    let v4 = s.server.ipv4;
    let spec = format!("  enforcement: audit\n{SERVER_ALLOWS_CLIENT_8080}");
    s.node.apply("server.yaml", &policy("server-audit", &spec));
    eventually("audit policy applied", || {
        json(&s.node.weft_ok(&["-o", "json", "endpoint", "list"]))
            .as_array()
            .expect("array")
            .iter()
            .any(|r| r["pod"] == "server" && r["ingress"] == "audit")
    });
    assert!(tcp(&s.other, v4, 9090), "audit lets the would-be drop pass");
    assert!(s.other.ping_retry(v4, 3), "audit lets ICMP pass");
    let other = s.node.identity_of("other");
    s.node.observed_until(
        &["--verdict", "audit"],
        "the would-be drop is reported as audit/policy-denied",
        |f| {
            f["destination"]["port"] == 9090
                && f["source"]["identity"] == other
                && f["drop_reason"] == "policy-denied"
        },
    );
    assert!(
        s.node.observed(&["--verdict", "dropped"]).is_empty(),
        "audit never drops"
    );
}

#[test]
fn malformed_policy_is_rejected_and_the_last_good_policy_stays() {
    let Some(s) = shop("malformed_policy_is_rejected_and_the_last_good_policy_stays") else {
        return;
    };
    let v4 = s.server.ipv4;
    s.node.apply(
        "server.yaml",
        &policy("server-in", SERVER_ALLOWS_CLIENT_8080),
    );
    eventually("good policy enforced", || !tcp(&s.client, v4, 9090));

    // Same file, now broken: a port out of range, and a typo'd field in a new file.
    let broken = SERVER_ALLOWS_CLIENT_8080.replace("\"8080\"", "\"99999\"");
    s.node.apply("server.yaml", &policy("server-in", &broken));
    s.node.apply(
        "typo.yaml",
        &policy(
            "typo",
            "  endpointSelector:\n    matchLabels: {app: client}\n  ingres: []\n",
        ),
    );
    let mut rejected = Vec::new();
    eventually("both files rejected", || {
        let status = json(&s.node.weft_ok(&["-o", "json", "status"]));
        rejected = status["rejected"]
            .as_array()
            .expect("rejected is an array")
            .iter()
            .map(|r| r["message"].as_str().unwrap_or_default().to_owned())
            .collect();
        rejected.len() >= 2
    });
    let port_error = rejected
        .iter()
        .find(|r| r.contains("server.yaml"))
        .expect("server.yaml rejected");
    assert!(
        port_error.contains("shop/server-in") && port_error.contains("99999"),
        "the message names the object and the bad value: {port_error}"
    );
    assert!(
        port_error.contains("spec.ingress[0].toPorts[0].ports[0].port"),
        "the message names the field: {port_error}"
    );
    let typo = rejected
        .iter()
        .find(|r| r.contains("typo.yaml"))
        .expect("typo.yaml rejected");
    assert!(
        typo.contains("ingres"),
        "the unknown field is named: {typo}"
    );

    // Nothing changed: the last good policy is still enforced, the client is not isolated.
    assert!(tcp(&s.client, v4, 8080), "last good allow still in force");
    assert!(
        !tcp(&s.client, v4, 9090),
        "last good isolation still in force"
    );
    assert!(
        s.client.ping_retry(s.other.ipv4, 3),
        "the rejected policy did not isolate client"
    );
}

#[test]
fn observe_shows_denied_flow_with_identities_and_reason() {
    let Some(s) = shop("observe_shows_denied_flow_with_identities_and_reason") else {
        return;
    };
    let v6 = s.server.ipv6;
    s.node.apply(
        "server.yaml",
        &policy("server-in", SERVER_ALLOWS_CLIENT_8080),
    );
    s.node.policy_wait();
    assert!(!tcp(&s.other, v6, 8080), "other -> server:8080 is denied");
    let other = s.node.identity_of("other");
    let server = s.node.identity_of("server");
    assert_ne!(other, server);
    let flows = s.node.observed_until(
        &["--verdict", "dropped", "--pod", "other"],
        "the dropped flow is reported",
        |f| f["destination"]["port"] == 8080 && f["protocol"] == "TCP",
    );
    let flow = flows
        .iter()
        .find(|f| f["destination"]["port"] == 8080 && f["protocol"] == "TCP")
        .unwrap_or_else(|| panic!("no dropped TCP flow other -> server:8080 in {flows:?}"));
    assert_eq!(flow["drop_reason"], "policy-denied", "{flow}");
    assert_eq!(flow["direction"], "ingress", "{flow}");
    assert_eq!(flow["endpoint"], "shop/server", "{flow}");
    assert_eq!(flow["source"]["name"], "shop/other", "{flow}");
    assert_eq!(flow["source"]["identity"], other, "{flow}");
    assert_eq!(flow["destination"]["identity"], server, "{flow}");
    assert_eq!(flow["destination"]["ip"], v6.to_string(), "{flow}");
    let labels = flow["source"]["labels"].to_string();
    assert!(labels.contains("app=other"), "labels shown: {labels}");
}

#[test]
fn bpftool_shows_named_fields_of_the_policy_map() {
    let Some(s) = shop("bpftool_shows_named_fields_of_the_policy_map") else {
        return;
    };
    s.node.apply(
        "server.yaml",
        &policy("server-in", SERVER_ALLOWS_CLIENT_8080),
    );
    eventually("policy entries written", || {
        json(&s.node.weft_ok(&["-o", "json", "status"]))["policy_map_entries"]
            .as_u64()
            .unwrap_or(0)
            > 0
    });
    let map = s.node.bpffs_dir().join("weft_policy_v1");
    let out = std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(&map)
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for field in [
        "endpoint_id",
        "identity",
        "direction",
        "protocol",
        "dport",
        "verdict",
    ] {
        assert!(text.contains(field), "bpftool output names {field}: {text}");
    }
}

#[test]
fn a_restarted_agent_adopts_pinned_state_without_a_gap() {
    let Some(mut s) = shop("a_restarted_agent_adopts_pinned_state_without_a_gap") else {
        return;
    };
    let v4 = s.server.ipv4;
    s.node.apply(
        "server.yaml",
        &policy("server-in", SERVER_ALLOWS_CLIENT_8080),
    );
    eventually("policy enforced", || !tcp(&s.client, v4, 9090));
    let entries_before = json(&s.node.weft_ok(&["-o", "json", "status"]))["policy_map_entries"]
        .as_u64()
        .expect("entries");
    let mut conn = s.client.tcp_connect(v4, 8080, T).expect("connect");
    tcp_roundtrip(&mut conn, b"one\n").expect("echo");

    s.node.stop_agent();
    // Agent gone: the pinned programs keep enforcing the last policy.
    tcp_roundtrip(&mut conn, b"two\n").expect("established connection survives the stop");
    assert!(
        tcp(&s.client, v4, 8080),
        "allowed traffic flows with the agent down"
    );
    assert!(
        !tcp(&s.client, v4, 9090),
        "enforcement does not lapse with the agent down"
    );
    assert!(!tcp(&s.other, v4, 8080), "fail closed with the agent down");

    s.node.start_agent();
    tcp_roundtrip(&mut conn, b"three\n").expect("established connection survives the restart");
    assert!(
        !tcp(&s.client, v4, 9090),
        "still enforced after the restart"
    );
    assert!(tcp(&s.client, v4, 8080), "still allowed after the restart");
    let status = json(&s.node.weft_ok(&["-o", "json", "status"]));
    assert_eq!(status["endpoints"], 3, "endpoints adopted: {status}");
    assert_eq!(
        status["policy_map_entries"].as_u64(),
        Some(entries_before),
        "same policy after adoption: {status}"
    );
    // Incremental: the new agent found its policy in the pinned map and rewrote nothing.
    let log = s.node.log();
    let second_run = log
        .rsplit_once("datapath loaded")
        .map(|(_, after)| after)
        .expect("the agent logs its start");
    assert!(
        second_run.contains(&format!("adopted_policy_entries={entries_before}")),
        "the agent adopted the pinned policy: {second_run}"
    );
    assert!(
        !second_run.contains("policy applied"),
        "nothing had to be rewritten after the restart: {second_run}"
    );
}

#[test]
fn entities_and_cidrs_select_the_node_and_outside_addresses() {
    let Some(s) = shop("entities_and_cidrs_select_the_node_and_outside_addresses") else {
        return;
    };
    // ptp gives the host side of every pod's veth the subnet's first address: the node.
    let subnet = s.node.pod_subnet_v4();
    let gateway: IpAddr = subnet
        .split('/')
        .next()
        .and_then(|net| net.rsplit_once('.'))
        .map(|(head, _)| format!("{head}.1"))
        .and_then(|a| a.parse().ok())
        .expect("gateway address of the pod subnet");
    assert!(
        s.client.ping_retry(gateway, 3),
        "no policy: the node answers"
    );

    let spec = "  endpointSelector:
    matchLabels: {app: client}
  egress:
  - toEntities: [host]
  - toCIDR: [198.51.100.0/24]
";
    s.node.apply("client.yaml", &policy("client-out", spec));
    eventually("client egress isolated", || !s.client.ping(s.server.ipv4));
    assert!(
        s.client.ping_retry(gateway, 3),
        "toEntities: host reaches the node"
    );
    assert!(
        !tcp(&s.client, s.server.ipv4, 8080),
        "pods are not the host entity"
    );
    let identities = json(&s.node.weft_ok(&["-o", "json", "identity", "list"]));
    assert!(
        identities
            .as_array()
            .expect("array")
            .iter()
            .any(|i| i["labels"].to_string().contains("cidr:198.51.100.0/24")),
        "the CIDR got an identity: {identities}"
    );
    let status = json(&s.node.weft_ok(&["-o", "json", "policy", "get"]));
    assert!(
        status["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .any(|e| e["derived_from"]
                .to_string()
                .contains("client-out egress[1]")),
        "entries say which rule they came from: {status}"
    );
}

#[test]
fn the_node_reaches_its_isolated_pods_and_routed_traffic_is_checked_at_to_pod() {
    let Some(s) =
        shop("the_node_reaches_its_isolated_pods_and_routed_traffic_is_checked_at_to_pod")
    else {
        return;
    };
    let [v4, v6] = s.server.ips();
    // Nothing but the client may reach the server; the node is exempt (health checks).
    s.node.apply(
        "server.yaml",
        &policy("server-in", SERVER_ALLOWS_CLIENT_8080),
    );
    eventually("server isolated", || !tcp(&s.other, v4, 8080));
    let ping = |addr: IpAddr| {
        s.node
            .netns()
            .exec("ping", &["-c1", "-W1", "-n", &addr.to_string()])
            .status
            .success()
    };
    assert!(ping(v4), "the node reaches its isolated pod (v4)");
    assert!(ping(v6), "the node reaches its isolated pod (v6)");
    s.node.observed_until(
        &["--verdict", "forwarded", "--pod", "server"],
        "node -> pod flows reported, checked at to_pod as identity host",
        |f| f["source"]["name"] == "host" && f["direction"] == "ingress",
    );
}
