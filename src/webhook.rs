//! Endpoints kube-apiserver calls: the webhook token authenticator (TokenReview) and the
//! authorization webhook (SubjectAccessReview). The caller must present a client certificate
//! from the configured bundle (kube-apiserver's); nobody else may ask, so these endpoints cannot
//! be used to probe tokens or policy.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::authn::x509::X509Authenticator;
use crate::authn::{AuthnError, CredentialFacts};
use crate::authz::cedar::{RequestFacts, Subject};
use crate::authz::requestinfo::RequestInfo;
use crate::body::{full, Body};
use crate::config::SarDefault;
use crate::errors::PipelineError;
use crate::pipeline::ConnInfo;
use crate::server::Gateway;

const MAX_REVIEW_BYTES: usize = 1 << 20;

/// Which webhook a request is for, if any.
pub enum Webhook {
    TokenReview(&'static str),
    SubjectAccessReview(&'static str),
}

/// Routes a request to a webhook only when it comes from the configured caller (a certificate
/// from the caller bundle); everyone else's TokenReview / SubjectAccessReview goes through the
/// normal pipeline to kube-apiserver like any other request.
pub fn route(gw: &Gateway, conn: &ConnInfo, method: &http::Method, path: &str) -> Option<Webhook> {
    if method != http::Method::POST || conn.chain.is_none() {
        return None;
    }
    let which = match path {
        "/apis/authentication.k8s.io/v1/tokenreviews" if gw.token_review.is_some() => {
            Some(Webhook::TokenReview("v1"))
        }
        "/apis/authentication.k8s.io/v1beta1/tokenreviews" if gw.token_review.is_some() => {
            Some(Webhook::TokenReview("v1beta1"))
        }
        "/apis/authorization.k8s.io/v1/subjectaccessreviews" if gw.sar.is_some() => {
            Some(Webhook::SubjectAccessReview("v1"))
        }
        "/apis/authorization.k8s.io/v1beta1/subjectaccessreviews" if gw.sar.is_some() => {
            Some(Webhook::SubjectAccessReview("v1beta1"))
        }
        _ => None,
    }?;
    let bundle = match &which {
        Webhook::TokenReview(_) => &gw.token_review.as_ref()?.caller_bundle,
        Webhook::SubjectAccessReview(_) => &gw.sar.as_ref()?.caller_bundle,
    };
    check_caller(gw, conn, bundle).ok().map(|_| which)
}

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    let mut resp = Response::new(full(serde_json::to_vec(v).unwrap_or_default()));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn check_caller(gw: &Gateway, conn: &ConnInfo, bundle: &str) -> Result<String, PipelineError> {
    let chain = conn.chain.as_ref().ok_or(AuthnError::NoCredentials)?;
    let verified = X509Authenticator::new(bundle.to_owned(), gw.bundles.clone())
        .verify(chain, SystemTime::now());
    let identity = verified.result?;
    Ok(identity.user().to_owned())
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, PipelineError> {
    Limited::new(req.into_body(), MAX_REVIEW_BYTES)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|_| PipelineError::BodyTooLarge {
            limit: MAX_REVIEW_BYTES as u64,
        })
}

pub async fn serve(
    gw: &Arc<Gateway>,
    conn: &ConnInfo,
    req: Request<Incoming>,
    which: Webhook,
) -> Result<Response<Body>, PipelineError> {
    match which {
        Webhook::TokenReview(version) => {
            let cfg = gw
                .token_review
                .as_ref()
                .expect("routed only when configured");
            let caller = check_caller(gw, conn, &cfg.caller_bundle)?;
            let oidc = &gw.oidc;
            let body = read_body(req).await?;
            let (code, v) = crate::authn::tokenreview::review(oidc, &body, version).await;
            tracing::info!(
                caller,
                authenticated = v["status"]["authenticated"].as_bool().unwrap_or(false),
                "TokenReview"
            );
            Ok(json_response(code, &v))
        }
        Webhook::SubjectAccessReview(version) => {
            let cfg = gw.sar.as_ref().expect("routed only when configured");
            let caller = check_caller(gw, conn, &cfg.caller_bundle)?;
            let body = read_body(req).await?;
            let (code, v) = subject_access_review(gw, &body, version, cfg.default_decision);
            tracing::info!(
                caller,
                allowed = v["status"]["allowed"].as_bool().unwrap_or(false),
                "SubjectAccessReview"
            );
            Ok(json_response(code, &v))
        }
    }
}

/// A RequestInfo from a review's `resourceAttributes` or `nonResourceAttributes`.
pub fn info_from_attributes(spec: &Value) -> Option<RequestInfo> {
    let s = |v: &Value, k: &str| v[k].as_str().unwrap_or_default().to_string();
    if let Some(ra) = spec.get("resourceAttributes").filter(|v| v.is_object()) {
        return Some(RequestInfo {
            is_resource_request: true,
            verb: s(ra, "verb"),
            api_prefix: if s(ra, "group").is_empty() {
                "api".into()
            } else {
                "apis".into()
            },
            api_group: s(ra, "group"),
            api_version: s(ra, "version"),
            namespace: s(ra, "namespace"),
            resource: s(ra, "resource"),
            subresource: s(ra, "subresource"),
            name: s(ra, "name"),
            ..Default::default()
        });
    }
    if let Some(nra) = spec.get("nonResourceAttributes").filter(|v| v.is_object()) {
        return Some(RequestInfo {
            is_resource_request: false,
            verb: s(nra, "verb"),
            path: s(nra, "path"),
            ..Default::default()
        });
    }
    None
}

fn subject_access_review(
    gw: &Gateway,
    body: &[u8],
    version: &str,
    default: SarDefault,
) -> (StatusCode, Value) {
    let api_version = format!("authorization.k8s.io/{version}");
    let review: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","reason":"BadRequest","code":400,
                       "message": format!("request body is not a SubjectAccessReview: {e}")}),
            )
        }
    };
    let spec = &review["spec"];
    let Some(info) = info_from_attributes(spec) else {
        return (
            StatusCode::BAD_REQUEST,
            json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","reason":"BadRequest","code":400,
                   "message":"spec needs resourceAttributes or nonResourceAttributes"}),
        );
    };
    let user = spec["user"].as_str().unwrap_or_default();
    // v1 calls it `groups`, v1beta1 `group`.
    let groups_field = if version == "v1beta1" {
        "group"
    } else {
        "groups"
    };
    let groups: Vec<String> = spec[groups_field]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|g| g.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let facts = CredentialFacts::default();
    let subject = Subject {
        user,
        uid: spec["uid"].as_str(),
        groups: &groups,
        method: "webhook",
        facts: &facts,
    };
    let engine = gw
        .authorizer
        .engine()
        .expect("SAR is configured only with policies");
    let req = RequestFacts {
        info: &info,
        verb: &info.verb,
        source_ip: std::net::IpAddr::from([0, 0, 0, 0]),
        now: SystemTime::now(),
        device: None,
        websocket: false,
    };
    let decision = engine.decide_subject(&subject, &req);
    let status = if decision.allowed {
        json!({"allowed": true, "reason": crate::authz::cedar::decision_reason(&decision)})
    } else if decision.explicit_deny || !decision.errors.is_empty() || default == SarDefault::Deny {
        json!({"allowed": false, "denied": true, "reason": crate::authz::cedar::decision_reason(&decision)})
    } else {
        // No opinion: kube-apiserver goes on to its next authorizer (RBAC).
        json!({"allowed": false, "reason": "no ztgate policy applies"})
    };
    (
        StatusCode::OK,
        json!({"apiVersion": api_version, "kind": "SubjectAccessReview", "metadata": {"creationTimestamp": null},
               "spec": spec, "status": status}),
    )
}
