//! The one place where every error the gateway produces becomes a kube-apiserver `Status`.
//!
//! Clients (kubectl, client-go) print these exactly as they print kube-apiserver's own errors.
//! The message sent to the client never carries detail an attacker can use for authentication
//! failures; the precise reason goes to the log instead.

use http::{header, HeaderValue, Response, StatusCode};
use serde::Serialize;

use crate::authn::AuthnError;
use crate::authz::AuthzError;
use crate::body::{full, Body};
use crate::posture::PostureError;
use crate::proxy::UpstreamError;

/// `metav1.Status`, as kube-apiserver writes it.
#[derive(Debug, Serialize)]
pub struct Status {
    pub kind: &'static str,
    #[serde(rename = "apiVersion")]
    pub api_version: &'static str,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub status: &'static str,
    pub message: String,
    pub reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<StatusDetails>,
    pub code: u16,
}

#[derive(Debug, Default, Serialize)]
pub struct StatusDetails {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub group: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(rename = "retryAfterSeconds", skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u32>,
}

impl Status {
    pub fn failure(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Status {
        Status {
            kind: "Status",
            api_version: "v1",
            metadata: Default::default(),
            status: "Failure",
            message: message.into(),
            reason,
            details: None,
            code: code.as_u16(),
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry = self.details.as_ref().and_then(|d| d.retry_after_seconds);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut resp = Response::new(full(body));
        *resp.status_mut() = code;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp.headers_mut().insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache, private"),
        );
        if let Some(secs) = retry {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// What a client is told when the gateway cannot confirm its locks and posture are current.
pub const STATE_STALE_MESSAGE: &str = "the gateway cannot confirm that its locks and device \
     posture are current (its shared state store is unreachable), so it refuses; try again later";

// --- state store write failures (tests/it/faults_disk.rs) ---
/// A lock or posture write that the state store refused: 503, as kube-apiserver answers when its
/// own storage cannot take a write, naming the cause an operator must fix (disk full, read-only)
/// but never a path. Nothing was acknowledged; what is stored stays in force.
fn store_write_failed(e: &crate::state::StoreError) -> Status {
    use std::io::ErrorKind;
    let crate::state::StoreError::Io { source, .. } = e else {
        return Status::failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the gateway's state store cannot be written; try again",
        );
    };
    let cause = match source.kind() {
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded => "its disk is full",
        ErrorKind::ReadOnlyFilesystem => "its file system is read-only",
        _ => "a disk write failed",
    };
    Status::failure(
        StatusCode::SERVICE_UNAVAILABLE,
        "ServiceUnavailable",
        format!(
            "the gateway's state store could not save this change: {cause}; locks and posture \
             already stored stay in force; try again later"
        ),
    )
}
// --- end state store write failures ---

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
    StoreUnavailable(crate::state::StoreError),
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
    Posture(#[from] crate::posture::PostureError),
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

    /// The `Status` the client sees.
    pub fn to_status(&self) -> Status {
        match self {
            // Never tell an unauthenticated client why: the log has the reason.
            PipelineError::Authn(_) => {
                Status::failure(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized")
            }
            PipelineError::Authz(AuthzError::Denied(d)) => {
                let mut s = Status::failure(StatusCode::FORBIDDEN, "Forbidden", d.message.clone());
                s.details = Some(StatusDetails {
                    name: d.name.clone(),
                    group: d.group.clone(),
                    kind: d.resource.clone(),
                    ..Default::default()
                });
                s
            }
            PipelineError::CredentialExpired => Status::failure(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "the credential has expired; log in again",
            ),
            PipelineError::MethodNotAllowed(m) => Status::failure(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("the method {m} is not allowed here"),
            ),
            PipelineError::NotFound(what) => Status::failure(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{what} not found"),
            ),
            PipelineError::StoreUnavailable(e) => store_write_failed(e),
            PipelineError::StateStale(_) => {
                let mut s = Status::failure(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    STATE_STALE_MESSAGE,
                );
                s.details = Some(StatusDetails {
                    retry_after_seconds: Some(5),
                    ..Default::default()
                });
                s
            }
            PipelineError::Locked(message) => Status::failure(
                StatusCode::FORBIDDEN,
                "Forbidden",
                if message.is_empty() {
                    "access is locked by an administrator".to_owned()
                } else {
                    format!("access is locked: {message}")
                },
            ),
            PipelineError::PostureRequired(device) => Status::failure(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                format!(
                    "the gateway has no fresh posture report for device {device:?}: report it \
                     with `ztgate device report` (or have your MDM report it), then retry"
                ),
            ),
            // A refused signed report says no more than a refused token does.
            PipelineError::Posture(PostureError::Rejected(_)) => {
                Status::failure(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized")
            }
            PipelineError::Posture(e @ PostureError::NoDevice) => {
                Status::failure(StatusCode::UNAUTHORIZED, "Unauthorized", e.to_string())
            }
            PipelineError::Posture(
                e @ (PostureError::WrongDevice { .. } | PostureError::NotAccepted(_)),
            ) => Status::failure(StatusCode::FORBIDDEN, "Forbidden", e.to_string()),
            PipelineError::Posture(e @ PostureError::BadReport(_)) => {
                Status::failure(StatusCode::BAD_REQUEST, "BadRequest", e.to_string())
            }
            PipelineError::Posture(e @ PostureError::Superseded(_)) => {
                Status::failure(StatusCode::CONFLICT, "Conflict", e.to_string())
            }
            PipelineError::Posture(PostureError::Store(e)) => store_write_failed(e),
            PipelineError::Authz(e) => {
                Status::failure(StatusCode::BAD_REQUEST, "BadRequest", e.to_string())
            }
            PipelineError::BadRequest(why) => {
                Status::failure(StatusCode::BAD_REQUEST, "BadRequest", why.to_string())
            }
            PipelineError::BodyTooLarge { limit } => Status::failure(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                format!("the request body is larger than the gateway's limit of {limit} bytes"),
            ),
            PipelineError::TooManyRequests => {
                let mut s = Status::failure(
                    StatusCode::TOO_MANY_REQUESTS,
                    "TooManyRequests",
                    "too many requests in flight at the gateway, please try again later",
                );
                s.details = Some(StatusDetails {
                    retry_after_seconds: Some(1),
                    ..Default::default()
                });
                s
            }
            PipelineError::ShuttingDown => Status::failure(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "the gateway is shutting down, please retry",
            ),
            PipelineError::Upstream(UpstreamError::Timeout) => Status::failure(
                StatusCode::GATEWAY_TIMEOUT,
                "Timeout",
                "the upstream kube-apiserver did not answer within the gateway's request timeout",
            ),
            // "kube-apiserver at <url> is not reachable: <cause>", made where it failed.
            PipelineError::Upstream(UpstreamError::Connect(message)) => Status::failure(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                message.clone(),
            ),
            PipelineError::Upstream(e) => Status::failure(
                StatusCode::BAD_GATEWAY,
                "InternalError",
                format!("kube-apiserver failed to answer the gateway: {e}"),
            ),
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let mut resp = self.to_status().into_response();
        if matches!(
            self,
            PipelineError::Authn(_)
                | PipelineError::CredentialExpired
                | PipelineError::PostureRequired(_)
                | PipelineError::Posture(PostureError::Rejected(_) | PostureError::NoDevice)
        ) {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"ztgate\""),
            );
        }
        resp
    }
}

/// An error and all its sources, `outer: inner: innermost`, for logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        out.push_str(": ");
        out.push_str(&err.to_string());
        cur = err.source();
    }
    out
}
