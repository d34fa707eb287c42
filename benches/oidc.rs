//! OIDC token authentication.
//!
//! - `oidc/cached/*`: a token already verified (the common case: kubectl reuses its token).
//! - `oidc/uncached/*`: full verification (parse, header rules, key lookup, signature, claims,
//!   mapping), with the token cache disabled.
//!
//! Keys come from the development issuer (`ztgate_testkit::oidc::DevIssuer`), fetched once at
//! set-up; no network I/O happens inside the measured loop.
//!
//! Run: `cargo bench --bench oidc`

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use ztgate::authn::credentials::{bearer_from_headers, BearerToken};
use ztgate::authn::oidc::{OidcAuthenticator, OidcOptions};
use ztgate::config::jwt::{ClaimMappings, JwtAuthenticator, JwtIssuer, PrefixedClaimOrExpression};
use ztgate::config::GoDuration;
use ztgate_testkit::oidc::{DevIssuer, SigningAlg};
use ztgate_testkit::pki::Ca;

fn config(idp: &DevIssuer) -> JwtAuthenticator {
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
            uid: None,
            extra: Vec::new(),
        },
        user_validation_rules: Vec::new(),
        signing_algorithms: vec!["RS256".into(), "ES256".into()],
        clock_leeway: GoDuration(Duration::from_secs(30)),
        max_token_lifetime: None,
        max_token_bytes: 16384,
        claims_for_policy: vec!["amr".into()],
    }
}

fn bearer(token: &str) -> BearerToken {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    bearer_from_headers(&h).unwrap().unwrap()
}

fn token(idp: &DevIssuer, alg: SigningAlg) -> BearerToken {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    bearer(&idp.sign(
        alg,
        &json!({
            "iss": idp.issuer_url(), "sub": "alice@example.com", "aud": "kubernetes",
            "iat": now, "nbf": now, "exp": now + 3600, "jti": "bench",
            "groups": ["devs", "ops", "oncall"], "amr": ["pwd", "mfa"],
        }),
    ))
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ca = Ca::new("bench idp ca");
    let idp = rt.block_on(DevIssuer::start(&ca)).unwrap();
    let cfg = [config(&idp)];
    let make = |cache_ttl: Duration| -> Arc<OidcAuthenticator> {
        let opts = OidcOptions {
            cache_ttl,
            ..OidcOptions::default()
        };
        let auth = rt
            .block_on(OidcAuthenticator::with_options(
                &cfg,
                CancellationToken::new(),
                opts,
            ))
            .unwrap();
        assert!(auth.not_loaded().is_empty(), "{:?}", auth.fetch_errors());
        auth
    };
    let cached = make(Duration::from_secs(300));
    // A zero TTL means nothing is ever cached: every call verifies in full.
    let uncached = make(Duration::ZERO);

    let mut g = c.benchmark_group("oidc");
    for alg in [SigningAlg::RS256, SigningAlg::ES256] {
        let t = token(&idp, alg);
        rt.block_on(cached.authenticate(&t)).unwrap();
        g.bench_function(format!("cached/{}", alg.as_str()), |b| {
            b.to_async(&rt)
                .iter(|| async { cached.authenticate(&t).await.unwrap() })
        });
        g.bench_function(format!("uncached/{}", alg.as_str()), |b| {
            b.to_async(&rt)
                .iter(|| async { uncached.authenticate(&t).await.unwrap() })
        });
    }
    g.finish();
    let stats = uncached.stats();
    assert_eq!(stats.cache_hits, 0);
}

criterion_group!(oidc, benches);
criterion_main!(oidc);
