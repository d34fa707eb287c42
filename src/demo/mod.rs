//! `ztgate demo`: a stand-in kube-apiserver, a gateway in front of it with a generated dev config
//! and certificates, and a kubeconfig for the demo user — one command for a newcomer.
//!
//! The same [`DevEnv`] builds the environment of the integration tests, so the demo cannot rot
//! without the tests noticing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ztgate_testkit::{ApiServer, ApiServerOptions, CertKey, TestPki};

use crate::server::RunningGateway;

pub struct DemoOptions {
    pub kubeconfig_out: Option<PathBuf>,
    pub dir: Option<PathBuf>,
    pub port: u16,
}

/// Files written for a dev gateway: certificates, config, and a way to write kubeconfigs.
pub struct DevEnv {
    pub dir: PathBuf,
    pub pki: TestPki,
    pub config_path: PathBuf,
    pub gateway_ca_path: PathBuf,
}

/// Settings that tests vary.
#[derive(Clone, Debug)]
pub struct DevSettings {
    pub listen: String,
    pub request_timeout: &'static str,
    pub reload_interval: &'static str,
    pub shutdown_grace: &'static str,
    pub max_request_body_bytes: u64,
    pub max_inflight_requests: u32,
    pub operations: bool,
}

impl Default for DevSettings {
    fn default() -> Self {
        DevSettings {
            listen: "127.0.0.1:0".into(),
            request_timeout: "60s",
            reload_interval: "10s",
            shutdown_grace: "30s",
            max_request_body_bytes: 3 * 1024 * 1024,
            max_inflight_requests: 400,
            operations: true,
        }
    }
}

impl DevEnv {
    /// Writes certificates and a GatewayConfig for a gateway in front of `upstream_url`.
    pub fn create(
        dir: &Path,
        pki: TestPki,
        upstream_url: &str,
        s: &DevSettings,
    ) -> std::io::Result<DevEnv> {
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs)?;
        pki.gateway_serving.write(&certs, "gateway-serving");
        pki.gateway_client.write(&certs, "gateway-client");
        std::fs::write(certs.join("users-ca.crt"), pki.users_ca.cert_pem())?;
        std::fs::write(certs.join("cluster-ca.crt"), pki.cluster_ca.cert_pem())?;
        let gateway_ca_path = certs.join("gateway-ca.crt");
        std::fs::write(&gateway_ca_path, pki.gateway_ca.cert_pem())?;
        let ops = if s.operations {
            "operations:\n  address: 127.0.0.1:0\n"
        } else {
            ""
        };
        let config = format!(
            r#"apiVersion: ztgate.dev/v1alpha1
kind: GatewayConfig
listener:
  address: {listen}
  servingCertificate:
    certFile: certs/gateway-serving.crt
    keyFile: certs/gateway-serving.key
  clientCertificateBundles:
    - name: users
      caFile: certs/users-ca.crt
  reloadInterval: {reload}
{ops}upstream:
  url: {upstream_url}
  caFile: certs/cluster-ca.crt
  clientCertificate:
    certFile: certs/gateway-client.crt
    keyFile: certs/gateway-client.key
authentication:
  x509:
    bundle: users
timeouts:
  request: {timeout}
  shutdownGrace: {grace}
limits:
  maxRequestBodyBytes: {body}
  maxInflightRequests: {inflight}
logging:
  format: text
  level: info
"#,
            listen = s.listen,
            reload = s.reload_interval,
            timeout = s.request_timeout,
            grace = s.shutdown_grace,
            body = s.max_request_body_bytes,
            inflight = s.max_inflight_requests,
        );
        let config_path = dir.join("gateway.yaml");
        std::fs::write(&config_path, config)?;
        Ok(DevEnv {
            dir: dir.to_owned(),
            pki,
            config_path,
            gateway_ca_path,
        })
    }

    /// Issues a user certificate from the users CA and writes a kubeconfig that uses it.
    pub fn kubeconfig_for(
        &self,
        gateway_url: &str,
        user: &str,
        groups: &[&str],
        namespace: &str,
    ) -> PathBuf {
        let ck = self.pki.user(user, groups);
        self.kubeconfig_with_cert(gateway_url, user, &ck, namespace)
    }

    /// Writes a kubeconfig presenting `ck` to the gateway at `gateway_url`.
    pub fn kubeconfig_with_cert(
        &self,
        gateway_url: &str,
        name: &str,
        ck: &CertKey,
        namespace: &str,
    ) -> PathBuf {
        let users = self.dir.join("users");
        std::fs::create_dir_all(&users).expect("users dir");
        let (crt, key) = ck.write(&users, name);
        let path = self.dir.join(format!("{name}.kubeconfig"));
        let kubeconfig = format!(
            r#"apiVersion: v1
kind: Config
clusters:
  - name: ztgate
    cluster:
      server: {gateway_url}
      certificate-authority: {ca}
users:
  - name: {name}
    user:
      client-certificate: {crt}
      client-key: {key}
contexts:
  - name: {name}@ztgate
    context:
      cluster: ztgate
      user: {name}
      namespace: {namespace}
current-context: {name}@ztgate
"#,
            ca = self.gateway_ca_path.display(),
            crt = crt.display(),
            key = key.display(),
        );
        std::fs::write(&path, kubeconfig).expect("write kubeconfig");
        path
    }
}

/// A demo environment: the stand-in and the gateway, running.
pub struct Demo {
    pub env: DevEnv,
    pub apiserver: ApiServer,
    pub gateway: RunningGateway,
    pub url: String,
}

impl Demo {
    pub async fn start(dir: &Path, settings: DevSettings) -> Result<Demo, String> {
        let pki = TestPki::new();
        let apiserver = ApiServer::start(ApiServerOptions::new(&pki))
            .await
            .map_err(|e| format!("stand-in kube-apiserver: {e}"))?;
        let env =
            DevEnv::create(dir, pki, &apiserver.url(), &settings).map_err(|e| e.to_string())?;
        let cfg = crate::config::load_file(&env.config_path).map_err(|e| e.to_string())?;
        let gateway = crate::server::start(cfg).await.map_err(|e| e.to_string())?;
        let url = format!("https://127.0.0.1:{}", gateway.addr.port());
        // Wait (briefly) until the gateway sees its upstream, so the first kubectl call works.
        for _ in 0..50 {
            if gateway.gateway.is_ready() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Demo {
            env,
            apiserver,
            gateway,
            url,
        })
    }
}

pub async fn run(o: DemoOptions) -> Result<(), String> {
    let (dir, _tmp_guard) = match o.dir {
        Some(d) => {
            std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
            (d, None)
        }
        None => {
            let d = std::env::temp_dir().join(format!("ztgate-demo-{}", std::process::id()));
            std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
            (d.clone(), Some(d))
        }
    };
    let settings = DevSettings {
        listen: format!("127.0.0.1:{}", o.port),
        ..Default::default()
    };
    let demo = Demo::start(&dir, settings).await?;
    let alice = demo
        .env
        .kubeconfig_for(&demo.url, "alice", &["team-a"], "team-a");
    let kubeconfig = match o.kubeconfig_out {
        Some(p) => {
            std::fs::copy(&alice, &p).map_err(|e| format!("{}: {e}", p.display()))?;
            p
        }
        None => alice,
    };
    let k = kubeconfig.display();
    println!(
        r#"ztgate demo is running.

  stand-in kube-apiserver  {apiserver}
  ztgate gateway           {url}
  metrics                  http://{ops}/metrics
  gateway config           {config}
  kubeconfig (alice, group team-a)  {k}

Try:
  export KUBECONFIG={k}
  kubectl auth whoami                       # alice, groups team-a + system:authenticated (impersonated)
  kubectl get pods -n team-a                # allowed
  kubectl get pods -n team-b                # Forbidden by the cluster's RBAC
  kubectl get pods -n team-a -w             # a watch, streamed through the gateway
  echo hello | kubectl exec -i web-0 -n team-a -- cat
  kubectl logs -f web-0 -n team-a
  kubectl port-forward -n team-a pod/web-0 8080:80

Press Ctrl-C to stop."#,
        apiserver = demo.apiserver.url(),
        url = demo.url,
        ops = demo
            .gateway
            .ops_addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into()),
        config = demo.env.config_path.display(),
    );
    let _ = tokio::signal::ctrl_c().await;
    println!("stopping");
    demo.gateway.shutdown();
    demo.gateway.wait().await;
    demo.apiserver.shutdown().await;
    if let Some(d) = _tmp_guard {
        let _ = std::fs::remove_dir_all(d);
    }
    Ok(())
}
