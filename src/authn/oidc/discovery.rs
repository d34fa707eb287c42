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
    ) -> Result<Fetcher, String> {
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
    pub(crate) async fn get(&self, url: &str) -> Result<Bytes, String> {
        let uri = check_https_url(url).map_err(|e| e.to_string())?;
        let req = Request::get(uri)
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, "ztgate")
            .body(Empty::new())
            .map_err(|e| format!("GET {url}: {e}"))?;
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
            let status = resp.status();
            if status.is_redirection() {
                let to = resp
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?");
                return Err(format!(
                    "GET {url}: redirect ({status}) to {to:?} not followed; configure the final URL"
                ));
            }
            if status != StatusCode::OK {
                return Err(format!("GET {url}: status {status}"));
            }
            let body = Limited::new(resp.into_body(), self.max_bytes)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        format!("GET {url}: response larger than {} bytes", self.max_bytes)
                    } else {
                        format!("GET {url}: reading body: {e}")
                    }
                })?;
            Ok(body.to_bytes())
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(format!("GET {url}: no answer within {:?}", self.timeout)),
        }
    }

    /// Fetches the discovery document, checks it, and fetches the JWKS it points to. Returns the
    /// `jwks_uri` with the JWKS.
    pub(crate) async fn fetch_jwks(
        &self,
        issuer_url: &str,
        discovery_url: &str,
    ) -> Result<(String, Bytes), String> {
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
) -> Result<String, String> {
    let doc: Value = serde_json::from_slice(body)
        .map_err(|e| format!("discovery document at {discovery_url} is not JSON: {e}"))?;
    let issuer = doc
        .get("issuer")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("discovery document at {discovery_url} has no \"issuer\" string"))?;
    if issuer != issuer_url {
        return Err(format!(
            "discovery document at {discovery_url} names issuer {issuer:?}, expected exactly \
             {issuer_url:?}"
        ));
    }
    let jwks_uri = doc.get("jwks_uri").and_then(Value::as_str).ok_or_else(|| {
        format!("discovery document at {discovery_url} has no \"jwks_uri\" string")
    })?;
    check_https_url(jwks_uri)
        .map_err(|e| format!("discovery document at {discovery_url}: jwks_uri {e}"))?;
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
            .contains("expected exactly"));
        let http = br#"{"issuer":"https://idp.example.com","jwks_uri":"http://idp.example.com/k"}"#;
        assert!(check_discovery(http, iss, &d)
            .unwrap_err()
            .contains("https"));
        assert!(check_discovery(b"{}", iss, &d).is_err());
        assert!(check_discovery(b"<html>", iss, &d).is_err());
    }
}
