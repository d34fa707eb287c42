//! OIDC / JWT bearer-token authentication.
//!
//! Owns the configured issuers (each with its signing keys, fetched through discovery and kept
//! fresh by `source`), the verification of a token against exactly the issuer it names
//! (`verify`), and a cache of verified tokens keyed by the token's SHA-256 that never outlives a
//! token's `exp`. It must never log a token, never take a key from the token itself (`jku`,
//! `x5u`, `jwk`, `x5c`), and never accept an unsigned or HMAC-signed token.
//!
//! Order of checks for an uncached token: size; JWS shape; header (`alg` a public-key algorithm,
//! no `crit`/`jku`/`x5u`/`jwk`); unverified `iss` picks the issuer (exact match); issuer's size
//! limit and algorithm list; key by `kid` in that issuer's set only (refetched on an unknown kid
//! under the rules in `source.rs`);
//! signature, `iss`, `aud`, `exp`, `nbf` with the leeway; `iat`, lifetime, claim rules; mapping.

mod discovery;
pub(crate) mod keys;
mod source;
pub(crate) mod verify;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use moka::future::Cache;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use super::credentials::BearerToken;
use super::{AuthnError, Identity};
use crate::config::jwt::JwtAuthenticator;
use source::{Clock, KeySource, SourceId};
use verify::{loggable, IssuerRules};

/// Timings and limits of the authenticator. [`Default`] is what the gateway uses; tests shorten
/// the intervals.
#[derive(Clone, Debug)]
pub struct OidcOptions {
    /// Scheduled key refresh while the last one succeeded.
    pub refresh_interval: Duration,
    /// Scheduled key refresh while keys never loaded or the last attempt failed.
    pub retry_interval: Duration,
    /// Shortest time between two key fetches for unknown kids, per issuer: what made-up kids
    /// can cost the IdP, and how long they can hold back a real new kid.
    pub kid_miss_floor: Duration,
    /// How long a kid that a fetch did not find is refused without asking the IdP again
    /// (unless the key set changes meanwhile).
    pub unknown_kid_memory: Duration,
    /// Per HTTP request (discovery, JWKS), connect included.
    pub fetch_timeout: Duration,
    /// Largest discovery document or JWKS accepted.
    pub max_response_bytes: usize,
    /// Longest a verified token stays cached (never beyond its `exp`).
    pub cache_ttl: Duration,
    /// Most verified tokens cached at once.
    pub cache_capacity: u64,
}

impl Default for OidcOptions {
    fn default() -> Self {
        OidcOptions {
            refresh_interval: Duration::from_secs(600),
            retry_interval: Duration::from_secs(10),
            kid_miss_floor: Duration::from_secs(1),
            unknown_kid_memory: Duration::from_secs(10),
            fetch_timeout: Duration::from_secs(5),
            max_response_bytes: 1024 * 1024,
            cache_ttl: Duration::from_secs(300),
            cache_capacity: 100_000,
        }
    }
}

/// Why the authenticator could not be built from its config.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("authentication.jwt[{index}] (issuer {issuer}): {message}")]
    Config {
        index: usize,
        issuer: String,
        message: String,
    },
}

/// Counters, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OidcStats {
    /// Tokens that went through signature verification (cache misses that got that far).
    pub verifications: u64,
    /// Tokens answered from the cache.
    pub cache_hits: u64,
    /// Tokens refused again from the bad-signature cache (no public-key verification).
    pub refusals_cached: u64,
}

/// How many tokens with a bad signature are remembered, and for how long at most.
const REFUSED_CAPACITY: u64 = 10_000;
const REFUSED_TTL: Duration = Duration::from_secs(300);

/// A token whose signature did not verify with its issuer's keys: refused again without another
/// public-key verification while the config and that issuer's key set are the ones it failed
/// against (a key change makes it count for nothing, so a valid token is never refused by it).
#[derive(Clone)]
struct Refused {
    issuer: Arc<str>,
    generation: u64,
    key_generation: u64,
    reason: Arc<str>,
}

struct Issuer {
    rules: IssuerRules,
    source: Arc<KeySource>,
}

struct State {
    issuers: HashMap<String, Arc<Issuer>>,
    /// The largest `maxTokenBytes` of any issuer: the limit before the issuer is known.
    max_token_bytes: usize,
    /// Bumped on every config change; cache entries from an older config are not used.
    generation: u64,
}

#[derive(Clone)]
struct CacheEntry {
    verified: Verified,
    generation: u64,
    /// The issuer's key-set generation when the token was verified: after a key refresh the
    /// token is verified again, so a key withdrawn by the IdP stops working at once.
    key_generation: u64,
    ttl: Duration,
    /// When the entry was made plus `ttl`: a connection's [`TokenMemo`] keeps it no longer.
    until: Instant,
}

/// The last token a connection presented and what it was verified as. The next request on the
/// connection with the same token (kubectl sends one token over one HTTP/2 connection) is
/// answered from here without hashing the token or looking in the shared cache, under the same
/// rules as a cache hit: the token not expired, the entry's cache TTL not over, the config and
/// the issuer's keys unchanged since it was verified. Never holds a refused token.
#[derive(Default)]
pub struct TokenMemo(arc_swap::ArcSwapOption<Memo>);

struct Memo {
    token: Box<str>,
    entry: CacheEntry,
}

impl std::fmt::Debug for TokenMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenMemo(<redacted>)")
    }
}

impl TokenMemo {
    fn remember(&self, token: &str, entry: &CacheEntry) {
        self.0.store(Some(Arc::new(Memo {
            token: token.into(),
            entry: entry.clone(),
        })));
    }
}

/// A verified token: the identity and the token's audiences that its issuer accepts.
#[derive(Clone, Debug)]
pub(crate) struct Verified {
    pub(crate) identity: Arc<Identity>,
    pub(crate) audiences: Arc<[String]>,
}

struct EntryExpiry;

impl moka::Expiry<[u8; 32], CacheEntry> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &CacheEntry,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// Verifies JWT bearer tokens from the configured issuers.
pub struct OidcAuthenticator {
    state: ArcSwap<State>,
    cache: Cache<[u8; 32], CacheEntry>,
    /// Bad signatures, by the token's SHA-256 (see [`Refused`]).
    refused: Cache<[u8; 32], Refused>,
    refusals_cached: AtomicU64,
    opts: OidcOptions,
    /// The time the key sources' refetch rules read.
    clock: Clock,
    stop: CancellationToken,
    update_lock: tokio::sync::Mutex<()>,
    verifications: AtomicU64,
    cache_hits: AtomicU64,
}

impl std::fmt::Debug for OidcAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state.load();
        let mut issuers: Vec<&String> = state.issuers.keys().collect();
        issuers.sort();
        f.debug_struct("OidcAuthenticator")
            .field("issuers", &issuers)
            .finish_non_exhaustive()
    }
}

impl Drop for OidcAuthenticator {
    fn drop(&mut self) {
        for issuer in self.state.load().issuers.values() {
            issuer.source.cancel.cancel();
        }
    }
}

fn source_id(index: usize, c: &JwtAuthenticator) -> Result<SourceId, OidcError> {
    let err = |message: String| OidcError::Config {
        index,
        issuer: c.issuer.url.clone(),
        message,
    };
    let ca_pem = c.ca_pem().map_err(|e| err(e.to_string()))?;
    let rules_algs = c
        .signing_algorithms
        .iter()
        .map(|a| verify::header_alg(a).map_err(|e| err(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(SourceId {
        issuer_url: c.issuer.url.clone(),
        discovery_url: c.discovery_url(),
        ca_pem,
        algorithms: rules_algs,
    })
}

impl OidcAuthenticator {
    /// Builds issuers from config and starts background refresh tasks (stopped by `stop`). Does
    /// an initial key load concurrently and does not fail if an IdP is down (it's reported by
    /// not_loaded()).
    pub async fn new(
        cfg: &[JwtAuthenticator],
        stop: CancellationToken,
    ) -> Result<Arc<OidcAuthenticator>, OidcError> {
        Self::with_options(cfg, stop, OidcOptions::default()).await
    }

    /// [`OidcAuthenticator::new`] with non-default timings and limits.
    pub async fn with_options(
        cfg: &[JwtAuthenticator],
        stop: CancellationToken,
        opts: OidcOptions,
    ) -> Result<Arc<OidcAuthenticator>, OidcError> {
        Self::with_clock(cfg, stop, opts, Clock::default()).await
    }

    /// [`OidcAuthenticator::with_options`] whose key sources read the time from `clock`.
    pub(crate) async fn with_clock(
        cfg: &[JwtAuthenticator],
        stop: CancellationToken,
        opts: OidcOptions,
        clock: Clock,
    ) -> Result<Arc<OidcAuthenticator>, OidcError> {
        let cache = Cache::builder()
            .max_capacity(opts.cache_capacity)
            .expire_after(EntryExpiry)
            .build();
        let auth = Arc::new(OidcAuthenticator {
            state: ArcSwap::from_pointee(State {
                issuers: HashMap::new(),
                max_token_bytes: 0,
                generation: 0,
            }),
            cache,
            refused: Cache::builder()
                .max_capacity(REFUSED_CAPACITY)
                .time_to_live(REFUSED_TTL)
                .build(),
            refusals_cached: AtomicU64::new(0),
            opts,
            clock,
            stop,
            update_lock: tokio::sync::Mutex::new(()),
            verifications: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
        });
        auth.update(cfg).await?;
        Ok(auth)
    }

    /// Replaces the issuer set (config reload); keeps key sets of unchanged issuers.
    ///
    /// An issuer is unchanged for its keys when its URL, discovery URL, CA and signing
    /// algorithms are; its other rules (audiences, mappings, ...) are replaced either way. Cached
    /// tokens are dropped. On error nothing changes.
    pub async fn update(&self, cfg: &[JwtAuthenticator]) -> Result<(), OidcError> {
        let _serial = self.update_lock.lock().await;
        let old = self.state.load_full();
        let mut issuers = HashMap::new();
        let mut fresh: Vec<Arc<KeySource>> = Vec::new();
        let mut max_token_bytes = 0;
        for (index, c) in cfg.iter().enumerate() {
            let err = |message: String| OidcError::Config {
                index,
                issuer: c.issuer.url.clone(),
                message,
            };
            let rules = IssuerRules::from_config(c).map_err(|e| err(e.to_string()))?;
            if issuers.contains_key(&rules.url) {
                return Err(err("duplicate issuer url".into()));
            }
            let id = source_id(index, c)?;
            let reuse = old
                .issuers
                .get(&rules.url)
                .filter(|i| i.source.id == id && !i.source.cancel.is_cancelled())
                .map(|i| i.source.clone());
            let source = match reuse {
                Some(s) => s,
                None => {
                    let s = Arc::new(
                        KeySource::new(id, &self.opts, self.stop.child_token(), self.clock.clone())
                            .map_err(|e| err(e.to_string()))?,
                    );
                    fresh.push(s.clone());
                    s
                }
            };
            max_token_bytes = max_token_bytes.max(rules.max_token_bytes);
            issuers.insert(rules.url.clone(), Arc::new(Issuer { rules, source }));
        }

        // Initial loads, concurrently; an IdP that is down is retried by the timer.
        futures_util::future::join_all(fresh.iter().map(|s| s.refresh("start-up"))).await;
        for s in &fresh {
            tokio::spawn(s.clone().run());
        }
        for (url, i) in &old.issuers {
            let kept = issuers
                .get(url)
                .is_some_and(|n| Arc::ptr_eq(&n.source, &i.source));
            if !kept {
                i.source.cancel.cancel();
            }
        }
        self.state.store(Arc::new(State {
            issuers,
            max_token_bytes,
            generation: old.generation + 1,
        }));
        self.cache.invalidate_all();
        Ok(())
    }

    /// Issuer URLs whose keys have never loaded.
    /// Whether any issuer is configured (a config reload may add or remove them all).
    pub fn has_issuers(&self) -> bool {
        !self.state.load().issuers.is_empty()
    }

    pub fn not_loaded(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .state
            .load()
            .issuers
            .values()
            .filter(|i| i.source.keys().is_none())
            .map(|i| i.rules.url.clone())
            .collect();
        v.sort();
        v
    }

    /// The last key-fetch error per issuer, for `/readyz` detail and logs.
    pub fn fetch_errors(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .state
            .load()
            .issuers
            .values()
            .filter_map(|i| Some((i.rules.url.clone(), i.source.last_error()?.to_string())))
            .collect();
        v.sort();
        v
    }

    pub fn stats(&self) -> OidcStats {
        OidcStats {
            verifications: self.verifications.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            refusals_cached: self.refusals_cached.load(Ordering::Relaxed),
        }
    }

    /// Verifies a bearer token and returns the identity it maps to.
    pub async fn authenticate(&self, token: &BearerToken) -> Result<Arc<Identity>, AuthnError> {
        self.verify_token(token.expose()).await.map(|v| v.identity)
    }

    /// As [`OidcAuthenticator::authenticate`], for a token that came on a connection with `memo`
    /// (see [`TokenMemo`]).
    pub async fn authenticate_on(
        &self,
        token: &BearerToken,
        memo: &TokenMemo,
    ) -> Result<Arc<Identity>, AuthnError> {
        self.verify_token_on(token.expose(), Some(memo))
            .await
            .map(|v| v.identity)
    }

    /// Whether a remembered verification may still be used: the token not expired, the config
    /// and the issuer's keys unchanged since.
    fn usable(state: &State, e: &CacheEntry) -> bool {
        let live = e
            .verified
            .identity
            .expires_at()
            .is_some_and(|exp| SystemTime::now() < exp);
        let keys_unchanged = e
            .verified
            .identity
            .facts()
            .issuer
            .as_deref()
            .and_then(|iss| state.issuers.get(iss))
            .is_some_and(|i| i.source.generation() == e.key_generation);
        live && keys_unchanged && e.generation == state.generation
    }

    /// Verifies a token given as a string (TokenReview), with its accepted audiences.
    pub(crate) async fn verify_token(&self, token: &str) -> Result<Verified, AuthnError> {
        self.verify_token_on(token, None).await
    }

    async fn verify_token_on(
        &self,
        token: &str,
        memo: Option<&TokenMemo>,
    ) -> Result<Verified, AuthnError> {
        let state = self.state.load_full();
        if state.issuers.is_empty() {
            return Err(AuthnError::TokenAuthNotConfigured);
        }
        if token.len() > state.max_token_bytes {
            return Err(AuthnError::InvalidToken(format!(
                "token of {} bytes exceeds the limit of {} bytes",
                token.len(),
                state.max_token_bytes
            )));
        }
        if let Some(memo) = memo {
            // A guard, not a reference count: it is dropped before anything below awaits.
            let remembered = memo.0.load();
            if let Some(m) = remembered.as_deref() {
                // Compared in constant time, as a secret.
                let same = crate::ct::eq(m.token.as_bytes(), token.as_bytes());
                if same && Instant::now() < m.entry.until && Self::usable(&state, &m.entry) {
                    self.cache_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(m.entry.verified.clone());
                }
            }
        }
        // aws-lc's SHA-256 (SHA-NI / AVX2 assembly), as rustls uses: this runs per request.
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.as_ref());
        if let Some(e) = self.cache.get(&key).await {
            if Self::usable(&state, &e) {
                self.cache_hits.fetch_add(1, Ordering::Relaxed);
                if let Some(m) = memo {
                    m.remember(token, &e);
                }
                return Ok(e.verified);
            }
            self.cache.invalidate(&key).await;
        }
        if let Some(r) = self.refused.get(&key).await {
            if r.generation == state.generation
                && state
                    .issuers
                    .get(&*r.issuer)
                    .is_some_and(|i| i.source.generation() == r.key_generation)
            {
                self.refusals_cached.fetch_add(1, Ordering::Relaxed);
                return Err(AuthnError::BadSignature(format!(
                    "{} (refused before; the issuer's keys have not changed since)",
                    r.reason
                )));
            }
            self.refused.invalidate(&key).await;
        }
        // The issuer's key generation before verifying: if the keys change meanwhile, a failure
        // is remembered against the old generation and so never used.
        let before = verify::parse_unverified(token).ok().and_then(|t| {
            let i = state.issuers.get(&t.iss)?;
            Some((Arc::<str>::from(t.iss.as_str()), i.source.generation()))
        });
        let verified = match self.verify_uncached(&state, token).await {
            Ok(v) => v,
            Err(AuthnError::BadSignature(reason)) => {
                if let Some((issuer, key_generation)) = before {
                    self.refused
                        .insert(
                            key,
                            Refused {
                                issuer,
                                generation: state.generation,
                                key_generation,
                                reason: Arc::from(reason.as_str()),
                            },
                        )
                        .await;
                }
                return Err(AuthnError::BadSignature(reason));
            }
            Err(e) => return Err(e),
        };
        let key_generation = verified
            .identity
            .facts()
            .issuer
            .as_deref()
            .and_then(|iss| state.issuers.get(iss))
            .map(|i| i.source.generation());
        if let (Some(exp), Some(key_generation)) = (verified.identity.expires_at(), key_generation)
        {
            let left = exp
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            let ttl = left.min(self.opts.cache_ttl);
            if !ttl.is_zero() {
                let entry = CacheEntry {
                    verified: verified.clone(),
                    generation: state.generation,
                    key_generation,
                    ttl,
                    until: Instant::now() + ttl,
                };
                if let Some(m) = memo {
                    m.remember(token, &entry);
                }
                self.cache.insert(key, entry).await;
            }
        }
        Ok(verified)
    }

    async fn verify_uncached(&self, state: &State, token: &str) -> Result<Verified, AuthnError> {
        self.verify_uncached_claims(state, token)
            .await
            .map(|(verified, _)| verified)
    }

    /// Verifies a token (never from the cache) and returns its claims next to the identity they
    /// map to. For signed documents that are posted once (device posture reports), not presented
    /// on every request.
    pub(crate) async fn verify_with_claims(
        &self,
        token: &str,
    ) -> Result<(Verified, Map<String, Value>), AuthnError> {
        let state = self.state.load_full();
        if state.issuers.is_empty() {
            return Err(AuthnError::TokenAuthNotConfigured);
        }
        if token.len() > state.max_token_bytes {
            return Err(AuthnError::InvalidToken(format!(
                "token of {} bytes exceeds the limit of {} bytes",
                token.len(),
                state.max_token_bytes
            )));
        }
        self.verify_uncached_claims(&state, token).await
    }

    async fn verify_uncached_claims(
        &self,
        state: &State,
        token: &str,
    ) -> Result<(Verified, Map<String, Value>), AuthnError> {
        let t = verify::parse_unverified(token)?;
        let issuer = state
            .issuers
            .get(&t.iss)
            .ok_or_else(|| AuthnError::UnknownIssuer(loggable(&t.iss)))?;
        let rules = &issuer.rules;
        if token.len() > rules.max_token_bytes {
            return Err(AuthnError::InvalidToken(format!(
                "token of {} bytes exceeds maxTokenBytes {} of issuer {}",
                token.len(),
                rules.max_token_bytes,
                rules.url
            )));
        }
        if !rules.algorithms.contains(&t.alg) {
            return Err(AuthnError::InvalidToken(format!(
                "alg {:?} is not in the signingAlgorithms of issuer {}",
                t.alg, rules.url
            )));
        }
        let (set, candidates) = self.candidate_keys(state, issuer, &t).await?;
        self.verifications.fetch_add(1, Ordering::Relaxed);
        let validation = rules.validation(t.alg);
        let mut claims: Option<Map<String, Value>> = None;
        for &i in &candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &set.keys[i].key, &validation) {
                Ok(data) => {
                    claims = Some(data.claims);
                    break;
                }
                Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::InvalidSignature) => {
                    continue
                }
                Err(e) => return Err(verify::map_jwt_error(&e, &rules.url)),
            }
        }
        let Some(claims) = claims else {
            return Err(AuthnError::BadSignature(match &t.kid {
                Some(kid) => format!(
                    "signature does not verify with key {} of issuer {}",
                    loggable(kid),
                    rules.url
                ),
                None => format!(
                    "token has no kid and its signature verifies with none of the {} {:?} keys \
                     of issuer {}",
                    candidates.len(),
                    t.alg,
                    rules.url
                ),
            }));
        };
        let (identity, audiences) = rules.map_claims(&claims, SystemTime::now())?;
        Ok((
            Verified {
                identity: Arc::new(identity),
                audiences: audiences.into(),
            },
            claims,
        ))
    }

    /// The keys of the token's issuer that may verify it, refreshing on an unknown kid as the
    /// key source's rules allow.
    async fn candidate_keys(
        &self,
        state: &State,
        issuer: &Issuer,
        t: &verify::Unverified,
    ) -> Result<(Arc<keys::KeySet>, Vec<usize>), AuthnError> {
        let src = &issuer.source;
        let url = &issuer.rules.url;
        let ticket = src.ticket();
        let mut set = src.keys();
        let unusable = |set: &keys::KeySet, kid: &str| {
            set.skipped_kid(kid).map(|s| {
                AuthnError::InvalidToken(format!(
                    "key {} of issuer {url} is not usable: {}",
                    loggable(kid),
                    s.reason
                ))
            })
        };
        if let Some(kid) = &t.kid {
            if let Some(e) = set.as_deref().and_then(|s| unusable(s, kid)) {
                return Err(e);
            }
            if !set.as_deref().is_some_and(|s| s.has_kid(kid)) {
                // Tokens signed with a key the IdP withdrew come back until they expire; asking
                // the IdP again for each would tell nothing new.
                if src.retired(kid) {
                    return Err(left_key_set(kid, url));
                }
                src.refresh_on_miss(Some(kid), ticket).await;
                set = src.keys();
            }
        } else if set.is_none() {
            src.refresh_on_miss(None, ticket).await;
            set = src.keys();
        }
        let Some(set) = set else {
            return Err(AuthnError::IssuerKeysUnavailable {
                issuer: url.to_owned(),
                cause: src.last_error().map(|e| crate::util::chain::SharedCause(e)),
            });
        };
        let candidates: Vec<usize> = match &t.kid {
            Some(kid) => {
                if !set.has_kid(kid) {
                    if let Some(e) = unusable(&set, kid) {
                        return Err(e);
                    }
                    // Checked before other issuers: several issuer entries may publish the same
                    // keys, and the others may not have seen the removal yet.
                    if src.retired(kid) {
                        return Err(left_key_set(kid, url));
                    }
                    let other = state.issuers.values().find(|o| {
                        o.rules.url != *url && o.source.keys().is_some_and(|s| s.has_kid(kid))
                    });
                    return Err(match other {
                        Some(o) => AuthnError::BadSignature(format!(
                            "signed by a key of another issuer: kid {} belongs to {}, the \
                             token's iss is {url}",
                            loggable(kid),
                            o.rules.url
                        )),
                        None => AuthnError::InvalidToken(format!(
                            "kid {} not found in the keys of issuer {url}",
                            loggable(kid)
                        )),
                    });
                }
                let found: Vec<usize> = (0..set.keys.len())
                    .filter(|&i| {
                        set.keys[i].kid.as_deref() == Some(kid.as_str())
                            && set.keys[i].accepts(t.alg)
                    })
                    .collect();
                if found.is_empty() {
                    let k = set
                        .by_kid(kid)
                        .next()
                        .map(|k| k.describe())
                        .unwrap_or_default();
                    return Err(AuthnError::InvalidToken(format!(
                        "key {} of issuer {url} is a {k}; the token uses alg {:?}",
                        loggable(kid),
                        t.alg
                    )));
                }
                found
            }
            None => {
                let found: Vec<usize> = (0..set.keys.len())
                    .filter(|&i| set.keys[i].accepts(t.alg))
                    .collect();
                if found.is_empty() {
                    return Err(AuthnError::InvalidToken(format!(
                        "token has no kid and issuer {url} has no {:?} key",
                        t.alg
                    )));
                }
                found
            }
        };
        Ok((set, candidates))
    }
}

fn left_key_set(kid: &str, url: &str) -> AuthnError {
    AuthnError::InvalidToken(format!(
        "key {} left the key set of issuer {url}: the IdP no longer publishes it",
        loggable(kid)
    ))
}

#[cfg(test)]
pub(crate) mod tests;
