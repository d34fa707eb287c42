//! HTTPS clients the gateway uses for its own calls (OIDC discovery and JWKS, the audit webhook):
//! one trust anchor set of the operator's choosing, HTTP/1.1, pooled.

use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::client::WantsClientCert;
use rustls::{ClientConfig, ConfigBuilder, RootCertStore};

pub type HttpsClient<B> = Client<HttpsConnector<HttpConnector>, B>;

/// Trust anchors from a PEM bundle.
pub fn roots_from_pem(pem: &[u8]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for c in crate::config::jwt::parse_ca_pem(pem)? {
        roots
            .add(c)
            .map_err(|e| format!("CA certificate not usable as a trust anchor: {e}"))?;
    }
    Ok(roots)
}

/// A TLS 1.2/1.3 client config with the project's crypto provider, trusting only `roots`.
pub fn config_builder(
    roots: RootCertStore,
) -> Result<ConfigBuilder<ClientConfig, WantsClientCert>, String> {
    Ok(
        ClientConfig::builder_with_provider(crate::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("TLS setup: {e}"))?
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
