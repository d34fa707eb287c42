//! Loader tests: schema errors with path and line, every semantic error reported, files checked.

use std::path::Path;

use tempfile::TempDir;
use ztgate_testkit::TestPki;

use super::*;

/// A config using every section, with paths relative to the file's directory.
const GOOD: &str = "\
apiVersion: ztgate.dev/v1alpha1
kind: GatewayConfig
listener:
  address: 127.0.0.1:8443
  servingCertificate:
    certFile: certs/gateway.crt
    keyFile: certs/gateway.key
  clientCertificateBundles:
    - name: users
      caFile: certs/users-ca.crt
    - name: devices
      caFile: certs/users-ca.crt
  reloadInterval: 10s
operations:
  address: 127.0.0.1:9090
upstream:
  url: https://127.0.0.1:6443
  caFile: certs/cluster-ca.crt
  clientCertificate:
    certFile: certs/gateway-client.crt
    keyFile: certs/gateway-client.key
  healthPath: /readyz
authentication:
  x509:
    bundle: users
timeouts:
  request: 1m
  upstreamConnect: 5s
  headerRead: 10s
  tlsHandshake: 10s
  shutdownGrace: 30s
limits:
  maxHeaderBytes: 32768
  maxRequestBodyBytes: 3145728
  maxConcurrentStreams: 250
  maxInflightRequests: 400
logging:
  format: text
  level: ztgate=debug,info
";

/// A directory holding `certs/` with a fresh test PKI and a token file.
fn pki_dir() -> (TempDir, TestPki) {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    let pki = TestPki::new();
    pki.gateway_serving.write(&certs, "gateway");
    pki.gateway_client.write(&certs, "gateway-client");
    std::fs::write(certs.join("users-ca.crt"), pki.users_ca.cert_pem()).unwrap();
    std::fs::write(certs.join("cluster-ca.crt"), pki.cluster_ca.cert_pem()).unwrap();
    std::fs::write(certs.join("token"), "eyJhbGciOi.payload.sig\n").unwrap();
    (dir, pki)
}

fn load(src: &str, dir: &Path) -> Result<GatewayConfig, ConfigErrors> {
    load_str(src, "test.yaml", dir)
}

fn load_err(src: &str, dir: &Path) -> Vec<ConfigError> {
    match load(src, dir) {
        Ok(_) => panic!("config was accepted:\n{src}"),
        Err(e) => e.errors,
    }
}

/// The 1-based line of the first line of `src` containing `needle`.
fn line_of(src: &str, needle: &str) -> usize {
    src.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in source"))
        + 1
}

fn find<'a>(errors: &'a [ConfigError], path: &str) -> &'a ConfigError {
    errors
        .iter()
        .find(|e| e.path == path)
        .unwrap_or_else(|| panic!("no error at {path}; got:\n{}", show(errors)))
}

fn show(errors: &[ConfigError]) -> String {
    ConfigErrors {
        errors: errors.to_vec(),
    }
    .to_string()
}

#[test]
fn good_config_loads_and_resolves_relative_paths() {
    let (dir, _pki) = pki_dir();
    let cfg = load(GOOD, dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cfg.listener.serving_certificate.cert_file,
        dir.path().join("certs/gateway.crt")
    );
    assert_eq!(
        cfg.upstream.client_certificate.as_ref().unwrap().key_file,
        dir.path().join("certs/gateway-client.key")
    );
    assert_eq!(
        cfg.listener.client_certificate_bundles[1].ca_file,
        dir.path().join("certs/users-ca.crt")
    );
    assert_eq!(
        cfg.timeouts.request.get(),
        std::time::Duration::from_secs(60)
    );
    assert_eq!(cfg.logging.format, LogFormat::Text);
}

#[test]
fn minimal_config_gets_defaults_and_absolute_paths_stay() {
    let (dir, _pki) = pki_dir();
    let certs = dir.path().join("certs");
    let src = format!(
        "apiVersion: ztgate.dev/v1alpha1\nkind: GatewayConfig\nlistener:\n  address: '[::1]:0'\n  \
         servingCertificate:\n    certFile: {c}/gateway.crt\n    keyFile: {c}/gateway.key\n\
         upstream:\n  url: https://kubernetes.default.svc\n  caFile: {c}/cluster-ca.crt\n  \
         tokenFile: {c}/token\n",
        c = certs.display()
    );
    // base_dir is somewhere else entirely: absolute paths must not be touched.
    let cfg =
        load_str(&src, "min.yaml", Path::new("/nonexistent")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.upstream.token_file.unwrap(), certs.join("token"));
    assert_eq!(cfg.upstream.health_path, "/readyz");
    assert_eq!(cfg.limits.max_header_bytes, 32 * 1024);
    assert_eq!(cfg.listener.reload_interval.to_string(), "10s");
    assert!(cfg.operations.address.is_none());
}

#[test]
fn load_file_resolves_against_the_files_directory() {
    let (dir, _pki) = pki_dir();
    let file = dir.path().join("ztgate.yaml");
    std::fs::write(&file, GOOD).unwrap();
    let cfg = load_file(&file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cfg.upstream.ca_file,
        dir.path().join("certs/cluster-ca.crt")
    );

    let missing = dir.path().join("nope.yaml");
    let err = load_file(&missing).unwrap_err().to_string();
    assert!(err.starts_with(&missing.display().to_string()), "{err}");
    assert!(err.contains("cannot read config file"), "{err}");
}

#[test]
fn unknown_nested_field_names_path_and_line() {
    let (dir, _pki) = pki_dir();
    let src = GOOD.replace(
        "    certFile: certs/gateway.crt",
        "    certFlie: certs/gateway.crt",
    );
    let errors = load_err(&src, dir.path());
    assert_eq!(errors.len(), 1, "{}", show(&errors));
    let e = &errors[0];
    assert_eq!(e.path, "listener.servingCertificate.certFlie");
    assert_eq!(e.line, Some(line_of(&src, "certFlie")));
    assert_eq!(e.column, Some(5));
    assert!(
        e.message.contains("unknown field \"certFlie\""),
        "{}",
        e.message
    );
    assert!(e.message.contains("certFile"), "{}", e.message);
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!(
            "test.yaml:{}:5: listener.servingCertificate.certFlie: unknown field",
            line_of(&src, "certFlie")
        )),
        "{shown}"
    );
}

#[test]
fn unknown_top_level_field_names_path_and_line() {
    let (dir, _pki) = pki_dir();
    let src = format!("{GOOD}upstreams:\n  url: https://x\n");
    let errors = load_err(&src, dir.path());
    assert_eq!(errors.len(), 1, "{}", show(&errors));
    assert_eq!(errors[0].path, "upstreams");
    assert_eq!(errors[0].line, Some(line_of(&src, "upstreams:")));
    assert!(errors[0].message.contains("unknown field \"upstreams\""));
}

#[test]
fn unknown_field_in_a_list_item() {
    let (dir, _pki) = pki_dir();
    let src = GOOD.replace("    - name: devices", "    - nmae: devices");
    let errors = load_err(&src, dir.path());
    assert_eq!(errors[0].path, "listener.clientCertificateBundles[1].nmae");
    assert_eq!(errors[0].line, Some(line_of(&src, "nmae")));
}

#[test]
fn wrong_type_names_path_and_line() {
    let (dir, _pki) = pki_dir();
    let src = GOOD.replace("maxHeaderBytes: 32768", "maxHeaderBytes: big");
    let errors = load_err(&src, dir.path());
    assert_eq!(errors.len(), 1, "{}", show(&errors));
    let e = &errors[0];
    assert_eq!(e.path, "limits.maxHeaderBytes");
    assert_eq!(e.line, Some(line_of(&src, "maxHeaderBytes")));
    assert_eq!(e.message, "invalid type: string \"big\", expected u64");
}

#[test]
fn bad_duration_and_enum_name_the_field() {
    let (dir, _pki) = pki_dir();
    let src = GOOD.replace("request: 1m", "request: 5 minutes");
    let e = &load_err(&src, dir.path())[0];
    assert_eq!(e.path, "timeouts.request");
    assert_eq!(e.line, Some(line_of(&src, "5 minutes")));
    assert_eq!(
        e.message,
        "invalid duration \"5 minutes\": expected e.g. 300ms, 10s, 5m, 1h30m"
    );

    let src = GOOD.replace("format: text", "format: xml");
    let e = &load_err(&src, dir.path())[0];
    assert_eq!(e.path, "logging.format");
    assert!(
        e.message.contains("unknown variant \"xml\""),
        "{}",
        e.message
    );
}

#[test]
fn missing_required_field_is_named() {
    let (dir, _pki) = pki_dir();
    let src = GOOD.replace("  caFile: certs/cluster-ca.crt\n", "");
    let errors = load_err(&src, dir.path());
    let e = &errors[0];
    assert!(
        e.message.contains("missing field \"caFile\""),
        "{}",
        show(&errors)
    );
    assert!(
        e.path == "upstream" || e.path.is_empty(),
        "{}",
        show(&errors)
    );
    assert!(e.line.is_some());
}

#[test]
fn yaml_syntax_error_has_line_and_column() {
    let (dir, _pki) = pki_dir();
    let src = GOOD.replace("  address: 127.0.0.1:8443", "  address: 127.0.0.1: 8443");
    let errors = load_err(&src, dir.path());
    assert_eq!(errors.len(), 1, "{}", show(&errors));
    let e = &errors[0];
    assert_eq!(e.line, Some(line_of(&src, "127.0.0.1: 8443")), "{e}");
    assert!(e.column.is_some());
    assert!(e.message.contains("mapping values are not allowed"), "{e}");
    // The position is printed once, in front, not again in the message.
    assert!(!e.message.contains(" at line "), "{e}");

    // An unclosed flow list: the error cites where the list began, too.
    let src = GOOD.replace("  address: 127.0.0.1:8443", "  address: [127.0.0.1:8443");
    let errors = load_err(&src, dir.path());
    assert!(errors[0].line.is_some(), "{}", show(&errors));
    assert!(
        errors[0].message.contains("flow sequence"),
        "{}",
        show(&errors)
    );
}

#[test]
fn empty_file_and_non_mapping_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let e = &load_err("# nothing here\n", dir.path())[0];
    assert!(e.message.contains("empty"), "{e}");
    let e = &load_err("- a\n- b\n", dir.path())[0];
    assert!(e.message.contains("expected a mapping"), "{e}");
}

#[test]
fn wrong_api_version_and_kind_are_reported_alone() {
    let (dir, _pki) = pki_dir();
    let src = GOOD
        .replace("ztgate.dev/v1alpha1", "ztgate.dev/v2")
        .replace("kind: GatewayConfig", "kind: Gateway")
        .replace("maxHeaderBytes: 32768", "maxHeaderBytes: big");
    let errors = load_err(&src, dir.path());
    assert_eq!(errors.len(), 2, "{}", show(&errors));
    assert_eq!(errors[0].path, "apiVersion");
    assert_eq!(errors[0].line, Some(1));
    assert_eq!(
        errors[0].message,
        "unsupported apiVersion \"ztgate.dev/v2\"; expected \"ztgate.dev/v1alpha1\""
    );
    assert_eq!(errors[1].path, "kind");
    assert_eq!(errors[1].line, Some(2));

    let src = GOOD.replace("apiVersion: ztgate.dev/v1alpha1\n", "");
    let errors = load_err(&src, dir.path());
    assert_eq!(errors[0].path, "apiVersion");
    assert!(errors[0].message.contains("missing"));
}

#[test]
fn every_semantic_error_is_reported_with_its_line() {
    let (dir, _pki) = pki_dir();
    let src = GOOD
        .replace("address: 127.0.0.1:8443", "address: localhost")
        .replace("address: 127.0.0.1:9090", "address: ':notaport'")
        .replace("keyFile: certs/gateway.key", "keyFile: certs/missing.key")
        .replace("- name: devices", "- name: users")
        .replace(
            "url: https://127.0.0.1:6443",
            "url: http://127.0.0.1:6443/api",
        )
        .replace(
            "healthPath: /readyz",
            "healthPath: readyz\n  tokenFile: certs/token",
        )
        .replace("bundle: users", "bundle: admins")
        .replace("upstreamConnect: 5s", "upstreamConnect: 0s")
        .replace("reloadInterval: 10s", "reloadInterval: 0")
        .replace("maxHeaderBytes: 32768", "maxHeaderBytes: 100")
        .replace("maxConcurrentStreams: 250", "maxConcurrentStreams: 0")
        .replace("level: ztgate=debug,info", "level: 'ztgate=loud'");
    let errors = load_err(&src, dir.path());
    let expect = [
        ("listener.address", "address: localhost"),
        ("operations.address", "notaport"),
        ("listener.servingCertificate.keyFile", "missing.key"),
        (
            "listener.clientCertificateBundles[1].name",
            "- name: users\n      caFile: certs/users-ca.crt\n  reloadInterval",
        ),
        ("listener.reloadInterval", "reloadInterval"),
        ("upstream.url", "url: http:"),
        ("upstream.tokenFile", "tokenFile"),
        ("upstream.healthPath", "healthPath"),
        ("authentication.x509.bundle", "bundle: admins"),
        ("timeouts.upstreamConnect", "upstreamConnect"),
        ("limits.maxHeaderBytes", "maxHeaderBytes"),
        ("limits.maxConcurrentStreams", "maxConcurrentStreams"),
        ("logging.level", "level:"),
    ];
    for (path, needle) in expect {
        let e = find(&errors, path);
        let want_line = if needle.contains('\n') {
            // The second "- name: users" line.
            let at = src.find(needle).unwrap();
            src[..at].matches('\n').count() + 1
        } else {
            line_of(&src, needle)
        };
        assert_eq!(e.line, Some(want_line), "{e}");
    }
    assert_eq!(errors.len(), expect.len(), "{}", show(&errors));
    // Sorted in file order.
    let lines: Vec<usize> = errors.iter().map(|e| e.line.unwrap()).collect();
    assert!(lines.windows(2).all(|w| w[0] <= w[1]), "{lines:?}");

    let missing = find(&errors, "listener.servingCertificate.keyFile");
    assert!(
        missing
            .message
            .contains(&dir.path().join("certs/missing.key").display().to_string()),
        "{missing}"
    );
    assert!(find(&errors, "listener.clientCertificateBundles[1].name")
        .message
        .contains("duplicate name \"users\""));
    assert!(find(&errors, "upstream.url").message.contains("https://"));
    assert!(find(&errors, "authentication.x509.bundle")
        .message
        .contains("\"admins\""));
}

#[test]
fn address_rules() {
    let (dir, _pki) = pki_dir();
    for bad in [
        "localhost",
        "8443",
        ":8443",
        "127.0.0.1:http",
        "127.0.0.1:70000",
        "::1:8443",
        "a b:1",
    ] {
        let src = GOOD.replace("address: 127.0.0.1:8443", &format!("address: '{bad}'"));
        let errors = load_err(&src, dir.path());
        assert_eq!(find(&errors, "listener.address").line, Some(4), "{bad}");
    }
    for good in [
        "0.0.0.0:8443",
        "[::]:0",
        "localhost:8443",
        "gateway.example.com:443",
    ] {
        let src = GOOD.replace("address: 127.0.0.1:8443", &format!("address: '{good}'"));
        load(&src, dir.path()).unwrap_or_else(|e| panic!("{good}: {e}"));
    }
}

#[test]
fn url_rules() {
    let (dir, _pki) = pki_dir();
    let bad = [
        "https://host/api",
        "https://host?x=1",
        "https://host#frag",
        "https://user@host",
        "https://host:99999",
        "https://host:0",
        "https://:443",
        "ftp://host",
        "host:443",
    ];
    for url in bad {
        let src = GOOD.replace("https://127.0.0.1:6443", url);
        let errors = load_err(&src, dir.path());
        assert!(
            errors.iter().any(|e| e.path == "upstream.url"),
            "{url}: {}",
            show(&errors)
        );
    }
    for url in [
        "https://host",
        "https://host/",
        "https://[::1]:6443",
        "https://10.0.0.1:443",
    ] {
        let src = GOOD.replace("https://127.0.0.1:6443", url);
        load(&src, dir.path()).unwrap_or_else(|e| panic!("{url}: {e}"));
    }
}

#[test]
fn upstream_identity_is_required() {
    let (dir, _pki) = pki_dir();
    let src = GOOD.replace(
        "  clientCertificate:\n    certFile: certs/gateway-client.crt\n    keyFile: certs/gateway-client.key\n",
        "",
    );
    let errors = load_err(&src, dir.path());
    let e = find(&errors, "upstream");
    assert!(e.message.contains("clientCertificate or tokenFile"), "{e}");
    assert_eq!(e.line, Some(line_of(&src, "upstream:")));

    // A token file alone is fine; an empty one is not.
    let with_token = src.replace("  healthPath", "  tokenFile: certs/token\n  healthPath");
    load(&with_token, dir.path()).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("certs/token"), "\n").unwrap();
    let errors = load_err(&with_token, dir.path());
    assert!(find(&errors, "upstream.tokenFile")
        .message
        .contains("is empty"));
}

#[test]
fn bad_pem_files_are_explained() {
    let (dir, pki) = pki_dir();
    let certs = dir.path().join("certs");
    // A key where a certificate belongs, and a certificate where a key belongs.
    std::fs::write(certs.join("gateway.crt"), &pki.gateway_serving.key_pem).unwrap();
    std::fs::write(
        certs.join("gateway-client.key"),
        &pki.gateway_client.cert_pem,
    )
    .unwrap();
    std::fs::write(certs.join("users-ca.crt"), "not pem at all\n").unwrap();
    let errors = load_err(GOOD, dir.path());
    assert!(find(&errors, "listener.servingCertificate.certFile")
        .message
        .contains("holds no PEM certificate"));
    assert!(find(&errors, "upstream.clientCertificate.keyFile")
        .message
        .contains("holds no PEM private key"));
    // Both bundles point at the broken file: both are reported.
    find(&errors, "listener.clientCertificateBundles[0].caFile");
    find(&errors, "listener.clientCertificateBundles[1].caFile");
}

#[test]
fn key_that_does_not_match_the_certificate_is_reported() {
    let (dir, pki) = pki_dir();
    std::fs::write(
        dir.path().join("certs/gateway.key"),
        &pki.gateway_client.key_pem,
    )
    .unwrap();
    let errors = load_err(GOOD, dir.path());
    assert_eq!(errors.len(), 1, "{}", show(&errors));
    let e = find(&errors, "listener.servingCertificate.keyFile");
    assert!(e.message.contains("does not match"), "{e}");
}

#[test]
fn display_without_path_or_line() {
    let e = ConfigError {
        origin: "x.yaml".into(),
        path: String::new(),
        line: None,
        column: None,
        message: "boom".into(),
    };
    assert_eq!(e.to_string(), "x.yaml: boom");
}
