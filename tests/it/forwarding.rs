//! Forwarding rules a client can observe: header hygiene, authentication failures, upstream
//! failures, timeouts, limits, and path checks.

use crate::support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::{eventually, get, send, status_of, wait_until, Harness};
use ztgate::demo::DevSettings;

const PODS: &str = "/api/v1/namespaces/team-a/pods";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_identity_headers_never_reach_the_apiserver() {
    let h = Harness::start().await;
    let alice = h.demo.env.pki.user("alice", &["team-a"]);
    for http2 in [false, true] {
        let client = h.client(Some(&alice), http2);
        for (name, value, impersonation) in [
            ("Authorization", "Bearer client-supplied-token", false),
            ("X-Remote-User", "client-admin", false),
            ("X-Remote-Group", "system:masters", false),
            ("X-Forwarded-For", "6.6.6.6", false),
            // A client's Impersonate-* is a request to impersonate (`kubectl --as`), which
            // needs a policy that allows it; without one it is refused and reaches nothing.
            ("Impersonate-User", "client-admin", true),
            ("impersonate-group", "system:masters", true),
            ("Impersonate-Uid", "client-uid", true),
            ("Impersonate-Extra-scopes", "client-scope", true),
        ] {
            h.demo.apiserver.clear_requests();
            let req = Request::get(h.uri(PODS))
                .header(name, value)
                .body(Full::new(Bytes::new()))
                .unwrap();
            let (code, _, body) = send(&client, req).await;
            let seen = h.demo.apiserver.requests();
            if impersonation {
                assert!(code == 403 || code == 400, "{name}: {code} {body}");
                assert!(seen.is_empty(), "{name}: reached the stand-in");
                continue;
            }
            assert_eq!(code, 200, "{name}: {body}");
            assert_eq!(seen.len(), 1, "{name}");
            let r = &seen[0];
            for (k, v) in &r.headers {
                assert!(
                    !v.contains("client-") && v != "system:masters" && v != "6.6.6.6",
                    "{name}: stand-in saw {k}: {v}"
                );
            }
            assert_eq!(r.header_values("impersonate-user"), ["alice"], "{name}");
            assert_eq!(r.header_values("impersonate-group"), ["team-a"], "{name}");
            assert!(r.header_values("authorization").is_empty(), "{name}");
            assert_eq!(r.effective_user.as_ref().unwrap().username, "alice");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_named_in_connection_is_dropped_before_the_gateway_adds_its_own() {
    let h = Harness::start().await;
    let alice = h.demo.env.pki.user("alice", &["team-a"]);
    let client = h.client(Some(&alice), false);
    h.demo.apiserver.clear_requests();
    // A client names Impersonate-User in Connection, hoping a hop drops the gateway's own.
    let req = Request::get(h.uri(PODS))
        .header("Connection", "Impersonate-User, Impersonate-Group")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (code, _, body) = send(&client, req).await;
    assert_eq!(code, 200, "{body}");
    let r = &h.demo.apiserver.requests()[0];
    assert_eq!(r.header_values("impersonate-user"), ["alice"]);
    assert_eq!(r.header_values("impersonate-group"), ["team-a"]);
    assert!(r
        .header_values("connection")
        .iter()
        .all(|v| !v.to_ascii_lowercase().contains("impersonate")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_get_401_status_and_reach_nothing() {
    let h = Harness::start().await;
    let pki = &h.demo.env.pki;
    let cases = [
        ("no certificate", None, None),
        ("expired certificate", Some(pki.expired_user("alice")), None),
        (
            "not yet valid certificate",
            Some(pki.not_yet_valid_user("alice")),
            None,
        ),
        ("unknown CA", Some(pki.unknown_ca_user("alice")), None),
        ("garbage Authorization", None, Some("Bearer a b c")),
        (
            "two tokens",
            Some(pki.user("alice", &["team-a"])),
            Some("Bearer x,Bearer y"),
        ),
        ("basic auth", None, Some("Basic YWxpY2U6cGFzc3dvcmQ=")),
        (
            "token without authenticator",
            None,
            Some("Bearer eyJhbGciOiJub25lIn0.e30."),
        ),
    ];
    for (what, cert, auth) in cases {
        h.demo.apiserver.clear_requests();
        let client = h.client(cert.as_ref(), false);
        let mut req = Request::get(h.uri(PODS));
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let (code, headers, body) = send(&client, req.body(Full::new(Bytes::new())).unwrap()).await;
        assert_eq!(code, 401, "{what}: {body}");
        assert_eq!(
            status_of(&body),
            (401, "Unauthorized".to_string()),
            "{what}"
        );
        assert!(
            !body.contains("expired") && !body.contains("CA"),
            "{what}: no detail for attackers: {body}"
        );
        assert!(headers.contains_key("www-authenticate"), "{what}");
        assert!(
            h.demo.apiserver.requests().is_empty(),
            "{what} reached the stand-in"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_paths_are_refused_before_forwarding() {
    let h = Harness::start().await;
    let client = h.client(Some(&h.demo.env.pki.user("alice", &["team-a"])), false);
    for path in [
        "/api/v1/namespaces/team-a%2Fpods",
        "/api/v1/namespaces/team-b/pods/%2e%2e/%2e%2e/team-a/pods",
        "/api//v1/namespaces/team-a/pods",
    ] {
        h.demo.apiserver.clear_requests();
        let (code, _, body) = send(&client, get(&h.uri(path))).await;
        assert_eq!(code, 400, "{path}: {body}");
        assert_eq!(status_of(&body).1, "BadRequest");
        assert!(
            h.demo.apiserver.requests().is_empty(),
            "{path} reached the stand-in"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_gives_503_and_the_gateway_recovers() {
    let mut h = Harness::start().await;
    let client = h.client(Some(&h.demo.env.pki.user("alice", &["team-a"])), true);
    let (code, _, _) = send(&client, get(&h.uri(PODS))).await;
    assert_eq!(code, 200);

    let addr = h.demo.apiserver.addr();
    let mut opts = ztgate_testkit::ApiServerOptions::new(&h.demo.env.pki);
    opts.addr = Some(addr);
    let old = std::mem::replace(&mut h.demo.apiserver, {
        // Placeholder replaced below; start a throwaway stand-in on another port.
        ztgate_testkit::ApiServer::start(ztgate_testkit::ApiServerOptions::new(&h.demo.env.pki))
            .await
            .unwrap()
    });
    old.shutdown().await;

    // What the client reads says which kube-apiserver and why, in a few words: the same for
    // an ordinary request and for an upgrade (which has its own upstream connection).
    let unreachable =
        format!("kube-apiserver at https://{addr} is not reachable: connection refused");
    for (what, req) in [
        ("list", get(&h.uri(PODS))),
        ("websocket exec", websocket_exec(&h, &[])),
    ] {
        let (code, _, body) = send(&client, req).await;
        assert_eq!(code, 503, "{what}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["reason"], "ServiceUnavailable", "{what}");
        assert_eq!(v["message"], unreachable, "{what}");
    }

    // The gateway reports not ready while the upstream is gone.
    let ops = h.demo.gateway.ops_addr.unwrap();
    let plain = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let text = eventually(
        Duration::from_secs(10),
        "readyz fails while the upstream is down",
        || async {
            let r = plain
                .request(get(&format!("http://{ops}/readyz")))
                .await
                .unwrap();
            if r.status() == 503 {
                Some(support::read_all(r).await.2)
            } else {
                None
            }
        },
    )
    .await;
    assert!(
        text.contains(&format!("[-]upstream: {unreachable}\n")),
        "{text}"
    );

    // Bring it back on the same address.
    let back = ztgate_testkit::ApiServer::start(opts).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the gateway recovered when the upstream came back",
        || async { (send(&client, get(&h.uri(PODS))).await.0 == 200).then_some(()) },
    )
    .await;
    back.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_gets_504_but_a_watch_outlives_the_timeout() {
    let h = Harness::start_with(DevSettings {
        request_timeout: "1s",
        ..Default::default()
    })
    .await;
    let client = h.client(Some(&h.demo.env.pki.user("alice", &["team-a"])), false);

    // A watch opened before the delay is switched on...
    let watch = client
        .request(get(&h.uri("/api/v1/namespaces/team-a/pods?watch=1")))
        .await
        .unwrap();
    assert_eq!(watch.status(), 200);
    let mut body = watch.into_body();

    h.demo.apiserver.set_response_delay(Duration::from_secs(3));
    let (code, _, text) = send(&client, get(&h.uri(PODS))).await;
    assert_eq!(code, 504, "{text}");
    assert_eq!(status_of(&text), (504, "Timeout".to_string()));
    h.demo.apiserver.set_response_delay(Duration::ZERO);

    // ...is still open after twice the request timeout and still delivers events. The sleep is
    // the case under test: the watch must stay idle for longer than the request timeout.
    tokio::time::sleep(Duration::from_secs(2)).await;
    h.demo.apiserver.create_pod("team-a", "after-timeout");
    tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let frame = body.frame().await.expect("watch still open").unwrap();
            if let Ok(data) = frame.into_data() {
                if String::from_utf8_lossy(&data).contains("after-timeout") {
                    return;
                }
            }
        }
    })
    .await
    .expect("the new pod's event arrived through the long-lived watch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_gets_413() {
    let h = Harness::start_with(DevSettings {
        max_request_body_bytes: 1024,
        ..Default::default()
    })
    .await;
    let client = h.client(Some(&h.demo.env.pki.user("alice", &["team-a"])), false);
    h.demo.apiserver.clear_requests();
    let req = Request::post(h.uri(PODS))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(vec![b' '; 4096])))
        .unwrap();
    let (code, _, body) = send(&client, req).await;
    assert_eq!(code, 413, "{body}");
    assert_eq!(status_of(&body).1, "RequestEntityTooLarge");
    assert!(h.demo.apiserver.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_without_user_labels() {
    let h = Harness::start().await;
    let client = h.client(Some(&h.demo.env.pki.user("alice", &["team-a"])), false);
    send(&client, get(&h.uri(PODS))).await;
    send(&h.client(None, false), get(&h.uri(PODS))).await;
    let ops = h.demo.gateway.ops_addr.unwrap();
    let plain = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let r = plain
        .request(get(&format!("http://{ops}/metrics")))
        .await
        .unwrap();
    let text =
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(
        text.contains(r#"ztgate_requests_total{verb="get",code="200",outcome="forwarded"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"ztgate_requests_total{verb="get",code="401",outcome="unauthenticated"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains("ztgate_request_duration_seconds"), "{text}");
    assert!(!text.contains("alice"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upgrade_does_not_leave_its_upstream_connection_open() {
    let h = Harness::start().await;
    let client = h.client(Some(&h.demo.env.pki.user("alice", &["team-a"])), false);
    // Warm up the pooled connection so the baseline includes it (the stand-in counts a
    // connection when it accepts it, so it is counted once the response is back).
    send(&client, get(&h.uri(PODS))).await;
    let baseline = h.demo.apiserver.active_connections();
    assert!(baseline >= 1, "the warm-up request's connection is open");
    for _ in 0..3 {
        let req = Request::get(h.uri(
            "/api/v1/namespaces/team-a/pods/no-such-pod/exec?command=cat&stdin=true&stdout=true",
        ))
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("sec-websocket-protocol", "v5.channel.k8s.io")
        .body(Full::new(Bytes::new()))
        .unwrap();
        let (code, _, body) = send(&client, req).await;
        assert_eq!(code, 404, "{body}");
        assert_eq!(status_of(&body).1, "NotFound");
    }
    let api = &h.demo.apiserver;
    wait_until(
        Duration::from_secs(5),
        &format!("the upgrades' upstream connections close (baseline {baseline})"),
        || api.active_connections() <= baseline,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_requests_in_flight_get_429_with_retry_after() {
    let h = Harness::start_with(DevSettings {
        max_inflight_requests: 1,
        ..Default::default()
    })
    .await;
    let alice = h.demo.env.pki.user("alice", &["team-a"]);
    h.demo
        .apiserver
        .set_response_delay(Duration::from_millis(1500));
    let first_client = h.client(Some(&alice), false);
    let uri = h.uri(PODS);
    let first = tokio::spawn(async move { send(&first_client, get(&uri)).await });
    support::wait_in_flight(&h.demo.apiserver, PODS).await;
    let (code, headers, body) = send(&h.client(Some(&alice), false), get(&h.uri(PODS))).await;
    assert_eq!(code, 429, "{body}");
    assert_eq!(status_of(&body).1, "TooManyRequests");
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    assert_eq!(first.await.unwrap().0, 200);
}

/// A WebSocket exec request for web-0, as kubectl sends it, with `extra` headers added.
fn websocket_exec(h: &Harness, extra: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut b = Request::get(
        h.uri("/api/v1/namespaces/team-a/pods/web-0/exec?command=cat&stdin=true&stdout=true"),
    )
    .header("upgrade", "websocket")
    .header("sec-websocket-version", "13")
    .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    if !extra
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("connection"))
    {
        b = b.header("connection", "Upgrade");
    }
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cannot_name_away_a_header_the_gateway_adds() {
    let h = Harness::start().await;
    let alice = h.demo.env.pki.user("alice", &["team-a"]);
    let client = h.client(Some(&alice), false);
    // Every header the gateway writes for kube-apiserver, named as hop-by-hop by the client.
    let named = "Audit-ID, Impersonate-User, Impersonate-Group, X-Forwarded-For, Authorization";
    for (what, req, want) in [
        (
            "list",
            Request::get(h.uri(PODS))
                .header("Connection", named)
                .body(Full::new(Bytes::new()))
                .unwrap(),
            200,
        ),
        (
            "websocket exec",
            websocket_exec(
                &h,
                &[
                    ("Connection", &format!("Upgrade, {named}")),
                    ("Sec-WebSocket-Protocol", "v5.channel.k8s.io"),
                ],
            ),
            101,
        ),
    ] {
        h.demo.apiserver.clear_requests();
        let (code, headers, body) = send(&client, req).await;
        assert_eq!(code, want, "{what}: {body}");
        let seen = h.demo.apiserver.requests();
        let r = seen
            .iter()
            .find(|r| r.path.starts_with("/api/v1/namespaces/team-a/pods"))
            .unwrap_or_else(|| panic!("{what}: nothing reached the stand-in"));
        let audit_id = headers["audit-id"].to_str().unwrap();
        assert_eq!(r.header_values("audit-id"), [audit_id], "{what}");
        assert_eq!(r.header_values("impersonate-user"), ["alice"], "{what}");
        assert_eq!(r.header_values("impersonate-group"), ["team-a"], "{what}");
        assert_eq!(r.header_values("x-forwarded-for"), ["127.0.0.1"], "{what}");
        assert_eq!(r.effective_user.as_ref().unwrap().username, "alice");
        for v in r.header_values("connection") {
            assert!(v.eq_ignore_ascii_case("upgrade"), "{what}: Connection: {v}");
        }
    }
}

/// How a browser (or any WebSocket client that cannot set headers) passes a bearer token.
const TOKEN_PROTOCOL: &str = "base64url.bearer.authorization.k8s.io.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_token_in_the_websocket_subprotocols_is_not_forwarded() {
    let h = Harness::start().await;
    let alice = h.demo.env.pki.user("alice", &["team-a"]);
    let client = h.client(Some(&alice), false);
    // base64url("client-secret-token")
    let token = format!("{TOKEN_PROTOCOL}Y2xpZW50LXNlY3JldC10b2tlbg");
    let upper = format!(
        "{}Y2xpZW50LXNlY3JldC10b2tlbg",
        TOKEN_PROTOCOL.to_uppercase()
    );
    let cases: [(&str, Vec<String>, Option<&str>); 5] = [
        (
            "first of three",
            vec![format!("{token}, v5.channel.k8s.io, v4.channel.k8s.io")],
            Some("v5.channel.k8s.io, v4.channel.k8s.io"),
        ),
        (
            "in the middle, no spaces",
            vec![format!("v5.channel.k8s.io,{token},v4.channel.k8s.io")],
            Some("v5.channel.k8s.io, v4.channel.k8s.io"),
        ),
        (
            "on a header line of its own",
            vec![
                "v5.channel.k8s.io".into(),
                token.clone(),
                "v4.channel.k8s.io".into(),
            ],
            Some("v5.channel.k8s.io, v4.channel.k8s.io"),
        ),
        ("alone", vec![token.clone()], None),
        (
            "in upper case",
            vec![format!("{upper}, v4.channel.k8s.io")],
            Some("v4.channel.k8s.io"),
        ),
    ];
    for (what, lines, want) in cases {
        h.demo.apiserver.clear_requests();
        let extra: Vec<(&str, &str)> = lines
            .iter()
            .map(|l| ("Sec-WebSocket-Protocol", l.as_str()))
            .collect();
        let (code, headers, body) = send(&client, websocket_exec(&h, &extra)).await;
        assert_eq!(code, 101, "{what}: {body}");
        let seen = h.demo.apiserver.requests();
        let r = seen
            .iter()
            .find(|r| r.path.ends_with("/exec"))
            .unwrap_or_else(|| panic!("{what}: nothing reached the stand-in"));
        let protocols = r.header_values("sec-websocket-protocol");
        match want {
            Some(list) => assert_eq!(protocols, [list], "{what}"),
            None => assert!(protocols.is_empty(), "{what}: {protocols:?}"),
        }
        for (k, v) in &r.headers {
            assert!(
                !v.contains("Y2xpZW50LXNlY3JldC10b2tlbg")
                    && !v.to_ascii_lowercase().contains("bearer.authorization"),
                "{what}: stand-in saw {k}: {v}"
            );
        }
        // The session goes on under the first subprotocol the client offered besides the token.
        let chosen = headers
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap());
        assert_eq!(chosen, want.map(|l| l.split(',').next().unwrap()), "{what}");
    }

    // Not only on upgrades: an ordinary request does not carry one upstream either.
    h.demo.apiserver.clear_requests();
    let req = Request::get(h.uri(PODS))
        .header("Sec-WebSocket-Protocol", &token)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (code, _, body) = send(&client, req).await;
    assert_eq!(code, 200, "{body}");
    let r = &h.demo.apiserver.requests()[0];
    assert!(r.header_values("sec-websocket-protocol").is_empty());
}
