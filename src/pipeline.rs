//! The per-request path, top to bottom:
//!
//! 1. classify once (`route.rs`): health, login pages, a target kube-apiserver could read
//!    otherwise (400), kube-apiserver's webhooks (its certificate only), posture reports, or an
//!    API request with its RequestInfo and whether it is long-running
//! 2. credentials (one bearer token at most; the TLS peer chain)
//! 3. authenticate -> `Identity` (OIDC token, else x509 certificate) -> 401
//! 4. the device (certificate, token binding) -> 401
//! 5. decide once (`decide.rs`): locks on everyone the request acts as, posture, the client's
//!    own impersonation (`kubectl --as`) and policy -> `Authorized`, or 401/403/503
//! 6. serve: the gateway's own APIs and self-reviews here, everything else forwarded with
//!    impersonation; streams are registered so the same decider can close them later
//!
//! Errors from every step become a `Status` in `errors.rs`, the only place that decides what a
//! client sees.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use rustls_pki_types::CertificateDer;
use serde_json::json;

use crate::authn::credentials::bearer_from_headers;
use crate::authn::x509::Verified;
use crate::authn::{AuthnError, Credentials, Identity};
use crate::authz::requestinfo::RequestInfo;
use crate::authz::{Authorized, ImpersonationRequest};
use crate::body::Body;
use crate::decide::{DeviceSeen, Facts};
use crate::proxy::RequestShape;
use crate::refusal::PipelineError;
use crate::route::{Route, Target};
use crate::streams::GuardedBody;

/// What the request path uses, built once by the assembly: the authenticators, the decider, the
/// upstream, the stream registry and limits, and the handlers it dispatches to, each with its
/// own narrow view of the gateway.
pub struct Pipeline<U = crate::proxy::Upstream> {
    /// Where authorized requests go: kube-apiserver (a stand-in in tests).
    pub upstream: Arc<U>,
    pub auditor: Arc<crate::audit::Auditor>,
    pub x509: Option<crate::authn::x509::X509Authenticator>,
    /// Always present; with no issuers configured it authenticates nothing, and a config
    /// reload may add issuers without a restart.
    pub oidc: Arc<crate::authn::oidc::OidcAuthenticator>,
    pub bundles: Arc<crate::tls::bundles::TrustBundles>,
    pub devices: Option<crate::device::DeviceConfig>,
    /// SPIFFE trust domains whose workload SVIDs authenticate as users.
    pub workloads: Vec<crate::device::WorkloadMapping>,
    /// The one decider: locks, posture and policy for requests, streams and reviews.
    pub decider: Arc<crate::decide::Decider>,
    pub metrics: Arc<crate::telemetry::Metrics>,
    pub streams: Arc<crate::streams::StreamRegistry>,
    pub inflight: Arc<crate::streams::Inflight>,
    pub inflight_limit: Arc<tokio::sync::Semaphore>,
    pub request_timeout: Duration,
    /// Live streams are closed this long after they opened (None: no limit).
    pub max_stream_age: Option<Duration>,
    pub readiness: Arc<crate::readiness::Readiness>,
    /// The web login pages (`sso` in the config); they verify with `oidc`.
    pub sso: Option<Arc<crate::sso::Sso>>,
    pub webhooks: crate::webhook::Webhooks,
    pub locks: crate::locks::LocksApi,
    pub posture: crate::posture::api::PostureApi,
    pub rules: Arc<crate::authz::rules::RulesReview>,
}

/// Where an authorized request goes. [`crate::proxy::Upstream`] (kube-apiserver) in the
/// gateway; a generic parameter, so the request path costs the same as a direct call, and the
/// pipeline's order can be tested without a network.
pub trait Forward: Send + Sync + 'static {
    /// The response body it answers with.
    type Body: http_body::Body<Data = Bytes, Error: Into<crate::body::BoxError>> + Send + 'static;

    /// Sends an authorized request on, acting as `authorized`'s identity.
    fn forward<B>(
        &self,
        req: Request<B>,
        authorized: &Authorized,
        client_ip: std::net::IpAddr,
        timeout: Option<std::time::Duration>,
    ) -> impl std::future::Future<Output = Result<Response<Self::Body>, PipelineError>> + Send
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<crate::body::BoxError>;

    /// Sends an authorized upgrade (exec, attach, port-forward, WebSocket) on and joins the two
    /// connections; `stream` is its registration.
    fn forward_upgrade(
        &self,
        req: Request<Body>,
        authorized: &Authorized,
        client_ip: std::net::IpAddr,
        stream: crate::streams::StreamHandle,
        metrics: Arc<crate::telemetry::Metrics>,
    ) -> impl std::future::Future<Output = Result<Response<Body>, PipelineError>> + Send;
}

impl Forward for crate::proxy::Upstream {
    type Body = crate::proxy::forward::UpstreamBody;

    fn forward<B>(
        &self,
        req: Request<B>,
        authorized: &Authorized,
        client_ip: std::net::IpAddr,
        timeout: Option<std::time::Duration>,
    ) -> impl std::future::Future<Output = Result<Response<Self::Body>, PipelineError>> + Send
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<crate::body::BoxError>,
    {
        crate::proxy::Upstream::forward(self, req, authorized, client_ip, timeout)
    }

    fn forward_upgrade(
        &self,
        req: Request<Body>,
        authorized: &Authorized,
        client_ip: std::net::IpAddr,
        stream: crate::streams::StreamHandle,
        metrics: Arc<crate::telemetry::Metrics>,
    ) -> impl std::future::Future<Output = Result<Response<Body>, PipelineError>> + Send {
        crate::proxy::Upstream::forward_upgrade(self, req, authorized, client_ip, stream, metrics)
    }
}

/// What the gateway knows about one client connection.
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub chain: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// The x509 verification of `chain`, valid while the bundle generation is unchanged.
    x509: Mutex<Option<Verified>>,
    /// The device read from `chain` (None: not a valid device certificate), by bundle generation.
    device: Mutex<Option<(u64, Option<crate::device::DeviceIdentity>)>>,
    /// The workload SVID verdict for `chain`, by bundle generation.
    workload: Mutex<Option<(u64, WorkloadVerdict)>>,
    /// The last bearer token verified on this connection.
    token: crate::authn::oidc::TokenMemo,
}

/// A workload SVID's identity, or why the chain is not one (for the log).
type WorkloadVerdict = Result<Arc<Identity>, NotWorkload>;

/// Why a client certificate chain is not a usable workload SVID.
#[derive(Clone, Debug, thiserror::Error)]
enum NotWorkload {
    #[error(transparent)]
    Svid(#[from] crate::device::DeviceError),
    #[error(transparent)]
    Identity(#[from] AuthnError),
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, chain: Option<Vec<CertificateDer<'static>>>) -> ConnInfo {
        ConnInfo {
            peer,
            chain: chain.filter(|c| !c.is_empty()).map(Arc::new),
            x509: Mutex::new(None),
            device: Mutex::new(None),
            workload: Mutex::new(None),
            token: Default::default(),
        }
    }
}

/// Facts gathered along the way, for the request log line and the audit events.
#[derive(Default)]
struct Trace {
    user: Option<String>,
    impersonated: Option<String>,
    identity: Option<Arc<Identity>>,
    impersonated_identity: Option<Arc<Identity>>,
    info: Option<Arc<RequestInfo>>,
    /// (decision, reason, determining policies) when policy decided.
    decision: Option<(crate::audit::event::Decision, String, String)>,
    /// Set for streams, to record ResponseComplete when they end.
    stream: Option<crate::streams::CloseSlot>,
    /// Answered by the gateway itself for kube-apiserver (TokenReview, SubjectAccessReview).
    webhook: bool,
    device_id: Option<String>,
    /// The posture the request was decided with (`ztgate.dev/posture`).
    posture: Option<String>,
    /// How a stream opened by this request is re-verified, and when first.
    recheck: Option<(Arc<StreamCheck>, Option<SystemTime>)>,
    /// Who holds a stream opened by this request (the authenticated caller, not an
    /// impersonated identity), for locks.
    subject: Option<crate::streams::StreamSubject>,
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
pub async fn handle<U: Forward>(
    gw: Arc<Pipeline<U>>,
    conn: Arc<ConnInfo>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let received = SystemTime::now();
    let route = crate::route::classify(gw.sso.is_some(), &req, |path| {
        crate::webhook::route(
            &gw.webhooks,
            conn.chain.as_deref().map(Vec::as_slice),
            req.method(),
            path,
        )
    });
    match &route {
        Route::Live => return Ok(crate::readiness::plain(StatusCode::OK, "ok")),
        Route::Ready => return Ok(gw.readiness.readyz()),
        Route::Sso => {
            if let Some(sso) = gw.sso.as_ref() {
                // Boxed, as every rarely taken branch below: a future is as large as its largest
                // awaited part, and the whole of it is copied when the request starts.
                let deps = crate::sso::SsoDeps {
                    oidc: &gw.oidc,
                    decider: &gw.decider,
                };
                return Ok(Box::pin(sso.serve(&deps, &req)).await);
            }
        }
        _ => {}
    }
    // One audit ID per request, sent upstream so kube-apiserver's events carry the same ID.
    // A client's own Audit-ID is replaced: it must not be able to pick the ID of another event.
    let audit_id = crate::audit::Auditor::new_audit_id();
    let mut audit_id_value = HeaderValue::from_str(&audit_id).expect("a UUID is a header value");
    // Unique per request: never worth a place in an HPACK dynamic table, where it would evict
    // the headers that do repeat and lengthen every later look-up (h2 skips indexing for
    // values marked sensitive). It is not a secret.
    audit_id_value.set_sensitive(true);
    req.headers_mut().insert(
        crate::proxy::headers::AUDIT_ID.clone(),
        audit_id_value.clone(),
    );
    let user_agent = req
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let method = req.method().clone();
    let uri = req.uri().clone();
    let shape = match &route {
        Route::Api(api) => api.shape,
        _ => RequestShape::Unary,
    };
    let verb = verb_label(&method, shape);
    let mut trace = Trace::default();
    let mut status_text: Option<(String, String)> = None;
    let (mut resp, outcome) = match run(&gw, &conn, req, route, &mut trace).await {
        Ok(resp) if trace.webhook => (resp, "webhook"),
        Ok(resp) => (resp, "forwarded"),
        Err(err) => {
            let st = crate::errors::ToStatus::to_status(&err);
            status_text = Some((st.reason.to_owned(), st.message.clone()));
            let user = trace.user.as_deref().unwrap_or("");
            match &err {
                PipelineError::Authn(e) => {
                    gw.metrics.authn_failure(e.reason_label());
                    // With an audit log (every refusal is an event there, and counted in
                    // authentication_failures), one line a second at warn: a flood of junk
                    // tokens must not turn into a flood of log lines.
                    if !gw.auditor.is_enabled() || authn_warning_due() {
                        tracing::warn!(peer = %conn.peer, method = %method, path = uri.path(), reason = %e, "authentication failed");
                    } else {
                        tracing::debug!(peer = %conn.peer, method = %method, path = uri.path(), reason = %e, "authentication failed");
                    }
                }
                PipelineError::Authz(crate::authz::AuthzError::Denied(d)) => {
                    tracing::info!(peer = %conn.peer, method = %method, path = uri.path(), user, policies = ?d.decision.determining, reason = %err, "denied");
                }
                PipelineError::Upstream(e) => {
                    gw.metrics.upstream_error(err.outcome());
                    if let crate::proxy::UpstreamError::Connect { message: why, .. } = e {
                        gw.readiness.upstream_unreachable(why);
                    }
                    tracing::error!(method = %method, path = uri.path(), user, error = %e, "upstream failed");
                }
                other => {
                    tracing::info!(peer = %conn.peer, method = %method, path = uri.path(), user, reason = %other, "request refused");
                }
            }
            let outcome = err.outcome();
            (err.into_response(), outcome)
        }
    };
    let took = start.elapsed();
    let code = resp.status().as_u16();
    resp.headers_mut()
        .insert(crate::proxy::headers::AUDIT_ID.clone(), audit_id_value);
    gw.metrics.request(verb, code, outcome, took);
    if gw.auditor.is_enabled() {
        audit(
            &gw,
            &mut trace,
            AuditFacts {
                audit_id: &audit_id,
                method: &method,
                uri: &uri,
                user_agent: user_agent.as_deref(),
                source_ip: conn.peer.ip(),
                received,
                code,
                status: status_text.as_ref(),
            },
        )
        .await;
    }
    // The request line says what the audit event says: at debug when there is an audit log.
    macro_rules! request_line {
        ($level:expr) => {
            tracing::event!(
                $level,
                method = %method,
                path = uri.path(),
                user = trace.user.as_deref().unwrap_or(""),
                impersonated = trace.impersonated.as_deref().unwrap_or(""),
                code,
                outcome,
                ms = took.as_secs_f64() * 1000.0,
                "request"
            )
        };
    }
    if gw.auditor.is_enabled() {
        request_line!(tracing::Level::DEBUG);
    } else {
        request_line!(tracing::Level::INFO);
    }
    Ok(resp)
}

/// True at most once per wall-clock second (for rate-limited warnings).
fn authn_warning_due() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(u64::MAX);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let prev = LAST.load(Ordering::Relaxed);
    prev != now
        && LAST
            .compare_exchange(prev, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

struct AuditFacts<'a> {
    audit_id: &'a str,
    method: &'a Method,
    uri: &'a http::Uri,
    user_agent: Option<&'a str>,
    source_ip: std::net::IpAddr,
    received: SystemTime,
    code: u16,
    status: Option<&'a (String, String)>,
}

/// Records the request's audit events: RequestReceived, then ResponseComplete — or, for a stream
/// that started, ResponseStarted now and ResponseComplete when it ends (with why the gateway
/// closed it, if it did). Takes the annotations' strings out of `trace` (nothing reads them
/// after this).
async fn audit<U: Forward>(gw: &Arc<Pipeline<U>>, trace: &mut Trace, f: AuditFacts<'_>) {
    use crate::audit::event::{EventParts, ResponseInfo, Stage, UserInfo};
    let subject = trace.identity.as_deref().map(crate::audit::Subject::from);
    let policy = gw.auditor.decide(subject, trace.info.as_deref());
    if policy.level == crate::audit::Level::None {
        return;
    }
    let source_ips = [f.source_ip];
    let impersonated = trace
        .impersonated_identity
        .as_deref()
        .map(UserInfo::from_identity);
    let mut parts = EventParts::new(f.audit_id, f.method, f.uri, f.received);
    parts.user_agent = f.user_agent;
    parts.source_ips = &source_ips;
    parts.identity = trace.identity.as_deref();
    parts.impersonated = impersonated.as_ref();
    parts.request_info = trace.info.as_deref();
    parts.response = Some(ResponseInfo {
        code: f.code,
        reason: f.status.map(|s| s.0.as_str()),
        message: f.status.map(|s| s.1.as_str()),
    });
    if let Some(id) = trace.device_id.take() {
        parts.annotate(crate::audit::event::ANNOTATION_DEVICE_ID, id);
    }
    if let Some(p) = trace.posture.take() {
        parts.annotate(crate::audit::event::ANNOTATION_POSTURE, p);
    }
    match trace.decision.take() {
        Some((d, reason, policies)) => {
            parts.decision(d);
            parts.annotate(crate::audit::event::ANNOTATION_REASON, reason);
            if !policies.is_empty() {
                parts.annotate(crate::audit::event::ANNOTATION_POLICY, policies);
            }
        }
        None if f.code == 401 || f.code == 403 || f.code == 400 => {
            parts.decision(crate::audit::event::Decision::Deny);
            if let Some((reason, _)) = f.status {
                parts.annotate(crate::audit::event::ANNOTATION_REASON, reason.clone());
            }
        }
        None => {}
    }
    let started = f.code == 101 || (200..300).contains(&f.code);
    match (&trace.stream, started) {
        (Some(slot), true) => {
            gw.auditor
                .record_stages(
                    &policy,
                    &[Stage::RequestReceived, Stage::ResponseStarted],
                    &parts,
                )
                .await;
            if policy.records(Stage::ResponseComplete) {
                let mut complete = parts.build(policy.level, Stage::ResponseComplete);
                let auditor = gw.auditor.clone();
                slot.on_close(Box::new(move |why| {
                    complete.stage_timestamp = crate::audit::event::MicroTime::now();
                    if let Some(why) = why {
                        complete.annotations.insert(
                            crate::audit::event::ANNOTATION_STREAM_CLOSED.to_owned(),
                            why.to_owned(),
                        );
                    }
                    auditor.record_now(complete);
                }));
            }
        }
        _ => {
            gw.auditor
                .record_stages(
                    &policy,
                    &[Stage::RequestReceived, Stage::ResponseComplete],
                    &parts,
                )
                .await;
        }
    }
}

fn is_websocket(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

async fn run<U: Forward>(
    gw: &Arc<Pipeline<U>>,
    conn: &Arc<ConnInfo>,
    req: Request<Incoming>,
    route: Route<crate::webhook::Webhook<'_>>,
    trace: &mut Trace,
) -> Result<Response<Body>, PipelineError> {
    if gw.readiness.is_draining() {
        return Err(PipelineError::ShuttingDown);
    }
    let api = match route {
        // Answered in `handle`.
        Route::Live | Route::Ready | Route::Sso => {
            return Err(PipelineError::BadRequest("not an API request".into()))
        }
        // 1. The target must mean the same thing here and at kube-apiserver.
        Route::Refused(e) => return Err(e),
        // 2. kube-apiserver's webhooks.
        Route::Webhook(which) => {
            trace.webhook = true;
            return Box::pin(crate::webhook::serve(&gw.webhooks, req, which)).await;
        }
        // 2b. Device posture reports: the signed report or the device certificate is the
        // credential, not a user token.
        Route::PostureReport => {
            let device = device_of(gw, conn, SystemTime::now()).map(|d| d.id);
            trace.device_id = device.clone();
            return Box::pin(crate::posture::api::report(&gw.posture, req, device)).await;
        }
        Route::Api(api) => api,
    };

    // 3-4. Credentials and authentication.
    let creds = Credentials {
        bearer: bearer_from_headers(req.headers())?,
        peer_chain: conn.chain.clone(),
    };
    let identity = authenticate(gw, conn, &creds).await?;
    trace.user = Some(identity.user().to_owned());
    trace.identity = Some(identity.clone());

    // 4b. The device: the client certificate read as a device certificate, and a token bound to
    // a certificate (RFC 8705) must come with exactly that certificate, on every request.
    let now = SystemTime::now();
    let leaf = conn
        .chain
        .as_ref()
        .and_then(|c| c.first())
        .map(|c| c.as_ref());
    let device = device_of(gw, conn, now);
    // The device read from the leaf (once per connection) carries the leaf's SHA-256; any
    // other certificate is hashed here.
    let cnf = identity.facts().cnf_x5t_s256.as_deref();
    let binding = match &device {
        Some(d) => crate::device::check_binding(cnf, Some(d)),
        None => crate::device::check_binding_der(cnf, leaf),
    };
    if binding.rejects_request() {
        return Err(AuthnError::TokenBindingMismatch(binding.as_str()).into());
    }
    let device = device.map(|d| DeviceSeen {
        id: d.id,
        bound: binding.is_bound(),
    });
    trace.device_id = device.as_ref().map(|d| d.id.clone());

    // 5. What kube-apiserver will act on, as classified.
    let info = api
        .info
        .map_err(|e| PipelineError::BadRequest(e.to_string().into()))?;
    if !api.method_allowed {
        return Err(PipelineError::MethodNotAllowed(req.method().clone()));
    }
    if gw.auditor.is_enabled() {
        trace.info = Some(info.clone());
    }
    let impersonation = ImpersonationRequest::from_headers(req.headers())?;

    // 6-7. One decision: locks on everyone the request acts as, posture, `kubectl --as`, policy.
    let method = req.method().clone();
    let facts = Facts {
        caller: &identity,
        impersonation: impersonation.as_ref(),
        device: device.as_ref(),
        info: &info,
        method: Some(&method),
        websocket: is_websocket(req.headers()),
        source_ip: conn.peer.ip(),
        now,
    };
    let mut decided = gw.decider.decide(&facts).await;
    trace.posture = decided.posture.take();
    if let Some(as_user) = &decided.impersonated {
        trace.impersonated = Some(as_user.user().to_owned());
        trace.impersonated_identity = Some(as_user.clone());
    }
    let authorized = match decided.outcome {
        Ok(a) => {
            if let Some(d) = a.decision() {
                trace.decision = Some((
                    crate::audit::event::Decision::Allow,
                    crate::authz::cedar::decision_reason(d),
                    d.determining.join(","),
                ));
            }
            a
        }
        Err(e) => {
            if let PipelineError::Authz(crate::authz::AuthzError::Denied(denial)) = &e {
                let decision = &denial.decision;
                let d = if decision.errors.is_empty() {
                    crate::audit::event::Decision::Deny
                } else {
                    crate::audit::event::Decision::Error
                };
                trace.decision = Some((
                    d,
                    crate::authz::cedar::decision_reason(decision),
                    decision.determining.join(","),
                ));
            }
            return Err(e);
        }
    };

    // A stream is decided again, by the same decider, whenever its trust may have changed.
    if !matches!(api.shape, RequestShape::Unary) {
        let max_age_at = gw.max_stream_age.map(|d| now + d);
        let first = [decided.until, max_age_at].into_iter().flatten().min();
        trace.subject = Some(crate::streams::StreamSubject {
            caller: identity.clone(),
            acting: decided.impersonated.clone(),
            device: trace.device_id.clone(),
        });
        let check = StreamCheck {
            decider: Arc::downgrade(&gw.decider),
            caller: identity.clone(),
            impersonation: impersonation.clone(),
            info: info.clone(),
            method: method.clone(),
            websocket: facts.websocket,
            source_ip: facts.source_ip,
            device: device.clone(),
            max_age_at,
        };
        trace.recheck = Some((Arc::new(check), first));
    }

    // 8. Who serves it.
    let policy = gw.decider.authorizer().engine().is_some();
    match api.target {
        Target::SelfAccessReview if policy => {
            let review = SelfReview {
                acting: decided
                    .impersonated
                    .clone()
                    .unwrap_or_else(|| identity.clone()),
                device: device.as_ref(),
                source_ip: facts.source_ip,
            };
            Box::pin(self_subject_access_review(gw, req, authorized, review)).await
        }
        Target::SelfRulesReview if policy => {
            let asker = crate::authz::rules::Asker {
                identity: decided
                    .impersonated
                    .clone()
                    .unwrap_or_else(|| identity.clone()),
                device: decided.device.clone(),
                source_ip: facts.source_ip,
                now,
                api_version: info.api_version.clone(),
            };
            Box::pin(crate::authz::rules::serve(&gw.rules, req, asker)).await
        }
        Target::Locks | Target::PostureRecords if authorized.decision().is_none() => {
            let what = if api.target == Target::Locks {
                "the locks API needs authorization.policies: who may manage locks is decided by policy"
            } else {
                "reading posture records needs authorization.policies: who may read them is decided by policy"
            };
            Err(PipelineError::Authz(crate::authz::AuthzError::Denied(
                Box::new(crate::authz::Denial {
                    message: what.into(),
                    resource: String::new(),
                    name: String::new(),
                    group: String::new(),
                    decision: Default::default(),
                }),
            )))
        }
        Target::Locks => Box::pin(crate::locks::serve(&gw.locks, req, authorized.identity())).await,
        Target::PostureRecords => crate::posture::api::read(&gw.posture, &req),
        _ => forward(gw, req, authorized, api.shape, conn.peer.ip(), Some(trace)).await,
    }
}

async fn forward<U: Forward, B>(
    gw: &Arc<Pipeline<U>>,
    req: Request<B>,
    authorized: Authorized,
    shape: RequestShape,
    client_ip: std::net::IpAddr,
    trace: Option<&mut Trace>,
) -> Result<Response<Body>, PipelineError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<crate::body::BoxError>,
{
    match shape {
        RequestShape::Unary => {
            let permit = gw
                .inflight_limit
                .clone()
                .try_acquire_owned()
                .map_err(|_| PipelineError::TooManyRequests)?;
            let guard = gw.inflight.enter();
            let deadline = tokio::time::Instant::now() + gw.request_timeout;
            let resp = gw
                .upstream
                .forward(req, &authorized, client_ip, Some(gw.request_timeout))
                .await?;
            let (parts, body) = resp.into_parts();
            let body = crate::body::Deadline::new(body, deadline);
            let body = GuardedBody::new(body, Box::new((permit, guard)), None);
            Ok(Response::from_parts(parts, body.boxed_unsync()))
        }
        RequestShape::Streaming(kind) => {
            let handle = register_stream(gw, kind, &authorized, trace);
            let token = handle.token();
            let slot = handle.close_slot();
            let resp = gw
                .upstream
                .forward(req, &authorized, client_ip, None)
                .await?;
            let (parts, body) = resp.into_parts();
            let json = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/json"));
            let mut body = GuardedBody::new(body, Box::new(handle), Some(token));
            if kind == crate::streams::StreamKind::Watch && json {
                body = body.with_watch_errors(slot);
            }
            Ok(Response::from_parts(parts, body.boxed_unsync()))
        }
        RequestShape::Upgrade(kind) => {
            let handle = register_stream(gw, kind, &authorized, trace);
            // Upgrades arrive on HTTP/1.1 connections, whose bodies are `Incoming`.
            let (parts, body) = req.into_parts();
            let body = body.map_err(Into::into).boxed_unsync();
            // Boxed: the upgrade's future is the largest part of this one (see `handle`).
            Box::pin(gw.upstream.forward_upgrade(
                Request::from_parts(parts, body),
                &authorized,
                client_ip,
                handle,
                gw.metrics.clone(),
            ))
            .await
        }
    }
}

/// Registers a long-lived response: who holds it (for locks), when its credential expires (it
/// is closed then), and where its end is reported (audit).
fn register_stream<U: Forward>(
    gw: &Pipeline<U>,
    kind: crate::streams::StreamKind,
    authorized: &Authorized,
    trace: Option<&mut Trace>,
) -> crate::streams::StreamHandle {
    let subject = trace
        .as_ref()
        .and_then(|t| t.subject.clone())
        .unwrap_or_else(|| crate::streams::StreamSubject {
            caller: Arc::new(authorized.identity().clone()),
            acting: None,
            device: None,
        });
    let (check, first) = match trace.as_ref().and_then(|t| t.recheck.clone()) {
        Some((c, first)) => (Some(c as Arc<dyn crate::streams::Recheck>), first),
        None => (None, None),
    };
    let handle = gw.streams.register_checked(kind, subject, check, first);
    if let Some(t) = trace {
        t.stream = Some(handle.close_slot());
    }
    handle
}

/// Everything needed to decide a live stream again: the request's facts as they were, minus
/// the locks, posture and policy, which the decider reads afresh on every check.
pub(crate) struct StreamCheck {
    decider: std::sync::Weak<crate::decide::Decider>,
    /// The authenticated caller (before `kubectl --as`).
    caller: Arc<Identity>,
    impersonation: Option<ImpersonationRequest>,
    info: Arc<RequestInfo>,
    method: Method,
    websocket: bool,
    source_ip: std::net::IpAddr,
    device: Option<DeviceSeen>,
    /// When the stream reaches `timeouts.maxStreamAge`.
    max_age_at: Option<SystemTime>,
}

impl crate::streams::Recheck for StreamCheck {
    fn recheck(
        &self,
        now: SystemTime,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = crate::streams::Verdict> + Send + '_>>
    {
        use crate::streams::{CloseReason, Verdict};
        Box::pin(async move {
            let Some(decider) = self.decider.upgrade() else {
                return Verdict::Keep { until: None };
            };
            if self.max_age_at.is_some_and(|t| now >= t) {
                return Verdict::Close(CloseReason::unauthorized(
                    "the stream reached the gateway's maximum stream age; reconnect",
                ));
            }
            let facts = Facts {
                caller: &self.caller,
                impersonation: self.impersonation.as_ref(),
                device: self.device.as_ref(),
                info: &self.info,
                method: Some(&self.method),
                websocket: self.websocket,
                source_ip: self.source_ip,
                now,
            };
            let decided = decider.decide(&facts).await;
            match decided.outcome {
                Ok(_) => Verdict::Keep {
                    until: [decided.until, self.max_age_at].into_iter().flatten().min(),
                },
                Err(PipelineError::Authz(crate::authz::AuthzError::Denied(d))) => {
                    Verdict::Close(CloseReason::forbidden(format!(
                        "policy no longer allows this stream: {}",
                        d.message
                    )))
                }
                Err(e) => Verdict::Close(CloseReason::of(&e)),
            }
        })
    }
}

/// Who asks a self-review (the identity its own request acts as, already decided) and the
/// facts that request was decided with.
struct SelfReview<'a> {
    acting: Arc<Identity>,
    device: Option<&'a DeviceSeen>,
    source_ip: std::net::IpAddr,
}

/// `kubectl auth can-i` through the gateway: the gateway's decider answers first, for the
/// attributes in the review, with this request's identity, device and posture. A denial is
/// answered here (kube-apiserver would say yes to something the gateway refuses); an allow is
/// passed on so kube-apiserver's RBAC gives the final word.
async fn self_subject_access_review<U: Forward>(
    gw: &Arc<Pipeline<U>>,
    req: Request<Incoming>,
    authorized: Authorized,
    who: SelfReview<'_>,
) -> Result<Response<Body>, PipelineError> {
    let (parts, bytes, is_protobuf) = crate::authz::kubeproto::read_review(req).await?;
    let review: serde_json::Value = if is_protobuf {
        crate::authz::kubeproto::self_subject_access_review(&bytes).ok_or_else(|| {
            PipelineError::BadRequest("not a protobuf SelfSubjectAccessReview".into())
        })?
    } else {
        serde_json::from_slice(&bytes).map_err(|e| {
            PipelineError::BadRequest(format!("not a SelfSubjectAccessReview: {e}").into())
        })?
    };
    let info: RequestInfo =
        crate::decide::info_from_attributes(&review["spec"]).ok_or_else(|| {
            PipelineError::BadRequest(crate::errors::messages::REVIEW_WITHOUT_ATTRIBUTES.into())
        })?;
    let answer = gw
        .decider
        .review(&crate::decide::ReviewFacts {
            caller: &who.acting,
            device: who.device,
            info: &info,
            source_ip: who.source_ip,
            now: SystemTime::now(),
        })
        .await;
    // Impersonation is the gateway's to grant (`kubectl --as` never asks kube-apiserver's RBAC
    // about it): its answer is final either way. Anything else the gateway allows is passed on.
    let final_answer = matches!(
        crate::authz::review_target(&info),
        crate::authz::ReviewTarget::Impersonation(_)
    );
    if final_answer && answer.allowed() {
        let mut out = review;
        out["status"] = json!({"allowed": true, "reason": answer.reason()});
        return Ok(crate::body::json_response(StatusCode::CREATED, &out));
    }
    if !answer.allowed() {
        let mut out = review;
        out["status"] = json!({
            "allowed": false,
            "denied": true,
            "reason": answer.reason(),
        });
        return Ok(crate::body::json_response(StatusCode::CREATED, &out));
    }
    // Passed on as JSON, whatever the client sent: the gateway forwards what it read, so
    // kube-apiserver answers exactly the question the policy answered.
    let mut parts = parts;
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    let body = Bytes::from(serde_json::to_vec(&review).unwrap_or_default());
    let req = Request::from_parts(parts, Full::new(body));
    forward(
        gw,
        req,
        authorized,
        RequestShape::Unary,
        who.source_ip,
        None,
    )
    .await
}

/// The device certificate of this connection, verified against the devices bundle (cached per
/// connection until the bundles change; expiry re-checked on every request).
fn device_of<U: Forward>(
    gw: &Pipeline<U>,
    conn: &ConnInfo,
    now: SystemTime,
) -> Option<crate::device::DeviceIdentity> {
    let cfg = gw.devices.as_ref()?;
    let chain = conn.chain.as_ref()?;
    let generation = gw.bundles.load().generation;
    let mut cached = crate::util::sync::lock(&conn.device);
    let device = match cached.as_ref() {
        Some((g, d)) if *g == generation => d.clone(),
        _ => {
            let d = match crate::device::device_from_chain(cfg, &gw.bundles, chain, now) {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::debug!(peer = %conn.peer, reason = %e, "client certificate is not a device certificate");
                    None
                }
            };
            *cached = Some((generation, d.clone()));
            d
        }
    };
    device.filter(|d| !d.is_expired(now))
}

/// Runs the configured authenticators over the request's credentials.
async fn authenticate<U: Forward>(
    gw: &Pipeline<U>,
    conn: &ConnInfo,
    creds: &Credentials,
) -> Result<Arc<Identity>, AuthnError> {
    if let Some(token) = &creds.bearer {
        // A token names the user; a certificate next to it identifies the device.
        if gw.oidc.has_issuers() {
            return gw.oidc.authenticate_on(token, &conn.token).await;
        }
        if creds.peer_chain.is_none() {
            return Err(AuthnError::TokenAuthNotConfigured);
        }
        // No token authenticator: as kube-apiserver's union authenticator, a verifying client
        // certificate decides. The token is never forwarded either way.
    }
    let chain = creds.peer_chain.as_ref().ok_or(AuthnError::NoCredentials)?;
    let now = SystemTime::now();
    let Some(x509) = gw.x509.as_ref() else {
        return workload(gw, conn, chain, now, AuthnError::NoCredentials);
    };
    let generation = x509.generation();
    let verified = {
        let mut cached = crate::util::sync::lock(&conn.x509);
        match cached.as_ref() {
            Some(v) if v.generation == generation => v.clone(),
            _ => {
                let v = x509.verify(chain, now);
                *cached = Some(v.clone());
                v
            }
        }
    };
    let identity = match verified.result {
        Ok(i) => i,
        Err(e) => return workload(gw, conn, chain, now, e),
    };
    if identity.expires_at().is_some_and(|t| t <= now) {
        return Err(AuthnError::CertificateExpired);
    }
    Ok(identity)
}

/// A workload X509-SVID from a configured SPIFFE trust domain, when the chain is not a user
/// certificate (`otherwise` is the user-certificate verdict, returned when it is no SVID either).
/// Cached per connection while the trust bundles are unchanged.
fn workload<U: Forward>(
    gw: &Pipeline<U>,
    conn: &ConnInfo,
    chain: &[CertificateDer<'static>],
    now: SystemTime,
    otherwise: AuthnError,
) -> Result<Arc<Identity>, AuthnError> {
    if gw.workloads.is_empty() {
        return Err(otherwise);
    }
    let generation = gw.bundles.load().generation;
    let verdict = {
        let mut cached = crate::util::sync::lock(&conn.workload);
        match cached.as_ref() {
            Some((g, v)) if *g == generation => v.clone(),
            _ => {
                let v = crate::device::workload_from_chain(&gw.workloads, &gw.bundles, chain, now)
                    .map_err(NotWorkload::from)
                    .and_then(|w| {
                        crate::authn::x509::workload_identity(&w)
                            .map(Arc::new)
                            .map_err(NotWorkload::from)
                    });
                *cached = Some((generation, v.clone()));
                v
            }
        }
    };
    match verdict {
        Ok(identity) if identity.expires_at().is_some_and(|t| t <= now) => {
            Err(AuthnError::CertificateExpired)
        }
        Ok(identity) => Ok(identity),
        Err(why) => {
            tracing::debug!(peer = %conn.peer, reason = %why, "client certificate is not a workload SVID either");
            Err(otherwise)
        }
    }
}

#[cfg(test)]
mod tests {
    //! The order of the request path, with kube-apiserver replaced by a recorder and the client
    //! connection by an in-memory pipe: nothing here opens a socket.

    use super::*;
    use crate::authz::cedar::PolicyEngine;
    use crate::authz::Authorizer;
    use crate::state::{Lock, LockTarget, MemoryStore, SharedStore};
    use crate::streams::StreamRegistry;
    use crate::telemetry::Metrics;
    use crate::tls::bundles::{Bundle, TrustBundles};
    use http_body_util::Full;
    use hyper_util::rt::TokioIo;
    use tokio_util::sync::CancellationToken;
    use ztgate_testkit::TestPki;

    /// kube-apiserver's stand-in: records the impersonation headers of every request that
    /// reaches it, and answers `200 {}`.
    #[derive(Default)]
    struct Recorder {
        seen: Mutex<Vec<http::HeaderMap>>,
    }

    impl Recorder {
        fn seen(&self) -> Vec<http::HeaderMap> {
            crate::util::sync::lock(&self.seen).clone()
        }
    }

    impl Forward for Recorder {
        type Body = Full<Bytes>;

        async fn forward<B>(
            &self,
            _req: Request<B>,
            authorized: &Authorized,
            _client_ip: std::net::IpAddr,
            _timeout: Option<Duration>,
        ) -> Result<Response<Full<Bytes>>, PipelineError>
        where
            B: http_body::Body<Data = Bytes> + Send + 'static,
            B::Error: Into<crate::body::BoxError>,
        {
            // The headers kube-apiserver would get, made as the upstream makes them.
            let mut headers = http::HeaderMap::new();
            crate::proxy::headers::set_impersonation(&mut headers, authorized.identity())
                .expect("the identity is a header value");
            crate::util::sync::lock(&self.seen).push(headers);
            Ok(Response::new(Full::new(Bytes::from_static(b"{}"))))
        }

        async fn forward_upgrade(
            &self,
            _req: Request<Body>,
            _authorized: &Authorized,
            _client_ip: std::net::IpAddr,
            _stream: crate::streams::StreamHandle,
            _metrics: Arc<Metrics>,
        ) -> Result<Response<Body>, PipelineError> {
            Err(PipelineError::BadRequest("no upgrades here".into()))
        }
    }

    /// Gets pods; deletes nothing.
    const POLICY: &str = "permit(principal, action == k8s::Action::\"get\", resource);\n";

    struct Setup {
        pki: TestPki,
        store: SharedStore,
        upstream: Arc<Recorder>,
        pipeline: Arc<Pipeline<Recorder>>,
        _stop: CancellationToken,
    }

    async fn setup() -> Setup {
        let pki = TestPki::new();
        let ca = CertificateDer::from(pki.users_ca.cert_der());
        let bundle = Bundle::from_der("users", std::slice::from_ref(&ca)).expect("bundle");
        let bundles = Arc::new(TrustBundles::new(vec![bundle]));
        let stop = CancellationToken::new();
        let oidc = crate::authn::oidc::OidcAuthenticator::new(&[], stop.clone())
            .await
            .expect("no issuers");
        let store: SharedStore = Arc::new(MemoryStore::new());
        let engine =
            PolicyEngine::from_sources(&[("test.cedar".into(), POLICY.into())]).expect("policy");
        let decider = Arc::new(crate::decide::Decider::new(
            store.clone(),
            None,
            Authorizer::with_policy(Arc::new(engine)),
        ));
        let metrics = Arc::new(Metrics::new());
        let streams = StreamRegistry::new(metrics.clone());
        // The rules review reads discovery from a kube-apiserver of its own; never reached here.
        let verifier = crate::tls::upstream::ReloadingServerVerifier::new(vec![ca]).expect("ca");
        let (pooled_tls, upgrade_tls) = crate::tls::upstream::client_configs(
            verifier,
            crate::tls::upstream::ReloadingClientCert::new(None),
        )
        .expect("tls");
        let discovery_upstream =
            crate::proxy::Upstream::new(crate::proxy::forward::UpstreamSettings {
                url: "https://127.0.0.1:9".parse().expect("url"),
                server_name: None,
                pooled_tls,
                upgrade_tls,
                token: None,
                connect_timeout: Duration::from_secs(1),
                request_timeout: Duration::from_secs(5),
                max_body: 1 << 20,
            })
            .expect("upstream");
        let upstream = Arc::new(Recorder::default());
        let pipeline = Arc::new(Pipeline {
            upstream: upstream.clone(),
            auditor: crate::audit::Auditor::disabled(),
            x509: Some(crate::authn::x509::X509Authenticator::new(
                "users".into(),
                bundles.clone(),
            )),
            oidc: oidc.clone(),
            bundles: bundles.clone(),
            devices: None,
            workloads: Vec::new(),
            decider: decider.clone(),
            metrics,
            streams: streams.clone(),
            inflight: Arc::new(crate::streams::Inflight::default()),
            inflight_limit: Arc::new(tokio::sync::Semaphore::new(8)),
            request_timeout: Duration::from_secs(5),
            max_stream_age: None,
            readiness: Arc::new(crate::readiness::Readiness::new(
                oidc.clone(),
                store.clone(),
            )),
            sso: None,
            webhooks: crate::webhook::Webhooks {
                token_review: None,
                sar: None,
                bundles,
                oidc,
                decider: decider.clone(),
            },
            locks: crate::locks::LocksApi {
                store: store.clone(),
                streams,
            },
            posture: crate::posture::api::PostureApi {
                store: store.clone(),
                posture: None,
            },
            rules: Arc::new(crate::authz::rules::RulesReview {
                decider,
                discovery: crate::discovery::DiscoveryCache::new(crate::discovery::TTL),
                upstream: Arc::new(discovery_upstream),
                request_timeout: Duration::from_secs(5),
            }),
        });
        Setup {
            pki,
            store,
            upstream,
            pipeline,
            _stop: stop,
        }
    }

    /// Sends one request through [`handle`] over an in-memory HTTP/1.1 connection whose client
    /// presented `chain`; the status and body of the answer.
    async fn send(
        pipeline: &Arc<Pipeline<Recorder>>,
        chain: Option<Vec<CertificateDer<'static>>>,
        method: Method,
        path: &str,
    ) -> (StatusCode, String) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let conn = Arc::new(ConnInfo::new(
            "192.0.2.7:50000".parse().expect("address"),
            chain,
        ));
        let pipeline = pipeline.clone();
        let server = tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req| handle(pipeline.clone(), conn.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server_io), svc)
                .await;
        });
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(client_io))
                .await
                .expect("handshake");
        tokio::spawn(connection);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "gateway.test")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = sender.send_request(req).await.expect("answer");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        drop(sender);
        server.abort();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    fn chain(ck: &ztgate_testkit::CertKey) -> Option<Vec<CertificateDer<'static>>> {
        Some(vec![CertificateDer::from(ck.cert_der.clone())])
    }

    const POD: &str = "/api/v1/namespaces/default/pods/web";

    #[tokio::test]
    async fn without_credentials_nothing_reaches_the_upstream() {
        let s = setup().await;
        let (code, body) = send(&s.pipeline, None, Method::GET, POD).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{body}");
        assert!(s.upstream.seen().is_empty());
    }

    #[tokio::test]
    async fn a_locked_user_is_refused_before_policy() {
        let s = setup().await;
        let lock = Lock::new(
            LockTarget::User("mallory".into()),
            "incident review",
            None,
            "security",
        )
        .expect("lock");
        s.store.put_lock(lock).await.expect("stored");
        // Policy would allow this request: the lock answers first.
        let (code, body) = send(
            &s.pipeline,
            chain(&s.pki.user("mallory", &["devs"])),
            Method::GET,
            POD,
        )
        .await;
        assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
        assert!(body.contains("incident review"), "{body}");
        assert!(s.upstream.seen().is_empty());
    }

    #[tokio::test]
    async fn a_policy_denial_never_reaches_the_upstream() {
        let s = setup().await;
        let (code, body) = send(
            &s.pipeline,
            chain(&s.pki.user("alice", &["devs"])),
            Method::DELETE,
            POD,
        )
        .await;
        assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
        assert!(s.upstream.seen().is_empty());
    }

    #[tokio::test]
    async fn an_allowed_request_reaches_the_upstream_as_its_user() {
        let s = setup().await;
        let (code, body) = send(
            &s.pipeline,
            chain(&s.pki.user("alice", &["devs"])),
            Method::GET,
            POD,
        )
        .await;
        assert_eq!(code, StatusCode::OK, "{body}");
        let seen = s.upstream.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0]["impersonate-user"], "alice");
        assert_eq!(seen[0]["impersonate-group"], "devs");
    }
}
