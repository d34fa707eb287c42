//! TLS client to kube-apiserver: verifies it against the configured CA bundle and presents the
//! gateway's own client certificate. Both are swappable so rotation needs no restart; pooled
//! connections keep the material they were set up with.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::TlsError;

/// Verifies kube-apiserver's certificate against the current CA bundle.
pub struct ReloadingServerVerifier {
    current: ArcSwap<WebPkiServerVerifier>,
}

impl fmt::Debug for ReloadingServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReloadingServerVerifier")
    }
}

impl ReloadingServerVerifier {
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(ReloadingServerVerifier {
            current: ArcSwap::new(Self::build(roots)?),
        }))
    }

    fn build(roots: Vec<CertificateDer<'static>>) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
        let mut store = RootCertStore::empty();
        for r in roots {
            store.add(r)?;
        }
        WebPkiServerVerifier::builder_with_provider(Arc::new(store), crate::crypto_provider())
            .build()
            .map_err(|e| TlsError::Invalid {
                path: "upstream CA".into(),
                message: e.to_string(),
            })
    }

    pub fn replace(&self, roots: Vec<CertificateDer<'static>>) -> Result<(), TlsError> {
        self.current.store(Self::build(roots)?);
        Ok(())
    }
}

impl ServerCertVerifier for ReloadingServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.current.load().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current.load().supported_verify_schemes()
    }
}

/// Presents the gateway's current client certificate, if it has one.
#[derive(Debug, Default)]
pub struct ReloadingClientCert {
    current: ArcSwap<Option<Arc<CertifiedKey>>>,
}

impl ReloadingClientCert {
    pub fn new(ck: Option<CertifiedKey>) -> Arc<Self> {
        Arc::new(ReloadingClientCert {
            current: ArcSwap::from_pointee(ck.map(Arc::new)),
        })
    }
    pub fn store(&self, ck: CertifiedKey) {
        self.current.store(Arc::new(Some(Arc::new(ck))));
    }
}

impl ResolvesClientCert for ReloadingClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        (**self.current.load()).clone()
    }

    fn has_certs(&self) -> bool {
        self.current.load().is_some()
    }
}

/// Client configs for the pooled client (ALPN is set by hyper-rustls: h2 + http/1.1) and for
/// upgrades (http/1.1 only). The custom verifier is still full WebPKI verification; it only adds
/// hot-swapping of the CA bundle.
pub fn client_configs(
    verifier: Arc<ReloadingServerVerifier>,
    client_cert: Arc<ReloadingClientCert>,
) -> Result<(ClientConfig, ClientConfig), TlsError> {
    let build = |alpn: Vec<Vec<u8>>| -> Result<ClientConfig, TlsError> {
        let mut cfg = ClientConfig::builder_with_provider(crate::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_client_cert_resolver(client_cert.clone());
        cfg.alpn_protocols = alpn;
        Ok(cfg)
    };
    let pooled = build(Vec::new())?;
    let upgrade = build(vec![b"http/1.1".to_vec()])?;
    Ok((pooled, upgrade))
}
