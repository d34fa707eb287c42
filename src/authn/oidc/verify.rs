//! Token checks that need no network: the unverified first look at a token (shape, header rules,
//! which issuer it claims), the issuer's compiled rules, and the mapping of verified claims to an
//! [`Identity`].

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use crate::authn::{check_name, AuthMethod, AuthnError, CredentialFacts, Identity};
use crate::config::jwt::JwtAuthenticator;

/// What can be read from a token before its signature is checked. Nothing here is trusted
/// except to pick the issuer and the key.
#[derive(Debug)]
pub(crate) struct Unverified {
    pub(crate) alg: Algorithm,
    pub(crate) kid: Option<String>,
    pub(crate) iss: String,
}

/// A value from a token made safe for a log line: quoted, escaped, at most 100 characters.
pub(crate) fn loggable(s: &str) -> String {
    let mut cut: String = s.chars().take(100).collect();
    if cut.len() < s.len() {
        cut.push('…');
    }
    format!("{cut:?}")
}

fn invalid(msg: impl Into<String>) -> AuthnError {
    AuthnError::InvalidToken(msg.into())
}

fn rejected(msg: impl Into<String>) -> AuthnError {
    AuthnError::TokenClaimsRejected(msg.into())
}

fn decode_part(part: &str, what: &str) -> Result<Map<String, Value>, AuthnError> {
    // base64url without padding, as JWS compact serialization requires.
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| invalid(format!("{what} is not base64url")))?;
    match read_unique(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(invalid(format!("{what} is not a JSON object"))),
        Err(JsonError::Duplicate { name, within }) if within.is_empty() => Err(invalid(format!(
            "duplicate claim {} in the {what}",
            loggable(&name)
        ))),
        Err(JsonError::Duplicate { name, within }) => Err(invalid(format!(
            "duplicate claim {} in the {what} (in {})",
            loggable(&name),
            loggable(&within)
        ))),
        Err(JsonError::Syntax) => Err(invalid(format!("{what} is not JSON"))),
    }
}

/// Why [`read_unique`] refuses a JSON document.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum JsonError {
    /// Two members of one object have the same name once unescaped. `within` names the
    /// members leading to that object, joined by `.` (empty at the top level).
    #[error("duplicate member {name:?} (in {within:?})")]
    Duplicate { name: String, within: String },
    #[error("not JSON")]
    Syntax,
}

/// Reads `json` as one JSON value, as `serde_json::from_slice::<Value>` does, but refuses it
/// when any object, at any depth, has two members of the same name (compared after
/// unescaping, so `"em\u0061il"` is `"email"`).
///
/// A token that names a claim twice means one thing to a parser that keeps the last value (as
/// serde_json does), another to one that keeps the first, and is refused by a third: one token
/// must not be two identities. RFC 7515 §4 and RFC 7519 §4 let a verifier refuse it.
///
/// The check is the map insertion the parse makes anyway (a hash lookup, also for a huge
/// object), so it costs no second pass over the token.
pub(crate) fn read_unique(json: &[u8]) -> Result<Value, JsonError> {
    use serde::de::DeserializeSeed;
    let mut duplicate = None;
    let mut de = serde_json::Deserializer::from_slice(json);
    let read = Unique(&mut duplicate)
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v));
    match (read, duplicate) {
        (Ok(v), _) => Ok(v),
        (Err(_), Some(d)) => Err(JsonError::Duplicate {
            name: d.name,
            within: d
                .within
                .iter()
                .rev()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join("."),
        }),
        (Err(_), None) => Err(JsonError::Syntax),
    }
}

/// The duplicate found, and the members leading to its object, innermost first (filled in as
/// the error travels out).
struct Duplicate {
    name: String,
    within: Vec<String>,
}

/// Any JSON value, read into a [`Value`].
struct Unique<'a>(&'a mut Option<Duplicate>);

impl<'de> serde::de::DeserializeSeed<'de> for Unique<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Unique<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // As serde_json's own `Value`: a float it cannot hold (never from its parser) is null.
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(v) = seq.next_element_seed(Unique(&mut *self.0))? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = Map::new();
        while let Some(name) = map.next_key::<String>()? {
            let value = match map.next_value_seed(Unique(&mut *self.0)) {
                Ok(v) => v,
                Err(e) => {
                    if let Some(d) = self.0.as_mut() {
                        d.within.push(name);
                    }
                    return Err(e);
                }
            };
            match members.entry(name) {
                serde_json::map::Entry::Vacant(slot) => {
                    slot.insert(value);
                }
                serde_json::map::Entry::Occupied(taken) => {
                    *self.0 = Some(Duplicate {
                        name: taken.key().clone(),
                        within: Vec::new(),
                    });
                    return Err(serde::de::Error::custom("duplicate member"));
                }
            }
        }
        Ok(Value::Object(members))
    }
}

/// Parses the algorithm name of a header, refusing `none` and HMAC outright.
pub(crate) fn header_alg(name: &str) -> Result<Algorithm, AuthnError> {
    match name {
        "RS256" => Ok(Algorithm::RS256),
        "RS384" => Ok(Algorithm::RS384),
        "RS512" => Ok(Algorithm::RS512),
        "PS256" => Ok(Algorithm::PS256),
        "PS384" => Ok(Algorithm::PS384),
        "PS512" => Ok(Algorithm::PS512),
        "ES256" => Ok(Algorithm::ES256),
        "ES384" => Ok(Algorithm::ES384),
        "EdDSA" => Ok(Algorithm::EdDSA),
        n if n.eq_ignore_ascii_case("none") => Err(invalid("alg none refused (unsigned token)")),
        n if n.to_ascii_uppercase().starts_with("HS") => Err(invalid(format!(
            "alg {} refused (HMAC; only public-key signatures are accepted)",
            loggable(n)
        ))),
        n => Err(invalid(format!("unsupported alg {}", loggable(n)))),
    }
}

/// The first, unverified look: JWS compact shape, header rules, `iss`.
///
/// Header rules: `alg` must be a public-key algorithm (never `none`, never `HS*`); `crit` is
/// refused (no extension is understood); `jku`, `x5u` and `jwk` are refused (keys come only from
/// the issuer's configured JWKS); `x5c` and `x5t` are ignored, never used to find a key.
pub(crate) fn parse_unverified(token: &str) -> Result<Unverified, AuthnError> {
    let parts: Vec<&str> = token.split('.').collect();
    match parts.len() {
        3 => {}
        5 => return Err(invalid("encrypted token (JWE) not supported")),
        n => {
            return Err(invalid(format!(
                "not a JWS compact serialization ({n} parts, expected 3)"
            )))
        }
    }
    if parts[2].is_empty() {
        return Err(invalid("empty signature"));
    }
    let header = decode_part(parts[0], "header")?;
    let alg = match header.get("alg") {
        Some(Value::String(a)) => header_alg(a)?,
        Some(_) => return Err(invalid("header alg is not a string")),
        None => return Err(invalid("header has no alg")),
    };
    if let Some(crit) = header.get("crit") {
        return Err(invalid(format!(
            "crit header refused (no JWS extension is understood): {}",
            loggable(&crit.to_string())
        )));
    }
    for refused in ["jku", "x5u", "jwk"] {
        if header.contains_key(refused) {
            return Err(invalid(format!(
                "{refused} header refused (keys are taken only from the issuer's configured JWKS)"
            )));
        }
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(invalid("header kid is not a string")),
    };
    let claims = decode_part(parts[1], "payload")?;
    let iss = match claims.get("iss") {
        Some(Value::String(i)) => i.clone(),
        Some(_) => return Err(invalid("iss claim is not a string")),
        None => return Err(invalid("iss claim missing")),
    };
    Ok(Unverified { alg, kid, iss })
}

/// One issuer's verification and mapping rules, compiled from its config entry.
#[derive(Clone, Debug)]
pub(crate) struct IssuerRules {
    pub(crate) url: String,
    pub(crate) audiences: Vec<String>,
    pub(crate) algorithms: Vec<Algorithm>,
    pub(crate) leeway: Duration,
    pub(crate) max_lifetime: Option<Duration>,
    pub(crate) max_token_bytes: usize,
    pub(crate) required: Vec<(String, String)>,
    pub(crate) username_claim: String,
    pub(crate) username_prefix: String,
    pub(crate) groups: Option<(String, String)>,
    pub(crate) uid_claim: Option<String>,
    pub(crate) claims_for_policy: Vec<String>,
}

/// Why an `authentication.jwt` entry cannot be compiled.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RulesError {
    /// What validation found, as `field: message`.
    #[error("{}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error(transparent)]
    Algorithm(#[from] AuthnError),
    #[error("claimMappings.username is required")]
    NoUsername,
    #[error("username.claim is required")]
    NoUsernameClaim,
}

impl IssuerRules {
    /// Compiles a validated entry. Re-checks what would otherwise be unsafe, so that an entry
    /// that skipped validation fails here rather than being half applied.
    pub(crate) fn from_config(c: &JwtAuthenticator) -> Result<IssuerRules, RulesError> {
        let mut problems = Vec::new();
        crate::config::jwt::validate_jwt(std::slice::from_ref(c), &mut |p, m| {
            problems.push(format!("{p}: {m}"))
        });
        // CA file problems are reported by the key source with the file's own error.
        problems.retain(|p| !p.contains(".issuer.certificateAuthority"));
        if !problems.is_empty() {
            return Err(RulesError::Invalid(problems));
        }
        let mut algorithms = Vec::new();
        for a in &c.signing_algorithms {
            algorithms.push(header_alg(a)?);
        }
        let username = c
            .claim_mappings
            .username
            .as_ref()
            .ok_or(RulesError::NoUsername)?;
        Ok(IssuerRules {
            url: c.issuer.url.clone(),
            audiences: c.issuer.audiences.clone(),
            algorithms,
            leeway: c.clock_leeway.get(),
            max_lifetime: c.max_token_lifetime.map(|d| d.get()),
            max_token_bytes: usize::try_from(c.max_token_bytes).unwrap_or(usize::MAX),
            required: c
                .claim_validation_rules
                .iter()
                .filter_map(|r| Some((r.claim.clone()?, r.required_value.clone()?)))
                .collect(),
            username_claim: username.claim.clone().ok_or(RulesError::NoUsernameClaim)?,
            username_prefix: username.prefix.clone().unwrap_or_default(),
            groups: c
                .claim_mappings
                .groups
                .as_ref()
                .and_then(|g| Some((g.claim.clone()?, g.prefix.clone().unwrap_or_default()))),
            uid_claim: c.claim_mappings.uid.as_ref().and_then(|u| u.claim.clone()),
            claims_for_policy: c.claims_for_policy.clone(),
        })
    }

    /// The library-side checks for a token signed with `alg`: that algorithm only, `iss` exact,
    /// `aud` any of the audiences, `exp` required, `nbf` honoured, with the clock leeway.
    pub(crate) fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = self.leeway.as_secs();
        v.set_issuer(&[&self.url]);
        v.set_audience(&self.audiences);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        v.validate_exp = true;
        v.validate_nbf = true;
        v.validate_aud = true;
        v
    }

    /// Applies the rules the library does not know to verified claims and builds the identity.
    /// Returns it with the token's audiences that this issuer accepts.
    pub(crate) fn map_claims(
        &self,
        claims: &Map<String, Value>,
        now: SystemTime,
    ) -> Result<(Identity, Vec<String>), AuthnError> {
        let now_s = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let leeway = self.leeway.as_secs();
        let exp = numeric(claims, "exp")?.ok_or_else(|| rejected("exp claim missing"))?;
        if exp.saturating_add(leeway) < now_s {
            return Err(AuthnError::TokenExpired(format!(
                "exp {exp} is {}s in the past",
                now_s - exp
            )));
        }
        let iat = numeric(claims, "iat")?;
        if let Some(iat) = iat {
            if iat > now_s.saturating_add(leeway) {
                return Err(rejected(format!(
                    "iat is {}s in the future (beyond the clock leeway of {leeway}s)",
                    iat - now_s
                )));
            }
        }
        if let Some(max) = self.max_lifetime {
            let iat =
                iat.ok_or_else(|| rejected("iat claim missing (required by maxTokenLifetime)"))?;
            let lifetime = exp.saturating_sub(iat);
            if lifetime > max.as_secs() {
                return Err(rejected(format!(
                    "token lifetime {lifetime}s (exp - iat) exceeds maxTokenLifetime {}s",
                    max.as_secs()
                )));
            }
        }
        for (claim, want) in &self.required {
            match claims.get(claim) {
                None => return Err(rejected(format!("required claim {claim:?} missing"))),
                Some(Value::String(v)) if v == want => {}
                Some(Value::String(_)) => {
                    return Err(rejected(format!(
                        "claim {claim:?} does not have the required value"
                    )))
                }
                Some(_) => {
                    return Err(rejected(format!(
                        "required claim {claim:?} is not a string"
                    )))
                }
            }
        }

        // username
        let claim = &self.username_claim;
        let value = match claims.get(claim) {
            None => return Err(rejected(format!("username claim {claim:?} missing"))),
            Some(Value::String(v)) => v,
            Some(_) => {
                return Err(rejected(format!(
                    "username claim {claim:?} is not a string"
                )))
            }
        };
        if value.is_empty() {
            return Err(rejected(format!("username claim {claim:?} is empty")));
        }
        if claim == "email" {
            // kube-apiserver: when email_verified is present it must be true.
            match claims.get("email_verified") {
                None | Some(Value::Bool(true)) => {}
                Some(Value::Bool(false)) => {
                    return Err(rejected("email not verified (email_verified is false)"))
                }
                Some(_) => return Err(rejected("email_verified claim is not a boolean")),
            }
        }
        let user = format!("{}{value}", self.username_prefix);
        check_name("user name", &user)?;
        reserved("user name", &user, &self.username_prefix)?;

        // groups
        let mut groups = Vec::new();
        if let Some((claim, prefix)) = &self.groups {
            let values: Vec<&str> = match claims.get(claim) {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::String(s)) => vec![s.as_str()],
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|v| v.as_str())
                    .collect::<Option<Vec<&str>>>()
                    .ok_or_else(|| {
                        rejected(format!(
                            "groups claim {claim:?} holds a value that is not a string"
                        ))
                    })?,
                Some(_) => {
                    return Err(rejected(format!(
                        "groups claim {claim:?} is not a string or a list of strings"
                    )))
                }
            };
            for g in values {
                let group = format!("{prefix}{g}");
                check_name("group", &group)?;
                reserved("group", &group, prefix)?;
                if !groups.contains(&group) {
                    groups.push(group);
                }
            }
        }

        // uid
        let uid = match &self.uid_claim {
            None => None,
            Some(claim) => match claims.get(claim) {
                None => return Err(rejected(format!("uid claim {claim:?} missing"))),
                Some(Value::String(v)) => {
                    check_name("uid", v)?;
                    Some(v.clone())
                }
                Some(_) => return Err(rejected(format!("uid claim {claim:?} is not a string"))),
            },
        };

        // facts
        let string = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_owned);
        let mut policy = BTreeMap::new();
        for name in &self.claims_for_policy {
            if let Some(values) = claims.get(name).and_then(string_or_list) {
                policy.insert(name.clone(), values);
            }
        }
        let facts = CredentialFacts {
            issuer: Some(self.url.clone()),
            token_id: string("jti"),
            issued_at: iat.map(|s| UNIX_EPOCH + Duration::from_secs(s)),
            amr: claims
                .get("amr")
                .and_then(string_or_list)
                .unwrap_or_default(),
            cnf_x5t_s256: claims
                .get("cnf")
                .and_then(|c| c.get("x5t#S256"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            claims: policy,
            session_id: string("sid"),
            clock_leeway: self.leeway,
        };
        let audiences = match claims.get("aud") {
            Some(Value::String(a)) => vec![a.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        };
        let accepted: Vec<String> = audiences
            .into_iter()
            .filter(|a| self.audiences.contains(a))
            .collect();
        if accepted.is_empty() {
            return Err(rejected("aud holds none of the issuer's audiences"));
        }
        Ok((
            Identity {
                user,
                uid,
                groups,
                extra: BTreeMap::new(),
                method: AuthMethod::Oidc {
                    issuer: self.url.clone(),
                },
                expires_at: Some(UNIX_EPOCH + Duration::from_secs(exp)),
                facts,
                derived: Default::default(),
            },
            accepted,
        ))
    }
}

/// A token never maps to kube-apiserver's reserved `system:` names unless the configured prefix
/// itself puts it there.
fn reserved(kind: &str, name: &str, prefix: &str) -> Result<(), AuthnError> {
    if name.starts_with("system:") && !prefix.starts_with("system:") {
        return Err(AuthnError::InvalidIdentity(format!(
            "{kind} {} is in the reserved system: namespace",
            loggable(name)
        )));
    }
    Ok(())
}

fn string_or_list(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map(str::to_owned))
            .collect(),
        _ => None,
    }
}

/// A NumericDate claim (seconds; fractions are truncated).
fn numeric(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, AuthnError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(u) = n.as_u64() {
                Ok(Some(u))
            } else if let Some(f) = n.as_f64().filter(|f| f.is_finite() && *f >= 0.0) {
                Ok(Some(f as u64))
            } else {
                Err(rejected(format!("{name} claim is not a valid time")))
            }
        }
        Some(_) => Err(rejected(format!("{name} claim is not a number"))),
    }
}

/// A library error after a key was found, as the precise reason for the log.
pub(crate) fn map_jwt_error(e: &jsonwebtoken::errors::Error, issuer: &str) -> AuthnError {
    match e.kind() {
        ErrorKind::ExpiredSignature => AuthnError::TokenExpired("exp has passed".into()),
        ErrorKind::ImmatureSignature => rejected("nbf is in the future (beyond the clock leeway)"),
        ErrorKind::InvalidAudience => rejected("aud holds none of the issuer's audiences"),
        ErrorKind::InvalidIssuer => rejected(format!("iss is not {}", loggable(issuer))),
        ErrorKind::MissingRequiredClaim(c) => rejected(format!("{c} claim missing")),
        ErrorKind::InvalidClaimFormat(c) => rejected(format!("{c} claim is malformed")),
        ErrorKind::InvalidSignature => {
            AuthnError::BadSignature(format!("signature does not verify (issuer {issuer})"))
        }
        ErrorKind::InvalidAlgorithm => invalid("alg does not match the key"),
        ErrorKind::Base64(_) => invalid("token part is not base64url"),
        ErrorKind::Json(_) | ErrorKind::Utf8(_) => invalid("header or payload not understood"),
        ErrorKind::InvalidToken => invalid("malformed token"),
        ErrorKind::InvalidRsaKey(_) | ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidEddsaKey => {
            invalid(format!(
                "issuer {issuer} published a key that cannot verify"
            ))
        }
        other => invalid(format!("token rejected: {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn tok(header: Value, claims: Value) -> String {
        format!("{}.{}.c2ln", b64(&header), b64(&claims))
    }

    fn err(token: &str) -> String {
        parse_unverified(token).unwrap_err().to_string()
    }

    #[test]
    fn header_rules() {
        let c = json!({"iss": "https://idp"});
        let ok = parse_unverified(&tok(json!({"alg": "ES256", "kid": "k"}), c.clone())).unwrap();
        assert_eq!(
            (ok.alg, ok.kid.as_deref(), ok.iss.as_str()),
            (Algorithm::ES256, Some("k"), "https://idp")
        );
        assert!(err(&tok(json!({"alg": "none"}), c.clone())).contains("alg none refused"));
        assert!(err(&tok(json!({"alg": "HS256"}), c.clone())).contains("HMAC"));
        assert!(err(&tok(json!({"alg": "XX1"}), c.clone())).contains("unsupported alg"));
        assert!(err(&tok(json!({}), c.clone())).contains("no alg"));
        assert!(
            err(&tok(json!({"alg": "RS256", "crit": ["exp"]}), c.clone()))
                .contains("crit header refused")
        );
        assert!(err(&tok(
            json!({"alg": "RS256", "jku": "https://evil"}),
            c.clone()
        ))
        .contains("jku header refused"));
        assert!(err(&tok(
            json!({"alg": "RS256", "x5u": "https://evil"}),
            c.clone()
        ))
        .contains("x5u header refused"));
        assert!(
            err(&tok(json!({"alg": "RS256", "jwk": {}}), c.clone())).contains("jwk header refused")
        );
        assert!(
            err(&tok(json!({"alg": "RS256", "kid": 1}), c.clone())).contains("kid is not a string")
        );
        assert!(err(&tok(json!({"alg": "RS256"}), json!({}))).contains("iss claim missing"));
        assert!(err(&tok(json!({"alg": "RS256"}), json!({"iss": 1})))
            .contains("iss claim is not a string"));
    }

    #[test]
    fn shape_rules() {
        assert!(err("a.b").contains("2 parts"));
        assert!(err("a.b.c.d.e").contains("JWE"));
        assert!(err("!!!.e30.c2ln").contains("header is not base64url"));
        let h = b64(&json!({"alg": "RS256"}));
        assert!(err(&format!("{h}.!!!.c2ln")).contains("payload is not base64url"));
        assert!(
            err(&format!("{h}.{}.c2ln", URL_SAFE_NO_PAD.encode("not json")))
                .contains("payload is not JSON")
        );
        assert!(err(&format!("{h}.{}.c2ln", URL_SAFE_NO_PAD.encode("[1]")))
            .contains("not a JSON object"));
        assert!(err(&format!("{h}.e30.")).contains("empty signature"));
        // Padding is not base64url as JWS uses it.
        assert!(err(&format!("{h}=.e30.c2ln")).contains("base64url"));
    }

    fn rules() -> IssuerRules {
        IssuerRules {
            url: "https://idp".into(),
            audiences: vec!["k8s".into()],
            algorithms: vec![Algorithm::RS256],
            leeway: Duration::from_secs(30),
            max_lifetime: Some(Duration::from_secs(3600)),
            max_token_bytes: 16384,
            required: vec![("hd".into(), "example.com".into())],
            username_claim: "email".into(),
            username_prefix: "".into(),
            groups: Some(("groups".into(), "oidc:".into())),
            uid_claim: Some("sub".into()),
            claims_for_policy: vec!["acr".into(), "roles".into(), "n".into()],
        }
    }

    fn now() -> (SystemTime, u64) {
        let t = SystemTime::now();
        (t, t.duration_since(UNIX_EPOCH).unwrap().as_secs())
    }

    fn claims(extra: Value) -> Map<String, Value> {
        let (_, n) = now();
        let mut c = json!({
            "iss": "https://idp", "aud": ["k8s", "other"], "sub": "u-1", "exp": n + 600, "iat": n,
            "email": "alice@example.com", "email_verified": true, "hd": "example.com",
            "groups": ["devs", "ops"], "jti": "j-1", "amr": ["pwd", "mfa"],
            "cnf": {"x5t#S256": "abc"}, "acr": "gold", "roles": ["a", "b"], "n": 5
        });
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c.as_object().unwrap().clone()
    }

    fn map(extra: Value) -> Result<(Identity, Vec<String>), AuthnError> {
        rules().map_claims(&claims(extra), now().0)
    }

    #[test]
    fn maps_a_good_token() {
        let (id, aud) = map(json!({})).unwrap();
        assert_eq!(id.user(), "alice@example.com");
        assert_eq!(id.groups(), ["oidc:devs", "oidc:ops"]);
        assert_eq!(id.uid(), Some("u-1"));
        assert_eq!(aud, vec!["k8s"]);
        assert_eq!(
            id.method(),
            &AuthMethod::Oidc {
                issuer: "https://idp".into()
            }
        );
        let f = id.facts();
        assert_eq!(f.token_id.as_deref(), Some("j-1"));
        assert_eq!(f.amr, ["pwd", "mfa"]);
        assert_eq!(f.cnf_x5t_s256.as_deref(), Some("abc"));
        assert_eq!(f.claims.get("acr").unwrap(), &["gold"]);
        assert_eq!(f.claims.get("roles").unwrap(), &["a", "b"]);
        assert!(
            !f.claims.contains_key("n"),
            "non-string claims are not exposed"
        );
        assert!(id.expires_at().unwrap() > SystemTime::now());
        // email_verified absent is fine (kube-apiserver's rule).
        assert!(map(json!({"email_verified": null})).is_ok());
        // a single group string
        assert_eq!(
            map(json!({"groups": "devs"})).unwrap().0.groups(),
            ["oidc:devs"]
        );
    }

    #[test]
    fn refuses_bad_claims_precisely() {
        let (_, n) = now();
        let cases = [
            (json!({"email_verified": false}), "email not verified"),
            (
                json!({"email_verified": "true"}),
                "email_verified claim is not a boolean",
            ),
            (
                json!({"hd": "evil.com"}),
                "does not have the required value",
            ),
            (json!({"hd": null}), "required claim \"hd\" missing"),
            (json!({"hd": ["example.com"]}), "is not a string"),
            (json!({"email": null}), "username claim \"email\" missing"),
            (json!({"email": ""}), "is empty"),
            (json!({"email": 5}), "is not a string"),
            (json!({"iat": n + 3600}), "iat is 3600s in the future"),
            (
                json!({"iat": n - 10, "exp": n + 7200}),
                "exceeds maxTokenLifetime",
            ),
            (
                json!({"iat": null}),
                "iat claim missing (required by maxTokenLifetime)",
            ),
            (json!({"groups": [1]}), "not a string"),
            (json!({"groups": {"a": 1}}), "not a string or a list"),
            (json!({"sub": null}), "uid claim \"sub\" missing"),
            (json!({"aud": "other"}), "none of the issuer's audiences"),
            (json!({"exp": n - 100}), "in the past"),
        ];
        for (extra, want) in cases {
            let got = map(extra.clone()).unwrap_err().to_string();
            assert!(got.contains(want), "{extra}: {got}");
        }
    }

    #[test]
    fn names_are_checked() {
        let got = map(json!({"email": "sys\u{7}tem"})).unwrap_err();
        assert!(matches!(got, AuthnError::InvalidIdentity(_)), "{got}");
        let got = map(json!({"email": "system:admin"})).unwrap_err();
        assert!(got.to_string().contains("reserved system:"), "{got}");
        let mut r = rules();
        r.groups = Some(("groups".into(), "".into()));
        let got = r
            .map_claims(&claims(json!({"groups": ["system:masters"]})), now().0)
            .unwrap_err();
        assert!(got.to_string().contains("reserved system:"), "{got}");
        // A prefix that puts names there explicitly is the operator's choice.
        r.groups = Some(("groups".into(), "system:oidc:".into()));
        let (id, _) = r.map_claims(&claims(json!({})), now().0).unwrap();
        assert_eq!(id.groups(), ["system:oidc:devs", "system:oidc:ops"]);
    }

    #[test]
    fn a_member_named_twice_in_any_object_is_found_and_placed() {
        let dup = |name: &str, within: &str| {
            Err(JsonError::Duplicate {
                name: name.into(),
                within: within.into(),
            })
        };
        let cases = [
            (r#"{"a":1,"a":1}"#, dup("a", "")),
            (r#"{"a":1,"b":2,"a":3}"#, dup("a", "")),
            (
                r#"{"cnf":{"x5t#S256":"a","x5t#S256":"b"}}"#,
                dup("x5t#S256", "cnf"),
            ),
            (r#"{"l":[1,{"k":{"a":1,"b":[],"a":2}}]}"#, dup("a", "l.k")),
            (r#"[{"a":1},{"a":1,"a":2}]"#, dup("a", "")),
            (r#"{"email":"x","em\u0061il":"y"}"#, dup("email", "")),
            (r#"{"\u00e9":1,"é":2}"#, dup("é", "")),
            (r#"{"a\/b":1,"a/b":2}"#, dup("a/b", "")),
            (r#"{"a":{"x":1},"b":{"x":2}}"#, Ok(())),
            (r#"{"x":{"x":{"x":1}}}"#, Ok(())),
            (r#"[{"x":1},{"x":2}]"#, Ok(())),
            (r#"{"ab":1,"a\u0062c":2,"a":{}}"#, Ok(())),
            (r#"{}"#, Ok(())),
            (r#""text""#, Ok(())),
            (r#"{"a":1,}"#, Err(JsonError::Syntax)),
            (r#"{"a":1} {}"#, Err(JsonError::Syntax)),
            (r#"{"a":1,"b":2"#, Err(JsonError::Syntax)),
            // Found where it is, before the document turns out to be cut short.
            (r#"{"a":1,"a":2"#, dup("a", "")),
            (r#"{"\ud800":1}"#, Err(JsonError::Syntax)),
            ("", Err(JsonError::Syntax)),
        ];
        for (json, want) in cases {
            assert_eq!(read_unique(json.as_bytes()).map(|_| ()), want, "{json}");
        }
        // Deep nesting is refused by the parser's depth limit, not by the stack.
        let deep = format!("{}1{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000));
        assert_eq!(read_unique(deep.as_bytes()), Err(JsonError::Syntax));
        // One object with many members: each name costs one hash lookup.
        let many: Vec<String> = (0..50_000).map(|i| format!(r#""k{i}":{i}"#)).collect();
        let object = format!("{{{}}}", many.join(","));
        assert_eq!(read_unique(object.as_bytes()).map(|_| ()), Ok(()));
        let again = format!("{{{},\"k7\":0}}", many.join(","));
        assert_eq!(read_unique(again.as_bytes()).map(|_| ()), dup("k7", ""));
    }

    #[test]
    fn a_document_without_duplicates_reads_as_serde_json_reads_it() {
        let docs = [
            r#"{"iss":"https://idp","exp":1765003600,"n":-5,"big":18446744073709551615}"#,
            r#"{"f":1.5,"e":1e300,"tiny":5e-324,"neg":-0.0,"frac":0.1}"#,
            r#"{"a":[1,"x",null,true,false,{"b":[[],{}]}],"s":"\u00e9\n\ud83d\ude00"}"#,
            r#"{"z":1,"a":2,"m":{"y":1,"b":2}}"#,
            r#"[1,2,{"a":null}]"#,
            r#"  "text"  "#,
            "123",
        ];
        for doc in docs {
            let ours = read_unique(doc.as_bytes()).unwrap();
            let theirs: Value = serde_json::from_slice(doc.as_bytes()).unwrap();
            assert_eq!(ours, theirs, "{doc}");
            // Member order too (the gateway's serde_json keeps it).
            assert_eq!(ours.to_string(), theirs.to_string(), "{doc}");
        }
    }

    #[test]
    fn loggable_truncates_and_escapes() {
        assert_eq!(loggable("a\nb"), "\"a\\nb\"");
        assert!(loggable(&"x".repeat(500)).len() < 120);
    }
}
