//! The store on etcd, for several gateway replicas sharing locks and posture.
//!
//! Speaks etcd's v3 JSON gateway (`/v3/kv/range`, `/v3/kv/txn`, `/v3/lease/grant`,
//! `/v3/watch`) over HTTP/1.1 with the project's rustls client: no gRPC stack and no second
//! TLS stack. Keys and values are base64 in that API; numbers (revisions, ids) are strings.
//!
//! Layout under the configured prefix `P` (default `/ztgate`):
//!
//! - `P/locks/<lock id, escaped>`: a [`Lock`] as JSON;
//! - `P/posture/<device id, escaped>`: a [`PostureRecord`] as JSON.
//!
//! Escaping is percent-encoding of every byte but ASCII letters, digits and `-._~`, so a `/` in
//! an id can never reach another key.
//!
//! Every write is one etcd transaction. A record with an expiry is put with an etcd lease of its
//! remaining lifetime (+1 s), so etcd deletes it when it lapses and every replica sees the
//! delete on its watch; reads ignore an expired record before that anyway (see [`View`]).
//!
//! Each replica keeps a local [`View`]: loaded by a range at revision R when the store is
//! opened, then fed by a watch on the prefix from R+1. The watch task remembers the revision of
//! the last event it applied; when a connection ends (member killed, network) it reconnects to
//! the next endpoint and resumes from there, so no event is missed. When etcd answers that the
//! revision was compacted away, the task ranges again and applies the difference to the view as
//! ordinary changes (so subscribers such as the stream re-verifier learn about them), then
//! watches from the new revision. A write returns once the local view has applied it (or after
//! the request timeout, with a warning: it is committed in etcd either way).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::{Buf, Bytes, BytesMut};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

use super::config::EtcdConfig;
use super::store::Op;
use super::{
    BoxFuture, Lock, PostureRecord, Revision, State, Store, StoreError, StoreHealth, View,
};
use crate::tls::upstream::{ReloadingClientCert, ReloadingServerVerifier};

/// Bytes escaped in a key segment: everything but ASCII letters, digits and `-._~`.
const KEY_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Keys fetched per range request when loading.
const RANGE_PAGE: u64 = 1000;

impl EtcdConfig {
    /// Semantic problems, as (field path below `state.etcd`, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut err = |p: &str, m: String| out.push((p.to_owned(), m));
        if self.endpoints.is_empty() {
            err("endpoints", "at least one endpoint is required".into());
        }
        let mut https = false;
        for (i, e) in self.endpoints.iter().enumerate() {
            match parse_endpoint(e) {
                Ok(u) => https |= u.scheme_str() == Some("https"),
                Err(m) => err(&format!("endpoints[{i}]"), m.to_string()),
            }
        }
        if let Err(m) = check_prefix(&self.key_prefix) {
            err("keyPrefix", m.to_string());
        }
        if https && self.ca_file.is_none() {
            err(
                "caFile",
                "required with https endpoints (the CA etcd's serving certificates chain to)"
                    .into(),
            );
        }
        if let Some(ca) = &self.ca_file {
            match std::fs::read(ca) {
                Ok(pem) => {
                    if let Err(m) = crate::tls::client::roots_from_pem(&pem) {
                        err("caFile", format!("{}: {m}", ca.display()));
                    }
                }
                Err(e) => err("caFile", format!("{}: {e}", ca.display())),
            }
        }
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => err("keyFile", "required with certFile".into()),
            (None, Some(_)) => err("certFile", "required with keyFile".into()),
            (Some(c), Some(k)) => {
                if !https {
                    err(
                        "certFile",
                        "a client certificate needs https endpoints".into(),
                    );
                }
                if let Err(e) = client_key(c, k) {
                    err("certFile", e.to_string());
                }
            }
            (None, None) => {}
        }
        if self.dial_timeout.get().is_zero() {
            err("dialTimeout", "must be > 0".into());
        }
        if self.heartbeat_interval.get().is_zero() {
            err("heartbeatInterval", "must be > 0".into());
        }
        if self.max_staleness.get() <= self.heartbeat_interval.get() {
            err(
                "maxStaleness",
                format!(
                    "must be longer than heartbeatInterval ({:?})",
                    self.heartbeat_interval.get()
                ),
            );
        }
        out
    }
}

/// Why a `state.etcd` setting is refused (the operator's config).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
enum SettingError {
    #[error("{0:?} is not a URL: {1}")]
    NotUrl(String, #[source] http::uri::InvalidUri),
    #[error("{0:?}: the scheme must be https (or http)")]
    Scheme(String),
    #[error("{0:?} has no host")]
    NoHost(String),
    #[error("{0:?}: only scheme, host and port are allowed")]
    ExtraParts(String),
    #[error("{0:?} must start with /")]
    PrefixStart(String),
    #[error("{0:?} must not end with /")]
    PrefixEnd(String),
    #[error("must not contain control characters")]
    PrefixControl,
}

fn parse_endpoint(e: &str) -> Result<Uri, SettingError> {
    let u: Uri = e
        .parse()
        .map_err(|x| SettingError::NotUrl(e.to_owned(), x))?;
    match u.scheme_str() {
        Some("https" | "http") => {}
        _ => return Err(SettingError::Scheme(e.to_owned())),
    }
    if u.host().is_none_or(str::is_empty) {
        return Err(SettingError::NoHost(e.to_owned()));
    }
    if !matches!(u.path(), "" | "/") || u.query().is_some() {
        return Err(SettingError::ExtraParts(e.to_owned()));
    }
    Ok(u)
}

fn check_prefix(p: &str) -> Result<(), SettingError> {
    if !p.starts_with('/') {
        return Err(SettingError::PrefixStart(p.to_owned()));
    }
    if p.len() > 1 && p.ends_with('/') {
        return Err(SettingError::PrefixEnd(p.to_owned()));
    }
    if p.chars().any(char::is_control) {
        return Err(SettingError::PrefixControl);
    }
    Ok(())
}

fn client_key(
    c: &std::path::Path,
    k: &std::path::Path,
) -> Result<rustls::sign::CertifiedKey, crate::tls::TlsError> {
    let cert_pem = crate::tls::pem::read(c)?;
    let key_pem = crate::tls::pem::read(k)?;
    crate::tls::pem::certified_key(c, &cert_pem, k, &key_pem)
}

type EtcdClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Locks and posture records in etcd, with a local [`View`] kept current by a watch.
pub struct EtcdStore {
    inner: Arc<Inner>,
    watcher: tokio::task::JoinHandle<()>,
    prober: tokio::task::JoinHandle<()>,
    verifier: Option<Arc<ReloadingServerVerifier>>,
    client_cert: Arc<ReloadingClientCert>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.inner.endpoints)
            .field("prefix", &self.inner.prefix)
            .field("view", &self.inner.view)
            .finish()
    }
}

struct Inner {
    view: View,
    client: EtcdClient,
    endpoints: Vec<String>,
    /// The endpoint tried first (the last one that answered).
    current: AtomicUsize,
    prefix: String,
    dial_timeout: Duration,
    request_timeout: Duration,
    /// The etcd revision the view reflects (every event up to it applied).
    applied: tokio::sync::watch::Sender<Revision>,
    /// Freshness: when the view was last confirmed against a quorum.
    fresh: Freshness,
    /// The endpoint the watch is connected to, and whether it is connected now.
    watch_endpoint: AtomicUsize,
    watch_live: AtomicBool,
    /// Tells the watch to leave its member (which answers but has no quorum) for the next one.
    rewatch: tokio::sync::Notify,
}

/// When the view was last confirmed current, and why not since.
struct Freshness {
    origin: std::time::Instant,
    /// Milliseconds after `origin` at which the last confirming probe was sent.
    confirmed_ms: AtomicU64,
    /// Why the last probe did not confirm (empty after a confirmation).
    problem: std::sync::Mutex<String>,
    heartbeat: Duration,
    unready_after: Duration,
    max_staleness: Duration,
}

/// Why a heartbeat probe could not confirm the view is current (a health reason).
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("the watch on etcd is not connected")]
    WatchDown,
    /// The read failed; why, as the request path words it.
    #[error("{0}")]
    Call(String),
    #[error("unexpected etcd answer")]
    Answer(#[source] serde_json::Error),
    #[error("the watch has applied revision {applied}, etcd has {newest}")]
    Behind { applied: Revision, newest: Revision },
}

/// Why a key-value under the prefix is unreadable (it is skipped and logged).
#[derive(Debug, thiserror::Error)]
enum KvError {
    #[error(transparent)]
    KeyBase64(#[from] base64::DecodeError),
    #[error(transparent)]
    KeyUtf8(#[from] std::string::FromUtf8Error),
    #[error("{key}")]
    Value {
        key: String,
        #[source]
        source: base64::DecodeError,
    },
    #[error("{key}")]
    Name {
        key: String,
        #[source]
        source: std::str::Utf8Error,
    },
    #[error("{key}")]
    Record {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

impl Freshness {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn confirm(&self, sent_ms: u64) {
        self.confirmed_ms.fetch_max(sent_ms, Ordering::AcqRel);
        crate::util::sync::lock(&self.problem).clear();
    }

    fn trouble(&self, why: String) {
        *crate::util::sync::lock(&self.problem) = why;
    }

    fn health(&self) -> StoreHealth {
        let age = Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.confirmed_ms.load(Ordering::Acquire)),
        );
        if age <= self.unready_after {
            return StoreHealth::Current;
        }
        let reason = crate::util::sync::lock(&self.problem).clone();
        if age <= self.max_staleness {
            StoreHealth::Lagging {
                unconfirmed_for: age,
                reason,
            }
        } else {
            StoreHealth::Stale {
                unconfirmed_for: age,
                reason,
            }
        }
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.watcher.abort();
        self.prober.abort();
    }
}

fn unavailable(m: impl Into<String>) -> StoreError {
    StoreError::Unavailable(m.into())
}

impl EtcdStore {
    /// Connects, loads everything under the prefix and starts watching. Fails when no endpoint
    /// answers.
    pub async fn connect(cfg: &EtcdConfig) -> Result<EtcdStore, StoreError> {
        let problems = cfg.validate();
        if let Some((p, m)) = problems.into_iter().next() {
            return Err(StoreError::Invalid(format!("{p}: {m}")));
        }
        // TLS material that can be swapped while running (see `spawn_tls_reloaders`).
        let verifier = match &cfg.ca_file {
            Some(ca) => {
                let pem = std::fs::read(ca).map_err(|e| StoreError::Io {
                    path: ca.display().to_string(),
                    source: e,
                })?;
                let roots = crate::tls::pem::parse_ca_pem(&pem)
                    .map_err(|e| StoreError::Invalid(format!("caFile: {e}")))?;
                Some(
                    ReloadingServerVerifier::new(roots)
                        .map_err(|e| StoreError::Invalid(format!("caFile: {e}")))?,
                )
            }
            None => None,
        };
        let client_cert = ReloadingClientCert::new(match (&cfg.cert_file, &cfg.key_file) {
            (Some(c), Some(k)) => {
                Some(client_key(c, k).map_err(|e| StoreError::Invalid(e.to_string()))?)
            }
            _ => None,
        });
        let builder = rustls::ClientConfig::builder_with_provider(crate::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| StoreError::Invalid(format!("TLS setup: {e}")))?;
        let tls = match &verifier {
            // Full WebPKI verification against caFile; the wrapper only makes it swappable.
            Some(v) => builder
                .dangerous()
                .with_custom_certificate_verifier(v.clone())
                .with_client_cert_resolver(client_cert.clone()),
            // http:// endpoints only (validation requires caFile with https).
            None => builder
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_client_cert_resolver(client_cert.clone()),
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(cfg.dial_timeout.get()));
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        let inner = Arc::new(Inner {
            view: View::default(),
            client,
            endpoints: cfg
                .endpoints
                .iter()
                .map(|e| e.trim_end_matches('/').to_owned())
                .collect(),
            current: AtomicUsize::new(0),
            prefix: cfg.key_prefix.trim_end_matches('/').to_owned(),
            dial_timeout: cfg.dial_timeout.get(),
            request_timeout: cfg.dial_timeout.get() * 3,
            applied: tokio::sync::watch::channel(0).0,
            fresh: Freshness {
                origin: std::time::Instant::now(),
                confirmed_ms: AtomicU64::new(0),
                problem: std::sync::Mutex::new(String::new()),
                heartbeat: cfg.heartbeat_interval.get(),
                unready_after: (cfg.heartbeat_interval.get() * 2 + cfg.dial_timeout.get())
                    .min(cfg.max_staleness.get()),
                max_staleness: cfg.max_staleness.get(),
            },
            watch_endpoint: AtomicUsize::new(0),
            watch_live: AtomicBool::new(false),
            rewatch: tokio::sync::Notify::new(),
        });
        let loaded_at = inner.fresh.now_ms();
        let (rev, state) = inner.range_all().await?;
        inner.view.load(rev, state);
        inner.applied.send_replace(rev);
        // The range was a linearizable read: the view is current as of when it was sent.
        inner.fresh.confirm(loaded_at);
        let watcher = tokio::spawn(Arc::clone(&inner).watch_forever(rev));
        let prober = tokio::spawn(Arc::clone(&inner).probe_forever());
        Ok(EtcdStore {
            inner,
            watcher,
            prober,
            verifier,
            client_cert,
        })
    }

    /// Re-reads `caFile`, `certFile` and `keyFile` every `interval` and uses what changed for new
    /// connections to etcd (cert-manager renewals need no restart); a file that does not parse
    /// is logged and the last good material kept.
    pub fn spawn_tls_reloaders(
        &self,
        cfg: &EtcdConfig,
        interval: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let reloader = crate::reload::Reloader::new(stop);
        if let (Some(v), Some(ca)) = (&self.verifier, &cfg.ca_file) {
            let v = v.clone();
            reloader.watch_files("etcd CA", vec![ca.clone()], interval, move |files| {
                let roots = crate::tls::pem::parse_ca_pem(&files[0])?;
                Ok(v.replace(roots)?)
            });
        }
        if let (Some(c), Some(k)) = (&cfg.cert_file, &cfg.key_file) {
            let r = self.client_cert.clone();
            let (c, k) = (c.clone(), k.clone());
            reloader.watch_files(
                "etcd client certificate",
                vec![c.clone(), k.clone()],
                interval,
                move |files| {
                    r.store(crate::tls::pem::certified_key(
                        &c, &files[0], &k, &files[1],
                    )?);
                    Ok(())
                },
            );
        }
    }

    /// The etcd revision this replica's view has caught up with (every event under the prefix
    /// up to it applied). Unlike [`Store::revision`], it also moves on a resync that changed
    /// nothing.
    pub fn applied_revision(&self) -> Revision {
        *self.inner.applied.borrow()
    }
}

impl Inner {
    fn lock_key(&self, id: &str) -> String {
        format!(
            "{}/locks/{}",
            self.prefix,
            utf8_percent_encode(id, KEY_SEGMENT)
        )
    }

    fn posture_key(&self, device: &str) -> String {
        format!(
            "{}/posture/{}",
            self.prefix,
            utf8_percent_encode(device, KEY_SEGMENT)
        )
    }

    /// One JSON request to one endpoint, given at most `budget`. `Err((message, retry))`:
    /// `retry` when the failure is the endpoint's (unreachable, timeout, 5xx such as "leader
    /// changed") rather than a refusal of the request.
    async fn call_one(
        &self,
        idx: usize,
        path: &str,
        body: Bytes,
        budget: Duration,
    ) -> Result<Value, (String, bool)> {
        let ep = &self.endpoints[idx];
        let req = Request::post(format!("{ep}{path}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| (format!("{ep}{path}: {e}"), false))?;
        let fut = async {
            let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, bytes))
        };
        let (status, bytes) = match tokio::time::timeout(budget, fut).await {
            Err(_) => return Err((format!("{ep}: no answer within {budget:?}"), true)),
            Ok(Err(e)) => return Err((format!("{ep}: {e}"), true)),
            Ok(Ok(x)) => x,
        };
        let v: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| json!({"message": String::from_utf8_lossy(&bytes).into_owned()}));
        if status == StatusCode::OK {
            return Ok(v);
        }
        let msg = v
            .get("message")
            .or_else(|| v.get("error"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let retry = status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS;
        Err((format!("{ep}: HTTP {status}: {msg}"), retry))
    }

    /// One JSON request, tried on each endpoint in turn (starting with the last that answered)
    /// while the failure is the endpoint's, round after round until the request timeout has
    /// passed — or, when this replica already knows it cannot reach a quorum, for one dial
    /// timeout only, so writes are refused quickly. Each attempt gets at most the dial timeout.
    /// Retrying is safe: a put writes the same value again; a delete whose first attempt
    /// committed unseen finds nothing the second time, which `delete_lock`/`delete_posture`
    /// report as deleted when this replica still held the record.
    async fn call(&self, path: &str, body: Value) -> Result<Value, StoreError> {
        let body = Bytes::from(body.to_string());
        let n = self.endpoints.len();
        let budget = if self.fresh.health().is_current() {
            self.request_timeout
        } else {
            self.dial_timeout
        };
        let deadline = tokio::time::Instant::now() + budget;
        let mut last_err = String::new();
        loop {
            let first = self.current.load(Ordering::Relaxed);
            for i in 0..n {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    return Err(unavailable(format!(
                        "no etcd endpoint answered {path} within {budget:?}: {last_err}"
                    )));
                }
                let idx = (first + i) % n;
                match self
                    .call_one(idx, path, body.clone(), left.min(self.dial_timeout))
                    .await
                {
                    Ok(v) => {
                        self.current.store(idx, Ordering::Relaxed);
                        return Ok(v);
                    }
                    Err((e, true)) => last_err = e,
                    Err((e, false)) => {
                        return Err(unavailable(format!("etcd refused {path}: {e}")));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every `heartbeatInterval`: a linearizable read on the member the watch is connected to.
    /// It answers only when that member is part of a quorum, and tells the newest revision of
    /// any record under the prefix; once the watch has applied that, the view is confirmed
    /// current as of when the probe was sent. A member that answers the watch but fails two
    /// probes in a row is left for the next one.
    async fn probe_forever(self: Arc<Self>) {
        let mut failures = 0u32;
        let mut interval = tokio::time::interval(self.fresh.heartbeat);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let sent = self.fresh.now_ms();
            match self.probe().await {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!("etcd answers with a quorum again; state is current");
                    }
                    failures = 0;
                    self.fresh.confirm(sent);
                }
                Err(why) => {
                    let why = crate::util::chain::error_chain(&why);
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!(error = %why, "cannot confirm the state store is current");
                    }
                    if failures >= 2 && self.watch_live.load(Ordering::Acquire) {
                        self.rewatch.notify_waiters();
                    }
                    self.fresh.trouble(why);
                }
            }
        }
    }

    async fn probe(&self) -> Result<(), ProbeError> {
        if !self.watch_live.load(Ordering::Acquire) {
            return Err(ProbeError::WatchDown);
        }
        let idx = self.watch_endpoint.load(Ordering::Acquire) % self.endpoints.len();
        let start = format!("{}/", self.prefix);
        let end = prefix_end(start.as_bytes());
        let body = json!({
            "key": B64.encode(start.as_bytes()),
            "range_end": B64.encode(&end),
            "limit": "1",
            "sort_order": "DESCEND",
            "sort_target": "MOD",
            "keys_only": true,
        });
        let v = self
            .call_one(
                idx,
                "/v3/kv/range",
                Bytes::from(body.to_string()),
                self.dial_timeout,
            )
            .await
            .map_err(|(e, _)| ProbeError::Call(e))?;
        let resp: RangeResponse = serde_json::from_value(v).map_err(ProbeError::Answer)?;
        let newest = resp.kvs.first().map_or(0, |kv| kv.mod_revision);
        let applied = *self.applied.borrow();
        if applied < newest {
            return Err(ProbeError::Behind { applied, newest });
        }
        Ok(())
    }

    /// Everything under the prefix, at one revision (paged).
    async fn range_all(&self) -> Result<(Revision, State), StoreError> {
        let start = format!("{}/", self.prefix);
        let end = prefix_end(start.as_bytes());
        let mut key = start.into_bytes();
        let mut at: Option<Revision> = None;
        let mut state = State::default();
        loop {
            let mut req = json!({
                "key": B64.encode(&key),
                "range_end": B64.encode(&end),
                "limit": RANGE_PAGE.to_string(),
            });
            if let Some(r) = at {
                req["revision"] = json!(r.to_string());
            }
            let resp: RangeResponse = decode(self.call("/v3/kv/range", req).await?)?;
            let rev = *at.get_or_insert(resp.header.revision);
            for kv in &resp.kvs {
                match self.decode_kv(kv) {
                    Ok(Some(Op::PutLock { lock })) => {
                        state.locks.insert(lock.id.clone(), lock);
                    }
                    Ok(Some(Op::PutPosture { record })) => {
                        state.posture.insert(record.device_id.clone(), record);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(
                        error = %crate::util::chain::error_chain(&e),
                        "skipping an unreadable etcd record"
                    ),
                }
            }
            match (resp.more, resp.kvs.last()) {
                (true, Some(last)) => {
                    key = B64
                        .decode(&last.key)
                        .map_err(|e| unavailable(format!("etcd key not base64: {e}")))?;
                    key.push(0);
                }
                _ => return Ok((rev, state)),
            }
        }
    }

    /// What a key-value under the prefix means. `Ok(None)` for keys this version does not use.
    fn decode_kv(&self, kv: &KeyValue) -> Result<Option<Op>, KvError> {
        let key = B64.decode(&kv.key)?;
        let key = String::from_utf8(key)?;
        let Some(rest) = key.strip_prefix(&format!("{}/", self.prefix)) else {
            return Ok(None);
        };
        let value = match B64.decode(&kv.value) {
            Ok(v) => v,
            Err(source) => return Err(KvError::Value { key, source }),
        };
        let (kind, name) = rest.split_once('/').unwrap_or((rest, ""));
        let name = percent_decode_str(name)
            .decode_utf8()
            .map_err(|source| KvError::Name {
                key: key.clone(),
                source,
            })?
            .into_owned();
        let delete = kv.deleted;
        Ok(Some(match (kind, delete) {
            ("locks", true) => Op::DeleteLock { id: name },
            ("posture", true) => Op::DeletePosture { device_id: name },
            ("locks", false) => Op::PutLock {
                lock: serde_json::from_slice(&value)
                    .map_err(|source| KvError::Record { key, source })?,
            },
            ("posture", false) => Op::PutPosture {
                record: serde_json::from_slice(&value)
                    .map_err(|source| KvError::Record { key, source })?,
            },
            _ => return Ok(None),
        }))
    }

    /// A lease that lapses a second after `expires_at` (at least one second from now).
    async fn lease_for(&self, expires_at: SystemTime) -> Result<String, StoreError> {
        let left = expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let ttl = left.as_secs() + u64::from(left.subsec_nanos() > 0) + 1;
        let resp = self
            .call("/v3/lease/grant", json!({"TTL": ttl.to_string()}))
            .await?;
        if let Some(e) = resp.get("error").and_then(Value::as_str) {
            if !e.is_empty() {
                return Err(unavailable(format!("lease grant: {e}")));
            }
        }
        match resp.get("ID") {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            _ => Err(unavailable("lease grant answered no ID")),
        }
    }

    async fn put(
        &self,
        key: String,
        value: Vec<u8>,
        expires_at: Option<SystemTime>,
    ) -> Result<Revision, StoreError> {
        let mut put = json!({"key": B64.encode(key.as_bytes()), "value": B64.encode(&value)});
        if let Some(t) = expires_at {
            put["lease"] = json!(self.lease_for(t).await?);
        }
        let resp: TxnResponse = decode(
            self.call(
                "/v3/kv/txn",
                json!({"compare": [], "success": [{"request_put": put}]}),
            )
            .await?,
        )?;
        let rev = resp.header.revision;
        self.wait_applied(rev).await;
        Ok(rev)
    }

    /// Deletes `key` in one transaction; the previous value when there was one.
    /// `None` when etcd had no such key. (The revision etcd answered with is not waited for
    /// then: nothing under the prefix may ever reach it.)
    async fn delete(&self, key: String) -> Result<Option<(Revision, Vec<u8>)>, StoreError> {
        let resp: TxnResponse = decode(
            self.call(
                "/v3/kv/txn",
                json!({"compare": [], "success": [{"request_delete_range":
                    {"key": B64.encode(key.as_bytes()), "prev_kv": true}}]}),
            )
            .await?,
        )?;
        let dr = resp
            .responses
            .first()
            .and_then(|r| r.get("response_delete_range"))
            .cloned()
            .unwrap_or(Value::Null);
        let dr: DeleteRangeResponse = serde_json::from_value(dr).unwrap_or_default();
        if dr.deleted == 0 {
            return Ok(None);
        }
        let prev = dr
            .prev_kvs
            .first()
            .map(|kv| B64.decode(&kv.value))
            .transpose()
            .map_err(|e| unavailable(format!("etcd value not base64: {e}")))?
            .unwrap_or_default();
        let rev = resp.header.revision;
        self.wait_applied(rev).await;
        Ok(Some((rev, prev)))
    }

    /// Waits until the watch has applied `rev` to the view, so the writer reads its write.
    async fn wait_applied(&self, rev: Revision) {
        let mut rx = self.applied.subscribe();
        let waited = tokio::time::timeout(self.request_timeout, rx.wait_for(|r| *r >= rev)).await;
        if !matches!(waited, Ok(Ok(_))) {
            tracing::warn!(
                revision = rev,
                "etcd write committed but not yet seen on this replica's watch"
            );
        }
    }

    /// Keeps the view current for as long as the store lives.
    async fn watch_forever(self: Arc<Self>, mut rev: Revision) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.watch_once(&mut rev, &mut backoff).await {
                WatchEnd::Compacted(at) => {
                    tracing::warn!(
                        revision = rev,
                        compacted = at,
                        "etcd watch history compacted away: resyncing the state store"
                    );
                    loop {
                        match self.resync().await {
                            Ok(r) => {
                                rev = r;
                                break;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "etcd resync failed; retrying");
                                tokio::time::sleep(backoff).await;
                                backoff = (backoff * 2).min(Duration::from_secs(2));
                            }
                        }
                    }
                }
                WatchEnd::Failed(e) => {
                    tracing::warn!(error = %e, revision = rev, "etcd watch ended; reconnecting");
                    let n = self.endpoints.len();
                    let _ = self
                        .current
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| Some((c + 1) % n));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// One watch connection, from `rev + 1`, until it ends (or the prober finds its member
    /// without a quorum).
    async fn watch_once(&self, rev: &mut Revision, backoff: &mut Duration) -> WatchEnd {
        let end = self.watch_connection(rev, backoff).await;
        self.watch_live.store(false, Ordering::Release);
        end
    }

    async fn watch_connection(&self, rev: &mut Revision, backoff: &mut Duration) -> WatchEnd {
        let start = format!("{}/", self.prefix);
        let end = prefix_end(start.as_bytes());
        let body = json!({"create_request": {
            "key": B64.encode(start.as_bytes()),
            "range_end": B64.encode(&end),
            "start_revision": (*rev + 1).to_string(),
            "progress_notify": true,
        }});
        let idx = self.current.load(Ordering::Relaxed) % self.endpoints.len();
        let ep = &self.endpoints[idx];
        let req = match Request::post(format!("{ep}/v3/watch"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
        {
            Ok(r) => r,
            Err(e) => return WatchEnd::Failed(e.to_string()),
        };
        let resp = match tokio::time::timeout(self.request_timeout, self.client.request(req)).await
        {
            Err(_) => return WatchEnd::Failed(format!("{ep}: no answer")),
            Ok(Err(e)) => return WatchEnd::Failed(format!("{ep}: {e}")),
            Ok(Ok(r)) => r,
        };
        if resp.status() != StatusCode::OK {
            return WatchEnd::Failed(format!("{ep}: watch answered HTTP {}", resp.status()));
        }
        self.watch_endpoint.store(idx, Ordering::Release);
        self.watch_live.store(true, Ordering::Release);
        let mut body = resp.into_body();
        let mut buf = BytesMut::new();
        loop {
            let frame = tokio::select! {
                f = body.frame() => f,
                () = self.rewatch.notified() => {
                    return WatchEnd::Failed(format!(
                        "{ep}: answers the watch but not a linearizable read (no quorum?)"
                    ));
                }
            };
            let frame = match frame {
                None => return WatchEnd::Failed(format!("{ep}: watch stream ended")),
                Some(Err(e)) => return WatchEnd::Failed(format!("{ep}: {e}")),
                Some(Ok(f)) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            // Consecutive JSON objects (newline-separated in practice); keep an incomplete tail.
            loop {
                let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<WatchMessage>();
                let msg = match it.next() {
                    None => {
                        buf.clear();
                        break;
                    }
                    Some(Err(e)) if e.is_eof() => break,
                    Some(Err(e)) => {
                        return WatchEnd::Failed(format!("{ep}: unreadable watch message: {e}"))
                    }
                    Some(Ok(m)) => m,
                };
                let used = it.byte_offset();
                buf.advance(used);
                *backoff = Duration::from_millis(100);
                if let Some(e) = msg.error {
                    return WatchEnd::Failed(format!("{ep}: watch error: {e}"));
                }
                let Some(r) = msg.result else { continue };
                if r.canceled || r.compact_revision > 0 {
                    if r.compact_revision > 0 {
                        return WatchEnd::Compacted(r.compact_revision);
                    }
                    return WatchEnd::Failed(format!("{ep}: watch canceled: {}", r.cancel_reason));
                }
                for ev in &r.events {
                    let mut kv = ev.kv.clone();
                    kv.deleted = ev.kind == "DELETE";
                    match self.decode_kv(&kv) {
                        Ok(Some(op)) => self.view.apply(kv.mod_revision, op),
                        Ok(None) => {}
                        Err(e) => {
                            tracing::error!(
                                error = %crate::util::chain::error_chain(&e),
                                "skipping an unreadable etcd record"
                            )
                        }
                    }
                    *rev = (*rev).max(kv.mod_revision);
                }
                if !r.events.is_empty() {
                    self.applied.send_replace(*rev);
                }
            }
        }
    }

    /// Ranges everything again and applies the difference to the view as ordinary changes.
    async fn resync(&self) -> Result<Revision, StoreError> {
        let (rev, fresh) = self.range_all().await?;
        let (_, current) = self.view.snapshot();
        for (id, lock) in &fresh.locks {
            if self.view.lock(id).as_ref() != Some(lock) {
                self.view.apply(rev, Op::PutLock { lock: lock.clone() });
            }
        }
        for id in current.locks.keys() {
            if !fresh.locks.contains_key(id) {
                self.view.apply(rev, Op::DeleteLock { id: id.clone() });
            }
        }
        for (device, record) in &fresh.posture {
            if self
                .view
                .posture_at(device, SystemTime::UNIX_EPOCH)
                .as_ref()
                != Some(record)
            {
                self.view.apply(
                    rev,
                    Op::PutPosture {
                        record: record.clone(),
                    },
                );
            }
        }
        for device in current.posture.keys() {
            if !fresh.posture.contains_key(device) {
                self.view.apply(
                    rev,
                    Op::DeletePosture {
                        device_id: device.clone(),
                    },
                );
            }
        }
        self.view.prune(SystemTime::now());
        self.applied.send_replace(rev);
        Ok(rev)
    }
}

enum WatchEnd {
    Compacted(Revision),
    Failed(String),
}

/// The end of the range of keys starting with `prefix`: the prefix with its last byte + 1.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn decode<T: for<'de> Deserialize<'de>>(v: Value) -> Result<T, StoreError> {
    serde_json::from_value(v).map_err(|e| unavailable(format!("unexpected etcd answer: {e}")))
}

/// int64 fields arrive as JSON strings; accept numbers too.
fn de_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        S(String),
        N(u64),
    }
    match N::deserialize(d)? {
        N::N(n) => Ok(n),
        N::S(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

#[derive(Debug, Default, Deserialize)]
struct Header {
    #[serde(default, deserialize_with = "de_u64")]
    revision: u64,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct KeyValue {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default, deserialize_with = "de_u64")]
    mod_revision: u64,
    /// Not in etcd's answer: set for DELETE events.
    #[serde(skip)]
    deleted: bool,
}

#[derive(Debug, Deserialize)]
struct RangeResponse {
    #[serde(default)]
    header: Header,
    #[serde(default)]
    kvs: Vec<KeyValue>,
    #[serde(default)]
    more: bool,
}

#[derive(Debug, Deserialize)]
struct TxnResponse {
    #[serde(default)]
    header: Header,
    #[serde(default)]
    responses: Vec<Value>,
}

#[derive(Debug, Default, Deserialize)]
struct DeleteRangeResponse {
    #[serde(default, deserialize_with = "de_u64")]
    deleted: u64,
    #[serde(default)]
    prev_kvs: Vec<KeyValue>,
}

#[derive(Debug, Deserialize)]
struct WatchMessage {
    #[serde(default)]
    result: Option<WatchResponse>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct WatchResponse {
    #[serde(default)]
    canceled: bool,
    #[serde(default, deserialize_with = "de_u64")]
    compact_revision: u64,
    #[serde(default)]
    cancel_reason: String,
    #[serde(default)]
    events: Vec<Event>,
}

#[derive(Debug, Deserialize)]
struct Event {
    /// `PUT` is proto3's default and left out of the JSON; `DELETE` is spelled out.
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    kv: KeyValue,
}

impl Store for EtcdStore {
    fn view(&self) -> &View {
        &self.inner.view
    }

    fn health(&self) -> StoreHealth {
        self.inner.fresh.health()
    }

    fn put_lock(&self, lock: Lock) -> BoxFuture<'_, Result<Revision, StoreError>> {
        Box::pin(async move {
            lock.validate()?;
            let value =
                serde_json::to_vec(&lock).map_err(|e| StoreError::Invalid(e.to_string()))?;
            self.inner
                .put(self.inner.lock_key(&lock.id), value, lock.expires_at)
                .await
        })
    }

    /// A lock this replica holds but etcd no longer has (deleted through another replica and not
    /// yet seen here, or by an earlier attempt of this same delete whose answer was lost) counts
    /// as deleted: the caller asked for it to be gone, and it is.
    fn delete_lock(&self, id: &str) -> BoxFuture<'_, Result<Option<(Revision, Lock)>, StoreError>> {
        let key = self.inner.lock_key(id);
        let had = self.inner.view.lock(id);
        Box::pin(async move {
            let Some((rev, prev)) = self.inner.delete(key).await? else {
                return Ok(had.map(|l| (self.inner.view.revision(), l)));
            };
            let lock = serde_json::from_slice(&prev)
                .map_err(|e| unavailable(format!("deleted lock unreadable: {e}")))?;
            Ok(Some((rev, lock)))
        })
    }

    fn put_posture(&self, record: PostureRecord) -> BoxFuture<'_, Result<Revision, StoreError>> {
        Box::pin(async move {
            record.validate()?;
            let value =
                serde_json::to_vec(&record).map_err(|e| StoreError::Invalid(e.to_string()))?;
            self.inner
                .put(
                    self.inner.posture_key(&record.device_id),
                    value,
                    Some(record.expires_at),
                )
                .await
        })
    }

    fn delete_posture(
        &self,
        device_id: &str,
    ) -> BoxFuture<'_, Result<Option<(Revision, PostureRecord)>, StoreError>> {
        let key = self.inner.posture_key(device_id);
        let had = self
            .inner
            .view
            .posture_at(device_id, SystemTime::UNIX_EPOCH);
        Box::pin(async move {
            let Some((rev, prev)) = self.inner.delete(key).await? else {
                // As for locks: a record this replica holds but etcd no longer has is gone.
                return Ok(had.map(|r| (self.inner.view.revision(), r)));
            };
            let record = serde_json::from_slice(&prev)
                .map_err(|e| unavailable(format!("deleted posture record unreadable: {e}")))?;
            Ok(Some((rev, record)))
        })
    }

    /// Expired records are deleted by their etcd leases; this only drops them from the local
    /// view early.
    fn compact(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            self.inner.view.prune(SystemTime::now());
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end(b"/ztgate/"), b"/ztgate0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }

    #[test]
    fn keys_escape_slashes_and_percent() {
        let segment = utf8_percent_encode("a/b%c d", KEY_SEGMENT).to_string();
        assert_eq!(segment, "a%2Fb%25c%20d");
        assert_eq!(
            percent_decode_str(&segment).decode_utf8().unwrap(),
            "a/b%c d"
        );
    }

    #[test]
    fn config_problems_name_their_fields() {
        let cfg: EtcdConfig = serde_yaml_ng::from_str(
            "endpoints: [\"https://127.0.0.1:2379\", \"ftp://x\"]\nkeyPrefix: ztgate/\ncertFile: c.pem\n",
        )
        .unwrap();
        let fields: Vec<String> = cfg.validate().into_iter().map(|(p, _)| p).collect();
        assert_eq!(fields, ["endpoints[1]", "keyPrefix", "caFile", "keyFile"]);
    }

    #[test]
    fn watch_messages_parse() {
        let m: WatchMessage = serde_json::from_str(
            r#"{"result":{"header":{"revision":"7"},"events":[{"kv":{"key":"YQ==","mod_revision":"7","value":"e30="}},{"type":"DELETE","kv":{"key":"YQ==","mod_revision":"8"}}]}}"#,
        )
        .unwrap();
        let r = m.result.unwrap();
        assert_eq!(r.events.len(), 2);
        assert_eq!(r.events[0].kind, "");
        assert_eq!(r.events[1].kind, "DELETE");
        assert_eq!(r.events[1].kv.mod_revision, 8);
        let m: WatchMessage = serde_json::from_str(
            r#"{"result":{"header":{},"canceled":true,"compact_revision":"3"}}"#,
        )
        .unwrap();
        assert_eq!(m.result.unwrap().compact_revision, 3);
    }
}
