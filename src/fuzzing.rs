//! Entry points for the cargo-fuzz targets in `fuzz/`. Not API: compiled only for fuzzing
//! (`--cfg fuzzing`, which cargo-fuzz sets) and for the unit tests, hidden from the docs, and
//! free to change with the targets.
//!
//! Each function feeds untrusted bytes through one of the parsers a client (or an IdP, or an
//! operator's config) controls, and panics only when a property the gateway relies on breaks —
//! not merely when the input is refused. Inputs are split into fields by newlines so that a
//! fuzzer reaches the interesting parts without first having to learn an encoding.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Method;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};

use crate::authn::oidc::keys::KeySet;
use crate::authn::oidc::verify::{self, IssuerRules};
use crate::authn::Identity;

/// Lines of `data` as (lossy) text: one field per line.
fn fields(data: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(data)
        .split('\n')
        .map(str::to_owned)
        .collect()
}

/// `name: value` lines as a header map; lines that are not a valid header are skipped.
fn header_map<'a>(lines: impl Iterator<Item = &'a str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value.trim()),
        ) else {
            continue;
        };
        h.append(name, value);
    }
    h
}

fn is_dot_or_has_slash(s: &str) -> bool {
    s == "." || s == ".." || s.contains('/')
}

/// Request attributes: `method \n path \n query`.
///
/// Properties: a path the target checks accept yields attributes whose namespace, resource,
/// name, subresource, group and version are single segments (no `/`, never `.` or `..`), each
/// the percent-decoding of a segment of the raw path; the verb the authorizer sees is one of
/// kube's; the result does not depend on a trailing slash.
pub fn request_info(data: &[u8]) {
    use crate::authz::requestinfo::{authorizer_checks, request_info};
    let f = fields(data);
    let method = Method::from_bytes(f.first().map(String::as_bytes).unwrap_or(b"GET"))
        .unwrap_or(Method::GET);
    let path = f.get(1).map(String::as_str).unwrap_or("/");
    let query = f.get(2).map(String::as_str);
    let result = request_info(&method, path, query);
    if crate::proxy::path::check_path(path).is_err() {
        return;
    }
    let Ok(info) = result else { return };
    let raw_segments: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    for (what, v) in [
        ("namespace", &info.namespace),
        ("resource", &info.resource),
        ("subresource", &info.subresource),
        ("apiGroup", &info.api_group),
        ("apiVersion", &info.api_version),
    ] {
        if v.is_empty() {
            continue;
        }
        assert!(!is_dot_or_has_slash(v), "{what} {v:?} from {path:?}");
        assert!(
            raw_segments.contains(v),
            "{what} {v:?} is not a segment of {path:?}"
        );
    }
    // The name may come from a fieldSelector, which kube also requires to be a path segment.
    assert!(
        info.name.is_empty() || !is_dot_or_has_slash(&info.name),
        "name {:?} from {path:?} {query:?}",
        info.name
    );
    let (verb, extra) = authorizer_checks(&info, &method);
    if info.is_resource_request {
        assert!(
            matches!(
                verb,
                "get"
                    | "list"
                    | "watch"
                    | "create"
                    | "update"
                    | "patch"
                    | "delete"
                    | "deletecollection"
                    | "proxy"
                    | ""
            ),
            "verb {verb:?} for {method} {path:?}"
        );
    }
    if extra.is_some() {
        assert_eq!(info.api_group, "");
        assert_eq!(info.resource, "pods");
    }
    // kube trims the trailing slash before splitting; so must we.
    if path.len() > 1 && !path.ends_with('/') {
        let slashed = request_info(&method, &format!("{path}/"), query).map(|mut i| {
            i.path = info.path.clone();
            i
        });
        assert_eq!(slashed.ok(), Some(info), "trailing slash changed {path:?}");
    }
}

/// A public key the fuzzer cannot sign for: no input may ever verify against it.
const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"fuzz","use":"sig","alg":"ES256",
"x":"kSsewRPs0Y-46LVVUUskhVay9aqFu9x9Zzpu9pJCq20","y":"YJHx12YuyvlOG4DMXYmgIHPfBjSfk4T3jTgWwN3E5PQ"}]}"#;

const ISSUER: &str = "https://idp.fuzz.example";

fn rules() -> &'static IssuerRules {
    static RULES: OnceLock<IssuerRules> = OnceLock::new();
    RULES.get_or_init(|| IssuerRules {
        url: ISSUER.into(),
        audiences: vec!["ztgate".into()],
        algorithms: vec![Algorithm::ES256, Algorithm::RS256, Algorithm::EdDSA],
        leeway: Duration::from_secs(60),
        max_lifetime: Some(Duration::from_secs(24 * 3600)),
        max_token_bytes: 16 * 1024,
        required: vec![("tenant".into(), "acme".into())],
        username_claim: "email".into(),
        username_prefix: String::new(),
        groups: Some(("groups".into(), String::new())),
        uid_claim: None,
        claims_for_policy: vec!["amr".into(), "acr".into()],
    })
}

fn keyset() -> &'static KeySet {
    static KEYS: OnceLock<KeySet> = OnceLock::new();
    KEYS.get_or_init(|| KeySet::parse(JWKS.as_bytes(), &rules().algorithms).expect("fuzz JWKS"))
}

/// A fixed instant, so that a run is reproducible.
fn fuzz_now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_750_000_000)
}

/// Checks an identity the gateway would forward as impersonation headers.
fn check_identity(id: &Identity) {
    assert!(!id.user().is_empty());
    for name in std::iter::once(id.user()).chain(id.groups().iter().map(String::as_str)) {
        assert!(!name.starts_with("system:"), "reserved name {name:?}");
        assert!(!name.chars().any(char::is_control), "control in {name:?}");
        assert!(HeaderValue::from_str(name).is_ok(), "{name:?}");
    }
    let mut h = HeaderMap::new();
    crate::proxy::headers::set_impersonation(&mut h, id).expect("a mapped identity is encodable");
}

fn token_pipeline(header_value: &str) {
    let mut headers = HeaderMap::new();
    let Ok(v) = HeaderValue::from_str(header_value) else {
        return;
    };
    headers.insert(http::header::AUTHORIZATION, v);
    let Ok(Some(token)) = crate::authn::credentials::bearer_from_headers(&headers) else {
        return;
    };
    let token = token.expose();
    assert!(!token.is_empty() && !token.contains(' ') && !token.contains(','));
    let Ok(unverified) = verify::parse_unverified(token) else {
        return;
    };
    assert!(
        !matches!(
            unverified.alg,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        ),
        "HMAC accepted"
    );
    let r = rules();
    if r.algorithms.contains(&unverified.alg) {
        for key in keyset().keys.iter().filter(|k| k.accepts(unverified.alg)) {
            let decoded = jsonwebtoken::decode::<Map<String, Value>>(
                token,
                &key.key,
                &r.validation(unverified.alg),
            );
            assert!(decoded.is_err(), "a token the fuzzer made verified");
        }
    }
    // What happens after a signature verifies: map the claims as they are.
    let Some(payload) = token.split('.').nth(1) else {
        return;
    };
    let Ok(bytes) = URL_SAFE_NO_PAD.decode(payload) else {
        return;
    };
    let Ok(Value::Object(claims)) = serde_json::from_slice::<Value>(&bytes) else {
        return;
    };
    if let Ok((id, audiences)) = r.map_claims(&claims, fuzz_now()) {
        check_identity(&id);
        assert!(!audiences.is_empty());
        assert!(audiences.iter().all(|a| r.audiences.contains(a)));
        assert_eq!(claims.get("tenant").and_then(Value::as_str), Some("acme"));
        let exp = id.expires_at().expect("exp is required");
        assert!(exp + r.leeway >= fuzz_now(), "expired token accepted");
    }
}

/// Bearer tokens up to the signature check, and the claim mapping after it.
///
/// The first byte picks the input form: `0` the raw `Authorization` value; `1` three lines
/// (header JSON, claims JSON, signature) that are base64url-encoded here into a token; `2` a
/// JWKS document as an IdP would serve it.
///
/// Properties: only a single token68 bearer token is accepted; `none` and HMAC are never
/// accepted; nothing the fuzzer produces verifies against the fixed key; mapped identities never
/// carry `system:` names, control characters or unencodable values, always have an accepted
/// audience, the required claim and an `exp` within the leeway.
pub fn oidc_token(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => token_pipeline(&String::from_utf8_lossy(rest)),
        1 => {
            let f = fields(rest);
            let part =
                |i: usize| URL_SAFE_NO_PAD.encode(f.get(i).map(String::as_str).unwrap_or(""));
            let sig = f.get(2).map(String::as_str).unwrap_or("c2ln");
            token_pipeline(&format!("Bearer {}.{}.{sig}", part(0), part(1)));
        }
        _ => {
            if let Ok(set) = KeySet::parse(rest, &rules().algorithms) {
                assert!(!set.keys.is_empty());
                for k in &set.keys {
                    // A JWK's `alg`, when present, is one the issuer accepts and fits the key.
                    if let Some(alg) = k.alg {
                        assert!(rules().algorithms.contains(&alg) && k.accepts(alg));
                    }
                    assert!(!k.accepts(Algorithm::HS256));
                }
            }
        }
    }
}

/// The config file: YAML text through parsing, schema and validation (file checks included;
/// paths resolve under a directory that does not exist).
///
/// Property: no input panics or hangs; a config that loads has the invariants the server relies
/// on (positive timeouts, limits it can use).
pub fn config(data: &[u8]) {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    let base = std::path::Path::new("/nonexistent/ztgate-fuzz");
    match crate::config::load_str(src, "fuzz.yaml", base) {
        Ok(cfg) => {
            assert!(!cfg.timeouts.header_read.get().is_zero());
            assert!(!cfg.timeouts.tls_handshake.get().is_zero());
            assert!(cfg.limits.max_concurrent_streams > 0);
        }
        Err(errs) => {
            assert!(!errs.errors.is_empty());
            let _ = errs.to_string();
        }
    }
    // Durations have their own parser (Go's time.ParseDuration syntax).
    if let Ok(d) = crate::config::GoDuration::parse(src.lines().next().unwrap_or("")) {
        let _ = d.get();
    }
}

/// Impersonate-Extra keys: the client's `Impersonate-Extra-*` headers as the gateway reads
/// them, and the keys as the gateway writes them.
///
/// Input: first line an extra key (any UTF-8) to round-trip, then `name: value` header lines.
///
/// Properties: every key encodes to header-name characters and decodes back to itself; a
/// client's impersonation request, once it is the identity, is written as headers that decode
/// back to exactly the same extras, and carries the original user.
pub fn impersonate_extra(data: &[u8]) {
    use crate::authz::{decode_extra_key, encode_extra_key};
    use crate::proxy::headers::set_impersonation;
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let key = lines.next().unwrap_or("");
    let encoded = encode_extra_key(key);
    assert!(
        HeaderName::from_bytes(format!("impersonate-extra-{encoded}").as_bytes()).is_ok(),
        "{key:?} -> {encoded:?}"
    );
    assert_eq!(decode_extra_key(&encoded).as_deref(), Some(key));

    let headers = header_map(lines);
    let Ok(Some(req)) = crate::authz::ImpersonationRequest::from_headers(&headers) else {
        return;
    };
    let caller = caller_identity();
    let Ok(id) = caller.impersonated(
        req.user.clone().unwrap_or_default(),
        req.groups.clone(),
        req.uid.clone(),
        req.extra.clone(),
    ) else {
        return;
    };
    let mut out = HeaderMap::new();
    set_impersonation(&mut out, &id).expect("values read from headers are header values");
    let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &out {
        if let Some(k) = name.as_str().strip_prefix("impersonate-extra-") {
            // kube-apiserver: lower-case the header name, then path-unescape the key.
            let k = decode_extra_key(k).expect("written keys decode");
            extra
                .entry(k)
                .or_default()
                .push(value.to_str().unwrap().to_owned());
        }
    }
    assert_eq!(&extra, id.extra(), "extras changed on the way out");
    assert_eq!(
        extra.get(crate::authn::ORIGINAL_USER_EXTRA),
        Some(&vec![caller.user().to_owned()])
    );
    assert_eq!(
        out.get_all("impersonate-user").iter().count(),
        1,
        "one Impersonate-User"
    );
}

fn caller_identity() -> &'static Identity {
    static CALLER: OnceLock<Identity> = OnceLock::new();
    CALLER.get_or_init(|| {
        let claims = serde_json::json!({
            "iss": ISSUER, "aud": "ztgate", "email": "alice@example.com",
            "groups": ["team-a"], "tenant": "acme",
            "iat": 1_750_000_000u64 - 60, "exp": 1_750_000_000u64 + 3600,
        });
        let Value::Object(claims) = claims else {
            unreachable!()
        };
        rules()
            .map_claims(&claims, fuzz_now())
            .expect("fuzz caller maps")
            .0
    })
}

/// Upgrade requests (WebSocket and SPDY exec/attach/port-forward) as the gateway classifies and
/// rewrites them: `method \n target \n version(1|2) \n header lines...`.
///
/// Properties: only an HTTP/1.x request with an `Upgrade` header and `Connection: upgrade` is
/// an upgrade, and its kind matches the subresource kube-apiserver reads from the path; after header hygiene no hop-by-hop
/// header, no header named in `Connection` and no identity header of the client is left, the
/// stream subprotocol headers that were not named in `Connection` pass untouched, and the
/// gateway's identity is the only one written.
pub fn upgrade_headers(data: &[u8]) {
    use crate::proxy::RequestShape;
    use crate::streams::StreamKind;
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let method =
        Method::from_bytes(lines.next().unwrap_or("GET").as_bytes()).unwrap_or(Method::GET);
    let Ok(uri) = lines.next().unwrap_or("/").parse::<http::Uri>() else {
        return;
    };
    let version = match lines.next() {
        Some("2") => http::Version::HTTP_2,
        Some("0") => http::Version::HTTP_10,
        _ => http::Version::HTTP_11,
    };
    let headers = header_map(lines);
    let mut req = http::Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = headers.clone();

    let info =
        crate::authz::requestinfo::request_info(req.method(), req.uri().path(), req.uri().query());
    let shape = info
        .as_ref()
        .map(|i| crate::route::shape_of(i, crate::route::upgrade_requested(&req)));
    if let (Ok(info), Ok(RequestShape::Upgrade(kind))) = (&info, shape) {
        assert!(version <= http::Version::HTTP_11);
        assert!(headers.contains_key(http::header::UPGRADE));
        let connection_upgrade = headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        assert!(connection_upgrade);
        let sub = if info.is_resource_request && info.verb != "proxy" {
            info.subresource.as_str()
        } else {
            ""
        };
        let want = match sub {
            "exec" => StreamKind::Exec,
            "attach" => StreamKind::Attach,
            "portforward" => StreamKind::PortForward,
            _ => StreamKind::Upgrade,
        };
        assert_eq!(kind, want);
    }

    let named: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let mut out = headers.clone();
    crate::proxy::headers::sanitize_request_headers(&mut out);
    for (name, _) in &out {
        let n = name.as_str();
        assert!(
            !n.starts_with("impersonate-")
                && !n.starts_with("x-remote-")
                && !n.starts_with("x-forwarded-")
                && !matches!(
                    n,
                    "authorization"
                        | "connection"
                        | "upgrade"
                        | "transfer-encoding"
                        | "te"
                        | "trailer"
                        | "keep-alive"
                        | "proxy-connection"
                        | "proxy-authorization"
                        | "forwarded"
                        | "x-real-ip"
                        | "host"
                ),
            "{n} survived hygiene"
        );
        assert!(
            !named.iter().any(|t| t == n),
            "{n} named in Connection survived"
        );
    }
    // A bearer token passed as a WebSocket subprotocol (kube-apiserver authenticates from it)
    // never passes; the other subprotocols do, in order.
    const BEARER: &[u8] = b"base64url.bearer.authorization.k8s.io.";
    let bearer = |e: &[u8]| {
        e.to_ascii_lowercase()
            .windows(BEARER.len())
            .any(|w| w == BEARER)
    };
    let entries = |vs: &[&HeaderValue]| -> Vec<Vec<u8>> {
        vs.iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .filter(|e| !bearer(e))
            .map(|e| e.trim_ascii().to_vec())
            .filter(|e| !e.is_empty())
            .collect()
    };
    for sub in ["sec-websocket-protocol", "x-stream-protocol-version"] {
        if !named.iter().any(|t| t == sub) {
            let before: Vec<&HeaderValue> = headers.get_all(sub).iter().collect();
            let after: Vec<&HeaderValue> = out.get_all(sub).iter().collect();
            if sub == "sec-websocket-protocol" && before.iter().any(|v| bearer(v.as_bytes())) {
                assert!(
                    !after.iter().any(|v| bearer(v.as_bytes())),
                    "a bearer subprotocol survived"
                );
                assert_eq!(
                    entries(&before),
                    entries(&after),
                    "{sub} lost a subprotocol"
                );
            } else {
                assert_eq!(before, after, "{sub} changed");
            }
        }
    }
    let id = caller_identity();
    crate::proxy::headers::set_impersonation(&mut out, id).expect("caller encodes");
    let values = |name: &str| -> Vec<String> {
        out.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(values("impersonate-user"), [id.user()]);
    assert_eq!(values("impersonate-group"), id.groups());
}

/// Device posture reports as the gateway turns them into records: the first byte picks a
/// self-report body as an agent posts it (even) or the claims of a signed report (odd).
///
/// Properties: the agent cannot date a record into the future; a record that validates
/// survives the state store's JSON unchanged (what is persisted and shared with other replicas
/// is what was decided on); its policy facts and audit summary are computed without panic.
pub fn posture_report(data: &[u8]) {
    use crate::state::{Posture, PostureRecord};
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let now = fuzz_now();
    let (attributes, collected_at, source) = if mode % 2 == 0 {
        let Ok(r) = serde_json::from_slice::<crate::posture::SelfReport>(rest) else {
            return;
        };
        let at = r.collected_at.unwrap_or(now).min(now);
        (r.attributes, at, crate::posture::SOURCE_SELF)
    } else {
        let Ok(Value::Object(claims)) = serde_json::from_slice::<Value>(rest) else {
            return;
        };
        let Some(p) = claims.get("posture").filter(|v| v.is_object()) else {
            return;
        };
        let Ok(p) = serde_json::from_value::<Posture>(p.clone()) else {
            return;
        };
        (p, now, "mdm")
    };
    let rec = PostureRecord {
        device_id: "laptop-1".into(),
        attributes,
        source: source.into(),
        collected_at,
        expires_at: collected_at + Duration::from_secs(3600),
    };
    assert!(rec.collected_at <= now);
    if rec.validate().is_err() {
        return;
    }
    let json = serde_json::to_string(&rec).expect("a valid record serializes");
    let back: PostureRecord = serde_json::from_str(&json).expect("a stored record reads back");
    assert_eq!(
        back, rec,
        "the record changed through the store's JSON: {json}"
    );
    let (facts, age) = crate::posture::facts(&rec, now);
    assert_eq!(facts.self_reported, source == crate::posture::SOURCE_SELF);
    assert!(age <= now.duration_since(UNIX_EPOCH).unwrap());
    let _ = crate::posture::summary(&rec, now);
}

#[cfg(test)]
mod tests {
    /// Every seed of every fuzz target's corpus (`fuzz/corpus/<target>/`), through the same
    /// entry point the fuzzer calls: the properties each one checks hold for every seed. The
    /// fuzzer itself (`scripts/fuzz`) runs the same seeds under libFuzzer and the address
    /// sanitizer, and then mutates them.
    #[test]
    fn every_seed_of_every_corpus_keeps_its_properties() {
        type Target = (&'static str, fn(&[u8]));
        const TARGETS: &[Target] = &[
            ("request_info", super::request_info),
            ("oidc_token", super::oidc_token),
            ("config", super::config),
            ("impersonate_extra", super::impersonate_extra),
            ("upgrade_headers", super::upgrade_headers),
            ("posture_report", super::posture_report),
        ];
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        let targets_dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets");
        let on_disk = std::fs::read_dir(&targets_dir)
            .expect("fuzz/fuzz_targets")
            .count();
        assert_eq!(
            on_disk,
            TARGETS.len(),
            "a fuzz target is missing from this list"
        );
        for (name, run) in TARGETS {
            let dir = root.join(name);
            let mut seeds = 0;
            for entry in
                std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            {
                let path = entry.expect("corpus entry").path();
                let data =
                    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                run(&data);
                seeds += 1;
            }
            assert!(seeds > 0, "{name}: the seed corpus is empty");
            eprintln!("{name}: {seeds} seeds");
        }
    }

    /// Inputs the fuzzers found, kept as regression tests.
    #[test]
    fn posture_numbers_survive_the_store_exactly() {
        // A big integer in a free-form fact was read back one ULP off before serde_json's
        // `float_roundtrip`.
        super::posture_report(
            b"\x00{\"attributes\": {\"extra\": {\"x\": 0.1, \"y\": 0e+308, \"z\": -0.0, \
              \"w\": 123456789012674538901234567890}}}",
        );
    }
}
