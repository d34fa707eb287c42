//! The `audit` section of the gateway config.
//!
//! ```yaml
//! audit:
//!   policyFile: /etc/ztgate/audit-policy.yaml   # optional; default: Metadata for everything
//!   overflow: Drop                              # or Block
//!   sinks:
//!     - type: file
//!       path: /var/log/ztgate/audit.log
//!       maxSizeBytes: 104857600
//!       maxBackups: 5
//!     - type: stdout
//!     - type: webhook
//!       url: https://audit.example.com/ingest
//!       caFile: /etc/ztgate/audit-ca.crt
//!       clientCertificate: {certFile: /etc/ztgate/audit.crt, keyFile: /etc/ztgate/audit.key}
//!       batchMaxEvents: 400
//!       batchMaxWait: 1s
//!       bufferEvents: 10000
//!       retryBackoff: 500ms
//!       maxRetries: 5
//! ```

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::duration::GoDuration;
use crate::config::CertKeyFiles;

/// Default capacity of each sink's queue, in events (kube-apiserver's batch buffer size).
pub const DEFAULT_BUFFER_EVENTS: usize = 10_000;

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuditConfig {
    /// An `audit.k8s.io/v1` `Policy` file. Without one every request is recorded at `Metadata`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_file: Option<PathBuf>,
    /// Where events go. No sinks: auditing is off.
    #[serde(default)]
    pub sinks: Vec<SinkConfig>,
    /// What the request path does when a sink's queue is full.
    #[serde(default)]
    pub overflow: Overflow,
}

/// What happens when a sink's queue is full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum Overflow {
    /// The event is dropped for that sink and counted; requests never wait for audit.
    #[default]
    #[serde(alias = "drop")]
    Drop,
    /// The request waits until the sink has room: no event is lost to a full queue, but a sink
    /// that is down stalls every request (fail closed on availability).
    #[serde(alias = "block")]
    Block,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkConfig {
    File(FileSinkConfig),
    Stdout(StdoutSinkConfig),
    Webhook(WebhookSinkConfig),
}

impl SinkConfig {
    /// A short name for logs and per-sink counters: `file:<path>`, `stdout`, `webhook:<url>`.
    pub fn name(&self) -> String {
        match self {
            SinkConfig::File(f) => format!("file:{}", f.path.display()),
            SinkConfig::Stdout(_) => "stdout".to_owned(),
            SinkConfig::Webhook(w) => format!("webhook:{}", w.url),
        }
    }

    pub fn buffer_events(&self) -> usize {
        match self {
            SinkConfig::File(f) => f.buffer_events,
            SinkConfig::Stdout(s) => s.buffer_events,
            SinkConfig::Webhook(w) => w.buffer_events,
        }
    }
}

/// JSON lines in a local file, rotated by size.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileSinkConfig {
    pub path: PathBuf,
    /// Rotate before a write would take the file past this size. 0: never rotate.
    #[serde(default = "default_max_size")]
    pub max_size_bytes: u64,
    /// How many rotated files (`<path>.1` newest ... `<path>.N` oldest) to keep.
    #[serde(default = "default_max_backups")]
    pub max_backups: u32,
    #[serde(default = "default_buffer")]
    pub buffer_events: usize,
}

/// JSON lines on standard output (for log collectors that read container output).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StdoutSinkConfig {
    #[serde(default = "default_buffer")]
    pub buffer_events: usize,
}

impl Default for StdoutSinkConfig {
    fn default() -> Self {
        StdoutSinkConfig {
            buffer_events: DEFAULT_BUFFER_EVENTS,
        }
    }
}

/// `EventList` batches POSTed to an HTTPS endpoint (the body kube-apiserver's webhook backend sends).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WebhookSinkConfig {
    /// `https://` URL without query or fragment.
    pub url: String,
    /// PEM CA bundle the receiver's certificate is verified against (no system roots).
    pub ca_file: PathBuf,
    /// Client certificate presented to the receiver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<CertKeyFiles>,
    /// Most events in one POST.
    #[serde(default = "default_batch_max_events")]
    pub batch_max_events: usize,
    /// Longest an event waits for its batch to fill before the batch is sent anyway.
    #[serde(default = "default_batch_max_wait")]
    pub batch_max_wait: GoDuration,
    /// Queue capacity in events.
    #[serde(default = "default_buffer")]
    pub buffer_events: usize,
    /// Wait before the first retry; doubled for each further retry (at most 30s, or this value
    /// if larger).
    #[serde(default = "default_retry_backoff")]
    pub retry_backoff: GoDuration,
    /// Retries of a failed POST before its batch is dropped (and counted). 0: no retries.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Time limit of one POST (connect, send, answer).
    #[serde(default = "default_timeout")]
    pub timeout: GoDuration,
}

fn default_max_size() -> u64 {
    100 * 1024 * 1024
}
fn default_max_backups() -> u32 {
    5
}
fn default_buffer() -> usize {
    DEFAULT_BUFFER_EVENTS
}
fn default_batch_max_events() -> usize {
    400
}
fn default_batch_max_wait() -> GoDuration {
    GoDuration(Duration::from_secs(1))
}
fn default_retry_backoff() -> GoDuration {
    GoDuration(Duration::from_millis(500))
}
fn default_max_retries() -> u32 {
    5
}
fn default_timeout() -> GoDuration {
    GoDuration(Duration::from_secs(10))
}

/// A value of the `audit` section that the gateway cannot use; `field` is its path under
/// `audit` (`sinks[1].url`).
#[derive(Debug, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ConfigError {
    pub field: String,
    #[source]
    pub problem: ConfigProblem,
}

/// What is wrong with a value of the `audit` section.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigProblem {
    #[error("must be at least 1")]
    Zero,
    #[error("must be more than 0")]
    NoTime,
    #[error("must not be empty")]
    Empty,
    #[error("must name a file")]
    NotAFile,
    #[error(transparent)]
    Url(#[from] crate::tls::client::HttpsUrlError),
    #[error("at most one stdout sink")]
    SecondStdout,
    #[error("two file sinks write the same path")]
    SamePath,
}

impl AuditConfig {
    /// Checks values serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (i, sink) in self.sinks.iter().enumerate() {
            let at = |field: &str, problem: ConfigProblem| ConfigError {
                field: format!("sinks[{i}].{field}"),
                problem,
            };
            if sink.buffer_events() == 0 {
                return Err(at("bufferEvents", ConfigProblem::Zero));
            }
            match sink {
                SinkConfig::File(f) => {
                    if f.path.as_os_str().is_empty() {
                        return Err(at("path", ConfigProblem::Empty));
                    }
                    if f.path.file_name().is_none() {
                        return Err(at("path", ConfigProblem::NotAFile));
                    }
                }
                SinkConfig::Stdout(_) => {}
                SinkConfig::Webhook(w) => {
                    crate::tls::client::check_https_url(&w.url)
                        .map_err(|e| at("url", ConfigProblem::Url(e)))?;
                    if w.batch_max_events == 0 {
                        return Err(at("batchMaxEvents", ConfigProblem::Zero));
                    }
                    if w.batch_max_wait.is_zero() {
                        return Err(at("batchMaxWait", ConfigProblem::NoTime));
                    }
                    if w.timeout.is_zero() {
                        return Err(at("timeout", ConfigProblem::NoTime));
                    }
                }
            }
        }
        let sinks = |problem| ConfigError {
            field: "sinks".to_owned(),
            problem,
        };
        let stdout = self
            .sinks
            .iter()
            .filter(|s| matches!(s, SinkConfig::Stdout(_)))
            .count();
        if stdout > 1 {
            return Err(sinks(ConfigProblem::SecondStdout));
        }
        let mut paths: Vec<&PathBuf> = self
            .sinks
            .iter()
            .filter_map(|s| match s {
                SinkConfig::File(f) => Some(&f.path),
                _ => None,
            })
            .collect();
        paths.sort();
        if paths.windows(2).any(|w| w[0] == w[1]) {
            return Err(sinks(ConfigProblem::SamePath));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<AuditConfig, String> {
        serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn full_config_parses_with_defaults() {
        let c = parse(
            r#"
policyFile: /etc/ztgate/audit-policy.yaml
sinks:
  - type: file
    path: /var/log/ztgate/audit.log
  - type: stdout
  - type: webhook
    url: https://audit.example.com/ingest
    caFile: /etc/ca.crt
    clientCertificate: {certFile: /c.crt, keyFile: /c.key}
    batchMaxWait: 250ms
"#,
        )
        .unwrap();
        assert_eq!(c.overflow, Overflow::Drop);
        assert_eq!(c.sinks.len(), 3);
        let SinkConfig::File(f) = &c.sinks[0] else {
            panic!()
        };
        assert_eq!(f.max_size_bytes, 100 * 1024 * 1024);
        assert_eq!(f.max_backups, 5);
        let SinkConfig::Webhook(w) = &c.sinks[2] else {
            panic!()
        };
        assert_eq!(w.batch_max_events, 400);
        assert_eq!(w.batch_max_wait.get(), Duration::from_millis(250));
        assert_eq!(w.buffer_events, 10_000);
        assert_eq!(w.max_retries, 5);
        assert!(w.client_certificate.is_some());
        assert_eq!(
            c.sinks[2].name(),
            "webhook:https://audit.example.com/ingest"
        );
        c.validate().unwrap();
    }

    #[test]
    fn overflow_and_unknown_fields() {
        assert_eq!(parse("overflow: Block").unwrap().overflow, Overflow::Block);
        assert_eq!(parse("overflow: drop").unwrap().overflow, Overflow::Drop);
        assert!(parse("overflow: Sometimes").is_err());
        let e = parse("sinks: [{type: file, path: /a, maxsize: 1}]").unwrap_err();
        assert!(e.contains("unknown field `maxsize`"), "{e}");
        let e = parse("sinks: [{type: syslog}]").unwrap_err();
        assert!(e.contains("syslog"), "{e}");
        assert!(parse("policy: x").is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let e = parse("sinks: [{type: webhook, url: 'http://x/y', caFile: /ca}]")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("sinks[0].url:"), "{e}");
        let e = parse("sinks: [{type: stdout}, {type: webhook, url: 'https://x/y', caFile: /ca, batchMaxEvents: 0}]")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("sinks[1].batchMaxEvents:"), "{e}");
        let e = parse("sinks: [{type: file, path: /a, bufferEvents: 0}]")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("sinks[0].bufferEvents:"), "{e}");
        let e = parse("sinks: [{type: file, path: /a}, {type: file, path: /a}]")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("same path"), "{e}");
    }
}
