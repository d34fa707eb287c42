//! When the gateway closes a live exec/attach session (here: a lock on the user), kubectl is told
//! why: the reason arrives as a `Status` on the session's error channel, over WebSocket and over
//! SPDY, and kubectl prints it and exits non-zero. A port-forward is just closed.

use crate::support;

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::{kubectl_command, send, Harness};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use ztgate::demo::DevSettings;

const POLICIES: &str = r#"
@id("discovery-read")
permit (principal, action == k8s::Action::"get", resource is k8s::NonResourceURL)
when { resource.path == "/api" || resource.path like "/api/*" || resource.path == "/apis" || resource.path like "/apis/*" || resource.path like "/openapi/*" || resource.path == "/version" };

@id("team-a-namespace")
permit (principal in k8s::Group::"team-a", action, resource in k8s::Namespace::"team-a");

@id("security-manages-locks")
permit (principal in k8s::Group::"security", action, resource is k8s::NonResourceURL)
when { resource.path like "/v1/locks*" };
"#;

const LOCK_MESSAGE: &str = "laptop reported stolen";

struct Fixture {
    h: Harness,
    _policies: tempfile::TempDir,
}

async fn start() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.cedar"), POLICIES).unwrap();
    let h = Harness::start_with(DevSettings {
        policies: vec![dir.path().join("p.cedar")],
        ..Default::default()
    })
    .await;
    Fixture { h, _policies: dir }
}

/// Locks user alice through `POST /v1/locks`, as a security admin.
async fn lock_alice(h: &Harness) -> Instant {
    let admin = h.demo.env.pki.user("sec-admin", &["security"]);
    let body = serde_json::json!({
        "target": {"kind": "user", "value": "alice"},
        "message": LOCK_MESSAGE,
    });
    let req = Request::post(h.uri("/v1/locks"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let locked_at = Instant::now();
    let (code, _, body) = send(&h.client(Some(&admin), false), req).await;
    assert_eq!(code, 201, "{body}");
    locked_at
}

/// What kubectl did after the lock: its exit status, its stderr, and how long after the lock it
/// exited.
struct Closed {
    status: ExitStatus,
    stderr: String,
    after_lock: Duration,
}

/// Runs an interactive kubectl session (`args`) whose stdin stays open, checks that it is live
/// (a line typed in comes back), locks alice, and waits for kubectl to exit.
async fn interactive_session_closed_by_lock(args: &[&str], env: &[(&str, &str)]) -> Closed {
    let f = start().await;
    let kc = f.h.kubeconfig("alice", &["team-a"]);
    let mut child = kubectl_command(&kc, args, env)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stderr_pipe = child.stderr.take().unwrap();
    let stderr_task = tokio::spawn(async move {
        let mut s = String::new();
        let _ = stderr_pipe.read_to_string(&mut s).await;
        s
    });

    // The session is live: what is typed comes back (the stand-in's container is `cat`).
    let echoed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            stdin.write_all(b"are you there\n").await.unwrap();
            stdin.flush().await.unwrap();
            match tokio::time::timeout(Duration::from_millis(500), stdout.next_line()).await {
                Ok(Ok(Some(line))) => return line,
                Ok(other) => panic!("kubectl ended before the session was live: {other:?}"),
                Err(_) => continue,
            }
        }
    })
    .await
    .expect("the session came up");
    assert_eq!(echoed, "are you there");

    let locked_at = lock_alice(&f.h).await;
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("kubectl exited after the lock")
        .unwrap();
    let after_lock = locked_at.elapsed();
    // stdin stays open until kubectl has exited: the close came from the gateway alone.
    drop(stdin);
    let stderr = stderr_task.await.unwrap();
    eprintln!(
        "kubectl {args:?} {env:?} exited {status} {after_lock:?} after the lock; stderr:\n{stderr}"
    );
    Closed {
        status,
        stderr,
        after_lock,
    }
}

fn assert_told_about_the_lock(c: &Closed) {
    assert!(!c.status.success(), "kubectl must fail: {}", c.stderr);
    let expected = format!("access is locked: {LOCK_MESSAGE}");
    assert!(
        c.stderr.lines().any(|l| l.contains(&expected)),
        "stderr: {}",
        c.stderr
    );
    // Not a connection error: the reason arrived as the session's outcome.
    for noise in ["broken pipe", "connection reset", "EOF", "next reader"] {
        assert!(!c.stderr.contains(noise), "stderr: {}", c.stderr);
    }
    // The session closes at once (typically well under a second, printed above); the bound
    // only catches a close that waits for something else, such as the client's stdin.
    assert!(c.after_lock < Duration::from_secs(5), "{:?}", c.after_lock);
}

const EXEC: &[&str] = &["exec", "-i", "web-0", "-n", "team-a", "--", "cat"];
const ATTACH: &[&str] = &["attach", "-i", "web-0", "-n", "team-a"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_exec_over_websocket_prints_the_lock_and_exits_non_zero() {
    let c = interactive_session_closed_by_lock(EXEC, &[]).await;
    assert_told_about_the_lock(&c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_exec_over_spdy_prints_the_lock_and_exits_non_zero() {
    let c =
        interactive_session_closed_by_lock(EXEC, &[("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")])
            .await;
    assert_told_about_the_lock(&c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_attach_over_websocket_prints_the_lock_and_exits_non_zero() {
    let c = interactive_session_closed_by_lock(ATTACH, &[]).await;
    assert_told_about_the_lock(&c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_attach_over_spdy_prints_the_lock_and_exits_non_zero() {
    let c = interactive_session_closed_by_lock(
        ATTACH,
        &[("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")],
    )
    .await;
    assert_told_about_the_lock(&c);
}

/// A port-forward has no error channel for the whole session: the gateway closes it and kubectl
/// reports the lost connection and exits.
async fn port_forward_closed_by_lock(env: &[(&str, &str)]) {
    let f = start().await;
    let kc = f.h.kubeconfig("alice", &["team-a"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
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
    // A live connection through it.
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    conn.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&buf, b"ping");

    lock_alice(&f.h).await;
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("kubectl port-forward exited after the lock")
        .unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    eprintln!("kubectl port-forward {env:?} exited {status}; stderr:\n{stderr}");
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("lost connection to pod"), "{stderr}");
    // The forwarded connection is gone too.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the forwarded connection was closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_port_forward_over_websocket_is_closed_by_a_lock() {
    port_forward_closed_by_lock(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_port_forward_over_spdy_is_closed_by_a_lock() {
    port_forward_closed_by_lock(&[("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false")]).await;
}

/// A WebSocket exec session carrying large messages when the lock lands: every message the
/// client receives is whole (the gateway finished the one in flight), and the session ends with
/// the Status on channel 3 and a normal close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_close_lands_between_whole_messages_while_large_output_streams() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message;

    const CHUNK: usize = 256 * 1024;
    let f = start().await;
    let alice = f.h.demo.env.pki.user("alice", &["team-a"]);
    let req = Request::get(
        f.h.uri("/api/v1/namespaces/team-a/pods/web-0/exec?command=cat&stdin=true&stdout=true"),
    )
    .header("connection", "Upgrade")
    .header("upgrade", "websocket")
    .header("sec-websocket-version", "13")
    .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
    .header("sec-websocket-protocol", "v5.channel.k8s.io")
    .body(Full::new(Bytes::new()))
    .unwrap();
    let resp = f.h.client(Some(&alice), false).request(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    let io = hyper::upgrade::on(resp).await.unwrap();
    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(io),
        Role::Client,
        None,
    )
    .await;
    let (mut tx, mut rx) = ws.split();
    // stdin: large messages, as fast as the session takes them; `cat` echoes each on stdout.
    let writer = tokio::spawn(async move {
        let mut msg = vec![0u8; CHUNK + 1];
        for i in 0..4096u32 {
            msg[1..5].copy_from_slice(&i.to_be_bytes());
            if tx.send(Message::Binary(msg.clone().into())).await.is_err() {
                return;
            }
        }
    });
    let mut stdout_messages = 0;
    let mut locked = false;
    let mut tail = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(m) = rx.next().await {
            let m = m.expect("every frame the client receives is well-formed");
            match &m {
                Message::Binary(b) if b.first() == Some(&1) && b.len() == 1 => {} // "connected"
                Message::Binary(b) if b.first() == Some(&1) => {
                    assert_eq!(b.len(), CHUNK + 1, "stdout messages arrive whole");
                    stdout_messages += 1;
                    if stdout_messages == 8 && !locked {
                        locked = true;
                        lock_alice(&f.h).await;
                    }
                }
                Message::Ping(_) | Message::Pong(_) => {}
                _ => tail.push(m),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the session ended");
    writer.abort();
    assert!(locked);
    assert_eq!(tail.len(), 2, "{tail:?}");
    let Message::Binary(status) = &tail[0] else {
        panic!("{tail:?}")
    };
    assert_eq!(status[0], 3, "the error channel");
    let v: serde_json::Value = serde_json::from_slice(&status[1..]).unwrap();
    assert_eq!(v["status"], "Failure");
    assert_eq!(v["reason"], "Forbidden");
    assert_eq!(v["code"], 403);
    assert_eq!(
        v["message"],
        format!("access is locked: {LOCK_MESSAGE}").as_str()
    );
    match &tail[1] {
        Message::Close(Some(c)) => assert_eq!(c.code, CloseCode::Normal),
        m => panic!("{m:?}"),
    }
}
