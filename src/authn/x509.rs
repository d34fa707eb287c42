//! x509 client-certificate authentication, read the way kube-apiserver reads it: the subject CN
//! is the user name and each O attribute is a group. The chain must verify to the configured
//! users bundle with the clientAuth extended key usage, at the time of the request.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::*;

use super::{check_name, AuthMethod, AuthnError, Identity};
use crate::tls::bundles::TrustBundles;

pub struct X509Authenticator {
    bundle: String,
    bundles: Arc<TrustBundles>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

/// A verification result, remembered per connection with the bundle generation it used.
#[derive(Clone, Debug)]
pub struct Verified {
    pub generation: u64,
    pub result: Result<Arc<Identity>, AuthnError>,
}

impl X509Authenticator {
    pub fn new(bundle: String, bundles: Arc<TrustBundles>) -> X509Authenticator {
        X509Authenticator {
            bundle,
            bundles,
            provider: crate::crypto_provider(),
        }
    }

    /// The generation of the bundle set now in force.
    pub fn generation(&self) -> u64 {
        self.bundles.load().generation
    }

    /// Verifies the chain and builds the identity. Validity is checked against `now`; callers
    /// that cache the result must re-check [`Identity::expires_at`] on every request.
    pub fn verify(&self, chain: &[CertificateDer<'static>], now: SystemTime) -> Verified {
        let set = self.bundles.load();
        let generation = set.generation;
        let result = (|| {
            let leaf = chain.first().ok_or(AuthnError::NoCredentials)?;
            let bundle = set
                .get(&self.bundle)
                .ok_or_else(|| AuthnError::CertificateRejected {
                    reason: format!("bundle {:?} is not loaded", self.bundle),
                    cause: None,
                })?;
            let ee = webpki::EndEntityCert::try_from(leaf)
                .map_err(|e| rejected(format!("unparseable: {e}"), e))?;
            let since_epoch = now
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or(Duration::ZERO);
            ee.verify_for_usage(
                self.provider.signature_verification_algorithms.all,
                bundle.anchors(),
                &chain[1..],
                UnixTime::since_unix_epoch(since_epoch),
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map_err(|e| rejected(describe(&e), e))?;
            identity_from_leaf(leaf, &self.bundle).map(Arc::new)
        })();
        Verified { generation, result }
    }
}

/// The identity of a workload authenticated by its X509-SVID (see
/// [`crate::device::workload_from_chain`]): the mapped user name, no groups (kube-apiserver adds
/// `system:authenticated`), valid until the SVID's notAfter.
pub fn workload_identity(w: &crate::device::Workload) -> Result<Identity, AuthnError> {
    check_name("user name (SPIFFE ID)", &w.username)?;
    Ok(Identity {
        user: w.username.clone(),
        uid: None,
        groups: Vec::new(),
        extra: Default::default(),
        method: AuthMethod::Spiffe {
            trust_domain: w.spiffe_id.trust_domain.clone(),
        },
        expires_at: Some(w.not_after),
        facts: super::CredentialFacts {
            issuer: Some(w.bundle.clone()),
            ..Default::default()
        },
        derived: Default::default(),
    })
}

/// A rejected certificate: why, in a few words, and the verifier's or parser's error as the cause.
fn rejected(reason: String, cause: impl std::error::Error + Send + Sync + 'static) -> AuthnError {
    AuthnError::CertificateRejected {
        reason,
        cause: Some(crate::util::chain::SharedCause(std::sync::Arc::new(cause))),
    }
}

fn describe(e: &webpki::Error) -> String {
    match e {
        webpki::Error::CertExpired { .. } => "certificate has expired".into(),
        webpki::Error::CertNotValidYet { .. } => "certificate is not valid yet".into(),
        webpki::Error::UnknownIssuer => "certificate is not signed by a trusted CA".into(),
        webpki::Error::RequiredEkuNotFoundContext(_) => {
            "certificate lacks the clientAuth extended key usage".into()
        }
        other => format!("{other:?}"),
    }
}

fn identity_from_leaf(leaf: &CertificateDer<'_>, bundle: &str) -> Result<Identity, AuthnError> {
    let (_, cert) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|e| rejected(format!("unparseable: {e}"), e))?;
    let subject = cert.subject();
    let user = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_owned();
    check_name("user name (certificate CN)", &user)?;
    let mut groups = Vec::new();
    for o in subject.iter_organization() {
        let g = o
            .as_str()
            .map_err(|_| AuthnError::InvalidIdentity("organization is not a string".into()))?;
        check_name("group (certificate O)", g)?;
        groups.push(g.to_owned());
    }
    let not_after = cert.validity().not_after.timestamp();
    let expires_at = SystemTime::UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64);
    Ok(Identity {
        user,
        uid: None,
        groups,
        extra: Default::default(),
        method: AuthMethod::X509 {
            bundle: bundle.to_owned(),
        },
        expires_at: Some(expires_at),
        facts: super::CredentialFacts {
            issuer: Some(bundle.to_owned()),
            issued_at: Some(
                SystemTime::UNIX_EPOCH
                    + Duration::from_secs(cert.validity().not_before.timestamp().max(0) as u64),
            ),
            ..Default::default()
        },
        derived: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::bundles::Bundle;
    use ztgate_testkit::TestPki;

    fn authn(pki: &TestPki) -> X509Authenticator {
        let bundle = Bundle::from_der("users", &[pki.users_ca.cert_der().into()]).unwrap();
        X509Authenticator::new("users".into(), Arc::new(TrustBundles::new(vec![bundle])))
    }

    fn chain(ck: &ztgate_testkit::CertKey) -> Vec<CertificateDer<'static>> {
        vec![CertificateDer::from(ck.cert_der.clone())]
    }

    #[test]
    fn cn_is_the_user_and_each_o_a_group() {
        let pki = TestPki::new();
        let id = authn(&pki)
            .verify(
                &chain(&pki.user("alice", &["team-a", "devs"])),
                SystemTime::now(),
            )
            .result
            .unwrap();
        assert_eq!(id.user(), "alice");
        assert_eq!(id.groups(), ["team-a".to_string(), "devs".to_string()]);
        assert!(id.expires_at().unwrap() > SystemTime::now());
    }

    #[test]
    fn refuses_expired_not_yet_valid_and_unknown_ca() {
        let pki = TestPki::new();
        let a = authn(&pki);
        for (ck, want) in [
            (pki.expired_user("bob"), "expired"),
            (pki.not_yet_valid_user("bob"), "not valid yet"),
            (pki.unknown_ca_user("mallory"), "trusted CA"),
        ] {
            let err = a.verify(&chain(&ck), SystemTime::now()).result.unwrap_err();
            assert!(
                err.to_string().contains(want),
                "{err} should mention {want}"
            );
        }
    }

    #[test]
    fn names_with_formatting_characters_are_refused_and_other_scripts_kept() {
        let pki = TestPki::new();
        let a = authn(&pki);
        for (ck, want) in [
            (
                pki.user("\u{202E}nimda", &["team-a"]),
                "user name (certificate CN) contains an invisible or bidirectional formatting character (U+202E)",
            ),
            (
                pki.user("alice", &["team-a\u{200B}"]),
                "group (certificate O) contains an invisible or bidirectional formatting character (U+200B)",
            ),
        ] {
            let err = a.verify(&chain(&ck), SystemTime::now()).result.unwrap_err();
            assert_eq!(err, AuthnError::InvalidIdentity(want.into()));
        }
        let id = a
            .verify(&chain(&pki.user("李", &["José"])), SystemTime::now())
            .result
            .unwrap();
        assert_eq!((id.user(), id.groups()), ("李", &["José".to_string()][..]));
    }

    #[test]
    fn refuses_certificates_without_client_auth_usage() {
        let pki = TestPki::new();
        let server_only = pki.users_ca.issue_localhost_server("alice");
        assert!(authn(&pki)
            .verify(&chain(&server_only), SystemTime::now())
            .result
            .is_err());
    }
}
