//! `ztsoak`: the load driver of `scripts/soak` (a long run of the whole gateway under a mixed,
//! bounded load on loopback).
//!
//! ```text
//! ztsoak admin-cert --out DIR
//!     Writes a client CA and a certificate signed by it for user `soak-admin` in group
//!     `security` (DIR/soak-admin-ca.crt, DIR/soak-admin.crt, DIR/soak-admin.key); the script
//!     appends the CA to the gateway's `users` bundle so the admin can manage locks.
//! ztsoak run --url BASE --ca CA --cert DEVICE_CERT --key DEVICE_KEY --token-file FILE
//!            --admin-cert C --admin-key K --issuer URL --policy-file FILE --config FILE
//!            --pid PID --out FILE [--minutes 10] [--rate 150] [--concurrency 16]
//!            [--watches 16] [--execs 2] [--token-every-ms 1000] [--reload-secs 60]
//!            [--lock-every-secs 20]
//! ```
//!
//! Rotating users are in groups `soak` (a policy the soak adds lets them read team-a with
//! unbound tokens) and `team-a` (the stand-in's RBAC).
//!
//! `run` drives, for `--minutes`:
//! - unary requests at a fixed rate (`--rate` per second) through `--concurrency` HTTP/2
//!   connections (a request that finds every worker busy is counted as skipped, never queued):
//!   gets and lists as the device-bound user of FILE, gets and lists as rotating users whose
//!   tokens come fresh from the dev issuer's exec-credential endpoint every `--token-every-ms`
//!   (60 s lifetime, so the gateway's token cache turns over), requests as `soak-locked`
//!   (locked part of the time), and requests every policy forbids (secrets);
//! - `--watches` watches, each held 2-20 s, closed by the client and opened again;
//! - `--execs` exec sessions (WebSocket `cat`, 64 KiB through stdin and back), back to back;
//! - a lock on user `soak-locked@example.com` every `--lock-every-secs` through `/v1/locks`
//!   with the admin certificate, removed by DELETE or left to lapse (`ttlSeconds`), alternately;
//! - a policy and a config rewrite every `--reload-secs` (the gateway polls both);
//! - VmRSS and open file descriptors of PID every second.
//!
//! A 403 that a lock explains (`access is locked`) or that the request was meant to get (the
//! secrets forbid) is counted apart; anything else that is not the expected answer is an error.
//! Prints a table and writes the figures as JSON to `--out`. Exit status 1 if there were errors
//! or RSS was not flat once warm (runs of 8 minutes or more: at most +10% over the second half,
//! and a slope of at most 0.25 MiB a minute over the last 4 minutes). A test fixture.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

type Tls = tokio_rustls::client::TlsStream<TcpStream>;
type H2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

const LOCKED_USER: &str = "soak-locked";
const ROTATING_USERS: usize = 8;
const GET_PATH: &str = "/api/v1/namespaces/team-a/pods/web-0";
const LIST_PATH: &str = "/api/v1/namespaces/team-a/pods";
const WATCH_PATH: &str = "/api/v1/namespaces/team-a/pods?watch=1";
const DENIED_PATH: &str = "/api/v1/namespaces/team-a/secrets/db";
const EXEC_PATH: &str =
    "/api/v1/namespaces/team-a/pods/web-0/exec?command=cat&stdin=true&stdout=true";
/// The policy the soak adds: the rotating users (group `soak`, unbound tokens) may read team-a.
const SOAK_POLICY: &str = r#"
@id("soak-rotating-users")
permit (
  principal in k8s::Group::"soak",
  action in [k8s::Action::"get", k8s::Action::"list", k8s::Action::"watch"],
  resource in k8s::Namespace::"team-a"
);
"#;

fn die(msg: String) -> ! {
    eprintln!("ztsoak: {msg}");
    std::process::exit(2)
}

struct Args {
    sub: String,
    one: BTreeMap<String, String>,
}

impl Args {
    fn parse() -> Args {
        let mut it = std::env::args().skip(1);
        let sub = it.next().unwrap_or_else(|| die("no subcommand".into()));
        let mut one = BTreeMap::new();
        while let Some(k) = it.next() {
            let Some(name) = k.strip_prefix("--") else {
                die(format!("unexpected argument {k:?}"))
            };
            let v = it
                .next()
                .unwrap_or_else(|| die(format!("--{name} needs a value")));
            one.insert(name.to_owned(), v);
        }
        Args { sub, one }
    }

    fn get(&self, k: &str) -> &str {
        self.one
            .get(k)
            .map(String::as_str)
            .unwrap_or_else(|| die(format!("missing --{k}")))
    }

    fn num(&self, k: &str, default: u64) -> u64 {
        self.one.get(k).map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| die(format!("--{k} {v:?}: not a number")))
        })
    }
}

fn tls_config(ca: &str, client: Option<(&str, &str)>, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap_or_else(|e| die(format!("{ca}: {e}")));
    for c in CertificateDer::pem_slice_iter(&pem) {
        roots
            .add(c.unwrap_or_else(|e| die(format!("{ca}: {e}"))))
            .unwrap_or_else(|e| die(format!("{ca}: {e}")));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| die(format!("tls: {e}")))
        .with_root_certificates(roots);
    let mut tls = match client {
        Some((c, k)) => {
            let pem = std::fs::read(c).unwrap_or_else(|e| die(format!("{c}: {e}")));
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .unwrap_or_else(|e| die(format!("{c}: {e}")));
            let key = PrivateKeyDer::from_pem_file(k).unwrap_or_else(|e| die(format!("{k}: {e}")));
            builder
                .with_client_auth_cert(chain, key)
                .unwrap_or_else(|e| die(format!("client certificate: {e}")))
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(tls)
}

/// A host and port with one TLS client configuration.
struct Peer {
    host: String,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
}

impl Peer {
    fn new(base: &str, tls: Arc<rustls::ClientConfig>) -> Peer {
        let uri: Uri = base.parse().unwrap_or_else(|e| die(format!("{base}: {e}")));
        Peer {
            host: uri.host().unwrap_or("127.0.0.1").to_owned(),
            port: uri.port_u16().unwrap_or(443),
            tls,
        }
    }

    async fn connect(&self) -> Result<Tls, String> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let name = ServerName::try_from(self.host.clone()).map_err(|e| e.to_string())?;
        tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("tls: {e}"))
    }

    async fn h2(&self) -> Result<H2, String> {
        let io = TokioIo::new(self.connect().await?);
        let (s, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(io)
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(s)
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        auth: Option<&HeaderValue>,
    ) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.method_mut() = method;
        *req.uri_mut() = format!("https://{}:{}{path}", self.host, self.port)
            .parse()
            .expect("a URI");
        if let Some(a) = auth {
            req.headers_mut()
                .insert(http::header::AUTHORIZATION, a.clone());
        }
        req
    }

    /// One request on a fresh HTTP/1.1 connection; the whole body.
    async fn once(&self, mut req: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), String> {
        let io = TokioIo::new(self.connect().await?);
        let (mut s, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("h1 handshake: {e}"))?;
        tokio::spawn(conn);
        let pq = req.uri().path_and_query().map(|p| p.to_string());
        *req.uri_mut() = pq.unwrap_or_else(|| "/".into()).parse().expect("a path");
        req.headers_mut().insert(
            http::header::HOST,
            HeaderValue::from_str(&format!("{}:{}", self.host, self.port)).expect("host"),
        );
        let resp = s
            .send_request(req)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok((status, body))
    }
}

fn bearer(t: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("Bearer {}", t.trim()))
        .unwrap_or_else(|_| die("a token is not a header value".into()))
}

/// Figures of one minute of the run.
#[derive(Default)]
struct Minute {
    lat_us: Vec<u32>,
    ok: u64,
    lock_denials: u64,
    policy_denials: u64,
    errors: u64,
    skipped: u64,
    watches_opened: u64,
    watches_closed_by_client: u64,
    watches_closed_by_lock: u64,
    exec_sessions: u64,
    exec_ms: Vec<u32>,
    tokens_fetched: u64,
    locks_added: u64,
    locks_removed: u64,
    locks_listed_max: u64,
    reloads: u64,
    rss_kib: u64,
    rss_max_kib: u64,
    /// Anonymous (heap, stacks) and file-backed (the binary's pages) parts of `rss_kib`.
    rss_anon_kib: u64,
    rss_file_kib: u64,
    fds: u64,
}

struct Stats {
    start: Instant,
    minutes: Mutex<Vec<Minute>>,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    fn rec(&self, f: impl FnOnce(&mut Minute)) {
        let mut m = self.minutes.lock().expect("stats");
        let i = ((self.start.elapsed().as_secs() / 60) as usize).min(m.len() - 1);
        f(&mut m[i]);
    }

    fn error(&self, what: String) {
        self.rec(|m| m.errors += 1);
        let mut e = self.errors.lock().expect("errors");
        *e.entry(what).or_default() += 1;
    }
}

/// The tokens the load uses: the bound one, and fresh ones of the rotating and locked users.
struct Tokens {
    bound: HeaderValue,
    rotating: Vec<RwLock<HeaderValue>>,
    locked: RwLock<HeaderValue>,
}

async fn fetch_token(issuer: &Peer, issuer_url: &str, sub: &str) -> Result<HeaderValue, String> {
    let path = Uri::try_from(issuer_url)
        .map_err(|e| e.to_string())?
        .path()
        .trim_end_matches('/')
        .to_owned();
    let req = issuer.request(
        Method::GET,
        &format!("{path}/dev/exec-credential?sub={sub}&aud=ztgate&groups=soak,team-a&ttl=60"),
        None,
    );
    let (status, body) = issuer.once(req).await?;
    if status != StatusCode::OK {
        return Err(format!("issuer answered {status}"));
    }
    let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let t = v["status"]["token"]
        .as_str()
        .ok_or("no status.token in the ExecCredential")?;
    Ok(bearer(t))
}

#[derive(Clone, Copy)]
enum Kind {
    Get,
    List,
    RotGet,
    RotList,
    Locked,
    Denied,
}

fn kind_of(n: u64) -> Kind {
    match n % 20 {
        0..=7 => Kind::Get,
        8..=12 => Kind::List,
        13..=15 => Kind::RotGet,
        16 => Kind::RotList,
        17 | 18 => Kind::Locked,
        _ => Kind::Denied,
    }
}

struct Ctx {
    gw: Peer,
    gw_h1: Peer,
    admin: Peer,
    stats: Stats,
    tokens: Tokens,
    stop: AtomicBool,
}

impl Ctx {
    fn token_for(&self, kind: Kind, n: u64) -> HeaderValue {
        match kind {
            Kind::Get | Kind::List | Kind::Denied => self.tokens.bound.clone(),
            Kind::RotGet | Kind::RotList => self.tokens.rotating
                [(n / 20) as usize % ROTATING_USERS]
                .read()
                .expect("token")
                .clone(),
            Kind::Locked => self.tokens.locked.read().expect("token").clone(),
        }
    }
}

/// One unary request; classifies its answer.
async fn unary(ctx: &Ctx, s: &mut Option<H2>, n: u64) {
    let kind = kind_of(n);
    let path = match kind {
        Kind::Get | Kind::RotGet | Kind::Locked => GET_PATH,
        Kind::List | Kind::RotList => LIST_PATH,
        Kind::Denied => DENIED_PATH,
    };
    if s.is_none() {
        match ctx.gw.h2().await {
            Ok(c) => *s = Some(c),
            Err(e) => return ctx.stats.error(format!("unary {e}")),
        }
    }
    let sender = s.as_mut().expect("a connection");
    let req = ctx
        .gw
        .request(Method::GET, path, Some(&ctx.token_for(kind, n)));
    let t0 = Instant::now();
    let res = async {
        sender.ready().await.map_err(|e| format!("ready: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok::<_, String>((status, body))
    }
    .await;
    let us = u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX);
    match res {
        Err(e) => {
            *s = None;
            ctx.stats.error(format!("unary {e}"));
        }
        Ok((status, body)) => {
            let locked = status == StatusCode::FORBIDDEN
                && String::from_utf8_lossy(&body).contains("access is locked");
            match (kind, status) {
                (Kind::Denied, StatusCode::FORBIDDEN) => {
                    ctx.stats.rec(|m| {
                        m.lat_us.push(us);
                        m.policy_denials += 1;
                    });
                }
                (Kind::Locked, StatusCode::FORBIDDEN) if locked => {
                    ctx.stats.rec(|m| {
                        m.lat_us.push(us);
                        m.lock_denials += 1;
                    });
                }
                (Kind::Denied, _) => ctx
                    .stats
                    .error(format!("a forbidden request answered {status}")),
                (_, StatusCode::OK) => ctx.stats.rec(|m| {
                    m.lat_us.push(us);
                    m.ok += 1;
                }),
                (_, _) => {
                    let msg = String::from_utf8_lossy(&body);
                    let msg: String = msg.chars().take(160).collect();
                    ctx.stats
                        .error(format!("GET {path} answered {status}: {msg}"));
                }
            }
        }
    }
}

/// A small xorshift generator (hold times), seeded per task.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Slot 0 watches as the user that gets locked; even slots as the bound user, odd ones as a
/// rotating user.
async fn watch_loop(ctx: Arc<Ctx>, slot: u64) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((slot + 1) * 0x2545_f491_4f6c_dd1d));
    let mut conn: Option<H2> = None;
    while !ctx.stop.load(Ordering::Relaxed) {
        let (token, is_locked_user) = match slot {
            0 => (ctx.tokens.locked.read().expect("token").clone(), true),
            s if s % 2 == 0 => (ctx.tokens.bound.clone(), false),
            s => (
                ctx.tokens.rotating[s as usize % ROTATING_USERS]
                    .read()
                    .expect("token")
                    .clone(),
                false,
            ),
        };
        if conn.is_none() {
            match ctx.gw.h2().await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    ctx.stats.error(format!("watch {e}"));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        }
        let s = conn.as_mut().expect("a connection");
        let req = ctx.gw.request(Method::GET, WATCH_PATH, Some(&token));
        let resp = async {
            s.ready().await.map_err(|e| format!("ready: {e}"))?;
            s.send_request(req).await.map_err(|e| format!("send: {e}"))
        }
        .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                conn = None;
                ctx.stats.error(format!("watch {e}"));
                continue;
            }
        };
        let status = resp.status();
        if status != StatusCode::OK {
            let body = resp.into_body().collect().await.map(|b| b.to_bytes());
            let text = body
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            if is_locked_user
                && status == StatusCode::FORBIDDEN
                && text.contains("access is locked")
            {
                ctx.stats.rec(|m| m.lock_denials += 1);
            } else {
                let t: String = text.chars().take(160).collect();
                ctx.stats.error(format!("watch answered {status}: {t}"));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        ctx.stats.rec(|m| m.watches_opened += 1);
        let hold = Duration::from_millis(2000 + rng.next() % 18_000);
        let deadline = tokio::time::Instant::now() + hold;
        let mut body = resp.into_body();
        let mut tail: Vec<u8> = Vec::new();
        let ended = loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break None,
                f = body.frame() => match f {
                    Some(Ok(f)) => {
                        if let Some(d) = f.data_ref() {
                            tail.extend_from_slice(d);
                            if tail.len() > 8192 {
                                tail.drain(..tail.len() - 4096);
                            }
                        }
                    }
                    Some(Err(e)) => break Some(format!("error: {e}")),
                    None => break Some("end".to_owned()),
                },
            }
        };
        drop(body);
        match ended {
            None => ctx.stats.rec(|m| m.watches_closed_by_client += 1),
            Some(how) => {
                let text = String::from_utf8_lossy(&tail);
                if is_locked_user && text.contains("access is locked") {
                    ctx.stats.rec(|m| m.watches_closed_by_lock += 1);
                } else {
                    let t: String = text
                        .chars()
                        .rev()
                        .take(160)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect();
                    ctx.stats.error(format!("watch ended early ({how}): {t}"));
                    conn = None;
                }
            }
        }
    }
}

/// Exec sessions back to back: `cat` over WebSocket (v5.channel.k8s.io), 64 KiB through.
async fn exec_loop(ctx: Arc<Ctx>) {
    const TOTAL: usize = 64 * 1024;
    const CHUNK: usize = 16 * 1024;
    while !ctx.stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        match exec_once(&ctx, TOTAL, CHUNK).await {
            Ok(()) => {
                let ms = u32::try_from(t0.elapsed().as_millis()).unwrap_or(u32::MAX);
                ctx.stats.rec(|m| {
                    m.exec_sessions += 1;
                    m.exec_ms.push(ms);
                });
            }
            Err(e) => ctx.stats.error(format!("exec {e}")),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn exec_once(ctx: &Ctx, total: usize, chunk: usize) -> Result<(), String> {
    let tls = ctx.gw_h1.connect().await?;
    let mut req = Request::builder()
        .uri(format!(
            "wss://{}:{}{EXEC_PATH}",
            ctx.gw_h1.host, ctx.gw_h1.port
        ))
        .header("host", format!("{}:{}", ctx.gw_h1.host, ctx.gw_h1.port))
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header(
            "sec-websocket-key",
            tokio_tungstenite::tungstenite::handshake::client::generate_key(),
        )
        .header("sec-websocket-protocol", "v5.channel.k8s.io")
        .body(())
        .expect("request");
    req.headers_mut()
        .insert(http::header::AUTHORIZATION, ctx.tokens.bound.clone());
    let (ws, resp) = tokio_tungstenite::client_async(req, tls)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Err(format!("answered {}", resp.status()));
    }
    let (mut tx, mut rx) = ws.split();
    let writer = async {
        let mut payload = vec![0u8; chunk + 1];
        for (i, b) in payload.iter_mut().enumerate().skip(1) {
            *b = (i % 251) as u8;
        }
        let payload = Bytes::from(payload);
        let mut sent = 0;
        while sent < total {
            let n = chunk.min(total - sent);
            tx.send(Message::Binary(payload.slice(..n + 1)))
                .await
                .map_err(|e| format!("send: {e}"))?;
            sent += n;
        }
        Ok::<_, String>(tx)
    };
    let reader = async {
        let mut received = 0usize;
        while received < total {
            match rx.next().await {
                Some(Ok(Message::Binary(b))) if b.first() == Some(&1) => received += b.len() - 1,
                Some(Ok(Message::Close(c))) => return Err(format!("closed early: {c:?}")),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("read: {e}")),
                None => return Err(format!("ended after {received} bytes")),
            }
        }
        Ok(received)
    };
    let (w, r) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(writer, reader)
    })
    .await
    .map_err(|_| "no echo within 30 s".to_owned())?;
    let mut tx = w?;
    r?;
    // v5: close stdin, then the WebSocket.
    let _ = tx
        .send(Message::Binary(Bytes::from_static(&[255, 0])))
        .await;
    let _ = tx.close().await;
    Ok(())
}

/// Fresh tokens: one user at a time, round robin over the rotating users and the locked one.
async fn token_loop(ctx: Arc<Ctx>, issuer: Peer, issuer_url: String, every: Duration) {
    let mut n = 0usize;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !ctx.stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let i = n % (ROTATING_USERS + 1);
        n += 1;
        let sub = if i == ROTATING_USERS {
            LOCKED_USER.to_owned()
        } else {
            format!("soak-u{i}")
        };
        match fetch_token(&issuer, &issuer_url, &sub).await {
            Ok(t) => {
                let slot = if i == ROTATING_USERS {
                    &ctx.tokens.locked
                } else {
                    &ctx.tokens.rotating[i]
                };
                *slot.write().expect("token") = t;
                ctx.stats.rec(|m| m.tokens_fetched += 1);
            }
            Err(e) => ctx.stats.error(format!("token from the dev issuer: {e}")),
        }
    }
}

async fn admin(
    ctx: &Ctx,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(StatusCode, Value), String> {
    let mut req = ctx.admin.request(method, path, None);
    if let Some(b) = body {
        *req.body_mut() = Full::new(Bytes::from(b.to_string()));
        req.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    let (status, body) = ctx.admin.once(req).await?;
    Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

/// A lock on the locked user every `every`: removed by DELETE after half the period, or (every
/// other time) created with a TTL of half the period and left to lapse.
async fn lock_loop(ctx: Arc<Ctx>, every: Duration) {
    let mut n = 0u64;
    let half = every / 2;
    while !ctx.stop.load(Ordering::Relaxed) {
        n += 1;
        let lapse = n.is_multiple_of(2);
        let mut lock = json!({
            "target": {"kind": "user", "value": format!("{LOCKED_USER}@example.com")},
            "message": format!("soak lock {n}"),
        });
        if lapse {
            lock["ttlSeconds"] = json!(half.as_secs().max(1));
        }
        let id = match admin(&ctx, Method::POST, "/v1/locks", Some(lock)).await {
            Ok((StatusCode::CREATED, v)) => {
                ctx.stats.rec(|m| m.locks_added += 1);
                v["id"].as_str().map(str::to_owned)
            }
            Ok((s, v)) => {
                ctx.stats.error(format!("POST /v1/locks answered {s}: {v}"));
                None
            }
            Err(e) => {
                ctx.stats.error(format!("POST /v1/locks: {e}"));
                None
            }
        };
        tokio::time::sleep(half).await;
        if let (Some(id), false) = (&id, lapse) {
            match admin(&ctx, Method::DELETE, &format!("/v1/locks/{id}"), None).await {
                Ok((StatusCode::OK, _)) => ctx.stats.rec(|m| m.locks_removed += 1),
                Ok((s, v)) => ctx
                    .stats
                    .error(format!("DELETE /v1/locks/<id> answered {s}: {v}")),
                Err(e) => ctx.stats.error(format!("DELETE /v1/locks/<id>: {e}")),
            }
        }
        tokio::time::sleep(half).await;
        // Nothing should be left: the lock was deleted or has lapsed.
        match admin(&ctx, Method::GET, "/v1/locks", None).await {
            Ok((StatusCode::OK, v)) => {
                let items = v["items"].as_array().map_or(0, Vec::len) as u64;
                ctx.stats
                    .rec(|m| m.locks_listed_max = m.locks_listed_max.max(items));
            }
            Ok((s, v)) => ctx.stats.error(format!("GET /v1/locks answered {s}: {v}")),
            Err(e) => ctx.stats.error(format!("GET /v1/locks: {e}")),
        }
    }
}

fn write_atomic(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.soak-tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// The policy file and the config file, rewritten (a changed comment) every `every`.
async fn reload_loop(
    ctx: Arc<Ctx>,
    policy: PathBuf,
    policy_base: String,
    config: PathBuf,
    every: Duration,
) {
    let config_base = std::fs::read_to_string(&config)
        .unwrap_or_else(|e| die(format!("{}: {e}", config.display())));
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = wait_stop(&ctx) => return,
        }
        n += 1;
        let p = format!("{policy_base}{SOAK_POLICY}// soak reload {n}\n");
        let c = format!("{config_base}# soak reload {n}\n");
        match write_atomic(&policy, &p).and_then(|()| write_atomic(&config, &c)) {
            Ok(()) => ctx.stats.rec(|m| m.reloads += 1),
            Err(e) => ctx.stats.error(format!("rewrite for reload: {e}")),
        }
    }
}

async fn wait_stop(ctx: &Ctx) {
    while !ctx.stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn proc_status(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

async fn sampler(ctx: Arc<Ctx>, pid: u32) {
    while !ctx.stop.load(Ordering::Relaxed) {
        let rss = proc_status(pid, "VmRSS:");
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
        if rss == 0 {
            ctx.stats.error("the gateway process is gone".into());
        }
        let anon = proc_status(pid, "RssAnon:");
        let file = proc_status(pid, "RssFile:");
        ctx.stats.rec(|m| {
            m.rss_kib = rss;
            m.rss_max_kib = m.rss_max_kib.max(rss);
            m.rss_anon_kib = anon;
            m.rss_file_kib = file;
            m.fds = fds;
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)])
}

/// Before the load: each kind of request gets its expected answer (waits for the soak policy to
/// be loaded).
async fn preflight(ctx: &Ctx) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    while Instant::now() < deadline {
        let mut all = true;
        for (kind, want) in [
            (Kind::Get, StatusCode::OK),
            (Kind::RotGet, StatusCode::OK),
            (Kind::Locked, StatusCode::OK),
            (Kind::Denied, StatusCode::FORBIDDEN),
        ] {
            let path = if matches!(kind, Kind::Denied) {
                DENIED_PATH
            } else {
                GET_PATH
            };
            let (status, body) = ctx
                .gw_h1
                .once(
                    ctx.gw_h1
                        .request(Method::GET, path, Some(&ctx.token_for(kind, 0))),
                )
                .await?;
            if status != want {
                all = false;
                last = format!(
                    "GET {path} answered {status}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
        }
        if all {
            let (s, v) = admin(ctx, Method::GET, "/v1/locks", None).await?;
            if s != StatusCode::OK {
                return Err(format!(
                    "GET /v1/locks with the admin certificate answered {s}: {v}"
                ));
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(last)
}

async fn run(a: &Args) -> i32 {
    let base = a.get("url").trim_end_matches('/').to_owned();
    let ca = a.get("ca");
    let device = Some((a.get("cert"), a.get("key")));
    let minutes = a.num("minutes", 10).max(1);
    let rate = a.num("rate", 150).max(1);
    let concurrency = a.num("concurrency", 16).max(1);
    let watches = a.num("watches", 16);
    let execs = a.num("execs", 2);
    let issuer_url = a.get("issuer").to_owned();
    let issuer = Peer::new(&issuer_url, tls_config(ca, None, b"http/1.1"));
    let policy = PathBuf::from(a.get("policy-file"));
    let policy_base = std::fs::read_to_string(&policy)
        .unwrap_or_else(|e| die(format!("{}: {e}", policy.display())));
    let pid: u32 = a
        .get("pid")
        .parse()
        .unwrap_or_else(|_| die("--pid: not a number".into()));

    // Fresh tokens for everyone before the load, and the soak policy.
    let mut rotating = Vec::new();
    for i in 0..ROTATING_USERS {
        let t = fetch_token(&issuer, &issuer_url, &format!("soak-u{i}"))
            .await
            .unwrap_or_else(|e| die(format!("token from the dev issuer: {e}")));
        rotating.push(RwLock::new(t));
    }
    let locked = fetch_token(&issuer, &issuer_url, LOCKED_USER)
        .await
        .unwrap_or_else(|e| die(format!("token from the dev issuer: {e}")));
    let bound = bearer(
        &std::fs::read_to_string(a.get("token-file"))
            .unwrap_or_else(|e| die(format!("--token-file: {e}"))),
    );
    write_atomic(&policy, &format!("{policy_base}{SOAK_POLICY}"))
        .unwrap_or_else(|e| die(format!("{}: {e}", policy.display())));

    let ctx = Arc::new(Ctx {
        gw: Peer::new(&base, tls_config(ca, device, b"h2")),
        gw_h1: Peer::new(&base, tls_config(ca, device, b"http/1.1")),
        admin: Peer::new(
            &base,
            tls_config(
                ca,
                Some((a.get("admin-cert"), a.get("admin-key"))),
                b"http/1.1",
            ),
        ),
        stats: Stats {
            start: Instant::now(),
            minutes: Mutex::new((0..minutes).map(|_| Minute::default()).collect()),
            errors: Mutex::new(BTreeMap::new()),
        },
        tokens: Tokens {
            bound,
            rotating,
            locked: RwLock::new(locked),
        },
        stop: AtomicBool::new(false),
    });
    if let Err(e) = preflight(&ctx).await {
        die(format!("preflight: {e}"));
    }
    eprintln!(
        "ztsoak: {minutes} min, {rate} req/s over {concurrency} connections, {watches} watches, {execs} exec sessions"
    );
    // The clock starts now.
    let ctx = {
        let mut c = Arc::try_unwrap(ctx).unwrap_or_else(|_| die("ctx shared".into()));
        c.stats.start = Instant::now();
        Arc::new(c)
    };

    let mut tasks = vec![tokio::spawn(sampler(ctx.clone(), pid))];
    tasks.push(tokio::spawn(token_loop(
        ctx.clone(),
        issuer,
        issuer_url,
        Duration::from_millis(a.num("token-every-ms", 1000).max(10)),
    )));
    tasks.push(tokio::spawn(lock_loop(
        ctx.clone(),
        Duration::from_secs(a.num("lock-every-secs", 20).max(2)),
    )));
    tasks.push(tokio::spawn(reload_loop(
        ctx.clone(),
        policy,
        policy_base,
        PathBuf::from(a.get("config")),
        Duration::from_secs(a.num("reload-secs", 60).max(1)),
    )));
    for slot in 0..watches {
        tasks.push(tokio::spawn(watch_loop(ctx.clone(), slot)));
    }
    for _ in 0..execs {
        tasks.push(tokio::spawn(exec_loop(ctx.clone())));
    }
    // The bounded request loop: a ticket per 1/rate s, taken by one of `concurrency` workers;
    // a ticket no worker is free to take is skipped, not queued.
    let (tx, rx) = async_channel(concurrency as usize);
    for _ in 0..concurrency {
        let (ctx, rx) = (ctx.clone(), rx.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = None;
            loop {
                let n = {
                    let mut rx = rx.lock().await;
                    match rx.recv().await {
                        Some(n) => n,
                        None => break,
                    }
                };
                unary(&ctx, &mut conn, n).await;
            }
        }));
    }
    drop(rx);
    let issued = AtomicU64::new(0);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let end = tokio::time::Instant::now() + Duration::from_secs(minutes * 60);
    while tokio::time::Instant::now() < end {
        tick.tick().await;
        let n = issued.fetch_add(1, Ordering::Relaxed);
        if tx.try_send(n).is_err() {
            ctx.stats.rec(|m| m.skipped += 1);
        }
    }
    drop(tx);
    ctx.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        if tokio::time::timeout(Duration::from_secs(40), t)
            .await
            .is_err()
        {
            ctx.stats
                .error("a load task did not stop within 40 s".into());
        }
    }
    report(&ctx, a, minutes, rate, concurrency, watches, execs)
}

/// A bounded channel shared by several receivers.
fn async_channel(
    cap: usize,
) -> (
    tokio::sync::mpsc::Sender<u64>,
    Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<u64>>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(cap);
    (tx, Arc::new(tokio::sync::Mutex::new(rx)))
}

fn report(
    ctx: &Ctx,
    a: &Args,
    minutes: u64,
    rate: u64,
    conc: u64,
    watches: u64,
    execs: u64,
) -> i32 {
    let mut ms = ctx.stats.minutes.lock().expect("stats");
    let errors = ctx.stats.errors.lock().expect("errors").clone();
    let mut rows = Vec::new();
    for (i, m) in ms.iter_mut().enumerate() {
        m.lat_us.sort_unstable();
        m.exec_ms.sort_unstable();
        rows.push(json!({
            "minute": i + 1,
            "requests": m.lat_us.len(),
            "ok": m.ok,
            "lock_denials": m.lock_denials,
            "policy_denials": m.policy_denials,
            "errors": m.errors,
            "skipped": m.skipped,
            "p50_ms": pct(&m.lat_us, 0.50) / 1000.0,
            "p99_ms": pct(&m.lat_us, 0.99) / 1000.0,
            "max_ms": pct(&m.lat_us, 1.0) / 1000.0,
            "watches_opened": m.watches_opened,
            "watches_closed_by_client": m.watches_closed_by_client,
            "watches_closed_by_lock": m.watches_closed_by_lock,
            "exec_sessions": m.exec_sessions,
            "exec_p99_ms": pct(&m.exec_ms, 0.99),
            "tokens_fetched": m.tokens_fetched,
            "locks_added": m.locks_added,
            "locks_removed": m.locks_removed,
            "locks_listed_after_cycle_max": m.locks_listed_max,
            "reloads": m.reloads,
            "rss_kib": m.rss_kib,
            "rss_max_kib": m.rss_max_kib,
            "rss_anon_kib": m.rss_anon_kib,
            "rss_file_kib": m.rss_file_kib,
            "fds": m.fds,
        }));
    }
    let total_errors: u64 = ms.iter().map(|m| m.errors).sum();
    // Flat once warm, judged on runs of 8 minutes or more: over the second half RSS stays
    // within RSS_HALF_GROWTH of the half-way minute, and over the last 4 minutes its
    // least-squares slope is at most RSS_SLOPE_KIB_PER_MIN. Warm-up (allocator arenas and
    // bounded caches filling, code pages touched for the first time) levels off, on a loaded
    // machine as late as minute 7; a leak keeps a slope. docs/hardening.md has the evidence
    // (live heap under heaptrack against RSS).
    let half = ms.len() / 2;
    let judged = ms.len() >= 8;
    let base = ms[half.saturating_sub(1)].rss_kib;
    let later_max = ms[half..].iter().map(|m| m.rss_kib).max().unwrap_or(base);
    let limit = base + (base as f64 * RSS_HALF_GROWTH) as u64;
    let tail = ms.len().saturating_sub(4);
    let slope = slope_kib_per_min(&ms[tail..]);
    let flat = !judged || (later_max <= limit && slope <= RSS_SLOPE_KIB_PER_MIN);
    let out = json!({
        "settings": {
            "minutes": minutes, "rate_per_s": rate, "concurrency": conc, "watches": watches,
            "exec_sessions": execs, "token_every_ms": a.num("token-every-ms", 1000),
            "reload_secs": a.num("reload-secs", 60), "lock_every_secs": a.num("lock-every-secs", 20),
        },
        "minutes": rows,
        "errors": errors,
        "total_errors": total_errors,
        "rss_flat": {
            "half_minute": half, "half_rss_kib": base, "judged_minutes": [half + 1, ms.len()],
            "max_rss_kib_judged": later_max, "limit_kib": limit,
            "slope_minutes": [tail + 1, ms.len()], "slope_kib_per_min": slope,
            "slope_limit_kib_per_min": RSS_SLOPE_KIB_PER_MIN,
            "judged": judged, "flat": flat,
        },
        "pass": total_errors == 0 && flat,
    });
    let path = a.get("out");
    std::fs::write(
        path,
        serde_json::to_string_pretty(&out).expect("json") + "\n",
    )
    .unwrap_or_else(|e| die(format!("{path}: {e}")));

    println!(
        "\nztgate soak: {minutes} min; {rate} req/s target over {conc} HTTP/2 connections; {watches} watches; {execs} exec loops"
    );
    println!(
        "{:>3} {:>7} {:>7} {:>6} {:>6} {:>4} {:>5} {:>7} {:>7} {:>7} {:>6} {:>5} {:>5} {:>6} {:>5} {:>8} {:>5} {:>5} {:>4}",
        "min", "req", "ok", "lock", "policy", "err", "skip", "p50 ms", "p99 ms", "max ms",
        "watch", "wlock", "exec", "tokens", "locks", "RSS MiB", "anon", "file", "fds"
    );
    let u = |r: &Value, k: &str| r[k].as_u64().unwrap_or(0);
    let f = |r: &Value, k: &str| r[k].as_f64().unwrap_or(0.0);
    for r in &rows {
        println!(
            "{:>3} {:>7} {:>7} {:>6} {:>6} {:>4} {:>5} {:>7.2} {:>7.2} {:>7.1} {:>6} {:>5} {:>5} {:>6} {:>5} {:>8.1} {:>5.1} {:>5.1} {:>4}",
            u(r, "minute"), u(r, "requests"), u(r, "ok"), u(r, "lock_denials"),
            u(r, "policy_denials"), u(r, "errors"), u(r, "skipped"), f(r, "p50_ms"),
            f(r, "p99_ms"), f(r, "max_ms"), u(r, "watches_opened"),
            u(r, "watches_closed_by_lock"), u(r, "exec_sessions"), u(r, "tokens_fetched"),
            u(r, "locks_added"), f(r, "rss_kib") / 1024.0, f(r, "rss_anon_kib") / 1024.0,
            f(r, "rss_file_kib") / 1024.0, u(r, "fds"),
        );
    }
    println!();
    if errors.is_empty() {
        println!("errors: none (403s above are the intended lock and policy denials)");
    } else {
        println!("errors:");
        for (k, v) in &errors {
            println!("  {v:>6}  {k}");
        }
    }
    println!(
        "RSS flat once warm: {} (minutes {}-{}: max {:.1} MiB, limit +{:.0}% of minute {} = {:.1} MiB; minutes {}-{}: slope {:+.2} MiB/min, limit {:.2}{})",
        if flat { "yes" } else { "NO" },
        half + 1,
        ms.len(),
        later_max as f64 / 1024.0,
        RSS_HALF_GROWTH * 100.0,
        half,
        limit as f64 / 1024.0,
        tail + 1,
        ms.len(),
        slope / 1024.0,
        RSS_SLOPE_KIB_PER_MIN / 1024.0,
        if judged { "" } else { "; run too short to judge (8 minutes at least)" },
    );
    println!("JSON: {path}");
    i32::from(!(total_errors == 0 && flat))
}

/// Most RSS may grow over the second half of a run, as a fraction of the half-way minute.
const RSS_HALF_GROWTH: f64 = 0.10;
/// Largest least-squares RSS slope over the last 4 minutes: 0.25 MiB a minute, about 29 bytes
/// a request at the default 150 requests a second. A smaller leak passes a 10-minute run (RSS
/// wanders by ~0.7 MiB on a shared machine); `SOAK_HEAPTRACK=1` and longer runs find those.
const RSS_SLOPE_KIB_PER_MIN: f64 = 256.0;

/// Least-squares slope of RSS (KiB per minute) over consecutive minutes.
fn slope_kib_per_min(ms: &[Minute]) -> f64 {
    let n = ms.len() as f64;
    if ms.len() < 2 {
        return 0.0;
    }
    let mean_x = (n - 1.0) / 2.0;
    let mean_y = ms.iter().map(|m| m.rss_kib as f64).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for (i, m) in ms.iter().enumerate() {
        let dx = i as f64 - mean_x;
        num += dx * (m.rss_kib as f64 - mean_y);
        den += dx * dx;
    }
    num / den
}

fn admin_cert(a: &Args) -> i32 {
    let dir = PathBuf::from(a.get("out"));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| die(format!("{}: {e}", dir.display())));
    let ca = ztgate_testkit::pki::Ca::new("soak-admin-ca");
    let admin = ca.issue_client("soak-admin", &["security"]);
    std::fs::write(dir.join("soak-admin-ca.crt"), ca.cert_pem())
        .unwrap_or_else(|e| die(format!("write: {e}")));
    admin.write(&dir, "soak-admin");
    0
}

fn main() {
    let a = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| die(format!("runtime: {e}")));
    let code = match a.sub.as_str() {
        "admin-cert" => admin_cert(&a),
        "run" => rt.block_on(run(&a)),
        other => die(format!("unknown subcommand {other:?}")),
    };
    std::process::exit(code);
}
