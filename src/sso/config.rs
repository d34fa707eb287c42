//! The `sso` section of the gateway config: the web login on the gateway.
//!
//! ```yaml
//! sso:
//!   issuer: https://idp.example.com          # = an authentication.jwt[].issuer.url
//!   clientId: ztgate-gateway                 # in that entry's audiences
//!   clientSecretFile: /etc/ztgate/sso-client-secret
//!   externalUrl: https://ztgate.example.com  # optional; redirect URI is <externalUrl>/callback
//!   scopes: [openid, email, profile]
//!   sessionKeyFile: /etc/ztgate/sso-session.key   # optional; default: random per process
//!   sessionTtl: 15m
//!   gatewayCaFile: /etc/ztgate/gateway-ca.crt      # optional; embedded in the kubeconfig
//!   cli:
//!     clientId: ztgate-cli                   # the public client `ztgate login` uses
//!     scopes: [openid, email, profile, offline_access]
//!     grant: browser                         # or device-code
//!     command: ztgate
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::duration::GoDuration;
use crate::config::jwt::JwtAuthenticator;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SsoConfig {
    /// The provider; must equal the `issuer.url` of one `authentication.jwt` entry, whose
    /// verifier checks the ID tokens of the web login.
    pub issuer: String,
    /// The gateway's client at the provider; must be one of that entry's `audiences`.
    pub client_id: String,
    /// File holding the client secret. Absent: a public client (PKCE only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<PathBuf>,
    /// The gateway's URL as browsers reach it (`https://host[:port]`, no path). The redirect URI
    /// registered at the provider is `<externalUrl>/callback`. Absent: taken from the request's
    /// host (the provider still only redirects to URIs registered for the client).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_url: Option<String>,
    /// Scopes of the web login; must include `openid`.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// HMAC key (at least 32 bytes) for the login cookies; share it between replicas. Absent: a
    /// random key per process (page sessions end when the gateway restarts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_key_file: Option<PathBuf>,
    /// How long a page session lasts (at most 24h).
    #[serde(default = "default_session_ttl")]
    pub session_ttl: GoDuration,
    /// CA of the gateway's serving certificate, embedded in the kubeconfig the page offers.
    /// Absent: kubectl uses the system's CAs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_ca_file: Option<PathBuf>,
    /// How the kubeconfig's `ztgate login` plugin is set up.
    #[serde(default)]
    pub cli: SsoCliConfig,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SsoCliConfig {
    /// The client `ztgate login` uses (public, native: loopback redirects on any port, device
    /// code, refresh tokens); must be one of the issuer's `audiences`. Default: `sso.clientId`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Scopes `ztgate login` asks for. Empty: its default (openid email profile offline_access).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// `browser` (default) or `device-code`.
    #[serde(default)]
    pub grant: CliGrant,
    /// The program kubectl runs; default `ztgate` (found on PATH).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum CliGrant {
    #[default]
    Browser,
    DeviceCode,
}

fn default_scopes() -> Vec<String> {
    ["openid", "email", "profile"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn default_session_ttl() -> GoDuration {
    GoDuration(Duration::from_secs(15 * 60))
}

impl SsoConfig {
    pub fn cli_client_id(&self) -> &str {
        self.cli.client_id.as_deref().unwrap_or(&self.client_id)
    }

    /// Makes relative file paths relative to the config file's directory.
    pub fn resolve_paths(&mut self, base_dir: &Path) {
        for p in [
            &mut self.client_secret_file,
            &mut self.session_key_file,
            &mut self.gateway_ca_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base_dir.join(&*p);
            }
        }
    }
}

/// Every problem with `sso` (checked against the token issuers, `authentication.jwt`), as
/// (field path, message).
pub fn validate(sso: Option<&SsoConfig>, jwt: &[JwtAuthenticator]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Some(s) = sso else {
        return out;
    };
    let mut err = |path: &str, msg: String| out.push((format!("sso.{path}"), msg));
    match jwt.iter().find(|j| j.issuer.url == s.issuer)
    {
        None => err(
            "issuer",
            format!(
                "{} is not the issuer.url of any authentication.jwt entry; the web login verifies ID tokens with that entry",
                s.issuer
            ),
        ),
        Some(j) => {
            for (path, id) in [("clientId", s.client_id.as_str()), ("cli.clientId", s.cli_client_id())] {
                if !j.issuer.audiences.iter().any(|a| a == id) {
                    err(
                        path,
                        format!("{id} is not in the audiences of authentication.jwt issuer {}", s.issuer),
                    );
                }
            }
        }
    }
    if s.client_id.is_empty() {
        err("clientId", "must not be empty".into());
    }
    if let Some(u) = &s.external_url {
        match http::Uri::try_from(u.as_str()) {
            Ok(uri)
                if uri.scheme_str() == Some("https")
                    && uri.authority().is_some()
                    && matches!(uri.path(), "" | "/")
                    && uri.query().is_none() => {}
            _ => err(
                "externalUrl",
                format!("{u}: must be https://host[:port] with no path or query"),
            ),
        }
    }
    if !s.scopes.iter().any(|x| x == "openid") {
        err("scopes", "must include openid".into());
    }
    if let Some(p) = &s.client_secret_file {
        match std::fs::read_to_string(p) {
            Ok(t) if !t.trim().is_empty() => {}
            Ok(_) => err("clientSecretFile", format!("{} is empty", p.display())),
            Err(e) => err(
                "clientSecretFile",
                format!("cannot read {}: {e}", p.display()),
            ),
        }
    }
    if let Some(p) = &s.session_key_file {
        match std::fs::read(p) {
            Ok(k) if k.len() >= 32 => {}
            Ok(_) => err(
                "sessionKeyFile",
                format!("{} must hold at least 32 bytes", p.display()),
            ),
            Err(e) => err(
                "sessionKeyFile",
                format!("cannot read {}: {e}", p.display()),
            ),
        }
    }
    let ttl = s.session_ttl.get();
    if ttl.is_zero() || ttl > Duration::from_secs(24 * 3600) {
        err("sessionTtl", "must be more than 0 and at most 24h".into());
    }
    if let Some(p) = &s.gateway_ca_file {
        match std::fs::read(p) {
            Ok(pem) => {
                if let Err(e) = crate::tls::pem::parse_ca_pem(&pem) {
                    err("gatewayCaFile", format!("{}: {e}", p.display()));
                }
            }
            Err(e) => err("gatewayCaFile", format!("cannot read {}: {e}", p.display())),
        }
    }
    if s.cli
        .command
        .as_deref()
        .is_some_and(|c| c.trim().is_empty())
    {
        err("cli.command", "must not be empty".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GatewayConfig;

    fn cfg(sso: &str) -> GatewayConfig {
        let yaml = format!(
            r#"apiVersion: ztgate.dev/v1alpha1
kind: GatewayConfig
listener:
  address: 127.0.0.1:0
  servingCertificate: {{certFile: a, keyFile: b}}
upstream:
  url: https://127.0.0.1:6443
  caFile: c
authentication:
  jwt:
    - issuer:
        url: https://idp.example.com
        audiences: [ztgate-gateway, ztgate-cli]
        audienceMatchPolicy: MatchAny
        certificateAuthority: x
{sso}"#
        );
        serde_yaml_ng::from_str(&yaml).unwrap()
    }

    fn paths(sso: &str) -> Vec<String> {
        let c = cfg(sso);
        validate(c.sso.as_ref(), &c.authentication.jwt)
            .into_iter()
            .map(|(p, _)| p)
            .collect()
    }

    #[test]
    fn a_good_section_passes() {
        let ok = "sso:\n  issuer: https://idp.example.com\n  clientId: ztgate-gateway\n  cli: {clientId: ztgate-cli}\n";
        let c = cfg(ok);
        assert_eq!(validate(c.sso.as_ref(), &c.authentication.jwt), vec![]);
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            paths("sso:\n  issuer: https://other.example.com\n  clientId: ztgate-gateway\n"),
            ["sso.issuer"]
        );
        assert_eq!(
            paths("sso:\n  issuer: https://idp.example.com\n  clientId: nobody\n  cli: {clientId: ztgate-cli}\n"),
            ["sso.clientId"]
        );
        assert_eq!(
            paths("sso:\n  issuer: https://idp.example.com\n  clientId: ztgate-gateway\n  cli: {clientId: stranger}\n"),
            ["sso.cli.clientId"]
        );
        assert_eq!(
            paths("sso:\n  issuer: https://idp.example.com\n  clientId: ztgate-gateway\n  externalUrl: http://gw/x\n  scopes: [email]\n  sessionTtl: 0s\n  sessionKeyFile: /nonexistent/key\n"),
            ["sso.externalUrl", "sso.scopes", "sso.sessionKeyFile", "sso.sessionTtl"]
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let yaml =
            "sso:\n  issuer: https://idp.example.com\n  clientId: a\n  clientSecret: inline\n";
        let full = format!(
            "apiVersion: ztgate.dev/v1alpha1\nkind: GatewayConfig\nlistener: {{address: x, servingCertificate: {{certFile: a, keyFile: b}}}}\nupstream: {{url: https://x, caFile: c}}\n{yaml}"
        );
        assert!(serde_yaml_ng::from_str::<GatewayConfig>(&full).is_err());
    }
}
