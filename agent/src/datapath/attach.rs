//! Loading the tc programs and attaching them to pod interfaces.
//!
//! Two attach modes: TCX links (kernel >= 6.6), pinned in bpffs so they outlive the agent;
//! and netlink clsact filters (older kernels), which the kernel keeps by themselves. In both
//! modes a restarted agent *replaces* the program in place (`bpf_link_update`, or a netlink
//! filter change at the same priority/handle), so enforcement never lapses.

use std::io;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use aya::Ebpf;
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType};
use aya::sys::SyscallError;
use aya::util::KernelVersion;
use tracing::{debug, warn};
use weft_common::program_names;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// `bpf_link` based tc attach (kernel >= 6.6).
    Tcx,
    /// clsact qdisc + `cls_bpf` filter over netlink.
    Netlink,
}

impl AttachMode {
    pub fn detect() -> Self {
        match std::env::var("WEFT_ATTACH_MODE").as_deref() {
            Ok("netlink") => return Self::Netlink,
            Ok("tcx") => return Self::Tcx,
            _ => {}
        }
        if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) {
            Self::Tcx
        } else {
            Self::Netlink
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Tcx => "tcx",
            Self::Netlink => "netlink",
        }
    }
}

/// Filter priority and handle of weft's `cls_bpf` filters (netlink mode).
const NL_PRIORITY: u16 = 1;
const NL_HANDLE: u16 = 1;

const HOOKS: [(&str, TcAttachType); 2] = [
    (program_names::FROM_POD, TcAttachType::Ingress),
    (program_names::TO_POD, TcAttachType::Egress),
];

pub(super) fn load_program(ebpf: &mut Ebpf, name: &str, verbose: bool) -> anyhow::Result<()> {
    let program = classifier(ebpf, name)?;
    match program.load() {
        Ok(()) => Ok(()),
        Err(ProgramError::LoadError {
            io_error,
            verifier_log,
        }) => {
            let log = verifier_log.to_string();
            if verbose {
                eprintln!("verifier log for {name}:\n{log}");
            }
            bail!(
                "{}",
                super::verifier::explain(name, &io_error.to_string(), &log)
            )
        }
        Err(e) => Err(e).with_context(|| format!("loading eBPF program {name}")),
    }
}

/// Run `f` in a throwaway network namespace. `unshare` affects only the calling thread, so
/// `f` runs on a short-lived thread, and the namespace, with whatever `f` made in it, goes
/// away with that thread. `Err` when no namespace could be created.
pub(super) fn in_scratch_netns<T: Send>(f: impl FnOnce() -> T + Send) -> Result<T, String> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("cannot create a scratch network namespace: {e}"))?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| Err("the probe thread panicked".to_owned()))
    })
}

/// Attach a loaded program the netlink way to `lo` of a throwaway network namespace: proves
/// at start-up that the kernel has the clsact qdisc and the `cls_bpf` classifier, instead of
/// failing each pod later. `Ok(None)` when it worked (or could not be tried),
/// `Ok(Some(reason))` when the kernel cannot attach this way.
pub(super) fn probe_netlink_attach(ebpf: &mut Ebpf) -> anyhow::Result<Option<String>> {
    let program = classifier(ebpf, program_names::FROM_POD)?;
    let attached = in_scratch_netns(|| {
        let text = |e: anyhow::Error| format!("{e:#}");
        aya::programs::tc::qdisc_add_clsact("lo").map_err(|e| text(e.into()))?;
        let id = program
            .attach_with_options("lo", TcAttachType::Ingress, netlink_options())
            .map_err(|e| text(e.into()))?;

        // The namespace goes away with the thread, which removes the filter too; detaching
        // is tidiness.
        let _ = program.take_link(id).map(aya::programs::Link::detach);
        Ok(())
    });
    match attached {
        Ok(Ok(())) => Ok(None),
        Ok(Err(reason)) => Ok(Some(reason)),
        Err(e) => {
            debug!("not probing cls_bpf: {e}");
            Ok(None)
        }
    }
}

/// weft's `cls_bpf` filter: its priority and handle, so a restarted agent replaces it in place.
fn netlink_options() -> TcAttachOptions {
    TcAttachOptions::Netlink(NlOptions {
        priority: NL_PRIORITY,
        handle: TcHandle::new(0, NL_HANDLE),
        classid: None,
    })
}

/// What the kernel says when no `cls_bpf` classifier can be found (nor loaded as a module).
const CLS_BPF_MISSING: &str = "classifier not found";

/// Name the module when a netlink attach failed for want of the `cls_bpf` classifier; other
/// errors pass through unchanged.
pub(super) fn explain_netlink_attach_error(error: &str) -> String {
    if error.contains(CLS_BPF_MISSING) {
        format!(
            "the cls_bpf classifier is missing: load module cls_bpf (CONFIG_NET_CLS_BPF), or \
             use Linux >= 6.6, which attaches through TCX instead ({error})"
        )
    } else {
        error.to_owned()
    }
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut SchedClassifier> {
    let program = ebpf
        .program_mut(name)
        .with_context(|| format!("the eBPF object has no program {name}"))?;
    program
        .try_into()
        .with_context(|| format!("{name} is not a tc classifier"))
}

pub(super) fn link_pin(pin_dir: &Path, ifname: &str, ifindex: u32, program: &str) -> PathBuf {
    pin_dir
        .join("links")
        .join(format!("{ifindex}-{ifname}-{program}"))
}

/// Attach both programs to a pod's host-side interface. In TCX mode the links are pinned and
/// also returned: the datapath holds them, so a link pin removed by someone else does not
/// detach the program (the watchdog pins it again).
pub(super) fn attach_endpoint(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    mode: AttachMode,
    ifname: &str,
    ifindex: u32,
) -> anyhow::Result<Vec<(&'static str, FdLink)>> {
    if mode == AttachMode::Netlink
        && let Err(e) = aya::programs::tc::qdisc_add_clsact(ifname)
        // A clsact qdisc already there (ours or someone else's) is fine.
        && !matches!(&e, aya::programs::tc::TcError::IoError(io) if io.kind() == io::ErrorKind::AlreadyExists)
        && !e.to_string().contains("exists")
    {
        return Err(e).with_context(|| format!("adding the clsact qdisc to {ifname}"));
    }
    let mut held = Vec::new();
    for (name, attach_type) in HOOKS {
        let program = classifier(ebpf, name)?;
        match mode {
            AttachMode::Tcx => {
                let pin = link_pin(pin_dir, ifname, ifindex, name);
                let link = attach_tcx(program, ifname, attach_type, &pin)
                    .with_context(|| format!("attaching {name} to {ifname} (tcx)"))?;
                held.push((name, link));
            }
            AttachMode::Netlink => attach_netlink(program, ifname, attach_type)
                .with_context(|| format!("attaching {name} to {ifname} (netlink)"))?,
        }
    }
    Ok(held)
}

/// Pin `link` at `pin` (again) and keep holding it.
pub(super) fn pin_link(link: FdLink, pin: &Path) -> anyhow::Result<FdLink> {
    let pinned = link.pin(pin).context("pinning the tc link")?;
    Ok(FdLink::from(pinned))
}

/// Whether the link pinned at `pin` is `link` (the same kernel link).
pub(super) fn pinned_link_is(pin: &Path, link: &FdLink) -> bool {
    let ours = link.info().map(|i| i.id());
    let pinned = PinnedLink::from_pin(pin).and_then(|p| FdLink::from(p).info().map(|i| i.id()));
    matches!((ours, pinned), (Ok(a), Ok(b)) if a == b)
}

fn attach_tcx(
    program: &mut SchedClassifier,
    ifname: &str,
    attach_type: TcAttachType,
    pin: &Path,
) -> anyhow::Result<FdLink> {
    let adopted = match PinnedLink::from_pin(pin) {
        Ok(old) => SchedClassifierLink::try_from(FdLink::from(old))
            .map_err(anyhow::Error::from)
            .and_then(|link| Ok(program.attach_to_link(link)?))
            .map_err(|e| debug!(ifname, "cannot reuse pinned link: {e:#}"))
            .ok(),
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound =>
        {
            None
        }
        Err(e) => return Err(e).context("opening the pinned link"),
    };
    let reused = match adopted {
        Some(id) if attached_here(program, ifname, attach_type)? => Some(id),
        Some(id) => {
            // The pinned link outlived its interface (an ifindex reused): start over.
            drop(program.take_link(id)?);
            None
        }
        None => None,
    };
    let link_id = if let Some(id) = reused {
        debug!(ifname, pin = %pin.display(), "replaced program in pinned link");
        id
    } else {
        if pin.exists() {
            warn!(ifname, pin = %pin.display(), "pinned link is stale, attaching anew");
            std::fs::remove_file(pin).ok();
        }
        program.attach_with_options(
            ifname,
            attach_type,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )?
    };
    let link = program.take_link(link_id)?;
    let fd_link = FdLink::try_from(link)?;
    if pin.exists() {
        Ok(fd_link)
    } else {
        pin_link(fd_link, pin)
    }
}

/// Whether `program` is among the TCX programs attached to `ifname`.
fn attached_here(
    program: &SchedClassifier,
    ifname: &str,
    attach_type: TcAttachType,
) -> anyhow::Result<bool> {
    let id = program.info()?.id();
    let (_, programs) = SchedClassifier::query_tcx(ifname, attach_type)?;
    Ok(programs.iter().any(|p| p.id() == id))
}

fn attach_netlink(
    program: &mut SchedClassifier,
    ifname: &str,
    attach_type: TcAttachType,
) -> anyhow::Result<()> {
    let handle = TcHandle::new(0, NL_HANDLE);
    let existing = SchedClassifierLink::attached(ifname, attach_type, NL_PRIORITY, handle, None)?;
    let link_id = match program.attach_to_link(existing) {
        Ok(id) => id,
        Err(_) => program
            .attach_with_options(ifname, attach_type, netlink_options())
            .map_err(|e| {
                anyhow::anyhow!(explain_netlink_attach_error(&format!(
                    "{:#}",
                    anyhow::Error::from(e)
                )))
            })?,
    };
    // The filter must outlive this process: never let the link's Drop detach it.
    std::mem::forget(program.take_link(link_id)?);
    Ok(())
}

pub(super) fn detach_endpoint(
    pin_dir: &Path,
    mode: AttachMode,
    ifname: &str,
    ifindex: u32,
) -> anyhow::Result<()> {
    for (name, attach_type) in HOOKS {
        match mode {
            AttachMode::Tcx => {
                let pin = link_pin(pin_dir, ifname, ifindex, name);
                match std::fs::remove_file(&pin) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e).with_context(|| format!("removing {}", pin.display())),
                }
            }
            AttachMode::Netlink => {
                let handle = TcHandle::new(0, NL_HANDLE);
                if let Ok(link) =
                    SchedClassifierLink::attached(ifname, attach_type, NL_PRIORITY, handle, None)
                {
                    use aya::programs::links::Link as _;
                    // The interface may be gone already, which detached the filter too.
                    let _ = link.detach();
                }
            }
        }
    }
    Ok(())
}

/// Remove link pins of interfaces that are gone (the kernel detached their programs with
/// them). A pin of an interface that still exists stays even when no endpoint in `keep`
/// uses it: without an endpoint entry its programs drop everything, which is what a deleted
/// pod's interface must do until it goes away.
pub(super) fn prune_links(pin_dir: &Path, keep: &[(String, u32)]) -> anyhow::Result<usize> {
    let dir = pin_dir.join("links");
    let mut removed = 0;
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(0);
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let wanted = keep.iter().any(|(ifname, ifindex)| {
            HOOKS
                .iter()
                .any(|(prog, _)| name == format!("{ifindex}-{ifname}-{prog}"))
        });
        // The socket redirection's cgroup link is not a pod's (the datapath manages it).
        if wanted || interface_exists(&name) || super::sockredirect::is_link_pin(&name) {
            continue;
        }
        std::fs::remove_file(entry.path())
            .with_context(|| format!("removing stale link pin {name}"))?;
        removed += 1;
    }
    Ok(removed)
}

/// Whether the interface a link pin `<ifindex>-<ifname>-<program>` names still exists with
/// that ifindex.
fn interface_exists(pin_name: &str) -> bool {
    let Some((ifindex, rest)) = pin_name.split_once('-') else {
        return false;
    };
    let Some((ifname, _program)) = rest.rsplit_once('-') else {
        return false;
    };
    // Program names contain underscores, never dashes; interface names may have dashes.
    ifindex
        .parse::<u32>()
        .is_ok_and(|index| nix::net::if_::if_nametoindex(ifname).is_ok_and(|now| now == index))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_cls_bpf_names_the_module() {
        let text = explain_netlink_attach_error(
            "netlink error: [\"TC classifier not found\"]: No such file or directory (os error 2)",
        );
        assert!(text.starts_with("the cls_bpf classifier is missing: load module cls_bpf"));
        assert!(text.contains("CONFIG_NET_CLS_BPF") && text.contains("6.6"));
        assert_eq!(explain_netlink_attach_error("other"), "other");
    }
}
