//! The configuration schema: `apiVersion: ztgate.dev/v1alpha1`, `kind: GatewayConfig`.
//!
//! Every struct rejects unknown fields so that a typo is an error, never a silently ignored
//! setting. Field names are camelCase, as in Kubernetes objects.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration::GoDuration;
use super::CertKeyFiles;

pub const API_VERSION: &str = "ztgate.dev/v1alpha1";
pub const KIND: &str = "GatewayConfig";

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewayConfig {
    pub api_version: String,
    pub kind: String,
    pub listener: ListenerConfig,
    #[serde(default)]
    pub operations: OperationsConfig,
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub authentication: AuthenticationConfig,
    /// Cedar policy at the gateway. When absent, the gateway authorizes nothing itself and
    /// kube-apiserver's RBAC is the only authorization (logged as a warning at start).
    #[serde(default)]
    pub authorization: Option<AuthorizationConfig>,
    /// Where locks and posture records are kept. Absent: in memory only (lost on restart).
    #[serde(default)]
    pub state: Option<StateConfig>,
    /// Audit events in kube-apiserver's `audit.k8s.io/v1` format.
    #[serde(default)]
    pub audit: Option<crate::audit::config::AuditConfig>,
    /// Web login on the gateway (OIDC authorization code + PKCE) offering a kubeconfig that
    /// uses `ztgate login`. Absent: no login pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sso: Option<crate::sso::config::SsoConfig>,
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub logging: LoggingConfig,
}

/// The TLS front door.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ListenerConfig {
    /// `host:port` to listen on, e.g. `0.0.0.0:8443`. Port 0 picks a free port.
    pub address: String,
    pub serving_certificate: CertKeyFiles,
    /// Named trust bundles that client certificates are verified against.
    #[serde(default)]
    pub client_certificate_bundles: Vec<TrustBundle>,
    /// How often certificate and CA files are checked for rotation.
    #[serde(default = "default_reload_interval")]
    pub reload_interval: GoDuration,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrustBundle {
    /// Referenced from elsewhere in the config (e.g. `authentication.x509.bundle`).
    pub name: String,
    /// PEM file with one or more CA certificates.
    pub ca_file: PathBuf,
}

/// A plain-HTTP listener for `/metrics`, `/livez` and `/readyz`, meant for the pod network only.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OperationsConfig {
    /// `host:port`; when absent there is no operations listener (health stays on the TLS port).
    #[serde(default)]
    pub address: Option<String>,
}

/// kube-apiserver, and how the gateway authenticates to it.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpstreamConfig {
    /// `https://host:port` of kube-apiserver.
    pub url: String,
    /// CA bundle that signs kube-apiserver's serving certificate.
    pub ca_file: PathBuf,
    /// The gateway's own client certificate (a user allowed to impersonate).
    #[serde(default)]
    pub client_certificate: Option<CertKeyFiles>,
    /// A service-account token file (projected tokens rotate; it is re-read).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// TLS server name to verify, when it differs from the URL's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Path probed by `/readyz` to decide whether the upstream answers.
    #[serde(default = "default_health_path")]
    pub health_path: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthenticationConfig {
    #[serde(default)]
    pub x509: Option<X509AuthConfig>,
    /// JWT (OIDC) token issuers, in the shape of kube-apiserver's `AuthenticationConfiguration`.
    #[serde(default)]
    pub jwt: Vec<crate::config::jwt::JwtAuthenticator>,
    /// Serve kube-apiserver's webhook token authenticator (TokenReview).
    #[serde(default)]
    pub token_review: Option<crate::config::jwt::TokenReviewConfig>,
    /// Device certificates: which bundle they chain to and where the device id is. The
    /// device is visible to policy as `context.device`.
    #[serde(default)]
    pub devices: Option<crate::device::config::DeviceConfig>,
    /// SPIFFE workloads: X509-SVIDs of these trust domains (each verified against its own
    /// bundle) authenticate as `usernamePrefix + SPIFFE ID`.
    #[serde(default)]
    pub workloads: Vec<crate::device::config::WorkloadMapping>,
}

/// Where locks and posture are kept: exactly one of `directory` (the embedded, crash-safe
/// store on local disk, one replica) and `etcd` (shared by several replicas).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StateConfig {
    /// A directory only this gateway process uses (a lock file refuses a second one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<PathBuf>,
    /// etcd, shared by every replica (see `docs/state.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<crate::state::config::EtcdConfig>,
}

/// Cedar ABAC policy: default deny, `forbid` wins, evaluation errors deny.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationConfig {
    /// Policy files and directories (every `*.cedar` file in a directory, by name).
    pub policies: Vec<PathBuf>,
    /// How often the policy files are checked for changes (SIGHUP checks at once).
    #[serde(default = "default_policy_reload_interval")]
    pub reload_interval: GoDuration,
    /// Serve kube-apiserver's authorization webhook (SubjectAccessReview).
    #[serde(default)]
    pub subject_access_review: Option<SubjectAccessReviewConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SubjectAccessReviewConfig {
    /// Name of the entry in `listener.clientCertificateBundles` that signs kube-apiserver's
    /// client certificate; only callers presenting such a certificate may ask.
    pub caller_bundle: String,
    /// What to answer when no policy permits and none forbids: `NoOpinion` (RBAC still runs)
    /// or `Deny`.
    #[serde(default)]
    pub default_decision: SarDefault,
    /// User names kube-apiserver knows the gateway itself by (its upstream credential): reviews
    /// about them are left to kube-apiserver's other authorizers (no opinion), never decided by
    /// the gateway's policy. The CN of `upstream.clientCertificate` is always one of them.
    #[serde(default)]
    pub gateway_users: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum SarDefault {
    #[default]
    NoOpinion,
    Deny,
}

/// Client certificates read the way kube-apiserver reads them: CN is the user, each O a group.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct X509AuthConfig {
    /// Name of the entry in `listener.clientCertificateBundles` that signs user certificates.
    pub bundle: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TimeoutsConfig {
    /// Deadline for a non-streaming request to receive its response headers (504 after).
    #[serde(default = "d60s")]
    pub request: GoDuration,
    /// TCP + TLS connect to the upstream.
    #[serde(default = "d5s")]
    pub upstream_connect: GoDuration,
    /// Time a client has to send the request headers (slowloris guard).
    #[serde(default = "d10s")]
    pub header_read: GoDuration,
    /// TLS handshake deadline.
    #[serde(default = "d10s")]
    pub tls_handshake: GoDuration,
    /// A client connection with no request in progress for this long is closed (HTTP/2
    /// GOAWAY). Before its first request a connection gets `headerRead` instead.
    #[serde(default = "d90s")]
    pub idle_connection: GoDuration,
    /// On SIGTERM: how long in-flight requests get before streams are closed.
    #[serde(default = "d30s")]
    pub shutdown_grace: GoDuration,
    /// A live stream (watch, logs -f, exec, attach, port-forward) is closed this long after it
    /// opened, with 401 so the client signs in again. `0` (the default): no limit.
    #[serde(default)]
    pub max_stream_age: GoDuration,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LimitsConfig {
    /// Largest request header section accepted (431 beyond).
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: u64,
    /// Largest request body accepted (413 beyond). kube-apiserver's own limit is 3 MiB.
    #[serde(default = "default_max_body_bytes")]
    pub max_request_body_bytes: u64,
    /// HTTP/2 concurrent streams per client connection.
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// Non-streaming requests in flight at once, gateway-wide (429 beyond).
    #[serde(default = "default_max_inflight")]
    pub max_inflight_requests: u32,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoggingConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `ztgate=debug,info`.
    #[serde(default = "default_log_level")]
    pub level: String,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        TimeoutsConfig {
            request: d60s(),
            upstream_connect: d5s(),
            header_read: d10s(),
            tls_handshake: d10s(),
            idle_connection: d90s(),
            shutdown_grace: d30s(),
            max_stream_age: GoDuration::default(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_header_bytes: default_max_header_bytes(),
            max_request_body_bytes: default_max_body_bytes(),
            max_concurrent_streams: default_max_concurrent_streams(),
            max_inflight_requests: default_max_inflight(),
        }
    }
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            format: LogFormat::Json,
            level: default_log_level(),
        }
    }
}

fn default_reload_interval() -> GoDuration {
    GoDuration(Duration::from_secs(10))
}
fn default_policy_reload_interval() -> GoDuration {
    GoDuration(Duration::from_secs(2))
}
fn default_health_path() -> String {
    "/readyz".into()
}
fn d5s() -> GoDuration {
    GoDuration(Duration::from_secs(5))
}
fn d10s() -> GoDuration {
    GoDuration(Duration::from_secs(10))
}
fn d30s() -> GoDuration {
    GoDuration(Duration::from_secs(30))
}
fn d60s() -> GoDuration {
    GoDuration(Duration::from_secs(60))
}
fn d90s() -> GoDuration {
    GoDuration(Duration::from_secs(90))
}
fn default_max_header_bytes() -> u64 {
    32 * 1024
}
fn default_max_body_bytes() -> u64 {
    3 * 1024 * 1024
}
fn default_max_concurrent_streams() -> u32 {
    250
}
fn default_max_inflight() -> u32 {
    400
}
fn default_log_level() -> String {
    "info".into()
}
