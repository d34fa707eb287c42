//! Building the gateway from its config, the accept loops, readiness and graceful shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::authn::oidc::OidcAuthenticator;
use crate::authn::x509::X509Authenticator;
use crate::authz::cedar::PolicyEngine;
use crate::authz::Authorizer;
use crate::body::{full, Body};
use crate::config::jwt::TokenReviewConfig;
use crate::config::GatewayConfig;
use crate::config::SubjectAccessReviewConfig;
use crate::pipeline::{self, plain, ConnInfo};
use crate::proxy::forward::UpstreamSettings;
use crate::proxy::Upstream;
use crate::streams::{Inflight, StreamRegistry};
use crate::telemetry::Metrics;
use crate::tls::bundles::{Bundle, TrustBundles};
use crate::tls::reload::spawn_file_reloader;
use crate::tls::server::{server_config, ReloadingCert};
use crate::tls::upstream::{client_configs, ReloadingClientCert, ReloadingServerVerifier};
use crate::tls::{pem, TlsError};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("upstream: {0}")]
    Upstream(String),
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// Everything a request needs, built once from the config (never re-parsed per request).
pub struct Gateway {
    pub upstream: Upstream,
    /// Locks and posture records.
    pub store: crate::state::SharedStore,
    pub auditor: Arc<crate::audit::Auditor>,
    pub x509: Option<X509Authenticator>,
    /// Always present; with no issuers configured it authenticates nothing, and a config
    /// reload may add issuers without a restart.
    pub oidc: Arc<OidcAuthenticator>,
    /// The web login pages (`sso` in the config); they verify with `oidc`.
    pub sso: Option<Arc<crate::sso::Sso>>,
    pub bundles: Arc<TrustBundles>,
    pub token_review: Option<TokenReviewConfig>,
    pub devices: Option<crate::device::DeviceConfig>,
    /// SPIFFE trust domains whose workload SVIDs authenticate as users.
    pub workloads: Vec<crate::device::WorkloadMapping>,
    /// Device posture (records, signed reports, the pull provider), when configured.
    pub posture: Option<Arc<crate::posture::PostureService>>,
    pub sar: Option<SubjectAccessReviewConfig>,
    /// The one decider: locks, posture and policy for requests, streams and reviews.
    pub decider: crate::decide::Decider,
    pub metrics: Arc<Metrics>,
    pub streams: Arc<StreamRegistry>,
    pub inflight: Arc<Inflight>,
    pub inflight_limit: Arc<Semaphore>,
    pub request_timeout: Duration,
    /// Live streams are closed this long after they opened (None: no limit).
    pub max_stream_age: Option<Duration>,
    /// The cluster's API resources, read as the gateway (`kubectl auth can-i --list`).
    pub discovery: crate::discovery::DiscoveryCache,
    upstream_ready: AtomicBool,
    upstream_status: ArcSwap<String>,
    draining: AtomicBool,
    /// Cancelled at the end of shutdown: stops reloaders and probes.
    background: CancellationToken,
}

impl Gateway {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Called when a request could not connect upstream, so `/readyz` reflects it at once
    /// rather than at the next probe.
    pub fn upstream_unreachable(&self, why: &str) {
        if self.upstream_ready.swap(false, Ordering::Relaxed) {
            tracing::warn!(error = why, "upstream unreachable; not ready");
        }
        self.upstream_status.store(Arc::new(why.to_owned()));
    }

    fn issuers_not_loaded(&self) -> Vec<String> {
        self.oidc.not_loaded()
    }

    pub fn is_ready(&self) -> bool {
        !self.is_draining()
            && self.upstream_ready.load(Ordering::Relaxed)
            && self.issuers_not_loaded().is_empty()
            && self.store.health().is_current()
    }

    /// `/readyz`, in kube-apiserver's verbose style.
    pub fn readyz(&self) -> Response<Body> {
        if self.is_ready() {
            return plain(StatusCode::OK, "ok");
        }
        let mut text = String::from("[+]config ok\n");
        if self.is_draining() {
            text.push_str("[-]shutdown: draining\n");
        }
        if !self.upstream_ready.load(Ordering::Relaxed) {
            text.push_str(&format!("[-]upstream: {}\n", self.upstream_status.load()));
        }
        // Without the reason (it names etcd members); the log has it.
        match self.store.health() {
            crate::state::StoreHealth::Current => {}
            crate::state::StoreHealth::Lagging {
                unconfirmed_for, ..
            } => text.push_str(&format!(
                "[-]state store: not confirmed current for {}s\n",
                unconfirmed_for.as_secs()
            )),
            crate::state::StoreHealth::Stale {
                unconfirmed_for, ..
            } => text.push_str(&format!(
                "[-]state store: stale for {}s, failing closed\n",
                unconfirmed_for.as_secs()
            )),
        }
        for issuer in self.issuers_not_loaded() {
            text.push_str(&format!("[-]oidc issuer {issuer}: keys not loaded yet\n"));
        }
        text.push_str("readyz check failed\n");
        let mut resp = Response::new(full(text));
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        resp
    }
}

/// A running gateway.
pub struct RunningGateway {
    pub addr: SocketAddr,
    pub ops_addr: Option<SocketAddr>,
    pub gateway: Arc<Gateway>,
    shutdown: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl RunningGateway {
    /// Starts a graceful shutdown: stop accepting, let in-flight requests finish for the grace
    /// period, then close streams.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits until the gateway has stopped.
    pub async fn wait(self) {
        let _ = self.done.await;
    }
}

fn load_token(path: &std::path::Path, bytes: &[u8]) -> Result<HeaderValue, String> {
    let token = std::str::from_utf8(bytes)
        .map_err(|_| format!("{}: token is not UTF-8", path.display()))?
        .trim();
    if token.is_empty() {
        return Err(format!("{}: token file is empty", path.display()));
    }
    let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| format!("{}: token is not a valid header value", path.display()))?;
    v.set_sensitive(true);
    Ok(v)
}

/// Builds the gateway from a validated config and starts serving.
pub async fn start(cfg: GatewayConfig) -> Result<RunningGateway, StartError> {
    let stop = CancellationToken::new();
    let reload = cfg.listener.reload_interval.get();

    // Serving certificate, re-read on rotation.
    let sc = &cfg.listener.serving_certificate;
    let serving = ReloadingCert::new(pem::certified_key(
        &sc.cert_file,
        &pem::read(&sc.cert_file)?,
        &sc.key_file,
        &pem::read(&sc.key_file)?,
    )?);
    {
        let serving = serving.clone();
        let (cp, kp) = (sc.cert_file.clone(), sc.key_file.clone());
        spawn_file_reloader(
            "serving certificate",
            vec![cp.clone(), kp.clone()],
            reload,
            stop.clone(),
            move |files| {
                let ck = pem::certified_key(&cp, &files[0], &kp, &files[1])
                    .map_err(|e| e.to_string())?;
                serving.store(ck);
                Ok(())
            },
        );
    }

    // Client-certificate trust bundles.
    let mut bundles = Vec::new();
    for b in &cfg.listener.client_certificate_bundles {
        bundles.push(Bundle::from_pem(
            &b.name,
            &b.ca_file,
            &pem::read(&b.ca_file)?,
        )?);
    }
    let bundles = Arc::new(TrustBundles::new(bundles));
    for b in &cfg.listener.client_certificate_bundles {
        let bundles = bundles.clone();
        let (name, path) = (b.name.clone(), b.ca_file.clone());
        spawn_file_reloader(
            "client CA bundle",
            vec![path.clone()],
            reload,
            stop.clone(),
            move |files| {
                bundles
                    .replace(Bundle::from_pem(&name, &path, &files[0]).map_err(|e| e.to_string())?);
                Ok(())
            },
        );
    }
    let x509 = cfg
        .authentication
        .x509
        .as_ref()
        .map(|x| X509Authenticator::new(x.bundle.clone(), bundles.clone()));

    // Upstream TLS material.
    let up = &cfg.upstream;
    let ca_roots = pem::certs_from_pem(&up.ca_file, &pem::read(&up.ca_file)?)?;
    let verifier = ReloadingServerVerifier::new(ca_roots)?;
    {
        let verifier = verifier.clone();
        let path = up.ca_file.clone();
        spawn_file_reloader(
            "upstream CA",
            vec![path.clone()],
            reload,
            stop.clone(),
            move |files| {
                let roots = pem::certs_from_pem(&path, &files[0]).map_err(|e| e.to_string())?;
                verifier.replace(roots).map_err(|e| e.to_string())
            },
        );
    }
    let client_cert = match &up.client_certificate {
        Some(cc) => {
            let ck = pem::certified_key(
                &cc.cert_file,
                &pem::read(&cc.cert_file)?,
                &cc.key_file,
                &pem::read(&cc.key_file)?,
            )?;
            let rc = ReloadingClientCert::new(Some(ck));
            let r = rc.clone();
            let (cp, kp) = (cc.cert_file.clone(), cc.key_file.clone());
            spawn_file_reloader(
                "upstream client certificate",
                vec![cp.clone(), kp.clone()],
                reload,
                stop.clone(),
                move |files| {
                    r.store(
                        pem::certified_key(&cp, &files[0], &kp, &files[1])
                            .map_err(|e| e.to_string())?,
                    );
                    Ok(())
                },
            );
            rc
        }
        None => ReloadingClientCert::new(None),
    };
    let token = match &up.token_file {
        Some(path) => {
            let bytes = pem::read(path)?;
            let v = load_token(path, &bytes).map_err(StartError::Upstream)?;
            let cell = Arc::new(ArcSwap::from_pointee(Some(v)));
            let c = cell.clone();
            let p = path.clone();
            spawn_file_reloader(
                "upstream token",
                vec![p.clone()],
                reload,
                stop.clone(),
                move |files| {
                    c.store(Arc::new(Some(load_token(&p, &files[0])?)));
                    Ok(())
                },
            );
            Some(cell)
        }
        None => None,
    };
    let (pooled_tls, upgrade_tls) = client_configs(verifier, client_cert)?;
    let url: http::Uri = up
        .url
        .parse()
        .map_err(|e| StartError::Upstream(format!("url {:?}: {e}", up.url)))?;
    let upstream = Upstream::new(UpstreamSettings {
        url,
        server_name: up.server_name.clone(),
        pooled_tls,
        upgrade_tls,
        token,
        connect_timeout: cfg.timeouts.upstream_connect.get(),
        request_timeout: cfg.timeouts.request.get(),
        max_body: cfg.limits.max_request_body_bytes,
    })
    .map_err(StartError::Upstream)?;

    let oidc = OidcAuthenticator::new(&cfg.authentication.jwt, stop.clone())
        .await
        .map_err(|e| StartError::Config(e.to_string()))?;
    let sso = crate::sso::Sso::from_config(&cfg).map_err(StartError::Config)?;

    let auditor = match &cfg.audit {
        Some(a) => crate::audit::Auditor::start(a, stop.clone())
            .await
            .map_err(|e| StartError::Config(format!("audit: {e}")))?,
        None => crate::audit::Auditor::disabled(),
    };

    let store: crate::state::SharedStore = match &cfg.state {
        // --- state.etcd ---
        Some(crate::config::StateConfig {
            etcd: Some(etcd), ..
        }) => {
            let store = crate::state::EtcdStore::connect(etcd)
                .await
                .map_err(|e| StartError::Config(format!("state.etcd: {e}")))?;
            store.spawn_tls_reloaders(etcd, reload, stop.clone());
            Arc::new(store)
        }
        // --- end state.etcd ---
        Some(crate::config::StateConfig {
            directory: Some(dir),
            ..
        }) => {
            let dir = dir.clone();
            let fs = tokio::task::spawn_blocking(move || {
                crate::state::FileStore::open(&dir, crate::state::FileStoreOptions::default())
            })
            .await
            .map_err(|e| StartError::Config(format!("state: {e}")))?
            .map_err(|e| StartError::Config(format!("state.directory: {e}")))?;
            Arc::new(fs)
        }
        _ => {
            tracing::warn!("no state.directory configured: locks and posture are kept in memory and lost on restart");
            Arc::new(crate::state::MemoryStore::new())
        }
    };

    let mut metrics = Metrics::new();
    if auditor.is_enabled() {
        metrics.register_audit(auditor.clone());
    }
    let metrics = Arc::new(metrics);
    let streams = StreamRegistry::new(metrics.clone());
    tokio::spawn(streams.clone().run_reverifier(stop.clone()));
    let authorizer = match &cfg.authorization {
        Some(a) => {
            let engine = Arc::new(
                PolicyEngine::load(&a.policies).map_err(|e| StartError::Config(e.to_string()))?,
            );
            tracing::info!(
                policies = engine.policy_count(),
                epoch = engine.epoch(),
                "policies loaded"
            );
            metrics.policy_loaded(engine.epoch(), engine.policy_count());
            spawn_policy_reloader(
                engine.clone(),
                a.policies.clone(),
                a.reload_interval.get(),
                metrics.clone(),
                streams.clone(),
                stop.clone(),
            );
            Authorizer::with_policy(engine)
        }
        None => {
            tracing::warn!("no authorization.policies configured: the gateway authorizes nothing itself; kube-apiserver RBAC decides");
            Authorizer::delegated()
        }
    };
    let posture = match cfg
        .authentication
        .devices
        .as_ref()
        .and_then(|d| d.posture.clone())
    {
        Some(p) => Some(Arc::new(
            crate::posture::PostureService::new(p, stop.clone(), Default::default())
                .await
                .map_err(|e| StartError::Config(format!("authentication.devices.posture: {e}")))?,
        )),
        None => None,
    };
    let gw = Arc::new(Gateway {
        workloads: cfg.authentication.workloads.clone(),
        posture: posture.clone(),
        store: store.clone(),
        upstream,
        auditor,
        x509,
        oidc,
        sso,
        bundles: bundles.clone(),
        token_review: cfg.authentication.token_review.clone(),
        devices: cfg.authentication.devices.clone(),
        sar: cfg
            .authorization
            .as_ref()
            .and_then(|a| a.subject_access_review.clone())
            .map(|mut sar| {
                let own = cfg
                    .upstream
                    .client_certificate
                    .as_ref()
                    .and_then(|c| crate::webhook::upstream_user(&c.cert_file));
                sar.gateway_users.extend(own);
                sar
            }),
        decider: crate::decide::Decider::new(store.clone(), posture.clone(), authorizer),
        streams,
        metrics,
        inflight: Arc::new(Inflight::default()),
        inflight_limit: Arc::new(Semaphore::new(cfg.limits.max_inflight_requests as usize)),
        max_stream_age: Some(cfg.timeouts.max_stream_age.get()).filter(|d| !d.is_zero()),
        request_timeout: cfg.timeouts.request.get(),
        discovery: crate::discovery::DiscoveryCache::new(crate::discovery::TTL),
        upstream_ready: AtomicBool::new(false),
        upstream_status: ArcSwap::from_pointee("not probed yet".to_string()),
        draining: AtomicBool::new(false),
        background: stop.clone(),
    });

    spawn_readiness_probe(gw.clone(), cfg.upstream.health_path.clone(), stop.clone());
    crate::locks::spawn_enforcer(gw.clone(), stop.clone());

    let listener = TcpListener::bind(&cfg.listener.address)
        .await
        .map_err(|source| StartError::Listen {
            addr: cfg.listener.address.clone(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: cfg.listener.address.clone(),
        source,
    })?;
    let ops = match &cfg.operations.address {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .map_err(|source| StartError::Listen {
                    addr: a.clone(),
                    source,
                })?,
        ),
        None => None,
    };
    let ops_addr = ops.as_ref().and_then(|l| l.local_addr().ok());
    if let Some(ops) = ops {
        tokio::spawn(serve_ops(ops, gw.clone(), stop.clone()));
    }

    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(serving)?));
    let shutdown = CancellationToken::new();
    let done = tokio::spawn(accept_loop(
        listener,
        acceptor,
        gw.clone(),
        cfg.clone(),
        shutdown.clone(),
        stop,
    ));
    tracing::info!(%addr, upstream = %cfg.upstream.url, "ztgate listening");
    Ok(RunningGateway {
        addr,
        ops_addr,
        gateway: gw,
        shutdown,
        done,
    })
}

/// Wakes a reloader every `interval`, or at once on SIGHUP.
struct ReloadTick {
    interval: Duration,
    hup: Option<tokio::signal::unix::Signal>,
}

impl ReloadTick {
    fn new(interval: Duration) -> ReloadTick {
        ReloadTick {
            interval,
            hup: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
        }
    }

    /// `Some(true)` on SIGHUP (reload even if nothing seems changed), `Some(false)` on the
    /// timer, `None` when `stop` is cancelled.
    async fn next(&mut self, stop: &CancellationToken) -> Option<bool> {
        let hup = async {
            match self.hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => None,
            _ = tokio::time::sleep(self.interval) => Some(false),
            _ = hup => Some(true),
        }
    }
}

/// Watches the config file (every `interval`, and on SIGHUP) and applies what can change
/// without a restart: the OIDC issuer list. A config that does not validate is refused whole
/// and the running one stays; settings that need a restart are reported.
pub fn spawn_config_reloader(gw: Arc<Gateway>, path: std::path::PathBuf, interval: Duration) {
    tokio::spawn(async move {
        let mut last = std::fs::read(&path).ok();
        let mut current = crate::config::load_file(&path).ok();
        let mut tick = ReloadTick::new(interval);
        loop {
            let forced = match tick.next(&gw.background).await {
                Some(forced) => forced,
                None => return,
            };
            let bytes = tokio::fs::read(&path).await.ok();
            if !forced && bytes == last {
                continue;
            }
            last = bytes;
            let cfg = match crate::config::load_file(&path) {
                Ok(c) => c,
                Err(errs) => {
                    tracing::error!(errors = %errs, "config reload refused; keeping the running config");
                    gw.metrics.config_reload(false);
                    continue;
                }
            };
            if let Some(old) = &current {
                if old.listener.address != cfg.listener.address
                    || old.upstream.url != cfg.upstream.url
                {
                    tracing::warn!(
                        "listener.address and upstream.url changes need a restart; not applied"
                    );
                }
            }
            match gw.oidc.update(&cfg.authentication.jwt).await {
                Ok(()) => {
                    tracing::info!(issuers = cfg.authentication.jwt.len(), "config reloaded");
                    gw.metrics.config_reload(true);
                    current = Some(cfg);
                }
                Err(e) => {
                    tracing::error!(error = %e, "config reload refused; keeping the running config");
                    gw.metrics.config_reload(false);
                }
            }
        }
    });
}

/// Re-reads the policy files every `interval` and on SIGHUP; a changed set is validated whole and
/// swapped atomically, an invalid one is refused and the last good set stays.
fn spawn_policy_reloader(
    engine: Arc<PolicyEngine>,
    paths: Vec<std::path::PathBuf>,
    interval: Duration,
    metrics: Arc<Metrics>,
    streams: Arc<StreamRegistry>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let snapshot = |paths: &[std::path::PathBuf]| crate::authz::cedar::read_sources(paths).ok();
        let mut last = snapshot(&paths);
        let mut tick = ReloadTick::new(interval);
        loop {
            let forced = match tick.next(&stop).await {
                Some(forced) => forced,
                None => return,
            };
            let now = snapshot(&paths);
            if !forced && now == last {
                continue;
            }
            match engine.reload(&paths) {
                Ok(epoch) => {
                    tracing::info!(epoch, policies = engine.policy_count(), "policies reloaded");
                    metrics.policy_reload(true);
                    metrics.policy_loaded(epoch, engine.policy_count());
                    // Live streams are decided again under the new policies.
                    streams.recheck_all();
                }
                Err(e) => {
                    tracing::error!(errors = %e, epoch = engine.epoch(), "policy reload refused; keeping the last good policies");
                    metrics.policy_reload(false);
                }
            }
            last = now;
        }
    });
}

fn spawn_readiness_probe(gw: Arc<Gateway>, path: String, stop: CancellationToken) {
    tokio::spawn(async move {
        loop {
            let interval = match gw.upstream.probe(&path).await {
                Ok(code) => {
                    if !gw.upstream_ready.swap(true, Ordering::Relaxed) {
                        tracing::info!(%code, "upstream answers; ready");
                    }
                    gw.upstream_status
                        .store(Arc::new(format!("answered {code}")));
                    Duration::from_secs(2)
                }
                Err(e) => {
                    if gw.upstream_ready.swap(false, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "upstream stopped answering; not ready");
                    }
                    gw.upstream_status.store(Arc::new(e.to_string()));
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    });
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    gw: Arc<Gateway>,
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
    gw.draining.store(true, Ordering::Relaxed);
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
    gw: Arc<Gateway>,
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

async fn serve_ops(listener: TcpListener, gw: Arc<Gateway>, stop: CancellationToken) {
    loop {
        let tcp = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r { Ok((t, _)) => t, Err(_) => continue },
        };
        let gw = gw.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let gw = gw.clone();
                async move {
                    let resp = match req.uri().path() {
                        "/livez" | "/healthz" => plain(StatusCode::OK, "ok"),
                        "/readyz" => gw.readyz(),
                        "/metrics" => {
                            let mut r = Response::new(full(gw.metrics.encode()));
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
