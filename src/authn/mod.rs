//! Authentication: turns the credentials a request carries into an [`Identity`].
//!
//! Owns the authenticators (x509 client certificates today; OIDC tokens and SPIFFE SVIDs plug in
//! here) and the rules every identity obeys before it may be forwarded. It must never log a token
//! or forward anything it did not verify; an `Identity` can only be built inside this module.

pub mod credentials;
pub mod oidc;
pub mod tokenreview;
pub mod x509;

use std::collections::BTreeMap;
use std::time::SystemTime;

pub use credentials::Credentials;

/// How an identity was established. Visible to policy and audit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    /// A client certificate verified against the named trust bundle.
    X509 { bundle: String },
    /// A JWT bearer token (OIDC ID token or JWT access token) from the named issuer URL.
    Oidc { issuer: String },
    /// A workload X509-SVID from the named SPIFFE trust domain.
    Spiffe { trust_domain: String },
    /// A user kube-apiserver authenticated and asks about in a SubjectAccessReview.
    Review,
}

impl AuthMethod {
    pub fn as_str(&self) -> &'static str {
        match self {
            AuthMethod::X509 { .. } => "x509",
            AuthMethod::Oidc { .. } => "oidc",
            AuthMethod::Spiffe { .. } => "spiffe",
            AuthMethod::Review => "webhook",
        }
    }
}

/// Who is making the request, as established by an authenticator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    user: String,
    uid: Option<String>,
    groups: Vec<String>,
    extra: BTreeMap<String, Vec<String>>,
    method: AuthMethod,
    expires_at: Option<SystemTime>,
    /// Facts about the credential that policy and audit may use (issuer, jti, iat, amr, ...).
    facts: CredentialFacts,
    /// What is made from this identity on use and kept with it (an identity from the token
    /// cache serves many requests).
    derived: Derived,
}

/// What is made from an identity on use and kept with it. Not part of an identity's equality.
pub(crate) struct Derived {
    /// The `Impersonate-*` headers it is forwarded with, or which field cannot be a header
    /// value; made once (see `proxy::headers::set_impersonation`).
    headers: std::sync::OnceLock<Result<HeaderList, &'static str>>,
    /// This identity value's own number (see [`InstanceId`]).
    instance: InstanceId,
}

/// A number that tells one identity value from every other of this process: each new identity
/// and each clone gets its own, and none is given twice. Other parts key what they derive from
/// an identity by it (authorization keeps the Cedar values of an identity's last request,
/// `authz::cedar::cache`), and may trust that what they derived from the identity with this
/// number still describes it, since an identity never changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InstanceId(u64);

impl InstanceId {
    /// A number no identity had before.
    pub(crate) fn next() -> InstanceId {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        InstanceId(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl Default for Derived {
    fn default() -> Derived {
        Derived {
            headers: std::sync::OnceLock::new(),
            instance: InstanceId::next(),
        }
    }
}

/// A clone keeps the headers (made from the same fields) and gets its own instance id (what
/// was derived from the original is remade for the copy; nothing relies on a copy staying in
/// step).
impl Clone for Derived {
    fn clone(&self) -> Derived {
        Derived {
            headers: self.headers.clone(),
            instance: InstanceId::next(),
        }
    }
}

/// Headers in the order they are added.
pub(crate) type HeaderList = std::sync::Arc<[(http::HeaderName, http::HeaderValue)]>;

impl PartialEq for Derived {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Derived {}

impl std::fmt::Debug for Derived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("..")
    }
}

/// What is known about the credential behind an identity, beyond the names it maps to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CredentialFacts {
    /// Token issuer URL (OIDC) or the trust bundle name (x509).
    pub issuer: Option<String>,
    /// `jti` of a token, used by locks.
    pub token_id: Option<String>,
    /// When the credential was issued (`iat`, or the certificate's notBefore).
    pub issued_at: Option<SystemTime>,
    /// Authentication methods references (`amr`), e.g. `mfa`, `hwk`.
    pub amr: Vec<String>,
    /// `cnf.x5t#S256` of a certificate-bound token (RFC 8705), base64url as in the token.
    pub cnf_x5t_s256: Option<String>,
    /// Selected claims exposed to policy (string or string-list values only).
    pub claims: BTreeMap<String, Vec<String>>,
    /// The identity provider's session (the token's `sid` claim), for session locks.
    pub session_id: Option<String>,
    /// How long past `expires_at` the authenticator still accepts the credential (the
    /// issuer's clock leeway): live streams end when requests would start to be refused.
    pub clock_leeway: std::time::Duration,
}

impl Identity {
    /// The impersonation headers, made by `make` on the first call.
    pub(crate) fn impersonation_headers(
        &self,
        make: impl FnOnce(&Identity) -> Result<HeaderList, &'static str>,
    ) -> Result<HeaderList, &'static str> {
        self.derived.headers.get_or_init(|| make(self)).clone()
    }

    /// This identity value's own number (see [`InstanceId`]).
    pub fn instance(&self) -> InstanceId {
        self.derived.instance
    }

    pub fn user(&self) -> &str {
        &self.user
    }
    pub fn uid(&self) -> Option<&str> {
        self.uid.as_deref()
    }
    pub fn groups(&self) -> &[String] {
        &self.groups
    }
    pub fn extra(&self) -> &BTreeMap<String, Vec<String>> {
        &self.extra
    }
    pub fn method(&self) -> &AuthMethod {
        &self.method
    }
    /// When the credential behind this identity stops being valid.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at
    }
    pub fn facts(&self) -> &CredentialFacts {
        &self.facts
    }
    /// The instant from which the authenticator refuses the credential: its expiry plus the
    /// clock leeway it is read with.
    pub fn valid_until(&self) -> Option<SystemTime> {
        self.expires_at.map(|t| t + self.facts.clock_leeway)
    }

    /// The user a SubjectAccessReview asks about: authenticated by kube-apiserver, described by
    /// the review's spec (also how benchmarks and tests outside the crate make an identity).
    pub fn from_review(
        user: String,
        uid: Option<String>,
        groups: Vec<String>,
        extra: BTreeMap<String, Vec<String>>,
    ) -> Identity {
        Identity {
            user,
            uid,
            groups,
            extra,
            method: AuthMethod::Review,
            expires_at: None,
            facts: CredentialFacts::default(),
            derived: Default::default(),
        }
    }

    /// The identity a caller becomes through an *authorized* impersonation (`kubectl --as`).
    /// The credential facts and expiry stay the caller's: the impersonation lives no longer
    /// than the credential that asked for it. The original user is kept as an extra.
    pub(crate) fn impersonated(
        &self,
        user: String,
        groups: Vec<String>,
        uid: Option<String>,
        mut extra: BTreeMap<String, Vec<String>>,
    ) -> Result<Identity, AuthnError> {
        check_name("impersonated user", &user)?;
        for g in &groups {
            check_name("impersonated group", g)?;
        }
        // The uid and extra values may be empty (kube-apiserver takes an empty uid as none);
        // their text obeys the same rules as names.
        if let Some(uid) = &uid {
            check_characters("impersonated uid", uid)?;
        }
        for (key, values) in &extra {
            check_characters("impersonated extra key", key)?;
            for v in values {
                check_characters("impersonated extra value", v)?;
            }
        }
        extra.insert(ORIGINAL_USER_EXTRA.to_owned(), vec![self.user.clone()]);
        Ok(Identity {
            user,
            uid,
            groups,
            extra,
            method: self.method.clone(),
            expires_at: self.expires_at,
            facts: self.facts.clone(),
            derived: Default::default(),
        })
    }
}

/// The extra key that carries the caller's own user name through an impersonation.
pub const ORIGINAL_USER_EXTRA: &str = "ztgate.dev/original-user";

/// Why authentication failed. The client only ever sees `401 Unauthorized`; this goes to the log.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthnError {
    /// The request carried no credential the gateway accepts.
    #[error("no credentials presented")]
    NoCredentials,
    /// More than one `Authorization` header, or one that is not a single well-formed bearer token.
    #[error("malformed Authorization header: {0}")]
    MalformedAuthorization(&'static str),
    /// A bearer token was presented but no token authenticator is configured.
    #[error("bearer token presented but no token authenticator is configured")]
    TokenAuthNotConfigured,
    /// The client certificate chain does not verify against the users bundle: `reason` in a few
    /// words, the verifier's or parser's error as the cause.
    #[error("client certificate rejected: {reason}")]
    CertificateRejected {
        reason: String,
        #[source]
        cause: Option<crate::util::chain::SharedCause>,
    },
    /// The client certificate has expired since the connection was set up.
    #[error("client certificate expired")]
    CertificateExpired,
    /// The token is bound to a certificate (RFC 8705 `cnf.x5t#S256`) and the request did not
    /// present that certificate.
    #[error("token is bound to another certificate ({0})")]
    TokenBindingMismatch(&'static str),
    /// The identity has a name the gateway refuses to forward (empty, control characters, ...).
    #[error("identity refused: {0}")]
    InvalidIdentity(String),
    /// A bearer token that is not an acceptable JWT: malformed, over size, a refused header
    /// (`alg` none/HS*, `crit`, `jku`, ...), or no usable key of its issuer to check it with.
    #[error("invalid token: {0}")]
    InvalidToken(String),
    /// The token's signature does not verify with the key(s) of the issuer it names.
    #[error("token signature rejected: {0}")]
    BadSignature(String),
    /// The token's `iss` is not a configured issuer.
    #[error("unknown token issuer {0}")]
    UnknownIssuer(String),
    /// The token's `exp` has passed (beyond the clock leeway).
    #[error("token expired: {0}")]
    TokenExpired(String),
    /// The token verifies but its claims fail the issuer's rules (audience, `nbf`, `iat`,
    /// lifetime, required claims, `email_verified`, claim mappings).
    #[error("token claims rejected: {0}")]
    TokenClaimsRejected(String),
    /// The signing keys of the token's issuer could not be loaded (IdP unreachable or broken);
    /// the last fetch's error is the cause (none before the first fetch ends).
    #[error(
        "issuer keys unavailable: keys of issuer {issuer} have never loaded: {}",
        cause.as_ref().map_or_else(|| "not fetched yet".to_owned(), ToString::to_string)
    )]
    IssuerKeysUnavailable {
        issuer: String,
        #[source]
        cause: Option<crate::util::chain::SharedCause>,
    },
}

impl crate::errors::ToStatus for AuthnError {
    /// Never tell an unauthenticated client why: the log has the reason.
    fn to_status(&self) -> crate::errors::Status {
        crate::errors::Status::unauthorized(crate::errors::messages::UNAUTHORIZED)
    }
}

impl AuthnError {
    /// A short, stable label for metrics (bounded set; no user data).
    pub fn reason_label(&self) -> &'static str {
        match self {
            AuthnError::NoCredentials => "no_credentials",
            AuthnError::MalformedAuthorization(_) => "malformed_authorization",
            AuthnError::TokenAuthNotConfigured => "token_not_accepted",
            AuthnError::CertificateRejected { .. } => "certificate_rejected",
            AuthnError::CertificateExpired => "certificate_expired",
            AuthnError::InvalidIdentity(_) => "invalid_identity",
            AuthnError::TokenBindingMismatch(_) => "token_binding_mismatch",
            AuthnError::InvalidToken(_) => "invalid_token",
            AuthnError::BadSignature(_) => "bad_signature",
            AuthnError::UnknownIssuer(_) => "unknown_issuer",
            AuthnError::TokenExpired(_) => "token_expired",
            AuthnError::TokenClaimsRejected(_) => "token_claims_rejected",
            AuthnError::IssuerKeysUnavailable { .. } => "issuer_keys_unavailable",
        }
    }
}

/// Checks that a name can be forwarded as an impersonation header value and means what it says.
pub(crate) fn check_name(kind: &str, value: &str) -> Result<(), AuthnError> {
    if value.is_empty() {
        return Err(AuthnError::InvalidIdentity(format!("empty {kind}")));
    }
    check_characters(kind, value)?;
    if http::HeaderValue::from_str(value).is_err() {
        return Err(AuthnError::InvalidIdentity(format!(
            "{kind} cannot be written as a header value"
        )));
    }
    Ok(())
}

#[cfg(test)]
impl Identity {
    /// An identity as an authenticator would make it, for unit tests of later steps.
    pub(crate) fn for_tests(
        user: &str,
        groups: &[&str],
        expires_at: Option<SystemTime>,
        facts: CredentialFacts,
    ) -> Identity {
        Identity {
            user: user.to_owned(),
            uid: None,
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            extra: BTreeMap::new(),
            method: AuthMethod::Oidc {
                issuer: "https://issuer.test".into(),
            },
            expires_at,
            facts,
            derived: Default::default(),
        }
    }
}

/// Refuses text that would not read as what it is: control characters (`char::is_control`,
/// general category Cc), and the invisible and bidirectional formatting characters of
/// [`is_format_char`], which make one name look like another in a log line, an audit event or
/// a terminal (`alice\u{202E}nimda` prints as `aliceadmin`). The reason names the code point,
/// never the text.
fn check_characters(kind: &str, value: &str) -> Result<(), AuthnError> {
    // Names are ASCII far more often than not: one pass over the bytes settles those.
    if value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Ok(());
    }
    if value.chars().any(|c| c.is_control()) {
        return Err(AuthnError::InvalidIdentity(format!(
            "{kind} contains control characters"
        )));
    }
    if let Some(c) = value.chars().find(|&c| is_format_char(c)) {
        return Err(AuthnError::InvalidIdentity(format!(
            "{kind} contains an invisible or bidirectional formatting character (U+{:04X})",
            c as u32
        )));
    }
    Ok(())
}

/// Unicode general category Cf (format), as of Unicode 16.0, plus U+2028 LINE SEPARATOR (Zl)
/// and U+2029 PARAGRAPH SEPARATOR (Zp). Cf holds every bidirectional control (U+061C, U+200E,
/// U+200F, U+202A–U+202E, U+2066–U+2069), the zero-width characters (U+200B–U+200D, U+2060,
/// U+FEFF), the soft hyphen and the invisible tag characters (U+E0001, U+E0020–U+E007F).
/// No crate in the build exposes the category, hence the table (check it against
/// `regex-syntax`'s `general_category::FORMAT` when Unicode adds to it).
fn is_format_char(c: char) -> bool {
    const FORMAT: &[(char, char)] = &[
        ('\u{ad}', '\u{ad}'),
        ('\u{600}', '\u{605}'),
        ('\u{61c}', '\u{61c}'),
        ('\u{6dd}', '\u{6dd}'),
        ('\u{70f}', '\u{70f}'),
        ('\u{890}', '\u{891}'),
        ('\u{8e2}', '\u{8e2}'),
        ('\u{180e}', '\u{180e}'),
        ('\u{200b}', '\u{200f}'),
        ('\u{2028}', '\u{2029}'),
        ('\u{202a}', '\u{202e}'),
        ('\u{2060}', '\u{2064}'),
        ('\u{2066}', '\u{206f}'),
        ('\u{feff}', '\u{feff}'),
        ('\u{fff9}', '\u{fffb}'),
        ('\u{110bd}', '\u{110bd}'),
        ('\u{110cd}', '\u{110cd}'),
        ('\u{13430}', '\u{1343f}'),
        ('\u{1bca0}', '\u{1bca3}'),
        ('\u{1d173}', '\u{1d17a}'),
        ('\u{e0001}', '\u{e0001}'),
        ('\u{e0020}', '\u{e007f}'),
    ];
    FORMAT
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                std::cmp::Ordering::Less
            } else if lo > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(value: &str) -> Option<String> {
        match check_name("user name", value) {
            Ok(()) => None,
            Err(AuthnError::InvalidIdentity(why)) => Some(why),
            Err(other) => panic!("{other:?}"),
        }
    }

    #[test]
    fn names_with_format_characters_are_refused_naming_the_code_point() {
        for (name, point) in [
            ("alice\u{202E}nimda", "U+202E"),
            ("\u{202A}a", "U+202A"),
            ("a\u{2066}b\u{2069}", "U+2066"),
            ("a\u{2069}", "U+2069"),
            ("ad\u{200B}min", "U+200B"),
            ("a\u{200C}", "U+200C"),
            ("a\u{200D}", "U+200D"),
            ("a\u{200E}", "U+200E"),
            ("a\u{200F}", "U+200F"),
            ("\u{FEFF}alice", "U+FEFF"),
            ("a\u{2060}", "U+2060"),
            ("a\u{061C}", "U+061C"),
            ("a\u{00AD}b", "U+00AD"),
            ("a\u{180E}", "U+180E"),
            ("a\u{2028}b", "U+2028"),
            ("a\u{2029}b", "U+2029"),
            ("admin\u{E0041}", "U+E0041"),
            ("a\u{E0001}", "U+E0001"),
            ("a\u{E007F}", "U+E007F"),
        ] {
            let why = refusal(name).unwrap_or_else(|| panic!("{name:?} accepted"));
            assert_eq!(
                why,
                format!("user name contains an invisible or bidirectional formatting character ({point})"),
                "{name:?}"
            );
            assert!(!why.contains(name), "the reason never repeats the name");
        }
        for name in ["a\u{7}", "a\tb", "a\u{7F}", "a\u{85}", "a\u{9B}"] {
            assert_eq!(
                refusal(name).as_deref(),
                Some("user name contains control characters"),
                "{name:?}"
            );
        }
    }

    #[test]
    fn names_in_any_script_are_names() {
        for name in [
            "alice",
            "José",
            "李",
            "Ñandú",
            "Ærøskøbing",
            "Владимир",
            "محمد",
            "עברית",
            "ไทย",
            "😀",
            "oidc:user@example.com",
            // Neighbours of the refused ranges.
            "\u{2027}\u{202F}\u{2065}\u{2070}\u{FEFE}\u{FF00}\u{E0000}\u{E0002}\u{E0080}",
        ] {
            assert_eq!(refusal(name), None, "{name:?}");
        }
    }

    /// The table is what `is_format_char` searches: sorted, not overlapping, and (from the
    /// Unicode data) every code point in it is Cf except the two separators.
    #[test]
    fn the_format_table_is_sorted_and_holds_what_it_says() {
        let points: Vec<u32> = (0..=0x10FFFF)
            .filter_map(char::from_u32)
            .filter(|&c| is_format_char(c))
            .map(|c| c as u32)
            .collect();
        assert_eq!(
            points.len(),
            172,
            "170 Cf in Unicode 16.0, and the 2 separators"
        );
        for p in [
            0x202E, 0x2028, 0x2029, 0xFEFF, 0x200B, 0x13430, 0x1343F, 0xE007F,
        ] {
            assert!(points.contains(&p), "U+{p:04X}");
        }
        assert!(!points.contains(&0x13440) && !points.contains(&0x2065));
    }

    fn caller() -> Identity {
        Identity {
            user: "alice".into(),
            uid: None,
            groups: vec!["team-a".into()],
            extra: BTreeMap::new(),
            method: AuthMethod::X509 {
                bundle: "users".into(),
            },
            expires_at: None,
            facts: CredentialFacts::default(),
            derived: Default::default(),
        }
    }

    #[test]
    fn an_impersonated_identity_obeys_the_same_rules() {
        let refused = |user: &str, groups: &[&str], uid: Option<&str>, extra: &[(&str, &str)]| {
            let extra = extra
                .iter()
                .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                .collect();
            caller()
                .impersonated(
                    user.into(),
                    groups.iter().map(|g| g.to_string()).collect(),
                    uid.map(str::to_owned),
                    extra,
                )
                .err()
                .map(|e| e.to_string())
        };
        assert_eq!(
            refused("bob", &["team-b"], Some(""), &[("scopes", "")]),
            None
        );
        assert_eq!(refused("José", &["李"], Some("u-1"), &[("k", "v")]), None);
        for (what, got) in [
            ("user", refused("bob\u{202E}", &[], None, &[])),
            ("group", refused("bob", &["a\u{200B}"], None, &[])),
            ("uid", refused("bob", &[], Some("1\u{2066}"), &[])),
            (
                "extra key",
                refused("bob", &[], None, &[("k\u{FEFF}", "v")]),
            ),
            (
                "extra value",
                refused("bob", &[], None, &[("k", "v\u{2028}")]),
            ),
            (
                "control in extra",
                refused("bob", &[], None, &[("k", "v\n")]),
            ),
        ] {
            let got = got.unwrap_or_else(|| panic!("{what} accepted"));
            assert!(
                got.contains(&format!("impersonated {what}")) || what == "control in extra",
                "{what}: {got}"
            );
        }
    }
}
