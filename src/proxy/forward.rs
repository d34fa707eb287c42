//! The pooled upstream client and ordinary (non-upgrade) forwarding.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;

use super::headers;
use crate::authz::Authorized;
use crate::body::{Body, BoxError};
use crate::refusal::{PipelineError, UpstreamError};
use crate::util::chain::error_chain;

/// Long-lived responses (watches, `logs -f`) at most per upstream HTTP/2 connection.
///
/// hyper's pool multiplexes every request to a host on one HTTP/2 connection and never opens a
/// second one when the server's `SETTINGS_MAX_CONCURRENT_STREAMS` is reached (kube-apiserver
/// allows 1000 by default; RFC 9113 asks servers for at least 100): past that, a new watch —
/// and every ordinary request behind it — would wait for a stream to end, which for watches may
/// be never. So streams ride on their own connections ("lanes") of at most this many each, and
/// ordinary requests keep a connection of their own.
pub const STREAMS_PER_LANE: usize = 100;

type PooledClient = Client<HttpsConnector<HttpConnector>, Body>;

/// One upstream connection (its own pool) for long-lived responses.
struct Lane {
    client: PooledClient,
    live: AtomicUsize,
}

/// A place on a lane, held by the response body until it ends.
pub struct LaneSlot(Arc<Lane>);

impl Drop for LaneSlot {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// The upstream response body; for a stream, it holds its lane place until it ends.
    pub struct UpstreamBody {
        #[pin]
        inner: Incoming,
        lane: Option<LaneSlot>,
    }
}

impl http_body::Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// kube-apiserver as the gateway reaches it.
pub struct Upstream {
    scheme: Scheme,
    authority: Authority,
    /// `https://host[:port]`, as messages name it (never with userinfo).
    shown_url: String,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) server_name: ServerName<'static>,
    /// Ordinary requests.
    client: PooledClient,
    connector: HttpsConnector<HttpConnector>,
    /// Long-lived responses, [`STREAMS_PER_LANE`] per connection.
    lanes: Mutex<Vec<Arc<Lane>>>,
    pub(crate) upgrade_tls: tokio_rustls::TlsConnector,
    token: Option<Arc<ArcSwap<Option<HeaderValue>>>>,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) max_body: u64,
}

/// Why the upstream settings are unusable (the operator's config).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamConfigError {
    #[error("upstream URL has no host")]
    NoHost,
    #[error("invalid upstream server name {name:?}: {source}")]
    ServerName {
        name: String,
        #[source]
        source: rustls_pki_types::InvalidDnsNameError,
    },
}

pub struct UpstreamSettings {
    pub url: Uri,
    pub server_name: Option<String>,
    pub pooled_tls: ClientConfig,
    pub upgrade_tls: ClientConfig,
    /// `Authorization: Bearer ...` value for a service-account token, swapped on rotation.
    pub token: Option<Arc<ArcSwap<Option<HeaderValue>>>>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub max_body: u64,
}

impl Upstream {
    pub fn new(s: UpstreamSettings) -> Result<Upstream, UpstreamConfigError> {
        let authority = s
            .url
            .authority()
            .cloned()
            .ok_or(UpstreamConfigError::NoHost)?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = authority.port_u16().unwrap_or(443);
        let shown_url = match authority.port_u16() {
            Some(p) => format!("https://{}:{p}", authority.host()),
            None => format!("https://{}", authority.host()),
        };
        let name = s.server_name.clone().unwrap_or_else(|| host.clone());
        let server_name = ServerName::try_from(name.clone())
            .map_err(|source| UpstreamConfigError::ServerName { name, source })?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(s.connect_timeout));
        http.set_nodelay(true);
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(s.pooled_tls)
            .https_only()
            .with_server_name_resolver(FixedServerNameResolver::new(server_name.clone()))
            .enable_all_versions()
            .wrap_connector(http);
        let client = pooled_client(connector.clone());
        Ok(Upstream {
            scheme: Scheme::HTTPS,
            authority,
            shown_url,
            host,
            port,
            server_name,
            client,
            connector,
            lanes: Mutex::new(Vec::new()),
            upgrade_tls: tokio_rustls::TlsConnector::from(Arc::new(s.upgrade_tls)),
            token: s.token,
            connect_timeout: s.connect_timeout,
            request_timeout: s.request_timeout,
            max_body: s.max_body,
        })
    }

    /// A place for one more long-lived response: the first lane with room, else a new lane.
    fn lane(&self) -> LaneSlot {
        let mut lanes = crate::util::sync::lock(&self.lanes);
        let lane = match lanes
            .iter()
            .find(|l| l.live.load(Ordering::Relaxed) < STREAMS_PER_LANE)
        {
            Some(l) => l.clone(),
            None => {
                let l = Arc::new(Lane {
                    client: pooled_client(self.connector.clone()),
                    live: AtomicUsize::new(0),
                });
                lanes.push(l.clone());
                l
            }
        };
        lane.live.fetch_add(1, Ordering::Relaxed);
        LaneSlot(lane)
    }

    /// Upstream connections carrying long-lived responses, and the responses on them.
    pub fn lane_counts(&self) -> (usize, usize) {
        let lanes = crate::util::sync::lock(&self.lanes);
        let live = lanes.iter().map(|l| l.live.load(Ordering::Relaxed)).sum();
        (lanes.len(), live)
    }

    pub(crate) fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The error for a kube-apiserver that cannot be reached, `cause` in a few words.
    pub(crate) fn unreachable(&self, cause: impl std::fmt::Display) -> UpstreamError {
        UpstreamError::Connect {
            message: self.unreachable_message(cause),
            source: None,
        }
    }

    fn unreachable_message(&self, cause: impl std::fmt::Display) -> String {
        format!(
            "kube-apiserver at {} is not reachable: {cause}",
            self.shown_url
        )
    }

    /// [`Upstream::unreachable`] for a failed connection attempt: `e` in a few words, and `e`
    /// itself kept as the cause.
    pub(crate) fn unreachable_by(
        &self,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> UpstreamError {
        let cause = short_cause(&e);
        UpstreamError::Connect {
            message: self.unreachable_message(cause),
            source: Some(Box::new(e)),
        }
    }

    /// Sorts a failed request: not reachable (with the cause in a few words; the whole error
    /// chain goes to the debug log), or failed after connecting.
    fn classify(&self, e: hyper_util::client::legacy::Error) -> UpstreamError {
        if e.is_connect() {
            tracing::debug!(error = %error_chain(&e), "kube-apiserver not reachable");
            self.unreachable_by(e)
        } else {
            UpstreamError::Protocol(error_chain(&e))
        }
    }

    pub(crate) fn uri_for(&self, pq: Option<&PathAndQuery>) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(
            pq.cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        Uri::from_parts(parts).expect("scheme, authority and path make a URI")
    }

    /// Replaces the client's headers with the gateway's: hygiene first, then identity.
    ///
    /// The request's `Audit-ID` is the gateway's (the pipeline sets it on arrival, replacing any
    /// the client sent) and is kept through the hygiene: a client naming it in `Connection` must
    /// not separate kube-apiserver's audit events from the gateway's. Everything else the
    /// gateway sends is written after the hygiene, so nothing the client names can remove it.
    pub(crate) fn prepare_headers(
        &self,
        headers: &mut http::HeaderMap,
        authorized: &Authorized,
        client_ip: std::net::IpAddr,
    ) -> Result<(), PipelineError> {
        let audit_id = headers.remove(&headers::AUDIT_ID);
        headers::sanitize_request_headers(headers);
        if let Some(id) = audit_id {
            headers.insert(headers::AUDIT_ID.clone(), id);
        }
        headers::set_impersonation(headers, authorized.identity()).map_err(|e| {
            PipelineError::Authn(crate::authn::AuthnError::InvalidIdentity(e.to_string()))
        })?;
        if let Some(tok) = &self.token {
            if let Some(v) = tok.load().as_ref() {
                headers.insert(header::AUTHORIZATION, v.clone());
            }
        }
        headers.insert(
            headers::X_FORWARDED_FOR.clone(),
            headers::forwarded_for(client_ip),
        );
        Ok(())
    }

    /// Refuses a body whose declared length is over the limit, and limits the rest as it streams.
    pub(crate) fn limited_body<B>(
        &self,
        req_headers: &http::HeaderMap,
        body: B,
    ) -> Result<Body, PipelineError>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let declared = req_headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body) {
            return Err(PipelineError::BodyTooLarge {
                limit: self.max_body,
            });
        }
        Ok(Limited::new(
            body.map_err(|e| -> BoxError { e.into() }),
            self.max_body as usize,
        )
        .map_err(|e: BoxError| e)
        .boxed_unsync())
    }

    /// A probe used by `/readyz`: does kube-apiserver answer at all?
    pub async fn probe(&self, path: &str) -> Result<http::StatusCode, UpstreamError> {
        let pq =
            PathAndQuery::try_from(path).map_err(|e| UpstreamError::Protocol(e.to_string()))?;
        let mut req = Request::new(crate::body::empty());
        *req.uri_mut() = self.uri_for(Some(&pq));
        if let Some(tok) = &self.token {
            if let Some(v) = tok.load().as_ref() {
                req.headers_mut().insert(header::AUTHORIZATION, v.clone());
            }
        }
        let resp = tokio::time::timeout(self.connect_timeout * 2, self.client.request(req))
            .await
            .map_err(|_| UpstreamError::Timeout)?
            .map_err(|e| self.classify(e))?;
        Ok(resp.status())
    }

    /// A `GET` of `path` as the gateway itself: its own client certificate or token, no
    /// impersonation and nothing from a client, for what the gateway reads on its own behalf
    /// (API discovery). Answers JSON; at most `limit` bytes of body, within the request timeout.
    pub async fn get_as_gateway(
        &self,
        path: &str,
        limit: usize,
    ) -> Result<(http::StatusCode, bytes::Bytes), UpstreamError> {
        let pq =
            PathAndQuery::try_from(path).map_err(|e| UpstreamError::Protocol(e.to_string()))?;
        let mut req = Request::new(crate::body::empty());
        *req.uri_mut() = self.uri_for(Some(&pq));
        req.headers_mut()
            .insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(tok) = &self.token {
            if let Some(v) = tok.load().as_ref() {
                req.headers_mut().insert(header::AUTHORIZATION, v.clone());
            }
        }
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| self.classify(e))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), limit)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        UpstreamError::Protocol(format!(
                            "{path}: response larger than {limit} bytes"
                        ))
                    } else {
                        UpstreamError::Protocol(format!("{path}: {}", error_chain(&*e)))
                    }
                })?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(self.request_timeout, exchange)
            .await
            .map_err(|_| UpstreamError::Timeout)?
    }

    /// Forwards an authorized, non-upgrade request. `timeout` bounds the wait for response
    /// headers; `None` marks a long-lived response (watch, `logs -f`), which gets a place on a
    /// stream lane (see [`STREAMS_PER_LANE`]).
    pub async fn forward<B>(
        &self,
        req: Request<B>,
        authorized: &Authorized,
        client_ip: std::net::IpAddr,
        timeout: Option<Duration>,
    ) -> Result<Response<UpstreamBody>, PipelineError>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (mut parts, body) = req.into_parts();
        self.prepare_headers(&mut parts.headers, authorized, client_ip)?;
        // A bodiless GET/HEAD/OPTIONS that fails on a pooled connection the upstream had
        // already closed is retried once on a fresh one: safe, and it turns an upstream restart
        // into no error at all (or a clear 503 when it is really down).
        let retry = (matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS)
            && !parts.headers.contains_key(header::TRANSFER_ENCODING)
            && parts
                .headers
                .get(header::CONTENT_LENGTH)
                .is_none_or(|v| v.as_bytes() == b"0"))
        .then(|| parts.clone());
        let outcome = BodyOutcome::default();
        let body = outcome.watch(self.limited_body(&parts.headers, body)?);
        parts.uri = self.uri_for(parts.uri.path_and_query());
        parts.version = http::Version::HTTP_11;
        let lane = timeout.is_none().then(|| self.lane());
        let client = lane.as_ref().map_or(&self.client, |l| &l.0.client);
        let attempt = async {
            match client.request(Request::from_parts(parts, body)).await {
                Err(e) if !e.is_connect() && !is_body_too_large(&e) => match retry {
                    Some(mut p) => {
                        tracing::debug!(error = %error_chain(&e), "retrying an idempotent request on a fresh connection");
                        p.uri = self.uri_for(p.uri.path_and_query());
                        p.version = http::Version::HTTP_11;
                        client
                            .request(Request::from_parts(p, crate::body::empty()))
                            .await
                    }
                    None => Err(e),
                },
                other => other,
            }
        };
        let result = match timeout {
            Some(t) => tokio::time::timeout(t, attempt)
                .await
                .map_err(|_| PipelineError::Upstream(UpstreamError::Timeout))?,
            None => attempt.await,
        };
        let mut resp = result.map_err(|e| {
            if is_body_too_large(&e) || outcome.too_large() {
                PipelineError::BodyTooLarge {
                    limit: self.max_body,
                }
            } else if let Some(why) = outcome.client_error() {
                PipelineError::BadRequest(
                    format!("the request body could not be read: {why}").into(),
                )
            } else {
                PipelineError::Upstream(self.classify(e))
            }
        })?;
        headers::sanitize_response_headers(resp.headers_mut());
        Ok(resp.map(|inner| UpstreamBody { inner, lane }))
    }
}

fn pooled_client(connector: HttpsConnector<HttpConnector>) -> PooledClient {
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .http2_keep_alive_while_idle(true)
        .build(connector)
}

fn is_body_too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// What happened to a client's request body on its way upstream. When forwarding fails, this
/// says whether the client's side failed first (body over the limit: 413; body unreadable, e.g.
/// broken chunked framing: 400) rather than kube-apiserver (502): over HTTP/2 the body's own
/// error is reduced to a stream reset and does not survive in hyper's error.
#[derive(Clone, Default)]
struct BodyOutcome(Arc<std::sync::Mutex<Option<BodyFailure>>>);

#[derive(Clone)]
enum BodyFailure {
    TooLarge,
    Client(String),
}

impl BodyOutcome {
    fn watch(&self, body: Body) -> Body {
        WatchedBody {
            body,
            outcome: self.clone(),
        }
        .boxed_unsync()
    }

    fn too_large(&self) -> bool {
        matches!(*self.lock(), Some(BodyFailure::TooLarge))
    }

    fn client_error(&self) -> Option<String> {
        match &*self.lock() {
            Some(BodyFailure::Client(why)) => Some(why.clone()),
            _ => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<BodyFailure>> {
        crate::util::sync::lock(&self.0)
    }
}

struct WatchedBody {
    body: Body,
    outcome: BodyOutcome,
}

impl http_body::Body for WatchedBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Err(e))) = &polled {
            let failure = if e.is::<http_body_util::LengthLimitError>() {
                BodyFailure::TooLarge
            } else {
                BodyFailure::Client(error_chain(&**e))
            };
            self.outcome.lock().get_or_insert(failure);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The next error in a chain. An `io::Error` wrapping another error reports that error's
/// source, not the error itself, so the wrapped one is taken from it directly.
fn next_cause<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a (dyn std::error::Error + 'static)> {
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        return Some(inner);
    }
    e.source()
}

/// Why a connection to kube-apiserver failed, in a few words: the TLS error, else what the
/// innermost I/O error says happened (refused, timed out, unreachable, ...), else the innermost
/// error's own text. Operators read it in `/readyz` and clients in the `Status`; the whole
/// chain of library errors (`client error (Connect): tcp connect error: ...`) says no more.
pub(crate) fn short_cause(e: &(dyn std::error::Error + 'static)) -> String {
    use std::io::ErrorKind;
    let mut io_kind = None;
    let mut dns = false;
    let mut innermost = e;
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return format!("TLS handshake failed: {tls}");
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            io_kind = Some(io.kind());
        }
        // hyper-util's resolver failure; its type is not public, its message is fixed.
        dns |= err.to_string() == "dns error";
        innermost = err;
        cur = next_cause(err);
    }
    let said = match io_kind {
        Some(ErrorKind::ConnectionRefused) => "connection refused",
        Some(ErrorKind::TimedOut) => "connection timed out",
        Some(ErrorKind::HostUnreachable) => "host unreachable",
        Some(ErrorKind::NetworkUnreachable) => "network unreachable",
        Some(ErrorKind::ConnectionReset) => "connection reset",
        Some(ErrorKind::ConnectionAborted) => "connection aborted",
        Some(ErrorKind::UnexpectedEof) => "connection closed during the TLS handshake",
        _ => "",
    };
    if !said.is_empty() {
        return said.to_owned();
    }
    let text = innermost.to_string();
    // " (os error 111)" tells a reader nothing the words before it do not.
    let text = match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_owned(),
        _ => text,
    };
    if dns {
        format!("name lookup failed: {text}")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream() -> Upstream {
        let tls = || {
            ClientConfig::builder_with_provider(crate::crypto_provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        };
        Upstream::new(UpstreamSettings {
            url: "https://127.0.0.1:6443".parse().unwrap(),
            server_name: None,
            pooled_tls: tls(),
            upgrade_tls: tls(),
            token: None,
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            max_body: 1024,
        })
        .unwrap()
    }

    #[test]
    fn long_lived_responses_fill_lanes_of_bounded_size_and_reuse_freed_places() {
        let up = upstream();
        let mut slots: Vec<LaneSlot> = (0..2 * STREAMS_PER_LANE + 1).map(|_| up.lane()).collect();
        assert_eq!(up.lane_counts(), (3, 2 * STREAMS_PER_LANE + 1));
        // Streams on the first lane end: new ones take their places, no fourth connection.
        slots.drain(..10);
        let first = slots[0].0.clone();
        assert_eq!(up.lane_counts(), (3, 2 * STREAMS_PER_LANE - 9));
        slots.extend((0..10).map(|_| up.lane()));
        assert_eq!(up.lane_counts(), (3, 2 * STREAMS_PER_LANE + 1));
        assert!(slots[slots.len() - 10..]
            .iter()
            .all(|s| Arc::ptr_eq(&s.0, &first)));
        drop(slots);
        assert_eq!(up.lane_counts(), (3, 0));
    }
}
