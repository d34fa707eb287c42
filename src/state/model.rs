//! The records the state store keeps: locks (revocations) and device posture.
//!
//! These are plain data with their JSON form (camelCase, RFC 3339 times with nanoseconds). The
//! same JSON is what the store writes to disk and what the `/v1/locks` and posture endpoints are
//! expected to speak, so a field added here is a format change: add it with `#[serde(default)]`
//! so older files still load.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::StoreError;

/// Longest id, target value, device id or source accepted (bytes).
pub const MAX_NAME_BYTES: usize = 1024;
/// Longest lock message accepted (bytes).
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// A revocation: while it is in force, requests and live streams of its target are refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lock {
    /// Random, 32 lower-case hex characters when made by [`Lock::new`].
    pub id: String,
    pub target: LockTarget,
    /// Shown to the locked-out user in the 403 and written to the audit log.
    #[serde(default)]
    pub message: String,
    #[serde(with = "rfc3339")]
    pub created_at: SystemTime,
    /// `None`: until deleted. At or after this instant the lock is ignored.
    #[serde(default, with = "rfc3339_opt", skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<SystemTime>,
    /// Who made the lock (the authenticated user name of the API caller).
    #[serde(default)]
    pub created_by: String,
}

impl Lock {
    /// A new lock with a fresh random id, created now.
    pub fn new(
        target: LockTarget,
        message: impl Into<String>,
        expires_at: Option<SystemTime>,
        created_by: impl Into<String>,
    ) -> Result<Lock, StoreError> {
        Ok(Lock {
            id: new_id()?,
            target,
            message: message.into(),
            created_at: SystemTime::now(),
            expires_at,
            created_by: created_by.into(),
        })
    }

    /// True when the lock no longer applies at `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|e| now >= e)
    }

    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        check_name("lock id", &self.id)?;
        check_name("lock target", self.target.value())?;
        check_len("lock message", &self.message, MAX_MESSAGE_BYTES)?;
        check_len("lock createdBy", &self.created_by, MAX_NAME_BYTES)?;
        check_time("lock createdAt", self.created_at)?;
        if let Some(t) = self.expires_at {
            check_time("lock expiresAt", t)?;
        }
        Ok(())
    }
}

/// What a lock applies to. Values are compared exactly (case-sensitive), as kube-apiserver
/// compares user and group names.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "camelCase")]
pub enum LockTarget {
    /// An authenticated user name (after claim mapping and prefixes).
    User(String),
    /// A group name (after claim mapping and prefixes).
    Group(String),
    /// A device id (from the device certificate).
    Device(String),
    /// A token's `jti`.
    TokenId(String),
    /// A gateway session id.
    Session(String),
}

impl LockTarget {
    /// The name the lock matches, whatever its kind.
    pub fn value(&self) -> &str {
        match self {
            LockTarget::User(v)
            | LockTarget::Group(v)
            | LockTarget::Device(v)
            | LockTarget::TokenId(v)
            | LockTarget::Session(v) => v,
        }
    }
}

/// The facts known about a device. Every fact is optional: "unknown" (a report that could not
/// detect it) is not the same as `false`, and policy decides how to treat it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Posture {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_encrypted: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub screen_lock: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<bool>,
    /// A provider's score, conventionally 0 (bad) to 100 (good).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edr_score: Option<i64>,
    /// Free-form facts from the reporter, visible to policy.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// The latest posture of one device. A newer record for the same device replaces it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PostureRecord {
    pub device_id: String,
    pub attributes: Posture,
    /// Where it came from: `mdm`, `edr`, `self` (the device's own agent), `pull`, ...
    pub source: String,
    #[serde(with = "rfc3339")]
    pub collected_at: SystemTime,
    /// At or after this instant the record is ignored (fail closed: as if there were none).
    #[serde(with = "rfc3339")]
    pub expires_at: SystemTime,
}

impl PostureRecord {
    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.expires_at
    }

    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        check_name("posture deviceId", &self.device_id)?;
        check_len("posture source", &self.source, MAX_NAME_BYTES)?;
        check_time("posture collectedAt", self.collected_at)?;
        check_time("posture expiresAt", self.expires_at)?;
        Ok(())
    }
}

/// Everything the store holds at one revision (expired entries left out).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    /// By lock id.
    #[serde(default)]
    pub locks: BTreeMap<String, Lock>,
    /// By device id.
    #[serde(default)]
    pub posture: BTreeMap<String, PostureRecord>,
}

/// A fresh lock id: 16 bytes from the system CSPRNG (aws-lc, as used for TLS), hex-encoded.
pub fn new_id() -> Result<String, StoreError> {
    let mut b = [0u8; 16];
    crate::crypto_provider()
        .secure_random
        .fill(&mut b)
        .map_err(|_| StoreError::Random)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn check_len(what: &str, v: &str, max: usize) -> Result<(), StoreError> {
    if v.len() > max {
        return Err(StoreError::Invalid(format!(
            "{what} is {} bytes, at most {max} allowed",
            v.len()
        )));
    }
    Ok(())
}

fn check_name(what: &str, v: &str) -> Result<(), StoreError> {
    if v.is_empty() {
        return Err(StoreError::Invalid(format!("{what} is empty")));
    }
    check_len(what, v, MAX_NAME_BYTES)?;
    if v.chars().any(char::is_control) {
        return Err(StoreError::Invalid(format!(
            "{what} contains a control character"
        )));
    }
    Ok(())
}

/// The range the JSON form can represent: 1970-01-01 to 9999-12-31 UTC.
const MAX_UNIX_SECS: u64 = 253_402_300_799;

fn check_time(what: &str, t: SystemTime) -> Result<(), StoreError> {
    if in_range(t) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "{what} is outside 1970-01-01..9999-12-31"
        )))
    }
}

fn in_range(t: SystemTime) -> bool {
    t.duration_since(UNIX_EPOCH)
        .is_ok_and(|d| d < Duration::from_secs(MAX_UNIX_SECS + 1))
}

/// `2026-11-26T15:04:05.123456789Z`. Nanoseconds are kept so a record reads back equal.
fn format_rfc3339(t: SystemTime) -> Option<String> {
    if !in_range(t) {
        return None;
    }
    let t = time::OffsetDateTime::from(t);
    Some(format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond()
    ))
}

fn parse_rfc3339(s: &str) -> Result<SystemTime, crate::util::time::TimeError> {
    crate::util::time::parse_rfc3339(s)
}

pub(crate) mod rfc3339 {
    use std::time::SystemTime;

    use serde::{de, ser, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        match super::format_rfc3339(*t) {
            Some(v) => s.serialize_str(&v),
            None => Err(ser::Error::custom("time outside 1970..9999")),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        super::parse_rfc3339(&s).map_err(de::Error::custom)
    }
}

pub(crate) mod rfc3339_opt {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => super::rfc3339::serialize(t, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        #[derive(Deserialize)]
        struct W(#[serde(with = "super::rfc3339")] SystemTime);
        Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
    }
}
