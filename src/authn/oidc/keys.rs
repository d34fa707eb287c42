//! A JWKS turned into verification keys. Keys that must never verify a token are left out, and
//! why is remembered (for the log, and for a precise error when a token names one of them):
//! `use` other than `sig`, symmetric keys, an `alg` the issuer does not accept, unsupported key
//! types or curves, weak RSA keys, malformed parameters.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

/// Smallest RSA modulus accepted.
const MIN_RSA_BITS: usize = 2048;

/// The kind of public key, which fixes the algorithms it can verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyKind {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl KeyKind {
    pub(crate) fn verifies(self, alg: Algorithm) -> bool {
        matches!(
            (self, alg),
            (
                KeyKind::Rsa,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ) | (KeyKind::P256, Algorithm::ES256)
                | (KeyKind::P384, Algorithm::ES384)
                | (KeyKind::Ed25519, Algorithm::EdDSA)
        )
    }

    fn describe(self) -> &'static str {
        match self {
            KeyKind::Rsa => "RSA",
            KeyKind::P256 => "EC P-256",
            KeyKind::P384 => "EC P-384",
            KeyKind::Ed25519 => "OKP Ed25519",
        }
    }
}

/// One usable verification key.
pub(crate) struct VerifyKey {
    pub(crate) kid: Option<String>,
    /// The JWK's `alg`, when it names one (then only that algorithm may be used with it).
    pub(crate) alg: Option<Algorithm>,
    pub(crate) kind: KeyKind,
    pub(crate) key: DecodingKey,
}

impl VerifyKey {
    /// Whether this key may verify a token signed with `alg`.
    pub(crate) fn accepts(&self, alg: Algorithm) -> bool {
        self.kind.verifies(alg) && self.alg.is_none_or(|a| a == alg)
    }

    pub(crate) fn describe(&self) -> String {
        let alg = self.alg.map(|a| format!("{a:?}")).unwrap_or("any".into());
        format!("{} key for alg {alg}", self.kind.describe())
    }
}

/// A JWK that was left out, and why.
#[derive(Clone, Debug)]
pub(crate) struct Skipped {
    pub(crate) kid: Option<String>,
    pub(crate) reason: String,
}

/// The keys of one issuer as last fetched.
pub(crate) struct KeySet {
    pub(crate) keys: Vec<VerifyKey>,
    pub(crate) skipped: Vec<Skipped>,
}

/// Why a JWKS document is unusable as a whole.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum JwksError {
    #[error("JWKS is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("JWKS has no \"keys\" array")]
    NoKeysArray,
    #[error("JWKS holds no keys")]
    Empty,
    /// Every key was left out; the reasons, one per key.
    #[error("JWKS holds no usable key ({})", .0.join("; "))]
    NoUsableKey(Vec<String>),
}

impl KeySet {
    /// Parses a JWKS document. Fails only when the document itself is unusable (not JSON, no
    /// `keys` array, or no usable key at all); single bad keys are skipped.
    pub(crate) fn parse(body: &[u8], allowed: &[Algorithm]) -> Result<KeySet, JwksError> {
        let doc: Value = serde_json::from_slice(body).map_err(JwksError::NotJson)?;
        let Some(list) = doc.get("keys").and_then(Value::as_array) else {
            return Err(JwksError::NoKeysArray);
        };
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for (i, jwk) in list.iter().enumerate() {
            let kid = jwk.get("kid").and_then(Value::as_str).map(str::to_owned);
            match parse_jwk(jwk, allowed) {
                Ok(k) => keys.push(k),
                Err(reason) => skipped.push(Skipped {
                    kid: kid.clone(),
                    reason: format!("key #{i}: {reason}"),
                }),
            }
        }
        if keys.is_empty() {
            return Err(if skipped.is_empty() {
                JwksError::Empty
            } else {
                JwksError::NoUsableKey(skipped.into_iter().map(|s| s.reason).collect())
            });
        }
        Ok(KeySet { keys, skipped })
    }

    pub(crate) fn by_kid<'a>(&'a self, kid: &'a str) -> impl Iterator<Item = &'a VerifyKey> + 'a {
        self.keys
            .iter()
            .filter(move |k| k.kid.as_deref() == Some(kid))
    }

    pub(crate) fn has_kid(&self, kid: &str) -> bool {
        self.by_kid(kid).next().is_some()
    }

    pub(crate) fn skipped_kid(&self, kid: &str) -> Option<&Skipped> {
        self.skipped.iter().find(|s| s.kid.as_deref() == Some(kid))
    }

    /// Every kid the JWKS names, of usable keys and of keys left out.
    pub(crate) fn all_kids(&self) -> impl Iterator<Item = &str> {
        self.keys
            .iter()
            .filter_map(|k| k.kid.as_deref())
            .chain(self.skipped.iter().filter_map(|s| s.kid.as_deref()))
    }

    pub(crate) fn kids(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| k.kid.clone().unwrap_or_else(|| "<no kid>".into()))
            .collect()
    }
}

/// Why one key of a JWKS is left out (the others are still used).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum JwkError {
    #[error("not a JSON object")]
    NotObject,
    #[error("missing \"{0}\"")]
    Missing(&'static str),
    #[error("\"{0}\" is not a string")]
    NotString(&'static str),
    #[error("\"{0}\" is not base64url")]
    NotBase64(&'static str),
    #[error("published with use={0:?}, not for signatures; never used to verify tokens")]
    NotForSignatures(String),
    #[error("key_ops does not include \"verify\"")]
    NoVerifyOp,
    #[error("alg {0} is not in this issuer's signingAlgorithms")]
    AlgNotAllowed(String),
    #[error("alg {0:?} is not a supported signature algorithm")]
    UnknownAlg(String),
    #[error("RSA modulus of {0} bits is shorter than {MIN_RSA_BITS}")]
    ShortRsa(usize),
    #[error("empty RSA exponent")]
    EmptyExponent,
    #[error("unsupported EC curve {0:?}")]
    EcCurve(String),
    #[error("{crv} coordinates must be {len} bytes")]
    EcPointLength { crv: String, len: usize },
    #[error("unsupported OKP curve {0:?}")]
    OkpCurve(String),
    #[error("Ed25519 key must be 32 bytes")]
    Ed25519Length,
    #[error("symmetric key (kty oct); never used to verify tokens")]
    Symmetric,
    #[error("unsupported key type {0:?}")]
    KeyType(String),
    #[error("alg {alg:?} does not fit a {kind} key")]
    AlgMismatch { alg: Algorithm, kind: &'static str },
    #[error("{0} key, and none of this issuer's signingAlgorithms uses one")]
    NoAllowedAlg(&'static str),
}

fn b64(jwk: &Value, member: &'static str) -> Result<Vec<u8>, JwkError> {
    let s = jwk
        .get(member)
        .and_then(Value::as_str)
        .ok_or(JwkError::Missing(member))?;
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|_| JwkError::NotBase64(member))
}

fn parse_alg(name: &str) -> Option<Algorithm> {
    Some(match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

fn parse_jwk(jwk: &Value, allowed: &[Algorithm]) -> Result<VerifyKey, JwkError> {
    if !jwk.is_object() {
        return Err(JwkError::NotObject);
    }
    match jwk.get("use") {
        None => {}
        Some(Value::String(u)) if u == "sig" => {}
        Some(Value::String(u)) => return Err(JwkError::NotForSignatures(u.clone())),
        Some(_) => return Err(JwkError::NotString("use")),
    }
    if let Some(ops) = jwk.get("key_ops") {
        let verify = ops
            .as_array()
            .is_some_and(|ops| ops.iter().any(|o| o.as_str() == Some("verify")));
        if !verify {
            return Err(JwkError::NoVerifyOp);
        }
    }
    let alg = match jwk.get("alg") {
        None => None,
        Some(Value::String(a)) => match parse_alg(a) {
            Some(alg) if allowed.contains(&alg) => Some(alg),
            Some(_) => return Err(JwkError::AlgNotAllowed(a.clone())),
            None => return Err(JwkError::UnknownAlg(a.clone())),
        },
        Some(_) => return Err(JwkError::NotString("alg")),
    };
    let kty = jwk
        .get("kty")
        .and_then(Value::as_str)
        .ok_or(JwkError::Missing("kty"))?;
    let (kind, key) = match kty {
        "RSA" => {
            let n = b64(jwk, "n")?;
            let e = b64(jwk, "e")?;
            let n_trimmed = n.iter().skip_while(|b| **b == 0).count();
            if n_trimmed * 8 < MIN_RSA_BITS {
                return Err(JwkError::ShortRsa(n_trimmed * 8));
            }
            if e.is_empty() {
                return Err(JwkError::EmptyExponent);
            }
            (KeyKind::Rsa, DecodingKey::from_rsa_raw_components(&n, &e))
        }
        "EC" => {
            let crv = jwk
                .get("crv")
                .and_then(Value::as_str)
                .ok_or(JwkError::Missing("crv"))?;
            let (kind, len) = match crv {
                "P-256" => (KeyKind::P256, 32),
                "P-384" => (KeyKind::P384, 48),
                other => return Err(JwkError::EcCurve(other.to_owned())),
            };
            let x = b64(jwk, "x")?;
            let y = b64(jwk, "y")?;
            if x.len() != len || y.len() != len {
                return Err(JwkError::EcPointLength {
                    crv: crv.to_owned(),
                    len,
                });
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            (kind, DecodingKey::from_ec_der(&point))
        }
        "OKP" => {
            let crv = jwk
                .get("crv")
                .and_then(Value::as_str)
                .ok_or(JwkError::Missing("crv"))?;
            if crv != "Ed25519" {
                return Err(JwkError::OkpCurve(crv.to_owned()));
            }
            let x = b64(jwk, "x")?;
            if x.len() != 32 {
                return Err(JwkError::Ed25519Length);
            }
            (KeyKind::Ed25519, DecodingKey::from_ed_der(&x))
        }
        "oct" => return Err(JwkError::Symmetric),
        other => return Err(JwkError::KeyType(other.to_owned())),
    };
    if let Some(a) = alg {
        if !kind.verifies(a) {
            return Err(JwkError::AlgMismatch {
                alg: a,
                kind: kind.describe(),
            });
        }
    } else if !allowed.iter().any(|a| kind.verifies(*a)) {
        return Err(JwkError::NoAllowedAlg(kind.describe()));
    }
    Ok(VerifyKey {
        kid: jwk.get("kid").and_then(Value::as_str).map(str::to_owned),
        alg,
        kind,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rsa_n() -> String {
        URL_SAFE_NO_PAD.encode([0xc5u8; 256])
    }

    #[test]
    fn keeps_signature_keys_and_explains_the_rest() {
        let x32 = URL_SAFE_NO_PAD.encode([1u8; 32]);
        let doc = json!({"keys": [
            {"kty": "RSA", "kid": "r1", "use": "sig", "alg": "RS256", "n": rsa_n(), "e": "AQAB"},
            {"kty": "RSA", "kid": "enc1", "use": "enc", "alg": "RS256", "n": rsa_n(), "e": "AQAB"},
            {"kty": "oct", "kid": "h1", "k": "c2VjcmV0"},
            {"kty": "RSA", "kid": "small", "n": URL_SAFE_NO_PAD.encode([0xc5u8; 128]), "e": "AQAB"},
            {"kty": "RSA", "kid": "ps", "alg": "PS256", "n": rsa_n(), "e": "AQAB"},
            {"kty": "EC", "kid": "e1", "crv": "P-256", "x": x32, "y": x32},
            {"kty": "EC", "kid": "e2", "crv": "P-521", "x": x32, "y": x32},
            {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": x32},
            {"kty": "RSA", "kid": "bad", "n": "!!", "e": "AQAB"},
        ]});
        let set = KeySet::parse(
            doc.to_string().as_bytes(),
            &[Algorithm::RS256, Algorithm::ES256],
        )
        .unwrap();
        assert_eq!(set.kids(), vec!["r1", "e1"]);
        let why = |kid: &str| set.skipped_kid(kid).unwrap().reason.clone();
        assert!(why("enc1").contains("use=\"enc\""), "{}", why("enc1"));
        assert!(why("h1").contains("symmetric"));
        assert!(why("small").contains("shorter than 2048"));
        assert!(why("ps").contains("not in this issuer's signingAlgorithms"));
        assert!(why("e2").contains("P-521"));
        assert!(why("ed").contains("none of this issuer's signingAlgorithms"));
        assert!(why("bad").contains("base64url"));
        let r1 = set.by_kid("r1").next().unwrap();
        assert!(r1.accepts(Algorithm::RS256));
        assert!(!r1.accepts(Algorithm::RS512));
        assert!(!r1.accepts(Algorithm::ES256));
        let e1 = set.by_kid("e1").next().unwrap();
        assert!(e1.accepts(Algorithm::ES256) && !e1.accepts(Algorithm::ES384));
    }

    #[test]
    fn unusable_documents_fail() {
        for body in [
            "not json",
            "{}",
            r#"{"keys": []}"#,
            r#"{"keys": [{"kty":"oct","k":"AA"}]}"#,
        ] {
            assert!(
                KeySet::parse(body.as_bytes(), &[Algorithm::RS256]).is_err(),
                "{body}"
            );
        }
    }
}
