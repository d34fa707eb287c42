//! `authentication.devices.posture`: where posture records come from and how fresh they must be.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::duration::GoDuration;
use crate::config::jwt::JwtIssuer;

/// Device posture: required by default (fail closed), from signed reports, self-reports and a
/// pull provider.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PostureConfig {
    /// A request from a device without a fresh posture record is refused with 401 (so client-go
    /// re-runs its credential plugin, which reports posture). Default `true`.
    #[serde(default = "yes")]
    pub required: bool,
    /// A record collected longer ago than this counts as missing, whatever its own expiry.
    /// Default `24h`.
    #[serde(default = "default_max_age")]
    pub max_age: GoDuration,
    /// Signed posture reports (JWTs) from MDM or EDR systems.
    #[serde(default)]
    pub issuers: Vec<PostureIssuer>,
    /// Reports a device agent makes about itself over mTLS with the device certificate.
    #[serde(default)]
    pub self_reports: Option<SelfReports>,
    /// An HTTPS endpoint the gateway asks about devices it has no fresh record for.
    #[serde(default)]
    pub provider: Option<PullProvider>,
}

fn yes() -> bool {
    true
}

fn default_max_age() -> GoDuration {
    GoDuration(Duration::from_secs(24 * 3600))
}

/// One issuer of signed posture reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PostureIssuer {
    /// The issuer, as for user tokens (`url`, `audiences`, `certificateAuthority[File]`,
    /// `discoveryURL`): its keys come from its JWKS and reports are verified like user tokens.
    pub issuer: JwtIssuer,
    /// The record's `source` (what policy sees in `context.device.posture.source`), e.g. `mdm`
    /// or `edr`. `self` and `pull` are reserved.
    pub source: String,
    /// Accepted signature algorithms. Default: the asymmetric ones.
    #[serde(default = "crate::config::jwt::default_signing_algorithms")]
    pub signing_algorithms: Vec<String>,
    /// A report counts at most this long after it was issued (`iat`), even if its `exp` is later.
    /// Default: `maxAge` of the section.
    #[serde(default)]
    pub max_age: Option<GoDuration>,
}

/// Self-reports from the device agent (`ztgate device report`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SelfReports {
    /// How long a self-report counts. Default `1h`.
    #[serde(default = "default_self_ttl")]
    pub ttl: GoDuration,
}

fn default_self_ttl() -> GoDuration {
    GoDuration(Duration::from_secs(3600))
}

/// The pull provider: `POST {url}` with `{"deviceIds": [...]}`, answered with
/// `{"devices": {"<id>": {"attributes": {...}} | {"score": 0..100}}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PullProvider {
    /// `https://...`.
    pub url: String,
    /// PEM CA bundle the provider's serving certificate must chain to.
    pub certificate_authority_file: PathBuf,
    /// A bearer token for the provider, read from this file on each request batch.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// How long an answer (found or not) is kept and how long a pulled record counts.
    /// Default `5m`.
    #[serde(default = "default_cache_ttl")]
    pub cache_ttl: GoDuration,
    /// Longest wait for the provider per batch. Default `2s`.
    #[serde(default = "default_timeout")]
    pub timeout: GoDuration,
    /// At most this many requests to the provider per second; lookups beyond it are answered
    /// as "unavailable". Default `10`.
    #[serde(default = "default_rate")]
    pub requests_per_second: u32,
    /// Lookups collected into one request, at most. Default `100`.
    #[serde(default = "default_batch")]
    pub max_batch: usize,
    /// When the provider cannot answer (down, slow, rate limit): `true` refuses the request
    /// (fail closed, the default); `false` lets the device through without posture, for policy
    /// to decide.
    #[serde(default = "yes")]
    pub fail_closed: bool,
}

fn default_cache_ttl() -> GoDuration {
    GoDuration(Duration::from_secs(300))
}

fn default_timeout() -> GoDuration {
    GoDuration(Duration::from_secs(2))
}

fn default_rate() -> u32 {
    10
}

fn default_batch() -> usize {
    100
}

impl PostureConfig {
    /// Operator errors, each naming the field (relative to `authentication.devices.posture`).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut errs = Vec::new();
        if self.max_age.is_zero() {
            errs.push(("maxAge".into(), "must be more than 0".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, iss) in self.issuers.iter().enumerate() {
            let f = |name: &str| format!("issuers[{i}].{name}");
            if !iss.issuer.url.starts_with("https://") {
                errs.push((f("issuer.url"), "must be an https:// URL".into()));
            }
            if !seen.insert(iss.issuer.url.clone()) {
                errs.push((f("issuer.url"), "is listed twice".into()));
            }
            if iss.issuer.audiences.is_empty() {
                errs.push((f("issuer.audiences"), "needs at least one audience".into()));
            }
            if iss.source.is_empty() || iss.source == "self" || iss.source == "pull" {
                errs.push((
                    f("source"),
                    "must be a name such as \"mdm\"; \"self\" and \"pull\" are reserved".into(),
                ));
            }
            if iss.max_age.is_some_and(|d| d.is_zero()) {
                errs.push((f("maxAge"), "must be more than 0".into()));
            }
        }
        if let Some(s) = &self.self_reports {
            if s.ttl.is_zero() {
                errs.push(("selfReports.ttl".into(), "must be more than 0".into()));
            }
        }
        if let Some(p) = &self.provider {
            if !p.url.starts_with("https://") {
                errs.push(("provider.url".into(), "must be an https:// URL".into()));
            }
            if p.url.parse::<http::Uri>().is_err() {
                errs.push(("provider.url".into(), "is not a valid URL".into()));
            }
            if p.timeout.is_zero() {
                errs.push(("provider.timeout".into(), "must be more than 0".into()));
            }
            if p.cache_ttl.is_zero() {
                errs.push(("provider.cacheTtl".into(), "must be more than 0".into()));
            }
            if p.requests_per_second == 0 {
                errs.push((
                    "provider.requestsPerSecond".into(),
                    "must be at least 1".into(),
                ));
            }
            if p.max_batch == 0 || p.max_batch > 1000 {
                errs.push(("provider.maxBatch".into(), "must be 1..1000".into()));
            }
        }
        errs
    }
}
