//! Faults in what the gateway depends on (issue 9, item 3), the cases that need no new product
//! code: kube-apiserver dying under a live watch, and a storm of policy reloads while requests
//! flow. In each, the gateway stays up, answers with a Status, fails closed, and recovers.

mod support;

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use support::{get, send, status_of, Harness};
use ztgate::demo::DevSettings;

const PODS_A: &str = "/api/v1/namespaces/team-a/pods";
const PODS_B: &str = "/api/v1/namespaces/team-b/pods";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_apiserver_dying_under_a_watch_ends_it_and_the_gateway_recovers() {
    let mut h = Harness::start().await;
    let client = h.client(Some(&h.demo.env.pki.user("alice", &["team-a"])), true);
    let watch = client
        .request(get(&h.uri(&format!("{PODS_A}?watch=1"))))
        .await
        .unwrap();
    assert_eq!(watch.status(), 200);
    let mut body = watch.into_body();
    assert_eq!(h.demo.gateway.gateway.streams.count(), 1);

    // The stand-in goes away with the watch open (its connections are reset).
    let addr = h.demo.apiserver.addr();
    let mut opts = ztgate_testkit::ApiServerOptions::new(&h.demo.env.pki);
    opts.addr = Some(addr);
    let placeholder =
        ztgate_testkit::ApiServer::start(ztgate_testkit::ApiServerOptions::new(&h.demo.env.pki))
            .await
            .unwrap();
    std::mem::replace(&mut h.demo.apiserver, placeholder)
        .shutdown()
        .await;

    // The client's watch ends (cleanly or with an error), promptly, and is released.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match body.frame().await {
                None | Some(Err(_)) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the watch outlived its upstream by 10s");
    for _ in 0..50 {
        if h.demo.gateway.gateway.streams.count() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(h.demo.gateway.gateway.streams.count(), 0, "stream leaked");

    // Meanwhile requests get a Status saying kube-apiserver is unavailable.
    let (code, _, text) = send(&client, get(&h.uri(PODS_A))).await;
    assert_eq!(code, 503, "{text}");
    assert_eq!(status_of(&text), (503, "ServiceUnavailable".to_string()));

    // It comes back on the same address: lists and watches work again, no restart needed.
    let back = ztgate_testkit::ApiServer::start(opts).await.unwrap();
    let start = Instant::now();
    loop {
        let (code, _, _) = send(&client, get(&h.uri(PODS_A))).await;
        if code == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no recovery");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let watch = client
        .request(get(&h.uri(&format!("{PODS_A}?watch=1"))))
        .await
        .unwrap();
    assert_eq!(watch.status(), 200);
    drop(watch);
    back.shutdown().await;
}

const DISCOVERY: &str = r#"
@id("discovery")
permit (principal, action == k8s::Action::"get", resource is k8s::NonResourceURL);
"#;
const TEAM_A: &str = r#"
@id("team-a")
permit (principal in k8s::Group::"team-a", action, resource in k8s::Namespace::"team-a");
"#;
const FORBID_A: &str = r#"
@id("freeze")
@reason("team-a is frozen")
forbid (principal, action, resource in k8s::Namespace::"team-a");
"#;
const BROKEN: &str = "permit (principal, action resource) when { ;\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_reload_storm_never_opens_what_no_policy_allows() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let file = policies.join("teams.cedar");
    std::fs::write(&file, format!("{DISCOVERY}{TEAM_A}")).unwrap();
    let h = Harness::start_with(DevSettings {
        policies: vec![policies.clone()],
        policy_reload_interval: "100ms",
        ..Default::default()
    })
    .await;
    let client = h.client(Some(&h.demo.env.pki.user("alice", &["team-a"])), true);
    assert_eq!(send(&client, get(&h.uri(PODS_A))).await.0, 200);

    // For 5 seconds the file flips every 20 ms between: the good set, a set that freezes
    // team-a, a broken file, an empty file, and a half-written good set.
    let storm = tokio::spawn(async move {
        let versions = [
            format!("{DISCOVERY}{TEAM_A}"),
            format!("{DISCOVERY}{TEAM_A}{FORBID_A}"),
            format!("{DISCOVERY}{TEAM_A}{BROKEN}"),
            String::new(),
            format!("{DISCOVERY}{TEAM_A}")[..DISCOVERY.len() + 30].to_owned(),
        ];
        let start = Instant::now();
        let mut i = 0;
        while start.elapsed() < Duration::from_secs(5) {
            std::fs::write(&file, &versions[i % versions.len()]).unwrap();
            i += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::fs::write(&file, &versions[0]).unwrap();
        i
    });

    let mut seen = std::collections::BTreeMap::new();
    while !storm.is_finished() {
        for path in [PODS_A, PODS_B] {
            let (code, _, text) = send(&client, get(&h.uri(path))).await;
            *seen.entry((path, code)).or_insert(0u32) += 1;
            match (path, code) {
                (PODS_A, 200) => {}
                (_, 403) => assert_eq!(status_of(&text).1, "Forbidden"),
                // No version of the policies ever allows team-b; the empty set denies all.
                _ => panic!("{path}: {code} during the reload storm: {text}"),
            }
        }
    }
    let writes = storm.await.unwrap();
    eprintln!("{writes} policy writes; answers {seen:?}");
    assert!(
        seen.contains_key(&(PODS_A, 403)),
        "the freeze never took effect: {seen:?}"
    );

    // After the storm the good set is in force.
    let start = Instant::now();
    loop {
        let (code, _, _) = send(&client, get(&h.uri(PODS_A))).await;
        if code == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the good set never returned"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(send(&client, get(&h.uri(PODS_B))).await.0, 403);
    assert!(h.demo.gateway.gateway.is_ready());
}
