//! Sinks: background tasks that write events somewhere, each fed by its own bounded queue.
//!
//! The request path only ever puts an `Arc<Event>` on a queue ([`super::Auditor::record`]);
//! serialization and I/O happen here. Blocking file and stdout writes run on tokio's blocking
//! pool, a batch at a time, so they never hold up a runtime worker.

pub mod file;
pub mod stdout;
pub mod webhook;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::event::Event;

/// What a sink's queue carries.
pub(crate) enum Msg {
    Event(Arc<Event>),
    /// Answered once every event queued before it has been written (or given up on).
    Flush(oneshot::Sender<()>),
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

/// At most this many queued messages are written per trip to the blocking pool.
const LINE_BATCH: usize = 512;

/// The task behind a file or stdout sink.
pub(crate) async fn run_line_sink(
    mut rx: mpsc::Receiver<Msg>,
    stop: CancellationToken,
    sink: Box<dyn LineSink>,
    stats: Arc<SinkStats>,
) {
    let mut sink = Some(sink);
    loop {
        let first = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            m = rx.recv() => m,
        };
        let Some(first) = first else { break };
        let mut batch = vec![first];
        while batch.len() < LINE_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        sink = write_lines(sink, batch, &stats).await;
    }
    // Shutting down: refuse new events, write what is queued.
    rx.close();
    let mut rest = Vec::new();
    while let Some(m) = rx.recv().await {
        rest.push(m);
    }
    if !rest.is_empty() {
        write_lines(sink, rest, &stats).await;
    }
}

async fn write_lines(
    sink: Option<Box<dyn LineSink>>,
    batch: Vec<Msg>,
    stats: &Arc<SinkStats>,
) -> Option<Box<dyn LineSink>> {
    let Some(mut sink) = sink else {
        // The writer was lost to a panic: nothing can be written any more.
        let n = batch.iter().filter(|m| matches!(m, Msg::Event(_))).count();
        stats.add_dropped(n as u64, "sink writer failed");
        return None;
    };
    let st = stats.clone();
    let job = tokio::task::spawn_blocking(move || {
        let mut acks = Vec::new();
        let mut line = Vec::with_capacity(1024);
        for msg in batch {
            match msg {
                Msg::Event(ev) => {
                    line.clear();
                    ev.write_json(&mut line);
                    line.push(b'\n');
                    match sink.write_line(&line) {
                        Ok(()) => st.add_written(1),
                        Err(e) => st.add_dropped(1, &format!("write failed: {e}")),
                    }
                }
                Msg::Flush(ack) => acks.push(ack),
            }
        }
        if let Err(e) = sink.flush() {
            st.failure(&format!("flush failed: {e}"));
        }
        (sink, acks)
    });
    match job.await {
        Ok((sink, acks)) => {
            for ack in acks {
                let _ = ack.send(());
            }
            Some(sink)
        }
        Err(e) => {
            tracing::error!(sink = %stats.name, error = %e, "audit sink writer panicked");
            None
        }
    }
}
