//! Kernel features the datapath uses, as the agent probed them: the report `weft status`
//! shows, and the pure decisions on it (the refusal sentence, the one-line summary). The
//! probing itself lives in the agent's datapath module.

use serde::{Deserialize, Serialize};

/// What a [`Feature`] is, for grouping in reports and wording in the refusal.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FeatureKind {
    /// The `bpf()` system call itself: without it every other probe fails too.
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
    pub fn new(name: &str, kind: FeatureKind, required: bool, min_kernel: &str) -> Self {
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

    pub fn with_probe<E: std::fmt::Display>(mut self, probed: Result<bool, E>) -> Self {
        match probed {
            Ok(available) => self.available = available,
            Err(e) => {
                self.available = false;
                self.detail = format!("probe failed: {e}");
            }
        }
        self
    }

    pub fn with_available(mut self, available: bool) -> Self {
        self.available = available;
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    /// "BPF ring buffer", "helper `bpf_redirect_peer` for tc programs".
    pub fn label(&self) -> String {
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
                    .filter(|h| h.required && !h.available)
                    .map(|h| h.name.as_str())
                    .collect();
                let without: Vec<&str> = helpers
                    .iter()
                    .filter(|h| !h.required && !h.available)
                    .map(|h| h.name.as_str())
                    .collect();
                let mut part = if missing.is_empty() {
                    format!("tc helpers ok ({})", helpers.len() - without.len())
                } else {
                    format!("tc helpers MISSING: {}", missing.join(" "))
                };
                if !without.is_empty() {
                    part = format!("{part} (without {})", without.join(" "));
                }
                parts.push(part);
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
}
