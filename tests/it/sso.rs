//! SSO end to end, with a real OpenID Provider (npm `oidc-provider`, tests/oidc-provider) and a
//! real browser (Debian's headless chromium through chromedriver): the gateway's web login, the
//! kubeconfig it offers, `ztgate login` as kubectl's exec plugin (browser + PKCE on a loopback
//! redirect, device code, cache, refresh, one sign-in for many parallel kubectl calls), and the
//! callback's refusals.

use crate::support;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use fantoccini::{Client, ClientBuilder, Locator};
use http::Request;
use http_body_util::Full;
use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use ztgate::demo::{DevSettings, DevSso};
use ztgate_testkit::pki::Ca;

const USER: &str = "alice";
const PASSWORD: &str = "wonderland";
const EMAIL: &str = "alice@example.com";
const GATEWAY_CLIENT: &str = "ztgate-gateway";
const GATEWAY_SECRET: &str = "gateway-client-secret-for-tests-only";
const CLI_CLIENT: &str = "ztgate-cli";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn artifacts() -> PathBuf {
    let d = repo().join("target").join("test-artifacts");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The OpenID Provider, a node process on an ephemeral loopback port.
struct Op {
    child: tokio::process::Child,
    issuer: String,
    ca_pem: String,
    client: RawClient,
}

impl Op {
    async fn start(dir: &Path, token_ttl_secs: u64) -> Op {
        let op_dir = repo().join("tests").join("oidc-provider");
        assert!(
            op_dir.join("node_modules").join("oidc-provider").exists(),
            "tests/oidc-provider/node_modules is missing: run scripts/install-test-deps"
        );
        let ca = Ca::new("ztgate test OpenID Provider CA");
        let ck = ca.issue_localhost_server("op");
        let (crt, key) = ck.write(dir, "op");
        let mut child = tokio::process::Command::new("node")
            .arg(op_dir.join("server.js"))
            .current_dir(&op_dir)
            .env("OP_TLS_CERT", crt)
            .env("OP_TLS_KEY", key)
            .env("OP_TOKEN_TTL", token_ttl_secs.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // The provider's own errors, in the test's output when it fails.
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("the provider starts within 60s")
            .unwrap()
            .expect("the provider prints its issuer");
        let v: Value = serde_json::from_str(&first).unwrap();
        let issuer = v["issuer"].as_str().unwrap().to_owned();
        let ca_pem = ca.cert_pem();
        let client = raw_client(&ca_pem, None, false);
        Op {
            child,
            issuer,
            ca_pem,
            client,
        }
    }

    async fn register_gateway(&self, gateway_url: &str) {
        let body = json!({
            "client_id": GATEWAY_CLIENT,
            "client_secret": GATEWAY_SECRET,
            "client_name": "ztgate gateway",
            "redirect_uris": [format!("{gateway_url}/callback")],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "client_secret_basic",
        });
        let req = Request::post(format!("{}/test/clients", self.issuer))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let (status, _, text) = send(&self.client, req).await;
        assert_eq!(status, 201, "{text}");
    }

    /// Successful token grants by type, and completed password logins.
    async fn stats(&self) -> Value {
        let (status, _, text) =
            send(&self.client, get(&format!("{}/test/stats", self.issuer))).await;
        assert_eq!(status, 200);
        serde_json::from_str(&text).unwrap()
    }

    async fn stop(mut self) {
        drop(self.child.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// A gateway with the web login, in front of the stand-in kube-apiserver, and the provider.
struct Env {
    op: Op,
    h: Harness,
    _serial: std::fs::File,
}

/// One SSO test at a time across nextest's processes: each runs a browser, a provider, a
/// gateway and kubectl, and the refresh test counts seconds.
async fn serial() -> std::fs::File {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(artifacts().join(".sso-tests.lock"))
        .unwrap();
    tokio::task::spawn_blocking(move || {
        fs4::fs_std::FileExt::lock_exclusive(&f).unwrap();
        f
    })
    .await
    .unwrap()
}

async fn env(token_ttl_secs: u64) -> Env {
    let serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let op = Op::start(dir.path(), token_ttl_secs).await;
    let h = Harness::start_with(DevSettings {
        sso: Some(DevSso {
            issuer_url: op.issuer.clone(),
            issuer_ca_pem: op.ca_pem.clone(),
            client_id: GATEWAY_CLIENT.into(),
            client_secret: GATEWAY_SECRET.into(),
            cli_client_id: CLI_CLIENT.into(),
            cli_scopes: vec!["openid".into(), "email".into(), "groups".into()],
        }),
        ..Default::default()
    })
    .await;
    op.register_gateway(h.url()).await;
    // Keep the provider's certificate files as long as the harness.
    std::mem::forget(dir);
    Env {
        op,
        h,
        _serial: serial,
    }
}

/// Headless chromium through chromedriver on an ephemeral loopback port.
struct Browser {
    client: Client,
    _driver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// chromedriver on an ephemeral port, and that port; or what it printed before exiting.
    async fn start_driver() -> Result<(tokio::process::Child, u16), String> {
        let mut driver = tokio::process::Command::new("chromedriver")
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver runs (scripts/install-test-deps installs it)");
        let mut lines = BufReader::new(driver.stdout.take().unwrap()).lines();
        let mut errors = BufReader::new(driver.stderr.take().unwrap()).lines();
        let mut said = Vec::new();
        let port = tokio::time::timeout(Duration::from_secs(20), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.split("started successfully on port ").nth(1) {
                    return rest.trim_end_matches('.').trim().parse::<u16>().ok();
                }
                said.push(line);
            }
            None
        })
        .await
        .expect("chromedriver starts within 20s");
        let Some(port) = port else {
            while let Ok(Some(line)) = errors.next_line().await {
                said.push(line);
            }
            return Err(format!("exited before listening: {}", said.join(" | ")));
        };
        // Keep draining its output so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        tokio::spawn(async move { while let Ok(Some(_)) = errors.next_line().await {} });
        Ok((driver, port))
    }

    async fn start() -> Browser {
        // chromedriver occasionally exits before it listens (seen once in ~20 CI runs, on a
        // busy machine); a fixture's start-up, so it gets three tries, and the last failure
        // says what chromedriver printed.
        let mut tries = 0;
        let (driver, port) = loop {
            match Self::start_driver().await {
                Ok(d) => break d,
                Err(why) if tries < 2 => {
                    tries += 1;
                    eprintln!("chromedriver, try {tries}: {why}");
                }
                Err(why) => panic!("chromedriver, try 3: {why}"),
            }
        };
        let profile = tempfile::tempdir().unwrap();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--window-size=1100,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        // The gateway and the provider use the tests' own CAs.
        caps.insert("acceptInsecureCerts".into(), json!(true));
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a WebDriver session with chromium");
        Browser {
            client,
            _driver: driver,
            _profile: profile,
        }
    }

    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        std::fs::write(artifacts().join(name), png).unwrap();
    }

    async fn text(&self, css: &str) -> String {
        self.client
            .wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css} not found: {e}"))
            .text()
            .await
            .unwrap()
    }

    /// Fills the provider's sign-in form (the browser must be on it).
    async fn sign_in(&self) {
        let c = &self.client;
        let login = c
            .wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css("#login"))
            .await
            .expect("the provider's sign-in page");
        login.send_keys(USER).await.unwrap();
        c.find(Locator::Css("#password"))
            .await
            .unwrap()
            .send_keys(PASSWORD)
            .await
            .unwrap();
        c.find(Locator::Css("#submit"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    /// Waits for a page whose `h1` contains `text`; on failure shows where the browser is.
    async fn expect_h1(&self, text: &str) {
        for _ in 0..100 {
            if let Ok(h) = self.client.find(Locator::Css("h1")).await {
                if h.text().await.unwrap_or_default().contains(text) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let url = self.client.current_url().await.unwrap();
        let source = self.client.source().await.unwrap_or_default();
        panic!("no h1 with {text:?} at {url}:\n{source}");
    }

    async fn close(self) {
        let _ = self.client.close().await;
    }
}

/// Where kubectl finds `ztgate`, and what `$BROWSER` does: record the URL for the test to open.
struct PluginEnv {
    dir: PathBuf,
    path: String,
    browser: PathBuf,
}

impl PluginEnv {
    fn new(dir: &Path) -> PluginEnv {
        let bin = Path::new(env!("CARGO_BIN_EXE_ztgate")).parent().unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let browser = dir.join("browser.sh");
        std::fs::write(
            &browser,
            "#!/bin/sh\nprintf '%s\\n' \"$1\" >> \"$(dirname \"$0\")/opened-urls\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&browser, std::fs::Permissions::from_mode(0o755)).unwrap();
        PluginEnv {
            dir: dir.to_owned(),
            path,
            browser,
        }
    }

    fn cache(&self) -> PathBuf {
        self.dir.join("cache")
    }

    fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("PATH", self.path.clone()),
            ("BROWSER", self.browser.display().to_string()),
            ("XDG_CACHE_HOME", self.cache().display().to_string()),
        ]
    }

    /// The next URL `ztgate login` asked the browser to open.
    async fn opened_url(&self, nth: usize) -> String {
        let file = self.dir.join("opened-urls");
        for _ in 0..400 {
            if let Ok(text) = std::fs::read_to_string(&file) {
                if let Some(line) = text.lines().nth(nth) {
                    return line.to_owned();
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("ztgate login did not open a browser");
    }

    fn cache_files(&self) -> Vec<PathBuf> {
        let d = self.cache().join("ztgate");
        let mut v: Vec<PathBuf> = std::fs::read_dir(&d)
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

fn kubectl_with(
    kc: &Path,
    args: &[&str],
    vars: &[(&'static str, String)],
) -> tokio::process::Command {
    let v: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    kubectl_command(kc, args, &v)
}

async fn finish(cmd: tokio::process::Child) -> std::process::Output {
    tokio::time::timeout(Duration::from_secs(60), cmd.wait_with_output())
        .await
        .expect("finished within 60s")
        .unwrap()
}

fn out(o: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn assert_private(files: &[PathBuf]) {
    assert!(!files.is_empty());
    for f in files {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", f.display());
    }
    let dir = files[0].parent().unwrap();
    let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{} has mode {mode:o}", dir.display());
}

/// Runs the `ztgate kubeconfig …` command shown on the signed-in page, in `dir`.
async fn run_page_command(command: &str, dir: &Path) -> PathBuf {
    let words: Vec<&str> = command.split_whitespace().collect();
    assert_eq!(words[..2], ["ztgate", "kubeconfig"], "{command}");
    let o = tokio::process::Command::new(env!("CARGO_BIN_EXE_ztgate"))
        .args(&words[1..])
        .current_dir(dir)
        .output()
        .await
        .unwrap();
    assert!(o.status.success(), "{}", out(&o));
    let output = words[words.iter().position(|w| *w == "--output").unwrap() + 1];
    dir.join(output)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_login_offers_a_kubeconfig_and_kubectl_then_works_from_the_plugin_cache() {
    let e = env(300).await;
    let b = Browser::start().await;
    let work = tempfile::tempdir().unwrap();

    // The web login: the gateway sends the browser to the provider, which sends it back.
    b.client.goto(&e.h.uri("/login")).await.unwrap();
    b.client
        .wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Css("#login"))
        .await
        .unwrap();
    let at_provider = b.client.current_url().await.unwrap();
    assert!(
        at_provider.as_str().starts_with(&e.op.issuer),
        "{at_provider}"
    );
    b.screenshot("sso-provider-sign-in.png").await;
    b.sign_in().await;
    assert_eq!(b.text("#user").await, EMAIL);
    assert_eq!(b.text("#groups").await, "team-a");
    let here = b.client.current_url().await.unwrap();
    assert_eq!(here.as_str(), e.h.uri("/login"));
    b.screenshot("sso-signed-in.png").await;

    // The session cookie is what the page says it is.
    let cookie = b
        .client
        .get_named_cookie("__Host-ztgate-session")
        .await
        .expect("a session cookie");
    assert_eq!(cookie.secure(), Some(true));
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(format!("{:?}", cookie.same_site()), "Some(Lax)");

    // The download and the copyable command give the same kubeconfig.
    let client = e.h.client(None, false);
    let req = Request::get(e.h.uri("/kubeconfig"))
        .header(
            "cookie",
            format!("__Host-ztgate-session={}", cookie.value()),
        )
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, headers, downloaded) = send(&client, req).await;
    assert_eq!(status, 200);
    assert!(headers["content-disposition"]
        .to_str()
        .unwrap()
        .starts_with("attachment"));
    assert!(downloaded.contains("command: ztgate"), "{downloaded}");
    let command = b.text("#command").await;
    let kc = run_page_command(&command, work.path()).await;
    assert_eq!(std::fs::read_to_string(&kc).unwrap(), downloaded);

    // kubectl: the first call signs in through the plugin; the provider already knows the
    // browser, so no password is asked; the second call is served from the cache.
    let plugin = PluginEnv::new(work.path());
    let before = e.op.stats().await;
    let first = kubectl_with(&kc, &["auth", "whoami", "-o", "json"], &plugin.vars())
        .spawn()
        .unwrap();
    let url = plugin.opened_url(0).await;
    assert!(url.contains("code_challenge_method=S256"), "{url}");
    assert!(
        url.contains("redirect_uri=http%3A%2F%2F127.0.0.1%3A"),
        "{url}"
    );
    b.client.goto(&url).await.unwrap();
    b.expect_h1("Signed in").await;
    let o = finish(first).await;
    assert!(o.status.success(), "{}", out(&o));
    let who: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(who["status"]["userInfo"]["username"], EMAIL, "{}", out(&o));
    let after_login = e.op.stats().await;
    assert_eq!(
        after_login["authorization_code"],
        before["authorization_code"].as_u64().unwrap() + 1
    );
    assert_eq!(
        after_login["logins"], before["logins"],
        "no second password prompt"
    );

    let o = finish(
        kubectl_with(&kc, &["auth", "whoami", "-o", "json"], &plugin.vars())
            .spawn()
            .unwrap(),
    )
    .await;
    assert!(o.status.success(), "{}", out(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains(EMAIL));
    assert_eq!(e.op.stats().await, after_login, "served from the cache");
    assert_private(&plugin.cache_files());

    // Sign out of the page: the session cookie is dropped.
    b.client.goto(&e.h.uri("/login")).await.unwrap();
    b.client
        .find(Locator::Css("form[action='/logout'] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.expect_h1("signed out").await;
    b.screenshot("sso-signed-out.png").await;
    assert!(b
        .client
        .get_named_cookie("__Host-ztgate-session")
        .await
        .is_err());

    // ztgate logout empties the cache.
    let o = tokio::process::Command::new(env!("CARGO_BIN_EXE_ztgate"))
        .arg("logout")
        .env("XDG_CACHE_HOME", plugin.cache())
        .output()
        .await
        .unwrap();
    assert!(o.status.success(), "{}", out(&o));
    assert!(plugin
        .cache_files()
        .iter()
        .all(|f| !f.to_string_lossy().ends_with(".json")));
    b.close().await;
    e.op.stop().await;
}

fn login_args(e: &Env, cache: &Path) -> Vec<String> {
    let ca = cache.join("op-ca.crt");
    std::fs::create_dir_all(cache).unwrap();
    std::fs::write(&ca, &e.op.ca_pem).unwrap();
    [
        "login",
        "--issuer",
        &e.op.issuer,
        "--client-id",
        CLI_CLIENT,
        "--scope",
        "openid",
        "--scope",
        "email",
        "--scope",
        "groups",
        "--issuer-certificate-authority",
        &ca.display().to_string(),
        "--timeout",
        "60s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn gateway_kubeconfig(e: &Env, dir: &Path, extra: &[&str]) -> PathBuf {
    let out = dir.join("kubeconfig");
    let ca = dir.join("op-ca.crt");
    std::fs::write(&ca, &e.op.ca_pem).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ztgate"))
        .args([
            "kubeconfig",
            "--server",
            e.h.url(),
            "--issuer",
            &e.op.issuer,
        ])
        .args([
            "--client-id",
            CLI_CLIENT,
            "--scope",
            "openid",
            "--scope",
            "email",
        ])
        .args(["--scope", "groups"])
        .arg("--certificate-authority")
        .arg(&e.h.demo.env.gateway_ca_path)
        .arg("--issuer-certificate-authority")
        .arg(&ca)
        .args(extra)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out_std(&o));
    out
}

fn out_std(o: &std::process::Output) -> String {
    out(o)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_browser_flow_signs_in_through_the_loopback_redirect_with_pkce() {
    let e = env(300).await;
    let b = Browser::start().await;
    let work = tempfile::tempdir().unwrap();
    let plugin = PluginEnv::new(work.path());
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_ztgate"));
    cmd.args(login_args(&e, &plugin.cache()))
        .env("BROWSER", &plugin.browser)
        .env("XDG_CACHE_HOME", plugin.cache())
        .env(
            "KUBERNETES_EXEC_INFO",
            r#"{"kind":"ExecCredential","apiVersion":"client.authentication.k8s.io/v1","spec":{"interactive":false}}"#,
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().unwrap();
    let url = plugin.opened_url(0).await;
    let auth: HashMap<String, String> = openidconnect::url::Url::parse(&url)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect();
    assert_eq!(auth["code_challenge_method"], "S256");
    assert_eq!(auth["response_type"], "code");
    assert!(auth.contains_key("state") && auth.contains_key("nonce"));
    let redirect = auth["redirect_uri"].clone();
    assert!(redirect.starts_with("http://127.0.0.1:") && redirect.ends_with("/callback"));

    // Something else knocking at the loopback port with the wrong state does not end the wait.
    let probe = send(
        &raw_http_client(),
        get(&format!("{redirect}?code=stolen&state=wrong")),
    )
    .await;
    assert_eq!(probe.0, 400);

    // The test is the browser: sign in at the provider, which redirects to the loopback.
    b.client.goto(&url).await.unwrap();
    b.sign_in().await;
    b.expect_h1("Signed in").await;
    b.screenshot("sso-cli-loopback-done.png").await;
    let o = finish(child).await;
    assert!(o.status.success(), "{}", out(&o));
    let cred: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(cred["apiVersion"], "client.authentication.k8s.io/v1");
    assert_eq!(cred["kind"], "ExecCredential");
    let token = cred["status"]["token"].as_str().unwrap();
    assert_eq!(token.split('.').count(), 3, "a JWT");
    assert!(cred["status"]["expirationTimestamp"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains(token),
        "never a token on stderr"
    );
    assert_private(&plugin.cache_files());

    // An enrolled device: the same cached token, and the device certificate for kubectl to
    // present.
    let device = e.h.demo.env.pki.user("laptop-7", &[]);
    let (crt, key) = device.write(work.path(), "device");
    let o = tokio::process::Command::new(env!("CARGO_BIN_EXE_ztgate"))
        .args(login_args(&e, &plugin.cache()))
        .arg("--device-cert")
        .arg(&crt)
        .arg("--device-key")
        .arg(&key)
        .env("XDG_CACHE_HOME", plugin.cache())
        .output()
        .await
        .unwrap();
    assert!(o.status.success(), "{}", out(&o));
    let with_device: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(with_device["status"]["token"], token);
    assert_eq!(
        with_device["status"]["clientCertificateData"],
        device.cert_pem
    );
    assert_eq!(with_device["status"]["clientKeyData"], device.key_pem);

    // kubectl with the same cache: no new sign-in.
    let kc = gateway_kubeconfig(&e, work.path(), &[]);
    let before = e.op.stats().await;
    let o = finish(
        kubectl_with(&kc, &["auth", "whoami"], &plugin.vars())
            .spawn()
            .unwrap(),
    )
    .await;
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(EMAIL),
        "{}",
        out(&o)
    );
    assert_eq!(e.op.stats().await, before);
    b.close().await;
    e.op.stop().await;
}

/// A plain-HTTP client (for the loopback listener).
fn raw_http_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new())
}

async fn send<C>(
    client: &hyper_util::client::legacy::Client<C, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> (u16, http::HeaderMap, String)
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("response within 20s")
        .expect("response");
    read_all(resp).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_code_flow_prints_url_and_code_and_signs_in() {
    let e = env(300).await;
    let b = Browser::start().await;
    let work = tempfile::tempdir().unwrap();
    let plugin = PluginEnv::new(work.path());
    let mut args = login_args(&e, &plugin.cache());
    args.extend(["--grant".to_owned(), "device-code".to_owned()]);
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ztgate"))
        .args(&args)
        .env("XDG_CACHE_HOME", plugin.cache())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut plain, mut complete) = (String::new(), String::new());
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            if line.contains("enter the code") {
                plain = line;
            } else if let Some(u) = line.strip_prefix("ztgate login: or open ") {
                complete = u.to_owned();
                break;
            }
        }
    })
    .await
    .expect("the plugin prints where to sign in");
    let code = plain.rsplit(' ').next().unwrap().to_owned();
    assert!(
        plain.contains(&format!("{}/device", e.op.issuer)),
        "{plain}"
    );
    assert!(
        !code.is_empty() && complete.contains("user_code="),
        "{plain} / {complete}"
    );

    // The user, on another machine: confirm the code, sign in.
    b.client.goto(&complete).await.unwrap();
    let confirm = b
        .client
        .wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Css("button[autofocus]"))
        .await
        .unwrap();
    b.screenshot("sso-device-confirm.png").await;
    confirm.click().await.unwrap();
    b.sign_in().await;
    b.expect_h1("Signed in").await;
    let o = finish(child).await;
    assert!(o.status.success(), "{}", out(&o));
    let cred: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(cred["status"]["token"].as_str().is_some());
    assert_eq!(e.op.stats().await["device_code"], 1);

    // kubectl with a device-code kubeconfig: from the cache.
    let kc = gateway_kubeconfig(&e, work.path(), &["--grant", "device-code"]);
    assert!(std::fs::read_to_string(&kc)
        .unwrap()
        .contains("device-code"));
    let o = finish(
        kubectl_with(&kc, &["auth", "whoami"], &plugin.vars())
            .spawn()
            .unwrap(),
    )
    .await;
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(EMAIL),
        "{}",
        out(&o)
    );
    b.close().await;
    e.op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_tokens_are_refreshed_once_for_twenty_parallel_kubectl_calls() {
    // Tokens live 40s and are refreshed when less than 30s are left: fresh for 10s after issue.
    let e = env(40).await;
    let b = Browser::start().await;
    let work = tempfile::tempdir().unwrap();
    let plugin = PluginEnv::new(work.path());
    let kc = gateway_kubeconfig(&e, work.path(), &[]);
    let mut vars = plugin.vars();
    vars.push(("ZTGATE_REFRESH_SKEW", "30s".into()));

    let first = kubectl_with(&kc, &["auth", "whoami"], &vars)
        .spawn()
        .unwrap();
    b.client.goto(&plugin.opened_url(0).await).await.unwrap();
    b.sign_in().await;
    let o = finish(first).await;
    assert!(o.status.success(), "{}", out(&o));
    let signed_in = e.op.stats().await;
    assert_eq!(signed_in["authorization_code"], 1);
    assert_eq!(signed_in["refresh_token"], 0);
    let token_file = plugin
        .cache_files()
        .into_iter()
        .find(|f| f.extension().is_some_and(|x| x == "json"))
        .unwrap();
    let before: Value = serde_json::from_slice(&std::fs::read(&token_file).unwrap()).unwrap();

    // Past the fresh window: twenty kubectl calls at once. (The sleep is the case under test:
    // the cached token must age past the window.)
    tokio::time::sleep(Duration::from_secs(11)).await;
    let mut calls = Vec::new();
    for _ in 0..20 {
        calls.push(
            kubectl_with(&kc, &["auth", "whoami"], &vars)
                .spawn()
                .unwrap(),
        );
    }
    for c in calls {
        let o = finish(c).await;
        assert!(o.status.success(), "{}", out(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains(EMAIL),
            "{}",
            out(&o)
        );
    }
    let after = e.op.stats().await;
    assert_eq!(
        after["refresh_token"], 1,
        "one refresh for twenty calls: {after}"
    );
    assert_eq!(after["authorization_code"], 1, "no new sign-in: {after}");
    assert_eq!(after["logins"], signed_in["logins"]);
    let now: Value = serde_json::from_slice(&std::fs::read(&token_file).unwrap()).unwrap();
    assert_ne!(now["id_token"], before["id_token"]);
    assert!(now["expiry"].as_i64() > before["expiry"].as_i64());
    assert_private(&plugin.cache_files());
    let opened = std::fs::read_to_string(work.path().join("opened-urls")).unwrap();
    assert_eq!(opened.lines().count(), 1, "one browser sign-in in all");

    // A refresh token the provider no longer honours: the plugin signs in again (the provider
    // still knows the browser, so no password).
    let mut broken = now.clone();
    broken["refresh_token"] = json!("revoked-by-the-provider");
    broken["expiry"] = json!(0);
    std::fs::write(&token_file, broken.to_string()).unwrap();
    let again = kubectl_with(&kc, &["auth", "whoami"], &vars)
        .spawn()
        .unwrap();
    b.client.goto(&plugin.opened_url(1).await).await.unwrap();
    let o = finish(again).await;
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("signing in again"),
        "{}",
        out(&o)
    );
    let last = e.op.stats().await;
    assert_eq!(last["authorization_code"], 2, "{last}");
    assert_eq!(last["refresh_token"], 1, "{last}");
    b.close().await;
    e.op.stop().await;
}

/// A cookie-keeping HTTPS client that plays the browser by hand, to see every redirect.
struct Jar {
    client: RawClient,
    cookies: HashMap<String, HashMap<String, String>>,
}

impl Jar {
    fn new(e: &Env) -> Jar {
        let cas = format!("{}{}", e.h.demo.env.pki.gateway_ca.cert_pem(), e.op.ca_pem);
        Jar {
            client: raw_client(&cas, None, false),
            cookies: HashMap::new(),
        }
    }

    async fn request(
        &mut self,
        method: &str,
        url: &str,
        form: Option<String>,
    ) -> (u16, Option<String>, String) {
        let uri: http::Uri = url.parse().unwrap();
        let host = uri.authority().unwrap().to_string();
        let mut b = Request::builder().method(method).uri(url);
        if let Some(c) = self.cookies.get(&host) {
            let v: Vec<String> = c.iter().map(|(k, v)| format!("{k}={v}")).collect();
            if !v.is_empty() {
                b = b.header("cookie", v.join("; "));
            }
        }
        if form.is_some() {
            b = b.header("content-type", "application/x-www-form-urlencoded");
        }
        let req = b
            .body(Full::new(Bytes::from(form.unwrap_or_default())))
            .unwrap();
        let (status, headers, body) = send(&self.client, req).await;
        let jar = self.cookies.entry(host).or_default();
        for sc in headers.get_all("set-cookie") {
            let sc = sc.to_str().unwrap();
            let (kv, attrs) = sc.split_once(';').unwrap_or((sc, ""));
            let (k, v) = kv.split_once('=').unwrap();
            if attrs.to_ascii_lowercase().contains("max-age=0") || attrs.contains("1970") {
                jar.remove(k.trim());
            } else {
                jar.insert(k.trim().to_owned(), v.to_owned());
            }
        }
        let location = headers.get("location").map(|l| {
            let l = l.to_str().unwrap();
            if l.starts_with('/') {
                format!(
                    "{}://{}{l}",
                    uri.scheme_str().unwrap(),
                    uri.authority().unwrap()
                )
            } else {
                l.to_owned()
            }
        });
        (status, location, body)
    }

    /// Starts a web login at the gateway: the provider URL it redirects to.
    async fn start_login(&mut self, e: &Env) -> String {
        let (status, loc, _) = self.request("GET", &e.h.uri("/login"), None).await;
        assert_eq!(status, 303);
        loc.unwrap()
    }

    /// Follows the provider (signing in when asked) until it redirects to the gateway's
    /// `/callback`; returns that URL without calling it.
    async fn at_provider_until_callback(&mut self, e: &Env, auth_url: &str) -> String {
        let mut url = auth_url.to_owned();
        for _ in 0..10 {
            if url.starts_with(&e.h.uri("/callback")) {
                return url;
            }
            let (status, loc, body) = self.request("GET", &url, None).await;
            if status == 200 && body.contains("name=\"password\"") {
                let form = format!("login={USER}&password={PASSWORD}");
                let (s, l, _) = self.request("POST", &url, Some(form)).await;
                assert!(matches!(s, 302 | 303), "{s}");
                url = l.unwrap();
                continue;
            }
            assert!(matches!(status, 302 | 303), "{status} at {url}: {body}");
            url = loc.unwrap();
        }
        panic!("the provider never redirected to the gateway");
    }
}

fn with_param(url: &str, name: &str, value: &str) -> String {
    let mut u = openidconnect::url::Url::parse(url).unwrap();
    let pairs: Vec<(String, String)> = u
        .query_pairs()
        .into_owned()
        .map(|(k, v)| {
            if k == name {
                (k, value.to_owned())
            } else {
                (k, v)
            }
        })
        .collect();
    u.query_pairs_mut().clear().extend_pairs(pairs);
    u.to_string()
}

fn param(url: &str, name: &str) -> String {
    openidconnect::url::Url::parse(url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_refuses_wrong_state_replayed_code_missing_verifier_and_wrong_nonce() {
    let e = env(300).await;
    let mut jar = Jar::new(&e);

    // Wrong state: refused, and the sign-in cookie is spent.
    let auth = jar.start_login(&e).await;
    let callback = jar.at_provider_until_callback(&e, &auth).await;
    let (status, _, body) = jar
        .request("GET", &with_param(&callback, "state", "forged"), None)
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("does not belong to the sign-in this browser started"),
        "{body}"
    );

    // A good callback opens the page session; the same callback again is refused.
    let auth = jar.start_login(&e).await;
    let callback = jar.at_provider_until_callback(&e, &auth).await;
    let (status, loc, _) = jar.request("GET", &callback, None).await;
    assert_eq!(
        (status, loc.as_deref()),
        (303, Some(e.h.uri("/login").as_str()))
    );
    let (status, _, page) = jar.request("GET", &e.h.uri("/login"), None).await;
    assert_eq!(status, 200);
    assert!(page.contains(EMAIL));
    let (status, _, body) = jar.request("GET", &callback, None).await;
    assert_eq!(status, 400, "{body}");
    // Replayed code with a fresh sign-in cookie whose state it carries: the provider refuses.
    let code = param(&callback, "code");
    jar.cookies
        .get_mut(&e.h.url()[8..])
        .unwrap()
        .remove("__Host-ztgate-session");
    let auth2 = jar.start_login(&e).await;
    let replay = with_param(
        &with_param(&callback, "state", &param(&auth2, "state")),
        "code",
        &code,
    );
    let (status, _, body) = jar.request("GET", &replay, None).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("may have been used already"), "{body}");

    // The provider itself will not redeem a PKCE-bound code without its verifier.
    let auth = jar.start_login(&e).await;
    let callback = jar.at_provider_until_callback(&e, &auth).await;
    let form = format!(
        "grant_type=authorization_code&code={}&redirect_uri={}",
        param(&callback, "code"),
        openidconnect::url::form_urlencoded::byte_serialize(e.h.uri("/callback").as_bytes())
            .collect::<String>()
    );
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD
        .encode(format!("{GATEWAY_CLIENT}:{GATEWAY_SECRET}"));
    let req = Request::post(format!("{}/token", e.op.issuer))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("authorization", format!("Basic {basic}"))
        .body(Full::new(Bytes::from(form)))
        .unwrap();
    let (status, _, body) = send(&e.op.client, req).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid_grant"), "{body}");

    // A sign-in cookie without a PKCE verifier (signed with the gateway's key): refused before
    // the code is sent anywhere.
    let auth = jar.start_login(&e).await;
    let callback = jar.at_provider_until_callback(&e, &auth).await;
    let key = std::fs::read(e.h.dir.path().join("certs").join("sso-session.key")).unwrap();
    let forged = ztgate::sso::session::CookieKey::new(key).seal_flow(&ztgate::sso::session::Flow {
        state: param(&callback, "state"),
        nonce: param(&auth, "nonce"),
        verifier: None,
        redirect_uri: e.h.uri("/callback"),
        exp: ztgate::sso::session::now_unix() + 60,
    });
    jar.cookies
        .get_mut(&e.h.url()[8..])
        .unwrap()
        .insert("__Host-ztgate-login".into(), forged);
    let (status, _, body) = jar.request("GET", &callback, None).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("cannot be completed safely"), "{body}");

    // An ID token carrying another nonce than the one this browser's sign-in sent: refused.
    let auth = jar.start_login(&e).await;
    let tampered = with_param(&auth, "nonce", "attacker-chosen-nonce");
    let callback = jar.at_provider_until_callback(&e, &tampered).await;
    let (status, _, body) = jar.request("GET", &callback, None).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("did not verify"), "{body}");
    let (status, _, _) = jar.request("GET", &e.h.uri("/kubeconfig"), None).await;
    assert_eq!(status, 303, "no session after refusals");
    e.op.stop().await;
}
