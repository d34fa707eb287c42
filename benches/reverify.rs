//! The re-verifier with 10,000 registered idle streams.
//!
//! Each stream carries a check that does what the gateway's does on every re-verification: read
//! the device's posture record from the store, build the policy input and decide it with a Cedar
//! engine of 100 policies. Measured:
//!
//! - `reverify/policy_change/10000`: one round after a policy reload (every stream re-decided);
//! - `reverify/posture_change/10000`: one round after one device's posture changed (its 10
//!   streams re-decided, found among 10,000);
//! - `reverify/idle_round/10000`: a round with nothing to do (the cost of waking up);
//! - printed: memory per registered stream (RSS growth, including a task per stream waiting on
//!   its cancellation, as a live watch does), and the close latency after a lock that matches
//!   1,000 of the 10,000 streams (from the lock to the last of the 1,000 seeing its close).
//!
//! Run: `cargo bench --bench reverify`

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ztgate::authn::CredentialFacts;
use ztgate::authz::cedar::{DeviceFacts, PolicyEngine, RequestFacts, Subject};
use ztgate::authz::requestinfo::RequestInfo;
use ztgate::state::{MemoryStore, Posture, PostureRecord, Store};
use ztgate::streams::{
    CloseReason, Recheck, StreamHandle, StreamKind, StreamRegistry, StreamSubject, Verdict,
};
use ztgate::telemetry::Metrics;

const STREAMS: usize = 10_000;
const TEAMS: usize = 10;
const DEVICES: usize = 1_000;

fn policies() -> String {
    let mut text = String::from(
        r#"@id("prod-device")
forbid (principal, action, resource in k8s::Namespace::"prod")
unless { context has device && context.device has posture && context.device.posture.managed };
@id("encrypted")
forbid (principal, action, resource is k8s::Resource)
unless { context has device && context.device has posture && context.device.posture.diskEncrypted };
"#,
    );
    for i in 0..98 {
        text.push_str(&format!(
            "@id(\"team-{i}\") permit (principal in k8s::Group::\"team-{i}\", action, resource in k8s::Namespace::\"ns-{i}\");\n"
        ));
    }
    text
}

fn watch_info(ns: &str) -> RequestInfo {
    RequestInfo {
        is_resource_request: true,
        path: format!("/api/v1/namespaces/{ns}/pods"),
        verb: "watch".into(),
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

/// What the gateway's stream check does, minus impersonation.
struct Check {
    engine: Arc<PolicyEngine>,
    store: Arc<MemoryStore>,
    user: String,
    groups: Vec<String>,
    facts: CredentialFacts,
    info: RequestInfo,
    device: String,
}

impl Recheck for Check {
    fn recheck(
        &self,
        now: SystemTime,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Verdict> + Send + '_>> {
        Box::pin(async move { self.decide(now) })
    }
}

impl Check {
    fn decide(&self, now: SystemTime) -> Verdict {
        let Some(rec) = self.store.view().posture_at(&self.device, now) else {
            return Verdict::Close(CloseReason::unauthorized("posture"));
        };
        let (posture, age) = ztgate::posture::facts(&rec, now);
        let device = DeviceFacts {
            id: self.device.clone(),
            bound: true,
            posture: Some(posture),
            posture_age: Some(age),
        };
        let subject = Subject {
            user: &self.user,
            uid: None,
            groups: &self.groups,
            method: "oidc",
            facts: &self.facts,
        };
        let req = RequestFacts {
            info: &self.info,
            verb: "watch",
            source_ip: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
            now,
            device: Some(&device),
            websocket: false,
        };
        if self.engine.decide_subject(&subject, &req).allowed {
            Verdict::Keep {
                until: Some(rec.expires_at),
            }
        } else {
            Verdict::Close(CloseReason::forbidden("policy"))
        }
    }
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

struct World {
    registry: Arc<StreamRegistry>,
    store: Arc<MemoryStore>,
    handles: Vec<StreamHandle>,
}

async fn world(engine: &Arc<PolicyEngine>) -> World {
    let store = Arc::new(MemoryStore::new());
    let now = SystemTime::now();
    for d in 0..DEVICES {
        store
            .put_posture(PostureRecord {
                device_id: format!("dev-{d}"),
                attributes: Posture {
                    os: Some("macos".into()),
                    disk_encrypted: Some(true),
                    managed: Some(true),
                    ..Default::default()
                },
                source: "mdm".into(),
                collected_at: now,
                expires_at: now + Duration::from_secs(3600),
            })
            .await
            .unwrap();
    }
    let registry = StreamRegistry::new(Arc::new(Metrics::new()));
    let mut handles = Vec::with_capacity(STREAMS);
    for i in 0..STREAMS {
        let team = i % TEAMS;
        let user = format!("user-{i}");
        let groups = vec![format!("team-{team}"), "employees".into()];
        let device = format!("dev-{}", i % DEVICES);
        let check = Arc::new(Check {
            engine: engine.clone(),
            store: store.clone(),
            user: user.clone(),
            groups: groups.clone(),
            facts: CredentialFacts::default(),
            info: watch_info(&format!("ns-{team}")),
            device: device.clone(),
        });
        let subject = StreamSubject {
            caller: Arc::new(ztgate::authn::Identity::from_review(
                user,
                None,
                groups,
                Default::default(),
            )),
            acting: None,
            device: Some(device),
        };
        let h = registry.register_checked(StreamKind::Watch, subject, Some(check), None);
        // A live watch's body waits on its cancellation.
        let token = h.token();
        tokio::spawn(async move { token.cancelled().await });
        handles.push(h);
    }
    World {
        registry,
        store,
        handles,
    }
}

fn reverify(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sources = vec![("bench.cedar".to_string(), policies())];
    let engine = Arc::new(PolicyEngine::from_sources(&sources).unwrap());

    // Memory per registered stream (entry, subject, check, a waiting task).
    let before = rss_bytes();
    let w = rt.block_on(world(&engine));
    let after = rss_bytes();
    println!(
        "reverify: {STREAMS} registered streams grew RSS by {:.1} MiB = {} bytes per stream \
         (incl. {DEVICES} posture records)",
        (after.saturating_sub(before)) as f64 / 1048576.0,
        after.saturating_sub(before) / STREAMS as u64
    );

    let mut g = c.benchmark_group("reverify");
    g.sample_size(10);
    g.bench_with_input(
        BenchmarkId::new("policy_change", STREAMS),
        &STREAMS,
        |b, _| {
            b.iter(|| {
                rt.block_on(async {
                    w.registry.recheck_all();
                    let closed = w.registry.run_once(SystemTime::now()).await;
                    assert_eq!(closed, 0);
                })
            })
        },
    );
    g.bench_with_input(
        BenchmarkId::new("posture_change", STREAMS),
        &STREAMS,
        |b, _| {
            b.iter(|| {
                rt.block_on(async {
                    w.registry.recheck_device("dev-7");
                    w.registry.run_once(SystemTime::now()).await
                })
            })
        },
    );
    g.bench_with_input(BenchmarkId::new("idle_round", STREAMS), &STREAMS, |b, _| {
        b.iter(|| rt.block_on(w.registry.run_once(SystemTime::now())))
    });
    g.finish();
    let _ = &w.store;
    drop(w);

    // Close latency: a lock matching 1,000 of 10,000 streams (one team of ten).
    let mut latencies = Vec::new();
    for _ in 0..10 {
        let w = rt.block_on(world(&engine));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for h in w.handles.iter().filter(|h| h.id() % TEAMS as u64 == 4) {
            let token = h.token();
            let tx = tx.clone();
            rt.spawn(async move {
                token.cancelled().await;
                let _ = tx.send(Instant::now());
            });
        }
        drop(tx);
        let took = rt.block_on(async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let start = Instant::now();
            let n = w.registry.close_matching(
                |s| s.caller.groups().iter().any(|g| g == "team-3"),
                &CloseReason::forbidden("access is locked"),
            );
            assert_eq!(n, STREAMS / TEAMS);
            let mut last = start;
            while let Some(t) = rx.recv().await {
                last = last.max(t);
            }
            last - start
        });
        latencies.push(took);
        drop(w);
    }
    latencies.sort();
    println!(
        "reverify: lock matching {} of {STREAMS} streams -> all closed: min {:?}, median {:?}, max {:?} (10 runs)",
        STREAMS / TEAMS,
        latencies[0],
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
}

criterion_group!(benches, reverify);
criterion_main!(benches);
