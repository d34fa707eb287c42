//! End-to-end tests of the stand-in over TLS with client certificates (HTTP/1.1, HTTP/2,
//! WebSocket).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use super::*;
use crate::pki::{CertKey, TestPki};

const TABLE_ACCEPT: &str = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";

fn client_config(
    pki: &TestPki,
    cert: Option<&CertKey>,
    alpn: &[&[u8]],
) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(pki.cluster_ca.cert_der()))
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match cert {
        Some(c) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from(c.cert_der.clone())],
                PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

async fn tls(server: &ApiServer, cfg: Arc<rustls::ClientConfig>) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(server.addr()).await.unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }
}

/// One request over HTTP/1.1.
async fn h1(
    server: &ApiServer,
    cfg: Arc<rustls::ClientConfig>,
    req: Request<Full<Bytes>>,
) -> Reply {
    let io = tls(server, cfg).await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = send.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

fn get(path: &str) -> http::request::Builder {
    Request::get(path).header("host", "localhost")
}

fn empty() -> Full<Bytes> {
    Full::new(Bytes::new())
}

async fn start(pki: &TestPki) -> ApiServer {
    ApiServer::start(ApiServerOptions::new(pki)).await.unwrap()
}

#[tokio::test]
async fn self_subject_review_with_impersonation_over_h2() {
    let pki = TestPki::new();
    let server = start(&pki).await;
    let io = tls(
        &server,
        client_config(&pki, Some(&pki.gateway_client), &[b"h2", b"http/1.1"]),
    )
    .await;
    assert_eq!(io.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::post(format!("{}/apis/authentication.k8s.io/v1/selfsubjectreviews", server.url()))
        .header("content-type", "application/json")
        .header("impersonate-user", "alice")
        .header("impersonate-group", "team-a")
        .header("impersonate-group", "devs")
        .header("impersonate-uid", "u-1")
        .header("impersonate-extra-acme.com%2Fdevice", "d-1")
        .body(Full::new(Bytes::from_static(
            br#"{"kind":"SelfSubjectReview","apiVersion":"authentication.k8s.io/v1","metadata":{"creationTimestamp":null},"status":{"userInfo":{}}}"#,
        )))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v["status"]["userInfo"],
        json!({
            "username": "alice",
            "uid": "u-1",
            "groups": ["team-a", "devs", "system:authenticated"],
            "extra": { "acme.com/device": ["d-1"] },
        })
    );
    let recs = server.requests();
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/apis/authentication.k8s.io/v1/selfsubjectreviews");
    assert_eq!(r.status, 201);
    assert_eq!(r.authenticated_user.as_deref(), Some("ztgate"));
    assert_eq!(r.effective_user.as_ref().unwrap().username, "alice");
    assert_eq!(r.header_values("Impersonate-Group"), vec!["team-a", "devs"]);
    server.shutdown().await;
}

#[tokio::test]
async fn rbac_and_authentication_over_http1() {
    let pki = TestPki::new();
    let server = start(&pki).await;
    let alice = pki.cluster_ca.issue_client("alice", &["team-a", "devs"]);
    let cfg = client_config(&pki, Some(&alice), &[b"http/1.1"]);

    let r = h1(
        &server,
        cfg.clone(),
        get("/api/v1/namespaces/team-b/pods").body(empty()).unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.headers["content-type"], "application/json");
    let v = r.json();
    assert_eq!(
        v["message"],
        r#"pods is forbidden: User "alice" cannot list resource "pods" in API group "" in the namespace "team-b""#
    );
    assert_eq!(v["reason"], "Forbidden");

    let r = h1(
        &server,
        cfg.clone(),
        get("/api/v1/namespaces/team-a/pods").body(empty()).unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["kind"], "PodList");
    assert_eq!(v["items"].as_array().unwrap().len(), 2);

    let r = h1(
        &server,
        cfg.clone(),
        get("/api/v1/namespaces/team-a/pods")
            .header("accept", TABLE_ACCEPT)
            .body(empty())
            .unwrap(),
    )
    .await;
    let v = r.json();
    assert_eq!(v["kind"], "Table");
    assert_eq!(v["rows"][1]["cells"][0], "web-1");

    let r = h1(
        &server,
        cfg.clone(),
        get("/api/v1/namespaces/team-a/pods/nope")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["message"], r#"pods "nope" not found"#);

    // The second O attribute is read as a group too.
    let r = h1(
        &server,
        cfg.clone(),
        Request::post("/apis/authentication.k8s.io/v1/selfsubjectreviews")
            .header("host", "localhost")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap(),
    )
    .await;
    assert_eq!(
        r.json()["status"]["userInfo"]["groups"],
        json!(["team-a", "devs", "system:authenticated"])
    );

    // alice may not impersonate.
    let r = h1(
        &server,
        cfg.clone(),
        get("/api/v1/namespaces/team-a/pods")
            .header("impersonate-user", "bob")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(
        r.json()["message"],
        r#"users "bob" is forbidden: User "alice" cannot impersonate resource "users" in API group "" at the cluster scope"#
    );

    // Groups without a user.
    let gw = client_config(&pki, Some(&pki.gateway_client), &[b"http/1.1"]);
    let r = h1(
        &server,
        gw.clone(),
        get("/api")
            .header("impersonate-group", "x")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    // The gateway itself has no resource rights.
    let r = h1(
        &server,
        gw.clone(),
        get("/api/v1/namespaces/team-a/pods").body(empty()).unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = h1(&server, gw, get("/api").body(empty()).unwrap()).await;
    assert_eq!(r.json()["versions"], json!(["v1"]));

    // No credentials: health only.
    let anon = client_config(&pki, None, &[b"http/1.1"]);
    let r = h1(&server, anon.clone(), get("/livez").body(empty()).unwrap()).await;
    assert_eq!((r.status, &r.body[..]), (StatusCode::OK, &b"ok"[..]));
    let r = h1(&server, anon.clone(), get("/api").body(empty()).unwrap()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["reason"], "Unauthorized");

    // A certificate from an unknown CA is not a credential.
    let stranger = pki.unknown_ca_user("mallory");
    let r = h1(
        &server,
        client_config(&pki, Some(&stranger), &[b"http/1.1"]),
        get("/api").body(empty()).unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    let statuses: Vec<u16> = server.requests().iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        vec![403, 200, 200, 404, 201, 403, 500, 403, 200, 200, 401, 401]
    );
    server.clear_requests();
    assert!(server.requests().is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn tokens_are_credentials() {
    let pki = TestPki::new();
    let mut opts = ApiServerOptions::new(&pki);
    opts.tokens.insert(
        "s3cret".into(),
        UserInfo {
            username: "carol".into(),
            groups: vec!["team-b".into()],
            ..Default::default()
        },
    );
    let server = ApiServer::start(opts).await.unwrap();
    let anon = client_config(&pki, None, &[b"http/1.1"]);
    let r = h1(
        &server,
        anon,
        get("/api/v1/namespaces/team-b/pods/db-0")
            .header("authorization", "Bearer s3cret")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["metadata"]["name"], "db-0");
    assert_eq!(
        server.requests()[0].authenticated_user.as_deref(),
        Some("carol")
    );
}

/// Reads body frames until one contains a full line.
async fn next_line(body: &mut hyper::body::Incoming, buf: &mut Vec<u8>) -> String {
    loop {
        if let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            return String::from_utf8(line).unwrap();
        }
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("timed out waiting for a chunk")
            .expect("stream ended")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
        }
    }
}

#[tokio::test]
async fn watch_sees_created_and_deleted_pods() {
    let pki = TestPki::new();
    let server = start(&pki).await;
    let alice = pki.cluster_ca.issue_client("alice", &["team-a"]);
    let cfg = client_config(&pki, Some(&alice), &[b"http/1.1"]);
    let list = h1(
        &server,
        cfg.clone(),
        get("/api/v1/namespaces/team-a/pods").body(empty()).unwrap(),
    )
    .await;
    let rv = list.json()["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();

    // A pod created between the list and the watch is replayed from the event history.
    server.create_pod("team-a", "early");

    // Plain watch from the list's resourceVersion: only newer events.
    let io = tls(&server, cfg.clone()).await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            get(&format!(
                "/api/v1/namespaces/team-a/pods?watch=true&resourceVersion={rv}"
            ))
            .body(empty())
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["transfer-encoding"], "chunked");
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    server.create_pod("team-b", "other");
    server.create_pod("team-a", "web-2");
    let ev: Value = serde_json::from_str(&next_line(&mut body, &mut buf).await).unwrap();
    assert_eq!(ev["object"]["metadata"]["name"], "early");
    let ev: Value = serde_json::from_str(&next_line(&mut body, &mut buf).await).unwrap();
    assert_eq!(ev["type"], "ADDED");
    assert_eq!(ev["object"]["metadata"]["name"], "web-2");
    server.delete_pod("team-a", "web-2");
    let ev: Value = serde_json::from_str(&next_line(&mut body, &mut buf).await).unwrap();
    assert_eq!(ev["type"], "DELETED");

    // Table watch from the start over HTTP/2, with a timeout.
    let io = tls(&server, client_config(&pki, Some(&alice), &[b"h2"])).await;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            Request::get(format!(
                "{}/api/v1/namespaces/team-a/pods?watch=1&timeoutSeconds=1",
                server.url()
            ))
            .header("accept", TABLE_ACCEPT)
            .body(empty())
            .unwrap(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let mut names = Vec::new();
    for _ in 0..3 {
        let ev: Value = serde_json::from_str(&next_line(&mut body, &mut buf).await).unwrap();
        assert_eq!(ev["type"], "ADDED");
        assert_eq!(ev["object"]["kind"], "Table");
        names.push(
            ev["object"]["rows"][0]["cells"][0]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(names, vec!["early", "web-0", "web-1"]);
    // The stream ends after timeoutSeconds.
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(f) = body.frame().await {
            f.unwrap();
        }
    })
    .await;
    assert!(end.is_ok());
    server.shutdown().await;
}

#[tokio::test]
async fn logs_follow_streams_lines() {
    let pki = TestPki::new();
    let server = start(&pki).await;
    let alice = pki.cluster_ca.issue_client("alice", &["team-a"]);
    let cfg = client_config(&pki, Some(&alice), &[b"http/1.1"]);
    let r = h1(
        &server,
        cfg.clone(),
        get("/api/v1/namespaces/team-a/pods/web-0/log")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(&r.body[..], b"line 1\nline 2\nline 3\n");

    let io = tls(&server, cfg).await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            get("/api/v1/namespaces/team-a/pods/web-0/log?follow=true")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    for n in 1..=3 {
        assert_eq!(next_line(&mut body, &mut buf).await, format!("line {n}\n"));
    }
    server.shutdown().await;
}

async fn ws_request(
    server: &ApiServer,
    cfg: Arc<rustls::ClientConfig>,
    path: &str,
    protocols: &str,
) -> Result<
    (
        tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    let io = tls(server, cfg).await;
    let mut req = format!("wss://localhost:{}{path}", server.addr().port())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", protocols.parse().unwrap());
    tokio_tungstenite::client_async(req, io).await
}

#[tokio::test]
async fn websocket_exec_echoes_stdin() {
    let pki = TestPki::new();
    let server = start(&pki).await;
    let alice = pki.cluster_ca.issue_client("alice", &["team-a"]);
    let cfg = client_config(&pki, Some(&alice), &[b"http/1.1"]);
    let path =
        "/api/v1/namespaces/team-a/pods/web-0/exec?command=sh&stdin=true&stdout=true&stderr=true";
    let (mut ws, resp) = ws_request(
        &server,
        cfg.clone(),
        path,
        "v5.channel.k8s.io, v4.channel.k8s.io, v3.channel.k8s.io, v2.channel.k8s.io, channel.k8s.io",
    )
    .await
    .unwrap();
    assert_eq!(
        resp.headers()["sec-websocket-protocol"],
        "v5.channel.k8s.io"
    );
    assert_eq!(server.active_connections(), 1);
    let hello = ws.next().await.unwrap().unwrap();
    assert_eq!(hello, Message::Binary(Bytes::from_static(&[1])));
    ws.send(Message::Binary(Bytes::from_static(b"\x00hello")))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Binary(Bytes::from_static(b"\x01hello"))
    );
    ws.send(Message::Binary(Bytes::from_static(
        b"\x04{\"Width\":80,\"Height\":24}",
    )))
    .await
    .unwrap();
    ws.send(Message::Binary(Bytes::from_static(&[255, 0])))
        .await
        .unwrap();
    let status = ws.next().await.unwrap().unwrap().into_data();
    assert_eq!(status[0], 3);
    let v: Value = serde_json::from_slice(&status[1..]).unwrap();
    assert_eq!(v["status"], "Success");
    assert!(matches!(ws.next().await, Some(Ok(Message::Close(_)))));
    drop(ws);

    // v4: the session ends when the client closes.
    let (mut ws, resp) = ws_request(&server, cfg.clone(), path, "v4.channel.k8s.io")
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["sec-websocket-protocol"],
        "v4.channel.k8s.io"
    );
    let _hello = ws.next().await.unwrap().unwrap();
    ws.send(Message::Binary(Bytes::from_static(b"\x00abc")))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap().into_data(),
        Bytes::from_static(b"\x01abc")
    );
    ws.close(None).await.unwrap();

    // team-b's pod: Forbidden before the upgrade, with the create verb.
    let err = ws_request(
        &server,
        cfg.clone(),
        "/api/v1/namespaces/team-b/pods/db-0/exec?command=sh&stdin=true",
        "v5.channel.k8s.io",
    )
    .await
    .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status(), StatusCode::FORBIDDEN);
            let v: Value = serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
            assert_eq!(
                v["message"],
                r#"pods "db-0" is forbidden: User "alice" cannot create resource "pods/exec" in API group "" in the namespace "team-b""#
            );
        }
        other => panic!("{other:?}"),
    }

    // Port-forward tunnelled over WebSocket is upgraded with the SPDY subprotocol.
    let (_ws, resp) = ws_request(
        &server,
        cfg,
        "/api/v1/namespaces/team-a/pods/web-0/portforward",
        "SPDY/3.1+portforward.k8s.io",
    )
    .await
    .unwrap();
    assert_eq!(
        resp.headers()["sec-websocket-protocol"],
        "SPDY/3.1+portforward.k8s.io"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn spdy_upgrade_negotiates_protocol() {
    let pki = TestPki::new();
    let server = start(&pki).await;
    let alice = pki.cluster_ca.issue_client("alice", &["team-a"]);
    let cfg = client_config(&pki, Some(&alice), &[b"http/1.1"]);
    let req = Request::post(
        "/api/v1/namespaces/team-a/pods/web-0/exec?command=sh&stdin=true&stdout=true",
    )
    .header("host", "localhost")
    .header("connection", "Upgrade")
    .header("upgrade", "SPDY/3.1")
    .header("x-stream-protocol-version", "v5.channel.k8s.io")
    .header("x-stream-protocol-version", "v4.channel.k8s.io")
    .header("x-stream-protocol-version", "v3.channel.k8s.io")
    .body(empty())
    .unwrap();
    let r = h1(&server, cfg.clone(), req).await;
    assert_eq!(r.status, StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(r.headers["x-stream-protocol-version"], "v4.channel.k8s.io");
    assert_eq!(r.headers["upgrade"], "SPDY/3.1");

    let req = Request::post("/api/v1/namespaces/team-a/pods/web-0/exec?command=sh&stdin=true")
        .header("host", "localhost")
        .header("connection", "Upgrade")
        .header("upgrade", "SPDY/3.1")
        .header("x-stream-protocol-version", "v9.channel.k8s.io")
        .body(empty())
        .unwrap();
    let r = h1(&server, cfg.clone(), req).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    let req = Request::post("/api/v1/namespaces/team-a/pods/nope/exec?command=sh&stdin=true")
        .header("host", "localhost")
        .header("connection", "Upgrade")
        .header("upgrade", "SPDY/3.1")
        .header("x-stream-protocol-version", "v4.channel.k8s.io")
        .body(empty())
        .unwrap();
    let r = h1(&server, cfg, req).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drops_connections_and_frees_the_port() {
    let pki = TestPki::new();
    let server = start(&pki).await;
    let addr = server.addr();
    let alice = pki.cluster_ca.issue_client("alice", &["team-a"]);
    let cfg = client_config(&pki, Some(&alice), &[b"http/1.1"]);
    let io = tls(&server, cfg.clone()).await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    let conn_task = tokio::spawn(conn);
    let resp = send
        .send_request(
            get("/api/v1/namespaces/team-a/pods?watch=1")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let _ = next_line(&mut body, &mut buf).await;
    assert_eq!(server.active_connections(), 1);

    server.shutdown().await;
    // The watch ends because the connection is gone.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = body.frame().await {}
    })
    .await;
    assert!(ended.is_ok());
    let _ = conn_task.await;
    assert!(TcpStream::connect(addr).await.is_err());

    let mut opts = ApiServerOptions::new(&pki);
    opts.addr = Some(addr);
    let again = ApiServer::start(opts).await.unwrap();
    assert_eq!(again.addr(), addr);
    let r = h1(&again, cfg, get("/readyz").body(empty()).unwrap()).await;
    assert_eq!(r.status, StatusCode::OK);
    again.shutdown().await;
}

#[tokio::test]
async fn response_delay_applies_to_plain_responses() {
    let pki = TestPki::new();
    let server = start(&pki).await;
    server.set_response_delay(Duration::from_millis(300));
    let anon = client_config(&pki, None, &[b"http/1.1"]);
    let t = tokio::time::Instant::now();
    let r = h1(&server, anon, get("/version").body(empty()).unwrap()).await;
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(r.json()["gitVersion"], "v1.32.0");
    server.shutdown().await;
}
