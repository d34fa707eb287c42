//! Locks (revocation): a lock refuses new requests and closes live streams within a second,
//! survives `kill -9`, and a stream also ends when its credential expires.

use crate::support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::{drain, get, raw_client, send, status_of, wait_until, Harness};
use ztgate::demo::{DevJwtIssuer, DevSettings};
use ztgate_testkit::pki::Ca;
use ztgate_testkit::{CertKey, DevIssuer};

const POLICIES: &str = r#"
@id("discovery-read")
permit (principal, action == k8s::Action::"get", resource is k8s::NonResourceURL)
when { resource.path == "/api" || resource.path like "/api/*" || resource.path == "/apis" || resource.path like "/apis/*" || resource.path like "/openapi/*" || resource.path == "/version" };

@id("team-a-namespace")
permit (principal in k8s::Group::"team-a", action, resource in k8s::Namespace::"team-a");

@id("security-manages-locks")
permit (principal in k8s::Group::"security", action, resource is k8s::NonResourceURL)
when { resource.path like "/v1/locks*" };
"#;

const WATCH: &str = "/api/v1/namespaces/team-a/pods?watch=1";

fn policies_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.cedar"), POLICIES).unwrap();
    dir
}

fn post_lock(uri: &str, target_kind: &str, value: &str, message: &str) -> Request<Full<Bytes>> {
    let body =
        serde_json::json!({"target": {"kind": target_kind, "value": value}, "message": message});
    Request::post(uri)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_closes_live_watches_within_a_second_and_refuses_new_requests_until_removed() {
    let dir = policies_dir();
    let h = Harness::start_with(DevSettings {
        policies: vec![dir.path().join("p.cedar")],
        ..Default::default()
    })
    .await;
    let alice = h.demo.env.pki.user("alice", &["team-a"]);
    let admin = h.demo.env.pki.user("sec-admin", &["security"]);
    let admin_client = h.client(Some(&admin), false);
    let locks_uri = h.uri("/v1/locks");

    // Five rounds: open a watch, lock alice, time until the watch ends with an ERROR event.
    let mut latencies = Vec::new();
    let streams = &h.demo.gateway.gateway.streams;
    for round in 0..5 {
        // The previous round's watch is gone, so the count below is this round's.
        wait_until(
            Duration::from_secs(10),
            "the previous round's watch is gone from the gateway",
            || streams.count() == 0,
        )
        .await;
        let client = h.client(Some(&alice), round % 2 == 0);
        let watch = client.request(get(&h.uri(WATCH))).await.unwrap();
        assert_eq!(watch.status(), 200);
        let reader = tokio::spawn(drain(watch.into_body()));
        wait_until(
            Duration::from_secs(10),
            "the gateway holds the watch as a live stream",
            || streams.count() == 1,
        )
        .await;

        let locked_at = Instant::now();
        let (code, _, body) = send(
            &admin_client,
            post_lock(&locks_uri, "user", "alice", "laptop reported stolen"),
        )
        .await;
        assert_eq!(code, 201, "{body}");
        let lock: serde_json::Value = serde_json::from_str(&body).unwrap();
        let text = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("the watch was closed")
            .unwrap();
        let took = locked_at.elapsed();
        latencies.push(took);
        let last = text.lines().last().unwrap_or_default();
        let event: serde_json::Value =
            serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(event["type"], "ERROR", "{text}");
        assert_eq!(event["object"]["code"], 403);
        assert!(event["object"]["message"]
            .as_str()
            .unwrap()
            .contains("laptop reported stolen"));

        // New requests are refused with the lock's message.
        let (code, _, body) = send(&client, get(&h.uri("/api/v1/namespaces/team-a/pods"))).await;
        assert_eq!(code, 403, "{body}");
        assert!(
            body.contains("access is locked: laptop reported stolen"),
            "{body}"
        );

        // Removing the lock restores access.
        let id = lock["id"].as_str().unwrap();
        let del = Request::delete(format!("{locks_uri}/{id}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (code, _, body) = send(&admin_client, del).await;
        assert_eq!(code, 200, "{body}");
        let (code, _, _) = send(&client, get(&h.uri("/api/v1/namespaces/team-a/pods"))).await;
        assert_eq!(code, 200);
    }
    // A lock reaches a live stream at once (typically in milliseconds). The bound is on the
    // median and far above that, so a loaded machine does not fail the test, while a lock that
    // only lands on some later sweep does.
    latencies.sort();
    eprintln!("lock-to-close latencies: {latencies:?}");
    assert!(latencies[2] < Duration::from_secs(1), "{latencies:?}");

    // Only policy decides who manages locks: alice may not.
    let (code, _, body) = send(
        &h.client(Some(&alice), false),
        post_lock(&locks_uri, "user", "bob", ""),
    )
    .await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(status_of(&body).1, "Forbidden");
}

/// What kubectl printed and how it exited.
struct KubectlRun {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `kubectl get pods -n team-a -w <extra>` as alice, over HTTP/1.1 when `http1` (HTTP/2 is
/// kubectl's default over TLS), locks her out once the watch is live, and returns what kubectl
/// printed when it ended. The lock is removed again before returning.
async fn kubectl_watch_until_locked(h: &Harness, extra: &[&str], http1: bool) -> KubectlRun {
    let kc = h.kubeconfig("alice", &["team-a"]);
    let mut args = vec!["get", "pods", "-n", "team-a", "-w"];
    args.extend_from_slice(extra);
    // client-go configures HTTP/2 itself, so GODEBUG=http2client=0 does not turn it off; its own
    // DISABLE_HTTP2 does.
    let env: &[(&str, &str)] = if http1 {
        &[("DISABLE_HTTP2", "1")]
    } else {
        &[]
    };
    let child = support::kubectl_command(&kc, &args, env).spawn().unwrap();

    // The watch is live once the gateway holds it as a stream (kubectl's list before it is not).
    let streams = &h.demo.gateway.gateway.streams;
    wait_until(Duration::from_secs(20), "kubectl started watching", || {
        streams.count() != 0
    })
    .await;

    let admin = h.demo.env.pki.user("sec-admin", &["security"]);
    let admin_client = h.client(Some(&admin), false);
    let (code, _, body) = send(
        &admin_client,
        post_lock(&h.uri("/v1/locks"), "user", "alice", "incident 42"),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("kubectl get -w ended after the lock")
        .unwrap();

    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let del = Request::delete(h.uri(&format!("/v1/locks/{id}")))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (code, _, body) = send(&admin_client, del).await;
    assert_eq!(code, 200, "{body}");
    // The next run must see its own watch, not this one on its way out.
    wait_until(
        Duration::from_secs(10),
        "the locked watch is gone from the gateway",
        || streams.count() == 0,
    )
    .await;

    KubectlRun {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// kubectl's stderr holds nothing but, over HTTP/1.1, client-go's note that HTTP/2 is off (which
/// also shows the run really was HTTP/1.1).
fn assert_quiet_stderr(run: &KubectlRun, http1: bool) {
    let note = "HTTP2 has been explicitly disabled";
    assert_eq!(run.stderr.contains(note), http1, "{}", run.stderr);
    assert!(
        run.stderr.lines().all(|l| l.contains(note)),
        "{}",
        run.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_watch_prints_the_lock_as_a_status_row_and_exits_0() {
    let dir = policies_dir();
    let h = Harness::start_with(DevSettings {
        policies: vec![dir.path().join("p.cedar")],
        ..Default::default()
    })
    .await;
    for http1 in [false, true] {
        let run = kubectl_watch_until_locked(&h, &[], http1).await;
        let shown = format!(
            "http1: {http1}, exit {:?}\nstdout:\n{}stderr:\n{}",
            run.code, run.stdout, run.stderr
        );
        // kubectl prints the ERROR event's Status under a header of its own, on stdout.
        let rows: Vec<Vec<&str>> = run
            .stdout
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert!(rows.len() >= 3, "{shown}");
        assert_eq!(
            rows[rows.len() - 2],
            ["STATUS", "REASON", "MESSAGE"],
            "{shown}"
        );
        assert_eq!(
            rows[rows.len() - 1].join(" "),
            "Failure Forbidden access is locked: incident 42",
            "{shown}"
        );
        // and exits 0: `kubectl get -w` ignores how its watch ended, so no ending the gateway
        // could choose makes it fail (docs/operations.md).
        assert_eq!(run.code, Some(0), "{shown}");
        assert_quiet_stderr(&run, http1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_watch_output_watch_events_ends_with_the_error_event_for_scripts() {
    let dir = policies_dir();
    let h = Harness::start_with(DevSettings {
        policies: vec![dir.path().join("p.cedar")],
        ..Default::default()
    })
    .await;
    for http1 in [false, true] {
        let run =
            kubectl_watch_until_locked(&h, &["-o", "json", "--output-watch-events"], http1).await;
        let shown = format!(
            "http1: {http1}, exit {:?}\nstdout:\n{}stderr:\n{}",
            run.code, run.stdout, run.stderr
        );
        // One event a line: the pods that were there, then the gateway's ERROR event, which a
        // script can test for since the exit status does not tell.
        let events: Vec<serde_json::Value> = run
            .stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {shown}")))
            .collect();
        let (last, before) = events.split_last().expect(&shown);
        assert!(!before.is_empty(), "{shown}");
        assert!(before.iter().all(|e| e["type"] == "ADDED"), "{shown}");
        assert_eq!(last["type"], "ERROR", "{shown}");
        assert_eq!(last["object"]["kind"], "Status", "{shown}");
        assert_eq!(last["object"]["code"], 403, "{shown}");
        assert_eq!(last["object"]["reason"], "Forbidden", "{shown}");
        assert_eq!(
            last["object"]["message"], "access is locked: incident 42",
            "{shown}"
        );
        assert_eq!(run.code, Some(0), "{shown}");
        assert_quiet_stderr(&run, http1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_with_401_when_its_token_expires() {
    let issuer = DevIssuer::start(&Ca::new("issuer-ca")).await.unwrap();
    let h = Harness::start_with(DevSettings {
        jwt: vec![DevJwtIssuer {
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
    // Expired 27 s ago: still accepted within the issuer's 30 s clock leeway, and the stream
    // ends when the leeway is used up, as a new request would then be refused. The expiry is in
    // whole seconds, so that is 2 to 3 s from now: the time is taken before it.
    let started = Instant::now();
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 27;
    let token = issuer.token(
        "alice",
        "ztgate",
        Duration::from_secs(3),
        serde_json::json!({"groups": ["team-a"], "exp": exp, "iat": exp - 60}),
    );
    let client = h.client(None, false);
    let req = Request::get(h.uri(WATCH))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let watch = client.request(req).await.unwrap();
    assert_eq!(watch.status(), 200);
    let text = tokio::time::timeout(Duration::from_secs(8), drain(watch.into_body()))
        .await
        .expect("the watch ended when the token expired");
    // A lower bound only (a loaded machine cannot make the stream end early): the stream lived
    // until the token's leeway was used up, not less.
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "ended too early: {text}"
    );
    let event: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(event["type"], "ERROR");
    assert_eq!(event["object"]["code"], 401, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_survives_kill_9_and_a_restart() {
    let state = tempfile::tempdir().unwrap();
    let pol = policies_dir();
    let pe = support::ProcessEnv::create(DevSettings {
        policies: vec![pol.path().join("p.cedar")],
        state_dir: Some(state.path().join("state")),
        ..Default::default()
    })
    .await;
    let (base, ca) = (pe.base(), pe.ca_pem());
    let alice: CertKey = pe.env.pki.user("alice", &["team-a"]);
    let admin = pe.env.pki.user("sec-admin", &["security"]);
    let mut gw = pe.serve().await;
    let (code, _, body) = send(
        &raw_client(&ca, Some(&admin), false),
        post_lock(&format!("{base}/v1/locks"), "user", "alice", "offboarded"),
    )
    .await;
    assert_eq!(code, 201, "{body}");

    gw.kill9().await;
    let _gw = pe.serve().await;
    let (code, _, body) = send(
        &raw_client(&ca, Some(&alice), false),
        get(&format!("{base}/api/v1/namespaces/team-a/pods")),
    )
    .await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("offboarded"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_when_it_reaches_the_maximum_stream_age() {
    let h = Harness::start_with(DevSettings {
        max_stream_age: Some("2s"),
        ..Default::default()
    })
    .await;
    let alice = h.demo.env.pki.user("alice", &["team-a"]);
    let client = h.client(Some(&alice), false);
    let req = Request::get(h.uri(WATCH))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let started = Instant::now();
    let watch = client.request(req).await.unwrap();
    assert_eq!(watch.status(), 200);
    let text = tokio::time::timeout(Duration::from_secs(8), drain(watch.into_body()))
        .await
        .expect("the watch ended at its maximum age");
    // A lower bound only: the stream lived (about) its maximum age, not less.
    assert!(started.elapsed() >= Duration::from_millis(1500), "{text}");
    let event: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(event["type"], "ERROR");
    assert_eq!(event["object"]["code"], 401, "{text}");
    assert!(
        event["object"]["message"]
            .as_str()
            .unwrap()
            .contains("maximum stream age"),
        "{text}"
    );
}
