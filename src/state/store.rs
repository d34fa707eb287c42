//! The in-memory view every store keeps, the write operations, and the memory-only store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::{
    BoxFuture, Change, ChangeKind, Lock, LockTarget, PostureRecord, Revision, State, Store,
    StoreError,
};
use crate::util::sync::{lock, read, write};

/// How many changes a subscriber may fall behind before it gets `Lagged`.
const CHANGE_CAPACITY: usize = 4096;

/// One write, as committed and (in the file store) as written to the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub(crate) enum Op {
    PutLock {
        lock: Lock,
    },
    DeleteLock {
        id: String,
    },
    PutPosture {
        record: PostureRecord,
    },
    DeletePosture {
        #[serde(rename = "deviceId")]
        device_id: String,
    },
}

impl Op {
    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        match self {
            Op::PutLock { lock } => lock.validate(),
            Op::PutPosture { record } => record.validate(),
            Op::DeleteLock { .. } | Op::DeletePosture { .. } => Ok(()),
        }
    }
}

/// What a delete removed.
#[derive(Debug)]
pub(crate) enum Removed {
    Lock(Lock),
    Posture(PostureRecord),
}

/// Who a request, a live stream or a review acts as, for lock matching: the authenticated caller
/// with its device, token and session, and the identity it acts as when that is another one
/// (`kubectl --as`, or a SubjectAccessReview's impersonation check). The same subject type is
/// matched for requests, streams and kube-apiserver's webhooks, by [`LockTarget::matches`].
/// Absent fields match nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct LockSubject<'a> {
    pub user: Option<&'a str>,
    pub groups: &'a [String],
    pub device: Option<&'a str>,
    pub token_id: Option<&'a str>,
    pub session: Option<&'a str>,
    /// The user the request acts as, when it is not the caller.
    pub acting_user: Option<&'a str>,
    /// The groups of the identity the request acts as.
    pub acting_groups: &'a [String],
}

impl<'a> LockSubject<'a> {
    /// The subject of a request by `caller` acting as `acting` (when it impersonates) from
    /// `device`: the caller's name, groups, token id and session, the acting identity's name
    /// and groups.
    pub fn of(
        caller: &'a crate::authn::Identity,
        acting: Option<&'a crate::authn::Identity>,
        device: Option<&'a str>,
    ) -> LockSubject<'a> {
        LockSubject {
            user: Some(caller.user()),
            groups: caller.groups(),
            device,
            token_id: caller.facts().token_id.as_deref(),
            session: caller.facts().session_id.as_deref(),
            acting_user: acting.map(|a| a.user()),
            acting_groups: acting.map_or(&[], |a| a.groups()),
        }
    }

    /// Every user name the subject stands for: the caller, then the identity it acts as.
    fn users(&self) -> impl Iterator<Item = &'a str> {
        self.user.into_iter().chain(self.acting_user)
    }

    /// Every group of the caller and of the identity it acts as.
    fn all_groups(&self) -> impl Iterator<Item = &'a String> {
        self.groups.iter().chain(self.acting_groups)
    }
}

impl LockTarget {
    /// Does a lock on this target apply to `s`? The one definition of a lock's reach: the
    /// store's index only finds candidates faster, and keeps those this accepts.
    pub fn matches(&self, s: &LockSubject<'_>) -> bool {
        match self {
            LockTarget::User(u) => s.users().any(|x| x == u),
            LockTarget::Group(g) => s.all_groups().any(|x| x == g),
            LockTarget::Device(d) => s.device == Some(d.as_str()),
            LockTarget::TokenId(t) => s.token_id == Some(t.as_str()),
            LockTarget::Session(id) => s.session == Some(id.as_str()),
        }
    }
}

/// Locks indexed by id and by target, one hash map per target kind. Replaced as a whole on
/// every lock write (locks are few and rarely written), so readers never wait.
#[derive(Clone, Debug, Default)]
struct LockIndex {
    by_id: HashMap<String, Arc<Lock>>,
    users: HashMap<String, Vec<Arc<Lock>>>,
    groups: HashMap<String, Vec<Arc<Lock>>>,
    devices: HashMap<String, Vec<Arc<Lock>>>,
    tokens: HashMap<String, Vec<Arc<Lock>>>,
    sessions: HashMap<String, Vec<Arc<Lock>>>,
}

impl LockIndex {
    fn map_mut(&mut self, target: &LockTarget) -> &mut HashMap<String, Vec<Arc<Lock>>> {
        match target {
            LockTarget::User(_) => &mut self.users,
            LockTarget::Group(_) => &mut self.groups,
            LockTarget::Device(_) => &mut self.devices,
            LockTarget::TokenId(_) => &mut self.tokens,
            LockTarget::Session(_) => &mut self.sessions,
        }
    }

    fn remove(&mut self, id: &str) -> Option<Arc<Lock>> {
        let old = self.by_id.remove(id)?;
        let map = self.map_mut(&old.target);
        if let Some(list) = map.get_mut(old.target.value()) {
            list.retain(|l| l.id != id);
            if list.is_empty() {
                map.remove(old.target.value());
            }
        }
        Some(old)
    }

    fn insert(&mut self, lock: Lock) {
        self.remove(&lock.id);
        let lock = Arc::new(lock);
        self.map_mut(&lock.target)
            .entry(lock.target.value().to_owned())
            .or_default()
            .push(Arc::clone(&lock));
        self.by_id.insert(lock.id.clone(), lock);
    }
}

fn first_live(
    map: &HashMap<String, Vec<Arc<Lock>>>,
    key: Option<&str>,
    now: SystemTime,
) -> Option<Lock> {
    map.get(key?)?
        .iter()
        .find(|l| !l.is_expired(now))
        .map(|l| Lock::clone(l))
}

/// The materialised state of a store: what every read is answered from.
///
/// Writers (the store, under its own write mutex) call `apply` after the write is durable;
/// readers never block on a writer's I/O. An etcd store would feed the same view from its
/// watch stream.
pub struct View {
    locks: ArcSwap<LockIndex>,
    posture: RwLock<HashMap<String, Arc<PostureRecord>>>,
    revision: AtomicU64,
    changes: broadcast::Sender<Change>,
    /// Held while applying a change and while taking a snapshot, so the two never interleave.
    apply: Mutex<()>,
}

impl Default for View {
    fn default() -> Self {
        View {
            locks: ArcSwap::default(),
            posture: RwLock::default(),
            revision: AtomicU64::new(0),
            changes: broadcast::channel(CHANGE_CAPACITY).0,
            apply: Mutex::new(()),
        }
    }
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("revision", &self.revision())
            .field("locks", &self.locks.load().by_id.len())
            .finish_non_exhaustive()
    }
}

impl View {
    /// The revision of the last applied write.
    pub fn revision(&self) -> Revision {
        self.revision.load(Ordering::Acquire)
    }

    /// Locks in force now, ordered by id.
    pub fn locks(&self) -> Vec<Lock> {
        self.locks_at(SystemTime::now())
    }

    /// Locks in force at `now`, ordered by id.
    pub fn locks_at(&self, now: SystemTime) -> Vec<Lock> {
        let idx = self.locks.load();
        let mut out: Vec<Lock> = idx
            .by_id
            .values()
            .filter(|l| !l.is_expired(now))
            .map(|l| Lock::clone(l))
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// The lock with this id, expired or not.
    pub fn lock(&self, id: &str) -> Option<Lock> {
        self.locks.load().by_id.get(id).map(|l| Lock::clone(l))
    }

    /// The device's posture, unless missing or expired.
    pub fn posture(&self, device_id: &str) -> Option<PostureRecord> {
        self.posture_at(device_id, SystemTime::now())
    }

    pub fn posture_at(&self, device_id: &str, now: SystemTime) -> Option<PostureRecord> {
        let map = read(&self.posture);
        map.get(device_id)
            .filter(|r| !r.is_expired(now))
            .map(|r| PostureRecord::clone(r))
    }

    /// [`View::posture_at`] without copying the record: the request path's look-up (a
    /// reference count, not a deep copy of its facts).
    pub fn posture_shared_at(
        &self,
        device_id: &str,
        now: SystemTime,
    ) -> Option<Arc<PostureRecord>> {
        let map = read(&self.posture);
        map.get(device_id).filter(|r| !r.is_expired(now)).cloned()
    }

    /// The first lock in force that applies to the subject: checked by user, then each group,
    /// then device, token id and session. One hash lookup per name, no allocation unless a lock
    /// matches, nothing at all when there are no locks.
    pub fn matches(&self, subject: &LockSubject<'_>) -> Option<Lock> {
        let idx = self.locks.load();
        if idx.by_id.is_empty() {
            return None;
        }
        Self::matches_in(&idx, subject, SystemTime::now())
    }

    /// [`View::matches`] at a given instant.
    pub fn matches_at(&self, subject: &LockSubject<'_>, now: SystemTime) -> Option<Lock> {
        Self::matches_in(&self.locks.load(), subject, now)
    }

    fn matches_in(idx: &LockIndex, s: &LockSubject<'_>, now: SystemTime) -> Option<Lock> {
        s.users()
            .find_map(|u| first_live(&idx.users, Some(u), now))
            .or_else(|| {
                s.all_groups()
                    .find_map(|g| first_live(&idx.groups, Some(g), now))
            })
            .or_else(|| first_live(&idx.devices, s.device, now))
            .or_else(|| first_live(&idx.tokens, s.token_id, now))
            .or_else(|| first_live(&idx.sessions, s.session, now))
            .filter(|l| l.target.matches(s))
    }

    /// Everything in force now, with the revision it reflects.
    pub fn snapshot(&self) -> (Revision, State) {
        let _g = lock(&self.apply);
        (self.revision(), self.state_at(SystemTime::now()))
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    pub fn snapshot_and_subscribe(&self) -> (Revision, State, broadcast::Receiver<Change>) {
        let _g = lock(&self.apply);
        let rx = self.changes.subscribe();
        (self.revision(), self.state_at(SystemTime::now()), rx)
    }

    /// The state at `now` without expired entries. Callers hold `apply` when they need it
    /// consistent with a revision.
    pub(crate) fn state_at(&self, now: SystemTime) -> State {
        let locks = self
            .locks
            .load()
            .by_id
            .values()
            .filter(|l| !l.is_expired(now))
            .map(|l| (l.id.clone(), Lock::clone(l)))
            .collect();
        let posture = read(&self.posture)
            .values()
            .filter(|r| !r.is_expired(now))
            .map(|r| (r.device_id.clone(), PostureRecord::clone(r)))
            .collect();
        State { locks, posture }
    }

    /// Takes the apply guard: a snapshot taken under it matches `revision()`.
    pub(crate) fn hold(&self) -> MutexGuard<'_, ()> {
        lock(&self.apply)
    }

    /// What a delete would remove; `None` for puts. The caller holds its write mutex, so the
    /// answer stays true until it applies.
    pub(crate) fn existing(&self, op: &Op) -> Option<Removed> {
        match op {
            Op::DeleteLock { id } => self.lock(id).map(Removed::Lock),
            Op::DeletePosture { device_id } => read(&self.posture)
                .get(device_id)
                .map(|r| Removed::Posture(PostureRecord::clone(r))),
            Op::PutLock { .. } | Op::PutPosture { .. } => None,
        }
    }

    /// Applies a committed write and tells subscribers. Callers serialize writes and pass
    /// increasing revisions.
    pub(crate) fn apply(&self, revision: Revision, op: Op) {
        let _g = lock(&self.apply);
        let kind = match op {
            Op::PutLock { lock } => {
                let mut idx = LockIndex::clone(&self.locks.load());
                idx.insert(lock.clone());
                self.locks.store(Arc::new(idx));
                ChangeKind::LockPut(lock)
            }
            Op::DeleteLock { id } => {
                let mut idx = LockIndex::clone(&self.locks.load());
                idx.remove(&id);
                self.locks.store(Arc::new(idx));
                ChangeKind::LockDeleted(id)
            }
            Op::PutPosture { record } => {
                let device = record.device_id.clone();
                write(&self.posture).insert(device.clone(), Arc::new(record));
                ChangeKind::PosturePut(device)
            }
            Op::DeletePosture { device_id } => {
                write(&self.posture).remove(&device_id);
                ChangeKind::PostureDeleted(device_id)
            }
        };
        self.revision.store(revision, Ordering::Release);
        // No receivers is not an error.
        let _ = self.changes.send(Change { revision, kind });
    }

    /// Forgets expired entries (compaction). They were already invisible to reads, so nothing
    /// is published and the revision does not change.
    pub(crate) fn prune(&self, now: SystemTime) {
        let _g = lock(&self.apply);
        let idx = self.locks.load();
        let expired: Vec<String> = idx
            .by_id
            .values()
            .filter(|l| l.is_expired(now))
            .map(|l| l.id.clone())
            .collect();
        if !expired.is_empty() {
            let mut idx = LockIndex::clone(&idx);
            for id in &expired {
                idx.remove(id);
            }
            self.locks.store(Arc::new(idx));
        }
        write(&self.posture).retain(|_, r| !r.is_expired(now));
    }

    /// Replaces everything (loading a snapshot at open). No change is published.
    pub(crate) fn load(&self, revision: Revision, state: State) {
        let _g = lock(&self.apply);
        let mut idx = LockIndex::default();
        for (_, lock) in state.locks {
            idx.insert(lock);
        }
        self.locks.store(Arc::new(idx));
        *write(&self.posture) = state
            .posture
            .into_values()
            .map(|r| (r.device_id.clone(), Arc::new(r)))
            .collect();
        self.revision.store(revision, Ordering::Release);
    }
}

/// A store kept only in memory: for tests, and for a gateway run that needs no durability.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    inner: Arc<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    view: View,
    write: Mutex<()>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn commit(&self, op: Op) -> Result<Option<(Revision, Option<Removed>)>, StoreError> {
        op.validate()?;
        let _w = lock(&self.inner.write);
        let view = &self.inner.view;
        let removed = view.existing(&op);
        if matches!(op, Op::DeleteLock { .. } | Op::DeletePosture { .. }) && removed.is_none() {
            return Ok(None);
        }
        let revision = view.revision() + 1;
        view.apply(revision, op);
        Ok(Some((revision, removed)))
    }
}

/// Turns the generic commit result into each write method's answer.
pub(crate) fn put_result(
    r: Result<Option<(Revision, Option<Removed>)>, StoreError>,
) -> Result<Revision, StoreError> {
    match r? {
        Some((rev, _)) => Ok(rev),
        None => Err(StoreError::Task("put committed nothing".into())),
    }
}

pub(crate) fn deleted_lock(
    r: Result<Option<(Revision, Option<Removed>)>, StoreError>,
) -> Result<Option<(Revision, Lock)>, StoreError> {
    Ok(match r? {
        Some((rev, Some(Removed::Lock(l)))) => Some((rev, l)),
        _ => None,
    })
}

pub(crate) fn deleted_posture(
    r: Result<Option<(Revision, Option<Removed>)>, StoreError>,
) -> Result<Option<(Revision, PostureRecord)>, StoreError> {
    Ok(match r? {
        Some((rev, Some(Removed::Posture(p)))) => Some((rev, p)),
        _ => None,
    })
}

impl Store for MemoryStore {
    fn view(&self) -> &View {
        &self.inner.view
    }

    fn put_lock(&self, lock: Lock) -> BoxFuture<'_, Result<Revision, StoreError>> {
        Box::pin(async move { put_result(self.commit(Op::PutLock { lock })) })
    }

    fn delete_lock(&self, id: &str) -> BoxFuture<'_, Result<Option<(Revision, Lock)>, StoreError>> {
        let id = id.to_owned();
        Box::pin(async move { deleted_lock(self.commit(Op::DeleteLock { id })) })
    }

    fn put_posture(&self, record: PostureRecord) -> BoxFuture<'_, Result<Revision, StoreError>> {
        Box::pin(async move { put_result(self.commit(Op::PutPosture { record })) })
    }

    fn delete_posture(
        &self,
        device_id: &str,
    ) -> BoxFuture<'_, Result<Option<(Revision, PostureRecord)>, StoreError>> {
        let device_id = device_id.to_owned();
        Box::pin(async move { deleted_posture(self.commit(Op::DeletePosture { device_id })) })
    }

    fn compact(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let _w = lock(&self.inner.write);
            self.inner.view.prune(SystemTime::now());
            Ok(())
        })
    }
}
