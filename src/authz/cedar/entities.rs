//! Per-request Cedar values: the principal (with its groups), the resource (with its namespace)
//! and the context record, built straight from the request's facts (no JSON, no parsing).

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::SystemTime;

use cedar_policy::{Context, Entity, EntityUid, RestrictedExpression};

use super::cache::seconds_between;
use super::schema::CompiledSchema;
use super::{DeviceFacts, ImpersonationKind, ImpersonationTarget, RequestFacts, Subject};
use crate::authz::requestinfo::RequestInfo;

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

fn record(fields: Attrs) -> Result<RestrictedExpression, String> {
    RestrictedExpression::new_record(fields).map_err(|e| e.to_string())
}

fn entity(uid: EntityUid, attrs: Attrs, parents: HashSet<EntityUid>) -> Result<Entity, String> {
    Entity::new(uid, attrs.into_iter().collect(), parents).map_err(|e| e.to_string())
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
        (self.method == "spiffe" || self.method == "x509") && spiffe_parts(self.user).is_some()
    }
}

/// The principal entity and its uid.
pub(crate) fn principal(
    schema: &CompiledSchema,
    subject: &Subject<'_>,
) -> Result<(EntityUid, Entity), String> {
    let types = &schema.types;
    // Groups are parents (for `principal in k8s::Group::"g"`) and members of `groups`; the
    // group entities themselves are not built: nothing but their uid is known about them.
    let group_uids: HashSet<EntityUid> = subject
        .groups
        .iter()
        .map(|g| CompiledSchema::uid(&types.group, g))
        .collect();
    let groups_set = RestrictedExpression::new_set(
        group_uids
            .iter()
            .map(|u| RestrictedExpression::new_entity_uid(u.clone())),
    );
    let facts = subject.facts;
    let mut attrs: Attrs = Vec::with_capacity(8);
    attr(&mut attrs, "name", s(subject.user));
    attr(&mut attrs, "groups", groups_set);
    attr(&mut attrs, "authMethod", s(subject.method));
    if let Some(issuer) = &facts.issuer {
        attr(&mut attrs, "issuer", s(issuer));
    }
    let (uid, entity) = match spiffe_parts(subject.user).filter(|_| subject.is_workload()) {
        Some((td, path)) => {
            attr(&mut attrs, "trustDomain", s(td));
            attr(&mut attrs, "path", s(path));
            let uid = CompiledSchema::uid(&types.workload, subject.user);
            let e = entity(uid.clone(), attrs, group_uids)?;
            (uid, e)
        }
        None => {
            if let Some(u) = subject.uid {
                attr(&mut attrs, "uid", s(u));
            }
            let tags = facts.claims.iter().map(|(k, values)| {
                (
                    k.clone(),
                    RestrictedExpression::new_set(values.iter().map(|v| s(v))),
                )
            });
            let uid = CompiledSchema::uid(&types.user, subject.user);
            let e = Entity::new_with_tags(uid.clone(), attrs, group_uids, tags)
                .map_err(|e| e.to_string())?;
            (uid, e)
        }
    };
    Ok((uid, entity))
}

/// The resource entity for an API or non-resource request.
pub(crate) fn resource(
    schema: &CompiledSchema,
    info: &RequestInfo,
    out: &mut Vec<Entity>,
) -> Result<EntityUid, String> {
    let types = &schema.types;
    if !info.is_resource_request {
        let uid = CompiledSchema::uid(&types.non_resource_url, &info.path);
        out.push(entity(
            uid.clone(),
            vec![("path".into(), s(&info.path))],
            HashSet::new(),
        )?);
        return Ok(uid);
    }
    // The namespace is the resource's parent (for `resource in k8s::Namespace::"ns"`); the
    // namespace entity itself is not built.
    let mut parents = HashSet::new();
    if !info.namespace.is_empty() {
        parents.insert(CompiledSchema::uid(&types.namespace, &info.namespace));
    }
    let uid = CompiledSchema::uid(&types.resource, &info.path);
    let attrs = vec![
        ("apiGroup".into(), s(&info.api_group)),
        ("apiVersion".into(), s(&info.api_version)),
        ("resource".into(), s(&info.resource)),
        ("subresource".into(), s(&info.subresource)),
        ("namespace".into(), s(&info.namespace)),
        ("name".into(), s(&info.name)),
    ];
    out.push(entity(uid.clone(), attrs, parents)?);
    Ok(uid)
}

/// The entity for an impersonation target.
pub(crate) fn impersonation_target(
    schema: &CompiledSchema,
    target: &ImpersonationTarget,
    out: &mut Vec<Entity>,
) -> Result<EntityUid, String> {
    let types = &schema.types;
    let (ty, id, attrs): (_, String, Attrs) = match &target.kind {
        ImpersonationKind::User => (
            &types.impersonated_user,
            target.value.clone(),
            vec![("name".into(), s(&target.value))],
        ),
        ImpersonationKind::Group => (
            &types.impersonated_group,
            target.value.clone(),
            vec![("name".into(), s(&target.value))],
        ),
        ImpersonationKind::Uid => (
            &types.impersonated_uid,
            target.value.clone(),
            vec![("uid".into(), s(&target.value))],
        ),
        ImpersonationKind::Extra { key } => (
            &types.impersonated_extra,
            format!("{key}={}", target.value),
            vec![("key".into(), s(key)), ("value".into(), s(&target.value))],
        ),
    };
    let uid = CompiledSchema::uid(ty, &id);
    out.push(entity(uid.clone(), attrs, HashSet::new())?);
    Ok(uid)
}

fn device_record(device: &DeviceFacts) -> Result<RestrictedExpression, String> {
    let mut fields: Attrs = Vec::with_capacity(4);
    attr(&mut fields, "id", s(&device.id));
    attr(
        &mut fields,
        "bound",
        RestrictedExpression::new_bool(device.bound),
    );
    if let Some(p) = &device.posture {
        let mut posture: Attrs = Vec::with_capacity(9);
        attr(&mut posture, "os", s(&p.os));
        attr(&mut posture, "osVersion", s(&p.os_version));
        attr(
            &mut posture,
            "diskEncrypted",
            RestrictedExpression::new_bool(p.disk_encrypted),
        );
        attr(
            &mut posture,
            "firewall",
            RestrictedExpression::new_bool(p.firewall),
        );
        attr(
            &mut posture,
            "screenLock",
            RestrictedExpression::new_bool(p.screen_lock),
        );
        attr(
            &mut posture,
            "managed",
            RestrictedExpression::new_bool(p.managed),
        );
        if let Some(score) = p.edr_score {
            attr(
                &mut posture,
                "edrScore",
                RestrictedExpression::new_long(score),
            );
        }
        attr(&mut posture, "source", s(&p.source));
        attr(
            &mut posture,
            "selfReported",
            RestrictedExpression::new_bool(p.self_reported),
        );
        attr(&mut fields, "posture", record(posture)?);
    }
    if let Some(age) = device.posture_age {
        attr(&mut fields, "postureAgeSeconds", long(age.as_secs()));
    }
    record(fields)
}

/// The `context` record (see `Context` in the schema).
/// `source_ip` is the `ip("...")` expression for `req.source_ip` (see [`IpExprCache`]).
pub(crate) fn context(
    subject: &Subject<'_>,
    req: &RequestFacts<'_>,
    source_ip: RestrictedExpression,
) -> Result<Context, String> {
    let facts = subject.facts;
    let mut authn: Attrs = Vec::with_capacity(5);
    attr(&mut authn, "method", s(subject.method));
    if let Some(issuer) = &facts.issuer {
        attr(&mut authn, "issuer", s(issuer));
    }
    if let Some(iat) = facts.issued_at {
        attr(
            &mut authn,
            "tokenAgeSeconds",
            long(seconds_between(req.now, iat)),
        );
    }
    attr(
        &mut authn,
        "amr",
        RestrictedExpression::new_set(facts.amr.iter().map(|a| s(a))),
    );
    attr(
        &mut authn,
        "mfa",
        RestrictedExpression::new_bool(facts.amr.iter().any(|a| a == "mfa")),
    );

    let epoch = seconds_between(req.now, SystemTime::UNIX_EPOCH);
    let mut time: Attrs = Vec::with_capacity(4);
    attr(&mut time, "epochSeconds", long(epoch));
    attr(&mut time, "hourUtc", long((epoch % 86_400) / 3_600));
    attr(&mut time, "minuteUtc", long((epoch % 3_600) / 60));
    // 1970-01-01 was a Thursday (4 with Sunday = 0).
    attr(&mut time, "weekdayUtc", long((epoch / 86_400 + 4) % 7));

    let mut pairs: Attrs = Vec::with_capacity(6);
    if let Some(device) = req.device {
        attr(&mut pairs, "device", device_record(device)?);
    }
    attr(&mut pairs, "authn", record(authn)?);
    attr(&mut pairs, "sourceIp", source_ip);
    attr(&mut pairs, "requestTime", record(time)?);
    attr(
        &mut pairs,
        "websocket",
        RestrictedExpression::new_bool(req.websocket),
    );
    attr(&mut pairs, "requestVerb", s(&req.info.verb));
    Context::from_pairs(pairs).map_err(|e| e.to_string())
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
