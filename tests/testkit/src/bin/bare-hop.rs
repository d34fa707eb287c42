//! `bare-hop`: the floor any TLS proxy in front of kube-apiserver pays, for `scripts/bench`.
//!
//! A minimal hyper reverse proxy with the gateway's TLS settings on both sides (rustls with
//! aws-lc-rs, TLS 1.3 and 1.2, ALPN h2 then http/1.1, a client certificate requested but not
//! required; a pooled HTTP/2-or-1.1 upstream client presenting a client certificate) and nothing
//! else: no authentication, no policy, no audit, no logging. Upgrades (exec/attach over WebSocket
//! or SPDY) are passed through on a fresh HTTP/1.1 upstream connection.
//!
//! ```text
//! bare-hop --listen 127.0.0.1:PORT --cert serving.crt --key serving.key --client-ca ca.crt \
//!          --upstream https://127.0.0.1:PORT --upstream-ca cluster-ca.crt \
//!          --upstream-cert client.crt --upstream-key client.key
//! ```
//!
//! With `--drop-authorization yes` it removes the `Authorization` header before forwarding (the
//! upstream authenticates its client certificate anyway): the floor of a proxy that receives the
//! user's token but does not pass it on, as the gateway does (`BENCH_BARE_DROPS_TOKEN=1` in
//! `scripts/bench`).
//!
//! It prints `listening on ADDR` once it accepts connections. A test fixture, never deployed.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

struct Hop {
    scheme: Scheme,
    authority: Authority,
    host: String,
    port: u16,
    client: Client<HttpsConnector<HttpConnector>, Body>,
    upgrade_tls: tokio_rustls::TlsConnector,
}

/// `--drop-authorization yes`: forward without the `Authorization` header.
static DROP_AUTHORIZATION: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// The same global allocator as the gateway, so the floor is measured with it too.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn die(msg: String) -> ! {
    eprintln!("bare-hop: {msg}");
    std::process::exit(2)
}

fn read(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| die(format!("{path}: {e}")))
}

fn certs(path: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(&read(path))
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| die(format!("{path}: {e}")))
}

fn key(path: &str) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_slice(&read(path)).unwrap_or_else(|e| die(format!("{path}: {e}")))
}

fn args() -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let Some(name) = k.strip_prefix("--") else {
            die(format!("unexpected argument {k:?}"))
        };
        let v = it
            .next()
            .unwrap_or_else(|| die(format!("--{name} needs a value")));
        out.insert(name.to_owned(), v);
    }
    out
}

fn main() {
    let a = args();
    let drop = match a.get("drop-authorization").map(String::as_str) {
        None | Some("no") => false,
        Some("yes") => true,
        Some(v) => die(format!("--drop-authorization takes yes or no, not {v:?}")),
    };
    DROP_AUTHORIZATION.store(drop, std::sync::atomic::Ordering::Relaxed);
    let get = |k: &str| {
        a.get(k)
            .cloned()
            .unwrap_or_else(|| die(format!("missing --{k}")))
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| die(format!("runtime: {e}")));
    rt.block_on(run(
        get("listen"),
        get("cert"),
        get("key"),
        get("client-ca"),
        get("upstream"),
        get("upstream-ca"),
        get("upstream-cert"),
        get("upstream-key"),
    ));
}

#[allow(clippy::too_many_arguments)]
async fn run(
    listen: String,
    cert: String,
    key_file: String,
    client_ca: String,
    upstream: String,
    upstream_ca: String,
    upstream_cert: String,
    upstream_key: String,
) {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] =
        &[&rustls::version::TLS13, &rustls::version::TLS12];

    // Front door: like the gateway's (a client certificate is asked for, not required).
    let mut client_roots = rustls::RootCertStore::empty();
    for c in certs(&client_ca) {
        client_roots
            .add(c)
            .unwrap_or_else(|e| die(format!("{client_ca}: {e}")));
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(client_roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .unwrap_or_else(|e| die(format!("client verifier: {e}")));
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap_or_else(|e| die(format!("tls: {e}")))
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&cert), key(&key_file))
        .unwrap_or_else(|e| die(format!("serving certificate: {e}")));
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));

    // Upstream: the gateway's pooled client shape.
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(&upstream_ca) {
        roots
            .add(c)
            .unwrap_or_else(|e| die(format!("{upstream_ca}: {e}")));
    }
    let client_tls = |alpn: Vec<Vec<u8>>| {
        let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .unwrap_or_else(|e| die(format!("tls: {e}")))
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(certs(&upstream_cert), key(&upstream_key))
            .unwrap_or_else(|e| die(format!("upstream client certificate: {e}")));
        c.alpn_protocols = alpn;
        c
    };
    let url: Uri = upstream
        .parse()
        .unwrap_or_else(|e| die(format!("--upstream: {e}")));
    let authority = url
        .authority()
        .cloned()
        .unwrap_or_else(|| die("--upstream has no host".into()));
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_tls(Vec::new()))
        .https_only()
        .enable_all_versions()
        .wrap_connector(http);
    let client = Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(connector);
    let hop = Arc::new(Hop {
        scheme: Scheme::HTTPS,
        host: authority.host().to_owned(),
        port: authority.port_u16().unwrap_or(443),
        authority,
        client,
        upgrade_tls: tokio_rustls::TlsConnector::from(Arc::new(client_tls(vec![
            b"http/1.1".to_vec()
        ]))),
    });

    let listener = TcpListener::bind(&listen)
        .await
        .unwrap_or_else(|e| die(format!("listen {listen}: {e}")));
    println!(
        "listening on {}",
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or(listen)
    );
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, hop) = (acceptor.clone(), hop.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let svc = hyper::service::service_fn(move |req| {
                let hop = hop.clone();
                async move { Ok::<_, Infallible>(proxy(&hop, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                .await;
        });
    }
}

fn error(code: StatusCode, msg: String) -> Response<Body> {
    let mut r = Response::new(
        http_body_util::Full::new(Bytes::from(msg))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = code;
    r
}

fn strip_hop_by_hop(h: &mut HeaderMap) {
    for n in HOP_BY_HOP {
        h.remove(n);
    }
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() <= http::Version::HTTP_11 && req.headers().contains_key(http::header::UPGRADE)
}

async fn proxy(hop: &Hop, req: Request<Incoming>) -> Response<Body> {
    if is_upgrade(&req) {
        return upgrade(hop, req).await;
    }
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if DROP_AUTHORIZATION.load(std::sync::atomic::Ordering::Relaxed) {
        parts.headers.remove(http::header::AUTHORIZATION);
    }
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(hop.scheme.clone());
    uri.authority = Some(hop.authority.clone());
    uri.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    parts.uri = Uri::from_parts(uri).expect("a URI");
    parts.version = http::Version::HTTP_11;
    let body = body.map_err(BoxError::from).boxed_unsync();
    match hop.client.request(Request::from_parts(parts, body)).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync())
        }
        Err(e) => error(StatusCode::BAD_GATEWAY, format!("upstream: {e}")),
    }
}

/// An upgrade: a fresh HTTP/1.1 connection upstream, the 101 passed back, then bytes copied
/// both ways until either side closes.
async fn upgrade(hop: &Hop, mut req: Request<Incoming>) -> Response<Body> {
    let client_side = hyper::upgrade::on(&mut req);
    let connect = async {
        let tcp = TcpStream::connect((hop.host.as_str(), hop.port)).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(hop.host.clone()).map_err(std::io::Error::other)?;
        hop.upgrade_tls.connect(name, tcp).await
    };
    let tls = match connect.await {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_GATEWAY, format!("upstream: {e}")),
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(tls)).await {
        Ok(x) => x,
        Err(e) => return error(StatusCode::BAD_GATEWAY, format!("upstream: {e}")),
    };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let (mut parts, _) = req.into_parts();
    parts.headers.insert(
        http::header::HOST,
        http::HeaderValue::from_str(hop.authority.as_str()).expect("an authority"),
    );
    let out = Request::from_parts(parts, Empty::<Bytes>::new());
    let mut resp = match sender.send_request(out).await {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_GATEWAY, format!("upstream: {e}")),
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (parts, body) = resp.into_parts();
        return Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync());
    }
    let upstream_side = hyper::upgrade::on(&mut resp);
    tokio::spawn(async move {
        let (Ok(c), Ok(u)) = (client_side.await, upstream_side.await) else {
            return;
        };
        let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(u)).await;
    });
    let (parts, _) = resp.into_parts();
    Response::from_parts(
        parts,
        Empty::<Bytes>::new().map_err(|e| match e {}).boxed_unsync(),
    )
}
