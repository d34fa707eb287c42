//! Classification: every request is read once, right after TLS, with kube-apiserver's semantics,
//! and becomes a [`Route`]. Nothing after this re-reads the raw path or query to decide anything.
//!
//! The kube request's attributes are kube-apiserver's RequestInfo (decoded path and query keys,
//! kube's bool conversion for `watch`), and whether it is long-running is kube-apiserver's own
//! rule (`BasicLongRunningRequestCheck`: the verbs `watch` and `proxy`, the subresources
//! `attach`, `exec`, `proxy`, `log` and `portforward`, and `/debug/pprof/`). A request that is not
//! long-running gets the gateway's request timeout over its headers and its body, so one that
//! was misread as short still cannot outlive it.

use std::sync::Arc;

use http::{header, Method, Request};

use crate::authz::requestinfo::{request_info, RequestInfo, RequestInfoError};
use crate::proxy::RequestShape;
use crate::refusal::PipelineError;
use crate::streams::StreamKind;

/// The gateway's locks API (`/v1/locks` and below).
pub const LOCKS_PATH: &str = "/v1/locks";

/// The device posture API (`/v1/devices/posture` and below).
pub const POSTURE_PATH: &str = crate::posture::API_PATH;

/// Whether `path` is one of the web login pages.
pub fn is_login_page(path: &str) -> bool {
    matches!(path, "/login" | "/callback" | "/logout" | "/kubeconfig")
}

pub fn is_locks_path(path: &str) -> bool {
    under(path, LOCKS_PATH)
}

pub fn is_posture_path(path: &str) -> bool {
    under(path, POSTURE_PATH)
}

/// Is this a posture report (served before user authentication)?
pub fn is_posture_report(method: &Method, path: &str) -> bool {
    method == Method::POST && path == POSTURE_PATH
}

/// `path` is `prefix` or a path below it.
fn under(path: &str, prefix: &str) -> bool {
    path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|r| r.starts_with('/'))
}

/// What a request is, decided once. `H` is a webhook call, as the webhooks recognised it.
pub enum Route<H> {
    /// `/livez`, `/healthz`.
    Live,
    /// `/readyz`.
    Ready,
    /// The web login pages (before authentication: they are how a user gets credentials).
    Sso,
    /// A target the gateway will not forward, because kube-apiserver could read it otherwise.
    Refused(PipelineError),
    /// kube-apiserver's TokenReview or SubjectAccessReview call, from its certificate.
    Webhook(H),
    /// A device posture report (the report or the device certificate is the credential).
    PostureReport,
    /// Everything else: authenticated, decided, then served by the gateway or forwarded.
    Api(ApiRoute),
}

/// A request for the Kubernetes API or one of the gateway's own APIs.
pub struct ApiRoute {
    /// What kube-apiserver will act on (its RequestInfo), or why it cannot be read.
    pub info: Result<Arc<RequestInfo>, RequestInfoError>,
    /// Long-running or not, and how.
    pub shape: RequestShape,
    pub target: Target,
    /// The method means something here (refused with 405 after authentication otherwise).
    pub method_allowed: bool,
}

/// Who serves an authorized API request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// kube-apiserver.
    Kube,
    /// `kubectl auth can-i`: answered from policy first.
    SelfAccessReview,
    /// `kubectl auth can-i --list`: answered from policy.
    SelfRulesReview,
    /// The gateway's locks API.
    Locks,
    /// The gateway's posture records API (reads).
    PostureRecords,
}

/// Classifies a request. `sso` says whether the login pages are served; `webhook` is asked,
/// with the decoded path, whether the request is a webhook call it accepts (only
/// kube-apiserver's certificate may make one; anyone else's goes on as an API request).
pub fn classify<B, H>(
    sso: bool,
    req: &Request<B>,
    webhook: impl FnOnce(&str) -> Option<H>,
) -> Route<H> {
    let raw = req.uri().path();
    match raw {
        "/livez" | "/healthz" => return Route::Live,
        "/readyz" => return Route::Ready,
        _ => {}
    }
    if sso && is_login_page(raw) {
        return Route::Sso;
    }
    // The target must mean the same thing here and at kube-apiserver.
    if req.version() <= http::Version::HTTP_11 && req.uri().authority().is_some() {
        return Route::Refused(PipelineError::BadRequest(
            "absolute-form request targets are not accepted".into(),
        ));
    }
    if let Err(e) = crate::proxy::path::check_path(raw) {
        return Route::Refused(PipelineError::BadRequest(e.into()));
    }
    let info = request_info(req.method(), raw, req.uri().query()).map(Arc::new);
    // The gateway's own endpoints are recognised on the decoded path, as kube-apiserver would
    // route it: an encoded spelling reaches the same endpoint, not kube-apiserver.
    let path = info.as_ref().map_or(raw, |i| i.path.as_str());
    if let Some(hook) = webhook(path) {
        return Route::Webhook(hook);
    }
    if is_posture_report(req.method(), path) {
        return Route::PostureReport;
    }
    let (shape, target, method_allowed) = match &info {
        Ok(i) => (
            shape_of(i, upgrade_requested(req)),
            target_of(i),
            method_allowed(req.method(), i),
        ),
        Err(_) => (RequestShape::Unary, Target::Kube, true),
    };
    Route::Api(ApiRoute {
        info,
        shape,
        target,
        method_allowed,
    })
}

/// An HTTP/1.1 upgrade (WebSocket or SPDY): `Upgrade` and a `Connection: upgrade` token.
pub fn upgrade_requested<B>(req: &Request<B>) -> bool {
    req.version() <= http::Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// kube-apiserver's long-running check, as the kind of stream the gateway tracks.
pub fn long_running(info: &RequestInfo) -> Option<StreamKind> {
    match info.verb.as_str() {
        "watch" => return Some(StreamKind::Watch),
        "proxy" => return Some(StreamKind::Proxy),
        _ => {}
    }
    if info.is_resource_request {
        return match info.subresource.as_str() {
            "log" => Some(StreamKind::Logs),
            "exec" => Some(StreamKind::Exec),
            "attach" => Some(StreamKind::Attach),
            "portforward" => Some(StreamKind::PortForward),
            "proxy" => Some(StreamKind::Proxy),
            _ => None,
        };
    }
    info.path
        .starts_with("/debug/pprof/")
        .then_some(StreamKind::Proxy)
}

/// How the gateway carries a request: an upgrade, a long-running response, or an ordinary one.
pub fn shape_of(info: &RequestInfo, upgrade: bool) -> RequestShape {
    let kind = long_running(info);
    if upgrade {
        return RequestShape::Upgrade(match kind {
            Some(k @ (StreamKind::Exec | StreamKind::Attach | StreamKind::PortForward)) => k,
            _ => StreamKind::Upgrade,
        });
    }
    match kind {
        Some(k) => RequestShape::Streaming(k),
        None => RequestShape::Unary,
    }
}

fn target_of(info: &RequestInfo) -> Target {
    if info.is_resource_request {
        let review = info.verb == "create"
            && info.api_group == "authorization.k8s.io"
            && info.subresource.is_empty()
            && info.name.is_empty();
        return match info.resource.as_str() {
            "selfsubjectaccessreviews" if review => Target::SelfAccessReview,
            "selfsubjectrulesreviews" if review => Target::SelfRulesReview,
            _ => Target::Kube,
        };
    }
    if is_locks_path(&info.path) {
        Target::Locks
    } else if is_posture_path(&info.path) {
        Target::PostureRecords
    } else {
        Target::Kube
    }
}

/// Methods that mean something: kube-apiserver gives a resource request no verb for any other
/// (and RBAC then refuses `cannot  resource`), and a non-resource path the lower-cased method,
/// which is an action only for these.
fn method_allowed(method: &Method, info: &RequestInfo) -> bool {
    if info.is_resource_request {
        return !info.verb.is_empty();
    }
    matches!(
        *method,
        Method::GET
            | Method::HEAD
            | Method::POST
            | Method::PUT
            | Method::PATCH
            | Method::DELETE
            | Method::OPTIONS
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(method: &str, uri: &str, upgrade: bool) -> RequestShape {
        let uri: http::Uri = uri.parse().unwrap();
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let info = request_info(&method, uri.path(), uri.query()).unwrap();
        shape_of(&info, upgrade)
    }

    /// Every spelling kube-apiserver reads as a watch or a follow is a stream here, and nothing
    /// else is.
    #[test]
    fn long_running_requests_are_classified_as_kube_apiserver_reads_them() {
        use RequestShape::{Streaming, Unary, Upgrade as Up};
        use StreamKind::{Attach, Exec, Logs, PortForward, Proxy, Watch};
        let table: &[(&str, &str, bool, RequestShape)] = &[
            ("GET", "/api/v1/namespaces/a/pods", false, Unary),
            (
                "GET",
                "/api/v1/namespaces/a/pods?watch=1",
                false,
                Streaming(Watch),
            ),
            (
                "GET",
                "/api/v1/namespaces/a/pods?watch=true",
                false,
                Streaming(Watch),
            ),
            (
                "GET",
                "/api/v1/namespaces/a/pods?watch=yes",
                false,
                Streaming(Watch),
            ),
            (
                "GET",
                "/api/v1/namespaces/a/pods?watch=True",
                false,
                Streaming(Watch),
            ),
            (
                "GET",
                "/api/v1/namespaces/a/pods?watch=",
                false,
                Streaming(Watch),
            ),
            (
                "GET",
                "/api/v1/namespaces/a/pods?watch",
                false,
                Streaming(Watch),
            ),
            (
                "GET",
                "/api/v1/namespaces/a/pods?w%61tch=1",
                false,
                Streaming(Watch),
            ),
            ("GET", "/api/v1/namespaces/a/pods?watch=false", false, Unary),
            ("GET", "/api/v1/namespaces/a/pods?watch=0", false, Unary),
            ("GET", "/api/v1/namespaces/a/pods?watch=FALSE", false, Unary),
            (
                "GET",
                "/api/v1/watch/namespaces/a/pods",
                false,
                Streaming(Watch),
            ),
            (
                "GET",
                "/api/v1/w%61tch/namespaces/a/pods",
                false,
                Streaming(Watch),
            ),
            (
                "GET",
                "/apis/apps/v1/watch/deployments",
                false,
                Streaming(Watch),
            ),
            (
                "GET",
                "/api/v1/namespaces/a/pods/p/log?follow=true",
                false,
                Streaming(Logs),
            ),
            (
                "GET",
                "/api/v1/namespaces/a/pods/p/log?follow=yes",
                false,
                Streaming(Logs),
            ),
            (
                "GET",
                "/api/v1/namespaces/a/pods/p/l%6fg?follow=1",
                false,
                Streaming(Logs),
            ),
            (
                "GET",
                "/api/v1/namespaces/a/pods/p/log",
                false,
                Streaming(Logs),
            ),
            (
                "GET",
                "/api/v1/namespaces/a/pods/p/exec?command=sh",
                true,
                Up(Exec),
            ),
            (
                "GET",
                "/api/v1/namespaces/a/pods/p/ex%65c?command=sh",
                true,
                Up(Exec),
            ),
            (
                "POST",
                "/api/v1/namespaces/a/pods/p/attach",
                true,
                Up(Attach),
            ),
            (
                "GET",
                "/api/v1/namespaces/a/pods/p/portforward",
                true,
                Up(PortForward),
            ),
            (
                "GET",
                "/api/v1/namespaces/a/pods/p/exec",
                false,
                Streaming(Exec),
            ),
            (
                "GET",
                "/api/v1/namespaces/a/pods/p/proxy/x",
                false,
                Streaming(Proxy),
            ),
            (
                "GET",
                "/api/v1/namespaces/a/services/s/proxy/x",
                true,
                Up(StreamKind::Upgrade),
            ),
            (
                "GET",
                "/api/v1/proxy/namespaces/a/pods/p",
                false,
                Streaming(Proxy),
            ),
            ("GET", "/debug/pprof/profile", false, Streaming(Proxy)),
            ("GET", "/version", false, Unary),
            ("GET", "/api/v1/namespaces/a/pods/p", false, Unary),
        ];
        for (method, uri, upgrade, want) in table {
            assert_eq!(shape(method, uri, *upgrade), *want, "{method} {uri}");
        }
    }

    #[test]
    fn methods_without_meaning_are_not_allowed() {
        let allowed = |m: &str, p: &str| {
            let m = Method::from_bytes(m.as_bytes()).unwrap();
            method_allowed(&m, &request_info(&m, p, None).unwrap())
        };
        assert!(allowed("GET", "/api/v1/pods"));
        assert!(allowed("DELETE", "/api/v1/namespaces/a/pods"));
        assert!(!allowed("OPTIONS", "/api/v1/pods"));
        assert!(!allowed("TRACE", "/api/v1/pods"));
        assert!(!allowed("PROPFIND", "/api/v1/pods"));
        assert!(allowed("OPTIONS", "/healthz/x"));
        assert!(!allowed("TRACE", "/version"));
        assert!(!allowed("PROPFIND", "/"));
    }

    #[test]
    fn self_reviews_and_gateway_apis_are_told_apart() {
        let target = |m: &str, p: &str| {
            let m = Method::from_bytes(m.as_bytes()).unwrap();
            target_of(&request_info(&m, p, None).unwrap())
        };
        assert_eq!(
            target(
                "POST",
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
            ),
            Target::SelfAccessReview
        );
        assert_eq!(
            target(
                "POST",
                "/apis/authorization.k8s.io/v1/selfsubjectr%75lesreviews"
            ),
            Target::SelfRulesReview
        );
        assert_eq!(
            target(
                "GET",
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
            ),
            Target::Kube
        );
        assert_eq!(target("GET", "/v1/l%6fcks"), Target::Locks);
        assert_eq!(
            target("GET", "/v1/devices/posture/d1"),
            Target::PostureRecords
        );
        assert_eq!(target("GET", "/api/v1/pods"), Target::Kube);
    }
}
