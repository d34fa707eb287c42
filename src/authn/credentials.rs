//! The credentials a request carries: at most one bearer token and the TLS peer's certificate
//! chain. Parsing here is strict: several `Authorization` headers, or a value that is not one
//! well-formed bearer token, are refused rather than guessed at.

use std::sync::Arc;

use http::{HeaderMap, HeaderValue};
use rustls_pki_types::CertificateDer;

use super::AuthnError;

/// A bearer token. Its `Debug` never shows the token.
///
/// Kept as the request's `Authorization` value (shared, not copied: a ~1 KB JWT on every
/// request) and where the token starts in it.
#[derive(Clone)]
pub struct BearerToken {
    value: HeaderValue,
    start: usize,
}

impl BearerToken {
    pub fn expose(&self) -> &str {
        // Only made from a value whose token part is token68, i.e. ASCII: this never fails
        // (and an empty token would be refused, never accepted).
        std::str::from_utf8(&self.value.as_bytes()[self.start..]).unwrap_or_default()
    }
}

impl PartialEq for BearerToken {
    fn eq(&self, other: &BearerToken) -> bool {
        self.expose() == other.expose()
    }
}

impl Eq for BearerToken {}

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

/// RFC 6750 token68: token68 characters (`A-Z a-z 0-9 - . _ ~ + /`), then any number of `=`.
/// Runs over a ~1 KB token on every request: written as range comparisons folded without an
/// early exit, which the compiler turns into vector instructions (a table look-up per byte
/// does not vectorize and cost ~4 instructions a byte).
fn is_token68(s: &[u8]) -> bool {
    let end = s.iter().rposition(|&b| b != b'=').map_or(0, |i| i + 1);
    let bad = s[..end].iter().fold(false, |acc, &b| {
        let alpha = (b | 0x20).wrapping_sub(b'a') < 26;
        let digit = b.wrapping_sub(b'0') < 10;
        let other = b == b'-' || b == b'.' || b == b'_' || b == b'~' || b == b'+' || b == b'/';
        acc | !(alpha | digit | other)
    });
    end > 0 && !bad
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
            return Ok(Some(BearerToken {
                value: value.clone(),
                start: sp + 1,
            }));
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

    /// Every byte value, alone, inside a long token and before the padding: accepted exactly
    /// when RFC 6750 lists it among the token68 characters.
    #[test]
    fn token68_accepts_exactly_its_characters_anywhere() {
        let listed = |c: u8| {
            c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        };
        let long = b"eyJhbGciOiJSUzI1NiJ9".repeat(20);
        for c in 0..=255u8 {
            assert_eq!(is_token68(&[c]), listed(c), "{c:#x}");
            for at in [0, 7, long.len() / 2, long.len() - 1] {
                let mut t = long.clone();
                t[at] = c;
                // `=` in the last place is padding.
                let padding = c == b'=' && at == long.len() - 1;
                assert_eq!(is_token68(&t), listed(c) || padding, "{c:#x} at {at}");
                t.extend_from_slice(b"==");
                assert_eq!(
                    is_token68(&t),
                    listed(c) || padding,
                    "{c:#x} at {at}, padded"
                );
            }
        }
    }

    #[test]
    fn debug_never_shows_the_token() {
        let t = BearerToken {
            value: HeaderValue::from_static("Bearer secret-token"),
            start: 7,
        };
        assert_eq!(t.expose(), "secret-token");
        assert!(!format!("{t:?}").contains("secret"));
    }
}
