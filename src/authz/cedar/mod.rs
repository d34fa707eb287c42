//! The Cedar ABAC engine: the project's schema, policy loading with strict validation, hot
//! reload, and the per-request decision.
//!
//! Semantics: default deny; a satisfied `forbid` wins over any `permit`; any evaluation error
//! (in any policy, or while building the request) denies, and the errors are returned so the
//! caller can log them. Policies are validated in strict mode against
//! `config/ztgate.cedarschema` (embedded in the binary) before they are used; a reload is
//! all-or-nothing, and a rejected reload leaves the last good set in force.
//!
//! How requests map to principal / action / resource / context is described in
//! `docs/policy.md` and in the schema file itself.

mod cache;
mod entities;
mod index;
mod load;
mod message;
mod schema;

#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use cedar_policy::{AuthorizationError, Authorizer, Entities, PolicySet, Request};

use crate::authn::{CredentialFacts, Identity, InstanceId};
use crate::authz::requestinfo::RequestInfo;

use entities::{BuildError, ContextInputs, PrincipalInputs, ResourceInputs};
pub use load::read_sources;
use load::Loaded;
pub use message::{decision_reason, reason_message};
use schema::CompiledSchema;
pub use schema::{SCHEMA_ORIGIN, SCHEMA_TEXT};

/// What is known about the device the request came from (filled by the device module).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceFacts {
    /// Device id from the device certificate.
    pub id: String,
    /// The token is bound to the presented device certificate (RFC 8705 `cnf.x5t#S256`).
    pub bound: bool,
    /// The device's posture record, when one is known and fresh.
    pub posture: Option<PostureFacts>,
    /// How old the posture record is.
    pub posture_age: Option<Duration>,
}

/// A device posture record as policy sees it (`context.device.posture`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PostureFacts {
    pub os: String,
    pub os_version: String,
    pub disk_encrypted: bool,
    pub firewall: bool,
    pub screen_lock: bool,
    /// Enrolled in the organisation's MDM.
    pub managed: bool,
    pub edr_score: Option<i64>,
    /// Where the record came from ("mdm", "edr", "agent", ...).
    pub source: String,
    /// The device agent reported this about itself.
    pub self_reported: bool,
}

/// Everything the engine needs to decide one request.
#[derive(Clone, Copy, Debug)]
pub struct AuthzInput<'a> {
    pub identity: &'a Identity,
    pub info: &'a RequestInfo,
    /// The authorizer verb (may differ from `info.verb`: a WebSocket exec is `create`).
    pub verb: &'a str,
    pub source_ip: IpAddr,
    pub now: SystemTime,
    pub device: Option<&'a DeviceFacts>,
    pub websocket: bool,
}

impl<'a> AuthzInput<'a> {
    pub fn subject(&self) -> Subject<'a> {
        Subject::from(self.identity)
    }
    pub fn request(&self) -> RequestFacts<'a> {
        RequestFacts {
            info: self.info,
            verb: self.verb,
            source_ip: self.source_ip,
            now: self.now,
            device: self.device,
            websocket: self.websocket,
        }
    }
}

/// The caller as policy sees it: a borrowed view of an [`Identity`] (or of the same facts from
/// elsewhere, e.g. a SubjectAccessReview, tests and benchmarks).
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    pub user: &'a str,
    pub uid: Option<&'a str>,
    pub groups: &'a [String],
    /// `AuthMethod::as_str()`: "oidc", "x509", ...
    pub method: &'a str,
    pub facts: &'a CredentialFacts,
}

impl<'a> From<&'a Identity> for Subject<'a> {
    fn from(identity: &'a Identity) -> Subject<'a> {
        Subject {
            user: identity.user(),
            uid: identity.uid(),
            groups: identity.groups(),
            method: identity.method().as_str(),
            facts: identity.facts(),
        }
    }
}

/// The request side of an [`AuthzInput`].
#[derive(Clone, Copy, Debug)]
pub struct RequestFacts<'a> {
    pub info: &'a RequestInfo,
    pub verb: &'a str,
    pub source_ip: IpAddr,
    pub now: SystemTime,
    pub device: Option<&'a DeviceFacts>,
    pub websocket: bool,
}

/// What a client asks to impersonate (`Impersonate-User`, `-Group`, `-Uid`, `-Extra-<key>`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ImpersonationKind {
    User,
    Group,
    Uid,
    Extra { key: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImpersonationTarget {
    pub kind: ImpersonationKind,
    pub value: String,
}

/// The outcome of one authorization.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// A `forbid` policy matched.
    pub explicit_deny: bool,
    /// The policies that decided: the matching forbids when explicitly denied; else the policies
    /// that failed to evaluate when errors denied; else the matching permits. Ids are the
    /// `@id` annotation or `<file>:<index>`, in load order.
    pub determining: Vec<String>,
    /// The `@reason` annotation of the first determining policy.
    pub reason: Option<String>,
    /// Evaluation errors (any error denies). Safe to log: no credentials.
    pub errors: Vec<String>,
}

impl Decision {
    fn error(message: String) -> Decision {
        Decision {
            errors: vec![message],
            ..Decision::default()
        }
    }
}

/// One problem in a policy file (or the schema).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    pub origin: String,
    /// 1-based.
    pub line: Option<usize>,
    /// 1-based, in characters.
    pub column: Option<usize>,
    pub message: String,
}

impl PolicyError {
    /// An error at byte `offset` of `text` (clamped to the text).
    pub(crate) fn at(
        origin: &str,
        text: &str,
        offset: Option<usize>,
        message: String,
    ) -> PolicyError {
        let (line, column) = match offset {
            Some(offset) => {
                let (l, c) = line_col(text, offset);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        PolicyError {
            origin: origin.to_owned(),
            line,
            column,
            message,
        }
    }
}

impl PolicyError {
    /// A Cedar diagnostic about `text` as one line at its first source location: the message,
    /// then the help text when there is one.
    pub(crate) fn diagnostic(
        origin: &str,
        text: &str,
        d: &cedar_policy::ffi::DetailedError,
    ) -> PolicyError {
        let offset = d.source_locations.first().map(|l| l.loc.start);
        PolicyError::at(origin, text, offset, diagnostic_message(d))
    }
}

/// One Cedar diagnostic as a single line: message, then the help text when there is one.
pub(crate) fn diagnostic_message(d: &cedar_policy::ffi::DetailedError) -> String {
    match &d.help {
        Some(help) if !help.is_empty() => format!("{}; help: {help}", d.message),
        _ => d.message.clone(),
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

impl std::fmt::Display for PolicyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{}:{l}:{c}: {}", self.origin, self.message),
            (Some(l), None) => write!(f, "{}:{l}: {}", self.origin, self.message),
            _ => write!(f, "{}: {}", self.origin, self.message),
        }
    }
}

/// Why a policy set was rejected; one line per problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyErrors {
    pub errors: Vec<PolicyError>,
}

impl PolicyErrors {
    fn one(e: PolicyError) -> PolicyErrors {
        PolicyErrors { errors: vec![e] }
    }
}

impl std::fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// The loaded policies and the decision procedure. Cheap to share (`Arc<PolicyEngine>`);
/// `decide` never blocks on `reload`.
pub struct PolicyEngine {
    schema: Arc<CompiledSchema>,
    current: ArcSwap<Loaded>,
    /// Serializes reloads so that epochs increase by one per successful reload.
    reload_lock: Mutex<()>,
    authorizer: Authorizer,
    slicing: bool,
    /// Check every request and its entities against the schema (unit tests).
    schema_checks: bool,
    ip_exprs: entities::IpExprCache,
    /// Principals, entities and contexts already built (see `cache.rs`); `None` builds every
    /// request's values from scratch.
    built: Option<cache::BuildCache>,
}

impl std::fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let loaded = self.current.load();
        f.debug_struct("PolicyEngine")
            .field("epoch", &loaded.epoch)
            .field("policies", &loaded.policies.num_of_policies())
            .field("origins", &loaded.origins)
            .finish()
    }
}

impl PolicyEngine {
    /// Loads policy files and directories (`*.cedar` files in a directory, sorted by name),
    /// validating them strictly against the embedded schema.
    pub fn load(paths: &[PathBuf]) -> Result<PolicyEngine, PolicyErrors> {
        let sources = load::read_sources(paths)?;
        PolicyEngine::from_sources(&sources)
    }

    /// Like [`PolicyEngine::load`], from `(origin, text)` pairs already in memory.
    pub fn from_sources(sources: &[(String, String)]) -> Result<PolicyEngine, PolicyErrors> {
        let schema = CompiledSchema::embedded()?;
        let loaded = load::compile(schema.clone(), sources, 1)?;
        Ok(PolicyEngine {
            schema,
            current: ArcSwap::from_pointee(loaded),
            reload_lock: Mutex::new(()),
            authorizer: Authorizer::new(),
            slicing: true,
            schema_checks: cfg!(test),
            ip_exprs: entities::IpExprCache::new(10_000),
            built: Some(cache::BuildCache::new()),
        })
    }

    /// Turns policy slicing (see `index.rs`) on or off. On by default; off evaluates every
    /// policy for every request (same decisions, slower with many policies).
    pub fn with_slicing(mut self, slicing: bool) -> PolicyEngine {
        self.slicing = slicing;
        self
    }

    /// Turns the reuse of built principals, entities and contexts (see `cache.rs`) on or off.
    /// On by default; off builds them for every request (same decisions, slower).
    pub fn with_build_cache(mut self, on: bool) -> PolicyEngine {
        self.built = on.then(cache::BuildCache::new);
        self
    }

    /// Checks every request and its entities against the schema before evaluating (costly;
    /// on in unit tests, where it proves that the entity builder fits the schema).
    #[cfg(test)]
    pub(crate) fn with_schema_checks(mut self, on: bool) -> PolicyEngine {
        self.schema_checks = on;
        self
    }

    /// Re-reads `paths` and swaps the new set in as a whole, returning the new epoch. On any
    /// error nothing changes: the last good set and its epoch stay in force.
    pub fn reload(&self, paths: &[PathBuf]) -> Result<u64, PolicyErrors> {
        let sources = load::read_sources(paths)?;
        self.reload_sources(&sources)
    }

    /// Like [`PolicyEngine::reload`], from `(origin, text)` pairs.
    pub fn reload_sources(&self, sources: &[(String, String)]) -> Result<u64, PolicyErrors> {
        let _serial = crate::util::sync::lock(&self.reload_lock);
        let epoch = self.current.load().epoch + 1;
        let loaded = load::compile(self.schema.clone(), sources, epoch)?;
        self.current.store(Arc::new(loaded));
        Ok(epoch)
    }

    /// Starts at 1 and goes up by one with every successful reload.
    pub fn epoch(&self) -> u64 {
        self.current.load().epoch
    }

    pub fn policy_count(&self) -> usize {
        self.current.load().policies.num_of_policies()
    }

    /// The files (origins) the current set was loaded from.
    pub fn origins(&self) -> Vec<String> {
        self.current.load().origins.clone()
    }

    /// Validator warnings of the current set (`origin:line:col: message`).
    pub fn warnings(&self) -> Vec<String> {
        self.current.load().warnings.clone()
    }

    /// Whether the schema has the action `verb` for a request of this kind (a Kubernetes
    /// resource, or a non-resource URL): what policy can decide at all.
    pub fn expresses(&self, verb: &str, resource_request: bool) -> bool {
        let loaded = self.current.load();
        let schema = &*loaded.schema;
        let resource = if resource_request {
            &schema.types.resource
        } else {
            &schema.types.non_resource_url
        };
        schema
            .action(verb)
            .is_some_and(|a| a.resources.contains(resource))
    }

    /// Whether a condition of the current set reads `context` (device, posture, credential
    /// facts, source address, time): then a decision holds for the request it was made for, and
    /// the same caller may get another answer on the same resource from another device or at
    /// another time. Decided on the policies' conditions, so a string or attribute that happens
    /// to be called "context" does not count; a policy that cannot be inspected counts as
    /// reading it. The text is looked at first: only a policy whose text names `context` is
    /// converted to find out (converting every policy of a large set costs tens of ms).
    pub fn reads_context(&self) -> bool {
        fn mentions_context(v: &serde_json::Value) -> bool {
            match v {
                serde_json::Value::Object(m) => m
                    .iter()
                    .any(|(k, v)| (k == "Var" && v == "context") || mentions_context(v)),
                serde_json::Value::Array(a) => a.iter().any(mentions_context),
                _ => false,
            }
        }
        self.current
            .load()
            .policies
            .policies()
            .filter(|p| p.has_non_scope_constraint() && p.to_string().contains("context"))
            .any(|p| {
                p.to_json()
                    .map_or(true, |json| mentions_context(&json["conditions"]))
            })
    }

    /// Decides a request: principal = the identity, action = `input.verb`, resource = the
    /// request's resource or non-resource path.
    pub fn decide(&self, input: &AuthzInput<'_>) -> Decision {
        self.decide_with(
            &input.subject(),
            &input.request(),
            Some(input.identity.instance()),
        )
    }

    /// Decides the `impersonate` action on `target` (the request's own resource is not
    /// involved; `input.info` and `input.verb` only feed the context).
    pub fn decide_impersonation(
        &self,
        input: &AuthzInput<'_>,
        target: &ImpersonationTarget,
    ) -> Decision {
        self.impersonation_with(
            &input.subject(),
            &input.request(),
            target,
            Some(input.identity.instance()),
        )
    }

    /// [`PolicyEngine::decide`] for a [`Subject`] that is not (yet) an [`Identity`].
    pub fn decide_subject(&self, subject: &Subject<'_>, req: &RequestFacts<'_>) -> Decision {
        self.decide_with(subject, req, None)
    }

    /// [`PolicyEngine::decide_subject`], for the identity `subject` is a view of (its
    /// [`InstanceId`], under which the build cache keeps its last request's values; see
    /// `cache.rs`).
    pub(crate) fn decide_with(
        &self,
        subject: &Subject<'_>,
        req: &RequestFacts<'_>,
        identity: Option<InstanceId>,
    ) -> Decision {
        let namespace = if req.info.is_resource_request {
            req.info.namespace.as_str()
        } else {
            ""
        };
        let resource = ResourceInputs::request(req.info);
        self.evaluate(subject, req, identity, req.verb, namespace, resource)
    }

    /// [`PolicyEngine::decide_impersonation`] for a [`Subject`].
    pub fn decide_subject_impersonation(
        &self,
        subject: &Subject<'_>,
        req: &RequestFacts<'_>,
        target: &ImpersonationTarget,
    ) -> Decision {
        self.impersonation_with(subject, req, target, None)
    }

    /// [`PolicyEngine::decide_subject_impersonation`] for the identity `subject` is a view of.
    pub(crate) fn impersonation_with(
        &self,
        subject: &Subject<'_>,
        req: &RequestFacts<'_>,
        target: &ImpersonationTarget,
        identity: Option<InstanceId>,
    ) -> Decision {
        let resource = ResourceInputs::Impersonation(target);
        self.evaluate(subject, req, identity, "impersonate", "", resource)
    }

    fn evaluate(
        &self,
        subject: &Subject<'_>,
        req: &RequestFacts<'_>,
        identity: Option<InstanceId>,
        verb: &str,
        namespace: &str,
        resource: ResourceInputs<'_>,
    ) -> Decision {
        let loaded = self.current.load();
        let schema = &*loaded.schema;
        let Some(action) = schema.action(verb) else {
            return Decision::error(BuildError::UnknownAction(verb.to_owned()).to_string());
        };
        // The entities and the request are built to fit the schema by construction; checking
        // them against it costs more than the rest of the decision, so only the unit tests do.
        // What the construction cannot guarantee (that the verb applies to this kind of
        // principal and resource) is checked here, cheaply.
        let check = self.schema_checks.then_some(&schema.schema);
        let principal = PrincipalInputs::of(subject);
        let context = ContextInputs::of(subject, req);
        // The entities (with their transitive closure) of `principal` (its uid and entity)
        // doing the action on `resource`.
        let build_entities =
            |(principal, entity): (cedar_policy::EntityUid, cedar_policy::Entity),
             resource: &ResourceInputs<'_>|
             -> Result<
                (cedar_policy::EntityUid, cedar_policy::EntityUid, Entities),
                BuildError,
            > {
                let mut list = Vec::with_capacity(3);
                list.push(entity);
                let resource = entities::resource(schema, resource, &mut list)?;
                if !action.applies_to(principal.type_name(), resource.type_name()) {
                    return Err(BuildError::ActionDoesNotApply {
                        verb: verb.to_owned(),
                        principal: principal.type_name().to_string(),
                        resource: resource.type_name().to_string(),
                    });
                }
                list.push(action.entity.clone());
                let entities = Entities::from_entities(list, check)
                    .map_err(|e| BuildError::Entities(Box::new(e)))?;
                Ok((principal, resource, entities))
            };
        let build_context = |inputs: &ContextInputs<'_>| entities::context(inputs, &self.ip_exprs);
        let request = |principal: cedar_policy::EntityUid,
                       resource: cedar_policy::EntityUid,
                       context: cedar_policy::Context| {
            Request::new(principal, action.uid.clone(), resource, context, check)
                .map_err(|e| BuildError::Request(Box::new(e)))
        };
        // With the build cache, the entities remember their last decision: the same entities,
        // policy set and context (compared in full, whole seconds included) decide the same.
        let prepared = match &self.built {
            Some(cache) => (|| -> Result<Prepared, BuildError> {
                let (e, context) = cache.prepare(
                    identity,
                    principal,
                    verb,
                    resource,
                    context,
                    |inputs| entities::principal(schema, inputs),
                    |s, resource| build_entities((s.uid.clone(), s.entity.clone()), resource),
                    build_context,
                )?;
                if let Some(decision) = e.decided(loaded.epoch, &context) {
                    return Ok(Prepared::Decided(decision));
                }
                let request = request(
                    e.principal.clone(),
                    e.resource.clone(),
                    context.context.clone(),
                )?;
                Ok(Prepared::Cached(request, e, context))
            })(),
            None => (|| -> Result<Prepared, BuildError> {
                let built = entities::principal(schema, &principal)?;
                let (principal, resource, entities) = build_entities(built, &resource)?;
                let request = request(principal, resource, build_context(&context)?)?;
                Ok(Prepared::Built(request, entities))
            })(),
        };
        let (request, entities, memo) = match prepared {
            Ok(Prepared::Decided(decision)) => return decision,
            Ok(Prepared::Cached(request, e, context)) => {
                (request, MaybeShared::Shared(e.clone()), Some((e, context)))
            }
            Ok(Prepared::Built(request, entities)) => (request, MaybeShared::Own(entities), None),
            Err(e) => return Decision::error(e.to_string()),
        };
        let sets: Vec<&PolicySet> = if self.slicing {
            loaded.index.slices(verb, namespace)
        } else {
            vec![&loaded.policies]
        };
        let decision = combine(
            &loaded,
            sets.into_iter()
                .map(|set| self.authorizer.is_authorized(&request, set, entities.get())),
        );
        if let Some((e, context)) = memo {
            e.remember(loaded.epoch, &context, &decision);
        }
        decision
    }
}

/// What evaluating a request starts from.
enum Prepared {
    /// The decision the cached entities remember for this policy set and context.
    Decided(Decision),
    /// A request over cached entities and context.
    Cached(Request, Arc<cache::EntitiesEntry>, Arc<cache::ContextEntry>),
    /// A request over entities built for it alone.
    Built(Request, Entities),
}

/// A request's entities: shared with the build cache, or built for this request only.
enum MaybeShared {
    Shared(Arc<cache::EntitiesEntry>),
    Own(Entities),
}

impl MaybeShared {
    fn get(&self) -> &Entities {
        match self {
            MaybeShared::Shared(e) => &e.entities,
            MaybeShared::Own(e) => e,
        }
    }
}

/// Combines the responses of disjoint slices of one policy set into the decision Cedar would
/// have made on the whole set, then applies "any error denies".
fn combine(loaded: &Loaded, responses: impl Iterator<Item = cedar_policy::Response>) -> Decision {
    let mut forbids = Vec::new();
    let mut permits = Vec::new();
    let mut errored = Vec::new();
    let mut errors = Vec::new();
    for response in responses {
        let reasons = response.diagnostics().reason().map(|id| id.to_string());
        match response.decision() {
            // Deny with reasons: the satisfied forbids. Deny without: nothing applied.
            cedar_policy::Decision::Deny => forbids.extend(reasons),
            cedar_policy::Decision::Allow => permits.extend(reasons),
        }
        for e in response.diagnostics().errors() {
            let AuthorizationError::PolicyEvaluationError(pe) = e;
            errored.push(pe.policy_id().to_string());
            errors.push(e.to_string());
        }
    }
    let order = |ids: &mut Vec<String>| {
        ids.sort_by_key(|id| loaded.index.order.get(id).copied().unwrap_or(usize::MAX));
        ids.dedup();
    };
    let explicit_deny = !forbids.is_empty();
    let allowed = !explicit_deny && errors.is_empty() && !permits.is_empty();
    let mut determining = if explicit_deny {
        forbids
    } else if !errors.is_empty() {
        errored
    } else {
        permits
    };
    order(&mut determining);
    errors.sort();
    let reason = determining
        .first()
        .and_then(|id| loaded.index.reasons.get(id).cloned());
    Decision {
        allowed,
        explicit_deny,
        determining,
        reason,
        errors,
    }
}
