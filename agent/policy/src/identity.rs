//! Numeric identities: the reserved ones, allocation of pod identities from security label
//! sets, and of CIDR identities from the prefixes that policies name.
//!
//! Allocators are pure state machines: the caller persists their [`snapshot`]s (so ids survive
//! agent restarts) and decides when to [`gc`]. Identities are never reused while referenced.
//!
//! [`snapshot`]: IdentityAllocator::snapshot
//! [`gc`]: IdentityAllocator::gc

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::labels::Labels;

/// The wildcard identity in policy keys: any peer.
pub const ANY: u32 = 0;
pub const HOST: u32 = 1;
pub const WORLD: u32 = 2;
pub const UNMANAGED: u32 = 3;
pub const HEALTH: u32 = 4;
pub const INIT: u32 = 5;
pub const REMOTE_NODE: u32 = 6;
pub const KUBE_APISERVER: u32 = 7;
/// First identity given to a pod label set.
pub const FIRST_POD_IDENTITY: u32 = 256;
/// First CIDR identity; pod identities stay below it.
pub const FIRST_CIDR_IDENTITY: u32 = 1 << 24;

/// Reserved identities, `(id, name)`.
pub const RESERVED: [(u32, &str); 7] = [
    (HOST, "host"),
    (WORLD, "world"),
    (UNMANAGED, "unmanaged"),
    (HEALTH, "health"),
    (INIT, "init"),
    (REMOTE_NODE, "remote-node"),
    (KUBE_APISERVER, "kube-apiserver"),
];

/// Name of a reserved identity (`host`, `world`, ...).
#[must_use]
pub fn reserved_name(id: u32) -> Option<&'static str> {
    RESERVED.iter().find(|(i, _)| *i == id).map(|(_, n)| *n)
}

/// Labels shown for a reserved identity: `reserved:<name>`.
#[must_use]
pub fn reserved_labels(id: u32) -> Option<Labels> {
    reserved_name(id).map(|n| Labels::from([(format!("reserved:{n}"), String::new())]))
}

/// Labels shown for a CIDR identity: `cidr:<prefix>` and `reserved:world`.
#[must_use]
pub fn cidr_labels(prefix: &IpNet) -> Labels {
    Labels::from([
        (format!("cidr:{prefix}"), String::new()),
        ("reserved:world".to_string(), String::new()),
    ])
}

#[must_use]
pub fn is_cidr_identity(id: u32) -> bool {
    id >= FIRST_CIDR_IDENTITY
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// No free identity is left in the range.
    #[error("no free identity in {first}..{end}: too many distinct label sets or prefixes")]
    Exhausted { first: u32, end: u32 },
    /// A persisted table holds an id outside the allocator's range.
    #[error("persisted identity {id} is outside {first}..{end}; the identity table is corrupt")]
    OutOfRange { id: u32, first: u32, end: u32 },
    /// A persisted table gives two ids to the same key.
    #[error("persisted identities {a} and {b} have the same labels; the identity table is corrupt")]
    Duplicate { a: u32, b: u32 },
}

/// Smallest-free-id allocator over `first..end`, keyed by `K`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Allocator<K: Ord + Clone> {
    first: u32,
    end: u32,
    by_key: BTreeMap<K, u32>,
    by_id: BTreeMap<u32, K>,
}

impl<K: Ord + Clone> Allocator<K> {
    fn new(first: u32, end: u32) -> Self {
        Allocator {
            first,
            end,
            by_key: BTreeMap::new(),
            by_id: BTreeMap::new(),
        }
    }

    fn seed(first: u32, end: u32, table: BTreeMap<u32, K>) -> Result<Self, IdentityError> {
        let mut a = Self::new(first, end);
        for (id, key) in table {
            if !(first..end).contains(&id) {
                return Err(IdentityError::OutOfRange { id, first, end });
            }
            if let Some(other) = a.by_key.insert(key.clone(), id) {
                return Err(IdentityError::Duplicate { a: other, b: id });
            }
            a.by_id.insert(id, key);
        }
        Ok(a)
    }

    fn allocate(&mut self, key: &K) -> Result<u32, IdentityError> {
        if let Some(id) = self.by_key.get(key) {
            return Ok(*id);
        }
        // Ids are kept sorted: the first gap is the smallest free id.
        let mut candidate = self.first;
        for id in self.by_id.keys() {
            if *id != candidate {
                break;
            }
            candidate += 1;
        }
        if candidate >= self.end {
            return Err(IdentityError::Exhausted {
                first: self.first,
                end: self.end,
            });
        }
        self.by_key.insert(key.clone(), candidate);
        self.by_id.insert(candidate, key.clone());
        Ok(candidate)
    }

    fn gc(&mut self, live: &BTreeSet<&K>) -> Vec<u32> {
        let dead: Vec<(u32, K)> = self
            .by_id
            .iter()
            .filter(|(_, k)| !live.contains(k))
            .map(|(id, k)| (*id, k.clone()))
            .collect();
        for (id, k) in &dead {
            self.by_id.remove(id);
            self.by_key.remove(k);
        }
        dead.into_iter().map(|(id, _)| id).collect()
    }
}

/// Pod identities: one id per distinct security label set, from [`FIRST_POD_IDENTITY`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityAllocator {
    inner: Allocator<Labels>,
}

impl Default for IdentityAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl IdentityAllocator {
    #[must_use]
    pub fn new() -> Self {
        IdentityAllocator {
            inner: Allocator::new(FIRST_POD_IDENTITY, FIRST_CIDR_IDENTITY),
        }
    }

    /// Restore from a table written by [`IdentityAllocator::snapshot`].
    ///
    /// # Errors
    /// Ids outside the pod range or two ids for one label set.
    pub fn from_snapshot(table: BTreeMap<u32, Labels>) -> Result<Self, IdentityError> {
        Ok(IdentityAllocator {
            inner: Allocator::seed(FIRST_POD_IDENTITY, FIRST_CIDR_IDENTITY, table)?,
        })
    }

    /// The identity of `labels`, allocating the smallest free one if the set is new.
    ///
    /// # Errors
    /// [`IdentityError::Exhausted`] when the pod range is full.
    pub fn allocate(&mut self, labels: &Labels) -> Result<u32, IdentityError> {
        self.inner.allocate(labels)
    }

    #[must_use]
    pub fn lookup(&self, labels: &Labels) -> Option<u32> {
        self.inner.by_key.get(labels).copied()
    }

    /// Labels of a pod identity (not reserved or CIDR ones; see [`display_labels`]).
    #[must_use]
    pub fn labels(&self, id: u32) -> Option<&Labels> {
        self.inner.by_id.get(&id)
    }

    /// Release every identity whose label set is not in `live`; returns the released ids.
    pub fn gc<'a>(&mut self, live: impl IntoIterator<Item = &'a Labels>) -> Vec<u32> {
        let live: BTreeSet<&Labels> = live.into_iter().collect();
        self.inner.gc(&live)
    }

    /// Every pod identity with its labels: the identity table `resolve` takes.
    #[must_use]
    pub fn pod_identities(&self) -> &BTreeMap<u32, Labels> {
        &self.inner.by_id
    }

    /// The table to persist (serde-serializable).
    #[must_use]
    pub fn snapshot(&self) -> BTreeMap<u32, Labels> {
        self.inner.by_id.clone()
    }
}

/// CIDR identities: one id per prefix named by a policy (`cidr` and `except` prefixes), from
/// [`FIRST_CIDR_IDENTITY`]. The caller writes `prefix -> id` into the ipcache, so the longest
/// prefix that a policy names decides the identity of an outside address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CidrIdentityAllocator {
    inner: Allocator<IpNet>,
}

impl Default for CidrIdentityAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl CidrIdentityAllocator {
    #[must_use]
    pub fn new() -> Self {
        CidrIdentityAllocator {
            inner: Allocator::new(FIRST_CIDR_IDENTITY, u32::MAX),
        }
    }

    /// Restore from a table written by [`CidrIdentityAllocator::snapshot`].
    ///
    /// # Errors
    /// Ids outside the CIDR range or two ids for one prefix.
    pub fn from_snapshot(table: BTreeMap<u32, IpNet>) -> Result<Self, IdentityError> {
        Ok(CidrIdentityAllocator {
            inner: Allocator::seed(FIRST_CIDR_IDENTITY, u32::MAX, table)?,
        })
    }

    /// Make the table hold exactly `prefixes` (plus nothing else): allocates new prefixes,
    /// releases prefixes no policy names any more. Returns the released ids.
    ///
    /// # Errors
    /// [`IdentityError::Exhausted`] when the CIDR range is full.
    pub fn sync<'a>(
        &mut self,
        prefixes: impl IntoIterator<Item = &'a IpNet>,
    ) -> Result<Vec<u32>, IdentityError> {
        let live: BTreeSet<&IpNet> = prefixes.into_iter().collect();
        let released = self.inner.gc(&live);
        for p in live {
            self.inner.allocate(&p.trunc())?;
        }
        Ok(released)
    }

    /// The identity of `prefix`, allocating if new.
    ///
    /// # Errors
    /// [`IdentityError::Exhausted`] when the CIDR range is full.
    pub fn allocate(&mut self, prefix: &IpNet) -> Result<u32, IdentityError> {
        self.inner.allocate(&prefix.trunc())
    }

    /// `prefix -> identity`, for the ipcache and for `resolve`.
    #[must_use]
    pub fn prefixes(&self) -> &BTreeMap<IpNet, u32> {
        &self.inner.by_key
    }

    #[must_use]
    pub fn prefix(&self, id: u32) -> Option<&IpNet> {
        self.inner.by_id.get(&id)
    }

    #[must_use]
    pub fn snapshot(&self) -> BTreeMap<u32, IpNet> {
        self.inner.by_id.clone()
    }
}

/// A serializable pair of persisted tables, for the agent's state file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedIdentities {
    #[serde(default)]
    pub pods: BTreeMap<u32, Labels>,
    #[serde(default)]
    pub cidrs: BTreeMap<u32, IpNet>,
}

/// Labels of any identity for display: reserved, CIDR (from `cidrs`) or pod (from `pods`).
pub fn display_labels(
    id: u32,
    pods: &IdentityAllocator,
    cidrs: &CidrIdentityAllocator,
) -> Option<Labels> {
    if id == ANY {
        return Some(Labels::from([("reserved:all".to_string(), String::new())]));
    }
    if let Some(l) = reserved_labels(id) {
        return Some(l);
    }
    if is_cidr_identity(id) {
        return cidrs.prefix(id).map(cidr_labels);
    }
    pods.labels(id).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn equal_label_sets_share_an_identity_and_ids_start_at_256() {
        let mut a = IdentityAllocator::new();
        let api = labels(&[("app", "api")]);
        let web = labels(&[("app", "web")]);
        assert_eq!(a.allocate(&api), Ok(256));
        assert_eq!(a.allocate(&web), Ok(257));
        assert_eq!(a.allocate(&api.clone()), Ok(256));
    }

    #[test]
    fn gc_releases_only_dead_sets_and_reuses_the_smallest_free_id() {
        let mut a = IdentityAllocator::new();
        let s: Vec<Labels> = (0..3).map(|i| labels(&[("n", &i.to_string())])).collect();
        for l in &s {
            a.allocate(l).expect("allocate");
        }
        assert_eq!(a.gc([&s[0], &s[2]]), vec![257]);
        assert_eq!(a.lookup(&s[0]), Some(256), "live ids are untouched");
        assert_eq!(a.allocate(&labels(&[("n", "new")])), Ok(257));
    }

    #[test]
    fn snapshot_round_trip_keeps_ids_stable() {
        let mut a = IdentityAllocator::new();
        a.allocate(&labels(&[("app", "a")])).expect("allocate");
        let b_id = a.allocate(&labels(&[("app", "b")])).expect("allocate");
        a.gc([&labels(&[("app", "b")])]);
        let persisted = PersistedIdentities {
            pods: a.snapshot(),
            cidrs: BTreeMap::new(),
        };
        let json = serde_json::to_string(&persisted).expect("serialize");
        let back: PersistedIdentities = serde_json::from_str(&json).expect("deserialize");
        let mut restored = IdentityAllocator::from_snapshot(back.pods).expect("seed");
        assert_eq!(restored.lookup(&labels(&[("app", "b")])), Some(b_id));
        assert_eq!(restored.allocate(&labels(&[("app", "c")])), Ok(256));
    }

    #[test]
    fn corrupt_snapshots_are_rejected() {
        let l = labels(&[("app", "a")]);
        assert!(matches!(
            IdentityAllocator::from_snapshot(BTreeMap::from([(5, l.clone())])),
            Err(IdentityError::OutOfRange { id: 5, .. })
        ));
        assert!(matches!(
            IdentityAllocator::from_snapshot(BTreeMap::from([(300, l.clone()), (301, l)])),
            Err(IdentityError::Duplicate { a: 300, b: 301 })
        ));
    }

    #[test]
    fn cidr_identities_have_their_own_range_and_sync() {
        let mut c = CidrIdentityAllocator::new();
        let p8: IpNet = "10.0.0.0/8".parse().expect("cidr");
        let p12: IpNet = "10.96.0.0/12".parse().expect("cidr");
        assert!(c.sync([&p8, &p12]).expect("sync").is_empty());
        assert_eq!(c.prefixes().get(&p8), Some(&FIRST_CIDR_IDENTITY));
        assert_eq!(c.sync([&p12]).expect("sync"), vec![FIRST_CIDR_IDENTITY]);
        assert_eq!(c.prefixes().get(&p12), Some(&(FIRST_CIDR_IDENTITY + 1)));
        let labels = cidr_labels(&p12);
        assert!(labels.contains_key("cidr:10.96.0.0/12"));
        assert!(labels.contains_key("reserved:world"));
    }

    #[test]
    fn reserved_names() {
        assert_eq!(reserved_name(HOST), Some("host"));
        assert_eq!(reserved_name(KUBE_APISERVER), Some("kube-apiserver"));
        assert_eq!(reserved_name(256), None);
    }
}
