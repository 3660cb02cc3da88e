//! `weft-cni` in the real CNI chain (`loopback`, `ptp` + `host-local`, `weft-cni`) with the
//! real agent: what the agent registers matches what ptp created, the datapath is attached to
//! the host-side interface, CHECK and VERSION answer per the spec, and DEL is idempotent and
//! succeeds when the agent is gone.

use std::net::IpAddr;
use std::process::Command;

use serde_json::Value;
use weft_tests::{Node, TestPrefix, bin_dir, skip_unless_privileged};

fn bpftool_json(args: &[&str]) -> Value {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bpftool prints JSON")
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn weft_cni_registers_the_ptp_result_with_the_agent() {
    if skip_unless_privileged("weft_cni_registers_the_ptp_result_with_the_agent") {
        return;
    }
    let prefix = TestPrefix::new();
    let mut node = Node::start(&prefix, "n1");
    let pod = node.add_pod("web", "shop", &[("app", "web")]);
    // The labels come from the pod's Endpoint object, which the source reads on its own time.
    node.policy_wait();

    let rows = json(&node.weft_ok(&["-o", "json", "endpoint", "list"]));
    let row = rows
        .as_array()
        .expect("endpoint list is an array")
        .iter()
        .find(|r| r["pod"] == "web")
        .unwrap_or_else(|| panic!("web not registered: {rows}"))
        .clone();
    assert_eq!(row["namespace"], "shop");
    assert_eq!(row["host_ifname"], pod.host_ifname.as_str());
    let addresses: Vec<IpAddr> = row["addresses"]
        .as_array()
        .expect("addresses")
        .iter()
        .map(|a| a.as_str().and_then(|a| a.parse().ok()).expect("an address"))
        .collect();
    assert_eq!(addresses, pod.ips().to_vec(), "the addresses ptp assigned");
    let labels = row["labels"].to_string();
    assert!(
        labels.contains("app=web") && labels.contains("weft.io/namespace=shop"),
        "identity labels from the Endpoint object: {labels}"
    );

    // Both programs sit on the host-side veth: through TCX links pinned in the node's bpffs
    // dir (Linux >= 6.6), or as clsact filters that the kernel keeps by itself (older ones).
    let status = json(&node.weft_ok(&["-o", "json", "status"]));
    let mut attached = Vec::new();
    match status["attach_mode"].as_str() {
        Some("tcx") => {
            for entry in std::fs::read_dir(node.bpffs_dir().join("links")).expect("links dir") {
                let path = entry.expect("dir entry").path();
                if !path.to_string_lossy().contains(&pod.host_ifname) {
                    continue;
                }
                let link = bpftool_json(&["link", "show", "pinned", &path.to_string_lossy()]);
                let prog_id = link["prog_id"].to_string();
                let prog = bpftool_json(&["prog", "show", "id", &prog_id]);
                attached.push(prog["name"].as_str().unwrap_or_default().to_owned());
            }
        }
        Some("netlink") => {
            let out = node
                .netns()
                .run_ok("bpftool", &["-j", "net", "show", "dev", &pod.host_ifname]);
            let net = json(&out);
            for filter in net[0]["tc"]
                .as_array()
                .expect("bpftool net lists tc filters")
            {
                let hook = match filter["kind"].as_str() {
                    Some("clsact/ingress") => "ingress",
                    Some("clsact/egress") => "egress",
                    other => panic!("unexpected tc attachment {other:?}: {filter}"),
                };
                let name = filter["name"].as_str().unwrap_or_default();
                // from_pod sees what the pod sends (ingress of the host side), to_pod the rest.
                let expected_hook = if name.starts_with("from_pod") {
                    "ingress"
                } else {
                    "egress"
                };
                assert_eq!(hook, expected_hook, "{filter}");
                attached.push(name.split(':').next().unwrap_or_default().to_owned());
            }
        }
        other => panic!("unknown attach mode {other:?} in {status}"),
    }
    attached.sort();
    assert_eq!(
        attached,
        ["from_pod", "to_pod"],
        "programs on {}",
        pod.host_ifname
    );

    pod.cni_weft("CHECK")
        .expect("CHECK succeeds for a registered pod");

    let out = Command::new(bin_dir().join("weft-cni"))
        .env("CNI_COMMAND", "VERSION")
        .output()
        .expect("weft-cni VERSION");
    let version: Value = serde_json::from_slice(&out.stdout).expect("VERSION prints JSON");
    assert!(
        version["supportedVersions"]
            .as_array()
            .expect("supportedVersions")
            .iter()
            .any(|v| v == "1.0.0"),
        "{version}"
    );

    // DEL unregisters; a second DEL (and one with the agent gone) still succeeds.
    pod.cni_weft("DEL").expect("DEL succeeds");
    let rows = json(&node.weft_ok(&["-o", "json", "endpoint", "list"]));
    assert!(
        rows.as_array()
            .expect("array")
            .iter()
            .all(|r| r["pod"] != "web"),
        "DEL removed the endpoint: {rows}"
    );
    pod.cni_weft("DEL").expect("a repeated DEL succeeds");
    node.stop_agent();
    pod.cni_weft("DEL").expect("DEL succeeds without an agent");
    assert!(
        pod.cni_weft("CHECK").is_err(),
        "CHECK fails when the agent is unreachable"
    );
}
