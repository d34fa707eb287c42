//! Per-request forwarding path.
//!
//! - `hot_path/*`: the CPU work the gateway adds to every request (header hygiene, impersonation
//!   headers, target checks, request classification, bearer parsing).
//! - `round_trip/*`: one small GET over HTTP/2 to the stand-in kube-apiserver, directly and
//!   through the gateway, in the same run, so the ratio between them is what to read.
//!
//! Run: `cargo bench --bench forward`

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderName, HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use ztgate::proxy::headers::sanitize_request_headers;

fn kubectl_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        (
            "accept",
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
        ),
        (
            "user-agent",
            "kubectl/v1.32.4 (linux/amd64) kubernetes/59526cd",
        ),
        ("kubectl-command", "kubectl get"),
        ("kubectl-session", "0c2f43a1-6f34-4b0e-9c55-3c1e7c8f2b1e"),
        ("accept-encoding", "gzip"),
        ("host", "gateway.example:8443"),
        ("impersonate-user", "mallory"),
        ("x-remote-user", "mallory"),
    ] {
        h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    h
}

fn hot_path(c: &mut Criterion) {
    let base = kubectl_headers();
    let mut g = c.benchmark_group("hot_path");
    g.bench_function("sanitize_headers", |b| {
        b.iter_batched(
            || base.clone(),
            |mut h| {
                sanitize_request_headers(&mut h);
                h
            },
            criterion::BatchSize::SmallInput,
        )
    });
    g.bench_function("check_path", |b| {
        b.iter(|| {
            ztgate::proxy::path::check_path(std::hint::black_box(
                "/api/v1/namespaces/team-a/pods/web-0/log",
            ))
        })
    });
    let req = Request::get("/api/v1/namespaces/team-a/pods?watch=1&resourceVersion=10")
        .body(())
        .unwrap();
    g.bench_function("classify", |b| {
        b.iter(|| {
            let req = std::hint::black_box(&req);
            let info = ztgate::authz::requestinfo::request_info(
                req.method(),
                req.uri().path(),
                req.uri().query(),
            )
            .unwrap();
            ztgate::route::shape_of(&info, ztgate::route::upgrade_requested(req))
        })
    });
    let mut auth = HeaderMap::new();
    auth.insert(
        "authorization",
        HeaderValue::from_static("Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln"),
    );
    g.bench_function("bearer_parse", |b| {
        b.iter(|| ztgate::authn::credentials::bearer_from_headers(std::hint::black_box(&auth)))
    });
    g.finish();
}

type H2Client = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

fn h2_client(ca_pem: &str, cert_pem: &str, key_pem: &str) -> H2Client {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<_> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(ztgate::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let conn = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http2()
        .build();
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(conn)
}

fn round_trip(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let demo = rt
        .block_on(ztgate::demo::Demo::start(
            dir.path(),
            ztgate::demo::DevSettings {
                operations: false,
                ..Default::default()
            },
        ))
        .unwrap();
    let pki = &demo.env.pki;
    let direct = h2_client(
        &pki.cluster_ca.cert_pem(),
        &pki.gateway_client.cert_pem,
        &pki.gateway_client.key_pem,
    );
    let alice = pki.user("alice", &["team-a"]);
    let via = h2_client(&pki.gateway_ca.cert_pem(), &alice.cert_pem, &alice.key_pem);
    let direct_uri = format!("{}/version", demo.apiserver.url());
    let via_uri = format!("{}/version", demo.url);

    let mut g = c.benchmark_group("round_trip");
    g.measurement_time(Duration::from_secs(5));
    for (name, client, uri) in [
        ("direct", &direct, &direct_uri),
        ("via_gateway", &via, &via_uri),
    ] {
        g.bench_function(name, |b| {
            b.to_async(&rt).iter(|| async {
                let resp = client
                    .request(
                        Request::get(uri.as_str())
                            .body(Full::new(Bytes::new()))
                            .unwrap(),
                    )
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200);
                resp.into_body().collect().await.unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, hot_path, round_trip);
criterion_main!(benches);
