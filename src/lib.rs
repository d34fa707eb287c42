//! ztgate: a zero-trust gateway in front of kube-apiserver.
//!
//! The per-request path reads top to bottom in [`pipeline`]: classification ([`route`]),
//! credentials, authentication, device trust, one decision ([`decide`]), forwarding. Each part lives in its own
//! module with a doc comment that says what it owns and what it must never do.
#![forbid(unsafe_code)]

pub mod audit;
pub mod authn;
pub mod authz;
pub mod body;
pub mod cli;
pub mod config;
pub mod ct;
pub mod decide;
pub mod device;
pub mod discovery;
pub mod errors;
pub mod gateway;
// Only in fuzz builds (cargo-fuzz sets `--cfg fuzzing`) and the unit tests.
#[cfg(any(fuzzing, test))]
#[doc(hidden)]
pub mod fuzzing;
pub mod listener;
pub mod locks;
pub mod login;
pub mod pipeline;
pub mod posture;
pub mod proxy;
pub mod readiness;
pub mod refusal;
pub mod reload;
pub mod route;
pub mod sso;
pub mod state;
pub mod streams;
pub mod telemetry;
pub mod tls;
pub mod util;
pub mod webhook;

// The demo and the tests' dev environment (feature `demo`; not in the product build).
#[cfg(feature = "demo")]
pub mod demo;

/// The one crypto provider ztgate uses everywhere (no ring, no OpenSSL).
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<std::sync::Arc<rustls::crypto::CryptoProvider>> =
        std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}
