//! The pull provider: the gateway asks an HTTPS endpoint (an MDM or EDR API, or an adapter in
//! front of one) about devices it has no fresh record for.
//!
//! `POST {url}` with `{"deviceIds": ["a", "b"]}`; the answer is
//! `{"devices": {"a": {"attributes": {...}}, "b": {"score": 87}}}`. A device left out of the
//! answer is unknown to the provider. Lookups arriving within a few milliseconds of each other
//! are sent as one batch; answers (found or not) are cached for `cacheTtl`; at most
//! `requestsPerSecond` requests are made, and each waits at most `timeout`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{header, Request};
use http_body_util::{BodyExt, Full, Limited};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::config::PullProvider;
use super::SOURCE_PULL;
use crate::state::{Posture, PostureRecord};

/// How long the batcher waits for more lookups before sending a batch.
const BATCH_WINDOW: Duration = Duration::from_millis(5);
/// Largest answer read from the provider.
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// What the provider said about one device.
#[derive(Clone, Debug)]
pub enum Answer {
    Found(Arc<PostureRecord>),
    NotFound,
    /// It could not answer (down, slow, refused, rate-limited, garbled): never cached.
    Unavailable(String),
}

type Waiter = (String, oneshot::Sender<Answer>);

/// A handle on the batching task.
pub struct Provider {
    tx: mpsc::Sender<Waiter>,
    cache: moka::future::Cache<String, Answer>,
    fail_closed: bool,
    timeout: Duration,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Reply {
    #[serde(default)]
    devices: HashMap<String, DeviceReply>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DeviceReply {
    #[serde(default)]
    attributes: Option<Posture>,
    #[serde(default)]
    score: Option<i64>,
}

/// Why the pull provider's client could not be set up (the operator's config).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderSetupError {
    #[error("posture provider certificateAuthorityFile {}: {source}", path.display())]
    CaFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::client::ClientTlsError),
}

/// Why the provider gave no answer for a batch. Every device of the batch is then
/// `Unavailable` with this message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
enum AskError {
    #[error("{0}")]
    Encode(#[source] serde_json::Error),
    #[error("token file {}: {source}", path.display())]
    TokenFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Request(#[source] http::Error),
    /// The connection or the exchange failed; the message carries the whole chain of causes,
    /// so the error has no source (a chain printer would say them twice).
    #[error("{}", crate::util::chain::error_chain(.0))]
    Connect(hyper_util::client::legacy::Error),
    #[error("provider answered {0}")]
    Status(http::StatusCode),
    #[error("reading the answer: {0}")]
    Body(#[source] crate::body::BoxError),
    #[error("answer is not valid: {0}")]
    Invalid(#[source] serde_json::Error),
    #[error("score {0} for a device is outside 0..100")]
    Score(i64),
}

impl Provider {
    pub fn new(
        cfg: &PullProvider,
        stop: CancellationToken,
    ) -> Result<Provider, ProviderSetupError> {
        let pem = std::fs::read(&cfg.certificate_authority_file).map_err(|source| {
            ProviderSetupError::CaFile {
                path: cfg.certificate_authority_file.clone(),
                source,
            }
        })?;
        let roots = crate::tls::client::roots_from_pem(&pem)?;
        let tls = crate::tls::client::config_builder(roots)?.with_no_client_auth();
        let client = crate::tls::client::https_client::<Full<Bytes>>(
            tls,
            cfg.timeout.get(),
            Duration::from_secs(60),
            4,
        );
        let (tx, rx) = mpsc::channel(4096);
        let batcher = Batcher {
            client,
            url: cfg.url.clone(),
            token_file: cfg.token_file.clone(),
            ttl: cfg.cache_ttl.get(),
            timeout: cfg.timeout.get(),
            max_batch: cfg.max_batch,
            rate: RateLimit::new(cfg.requests_per_second),
        };
        tokio::spawn(batcher.run(rx, stop));
        Ok(Provider {
            tx,
            cache: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(cfg.cache_ttl.get())
                .build(),
            fail_closed: cfg.fail_closed,
            timeout: cfg.timeout.get(),
        })
    }

    pub fn fail_closed(&self) -> bool {
        self.fail_closed
    }

    /// What the provider says about `device_id` (cached; concurrent lookups of one device make
    /// one request).
    pub async fn lookup(&self, device_id: &str) -> Answer {
        if let Some(a) = self.cache.get(device_id).await {
            return a;
        }
        let tx = self.tx.clone();
        let timeout = self.timeout;
        let id = device_id.to_owned();
        let res = self
            .cache
            .try_get_with(id.clone(), async move {
                let (otx, orx) = oneshot::channel();
                tx.try_send((id, otx))
                    .map_err(|_| "posture provider queue is full".to_owned())?;
                // The batcher answers within `timeout` plus the batch window; this bounds it
                // even if the batcher is gone.
                match tokio::time::timeout(timeout + Duration::from_secs(1), orx).await {
                    Ok(Ok(Answer::Unavailable(why))) => Err(why),
                    Ok(Ok(a)) => Ok(a),
                    Ok(Err(_)) => Err("posture provider task stopped".to_owned()),
                    Err(_) => Err("posture provider timed out".to_owned()),
                }
            })
            .await;
        match res {
            Ok(a) => a,
            Err(why) => Answer::Unavailable(why.to_string()),
        }
    }
}

/// A fixed-window limiter: at most `per_second` requests in each second.
struct RateLimit {
    per_second: u32,
    window: Instant,
    used: u32,
}

impl RateLimit {
    fn new(per_second: u32) -> RateLimit {
        RateLimit {
            per_second,
            window: Instant::now(),
            used: 0,
        }
    }

    fn try_take(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.used = 0;
        }
        if self.used < self.per_second {
            self.used += 1;
            true
        } else {
            false
        }
    }
}

struct Batcher {
    client: crate::tls::client::HttpsClient<Full<Bytes>>,
    url: String,
    token_file: Option<std::path::PathBuf>,
    ttl: Duration,
    timeout: Duration,
    max_batch: usize,
    rate: RateLimit,
}

impl Batcher {
    async fn run(mut self, mut rx: mpsc::Receiver<Waiter>, stop: CancellationToken) {
        loop {
            let first = tokio::select! {
                _ = stop.cancelled() => return,
                w = rx.recv() => match w { Some(w) => w, None => return },
            };
            let mut batch = vec![first];
            let deadline = tokio::time::Instant::now() + BATCH_WINDOW;
            while batch.len() < self.max_batch {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(w)) => batch.push(w),
                    _ => break,
                }
            }
            if !self.rate.try_take() {
                for (_, tx) in batch {
                    let _ = tx.send(Answer::Unavailable("posture provider rate limit".into()));
                }
                continue;
            }
            let mut ids: Vec<String> = batch.iter().map(|(id, _)| id.clone()).collect();
            ids.sort();
            ids.dedup();
            let answers = match tokio::time::timeout(self.timeout, self.ask(&ids)).await {
                Ok(Ok(a)) => Ok(a),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {:?}", self.timeout)),
            };
            for (id, tx) in batch {
                let a = match &answers {
                    Ok(map) => map.get(&id).cloned().unwrap_or(Answer::NotFound),
                    Err(e) => Answer::Unavailable(e.clone()),
                };
                let _ = tx.send(a);
            }
        }
    }

    async fn ask(&self, ids: &[String]) -> Result<HashMap<String, Answer>, AskError> {
        let body = serde_json::to_vec(&serde_json::json!({ "deviceIds": ids }))
            .map_err(AskError::Encode)?;
        let mut req = Request::post(&self.url)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json");
        if let Some(f) = &self.token_file {
            let t = tokio::fs::read_to_string(f)
                .await
                .map_err(|source| AskError::TokenFile {
                    path: f.clone(),
                    source,
                })?;
            req = req.header(header::AUTHORIZATION, format!("Bearer {}", t.trim()));
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(AskError::Request)?;
        let resp = self.client.request(req).await.map_err(AskError::Connect)?;
        if !resp.status().is_success() {
            return Err(AskError::Status(resp.status()));
        }
        let bytes = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(AskError::Body)?
            .to_bytes();
        let reply: Reply = serde_json::from_slice(&bytes).map_err(AskError::Invalid)?;
        let now = SystemTime::now();
        let mut out = HashMap::with_capacity(reply.devices.len());
        for (id, d) in reply.devices {
            if !ids.contains(&id) {
                continue;
            }
            let mut attributes = d.attributes.unwrap_or_default();
            if let Some(score) = d.score {
                if !(0..=100).contains(&score) {
                    return Err(AskError::Score(score));
                }
                attributes.edr_score = Some(score);
            }
            let rec = PostureRecord {
                device_id: id.clone(),
                attributes,
                source: SOURCE_PULL.to_owned(),
                collected_at: now,
                expires_at: now + self.ttl,
            };
            if rec.validate().is_err() {
                continue;
            }
            out.insert(id, Answer::Found(Arc::new(rec)));
        }
        Ok(out)
    }
}
