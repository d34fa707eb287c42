//! HTTPS clients the gateway uses for its own calls (OIDC discovery and JWKS, the audit webhook):
//! one trust anchor set of the operator's choosing, HTTP/1.1, pooled.

use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::client::WantsClientCert;
use rustls::{ClientConfig, ConfigBuilder, RootCertStore};

/// Why a URL is not one the gateway calls: `https://`, a host, no user information, no query,
/// no fragment.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpsUrlError {
    #[error("{0:?} must not have a fragment")]
    Fragment(String),
    #[error("{url:?} is not a URL ({source})")]
    NotUrl {
        url: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error("{0:?} must use https://")]
    NotHttps(String),
    #[error("{0:?} has no host")]
    NoHost(String),
    #[error("{0:?} must not contain user information")]
    UserInfo(String),
    #[error("{0:?} must not have a query")]
    Query(String),
}

/// Checks an `https://` URL without query, fragment or user info.
pub fn check_https_url(url: &str) -> Result<http::Uri, HttpsUrlError> {
    if url.contains('#') {
        return Err(HttpsUrlError::Fragment(url.to_owned()));
    }
    let uri: http::Uri = url.parse().map_err(|source| HttpsUrlError::NotUrl {
        url: url.to_owned(),
        source,
    })?;
    if uri.scheme_str() != Some("https") {
        return Err(HttpsUrlError::NotHttps(url.to_owned()));
    }
    let Some(authority) = uri.authority() else {
        return Err(HttpsUrlError::NoHost(url.to_owned()));
    };
    if authority.as_str().contains('@') {
        return Err(HttpsUrlError::UserInfo(url.to_owned()));
    }
    if authority.host().is_empty() {
        return Err(HttpsUrlError::NoHost(url.to_owned()));
    }
    if uri.query().is_some() {
        return Err(HttpsUrlError::Query(url.to_owned()));
    }
    Ok(uri)
}

pub type HttpsClient<B> = Client<HttpsConnector<HttpConnector>, B>;

/// Why a client TLS config could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientTlsError {
    /// The CA bundle is not usable PEM certificates (the operator's file).
    #[error(transparent)]
    CaPem(#[from] super::pem::CaPemError),
    /// A CA certificate parses but cannot be a trust anchor (the operator's file).
    #[error("CA certificate not usable as a trust anchor: {0}")]
    Anchor(#[source] rustls::Error),
    /// The crypto provider refused the protocol versions (a build problem).
    #[error("TLS setup: {0}")]
    Setup(#[source] rustls::Error),
}

/// Trust anchors from a PEM bundle.
pub fn roots_from_pem(pem: &[u8]) -> Result<RootCertStore, ClientTlsError> {
    let mut roots = RootCertStore::empty();
    for c in super::pem::parse_ca_pem(pem)? {
        roots.add(c).map_err(ClientTlsError::Anchor)?;
    }
    Ok(roots)
}

/// A TLS 1.2/1.3 client config with the project's crypto provider, trusting only `roots`.
pub fn config_builder(
    roots: RootCertStore,
) -> Result<ConfigBuilder<ClientConfig, WantsClientCert>, ClientTlsError> {
    Ok(
        ClientConfig::builder_with_provider(crate::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(ClientTlsError::Setup)?
            .with_root_certificates(roots),
    )
}

/// A pooled HTTPS-only HTTP/1.1 client over `tls`.
pub fn https_client<B>(
    tls: ClientConfig,
    connect_timeout: Duration,
    pool_idle_timeout: Duration,
    pool_max_idle_per_host: usize,
) -> HttpsClient<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(pool_idle_timeout)
        .pool_max_idle_per_host(pool_max_idle_per_host)
        .build(connector)
}
