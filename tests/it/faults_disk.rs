//! Faults in the disk of the embedded state store (`state.directory`, issue 9 item 3): full, and
//! read-only. The directory is a small tmpfs mounted by the test (root / CAP_SYS_ADMIN needed,
//! as in CI), under a `ztgate serve` process. In each case: a lock or posture write gets 503
//! naming the cause and no path, nothing stored is lost or stops being enforced, reads keep
//! working, writes succeed again as soon as the disk does — without a restart — and a restart
//! afterwards finds every acknowledged record, with no torn bytes in the log.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::{json, Value};
use support::{get, raw_client, send, status_of, RawClient, ServeProcess};
use ztgate::demo::DevSettings;
use ztgate_testkit::pki::Ca;
use ztgate_testkit::CertKey;

const POLICIES: &str = r#"
@id("team-a-namespace")
permit (principal in k8s::Group::"team-a", action, resource in k8s::Namespace::"team-a");

@id("security-manages-locks-and-reads-posture")
permit (principal in k8s::Group::"security", action, resource is k8s::NonResourceURL)
when { resource.path like "/v1/locks*" || resource.path like "/v1/devices/posture*" };
"#;

const PODS: &str = "/api/v1/namespaces/team-a/pods";

/// A tmpfs of `size` mounted on a fresh temp directory; unmounted (lazily if still busy) and
/// removed on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

fn mount(args: &[&str]) -> Result<(), String> {
    let out = Command::new("mount")
        .args(args)
        .output()
        .map_err(|e| format!("running mount: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

impl Tmpfs {
    fn new(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().to_str().unwrap();
        if let Err(e) = mount(&[
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size},mode=0700"),
            "tmpfs",
            target,
        ]) {
            panic!(
                "this test mounts a small tmpfs to fill it and make it read-only, which needs \
                 root or CAP_SYS_ADMIN (CI runs it as root in a container that allows mount): \
                 `mount -t tmpfs` failed: {e}"
            );
        }
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn remount(&self, mode: &str) {
        let target = self.path().to_str().unwrap();
        // A write in progress holds the mount busy for a moment.
        let mut last = String::new();
        for _ in 0..50 {
            match mount(&["-o", &format!("remount,{mode}"), target]) {
                Ok(()) => return,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("mount -o remount,{mode} {target}: {last}");
    }

    /// Writes a filler file until the file system is full; returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.path().join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 4096];
        loop {
            match f.write_all(&chunk).and_then(|()| f.sync_all()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        // Bytes that fit in the last partial page.
        loop {
            match f.write_all(&[0]).and_then(|()| f.sync_all()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = self.path().to_str().unwrap().to_owned();
        for _ in 0..20 {
            if Command::new("umount")
                .arg(&target)
                .status()
                .is_ok_and(|s| s.success())
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("umount").args(["-l", &target]).status();
    }
}

/// A `ztgate serve` process whose state directory is on the tmpfs, restartable on the same
/// port and directory.
struct Gateway {
    pe: support::ProcessEnv,
    process: Option<ServeProcess>,
    admin: CertKey,
    alice: CertKey,
    mallory: CertKey,
    device_ca: Ca,
    _policies: tempfile::TempDir,
}

impl Gateway {
    async fn start(state_dir: PathBuf) -> Gateway {
        let policies = tempfile::tempdir().unwrap();
        std::fs::write(policies.path().join("p.cedar"), POLICIES).unwrap();
        let device_ca = Ca::new("device-ca");
        let pe = support::ProcessEnv::create(DevSettings {
            policies: vec![policies.path().join("p.cedar")],
            state_dir: Some(state_dir),
            device_ca_pem: Some(device_ca.cert_pem()),
            device_posture_yaml: Some(
                "posture:\n  required: false\n  selfReports:\n    ttl: 1h\n".into(),
            ),
            ..Default::default()
        })
        .await;
        let process = Some(pe.serve().await);
        Gateway {
            admin: pe.env.pki.user("sec-admin", &["security"]),
            alice: pe.env.pki.user("alice", &["team-a"]),
            mallory: pe.env.pki.user("mallory", &["team-a"]),
            pe,
            process,
            device_ca,
            _policies: policies,
        }
    }

    /// `kill -9`, then a new process on the same port and directory.
    async fn restart(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill9().await;
        }
        self.process = Some(self.pe.serve().await);
    }

    /// `kill -9`, waiting until the process is gone.
    async fn stop(mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill9().await;
        }
    }

    fn assert_running(&mut self) {
        self.process.as_mut().unwrap().assert_running();
    }

    fn client(&self, cert: Option<&CertKey>) -> RawClient {
        raw_client(&self.pe.ca_pem(), cert, false)
    }

    fn uri(&self, path: &str) -> String {
        format!("{}{path}", self.pe.base())
    }

    async fn add_lock(&self, user: &str, message: &str) -> (u16, String) {
        let body = json!({"target": {"kind": "user", "value": user}, "message": message});
        let req = Request::post(self.uri("/v1/locks"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let (code, _, text) = send(&self.client(Some(&self.admin)), req).await;
        (code, text)
    }

    async fn delete_lock(&self, id: &str) -> (u16, String) {
        let req = Request::delete(self.uri(&format!("/v1/locks/{id}")))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (code, _, text) = send(&self.client(Some(&self.admin)), req).await;
        (code, text)
    }

    /// The locks listed by `GET /v1/locks`, by id.
    async fn locks(&self) -> std::collections::BTreeMap<String, Value> {
        let (code, _, text) =
            send(&self.client(Some(&self.admin)), get(&self.uri("/v1/locks"))).await;
        assert_eq!(code, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| (l["id"].as_str().unwrap().to_owned(), l.clone()))
            .collect()
    }

    /// A self-report from `device` (over mTLS with its certificate); `notes` makes it large.
    async fn report(&self, device: &str, notes: &str) -> (u16, String) {
        let cert = self.device_ca.issue_client(device, &[]);
        let body = json!({"attributes": {"os": "linux", "diskEncrypted": true, "extra": {"notes": notes}}});
        let req = Request::post(self.uri("/v1/devices/posture"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let (code, _, text) = send(&self.client(Some(&cert)), req).await;
        (code, text)
    }

    async fn posture(&self, device: &str) -> Option<Value> {
        let (code, _, text) = send(
            &self.client(Some(&self.admin)),
            get(&self.uri(&format!("/v1/devices/posture?device={device}"))),
        )
        .await;
        match code {
            200 => Some(serde_json::from_str(&text).unwrap()),
            404 => None,
            other => panic!("reading posture of {device}: {other} {text}"),
        }
    }

    async fn pods_as(&self, who: &CertKey) -> (u16, String) {
        let (code, _, text) = send(&self.client(Some(who)), get(&self.uri(PODS))).await;
        (code, text)
    }
}

/// 503 `ServiceUnavailable` whose message names `cause` and nothing of the directory.
fn assert_refused_write(what: &str, code: u16, body: &str, cause: &str, dir: &Path) {
    assert_eq!(code, 503, "{what}: {body}");
    assert_eq!(
        status_of(body),
        (503, "ServiceUnavailable".into()),
        "{what}"
    );
    let v: Value = serde_json::from_str(body).unwrap();
    let message = v["message"].as_str().unwrap();
    assert!(message.contains(cause), "{what}: {message}");
    assert!(
        message.contains("already stored stay in force"),
        "{what}: {message}"
    );
    for leak in [
        dir.to_str().unwrap(),
        "state.log",
        "state.snapshot",
        "/tmp",
        "os error",
    ] {
        assert!(
            !message.contains(leak),
            "{what}: message leaks {leak:?}: {message}"
        );
    }
}

fn lock_id(created: &str) -> String {
    let v: Value = serde_json::from_str(created).unwrap();
    v["id"].as_str().unwrap().to_owned()
}

/// After the gateway is gone: the store's files read back whole — the log holds exactly the
/// records it acknowledged (nothing cut off as torn) and no unfinished snapshot is left.
fn assert_nothing_half_written(state: &Path) {
    assert!(
        !state.join("state.snapshot.tmp").exists(),
        "an unfinished snapshot was left behind"
    );
    let on_disk = std::fs::metadata(state.join("state.log"))
        .map(|m| m.len())
        .unwrap_or(0);
    let store = ztgate::state::FileStore::open(state, Default::default()).unwrap();
    assert_eq!(
        store.log_bytes(),
        on_disk,
        "opening the store cut torn bytes off the log"
    );
}

/// Posture record as stored, without what changes between reads.
fn record_of(v: &Value) -> Value {
    json!({"deviceId": v["deviceId"], "attributes": v["attributes"], "source": v["source"],
           "collectedAt": v["collectedAt"], "expiresAt": v["expiresAt"]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_disk_refuses_changes_with_503_keeps_every_lock_and_recovers_without_restart()
{
    let fs = Tmpfs::new("256k");
    let state = fs.path().join("state");
    let mut gw = Gateway::start(state.clone()).await;

    let (code, body) = gw.add_lock("mallory", "offboarded").await;
    assert_eq!(code, 201, "{body}");
    let mallory_lock = lock_id(&body);
    let (code, body) = gw.report("laptop-1", "before").await;
    assert_eq!(code, 200, "{body}");
    let laptop1 = record_of(&gw.posture("laptop-1").await.unwrap());

    let filler = fs.fill();
    // Each write needs a new page (a 4 KiB message), so none fits in what is left.
    let big = "x".repeat(4096);
    let (code, body) = gw.add_lock("eve", &big).await;
    assert_refused_write(
        "lock while the disk is full",
        code,
        &body,
        "its disk is full",
        fs.path(),
    );
    let (code, body) = gw.report("laptop-2", &big).await;
    assert_refused_write(
        "posture while the disk is full",
        code,
        &body,
        "its disk is full",
        fs.path(),
    );
    // (A small write, such as a lock delete, may still fit in the log's last, partly used
    // block: a full file system accepts that. The read-only test shows deletes refused.)

    // What is stored stays enforced and readable; everything else is served.
    let (code, body) = gw.pods_as(&gw.mallory).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("offboarded"), "{body}");
    assert_eq!(gw.pods_as(&gw.alice).await.0, 200);
    let locks = gw.locks().await;
    assert_eq!(locks.keys().collect::<Vec<_>>(), vec![&mallory_lock]);
    assert_eq!(record_of(&gw.posture("laptop-1").await.unwrap()), laptop1);
    assert!(gw.posture("laptop-2").await.is_none());
    gw.assert_running();

    // Space comes back: the same writes succeed, no restart.
    std::fs::remove_file(&filler).unwrap();
    let (code, body) = gw.add_lock("eve", &big).await;
    assert_eq!(code, 201, "{body}");
    let eve_lock = lock_id(&body);
    let (code, body) = gw.report("laptop-2", &big).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(gw.pods_as(&gw.alice).await.0, 200);
    let locks = gw.locks().await;
    let laptop2 = record_of(&gw.posture("laptop-2").await.unwrap());

    // Killed and started again on the same directory: every acknowledged record is there.
    gw.restart().await;
    assert_eq!(gw.locks().await, locks);
    assert!(locks.contains_key(&eve_lock) && locks.contains_key(&mallory_lock));
    assert_eq!(record_of(&gw.posture("laptop-1").await.unwrap()), laptop1);
    assert_eq!(record_of(&gw.posture("laptop-2").await.unwrap()), laptop2);
    assert_eq!(gw.pods_as(&gw.mallory).await.0, 403);
    assert_eq!(gw.pods_as(&gw.alice).await.0, 200);
    gw.stop().await;
    assert_nothing_half_written(&state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_state_disk_refuses_changes_with_503_keeps_every_lock_and_recovers_without_restart(
) {
    let fs = Tmpfs::new("1m");
    let state = fs.path().join("state");
    let mut gw = Gateway::start(state.clone()).await;

    let (code, body) = gw.add_lock("mallory", "offboarded").await;
    assert_eq!(code, 201, "{body}");
    let mallory_lock = lock_id(&body);
    let (code, body) = gw.report("laptop-1", "before").await;
    assert_eq!(code, 200, "{body}");
    let laptop1 = record_of(&gw.posture("laptop-1").await.unwrap());

    // Remounted read-only under the running gateway (it holds no file there open for writing
    // between writes, so the remount is allowed).
    fs.remount("ro");
    let (code, body) = gw.add_lock("eve", "left").await;
    assert_refused_write(
        "lock on a read-only disk",
        code,
        &body,
        "read-only",
        fs.path(),
    );
    let (code, body) = gw.report("laptop-2", "during").await;
    assert_refused_write(
        "posture on a read-only disk",
        code,
        &body,
        "read-only",
        fs.path(),
    );
    let (code, body) = gw.delete_lock(&mallory_lock).await;
    assert_refused_write(
        "lock delete on a read-only disk",
        code,
        &body,
        "read-only",
        fs.path(),
    );

    let (code, body) = gw.pods_as(&gw.mallory).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("offboarded"), "{body}");
    assert_eq!(gw.pods_as(&gw.alice).await.0, 200);
    assert_eq!(
        gw.locks().await.keys().collect::<Vec<_>>(),
        vec![&mallory_lock]
    );
    assert_eq!(record_of(&gw.posture("laptop-1").await.unwrap()), laptop1);
    assert!(gw.posture("laptop-2").await.is_none());
    gw.assert_running();

    // Writable again: writes succeed, no restart.
    fs.remount("rw");
    let (code, body) = gw.add_lock("eve", "left").await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = gw.report("laptop-2", "after").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = gw.delete_lock(&mallory_lock).await;
    assert!(code == 200 || code == 204, "{code} {body}");
    assert_eq!(gw.pods_as(&gw.mallory).await.0, 200);
    let (code, body) = gw.pods_as(&gw.pe.env.pki.user("eve", &["team-a"])).await;
    assert_eq!(code, 403, "{body}");
    let locks = gw.locks().await;
    let laptop2 = record_of(&gw.posture("laptop-2").await.unwrap());

    gw.restart().await;
    assert_eq!(gw.locks().await, locks);
    assert_eq!(record_of(&gw.posture("laptop-1").await.unwrap()), laptop1);
    assert_eq!(record_of(&gw.posture("laptop-2").await.unwrap()), laptop2);
    assert_eq!(gw.pods_as(&gw.mallory).await.0, 200);
    gw.stop().await;
    assert_nothing_half_written(&state);
}
