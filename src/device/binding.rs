//! RFC 8705 certificate-bound tokens: a token carrying `cnf.x5t#S256` is only good together
//! with the client certificate whose SHA-256 it names, on every request.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use super::{sha256, DeviceIdentity};

/// The outcome of comparing a token's confirmation claim with the presented certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Binding {
    /// The token is bound and the presented certificate is the one it is bound to.
    Bound,
    /// The token carries no `cnf.x5t#S256`; nothing to check (policy may still require binding).
    Unbound,
    /// The token is bound to another certificate (or its `cnf.x5t#S256` is malformed).
    Mismatch,
    /// The token is bound but no client certificate was presented.
    NoCertificate,
}

impl Binding {
    /// What `context.device.bound` tells policy.
    pub fn is_bound(self) -> bool {
        self == Binding::Bound
    }

    /// A bound token used without its certificate must be refused outright (RFC 8705 §3),
    /// whatever the policy says.
    pub fn rejects_request(self) -> bool {
        matches!(self, Binding::Mismatch | Binding::NoCertificate)
    }

    /// A short, stable label for audit and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Binding::Bound => "bound",
            Binding::Unbound => "unbound",
            Binding::Mismatch => "mismatch",
            Binding::NoCertificate => "no_certificate",
        }
    }
}

/// The RFC 8705 thumbprint of a certificate: base64url (no padding) of the SHA-256 of its DER.
pub fn x5t_s256(cert_der: &[u8]) -> String {
    encode_thumbprint(&sha256(cert_der))
}

fn encode_thumbprint(hash: &[u8; 32]) -> String {
    URL_SAFE_NO_PAD.encode(hash)
}

impl DeviceIdentity {
    /// The certificate thumbprint as RFC 8705 writes it (base64url, no padding).
    pub fn x5t_s256(&self) -> String {
        encode_thumbprint(&self.cert_sha256)
    }
}

/// Compares a token's `cnf.x5t#S256` (as in [`crate::authn::CredentialFacts::cnf_x5t_s256`])
/// with the presented device certificate. The comparison is constant-time.
pub fn check_binding(cnf_x5t_s256: Option<&str>, presented: Option<&DeviceIdentity>) -> Binding {
    check_hash(cnf_x5t_s256, presented.map(|d| &d.cert_sha256))
}

/// As [`check_binding`], with the leaf certificate DER itself. RFC 8705 binds to the certificate
/// the TLS handshake proved possession of, whether or not it chains to a device bundle.
pub fn check_binding_der(cnf_x5t_s256: Option<&str>, presented_leaf: Option<&[u8]>) -> Binding {
    let hash = presented_leaf.map(sha256);
    check_hash(cnf_x5t_s256, hash.as_ref())
}

fn check_hash(cnf: Option<&str>, presented: Option<&[u8; 32]>) -> Binding {
    let Some(cnf) = cnf else {
        return Binding::Unbound;
    };
    let Some(presented) = presented else {
        return Binding::NoCertificate;
    };
    // Strict base64url without padding and with canonical trailing bits, as JWS writes it.
    let Ok(expected) = URL_SAFE_NO_PAD.decode(cnf) else {
        return Binding::Mismatch;
    };
    let Ok(expected) = <[u8; 32]>::try_from(expected.as_slice()) else {
        return Binding::Mismatch;
    };
    if crate::ct::eq(&expected, presented) {
        Binding::Bound
    } else {
        Binding::Mismatch
    }
}
