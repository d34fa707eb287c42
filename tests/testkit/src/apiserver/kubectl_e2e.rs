//! The stand-in against the real kubectl (a client certificate from the cluster CA, straight to
//! the stand-in). Ignored by default (needs `kubectl` on PATH):
//! `cargo test -p ztgate-testkit apiserver::kubectl_e2e -- --ignored`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use super::{ApiServer, ApiServerOptions};
use crate::pki::TestPki;

struct Env {
    dir: PathBuf,
    kubeconfig: PathBuf,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn env(pki: &TestPki, server: &ApiServer, name: &str) -> Env {
    let dir = std::env::temp_dir().join(format!(
        "ztgate-apiserver-kubectl-{name}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let alice = pki.cluster_ca.issue_client("alice", &["team-a"]);
    let (crt, key) = alice.write(&dir, "alice");
    let ca = dir.join("ca.crt");
    std::fs::write(&ca, pki.cluster_ca.cert_pem()).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: alice\n  user:\n    client-certificate: {}\n    client-key: {}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: alice\n    namespace: team-a\ncurrent-context: c\n",
            server.url(),
            ca.display(),
            crt.display(),
            key.display()
        ),
    )
    .unwrap();
    Env { dir, kubeconfig }
}

fn kubectl(env: &Env, args: &[&str]) -> Command {
    let mut c = Command::new("kubectl");
    c.arg("--kubeconfig")
        .arg(&env.kubeconfig)
        .arg("--cache-dir")
        .arg(env.dir.join("cache"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

async fn run(env: &Env, args: &[&str]) -> (bool, String, String) {
    let out = tokio::time::timeout(Duration::from_secs(30), kubectl(env, args).output())
        .await
        .expect("kubectl timed out")
        .expect("run kubectl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs kubectl on PATH"]
async fn kubectl_get_whoami_logs_forbidden() {
    let pki = TestPki::new();
    let server = ApiServer::start(ApiServerOptions::new(&pki)).await.unwrap();
    let env = env(&pki, &server, "get");

    let (ok, out, err) = run(&env, &["get", "pods"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("web-0") && out.contains("web-1") && out.contains("1/1"),
        "{out}"
    );

    let (ok, _, err) = run(&env, &["get", "pods", "-n", "team-b"]).await;
    assert!(!ok);
    assert!(
        err.contains(r#"Error from server (Forbidden): pods is forbidden: User "alice" cannot list resource "pods" in API group "" in the namespace "team-b""#),
        "{err}"
    );

    let (ok, out, err) = run(&env, &["auth", "whoami", "-o", "json"]).await;
    assert!(ok, "{err}");
    assert!(out.contains(r#""username": "alice""#), "{out}");

    let (ok, out, err) = run(&env, &["get", "ns"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("team-b") && out.contains("Active"), "{out}");

    let (ok, out, err) = run(&env, &["get", "pod", "web-0", "-o", "json"]).await;
    assert!(ok, "{err}");
    assert!(out.contains(r#""kind": "Pod""#), "{out}");

    let (ok, _, err) = run(&env, &["get", "pod", "nope"]).await;
    assert!(!ok);
    assert!(
        err.contains(r#"Error from server (NotFound): pods "nope" not found"#),
        "{err}"
    );

    let (ok, out, err) = run(&env, &["logs", "web-0"]).await;
    assert!(ok, "{err}");
    assert_eq!(out, "line 1\nline 2\nline 3\n");

    // logs -f streams until killed.
    let mut child = kubectl(&env, &["logs", "-f", "web-0"]).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for n in 1..=3 {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(line, format!("line {n}"));
    }
    let _ = child.kill().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs kubectl on PATH"]
async fn kubectl_watch_sees_new_pod() {
    let pki = TestPki::new();
    let server = ApiServer::start(ApiServerOptions::new(&pki)).await.unwrap();
    let env = env(&pki, &server, "watch");
    let mut child = kubectl(&env, &["get", "pods", "-w"]).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let mut created = false;
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push(line.clone());
            if line.starts_with("web-1") && !created {
                created = true;
                server.create_pod("team-a", "web-9");
            }
            if line.starts_with("web-9") {
                return true;
            }
        }
        false
    })
    .await;
    let _ = child.kill().await;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err).await;
    }
    assert_eq!(found, Ok(true), "stdout: {seen:?} stderr: {err}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs kubectl on PATH"]
async fn kubectl_exec_over_websocket_is_cat() {
    let pki = TestPki::new();
    let server = ApiServer::start(ApiServerOptions::new(&pki)).await.unwrap();
    let env = env(&pki, &server, "exec");
    let mut cmd = kubectl(&env, &["exec", "-i", "web-0", "--", "cat"]);
    cmd.stdin(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"hello from kubectl\n").await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("kubectl exec timed out")
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from kubectl\n");
    let upgrades: Vec<String> = server
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/exec"))
        .map(|r| r.header_values("upgrade").join(","))
        .collect();
    assert_eq!(upgrades, vec!["websocket"]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs kubectl on PATH"]
async fn kubectl_port_forward_over_websocket_tunnel() {
    let pki = TestPki::new();
    let server = ApiServer::start(ApiServerOptions::new(&pki)).await.unwrap();
    let env = env(&pki, &server, "pf");
    let mut child = kubectl(&env, &["port-forward", "pod/web-0", ":8080"])
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("no Forwarding line")
        .unwrap()
        .unwrap();
    // "Forwarding from 127.0.0.1:PORT -> 8080"
    let port: u16 = line
        .split_whitespace()
        .nth(2)
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    conn.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut buf))
        .await
        .expect("no echo")
        .unwrap();
    assert_eq!(&buf, b"ping");
    let _ = child.kill().await;
    let pf: Vec<String> = server
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/portforward"))
        .map(|r| r.header_values("sec-websocket-protocol").join(","))
        .collect();
    assert!(
        pf.iter().any(|p| p.contains("SPDY/3.1+portforward.k8s.io")),
        "{pf:?}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs kubectl on PATH"]
async fn kubectl_run_and_delete() {
    let pki = TestPki::new();
    let server = ApiServer::start(ApiServerOptions::new(&pki)).await.unwrap();
    let env = env(&pki, &server, "run");
    let (ok, out, err) = run(&env, &["run", "newpod", "--image=example/x:1"]).await;
    assert!(ok, "{out} {err}");
    assert!(out.contains("pod/newpod created"), "{out}");
    let (ok, _, err) = run(&env, &["run", "newpod", "--image=example/x:1"]).await;
    assert!(!ok);
    assert!(err.contains("AlreadyExists"), "{err}");
    let (ok, out, err) = run(&env, &["delete", "pod", "newpod", "--wait=false"]).await;
    assert!(ok, "{out} {err}");
    assert!(out.contains(r#"pod "newpod" deleted"#), "{out}");
    server.shutdown().await;
}
