//! Device posture: kubectl works only from a device with fresh posture; signed reports are
//! verified like user tokens and bad ones change nothing; live streams are decided again when
//! posture lapses or changes, or policy changes.

use crate::support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use support::{send, status_of, Harness};
use ztgate::demo::{DevJwtIssuer, DevSettings};
use ztgate_testkit::pki::{Ca, CertKey};
use ztgate_testkit::DevIssuer;

/// The shipped discovery policy: kubectl must find the API before it asks for anything.
const DISCOVERY: &str = include_str!("../../config/policies/00-discovery.cedar");

const PODS: &str = "/api/v1/namespaces/team-a/pods";
const WATCH: &str = "/api/v1/namespaces/team-a/pods?watch=true";

/// team-a may work in its namespace from a device with known posture whose disk is encrypted;
/// the security group may read posture records.
const POLICIES: &str = r#"
@id("team-a-from-a-healthy-device")
permit (principal in k8s::Group::"team-a", action, resource in k8s::Namespace::"team-a")
when { context has device && context.device has posture };

@id("encrypted-disks-only")
forbid (principal, action, resource in k8s::Namespace::"team-a")
unless { context has device && context.device has posture && context.device.posture.diskEncrypted };

@id("security-reads-posture")
permit (principal in k8s::Group::"security", action, resource is k8s::NonResourceURL)
when { resource.path like "/v1/devices/posture*" };
"#;

/// The policy without the encryption rule: any device with posture will do.
const POLICIES_NO_ENCRYPTION_RULE: &str = r#"
@id("team-a-from-a-healthy-device")
permit (principal in k8s::Group::"team-a", action, resource in k8s::Namespace::"team-a")
when { context has device && context.device has posture };

@id("security-reads-posture")
permit (principal in k8s::Group::"security", action, resource is k8s::NonResourceURL)
when { resource.path like "/v1/devices/posture*" };
"#;

struct Env {
    h: Harness,
    users: DevIssuer,
    mdm: DevIssuer,
    device_ca: Ca,
    dir: tempfile::TempDir,
}

async fn env(self_ttl: &str, policies: &str) -> Env {
    let users = DevIssuer::start(&Ca::new("users-idp-ca")).await.unwrap();
    let mdm = DevIssuer::start(&Ca::new("mdm-ca")).await.unwrap();
    let device_ca = Ca::new("device-ca");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.cedar"), policies).unwrap();
    std::fs::write(dir.path().join("discovery.cedar"), DISCOVERY).unwrap();
    std::fs::write(dir.path().join("mdm-ca.pem"), mdm.ca_pem()).unwrap();
    let posture = format!(
        "posture:\n  required: true\n  maxAge: 1h\n  selfReports:\n    ttl: {self_ttl}\n  issuers:\n    - issuer:\n        url: {url}\n        audiences: [ztgate-posture]\n        certificateAuthorityFile: {ca}\n      source: mdm\n",
        url = mdm.issuer_url(),
        ca = dir.path().join("mdm-ca.pem").display(),
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
        policies: vec![
            dir.path().join("p.cedar"),
            dir.path().join("discovery.cedar"),
        ],
        policy_reload_interval: "1s",
        ..Default::default()
    })
    .await;
    Env {
        h,
        users,
        mdm,
        device_ca,
        dir,
    }
}

impl Env {
    fn token(&self, user: &str, ttl: Duration) -> String {
        self.users
            .token(user, "ztgate", ttl, json!({"groups": ["team-a"]}))
    }

    /// A signed MDM report about `device`.
    fn report(&self, device: &str, ttl: Duration, posture: Value) -> String {
        self.mdm
            .token(device, "ztgate-posture", ttl, json!({ "posture": posture }))
    }

    /// A kubeconfig presenting a token and a device certificate, as `ztgate login` arranges.
    fn kubeconfig(&self, name: &str, token: &str, device: &CertKey) -> PathBuf {
        let (crt, key) = device.write(self.dir.path(), name);
        let path = self.dir.path().join(format!("{name}.kubeconfig"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: gw\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\nusers:\n- name: u\n  user:\n    token: {token}\n    client-certificate: {crt}\n    client-key: {key}\ncontexts:\n- name: c\n  context: {{cluster: gw, user: u, namespace: team-a}}\ncurrent-context: c\n",
                url = self.h.url(),
                ca = self.h.demo.env.gateway_ca_path.display(),
                crt = crt.display(),
                key = key.display(),
            ),
        )
        .unwrap();
        path
    }

    async fn post_report(&self, jwt: &str, cert: Option<&CertKey>) -> (u16, String) {
        let req = Request::post(self.h.uri("/v1/devices/posture"))
            .header("content-type", "application/jwt")
            .body(Full::new(Bytes::from(jwt.to_owned())))
            .unwrap();
        let (code, _, body) = send(&self.h.client(cert, false), req).await;
        (code, body)
    }

    /// The stored record of `device`, read by a security admin (None: 404).
    async fn record(&self, device: &str) -> Option<Value> {
        let admin = self.h.demo.env.pki.user("sec-admin", &["security"]);
        let req = Request::get(self.h.uri(&format!("/v1/devices/posture?device={device}")))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (code, _, body) = send(&self.h.client(Some(&admin), false), req).await;
        match code {
            200 => Some(serde_json::from_str(&body).unwrap()),
            404 => None,
            other => panic!("reading posture: {other} {body}"),
        }
    }

    fn get(&self, token: &str, path: &str) -> Request<Full<Bytes>> {
        Request::get(self.h.uri(path))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    }
}

fn ztgate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ztgate")
}

fn healthy() -> Value {
    json!({"os": "macos", "osVersion": "15.1", "diskEncrypted": true, "firewall": true, "managed": true})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_works_only_from_a_device_with_fresh_posture() {
    let e = env("1h", POLICIES_NO_ENCRYPTION_RULE).await;
    let laptop = e.device_ca.issue_client("laptop-1", &[]);
    let kc = e.kubeconfig(
        "alice",
        &e.token("alice", Duration::from_secs(600)),
        &laptop,
    );

    // No posture record: 401 with a message telling the user what to do; nothing upstream.
    e.h.demo.apiserver.clear_requests();
    let out = e.h.kubectl(&kc, &["get", "pods"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("ztgate device report"),
        "kubectl shows how to fix it: {stderr}"
    );
    // Only discovery went upstream: no request for data.
    let upstream = e.h.demo.apiserver.requests();
    assert!(
        upstream.iter().all(|r| !r.path.contains("/pods")),
        "{:?}",
        upstream.iter().map(|r| &r.path).collect::<Vec<_>>()
    );

    // The device agent reports this machine's posture with the device certificate.
    let (crt, key) = laptop.write(e.dir.path(), "agent");
    let out = tokio::process::Command::new(ztgate_bin())
        .args(["device", "report", "--server", e.h.url(), "--ca"])
        .arg(&e.h.demo.env.gateway_ca_path)
        .arg("--cert")
        .arg(&crt)
        .arg("--key")
        .arg(&key)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let record: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(record["deviceId"], "laptop-1");
    assert_eq!(record["source"], "self");
    assert_eq!(record["attributes"]["os"], std::env::consts::OS);

    // Now kubectl works from that device.
    let out = e.h.kubectl(&kc, &["get", "pods"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A self-report needs the device certificate; one naming another device is refused.
    let self_report = |body: Value| {
        Request::post(e.h.uri("/v1/devices/posture"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    };
    let (code, _, body) = send(
        &e.h.client(None, false),
        self_report(json!({"attributes": healthy()})),
    )
    .await;
    assert_eq!(code, 401, "{body}");
    let (code, _, body) = send(
        &e.h.client(Some(&laptop), false),
        self_report(json!({"deviceId": "laptop-2", "attributes": healthy()})),
    )
    .await;
    assert_eq!(code, 403, "{body}");
    assert!(e.record("laptop-2").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_reports_are_verified_and_bad_ones_change_nothing() {
    let e = env("1h", POLICIES).await;
    let laptop = e.device_ca.issue_client("laptop-1", &[]);

    // A valid report, posted by the MDM (no certificate needed: the signature is the
    // credential).
    let (code, body) = e
        .post_report(
            &e.report("laptop-1", Duration::from_secs(600), healthy()),
            None,
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let before = e.record("laptop-1").await.expect("stored");
    assert_eq!(before["source"], "mdm");
    assert_eq!(before["attributes"]["diskEncrypted"], true);

    let bad_posture = json!({"os": "macos", "diskEncrypted": false});
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let stranger = DevIssuer::start(&Ca::new("stranger-ca")).await.unwrap();
    let valid = e.report("laptop-1", Duration::from_secs(600), bad_posture.clone());
    let (head, _sig) = valid.rsplit_once('.').unwrap();
    let forged = format!("{head}.{}", "A".repeat(342));
    let expired = e.mdm.token(
        "laptop-1",
        "ztgate-posture",
        Duration::ZERO,
        json!({"posture": bad_posture, "iat": now - 7200, "nbf": now - 7200, "exp": now - 3600}),
    );
    let unknown_issuer = stranger.token(
        "laptop-1",
        "ztgate-posture",
        Duration::from_secs(600),
        json!({"posture": bad_posture}),
    );
    let wrong_audience = e.mdm.token(
        "laptop-1",
        "ztgate",
        Duration::from_secs(600),
        json!({"posture": bad_posture}),
    );
    for (what, jwt, cert, want) in [
        ("bad signature", forged.as_str(), None, 401),
        ("expired", expired.as_str(), None, 401),
        ("unknown issuer", unknown_issuer.as_str(), None, 401),
        ("wrong audience", wrong_audience.as_str(), None, 401),
        ("garbage", "not-a-jwt", None, 401),
    ] {
        let (code, body) = e.post_report(jwt, cert).await;
        assert_eq!(code, want, "{what}: {body}");
        // No detail an attacker could use.
        assert_eq!(status_of(&body).1, "Unauthorized", "{what}");
    }
    // Another device's report, relayed with laptop-1's certificate.
    let (code, body) = e
        .post_report(
            &e.report("laptop-2", Duration::from_secs(600), bad_posture.clone()),
            Some(&laptop),
        )
        .await;
    assert_eq!(code, 403, "{body}");
    assert!(e.record("laptop-2").await.is_none());
    // An older report (a replay of an earlier one) does not replace a newer record.
    let older = e.mdm.token(
        "laptop-1",
        "ztgate-posture",
        Duration::from_secs(600),
        json!({"posture": bad_posture, "iat": now - 60}),
    );
    let (code, body) = e.post_report(&older, None).await;
    assert_eq!(code, 409, "{body}");
    // A self-report cannot replace the MDM's record while it is in force.
    let req = Request::post(e.h.uri("/v1/devices/posture"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            json!({"attributes": {"diskEncrypted": true}}).to_string(),
        )))
        .unwrap();
    let (code, _, body) = send(&e.h.client(Some(&laptop), false), req).await;
    assert_eq!(code, 409, "{body}");

    assert_eq!(
        e.record("laptop-1").await.unwrap(),
        before,
        "nothing changed"
    );
    let token = e.token("alice", Duration::from_secs(600));
    let (code, _, body) = send(&e.h.client(Some(&laptop), true), e.get(&token, PODS)).await;
    assert_eq!(code, 200, "the device still works: {body}");
}

/// Reads a watch body until it ends; returns its text and when it ended.
async fn watch_until_closed(
    resp: http::Response<hyper::body::Incoming>,
    limit: Duration,
) -> (String, Instant) {
    let mut body = resp.into_body();
    let mut text = String::new();
    let read = async {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Some(d) = f.data_ref() {
                        text.push_str(&String::from_utf8_lossy(d));
                    }
                }
                Err(_) => break,
            }
        }
    };
    tokio::time::timeout(limit, read)
        .await
        .unwrap_or_else(|_| panic!("the watch was not closed within {limit:?}"));
    (text, Instant::now())
}

fn last_event(text: &str) -> Value {
    serde_json::from_str(text.lines().last().expect("an event")).expect("JSON event")
}

async fn open_watch(e: &Env, device: &CertKey) -> http::Response<hyper::body::Incoming> {
    let token = e.token("alice", Duration::from_secs(600));
    let client = e.h.client(Some(device), false);
    let resp = client.request(e.get(&token, WATCH)).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_is_closed_when_posture_lapses_and_when_a_report_fails_policy() {
    let e = env("1h", POLICIES).await;
    let laptop = e.device_ca.issue_client("laptop-1", &[]);

    // A report that lapses in 3 s: the watch is closed then, with 401 (client-go logs in again)
    // and the reason. Its expiry is in whole seconds, so it lapses 2 to 3 s after it is signed:
    // the time is taken before that.
    let started = Instant::now();
    let (code, body) = e
        .post_report(
            &e.report("laptop-1", Duration::from_secs(3), healthy()),
            None,
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let watch = open_watch(&e, &laptop).await;
    let (text, ended) = watch_until_closed(watch, Duration::from_secs(10)).await;
    let ev = last_event(&text);
    assert_eq!(ev["type"], "ERROR", "{text}");
    assert_eq!(ev["object"]["code"], 401, "{text}");
    let msg = ev["object"]["message"].as_str().unwrap();
    assert!(msg.contains("posture") && msg.contains("laptop-1"), "{msg}");
    assert!(
        ended.duration_since(started) >= Duration::from_secs(2),
        "closed before the report lapsed: {text}"
    );

    // A fresh report lets it in again; then a report that the disk is no longer encrypted
    // closes the live watch (403, the policy's reason) as soon as it is stored.
    let (code, body) = e
        .post_report(
            &e.report("laptop-1", Duration::from_secs(600), healthy()),
            None,
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let mut latencies = Vec::new();
    for round in 0..5 {
        // No wait after the answer: a watch that has been answered is one the gateway holds, so
        // the report below must reach it.
        let watch = open_watch(&e, &laptop).await;
        let encrypted = round % 2 == 1;
        let posted = Instant::now();
        // Alternate: unencrypted closes; then restore so the next round can open a watch.
        let (code, body) = e
            .post_report(
                &e.mdm.token(
                    "laptop-1",
                    "ztgate-posture",
                    Duration::from_secs(600),
                    json!({"posture": {"os": "macos", "diskEncrypted": encrypted}, "iat": SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + round}),
                ),
                None,
            )
            .await;
        assert_eq!(code, 200, "{body}");
        if encrypted {
            // Still allowed: the watch stays open.
            drop(watch);
            continue;
        }
        let (text, ended) = watch_until_closed(watch, Duration::from_secs(5)).await;
        let ev = last_event(&text);
        assert_eq!(ev["object"]["code"], 403, "{text}");
        assert!(
            ev["object"]["message"]
                .as_str()
                .unwrap()
                .contains("policy no longer allows"),
            "{text}"
        );
        latencies.push(ended.duration_since(posted));
        // New requests are refused too.
        let token = e.token("alice", Duration::from_secs(600));
        let (code, _, _) = send(&e.h.client(Some(&laptop), true), e.get(&token, PODS)).await;
        assert_eq!(code, 403);
        // Restore for the next round.
        let (code, body) = e
            .post_report(
                &e.mdm.token(
                    "laptop-1",
                    "ztgate-posture",
                    Duration::from_secs(600),
                    json!({"posture": healthy(), "iat": SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + round + 1}),
                ),
                None,
            )
            .await;
        assert_eq!(code, 200, "{body}");
    }
    // A report reaches a live stream at once (typically in milliseconds). The bound is on the
    // median and far above that, so a loaded machine does not fail the test, while a report
    // that only lands on some later sweep does.
    latencies.sort();
    eprintln!("posture report -> watch closed: {latencies:?}");
    let median = latencies[latencies.len() / 2];
    assert!(median < Duration::from_secs(1), "{latencies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_closes_the_streams_it_no_longer_allows() {
    let e = env("1h", POLICIES_NO_ENCRYPTION_RULE).await;
    let laptop = e.device_ca.issue_client("laptop-1", &[]);
    let (code, body) = e
        .post_report(
            &e.report(
                "laptop-1",
                Duration::from_secs(600),
                json!({"os": "linux", "diskEncrypted": false}),
            ),
            None,
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let watch = open_watch(&e, &laptop).await;
    // Tighten the policy: unencrypted disks are no longer allowed.
    write_policy(&e.dir.path().join("p.cedar"), POLICIES);
    let (text, _) = watch_until_closed(watch, Duration::from_secs(10)).await;
    let ev = last_event(&text);
    assert_eq!(ev["type"], "ERROR", "{text}");
    assert_eq!(ev["object"]["code"], 403, "{text}");
    assert!(
        ev["object"]["message"]
            .as_str()
            .unwrap()
            .contains("encrypted-disks-only"),
        "the message names the policy: {text}"
    );
}

fn write_policy(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A `kubectl exec -i ... -- cat` session that is live (an echoed line came back).
struct Session {
    child: tokio::process::Child,
    _stdin: tokio::process::ChildStdin,
    stderr: tokio::task::JoinHandle<String>,
}

async fn exec_session(kc: &Path) -> Session {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let mut child = support::kubectl_command(
        kc,
        &["exec", "-i", "web-0", "-n", "team-a", "--", "cat"],
        &[],
    )
    .stdin(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut pipe = child.stderr.take().unwrap();
    let stderr = tokio::spawn(async move {
        let mut s = String::new();
        let _ = pipe.read_to_string(&mut s).await;
        s
    });
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            stdin.write_all(b"ping\n").await.unwrap();
            match tokio::time::timeout(Duration::from_millis(500), stdout.next_line()).await {
                Ok(Ok(Some(line))) => {
                    assert_eq!(line, "ping");
                    return;
                }
                Ok(other) => panic!("kubectl exec ended before the session was live: {other:?}"),
                Err(_) => continue,
            }
        }
    })
    .await
    .expect("the exec session came up");
    Session {
        child,
        _stdin: stdin,
        stderr,
    }
}

impl Session {
    /// Waits for kubectl to exit; its stderr and when it exited.
    async fn closed(mut self, limit: Duration) -> (std::process::ExitStatus, String, Instant) {
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("kubectl exec still running after {limit:?}"))
            .unwrap();
        let at = Instant::now();
        (status, self.stderr.await.unwrap(), at)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_exec_is_closed_when_posture_lapses_and_when_a_report_fails_policy() {
    let e = env("1h", POLICIES).await;
    let laptop = e.device_ca.issue_client("laptop-1", &[]);
    let kc = e.kubeconfig(
        "alice",
        &e.token("alice", Duration::from_secs(600)),
        &laptop,
    );

    // The report lapses 4 s after it was made: the session ends then, with the reason.
    let (code, body) = e
        .post_report(
            &e.report("laptop-1", Duration::from_secs(4), healthy()),
            None,
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let session = exec_session(&kc).await;
    let (status, stderr, _) = session.closed(Duration::from_secs(15)).await;
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("posture") && stderr.contains("ztgate device report"),
        "kubectl shows why: {stderr}"
    );

    // A fresh report; then a report that the disk is not encrypted ends the session at once.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (code, body) = e
        .post_report(
            &e.mdm.token(
                "laptop-1",
                "ztgate-posture",
                Duration::from_secs(600),
                json!({"posture": healthy(), "iat": now}),
            ),
            None,
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let session = exec_session(&kc).await;
    let posted = Instant::now();
    let (code, body) = e
        .post_report(
            &e.mdm.token(
                "laptop-1",
                "ztgate-posture",
                Duration::from_secs(600),
                json!({"posture": {"os": "macos", "diskEncrypted": false}, "iat": now + 1}),
            ),
            None,
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let (status, stderr, at) = session.closed(Duration::from_secs(5)).await;
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("policy no longer allows"),
        "kubectl shows why: {stderr}"
    );
    println!(
        "posture report -> kubectl exec exited: {:?}",
        at.duration_since(posted)
    );
    assert!(at.duration_since(posted) < Duration::from_secs(2));
}
