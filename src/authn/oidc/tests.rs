//! OIDC authenticator tests against the development issuer (`ztgate_testkit::oidc::DevIssuer`):
//! valid tokens, the hostile table, key rotation and IdP failures, the token cache, reloads.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use ztgate_testkit::oidc::{DevIssuer, SigningAlg};
use ztgate_testkit::pki::Ca;

use super::*;
use crate::authn::credentials::bearer_from_headers;
use crate::config::jwt::{
    ClaimMappings, ClaimOrExpression, ClaimValidationRule, JwtAuthenticator, JwtIssuer,
    PrefixedClaimOrExpression,
};
use crate::config::GoDuration;

pub(crate) struct Fixture {
    pub(crate) idp: DevIssuer,
    pub(crate) auth: Arc<OidcAuthenticator>,
    pub(crate) cfg: JwtAuthenticator,
    #[allow(dead_code)]
    pub(crate) ca: Ca,
}

pub(crate) fn config(idp: &DevIssuer) -> JwtAuthenticator {
    JwtAuthenticator {
        issuer: JwtIssuer {
            url: idp.issuer_url(),
            discovery_url: None,
            audiences: vec!["kubernetes".into()],
            audience_match_policy: None,
            certificate_authority: Some(idp.ca_pem()),
            certificate_authority_file: None,
        },
        claim_validation_rules: Vec::new(),
        claim_mappings: ClaimMappings {
            username: Some(PrefixedClaimOrExpression {
                claim: Some("sub".into()),
                prefix: Some("oidc:".into()),
                expression: None,
            }),
            groups: Some(PrefixedClaimOrExpression {
                claim: Some("groups".into()),
                prefix: Some("oidc:".into()),
                expression: None,
            }),
            uid: Some(ClaimOrExpression {
                claim: Some("sub".into()),
                expression: None,
            }),
            extra: Vec::new(),
        },
        user_validation_rules: Vec::new(),
        signing_algorithms: vec!["RS256".into(), "ES256".into(), "EdDSA".into()],
        clock_leeway: GoDuration(Duration::from_secs(30)),
        max_token_lifetime: None,
        max_token_bytes: 16384,
        claims_for_policy: vec!["acr".into()],
    }
}

pub(crate) fn test_options() -> OidcOptions {
    OidcOptions {
        refresh_interval: Duration::from_secs(3600),
        retry_interval: Duration::from_secs(3600),
        kid_miss_floor: Duration::ZERO,
        fetch_timeout: Duration::from_secs(2),
        ..OidcOptions::default()
    }
}

pub(crate) async fn fixture() -> Fixture {
    fixture_with(|_| {}, test_options()).await
}

pub(crate) async fn fixture_with(
    tweak: impl FnOnce(&mut JwtAuthenticator),
    opts: OidcOptions,
) -> Fixture {
    let ca = Ca::new("test idp ca");
    let idp = DevIssuer::start(&ca).await.expect("dev issuer");
    let mut cfg = config(&idp);
    tweak(&mut cfg);
    let auth =
        OidcAuthenticator::with_options(std::slice::from_ref(&cfg), CancellationToken::new(), opts)
            .await
            .expect("authenticator");
    assert_eq!(
        auth.not_loaded(),
        Vec::<String>::new(),
        "{:?}",
        auth.fetch_errors()
    );
    Fixture { idp, auth, cfg, ca }
}

pub(crate) fn bearer(token: &str) -> BearerToken {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).expect("header value"),
    );
    bearer_from_headers(&h).expect("bearer").expect("some")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(idp: &DevIssuer, extra: Value) -> Value {
    let n = now();
    let mut c = json!({
        "iss": idp.issuer_url(), "sub": "alice", "aud": "kubernetes",
        "iat": n, "nbf": n, "exp": n + 600,
    });
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

async fn auth_err(auth: &OidcAuthenticator, token: &str) -> AuthnError {
    match auth.authenticate(&bearer(token)).await {
        Ok(id) => panic!("accepted as {}", id.user()),
        Err(e) => e,
    }
}

#[tokio::test]
async fn accepts_rs256_es256_eddsa() {
    let f = fixture().await;
    for alg in SigningAlg::ALL {
        let token = f.idp.sign(
            alg,
            &claims(
                &f.idp,
                json!({"groups": ["devs", "ops"], "jti": "j1", "amr": ["mfa"], "acr": "gold",
                       "cnf": {"x5t#S256": "thumb"}}),
            ),
        );
        let id = f
            .auth
            .authenticate(&bearer(&token))
            .await
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_eq!(id.user(), "oidc:alice");
        assert_eq!(id.uid(), Some("alice"));
        assert_eq!(id.groups(), ["oidc:devs", "oidc:ops"]);
        assert_eq!(
            id.method(),
            &crate::authn::AuthMethod::Oidc {
                issuer: f.idp.issuer_url()
            }
        );
        let facts = id.facts();
        assert_eq!(facts.issuer.as_deref(), Some(f.idp.issuer_url().as_str()));
        assert_eq!(facts.token_id.as_deref(), Some("j1"));
        assert_eq!(facts.amr, ["mfa"]);
        assert_eq!(facts.cnf_x5t_s256.as_deref(), Some("thumb"));
        assert_eq!(facts.claims.get("acr").unwrap(), &["gold"]);
        assert!(facts.issued_at.is_some());
        let exp = id.expires_at().unwrap();
        assert!(exp > SystemTime::now() + Duration::from_secs(500));
    }
}

fn hs256_with_public_key(idp: &DevIssuer, claims: &Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(idp.kid(SigningAlg::RS256));
    jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_secret(idp.rsa_public_key_pem().as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn hostile_tokens_are_refused_precisely() {
    let ca = Ca::new("test idp ca");
    let idp = DevIssuer::start(&ca).await.unwrap();
    let other = DevIssuer::start(&ca).await.unwrap();
    let mut cfg_a = config(&idp);
    cfg_a.claim_validation_rules.push(ClaimValidationRule {
        claim: Some("hd".into()),
        required_value: Some("example.com".into()),
        ..Default::default()
    });
    let mut cfg_email = config(&other);
    cfg_email.claim_mappings.username = Some(PrefixedClaimOrExpression {
        claim: Some("email".into()),
        prefix: Some("".into()),
        expression: None,
    });
    let auth = OidcAuthenticator::with_options(
        &[cfg_a, cfg_email],
        CancellationToken::new(),
        test_options(),
    )
    .await
    .unwrap();
    assert!(auth.not_loaded().is_empty(), "{:?}", auth.fetch_errors());

    let good = |extra: Value| {
        let mut c = claims(&idp, extra);
        c["hd"] = json!("example.com");
        c
    };
    let rs = |c: &Value| idp.sign(SigningAlg::RS256, c);
    let kid_rs = idp.kid(SigningAlg::RS256);
    let n = now();
    // Sanity: the baseline token passes.
    auth.authenticate(&bearer(&rs(&good(json!({})))))
        .await
        .unwrap();

    let big_claim = "x".repeat(20_000);
    let enc = idp.sign_with_enc_key(&good(json!({})));
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "alg none",
            idp.sign_with_header(
                SigningAlg::RS256,
                &json!({"alg": "none", "kid": kid_rs}),
                &good(json!({})),
            ),
            "invalid_token",
            "alg none refused",
        ),
        (
            "HS256 with the RSA public key as secret",
            hs256_with_public_key(&idp, &good(json!({}))),
            "invalid_token",
            "alg \"HS256\" refused (HMAC",
        ),
        (
            "unknown kid",
            idp.sign_with_header(
                SigningAlg::RS256,
                &json!({"alg": "RS256", "kid": "nope"}),
                &good(json!({})),
            ),
            "invalid_token",
            "kid \"nope\" not found in the keys of issuer",
        ),
        (
            "iss of A signed with B's key (kid of another configured issuer)",
            other.sign(SigningAlg::RS256, &good(json!({}))),
            "bad_signature",
            "signed by a key of another issuer",
        ),
        (
            "kid of A but signed by B's key",
            other.sign_with_header(
                SigningAlg::RS256,
                &json!({"alg": "RS256", "kid": kid_rs}),
                &good(json!({})),
            ),
            "bad_signature",
            "signature does not verify with key",
        ),
        (
            "expired",
            rs(&good(
                json!({"exp": n - 120, "iat": n - 600, "nbf": n - 600}),
            )),
            "token_expired",
            "exp",
        ),
        (
            "nbf in the future",
            rs(&good(json!({"nbf": n + 600}))),
            "token_claims_rejected",
            "nbf is in the future",
        ),
        (
            "iat in the future",
            rs(&good(json!({"iat": n + 600, "nbf": null}))),
            "token_claims_rejected",
            "iat is",
        ),
        (
            "wrong aud",
            rs(&good(json!({"aud": "someone-else"}))),
            "token_claims_rejected",
            "aud holds none of the issuer's audiences",
        ),
        (
            "wrong iss",
            rs(&good(json!({"iss": "https://evil.example.com"}))),
            "unknown_issuer",
            "\"https://evil.example.com\"",
        ),
        (
            "missing exp",
            rs(&good(json!({"exp": null}))),
            "token_claims_rejected",
            "exp claim missing",
        ),
        (
            "malformed base64",
            format!("{}.a+b/c.{}", "eyJhbGciOiJSUzI1NiJ9", "c2ln"),
            "invalid_token",
            "payload is not base64url",
        ),
        (
            "malformed JSON",
            format!(
                "{}.{}.c2ln",
                base64::Engine::encode(
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                    "{\"alg\":"
                ),
                "e30"
            ),
            "invalid_token",
            "header is not JSON",
        ),
        (
            "over size",
            rs(&good(json!({"pad": big_claim}))),
            "invalid_token",
            "exceeds the limit of 16384 bytes",
        ),
        (
            "jku header",
            idp.sign_with_header(
                SigningAlg::RS256,
                &json!({"alg": "RS256", "kid": kid_rs, "jku": "https://evil.example.com/keys"}),
                &good(json!({})),
            ),
            "invalid_token",
            "jku header refused",
        ),
        (
            "unknown crit",
            idp.sign_with_header(
                SigningAlg::RS256,
                &json!({"alg": "RS256", "kid": kid_rs, "crit": ["exp-ext"], "exp-ext": "x"}),
                &good(json!({})),
            ),
            "invalid_token",
            "crit header refused",
        ),
        ("use: enc key", enc, "invalid_token", "not for signatures"),
        (
            "failing claimValidationRule",
            rs(&claims(&idp, json!({"hd": "evil.com"}))),
            "token_claims_rejected",
            "claim \"hd\" does not have the required value",
        ),
        (
            "email username with email_verified false",
            other.sign(
                SigningAlg::RS256,
                &claims(
                    &other,
                    json!({"email": "bob@example.com", "email_verified": false}),
                ),
            ),
            "token_claims_rejected",
            "email not verified",
        ),
        (
            "system: user without a system: prefix",
            other.sign(
                SigningAlg::RS256,
                &claims(
                    &other,
                    json!({"email": "system:admin", "email_verified": true}),
                ),
            ),
            "invalid_identity",
            "reserved system:",
        ),
        (
            "alg the issuer does not accept",
            idp.sign_with_header(
                SigningAlg::RS256,
                &json!({"alg": "PS256", "kid": kid_rs}),
                &good(json!({})),
            ),
            "invalid_token",
            "not in the signingAlgorithms",
        ),
        (
            "alg that does not fit the key",
            idp.sign_with_header(
                SigningAlg::RS256,
                &json!({"alg": "ES256", "kid": kid_rs}),
                &good(json!({})),
            ),
            "invalid_token",
            "the token uses alg ES256",
        ),
    ];
    for (name, token, label, want) in cases {
        let e = match auth.authenticate(&bearer(&token)).await {
            Ok(id) => panic!("{name}: accepted as {}", id.user()),
            Err(e) => e,
        };
        let msg = e.to_string();
        assert_eq!(e.reason_label(), label, "{name}: {msg}");
        assert!(msg.contains(want), "{name}: {msg:?} lacks {want:?}");
        assert!(
            !msg.contains(&token[..token.len().min(40)]),
            "{name}: token in message"
        );
    }
}

#[tokio::test]
async fn rotation_is_picked_up_after_one_kid_miss_refresh() {
    let f = fixture().await;
    let before = f.idp.jwks_fetches();
    f.idp.rotate(false);
    let token = f.idp.sign(SigningAlg::ES256, &claims(&f.idp, json!({})));
    f.auth.authenticate(&bearer(&token)).await.unwrap();
    assert_eq!(f.idp.jwks_fetches(), before + 1);
    // Known kid now: no further fetch.
    let token = f
        .idp
        .sign(SigningAlg::RS256, &claims(&f.idp, json!({"sub": "bob"})));
    f.auth.authenticate(&bearer(&token)).await.unwrap();
    assert_eq!(f.idp.jwks_fetches(), before + 1);
}

/// Many requests with the kid of a key the IdP just added, at once and while the IdP answers
/// slowly: one JWKS request, and every one of them is accepted.
#[tokio::test]
async fn a_new_kid_arriving_many_times_at_once_costs_one_jwks_request() {
    let f = fixture().await;
    let before = f.idp.jwks_fetches();
    f.idp.rotate(true);
    f.idp.set_delay(Duration::from_millis(300));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let token = f.idp.sign(
            SigningAlg::ES256,
            &claims(&f.idp, json!({"sub": format!("user-{i}")})),
        );
        let auth = f.auth.clone();
        tasks.push(tokio::spawn(async move {
            auth.authenticate(&bearer(&token)).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let id = t.await.unwrap().unwrap();
        assert_eq!(id.user(), format!("oidc:user-{i}"));
    }
    assert_eq!(f.idp.jwks_fetches(), before + 1, "one fetch for all");
}

/// Unknown kids that arrive while a key fetch is under way and then fails are refused with it:
/// a struggling IdP is not asked again for each of them.
#[tokio::test]
async fn unknown_kids_arriving_during_a_failing_fetch_are_refused_with_it() {
    let f = fixture().await;
    let before = f.idp.jwks_fetches();
    f.idp.set_jwks_override(Some("<html>oops</html>".into()));
    f.idp.set_delay(Duration::from_millis(300));
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let token = made_up_kid(&f.idp, &format!("made-up-{i}"));
            let auth = f.auth.clone();
            tokio::spawn(async move { auth.authenticate(&bearer(&token)).await })
        })
        .collect();
    for t in tasks {
        let e = t.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("not found"), "{e}");
    }
    assert_eq!(f.idp.jwks_fetches(), before + 1, "one fetch for all");
    assert!(f.auth.fetch_errors()[0].1.contains("not JSON"));
}

/// A clock for the key sources' refetch rules that moves only when the test moves it.
pub(crate) struct ManualClock {
    start: std::time::Instant,
    elapsed: tokio::sync::watch::Sender<Duration>,
    sleepers: tokio::sync::watch::Sender<usize>,
}

impl ManualClock {
    pub(crate) fn new() -> Arc<ManualClock> {
        Arc::new(ManualClock {
            start: std::time::Instant::now(),
            elapsed: tokio::sync::watch::Sender::new(Duration::ZERO),
            sleepers: tokio::sync::watch::Sender::new(0),
        })
    }

    pub(crate) fn now(&self) -> std::time::Instant {
        self.start + *self.elapsed.borrow()
    }

    pub(crate) fn advance(&self, by: Duration) {
        self.elapsed.send_modify(|e| *e += by);
    }

    pub(crate) async fn sleep_until(&self, t: std::time::Instant) {
        struct Awake<'a>(&'a tokio::sync::watch::Sender<usize>);
        impl Drop for Awake<'_> {
            fn drop(&mut self) {
                self.0.send_modify(|n| *n -= 1);
            }
        }
        self.sleepers.send_modify(|n| *n += 1);
        let _awake = Awake(&self.sleepers);
        let mut elapsed = self.elapsed.subscribe();
        let _ = elapsed.wait_for(|e| self.start + *e >= t).await;
    }

    /// Returns once exactly `n` tasks sleep on this clock.
    pub(crate) async fn sleepers(&self, n: usize) {
        let mut sleepers = self.sleepers.subscribe();
        let _ = sleepers.wait_for(|s| *s == n).await;
    }

    pub(crate) fn sleeping(&self) -> usize {
        *self.sleepers.borrow()
    }
}

/// The fixture's issuer, with the gateway's own refetch timings on a clock the test moves.
async fn fixture_on(clock: &Arc<ManualClock>) -> Fixture {
    let ca = Ca::new("test idp ca");
    let idp = DevIssuer::start(&ca).await.expect("dev issuer");
    let cfg = config(&idp);
    let opts = OidcOptions {
        kid_miss_floor: OidcOptions::default().kid_miss_floor,
        unknown_kid_memory: OidcOptions::default().unknown_kid_memory,
        ..test_options()
    };
    let auth = OidcAuthenticator::with_clock(
        std::slice::from_ref(&cfg),
        CancellationToken::new(),
        opts,
        source::Clock::Manual(clock.clone()),
    )
    .await
    .expect("authenticator");
    assert!(auth.not_loaded().is_empty(), "{:?}", auth.fetch_errors());
    Fixture { idp, auth, cfg, ca }
}

fn made_up_kid(idp: &DevIssuer, kid: &str) -> String {
    idp.sign_with_header(
        SigningAlg::RS256,
        &json!({"alg": "RS256", "kid": kid}),
        &claims(idp, json!({})),
    )
}

/// A made-up kid just before the IdP rotates: the first token with a new kid is not refused, it
/// waits for the next fetch, which starts at most the floor after the made-up kid's.
#[tokio::test]
async fn a_made_up_kid_just_before_a_rotation_holds_the_new_kid_back_no_longer_than_the_floor() {
    let clock = ManualClock::new();
    let f = fixture_on(&clock).await;
    let floor = f.auth.opts.kid_miss_floor;
    let before = f.idp.jwks_fetches();
    let e = auth_err(&f.auth, &made_up_kid(&f.idp, "made-up")).await;
    assert!(e.to_string().contains("not found"), "{e}");
    assert_eq!(f.idp.jwks_fetches(), before + 1);

    f.idp.rotate(false);
    let new_kid = f.idp.sign(SigningAlg::RS256, &claims(&f.idp, json!({})));
    let auth = f.auth.clone();
    let waiting = tokio::spawn(async move { auth.authenticate(&bearer(&new_kid)).await });
    clock.sleepers(1).await;
    assert_eq!(
        f.idp.jwks_fetches(),
        before + 1,
        "no fetch within the floor"
    );
    clock.advance(floor - Duration::from_millis(1));
    tokio::task::yield_now().await;
    assert_eq!(clock.sleeping(), 1, "still waiting for the floor");
    clock.advance(Duration::from_millis(1));
    let id = waiting.await.unwrap().expect("the new kid is accepted");
    assert_eq!(id.user(), "oidc:alice");
    assert_eq!(f.idp.jwks_fetches(), before + 2);
}

/// Made-up kids, many times the same one and many different ones at once, cost the IdP one JWKS
/// request per floor at most: a kid a fetch did not find is refused at once afterwards, and
/// tokens waiting for the next fetch share it.
#[tokio::test]
async fn a_flood_of_made_up_kids_costs_one_jwks_request_per_floor() {
    let clock = ManualClock::new();
    let f = fixture_on(&clock).await;
    let floor = f.auth.opts.kid_miss_floor;
    let before = f.idp.jwks_fetches();
    let same = made_up_kid(&f.idp, "made-up");
    for _ in 0..50 {
        let e = auth_err(&f.auth, &same).await;
        assert!(e.to_string().contains("not found"), "{e}");
    }
    assert_eq!(f.idp.jwks_fetches(), before + 1, "one fetch for one kid");
    assert_eq!(clock.sleeping(), 0, "refused without waiting");

    // 50 different kids, while the IdP answers slowly: they wait for the floor, then share one
    // fetch.
    f.idp.set_delay(Duration::from_millis(100));
    let tokens: Vec<String> = (0..50)
        .map(|i| made_up_kid(&f.idp, &format!("made-up-{i}")))
        .collect();
    let mut tasks = Vec::new();
    for token in &tokens {
        let auth = f.auth.clone();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            auth.authenticate(&bearer(&token)).await
        }));
    }
    clock.sleepers(50).await;
    assert_eq!(f.idp.jwks_fetches(), before + 1);
    clock.advance(floor);
    for t in tasks {
        let e = t.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("not found"), "{e}");
    }
    assert_eq!(f.idp.jwks_fetches(), before + 2, "one fetch for all");
    f.idp.set_delay(Duration::ZERO);

    // All of them again, the floor long over: each is remembered, none is looked for again.
    clock.advance(floor);
    for token in std::iter::once(&same).chain(&tokens) {
        auth_err(&f.auth, token).await;
    }
    assert_eq!(f.idp.jwks_fetches(), before + 2);
    assert_eq!(clock.sleeping(), 0);

    // Past the memory, a made-up kid is looked for again (once).
    clock.advance(f.auth.opts.unknown_kid_memory);
    auth_err(&f.auth, &same).await;
    auth_err(&f.auth, &same).await;
    assert_eq!(f.idp.jwks_fetches(), before + 3);
}

/// A kid that a fetch did not find is looked for again once the key set changes (the IdP is
/// rotating, it may publish that kid next), not only when its memory runs out.
#[tokio::test]
async fn a_kid_not_found_is_looked_for_again_once_the_key_set_changes() {
    let clock = ManualClock::new();
    let f = fixture_on(&clock).await;
    let floor = f.auth.opts.kid_miss_floor;
    let signer = RawSigner::new("published-later");
    let header = format!(r#"{{"alg":"ES256","kid":"{}"}}"#, signer.kid);
    let early = signer.sign(&header, &claims(&f.idp, json!({})).to_string());
    let before = f.idp.jwks_fetches();
    let e = auth_err(&f.auth, &early).await;
    assert!(e.to_string().contains("not found"), "{e}");
    auth_err(&f.auth, &early).await;
    assert_eq!(f.idp.jwks_fetches(), before + 1, "remembered as not found");

    // The IdP rotates: a token with one of its new kids brings the new key set.
    f.idp.rotate(true);
    clock.advance(floor);
    let rotated = f.idp.sign(SigningAlg::RS256, &claims(&f.idp, json!({})));
    f.auth.authenticate(&bearer(&rotated)).await.unwrap();
    assert_eq!(f.idp.jwks_fetches(), before + 2);

    // Then it publishes the kid it was not found under: looked for again, and found.
    f.idp.set_jwks_override(Some(signer.jwks()));
    clock.advance(floor);
    let id = f.auth.authenticate(&bearer(&early)).await.unwrap();
    assert_eq!(id.user(), "oidc:alice");
    assert_eq!(f.idp.jwks_fetches(), before + 3);
}

#[tokio::test]
async fn idp_down_keeps_known_keys() {
    let f = fixture().await;
    let known = f.idp.sign(SigningAlg::RS256, &claims(&f.idp, json!({})));
    f.idp.stop().await;
    // Known key: still verifies (and is not served from the cache: a different token).
    let known2 = f
        .idp
        .sign(SigningAlg::ES256, &claims(&f.idp, json!({"sub": "bob"})));
    f.auth.authenticate(&bearer(&known)).await.unwrap();
    f.auth.authenticate(&bearer(&known2)).await.unwrap();
    // Unknown kid: the refresh fails, the old keys stay, the token fails.
    f.idp.rotate(false);
    let fresh = f.idp.sign(SigningAlg::RS256, &claims(&f.idp, json!({})));
    let e = auth_err(&f.auth, &fresh).await;
    assert!(e.to_string().contains("not found"), "{e}");
    assert!(!f.auth.fetch_errors().is_empty());
    assert!(f.auth.not_loaded().is_empty());
    let still = f.idp.sign_with_header(
        SigningAlg::RS256,
        &json!({"alg": "RS256"}),
        &claims(&f.idp, json!({})),
    );
    // No kid: tried against the (old) RS256 key, which does not match the rotated signer.
    let e = auth_err(&f.auth, &still).await;
    assert_eq!(e.reason_label(), "bad_signature", "{e}");
    // The IdP comes back: the next miss loads the new keys.
    f.idp.restart().await.unwrap();
    f.auth.authenticate(&bearer(&fresh)).await.unwrap();
}

#[tokio::test]
async fn garbage_jwks_keeps_last_good_keys() {
    let f = fixture().await;
    f.idp.set_jwks_override(Some("<html>oops</html>".into()));
    let unknown = f.idp.sign_with_header(
        SigningAlg::RS256,
        &json!({"alg": "RS256", "kid": "unknown"}),
        &claims(&f.idp, json!({})),
    );
    auth_err(&f.auth, &unknown).await;
    assert!(
        f.auth.fetch_errors()[0].1.contains("not JSON"),
        "{:?}",
        f.auth.fetch_errors()
    );
    let token = f.idp.sign(SigningAlg::RS256, &claims(&f.idp, json!({})));
    f.auth.authenticate(&bearer(&token)).await.unwrap();
}

#[tokio::test]
async fn idp_down_at_start_is_reported_not_fatal() {
    let ca = Ca::new("test idp ca");
    let idp = DevIssuer::start(&ca).await.unwrap();
    let cfg = config(&idp);
    idp.stop().await;
    let auth = OidcAuthenticator::with_options(
        std::slice::from_ref(&cfg),
        CancellationToken::new(),
        test_options(),
    )
    .await
    .unwrap();
    assert_eq!(auth.not_loaded(), vec![idp.issuer_url()]);
    let token = idp.sign(SigningAlg::RS256, &claims(&idp, json!({})));
    let e = auth_err(&auth, &token).await;
    assert_eq!(e.reason_label(), "issuer_keys_unavailable", "{e}");
    idp.restart().await.unwrap();
    auth.authenticate(&bearer(&token)).await.unwrap();
    assert!(auth.not_loaded().is_empty());
}

#[tokio::test]
async fn discovery_issuer_must_match_exactly() {
    let ca = Ca::new("test idp ca");
    let idp = DevIssuer::start(&ca).await.unwrap();
    let mut cfg = config(&idp);
    cfg.issuer.discovery_url = Some(format!(
        "{}/.well-known/openid-configuration",
        idp.issuer_url()
    ));
    cfg.issuer.url = format!("{}/", idp.issuer_url());
    let auth = OidcAuthenticator::with_options(
        std::slice::from_ref(&cfg),
        CancellationToken::new(),
        test_options(),
    )
    .await
    .unwrap();
    assert_eq!(auth.not_loaded(), vec![cfg.issuer.url.clone()]);
    assert!(
        auth.fetch_errors()[0].1.contains("expected exactly"),
        "{:?}",
        auth.fetch_errors()
    );
}

#[tokio::test]
async fn wrong_ca_fails_to_load() {
    let ca = Ca::new("test idp ca");
    let idp = DevIssuer::start(&ca).await.unwrap();
    let mut cfg = config(&idp);
    cfg.issuer.certificate_authority = Some(Ca::new("someone else").cert_pem());
    let auth = OidcAuthenticator::with_options(
        std::slice::from_ref(&cfg),
        CancellationToken::new(),
        test_options(),
    )
    .await
    .unwrap();
    assert_eq!(auth.not_loaded(), vec![idp.issuer_url()]);
}

#[tokio::test]
async fn cache_hit_does_not_reverify() {
    let f = fixture().await;
    let token = f.idp.sign(SigningAlg::RS256, &claims(&f.idp, json!({})));
    let a = f.auth.authenticate(&bearer(&token)).await.unwrap();
    let b = f.auth.authenticate(&bearer(&token)).await.unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(
        f.auth.stats(),
        OidcStats {
            verifications: 1,
            cache_hits: 1,
            refusals_cached: 0,
        }
    );
    // Failures are not cached.
    let bad = f
        .idp
        .sign(SigningAlg::RS256, &claims(&f.idp, json!({"aud": "x"})));
    auth_err(&f.auth, &bad).await;
    auth_err(&f.auth, &bad).await;
    assert_eq!(f.auth.stats().verifications, 3);
}

#[tokio::test]
async fn a_bad_signature_is_refused_again_without_verifying_until_the_keys_change() {
    let f = fixture().await;
    let good = f.idp.sign(SigningAlg::RS256, &claims(&f.idp, json!({})));
    // The same header and claims, one signature character changed.
    let mut bad = good.clone().into_bytes();
    let i = bad.len() - 2;
    bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
    let bad = String::from_utf8(bad).unwrap();
    for _ in 0..3 {
        let e = auth_err(&f.auth, &bad).await;
        assert_eq!(e.reason_label(), "bad_signature", "{e}");
    }
    assert_eq!(
        f.auth.stats().verifications,
        1,
        "verified once, refused twice from memory"
    );
    assert_eq!(f.auth.stats().refusals_cached, 2);
    // The valid token is unaffected.
    f.auth.authenticate(&bearer(&good)).await.unwrap();
    assert_eq!(f.auth.stats().verifications, 2);

    // Keys change (a rotation that keeps the old keys published, picked up on a kid miss):
    // the remembered failure no longer counts, the signature is checked again.
    f.idp.rotate(true);
    let rotated = f.idp.sign(SigningAlg::ES256, &claims(&f.idp, json!({})));
    f.auth.authenticate(&bearer(&rotated)).await.unwrap();
    let before = f.auth.stats();
    let e = auth_err(&f.auth, &bad).await;
    assert_eq!(e.reason_label(), "bad_signature", "{e}");
    assert_eq!(f.auth.stats().verifications, before.verifications + 1);
    assert_eq!(f.auth.stats().refusals_cached, before.refusals_cached);
}

/// A token valid for 2 more seconds, used twice (the second from the cache, or from `memo`),
/// then once more after its `exp`: refused as expired, not answered from memory.
async fn never_outlives_exp(memo: Option<&TokenMemo>) {
    let f = fixture_with(
        |c| c.clock_leeway = GoDuration(Duration::ZERO),
        test_options(),
    )
    .await;
    let n = now();
    let token = f.idp.sign(
        SigningAlg::ES256,
        &claims(&f.idp, json!({"exp": n + 2, "iat": n, "nbf": n})),
    );
    let use_it = || async {
        match memo {
            Some(m) => f.auth.authenticate_on(&bearer(&token), m).await,
            None => f.auth.authenticate(&bearer(&token)).await,
        }
    };
    use_it().await.unwrap();
    use_it().await.unwrap();
    assert_eq!(f.auth.stats().cache_hits, 1);
    let until = UNIX_EPOCH + Duration::from_secs(n + 3) + Duration::from_millis(100);
    tokio::time::sleep(until.duration_since(SystemTime::now()).unwrap_or_default()).await;
    let e = use_it().await.unwrap_err();
    assert_eq!(e.reason_label(), "token_expired", "{e}");
    assert_eq!(f.auth.stats().cache_hits, 1);
}

#[tokio::test]
async fn cache_never_outlives_exp() {
    never_outlives_exp(None).await;
}

/// A connection's last token is answered from the connection's memo (no hash, no shared
/// cache), but only while a shared-cache hit would be: not past the cache TTL, not past `exp`,
/// not after a config change or a change of the issuer's keys; and only for that very token.
#[tokio::test]
async fn a_connections_memo_answers_only_what_the_cache_would() {
    let f = fixture_with(
        |c| c.clock_leeway = GoDuration(Duration::ZERO),
        OidcOptions {
            cache_ttl: Duration::from_secs(2),
            ..test_options()
        },
    )
    .await;
    let n = now();
    let token = f.idp.sign(
        SigningAlg::ES256,
        &claims(&f.idp, json!({"exp": n + 60, "iat": n, "nbf": n})),
    );
    let memo = TokenMemo::default();
    let a = f
        .auth
        .authenticate_on(&bearer(&token), &memo)
        .await
        .unwrap();
    assert_eq!(f.auth.stats().verifications, 1);
    // The shared cache forgets it: the connection's memo still answers, without verifying.
    f.auth.cache.invalidate_all();
    let b = f
        .auth
        .authenticate_on(&bearer(&token), &memo)
        .await
        .unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(f.auth.stats().verifications, 1);
    assert_eq!(f.auth.stats().cache_hits, 1);
    // Another token on the same connection is verified for itself (and takes the memo's place).
    let bob = f.idp.sign(
        SigningAlg::ES256,
        &claims(&f.idp, json!({"sub": "bob", "email": "bob@example.com"})),
    );
    let other = f.auth.authenticate_on(&bearer(&bob), &memo).await.unwrap();
    assert_ne!(other.user(), a.user());
    assert_eq!(f.auth.stats().verifications, 2);
    // A token differing from the remembered one in one signature character is not taken for it.
    let mut forged = bob.clone().into_bytes();
    let i = forged.len() - 2;
    forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let e = f
        .auth
        .authenticate_on(&bearer(&forged), &memo)
        .await
        .unwrap_err();
    assert_eq!(e.reason_label(), "bad_signature", "{e}");
    // Past the cache TTL, the memo no longer counts: verified again.
    f.auth
        .authenticate_on(&bearer(&token), &memo)
        .await
        .unwrap();
    let before = f.auth.stats().verifications;
    f.auth.cache.invalidate_all();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    f.auth
        .authenticate_on(&bearer(&token), &memo)
        .await
        .unwrap();
    assert_eq!(f.auth.stats().verifications, before + 1);
    // A config change: the memo's verdict is from the old config, the new mapping applies.
    let mut cfg = f.cfg.clone();
    cfg.claim_mappings.username.as_mut().unwrap().prefix = Some("corp:".into());
    f.auth.update(std::slice::from_ref(&cfg)).await.unwrap();
    assert_eq!(a.user(), "oidc:alice");
    let id = f
        .auth
        .authenticate_on(&bearer(&token), &memo)
        .await
        .unwrap();
    assert_eq!(id.user(), "corp:alice");
    // The issuer's keys change (a rotation picked up on a kid miss): verified again.
    f.idp.rotate(true);
    let rotated = f.idp.sign(SigningAlg::ES256, &claims(&f.idp, json!({})));
    f.auth.authenticate(&bearer(&rotated)).await.unwrap();
    let before = f.auth.stats().verifications;
    f.auth
        .authenticate_on(&bearer(&token), &memo)
        .await
        .unwrap();
    assert_eq!(f.auth.stats().verifications, before + 1);
}

/// The memo never answers for an expired token, though its cache TTL is not over.
#[tokio::test]
async fn a_connections_memo_never_outlives_exp() {
    never_outlives_exp(Some(&TokenMemo::default())).await;
}

#[tokio::test]
async fn update_keeps_keys_of_unchanged_issuers() {
    let f = fixture().await;
    let token = f.idp.sign(SigningAlg::RS256, &claims(&f.idp, json!({})));
    f.auth.authenticate(&bearer(&token)).await.unwrap();
    let fetches = f.idp.jwks_fetches();
    // A mapping change keeps the keys (no fetch) but applies the new rule and drops the cache.
    let mut cfg = f.cfg.clone();
    cfg.claim_mappings.username.as_mut().unwrap().prefix = Some("corp:".into());
    f.auth.update(std::slice::from_ref(&cfg)).await.unwrap();
    assert_eq!(f.idp.jwks_fetches(), fetches);
    let id = f.auth.authenticate(&bearer(&token)).await.unwrap();
    assert_eq!(id.user(), "corp:alice");
    // A CA change makes a new key source (one fetch).
    let mut cfg2 = cfg.clone();
    cfg2.issuer.certificate_authority = Some(format!("{}\n", f.idp.ca_pem()));
    f.auth.update(std::slice::from_ref(&cfg2)).await.unwrap();
    assert_eq!(f.idp.jwks_fetches(), fetches + 1);
    // Removing the issuer makes its tokens unknown.
    f.auth.update(&[]).await.unwrap();
    let e = auth_err(&f.auth, &token).await;
    assert_eq!(e, AuthnError::TokenAuthNotConfigured);
    // A bad config changes nothing.
    let mut bad = cfg.clone();
    bad.claim_mappings.username = None;
    assert!(f.auth.update(&[bad]).await.is_err());
}

#[tokio::test]
async fn max_token_lifetime_and_per_issuer_size() {
    let f = fixture_with(
        |c| {
            c.max_token_lifetime = Some(GoDuration(Duration::from_secs(3600)));
            c.max_token_bytes = 1024;
        },
        test_options(),
    )
    .await;
    let n = now();
    let long = f
        .idp
        .sign(SigningAlg::RS256, &claims(&f.idp, json!({"exp": n + 7200})));
    let e = auth_err(&f.auth, &long).await;
    assert!(e.to_string().contains("exceeds maxTokenLifetime"), "{e}");
    let big = f.idp.sign(
        SigningAlg::RS256,
        &claims(&f.idp, json!({"pad": "x".repeat(1200)})),
    );
    let e = auth_err(&f.auth, &big).await;
    assert!(e.to_string().contains("exceeds the limit of 1024"), "{e}");
}

#[tokio::test]
async fn periodic_refresh_runs_until_stopped() {
    let ca = Ca::new("test idp ca");
    let idp = DevIssuer::start(&ca).await.unwrap();
    let stop = CancellationToken::new();
    let mut opts = test_options();
    opts.refresh_interval = Duration::from_millis(200);
    let auth = OidcAuthenticator::with_options(&[config(&idp)], stop.clone(), opts)
        .await
        .unwrap();
    let start = idp.jwks_fetches();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(idp.jwks_fetches() >= start + 2, "{}", idp.jwks_fetches());
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopped = idp.jwks_fetches();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(idp.jwks_fetches(), stopped);
    drop(auth);
}

#[tokio::test]
async fn response_size_and_time_are_bounded() {
    let mut opts = test_options();
    opts.max_response_bytes = 4096;
    opts.fetch_timeout = Duration::from_millis(500);
    let f = fixture_with(|_| {}, opts).await;
    let unknown = |i: u32| {
        f.idp.sign_with_header(
            SigningAlg::RS256,
            &json!({"alg": "RS256", "kid": format!("unknown-{i}")}),
            &claims(&f.idp, json!({})),
        )
    };
    f.idp.set_jwks_override(Some(format!(
        "{{\"keys\":[],\"pad\":\"{}\"}}",
        "x".repeat(8000)
    )));
    auth_err(&f.auth, &unknown(1)).await;
    let errors = f.auth.fetch_errors();
    assert!(errors[0].1.contains("larger than 4096 bytes"), "{errors:?}");
    f.idp.set_jwks_override(None);
    f.idp.set_delay(Duration::from_secs(2));
    auth_err(&f.auth, &unknown(2)).await;
    let errors = f.auth.fetch_errors();
    assert!(errors[0].1.contains("no answer within"), "{errors:?}");
    f.idp.set_delay(Duration::ZERO);
    // The keys loaded at start are still in use.
    let token = f.idp.sign(SigningAlg::RS256, &claims(&f.idp, json!({})));
    f.auth.authenticate(&bearer(&token)).await.unwrap();
}

/// Signs a header and a payload exactly as written, with an ES256 key that its issuer publishes
/// through a JWKS override. DevIssuer signs a `serde_json::Value`, which cannot hold the same
/// member twice; these tokens can.
pub(crate) struct RawSigner {
    key: aws_lc_rs::signature::EcdsaKeyPair,
    pub(crate) kid: String,
}

impl RawSigner {
    pub(crate) fn new(kid: &str) -> RawSigner {
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
    pub(crate) fn jwks(&self) -> String {
        use aws_lc_rs::signature::KeyPair;
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let point = self.key.public_key().as_ref();
        json!({"keys": [{
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.kid,
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        }]})
        .to_string()
    }

    pub(crate) fn sign(&self, header: &str, payload: &str) -> String {
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let signing_input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
        let sig = self
            .key
            .sign(
                &aws_lc_rs::rand::SystemRandom::new(),
                signing_input.as_bytes(),
            )
            .unwrap();
        format!("{signing_input}.{}", b64(sig.as_ref()))
    }
}

/// The same member twice in one JSON object is read as the last one by this gateway's parser and
/// as the first one (or refused) by others: a token that says two things is refused, at any
/// depth, in the header and in the payload, also when the two names differ only in how they are
/// escaped. The same name in different objects is no duplicate.
#[tokio::test]
async fn a_member_given_twice_anywhere_in_the_token_is_refused() {
    let f = fixture_with(
        |c| {
            c.claim_mappings.username = Some(PrefixedClaimOrExpression {
                claim: Some("email".into()),
                prefix: Some("".into()),
                expression: None,
            })
        },
        test_options(),
    )
    .await;
    let signer = RawSigner::new("raw-es256");
    f.idp.set_jwks_override(Some(signer.jwks()));
    let header = format!(r#"{{"alg":"ES256","typ":"JWT","kid":"{}"}}"#, signer.kid);
    let n = now();
    let base = format!(
        r#""iss":"{}","sub":"u-1","aud":"kubernetes","iat":{n},"exp":{}"#,
        f.idp.issuer_url(),
        n + 600
    );
    let payload = |rest: &str| format!("{{{base},{rest}}}");

    let legit = [
        (
            "the same name in sibling objects",
            payload(r#""email":"alice@example.com","a":{"x":1},"b":{"x":2}"#),
        ),
        (
            "the same name in objects of one array",
            payload(r#""email":"alice@example.com","list":[{"x":1},{"x":2}]"#),
        ),
        (
            "an object member named like its parent",
            payload(r#""email":"alice@example.com","x":{"x":{"x":1}}"#),
        ),
    ];
    for (what, p) in &legit {
        let id = f
            .auth
            .authenticate(&bearer(&signer.sign(&header, p)))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(id.user(), "alice@example.com", "{what}");
    }

    let kid = &signer.kid;
    let hostile = [
        (
            "groups twice",
            header.clone(),
            payload(r#""email":"alice@example.com","groups":["devs"],"groups":["admins"]"#),
            r#"duplicate claim "groups" in the payload"#,
        ),
        (
            "the username claim twice",
            header.clone(),
            payload(r#""email":"alice@example.com","email":"root@example.com""#),
            r#"duplicate claim "email" in the payload"#,
        ),
        (
            "a nested member twice",
            header.clone(),
            payload(r#""email":"alice@example.com","cnf":{"x5t#S256":"a","x5t#S256":"b"}"#),
            r#"duplicate claim "x5t#S256" in the payload (in "cnf")"#,
        ),
        (
            "a member twice in an object inside an array",
            header.clone(),
            payload(r#""email":"alice@example.com","l":[1,{"k":{"a":1,"b":2,"a":3}}]"#),
            r#"duplicate claim "a" in the payload (in "l.k")"#,
        ),
        (
            "the username claim twice, once escaped",
            header.clone(),
            payload(r#""email":"alice@example.com","em\u0061il":"root@example.com""#),
            r#"duplicate claim "email" in the payload"#,
        ),
        (
            "kid twice in the header",
            format!(r#"{{"alg":"ES256","kid":"{kid}","kid":"{kid}"}}"#),
            payload(r#""email":"alice@example.com""#),
            r#"duplicate claim "kid" in the header"#,
        ),
        (
            "typ twice in the header, once escaped",
            format!(r#"{{"alg":"ES256","kid":"{kid}","typ":"JWT","\u0074yp":"JWT"}}"#),
            payload(r#""email":"alice@example.com""#),
            r#"duplicate claim "typ" in the header"#,
        ),
    ];
    for (what, h, p, want) in &hostile {
        let token = signer.sign(h, p);
        let e = auth_err(&f.auth, &token).await;
        assert_eq!(e.reason_label(), "invalid_token", "{what}: {e}");
        let msg = e.to_string();
        assert!(msg.contains(want), "{what}: {msg:?} lacks {want:?}");
        assert!(!msg.contains(&token[..40]), "{what}: token in message");
    }
}

/// Two issuer entries that publish the same keys (one IdP under two issuer URLs): when the IdP
/// removes a key, a token still signed with it is refused because the key left its issuer's key
/// set — not as a token "signed by a key of another issuer" because the other entry has not
/// refreshed yet.
#[tokio::test]
async fn a_key_removed_by_the_idp_is_reported_as_gone_from_the_issuers_keys() {
    let ca = Ca::new("test idp ca");
    let idp = DevIssuer::start(&ca).await.unwrap();
    let twin = DevIssuer::start(&ca).await.unwrap();
    let fetcher =
        discovery::Fetcher::new(idp.ca_pem().as_bytes(), Duration::from_secs(2), 1024 * 1024)
            .unwrap();
    let discovery_url = format!("{}/.well-known/openid-configuration", idp.issuer_url());
    let (_, jwks) = fetcher
        .fetch_jwks(&idp.issuer_url(), &discovery_url)
        .await
        .unwrap();
    twin.set_jwks_override(Some(String::from_utf8(jwks.to_vec()).unwrap()));
    let auth = OidcAuthenticator::with_options(
        &[config(&idp), config(&twin)],
        CancellationToken::new(),
        test_options(),
    )
    .await
    .unwrap();
    assert!(auth.not_loaded().is_empty(), "{:?}", auth.fetch_errors());
    let old_kid = idp.kid(SigningAlg::RS256);
    let signed_before = idp.sign(SigningAlg::RS256, &claims(&idp, json!({"sub": "bob"})));

    // The IdP rotates and stops publishing the old keys; a token with a new kid makes the
    // gateway see it.
    idp.rotate(false);
    let rotated = idp.sign(SigningAlg::RS256, &claims(&idp, json!({})));
    auth.authenticate(&bearer(&rotated)).await.unwrap();

    let e = auth_err(&auth, &signed_before).await;
    let msg = e.to_string();
    assert_eq!(e.reason_label(), "invalid_token", "{msg}");
    assert!(
        msg.contains(&format!(
            "key \"{old_kid}\" left the key set of issuer {}",
            idp.issuer_url()
        )),
        "{msg}"
    );
    assert!(!msg.contains("another issuer"), "{msg}");
}
