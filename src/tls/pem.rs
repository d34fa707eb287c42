//! Reading PEM certificate and key material.
use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::TlsError;

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
