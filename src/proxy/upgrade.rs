//! HTTP/1.1 upgrades (exec, attach, port-forward over WebSocket or SPDY/3.1).
//!
//! Each upgrade gets its own upstream connection, never taken from or returned to the pool, so a
//! refused or failed upgrade cannot leave a half-switched connection for another request. After
//! `101 Switching Protocols` on both sides, bytes are copied both ways until either side closes
//! or the stream is cancelled (shutdown, re-verification).

use std::net::IpAddr;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::forward::{Upstream, UpstreamError};
use super::headers;
use crate::authz::Authorized;
use crate::body::Body;
use crate::errors::PipelineError;
use crate::streams::StreamHandle;
use crate::telemetry::Metrics;

impl Upstream {
    async fn connect_http1(
        &self,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, UpstreamError> {
        let addr = format!("{}:{}", self.host, self.port);
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&addr))
            .await
            .map_err(|_| UpstreamError::Connect(format!("connect to {addr} timed out")))?
            .map_err(|e| UpstreamError::Connect(format!("connect to {addr}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        tokio::time::timeout(
            self.connect_timeout,
            self.upgrade_tls.connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| UpstreamError::Connect(format!("TLS handshake with {addr} timed out")))?
        .map_err(|e| UpstreamError::Connect(format!("TLS handshake with {addr}: {e}")))
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
            .map_err(|e| UpstreamError::Connect(format!("HTTP/1.1 handshake: {e}")))?;
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
        let cancel = stream.token();
        tokio::spawn(async move {
            let _stream = stream;
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
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            tokio::select! {
                r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                    match r {
                        Ok((up, down)) => {
                            metrics.stream_bytes(up, down);
                            tracing::debug!(bytes_up = up, bytes_down = down, "upgraded stream finished");
                        }
                        Err(e) => tracing::debug!(error = %e, "upgraded stream ended with an error"),
                    }
                }
                _ = cancel.cancelled() => {
                    use tokio::io::AsyncWriteExt;
                    tracing::info!("closing upgraded stream");
                    let _ = client.shutdown().await;
                    let _ = upstream.shutdown().await;
                }
            }
        });
        Ok(out)
    }
}
