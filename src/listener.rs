//! The TLS listener: the accept loop, each client connection (TLS handshake, HTTP/1.1 and
//! HTTP/2, idle and shutdown handling) handed to the request [`pipeline`], the graceful
//! shutdown of connections, and the plain-HTTP operations listener (`/livez`, `/readyz`,
//! `/metrics`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::{full, Body};
use crate::config::GatewayConfig;
use crate::pipeline::{self, ConnInfo, Pipeline};
use crate::readiness::{plain, Readiness};
use crate::streams::Inflight;
use crate::telemetry::Metrics;

/// Accepts client connections until `shutdown`, then drains: refuses new requests, lets those
/// in flight finish within the grace period, closes streams and connections, flushes the audit
/// log and finally cancels `stop_background` (reloaders, probes).
pub async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    gw: Arc<Pipeline>,
    cfg: GatewayConfig,
    shutdown: CancellationToken,
    stop_background: CancellationToken,
) {
    let connections = Arc::new(Inflight::default());
    let conn_shutdown = CancellationToken::new();
    let cfg = Arc::new(cfg);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        tune_accepted(&tcp);
        let guard = connections.enter();
        let (gw, acceptor, cfg, conn_shutdown) = (
            gw.clone(),
            acceptor.clone(),
            cfg.clone(),
            conn_shutdown.clone(),
        );
        tokio::spawn(async move {
            let _guard = guard;
            serve_connection(tcp, peer, acceptor, gw, &cfg, conn_shutdown).await;
        });
    }
    drop(listener);
    let grace = cfg.timeouts.shutdown_grace.get();
    tracing::info!(
        grace_secs = grace.as_secs_f64(),
        inflight = gw.inflight.count(),
        streams = gw.streams.count(),
        "shutting down: no longer accepting"
    );
    gw.readiness.start_draining();
    // Ask idle keep-alive connections to close (HTTP/2 GOAWAY; HTTP/1.1 after the current response).
    conn_shutdown.cancel();
    if !gw.inflight.drain(grace).await {
        tracing::warn!(
            inflight = gw.inflight.count(),
            "grace period over with requests in flight"
        );
    }
    tracing::info!(streams = gw.streams.count(), "closing streams");
    gw.streams
        .close_all("the gateway is shutting down; reconnect");
    if !connections.drain(Duration::from_secs(5)).await {
        tracing::warn!(open = connections.count(), "connections still open at exit");
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), gw.auditor.flush()).await;
    stop_background.cancel();
    tracing::info!("shutdown complete");
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    gw: Arc<Pipeline>,
    cfg: &GatewayConfig,
    shutdown: CancellationToken,
) {
    let tls =
        match tokio::time::timeout(cfg.timeouts.tls_handshake.get(), acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        };
    let chain = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect());
    let conn = Arc::new(ConnInfo::new(peer, chain));
    let activity = ConnActivity::default();
    let svc = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let active = activity.begin();
            // Boxed: the pipeline's future is large, and hyper keeps each HTTP/2 stream's task
            // (sized for its largest state) for as long as the response body streams — a
            // watch would hold all of it for hours. Boxed, it is freed once the response
            // head is out, and spawning moves a pointer instead of the whole future.
            let handled = Box::pin(pipeline::handle(gw.clone(), conn.clone(), req));
            async move {
                let resp = handled.await?;
                Ok::<_, std::convert::Infallible>(resp.map(|body| ActiveBody {
                    body,
                    _active: active,
                }))
            }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.timeouts.header_read.get())
        .max_buf_size((cfg.limits.max_header_bytes as usize).max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(cfg.limits.max_concurrent_streams)
        // Rapid reset (CVE-2023-44487): streams a client opens and resets before they are
        // served; past this many at once the connection gets GOAWAY(ENHANCE_YOUR_CALM).
        .max_pending_accept_reset_streams(20)
        // Streams the client makes the server reset (CVE-2025-8671, "MadeYouReset").
        .max_local_error_reset_streams(1024)
        .max_header_list_size(cfg.limits.max_header_bytes.min(u32::MAX as u64) as u32)
        // No HTTP/2 PINGs from this side: a dead client is found by TCP keep-alive (see
        // `tune_accepted`), as kube-apiserver does. hyper's keep-alive polls its timer and
        // takes a lock with a clock read on every frame, ~1.5% of a request's CPU.
        .keep_alive_interval(None);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
    tokio::pin!(conn);
    // Shutdown and the idle timer are watched by a task of their own, which says which came
    // first on a one-shot channel: the connection's task wakes several times per request, and
    // polling a timer and a cancellation token on each wake-up (as a `select!` over all three
    // does) re-registers them every time; a one-shot receiver only checks a flag.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<ConnStop>();
    let watcher = {
        let activity = activity.clone();
        let (first, idle) = (
            cfg.timeouts.header_read.get(),
            cfg.timeouts.idle_connection.get(),
        );
        tokio::spawn(async move {
            let why = tokio::select! {
                _ = shutdown.cancelled() => ConnStop::Shutdown,
                _ = activity.idle(first, idle) => ConnStop::Idle,
            };
            let _ = stop_tx.send(why);
        })
    };
    tokio::select! {
        biased;
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        why = stop_rx => match why {
            Ok(ConnStop::Shutdown) | Err(_) => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
            Ok(ConnStop::Idle) => {
                tracing::debug!(%peer, "closing an idle connection");
                conn.as_mut().graceful_shutdown();
                // A client sitting on half-sent HTTP/2 headers does not get to keep it open.
                let _ = tokio::time::timeout(cfg.timeouts.header_read.get(), conn.as_mut()).await;
            }
        }
    }
    watcher.abort();
}

/// TCP keep-alive on an accepted connection: first probe after 30 s without traffic, then every
/// 10 s, closed after 3 unanswered (a peer gone without a FIN or RST is found within about a
/// minute; kube-apiserver, through Go's defaults, does the same with 15 s periods). No Nagle.
fn tune_accepted(tcp: &tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL)
        .with_retries(TCP_KEEPALIVE_PROBES);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "could not enable TCP keep-alive");
    }
}

const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE_PROBES: u32 = 3;

/// Why a connection's watcher asks it to close.
enum ConnStop {
    Shutdown,
    Idle,
}

/// Requests in progress on one client connection (and how many ever started), so that a
/// connection with nothing in progress — or one that never completes a request, which hyper's
/// header read timeout does not cover on HTTP/2 — is closed.
///
/// Plain atomics, looked at by the idle timer when it fires: a request costs two atomic updates
/// and a clock read, and never wakes the connection's task (a channel here woke it, and so
/// polled the whole HTTP/2 connection, twice per request).
#[derive(Clone)]
struct ConnActivity(Arc<ActivityState>);

struct ActivityState {
    active: AtomicUsize,
    started: AtomicU64,
    /// When the last request ended (or the connection opened), as an offset from `opened`.
    last_end_ms: AtomicU64,
    opened: Instant,
}

/// Counts one request as in progress until its response body is done or dropped.
struct ActiveGuard(Arc<ActivityState>);

impl Default for ConnActivity {
    fn default() -> ConnActivity {
        ConnActivity(Arc::new(ActivityState {
            active: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            last_end_ms: AtomicU64::new(0),
            opened: Instant::now(),
        }))
    }
}

impl ActivityState {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

impl ConnActivity {
    fn begin(&self) -> ActiveGuard {
        self.0.active.fetch_add(1, Ordering::AcqRel);
        self.0.started.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.0.clone())
    }

    /// Resolves once nothing has been in progress for `idle` (for `first` before any request
    /// started). Checked when the timer fires, so a connection closes at most one period late
    /// after a request that ended just before a check.
    async fn idle(&self, first: Duration, idle: Duration) {
        let st = &self.0;
        loop {
            let wait = if st.started.load(Ordering::Relaxed) == 0 {
                first
            } else {
                idle
            };
            if st.active.load(Ordering::Acquire) > 0 {
                tokio::time::sleep(wait).await;
                continue;
            }
            let quiet = Duration::from_millis(
                st.now_ms()
                    .saturating_sub(st.last_end_ms.load(Ordering::Acquire)),
            );
            if quiet >= wait {
                // A request may have begun since the load above; look once more.
                if st.active.load(Ordering::Acquire) == 0 {
                    return;
                }
                continue;
            }
            tokio::time::sleep(wait - quiet).await;
        }
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.last_end_ms.store(self.0.now_ms(), Ordering::Release);
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its connection counted as busy (watches, logs, exec) until the
/// body ends.
struct ActiveBody {
    body: Body,
    _active: ActiveGuard,
}

impl http_body::Body for ActiveBody {
    type Data = bytes::Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The operations listener (plain HTTP/1.1): `/livez`, `/healthz`, `/readyz` and `/metrics`.
pub async fn serve_ops(
    listener: TcpListener,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    loop {
        let tcp = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r { Ok((t, _)) => t, Err(_) => continue },
        };
        let (readiness, metrics) = (readiness.clone(), metrics.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (readiness, metrics) = (readiness.clone(), metrics.clone());
                async move {
                    let resp = match req.uri().path() {
                        "/livez" | "/healthz" => plain(StatusCode::OK, "ok"),
                        "/readyz" => readiness.readyz(),
                        "/metrics" => {
                            let mut r = Response::new(full(metrics.encode()));
                            r.headers_mut().insert(
                                http::header::CONTENT_TYPE,
                                HeaderValue::from_static(
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                ),
                            );
                            r
                        }
                        _ => plain(StatusCode::NOT_FOUND, "not found"),
                    };
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepted connections are watched by TCP keep-alive (the server sends no HTTP/2 PINGs).
    #[tokio::test]
    async fn accepted_connections_use_tcp_keepalive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let sock = socket2::SockRef::from(&tcp);
        assert!(!sock.keepalive().unwrap(), "off by default");
        tune_accepted(&tcp);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), TCP_KEEPALIVE_IDLE);
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            TCP_KEEPALIVE_INTERVAL
        );
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), TCP_KEEPALIVE_PROBES);
        assert!(tcp.nodelay().unwrap());
    }
}
