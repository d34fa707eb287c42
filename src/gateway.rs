//! The assembly: builds every part of the gateway from its config ([`start`]), wires each
//! handler to the narrow part of the gateway it needs, registers every reloadable file with the
//! one [`Reloader`], probes kube-apiserver for readiness, and starts the listeners
//! ([`crate::listener`]). Nothing below this module knows the whole gateway.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{HeaderValue, Response};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::authn::oidc::OidcAuthenticator;
use crate::authn::x509::X509Authenticator;
use crate::authz::cedar::PolicyEngine;
use crate::authz::Authorizer;
use crate::body::Body;
use crate::config::GatewayConfig;
use crate::pipeline::Pipeline;
use crate::proxy::forward::UpstreamSettings;
use crate::proxy::Upstream;
use crate::readiness::Readiness;
use crate::reload::{ReadError, Reload, Reloader, Schedule};
use crate::streams::{Inflight, StreamRegistry};
use crate::telemetry::Metrics;
use crate::tls::bundles::{Bundle, TrustBundles};
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

/// The assembled gateway: every part built once from the config (never re-parsed per request).
/// The request path sees only [`Pipeline`], and each handler only its own part of it; the other
/// fields are handles on shared parts for the config reloader, the demo and tests.
pub struct Gateway {
    /// The request path and the handlers it dispatches to.
    pub pipeline: Arc<Pipeline>,
    pub readiness: Arc<Readiness>,
    pub upstream: Arc<Upstream>,
    /// Locks and posture records.
    pub store: crate::state::SharedStore,
    pub auditor: Arc<crate::audit::Auditor>,
    pub oidc: Arc<OidcAuthenticator>,
    pub metrics: Arc<Metrics>,
    pub streams: Arc<StreamRegistry>,
    pub inflight: Arc<Inflight>,
    /// Cancelled at the end of shutdown: stops reloaders and probes.
    background: CancellationToken,
}

impl Gateway {
    pub fn is_ready(&self) -> bool {
        self.readiness.is_ready()
    }

    /// `/readyz`, in kube-apiserver's verbose style.
    pub fn readyz(&self) -> Response<Body> {
        self.readiness.readyz()
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

/// Why the upstream token file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{}: token is not UTF-8", .0.display())]
    NotUtf8(std::path::PathBuf),
    #[error("{}: token file is empty", .0.display())]
    Empty(std::path::PathBuf),
    #[error("{}: token is not a valid header value", .0.display())]
    NotHeaderValue(std::path::PathBuf),
}

fn load_token(path: &std::path::Path, bytes: &[u8]) -> Result<HeaderValue, TokenError> {
    let token = std::str::from_utf8(bytes)
        .map_err(|_| TokenError::NotUtf8(path.to_path_buf()))?
        .trim();
    if token.is_empty() {
        return Err(TokenError::Empty(path.to_path_buf()));
    }
    let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| TokenError::NotHeaderValue(path.to_path_buf()))?;
    v.set_sensitive(true);
    Ok(v)
}

/// Builds the gateway from a validated config and starts serving.
pub async fn start(cfg: GatewayConfig) -> Result<RunningGateway, StartError> {
    let stop = CancellationToken::new();
    let reloader = Reloader::new(stop.clone());
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
        reloader.watch_files(
            "serving certificate",
            vec![cp.clone(), kp.clone()],
            reload,
            move |files| {
                let ck = pem::certified_key(&cp, &files[0], &kp, &files[1])?;
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
        reloader.watch_files(
            "client CA bundle",
            vec![path.clone()],
            reload,
            move |files| {
                bundles.replace(Bundle::from_pem(&name, &path, &files[0])?);
                Ok(())
            },
        );
    }
    let x509 = cfg
        .authentication
        .x509
        .as_ref()
        .map(|x| X509Authenticator::new(x.bundle.clone(), bundles.clone()));

    let upstream = Arc::new(upstream(&cfg, &reloader)?);

    let oidc = OidcAuthenticator::new(&cfg.authentication.jwt, stop.clone())
        .await
        .map_err(|e| StartError::Config(e.to_string()))?;
    let sso = crate::sso::Sso::from_config(&cfg).map_err(|e| StartError::Config(e.to_string()))?;

    let auditor = match &cfg.audit {
        Some(a) => crate::audit::Auditor::start(a, stop.clone())
            .await
            .map_err(|e| StartError::Config(format!("audit: {e}")))?,
        None => crate::audit::Auditor::disabled(),
    };
    // The audit policy file: a change replaces the policy; a bad one keeps the last good one.
    if let Some(path) = cfg.audit.as_ref().and_then(|a| a.policy_file.clone()) {
        let auditor = auditor.clone();
        reloader.watch_files("audit policy", vec![path], reload, move |files| {
            let text = std::str::from_utf8(&files[0])?;
            let policy = crate::audit::AuditPolicy::from_yaml(text)?;
            auditor.replace_policy(policy);
            Ok(())
        });
    }

    let store: crate::state::SharedStore = match &cfg.state {
        Some(crate::config::StateConfig {
            etcd: Some(etcd), ..
        }) => {
            let store = crate::state::EtcdStore::connect(etcd)
                .await
                .map_err(|e| StartError::Config(format!("state.etcd: {e}")))?;
            store.spawn_tls_reloaders(etcd, reload, stop.clone());
            Arc::new(store)
        }
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
            let policies = Policies {
                engine: engine.clone(),
                paths: a.policies.clone(),
                metrics: metrics.clone(),
                streams: streams.clone(),
            };
            let initial = policies.snapshot();
            reloader.register(
                "policies",
                Schedule::every_or_on_sighup(a.reload_interval.get()),
                Some(initial),
                policies,
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
    let decider = Arc::new(crate::decide::Decider::new(
        store.clone(),
        posture.clone(),
        authorizer,
    ));
    let readiness = Arc::new(Readiness::new(oidc.clone(), store.clone()));
    let request_timeout = cfg.timeouts.request.get();
    let locks = crate::locks::LocksApi {
        store: store.clone(),
        streams: streams.clone(),
    };
    let inflight = Arc::new(Inflight::default());
    let pipeline = Arc::new(Pipeline {
        upstream: upstream.clone(),
        auditor: auditor.clone(),
        x509,
        oidc: oidc.clone(),
        bundles: bundles.clone(),
        devices: cfg.authentication.devices.clone(),
        workloads: cfg.authentication.workloads.clone(),
        decider: decider.clone(),
        metrics: metrics.clone(),
        streams: streams.clone(),
        inflight: inflight.clone(),
        inflight_limit: Arc::new(Semaphore::new(cfg.limits.max_inflight_requests as usize)),
        request_timeout,
        max_stream_age: Some(cfg.timeouts.max_stream_age.get()).filter(|d| !d.is_zero()),
        readiness: readiness.clone(),
        sso,
        webhooks: crate::webhook::Webhooks {
            token_review: cfg.authentication.token_review.clone(),
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
            bundles,
            oidc: oidc.clone(),
            decider: decider.clone(),
        },
        locks: locks.clone(),
        posture: crate::posture::api::PostureApi {
            store: store.clone(),
            posture,
        },
        rules: Arc::new(crate::authz::rules::RulesReview {
            decider,
            discovery: crate::discovery::DiscoveryCache::new(crate::discovery::TTL),
            upstream: upstream.clone(),
            request_timeout,
        }),
    });
    let gw = Arc::new(Gateway {
        pipeline: pipeline.clone(),
        readiness: readiness.clone(),
        upstream: upstream.clone(),
        store,
        auditor,
        oidc,
        metrics: metrics.clone(),
        streams,
        inflight,
        background: stop.clone(),
    });

    spawn_readiness_probe(
        upstream,
        readiness.clone(),
        cfg.upstream.health_path.clone(),
        stop.clone(),
    );
    crate::locks::spawn_enforcer(locks, stop.clone());

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
        tokio::spawn(crate::listener::serve_ops(
            ops,
            readiness,
            metrics,
            stop.clone(),
        ));
    }

    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(serving)?));
    let shutdown = CancellationToken::new();
    let done = tokio::spawn(crate::listener::accept_loop(
        listener,
        acceptor,
        pipeline,
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

/// kube-apiserver as the gateway reaches it: its CA, the gateway's client certificate and
/// token (each re-read when its file changes), and the connection settings.
fn upstream(cfg: &GatewayConfig, reloader: &Reloader) -> Result<Upstream, StartError> {
    let reload = cfg.listener.reload_interval.get();
    let up = &cfg.upstream;
    let ca_roots = pem::certs_from_pem(&up.ca_file, &pem::read(&up.ca_file)?)?;
    let verifier = ReloadingServerVerifier::new(ca_roots)?;
    {
        let verifier = verifier.clone();
        let path = up.ca_file.clone();
        reloader.watch_files("upstream CA", vec![path.clone()], reload, move |files| {
            let roots = pem::certs_from_pem(&path, &files[0])?;
            Ok(verifier.replace(roots)?)
        });
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
            reloader.watch_files(
                "upstream client certificate",
                vec![cp.clone(), kp.clone()],
                reload,
                move |files| {
                    r.store(pem::certified_key(&cp, &files[0], &kp, &files[1])?);
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
            let v = load_token(path, &bytes).map_err(|e| StartError::Upstream(e.to_string()))?;
            let cell = Arc::new(ArcSwap::from_pointee(Some(v)));
            let c = cell.clone();
            let p = path.clone();
            reloader.watch_files("upstream token", vec![p.clone()], reload, move |files| {
                c.store(Arc::new(Some(load_token(&p, &files[0])?)));
                Ok(())
            });
            Some(cell)
        }
        None => None,
    };
    let (pooled_tls, upgrade_tls) = client_configs(verifier, client_cert)?;
    let url: http::Uri = up
        .url
        .parse()
        .map_err(|e| StartError::Upstream(format!("url {:?}: {e}", up.url)))?;
    Upstream::new(UpstreamSettings {
        url,
        server_name: up.server_name.clone(),
        pooled_tls,
        upgrade_tls,
        token,
        connect_timeout: cfg.timeouts.upstream_connect.get(),
        request_timeout: cfg.timeouts.request.get(),
        max_body: cfg.limits.max_request_body_bytes,
    })
    .map_err(|e| StartError::Upstream(e.to_string()))
}

/// Watches the config file (every `interval`, and on SIGHUP) and applies what can change
/// without a restart: the OIDC issuer list. A config that does not validate is refused whole
/// and the running one stays; settings that need a restart are reported.
pub fn spawn_config_reloader(gw: Arc<Gateway>, path: PathBuf, interval: Duration) {
    let initial = std::fs::read(&path).ok();
    let running = crate::config::load_file(&path).ok();
    let reloader = Reloader::new(gw.background.clone());
    reloader.register(
        "config",
        Schedule::every_or_on_sighup(interval),
        Some(initial),
        ConfigFile {
            oidc: gw.oidc.clone(),
            metrics: gw.metrics.clone(),
            path,
            running,
        },
    );
}

/// The config file, as the reloader sees it.
struct ConfigFile {
    oidc: Arc<OidcAuthenticator>,
    metrics: Arc<Metrics>,
    path: PathBuf,
    /// The config in force (None: the one at start could not be read back).
    running: Option<GatewayConfig>,
}

impl Reload for ConfigFile {
    /// The file's bytes (None: unreadable, which a reload then reports).
    type Snapshot = Option<Vec<u8>>;

    async fn read(&mut self) -> Result<Option<Vec<u8>>, ReadError> {
        Ok(tokio::fs::read(&self.path).await.ok())
    }

    async fn apply(&mut self, _bytes: &Option<Vec<u8>>, _forced: bool) {
        let cfg = match crate::config::load_file(&self.path) {
            Ok(c) => c,
            Err(errs) => {
                tracing::error!(errors = %errs, "config reload refused; keeping the running config");
                self.metrics.config_reload(false);
                return;
            }
        };
        if let Some(old) = &self.running {
            if old.listener.address != cfg.listener.address || old.upstream.url != cfg.upstream.url
            {
                tracing::warn!(
                    "listener.address and upstream.url changes need a restart; not applied"
                );
            }
        }
        match self.oidc.update(&cfg.authentication.jwt).await {
            Ok(()) => {
                tracing::info!(issuers = cfg.authentication.jwt.len(), "config reloaded");
                self.metrics.config_reload(true);
                self.running = Some(cfg);
            }
            Err(e) => {
                tracing::error!(error = %e, "config reload refused; keeping the running config");
                self.metrics.config_reload(false);
            }
        }
    }
}

/// The policy files (every `interval` and on SIGHUP): a changed set is validated whole and
/// swapped atomically, an invalid one is refused and the last good set stays.
struct Policies {
    engine: Arc<PolicyEngine>,
    paths: Vec<PathBuf>,
    metrics: Arc<Metrics>,
    streams: Arc<StreamRegistry>,
}

impl Policies {
    /// The policy sources (None: unreadable, which a reload then reports).
    fn snapshot(&self) -> Option<Vec<(String, String)>> {
        crate::authz::cedar::read_sources(&self.paths).ok()
    }
}

impl Reload for Policies {
    type Snapshot = Option<Vec<(String, String)>>;

    async fn read(&mut self) -> Result<Self::Snapshot, ReadError> {
        Ok(self.snapshot())
    }

    async fn apply(&mut self, _sources: &Self::Snapshot, _forced: bool) {
        let engine = &self.engine;
        match engine.reload(&self.paths) {
            Ok(epoch) => {
                tracing::info!(epoch, policies = engine.policy_count(), "policies reloaded");
                self.metrics.policy_reload(true);
                self.metrics.policy_loaded(epoch, engine.policy_count());
                // Live streams are decided again under the new policies.
                self.streams.recheck_all();
            }
            Err(e) => {
                tracing::error!(errors = %e, epoch = engine.epoch(), "policy reload refused; keeping the last good policies");
                self.metrics.policy_reload(false);
            }
        }
    }
}

/// Asks kube-apiserver's health path every 2 s while it answers (every second while it does
/// not) and tells [`Readiness`].
fn spawn_readiness_probe(
    upstream: Arc<Upstream>,
    readiness: Arc<Readiness>,
    path: String,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            let interval = match upstream.probe(&path).await {
                Ok(code) => {
                    readiness.upstream_answered(code);
                    Duration::from_secs(2)
                }
                Err(e) => {
                    readiness.upstream_failed(&e);
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
