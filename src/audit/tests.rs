//! Auditor tests: file sink end to end, policy + event building, webhook delivery to a local
//! HTTPS receiver, and overflow behaviour with the receiver down.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use ztgate_testkit::TestPki;

use super::config::{FileSinkConfig, WebhookSinkConfig};
use super::event::{EventList, ANNOTATION_AUTHN_METHOD, ANNOTATION_DECISION, ANNOTATION_REASON};
use super::*;
use crate::authn::x509::X509Authenticator;
use crate::authn::Identity;
use crate::authz::requestinfo::request_info;
use crate::config::duration::GoDuration;
use crate::config::CertKeyFiles;
use crate::tls::bundles::{Bundle, TrustBundles};

fn identity(pki: &TestPki, user: &str, groups: &[&str]) -> Arc<Identity> {
    let bundle = Bundle::from_der("users", &[pki.users_ca.cert_der().into()]).unwrap();
    let authn = X509Authenticator::new("users".into(), Arc::new(TrustBundles::new(vec![bundle])));
    let ck = pki.user(user, groups);
    authn
        .verify(
            &[CertificateDer::from(ck.cert_der.clone())],
            SystemTime::now(),
        )
        .result
        .unwrap()
}

/// A minimal event for queue tests.
fn event(n: usize) -> Event {
    let method = Method::GET;
    let uri: Uri = format!("/api/v1/namespaces/default/configmaps/cm-{n}")
        .parse()
        .unwrap();
    EventParts::new(&Auditor::new_audit_id(), &method, &uri, SystemTime::now())
        .build(Level::Metadata, Stage::ResponseComplete)
}

#[tokio::test]
async fn disabled_auditor_is_a_no_op() {
    let a = Auditor::disabled();
    assert!(!a.is_enabled());
    assert_eq!(a.decide(None, None), PolicyDecision::NONE);
    assert_eq!(a.level_for(None, None), Level::None);
    a.record(event(1)).await;
    a.record_now(event(2));
    a.flush().await;
    assert_eq!(a.dropped(), 0);
    assert!(a.sink_counts().is_empty());
}

#[tokio::test]
async fn file_sink_end_to_end_with_policy_and_rotation() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n\
         - level: None\n  nonResourceURLs: ['/healthz*']\n",
    )
    .unwrap();
    let log = dir.path().join("audit.log");
    let cfg = AuditConfig {
        policy_file: Some(policy.clone()),
        sinks: vec![SinkConfig::File(FileSinkConfig {
            path: log.clone(),
            max_size_bytes: 4096,
            max_backups: 3,
            buffer_events: 1000,
        })],
        overflow: Overflow::Drop,
    };
    let stop = CancellationToken::new();
    let a = Auditor::start(&cfg, stop.clone()).await.unwrap();

    let alice = identity(&pki, "alice", &["devs"]);
    let method = Method::GET;
    let uri: Uri = "/api/v1/namespaces/prod/pods/web-0/log?follow=true&token=SECRET"
        .parse()
        .unwrap();
    let info = request_info(&method, uri.path(), uri.query()).unwrap();
    let decision = a.decide(Some(Subject::from(&*alice)), Some(&info));
    assert_eq!(decision.level, Level::Metadata);
    assert!(!decision.records(Stage::RequestReceived));

    let ips = ["192.0.2.10".parse().unwrap()];
    let audit_id = Auditor::new_audit_id();
    let mut parts = EventParts::new(&audit_id, &method, &uri, SystemTime::now());
    parts.identity = Some(&alice);
    parts.request_info = Some(&info);
    parts.source_ips = &ips;
    parts.user_agent = Some("kubectl/v1.31.0");
    parts.response = Some(ResponseInfo {
        code: 403,
        reason: Some("Forbidden"),
        message: Some("pods \"web-0\" is forbidden: denied by policy"),
    });
    parts
        .decision(Decision::Deny)
        .annotate(ANNOTATION_REASON, "posture stale");
    a.record_stage(&decision, Stage::RequestReceived, &parts)
        .await; // omitted
    a.record_stage(&decision, Stage::ResponseComplete, &parts)
        .await;

    // A /healthz request is not audited.
    let hz = request_info(&Method::GET, "/healthz", None).unwrap();
    assert_eq!(
        a.level_for(Some(Subject::from(&*alice)), Some(&hz)),
        Level::None
    );
    a.record(
        EventParts::new(
            "x",
            &method,
            &"/healthz".parse().unwrap(),
            SystemTime::now(),
        )
        .build(Level::None, Stage::ResponseComplete),
    )
    .await;

    a.flush().await;
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(!text.contains("SECRET"));
    let ev: Event = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(ev.audit_id, audit_id);
    assert_eq!(ev.stage, Stage::ResponseComplete);
    assert_eq!(
        ev.request_uri,
        "/api/v1/namespaces/prod/pods/web-0/log?follow=true"
    );
    assert_eq!(ev.verb, "get");
    assert_eq!(ev.user.username, "alice");
    assert_eq!(ev.user.groups, ["devs"]);
    assert_eq!(ev.source_ips, ["192.0.2.10"]);
    let obj = ev.object_ref.as_ref().unwrap();
    assert_eq!(
        (obj.resource.as_str(), obj.subresource.as_str()),
        ("pods", "log")
    );
    let rs = ev.response_status.as_ref().unwrap();
    assert_eq!(
        (rs.code, rs.reason.as_str(), rs.status.as_str()),
        (403, "Forbidden", "Failure")
    );
    assert_eq!(ev.annotations[ANNOTATION_DECISION], "deny");
    assert_eq!(ev.annotations[ANNOTATION_REASON], "posture stale");
    assert_eq!(ev.annotations[ANNOTATION_AUTHN_METHOD], "x509");

    // Rotation through the auditor: ~300-byte lines, 4 KiB files.
    for n in 0..60 {
        a.record(event(n)).await;
    }
    a.flush().await;
    let counts = a.sink_counts();
    assert_eq!(counts[0].written, 61);
    assert_eq!(counts[0].dropped, 0);
    let mut total = 0;
    for p in [
        log.clone(),
        dir.path().join("audit.log.1"),
        dir.path().join("audit.log.2"),
    ] {
        let t = std::fs::read_to_string(&p).unwrap();
        assert!(t.len() <= 4096, "{} is {} bytes", p.display(), t.len());
        for l in t.lines() {
            serde_json::from_str::<Event>(l).unwrap();
            total += 1;
        }
    }
    assert!(dir.path().join("audit.log.3").exists());
    assert!(!dir.path().join("audit.log.4").exists());
    assert!(total < 61, "older files beyond maxBackups were removed");

    // Policy reload: a bad file keeps the old policy.
    std::fs::write(
        &policy,
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: Request\n",
    )
    .unwrap();
    assert!(a.reload_policy().is_err());
    assert_eq!(a.level_for(None, Some(&hz)), Level::None);

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), a.stopped())
        .await
        .unwrap();
}

#[tokio::test]
async fn start_refuses_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let missing_dir = AuditConfig {
        sinks: vec![SinkConfig::File(FileSinkConfig {
            path: dir.path().join("nope/audit.log"),
            max_size_bytes: 0,
            max_backups: 0,
            buffer_events: 1,
        })],
        ..Default::default()
    };
    let e = Auditor::start(&missing_dir, stop.clone())
        .await
        .unwrap_err();
    assert!(matches!(e, AuditError::Sink { .. }), "{e}");
    let bad_policy = AuditConfig {
        policy_file: Some(dir.path().join("missing.yaml")),
        ..Default::default()
    };
    let e = Auditor::start(&bad_policy, stop.clone()).await.unwrap_err();
    assert!(matches!(e, AuditError::Policy { .. }), "{e}");
    let mut hook = webhook_cfg(&dir, "127.0.0.1:1".parse().unwrap(), None);
    hook.url = "http://127.0.0.1:1/".into();
    let e = Auditor::start(
        &AuditConfig {
            sinks: vec![SinkConfig::Webhook(hook)],
            ..Default::default()
        },
        stop,
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("sinks[0].url"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Webhook receiver

struct Receiver {
    batches: Arc<Mutex<Vec<serde_json::Value>>>,
    /// Answer this many requests with the given status before accepting.
    fail: Arc<(AtomicUsize, Mutex<StatusCode>)>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Serves HTTPS on `addr` (port 0 for any) with a certificate from the gateway CA, requiring
    /// a client certificate from the users CA.
    async fn start(pki: &TestPki, addr: SocketAddr) -> (Receiver, SocketAddr) {
        let serving = pki.gateway_ca.issue_localhost_server("audit");
        let chain = vec![CertificateDer::from(serving.cert_der.clone())];
        let key =
            rustls_pki_types::PrivateKeyDer::from_pem_slice(serving.key_pem.as_bytes()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(pki.users_ca.cert_der()))
            .unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            crate::crypto_provider(),
        )
        .build()
        .unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(crate::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(addr).unwrap();
        let listener = socket.listen(64).unwrap();
        let bound = listener.local_addr().unwrap();

        let batches = Arc::new(Mutex::new(Vec::new()));
        let fail = Arc::new((
            AtomicUsize::new(0),
            Mutex::new(StatusCode::SERVICE_UNAVAILABLE),
        ));
        let stop = CancellationToken::new();
        let (b, f, s) = (batches.clone(), fail.clone(), stop.clone());
        let task = tokio::spawn(async move {
            // Dropping the JoinSet aborts open connections: "down" means down.
            let mut conns = JoinSet::new();
            loop {
                let (tcp, _) = tokio::select! {
                    _ = s.cancelled() => break,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                let (acceptor, b, f) = (acceptor.clone(), b.clone(), f.clone());
                conns.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (b, f) = (b.clone(), f.clone());
                        async move {
                            let body = req.into_body().collect().await?.to_bytes();
                            let pending = f.0.load(Ordering::SeqCst);
                            if pending > 0 {
                                f.0.store(pending - 1, Ordering::SeqCst);
                                let code = *f.1.lock().unwrap();
                                let mut r = Response::new(Full::new(Bytes::new()));
                                *r.status_mut() = code;
                                return Ok::<_, hyper::Error>(r);
                            }
                            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                            b.lock().unwrap().push(v);
                            Ok(Response::new(Full::new(Bytes::from_static(b"{}"))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
            drop(conns);
        });
        (
            Receiver {
                batches,
                fail,
                stop,
                task,
            },
            bound,
        )
    }

    async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }

    fn items(&self) -> Vec<Event> {
        self.batches
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| {
                serde_json::from_value::<EventList>(b.clone())
                    .unwrap()
                    .items
            })
            .collect()
    }

    fn batch_sizes(&self) -> Vec<usize> {
        self.batches
            .lock()
            .unwrap()
            .iter()
            .map(|b| b["items"].as_array().unwrap().len())
            .collect()
    }
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn webhook_cfg(
    dir: &tempfile::TempDir,
    addr: SocketAddr,
    pki: Option<&TestPki>,
) -> WebhookSinkConfig {
    let ca = dir.path().join("receiver-ca.crt");
    let mut client_certificate = None;
    if let Some(pki) = pki {
        std::fs::write(&ca, pki.gateway_ca.cert_pem()).unwrap();
        let (cert_file, key_file) = pki.user("ztgate-audit", &[]).write(dir.path(), "client");
        client_certificate = Some(CertKeyFiles {
            cert_file,
            key_file,
        });
    }
    WebhookSinkConfig {
        url: format!("https://{addr}/audit"),
        ca_file: ca,
        client_certificate,
        batch_max_events: 3,
        batch_max_wait: GoDuration(Duration::from_millis(50)),
        buffer_events: 100,
        retry_backoff: GoDuration(Duration::from_millis(10)),
        max_retries: 3,
        timeout: GoDuration(Duration::from_secs(5)),
    }
}

async fn start_hook(
    cfg: WebhookSinkConfig,
    overflow: Overflow,
) -> (Arc<Auditor>, CancellationToken) {
    let stop = CancellationToken::new();
    let a = Auditor::start(
        &AuditConfig {
            policy_file: None,
            sinks: vec![SinkConfig::Webhook(cfg)],
            overflow,
        },
        stop.clone(),
    )
    .await
    .unwrap();
    (a, stop)
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn webhook_sends_event_lists_in_batches() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let (rx, addr) = Receiver::start(&pki, "127.0.0.1:0".parse().unwrap()).await;
    let (a, stop) = start_hook(webhook_cfg(&dir, addr, Some(&pki)), Overflow::Drop).await;

    for n in 0..7 {
        a.record(event(n)).await;
    }
    tokio::time::timeout(Duration::from_secs(10), a.flush())
        .await
        .unwrap();
    let items = rx.items();
    assert_eq!(items.len(), 7);
    assert!(
        rx.batch_sizes().iter().all(|n| (1..=3).contains(n)),
        "{:?}",
        rx.batch_sizes()
    );
    let first = rx.batches.lock().unwrap()[0].clone();
    assert_eq!(first["kind"], "EventList");
    assert_eq!(first["apiVersion"], "audit.k8s.io/v1");
    assert_eq!(first["metadata"], serde_json::json!({}));
    assert_eq!(first["items"][0]["kind"], "Event");

    // A lone event goes out after batchMaxWait without a flush.
    a.record(event(99)).await;
    eventually("the time-based batch", || rx.items().len() == 8).await;
    assert_eq!(a.sink_counts()[0].written, 8);
    assert_eq!(a.dropped(), 0);

    // Transient failures (503) are retried; the batch arrives.
    rx.fail.0.store(2, Ordering::SeqCst);
    a.record(event(100)).await;
    tokio::time::timeout(Duration::from_secs(10), a.flush())
        .await
        .unwrap();
    assert_eq!(rx.items().len(), 9);
    assert_eq!(a.dropped(), 0);

    // A permanent failure (400) drops the batch at once, counted.
    *rx.fail.1.lock().unwrap() = StatusCode::BAD_REQUEST;
    rx.fail.0.store(1, Ordering::SeqCst);
    a.record(event(101)).await;
    tokio::time::timeout(Duration::from_secs(10), a.flush())
        .await
        .unwrap();
    assert_eq!(rx.items().len(), 9);
    assert_eq!(a.dropped(), 1);

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), a.stopped())
        .await
        .unwrap();
    rx.shutdown().await;
}

#[tokio::test]
async fn webhook_refuses_a_receiver_outside_its_ca() {
    let pki = TestPki::new();
    let other = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let (rx, addr) = Receiver::start(&other, "127.0.0.1:0".parse().unwrap()).await;
    let mut cfg = webhook_cfg(&dir, addr, Some(&pki));
    cfg.max_retries = 0;
    let (a, stop) = start_hook(cfg, Overflow::Drop).await;
    a.record(event(1)).await;
    tokio::time::timeout(Duration::from_secs(10), a.flush())
        .await
        .unwrap();
    assert_eq!(a.dropped(), 1);
    assert!(rx.items().is_empty());
    stop.cancel();
    rx.shutdown().await;
}

#[tokio::test]
async fn drop_mode_never_blocks_and_recovers_when_the_receiver_returns() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let mut cfg = webhook_cfg(&dir, addr, Some(&pki));
    cfg.buffer_events = 4;
    cfg.batch_max_events = 2;
    cfg.max_retries = 1000;
    let (a, stop) = start_hook(cfg, Overflow::Drop).await;

    // Receiver down: every record() returns at once; once the queue is full, events are dropped.
    for n in 0..100 {
        tokio::time::timeout(Duration::from_millis(500), a.record(event(n)))
            .await
            .expect("record() must not block in Drop mode");
    }
    let dropped = a.dropped();
    assert!(dropped >= 90, "dropped {dropped}");
    assert_eq!(a.sink_counts()[0].written, 0);

    // Receiver back: the held batch and queue drain, and new events flow.
    let (rx, _) = Receiver::start(&pki, addr).await;
    eventually("the backlog to drain", || {
        a.sink_counts()[0].written as usize == 100 - dropped as usize
    })
    .await;
    // Fewer than bufferEvents, so none can be dropped for lack of room.
    let marked: Vec<Event> = (1000..1003).map(event).collect();
    for ev in &marked {
        a.record(ev.clone()).await;
    }
    tokio::time::timeout(Duration::from_secs(10), a.flush())
        .await
        .unwrap();
    let got = rx.items();
    for ev in &marked {
        assert!(
            got.iter().any(|g| g.audit_id == ev.audit_id),
            "event lost after recovery"
        );
    }
    assert_eq!(
        a.dropped(),
        dropped,
        "nothing dropped once the receiver is back"
    );

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), a.stopped())
        .await
        .unwrap();
    rx.shutdown().await;
}

#[tokio::test]
async fn block_mode_waits_for_room() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let mut cfg = webhook_cfg(&dir, addr, Some(&pki));
    cfg.buffer_events = 2;
    cfg.batch_max_events = 1;
    cfg.max_retries = 1000;
    let (a, stop) = start_hook(cfg, Overflow::Block).await;

    let mut blocked_at = None;
    for n in 0..10 {
        if tokio::time::timeout(Duration::from_millis(200), a.record(event(n)))
            .await
            .is_err()
        {
            blocked_at = Some(n);
            break;
        }
    }
    // One in flight (retrying) + two queued, then the producer waits.
    let n = blocked_at.expect("record() should block once the queue is full");
    assert!(n <= 4, "blocked only at event {n}");
    assert_eq!(a.dropped(), 0);

    // When the receiver comes back, a blocked producer gets through.
    let (rx, _) = Receiver::start(&pki, addr).await;
    tokio::time::timeout(Duration::from_secs(10), a.record(event(500)))
        .await
        .expect("record() proceeds once there is room");
    tokio::time::timeout(Duration::from_secs(10), a.flush())
        .await
        .unwrap();
    assert!(rx.items().iter().any(|e| e.request_uri.ends_with("cm-500")));
    assert_eq!(a.dropped(), 0);

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), a.stopped())
        .await
        .unwrap();
    rx.shutdown().await;
}

/// The request path writes its events straight from the parts; the bytes must be those of the
/// event the parts build (whose writer is checked against serde in `event::tests`).
#[test]
fn parts_write_the_json_of_the_event_they_build() {
    let pki = TestPki::new();
    let alice = identity(&pki, "alice \"the\" admin", &["team-a", "ops\\n"]);
    let bob = alice
        .impersonated(
            "bob".into(),
            vec!["viewers".into()],
            Some("uid-1".into()),
            [(
                "scopes".to_owned(),
                vec!["a".to_owned(), "b \"q\" \\".to_owned()],
            )]
            .into(),
        )
        .unwrap();
    let bob = event::UserInfo::from_identity(&bob);
    let long_agent = "kubectl/v1.31 ".repeat(100);
    let uris: Vec<Uri> = [
        "/version",
        "/api/v1/namespaces/team-a/pods/web-0/log?follow=true&token=secret",
        "/apis/apps/v1/deployments?access_token=x",
        "/api/v1/namespaces/team-a/pods?watch=1&labelSelector=app%3Dweb",
    ]
    .iter()
    .map(|u| u.parse().unwrap())
    .collect();
    let methods = [Method::GET, Method::POST, Method::DELETE];
    let ips: Vec<std::net::IpAddr> = ["10.0.0.1", "2001:db8::1", "255.255.255.0", "0.0.0.9"]
        .iter()
        .map(|ip| ip.parse().unwrap())
        .collect();
    let mut checked = 0;
    let mut restaged = 0;
    for i in 0..96usize {
        let uri = &uris[i % uris.len()];
        let method = &methods[i % methods.len()];
        let info = request_info(method, uri.path(), uri.query()).unwrap();
        let mut parts = EventParts::new(
            "0b7e7a4c-2f0e-4a4e-9d1c-1f5b2f0e6a11",
            method,
            uri,
            SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_000_000_123_456 + i as u64),
        );
        parts.identity = (i % 3 != 0).then_some(&*alice);
        parts.impersonated = (i % 4 == 1).then_some(&bob);
        parts.request_info = (i % 5 != 0).then_some(&info);
        parts.user_agent = match i % 3 {
            0 => None,
            1 => Some("kubectl/v1.31.0 (linux/amd64)"),
            _ => Some(&long_agent),
        };
        parts.source_ips = &ips[..i % 5];
        parts.response = match i % 4 {
            0 => None,
            1 => Some(event::ResponseInfo {
                code: 200,
                reason: None,
                message: None,
            }),
            2 => Some(event::ResponseInfo {
                code: 403,
                reason: Some("Forbidden"),
                message: Some("no policy allows \"it\"\n"),
            }),
            _ => Some(event::ResponseInfo {
                code: 201,
                reason: None,
                message: Some("created"),
            }),
        };
        match i % 6 {
            0 => {}
            1 => {
                parts.annotate("a.example/first", "before the authn method");
            }
            2 => {
                parts.annotate("zz.example/last", "after it");
                parts.decision(event::Decision::Allow);
            }
            3 => {
                parts.annotate(ANNOTATION_AUTHN_METHOD, "set by the caller");
            }
            _ => {
                parts.annotate(ANNOTATION_REASON, "allowed by policy \"p1\"");
                parts.annotate("a.example/first", "x");
                parts.annotate("zz.example/last", "y");
            }
        }
        let level = [Level::Metadata, Level::Request, Level::RequestResponse][i % 3];
        for stage in Stage::ALL {
            let at =
                SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_000_001_000_000 + i as u64);
            let mut direct = Vec::new();
            parts.write_json(level, stage, at, &mut direct);
            let mut built = Vec::new();
            parts.build_at(level, stage, at).write_json(&mut built);
            assert_eq!(
                String::from_utf8(direct).unwrap(),
                String::from_utf8(built).unwrap(),
                "case {i}, {stage:?}"
            );
            checked += 1;
        }
        // Several stages at once (the first written field by field, the others copied from it
        // around their own stage, status and stamp): each the same bytes as written alone.
        let stamps: Vec<(Stage, SystemTime)> = Stage::ALL
            .iter()
            .enumerate()
            .map(|(k, &stage)| {
                let at = SystemTime::UNIX_EPOCH
                    + Duration::from_micros(1_764_000_002_000_000 + (i * 10 + k) as u64);
                (stage, at)
            })
            .collect();
        for first in 0..stamps.len() {
            let order: Vec<(Stage, SystemTime)> = stamps[first..]
                .iter()
                .chain(&stamps[..first])
                .copied()
                .collect();
            let mut written = Vec::new();
            parts.write_stages(level, order.iter().copied(), |stage, json| {
                written.push((stage, json))
            });
            assert_eq!(written.len(), order.len(), "case {i}");
            for ((stage, json), (want_stage, at)) in written.into_iter().zip(&order) {
                assert_eq!(stage, *want_stage);
                let mut alone = Vec::new();
                parts.write_json(level, stage, *at, &mut alone);
                assert_eq!(
                    String::from_utf8(json.to_vec()).unwrap(),
                    String::from_utf8(alone).unwrap(),
                    "case {i}, {stage:?} after {:?}",
                    order[0].0
                );
                restaged += 1;
            }
        }
    }
    assert_eq!(checked, 96 * Stage::ALL.len());
    assert_eq!(restaged, 96 * Stage::ALL.len() * Stage::ALL.len());
}

fn audit_writer_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .filter(|name| name.trim() == "ztgate-audit")
        .count()
}

/// A file sink writes from a thread of its own; stopping writes what is queued and ends it, and
/// so does dropping the auditor (nothing keeps the thread waiting on a queue nobody can fill).
#[tokio::test]
async fn the_writer_thread_writes_everything_and_ends_on_stop_or_drop() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let cfg = AuditConfig {
        policy_file: None,
        sinks: vec![SinkConfig::File(FileSinkConfig {
            path: log.clone(),
            max_size_bytes: 0,
            max_backups: 0,
            buffer_events: 1000,
        })],
        overflow: Overflow::Drop,
    };
    let lines = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .count()
    };
    // Stop: everything recorded before it is in the file, then the thread is gone.
    let stop = CancellationToken::new();
    let a = Auditor::start(&cfg, stop.clone()).await.unwrap();
    eventually("the writer thread starts", || audit_writer_threads() == 1).await;
    for n in 0..300 {
        a.record(event(n)).await;
    }
    stop.cancel();
    a.stopped().await;
    assert_eq!(lines(&log), 300);
    eventually("the writer thread ends after stop", || {
        audit_writer_threads() == 0
    })
    .await;

    // Drop without stop: what was queued is written and the thread ends.
    let a = Auditor::start(&cfg, CancellationToken::new())
        .await
        .unwrap();
    for n in 0..5 {
        a.record(event(n)).await;
    }
    drop(a);
    eventually("queued events written after drop", || lines(&log) == 305).await;
    eventually("the writer thread ends after drop", || {
        audit_writer_threads() == 0
    })
    .await;
}
