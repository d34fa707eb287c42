//! RequestInfo computation on typical kube-apiserver requests.
//!
//! Run: `cargo bench --bench requestinfo`

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::Method;
use ztgate::authz::requestinfo::request_info;

fn bench(c: &mut Criterion) {
    let cases: [(&str, Method, &str, Option<&str>); 5] = [
        (
            "get_pod",
            Method::GET,
            "/api/v1/namespaces/default/pods/web-7d4b9c8f6-x2x9z",
            None,
        ),
        (
            "list_pods_limit",
            Method::GET,
            "/api/v1/namespaces/default/pods",
            Some("limit=500"),
        ),
        (
            "watch_deployment_by_name",
            Method::GET,
            "/apis/apps/v1/namespaces/default/deployments",
            Some("allowWatchBookmarks=true&fieldSelector=metadata.name%3Dweb&resourceVersion=12345&timeoutSeconds=300&watch=true"),
        ),
        (
            "patch_status",
            Method::PATCH,
            "/apis/apps/v1/namespaces/default/deployments/web/status",
            Some("fieldManager=kube-controller-manager"),
        ),
        ("discovery", Method::GET, "/apis/apps/v1", None),
    ];
    let mut group = c.benchmark_group("request_info");
    for (name, method, path, query) in &cases {
        group.bench_function(*name, |b| {
            b.iter(|| request_info(black_box(method), black_box(path), black_box(*query)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
