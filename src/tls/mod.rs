//! TLS on both sides of the gateway.
//!
//! - [`server`]: the front door (rustls, aws-lc-rs, TLS 1.2/1.3, ALPN h2 + http/1.1). A client
//!   certificate is requested but optional; the handshake only proves possession of its key.
//!   The chain is verified against the named trust bundles by `authn`, the way kube-apiserver
//!   does it, so that a bad certificate is a clear 401 and bundles reload without new listeners.
//! - [`bundles`]: the named client-certificate trust bundles, hot-swappable.
//! - [`upstream`]: the TLS client to kube-apiserver (cluster CA, the gateway's own client
//!   certificate), whose files are re-read when they rotate (by [`crate::reload`]).

pub mod bundles;
pub mod client;
pub mod oidc_client;
pub mod pem;
pub mod server;
pub mod upstream;

/// Problems with certificate material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}
