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

/// RFC 6750 token68 characters.
fn is_token68(s: &str) -> bool {
    let trimmed = s.trim_end_matches('=');
    !trimmed.is_empty()
        && trimmed.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        })
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
    let value = value
        .to_str()
        .map_err(|_| AuthnError::MalformedAuthorization("not visible ASCII"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or(AuthnError::MalformedAuthorization("no scheme"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthnError::MalformedAuthorization("scheme is not Bearer"));
    }
    if !is_token68(token) {
        return Err(AuthnError::MalformedAuthorization(
            "not a single well-formed bearer token",
        ));
    }
    Ok(Some(BearerToken(token.to_owned())))
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
    fn debug_never_shows_the_token() {
        let t = BearerToken("secret-token".into());
        assert!(!format!("{t:?}").contains("secret"));
    }
}
