//! HTTP/1.1 upgrades (exec, attach, port-forward over WebSocket or SPDY/3.1).
//!
//! Each upgrade gets its own upstream connection, never taken from or returned to the pool, so a
//! refused or failed upgrade cannot leave a half-switched connection for another request. After
//! `101 Switching Protocols` on both sides, bytes are copied both ways until both sides have
//! closed, or the stream is cancelled (shutdown, re-verification, a lock).
//!
//! When the gateway closes an exec/attach session for a reason, the client is told why the way
//! kube-apiserver would tell it: the frame in flight towards the client is finished (for at most
//! [`CLOSE_GRACE`]), then a `Status` goes on the session's error channel and the session is
//! ended ([`super::frames`]). Port-forward and other upgrades are just closed.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::forward::Upstream;
use super::frames::{Framing, ServerFrames, SpdyFrames};
use super::headers;
use super::UpstreamError;
use crate::authz::Authorized;
use crate::body::Body;
use crate::refusal::PipelineError;
use crate::streams::{CloseReason, StreamHandle};
use crate::telemetry::Metrics;

impl Upstream {
    async fn connect_http1(
        &self,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, UpstreamError> {
        // The same words as the pooled path (`Upstream::classify`), whichever path failed.
        let addr = (self.host.as_str(), self.port);
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| self.unreachable("connection timed out"))?
            .map_err(|e| self.unreachable_by(e))?;
        let _ = tcp.set_nodelay(true);
        tokio::time::timeout(
            self.connect_timeout,
            self.upgrade_tls.connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| self.unreachable("TLS handshake timed out"))?
        .map_err(|e| self.unreachable_by(e))
    }

    /// Forwards an upgrade request on a dedicated HTTP/1.1 connection.
    pub async fn forward_upgrade(
        &self,
        mut req: Request<Body>,
        authorized: &Authorized,
        client_ip: IpAddr,
        stream: StreamHandle,
        metrics: std::sync::Arc<Metrics>,
    ) -> Result<Response<Body>, PipelineError> {
        let upgrade_to =
            req.headers()
                .get(header::UPGRADE)
                .cloned()
                .ok_or(PipelineError::BadRequest(
                    "upgrade request without Upgrade header".into(),
                ))?;
        let client_upgrade = hyper::upgrade::on(&mut req);
        let (mut parts, body) = req.into_parts();
        self.prepare_headers(&mut parts.headers, authorized, client_ip)?;
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        parts.headers.insert(header::UPGRADE, upgrade_to);
        parts.headers.insert(
            header::HOST,
            HeaderValue::from_str(self.authority().as_str())
                .map_err(|_| PipelineError::BadRequest("bad upstream authority".into()))?,
        );
        let body = self.limited_body(&parts.headers, body)?;
        parts.uri = parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/")
            .parse()
            .map_err(|_| PipelineError::BadRequest("bad request target".into()))?;
        parts.version = http::Version::HTTP_11;

        let tls = self.connect_http1().await?;
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake::<_, Body>(TokioIo::new(tls))
            .await
            .map_err(|e| self.unreachable(format_args!("HTTP/1.1 handshake failed: {e}")))?;
        // The connection task ends with this request: there is no pool to return it to.
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upgrade connection ended with an error");
            }
        });
        let mut resp = tokio::time::timeout(
            self.request_timeout,
            sender.send_request(Request::from_parts(parts, body)),
        )
        .await
        .map_err(|_| UpstreamError::Timeout)?
        .map_err(|e| UpstreamError::Protocol(format!("upgrade request failed: {e}")))?;
        drop(sender);

        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            // kube-apiserver refused the upgrade (403, 404, 400, ...): pass its answer on.
            headers::sanitize_response_headers(resp.headers_mut());
            let (parts, body) = resp.into_parts();
            return Ok(Response::from_parts(
                parts,
                body.map_err(|e| e.into()).boxed_unsync(),
            ));
        }

        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let mut out = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS);
        for (k, v) in resp.headers() {
            out = out.header(k, v);
        }
        let out = out
            .body(crate::body::empty())
            .map_err(|_| PipelineError::BadRequest("bad upgrade response".into()))?;
        let framing = super::frames::framing_for(stream.kind(), resp.headers());
        tokio::spawn(async move {
            let (client, upstream) = match tokio::join!(client_upgrade, upstream_upgrade) {
                (Ok(c), Ok(u)) => (c, u),
                (c, u) => {
                    tracing::warn!(
                        client_ok = c.is_ok(),
                        upstream_ok = u.is_ok(),
                        "upgrade did not complete"
                    );
                    return;
                }
            };
            let (up, down) = relay(
                TokioIo::new(client),
                TokioIo::new(upstream),
                framing,
                &stream,
            )
            .await;
            metrics.stream_bytes(up, down);
            tracing::debug!(bytes_up = up, bytes_down = down, "upgraded stream finished");
            drop(stream);
        });
        Ok(out)
    }
}

/// How long a close waits for the frame in flight to reach the client, and then for the client to
/// take the gateway's last frames and hang up, before it just drops the connection.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Read buffer per direction (one TLS record).
const RELAY_BUF: usize = 16 * 1024;

/// Copies both ways until both sides are done (each side's end of input is passed on as a
/// shutdown of the other's output), either side fails, or the stream is cancelled. Returns the
/// bytes forwarded (client to upstream, upstream to client).
async fn relay<C, U>(
    client: C,
    upstream: U,
    framing: Option<Framing>,
    stream: &StreamHandle,
) -> (u64, u64)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let cancel = stream.token();
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut upstream_rx, mut upstream_tx) = tokio::io::split(upstream);
    let (from_server, from_client) = match framing {
        Some(f) => (Some(f.from_server), f.from_client),
        None => (None, None),
    };
    let mut up = 0u64;
    let mut down = 0u64;
    let result = tokio::try_join!(
        client_to_upstream(
            &mut client_rx,
            &mut upstream_tx,
            from_client,
            &cancel,
            &mut up
        ),
        upstream_to_client(
            &mut upstream_rx,
            &mut client_tx,
            from_server,
            &cancel,
            stream,
            &mut down
        ),
    );
    let _ = tokio::time::timeout(CLOSE_GRACE, upstream_tx.shutdown()).await;
    if let Ok(((), Ended::ByGateway { told })) = &result {
        tracing::info!(
            kind = stream.kind().as_str(),
            told_client = *told,
            "closed upgraded stream"
        );
    }
    match result {
        Ok(((), Ended::ByGateway { told: true })) => {
            // The client was told why: let it read that and hang up, rather than reset a
            // connection it may still be sending on (pings, stdin), which could discard the
            // message before kubectl reads it.
            let drain = async {
                let mut buf = [0u8; 4096];
                while matches!(client_rx.read(&mut buf).await, Ok(n) if n > 0) {}
            };
            let _ = tokio::time::timeout(CLOSE_GRACE, drain).await;
        }
        Ok(_) => {
            let _ = tokio::time::timeout(CLOSE_GRACE, client_tx.shutdown()).await;
        }
        Err(e) => tracing::debug!(error = %e, "upgraded stream ended with an error"),
    }
    (up, down)
}

/// Client to kube-apiserver. On SPDY sessions the client's frames are followed to learn which
/// stream is the error stream. Stops at once when the stream is cancelled.
async fn client_to_upstream<R, W>(
    rx: &mut R,
    tx: &mut W,
    mut frames: Option<SpdyFrames<super::frames::ClientSide>>,
    cancel: &CancellationToken,
    total: &mut u64,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUF];
    loop {
        let n = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            r = rx.read(&mut buf) => r?,
        };
        if n == 0 {
            tx.shutdown().await?;
            return Ok(());
        }
        // Before the bytes go on: the error stream is known before kube-apiserver can answer.
        if let Some(f) = frames.as_mut() {
            f.advance(&buf[..n]);
        }
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            r = async {
                tx.write_all(&buf[..n]).await?;
                tx.flush().await
            } => r?,
        }
        *total += n as u64;
    }
}

/// How the upstream-to-client direction ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// kube-apiserver finished (its end passed on to the client), or the client went away.
    ByPeers,
    /// The gateway closed it; `told`: the client was sent why and should now hang up itself.
    ByGateway { told: bool },
}

/// kube-apiserver to the client.
///
/// On cancellation with a close reason and a known framing: the frame in flight is finished (the
/// bytes already read are written, then exactly up to the next boundary), the closing frames are
/// added, and the client's output is shut down; all of that within [`CLOSE_GRACE`], after which
/// the connection is just dropped. Without a reason or a framing it stops at once.
async fn upstream_to_client<R, W>(
    rx: &mut R,
    tx: &mut W,
    mut frames: Option<ServerFrames>,
    cancel: &CancellationToken,
    stream: &StreamHandle,
    total: &mut u64,
) -> io::Result<Ended>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUF];
    // Set once cancelled: when the close must be done by, and why it happens.
    let mut deadline: Option<Instant> = None;
    let mut why: Option<CloseReason> = None;
    // Bytes of the frame in flight forwarded after the cancellation, for the log.
    let mut finished = 0usize;
    let gave_up = Ok(Ended::ByGateway { told: false });
    loop {
        let n = match deadline {
            None => tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    deadline = Some(Instant::now() + CLOSE_GRACE);
                    continue;
                }
                r = rx.read(&mut buf) => r?,
            },
            Some(by) => {
                if why.is_none() {
                    why = stream.close_slot().close_reason();
                }
                let Some(f) = frames.as_ref().filter(|_| why.is_some()) else {
                    return gave_up;
                };
                if f.at_boundary() {
                    break;
                }
                match tokio::time::timeout_at(by, rx.read(&mut buf)).await {
                    Ok(r) => r?,
                    Err(_) => {
                        tracing::debug!(
                            "frame in flight not finished in time: closing without a message"
                        );
                        return gave_up;
                    }
                }
            }
        };
        if n == 0 {
            // kube-apiserver is done (mid-frame, if the gateway was closing): pass that on.
            tx.shutdown().await?;
            return Ok(match deadline {
                None => Ended::ByPeers,
                Some(_) => Ended::ByGateway { told: false },
            });
        }
        let send = match (deadline, frames.as_mut()) {
            (Some(_), Some(f)) => f.advance_to_boundary(&buf[..n]),
            (None, Some(f)) => {
                f.advance(&buf[..n]);
                n
            }
            (_, None) => n,
        };
        let closing = deadline.is_some();
        if !write_noticing_cancel(tx, &buf[..send], cancel, &mut deadline).await? {
            return gave_up;
        }
        if closing {
            finished += send;
        }
        *total += send as u64;
    }
    let (Some(why), Some(by)) = (why, deadline) else {
        return gave_up;
    };
    let Some(closing) = frames.as_ref().and_then(|f| f.closing(&why)) else {
        return gave_up;
    };
    let sent = tokio::time::timeout_at(by, async {
        tx.write_all(&closing).await?;
        tx.flush().await?;
        tx.shutdown().await
    })
    .await;
    match sent {
        Ok(Ok(())) => {
            tracing::debug!(
                reason = %why.message,
                finished_frame_bytes = finished,
                "told the client why its session was closed"
            );
            Ok(Ended::ByGateway { told: true })
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "could not tell the client why its session was closed");
            gave_up
        }
        Err(_) => {
            tracing::debug!("the client did not take the closing frames in time");
            gave_up
        }
    }
}

/// Writes all of `data` (bytes the frame tracker has already counted, so all must go out). A
/// cancellation meanwhile starts the close deadline; past it, gives up and returns false.
async fn write_noticing_cancel<W: AsyncWrite + Unpin>(
    tx: &mut W,
    data: &[u8],
    cancel: &CancellationToken,
    deadline: &mut Option<Instant>,
) -> io::Result<bool> {
    let mut off = 0;
    // All of `data` first, then a flush (off == len).
    loop {
        let step = async {
            if off < data.len() {
                tx.write(&data[off..]).await
            } else {
                tx.flush().await.map(|()| 0)
            }
        };
        // A write or flush that is still pending has done nothing, so dropping it loses no bytes.
        let n = match *deadline {
            None => tokio::select! {
                biased;
                r = step => r?,
                _ = cancel.cancelled() => {
                    *deadline = Some(Instant::now() + CLOSE_GRACE);
                    continue;
                }
            },
            Some(by) => match tokio::time::timeout_at(by, step).await {
                Ok(r) => r?,
                Err(_) => return Ok(false),
            },
        };
        if off == data.len() {
            return Ok(true);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        off += n;
    }
}
