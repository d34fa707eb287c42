//! `ztgate demo` as a newcomer meets it: start it, then follow the walk-through it prints with
//! the real kubectl — token login, a policy denial, device posture, and a watch closed by a lock.

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
    let dir = tempfile::tempdir().unwrap();
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
