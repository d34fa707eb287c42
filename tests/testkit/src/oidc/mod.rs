//! A development OpenID Connect issuer: discovery, JWKS and token minting over HTTPS.
//!
//! [`DevIssuer`] serves, under its issuer URL:
//!
//! - `/.well-known/openid-configuration`: the discovery document,
//! - `/keys`: the JWKS (one RS256, one ES256 and one EdDSA key, each with its own kid, plus
//!   whatever the fault helpers added),
//! - `/dev/exec-credential?sub=..&aud=..[&groups=a,b][&ttl=secs]`: a client-go `ExecCredential`
//!   carrying a fresh RS256 token, so that a kubeconfig's exec plugin can be
//!   `curl -s --cacert <ca> <url>`. Anyone who can reach the port can call it, so it mints only
//!   what [`Minting`] allows: by default nothing, for `ztgate demo` only the demo's users.
//!
//! Everything else answers 404. Tokens are minted in-process with [`DevIssuer::sign`] and
//! friends; the fault knobs ([`DevIssuer::set_jwks_override`], [`DevIssuer::set_delay`],
//! [`DevIssuer::stop`]/[`DevIssuer::restart`], [`DevIssuer::rotate`]) let tests break the IdP in
//! the ways a real one breaks.
//!
//! This is a fixture: keys are generated at start-up and never leave the process (except the
//! public halves it serves).

mod keys;
#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Map, Value};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use crate::pki::Ca;
use keys::SigningKey;

/// The JWS algorithms the development issuer signs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SigningAlg {
    RS256,
    ES256,
    EdDSA,
}

impl SigningAlg {
    /// Every algorithm, in JWKS order.
    pub const ALL: [SigningAlg; 3] = [SigningAlg::RS256, SigningAlg::ES256, SigningAlg::EdDSA];

    /// The JOSE `alg` name.
    pub fn as_str(self) -> &'static str {
        match self {
            SigningAlg::RS256 => "RS256",
            SigningAlg::ES256 => "ES256",
            SigningAlg::EdDSA => "EdDSA",
        }
    }

    fn kid_prefix(self) -> &'static str {
        match self {
            SigningAlg::RS256 => "rs256",
            SigningAlg::ES256 => "es256",
            SigningAlg::EdDSA => "eddsa",
        }
    }

    fn index(self) -> usize {
        match self {
            SigningAlg::RS256 => 0,
            SigningAlg::ES256 => 1,
            SigningAlg::EdDSA => 2,
        }
    }
}

/// Who `/dev/exec-credential` mints tokens for. The endpoint has no authentication of its own,
/// so whatever it allows, every local user (and every process) may have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Minting {
    /// Nobody: tokens come only from the in-process methods ([`DevIssuer::token`] and friends).
    Nobody,
    /// These users, each with some or all of its own groups and no others.
    Only(Vec<DevUser>),
    /// Any subject with any groups. Only for tests and load generators that need many
    /// identities and run where nobody else can reach the port; never for `ztgate demo`.
    Anyone,
}

/// A user the exec-credential endpoint may mint tokens for, with the groups it may claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevUser {
    pub sub: String,
    pub groups: Vec<String>,
}

impl DevUser {
    pub fn new(sub: &str, groups: &[&str]) -> DevUser {
        DevUser {
            sub: sub.to_owned(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        }
    }
}

impl Minting {
    /// Refuses (with the text the caller sees) a subject or group this issuer must not mint.
    fn check(&self, sub: &str, groups: &[String]) -> Result<(), String> {
        let users =
            match self {
                Minting::Anyone => return Ok(()),
                Minting::Nobody => return Err(
                    "this development issuer mints no tokens over HTTP (it was started without \
                     any users to mint for)"
                        .into(),
                ),
                Minting::Only(users) => users,
            };
        let Some(user) = users.iter().find(|u| u.sub == sub) else {
            let known: Vec<String> = users
                .iter()
                .map(|u| format!("{} (groups: {})", u.sub, u.groups.join(", ")))
                .collect();
            return Err(format!(
                "this development issuer mints tokens only for its configured users, {}; \
                 not for {sub:?}",
                known.join("; ")
            ));
        };
        match groups.iter().find(|g| !user.groups.contains(g)) {
            Some(g) => Err(format!(
                "this development issuer mints {sub:?} only with the groups {}; not with {g:?}",
                user.groups.join(", ")
            )),
            None => Ok(()),
        }
    }
}

/// The key set: one current key per algorithm plus what the JWKS lists besides them.
struct KeyState {
    /// Indexed by [`SigningAlg::index`].
    current: [Arc<SigningKey>; 3],
    /// `use: enc` keys added by [`DevIssuer::sign_with_enc_key`].
    enc: Vec<Arc<SigningKey>>,
    /// JWKs of keys rotated out but still published (`rotate(true)`).
    retired: Vec<Value>,
}

impl KeyState {
    fn generate() -> KeyState {
        KeyState {
            current: SigningAlg::ALL
                .map(|alg| Arc::new(SigningKey::generate(alg, alg.kid_prefix()))),
            enc: Vec::new(),
            retired: Vec::new(),
        }
    }

    fn jwks(&self) -> Value {
        let mut keys: Vec<Value> = self.current.iter().map(|k| k.jwk("sig")).collect();
        keys.extend(self.enc.iter().map(|k| k.jwk("enc")));
        keys.extend(self.retired.iter().cloned());
        json!({ "keys": keys })
    }
}

/// State shared between the handle and the serving tasks.
struct Shared {
    issuer_url: String,
    /// The issuer path ("" or "/realms/dev"), prefix of every served route.
    path: String,
    keys: RwLock<KeyState>,
    minting: Minting,
    jwks_override: Mutex<Option<String>>,
    delay_micros: AtomicU64,
    discovery_fetches: AtomicUsize,
    jwks_fetches: AtomicUsize,
}

impl Shared {
    fn key(&self, alg: SigningAlg) -> Arc<SigningKey> {
        self.keys.read().expect("keys lock").current[alg.index()].clone()
    }

    fn sign(&self, alg: SigningAlg, claims: &Value) -> String {
        let key = self.key(alg);
        key.sign_compact(&key.header(), claims)
    }

    fn token(&self, sub: &str, aud: &str, ttl: Duration, extra: Value) -> String {
        let now = unix_now();
        let mut claims = Map::new();
        claims.insert("iss".into(), Value::String(self.issuer_url.clone()));
        claims.insert("sub".into(), Value::String(sub.into()));
        claims.insert("aud".into(), Value::String(aud.into()));
        claims.insert("iat".into(), now.into());
        claims.insert("nbf".into(), now.into());
        claims.insert("exp".into(), now.saturating_add(ttl.as_secs()).into());
        match extra {
            Value::Null => {}
            Value::Object(extra) => claims.extend(extra),
            other => panic!("DevIssuer::token: `extra` must be a JSON object or null, got {other}"),
        }
        self.sign(SigningAlg::RS256, &Value::Object(claims))
    }
}

/// A running accept loop.
struct Running {
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// A development OIDC issuer serving discovery and JWKS over HTTPS on 127.0.0.1.
///
/// Methods take `&self`; wrap it in an `Arc` to share it. Dropping it stops the server.
pub struct DevIssuer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    ca_pem: String,
    acceptor: TlsAcceptor,
    running: Mutex<Option<Running>>,
}

impl std::fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIssuer")
            .field("issuer_url", &self.shared.issuer_url)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn other(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// "" for no path; otherwise "/a/b" without a trailing slash.
fn normalize_path(path: &str) -> std::io::Result<String> {
    let trimmed = path.trim_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    let ok = trimmed.split('/').all(|seg| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b))
    });
    if !ok {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("invalid issuer path {path:?}"),
        ));
    }
    Ok(format!("/{trimmed}"))
}

async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // So that `restart` can take the same port back while closed connections linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

impl DevIssuer {
    /// Starts an HTTPS issuer on 127.0.0.1:0 with a serving cert from `ca` (localhost + 127.0.0.1
    /// SANs). The issuer URL is `https://127.0.0.1:PORT` (no trailing slash). Its
    /// exec-credential endpoint mints nothing ([`Minting::Nobody`]).
    pub async fn start(ca: &Ca) -> std::io::Result<DevIssuer> {
        Self::start_minting(ca, "", Minting::Nobody).await
    }

    /// Like [`DevIssuer::start`], with an issuer path: `"/realms/dev"` gives the issuer
    /// `https://127.0.0.1:PORT/realms/dev`, discovery at `{issuer}/.well-known/openid-configuration`.
    /// Leading/trailing slashes are normalised; `""` or `"/"` means no path.
    pub async fn start_with_path(ca: &Ca, path: &str) -> std::io::Result<DevIssuer> {
        Self::start_minting(ca, path, Minting::Nobody).await
    }

    /// Like [`DevIssuer::start_with_path`], with an exec-credential endpoint that mints for
    /// whom `minting` allows.
    pub async fn start_minting(
        ca: &Ca,
        path: &str,
        minting: Minting,
    ) -> std::io::Result<DevIssuer> {
        let path = normalize_path(path)?;
        let serving = ca.issue_localhost_server("ztgate-dev-issuer");
        let certs = CertificateDer::pem_slice_iter(serving.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(other)?;
        let key = PrivateKeyDer::from_pem_slice(serving.key_pem.as_bytes()).map_err(other)?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(other)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(other)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));

        // RSA key generation takes a moment; keep it off the async workers.
        let keys = tokio::task::spawn_blocking(KeyState::generate)
            .await
            .map_err(other)?;

        let listener = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            issuer_url: format!("https://{addr}{path}"),
            path,
            keys: RwLock::new(keys),
            minting,
            jwks_override: Mutex::new(None),
            delay_micros: AtomicU64::new(0),
            discovery_fetches: AtomicUsize::new(0),
            jwks_fetches: AtomicUsize::new(0),
        });
        let issuer = DevIssuer {
            shared,
            addr,
            ca_pem: ca.cert_pem(),
            acceptor,
            running: Mutex::new(None),
        };
        let running = issuer.spawn(listener);
        *issuer.running.lock().expect("running lock") = Some(running);
        Ok(issuer)
    }

    fn spawn(&self, listener: TcpListener) -> Running {
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(accept_loop(
            self.shared.clone(),
            listener,
            self.acceptor.clone(),
            rx,
        ));
        Running { shutdown: tx, task }
    }

    /// `https://127.0.0.1:PORT[/path]`, no trailing slash.
    pub fn issuer_url(&self) -> String {
        self.shared.issuer_url.clone()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// PEM of the CA that signed the serving certificate.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// Signs `claims` verbatim (nothing added) with the current key for `alg`;
    /// header `{"alg", "typ": "JWT", "kid"}`.
    pub fn sign(&self, alg: SigningAlg, claims: &Value) -> String {
        self.shared.sign(alg, claims)
    }

    /// Signs with `header` used verbatim (its `alg`/`kid` are not checked or filled in) and the
    /// current key for `alg`.
    pub fn sign_with_header(&self, alg: SigningAlg, header: &Value, claims: &Value) -> String {
        self.shared.key(alg).sign_compact(header, claims)
    }

    /// An RS256 token with `iss` = issuer URL, `sub`, `aud`, `iat` = `nbf` = now, `exp` = now +
    /// `ttl`, then the members of `extra` (an object, or `null` for none) merged in — `extra`
    /// wins over the defaults, so tests can e.g. backdate `exp`.
    pub fn token(&self, sub: &str, aud: &str, ttl: Duration, extra: Value) -> String {
        self.shared.token(sub, aud, ttl, extra)
    }

    /// The current kid for `alg`.
    pub fn kid(&self, alg: SigningAlg) -> String {
        self.shared.key(alg).kid.clone()
    }

    /// SPKI PEM ("PUBLIC KEY") of the current RSA key.
    pub fn rsa_public_key_pem(&self) -> String {
        self.shared.key(SigningAlg::RS256).public_key_pem()
    }

    /// Replaces every signing key with a fresh one (new kids). With `keep_old_in_jwks` the JWKS
    /// keeps listing the previous keys (and any `use: enc` key); without, it lists only the new
    /// ones. Generates an RSA key, so it blocks for a moment.
    pub fn rotate(&self, keep_old_in_jwks: bool) {
        let fresh = KeyState::generate();
        let mut keys = self.shared.keys.write().expect("keys lock");
        if keep_old_in_jwks {
            let old: Vec<Value> = keys.current.iter().map(|k| k.jwk("sig")).collect();
            keys.retired.extend(old);
            keys.current = fresh.current;
        } else {
            *keys = fresh;
        }
    }

    /// Adds a JWK with `"use": "enc"` (a fresh RSA key, `"alg": "RS256"`) to the JWKS and returns
    /// an RS256 token over `claims` signed by it, with that key's kid.
    pub fn sign_with_enc_key(&self, claims: &Value) -> String {
        let key = Arc::new(SigningKey::generate(SigningAlg::RS256, "enc"));
        let token = key.sign_compact(&key.header(), claims);
        self.shared.keys.write().expect("keys lock").enc.push(key);
        token
    }

    /// Serves `body` (as `application/json`, status 200) instead of the real JWKS; `None` restores
    /// the real one.
    pub fn set_jwks_override(&self, body: Option<String>) {
        *self.shared.jwks_override.lock().expect("override lock") = body;
    }

    /// Delays every answer by `d` (zero: no delay). Counters are bumped before the delay.
    pub fn set_delay(&self, d: Duration) {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.shared.delay_micros.store(micros, Ordering::SeqCst);
    }

    /// GETs of the discovery document so far.
    pub fn discovery_fetches(&self) -> usize {
        self.shared.discovery_fetches.load(Ordering::SeqCst)
    }

    /// GETs of the JWKS so far (overridden answers included).
    pub fn jwks_fetches(&self) -> usize {
        self.shared.jwks_fetches.load(Ordering::SeqCst)
    }

    /// Stops listening and drops every open connection. Returns once the port is closed.
    /// A no-op when already stopped.
    pub async fn stop(&self) {
        let running = self.running.lock().expect("running lock").take();
        if let Some(running) = running {
            let _ = running.shutdown.send(());
            let _ = running.task.await;
        }
    }

    /// Listens again on the same address with the same keys. A no-op when already running.
    pub async fn restart(&self) -> std::io::Result<()> {
        if self.running.lock().expect("running lock").is_some() {
            return Ok(());
        }
        let listener = bind(self.addr).await?;
        let mut running = self.running.lock().expect("running lock");
        if running.is_none() {
            *running = Some(self.spawn(listener));
        }
        Ok(())
    }
}

impl Drop for DevIssuer {
    fn drop(&mut self) {
        if let Ok(mut running) = self.running.lock() {
            if let Some(running) = running.take() {
                // The accept loop sees the shutdown, closes the listener and its connections.
                let _ = running.shutdown.send(());
            }
        }
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    mut shutdown: oneshot::Receiver<()>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let _ = tcp.set_nodelay(true);
                    conns.spawn(serve_connection(shared.clone(), acceptor.clone(), tcp));
                }
                Err(e) => {
                    tracing::debug!("dev issuer accept: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    conns.shutdown().await;
}

async fn serve_connection(shared: Arc<Shared>, acceptor: TlsAcceptor, tcp: TcpStream) {
    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!("dev issuer tls handshake: {e}");
            return;
        }
        Err(_) => return,
    };
    let svc = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(&shared, req).await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder.serve_connection(TokioIo::new(tls), svc).await {
        tracing::debug!("dev issuer connection: {e}");
    }
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("valid response")
}

fn json_response(value: &Value) -> Response<Full<Bytes>> {
    respond(
        StatusCode::OK,
        "application/json",
        serde_json::to_vec(value).expect("serialize json"),
    )
}

fn text(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", format!("{msg}\n"))
}

#[derive(Clone, Copy)]
enum Route {
    Discovery,
    Jwks,
    ExecCredential,
}

async fn handle<B>(shared: &Shared, req: Request<B>) -> Response<Full<Bytes>> {
    let route = req
        .uri()
        .path()
        .strip_prefix(shared.path.as_str())
        .and_then(|rest| match rest {
            "/.well-known/openid-configuration" => Some(Route::Discovery),
            "/keys" => Some(Route::Jwks),
            "/dev/exec-credential" => Some(Route::ExecCredential),
            _ => None,
        });
    let is_get = req.method() == Method::GET;
    if is_get {
        match route {
            Some(Route::Discovery) => {
                shared.discovery_fetches.fetch_add(1, Ordering::SeqCst);
            }
            Some(Route::Jwks) => {
                shared.jwks_fetches.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
    }
    let delay = shared.delay_micros.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_micros(delay)).await;
    }
    let Some(route) = route else {
        return text(StatusCode::NOT_FOUND, "not found");
    };
    if !is_get {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        resp.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET"),
        );
        return resp;
    }
    match route {
        Route::Discovery => json_response(&discovery_document(&shared.issuer_url)),
        Route::Jwks => {
            let body = shared.jwks_override.lock().expect("override lock").clone();
            match body {
                Some(body) => respond(StatusCode::OK, "application/json", body),
                None => json_response(&shared.keys.read().expect("keys lock").jwks()),
            }
        }
        Route::ExecCredential => match exec_credential(shared, req.uri().query().unwrap_or("")) {
            Ok(v) => json_response(&v),
            Err((status, msg)) => text(status, &msg),
        },
    }
}

fn discovery_document(issuer: &str) -> Value {
    json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}/keys"),
        "authorization_endpoint": format!("{issuer}/authorize"),
        "token_endpoint": format!("{issuer}/token"),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
    })
}

/// Decodes one `application/x-www-form-urlencoded` component.
fn form_decode(s: &str) -> Result<String, String> {
    let plus = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| format!("query component {s:?} is not UTF-8"))
}

/// Longest lifetime the exec-credential endpoint hands out.
const MAX_EXEC_TTL_SECS: u64 = 7 * 24 * 3600;

/// What a request to the exec-credential endpoint asks for.
struct CredentialRequest {
    sub: String,
    aud: String,
    groups: Vec<String>,
    ttl: u64,
}

fn parse_credential_request(query: &str) -> Result<CredentialRequest, String> {
    let mut sub = None;
    let mut aud = None;
    let mut groups: Vec<String> = Vec::new();
    let mut ttl = 3600u64;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = form_decode(v)?;
        match form_decode(k)?.as_str() {
            "sub" => sub = Some(v),
            "aud" => aud = Some(v),
            "groups" => groups.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|g| !g.is_empty())
                    .map(String::from),
            ),
            "ttl" => {
                ttl = v
                    .parse::<u64>()
                    .ok()
                    .filter(|t| (1..=MAX_EXEC_TTL_SECS).contains(t))
                    .ok_or_else(|| {
                        format!("ttl must be whole seconds in 1..={MAX_EXEC_TTL_SECS}, got {v:?}")
                    })?
            }
            _ => {}
        }
    }
    let sub = sub
        .filter(|s| !s.is_empty())
        .ok_or("missing query parameter `sub`")?;
    let aud = aud
        .filter(|s| !s.is_empty())
        .ok_or("missing query parameter `aud`")?;
    Ok(CredentialRequest {
        sub,
        aud,
        groups,
        ttl,
    })
}

fn exec_credential(shared: &Shared, query: &str) -> Result<Value, (StatusCode, String)> {
    let CredentialRequest {
        sub,
        aud,
        groups,
        ttl,
    } = parse_credential_request(query).map_err(|m| (StatusCode::BAD_REQUEST, m))?;
    shared
        .minting
        .check(&sub, &groups)
        .map_err(|m| (StatusCode::FORBIDDEN, m))?;
    let now = unix_now();
    let exp = now + ttl;
    let claims = json!({
        "iss": shared.issuer_url,
        "sub": sub,
        "aud": aud,
        "groups": groups,
        "email": format!("{sub}@example.com"),
        "email_verified": true,
        "iat": now,
        "nbf": now,
        "exp": exp,
    });
    let token = shared.sign(SigningAlg::RS256, &claims);
    Ok(json!({
        "apiVersion": "client.authentication.k8s.io/v1",
        "kind": "ExecCredential",
        "status": {
            "token": token,
            "expirationTimestamp": rfc3339_utc(exp),
        },
    }))
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix timestamp.
fn rfc3339_utc(unix: u64) -> String {
    let t = i64::try_from(unix)
        .ok()
        .and_then(|u| time::OffsetDateTime::from_unix_timestamp(u).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}
