//! The gateway's life: certificate rotation without restart, and graceful shutdown on SIGTERM.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use support::{eventually, get, raw_client, send, Harness};
use ztgate::demo::{DevEnv, DevSettings};
use ztgate_testkit::{ApiServer, ApiServerOptions, TestPki};

/// Completes a TLS handshake with the gateway and returns the leaf certificate it served.
async fn served_leaf(addr: std::net::SocketAddr, ca_pem: &str) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(ztgate::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("handshake");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_serving_cert_files_is_seen_by_new_handshakes() {
    let h = Harness::start_with(DevSettings {
        reload_interval: "100ms",
        ..Default::default()
    })
    .await;
    let pki = &h.demo.env.pki;
    let addr = h.demo.gateway.addr;
    let ca = pki.gateway_ca.cert_pem();
    assert_eq!(served_leaf(addr, &ca).await, pki.gateway_serving.cert_der);

    let rotated = pki.gateway_ca.issue_localhost_server("ztgate-rotated");
    let certs = h.demo.env.dir.join("certs");
    // Write the key first and the certificate last, as a careless rotation might: the gateway
    // must never serve a mismatched pair, and must pick up the pair once both are in place.
    std::fs::write(certs.join("gateway-serving.key"), &rotated.key_pem).unwrap();
    std::fs::write(certs.join("gateway-serving.crt"), &rotated.cert_pem).unwrap();
    eventually(
        Duration::from_secs(10),
        "new handshakes serve the rotated certificate",
        || async { (served_leaf(addr, &ca).await == rotated.cert_der).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_secret_symlink_swap_rotates_the_serving_cert() {
    support::init_logs();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let apiserver = ApiServer::start(ApiServerOptions::new(&pki)).await.unwrap();
    let first = pki.gateway_serving.clone();
    let second = pki.gateway_ca.issue_localhost_server("ztgate-second");
    let env = DevEnv::create(
        dir.path(),
        pki,
        &apiserver.url(),
        &DevSettings {
            reload_interval: "100ms",
            ..Default::default()
        },
    )
    .unwrap();

    // The layout kubelet gives a mounted Secret: files are symlinks through `..data`.
    let secret = dir.path().join("secret");
    let v1 = secret.join("..2026_11_26_v1");
    std::fs::create_dir_all(&v1).unwrap();
    first.write(&v1, "tls");
    std::os::unix::fs::symlink("..2026_11_26_v1", secret.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/tls.crt", secret.join("tls.crt")).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", secret.join("tls.key")).unwrap();
    let yaml = std::fs::read_to_string(&env.config_path)
        .unwrap()
        .replace("certs/gateway-serving.crt", "secret/tls.crt")
        .replace("certs/gateway-serving.key", "secret/tls.key");
    std::fs::write(&env.config_path, yaml).unwrap();
    let gw = ztgate::gateway::start(ztgate::config::load_file(&env.config_path).unwrap())
        .await
        .unwrap();
    let ca = env.pki.gateway_ca.cert_pem();
    assert_eq!(served_leaf(gw.addr, &ca).await, first.cert_der);

    // Atomic swap: new timestamped dir, then rename a new `..data` link over the old one.
    let v2 = secret.join("..2026_11_26_v2");
    std::fs::create_dir_all(&v2).unwrap();
    second.write(&v2, "tls");
    std::os::unix::fs::symlink("..2026_11_26_v2", secret.join("..data_tmp")).unwrap();
    std::fs::rename(secret.join("..data_tmp"), secret.join("..data")).unwrap();
    std::fs::remove_dir_all(&v1).unwrap();

    eventually(
        Duration::from_secs(10),
        "new handshakes serve the certificate the swapped symlink points to",
        || async { (served_leaf(gw.addr, &ca).await == second.cert_der).then_some(()) },
    )
    .await;
    gw.shutdown();
    gw.wait().await;
    apiserver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_request_finish_and_closes_a_watch_cleanly() {
    let pe = support::ProcessEnv::create(DevSettings {
        shutdown_grace: "10s",
        ..Default::default()
    })
    .await;
    let mut child = pe.serve().await.child;
    let (apiserver, env) = (&pe.apiserver, &pe.env);
    let base = pe.base();
    let alice = env.pki.user("alice", &["team-a"]);
    let ca = pe.ca_pem();

    let watch_client = raw_client(&ca, Some(&alice), false);
    let watch = watch_client
        .request(get(&format!(
            "{base}/api/v1/namespaces/team-a/pods?watch=1"
        )))
        .await
        .unwrap();
    assert_eq!(watch.status(), 200);

    apiserver.set_response_delay(Duration::from_millis(1500));
    let slow_client = raw_client(&ca, Some(&alice), false);
    let slow_uri = format!("{base}/api/v1/namespaces/team-a/pods");
    let slow = tokio::spawn(async move { send(&slow_client, get(&slow_uri)).await });
    support::wait_in_flight(apiserver, "/api/v1/namespaces/team-a/pods").await;

    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());

    let (code, _, body) = slow.await.unwrap();
    assert_eq!(code, 200, "the in-flight request finished: {body}");
    assert!(body.contains("web-0"));

    // The watch ends with a clean end of stream (terminating chunk), not a broken connection.
    let collected = tokio::time::timeout(Duration::from_secs(10), watch.into_body().collect())
        .await
        .expect("watch closed in time");
    assert!(collected.is_ok(), "watch closed cleanly: {collected:?}");

    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("gateway exited in time")
        .unwrap();
    assert!(status.success(), "{status:?}");
}
