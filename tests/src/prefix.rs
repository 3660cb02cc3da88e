//! Per-test name prefixes, and sweeping what dead earlier runs left behind.

use std::fmt;
use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Where each live prefix records its owner's pid, for [`sweep_stale`].
const OWNERS_DIR: &str = "/tmp/weft-tests-owners";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short unique prefix (`wt` + 5 hex digits) for every name one test creates.
///
/// Interface names are at most 15 characters, so the prefix stays 7 long. Each [`Node`] started
/// under a prefix takes the next subnet index (1, 2, ...), so nodes of one test get disjoint pod
/// ranges. Clones share the prefix and its counter.
///
/// [`Node`]: crate::Node
#[derive(Clone)]
pub struct TestPrefix(Arc<Inner>);

struct Inner {
    name: String,
    next_subnet: AtomicU8,
    /// Whether an owner file records this process (random test prefixes).
    owned: bool,
}

impl TestPrefix {
    pub fn new() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        // FNV-1a over pid, counter and time: cheap and spreads well over 20 bits.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let seed = format!("{}-{count}-{nanos}", std::process::id());
        for byte in seed.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        let name = format!("wt{:05x}", hash & 0xf_ffff);
        // Record the owner before anything carries the prefix, so a sweep never takes a live one.
        let _ = fs::create_dir_all(OWNERS_DIR);
        let _ = fs::write(owner_file(&name), std::process::id().to_string());
        Self(Arc::new(Inner {
            name,
            next_subnet: AtomicU8::new(1),
            owned: true,
        }))
    }

    /// A prefix with a fixed name (the demo's), not tied to this process: nothing sweeps it
    /// but [`remove_prefix`]. `name` is at most 7 characters.
    pub fn fixed(name: &str) -> Self {
        assert!(
            name.len() <= 7,
            "prefix {name:?} is longer than 7 characters"
        );
        Self(Arc::new(Inner {
            name: name.to_owned(),
            next_subnet: AtomicU8::new(1),
            owned: false,
        }))
    }

    pub fn as_str(&self) -> &str {
        &self.0.name
    }

    /// `<prefix>-<suffix>`, checked to fit an interface name.
    pub fn name(&self, suffix: &str) -> String {
        let name = format!("{}-{suffix}", self.0.name);
        assert!(
            name.len() <= 15,
            "name {name:?} is longer than 15 characters (interface name limit); use a shorter suffix"
        );
        name
    }

    pub(crate) fn next_subnet(&self) -> u8 {
        let index = self.0.next_subnet.fetch_add(1, Ordering::Relaxed);
        assert!(index < 255, "too many nodes under one prefix");
        index
    }
}

impl Default for TestPrefix {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for TestPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.name)
    }
}

impl fmt::Debug for TestPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TestPrefix({})", self.0.name)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.owned {
            let _ = fs::remove_file(owner_file(&self.name));
        }
    }
}

fn owner_file(prefix: &str) -> PathBuf {
    PathBuf::from(OWNERS_DIR).join(prefix)
}

/// Whether `text` starts with a harness prefix (`wt` + 5 hex digits + `-`); returns the prefix.
pub(crate) fn harness_prefix(text: &str) -> Option<&str> {
    let prefix = text.get(..7)?;
    let ok = prefix.starts_with("wt")
        && prefix[2..].bytes().all(|b| b.is_ascii_hexdigit())
        && text[7..].starts_with('-');
    ok.then_some(prefix)
}

fn owner_alive(prefix: &str) -> bool {
    fs::read_to_string(owner_file(prefix))
        .ok()
        .and_then(|pid| pid.trim().parse::<u32>().ok())
        .is_some_and(|pid| PathBuf::from(format!("/proc/{pid}")).exists())
}

/// Remove what dead earlier runs left behind: agents, network namespaces, bpffs pin
/// directories and temp dirs whose prefix's owner process is gone. Returns what it removed.
pub fn sweep_stale() -> Vec<String> {
    let mut removed = Vec::new();
    let stale = |name: &str| harness_prefix(name).is_some_and(|p| !owner_alive(p));

    // Agents first (they hold the namespaces and pins).
    for (pid, node) in agent_processes() {
        if stale(&node) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            removed.push(format!("agent pid {pid} ({node})"));
        }
    }
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if stale(name) {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
                removed.push(format!("netns {name}"));
            }
        }
    }
    for (dir, strip) in [("/sys/fs/bpf/weft", ""), ("/tmp", "weft-")] {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let Some(name) = file_name.strip_prefix(strip) else {
                continue;
            };
            if stale(name) {
                let _ = fs::remove_dir_all(entry.path());
                removed.push(entry.path().display().to_string());
            }
        }
    }
    if let Some(root) = crate::cgroup::mount()
        && let Ok(entries) = fs::read_dir(&root)
    {
        for entry in entries.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if file_name
                .strip_prefix(crate::cgroup::PREFIX)
                .is_some_and(&stale)
            {
                crate::cgroup::remove(&entry.path());
                removed.push(entry.path().display().to_string());
            }
        }
    }
    // Owner files of dead processes.
    if let Ok(entries) = fs::read_dir(OWNERS_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !owner_alive(&name) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    removed
}

/// Remove everything named with `prefix` (`<prefix>-...`): agents, processes inside its
/// network namespaces, the namespaces, pin directories, and `dirs`. Returns what it removed.
pub fn remove_prefix(prefix: &str, dirs: &[&std::path::Path]) -> Vec<String> {
    let mut removed = Vec::new();
    let ours = |name: &str| {
        name.strip_prefix(prefix)
            .is_some_and(|r| r.starts_with('-'))
    };
    for (pid, node) in agent_processes() {
        if ours(&node) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            removed.push(format!("agent pid {pid} ({node})"));
        }
    }
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if !ours(name) {
                continue;
            }
            if let Ok(pids) = Command::new("ip").args(["netns", "pids", name]).output() {
                for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<u32>() {
                        crate::process::kill_tree(pid);
                        removed.push(format!("process {pid} in netns {name}"));
                    }
                }
            }
            let _ = Command::new("ip").args(["netns", "del", name]).status();
            removed.push(format!("netns {name}"));
        }
    }
    if let Ok(entries) = fs::read_dir("/sys/fs/bpf/weft") {
        for entry in entries.flatten() {
            if ours(&entry.file_name().to_string_lossy()) {
                let _ = fs::remove_dir_all(entry.path());
                removed.push(entry.path().display().to_string());
            }
        }
    }
    let _ = fs::remove_dir("/sys/fs/bpf/weft");
    removed.extend(crate::cgroup::sweep(&format!("{prefix}-")));
    // WireGuard UAPI sockets of killed agents (`weft-<node>.sock`, nodes carry the prefix).
    if let Ok(entries) = fs::read_dir("/var/run/wireguard") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let node = name
                .strip_prefix("weft-")
                .and_then(|n| n.strip_suffix(".sock"));
            if node.is_some_and(ours) && fs::remove_file(entry.path()).is_ok() {
                removed.push(entry.path().display().to_string());
            }
        }
    }
    for dir in dirs {
        if dir.exists() && fs::remove_dir_all(dir).is_ok() {
            removed.push(dir.display().to_string());
        }
    }
    removed
}

/// Running `weft-agent` processes with the node each serves (its `--node` argument), found by
/// command line.
pub fn agent_processes() -> Vec<(i32, String)> {
    let mut found = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return found;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_agent = args
            .first()
            .is_some_and(|a| a.ends_with("/weft-agent") || a == "weft-agent");
        let node = args
            .iter()
            .position(|a| a == "--node")
            .and_then(|i| args.get(i + 1));
        if let (true, Some(node)) = (is_agent, node) {
            found.push((pid, node.clone()));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_shape_and_uniqueness() {
        let a = TestPrefix::new();
        let b = TestPrefix::new();
        assert_ne!(a.as_str(), b.as_str());
        for p in [&a, &b] {
            assert_eq!(p.as_str().len(), 7);
            assert_eq!(harness_prefix(&p.name("n1")), Some(p.as_str()));
        }
        assert_eq!(a.next_subnet(), 1);
        assert_eq!(a.clone().next_subnet(), 2);
    }

    #[test]
    fn harness_prefix_table() {
        for (text, want) in [
            ("wt1a2b3-n1", Some("wt1a2b3")),
            ("wt1a2b3", None),
            ("wtxyz12-n1", None),
            ("weft-n1", None),
            ("", None),
        ] {
            assert_eq!(harness_prefix(text), want, "{text:?}");
        }
    }
}
