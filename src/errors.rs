//! `metav1.Status`, the error object Kubernetes clients read: the one place the gateway writes it.
//!
//! Clients (kubectl, client-go) print these exactly as they print kube-apiserver's own errors.
//! This module knows nothing of the gateway's parts: each part's error says which `Status` it
//! becomes ([`ToStatus`]), with the constructors here (one per `reason` kube-apiserver uses) and
//! the messages in [`messages`], each written once.

use http::{header, HeaderValue, Response, StatusCode};
use serde::Serialize;

use crate::body::{full, Body};

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

/// An error a client sees as a `Status`.
pub trait ToStatus {
    /// The `Status` the client is sent. It never carries detail an attacker can use against
    /// authentication; the precise reason goes to the log.
    fn to_status(&self) -> Status;
}

impl Status {
    /// A failure with any code and reason; prefer the named constructors below.
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

    /// 400 `BadRequest`.
    pub fn bad_request(message: impl Into<String>) -> Status {
        Status::failure(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    /// 401 `Unauthorized`.
    pub fn unauthorized(message: impl Into<String>) -> Status {
        Status::failure(StatusCode::UNAUTHORIZED, "Unauthorized", message)
    }

    /// 403 `Forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Status {
        Status::failure(StatusCode::FORBIDDEN, "Forbidden", message)
    }

    /// 404 `NotFound`.
    pub fn not_found(message: impl Into<String>) -> Status {
        Status::failure(StatusCode::NOT_FOUND, "NotFound", message)
    }

    /// 405 `MethodNotAllowed`.
    pub fn method_not_allowed(message: impl Into<String>) -> Status {
        Status::failure(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", message)
    }

    /// 409 `Conflict`.
    pub fn conflict(message: impl Into<String>) -> Status {
        Status::failure(StatusCode::CONFLICT, "Conflict", message)
    }

    /// 413 `RequestEntityTooLarge`.
    pub fn request_entity_too_large(message: impl Into<String>) -> Status {
        Status::failure(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            message,
        )
    }

    /// 429 `TooManyRequests`, with the seconds after which to retry.
    pub fn too_many_requests(message: impl Into<String>, retry_after_seconds: u32) -> Status {
        Status::failure(StatusCode::TOO_MANY_REQUESTS, "TooManyRequests", message)
            .retry_after(retry_after_seconds)
    }

    /// 503 `ServiceUnavailable`.
    pub fn service_unavailable(message: impl Into<String>) -> Status {
        Status::failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            message,
        )
    }

    /// 504 `Timeout`.
    pub fn timeout(message: impl Into<String>) -> Status {
        Status::failure(StatusCode::GATEWAY_TIMEOUT, "Timeout", message)
    }

    /// `InternalError` with the given code (502 for a kube-apiserver that failed to answer).
    pub fn internal_error(code: StatusCode, message: impl Into<String>) -> Status {
        Status::failure(code, "InternalError", message)
    }

    /// Names the object the failure is about (`details.name`, `group`, `kind`).
    pub fn about(mut self, name: &str, group: &str, kind: &str) -> Status {
        let details = self.details.get_or_insert_with(Default::default);
        details.name = name.to_owned();
        details.group = group.to_owned();
        details.kind = kind.to_owned();
        self
    }

    /// Asks the client to retry after `secs` (`details.retryAfterSeconds` and `Retry-After`).
    pub fn retry_after(mut self, secs: u32) -> Status {
        self.details
            .get_or_insert_with(Default::default)
            .retry_after_seconds = Some(secs);
        self
    }

    /// The JSON object, for embedding (a watch's `ERROR` event, a review's answer).
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    /// The HTTP response: the JSON body, the code, and `Retry-After` when asked.
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

    /// [`Status::into_response`] with the gateway's bearer challenge (`WWW-Authenticate`), for
    /// refusals the client answers by presenting (or renewing) a credential.
    pub fn into_challenge(self) -> Response<Body> {
        let mut resp = self.into_response();
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"ztgate\""),
        );
        resp
    }
}

/// What clients read, each message written once (new requests, closed streams and the HTTP
/// answers of the gateway's own APIs use the same words).
pub mod messages {
    /// Every refused credential: the reason is logged, never sent.
    pub const UNAUTHORIZED: &str = "Unauthorized";

    /// The gateway cannot confirm its locks and posture are current.
    pub const STATE_STALE: &str = "the gateway cannot confirm that its locks and device \
         posture are current (its shared state store is unreachable), so it refuses; try again later";

    /// A credential (or what a live stream rests on) has expired.
    pub const CREDENTIAL_EXPIRED: &str = "the credential has expired; log in again";

    /// More non-streaming requests in flight than the gateway allows.
    pub const TOO_MANY_REQUESTS: &str =
        "too many requests in flight at the gateway, please try again later";

    /// The gateway is draining for shutdown.
    pub const SHUTTING_DOWN: &str = "the gateway is shutting down, please retry";

    /// kube-apiserver did not answer in time.
    pub const UPSTREAM_TIMEOUT: &str =
        "the upstream kube-apiserver did not answer within the gateway's request timeout";

    /// A state store write that did not happen for a reason other than the disk.
    pub const STORE_UNWRITABLE: &str = "the gateway's state store cannot be written; try again";

    /// An access review (SubjectAccessReview, SelfSubjectAccessReview) that names nothing to
    /// decide.
    pub const REVIEW_WITHOUT_ATTRIBUTES: &str =
        "spec needs resourceAttributes or nonResourceAttributes";

    /// A lock matches the caller; `message` is the administrator's, possibly empty.
    pub fn locked(message: &str) -> String {
        if message.is_empty() {
            "access is locked by an administrator".to_owned()
        } else {
            format!("access is locked: {message}")
        }
    }

    /// A state store write the disk refused, naming the cause an operator must fix (never a
    /// path). Nothing was acknowledged; what is stored stays in force.
    pub fn store_write_failed(cause: &str) -> String {
        format!(
            "the gateway's state store could not save this change: {cause}; locks and posture \
             already stored stay in force; try again later"
        )
    }

    /// The device has no fresh posture report and posture is required.
    pub fn posture_required(device: &str) -> String {
        format!(
            "the gateway has no fresh posture report for device {device:?}: report it \
             with `ztgate device report` (or have your MDM report it), then retry"
        )
    }

    /// A request body over the gateway's limit.
    pub fn body_too_large(limit: u64) -> String {
        format!("the request body is larger than the gateway's limit of {limit} bytes")
    }

    /// A method that means nothing where it was sent.
    pub fn method_not_allowed(method: &http::Method) -> String {
        format!("the method {method} is not allowed here")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_json_is_what_kube_apiserver_writes() {
        let v = Status::forbidden("no").about("n", "g", "pods").to_value();
        assert_eq!(
            v,
            serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": "no", "reason": "Forbidden",
                "details": {"name": "n", "group": "g", "kind": "pods"}, "code": 403})
        );
    }

    #[test]
    fn retry_after_reaches_the_header() {
        let resp = Status::too_many_requests("busy", 1).into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
    }
}
