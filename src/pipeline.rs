//! The per-request path, top to bottom:
//!
//! 1. target checks (absolute-form, ambiguous paths) -> 400
//! 2. credentials (one bearer token at most; the TLS peer chain)
//! 3. authenticate -> `Identity` (x509 today; OIDC and device trust plug in here) -> 401
//! 4. classify (unary, streaming, upgrade)
//! 5. authorize -> `Authorized` (Cedar plugs in here) -> 403
//! 6. forward with impersonation; streams are registered so they can be closed later
//!
//! Errors from every step become a `Status` in `errors.rs`, the only place that decides what a
//! client sees.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use rustls_pki_types::CertificateDer;

use crate::authn::credentials::bearer_from_headers;
use crate::authn::x509::Verified;
use crate::authn::{AuthnError, Credentials, Identity};
use crate::body::{full, Body};
use crate::errors::PipelineError;
use crate::proxy::{path, shape_of, RequestShape};
use crate::server::Gateway;
use crate::streams::GuardedBody;

/// What the gateway knows about one client connection.
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub chain: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// The x509 verification of `chain`, valid while the bundle generation is unchanged.
    x509: Mutex<Option<Verified>>,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, chain: Option<Vec<CertificateDer<'static>>>) -> ConnInfo {
        ConnInfo {
            peer,
            chain: chain.filter(|c| !c.is_empty()).map(Arc::new),
            x509: Mutex::new(None),
        }
    }
}

/// The Kubernetes-ish verb used as a metrics label (bounded set).
fn verb_label(method: &Method, shape: RequestShape) -> &'static str {
    match shape {
        RequestShape::Streaming(crate::streams::StreamKind::Watch) => "watch",
        RequestShape::Upgrade(_) => "connect",
        _ => match *method {
            Method::GET | Method::HEAD => "get",
            Method::POST => "create",
            Method::PUT => "update",
            Method::PATCH => "patch",
            Method::DELETE => "delete",
            Method::OPTIONS => "options",
            _ => "other",
        },
    }
}

/// Entry point for every request on the TLS listener.
pub async fn handle(
    gw: Arc<Gateway>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    match req.uri().path() {
        "/livez" | "/healthz" => return Ok(plain(StatusCode::OK, "ok")),
        "/readyz" => return Ok(gw.readyz()),
        _ => {}
    }
    let method = req.method().clone();
    let uri = req.uri().clone();
    let shape = shape_of(&req);
    let verb = verb_label(&method, shape);
    let mut user = None;
    let (resp, outcome) = match run(&gw, &conn, req, shape, &mut user).await {
        Ok(resp) => (resp, "forwarded"),
        Err(err) => {
            match &err {
                PipelineError::Authn(e) => {
                    gw.metrics.authn_failure(e.reason_label());
                    tracing::warn!(peer = %conn.peer, method = %method, path = uri.path(), reason = %e, "authentication failed");
                }
                PipelineError::Upstream(e) => {
                    gw.metrics.upstream_error(err.outcome());
                    if let crate::proxy::UpstreamError::Connect(why) = e {
                        gw.upstream_unreachable(why);
                    }
                    tracing::error!(method = %method, path = uri.path(), user = user.as_deref().unwrap_or(""), error = %e, "upstream failed");
                }
                other => {
                    tracing::info!(peer = %conn.peer, method = %method, path = uri.path(), user = user.as_deref().unwrap_or(""), reason = %other, "request refused");
                }
            }
            let outcome = err.outcome();
            (err.into_response(), outcome)
        }
    };
    let took = start.elapsed();
    let code = resp.status().as_u16();
    gw.metrics.request(verb, code, outcome, took);
    tracing::info!(
        method = %method,
        path = uri.path(),
        user = user.as_deref().unwrap_or(""),
        code,
        outcome,
        ms = took.as_secs_f64() * 1000.0,
        "request"
    );
    Ok(resp)
}

async fn run(
    gw: &Arc<Gateway>,
    conn: &Arc<ConnInfo>,
    req: Request<Incoming>,
    shape: RequestShape,
    user: &mut Option<String>,
) -> Result<Response<Body>, PipelineError> {
    if gw.is_draining() {
        return Err(PipelineError::ShuttingDown);
    }
    // 1. The target must mean the same thing here and at kube-apiserver.
    if req.version() <= http::Version::HTTP_11 && req.uri().authority().is_some() {
        return Err(PipelineError::BadRequest(
            "absolute-form request targets are not accepted",
        ));
    }
    path::check_path(req.uri().path()).map_err(PipelineError::BadRequest)?;

    // 2-3. Credentials and authentication.
    let creds = Credentials {
        bearer: bearer_from_headers(req.headers())?,
        peer_chain: conn.chain.clone(),
    };
    let identity = authenticate(gw, conn, &creds)?;
    *user = Some(identity.user().to_owned());

    // 5. Authorization.
    let authorized = match gw.authorizer.authorize(identity) {
        Ok(a) => a,
        Err(never) => match never {},
    };

    // 6. Forwarding.
    let client_ip = conn.peer.ip();
    match shape {
        RequestShape::Unary => {
            let permit = gw
                .inflight_limit
                .clone()
                .try_acquire_owned()
                .map_err(|_| PipelineError::TooManyRequests)?;
            let guard = gw.inflight.enter();
            let resp = gw
                .upstream
                .forward(req, &authorized, client_ip, Some(gw.request_timeout))
                .await?;
            let (parts, body) = resp.into_parts();
            let body = GuardedBody::new(body, Box::new((permit, guard)), None);
            Ok(Response::from_parts(parts, body.boxed_unsync()))
        }
        RequestShape::Streaming(kind) => {
            let handle = gw.streams.register(kind, authorized.identity().user());
            let token = handle.token();
            let resp = gw
                .upstream
                .forward(req, &authorized, client_ip, None)
                .await?;
            let (parts, body) = resp.into_parts();
            let body = GuardedBody::new(body, Box::new(handle), Some(token));
            Ok(Response::from_parts(parts, body.boxed_unsync()))
        }
        RequestShape::Upgrade(kind) => {
            let handle = gw.streams.register(kind, authorized.identity().user());
            gw.upstream
                .forward_upgrade(req, &authorized, client_ip, handle, gw.metrics.clone())
                .await
        }
    }
}

/// Runs the configured authenticators over the request's credentials.
fn authenticate(
    gw: &Gateway,
    conn: &ConnInfo,
    creds: &Credentials,
) -> Result<Arc<Identity>, AuthnError> {
    // As kube-apiserver's union authenticator: a client certificate that verifies wins; the
    // token authenticators (OIDC) are consulted otherwise. A token is never forwarded either way.
    let Some(chain) = creds.peer_chain.as_ref() else {
        return Err(if creds.bearer.is_some() {
            AuthnError::TokenAuthNotConfigured
        } else {
            AuthnError::NoCredentials
        });
    };
    let x509 = gw.x509.as_ref().ok_or(AuthnError::NoCredentials)?;
    let now = SystemTime::now();
    let generation = x509.generation();
    let verified = {
        let mut cached = conn.x509.lock().expect("x509 cache poisoned");
        match cached.as_ref() {
            Some(v) if v.generation == generation => v.clone(),
            _ => {
                let v = x509.verify(chain, now);
                *cached = Some(v.clone());
                v
            }
        }
    };
    let identity = verified.result?;
    if identity.expires_at().is_some_and(|t| t <= now) {
        return Err(AuthnError::CertificateExpired);
    }
    Ok(identity)
}

pub(crate) fn plain(code: StatusCode, text: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(text));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
