//! A kubeconfig for one gateway whose user runs `ztgate login` as its exec credential plugin.
//! Written by `ztgate kubeconfig` and served by the gateway's SSO page; it holds no secret.

use serde_json::json;

/// How the exec plugin is invoked.
#[derive(Clone, Debug, Default)]
pub struct PluginSpec {
    /// The program kubectl runs (`ztgate`, or an absolute path).
    pub command: String,
    pub issuer: String,
    pub client_id: String,
    /// The provider's CA (PEM, base64 in the args) when it is not in the system trust store.
    pub issuer_ca_pem: Option<String>,
    /// Scopes, when not the plugin's default.
    pub scopes: Vec<String>,
    /// `device-code` for machines without a browser.
    pub device_code: bool,
    pub device_cert: Option<String>,
    pub device_key: Option<String>,
}

/// The whole kubeconfig.
#[derive(Clone, Debug, Default)]
pub struct KubeconfigSpec {
    /// The gateway's URL.
    pub server: String,
    /// The gateway's serving CA (PEM) when it is not in the system trust store.
    pub gateway_ca_pem: Option<String>,
    /// Cluster, user and context names.
    pub name: String,
    pub namespace: Option<String>,
    pub plugin: PluginSpec,
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
}

impl PluginSpec {
    /// The arguments after the command: `login --issuer … --client-id …`.
    pub fn args(&self) -> Vec<String> {
        let mut a = vec![
            "login".to_owned(),
            "--issuer".to_owned(),
            self.issuer.clone(),
            "--client-id".to_owned(),
            self.client_id.clone(),
        ];
        if let Some(ca) = &self.issuer_ca_pem {
            a.push("--issuer-certificate-authority-data".into());
            a.push(b64(ca));
        }
        for s in &self.scopes {
            a.push("--scope".into());
            a.push(s.clone());
        }
        if self.device_code {
            a.push("--grant".into());
            a.push("device-code".into());
        }
        if let (Some(c), Some(k)) = (&self.device_cert, &self.device_key) {
            a.extend([
                "--device-cert".into(),
                c.clone(),
                "--device-key".into(),
                k.clone(),
            ]);
        }
        a
    }
}

impl KubeconfigSpec {
    pub fn render(&self) -> String {
        let mut cluster = json!({ "server": self.server });
        if let Some(ca) = &self.gateway_ca_pem {
            cluster["certificate-authority-data"] = json!(b64(ca));
        }
        let mut context = json!({ "cluster": self.name, "user": self.name });
        if let Some(ns) = &self.namespace {
            context["namespace"] = json!(ns);
        }
        let doc = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{ "name": self.name, "cluster": cluster }],
            "users": [{
                "name": self.name,
                "user": {
                    "exec": {
                        "apiVersion": "client.authentication.k8s.io/v1",
                        "command": self.plugin.command,
                        "args": self.plugin.args(),
                        "interactiveMode": "IfAvailable",
                        "provideClusterInfo": false,
                        "installHint": "ztgate login signs you in; install the ztgate binary and put it on your PATH.",
                    }
                }
            }],
            "contexts": [{ "name": self.name, "context": context }],
            "current-context": self.name,
        });
        serde_yaml_ng::to_string(&doc).expect("kubeconfig serializes")
    }

    /// The `ztgate kubeconfig …` command line that writes the same file (every argument is
    /// shell-safe: URLs, names and base64).
    pub fn command_line(&self, output: &str) -> String {
        let mut a = vec![
            "ztgate".to_owned(),
            "kubeconfig".into(),
            "--server".into(),
            self.server.clone(),
            "--issuer".into(),
            self.plugin.issuer.clone(),
            "--client-id".into(),
            self.plugin.client_id.clone(),
        ];
        if self.name != "ztgate" {
            a.extend(["--name".into(), self.name.clone()]);
        }
        for s in &self.plugin.scopes {
            a.extend(["--scope".into(), s.clone()]);
        }
        if self.plugin.device_code {
            a.extend(["--grant".into(), "device-code".into()]);
        }
        if let Some(ca) = &self.gateway_ca_pem {
            a.extend(["--certificate-authority-data".into(), b64(ca)]);
        }
        if let Some(ca) = &self.plugin.issuer_ca_pem {
            a.extend(["--issuer-certificate-authority-data".into(), b64(ca)]);
        }
        a.extend(["--output".into(), output.to_owned()]);
        a.join(" ")
    }
}
