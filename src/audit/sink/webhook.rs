//! `EventList` batches POSTed to an HTTPS receiver.
//!
//! The body is what kube-apiserver's webhook backend sends:
//! `{"kind":"EventList","apiVersion":"audit.k8s.io/v1","metadata":{},"items":[...]}`. A batch is
//! sent when it holds `batchMaxEvents` events, when its first event has waited `batchMaxWait`, or
//! on [`crate::audit::Auditor::flush`]. A POST that fails with a connection error, a timeout, 408,
//! 429 or a 5xx is retried after `retryBackoff`, doubling each time (capped at 30s or
//! `retryBackoff` if larger), up to `maxRetries` times; then the batch is dropped and counted.
//! Any other non-2xx answer drops the batch at once (retrying would not change it). While a batch
//! is being retried, new events wait in the queue (`bufferEvents`); what happens when that is full
//! is the auditor's overflow mode.
//!
//! The receiver is verified against `caFile` only (no system roots); the client certificate is
//! read once at start.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Msg, SinkStats};
use crate::audit::config::WebhookSinkConfig;
use crate::audit::event::API_VERSION;
use crate::audit::SinkError;
use crate::util::chain::error_chain;

/// Longest wait between retries unless `retryBackoff` itself is longer.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub(crate) struct WebhookSink {
    client: crate::tls::client::HttpsClient<Full<Bytes>>,
    uri: Uri,
    batch_max_events: usize,
    batch_max_wait: Duration,
    retry_backoff: Duration,
    max_retries: u32,
    timeout: Duration,
    stats: Arc<SinkStats>,
}

enum PostError {
    /// Worth retrying: connection failure, timeout, 408, 429, 5xx.
    Transient(String),
    /// Retrying won't help (another 4xx, a redirect, ...).
    Permanent(String),
}

impl WebhookSink {
    pub(crate) fn new(
        cfg: &WebhookSinkConfig,
        stats: Arc<SinkStats>,
    ) -> Result<WebhookSink, SinkError> {
        let uri = crate::tls::client::check_https_url(&cfg.url).map_err(SinkError::Url)?;
        let ca_pem = std::fs::read(&cfg.ca_file).map_err(|source| SinkError::CaRead {
            path: cfg.ca_file.clone(),
            source,
        })?;
        let roots =
            crate::tls::client::roots_from_pem(&ca_pem).map_err(|e| SinkError::CaBundle {
                path: cfg.ca_file.clone(),
                source: e.into(),
            })?;
        let builder =
            crate::tls::client::config_builder(roots).map_err(|e| SinkError::Tls(e.into()))?;
        let tls = match &cfg.client_certificate {
            None => builder.with_no_client_auth(),
            Some(files) => {
                let cert =
                    |e: Box<dyn std::error::Error + Send + Sync>| SinkError::ClientCertificate(e);
                let cert_pem =
                    crate::tls::pem::read(&files.cert_file).map_err(|e| cert(e.into()))?;
                let key_pem = crate::tls::pem::read(&files.key_file).map_err(|e| cert(e.into()))?;
                let chain = crate::tls::pem::certs_from_pem(&files.cert_file, &cert_pem)
                    .map_err(|e| cert(e.into()))?;
                let key = crate::tls::pem::key_from_pem(&files.key_file, &key_pem)
                    .map_err(|e| cert(e.into()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| cert(e.into()))?
            }
        };
        let timeout = cfg.timeout.get();
        let client = crate::tls::client::https_client(tls, timeout, Duration::from_secs(60), 2);
        Ok(WebhookSink {
            client,
            uri,
            batch_max_events: cfg.batch_max_events.max(1),
            batch_max_wait: cfg.batch_max_wait.get(),
            retry_backoff: cfg.retry_backoff.get(),
            max_retries: cfg.max_retries,
            timeout,
            stats,
        })
    }

    pub(crate) async fn run(self, mut rx: mpsc::Receiver<Msg>, stop: CancellationToken) {
        let mut leftover: Vec<Bytes> = Vec::new();
        'main: loop {
            let first = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                m = rx.recv() => m,
            };
            let Some(first) = first else { break };
            let mut batch = Vec::new();
            let mut acks = Vec::new();
            match first {
                Msg::Event(ev) => batch.push(ev),
                Msg::Flush(ack) => acks.push(ack),
                Msg::Stop => {}
            }
            let deadline = Instant::now() + self.batch_max_wait;
            while acks.is_empty() && batch.len() < self.batch_max_events {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => {
                        leftover = batch;
                        break 'main;
                    }
                    m = rx.recv() => match m {
                        Some(Msg::Event(ev)) => batch.push(ev),
                        Some(Msg::Flush(ack)) => acks.push(ack),
                        Some(Msg::Stop) => {}
                        None => break,
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
            if let Err(unsent) = self.deliver(batch, &stop).await {
                leftover = unsent;
                break;
            }
            for ack in acks {
                let _ = ack.send(());
            }
        }
        // Shutting down: one attempt for what is left, in batches, then stop.
        rx.close();
        while let Some(m) = rx.recv().await {
            if let Msg::Event(ev) = m {
                leftover.push(ev);
            }
        }
        while !leftover.is_empty() {
            let rest = leftover.split_off(leftover.len().min(self.batch_max_events));
            let batch = std::mem::replace(&mut leftover, rest);
            let n = batch.len() as u64;
            match self.post(&batch).await {
                Ok(()) => self.stats.add_written(n),
                Err(PostError::Transient(m) | PostError::Permanent(m)) => {
                    self.stats.add_dropped(n, &format!("shutting down: {m}"))
                }
            }
        }
    }

    /// Sends one batch, retrying transient failures. `Err` hands the batch back when `stop`
    /// fires during a backoff, so the shutdown path can make a last attempt.
    async fn deliver(&self, batch: Vec<Bytes>, stop: &CancellationToken) -> Result<(), Vec<Bytes>> {
        if batch.is_empty() {
            return Ok(());
        }
        let n = batch.len() as u64;
        let mut backoff = self.retry_backoff;
        let cap = MAX_BACKOFF.max(self.retry_backoff);
        let mut attempt = 0u32;
        loop {
            match self.post(&batch).await {
                Ok(()) => {
                    self.stats.add_written(n);
                    return Ok(());
                }
                Err(PostError::Permanent(m)) => {
                    self.stats.add_dropped(n, &m);
                    return Ok(());
                }
                Err(PostError::Transient(m)) => {
                    if attempt >= self.max_retries {
                        self.stats.add_dropped(
                            n,
                            &format!("gave up after {} attempts: {m}", attempt + 1),
                        );
                        return Ok(());
                    }
                    self.stats.failure(&m);
                }
            }
            attempt += 1;
            tokio::select! {
                _ = stop.cancelled() => return Err(batch),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(cap);
        }
    }

    async fn post(&self, batch: &[Bytes]) -> Result<(), PostError> {
        let body = event_list(batch);
        let req = Request::post(self.uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, "ztgate")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| PostError::Permanent(format!("building request: {e}")))?;
        let fut = async {
            let resp = self.client.request(req).await.map_err(|e| {
                PostError::Transient(format!("POST {}: {}", self.uri, error_chain(&e)))
            })?;
            let status = resp.status();
            // Read (a bounded amount of) the answer so the connection can be reused.
            let _ = Limited::new(resp.into_body(), 64 * 1024).collect().await;
            classify(status).map_err(|e| match e {
                PostError::Transient(m) => PostError::Transient(format!("POST {}: {m}", self.uri)),
                PostError::Permanent(m) => PostError::Permanent(format!("POST {}: {m}", self.uri)),
            })
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(PostError::Transient(format!(
                "POST {}: no answer within {:?}",
                self.uri, self.timeout
            ))),
        }
    }
}

/// An `audit.k8s.io/v1` `EventList` of events already written as JSON objects.
fn event_list(items: &[Bytes]) -> Vec<u8> {
    let mut body = Vec::with_capacity(128 + items.iter().map(|e| e.len() + 1).sum::<usize>());
    body.extend_from_slice(b"{\"kind\":\"EventList\",\"apiVersion\":\"");
    body.extend_from_slice(API_VERSION.as_bytes());
    body.extend_from_slice(b"\",\"metadata\":{},\"items\":[");
    for (i, e) in items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(e);
    }
    body.extend_from_slice(b"]}");
    body
}

fn classify(status: StatusCode) -> Result<(), PostError> {
    if status.is_success() {
        Ok(())
    } else if status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
    {
        Err(PostError::Transient(format!("status {status}")))
    } else {
        Err(PostError::Permanent(format!("status {status}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::event::{EventList, EventParts, Level, Stage};

    #[test]
    fn the_posted_list_is_an_event_list_of_the_events() {
        let method = http::Method::GET;
        let uri: Uri = "/api/v1/namespaces/a/pods?watch=1".parse().unwrap();
        let events: Vec<_> = (0..3)
            .map(|i| {
                // microseconds, as events carry them: the list reads back equal
                let at = std::time::SystemTime::UNIX_EPOCH
                    + std::time::Duration::from_micros(1_795_705_445_123_456 + i as u64);
                let mut p = EventParts::new("id", &method, &uri, at);
                p.annotate("n", format!("{i} \"quoted\""));
                p.build_at(Level::Metadata, Stage::ALL[i], at)
            })
            .collect();
        let lines: Vec<Bytes> = events
            .iter()
            .map(|e| {
                let mut v = Vec::new();
                e.write_json(&mut v);
                Bytes::from(v)
            })
            .collect();
        for n in 0..=3 {
            let body = String::from_utf8(event_list(&lines[..n])).unwrap();
            assert!(body.starts_with(
                r#"{"kind":"EventList","apiVersion":"audit.k8s.io/v1","metadata":{},"items":["#
            ));
            let list: EventList = serde_json::from_str(&body).unwrap();
            assert_eq!(list, EventList::new(events[..n].to_vec()));
        }
    }
}
