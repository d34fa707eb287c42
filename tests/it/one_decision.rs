//! One classification, one decision: every way kube-apiserver reads a request as long-running
//! is a stream the gateway closes; locks apply to everyone a request acts as and to every entry
//! point (requests, streams, SubjectAccessReview); kube-apiserver's impersonation reviews get
//! the answer `kubectl --as` gets; methods that mean nothing get 405.

use crate::support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use support::{get, send, wait_until, Harness, RawClient};
use ztgate::demo::{DevJwtIssuer, DevSettings};
use ztgate_testkit::pki::Ca;
use ztgate_testkit::DevIssuer;

const POLICIES: &str = r#"
@id("discovery-read")
permit (principal, action == k8s::Action::"get", resource is k8s::NonResourceURL)
when { resource.path == "/api" || resource.path like "/api/*" || resource.path == "/apis" || resource.path like "/apis/*" || resource.path like "/openapi/*" || resource.path == "/version" };

@id("team-a-namespace")
permit (principal in k8s::Group::"team-a", action, resource in k8s::Namespace::"team-a");

@id("carol-reads-team-a")
permit (principal == k8s::User::"carol", action in k8s::Action::"read", resource in k8s::Namespace::"team-a");

@id("alice-acts-as-carol")
permit (principal == k8s::User::"alice", action == k8s::Action::"impersonate",
        resource == k8s::ImpersonatedUser::"carol");

@id("alice-acts-as-auditors-or-team-a")
permit (principal == k8s::User::"alice", action == k8s::Action::"impersonate",
        resource is k8s::ImpersonatedGroup)
when { ["auditors", "team-a"].contains(resource.name) };

@id("alice-acts-as-the-builder")
permit (principal == k8s::User::"alice", action == k8s::Action::"impersonate",
        resource == k8s::ImpersonatedUser::"system:serviceaccount:team-a:builder");

@id("builder-reads-team-a")
permit (principal == k8s::User::"system:serviceaccount:team-a:builder", action in k8s::Action::"read", resource in k8s::Namespace::"team-a");

@id("security-manages-locks")
permit (principal in k8s::Group::"security", action, resource is k8s::NonResourceURL)
when { resource.path like "/v1/locks*" };
"#;

async fn start() -> (Harness, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.cedar"), POLICIES).unwrap();
    let h = Harness::start_with(DevSettings {
        policies: vec![dir.path().join("p.cedar")],
        webhooks: true,
        ..Default::default()
    })
    .await;
    (h, dir)
}

/// Locks `kind`/`value` through the locks API; returns the lock's id.
async fn lock(h: &Harness, kind: &str, value: &str, message: &str) -> String {
    let admin = h.demo.env.pki.user("sec-admin", &["security"]);
    let body = json!({"target": {"kind": kind, "value": value}, "message": message});
    let req = Request::post(h.uri("/v1/locks"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let (code, _, body) = send(&h.client(Some(&admin), false), req).await;
    assert_eq!(code, 201, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["id"].as_str().unwrap().to_owned()
}

async fn unlock(h: &Harness, id: &str) {
    let admin = h.demo.env.pki.user("sec-admin", &["security"]);
    let req = Request::delete(h.uri(&format!("/v1/locks/{id}")))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (code, _, body) = send(&h.client(Some(&admin), false), req).await;
    assert_eq!(code, 200, "{body}");
}

/// Every spelling kube-apiserver reads as a watch or a follow (its bool conversion: anything but
/// `0`/`false`, empty included; decoded query keys; decoded path segments) is a live stream at
/// the gateway: a lock on its holder closes it within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_watch_or_a_follow_is_closed_by_a_lock_within_a_second() {
    let (h, _p) = start().await;
    let alice = h.demo.env.pki.user("alice", &["team-a"]);
    let spellings = [
        "/api/v1/namespaces/team-a/pods?watch=1",
        "/api/v1/namespaces/team-a/pods?watch=true",
        "/api/v1/namespaces/team-a/pods?watch=yes",
        "/api/v1/namespaces/team-a/pods?watch=True",
        "/api/v1/namespaces/team-a/pods?watch=",
        "/api/v1/namespaces/team-a/pods?watch",
        "/api/v1/namespaces/team-a/pods?w%61tch=1",
        "/api/v1/namespaces/team-a/pods?%77atch=on",
        "/api/v1/watch/namespaces/team-a/pods",
        "/api/v1/w%61tch/namespaces/team-a/pods",
        "/api/v1/namespaces/team-a/pods/web-0/log?follow=true",
        "/api/v1/namespaces/team-a/pods/web-0/log?follow=yes",
        "/api/v1/namespaces/team-a/pods/web-0/log?follow=True",
        "/api/v1/namespaces/team-a/pods/web-0/l%6fg?f%6fllow=1",
    ];
    let streams = &h.demo.gateway.gateway.streams;
    let mut latencies = Vec::new();
    for (i, path) in spellings.iter().enumerate() {
        // The previous spelling's stream is gone, so the count below is this one's.
        wait_until(
            Duration::from_secs(10),
            "the previous stream is gone from the gateway",
            || streams.count() == 0,
        )
        .await;
        let client = h.client(Some(&alice), i % 2 == 0);
        let resp = client.request(get(&h.uri(path))).await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let mut body = resp.into_body();
        // The stream is live: it delivered something and has not ended.
        let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .unwrap_or_else(|_| panic!("{path}: nothing arrived"));
        assert!(matches!(first, Some(Ok(_))), "{path}: {first:?}");
        let reader = tokio::spawn(async move {
            let mut text = String::new();
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(data) = frame.into_data() {
                    text.push_str(&String::from_utf8_lossy(&data));
                }
            }
            text
        });
        wait_until(
            Duration::from_secs(10),
            &format!("the gateway holds {path} as a live stream"),
            || streams.count() == 1,
        )
        .await;
        assert!(!reader.is_finished(), "{path} ended by itself");

        let locked_at = Instant::now();
        let id = lock(&h, "user", "alice", "incident 7").await;
        let text = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .unwrap_or_else(|_| panic!("{path} outlived the lock by 10 s"))
            .unwrap();
        latencies.push(locked_at.elapsed());
        if path.contains("atch") {
            let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
            assert_eq!(last["type"], "ERROR", "{path}: {text}");
            assert!(
                last["object"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("incident 7"),
                "{path}: {text}"
            );
        }
        unlock(&h, &id).await;
    }
    // A lock reaches a live stream at once (typically in milliseconds). The bound is on the
    // median and far above that, so a loaded machine does not fail the test, while a lock that
    // only lands on some later sweep does.
    latencies.sort();
    eprintln!("lock-to-close latencies: {latencies:?}");
    let median = latencies[latencies.len() / 2];
    assert!(median < Duration::from_secs(1), "{latencies:?}");
}

/// A lock applies to every identity a request acts as: with carol locked, alice `--as carol` is
/// refused, and a watch alice opened as carol is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_on_the_impersonated_user_refuses_requests_and_closes_streams_made_as_them() {
    let (h, _p) = start().await;
    let client = h.client(Some(&h.demo.env.pki.user("alice", &["team-a"])), true);
    // carol in team-a: the group the stand-in's RBAC lets read team-a.
    let as_carol = |path: &str| {
        Request::get(h.uri(path))
            .header("Impersonate-User", "carol")
            .header("Impersonate-Group", "team-a")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let (code, _, body) = send(&client, as_carol("/api/v1/namespaces/team-a/pods")).await;
    assert_eq!(code, 200, "{body}");
    let watch = client
        .request(as_carol("/api/v1/namespaces/team-a/pods?watch=1"))
        .await
        .unwrap();
    assert_eq!(watch.status(), 200);
    let reader = tokio::spawn(support::drain(watch.into_body()));
    let streams = &h.demo.gateway.gateway.streams;
    wait_until(
        Duration::from_secs(10),
        "the gateway holds the watch made as carol as a live stream",
        || streams.count() == 1,
    )
    .await;

    let id = lock(&h, "user", "carol", "carol is on leave").await;
    let text = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the watch made as carol was closed")
        .unwrap();
    assert!(text.contains("carol is on leave"), "{text}");
    let (code, _, body) = send(&client, as_carol("/api/v1/namespaces/team-a/pods")).await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("access is locked: carol is on leave"),
        "{body}"
    );
    // alice herself is not locked.
    let (code, _, body) = send(&client, get(&h.uri("/api/v1/namespaces/team-a/pods"))).await;
    assert_eq!(code, 200, "{body}");
    unlock(&h, &id).await;

    // A group the request acts as, too.
    let id = lock(&h, "group", "auditors", "auditors paused").await;
    let req = Request::get(h.uri("/api/v1/namespaces/team-a/pods"))
        .header("Impersonate-User", "carol")
        .header("Impersonate-Group", "team-a")
        .header("Impersonate-Group", "auditors")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (code, _, body) = send(&client, req).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("auditors paused"), "{body}");
    unlock(&h, &id).await;
}

const SAR: &str = "/apis/authorization.k8s.io/v1/subjectaccessreviews";

fn kube_client(h: &Harness) -> RawClient {
    let cert = h
        .demo
        .env
        .pki
        .cluster_ca
        .issue_client("kube-apiserver", &[]);
    support::raw_client(&h.demo.env.pki.gateway_ca.cert_pem(), Some(&cert), false)
}

/// kube-apiserver's question and the webhook's answer: `Some(true)` allowed, `Some(false)`
/// denied, `None` no opinion.
async fn sar(
    kube: &RawClient,
    h: &Harness,
    user: &str,
    groups: &[&str],
    ra: Value,
) -> Option<bool> {
    let body = json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {"user": user, "groups": groups, "resourceAttributes": ra}
    });
    let req = Request::post(h.uri(SAR))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let (code, _, text) = send(kube, req).await;
    assert_eq!(code, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let status = &v["status"];
    if status["allowed"] == true {
        Some(true)
    } else if status["denied"] == true {
        Some(false)
    } else {
        assert!(
            status["reason"]
                .as_str()
                .unwrap_or_default()
                .starts_with("not decided by the ztgate gateway"),
            "{v}"
        );
        None
    }
}

/// One impersonation as kube-apiserver 1.36 checks it for a request (`WithConstrainedImpersonation`):
/// the modes in order (serviceaccount for service accounts, user-info for other users, then
/// the legacy `impersonate` verb); a mode asks `impersonate-on:<mode>:<verb>` about the request,
/// then `impersonate:<mode>` about each target; the first mode whose every check is allowed
/// wins. Each check goes through the union authorizer: the gateway's webhook first, then RBAC,
/// which here grants the requester nothing.
struct Wanted<'a> {
    user: &'a str,
    groups: &'a [&'a str],
    uid: Option<&'a str>,
    extra: &'a [(&'a str, &'a str)],
}

async fn kube_allows_impersonation(
    kube: &RawClient,
    h: &Harness,
    requester: (&str, &[&str]),
    wanted: &Wanted<'_>,
    request: Value,
) -> bool {
    let (user, groups) = requester;
    let webhook_allows =
        |ra: Value| async move { sar(kube, h, user, groups, ra).await == Some(true) };
    let sa = wanted
        .user
        .strip_prefix("system:serviceaccount:")
        .and_then(|r| r.split_once(':'));
    let only_name = wanted.groups.is_empty() && wanted.uid.is_none() && wanted.extra.is_empty();
    let mut modes: Vec<(&str, bool)> = Vec::new();
    if sa.is_some() && only_name {
        modes.push(("serviceaccount", true));
    } else if sa.is_none() {
        modes.push(("user-info", true));
    }
    modes.push(("impersonate", false));
    'modes: for (mode, constrained) in modes {
        let (verb, gv_group) = if constrained {
            let mut on = request.clone();
            let v = on["verb"].as_str().unwrap().to_owned();
            on["verb"] = json!(format!("impersonate-on:{mode}:{v}"));
            if !webhook_allows(on).await {
                continue;
            }
            (format!("impersonate:{mode}"), "authentication.k8s.io")
        } else {
            ("impersonate".to_owned(), "")
        };
        let user_check = match sa {
            Some((ns, name)) => {
                json!({"verb": verb, "group": gv_group, "resource": "serviceaccounts", "namespace": ns, "name": name})
            }
            None => {
                json!({"verb": verb, "group": gv_group, "resource": "users", "name": wanted.user})
            }
        };
        if !webhook_allows(user_check).await {
            continue;
        }
        if let Some(uid) = wanted.uid {
            let check = json!({"verb": verb, "group": "authentication.k8s.io", "resource": "uids", "name": uid});
            if !webhook_allows(check).await {
                continue;
            }
        }
        for g in wanted.groups {
            let check = json!({"verb": verb, "group": gv_group, "resource": "groups", "name": g});
            if !webhook_allows(check).await {
                continue 'modes;
            }
        }
        for (k, v) in wanted.extra {
            let check = json!({"verb": verb, "group": "authentication.k8s.io", "resource": "userextras", "subresource": k, "name": v});
            if !webhook_allows(check).await {
                continue 'modes;
            }
        }
        return true;
    }
    false
}

/// kube-apiserver 1.36 asks the authorization webhook about impersonation in two forms
/// (`impersonate` and `impersonate-on:<mode>:<verb>` / `impersonate:<mode>`). With the gateway's
/// webhook in the chain, the gateway's own forwarding still works (its identity is never decided
/// by its policy), and a user impersonating directly at kube-apiserver gets exactly what
/// `kubectl --as` gets through the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impersonation_reviews_from_kube_apiserver_agree_with_kubectl_as() {
    let (h, _p) = start().await;
    let kube = kube_client(&h);
    let gateway = ztgate_testkit::GATEWAY_USER;

    // The gateway forwarding alice's `list pods`: every check about the gateway itself is left
    // to RBAC (which lets it impersonate), in both forms.
    for ra in [
        json!({"verb": "impersonate-on:user-info:list", "resource": "pods", "namespace": "team-a", "version": "v1"}),
        json!({"verb": "impersonate:user-info", "group": "authentication.k8s.io", "resource": "users", "name": "alice"}),
        json!({"verb": "impersonate", "resource": "users", "name": "alice"}),
        json!({"verb": "impersonate", "resource": "groups", "name": "team-a"}),
    ] {
        assert_eq!(sar(&kube, &h, gateway, &[], ra.clone()).await, None, "{ra}");
    }

    let alice_cert = h.demo.env.pki.user("alice", &["team-a"]);
    let through_gateway = h.client(Some(&alice_cert), false);
    let list_pods =
        json!({"verb": "list", "resource": "pods", "namespace": "team-a", "version": "v1"});
    let cases: Vec<Wanted> = vec![
        Wanted {
            user: "carol",
            groups: &[],
            uid: None,
            extra: &[],
        },
        Wanted {
            user: "bob",
            groups: &[],
            uid: None,
            extra: &[],
        },
        Wanted {
            user: "carol",
            groups: &["auditors"],
            uid: None,
            extra: &[],
        },
        Wanted {
            user: "carol",
            groups: &["admins"],
            uid: None,
            extra: &[],
        },
        Wanted {
            user: "carol",
            groups: &[],
            uid: Some("u-1"),
            extra: &[],
        },
        Wanted {
            user: "carol",
            groups: &[],
            uid: None,
            extra: &[("reason", "ticket-1")],
        },
        Wanted {
            user: "system:serviceaccount:team-a:builder",
            groups: &[],
            uid: None,
            extra: &[],
        },
        Wanted {
            user: "system:serviceaccount:team-b:builder",
            groups: &[],
            uid: None,
            extra: &[],
        },
    ];
    let mut allowed_somewhere = false;
    for w in &cases {
        // Through the gateway: `kubectl --as`. Only the impersonation is compared (the request
        // itself is then authorized for the impersonated user in both places).
        let mut req = Request::get(h.uri("/api/v1/namespaces/team-a/pods"))
            .header("Impersonate-User", w.user);
        for g in w.groups {
            req = req.header("Impersonate-Group", *g);
        }
        if let Some(uid) = w.uid {
            req = req.header("Impersonate-Uid", uid);
        }
        for (k, v) in w.extra {
            req = req.header(format!("Impersonate-Extra-{k}"), *v);
        }
        let (code, _, body) =
            send(&through_gateway, req.body(Full::new(Bytes::new())).unwrap()).await;
        assert!(code == 200 || code == 403, "{code} {body}");
        let impersonation_allowed = code == 200 || !body.contains("cannot impersonate");
        // Directly at kube-apiserver, with the webhook in the chain.
        let kube_allows =
            kube_allows_impersonation(&kube, &h, ("alice", &["team-a"]), w, list_pods.clone())
                .await;
        assert_eq!(
            kube_allows, impersonation_allowed,
            "alice as {} {:?} {:?} {:?}: gateway {code} {body}",
            w.user, w.groups, w.uid, w.extra
        );
        allowed_somewhere |= kube_allows;
    }
    assert!(allowed_somewhere, "the table must have allowed rows");

    // `kubectl auth can-i impersonate` through the gateway agrees with `--as` too.
    let kubeconfig = h.kubeconfig("alice", &["team-a"]);
    for (target, want) in [("users/carol", "yes"), ("users/bob", "no")] {
        let out = h
            .kubectl(&kubeconfig, &["auth", "can-i", "impersonate", target])
            .await;
        let answer = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            answer.split_whitespace().next().unwrap_or_default(),
            want,
            "can-i impersonate {target}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Locks apply to every decision: a locked user's own client certificate straight to
/// kube-apiserver is denied by the SubjectAccessReview webhook, as TokenReview and requests
/// through the gateway are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_access_reviews_honour_locks() {
    let (h, _p) = start().await;
    let kube = kube_client(&h);
    let list = json!({"verb": "list", "resource": "pods", "namespace": "team-a", "version": "v1"});
    assert_eq!(
        sar(&kube, &h, "alice", &["team-a"], list.clone()).await,
        Some(true)
    );
    let id = lock(&h, "user", "alice", "offboarded").await;
    assert_eq!(
        sar(&kube, &h, "alice", &["team-a"], list.clone()).await,
        Some(false)
    );
    unlock(&h, &id).await;
    let id = lock(&h, "group", "team-a", "team frozen").await;
    assert_eq!(
        sar(&kube, &h, "alice", &["team-a"], list.clone()).await,
        Some(false)
    );
    assert_eq!(
        sar(&kube, &h, "dave", &["team-b"], list.clone()).await,
        None,
        "others are untouched"
    );
    unlock(&h, &id).await;
    assert_eq!(sar(&kube, &h, "alice", &["team-a"], list).await, Some(true));
}

/// A session lock matches the token's `sid` (the identity provider's session): that session's
/// tokens are refused, another session of the same user goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lock_refuses_the_tokens_of_that_session_only() {
    let issuer = DevIssuer::start(&Ca::new("issuer-ca")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.cedar"), POLICIES).unwrap();
    let h = Harness::start_with(DevSettings {
        policies: vec![dir.path().join("p.cedar")],
        jwt: vec![DevJwtIssuer {
            url: issuer.issuer_url(),
            ca_pem: issuer.ca_pem(),
            audience: "ztgate".into(),
            username_claim: "sub".into(),
            username_prefix: String::new(),
            groups_prefix: String::new(),
        }],
        ..Default::default()
    })
    .await;
    let token = |sid: &str| {
        issuer.token(
            "alice",
            "ztgate",
            Duration::from_secs(600),
            json!({"groups": ["team-a"], "sid": sid}),
        )
    };
    let (stolen, other) = (token("sid-stolen"), token("sid-desk"));
    let client = h.client(None, true);
    let pods = |t: &str| {
        Request::get(h.uri("/api/v1/namespaces/team-a/pods"))
            .header("authorization", format!("Bearer {t}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    assert_eq!(send(&client, pods(&stolen)).await.0, 200);
    let id = lock(&h, "session", "sid-stolen", "session hijacked").await;
    let (code, _, body) = send(&client, pods(&stolen)).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("session hijacked"), "{body}");
    let (code, _, body) = send(&client, pods(&other)).await;
    assert_eq!(code, 200, "{body}");
    unlock(&h, &id).await;
}

/// Methods that mean nothing to kube-apiserver get 405 with a Status (no "cannot  resource",
/// no policy evaluation error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_that_mean_nothing_get_405() {
    let (h, _p) = start().await;
    let client = h.client(Some(&h.demo.env.pki.user("alice", &["team-a"])), false);
    for (method, path) in [
        ("OPTIONS", "/api/v1/namespaces/team-a/pods"),
        ("TRACE", "/api/v1/namespaces/team-a/pods"),
        ("PROPFIND", "/api/v1/namespaces/team-a/pods"),
        ("TRACE", "/version"),
        ("PROPFIND", "/"),
    ] {
        let req = Request::builder()
            .method(method)
            .uri(h.uri(path))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (code, _, body) = send(&client, req).await;
        assert_eq!(code, 405, "{method} {path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["reason"], "MethodNotAllowed", "{body}");
        assert!(!body.contains("cannot  "), "{body}");
    }
    let seen: Vec<_> = h
        .demo
        .apiserver
        .requests()
        .into_iter()
        .filter(|r| r.method != "GET")
        .collect();
    assert!(seen.is_empty(), "reached the stand-in: {seen:?}");
}
