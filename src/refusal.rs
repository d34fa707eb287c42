//! Everything that can stop a request inside the gateway, by the side that caused it, and the
//! `Status` each becomes.
//!
//! This is where the parts' errors meet: each part says how its own error reads to a client
//! ([`ToStatus`]); this module adds the refusals that belong to no single part (locks, stale
//! state, limits, shutdown) and the outcome labels for metrics and logs. The message sent to the
//! client never carries detail an attacker can use for authentication failures; the precise
//! reason goes to the log instead.

use http::Response;

use crate::authn::AuthnError;
use crate::authz::AuthzError;
use crate::body::{Body, BoxError};
use crate::errors::{messages, Status, ToStatus};
use crate::posture::PostureError;
use crate::state::StoreError;

/// Why kube-apiserver did not answer the gateway (the upstream side).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// TCP or TLS connection to kube-apiserver failed (it is down, unreachable or misconfigured).
    /// `message` is the whole sentence a client and the log read: which kube-apiserver, and why
    /// in a few words (made by `proxy::Upstream::unreachable`); `source` is the full cause.
    #[error("{message}")]
    Connect {
        message: String,
        #[source]
        source: Option<BoxError>,
    },
    /// kube-apiserver did not answer within the request timeout.
    #[error("timed out")]
    Timeout,
    /// The connection broke or the upstream spoke invalid HTTP.
    #[error("{0}")]
    Protocol(String),
}

impl ToStatus for UpstreamError {
    fn to_status(&self) -> Status {
        match self {
            UpstreamError::Timeout => Status::timeout(messages::UPSTREAM_TIMEOUT),
            // "kube-apiserver at <url> is not reachable: <cause>", made where it failed.
            UpstreamError::Connect { message, .. } => Status::service_unavailable(message.clone()),
            e => Status::internal_error(
                http::StatusCode::BAD_GATEWAY,
                format!("kube-apiserver failed to answer the gateway: {e}"),
            ),
        }
    }
}

/// Everything that can stop a request inside the gateway, by the side that caused it.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The client's credentials were missing or did not verify (client side).
    #[error(transparent)]
    Authn(#[from] AuthnError),
    /// Policy refused the request (client side: ask for access).
    #[error(transparent)]
    Authz(#[from] AuthzError),
    /// The credential a live stream (or a decision made later) rests on has expired (client
    /// side: log in again). New requests with it fail authentication instead.
    #[error("credential expired")]
    CredentialExpired,
    /// The method means nothing kube-apiserver or the gateway serves (e.g. TRACE, PROPFIND, or
    /// OPTIONS on a resource path).
    #[error("method {0} is not allowed")]
    MethodNotAllowed(http::Method),
    /// A gateway object (e.g. a lock) does not exist.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The state store (locks, posture) cannot be written (server side).
    #[error("state store unavailable: {0}")]
    StoreUnavailable(StoreError),
    /// The shared state store has not confirmed this replica's view of locks and posture for
    /// longer than `state.etcd.maxStaleness`: decisions that need them fail closed (server side).
    #[error("state not confirmed current: {0}")]
    StateStale(String),
    /// A lock (revocation) matches the caller, its device or its token.
    #[error("locked: {0}")]
    Locked(String),
    /// The device has no fresh posture record and posture is required (client side: report it).
    #[error("no fresh posture for device {0:?}")]
    PostureRequired(String),
    /// A posture report was refused, or could not be stored.
    #[error(transparent)]
    Posture(#[from] PostureError),
    /// The request cannot be mapped unambiguously to what kube-apiserver will act on.
    #[error("bad request: {0}")]
    BadRequest(std::borrow::Cow<'static, str>),
    /// The request body is larger than `limits.maxRequestBodyBytes`.
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    /// More non-streaming requests in flight than `limits.maxInflightRequests`.
    #[error("too many requests in flight")]
    TooManyRequests,
    /// The gateway is draining for shutdown.
    #[error("gateway is shutting down")]
    ShuttingDown,
    /// kube-apiserver could not be reached or failed mid-request (upstream side).
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

impl From<crate::body::TooLarge> for PipelineError {
    fn from(e: crate::body::TooLarge) -> PipelineError {
        PipelineError::BodyTooLarge { limit: e.limit }
    }
}

impl PipelineError {
    /// A short, stable label for metrics and logs.
    pub fn outcome(&self) -> &'static str {
        match self {
            PipelineError::Authn(_) => "unauthenticated",
            PipelineError::Authz(AuthzError::Denied(_)) => "denied",
            PipelineError::Authz(_) => "bad_request",
            PipelineError::Locked(_) => "locked",
            PipelineError::CredentialExpired => "unauthenticated",
            PipelineError::MethodNotAllowed(_) => "bad_request",
            PipelineError::PostureRequired(_) => "posture_required",
            PipelineError::Posture(PostureError::Store(_)) => "store_unavailable",
            PipelineError::Posture(PostureError::Rejected(_) | PostureError::NoDevice) => {
                "unauthenticated"
            }
            PipelineError::Posture(_) => "posture_refused",
            PipelineError::NotFound(_) => "not_found",
            PipelineError::StoreUnavailable(_) => "store_unavailable",
            PipelineError::StateStale(_) => "state_stale",
            PipelineError::BadRequest(_) => "bad_request",
            PipelineError::BodyTooLarge { .. } => "body_too_large",
            PipelineError::TooManyRequests => "throttled",
            PipelineError::ShuttingDown => "shutting_down",
            PipelineError::Upstream(UpstreamError::Timeout) => "upstream_timeout",
            PipelineError::Upstream(_) => "upstream_error",
        }
    }

    /// Is the client to present (or renew) a credential? Then the answer carries the
    /// gateway's bearer challenge.
    fn challenges(&self) -> bool {
        matches!(
            self,
            PipelineError::Authn(_)
                | PipelineError::CredentialExpired
                | PipelineError::PostureRequired(_)
                | PipelineError::Posture(PostureError::Rejected(_) | PostureError::NoDevice)
        )
    }

    pub fn into_response(self) -> Response<Body> {
        let challenges = self.challenges();
        let status = self.to_status();
        if challenges {
            status.into_challenge()
        } else {
            status.into_response()
        }
    }
}

impl ToStatus for PipelineError {
    fn to_status(&self) -> Status {
        match self {
            PipelineError::Authn(e) => e.to_status(),
            PipelineError::Authz(e) => e.to_status(),
            PipelineError::Posture(e) => e.to_status(),
            PipelineError::StoreUnavailable(e) => e.to_status(),
            PipelineError::Upstream(e) => e.to_status(),
            PipelineError::CredentialExpired => Status::unauthorized(messages::CREDENTIAL_EXPIRED),
            PipelineError::MethodNotAllowed(m) => {
                Status::method_not_allowed(messages::method_not_allowed(m))
            }
            PipelineError::NotFound(what) => Status::not_found(format!("{what} not found")),
            PipelineError::StateStale(_) => {
                Status::service_unavailable(messages::STATE_STALE).retry_after(5)
            }
            PipelineError::Locked(message) => Status::forbidden(messages::locked(message)),
            PipelineError::PostureRequired(device) => {
                Status::unauthorized(messages::posture_required(device))
            }
            PipelineError::BadRequest(why) => Status::bad_request(why.to_string()),
            PipelineError::BodyTooLarge { limit } => {
                Status::request_entity_too_large(messages::body_too_large(*limit))
            }
            PipelineError::TooManyRequests => {
                Status::too_many_requests(messages::TOO_MANY_REQUESTS, 1)
            }
            PipelineError::ShuttingDown => Status::service_unavailable(messages::SHUTTING_DOWN),
        }
    }
}
