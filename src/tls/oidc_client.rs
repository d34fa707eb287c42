//! The HTTP client the OIDC flows use (discovery, JWKS, token and device endpoints): the project's
//! own hyper + rustls client ([`super::client`]) behind openidconnect's async client trait.
//!
//! It never follows redirects (an IdP answering a token request with a redirect is an error, not
//! a hop to follow), bounds every call by a deadline and every response by a size limit.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use openidconnect::{AsyncHttpClient, HttpRequest, HttpResponse};
use rustls::RootCertStore;

use crate::tls::client::{config_builder, https_client, roots_from_pem, HttpsClient};

/// Largest response accepted from the provider.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// Why a call to the provider failed (before any OAuth error in its answer is looked at).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("request to the identity provider timed out after {0:?}")]
    Timeout(Duration),
    /// Printed with its causes (openidconnect wraps this error as the source of its own).
    #[error("cannot reach the identity provider")]
    Connect(#[source] hyper_util::client::legacy::Error),
    #[error("identity provider response: {0}")]
    Body(String),
}

/// Why the client for a provider could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The provider's CA bundle is unusable.
    #[error(transparent)]
    Tls(#[from] super::client::ClientTlsError),
    /// No CA was named and the system has no CA bundle either.
    #[error("no system CA bundle found; name the provider's CA")]
    NoSystemRoots,
}

/// A pooled HTTPS client for one provider.
#[derive(Clone)]
pub struct OidcHttpClient {
    client: HttpsClient<Full<Bytes>>,
    timeout: Duration,
}

impl OidcHttpClient {
    /// Trusts `ca_pem` when given, else the operating system's CA bundle.
    pub fn new(ca_pem: Option<&[u8]>, timeout: Duration) -> Result<OidcHttpClient, ClientError> {
        let roots = match ca_pem {
            Some(pem) => roots_from_pem(pem)?,
            None => system_roots()?,
        };
        let tls = config_builder(roots)?.with_no_client_auth();
        Ok(OidcHttpClient {
            client: https_client(tls, timeout, Duration::from_secs(90), 4),
            timeout,
        })
    }

    async fn send(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let (parts, body) = request.into_parts();
        let req = http::Request::from_parts(parts, Full::new(Bytes::from(body)));
        let call = async {
            let resp = self.client.request(req).await.map_err(HttpError::Connect)?;
            let (parts, body) = resp.into_parts();
            let bytes = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| HttpError::Body(e.to_string()))?
                .to_bytes();
            Ok(http::Response::from_parts(parts, bytes.to_vec()))
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| HttpError::Timeout(self.timeout))?
    }
}

impl<'c> AsyncHttpClient<'c> for OidcHttpClient {
    type Error = HttpError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(self.send(request))
    }
}

/// The operating system's CA bundle (Debian, Fedora/RHEL, Alpine, macOS Homebrew paths).
fn system_roots() -> Result<RootCertStore, ClientError> {
    const BUNDLES: &[&str] = &[
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/cert.pem",
        "/usr/local/etc/openssl/cert.pem",
    ];
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let from_env = std::env::var("SSL_CERT_FILE").ok();
    let candidates = from_env
        .iter()
        .map(String::as_str)
        .chain(BUNDLES.iter().copied());
    for path in candidates {
        let Ok(pem) = std::fs::read(path) else {
            continue;
        };
        // A system bundle may hold a few certificates webpki cannot use; skip those.
        let mut roots = RootCertStore::empty();
        let certs = CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok);
        let (added, _) = roots.add_parsable_certificates(certs);
        if added > 0 {
            return Ok(roots);
        }
    }
    Err(ClientError::NoSystemRoots)
}
