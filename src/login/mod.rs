//! The CLI side of SSO: `ztgate login` (a client-go exec credential plugin), `ztgate logout`
//! and `ztgate kubeconfig`.
//!
//! `ztgate login` prints a `client.authentication.k8s.io/v1` ExecCredential whose token is an
//! OIDC ID token. It serves it from its cache while the token has more than the refresh skew left;
//! else, holding the cache lock, it refreshes with the refresh token, and only when that fails
//! signs in again (browser + PKCE on a loopback redirect, or the device authorization grant).
//! It must never print a token anywhere but in the ExecCredential on stdout, never write one
//! to a file other users can read, and never run two sign-ins for one cache entry at once.

pub mod cache;
pub mod flows;
pub mod kubeconfig;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;

use crate::config::GoDuration;
use crate::tls::oidc_client::OidcHttpClient;
use cache::{CachedTokens, TokenCache};

/// Scopes asked for when none are given.
pub const DEFAULT_SCOPES: &[&str] = &["openid", "email", "profile", "offline_access"];

/// Why `ztgate login` could not produce a credential. Printed on stderr, which kubectl shows.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// A flag or the exec info from kubectl is unusable (the user's or the kubeconfig's fault).
    #[error("{0}")]
    Config(String),
    /// The token cache or its lock cannot be used (local file system).
    #[error("token cache: {0}")]
    Cache(String),
    /// The provider could not be reached or refused (provider side, or the grant was revoked).
    #[error("identity provider: {0}")]
    Provider(String),
    /// The provider's ID token did not verify (wrong nonce, signature, audience, subject).
    #[error("ID token rejected: {0}")]
    IdToken(String),
    /// The loopback redirect listener failed.
    #[error("browser sign-in: {0}")]
    Browser(String),
    /// Nobody completed the sign-in in time.
    #[error("sign-in not completed within {0:?}")]
    Timeout(Duration),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Grant {
    /// Authorization code + PKCE, with a redirect to a listener on 127.0.0.1.
    #[default]
    Browser,
    /// The device authorization grant (RFC 8628), for machines without a browser.
    DeviceCode,
}

fn duration(s: &str) -> Result<Duration, crate::config::DurationError> {
    GoDuration::parse(s).map(GoDuration::get)
}

/// Where the provider is and how to trust it.
#[derive(clap::Args, Clone, Debug)]
pub struct ProviderArgs {
    /// The OIDC issuer URL (as in the gateway's `authentication.jwt[].issuer.url`).
    #[arg(long)]
    pub issuer: String,
    /// The client registered at the provider for `ztgate login` (a public, native client).
    #[arg(long)]
    pub client_id: String,
    /// A scope to ask for (repeat the flag); default: openid email profile offline_access.
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// PEM file of the CA that signs the provider's certificate (default: the system's CAs).
    #[arg(long)]
    pub issuer_certificate_authority: Option<PathBuf>,
    /// The same, base64-encoded PEM (what a kubeconfig carries).
    #[arg(long, conflicts_with = "issuer_certificate_authority")]
    pub issuer_certificate_authority_data: Option<String>,
    /// Directory of the token cache (default: $XDG_CACHE_HOME/ztgate or ~/.cache/ztgate).
    #[arg(long, env = "ZTGATE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
}

impl ProviderArgs {
    fn scopes(&self) -> Vec<String> {
        if self.scopes.is_empty() {
            DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect()
        } else {
            let mut s = self.scopes.clone();
            if !s.iter().any(|x| x == "openid") {
                s.insert(0, "openid".into());
            }
            s
        }
    }

    fn ca_pem(&self) -> Result<Option<Vec<u8>>, LoginError> {
        if let Some(p) = &self.issuer_certificate_authority {
            return std::fs::read(p)
                .map(Some)
                .map_err(|e| LoginError::Config(format!("{}: {e}", p.display())));
        }
        if let Some(d) = &self.issuer_certificate_authority_data {
            use base64::Engine;
            return base64::engine::general_purpose::STANDARD
                .decode(d.trim())
                .map(Some)
                .map_err(|e| {
                    LoginError::Config(format!("--issuer-certificate-authority-data: {e}"))
                });
        }
        Ok(None)
    }

    fn cache(&self) -> Result<TokenCache, LoginError> {
        let dir = cache::cache_dir(self.cache_dir.as_deref())?;
        Ok(TokenCache::new(
            dir,
            &self.issuer,
            &self.client_id,
            &self.scopes(),
        ))
    }
}

/// `ztgate login`.
#[derive(clap::Args, Clone, Debug)]
pub struct LoginArgs {
    #[command(flatten)]
    pub provider: ProviderArgs,
    /// A client secret, for providers that refuse public clients (prefer a public client).
    #[arg(long, env = "ZTGATE_CLIENT_SECRET", hide_env_values = true)]
    pub client_secret: Option<String>,
    /// How to sign in when the cache cannot help.
    #[arg(long, value_enum, default_value_t = Grant::Browser)]
    pub grant: Grant,
    /// Port of the loopback redirect listener (0: any free port; the provider must allow it).
    #[arg(long, default_value_t = 0)]
    pub listen_port: u16,
    /// Do not start a browser; print the URL to open instead.
    #[arg(long)]
    pub no_browser: bool,
    /// How long a sign-in may take.
    #[arg(long, default_value = "5m", value_parser = duration)]
    pub timeout: Duration,
    /// Refresh a token this long before it expires (covers clock skew and request time).
    #[arg(long, env = "ZTGATE_REFRESH_SKEW", default_value = "1m", value_parser = duration)]
    pub refresh_skew: Duration,
    /// The enrolled device's certificate (PEM), returned to kubectl to present over mTLS.
    #[arg(long, requires = "device_key")]
    pub device_cert: Option<PathBuf>,
    /// The enrolled device's private key (PEM).
    #[arg(long, requires = "device_cert")]
    pub device_key: Option<PathBuf>,
}

/// `ztgate logout`.
#[derive(clap::Args, Clone, Debug)]
pub struct LogoutArgs {
    /// Directory of the token cache (default: $XDG_CACHE_HOME/ztgate or ~/.cache/ztgate).
    #[arg(long, env = "ZTGATE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
}

/// `ztgate kubeconfig`.
#[derive(clap::Args, Clone, Debug)]
pub struct KubeconfigArgs {
    /// The gateway's URL, e.g. https://ztgate.example.com
    #[arg(long)]
    pub server: String,
    /// PEM file of the CA that signs the gateway's certificate (default: the system's CAs).
    #[arg(long)]
    pub certificate_authority: Option<PathBuf>,
    /// The same, base64-encoded PEM.
    #[arg(long, conflicts_with = "certificate_authority")]
    pub certificate_authority_data: Option<String>,
    #[arg(long)]
    pub issuer: String,
    #[arg(long)]
    pub client_id: String,
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    #[arg(long)]
    pub issuer_certificate_authority: Option<PathBuf>,
    #[arg(long, conflicts_with = "issuer_certificate_authority")]
    pub issuer_certificate_authority_data: Option<String>,
    #[arg(long, value_enum, default_value_t = Grant::Browser)]
    pub grant: Grant,
    /// Device certificate and key files for the plugin to return (an enrolled device).
    #[arg(long, requires = "device_key")]
    pub device_cert: Option<PathBuf>,
    #[arg(long, requires = "device_cert")]
    pub device_key: Option<PathBuf>,
    /// Name of the cluster, user and context.
    #[arg(long, default_value = "ztgate")]
    pub name: String,
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// The program kubectl runs for credentials (default: this binary's name, found on PATH).
    #[arg(long, default_value = "ztgate")]
    pub login_command: String,
    /// Write here (mode 0600) instead of stdout.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
}

/// The ExecCredential apiVersion kubectl asked for (`KUBERNETES_EXEC_INFO`), v1 by default.
fn exec_api_version() -> Result<String, LoginError> {
    const V1: &str = "client.authentication.k8s.io/v1";
    const V1BETA1: &str = "client.authentication.k8s.io/v1beta1";
    let Some(info) = std::env::var_os("KUBERNETES_EXEC_INFO") else {
        return Ok(V1.into());
    };
    let v: serde_json::Value = serde_json::from_str(&info.to_string_lossy())
        .map_err(|e| LoginError::Config(format!("KUBERNETES_EXEC_INFO is not JSON: {e}")))?;
    match v.get("apiVersion").and_then(|a| a.as_str()) {
        Some(a @ (V1 | V1BETA1)) => Ok(a.to_owned()),
        Some(other) => Err(LoginError::Config(format!(
            "KUBERNETES_EXEC_INFO asks for {other}; ztgate login speaks {V1} and {V1BETA1}"
        ))),
        None => Ok(V1.into()),
    }
}

/// `2026-11-26T15:04:05Z` (`metav1.Time`); the Unix epoch for a time before it.
fn rfc3339(unix: i64) -> String {
    let t = u64::try_from(unix)
        .ok()
        .and_then(|secs| std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(secs)))
        .unwrap_or(std::time::UNIX_EPOCH);
    crate::util::time::format_seconds(t)
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Gets a valid ID token (cache, refresh, or sign-in) and returns the ExecCredential JSON.
pub async fn exec_credential(a: &LoginArgs) -> Result<String, LoginError> {
    let api_version = exec_api_version()?;
    let device = match (&a.device_cert, &a.device_key) {
        (Some(c), Some(k)) => {
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p)
                    .map_err(|e| LoginError::Config(format!("{}: {e}", p.display())))
            };
            Some((read(c)?, read(k)?))
        }
        _ => None,
    };
    let tokens = tokens(a).await?;
    let mut status = json!({
        "token": tokens.id_token,
        "expirationTimestamp": rfc3339(tokens.expiry),
    });
    if let Some((cert, key)) = device {
        status["clientCertificateData"] = json!(cert);
        status["clientKeyData"] = json!(key);
    }
    let cred = json!({
        "apiVersion": api_version,
        "kind": "ExecCredential",
        "status": status,
    });
    Ok(cred.to_string())
}

async fn tokens(a: &LoginArgs) -> Result<CachedTokens, LoginError> {
    let p = &a.provider;
    let cache = p.cache()?;
    let skew = i64::try_from(a.refresh_skew.as_secs()).unwrap_or(i64::MAX);
    // Fast path without the lock: most kubectl calls end here.
    if let Some(t) = cache.read(&p.issuer, &p.client_id) {
        if t.expiry - now_unix() > skew {
            return Ok(t);
        }
    }
    let _lock = cache.lock().await?;
    // Whoever held the lock before may have refreshed already.
    let cached = cache.read(&p.issuer, &p.client_id);
    if let Some(t) = &cached {
        if t.expiry - now_unix() > skew {
            return Ok(t.clone());
        }
    }
    let http = OidcHttpClient::new(p.ca_pem()?.as_deref(), Duration::from_secs(30))
        .map_err(|e| LoginError::Config(e.to_string()))?;
    let provider =
        flows::Provider::discover(&p.issuer, http, &p.client_id, a.client_secret.clone()).await?;
    if let Some(t) = cached.as_ref().filter(|t| t.refresh_token.is_some()) {
        match provider.refresh(t).await {
            Ok(fresh) => {
                cache.write(&fresh)?;
                return Ok(fresh);
            }
            Err(e) => eprintln!("ztgate login: {e}; signing in again"),
        }
    }
    let opts = LoginOptions {
        scopes: p.scopes(),
        listen_port: a.listen_port,
        open_browser: !a.no_browser,
        timeout: a.timeout,
    };
    let fresh = match a.grant {
        Grant::Browser => flows::browser(&provider, &opts).await?,
        Grant::DeviceCode => flows::device_code(&provider, &opts).await?,
    };
    cache.write(&fresh)?;
    eprintln!("ztgate login: signed in");
    Ok(fresh)
}

/// What a sign-in flow needs beyond the provider.
#[derive(Clone, Debug)]
pub struct LoginOptions {
    pub scopes: Vec<String>,
    pub listen_port: u16,
    pub open_browser: bool,
    pub timeout: Duration,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// `ztgate login`: the ExecCredential on stdout, or the reason on stderr and exit 1.
pub fn main_login(a: LoginArgs) -> ExitCode {
    match runtime().block_on(exec_credential(&a)) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ztgate login: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `ztgate logout`: removes every cached token.
pub fn main_logout(a: LogoutArgs) -> ExitCode {
    let result = cache::cache_dir(a.cache_dir.as_deref()).and_then(|d| cache::clear_all(&d));
    match result {
        Ok(n) => {
            eprintln!("ztgate logout: removed {n} cached sign-in(s)");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ztgate logout: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `ztgate kubeconfig`.
pub fn main_kubeconfig(a: KubeconfigArgs) -> ExitCode {
    match kubeconfig_text(&a).and_then(|text| write_output(a.output.as_ref(), &text)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztgate kubeconfig: {e}");
            ExitCode::FAILURE
        }
    }
}

fn pem_arg(
    file: Option<&PathBuf>,
    data: Option<&String>,
    flag: &str,
) -> Result<Option<String>, LoginError> {
    if let Some(p) = file {
        return std::fs::read_to_string(p)
            .map(Some)
            .map_err(|e| LoginError::Config(format!("{}: {e}", p.display())));
    }
    if let Some(d) = data {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(d.trim())
            .map_err(|e| LoginError::Config(format!("--{flag}-data: {e}")))?;
        return String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| LoginError::Config(format!("--{flag}-data is not PEM text")));
    }
    Ok(None)
}

pub fn kubeconfig_text(a: &KubeconfigArgs) -> Result<String, LoginError> {
    let abs = |p: &PathBuf| {
        std::path::absolute(p)
            .map(|p| p.display().to_string())
            .map_err(|e| LoginError::Config(format!("{}: {e}", p.display())))
    };
    let spec = kubeconfig::KubeconfigSpec {
        server: a.server.clone(),
        gateway_ca_pem: pem_arg(
            a.certificate_authority.as_ref(),
            a.certificate_authority_data.as_ref(),
            "certificate-authority",
        )?,
        name: a.name.clone(),
        namespace: a.namespace.clone(),
        plugin: kubeconfig::PluginSpec {
            command: a.login_command.clone(),
            issuer: a.issuer.clone(),
            client_id: a.client_id.clone(),
            issuer_ca_pem: pem_arg(
                a.issuer_certificate_authority.as_ref(),
                a.issuer_certificate_authority_data.as_ref(),
                "issuer-certificate-authority",
            )?,
            scopes: a.scopes.clone(),
            device_code: a.grant == Grant::DeviceCode,
            device_cert: a.device_cert.as_ref().map(abs).transpose()?,
            device_key: a.device_key.as_ref().map(abs).transpose()?,
        },
    };
    Ok(spec.render())
}

fn write_output(path: Option<&PathBuf>, text: &str) -> Result<(), LoginError> {
    let Some(path) = path else {
        print!("{text}");
        return Ok(());
    };
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| LoginError::Config(format!("{}: {e}", path.display())))?;
    f.write_all(text.as_bytes())
        .map_err(|e| LoginError::Config(format!("{}: {e}", path.display())))?;
    eprintln!("ztgate kubeconfig: wrote {}", path.display());
    Ok(())
}
