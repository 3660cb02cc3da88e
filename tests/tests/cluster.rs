//! Several nodes on one machine, joined by an underlay and sharing one source directory:
//! pods on different nodes reach each other, identities agree cluster-wide, and policy by
//! identity decides across nodes as on one node.

use std::time::Duration;

use weft_tests::{Cluster, ClusterOptions, TestPrefix, policy_yaml, skip_unless_privileged};

const T: Duration = Duration::from_millis(1500);

#[test]
fn pods_on_two_nodes_share_identities_and_policy() {
    if skip_unless_privileged("pods_on_two_nodes_share_identities_and_policy") {
        return;
    }
    let prefix = TestPrefix::new();
    let cluster = Cluster::start(&prefix, &ClusterOptions::default());
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    let server = n2.add_pod("server", "shop", &[("app", "server")]);
    let client = n1.add_pod("client", "shop", &[("app", "client")]);
    let other = n1.add_pod("other", "shop", &[("app", "other")]);
    // The same label set on both nodes: one identity cluster-wide.
    let twin = n2.add_pod("twin", "shop", &[("app", "other")]);
    server.spawn_tcp_echo(8080);
    cluster.policy_wait();
    for addr in server.ips() {
        assert!(
            client.tcp_probe(addr, 8080, T),
            "no policy: cross-node TCP ({addr})"
        );
    }
    assert!(
        other.ping_retry(server.ipv4, 3),
        "no policy: cross-node ICMP"
    );
    let other_id = n1.identity_of("other");
    assert_eq!(
        n2.identity_of("twin"),
        other_id,
        "one label set, one id on every node"
    );
    let nodes = n1.weft_json(&["node", "list"]);
    assert_eq!(
        nodes.as_array().map(Vec::len),
        Some(2),
        "both nodes known: {nodes}"
    );
    // Each agent published its own node (from --node-address/--pod-cidr); the others
    // learned its pod CIDRs from that object alone.
    let learned = nodes
        .as_array()
        .and_then(|all| all.iter().find(|n| n["name"] == n2.name()))
        .unwrap_or_else(|| panic!("{} in {nodes}", n2.name()));
    let cidrs: Vec<String> = learned["pod_cidrs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        cidrs,
        [n2.pod_subnet_v4(), n2.pod_subnet_v6()],
        "node 1 learned node 2's pod CIDRs: {learned}"
    );
    let published = std::fs::read_to_string(
        cluster
            .source_dir()
            .join(format!("node-{}.yaml", n2.name())),
    )
    .expect("the agent wrote its Node object");
    assert!(published.contains("kind: Node"), "{published}");

    let spec = "  endpointSelector:\n    matchLabels: {app: server}\n  ingress:\n  - fromEndpoints:\n    - matchLabels: {app: client}\n    toPorts:\n    - ports:\n      - {port: \"8080\", protocol: TCP}\n";
    cluster.apply("server.yaml", &policy_yaml("server-in", "shop", spec));
    cluster.policy_wait();
    for addr in server.ips() {
        assert!(
            client.tcp_probe(addr, 8080, T),
            "allowed across nodes ({addr})"
        );
        assert!(
            !other.tcp_probe(addr, 8080, T),
            "denied across nodes ({addr})"
        );
    }
    let flows = n2.observed_until(
        &["--verdict", "dropped", "--pod", "server"],
        "the cross-node drop is reported with the remote pod's name and node",
        |f| f["source"]["name"] == "shop/other" && f["source"]["node"] == n1.name(),
    );
    assert!(!flows.is_empty());
    drop((twin, other, client, server));
}
