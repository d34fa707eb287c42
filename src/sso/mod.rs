//! The web login on the gateway (only when the config has an `sso` section).
//!
//! `GET /login` starts an OIDC authorization-code flow with PKCE (S256), `state` and `nonce`,
//! kept in a signed, short-lived cookie; `GET /callback` checks the state against that cookie,
//! exchanges the code with the PKCE verifier, verifies the ID token with the proxy's own OIDC
//! verifier (the issuer and audience must be a configured `authentication.jwt` entry), checks
//! the nonce, and opens a page session; `/login` then shows who you are and the kubeconfig
//! (`/kubeconfig`) for this gateway with `ztgate login` as its exec plugin; `/logout` ends the
//! page session.
//!
//! It owns the pages and their cookies. It must never log or show a token, never accept a
//! callback whose state, browser cookie or nonce do not match, and never grant anything by itself:
//! the page session only shows a page; kubectl still authenticates every request with a token.

pub mod config;
pub mod pages;
pub mod session;

use std::sync::Arc;
use std::time::Duration;

use ::http::{header, HeaderValue, Method, Request, Response, StatusCode};
use openidconnect::core::CoreAuthenticationFlow;
use openidconnect::{
    AuthorizationCode, CsrfToken, Nonce, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope,
};

pub use config::{SsoCliConfig, SsoConfig};

use crate::authn::oidc::OidcAuthenticator;
use crate::body::{full, Body};
use crate::config::GatewayConfig;
use crate::decide::Decider;
use crate::login::flows::{oauth_error, Provider};
use crate::login::kubeconfig::{KubeconfigSpec, PluginSpec};
use session::{
    cookie, now_unix, set_cookie, CookieKey, Flow, Session, FLOW_COOKIE, SESSION_COOKIE,
};

/// How long a sign-in may take between `/login` and `/callback`.
const FLOW_TTL: Duration = Duration::from_secs(600);
/// The kubeconfig's file name for downloads and the copy command.
const KUBECONFIG_FILE: &str = "ztgate.kubeconfig";

/// The web login, built once from the config.
pub struct Sso {
    cfg: SsoConfig,
    key: CookieKey,
    client_secret: Option<String>,
    http: crate::tls::oidc_client::OidcHttpClient,
    /// The issuer's CA (from its `authentication.jwt` entry), also handed to `ztgate login`.
    issuer_ca_pem: String,
    gateway_ca_pem: Option<String>,
    /// Discovery, fetched on first use and kept; retried while it fails.
    provider: tokio::sync::OnceCell<Arc<Provider>>,
}

/// What the login pages use of the rest of the gateway: the OIDC verifier (for the ID token
/// the issuer returns) and the decider (a locked user gets no session).
pub struct SsoDeps<'a> {
    pub oidc: &'a OidcAuthenticator,
    pub decider: &'a Decider,
}

impl std::fmt::Debug for Sso {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sso")
            .field("issuer", &self.cfg.issuer)
            .field("client_id", &self.cfg.client_id)
            .finish_non_exhaustive()
    }
}

/// Why the `sso` section cannot be put to use.
#[derive(Debug, thiserror::Error)]
pub enum SsoConfigError {
    #[error("sso.issuer: {0} is not an authentication.jwt issuer")]
    NotAnIssuer(String),
    #[error("sso.issuer: {0}")]
    IssuerCa(#[from] crate::config::jwt::IssuerCaError),
    #[error("{field}: {}: {source}", path.display())]
    Read {
        field: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sso.issuer: {0}")]
    Client(#[from] crate::tls::oidc_client::ClientError),
}

impl Sso {
    /// Builds the web login from a validated config; `None` when there is no `sso` section.
    pub fn from_config(cfg: &GatewayConfig) -> Result<Option<Arc<Sso>>, SsoConfigError> {
        let Some(s) = &cfg.sso else {
            return Ok(None);
        };
        let jwt = cfg
            .authentication
            .jwt
            .iter()
            .find(|j| j.issuer.url == s.issuer)
            .ok_or_else(|| SsoConfigError::NotAnIssuer(s.issuer.clone()))?;
        let ca = jwt.ca_pem()?;
        let read_error = |field, path: &std::path::Path| {
            let path = path.to_path_buf();
            move |source| SsoConfigError::Read {
                field,
                path,
                source,
            }
        };
        let client_secret = match &s.client_secret_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(read_error("sso.clientSecretFile", p))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        let key = match &s.session_key_file {
            Some(p) => {
                CookieKey::new(std::fs::read(p).map_err(read_error("sso.sessionKeyFile", p))?)
            }
            None => CookieKey::random(),
        };
        let gateway_ca_pem = match &s.gateway_ca_file {
            Some(p) => {
                Some(std::fs::read_to_string(p).map_err(read_error("sso.gatewayCaFile", p))?)
            }
            None => None,
        };
        let http =
            crate::tls::oidc_client::OidcHttpClient::new(Some(&ca), Duration::from_secs(10))?;
        Ok(Some(Arc::new(Sso {
            cfg: s.clone(),
            key,
            client_secret,
            http,
            issuer_ca_pem: String::from_utf8_lossy(&ca).into_owned(),
            gateway_ca_pem,
            provider: tokio::sync::OnceCell::new(),
        })))
    }

    /// Answers a request for one of the login pages.
    pub async fn serve<B>(&self, deps: &SsoDeps<'_>, req: &Request<B>) -> Response<Body> {
        let m = req.method();
        let get = *m == Method::GET || *m == Method::HEAD;
        match req.uri().path() {
            "/login" if get => self.login(deps, req).await,
            "/callback" if get => self.callback(deps, req).await,
            "/kubeconfig" if get => self.kubeconfig(deps, req),
            "/logout" if get || *m == Method::POST => self.logout(),
            _ => html(
                StatusCode::METHOD_NOT_ALLOWED,
                pages::error("Method not allowed", "This page only answers GET."),
            ),
        }
    }

    async fn provider(&self) -> Result<Arc<Provider>, crate::login::LoginError> {
        self.provider
            .get_or_try_init(|| async {
                Provider::discover(
                    &self.cfg.issuer,
                    self.http.clone(),
                    &self.cfg.client_id,
                    self.client_secret.clone(),
                )
                .await
                .map(Arc::new)
            })
            .await
            .cloned()
    }

    /// `https://host[:port]` of this gateway as the browser reached it.
    fn base_url<B>(&self, req: &Request<B>) -> Option<String> {
        if let Some(u) = &self.cfg.external_url {
            return Some(u.trim_end_matches('/').to_owned());
        }
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })?;
        let safe = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
        safe.then(|| format!("https://{host}"))
    }

    /// The signed-in session, unless a lock now covers it (its user, a group, its session) or
    /// the gateway cannot vouch for its locks: then the user must sign in again.
    fn session<B>(&self, deps: &SsoDeps<'_>, req: &Request<B>) -> Option<Session> {
        let s = self
            .key
            .open_session(cookie(req.headers(), SESSION_COOKIE)?)?;
        match deps.decider.admit(&s.lock_subject()) {
            Ok(()) => Some(s),
            Err(e) => {
                tracing::info!(user = %s.user, reason = %e, "sso: session refused");
                None
            }
        }
    }

    async fn login<B>(&self, deps: &SsoDeps<'_>, req: &Request<B>) -> Response<Body> {
        if let Some(s) = self.session(deps, req) {
            return self.signed_in_page(req, &s);
        }
        let Some(base) = self.base_url(req) else {
            return html(
                StatusCode::BAD_REQUEST,
                pages::error("Sign-in failed", "The request names no usable host."),
            );
        };
        let provider = match self.provider().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "sso: identity provider discovery failed");
                return html(
                    StatusCode::BAD_GATEWAY,
                    pages::error(
                        "Identity provider unavailable",
                        "The gateway cannot reach the identity provider right now. Try again in a minute.",
                    ),
                );
            }
        };
        let redirect_uri = format!("{base}/callback");
        let Ok(redirect) = RedirectUrl::new(redirect_uri.clone()) else {
            return html(
                StatusCode::BAD_REQUEST,
                pages::error("Sign-in failed", "The request names no usable host."),
            );
        };
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let client = provider.client().set_redirect_uri(redirect);
        let mut auth = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .set_pkce_challenge(challenge);
        for s in self.cfg.scopes.iter().filter(|s| *s != "openid") {
            auth = auth.add_scope(Scope::new(s.clone()));
        }
        let (url, state, nonce) = auth.url();
        let flow = Flow {
            state: state.secret().clone(),
            nonce: nonce.secret().clone(),
            verifier: Some(verifier.secret().clone()),
            redirect_uri,
            exp: now_unix() + FLOW_TTL.as_secs(),
        };
        let mut r = redirect_to(url.as_str());
        add_cookie(
            &mut r,
            &set_cookie(FLOW_COOKIE, &self.key.seal_flow(&flow), FLOW_TTL),
        );
        r
    }

    async fn callback<B>(&self, deps: &SsoDeps<'_>, req: &Request<B>) -> Response<Body> {
        // The sign-in cookie is single use, whatever happens next.
        let clear_flow = set_cookie(FLOW_COOKIE, "", Duration::ZERO);
        let mut r = match self.finish(deps, req).await {
            Ok(session) => {
                tracing::info!(user = %session.user, "sso: signed in");
                let mut r = redirect_to("/login");
                add_cookie(
                    &mut r,
                    &set_cookie(
                        SESSION_COOKIE,
                        &self.key.seal_session(&session),
                        self.cfg.session_ttl.get(),
                    ),
                );
                r
            }
            Err(refusal) => {
                tracing::warn!(reason = refusal.log, "sso: callback refused");
                html(refusal.status, pages::error(refusal.title, refusal.message))
            }
        };
        add_cookie(&mut r, &clear_flow);
        r
    }

    async fn finish<B>(&self, deps: &SsoDeps<'_>, req: &Request<B>) -> Result<Session, Refusal> {
        let params: std::collections::HashMap<String, String> =
            openidconnect::url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
                .into_owned()
                .collect();
        let flow = cookie(req.headers(), FLOW_COOKIE)
            .and_then(|c| self.key.open_flow(c))
            .ok_or(Refusal::bad(
                "no sign-in in progress in this browser",
                "This browser has no sign-in in progress, or it took too long. Start again.",
            ))?;
        let state_ok = params
            .get("state")
            .is_some_and(|s| crate::ct::eq(s.as_bytes(), flow.state.as_bytes()));
        if !state_ok {
            return Err(Refusal::bad(
                "state does not match the sign-in cookie",
                "This sign-in response does not belong to the sign-in this browser started. Start again.",
            ));
        }
        if let Some(e) = params.get("error") {
            tracing::info!(error = %e, "sso: the provider refused the sign-in");
            return Err(Refusal {
                status: StatusCode::FORBIDDEN,
                title: "Sign-in refused",
                message: "The identity provider did not sign you in.",
                log: "provider returned an error",
            });
        }
        let code = params.get("code").ok_or(Refusal::bad(
            "no code",
            "The identity provider sent no authorization code.",
        ))?;
        let verifier = flow.verifier.clone().ok_or(Refusal::bad(
            "the sign-in has no PKCE verifier",
            "This sign-in cannot be completed safely. Start again.",
        ))?;
        let provider = self.provider().await.map_err(|_| Refusal {
            status: StatusCode::BAD_GATEWAY,
            title: "Identity provider unavailable",
            message:
                "The gateway cannot reach the identity provider right now. Try again in a minute.",
            log: "discovery failed",
        })?;
        let redirect = RedirectUrl::new(flow.redirect_uri.clone())
            .map_err(|_| Refusal::bad("bad redirect URI in the cookie", "Start again."))?;
        let client = provider.client().set_redirect_uri(redirect);
        let resp = client
            .exchange_code(AuthorizationCode::new(code.clone()))
            .map_err(|_| Refusal::bad("no token endpoint", "The identity provider is misconfigured."))?
            .set_pkce_verifier(PkceCodeVerifier::new(verifier))
            .request_async(&provider.http)
            .await
            .map_err(|e| {
                tracing::warn!(error = %oauth_error(&e), "sso: code exchange failed");
                Refusal::bad(
                    "code exchange refused",
                    "The identity provider did not accept this sign-in (it may have been used already). Start again.",
                )
            })?;
        use openidconnect::TokenResponse;
        let id_token = resp
            .id_token()
            .ok_or(Refusal::bad(
                "no ID token",
                "The identity provider sent no ID token.",
            ))?
            .to_string();
        let unauthorized = |log: &'static str| Refusal {
            status: StatusCode::UNAUTHORIZED,
            title: "Sign-in refused",
            message: "The identity provider's answer did not verify. Start again.",
            log,
        };
        let verified = deps.oidc.verify_token(&id_token).await.map_err(|e| {
            tracing::warn!(reason = e.reason_label(), error = %e, "sso: ID token rejected");
            unauthorized("ID token rejected by the verifier")
        })?;
        let identity = &verified.identity;
        if identity.facts().issuer.as_deref() != Some(self.cfg.issuer.as_str()) {
            return Err(unauthorized("ID token from another issuer"));
        }
        if !verified.audiences.contains(&self.cfg.client_id) {
            return Err(unauthorized("ID token for another client"));
        }
        let nonce_ok = token_nonce(&id_token)
            .is_some_and(|n| crate::ct::eq(n.as_bytes(), flow.nonce.as_bytes()));
        if !nonce_ok {
            return Err(unauthorized("ID token nonce does not match the sign-in"));
        }
        let session = Session {
            user: identity.user().to_owned(),
            groups: identity.groups().to_vec(),
            issuer: self.cfg.issuer.clone(),
            exp: now_unix() + self.cfg.session_ttl.get().as_secs(),
            sid: identity.facts().session_id.clone(),
        };
        if let Err(e) = deps.decider.admit(&session.lock_subject()) {
            tracing::info!(user = %session.user, reason = %e, "sso: sign-in refused");
            return Err(Refusal {
                status: StatusCode::FORBIDDEN,
                title: "Access locked",
                message: "Your access through this gateway is locked. Ask your security team.",
                log: "the user, a group or the session is locked",
            });
        }
        Ok(session)
    }

    fn spec(&self, base: &str) -> KubeconfigSpec {
        KubeconfigSpec {
            server: base.to_owned(),
            gateway_ca_pem: self.gateway_ca_pem.clone(),
            name: "ztgate".into(),
            namespace: None,
            plugin: PluginSpec {
                command: self
                    .cfg
                    .cli
                    .command
                    .clone()
                    .unwrap_or_else(|| "ztgate".into()),
                issuer: self.cfg.issuer.clone(),
                client_id: self.cfg.cli_client_id().to_owned(),
                issuer_ca_pem: Some(self.issuer_ca_pem.clone()),
                scopes: self.cfg.cli.scopes.clone(),
                device_code: self.cfg.cli.grant == config::CliGrant::DeviceCode,
                device_cert: None,
                device_key: None,
            },
        }
    }

    fn signed_in_page<B>(&self, req: &Request<B>, s: &Session) -> Response<Body> {
        let base = self.base_url(req).unwrap_or_default();
        let ends = time::OffsetDateTime::from_unix_timestamp(s.exp as i64)
            .map(|t| {
                format!(
                    "{:04}-{:02}-{:02} {:02}:{:02} UTC",
                    t.year(),
                    u8::from(t.month()),
                    t.day(),
                    t.hour(),
                    t.minute()
                )
            })
            .unwrap_or_default();
        let command = self.spec(&base).command_line(KUBECONFIG_FILE);
        html(
            StatusCode::OK,
            pages::signed_in(&pages::SignedIn {
                user: &s.user,
                groups: &s.groups,
                issuer: &s.issuer,
                session_ends: &ends,
                command: &command,
                kubeconfig_file: KUBECONFIG_FILE,
            }),
        )
    }

    fn kubeconfig<B>(&self, deps: &SsoDeps<'_>, req: &Request<B>) -> Response<Body> {
        if self.session(deps, req).is_none() {
            return redirect_to("/login");
        }
        let base = self.base_url(req).unwrap_or_default();
        let mut r = Response::new(full(self.spec(&base).render()));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/yaml"),
        );
        h.insert(
            header::CONTENT_DISPOSITION,
            HeaderValue::from_static("attachment; filename=\"ztgate.kubeconfig\""),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(
            "x-content-type-options",
            HeaderValue::from_static("nosniff"),
        );
        r
    }

    fn logout(&self) -> Response<Body> {
        let mut r = html(StatusCode::OK, pages::signed_out());
        add_cookie(&mut r, &set_cookie(SESSION_COOKIE, "", Duration::ZERO));
        r
    }
}

/// Why a callback was refused: a status and words for the user, and a reason for the log.
struct Refusal {
    status: StatusCode,
    title: &'static str,
    message: &'static str,
    log: &'static str,
}

impl Refusal {
    fn bad(log: &'static str, message: &'static str) -> Refusal {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            title: "Sign-in failed",
            message,
            log,
        }
    }
}

/// The `nonce` claim of a token whose signature the verifier has already checked.
fn token_nonce(jwt: &str) -> Option<String> {
    use base64::Engine;
    let payload = jwt.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&json).ok()?;
    v.get("nonce")?.as_str().map(str::to_owned)
}

fn add_cookie(r: &mut Response<Body>, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
}

fn security_headers(r: &mut Response<Body>) {
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

fn html(status: StatusCode, page: String) -> Response<Body> {
    let mut r = Response::new(full(page));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    security_headers(&mut r);
    r
}

fn redirect_to(location: &str) -> Response<Body> {
    let mut r = Response::new(full(""));
    *r.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    security_headers(&mut r);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_is_read_from_the_payload() {
        use base64::Engine;
        let p = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"nonce":"abc"}"#);
        assert_eq!(token_nonce(&format!("h.{p}.s")).as_deref(), Some("abc"));
        assert_eq!(token_nonce("garbage"), None);
    }

    #[test]
    fn pages_escape_what_they_show() {
        let page = pages::error("Sign-in failed", "<script>x</script>");
        assert!(!page.contains("<script>x"));
        assert!(page.contains("&lt;script&gt;"));
    }
}
