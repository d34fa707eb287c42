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
//! - `decide/uncached/N`: sliced, with the engine's build cache off (every request's principal,
//!   entities and context built from scratch, as before the cache).
//! - `decide/new-second/N`: sliced, the clock one second later on every call (the context is
//!   rebuilt, the principal and entities come from the cache).
//! - `decide/new-caller/N`: sliced, a different user on every call (everything is built and
//!   inserted into the cache: the cost of a miss).
//! - `decide/identity/N`: sliced, decided for an `Identity` (`PolicyEngine::decide`), as the
//!   gateway decides a cached token's requests: the identity's last request's values are reused.
//!
//! Run: `cargo bench --bench cedar`

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use ztgate::authn::{CredentialFacts, Identity};
use ztgate::authz::cedar::{
    AuthzInput, DeviceFacts, PolicyEngine, PostureFacts, RequestFacts, Subject,
};
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
        let uncached = PolicyEngine::from_sources(&sources)
            .unwrap_or_else(|e| panic!("{e}"))
            .with_build_cache(false);
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
            assert_eq!(d, uncached.decide_subject(&subject, &req));
        }
        g.bench_with_input(BenchmarkId::new("sliced", n), &n, |b, _| {
            b.iter(|| black_box(sliced.decide_subject(black_box(&subject), black_box(&req))))
        });
        g.bench_with_input(BenchmarkId::new("uncached", n), &n, |b, _| {
            b.iter(|| black_box(uncached.decide_subject(black_box(&subject), black_box(&req))))
        });
        let mut second = 0u64;
        g.bench_with_input(BenchmarkId::new("new-second", n), &n, |b, _| {
            b.iter(|| {
                second += 1;
                let req = RequestFacts {
                    now: req.now + Duration::from_secs(second),
                    ..req
                };
                black_box(sliced.decide_subject(black_box(&subject), black_box(&req)))
            })
        });
        let mut caller = 0u64;
        g.bench_with_input(BenchmarkId::new("new-caller", n), &n, |b, _| {
            b.iter(|| {
                caller += 1;
                let user = format!("user-{caller}@example.com");
                let subject = Subject {
                    user: &user,
                    ..subject
                };
                black_box(sliced.decide_subject(black_box(&subject), black_box(&req)))
            })
        });
        let identity = Identity::from_review(
            subject.user.to_owned(),
            subject.uid.map(str::to_owned),
            groups.clone(),
            Default::default(),
        );
        let input = AuthzInput {
            identity: &identity,
            info: &info,
            verb: "list",
            source_ip: req.source_ip,
            now: req.now,
            device: Some(&device),
            websocket: false,
        };
        g.bench_with_input(BenchmarkId::new("identity", n), &n, |b, _| {
            b.iter(|| black_box(sliced.decide(black_box(&input))))
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
criterion_main!(benches);
