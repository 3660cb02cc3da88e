//! Files the agent keeps: private directories (0700), state files written atomically (0600,
//! fsync, rename, fsync of the directory, so a crash leaves the old or the new file, never
//! half of one), and exclusive locks that make "one node, one agent" hold.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("parsing {}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{} is locked by another weft agent{holder}: one node, one agent (stop it first, or give \
         this agent its own node name and directories)",
        path.display()
    )]
    Locked { path: PathBuf, holder: String },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FsError + 'a {
    move |source| FsError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Create `dir` (and parents) and make it 0700: state and sockets are root's business only.
pub fn private_dir(dir: &Path) -> Result<(), FsError> {
    fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err("chmod", dir))
}

/// Write `bytes` to `path` atomically with mode 0600: a temporary file in the same
/// directory, fsync, rename over `path`, fsync of the directory.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("creating", &tmp))?;
        // An existing temporary file keeps its old mode: set it.
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_err("chmod", &tmp))?;
        file.write_all(bytes).map_err(io_err("writing", &tmp))?;
        file.sync_all().map_err(io_err("syncing", &tmp))?;
    }
    fs::rename(&tmp, path).map_err(io_err("renaming to", path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing", dir))
}

/// [`atomic_write`] of `value` as pretty JSON.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), FsError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|source| FsError::Json {
        path: path.to_owned(),
        source,
    })?;
    atomic_write(path, &bytes)
}

/// Read a JSON state file; `None` when it does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, FsError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| FsError::Json {
                path: path.to_owned(),
                source,
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("reading", path)(e)),
    }
}

/// An exclusive lock on a directory, held for the life of the value (and of the process:
/// the kernel drops it when the process dies, so a crashed agent never blocks a new one).
/// The lock file says who holds it, for the message a second agent prints.
pub struct DirLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl DirLock {
    /// Lock `dir` by an exclusive `flock` on `dir/<name>` without waiting.
    ///
    /// # Errors
    /// [`FsError::Locked`] when another process holds it.
    pub fn acquire(dir: &Path, name: &str) -> Result<Self, FsError> {
        let path = dir.join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("opening lock file", &path))?;
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(FsError::Locked {
                    path,
                    holder: if holder.is_empty() {
                        String::new()
                    } else {
                        format!(" ({holder})")
                    },
                });
            }
            Err((_, errno)) => {
                return Err(io_err("locking", &path)(io::Error::from(errno)));
            }
        };
        let me = format!("pid {}", std::process::id());
        lock.set_len(0).map_err(io_err("truncating", &path))?;
        (&*lock)
            .write_all(me.as_bytes())
            .map_err(io_err("writing", &path))?;
        Ok(Self { _lock: lock, path })
    }

    /// Lock the directory itself (for bpffs, which holds no regular files): an exclusive
    /// `flock` on the directory's own file descriptor.
    ///
    /// # Errors
    /// [`FsError::Locked`] when another process holds it.
    pub fn on_dir(dir: &Path) -> Result<Self, FsError> {
        let file = File::open(dir).map_err(io_err("opening", dir))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Self {
                _lock: lock,
                path: dir.to_owned(),
            }),
            Err((_, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => Err(FsError::Locked {
                path: dir.to_owned(),
                holder: String::new(),
            }),
            Err((_, errno)) => Err(io_err("locking", dir)(io::Error::from(errno))),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Read at most `cap` bytes of `path`: `Ok(None)` when the file is larger (nothing of it is
/// kept), so that outside input never costs more memory than the cap.
pub fn read_capped(path: &Path, cap: u64) -> io::Result<Option<Vec<u8>>> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    if len > cap {
        return Ok(None);
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    // The file may grow between the stat and the read: read one byte past the cap to see.
    file.take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Ok(None);
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weft-fsutil-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        private_dir(&dir).expect("scratch dir");
        dir
    }

    #[test]
    fn state_files_are_private_and_replaced_whole() {
        let dir = scratch("write");
        let mode = fs::metadata(&dir).expect("dir").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let file = dir.join("state.json");
        write_json(&file, &vec![1, 2, 3]).expect("write");
        write_json(&file, &vec![4]).expect("rewrite");
        let mode = fs::metadata(&file).expect("file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_json::<Vec<u32>>(&file).expect("read"), Some(vec![4]));
        assert_eq!(
            read_json::<Vec<u32>>(&dir.join("none")).expect("read"),
            None
        );
        let leftovers: Vec<_> = fs::read_dir(&dir).expect("list").collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_second_lock_is_refused_and_names_the_holder() {
        let dir = scratch("lock");
        let first = DirLock::acquire(&dir, "agent.lock").expect("first lock");
        match DirLock::acquire(&dir, "agent.lock") {
            Err(FsError::Locked { holder, .. }) => {
                assert_eq!(holder, format!(" (pid {})", std::process::id()));
            }
            other => panic!("second lock: {:?}", other.map(|l| l.path().to_owned())),
        }
        drop(first);
        DirLock::acquire(&dir, "agent.lock").expect("free again once released");
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn capped_reads_keep_nothing_of_a_large_file() {
        let dir = scratch("cap");
        let file = dir.join("big");
        fs::write(&file, vec![b'x'; 2048]).expect("write");
        assert_eq!(read_capped(&file, 1024).expect("read"), None);
        assert_eq!(
            read_capped(&file, 4096).expect("read").map(|b| b.len()),
            Some(2048)
        );
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
