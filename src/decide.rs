//! The one decider: every entry point that decides whether someone may do something asks here.
//!
//! The request path, the re-verifier of live streams, kube-apiserver's TokenReview and
//! SubjectAccessReview webhooks, and the self-reviews (`kubectl auth can-i`, `--list`) all call
//! [`Decider`], so a rule cannot hold on one path and drift on another. The steps, in order:
//!
//! 1. the credential is still valid (its expiry plus the issuer's clock leeway, as the
//!    authenticator reads it);
//! 2. the state store can vouch for its locks, and no lock matches the caller, its groups,
//!    device, token or session, nor the identity the request acts as;
//! 3. the device's posture is fresh when it is required (API discovery excepted: kubectl does not
//!    show why its discovery requests fail, so the request that matters gets the reason);
//! 4. every impersonation target is allowed by policy (`impersonate`);
//! 5. policy allows the request for the identity it acts as (self-reviews excepted: every
//!    authenticated caller may ask about itself).
//!
//! What is decided is data: [`Facts`] in, [`Decided`] out. Nothing here reads a request, a
//! header or a connection.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use http::Method;

use crate::authn::Identity;
use crate::authz::cedar::{DeviceFacts, ImpersonationTarget};
use crate::authz::requestinfo::RequestInfo;
use crate::authz::{Authorized, Authorizer, AuthzError, ImpersonationRequest, RequestContext};
use crate::refusal::PipelineError;
use crate::state::{LockSubject, SharedStore};

/// The device a request comes from, as read from its certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSeen {
    pub id: String,
    /// The token is bound to this device's certificate (RFC 8705).
    pub bound: bool,
}

/// Everything one decision looks at.
#[derive(Clone, Copy)]
pub struct Facts<'a> {
    /// The authenticated caller.
    pub caller: &'a Arc<Identity>,
    /// What the caller asks to act as (`kubectl --as`).
    pub impersonation: Option<&'a ImpersonationRequest>,
    pub device: Option<&'a DeviceSeen>,
    /// What the request asks kube-apiserver to do.
    pub info: &'a RequestInfo,
    /// The HTTP method, when there is a request (a review's attributes have none).
    pub method: Option<&'a Method>,
    pub websocket: bool,
    pub source_ip: IpAddr,
    pub now: SystemTime,
}

/// The outcome of one decision, with what was learnt on the way (for audit and re-checks).
#[derive(Debug)]
pub struct Decided {
    pub outcome: Result<Authorized, PipelineError>,
    /// The identity the request acts as, when it impersonates and that was allowed.
    pub impersonated: Option<Arc<Identity>>,
    /// The device as policy saw it (with its posture), for a self-review decided next.
    pub device: Option<DeviceFacts>,
    /// The posture the decision was made with (`ztgate.dev/posture`).
    pub posture: Option<String>,
    /// When this decision must be made again: the credential's or the posture's end.
    pub until: Option<SystemTime>,
}

impl Decided {
    fn refused(e: impl Into<PipelineError>) -> Decided {
        Decided {
            outcome: Err(e.into()),
            impersonated: None,
            device: None,
            posture: None,
            until: None,
        }
    }
}

/// What the decider needs: the state store (locks, posture records), the posture service (its
/// requirements and pull provider) and the authorizer (policy).
pub struct Decider {
    store: SharedStore,
    posture: Option<Arc<crate::posture::PostureService>>,
    authorizer: Authorizer,
}

impl Decider {
    pub fn new(
        store: SharedStore,
        posture: Option<Arc<crate::posture::PostureService>>,
        authorizer: Authorizer,
    ) -> Decider {
        Decider {
            store,
            posture,
            authorizer,
        }
    }

    pub fn authorizer(&self) -> &Authorizer {
        &self.authorizer
    }

    /// Step 2 alone: why `subject` may not proceed, if it may not — the state store cannot
    /// vouch that its locks are current (a shared store past `state.etcd.maxStaleness`: fail
    /// closed), or a lock matches. TokenReview asks only this.
    pub fn admit(&self, subject: &LockSubject<'_>) -> Result<(), PipelineError> {
        let health = self.store.health();
        if health.is_stale() {
            return Err(PipelineError::StateStale(health.to_string()));
        }
        match self.store.matches(subject) {
            Some(lock) => Err(PipelineError::Locked(lock.message)),
            None => Ok(()),
        }
    }

    /// Decides a request (or a live stream again, or a review's attributes).
    pub async fn decide(&self, f: &Facts<'_>) -> Decided {
        // 1. The credential.
        let mut until = f.caller.valid_until();
        if until.is_some_and(|t| f.now >= t) {
            return Decided::refused(PipelineError::CredentialExpired);
        }

        // 2. Locks, on everyone the request acts as.
        let acting_groups: Vec<String>;
        let mut subject = LockSubject::of(f.caller, None, f.device.map(|d| d.id.as_str()));
        if let Some(imp) = f.impersonation {
            acting_groups = imp.groups.clone();
            subject.acting_user = imp.user.as_deref();
            subject.acting_groups = &acting_groups;
        }
        if let Err(e) = self.admit(&subject) {
            return Decided::refused(e);
        }

        // 3. The device's posture.
        let mut posture = None;
        let device = match f.device {
            Some(d) => {
                let (facts, age, seen) =
                    match self.posture_of(&d.id, f.now, !is_discovery(f.info)).await {
                        Ok(p) => p,
                        Err(e) => {
                            let mut out = Decided::refused(e);
                            out.posture = Some("missing".into());
                            return out;
                        }
                    };
                if let Some((summary, fresh_until)) = seen {
                    posture = Some(summary);
                    if let Some(t) = fresh_until {
                        until = Some(until.map_or(t, |u| u.min(t)));
                    }
                }
                Some(DeviceFacts {
                    id: d.id.clone(),
                    bound: d.bound,
                    posture: facts,
                    posture_age: age,
                })
            }
            None => None,
        };
        let ctx = RequestContext {
            info: f.info,
            device: device.as_ref(),
            method: f.method,
            websocket: f.websocket,
            source_ip: f.source_ip,
            now: f.now,
        };

        // 4. Impersonation.
        let (identity, impersonated) = match f.impersonation {
            Some(imp) => match self.authorizer.impersonate(f.caller.clone(), imp, &ctx) {
                Ok(i) => (i.clone(), Some(i)),
                Err(e) => {
                    return Decided {
                        outcome: Err(e.into()),
                        impersonated: None,
                        device,
                        posture,
                        until,
                    }
                }
            },
            None => (f.caller.clone(), None),
        };

        // 5. Policy.
        let outcome = match self.authorizer.self_review(&identity, f.info) {
            Some(a) => Ok(a),
            None => self
                .authorizer
                .authorize(identity, &ctx)
                .map_err(PipelineError::from),
        };
        Decided {
            outcome,
            impersonated,
            device,
            posture,
            until,
        }
    }

    /// Step 5 alone, for attributes a self-review asks about (`kubectl auth can-i --list`),
    /// with the device and posture already decided for the asker's own request: the same
    /// authorization `decide` ends with.
    pub fn policy_decision(
        &self,
        identity: &Arc<Identity>,
        info: &RequestInfo,
        device: Option<&DeviceFacts>,
        source_ip: IpAddr,
        now: SystemTime,
    ) -> crate::authz::cedar::Decision {
        let ctx = RequestContext {
            info,
            device,
            method: None,
            websocket: false,
            source_ip,
            now,
        };
        if self.authorizer.self_review(identity, info).is_some() {
            return crate::authz::cedar::Decision {
                allowed: true,
                ..Default::default()
            };
        }
        match self.authorizer.authorize(identity.clone(), &ctx) {
            Ok(a) => a.decision().cloned().unwrap_or_default(),
            Err(AuthzError::Denied(d)) => d.decision,
            Err(_) => Default::default(),
        }
    }

    /// One `impersonate` check, as kube-apiserver asks it in a SubjectAccessReview: the caller
    /// and the target (when it names a user) are admitted, then policy decides.
    pub fn decide_impersonation(
        &self,
        caller: &Identity,
        target: &ImpersonationTarget,
        now: SystemTime,
    ) -> Result<crate::authz::cedar::Decision, PipelineError> {
        let mut subject = LockSubject::of(caller, None, None);
        let target_groups;
        match &target.kind {
            crate::authz::cedar::ImpersonationKind::User => {
                subject.acting_user = Some(&target.value)
            }
            crate::authz::cedar::ImpersonationKind::Group => {
                target_groups = [target.value.clone()];
                subject.acting_groups = &target_groups;
            }
            _ => {}
        }
        self.admit(&subject)?;
        let info = RequestInfo::default();
        let ctx = RequestContext {
            info: &info,
            device: None,
            method: None,
            websocket: false,
            source_ip: IpAddr::from([0, 0, 0, 0]),
            now,
        };
        Ok(self.authorizer.decide_impersonation(caller, target, &ctx))
    }

    /// The posture policy sees for a device: `(posture, age, (summary, fresh until))`; `Err`
    /// when posture is required and there is no fresh record.
    #[allow(clippy::type_complexity)]
    async fn posture_of(
        &self,
        device_id: &str,
        now: SystemTime,
        required: bool,
    ) -> Result<
        (
            Option<crate::authz::cedar::PostureFacts>,
            Option<std::time::Duration>,
            Option<(String, Option<SystemTime>)>,
        ),
        PipelineError,
    > {
        let Some(svc) = &self.posture else {
            return Ok((None, None, None));
        };
        match svc.lookup(&self.store, device_id, now).await {
            crate::posture::Lookup::Fresh(rec) => {
                let summary = crate::posture::summary(&rec, now);
                let until = svc.fresh_until(&rec);
                let (facts, age) = crate::posture::facts(&rec, now);
                Ok((Some(facts), Some(age), Some((summary, Some(until)))))
            }
            crate::posture::Lookup::Missing if required && svc.required() => {
                Err(PipelineError::PostureRequired(device_id.to_owned()))
            }
            crate::posture::Lookup::Missing => Ok((None, None, Some(("missing".into(), None)))),
            crate::posture::Lookup::Unavailable => {
                Ok((None, None, Some(("unavailable".into(), None))))
            }
        }
    }
}

/// API discovery, version and OpenAPI documents: reads that describe the API, not its data.
pub fn is_discovery(info: &RequestInfo) -> bool {
    if info.is_resource_request || info.verb != "get" {
        return false;
    }
    let p = info.path.as_str();
    p == "/version"
        || ["/api", "/apis", "/openapi"]
            .iter()
            .any(|root| p == *root || p.strip_prefix(root).is_some_and(|r| r.starts_with('/')))
}

/// A RequestInfo from a review's `resourceAttributes` or `nonResourceAttributes`.
pub fn info_from_attributes(spec: &serde_json::Value) -> Option<RequestInfo> {
    let s = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or_default().to_string();
    if let Some(ra) = spec.get("resourceAttributes").filter(|v| v.is_object()) {
        return Some(RequestInfo {
            is_resource_request: true,
            verb: s(ra, "verb"),
            api_prefix: if s(ra, "group").is_empty() {
                "api".into()
            } else {
                "apis".into()
            },
            api_group: s(ra, "group"),
            api_version: s(ra, "version"),
            namespace: s(ra, "namespace"),
            resource: s(ra, "resource"),
            subresource: s(ra, "subresource"),
            name: s(ra, "name"),
            ..Default::default()
        });
    }
    if let Some(nra) = spec.get("nonResourceAttributes").filter(|v| v.is_object()) {
        return Some(RequestInfo {
            is_resource_request: false,
            verb: s(nra, "verb"),
            path: s(nra, "path"),
            ..Default::default()
        });
    }
    None
}

/// What a review (SubjectAccessReview, SelfSubjectAccessReview, a rules review) asks about.
#[derive(Clone, Copy)]
pub struct ReviewFacts<'a> {
    /// The user asked about: for a self-review, the identity its own request acts as (the
    /// caller, or whom `kubectl --as` names), already decided for that request.
    pub caller: &'a Arc<Identity>,
    pub device: Option<&'a DeviceSeen>,
    /// The review's attributes.
    pub info: &'a RequestInfo,
    pub source_ip: IpAddr,
    pub now: SystemTime,
}

/// A review's answer, in the three words of kube-apiserver's authorizers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Review {
    Allowed {
        reason: String,
    },
    /// `explicit`: a `forbid`, a lock, a policy error or a refusal that must stop the
    /// authorizer chain (a webhook's "denied"), rather than no permit.
    Denied {
        reason: String,
        explicit: bool,
    },
    /// The gateway has nothing to say: the next authorizer decides.
    NoOpinion {
        reason: String,
    },
}

impl Review {
    pub fn allowed(&self) -> bool {
        matches!(self, Review::Allowed { .. })
    }

    pub fn reason(&self) -> &str {
        match self {
            Review::Allowed { reason }
            | Review::Denied { reason, .. }
            | Review::NoOpinion { reason } => reason,
        }
    }

    fn of(outcome: Result<crate::authz::cedar::Decision, PipelineError>) -> Review {
        use crate::authz::cedar::decision_reason;
        match outcome {
            Ok(d) if d.allowed => Review::Allowed {
                reason: decision_reason(&d),
            },
            Ok(d) => Review::Denied {
                reason: decision_reason(&d),
                explicit: d.explicit_deny || !d.errors.is_empty(),
            },
            Err(PipelineError::Authz(AuthzError::Denied(denial))) => Review::Denied {
                reason: decision_reason(&denial.decision),
                explicit: denial.decision.explicit_deny || !denial.decision.errors.is_empty(),
            },
            Err(e) => Review::Denied {
                reason: crate::errors::ToStatus::to_status(&e).message,
                explicit: true,
            },
        }
    }
}

impl Decider {
    /// Answers a review's attributes the way a request with them would be decided: an
    /// impersonation check (`impersonate`, `impersonate:<mode>` on users, groups, uids,
    /// userextras, serviceaccounts, nodes) as the `impersonate` decision `kubectl --as` gets,
    /// anything else through [`Decider::decide`]. What the policy schema cannot express is
    /// [`Review::NoOpinion`], never a denial.
    pub async fn review(&self, r: &ReviewFacts<'_>) -> Review {
        use crate::authz::ReviewTarget;
        match crate::authz::review_target(r.info) {
            ReviewTarget::Impersonation(target) => {
                if self.authorizer.engine().is_none() {
                    return Review::NoOpinion {
                        reason: "no ztgate policy is loaded".into(),
                    };
                }
                Review::of(self.decide_impersonation(r.caller, &target, r.now))
            }
            ReviewTarget::Inexpressible(why) => Review::NoOpinion { reason: why.into() },
            ReviewTarget::Request => {
                let expressible = self
                    .authorizer
                    .engine()
                    .is_some_and(|e| e.expresses(&r.info.verb, r.info.is_resource_request));
                if !expressible {
                    return Review::NoOpinion {
                        reason: format!(
                            "the verb {:?} is not one ztgate's policy decides",
                            r.info.verb
                        ),
                    };
                }
                let facts = Facts {
                    caller: r.caller,
                    impersonation: None,
                    device: r.device,
                    info: r.info,
                    method: None,
                    websocket: false,
                    source_ip: r.source_ip,
                    now: r.now,
                };
                match self.decide(&facts).await.outcome {
                    // A self-review: every authenticated caller may make one.
                    Ok(a) if a.decision().is_none() => Review::Allowed {
                        reason: "every authenticated user may review itself".into(),
                    },
                    outcome => {
                        Review::of(outcome.map(|a| a.decision().cloned().unwrap_or_default()))
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The order of the security steps, without a network: a store in memory, a policy from
    //! text, identities as the authenticators make them.
    use super::*;
    use crate::authn::CredentialFacts;
    use crate::authz::cedar::PolicyEngine;
    use crate::authz::requestinfo::request_info;
    use crate::state::{Lock, LockTarget, MemoryStore, Posture, PostureRecord, Store};
    use std::time::Duration;

    const POLICY: &str = r#"
        permit (principal in k8s::Group::"team-a", action, resource in k8s::Namespace::"team-a");
        permit (principal == k8s::User::"carol", action in k8s::Action::"read", resource);
        permit (principal == k8s::User::"alice", action == k8s::Action::"impersonate",
                resource == k8s::ImpersonatedUser::"carol");
        permit (principal, action == k8s::Action::"get", resource is k8s::NonResourceURL);
        forbid (principal, action, resource in k8s::Namespace::"prod")
            unless { context has device && context.device has posture };
    "#;

    fn engine() -> Arc<PolicyEngine> {
        Arc::new(PolicyEngine::from_sources(&[("test.cedar".into(), POLICY.into())]).unwrap())
    }

    async fn decider(store: Arc<MemoryStore>, posture_required: bool) -> Decider {
        let cfg =
            serde_json::from_value(serde_json::json!({"required": posture_required})).unwrap();
        let posture = crate::posture::PostureService::new(
            cfg,
            tokio_util::sync::CancellationToken::new(),
            Default::default(),
        )
        .await
        .unwrap();
        Decider::new(
            store,
            Some(Arc::new(posture)),
            Authorizer::with_policy(engine()),
        )
    }

    fn alice(facts: CredentialFacts, expires_at: Option<SystemTime>) -> Arc<Identity> {
        Arc::new(Identity::for_tests("alice", &["team-a"], expires_at, facts))
    }

    fn info(path: &str) -> RequestInfo {
        request_info(&Method::GET, path, None).unwrap()
    }

    fn facts<'a>(
        caller: &'a Arc<Identity>,
        info: &'a RequestInfo,
        imp: Option<&'a ImpersonationRequest>,
        device: Option<&'a DeviceSeen>,
        now: SystemTime,
    ) -> Facts<'a> {
        Facts {
            caller,
            impersonation: imp,
            device,
            info,
            method: Some(&Method::GET),
            websocket: false,
            source_ip: IpAddr::from([127, 0, 0, 1]),
            now,
        }
    }

    fn as_user(user: &str, groups: &[&str]) -> ImpersonationRequest {
        ImpersonationRequest {
            user: Some(user.into()),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            ..Default::default()
        }
    }

    async fn lock(store: &MemoryStore, target: LockTarget) {
        store
            .put_lock(Lock::new(target, "stop", None, "security").unwrap())
            .await
            .unwrap();
    }

    fn refusal(d: &Decided) -> String {
        match &d.outcome {
            Ok(_) => "allowed".into(),
            Err(e) => e.outcome().to_owned(),
        }
    }

    #[tokio::test]
    async fn a_lock_refuses_before_policy_is_asked() {
        let store = Arc::new(MemoryStore::new());
        let d = decider(store.clone(), false).await;
        let caller = alice(Default::default(), None);
        let pods = info("/api/v1/namespaces/team-a/pods");
        let now = SystemTime::now();
        assert_eq!(
            refusal(&d.decide(&facts(&caller, &pods, None, None, now)).await),
            "allowed"
        );
        lock(&store, LockTarget::Group("team-a".into())).await;
        assert_eq!(
            refusal(&d.decide(&facts(&caller, &pods, None, None, now)).await),
            "locked"
        );
    }

    #[tokio::test]
    async fn a_lock_on_the_identity_a_request_acts_as_refuses_it() {
        let store = Arc::new(MemoryStore::new());
        let d = decider(store.clone(), false).await;
        let caller = alice(Default::default(), None);
        let pods = info("/api/v1/namespaces/x/pods");
        let carol = as_user("carol", &[]);
        let now = SystemTime::now();
        let decided = d
            .decide(&facts(&caller, &pods, Some(&carol), None, now))
            .await;
        assert_eq!(refusal(&decided), "allowed");
        assert_eq!(decided.impersonated.unwrap().user(), "carol");
        lock(&store, LockTarget::User("carol".into())).await;
        let decided = d
            .decide(&facts(&caller, &pods, Some(&carol), None, now))
            .await;
        assert_eq!(
            refusal(&decided),
            "locked",
            "a lock on carol covers alice --as carol"
        );
        // A lock on a group the request acts as, too.
        let store = Arc::new(MemoryStore::new());
        let d = decider(store.clone(), false).await;
        lock(&store, LockTarget::Group("auditors".into())).await;
        let carol_auditor = as_user("carol", &["auditors"]);
        let decided = d
            .decide(&facts(&caller, &pods, Some(&carol_auditor), None, now))
            .await;
        assert_eq!(refusal(&decided), "locked");
    }

    #[tokio::test]
    async fn session_and_token_locks_match_the_credential() {
        let store = Arc::new(MemoryStore::new());
        let d = decider(store.clone(), false).await;
        let caller = alice(
            CredentialFacts {
                token_id: Some("jti-1".into()),
                session_id: Some("sid-7".into()),
                ..Default::default()
            },
            None,
        );
        let other = alice(
            CredentialFacts {
                session_id: Some("sid-8".into()),
                ..Default::default()
            },
            None,
        );
        let pods = info("/api/v1/namespaces/team-a/pods");
        let now = SystemTime::now();
        lock(&store, LockTarget::Session("sid-7".into())).await;
        assert_eq!(
            refusal(&d.decide(&facts(&caller, &pods, None, None, now)).await),
            "locked"
        );
        assert_eq!(
            refusal(&d.decide(&facts(&other, &pods, None, None, now)).await),
            "allowed",
            "another session of the same user goes on"
        );
    }

    #[tokio::test]
    async fn a_credential_counts_until_its_expiry_plus_the_clock_leeway() {
        let store = Arc::new(MemoryStore::new());
        let d = decider(store, false).await;
        let exp = SystemTime::now();
        let caller = alice(
            CredentialFacts {
                clock_leeway: Duration::from_secs(30),
                ..Default::default()
            },
            Some(exp),
        );
        let pods = info("/api/v1/namespaces/team-a/pods");
        let within = d
            .decide(&facts(
                &caller,
                &pods,
                None,
                None,
                exp + Duration::from_secs(29),
            ))
            .await;
        assert_eq!(refusal(&within), "allowed");
        assert_eq!(within.until, Some(exp + Duration::from_secs(30)));
        let past = d
            .decide(&facts(
                &caller,
                &pods,
                None,
                None,
                exp + Duration::from_secs(30),
            ))
            .await;
        assert!(matches!(
            past.outcome,
            Err(PipelineError::CredentialExpired)
        ));
    }

    #[tokio::test]
    async fn posture_is_required_except_for_api_discovery() {
        let store = Arc::new(MemoryStore::new());
        let d = decider(store.clone(), true).await;
        let caller = alice(Default::default(), None);
        let laptop = DeviceSeen {
            id: "laptop-1".into(),
            bound: false,
        };
        let now = SystemTime::now();
        let pods = info("/api/v1/namespaces/team-a/pods");
        let discovery = info("/apis");
        let missing = d
            .decide(&facts(&caller, &pods, None, Some(&laptop), now))
            .await;
        assert_eq!(refusal(&missing), "posture_required");
        let disc = d
            .decide(&facts(&caller, &discovery, None, Some(&laptop), now))
            .await;
        assert_eq!(
            refusal(&disc),
            "allowed",
            "discovery goes on without posture"
        );
        store
            .put_posture(PostureRecord {
                device_id: "laptop-1".into(),
                attributes: Posture {
                    managed: Some(true),
                    ..Default::default()
                },
                source: "mdm".into(),
                collected_at: now,
                expires_at: now + Duration::from_secs(600),
            })
            .await
            .unwrap();
        let fresh = d
            .decide(&facts(&caller, &pods, None, Some(&laptop), now))
            .await;
        assert_eq!(refusal(&fresh), "allowed");
        assert_eq!(fresh.until, Some(now + Duration::from_secs(600)));
    }

    #[tokio::test]
    async fn impersonation_is_decided_before_the_request() {
        let store = Arc::new(MemoryStore::new());
        let d = decider(store, false).await;
        let caller = alice(Default::default(), None);
        let pods = info("/api/v1/namespaces/x/pods");
        let bob = as_user("bob", &[]);
        let decided = d
            .decide(&facts(&caller, &pods, Some(&bob), None, SystemTime::now()))
            .await;
        let Err(PipelineError::Authz(AuthzError::Denied(denial))) = decided.outcome else {
            panic!("alice may not act as bob: {:?}", decided.outcome);
        };
        assert_eq!(denial.resource, "users");
        assert!(decided.impersonated.is_none());
    }

    #[tokio::test]
    async fn reviews_answer_kube_apiserver_impersonation_checks_as_kubectl_as_is_decided() {
        let store = Arc::new(MemoryStore::new());
        let d = decider(store.clone(), false).await;
        let alice = Arc::new(Identity::from_review(
            "alice".into(),
            None,
            vec!["team-a".into()],
            Default::default(),
        ));
        let review = |ra: serde_json::Value| {
            info_from_attributes(&serde_json::json!({"resourceAttributes": ra})).unwrap()
        };
        let now = SystemTime::now();
        let ask = |info: RequestInfo| {
            let alice = alice.clone();
            let d = &d;
            async move {
                d.review(&ReviewFacts {
                    caller: &alice,
                    device: None,
                    info: &info,
                    source_ip: IpAddr::from([0, 0, 0, 0]),
                    now,
                })
                .await
            }
        };
        // Both forms kube-apiserver 1.36 sends for `--as carol`, and one for a target policy
        // does not allow.
        for (ra, allowed) in [
            (
                serde_json::json!({"verb": "impersonate", "resource": "users", "name": "carol"}),
                true,
            ),
            (
                serde_json::json!({"verb": "impersonate:user-info", "group": "authentication.k8s.io", "resource": "users", "name": "carol"}),
                true,
            ),
            (
                serde_json::json!({"verb": "impersonate", "resource": "users", "name": "bob"}),
                false,
            ),
            (
                serde_json::json!({"verb": "impersonate:user-info", "group": "authentication.k8s.io", "resource": "users", "name": "bob"}),
                false,
            ),
            (
                serde_json::json!({"verb": "impersonate", "resource": "serviceaccounts", "namespace": "ci", "name": "deployer"}),
                false,
            ),
        ] {
            let answer = ask(review(ra.clone())).await;
            assert_eq!(answer.allowed(), allowed, "{ra}: {answer:?}");
            if !allowed {
                assert!(matches!(answer, Review::Denied { .. }), "{ra}: {answer:?}");
            }
        }
        // What policy cannot say is no opinion, never a denial.
        for ra in [
            serde_json::json!({"verb": "impersonate-on:user-info:list", "resource": "pods", "namespace": "x"}),
            serde_json::json!({"verb": "impersonate:user-info", "group": "authentication.k8s.io", "resource": "groups", "name": "*"}),
            serde_json::json!({"verb": "frobnicate", "resource": "pods", "namespace": "x"}),
        ] {
            let answer = ask(review(ra.clone())).await;
            assert!(
                matches!(answer, Review::NoOpinion { .. }),
                "{ra}: {answer:?}"
            );
        }
        // A lock on the target refuses the impersonation check as it refuses `--as`.
        lock(&store, LockTarget::User("carol".into())).await;
        let answer = ask(review(
            serde_json::json!({"verb": "impersonate", "resource": "users", "name": "carol"}),
        ))
        .await;
        assert!(
            matches!(answer, Review::Denied { explicit: true, .. }),
            "{answer:?}"
        );
    }
}
