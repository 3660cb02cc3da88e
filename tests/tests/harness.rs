//! Smoke test of the harness itself, without an agent: two pods on one node (ptp + host-local,
//! no weft-cni) reach each other over ICMP, TCP and UDP on IPv4 and IPv6, and everything the
//! test created is gone after Drop.

use std::process::Command;
use std::time::Duration;

use weft_tests::{Node, TestPrefix, skip_unless_privileged, tcp_roundtrip};

const TIMEOUT: Duration = Duration::from_secs(3);

fn netns_names() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn host_links() -> String {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link show");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn two_pods_talk_without_weft_and_cleanup_is_complete() {
    if skip_unless_privileged("two_pods_talk_without_weft_and_cleanup_is_complete") {
        return;
    }
    let prefix = TestPrefix::new();
    let links_before = host_links();
    let (node_dir, node_ns) = {
        let node = Node::without_agent(&prefix, "n1");
        let a = node.add_pod_without_weft("a", "default", &[("app", "a")]);
        let b = node.add_pod_without_weft("b", "default", &[("app", "b")]);
        assert!(a.ipv4.to_string().starts_with("100.64."), "{}", a.ipv4);
        assert!(b.ipv6.to_string().starts_with("fd00:64:"), "{}", b.ipv6);
        assert_ne!(a.ipv4, b.ipv4);
        assert!(!a.host_ifname.is_empty(), "ptp result names the host veth");

        b.spawn_tcp_echo(7000);
        b.spawn_udp_echo(7001);
        for addr in b.ips() {
            assert!(a.ping_retry(addr, 3), "a pings b at {addr}");
            assert!(
                a.tcp_probe(addr, 7000, TIMEOUT),
                "a reaches b's TCP echo at {addr}"
            );
            assert!(
                a.udp_probe(addr, 7001, TIMEOUT),
                "a reaches b's UDP echo at {addr}"
            );
            assert!(
                !a.tcp_probe(addr, 7999, TIMEOUT),
                "nothing listens on {addr}:7999"
            );
        }
        // Replies on a long-lived connection, both ways of using the stream.
        let mut stream = a
            .tcp_connect(b.ipv6, 7000, TIMEOUT)
            .expect("a connects to b over IPv6");
        for i in 0..10 {
            tcp_roundtrip(&mut stream, format!("message {i}\n").as_bytes()).expect("echo");
        }
        // The pod's own loopback is up (loopback plugin).
        assert!(a.ping(a.ipv4), "a pings itself");
        assert!(
            a.exec("ip", &["-o", "addr", "show", "lo"])
                .stdout
                .starts_with(b"1: lo"),
            "lo present"
        );
        (
            node.state_dir().parent().map(ToOwned::to_owned),
            node.name().to_string(),
        )
    };

    let names = netns_names();
    assert!(
        !names.contains(prefix.as_str()),
        "network namespaces with prefix {prefix} remain:\n{names}"
    );
    assert!(!names.contains(&node_ns));
    assert_eq!(
        host_links()
            .lines()
            .filter(|l| l.contains(prefix.as_str()))
            .count(),
        0,
        "host links with the prefix remain"
    );
    // The host's own links are untouched.
    assert_eq!(
        links_before.lines().count(),
        host_links().lines().count(),
        "host link count changed"
    );
    if std::env::var_os("WEFT_KEEP").is_none() {
        let dir = node_dir.expect("node dir");
        assert!(!dir.exists(), "{} remains", dir.display());
    }
}

#[test]
fn sweep_stale_leaves_live_prefixes_alone() {
    if skip_unless_privileged("sweep_stale_leaves_live_prefixes_alone") {
        return;
    }
    let prefix = TestPrefix::new();
    let node = Node::without_agent(&prefix, "n1");
    let removed = weft_tests::sweep_stale();
    assert!(
        removed.iter().all(|r| !r.contains(prefix.as_str())),
        "sweep removed a live prefix: {removed:?}"
    );
    assert!(netns_names().contains(node.name()));
}

#[test]
fn a_panicking_test_still_cleans_up() {
    if skip_unless_privileged("a_panicking_test_still_cleans_up") {
        return;
    }
    let prefix = TestPrefix::new();
    let inner = prefix.clone();
    let result = std::panic::catch_unwind(move || {
        let node = Node::without_agent(&inner, "n1");
        let _pod = node.add_pod_without_weft("a", "default", &[]);
        panic!("deliberate failure inside a test");
    });
    assert!(result.is_err(), "the closure panicked");
    let names = netns_names();
    assert!(
        !names.contains(prefix.as_str()),
        "network namespaces with prefix {prefix} remain after a panic:\n{names}"
    );
}
