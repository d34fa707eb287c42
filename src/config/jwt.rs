//! `authentication.jwt[]`: JWT (OIDC) token authenticators, in the shape of kube-apiserver's
//! `AuthenticationConfiguration.jwt[]` (`apiserver.config.k8s.io/v1beta1`), so that an operator can
//! carry an existing entry over, plus a few gateway additions (signing algorithms, clock leeway,
//! token lifetime and size limits, claims exposed to policy).
//!
//! CEL fields (`expression`, `valueExpression`, `userValidationRules`) parse, so that a carried
//! over file gets a clear message instead of "unknown field", but are refused by validation:
//! ztgate does not evaluate CEL yet.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration::GoDuration;
use crate::tls::client::check_https_url;
use crate::tls::pem::parse_ca_pem;

/// The signing algorithms accepted when `signingAlgorithms` is not set.
pub const DEFAULT_SIGNING_ALGORITHMS: [&str; 2] = ["RS256", "ES256"];
/// Every algorithm that may be listed in `signingAlgorithms`.
pub const SUPPORTED_SIGNING_ALGORITHMS: [&str; 9] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];
/// Default `clockLeeway`.
pub const DEFAULT_CLOCK_LEEWAY: Duration = Duration::from_secs(30);
/// Largest `clockLeeway` accepted.
pub const MAX_CLOCK_LEEWAY: Duration = Duration::from_secs(300);
/// Default `maxTokenBytes`.
pub const DEFAULT_MAX_TOKEN_BYTES: u64 = 16 * 1024;
/// Bounds of `maxTokenBytes`.
pub const MIN_MAX_TOKEN_BYTES: u64 = 512;
pub const MAX_MAX_TOKEN_BYTES: u64 = 1024 * 1024;
/// kube-apiserver's limit on the number of JWT authenticators.
pub const MAX_AUTHENTICATORS: usize = 64;
/// The only `audienceMatchPolicy` there is.
pub const MATCH_ANY: &str = "MatchAny";

/// One JWT issuer and how its tokens map to a Kubernetes user.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwtAuthenticator {
    pub issuer: JwtIssuer,
    /// Claims that must hold a given value.
    #[serde(default)]
    pub claim_validation_rules: Vec<ClaimValidationRule>,
    #[serde(default)]
    pub claim_mappings: ClaimMappings,
    /// kube-apiserver's CEL rules on the mapped user; parsed only to be refused.
    #[serde(default)]
    pub user_validation_rules: Vec<UserValidationRule>,
    /// JWS `alg` values accepted from this issuer (gateway addition). Never `none` or `HS*`.
    #[serde(default = "default_signing_algorithms")]
    pub signing_algorithms: Vec<String>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat` (gateway addition). Default 30s.
    #[serde(default = "default_clock_leeway")]
    pub clock_leeway: GoDuration,
    /// Tokens whose `exp - iat` exceeds this are refused (gateway addition); requires `iat`.
    #[serde(default)]
    pub max_token_lifetime: Option<GoDuration>,
    /// Larger tokens are refused before being parsed (gateway addition). Default 16384.
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: u64,
    /// Claim names whose string or string-list values are exposed to policy (gateway addition).
    #[serde(default)]
    pub claims_for_policy: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwtIssuer {
    /// Must equal the tokens' `iss` and the discovery document's `issuer`, exactly.
    pub url: String,
    /// Where to fetch the discovery document instead of `{url}/.well-known/openid-configuration`.
    #[serde(default, rename = "discoveryURL")]
    pub discovery_url: Option<String>,
    /// At least one must be in a token's `aud`.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// `MatchAny`; required when there is more than one audience.
    #[serde(default)]
    pub audience_match_policy: Option<String>,
    /// PEM CA certificates for the discovery and JWKS endpoints (inline, as in kube-apiserver).
    #[serde(default)]
    pub certificate_authority: Option<String>,
    /// The same, read from a file (gateway addition).
    #[serde(default)]
    pub certificate_authority_file: Option<PathBuf>,
}

/// `{claim, requiredValue}`, or kube-apiserver's CEL form `{expression, message}` (refused).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClaimValidationRule {
    #[serde(default)]
    pub claim: Option<String>,
    #[serde(default)]
    pub required_value: Option<String>,
    #[serde(default)]
    pub expression: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UserValidationRule {
    #[serde(default)]
    pub expression: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClaimMappings {
    /// Required.
    #[serde(default)]
    pub username: Option<PrefixedClaimOrExpression>,
    #[serde(default)]
    pub groups: Option<PrefixedClaimOrExpression>,
    #[serde(default)]
    pub uid: Option<ClaimOrExpression>,
    /// Needs CEL (`valueExpression`), so every entry is refused for now.
    #[serde(default)]
    pub extra: Vec<ExtraMapping>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PrefixedClaimOrExpression {
    #[serde(default)]
    pub claim: Option<String>,
    /// Required when `claim` is set; `""` means no prefix.
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub expression: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClaimOrExpression {
    #[serde(default)]
    pub claim: Option<String>,
    #[serde(default)]
    pub expression: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExtraMapping {
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub value_expression: Option<String>,
}

/// `authentication.tokenReview`: serve kube-apiserver's webhook token authenticator.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TokenReviewConfig {
    /// Entry of `listener.clientCertificateBundles` that must sign the caller's (kube-apiserver's)
    /// client certificate.
    pub caller_bundle: String,
}

pub(crate) fn default_signing_algorithms() -> Vec<String> {
    DEFAULT_SIGNING_ALGORITHMS
        .iter()
        .map(|s| s.to_string())
        .collect()
}
fn default_clock_leeway() -> GoDuration {
    GoDuration(DEFAULT_CLOCK_LEEWAY)
}
fn default_max_token_bytes() -> u64 {
    DEFAULT_MAX_TOKEN_BYTES
}

impl JwtAuthenticator {
    /// The URL the discovery document is fetched from.
    pub fn discovery_url(&self) -> String {
        match &self.issuer.discovery_url {
            Some(u) => u.clone(),
            None => format!(
                "{}/.well-known/openid-configuration",
                self.issuer.url.trim_end_matches('/')
            ),
        }
    }

    /// The CA PEM (inline, or read from `certificateAuthorityFile`).
    pub fn ca_pem(&self) -> Result<Vec<u8>, IssuerCaError> {
        match (
            &self.issuer.certificate_authority,
            &self.issuer.certificate_authority_file,
        ) {
            (Some(pem), None) => Ok(pem.as_bytes().to_vec()),
            (None, Some(file)) => std::fs::read(file).map_err(|source| IssuerCaError::Read {
                path: file.clone(),
                source,
            }),
            (Some(_), Some(_)) => Err(IssuerCaError::Both),
            (None, None) => Err(IssuerCaError::Missing {
                issuer: self.issuer.url.clone(),
            }),
        }
    }

    /// Makes a relative `certificateAuthorityFile` relative to `base_dir` (the config file's
    /// directory). The config loader calls this for every entry.
    pub fn resolve_paths(&mut self, base_dir: &std::path::Path) {
        if let Some(p) = &mut self.issuer.certificate_authority_file {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base_dir.join(&*p);
            }
        }
    }
}

/// Why an issuer's CA could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssuerCaError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("set certificateAuthority or certificateAuthorityFile, not both")]
    Both,
    #[error("{}", no_ca_message(issuer))]
    Missing { issuer: String },
}

fn no_ca_message(url: &str) -> String {
    format!(
        "required: ztgate has no system trust store, so set certificateAuthority (PEM) or \
         certificateAuthorityFile to the CA that signs the TLS certificate of {url}"
    )
}

fn cel(path: &str) -> String {
    format!("CEL expressions are not supported by ztgate (field {path})")
}

/// kube-apiserver's rule for extra keys: a lowercase domain-prefixed path (`example.org/foo`),
/// not under k8s.io or kubernetes.io.
fn check_extra_key(key: &str) -> Result<(), ExtraKeyError> {
    if key.is_empty() {
        return Err(ExtraKeyError::Empty);
    }
    if key != key.to_lowercase() {
        return Err(ExtraKeyError::NotLowercase(key.to_owned()));
    }
    let Some((domain, path)) = key.split_once('/') else {
        return Err(ExtraKeyError::NoDomain(key.to_owned()));
    };
    let labels_ok = domain.len() <= 253
        && domain.split('.').all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        });
    if !labels_ok {
        return Err(ExtraKeyError::BadDomain {
            key: key.to_owned(),
            domain: domain.to_owned(),
        });
    }
    if path.is_empty() {
        return Err(ExtraKeyError::NoPath(key.to_owned()));
    }
    for reserved in ["k8s.io", "kubernetes.io"] {
        if domain == reserved || domain.ends_with(&format!(".{reserved}")) {
            return Err(ExtraKeyError::Reserved {
                key: key.to_owned(),
                reserved,
            });
        }
    }
    Ok(())
}

/// Why a `claimMappings.extra` key is refused.
#[derive(Debug, thiserror::Error)]
enum ExtraKeyError {
    #[error("must not be empty")]
    Empty,
    #[error("{0:?} must be lowercase")]
    NotLowercase(String),
    #[error("{0:?} must be a domain-prefixed path, e.g. example.org/foo")]
    NoDomain(String),
    #[error("{key:?}: {domain:?} is not a valid RFC 1123 subdomain")]
    BadDomain { key: String, domain: String },
    #[error("{0:?} must have a path after the domain")]
    NoPath(String),
    #[error("{key:?}: {reserved} is reserved for Kubernetes use")]
    Reserved { key: String, reserved: &'static str },
}

/// Validates `authentication.jwt`; `err(path, message)` is called for every problem.
pub fn validate_jwt(list: &[JwtAuthenticator], err: &mut dyn FnMut(String, String)) {
    if list.len() > MAX_AUTHENTICATORS {
        err(
            "authentication.jwt".into(),
            format!(
                "{} entries; at most {MAX_AUTHENTICATORS} are allowed",
                list.len()
            ),
        );
    }
    let mut urls: Vec<&str> = Vec::new();
    let mut discovery: Vec<&str> = Vec::new();
    for (i, a) in list.iter().enumerate() {
        let base = format!("authentication.jwt[{i}]");
        validate_one(&base, a, err);
        let url = a.issuer.url.as_str();
        if let Some(first) = urls.iter().position(|u| *u == url) {
            err(
                format!("{base}.issuer.url"),
                format!("duplicate issuer {url:?}; already used by authentication.jwt[{first}]"),
            );
        }
        urls.push(url);
        if let Some(d) = &a.issuer.discovery_url {
            if let Some(first) = discovery.iter().position(|u| *u == d) {
                err(
                    format!("{base}.issuer.discoveryURL"),
                    format!(
                        "duplicate discoveryURL {d:?}; already used by authentication.jwt[{first}]"
                    ),
                );
            }
            discovery.push(d);
        }
    }
}

fn validate_one(base: &str, a: &JwtAuthenticator, err: &mut dyn FnMut(String, String)) {
    let mut e = |field: &str, msg: String| err(format!("{base}.{field}"), msg);
    let iss = &a.issuer;

    // issuer
    if iss.url.is_empty() {
        e(
            "issuer.url",
            "must not be empty, e.g. https://idp.example.com".into(),
        );
    } else if let Err(m) = check_https_url(&iss.url) {
        e("issuer.url", m.to_string());
    }
    if let Some(d) = &iss.discovery_url {
        if let Err(m) = check_https_url(d) {
            e("issuer.discoveryURL", m.to_string());
        } else if d.trim_end_matches('/') == iss.url.trim_end_matches('/') {
            e(
                "issuer.discoveryURL",
                "must differ from issuer.url (it is the full URL of the discovery document, \
                 e.g. https://discovery.example.com/.well-known/openid-configuration)"
                    .into(),
            );
        }
    }
    if iss.audiences.is_empty() {
        e(
            "issuer.audiences",
            "at least one audience is required (the client id tokens are issued to)".into(),
        );
    }
    let mut seen: Vec<&str> = Vec::new();
    for (j, aud) in iss.audiences.iter().enumerate() {
        if aud.is_empty() {
            e(
                &format!("issuer.audiences[{j}]"),
                "must not be empty".into(),
            );
        } else if seen.contains(&aud.as_str()) {
            e(
                &format!("issuer.audiences[{j}]"),
                format!("duplicate audience {aud:?}"),
            );
        }
        seen.push(aud);
    }
    match iss.audience_match_policy.as_deref() {
        None | Some("") if iss.audiences.len() > 1 => e(
            "issuer.audienceMatchPolicy",
            "must be set to MatchAny when more than one audience is listed".into(),
        ),
        None | Some("") | Some(MATCH_ANY) => {}
        Some(other) => e(
            "issuer.audienceMatchPolicy",
            format!("unsupported value {other:?}; the only policy is MatchAny"),
        ),
    }
    match (&iss.certificate_authority, &iss.certificate_authority_file) {
        (Some(_), Some(_)) => e(
            "issuer.certificateAuthorityFile",
            "set certificateAuthority or certificateAuthorityFile, not both".into(),
        ),
        (None, None) => e("issuer.certificateAuthority", no_ca_message(&iss.url)),
        (Some(pem), None) => {
            if let Err(m) = parse_ca_pem(pem.as_bytes()) {
                e("issuer.certificateAuthority", m.to_string());
            }
        }
        (None, Some(file)) => match std::fs::read(file) {
            Ok(pem) => {
                if let Err(m) = parse_ca_pem(&pem) {
                    e(
                        "issuer.certificateAuthorityFile",
                        format!("{}: {m}", file.display()),
                    );
                }
            }
            Err(io) => e(
                "issuer.certificateAuthorityFile",
                format!("cannot read {}: {io}", file.display()),
            ),
        },
    }

    // claimValidationRules
    let mut claims_seen: Vec<&str> = Vec::new();
    for (j, r) in a.claim_validation_rules.iter().enumerate() {
        let p = format!("claimValidationRules[{j}]");
        if r.expression.is_some() {
            let f = format!("{p}.expression");
            e(&f, cel(&format!("{base}.{f}")));
        }
        if r.message.is_some() && r.expression.is_none() {
            e(
                &format!("{p}.message"),
                "message goes with expression; use claim and requiredValue".into(),
            );
        }
        if r.expression.is_some() {
            continue;
        }
        match r.claim.as_deref() {
            None | Some("") => e(&format!("{p}.claim"), "required".into()),
            Some(c) => {
                if claims_seen.contains(&c) {
                    e(&format!("{p}.claim"), format!("duplicate claim {c:?}"));
                }
                claims_seen.push(c);
            }
        }
        if r.required_value.is_none() {
            e(&format!("{p}.requiredValue"), "required".into());
        }
    }

    // claimMappings
    let m = &a.claim_mappings;
    match &m.username {
        None => e(
            "claimMappings.username",
            "required: set claim and prefix, e.g. {claim: sub, prefix: \"oidc:\"}".into(),
        ),
        Some(u) => {
            if u.expression.is_some() {
                let f = "claimMappings.username.expression";
                e(f, cel(&format!("{base}.{f}")));
            }
            match u.claim.as_deref() {
                Some("") => e("claimMappings.username.claim", "must not be empty".into()),
                Some(_) if u.prefix.is_none() => e(
                    "claimMappings.username.prefix",
                    "required when username.claim is set (as in kube-apiserver); set it to \"\" \
                     explicitly if no prefix is wanted"
                        .into(),
                ),
                Some(_) => {}
                None if u.expression.is_none() => {
                    e("claimMappings.username.claim", "required".into())
                }
                None => {}
            }
            if u.claim.is_none() && u.prefix.is_some() {
                e(
                    "claimMappings.username.prefix",
                    "prefix needs username.claim".into(),
                );
            }
        }
    }
    if let Some(g) = &m.groups {
        if g.expression.is_some() {
            let f = "claimMappings.groups.expression";
            e(f, cel(&format!("{base}.{f}")));
        }
        match g.claim.as_deref() {
            Some("") => e("claimMappings.groups.claim", "must not be empty".into()),
            Some(_) if g.prefix.is_none() => e(
                "claimMappings.groups.prefix",
                "required when groups.claim is set (as in kube-apiserver); set it to \"\" \
                 explicitly if no prefix is wanted"
                    .into(),
            ),
            Some(_) => {}
            None if g.prefix.is_some() => e(
                "claimMappings.groups.prefix",
                "prefix needs groups.claim".into(),
            ),
            None => {}
        }
    }
    if let Some(u) = &m.uid {
        if u.expression.is_some() {
            let f = "claimMappings.uid.expression";
            e(f, cel(&format!("{base}.{f}")));
        }
        if u.claim.as_deref() == Some("") {
            e("claimMappings.uid.claim", "must not be empty".into());
        }
    }
    let mut keys_seen: Vec<&str> = Vec::new();
    for (j, x) in m.extra.iter().enumerate() {
        let p = format!("claimMappings.extra[{j}]");
        if let Err(msg) = check_extra_key(&x.key) {
            e(&format!("{p}.key"), msg.to_string());
        } else if keys_seen.contains(&x.key.as_str()) {
            e(&format!("{p}.key"), format!("duplicate key {:?}", x.key));
        }
        keys_seen.push(&x.key);
        let f = format!("{p}.valueExpression");
        e(&f, cel(&format!("{base}.{f}")));
    }
    for (j, _) in a.user_validation_rules.iter().enumerate() {
        let f = format!("userValidationRules[{j}].expression");
        e(&f, cel(&format!("{base}.{f}")));
    }

    // gateway additions
    if a.signing_algorithms.is_empty() {
        e(
            "signingAlgorithms",
            format!(
                "must list at least one algorithm; supported: {}",
                SUPPORTED_SIGNING_ALGORITHMS.join(", ")
            ),
        );
    }
    let mut algs_seen: Vec<&str> = Vec::new();
    for (j, alg) in a.signing_algorithms.iter().enumerate() {
        let f = format!("signingAlgorithms[{j}]");
        if alg.eq_ignore_ascii_case("none") {
            e(&f, "\"none\" (unsigned tokens) is never accepted".into());
        } else if alg.to_ascii_uppercase().starts_with("HS") {
            e(
                &f,
                format!(
                    "{alg:?} is never accepted: HMAC needs a shared secret, and a public key used \
                     as one lets anyone forge tokens"
                ),
            );
        } else if !SUPPORTED_SIGNING_ALGORITHMS.contains(&alg.as_str()) {
            e(
                &f,
                format!(
                    "unsupported algorithm {alg:?}; supported: {}",
                    SUPPORTED_SIGNING_ALGORITHMS.join(", ")
                ),
            );
        } else if algs_seen.contains(&alg.as_str()) {
            e(&f, format!("duplicate algorithm {alg:?}"));
        }
        algs_seen.push(alg);
    }
    if a.clock_leeway.get() > MAX_CLOCK_LEEWAY {
        e(
            "clockLeeway",
            format!(
                "{} is too large; at most {}",
                a.clock_leeway,
                GoDuration(MAX_CLOCK_LEEWAY)
            ),
        );
    }
    if let Some(max) = a.max_token_lifetime {
        if max.is_zero() {
            e(
                "maxTokenLifetime",
                "must be greater than 0, e.g. 12h (or leave it out)".into(),
            );
        }
    }
    if !(MIN_MAX_TOKEN_BYTES..=MAX_MAX_TOKEN_BYTES).contains(&a.max_token_bytes) {
        e(
            "maxTokenBytes",
            format!(
                "{} is out of range; must be between {MIN_MAX_TOKEN_BYTES} and \
                 {MAX_MAX_TOKEN_BYTES}",
                a.max_token_bytes
            ),
        );
    }
    let mut policy_seen: Vec<&str> = Vec::new();
    for (j, c) in a.claims_for_policy.iter().enumerate() {
        let f = format!("claimsForPolicy[{j}]");
        if c.is_empty() {
            e(&f, "must not be empty".into());
        } else if policy_seen.contains(&c.as_str()) {
            e(&f, format!("duplicate claim {c:?}"));
        }
        policy_seen.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> JwtAuthenticator {
        serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
    }

    fn issues(list: &[JwtAuthenticator]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        validate_jwt(list, &mut |p, m| out.push((p, m)));
        out
    }

    fn ca_pem() -> String {
        ztgate_testkit::TestPki::new().users_ca.cert_pem()
    }

    fn good(url: &str) -> String {
        let ca = ca_pem().replace('\n', "\n      ");
        format!(
            "issuer:\n  url: {url}\n  audiences: [kubernetes]\n  certificateAuthority: |\n      {ca}\n\
             claimMappings:\n  username: {{claim: sub, prefix: \"oidc:\"}}\n  groups: {{claim: groups, prefix: \"oidc:\"}}\n"
        )
    }

    #[test]
    fn defaults_and_a_good_entry() {
        let a = parse(&good("https://idp.example.com"));
        assert_eq!(a.signing_algorithms, vec!["RS256", "ES256"]);
        assert_eq!(a.clock_leeway.get(), Duration::from_secs(30));
        assert_eq!(a.max_token_bytes, 16384);
        assert_eq!(
            a.discovery_url(),
            "https://idp.example.com/.well-known/openid-configuration"
        );
        assert_eq!(issues(&[a]), vec![]);
    }

    #[test]
    fn kube_apiserver_entry_parses() {
        // Carried over from a kube-apiserver AuthenticationConfiguration (CEL parts removed).
        let a = parse(&format!(
            "{}claimValidationRules:\n- claim: hd\n  requiredValue: example.com\n",
            good("https://example.com").replace(
                "  audiences: [kubernetes]\n",
                "  discoveryURL: https://discovery.example.com/.well-known/openid-configuration\n  audiences: [my-app, my-other-app]\n  audienceMatchPolicy: MatchAny\n"
            )
        ));
        assert_eq!(issues(&[a]), vec![]);
    }

    #[test]
    fn cel_is_refused_with_the_field() {
        let mut a = parse(&good("https://idp.example.com"));
        a.claim_validation_rules.push(ClaimValidationRule {
            expression: Some("claims.hd == 'x'".into()),
            message: Some("m".into()),
            ..Default::default()
        });
        a.claim_mappings.username.as_mut().unwrap().expression = Some("claims.sub".into());
        a.claim_mappings.extra.push(ExtraMapping {
            key: "example.com/tenant".into(),
            value_expression: Some("claims.tenant".into()),
        });
        a.user_validation_rules.push(UserValidationRule::default());
        let got = issues(&[a]);
        for field in [
            "authentication.jwt[0].claimValidationRules[0].expression",
            "authentication.jwt[0].claimMappings.username.expression",
            "authentication.jwt[0].claimMappings.extra[0].valueExpression",
            "authentication.jwt[0].userValidationRules[0].expression",
        ] {
            let want = format!("CEL expressions are not supported by ztgate (field {field})");
            assert!(
                got.iter().any(|(p, m)| p == field && *m == want),
                "{field}: {got:?}"
            );
        }
    }

    #[test]
    fn prefix_is_required_with_claim() {
        let a = parse(
            &good("https://idp.example.com")
                .replace("{claim: sub, prefix: \"oidc:\"}", "{claim: sub}")
                .replace("{claim: groups, prefix: \"oidc:\"}", "{claim: groups}"),
        );
        let got = issues(&[a]);
        assert!(got.iter().any(|(p, m)| p
            == "authentication.jwt[0].claimMappings.username.prefix"
            && m.contains("required")));
        assert!(got
            .iter()
            .any(|(p, _)| p == "authentication.jwt[0].claimMappings.groups.prefix"));
        // "" is an explicit "no prefix".
        let a =
            parse(&good("https://idp.example.com").replace("prefix: \"oidc:\"", "prefix: \"\""));
        assert_eq!(issues(&[a]), vec![]);
    }

    #[test]
    fn duplicate_issuer_and_url_rules() {
        let a = parse(&good("https://idp.example.com"));
        let got = issues(&[a.clone(), a]);
        assert!(got.iter().any(
            |(p, m)| p == "authentication.jwt[1].issuer.url" && m.contains("duplicate issuer")
        ));
        for (url, why) in [
            ("http://idp.example.com", "https"),
            ("https://idp.example.com?x=1", "query"),
            ("https://idp.example.com#f", "fragment"),
            ("https://u@idp.example.com", "user information"),
        ] {
            let got = issues(&[parse(&good(url))]);
            assert!(
                got.iter()
                    .any(|(p, m)| p == "authentication.jwt[0].issuer.url" && m.contains(why)),
                "{url}: {got:?}"
            );
        }
    }

    #[test]
    fn audiences_algorithms_and_limits() {
        let mut a = parse(&good("https://idp.example.com"));
        a.issuer.audiences = vec!["a".into(), "b".into()];
        a.signing_algorithms = vec!["none".into(), "HS256".into(), "RS1".into(), "ES256".into()];
        a.max_token_bytes = 10;
        a.clock_leeway = GoDuration(Duration::from_secs(3600));
        a.issuer.certificate_authority = None;
        a.claims_for_policy = vec!["amr".into(), "amr".into()];
        let got = issues(&[a]);
        let has = |path: &str, needle: &str| {
            got.iter()
                .any(|(p, m)| p == &format!("authentication.jwt[0].{path}") && m.contains(needle))
        };
        assert!(has("issuer.audienceMatchPolicy", "MatchAny"), "{got:?}");
        assert!(has("signingAlgorithms[0]", "never accepted"), "{got:?}");
        assert!(has("signingAlgorithms[1]", "never accepted"), "{got:?}");
        assert!(has("signingAlgorithms[2]", "unsupported"), "{got:?}");
        assert!(has("maxTokenBytes", "out of range"), "{got:?}");
        assert!(has("clockLeeway", "too large"), "{got:?}");
        assert!(
            has("issuer.certificateAuthority", "no system trust store"),
            "{got:?}"
        );
        assert!(has("claimsForPolicy[1]", "duplicate"), "{got:?}");
        let mut a = parse(&good("https://idp.example.com"));
        a.issuer.audiences.clear();
        assert!(issues(&[a])
            .iter()
            .any(|(p, _)| p == "authentication.jwt[0].issuer.audiences"));
    }

    #[test]
    fn username_is_required_and_unknown_fields_refused() {
        let a = parse(
            &good("https://idp.example.com")
                .replace("  username: {claim: sub, prefix: \"oidc:\"}\n", ""),
        );
        assert!(issues(&[a])
            .iter()
            .any(|(p, _)| p == "authentication.jwt[0].claimMappings.username"));
        let bad = good("https://idp.example.com") + "bogus: 1\n";
        assert!(serde_yaml_ng::from_str::<JwtAuthenticator>(&bad).is_err());
    }

    #[test]
    fn loader_reports_jwt_problems_with_path_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let pki = ztgate_testkit::TestPki::new();
        let certs = dir.path();
        pki.gateway_serving.write(certs, "gateway");
        std::fs::write(certs.join("cluster-ca.crt"), pki.cluster_ca.cert_pem()).unwrap();
        std::fs::write(certs.join("idp-ca.crt"), pki.users_ca.cert_pem()).unwrap();
        std::fs::write(certs.join("token"), "abc\n").unwrap();
        let head = "apiVersion: ztgate.dev/v1alpha1\nkind: GatewayConfig\nlistener:\n  \
                    address: 127.0.0.1:0\n  servingCertificate:\n    certFile: gateway.crt\n    \
                    keyFile: gateway.key\nupstream:\n  url: https://127.0.0.1:6443\n  \
                    caFile: cluster-ca.crt\n  tokenFile: token\n";
        let good = format!(
            "{head}authentication:\n  jwt:\n  - issuer:\n      url: https://idp.example.com\n      \
             audiences: [kubernetes]\n      certificateAuthorityFile: {}\n    claimMappings:\n      \
             username: {{claim: email, prefix: \"\"}}\n",
            certs.join("idp-ca.crt").display()
        );
        let cfg = crate::config::load_str(&good, "t.yaml", certs).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.authentication.jwt.len(), 1);
        let bad = format!(
            "{head}authentication:\n  jwt:\n  - issuer:\n      url: http://idp.example.com\n      \
             audiences: [kubernetes]\n      certificateAuthorityFile: {}\n    claimMappings:\n      \
             username:\n        expression: claims.sub\n",
            certs.join("idp-ca.crt").display()
        );
        let errs = crate::config::load_str(&bad, "t.yaml", certs)
            .unwrap_err()
            .errors;
        let url = errs
            .iter()
            .find(|e| e.path == "authentication.jwt[0].issuer.url")
            .unwrap_or_else(|| panic!("{errs:?}"));
        assert_eq!(url.line, Some(15));
        let cel = errs
            .iter()
            .find(|e| e.path == "authentication.jwt[0].claimMappings.username.expression")
            .unwrap_or_else(|| panic!("{errs:?}"));
        assert_eq!(cel.line, Some(20));
        assert!(cel
            .message
            .starts_with("CEL expressions are not supported by ztgate"));
    }

    #[test]
    fn extra_keys() {
        assert!(check_extra_key("example.org/foo").is_ok());
        for bad in [
            "",
            "Example.org/foo",
            "foo",
            "example.org/",
            "k8s.io/x",
            "a.kubernetes.io/x",
        ] {
            assert!(check_extra_key(bad).is_err(), "{bad}");
        }
    }
}
