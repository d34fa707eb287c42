//! `ztgate demo` as a newcomer meets it: start it, then follow the walk-through it prints with
//! the real kubectl — token login, a policy denial, device posture, and a watch closed by a lock.
//! And as another user of the same machine meets it: its directory, its keys and its dev issuer
//! give them nothing.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

struct Demo {
    _child: tokio::process::Child,
    text: String,
    dir: tempfile::TempDir,
}

async fn start_demo() -> Demo {
    start_demo_in(tempfile::tempdir().unwrap()).await
}

/// Starts the demo with `--dir <dir>/demo --kubeconfig-out <dir>/alice.kubeconfig`.
async fn start_demo_in(dir: tempfile::TempDir) -> Demo {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ztgate"))
        .args(["demo", "--dir"])
        .arg(dir.path().join("demo"))
        .arg("--kubeconfig-out")
        .arg(dir.path().join("alice.kubeconfig"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            text.push_str(&line);
            text.push('\n');
            if line.contains("Press Ctrl-C to stop") {
                return;
            }
        }
        panic!("the demo ended before it was ready:\n{text}");
    })
    .await
    .expect("the demo is ready within 60 s");
    Demo {
        _child: child,
        text,
        dir,
    }
}

async fn kubectl(kubeconfig: &Path, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("HOME", kubeconfig.parent().unwrap())
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The printed command with a line containing `contains` (its `\` continuation lines joined).
fn printed_command(text: &str, contains: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.contains(contains))
        .unwrap_or_else(|| panic!("no {contains:?} in:\n{text}"));
    let mut first = at;
    while first > 0 && lines[first - 1].trim_end().ends_with('\\') {
        first -= 1;
    }
    let mut cmd = String::new();
    for l in &lines[first..] {
        let l = l.trim();
        match l.strip_suffix('\\') {
            Some(part) => cmd.push_str(part),
            None => {
                cmd.push_str(l);
                break;
            }
        }
    }
    // Drop a trailing `# comment`.
    match cmd.find(" #") {
        Some(i) => cmd[..i].to_owned(),
        None => cmd,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_walk_through_works_as_printed() {
    let d = start_demo().await;
    let alice = d.dir.path().join("alice.kubeconfig");
    let laptop: PathBuf = d.dir.path().join("demo").join("alice-laptop.kubeconfig");
    assert!(d.text.contains(&laptop.display().to_string()), "{}", d.text);

    // Token login through the exec plugin; the user as the gateway forwards it.
    let (ok, out) = kubectl(&alice, &["auth", "whoami"]).await;
    assert!(ok && out.contains("alice@example.com"), "{out}");
    let (ok, out) = kubectl(&alice, &["get", "pods", "-n", "team-a"]).await;
    assert!(ok && out.contains("web-0"), "{out}");
    // Policy denials, with their reasons.
    let (ok, out) = kubectl(&alice, &["get", "pods", "-n", "team-b"]).await;
    assert!(!ok && out.contains("Forbidden"), "{out}");
    let (ok, out) = kubectl(&alice, &["delete", "pod", "web-1", "-n", "team-a"]).await;
    assert!(
        !ok && out.contains("release pipeline"),
        "the policy's reason: {out}"
    );

    // Device posture: the laptop gets 401 until it reports, then policy decides on the report.
    let (ok, out) = kubectl(&laptop, &["get", "pods", "-n", "team-a"]).await;
    assert!(!ok && out.contains("ztgate device report"), "{out}");
    let report = printed_command(&d.text, "device report --server");
    let out = tokio::process::Command::new("sh")
        .args(["-c", &report])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{report}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, out) = kubectl(&laptop, &["get", "pods", "-n", "team-a"]).await;
    assert!(
        ok || out.contains("disk is not encrypted"),
        "allowed, or refused for the disk: {out}"
    );

    // A watch, then the printed lock command: the watch ends with the lock's message.
    let watch = tokio::process::Command::new("kubectl")
        .args(["get", "pods", "-n", "team-a", "-w"])
        .env("KUBECONFIG", &alice)
        .env("HOME", alice.parent().unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lock = printed_command(&d.text, "-X POST");
    let out = tokio::process::Command::new("sh")
        .args(["-c", &lock])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{lock}");
    let out = tokio::time::timeout(Duration::from_secs(10), watch.wait_with_output())
        .await
        .expect("the watch ended after the lock")
        .unwrap();
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(shown.contains("laptop reported stolen"), "{shown}");
    let (ok, out) = kubectl(&alice, &["get", "pods", "-n", "team-a"]).await;
    assert!(!ok && out.contains("access is locked"), "{out}");
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Every file under `dir` (recursively).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_directory_is_the_users_alone_and_every_private_key_is_0600() {
    let d = start_demo().await;
    let dir = d.dir.path().join("demo");
    assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    assert!(d.text.contains(&dir.display().to_string()), "{}", d.text);

    // Found by content, so that a key file under any name is covered.
    let keys: Vec<PathBuf> = files_under(&dir)
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(p)
                .map(|t| t.contains("PRIVATE KEY"))
                .unwrap_or(false)
        })
        .collect();
    for p in &keys {
        assert_eq!(mode(p), 0o600, "{}", p.display());
    }
    let names: Vec<String> = keys
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "gateway-client.key",
        "gateway-serving.key",
        "alice-cert.key",
        "alice-laptop.key",
        "sec-admin.key",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_refuses_a_directory_that_already_exists() {
    let dir = tempfile::tempdir().unwrap();
    let planted = dir.path().join("prepared");
    std::fs::create_dir_all(planted.join("policies")).unwrap();
    let allow_all = "permit (principal, action, resource);\n";
    std::fs::write(planted.join("policies").join("demo.cedar"), allow_all).unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o700)).unwrap();

    // Even an empty directory of the user's own with mode 0700: whether it was always so cannot
    // be told, so the rule is simply that the demo makes its directory itself.
    for existing in [&planted, &empty] {
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new(env!("CARGO_BIN_EXE_ztgate"))
                .args(["demo", "--dir"])
                .arg(existing)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("the demo gives up at once")
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stdout}");
        assert!(
            !stdout.contains("ztgate demo is running"),
            "{}: {stdout}",
            existing.display()
        );
        for says in [
            format!("--dir {}: the path already exists", existing.display()),
            "creates that directory itself (mode 0700)".into(),
            "another user could have created it".into(),
            "Give a path that does not exist yet".into(),
        ] {
            assert!(stderr.contains(&says), "{says:?} not in: {stderr}");
        }
    }
    assert_eq!(
        std::fs::read_to_string(planted.join("policies").join("demo.cedar")).unwrap(),
        allow_all
    );
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
}

/// The dev issuer answers anyone on the machine: it mints alice's token for the demo's
/// kubeconfig and nothing else, and the banner says what it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_issuer_mints_only_the_demo_user() {
    let d = start_demo().await;
    assert!(
        d.text
            .contains("The dev OIDC issuer is a development issuer, not for real use"),
        "{}",
        d.text
    );
    let issuer = d
        .text
        .lines()
        .find_map(|l| l.trim().strip_prefix("dev OIDC issuer"))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no issuer URL in:\n{}", d.text))
        .to_owned();
    let ca = d
        .dir
        .path()
        .join("demo")
        .join("certs")
        .join("dev-issuer-ca.crt");
    let ask = |query: &str| {
        let url = format!("{issuer}/dev/exec-credential?{query}");
        let ca = ca.clone();
        async move {
            let out = tokio::process::Command::new("curl")
                .args(["-s", "-w", "\n%{http_code}", "--cacert"])
                .arg(&ca)
                .arg(&url)
                .output()
                .await
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
            (code.to_owned(), body.to_owned())
        }
    };

    let (code, body) = ask("sub=mallory&groups=security&aud=ztgate").await;
    assert_eq!(code, "403", "{body}");
    assert!(body.contains(r#"not for "mallory""#), "{body}");
    let (code, body) = ask("sub=alice&groups=team-a,security&aud=ztgate").await;
    assert_eq!(code, "403", "{body}");
    assert!(body.contains(r#"not with "security""#), "{body}");
    let (code, body) = ask("sub=alice&groups=team-a&aud=ztgate").await;
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("ExecCredential"), "{body}");
}

/// A kubeconfig names the command kubectl runs, so `--kubeconfig-out` never writes through a
/// link someone left at that path: the link is replaced by the user's own file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubeconfig_out_replaces_a_link_instead_of_writing_through_it() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    let out = dir.path().join("alice.kubeconfig");
    std::os::unix::fs::symlink(&victim, &out).unwrap();

    let d = start_demo_in(dir).await;
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    let meta = std::fs::symlink_metadata(&out).unwrap();
    assert!(meta.file_type().is_file(), "{meta:?}");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let (ok, shown) = kubectl(&out, &["get", "pods", "-n", "team-a"]).await;
    assert!(ok && shown.contains("web-0"), "{shown}");
    drop(d);
}
