//! Sinks: background tasks that write events somewhere, each fed by its own bounded queue.
//!
//! The request path serializes each event (one JSON object, about 1 KB) and puts the bytes on
//! the queues ([`super::Auditor::record`]); I/O happens here. A file or stdout sink has a
//! thread of its own that writes whatever has queued up since its last write, one `write`
//! per batch, so blocking I/O never holds up a runtime worker and a busy gateway does not pay
//! a hand-off to tokio's blocking pool for every few events.

pub mod file;
pub mod stdout;
pub mod webhook;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use bytes::Bytes;

/// What a sink's queue carries.
pub(crate) enum Msg {
    /// One event as a JSON object (no trailing newline).
    Event(Bytes),
    /// Answered once every event queued before it has been written (or given up on).
    Flush(oneshot::Sender<()>),
    /// The gateway is stopping: write what is queued, then end (line sinks; a webhook sink
    /// watches its stop token instead).
    Stop,
}

/// Drops (and delivery failures) are logged at most this often per sink.
pub const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Counters of one sink.
#[derive(Debug)]
pub(crate) struct SinkStats {
    pub(crate) name: String,
    written: AtomicU64,
    dropped: AtomicU64,
    /// Milliseconds since [`epoch`] of the last drop warning, or `u64::MAX` for never.
    last_drop_log: AtomicU64,
    last_failure_log: AtomicU64,
}

fn epoch() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Returns true if the caller may log now (at most once per [`DROP_LOG_INTERVAL`]).
fn may_log(last: &AtomicU64) -> bool {
    let now = u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX - 1);
    let prev = last.load(Ordering::Relaxed);
    if prev != u64::MAX && now.saturating_sub(prev) < DROP_LOG_INTERVAL.as_millis() as u64 {
        return false;
    }
    last.compare_exchange(prev, now, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
}

impl SinkStats {
    pub(crate) fn new(name: String) -> Arc<SinkStats> {
        epoch();
        Arc::new(SinkStats {
            name,
            written: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            last_drop_log: AtomicU64::new(u64::MAX),
            last_failure_log: AtomicU64::new(u64::MAX),
        })
    }

    pub(crate) fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub(crate) fn add_written(&self, n: u64) {
        self.written.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts `n` events lost for this sink and warns (rate-limited).
    pub(crate) fn add_dropped(&self, n: u64, why: &str) {
        let total = self.dropped.fetch_add(n, Ordering::Relaxed) + n;
        if may_log(&self.last_drop_log) {
            tracing::warn!(
                sink = %self.name,
                dropped_total = total,
                reason = why,
                "audit events dropped"
            );
        }
    }

    /// A delivery attempt failed but will be retried: warns (rate-limited).
    pub(crate) fn failure(&self, why: &str) {
        if may_log(&self.last_failure_log) {
            tracing::warn!(sink = %self.name, error = why, "audit sink delivery failing; retrying");
        }
    }
}

/// A synchronous line writer (file, stdout).
pub(crate) trait LineSink: Send + 'static {
    /// Writes one line (which ends in `\n`).
    fn write_line(&mut self, line: &[u8]) -> io::Result<()>;
    fn flush(&mut self) -> io::Result<()>;
}

/// At most this many queued messages are written per `write`.
const LINE_BATCH: usize = 512;

/// After a batch smaller than [`LINE_BATCH`], the writer waits this long before it looks at
/// the queue again, so events arriving meanwhile are written together. Without it a busy
/// gateway woke the writer for nearly every request (~10,000 context switches a second, each
/// also costing the sending worker a wake-up); with it, at most ~500 a second. An event reaches
/// the file at most this much later.
const LINE_LINGER: Duration = Duration::from_millis(2);

/// The task behind a file or stdout sink: it starts the writer thread and, when `stop` is
/// cancelled, asks it to write what is queued and end; it ends with the thread.
pub(crate) async fn run_line_sink(
    rx: mpsc::Receiver<Msg>,
    stop: CancellationToken,
    sink: Box<dyn LineSink>,
    stats: Arc<SinkStats>,
    // Weak: the queue closes (and the writer ends) when the auditor is dropped, too.
    stopper: mpsc::WeakSender<Msg>,
) {
    let (done_tx, done) = oneshot::channel::<()>();
    let st = stats.clone();
    let spawned = std::thread::Builder::new()
        .name("ztgate-audit".into())
        .spawn(move || {
            write_lines(rx, sink, &st);
            let _ = done_tx.send(());
        });
    if let Err(e) = spawned {
        tracing::error!(sink = %stats.name, error = %e, "cannot start the audit writer thread");
        return;
    }
    let mut done = done;
    let ended = tokio::select! {
        _ = stop.cancelled() => {
            // Queued behind every event already sent; waits for room if the queue is full.
            if let Some(tx) = stopper.upgrade() {
                let _ = tx.send(Msg::Stop).await;
            }
            done.await
        }
        r = &mut done => r,
    };
    if ended.is_err() {
        tracing::error!(sink = %stats.name, "audit sink writer panicked; its events are dropped");
    }
}

/// The writer thread: batches of queued lines, one write and flush per batch, until
/// [`Msg::Stop`] (then what is still queued) or until every sender is gone.
fn write_lines(mut rx: mpsc::Receiver<Msg>, mut sink: Box<dyn LineSink>, stats: &SinkStats) {
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut acks = Vec::new();
    let mut stopping = false;
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        let mut n = 0;
        while let Some(msg) = next.take() {
            match msg {
                Msg::Event(json) => {
                    buf.clear();
                    buf.extend_from_slice(&json);
                    buf.push(b'\n');
                    match sink.write_line(&buf) {
                        Ok(()) => stats.add_written(1),
                        Err(e) => stats.add_dropped(1, &format!("write failed: {e}")),
                    }
                }
                Msg::Flush(ack) => acks.push(ack),
                Msg::Stop => {
                    // Write what is already queued, accept nothing more.
                    rx.close();
                    stopping = true;
                }
            }
            n += 1;
            if n < LINE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if let Err(e) = sink.flush() {
            stats.failure(&format!("flush failed: {e}"));
        }
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
        if n < LINE_BATCH && !stopping {
            std::thread::sleep(LINE_LINGER);
        }
    }
}
