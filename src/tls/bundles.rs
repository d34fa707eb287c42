//! Named client-certificate trust bundles (`listener.clientCertificateBundles`), swapped whole
//! on reload so a request sees one consistent set.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls_pki_types::{CertificateDer, TrustAnchor};

use super::{pem, TlsError};

/// One bundle's trust anchors.
#[derive(Clone, Debug)]
pub struct Bundle {
    pub name: String,
    anchors: Vec<TrustAnchor<'static>>,
}

impl Bundle {
    pub fn from_pem(name: &str, path: &Path, pem_bytes: &[u8]) -> Result<Bundle, TlsError> {
        let certs = pem::certs_from_pem(path, pem_bytes)?;
        let anchors = certs
            .iter()
            .map(|c| {
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(|e| TlsError::Invalid {
                        path: path.display().to_string(),
                        message: format!("not a usable CA certificate: {e}"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Bundle {
            name: name.to_owned(),
            anchors,
        })
    }

    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    /// A bundle from DER certificates (tests, demo).
    pub fn from_der(name: &str, certs: &[CertificateDer<'static>]) -> Result<Bundle, TlsError> {
        let anchors = certs
            .iter()
            .map(|c| {
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(|e| TlsError::Invalid {
                        path: name.to_owned(),
                        message: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Bundle {
            name: name.to_owned(),
            anchors,
        })
    }
}

/// All bundles, by name, with a generation that changes on every swap so that per-connection
/// verification results can tell they are stale.
#[derive(Debug, Default)]
pub struct BundleSet {
    pub generation: u64,
    bundles: HashMap<String, Arc<Bundle>>,
}

impl BundleSet {
    pub fn get(&self, name: &str) -> Option<&Arc<Bundle>> {
        self.bundles.get(name)
    }
}

#[derive(Debug, Default)]
pub struct TrustBundles {
    current: ArcSwap<BundleSet>,
}

impl TrustBundles {
    pub fn new(bundles: Vec<Bundle>) -> TrustBundles {
        let set = BundleSet {
            generation: 1,
            bundles: bundles
                .into_iter()
                .map(|b| (b.name.clone(), Arc::new(b)))
                .collect(),
        };
        TrustBundles {
            current: ArcSwap::from_pointee(set),
        }
    }

    pub fn load(&self) -> Arc<BundleSet> {
        self.current.load_full()
    }

    /// Replaces one bundle, keeping the others.
    pub fn replace(&self, bundle: Bundle) {
        self.current.rcu(|cur| {
            let mut bundles = cur.bundles.clone();
            bundles.insert(bundle.name.clone(), Arc::new(bundle.clone()));
            BundleSet {
                generation: cur.generation + 1,
                bundles,
            }
        });
    }
}
