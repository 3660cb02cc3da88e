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
//! - The ring buffer and its helpers: 5.8; `bpf_redirect_peer`: 5.10;
//!   `bpf_ktime_get_coarse_ns`: 5.11 — which makes 5.11 the oldest kernel weft can run on.
//! - tc attach: TCX links on >= 6.6, otherwise the clsact qdisc (`sch_ingress`, 4.5) with a
//!   `cls_bpf` filter in direct-action mode.

use std::path::Path;

use aya::maps::MapType;
use aya::programs::ProgramType;
use aya::sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported};
use aya::util::KernelVersion;
use serde::{Deserialize, Serialize};

use super::attach::{AttachMode, in_scratch_netns};

/// What a [`Feature`] is, for grouping in reports and wording in the refusal.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FeatureKind {
    /// The bpf() system call itself: without it every other probe fails too.
    Syscall,
    /// BTF, global data, vmlinux BTF.
    Kernel,
    Map,
    /// A helper the tc programs call.
    Helper,
    /// How programs are attached to interfaces.
    Attach,
    /// A program type weft will use later.
    Program,
}

/// One kernel feature and whether this kernel has it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Feature {
    pub name: String,
    pub kind: FeatureKind,
    /// Whether weft refuses to start without it.
    pub required: bool,
    /// First Linux release that has it, e.g. `5.8`.
    pub min_kernel: String,
    pub available: bool,
    /// Besides the kernel release, what else it needs (a module, a config option).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub also_needs: Option<String>,
    /// The probe's finding when it failed, or a note (e.g. why an optional feature is unused).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// The kernel's release and every probed feature.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FeatureReport {
    /// `uname -r`.
    pub kernel: String,
    /// `tcx` or `netlink`.
    pub attach_mode: String,
    pub features: Vec<Feature>,
}

impl Feature {
    fn new(name: &str, kind: FeatureKind, required: bool, min_kernel: &str) -> Self {
        Self {
            name: name.to_owned(),
            kind,
            required,
            min_kernel: min_kernel.to_owned(),
            available: false,
            also_needs: None,
            detail: String::new(),
        }
    }

    fn with_probe<E: std::fmt::Display>(mut self, probed: Result<bool, E>) -> Self {
        match probed {
            Ok(available) => self.available = available,
            Err(e) => {
                self.available = false;
                self.detail = format!("probe failed: {e}");
            }
        }
        self
    }

    fn with_available(mut self, available: bool) -> Self {
        self.available = available;
        self
    }

    fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    /// "BPF ring buffer", "helper bpf_redirect_peer for tc programs".
    fn label(&self) -> String {
        match self.kind {
            FeatureKind::Helper => format!("helper {} for tc programs", self.name),
            _ => self.name.clone(),
        }
    }
}

impl FeatureReport {
    pub fn missing_required(&self) -> impl Iterator<Item = &Feature> {
        self.features.iter().filter(|f| f.required && !f.available)
    }

    /// The error to refuse start-up with, naming every missing required feature with the
    /// kernel (and module) it needs; `None` when weft can run here.
    pub fn refusal(&self) -> Option<String> {
        // Without the system call every probe fails: naming them all would mislead.
        let syscall_missing = self
            .missing_required()
            .any(|f| f.kind == FeatureKind::Syscall);
        let missing: Vec<String> = self
            .missing_required()
            .filter(|f| !syscall_missing || f.kind == FeatureKind::Syscall)
            .map(|f| {
                let mut needs = format!("needs Linux >= {}", f.min_kernel);
                if let Some(also) = &f.also_needs {
                    needs.push_str(" and ");
                    needs.push_str(also);
                }
                let mut text = format!("missing {} ({needs})", f.label());
                if !f.detail.is_empty() {
                    text.push_str(": ");
                    text.push_str(&f.detail);
                }
                text
            })
            .collect();
        if missing.is_empty() {
            return None;
        }
        Some(format!(
            "weft cannot run on Linux {}: {}",
            self.kernel,
            missing.join("; ")
        ))
    }
}

/// One line for logs and `weft status`: required features as "ok"/"MISSING", the tc helpers
/// as one group, optional ones with their note.
pub fn summary(features: &[Feature]) -> String {
    let mut parts = Vec::new();
    let helpers: Vec<&Feature> = features
        .iter()
        .filter(|f| f.kind == FeatureKind::Helper)
        .collect();
    let mut helpers_done = false;
    for f in features {
        if f.kind == FeatureKind::Helper {
            if !helpers_done {
                helpers_done = true;
                let missing: Vec<&str> = helpers
                    .iter()
                    .filter(|h| !h.available)
                    .map(|h| h.name.as_str())
                    .collect();
                parts.push(if missing.is_empty() {
                    format!("tc helpers ok ({})", helpers.len())
                } else {
                    format!("tc helpers MISSING: {}", missing.join(" "))
                });
            }
            continue;
        }
        let state = match (f.required, f.available) {
            (true, true) => "ok",
            (true, false) => "MISSING",
            (false, true) => "available",
            (false, false) => "absent",
        };
        if f.required || f.detail.is_empty() {
            parts.push(format!("{} {state}", f.name));
        } else {
            parts.push(format!("{} {state} ({})", f.name, f.detail));
        }
    }
    parts.join(", ")
}

/// Helpers the tc programs call (listed by hand from the object's `call` instructions, e.g.
/// `llvm-objdump -d`; keep in step with ebpf/programs), with the first Linux release that
/// offers each to tc programs. Also names helpers in verifier refusals.
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
    (
        BpfHelper::BPF_FUNC_ktime_get_coarse_ns,
        "bpf_ktime_get_coarse_ns",
        "5.11",
    ),
];

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

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
const TCX_MIN_KERNEL: KernelVersion = KernelVersion::new(6, 6, 0);

/// Probe everything the datapath uses. Each probe loads a two-instruction program or creates
/// a one-entry map (or a throwaway network namespace for the clsact qdisc): milliseconds.
pub(super) fn probe(attach_mode: AttachMode) -> FeatureReport {
    use FeatureKind::{Helper, Kernel, Map, Program};
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
        features.push(
            Feature::new(name, Helper, true, min)
                .with_probe(is_helper_supported(ProgramType::SchedClassifier, *helper)),
        );
    }
    features.push(probe_attach(attach_mode));
    for (name, program_type, min) in [
        ("sk_msg", ProgramType::SkMsg, "4.17"),
        ("sock_ops", ProgramType::SockOps, "4.13"),
    ] {
        features.push(
            Feature::new(name, Program, false, min)
                .with_probe(is_program_supported(program_type))
                .with_detail("not used yet"),
        );
    }
    FeatureReport {
        kernel: kernel_release(),
        attach_mode: attach_mode.name().to_owned(),
        features,
    }
}

/// Whether this process may use bpf() at all: a plain hash map is the oldest map type.
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
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "(unknown release)".to_owned())
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

/// The cls_bpf classifier (netlink attach mode), from [`super::attach::probe_netlink_attach`]:
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

    fn feature(name: &str, kind: FeatureKind, required: bool, min: &str, ok: bool) -> Feature {
        Feature {
            available: ok,
            ..Feature::new(name, kind, required, min)
        }
    }

    fn report(features: Vec<Feature>) -> FeatureReport {
        FeatureReport {
            kernel: "5.4.0".into(),
            attach_mode: "netlink".into(),
            features,
        }
    }

    #[test]
    fn nothing_missing_means_no_refusal() {
        let r = report(vec![
            feature("BTF", FeatureKind::Kernel, true, "4.18", true),
            feature("sk_msg", FeatureKind::Program, false, "4.17", false),
        ]);
        assert_eq!(r.refusal(), None);
    }

    #[test]
    fn refusal_names_every_missing_required_feature_with_its_kernel() {
        let r = report(vec![
            feature("BTF", FeatureKind::Kernel, true, "4.18", true),
            feature("BPF ring buffer", FeatureKind::Map, true, "5.8", false),
            feature(
                "bpf_ktime_get_coarse_ns",
                FeatureKind::Helper,
                true,
                "5.11",
                false,
            ),
            // Optional features never block.
            feature("sk_msg", FeatureKind::Program, false, "4.17", false),
        ]);
        assert_eq!(
            r.refusal().as_deref(),
            Some(
                "weft cannot run on Linux 5.4.0: missing BPF ring buffer (needs Linux >= 5.8); \
                 missing helper bpf_ktime_get_coarse_ns for tc programs (needs Linux >= 5.11)"
            )
        );
    }

    #[test]
    fn without_the_system_call_only_that_is_named() {
        let mut syscall = feature(
            "bpf() system call",
            FeatureKind::Syscall,
            true,
            "3.18",
            false,
        );
        syscall.also_needs = Some("root (CAP_BPF and CAP_NET_ADMIN, or CAP_SYS_ADMIN)".into());
        syscall.detail = "`bpf_map_create` failed: Operation not permitted (os error 1)".into();
        let r = report(vec![
            syscall,
            feature("BPF ring buffer", FeatureKind::Map, true, "5.8", false),
        ]);
        assert_eq!(
            r.refusal().as_deref(),
            Some(
                "weft cannot run on Linux 5.4.0: missing bpf() system call (needs Linux >= 3.18 \
                 and root (CAP_BPF and CAP_NET_ADMIN, or CAP_SYS_ADMIN)): `bpf_map_create` \
                 failed: Operation not permitted (os error 1)"
            )
        );
    }

    #[test]
    fn clsact_refusal_names_the_module_and_tcx() {
        let mut clsact = feature("clsact qdisc", FeatureKind::Attach, true, "4.5", false);
        clsact.also_needs = Some("module sch_ingress (CONFIG_NET_SCH_INGRESS)".into());
        clsact.detail = "netlink error: [\"Specified qdisc kind is unknown\"]".into();
        let text = report(vec![clsact]).refusal().expect("refused");
        assert_eq!(
            text,
            "weft cannot run on Linux 5.4.0: missing clsact qdisc (needs Linux >= 4.5 and module \
             sch_ingress (CONFIG_NET_SCH_INGRESS)): netlink error: [\"Specified qdisc kind is \
             unknown\"]"
        );
    }

    #[test]
    fn summary_groups_helpers_and_notes_optional_features() {
        let mut vmlinux = feature("vmlinux BTF", FeatureKind::Kernel, false, "5.4", true);
        vmlinux.detail = "not needed: weft does not use CO-RE".into();
        let mut sk_msg = feature("sk_msg", FeatureKind::Program, false, "4.17", true);
        sk_msg.detail = "not used yet".into();
        let features = vec![
            feature("BTF", FeatureKind::Kernel, true, "4.18", true),
            vmlinux,
            feature("BPF ring buffer", FeatureKind::Map, true, "5.8", true),
            feature("bpf_redirect_peer", FeatureKind::Helper, true, "5.10", true),
            feature("bpf_ringbuf_query", FeatureKind::Helper, true, "5.8", true),
            feature("TCX links", FeatureKind::Attach, true, "6.6", true),
            sk_msg,
        ];
        assert_eq!(
            summary(&features),
            "BTF ok, vmlinux BTF available (not needed: weft does not use CO-RE), \
             BPF ring buffer ok, tc helpers ok (2), TCX links ok, sk_msg available (not used yet)"
        );
        let mut features = features;
        features[3].available = false;
        assert!(summary(&features).contains("tc helpers MISSING: bpf_redirect_peer"));
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
