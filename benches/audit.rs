//! Writing audit events (`audit.k8s.io/v1` JSON), as the gateway does per request.
//!
//! - `audit/request-path`: a request's RequestReceived and ResponseComplete events written from
//!   its parts (`EventParts::write_stages`), the path of every ordinary request.
//! - `audit/deferred-event`: a built `Event` written (`Event::write_json`), the path of a
//!   stream's ResponseComplete, written when the stream ends.
//! - `audit/audit-id`: a new audit ID (a random UUID).
//!
//! Run: `cargo bench --bench audit`

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::{Method, Uri};
use ztgate::audit::event::{Decision, EventParts, ResponseInfo, ANNOTATION_REASON};
use ztgate::audit::{Auditor, Level, Stage};
use ztgate::authn::Identity;
use ztgate::authz::requestinfo::request_info;

fn write(c: &mut Criterion) {
    let identity = Identity::from_review(
        "alice@example.com".into(),
        Some("u-1234".into()),
        vec![
            "team-7".into(),
            "employees".into(),
            "system:authenticated".into(),
        ],
        [("scopes".to_owned(), vec!["openid".to_owned()])]
            .into_iter()
            .collect(),
    );
    let method = Method::GET;
    let uri: Uri = "/api/v1/namespaces/team-7/pods?limit=500&labelSelector=app%3Dweb"
        .parse()
        .expect("uri");
    let info = request_info(&method, uri.path(), uri.query()).expect("request info");
    let ips = [IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))];
    let received = SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_705_445_123_456);
    let done = received + Duration::from_micros(3_210);
    let audit_id = "0b4a1a0f-6f6e-4b1e-9d6c-3f2a5c1e7d10";
    let mut parts = EventParts::new(audit_id, &method, &uri, received);
    parts.user_agent = Some("kubectl/v1.31.0 (linux/amd64) kubernetes/abcdef0");
    parts.source_ips = &ips;
    parts.identity = Some(&identity);
    parts.request_info = Some(&info);
    parts.response = Some(ResponseInfo {
        code: 200,
        reason: None,
        message: None,
    });
    parts.decision(Decision::Allow);
    parts.annotate(ANNOTATION_REASON, "allowed by policy \"team-7\"");

    let mut g = c.benchmark_group("audit");
    g.bench_function("request-path", |b| {
        b.iter(|| {
            let mut n = 0;
            black_box(&parts).write_stages(
                Level::Metadata,
                [
                    (Stage::RequestReceived, received),
                    (Stage::ResponseComplete, done),
                ],
                |_, json| n += black_box(json).len(),
            );
            n
        })
    });
    let event = parts.build_at(Level::Metadata, Stage::ResponseComplete, done);
    g.bench_function("deferred-event", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(1024);
            black_box(&event).write_json(&mut out);
            out
        })
    });
    g.bench_function("audit-id", |b| b.iter(Auditor::new_audit_id));
    g.finish();
}

criterion_group!(benches, write);
criterion_main!(benches);
