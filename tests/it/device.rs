//! Device certificates next to user tokens: the device is visible to policy, and a token bound
//! to a certificate (RFC 8705 `cnf.x5t#S256`) works only with that certificate.

use crate::support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::json;
use support::{send, status_of, Harness};
use ztgate::demo::{DevJwtIssuer, DevSettings};
use ztgate_testkit::pki::Ca;
use ztgate_testkit::DevIssuer;

const PODS: &str = "/api/v1/namespaces/team-a/pods";

const POLICIES: &str = r#"
@id("team-a-from-a-bound-device")
permit (principal in k8s::Group::"team-a", action, resource in k8s::Namespace::"team-a")
when { context has device && context.device.bound };
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_token_works_only_with_its_device_certificate() {
    let issuer = DevIssuer::start(&Ca::new("issuer-ca")).await.unwrap();
    let device_ca = Ca::new("device-ca");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.cedar"), POLICIES).unwrap();
    let h = Harness::start_with(DevSettings {
        jwt: vec![DevJwtIssuer {
            url: issuer.issuer_url(),
            ca_pem: issuer.ca_pem(),
            audience: "ztgate".into(),
            username_claim: "sub".into(),
            username_prefix: "oidc:".into(),
            groups_prefix: String::new(),
        }],
        device_ca_pem: Some(device_ca.cert_pem()),
        policies: vec![dir.path().join("p.cedar")],
        audit_file: Some(dir.path().join("audit.log")),
        ..Default::default()
    })
    .await;
    let laptop = device_ca.issue_client("laptop-1", &[]);
    let other = device_ca.issue_client("laptop-2", &[]);
    let bound = issuer.token(
        "alice",
        "ztgate",
        Duration::from_secs(600),
        json!({"groups": ["team-a"], "cnf": {"x5t#S256": ztgate::device::x5t_s256(&laptop.cert_der)}}),
    );
    let unbound = issuer.token(
        "alice",
        "ztgate",
        Duration::from_secs(600),
        json!({"groups": ["team-a"]}),
    );
    let get = |token: &str| {
        Request::get(h.uri(PODS))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };

    // The bound token with its own device certificate: the device is known and bound.
    let (code, _, body) = send(&h.client(Some(&laptop), true), get(&bound)).await;
    assert_eq!(code, 200, "{body}");

    // The same token from another device, or with no certificate: 401, so client-go re-runs
    // its credential plugin; nothing reaches the cluster.
    h.demo.apiserver.clear_requests();
    for (what, cert) in [("another device", Some(&other)), ("no certificate", None)] {
        let (code, _, body) = send(&h.client(cert, false), get(&bound)).await;
        assert_eq!(code, 401, "{what}: {body}");
        assert_eq!(status_of(&body).1, "Unauthorized");
    }
    assert!(h.demo.apiserver.requests().is_empty());

    // An unbound token from a known device: the device is there but not bound, and this
    // policy wants binding.
    let (code, _, body) = send(&h.client(Some(&laptop), false), get(&unbound)).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("no policy allows it"), "{body}");

    // The audit log names the device.
    h.demo.gateway.gateway.auditor.flush().await;
    let audit = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    assert!(
        audit.contains(r#""ztgate.dev/device-id":"laptop-1""#),
        "{audit}"
    );
}

/// A workload X509-SVID: one URI SAN, digital-signature key usage, clientAuth.
fn svid(ca: &Ca, spiffe_id: &str) -> ztgate_testkit::pki::CertKey {
    ca.issue(&ztgate_testkit::pki::LeafSpec {
        common_name: "workload".into(),
        uris: vec![spiffe_id.into()],
        client: true,
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_workloads_authenticate_as_their_spiffe_id() {
    let prod = Ca::new("spire-prod");
    let other = Ca::new("spire-other");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.cedar"),
        r#"
@id("payments-api-reads-team-a")
permit (principal, action == k8s::Action::"list", resource in k8s::Namespace::"team-a")
when { principal.name == "spiffe:spiffe://prod.example.org/ns/payments/sa/api" };
"#,
    )
    .unwrap();
    let h = Harness::start_with(DevSettings {
        workloads: vec![("prod.example.org".into(), prod.cert_pem())],
        policies: vec![dir.path().join("p.cedar")],
        ..Default::default()
    })
    .await;
    let get = || {
        Request::get(h.uri(PODS))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };

    // The SVID authenticates: `kubectl auth whoami` (a SelfSubjectReview) shows the mapped user.
    let api = svid(&prod, "spiffe://prod.example.org/ns/payments/sa/api");
    let whoami = Request::post(h.uri("/apis/authentication.k8s.io/v1/selfsubjectreviews"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            r#"{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}"#,
        )))
        .unwrap();
    let (code, _, body) = send(&h.client(Some(&api), true), whoami).await;
    assert_eq!(code, 201, "{body}");
    let review: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        review["status"]["userInfo"]["username"],
        "spiffe:spiffe://prod.example.org/ns/payments/sa/api"
    );

    // Policy allows it to list pods: the request goes upstream as that user (impersonated).
    h.demo.apiserver.clear_requests();
    let _ = send(&h.client(Some(&api), true), get()).await;
    let seen = h.demo.apiserver.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0]
            .effective_user
            .as_ref()
            .expect("impersonated")
            .username,
        "spiffe:spiffe://prod.example.org/ns/payments/sa/api"
    );

    // Another workload of the same trust domain: authenticated, but the gateway's policy does
    // not allow it, so nothing goes upstream.
    h.demo.apiserver.clear_requests();
    let batch = svid(&prod, "spiffe://prod.example.org/ns/batch/sa/job");
    let (code, _, body) = send(&h.client(Some(&batch), true), get()).await;
    assert_eq!(code, 403, "{body}");
    assert!(h.demo.apiserver.requests().is_empty());

    // An SVID claiming prod.example.org but signed by another trust domain's CA, and an SVID of
    // a trust domain with no mapping: not authenticated; nothing reaches the cluster.
    h.demo.apiserver.clear_requests();
    for (what, cert) in [
        (
            "wrong CA",
            svid(&other, "spiffe://prod.example.org/ns/payments/sa/api"),
        ),
        (
            "unknown trust domain",
            svid(&other, "spiffe://other.example.org/ns/payments/sa/api"),
        ),
    ] {
        let (code, _, body) = send(&h.client(Some(&cert), false), get()).await;
        assert_eq!(code, 401, "{what}: {body}");
    }
    assert!(h.demo.apiserver.requests().is_empty());
}
