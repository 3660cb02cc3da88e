//! Kernel feature detection on the real kernel: the agent reports what it probed in
//! `weft status`, and refuses to start, naming the missing feature, where the kernel lacks one.

use serde_json::Value;
use weft_tests::{Node, TestPrefix, skip_unless_privileged};

/// `uname -r`.
fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .expect("reading /proc/sys/kernel/osrelease")
        .trim()
        .to_owned()
}

/// (major, minor) of a release such as `6.1.0-56-amd64` or `6.18.44`.
fn major_minor(release: &str) -> (u32, u32) {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().expect("release starts with numbers"));
    (
        numbers.next().expect("major"),
        numbers.next().expect("minor"),
    )
}

fn feature<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["kernel_features"]
        .as_array()
        .expect("kernel_features is a list")
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no feature {name:?} in {status:#}"))
}

#[test]
fn status_reports_kernel_features() {
    if skip_unless_privileged("status_reports_kernel_features") {
        return;
    }
    let prefix = TestPrefix::new();
    let node = Node::start(&prefix, "n1");
    let release = kernel_release();
    let tcx = major_minor(&release) >= (6, 6);
    let mode = if tcx { "tcx" } else { "netlink" };

    let text = node.weft_ok(&["status"]);
    assert!(
        text.contains(&format!("Kernel:          {release} ({mode} attach)")),
        "{text}"
    );
    let features_line = text
        .lines()
        .find(|l| l.starts_with("Kernel features:"))
        .unwrap_or_else(|| panic!("no kernel features line in:\n{text}"));
    for expected in ["BTF ok", "BPF ring buffer ok", "tc helpers ok"] {
        assert!(features_line.contains(expected), "{features_line}");
    }

    let status: Value =
        serde_json::from_str(&node.weft_ok(&["-o", "json", "status"])).expect("status is JSON");
    assert_eq!(status["kernel"], release.as_str());
    assert_eq!(status["attach_mode"], mode);
    for name in ["BTF", "BPF ring buffer", "bpf_redirect_peer"] {
        let f = feature(&status, name);
        assert_eq!(f["available"], true, "{f}");
        assert_eq!(f["required"], true, "{f}");
    }
    let attach = feature(&status, if tcx { "TCX links" } else { "clsact qdisc" });
    assert_eq!(attach["available"], true, "{attach}");
    if !tcx {
        assert_eq!(feature(&status, "cls_bpf classifier")["available"], true);
    }
    // The clock variant follows bpf_ktime_get_coarse_ns (5.11); 5.10 reads bpf_ktime_get_ns.
    let variant = status["datapath_variant"]
        .as_str()
        .expect("datapath_variant");
    let expected = if major_minor(&release) >= (5, 11) {
        "coarse clock"
    } else {
        "precise clock"
    };
    assert!(variant.starts_with(expected), "{variant}");
    assert_eq!(
        feature(&status, "bpf_ktime_get_coarse_ns")["available"],
        major_minor(&release) >= (5, 11)
    );
    // Socket redirection's features: optional, and all there on every kernel weft runs on
    // (5.8 is the newest of them), so redirection is on.
    for name in [
        "sock_ops programs",
        "sk_msg programs",
        "sockhash map",
        "bpf_sock_hash_update",
        "bpf_msg_redirect_hash",
    ] {
        let f = feature(&status, name);
        assert_eq!(f["required"], false, "{f}");
        assert_eq!(f["available"], true, "{f}");
    }
    let redirect = status["socket_redirect"].as_str().expect("socket_redirect");
    assert!(redirect.starts_with("on ("), "{redirect}");
    assert!(text.contains("Socket redirect: on ("), "{text}");
}

#[test]
#[ignore = "needs a kernel without the clsact qdisc; cargo xtask vm-test boots one (Linux 6.1 with sch_ingress blacklisted)"]
fn agent_refuses_to_start_without_clsact() {
    if skip_unless_privileged("agent_refuses_to_start_without_clsact") {
        return;
    }
    let prefix = TestPrefix::new();
    let mut node = Node::without_agent(&prefix, "n1");
    let log = node.start_agent_expecting_failure();
    let refusal = log
        .lines()
        .find(|l| l.contains("weft cannot run on Linux"))
        .unwrap_or_else(|| panic!("no refusal in the agent's output:\n{log}"));
    eprintln!("the agent refused as expected: {refusal}");
    assert!(refusal.contains(&kernel_release()), "{refusal}");
    for expected in ["clsact", "sch_ingress", "CONFIG_NET_SCH_INGRESS", "6.6"] {
        assert!(
            refusal.contains(expected),
            "{expected:?} missing: {refusal}"
        );
    }
    // Refused before any program was loaded: no verifier output at all.
    let dump_line = log.lines().find(|l| {
        l.contains("verifier log")
            || l.starts_with("processed ")
            || l.split_once(": (")
                .is_some_and(|(insn, _)| insn.parse::<u32>().is_ok())
    });
    assert_eq!(dump_line, None, "verifier output in:\n{log}");
    assert!(
        !node.bpffs_dir().exists(),
        "the refusing agent created {}",
        node.bpffs_dir().display()
    );
}
