//! Fail closed under faults and bad input: in every test a denied peer probes the isolated
//! pod the whole time and never gets through, and an allowed peer shows the test did not
//! simply break everything.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use weft_tests::{
    CniCall, Node, Pod, Probe, Prober, TestPrefix, eventually, policy_yaml, skip_unless_privileged,
};

/// Fields drop in order: probers and pods (CNI DEL inside the node) before the node.
struct Shop {
    client: Pod,
    server: Pod,
    other: Pod,
    node: Node,
}

fn shop_with(test: &str, agent_args: &[&str]) -> Option<Shop> {
    if skip_unless_privileged(test) {
        return None;
    }
    let prefix = TestPrefix::new();
    let node = Node::start_with_args(&prefix, "n1", agent_args);
    let server = node.add_pod("server", "shop", &[("app", "server")]);
    let client = node.add_pod("client", "shop", &[("app", "client")]);
    let other = node.add_pod("other", "shop", &[("app", "other")]);
    for port in [8080, 9090] {
        server.spawn_tcp_echo(port);
        other.spawn_tcp_echo(port);
    }
    server.spawn_udp_echo(5353);
    Some(Shop {
        client,
        server,
        other,
        node,
    })
}

fn shop(test: &str) -> Option<Shop> {
    shop_with(test, &[])
}

const SERVER_IN: &str = "  endpointSelector:\n    matchLabels: {app: server}\n  ingress:\n  - fromEndpoints:\n    - matchLabels: {app: client}\n    toPorts:\n    - ports:\n      - {port: \"8080\", protocol: TCP}\n";

fn server_in() -> String {
    policy_yaml("server-in", "shop", SERVER_IN)
}

/// The denied peer's probers (TCP and UDP to the server) and the allowed one's.
struct Probers {
    denied_tcp: Prober,
    denied_udp: Prober,
    allowed: Prober,
}

impl Probers {
    fn start(s: &Shop) -> Self {
        let v4 = s.server.ipv4;
        let p = Self {
            denied_tcp: Prober::start(&s.other, Probe::TcpEcho(v4, 9090)),
            denied_udp: Prober::start(&s.other, Probe::UdpEcho(v4, 5353)),
            allowed: Prober::start(&s.client, Probe::TcpEcho(v4, 8080)),
        };
        p.allowed.wait_for_tries(3);
        p
    }

    /// Stop and check: nothing denied got through, the allowed peer did.
    fn check(self, what: &str) {
        let tcp = self.denied_tcp.stop();
        let udp = self.denied_udp.stop();
        let allowed = self.allowed.stop();
        assert_eq!(
            tcp.successes, 0,
            "{what}: the denied peer connected ({tcp:?})"
        );
        assert_eq!(
            udp.successes, 0,
            "{what}: the denied peer's UDP got through ({udp:?})"
        );
        assert!(tcp.tries > 0 && udp.tries > 0, "{what}: the probers ran");
        assert!(
            allowed.successes > 0,
            "{what}: the allowed peer never got through ({allowed:?})"
        );
    }
}

fn rejected_messages(node: &Node) -> Vec<String> {
    node.weft_json(&["status"])["rejected"]
        .as_array()
        .expect("rejected is an array")
        .iter()
        .map(|r| r["message"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn a_truncated_and_slowly_rewritten_policy_never_opens_a_window() {
    let Some(s) = shop("a_truncated_and_slowly_rewritten_policy_never_opens_a_window") else {
        return;
    };
    s.node.apply("server.yaml", &server_in());
    s.node.policy_wait();
    let probers = Probers::start(&s);
    let path = s.node.source_dir().join("server.yaml");
    let text = server_in();
    let (head, tail) = text.split_at(text.len() / 2);
    // `>` redirection: truncate, then write in pieces with pauses, then close.
    {
        let mut f = File::create(&path).expect("truncate");
        probers.denied_tcp.wait_for_tries(5);
        f.write_all(head.as_bytes()).expect("first half");
        f.flush().expect("flush");
        probers.denied_tcp.wait_for_tries(5);
        s.node.policy_wait();
        f.write_all(tail.as_bytes()).expect("second half");
        probers.denied_udp.wait_for_tries(5);
    }
    s.node.policy_wait();
    // An empty file is rejected and the last good content stays.
    File::create(&path).expect("empty it");
    s.node.policy_wait();
    probers.denied_udp.wait_for_tries(10);
    let rejected = rejected_messages(&s.node);
    assert!(
        rejected
            .iter()
            .any(|m| m.contains("server.yaml") && m.contains("holds no object")),
        "the emptied file is reported: {rejected:?}"
    );
    fs::write(&path, &text).expect("write it back");
    s.node.policy_wait();
    probers.check("truncating and rewriting the policy file");
    assert!(rejected_messages(&s.node).is_empty(), "good again");
    // Deleting the file is what removes the policy.
    fs::remove_file(&path).expect("rm");
    s.node.policy_wait();
    assert!(
        s.other
            .tcp_probe(s.server.ipv4, 9090, Duration::from_secs(2)),
        "the policy is gone once its file is"
    );
}

#[test]
fn a_second_file_cannot_redefine_a_policy() {
    let Some(s) = shop("a_second_file_cannot_redefine_a_policy") else {
        return;
    };
    s.node.apply("server.yaml", &server_in());
    s.node.policy_wait();
    let probers = Probers::start(&s);
    let takeover = SERVER_IN
        .replace("app: client", "app: other")
        .replace("8080", "9090");
    // Sorts before server.yaml: it must not win.
    s.node.apply(
        "0-takeover.yaml",
        &policy_yaml("server-in", "shop", &takeover),
    );
    s.node.policy_wait();
    probers.denied_tcp.wait_for_tries(10);
    let rejected = rejected_messages(&s.node);
    let dup = rejected
        .iter()
        .find(|m| m.starts_with("0-takeover.yaml"))
        .unwrap_or_else(|| panic!("the duplicate is rejected: {rejected:?}"));
    assert!(
        dup.contains("server.yaml") && dup.contains("WeftNetworkPolicy shop/server-in"),
        "both files and the object are named: {dup}"
    );
    probers.check("a second file redefining the policy");
    let report = s.node.weft_json(&["policy", "get"]);
    let sources: Vec<&str> = report["policies"]
        .as_array()
        .expect("policies")
        .iter()
        .filter_map(|p| p["source"].as_str())
        .collect();
    assert_eq!(
        sources,
        ["server.yaml"],
        "the first definition stays in force"
    );
}

#[test]
fn a_cni_add_cannot_take_over_another_pods_interface() {
    let Some(s) = shop("a_cni_add_cannot_take_over_another_pods_interface") else {
        return;
    };
    let lockdown = format!("{SERVER_IN}  egress: []\n");
    s.node
        .apply("server.yaml", &policy_yaml("server-in", "shop", &lockdown));
    s.node.policy_wait();
    let probers = Probers::start(&s);
    let server_egress = Prober::start(&s.server, Probe::TcpEcho(s.other.ipv4, 9090));
    let prev = s.server.ptp_result().expect("the server's ptp result");
    let ghost_netns = format!("/var/run/netns/{}-ghost", s.node.prefix());
    let ghost = CniCall {
        plugin: "weft-cni",
        command: "ADD",
        container_id: "ghost",
        netns: &ghost_netns,
        ifname: "eth0",
        pod_namespace: "shop",
        pod_name: "ghost",
    };
    let err = s
        .node
        .weft_cni(&ghost, Some(prev))
        .expect_err("an ADD for a namespace that does not exist is refused");
    assert!(err.contains("does not exist"), "{err}");
    // A live namespace whose interface is not the peer of the server's host interface.
    let other_netns = format!("/var/run/netns/{}", s.other.netns_name);
    let impostor = CniCall {
        netns: &other_netns,
        container_id: "impostor",
        ..ghost
    };
    let err = s
        .node
        .weft_cni(&impostor, Some(prev))
        .expect_err("an ADD naming another pod's interface is refused");
    assert!(err.contains("not the veth peer"), "{err}");
    // The DELs that follow remove nothing of the server's.
    for call in [ghost, impostor] {
        let del = CniCall {
            command: "DEL",
            ..call
        };
        s.node
            .weft_cni(&del, Some(prev))
            .expect("DEL is idempotent");
    }
    s.node.policy_wait();
    probers.denied_udp.wait_for_tries(10);
    assert!(
        s.server.cni_weft("CHECK").is_ok(),
        "the server's attachment is intact"
    );
    let egress = server_egress.stop();
    assert_eq!(
        egress.successes, 0,
        "the server's egress stayed enforced: {egress:?}"
    );
    probers.check("forged CNI ADD and DEL");
}

#[test]
fn a_second_agent_refuses_and_the_first_repairs_what_was_removed() {
    let Some(s) = shop("a_second_agent_refuses_and_the_first_repairs_what_was_removed") else {
        return;
    };
    s.node.apply("server.yaml", &server_in());
    s.node.policy_wait();
    let probers = Probers::start(&s);
    let out = s.node.run_second_agent();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "the second agent refuses: {text}");
    assert!(
        text.contains("locked by another weft agent") && text.contains("one node, one agent"),
        "it says why: {text}"
    );
    // Someone removes pins: the programs stay (the agent holds them) and the pins come back.
    let links = s.node.bpffs_dir().join("links");
    let removed: Vec<_> = fs::read_dir(&links)
        .expect("links dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    for pin in &removed {
        fs::remove_file(pin).expect("remove a link pin");
    }
    let policy_pin = s.node.bpffs_dir().join("weft_policy_v1");
    fs::remove_file(&policy_pin).expect("remove a map pin");
    eventually("the agent pins them again", || {
        policy_pin.exists() && removed.iter().all(|p| p.exists())
    });
    let problems = s.node.weft_json(&["status"])["problems"].to_string();
    assert!(problems.contains("pinned again"), "reported: {problems}");
    // Someone deletes the server's endpoint entry: it drops everything until restored.
    let ifindex = s
        .node
        .weft_json(&["endpoint", "list"])
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["pod"] == "server")
        .and_then(|r| r["ifindex"].as_u64())
        .expect("server ifindex");
    let key: Vec<String> = u32::try_from(ifindex)
        .expect("ifindex")
        .to_le_bytes()
        .iter()
        .map(std::string::ToString::to_string)
        .collect();
    let mut args = vec!["map", "delete", "pinned"];
    let ep_pin = s.node.bpffs_dir().join("weft_ep_v1");
    let ep_pin = ep_pin.to_string_lossy().into_owned();
    args.push(&ep_pin);
    args.push("key");
    args.extend(key.iter().map(String::as_str));
    let out = std::process::Command::new("bpftool")
        .args(&args)
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("the agent restores the endpoint entry", || {
        s.node.weft_json(&["status"])["problems"]
            .to_string()
            .contains("endpoint map entries were changed")
    });
    probers.check("a second agent, removed pins and entries");
    assert!(s.node.agent_pid().is_some());
}

#[test]
fn a_policy_that_does_not_fit_is_refused_for_its_endpoint_and_the_rest_still_applies() {
    let Some(s) = shop_with(
        "a_policy_that_does_not_fit_is_refused_for_its_endpoint_and_the_rest_still_applies",
        &["--policy-entries-per-endpoint", "200"],
    ) else {
        return;
    };
    s.node.apply("server.yaml", &server_in());
    s.node.policy_wait();
    let probers = Probers::start(&s);
    let widened = Prober::start(&s.client, Probe::TcpEcho(s.server.ipv4, 9090));
    // 300 single ports (not a range): over the endpoint's share of 200 entries.
    let ports = (9000..9300).fold(String::new(), |mut out, p| {
        out.push_str("      - {port: \"");
        out.push_str(&p.to_string());
        out.push_str("\", protocol: TCP}\n");
        out
    });
    // Among them 9090, which the widened prober keeps trying.
    let big = format!("{SERVER_IN}{ports}");
    s.node
        .apply("server.yaml", &policy_yaml("server-in", "shop", &big));
    let wait = s.node.policy_wait();
    let refused = wait["refused"].to_string();
    assert!(
        refused.contains("shop/server") && refused.contains("budget of 200"),
        "policy wait says what was refused: {wait}"
    );
    let status = s.node.weft_json(&["status"]);
    assert!(
        status["problems"].to_string().contains("not applied"),
        "status says so: {status}"
    );
    assert!(
        status["refusals_total"].as_u64() >= Some(1),
        "and counts it: {status}"
    );
    let report = s.node.weft_json(&["policy", "get"]);
    assert!(
        report["policies"].to_string().contains("MapCapacity"),
        "the policy's Enforced condition says so: {report}"
    );
    // Other changes still apply: another pod's isolation, a new pod.
    s.node.apply(
        "other.yaml",
        &policy_yaml(
            "other-in",
            "shop",
            "  endpointSelector:\n    matchLabels: {app: other}\n  ingress: []\n",
        ),
    );
    s.node.policy_wait();
    eventually("another pod's policy applies meanwhile", || {
        !s.client
            .tcp_probe(s.other.ipv4, 8080, Duration::from_millis(800))
    });
    let late = s.node.add_pod("late", "shop", &[("app", "late")]);
    assert!(
        s.node
            .weft_json(&["endpoint", "list"])
            .to_string()
            .contains("\"late\""),
        "a new pod is admitted"
    );
    let opened = widened.stop();
    assert_eq!(
        opened.successes, 0,
        "the refused policy opened nothing: {opened:?}"
    );
    probers.check("a policy that does not fit");
    // Once it fits, it applies.
    s.node.apply(
        "server.yaml",
        &policy_yaml(
            "server-in",
            "shop",
            &SERVER_IN.replace(
                "8080\", protocol: TCP}",
                "8080\", protocol: TCP}\n      - {port: \"9090\", protocol: TCP}",
            ),
        ),
    );
    s.node.policy_wait();
    assert!(
        s.client
            .tcp_probe(s.server.ipv4, 9090, Duration::from_secs(2))
    );
    drop(late);
}

#[test]
fn a_full_conntrack_evicts_the_coldest_flows_counts_them_and_keeps_enforcing() {
    let Some(s) = shop_with(
        "a_full_conntrack_evicts_the_coldest_flows_counts_them_and_keeps_enforcing",
        // A small map fills with a small flood (a flood the size of the default map takes
        // minutes under emulated kernels and starves everything else in the guest).
        &["--ct-gc-interval", "1", "--conntrack-max-entries", "16384"],
    ) else {
        return;
    };
    // Client may send UDP to any port of the server: every datagram to a new port is a
    // flow, and a local flow takes an entry on both pods.
    s.node.apply(
        "server.yaml",
        &policy_yaml(
            "server-in",
            "shop",
            &format!("{SERVER_IN}      - {{port: \"1\", endPort: 65535, protocol: UDP}}\n"),
        ),
    );
    s.node.policy_wait();
    let probers = Probers::start(&s);
    let mut established = s
        .client
        .tcp_connect(s.server.ipv4, 8080, Duration::from_secs(2))
        .expect("an allowed connection opens");
    let capacity = s.node.weft_json(&["status"])["conntrack"]["capacity"]
        .as_u64()
        .expect("conntrack capacity");
    assert_eq!(capacity, 16_384, "the map has the size the agent was given");
    // capacity/2 ports from each of three source ports: 1.5 × capacity flows, and a local
    // flow takes an entry on both pods: three times what the map holds.
    let ports = u16::try_from(capacity / 2).expect("ports");
    let target = s.server.ipv4;
    weft_tests::in_netns(s.client.netns().name(), || {
        let sockets: Vec<std::net::UdpSocket> = (0..3)
            .map(|_| std::net::UdpSocket::bind("0.0.0.0:0").expect("bind"))
            .collect();
        for port in 1..=ports {
            for socket in &sockets {
                // A full socket buffer only loses a datagram; the flood is bounded anyway.
                let _ = socket.send_to(b"x", (target, port));
            }
        }
    });
    let mut evicted = 0;
    eventually("the evictions are counted", || {
        let ct = &s.node.weft_json(&["status"])["conntrack"];
        evicted = ct["evicted"].as_u64().unwrap_or(0);
        evicted > 0
    });
    assert!(
        evicted <= 3 * 2 * u64::from(ports),
        "{evicted} evictions of {capacity}"
    );
    let text = s.node.weft_ok(&["status"]);
    assert!(
        text.contains("evicted (full map: least recently used first)"),
        "status says what goes first: {text}"
    );
    // An evicted flow is checked again on its next packet: the allowed connection lives on.
    established
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    established.write_all(b"still here\n").expect("write");
    let mut echo = [0u8; 11];
    established
        .read_exact(&mut echo)
        .expect("the established connection still works");
    assert_eq!(&echo, b"still here\n");
    probers.check("a full conntrack");
}

#[test]
fn oversized_and_binary_object_files_are_rejected_at_no_cost() {
    let Some(s) = shop("oversized_and_binary_object_files_are_rejected_at_no_cost") else {
        return;
    };
    s.node.apply("server.yaml", &server_in());
    s.node.policy_wait();
    let probers = Probers::start(&s);
    // 50 MB of policies.
    {
        let mut f = File::create(s.node.source_dir().join("huge.yaml")).expect("create");
        let doc = policy_yaml("huge", "shop", SERVER_IN);
        let mut written = 0;
        let mut n = 0;
        while written < 50 << 20 {
            let d = doc.replace("name: huge", &format!("name: huge-{n}"));
            f.write_all(d.as_bytes()).expect("write");
            f.write_all(b"---\n").expect("write");
            written += d.len() + 4;
            n += 1;
        }
    }
    fs::write(
        s.node.source_dir().join("binary.yaml"),
        [0u8, 0xff, 0xfe, 0x80, 0x81],
    )
    .expect("binary");
    s.node.policy_wait();
    let rejected = rejected_messages(&s.node);
    assert!(
        rejected
            .iter()
            .any(|m| m.starts_with("huge.yaml: is larger than 1024 KiB")),
        "{rejected:?}"
    );
    assert!(
        rejected
            .iter()
            .any(|m| m.starts_with("binary.yaml: is not UTF-8")),
        "{rejected:?}"
    );
    let report = s.node.weft_json(&["policy", "get"]);
    assert!(
        report["rejected"].to_string().contains("binary.yaml"),
        "policy get shows it too"
    );
    let peak = s.node.agent_peak_rss_kib().expect("agent rss");
    assert!(peak < 100 * 1024, "peak RSS {peak} KiB stays under 100 MiB");
    probers.check("oversized and binary files");
}

#[test]
fn the_api_bounds_what_a_client_can_cost() {
    let Some(s) = shop_with(
        "the_api_bounds_what_a_client_can_cost",
        &["--api-idle-timeout", "2", "--max-api-connections", "16"],
    ) else {
        return;
    };
    s.node.apply("server.yaml", &server_in());
    s.node.policy_wait();
    let probers = Probers::start(&s);
    // One huge request line: answered too-large once past the cap, never buffered whole.
    let mut conn = UnixStream::connect(s.node.socket()).expect("connect");
    conn.set_write_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let chunk = vec![b'x'; 1 << 20];
    let mut sent = 0usize;
    while sent < 100 << 20 && conn.write_all(&chunk).is_ok() {
        sent += chunk.len();
    }
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    assert!(
        answer.contains("too-large"),
        "answered too-large after {sent} bytes: {answer}"
    );
    assert!(
        sent < 100 << 20,
        "the agent closed the connection instead of reading 100 MB"
    );
    // Connections that only sit there never keep a client out: the one idle the longest
    // makes room.
    let mut idle: Vec<UnixStream> = (0..16)
        .map(|_| UnixStream::connect(s.node.socket()).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        s.node.weft(&["status"]).status.success(),
        "status answers while 16 idle connections are open"
    );
    let first = &mut idle[0];
    first
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut rest = Vec::new();
    assert!(
        first.read_to_end(&mut rest).is_ok(),
        "the oldest idle connection was closed to make room"
    );
    drop(idle);
    // Only when every connection is busy (here: streaming flows) is a client turned away.
    let busy: Vec<UnixStream> = (0..16)
        .map(|_| {
            let mut c = UnixStream::connect(s.node.socket()).expect("connect");
            c.write_all(b"{\"op\":\"observe\",\"follow\":true,\"last\":0}\n")
                .expect("observe");
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = UnixStream::connect(s.node.socket()).expect("connect");
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut answer = String::new();
    let _ = extra.read_to_string(&mut answer);
    assert!(
        answer.contains("overloaded"),
        "the 17th connection: {answer}"
    );
    drop(busy);
    eventually("the API serves again once the streams end", || {
        s.node.weft(&["status"]).status.success()
    });
    let peak = s.node.agent_peak_rss_kib().expect("agent rss");
    assert!(peak < 100 * 1024, "peak RSS {peak} KiB stays under 100 MiB");
    probers.check("oversized requests and too many connections");
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn state_files_are_private_to_root() {
    let Some(s) = shop("state_files_are_private_to_root") else {
        return;
    };
    s.node.apply("server.yaml", &server_in());
    s.node.policy_wait();
    let state = s.node.state_dir();
    assert_eq!(mode(state), 0o700, "state dir");
    for file in [
        "endpoints.json",
        "cidr-identities.json",
        "last-good/server.yaml",
        "agent.lock",
    ] {
        let path = state.join(file);
        if file == "cidr-identities.json" && !path.exists() {
            continue;
        }
        assert_eq!(mode(&path), 0o600, "{file}");
    }
    assert_eq!(mode(&state.join("last-good")), 0o700);
    let shared = s.node.source_dir().join(".weft");
    assert_eq!(mode(&shared), 0o700, "the shared identity table's dir");
    assert_eq!(mode(&shared.join("identities.json")), 0o600);
    assert_eq!(mode(s.node.socket()), 0o600, "the API socket");
    let sock_dir = s.node.socket().parent().expect("socket dir");
    assert_eq!(
        mode(sock_dir) & 0o077,
        0,
        "the socket's directory is private"
    );
}
