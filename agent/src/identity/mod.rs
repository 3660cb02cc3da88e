//! Identity allocation behind one interface, [`IdentityBackend`]: pod identities are
//! cluster-wide (one label set, one id, on every node), CIDR identities are node-local (as in
//! Cilium). Freed ids wait out a grace period before another key can take them
//! ([`table`]).
//!
//! Backends: [`LocalBackend`] for the local source — a table in the source directory that
//! every agent using that directory shares, under an exclusive file lock — and, later, one
//! for Kubernetes (`WeftIdentity` objects). The controller calls the backend only when the
//! set of needed keys changes.

pub mod table;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use tracing::{debug, info};
use weft_policy::Labels;
use weft_policy::identity::{FIRST_CIDR_IDENTITY, FIRST_POD_IDENTITY};

use crate::fsutil::{self, DirLock, FsError};
use table::{SyncOutcome, SyncResult, Table, TableError};

/// Identities the current inputs need, and the ids they got.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allocated {
    pub pods: BTreeMap<Labels, u32>,
    pub cidrs: BTreeMap<IpNet, u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{0}")]
    Table(#[from] TableError),
    #[error("{0}")]
    Fs(#[from] FsError),
}

/// Where identities come from.
pub trait IdentityBackend: Send {
    /// For `weft status`.
    fn describe(&self) -> String;

    /// Make this node hold exactly the `pods` label sets and `cidrs` prefixes; returns their
    /// ids. On error, what could be allocated is returned with the error.
    fn sync(
        &mut self,
        pods: &BTreeSet<Labels>,
        cidrs: &BTreeSet<IpNet>,
    ) -> (Allocated, Option<IdentityError>);
}

/// The local source's backend. Pod identities live in `<source dir>/.weft/identities.json`,
/// which every agent reading that directory shares: each takes an exclusive lock on
/// `identities.lock` next to it, reads the table, syncs its needs, and writes it back
/// atomically. CIDR identities live in the node's state directory.
pub struct LocalBackend {
    node: String,
    dir: PathBuf,
    cidr_file: PathBuf,
    grace: Duration,
    last: Option<(BTreeSet<Labels>, BTreeSet<IpNet>, Allocated)>,
}

const SHARED_DIR: &str = ".weft";
const POD_TABLE: &str = "identities.json";
const POD_TABLE_LOCK: &str = "identities.lock";
const CIDR_TABLE: &str = "cidr-identities.json";

impl LocalBackend {
    /// # Errors
    /// When the shared directory cannot be created.
    pub fn new(
        node: &str,
        source_dir: &Path,
        state_dir: &Path,
        grace: Duration,
    ) -> Result<Self, IdentityError> {
        let dir = source_dir.join(SHARED_DIR);
        fsutil::private_dir(&dir)?;
        Ok(Self {
            node: node.to_owned(),
            dir,
            cidr_file: state_dir.join(CIDR_TABLE),
            grace,
            last: None,
        })
    }

    fn sync_pods(&self, needed: &BTreeSet<Labels>) -> Result<BTreeMap<Labels, u32>, IdentityError> {
        // Held while reading, syncing and writing: agents never interleave their updates.
        let _lock = WaitingLock::acquire(&self.dir, POD_TABLE_LOCK)?;
        let path = self.dir.join(POD_TABLE);
        let mut table: Table<Labels> = fsutil::read_json(&path)?.unwrap_or_default();
        table.validate(FIRST_POD_IDENTITY, FIRST_CIDR_IDENTITY)?;
        let result = table.sync(
            &self.node,
            needed,
            now_ms(),
            millis(self.grace),
            (FIRST_POD_IDENTITY, FIRST_CIDR_IDENTITY),
        );
        let (ids, outcome, error) = split(result);
        if outcome.changed {
            fsutil::write_json(&path, &table)?;
            log_outcome("pod", &outcome);
        }
        match error {
            None => Ok(ids),
            Some(e) => Err(e.into()),
        }
    }

    fn sync_cidrs(&self, needed: &BTreeSet<IpNet>) -> Result<BTreeMap<IpNet, u32>, IdentityError> {
        let mut table: Table<IpNet> = fsutil::read_json(&self.cidr_file)?.unwrap_or_default();
        table.validate(FIRST_CIDR_IDENTITY, u32::MAX)?;
        let result = table.sync(
            &self.node,
            needed,
            now_ms(),
            millis(self.grace),
            (FIRST_CIDR_IDENTITY, u32::MAX),
        );
        let (ids, outcome, error) = split(result);
        if outcome.changed {
            fsutil::write_json(&self.cidr_file, &table)?;
            log_outcome("CIDR", &outcome);
        }
        match error {
            None => Ok(ids),
            Some(e) => Err(e.into()),
        }
    }
}

impl IdentityBackend for LocalBackend {
    fn describe(&self) -> String {
        format!("local:{}", self.dir.join(POD_TABLE).display())
    }

    fn sync(
        &mut self,
        pods: &BTreeSet<Labels>,
        cidrs: &BTreeSet<IpNet>,
    ) -> (Allocated, Option<IdentityError>) {
        if let Some((p, c, allocated)) = &self.last
            && p == pods
            && c == cidrs
        {
            return (allocated.clone(), None);
        }
        let mut allocated = Allocated::default();
        let mut error = None;
        match self.sync_pods(pods) {
            Ok(ids) => allocated.pods = ids,
            Err(e) => error = Some(e),
        }
        match self.sync_cidrs(cidrs) {
            Ok(ids) => allocated.cidrs = ids,
            Err(e) => error = error.or(Some(e)),
        }
        if error.is_none() {
            self.last = Some((pods.clone(), cidrs.clone(), allocated.clone()));
        }
        (allocated, error)
    }
}

fn split<K>(result: SyncResult<K>) -> (BTreeMap<K, u32>, SyncOutcome, Option<TableError>) {
    match result {
        Ok((ids, outcome)) => (ids, outcome, None),
        // Part of the keys fit: the table changed for them.
        Err((ids, e)) => (
            ids,
            SyncOutcome {
                changed: true,
                ..SyncOutcome::default()
            },
            Some(e),
        ),
    }
}

fn log_outcome(kind: &str, outcome: &SyncOutcome) {
    if outcome.allocated.is_empty() && outcome.released.is_empty() && outcome.freed.is_empty() {
        debug!(kind, "identity table refreshed");
    } else {
        info!(
            kind,
            allocated = ?outcome.allocated,
            released = ?outcome.released,
            freed = ?outcome.freed,
            "identities updated"
        );
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The shared table's lock: other agents hold it for milliseconds, so wait for it (bounded).
struct WaitingLock;

impl WaitingLock {
    fn acquire(dir: &Path, name: &str) -> Result<DirLock, FsError> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match DirLock::acquire(dir, name) {
                Err(FsError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(app: &str) -> Labels {
        Labels::from([("app".to_owned(), app.to_owned())])
    }

    #[test]
    fn two_agents_sharing_a_source_dir_agree_on_pod_identities() {
        let root = std::env::temp_dir().join(format!("weft-ids-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let source = root.join("source");
        let (s1, s2) = (root.join("s1"), root.join("s2"));
        for d in [&source, &s1, &s2] {
            fsutil::private_dir(d).expect("dir");
        }
        let grace = Duration::from_mins(10);
        let mut n1 = LocalBackend::new("n1", &source, &s1, grace).expect("n1");
        let mut n2 = LocalBackend::new("n2", &source, &s2, grace).expect("n2");
        let cidr: IpNet = "10.0.0.0/8".parse().expect("cidr");
        let (a, e) = n1.sync(
            &BTreeSet::from([labels("web"), labels("db")]),
            &BTreeSet::from([cidr]),
        );
        assert!(e.is_none(), "{e:?}");
        let (b, e) = n2.sync(&BTreeSet::from([labels("db")]), &BTreeSet::new());
        assert!(e.is_none(), "{e:?}");
        assert_eq!(a.pods[&labels("db")], b.pods[&labels("db")]);
        assert!(a.cidrs[&cidr] >= FIRST_CIDR_IDENTITY);
        let mode = |p: &Path| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
        };
        assert_eq!(mode(&source.join(SHARED_DIR)), 0o700);
        assert_eq!(mode(&source.join(SHARED_DIR).join(POD_TABLE)), 0o600);
        std::fs::remove_dir_all(&root).expect("cleanup");
    }
}
