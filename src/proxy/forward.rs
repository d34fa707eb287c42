//! The pooled upstream client and ordinary (non-upgrade) forwarding.

use std::sync::Arc;
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
use crate::errors::{error_chain, PipelineError};

/// Why forwarding failed, by what went wrong on the upstream side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// TCP or TLS connection to kube-apiserver failed (it is down, unreachable or misconfigured).
    #[error("connection failed: {0}")]
    Connect(String),
    /// kube-apiserver did not answer within the request timeout.
    #[error("timed out")]
    Timeout,
    /// The connection broke or the upstream spoke invalid HTTP.
    #[error("{0}")]
    Protocol(String),
}

/// kube-apiserver as the gateway reaches it.
pub struct Upstream {
    scheme: Scheme,
    authority: Authority,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) server_name: ServerName<'static>,
    client: Client<HttpsConnector<HttpConnector>, Body>,
    pub(crate) upgrade_tls: tokio_rustls::TlsConnector,
    token: Option<Arc<ArcSwap<Option<HeaderValue>>>>,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) max_body: u64,
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
    pub fn new(s: UpstreamSettings) -> Result<Upstream, String> {
        let authority = s
            .url
            .authority()
            .cloned()
            .ok_or("upstream URL has no host")?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = authority.port_u16().unwrap_or(443);
        let name = s.server_name.clone().unwrap_or_else(|| host.clone());
        let server_name = ServerName::try_from(name.clone())
            .map_err(|e| format!("invalid upstream server name {name:?}: {e}"))?;
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
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_while_idle(true)
            .build(connector);
        Ok(Upstream {
            scheme: Scheme::HTTPS,
            authority,
            host,
            port,
            server_name,
            client,
            upgrade_tls: tokio_rustls::TlsConnector::from(Arc::new(s.upgrade_tls)),
            token: s.token,
            connect_timeout: s.connect_timeout,
            request_timeout: s.request_timeout,
            max_body: s.max_body,
        })
    }

    pub(crate) fn authority(&self) -> &Authority {
        &self.authority
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
    pub(crate) fn prepare_headers(
        &self,
        headers: &mut http::HeaderMap,
        authorized: &Authorized,
        client_ip: std::net::IpAddr,
    ) -> Result<(), PipelineError> {
        headers::sanitize_request_headers(headers);
        headers::set_impersonation(headers, authorized.identity()).map_err(|e| {
            PipelineError::Authn(crate::authn::AuthnError::InvalidIdentity(e.to_string()))
        })?;
        if let Some(tok) = &self.token {
            if let Some(v) = tok.load().as_ref() {
                headers.insert(header::AUTHORIZATION, v.clone());
            }
        }
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_str(&client_ip.to_string()).expect("an IP is a header value"),
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
            .map_err(classify)?;
        Ok(resp.status())
    }

    /// Forwards an authorized, non-upgrade request. `timeout` bounds the wait for response
    /// headers (None for streams).
    pub async fn forward<B>(
        &self,
        req: Request<B>,
        authorized: &Authorized,
        client_ip: std::net::IpAddr,
        timeout: Option<Duration>,
    ) -> Result<Response<Incoming>, PipelineError>
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
        let attempt = async {
            match self.client.request(Request::from_parts(parts, body)).await {
                Err(e) if !e.is_connect() && !is_body_too_large(&e) => match retry {
                    Some(mut p) => {
                        tracing::debug!(error = %error_chain(&e), "retrying an idempotent request on a fresh connection");
                        p.uri = self.uri_for(p.uri.path_and_query());
                        p.version = http::Version::HTTP_11;
                        self.client
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
                PipelineError::Upstream(classify(e))
            }
        })?;
        headers::sanitize_response_headers(resp.headers_mut());
        Ok(resp)
    }
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
        self.0.lock().unwrap_or_else(|e| e.into_inner())
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

fn classify(e: hyper_util::client::legacy::Error) -> UpstreamError {
    if e.is_connect() {
        UpstreamError::Connect(error_chain(&e))
    } else {
        UpstreamError::Protocol(error_chain(&e))
    }
}
