//! The credentials a request carries: at most one bearer token and the TLS peer's certificate
//! chain. Parsing here is strict: several `Authorization` headers, or a value that is not one
//! well-formed bearer token, are refused rather than guessed at.

use std::sync::Arc;

use http::HeaderMap;
use rustls_pki_types::CertificateDer;

use super::AuthnError;

/// A bearer token. Its `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(String);

impl BearerToken {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// What the client presented.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    pub bearer: Option<BearerToken>,
    pub peer_chain: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// RFC 6750 token68 characters (without the trailing `=` padding), as a table: the check runs
/// over a ~1 KB token on every request.
static TOKEN68: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~' | b'+' | b'/');
        b += 1;
    }
    t
};

/// RFC 6750 token68: token68 characters, then any number of `=`.
fn is_token68(s: &[u8]) -> bool {
    let end = s.iter().rposition(|&b| b != b'=').map_or(0, |i| i + 1);
    end > 0 && s[..end].iter().all(|&b| TOKEN68[usize::from(b)])
}

/// Reads the bearer token from the headers, refusing anything ambiguous.
pub fn bearer_from_headers(headers: &HeaderMap) -> Result<Option<BearerToken>, AuthnError> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(AuthnError::MalformedAuthorization(
            "more than one Authorization header",
        ));
    }
    let bytes = value.as_bytes();
    // The common case in one pass: `Bearer <token68>` (all visible ASCII by construction).
    if let Some(sp) = bytes.iter().position(|&b| b == b' ') {
        let (scheme, token) = (&bytes[..sp], &bytes[sp + 1..]);
        if scheme.eq_ignore_ascii_case(b"bearer") && is_token68(token) {
            let token = std::str::from_utf8(token)
                .map_err(|_| AuthnError::MalformedAuthorization("not visible ASCII"))?;
            return Ok(Some(BearerToken(token.to_owned())));
        }
    }
    // Anything else is refused; find the most useful reason.
    let value = value
        .to_str()
        .map_err(|_| AuthnError::MalformedAuthorization("not visible ASCII"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or(AuthnError::MalformedAuthorization("no scheme"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthnError::MalformedAuthorization("scheme is not Bearer"));
    }
    debug_assert!(!is_token68(token.as_bytes()));
    Err(AuthnError::MalformedAuthorization(
        "not a single well-formed bearer token",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn hdrs(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(
                http::header::AUTHORIZATION,
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn accepts_one_bearer_token() {
        let t = bearer_from_headers(&hdrs(&["Bearer abc.def-ghi_"])).unwrap();
        assert_eq!(t.unwrap().expose(), "abc.def-ghi_");
    }

    #[test]
    fn refuses_two_authorization_headers() {
        assert!(bearer_from_headers(&hdrs(&["Bearer a", "Bearer b"])).is_err());
    }

    #[test]
    fn refuses_tokens_that_are_not_one_token() {
        for bad in [
            "Bearer a b",
            "Bearer ",
            "Basic YWxpY2U6cHc=",
            "Bearer a,b",
            "garbage",
        ] {
            assert!(bearer_from_headers(&hdrs(&[bad])).is_err(), "{bad}");
        }
    }

    #[test]
    fn padding_only_at_the_end_and_each_refusal_says_why() {
        let ok = bearer_from_headers(&hdrs(&["bearer YWJj=="])).unwrap();
        assert_eq!(ok.unwrap().expose(), "YWJj==");
        let why = |v: &[u8]| {
            let mut h = HeaderMap::new();
            h.append(
                http::header::AUTHORIZATION,
                HeaderValue::from_bytes(v).unwrap(),
            );
            match bearer_from_headers(&h) {
                Err(AuthnError::MalformedAuthorization(why)) => why,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(why(b"Bearer ==="), "not a single well-formed bearer token");
        assert_eq!(why(b"Bearer ab=c"), "not a single well-formed bearer token");
        assert_eq!(why(b"Bearer a\xffb"), "not visible ASCII");
        assert_eq!(why(b"Bearer\tabc"), "no scheme");
        assert_eq!(why(b"Token abc"), "scheme is not Bearer");
    }

    #[test]
    fn debug_never_shows_the_token() {
        let t = BearerToken("secret-token".into());
        assert!(!format!("{t:?}").contains("secret"));
    }
}
