//! Device trust: who the *device* is, next to who the user is.
//!
//! kubectl can present a bearer token and a client certificate, nothing else, so the device is
//! the client certificate (see docs/device-trust.md). This module owns:
//!
//! - [`device_from_chain`]: verifies a client chain against the configured `devices` trust
//!   bundle (clientAuth usage, at the time of the request) and takes the device id from it — a
//!   SPIFFE ID, the subject CN, or a URI SAN after a configured prefix ([`DeviceIdSource`]);
//! - [`SpiffeId`] and [`validate_x509_svid`]: the SPIFFE ID syntax and the X509-SVID leaf rules;
//! - [`workload_from_chain`]: workload SVIDs from configured SPIFFE trust domains (one bundle per
//!   trust domain), mapped to a user name ([`WorkloadMapping`]);
//! - [`check_binding`]: RFC 8705 certificate-bound tokens (`cnf.x5t#S256`).
//!
//! It never builds an [`crate::authn::Identity`] (only `authn` may) and never logs or returns a
//! token: the values it reports are certificate facts (hashes, names), never secrets. Nothing here
//! caches a result past the certificate's `notAfter`; callers re-check on every request.

mod binding;
pub mod config;
mod identity;
mod spiffe;

#[cfg(test)]
mod tests;

use std::time::{Duration, SystemTime};

use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::tls::bundles::TrustBundles;

pub use binding::{check_binding, check_binding_der, x5t_s256, Binding};
pub use config::{DeviceConfig, DeviceIdSource, WorkloadMapping};
pub use identity::{device_from_chain, DeviceIdentity};
pub use spiffe::{
    validate_trust_domain, validate_workload_mappings, validate_x509_svid, workload_from_chain,
    SpiffeId, SpiffeIdError, Workload, MAX_SPIFFE_ID_LEN, MAX_TRUST_DOMAIN_LEN,
};

/// The longest device id accepted from a certificate (CN or URI remainder), in bytes.
pub const MAX_DEVICE_ID_LEN: usize = 2048;

/// Why a device (or workload) certificate was not accepted. Every variant says who is at fault:
/// the *client* (presented something unacceptable), the *issuer* (the CA, MDM or SPIRE server
/// minted a certificate that breaks the rules), or the *operator* (configuration). Messages carry
/// certificate facts only, never a token or key material; attacker-chosen strings are not echoed
/// except through validated or `Debug`-escaped forms.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceError {
    /// Client: no client certificate was presented on the connection.
    #[error("no client certificate presented")]
    NoCertificate,
    /// Operator: the configured trust bundle is not loaded (misnamed, or failed to load).
    #[error("trust bundle {0:?} is not loaded")]
    BundleNotLoaded(String),
    /// Client: the certificate is not DER X.509 that can be read.
    #[error("client certificate is unparseable: {0}")]
    Unparseable(String),
    /// Client: the chain does not verify against the bundle (unknown CA, bad signature, no
    /// clientAuth usage, a CA certificate used as the leaf, ...).
    #[error("client certificate rejected: {0}")]
    CertificateRejected(String),
    /// Client: the certificate (or one in its chain) has expired.
    #[error("client certificate has expired")]
    CertificateExpired,
    /// Client (or a skewed clock): the certificate's validity has not started.
    #[error("client certificate is not valid yet")]
    CertificateNotYetValid,
    /// Issuer: an SVID must carry exactly one URI SAN; this one has none.
    #[error("certificate has no URI SAN (an X509-SVID has exactly one)")]
    NoUriSan,
    /// Issuer: an SVID must carry exactly one URI SAN; this one has several.
    #[error("certificate has {0} URI SANs (an X509-SVID has exactly one)")]
    MultipleUriSans(usize),
    /// Issuer: the URI SAN is not a valid SPIFFE ID.
    #[error("URI SAN is not a valid SPIFFE ID: {0}")]
    InvalidSpiffeId(SpiffeIdError),
    /// Issuer: a leaf SVID names a workload, so its SPIFFE ID must have a path.
    #[error("leaf SVID carries a trust-domain SPIFFE ID without a path")]
    SpiffeIdWithoutPath,
    /// Issuer: the leaf is a CA (basicConstraints cA=true).
    #[error("leaf certificate is a CA")]
    LeafIsCa,
    /// Issuer: an SVID leaf must have the keyUsage extension.
    #[error("leaf certificate has no keyUsage extension")]
    KeyUsageMissing,
    /// Issuer: an SVID leaf's keyUsage must include digitalSignature.
    #[error("leaf certificate keyUsage lacks digitalSignature")]
    NoDigitalSignature,
    /// Issuer: an SVID leaf must not have keyCertSign or cRLSign.
    #[error("leaf certificate keyUsage has {0}")]
    ForbiddenKeyUsage(&'static str),
    /// Client: the SPIFFE ID is from a trust domain other than the one configured for devices.
    #[error("SPIFFE ID is in trust domain {found:?}, expected {expected:?}")]
    WrongTrustDomain { expected: String, found: String },
    /// Client: a workload SVID from a trust domain no mapping is configured for.
    #[error("no workload mapping for SPIFFE trust domain {0:?}")]
    UnknownTrustDomain(String),
    /// Client or issuer: device id from CN configured, but the subject has no CN.
    #[error("certificate subject has no common name")]
    NoCommonName,
    /// Client or issuer: device id from CN configured, but the subject has several CNs.
    #[error("certificate subject has {0} common names")]
    MultipleCommonNames(usize),
    /// Client or issuer: no URI SAN starts with the configured prefix.
    #[error("no URI SAN starts with the configured device id prefix")]
    NoMatchingUri,
    /// Client or issuer: several URI SANs start with the configured prefix.
    #[error("{0} URI SANs start with the configured device id prefix")]
    AmbiguousUri(usize),
    /// Client or issuer: the extracted device id is unusable (empty, too long, control chars).
    #[error("device id refused: {0}")]
    InvalidDeviceId(&'static str),
    /// Operator: the device or workload configuration is invalid.
    #[error("invalid device trust configuration: {0}")]
    InvalidConfig(String),
}

impl DeviceError {
    /// A short, stable label for metrics (bounded set; no user data).
    pub fn reason_label(&self) -> &'static str {
        match self {
            DeviceError::NoCertificate => "no_certificate",
            DeviceError::BundleNotLoaded(_) => "bundle_not_loaded",
            DeviceError::Unparseable(_) => "unparseable",
            DeviceError::CertificateRejected(_) => "certificate_rejected",
            DeviceError::CertificateExpired => "certificate_expired",
            DeviceError::CertificateNotYetValid => "certificate_not_yet_valid",
            DeviceError::NoUriSan
            | DeviceError::MultipleUriSans(_)
            | DeviceError::InvalidSpiffeId(_)
            | DeviceError::SpiffeIdWithoutPath
            | DeviceError::LeafIsCa
            | DeviceError::KeyUsageMissing
            | DeviceError::NoDigitalSignature
            | DeviceError::ForbiddenKeyUsage(_) => "invalid_svid",
            DeviceError::WrongTrustDomain { .. } => "wrong_trust_domain",
            DeviceError::UnknownTrustDomain(_) => "unknown_trust_domain",
            DeviceError::NoCommonName
            | DeviceError::MultipleCommonNames(_)
            | DeviceError::NoMatchingUri
            | DeviceError::AmbiguousUri(_)
            | DeviceError::InvalidDeviceId(_) => "no_device_id",
            DeviceError::InvalidConfig(_) => "invalid_config",
        }
    }
}

/// Parses a leaf certificate, refusing trailing bytes after the DER.
fn parse_leaf(der: &[u8]) -> Result<X509Certificate<'_>, DeviceError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| DeviceError::Unparseable(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DeviceError::Unparseable(
            "trailing data after the certificate".into(),
        ));
    }
    Ok(cert)
}

/// The URI SANs of a certificate, in order.
fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a str>, DeviceError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| DeviceError::Unparseable(format!("subjectAltName: {e}")))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

fn not_after(cert: &X509Certificate<'_>) -> SystemTime {
    let secs = cert.validity().not_after.timestamp().max(0) as u64;
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn sha256(der: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Verifies `chain` (leaf first, then intermediates) against the named bundle for client
/// authentication at `now`. An absent EKU is accepted (RFC 5280); one without clientAuth is not.
fn verify_chain(
    bundles: &TrustBundles,
    bundle_name: &str,
    chain: &[CertificateDer<'static>],
    now: SystemTime,
) -> Result<(), DeviceError> {
    let leaf = chain.first().ok_or(DeviceError::NoCertificate)?;
    let set = bundles.load();
    let bundle = set
        .get(bundle_name)
        .ok_or_else(|| DeviceError::BundleNotLoaded(bundle_name.to_owned()))?;
    let ee = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| DeviceError::Unparseable(format!("{e}")))?;
    let since_epoch = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let provider = crate::crypto_provider();
    ee.verify_for_usage(
        provider.signature_verification_algorithms.all,
        bundle.anchors(),
        &chain[1..],
        UnixTime::since_unix_epoch(since_epoch),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| match e {
        webpki::Error::CertExpired { .. } => DeviceError::CertificateExpired,
        webpki::Error::CertNotValidYet { .. } => DeviceError::CertificateNotYetValid,
        webpki::Error::UnknownIssuer => {
            DeviceError::CertificateRejected("not signed by a CA of the bundle".into())
        }
        webpki::Error::RequiredEkuNotFoundContext(_) => {
            DeviceError::CertificateRejected("no clientAuth extended key usage".into())
        }
        webpki::Error::CaUsedAsEndEntity => {
            DeviceError::CertificateRejected("a CA certificate used as the leaf".into())
        }
        other => DeviceError::CertificateRejected(format!("{other:?}")),
    })
}

/// Checks a device id or user name taken from a certificate.
fn check_extracted_id(id: &str) -> Result<(), DeviceError> {
    if id.is_empty() {
        return Err(DeviceError::InvalidDeviceId("empty"));
    }
    if id.len() > MAX_DEVICE_ID_LEN {
        return Err(DeviceError::InvalidDeviceId("longer than 2048 bytes"));
    }
    if id.chars().any(char::is_control) {
        return Err(DeviceError::InvalidDeviceId("contains control characters"));
    }
    Ok(())
}
