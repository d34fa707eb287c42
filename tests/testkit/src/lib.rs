//! Test fixtures for ztgate.
//!
//! - [`pki`]: a test PKI minted with rcgen at test time.
//! - [`apiserver`]: a kube-apiserver stand-in that follows kube-apiserver's documented behaviour
//!   where the gateway depends on it (client-certificate authentication, impersonation rules,
//!   RBAC denials as `Status`, discovery, watch, logs, exec/attach/port-forward).
//! - [`spdy`]: the SPDY/3.1 side of exec/attach/port-forward (kubectl's legacy transport, and the
//!   transport tunnelled inside WebSocket for port-forward).
//!
//! This crate is a fixture: it is never part of a production deployment. `ztgate demo` links it
//! so that a newcomer can try the gateway with one command.
#![forbid(unsafe_code)]

pub mod apiserver;
pub mod oidc;
pub mod pki;
pub mod spdy;

pub use apiserver::{ApiServer, ApiServerOptions, RecordedRequest, UserInfo};
pub use oidc::{DevIssuer, SigningAlg};
pub use pki::{CertKey, TestPki, GATEWAY_USER};
