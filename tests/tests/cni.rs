//! `weft-cni` in the real CNI chain (`loopback`, `ptp` + `host-local`, `weft-cni`) against a
//! stub agent on the node's socket: what the plugin tells the agent matches what ptp created,
//! and DEL succeeds when the agent is gone. Needs no real agent, only the `weft-cni` binary.

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixListener;
use std::process::Command;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use weft_tests::{Node, TestPrefix, bin_dir, skip_unless_privileged};

/// Answers every request with `{"ok": null}` and records it.
fn stub_agent(listener: UnixListener) -> Arc<Mutex<Vec<Value>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let mut writer = stream.try_clone().expect("clone stream");
            let mut line = String::new();
            if BufReader::new(stream).read_line(&mut line).unwrap_or(0) == 0 {
                continue;
            }
            let request: Value = serde_json::from_str(&line).expect("request is JSON");
            let stop = request["op"] == "stop-stub";
            record.lock().expect("lock").push(request);
            let _ = writer.write_all(b"{\"ok\":null}\n");
            if stop {
                return;
            }
        }
    });
    seen
}

#[test]
fn weft_cni_reports_ptp_result_to_the_agent() {
    if skip_unless_privileged("weft_cni_reports_ptp_result_to_the_agent") {
        return;
    }
    if !bin_dir().join("weft-cni").exists() {
        eprintln!(
            "SKIPPED weft_cni_reports_ptp_result_to_the_agent: no weft-cni in {} (cargo xtask build)",
            bin_dir().display()
        );
        return;
    }
    let prefix = TestPrefix::new();
    let node = Node::without_agent(&prefix, "n1");
    let listener = UnixListener::bind(node.socket()).expect("bind stub agent socket");
    let seen = stub_agent(listener);

    let pod = node.add_pod("web", "shop", &[("app", "web")]);
    let add = seen.lock().expect("lock")[0].clone();
    assert_eq!(add["op"], "cni-add", "{add}");
    assert_eq!(add["pod_name"], "web");
    assert_eq!(add["pod_namespace"], "shop");
    assert_eq!(add["ifname"], "eth0");
    assert_eq!(add["container_id"], pod.container_id());
    assert_eq!(add["netns"], format!("/var/run/netns/{}", pod.netns_name));
    assert_eq!(add["host_ifname"], pod.host_ifname.as_str());
    let addresses: Vec<IpAddr> = add["addresses"]
        .as_array()
        .expect("addresses")
        .iter()
        .map(|a| {
            a.as_str()
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse().ok())
                .expect("address is a CIDR")
        })
        .collect();
    assert_eq!(addresses, pod.ips().to_vec());
    // The host-side interface the agent is told about exists in the node's namespace.
    let link = node
        .netns()
        .exec("ip", &["link", "show", "dev", &pod.host_ifname]);
    assert!(link.status.success(), "{}", pod.host_ifname);
    // The Endpoint object was written for the agent's local source.
    let endpoint = std::fs::read_to_string(node.source_dir().join("endpoint-shop-web.yaml"))
        .expect("endpoint object");
    assert!(endpoint.contains("kind: Endpoint") && endpoint.contains("\"app\": \"web\""));

    pod.cni_weft("CHECK").expect("CHECK succeeds");
    assert_eq!(seen.lock().expect("lock")[1]["op"], "cni-check");

    // VERSION, straight from the binary.
    let out = Command::new(bin_dir().join("weft-cni"))
        .env("CNI_COMMAND", "VERSION")
        .output()
        .expect("weft-cni VERSION");
    let version: Value = serde_json::from_slice(&out.stdout).expect("VERSION prints JSON");
    assert_eq!(version["supportedVersions"][1], "1.0.0");

    // With the agent gone, DEL still succeeds (DEL is idempotent per the spec).
    std::fs::remove_file(node.socket()).expect("remove stub socket");
    pod.cni_weft("DEL").expect("DEL succeeds without an agent");
}
