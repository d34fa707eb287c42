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
use crate::body::Body;
use crate::config::SarDefault;
use crate::decide::Review;
use crate::refusal::PipelineError;
use crate::tls::bundles::TrustBundles;

const MAX_REVIEW_BYTES: usize = 1 << 20;

/// What the webhooks use: their configs, the trust bundles their caller is verified against,
/// the token authenticator (TokenReview) and the decider (locks, SubjectAccessReview).
pub struct Webhooks {
    pub token_review: Option<crate::config::jwt::TokenReviewConfig>,
    pub sar: Option<crate::config::SubjectAccessReviewConfig>,
    pub bundles: std::sync::Arc<TrustBundles>,
    pub oidc: std::sync::Arc<crate::authn::oidc::OidcAuthenticator>,
    pub decider: std::sync::Arc<crate::decide::Decider>,
}

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
        cfg: &'a crate::config::SubjectAccessReviewConfig,
    },
}

/// Routes a request to a webhook only when it comes from the configured caller (a certificate
/// from the caller bundle); everyone else's TokenReview / SubjectAccessReview goes through the
/// normal pipeline to kube-apiserver like any other request.
pub fn route<'a>(
    hooks: &'a Webhooks,
    chain: Option<&[rustls_pki_types::CertificateDer<'static>]>,
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
            &hooks.token_review.as_ref()?.caller_bundle,
        ),
        "/apis/authentication.k8s.io/v1beta1/tokenreviews" => (
            Kind::TokenReview,
            "v1beta1",
            &hooks.token_review.as_ref()?.caller_bundle,
        ),
        "/apis/authorization.k8s.io/v1/subjectaccessreviews"
        | "/apis/authorization.k8s.io/v1beta1/subjectaccessreviews" => {
            let cfg = hooks.sar.as_ref()?;
            hooks.decider.authorizer().engine()?;
            let kind = Kind::SubjectAccessReview { cfg };
            let version = if path.contains("/v1beta1/") {
                "v1beta1"
            } else {
                "v1"
            };
            (kind, version, &cfg.caller_bundle)
        }
        _ => return None,
    };
    let chain = chain?;
    let verified = X509Authenticator::new(bundle.clone(), hooks.bundles.clone())
        .verify(chain, SystemTime::now());
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
    hooks: &Webhooks,
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
                hooks
                    .decider
                    .admit(&crate::state::LockSubject::of(id, None, None))
            };
            let (code, v) =
                crate::authn::tokenreview::review_with(&hooks.oidc, &body, hook.version, &admit)
                    .await;
            tracing::info!(
                caller,
                authenticated = v["status"]["authenticated"].as_bool().unwrap_or(false),
                "TokenReview"
            );
            Ok(crate::body::json_response(code, &v))
        }
        Kind::SubjectAccessReview { cfg } => {
            let (code, v) = subject_access_review(hooks, cfg, &body, hook.version).await;
            tracing::info!(
                caller,
                user = v["spec"]["user"].as_str().unwrap_or_default(),
                verb = v["spec"]["resourceAttributes"]["verb"]
                    .as_str()
                    .or(v["spec"]["nonResourceAttributes"]["verb"].as_str())
                    .unwrap_or_default(),
                allowed = v["status"]["allowed"].as_bool().unwrap_or(false),
                denied = v["status"]["denied"].as_bool().unwrap_or(false),
                "SubjectAccessReview"
            );
            Ok(crate::body::json_response(code, &v))
        }
    }
}

/// What a SubjectAccessReview's `status` says when the gateway has no opinion: kube-apiserver
/// goes on to its next authorizer, and its final message quotes this reason.
fn no_opinion(reason: &str) -> Value {
    json!({"allowed": false, "reason": format!("not decided by the ztgate gateway ({reason})")})
}

async fn subject_access_review(
    hooks: &Webhooks,
    cfg: &crate::config::SubjectAccessReviewConfig,
    body: &[u8],
    version: &str,
) -> (StatusCode, Value) {
    let api_version = format!("authorization.k8s.io/{version}");
    let review: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                crate::errors::Status::bad_request(format!(
                    "request body is not a SubjectAccessReview: {e}"
                ))
                .to_value(),
            )
        }
    };
    let spec = &review["spec"];
    let Some(info) = crate::decide::info_from_attributes(spec) else {
        return (
            StatusCode::BAD_REQUEST,
            crate::errors::Status::bad_request(crate::errors::messages::REVIEW_WITHOUT_ATTRIBUTES)
                .to_value(),
        );
    };
    let user = spec["user"].as_str().unwrap_or_default().to_owned();
    // v1 calls it `groups`, v1beta1 `group`.
    let groups_field = if version == "v1beta1" {
        "group"
    } else {
        "groups"
    };
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|g| g.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let groups = strings(&spec[groups_field]);
    let extra = spec["extra"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), strings(v))).collect())
        .unwrap_or_default();
    let status = if cfg.gateway_users.contains(&user) {
        // The gateway's own upstream identity makes every forwarded request (and is asked about
        // impersonation for each): its policy is for the users behind it, not for itself.
        no_opinion("the gateway's own identity is authorized by kube-apiserver's RBAC")
    } else {
        let identity = std::sync::Arc::new(crate::authn::Identity::from_review(
            user,
            spec["uid"].as_str().map(str::to_owned),
            groups,
            extra,
        ));
        let answer = hooks
            .decider
            .review(&crate::decide::ReviewFacts {
                caller: &identity,
                device: None,
                info: &info,
                source_ip: std::net::IpAddr::from([0, 0, 0, 0]),
                now: SystemTime::now(),
            })
            .await;
        match answer {
            Review::Allowed { reason } => json!({"allowed": true, "reason": reason}),
            Review::Denied { reason, explicit }
                if explicit || cfg.default_decision == SarDefault::Deny =>
            {
                json!({"allowed": false, "denied": true, "reason": reason})
            }
            Review::Denied { reason, .. } | Review::NoOpinion { reason } => no_opinion(&reason),
        }
    };
    (
        StatusCode::OK,
        json!({"apiVersion": api_version, "kind": "SubjectAccessReview", "metadata": {"creationTimestamp": null},
               "spec": spec, "status": status}),
    )
}

/// The user name kube-apiserver gives the gateway's upstream client certificate (its CN), so
/// that its own SubjectAccessReviews are left to RBAC.
pub fn upstream_user(cert_file: &std::path::Path) -> Option<String> {
    let pem = std::fs::read(cert_file).ok()?;
    let der = crate::tls::pem::certs_from_pem(cert_file, &pem)
        .ok()?
        .into_iter()
        .next()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}
