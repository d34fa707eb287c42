//! `ztgate demo`: a stand-in kube-apiserver, a gateway in front of it with a generated dev config
//! and certificates, and a kubeconfig for the demo user — one command for a newcomer.
//!
//! The same [`DevEnv`] builds the environment of the integration tests, so the demo cannot rot
//! without the tests noticing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ztgate_testkit::oidc::{DevUser, Minting};
use ztgate_testkit::{ApiServer, ApiServerOptions, CertKey, DevIssuer, TestPki};

use crate::gateway::RunningGateway;

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
    /// Cedar policy files or directories (absolute); none means delegated authorization.
    pub policies: Vec<PathBuf>,
    pub policy_reload_interval: &'static str,
    /// OIDC issuers the gateway trusts.
    pub jwt: Vec<DevJwtIssuer>,
    /// Serve TokenReview / SubjectAccessReview to callers with a cluster-CA certificate.
    pub webhooks: bool,
    /// Write audit events (JSON lines) to this file.
    pub audit_file: Option<PathBuf>,
    /// The whole `audit` section (YAML starting at `audit:`), appended to the config as is — for
    /// overflow modes and sinks other than one file. Cannot be combined with `audit_file`.
    pub audit_yaml: Option<String>,
    /// CA (PEM) of device certificates; devices are identified by their CN.
    pub device_ca_pem: Option<String>,
    /// SPIFFE trust domains (name, CA PEM) whose workload SVIDs authenticate as
    /// `spiffe:<SPIFFE ID>`.
    pub workloads: Vec<(String, String)>,
    /// `timeouts.maxStreamAge`, when set.
    pub max_stream_age: Option<&'static str>,
    /// The `authentication.devices.posture` block (YAML, starting at `posture:`), with
    /// `device_ca_pem`.
    pub device_posture_yaml: Option<String>,
    /// Keep locks and posture in this directory (else in memory).
    pub state_dir: Option<PathBuf>,
    /// The `state.etcd` block (YAML, starting at `etcd:`, not indented); instead of `state_dir`.
    pub state_etcd_yaml: Option<String>,
    /// The web login (`sso`), with its own `authentication.jwt` entry for the provider.
    pub sso: Option<DevSso>,
}

/// The `sso` section of a dev config and the `authentication.jwt` entry it verifies with: the
/// provider's two clients (the gateway's, confidential; `ztgate login`'s, public) are both
/// audiences; usernames are the `email` claim, groups the `groups` claim.
#[derive(Clone, Debug)]
pub struct DevSso {
    pub issuer_url: String,
    pub issuer_ca_pem: String,
    pub client_id: String,
    pub client_secret: String,
    pub cli_client_id: String,
    pub cli_scopes: Vec<String>,
}

/// One `authentication.jwt` entry of a dev config.
#[derive(Clone, Debug)]
pub struct DevJwtIssuer {
    pub url: String,
    pub ca_pem: String,
    pub audience: String,
    pub username_claim: String,
    pub username_prefix: String,
    pub groups_prefix: String,
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
            policies: Vec::new(),
            policy_reload_interval: "2s",
            jwt: Vec::new(),
            webhooks: false,
            audit_file: None,
            audit_yaml: None,
            device_ca_pem: None,
            device_posture_yaml: None,
            max_stream_age: None,
            workloads: Vec::new(),
            state_dir: None,
            state_etcd_yaml: None,
            sso: None,
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
        create_private_dir_all(&certs)?;
        write_cert_key(&certs, "gateway-serving", &pki.gateway_serving)?;
        // kube-apiserver lets this certificate impersonate anyone.
        write_cert_key(&certs, "gateway-client", &pki.gateway_client)?;
        std::fs::write(certs.join("users-ca.crt"), pki.users_ca.cert_pem())?;
        std::fs::write(certs.join("cluster-ca.crt"), pki.cluster_ca.cert_pem())?;
        let gateway_ca_path = certs.join("gateway-ca.crt");
        std::fs::write(&gateway_ca_path, pki.gateway_ca.cert_pem())?;
        let ops = if s.operations {
            "operations:\n  address: 127.0.0.1:0\n"
        } else {
            ""
        };
        let mut jwt = String::new();
        for (i, j) in s.jwt.iter().enumerate() {
            let ca = certs.join(format!("issuer-{i}-ca.crt"));
            std::fs::write(&ca, &j.ca_pem)?;
            jwt.push_str(&format!(
                r#"    - issuer:
        url: {url}
        audiences: [{aud}]
        certificateAuthorityFile: {ca}
      claimMappings:
        username:
          claim: {uclaim}
          prefix: "{uprefix}"
        groups:
          claim: groups
          prefix: "{gprefix}"
      claimsForPolicy: [amr]
"#,
                url = j.url,
                aud = j.audience,
                ca = ca.display(),
                uclaim = j.username_claim,
                uprefix = j.username_prefix,
                gprefix = j.groups_prefix,
            ));
        }
        let mut sso = String::new();
        if let Some(s) = &s.sso {
            let ca = certs.join("sso-issuer-ca.crt");
            std::fs::write(&ca, &s.issuer_ca_pem)?;
            let secret = certs.join("sso-client-secret");
            write_private(&secret, &s.client_secret)?;
            let mut key = [0u8; 32];
            aws_lc_rs::rand::fill(&mut key).map_err(std::io::Error::other)?;
            write_private(&certs.join("sso-session.key"), key)?;
            jwt.push_str(&format!(
                r#"    - issuer:
        url: {url}
        audiences: [{client}, {cli}]
        audienceMatchPolicy: MatchAny
        certificateAuthorityFile: {ca}
      claimMappings:
        username:
          claim: email
          prefix: ""
        groups:
          claim: groups
          prefix: ""
"#,
                url = s.issuer_url,
                client = s.client_id,
                cli = s.cli_client_id,
                ca = ca.display(),
            ));
            sso = format!(
                "sso:\n  issuer: {url}\n  clientId: {client}\n  clientSecretFile: {secret}\n  sessionKeyFile: certs/sso-session.key\n  gatewayCaFile: certs/gateway-ca.crt\n  scopes: [openid, email, profile, groups]\n  cli:\n    clientId: {cli}\n    scopes: [{scopes}]\n",
                url = s.issuer_url,
                client = s.client_id,
                secret = secret.display(),
                cli = s.cli_client_id,
                scopes = s.cli_scopes.join(", "),
            );
        }
        let jwt = if jwt.is_empty() {
            String::new()
        } else {
            format!("  jwt:\n{jwt}")
        };
        let token_review = if s.webhooks && !s.jwt.is_empty() {
            "  tokenReview:\n    callerBundle: kube-apiserver\n"
        } else {
            ""
        };
        let authorization = if s.policies.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = s
                .policies
                .iter()
                .map(|p| format!("\"{}\"", p.display()))
                .collect();
            let sar = if s.webhooks {
                "  subjectAccessReview:\n    callerBundle: kube-apiserver\n"
            } else {
                ""
            };
            format!(
                "authorization:\n  policies: [{}]\n  reloadInterval: {}\n{sar}",
                list.join(", "),
                s.policy_reload_interval
            )
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
    - name: kube-apiserver
      caFile: certs/cluster-ca.crt
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
{jwt}{token_review}{authorization}timeouts:
  request: {timeout}
  shutdownGrace: {grace}
{max_age}limits:
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
            max_age = s
                .max_stream_age
                .map(|a| format!("  maxStreamAge: {a}\n"))
                .unwrap_or_default(),
            body = s.max_request_body_bytes,
            inflight = s.max_inflight_requests,
        );
        let config = match &s.device_ca_pem {
            Some(pem) => {
                std::fs::write(certs.join("devices-ca.crt"), pem)?;
                config
                    .replace(
                        "    - name: kube-apiserver\n",
                        "    - name: devices\n      caFile: certs/devices-ca.crt\n    - name: kube-apiserver\n",
                    )
                    .replace(
                        "authentication:\n",
                        &format!(
                            "authentication:\n  devices:\n    bundle: devices\n    deviceId:\n      from: commonName\n{}",
                            s.device_posture_yaml
                                .as_deref()
                                .map(|y| indent(y, 4))
                                .unwrap_or_default()
                        ),
                    )
            }
            None => config,
        };
        let mut config = config;
        if !s.workloads.is_empty() {
            let mut mappings = String::from("authentication:\n  workloads:\n");
            for (i, (trust_domain, pem)) in s.workloads.iter().enumerate() {
                std::fs::write(certs.join(format!("spiffe-{i}.crt")), pem)?;
                config = config.replace(
                    "    - name: kube-apiserver\n",
                    &format!("    - name: spiffe-{i}\n      caFile: certs/spiffe-{i}.crt\n    - name: kube-apiserver\n"),
                );
                mappings.push_str(&format!(
                    "    - trustDomain: {trust_domain}\n      bundle: spiffe-{i}\n      usernamePrefix: \"spiffe:\"\n"
                ));
            }
            config = config.replace("authentication:\n", &mappings);
        }
        let config = format!("{config}{sso}");
        let config = match (&s.state_dir, &s.state_etcd_yaml) {
            (Some(d), _) => format!("{config}state:\n  directory: \"{}\"\n", d.display()),
            (None, Some(etcd)) => {
                let block: String = etcd.lines().map(|l| format!("  {l}\n")).collect();
                format!("{config}state:\n{block}")
            }
            (None, None) => config,
        };
        let config = match &s.audit_file {
            Some(p) => format!(
                "{config}audit:\n  sinks:\n    - type: file\n      path: \"{}\"\n",
                p.display()
            ),
            None => config,
        };
        let config = match &s.audit_yaml {
            Some(_) if s.audit_file.is_some() => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "DevSettings: audit_file and audit_yaml both write the audit section",
                ))
            }
            Some(y) => format!("{config}{}\n", y.trim_end()),
            None => config,
        };
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
        create_private_dir_all(&users).expect("users dir");
        let (crt, key) = write_cert_key(&users, name, ck).expect("write user certificate");
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

impl DevEnv {
    /// A kubeconfig whose user gets a token from the dev issuer's exec-credential endpoint
    /// (client-go runs `curl`, and runs it again when the token expires).
    pub fn kubeconfig_with_dev_login(
        &self,
        gateway_url: &str,
        issuer: &DevIssuer,
        user: &str,
        groups: &[&str],
        namespace: &str,
    ) -> PathBuf {
        let ca = self.dir.join("certs").join("dev-issuer-ca.crt");
        std::fs::write(&ca, issuer.ca_pem()).expect("write issuer CA");
        let url = format!(
            "{}/dev/exec-credential?sub={user}&groups={}&aud=ztgate&ttl=600",
            issuer.issuer_url(),
            groups.join(",")
        );
        let path = self.dir.join(format!("{user}-login.kubeconfig"));
        let kubeconfig = format!(
            r#"apiVersion: v1
kind: Config
clusters:
  - name: ztgate
    cluster:
      server: {gateway_url}
      certificate-authority: {gw_ca}
users:
  - name: {user}
    user:
      exec:
        apiVersion: client.authentication.k8s.io/v1
        command: curl
        args: ["-s", "--cacert", "{ca}", "{url}"]
        interactiveMode: Never
        provideClusterInfo: false
contexts:
  - name: {user}@ztgate
    context:
      cluster: ztgate
      user: {user}
      namespace: {namespace}
current-context: {user}@ztgate
"#,
            gw_ca = self.gateway_ca_path.display(),
            ca = ca.display(),
        );
        std::fs::write(&path, kubeconfig).expect("write kubeconfig");
        path
    }
}

/// A demo environment: the stand-in and the gateway, running.
pub struct Demo {
    pub env: DevEnv,
    pub apiserver: ApiServer,
    /// The development OIDC issuer, when the demo runs with token login.
    pub issuer: Option<DevIssuer>,
    pub gateway: RunningGateway,
    pub url: String,
}

/// The only user the demo's dev issuer mints tokens for, and the groups it may claim: the
/// issuer answers anyone who can reach its port, so it must not mint any other identity (a
/// `security` token would manage locks).
const DEMO_LOGIN_USER: (&str, &[&str]) = ("alice", &["team-a"]);

/// The demo's policies: discovery for everyone, namespace team-a for its group, the lock API for
/// `security`, a forbid that shows what a policy denial looks like, and the forbids that keep
/// "anything in namespace team-a" from becoming more than that (tests/it/escalations.rs).
pub const DEMO_POLICIES: &str = r#"// Demo policies (Cedar). Edit this file while the demo runs: the gateway reloads it.
//
// team-a may do anything in its namespace except what the forbids below take away: the ways in
// which "anything in one namespace" would become more than that. Check a change with
// `ztgate policy check` (docs/policy.md, "Escalation paths").

@id("discovery-read")
permit (
  principal,
  action == k8s::Action::"get",
  resource is k8s::NonResourceURL
)
when {
  resource.path == "/api" || resource.path like "/api/*" ||
  resource.path == "/apis" || resource.path like "/apis/*" ||
  resource.path like "/openapi/*" || resource.path == "/version"
};

@id("team-a-namespace")
permit (
  principal in k8s::Group::"team-a",
  action,
  resource in k8s::Namespace::"team-a"
);

@id("security-manages-locks")
permit (
  principal in k8s::Group::"security",
  action,
  resource is k8s::NonResourceURL
)
when { resource.path like "/v1/locks*" };

@id("devices-need-encrypted-disks")
@reason("the last posture report of this device says its disk is not encrypted (or could not tell)")
forbid (principal, action, resource is k8s::Resource)
when { context has device && context.device has posture && !context.device.posture.diskEncrypted };

// An eviction deletes the pod too.
@id("no-pod-deletion")
@reason("deleting pods goes through the release pipeline, not kubectl")
forbid (principal, action, resource is k8s::Resource)
when {
  resource.resource == "pods" &&
  (action in [k8s::Action::"delete", k8s::Action::"deletecollection"] ||
   resource.subresource == "eviction")
};

// The namespace object is in its own namespace, so the permit above covers it: without this,
// team-a could delete its namespace (and everything in it) or relabel it to a weaker pod
// security level.
@id("namespaces-are-platform-owned")
@reason("namespaces are changed and deleted by the platform team, not through the gateway")
forbid (
  principal,
  action in [k8s::Action::"update", k8s::Action::"patch",
             k8s::Action::"delete", k8s::Action::"deletecollection"],
  resource is k8s::Resource
)
when { resource.resource == "namespaces" };

@id("no-secret-reads")
@reason("secrets are not readable through the demo gateway")
forbid (principal, action in k8s::Action::"read", resource is k8s::Resource)
when { resource.resource == "secrets" };

// Credentials that work without the gateway escape its locks, posture checks and audit.
@id("no-credentials-minted-through-the-gateway")
@reason("service account tokens and certificates are credentials that work without the gateway; they are not issued through it")
forbid (principal, action, resource is k8s::Resource)
when {
  (resource.resource == "serviceaccounts" && resource.subresource == "token") ||
  (resource.apiGroup == "certificates.k8s.io" && action in k8s::Action::"write") ||
  action in [k8s::Action::"approve", k8s::Action::"sign"]
};

// A role or binding grants rights to identities that never pass through the gateway.
@id("rbac-is-platform-owned")
@reason("roles and role bindings are changed by the platform team, not through the gateway")
forbid (principal, action, resource is k8s::Resource)
when {
  action in [k8s::Action::"bind", k8s::Action::"escalate"] ||
  (resource.apiGroup == "rbac.authorization.k8s.io" && action in k8s::Action::"write")
};

// pods/proxy and services/proxy reach a workload's HTTP port from kube-apiserver's address;
// nodes/proxy reaches the kubelet, which runs commands in any pod of its node.
@id("no-proxy-subresources")
@reason("the proxy subresources reach into pods, services and kubelets past the gateway's view; use port-forward")
forbid (principal, action, resource is k8s::Resource)
when { resource.subresource == "proxy" || action == k8s::Action::"proxy" };

@id("no-system-impersonation")
@reason("impersonating system: users, groups or service accounts is not allowed")
forbid (principal, action == k8s::Action::"impersonate", resource)
when {
  (resource is k8s::ImpersonatedUser && resource.name like "system:*") ||
  (resource is k8s::ImpersonatedGroup && resource.name like "system:*")
};
"#;

impl Demo {
    pub async fn start(dir: &Path, settings: DevSettings) -> Result<Demo, DemoError> {
        Self::start_inner(dir, settings, false).await
    }

    /// The full demo: OIDC token login through the dev issuer and Cedar policies.
    pub async fn start_with_login(dir: &Path, settings: DevSettings) -> Result<Demo, DemoError> {
        Self::start_inner(dir, settings, true).await
    }

    async fn start_inner(
        dir: &Path,
        mut settings: DevSettings,
        login: bool,
    ) -> Result<Demo, DemoError> {
        let pki = TestPki::new();
        let apiserver = ApiServer::start(ApiServerOptions::new(&pki))
            .await
            .map_err(DemoError::ApiServer)?;
        let issuer = if login {
            let (user, groups) = DEMO_LOGIN_USER;
            let minting = Minting::Only(vec![DevUser::new(user, groups)]);
            let issuer = DevIssuer::start_minting(&pki.gateway_ca, "", minting)
                .await
                .map_err(DemoError::Issuer)?;
            settings.jwt.push(DevJwtIssuer {
                url: issuer.issuer_url(),
                ca_pem: issuer.ca_pem(),
                audience: "ztgate".into(),
                username_claim: "email".into(),
                username_prefix: String::new(),
                groups_prefix: String::new(),
            });
            let policies = dir.join("policies");
            create_private_dir_all(&policies)?;
            std::fs::write(policies.join("demo.cedar"), DEMO_POLICIES)?;
            settings.policies.push(policies);
            settings.policy_reload_interval = "1s";
            settings.state_dir = Some(dir.join("state"));
            Some(issuer)
        } else {
            None
        };
        let env = DevEnv::create(dir, pki, &apiserver.url(), &settings)?;
        let cfg = crate::config::load_file(&env.config_path).map_err(DemoError::Config)?;
        let reload = cfg.listener.reload_interval.get();
        let gateway = crate::gateway::start(cfg).await?;
        crate::gateway::spawn_config_reloader(
            gateway.gateway.clone(),
            env.config_path.clone(),
            reload,
        );
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
            issuer,
            gateway,
            url,
        })
    }
}

pub async fn run(o: DemoOptions) -> Result<(), DemoError> {
    let (dir, tmp_guard) = match o.dir {
        Some(d) => {
            create_demo_dir(&d)?;
            (d, None)
        }
        None => {
            let d = create_temp_demo_dir()?;
            (d.clone(), Some(d))
        }
    };
    // Device trust: alice's laptop has a device certificate; the gateway wants a fresh posture
    // report from any device that presents one (self-reports count for 10 minutes).
    let device_ca = ztgate_testkit::pki::Ca::new("ztgate demo device CA");
    let settings = DevSettings {
        listen: format!("127.0.0.1:{}", o.port),
        device_ca_pem: Some(device_ca.cert_pem()),
        device_posture_yaml: Some(
            "posture:\n  required: true\n  selfReports:\n    ttl: 10m\n".into(),
        ),
        ..Default::default()
    };
    let demo = Demo::start_with_login(&dir, settings).await?;
    let issuer = demo.issuer.as_ref().expect("login demo has an issuer");
    let (user, groups) = DEMO_LOGIN_USER;
    let alice = demo
        .env
        .kubeconfig_with_dev_login(&demo.url, issuer, user, groups, "team-a");
    let alice_cert = demo
        .env
        .kubeconfig_for(&demo.url, "alice-cert", &["team-a"], "team-a");
    let laptop = device_ca.issue_client("alice-laptop", &[]);
    let (laptop_crt, laptop_key) = write_cert_key(&dir, "alice-laptop", &laptop)?;
    // client-go sends an exec plugin's token only with the plugin's own client certificate, so
    // the laptop's plugin returns both: the dev issuer's token and the device certificate (as
    // `ztgate login --device-cert/--device-key` does against a real provider).
    let alice_laptop = dir.join("alice-laptop.kubeconfig");
    let plugin = dir.join("alice-laptop-credential.sh");
    let kubeconfig_text = std::fs::read_to_string(&alice)?;
    let curl = kubeconfig_text
        .lines()
        .find_map(|l| l.trim().strip_prefix("args: "))
        .and_then(|a| serde_json::from_str::<Vec<String>>(a).ok())
        .ok_or(DemoError::NoExecArgs)?;
    std::fs::write(
        &plugin,
        format!(
            r#"#!/bin/sh
# kubectl exec credential plugin of the ztgate demo: a token from the dev issuer, plus the
# laptop's device certificate and key.
set -e
pem() {{ awk '{{printf "%s\\n", $0}}' "$1"; }}
cred=$(curl {args})
token=$(printf '%s' "$cred" | sed -n 's/.*"token":"\([^"]*\)".*/\1/p')
exp=$(printf '%s' "$cred" | sed -n 's/.*"expirationTimestamp":"\([^"]*\)".*/\1/p')
printf '{{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{{"token":"%s","expirationTimestamp":"%s","clientCertificateData":"%s","clientKeyData":"%s"}}}}\n' \
  "$token" "$exp" "$(pem '{crt}')" "$(pem '{key}')"
"#,
            args = curl
                .iter()
                .map(|a| format!("'{a}'"))
                .collect::<Vec<_>>()
                .join(" "),
            crt = laptop_crt.display(),
            key = laptop_key.display(),
        ),
    )?;
    let with_device = kubeconfig_text
        .replace("command: curl", "command: sh")
        .lines()
        .map(|l| {
            if l.trim().starts_with("args: ") {
                format!("        args: [\"{}\"]", plugin.display())
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&alice_laptop, with_device + "\n")?;
    let ztgate = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "ztgate".into());
    let admin = demo.env.pki.user("sec-admin", &["security"]);
    let (admin_crt, admin_key) = write_cert_key(&dir, "sec-admin", &admin)?;
    let kubeconfig = match o.kubeconfig_out {
        Some(p) => {
            let text = std::fs::read(&alice).map_err(|cause| DemoError::File {
                path: alice.clone(),
                cause,
            })?;
            replace_private(&p, &text).map_err(|cause| DemoError::KubeconfigOut {
                path: p.clone(),
                cause,
            })?;
            p
        }
        None => alice,
    };
    let k = kubeconfig.display();
    println!(
        r#"ztgate demo is running.

  demo directory           {dir_shown}  (yours only: keys and policies)
  stand-in kube-apiserver  {apiserver}
  dev OIDC issuer          {issuer_url}  (development only, see below)
  ztgate gateway           {url}
  metrics                  http://{ops}/metrics
  gateway config           {config}
  policies (edit live)     {policies}
  kubeconfig (alice, OIDC token login)      {k}
  kubeconfig (alice, client certificate)    {cert}

Try:
  export KUBECONFIG={k}
  kubectl auth whoami                 # alice@example.com from the OIDC token, impersonated upstream
  kubectl get pods -n team-a          # allowed by policy "team-a-namespace"
  kubectl get pods -n team-b          # Forbidden at the gateway: no policy allows it
  kubectl delete pod web-1 -n team-a  # Forbidden by policy "no-pod-deletion", with its reason
  kubectl auth can-i delete pods -n team-a   # no: the gateway's policy answers
  kubectl get pods -n team-a -w       # a watch, streamed through the gateway
  echo hello | kubectl exec -i web-0 -n team-a -- cat
  kubectl logs -f web-0 -n team-a
  kubectl port-forward -n team-a pod/web-0 8080:80

Revoke alice while her watch runs (in another terminal; the watch ends at once with the reason):
  curl -s --cacert {gw_ca} --cert {admin_crt} --key {admin_key} \
    -H 'content-type: application/json' -X POST {url}/v1/locks \
    -d '{{"target":{{"kind":"user","value":"alice@example.com"}},"message":"laptop reported stolen"}}'
  kubectl get pods -n team-a          # Forbidden: access is locked: laptop reported stolen
  curl -s --cacert {gw_ca} --cert {admin_crt} --key {admin_key} {url}/v1/locks          # list
  curl -s --cacert {gw_ca} --cert {admin_crt} --key {admin_key} -X DELETE {url}/v1/locks/<id>

Device posture (the same login, plus alice's laptop certificate):
  export KUBECONFIG={laptop_kc}
  kubectl get pods -n team-a          # 401: the gateway has no posture report for alice-laptop
  {ztgate} device report --server {url} --ca {gw_ca} \
    --cert {laptop_crt} --key {laptop_key}
  kubectl get pods -n team-a          # allowed if this machine's disk is encrypted, else Forbidden
                                      # by policy "devices-need-encrypted-disks"

The token comes from the kubeconfig's exec plugin (curl to the dev issuer); kubectl runs it
again when the token expires. The dev OIDC issuer is a development issuer, not for real use: it
asks for no password and hands alice's token (group team-a, the only identity it mints) to
anyone on this machine who asks. Never let a real gateway trust it.

Press Ctrl-C to stop."#,
        dir_shown = dir.display(),
        apiserver = demo.apiserver.url(),
        issuer_url = issuer.issuer_url(),
        url = demo.url,
        ops = demo
            .gateway
            .ops_addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into()),
        config = demo.env.config_path.display(),
        policies = dir.join("policies").join("demo.cedar").display(),
        cert = alice_cert.display(),
        gw_ca = demo.env.gateway_ca_path.display(),
        admin_crt = admin_crt.display(),
        admin_key = admin_key.display(),
        laptop_kc = alice_laptop.display(),
        laptop_crt = laptop_crt.display(),
        laptop_key = laptop_key.display(),
    );
    wait_for_stop().await;
    println!("stopping");
    demo.gateway.shutdown();
    demo.gateway.wait().await;
    demo.apiserver.shutdown().await;
    if let Some(d) = tmp_guard {
        let _ = std::fs::remove_dir_all(d);
    }
    Ok(())
}

async fn wait_for_stop() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Why the demo could not start. Each cause is part of the message (the demo prints
/// `demo failed: <error>`), so no variant repeats it as a source.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("stand-in kube-apiserver: {0}")]
    ApiServer(std::io::Error),
    #[error("dev OIDC issuer: {0}")]
    Issuer(std::io::Error),
    /// Writing the demo's own files.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Config(crate::config::ConfigErrors),
    #[error(transparent)]
    Gateway(#[from] crate::gateway::StartError),
    #[error("demo kubeconfig has no exec args")]
    NoExecArgs,
    #[error("{}: {cause}", path.display())]
    File {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("--kubeconfig-out {}: {cause}", path.display())]
    KubeconfigOut {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "--dir {}: the path already exists. The demo keeps private keys and the policies \
         it enforces in its directory, so it creates that directory itself (mode 0700) \
         and never uses one that exists: another user could have created it, or put \
         files in it, first. Give a path that does not exist yet, or leave out --dir \
         for a fresh temporary directory.",
        .0.display()
    )]
    DirExists(PathBuf),
    #[error("--dir {}: {cause}", path.display())]
    Dir {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{0}")]
    Random(aws_lc_rs::error::Unspecified),
    #[error("{}: could not create a new demo directory", .0.display())]
    NoTempDir(PathBuf),
}

/// Creates the demo's own directory at `path`, readable by the current user only. The demo keeps
/// private keys there (the gateway's upstream key may act as anyone in the stand-in) and the
/// policies the gateway enforces, so a directory someone else could have created or filled
/// first is never used: `mkdir` either creates it, with its mode, or fails.
fn create_demo_dir(path: &Path) -> Result<(), DemoError> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|cause| DemoError::File {
                path: parent.to_path_buf(),
                cause,
            })?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(|cause| match cause.kind() {
            std::io::ErrorKind::AlreadyExists => DemoError::DirExists(path.to_path_buf()),
            _ => DemoError::Dir {
                path: path.to_path_buf(),
                cause,
            },
        })
}

/// A fresh, unpredictable directory under the temporary directory (see [`create_demo_dir`]).
fn create_temp_demo_dir() -> Result<PathBuf, DemoError> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::temp_dir();
    for _ in 0..16 {
        let mut suffix = [0u8; 8];
        aws_lc_rs::rand::fill(&mut suffix).map_err(DemoError::Random)?;
        let name: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
        let d = base.join(format!("ztgate-demo-{name}"));
        match std::fs::DirBuilder::new().mode(0o700).create(&d) {
            Ok(()) => return Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(cause) => return Err(DemoError::File { path: d, cause }),
        }
    }
    Err(DemoError::NoTempDir(base))
}

/// `mkdir -p` with mode 0700 for the directories it creates.
fn create_private_dir_all(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// Writes a file only its owner can read. The mode is given to `open`, so the file is never
/// readable by others, not even for a moment; a file already at `path` is replaced, not
/// reused, because its mode and owner are not ours to trust.
fn write_private(path: &Path, contents: impl AsRef<[u8]>) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_ref())
}

/// Puts `contents` at `path` by renaming a new private file over it. A kubeconfig names the
/// command kubectl runs for credentials, so the file must be the user's own: a link at `path`
/// is replaced rather than written through, and another user's file in a sticky directory such
/// as /tmp is not taken over (the rename is refused).
fn replace_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"))?;
    let mut suffix = [0u8; 8];
    aws_lc_rs::rand::fill(&mut suffix).map_err(std::io::Error::other)?;
    let suffix: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = dir.join(format!(".{}.{suffix}.tmp", name.to_string_lossy()));
    write_private(&tmp, contents)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Writes `<name>.crt` and `<name>.key` (0600) into `dir` and returns their paths.
fn write_cert_key(dir: &Path, name: &str, ck: &CertKey) -> std::io::Result<(PathBuf, PathBuf)> {
    let crt = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&crt, &ck.cert_pem)?;
    write_private(&key, &ck.key_pem)?;
    Ok((crt, key))
}

/// `text` with every line indented by `n` spaces (and ending with a newline).
fn indent(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    text.lines().map(|l| format!("{pad}{l}\n")).collect()
}
