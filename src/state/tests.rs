use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::file::{decode, encode};
use super::*;

fn small() -> FileStoreOptions {
    FileStoreOptions::default()
}

fn lock(target: LockTarget) -> Lock {
    Lock::new(target, "locked by test", None, "admin").unwrap()
}

fn posture(device: &str, expires_in: Duration) -> PostureRecord {
    let now = SystemTime::now();
    PostureRecord {
        device_id: device.to_owned(),
        attributes: Posture {
            os: Some("linux".into()),
            os_version: Some("6.8".into()),
            disk_encrypted: Some(true),
            firewall: Some(true),
            screen_lock: None,
            managed: Some(false),
            edr_score: Some(87),
            extra: BTreeMap::from([("kernel".to_owned(), serde_json::json!("6.8.0-45"))]),
        },
        source: "self".into(),
        collected_at: now,
        expires_at: now + expires_in,
    }
}

fn user(name: &str) -> LockSubject<'_> {
    LockSubject {
        user: Some(name),
        ..LockSubject::default()
    }
}

fn log_path(dir: &Path) -> std::path::PathBuf {
    dir.join("state.log")
}

fn append(dir: &Path, bytes: &[u8]) {
    let mut f = OpenOptions::new().append(true).open(log_path(dir)).unwrap();
    f.write_all(bytes).unwrap();
}

/// Both stores, as the gateway holds them.
fn stores(dir: &Path) -> Vec<SharedStore> {
    vec![
        Arc::new(MemoryStore::new()),
        Arc::new(FileStore::open(dir, small()).unwrap()),
    ]
}

#[tokio::test]
async fn put_get_delete_locks_and_posture_in_both_stores() {
    let tmp = tempfile::tempdir().unwrap();
    for store in stores(tmp.path()) {
        let alice = lock(LockTarget::User("alice".into()));
        let r1 = store.put_lock(alice.clone()).await.unwrap();
        assert_eq!(store.locks(), vec![alice.clone()]);
        assert_eq!(store.lock(&alice.id), Some(alice.clone()));

        let rec = posture("dev-1", Duration::from_secs(600));
        let r2 = store.put_posture(rec.clone()).await.unwrap();
        assert!(r2 > r1);
        assert_eq!(store.posture("dev-1"), Some(rec.clone()));
        assert_eq!(store.posture("dev-2"), None);

        let (r3, removed) = store.delete_lock(&alice.id).await.unwrap().unwrap();
        assert!(r3 > r2);
        assert_eq!(removed, alice);
        assert!(store.locks().is_empty());
        assert_eq!(store.delete_lock(&alice.id).await.unwrap(), None);
        assert_eq!(store.revision(), r3, "deleting nothing writes nothing");

        let (_, gone) = store.delete_posture("dev-1").await.unwrap().unwrap();
        assert_eq!(gone, rec);
        assert_eq!(store.posture("dev-1"), None);
    }
}

#[tokio::test]
async fn replacing_a_lock_with_the_same_id_updates_its_target() {
    let store = MemoryStore::new();
    let mut l = lock(LockTarget::User("alice".into()));
    store.put_lock(l.clone()).await.unwrap();
    l.target = LockTarget::User("bob".into());
    store.put_lock(l.clone()).await.unwrap();
    assert_eq!(store.matches(&user("alice")), None);
    assert_eq!(store.matches(&user("bob")), Some(l));
    assert_eq!(store.locks().len(), 1);
}

#[tokio::test]
async fn invalid_records_are_refused_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    for store in stores(tmp.path()) {
        let err = store
            .put_lock(lock(LockTarget::Group(String::new())))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err}");
        let mut l = lock(LockTarget::User("a".into()));
        l.message = "x".repeat(MAX_MESSAGE_BYTES + 1);
        assert!(matches!(
            store.put_lock(l).await,
            Err(StoreError::Invalid(_))
        ));
        let mut p = posture("dev\n1", Duration::from_secs(60));
        assert!(store.put_posture(p.clone()).await.is_err());
        p.device_id = "dev-1".into();
        p.expires_at = UNIX_EPOCH + Duration::from_secs(400_000_000_000);
        assert!(store.put_posture(p).await.is_err());
        assert_eq!(store.revision(), 0);
    }
}

#[tokio::test]
async fn expired_locks_and_posture_are_ignored_on_read() {
    let store = MemoryStore::new();
    let now = SystemTime::now();
    let mut old = lock(LockTarget::User("alice".into()));
    old.expires_at = Some(now - Duration::from_secs(1));
    let mut later = lock(LockTarget::User("bob".into()));
    later.expires_at = Some(now + Duration::from_secs(60));
    store.put_lock(old.clone()).await.unwrap();
    store.put_lock(later.clone()).await.unwrap();
    store
        .put_posture(posture("stale", Duration::ZERO))
        .await
        .unwrap();

    assert_eq!(store.locks(), vec![later.clone()]);
    assert_eq!(store.matches(&user("alice")), None);
    assert_eq!(store.matches(&user("bob")), Some(later.clone()));
    assert_eq!(store.posture("stale"), None);
    // The deadline itself is already past.
    let view = store.view();
    let at = later.expires_at.unwrap();
    assert_eq!(view.matches_at(&user("bob"), at), None);
    assert!(view.locks_at(at).is_empty());
    // Still addressable by id until deleted or compacted.
    assert_eq!(store.lock(&old.id), Some(old));
    let (_, state) = store.snapshot();
    assert_eq!(state.locks.len(), 1);
    assert!(state.posture.is_empty());
}

#[tokio::test]
async fn matches_each_target_kind() {
    let store = MemoryStore::new();
    let groups = vec!["dev".to_owned(), "ops".to_owned()];
    let full = LockSubject {
        user: Some("alice"),
        groups: &groups,
        device: Some("laptop-7"),
        token_id: Some("jti-1"),
        session: Some("sess-9"),
        ..LockSubject::default()
    };
    assert_eq!(store.matches(&full), None, "no locks at all");
    let cases = [
        LockTarget::User("alice".into()),
        LockTarget::Group("ops".into()),
        LockTarget::Device("laptop-7".into()),
        LockTarget::TokenId("jti-1".into()),
        LockTarget::Session("sess-9".into()),
    ];
    for target in cases {
        let l = lock(target.clone());
        store.put_lock(l.clone()).await.unwrap();
        assert_eq!(store.matches(&full), Some(l.clone()), "{target:?}");
        // The same name under another kind does not match: a group called "alice", a user
        // called "ops", ...
        let value = target.value();
        let other_groups = vec![value.to_owned()];
        let elsewhere = match target {
            LockTarget::Group(_) => LockSubject {
                user: Some(value),
                ..LockSubject::default()
            },
            _ => LockSubject {
                groups: &other_groups,
                device: Some("other"),
                ..LockSubject::default()
            },
        };
        assert_eq!(store.matches(&elsewhere), None, "{target:?}");
        // Exact, case-sensitive names.
        let upper = value.to_uppercase();
        let shouty = LockSubject {
            user: Some(&upper),
            device: Some(&upper),
            token_id: Some(&upper),
            session: Some(&upper),
            ..LockSubject::default()
        };
        assert_eq!(store.matches(&shouty), None);
        store.delete_lock(&l.id).await.unwrap().unwrap();
        assert_eq!(store.matches(&full), None);
    }
}

#[tokio::test]
async fn an_expired_lock_does_not_hide_a_live_one_on_the_same_target() {
    let store = MemoryStore::new();
    let mut old = lock(LockTarget::Device("d".into()));
    old.expires_at = Some(SystemTime::now() - Duration::from_secs(5));
    let live = lock(LockTarget::Device("d".into()));
    store.put_lock(old).await.unwrap();
    store.put_lock(live.clone()).await.unwrap();
    let s = LockSubject {
        device: Some("d"),
        ..LockSubject::default()
    };
    assert_eq!(store.matches(&s), Some(live));
}

#[tokio::test]
async fn subscribers_see_every_change_with_increasing_revisions() {
    let tmp = tempfile::tempdir().unwrap();
    for store in stores(tmp.path()) {
        let mut rx = store.subscribe();
        let l = lock(LockTarget::Session("s".into()));
        let r1 = store.put_lock(l.clone()).await.unwrap();
        let r2 = store
            .put_posture(posture("d", Duration::from_secs(60)))
            .await
            .unwrap();
        let (r3, _) = store.delete_lock(&l.id).await.unwrap().unwrap();
        let (r4, _) = store.delete_posture("d").await.unwrap().unwrap();
        let got: Vec<Change> = (0..4).map(|_| rx.try_recv().unwrap()).collect();
        assert_eq!(
            got,
            vec![
                Change {
                    revision: r1,
                    kind: ChangeKind::LockPut(l.clone())
                },
                Change {
                    revision: r2,
                    kind: ChangeKind::PosturePut("d".into())
                },
                Change {
                    revision: r3,
                    kind: ChangeKind::LockDeleted(l.id.clone())
                },
                Change {
                    revision: r4,
                    kind: ChangeKind::PostureDeleted("d".into())
                },
            ]
        );
        assert!(r1 < r2 && r2 < r3 && r3 < r4);
        assert!(rx.try_recv().is_err());
    }
}

#[tokio::test]
async fn snapshot_and_subscribe_misses_nothing_under_concurrent_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let store: SharedStore = Arc::new(FileStore::open(tmp.path(), small()).unwrap());
    let writer = {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            for i in 0..100 {
                store
                    .put_lock(lock(LockTarget::User(format!("u{i}"))))
                    .await
                    .unwrap();
            }
        })
    };
    // Take the snapshot while the writer is under way: once its first write has committed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.revision() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the writer committed nothing within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (rev, state, mut rx) = store.snapshot_and_subscribe();
    eprintln!("snapshot taken at revision {rev} of 100");
    writer.await.unwrap();
    let mut seen = state.locks.len() as u64;
    assert_eq!(seen, rev);
    let mut expect = rev + 1;
    while let Ok(change) = rx.try_recv() {
        assert_eq!(change.revision, expect);
        expect += 1;
        seen += 1;
    }
    assert_eq!(seen, 100);
}

#[tokio::test]
async fn restart_keeps_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let (rev, state) = {
        let store = FileStore::open(tmp.path(), small()).unwrap();
        let mut keep = lock(LockTarget::Group("contractors".into()));
        keep.expires_at = Some(SystemTime::now() + Duration::from_secs(3600));
        store.put_lock(keep).await.unwrap();
        let gone = lock(LockTarget::User("mallory".into()));
        store.put_lock(gone.clone()).await.unwrap();
        store.delete_lock(&gone.id).await.unwrap();
        store
            .put_posture(posture("d1", Duration::from_secs(600)))
            .await
            .unwrap();
        store
            .put_posture(posture("d1", Duration::from_secs(900)))
            .await
            .unwrap();
        store.snapshot()
    };
    let store = FileStore::open(tmp.path(), small()).unwrap();
    assert_eq!(store.snapshot(), (rev, state.clone()));
    assert_eq!(rev, 5);
    // And writing on after the restart continues the numbering.
    let next = store
        .put_lock(lock(LockTarget::User("eve".into())))
        .await
        .unwrap();
    assert_eq!(next, 6);
    drop(store);
    let store = FileStore::open(tmp.path(), small()).unwrap();
    assert_eq!(store.revision(), 6);
    assert_eq!(store.locks().len(), 2);
}

#[tokio::test]
async fn a_torn_last_record_is_cut_off_and_earlier_records_survive() {
    let tmp = tempfile::tempdir().unwrap();
    let first = lock(LockTarget::User("alice".into()));
    let second = lock(LockTarget::User("bob".into()));
    {
        let store = FileStore::open(tmp.path(), small()).unwrap();
        store.put_lock(first.clone()).await.unwrap();
        store.put_lock(second.clone()).await.unwrap();
    }
    let good_len = fs::metadata(log_path(tmp.path())).unwrap().len();
    let json = serde_json::to_vec(&store::Op::PutLock {
        lock: lock(LockTarget::User("carol".into())),
    })
    .unwrap();
    let record = encode(b"L1", 3, &json);
    let tails: Vec<Vec<u8>> = vec![
        record[..record.len() / 2].to_vec(), // half a record
        record[..record.len() - 1].to_vec(), // all but the newline
        vec![0u8; 4096],                     // zeros from a size update without data
        b"garbage\n\xff\xfe more garbage\n".to_vec(),
        {
            let mut flipped = record.clone();
            let i = flipped.len() - 10;
            flipped[i] ^= 0x01; // complete, but the checksum does not match
            flipped
        },
    ];
    for tail in tails {
        append(tmp.path(), &tail);
        let store = FileStore::open(tmp.path(), small()).unwrap();
        assert_eq!(store.revision(), 2);
        assert_eq!(store.lock(&first.id), Some(first.clone()));
        assert_eq!(store.lock(&second.id), Some(second.clone()));
        assert_eq!(store.log_bytes(), good_len);
        assert_eq!(fs::metadata(log_path(tmp.path())).unwrap().len(), good_len);
        // Appending after the cut works and survives the next open.
        let extra = lock(LockTarget::Device("x".into()));
        assert_eq!(store.put_lock(extra.clone()).await.unwrap(), 3);
        drop(store);
        let store = FileStore::open(tmp.path(), small()).unwrap();
        assert_eq!(store.lock(&extra.id), Some(extra.clone()));
        store.delete_lock(&extra.id).await.unwrap();
        drop(store);
        // Back to two records for the next case: rewrite the log from a fresh store state.
        let store = FileStore::open(tmp.path(), small()).unwrap();
        store.compact().await.unwrap();
        assert_eq!(store.log_bytes(), 0);
        drop(store);
        fs::remove_file(tmp.path().join("state.snapshot")).unwrap();
        fs::remove_file(log_path(tmp.path())).unwrap();
        let store = FileStore::open(tmp.path(), small()).unwrap();
        store.put_lock(first.clone()).await.unwrap();
        store.put_lock(second.clone()).await.unwrap();
    }
}

#[tokio::test]
async fn corruption_in_the_middle_is_reported_with_its_offset() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let store = FileStore::open(tmp.path(), small()).unwrap();
        for name in ["a", "b", "c"] {
            store
                .put_lock(lock(LockTarget::User(name.into())))
                .await
                .unwrap();
        }
    }
    let path = log_path(tmp.path());
    let mut bytes = fs::read(&path).unwrap();
    let second = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
    // Flip a byte inside the second record's JSON.
    let target = second + 120;
    bytes[target] ^= 0x20;
    fs::write(&path, &bytes).unwrap();

    let err = FileStore::open(tmp.path(), small()).unwrap_err();
    match &err {
        StoreError::Corrupt { offset, reason, .. } => {
            assert_eq!(*offset, second as u64, "{err}");
            assert!(reason.contains("checksum"), "{err}");
        }
        other => panic!("expected Corrupt, got {other}"),
    }
    assert!(err.to_string().contains(&format!("offset {second}")));
    // Nothing was cut off, and the directory is not left locked.
    assert_eq!(fs::read(&path).unwrap(), bytes);
    assert!(!tmp.path().join("LOCK").exists());
}

#[tokio::test]
async fn a_gap_in_revisions_is_corruption() {
    let tmp = tempfile::tempdir().unwrap();
    drop(FileStore::open(tmp.path(), small()).unwrap());
    let op = store::Op::DeleteLock { id: "x".into() };
    let json = serde_json::to_vec(&op).unwrap();
    append(tmp.path(), &encode(b"L1", 1, &json));
    append(tmp.path(), &encode(b"L1", 3, &json));
    let err = FileStore::open(tmp.path(), small()).unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { reason, .. } if reason.contains("revision 3 follows revision 1")),
        "{err}"
    );
}

#[tokio::test]
async fn compaction_keeps_the_state_drops_expired_entries_and_shrinks_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::open(tmp.path(), small()).unwrap();
    let mut soon = lock(LockTarget::User("temp".into()));
    soon.expires_at = Some(SystemTime::now() + Duration::from_millis(50));
    store.put_lock(soon.clone()).await.unwrap();
    store
        .put_posture(posture("short", Duration::from_millis(50)))
        .await
        .unwrap();
    for i in 0..50 {
        store
            .put_posture(posture(&format!("dev-{}", i % 5), Duration::from_secs(600)))
            .await
            .unwrap();
    }
    let forever = lock(LockTarget::User("kept".into()));
    store.put_lock(forever.clone()).await.unwrap();
    // The sleep is the case under test: the two short-lived entries expire (by the wall clock,
    // which paused tokio time does not move).
    tokio::time::sleep(Duration::from_millis(60)).await;
    let before = store.log_bytes();
    let (rev, state) = store.snapshot();
    assert_eq!(state.posture.len(), 5);

    store.compact().await.unwrap();
    assert_eq!(store.log_bytes(), 0);
    assert!(before > 10_000, "{before}");
    assert_eq!(store.snapshot(), (rev, state.clone()));
    assert_eq!(
        store.lock(&soon.id),
        None,
        "expired lock dropped from memory"
    );

    drop(store);
    let snapshot_len = fs::metadata(tmp.path().join("state.snapshot"))
        .unwrap()
        .len();
    assert!(snapshot_len < before / 5, "{snapshot_len} vs {before}");
    let store = FileStore::open(tmp.path(), small()).unwrap();
    assert_eq!(store.snapshot(), (rev, state));
    assert_eq!(store.lock(&soon.id), None);
    assert_eq!(store.locks(), vec![forever]);
    // Writes after compaction continue the revision sequence and survive.
    let r = store
        .put_lock(lock(LockTarget::User("after".into())))
        .await
        .unwrap();
    assert_eq!(r, rev + 1);
    drop(store);
    assert_eq!(
        FileStore::open(tmp.path(), small()).unwrap().revision(),
        rev + 1
    );
}

#[tokio::test]
async fn compaction_runs_by_itself_when_the_log_grows() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = FileStoreOptions {
        compact_log_bytes: 4096,
    };
    let store = FileStore::open(tmp.path(), opts.clone()).unwrap();
    for i in 0..100 {
        store
            .put_posture(posture(&format!("d{}", i % 3), Duration::from_secs(600)))
            .await
            .unwrap();
        assert!(store.log_bytes() <= 4096 + 2048);
    }
    let before = store.snapshot();
    drop(store);
    assert_eq!(
        FileStore::open(tmp.path(), opts).unwrap().snapshot(),
        before
    );
}

#[tokio::test]
async fn a_crash_between_snapshot_and_log_truncation_replays_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::open(tmp.path(), small()).unwrap();
    for name in ["a", "b", "c"] {
        store
            .put_lock(lock(LockTarget::User(name.into())))
            .await
            .unwrap();
    }
    let old_log = fs::read(log_path(tmp.path())).unwrap();
    store.compact().await.unwrap();
    let state = store.snapshot();
    drop(store);
    // As if the process died after renaming the snapshot but before emptying the log.
    fs::write(log_path(tmp.path()), &old_log).unwrap();
    let store = FileStore::open(tmp.path(), small()).unwrap();
    assert_eq!(store.snapshot(), state);
    assert_eq!(
        store.log_bytes(),
        0,
        "the interrupted compaction is finished"
    );
    // A leftover temp snapshot from a crash during its write is ignored and removed.
    drop(store);
    fs::write(tmp.path().join("state.snapshot.tmp"), b"S1 9 half").unwrap();
    let store = FileStore::open(tmp.path(), small()).unwrap();
    assert_eq!(store.snapshot(), state);
    assert!(!tmp.path().join("state.snapshot.tmp").exists());
}

#[test]
fn a_damaged_snapshot_is_corruption_not_a_torn_write() {
    let tmp = tempfile::tempdir().unwrap();
    let json = serde_json::to_vec(&State::default()).unwrap();
    let mut frame = encode(b"S1", 4, &json);
    frame.truncate(frame.len() - 3);
    fs::write(tmp.path().join("state.snapshot"), &frame).unwrap();
    let err = FileStore::open(tmp.path(), small()).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
}

#[test]
fn the_frame_format_round_trips_and_rejects_damage() {
    let line = encode(b"L1", 42, br#"{"op":"deleteLock","id":"x"}"#);
    let text = std::str::from_utf8(&line).unwrap();
    assert!(text.starts_with("L1 42 28 "), "{text}");
    assert!(
        text.ends_with(" {\"op\":\"deleteLock\",\"id\":\"x\"}\n"),
        "{text}"
    );
    let f = decode(&line, 1024).unwrap();
    assert_eq!((f.tag, f.revision, f.len), (&b"L1"[..], 42, line.len()));
    // Every strict prefix is refused.
    for n in 0..line.len() {
        assert!(decode(&line[..n], 1024).is_err(), "prefix {n}");
    }
    // Changing the revision is caught by the checksum.
    let mut other = line.clone();
    other[3] = b'3';
    assert_eq!(
        decode(&other, 1024).unwrap_err().to_string(),
        "checksum mismatch"
    );
    // A huge claimed length is refused without reading it.
    assert!(decode(b"L1 1 99999999999 ", 1024).is_err());
}

#[test]
fn json_form_is_camel_case_with_rfc3339_times() {
    let t = UNIX_EPOCH + Duration::new(1_790_000_000, 123_456_789);
    let l = Lock {
        id: "00ff".into(),
        target: LockTarget::TokenId("jti-1".into()),
        message: "stolen laptop".into(),
        created_at: t,
        expires_at: Some(t + Duration::from_secs(3600)),
        created_by: "admin@example.com".into(),
    };
    let v = serde_json::to_value(&l).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "id": "00ff",
            "target": {"kind": "tokenId", "value": "jti-1"},
            "message": "stolen laptop",
            "createdAt": "2026-09-21T14:13:20.123456789Z",
            "expiresAt": "2026-09-21T15:13:20.123456789Z",
            "createdBy": "admin@example.com"
        })
    );
    assert_eq!(serde_json::from_value::<Lock>(v).unwrap(), l);
    let no_expiry: Lock = serde_json::from_value(serde_json::json!({
        "id": "1", "target": {"kind": "user", "value": "a"},
        "createdAt": "2026-09-21T16:13:20+02:00"
    }))
    .unwrap();
    assert_eq!(no_expiry.expires_at, None);
    assert_eq!(
        no_expiry.created_at,
        UNIX_EPOCH + Duration::from_secs(1_790_000_000)
    );

    let p = posture("d", Duration::from_secs(1));
    let v = serde_json::to_value(&p).unwrap();
    assert_eq!(v["deviceId"], "d");
    assert_eq!(v["attributes"]["diskEncrypted"], true);
    assert_eq!(v["attributes"]["edrScore"], 87);
    assert!(
        v["attributes"].get("screenLock").is_none(),
        "unknown is left out"
    );
    assert_eq!(serde_json::from_value::<PostureRecord>(v).unwrap(), p);
}

#[test]
fn lock_ids_are_random_hex() {
    let a = new_id().unwrap();
    let b = new_id().unwrap();
    assert_eq!(a.len(), 32);
    assert!(a
        .bytes()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    assert_ne!(a, b);
}

#[test]
fn a_directory_is_opened_by_one_store_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::open(tmp.path(), small()).unwrap();
    let lock_file = fs::read_to_string(tmp.path().join("LOCK")).unwrap();
    assert!(lock_file.starts_with(&format!("pid={} ", std::process::id())));
    let err = FileStore::open(tmp.path(), small()).unwrap_err();
    assert!(matches!(err, StoreError::Busy { .. }), "{err}");
    // The refused open did not remove the holder's lock file.
    assert_eq!(
        fs::read_to_string(tmp.path().join("LOCK")).unwrap(),
        lock_file
    );
    drop(store);
    assert!(!tmp.path().join("LOCK").exists());
    drop(FileStore::open(tmp.path(), small()).unwrap());
}

#[test]
fn a_lock_file_held_by_a_running_process_refuses_the_open() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = child.id();
    let start = file::process_start(pid).expect("/proc is readable");
    fs::write(
        tmp.path().join("LOCK"),
        format!("pid={pid} start={start}\n"),
    )
    .unwrap();
    let err = FileStore::open(tmp.path(), small()).unwrap_err();
    assert!(
        matches!(&err, StoreError::Busy { reason, .. } if reason.contains(&pid.to_string())),
        "{err}"
    );
    // The same pid with another start time is a reused pid: stale.
    fs::write(
        tmp.path().join("LOCK"),
        format!("pid={pid} start={}\n", start + 1),
    )
    .unwrap();
    drop(FileStore::open(tmp.path(), small()).unwrap());
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_lock_file_left_by_a_dead_process_is_taken_over() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    fs::write(tmp.path().join("LOCK"), format!("pid={pid} start=1\n")).unwrap();
    let store = FileStore::open(tmp.path(), small()).unwrap();
    let now = fs::read_to_string(tmp.path().join("LOCK")).unwrap();
    assert!(now.starts_with(&format!("pid={} ", std::process::id())));
    drop(store);
    // An old, unreadable lock file (crash right after creating it) is stale too.
    fs::write(tmp.path().join("LOCK"), b"").unwrap();
    let old = SystemTime::now() - Duration::from_secs(60);
    fs::File::options()
        .write(true)
        .open(tmp.path().join("LOCK"))
        .unwrap()
        .set_modified(old)
        .unwrap();
    drop(FileStore::open(tmp.path(), small()).unwrap());
}

const CRASH_DIR_ENV: &str = "ZTGATE_STATE_CRASH_DIR";

/// The child process of [`acknowledged_writes_survive_kill_9`] (the test binary running that
/// same test with [`CRASH_DIR_ENV`] set): writes locks into `dir` as fast as it can and prints
/// the id of each one once `put_lock` has returned, until it is killed.
fn crash_child_writer(dir: &std::path::Path) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // A small threshold so compactions happen while being killed too.
        let store = FileStore::open(
            dir,
            FileStoreOptions {
                compact_log_bytes: 16 << 10,
            },
        )
        .unwrap();
        let mut out = std::io::stdout();
        for i in 0..1_000_000u32 {
            let l = lock(LockTarget::User(format!("user-{i}")));
            let id = l.id.clone();
            store.put_lock(l).await.unwrap();
            if i % 7 == 0 {
                store
                    .put_posture(posture(
                        &format!("dev-{}", i % 13),
                        Duration::from_secs(600),
                    ))
                    .await
                    .unwrap();
            }
            out.write_all(format!("ACK {id}\n").as_bytes()).unwrap();
            out.flush().unwrap();
        }
    });
}

/// Kills a writer with SIGKILL three times: every write it acknowledged is there afterwards.
/// The writer is this test binary running this one test again, with [`CRASH_DIR_ENV`] naming
/// the store: then the test is the writer, [`crash_child_writer`]. Without the variable it is
/// the test, so no run of the suite counts the writer as a passing test of its own.
#[test]
fn acknowledged_writes_survive_kill_9() {
    if let Some(dir) = std::env::var_os(CRASH_DIR_ENV) {
        crash_child_writer(std::path::Path::new(&dir));
        return;
    }
    // This test's name as the test harness knows it: the module path without the crate.
    let module = module_path!()
        .split_once("::")
        .map_or(module_path!(), |(_, rest)| rest);
    let this_test = format!("{module}::acknowledged_writes_survive_kill_9");
    let tmp = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acked = Vec::new();
    for round in 0..3 {
        let mut child = Command::new(&exe)
            .args(["--exact", &this_test, "--nocapture", "--test-threads=1"])
            .env(CRASH_DIR_ENV, tmp.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        let mut this_round = 0;
        let mut line = String::new();
        // Kill at a slightly different point each round.
        let kill_after = 150 + round * 37;
        let mut killed = false;
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap() == 0 {
                break;
            }
            // Only a whole line is an acknowledgement.
            if let Some(id) = line.strip_prefix("ACK ").and_then(|l| l.strip_suffix('\n')) {
                acked.push(id.to_owned());
                this_round += 1;
                if this_round == kill_after && !killed {
                    child.kill().unwrap(); // SIGKILL
                    killed = true;
                }
            }
        }
        let status = child.wait().unwrap();
        assert!(killed, "child exited by itself: {status}");
        assert!(!status.success());

        let store = FileStore::open(tmp.path(), small()).unwrap();
        let missing: Vec<&String> = acked.iter().filter(|id| store.lock(id).is_none()).collect();
        assert!(
            missing.is_empty(),
            "round {round}: {} of {} acknowledged locks lost",
            missing.len(),
            acked.len()
        );
        // Nothing but acknowledged writes, plus the few a crash caught in flight, is there.
        // (Under load a kill can land after a write became durable but before its
        // acknowledgement was printed, twice per round at most; losing an acknowledged write
        // is the failure this test is about, and it is checked above.)
        let locks = store.locks().len();
        assert!(
            locks >= acked.len() && locks <= acked.len() + 2 * (round + 1),
            "round {round}: {locks} locks stored, {} acknowledged",
            acked.len()
        );
    }
}

/// The store's index finds exactly the locks [`LockTarget::matches`] says apply: requests (the
/// index) and live streams (the definition) can never disagree about who a lock covers.
#[tokio::test]
async fn the_lock_index_answers_as_the_one_match_definition() {
    let names = ["alice", "carol", "ops", "dev", "d1", "j1", "s1"];
    let targets: Vec<LockTarget> = names
        .iter()
        .flat_map(|n| {
            [
                LockTarget::User((*n).into()),
                LockTarget::Group((*n).into()),
                LockTarget::Device((*n).into()),
                LockTarget::TokenId((*n).into()),
                LockTarget::Session((*n).into()),
            ]
        })
        .collect();
    let groups_a = vec!["dev".to_owned()];
    let groups_b = vec!["ops".to_owned(), "carol".to_owned()];
    let subjects = [
        user("alice"),
        LockSubject {
            user: Some("alice"),
            groups: &groups_a,
            acting_user: Some("carol"),
            acting_groups: &groups_b,
            ..LockSubject::default()
        },
        LockSubject {
            device: Some("d1"),
            token_id: Some("j1"),
            session: Some("s1"),
            ..LockSubject::default()
        },
        LockSubject {
            user: Some("d1"),
            groups: &groups_b,
            ..LockSubject::default()
        },
    ];
    for target in &targets {
        let store = MemoryStore::new();
        store.put_lock(lock(target.clone())).await.unwrap();
        for s in &subjects {
            assert_eq!(
                store.view().matches(s).is_some(),
                target.matches(s),
                "{target:?} on {s:?}"
            );
        }
    }
}
