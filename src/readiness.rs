//! Whether the gateway is ready to serve (`/readyz`): kube-apiserver answers its probe, every
//! OIDC issuer's keys are loaded, the state store is current, and the gateway is not draining.
//!
//! The assembly probes kube-apiserver and reports here; the request path reports a failed
//! connection at once, so `/readyz` reflects it without waiting for the next probe.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{header, HeaderValue, Response, StatusCode};

use crate::authn::oidc::OidcAuthenticator;
use crate::body::{full, Body};

/// The readiness state, shared by the probe, the request path and the listeners.
pub struct Readiness {
    oidc: Arc<OidcAuthenticator>,
    store: crate::state::SharedStore,
    upstream_ready: AtomicBool,
    upstream_status: ArcSwap<String>,
    draining: AtomicBool,
}

impl Readiness {
    /// Not ready until kube-apiserver has answered a probe.
    pub fn new(oidc: Arc<OidcAuthenticator>, store: crate::state::SharedStore) -> Readiness {
        Readiness {
            oidc,
            store,
            upstream_ready: AtomicBool::new(false),
            upstream_status: ArcSwap::from_pointee("not probed yet".to_string()),
            draining: AtomicBool::new(false),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// From now on the gateway refuses new requests and `/readyz` says it is draining.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Called when a request could not connect upstream, so `/readyz` reflects it at once
    /// rather than at the next probe.
    pub fn upstream_unreachable(&self, why: &str) {
        if self.upstream_ready.swap(false, Ordering::Relaxed) {
            tracing::warn!(error = why, "upstream unreachable; not ready");
        }
        self.upstream_status.store(Arc::new(why.to_owned()));
    }

    /// The readiness probe got an answer (any HTTP status) from kube-apiserver.
    pub fn upstream_answered(&self, code: StatusCode) {
        if !self.upstream_ready.swap(true, Ordering::Relaxed) {
            tracing::info!(%code, "upstream answers; ready");
        }
        self.upstream_status
            .store(Arc::new(format!("answered {code}")));
    }

    /// The readiness probe got no answer from kube-apiserver.
    pub fn upstream_failed(&self, why: &dyn std::fmt::Display) {
        if self.upstream_ready.swap(false, Ordering::Relaxed) {
            tracing::warn!(error = %why, "upstream stopped answering; not ready");
        }
        self.upstream_status.store(Arc::new(why.to_string()));
    }

    fn issuers_not_loaded(&self) -> Vec<String> {
        self.oidc.not_loaded()
    }

    pub fn is_ready(&self) -> bool {
        !self.is_draining()
            && self.upstream_ready.load(Ordering::Relaxed)
            && self.issuers_not_loaded().is_empty()
            && self.store.health().is_current()
    }

    /// `/readyz`, in kube-apiserver's verbose style.
    pub fn readyz(&self) -> Response<Body> {
        if self.is_ready() {
            return plain(StatusCode::OK, "ok");
        }
        let mut text = String::from("[+]config ok\n");
        if self.is_draining() {
            text.push_str("[-]shutdown: draining\n");
        }
        if !self.upstream_ready.load(Ordering::Relaxed) {
            text.push_str(&format!("[-]upstream: {}\n", self.upstream_status.load()));
        }
        // Without the reason (it names etcd members); the log has it.
        match self.store.health() {
            crate::state::StoreHealth::Current => {}
            crate::state::StoreHealth::Lagging {
                unconfirmed_for, ..
            } => text.push_str(&format!(
                "[-]state store: not confirmed current for {}s\n",
                unconfirmed_for.as_secs()
            )),
            crate::state::StoreHealth::Stale {
                unconfirmed_for, ..
            } => text.push_str(&format!(
                "[-]state store: stale for {}s, failing closed\n",
                unconfirmed_for.as_secs()
            )),
        }
        for issuer in self.issuers_not_loaded() {
            text.push_str(&format!("[-]oidc issuer {issuer}: keys not loaded yet\n"));
        }
        text.push_str("readyz check failed\n");
        let mut resp = Response::new(full(text));
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        resp
    }
}

/// A short plain-text answer (health endpoints, the ops listener's 404).
pub fn plain(code: StatusCode, text: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(text));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
