//! Reuse of the per-request Cedar values between requests that would build identical ones.
//!
//! Building the principal entity, the request's `Entities` (with Cedar's transitive-closure pass)
//! and the `context` record is most of a decision's cost, and a client sends many requests with
//! the same identity, device and resource. Three small caches keep what was built:
//!
//! - **subjects**: the principal entity, by its [`PrincipalInputs`]. Each entry gets a serial
//!   number that stands for those inputs below; tokens of one caller share it.
//! - **entities**: the request's `Entities` (principal, resource or impersonation target,
//!   action), by (subject serial, action, [`ResourceInputs`]).
//! - **contexts**: the `context` record, by its [`ContextInputs`] (which hold the whole seconds
//!   the record contains: request time, token age, posture age). A record is reused within one
//!   second at most.
//!
//! The keys are the very structs the builders in `entities.rs` take, and each builder receives
//! its key (not the request): a value cannot depend on anything its key leaves out.
//!
//! Each entities entry also remembers the last decision made with it: the policy set's epoch
//! and the context entry it was made with (compared in full). The same entities, policy set
//! and context decide the same, so a caller repeating a request within the same second skips
//! evaluation; a reload (new epoch) or any other context decides afresh.
//!
//! A miss costs the build plus the insertion (`decide/new-caller` in `benches/cedar.rs`).
//!
//! In front of the three caches, a table keeps per identity (by its
//! [`crate::authn::InstanceId`]; a token's `Arc<Identity>` serves all its requests) a
//! [`Recent`]: the principal it was given and its last request's entities and context. A
//! request whose entities or context equal those (compared in full, as the caches compare) uses
//! them without a look-up; the principal is used as it is, since an identity never changes and
//! its instance id is never given to another. This saves the three hash-map look-ups and the
//! hashing of the caller's facts (claims included) per request. The table has a fixed number of
//! slots, chosen by the instance id; an identity seen once (an impersonated identity, made per
//! request) only takes a slot that is free or whose entries are gone, so that one-off
//! identities do not push out the ones that come back. A `Recent` holds weak references: it
//! never keeps an entry the caches have let go (their bounds stay the bounds, whatever the
//! number of identities in the token cache).
//!
//! Keys are compared in full, never by hash or pointer alone: a cached value is only used for
//! inputs equal to those it was built from, so it is exactly what building would give (the
//! values depend on nothing else: the schema is fixed per engine and policies are not part of
//! them). Nothing time-dependent is cached beyond the second it describes, and no credential is
//! kept (token ids and certificate thumbprints are not part of any key). Only successful builds
//! are cached.

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use cedar_policy::{Context, Entities, Entity, EntityUid};

use super::entities::{BuildError, ContextInputs, DeviceInputs, PrincipalInputs, ResourceInputs};
use super::{Decision, ImpersonationTarget, PostureFacts};
use crate::authn::InstanceId;

/// [`PrincipalInputs`], owned.
struct PrincipalOwned {
    user: String,
    uid: Option<String>,
    groups: Vec<String>,
    method: String,
    issuer: Option<String>,
    claims: BTreeMap<String, Vec<String>>,
}

impl PrincipalOwned {
    fn of(k: &PrincipalInputs<'_>) -> PrincipalOwned {
        let PrincipalInputs {
            user,
            uid,
            groups,
            method,
            issuer,
            claims,
        } = *k;
        PrincipalOwned {
            user: user.to_owned(),
            uid: uid.map(str::to_owned),
            groups: groups.to_vec(),
            method: method.to_owned(),
            issuer: issuer.map(str::to_owned),
            claims: claims.clone(),
        }
    }
    fn view(&self) -> PrincipalInputs<'_> {
        PrincipalInputs {
            user: &self.user,
            uid: self.uid.as_deref(),
            groups: &self.groups,
            method: &self.method,
            issuer: self.issuer.as_deref(),
            claims: &self.claims,
        }
    }
}

/// A cached principal; `serial` names its inputs in the entities cache's keys.
pub(crate) struct SubjectEntry {
    key: PrincipalOwned,
    pub serial: u64,
    pub uid: EntityUid,
    pub entity: Entity,
}

/// [`ResourceInputs`], owned.
enum ResourceOwned {
    Api([String; 7]),
    NonResource(String),
    Impersonation(ImpersonationTarget),
}

impl ResourceOwned {
    fn of(k: &ResourceInputs<'_>) -> ResourceOwned {
        match *k {
            ResourceInputs::Api {
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
            ResourceInputs::NonResource { path } => ResourceOwned::NonResource(path.to_owned()),
            ResourceInputs::Impersonation(t) => ResourceOwned::Impersonation(t.clone()),
        }
    }
    fn view(&self) -> ResourceInputs<'_> {
        match self {
            ResourceOwned::Api(
                [path, api_group, api_version, resource, subresource, namespace, name],
            ) => ResourceInputs::Api {
                path,
                api_group,
                api_version,
                resource,
                subresource,
                namespace,
                name,
            },
            ResourceOwned::NonResource(path) => ResourceInputs::NonResource { path },
            ResourceOwned::Impersonation(t) => ResourceInputs::Impersonation(t),
        }
    }
}

#[derive(Hash, PartialEq, Eq)]
struct EntitiesKey<'a> {
    subject: u64,
    action: &'a str,
    resource: ResourceInputs<'a>,
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

/// [`DeviceInputs`], owned.
struct DeviceOwned {
    id: String,
    bound: bool,
    posture: Option<PostureFacts>,
    posture_age: Option<u64>,
}

/// [`ContextInputs`], owned.
struct ContextOwned {
    method: String,
    issuer: Option<String>,
    amr: Vec<String>,
    token_age: Option<u64>,
    device: Option<DeviceOwned>,
    source_ip: IpAddr,
    websocket: bool,
    verb: String,
    epoch: u64,
}

impl ContextOwned {
    fn of(k: &ContextInputs<'_>) -> ContextOwned {
        let ContextInputs {
            method,
            issuer,
            amr,
            token_age,
            device,
            source_ip,
            websocket,
            verb,
            epoch,
        } = *k;
        ContextOwned {
            method: method.to_owned(),
            issuer: issuer.map(str::to_owned),
            amr: amr.to_vec(),
            token_age,
            device: device.map(|d| {
                let DeviceInputs {
                    id,
                    bound,
                    posture,
                    posture_age,
                } = d;
                DeviceOwned {
                    id: id.to_owned(),
                    bound,
                    posture: posture.cloned(),
                    posture_age,
                }
            }),
            source_ip,
            websocket,
            verb: verb.to_owned(),
            epoch,
        }
    }
    fn view(&self) -> ContextInputs<'_> {
        ContextInputs {
            method: &self.method,
            issuer: self.issuer.as_deref(),
            amr: &self.amr,
            token_age: self.token_age,
            device: self.device.as_ref().map(|d| DeviceInputs {
                id: &d.id,
                bound: d.bound,
                posture: d.posture.as_ref(),
                posture_age: d.posture_age,
            }),
            source_ip: self.source_ip,
            websocket: self.websocket,
            verb: &self.verb,
            epoch: self.epoch,
        }
    }
}

pub(crate) struct ContextEntry {
    key: ContextOwned,
    pub context: Context,
}

impl ContextEntry {
    fn view(&self) -> ContextInputs<'_> {
        self.key.view()
    }
}

/// What an identity's last request was decided with (see the module docs); weak, so that it
/// never outlives the caches' own entries.
pub(crate) struct Recent {
    identity: InstanceId,
    subject: Weak<SubjectEntry>,
    entities: Weak<EntitiesEntry>,
    context: Weak<ContextEntry>,
}

/// Slots of the [`Recent`] table (a power of two).
const RECENT_SLOTS: usize = 4_096;

fn recent_slot(identity: InstanceId) -> usize {
    // Instance ids are handed out in sequence: consecutive ones take different slots.
    (identity.get() as usize) & (RECENT_SLOTS - 1)
}

/// The three caches of one engine, and the identities' [`Recent`] table.
pub(crate) struct BuildCache {
    /// foldhash, seeded per process: keys are hashed on every request (SipHash was ~3% of a
    /// request), and a collision only costs a rebuild, since entries are compared in full.
    hasher: foldhash::fast::RandomState,
    serials: AtomicU64,
    subjects: moka::sync::Cache<u64, Arc<SubjectEntry>, foldhash::fast::RandomState>,
    entities: moka::sync::Cache<u64, Arc<EntitiesEntry>, foldhash::fast::RandomState>,
    contexts: moka::sync::Cache<u64, Arc<ContextEntry>, foldhash::fast::RandomState>,
    /// [`RECENT_SLOTS`] slots, by [`recent_slot`].
    recent: Box<[ArcSwapOption<Recent>]>,
    /// Per slot, the last identity that could not take it (its instance id): it takes the slot
    /// when it comes again.
    seen: Box<[AtomicU64]>,
}

impl BuildCache {
    pub fn new() -> BuildCache {
        BuildCache {
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
            recent: (0..RECENT_SLOTS).map(|_| ArcSwapOption::empty()).collect(),
            seen: (0..RECENT_SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The principal for `key`: cached, or made by `build` (and cached when it succeeds).
    fn subject(
        &self,
        key: PrincipalInputs<'_>,
        build: impl FnOnce(&PrincipalInputs<'_>) -> Result<(EntityUid, Entity), BuildError>,
    ) -> Result<Arc<SubjectEntry>, BuildError> {
        let hash = self.hasher.hash_one(key);
        if let Some(e) = self.subjects.get(&hash) {
            if e.key.view() == key {
                return Ok(e);
            }
        }
        let (uid, entity) = build(&key)?;
        let entry = Arc::new(SubjectEntry {
            key: PrincipalOwned::of(&key),
            serial: self.serials.fetch_add(1, Ordering::Relaxed),
            uid,
            entity,
        });
        self.subjects.insert(hash, entry.clone());
        Ok(entry)
    }

    /// The entities for `key.subject` (a serial from [`BuildCache::subject`]) doing
    /// `key.action` on `key.resource`: cached, or made by `build` from `key.resource`.
    fn entities(
        &self,
        key: EntitiesKey<'_>,
        build: impl FnOnce(&ResourceInputs<'_>) -> Result<(EntityUid, EntityUid, Entities), BuildError>,
    ) -> Result<Arc<EntitiesEntry>, BuildError> {
        let hash = self.hasher.hash_one(&key);
        if let Some(e) = self.entities.get(&hash) {
            if e.key() == key {
                return Ok(e);
            }
        }
        let (principal, resource_uid, entities) = build(&key.resource)?;
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

    /// The context for `key`: cached, or made by `build`.
    fn context(
        &self,
        key: ContextInputs<'_>,
        build: impl FnOnce(&ContextInputs<'_>) -> Result<Context, BuildError>,
    ) -> Result<Arc<ContextEntry>, BuildError> {
        let hash = self.hasher.hash_one(key);
        if let Some(e) = self.contexts.get(&hash) {
            if e.view() == key {
                return Ok(e);
            }
        }
        let context = build(&key)?;
        let entry = Arc::new(ContextEntry {
            key: ContextOwned::of(&key),
            context,
        });
        self.contexts.insert(hash, entry.clone());
        Ok(entry)
    }

    /// The entities and context of a request: the principal of `principal`, doing `action` on
    /// `resource`, in the context `context`. Taken from the [`Recent`] of `identity` when they
    /// equal its, else from the caches, or built by `build_principal`, `build_entities` (given
    /// the principal) and `build_context`; the identity's `Recent` then remembers them.
    #[allow(clippy::too_many_arguments)]
    pub fn prepare(
        &self,
        identity: Option<InstanceId>,
        principal: PrincipalInputs<'_>,
        action: &str,
        resource: ResourceInputs<'_>,
        context: ContextInputs<'_>,
        build_principal: impl FnOnce(&PrincipalInputs<'_>) -> Result<(EntityUid, Entity), BuildError>,
        build_entities: impl FnOnce(
            &SubjectEntry,
            &ResourceInputs<'_>,
        ) -> Result<(EntityUid, EntityUid, Entities), BuildError>,
        build_context: impl FnOnce(&ContextInputs<'_>) -> Result<Context, BuildError>,
    ) -> Result<(Arc<EntitiesEntry>, Arc<ContextEntry>), BuildError> {
        let slot = identity.map(|id| (id, recent_slot(id)));
        // A guard, not a reference count; nothing here awaits.
        let guard = slot.map(|(_, i)| self.recent[i].load());
        let occupant = guard.as_ref().and_then(|g| g.as_deref());
        let recent = occupant.filter(|r| Some(r.identity) == identity);
        let s = match recent.and_then(|r| r.subject.upgrade()) {
            Some(s) => s,
            None => self.subject(principal, build_principal)?,
        };
        let key = EntitiesKey {
            subject: s.serial,
            action,
            resource,
        };
        let e = match recent.and_then(|r| r.entities.upgrade()) {
            Some(e) if e.key() == key => e,
            _ => self.entities(key, |resource| build_entities(&s, resource))?,
        };
        let c = match recent.and_then(|r| r.context.upgrade()) {
            Some(c) if c.view() == context => c,
            _ => self.context(context, build_context)?,
        };
        let unchanged = recent.is_some_and(|r| {
            std::ptr::eq(r.subject.as_ptr(), Arc::as_ptr(&s))
                && std::ptr::eq(r.entities.as_ptr(), Arc::as_ptr(&e))
                && std::ptr::eq(r.context.as_ptr(), Arc::as_ptr(&c))
        });
        if let (Some((identity, i)), false) = (slot, unchanged) {
            // The slot is this identity's, free, or held by entries the caches let go; or the
            // identity comes again after it could not take the slot.
            let admit = recent.is_some()
                || occupant.is_none_or(|o| o.subject.strong_count() == 0)
                || self.seen[i].load(Ordering::Relaxed) == identity.get();
            if admit {
                self.recent[i].store(Some(Arc::new(Recent {
                    identity,
                    subject: Arc::downgrade(&s),
                    entities: Arc::downgrade(&e),
                    context: Arc::downgrade(&c),
                })));
            } else {
                self.seen[i].store(identity.get(), Ordering::Relaxed);
            }
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

    /// Whether the [`Recent`] of `identity` (if any) can still reach each of its entries.
    #[cfg(test)]
    pub fn recent_reaches(&self, identity: InstanceId) -> Option<[bool; 3]> {
        let guard = self.recent[recent_slot(identity)].load();
        let r = guard.as_deref().filter(|r| r.identity == identity)?;
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
