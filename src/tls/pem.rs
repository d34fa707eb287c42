//! Reading PEM certificate and key material.
use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::TlsError;

/// Why a PEM bundle of CA certificates is not usable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaPemError {
    /// The text is not PEM.
    #[error("not valid PEM: {0}")]
    Pem(#[source] rustls_pki_types::pem::Error),
    /// A `CERTIFICATE` block does not hold an X.509 certificate (1-based `index`).
    #[error("certificate #{index} is not a valid X.509 certificate: {reason}")]
    NotX509 { index: usize, reason: String },
    /// No `CERTIFICATE` block at all.
    #[error("holds no PEM certificate (expected \"-----BEGIN CERTIFICATE-----\")")]
    Empty,
}

/// Parses PEM CA certificates; at least one is required.
pub fn parse_ca_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CaPemError> {
    let mut certs = Vec::new();
    for (i, item) in CertificateDer::pem_slice_iter(pem).enumerate() {
        let der = item.map_err(CaPemError::Pem)?;
        if let Err(e) = x509_parser::parse_x509_certificate(&der) {
            return Err(CaPemError::NotX509 {
                index: i + 1,
                reason: e.to_string(),
            });
        }
        certs.push(der);
    }
    if certs.is_empty() {
        return Err(CaPemError::Empty);
    }
    Ok(certs)
}

pub fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.display().to_string(),
        source,
    })
}

pub fn certs_from_pem(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    let certs = certs.map_err(|e| TlsError::Invalid {
        path: path.display().to_string(),
        message: format!("bad PEM: {e}"),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Invalid {
            path: path.display().to_string(),
            message: "no PEM certificate found".into(),
        });
    }
    Ok(certs)
}

pub fn key_from_pem(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Invalid {
        path: path.display().to_string(),
        message: format!("no usable PEM private key: {e}"),
    })
}

/// Builds a signing key + chain, checking that the key matches the certificate.
pub fn certified_key(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
) -> Result<rustls::sign::CertifiedKey, TlsError> {
    let chain = certs_from_pem(cert_path, cert_pem)?;
    let key = key_from_pem(key_path, key_pem)?;
    let provider = crate::crypto_provider();
    let ck = rustls::sign::CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
        TlsError::Invalid {
            path: key_path.display().to_string(),
            message: format!(
                "key does not match certificate {}: {e}",
                cert_path.display()
            ),
        }
    })?;
    Ok(ck)
}
