//! The pull provider: the gateway asks an HTTPS endpoint about devices it has no fresh record
//! for — batched, cached, rate-limited, and failing closed when the endpoint is down.

use crate::support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};
use support::{send, Harness};
use ztgate::demo::{DevJwtIssuer, DevSettings};
use ztgate_testkit::pki::Ca;
use ztgate_testkit::DevIssuer;

const PODS: &str = "/api/v1/namespaces/team-a/pods";

/// A posture provider on 127.0.0.1: answers from `known`, records each batch of ids asked,
/// answers 503 while `down`, and waits `delay` before each answer.
struct FakeProvider {
    addr: SocketAddr,
    ca_pem: String,
    known: Arc<Mutex<HashMap<String, Value>>>,
    batches: Arc<Mutex<Vec<Vec<String>>>>,
    down: Arc<AtomicBool>,
    requests: Arc<AtomicUsize>,
    delay: Arc<Mutex<Duration>>,
}

impl FakeProvider {
    async fn start() -> FakeProvider {
        let ca = Ca::new("provider-ca");
        let serving = ca.issue_localhost_server("posture-provider");
        let certs = CertificateDer::pem_slice_iter(serving.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(serving.key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let p = FakeProvider {
            addr,
            ca_pem: ca.cert_pem(),
            known: Arc::default(),
            batches: Arc::default(),
            down: Arc::default(),
            requests: Arc::default(),
            delay: Arc::default(),
        };
        let (known, batches, down, requests, delay) = (
            p.known.clone(),
            p.batches.clone(),
            p.down.clone(),
            p.requests.clone(),
            p.delay.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let (known, batches, down, requests, delay) = (
                    known.clone(),
                    batches.clone(),
                    down.clone(),
                    requests.clone(),
                    delay.clone(),
                );
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (known, batches, down, requests) = (
                            known.clone(),
                            batches.clone(),
                            down.clone(),
                            requests.clone(),
                        );
                        let wait = *delay.lock().unwrap();
                        async move {
                            requests.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(wait).await;
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            if down.load(Ordering::SeqCst) {
                                return Ok::<_, hyper::Error>(
                                    Response::builder()
                                        .status(503)
                                        .body(Full::new(Bytes::new()))
                                        .unwrap(),
                                );
                            }
                            let asked: Value = serde_json::from_slice(&body).unwrap();
                            let ids: Vec<String> = asked["deviceIds"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .map(|v| v.as_str().unwrap().to_owned())
                                .collect();
                            batches.lock().unwrap().push(ids.clone());
                            let known = known.lock().unwrap();
                            let devices: serde_json::Map<String, Value> = ids
                                .iter()
                                .filter_map(|id| known.get(id).map(|v| (id.clone(), v.clone())))
                                .collect();
                            let answer = json!({ "devices": devices }).to_string();
                            Ok(Response::new(Full::new(Bytes::from(answer))))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        p
    }
}

const POLICIES: &str = r#"
@id("team-a-from-a-device-with-posture")
permit (principal in k8s::Group::"team-a", action, resource in k8s::Namespace::"team-a")
when { context has device && context.device has posture && context.device.posture.diskEncrypted };
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_pulls_posture_it_does_not_have_and_fails_closed_without_it() {
    let provider = FakeProvider::start().await;
    provider.known.lock().unwrap().insert(
        "laptop-1".into(),
        json!({"attributes": {"os": "linux", "diskEncrypted": true}}),
    );
    provider
        .known
        .lock()
        .unwrap()
        .insert("laptop-2".into(), json!({"score": 91}));
    let users = DevIssuer::start(&Ca::new("users-idp-ca")).await.unwrap();
    let device_ca = Ca::new("device-ca");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.cedar"), POLICIES).unwrap();
    std::fs::write(dir.path().join("provider-ca.pem"), &provider.ca_pem).unwrap();
    let posture = format!(
        "posture:\n  provider:\n    url: https://{}/v1/query\n    certificateAuthorityFile: {}\n    cacheTtl: 1m\n    timeout: 1s\n",
        provider.addr,
        dir.path().join("provider-ca.pem").display()
    );
    let h = Harness::start_with(DevSettings {
        jwt: vec![DevJwtIssuer {
            url: users.issuer_url(),
            ca_pem: users.ca_pem(),
            audience: "ztgate".into(),
            username_claim: "sub".into(),
            username_prefix: "oidc:".into(),
            groups_prefix: String::new(),
        }],
        device_ca_pem: Some(device_ca.cert_pem()),
        device_posture_yaml: Some(posture),
        policies: vec![dir.path().join("p.cedar")],
        ..Default::default()
    })
    .await;
    let token = users.token(
        "alice",
        "ztgate",
        Duration::from_secs(600),
        json!({"groups": ["team-a"]}),
    );
    let get = || {
        Request::get(h.uri(PODS))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };

    // The provider knows laptop-1: its answer is the posture policy sees.
    let laptop1 = device_ca.issue_client("laptop-1", &[]);
    let (code, _, body) = send(&h.client(Some(&laptop1), true), get()).await;
    assert_eq!(code, 200, "{body}");
    // Pulled once, then kept: more requests do not ask again.
    for _ in 0..5 {
        let (code, _, _) = send(&h.client(Some(&laptop1), true), get()).await;
        assert_eq!(code, 200);
    }
    assert_eq!(provider.requests.load(Ordering::SeqCst), 1);

    // laptop-2 has only a score: posture is known (diskEncrypted unknown reads as false), so
    // policy decides: 403, not 401.
    let laptop2 = device_ca.issue_client("laptop-2", &[]);
    let (code, _, body) = send(&h.client(Some(&laptop2), true), get()).await;
    assert_eq!(code, 403, "{body}");

    // A device the provider does not know, and any device while the provider is down: 401
    // (fail closed), with the message to report posture.
    let laptop3 = device_ca.issue_client("laptop-3", &[]);
    let (code, _, body) = send(&h.client(Some(&laptop3), true), get()).await;
    assert_eq!(code, 401, "{body}");
    provider.down.store(true, Ordering::SeqCst);
    let laptop4 = device_ca.issue_client("laptop-4", &[]);
    let (code, _, body) = send(&h.client(Some(&laptop4), true), get()).await;
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("ztgate device report"), "{body}");
    // A down provider's answer is not cached: back up, the device is asked about again.
    provider.down.store(false, Ordering::SeqCst);
    provider.known.lock().unwrap().insert(
        "laptop-4".into(),
        json!({"attributes": {"diskEncrypted": true}}),
    );
    let (code, _, body) = send(&h.client(Some(&laptop4), true), get()).await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lookups_are_batched_and_rate_limited() {
    let provider = FakeProvider::start().await;
    for i in 0..40 {
        provider.known.lock().unwrap().insert(
            format!("dev-{i}"),
            json!({"attributes": {"diskEncrypted": true}}),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &provider.ca_pem).unwrap();
    let cfg: ztgate::posture::PullProvider = serde_yaml_ng::from_str(&format!(
        "url: https://{}/v1/query\ncertificateAuthorityFile: {}\nrequestsPerSecond: 2\nmaxBatch: 100\n",
        provider.addr,
        dir.path().join("ca.pem").display()
    ))
    .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let p = Arc::new(ztgate::posture::provider::Provider::new(&cfg, stop.clone()).unwrap());

    // 40 devices looked up at once: a handful of requests, each carrying many ids.
    let lookups: Vec<_> = (0..40)
        .map(|i| {
            let p = p.clone();
            tokio::spawn(async move { p.lookup(&format!("dev-{i}")).await })
        })
        .collect();
    let mut found = 0;
    for l in lookups {
        if let ztgate::posture::provider::Answer::Found(rec) = l.await.unwrap() {
            assert_eq!(rec.source, "pull");
            found += 1;
        }
    }
    let batches = provider.batches.lock().unwrap().clone();
    assert_eq!(found, 40, "{batches:?}");
    assert!(
        batches.len() <= 2,
        "40 lookups in {} requests",
        batches.len()
    );

    // Beyond the rate limit (2 requests per second), lookups are "unavailable", not queued
    // behind a flood: the provider is protected.
    let mut unavailable = 0;
    for i in 100..110 {
        if let ztgate::posture::provider::Answer::Unavailable(_) =
            p.lookup(&format!("dev-{i}")).await
        {
            unavailable += 1;
        }
    }
    assert!(unavailable >= 7, "only {unavailable} of 10 were limited");
    assert!(provider.requests.load(Ordering::SeqCst) <= 4);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_posture_provider_fails_closed_after_its_timeout_and_recovers() {
    let provider = FakeProvider::start().await;
    for device in ["laptop-1", "laptop-2"] {
        provider.known.lock().unwrap().insert(
            device.into(),
            json!({"attributes": {"os": "linux", "diskEncrypted": true}}),
        );
    }
    let users = DevIssuer::start(&Ca::new("users-idp-ca")).await.unwrap();
    let device_ca = Ca::new("device-ca");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.cedar"), POLICIES).unwrap();
    std::fs::write(dir.path().join("provider-ca.pem"), &provider.ca_pem).unwrap();
    let posture = format!(
        "posture:\n  provider:\n    url: https://{}/v1/query\n    certificateAuthorityFile: {}\n    cacheTtl: 1m\n    timeout: 1s\n",
        provider.addr,
        dir.path().join("provider-ca.pem").display()
    );
    let h = Harness::start_with(DevSettings {
        jwt: vec![DevJwtIssuer {
            url: users.issuer_url(),
            ca_pem: users.ca_pem(),
            audience: "ztgate".into(),
            username_claim: "sub".into(),
            username_prefix: "oidc:".into(),
            groups_prefix: String::new(),
        }],
        device_ca_pem: Some(device_ca.cert_pem()),
        device_posture_yaml: Some(posture),
        policies: vec![dir.path().join("p.cedar")],
        ..Default::default()
    })
    .await;
    let token = users.token(
        "alice",
        "ztgate",
        Duration::from_secs(600),
        json!({"groups": ["team-a"]}),
    );
    let get = || {
        Request::get(h.uri(PODS))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let laptop1 = device_ca.issue_client("laptop-1", &[]);
    let laptop2 = device_ca.issue_client("laptop-2", &[]);
    // laptop-2's posture is pulled (and kept) while the provider is quick.
    let (code, _, body) = send(&h.client(Some(&laptop2), true), get()).await;
    assert_eq!(code, 200, "{body}");

    // The provider now takes 5 s, longer than its 1 s timeout. A device it was never asked
    // about gets 401 with the message to report posture (fail closed) — the answer that would
    // have let it in arrives too late to count.
    *provider.delay.lock().unwrap() = Duration::from_secs(5);
    let asked = provider.requests.load(Ordering::SeqCst);
    let (code, _, body) = send(&h.client(Some(&laptop1), true), get()).await;
    assert_eq!(code, 401, "{body}");
    assert_eq!(support::status_of(&body), (401, "Unauthorized".into()));
    assert!(body.contains("ztgate device report"), "{body}");
    assert_eq!(provider.requests.load(Ordering::SeqCst), asked + 1);
    // Meanwhile a device whose posture the gateway holds is served without the provider.
    let (code, _, body) = send(&h.client(Some(&laptop2), true), get()).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(provider.requests.load(Ordering::SeqCst), asked + 1);
    assert!(h.demo.gateway.gateway.is_ready());

    // Quick again: a timed-out lookup was not cached, so laptop-1 is asked about again and let in.
    *provider.delay.lock().unwrap() = Duration::ZERO;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (code, _, body) = send(&h.client(Some(&laptop1), true), get()).await;
        if code == 200 {
            break;
        }
        assert_eq!(code, 401, "{body}");
        assert!(
            std::time::Instant::now() < deadline,
            "laptop-1 never got in: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
