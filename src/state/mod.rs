//! Durable state: locks (revocations) and device posture records.
//!
//! Owns the one small [`Store`] trait behind which locks and posture are kept, the in-memory
//! [`View`] every store materialises, the embedded on-disk store ([`FileStore`]) and a
//! [`MemoryStore`] for tests. It never decides anything: whether a lock or a posture record
//! allows a request is the pipeline's and policy's business; this module only answers "which
//! lock matches" and "what is this device's posture", from memory, without I/O.
//!
//! Writes are durable when they return (the file store fsyncs before acknowledging) and every
//! write gets a [`Revision`]; [`Store::subscribe`] delivers each change with its revision, so a
//! re-verifier can act on a lock within a second and notice if it missed something. See
//! `docs/state.md` for the format and the durability argument.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::broadcast;

pub mod config;
mod etcd;
mod file;
pub(crate) mod model;
mod store;

pub use config::EtcdConfig;
pub use etcd::EtcdStore;
pub use file::{FileStore, FileStoreOptions};
pub use model::{new_id, Lock, LockTarget, Posture, PostureRecord, State, MAX_MESSAGE_BYTES};
pub use store::{LockSubject, MemoryStore, View};

#[cfg(test)]
mod tests;

/// A store-wide, strictly increasing number given to every committed write. The file store
/// numbers writes 1, 2, 3, ...; a store on etcd uses etcd's revision, which may skip numbers.
pub type Revision = u64;

/// A boxed future, so that [`Store`] can be used as `dyn Store`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How the gateway holds its store.
pub type SharedStore = Arc<dyn Store>;

/// One committed write, as delivered by [`Store::subscribe`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub revision: Revision,
    pub kind: ChangeKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// A lock was added (or replaced, same id).
    LockPut(Lock),
    /// The lock with this id was deleted.
    LockDeleted(String),
    /// This device's posture record was replaced; read it with [`Store::posture`].
    PosturePut(String),
    /// This device's posture record was deleted.
    PostureDeleted(String),
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The record was refused before anything was written (the caller's fault).
    #[error("invalid record: {0}")]
    Invalid(String),
    /// Reading or writing the store failed (disk full, permissions, ...). The write was not
    /// acknowledged; whether it is on disk is settled at the next open.
    #[error("state store I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The store's files are damaged somewhere other than a torn last write; the store refuses
    /// to open rather than silently lose what follows. An operator must look at the file.
    #[error("state store file {path} is corrupt at byte offset {offset}: {reason}")]
    Corrupt {
        path: String,
        offset: u64,
        reason: String,
    },
    /// Another process (or another store in this process) has the directory open.
    #[error("state directory {path} is in use: {reason}")]
    Busy { path: String, reason: String },
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Random,
    /// The blocking task doing the write panicked or was cancelled at shutdown.
    #[error("state store task failed: {0}")]
    Task(String),
    /// The shared store (etcd) did not answer or refused the request. Whether a write that
    /// failed this way was committed is unknown until the watch shows it.
    #[error("shared state store unavailable: {0}")]
    Unavailable(String),
}

/// A lock or posture write that the state store refused: 503, as kube-apiserver answers when its
/// own storage cannot take a write, naming the cause an operator must fix (disk full, read-only)
/// but never a path. Nothing was acknowledged; what is stored stays in force.
impl crate::errors::ToStatus for StoreError {
    fn to_status(&self) -> crate::errors::Status {
        use crate::errors::{messages, Status};
        use std::io::ErrorKind;
        let StoreError::Io { source, .. } = self else {
            return Status::service_unavailable(messages::STORE_UNWRITABLE);
        };
        let cause = match source.kind() {
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded => "its disk is full",
            ErrorKind::ReadOnlyFilesystem => "its file system is read-only",
            _ => "a disk write failed",
        };
        Status::service_unavailable(messages::store_write_failed(cause))
    }
}

/// Whether a replica's view is known to reflect the shared store (see [`Store::health`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreHealth {
    /// The view is current (a local store), or was confirmed against a quorum recently.
    Current,
    /// Not confirmed for `unconfirmed_for`: the replica reports not-ready and refuses writes
    /// quickly, but still decides from its last view (bounded by `maxStaleness`).
    Lagging {
        unconfirmed_for: std::time::Duration,
        reason: String,
    },
    /// Not confirmed for longer than the configured bound: a lock or posture change may have
    /// been missed, so decisions that need them fail closed.
    Stale {
        unconfirmed_for: std::time::Duration,
        reason: String,
    },
}

impl StoreHealth {
    pub fn is_current(&self) -> bool {
        matches!(self, StoreHealth::Current)
    }

    pub fn is_stale(&self) -> bool {
        matches!(self, StoreHealth::Stale { .. })
    }
}

impl std::fmt::Display for StoreHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreHealth::Current => f.write_str("current"),
            StoreHealth::Lagging {
                unconfirmed_for,
                reason,
            } => write!(
                f,
                "not confirmed against a quorum for {:.1}s: {reason}",
                unconfirmed_for.as_secs_f64()
            ),
            StoreHealth::Stale {
                unconfirmed_for,
                reason,
            } => write!(
                f,
                "stale: not confirmed against a quorum for {:.1}s (beyond maxStaleness): {reason}",
                unconfirmed_for.as_secs_f64()
            ),
        }
    }
}

/// Where locks and posture records are kept.
///
/// Writes are async (the file store does its blocking I/O on `spawn_blocking`; an etcd store
/// awaits the network) and boxed so the trait is dyn-compatible. Each write is one atomic,
/// durable commit with its own revision. Reads are synchronous and come from the in-memory
/// [`View`] the store keeps up to date: no I/O, no lock held across an await, cheap enough for
/// every request.
pub trait Store: Send + Sync + 'static {
    /// The in-memory view this store keeps current.
    fn view(&self) -> &View;

    /// Adds a lock, or replaces the one with the same id.
    fn put_lock(&self, lock: Lock) -> BoxFuture<'_, Result<Revision, StoreError>>;

    /// Deletes a lock. `None` (and nothing written) when there is no lock with that id.
    fn delete_lock(&self, id: &str) -> BoxFuture<'_, Result<Option<(Revision, Lock)>, StoreError>>;

    /// Replaces the device's posture record.
    fn put_posture(&self, record: PostureRecord) -> BoxFuture<'_, Result<Revision, StoreError>>;

    /// Deletes a device's posture record. `None` (and nothing written) when there is none.
    fn delete_posture(
        &self,
        device_id: &str,
    ) -> BoxFuture<'_, Result<Option<(Revision, PostureRecord)>, StoreError>>;

    /// Drops expired entries from durable storage and bounds its size. The file store also does
    /// this on its own when its log grows; call it from a timer to drop expired entries sooner.
    fn compact(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// The locks in force now (expired ones left out), ordered by id.
    fn locks(&self) -> Vec<Lock> {
        self.view().locks()
    }

    /// The lock with this id, expired or not.
    fn lock(&self, id: &str) -> Option<Lock> {
        self.view().lock(id)
    }

    /// The device's posture record, unless there is none or it has expired.
    fn posture(&self, device_id: &str) -> Option<PostureRecord> {
        self.view().posture(device_id)
    }

    /// The first lock in force that applies to this subject. See [`View::matches`].
    fn matches(&self, subject: &LockSubject<'_>) -> Option<Lock> {
        self.view().matches(subject)
    }

    /// Everything in force, with the revision it reflects.
    fn snapshot(&self) -> (Revision, State) {
        self.view().snapshot()
    }

    /// Changes committed from now on. A receiver that falls behind gets
    /// `RecvError::Lagged`; it must then start again from [`Store::snapshot_and_subscribe`].
    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.view().subscribe()
    }

    /// A snapshot and a receiver taken together: the receiver delivers exactly the changes
    /// after the snapshot's revision, none missed and none repeated.
    fn snapshot_and_subscribe(&self) -> (Revision, State, broadcast::Receiver<Change>) {
        self.view().snapshot_and_subscribe()
    }

    /// The revision of the last committed write (0 for an empty store).
    fn revision(&self) -> Revision {
        self.view().revision()
    }

    /// Whether the view is known to be current. Local stores always are; a shared store is
    /// when it confirmed its view against a quorum recently. Cheap: called on every request.
    fn health(&self) -> StoreHealth {
        StoreHealth::Current
    }
}
