//! The one reloader: every part whose files may change while the gateway runs (serving
//! certificate, client CA bundles, upstream CA, client certificate and token, etcd's TLS files,
//! policies, the config file) registers here what it watches, how often, and what to do with a
//! change.
//!
//! Every interval (and on SIGHUP, for the parts that ask for it) the watched source is read
//! whole and compared with what was last seen; on a change — or on SIGHUP, whatever changed —
//! it is handed to the part, which validates it and swaps it in only if it is usable. A bad
//! change keeps the last good state: file sets log why here; parts with their own log lines and
//! metrics (policies, the config) log in their own `apply`. Reading the whole (small) files
//! rather than watching inodes is what makes the Kubernetes Secret/ConfigMap `..data` symlink
//! swap work.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::util::chain::error_chain;

/// Why a watched file could not be read (logged by the reloader, which keeps the last good
/// state until the next tick).
#[derive(Debug, thiserror::Error)]
#[error("{}", path.display())]
pub struct ReadError {
    /// The file.
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Why a changed set of watched files is unusable: whatever error the part's own parsing gives,
/// logged as it displays.
pub type ApplyError = Box<dyn std::error::Error + Send + Sync>;

/// How a registered part is woken.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    /// How often the source is read.
    pub interval: Duration,
    /// Whether SIGHUP also wakes it (and makes it apply its source even if unchanged).
    pub on_sighup: bool,
}

impl Schedule {
    /// Every `interval` only.
    pub fn every(interval: Duration) -> Schedule {
        Schedule {
            interval,
            on_sighup: false,
        }
    }

    /// Every `interval`, and at once on SIGHUP.
    pub fn every_or_on_sighup(interval: Duration) -> Schedule {
        Schedule {
            interval,
            on_sighup: true,
        }
    }
}

/// A part that reloads: what it reads and what it does with a change.
pub trait Reload: Send + 'static {
    /// What is compared between two reads.
    type Snapshot: PartialEq + Send + Sync + 'static;

    /// Reads the source. An error (a file that cannot be read) is logged by the reloader and
    /// leaves everything as it was until the next tick.
    fn read(&mut self) -> impl Future<Output = Result<Self::Snapshot, ReadError>> + Send;

    /// Applies a changed (or, on SIGHUP, re-read) snapshot; keeps the last good state when it
    /// is not usable, and logs why. The snapshot is remembered as the last one seen either
    /// way, so a bad change is reported once, not on every tick.
    fn apply(&mut self, snapshot: &Self::Snapshot, forced: bool)
        -> impl Future<Output = ()> + Send;
}

/// Where parts register; their reloads stop when `stop` is cancelled.
#[derive(Clone)]
pub struct Reloader {
    stop: CancellationToken,
}

impl Reloader {
    pub fn new(stop: CancellationToken) -> Reloader {
        Reloader { stop }
    }

    /// Watches `part` on `schedule`; `initial` is what the part was built from (None: compare
    /// with the first read).
    pub fn register<R: Reload>(
        &self,
        what: &'static str,
        schedule: Schedule,
        initial: Option<R::Snapshot>,
        mut part: R,
    ) {
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let mut tick = Tick::new(schedule).await;
            let mut last = initial;
            loop {
                let forced = match tick.next(&stop).await {
                    Some(forced) => forced,
                    None => return,
                };
                let now = match part.read().await {
                    Ok(now) => now,
                    Err(e) => {
                        tracing::warn!(what, error = %error_chain(&e), "cannot read rotated file; keeping the last good one");
                        continue;
                    }
                };
                if !forced && last.as_ref() == Some(&now) {
                    continue;
                }
                part.apply(&now, forced).await;
                last = Some(now);
            }
        });
    }

    /// Watches a set of files, handing `apply` their contents whenever any of them changes;
    /// `apply` returns why the new contents are unusable, and the last good material stays.
    /// The files are read now, so a change made while the part was being built is seen.
    pub fn watch_files<F>(
        &self,
        what: &'static str,
        paths: Vec<PathBuf>,
        interval: Duration,
        apply: F,
    ) where
        F: FnMut(&[Vec<u8>]) -> Result<(), ApplyError> + Send + 'static,
    {
        let initial: Vec<Vec<u8>> = paths
            .iter()
            .map(|p| std::fs::read(p).unwrap_or_default())
            .collect();
        self.register(
            what,
            Schedule::every(interval),
            Some(initial),
            Files { what, paths, apply },
        );
    }
}

/// A set of files read whole; used by [`Reloader::watch_files`].
struct Files<F> {
    what: &'static str,
    paths: Vec<PathBuf>,
    apply: F,
}

impl<F> Reload for Files<F>
where
    F: FnMut(&[Vec<u8>]) -> Result<(), ApplyError> + Send + 'static,
{
    type Snapshot = Vec<Vec<u8>>;

    async fn read(&mut self) -> Result<Vec<Vec<u8>>, ReadError> {
        let mut current = Vec::with_capacity(self.paths.len());
        for p in &self.paths {
            match tokio::fs::read(p).await {
                Ok(b) => current.push(b),
                Err(source) => {
                    return Err(ReadError {
                        path: p.clone(),
                        source,
                    })
                }
            }
        }
        Ok(current)
    }

    async fn apply(&mut self, files: &Vec<Vec<u8>>, _forced: bool) {
        let what = self.what;
        match (self.apply)(files) {
            Ok(()) => tracing::info!(what, "reloaded after file change"),
            Err(e) => {
                tracing::warn!(what, error = %e, "rotated file is invalid; keeping the last good one")
            }
        }
    }
}

/// Wakes a reloader every interval, or at once on SIGHUP when its schedule asks for it.
enum Tick {
    /// A steady interval (a slow read or apply delays the next tick, never bunches them).
    Timer(tokio::time::Interval),
    /// A fresh wait after each wake-up, cut short by SIGHUP.
    Hup {
        interval: Duration,
        hup: Option<tokio::signal::unix::Signal>,
    },
}

impl Tick {
    async fn new(schedule: Schedule) -> Tick {
        if schedule.on_sighup {
            return Tick::Hup {
                interval: schedule.interval,
                hup: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
            };
        }
        let mut timer = tokio::time::interval(schedule.interval);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; the source was just read.
        timer.tick().await;
        Tick::Timer(timer)
    }

    /// `Some(true)` on SIGHUP (reload even if nothing seems changed), `Some(false)` on the
    /// timer, `None` when `stop` is cancelled.
    async fn next(&mut self, stop: &CancellationToken) -> Option<bool> {
        match self {
            Tick::Timer(timer) => tokio::select! {
                _ = stop.cancelled() => None,
                _ = timer.tick() => Some(false),
            },
            Tick::Hup { interval, hup } => {
                let hup = async {
                    match hup.as_mut() {
                        Some(h) => {
                            h.recv().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                tokio::select! {
                    _ = stop.cancelled() => None,
                    _ = tokio::time::sleep(*interval) => Some(false),
                    _ = hup => Some(true),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    /// Polls `cond` every 5 ms for up to 5 s.
    async fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Replaces the file whole (as a Secret volume's symlink swap does), so a tick never reads
    /// it half-written.
    fn put(path: &std::path::Path, text: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, path).expect("rename");
    }

    #[tokio::test]
    async fn a_change_is_applied_and_a_bad_one_keeps_the_last_good_state() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("value");
        std::fs::write(&path, "1").expect("write");
        let stop = CancellationToken::new();
        let applied = Arc::new(Mutex::new(Vec::<String>::new()));
        let attempts = Arc::new(AtomicUsize::new(0));
        let (a, n) = (applied.clone(), attempts.clone());
        Reloader::new(stop.clone()).watch_files(
            "value",
            vec![path.clone()],
            Duration::from_millis(10),
            move |files| {
                n.fetch_add(1, Ordering::SeqCst);
                let text = String::from_utf8(files[0].clone())?;
                if text == "bad" {
                    return Err("not a value".into());
                }
                crate::util::sync::lock(&a).push(text);
                Ok(())
            },
        );
        let applied_now = || crate::util::sync::lock(&applied).clone();

        put(&path, "2");
        eventually("the change is applied", || applied_now() == ["2"]).await;
        // What was there at registration was never applied again.
        assert_eq!(attempts.load(Ordering::SeqCst), 1);

        put(&path, "bad");
        eventually("the bad change is tried", || {
            attempts.load(Ordering::SeqCst) == 2
        })
        .await;
        put(&path, "3");
        eventually("the next good change is applied", || {
            applied_now() == ["2", "3"]
        })
        .await;
        // The bad contents were tried once, not on every tick.
        assert_eq!(attempts.load(Ordering::SeqCst), 3);

        // A file that cannot be read leaves everything as it was.
        std::fs::remove_file(&path).expect("remove");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(attempts.load(Ordering::SeqCst), 3);
        stop.cancel();
    }
}
