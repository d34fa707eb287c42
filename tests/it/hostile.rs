//! Hostile clients: request smuggling, oversized headers and bodies, slowloris, HTTP/2 floods,
//! stalled TLS handshakes, absurd paths, header names a later hop could misread and identity
//! names that spoof another in logs. Each test talks to the gateway the way an attacker
//! would (raw HTTP/1.1 bytes or raw HTTP/2 frames over real TLS) and then checks two things:
//! what the attacker saw, and what reached the stand-in kube-apiserver — never a request under
//! an identity the attacker does not have, never a path other than the one that was authorized.

use crate::support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Mutex};
use tokio_rustls::client::TlsStream;
use ztgate::demo::{DevEnv, DevSettings};
use ztgate::gateway::RunningGateway;
use ztgate_testkit::{ApiServer, ApiServerOptions, CertKey, RecordedRequest, TestPki};

const PODS: &str = "/api/v1/namespaces/team-a/pods";

/// The settings the hostile tests vary; everything else is the dev config.
struct Knobs {
    header_read: &'static str,
    tls_handshake: &'static str,
    idle_connection: &'static str,
    max_header_bytes: u64,
    max_concurrent_streams: u32,
    max_body: u64,
    policies: bool,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            header_read: "2s",
            tls_handshake: "2s",
            idle_connection: "90s",
            max_header_bytes: 16 * 1024,
            max_concurrent_streams: 16,
            max_body: 64 * 1024,
            policies: false,
        }
    }
}

/// A gateway in front of the stand-in, started from a dev config with `Knobs` applied.
struct Gw {
    apiserver: ApiServer,
    gateway: RunningGateway,
    env: DevEnv,
    alice: CertKey,
    _dir: TempDir,
}

impl Gw {
    async fn start(k: Knobs) -> Gw {
        support::init_logs();
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::new();
        let apiserver = ApiServer::start(ApiServerOptions::new(&pki)).await.unwrap();
        let mut settings = DevSettings {
            max_request_body_bytes: k.max_body,
            ..Default::default()
        };
        if k.policies {
            let p: PathBuf = dir.path().join("policies.cedar");
            std::fs::write(&p, ztgate::demo::DEMO_POLICIES).unwrap();
            settings.policies.push(p);
        }
        let env = DevEnv::create(dir.path(), pki, &apiserver.url(), &settings).unwrap();
        let text = std::fs::read_to_string(&env.config_path).unwrap();
        let text = text
            .replacen(
                "timeouts:\n",
                &format!(
                    "timeouts:\n  headerRead: {}\n  tlsHandshake: {}\n  idleConnection: {}\n",
                    k.header_read, k.tls_handshake, k.idle_connection
                ),
                1,
            )
            .replacen(
                "limits:\n",
                &format!(
                    "limits:\n  maxHeaderBytes: {}\n  maxConcurrentStreams: {}\n",
                    k.max_header_bytes, k.max_concurrent_streams
                ),
                1,
            );
        std::fs::write(&env.config_path, text).unwrap();
        let cfg = ztgate::config::load_file(&env.config_path).expect("config loads");
        let gateway = ztgate::gateway::start(cfg).await.expect("gateway starts");
        support::wait_until(Duration::from_secs(10), "the gateway is ready", || {
            gateway.gateway.is_ready()
        })
        .await;
        let alice = env.pki.user("alice", &["team-a"]);
        Gw {
            apiserver,
            gateway,
            env,
            alice,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.gateway.addr.port())
    }

    /// A well-behaved client (hyper) presenting alice's certificate.
    fn client(&self, http2: bool) -> support::RawClient {
        support::raw_client(
            &self.env.pki.gateway_ca.cert_pem(),
            Some(&self.alice),
            http2,
        )
    }

    /// A TLS connection offering only `alpn`, with alice's certificate.
    async fn tls(&self, alpn: &[u8]) -> TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.gateway.addr).await.unwrap();
        self.tls_over(tcp, alpn).await
    }

    async fn tls_over(&self, tcp: TcpStream, alpn: &[u8]) -> TlsStream<TcpStream> {
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        tokio_rustls::TlsConnector::from(Arc::new(self.tls_config(alpn)))
            .connect(name, tcp)
            .await
            .expect("TLS handshake")
    }

    /// The first flight of a real TLS client (its ClientHello).
    fn client_hello(&self) -> Vec<u8> {
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let mut conn =
            rustls::ClientConnection::new(Arc::new(self.tls_config(b"h2")), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    fn tls_config(&self, alpn: &[u8]) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.env.pki.gateway_ca.cert_pem().as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(self.alice.cert_pem.as_bytes())
                .map(|c| c.unwrap())
                .collect();
        let key = PrivateKeyDer::from_pem_slice(self.alice.key_pem.as_bytes()).unwrap();
        let mut cfg = rustls::ClientConfig::builder_with_provider(ztgate::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        cfg.alpn_protocols = vec![alpn.to_vec()];
        cfg
    }

    /// What reached the stand-in through the gateway (the gateway's own readiness probes
    /// left out).
    fn seen(&self) -> Vec<RecordedRequest> {
        self.apiserver
            .requests()
            .into_iter()
            .filter(|r| r.path != "/readyz")
            .collect()
    }

    /// Waits until the stand-in has recorded nothing new for 300 ms. (Quiet is the absence of
    /// an event, so this one waits for a time: there is no condition to poll.)
    async fn upstream_quiet(&self) {
        let mut n = self.apiserver.requests().len();
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = self.apiserver.requests().len();
            if now == n {
                return;
            }
            n = now;
        }
        panic!("the stand-in kept receiving requests for 9 s");
    }

    /// Is the gateway still serving ordinary clients? (A fresh connection, a plain list.)
    async fn serves_others(&self) -> bool {
        for http2 in [false, true] {
            let client = self.client(http2);
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                client.request(support::get(&self.url(PODS))),
            )
            .await;
            match r {
                Ok(Ok(resp)) if resp.status() == 200 => {}
                _ => return false,
            }
        }
        true
    }

    /// Waits until the gateway holds no request and no stream (nothing leaked by an attack).
    async fn settles(&self) -> bool {
        for _ in 0..100 {
            let gw = &self.gateway.gateway;
            if gw.inflight.count() == 0 && gw.streams.count() == 0 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}

/// Every request that reached the stand-in was made as alice (through the gateway's
/// impersonation), and carries no identity the client tried to smuggle.
fn only_alice_reached(seen: &[RecordedRequest], what: &str) {
    for r in seen {
        assert_eq!(
            r.header_values("impersonate-user"),
            ["alice"],
            "{what}: {} {} reached the stand-in as {:?}",
            r.method,
            r.path,
            r.header_values("impersonate-user")
        );
        // None: the stand-in never got to act on it (its body was cut off first).
        assert!(
            r.effective_user
                .as_ref()
                .is_none_or(|u| u.username == "alice"),
            "{what}: acted on as {:?}",
            r.effective_user
        );
        for (k, v) in &r.headers {
            assert!(
                !v.contains("admin") && !v.contains("system:masters"),
                "{what}: stand-in saw {k}: {v}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1

/// Writes `bytes` and reads what comes back until the server closes or stays silent for
/// `quiet`. Returns the text read and whether the server closed the connection.
async fn h1_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    bytes: &[u8],
    quiet: Duration,
) -> (String, bool) {
    let _ = s.write_all(bytes).await;
    let _ = s.flush().await;
    read_until_quiet(s, quiet).await
}

async fn read_until_quiet<S: AsyncRead + Unpin>(s: &mut S, quiet: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(quiet, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into(), false),
        }
    }
}

/// Status codes of every HTTP/1.1 response in `text`, in order.
fn statuses(text: &str) -> Vec<u16> {
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

/// What a smuggling attempt may lead to.
enum Expect {
    /// Refused with one of these codes; nothing reaches the stand-in.
    Refused(&'static [u16]),
    /// Answered with one of these codes; the head may have reached the stand-in (as alice),
    /// never a complete request.
    Aborted(&'static [u16]),
    /// Transfer-Encoding wins: forwarded once, re-framed, and the connection closed.
    ForwardedOnce,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_smuggling_is_refused_and_nothing_rides_along() {
    let h = Gw::start(Knobs::default()).await;
    let smuggled = "GET /api/v1/namespaces/kube-system/secrets HTTP/1.1\r\nHost: x\r\nImpersonate-User: admin\r\nImpersonate-Group: system:masters\r\n\r\n";
    let post = |headers: &str, body: &str| {
        format!("POST {PODS} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}\r\n{body}")
    };
    //
    // With both Content-Length and Transfer-Encoding, RFC 9112 section 6.3 lets a server either
    // refuse or go by Transfer-Encoding, drop Content-Length and close the connection after
    // answering; hyper does the latter. Either way the bytes after the chunked body are never
    // read as a request.
    let cases: Vec<(&str, String, Expect)> = vec![
        (
            "Content-Length and Transfer-Encoding (CL.TE)",
            post(
                "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n",
                &format!("0\r\n\r\n{smuggled}"),
            ),
            Expect::ForwardedOnce,
        ),
        (
            "Transfer-Encoding and Content-Length (TE.CL)",
            post(
                "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
                &format!("{:x}\r\n{smuggled}\r\n0\r\n\r\n", smuggled.len()),
            ),
            Expect::ForwardedOnce,
        ),
        (
            "conflicting Content-Length headers",
            post(
                "Content-Length: 2\r\nContent-Length: 60\r\n",
                &format!("{{}}{smuggled}"),
            ),
            Expect::Refused(&[400]),
        ),
        (
            "conflicting values in one Content-Length",
            post("Content-Length: 2, 60\r\n", &format!("{{}}{smuggled}")),
            Expect::Refused(&[400]),
        ),
        (
            "obs-fold continuation line carrying an identity header",
            format!("GET {PODS} HTTP/1.1\r\nHost: x\r\nX-Note: a\r\n Impersonate-User: admin\r\n\r\n"),
            Expect::Refused(&[400]),
        ),
        (
            "space before the colon of Transfer-Encoding",
            post(
                "Content-Length: 6\r\nTransfer-Encoding : chunked\r\n",
                &format!("0\r\n\r\n{smuggled}"),
            ),
            Expect::Refused(&[400]),
        ),
        (
            "Transfer-Encoding that does not end in chunked",
            post(
                "Transfer-Encoding: chunked, identity\r\n",
                &format!("0\r\n\r\n{smuggled}"),
            ),
            Expect::Refused(&[400]),
        ),
        (
            "obfuscated Transfer-Encoding value",
            post(
                "Content-Length: 6\r\nTransfer-Encoding: xchunked\r\n",
                &format!("0\r\n\r\n{smuggled}"),
            ),
            Expect::Refused(&[400]),
        ),
        (
            "chunk size that overflows",
            post(
                "Transfer-Encoding: chunked\r\n",
                &format!("fffffffffffffffff1\r\n{{}}\r\n0\r\n\r\n{smuggled}"),
            ),
            // The head may already be on its way upstream when the body turns out broken.
            Expect::Aborted(&[400, 413]),
        ),
        (
            "NUL in a header value",
            format!("GET {PODS} HTTP/1.1\r\nHost: x\r\nX-Note: a\0b\r\n\r\n{smuggled}"),
            Expect::Refused(&[400]),
        ),
        (
            "HTTP/1.0 with Transfer-Encoding",
            format!(
                "POST {PODS} HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
            Expect::Refused(&[400]),
        ),
    ];
    for (what, bytes, expect) in cases {
        assert!(
            h.settles().await,
            "{what}: the previous case is still in flight"
        );
        // An aborted upstream request is recorded by the stand-in when it gives up on it.
        h.upstream_quiet().await;
        h.apiserver.clear_requests();
        let mut tls = h.tls(b"http/1.1").await;
        let (text, closed) =
            h1_exchange(&mut tls, bytes.as_bytes(), Duration::from_millis(1500)).await;
        let codes = statuses(&text);
        // One answer, then the connection is closed: the smuggled request never runs.
        assert_eq!(codes.len(), 1, "{what}: answered {codes:?}:\n{text}");
        assert!(
            closed,
            "{what}: the connection stays open after a framing problem"
        );
        assert!(h.settles().await, "{what}: left a request in flight");
        let seen = h.seen();
        only_alice_reached(&seen, what);
        match expect {
            Expect::ForwardedOnce => {
                assert_eq!(seen.len(), 1, "{what}: {seen:?}");
                assert_eq!(seen[0].path, PODS, "{what}");
                assert!(
                    seen[0].header_values("content-length").is_empty(),
                    "{what}: forwarded with the client's Content-Length"
                );
            }
            Expect::Refused(want) | Expect::Aborted(want) => {
                assert!(
                    want.contains(&codes[0]),
                    "{what}: answered {codes:?}, want one of {want:?}:\n{text}"
                );
                if matches!(expect, Expect::Refused(_)) {
                    assert!(seen.is_empty(), "{what}: reached the stand-in: {seen:?}");
                }
                assert!(
                    seen.iter()
                        .all(|r| r.path == PODS && !(200..300).contains(&r.status)),
                    "{what}: {seen:?}"
                );
            }
        }
    }
    assert!(h.serves_others().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_each_carry_only_the_connection_identity() {
    let h = Gw::start(Knobs::default()).await;
    let mut tls = h.tls(b"http/1.1").await;
    // A well-framed body that happens to look like a request, then a real second request.
    let body =
        "GET /api/v1/namespaces/kube-system/secrets HTTP/1.1\r\nImpersonate-User: admin\r\n\r\n";
    let bytes = format!(
        "POST {PODS} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}GET {PODS} HTTP/1.1\r\nHost: x\r\n\r\n",
        body.len()
    );
    let (text, _) = h1_exchange(&mut tls, bytes.as_bytes(), Duration::from_millis(1500)).await;
    assert_eq!(statuses(&text).len(), 2, "{text}");
    let seen = h.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.iter().all(|r| r.path == PODS), "{seen:?}");
    only_alice_reached(&seen, "pipelined");
}

/// How far the peak resident memory may rise while an attack runs: well above what the
/// gateway's limits let it buffer, far below what the attacks offer (256 MiB each).
const MAX_GROWTH_KIB: u64 = 64 * 1024;

/// One phase's peak resident memory in this process (the gateway and the stand-in run in it).
/// The kernel's high-water mark is reset when the phase starts, so a peak from before it (the
/// test's setup, or another test in the same process) cannot hide growth within it.
struct PeakRss {
    start_kib: u64,
    // The mark is process-wide: one phase at a time.
    _one: tokio::sync::MutexGuard<'static, ()>,
}

static PEAK_RSS: Mutex<()> = Mutex::const_new(());

impl PeakRss {
    async fn start() -> PeakRss {
        let one = PEAK_RSS.lock().await;
        Self::reset(one)
    }

    fn start_blocking() -> PeakRss {
        Self::reset(PEAK_RSS.blocking_lock())
    }

    fn reset(one: tokio::sync::MutexGuard<'static, ()>) -> PeakRss {
        // "5" resets VmHWM to the present resident size (proc(5), clear_refs).
        std::fs::write("/proc/self/clear_refs", "5").expect("/proc/self/clear_refs is writable");
        PeakRss {
            start_kib: proc_status_kib("VmRSS:"),
            _one: one,
        }
    }

    /// How far the peak rose above the resident size at the start.
    fn grew_kib(&self) -> u64 {
        proc_status_kib("VmHWM:").saturating_sub(self.start_kib)
    }
}

fn proc_status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status:\n{status}"))
}

/// The memory checks below can fail: growth within a phase is seen even when an earlier peak
/// was higher, and growth as large as the bound fails it.
#[test]
fn the_peak_rss_check_sees_growth_below_an_earlier_peak() {
    let touched = |mib: usize| std::hint::black_box(vec![1u8; mib << 20]);
    drop(touched(192));
    let peak = PeakRss::start_blocking();
    let grown = touched(96);
    let grew = peak.grew_kib();
    drop(grown);
    eprintln!("96 MiB allocated after a 192 MiB peak: the check saw {grew} KiB");
    assert!(grew >= 90 * 1024, "saw {grew} KiB of 96 MiB");
    assert!(grew >= MAX_GROWTH_KIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431_and_are_not_buffered() {
    let h = Gw::start(Knobs::default()).await;
    assert!(h.serves_others().await);
    h.apiserver.clear_requests();
    let peak = PeakRss::start().await;

    // One huge header, and many small ones, over HTTP/1.1.
    let huge = format!(
        "GET {PODS} HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let mut many = format!("GET {PODS} HTTP/1.1\r\nHost: x\r\n");
    for i in 0..400 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    for (what, bytes) in [("one 64 KiB header", huge), ("400 headers", many)] {
        let mut tls = h.tls(b"http/1.1").await;
        let (text, closed) = h1_exchange(&mut tls, bytes.as_bytes(), Duration::from_secs(3)).await;
        assert_eq!(statuses(&text), [431], "{what}:\n{text}");
        assert!(closed, "{what}: the connection stays open");
    }

    // A client that keeps sending header bytes is cut off once it passes the limit: 32
    // clients each try to send 8 MiB of headers.
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let mut tls = h.tls(b"http/1.1").await;
        tasks.push(tokio::spawn(async move {
            let _ = tls
                .write_all(format!("GET {PODS} HTTP/1.1\r\nHost: x\r\nX-Big: ").as_bytes())
                .await;
            let chunk = vec![b'a'; 64 * 1024];
            let mut sent = 0usize;
            while sent < 8 * 1024 * 1024 {
                if tls.write_all(&chunk).await.is_err() {
                    break;
                }
                sent += chunk.len();
            }
            let (text, _) = read_until_quiet(&mut tls, Duration::from_secs(2)).await;
            (sent, text)
        }));
    }
    for t in tasks {
        let (sent, text) = t.await.unwrap();
        assert!(sent < 8 * 1024 * 1024, "the gateway read 8 MiB of headers");
        assert!(text.is_empty() || statuses(&text) == [431], "{text}");
    }

    // Over HTTP/2 (the header list limit is advertised in SETTINGS).
    let client = h.client(true);
    let req = http::Request::get(h.url(PODS))
        .header("x-big", "a".repeat(64 * 1024))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("an answer within 10s")
    {
        Ok(resp) => assert_eq!(resp.status(), 431),
        // h2 may refuse to even send what the server said it would not take.
        Err(e) => tracing::info!(error = %e, "client refused to send the oversized header list"),
    }

    let grew = peak.grew_kib();
    drop(peak);
    eprintln!("peak memory grew by {grew} KiB while 256 MiB of headers were offered");
    assert!(
        grew < MAX_GROWTH_KIB,
        "peak memory grew by {grew} KiB while 256 MiB of headers were offered"
    );
    assert!(h.seen().is_empty());
    assert!(h.serves_others().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413_and_are_not_buffered() {
    let h = Gw::start(Knobs::default()).await; // 64 KiB body limit
    assert!(h.serves_others().await);
    h.apiserver.clear_requests();
    let peak = PeakRss::start().await;

    // Declared too large: refused before a byte of it is read, and never forwarded.
    let mut tls = h.tls(b"http/1.1").await;
    let (text, _) = h1_exchange(
        &mut tls,
        format!("POST {PODS} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n{{").as_bytes(),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(statuses(&text), [413], "{text}");
    assert!(text.contains("RequestEntityTooLarge"), "{text}");
    assert!(h.seen().is_empty());

    // Chunked, growing past the limit: 16 clients each try to stream 16 MiB.
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut tls = h.tls(b"http/1.1").await;
        tasks.push(tokio::spawn(async move {
            let head = format!(
                "POST {PODS} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            );
            let _ = tls.write_all(head.as_bytes()).await;
            let chunk = format!("10000\r\n{}\r\n", " ".repeat(0x10000));
            let mut sent = 0usize;
            while sent < 16 * 1024 * 1024 {
                if tls.write_all(chunk.as_bytes()).await.is_err() {
                    break;
                }
                sent += 0x10000;
            }
            let (text, _) = read_until_quiet(&mut tls, Duration::from_secs(2)).await;
            (sent, text)
        }));
    }
    for t in tasks {
        let (_, text) = t.await.unwrap();
        assert!(
            text.is_empty() || statuses(&text) == [413],
            "a chunked body over the limit: {text}"
        );
    }
    // The stand-in may have seen the start of a streamed body (it is forwarded as it comes),
    // never a completed one, and only as alice.
    let seen = h.seen();
    only_alice_reached(&seen, "oversized chunked body");
    assert!(seen.iter().all(|r| r.status != 201), "{seen:?}");

    let grew = peak.grew_kib();
    drop(peak);
    eprintln!("peak memory grew by {grew} KiB while 256 MiB of body were offered");
    assert!(
        grew < MAX_GROWTH_KIB,
        "peak memory grew by {grew} KiB while 256 MiB of body were offered"
    );
    assert!(h.settles().await, "requests left in flight");
    assert!(h.serves_others().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_by_the_header_read_timeout() {
    let h = Gw::start(Knobs {
        header_read: "1s",
        ..Default::default()
    })
    .await;

    // Trickles a header byte every 200 ms: never finishes the request head. (The sleep is the
    // attack's pace.)
    let mut trickle = h.tls(b"http/1.1").await;
    trickle
        .write_all(format!("GET {PODS} HTTP/1.1\r\nHost: x\r\nX-Slow: ").as_bytes())
        .await
        .unwrap();
    let trickler = tokio::spawn(async move {
        for _ in 0..100 {
            if trickle.write_all(b"a").await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut b = [0u8; 256];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(1), trickle.read(&mut b)).await
            {
                return true;
            }
        }
        false
    });

    // Connects, finishes TLS, sends nothing.
    let mut silent = h.tls(b"http/1.1").await;
    let (_, closed) = read_until_quiet(&mut silent, Duration::from_secs(10)).await;
    assert!(closed, "a silent HTTP/1.1 connection stays open");

    // Completes one request, then idles on the keep-alive connection.
    let mut idle = h.tls(b"http/1.1").await;
    let (text, _) = h1_exchange(
        &mut idle,
        format!("GET {PODS} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(statuses(&text), [200]);
    let (_, closed) = read_until_quiet(&mut idle, Duration::from_secs(10)).await;
    assert!(closed, "an idle keep-alive connection stays open");

    assert!(
        tokio::time::timeout(Duration::from_secs(15), trickler)
            .await
            .expect("the trickling connection was closed within 15s")
            .unwrap(),
        "the trickling connection stayed open for 20s"
    );
    assert!(h.seen().len() == 1);
    assert!(h.serves_others().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshakes_that_never_finish_are_closed_and_do_not_starve_others() {
    let h = Gw::start(Knobs {
        tls_handshake: "1s",
        ..Default::default()
    })
    .await;
    // 200 connections that stall: half send nothing, half send the start of a ClientHello.
    let mut stalled = Vec::new();
    for i in 0..200 {
        let mut tcp = TcpStream::connect(h.gateway.addr).await.unwrap();
        if i % 2 == 1 {
            // A TLS record header announcing 512 bytes of handshake, and 5 of them.
            tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03])
                .await
                .unwrap();
        }
        stalled.push(tcp);
    }
    // Others are served while they stall.
    assert!(h.serves_others().await);
    // Each stalled connection is closed by the handshake timeout.
    let closes = stalled.into_iter().map(|mut tcp| async move {
        let mut b = [0u8; 64];
        loop {
            match tcp.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    });
    tokio::time::timeout(
        Duration::from_secs(15),
        futures_util::future::join_all(closes),
    )
    .await
    .expect("every stalled handshake was closed within 15s");

    // A handshake that stalls half-way through: a real ClientHello, then no answer to the
    // server's flight.
    let mut tcp = TcpStream::connect(h.gateway.addr).await.unwrap();
    tcp.write_all(&h.client_hello()).await.unwrap();
    let (mut r, _w) = tcp.into_split();
    let mut b = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match r.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a half-done handshake stayed open for 15s");
    assert!(h.serves_others().await);
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/2: just enough of RFC 9113 to misbehave.

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PROTOCOL_ERROR: u32 = 0x1;
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;

#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            RST_STREAM => 0,
            GOAWAY => 4,
            _ => return None,
        };
        let b = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

type Writer = Arc<Mutex<tokio::io::WriteHalf<TlsStream<TcpStream>>>>;

/// A raw HTTP/2 connection: frames are written as given; received frames arrive on `frames`
/// (SETTINGS and PING are acknowledged automatically). The channel closes with the connection.
struct H2 {
    w: Writer,
    frames: mpsc::UnboundedReceiver<Frame>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for H2 {
    fn drop(&mut self) {
        // Dropping the reader drops the read half; with the write half gone too, the socket
        // closes.
        self.reader.abort();
    }
}

fn frame_bytes(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut b = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    b.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// HPACK: an integer with an `n`-bit prefix.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// HPACK header block of literal fields without indexing (no Huffman, no table).
fn hpack(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        hpack_int(&mut out, 0, 7, name.len());
        out.extend_from_slice(name.as_bytes());
        hpack_int(&mut out, 0, 7, value.len());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

fn get_block(path: &str) -> Vec<u8> {
    hpack(&[
        (":method", "GET"),
        (":scheme", "https"),
        (":path", path),
        (":authority", "127.0.0.1"),
    ])
}

impl H2 {
    async fn connect(h: &Gw) -> H2 {
        let tls = h.tls(b"h2").await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut r, mut w) = tokio::io::split(tls);
        w.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        w.write_all(&frame_bytes(SETTINGS, 0, 0, &[]))
            .await
            .unwrap();
        let w: Writer = Arc::new(Mutex::new(w));
        let (tx, frames) = mpsc::unbounded_channel();
        let ack = w.clone();
        let reader = tokio::spawn(async move {
            loop {
                let mut head = [0u8; 9];
                if r.read_exact(&mut head).await.is_err() {
                    return;
                }
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let mut payload = vec![0u8; len];
                if r.read_exact(&mut payload).await.is_err() {
                    return;
                }
                let f = Frame {
                    kind: head[3],
                    flags: head[4],
                    stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
                    payload,
                };
                let reply = match (f.kind, f.flags & 1) {
                    (SETTINGS, 0) => Some(frame_bytes(SETTINGS, 1, 0, &[])),
                    (PING, 0) => Some(frame_bytes(PING, 1, 0, &f.payload)),
                    _ => None,
                };
                if let Some(reply) = reply {
                    let _ = ack.lock().await.write_all(&reply).await;
                }
                if tx.send(f).is_err() {
                    return;
                }
            }
        });
        H2 { w, frames, reader }
    }

    async fn send(&self, bytes: &[u8]) -> bool {
        self.w.lock().await.write_all(bytes).await.is_ok()
    }

    /// The server's SETTINGS value for `id`, from its first SETTINGS frame.
    async fn server_setting(&mut self, id: u16) -> Option<u32> {
        loop {
            let f = tokio::time::timeout(Duration::from_secs(5), self.frames.recv())
                .await
                .ok()??;
            if f.kind == SETTINGS && f.flags & 1 == 0 {
                return f.payload.chunks(6).find_map(|c| {
                    (u16::from_be_bytes([c[0], c[1]]) == id)
                        .then(|| u32::from_be_bytes([c[2], c[3], c[4], c[5]]))
                });
            }
        }
    }

    /// Collects frames until the connection closes or `quiet` passes without one.
    async fn drain(&mut self, quiet: Duration) -> (Vec<Frame>, bool) {
        let mut got = Vec::new();
        loop {
            match tokio::time::timeout(quiet, self.frames.recv()).await {
                Ok(Some(f)) => got.push(f),
                Ok(None) => return (got, true),
                Err(_) => return (got, false),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_the_concurrent_limit_are_refused() {
    let h = Gw::start(Knobs {
        max_concurrent_streams: 8,
        ..Default::default()
    })
    .await;
    let mut c = H2::connect(&h).await;
    assert_eq!(
        c.server_setting(0x3).await,
        Some(8),
        "SETTINGS_MAX_CONCURRENT_STREAMS"
    );
    // Eight watches hold eight streams open; then a client that ignores the limit opens
    // eight more at once.
    let watch = get_block(&format!("{PODS}?watch=1"));
    let mut bytes = Vec::new();
    for i in 0..16u32 {
        bytes.extend(frame_bytes(
            HEADERS,
            END_STREAM | END_HEADERS,
            1 + 2 * i,
            &watch,
        ));
    }
    assert!(c.send(&bytes).await);
    let (frames, _) = c.drain(Duration::from_secs(2)).await;
    let refused: Vec<u32> = frames
        .iter()
        .filter(|f| f.kind == RST_STREAM && f.error_code() == Some(REFUSED_STREAM))
        .map(|f| f.stream)
        .collect();
    let mut answered: Vec<u32> = frames
        .iter()
        .filter(|f| f.kind == HEADERS)
        .map(|f| f.stream)
        .collect();
    answered.sort();
    assert_eq!(answered, (0..8).map(|i| 1 + 2 * i).collect::<Vec<_>>());
    assert_eq!(refused, (8..16).map(|i| 1 + 2 * i).collect::<Vec<_>>());
    let watches = h.seen();
    assert_eq!(
        watches.len(),
        8,
        "only the streams within the limit reached the stand-in"
    );
    only_alice_reached(&watches, "concurrent streams");
    assert_eq!(h.gateway.gateway.streams.count(), 8);
    // Other connections are not affected by one connection's limit.
    assert!(h.serves_others().await);
    drop(c);
    assert!(
        h.settles().await,
        "watches of a closed connection stay registered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_rapid_reset_flood_is_cut_off_and_others_stay_served() {
    let h = Gw::start(Knobs::default()).await;
    let mut c = H2::connect(&h).await;
    // HEADERS immediately followed by RST_STREAM, as fast as the connection takes them
    // (CVE-2023-44487). Unary lists and watches alternate.
    let list = get_block(PODS);
    let watch = get_block(&format!("{PODS}?watch=1"));
    let mut sent = 0u32;
    'flood: for batch in 0..100u32 {
        let mut bytes = Vec::new();
        for i in 0..100u32 {
            let id = 1 + 2 * (batch * 100 + i);
            let block = if id % 4 == 1 { &list } else { &watch };
            bytes.extend(frame_bytes(HEADERS, END_STREAM | END_HEADERS, id, block));
            bytes.extend(frame_bytes(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
        }
        if !c.send(&bytes).await {
            break 'flood;
        }
        sent += 100;
    }
    let (frames, closed) = c.drain(Duration::from_secs(5)).await;
    let goaway = frames.iter().find(|f| f.kind == GOAWAY);
    assert!(
        goaway.is_some_and(|g| g.error_code() == Some(ENHANCE_YOUR_CALM)),
        "no GOAWAY(ENHANCE_YOUR_CALM) after {sent} reset streams: {:?}",
        goaway
    );
    assert!(closed, "the flooding connection stays open");
    let reached = h.seen().len();
    tracing::info!(sent, reached, "rapid reset flood");
    assert!(
        (reached as u32) < sent / 10,
        "{reached} of {sent} reset streams reached the stand-in"
    );
    assert!(
        h.settles().await,
        "reset streams leaked requests or streams"
    );
    assert!(h.serves_others().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_the_server_must_reset_cannot_be_used_as_a_flood() {
    // "MadeYouReset" (CVE-2025-8671): frames that make the server reset the stream itself.
    let h = Gw::start(Knobs::default()).await;
    let mut c = H2::connect(&h).await;
    let list = get_block(PODS);
    let mut sent = 0u32;
    for batch in 0..50u32 {
        let mut bytes = Vec::new();
        for i in 0..100u32 {
            let id = 1 + 2 * (batch * 100 + i);
            // A complete request, then DATA on the stream the client already closed: the
            // server must reset it (STREAM_CLOSED).
            bytes.extend(frame_bytes(HEADERS, END_STREAM | END_HEADERS, id, &list));
            bytes.extend(frame_bytes(DATA, 0, id, b"x"));
        }
        if !c.send(&bytes).await {
            break;
        }
        sent += 100;
    }
    let (frames, closed) = c.drain(Duration::from_secs(5)).await;
    // h2 treats DATA on a stream the client closed as a connection error: the first one ends
    // the connection (PROTOCOL_ERROR); past 1024 stream resets it would be ENHANCE_YOUR_CALM.
    let goaway = frames.iter().find(|f| f.kind == GOAWAY);
    assert!(
        goaway.is_some_and(|g| matches!(g.error_code(), Some(PROTOCOL_ERROR | ENHANCE_YOUR_CALM))),
        "no GOAWAY after {sent} server-reset streams: {goaway:?}"
    );
    assert!(closed);
    let reached = h.seen().len();
    assert!(
        reached < 1100,
        "{reached} of {sent} streams reached the stand-in"
    );
    assert!(
        h.settles().await,
        "reset streams leaked requests or streams"
    );
    only_alice_reached(&h.seen(), "server-reset streams");
    assert!(h.serves_others().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connections_without_a_request_are_closed() {
    let h = Gw::start(Knobs {
        header_read: "1s",
        idle_connection: "2s",
        ..Default::default()
    })
    .await;

    // Preface and SETTINGS, then nothing.
    let mut silent = H2::connect(&h).await;
    // Headers started and never finished: HEADERS without END_HEADERS, CONTINUATION trickling.
    let mut slow = H2::connect(&h).await;
    let block = get_block(PODS);
    assert!(
        slow.send(&frame_bytes(HEADERS, END_STREAM, 1, &block))
            .await
    );
    let trickle = {
        let w = slow.w.clone();
        tokio::spawn(async move {
            // A frame every 200 ms (the sleep is the attack's pace).
            for _ in 0..100 {
                let f = frame_bytes(CONTINUATION, 0, 1, &hpack(&[("x-slow", "a")]));
                if w.lock().await.write_all(&f).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    // One request, then idle.
    let mut idle = H2::connect(&h).await;
    assert!(
        idle.send(&frame_bytes(HEADERS, END_STREAM | END_HEADERS, 1, &block))
            .await
    );

    for (what, c) in [
        ("silent", &mut silent),
        ("slow headers", &mut slow),
        ("idle after a request", &mut idle),
    ] {
        let closed = tokio::time::timeout(Duration::from_secs(15), async {
            while c.frames.recv().await.is_some() {}
        })
        .await;
        assert!(
            closed.is_ok(),
            "{what}: HTTP/2 connection still open after 15s"
        );
    }
    trickle.abort();
    let seen = h.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(h.serves_others().await);
}

// ---------------------------------------------------------------------------------------------
// Paths

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_paths_never_reach_the_apiserver_as_something_else() {
    // Policy: alice (group team-a) may do anything in namespace team-a, nothing elsewhere.
    let h = Gw::start(Knobs {
        policies: true,
        ..Default::default()
    })
    .await;
    let long_segment = "a".repeat(10 * 1024);
    // Longer than the header section may be (16 KiB here).
    let long_path = format!("{PODS}/{}", "x/".repeat(10_000));
    let refused: Vec<String> = vec![
        format!("{PODS}/../../kube-system/secrets"),
        format!("{PODS}/%2e%2e/%2E%2E/kube-system/secrets"),
        format!("{PODS}/.%2e/.%2e/kube-system/secrets"),
        "/api/v1/namespaces/team-a%2F..%2Fkube-system/secrets".into(),
        "/api/v1/namespaces/team-a%2fpods".into(),
        format!("{PODS}/web-0%00"),
        format!("{PODS}/%C0%AE%C0%AE/secrets"),
        format!("{PODS}/%ff"),
        format!("{PODS}/%zz"),
        format!("{PODS};/../../kube-system/secrets"),
        format!("{PODS}/./web-0"),
        format!("/api/v1/namespaces/team-a//pods"),
        format!("//api/v1/namespaces/team-a/pods"),
        format!("{PODS}/web-0%5c..%5c..%5ckube-system"),
        format!("http://127.0.0.1/api/v1/namespaces/kube-system/secrets"),
        "*".into(),
        format!("{PODS}/{long_segment}{long_segment}"),
        long_path,
    ];
    for path in &refused {
        h.apiserver.clear_requests();
        let mut tls = h.tls(b"http/1.1").await;
        let (text, _) = h1_exchange(
            &mut tls,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            Duration::from_millis(1500),
        )
        .await;
        let codes = statuses(&text);
        let shown = &path[..path.len().min(80)];
        assert!(
            matches!(codes.first(), Some(400 | 414 | 431)),
            "{shown}: answered {codes:?}: {}",
            &text[..text.len().min(300)]
        );
        let seen = h.seen();
        assert!(seen.is_empty(), "{shown} reached the stand-in: {seen:?}");
    }

    // The same over HTTP/2, where :path is whatever the client writes.
    for path in &refused[..12] {
        h.apiserver.clear_requests();
        let mut c = H2::connect(&h).await;
        let block = hpack(&[
            (":method", "GET"),
            (":scheme", "https"),
            (":path", path),
            (":authority", "127.0.0.1"),
        ]);
        assert!(
            c.send(&frame_bytes(HEADERS, END_STREAM | END_HEADERS, 1, &block))
                .await
        );
        let answered = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(f) = c.frames.recv().await {
                if (f.kind == HEADERS || f.kind == RST_STREAM) && f.stream == 1 {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(answered, Ok(true), "{path}: no answer");
        let seen = h.seen();
        assert!(
            seen.is_empty(),
            "{path} (h2) reached the stand-in: {seen:?}"
        );
    }

    // Odd but unambiguous paths go through unchanged, as alice, and only where policy allows.
    let passed: Vec<(String, u16)> = vec![
        // Decoded once by kube-apiserver, this is the literal name "%2e%2e": harmless.
        (format!("{PODS}/%252e%252e"), 404),
        (format!("{PODS}/web-0/"), 200),
        (format!("{PODS}/{long_segment}"), 404),
        ("/api/v1/namespaces/kube-system/secrets".into(), 403),
        (format!("{PODS}/caf%C3%A9"), 404),
        // Many segments, within the header limit: an unknown pod subresource, which the
        // stand-in's RBAC refuses.
        (format!("{PODS}/web-0/{}", "x/".repeat(3000)), 403),
    ];
    for (path, want) in &passed {
        h.apiserver.clear_requests();
        let mut tls = h.tls(b"http/1.1").await;
        let (text, _) = h1_exchange(
            &mut tls,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            Duration::from_millis(1500),
        )
        .await;
        let shown = &path[..path.len().min(80)];
        assert_eq!(
            statuses(&text).first(),
            Some(want),
            "{shown}: {}",
            &text[..text.len().min(300)]
        );
        let seen = h.seen();
        only_alice_reached(&seen, shown);
        for r in &seen {
            assert_eq!(
                &r.path, path,
                "forwarded a different path than was authorized"
            );
            assert!(r.path.starts_with(PODS), "{}", r.path);
        }
        if path.starts_with("/api/v1/namespaces/kube-system") {
            assert!(
                seen.is_empty(),
                "{shown}: a path policy denies reached the stand-in"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Header names and identity names

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_names_with_underscores_never_reach_the_apiserver() {
    let h = Gw::start(Knobs::default()).await;
    // A hop that maps `_` to `-` (CGI, WSGI, some proxies) would read these as identity
    // headers; kube-apiserver's request-header authenticator reads only the dashed names, but
    // nothing between the two is trusted to agree.
    let underscored = [
        ("Impersonate_User", "admin"),
        ("impersonate_group", "system:masters"),
        ("Impersonate_Extra_Scopes", "admin"),
        ("X_Remote_User", "admin"),
        ("X_Remote_Group", "system:masters"),
        ("X_Forwarded_For", "6.6.6.6"),
        ("Authorization_", "Bearer admin-token"),
        ("X_Custom_Thing", "underscored"),
    ];
    for http2 in [false, true] {
        let what = if http2 { "HTTP/2" } else { "HTTP/1.1" };
        h.apiserver.clear_requests();
        let mut req = http::Request::get(h.url(PODS)).header("X-Custom-Thing", "dashed");
        for (k, v) in underscored {
            req = req.header(k, v);
        }
        let req = req
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let (code, _, body) = support::send(&h.client(http2), req).await;
        assert_eq!(code, 200, "{what}: {body}");
        let seen = h.seen();
        assert_eq!(seen.len(), 1, "{what}");
        only_alice_reached(&seen, what);
        let r = &seen[0];
        for (k, v) in &r.headers {
            assert!(!k.contains('_'), "{what}: stand-in saw {k}: {v}");
            assert!(v != "6.6.6.6" && v != "underscored", "{what}: {k}: {v}");
        }
        // Dashed names that are not identity headers still pass.
        assert_eq!(r.header_values("x-custom-thing"), ["dashed"], "{what}");
        assert_eq!(r.header_values("impersonate-group"), ["team-a"], "{what}");
    }
}

/// What a client authenticates with.
enum Presented {
    Token(String),
    Certificate(CertKey),
}

/// A `ztgate serve` process trusting a development OIDC issuer, with its JSON log collected.
struct LoggedGateway {
    env: support::ProcessEnv,
    issuer: ztgate_testkit::DevIssuer,
    log: Arc<std::sync::Mutex<String>>,
    _process: support::ServeProcess,
}

impl LoggedGateway {
    async fn start() -> LoggedGateway {
        let issuer =
            ztgate_testkit::DevIssuer::start(&ztgate_testkit::pki::Ca::new("names-issuer-ca"))
                .await
                .unwrap();
        let env = support::ProcessEnv::create(DevSettings {
            jwt: vec![ztgate::demo::DevJwtIssuer {
                url: issuer.issuer_url(),
                ca_pem: issuer.ca_pem(),
                audience: "ztgate".into(),
                username_claim: "sub".into(),
                username_prefix: "oidc:".into(),
                groups_prefix: String::new(),
            }],
            ..Default::default()
        })
        .await;
        let config = &env.env.config_path;
        let text = std::fs::read_to_string(config).unwrap();
        assert!(text.contains("format: text"), "{text}");
        std::fs::write(config, text.replacen("format: text", "format: json", 1)).unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ztgate"))
            .args(["serve", "--config"])
            .arg(config)
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("ztgate serve starts");
        let log = Arc::new(std::sync::Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 {
                    return;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut process = support::ServeProcess { child };
        process.wait_ready(&env.base(), &env.ca_pem()).await;
        LoggedGateway {
            env,
            issuer,
            log,
            _process: process,
        }
    }

    fn token(&self, sub: &str, groups: &[&str]) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        self.issuer.sign(
            ztgate_testkit::SigningAlg::RS256,
            &serde_json::json!({
                "iss": self.issuer.issuer_url(),
                "sub": sub,
                "aud": "ztgate",
                "iat": now,
                "nbf": now,
                "exp": now + 600,
                "groups": groups,
            }),
        )
    }

    /// GET the team-a pods with a token or a certificate: (code, body).
    async fn list(&self, presented: &Presented) -> (u16, String) {
        let cert = match presented {
            Presented::Certificate(c) => Some(c),
            Presented::Token(_) => None,
        };
        let client = support::raw_client(&self.env.ca_pem(), cert, false);
        let mut req = http::Request::get(format!("{}{PODS}", self.env.base()));
        if let Presented::Token(t) = presented {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let (code, _, body) = support::send(&client, req).await;
        (code, body)
    }

    /// Waits (up to 5 s) for a log line whose `reason` contains every one of `parts`.
    async fn logged_reason(&self, parts: &[&str]) -> Option<String> {
        for _ in 0..50 {
            let found = self.log.lock().unwrap().lines().find_map(|line| {
                let v: serde_json::Value = serde_json::from_str(line).ok()?;
                let reason = v["reason"].as_str()?;
                parts
                    .iter()
                    .all(|p| reason.contains(p))
                    .then(|| reason.to_owned())
            });
            if found.is_some() {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_with_invisible_or_bidi_characters_get_401_and_the_log_says_why() {
    let g = LoggedGateway::start().await;
    let pki = &g.env.env.pki;
    // (what, a token (sub, groups) or a certificate (CN, O), what the log must name)
    let refused: Vec<(&str, Presented, [&str; 2])> = vec![
        (
            "right-to-left override in a token's user",
            Presented::Token(g.token("alice\u{202E}nimda", &["team-a"])),
            ["user name", "(U+202E)"],
        ),
        (
            "zero-width space in a token's user",
            Presented::Token(g.token("ad\u{200B}min", &["team-a"])),
            ["user name", "(U+200B)"],
        ),
        (
            "byte order mark in a token's user",
            Presented::Token(g.token("bob\u{FEFF}", &["team-a"])),
            ["user name", "(U+FEFF)"],
        ),
        (
            "line separator in a token's user",
            Presented::Token(g.token("carol\u{2028}x", &["team-a"])),
            ["user name", "(U+2028)"],
        ),
        (
            "tag character in a token's user",
            Presented::Token(g.token("dave\u{E0041}", &["team-a"])),
            ["user name", "(U+E0041)"],
        ),
        (
            "left-to-right isolate in a token's group",
            Presented::Token(g.token("erin", &["team-a\u{2066}"])),
            ["group", "(U+2066)"],
        ),
        (
            "left-to-right override in a certificate's CN",
            Presented::Certificate(pki.user("\u{202D}alice", &["team-a"])),
            ["certificate CN", "(U+202D)"],
        ),
        (
            "right-to-left mark in a certificate's O",
            Presented::Certificate(pki.user("frank", &["team-a\u{200F}"])),
            ["certificate O", "(U+200F)"],
        ),
    ];
    for (what, presented, reason) in &refused {
        g.env.apiserver.clear_requests();
        let (code, body) = g.list(presented).await;
        assert_eq!(code, 401, "{what}: {body}");
        assert!(
            !g.env.apiserver.requests().iter().any(|r| r.path == PODS),
            "{what}: reached the stand-in"
        );
        let logged = g.logged_reason(reason).await;
        let logged = logged.unwrap_or_else(|| {
            panic!(
                "{what}: no log line gives the reason {reason:?}:\n{}",
                g.log.lock().unwrap()
            )
        });
        assert!(logged.contains("formatting character"), "{what}: {logged}");
    }

    // Names in other scripts are names: forwarded as they are.
    for (what, presented, user) in [
        (
            "token",
            Presented::Token(g.token("José", &["team-a"])),
            "oidc:José",
        ),
        (
            "certificate",
            Presented::Certificate(pki.user("李", &["team-a"])),
            "李",
        ),
    ] {
        g.env.apiserver.clear_requests();
        let (code, body) = g.list(&presented).await;
        assert_eq!(code, 200, "{what}: {body}");
        let seen = g.env.apiserver.requests();
        let r = seen.iter().find(|r| r.path == PODS).unwrap();
        assert_eq!(r.header_values("impersonate-user"), [user], "{what}");
        assert_eq!(r.effective_user.as_ref().unwrap().username, user, "{what}");
    }
}
