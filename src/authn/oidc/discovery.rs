//! Fetching an issuer's discovery document and JWKS over HTTPS.
//!
//! The client trusts only the CA configured for the issuer (there is no system trust store), never
//! follows redirects (a 3xx is an error), reads at most [`super::OidcOptions::max_response_bytes`]
//! and gives up after [`super::OidcOptions::fetch_timeout`] per request.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use serde_json::Value;

use crate::tls::client::check_https_url;
use crate::util::chain::error_chain;

/// Why an issuer's keys could not be fetched. Each message starts with what was fetched (`GET
/// <url>`, or the discovery document's URL), then says what went wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The issuer's CA bundle is unusable (the operator's config).
    #[error(transparent)]
    Tls(#[from] crate::tls::client::ClientTlsError),
    /// The URL is not one the gateway fetches (https, a host, no query or fragment).
    #[error(transparent)]
    Url(#[from] crate::tls::client::HttpsUrlError),
    /// The request could not be built.
    #[error("GET {url}: {source}")]
    Request {
        url: String,
        #[source]
        source: http::Error,
    },
    /// The connection or the exchange failed (the IdP is down, unreachable, or its TLS is not
    /// trusted). The message carries the whole chain of causes, so the error has no source
    /// (a chain printer would say them twice).
    #[error("GET {url}: {}", error_chain(cause))]
    Connect {
        url: String,
        cause: hyper_util::client::legacy::Error,
    },
    /// A redirect: the gateway fetches only the configured URL.
    #[error("GET {url}: redirect ({status}) to {to:?} not followed; configure the final URL")]
    Redirect {
        url: String,
        status: StatusCode,
        to: String,
    },
    /// An answer other than 200.
    #[error("GET {url}: status {status}")]
    Status { url: String, status: StatusCode },
    /// The answer is larger than the gateway reads.
    #[error("GET {url}: response larger than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    /// The answer's body broke off.
    #[error("GET {url}: reading body: {source}")]
    Body {
        url: String,
        #[source]
        source: crate::body::BoxError,
    },
    /// No answer in time.
    #[error("GET {url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    /// The discovery document is not what an OpenID provider serves for this issuer.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
}

/// Why a discovery document was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    #[error("discovery document at {url} is not JSON: {source}")]
    NotJson {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("discovery document at {url} has no \"issuer\" string")]
    NoIssuer { url: String },
    #[error("discovery document at {url} names issuer {found:?}, expected exactly {expected:?}")]
    WrongIssuer {
        url: String,
        found: String,
        expected: String,
    },
    #[error("discovery document at {url} has no \"jwks_uri\" string")]
    NoJwksUri { url: String },
    #[error("discovery document at {url}: jwks_uri {source}")]
    BadJwksUri {
        url: String,
        #[source]
        source: crate::tls::client::HttpsUrlError,
    },
}

/// An HTTPS client for one issuer.
#[derive(Clone)]
pub(crate) struct Fetcher {
    client: crate::tls::client::HttpsClient<Empty<Bytes>>,
    timeout: Duration,
    max_bytes: usize,
}

impl Fetcher {
    pub(crate) fn new(
        ca_pem: &[u8],
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<Fetcher, FetchError> {
        let roots = crate::tls::client::roots_from_pem(ca_pem)?;
        let tls = crate::tls::client::config_builder(roots)?.with_no_client_auth();
        let client = crate::tls::client::https_client(tls, timeout, Duration::from_secs(30), 1);
        Ok(Fetcher {
            client,
            timeout,
            max_bytes,
        })
    }

    /// GETs `url` and returns the body of a 200 answer.
    pub(crate) async fn get(&self, url: &str) -> Result<Bytes, FetchError> {
        let uri = check_https_url(url)?;
        let req = Request::get(uri)
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, "ztgate")
            .body(Empty::new())
            .map_err(|source| FetchError::Request {
                url: url.to_owned(),
                source,
            })?;
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|cause| FetchError::Connect {
                    url: url.to_owned(),
                    cause,
                })?;
            let status = resp.status();
            if status.is_redirection() {
                let to = resp
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?");
                return Err(FetchError::Redirect {
                    url: url.to_owned(),
                    status,
                    to: to.to_owned(),
                });
            }
            if status != StatusCode::OK {
                return Err(FetchError::Status {
                    url: url.to_owned(),
                    status,
                });
            }
            let body = Limited::new(resp.into_body(), self.max_bytes)
                .collect()
                .await
                .map_err(|source| {
                    if source.is::<http_body_util::LengthLimitError>() {
                        FetchError::TooLarge {
                            url: url.to_owned(),
                            limit: self.max_bytes,
                        }
                    } else {
                        FetchError::Body {
                            url: url.to_owned(),
                            source,
                        }
                    }
                })?;
            Ok(body.to_bytes())
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::Timeout {
                url: url.to_owned(),
                timeout: self.timeout,
            }),
        }
    }

    /// Fetches the discovery document, checks it, and fetches the JWKS it points to. Returns the
    /// `jwks_uri` with the JWKS.
    pub(crate) async fn fetch_jwks(
        &self,
        issuer_url: &str,
        discovery_url: &str,
    ) -> Result<(String, Bytes), FetchError> {
        let body = self.get(discovery_url).await?;
        let jwks_uri = check_discovery(&body, issuer_url, discovery_url)?;
        let jwks = self.get(&jwks_uri).await?;
        Ok((jwks_uri, jwks))
    }
}

/// Checks a discovery document: `issuer` must equal the configured issuer URL exactly (also when
/// the document comes from a separate `discoveryURL`), and `jwks_uri` must be an https URL.
pub(crate) fn check_discovery(
    body: &[u8],
    issuer_url: &str,
    discovery_url: &str,
) -> Result<String, DiscoveryError> {
    let url = || discovery_url.to_owned();
    let doc: Value = serde_json::from_slice(body)
        .map_err(|source| DiscoveryError::NotJson { url: url(), source })?;
    let issuer = doc
        .get("issuer")
        .and_then(Value::as_str)
        .ok_or_else(|| DiscoveryError::NoIssuer { url: url() })?;
    if issuer != issuer_url {
        return Err(DiscoveryError::WrongIssuer {
            url: url(),
            found: issuer.to_owned(),
            expected: issuer_url.to_owned(),
        });
    }
    let jwks_uri = doc
        .get("jwks_uri")
        .and_then(Value::as_str)
        .ok_or_else(|| DiscoveryError::NoJwksUri { url: url() })?;
    check_https_url(jwks_uri)
        .map_err(|source| DiscoveryError::BadJwksUri { url: url(), source })?;
    Ok(jwks_uri.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_document_rules() {
        let iss = "https://idp.example.com";
        let d = format!("{iss}/.well-known/openid-configuration");
        let ok = br#"{"issuer":"https://idp.example.com","jwks_uri":"https://keys.example.com/k"}"#;
        assert_eq!(
            check_discovery(ok, iss, &d).unwrap(),
            "https://keys.example.com/k"
        );
        let slash =
            br#"{"issuer":"https://idp.example.com/","jwks_uri":"https://idp.example.com/k"}"#;
        assert!(check_discovery(slash, iss, &d)
            .unwrap_err()
            .to_string()
            .contains("expected exactly"));
        let http = br#"{"issuer":"https://idp.example.com","jwks_uri":"http://idp.example.com/k"}"#;
        assert!(check_discovery(http, iss, &d)
            .unwrap_err()
            .to_string()
            .contains("https"));
        assert!(check_discovery(b"{}", iss, &d).is_err());
        assert!(check_discovery(b"<html>", iss, &d).is_err());
    }
}
