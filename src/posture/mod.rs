//! Device posture: the facts known about a device (os, disk encryption, firewall, ...), where
//! they come from, and whether they are fresh enough to count.
//!
//! Records arrive three ways and are kept in the state store (one per device, the newest wins):
//!
//! - **signed reports**: a JWT from a configured posture issuer (an MDM or EDR), `sub` = device
//!   id, verified like user tokens (keys from the issuer's JWKS), posted to
//!   `POST /v1/devices/posture` ([`api`]);
//! - **self-reports**: the device agent (`ztgate device report`, [`collect`]) posts its own facts
//!   over mTLS with the device certificate; they are marked `source: self` and cannot replace a
//!   signed record still in force;
//! - **the pull provider** ([`provider`]): asked about devices that have no fresh record.
//!
//! A record counts while `now < expiresAt` and it was collected less than `maxAge` ago. Missing
//! or stale posture is refused with 401 when `required` (the default): fail closed.

pub mod api;
pub mod collect;
pub mod config;
pub mod provider;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::authn::oidc::{OidcAuthenticator, OidcOptions};
use crate::authz::cedar::PostureFacts;
use crate::config::jwt::JwtAuthenticator;
use crate::state::{Posture, PostureRecord, SharedStore};

pub use config::{PostureConfig, PostureIssuer, PullProvider, SelfReports};

/// The source name of self-reports.
pub const SOURCE_SELF: &str = "self";
/// The source name of records from the pull provider.
pub const SOURCE_PULL: &str = "pull";

/// Where the gateway serves its device posture API (`/v1/devices/posture` and below), and where
/// `ztgate device report` sends a report.
pub const API_PATH: &str = "/v1/devices/posture";

/// Why a posture report was refused, or posture could not be established.
#[derive(Debug, thiserror::Error)]
pub enum PostureError {
    /// The signed report did not verify (signature, issuer, audience, expiry, claims). The
    /// client is told only "Unauthorized"; the log has this.
    #[error("signed posture report rejected: {0}")]
    Rejected(String),
    /// The report is about a device other than the one presenting its certificate.
    #[error("the report is about device {report:?}, but the presented certificate is device {presented:?}")]
    WrongDevice { report: String, presented: String },
    /// A self-report without a device certificate.
    #[error("a self-report must be sent with the device certificate (mTLS)")]
    NoDevice,
    /// The kind of report is not enabled in config.
    #[error("{0} are not accepted by this gateway")]
    NotAccepted(&'static str),
    /// The body is not a report.
    #[error("bad posture report: {0}")]
    BadReport(String),
    /// A newer record, or a signed one still in force, is already there.
    #[error("{0}")]
    Superseded(String),
    /// The store could not be written.
    #[error("state store: {0}")]
    Store(#[from] crate::state::StoreError),
}

impl crate::errors::ToStatus for PostureError {
    fn to_status(&self) -> crate::errors::Status {
        use crate::errors::{messages, Status};
        match self {
            // A refused signed report says no more than a refused token does.
            PostureError::Rejected(_) => Status::unauthorized(messages::UNAUTHORIZED),
            e @ PostureError::NoDevice => Status::unauthorized(e.to_string()),
            e @ (PostureError::WrongDevice { .. } | PostureError::NotAccepted(_)) => {
                Status::forbidden(e.to_string())
            }
            e @ PostureError::BadReport(_) => Status::bad_request(e.to_string()),
            e @ PostureError::Superseded(_) => Status::conflict(e.to_string()),
            PostureError::Store(e) => e.to_status(),
        }
    }
}

/// Posture as the request path needs it.
#[derive(Clone, Debug)]
pub enum Lookup {
    /// A fresh record.
    Fresh(Arc<PostureRecord>),
    /// No record, or only a stale one.
    Missing,
    /// The pull provider could not answer and is configured to fail open.
    Unavailable,
}

/// The posture part of the gateway: config, the signed-report verifier, the pull provider.
pub struct PostureService {
    cfg: PostureConfig,
    /// Verifies signed reports; one issuer per `issuers` entry.
    reports: Option<Arc<OidcAuthenticator>>,
    provider: Option<provider::Provider>,
}

impl std::fmt::Debug for PostureService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostureService")
            .field("required", &self.cfg.required)
            .field("issuers", &self.cfg.issuers.len())
            .field("provider", &self.provider.is_some())
            .finish()
    }
}

/// Why the posture part could not start (the operator's config).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PostureSetupError {
    /// A posture issuer does not make a token authenticator.
    #[error("{0}")]
    Issuer(#[source] serde_json::Error),
    /// The report verifier could not be built.
    #[error("{0}")]
    Verifier(#[source] crate::authn::oidc::OidcError),
    /// The pull provider could not be set up.
    #[error(transparent)]
    Provider(#[from] provider::ProviderSetupError),
}

/// The `JwtAuthenticator` a posture issuer is verified with: `sub` is the device id.
fn as_jwt_authenticator(iss: &PostureIssuer) -> Result<JwtAuthenticator, PostureSetupError> {
    let v = serde_json::json!({
        "issuer": iss.issuer,
        "claimMappings": {"username": {"claim": "sub", "prefix": ""}},
        "signingAlgorithms": iss.signing_algorithms,
    });
    serde_json::from_value(v).map_err(PostureSetupError::Issuer)
}

impl PostureService {
    /// Starts key fetching for the posture issuers (in the background: a down issuer does not
    /// stop start-up; its reports are refused until its keys load).
    pub async fn new(
        cfg: PostureConfig,
        stop: CancellationToken,
        oidc_options: OidcOptions,
    ) -> Result<PostureService, PostureSetupError> {
        let reports = if cfg.issuers.is_empty() {
            None
        } else {
            let jwt = cfg
                .issuers
                .iter()
                .map(as_jwt_authenticator)
                .collect::<Result<Vec<_>, _>>()?;
            Some(
                OidcAuthenticator::with_options(&jwt, stop.clone(), oidc_options)
                    .await
                    .map_err(PostureSetupError::Verifier)?,
            )
        };
        let provider = match &cfg.provider {
            Some(p) => Some(provider::Provider::new(p, stop)?),
            None => None,
        };
        Ok(PostureService {
            cfg,
            reports,
            provider,
        })
    }

    pub fn config(&self) -> &PostureConfig {
        &self.cfg
    }

    pub fn required(&self) -> bool {
        self.cfg.required
    }

    /// A pull provider that lets devices through when it cannot answer.
    pub fn provider_fails_open(&self) -> bool {
        self.provider.as_ref().is_some_and(|p| !p.fail_closed())
    }

    /// Posture issuers whose keys are not loaded yet (for readiness and logs).
    pub fn issuers_not_loaded(&self) -> Vec<String> {
        self.reports
            .as_ref()
            .map(|r| r.not_loaded())
            .unwrap_or_default()
    }

    /// Is `rec` fresh at `now`?
    pub fn is_fresh(&self, rec: &PostureRecord, now: SystemTime) -> bool {
        !rec.is_expired(now) && age(rec, now) <= self.cfg.max_age.get()
    }

    /// The instant `rec` stops counting (its expiry or `maxAge` after collection).
    pub fn fresh_until(&self, rec: &PostureRecord) -> SystemTime {
        rec.expires_at
            .min(rec.collected_at + self.cfg.max_age.get())
    }

    /// The device's posture for a request at `now`: the store's record when fresh, else the pull
    /// provider's answer.
    pub async fn lookup(&self, store: &SharedStore, device_id: &str, now: SystemTime) -> Lookup {
        if let Some(rec) = store.view().posture_shared_at(device_id, now) {
            if self.is_fresh(&rec, now) {
                return Lookup::Fresh(rec);
            }
        }
        let Some(p) = &self.provider else {
            return Lookup::Missing;
        };
        // Boxed: asking the provider is the rare path, and its future would otherwise make
        // every request's future larger (and so every copy of it).
        match Box::pin(p.lookup(device_id)).await {
            provider::Answer::Found(rec) => {
                if !self.is_fresh(&rec, now) {
                    return Lookup::Missing;
                }
                // Kept in the store so re-verification and other replicas see it; a failed
                // write only costs a later pull.
                if let Err(e) = store.put_posture((*rec).clone()).await {
                    tracing::warn!(device = %device_id, error = %e, "could not store pulled posture");
                }
                Lookup::Fresh(rec)
            }
            provider::Answer::NotFound => Lookup::Missing,
            provider::Answer::Unavailable(why) => {
                tracing::warn!(device = %device_id, reason = %why, "posture provider unavailable");
                if p.fail_closed() {
                    Lookup::Missing
                } else {
                    Lookup::Unavailable
                }
            }
        }
    }

    /// Verifies a signed report and turns it into a record. `presented` is the device id of the
    /// certificate the report was posted with, if any: then the report must be about it.
    pub async fn verify_signed(
        &self,
        token: &str,
        presented: Option<&str>,
        now: SystemTime,
    ) -> Result<PostureRecord, PostureError> {
        let verifier = self
            .reports
            .as_ref()
            .ok_or(PostureError::NotAccepted("signed posture reports"))?;
        let (verified, claims) = verifier
            .verify_with_claims(token)
            .await
            .map_err(|e| PostureError::Rejected(e.to_string()))?;
        let device_id = verified.identity.user().to_owned();
        if let Some(p) = presented {
            if p != device_id {
                return Err(PostureError::WrongDevice {
                    report: device_id,
                    presented: p.to_owned(),
                });
            }
        }
        let issuer_url = verified.identity.facts().issuer.clone().unwrap_or_default();
        let issuer = self
            .cfg
            .issuers
            .iter()
            .find(|i| i.issuer.url == issuer_url)
            .ok_or_else(|| PostureError::Rejected(format!("unknown issuer {issuer_url}")))?;
        let attributes = posture_claim(&claims)
            .map_err(|e| PostureError::Rejected(crate::util::chain::error_chain(&e)))?;
        let collected_at = claim_time(&claims, "iat").unwrap_or(now).min(now);
        let exp = claim_time(&claims, "exp")
            .ok_or_else(|| PostureError::Rejected("exp claim missing".into()))?;
        let max_age = issuer.max_age.unwrap_or(self.cfg.max_age).get();
        let record = PostureRecord {
            device_id,
            attributes,
            source: issuer.source.clone(),
            collected_at,
            expires_at: exp.min(collected_at + max_age),
        };
        record
            .validate()
            .map_err(|e| PostureError::BadReport(e.to_string()))?;
        Ok(record)
    }

    /// A self-report from the device `device_id` (taken from its certificate).
    pub fn self_report(
        &self,
        device_id: &str,
        report: SelfReport,
        now: SystemTime,
    ) -> Result<PostureRecord, PostureError> {
        let cfg = self
            .cfg
            .self_reports
            .as_ref()
            .ok_or(PostureError::NotAccepted("self-reports"))?;
        if let Some(id) = &report.device_id {
            if id != device_id {
                return Err(PostureError::WrongDevice {
                    report: id.clone(),
                    presented: device_id.to_owned(),
                });
            }
        }
        // The agent's clock says when it looked; it cannot push a record into the future.
        let collected_at = report.collected_at.unwrap_or(now).min(now);
        let record = PostureRecord {
            device_id: device_id.to_owned(),
            attributes: report.attributes,
            source: SOURCE_SELF.to_owned(),
            collected_at,
            expires_at: collected_at + cfg.ttl.get(),
        };
        record
            .validate()
            .map_err(|e| PostureError::BadReport(e.to_string()))?;
        Ok(record)
    }

    /// Stores `record` unless what is there should win: a record collected later, or a signed
    /// record still in force when `record` is a self-report.
    pub async fn store(
        &self,
        store: &SharedStore,
        record: PostureRecord,
        now: SystemTime,
    ) -> Result<PostureRecord, PostureError> {
        if let Some(cur) = store.view().posture_at(&record.device_id, now) {
            if self.is_fresh(&cur, now) {
                if cur.collected_at > record.collected_at {
                    return Err(PostureError::Superseded(
                        "a newer posture record for this device is already in force".into(),
                    ));
                }
                if record.source == SOURCE_SELF && cur.source != SOURCE_SELF {
                    return Err(PostureError::Superseded(format!(
                        "a signed posture record from {:?} is in force for this device; \
                         a self-report cannot replace it",
                        cur.source
                    )));
                }
            }
        }
        store.put_posture(record.clone()).await?;
        Ok(record)
    }
}

/// The body of a self-report (`application/json`).
#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SelfReport {
    /// Optional; when present it must be the certificate's device id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    pub attributes: Posture,
    /// When the agent collected the facts (default: now).
    #[serde(
        default,
        with = "crate::state::model::rfc3339_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub collected_at: Option<SystemTime>,
}

fn age(rec: &PostureRecord, now: SystemTime) -> Duration {
    now.duration_since(rec.collected_at)
        .unwrap_or(Duration::ZERO)
}

fn claim_time(claims: &Map<String, Value>, name: &str) -> Option<SystemTime> {
    let secs = claims.get(name)?.as_f64()?;
    if !(0.0..=253_402_300_799.0).contains(&secs) {
        return None;
    }
    Some(UNIX_EPOCH + Duration::from_secs(secs as u64))
}

/// The `posture` claim of a signed report: the attributes object.
fn posture_claim(claims: &Map<String, Value>) -> Result<Posture, PostureClaimError> {
    let v = claims.get("posture").ok_or(PostureClaimError::Missing)?;
    if !v.is_object() {
        return Err(PostureClaimError::NotObject);
    }
    serde_json::from_value(v.clone()).map_err(PostureClaimError::Invalid)
}

/// Why a signed report's `posture` claim is unusable.
#[derive(Debug, thiserror::Error)]
enum PostureClaimError {
    #[error("posture claim missing")]
    Missing,
    #[error("posture claim is not an object")]
    NotObject,
    #[error("posture claim")]
    Invalid(#[source] serde_json::Error),
}

/// What policy sees: unknown facts read as `false` / `""`; the age of the record.
pub fn facts(rec: &PostureRecord, now: SystemTime) -> (PostureFacts, Duration) {
    let a = &rec.attributes;
    (
        PostureFacts {
            os: a.os.clone().unwrap_or_default(),
            os_version: a.os_version.clone().unwrap_or_default(),
            disk_encrypted: a.disk_encrypted.unwrap_or(false),
            firewall: a.firewall.unwrap_or(false),
            screen_lock: a.screen_lock.unwrap_or(false),
            managed: a.managed.unwrap_or(false),
            edr_score: a.edr_score,
            source: rec.source.clone(),
            self_reported: rec.source == SOURCE_SELF,
        },
        age(rec, now),
    )
}

/// A one-line summary for the audit annotation `ztgate.dev/posture` (facts, never secrets).
pub fn summary(rec: &PostureRecord, now: SystemTime) -> String {
    let a = &rec.attributes;
    let b = |v: Option<bool>| match v {
        Some(true) => "yes",
        Some(false) => "no",
        None => "unknown",
    };
    format!(
        "source={} age={}s os={} diskEncrypted={} firewall={} screenLock={} managed={}",
        rec.source,
        age(rec, now).as_secs(),
        a.os.as_deref().unwrap_or("unknown"),
        b(a.disk_encrypted),
        b(a.firewall),
        b(a.screen_lock),
        b(a.managed),
    )
}

#[cfg(test)]
mod tests;
