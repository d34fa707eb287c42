//! Forwarding to kube-apiserver: header hygiene, impersonation, streaming bodies, upgrades.
//!
//! This module only forwards what `authz` has authorized (it takes an
//! [`Authorized`](crate::authz::Authorized)), and must never pass a client's identity headers
//! through, never pool a connection whose upgrade failed, and never buffer a streaming response.

pub mod forward;
pub mod frames;
pub mod headers;
pub mod path;
pub mod spdy_dictionary;
pub mod upgrade;

pub use crate::refusal::UpstreamError;
pub use forward::Upstream;

/// What kind of request this is, for timeouts and stream tracking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestShape {
    /// An ordinary request: subject to the request timeout.
    Unary,
    /// A long-lived response (watch, logs -f): no request timeout, registered as a stream.
    Streaming(crate::streams::StreamKind),
    /// An HTTP/1.1 upgrade (exec, attach, port-forward over WebSocket or SPDY).
    Upgrade(crate::streams::StreamKind),
}
