//! The TokenReview endpoint for kube-apiserver's webhook token authenticator
//! (`--authentication-token-webhook-config-file`), `authentication.k8s.io/v1` and `v1beta1`.
//!
//! kube-apiserver POSTs `{"apiVersion", "kind": "TokenReview", "spec": {"token", "audiences"}}`
//! and expects the same object back with `status` filled in, with HTTP 200 whether or not the
//! token authenticates. A malformed request gets 400 and a `metav1.Status`.
//!
//! Audiences follow the TokenReview contract: when `spec.audiences` is set, `status.audiences`
//! is the intersection of those with the token's audiences that the issuer accepts, and an empty
//! intersection means "not authenticated"; when it is not set, `status.audiences` is left out,
//! which tells kube-apiserver the token is valid for its own audience.
//!
//! The reason a token was refused is logged here and never sent back: `status.error` is always
//! the same generic text.

use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};

use super::oidc::OidcAuthenticator;

const GROUP: &str = "authentication.k8s.io";
const REFUSED: &str = "token rejected";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Review {
    api_version: Option<String>,
    kind: Option<String>,
    spec: Option<Spec>,
}

#[derive(Deserialize)]
struct Spec {
    #[serde(default)]
    token: String,
    #[serde(default)]
    audiences: Option<Vec<String>>,
}

fn bad_request(message: String) -> (StatusCode, Value) {
    (
        StatusCode::BAD_REQUEST,
        crate::errors::Status::bad_request(message).to_value(),
    )
}

/// Reviews one TokenReview request body. `api_version` is the version served at the path the
/// request came to: `v1` or `v1beta1` (or the full `authentication.k8s.io/v1`).
pub async fn review(
    auth: &OidcAuthenticator,
    body: &[u8],
    api_version: &str,
) -> (StatusCode, Value) {
    review_with(auth, body, api_version, &|_| {
        Ok::<(), std::convert::Infallible>(())
    })
    .await
}

/// [`review`], with `admit` asked about every identity a token verified as: `Err(why)` (a lock
/// matches it, or locks cannot be confirmed current) refuses the token like a bad one, and the
/// reason goes to the log only.
pub async fn review_with<E: std::error::Error>(
    auth: &OidcAuthenticator,
    body: &[u8],
    api_version: &str,
    admit: &(dyn Fn(&super::Identity) -> Result<(), E> + Sync),
) -> (StatusCode, Value) {
    let version = api_version
        .strip_prefix(GROUP)
        .and_then(|v| v.strip_prefix('/'))
        .unwrap_or(api_version);
    if version != "v1" && version != "v1beta1" {
        return bad_request(format!(
            "unsupported version {api_version:?}; {GROUP}/v1 and {GROUP}/v1beta1 are served"
        ));
    }
    let full_version = format!("{GROUP}/{version}");
    let req: Review = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return bad_request(format!("request body is not a TokenReview: {e}")),
    };
    if req.kind.as_deref() != Some("TokenReview") {
        return bad_request(format!(
            "kind must be TokenReview, got {:?}",
            req.kind.unwrap_or_default()
        ));
    }
    if req.api_version.as_deref() != Some(full_version.as_str()) {
        return bad_request(format!(
            "apiVersion must be {full_version:?}, got {:?}",
            req.api_version.unwrap_or_default()
        ));
    }
    let Some(spec) = req.spec else {
        return bad_request("spec is required".into());
    };
    let wanted = spec.audiences.unwrap_or_default();

    let refused = |status_audiences: Option<Vec<String>>| {
        let mut status = json!({ "authenticated": false, "error": REFUSED });
        if let Some(a) = status_audiences {
            status["audiences"] = json!(a);
        }
        (
            StatusCode::OK,
            json!({
                "apiVersion": full_version,
                "kind": "TokenReview",
                "metadata": {},
                "status": status,
            }),
        )
    };

    if spec.token.is_empty() {
        tracing::info!(reason = "empty token", "token review refused");
        return refused(None);
    }
    let verified = match auth.verify_token(&spec.token).await {
        Ok(v) => v,
        Err(e) => {
            tracing::info!(reason = %e, label = e.reason_label(), "token review refused");
            return refused(None);
        }
    };
    let audiences: Option<Vec<String>> = if wanted.is_empty() {
        None
    } else {
        let both: Vec<String> = wanted
            .iter()
            .filter(|a| verified.audiences.contains(a))
            .cloned()
            .collect();
        if both.is_empty() {
            tracing::info!(
                user = verified.identity.user(),
                requested = ?wanted,
                token = ?verified.audiences,
                "token review refused: no audience in common"
            );
            return refused(None);
        }
        Some(both)
    };
    let id = &verified.identity;
    if let Err(why) = admit(id) {
        tracing::info!(user = id.user(), reason = %why, "token review refused");
        return refused(None);
    }
    let mut user = json!({ "username": id.user() });
    if let Some(uid) = id.uid() {
        user["uid"] = json!(uid);
    }
    if !id.groups().is_empty() {
        user["groups"] = json!(id.groups());
    }
    if !id.extra().is_empty() {
        user["extra"] = json!(id.extra());
    }
    let mut status = json!({ "authenticated": true, "user": user });
    if let Some(a) = audiences {
        status["audiences"] = json!(a);
    }
    tracing::info!(user = id.user(), "token review authenticated");
    (
        StatusCode::OK,
        json!({
            "apiVersion": full_version,
            "kind": "TokenReview",
            "metadata": {},
            "status": status,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authn::oidc::tests::{fixture, Fixture};
    use std::time::Duration;
    use ztgate_testkit::oidc::SigningAlg;

    fn body(version: &str, token: &str, audiences: Option<&[&str]>) -> Vec<u8> {
        let mut spec = json!({ "token": token });
        if let Some(a) = audiences {
            spec["audiences"] = json!(a);
        }
        serde_json::to_vec(&json!({
            "apiVersion": format!("authentication.k8s.io/{version}"),
            "kind": "TokenReview",
            "metadata": {"creationTimestamp": null},
            "spec": spec,
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn authenticates_v1_and_v1beta1() {
        let Fixture { idp, auth, .. } = fixture().await;
        let token = idp.token(
            "alice",
            "kubernetes",
            Duration::from_secs(300),
            json!({"groups": ["devs"]}),
        );
        for v in ["v1", "v1beta1"] {
            let (code, out) = review(&auth, &body(v, &token, None), v).await;
            assert_eq!(code, StatusCode::OK);
            assert_eq!(out["apiVersion"], format!("authentication.k8s.io/{v}"));
            assert_eq!(out["kind"], "TokenReview");
            let st = &out["status"];
            assert_eq!(st["authenticated"], true, "{out}");
            assert_eq!(st["user"]["username"], "oidc:alice");
            assert_eq!(st["user"]["uid"], "alice");
            assert_eq!(st["user"]["groups"], json!(["oidc:devs"]));
            assert!(st.get("audiences").is_none(), "{out}");
            assert!(st.get("error").is_none());
        }
    }

    #[tokio::test]
    async fn audiences_are_intersected() {
        let Fixture { idp, auth, .. } = fixture().await;
        let token = idp.token(
            "alice",
            "kubernetes",
            Duration::from_secs(300),
            json!({"aud": ["kubernetes", "other-app"]}),
        );
        let (_, out) = review(
            &auth,
            &body(
                "v1",
                &token,
                Some(&["https://kubernetes.default.svc", "kubernetes"]),
            ),
            "v1",
        )
        .await;
        assert_eq!(out["status"]["authenticated"], true, "{out}");
        assert_eq!(out["status"]["audiences"], json!(["kubernetes"]));
        // "other-app" is in the token but not accepted by the issuer's config.
        let (_, out) = review(&auth, &body("v1", &token, Some(&["other-app"])), "v1").await;
        assert_eq!(out["status"]["authenticated"], false, "{out}");
        assert_eq!(out["status"]["error"], "token rejected");
    }

    #[tokio::test]
    async fn refusals_are_generic() {
        let Fixture { idp, auth, .. } = fixture().await;
        let expired = idp.token(
            "alice",
            "kubernetes",
            Duration::from_secs(1),
            json!({"exp": 1000, "iat": 900, "nbf": 900}),
        );
        let none = idp.sign_with_header(
            SigningAlg::RS256,
            &json!({"alg": "none"}),
            &json!({"iss": idp.issuer_url(), "sub": "x", "aud": "kubernetes", "exp": 4_000_000_000u64}),
        );
        for token in [expired.as_str(), none.as_str(), "garbage", ""] {
            let (code, out) = review(&auth, &body("v1", token, None), "v1").await;
            assert_eq!(code, StatusCode::OK);
            assert_eq!(
                out["status"],
                json!({"authenticated": false, "error": "token rejected"})
            );
        }
    }

    #[tokio::test]
    async fn malformed_requests_are_400() {
        let Fixture { auth, .. } = fixture().await;
        let cases: [(&[u8], &str); 6] = [
            (b"not json", "v1"),
            (br#"{"apiVersion":"authentication.k8s.io/v1","kind":"SubjectAccessReview","spec":{}}"#, "v1"),
            (br#"{"apiVersion":"authentication.k8s.io/v1beta1","kind":"TokenReview","spec":{}}"#, "v1"),
            (br#"{"apiVersion":"authentication.k8s.io/v1","kind":"TokenReview"}"#, "v1"),
            (br#"{"apiVersion":"authentication.k8s.io/v1","kind":"TokenReview","spec":{"token":5}}"#, "v1"),
            (br#"{"apiVersion":"authentication.k8s.io/v2","kind":"TokenReview","spec":{}}"#, "v2"),
        ];
        for (b, v) in cases {
            let (code, out) = review(&auth, b, v).await;
            assert_eq!(
                code,
                StatusCode::BAD_REQUEST,
                "{}",
                String::from_utf8_lossy(b)
            );
            assert_eq!(out["kind"], "Status");
            assert_eq!(out["code"], 400);
        }
    }
}
