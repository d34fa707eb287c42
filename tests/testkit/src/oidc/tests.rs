use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::{DevIssuer, DevUser, Minting, SigningAlg};
use crate::pki::Ca;

fn client_config(ca_pem: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("ca pem")).expect("add root");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS connection to the issuer that verifies its certificate against `ca_pem` for 127.0.0.1.
async fn connect(issuer: &DevIssuer, alpn: &[&[u8]]) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(issuer.addr()).await?;
    let name = ServerName::IpAddress(issuer.addr().ip().into());
    TlsConnector::from(client_config(&issuer.ca_pem(), alpn))
        .connect(name, tcp)
        .await
}

fn request(issuer: &DevIssuer, path_and_query: &str) -> Request<Empty<Bytes>> {
    Request::get(path_and_query)
        .header(hyper::header::HOST, issuer.addr().to_string())
        .body(Empty::new())
        .unwrap()
}

/// GET over a fresh HTTP/1.1 connection.
async fn get(issuer: &DevIssuer, path_and_query: &str) -> std::io::Result<(StatusCode, Bytes)> {
    let tls = connect(issuer, &[b"http/1.1"]).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(request(issuer, path_and_query))
        .await
        .map_err(std::io::Error::other)?;
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Ok((status, body))
}

async fn get_json(issuer: &DevIssuer, path_and_query: &str) -> Value {
    let (status, body) = get(issuer, path_and_query).await.expect("GET");
    assert_eq!(status, StatusCode::OK, "{path_and_query}: {body:?}");
    serde_json::from_slice(&body).expect("json body")
}

/// The path part of a URL served by `issuer`.
fn path_of(issuer: &DevIssuer, url: &str) -> String {
    url.strip_prefix(&format!("https://{}", issuer.addr()))
        .unwrap_or_else(|| panic!("{url} is not served by {}", issuer.addr()))
        .to_string()
}

async fn fetch_jwks(issuer: &DevIssuer) -> JwkSet {
    let path = path_of(issuer, &format!("{}/keys", issuer.issuer_url()));
    serde_json::from_value(get_json(issuer, &path).await).expect("JWKS parses as a JwkSet")
}

fn algorithm(alg: SigningAlg) -> Algorithm {
    match alg {
        SigningAlg::RS256 => Algorithm::RS256,
        SigningAlg::ES256 => Algorithm::ES256,
        SigningAlg::EdDSA => Algorithm::EdDSA,
    }
}

/// Verifies `token` the way a relying party does: kid → JWK from the served set → signature,
/// iss, aud, exp.
fn verify(jwks: &JwkSet, issuer: &DevIssuer, alg: SigningAlg, aud: &str, token: &str) -> Value {
    let header = decode_header(token).expect("header");
    assert_eq!(header.alg, algorithm(alg));
    let kid = header.kid.expect("kid in header");
    let jwk: &Jwk = jwks.find(&kid).expect("kid listed in JWKS");
    let key = DecodingKey::from_jwk(jwk).expect("decoding key from JWK");
    let mut validation = Validation::new(algorithm(alg));
    validation.set_audience(&[aud]);
    validation.set_issuer(&[issuer.issuer_url()]);
    validation.validate_nbf = true;
    decode::<Value>(token, &key, &validation)
        .expect("token verifies")
        .claims
}

fn claims_for(issuer: &DevIssuer, sub: &str) -> Value {
    let now = jsonwebtoken::get_current_timestamp();
    json!({"iss": issuer.issuer_url(), "sub": sub, "aud": "ztgate", "iat": now, "exp": now + 300})
}

fn segment_json(token: &str, index: usize) -> Value {
    let part = token.split('.').nth(index).expect("segment");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("json")
}

#[tokio::test]
async fn oidc_discovery_and_jwks_over_tls() {
    let ca = Ca::new("oidc-test-ca");
    let issuer = DevIssuer::start(&ca).await.unwrap();
    let url = issuer.issuer_url();
    assert_eq!(url, format!("https://127.0.0.1:{}", issuer.addr().port()));
    assert_eq!(issuer.ca_pem(), ca.cert_pem());

    let doc = get_json(&issuer, "/.well-known/openid-configuration").await;
    assert_eq!(doc["issuer"], url);
    assert_eq!(doc["jwks_uri"], format!("{url}/keys"));
    assert_eq!(doc["authorization_endpoint"], format!("{url}/authorize"));
    assert_eq!(doc["token_endpoint"], format!("{url}/token"));
    assert_eq!(doc["response_types_supported"], json!(["code"]));
    assert_eq!(doc["subject_types_supported"], json!(["public"]));
    assert_eq!(
        doc["id_token_signing_alg_values_supported"],
        json!(["RS256", "ES256", "EdDSA"])
    );
    assert_eq!(issuer.discovery_fetches(), 1);
    assert_eq!(issuer.jwks_fetches(), 0);

    let jwks_path = path_of(&issuer, doc["jwks_uri"].as_str().unwrap());
    let jwks = get_json(&issuer, &jwks_path).await;
    assert_eq!(issuer.jwks_fetches(), 1);
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 3, "{jwks}");
    let kids: std::collections::HashSet<&str> =
        keys.iter().map(|k| k["kid"].as_str().unwrap()).collect();
    assert_eq!(kids.len(), 3, "distinct kids");
    let b64url = |v: &Value| -> Vec<u8> {
        let s = v.as_str().expect("string member");
        assert!(!s.contains('='), "no padding: {s}");
        URL_SAFE_NO_PAD.decode(s).expect("base64url")
    };
    for alg in SigningAlg::ALL {
        let kid = issuer.kid(alg);
        let k = keys
            .iter()
            .find(|k| k["kid"] == kid.as_str())
            .unwrap_or_else(|| panic!("kid {kid} for {alg:?} in {jwks}"));
        assert_eq!(k["use"], "sig");
        assert_eq!(k["alg"], alg.as_str());
        match alg {
            SigningAlg::RS256 => {
                assert_eq!(k["kty"], "RSA");
                assert_eq!(b64url(&k["n"]).len(), 256);
                assert_eq!(b64url(&k["e"]), vec![1, 0, 1]);
            }
            SigningAlg::ES256 => {
                assert_eq!(k["kty"], "EC");
                assert_eq!(k["crv"], "P-256");
                assert_eq!(b64url(&k["x"]).len(), 32);
                assert_eq!(b64url(&k["y"]).len(), 32);
            }
            SigningAlg::EdDSA => {
                assert_eq!(k["kty"], "OKP");
                assert_eq!(k["crv"], "Ed25519");
                assert_eq!(b64url(&k["x"]).len(), 32);
            }
        }
    }

    // Anything else is a 404 (and counts nothing); the well-known routes want GET.
    for path in [
        "/",
        "/authorize",
        "/keys/",
        "/.well-known/openid-configuration/x",
    ] {
        let (status, _) = get(&issuer, path).await.unwrap();
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    assert_eq!(issuer.discovery_fetches(), 1);
    assert_eq!(issuer.jwks_fetches(), 1);

    // HTTP/2 is offered too.
    let tls = connect(&issuer, &[b"h2"]).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("{url}/keys"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()[hyper::header::CONTENT_TYPE],
        "application/json"
    );
    assert_eq!(issuer.jwks_fetches(), 2);
}

#[tokio::test]
async fn oidc_each_alg_verifies_against_served_jwks() {
    let ca = Ca::new("oidc-test-ca");
    let issuer = DevIssuer::start(&ca).await.unwrap();
    let jwks = fetch_jwks(&issuer).await;

    for alg in SigningAlg::ALL {
        let claims = claims_for(&issuer, "alice");
        let token = issuer.sign(alg, &claims);
        // Header exactly {alg, typ, kid}; claims verbatim.
        assert_eq!(
            segment_json(&token, 0),
            json!({"alg": alg.as_str(), "typ": "JWT", "kid": issuer.kid(alg)})
        );
        assert_eq!(segment_json(&token, 1), claims);
        let verified = verify(&jwks, &issuer, alg, "ztgate", &token);
        assert_eq!(verified, claims);

        // A token signed with one alg's key does not verify under another alg's key.
        let other = SigningAlg::ALL.into_iter().find(|a| *a != alg).unwrap();
        let key = DecodingKey::from_jwk(jwks.find(&issuer.kid(other)).unwrap()).unwrap();
        let mut v = Validation::new(algorithm(alg));
        v.validate_aud = false;
        assert!(decode::<Value>(&token, &key, &v).is_err());
    }

    // Convenience token: RS256 with iss/sub/aud/iat/nbf/exp, `extra` merged in.
    let token = issuer.token(
        "bob",
        "ztgate",
        Duration::from_secs(600),
        json!({"groups": ["devs"], "email": "bob@example.com"}),
    );
    let claims = verify(&jwks, &issuer, SigningAlg::RS256, "ztgate", &token);
    assert_eq!(claims["sub"], "bob");
    assert_eq!(claims["aud"], "ztgate");
    assert_eq!(claims["groups"], json!(["devs"]));
    assert_eq!(claims["email"], "bob@example.com");
    let (iat, nbf, exp) = (
        claims["iat"].as_u64().unwrap(),
        claims["nbf"].as_u64().unwrap(),
        claims["exp"].as_u64().unwrap(),
    );
    assert_eq!(iat, nbf);
    assert_eq!(exp, iat + 600);
    // `extra` wins over the defaults (tests use it to backdate tokens).
    let expired = issuer.token("bob", "ztgate", Duration::from_secs(600), json!({"exp": 1}));
    assert_eq!(segment_json(&expired, 1)["exp"], 1);

    // Verbatim header: a foreign kid and extra members go out untouched, signed by the RS256 key.
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": "foreign", "jku": "https://evil.example/keys", "crit": ["exp"]});
    let token = issuer.sign_with_header(SigningAlg::RS256, &header, &claims_for(&issuer, "eve"));
    assert_eq!(segment_json(&token, 0), header);
    let rsa = DecodingKey::from_jwk(jwks.find(&issuer.kid(SigningAlg::RS256)).unwrap()).unwrap();
    let (message, signature) = token.rsplit_once('.').unwrap();
    assert!(
        jsonwebtoken::crypto::verify(signature, message.as_bytes(), &rsa, Algorithm::RS256)
            .unwrap()
    );

    // The RSA public key PEM is the SPKI of the served RSA key (tests feed it to HS256 forgeries).
    let pem = issuer.rsa_public_key_pem();
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{pem}");
    assert!(pem.ends_with("-----END PUBLIC KEY-----\n"), "{pem}");
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let spki = STANDARD.decode(b64).unwrap();
    let token = issuer.sign(SigningAlg::RS256, &claims_for(&issuer, "carol"));
    let (message, signature) = token.rsplit_once('.').unwrap();
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
        &spki,
    )
    .verify(
        message.as_bytes(),
        &URL_SAFE_NO_PAD.decode(signature).unwrap(),
    )
    .expect("PEM key verifies an RS256 token");
}

#[tokio::test]
async fn oidc_rotate_changes_kids() {
    let ca = Ca::new("oidc-test-ca");
    let issuer = DevIssuer::start(&ca).await.unwrap();
    let before: Vec<String> = SigningAlg::ALL.map(|a| issuer.kid(a)).to_vec();
    let old_token = issuer.sign(SigningAlg::ES256, &claims_for(&issuer, "alice"));
    let old_pem = issuer.rsa_public_key_pem();

    issuer.rotate(false);
    let after: Vec<String> = SigningAlg::ALL.map(|a| issuer.kid(a)).to_vec();
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(b, a);
    }
    assert_ne!(issuer.rsa_public_key_pem(), old_pem);
    let jwks = fetch_jwks(&issuer).await;
    assert_eq!(jwks.keys.len(), 3);
    assert!(before.iter().all(|kid| jwks.find(kid).is_none()));
    for alg in SigningAlg::ALL {
        let token = issuer.sign(alg, &claims_for(&issuer, "alice"));
        verify(&jwks, &issuer, alg, "ztgate", &token);
    }
    assert!(jwks
        .find(decode_header(&old_token).unwrap().kid.as_deref().unwrap())
        .is_none());

    // Keeping the old keys: both generations are listed, signing uses the new one.
    let old_token = issuer.sign(SigningAlg::EdDSA, &claims_for(&issuer, "alice"));
    issuer.rotate(true);
    let newest: Vec<String> = SigningAlg::ALL.map(|a| issuer.kid(a)).to_vec();
    let jwks = fetch_jwks(&issuer).await;
    assert_eq!(jwks.keys.len(), 6);
    for kid in after.iter().chain(&newest) {
        assert!(jwks.find(kid).is_some(), "{kid} listed");
    }
    verify(&jwks, &issuer, SigningAlg::EdDSA, "ztgate", &old_token);
    assert_ne!(
        decode_header(issuer.sign(SigningAlg::EdDSA, &claims_for(&issuer, "a")))
            .unwrap()
            .kid,
        decode_header(&old_token).unwrap().kid
    );
}

#[tokio::test]
async fn oidc_enc_key_listed_with_use_enc() {
    let ca = Ca::new("oidc-test-ca");
    let issuer = DevIssuer::start(&ca).await.unwrap();
    let token = issuer.sign_with_enc_key(&claims_for(&issuer, "mallory"));
    let kid = decode_header(&token).unwrap().kid.unwrap();
    assert!(SigningAlg::ALL.iter().all(|a| issuer.kid(*a) != kid));

    let raw = get_json(&issuer, "/keys").await;
    let keys = raw["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 4);
    let enc = keys.iter().find(|k| k["kid"] == kid.as_str()).unwrap();
    assert_eq!(enc["use"], "enc");
    assert_eq!(enc["kty"], "RSA");
    // The signature itself is valid for that key: only `use` says it must be refused.
    let jwks: JwkSet = serde_json::from_value(raw.clone()).unwrap();
    let key = DecodingKey::from_jwk(jwks.find(&kid).unwrap()).unwrap();
    let mut v = Validation::new(Algorithm::RS256);
    v.set_audience(&["ztgate"]);
    decode::<Value>(&token, &key, &v).expect("valid signature by the enc key");
}

#[tokio::test]
async fn oidc_stop_restart_same_address_same_keys() {
    let ca = Ca::new("oidc-test-ca");
    let issuer = DevIssuer::start(&ca).await.unwrap();
    let addr = issuer.addr();
    let kids: Vec<String> = SigningAlg::ALL.map(|a| issuer.kid(a)).to_vec();
    let jwks_before = get_json(&issuer, "/keys").await;

    // A kept-alive connection that is open across the stop.
    let tls = connect(&issuer, &[b"http/1.1"]).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let resp = sender
        .send_request(request(&issuer, "/keys"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.unwrap();

    issuer.stop().await;
    issuer.stop().await; // idempotent
    let err = TcpStream::connect(addr).await.expect_err("port closed");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    // The open connection was dropped.
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("connection closed after stop")
        .unwrap()
        .ok();
    assert!(sender
        .send_request(request(&issuer, "/keys"))
        .await
        .is_err());

    issuer.restart().await.unwrap();
    issuer.restart().await.unwrap(); // idempotent
    assert_eq!(issuer.addr(), addr);
    assert_eq!(
        issuer.issuer_url(),
        format!("https://127.0.0.1:{}", addr.port())
    );
    assert_eq!(SigningAlg::ALL.map(|a| issuer.kid(a)).to_vec(), kids);
    assert_eq!(get_json(&issuer, "/keys").await, jwks_before);

    // A second cycle with traffic in between works the same.
    issuer.stop().await;
    assert!(get(&issuer, "/keys").await.is_err());
    issuer.restart().await.unwrap();
    let jwks = fetch_jwks(&issuer).await;
    let token = issuer.token("alice", "ztgate", Duration::from_secs(60), Value::Null);
    verify(&jwks, &issuer, SigningAlg::RS256, "ztgate", &token);
}

#[tokio::test]
async fn oidc_exec_credential_verifies() {
    let ca = Ca::new("oidc-test-ca");
    let issuer = DevIssuer::start_minting(&ca, "", Minting::Anyone)
        .await
        .unwrap();
    let cred = get_json(
        &issuer,
        "/dev/exec-credential?sub=alice&groups=team-a,devs&aud=ztgate&ttl=3600",
    )
    .await;
    assert_eq!(cred["apiVersion"], "client.authentication.k8s.io/v1");
    assert_eq!(cred["kind"], "ExecCredential");
    let token = cred["status"]["token"].as_str().unwrap();
    let jwks = fetch_jwks(&issuer).await;
    let claims = verify(&jwks, &issuer, SigningAlg::RS256, "ztgate", token);
    assert_eq!(claims["iss"], issuer.issuer_url());
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["aud"], "ztgate");
    assert_eq!(claims["groups"], json!(["team-a", "devs"]));
    assert_eq!(claims["email"], "alice@example.com");
    assert_eq!(claims["email_verified"], true);
    let iat = claims["iat"].as_u64().unwrap();
    let exp = claims["exp"].as_u64().unwrap();
    assert_eq!(claims["nbf"].as_u64().unwrap(), iat);
    assert_eq!(exp, iat + 3600);
    // expirationTimestamp is exp as RFC 3339 UTC.
    let ts = cred["status"]["expirationTimestamp"].as_str().unwrap();
    assert_eq!(ts, super::rfc3339_utc(exp));
    assert!(ts.ends_with('Z') && ts.len() == 20, "{ts}");

    // Percent-encoded values, defaults for groups/ttl.
    let cred = get_json(&issuer, "/dev/exec-credential?sub=bob%40corp&aud=ztgate").await;
    let claims = verify(
        &jwks,
        &issuer,
        SigningAlg::RS256,
        "ztgate",
        cred["status"]["token"].as_str().unwrap(),
    );
    assert_eq!(claims["sub"], "bob@corp");
    assert_eq!(claims["groups"], json!([]));
    assert_eq!(
        claims["exp"].as_u64().unwrap(),
        claims["iat"].as_u64().unwrap() + 3600
    );

    for bad in [
        "/dev/exec-credential?aud=ztgate",
        "/dev/exec-credential?sub=alice",
        "/dev/exec-credential?sub=alice&aud=ztgate&ttl=0",
        "/dev/exec-credential?sub=alice&aud=ztgate&ttl=soon",
    ] {
        let (status, _) = get(&issuer, bad).await.unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }
}

/// The exec-credential endpoint answers anyone who can reach the port, so an issuer mints only
/// the users it was started with, each with its own groups at most.
#[tokio::test]
async fn oidc_exec_credential_mints_only_the_configured_users() {
    let ca = Ca::new("oidc-test-ca");
    let issuer = DevIssuer::start_minting(
        &ca,
        "",
        Minting::Only(vec![DevUser::new("alice", &["team-a", "devs"])]),
    )
    .await
    .unwrap();
    let jwks = fetch_jwks(&issuer).await;
    for (query, groups) in [
        (
            "sub=alice&groups=team-a,devs&aud=ztgate",
            json!(["team-a", "devs"]),
        ),
        ("sub=alice&groups=team-a&aud=ztgate", json!(["team-a"])),
        ("sub=alice&aud=ztgate", json!([])),
    ] {
        let cred = get_json(&issuer, &format!("/dev/exec-credential?{query}")).await;
        let claims = verify(
            &jwks,
            &issuer,
            SigningAlg::RS256,
            "ztgate",
            cred["status"]["token"].as_str().unwrap(),
        );
        assert_eq!(claims["sub"], "alice", "{query}");
        assert_eq!(claims["groups"], groups, "{query}");
    }

    for (query, says) in [
        (
            "sub=mallory&groups=security&aud=ztgate",
            r#"only for its configured users, alice (groups: team-a, devs); not for "mallory""#,
        ),
        ("sub=mallory&aud=ztgate", r#"not for "mallory""#),
        (
            "sub=alice&groups=team-a,security&aud=ztgate",
            r#"mints "alice" only with the groups team-a, devs; not with "security""#,
        ),
        (
            "sub=alice&groups=team-a&groups=system:masters&aud=ztgate",
            r#"not with "system:masters""#,
        ),
        // The last `sub` is the one that would be minted.
        ("sub=alice&sub=mallory&aud=ztgate", r#"not for "mallory""#),
    ] {
        let (status, body) = get(&issuer, &format!("/dev/exec-credential?{query}"))
            .await
            .unwrap();
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, StatusCode::FORBIDDEN, "{query}: {body}");
        assert!(body.contains(says), "{query}: {body}");
        assert!(!body.contains("ExecCredential"), "{query}: {body}");
    }

    // Started without users, it mints nothing over HTTP; in-process minting is unaffected.
    let quiet = DevIssuer::start(&ca).await.unwrap();
    let (status, body) = get(&quiet, "/dev/exec-credential?sub=alice&aud=ztgate")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        String::from_utf8_lossy(&body).contains("mints no tokens over HTTP"),
        "{body:?}"
    );
    let token = quiet.token("anyone", "ztgate", Duration::from_secs(60), Value::Null);
    verify(
        &fetch_jwks(&quiet).await,
        &quiet,
        SigningAlg::RS256,
        "ztgate",
        &token,
    );
}

#[tokio::test]
async fn oidc_issuer_path() {
    let ca = Ca::new("oidc-test-ca");
    let issuer = DevIssuer::start_minting(
        &ca,
        "/realms/dev/",
        Minting::Only(vec![DevUser::new("a", &[])]),
    )
    .await
    .unwrap();
    let url = issuer.issuer_url();
    assert_eq!(
        url,
        format!("https://127.0.0.1:{}/realms/dev", issuer.addr().port())
    );
    let doc = get_json(&issuer, "/realms/dev/.well-known/openid-configuration").await;
    assert_eq!(doc["issuer"], url);
    assert_eq!(doc["jwks_uri"], format!("{url}/keys"));
    let jwks = fetch_jwks(&issuer).await;
    assert_eq!(jwks.keys.len(), 3);
    let token = issuer.token("alice", "ztgate", Duration::from_secs(60), json!({}));
    verify(&jwks, &issuer, SigningAlg::RS256, "ztgate", &token);
    let cred = get_json(&issuer, "/realms/dev/dev/exec-credential?sub=a&aud=ztgate").await;
    assert_eq!(cred["kind"], "ExecCredential");
    for path in ["/.well-known/openid-configuration", "/keys", "/realms/keys"] {
        let (status, _) = get(&issuer, path).await.unwrap();
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    assert_eq!(issuer.discovery_fetches(), 1);
    assert_eq!(issuer.jwks_fetches(), 1);

    assert!(DevIssuer::start_with_path(&ca, "/a b").await.is_err());
    assert!(DevIssuer::start_with_path(&ca, "/a?x=1").await.is_err());
    assert!(DevIssuer::start_with_path(&ca, "/a/../b").await.is_err());
    let root = DevIssuer::start_with_path(&ca, "/").await.unwrap();
    assert!(!root.issuer_url().ends_with('/'));
}

#[tokio::test]
async fn oidc_fault_knobs() {
    let ca = Ca::new("oidc-test-ca");
    let issuer = DevIssuer::start(&ca).await.unwrap();

    issuer.set_jwks_override(Some("this is not json".into()));
    let (status, body) = get(&issuer, "/keys").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"this is not json");
    assert_eq!(issuer.jwks_fetches(), 1);
    issuer.set_jwks_override(None);
    assert_eq!(
        get_json(&issuer, "/keys").await["keys"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_eq!(issuer.jwks_fetches(), 2);

    issuer.set_delay(Duration::from_millis(300));
    let started = Instant::now();
    let (status, _) = get(&issuer, "/.well-known/openid-configuration")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(300));
    // The fetch is counted when the request arrives, before the delay.
    issuer.set_delay(Duration::from_secs(3));
    let issuer = Arc::new(issuer);
    let pending = tokio::spawn({
        let issuer = issuer.clone();
        async move { get(&issuer, "/keys").await }
    });
    let deadline = Instant::now() + Duration::from_secs(2);
    while issuer.jwks_fetches() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(issuer.jwks_fetches(), 3);
    assert!(!pending.is_finished(), "answer held back by the delay");
    pending.abort();
    assert_eq!(issuer.discovery_fetches(), 1);

    // Without the delay the answer comes at once: the bound only tells "no delay" from the 3 s
    // one set before, so a loaded machine does not fail it.
    issuer.set_delay(Duration::ZERO);
    let started = Instant::now();
    get_json(&issuer, "/keys").await;
    let took = started.elapsed();
    eprintln!("answered without the delay in {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[test]
fn oidc_rfc3339_utc() {
    assert_eq!(super::rfc3339_utc(0), "1970-01-01T00:00:00Z");
    assert_eq!(super::rfc3339_utc(1_700_000_000), "2023-11-14T22:13:20Z");
    assert_eq!(super::rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
}

/// The `ztgate demo` kubeconfig runs `curl -s --cacert <ca> <exec-credential URL>` as its exec
/// plugin; check that exact invocation. curl is a test dependency: without it the test fails.
#[tokio::test]
async fn oidc_exec_credential_via_curl() {
    let version = tokio::process::Command::new("curl")
        .arg("--version")
        .output()
        .await;
    assert!(
        matches!(&version, Ok(o) if o.status.success()),
        "this test runs curl, which is not installed or does not run ({version:?}): \
         install it (apt-get install curl)"
    );
    let ca = Ca::new("oidc-test-ca");
    let issuer = DevIssuer::start_minting(
        &ca,
        "",
        Minting::Only(vec![DevUser::new("alice", &["team-a", "devs"])]),
    )
    .await
    .unwrap();
    let ca_file = std::env::temp_dir().join(format!(
        "ztgate-oidc-ca-{}-{}.pem",
        std::process::id(),
        issuer.addr().port()
    ));
    std::fs::write(&ca_file, issuer.ca_pem()).unwrap();
    let url = format!(
        "{}/dev/exec-credential?sub=alice&groups=team-a,devs&aud=ztgate&ttl=3600",
        issuer.issuer_url()
    );
    let out = tokio::process::Command::new("curl")
        .arg("-s")
        .arg("--cacert")
        .arg(&ca_file)
        .arg(&url)
        .output()
        .await
        .unwrap();
    let _ = std::fs::remove_file(&ca_file);
    assert!(out.status.success(), "curl failed: {out:?}");
    let cred: Value = serde_json::from_slice(&out.stdout).expect("ExecCredential JSON");
    assert_eq!(cred["kind"], "ExecCredential");
    let jwks = fetch_jwks(&issuer).await;
    let claims = verify(
        &jwks,
        &issuer,
        SigningAlg::RS256,
        "ztgate",
        cred["status"]["token"].as_str().unwrap(),
    );
    assert_eq!(claims["groups"], json!(["team-a", "devs"]));
}
