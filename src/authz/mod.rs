//! Authorization: decides whether an authenticated identity may make this request.
//!
//! With `authorization.policies` configured, every request is decided by the Cedar engine
//! ([`cedar`]): default deny, `forbid` wins, evaluation errors deny. Without it the gateway
//! authorizes nothing itself and kube-apiserver's RBAC is the only authorization ("delegated").
//! A client's own impersonation (`kubectl --as`) is an `impersonate` action that policy must
//! allow in either mode; in delegated mode it is always refused.
//!
//! An [`Authorized`] value can only be made by this module, and the proxy only forwards requests
//! that carry one.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

pub mod abac;
pub mod cedar;
pub mod kubeproto;
pub mod requestinfo;
pub mod rules;

use http::HeaderMap;

use crate::authn::Identity;
use cedar::{AuthzInput, Decision, ImpersonationKind, ImpersonationTarget, PolicyEngine};
use requestinfo::RequestInfo;

/// Proof that a request was authorized, carrying the identity to forward.
#[derive(Debug)]
pub struct Authorized {
    identity: Arc<Identity>,
    decision: Option<Decision>,
}

impl Authorized {
    pub fn identity(&self) -> &Identity {
        &self.identity
    }
    /// The policy decision, when policy decided (None in delegated mode).
    pub fn decision(&self) -> Option<&Decision> {
        self.decision.as_ref()
    }
}

/// Why a request was refused by the gateway's authorization.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthzError {
    /// Policy denied the request.
    #[error("{}", .0.message)]
    Denied(Box<Denial>),
    /// The client's impersonation headers are malformed (e.g. groups without a user).
    #[error("bad impersonation request: {0}")]
    BadImpersonation(String),
}

impl crate::errors::ToStatus for AuthzError {
    fn to_status(&self) -> crate::errors::Status {
        use crate::errors::Status;
        match self {
            AuthzError::Denied(d) => {
                Status::forbidden(d.message.clone()).about(&d.name, &d.group, &d.resource)
            }
            e => Status::bad_request(e.to_string()),
        }
    }
}

/// A policy denial: `message` is kube-apiserver's wording plus the reason.
#[derive(Debug)]
pub struct Denial {
    pub message: String,
    pub resource: String,
    pub name: String,
    pub group: String,
    pub decision: Decision,
}

/// Percent-encodes an extra key the way client-go does (`headerKeyEscape`): every byte that is
/// not an RFC 7230 token character, and `%` itself, becomes `%XX`. kube-apiserver reverses it
/// with a path-unescape.
pub fn encode_extra_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        let tchar = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'!' | b'#'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        if tchar {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes a key written by [`encode_extra_key`] (kube-apiserver's side: how the gateway reads a
/// client's `Impersonate-Extra-*` headers).
pub fn decode_extra_key(encoded: &str) -> Option<String> {
    percent_encoding::percent_decode_str(encoded)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// What the client asked to impersonate.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImpersonationRequest {
    pub user: Option<String>,
    pub groups: Vec<String>,
    pub uid: Option<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl ImpersonationRequest {
    /// Reads `Impersonate-User`, `-Group`, `-Uid` and `-Extra-<key>` (keys percent-decoded and
    /// lower-cased as kube-apiserver does). Returns None when the client asked for nothing.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<ImpersonationRequest>, AuthzError> {
        let mut r = ImpersonationRequest::default();
        let mut any = false;
        for (name, value) in headers {
            let n = name.as_str();
            if !n.starts_with("impersonate-") {
                continue;
            }
            any = true;
            let v = value
                .to_str()
                .map_err(|_| AuthzError::BadImpersonation(format!("{n} is not visible ASCII")))?
                .to_owned();
            match n {
                "impersonate-user" => {
                    if r.user.replace(v).is_some() {
                        return Err(AuthzError::BadImpersonation(
                            "more than one Impersonate-User".into(),
                        ));
                    }
                }
                "impersonate-group" => r.groups.push(v),
                "impersonate-uid" => {
                    if r.uid.replace(v).is_some() {
                        return Err(AuthzError::BadImpersonation(
                            "more than one Impersonate-Uid".into(),
                        ));
                    }
                }
                _ => match n.strip_prefix("impersonate-extra-") {
                    Some(k) => {
                        let key = decode_extra_key(k)
                            .ok_or_else(|| {
                                AuthzError::BadImpersonation(format!("bad extra key {k:?}"))
                            })?
                            .to_lowercase();
                        r.extra.entry(key).or_default().push(v);
                    }
                    None => {
                        return Err(AuthzError::BadImpersonation(format!(
                            "unknown impersonation header {n}"
                        )))
                    }
                },
            }
        }
        if !any {
            return Ok(None);
        }
        if r.user.is_none() {
            // kube-apiserver: groups, uid or extra without a user is an error.
            return Err(AuthzError::BadImpersonation(
                "Impersonate-Group, -Uid or -Extra without Impersonate-User".into(),
            ));
        }
        Ok(Some(r))
    }

    pub fn targets(&self) -> Vec<ImpersonationTarget> {
        let mut t = Vec::new();
        if let Some(u) = &self.user {
            t.push(ImpersonationTarget {
                kind: ImpersonationKind::User,
                value: u.clone(),
            });
        }
        for g in &self.groups {
            t.push(ImpersonationTarget {
                kind: ImpersonationKind::Group,
                value: g.clone(),
            });
        }
        if let Some(uid) = &self.uid {
            t.push(ImpersonationTarget {
                kind: ImpersonationKind::Uid,
                value: uid.clone(),
            });
        }
        for (k, vs) in &self.extra {
            for v in vs {
                t.push(ImpersonationTarget {
                    kind: ImpersonationKind::Extra { key: k.clone() },
                    value: v.clone(),
                });
            }
        }
        t
    }
}

/// The facts of one request that authorization looks at.
pub struct RequestContext<'a> {
    pub info: &'a RequestInfo,
    /// The device the request came from, when a device certificate was presented.
    pub device: Option<&'a cedar::DeviceFacts>,
    /// The HTTP method, when there is a request (a review's attributes have none).
    pub method: Option<&'a http::Method>,
    pub websocket: bool,
    pub source_ip: IpAddr,
    pub now: SystemTime,
}

#[derive(Clone, Debug, Default)]
pub struct Authorizer {
    engine: Option<Arc<PolicyEngine>>,
}

impl Authorizer {
    pub fn delegated() -> Authorizer {
        Authorizer { engine: None }
    }

    pub fn with_policy(engine: Arc<PolicyEngine>) -> Authorizer {
        Authorizer {
            engine: Some(engine),
        }
    }

    pub fn engine(&self) -> Option<&Arc<PolicyEngine>> {
        self.engine.as_ref()
    }

    fn input<'a>(
        &self,
        identity: &'a Identity,
        ctx: &'a RequestContext<'a>,
        verb: &'a str,
    ) -> AuthzInput<'a> {
        AuthzInput {
            identity,
            info: ctx.info,
            verb,
            source_ip: ctx.source_ip,
            now: ctx.now,
            device: ctx.device,
            websocket: ctx.websocket,
        }
    }

    /// Applies a client's impersonation request: every target must be allowed by policy (an
    /// `impersonate` action), then the impersonated identity replaces the caller's.
    pub fn impersonate(
        &self,
        caller: Arc<Identity>,
        request: &ImpersonationRequest,
        ctx: &RequestContext<'_>,
    ) -> Result<Arc<Identity>, AuthzError> {
        for target in request.targets() {
            let decision = self.decide_impersonation(&caller, &target, ctx);
            if !decision.allowed {
                let (resource, group) = match &target.kind {
                    ImpersonationKind::User => ("users", ""),
                    ImpersonationKind::Group => ("groups", ""),
                    ImpersonationKind::Uid => ("uids", "authentication.k8s.io"),
                    ImpersonationKind::Extra { .. } => ("userextras", "authentication.k8s.io"),
                };
                let why = if self.engine.is_none() {
                    "impersonation through the gateway needs an authorization policy that allows it"
                        .to_owned()
                } else {
                    cedar::decision_reason(&decision)
                };
                return Err(AuthzError::Denied(Box::new(Denial {
                    message: format!(
                        "{resource} {:?} is forbidden: User {:?} cannot impersonate resource {resource:?} in API group {group:?} at the cluster scope: {why}",
                        target.value,
                        caller.user(),
                    ),
                    resource: resource.to_owned(),
                    name: target.value.clone(),
                    group: group.to_owned(),
                    decision,
                })));
            }
        }
        let user = request.user.clone().unwrap_or_default();
        let identity = caller
            .impersonated(
                user,
                request.groups.clone(),
                request.uid.clone(),
                request.extra.clone(),
            )
            .map_err(|e| AuthzError::BadImpersonation(e.to_string()))?;
        Ok(Arc::new(identity))
    }

    /// The `impersonate` decision on one target (no policy: never allowed).
    pub fn decide_impersonation(
        &self,
        caller: &Identity,
        target: &ImpersonationTarget,
        ctx: &RequestContext<'_>,
    ) -> Decision {
        match &self.engine {
            Some(engine) => {
                engine.decide_impersonation(&self.input(caller, ctx, "impersonate"), target)
            }
            None => Decision::default(),
        }
    }

    /// Self-reviews (`kubectl auth whoami`, `kubectl auth can-i`) only tell a caller about
    /// themselves; like kube-apiserver's `system:basic-user`, every authenticated caller may
    /// create them, whatever the policy.
    pub fn self_review(&self, identity: &Arc<Identity>, info: &RequestInfo) -> Option<Authorized> {
        let is_self_review = info.is_resource_request
            && info.verb == "create"
            && info.subresource.is_empty()
            && info.name.is_empty()
            && matches!(
                (info.api_group.as_str(), info.resource.as_str()),
                ("authentication.k8s.io", "selfsubjectreviews")
                    | ("authorization.k8s.io", "selfsubjectaccessreviews")
                    | ("authorization.k8s.io", "selfsubjectrulesreviews")
            );
        is_self_review.then(|| Authorized {
            identity: identity.clone(),
            decision: None,
        })
    }

    /// Decides the request for `identity`.
    pub fn authorize(
        &self,
        identity: Arc<Identity>,
        ctx: &RequestContext<'_>,
    ) -> Result<Authorized, AuthzError> {
        let Some(engine) = &self.engine else {
            return Ok(Authorized {
                identity,
                decision: None,
            });
        };
        // kube-apiserver 1.35+ checks `get` in its filter and `create` in the pod connect
        // handler for GET exec/attach/portforward: both must be allowed here too.
        let (first, second) = match ctx.method {
            Some(m) => requestinfo::authorizer_checks(ctx.info, m),
            None => (ctx.info.verb.as_str(), None),
        };
        let mut verb = first;
        let mut decision = engine.decide(&self.input(&identity, ctx, first));
        if let (true, Some(v)) = (decision.allowed, second) {
            verb = v;
            decision = engine.decide(&self.input(&identity, ctx, v));
        }
        if !decision.errors.is_empty() {
            tracing::warn!(user = identity.user(), errors = ?decision.errors, "policy evaluation errors; denying");
        }
        if decision.allowed {
            return Ok(Authorized {
                identity,
                decision: Some(decision),
            });
        }
        let message = cedar::reason_message(ctx.info, identity.user(), verb, &decision);
        Err(AuthzError::Denied(Box::new(Denial {
            message,
            resource: ctx.info.resource.clone(),
            name: ctx.info.name.clone(),
            group: ctx.info.api_group.clone(),
            decision,
        })))
    }
}

/// What a review's attributes ask, as the gateway decides it.
#[derive(Debug, PartialEq, Eq)]
pub enum ReviewTarget {
    /// One of kube-apiserver's impersonation checks, on one named target.
    Impersonation(ImpersonationTarget),
    /// Something the policy schema cannot say (kube's `impersonate-on:<mode>:<verb>` checks,
    /// wildcard targets, an impersonation check without a name).
    Inexpressible(&'static str),
    /// An ordinary request's attributes.
    Request,
}

/// Reads a review's attributes the way kube-apiserver's impersonation filter builds them: the
/// legacy `impersonate` verb (users and groups in the core group, uids and userextras in
/// `authentication.k8s.io`, service accounts by namespace and name) and the constrained
/// `impersonate:<mode>` verbs (users, groups, nodes and service accounts in
/// `authentication.k8s.io`); `impersonate-on:<mode>:<verb>` asks whether the requester may
/// make this request through a mode, which the gateway's `kubectl --as` does not separate from
/// the request's own authorization.
pub fn review_target(info: &RequestInfo) -> ReviewTarget {
    let verb = info.verb.as_str();
    if verb.starts_with("impersonate-on:") {
        return ReviewTarget::Inexpressible(
            "ztgate's policy decides impersonation per target (impersonate), not per mode and verb",
        );
    }
    let constrained = match verb.strip_prefix("impersonate:") {
        Some(mode) if !mode.is_empty() => true,
        Some(_) => return ReviewTarget::Inexpressible("impersonate: without a mode"),
        None if verb == "impersonate" => false,
        None => return ReviewTarget::Request,
    };
    if !info.is_resource_request {
        return ReviewTarget::Inexpressible("impersonation of a non-resource URL");
    }
    let name = info.name.as_str();
    if name.is_empty() || name == "*" || info.subresource == "*" {
        return ReviewTarget::Inexpressible(
            "ztgate's policy decides impersonation per named target, not for every name",
        );
    }
    let group = info.api_group.as_str();
    let core_or_authn = group.is_empty() || group == "authentication.k8s.io";
    let kind = match (info.resource.as_str(), core_or_authn) {
        ("users", true) => ImpersonationKind::User,
        ("groups", true) => ImpersonationKind::Group,
        ("serviceaccounts", true) if !info.namespace.is_empty() => {
            return ReviewTarget::Impersonation(ImpersonationTarget {
                kind: ImpersonationKind::User,
                value: format!("system:serviceaccount:{}:{name}", info.namespace),
            })
        }
        ("nodes", true) if constrained => {
            return ReviewTarget::Impersonation(ImpersonationTarget {
                kind: ImpersonationKind::User,
                value: format!("system:node:{name}"),
            })
        }
        ("uids", true) => ImpersonationKind::Uid,
        ("userextras", true) if !info.subresource.is_empty() => ImpersonationKind::Extra {
            key: info.subresource.clone(),
        },
        _ => {
            return ReviewTarget::Inexpressible("not an impersonation target kube-apiserver checks")
        }
    };
    ReviewTarget::Impersonation(ImpersonationTarget {
        kind,
        value: name.to_owned(),
    })
}
