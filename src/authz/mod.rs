//! Authorization: decides whether an authenticated identity may make this request.
//!
//! Today the decision is "authenticated identities are forwarded and kube-apiserver's own RBAC
//! decides"; the Cedar engine (default deny, `forbid` wins, evaluation errors deny) plugs in here.
//! An [`Authorized`] value can only be made by this module, and the proxy only forwards requests
//! that carry one.

use std::sync::Arc;

pub mod cedar;
pub mod requestinfo;

use crate::authn::Identity;

/// Proof that a request was authorized, carrying the identity to forward.
#[derive(Debug)]
pub struct Authorized {
    identity: Arc<Identity>,
}

impl Authorized {
    pub fn identity(&self) -> &Identity {
        &self.identity
    }
}

/// Why a request was denied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthzError {}

#[derive(Debug, Default)]
pub struct Authorizer;

impl Authorizer {
    pub fn authorize(&self, identity: Arc<Identity>) -> Result<Authorized, AuthzError> {
        Ok(Authorized { identity })
    }
}
