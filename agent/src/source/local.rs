//! The local source: a directory of YAML files holding the same objects as the Kubernetes
//! CRDs, plus `Endpoint`, `Node` and `Namespace` objects, watched through inotify (with
//! `notify-debouncer-full`).
//!
//! What changes the enforced policy, and what never does:
//! - A file is read once its writer is done with it: after it was closed for writing or
//!   renamed into place. A file that is open for writing (truncated by `>`, being filled by
//!   an editor or a slow tool) keeps its last good content until then, so a slow writer
//!   never opens a window.
//! - Deleting a file removes its objects. A file that is empty or holds no object is
//!   rejected and keeps its last good content: an emptied file is a mistake far more often
//!   than a way to remove policy.
//! - A file that fails to parse or validate, is larger than [`MAX_FILE_BYTES`], or is not
//!   UTF-8 is rejected whole, with a message naming the file, the object and the field; its
//!   last good content stays in force. Nothing of a rejected file's text is kept.
//! - An object (kind/namespace/name) belongs to the file that defined it first; another file
//!   defining it again is rejected whole, naming both files.
//! - Last good contents and the first-seen order are kept in the state directory, so a
//!   restarted agent facing a broken file keeps enforcing what the file said before.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use notify::EventKind;
use notify::event::{AccessKind, AccessMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};
use weft_policy::model::Node;
use weft_policy::{Object, ParseError, parse_documents};

use super::{Rejection, Source, SourceBatch, Sourced, Wake};
use crate::fsutil;

/// Largest object file the source reads; larger files are rejected without being read.
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// Events within this window are handled together.
const DEBOUNCE: Duration = Duration::from_millis(50);
const INDEX_FILE: &str = "index.json";

pub struct LocalSource {
    dir: PathBuf,
    scanner: Arc<Mutex<Scanner>>,
    debouncer: Option<Debouncer<notify::RecommendedWatcher, RecommendedCache>>,
}

/// Everything the source knows; behind a mutex shared by the watcher thread and
/// [`Source::sync_now`] (plain threads: it is never held across an await).
struct Scanner {
    dir: PathBuf,
    last_good_dir: PathBuf,
    files: BTreeMap<String, FileState>,
    /// First-seen order of file names (an object belongs to the file that defined it first).
    order: BTreeMap<String, u64>,
    next_seq: u64,
    /// What the controller was last told: key -> object.
    emitted: BTreeMap<String, Sourced>,
    emitted_rejections: Vec<Rejection>,
    /// Text of files read and valid but not yet accepted; dropped by [`Scanner::resolve`].
    pending_good: HashMap<String, String>,
    /// What changed since the controller last took it.
    outbox: SourceBatch,
}

struct FileState {
    /// Fingerprint of the text last read (its hash and length): nothing of the text itself.
    fingerprint: Option<(u64, usize)>,
    /// Problems of the current text, or its objects.
    current: Result<Vec<Object>, Vec<Rejection>>,
    /// The current text's objects collide with an earlier file's (decided per scan).
    duplicate: Option<Rejection>,
    /// The last good content's objects: what is enforced for this file.
    good: Vec<Object>,
    /// Open for writing by some process when last looked at: read again when it is closed.
    writing: bool,
}

#[derive(Serialize, Deserialize, Default)]
struct Index {
    order: BTreeMap<String, u64>,
}

impl LocalSource {
    /// `state_dir` keeps last good file contents across restarts.
    ///
    /// # Errors
    /// When the directories cannot be created.
    pub fn new(dir: &Path, state_dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let last_good_dir = state_dir.join("last-good");
        fsutil::private_dir(&last_good_dir)?;
        let index: Index = fsutil::read_json(&last_good_dir.join(INDEX_FILE))?.unwrap_or_default();
        let next_seq = index.order.values().max().map_or(0, |m| m + 1);
        Ok(Self {
            dir: dir.to_owned(),
            scanner: Arc::new(Mutex::new(Scanner {
                dir: dir.to_owned(),
                last_good_dir,
                files: BTreeMap::new(),
                order: index.order,
                next_seq,
                emitted: BTreeMap::new(),
                emitted_rejections: Vec::new(),
                pending_good: HashMap::new(),
                outbox: SourceBatch::default(),
            })),
            debouncer: None,
        })
    }

    fn scanner(&self) -> std::sync::MutexGuard<'_, Scanner> {
        // A panic in a scan leaves the state as consistent as before it: keep going.
        self.scanner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Source for LocalSource {
    fn describe(&self) -> String {
        format!("local:{}", self.dir.display())
    }

    fn initial(&mut self) -> anyhow::Result<SourceBatch> {
        let mut scanner = self.scanner();
        std::fs::read_dir(&self.dir).with_context(|| format!("reading {}", self.dir.display()))?;
        scanner.scan(None);
        Ok(std::mem::take(&mut scanner.outbox))
    }

    fn take(&mut self) -> SourceBatch {
        std::mem::take(&mut self.scanner().outbox)
    }

    fn watch(&mut self, wake: Wake) -> anyhow::Result<()> {
        let scanner = self.scanner.clone();
        let mut debouncer = new_debouncer(DEBOUNCE, None, move |result: DebounceEventResult| {
            let mut scanner = scanner
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let dirty = match result {
                Ok(events) => Scanner::note_events(events.iter().map(|e| &e.event)),
                Err(errors) => {
                    for e in errors {
                        warn!("watching the source directory: {e}");
                    }
                    None
                }
            };
            let (_, changed) = scanner.scan(dirty.as_ref());
            drop(scanner);
            if changed {
                wake();
            }
        })
        .context("creating the directory watcher")?;
        debouncer
            .watch(&self.dir, notify::RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", self.dir.display()))?;
        self.debouncer = Some(debouncer);
        Ok(())
    }

    fn sync_now(&mut self) -> SourceBatch {
        // Let the watcher hand over what happened before this call (its events wait out the
        // debounce window), so that a file closed just before counts as closed.
        if self.debouncer.is_some() {
            std::thread::sleep(DEBOUNCE * 3);
        }
        let mut scanner = self.scanner();
        scanner.scan(None);
        std::mem::take(&mut scanner.outbox)
    }

    fn publish_node(&mut self, node: &Node) -> anyhow::Result<()> {
        write_node_object(&self.dir, node)
    }
}

/// Write `node` as its own file in the source directory `dir`, unless it is there already.
/// The agent does at every start, and the encryption module when the node's key rotates.
///
/// # Errors
/// When the object has no name or the file cannot be written.
pub fn write_node_object(dir: &Path, node: &Node) -> anyhow::Result<()> {
    let name = node
        .metadata
        .name
        .as_deref()
        .context("a Node object needs a name")?;
    let path = dir.join(node_file_name(name));
    let yaml = format!(
        "# Written by the weft agent of node {name} at every start: edits do not last.\n{}",
        serde_yaml::to_string(node).context("serializing the Node object")?
    );
    if std::fs::read(&path).ok().as_deref() == Some(yaml.as_bytes()) {
        return Ok(());
    }
    // Atomic: other agents read the whole new object or the old one, never a part.
    fsutil::atomic_write(&path, yaml.as_bytes())?;
    info!(file = %path.display(), "published this node's Node object");
    Ok(())
}

/// The file a node's own `Node` object lives in.
pub fn node_file_name(node: &str) -> String {
    format!("node-{node}.yaml")
}

impl Scanner {
    /// The files the events concern; `None` for all of them (the kernel's event queue
    /// overflowed, or a `ConfigMap` volume swapped its data). Whether a writer is still busy
    /// is asked of the kernel when the file is read ([`open_for_writing`]), not guessed from
    /// the order of events.
    fn note_events<'a>(
        events: impl Iterator<Item = &'a notify::Event>,
    ) -> Option<BTreeSet<String>> {
        let mut dirty = BTreeSet::new();
        for event in events {
            if event.need_rescan() {
                return None;
            }
            // Our own reads raise these; they change nothing.
            if matches!(
                event.kind,
                EventKind::Access(AccessKind::Open(_) | AccessKind::Close(AccessMode::Read))
            ) {
                continue;
            }
            for path in &event.paths {
                // A Kubernetes ConfigMap volume swaps its `..data` symlink: read everything.
                if path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(".."))
                {
                    return None;
                }
                if let Some(name) = object_file_name(path) {
                    dirty.insert(name);
                }
            }
        }
        Some(dirty)
    }

    /// Read the directory (all files, or only `dirty` ones) and return what changed, and
    /// whether anything (objects or rejections) did.
    fn scan(&mut self, dirty: Option<&BTreeSet<String>>) -> (SourceBatch, bool) {
        let present = match self.list() {
            Ok(names) => names,
            Err(e) => {
                // Keep what we have: a transient error must not drop every policy.
                warn!("{e:#}");
                return self.diff();
            }
        };
        let gone: Vec<String> = self
            .files
            .keys()
            .filter(|n| !present.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            info!(file = %name, "removed: its objects are deleted");
            self.files.remove(&name);
            self.order.remove(&name);
            std::fs::remove_file(self.last_good_dir.join(&name)).ok();
        }
        let wanted: Vec<&String> = present
            .iter()
            .filter(|n| {
                dirty.is_none_or(|d| d.contains(*n))
                    || !self.files.contains_key(*n)
                    || self.files.get(*n).is_some_and(|f| f.writing)
            })
            .collect();
        // Files some process still has open for writing keep their last good content until
        // it closes them (the close is an event, which brings us back).
        let busy = if wanted.is_empty() {
            BTreeSet::new()
        } else {
            open_for_writing(&self.dir)
        };
        for name in &present {
            if !self.order.contains_key(name) {
                self.order.insert(name.clone(), self.next_seq);
                self.next_seq += 1;
            }
        }
        for name in wanted {
            if busy.contains(name) {
                debug!(file = %name, "open for writing: read once it is closed");
                if let Some(state) = self.files.get_mut(name) {
                    state.writing = true;
                } else {
                    self.files.insert(
                        name.clone(),
                        FileState {
                            fingerprint: None,
                            current: Ok(Vec::new()),
                            duplicate: None,
                            good: self.read_last_good(name),
                            writing: true,
                        },
                    );
                }
                continue;
            }
            self.read(name);
        }
        self.resolve();
        if let Err(e) = fsutil::write_json(
            &self.last_good_dir.join(INDEX_FILE),
            &Index {
                order: self.order.clone(),
            },
        ) {
            warn!("keeping the source's file order: {e}");
        }
        self.diff()
    }

    fn list(&self) -> anyhow::Result<BTreeSet<String>> {
        let mut names = BTreeSet::new();
        for entry in std::fs::read_dir(&self.dir)
            .with_context(|| format!("reading {}", self.dir.display()))?
        {
            let entry = entry?;
            // `is_file` follows symlinks (a ConfigMap volume's files are symlinks).
            if let Some(name) = object_file_name(&entry.path())
                && entry.path().is_file()
            {
                names.insert(name);
            }
        }
        Ok(names)
    }

    /// Read one file into its state (its last good objects come from the state directory
    /// the first time).
    fn read(&mut self, name: &str) {
        let path = self.dir.join(name);
        let text = match fsutil::read_capped(&path, MAX_FILE_BYTES) {
            Ok(Some(bytes)) => String::from_utf8(bytes).map_err(|_| {
                "is not UTF-8 text (a binary file?): rejected without being parsed".to_owned()
            }),
            Ok(None) => Err(format!(
                "is larger than {} KiB: rejected without being read (split it into several files)",
                MAX_FILE_BYTES / 1024
            )),
            // Renamed away between listing and reading: the next event handles it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => Err(format!("cannot be read: {e}")),
        };
        let fingerprint = text.as_ref().ok().map(|t| (hash(t), t.len()));
        let known = self.files.get(name);
        if fingerprint.is_some() && known.is_some_and(|f| f.fingerprint == fingerprint) {
            return;
        }
        let good = match known {
            Some(state) => state.good.clone(),
            None => self.read_last_good(name),
        };
        let current = match &text {
            Err(problem) => Err(vec![file_rejection(name, problem)]),
            Ok(text) => match parse_documents(name, text) {
                Ok(objects) if objects.is_empty() => Err(vec![file_rejection(
                    name,
                    "holds no object: rejected (delete the file to remove its objects)",
                )]),
                Ok(objects) => Ok(objects),
                Err(e) => Err(rejections(&e)),
            },
        };
        if current.is_ok()
            && let Ok(text) = &text
        {
            // The good copy is saved once it is accepted (see `resolve`); keep the text
            // only until then.
            self.pending_good.insert(name.to_owned(), text.clone());
        }
        match &current {
            Ok(objects) => debug!(file = name, objects = objects.len(), "read"),
            Err(problems) => {
                for p in problems {
                    warn!("{}", p.message);
                }
            }
        }
        self.files.insert(
            name.to_owned(),
            FileState {
                fingerprint,
                current,
                duplicate: None,
                good,
                writing: false,
            },
        );
    }

    fn read_last_good(&self, name: &str) -> Vec<Object> {
        std::fs::read_to_string(self.last_good_dir.join(name))
            .ok()
            .and_then(|text| parse_documents(name, &text).ok())
            .unwrap_or_default()
    }

    /// Decide, in first-seen order, which file's content is in force: a file whose objects
    /// collide with an earlier file's is rejected whole and keeps its last good content.
    fn resolve(&mut self) {
        let mut names: Vec<String> = self.files.keys().cloned().collect();
        names.sort_by_key(|n| (self.order.get(n).copied().unwrap_or(u64::MAX), n.clone()));
        let mut claimed: HashMap<String, String> = HashMap::new();
        for name in names {
            let Some(state) = self.files.get_mut(&name) else {
                continue;
            };
            if let Ok(objects) = &state.current {
                let clash = objects.iter().find_map(|o| {
                    let key = o.describe();
                    claimed.get(&key).map(|owner| (key, owner.clone()))
                });
                if let Some((key, owner)) = clash {
                    let message = format!(
                        "{name}: {key}: already defined in {owner}, which keeps it: {name} \
                         is rejected (rename the object or remove one of the copies)"
                    );
                    if state.duplicate.is_none() {
                        warn!("{message}");
                    }
                    state.duplicate = Some(Rejection {
                        origin: name.clone(),
                        object: Some(key),
                        field: Some("metadata.name".to_owned()),
                        reason: format!("already defined in {owner}"),
                        message,
                    });
                } else {
                    state.duplicate = None;
                    if state.good != *objects {
                        info!(file = %name, objects = objects.len(), "in force");
                        state.good.clone_from(objects);
                    }
                    if let Some(text) = self.pending_good.remove(&name)
                        && let Err(e) =
                            fsutil::atomic_write(&self.last_good_dir.join(&name), text.as_bytes())
                    {
                        warn!(file = %name, "cannot keep the last good copy: {e}");
                    }
                }
            }
            self.pending_good.remove(&name);
            let state = &self.files[&name];
            for object in &state.good {
                claimed
                    .entry(object.describe())
                    .or_insert_with(|| name.clone());
            }
        }
    }

    /// What changed since the last batch, and whether anything did.
    fn diff(&mut self) -> (SourceBatch, bool) {
        let mut now: BTreeMap<String, Sourced> = BTreeMap::new();
        let mut rejected = Vec::new();
        let mut names: Vec<&String> = self.files.keys().collect();
        names.sort_by_key(|n| {
            (
                self.order.get(*n).copied().unwrap_or(u64::MAX),
                (*n).clone(),
            )
        });
        for name in names {
            let state = &self.files[name];
            let problems: Vec<&Rejection> = match &state.current {
                Err(problems) => problems.iter().collect(),
                Ok(_) => state.duplicate.iter().collect(),
            };
            {
                let kept = state.good.len();
                for p in problems {
                    let mut p = p.clone();
                    p.message = format!(
                        "{} (rejected; {name} keeps its last good content: {kept} object(s))",
                        p.message
                    );
                    rejected.push(p);
                }
            }
            for object in &state.good {
                let sourced = Sourced {
                    origin: name.clone(),
                    object: object.clone(),
                };
                // The earlier file keeps an object both define (see `resolve`).
                now.entry(sourced.key()).or_insert(sourced);
            }
        }
        let upserts: Vec<Sourced> = now
            .iter()
            .filter(|(k, v)| self.emitted.get(*k) != Some(*v))
            .map(|(_, v)| v.clone())
            .collect();
        let deletes: Vec<String> = self
            .emitted
            .keys()
            .filter(|k| !now.contains_key(*k))
            .cloned()
            .collect();
        self.emitted = now;
        let rejections_changed = self.emitted_rejections != rejected;
        let changed = !upserts.is_empty() || !deletes.is_empty() || rejections_changed;
        self.emitted_rejections.clone_from(&rejected);
        let batch = SourceBatch {
            upserts,
            deletes,
            rejected: rejections_changed.then_some(rejected),
        };
        // The controller takes the outbox under the same lock: nothing falls in between.
        self.outbox.merge(batch.clone());
        (batch, changed)
    }
}

/// Names of the files in `dir` that some other process has open for writing, from
/// `/proc/<pid>/fd` and the access mode in `/proc/<pid>/fdinfo`.
fn open_for_writing(dir: &Path) -> BTreeSet<String> {
    let mut busy = BTreeSet::new();
    // The links in /proc are canonical paths.
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    let dir = dir.as_path();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return busy;
    };
    for proc in procs.flatten() {
        let pid = proc.file_name();
        if !pid.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(proc.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if target.parent() != Some(dir) {
                continue;
            }
            let Some(name) = object_file_name(&target) else {
                continue;
            };
            let info = proc.path().join("fdinfo").join(fd.file_name());
            let writable = std::fs::read_to_string(info).is_ok_and(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                    // O_ACCMODE: 1 = O_WRONLY, 2 = O_RDWR.
                    .is_some_and(|flags| flags & 3 != 0)
            });
            if writable {
                busy.insert(name);
            }
        }
    }
    busy
}

/// The object file name of `path`, or `None` for what the source ignores (hidden files,
/// temporary files, other extensions).
fn object_file_name(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?.to_owned();
    let is_object_file = [".yaml", ".yml", ".json"]
        .iter()
        .any(|ext| name.ends_with(ext));
    (!name.starts_with('.') && is_object_file).then_some(name)
}

fn hash(text: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

fn file_rejection(name: &str, problem: &str) -> Rejection {
    Rejection {
        origin: name.to_owned(),
        object: None,
        field: None,
        reason: problem.to_owned(),
        message: format!("{name}: {problem}"),
    }
}

/// One rejection per problem of a file.
fn rejections(error: &ParseError) -> Vec<Rejection> {
    error
        .problems
        .iter()
        .map(|p| {
            let field = (!p.problem.field.is_empty()).then(|| p.problem.field.clone());
            let mut reason = p.problem.message.clone();
            if let Some(hint) = &p.problem.hint {
                reason = format!("{reason} (hint: {hint})");
            }
            let message = match &p.object {
                Some(o) => format!("{}: {o}: {}", error.file, p.problem),
                None => format!("{}: {}", error.file, p.problem),
            };
            Rejection {
                origin: error.file.clone(),
                object: p.object.clone(),
                field,
                reason,
                message,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
