//! The installed kubectl, through the gateway, against the stand-in kube-apiserver.
//! Each test is something a kubectl user does and sees.

use crate::support;

use std::time::{Duration, Instant};

use support::{kubectl_command, Harness};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_pods_in_own_namespace_works() {
    let h = Harness::start().await;
    let kc = h.kubeconfig("alice", &["team-a"]);
    let out = h.kubectl(&kc, &["get", "pods", "-n", "team-a"]).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("web-0"), "{stdout}");
    assert!(stdout.contains("Running"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_auth_whoami_shows_certificate_identity_through_impersonation() {
    let h = Harness::start().await;
    let kc = h.kubeconfig("alice", &["team-a", "devs"]);
    let out = h.kubectl(&kc, &["auth", "whoami", "-o", "json"]).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let info = &v["status"]["userInfo"];
    assert_eq!(info["username"], "alice");
    let groups: Vec<&str> = info["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_str().unwrap())
        .collect();
    assert_eq!(groups, ["team-a", "devs", "system:authenticated"]);
    // The stand-in saw the gateway's own identity, impersonating alice.
    let ssr = h
        .demo
        .apiserver
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/selfsubjectreviews"))
        .expect("SelfSubjectReview reached the stand-in");
    assert_eq!(
        ssr.authenticated_user.as_deref(),
        Some(ztgate_testkit::GATEWAY_USER)
    );
    assert_eq!(ssr.header_values("impersonate-user"), ["alice"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_sees_the_clusters_forbidden_for_another_namespace() {
    let h = Harness::start().await;
    let kc = h.kubeconfig("alice", &["team-a"]);
    let out = h.kubectl(&kc, &["get", "pods", "-n", "team-b"]).await;
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("Error from server (Forbidden)"), "{stderr}");
    assert!(
        stderr.contains(r#"User "alice" cannot list resource "pods""#),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_without_valid_certificate_must_log_in() {
    let h = Harness::start().await;
    let expired = h.demo.env.pki.expired_user("alice");
    let kc = h
        .demo
        .env
        .kubeconfig_with_cert(h.url(), "expired", &expired, "team-a");
    let before = h.demo.apiserver.requests().len();
    let out = h.kubectl(&kc, &["get", "pods"]).await;
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("You must be logged in to the server"),
        "{stderr}"
    );
    assert_eq!(
        h.demo.apiserver.requests().len(),
        before,
        "nothing reached the stand-in"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_watch_prints_a_pod_created_afterwards() {
    let h = Harness::start().await;
    let kc = h.kubeconfig("alice", &["team-a"]);
    let mut child = kubectl_command(&kc, &["get", "pods", "-n", "team-a", "-w"], &[])
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // The initial list comes first.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
            .await
            .expect("initial list in time")
            .unwrap()
            .expect("kubectl still running");
        if line.contains("web-1") {
            break;
        }
    }
    // Once kubectl's watch is live (the gateway holds it as a stream), create the pod.
    let streams = &h.demo.gateway.gateway.streams;
    support::wait_until(Duration::from_secs(20), "kubectl started watching", || {
        streams.count() != 0
    })
    .await;
    h.demo.apiserver.create_pod("team-a", "late-arrival");
    let created = Instant::now();
    // An event reaches kubectl at once (typically in milliseconds); the bound only catches an
    // event that is held back or lost.
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("kubectl still running");
            if line.contains("late-arrival") {
                return line;
            }
        }
    })
    .await
    .expect("the new pod was printed within 10 s");
    eprintln!("printed {:?} after the pod was created", created.elapsed());
    assert!(got.contains("late-arrival"));
    child.kill().await.ok();
}

async fn exec_echo(env: &[(&str, &str)]) {
    let h = Harness::start().await;
    let kc = h.kubeconfig("alice", &["team-a"]);
    let input = b"hello through the gateway\nsecond line\n";
    let out = h
        .kubectl_env(
            &kc,
            &["exec", "-i", "web-0", "-n", "team-a", "--", "cat"],
            env,
            Some(input),
        )
        .await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), text(input));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_exec_echoes_stdin_over_websocket() {
    exec_echo(&[("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "true")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_exec_echoes_stdin_over_spdy() {
    exec_echo(&[("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")]).await;
}

async fn port_forward_round_trip(env: &[(&str, &str)]) {
    let h = Harness::start().await;
    let kc = h.kubeconfig("alice", &["team-a"]);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mapping = format!("{port}:8080");
    let mut child = kubectl_command(
        &kc,
        &[
            "port-forward",
            "-n",
            "team-a",
            "pod/web-0",
            &mapping,
            "--address",
            "127.0.0.1",
        ],
        env,
    )
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("port-forward ready in time")
        .unwrap()
        .expect("kubectl printed a line");
    assert!(line.contains("Forwarding from"), "{line}");
    for round in 0..2 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let msg = format!("ping {round} through port-forward");
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
            .await
            .expect("echo in time")
            .unwrap();
        assert_eq!(text(&buf), msg);
    }
    child.kill().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_port_forward_carries_bytes_both_ways() {
    port_forward_round_trip(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_port_forward_over_spdy_carries_bytes_both_ways() {
    port_forward_round_trip(&[("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_logs_follow_streams_lines_as_they_come() {
    let h = Harness::start().await;
    let kc = h.kubeconfig("alice", &["team-a"]);
    let mut child = kubectl_command(&kc, &["logs", "-f", "web-0", "-n", "team-a"], &[])
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let start = Instant::now();
    while seen.len() < 5 {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("log line in time")
            .unwrap()
            .expect("kubectl still following");
        seen.push((line, start.elapsed()));
    }
    // Lines arrive one by one (the stand-in writes one every 200ms), not in one buffered lump.
    let spread = seen[4].1 - seen[0].1;
    assert!(
        spread >= Duration::from_millis(400),
        "lines arrived together: {seen:?}"
    );
    child.kill().await.ok();
}
