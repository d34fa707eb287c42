//! Many watches at once: kube-apiserver (and the stand-in) accept a bounded number of HTTP/2
//! streams per connection, and a watch holds its stream for as long as it lives. More watches
//! than one upstream connection carries must all start, and ordinary requests must not queue
//! behind them.

use crate::support;

use std::time::Duration;

use http_body_util::BodyExt;
use support::{get, send, Harness};

/// The stand-in's HTTP/2 stream limit per connection (hyper's default).
const UPSTREAM_STREAMS_PER_CONNECTION: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_watches_than_one_upstream_connection_carries_all_start() {
    let h = Harness::start().await;
    let alice = h.demo.env.pki.user("alice", &["team-a"]);
    // Two client connections (the gateway allows 250 streams on each), 150 watches on each.
    let clients = [h.client(Some(&alice), true), h.client(Some(&alice), true)];
    let total = 300;
    assert!(total > UPSTREAM_STREAMS_PER_CONNECTION);
    let uri = h.uri("/api/v1/namespaces/team-a/pods?watch=1");
    let mut pending = Vec::new();
    for i in 0..total {
        let client = clients[i % 2].clone();
        let req = get(&uri);
        pending.push(tokio::spawn(async move { client.request(req).await }));
    }
    let mut open = Vec::new();
    for p in pending {
        let resp = tokio::time::timeout(Duration::from_secs(30), p)
            .await
            .expect("every watch starts (none waits for a free upstream stream)")
            .unwrap()
            .expect("watch response");
        assert_eq!(resp.status(), 200);
        open.push(resp.into_body());
    }
    // The watches are live: each got the initial ADDED events.
    let first = open[total - 1].frame().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(first.data_ref().unwrap()).contains("\"ADDED\""));

    // Ordinary requests still go through while every watch is open.
    let (code, _, body) = send(
        &clients[0],
        get(&h.uri("/api/v1/namespaces/team-a/pods/web-0")),
    )
    .await;
    assert_eq!(code, 200, "{body}");

    let (lanes, live) = h.demo.gateway.gateway.upstream.lane_counts();
    assert_eq!(live, total);
    assert!(
        lanes >= total / ztgate::proxy::forward::STREAMS_PER_LANE,
        "{lanes} lanes"
    );
    drop(open);
}
