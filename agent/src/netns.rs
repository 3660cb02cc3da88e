//! Entering a node's network namespace. The agent runs in the host's mount namespace (so it
//! shares the host's bpffs and socket directories) but in its node's network namespace.

use std::fs::File;
use std::path::Path;

use anyhow::Context;
use nix::sched::{CloneFlags, setns};

/// Move the calling thread into the network namespace at `path` (for example
/// `/var/run/netns/<name>`). Call before any other thread starts: threads spawned later
/// inherit the namespace, earlier ones keep theirs.
pub fn enter(path: &Path) -> anyhow::Result<()> {
    let file = File::open(path)
        .with_context(|| format!("opening network namespace {}", path.display()))?;
    setns(&file, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering network namespace {}", path.display()))?;
    Ok(())
}
