//! End-to-end checks against the real kubectl (client-go + moby/spdystream), over plain HTTP on
//! loopback with a throwaway HTTP/1.1 front that only knows what kubectl asks for here.
//! Ignored by default (they need `kubectl` on PATH): `cargo test -p ztgate-testkit spdy -- --ignored`.

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

async fn serve_conn(stream: TcpStream) -> std::io::Result<()> {
    let mut io = BufReader::new(stream);
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            if io.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            if line == "\r\n" {
                break;
            }
            head.push(line.trim_end().to_string());
        }
        let request_line = head.first().cloned().unwrap_or_default();
        let get = |name: &str| {
            head.iter().skip(1).find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        let protocols: Vec<String> = head
            .iter()
            .skip(1)
            .filter_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.trim()
                    .eq_ignore_ascii_case("x-stream-protocol-version")
                    .then(|| v.trim().to_string())
            })
            .collect();
        if let Some(len) = get("content-length").and_then(|l| l.parse::<usize>().ok()) {
            let mut body = vec![0; len];
            io.read_exact(&mut body).await?;
        }
        let path = request_line.split(' ').nth(1).unwrap_or("").to_string();
        let path_only = path.split('?').next().unwrap_or("").to_string();
        let upgrade = get("upgrade").unwrap_or_default().to_ascii_lowercase();
        if upgrade.contains("spdy/3.1") {
            let is_exec = path_only.ends_with("/exec") || path_only.ends_with("/attach");
            let wanted = if is_exec {
                [
                    "v4.channel.k8s.io",
                    "v3.channel.k8s.io",
                    "v2.channel.k8s.io",
                    "channel.k8s.io",
                ]
                .into_iter()
                .find(|p| protocols.iter().any(|q| q == p))
                .unwrap_or("v4.channel.k8s.io")
            } else {
                "portforward.k8s.io"
            };
            eprintln!("front: SPDY upgrade {path_only} offered {protocols:?}, chose {wanted}");
            let resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: {wanted}\r\n\r\n"
            );
            io.write_all(resp.as_bytes()).await?;
            io.flush().await?;
            return if is_exec {
                super::serve_exec(io, wanted).await
            } else {
                super::serve_portforward(io).await
            };
        }
        let body = match path_only.as_str() {
            "/api" => json!({"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
            "/apis" => json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
            "/api/v1" => json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": [
                {"name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod",
                 "verbs": ["get", "list"], "shortNames": ["po"]},
                {"name": "pods/exec", "singularName": "", "namespaced": true, "kind": "PodExecOptions", "verbs": ["create", "get"]},
                {"name": "pods/portforward", "singularName": "", "namespaced": true, "kind": "PodPortForwardOptions", "verbs": ["create", "get"]}
            ]}),
            p if p.starts_with("/api/v1/namespaces/default/pods/") => json!({
                "kind": "Pod", "apiVersion": "v1",
                "metadata": {"name": "cat", "namespace": "default", "uid": "u-1"},
                "spec": {"containers": [{"name": "main", "image": "busybox"}]},
                "status": {"phase": "Running", "containerStatuses": [{"name": "main", "ready": true,
                    "restartCount": 0, "image": "busybox", "imageID": "", "state": {"running": {}}}]}
            }),
            _ => {
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound"})
            }
        };
        let code = if body["kind"] == "Status" {
            "404 Not Found"
        } else {
            "200 OK"
        };
        let body = body.to_string();
        let resp = format!(
            "HTTP/1.1 {code}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        io.write_all(resp.as_bytes()).await?;
        io.flush().await?;
    }
}

async fn start_front() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if let Err(e) = serve_conn(stream).await {
                    eprintln!("front: session error: {e}");
                }
            });
        }
    });
    format!("http://{addr}")
}

fn kubectl(server: &str) -> Command {
    let mut cmd = Command::new("kubectl");
    cmd.env("KUBECONFIG", "/dev/null")
        .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
        .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false")
        .arg(format!("--server={server}"))
        .arg("--namespace=default")
        .kill_on_drop(true);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs kubectl on PATH"]
async fn spdy_kubectl_exec_cat() {
    let server = start_front().await;
    let input: Vec<u8> = (0..200_000u32)
        .map(|i| b"abcdefghijklmnopqrstuvwxyz\n"[(i % 27) as usize])
        .collect();
    let mut child = kubectl(&server)
        .args(["exec", "-i", "cat", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feed = input.clone();
    tokio::spawn(async move {
        stdin.write_all(&feed).await.unwrap();
        drop(stdin);
    });
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("kubectl exec hung")
        .unwrap();
    eprintln!("stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "kubectl exec failed: {:?}",
        out.status
    );
    assert_eq!(out.stdout.len(), input.len());
    assert!(out.stdout == input);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs kubectl on PATH"]
async fn spdy_kubectl_exec_no_stdin() {
    let server = start_front().await;
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        kubectl(&server)
            .args(["exec", "cat", "--", "true"])
            .output(),
    )
    .await
    .expect("kubectl exec hung")
    .unwrap();
    eprintln!("stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "kubectl exec failed: {:?}",
        out.status
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs kubectl on PATH"]
async fn spdy_kubectl_port_forward_echo() {
    let server = start_front().await;
    let mut child = kubectl(&server)
        .args(["port-forward", "pod/cat", ":8080"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let port = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let line = lines.next_line().await.unwrap().expect("kubectl exited");
            eprintln!("kubectl: {line}");
            // "Forwarding from 127.0.0.1:PORT -> 8080"
            if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:") {
                return rest.split(' ').next().unwrap().parse::<u16>().unwrap();
            }
        }
    })
    .await
    .expect("kubectl port-forward did not start");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let one = |tag: u8| async move {
        let mut conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let msg: Vec<u8> = (0..100_000u32).map(|i| tag.wrapping_add(i as u8)).collect();
        let (mut rd, mut wr) = conn.split();
        let write = async {
            wr.write_all(&msg).await.unwrap();
            wr.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let read = rd.read_to_end(&mut got);
        let ((), r) = tokio::join!(write, read);
        r.unwrap();
        assert!(got == msg, "echo mismatch for {tag}: {} bytes", got.len());
    };
    tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(one(1), one(2), one(3));
        one(4).await;
    })
    .await
    .expect("port-forward echo hung");
    child.kill().await.unwrap();
}
