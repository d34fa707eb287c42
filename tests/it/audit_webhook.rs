//! The webhook audit sink end to end, through the gateway: a receiver on 127.0.0.1 (HTTPS, its
//! own test CA) that goes down, answers 503 and comes back; what requests do meanwhile in `Drop`
//! and `Block` mode; the dropped-events counter; and a search of every sink's output (file,
//! webhook bodies, stdout of a `ztgate serve` process) for the bearer tokens that were used.

use crate::support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use support::{get, send, Harness, RawClient};
use ztgate::demo::{DevEnv, DevJwtIssuer, DevSettings};
use ztgate_testkit::pki::Ca;
use ztgate_testkit::{ApiServer, ApiServerOptions, DevIssuer, TestPki};

const POLICIES: &str = r#"
@id("discovery-read")
permit (principal, action == k8s::Action::"get", resource is k8s::NonResourceURL)
when { resource.path == "/api" || resource.path like "/api/*" || resource.path == "/apis" || resource.path like "/apis/*" || resource.path like "/openapi/*" || resource.path == "/version" };

@id("team-a-namespace")
permit (principal in k8s::Group::"team-a", action, resource in k8s::Namespace::"team-a");
"#;

const PODS: &str = "/api/v1/namespaces/team-a/pods";

// ---------------------------------------------------------------------------------------------
// The receiver

/// An audit webhook receiver: HTTPS on a fixed 127.0.0.1 port, keeping every body it accepted.
/// It can answer 503 (`unavailable`), or be down altogether (nothing listens on the port, open
/// connections are cut) and come back on the same port.
struct Receiver {
    addr: SocketAddr,
    ca_pem: String,
    acceptor: tokio_rustls::TlsAcceptor,
    bodies: Arc<Mutex<Vec<Bytes>>>,
    unavailable: Arc<AtomicBool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let ca = Ca::new("audit-receiver-ca");
        let serving = ca.issue_localhost_server("audit-receiver");
        let certs = CertificateDer::pem_slice_iter(serving.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(serving.key_pem.as_bytes()).unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(ztgate::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let listener = bind("127.0.0.1:0".parse().unwrap());
        let r = Receiver {
            addr: listener.local_addr().unwrap(),
            ca_pem: ca.cert_pem(),
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            bodies: Arc::default(),
            unavailable: Arc::default(),
            task: Mutex::new(None),
        };
        r.serve(listener);
        r
    }

    fn url(&self) -> String {
        format!("https://{}/audit", self.addr)
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let (acceptor, bodies, unavailable) = (
            self.acceptor.clone(),
            self.bodies.clone(),
            self.unavailable.clone(),
        );
        let task = tokio::spawn(async move {
            // Aborting this task drops the set, which cuts every open connection.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, bodies, unavailable) =
                    (acceptor.clone(), bodies.clone(), unavailable.clone());
                conns.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (bodies, unavailable) = (bodies.clone(), unavailable.clone());
                        async move {
                            let body = req.into_body().collect().await?.to_bytes();
                            let mut resp = Response::new(Full::new(Bytes::from_static(b"{}")));
                            if unavailable.load(Ordering::SeqCst) {
                                *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                            } else {
                                bodies.lock().unwrap().push(body);
                            }
                            Ok::<_, hyper::Error>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        *self.task.lock().unwrap() = Some(task);
    }

    /// Down: nothing listens on the port any more; open connections are cut.
    async fn stop(&self) {
        let task = self.task.lock().unwrap().take();
        if let Some(t) = task {
            t.abort();
            let _ = t.await;
        }
    }

    /// Back on the same port.
    fn restart(&self) {
        let listener = bind(self.addr);
        self.serve(listener);
    }

    /// Every accepted body, parsed; each must be an `audit.k8s.io/v1` `EventList`.
    fn lists(&self) -> Vec<serde_json::Value> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .map(|b| {
                let v: serde_json::Value = serde_json::from_slice(b).unwrap();
                assert_eq!(v["kind"], "EventList", "{v}");
                assert_eq!(v["apiVersion"], "audit.k8s.io/v1", "{v}");
                v
            })
            .collect()
    }

    fn events(&self) -> Vec<serde_json::Value> {
        self.lists()
            .into_iter()
            .flat_map(|l| l["items"].as_array().unwrap().clone())
            .collect()
    }

    fn has_event(&self, audit_id: &str, stage: &str) -> bool {
        self.events()
            .iter()
            .any(|e| e["auditID"] == audit_id && e["stage"] == stage)
    }

    /// Everything the receiver was sent, as text.
    fn raw_text(&self) -> String {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn bind(addr: SocketAddr) -> tokio::net::TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap();
    socket.listen(64).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// The `audit:` section: a webhook sink to `rx` with a small queue and fast retries, after an
/// optional file sink.
fn audit_yaml(rx: &Receiver, dir: &std::path::Path, overflow: &str, file: bool) -> String {
    let ca = dir.join("receiver-ca.crt");
    std::fs::write(&ca, &rx.ca_pem).unwrap();
    let file_sink = if file {
        format!(
            "    - type: file\n      path: \"{}\"\n",
            dir.join("audit.log").display()
        )
    } else {
        String::new()
    };
    format!(
        r#"audit:
  overflow: {overflow}
  sinks:
{file_sink}    - type: webhook
      url: {url}
      caFile: "{ca}"
      batchMaxEvents: 2
      batchMaxWait: 50ms
      bufferEvents: 8
      retryBackoff: 20ms
      maxRetries: 1000
      timeout: 2s
"#,
        url = rx.url(),
        ca = ca.display(),
    )
}

fn dev_issuer(issuer: &DevIssuer) -> DevJwtIssuer {
    DevJwtIssuer {
        url: issuer.issuer_url(),
        ca_pem: issuer.ca_pem(),
        audience: "ztgate".into(),
        username_claim: "sub".into(),
        username_prefix: "oidc:".into(),
        groups_prefix: String::new(),
    }
}

fn alice_token(issuer: &DevIssuer) -> String {
    issuer.token(
        "alice",
        "ztgate",
        Duration::from_secs(600),
        serde_json::json!({"groups": ["team-a"]}),
    )
}

/// A kubeconfig that sends `token` as its bearer token (no client certificate).
fn token_kubeconfig(h: &Harness, name: &str, token: &str) -> std::path::PathBuf {
    let path = h.demo.env.dir.join(format!("{name}.kubeconfig"));
    let kubeconfig = format!(
        r#"apiVersion: v1
kind: Config
clusters:
  - name: ztgate
    cluster:
      server: {url}
      certificate-authority: {ca}
users:
  - name: {name}
    user:
      token: {token}
contexts:
  - name: {name}@ztgate
    context:
      cluster: ztgate
      user: {name}
      namespace: team-a
current-context: {name}@ztgate
"#,
        url = h.url(),
        ca = h.demo.env.gateway_ca_path.display(),
    );
    std::fs::write(&path, kubeconfig).unwrap();
    path
}

fn bearer(uri: &str, token: &str) -> Request<Full<Bytes>> {
    Request::get(uri)
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// Sends `req`; returns the status and the audit ID the gateway answered with.
async fn audited(client: &RawClient, req: Request<Full<Bytes>>) -> (u16, String) {
    let (code, headers, body) = send(client, req).await;
    let id = headers
        .get("audit-id")
        .unwrap_or_else(|| panic!("no Audit-Id header: {body}"))
        .to_str()
        .unwrap()
        .to_owned();
    (code, id)
}

/// The value of `ztgate_audit_events_<what>_total` for the webhook sink, from the metrics
/// exposition.
fn webhook_counter(h: &Harness, what: &str) -> u64 {
    let metrics = h.demo.gateway.gateway.metrics.encode();
    let prefix = format!("ztgate_audit_events_{what}_total{{sink=\"webhook:");
    let line = metrics
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {prefix}... line:\n{metrics}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Asserts that no credential (whole, or any of its three JWT parts) occurs in `text`.
fn assert_no_tokens(sink: &str, text: &str, tokens: &[&str]) {
    for token in tokens {
        assert!(!text.contains(token), "{sink} output contains a token");
        for part in token.split('.').filter(|p| p.len() >= 16) {
            assert!(
                !text.contains(part),
                "{sink} output contains part of a token"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Drop mode

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_mode_requests_succeed_drops_are_counted_and_events_flow_again() {
    let rx = Receiver::start().await;
    let issuer = DevIssuer::start(&Ca::new("issuer-ca")).await.unwrap();
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join("p.cedar"), POLICIES).unwrap();
    let h = Harness::start_with(DevSettings {
        policies: vec![files.path().join("p.cedar")],
        jwt: vec![dev_issuer(&issuer)],
        audit_yaml: Some(audit_yaml(&rx, files.path(), "Drop", true)),
        ..Default::default()
    })
    .await;
    let audit_file = files.path().join("audit.log");
    let cert_kc = h.kubeconfig("carol", &["team-a"]);
    let token = alice_token(&issuer);
    let token_kc = token_kubeconfig(&h, "alice-token", &token);
    let wrong_audience = issuer.token(
        "mallory",
        "not-ztgate",
        Duration::from_secs(600),
        serde_json::Value::Null,
    );
    let client = h.client(None, false);
    let kubectl_ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    // Receiver up: events arrive as EventLists.
    kubectl_ok(h.kubectl(&cert_kc, &["get", "pods", "-n", "team-a"]).await);
    kubectl_ok(h.kubectl(&token_kc, &["get", "pods", "-n", "team-a"]).await);
    let (code, first) = audited(&client, bearer(&h.uri(PODS), &token)).await;
    assert_eq!(code, 200);
    tokio::time::timeout(
        Duration::from_secs(20),
        h.demo.gateway.gateway.auditor.flush(),
    )
    .await
    .expect("flush with the receiver up");
    assert!(rx.has_event(&first, "ResponseComplete"));
    assert_eq!(webhook_counter(&h, "dropped"), 0);
    let written_before = webhook_counter(&h, "written");
    assert!(written_before >= 6, "{written_before}");

    // Receiver down: every kubectl call and request still succeeds at once; the webhook sink's
    // queue (8 events) fills while its first batch is being retried, and the rest is dropped.
    rx.stop().await;
    for _ in 0..3 {
        kubectl_ok(h.kubectl(&token_kc, &["get", "pods", "-n", "team-a"]).await);
    }
    for i in 0..20 {
        let uri = h.uri(&format!("{PODS}?access_token=leak-{i}"));
        let (code, _, body) =
            tokio::time::timeout(Duration::from_secs(5), send(&client, bearer(&uri, &token)))
                .await
                .expect("a request never waits for audit in Drop mode");
        assert_eq!(code, 200, "{body}");
    }
    let (code, _) = audited(&client, bearer(&h.uri(PODS), &wrong_audience)).await;
    assert_eq!(code, 401);
    let dropped = webhook_counter(&h, "dropped");
    assert!(dropped >= 20, "dropped {dropped}");
    assert_eq!(
        webhook_counter(&h, "written"),
        written_before,
        "nothing reached a receiver that is down"
    );
    // The file sink next to it lost nothing.
    let counts = h.demo.gateway.gateway.auditor.sink_counts();
    assert!(counts[0].name.starts_with("file:"), "{counts:?}");
    assert_eq!(counts[0].dropped, 0, "{counts:?}");

    // Receiver back: the batch that was being retried arrives, and later requests flow again.
    rx.restart();
    support::wait_until(
        Duration::from_secs(30),
        "the held batch is delivered",
        || webhook_counter(&h, "written") > written_before,
    )
    .await;
    let lines_before = std::fs::read_to_string(&audit_file)
        .unwrap()
        .lines()
        .count();
    kubectl_ok(h.kubectl(&token_kc, &["get", "pods", "-n", "team-a"]).await);
    let mut later = Vec::new();
    for _ in 0..3 {
        let (code, id) = audited(&client, bearer(&h.uri(PODS), &token)).await;
        assert_eq!(code, 200);
        later.push(id);
    }
    tokio::time::timeout(
        Duration::from_secs(30),
        h.demo.gateway.gateway.auditor.flush(),
    )
    .await
    .expect("flush once the receiver is back");
    // kubectl's own requests, found in the file sink.
    let text = std::fs::read_to_string(&audit_file).unwrap();
    let kubectl_ids: Vec<String> = text
        .lines()
        .skip(lines_before)
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| {
            e["userAgent"]
                .as_str()
                .is_some_and(|ua| ua.starts_with("kubectl"))
        })
        .map(|e| e["auditID"].as_str().unwrap().to_owned())
        .collect();
    assert!(!kubectl_ids.is_empty(), "kubectl's request is in the file");
    for id in later.iter().chain(&kubectl_ids) {
        for stage in ["RequestReceived", "ResponseComplete"] {
            assert!(
                rx.has_event(id, stage),
                "{stage} of {id} did not reach the receiver"
            );
        }
    }
    assert_eq!(
        webhook_counter(&h, "dropped"),
        dropped,
        "nothing dropped once the receiver is back"
    );
    let delivered = rx.events();
    assert!(delivered
        .iter()
        .any(|e| e["user"]["username"] == "oidc:alice"));
    assert!(delivered.iter().any(|e| e["user"]["username"] == "carol"));

    // No sink holds a token: not the file, not the webhook bodies.
    let tokens = [token.as_str(), wrong_audience.as_str(), "leak-"];
    assert_no_tokens("file", &text, &tokens);
    assert_no_tokens("webhook", &rx.raw_text(), &tokens);
}

// ---------------------------------------------------------------------------------------------
// Block mode

/// In `Block` mode a request whose audit event finds the sink's queue full waits — without a
/// time limit: `timeouts.request` (2s here) bounds the upstream call, not the wait for audit. The
/// wait comes after the request was forwarded (the gateway records an exchange's events when it
/// has the answer), so kube-apiserver has acted; the client gets the answer once the sink has
/// room again, and no event is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_mode_holds_the_answer_until_the_receiver_takes_events_again() {
    let rx = Receiver::start().await;
    rx.unavailable.store(true, Ordering::SeqCst);
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join("p.cedar"), POLICIES).unwrap();
    let h = Harness::start_with(DevSettings {
        policies: vec![files.path().join("p.cedar")],
        request_timeout: "2s",
        audit_yaml: Some(audit_yaml(&rx, files.path(), "Block", false)),
        ..Default::default()
    })
    .await;
    let carol = h.demo.env.pki.user("carol", &["team-a"]);
    let client = h.client(Some(&carol), false);

    // The receiver answers 503: batches are retried, the queue fills, then a request waits.
    let mut blocked = None;
    for i in 0..20 {
        let c = client.clone();
        let uri = h.uri(&format!("{PODS}?limit={}", i + 1));
        let mut answer = tokio::spawn(async move { audited(&c, get(&uri)).await });
        match tokio::time::timeout(Duration::from_secs(4), &mut answer).await {
            Ok(done) => assert_eq!(done.unwrap().0, 200),
            Err(_) => {
                blocked = Some((i + 1, answer));
                break;
            }
        }
    }
    let (limit, answer) = blocked.expect("a request waits once the webhook queue is full");
    // One batch in flight plus eight queued events: five requests' worth at most.
    assert!(limit <= 6, "the first waiting request was number {limit}");
    // Waiting longer than timeouts.request, after kube-apiserver had the request.
    let query = format!("limit={limit}");
    assert!(
        h.demo
            .apiserver
            .requests()
            .iter()
            .any(|r| r.path == PODS && r.query.as_deref() == Some(query.as_str())),
        "the waiting request was forwarded before it waited for audit"
    );
    assert!(!answer.is_finished());
    assert_eq!(webhook_counter(&h, "dropped"), 0);

    // The receiver takes events again: the waiting request is answered, nothing was lost.
    rx.unavailable.store(false, Ordering::SeqCst);
    let (code, id) = tokio::time::timeout(Duration::from_secs(40), answer)
        .await
        .expect("the request is answered once the sink has room")
        .unwrap();
    assert_eq!(code, 200);
    tokio::time::timeout(
        Duration::from_secs(40),
        h.demo.gateway.gateway.auditor.flush(),
    )
    .await
    .expect("flush once the receiver accepts");
    assert!(rx.has_event(&id, "ResponseComplete"));
    assert_eq!(webhook_counter(&h, "dropped"), 0);
    let written = webhook_counter(&h, "written");
    assert_eq!(written as usize, rx.events().len());
    assert_eq!(written, 2 * limit as u64, "every request's two events");
}

// ---------------------------------------------------------------------------------------------
// stdout

/// The stdout sink of a real `ztgate serve` process: its standard output holds only audit
/// events (logs go to stderr), and none of the tokens used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_sink_of_ztgate_serve_has_the_events_and_no_tokens() {
    support::init_logs();
    let issuer = DevIssuer::start(&Ca::new("issuer-ca")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.cedar"), POLICIES).unwrap();
    let pki = TestPki::new();
    let apiserver = ApiServer::start(ApiServerOptions::new(&pki)).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = DevEnv::create(
        dir.path(),
        pki,
        &apiserver.url(),
        &DevSettings {
            listen: format!("127.0.0.1:{port}"),
            operations: false,
            policies: vec![dir.path().join("p.cedar")],
            jwt: vec![dev_issuer(&issuer)],
            audit_yaml: Some("audit:\n  sinks:\n    - type: stdout\n".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let mut gw = tokio::process::Command::new(env!("CARGO_BIN_EXE_ztgate"))
        .args(["serve", "--config"])
        .arg(&env.config_path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = {
        use tokio::io::AsyncReadExt;
        let mut pipe = gw.stdout.take().unwrap();
        tokio::spawn(async move {
            let mut s = String::new();
            let _ = pipe.read_to_string(&mut s).await;
            s
        })
    };
    let base = format!("https://127.0.0.1:{port}");
    let client = support::raw_client(&env.pki.gateway_ca.cert_pem(), None, false);
    let mut ready = false;
    for _ in 0..100 {
        if let Ok(Ok(r)) = tokio::time::timeout(
            Duration::from_secs(1),
            client.request(get(&format!("{base}/readyz"))),
        )
        .await
        {
            if r.status() == 200 {
                ready = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "ztgate serve became ready");

    let token = alice_token(&issuer);
    let wrong_audience = issuer.token(
        "mallory",
        "not-ztgate",
        Duration::from_secs(600),
        serde_json::Value::Null,
    );
    let (code, id) = audited(
        &client,
        bearer(&format!("{base}{PODS}?token=leak-me"), &token),
    )
    .await;
    assert_eq!(code, 200);
    let (code, _) = audited(&client, bearer(&format!("{base}{PODS}"), &wrong_audience)).await;
    assert_eq!(code, 401);

    // SIGTERM: the gateway drains, and its sinks write what is queued before it exits.
    let pid = gw.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    tokio::time::timeout(Duration::from_secs(40), gw.wait())
        .await
        .expect("ztgate serve exited after SIGTERM")
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(5), stdout)
        .await
        .unwrap()
        .unwrap();
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(events.iter().all(|e| e["kind"] == "Event"), "{out}");
    assert!(
        events
            .iter()
            .any(|e| e["auditID"] == id.as_str() && e["user"]["username"] == "oidc:alice"),
        "{out}"
    );
    assert!(events
        .iter()
        .any(|e| e["responseStatus"]["code"] == 401
            && e["annotations"]["ztgate.dev/decision"] == "deny"));
    assert_no_tokens("stdout", &out, &[&token, &wrong_audience, "leak-me"]);
    apiserver.shutdown().await;
}
