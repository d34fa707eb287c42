//! Per-request Cedar values: the principal (with its groups), the resource (with its namespace)
//! and the context record, built straight from the request's facts (no JSON, no parsing).
//!
//! Each value is built from one inputs struct ([`PrincipalInputs`], [`ResourceInputs`],
//! [`ContextInputs`]) and from nothing else; the build cache (`cache.rs`) keys what it keeps by
//! the same structs, compared in full. Each builder takes its struct apart field by field
//! (`let ContextInputs { .. } = ..` without `..`), so a field added to the struct that the
//! builder does not use, or used by the builder but missing from the struct, does not compile.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::time::SystemTime;

use cedar_policy::entities_errors::EntitiesError;
use cedar_policy::{
    Context, ContextCreationError, Entity, EntityAttrEvaluationError, EntityUid,
    ExpressionConstructionError, RequestValidationError, RestrictedExpression,
};

use super::schema::CompiledSchema;
use super::{
    DeviceFacts, ImpersonationKind, ImpersonationTarget, PostureFacts, RequestFacts, Subject,
};
use crate::authz::requestinfo::RequestInfo;

/// Why a request's Cedar values could not be built; the decision is then a denial with this
/// text as its error. Cedar's errors are boxed: they are large, and rare.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BuildError {
    /// A record or set value was refused by Cedar.
    #[error(transparent)]
    Expression(Box<ExpressionConstructionError>),
    /// An entity was refused by Cedar.
    #[error(transparent)]
    Entity(Box<EntityAttrEvaluationError>),
    /// The context record was refused by Cedar.
    #[error(transparent)]
    Context(Box<ContextCreationError>),
    /// The verb is no action of the schema.
    #[error("verb {0:?} is not an action in the schema")]
    UnknownAction(String),
    /// The schema does not declare the action for this principal and resource type.
    #[error("action {verb:?} does not apply to {principal} on {resource}")]
    ActionDoesNotApply {
        verb: String,
        /// The principal's entity type name.
        principal: String,
        /// The resource's entity type name.
        resource: String,
    },
    /// The entities fail the schema check (only made in the unit tests).
    #[error("entities do not match the schema: {0}")]
    Entities(#[source] Box<EntitiesError>),
    /// The request fails the schema check (only made in the unit tests).
    #[error("request does not match the schema: {0}")]
    Request(#[source] Box<RequestValidationError>),
}

impl From<ExpressionConstructionError> for BuildError {
    fn from(e: ExpressionConstructionError) -> BuildError {
        BuildError::Expression(Box::new(e))
    }
}

impl From<EntityAttrEvaluationError> for BuildError {
    fn from(e: EntityAttrEvaluationError) -> BuildError {
        BuildError::Entity(Box::new(e))
    }
}

impl From<ContextCreationError> for BuildError {
    fn from(e: ContextCreationError) -> BuildError {
        BuildError::Context(Box::new(e))
    }
}

/// What the principal entity is made of.
#[derive(Clone, Copy, Hash, PartialEq, Eq)]
pub(crate) struct PrincipalInputs<'a> {
    pub user: &'a str,
    pub uid: Option<&'a str>,
    pub groups: &'a [String],
    /// `AuthMethod::as_str()`.
    pub method: &'a str,
    pub issuer: Option<&'a str>,
    /// The claims exposed to policy, the entity's tags.
    pub claims: &'a BTreeMap<String, Vec<String>>,
}

impl<'a> PrincipalInputs<'a> {
    pub fn of(s: &Subject<'a>) -> PrincipalInputs<'a> {
        PrincipalInputs {
            user: s.user,
            uid: s.uid,
            groups: s.groups,
            method: s.method,
            issuer: s.facts.issuer.as_deref(),
            claims: &s.facts.claims,
        }
    }
}

/// What the resource entity of a request is made of.
#[derive(Hash, PartialEq, Eq, Clone, Copy)]
pub(crate) enum ResourceInputs<'a> {
    Api {
        path: &'a str,
        api_group: &'a str,
        api_version: &'a str,
        resource: &'a str,
        subresource: &'a str,
        namespace: &'a str,
        name: &'a str,
    },
    NonResource {
        path: &'a str,
    },
    Impersonation(&'a ImpersonationTarget),
}

impl<'a> ResourceInputs<'a> {
    /// The resource of an API or non-resource request.
    pub fn request(info: &'a RequestInfo) -> ResourceInputs<'a> {
        if info.is_resource_request {
            ResourceInputs::Api {
                path: &info.path,
                api_group: &info.api_group,
                api_version: &info.api_version,
                resource: &info.resource,
                subresource: &info.subresource,
                namespace: &info.namespace,
                name: &info.name,
            }
        } else {
            ResourceInputs::NonResource { path: &info.path }
        }
    }
}

/// What the `context` record is made of, in the units the record uses (whole seconds).
#[derive(Clone, Copy, Hash, PartialEq, Eq)]
pub(crate) struct ContextInputs<'a> {
    /// `authn.method`.
    pub method: &'a str,
    /// `authn.issuer`.
    pub issuer: Option<&'a str>,
    /// `authn.amr` (and `authn.mfa`).
    pub amr: &'a [String],
    /// `authn.tokenAgeSeconds`.
    pub token_age: Option<u64>,
    /// `device`.
    pub device: Option<DeviceInputs<'a>>,
    /// `sourceIp`.
    pub source_ip: IpAddr,
    /// `websocket`.
    pub websocket: bool,
    /// `requestVerb`: the request's own verb (`RequestInfo::verb`).
    pub verb: &'a str,
    /// `requestTime`, in seconds since 1970.
    pub epoch: u64,
}

/// What `context.device` is made of.
#[derive(Clone, Copy, Hash, PartialEq, Eq)]
pub(crate) struct DeviceInputs<'a> {
    pub id: &'a str,
    pub bound: bool,
    pub posture: Option<&'a PostureFacts>,
    /// `postureAgeSeconds`.
    pub posture_age: Option<u64>,
}

impl<'a> ContextInputs<'a> {
    pub fn of(subject: &Subject<'a>, req: &RequestFacts<'a>) -> ContextInputs<'a> {
        let facts = subject.facts;
        ContextInputs {
            method: subject.method,
            issuer: facts.issuer.as_deref(),
            amr: &facts.amr,
            token_age: facts.issued_at.map(|iat| seconds_between(req.now, iat)),
            device: req.device.map(DeviceInputs::of),
            source_ip: req.source_ip,
            websocket: req.websocket,
            verb: &req.info.verb,
            epoch: seconds_between(req.now, SystemTime::UNIX_EPOCH),
        }
    }
}

impl<'a> DeviceInputs<'a> {
    pub fn of(d: &'a DeviceFacts) -> DeviceInputs<'a> {
        DeviceInputs {
            id: &d.id,
            bound: d.bound,
            posture: d.posture.as_ref(),
            posture_age: d.posture_age.map(|a| a.as_secs()),
        }
    }
}

/// Whole seconds from `earlier` to `later` (0 when `later` is earlier), as the context uses.
pub(crate) fn seconds_between(later: SystemTime, earlier: SystemTime) -> u64 {
    later
        .duration_since(earlier)
        .unwrap_or(std::time::Duration::ZERO)
        .as_secs()
}

type Attrs = Vec<(String, RestrictedExpression)>;

fn s(v: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(v.to_owned())
}

fn long(v: u64) -> RestrictedExpression {
    RestrictedExpression::new_long(i64::try_from(v).unwrap_or(i64::MAX))
}

fn attr(attrs: &mut Attrs, name: &str, value: RestrictedExpression) {
    attrs.push((name.to_owned(), value));
}

fn record(fields: Attrs) -> Result<RestrictedExpression, BuildError> {
    Ok(RestrictedExpression::new_record(fields)?)
}

fn entity(uid: EntityUid, attrs: Attrs, parents: HashSet<EntityUid>) -> Result<Entity, BuildError> {
    Ok(Entity::new(uid, attrs.into_iter().collect(), parents)?)
}

/// SPIFFE ID split into trust domain and path, when `user` is one.
fn spiffe_parts(user: &str) -> Option<(&str, &str)> {
    let rest = user.strip_prefix("spiffe://")?;
    let (td, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    (!td.is_empty()).then_some((td, path))
}

impl Subject<'_> {
    /// A SPIFFE workload: authenticated by an SVID (a certificate) whose identity is a SPIFFE ID.
    /// A token can never make a `Workload`, whatever its user name looks like.
    pub fn is_workload(&self) -> bool {
        is_workload(self.method, self.user)
    }
}

fn is_workload(method: &str, user: &str) -> bool {
    (method == "spiffe" || method == "x509") && spiffe_parts(user).is_some()
}

/// The principal entity and its uid.
pub(crate) fn principal(
    schema: &CompiledSchema,
    inputs: &PrincipalInputs<'_>,
) -> Result<(EntityUid, Entity), BuildError> {
    let PrincipalInputs {
        user,
        uid,
        groups,
        method,
        issuer,
        claims,
    } = *inputs;
    let types = &schema.types;
    // Groups are parents (for `principal in k8s::Group::"g"`) and members of `groups`; the
    // group entities themselves are not built: nothing but their uid is known about them.
    let group_uids: HashSet<EntityUid> = groups
        .iter()
        .map(|g| CompiledSchema::uid(&types.group, g))
        .collect();
    let groups_set = RestrictedExpression::new_set(
        group_uids
            .iter()
            .map(|u| RestrictedExpression::new_entity_uid(u.clone())),
    );
    let mut attrs: Attrs = Vec::with_capacity(8);
    attr(&mut attrs, "name", s(user));
    attr(&mut attrs, "groups", groups_set);
    attr(&mut attrs, "authMethod", s(method));
    if let Some(issuer) = issuer {
        attr(&mut attrs, "issuer", s(issuer));
    }
    let (uid, entity) = match spiffe_parts(user).filter(|_| is_workload(method, user)) {
        Some((td, path)) => {
            attr(&mut attrs, "trustDomain", s(td));
            attr(&mut attrs, "path", s(path));
            let uid = CompiledSchema::uid(&types.workload, user);
            let e = entity(uid.clone(), attrs, group_uids)?;
            (uid, e)
        }
        None => {
            if let Some(u) = uid {
                attr(&mut attrs, "uid", s(u));
            }
            let tags = claims.iter().map(|(k, values)| {
                (
                    k.clone(),
                    RestrictedExpression::new_set(values.iter().map(|v| s(v))),
                )
            });
            let uid = CompiledSchema::uid(&types.user, user);
            let e = Entity::new_with_tags(uid.clone(), attrs, group_uids, tags)?;
            (uid, e)
        }
    };
    Ok((uid, entity))
}

/// The resource entity: the request's resource or non-resource path, or an impersonation
/// target.
pub(crate) fn resource(
    schema: &CompiledSchema,
    inputs: &ResourceInputs<'_>,
    out: &mut Vec<Entity>,
) -> Result<EntityUid, BuildError> {
    let types = &schema.types;
    match *inputs {
        ResourceInputs::NonResource { path } => {
            let uid = CompiledSchema::uid(&types.non_resource_url, path);
            out.push(entity(
                uid.clone(),
                vec![("path".into(), s(path))],
                HashSet::new(),
            )?);
            Ok(uid)
        }
        ResourceInputs::Api {
            path,
            api_group,
            api_version,
            resource,
            subresource,
            namespace,
            name,
        } => {
            // The namespace is the resource's parent (for `resource in k8s::Namespace::"ns"`);
            // the namespace entity itself is not built.
            let mut parents = HashSet::new();
            if !namespace.is_empty() {
                parents.insert(CompiledSchema::uid(&types.namespace, namespace));
            }
            let uid = CompiledSchema::uid(&types.resource, path);
            let attrs = vec![
                ("apiGroup".into(), s(api_group)),
                ("apiVersion".into(), s(api_version)),
                ("resource".into(), s(resource)),
                ("subresource".into(), s(subresource)),
                ("namespace".into(), s(namespace)),
                ("name".into(), s(name)),
            ];
            out.push(entity(uid.clone(), attrs, parents)?);
            Ok(uid)
        }
        ResourceInputs::Impersonation(target) => impersonation_target(schema, target, out),
    }
}

/// The entity for an impersonation target.
fn impersonation_target(
    schema: &CompiledSchema,
    target: &ImpersonationTarget,
    out: &mut Vec<Entity>,
) -> Result<EntityUid, BuildError> {
    let types = &schema.types;
    let ImpersonationTarget { kind, value } = target;
    let (ty, id, attrs): (_, String, Attrs) = match kind {
        ImpersonationKind::User => (
            &types.impersonated_user,
            value.clone(),
            vec![("name".into(), s(value))],
        ),
        ImpersonationKind::Group => (
            &types.impersonated_group,
            value.clone(),
            vec![("name".into(), s(value))],
        ),
        ImpersonationKind::Uid => (
            &types.impersonated_uid,
            value.clone(),
            vec![("uid".into(), s(value))],
        ),
        ImpersonationKind::Extra { key } => (
            &types.impersonated_extra,
            format!("{key}={value}"),
            vec![("key".into(), s(key)), ("value".into(), s(value))],
        ),
    };
    let uid = CompiledSchema::uid(ty, &id);
    out.push(entity(uid.clone(), attrs, HashSet::new())?);
    Ok(uid)
}

fn device_record(device: &DeviceInputs<'_>) -> Result<RestrictedExpression, BuildError> {
    let DeviceInputs {
        id,
        bound,
        posture,
        posture_age,
    } = *device;
    let mut fields: Attrs = Vec::with_capacity(4);
    attr(&mut fields, "id", s(id));
    attr(&mut fields, "bound", RestrictedExpression::new_bool(bound));
    if let Some(p) = posture {
        let PostureFacts {
            os,
            os_version,
            disk_encrypted,
            firewall,
            screen_lock,
            managed,
            edr_score,
            source,
            self_reported,
        } = p;
        let mut posture: Attrs = Vec::with_capacity(9);
        attr(&mut posture, "os", s(os));
        attr(&mut posture, "osVersion", s(os_version));
        attr(
            &mut posture,
            "diskEncrypted",
            RestrictedExpression::new_bool(*disk_encrypted),
        );
        attr(
            &mut posture,
            "firewall",
            RestrictedExpression::new_bool(*firewall),
        );
        attr(
            &mut posture,
            "screenLock",
            RestrictedExpression::new_bool(*screen_lock),
        );
        attr(
            &mut posture,
            "managed",
            RestrictedExpression::new_bool(*managed),
        );
        if let Some(score) = edr_score {
            attr(
                &mut posture,
                "edrScore",
                RestrictedExpression::new_long(*score),
            );
        }
        attr(&mut posture, "source", s(source));
        attr(
            &mut posture,
            "selfReported",
            RestrictedExpression::new_bool(*self_reported),
        );
        attr(&mut fields, "posture", record(posture)?);
    }
    if let Some(age) = posture_age {
        attr(&mut fields, "postureAgeSeconds", long(age));
    }
    record(fields)
}

/// The `context` record (see `Context` in the schema); `ip_exprs` makes its `sourceIp`.
pub(crate) fn context(
    inputs: &ContextInputs<'_>,
    ip_exprs: &IpExprCache,
) -> Result<Context, BuildError> {
    let ContextInputs {
        method,
        issuer,
        amr,
        token_age,
        device,
        source_ip,
        websocket,
        verb,
        epoch,
    } = *inputs;
    let mut authn: Attrs = Vec::with_capacity(5);
    attr(&mut authn, "method", s(method));
    if let Some(issuer) = issuer {
        attr(&mut authn, "issuer", s(issuer));
    }
    if let Some(age) = token_age {
        attr(&mut authn, "tokenAgeSeconds", long(age));
    }
    attr(
        &mut authn,
        "amr",
        RestrictedExpression::new_set(amr.iter().map(|a| s(a))),
    );
    attr(
        &mut authn,
        "mfa",
        RestrictedExpression::new_bool(amr.iter().any(|a| a == "mfa")),
    );

    let mut time: Attrs = Vec::with_capacity(4);
    attr(&mut time, "epochSeconds", long(epoch));
    attr(&mut time, "hourUtc", long((epoch % 86_400) / 3_600));
    attr(&mut time, "minuteUtc", long((epoch % 3_600) / 60));
    // 1970-01-01 was a Thursday (4 with Sunday = 0).
    attr(&mut time, "weekdayUtc", long((epoch / 86_400 + 4) % 7));

    let mut pairs: Attrs = Vec::with_capacity(6);
    if let Some(device) = &device {
        attr(&mut pairs, "device", device_record(device)?);
    }
    attr(&mut pairs, "authn", record(authn)?);
    attr(&mut pairs, "sourceIp", ip_exprs.get(source_ip));
    attr(&mut pairs, "requestTime", record(time)?);
    attr(
        &mut pairs,
        "websocket",
        RestrictedExpression::new_bool(websocket),
    );
    attr(&mut pairs, "requestVerb", s(verb));
    Ok(Context::from_pairs(pairs)?)
}

/// `ip("<addr>")` expressions by address. Building one costs a run of the Cedar parser (for the
/// function name) on every call, more than the rest of the context together; clients come from
/// a limited set of addresses, so the expressions are kept.
pub(crate) struct IpExprCache {
    cache: moka::sync::Cache<IpAddr, RestrictedExpression>,
}

impl IpExprCache {
    pub fn new(capacity: u64) -> IpExprCache {
        IpExprCache {
            cache: moka::sync::Cache::new(capacity),
        }
    }

    pub fn get(&self, ip: IpAddr) -> RestrictedExpression {
        self.cache
            .get_with(ip, || RestrictedExpression::new_ip(ip.to_string()))
    }
}
