//! Kernel feature detection. Before the eBPF object is loaded, the agent asks the kernel for
//! every feature the datapath uses (BTF, map types, the helpers the tc programs call, the tc
//! attach mode) and refuses to start with one sentence naming each missing feature and the
//! first Linux release that has it, instead of leaving the operator with a verifier dump.
//!
//! Probing (here, with aya) is kept apart from the decisions on its results
//! ([`FeatureReport::refusal`], [`summary`]), which are pure and unit-tested.
//!
//! Minimum kernels, and why:
//! - BTF: Linux 4.18 (`BPF_BTF_LOAD`, BTF-described map keys and values). The object's maps
//!   are BTF-defined and pinned with their BTF so `bpftool` prints them; aya rewrites newer BTF
//!   kinds (functions, datasec, ...) for older kernels, so 4.18 is the real floor.
//! - Global data: Linux 5.2 (the programs' read-only globals, e.g. the log level, live in an
//!   array map the program reads directly).
//! - vmlinux BTF (`/sys/kernel/btf/vmlinux`, 5.4 with `CONFIG_DEBUG_INFO_BTF`): reported only;
//!   weft does not use CO-RE relocations.
//! - The ring buffer and its helpers: 5.8; `bpf_redirect_peer`: 5.10 — which makes 5.10 the
//!   oldest kernel weft can run on. `bpf_ktime_get_coarse_ns` (5.11) is used where the kernel
//!   has it; on 5.10 the programs read `bpf_ktime_get_ns` instead (chosen at load time).
//! - tc attach: TCX links on >= 6.6, otherwise the clsact qdisc (`sch_ingress`, 4.5) with a
//!   `cls_bpf` filter in direct-action mode.
//! - Same-node socket redirection (optional, [`socket_redirect_missing`] says what is
//!   missing and the agent runs without it): `sock_ops` programs 4.13, `sk_msg` programs 4.17,
//!   the sockhash map with `bpf_sock_hash_update` and `bpf_msg_redirect_hash` 4.18, the ring
//!   buffer helpers in `sock_ops` 5.8, a pinnable cgroup `bpf_link` 5.7: 5.8 in all, below
//!   weft's 5.10 floor, so every kernel weft runs on has it unless the build lacks
//!   `CONFIG_BPF_STREAM_PARSER` (sockhash) or `CONFIG_CGROUP_BPF`.

use std::path::Path;

use aya::maps::MapType;
use aya::programs::ProgramType;
use aya::sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported};
use aya::util::KernelVersion;
pub use weft_api::features::{Feature, FeatureKind, FeatureReport, summary};

use super::attach::{AttachMode, in_scratch_netns};

/// Helpers the tc programs call (checked against the object's `call` instructions by a unit
/// test), with the first Linux release that offers each to tc programs. Also names helpers
/// in verifier refusals.
pub(super) const TC_HELPERS: &[(BpfHelper, &str, &str)] = &[
    (
        BpfHelper::BPF_FUNC_map_lookup_elem,
        "bpf_map_lookup_elem",
        "3.19",
    ),
    (
        BpfHelper::BPF_FUNC_map_update_elem,
        "bpf_map_update_elem",
        "3.19",
    ),
    (
        BpfHelper::BPF_FUNC_map_delete_elem,
        "bpf_map_delete_elem",
        "3.19",
    ),
    (BpfHelper::BPF_FUNC_ktime_get_ns, "bpf_ktime_get_ns", "4.1"),
    (
        BpfHelper::BPF_FUNC_skb_pull_data,
        "bpf_skb_pull_data",
        "4.9",
    ),
    (
        BpfHelper::BPF_FUNC_ringbuf_output,
        "bpf_ringbuf_output",
        "5.8",
    ),
    (
        BpfHelper::BPF_FUNC_ringbuf_reserve,
        "bpf_ringbuf_reserve",
        "5.8",
    ),
    (
        BpfHelper::BPF_FUNC_ringbuf_submit,
        "bpf_ringbuf_submit",
        "5.8",
    ),
    (
        BpfHelper::BPF_FUNC_ringbuf_discard,
        "bpf_ringbuf_discard",
        "5.8",
    ),
    (
        BpfHelper::BPF_FUNC_ringbuf_query,
        "bpf_ringbuf_query",
        "5.8",
    ),
    (
        BpfHelper::BPF_FUNC_redirect_peer,
        "bpf_redirect_peer",
        "5.10",
    ),
    // L7 steering: the filter's sockets, assigned at tc ingress.
    (
        BpfHelper::BPF_FUNC_sk_lookup_tcp,
        "bpf_sk_lookup_tcp",
        "4.20",
    ),
    (BpfHelper::BPF_FUNC_sk_release, "bpf_sk_release", "4.20"),
    (
        BpfHelper::BPF_FUNC_skc_lookup_tcp,
        "bpf_skc_lookup_tcp",
        "5.2",
    ),
    (BpfHelper::BPF_FUNC_sk_assign, "bpf_sk_assign", "5.7"),
    (
        BpfHelper::BPF_FUNC_ktime_get_coarse_ns,
        "bpf_ktime_get_coarse_ns",
        "5.11",
    ),
];

/// Helpers `weft_sock_ops` and `weft_sk_msg` call, with the first Linux release that offers
/// each to those program types (the ring buffer helpers came to every program type with the
/// ring buffer). Same-node socket redirection runs only where all of them are there.
pub(super) const SOCK_HELPERS: &[(ProgramType, BpfHelper, &str, &str)] = &[
    (
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_map_lookup_elem,
        "bpf_map_lookup_elem (sock_ops)",
        "4.13",
    ),
    (
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_sock_hash_update,
        "bpf_sock_hash_update",
        "4.18",
    ),
    (
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_ringbuf_output,
        "bpf_ringbuf_output (sock_ops)",
        "5.8",
    ),
    (
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_ringbuf_query,
        "bpf_ringbuf_query (sock_ops)",
        "5.8",
    ),
    (
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_ktime_get_ns,
        "bpf_ktime_get_ns (sock_ops)",
        "4.13",
    ),
    (
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_ktime_get_coarse_ns,
        COARSE_SOCK_OPS,
        "5.11",
    ),
    (
        ProgramType::SkMsg,
        BpfHelper::BPF_FUNC_ktime_get_coarse_ns,
        COARSE_SK_MSG,
        "5.11",
    ),
    (
        ProgramType::SkMsg,
        BpfHelper::BPF_FUNC_map_lookup_elem,
        "bpf_map_lookup_elem (sk_msg)",
        "4.17",
    ),
    (
        ProgramType::SkMsg,
        BpfHelper::BPF_FUNC_msg_redirect_hash,
        "bpf_msg_redirect_hash",
        "4.18",
    ),
    (
        ProgramType::SkMsg,
        BpfHelper::BPF_FUNC_ktime_get_ns,
        "bpf_ktime_get_ns (sk_msg)",
        "4.17",
    ),
];

/// Optional like the tc programs' coarse clock (the same load-time switch picks the clock).
const COARSE_SOCK_OPS: &str = "bpf_ktime_get_coarse_ns (sock_ops)";
const COARSE_SK_MSG: &str = "bpf_ktime_get_coarse_ns (sk_msg)";

/// Names of the features same-node socket redirection needs (none of them required to run).
pub(super) const SOCKET_REDIRECT_PROGRAMS: [&str; 3] =
    ["sock_ops programs", "sk_msg programs", "sockhash map"];

/// The probes of what socket redirection needs: program and map types and helpers.
fn socket_redirect_features() -> Vec<Feature> {
    use FeatureKind::{Helper, Map, Program};
    let note = "socket redirect (optional)";
    let mut features = vec![
        Feature::new(SOCKET_REDIRECT_PROGRAMS[0], Program, false, "4.13")
            .with_probe(is_program_supported(ProgramType::SockOps))
            .with_detail(note),
        Feature::new(SOCKET_REDIRECT_PROGRAMS[1], Program, false, "4.17")
            .with_probe(is_program_supported(ProgramType::SkMsg))
            .with_detail(note),
        Feature::new(SOCKET_REDIRECT_PROGRAMS[2], Map, false, "4.18")
            .with_probe(is_map_supported(MapType::SockHash))
            .with_detail(note),
    ];
    for (program_type, helper, name, min) in SOCK_HELPERS {
        features.push(
            Feature::new(name, Helper, false, min)
                .with_probe(is_helper_supported(*program_type, *helper))
                .with_detail(note),
        );
    }
    features
}

/// What the kernel lacks for socket redirection, one phrase per feature (empty: nothing).
pub(super) fn socket_redirect_missing(report: &FeatureReport) -> Vec<String> {
    let wanted: Vec<&str> = SOCKET_REDIRECT_PROGRAMS
        .iter()
        .copied()
        .chain(SOCK_HELPERS.iter().map(|(_, _, name, _)| *name))
        .filter(|name| ![COARSE_SOCK_OPS, COARSE_SK_MSG].contains(name))
        .collect();
    report
        .features
        .iter()
        .filter(|f| wanted.contains(&f.name.as_str()) && !f.available)
        .map(|f| format!("{} (Linux {})", f.name, f.min_kernel))
        .collect()
}

/// Name and minimum kernel of helper number `id`, when it is one weft uses.
pub(super) fn helper_by_id(id: u32) -> Option<(&'static str, &'static str)> {
    TC_HELPERS
        .iter()
        .find(|(helper, _, _)| *helper as u32 == id)
        .map(|(_, name, min)| (*name, *min))
}

/// Minimum kernel of the helper named `name`, when it is one weft uses.
pub(super) fn helper_min_kernel(name: &str) -> Option<&'static str> {
    TC_HELPERS
        .iter()
        .find(|(_, n, _)| *n == name)
        .map(|(_, _, min)| *min)
}

/// Helpers the programs can do without: the agent loads them so that the branch using the
/// helper is never taken (the verifier then drops it), and says so.
const OPTIONAL_HELPERS: &[(&str, &str)] = &[(
    "bpf_ktime_get_coarse_ns",
    "optional: without it conntrack reads bpf_ktime_get_ns",
)];

/// Whether the programs can read the coarse clock here.
pub(super) fn has_coarse_clock(report: &FeatureReport) -> bool {
    report
        .features
        .iter()
        .any(|f| f.name == "bpf_ktime_get_coarse_ns" && f.available)
}

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
const TCX_MIN_KERNEL: KernelVersion = KernelVersion::new(6, 6, 0);

/// Probe everything the datapath uses. Each probe loads a two-instruction program or creates
/// a one-entry map (or a throwaway network namespace for the clsact qdisc): milliseconds.
pub(super) fn probe(attach_mode: AttachMode) -> FeatureReport {
    use FeatureKind::{Helper, Kernel, Map};
    let aya_features = aya::features();
    let mut features = vec![
        probe_syscall(),
        Feature::new("BTF", Kernel, true, "4.18").with_available(aya_features.btf().is_some()),
        Feature::new("global data", Kernel, true, "5.2")
            .with_available(aya_features.bpf_global_data()),
        Feature::new("vmlinux BTF", Kernel, false, "5.4")
            .with_available(Path::new(VMLINUX_BTF).exists())
            .with_detail("not needed: weft does not use CO-RE"),
    ];
    for (name, map_type, min) in [
        ("BPF ring buffer", MapType::RingBuf, "5.8"),
        ("LPM trie map", MapType::LpmTrie, "4.11"),
        ("LRU hash map", MapType::LruHash, "4.10"),
        ("per-CPU array map", MapType::PerCpuArray, "4.6"),
    ] {
        features.push(Feature::new(name, Map, true, min).with_probe(is_map_supported(map_type)));
    }
    for (helper, name, min) in TC_HELPERS {
        let optional = OPTIONAL_HELPERS.iter().find(|(n, _)| n == name);
        let mut feature = Feature::new(name, Helper, optional.is_none(), min)
            .with_probe(is_helper_supported(ProgramType::SchedClassifier, *helper));
        if let Some((_, note)) = optional {
            feature = feature.with_detail(*note);
        }
        features.push(feature);
    }
    features.push(probe_attach(attach_mode));
    features.extend(socket_redirect_features());
    FeatureReport {
        kernel: kernel_release(),
        attach_mode: attach_mode.name().to_owned(),
        features,
    }
}

/// Whether this process may use `bpf()` at all: a plain hash map is the oldest map type.
fn probe_syscall() -> Feature {
    let mut feature = Feature::new("bpf() system call", FeatureKind::Syscall, true, "3.18");
    match is_map_supported(MapType::Hash) {
        Ok(available) => feature.available = available,
        Err(e) => {
            feature.also_needs = Some(match e.io_error.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => {
                    "root (CAP_BPF and CAP_NET_ADMIN, or CAP_SYS_ADMIN)".to_owned()
                }
                _ => "CONFIG_BPF_SYSCALL".to_owned(),
            });
            feature.detail = format!("{:#}", anyhow::Error::from(e));
        }
    }
    feature
}

fn kernel_release() -> String {
    nix::sys::utsname::uname().map_or_else(
        |_| "(unknown release)".to_owned(),
        |u| u.release().to_string_lossy().into_owned(),
    )
}

fn probe_attach(attach_mode: AttachMode) -> Feature {
    match attach_mode {
        AttachMode::Tcx => {
            let feature = Feature::new("TCX links", FeatureKind::Attach, true, "6.6");
            match KernelVersion::current() {
                Ok(v) => feature.with_available(v >= TCX_MIN_KERNEL),
                Err(e) => feature.with_probe(Err(e)),
            }
        }
        AttachMode::Netlink => {
            let mut feature = Feature::new("clsact qdisc", FeatureKind::Attach, true, "4.5");
            feature.also_needs = Some(
                "module sch_ingress (CONFIG_NET_SCH_INGRESS); Linux >= 6.6 attaches through \
                 TCX instead and needs no qdisc"
                    .to_owned(),
            );
            match probe_clsact() {
                Ok(()) => feature.available = true,
                Err(ClsactProbe::Unavailable(e)) => feature.detail = e,
                // Without a scratch namespace nothing can be concluded; attaching will tell.
                Err(ClsactProbe::NotProbed(e)) => {
                    feature.available = true;
                    feature.detail = format!("not probed: {e}");
                }
            }
            feature
        }
    }
}

/// The `cls_bpf` classifier (netlink attach mode), from [`super::attach::probe_netlink_attach`]:
/// `problem` is why attaching failed, `None` when it worked.
pub(super) fn cls_bpf_feature(problem: Option<String>) -> Feature {
    let mut feature = Feature::new("cls_bpf classifier", FeatureKind::Attach, true, "4.4");
    feature.also_needs = Some(
        "module cls_bpf (CONFIG_NET_CLS_BPF); Linux >= 6.6 attaches through TCX instead".to_owned(),
    );
    match problem {
        None => feature.available = true,
        Some(problem) => feature.detail = problem,
    }
    feature
}

/// Add a clsact qdisc to `lo` of a throwaway network namespace: this loads `sch_ingress` if
/// needed and fails when the kernel cannot have it.
fn probe_clsact() -> Result<(), ClsactProbe> {
    match in_scratch_netns(|| aya::programs::tc::qdisc_add_clsact("lo")) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ClsactProbe::Unavailable(format!(
            "{:#}",
            anyhow::Error::from(e)
        ))),
        Err(e) => Err(ClsactProbe::NotProbed(e)),
    }
}

enum ClsactProbe {
    Unavailable(String),
    NotProbed(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every helper the embedded object calls is in the table (and probed at start-up).
    #[test]
    fn the_helper_table_lists_every_helper_the_object_calls() {
        use object::{Object, ObjectSection, SectionKind};
        let file = object::File::parse(super::super::EBPF_OBJECT).expect("the eBPF object parses");
        let mut called = std::collections::BTreeSet::new();
        let mut sock_called = std::collections::BTreeSet::new();
        for section in file.sections() {
            if section.kind() != SectionKind::Text {
                continue;
            }
            let sock = matches!(section.name(), Ok("sockops" | "sk_msg"));
            let called = if sock { &mut sock_called } else { &mut called };
            let code = section.data().expect("section data");
            for insn in code.chunks_exact(8) {
                // BPF_JMP | BPF_CALL with src_reg 0: a helper call; the id is the immediate.
                if insn[0] == 0x85 && insn[1] >> 4 == 0 {
                    called.insert(u32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]));
                }
            }
        }
        let listed: std::collections::BTreeSet<u32> =
            TC_HELPERS.iter().map(|(h, _, _)| *h as u32).collect();
        assert!(
            !called.is_empty(),
            "no helper calls found: is the object empty?"
        );
        assert_eq!(
            called.difference(&listed).collect::<Vec<_>>(),
            Vec::<&u32>::new(),
            "helpers the object calls that TC_HELPERS does not list (and so are not probed)"
        );
        let sock_listed: std::collections::BTreeSet<u32> =
            SOCK_HELPERS.iter().map(|(_, h, _, _)| *h as u32).collect();
        assert!(
            !sock_called.is_empty(),
            "no sock_ops/sk_msg helper calls found"
        );
        assert_eq!(
            sock_called.difference(&sock_listed).collect::<Vec<_>>(),
            Vec::<&u32>::new(),
            "helpers sock_ops/sk_msg call that SOCK_HELPERS does not list"
        );
    }

    #[test]
    fn socket_redirect_names_what_the_kernel_lacks_and_ignores_the_optional_clock() {
        let mut report = FeatureReport {
            kernel: "5.10.0".into(),
            attach_mode: "netlink".into(),
            features: socket_redirect_features(),
        };
        for f in &mut report.features {
            f.available = true;
        }
        for f in &mut report.features {
            if f.name.starts_with("bpf_ktime_get_coarse_ns") {
                f.available = false;
            }
        }
        assert!(socket_redirect_missing(&report).is_empty());
        for f in &mut report.features {
            if f.name == "sockhash map" {
                f.available = false;
            }
        }
        assert_eq!(
            socket_redirect_missing(&report),
            vec!["sockhash map (Linux 4.18)".to_owned()]
        );
    }

    #[test]
    fn helper_table_matches_kernel_numbering() {
        assert_eq!(helper_by_id(155), Some(("bpf_redirect_peer", "5.10")));
        assert_eq!(helper_by_id(160), Some(("bpf_ktime_get_coarse_ns", "5.11")));
        assert_eq!(helper_by_id(39), Some(("bpf_skb_pull_data", "4.9")));
        assert_eq!(helper_by_id(9999), None);
        assert_eq!(helper_min_kernel("bpf_ringbuf_reserve"), Some("5.8"));
    }
}
