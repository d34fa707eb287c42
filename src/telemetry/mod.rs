//! Metrics (Prometheus text via prometheus-client) and structured logs (tracing).
//!
//! No metric carries a per-user label: user names are unbounded and personal.

pub mod logging;

use std::sync::atomic::AtomicI64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub verb: &'static str,
    pub code: u16,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerbLabels {
    pub verb: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<VerbLabels, Histogram>,
    active_streams: Family<KindLabels, Gauge<i64, AtomicI64>>,
    upstream_errors: Family<ReasonLabels, Counter>,
    authn_failures: Family<ReasonLabels, Counter>,
    stream_bytes: Counter,
    policy_reloads: Family<ResultLabels, Counter>,
    config_reloads: Family<ResultLabels, Counter>,
    policy_epoch: Gauge<i64, AtomicI64>,
    policy_count: Gauge<i64, AtomicI64>,
    streams_closed: Family<ReasonLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ztgate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests handled, by Kubernetes verb, HTTP code and gateway outcome",
            requests.clone(),
        );
        let latency = Family::<VerbLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "request_duration_seconds",
            "Time to response headers, by verb",
            latency.clone(),
        );
        let active_streams = Family::<KindLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "active_streams",
            "Long-lived streams open now, by kind",
            active_streams.clone(),
        );
        let upstream_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Failures talking to kube-apiserver, by reason",
            upstream_errors.clone(),
        );
        let authn_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "authentication_failures",
            "Requests refused with 401, by reason",
            authn_failures.clone(),
        );
        let stream_bytes = Counter::default();
        registry.register(
            "upgraded_stream_bytes",
            "Bytes copied through upgraded streams (both directions)",
            stream_bytes.clone(),
        );
        let policy_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "policy_reloads",
            "Policy reloads, by result (success or failure; a failure keeps the last good set)",
            policy_reloads.clone(),
        );
        let config_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config file reloads, by result (a failure keeps the running config)",
            config_reloads.clone(),
        );
        let policy_epoch = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "policy_epoch",
            "Epoch of the policy set in force",
            policy_epoch.clone(),
        );
        let policy_count = Gauge::<i64, AtomicI64>::default();
        registry.register("policies", "Policies in force", policy_count.clone());
        let streams_closed = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "streams_closed_by_gateway",
            "Live streams the gateway closed, by reason (credential_or_posture: 401; \
             lock_or_policy: 403; shutdown)",
            streams_closed.clone(),
        );
        Metrics {
            streams_closed,
            policy_reloads,
            config_reloads,
            policy_epoch,
            policy_count,
            registry,
            requests,
            latency,
            active_streams,
            upstream_errors,
            authn_failures,
            stream_bytes,
        }
    }

    pub fn request(&self, verb: &'static str, code: u16, outcome: &'static str, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                verb,
                code,
                outcome,
            })
            .inc();
        self.latency
            .get_or_create(&VerbLabels { verb })
            .observe(took.as_secs_f64());
    }

    pub fn upstream_error(&self, reason: &'static str) {
        self.upstream_errors
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn authn_failure(&self, reason: &'static str) {
        self.authn_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// A long-lived stream of `kind` (`streams::StreamKind::as_str`) opened.
    pub fn stream_opened(&self, kind: &'static str) {
        self.active_streams
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    /// `n` live streams closed by the gateway with a Status of `code`.
    pub fn streams_reverified_closed(&self, code: u16, n: usize) {
        let reason = match code {
            401 => "credential_or_posture",
            403 => "lock_or_policy",
            _ => "shutdown",
        };
        self.streams_closed
            .get_or_create(&ReasonLabels { reason })
            .inc_by(n as u64);
    }

    pub fn stream_closed(&self, kind: &'static str) {
        self.active_streams
            .get_or_create(&KindLabels { kind })
            .dec();
    }

    pub fn config_reload(&self, ok: bool) {
        self.config_reloads
            .get_or_create(&ResultLabels {
                result: if ok { "success" } else { "failure" },
            })
            .inc();
    }

    pub fn policy_reload(&self, ok: bool) {
        self.policy_reloads
            .get_or_create(&ResultLabels {
                result: if ok { "success" } else { "failure" },
            })
            .inc();
    }

    pub fn policy_loaded(&self, epoch: u64, count: usize) {
        self.policy_epoch.set(epoch as i64);
        self.policy_count.set(count as i64);
    }

    pub fn stream_bytes(&self, up: u64, down: u64) {
        self.stream_bytes.inc_by(up + down);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Per-sink audit counters, read from the auditor at scrape time.
#[derive(Debug)]
struct AuditCollector(std::sync::Arc<crate::audit::Auditor>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabels {
    sink: String,
}

impl prometheus_client::collector::Collector for AuditCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        let counts = self.0.sink_counts();
        for (name, help, pick) in [
            (
                "audit_events_written",
                "Audit events written by each sink",
                (|c: &crate::audit::SinkCounts| c.written) as fn(&crate::audit::SinkCounts) -> u64,
            ),
            (
                "audit_events_dropped",
                "Audit events lost by each sink (queue full, write failed, retries exhausted)",
                |c: &crate::audit::SinkCounts| c.dropped,
            ),
        ] {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for c in &counts {
                let labels = SinkLabels {
                    sink: c.name.clone(),
                };
                ConstCounter::new(pick(c)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

impl Metrics {
    /// Exposes the auditor's per-sink written/dropped counters.
    pub fn register_audit(&mut self, auditor: std::sync::Arc<crate::audit::Auditor>) {
        self.registry
            .register_collector(Box::new(AuditCollector(auditor)));
    }
}
