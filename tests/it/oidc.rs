//! OIDC bearer tokens through the gateway, end to end: a development OIDC issuer (discovery and
//! JWKS over HTTPS), the gateway configured to trust it, and the stand-in kube-apiserver behind.
//! Each test is something a token holder, an attacker, an IdP outage or kube-apiserver's webhook
//! token authenticator does, and what they see.
//!
//! Not covered here: `claimValidationRules` (DevSettings cannot express them; the rule checks are
//! unit-tested in `src/authn/oidc/verify.rs`).

use crate::support;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use support::{get, send, status_of, Harness, RawClient};
use ztgate::demo::{DevJwtIssuer, DevSettings};
use ztgate_testkit::pki::Ca;
use ztgate_testkit::{DevIssuer, SigningAlg};

const PODS: &str = "/api/v1/namespaces/team-a/pods";
const SSR: &str = "/apis/authentication.k8s.io/v1/selfsubjectreviews";
const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
const AUD: &str = "ztgate";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A development issuer with its own serving CA.
async fn issuer(name: &str) -> DevIssuer {
    let ca = Ca::new(&format!("{name}-issuer-ca"));
    DevIssuer::start(&ca).await.expect("dev issuer starts")
}

fn jwt_entry(issuer: &DevIssuer, username_prefix: &str, username_claim: &str) -> DevJwtIssuer {
    DevJwtIssuer {
        url: issuer.issuer_url(),
        ca_pem: issuer.ca_pem(),
        audience: AUD.into(),
        username_claim: username_claim.into(),
        username_prefix: username_prefix.into(),
        groups_prefix: String::new(),
    }
}

async fn start(jwt: Vec<DevJwtIssuer>, webhooks: bool) -> Harness {
    Harness::start_with(DevSettings {
        jwt,
        webhooks,
        ..Default::default()
    })
    .await
}

/// Good claims from `issuer`: iss, sub, aud, iat = nbf = now, exp = now + 600, groups.
fn claims(issuer: &DevIssuer, sub: &str, groups: &[&str]) -> Value {
    let n = now();
    json!({
        "iss": issuer.issuer_url(),
        "sub": sub,
        "aud": AUD,
        "iat": n,
        "nbf": n,
        "exp": n + 600,
        "groups": groups,
    })
}

/// `base` with the members of `changes` set; a `null` member removes it.
fn with(mut base: Value, changes: Value) -> Value {
    let obj = base.as_object_mut().unwrap();
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            obj.remove(k);
        } else {
            obj.insert(k.clone(), v.clone());
        }
    }
    base
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// The header DevIssuer uses, for `sign_with_header` variations.
fn header(alg: SigningAlg, kid: &str) -> Value {
    json!({"alg": alg.as_str(), "typ": "JWT", "kid": kid})
}

fn request(method: &str, uri: String, token: Option<&str>, body: &str) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    if !body.is_empty() {
        b = b.header("content-type", "application/json");
    }
    b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
}

fn ssr_body() -> &'static str {
    r#"{"kind":"SelfSubjectReview","apiVersion":"authentication.k8s.io/v1","metadata":{"creationTimestamp":null},"status":{"userInfo":{}}}"#
}

/// `POST selfsubjectreviews` with `token`: (code, the userInfo the stand-in answered with).
async fn whoami(h: &Harness, client: &RawClient, token: &str) -> (u16, Value, String) {
    let (code, _, body) = send(client, request("POST", h.uri(SSR), Some(token), ssr_body())).await;
    let info = serde_json::from_str::<Value>(&body)
        .map(|v| v["status"]["userInfo"].clone())
        .unwrap_or(Value::Null);
    (code, info, body)
}

fn groups_of(info: &Value) -> Vec<String> {
    info["groups"]
        .as_array()
        .map(|a| a.iter().map(|g| g.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

/// `ztgate_authentication_failures_total{reason=..}` as the gateway counts it now.
fn authn_failures(h: &Harness, reason: &str) -> u64 {
    let want = format!("ztgate_authentication_failures_total{{reason=\"{reason}\"}} ");
    h.demo
        .gateway
        .gateway
        .metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(&want))
        .map(|n| n.trim().parse().unwrap())
        .unwrap_or(0)
}

/// What every unauthenticated client sees: 401 and a Status that says nothing more.
fn assert_unauthorized(what: &str, code: u16, body: &str) {
    assert_eq!(code, 401, "{what}: {body}");
    let (status_code, reason) = status_of(body);
    assert_eq!(status_code, 401, "{what}: {body}");
    assert_eq!(reason, "Unauthorized", "{what}: {body}");
    let v: Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["message"], "Unauthorized", "{what}: {body}");
}

/// Sends GET pods (team-a) with `token`; asserts a generic 401 for `reason` that reached nothing.
async fn assert_refused(h: &Harness, client: &RawClient, what: &str, token: &str, reason: &str) {
    h.demo.apiserver.clear_requests();
    let before = authn_failures(h, reason);
    let (code, _, body) = send(client, request("GET", h.uri(PODS), Some(token), "")).await;
    assert_unauthorized(what, code, &body);
    // Only the refused request counts: the gateway's own probes of the upstream may come by.
    let seen: Vec<_> = h
        .demo
        .apiserver
        .requests()
        .into_iter()
        .filter(|r| r.path == PODS)
        .collect();
    assert!(seen.is_empty(), "{what}: reached the stand-in: {seen:?}");
    assert_eq!(
        authn_failures(h, reason),
        before + 1,
        "{what}: not refused as {reason}; metrics:\n{}",
        h.demo.gateway.gateway.metrics.encode()
    );
}

/// Sends GET pods (team-a) with `token` and expects the stand-in's list.
async fn assert_accepted(h: &Harness, client: &RawClient, what: &str, token: &str) {
    let (code, _, body) = send(client, request("GET", h.uri(PODS), Some(token), "")).await;
    assert_eq!(code, 200, "{what}: {body}");
    assert!(body.contains("web-0"), "{what}: {body}");
}

/// `GET /readyz` on the gateway's operations listener (plain HTTP).
async fn readyz(ops: std::net::SocketAddr) -> (u16, String) {
    let plain = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let r = plain
        .request(get(&format!("http://{ops}/readyz")))
        .await
        .unwrap();
    let code = r.status().as_u16();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (code, text(&body))
}

/// A kubeconfig whose user presents a static bearer token.
fn kubeconfig_with_token(h: &Harness, name: &str, token: &str) -> PathBuf {
    let path = h.dir.path().join(format!("{name}-token.kubeconfig"));
    let kubeconfig = format!(
        r#"apiVersion: v1
kind: Config
clusters:
  - name: ztgate
    cluster:
      server: {server}
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
        server = h.url(),
        ca = h.demo.env.gateway_ca_path.display(),
    );
    std::fs::write(&path, kubeconfig).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_with_a_bearer_token_is_the_tokens_user_with_its_groups() {
    let idp = issuer("idp").await;
    let h = start(vec![jwt_entry(&idp, "oidc:", "sub")], false).await;
    let token = idp.token(
        "alice",
        AUD,
        Duration::from_secs(600),
        json!({"groups": ["team-a", "devs"]}),
    );
    let kc = kubeconfig_with_token(&h, "alice", &token);

    let out = h.kubectl(&kc, &["auth", "whoami", "-o", "json"]).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let info = &v["status"]["userInfo"];
    assert_eq!(info["username"], "oidc:alice", "{v}");
    assert_eq!(
        groups_of(info),
        ["team-a", "devs", "system:authenticated"],
        "{v}"
    );
    // The stand-in saw the gateway impersonating the token's user, never the token.
    let ssr = h
        .demo
        .apiserver
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/selfsubjectreviews"))
        .expect("SelfSubjectReview reached the stand-in");
    assert_eq!(
        ssr.authenticated_user.as_deref(),
        Some(ztgate_testkit::GATEWAY_USER)
    );
    assert_eq!(ssr.header_values("impersonate-user"), ["oidc:alice"]);
    assert_eq!(ssr.header_values("impersonate-group"), ["team-a", "devs"]);
    assert!(ssr.header_values("authorization").is_empty());

    let out = h.kubectl(&kc, &["get", "pods", "-n", "team-a"]).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("web-0"), "{stdout}");

    // The groups come from the token: without team-a the cluster's RBAC says no.
    let other = idp.token(
        "bob",
        AUD,
        Duration::from_secs(600),
        json!({"groups": ["devs"]}),
    );
    let kc = kubeconfig_with_token(&h, "bob", &other);
    let out = h.kubectl(&kc, &["get", "pods", "-n", "team-a"]).await;
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(r#"User "oidc:bob" cannot list resource "pods""#),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_issuers_each_map_their_own_users_and_cannot_speak_for_each_other() {
    let a = issuer("a").await;
    let b = issuer("b").await;
    let h = start(
        vec![jwt_entry(&a, "a:", "sub"), jwt_entry(&b, "b:", "sub")],
        false,
    )
    .await;
    let client = h.client(None, false);

    for (idp, user, group) in [(&a, "a:alice", "team-a"), (&b, "b:alice", "devs")] {
        let token = idp.token(
            "alice",
            AUD,
            Duration::from_secs(600),
            json!({"groups": [group]}),
        );
        let (code, info, body) = whoami(&h, &client, &token).await;
        assert_eq!(code, 201, "{body}");
        assert_eq!(info["username"], user, "{body}");
        assert_eq!(groups_of(&info), [group, "system:authenticated"], "{body}");
    }

    // A's key, B's name: refused, and nothing reaches the cluster.
    let forged = a.sign(SigningAlg::RS256, &claims(&b, "mallory", &["team-a"]));
    assert_refused(
        &h,
        &client,
        "A-signed token with iss B",
        &forged,
        "bad_signature",
    )
    .await;
    // The same with B's kid in the header (A's key still signs).
    let forged = a.sign_with_header(
        SigningAlg::RS256,
        &header(SigningAlg::RS256, &b.kid(SigningAlg::RS256)),
        &claims(&b, "mallory", &["team-a"]),
    );
    assert_refused(
        &h,
        &client,
        "A-signed token with iss B and B's kid",
        &forged,
        "bad_signature",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tokens_are_refused_with_a_generic_401_and_reach_nothing() {
    let a = issuer("a").await;
    let b = issuer("b").await;
    let c = issuer("c").await;
    // Published before the gateway loads A's keys: a `use: enc` key in A's JWKS.
    let enc = a.sign_with_enc_key(&claims(&a, "mallory", &["team-a"]));
    let h = start(
        vec![
            jwt_entry(&a, "a:", "sub"),
            jwt_entry(&b, "b:", "sub"),
            jwt_entry(&c, "c:", "email"),
        ],
        false,
    )
    .await;
    let client = h.client(None, false);
    let good = || claims(&a, "mallory", &["team-a"]);
    let rs_kid = a.kid(SigningAlg::RS256);
    let n = now();

    // Controls: what the hostile tokens vary is accepted in its honest form.
    assert_accepted(&h, &client, "A RS256", &a.sign(SigningAlg::RS256, &good())).await;
    assert_accepted(&h, &client, "A ES256", &a.sign(SigningAlg::ES256, &good())).await;
    assert_accepted(
        &h,
        &client,
        "B RS256",
        &b.sign(SigningAlg::RS256, &claims(&b, "bob", &["team-a"])),
    )
    .await;
    let email = |verified: Value| {
        with(
            claims(&c, "u-1", &["team-a"]),
            json!({"email": "alice@example.com", "email_verified": verified}),
        )
    };
    assert_accepted(
        &h,
        &client,
        "C email verified",
        &c.sign(SigningAlg::RS256, &email(json!(true))),
    )
    .await;
    let pad = |len: usize| with(good(), json!({"pad": "x".repeat(len)}));
    let big_ok = a.sign(SigningAlg::RS256, &pad(10_000));
    assert!(big_ok.len() < 16 * 1024);
    assert_accepted(&h, &client, "A token under 16 KiB", &big_ok).await;

    let valid = a.sign(SigningAlg::RS256, &good());
    let (_, valid_payload, valid_sig) = {
        let mut p = valid.split('.');
        (
            p.next().unwrap().to_owned(),
            p.next().unwrap().to_owned(),
            p.next().unwrap().to_owned(),
        )
    };
    let hs256 = {
        let mut hdr = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        hdr.kid = Some(rs_kid.clone());
        jsonwebtoken::encode(
            &hdr,
            &good(),
            &jsonwebtoken::EncodingKey::from_secret(a.rsa_public_key_pem().as_bytes()),
        )
        .unwrap()
    };
    let too_big = a.sign(SigningAlg::RS256, &pad(13_000));
    assert!(too_big.len() > 16 * 1024, "{}", too_big.len());

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "alg none, empty signature",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "typ": "JWT"})),
                b64(&good())
            ),
            "invalid_token",
        ),
        (
            "alg NONE, a real signature",
            format!(
                "{}.{valid_payload}.{valid_sig}",
                b64(&json!({"alg": "NONE", "typ": "JWT", "kid": rs_kid}))
            ),
            "invalid_token",
        ),
        (
            "HS256 keyed with the issuer's RSA public key",
            hs256,
            "invalid_token",
        ),
        (
            "EdDSA (not in the issuer's signingAlgorithms)",
            a.sign(SigningAlg::EdDSA, &good()),
            "invalid_token",
        ),
        (
            "unknown kid",
            a.sign_with_header(
                SigningAlg::RS256,
                &header(SigningAlg::RS256, "no-such-kid"),
                &good(),
            ),
            "invalid_token",
        ),
        (
            "kid of the other issuer (signed by A's key)",
            a.sign_with_header(
                SigningAlg::RS256,
                &header(SigningAlg::RS256, &b.kid(SigningAlg::RS256)),
                &good(),
            ),
            "bad_signature",
        ),
        (
            "iss of A, signed by B",
            b.sign(SigningAlg::RS256, &good()),
            "bad_signature",
        ),
        (
            "signature of another token",
            {
                let other = a.sign(SigningAlg::RS256, &with(good(), json!({"sub": "root"})));
                let sig = other.rsplit('.').next().unwrap().to_owned();
                let head: Vec<&str> = valid.split('.').take(2).collect();
                format!("{}.{}.{sig}", head[0], head[1])
            },
            "bad_signature",
        ),
        (
            "expired",
            a.sign(
                SigningAlg::RS256,
                &with(
                    good(),
                    json!({"iat": n - 7200, "nbf": n - 7200, "exp": n - 3600}),
                ),
            ),
            "token_expired",
        ),
        (
            "nbf in the future",
            a.sign(SigningAlg::RS256, &with(good(), json!({"nbf": n + 3600}))),
            "token_claims_rejected",
        ),
        (
            "wrong aud",
            a.sign(
                SigningAlg::RS256,
                &with(good(), json!({"aud": "kubernetes"})),
            ),
            "token_claims_rejected",
        ),
        (
            "missing exp",
            a.sign(SigningAlg::RS256, &with(good(), json!({"exp": null}))),
            "token_claims_rejected",
        ),
        (
            "wrong iss",
            a.sign(
                SigningAlg::RS256,
                &with(good(), json!({"iss": "https://idp.evil.example"})),
            ),
            "unknown_issuer",
        ),
        (
            "iss of A with a trailing slash",
            a.sign(
                SigningAlg::RS256,
                &with(good(), json!({"iss": format!("{}/", a.issuer_url())})),
            ),
            "unknown_issuer",
        ),
        (
            "group in the reserved system: namespace",
            a.sign(
                SigningAlg::RS256,
                &with(good(), json!({"groups": ["system:masters"]})),
            ),
            "invalid_identity",
        ),
        ("header not base64url", format!("+{valid}"), "invalid_token"),
        (
            "header not JSON",
            format!(
                "{}.{valid_payload}.{valid_sig}",
                URL_SAFE_NO_PAD.encode("{\"alg\":\"RS256\",")
            ),
            "invalid_token",
        ),
        (
            "payload not JSON",
            format!(
                "{}.{}.{valid_sig}",
                b64(&header(SigningAlg::RS256, &rs_kid)),
                URL_SAFE_NO_PAD.encode("not json")
            ),
            "invalid_token",
        ),
        ("not three parts", "abc.def".to_owned(), "invalid_token"),
        ("over 16 KiB", too_big, "invalid_token"),
        (
            "jku header",
            a.sign_with_header(
                SigningAlg::RS256,
                &with(
                    header(SigningAlg::RS256, &rs_kid),
                    json!({"jku": "https://idp.evil.example/keys"}),
                ),
                &good(),
            ),
            "invalid_token",
        ),
        (
            "unknown crit header",
            a.sign_with_header(
                SigningAlg::RS256,
                &with(
                    header(SigningAlg::RS256, &rs_kid),
                    json!({"crit": ["x-acme-binding"], "x-acme-binding": "anything"}),
                ),
                &good(),
            ),
            "invalid_token",
        ),
        ("key published with use: enc", enc, "invalid_token"),
        (
            "email_verified false",
            c.sign(SigningAlg::RS256, &email(json!(false))),
            "token_claims_rejected",
        ),
        (
            "email_verified not a boolean",
            c.sign(SigningAlg::RS256, &email(json!("true"))),
            "token_claims_rejected",
        ),
    ];
    for (what, token, reason) in &cases {
        assert_refused(&h, &client, what, token, reason).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_signing_keys_are_picked_up_without_a_restart() {
    let idp = issuer("idp").await;
    let h = start(vec![jwt_entry(&idp, "oidc:", "sub")], false).await;
    let client = h.client(None, false);
    let old_key = idp.sign(SigningAlg::RS256, &claims(&idp, "alice", &["team-a"]));
    let unseen_old_key = idp.sign(SigningAlg::RS256, &claims(&idp, "carol", &["team-a"]));
    assert_accepted(&h, &client, "before rotation", &old_key).await;

    let old_kid = idp.kid(SigningAlg::RS256);
    tokio::task::block_in_place(|| idp.rotate(false));
    assert_ne!(idp.kid(SigningAlg::RS256), old_kid);
    let fetches = idp.jwks_fetches();
    let new_key = idp.sign(SigningAlg::RS256, &claims(&idp, "bob", &["team-a"]));
    let (code, info, body) = whoami(&h, &client, &new_key).await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(info["username"], "oidc:bob");
    assert_eq!(
        idp.jwks_fetches(),
        fetches + 1,
        "exactly one JWKS refresh for the unknown kid"
    );
    // The other rotated keys came with the same refresh.
    let es = idp.sign(SigningAlg::ES256, &claims(&idp, "dave", &["team-a"]));
    assert_accepted(&h, &client, "new ES256 key", &es).await;
    assert_eq!(idp.jwks_fetches(), fetches + 1);
    // A key the issuer no longer publishes verifies nothing new.
    assert_refused(
        &h,
        &client,
        "token signed with the retired key",
        &unseen_old_key,
        "invalid_token",
    )
    .await;
    // Nor does a token verified (and cached) before the key was withdrawn.
    assert_refused(
        &h,
        &client,
        "cached token signed with the retired key",
        &old_key,
        "invalid_token",
    )
    .await;
}

/// A token with a made-up kid, sent just before the IdP rotates its keys, does not hold back
/// the new keys: the first token signed with a new key is accepted. The made-up kid itself costs
/// the IdP one JWKS request, however often it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_made_up_kid_just_before_a_rotation_does_not_hold_back_the_new_keys() {
    let idp = issuer("idp").await;
    let h = start(vec![jwt_entry(&idp, "oidc:", "sub")], false).await;
    let client = h.client(None, false);
    let made_up = idp.sign_with_header(
        SigningAlg::RS256,
        &header(SigningAlg::RS256, "made-up-kid"),
        &claims(&idp, "mallory", &["team-a"]),
    );
    let fetches = idp.jwks_fetches();
    assert_refused(&h, &client, "made-up kid", &made_up, "invalid_token").await;
    assert_eq!(idp.jwks_fetches(), fetches + 1, "one JWKS request to look");

    tokio::task::block_in_place(|| idp.rotate(false));
    let new_key = idp.sign(SigningAlg::RS256, &claims(&idp, "bob", &["team-a"]));
    assert_accepted(&h, &client, "first token with the new key", &new_key).await;
    assert_eq!(idp.jwks_fetches(), fetches + 2);

    // The key set changed, so the made-up kid is looked for once more; then never again.
    for i in 0..20 {
        assert_refused(
            &h,
            &client,
            &format!("made-up kid #{i}"),
            &made_up,
            "invalid_token",
        )
        .await;
    }
    assert_eq!(idp.jwks_fetches(), fetches + 3);
}

/// A token whose header or payload names a member twice reads differently to different JSON
/// parsers (the first value, the last, or an error): the gateway refuses it, with a 401 that
/// says nothing more, before it reaches anything. The same name in different objects is fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_naming_a_member_twice_is_refused_with_a_generic_401() {
    let idp = issuer("idp").await;
    let signer = RawSigner::new("raw-es256");
    idp.set_jwks_override(Some(signer.jwks()));
    let h = start(vec![jwt_entry(&idp, "", "email")], false).await;
    let client = h.client(None, false);
    let header = format!(r#"{{"alg":"ES256","typ":"JWT","kid":"{}"}}"#, signer.kid);
    let n = now();
    let payload = |rest: &str| {
        format!(
            r#"{{"iss":"{}","sub":"u-1","aud":"{AUD}","iat":{n},"exp":{},{rest}}}"#,
            idp.issuer_url(),
            n + 600
        )
    };
    assert_accepted(
        &h,
        &client,
        "the same name in different objects",
        &signer.sign(
            &header,
            &payload(r#""email":"alice@example.com","groups":["team-a"],"a":{"x":1},"b":{"x":2}"#),
        ),
    )
    .await;
    let cases = [
        (
            "groups twice",
            header.clone(),
            payload(r#""email":"alice@example.com","groups":["devs"],"groups":["team-a"]"#),
        ),
        (
            "the username claim twice",
            header.clone(),
            payload(
                r#""email":"alice@example.com","groups":["team-a"],"email":"root@example.com""#,
            ),
        ),
        (
            "the username claim twice, once escaped",
            header.clone(),
            payload(
                r#""email":"alice@example.com","groups":["team-a"],"em\u0061il":"root@example.com""#,
            ),
        ),
        (
            "a nested member twice",
            header.clone(),
            payload(
                r#""email":"alice@example.com","groups":["team-a"],"cnf":{"x5t#S256":"a","x5t#S256":"b"}"#,
            ),
        ),
        (
            "alg twice in the header",
            format!(r#"{{"alg":"ES256","alg":"ES256","kid":"{}"}}"#, signer.kid),
            payload(r#""email":"alice@example.com","groups":["team-a"]"#),
        ),
    ];
    for (what, hdr, p) in &cases {
        assert_refused(&h, &client, what, &signer.sign(hdr, p), "invalid_token").await;
    }
}

/// Signs a header and a payload exactly as written, with an ES256 key its issuer publishes
/// through a JWKS override (DevIssuer signs a `serde_json::Value`, which cannot hold a member
/// twice).
struct RawSigner {
    key: aws_lc_rs::signature::EcdsaKeyPair,
    kid: String,
}

impl RawSigner {
    fn new(kid: &str) -> RawSigner {
        let key = aws_lc_rs::signature::EcdsaKeyPair::generate(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        )
        .unwrap();
        RawSigner {
            key,
            kid: kid.into(),
        }
    }

    /// A JWKS holding only this key.
    fn jwks(&self) -> String {
        use aws_lc_rs::signature::KeyPair;
        let point = self.key.public_key().as_ref();
        json!({"keys": [{
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        }]})
        .to_string()
    }

    fn sign(&self, header: &str, payload: &str) -> String {
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let sig = self
            .key
            .sign(
                &aws_lc_rs::rand::SystemRandom::new(),
                signing_input.as_bytes(),
            )
            .unwrap();
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idp_outage_keeps_known_keys_working_and_the_gateway_ready() {
    let idp = issuer("idp").await;
    let h = start(vec![jwt_entry(&idp, "oidc:", "sub")], false).await;
    let client = h.client(None, false);
    let ops = h.demo.gateway.ops_addr.expect("ops listener");
    assert_accepted(
        &h,
        &client,
        "before the outage",
        &idp.token(
            "alice",
            AUD,
            Duration::from_secs(600),
            json!({"groups": ["team-a"]}),
        ),
    )
    .await;

    idp.stop().await;
    // Never seen before, so not from the cache: verified with the keys fetched earlier.
    let fresh = idp.sign(SigningAlg::RS256, &claims(&idp, "bob", &["team-a"]));
    assert_accepted(&h, &client, "known key during the outage", &fresh).await;
    let fresh_es = idp.sign(SigningAlg::ES256, &claims(&idp, "carol", &["team-a"]));
    assert_accepted(&h, &client, "known ES256 key during the outage", &fresh_es).await;
    // A kid the gateway does not know cannot be checked while the IdP is away.
    let unknown = idp.sign_with_header(
        SigningAlg::RS256,
        &header(SigningAlg::RS256, "published-during-outage"),
        &claims(&idp, "dave", &["team-a"]),
    );
    assert_refused(
        &h,
        &client,
        "unknown kid during the outage",
        &unknown,
        "invalid_token",
    )
    .await;
    let (code, body) = readyz(ops).await;
    assert_eq!(code, 200, "readyz during the IdP outage: {body}");

    idp.restart().await.expect("issuer restarts");
    let after = idp.sign(SigningAlg::RS256, &claims(&idp, "erin", &["team-a"]));
    assert_accepted(&h, &client, "after the IdP is back", &after).await;
    // A key rotated in after the outage is fetched at once: the failed fetch during the outage
    // holds nothing back.
    tokio::task::block_in_place(|| idp.rotate(false));
    let rotated = idp.sign(SigningAlg::RS256, &claims(&idp, "frank", &["team-a"]));
    assert_accepted(&h, &client, "a key rotated in after the outage", &rotated).await;
    let (code, body) = readyz(ops).await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_review_answers_kube_apiserver_and_nobody_else() {
    let idp = issuer("idp").await;
    let h = start(vec![jwt_entry(&idp, "oidc:", "sub")], true).await;
    let kube_apiserver = h
        .demo
        .env
        .pki
        .cluster_ca
        .issue_client("kube-apiserver", &[]);
    let apiserver_client = h.client(Some(&kube_apiserver), false);
    let review = |token: &str| {
        json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token},
        })
        .to_string()
    };
    h.demo.apiserver.clear_requests();

    let token = idp.token(
        "alice",
        AUD,
        Duration::from_secs(600),
        json!({"groups": ["team-a", "devs"]}),
    );
    let (code, _, body) = send(
        &apiserver_client,
        request("POST", h.uri(TOKEN_REVIEWS), None, &review(&token)),
    )
    .await;
    assert!(code == 200 || code == 201, "{code}: {body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["apiVersion"], "authentication.k8s.io/v1", "{body}");
    assert_eq!(v["kind"], "TokenReview", "{body}");
    let status = &v["status"];
    assert_eq!(status["authenticated"], true, "{body}");
    assert_eq!(status["user"]["username"], "oidc:alice", "{body}");
    assert_eq!(
        status["user"]["groups"],
        json!(["team-a", "devs"]),
        "{body}"
    );

    // A bad token: not authenticated, and not told why.
    for (what, bad) in [
        (
            "expired",
            idp.token(
                "alice",
                AUD,
                Duration::from_secs(600),
                json!({"iat": now() - 7200, "nbf": now() - 7200, "exp": now() - 3600}),
            ),
        ),
        (
            "wrong aud",
            idp.token("alice", "kubernetes", Duration::from_secs(600), Value::Null),
        ),
        ("garbage", "not-a-jwt".to_owned()),
    ] {
        let (code, _, body) = send(
            &apiserver_client,
            request("POST", h.uri(TOKEN_REVIEWS), None, &review(&bad)),
        )
        .await;
        assert!(code == 200 || code == 201, "{what}: {code}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v["status"],
            json!({"authenticated": false, "error": "token rejected"}),
            "{what}: {body}"
        );
    }

    // A locked user is not authenticated to kube-apiserver either (same generic answer), and is
    // again once the lock is deleted.
    let store = &h.demo.gateway.gateway.store;
    let lock = ztgate::state::Lock::new(
        ztgate::state::LockTarget::User("oidc:alice".into()),
        "offboarded",
        None,
        "test",
    )
    .unwrap();
    store.put_lock(lock.clone()).await.unwrap();
    let (code, _, body) = send(
        &apiserver_client,
        request("POST", h.uri(TOKEN_REVIEWS), None, &review(&token)),
    )
    .await;
    assert!(code == 200 || code == 201, "{code}: {body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["status"],
        json!({"authenticated": false, "error": "token rejected"}),
        "locked: {body}"
    );
    store.delete_lock(&lock.id).await.unwrap().unwrap();
    let (_, _, body) = send(
        &apiserver_client,
        request("POST", h.uri(TOKEN_REVIEWS), None, &review(&token)),
    )
    .await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"]["authenticated"], true, "unlocked: {body}");

    // Anyone else gets no answer from the gateway's webhook: their TokenReview is an ordinary
    // API request (authenticated, authorized, forwarded as themselves), so kube-apiserver's
    // own rules apply and the token in the body is never reviewed by the gateway.
    let alice_cert = h.demo.env.pki.user("alice", &["team-a"]);
    let unreviewed = idp.token(
        "mallory",
        AUD,
        Duration::from_secs(600),
        json!({"groups": ["team-a"]}),
    );
    let holder = idp.token(
        "bob",
        AUD,
        Duration::from_secs(600),
        json!({"groups": ["team-a"]}),
    );
    for (what, cert, bearer, forwarded_as) in [
        ("no client certificate", None, None, None),
        (
            "a users-CA certificate",
            Some(&alice_cert),
            None,
            Some("alice"),
        ),
        (
            "a valid bearer token, no certificate",
            None,
            Some(holder.as_str()),
            Some("oidc:bob"),
        ),
    ] {
        h.demo.apiserver.clear_requests();
        let c = h.client(cert, false);
        let (code, _, body) = send(
            &c,
            request("POST", h.uri(TOKEN_REVIEWS), bearer, &review(&unreviewed)),
        )
        .await;
        assert!(
            code == 401 || code == 403 || code == 404,
            "{what}: {code}: {body}"
        );
        let (status_code, _) = status_of(&body);
        assert_eq!(status_code, u64::from(code), "{what}: {body}");
        assert!(!body.contains("mallory"), "{what}: {body}");
        let seen = h.demo.apiserver.requests();
        match forwarded_as {
            None => assert!(seen.is_empty(), "{what}: reached the stand-in"),
            Some(user) => {
                assert_eq!(seen.len(), 1, "{what}");
                assert_eq!(seen[0].header_values("impersonate-user"), [user], "{what}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_token_names_the_user_even_next_to_a_client_certificate() {
    let idp = issuer("idp").await;
    let h = start(vec![jwt_entry(&idp, "oidc:", "sub")], false).await;
    let alice_cert = h.demo.env.pki.user("alice", &["team-a", "admins"]);
    let client = h.client(Some(&alice_cert), false);
    // The certificate alone is alice.
    let (code, _, body) = send(&client, request("POST", h.uri(SSR), None, ssr_body())).await;
    assert_eq!(code, 201, "{body}");

    let token = idp.token(
        "bob",
        AUD,
        Duration::from_secs(600),
        json!({"groups": ["devs"]}),
    );
    h.demo.apiserver.clear_requests();
    let (code, info, body) = whoami(&h, &client, &token).await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(info["username"], "oidc:bob", "{body}");
    assert_eq!(groups_of(&info), ["devs", "system:authenticated"], "{body}");
    let seen = h.demo.apiserver.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header_values("impersonate-user"), ["oidc:bob"]);
    assert_eq!(seen[0].header_values("impersonate-group"), ["devs"]);

    // A refused token is not rescued by the certificate next to it.
    let expired = idp.token(
        "bob",
        AUD,
        Duration::from_secs(600),
        json!({"iat": now() - 7200, "nbf": now() - 7200, "exp": now() - 3600}),
    );
    h.demo.apiserver.clear_requests();
    let (code, _, body) = whoami(&h, &client, &expired).await;
    assert_unauthorized("expired token next to a valid certificate", code, &body);
    assert!(h.demo.apiserver.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuers_added_or_removed_in_the_config_file_apply_without_a_restart() {
    let a = issuer("a").await;
    let b = issuer("b").await;
    let h = Harness::start_with(DevSettings {
        jwt: vec![jwt_entry(&a, "a:", "sub")],
        reload_interval: "200ms",
        ..Default::default()
    })
    .await;
    let client = h.client(None, false);
    let from_b = b.sign(SigningAlg::RS256, &claims(&b, "bob", &["team-a"]));
    assert_refused(
        &h,
        &client,
        "issuer B before the reload",
        &from_b,
        "unknown_issuer",
    )
    .await;

    // Add issuer B to the running gateway's config file.
    let ca_b = h.demo.env.dir.join("certs").join("issuer-b-ca.crt");
    std::fs::write(&ca_b, b.ca_pem()).unwrap();
    let yaml = std::fs::read_to_string(&h.demo.env.config_path).unwrap();
    let entry_b = format!(
        "  jwt:\n    - issuer:\n        url: {}\n        audiences: [{AUD}]\n        certificateAuthorityFile: {}\n      claimMappings:\n        username:\n          claim: sub\n          prefix: \"b:\"\n        groups:\n          claim: groups\n          prefix: \"\"\n",
        b.issuer_url(),
        ca_b.display()
    );
    let with_b = yaml.replacen("  jwt:\n", &entry_b, 1);
    std::fs::write(&h.demo.env.config_path, &with_b).unwrap();
    support::eventually(
        Duration::from_secs(10),
        "issuer B's token is accepted after the config reload",
        || async {
            let (code, _, _) = send(&client, request("GET", h.uri(PODS), Some(&from_b), "")).await;
            (code == 200).then_some(())
        },
    )
    .await;
    let from_a = a.sign(SigningAlg::RS256, &claims(&a, "alice", &["team-a"]));
    assert_accepted(&h, &client, "issuer A still works", &from_a).await;

    // A broken config is refused whole: both issuers keep working.
    let failed_before = failed_reloads(&h);
    std::fs::write(
        &h.demo.env.config_path,
        with_b.replace("audiences:", "audiencez:"),
    )
    .unwrap();
    support::wait_until(
        Duration::from_secs(10),
        "the broken config's reload is counted as failed",
        || failed_reloads(&h) > failed_before,
    )
    .await;
    let again_b = b.sign(SigningAlg::RS256, &claims(&b, "bob2", &["team-a"]));
    assert_accepted(&h, &client, "issuer B after a broken config", &again_b).await;
}

/// `ztgate_config_reloads_total{result="failure"}` (0 before the first failure).
fn failed_reloads(h: &Harness) -> u64 {
    let metrics = h.demo.gateway.gateway.metrics.encode();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"ztgate_config_reloads_total{result="failure"} "#))
        .map_or(0, |n| n.trim().parse().expect("a counter value"))
}
