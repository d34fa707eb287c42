//! Cedar decisions per request with generated policy sets of 10, 100 and 1000 policies.
//!
//! The policies look like a real multi-team cluster: per team, a namespace permit and a
//! read-only permit for the team's viewers, plus a handful of cluster-wide forbids (secrets,
//! exec without a managed device, production hours). Each decision builds the request's
//! entities and context from scratch, as the gateway does.
//!
//! - `decide/sliced/N`: the engine as shipped (policies indexed by action and namespace scope).
//! - `decide/whole/N`: the same engine with slicing off (Cedar evaluates all N policies).
//! - `decide/sliced/0`: no policies, i.e. the fixed cost of building entities and the request.
//!
//! Run: `cargo bench --bench cedar`

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use ztgate::authn::CredentialFacts;
use ztgate::authz::cedar::{DeviceFacts, PolicyEngine, PostureFacts, RequestFacts, Subject};
use ztgate::authz::requestinfo::RequestInfo;

const FORBIDS: &str = r#"
@id("secrets") @reason("secrets are break-glass only")
forbid (principal, action in k8s::Action::"read", resource is k8s::Resource)
when { resource.resource == "secrets" } unless { principal in k8s::Group::"break-glass" };

@id("exec") @reason("exec needs a managed device and MFA")
forbid (principal, action, resource is k8s::Resource)
when { resource.resource == "pods" && ["exec", "attach", "portforward"].contains(resource.subresource) }
unless { context.authn.mfa && context has device && context.device has posture && context.device.posture.managed };

@id("prod-device") @reason("production needs a managed device")
forbid (principal, action, resource in k8s::Namespace::"prod")
unless { context has device && context.device has posture && context.device.posture.managed };

@id("prod-hours") @reason("business hours")
forbid (principal, action in k8s::Action::"write", resource in k8s::Namespace::"prod")
unless { context.requestTime.weekdayUtc >= 1 && context.requestTime.weekdayUtc <= 5 &&
         context.requestTime.hourUtc >= 8 && context.requestTime.hourUtc < 18 };

@id("discovery")
permit (principal, action == k8s::Action::"get", resource is k8s::NonResourceURL)
when { resource.path like "/api*" || resource.path == "/version" };
"#;

/// `n` policies: the 5 above, then per team a namespace permit and a viewers' read permit.
fn policies(n: usize) -> String {
    let mut text = String::new();
    if n == 0 {
        return text;
    }
    text.push_str(FORBIDS);
    let mut i = 0;
    let mut count = 5;
    while count < n {
        if count % 2 == 1 {
            text.push_str(&format!(
                "@id(\"team-{i}\") permit (principal in k8s::Group::\"team-{i}\", action, resource in k8s::Namespace::\"ns-{i}\");\n"
            ));
        } else {
            text.push_str(&format!(
                "@id(\"viewers-{i}\") permit (principal in k8s::Group::\"viewers-{i}\", action in k8s::Action::\"read\", resource is k8s::Resource in k8s::Namespace::\"ns-{i}\") when {{ resource.resource != \"secrets\" }};\n"
            ));
            i += 1;
        }
        count += 1;
    }
    text
}

fn info(ns: &str) -> RequestInfo {
    RequestInfo {
        is_resource_request: true,
        path: format!("/api/v1/namespaces/{ns}/pods"),
        verb: "list".into(),
        api_prefix: "api".into(),
        api_group: String::new(),
        api_version: "v1".into(),
        namespace: ns.into(),
        resource: "pods".into(),
        subresource: String::new(),
        name: String::new(),
        parts: vec!["pods".into()],
    }
}

fn decide(c: &mut Criterion) {
    let facts = CredentialFacts {
        issuer: Some("https://idp.example".into()),
        issued_at: Some(SystemTime::now() - Duration::from_secs(300)),
        amr: vec!["pwd".into(), "mfa".into()],
        ..Default::default()
    };
    let device = DeviceFacts {
        id: "dev-1".into(),
        bound: true,
        posture: Some(PostureFacts {
            os: "macos".into(),
            os_version: "14.5".into(),
            disk_encrypted: true,
            firewall: true,
            screen_lock: true,
            managed: true,
            edr_score: Some(90),
            source: "mdm".into(),
            self_reported: false,
        }),
        posture_age: Some(Duration::from_secs(60)),
    };
    let mut g = c.benchmark_group("decide");
    for n in [0usize, 10, 100, 1000] {
        let sources = vec![("bench.cedar".to_string(), policies(n))];
        let sliced = PolicyEngine::from_sources(&sources).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sliced.policy_count(), n);
        let whole = PolicyEngine::from_sources(&sources)
            .unwrap_or_else(|e| panic!("{e}"))
            .with_slicing(false);
        // the caller is in the last generated team, plus a few unrelated groups
        let teams = (n.saturating_sub(5)) / 2;
        let team = teams.saturating_sub(1);
        let groups: Vec<String> = vec![
            format!("team-{team}"),
            "employees".into(),
            "vpn-users".into(),
            "github-org".into(),
        ];
        let subject = Subject {
            user: "alice@example.com",
            uid: Some("u-1234"),
            groups: &groups,
            method: "oidc",
            facts: &facts,
        };
        let info = info(&format!("ns-{team}"));
        let req = RequestFacts {
            info: &info,
            verb: "list",
            source_ip: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
            now: SystemTime::now(),
            device: Some(&device),
            websocket: false,
        };
        if n > 0 {
            let d = sliced.decide_subject(&subject, &req);
            assert!(d.allowed, "{d:?}");
            assert_eq!(d, whole.decide_subject(&subject, &req));
        }
        g.bench_with_input(BenchmarkId::new("sliced", n), &n, |b, _| {
            b.iter(|| black_box(sliced.decide_subject(black_box(&subject), black_box(&req))))
        });
        if n > 0 {
            g.bench_with_input(BenchmarkId::new("whole", n), &n, |b, _| {
                b.iter(|| black_box(whole.decide_subject(black_box(&subject), black_box(&req))))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, decide);
criterion_main!(benches, parts_group);

mod parts {
    use super::*;
    use cedar_policy::*;
    use std::collections::{HashMap, HashSet};
    use std::str::FromStr;

    pub fn parts(c: &mut Criterion) {
        let text = ztgate::authz::cedar::SCHEMA_TEXT;
        let (schema, _) = Schema::from_cedarschema_str(text).unwrap();
        let actions = schema.action_entities().unwrap();
        let user_t = EntityTypeName::from_str("k8s::User").unwrap();
        let group_t = EntityTypeName::from_str("k8s::Group").unwrap();
        let res_t = EntityTypeName::from_str("k8s::Resource").unwrap();
        let ns_t = EntityTypeName::from_str("k8s::Namespace").unwrap();
        let action = EntityUid::from_str("k8s::Action::\"list\"").unwrap();
        let s = |v: &str| RestrictedExpression::new_string(v.to_owned());
        let build = || {
            let mut list = Vec::new();
            let mut gu = HashSet::new();
            for g in ["team-1", "employees", "vpn", "gh"] {
                let uid = EntityUid::from_type_name_and_id(group_t.clone(), EntityId::new(g));
                list.push(
                    Entity::new(
                        uid.clone(),
                        HashMap::from([("name".to_string(), s(g))]),
                        HashSet::new(),
                    )
                    .unwrap(),
                );
                gu.insert(uid);
            }
            let puid = EntityUid::from_type_name_and_id(user_t.clone(), EntityId::new("alice"));
            let attrs = HashMap::from([
                ("name".to_string(), s("alice")),
                (
                    "groups".to_string(),
                    RestrictedExpression::new_set(
                        gu.iter()
                            .map(|u| RestrictedExpression::new_entity_uid(u.clone())),
                    ),
                ),
                ("authMethod".to_string(), s("oidc")),
            ]);
            list.push(Entity::new_with_tags(puid.clone(), attrs, gu, []).unwrap());
            let ns = EntityUid::from_type_name_and_id(ns_t.clone(), EntityId::new("ns-1"));
            list.push(
                Entity::new(
                    ns.clone(),
                    HashMap::from([("name".to_string(), s("ns-1"))]),
                    HashSet::new(),
                )
                .unwrap(),
            );
            let ruid = EntityUid::from_type_name_and_id(
                res_t.clone(),
                EntityId::new("/api/v1/namespaces/ns-1/pods"),
            );
            let attrs = HashMap::from([
                ("apiGroup".to_string(), s("")),
                ("apiVersion".to_string(), s("v1")),
                ("resource".to_string(), s("pods")),
                ("subresource".to_string(), s("")),
                ("namespace".to_string(), s("ns-1")),
                ("name".to_string(), s("")),
            ]);
            list.push(Entity::new(ruid.clone(), attrs, HashSet::from([ns])).unwrap());
            (list, puid, ruid)
        };
        let ctx = || {
            let authn = RestrictedExpression::new_record([
                ("method".to_string(), s("oidc")),
                ("amr".to_string(), RestrictedExpression::new_set([s("mfa")])),
                ("mfa".to_string(), RestrictedExpression::new_bool(true)),
            ])
            .unwrap();
            let time = RestrictedExpression::new_record([
                (
                    "epochSeconds".to_string(),
                    RestrictedExpression::new_long(1),
                ),
                ("hourUtc".to_string(), RestrictedExpression::new_long(1)),
                ("minuteUtc".to_string(), RestrictedExpression::new_long(1)),
                ("weekdayUtc".to_string(), RestrictedExpression::new_long(1)),
            ])
            .unwrap();
            Context::from_pairs([
                ("authn".to_string(), authn),
                (
                    "sourceIp".to_string(),
                    RestrictedExpression::new_ip("10.1.2.3"),
                ),
                ("requestTime".to_string(), time),
                (
                    "websocket".to_string(),
                    RestrictedExpression::new_bool(false),
                ),
                ("requestVerb".to_string(), s("list")),
            ])
            .unwrap()
        };
        let mut g = c.benchmark_group("parts");
        g.bench_function("build_entities", |b| b.iter(|| black_box(build())));
        g.bench_function("build_context", |b| b.iter(|| black_box(ctx())));
        g.bench_function("entities_schema", |b| {
            b.iter_batched(
                || build().0,
                |l| black_box(Entities::from_entities(l, Some(&schema)).unwrap()),
                criterion::BatchSize::SmallInput,
            )
        });
        g.bench_function("entities_none", |b| {
            b.iter_batched(
                || build().0,
                |l| black_box(Entities::from_entities(l, None).unwrap()),
                criterion::BatchSize::SmallInput,
            )
        });
        g.bench_function("entities_actions_clone_add", |b| {
            b.iter_batched(
                || build().0,
                |l| black_box(actions.clone().add_entities(l, None).unwrap()),
                criterion::BatchSize::SmallInput,
            )
        });
        let (_, p, r) = build();
        g.bench_function("request_schema", |b| {
            b.iter_batched(
                ctx,
                |cx| {
                    black_box(
                        Request::new(p.clone(), action.clone(), r.clone(), cx, Some(&schema))
                            .unwrap(),
                    )
                },
                criterion::BatchSize::SmallInput,
            )
        });
        g.bench_function("request_none", |b| {
            b.iter_batched(
                ctx,
                |cx| {
                    black_box(Request::new(p.clone(), action.clone(), r.clone(), cx, None).unwrap())
                },
                criterion::BatchSize::SmallInput,
            )
        });
        let ctx_noip = || {
            Context::from_pairs([
                ("sourceIp".to_string(), s("10.1.2.3")),
                (
                    "websocket".to_string(),
                    RestrictedExpression::new_bool(false),
                ),
            ])
            .unwrap()
        };
        let ctx_ip = || {
            Context::from_pairs([
                (
                    "sourceIp".to_string(),
                    RestrictedExpression::new_ip("10.1.2.3"),
                ),
                (
                    "websocket".to_string(),
                    RestrictedExpression::new_bool(false),
                ),
            ])
            .unwrap()
        };
        g.bench_function("ctx_noip", |b| b.iter(|| black_box(ctx_noip())));
        g.bench_function("ctx_ip", |b| b.iter(|| black_box(ctx_ip())));
        let act = actions.iter().find(|e| e.uid() == action).unwrap().clone();
        g.bench_function("entities_none_2_plus_action", |b| {
            b.iter_batched(
                || {
                    let mut l = build().0;
                    l.drain(0..5);
                    l.push(act.clone());
                    l
                },
                |l| black_box(Entities::from_entities(l, None).unwrap()),
                criterion::BatchSize::SmallInput,
            )
        });
        g.bench_function("action_entities", |b| {
            b.iter(|| black_box(schema.action_entities().unwrap()))
        });
        g.finish();
    }
}
criterion_group!(parts_group, parts::parts);
