//! Audit events in kube-apiserver's format, read back from the file sink after a kubectl session.

mod support;

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
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.cedar"), POLICIES).unwrap();
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
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.demo.gateway.gateway.auditor.flush().await;
    let evs = events(&audit);
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
