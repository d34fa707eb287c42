//! Subcommands other than `serve`: `policy validate|check` and `webhook-config`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::authn::CredentialFacts;
use crate::authz::cedar::{
    decision_reason, DeviceFacts, PolicyEngine, PostureFacts, RequestFacts, Subject,
};
use crate::authz::requestinfo::RequestInfo;

/// Why a subcommand cannot answer; printed as is.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The policy files do not load (one line per problem).
    #[error(transparent)]
    Policies(#[from] crate::authz::cedar::PolicyErrors),
    /// `--device` is not the expected JSON; the message carries the parser's error.
    #[error("--device: {0}")]
    Device(serde_json::Error),
    #[error("give --resource or --non-resource-url")]
    NoTarget,
    #[error("the gateway's policy does not decide this: {0}")]
    Undecidable(&'static str),
    #[error("unknown kind {0:?}: tokenreview or subjectaccessreview")]
    UnknownKind(String),
    #[error("--server must be an https:// URL")]
    NotHttps,
}

/// `ztgate policy validate PATH...`: every problem as `file:line:col: message`.
pub fn policy_validate(paths: &[PathBuf]) -> Result<String, CliError> {
    let engine = PolicyEngine::load(paths)?;
    let mut out = format!(
        "{} policies valid against the schema ({} files)",
        engine.policy_count(),
        engine.origins().len()
    );
    for w in engine.warnings() {
        out.push_str(&format!("\nwarning: {w}"));
    }
    Ok(out)
}

/// A hypothetical request for `ztgate policy check`.
#[derive(Debug)]
pub struct CheckRequest {
    pub user: String,
    pub groups: Vec<String>,
    pub verb: String,
    /// `pods`, `pods/exec`, `deployments` ...
    pub resource: Option<String>,
    pub api_group: String,
    pub namespace: String,
    pub name: String,
    pub non_resource_url: Option<String>,
    pub source_ip: std::net::IpAddr,
    pub auth_method: String,
    pub amr: Vec<String>,
    /// JSON: {"id": "...", "bound": true, "postureAgeSeconds": 60, "posture": {"os": "...", ...}}
    pub device_json: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DeviceJson {
    id: String,
    #[serde(default)]
    bound: bool,
    #[serde(default)]
    posture_age_seconds: Option<u64>,
    #[serde(default)]
    posture: Option<PostureJson>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PostureJson {
    #[serde(default)]
    os: String,
    #[serde(default)]
    os_version: String,
    #[serde(default)]
    disk_encrypted: bool,
    #[serde(default)]
    firewall: bool,
    #[serde(default)]
    screen_lock: bool,
    #[serde(default)]
    managed: bool,
    #[serde(default)]
    edr_score: Option<i64>,
    #[serde(default)]
    source: String,
    #[serde(default)]
    self_reported: bool,
}

/// `ztgate policy check`: evaluates a hypothetical request, like `kubectl auth can-i`.
/// Returns (allowed, the text to print).
pub fn policy_check(paths: &[PathBuf], r: &CheckRequest) -> Result<(bool, String), CliError> {
    let engine = PolicyEngine::load(paths)?;
    let device = match &r.device_json {
        Some(j) => {
            let d: DeviceJson = serde_json::from_str(j).map_err(CliError::Device)?;
            Some(DeviceFacts {
                id: d.id,
                bound: d.bound,
                posture_age: d.posture_age_seconds.map(Duration::from_secs),
                posture: d.posture.map(|p| PostureFacts {
                    os: p.os,
                    os_version: p.os_version,
                    disk_encrypted: p.disk_encrypted,
                    firewall: p.firewall,
                    screen_lock: p.screen_lock,
                    managed: p.managed,
                    edr_score: p.edr_score,
                    source: p.source,
                    self_reported: p.self_reported,
                }),
            })
        }
        None => None,
    };
    let info = match (&r.non_resource_url, &r.resource) {
        (Some(path), _) => RequestInfo {
            is_resource_request: false,
            path: path.clone(),
            verb: r.verb.clone(),
            ..Default::default()
        },
        (None, Some(res)) => {
            let (resource, subresource) = match res.split_once('/') {
                Some((a, b)) => (a.to_owned(), b.to_owned()),
                None => (res.clone(), String::new()),
            };
            RequestInfo {
                is_resource_request: true,
                verb: r.verb.clone(),
                api_prefix: if r.api_group.is_empty() {
                    "api".into()
                } else {
                    "apis".into()
                },
                api_group: r.api_group.clone(),
                api_version: "v1".into(),
                namespace: r.namespace.clone(),
                resource,
                subresource,
                name: r.name.clone(),
                ..Default::default()
            }
        }
        (None, None) => return Err(CliError::NoTarget),
    };
    let facts = CredentialFacts {
        amr: r.amr.clone(),
        ..Default::default()
    };
    let subject = Subject {
        user: &r.user,
        uid: None,
        groups: &r.groups,
        method: &r.auth_method,
        facts: &facts,
    };
    let req = RequestFacts {
        info: &info,
        verb: &r.verb,
        source_ip: r.source_ip,
        now: SystemTime::now(),
        device: device.as_ref(),
        websocket: false,
    };
    // `--verb impersonate --resource users --name carol` asks what `kubectl --as carol` asks.
    let d = match crate::authz::review_target(&info) {
        crate::authz::ReviewTarget::Impersonation(target) => {
            engine.decide_subject_impersonation(&subject, &req, &target)
        }
        crate::authz::ReviewTarget::Inexpressible(why) => return Err(CliError::Undecidable(why)),
        crate::authz::ReviewTarget::Request => engine.decide_subject(&subject, &req),
    };
    let mut out = if d.allowed {
        "yes".to_owned()
    } else {
        format!("no - {}", decision_reason(&d))
    };
    if !d.determining.is_empty() {
        out.push_str(&format!("\npolicies: {}", d.determining.join(", ")));
    }
    for e in &d.errors {
        out.push_str(&format!("\nerror: {e}"));
    }
    Ok((d.allowed, out))
}

/// `ztgate webhook-config`: the kubeconfig-format file kube-apiserver reads with
/// `--authentication-token-webhook-config-file` (or `--authorization-webhook-config-file`).
pub fn webhook_config(
    server: &str,
    kind: &str,
    ca_file: &Path,
    client_cert: &Path,
    client_key: &Path,
) -> Result<String, CliError> {
    let path = match kind {
        "tokenreview" => "/apis/authentication.k8s.io/v1/tokenreviews",
        "subjectaccessreview" => "/apis/authorization.k8s.io/v1/subjectaccessreviews",
        other => return Err(CliError::UnknownKind(other.to_owned())),
    };
    let server = server.trim_end_matches('/');
    if !server.starts_with("https://") {
        return Err(CliError::NotHttps);
    }
    let flag = if kind == "tokenreview" {
        "--authentication-token-webhook-config-file (with --authentication-token-webhook-version=v1)"
    } else {
        "--authorization-webhook-config-file (with --authorization-webhook-version=v1)"
    };
    Ok(format!(
        r#"# kube-apiserver {flag}
apiVersion: v1
kind: Config
clusters:
  - name: ztgate
    cluster:
      server: {server}{path}
      certificate-authority: {ca}
users:
  - name: kube-apiserver
    user:
      client-certificate: {cert}
      client-key: {key}
contexts:
  - name: webhook
    context:
      cluster: ztgate
      user: kube-apiserver
current-context: webhook
"#,
        ca = ca_file.display(),
        cert = client_cert.display(),
        key = client_key.display(),
    ))
}
