//! Faults in what the gateway depends on: kube-apiserver dying under a live
//! watch, stalling one request, or going quiet on a watch; the IdP slow or down at start-up and
//! mid-run, and its JWKS answering garbage; storms of policy and config reloads. In each, the
//! gateway stays up, answers with a Status, fails closed where trust is involved, and recovers.
//! The state store's disk is in `faults_disk.rs`; the table of every dependency fault and its
//! test is in docs/hardening.md.

use crate::support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use support::{get, send, status_of, Harness, RawClient};
use ztgate::demo::{DevJwtIssuer, DevSettings};
use ztgate_testkit::pki::Ca;
use ztgate_testkit::{DevIssuer, SigningAlg};

const PODS_A: &str = "/api/v1/namespaces/team-a/pods";
const PODS_B: &str = "/api/v1/namespaces/team-b/pods";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_apiserver_dying_under_a_watch_ends_it_and_the_gateway_recovers() {
    let mut h = Harness::start().await;
    let client = h.client(Some(&h.demo.env.pki.user("alice", &["team-a"])), true);
    let watch = client
        .request(get(&h.uri(&format!("{PODS_A}?watch=1"))))
        .await
        .unwrap();
    assert_eq!(watch.status(), 200);
    let mut body = watch.into_body();
    assert_eq!(h.demo.gateway.gateway.streams.count(), 1);

    // The stand-in goes away with the watch open (its connections are reset).
    let addr = h.demo.apiserver.addr();
    let mut opts = ztgate_testkit::ApiServerOptions::new(&h.demo.env.pki);
    opts.addr = Some(addr);
    let placeholder =
        ztgate_testkit::ApiServer::start(ztgate_testkit::ApiServerOptions::new(&h.demo.env.pki))
            .await
            .unwrap();
    std::mem::replace(&mut h.demo.apiserver, placeholder)
        .shutdown()
        .await;

    // The client's watch ends (cleanly or with an error), promptly, and is released.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match body.frame().await {
                None | Some(Err(_)) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the watch outlived its upstream by 10s");
    for _ in 0..50 {
        if h.demo.gateway.gateway.streams.count() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(h.demo.gateway.gateway.streams.count(), 0, "stream leaked");

    // Meanwhile requests get a Status saying kube-apiserver is unavailable.
    let (code, _, text) = send(&client, get(&h.uri(PODS_A))).await;
    assert_eq!(code, 503, "{text}");
    assert_eq!(status_of(&text), (503, "ServiceUnavailable".to_string()));

    // It comes back on the same address: lists and watches work again, no restart needed.
    let back = ztgate_testkit::ApiServer::start(opts).await.unwrap();
    let start = Instant::now();
    loop {
        let (code, _, _) = send(&client, get(&h.uri(PODS_A))).await;
        if code == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no recovery");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let watch = client
        .request(get(&h.uri(&format!("{PODS_A}?watch=1"))))
        .await
        .unwrap();
    assert_eq!(watch.status(), 200);
    drop(watch);
    back.shutdown().await;
}

const DISCOVERY: &str = r#"
@id("discovery")
permit (principal, action == k8s::Action::"get", resource is k8s::NonResourceURL);
"#;
const TEAM_A: &str = r#"
@id("team-a")
permit (principal in k8s::Group::"team-a", action, resource in k8s::Namespace::"team-a");
"#;
const FORBID_A: &str = r#"
@id("freeze")
@reason("team-a is frozen")
forbid (principal, action, resource in k8s::Namespace::"team-a");
"#;
const BROKEN: &str = "permit (principal, action resource) when { ;\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_reload_storm_never_opens_what_no_policy_allows() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let file = policies.join("teams.cedar");
    std::fs::write(&file, format!("{DISCOVERY}{TEAM_A}")).unwrap();
    let h = Harness::start_with(DevSettings {
        policies: vec![policies.clone()],
        policy_reload_interval: "100ms",
        ..Default::default()
    })
    .await;
    let client = h.client(Some(&h.demo.env.pki.user("alice", &["team-a"])), true);
    assert_eq!(send(&client, get(&h.uri(PODS_A))).await.0, 200);

    // For 5 seconds the file flips every 20 ms between: the good set, a set that freezes
    // team-a, a broken file, an empty file, and a half-written good set.
    let storm = tokio::spawn(async move {
        let versions = [
            format!("{DISCOVERY}{TEAM_A}"),
            format!("{DISCOVERY}{TEAM_A}{FORBID_A}"),
            format!("{DISCOVERY}{TEAM_A}{BROKEN}"),
            String::new(),
            format!("{DISCOVERY}{TEAM_A}")[..DISCOVERY.len() + 30].to_owned(),
        ];
        let start = Instant::now();
        let mut i = 0;
        while start.elapsed() < Duration::from_secs(5) {
            std::fs::write(&file, &versions[i % versions.len()]).unwrap();
            i += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::fs::write(&file, &versions[0]).unwrap();
        i
    });

    let mut seen = std::collections::BTreeMap::new();
    while !storm.is_finished() {
        for path in [PODS_A, PODS_B] {
            let (code, _, text) = send(&client, get(&h.uri(path))).await;
            *seen.entry((path, code)).or_insert(0u32) += 1;
            match (path, code) {
                (PODS_A, 200) => {}
                (_, 403) => assert_eq!(status_of(&text).1, "Forbidden"),
                // No version of the policies ever allows team-b; the empty set denies all.
                _ => panic!("{path}: {code} during the reload storm: {text}"),
            }
        }
    }
    let writes = storm.await.unwrap();
    eprintln!("{writes} policy writes; answers {seen:?}");
    assert!(
        seen.contains_key(&(PODS_A, 403)),
        "the freeze never took effect: {seen:?}"
    );

    // After the storm the good set is in force.
    let start = Instant::now();
    loop {
        let (code, _, _) = send(&client, get(&h.uri(PODS_A))).await;
        if code == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the good set never returned"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(send(&client, get(&h.uri(PODS_B))).await.0, 403);
    assert!(h.demo.gateway.gateway.is_ready());
}

// ------------------------------------------------------------------ kube-apiserver slow

/// Reads watch frames until one contains `what`; panics if the watch ends first.
async fn watch_until(body: &mut hyper::body::Incoming, what: &str, limit: Duration) {
    tokio::time::timeout(limit, async {
        loop {
            let frame = body
                .frame()
                .await
                .unwrap_or_else(|| panic!("the watch ended before {what:?}"))
                .unwrap_or_else(|e| panic!("the watch failed before {what:?}: {e}"));
            if let Ok(data) = frame.into_data() {
                if String::from_utf8_lossy(&data).contains(what) {
                    return;
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no watch event with {what:?} within {limit:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_request_gets_504_while_other_clients_and_a_silent_watch_carry_on() {
    let h = Harness::start_with(DevSettings {
        request_timeout: "1s",
        ..Default::default()
    })
    .await;
    let watcher = h.client(Some(&h.demo.env.pki.user("wendy", &["team-a"])), true);
    let staller = h.client(Some(&h.demo.env.pki.user("sam", &["team-a"])), true);
    let other = h.client(Some(&h.demo.env.pki.user("alice", &["team-a"])), true);

    // A watch that has seen an event...
    let watch = watcher
        .request(get(&h.uri(&format!("{PODS_A}?watch=1"))))
        .await
        .unwrap();
    assert_eq!(watch.status(), 200);
    let mut body = watch.into_body();
    h.demo.apiserver.create_pod("team-a", "before-the-stall");
    watch_until(&mut body, "before-the-stall", Duration::from_secs(5)).await;
    let quiet_since = Instant::now();

    // ...then kube-apiserver stalls one request for far longer than timeouts.request.
    let stalled_path = format!("{PODS_A}/stalled");
    h.demo
        .apiserver
        .set_path_delay(&stalled_path, Duration::from_secs(60));
    let stalled = {
        let req = get(&h.uri(&stalled_path));
        tokio::spawn(async move {
            let started = Instant::now();
            let answer = send(&staller, req).await;
            (answer, started.elapsed())
        })
    };
    // Everyone else is answered while it hangs (over the same upstream connection pool).
    let mut served = 0;
    while !stalled.is_finished() {
        let (code, _, text) = send(&other, get(&h.uri(PODS_A))).await;
        assert_eq!(code, 200, "another client during the stall: {text}");
        served += 1;
    }
    let ((code, _, text), took) = stalled.await.unwrap();
    assert_eq!(code, 504, "{text}");
    assert_eq!(status_of(&text), (504, "Timeout".to_string()));
    assert!(text.contains("did not answer within"), "{text}");
    assert!(
        took < Duration::from_secs(20),
        "the stalled request waited {took:?}: the gateway's timeout did not cut it"
    );
    assert!(served > 0, "no other request was answered during the stall");

    // The watch has been silent all along, for longer than timeouts.request: still open, and
    // the next event arrives. (The sleep is the case under test: the silence.)
    let quiet = Duration::from_secs(3);
    if let Some(rest) = quiet.checked_sub(quiet_since.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    assert_eq!(h.demo.gateway.gateway.streams.count(), 1);
    h.demo.apiserver.create_pod("team-a", "after-the-silence");
    watch_until(&mut body, "after-the-silence", Duration::from_secs(5)).await;
    h.demo
        .apiserver
        .set_path_delay(&stalled_path, Duration::ZERO);
    assert!(h.demo.gateway.gateway.is_ready());
}

// ------------------------------------------------------------------ the IdP slow, down, garbage

const AUD: &str = "ztgate";

fn issuer_entry(idp: &DevIssuer) -> DevJwtIssuer {
    DevJwtIssuer {
        url: idp.issuer_url(),
        ca_pem: idp.ca_pem(),
        audience: AUD.into(),
        username_claim: "sub".into(),
        username_prefix: "oidc:".into(),
        groups_prefix: String::new(),
    }
}

fn claims(idp: &DevIssuer, sub: &str) -> Value {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    json!({"iss": idp.issuer_url(), "sub": sub, "aud": AUD, "iat": n, "nbf": n, "exp": n + 600,
           "groups": ["team-a"]})
}

/// A token signed with the issuer's current RS256 key.
fn token(idp: &DevIssuer, sub: &str) -> String {
    idp.sign(SigningAlg::RS256, &claims(idp, sub))
}

/// A token naming a key id the issuer never published.
fn unknown_kid_token(idp: &DevIssuer, sub: &str) -> String {
    idp.sign_with_header(
        SigningAlg::RS256,
        &json!({"alg": "RS256", "typ": "JWT", "kid": format!("unpublished-{sub}")}),
        &claims(idp, sub),
    )
}

fn bearer(uri: &str, token: &str) -> Request<Full<Bytes>> {
    Request::get(uri)
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// GET pods with `token`: the status code and body.
async fn pods_with(h: &Harness, client: &RawClient, token: &str) -> (u16, String) {
    let (code, _, text) = send(client, bearer(&h.uri(PODS_A), token)).await;
    (code, text)
}

/// The generic 401 every unauthenticated client gets.
fn assert_401(what: &str, code: u16, body: &str) {
    assert_eq!(code, 401, "{what}: {body}");
    assert_eq!(status_of(body), (401, "Unauthorized".into()), "{what}");
    let v: Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["message"], "Unauthorized", "{what}: {body}");
}

async fn readyz(h: &Harness) -> (u16, String) {
    let ops = h.demo.gateway.ops_addr.expect("operations listener");
    let plain = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let r = plain
        .request(get(&format!("http://{ops}/readyz")))
        .await
        .unwrap();
    let code = r.status().as_u16();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (code, String::from_utf8_lossy(&body).into_owned())
}

fn idp_fetches(idp: &DevIssuer) -> usize {
    idp.discovery_fetches() + idp.jwks_fetches()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idp_slow_or_down_at_start_up_leaves_the_gateway_serving_not_ready_and_ready_once_it_answers(
) {
    let idp = DevIssuer::start(&Ca::new("slow-idp-ca")).await.unwrap();
    // Slower than the gateway's 5 s fetch timeout.
    idp.set_delay(Duration::from_secs(8));
    let started = Instant::now();
    let h = Harness::start_with(DevSettings {
        jwt: vec![issuer_entry(&idp)],
        ..Default::default()
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "start-up waited {:?} for the IdP",
        started.elapsed()
    );
    let client = h.client(None, false);

    // Up and serving, not ready, naming the issuer whose keys are missing.
    let (code, text) = readyz(&h).await;
    assert_eq!(code, 503, "{text}");
    assert!(
        text.contains(&format!(
            "[-]oidc issuer {}: keys not loaded yet",
            idp.issuer_url()
        )),
        "{text}"
    );
    // Down now: tokens are refused (fail closed, the generic 401), and x509 users are served
    // meanwhile.
    idp.stop().await;
    idp.set_delay(Duration::ZERO);
    for i in 0..10 {
        let (code, body) = pods_with(&h, &client, &token(&idp, &format!("user-{i}"))).await;
        assert_401("token while the IdP has never answered", code, &body);
    }
    let alice = h.client(Some(&h.demo.env.pki.user("alice", &["team-a"])), false);
    assert_eq!(send(&alice, get(&h.uri(PODS_A))).await.0, 200);

    // The IdP comes back: ready without a restart (the retry timer, every 10 s), tokens work.
    idp.restart().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let (code, text) = readyz(&h).await;
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, body) = pods_with(&h, &client, &token(&idp, "after")).await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idp_slow_mid_run_keeps_known_keys_working_and_unknown_kids_fail_closed_without_hammering_it(
) {
    let idp = DevIssuer::start(&Ca::new("idp-ca")).await.unwrap();
    let h = Harness::start_with(DevSettings {
        jwt: vec![issuer_entry(&idp)],
        ..Default::default()
    })
    .await;
    let client = h.client(None, false);
    let (code, body) = pods_with(&h, &client, &token(&idp, "before")).await;
    assert_eq!(code, 200, "{body}");

    idp.set_delay(Duration::from_secs(8));
    let fetches = idp_fetches(&idp);
    // Tokens never seen before, signed with keys the gateway has: verified without the IdP.
    for i in 0..5 {
        let (code, body) = pods_with(&h, &client, &token(&idp, &format!("fresh-{i}"))).await;
        assert_eq!(code, 200, "known key while the IdP is slow: {body}");
    }
    assert_eq!(
        idp_fetches(&idp),
        fetches,
        "known keys made the gateway ask the IdP"
    );

    // 20 tokens with kids nobody published, at once: all refused, and the IdP is asked at
    // most once (single flight, one kid-miss refresh per issuer per 10 s).
    let attempts: Vec<_> = (0..20)
        .map(|i| {
            let client = client.clone();
            let req = bearer(
                &h.uri(PODS_A),
                &unknown_kid_token(&idp, &format!("forged-{i}")),
            );
            tokio::spawn(async move { send(&client, req).await })
        })
        .collect();
    for a in attempts {
        let (code, _, body) = a.await.unwrap();
        assert_401("unknown kid while the IdP is slow", code, &body);
    }
    assert!(
        idp_fetches(&idp) <= fetches + 1,
        "{} requests to the IdP for 20 unknown kids",
        idp_fetches(&idp) - fetches
    );
    let (code, text) = readyz(&h).await;
    assert_eq!(code, 200, "known keys keep the gateway ready: {text}");
    let (code, body) = pods_with(&h, &client, &token(&idp, "still")).await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_answering_garbage_keeps_the_last_good_keys_and_new_keys_load_once_it_is_fixed() {
    let idp = DevIssuer::start(&Ca::new("idp-ca")).await.unwrap();
    let h = Harness::start_with(DevSettings {
        jwt: vec![issuer_entry(&idp)],
        ..Default::default()
    })
    .await;
    let client = h.client(None, false);
    let (code, body) = pods_with(&h, &client, &token(&idp, "before")).await;
    assert_eq!(code, 200, "{body}");
    let old_key = token(&idp, "old-key");

    // The keys rotate, but the JWKS endpoint answers garbage: a key set whose only key is
    // symmetric (HS256 with a secret anyone could sign with). (An HTML page or JSON that is not
    // a key set is unit-tested: src/authn/oidc/tests.rs, garbage_jwks_keeps_last_good_keys.)
    tokio::task::block_in_place(|| idp.rotate(false));
    let new_key = token(&idp, "new-key");
    idp.set_jwks_override(Some(
        r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "hmac", "alg": "HS256"}]}"#.into(),
    ));
    let fetches = idp.jwks_fetches();
    let (code, body) = pods_with(&h, &client, &new_key).await;
    assert_401("a key only a garbage JWKS could vouch for", code, &body);
    assert_eq!(
        idp.jwks_fetches(),
        fetches + 1,
        "the unknown kid did not refresh"
    );
    let forged = idp.sign_with_header(
        SigningAlg::RS256,
        &json!({"alg": "HS256", "typ": "JWT", "kid": "hmac"}),
        &claims(&idp, "forger"),
    );
    let (code, body) = pods_with(&h, &client, &forged).await;
    assert_401("a token naming the garbage key", code, &body);
    // The last good keys stay: a token signed with them, never seen before, is accepted.
    let (code, body) = pods_with(&h, &client, &old_key).await;
    assert_eq!(code, 200, "last good key while the JWKS is garbage: {body}");
    let (code, text) = readyz(&h).await;
    assert_eq!(code, 200, "{text}");

    // Fixed: the new key is picked up once the next refresh is allowed (<= 10 s).
    idp.set_jwks_override(None);
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let (code, body) = pods_with(&h, &client, &new_key).await;
        if code == 200 {
            break;
        }
        assert_401("new key while the refresh is rate limited", code, &body);
        assert!(Instant::now() < deadline, "the new key never loaded");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ------------------------------------------------------------------ config reload storm

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_reload_storm_never_drops_a_working_issuer_or_the_gateway() {
    let a = DevIssuer::start(&Ca::new("a-idp-ca")).await.unwrap();
    let b = DevIssuer::start(&Ca::new("b-idp-ca")).await.unwrap();
    let h = Harness::start_with(DevSettings {
        jwt: vec![issuer_entry(&a)],
        reload_interval: "50ms",
        ..Default::default()
    })
    .await;
    let client = h.client(None, false);
    let config = h.demo.env.config_path.clone();
    let base = std::fs::read_to_string(&config).unwrap();
    let ca_b = h.demo.env.dir.join("certs").join("storm-b-ca.crt");
    std::fs::write(&ca_b, b.ca_pem()).unwrap();
    let entry_b = format!(
        "  jwt:\n    - issuer:\n        url: {}\n        audiences: [{AUD}]\n        certificateAuthorityFile: {}\n      claimMappings:\n        username:\n          claim: sub\n          prefix: \"b:\"\n        groups:\n          claim: groups\n          prefix: \"\"\n",
        b.issuer_url(),
        ca_b.display()
    );
    assert!(base.contains("  jwt:\n"), "{base}");
    let with_b = base.replacen("  jwt:\n", &entry_b, 1);

    // For 5 seconds the file flips every 20 ms between: A, A + B, a config that does not
    // validate, an empty file, and half of A + B.
    let storm = {
        let config = config.clone();
        let versions = [
            base.clone(),
            with_b.clone(),
            with_b.replace("audiences:", "audiencez:"),
            String::new(),
            with_b[..with_b.len() / 2].to_owned(),
        ];
        tokio::spawn(async move {
            let start = Instant::now();
            let mut i = 0;
            while start.elapsed() < Duration::from_secs(5) {
                std::fs::write(&config, &versions[i % versions.len()]).unwrap();
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            std::fs::write(&config, &versions[1]).unwrap();
            i
        })
    };
    let mut answers = std::collections::BTreeMap::new();
    let mut n = 0;
    while !storm.is_finished() {
        n += 1;
        // Issuer A is in every version that validates: its tokens never stop working.
        let (code, body) = pods_with(&h, &client, &token(&a, &format!("a-{n}"))).await;
        assert_eq!(code, 200, "issuer A during the config storm: {body}");
        // Issuer B comes and goes: its tokens work or get the generic 401, nothing else.
        let (code, body) = pods_with(&h, &client, &token(&b, &format!("b-{n}"))).await;
        match code {
            200 => {}
            401 => assert_401("issuer B while it is not configured", code, &body),
            _ => panic!("issuer B during the config storm: {code} {body}"),
        }
        *answers.entry(code).or_insert(0u32) += 1;
    }
    let writes = storm.await.unwrap();
    eprintln!("{writes} config writes; issuer B's answers {answers:?}");
    let metrics = h.demo.gateway.gateway.metrics.encode();
    assert!(
        metrics.contains(r#"ztgate_config_reloads_total{result="failure"}"#),
        "no reload was refused: {metrics}"
    );

    // After the storm, A + B is in force, and the gateway is ready.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, _) = pods_with(&h, &client, &token(&b, "after")).await;
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "issuer B never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, body) = pods_with(&h, &client, &token(&a, "after")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(readyz(&h).await.0, 200);
}

// ------------------------------------------------------------------ the table in the docs

/// Every test named in docs/hardening.md's fault table exists: `module::name` is `fn name` in
/// tests/it/module.rs; a bare `name` is a unit test somewhere under src/.
#[test]
fn every_row_of_the_fault_table_names_a_test_that_exists() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/hardening.md")).unwrap();
    let start = doc
        .find("## Faults in dependencies")
        .expect("the fault table's section");
    let section = &doc[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let mut sources = Vec::new();
    let mut dirs = vec![root.join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                sources.push(std::fs::read_to_string(path).unwrap());
            }
        }
    }
    let defines = |text: &str, name: &str| text.contains(&format!("fn {name}("));
    let mut rows = 0;
    for line in section.lines().filter(|l| l.starts_with("| ")) {
        let cell = line.trim_end_matches('|').rsplit('|').next().unwrap();
        if cell.trim() == "test" || cell.trim().starts_with("---") {
            continue;
        }
        rows += 1;
        let names: Vec<&str> = cell.split('`').skip(1).step_by(2).collect();
        assert!(!names.is_empty(), "a row names no test: {line}");
        for name in names {
            match name.split_once("::") {
                Some((file, test)) => {
                    let path = root.join("tests/it").join(format!("{file}.rs"));
                    let text = std::fs::read_to_string(&path)
                        .unwrap_or_else(|e| panic!("{name}: {}: {e}", path.display()));
                    assert!(
                        defines(&text, test),
                        "{name}: no such test in {}",
                        path.display()
                    );
                }
                None => assert!(
                    sources.iter().any(|s| defines(s, name)),
                    "{name}: no such unit test under src/"
                ),
            }
        }
    }
    assert!(rows >= 19, "only {rows} rows in the fault table");
}
