//! Audit: one `audit.k8s.io/v1` `Event` per recorded request stage, with the gateway's decision
//! and why, written to one or more sinks (file, stdout, HTTPS webhook).
//!
//! Owns the event format ([`event`]), the audit policy ([`policy`]), the config section
//! ([`config`]) and the sinks ([`sink`]). It must never record a header, a request body or a
//! response body — the event type has no field for them — and it must never stall a request in
//! the default overflow mode: the request path only puts the event on each sink's bounded queue
//! (`try_send`); serialization and I/O happen on background tasks.
//!
//! Typical use on the request path:
//!
//! ```ignore
//! let audit_id = Auditor::new_audit_id();
//! let decision = auditor.decide(identity.map(Subject::from), info.as_ref());
//! let mut parts = EventParts::new(&audit_id, &method, &uri, received);
//! // ... fill identity, request_info, response, annotations ...
//! auditor.record_stage(&decision, Stage::ResponseComplete, &parts).await;
//! ```
//!
//! Overflow: with [`Overflow::Drop`] (the default) a full queue — a slow disk, a webhook receiver
//! that is down — costs the event for that sink, counted in [`Auditor::dropped`] and logged at
//! most once per 10 s per sink; requests keep flowing. This is what kube-apiserver's own batching
//! webhook backend does when its buffer is full. [`Overflow::Block`] makes the request wait for
//! room instead, for operators who prefer losing availability over losing audit records.

pub mod config;
pub mod event;
pub mod id;
pub mod policy;
pub mod sink;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{AuditConfig, Overflow, SinkConfig};
pub use event::{
    Decision, Event, EventParts, Level, ObjectReference, ResponseInfo, ResponseStatus, Stage,
    UserInfo,
};
pub use policy::{AuditPolicy, PolicyDecision, Subject};

use crate::authz::requestinfo::RequestInfo;
use sink::{Msg, SinkStats};

/// Why the auditor could not start (or a policy could not be loaded).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A config value is invalid.
    #[error("audit config: {0}")]
    Config(#[from] config::ConfigError),
    /// The audit policy file cannot be read or is invalid.
    #[error("audit policy {path}: {source}")]
    Policy {
        path: String,
        #[source]
        source: PolicyFileError,
    },
    /// A sink cannot be set up (file not writable, CA unreadable, ...).
    #[error("audit sink {sink}: {source}")]
    Sink {
        sink: String,
        #[source]
        source: SinkError,
    },
}

/// Why a sink could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// The file sink's file cannot be opened for appending.
    #[error("cannot open {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The webhook's URL is not one it may post to.
    #[error("url: {0}")]
    Url(#[source] crate::tls::client::HttpsUrlError),
    /// The webhook's CA bundle cannot be read.
    #[error("caFile {}: {source}", path.display())]
    CaRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The webhook's CA bundle holds no usable trust anchors.
    #[error("caFile {}: {source}", path.display())]
    CaBundle {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The TLS client config cannot be made.
    #[error(transparent)]
    Tls(Box<dyn std::error::Error + Send + Sync>),
    /// The webhook's client certificate or key cannot be read or used.
    #[error("clientCertificate: {0}")]
    ClientCertificate(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Why a policy file was not taken.
#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    #[error(transparent)]
    Read(#[from] std::io::Error),
    #[error(transparent)]
    Invalid(#[from] policy::PolicyError),
}

/// Counters of one sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkCounts {
    /// `file:<path>`, `stdout` or `webhook:<url>`.
    pub name: String,
    /// Events written (or accepted by the webhook receiver).
    pub written: u64,
    /// Events lost for this sink: queue full, write failed, retries exhausted.
    pub dropped: u64,
}

struct SinkHandle {
    tx: mpsc::Sender<Msg>,
    stats: Arc<SinkStats>,
}

/// The audit front end: policy, and a queue per sink.
pub struct Auditor {
    policy: ArcSwap<AuditPolicy>,
    policy_file: Option<PathBuf>,
    overflow: Overflow,
    sinks: Vec<SinkHandle>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field("overflow", &self.overflow)
            .field(
                "sinks",
                &self.sinks.iter().map(|s| &s.stats.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Auditor {
    /// Loads the policy, opens every sink and starts their background tasks. The tasks write
    /// what is still queued and end when `stop` is cancelled (see [`Auditor::stopped`]).
    pub async fn start(
        cfg: &AuditConfig,
        stop: CancellationToken,
    ) -> Result<Arc<Auditor>, AuditError> {
        cfg.validate()?;
        let policy = match &cfg.policy_file {
            Some(path) => AuditPolicy::load(path)?,
            None => AuditPolicy::metadata_for_everything(),
        };
        let mut sinks = Vec::with_capacity(cfg.sinks.len());
        let mut tasks = Vec::with_capacity(cfg.sinks.len());
        for sc in &cfg.sinks {
            let name = sc.name();
            let stats = SinkStats::new(name.clone());
            let (tx, rx) = mpsc::channel(sc.buffer_events());
            let sink_err = |source: SinkError| AuditError::Sink {
                sink: name.clone(),
                source,
            };
            let task = match sc {
                SinkConfig::File(fc) => {
                    let file = sink::file::FileSink::open(fc).map_err(|source| {
                        sink_err(SinkError::Open {
                            path: fc.path.clone(),
                            source,
                        })
                    })?;
                    tokio::spawn(sink::run_line_sink(
                        rx,
                        stop.clone(),
                        Box::new(file),
                        stats.clone(),
                        tx.downgrade(),
                    ))
                }
                SinkConfig::Stdout(_) => tokio::spawn(sink::run_line_sink(
                    rx,
                    stop.clone(),
                    Box::new(sink::stdout::StdoutSink::new()),
                    stats.clone(),
                    tx.downgrade(),
                )),
                SinkConfig::Webhook(wc) => {
                    let hook =
                        sink::webhook::WebhookSink::new(wc, stats.clone()).map_err(sink_err)?;
                    tokio::spawn(hook.run(rx, stop.clone()))
                }
            };
            sinks.push(SinkHandle { tx, stats });
            tasks.push(task);
        }
        Ok(Arc::new(Auditor {
            policy: ArcSwap::from_pointee(policy),
            policy_file: cfg.policy_file.clone(),
            overflow: cfg.overflow,
            sinks,
            tasks: Mutex::new(tasks),
        }))
    }

    /// An auditor without sinks: [`Auditor::decide`] says `None` and `record` returns at once.
    pub fn disabled() -> Arc<Auditor> {
        Arc::new(Auditor {
            policy: ArcSwap::from_pointee(AuditPolicy::metadata_for_everything()),
            policy_file: None,
            overflow: Overflow::Drop,
            sinks: Vec::new(),
            tasks: Mutex::new(Vec::new()),
        })
    }

    /// A new random audit ID (UUID v4). Send it upstream as the `Audit-ID` header so that
    /// kube-apiserver's audit events carry the same ID.
    pub fn new_audit_id() -> String {
        id::new_audit_id()
    }

    /// Whether any sink is configured.
    pub fn is_enabled(&self) -> bool {
        !self.sinks.is_empty()
    }

    /// The policy's decision for a request: level and omitted stages. Always `None` when
    /// auditing is disabled, so callers can skip building events.
    pub fn decide(&self, user: Option<Subject<'_>>, info: Option<&RequestInfo>) -> PolicyDecision {
        if self.sinks.is_empty() {
            return PolicyDecision::NONE;
        }
        self.policy.load().evaluate(user, info)
    }

    /// The level the policy gives a request (see [`Auditor::decide`]).
    pub fn level_for(&self, user: Option<Subject<'_>>, info: Option<&RequestInfo>) -> Level {
        self.decide(user, info).level
    }

    /// Records the event for `stage` if `decision` records that stage, written as JSON straight
    /// from `parts` (no [`Event`] is built).
    pub async fn record_stage(
        &self,
        decision: &PolicyDecision,
        stage: Stage,
        parts: &EventParts<'_>,
    ) {
        self.record_stages(decision, &[stage], parts).await;
    }

    /// Records the events for `stages` (in that order) that `decision` records, written as one
    /// event and copies of it around their stage-dependent fields
    /// ([`EventParts::write_stages`]).
    pub async fn record_stages(
        &self,
        decision: &PolicyDecision,
        stages: &[Stage],
        parts: &EventParts<'_>,
    ) {
        if !self.is_enabled() {
            return;
        }
        let recorded = stages
            .iter()
            .filter(|&&s| decision.records(s))
            .map(|&s| (s, parts.stamp(s)));
        let mut events = Vec::with_capacity(stages.len());
        parts.write_stages(decision.level, recorded, |_, json| events.push(json));
        for json in events {
            self.queue(json).await;
        }
    }

    /// Queues an event on every sink. Events at level `None` are ignored. In [`Overflow::Drop`]
    /// mode this never waits: a full queue drops the event for that sink (counted). In
    /// [`Overflow::Block`] mode it waits for room.
    pub async fn record(&self, event: Event) {
        if self.sinks.is_empty() || event.level == Level::None {
            return;
        }
        self.queue(to_json(&event)).await;
    }

    /// Queues one event's JSON on every sink (see [`Auditor::record`]).
    async fn queue(&self, json: Bytes) {
        for s in &self.sinks {
            match self.overflow {
                Overflow::Drop => try_queue(s, json.clone()),
                Overflow::Block => {
                    if s.tx.send(Msg::Event(json.clone())).await.is_err() {
                        s.stats.add_dropped(1, "sink stopped");
                    }
                }
            }
        }
    }

    /// Queues an event without ever waiting, whatever the overflow mode (for places that cannot
    /// await, such as a stream guard being dropped). A full queue drops the event (counted).
    pub fn record_now(&self, event: Event) {
        if self.sinks.is_empty() || event.level == Level::None {
            return;
        }
        let json = to_json(&event);
        for s in &self.sinks {
            try_queue(s, json.clone());
        }
    }

    /// Events dropped so far, summed over sinks.
    pub fn dropped(&self) -> u64 {
        self.sinks.iter().map(|s| s.stats.dropped()).sum()
    }

    /// Written and dropped counts per sink, in config order.
    pub fn sink_counts(&self) -> Vec<SinkCounts> {
        self.sinks
            .iter()
            .map(|s| SinkCounts {
                name: s.stats.name.clone(),
                written: s.stats.written(),
                dropped: s.stats.dropped(),
            })
            .collect()
    }

    /// Waits until every event queued before this call has been written, or given up on (a
    /// webhook batch that exhausted its retries). May take as long as a webhook's retries.
    pub async fn flush(&self) {
        let mut waits = Vec::with_capacity(self.sinks.len());
        for s in &self.sinks {
            let (ack, done) = oneshot::channel();
            if s.tx.send(Msg::Flush(ack)).await.is_ok() {
                waits.push(done);
            }
        }
        for w in waits {
            // An error means the sink task has ended; nothing more will be written.
            let _ = w.await;
        }
    }

    /// Waits for the sink tasks to end (after the `stop` token given to [`Auditor::start`] is
    /// cancelled; they first write what is queued, a webhook making one last attempt).
    pub async fn stopped(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("audit tasks poisoned"));
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Replaces the policy (e.g. after the operator edited it).
    pub fn replace_policy(&self, policy: AuditPolicy) {
        self.policy.store(Arc::new(policy));
    }

    /// Re-reads the configured policy file. On error the current policy stays.
    pub fn reload_policy(&self) -> Result<(), AuditError> {
        if let Some(path) = &self.policy_file {
            self.replace_policy(AuditPolicy::load(path)?);
        }
        Ok(())
    }
}

fn to_json(event: &Event) -> Bytes {
    let mut json = Vec::with_capacity(1024);
    event.write_json(&mut json);
    Bytes::from(json)
}

fn try_queue(s: &SinkHandle, json: Bytes) {
    match s.tx.try_send(Msg::Event(json)) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => s.stats.add_dropped(1, "queue full"),
        Err(mpsc::error::TrySendError::Closed(_)) => s.stats.add_dropped(1, "sink stopped"),
    }
}
