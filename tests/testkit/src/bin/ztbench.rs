//! `ztbench`: the parts of `scripts/bench` that a stock load generator cannot do.
//!
//! ```text
//! ztbench load       --url URL --ca CA [--cert C --key K] [--tokens FILE] [--header 'K: V']...
//!                    [--http1] --concurrency N --duration SECS
//!     N clients, each on its own connection, sending GETs back to back; each request takes the
//!     next token of FILE (one per line) as its bearer token. Prints JSON: rps, p50/p99/p99.9 (ms),
//!     status counts.
//! ztbench watches    --url URL --ca CA [--cert C --key K] [--token T] [--header 'K: V']...
//!                    --count N [--per-conn M] [--hold SECS]
//!     Opens N watches multiplexed over HTTP/2 connections (M streams each), prints one JSON line
//!     when every response has started, keeps them open until stdin closes or SECS pass.
//! ztbench exec       --url URL --ca CA [--cert C --key K] [--token T] [--header 'K: V']...
//!                    [--mb MB] [--chunk BYTES]
//!     One `cat` exec session over WebSocket (v5.channel.k8s.io): MB megabytes through stdin,
//!     read back on stdout. Prints JSON: MB/s.
//! ztbench wait-ready --url URL --ca CA --since-ns T0 [--timeout SECS]
//!     Polls URL until it answers 200; prints the milliseconds since T0 (ns since the epoch).
//! ```
//!
//! URL is the target's base (`https://127.0.0.1:PORT`) plus the path. A test fixture.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderName, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

fn die(msg: String) -> ! {
    eprintln!("ztbench: {msg}");
    std::process::exit(2)
}

struct Args {
    sub: String,
    one: BTreeMap<String, String>,
    headers: Vec<(HeaderName, HeaderValue)>,
    flags: Vec<String>,
}

impl Args {
    fn parse() -> Args {
        let mut it = std::env::args().skip(1);
        let sub = it.next().unwrap_or_else(|| die("no subcommand".into()));
        let mut a = Args {
            sub,
            one: BTreeMap::new(),
            headers: Vec::new(),
            flags: Vec::new(),
        };
        let mut it = it.peekable();
        while let Some(k) = it.next() {
            let Some(name) = k.strip_prefix("--") else {
                die(format!("unexpected argument {k:?}"))
            };
            if name == "http1" {
                a.flags.push(name.into());
                continue;
            }
            let v = it
                .next()
                .unwrap_or_else(|| die(format!("--{name} needs a value")));
            if name == "header" {
                let (hk, hv) = v
                    .split_once(':')
                    .unwrap_or_else(|| die(format!("--header {v:?}: want 'Name: value'")));
                a.headers.push((
                    HeaderName::from_bytes(hk.trim().as_bytes())
                        .unwrap_or_else(|e| die(format!("header name {hk:?}: {e}"))),
                    HeaderValue::from_str(hv.trim())
                        .unwrap_or_else(|e| die(format!("header value: {e}"))),
                ));
            } else {
                a.one.insert(name.to_owned(), v);
            }
        }
        a
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

    fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// `--token` as an Authorization header, plus every `--header`.
    fn request_headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        let mut h = self.headers.clone();
        if let Some(t) = self.one.get("token") {
            h.push((
                http::header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {t}"))
                    .unwrap_or_else(|_| die("--token is not a header value".into())),
            ));
        }
        h
    }
}

/// Where to connect, and with which TLS settings.
struct Target {
    uri: Uri,
    host: String,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
}

impl Target {
    fn new(a: &Args, alpn: &[&[u8]]) -> Target {
        let uri: Uri = a
            .get("url")
            .parse()
            .unwrap_or_else(|e| die(format!("--url: {e}")));
        let host = uri.host().unwrap_or("127.0.0.1").to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let mut roots = rustls::RootCertStore::empty();
        let ca = std::fs::read(a.get("ca")).unwrap_or_else(|e| die(format!("--ca: {e}")));
        for c in CertificateDer::pem_slice_iter(&ca) {
            roots
                .add(c.unwrap_or_else(|e| die(format!("--ca: {e}"))))
                .unwrap_or_else(|e| die(format!("--ca: {e}")));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|e| die(format!("tls: {e}")))
            .with_root_certificates(roots);
        let mut tls = match (a.one.get("cert"), a.one.get("key")) {
            (Some(c), Some(k)) => {
                let pem = std::fs::read(c).unwrap_or_else(|e| die(format!("--cert: {e}")));
                let chain = CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap_or_else(|e| die(format!("--cert: {e}")));
                let key =
                    PrivateKeyDer::from_pem_file(k).unwrap_or_else(|e| die(format!("--key: {e}")));
                builder
                    .with_client_auth_cert(chain, key)
                    .unwrap_or_else(|e| die(format!("client certificate: {e}")))
            }
            _ => builder.with_no_client_auth(),
        };
        tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Target {
            uri,
            host,
            port,
            tls: Arc::new(tls),
        }
    }

    async fn connect(&self) -> std::io::Result<Tls> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(self.host.clone()).map_err(std::io::Error::other)?;
        tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
    }

    fn path(&self) -> &str {
        self.uri.path_and_query().map_or("/", |p| p.as_str())
    }

    fn request(&self, http2: bool, headers: &[(HeaderName, HeaderValue)]) -> Request<Empty<Bytes>> {
        let mut req = Request::new(Empty::new());
        *req.uri_mut() = if http2 {
            self.uri.clone()
        } else {
            self.path().parse().expect("a path")
        };
        if !http2 {
            req.headers_mut().insert(
                http::header::HOST,
                HeaderValue::from_str(&format!("{}:{}", self.host, self.port)).expect("host"),
            );
        }
        for (k, v) in headers {
            req.headers_mut().append(k.clone(), v.clone());
        }
        req
    }
}

/// One connection's request sender, HTTP/2 or HTTP/1.1.
enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    async fn open(t: &Target, http2: bool) -> Result<Sender, String> {
        let io = TokioIo::new(t.connect().await.map_err(|e| e.to_string())?);
        if http2 {
            let (s, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(1 << 20)
                .handshake(io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Ok(Sender::H2(s))
        } else {
            let (s, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Ok(Sender::H1(s))
        }
    }

    async fn send(
        &mut self,
        req: Request<Empty<Bytes>>,
    ) -> hyper::Result<http::Response<hyper::body::Incoming>> {
        match self {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }
}

fn main() {
    let a = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| die(format!("runtime: {e}")));
    let out = rt.block_on(async {
        match a.sub.as_str() {
            "load" => load(&a).await,
            "watches" => watches(&a).await,
            "exec" => exec(&a).await,
            "wait-ready" => wait_ready(&a).await,
            other => die(format!("unknown subcommand {other:?}")),
        }
    });
    println!("{out}");
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)]) / 1000.0
}

async fn load(a: &Args) -> serde_json::Value {
    let http2 = !a.has("http1");
    let t = Arc::new(Target::new(
        a,
        if http2 { &[b"h2"] } else { &[b"http/1.1"] },
    ));
    let tokens: Arc<Vec<HeaderValue>> = Arc::new(match a.one.get("tokens") {
        Some(f) => std::fs::read_to_string(f)
            .unwrap_or_else(|e| die(format!("--tokens: {e}")))
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                HeaderValue::from_str(&format!("Bearer {}", l.trim()))
                    .unwrap_or_else(|_| die("a token is not a header value".into()))
            })
            .collect(),
        None => Vec::new(),
    });
    let headers = Arc::new(a.request_headers());
    let concurrency = a.num("concurrency", 32) as usize;
    let duration = Duration::from_secs_f64(a.num("duration", 5) as f64);
    let max = a.num("max-requests", u64::MAX) as usize;
    let next = Arc::new(AtomicUsize::new(0));
    let issued = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for _ in 0..concurrency {
        senders.push(
            Sender::open(&t, http2)
                .await
                .unwrap_or_else(|e| die(format!("connect: {e}"))),
        );
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for mut s in senders {
        let (t, tokens, headers, next, issued, stop) = (
            t.clone(),
            tokens.clone(),
            headers.clone(),
            next.clone(),
            issued.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<u32> = Vec::new();
            let mut codes: BTreeMap<u16, u64> = BTreeMap::new();
            let mut errors = 0u64;
            while !stop.load(Ordering::Relaxed) && issued.fetch_add(1, Ordering::Relaxed) < max {
                let mut req = t.request(http2, &headers);
                if !tokens.is_empty() {
                    let i = next.fetch_add(1, Ordering::Relaxed) % tokens.len();
                    req.headers_mut()
                        .insert(http::header::AUTHORIZATION, tokens[i].clone());
                }
                let t0 = Instant::now();
                match s.send(req).await {
                    Ok(resp) => {
                        let code = resp.status().as_u16();
                        if resp.into_body().collect().await.is_err() {
                            errors += 1;
                        }
                        lat.push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX));
                        *codes.entry(code).or_default() += 1;
                    }
                    Err(_) => {
                        errors += 1;
                        match Sender::open(&t, http2).await {
                            Ok(n) => s = n,
                            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                }
            }
            (lat, codes, errors)
        }));
    }
    let stopper = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            stop.store(true, Ordering::Relaxed);
        })
    };
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap_or_default());
    }
    let elapsed = start.elapsed().as_secs_f64();
    stopper.abort();
    let mut lat = Vec::new();
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors = 0;
    for (l, c, e) in results {
        lat.extend(l);
        for (k, v) in c {
            *codes.entry(k.to_string()).or_default() += v;
        }
        errors += e;
    }
    lat.sort_unstable();
    json!({
        "requests": lat.len(),
        "rps": lat.len() as f64 / elapsed,
        "p50_ms": percentile(&lat, 0.50),
        "p99_ms": percentile(&lat, 0.99),
        "p999_ms": percentile(&lat, 0.999),
        "status": codes,
        "errors": errors,
    })
}

async fn watches(a: &Args) -> serde_json::Value {
    let t = Arc::new(Target::new(a, &[b"h2"]));
    let headers = a.request_headers();
    let count = a.num("count", 10_000) as usize;
    let per_conn = a.num("per-conn", 200).max(1) as usize;
    let hold = Duration::from_secs(a.num("hold", 60));
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(a.num("timeout", 120));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut failed = 0usize;
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
    let mut conns = Vec::new();
    let mut opened = 0;
    while opened < count {
        let n = per_conn.min(count - opened);
        let s = match Sender::open(&t, true).await {
            Ok(Sender::H2(s)) => s,
            Ok(Sender::H1(_)) => unreachable!("asked for HTTP/2"),
            Err(e) => die(format!("connect: {e}")),
        };
        let mut pending = Vec::with_capacity(n);
        for _ in 0..n {
            let mut s = s.clone();
            let req = t.request(true, &headers);
            pending.push(tokio::spawn(async move {
                s.ready().await?;
                s.send_request(req).await
            }));
        }
        for p in pending {
            match tokio::time::timeout_at(deadline, p).await {
                Ok(Ok(Ok(resp))) => {
                    *codes.entry(resp.status().as_u16().to_string()).or_default() += 1;
                    if resp.status().is_success() {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed += 1;
                    }
                    // Drain events so flow control never stalls the stream.
                    let mut body = resp.into_body();
                    // Stop at the first error: a reset stream keeps answering with it.
                    tokio::spawn(async move { while let Some(Ok(_)) = body.frame().await {} });
                }
                _ => failed += 1,
            }
        }
        conns.push(s);
        opened += n;
    }
    let line = json!({
        "watches": ok.load(Ordering::Relaxed),
        "failed": failed,
        "connections": conns.len(),
        "status": codes,
        "open_secs": start.elapsed().as_secs_f64(),
    });
    println!("{line}");
    // Hold until stdin closes (the script is done measuring) or `hold` passes.
    let stdin_closed = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    });
    tokio::select! {
        _ = stdin_closed => {}
        _ = tokio::time::sleep(hold) => {}
    }
    json!({"closed": true})
}

async fn exec(a: &Args) -> serde_json::Value {
    let t = Target::new(a, &[b"http/1.1"]);
    let total = a.num("mb", 64) as usize * 1024 * 1024;
    let chunk = a.num("chunk", 32 * 1024) as usize;
    let tls = t
        .connect()
        .await
        .unwrap_or_else(|e| die(format!("connect: {e}")));
    let mut req = http::Request::builder()
        .uri(format!("wss://{}:{}{}", t.host, t.port, t.path()))
        .header("host", format!("{}:{}", t.host, t.port))
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
    for (k, v) in a.request_headers() {
        req.headers_mut().append(k, v);
    }
    let (ws, resp) = tokio_tungstenite::client_async(req, tls)
        .await
        .unwrap_or_else(|e| die(format!("websocket handshake: {e}")));
    if resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        die(format!("exec: {}", resp.status()));
    }
    let (mut tx, mut rx) = ws.split();
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let mut payload = vec![0u8; chunk + 1];
        for (i, b) in payload.iter_mut().enumerate().skip(1) {
            *b = (i % 251) as u8;
        }
        let payload = Bytes::from(payload);
        let mut sent = 0;
        while sent < total {
            let n = chunk.min(total - sent);
            if tx
                .send(Message::Binary(payload.slice(..n + 1)))
                .await
                .is_err()
            {
                break;
            }
            sent += n;
        }
        // v5: close stdin.
        let _ = tx
            .send(Message::Binary(Bytes::from_static(&[255, 0])))
            .await;
        tx
    });
    let mut received = 0usize;
    while received < total {
        match rx.next().await {
            Some(Ok(Message::Binary(b))) if b.first() == Some(&1) => received += b.len() - 1,
            Some(Ok(_)) => {}
            _ => break,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if let Ok(mut tx) = writer.await {
        let _ = tx.close().await;
    }
    json!({
        "bytes": received,
        "complete": received >= total,
        "secs": secs,
        "mb_per_s": received as f64 / 1_048_576.0 / secs,
    })
}

async fn wait_ready(a: &Args) -> serde_json::Value {
    let t = Target::new(a, &[b"http/1.1"]);
    let since_ns: u128 = a
        .get("since-ns")
        .parse()
        .unwrap_or_else(|_| die("--since-ns: not a number".into()));
    let deadline = Instant::now() + Duration::from_secs(a.num("timeout", 30));
    loop {
        if let Ok(mut s) = Sender::open(&t, false).await {
            if let Ok(resp) = s.send(t.request(false, &[])).await {
                if resp.status() == http::StatusCode::OK {
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_nanos())
                        .unwrap_or(0);
                    let ms = now.saturating_sub(since_ns) as f64 / 1e6;
                    return json!({ "ready_ms": ms });
                }
            }
        }
        if Instant::now() > deadline {
            die("not ready before the timeout".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
