//! Per-node cgroups: the harness puts the processes it starts in a node's pods into the
//! node's own cgroup v2 (`weft-test-<prefix>-<node>` under the `cgroup2` mount), as kubelet
//! puts pods under `kubepods`, and gives that cgroup to the node's agent (`--cgroup`). Each
//! node has its own, so that parallel tests' agents never see each other's sockets.

use std::fs;
use std::path::{Path, PathBuf};

/// Name prefix of the harness's cgroups (what a sweep looks for).
pub const PREFIX: &str = "weft-test-";

/// Where cgroup v2 is mounted (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified`).
pub fn mount() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .min_by_key(|p| p.components().count())
}

/// Create the cgroup of node `full_name`; `None` without a cgroup v2 mount.
pub(crate) fn create(full_name: &str) -> Option<PathBuf> {
    let dir = mount()?.join(format!("{PREFIX}{full_name}"));
    if dir.exists() {
        remove(&dir);
    }
    match fs::create_dir(&dir) {
        Ok(()) => Some(dir),
        Err(e) => panic!("cannot create cgroup {}: {e}", dir.display()),
    }
}

/// Move what still runs in `dir` to its parent and remove it.
pub(crate) fn remove(dir: &Path) {
    let Some(parent) = dir.parent() else {
        return;
    };
    for _ in 0..50 {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                let _ = fs::write(parent.join("cgroup.procs"), pid);
            }
        }
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
    eprintln!("cannot remove cgroup {}", dir.display());
}

/// Remove harness cgroups left by dead runs whose names start with `prefix`.
pub(crate) fn sweep(prefix: &str) -> Vec<String> {
    let mut removed = Vec::new();
    let Some(root) = mount() else {
        return removed;
    };
    let Ok(entries) = fs::read_dir(&root) else {
        return removed;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("{PREFIX}{prefix}")) {
            remove(&entry.path());
            removed.push(format!("cgroup {name}"));
        }
    }
    removed
}
