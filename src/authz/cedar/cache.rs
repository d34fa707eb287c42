//! Reuse of the per-request Cedar values between requests that would build identical ones.
//!
//! Building the principal entity, the request's `Entities` (with Cedar's transitive-closure pass)
//! and the `context` record is most of a decision's cost, and a client sends many requests with
//! the same identity, device and resource. Three small caches keep what was built:
//!
//! - **subjects**: the principal entity, by the caller's facts (user, uid, groups, method,
//!   issuer, claims, amr, whether there is an issue time): everything the principal and the
//!   subject's part of the context are made of, but the token's age. Each entry gets a serial
//!   number that stands for those facts below; tokens of one caller share it.
//! - **entities**: the request's `Entities` (principal, resource or impersonation target,
//!   action), by (subject serial, action, resource attributes).
//! - **contexts**: the `context` record, by (subject serial, device facts, source address,
//!   websocket, request verb, and the whole seconds the record contains: request time, token
//!   age, posture age). A record is reused within one second at most.
//!
//! Each entities entry also remembers the last decision made with it: the policy set's epoch
//! and the context entry it was made with (compared in full). The same entities, policy set
//! and context decide the same, so a caller repeating a request within the same second skips
//! evaluation; a reload (new epoch) or any other context decides afresh.
//!
//! A miss costs the build plus the insertion (`decide/new-caller` in `benches/cedar.rs`).
//!
//! In front of the three caches, an identity (a token's `Arc<Identity>`, shared by all its
//! requests) keeps a [`Recent`]: the principal it was given and its last request's entities and
//! context. A request whose entities or context equal those (compared in full, as the caches
//! compare) uses them without a look-up; the principal is used as it is, since an identity
//! never changes and a `Recent` is only read by the cache that made it. This saves the three
//! hash-map look-ups and the hashing of the caller's facts (claims included) per request.
//! A `Recent` holds weak references: it never keeps an entry the caches have let go (their
//! bounds stay the bounds, whatever the number of identities in the token cache).
//!
//! Keys are compared in full, never by hash or pointer alone: a cached value is only used for
//! inputs equal to those it was built from, so it is exactly what building would give (the
//! values depend on nothing else: the schema is fixed per engine and policies are not part of
//! them). Nothing time-dependent is cached beyond the second it describes, and no credential is
//! kept (token ids and certificate thumbprints are not part of any key). Only successful builds
//! are cached.

use std::any::Any;
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use cedar_policy::{Context, Entities, Entity, EntityUid};

use super::{Decision, DeviceFacts, ImpersonationTarget, PostureFacts, RequestFacts, Subject};
use crate::authz::requestinfo::RequestInfo;

/// The caller's facts as the principal entity and the context's `authn` record use them.
#[derive(Hash, PartialEq, Eq)]
struct SubjectKey<'a> {
    user: &'a str,
    uid: Option<&'a str>,
    groups: &'a [String],
    method: &'a str,
    issuer: Option<&'a str>,
    claims: &'a BTreeMap<String, Vec<String>>,
    amr: &'a [String],
    /// Whether there is an issue time (its value only matters as the token's age, a part of
    /// the context key).
    issued: bool,
}

impl<'a> SubjectKey<'a> {
    fn of(s: &Subject<'a>) -> SubjectKey<'a> {
        SubjectKey {
            user: s.user,
            uid: s.uid,
            groups: s.groups,
            method: s.method,
            issuer: s.facts.issuer.as_deref(),
            claims: &s.facts.claims,
            amr: &s.facts.amr,
            issued: s.facts.issued_at.is_some(),
        }
    }
}

struct SubjectOwned {
    user: String,
    uid: Option<String>,
    groups: Vec<String>,
    method: String,
    issuer: Option<String>,
    claims: BTreeMap<String, Vec<String>>,
    amr: Vec<String>,
    issued: bool,
}

impl SubjectOwned {
    fn of(k: &SubjectKey<'_>) -> SubjectOwned {
        SubjectOwned {
            user: k.user.to_owned(),
            uid: k.uid.map(str::to_owned),
            groups: k.groups.to_vec(),
            method: k.method.to_owned(),
            issuer: k.issuer.map(str::to_owned),
            claims: k.claims.clone(),
            amr: k.amr.to_vec(),
            issued: k.issued,
        }
    }
    fn view(&self) -> SubjectKey<'_> {
        SubjectKey {
            user: &self.user,
            uid: self.uid.as_deref(),
            groups: &self.groups,
            method: &self.method,
            issuer: self.issuer.as_deref(),
            claims: &self.claims,
            amr: &self.amr,
            issued: self.issued,
        }
    }
}

/// A cached principal; `serial` names its subject's facts in the other caches' keys.
pub(crate) struct SubjectEntry {
    key: SubjectOwned,
    pub serial: u64,
    pub uid: EntityUid,
    pub entity: Entity,
}

/// What the resource entity of a request is made of.
#[derive(Hash, PartialEq, Eq, Clone, Copy)]
pub(crate) enum ResourceKey<'a> {
    Api {
        path: &'a str,
        api_group: &'a str,
        api_version: &'a str,
        resource: &'a str,
        subresource: &'a str,
        namespace: &'a str,
        name: &'a str,
    },
    NonResource {
        path: &'a str,
    },
    Impersonation(&'a ImpersonationTarget),
}

impl<'a> ResourceKey<'a> {
    pub fn request(info: &'a RequestInfo) -> ResourceKey<'a> {
        if info.is_resource_request {
            ResourceKey::Api {
                path: &info.path,
                api_group: &info.api_group,
                api_version: &info.api_version,
                resource: &info.resource,
                subresource: &info.subresource,
                namespace: &info.namespace,
                name: &info.name,
            }
        } else {
            ResourceKey::NonResource { path: &info.path }
        }
    }
}

enum ResourceOwned {
    Api([String; 7]),
    NonResource(String),
    Impersonation(ImpersonationTarget),
}

impl ResourceOwned {
    fn of(k: &ResourceKey<'_>) -> ResourceOwned {
        match *k {
            ResourceKey::Api {
                path,
                api_group,
                api_version,
                resource,
                subresource,
                namespace,
                name,
            } => ResourceOwned::Api(
                [
                    path,
                    api_group,
                    api_version,
                    resource,
                    subresource,
                    namespace,
                    name,
                ]
                .map(str::to_owned),
            ),
            ResourceKey::NonResource { path } => ResourceOwned::NonResource(path.to_owned()),
            ResourceKey::Impersonation(t) => ResourceOwned::Impersonation(t.clone()),
        }
    }
    fn view(&self) -> ResourceKey<'_> {
        match self {
            ResourceOwned::Api(
                [path, api_group, api_version, resource, subresource, namespace, name],
            ) => ResourceKey::Api {
                path,
                api_group,
                api_version,
                resource,
                subresource,
                namespace,
                name,
            },
            ResourceOwned::NonResource(path) => ResourceKey::NonResource { path },
            ResourceOwned::Impersonation(t) => ResourceKey::Impersonation(t),
        }
    }
}

#[derive(Hash, PartialEq, Eq)]
struct EntitiesKey<'a> {
    subject: u64,
    action: &'a str,
    resource: ResourceKey<'a>,
}

/// A request's entities and the uids the request names.
pub(crate) struct EntitiesEntry {
    subject: u64,
    action: String,
    resource_key: ResourceOwned,
    pub principal: EntityUid,
    pub resource: EntityUid,
    pub entities: Entities,
    /// The last decision made with these entities: by which policy set, in which context.
    memo: ArcSwapOption<Memo>,
}

/// A decision and everything it was computed from besides its entities.
struct Memo {
    /// The policy set's epoch (one per engine and set: it goes up with every reload).
    epoch: u64,
    context: Arc<ContextEntry>,
    decision: Decision,
}

impl EntitiesEntry {
    fn key(&self) -> EntitiesKey<'_> {
        EntitiesKey {
            subject: self.subject,
            action: &self.action,
            resource: self.resource_key.view(),
        }
    }

    /// The decision already made with these entities, the policy set of `epoch` and a context
    /// equal to `context` (compared in full), if it was the last one made.
    pub fn decided(&self, epoch: u64, context: &Arc<ContextEntry>) -> Option<Decision> {
        let memo = self.memo.load();
        let m = memo.as_ref()?;
        let same_context = Arc::ptr_eq(&m.context, context) || m.context.view() == context.view();
        (m.epoch == epoch && same_context).then(|| m.decision.clone())
    }

    /// Remembers `decision`, made with these entities, the set of `epoch` and `context`.
    pub fn remember(&self, epoch: u64, context: &Arc<ContextEntry>, decision: &Decision) {
        self.memo.store(Some(Arc::new(Memo {
            epoch,
            context: context.clone(),
            decision: decision.clone(),
        })));
    }
}

/// What a device contributes to the context, with its posture age in whole seconds.
#[derive(Hash, PartialEq, Eq)]
struct DeviceKey<'a> {
    id: &'a str,
    bound: bool,
    posture: Option<&'a PostureFacts>,
    posture_age: Option<u64>,
}

impl<'a> DeviceKey<'a> {
    fn of(d: &'a DeviceFacts) -> DeviceKey<'a> {
        DeviceKey {
            id: &d.id,
            bound: d.bound,
            posture: d.posture.as_ref(),
            posture_age: d.posture_age.map(|a| a.as_secs()),
        }
    }
}

#[derive(Hash, PartialEq, Eq)]
struct ContextKey<'a> {
    subject: u64,
    device: Option<DeviceKey<'a>>,
    source_ip: IpAddr,
    websocket: bool,
    verb: &'a str,
    epoch: u64,
    token_age: Option<u64>,
}

pub(crate) struct ContextEntry {
    subject: u64,
    device: Option<DeviceFacts>,
    source_ip: IpAddr,
    websocket: bool,
    verb: String,
    epoch: u64,
    token_age: Option<u64>,
    pub context: Context,
}

impl ContextEntry {
    fn view(&self) -> ContextKey<'_> {
        ContextKey {
            subject: self.subject,
            device: self.device.as_ref().map(DeviceKey::of),
            source_ip: self.source_ip,
            websocket: self.websocket,
            verb: &self.verb,
            epoch: self.epoch,
            token_age: self.token_age,
        }
    }
}

/// Whole seconds from `earlier` to `later` (0 when `later` is earlier), as the context uses.
pub(crate) fn seconds_between(later: SystemTime, earlier: SystemTime) -> u64 {
    later
        .duration_since(earlier)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

/// What an identity's last request was decided with (see the module docs); weak, so that it
/// never outlives the caches' own entries.
pub(crate) struct Recent {
    /// The [`BuildCache`] that made it.
    cache: u64,
    subject: Weak<SubjectEntry>,
    entities: Weak<EntitiesEntry>,
    context: Weak<ContextEntry>,
}

/// Where an identity keeps its [`Recent`] (`authn::Identity::authz_memo`).
pub(crate) type Slot = crate::authn::AuthzMemo;

/// Numbers the build caches of a process, so that a [`Recent`] is only used by its own.
static CACHE_IDS: AtomicU64 = AtomicU64::new(1);

/// The three caches of one engine.
pub(crate) struct BuildCache {
    id: u64,
    /// foldhash, seeded per process: keys are hashed on every request (SipHash was ~3% of a
    /// request), and a collision only costs a rebuild, since entries are compared in full.
    hasher: foldhash::fast::RandomState,
    serials: AtomicU64,
    subjects: moka::sync::Cache<u64, Arc<SubjectEntry>, foldhash::fast::RandomState>,
    entities: moka::sync::Cache<u64, Arc<EntitiesEntry>, foldhash::fast::RandomState>,
    contexts: moka::sync::Cache<u64, Arc<ContextEntry>, foldhash::fast::RandomState>,
}

impl BuildCache {
    pub fn new() -> BuildCache {
        BuildCache {
            id: CACHE_IDS.fetch_add(1, Ordering::Relaxed),
            hasher: foldhash::fast::RandomState::default(),
            serials: AtomicU64::new(0),
            subjects: moka::sync::Cache::builder()
                .max_capacity(4_096)
                .time_to_idle(Duration::from_secs(300))
                .build_with_hasher(foldhash::fast::RandomState::default()),
            entities: moka::sync::Cache::builder()
                .max_capacity(4_096)
                .time_to_idle(Duration::from_secs(300))
                .build_with_hasher(foldhash::fast::RandomState::default()),
            contexts: moka::sync::Cache::builder()
                .max_capacity(4_096)
                .time_to_live(Duration::from_secs(2))
                .build_with_hasher(foldhash::fast::RandomState::default()),
        }
    }

    /// The principal for `subject`: cached, or made by `build` (and cached when it succeeds).
    fn subject(
        &self,
        subject: &Subject<'_>,
        build: impl FnOnce() -> Result<(EntityUid, Entity), String>,
    ) -> Result<Arc<SubjectEntry>, String> {
        let key = SubjectKey::of(subject);
        let hash = self.hasher.hash_one(&key);
        if let Some(e) = self.subjects.get(&hash) {
            if e.key.view() == key {
                return Ok(e);
            }
        }
        let (uid, entity) = build()?;
        let entry = Arc::new(SubjectEntry {
            key: SubjectOwned::of(&key),
            serial: self.serials.fetch_add(1, Ordering::Relaxed),
            uid,
            entity,
        });
        self.subjects.insert(hash, entry.clone());
        Ok(entry)
    }

    /// The entities for `key.subject` (a serial from [`BuildCache::subject`]) doing
    /// `key.action` on `key.resource`: cached, or made by `build`.
    fn entities(
        &self,
        key: EntitiesKey<'_>,
        build: impl FnOnce() -> Result<(EntityUid, EntityUid, Entities), String>,
    ) -> Result<Arc<EntitiesEntry>, String> {
        let hash = self.hasher.hash_one(&key);
        if let Some(e) = self.entities.get(&hash) {
            if e.key() == key {
                return Ok(e);
            }
        }
        let (principal, resource_uid, entities) = build()?;
        let entry = Arc::new(EntitiesEntry {
            subject: key.subject,
            action: key.action.to_owned(),
            resource_key: ResourceOwned::of(&key.resource),
            principal,
            resource: resource_uid,
            entities,
            memo: ArcSwapOption::empty(),
        });
        self.entities.insert(hash, entry.clone());
        Ok(entry)
    }

    /// What the context of `subject` (a serial) making `req` is made of.
    fn context_key<'a>(
        subject: u64,
        facts: &Subject<'_>,
        req: &'a RequestFacts<'_>,
    ) -> ContextKey<'a> {
        ContextKey {
            subject,
            device: req.device.map(DeviceKey::of),
            source_ip: req.source_ip,
            websocket: req.websocket,
            verb: &req.info.verb,
            epoch: seconds_between(req.now, SystemTime::UNIX_EPOCH),
            token_age: facts
                .facts
                .issued_at
                .map(|iat| seconds_between(req.now, iat)),
        }
    }

    /// The context for `key`: cached, or made by `build`.
    fn context(
        &self,
        key: ContextKey<'_>,
        req: &RequestFacts<'_>,
        build: impl FnOnce() -> Result<Context, String>,
    ) -> Result<Arc<ContextEntry>, String> {
        let hash = self.hasher.hash_one(&key);
        if let Some(e) = self.contexts.get(&hash) {
            if e.view() == key {
                return Ok(e);
            }
        }
        let context = build()?;
        let entry = Arc::new(ContextEntry {
            subject: key.subject,
            device: req.device.cloned(),
            source_ip: req.source_ip,
            websocket: req.websocket,
            verb: req.info.verb.clone(),
            epoch: key.epoch,
            token_age: key.token_age,
            context,
        });
        self.contexts.insert(hash, entry.clone());
        Ok(entry)
    }

    /// The entities and context of `subject` doing `action` on `resource` (`req`): from the
    /// identity's [`Recent`] in `slot` when they equal its, else from the caches (or built by
    /// `principal`, `entities` and `context`); `slot` then remembers them.
    #[allow(clippy::too_many_arguments)]
    pub fn prepare(
        &self,
        slot: Option<&Slot>,
        subject: &Subject<'_>,
        action: &str,
        resource: ResourceKey<'_>,
        req: &RequestFacts<'_>,
        principal: impl FnOnce() -> Result<(EntityUid, Entity), String>,
        entities: impl FnOnce(&SubjectEntry) -> Result<(EntityUid, EntityUid, Entities), String>,
        context: impl FnOnce() -> Result<Context, String>,
    ) -> Result<(Arc<EntitiesEntry>, Arc<ContextEntry>), String> {
        // A guard, not a reference count; nothing here awaits.
        let guard = slot.map(|s| s.load());
        let recent = guard
            .as_ref()
            .and_then(|g| g.as_deref())
            .and_then(|b| b.downcast_ref::<Recent>())
            .filter(|r| r.cache == self.id);
        let s = match recent.and_then(|r| r.subject.upgrade()) {
            Some(s) => s,
            None => self.subject(subject, principal)?,
        };
        let key = EntitiesKey {
            subject: s.serial,
            action,
            resource,
        };
        let e = match recent.and_then(|r| r.entities.upgrade()) {
            Some(e) if e.key() == key => e,
            _ => self.entities(key, || entities(&s))?,
        };
        let key = Self::context_key(s.serial, subject, req);
        let c = match recent.and_then(|r| r.context.upgrade()) {
            Some(c) if c.view() == key => c,
            _ => self.context(key, req, context)?,
        };
        let unchanged = recent.is_some_and(|r| {
            std::ptr::eq(r.subject.as_ptr(), Arc::as_ptr(&s))
                && std::ptr::eq(r.entities.as_ptr(), Arc::as_ptr(&e))
                && std::ptr::eq(r.context.as_ptr(), Arc::as_ptr(&c))
        });
        if let (Some(slot), false) = (slot, unchanged) {
            let recent: Box<dyn Any + Send + Sync> = Box::new(Recent {
                cache: self.id,
                subject: Arc::downgrade(&s),
                entities: Arc::downgrade(&e),
                context: Arc::downgrade(&c),
            });
            slot.store(Some(Arc::new(recent)));
        }
        Ok((e, c))
    }

    /// Empties the three caches (as eviction would, all at once).
    #[cfg(test)]
    pub fn clear(&self) {
        self.subjects.invalidate_all();
        self.entities.invalidate_all();
        self.contexts.invalidate_all();
        self.run_pending_tasks();
    }

    /// Whether the [`Recent`] in `slot` (if any) can still reach each of its entries.
    #[cfg(test)]
    pub fn recent_reaches(slot: &Slot) -> Option<[bool; 3]> {
        let guard = slot.load();
        let r = guard.as_deref()?.downcast_ref::<Recent>()?;
        Some([
            r.subject.strong_count() > 0,
            r.entities.strong_count() > 0,
            r.context.strong_count() > 0,
        ])
    }

    #[cfg(test)]
    pub fn run_pending_tasks(&self) {
        self.subjects.run_pending_tasks();
        self.entities.run_pending_tasks();
        self.contexts.run_pending_tasks();
    }

    #[cfg(test)]
    pub fn sizes(&self) -> (u64, u64, u64) {
        self.run_pending_tasks();
        (
            self.subjects.entry_count(),
            self.entities.entry_count(),
            self.contexts.entry_count(),
        )
    }
}
