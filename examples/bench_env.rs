//! The environment of `scripts/bench`: a stand-in kube-apiserver in fast mode and the dev OIDC
//! issuer, running in this process, plus every file the gateway, the bare hop and the load
//! generators need, written under DIR.
//!
//! ```text
//! cargo run --release --example bench_env -- DIR
//! ```
//!
//! Writes `DIR/env.sh` (shell variables: ports, URLs, file paths) once everything answers, then
//! `DIR/issuer-stats.json` every 200 ms (how often the issuer's discovery and JWKS were fetched),
//! and runs until its standard input closes.
//!
//! The gateway config (`DIR/gateway.yaml`) is the full pipeline: OIDC tokens from the issuer,
//! device certificates (`authentication.devices`, CN as the device id) with RFC 8705 binding,
//! posture required (self-reports; `scripts/bench` posts one before the load), 100 Cedar
//! policies, audit at Metadata level to a file, JSON logs at info (the defaults).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use ztgate::demo::{DevEnv, DevJwtIssuer, DevSettings};
use ztgate_testkit::pki::Ca;
use ztgate_testkit::{ApiServer, ApiServerOptions, DevIssuer, TestPki};

/// How many distinct valid tokens the cache-miss scenario cycles through.
const DISTINCT_TOKENS: usize = 2000;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// 100 policies: discovery, the bench team's namespace (bound device required), other teams (as many
/// as make 100) and forbids that are evaluated on every request.
fn policies() -> String {
    let mut p = String::from(ztgate::demo::DEMO_POLICIES);
    // The demo's own policies, then teams up to 100 with the 6 forbids below.
    let teams = 100 - 6 - p.matches("@id(").count();
    // Replace the demo's unconditional team-a permit by a device-bound one.
    let demo = p.clone();
    p = p.replace(
        "@id(\"team-a-namespace\")\npermit (\n  principal in k8s::Group::\"team-a\",\n  action,\n  resource in k8s::Namespace::\"team-a\"\n);",
        "@id(\"team-a-namespace\")\npermit (\n  principal in k8s::Group::\"team-a\",\n  action,\n  resource in k8s::Namespace::\"team-a\"\n)\nwhen {\n  context has device && context.device.bound &&\n  context.device has posture && context.device.posture.diskEncrypted &&\n  context.device.posture.screenLock\n};",
    );
    assert_ne!(p, demo, "the demo's team-a permit is where it was");
    for i in 0..teams {
        p.push_str(&format!(
            r#"
@id("team-{i}-read")
permit (
  principal in k8s::Group::"team-{i}",
  action in [k8s::Action::"get", k8s::Action::"list", k8s::Action::"watch"],
  resource in k8s::Namespace::"ns-{i}"
)
when {{ context has device && context.device.bound && context.authn.method == "oidc" }};
"#
        ));
    }
    for (i, (res, why)) in [
        ("secrets", "secrets are read through the vault"),
        ("nodes", "nodes are managed by the platform team"),
        (
            "certificatesigningrequests",
            "CSRs go through the PKI pipeline",
        ),
        ("clusterroles", "RBAC changes go through review"),
        ("clusterrolebindings", "RBAC changes go through review"),
        (
            "validatingwebhookconfigurations",
            "admission is managed centrally",
        ),
    ]
    .iter()
    .enumerate()
    {
        p.push_str(&format!(
            r#"
@id("forbid-{i}")
@reason("{why}")
forbid (
  principal,
  action,
  resource is k8s::Resource
)
when {{ resource.resource == "{res}" && !(principal in k8s::Group::"platform") }};
"#
        ));
    }
    p
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

#[tokio::main]
async fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: bench_env DIR"));
    std::fs::create_dir_all(&dir).expect("create DIR");
    let dir = dir.canonicalize().expect("DIR");

    let pki = TestPki::new();
    let mut opts = ApiServerOptions::new(&pki);
    opts.record_requests = false;
    opts.http2_max_streams = Some(1000);
    let apiserver = ApiServer::start(opts).await.expect("stand-in");
    // The soak mints many users over HTTP; nobody else can reach this loopback issuer.
    let issuer =
        DevIssuer::start_minting(&pki.gateway_ca, "", ztgate_testkit::oidc::Minting::Anyone)
            .await
            .expect("dev issuer");
    let device_ca = Ca::new("bench-device-ca");
    let device = device_ca.issue_client("bench-laptop", &[]);

    let policy_dir = dir.join("policies");
    std::fs::create_dir_all(&policy_dir).expect("policies dir");
    let policy_text = policies();
    assert_eq!(policy_text.matches("@id(").count(), 100, "100 policies");
    write(&policy_dir.join("bench.cedar"), &policy_text);

    let gw_port = free_port();
    let ops_port = free_port();
    let settings = DevSettings {
        listen: format!("127.0.0.1:{gw_port}"),
        operations: false,
        max_inflight_requests: 4096,
        jwt: vec![DevJwtIssuer {
            url: issuer.issuer_url(),
            ca_pem: issuer.ca_pem(),
            audience: "ztgate".into(),
            username_claim: "email".into(),
            username_prefix: String::new(),
            groups_prefix: String::new(),
        }],
        policies: vec![policy_dir.clone()],
        audit_file: Some(dir.join("audit.log")),
        device_ca_pem: Some(device_ca.cert_pem()),
        state_dir: Some(dir.join("state")),
        ..Default::default()
    };
    let env = DevEnv::create(&dir, pki, &apiserver.url(), &settings).expect("dev env");
    // Production logging defaults (JSON at info), and a known metrics port.
    // Posture required (fail closed), from self-reports of the device agent.
    let config = std::fs::read_to_string(&env.config_path)
        .expect("config")
        .replace("  format: text\n", "  format: json\n")
        .replace(
            "      from: commonName\n",
            "      from: commonName\n    posture:\n      required: true\n      selfReports:\n        ttl: 4h\n",
        );
    assert!(
        config.contains("selfReports"),
        "devices section in the config"
    );
    write(
        &env.config_path,
        &format!("{config}operations:\n  address: 127.0.0.1:{ops_port}\n"),
    );

    // Credentials.
    let certs = dir.join("certs");
    let pki = &env.pki;
    let (dev_crt, dev_key) = device.write(&certs, "device");
    let (gwc_crt, gwc_key) = pki.gateway_client.write(&certs, "gateway-client");
    write(&certs.join("devices-ca.crt"), &device_ca.cert_pem());
    write(&certs.join("cluster-ca.crt"), &pki.cluster_ca.cert_pem());
    let bound = json!({"x5t#S256": ztgate::device::x5t_s256(&device.cert_der)});
    let claims = |sub: &str| {
        json!({
            "groups": ["team-a"],
            "email": format!("{sub}@example.com"),
            "amr": ["pwd", "mfa"],
            "cnf": bound,
        })
    };
    let ttl = Duration::from_secs(4 * 3600);
    let token = issuer.token("alice", "ztgate", ttl, claims("alice"));
    // Same header and claims, signature of another token: fails signature verification.
    let other = issuer.token("mallory", "ztgate", ttl, claims("mallory"));
    let bad_sig = format!(
        "{}.{}",
        token.rsplit_once('.').expect("a JWS").0,
        other.rsplit_once('.').expect("a JWS").1
    );
    let mut tokens = String::new();
    for i in 0..DISTINCT_TOKENS {
        tokens.push_str(&issuer.token(&format!("user-{i}"), "ztgate", ttl, claims("alice")));
        tokens.push('\n');
    }
    write(&dir.join("token"), &token);
    write(&dir.join("token-bad-signature"), &bad_sig);
    write(&dir.join("tokens-distinct"), &tokens);
    // Junk that is not even a JWT, and JWTs naming keys the issuer never had (each one a
    // candidate for a JWKS refresh if the gateway did not rate-limit them).
    let mut junk = String::new();
    for i in 0..DISTINCT_TOKENS {
        let header = ztgate_testkit_b64(&format!(r#"{{"alg":"RS256","kid":"junk-{i}"}}"#));
        let body = ztgate_testkit_b64(&format!(r#"{{"sub":"x{i}","aud":"ztgate"}}"#));
        junk.push_str(&format!("{header}.{body}.c2lnbmF0dXJl\n"));
    }
    write(&dir.join("tokens-unknown-kid"), &junk);

    let mut sh = String::new();
    let mut var = |k: &str, v: &str| sh.push_str(&format!("{k}='{v}'\n"));
    var("DIRECT_URL", &apiserver.url());
    var("GATEWAY_PORT", &gw_port.to_string());
    var("GATEWAY_CONFIG", &env.config_path.display().to_string());
    var("OPS_URL", &format!("http://127.0.0.1:{ops_port}"));
    var("GATEWAY_CA", &env.gateway_ca_path.display().to_string());
    var(
        "CLUSTER_CA",
        &certs.join("cluster-ca.crt").display().to_string(),
    );
    var(
        "DEVICES_CA",
        &certs.join("devices-ca.crt").display().to_string(),
    );
    var("DEVICE_CERT", &dev_crt.display().to_string());
    var("DEVICE_KEY", &dev_key.display().to_string());
    var("UPSTREAM_CERT", &gwc_crt.display().to_string());
    var("UPSTREAM_KEY", &gwc_key.display().to_string());
    var(
        "SERVING_CERT",
        &certs.join("gateway-serving.crt").display().to_string(),
    );
    var(
        "SERVING_KEY",
        &certs.join("gateway-serving.key").display().to_string(),
    );
    var("AUDIT_LOG", &dir.join("audit.log").display().to_string());
    var("ISSUER_URL", &issuer.issuer_url());
    var(
        "POLICY_COUNT",
        &policy_text.matches("@id(").count().to_string(),
    );
    let tmp = dir.join("env.sh.tmp");
    write(&tmp, &sh);
    std::fs::rename(&tmp, dir.join("env.sh")).expect("env.sh");
    println!("bench env ready in {}", dir.display());
    let _ = std::io::stdout().flush();

    let stats = dir.join("issuer-stats.json");
    let stdin_closed = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    });
    tokio::pin!(stdin_closed);
    loop {
        let s = json!({
            "discovery_fetches": issuer.discovery_fetches(),
            "jwks_fetches": issuer.jwks_fetches(),
        });
        let tmp = dir.join("issuer-stats.json.tmp");
        write(&tmp, &s.to_string());
        let _ = std::fs::rename(&tmp, &stats);
        tokio::select! {
            _ = &mut stdin_closed => break,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    apiserver.shutdown().await;
}

fn ztgate_testkit_b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}
