//! One issuer's signing keys: fetched at start, refreshed on a timer and when a token names a kid
//! the source does not know, and kept when the IdP is down or answers garbage.
//!
//! An unknown kid is how an IdP announces a rotation (OpenID Connect Core §10.1.1), so it must
//! reach the IdP at once; it is also something anyone can write into a token. The rules that
//! serve both:
//!
//! - a token with an unknown kid waits for a fetch that started after the kid was looked up
//!   (single flight: every token waiting shares it), so a key the IdP published before the token
//!   arrived is found, whatever else was asked for just before;
//! - such fetches start at most once per [`OidcOptions::kid_miss_floor`], so made-up kids cost
//!   the IdP at most one request per floor, and hold a real new kid back by at most the floor;
//! - a token that waited for a fetch that failed is refused with it, not given another: the IdP
//!   is struggling, and the timer retries it soon enough;
//! - a kid that such a fetch did not find is remembered (bounded, for
//!   [`OidcOptions::unknown_kid_memory`]) and refused again without asking the IdP, until the key
//!   set or its `jwks_uri` changes;
//! - a kid of an earlier key set that the current one lacks is refused without asking the IdP.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwapOption;
use jsonwebtoken::Algorithm;
use tokio_util::sync::CancellationToken;

use super::discovery::{FetchError, Fetcher};
use super::keys::{JwksError, KeySet};
use super::OidcOptions;

/// Why the last fetch of an issuer's keys failed: the fetch itself, or the key set it brought.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeysError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Jwks(#[from] JwksError),
}

/// Most kids remembered as not found, per issuer. Beyond it the floor alone bounds the fetches.
const MISSING_CAPACITY: usize = 1024;
/// Most kids remembered as removed by the IdP, per issuer.
const RETIRED_CAPACITY: usize = 256;

fn digest(kid: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, kid.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(d.as_ref());
    key
}

/// What makes two sources the same: an unchanged entry keeps its keys across a config reload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SourceId {
    pub(crate) issuer_url: String,
    pub(crate) discovery_url: String,
    pub(crate) ca_pem: Vec<u8>,
    pub(crate) algorithms: Vec<Algorithm>,
}

/// Where the refetch rules read the time: the monotonic clock, or in unit tests one that moves
/// only when the test moves it.
#[derive(Clone, Default)]
pub(crate) enum Clock {
    #[default]
    Monotonic,
    #[cfg(test)]
    Manual(Arc<super::tests::ManualClock>),
}

impl Clock {
    fn now(&self) -> Instant {
        match self {
            Clock::Monotonic => Instant::now(),
            #[cfg(test)]
            Clock::Manual(c) => c.now(),
        }
    }

    async fn sleep_until(&self, t: Instant) {
        match self {
            Clock::Monotonic => tokio::time::sleep_until(t.into()).await,
            #[cfg(test)]
            Clock::Manual(c) => c.sleep_until(t).await,
        }
    }
}

/// What a lookup saw of the fetches: fetches numbered above `started` began after it, and a
/// generation other than `generation` means one ended since.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ticket {
    started: u64,
    generation: u64,
}

/// The fetches of a source; the mutex around it is held while one runs.
#[derive(Default)]
struct Fetches {
    /// When the last fetch for an unknown kid started.
    last_on_demand: Option<Instant>,
    /// The number of the last fetch, and whether it brought a key set.
    last: Option<(u64, bool)>,
}

/// What the source knows about kids beyond its current key set.
#[derive(Default)]
struct Kids {
    /// Kids that a fetch started after they were looked up did not find, and since when. By
    /// their SHA-256: a kid is as long as the token lets it be.
    missing: HashMap<[u8; 32], Instant>,
    /// Kids of earlier key sets that the current one lacks, oldest first.
    retired: VecDeque<Box<str>>,
    /// The `jwks_uri` the current key set came from.
    jwks_uri: String,
}

pub(crate) struct KeySource {
    pub(crate) id: SourceId,
    fetcher: Fetcher,
    keys: ArcSwapOption<KeySet>,
    /// Bumped after every fetch attempt, successful or not.
    generation: AtomicU64,
    /// Fetches started so far, whatever started them (see [`KeySource::ticket`]).
    started: AtomicU64,
    /// Whether the last attempt failed (then the timer retries sooner).
    last_failed: AtomicBool,
    last_error: Mutex<Option<Arc<KeysError>>>,
    /// Held during a fetch (single flight).
    fetches: tokio::sync::Mutex<Fetches>,
    kids: Mutex<Kids>,
    clock: Clock,
    opts: OidcOptions,
    pub(crate) cancel: CancellationToken,
}

impl KeySource {
    pub(crate) fn new(
        id: SourceId,
        opts: &OidcOptions,
        cancel: CancellationToken,
        clock: Clock,
    ) -> Result<KeySource, FetchError> {
        let fetcher = Fetcher::new(&id.ca_pem, opts.fetch_timeout, opts.max_response_bytes)?;
        Ok(KeySource {
            id,
            fetcher,
            keys: ArcSwapOption::empty(),
            generation: AtomicU64::new(0),
            started: AtomicU64::new(0),
            last_failed: Default::default(),
            last_error: Mutex::new(None),
            fetches: tokio::sync::Mutex::new(Fetches::default()),
            kids: Mutex::new(Kids::default()),
            clock,
            opts: opts.clone(),
            cancel,
        })
    }

    pub(crate) fn url(&self) -> &str {
        &self.id.issuer_url
    }

    pub(crate) fn keys(&self) -> Option<Arc<KeySet>> {
        self.keys.load_full()
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    pub(crate) fn last_error(&self) -> Option<Arc<KeysError>> {
        crate::util::sync::lock(&self.last_error).clone()
    }

    /// To be taken before a lookup in [`KeySource::keys`] that may miss, and handed to
    /// [`KeySource::refresh_on_miss`].
    pub(crate) fn ticket(&self) -> Ticket {
        Ticket {
            started: self.started.load(Ordering::SeqCst),
            generation: self.generation(),
        }
    }

    /// Whether `kid` was in an earlier key set of this issuer and is not in the current one.
    pub(crate) fn retired(&self, kid: &str) -> bool {
        self.kids
            .lock()
            .is_ok_and(|k| k.retired.iter().any(|r| **r == *kid))
    }

    /// Whether a fetch recently looked for `kid` and did not find it.
    fn known_missing(&self, kid: &str) -> bool {
        let Ok(mut kids) = self.kids.lock() else {
            return false;
        };
        let key = digest(kid);
        match kids.missing.get(&key) {
            Some(&since) if self.clock.now() < since + self.opts.unknown_kid_memory => true,
            Some(_) => {
                kids.missing.remove(&key);
                false
            }
            None => false,
        }
    }

    fn remember_missing(&self, kid: &str) {
        let now = self.clock.now();
        let Ok(mut kids) = self.kids.lock() else {
            return;
        };
        if kids.missing.len() >= MISSING_CAPACITY {
            let memory = self.opts.unknown_kid_memory;
            kids.missing.retain(|_, since| now < *since + memory);
        }
        if kids.missing.len() < MISSING_CAPACITY {
            kids.missing.insert(digest(kid), now);
        }
    }

    /// Whether the current keys answer the lookup: hold `kid`, or exist at all for no kid.
    fn answers(&self, kid: Option<&str>) -> bool {
        let keys = self.keys.load();
        match (keys.as_deref(), kid) {
            (Some(set), Some(kid)) => set.has_kid(kid) || set.skipped_kid(kid).is_some(),
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// Before `set` replaces the current keys: the kids it drops are retired, and when its kids
    /// or `jwks_uri` differ from the current ones, kids not found so far may be looked for again.
    fn note_new_set(&self, jwks_uri: &str, set: &KeySet) {
        let old = self.keys.load();
        let Ok(mut kids) = self.kids.lock() else {
            return;
        };
        let new: HashSet<&str> = set.all_kids().collect();
        let old_kids: HashSet<&str> = old
            .as_deref()
            .map(|o| o.all_kids().collect())
            .unwrap_or_default();
        if kids.jwks_uri == jwks_uri && old.is_some() && old_kids == new {
            return;
        }
        kids.missing.clear();
        kids.retired.retain(|k| !new.contains(&**k));
        for gone in old_kids.difference(&new) {
            if !kids.retired.iter().any(|r| **r == **gone) {
                if kids.retired.len() == RETIRED_CAPACITY {
                    kids.retired.pop_front();
                }
                kids.retired.push_back((*gone).into());
            }
        }
        kids.jwks_uri = jwks_uri.to_owned();
    }

    /// One fetch; the caller holds the `fetches` lock. Returns whether it brought a key set.
    async fn fetch_locked(&self, fetches: &mut Fetches, why: &str) -> bool {
        let number = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        let url = self.url();
        let result = match self.fetcher.fetch_jwks(url, &self.id.discovery_url).await {
            Ok((jwks_uri, body)) => KeySet::parse(&body, &self.id.algorithms)
                .map(|set| (jwks_uri, set))
                .map_err(KeysError::from),
            Err(e) => Err(KeysError::from(e)),
        };
        let ok = match result {
            Ok((jwks_uri, set)) => {
                for s in &set.skipped {
                    tracing::warn!(issuer = url, kid = s.kid.as_deref().unwrap_or(""), reason = %s.reason, "JWKS key ignored");
                }
                tracing::info!(issuer = url, why, kids = ?set.kids(), "issuer signing keys loaded");
                self.note_new_set(&jwks_uri, &set);
                self.keys.store(Some(Arc::new(set)));
                self.last_failed.store(false, Ordering::SeqCst);
                *crate::util::sync::lock(&self.last_error) = None;
                true
            }
            Err(e) => {
                let kept = self.keys.load().is_some();
                tracing::warn!(issuer = url, why, error = %e, kept_last_good_keys = kept, "issuer signing keys not refreshed");
                self.last_failed.store(true, Ordering::SeqCst);
                *crate::util::sync::lock(&self.last_error) = Some(Arc::new(e));
                false
            }
        };
        fetches.last = Some((number, ok));
        self.generation.fetch_add(1, Ordering::SeqCst);
        ok
    }

    /// A scheduled fetch (start-up, timer). Waits for a fetch already in progress.
    pub(crate) async fn refresh(&self, why: &str) {
        let mut fetches = self.fetches.lock().await;
        self.fetch_locked(&mut fetches, why).await;
    }

    /// A lookup of `kid` missed (or, with `None`, keys never loaded); `ticket` is
    /// [`KeySource::ticket`] from before that lookup. Returns when the keys are as fresh as the
    /// rules above allow; the caller looks again.
    pub(crate) async fn refresh_on_miss(&self, kid: Option<&str>, ticket: Ticket) {
        if kid.is_some_and(|k| self.known_missing(k)) {
            return;
        }
        loop {
            let mut fetches = self.fetches.lock().await;
            if self.answers(kid) {
                return;
            }
            if let Some((number, ok)) = fetches.last {
                if number > ticket.started {
                    if let (true, Some(kid)) = (ok, kid) {
                        self.remember_missing(kid);
                    }
                    return;
                }
                if !ok && self.generation() != ticket.generation {
                    return;
                }
            }
            if kid.is_some_and(|k| self.known_missing(k)) {
                return;
            }
            let now = self.clock.now();
            if let Some(ready) = fetches
                .last_on_demand
                .map(|t| t + self.opts.kid_miss_floor)
                .filter(|ready| now < *ready)
            {
                drop(fetches);
                tracing::debug!(
                    issuer = self.url(),
                    "unknown kid: waiting for the next key fetch"
                );
                tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    _ = self.clock.sleep_until(ready) => continue,
                }
            }
            fetches.last_on_demand = Some(now);
            let ok = self.fetch_locked(&mut fetches, "unknown kid").await;
            if let (true, Some(kid)) = (ok, kid) {
                if !self.answers(Some(kid)) {
                    self.remember_missing(kid);
                }
            }
            return;
        }
    }

    /// The timer: refreshes every `refresh_interval`, or every `retry_interval` while the last
    /// attempt failed, until cancelled.
    pub(crate) async fn run(self: Arc<Self>) {
        loop {
            let wait = if self.last_failed.load(Ordering::SeqCst) {
                self.opts.retry_interval
            } else {
                self.opts.refresh_interval
            };
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = self.refresh("periodic") => {}
            }
        }
    }
}
