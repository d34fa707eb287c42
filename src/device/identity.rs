//! The device behind a request: a client certificate from the `devices` trust bundle, and the
//! device id configured to be read from it.

use std::time::SystemTime;

use rustls_pki_types::CertificateDer;
use x509_parser::prelude::X509Certificate;

use super::config::{DeviceConfig, DeviceIdSource};
use super::spiffe::{validate_trust_domain, validate_x509_svid, SpiffeId};
use super::{
    check_extracted_id, not_after, parse_leaf, sha256, uri_sans, verify_chain, DeviceError,
};
use crate::tls::bundles::TrustBundles;

impl DeviceIdSource {
    /// Operator errors: a malformed `trustDomain`, an empty or control-character `prefix`.
    pub fn validate(&self) -> Result<(), DeviceError> {
        match self {
            DeviceIdSource::Spiffe {
                trust_domain: Some(td),
            } => validate_trust_domain(td)
                .map_err(|e| DeviceError::InvalidConfig(format!("trustDomain {td:?}: {e}"))),
            DeviceIdSource::Spiffe { trust_domain: None } | DeviceIdSource::CommonName => Ok(()),
            DeviceIdSource::UriPrefix(prefix) => {
                if prefix.is_empty() {
                    Err(DeviceError::InvalidConfig("empty URI prefix".into()))
                } else if prefix.chars().any(|c| c.is_control() || c.is_whitespace()) {
                    Err(DeviceError::InvalidConfig(
                        "URI prefix has whitespace or control characters".into(),
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }
}

impl DeviceConfig {
    /// Operator errors in the section (the bundle's existence is checked by the caller, which
    /// knows the loaded bundles).
    pub fn validate(&self) -> Result<(), DeviceError> {
        if self.bundle.is_empty() {
            return Err(DeviceError::InvalidConfig("devices.bundle is empty".into()));
        }
        self.device_id.validate()
    }
}

/// A device established from a verified client certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceIdentity {
    /// The configured id: full SPIFFE ID, CN, or the URI remainder after the prefix.
    pub id: String,
    /// SHA-256 of the leaf certificate's DER (what `cnf.x5t#S256` is compared with).
    pub cert_sha256: [u8; 32],
    /// The leaf's notAfter; the device is not trusted past it.
    pub not_after: SystemTime,
    /// Set when the id came from a SPIFFE ID.
    pub spiffe_id: Option<SpiffeId>,
}

impl DeviceIdentity {
    /// Whether the certificate has expired at `now` (callers that cache must re-check).
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.not_after <= now
    }
}

/// Verifies `chain` (leaf first) against the configured device bundle for client
/// authentication at `now`, then reads the device id as configured.
pub fn device_from_chain(
    cfg: &DeviceConfig,
    bundles: &TrustBundles,
    chain: &[CertificateDer<'static>],
    now: SystemTime,
) -> Result<DeviceIdentity, DeviceError> {
    let leaf = chain.first().ok_or(DeviceError::NoCertificate)?;
    verify_chain(bundles, &cfg.bundle, chain, now)?;
    let cert = parse_leaf(leaf.as_ref())?;
    let (id, spiffe_id) = match &cfg.device_id {
        DeviceIdSource::Spiffe { trust_domain } => {
            let sid = validate_x509_svid(leaf.as_ref())?;
            if let Some(expected) = trust_domain {
                if &sid.trust_domain != expected {
                    return Err(DeviceError::WrongTrustDomain {
                        expected: expected.clone(),
                        found: sid.trust_domain,
                    });
                }
            }
            (sid.to_string(), Some(sid))
        }
        DeviceIdSource::CommonName => (common_name(&cert)?, None),
        DeviceIdSource::UriPrefix(prefix) => (uri_with_prefix(&cert, prefix)?, None),
    };
    check_extracted_id(&id)?;
    Ok(DeviceIdentity {
        id,
        cert_sha256: sha256(leaf.as_ref()),
        not_after: not_after(&cert),
        spiffe_id,
    })
}

fn common_name(cert: &X509Certificate<'_>) -> Result<String, DeviceError> {
    let cns: Vec<_> = cert.subject().iter_common_name().collect();
    match cns.as_slice() {
        [] => Err(DeviceError::NoCommonName),
        [cn] => cn
            .as_str()
            .map(str::to_owned)
            .map_err(|_| DeviceError::InvalidDeviceId("common name is not a string")),
        many => Err(DeviceError::MultipleCommonNames(many.len())),
    }
}

fn uri_with_prefix(cert: &X509Certificate<'_>, prefix: &str) -> Result<String, DeviceError> {
    let matching: Vec<&str> = uri_sans(cert)?
        .into_iter()
        .filter_map(|uri| uri.strip_prefix(prefix))
        .collect();
    match matching.as_slice() {
        [] => Err(DeviceError::NoMatchingUri),
        [rest] => Ok((*rest).to_owned()),
        many => Err(DeviceError::AmbiguousUri(many.len())),
    }
}
