//! One issuer's signing keys: fetched at start, refreshed on a timer and when a token names an
//! unknown `kid` (single flight, rate limited), and kept when the IdP is down or answers garbage.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwapOption;
use jsonwebtoken::Algorithm;
use tokio_util::sync::CancellationToken;

use super::discovery::Fetcher;
use super::keys::KeySet;
use super::OidcOptions;

/// What makes two sources the same: an unchanged entry keeps its keys across a config reload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SourceId {
    pub(crate) issuer_url: String,
    pub(crate) discovery_url: String,
    pub(crate) ca_pem: Vec<u8>,
    pub(crate) algorithms: Vec<Algorithm>,
}

pub(crate) struct KeySource {
    pub(crate) id: SourceId,
    fetcher: Fetcher,
    keys: ArcSwapOption<KeySet>,
    /// Bumped after every fetch attempt, successful or not.
    generation: AtomicU64,
    /// Whether the last attempt failed (then the timer retries sooner).
    last_failed: std::sync::atomic::AtomicBool,
    last_error: Mutex<Option<String>>,
    /// Held during a fetch (single flight); holds the time of the last on-demand fetch.
    refresh: tokio::sync::Mutex<Option<Instant>>,
    opts: OidcOptions,
    pub(crate) cancel: CancellationToken,
}

impl KeySource {
    pub(crate) fn new(
        id: SourceId,
        opts: &OidcOptions,
        cancel: CancellationToken,
    ) -> Result<KeySource, String> {
        let fetcher = Fetcher::new(&id.ca_pem, opts.fetch_timeout, opts.max_response_bytes)?;
        Ok(KeySource {
            id,
            fetcher,
            keys: ArcSwapOption::empty(),
            generation: AtomicU64::new(0),
            last_failed: Default::default(),
            last_error: Mutex::new(None),
            refresh: tokio::sync::Mutex::new(None),
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

    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// One fetch; the caller holds the `refresh` lock.
    async fn fetch_locked(&self, why: &str) {
        let url = self.url();
        let result = match self.fetcher.fetch_jwks(url, &self.id.discovery_url).await {
            Ok(body) => KeySet::parse(&body, &self.id.algorithms),
            Err(e) => Err(e),
        };
        match result {
            Ok(set) => {
                for s in &set.skipped {
                    tracing::warn!(issuer = url, kid = s.kid.as_deref().unwrap_or(""), reason = %s.reason, "JWKS key ignored");
                }
                tracing::info!(issuer = url, why, kids = ?set.kids(), "issuer signing keys loaded");
                self.keys.store(Some(Arc::new(set)));
                self.last_failed.store(false, Ordering::SeqCst);
                if let Ok(mut e) = self.last_error.lock() {
                    *e = None;
                }
            }
            Err(e) => {
                let kept = self.keys.load().is_some();
                tracing::warn!(issuer = url, why, error = %e, kept_last_good_keys = kept, "issuer signing keys not refreshed");
                self.last_failed.store(true, Ordering::SeqCst);
                if let Ok(mut last) = self.last_error.lock() {
                    *last = Some(e);
                }
            }
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// A scheduled fetch (start-up, timer). Waits for a fetch already in progress.
    pub(crate) async fn refresh(&self, why: &str) {
        let _guard = self.refresh.lock().await;
        self.fetch_locked(why).await;
    }

    /// A fetch because a token named a kid this source does not know (or keys never loaded).
    /// `seen` is the generation observed before the lookup that missed: if a fetch finished
    /// since, its result is used instead. At most one such fetch per
    /// [`OidcOptions::kid_miss_min_interval`]; callers arriving during a fetch wait for it.
    pub(crate) async fn refresh_on_miss(&self, seen: u64) {
        let mut last = self.refresh.lock().await;
        if self.generation() != seen {
            return;
        }
        if let Some(t) = *last {
            if t.elapsed() < self.opts.kid_miss_min_interval {
                tracing::debug!(
                    issuer = self.url(),
                    "kid-miss refresh skipped (rate limited)"
                );
                return;
            }
        }
        *last = Some(Instant::now());
        self.fetch_locked("unknown kid").await;
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
