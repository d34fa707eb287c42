//! Device certificates next to user tokens: the device is visible to policy, and a token bound
//! to a certificate (RFC 8705 `cnf.x5t#S256`) works only with that certificate.

mod support;

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
