//! `authentication.devices` and `authentication.workloads` config types.
//!
//! Only the types and their wire form live here; their checks are with the code that reads
//! certificates (`DeviceIdSource::validate`, `DeviceConfig::validate` in `device::identity`,
//! `validate_workload_mappings` in `device::spiffe`).

use serde::{Deserialize, Serialize};

/// The `devices:` section: which bundle device certificates chain to, and where the id is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DeviceConfig {
    /// Name of a client-certificate trust bundle (`listener.clientCertificateBundles`).
    pub bundle: String,
    pub device_id: DeviceIdSource,
    /// Device posture: where records come from and how fresh they must be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub posture: Option<crate::posture::config::PostureConfig>,
}

/// Where the device id is read from (config `deviceId: {from, trustDomain?, prefix?}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawDeviceIdSource", into = "RawDeviceIdSource")]
pub enum DeviceIdSource {
    /// `from: spiffe`: the certificate must be a valid X509-SVID; the id is the full SPIFFE ID.
    /// With `trustDomain`, the SPIFFE ID must be in that trust domain.
    Spiffe { trust_domain: Option<String> },
    /// `from: commonName`: the subject's single CN.
    CommonName,
    /// `from: uriPrefix, prefix: P`: the single URI SAN starting with `P` (exact, case-sensitive
    /// byte match); the id is the rest of the URI after `P`.
    UriPrefix(String),
}

/// The wire form of [`DeviceIdSource`]: one flat map, every combination checked.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawDeviceIdSource {
    from: DeviceIdFrom,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    trust_domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
}

#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
enum DeviceIdFrom {
    Spiffe,
    CommonName,
    UriPrefix,
}

/// Why a `deviceId` map is refused (serde reports it with its position in the file).
#[derive(Debug, thiserror::Error)]
pub enum DeviceIdSourceError {
    #[error("`from: uriPrefix` needs `prefix`")]
    NoPrefix,
    #[error("`trustDomain` goes only with `from: spiffe`")]
    StrayTrustDomain,
    #[error("`prefix` goes only with `from: uriPrefix`")]
    StrayPrefix,
    /// `DeviceIdSource::validate`'s refusal (boxed: this module is below `device`).
    #[error(transparent)]
    Invalid(Box<dyn std::error::Error + Send + Sync>),
}

impl TryFrom<RawDeviceIdSource> for DeviceIdSource {
    type Error = DeviceIdSourceError;
    fn try_from(raw: RawDeviceIdSource) -> Result<Self, DeviceIdSourceError> {
        let source = match (raw.from, raw.trust_domain, raw.prefix) {
            (DeviceIdFrom::Spiffe, trust_domain, None) => DeviceIdSource::Spiffe { trust_domain },
            (DeviceIdFrom::CommonName, None, None) => DeviceIdSource::CommonName,
            (DeviceIdFrom::UriPrefix, None, Some(prefix)) => DeviceIdSource::UriPrefix(prefix),
            (DeviceIdFrom::UriPrefix, None, None) => return Err(DeviceIdSourceError::NoPrefix),
            (_, Some(_), _) => return Err(DeviceIdSourceError::StrayTrustDomain),
            (_, None, Some(_)) => return Err(DeviceIdSourceError::StrayPrefix),
        };
        source
            .validate()
            .map_err(|e| DeviceIdSourceError::Invalid(Box::new(e)))?;
        Ok(source)
    }
}

impl From<DeviceIdSource> for RawDeviceIdSource {
    fn from(source: DeviceIdSource) -> Self {
        match source {
            DeviceIdSource::Spiffe { trust_domain } => RawDeviceIdSource {
                from: DeviceIdFrom::Spiffe,
                trust_domain,
                prefix: None,
            },
            DeviceIdSource::CommonName => RawDeviceIdSource {
                from: DeviceIdFrom::CommonName,
                trust_domain: None,
                prefix: None,
            },
            DeviceIdSource::UriPrefix(prefix) => RawDeviceIdSource {
                from: DeviceIdFrom::UriPrefix,
                trust_domain: None,
                prefix: Some(prefix),
            },
        }
    }
}

/// Workload SVIDs of one SPIFFE trust domain, verified against its own bundle, authenticate as
/// the user `username_prefix + SPIFFE ID` (e.g. `spiffe:spiffe://prod.example.org/ns/a/sa/b`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadMapping {
    /// Bare trust domain name, e.g. `prod.example.org`.
    pub trust_domain: String,
    /// The trust bundle (CA certificates) of that trust domain, by name.
    pub bundle: String,
    /// Prepended to the full SPIFFE ID to form the user name. Required; may be empty.
    pub username_prefix: String,
}
