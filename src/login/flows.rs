//! The three ways `ztgate login` gets tokens from the provider: authorization code + PKCE with a
//! loopback redirect (RFC 8252), the device authorization grant (RFC 8628), and the refresh
//! token. Every ID token is verified (signature against the provider's keys, issuer, audience,
//! expiry; the nonce for the browser flow) before it is cached.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use openidconnect::core::{
    CoreAuthDisplay, CoreAuthenticationFlow, CoreClaimName, CoreClaimType, CoreClient,
    CoreClientAuthMethod, CoreDeviceAuthorizationResponse, CoreGrantType, CoreIdToken,
    CoreJsonWebKey, CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm,
    CoreResponseMode, CoreResponseType, CoreSubjectIdentifierType, CoreTokenResponse,
};
use openidconnect::{
    AdditionalProviderMetadata, AuthorizationCode, ClientId, ClientSecret, CsrfToken,
    DeviceAuthorizationUrl, EndpointMaybeSet, EndpointNotSet, EndpointSet, IssuerUrl, Nonce,
    OAuth2TokenResponse, PkceCodeChallenge, ProviderMetadata, RedirectUrl, RefreshToken, Scope,
    TokenResponse,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use super::cache::CachedTokens;
use super::{LoginError, LoginOptions};
use crate::tls::oidc_client::OidcHttpClient;

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct DeviceEndpoint {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device_authorization_endpoint: Option<DeviceAuthorizationUrl>,
}
impl AdditionalProviderMetadata for DeviceEndpoint {}

/// Discovery metadata, with the device authorization endpoint when the provider has one.
pub type Metadata = ProviderMetadata<
    DeviceEndpoint,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

/// A client built from discovery metadata.
pub type DiscoveredClient = CoreClient<
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// One provider, as seen by one client.
pub struct Provider {
    pub metadata: Metadata,
    pub http: OidcHttpClient,
    pub client_id: String,
    pub client_secret: Option<String>,
}

/// An OAuth error (or transport failure) as one line.
pub fn oauth_error<E, T>(
    e: &openidconnect::RequestTokenError<E, openidconnect::StandardErrorResponse<T>>,
) -> String
where
    E: std::error::Error + 'static,
    T: openidconnect::ErrorResponseType + std::fmt::Display + 'static,
{
    match e {
        openidconnect::RequestTokenError::ServerResponse(r) => match r.error_description() {
            Some(d) => format!("{} ({d})", r.error()),
            None => r.error().to_string(),
        },
        other => crate::util::chain::error_chain(other),
    }
}

impl Provider {
    pub async fn discover(
        issuer: &str,
        http: OidcHttpClient,
        client_id: &str,
        client_secret: Option<String>,
    ) -> Result<Provider, LoginError> {
        let url = IssuerUrl::new(issuer.to_owned())
            .map_err(|e| LoginError::Config(format!("issuer URL {issuer}: {e}")))?;
        let metadata = Metadata::discover_async(url, &http).await.map_err(|e| {
            LoginError::Provider(format!(
                "discovery at {issuer}: {}",
                crate::util::chain::error_chain(&e)
            ))
        })?;
        Ok(Provider {
            metadata,
            http,
            client_id: client_id.to_owned(),
            client_secret,
        })
    }

    pub fn client(&self) -> DiscoveredClient {
        CoreClient::from_provider_metadata(
            self.metadata.clone(),
            ClientId::new(self.client_id.clone()),
            self.client_secret.clone().map(ClientSecret::new),
        )
    }

    /// Checks the ID token in a token response and turns the response into cache contents.
    /// `nonce`: the one sent with the authorization request; `None` for grants without one.
    /// `previous`: the tokens being refreshed (the subject must not change).
    pub fn accept(
        &self,
        resp: &CoreTokenResponse,
        nonce: Option<&Nonce>,
        previous: Option<&CachedTokens>,
    ) -> Result<CachedTokens, LoginError> {
        let client = self.client();
        let id_token: &CoreIdToken = resp.id_token().ok_or_else(|| {
            LoginError::Provider(
                "the token response carries no ID token (is the openid scope granted?)".into(),
            )
        })?;
        let verifier = client.id_token_verifier();
        let claims = match nonce {
            Some(n) => id_token.claims(&verifier, n),
            None => id_token.claims(&verifier, |_: Option<&Nonce>| Ok(())),
        }
        .map_err(|e| LoginError::IdToken(e.to_string()))?;
        let subject = claims.subject().to_string();
        if let Some(p) = previous {
            if p.subject != subject {
                return Err(LoginError::IdToken(
                    "the refreshed ID token names another subject".into(),
                ));
            }
        }
        Ok(CachedTokens {
            issuer: self.metadata.issuer().to_string(),
            client_id: self.client_id.clone(),
            id_token: id_token.to_string(),
            expiry: claims.expiration().timestamp(),
            subject,
            refresh_token: resp
                .refresh_token()
                .map(|r| r.secret().clone())
                .or_else(|| previous.and_then(|p| p.refresh_token.clone())),
        })
    }

    pub async fn refresh(&self, previous: &CachedTokens) -> Result<CachedTokens, LoginError> {
        let rt = previous
            .refresh_token
            .clone()
            .ok_or_else(|| LoginError::Provider("no refresh token".into()))?;
        let client = self.client();
        let resp = client
            .exchange_refresh_token(&RefreshToken::new(rt))
            .map_err(|e| LoginError::Provider(e.to_string()))?
            .request_async(&self.http)
            .await
            .map_err(|e| LoginError::Provider(format!("refresh: {}", oauth_error(&e))))?;
        self.accept(&resp, None, Some(previous))
    }
}

/// Authorization code + PKCE (S256) with a redirect to `http://127.0.0.1:<port>/callback`.
pub async fn browser(p: &Provider, o: &LoginOptions) -> Result<CachedTokens, LoginError> {
    let listener = TcpListener::bind(("127.0.0.1", o.listen_port))
        .await
        .map_err(|e| {
            LoginError::Browser(format!("cannot listen on 127.0.0.1:{}: {e}", o.listen_port))
        })?;
    let port = listener
        .local_addr()
        .map_err(|e| LoginError::Browser(e.to_string()))?
        .port();
    let redirect = format!("http://127.0.0.1:{port}/callback");
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let client = p.client().set_redirect_uri(
        RedirectUrl::new(redirect).map_err(|e| LoginError::Browser(e.to_string()))?,
    );
    let mut req = client
        .authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        )
        .set_pkce_challenge(challenge);
    for s in &o.scopes {
        if s != "openid" {
            req = req.add_scope(Scope::new(s.clone()));
        }
    }
    let (url, state, nonce) = req.url();

    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<String, SignInRefused>>(1);
    let expected = state.secret().clone();
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            let expected = expected.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let tx = tx.clone();
                    let expected = expected.clone();
                    async move { Ok::<_, Infallible>(loopback_answer(&req, &expected, &tx).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });

    let opened = o.open_browser && open_browser(url.as_str());
    if opened {
        eprintln!(
            "ztgate login: a browser window opens to sign in; if it does not, open this URL:\n\n    {url}\n"
        );
    } else {
        eprintln!("ztgate login: to sign in, open this URL in a browser:\n\n    {url}\n");
    }
    let outcome = tokio::time::timeout(o.timeout, rx.recv()).await;
    server.abort();
    let code = match outcome {
        Err(_) => return Err(LoginError::Timeout(o.timeout)),
        Ok(None) => return Err(LoginError::Browser("loopback listener stopped".into())),
        Ok(Some(Err(e))) => return Err(LoginError::Provider(e.to_string())),
        Ok(Some(Ok(code))) => code,
    };
    let resp = client
        .exchange_code(AuthorizationCode::new(code))
        .map_err(|e| LoginError::Provider(e.to_string()))?
        .set_pkce_verifier(verifier)
        .request_async(&p.http)
        .await
        .map_err(|e| LoginError::Provider(format!("code exchange: {}", oauth_error(&e))))?;
    p.accept(&resp, Some(&nonce), None)
}

/// The provider's error answer on the loopback redirect.
#[derive(Debug, thiserror::Error)]
#[error("the provider refused the sign-in: {error} {description}")]
struct SignInRefused {
    error: String,
    description: String,
}

/// What the loopback listener answers the browser; a code with the right `state` is passed on.
async fn loopback_answer(
    req: &http::Request<Incoming>,
    expected_state: &str,
    tx: &tokio::sync::mpsc::Sender<Result<String, SignInRefused>>,
) -> Response<Full<Bytes>> {
    if req.uri().path() != "/callback" {
        return page(StatusCode::NOT_FOUND, "Not found", "Nothing here.");
    }
    let params: std::collections::HashMap<String, String> =
        openidconnect::url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let state_ok = params
        .get("state")
        .is_some_and(|s| crate::ct::eq(s.as_bytes(), expected_state.as_bytes()));
    if !state_ok {
        // Not the answer to our request (a stale tab, or another page probing the port): keep
        // waiting for the real one.
        return page(
            StatusCode::BAD_REQUEST,
            "Sign-in not completed",
            "This sign-in response does not belong to the ztgate login that is waiting. Start again from your terminal.",
        );
    }
    if let Some(err) = params.get("error") {
        let desc = params.get("error_description").cloned().unwrap_or_default();
        let _ = tx.try_send(Err(SignInRefused {
            error: err.clone(),
            description: desc,
        }));
        return page(
            StatusCode::BAD_REQUEST,
            "Sign-in failed",
            "The identity provider refused the sign-in. See your terminal for details.",
        );
    }
    match params.get("code") {
        Some(code) => {
            let _ = tx.try_send(Ok(code.clone()));
            page(
                StatusCode::OK,
                "Signed in",
                "You are signed in to ztgate. You can close this tab and return to your terminal.",
            )
        }
        None => page(
            StatusCode::BAD_REQUEST,
            "Sign-in failed",
            "No authorization code.",
        ),
    }
}

fn page(status: StatusCode, title: &str, text: &str) -> Response<Full<Bytes>> {
    let html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title} - ztgate</title></head>\n<body><main><h1>{title}</h1><p>{text}</p></main></body></html>\n"
    );
    let mut r = Response::new(Full::new(Bytes::from(html)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}

/// Runs `$BROWSER <url>` (or `%s` replaced in it), else the platform's opener. True if it started.
fn open_browser(url: &str) -> bool {
    let configured = std::env::var("BROWSER")
        .ok()
        .filter(|b| !b.trim().is_empty());
    let (program, mut args): (String, Vec<String>) = match &configured {
        Some(b) => {
            let mut words = b.split_whitespace().map(str::to_owned);
            let program = words.next().unwrap_or_default();
            (program, words.collect())
        }
        None if cfg!(target_os = "macos") => ("open".into(), Vec::new()),
        None => ("xdg-open".into(), Vec::new()),
    };
    if args.iter().any(|a| a.contains("%s")) {
        for a in &mut args {
            *a = a.replace("%s", url);
        }
    } else {
        args.push(url.to_owned());
    }
    std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .is_ok()
}

/// The device authorization grant: print where to go and which code to enter, then poll.
pub async fn device_code(p: &Provider, o: &LoginOptions) -> Result<CachedTokens, LoginError> {
    let endpoint = p
        .metadata
        .additional_metadata()
        .device_authorization_endpoint
        .clone()
        .ok_or_else(|| {
            LoginError::Provider(
                "the provider's discovery document has no device_authorization_endpoint".into(),
            )
        })?;
    let client = p.client().set_device_authorization_url(endpoint);
    let mut req = client.exchange_device_code();
    for s in &o.scopes {
        req = req.add_scope(Scope::new(s.clone()));
    }
    let details: CoreDeviceAuthorizationResponse = req
        .request_async(&p.http)
        .await
        .map_err(|e| LoginError::Provider(format!("device authorization: {}", oauth_error(&e))))?;
    eprintln!(
        "ztgate login: to sign in, open {} and enter the code {}",
        details.verification_uri().as_str(),
        details.user_code().secret()
    );
    if let Some(complete) = details.verification_uri_complete() {
        eprintln!("ztgate login: or open {}", complete.secret());
    }
    let resp = client
        .exchange_device_access_token(&details)
        .map_err(|e| LoginError::Provider(e.to_string()))?
        .request_async(&p.http, tokio::time::sleep, Some(o.timeout))
        .await
        .map_err(|e| LoginError::Provider(format!("device code: {}", oauth_error(&e))))?;
    p.accept(&resp, None, None)
}
