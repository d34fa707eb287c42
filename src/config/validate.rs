//! Semantic validation of a parsed [`GatewayConfig`]: everything the schema cannot say.
//!
//! Every check runs, so that one `ztgate config check` lists every problem. Files named by the
//! config are read and parsed (certificates, keys, token), never logged.

use std::net::SocketAddr;
use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::types::{GatewayConfig, API_VERSION, KIND};
use super::CertKeyFiles;
use super::GoDuration;

/// One semantic problem: the field path (camelCase, `[i]` for list items) and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issue {
    pub path: String,
    pub message: String,
}

/// Checks a config whose relative paths are already resolved (see [`super::resolve_paths`]).
/// Returns every problem found; an empty list means the config is usable.
pub fn validate(cfg: &GatewayConfig) -> Vec<Issue> {
    let mut v = Validator::default();
    v.header(&cfg.api_version, &cfg.kind);
    v.listener(cfg);
    if let Some(addr) = &cfg.operations.address {
        v.socket_address("operations.address", addr);
    }
    v.upstream(cfg);
    v.authentication(cfg);
    v.authorization(cfg);
    if let Some(a) = &cfg.audit {
        if let Err(e) = a.validate() {
            v.err(format!("audit.{}", e.field), e.problem.to_string());
        }
    }
    for (path, msg) in crate::sso::config::validate(cfg.sso.as_ref(), &cfg.authentication.jwt) {
        v.err(path, msg);
    }
    if let Some(st) = &cfg.state {
        match (&st.directory, &st.etcd) {
            (Some(_), Some(_)) => v.err("state", "set either directory or etcd, not both"),
            (None, None) => v.err("state", "set directory or etcd"),
            (_, Some(e)) => {
                for (path, msg) in e.validate() {
                    v.err(format!("state.etcd.{path}"), msg);
                }
            }
            (Some(_), None) => {}
        }
    }
    v.timeouts(cfg);
    v.limits(cfg);
    v.logging(cfg);
    v.issues
}

/// Checks only `apiVersion` and `kind`; used before the schema is applied, since a different
/// version may have a different schema.
pub fn check_header(api_version: Option<&str>, kind: Option<&str>) -> Vec<Issue> {
    let mut v = Validator::default();
    match api_version {
        Some(a) => v.api_version(a),
        None => v.err(
            "apiVersion",
            format!("missing; expected apiVersion: {API_VERSION}"),
        ),
    }
    match kind {
        Some(k) => v.kind(k),
        None => v.err("kind", format!("missing; expected kind: {KIND}")),
    }
    v.issues
}

#[derive(Default)]
struct Validator {
    issues: Vec<Issue>,
}

impl Validator {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.issues.push(Issue {
            path: path.into(),
            message: message.into(),
        });
    }

    fn header(&mut self, api_version: &str, kind: &str) {
        self.api_version(api_version);
        self.kind(kind);
    }

    fn api_version(&mut self, found: &str) {
        if found != API_VERSION {
            self.err(
                "apiVersion",
                format!("unsupported apiVersion {found:?}; expected {API_VERSION:?}"),
            );
        }
    }

    fn kind(&mut self, found: &str) {
        if found != KIND {
            self.err(
                "kind",
                format!("unsupported kind {found:?}; expected {KIND:?}"),
            );
        }
    }

    fn listener(&mut self, cfg: &GatewayConfig) {
        let l = &cfg.listener;
        self.socket_address("listener.address", &l.address);
        self.cert_key("listener.servingCertificate", &l.serving_certificate);

        let mut seen: Vec<&str> = Vec::new();
        for (i, b) in l.client_certificate_bundles.iter().enumerate() {
            let base = format!("listener.clientCertificateBundles[{i}]");
            let name_path = format!("{base}.name");
            if b.name.is_empty() {
                self.err(&name_path, "must not be empty");
            } else if !is_dns_label(&b.name) {
                self.err(
                    &name_path,
                    format!(
                        "invalid name {:?}: use lowercase letters, digits and '-', starting and \
                         ending with a letter or digit, at most 63 characters",
                        b.name
                    ),
                );
            } else if let Some(first) = seen.iter().position(|n| *n == b.name) {
                self.err(
                    &name_path,
                    format!(
                        "duplicate name {:?}; already used by \
                         listener.clientCertificateBundles[{first}]",
                        b.name
                    ),
                );
            }
            seen.push(&b.name);
            self.certificates(&format!("{base}.caFile"), &b.ca_file);
        }

        self.positive_duration("listener.reloadInterval", l.reload_interval);
    }

    fn upstream(&mut self, cfg: &GatewayConfig) {
        let u = &cfg.upstream;
        self.upstream_url(&u.url);
        self.certificates("upstream.caFile", &u.ca_file);

        match (&u.client_certificate, &u.token_file) {
            (Some(_), Some(_)) => self.err(
                "upstream.tokenFile",
                "set either upstream.clientCertificate or upstream.tokenFile, not both",
            ),
            (None, None) => self.err(
                "upstream",
                "set one of clientCertificate or tokenFile: the gateway needs an identity \
                 that kube-apiserver allows to impersonate users",
            ),
            _ => {}
        }
        if let Some(ck) = &u.client_certificate {
            self.cert_key("upstream.clientCertificate", ck);
        }
        if let Some(token) = &u.token_file {
            self.token_file("upstream.tokenFile", token);
        }

        if let Some(name) = &u.server_name {
            if ServerName::try_from(name.as_str()).is_err() {
                self.err(
                    "upstream.serverName",
                    format!("{name:?} is not a valid DNS name or IP address"),
                );
            }
        }
        if !u.health_path.starts_with('/') {
            self.err(
                "upstream.healthPath",
                format!(
                    "{:?} must be an absolute path starting with '/', e.g. /readyz",
                    u.health_path
                ),
            );
        } else if u.health_path.contains(['#', ' ']) {
            self.err(
                "upstream.healthPath",
                format!("{:?} is not a valid request path", u.health_path),
            );
        }
    }

    fn upstream_url(&mut self, url: &str) {
        const P: &str = "upstream.url";
        const EXAMPLE: &str = "expected e.g. https://kubernetes.default.svc:443";
        if url.contains('#') {
            self.err(P, format!("{url:?} must not have a fragment; {EXAMPLE}"));
            return;
        }
        let uri: http::Uri = match url.parse() {
            Ok(u) => u,
            Err(e) => {
                self.err(P, format!("{url:?} is not a URL ({e}); {EXAMPLE}"));
                return;
            }
        };
        if uri.scheme_str() != Some("https") {
            self.err(
                P,
                format!("{url:?} must use https:// (the gateway only talks TLS to kube-apiserver); {EXAMPLE}"),
            );
            return;
        }
        let Some(authority) = uri.authority() else {
            self.err(P, format!("{url:?} has no host; {EXAMPLE}"));
            return;
        };
        if authority.as_str().contains('@') {
            self.err(P, format!("{url:?} must not contain user information"));
        }
        if authority.host().is_empty() {
            self.err(P, format!("{url:?} has no host; {EXAMPLE}"));
        }
        // The port, if written, follows the last ':' after an IPv6 literal's ']'.
        let a = authority.as_str();
        let after_host = a.rsplit_once(']').map_or(a, |(_, rest)| rest);
        if let Some((_, port)) = after_host.rsplit_once(':') {
            if !matches!(port.parse::<u16>(), Ok(p) if p > 0) {
                self.err(
                    P,
                    format!("{url:?}: invalid port {port:?}; must be between 1 and 65535"),
                );
            }
        }
        let path = uri.path();
        if !(path.is_empty() || path == "/") {
            self.err(
                P,
                format!("{url:?} must not have a path ({path:?}); the gateway forwards request paths as they are"),
            );
        }
        if uri.query().is_some() {
            self.err(P, format!("{url:?} must not have a query"));
        }
    }

    fn authorization(&mut self, cfg: &GatewayConfig) {
        let Some(a) = &cfg.authorization else { return };
        if a.policies.is_empty() {
            self.err(
                "authorization.policies",
                "must name at least one policy file or directory",
            );
        }
        for (i, p) in a.policies.iter().enumerate() {
            if !p.exists() {
                self.err(
                    format!("authorization.policies[{i}]"),
                    format!("{}: no such file or directory", p.display()),
                );
            }
        }
        if a.reload_interval.get().is_zero() {
            self.err("authorization.reloadInterval", "must be greater than zero");
        }
        if let Some(sar) = &a.subject_access_review {
            const P: &str = "authorization.subjectAccessReview.callerBundle";
            if !cfg
                .listener
                .client_certificate_bundles
                .iter()
                .any(|b| b.name == sar.caller_bundle)
            {
                self.err(
                    P,
                    format!(
                        "{:?} is not a bundle in listener.clientCertificateBundles",
                        sar.caller_bundle
                    ),
                );
            }
        }
        if a.policies.iter().all(|p| p.exists()) && !a.policies.is_empty() {
            if let Err(errs) = crate::authz::cedar::PolicyEngine::load(&a.policies) {
                for e in errs.errors {
                    self.err("authorization.policies", e.to_string());
                }
            }
        }
    }

    fn authentication(&mut self, cfg: &GatewayConfig) {
        super::jwt::validate_jwt(&cfg.authentication.jwt, &mut |path, message| {
            self.issues.push(Issue { path, message })
        });
        if let Some(tr) = &cfg.authentication.token_review {
            const P: &str = "authentication.tokenReview.callerBundle";
            let bundles = &cfg.listener.client_certificate_bundles;
            if tr.caller_bundle.is_empty() {
                self.err(P, "must not be empty");
            } else if !bundles.iter().any(|b| b.name == tr.caller_bundle) {
                self.err(
                    P,
                    format!(
                        "{:?} is not a bundle in listener.clientCertificateBundles",
                        tr.caller_bundle
                    ),
                );
            }
            if cfg.authentication.jwt.is_empty() {
                self.err(
                    "authentication.tokenReview",
                    "needs at least one authentication.jwt issuer to review tokens against",
                );
            }
        }
        if !cfg.authentication.workloads.is_empty() {
            if let Err(e) = crate::device::validate_workload_mappings(&cfg.authentication.workloads)
            {
                self.err("authentication.workloads", e.to_string());
            }
            for (i, w) in cfg.authentication.workloads.iter().enumerate() {
                if !cfg
                    .listener
                    .client_certificate_bundles
                    .iter()
                    .any(|b| b.name == w.bundle)
                {
                    self.err(
                        format!("authentication.workloads[{i}].bundle"),
                        format!(
                            "{:?} is not a bundle in listener.clientCertificateBundles",
                            w.bundle
                        ),
                    );
                }
            }
        }
        if let Some(d) = &cfg.authentication.devices {
            if let Err(e) = d.validate() {
                self.err("authentication.devices", e.to_string());
            }
            if let Some(p) = &d.posture {
                for (field, msg) in p.validate() {
                    self.err(format!("authentication.devices.posture.{field}"), msg);
                }
            }
            if !cfg
                .listener
                .client_certificate_bundles
                .iter()
                .any(|b| b.name == d.bundle)
            {
                self.err(
                    "authentication.devices.bundle",
                    format!(
                        "{:?} is not a bundle in listener.clientCertificateBundles",
                        d.bundle
                    ),
                );
            }
        }
        if let Some(x509) = &cfg.authentication.x509 {
            let bundles = &cfg.listener.client_certificate_bundles;
            if x509.bundle.is_empty() {
                self.err("authentication.x509.bundle", "must not be empty");
            } else if !bundles.iter().any(|b| b.name == x509.bundle) {
                let known: Vec<String> = bundles.iter().map(|b| format!("{:?}", b.name)).collect();
                let known = if known.is_empty() {
                    "none are defined".to_string()
                } else {
                    format!("defined: {}", known.join(", "))
                };
                self.err(
                    "authentication.x509.bundle",
                    format!(
                        "{:?} is not a bundle in listener.clientCertificateBundles ({known})",
                        x509.bundle
                    ),
                );
            }
        }
    }

    fn timeouts(&mut self, cfg: &GatewayConfig) {
        let t = &cfg.timeouts;
        self.positive_duration("timeouts.request", t.request);
        self.positive_duration("timeouts.upstreamConnect", t.upstream_connect);
        self.positive_duration("timeouts.headerRead", t.header_read);
        self.positive_duration("timeouts.tlsHandshake", t.tls_handshake);
        self.positive_duration("timeouts.idleConnection", t.idle_connection);
        self.positive_duration("timeouts.shutdownGrace", t.shutdown_grace);
    }

    fn limits(&mut self, cfg: &GatewayConfig) {
        let l = &cfg.limits;
        const MIN_HEADER: u64 = 1024;
        const MAX_HEADER: u64 = 16 * 1024 * 1024;
        if l.max_header_bytes < MIN_HEADER {
            self.err(
                "limits.maxHeaderBytes",
                format!(
                    "{} is too small; must be at least {MIN_HEADER}",
                    l.max_header_bytes
                ),
            );
        } else if l.max_header_bytes > MAX_HEADER {
            self.err(
                "limits.maxHeaderBytes",
                format!(
                    "{} is too large; must be at most {MAX_HEADER} (16 MiB)",
                    l.max_header_bytes
                ),
            );
        }
        if l.max_request_body_bytes == 0 {
            self.err("limits.maxRequestBodyBytes", "must be greater than 0");
        }
        if l.max_concurrent_streams == 0 {
            self.err("limits.maxConcurrentStreams", "must be at least 1");
        }
        if l.max_inflight_requests == 0 {
            self.err("limits.maxInflightRequests", "must be at least 1");
        }
    }

    fn logging(&mut self, cfg: &GatewayConfig) {
        let level = cfg.logging.level.trim();
        if level.is_empty() {
            self.err(
                "logging.level",
                "must not be empty; e.g. info or ztgate=debug,info",
            );
        } else if let Err(e) = tracing_subscriber::EnvFilter::try_new(level) {
            self.err(
                "logging.level",
                format!("invalid filter {level:?}: {e}; e.g. info or ztgate=debug,info"),
            );
        }
    }

    fn positive_duration(&mut self, path: &str, d: GoDuration) {
        if d.is_zero() {
            self.err(path, "must be greater than 0, e.g. 10s");
        }
    }

    /// `ip:port` or `hostname:port` (a name is resolved when the listener binds; it is not looked
    /// up here, as checking a config never touches the network).
    fn socket_address(&mut self, path: &str, addr: &str) {
        if addr.parse::<SocketAddr>().is_ok() {
            return;
        }
        let host_port_ok = addr.rsplit_once(':').is_some_and(|(host, port)| {
            port.parse::<u16>().is_ok()
                && !host.is_empty()
                && !host.contains(['[', ']', ':'])
                && matches!(ServerName::try_from(host), Ok(ServerName::DnsName(_)))
        });
        if !host_port_ok {
            self.err(
                path,
                format!(
                    "invalid address {addr:?}: expected host:port, e.g. 0.0.0.0:8443, \
                     127.0.0.1:8443, [::]:8443 or localhost:8443"
                ),
            );
        }
    }

    fn read(&mut self, path: &str, file: &Path) -> Option<Vec<u8>> {
        if file.as_os_str().is_empty() {
            self.err(path, "must not be empty");
            return None;
        }
        match std::fs::read(file) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                self.err(path, format!("cannot read {}: {e}", file.display()));
                None
            }
        }
    }

    /// A PEM file holding one or more X.509 certificates.
    fn certificates(&mut self, path: &str, file: &Path) -> Option<Vec<CertificateDer<'static>>> {
        let bytes = self.read(path, file)?;
        let mut certs = Vec::new();
        for (i, item) in CertificateDer::pem_slice_iter(&bytes).enumerate() {
            match item {
                Ok(der) => {
                    if let Err(e) = x509_parser::parse_x509_certificate(&der) {
                        self.err(
                            path,
                            format!(
                                "certificate #{} in {} is not a valid X.509 certificate: {e}",
                                i + 1,
                                file.display()
                            ),
                        );
                        return None;
                    }
                    certs.push(der);
                }
                Err(e) => {
                    self.err(path, format!("{} is not valid PEM: {e}", file.display()));
                    return None;
                }
            }
        }
        if certs.is_empty() {
            self.err(
                path,
                format!(
                    "{} holds no PEM certificate (expected \"-----BEGIN CERTIFICATE-----\")",
                    file.display()
                ),
            );
            return None;
        }
        Some(certs)
    }

    /// A PEM file holding a private key (PKCS#8, PKCS#1 or SEC1).
    fn private_key(&mut self, path: &str, file: &Path) -> Option<PrivateKeyDer<'static>> {
        let bytes = self.read(path, file)?;
        match PrivateKeyDer::from_pem_slice(&bytes) {
            Ok(key) => Some(key),
            Err(rustls_pki_types::pem::Error::NoItemsFound) => {
                self.err(
                    path,
                    format!(
                        "{} holds no PEM private key (expected \"-----BEGIN PRIVATE KEY-----\", \
                         RSA PRIVATE KEY or EC PRIVATE KEY)",
                        file.display()
                    ),
                );
                None
            }
            Err(e) => {
                self.err(path, format!("{} is not valid PEM: {e}", file.display()));
                None
            }
        }
    }

    /// A certificate chain and its private key, which must belong together.
    fn cert_key(&mut self, base: &str, files: &CertKeyFiles) {
        let cert_path = format!("{base}.certFile");
        let key_path = format!("{base}.keyFile");
        let certs = self.certificates(&cert_path, &files.cert_file);
        let key = self.private_key(&key_path, &files.key_file);
        let (Some(certs), Some(key)) = (certs, key) else {
            return;
        };
        let signing_key = match rustls::crypto::aws_lc_rs::sign::any_supported_type(&key) {
            Ok(k) => k,
            Err(e) => {
                self.err(
                    &key_path,
                    format!(
                        "unsupported private key in {}: {e}",
                        files.key_file.display()
                    ),
                );
                return;
            }
        };
        let certified = rustls::sign::CertifiedKey::new(certs, signing_key);
        if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
            certified.keys_match()
        {
            self.err(
                &key_path,
                format!(
                    "the private key in {} does not match the certificate in {} (the first \
                     certificate must be the one the key belongs to)",
                    files.key_file.display(),
                    files.cert_file.display()
                ),
            );
        }
    }

    fn token_file(&mut self, path: &str, file: &Path) {
        let Some(bytes) = self.read(path, file) else {
            return;
        };
        match std::str::from_utf8(&bytes) {
            Ok(s) if s.trim().is_empty() => {
                self.err(path, format!("{} is empty", file.display()));
            }
            Ok(s) if s.trim().contains(char::is_whitespace) => {
                self.err(
                    path,
                    format!("{} does not hold a single token", file.display()),
                );
            }
            Ok(_) => {}
            Err(_) => self.err(path, format!("{} is not UTF-8 text", file.display())),
        }
    }
}

/// An RFC 1123 label: lowercase alphanumerics and '-', alphanumeric at both ends, ≤ 63 chars.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for ok in ["users", "device-ca", "a", "spiffe1"] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "Users", "a_b", "a.b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }
}
