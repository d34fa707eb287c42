//! Audit events in kube-apiserver's format, read back from the file sink after a kubectl session.

use crate::support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::{send, Harness};
use ztgate::demo::{DevJwtIssuer, DevSettings};
use ztgate_testkit::DevIssuer;

const POLICIES: &str = r#"
@id("discovery-read")
permit (principal, action == k8s::Action::"get", resource is k8s::NonResourceURL)
when { resource.path == "/api" || resource.path like "/api/*" || resource.path == "/apis" || resource.path like "/apis/*" || resource.path like "/openapi/*" || resource.path == "/version" };

@id("team-a-namespace")
permit (principal in k8s::Group::"team-a", action, resource in k8s::Namespace::"team-a");

@id("no-exec")
@reason("exec is disabled in this test")
forbid (principal, action, resource is k8s::Resource)
when { resource.subresource == "exec" };
"#;

fn events(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is one JSON event"))
        .collect()
}

async fn harness(
    extra: impl FnOnce(&mut DevSettings),
) -> (Harness, tempfile::TempDir, std::path::PathBuf) {
    harness_with(POLICIES, extra).await
}

async fn harness_with(
    policies: &str,
    extra: impl FnOnce(&mut DevSettings),
) -> (Harness, tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.cedar"), policies).unwrap();
    let audit = dir.path().join("audit.log");
    let mut s = DevSettings {
        policies: vec![dir.path().join("p.cedar")],
        audit_file: Some(audit.clone()),
        ..Default::default()
    };
    extra(&mut s);
    (Harness::start_with(s).await, dir, audit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_has_one_event_per_stage_with_user_decision_and_reason() {
    let (h, _dir, audit) = harness(|_| {}).await;
    let kc = h.kubeconfig("alice", &["team-a"]);
    h.demo.apiserver.clear_requests();
    let out = h.kubectl(&kc, &["get", "pods", "-n", "team-a"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = h
        .kubectl_env(
            &kc,
            &["exec", "-i", "web-0", "-n", "team-a", "--", "cat"],
            &[],
            Some(b"x"),
        )
        .await;
    assert!(!out.status.success());
    h.demo.gateway.gateway.auditor.flush().await;

    let evs = events(&audit);
    for e in &evs {
        assert_eq!(e["kind"], "Event");
        assert_eq!(e["apiVersion"], "audit.k8s.io/v1");
    }
    let list: Vec<_> = evs
        .iter()
        .filter(|e| {
            e["requestURI"]
                .as_str()
                .unwrap()
                .starts_with("/api/v1/namespaces/team-a/pods")
                && e["verb"] == "list"
        })
        .collect();
    let stages: Vec<&str> = list.iter().map(|e| e["stage"].as_str().unwrap()).collect();
    assert_eq!(stages, ["RequestReceived", "ResponseComplete"], "{list:#?}");
    let done = list[1];
    assert_eq!(done["user"]["username"], "alice");
    assert_eq!(done["objectRef"]["resource"], "pods");
    assert_eq!(done["objectRef"]["namespace"], "team-a");
    assert_eq!(done["responseStatus"]["code"], 200);
    assert_eq!(done["annotations"]["ztgate.dev/decision"], "allow");
    assert_eq!(done["annotations"]["ztgate.dev/policy"], "team-a-namespace");
    assert_eq!(done["annotations"]["ztgate.dev/authn-method"], "x509");
    assert_eq!(list[0]["auditID"], done["auditID"]);

    // The same audit ID reached kube-apiserver, so both audit logs can be joined.
    let seen = h.demo.apiserver.requests();
    let upstream = seen
        .iter()
        .find(|r| r.path == "/api/v1/namespaces/team-a/pods" && r.method == "GET")
        .expect("list reached the stand-in");
    assert_eq!(
        upstream.header_values("audit-id"),
        [done["auditID"].as_str().unwrap()]
    );

    let exec: Vec<_> = evs
        .iter()
        .filter(|e| e["objectRef"]["subresource"] == "exec" && e["stage"] == "ResponseComplete")
        .collect();
    assert!(!exec.is_empty(), "{evs:#?}");
    let denied = exec[0];
    assert_eq!(denied["responseStatus"]["code"], 403);
    assert_eq!(denied["annotations"]["ztgate.dev/decision"], "deny");
    assert_eq!(
        denied["annotations"]["ztgate.dev/reason"],
        "exec is disabled in this test"
    );
    assert_eq!(denied["annotations"]["ztgate.dev/policy"], "no-exec");

    // Per-sink counters are exported for alerting on lost audit events.
    let metrics = h.demo.gateway.gateway.metrics.encode();
    let written = metrics
        .lines()
        .find(|l| l.starts_with("ztgate_audit_events_written_total{sink=\"file:"))
        .unwrap_or_else(|| panic!("no written counter:\n{metrics}"));
    let n: u64 = written.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(n as usize, evs.len(), "{written}");
    assert!(
        metrics.contains("ztgate_audit_events_dropped_total{sink=\"file:"),
        "{metrics}"
    );
}

/// The audit policy file is re-read while the gateway runs: requests recorded at `None` leave no
/// event; once the file says `Metadata`, the same request is recorded, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_audit_policy_applies_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.cedar"), POLICIES).unwrap();
    let audit = dir.path().join("audit.log");
    let policy = dir.path().join("audit-policy.yaml");
    let level =
        |l: &str| format!("apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n  - level: {l}\n");
    std::fs::write(&policy, level("None")).unwrap();
    let h = Harness::start_with(DevSettings {
        policies: vec![dir.path().join("p.cedar")],
        reload_interval: "1s",
        audit_yaml: Some(format!(
            "audit:\n  policyFile: {}\n  sinks:\n    - type: file\n      path: {}\n",
            policy.display(),
            audit.display()
        )),
        ..Default::default()
    })
    .await;
    let kc = h.kubeconfig("alice", &["team-a"]);
    let lists = |audit: &std::path::Path| {
        events(audit)
            .into_iter()
            .filter(|e| e["verb"] == "list" && e["objectRef"]["resource"] == "pods")
            .count()
    };

    let out = h.kubectl(&kc, &["get", "pods", "-n", "team-a"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    h.demo.gateway.gateway.auditor.flush().await;
    assert_eq!(lists(&audit), 0, "level None records nothing");

    std::fs::write(&policy, level("Metadata")).unwrap();
    support::eventually(
        Duration::from_secs(20),
        "a request recorded under the edited policy",
        || async {
            let out = h.kubectl(&kc, &["get", "pods", "-n", "team-a"]).await;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            h.demo.gateway.gateway.auditor.flush().await;
            (lists(&audit) > 0).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_is_audited_when_it_starts_and_when_shutdown_closes_it() {
    let (h, _dir, audit) = harness(|_| {}).await;
    let alice = h.demo.env.pki.user("alice", &["team-a"]);
    let client = h.client(Some(&alice), false);
    let watch = client
        .request(support::get(
            &h.uri("/api/v1/namespaces/team-a/pods?watch=1"),
        ))
        .await
        .unwrap();
    assert_eq!(watch.status(), 200);
    h.demo.gateway.shutdown();
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        http_body_util::BodyExt::collect(watch.into_body()),
    )
    .await
    .expect("the watch ended when the gateway shut down");
    let evs = events_when(&h, &audit, "the watch's ResponseComplete", |evs| {
        evs.iter()
            .any(|e| e["verb"] == "watch" && e["stage"] == "ResponseComplete")
    })
    .await;
    let watch: Vec<_> = evs.iter().filter(|e| e["verb"] == "watch").collect();
    let stages: Vec<&str> = watch.iter().map(|e| e["stage"].as_str().unwrap()).collect();
    assert_eq!(
        stages,
        ["RequestReceived", "ResponseStarted", "ResponseComplete"],
        "{watch:#?}"
    );
    assert_eq!(
        watch[2]["annotations"]["ztgate.dev/stream-closed"],
        "the gateway is shutting down; reconnect"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_appear_in_the_audit_log() {
    let ca = ztgate_testkit::pki::Ca::new("issuer-ca");
    let issuer = DevIssuer::start(&ca).await.unwrap();
    let (h, _dir, audit) = harness(|s| {
        s.jwt.push(DevJwtIssuer {
            url: issuer.issuer_url(),
            ca_pem: issuer.ca_pem(),
            audience: "ztgate".into(),
            username_claim: "sub".into(),
            username_prefix: "oidc:".into(),
            groups_prefix: String::new(),
        });
    })
    .await;
    let good = issuer.token(
        "alice",
        "ztgate",
        Duration::from_secs(600),
        serde_json::json!({"groups": ["team-a"]}),
    );
    let bad = issuer.token(
        "mallory",
        "not-ztgate",
        Duration::from_secs(600),
        serde_json::Value::Null,
    );
    let client = h.client(None, false);
    for (token, want) in [(&good, 200), (&bad, 401)] {
        let req = Request::get(
            h.uri("/api/v1/namespaces/team-a/pods?token=leak-me&access_token=leak-me"),
        )
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
        let (code, _, body) = send(&client, req).await;
        assert_eq!(code, want, "{body}");
    }
    h.demo.gateway.gateway.auditor.flush().await;
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(
        text.contains("oidc:alice"),
        "the allowed request was audited"
    );
    for secret in [
        good.as_str(),
        bad.as_str(),
        good.rsplit('.').next().unwrap(),
        "leak-me",
    ] {
        assert!(!text.contains(secret), "audit log contains a credential");
    }
}

// ---------------------------------------------------------------------------------------------
// Streams closed by a lock

const LOCK_POLICIES: &str = r#"
@id("discovery-read")
permit (principal, action == k8s::Action::"get", resource is k8s::NonResourceURL)
when { resource.path == "/api" || resource.path like "/api/*" || resource.path == "/apis" || resource.path like "/apis/*" || resource.path like "/openapi/*" || resource.path == "/version" };

@id("team-a-namespace")
permit (principal in k8s::Group::"team-a", action, resource in k8s::Namespace::"team-a");

@id("security-manages-locks")
permit (principal in k8s::Group::"security", action, resource is k8s::NonResourceURL)
when { resource.path like "/v1/locks*" };

@id("support-impersonates-deployer")
permit (principal in k8s::Group::"support", action == k8s::Action::"impersonate", resource is k8s::ImpersonatedUser)
when { resource.name == "deployer" };

@id("support-impersonates-team-a")
permit (principal in k8s::Group::"support", action == k8s::Action::"impersonate", resource is k8s::ImpersonatedGroup)
when { resource.name == "team-a" };
"#;

const LOCK_MESSAGE: &str = "laptop reported stolen";

/// Flushes the auditor and reads the file until `ready` holds (the gateway writes events from
/// background tasks; a stream's ResponseStarted means the gateway has it registered).
async fn events_when(
    h: &Harness,
    audit: &std::path::Path,
    what: &str,
    ready: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    for _ in 0..200 {
        h.demo.gateway.gateway.auditor.flush().await;
        let evs = events(audit);
        if ready(&evs) {
            return evs;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}:\n{:#?}", events(audit));
}

fn started<'a>(
    evs: &'a [serde_json::Value],
    pick: impl Fn(&serde_json::Value) -> bool + 'a,
) -> impl Iterator<Item = &'a serde_json::Value> + 'a {
    evs.iter()
        .filter(move |e| e["stage"] == "ResponseStarted" && pick(e))
}

fn is_watch(e: &serde_json::Value) -> bool {
    e["verb"] == "watch" && e["objectRef"]["resource"] == "pods"
}

fn is_exec(e: &serde_json::Value) -> bool {
    e["objectRef"]["subresource"] == "exec"
}

fn impersonating(e: &serde_json::Value) -> bool {
    e.get("impersonatedUser").is_some()
}

/// Reads everything a child wrote to a pipe, in the background.
fn collect<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    mut r: R,
) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut s = String::new();
        let _ = r.read_to_string(&mut s).await;
        s
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_closed_by_a_lock_have_every_stage_audited_with_the_lock_message() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    let (h, _dir, audit) = harness_with(LOCK_POLICIES, |_| {}).await;
    let kc = h.kubeconfig("alice", &["team-a", "support"]);

    // Three live streams held by alice: a watch, the same watch as `deployer` (kubectl --as),
    // and an interactive exec session.
    let mut watch = support::kubectl_command(&kc, &["get", "pods", "-n", "team-a", "-w"], &[])
        .spawn()
        .unwrap();
    let mut watch_as = support::kubectl_command(
        &kc,
        &[
            "--as=deployer",
            "--as-group=team-a",
            "get",
            "pods",
            "-n",
            "team-a",
            "-w",
        ],
        &[],
    )
    .spawn()
    .unwrap();
    let mut exec = support::kubectl_command(
        &kc,
        &["exec", "-i", "web-0", "-n", "team-a", "--", "cat"],
        &[],
    )
    .stdin(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let mut stdin = exec.stdin.take().unwrap();
    let mut stdout = BufReader::new(exec.stdout.take().unwrap()).lines();
    let exec_stderr = collect(exec.stderr.take().unwrap());
    // The exec session is live: what is typed comes back (the stand-in's container is `cat`).
    let echoed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            stdin.write_all(b"are you there\n").await.unwrap();
            stdin.flush().await.unwrap();
            match tokio::time::timeout(Duration::from_millis(500), stdout.next_line()).await {
                Ok(Ok(Some(line))) => return line,
                Ok(other) => panic!("kubectl exec ended before the session was live: {other:?}"),
                Err(_) => continue,
            }
        }
    })
    .await
    .expect("the exec session came up");
    assert_eq!(echoed, "are you there");
    events_when(&h, &audit, "all three streams to start", |evs| {
        started(evs, |e| is_watch(e) && !impersonating(e)).count() == 1
            && started(evs, |e| is_watch(e) && impersonating(e)).count() == 1
            && started(evs, is_exec).count() == 1
    })
    .await;

    // A security admin locks alice: all three end.
    let admin = h.demo.env.pki.user("sec-admin", &["security"]);
    let body = serde_json::json!({
        "target": {"kind": "user", "value": "alice"},
        "message": LOCK_MESSAGE,
    });
    let req = Request::post(h.uri("/v1/locks"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let (code, _, body) = send(&h.client(Some(&admin), false), req).await;
    assert_eq!(code, 201, "{body}");
    for (name, child) in [
        ("get -w", &mut watch),
        ("--as get -w", &mut watch_as),
        ("exec -i", &mut exec),
    ] {
        tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .unwrap_or_else(|_| panic!("kubectl {name} ended after the lock"))
            .unwrap();
    }
    drop(stdin);
    let stderr = exec_stderr.await.unwrap();
    let locked = format!("access is locked: {LOCK_MESSAGE}");
    assert!(stderr.contains(&locked), "kubectl exec stderr: {stderr}");

    let evs = events_when(&h, &audit, "the streams' final events", |evs| {
        evs.iter()
            .filter(|e| e["stage"] == "ResponseComplete" && (is_watch(e) || is_exec(e)))
            .count()
            == 3
    })
    .await;
    // (stream, which events are its, the user it was forwarded as)
    type Case = (
        &'static str,
        fn(&serde_json::Value) -> bool,
        Option<&'static str>,
    );
    let cases: [Case; 3] = [
        ("watch", |e| is_watch(e) && !impersonating(e), None),
        (
            "watch --as deployer",
            |e| is_watch(e) && impersonating(e),
            Some("deployer"),
        ),
        ("exec", is_exec, None),
    ];
    for (name, pick, as_user) in cases {
        let first = started(&evs, pick)
            .next()
            .unwrap_or_else(|| panic!("{name}: no ResponseStarted"));
        let id = first["auditID"].as_str().unwrap();
        let mine: Vec<&serde_json::Value> = evs.iter().filter(|e| e["auditID"] == id).collect();
        let stages: Vec<&str> = mine.iter().map(|e| e["stage"].as_str().unwrap()).collect();
        assert_eq!(
            stages,
            ["RequestReceived", "ResponseStarted", "ResponseComplete"],
            "{name}: {mine:#?}"
        );
        for e in &mine {
            assert_eq!(e["user"]["username"], "alice", "{name}: {e:#}");
            match as_user {
                Some(u) => {
                    assert_eq!(e["impersonatedUser"]["username"], u, "{name}: {e:#}");
                    assert_eq!(
                        e["impersonatedUser"]["groups"],
                        serde_json::json!(["team-a"]),
                        "{name}: {e:#}"
                    );
                }
                None => assert!(e.get("impersonatedUser").is_none(), "{name}: {e:#}"),
            }
            let a = &e["annotations"];
            assert_eq!(a["ztgate.dev/decision"], "allow", "{name}: {e:#}");
            assert_eq!(
                a["ztgate.dev/reason"], "allowed by policy \"team-a-namespace\"",
                "{name}: {e:#}"
            );
            assert_eq!(a["ztgate.dev/policy"], "team-a-namespace", "{name}: {e:#}");
            assert_eq!(a["ztgate.dev/authn-method"], "x509", "{name}: {e:#}");
        }
        assert_eq!(
            mine[0]["stageTimestamp"], mine[0]["requestReceivedTimestamp"],
            "{name}: RequestReceived says when the request arrived"
        );
        assert!(
            mine[0]["annotations"]
                .get("ztgate.dev/stream-closed")
                .is_none()
                && mine[1]["annotations"]
                    .get("ztgate.dev/stream-closed")
                    .is_none(),
            "{name}: only the final event says why the stream was closed"
        );
        assert_eq!(
            mine[2]["annotations"]["ztgate.dev/stream-closed"],
            locked.as_str(),
            "{name}: {:#}",
            mine[2]
        );
    }
}
