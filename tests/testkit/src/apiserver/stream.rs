//! Long-lived and upgraded responses: container logs (with follow), exec/attach over WebSocket
//! (`v5`…`v1` channel protocols; the "container" behaves like `cat`), SPDY/3.1 upgrades handed to
//! [`crate::spdy`], port-forward over WebSocket (`SPDY/3.1+portforward.k8s.io`, a SPDY byte
//! stream tunnelled in binary messages through [`WsByteStream`]).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::{stream, Sink, SinkExt, Stream, StreamExt};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::respond::{self, query_bool, Body, Streaming};
use super::{ConnGuard, Tasks};

/// The body of `GET …/pods/NAME/log`: `line N\n`; with follow one line every 200 ms, forever.
pub(crate) fn logs_body(follow: bool) -> Body {
    if !follow {
        return respond::full("line 1\nline 2\nline 3\n");
    }
    let s = stream::unfold(1u64, |n| async move {
        if n > 1 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let line = Bytes::from(format!("line {n}\n"));
        Some((Ok(Frame::data(line)), n + 1))
    });
    BodyExt::boxed(StreamBody::new(s))
}

/// Which pod subresource is being upgraded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sub {
    Exec,
    Attach,
    PortForward,
}

/// The channel protocols of remotecommand over WebSocket, newest first.
const WS_CHANNEL_PROTOCOLS: &[&str] = &[
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];
/// Port-forward tunnelled over WebSocket (kubectl 1.31+).
const WS_PORTFORWARD_TUNNEL: &str = "SPDY/3.1+portforward.k8s.io";
/// remotecommand protocols over SPDY.
const SPDY_EXEC_PROTOCOLS: &[&str] = &[
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];
const SPDY_PORTFORWARD_PROTOCOLS: &[&str] = &["portforward.k8s.io"];

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const CLOSE: u8 = 255;

fn header_tokens(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn has_token(headers: &HeaderMap, name: &str, token: &str) -> bool {
    header_tokens(headers, name)
        .iter()
        .any(|t| t.eq_ignore_ascii_case(token))
}

/// The first client protocol the server supports (kube's negotiation prefers the client order).
fn negotiate(client: &[String], server: &[&str]) -> Option<String> {
    client
        .iter()
        .find(|c| server.iter().any(|s| s == c))
        .cloned()
}

/// What the exec/attach caller asked for.
#[derive(Clone, Copy, Debug)]
struct StreamOpts {
    stdin: bool,
    stdout: bool,
    stderr: bool,
}

/// Answers an exec/attach/portforward request that has already been authorized and whose pod
/// exists: a WebSocket or SPDY/3.1 upgrade, or 400 when the request is not an upgrade.
pub(crate) fn upgrade<B>(
    req: &mut Request<B>,
    sub: Sub,
    query: &[(String, String)],
    tasks: &Tasks,
    guard: Arc<ConnGuard>,
) -> Response<Body> {
    let opts = StreamOpts {
        stdin: query_bool(query, "stdin"),
        stdout: query_bool(query, "stdout"),
        stderr: query_bool(query, "stderr"),
    };
    if sub != Sub::PortForward {
        if !(opts.stdin || opts.stdout || opts.stderr) {
            return respond::bad_request("you must specify at least 1 of stdin, stdout, stderr");
        }
        if sub == Sub::Exec && respond::query_get(query, "command").is_none() {
            return respond::bad_request("you must specify at least one command for the container");
        }
    }
    let headers = req.headers();
    if has_token(headers, "upgrade", "websocket") {
        websocket(req, sub, opts, tasks, guard)
    } else if has_token(headers, "upgrade", "spdy/3.1") {
        spdy(req, sub, tasks, guard)
    } else {
        respond::bad_request("Upgrade request required")
    }
}

fn switching(headers: &[(&'static str, String)]) -> Response<Body> {
    let mut resp = Response::new(respond::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    for (k, v) in headers {
        if let Ok(v) = HeaderValue::from_str(v) {
            resp.headers_mut().append(*k, v);
        }
    }
    resp.extensions_mut().insert(Streaming);
    resp
}

fn websocket<B>(
    req: &mut Request<B>,
    sub: Sub,
    opts: StreamOpts,
    tasks: &Tasks,
    guard: Arc<ConnGuard>,
) -> Response<Body> {
    let headers = req.headers();
    let Some(key) = headers
        .get("sec-websocket-key")
        .map(|k| k.as_bytes().to_vec())
    else {
        return respond::bad_request("missing Sec-WebSocket-Key");
    };
    if headers
        .get("sec-websocket-version")
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        let mut resp = respond::bad_request("unsupported websocket version");
        resp.headers_mut()
            .insert("sec-websocket-version", HeaderValue::from_static("13"));
        return resp;
    }
    let offered = header_tokens(headers, "sec-websocket-protocol");
    let chosen = match sub {
        Sub::PortForward => match negotiate(&offered, &[WS_PORTFORWARD_TUNNEL]) {
            Some(p) => Some(p),
            None => {
                return respond::bad_request(&format!(
                    "requested protocol(s) are not supported: {offered:?}; supports [{WS_PORTFORWARD_TUNNEL}]"
                ))
            }
        },
        _ if offered.is_empty() => None,
        _ => match negotiate(&offered, WS_CHANNEL_PROTOCOLS) {
            Some(p) => Some(p),
            None => {
                return respond::bad_request(&format!(
                    "requested protocol(s) are not supported: {offered:?}; supports {WS_CHANNEL_PROTOCOLS:?}"
                ))
            }
        },
    };
    let on_upgrade = hyper::upgrade::on(req);
    let protocol = chosen
        .clone()
        .unwrap_or_else(|| "channel.k8s.io".to_string());
    tasks.spawn(async move {
        let _guard = guard;
        let Some(io) = upgraded(on_upgrade).await else {
            return;
        };
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
        if sub == Sub::PortForward {
            if let Err(e) = crate::spdy::serve_portforward(WsByteStream::new(ws)).await {
                tracing::debug!("port-forward over websocket ended: {e}");
            }
        } else {
            cat_session(ws, &protocol, opts).await;
        }
    });
    let mut hs = vec![
        ("upgrade", "websocket".to_string()),
        ("connection", "Upgrade".to_string()),
        ("sec-websocket-accept", derive_accept_key(&key)),
    ];
    if let Some(p) = chosen {
        hs.push(("sec-websocket-protocol", p));
    }
    switching(&hs)
}

async fn upgraded(on: OnUpgrade) -> Option<TokioIo<hyper::upgrade::Upgraded>> {
    match on.await {
        Ok(u) => Some(TokioIo::new(u)),
        Err(e) => {
            tracing::debug!("upgrade failed: {e}");
            None
        }
    }
}

fn spdy<B>(req: &mut Request<B>, sub: Sub, tasks: &Tasks, guard: Arc<ConnGuard>) -> Response<Body> {
    let offered = header_tokens(req.headers(), "x-stream-protocol-version");
    let server = match sub {
        Sub::PortForward => SPDY_PORTFORWARD_PROTOCOLS,
        _ => SPDY_EXEC_PROTOCOLS,
    };
    let chosen = if offered.is_empty() {
        None
    } else {
        match negotiate(&offered, server) {
            Some(p) => Some(p),
            None => {
                let mut resp = respond::status(
                    403,
                    "Forbidden",
                    &format!(
                        "unable to upgrade: unable to negotiate protocol: client supports [{}], server accepts [{}]",
                        offered.join(" "),
                        server.join(" ")
                    ),
                    None,
                );
                if let Ok(v) = HeaderValue::from_str(&server.join(", ")) {
                    resp.headers_mut()
                        .insert("x-accepted-stream-protocol-versions", v);
                }
                return resp;
            }
        }
    };
    let on_upgrade = hyper::upgrade::on(req);
    let protocol = chosen
        .clone()
        .unwrap_or_else(|| server[server.len() - 1].to_string());
    tasks.spawn(async move {
        let _guard = guard;
        let Some(io) = upgraded(on_upgrade).await else {
            return;
        };
        let r = match sub {
            Sub::PortForward => crate::spdy::serve_portforward(io).await,
            _ => crate::spdy::serve_exec(io, &protocol).await,
        };
        if let Err(e) = r {
            tracing::debug!("spdy session ended: {e}");
        }
    });
    let mut hs = vec![
        ("connection", "Upgrade".to_string()),
        ("upgrade", "SPDY/3.1".to_string()),
    ];
    if let Some(p) = chosen {
        hs.push(("x-stream-protocol-version", p));
    }
    switching(&hs)
}

/// A close with status 1000: client-go reads a close without a status (1005) as an error.
fn normal_close() -> CloseFrame {
    CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }
}

fn frame(channel: u8, data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(channel);
    v.extend_from_slice(data);
    Message::Binary(Bytes::from(v))
}

/// A remotecommand session over WebSocket whose "container" is `cat`: stdin is echoed on
/// stdout. Ends when stdin is closed (v5 close signal) or the client goes away, with a Success
/// Status on the error channel (v4 and v5) and a normal close.
async fn cat_session<S>(mut ws: WebSocketStream<S>, protocol: &str, opts: StreamOpts)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let v5 = protocol == "v5.channel.k8s.io";
    let status_json = matches!(protocol, "v5.channel.k8s.io" | "v4.channel.k8s.io");
    // Like kube-apiserver: an empty message on the lowest writable channel says "connected".
    let hello = if opts.stdout {
        STDOUT
    } else if opts.stderr {
        STDERR
    } else {
        ERROR
    };
    if ws.send(frame(hello, &[])).await.is_err() {
        return;
    }
    if opts.stdin {
        while let Some(msg) = ws.next().await {
            let data = match msg {
                Ok(Message::Binary(b)) => b,
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => continue,
            };
            match data.first() {
                Some(&STDIN) if opts.stdout && data.len() > 1 => {
                    let sent = ws.send(frame(STDOUT, &data[1..])).await;
                    if sent.is_err() {
                        return;
                    }
                }
                Some(&CLOSE) if v5 && data.get(1) == Some(&STDIN) => break,
                _ => {} // resize and anything else: ignored
            }
        }
    }
    if status_json {
        let _ = ws
            .send(frame(ERROR, br#"{"metadata":{},"status":"Success"}"#))
            .await;
    }
    let _ = ws.close(Some(normal_close())).await;
}

/// A byte stream carried in WebSocket binary messages: reads are the concatenated payloads of
/// received messages, each write is sent as one binary message, shutdown sends a close.
pub struct WsByteStream<S> {
    ws: WebSocketStream<S>,
    pending: Bytes,
    eof: bool,
    close_sent: bool,
}

impl<S> WsByteStream<S> {
    pub fn new(ws: WebSocketStream<S>) -> Self {
        WsByteStream {
            ws,
            pending: Bytes::new(),
            eof: false,
            close_sent: false,
        }
    }
}

fn ws_err(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    io::Error::other(e)
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsByteStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.pending.is_empty() {
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(b))) => this.pending = b,
                Some(Ok(Message::Text(t))) => this.pending = Bytes::copy_from_slice(t.as_bytes()),
                Some(Ok(Message::Close(_))) | None => this.eof = true,
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(ws_err(e))),
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsByteStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let ws = &mut self.ws;
        ready!(Pin::new(&mut *ws).poll_ready(cx)).map_err(ws_err)?;
        Pin::new(&mut *ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(ws_err)?;
        // Push the message out eagerly; a pending flush completes on the next poll_flush.
        let _ = Pin::new(&mut *ws).poll_flush(cx);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(ws_err)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        use tokio_tungstenite::tungstenite::Error;
        let this = &mut *self;
        let r = (|| {
            if !this.close_sent {
                ready!(Pin::new(&mut this.ws).poll_ready(cx))?;
                Pin::new(&mut this.ws).start_send(Message::Close(Some(normal_close())))?;
                this.close_sent = true;
            }
            Pin::new(&mut this.ws).poll_flush(cx)
        })();
        match ready!(r) {
            Ok(()) | Err(Error::ConnectionClosed | Error::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(ws_err(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn negotiation_prefers_client_order() {
        let client: Vec<String> = ["v4.channel.k8s.io", "v5.channel.k8s.io", "channel.k8s.io"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            negotiate(&client, WS_CHANNEL_PROTOCOLS).as_deref(),
            Some("v4.channel.k8s.io")
        );
        assert_eq!(negotiate(&["x".to_string()], WS_CHANNEL_PROTOCOLS), None);
    }

    #[test]
    fn comma_joined_and_repeated_headers() {
        let mut h = HeaderMap::new();
        h.append(
            "x-stream-protocol-version",
            HeaderValue::from_static("v4.channel.k8s.io"),
        );
        h.append(
            "x-stream-protocol-version",
            HeaderValue::from_static("v3.channel.k8s.io, channel.k8s.io"),
        );
        assert_eq!(
            header_tokens(&h, "x-stream-protocol-version"),
            vec!["v4.channel.k8s.io", "v3.channel.k8s.io", "channel.k8s.io"]
        );
    }

    #[tokio::test]
    async fn ws_byte_stream_round_trip() {
        let (a, b) = tokio::io::duplex(4096);
        let server = WebSocketStream::from_raw_socket(a, Role::Server, None).await;
        let client = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
        let mut s = WsByteStream::new(server);
        let mut c = WsByteStream::new(client);
        c.write_all(b"hello ").await.unwrap();
        c.write_all(b"world").await.unwrap();
        c.flush().await.unwrap();
        let mut buf = [0u8; 11];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello world");
        s.write_all(b"back").await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"back");
    }
}
