//! SPIFFE IDs, X509-SVID leaf rules, and workload SVIDs as principals.
//!
//! The rules follow the SPIFFE ID and X509-SVID standards: a SPIFFE ID is
//! `spiffe://<trust domain><path>`; an X509-SVID leaf carries exactly one URI SAN (its SPIFFE ID),
//! is not a CA, and has keyUsage with digitalSignature and without keyCertSign or cRLSign.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use rustls_pki_types::CertificateDer;

use super::config::WorkloadMapping;
use super::{
    check_extracted_id, not_after, parse_leaf, sha256, uri_sans, verify_chain, DeviceError,
};
use crate::tls::bundles::TrustBundles;

/// The longest SPIFFE ID accepted, in bytes (SPIFFE ID spec, "Maximum SPIFFE ID Length").
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// The longest trust domain name accepted, in bytes (SPIFFE ID spec, "Trust Domain").
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME_PREFIX: &str = "spiffe://";

/// A syntactically valid SPIFFE ID. `path` is empty (the ID of the trust domain itself) or
/// starts with `/`. Build one with [`SpiffeId::parse`]; `Display` gives back the URI.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub path: String,
}

/// The SPIFFE ID rule a string breaks. Values are not echoed: the string is attacker-chosen.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SpiffeIdError {
    #[error("empty")]
    Empty,
    #[error("longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
    #[error("scheme is not exactly \"spiffe\" followed by \"://\"")]
    WrongScheme,
    #[error("trust domain is missing")]
    MissingTrustDomain,
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error("user info is not allowed")]
    UserInfo,
    #[error("a port is not allowed")]
    Port,
    #[error("trust domain must be lowercase")]
    TrustDomainNotLowercase,
    #[error("trust domain has a character outside [a-z0-9.-_]")]
    TrustDomainChar,
    #[error("a query is not allowed")]
    Query,
    #[error("a fragment is not allowed")]
    Fragment,
    #[error("path has an empty segment (\"//\" or a trailing \"/\")")]
    EmptySegment,
    #[error("path has a \".\" or \"..\" segment")]
    DotSegment,
    #[error("path has a character outside [A-Za-z0-9.-_]")]
    PathChar,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID: scheme exactly `spiffe`, a trust domain of
    /// `[a-z0-9.-_]` (no uppercase, port or user info), no query or fragment, path segments
    /// non-empty, not `.` or `..`, of `[A-Za-z0-9.-_]` (so no percent-encoding), at most
    /// [`MAX_SPIFFE_ID_LEN`] bytes in all.
    pub fn parse(s: &str) -> Result<SpiffeId, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s
            .strip_prefix(SCHEME_PREFIX)
            .ok_or(SpiffeIdError::WrongScheme)?;
        // A query or fragment starts at the first `?` or `#`, wherever it is.
        match rest.find(['?', '#']).map(|i| rest.as_bytes()[i]) {
            Some(b'?') => return Err(SpiffeIdError::Query),
            Some(_) => return Err(SpiffeIdError::Fragment),
            None => {}
        }
        let (trust_domain, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        validate_trust_domain(trust_domain)?;
        validate_path(path)?;
        Ok(SpiffeId {
            trust_domain: trust_domain.to_owned(),
            path: path.to_owned(),
        })
    }

    /// The ID of a trust domain itself (empty path); never a workload's or a device's.
    pub fn is_trust_domain_id(&self) -> bool {
        self.path.is_empty()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME_PREFIX}{}{}", self.trust_domain, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

/// Validates a bare trust domain name (`example.org`, not `spiffe://example.org`).
pub fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if td.contains('@') {
        return Err(SpiffeIdError::UserInfo);
    }
    if td.contains(':') {
        return Err(SpiffeIdError::Port);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    if td.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(SpiffeIdError::TrustDomainNotLowercase);
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(SpiffeIdError::TrustDomainChar);
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    let Some(segments) = path.strip_prefix('/') else {
        // Only reachable with an empty path: the split point is the first `/`.
        return Ok(());
    };
    for segment in segments.split('/') {
        if segment.is_empty() {
            return Err(SpiffeIdError::EmptySegment);
        }
        if segment == "." || segment == ".." {
            return Err(SpiffeIdError::DotSegment);
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err(SpiffeIdError::PathChar);
        }
    }
    Ok(())
}

/// Checks a leaf certificate against the X509-SVID rules and returns its SPIFFE ID: exactly one
/// URI SAN holding a valid SPIFFE ID with a path (a leaf names a workload, not a trust domain),
/// basicConstraints cA false or absent, keyUsage present with digitalSignature and without
/// keyCertSign or cRLSign. This does not verify the chain; see [`workload_from_chain`] and
/// [`super::device_from_chain`].
pub fn validate_x509_svid(leaf_der: &[u8]) -> Result<SpiffeId, DeviceError> {
    let cert = parse_leaf(leaf_der)?;
    let uris = uri_sans(&cert)?;
    let uri = match uris.as_slice() {
        [] => return Err(DeviceError::NoUriSan),
        [one] => *one,
        many => return Err(DeviceError::MultipleUriSans(many.len())),
    };
    let id = SpiffeId::parse(uri).map_err(DeviceError::InvalidSpiffeId)?;
    if id.is_trust_domain_id() {
        return Err(DeviceError::SpiffeIdWithoutPath);
    }
    let bc = cert
        .basic_constraints()
        .map_err(|e| DeviceError::Unparseable(format!("basicConstraints: {e}")))?;
    if bc.is_some_and(|ext| ext.value.ca) {
        return Err(DeviceError::LeafIsCa);
    }
    let ku = cert
        .key_usage()
        .map_err(|e| DeviceError::Unparseable(format!("keyUsage: {e}")))?
        .ok_or(DeviceError::KeyUsageMissing)?;
    if !ku.value.digital_signature() {
        return Err(DeviceError::NoDigitalSignature);
    }
    if ku.value.key_cert_sign() {
        return Err(DeviceError::ForbiddenKeyUsage("keyCertSign"));
    }
    if ku.value.crl_sign() {
        return Err(DeviceError::ForbiddenKeyUsage("cRLSign"));
    }
    Ok(id)
}

/// A workload authenticated by its X509-SVID. `authn` turns it into an `Identity`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub spiffe_id: SpiffeId,
    /// `username_prefix` + the SPIFFE ID.
    pub username: String,
    /// The bundle the chain verified against.
    pub bundle: String,
    /// SHA-256 of the leaf DER (for RFC 8705 binding and audit).
    pub cert_sha256: [u8; 32],
    pub not_after: SystemTime,
}

/// Checks workload mappings: valid trust domain names, a bundle each, one mapping per trust
/// domain, and no control characters in the prefix.
pub fn validate_workload_mappings(mappings: &[WorkloadMapping]) -> Result<(), DeviceError> {
    let mut seen = BTreeSet::new();
    for m in mappings {
        validate_trust_domain(&m.trust_domain).map_err(|e| {
            DeviceError::InvalidConfig(format!("trustDomain {:?}: {e}", m.trust_domain))
        })?;
        if m.bundle.is_empty() {
            return Err(DeviceError::InvalidConfig(format!(
                "trust domain {:?} has no bundle",
                m.trust_domain
            )));
        }
        if m.username_prefix.chars().any(char::is_control) {
            return Err(DeviceError::InvalidConfig(format!(
                "usernamePrefix of trust domain {:?} has control characters",
                m.trust_domain
            )));
        }
        if !seen.insert(m.trust_domain.as_str()) {
            return Err(DeviceError::InvalidConfig(format!(
                "trust domain {:?} is mapped more than once",
                m.trust_domain
            )));
        }
    }
    Ok(())
}

/// Authenticates a workload by its X509-SVID chain. The leaf's trust domain selects the mapping
/// (and so the bundle); the chain must then verify against *that* bundle, so a CA of one trust
/// domain can never vouch for an ID in another.
pub fn workload_from_chain(
    mappings: &[WorkloadMapping],
    bundles: &TrustBundles,
    chain: &[CertificateDer<'static>],
    now: SystemTime,
) -> Result<Workload, DeviceError> {
    let leaf = chain.first().ok_or(DeviceError::NoCertificate)?;
    let spiffe_id = validate_x509_svid(leaf.as_ref())?;
    let mapping = mappings
        .iter()
        .find(|m| m.trust_domain == spiffe_id.trust_domain)
        .ok_or_else(|| DeviceError::UnknownTrustDomain(spiffe_id.trust_domain.clone()))?;
    verify_chain(bundles, &mapping.bundle, chain, now)?;
    let cert = parse_leaf(leaf.as_ref())?;
    let username = format!("{}{}", mapping.username_prefix, spiffe_id);
    check_extracted_id(&username)?;
    Ok(Workload {
        username,
        bundle: mapping.bundle.clone(),
        cert_sha256: sha256(leaf.as_ref()),
        not_after: not_after(&cert),
        spiffe_id,
    })
}
