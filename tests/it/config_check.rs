//! `ztgate config check FILE`, run as the real binary, and the sample configs in `config/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ztgate_testkit::TestPki;

/// A directory with the sample dev config and the certificates it names, under `certs/`.
fn dev_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    let pki = TestPki::new();
    pki.gateway_serving.write(&certs, "gateway-serving");
    pki.gateway_client.write(&certs, "gateway-client");
    std::fs::write(certs.join("users-ca.crt"), pki.users_ca.cert_pem()).unwrap();
    std::fs::write(certs.join("cluster-ca.crt"), pki.cluster_ca.cert_pem()).unwrap();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, sample("dev.yaml")).unwrap();
    (dir, config)
}

fn sample(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn check(file: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ztgate"))
        .args(["config", "check"])
        .arg(file)
        .output()
        .expect("run ztgate")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The 1-based line of the first line of `src` containing `needle`.
fn line_of(src: &str, needle: &str) -> usize {
    src.lines().position(|l| l.contains(needle)).unwrap() + 1
}

#[test]
fn good_config_is_ok() {
    let (_dir, config) = dev_dir();
    let out = check(&config);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "status {:?}\nstdout: {stdout}\nstderr: {}",
        out.status,
        text(&out.stderr)
    );
    assert!(stdout.contains("ok"), "{stdout}");
    assert!(stdout.contains("gateway.yaml"), "{stdout}");
}

#[test]
fn unknown_field_is_reported_with_path_and_line() {
    let (_dir, config) = dev_dir();
    let src = sample("dev.yaml").replace(
        "    keyFile: certs/gateway-serving.key",
        "    keyFlie: certs/gateway-serving.key",
    );
    std::fs::write(&config, &src).unwrap();
    let out = check(&config);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "accepted: {}", text(&out.stdout));
    let line = line_of(&src, "keyFlie");
    let want = format!(
        "gateway.yaml:{line}:5: listener.servingCertificate.keyFlie: unknown field \"keyFlie\""
    );
    assert!(stderr.contains(&want), "want {want:?} in:\n{stderr}");
    assert!(stderr.contains("keyFile"), "{stderr}");
}

#[test]
fn wrong_type_is_reported_with_path_and_line() {
    let (_dir, config) = dev_dir();
    let src = sample("dev.yaml").replace(
        "  request: 60s",
        "  request: 60s\nlimits:\n  maxHeaderBytes: big",
    );
    std::fs::write(&config, &src).unwrap();
    let out = check(&config);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "accepted: {}", text(&out.stdout));
    let line = line_of(&src, "maxHeaderBytes");
    let want = format!("gateway.yaml:{line}:");
    assert!(stderr.contains(&want), "want {want:?} in:\n{stderr}");
    assert!(
        stderr.contains("limits.maxHeaderBytes: invalid type: string \"big\", expected u64"),
        "{stderr}"
    );
}

#[test]
fn semantic_errors_are_all_reported() {
    let (dir, config) = dev_dir();
    std::fs::remove_file(dir.path().join("certs/users-ca.crt")).unwrap();
    let src = sample("dev.yaml")
        .replace("url: https://127.0.0.1:6443", "url: http://127.0.0.1:6443")
        .replace("bundle: users", "bundle: nobody");
    std::fs::write(&config, &src).unwrap();
    let out = check(&config);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    for (path, needle) in [
        (
            "listener.clientCertificateBundles[0].caFile",
            "caFile: certs/users-ca.crt",
        ),
        ("upstream.url", "url: http:"),
        ("authentication.x509.bundle", "bundle: nobody"),
    ] {
        let want = format!("gateway.yaml:{}:", line_of(&src, needle));
        assert!(
            stderr
                .lines()
                .any(|l| l.contains(&want) && l.contains(path)),
            "want {path} at {want} in:\n{stderr}"
        );
    }
    assert!(
        stderr.contains("users-ca.crt"),
        "the missing file is named:\n{stderr}"
    );
}

#[test]
fn missing_config_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = check(&dir.path().join("absent.yaml"));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("absent.yaml"),
        "{}",
        text(&out.stderr)
    );
}

/// The production sample is valid once the files it names exist.
#[test]
fn production_sample_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let root = dir.path();
    let (crt, key) = pki.gateway_serving.write(root, "tls");
    let users = root.join("users-ca.crt");
    let devices = root.join("devices-ca.crt");
    let sa_ca = root.join("sa-ca.crt");
    let token = root.join("token");
    std::fs::write(&users, pki.users_ca.cert_pem()).unwrap();
    std::fs::write(&devices, pki.gateway_ca.cert_pem()).unwrap();
    std::fs::write(&sa_ca, pki.cluster_ca.cert_pem()).unwrap();
    std::fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.e30.c2ln\n").unwrap();
    let src = sample("production.yaml");
    let mut patched = src.clone();
    for (from, to) in [
        ("/etc/ztgate/tls/tls.crt", &crt),
        ("/etc/ztgate/tls/tls.key", &key),
        ("/etc/ztgate/client-ca/users-ca.crt", &users),
        ("/etc/ztgate/client-ca/devices-ca.crt", &devices),
        (
            "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
            &sa_ca,
        ),
        (
            "/var/run/secrets/kubernetes.io/serviceaccount/token",
            &token,
        ),
    ] {
        assert!(patched.contains(from), "{from} not in production.yaml");
        patched = patched.replace(from, &to.display().to_string());
    }
    let file = root.join("production.yaml");
    std::fs::write(&file, &patched).unwrap();
    let cfg = ztgate::config::load_file(&file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.listener.address, "0.0.0.0:8443");
    assert_eq!(cfg.operations.address.as_deref(), Some("0.0.0.0:9090"));
    assert_eq!(cfg.upstream.url, "https://kubernetes.default.svc:443");

    // As written (no files mounted), only the files are reported, each by field and path.
    let file = root.join("as-shipped.yaml");
    std::fs::write(&file, &src).unwrap();
    let errors = ztgate::config::load_file(&file).unwrap_err().errors;
    assert!(!errors.is_empty());
    for e in &errors {
        assert!(e.message.starts_with("cannot read /"), "{e}");
        assert!(e.line.is_some(), "{e}");
    }
}
