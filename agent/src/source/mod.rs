//! Sources of configuration: where policies, pods' labels, namespaces and nodes come from.
//! A source is an event stream: it hands the controller [`SourceBatch`]es of object
//! upserts and deletes, with typed [`Rejection`]s (origin, object, field path, reason) that
//! the CLI prints and the Kubernetes source will write into `status.conditions`. The
//! controller applies a batch whole, never half of one.
//!
//! `local` (a directory of YAML objects) is implemented; the Kubernetes source (kube-rs
//! watchers: add/update/delete/synced) plugs in behind the same trait.

pub mod local;

use weft_policy::Object;

pub use weft_api::Rejection;

/// One object and where it came from (a file name, or a Kubernetes object reference).
#[derive(Debug, Clone, PartialEq)]
pub struct Sourced {
    pub origin: String,
    pub object: Object,
}

impl Sourced {
    /// The key objects are unique by: `Kind namespace/name`.
    pub fn key(&self) -> String {
        self.object.describe()
    }
}

/// A change of the source's content, to be applied whole.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceBatch {
    /// New objects and new versions of objects, by key.
    pub upserts: Vec<Sourced>,
    /// Keys of objects that are gone.
    pub deletes: Vec<String>,
    /// Every rejection the source holds now (replaces the previous list); `None` when the
    /// list did not change.
    pub rejected: Option<Vec<Rejection>>,
}

impl SourceBatch {
    /// Whether applying the batch changes the objects (rejections aside).
    pub fn changes_objects(&self) -> bool {
        !self.upserts.is_empty() || !self.deletes.is_empty()
    }

    /// Fold a later batch into this one: applying the result equals applying both in order.
    pub fn merge(&mut self, later: SourceBatch) {
        let mut by_key: std::collections::BTreeMap<String, Option<Sourced>> = self
            .deletes
            .drain(..)
            .map(|k| (k, None))
            .chain(self.upserts.drain(..).map(|s| (s.key(), Some(s))))
            .collect();
        for key in later.deletes {
            by_key.insert(key, None);
        }
        for sourced in later.upserts {
            by_key.insert(sourced.key(), Some(sourced));
        }
        for (key, value) in by_key {
            match value {
                Some(sourced) => self.upserts.push(sourced),
                None => self.deletes.push(key),
            }
        }
        if later.rejected.is_some() {
            self.rejected = later.rejected;
        }
    }
}

/// How a source tells the controller that [`Source::take`] has something: a wake-up that
/// never blocks.
pub type Wake = Box<dyn Fn() + Send + Sync>;

/// A configuration source.
pub trait Source: Send {
    /// For `weft status`: `local:<dir>`, `kubernetes:<context>`.
    fn describe(&self) -> String;

    /// Read everything once (blocking): the complete content, which the controller applies
    /// before its first write so that an empty or partial view never removes policy the
    /// pinned maps still enforce.
    ///
    /// # Errors
    /// When the source cannot be read at all (the agent then refuses to start).
    fn initial(&mut self) -> anyhow::Result<SourceBatch>;

    /// Start watching: on every change the source calls `wake`, and the controller then
    /// [`take`](Source::take)s what changed.
    ///
    /// # Errors
    /// When watching cannot start.
    fn watch(&mut self, wake: Wake) -> anyhow::Result<()>;

    /// Everything that changed since the last `take` (or `initial`), as one batch.
    fn take(&mut self) -> SourceBatch;

    /// Read again now (blocking) and return everything that changed since the last `take`,
    /// this reading included: the barrier of `weft policy wait`. Objects being written at
    /// that moment keep their last good version.
    fn sync_now(&mut self) -> SourceBatch;

    /// Publish this node's own `Node` object (addresses, pod CIDRs, later its `WireGuard`
    /// key) where every agent of the cluster reads it: a file in the shared directory, or
    /// (Kubernetes) the node's object. Writing what is already there changes nothing.
    ///
    /// # Errors
    /// When the object cannot be written.
    fn publish_node(&mut self, node: &weft_policy::model::Node) -> anyhow::Result<()>;
}
