//! A kube-apiserver stand-in: the public API ([`ApiServer`], [`ApiServerOptions`],
//! [`RecordedRequest`], [`UserInfo`]), the TLS listener and connection tasks (HTTP/1.1 and HTTP/2
//! with upgrades), request recording and the request pipeline (authenticate → impersonate →
//! authorize → route).
//!
//! It follows kube-apiserver's documented behaviour where the gateway depends on it. The parts:
//! - [`auth`]: client certificates, bearer tokens, impersonation, SelfSubjectReview;
//! - [`rbac`]: request info parsing, the RBAC table, Forbidden messages;
//! - [`objects`]: the store, Tables and watch streams;
//! - [`discovery`]: discovery documents;
//! - [`stream`]: logs, exec/attach/port-forward upgrades (WebSocket and SPDY);
//! - [`respond`]: Status bodies and response helpers.

mod auth;
mod discovery;
mod objects;
mod rbac;
mod respond;
mod stream;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::pki::{CertKey, TestPki, GATEWAY_USER};
use objects::{Kind, Store};
use rbac::{Attributes, RequestInfo};
use respond::{Body, Streaming, Want};

pub use rbac::RbacRule;
pub use stream::WsByteStream;

/// A Kubernetes user as the apiserver sees it (`user.Info`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserInfo {
    pub username: String,
    pub uid: Option<String>,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// How to run the stand-in.
#[derive(Clone)]
pub struct ApiServerOptions {
    /// Serving certificate and key (PEM).
    pub serving: CertKey,
    /// CA bundle (PEM) that signs callers' client certificates.
    pub client_ca_pem: String,
    /// Usernames allowed to impersonate.
    pub impersonators: Vec<String>,
    /// Static bearer tokens, accepted as an alternative to a client certificate.
    pub tokens: HashMap<String, UserInfo>,
    pub rbac: Vec<RbacRule>,
    /// `None`: 127.0.0.1 on a free port.
    pub addr: Option<SocketAddr>,
    /// Keep every request for [`ApiServer::requests`] (default). The load benchmark turns it
    /// off ("fast mode"): the record grows without bound and costs a lock per request.
    pub record_requests: bool,
    /// HTTP/2 streams per connection (`None`: hyper's default, 200; kube-apiserver's
    /// `--http2-max-streams-per-connection` defaults to 1000).
    pub http2_max_streams: Option<u32>,
}

impl ApiServerOptions {
    /// Serving cert = `pki.apiserver_serving`, client CA = `pki.cluster_ca`, impersonators
    /// `[GATEWAY_USER]`, and the demo RBAC table: groups `team-a`/`team-b` may do anything with
    /// pods (and pods/log, exec, attach, portforward) in their namespace; `system:authenticated`
    /// may get/list/watch namespaces.
    pub fn new(pki: &TestPki) -> Self {
        ApiServerOptions {
            serving: pki.apiserver_serving.clone(),
            client_ca_pem: pki.cluster_ca.cert_pem(),
            impersonators: vec![GATEWAY_USER.to_string()],
            tokens: HashMap::new(),
            rbac: rbac::demo_rules(),
            addr: None,
            record_requests: true,
            http2_max_streams: None,
        }
    }
}

/// One request as the stand-in received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Lower-cased names, every value, in received order.
    pub headers: Vec<(String, String)>,
    /// From the client certificate CN or the bearer token, before impersonation.
    pub authenticated_user: Option<String>,
    /// After impersonation (`None` if the request was rejected before).
    pub effective_user: Option<UserInfo>,
    /// The response status (0 until answered).
    pub status: u16,
}

impl RecordedRequest {
    /// Every value of a header (name case-insensitive).
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Every task the server spawns (connections, HTTP/2 streams, upgraded sessions), so that
/// shutdown can abort them all.
pub(crate) struct Tasks {
    handles: Mutex<Vec<JoinHandle<()>>>,
    closed: AtomicBool,
}

impl Tasks {
    fn new() -> Self {
        Tasks {
            handles: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.handles.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = tokio::spawn(fut);
        let mut handles = self.lock();
        if self.closed.load(Ordering::SeqCst) {
            handle.abort();
            return;
        }
        handles.retain(|h| !h.is_finished());
        handles.push(handle);
    }

    fn abort_all(&self) -> Vec<JoinHandle<()>> {
        self.closed.store(true, Ordering::SeqCst);
        let handles = std::mem::take(&mut *self.lock());
        for h in &handles {
            h.abort();
        }
        handles
    }
}

/// Counts an open TCP connection until the last holder (connection task, upgraded session) is
/// gone.
pub(crate) struct ConnGuard(Arc<AtomicUsize>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What is known about a connection after the TLS handshake.
struct ConnInfo {
    cert_user: Option<UserInfo>,
    guard: Arc<ConnGuard>,
}

struct Shared {
    addr: SocketAddr,
    impersonators: Vec<String>,
    tokens: HashMap<String, UserInfo>,
    rules: Vec<RbacRule>,
    chain_verifier: Arc<dyn ClientCertVerifier>,
    store: Store,
    requests: Mutex<Vec<(u64, RecordedRequest)>>,
    next_request: AtomicU64,
    delay: Mutex<Duration>,
    // --- per-path stall (tests/it/faults.rs) ---
    /// Extra delays for non-streaming responses, by path prefix.
    path_delays: Mutex<Vec<(String, Duration)>>,
    // --- end per-path stall ---
    record_requests: bool,
    http2_max_streams: Option<u32>,
    connections: Arc<AtomicUsize>,
    tasks: Tasks,
}

impl Shared {
    fn requests(&self) -> MutexGuard<'_, Vec<(u64, RecordedRequest)>> {
        self.requests.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn delay(&self) -> Duration {
        *self.delay.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path_delay(&self, path: &str) -> Duration {
        self.path_delays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(p, _)| path.starts_with(p.as_str()))
            .map(|(_, d)| *d)
            .sum()
    }
}

/// Hyper's executor for HTTP/2 stream tasks: tracked like every other task.
#[derive(Clone)]
struct TrackedExecutor(Arc<Shared>);

impl<F> hyper::rt::Executor<F> for TrackedExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.tasks.spawn(async move {
            let _ = fut.await;
        });
    }
}

/// A running stand-in.
pub struct ApiServer {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

fn other(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl ApiServer {
    /// Binds, seeds the demo data and starts serving.
    pub async fn start(opts: ApiServerOptions) -> std::io::Result<ApiServer> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let chain_verifier = auth::chain_verifier(&opts.client_ca_pem, provider.clone())?;
        let certs = CertificateDer::pem_slice_iter(opts.serving.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(other)?;
        let key = PrivateKeyDer::from_pem_slice(opts.serving.key_pem.as_bytes()).map_err(other)?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(other)?
            .with_client_cert_verifier(Arc::new(auth::RequestClientCert::new(
                chain_verifier.clone(),
            )))
            .with_single_cert(certs, key)
            .map_err(other)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));

        let listener = TcpListener::bind(
            opts.addr
                .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
        )
        .await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            addr,
            impersonators: opts.impersonators,
            tokens: opts.tokens,
            rules: opts.rbac,
            chain_verifier,
            store: Store::seeded(),
            requests: Mutex::new(Vec::new()),
            next_request: AtomicU64::new(0),
            delay: Mutex::new(Duration::ZERO),
            path_delays: Mutex::new(Vec::new()),
            record_requests: opts.record_requests,
            http2_max_streams: opts.http2_max_streams,
            connections: Arc::new(AtomicUsize::new(0)),
            tasks: Tasks::new(),
        });
        let accept = tokio::spawn(accept_loop(shared.clone(), listener, acceptor));
        Ok(ApiServer {
            shared,
            accept: Some(accept),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.shared.addr)
    }

    /// Everything received so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared
            .requests()
            .iter()
            .map(|(_, r)| r.clone())
            .collect()
    }

    pub fn clear_requests(&self) {
        self.shared.requests().clear();
    }

    /// Creates a pod (default container) and tells watchers; a no-op when it exists.
    pub fn create_pod(&self, namespace: &str, name: &str) {
        let _ = self.shared.store.create_pod(namespace, name, None);
    }

    /// Deletes a pod and tells watchers; a no-op when it does not exist.
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        let _ = self.shared.store.delete_pod(namespace, name);
    }

    /// Delays every non-streaming response by `d`.
    pub fn set_response_delay(&self, d: Duration) {
        *self.shared.delay.lock().unwrap_or_else(|e| e.into_inner()) = d;
    }

    // --- per-path stall (tests/it/faults.rs) ---
    /// Delays non-streaming responses to paths starting with `prefix` by `d` as well (zero:
    /// removes it), so one request can stall while the others are answered at once.
    pub fn set_path_delay(&self, prefix: &str, d: Duration) {
        let mut delays = self
            .shared
            .path_delays
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        delays.retain(|(p, _)| p != prefix);
        if !d.is_zero() {
            delays.push((prefix.to_owned(), d));
        }
    }
    // --- end per-path stall ---

    /// Open TCP connections right now (upgraded ones included).
    pub fn active_connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Stops listening and drops every open connection; the port is free afterwards.
    pub async fn shutdown(mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
            let _ = accept.await;
        }
        for h in self.shared.tasks.abort_all() {
            let _ = h.await;
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
        self.shared.tasks.abort_all();
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, acceptor: TlsAcceptor) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::debug!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let guard = Arc::new(ConnGuard(shared.connections.clone()));
        let s = shared.clone();
        let acceptor = acceptor.clone();
        shared
            .tasks
            .spawn(serve_connection(s, acceptor, tcp, guard));
    }
}

async fn serve_connection(
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    guard: Arc<ConnGuard>,
) {
    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!("tls handshake: {e}");
            return;
        }
        Err(_) => return,
    };
    let cert_user = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| auth::verify_client_chain(shared.chain_verifier.as_ref(), chain));
    let conn = Arc::new(ConnInfo { cert_user, guard });
    let svc_shared = shared.clone();
    let svc = hyper::service::service_fn(move |req| {
        let shared = svc_shared.clone();
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(shared, conn, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TrackedExecutor(shared.clone()));
    if let Some(n) = shared.http2_max_streams {
        builder.http2().max_concurrent_streams(n);
    }
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(tls), svc)
        .await
    {
        tracing::debug!("connection: {e}");
    }
}

/// Who the request turned out to be, for the record.
#[derive(Default)]
struct Ctx {
    authenticated_user: Option<String>,
    effective_user: Option<UserInfo>,
}

async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let id = shared.next_request.fetch_add(1, Ordering::SeqCst);
    if !shared.record_requests {
        let mut ctx = Ctx::default();
        return process(&shared, &conn, &mut req, &mut ctx).await;
    }
    let record = RecordedRequest {
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        query: req.uri().query().map(str::to_string),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        authenticated_user: None,
        effective_user: None,
        status: 0,
    };
    shared.requests().push((id, record));

    let mut ctx = Ctx::default();
    let path = req.uri().path().to_owned();
    let resp = process(&shared, &conn, &mut req, &mut ctx).await;
    if resp.extensions().get::<Streaming>().is_none() {
        let delay = shared.delay() + shared.path_delay(&path);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }
    if let Some((_, r)) = shared.requests().iter_mut().rev().find(|(i, _)| *i == id) {
        r.status = resp.status().as_u16();
        r.authenticated_user = ctx.authenticated_user;
        r.effective_user = ctx.effective_user;
    }
    resp
}

async fn process(
    shared: &Arc<Shared>,
    conn: &Arc<ConnInfo>,
    req: &mut Request<Incoming>,
    ctx: &mut Ctx,
) -> Response<Body> {
    let method = req.method().clone();
    // Go's net/http routes on the percent-decoded path (`URL.Path`), and so does everything
    // kube-apiserver derives from it (RequestInfo, the handler chosen).
    let path = percent_encoding::percent_decode_str(req.uri().path())
        .decode_utf8_lossy()
        .into_owned();
    let query = respond::query_pairs(req.uri().query());

    let Some(caller) = auth::authenticate(conn.cert_user.as_ref(), req.headers(), &shared.tokens)
    else {
        if method == Method::GET && rbac::is_public_info_path(&path) {
            return non_resource(shared, &path);
        }
        return respond::unauthorized();
    };
    ctx.authenticated_user = Some(caller.username.clone());

    let user = match auth::impersonate(&caller, req.headers(), &shared.impersonators) {
        Ok(Some(u)) => u,
        Ok(None) => caller,
        Err(auth::ImpersonationError::Internal(msg)) => {
            let uri = req.uri().to_string();
            return respond::internal_error(&format!("Internal Server Error: {uri:?}: {msg}"));
        }
        Err(auth::ImpersonationError::Forbidden(v)) => {
            return respond::json(StatusCode::FORBIDDEN, &v);
        }
    };
    ctx.effective_user = Some(user.clone());

    let info = RequestInfo::parse(method.as_str(), &path, &query);
    let connect = info.is_resource_request
        && info.api_group.is_empty()
        && info.resource == "pods"
        && matches!(info.subresource.as_str(), "exec" | "attach" | "portforward");
    let allowed = if connect && info.verb == "get" {
        // kube-apiserver also requires `create` for a WebSocket GET on exec/attach/portforward;
        // the stand-in accepts either.
        let mut as_create = info.clone();
        as_create.verb = "create".into();
        if rbac::authorize(&shared.rules, &user, &as_create)
            || rbac::authorize(&shared.rules, &user, &info)
        {
            None
        } else {
            Some(as_create)
        }
    } else if rbac::authorize(&shared.rules, &user, &info) {
        None
    } else {
        Some(info.clone())
    };
    if let Some(denied) = allowed {
        return rbac::forbidden(&Attributes::of(&denied, &user.username));
    }

    if !info.is_resource_request {
        return non_resource(shared, &path);
    }
    match (info.api_group.as_str(), info.api_version.as_str()) {
        ("", "v1") => core_v1(shared, conn, req, &info, &query).await,
        ("authentication.k8s.io", "v1" | "v1beta1")
            if info.resource == "selfsubjectreviews"
                && info.name.is_empty()
                && info.subresource.is_empty()
                && info.namespace.is_empty() =>
        {
            if info.verb != "create" {
                return respond::method_not_allowed();
            }
            let _ = read_body(req).await;
            respond::json(
                StatusCode::CREATED,
                &auth::self_subject_review(&user, &info.api_version),
            )
        }
        ("authorization.k8s.io", "v1")
            if info.resource == "selfsubjectaccessreviews"
                && info.name.is_empty()
                && info.subresource.is_empty() =>
        {
            if info.verb != "create" {
                return respond::method_not_allowed();
            }
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            let review: serde_json::Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => {
                    return respond::bad_request(&format!("decoding SelfSubjectAccessReview: {e}"))
                }
            };
            let allowed = self_subject_access(&shared.rules, &user, &review["spec"]);
            let mut out = review.clone();
            out["status"] = serde_json::json!({ "allowed": allowed });
            if !allowed {
                out["status"]["reason"] = serde_json::Value::from("no RBAC rule allows it");
            }
            respond::json(StatusCode::CREATED, &out)
        }
        _ => respond::not_found_path(),
    }
}

/// Answers a SelfSubjectAccessReview spec against the RBAC table, as kube-apiserver's
/// authorizer would for the requesting user.
fn self_subject_access(rules: &[RbacRule], user: &UserInfo, spec: &serde_json::Value) -> bool {
    let s = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or_default().to_string();
    if let Some(ra) = spec.get("resourceAttributes") {
        let info = RequestInfo {
            is_resource_request: true,
            verb: s(ra, "verb"),
            api_group: s(ra, "group"),
            api_version: s(ra, "version"),
            namespace: s(ra, "namespace"),
            resource: s(ra, "resource"),
            subresource: s(ra, "subresource"),
            name: s(ra, "name"),
            ..Default::default()
        };
        return rbac::authorize(rules, user, &info);
    }
    if let Some(nra) = spec.get("nonResourceAttributes") {
        let info = RequestInfo {
            is_resource_request: false,
            verb: s(nra, "verb"),
            path: s(nra, "path"),
            ..Default::default()
        };
        return rbac::authorize(rules, user, &info);
    }
    false
}

fn non_resource(shared: &Shared, path: &str) -> Response<Body> {
    match path {
        "/healthz" | "/livez" | "/readyz" => respond::text(StatusCode::OK, "ok"),
        p if p.starts_with("/healthz/")
            || p.starts_with("/livez/")
            || p.starts_with("/readyz/") =>
        {
            respond::text(StatusCode::OK, "ok")
        }
        "/version" | "/version/" => respond::json(StatusCode::OK, &discovery::version()),
        "/api" | "/api/" => respond::json(StatusCode::OK, &discovery::api_versions(shared.addr)),
        "/api/v1" | "/api/v1/" => respond::json(StatusCode::OK, &discovery::core_v1_resources()),
        "/apis" | "/apis/" => respond::json(StatusCode::OK, &discovery::api_group_list()),
        "/apis/authentication.k8s.io" | "/apis/authentication.k8s.io/" => respond::json(
            StatusCode::OK,
            &discovery::api_group(discovery::AUTHENTICATION),
        ),
        "/apis/authentication.k8s.io/v1" | "/apis/authentication.k8s.io/v1beta1" => {
            let version = path.rsplit('/').next().unwrap_or("v1");
            respond::json(StatusCode::OK, &discovery::authn_resources(version))
        }
        "/apis/authorization.k8s.io" | "/apis/authorization.k8s.io/" => respond::json(
            StatusCode::OK,
            &discovery::api_group(discovery::AUTHORIZATION),
        ),
        "/apis/authorization.k8s.io/v1" => {
            respond::json(StatusCode::OK, &discovery::authz_resources())
        }
        _ => respond::not_found_path(),
    }
}

/// Reads a request body (at most 3 MiB).
async fn read_body(req: &mut Request<Incoming>) -> Result<Bytes, Response<Body>> {
    const LIMIT: usize = 3 << 20;
    let mut buf = Vec::new();
    while let Some(frame) = req.body_mut().frame().await {
        let frame = frame.map_err(|e| respond::bad_request(&format!("reading body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
            if buf.len() > LIMIT {
                return Err(respond::status(
                    413,
                    "RequestEntityTooLarge",
                    "the request body is too large",
                    None,
                ));
            }
        }
    }
    Ok(Bytes::from(buf))
}

fn table_or_object(
    want: Want,
    table: impl FnOnce(respond::IncludeObject) -> Value,
    object: Value,
) -> Response<Body> {
    match want {
        Want::Table(include) => {
            respond::json_as(StatusCode::OK, &table(include), respond::TABLE_JSON)
        }
        Want::Object => respond::json(StatusCode::OK, &object),
    }
}

async fn core_v1(
    shared: &Arc<Shared>,
    conn: &Arc<ConnInfo>,
    req: &mut Request<Incoming>,
    info: &RequestInfo,
    query: &[(String, String)],
) -> Response<Body> {
    let kind = match info.resource.as_str() {
        "pods" => Kind::Pods,
        "namespaces" => Kind::Namespaces,
        "configmaps" => Kind::ConfigMaps,
        _ => return respond::not_found_path(),
    };
    let store = &shared.store;
    let resource = kind.resource();
    // A namespace object's own path carries its name as the namespace; it is cluster-scoped.
    let ns = if kind == Kind::Namespaces {
        ""
    } else {
        info.namespace.as_str()
    };

    if !info.subresource.is_empty() {
        if kind != Kind::Pods {
            return respond::not_found_path();
        }
        let sub = match info.subresource.as_str() {
            "log" => None,
            "exec" => Some(stream::Sub::Exec),
            "attach" => Some(stream::Sub::Attach),
            "portforward" => Some(stream::Sub::PortForward),
            _ => return respond::not_found_path(),
        };
        if store.get(kind, ns, &info.name).is_none() {
            return respond::not_found(resource, &info.name);
        }
        return match sub {
            None => {
                if info.verb != "get" {
                    return respond::method_not_allowed();
                }
                let follow = respond::query_bool(query, "follow");
                let mut resp = Response::new(stream::logs_body(follow));
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain"),
                );
                if follow {
                    resp.extensions_mut().insert(Streaming);
                }
                resp
            }
            Some(sub) => stream::upgrade(req, sub, query, &shared.tasks, conn.guard.clone()),
        };
    }

    let want = respond::negotiate(req.headers(), query);
    match info.verb.as_str() {
        "get" => match store.get(kind, ns, &info.name) {
            Some(obj) => {
                let (rv, _) = store.list(kind, "", Some(""));
                let v = obj.value.clone();
                table_or_object(
                    want,
                    |inc| objects::table(kind, rv, std::slice::from_ref(&obj), inc),
                    v,
                )
            }
            None => respond::not_found(resource, &info.name),
        },
        "list" => {
            let name = (!info.name.is_empty()).then_some(info.name.as_str());
            let (rv, objs) = store.list(kind, ns, name);
            table_or_object(
                want,
                |inc| objects::table(kind, rv, &objs, inc),
                objects::list_value(kind, rv, &objs),
            )
        }
        "watch" => {
            let spec = objects::WatchSpec {
                kind,
                namespace: ns.to_string(),
                name: (!info.name.is_empty()).then(|| info.name.clone()),
                resource_version: respond::query_get(query, "resourceVersion").map(str::to_string),
                timeout: respond::query_get(query, "timeoutSeconds")
                    .and_then(|s| s.parse::<u64>().ok())
                    .filter(|s| *s > 0)
                    .map(Duration::from_secs),
                want,
            };
            let mut resp = Response::new(objects::watch_body(store, spec));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(respond::JSON),
            );
            resp.headers_mut().insert(
                http::header::CACHE_CONTROL,
                http::HeaderValue::from_static("no-cache, private"),
            );
            resp.extensions_mut().insert(Streaming);
            resp
        }
        "create" if kind == Kind::Pods && info.name.is_empty() => create_pod(shared, req, ns).await,
        "delete" if kind == Kind::Pods => match store.delete_pod(ns, &info.name) {
            Some(obj) => respond::json(StatusCode::OK, &obj),
            None => respond::not_found(resource, &info.name),
        },
        _ => respond::method_not_allowed(),
    }
}

async fn create_pod(shared: &Shared, req: &mut Request<Incoming>, ns: &str) -> Response<Body> {
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let pod: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return respond::bad_request(&format!(
                "the body of the request was in an unknown format: {e}"
            ))
        }
    };
    if pod["kind"] != "Pod" && !pod["kind"].is_null() {
        return respond::bad_request("the body of the request is not a Pod");
    }
    if let Some(body_ns) = pod["metadata"]["namespace"].as_str() {
        if !body_ns.is_empty() && body_ns != ns {
            return respond::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            );
        }
    }
    let name = match pod["metadata"]["name"].as_str().filter(|s| !s.is_empty()) {
        Some(n) => n.to_string(),
        None => match pod["metadata"]["generateName"].as_str().filter(|s| !s.is_empty()) {
            Some(prefix) => {
                let n = shared.next_request.load(Ordering::SeqCst);
                format!("{prefix}{:05x}", n.wrapping_mul(2_654_435_761) & 0xfffff)
            }
            None => {
                return respond::status(
                    422,
                    "Invalid",
                    "Pod \"\" is invalid: metadata.name: Required value: name or generateName is required",
                    Some(respond::details("", "Pod", "")),
                )
            }
        },
    };
    if !shared.store.namespace_exists(ns) {
        return respond::not_found("namespaces", ns);
    }
    match shared.store.create_pod(ns, &name, Some(&pod)) {
        Ok(v) => respond::json(StatusCode::CREATED, &v),
        Err(()) => respond::already_exists("pods", &name),
    }
}

#[cfg(test)]
mod kubectl_e2e;
#[cfg(test)]
mod tests;
