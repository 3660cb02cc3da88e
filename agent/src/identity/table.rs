//! The identity table, pure: which key (a security label set, a CIDR prefix) has which id,
//! which nodes hold it, and when it was released. Shared by every agent of a cluster through
//! a backend ([`super::local`]); no I/O and no clock here (the caller passes the time).
//!
//! Ids are never handed to another key while anyone may still mean the old one: a key that no
//! node needs any more is released, and its id waits out a grace period before another key
//! can take it (conntrack entries, remote nodes' ipcaches and the auth map refer to ids).
//! A key that comes back within the grace period gets its old id again.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("no free identity in {first}..{end}: too many distinct label sets or prefixes")]
    Exhausted { first: u32, end: u32 },
    #[error("identity table is corrupt: id {id} is outside {first}..{end}")]
    OutOfRange { id: u32, first: u32, end: u32 },
    #[error("identity table is corrupt: ids {a} and {b} have the same key")]
    Duplicate { a: u32, b: u32 },
}

/// One id of the table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry<K> {
    pub key: K,
    /// Nodes that need this id now.
    #[serde(default)]
    pub holders: BTreeSet<String>,
    /// When the last holder let go (ms since the epoch); `None` while held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_at_ms: Option<u64>,
}

/// The table as it is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(
    serialize = "K: Serialize",
    deserialize = "K: Deserialize<'de> + Ord + Clone"
))]
pub struct Table<K> {
    pub ids: BTreeMap<u32, Entry<K>>,
}

impl<K> Default for Table<K> {
    fn default() -> Self {
        Self {
            ids: BTreeMap::new(),
        }
    }
}

/// What [`Table::sync`] returns: every needed key's id and what changed; on error, the ids
/// that could be allocated and why the rest could not.
pub type SyncResult<K> = Result<(BTreeMap<K, u32>, SyncOutcome), (BTreeMap<K, u32>, TableError)>;

/// What a [`Table::sync`] changed, for logs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncOutcome {
    pub allocated: Vec<u32>,
    pub released: Vec<u32>,
    /// Ids whose grace period ended: free for new keys.
    pub freed: Vec<u32>,
    /// Whether anything changed (the backend writes the table back only then).
    pub changed: bool,
}

impl<K: Ord + Clone> Table<K> {
    /// Check the invariants of a table read from disk.
    ///
    /// # Errors
    /// An id outside `first..end` or two ids for one key.
    pub fn validate(&self, first: u32, end: u32) -> Result<(), TableError> {
        let mut seen: BTreeMap<&K, u32> = BTreeMap::new();
        for (id, entry) in &self.ids {
            if !(first..end).contains(id) {
                return Err(TableError::OutOfRange {
                    id: *id,
                    first,
                    end,
                });
            }
            if let Some(a) = seen.insert(&entry.key, *id) {
                return Err(TableError::Duplicate { a, b: *id });
            }
        }
        Ok(())
    }

    /// Make `node` hold exactly the keys in `needed`: allocate ids for new keys (the
    /// smallest id in `first..end` that no entry, held or in its grace period, has), release
    /// what `node` no longer needs, and free ids whose grace period ended. Returns every
    /// needed key's id.
    ///
    /// # Errors
    /// [`TableError::Exhausted`] when no id is free; nothing is changed for the keys that
    /// did not fit, the others keep theirs.
    pub fn sync(
        &mut self,
        node: &str,
        needed: &BTreeSet<K>,
        now_ms: u64,
        grace_ms: u64,
        (first, end): (u32, u32),
    ) -> SyncResult<K> {
        let mut outcome = SyncOutcome::default();
        let mut by_key: BTreeMap<K, u32> = self
            .ids
            .iter()
            .map(|(id, e)| (e.key.clone(), *id))
            .collect();
        // Let go of what this node no longer needs.
        for (id, entry) in &mut self.ids {
            if !needed.contains(&entry.key) && entry.holders.remove(node) {
                outcome.changed = true;
                if entry.holders.is_empty() {
                    entry.released_at_ms = Some(now_ms);
                    outcome.released.push(*id);
                }
            }
        }
        // Free ids whose grace period is over.
        let expired: Vec<u32> = self
            .ids
            .iter()
            .filter(|(_, e)| {
                e.holders.is_empty()
                    && e.released_at_ms
                        .is_none_or(|at| now_ms.saturating_sub(at) >= grace_ms)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(entry) = self.ids.remove(&id) {
                by_key.remove(&entry.key);
                outcome.freed.push(id);
                outcome.changed = true;
            }
        }
        // Hold (or allocate) every needed key.
        let mut out = BTreeMap::new();
        let mut error = None;
        for key in needed {
            let id = match by_key.get(key) {
                Some(id) => *id,
                None => {
                    if let Some(id) = self.smallest_free(first, end) {
                        self.ids.insert(
                            id,
                            Entry {
                                key: key.clone(),
                                holders: BTreeSet::new(),
                                released_at_ms: None,
                            },
                        );
                        by_key.insert(key.clone(), id);
                        outcome.allocated.push(id);
                        id
                    } else {
                        error = Some(TableError::Exhausted { first, end });
                        continue;
                    }
                }
            };
            if let Some(entry) = self.ids.get_mut(&id) {
                if entry.holders.insert(node.to_owned()) {
                    outcome.changed = true;
                }
                if entry.released_at_ms.take().is_some() {
                    outcome.changed = true;
                }
            }
            out.insert(key.clone(), id);
        }
        match error {
            None => Ok((out, outcome)),
            Some(e) => Err((out, e)),
        }
    }

    fn smallest_free(&self, first: u32, end: u32) -> Option<u32> {
        // Ids are kept sorted: the first gap is the smallest free id.
        let mut candidate = first;
        for id in self.ids.keys().filter(|id| **id >= first) {
            if *id != candidate {
                break;
            }
            candidate += 1;
        }
        (candidate < end).then_some(candidate)
    }

    /// The key of `id`, held or in its grace period.
    pub fn key(&self, id: u32) -> Option<&K> {
        self.ids.get(&id).map(|e| &e.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RANGE: (u32, u32) = (256, 260);
    const GRACE: u64 = 60_000;

    fn set(keys: &[&str]) -> BTreeSet<String> {
        keys.iter().map(|k| (*k).to_owned()).collect()
    }

    #[test]
    fn equal_keys_get_one_id_on_every_node() {
        let mut t = Table::default();
        let (a, _) = t
            .sync("n1", &set(&["web", "db"]), 0, GRACE, RANGE)
            .expect("n1");
        let (b, _) = t
            .sync("n2", &set(&["db", "api"]), 0, GRACE, RANGE)
            .expect("n2");
        assert_eq!(a["db"], b["db"]);
        assert_ne!(a["web"], b["api"]);
        assert_eq!(t.ids[&a["db"]].holders, set(&["n1", "n2"]));
    }

    #[test]
    fn a_released_id_waits_out_its_grace_period() {
        let mut t = Table::default();
        let (ids, _) = t.sync("n1", &set(&["web"]), 0, GRACE, RANGE).expect("sync");
        let web = ids["web"];
        let (_, out) = t
            .sync("n1", &set(&[]), 1000, GRACE, RANGE)
            .expect("release");
        assert_eq!(out.released, vec![web]);
        // Within the grace period the id is not given to another key ...
        let (ids, _) = t.sync("n1", &set(&["db"]), 2000, GRACE, RANGE).expect("db");
        assert_ne!(ids["db"], web);
        // ... and the key that comes back gets it again.
        let (ids, _) = t
            .sync("n1", &set(&["db", "web"]), 3000, GRACE, RANGE)
            .expect("back");
        assert_eq!(ids["web"], web);
        // Once the grace period is over, the id is free.
        t.sync("n1", &set(&["db"]), 4000, GRACE, RANGE)
            .expect("release again");
        let (_, out) = t
            .sync("n1", &set(&["db"]), 4000 + GRACE, GRACE, RANGE)
            .expect("expire");
        assert_eq!(out.freed, vec![web]);
        let (ids, _) = t
            .sync("n1", &set(&["db", "api"]), 4001 + GRACE, GRACE, RANGE)
            .expect("reuse");
        assert_eq!(
            ids["api"], web,
            "the smallest free id is reused after the grace"
        );
    }

    #[test]
    fn another_holder_keeps_an_id_alive() {
        let mut t = Table::default();
        t.sync("n1", &set(&["web"]), 0, GRACE, RANGE).expect("n1");
        t.sync("n2", &set(&["web"]), 0, GRACE, RANGE).expect("n2");
        let (_, out) = t
            .sync("n1", &set(&[]), 10, GRACE, RANGE)
            .expect("n1 lets go");
        assert!(out.released.is_empty(), "n2 still holds it");
        let (_, out) = t
            .sync("n1", &set(&[]), 10 + GRACE, GRACE, RANGE)
            .expect("later");
        assert!(out.freed.is_empty());
    }

    #[test]
    fn exhaustion_is_an_error_and_keeps_what_fits() {
        let mut t = Table::default();
        let keys = set(&["a", "b", "c", "d", "e"]);
        let (ids, err) = t
            .sync("n1", &keys, 0, GRACE, RANGE)
            .expect_err("only four ids in range");
        assert_eq!(ids.len(), 4);
        assert_eq!(
            err,
            TableError::Exhausted {
                first: 256,
                end: 260
            }
        );
    }

    #[test]
    fn validation_catches_corrupt_tables() {
        let mut t: Table<String> = Table::default();
        t.sync("n1", &set(&["a"]), 0, GRACE, RANGE).expect("sync");
        assert_eq!(t.validate(256, 260), Ok(()));
        let entry = t.ids[&256].clone();
        t.ids.insert(257, entry);
        assert_eq!(
            t.validate(256, 260),
            Err(TableError::Duplicate { a: 256, b: 257 })
        );
        assert!(matches!(
            t.validate(300, 400),
            Err(TableError::OutOfRange { id: 256, .. })
        ));
    }
}
