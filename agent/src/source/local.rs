//! The local source: a directory of YAML files holding the same objects as the Kubernetes
//! CRDs, plus `Endpoint`, `Node` and `Namespace` objects. Watched with inotify; a change is
//! picked up within milliseconds.
//!
//! A file that fails to parse or validate is rejected as a whole, with a message naming the
//! file, object and field; the objects it held before (its last good content) stay in force.
//! Last good contents are kept in the state directory too, so a restarted agent facing a
//! broken file keeps enforcing what the file said before it broke.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Context;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{info, warn};
use weft_policy::Object;

use super::{Snapshot, Source, Sourced};

pub struct LocalSource {
    dir: PathBuf,
    last_good_dir: PathBuf,
    /// file name -> (text last read, objects of its last good text, rejection of the text)
    files: BTreeMap<String, FileState>,
    _watcher: Option<notify::RecommendedWatcher>,
}

struct FileState {
    text: String,
    good: Vec<Object>,
    rejection: Option<String>,
}

impl LocalSource {
    /// `state_dir` keeps last good file contents across restarts.
    pub fn new(dir: &Path, state_dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let last_good_dir = state_dir.join("last-good");
        std::fs::create_dir_all(&last_good_dir)
            .with_context(|| format!("creating {}", last_good_dir.display()))?;
        Ok(Self {
            dir: dir.to_owned(),
            last_good_dir,
            files: BTreeMap::new(),
            _watcher: None,
        })
    }

    /// Send a unit on `changed` whenever something in the directory changes.
    pub fn watch(&mut self, changed: mpsc::Sender<()>) -> anyhow::Result<()> {
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Only changes: our own reads of the directory raise access events too.
                if event.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
                    // A full channel already means "re-read".
                    let _ = changed.try_send(());
                }
            })
            .context("creating the directory watcher")?;
        watcher
            .watch(&self.dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", self.dir.display()))?;
        self._watcher = Some(watcher);
        Ok(())
    }

    fn object_files(&self) -> anyhow::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)
            .with_context(|| format!("reading {}", self.dir.display()))?
        {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_object_file = [".yaml", ".yml", ".json"]
                .iter()
                .any(|ext| name.ends_with(ext));
            if !name.starts_with('.') && is_object_file && entry.path().is_file() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    fn read_file(&mut self, name: &str) {
        let path = self.dir.join(name);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            // Renamed away between listing and reading: the next event handles it.
            Err(e) => {
                warn!(file = name, "cannot read: {e}");
                return;
            }
        };
        if self.files.get(name).is_some_and(|f| f.text == text) {
            return;
        }
        let previous_good = match self.files.remove(name) {
            Some(state) => Some(state.good),
            None => self.read_last_good(name),
        };
        let state = match weft_policy::parse_documents(name, &text) {
            Ok(objects) => {
                if let Err(e) = std::fs::write(self.last_good_dir.join(name), &text) {
                    warn!(file = name, "cannot keep last good copy: {e}");
                }
                info!(file = name, objects = objects.len(), "read");
                FileState {
                    text,
                    good: objects,
                    rejection: None,
                }
            }
            Err(e) => {
                let kept = previous_good.unwrap_or_default();
                let message = format!(
                    "{e} (rejected; {} keeps its last good content: {} object(s))",
                    name,
                    kept.len()
                );
                warn!("{message}");
                FileState {
                    text,
                    good: kept,
                    rejection: Some(message),
                }
            }
        };
        self.files.insert(name.to_owned(), state);
    }

    fn read_last_good(&self, name: &str) -> Option<Vec<Object>> {
        let text = std::fs::read_to_string(self.last_good_dir.join(name)).ok()?;
        weft_policy::parse_documents(name, &text).ok()
    }
}

impl Source for LocalSource {
    fn describe(&self) -> String {
        format!("local:{}", self.dir.display())
    }

    fn snapshot(&mut self) -> Snapshot {
        let names = match self.object_files() {
            Ok(names) => names,
            Err(e) => {
                // Keep what we have: a transient error must not drop every policy.
                warn!("{e:#}");
                self.files.keys().cloned().collect()
            }
        };
        let present: BTreeSet<&String> = names.iter().collect();
        let gone: Vec<String> = self
            .files
            .keys()
            .filter(|n| !present.contains(n))
            .cloned()
            .collect();
        for name in gone {
            self.files.remove(&name);
            std::fs::remove_file(self.last_good_dir.join(&name)).ok();
        }
        for name in &names {
            self.read_file(name);
        }

        let mut snapshot = Snapshot::default();
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        for (name, state) in &self.files {
            if let Some(rejection) = &state.rejection {
                snapshot.rejected.push(rejection.clone());
            }
            for object in &state.good {
                let key = object.describe();
                if let Some(first) = seen.get(&key) {
                    snapshot.rejected.push(format!(
                        "{name}: {key}: already defined in {first}; this copy is ignored"
                    ));
                    continue;
                }
                seen.insert(key, name.clone());
                snapshot.objects.push(Sourced {
                    origin: name.clone(),
                    object: object.clone(),
                });
            }
        }
        snapshot
    }
}
