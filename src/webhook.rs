//! Endpoints kube-apiserver calls: the webhook token authenticator (TokenReview) and the
//! authorization webhook (SubjectAccessReview). The caller must present a client certificate
//! from the configured bundle (kube-apiserver's); nobody else may ask, so these endpoints cannot
//! be used to probe tokens or policy.

use std::time::SystemTime;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::authn::x509::X509Authenticator;
use crate::authn::CredentialFacts;
use crate::authz::cedar::{RequestFacts, Subject};
use crate::authz::requestinfo::RequestInfo;
use crate::body::Body;
use crate::config::SarDefault;
use crate::errors::PipelineError;
use crate::pipeline::ConnInfo;
use crate::server::Gateway;

const MAX_REVIEW_BYTES: usize = 1 << 20;

/// Which webhook a request is for, and the caller it was verified for.
pub struct Webhook<'a> {
    kind: Kind<'a>,
    version: &'static str,
    /// The verified caller (the CN of kube-apiserver's client certificate).
    caller: String,
}

enum Kind<'a> {
    TokenReview,
    SubjectAccessReview {
        engine: &'a crate::authz::cedar::PolicyEngine,
        default: SarDefault,
    },
}

/// Routes a request to a webhook only when it comes from the configured caller (a certificate
/// from the caller bundle); everyone else's TokenReview / SubjectAccessReview goes through the
/// normal pipeline to kube-apiserver like any other request.
pub fn route<'a>(
    gw: &'a Gateway,
    conn: &ConnInfo,
    method: &http::Method,
    path: &str,
) -> Option<Webhook<'a>> {
    if method != http::Method::POST {
        return None;
    }
    let (kind, version, bundle) = match path {
        "/apis/authentication.k8s.io/v1/tokenreviews" => (
            Kind::TokenReview,
            "v1",
            &gw.token_review.as_ref()?.caller_bundle,
        ),
        "/apis/authentication.k8s.io/v1beta1/tokenreviews" => (
            Kind::TokenReview,
            "v1beta1",
            &gw.token_review.as_ref()?.caller_bundle,
        ),
        "/apis/authorization.k8s.io/v1/subjectaccessreviews"
        | "/apis/authorization.k8s.io/v1beta1/subjectaccessreviews" => {
            let cfg = gw.sar.as_ref()?;
            let kind = Kind::SubjectAccessReview {
                engine: gw.authorizer.engine()?,
                default: cfg.default_decision,
            };
            let version = if path.contains("/v1beta1/") {
                "v1beta1"
            } else {
                "v1"
            };
            (kind, version, &cfg.caller_bundle)
        }
        _ => return None,
    };
    let chain = conn.chain.as_ref()?;
    let verified =
        X509Authenticator::new(bundle.clone(), gw.bundles.clone()).verify(chain, SystemTime::now());
    let caller = verified.result.ok()?.user().to_owned();
    Some(Webhook {
        kind,
        version,
        caller,
    })
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
    gw: &Gateway,
    req: Request<Incoming>,
    hook: Webhook<'_>,
) -> Result<Response<Body>, PipelineError> {
    let body = read_body(req).await?;
    let caller = hook.caller.as_str();
    match hook.kind {
        Kind::TokenReview => {
            // A locked caller is not authenticated to kube-apiserver either; and when this
            // replica cannot confirm its locks are current, nobody is (fail closed).
            let admit = |id: &crate::authn::Identity| {
                let subject = crate::state::LockSubject {
                    user: Some(id.user()),
                    groups: id.groups(),
                    device: None,
                    token_id: id.facts().token_id.as_deref(),
                    session: None,
                };
                match crate::locks::refusal(gw, &subject) {
                    Some(e) => Err(e.to_string()),
                    None => Ok(()),
                }
            };
            let (code, v) =
                crate::authn::tokenreview::review_with(&gw.oidc, &body, hook.version, &admit).await;
            tracing::info!(
                caller,
                authenticated = v["status"]["authenticated"].as_bool().unwrap_or(false),
                "TokenReview"
            );
            Ok(crate::body::json_response(code, &v))
        }
        Kind::SubjectAccessReview { engine, default } => {
            let (code, v) = subject_access_review(engine, &body, hook.version, default);
            tracing::info!(
                caller,
                allowed = v["status"]["allowed"].as_bool().unwrap_or(false),
                "SubjectAccessReview"
            );
            Ok(crate::body::json_response(code, &v))
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
    engine: &crate::authz::cedar::PolicyEngine,
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
