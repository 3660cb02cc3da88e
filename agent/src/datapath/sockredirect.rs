//! Same-node socket redirection: loads `weft_sk_msg` onto the pinned socket map and
//! `weft_sock_ops` onto the node's cgroup v2, through a pinned cgroup link, so that the
//! programs outlive the agent like the tc ones; a restarted agent swaps its programs in
//! (`sk_msg` replaces the map's program; `sock_ops` gets a new link pinned over the old one,
//! make before break).
//!
//! Never fatal: whatever goes wrong here leaves redirection off, with the reason in `weft
//! status`, and tc enforcement as it is. Off also means off in the kernel: the config flag
//! the programs check is cleared and the cgroup link removed.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use aya::Ebpf;
use aya::maps::{MapData, SockHash};
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, SkMsg, SockOps};
use tracing::{info, warn};
use weft_common::{CtKey, map_names, program_names};

use super::features::{self, FeatureReport};

/// What the node asks for.
#[derive(Debug, Clone, Default)]
pub struct SocketRedirectSettings {
    pub enabled: bool,
    /// The cgroup v2 of the node's pods; `None`: the `cgroup2` mount.
    pub cgroup: Option<PathBuf>,
}

/// What the agent got: on, or off and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketRedirectState {
    pub on: bool,
    /// The cgroup when on; why not when off.
    pub detail: String,
}

impl SocketRedirectState {
    fn off(why: impl Into<String>) -> Self {
        Self {
            on: false,
            detail: why.into(),
        }
    }

    /// `on (cgroup /sys/fs/cgroup)` or `off (why)`.
    pub fn line(&self) -> String {
        format!("{} ({})", if self.on { "on" } else { "off" }, self.detail)
    }
}

const LINK_PREFIX: &str = "sockops-";
const TMP_PREFIX: &str = "sockopsnew-";

/// Whether `name` (a file under the pin directory's `links/`) is a `sock_ops` link pin.
pub(super) fn is_link_pin(name: &str) -> bool {
    name.starts_with(LINK_PREFIX) || name.starts_with(TMP_PREFIX)
}

/// Set up redirection as `settings` ask, returning what it came to and the cgroup link to
/// hold while the agent runs.
pub(super) fn setup(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    settings: &SocketRedirectSettings,
    report: &FeatureReport,
    verbose: bool,
) -> (SocketRedirectState, Option<(PathBuf, FdLink)>) {
    let links = pin_dir.join("links");
    if !settings.enabled {
        remove_links(&links, None);
        return (
            SocketRedirectState::off("turned off with --socket-redirect false"),
            None,
        );
    }
    let missing = features::socket_redirect_missing(report);
    if !missing.is_empty() {
        remove_links(&links, None);
        let state = SocketRedirectState::off(format!("the kernel lacks {}", missing.join(", ")));
        warn!("socket redirect off: {}", state.detail);
        return (state, None);
    }
    let cgroup = match settings.cgroup.clone().map_or_else(cgroup2_mount, Ok) {
        Ok(c) => c,
        Err(e) => {
            remove_links(&links, None);
            let state = SocketRedirectState::off(format!("{e:#}"));
            warn!("socket redirect off: {}", state.detail);
            return (state, None);
        }
    };
    match attach(ebpf, &links, &cgroup, verbose) {
        Ok(link) => {
            info!(cgroup = %cgroup.display(), "socket redirect on");
            (
                SocketRedirectState {
                    on: true,
                    detail: format!("cgroup {}", cgroup.display()),
                },
                Some(link),
            )
        }
        Err(e) => {
            let state = SocketRedirectState::off(format!("{e:#}"));
            warn!("socket redirect off: {}", state.detail);
            (state, None)
        }
    }
}

fn attach(
    ebpf: &mut Ebpf,
    links: &Path,
    cgroup: &Path,
    verbose: bool,
) -> anyhow::Result<(PathBuf, FdLink)> {
    let cgroup_dir = std::fs::File::open(cgroup)
        .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    let inode = cgroup_dir
        .metadata()
        .with_context(|| format!("reading cgroup {}", cgroup.display()))?
        .ino();
    // sk_msg first: a socket sock_ops puts into the map must meet its verdict program.
    {
        let map = ebpf
            .map(map_names::SOCKHASH)
            .ok_or_else(|| anyhow!("the eBPF object has no map {}", map_names::SOCKHASH))?;
        let map: SockHash<&MapData, CtKey> = SockHash::try_from(map)?;
        let map_fd = map
            .fd()
            .try_clone()
            .context("duplicating the socket map fd")?;
        let program: &mut SkMsg = ebpf
            .program_mut(program_names::SK_MSG)
            .ok_or_else(|| anyhow!("the eBPF object has no program {}", program_names::SK_MSG))?
            .try_into()?;
        load(program_names::SK_MSG, program.load(), verbose)?;
        // Attached to the pinned map, which keeps it: replaces an earlier agent's program.
        let id = program
            .attach(&map_fd)
            .context("attaching sk_msg to the socket map")?;
        // Never detach on drop: the map keeps the program after the agent exits.
        std::mem::forget(program.take_link(id)?);
    }
    let program: &mut SockOps = ebpf
        .program_mut(program_names::SOCK_OPS)
        .ok_or_else(|| anyhow!("the eBPF object has no program {}", program_names::SOCK_OPS))?
        .try_into()?;
    load(program_names::SOCK_OPS, program.load(), verbose)?;
    let id = program
        // A cgroup bpf_link takes no flags (BPF_F_ALLOW_MULTI is EINVAL); links are
        // multi-attach by themselves, so the old and new link run side by side a moment.
        .attach(&cgroup_dir, CgroupAttachMode::Single)
        .with_context(|| format!("attaching sock_ops to cgroup {}", cgroup.display()))?;
    let link = FdLink::try_from(program.take_link(id)?)
        .map_err(|e| anyhow!("a pinnable cgroup link (bpf_link, Linux 5.7): {e}"))?;
    // Make before break: the new link is pinned next to the old one and renamed over it,
    // which lets go of the old link (and its program) only once the new one runs.
    std::fs::create_dir_all(links).ok();
    let pin = links.join(format!("{LINK_PREFIX}{inode}"));
    // (bpffs refuses names with a dot.)
    let tmp = links.join(format!("{TMP_PREFIX}{inode}"));
    let _ = std::fs::remove_file(&tmp);
    let pinned = link.pin(&tmp).context("pinning the sock_ops link")?;
    std::fs::rename(&tmp, &pin).context("moving the sock_ops link pin in place")?;
    // Links of another cgroup (the node's cgroup changed) go.
    remove_links(links, Some(&pin));
    Ok((pin, FdLink::from(pinned)))
}

fn load(
    name: &str,
    loaded: Result<(), aya::programs::ProgramError>,
    verbose: bool,
) -> anyhow::Result<()> {
    match loaded {
        Ok(()) => Ok(()),
        Err(aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        }) => {
            let log = verifier_log.to_string();
            if verbose {
                eprintln!("verifier log for {name}:\n{log}");
            }
            Err(anyhow!(
                "{}",
                super::verifier::explain(name, &io_error.to_string(), &log)
            ))
        }
        Err(e) => Err(e).with_context(|| format!("loading eBPF program {name}")),
    }
}

/// Remove the pinned `sock_ops` links under `links` except `keep` (their programs detach).
fn remove_links(links: &Path, keep: Option<&Path>) {
    let Ok(entries) = std::fs::read_dir(links) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if is_link_pin(&name) && Some(path.as_path()) != keep {
            match std::fs::remove_file(&path) {
                Ok(()) => info!(pin = %path.display(), "removed sock_ops link"),
                Err(e) => warn!(pin = %path.display(), "cannot remove sock_ops link: {e}"),
            }
        }
    }
}

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on most nodes, `/sys/fs/cgroup/unified` in
/// the hybrid layout.
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("reading mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .min_by_key(|p| p.components().count())
        .ok_or_else(|| anyhow!("no cgroup v2 mount (mount cgroup2 or pass --cgroup)"))
}
