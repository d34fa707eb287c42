//! The embedded store: a snapshot plus an append-only, checksummed, fsync'd log in a directory.
//!
//! Files in the directory:
//!
//! - `state.log`: one line per committed write, `L1 <revision> <length> <sha256> <json>\n`,
//!   appended and fdatasync'd before the write is acknowledged. It is opened for each write and
//!   closed after it: between writes the store holds no file of the directory open for writing,
//!   so the file system can be remounted read-only under a running gateway;
//! - `state.snapshot`: one line, `S1 <revision> <length> <sha256> <json>\n`, the whole state at
//!   `revision`, replaced atomically (temp file, fsync, rename, directory fsync) by compaction;
//! - `LOCK`: the pid (and start time) of the process that has the directory open.
//!
//! The checksum covers the header before it and the JSON. `docs/state.md` explains why a torn
//! write can only be the last line, which is why a bad last line is cut off (with a warning)
//! while a bad line anywhere else stops the open.
//!
//! A write that fails (disk full, file system read-only, I/O error) is not acknowledged, and
//! the in-memory view keeps what is on disk. When the log can be cut back to its last
//! acknowledged record, the next write simply tries again. When it cannot (or the error was
//! not a plain "no space" / "read-only"), the next write first rewrites everything from the
//! in-memory view (snapshot, then an empty log) — the repair — and only then appends. So the
//! store recovers by itself once space is freed or the file system is writable again; no
//! restart is needed (`docs/hardening.md`, tests/it/faults_disk.rs).

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use super::store::{deleted_lock, deleted_posture, put_result, Op, Removed};
use super::{BoxFuture, Lock, PostureRecord, Revision, State, Store, StoreError, View};
use crate::util::sync::lock;

const LOG_FILE: &str = "state.log";
const SNAPSHOT_FILE: &str = "state.snapshot";
const SNAPSHOT_TMP: &str = "state.snapshot.tmp";
const LOCK_FILE: &str = "LOCK";

const LOG_TAG: &[u8] = b"L1";
const SNAPSHOT_TAG: &[u8] = b"S1";

/// Largest JSON of one log record. A posture report with its extras fits easily; the limit
/// keeps a corrupt length from asking for a huge allocation.
pub(crate) const MAX_RECORD_BYTES: usize = 1 << 20;
/// Largest snapshot JSON.
const MAX_SNAPSHOT_BYTES: usize = 1 << 30;

/// Tuning for [`FileStore`].
#[derive(Clone, Debug)]
pub struct FileStoreOptions {
    /// Compact (snapshot + empty log) once the log is larger than this. Default 8 MiB.
    pub compact_log_bytes: u64,
}

impl Default for FileStoreOptions {
    fn default() -> Self {
        FileStoreOptions {
            compact_log_bytes: 8 << 20,
        }
    }
}

/// The embedded on-disk store. Cheap to clone; the directory is released when the last clone
/// is dropped.
#[derive(Clone, Debug)]
pub struct FileStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    view: View,
    writer: Mutex<Writer>,
    dir: PathBuf,
    options: FileStoreOptions,
    // Last, so the log is closed before the directory is released.
    _dir_lock: DirLock,
}

#[derive(Debug)]
struct Writer {
    /// Bytes of acknowledged records in the log.
    log_len: u64,
    /// Why the log may hold more (or other) bytes than the acknowledged records, after a write
    /// that failed and could not be cut back: the next write repairs first (see the module doc).
    repair: Option<String>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl FileStore {
    /// Opens (creating if needed) the store in `dir`: takes the directory lock, loads the
    /// snapshot, replays the log, cuts off a torn last record. Blocking; call it at startup or
    /// from `spawn_blocking`.
    pub fn open(dir: impl AsRef<Path>, options: FileStoreOptions) -> Result<FileStore, StoreError> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let dir = dir.canonicalize().map_err(io_err(dir))?;
        let dir_lock = DirLock::acquire(&dir)?;

        let tmp = dir.join(SNAPSHOT_TMP);
        match fs::remove_file(&tmp) {
            Ok(()) => tracing::info!(path = %tmp.display(), "removed an unfinished snapshot"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&tmp)(e)),
        }

        let (snap_rev, state) = read_snapshot(&dir.join(SNAPSHOT_FILE))?;
        let view = View::default();
        view.load(snap_rev, state);

        let log_path = dir.join(LOG_FILE);
        let mut log = open_private(OpenOptions::new().read(true).append(true).create(true))
            .open(&log_path)
            .map_err(io_err(&log_path))?;
        // The log (and LOCK) may have just been created: make their names durable.
        sync_dir(&dir)?;
        let mut buf = Vec::new();
        log.read_to_end(&mut buf).map_err(io_err(&log_path))?;
        let replay = replay(&buf, snap_rev, &log_path)?;
        let mut log_len = buf.len() as u64;
        if let Some((offset, reason)) = &replay.torn {
            tracing::warn!(
                path = %log_path.display(),
                offset,
                dropped_bytes = log_len - offset,
                reason = %reason,
                "state log ends in a torn or corrupt record (a write interrupted by a crash, never acknowledged); cutting it off"
            );
            log.set_len(*offset).map_err(io_err(&log_path))?;
            log.sync_all().map_err(io_err(&log_path))?;
            log_len = *offset;
        }
        for (rev, op) in replay.ops {
            view.apply(rev, op);
        }
        drop(log);

        let store = FileStore {
            inner: Arc::new(Inner {
                view,
                writer: Mutex::new(Writer {
                    log_len,
                    repair: None,
                }),
                dir,
                options,
                _dir_lock: dir_lock,
            }),
        };
        {
            let mut w = lock(&store.inner.writer);
            if replay.skipped || w.log_len > store.inner.options.compact_log_bytes {
                // A compaction interrupted after its snapshot leaves records the snapshot
                // already holds; finishing it now keeps replay short. Not finishing it (a full
                // disk) loses nothing: the records are valid where they are.
                if let Err(e) = store.inner.compact_locked(&mut w) {
                    tracing::warn!(error = %e, "state store compaction at open failed; will retry");
                }
            }
        }
        tracing::info!(
            dir = %store.inner.dir.display(),
            revision = store.inner.view.revision(),
            "state store opened"
        );
        Ok(store)
    }

    /// The directory this store lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Current size of the log in bytes (for tests and metrics).
    pub fn log_bytes(&self) -> u64 {
        lock(&self.inner.writer).log_len
    }

    async fn commit(&self, op: Op) -> Result<Option<(Revision, Option<Removed>)>, StoreError> {
        op.validate()?;
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || inner.commit(op))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

impl Inner {
    fn commit(&self, op: Op) -> Result<Option<(Revision, Option<Removed>)>, StoreError> {
        let mut w = lock(&self.writer);
        let removed = self.view.existing(&op);
        if matches!(op, Op::DeleteLock { .. } | Op::DeletePosture { .. }) && removed.is_none() {
            return Ok(None);
        }
        let revision = self.view.revision() + 1;
        let json = serde_json::to_vec(&op).map_err(|e| StoreError::Invalid(e.to_string()))?;
        if json.len() > MAX_RECORD_BYTES {
            return Err(StoreError::Invalid(format!(
                "record is {} bytes, at most {MAX_RECORD_BYTES} allowed",
                json.len()
            )));
        }
        let line = encode(LOG_TAG, revision, &json);
        let path = self.dir.join(LOG_FILE);
        let mut log = self.open_log(&mut w)?;
        let written = log.write_all(&line).and_then(|()| log.sync_data());
        if let Err(e) = written {
            // Cut the log back to its acknowledged records. After an error other than "no
            // space" or "read-only" (EIO from fsync), the kernel's view of the file and the
            // disk's may disagree: rewrite everything before the next append, even if the cut
            // worked.
            let cut = log
                .set_len(w.log_len)
                .and_then(|()| log.sync_all())
                .err()
                .map(|c| format!("appending failed ({e}); cutting the log back failed ({c})"));
            let plain = matches!(
                e.kind(),
                io::ErrorKind::StorageFull
                    | io::ErrorKind::QuotaExceeded
                    | io::ErrorKind::ReadOnlyFilesystem
            );
            if let Some(why) = cut.or_else(|| (!plain).then(|| format!("appending failed ({e})"))) {
                w.repair = Some(why);
            }
            tracing::warn!(
                path = %path.display(),
                error = %e,
                repair_pending = w.repair.is_some(),
                "state store write failed; the change was not acknowledged"
            );
            return Err(io_err(&path)(e));
        }
        drop(log);
        w.log_len += line.len() as u64;
        self.view.apply(revision, op);
        if w.log_len > self.options.compact_log_bytes {
            // The write is durable already; a failed compaction is retried at the next write.
            if let Err(e) = self.compact_locked(&mut w) {
                tracing::warn!(error = %e, "state store compaction failed");
            }
        }
        Ok(Some((revision, removed)))
    }

    /// Opens the log for one append, after repairing it if an earlier failure (or anything
    /// else) left it different from the acknowledged records.
    fn open_log(&self, w: &mut Writer) -> Result<File, StoreError> {
        let path = self.dir.join(LOG_FILE);
        for _ in 0..2 {
            if w.repair.is_some() {
                self.compact_locked(w)?;
            }
            let log = open_private(OpenOptions::new().append(true).create(true))
                .open(&path)
                .map_err(io_err(&path))?;
            let len = log.metadata().map_err(io_err(&path))?.len();
            if len == w.log_len {
                return Ok(log);
            }
            w.repair = Some(format!("the log is {len} bytes, {} expected", w.log_len));
        }
        Err(StoreError::Io {
            path: path.display().to_string(),
            source: io::Error::other(w.repair.clone().unwrap_or_default()),
        })
    }

    /// Writes a snapshot of everything in force and empties the log. Holds the writer mutex
    /// throughout, so the log never holds a record newer than the snapshot being written. This
    /// is also the repair after a failed write: the snapshot comes from the in-memory view,
    /// which holds exactly the acknowledged writes.
    fn compact_locked(&self, w: &mut Writer) -> Result<(), StoreError> {
        let now = SystemTime::now();
        self.view.prune(now);
        let (revision, state) = {
            let _g = self.view.hold();
            (self.view.revision(), self.view.state_at(now))
        };
        let json = serde_json::to_vec(&state).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let frame = encode(SNAPSHOT_TAG, revision, &json);

        let tmp = self.dir.join(SNAPSHOT_TMP);
        let snap = self.dir.join(SNAPSHOT_FILE);
        let written = (|| {
            let mut f = open_private(OpenOptions::new().write(true).create(true).truncate(true))
                .open(&tmp)
                .map_err(io_err(&tmp))?;
            f.write_all(&frame).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
            drop(f);
            fs::rename(&tmp, &snap).map_err(io_err(&snap))
        })();
        if let Err(e) = written {
            // A partial snapshot must not keep the space a full disk needs back.
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        // Until the rename is durable the old snapshot may come back after a crash, and it needs
        // the log: only empty the log after this. (Either snapshot with the log as it is reads
        // back as the same state: records the new snapshot holds are skipped at replay.)
        sync_dir(&self.dir)?;

        let log_path = self.dir.join(LOG_FILE);
        let emptied = open_private(OpenOptions::new().write(true).create(true))
            .open(&log_path)
            .and_then(|log| {
                log.set_len(0)?;
                log.sync_all()
            });
        if let Err(e) = emptied {
            w.repair = Some(format!("emptying the log after a snapshot failed ({e})"));
            return Err(io_err(&log_path)(e));
        }
        sync_dir(&self.dir)?;
        let before = w.log_len;
        w.log_len = 0;
        if let Some(why) = w.repair.take() {
            tracing::info!(revision, after = %why, "state store repaired: snapshot rewritten, log emptied");
        }
        tracing::debug!(
            revision,
            log_bytes_before = before,
            snapshot_bytes = frame.len(),
            "state store compacted"
        );
        Ok(())
    }
}

impl Store for FileStore {
    fn view(&self) -> &View {
        &self.inner.view
    }

    fn put_lock(&self, lock: Lock) -> BoxFuture<'_, Result<Revision, StoreError>> {
        Box::pin(async move { put_result(self.commit(Op::PutLock { lock }).await) })
    }

    fn delete_lock(&self, id: &str) -> BoxFuture<'_, Result<Option<(Revision, Lock)>, StoreError>> {
        let id = id.to_owned();
        Box::pin(async move { deleted_lock(self.commit(Op::DeleteLock { id }).await) })
    }

    fn put_posture(&self, record: PostureRecord) -> BoxFuture<'_, Result<Revision, StoreError>> {
        Box::pin(async move { put_result(self.commit(Op::PutPosture { record }).await) })
    }

    fn delete_posture(
        &self,
        device_id: &str,
    ) -> BoxFuture<'_, Result<Option<(Revision, PostureRecord)>, StoreError>> {
        let device_id = device_id.to_owned();
        Box::pin(async move { deleted_posture(self.commit(Op::DeletePosture { device_id }).await) })
    }

    fn compact(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut w = lock(&inner.writer);
                inner.compact_locked(&mut w)
            })
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
        })
    }
}

#[cfg(unix)]
fn open_private(o: &mut OpenOptions) -> &mut OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    o.mode(0o600)
}

#[cfg(not(unix))]
fn open_private(o: &mut OpenOptions) -> &mut OpenOptions {
    o
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// `<tag> <revision> <length> <sha256 hex> <json>\n`; the checksum covers
/// `<tag> <revision> <length> ` and the JSON.
pub(crate) fn encode(tag: &[u8], revision: Revision, json: &[u8]) -> Vec<u8> {
    let mut line = Vec::with_capacity(json.len() + 100);
    line.extend_from_slice(tag);
    line.extend_from_slice(format!(" {revision} {} ", json.len()).as_bytes());
    let mut h = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    h.update(&line);
    h.update(json);
    for b in h.finish().as_ref() {
        line.extend_from_slice(format!("{b:02x}").as_bytes());
    }
    line.push(b' ');
    line.extend_from_slice(json);
    line.push(b'\n');
    line
}

#[derive(Debug)]
pub(crate) struct Frame<'a> {
    pub tag: &'a [u8],
    pub revision: Revision,
    pub json: &'a [u8],
    /// Bytes the frame takes, newline included.
    pub len: usize,
}

/// Why there is no frame at the start of a buffer.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    /// The buffer ends inside the named field.
    #[error("incomplete record (ends in the {0})")]
    EndsIn(&'static str),
    /// The buffer ends after the data, before the newline.
    #[error("incomplete record (no final newline)")]
    NoFinalNewline,
    /// The named header field is missing, too long or not a number.
    #[error("no valid {0}")]
    Invalid(&'static str),
    #[error("record length {length} exceeds {max}")]
    TooLong { length: usize, max: usize },
    #[error("record is not followed by a newline")]
    NoNewline,
    #[error("checksum mismatch")]
    ChecksumMismatch,
}

/// Reads one frame from the start of `buf`, or says why there is none.
pub(crate) fn decode(buf: &[u8], max_json: usize) -> Result<Frame<'_>, FrameError> {
    let mut pos = 0;
    let mut field = |max: usize, what: &'static str| -> Result<&[u8], FrameError> {
        let rest = &buf[pos..];
        let end =
            rest.iter()
                .take(max + 1)
                .position(|&b| b == b' ')
                .ok_or(if rest.len() <= max {
                    FrameError::EndsIn(what)
                } else {
                    FrameError::Invalid(what)
                })?;
        pos += end + 1;
        Ok(&rest[..end])
    };
    let tag = field(8, "tag")?;
    let revision = field(20, "revision")?;
    let length = field(20, "length")?;
    let sum = field(64, "checksum")?;
    let header_len = pos - sum.len() - 1;
    let number = |b: &[u8], what: &'static str| -> Result<u64, FrameError> {
        if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
            return Err(FrameError::Invalid(what));
        }
        std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(FrameError::Invalid(what))
    };
    let revision = number(revision, "revision")?;
    let length = usize::try_from(number(length, "length")?).unwrap_or(usize::MAX);
    if length > max_json {
        return Err(FrameError::TooLong {
            length,
            max: max_json,
        });
    }
    if sum.len() != 64 {
        return Err(FrameError::Invalid("checksum"));
    }
    let json = buf
        .get(pos..pos + length)
        .ok_or(FrameError::EndsIn("data"))?;
    match buf.get(pos + length) {
        Some(b'\n') => {}
        Some(_) => return Err(FrameError::NoNewline),
        None => return Err(FrameError::NoFinalNewline),
    }
    let mut h = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    h.update(&buf[..header_len]);
    h.update(json);
    let expected: String = h
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if expected.as_bytes() != sum {
        return Err(FrameError::ChecksumMismatch);
    }
    Ok(Frame {
        tag,
        revision,
        json,
        len: pos + length + 1,
    })
}

fn read_snapshot(path: &Path) -> Result<(Revision, State), StoreError> {
    let buf = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, State::default())),
        Err(e) => return Err(io_err(path)(e)),
    };
    let corrupt = |offset: usize, reason: String| StoreError::Corrupt {
        path: path.display().to_string(),
        offset: offset as u64,
        reason,
    };
    // The snapshot is only ever renamed into place complete, so any damage is corruption.
    let frame = decode(&buf, MAX_SNAPSHOT_BYTES).map_err(|r| corrupt(0, r.to_string()))?;
    if frame.tag != SNAPSHOT_TAG {
        return Err(corrupt(0, "not a snapshot record".into()));
    }
    if frame.len != buf.len() {
        return Err(corrupt(frame.len, "data after the snapshot record".into()));
    }
    let state: State =
        serde_json::from_slice(frame.json).map_err(|e| corrupt(0, format!("snapshot: {e}")))?;
    Ok((frame.revision, state))
}

#[derive(Debug)]
pub(crate) struct Replay {
    pub ops: Vec<(Revision, Op)>,
    /// Offset and reason of a torn last record to cut off.
    pub torn: Option<(u64, String)>,
    /// Records the snapshot already holds were found (an interrupted compaction).
    pub skipped: bool,
}

/// Reads every record of the log. A bad record followed by a good one is corruption; a bad
/// record with nothing good after it is the torn tail of an unacknowledged write.
pub(crate) fn replay(buf: &[u8], snap_rev: Revision, path: &Path) -> Result<Replay, StoreError> {
    let corrupt = |offset: usize, reason: String| StoreError::Corrupt {
        path: path.display().to_string(),
        offset: offset as u64,
        reason,
    };
    let mut out = Replay {
        ops: Vec::new(),
        torn: None,
        skipped: false,
    };
    let mut last = snap_rev;
    let mut pos = 0;
    while pos < buf.len() {
        let frame = match decode(&buf[pos..], MAX_RECORD_BYTES) {
            Ok(f) => f,
            Err(reason) => {
                if let Some(next) = next_valid_record(buf, pos) {
                    return Err(corrupt(
                        pos,
                        format!("{reason}; a valid record follows at offset {next}"),
                    ));
                }
                out.torn = Some((pos as u64, reason.to_string()));
                break;
            }
        };
        if frame.tag != LOG_TAG {
            return Err(corrupt(pos, "not a log record".into()));
        }
        let op: Op = serde_json::from_slice(frame.json)
            .map_err(|e| corrupt(pos, format!("checksum is valid but the record is not: {e}")))?;
        if frame.revision <= snap_rev {
            out.skipped = true;
        } else if frame.revision != last + 1 {
            return Err(corrupt(
                pos,
                format!("revision {} follows revision {last}", frame.revision),
            ));
        } else {
            last = frame.revision;
            out.ops.push((frame.revision, op));
        }
        pos += frame.len;
    }
    Ok(out)
}

fn next_valid_record(buf: &[u8], from: usize) -> Option<usize> {
    (from + 1..buf.len())
        .filter(|&i| buf[i - 1] == b'\n')
        .find(|&i| decode(&buf[i..], MAX_RECORD_BYTES).is_ok())
}

/// Directories open in this process (the LOCK file cannot tell this process from itself).
fn open_dirs() -> &'static Mutex<HashSet<PathBuf>> {
    static DIRS: OnceLock<Mutex<HashSet<PathBuf>>> = OnceLock::new();
    DIRS.get_or_init(Mutex::default)
}

/// Exclusive use of a state directory by one process: a `LOCK` file created with `O_EXCL`,
/// holding `pid=<pid> start=<start time>`, removed on drop. A lock file left by a process that
/// no longer runs (killed, or a pid reused by another process) is taken over.
#[derive(Debug)]
struct DirLock {
    dir: PathBuf,
    path: PathBuf,
    content: String,
}

impl DirLock {
    fn acquire(dir: &Path) -> Result<DirLock, StoreError> {
        let busy = |reason: String| StoreError::Busy {
            path: dir.display().to_string(),
            reason,
        };
        if !lock(open_dirs()).insert(dir.to_path_buf()) {
            return Err(busy("already open in this process".into()));
        }
        let path = dir.join(LOCK_FILE);
        let me = std::process::id();
        let content = format!(
            "pid={me} start={}\n",
            process_start(me).map_or_else(|| "unknown".to_owned(), |s| s.to_string())
        );
        // Constructed now so that every early return below releases the registry entry.
        let lock = DirLock {
            dir: dir.to_path_buf(),
            path,
            content,
        };
        for _ in 0..5 {
            match open_private(OpenOptions::new().write(true).create_new(true)).open(&lock.path) {
                Ok(mut f) => {
                    f.write_all(lock.content.as_bytes())
                        .and_then(|()| f.sync_all())
                        .map_err(io_err(&lock.path))?;
                    return Ok(lock);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(&lock.path)(e)),
            }
            let existing = match fs::read_to_string(&lock.path) {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&lock.path)(e)),
            };
            if let Some(holder) = live_holder(&existing, &lock.path) {
                return Err(busy(holder));
            }
            lock.take_over(&existing)
                .map_err(|e| busy(crate::util::chain::error_chain(&e)))?;
        }
        Err(busy("its LOCK file keeps coming back".into()))
    }

    /// Moves a stale lock file aside and deletes it, unless it changed in the meantime (another
    /// process took it over first), in which case it is put back.
    fn take_over(&self, stale: &str) -> Result<(), TakeOverError> {
        let aside = self
            .dir
            .join(format!("{LOCK_FILE}.stale.{}", std::process::id()));
        match fs::rename(&self.path, &aside) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(TakeOverError::MoveAside(source)),
        }
        let moved = fs::read_to_string(&aside).unwrap_or_default();
        if moved != stale {
            // Someone else's fresh lock: give it back (fails only if a third process got in).
            let _ = fs::hard_link(&aside, &self.path);
            let _ = fs::remove_file(&aside);
            return Err(TakeOverError::Raced);
        }
        tracing::warn!(
            path = %self.path.display(),
            previous = stale.trim(),
            "taking over the state directory from a process that no longer runs"
        );
        let _ = fs::remove_file(&aside);
        Ok(())
    }
}

/// Why a stale lock file was not taken over.
#[derive(Debug, thiserror::Error)]
enum TakeOverError {
    #[error("moving the stale LOCK file aside")]
    MoveAside(#[source] io::Error),
    #[error("another process took the directory over at the same time")]
    Raced,
}

impl Drop for DirLock {
    fn drop(&mut self) {
        if fs::read_to_string(&self.path).is_ok_and(|s| s == self.content) {
            let _ = fs::remove_file(&self.path);
        }
        lock(open_dirs()).remove(&self.dir);
    }
}

/// Describes the holder of a lock file if it still runs; `None` when it is stale.
fn live_holder(content: &str, path: &Path) -> Option<String> {
    let mut pid = None;
    let mut start = None;
    for part in content.split_whitespace() {
        if let Some(v) = part.strip_prefix("pid=") {
            pid = v.parse::<u32>().ok();
        } else if let Some(v) = part.strip_prefix("start=") {
            start = v.parse::<u64>().ok();
        }
    }
    let Some(pid) = pid else {
        // Being written right now, or garbage from a crash right after creating it.
        let age = fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| m.elapsed().ok())
            .unwrap_or_default();
        return (age < Duration::from_secs(10))
            .then(|| format!("{} is being created by another process", path.display()));
    };
    if pid == std::process::id() {
        // This process, but the directory is not open in it (checked before): left over.
        return None;
    }
    match process_state(pid) {
        ProcessState::Gone => None,
        ProcessState::Running { start: now_start } => match (start, now_start) {
            (Some(a), Some(b)) if a != b => None, // pid reused by an unrelated process
            _ => Some(format!(
                "process {pid} has it open ({}); stop it, or delete the file if that process is not a ztgate",
                path.display()
            )),
        },
    }
}

enum ProcessState {
    Gone,
    Running { start: Option<u64> },
}

/// Whether `pid` runs, from `/proc/<pid>/stat`. Without `/proc` (not Linux) every pid is
/// assumed to run, so a stale LOCK file must then be removed by hand.
fn process_state(pid: u32) -> ProcessState {
    if !Path::new("/proc/self/stat").exists() {
        return ProcessState::Running { start: None };
    }
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => match parse_stat(&stat) {
            Some(('Z' | 'X' | 'x', _)) => ProcessState::Gone,
            Some((_, start)) => ProcessState::Running { start: Some(start) },
            None => ProcessState::Running { start: None },
        },
        Err(_) => ProcessState::Gone,
    }
}

/// The process start time (clock ticks since boot), to tell a pid reused after a reboot or a
/// container restart from the process that wrote the lock.
pub(crate) fn process_start(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|(_, start)| start)
}

/// (state, starttime) from `/proc/<pid>/stat`. The command name may hold spaces and
/// parentheses, so fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state (field 3), starttime is field 22: 18 fields further on.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}
