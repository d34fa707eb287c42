//! Shared test harness: a stand-in kube-apiserver and a gateway in front of it, on ephemeral
//! loopback ports, with helpers for kubectl and for raw HTTP clients.
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tempfile::TempDir;
use ztgate::demo::{Demo, DevSettings};
use ztgate_testkit::CertKey;

pub struct Harness {
    pub demo: Demo,
    pub dir: TempDir,
}

pub type RawClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("ztgate=debug,warn")),
        )
        .with_test_writer()
        .try_init();
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with(DevSettings::default()).await
    }

    pub async fn start_with(settings: DevSettings) -> Harness {
        init_logs();
        let dir = tempfile::tempdir().expect("tempdir");
        let demo = Demo::start(dir.path(), settings)
            .await
            .expect("demo starts");
        Harness { demo, dir }
    }

    pub fn url(&self) -> &str {
        &self.demo.url
    }

    pub fn kubeconfig(&self, user: &str, groups: &[&str]) -> PathBuf {
        self.demo
            .env
            .kubeconfig_for(self.url(), user, groups, "team-a")
    }

    /// Runs kubectl with the given kubeconfig and waits for it (with a deadline).
    pub async fn kubectl(&self, kubeconfig: &Path, args: &[&str]) -> Output {
        self.kubectl_env(kubeconfig, args, &[], None).await
    }

    pub async fn kubectl_env(
        &self,
        kubeconfig: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        stdin: Option<&[u8]>,
    ) -> Output {
        let mut cmd = kubectl_command(kubeconfig, args, env);
        cmd.stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        });
        let mut child = cmd.spawn().expect("kubectl runs");
        if let Some(input) = stdin {
            use tokio::io::AsyncWriteExt;
            let mut s = child.stdin.take().unwrap();
            s.write_all(input).await.unwrap();
            drop(s);
        }
        tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .expect("kubectl finished within 30s")
            .expect("kubectl output")
    }

    /// A raw HTTPS client to the gateway, presenting `cert` when given.
    pub fn client(&self, cert: Option<&CertKey>, http2: bool) -> RawClient {
        raw_client(&self.demo.env.pki.gateway_ca.cert_pem(), cert, http2)
    }

    pub fn uri(&self, path: &str) -> String {
        format!("{}{}", self.url(), path)
    }
}

pub fn kubectl_command(
    kubeconfig: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("kubectl");
    cmd.args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("HOME", kubeconfig.parent().unwrap())
        .env_remove("KUBECTL_REMOTE_COMMAND_WEBSOCKETS")
        .env_remove("KUBECTL_PORT_FORWARD_WEBSOCKETS")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

pub fn raw_client(ca_pem: &str, cert: Option<&CertKey>, http2: bool) -> RawClient {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(ztgate::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let tls = match cert {
        Some(ck) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(ck.cert_pem.as_bytes())
                    .map(|c| c.unwrap())
                    .collect();
            let key = PrivateKeyDer::from_pem_slice(ck.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let connector = if http2 {
        b.enable_http2().build()
    } else {
        b.enable_http1().build()
    };
    let mut cb = Client::builder(TokioExecutor::new());
    if http2 {
        cb.http2_only(true);
    }
    cb.build(connector)
}

pub fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::new(Bytes::new())).unwrap()
}

pub async fn send(client: &RawClient, req: Request<Full<Bytes>>) -> (u16, http::HeaderMap, String) {
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("response within 20s")
        .expect("response");
    read_all(resp).await
}

pub async fn read_all(resp: Response<Incoming>) -> (u16, http::HeaderMap, String) {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// Parses a kube `Status` body and returns (code, reason).
pub fn status_of(body: &str) -> (u64, String) {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    assert_eq!(v["kind"], "Status", "{body}");
    assert_eq!(v["apiVersion"], "v1", "{body}");
    (
        v["code"].as_u64().unwrap(),
        v["reason"].as_str().unwrap_or_default().to_owned(),
    )
}

pub fn shared<T>(t: T) -> Arc<T> {
    Arc::new(t)
}

/// An ephemeral loopback port (bound and released; the caller binds it again at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local addr")
        .port()
}

/// Files for a gateway run as its own process (`ztgate serve`): a stand-in kube-apiserver, the
/// dev config on a free loopback port, its PKI.
pub struct ProcessEnv {
    pub env: ztgate::demo::DevEnv,
    pub apiserver: ztgate_testkit::ApiServer,
    pub port: u16,
    pub dir: TempDir,
}

impl ProcessEnv {
    /// `settings.listen` is replaced by a free port; the operations listener is off.
    pub async fn create(settings: DevSettings) -> ProcessEnv {
        init_logs();
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = ztgate_testkit::TestPki::new();
        let apiserver =
            ztgate_testkit::ApiServer::start(ztgate_testkit::ApiServerOptions::new(&pki))
                .await
                .expect("stand-in kube-apiserver starts");
        let port = free_port();
        let env = ztgate::demo::DevEnv::create(
            dir.path(),
            pki,
            &apiserver.url(),
            &DevSettings {
                listen: format!("127.0.0.1:{port}"),
                operations: false,
                ..settings
            },
        )
        .expect("dev config");
        ProcessEnv {
            env,
            apiserver,
            port,
            dir,
        }
    }

    pub fn base(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn ca_pem(&self) -> String {
        self.env.pki.gateway_ca.cert_pem()
    }

    /// `ztgate serve` on this config, ready.
    pub async fn serve(&self) -> ServeProcess {
        ServeProcess::start(&self.env.config_path, &self.base(), &self.ca_pem()).await
    }
}

/// A `ztgate serve --config …` process, killed when dropped.
pub struct ServeProcess {
    pub child: tokio::process::Child,
}

impl ServeProcess {
    /// Starts the binary and waits (up to 20 s) until `base/readyz` answers 200.
    pub async fn start(config: &Path, base: &str, ca_pem: &str) -> ServeProcess {
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ztgate"))
            .args(["serve", "--config"])
            .arg(config)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("ztgate serve starts");
        let mut p = ServeProcess { child };
        p.wait_ready(base, ca_pem).await;
        p
    }

    /// Waits until `base/readyz` answers 200; fails at once if the process exits.
    pub async fn wait_ready(&mut self, base: &str, ca_pem: &str) {
        let client = raw_client(ca_pem, None, false);
        for _ in 0..200 {
            let r = tokio::time::timeout(
                Duration::from_secs(1),
                client.request(get(&format!("{base}/readyz"))),
            )
            .await;
            if matches!(r, Ok(Ok(ref r)) if r.status() == 200) {
                return;
            }
            self.assert_running();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("ztgate serve at {base} not ready within 20 s");
    }

    pub fn assert_running(&mut self) {
        let status = self.child.try_wait().expect("process status");
        assert!(status.is_none(), "ztgate serve exited: {status:?}");
    }

    /// Sends `signal` (`-9`, `-TERM`, ...) with kill(1).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running").to_string();
        let ok = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill {signal} {pid}");
    }

    /// `kill -9`, then reaps the process.
    pub async fn kill9(&mut self) {
        self.signal("-9");
        let _ = self.child.wait().await;
    }
}

/// Reads a (watch) body until it ends or fails; returns everything it carried, as text.
pub async fn drain(body: Incoming) -> String {
    let bytes = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Polls `check` every 20 ms until it returns `Some`, and returns that value; panics naming
/// `what` when `within` has passed first (a check still running then is cut off). Tests wait
/// with this for the condition they need, not for a fixed time.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, check()).await {
            Ok(Some(v)) => return v,
            Ok(None) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ => panic!("not within {within:?}: {what}"),
        }
    }
}

/// [`eventually`] for a condition that needs no awaiting.
pub async fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    eventually(within, what, || std::future::ready(cond().then_some(()))).await
}

/// Waits until the stand-in kube-apiserver holds a request for `path` (a plain GET, not a
/// watch) that it has not answered yet: the gateway is then forwarding it.
pub async fn wait_in_flight(apiserver: &ztgate_testkit::ApiServer, path: &str) {
    wait_until(
        Duration::from_secs(10),
        &format!("the stand-in kube-apiserver holds a request for {path}"),
        || {
            apiserver
                .requests()
                .iter()
                .any(|r| r.path == path && r.query.is_none() && r.status == 0)
        },
    )
    .await
}
