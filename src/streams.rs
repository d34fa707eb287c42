//! Live streams (watch, logs -f, exec, attach, port-forward) and in-flight requests.
//!
//! Every long-lived response is registered here with a cancellation token; closing it ends the
//! stream cleanly (a watch or log body ends with its terminating chunk, an upgraded connection is
//! shut down). Shutdown uses this today; the re-verifier (token expiry, posture, locks) closes
//! individual streams through the same handles.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::telemetry::Metrics;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamKind {
    Watch,
    Logs,
    Exec,
    Attach,
    PortForward,
    Upgrade,
}

impl StreamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Watch => "watch",
            StreamKind::Logs => "logs",
            StreamKind::Exec => "exec",
            StreamKind::Attach => "attach",
            StreamKind::PortForward => "portforward",
            StreamKind::Upgrade => "upgrade",
        }
    }
}

struct Entry {
    kind: StreamKind,
    subject: StreamSubject,
    cancel: CancellationToken,
    slot: CloseSlot,
}

/// Who holds a stream, for matching locks against live streams.
#[derive(Clone, Debug, Default)]
pub struct StreamSubject {
    pub user: String,
    pub groups: Vec<String>,
    pub device: Option<String>,
    pub token_id: Option<String>,
}

/// Locks a mutex whose critical sections leave no half-done state behind, so a panic elsewhere
/// while it was held must not turn every later request into a panic too.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Called once when a stream ends, with why the gateway closed it (None: it ended by itself).
pub type CloseHook = Box<dyn FnOnce(Option<&str>) + Send>;

/// Where a stream's end is reported (audit), and why the gateway closed it, if it did.
#[derive(Clone, Default)]
pub struct CloseSlot {
    inner: Arc<Mutex<(Option<CloseHook>, Option<String>)>>,
}

impl CloseSlot {
    /// Sets the hook run when the stream ends.
    pub fn on_close(&self, hook: CloseHook) {
        lock(&self.inner).0 = Some(hook);
    }

    /// Why the gateway closed the stream, once it has.
    pub fn reason(&self) -> Option<String> {
        lock(&self.inner).1.clone()
    }

    fn set_reason(&self, why: &str) {
        let mut g = lock(&self.inner);
        if g.1.is_none() {
            g.1 = Some(why.to_owned());
        }
    }

    fn fire(&self) {
        let (hook, reason) = {
            let mut g = lock(&self.inner);
            (g.0.take(), g.1.clone())
        };
        if let Some(h) = hook {
            h(reason.as_deref());
        }
    }
}

/// The registry of live streams.
pub struct StreamRegistry {
    root: CancellationToken,
    next: AtomicU64,
    live: Mutex<HashMap<u64, Entry>>,
    metrics: Arc<Metrics>,
}

/// A registered stream. Dropping it unregisters the stream.
pub struct StreamHandle {
    id: u64,
    kind: StreamKind,
    registry: Arc<StreamRegistry>,
    cancel: CancellationToken,
    slot: CloseSlot,
}

impl StreamHandle {
    pub fn close_slot(&self) -> CloseSlot {
        self.slot.clone()
    }

    /// Closes this stream when the credential behind it expires.
    pub fn close_at(&self, deadline: std::time::SystemTime) {
        let cancel = self.cancel.clone();
        let slot = self.slot.clone();
        tokio::spawn(async move {
            let wait = deadline
                .duration_since(std::time::SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(wait) => {
                    slot.set_reason("credential expired; log in again");
                    cancel.cancel();
                }
            }
        });
    }
    pub fn token(&self) -> CancellationToken {
        self.cancel.clone()
    }
    pub fn kind(&self) -> StreamKind {
        self.kind
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        lock(&self.registry.live).remove(&self.id);
        self.registry.metrics.stream_closed(self.kind);
        self.slot.fire();
    }
}

impl StreamRegistry {
    pub fn new(metrics: Arc<Metrics>) -> Arc<StreamRegistry> {
        Arc::new(StreamRegistry {
            root: CancellationToken::new(),
            next: AtomicU64::new(1),
            live: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    pub fn register(self: &Arc<Self>, kind: StreamKind, subject: StreamSubject) -> StreamHandle {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cancel = self.root.child_token();
        let slot = CloseSlot::default();
        lock(&self.live).insert(
            id,
            Entry {
                kind,
                subject,
                cancel: cancel.clone(),
                slot: slot.clone(),
            },
        );
        self.metrics.stream_opened(kind);
        StreamHandle {
            id,
            kind,
            registry: self.clone(),
            cancel,
            slot,
        }
    }

    /// Closes every live stream (shutdown).
    pub fn close_all(&self, why: &str) {
        for e in lock(&self.live).values() {
            e.slot.set_reason(why);
        }
        self.root.cancel();
    }

    /// Closes the streams whose holder matches; returns how many.
    pub fn close_matching(&self, matches: impl Fn(&StreamSubject) -> bool, why: &str) -> usize {
        let live = lock(&self.live);
        let mut n = 0;
        for e in live.values().filter(|e| matches(&e.subject)) {
            e.slot.set_reason(why);
            e.cancel.cancel();
            n += 1;
        }
        n
    }

    pub fn count(&self) -> usize {
        lock(&self.live).len()
    }

    pub fn count_kind(&self, kind: StreamKind) -> usize {
        lock(&self.live).values().filter(|e| e.kind == kind).count()
    }
}

/// Counts non-streaming requests in flight so shutdown can wait for them.
#[derive(Default)]
pub struct Inflight {
    count: AtomicUsize,
    idle: Notify,
}

pub struct InflightGuard(Arc<Inflight>);

impl Inflight {
    pub fn enter(self: &Arc<Self>) -> InflightGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        InflightGuard(self.clone())
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until nothing is in flight or `max` has passed; returns whether it drained.
    pub async fn drain(&self, max: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.idle.notified();
                if self.count() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(max, wait).await.is_ok()
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds a guard until it ends and, when given a cancellation, ends
    /// cleanly as soon as it is cancelled. A JSON watch closed by the gateway for a reason ends
    /// with an `ERROR` event carrying a `Status`, which kubectl prints.
    pub struct GuardedBody<B> {
        #[pin]
        inner: B,
        cancelled: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
        guard: Option<Box<dyn Send>>,
        ended: bool,
        // Set for JSON watches: where the close reason is, and whether the bytes sent so far
        // end at an event boundary (a newline), so an injected event is well-formed.
        watch_errors: Option<CloseSlot>,
        at_boundary: bool,
    }
}

impl<B> GuardedBody<B> {
    pub fn new(inner: B, guard: Box<dyn Send>, cancel: Option<CancellationToken>) -> Self {
        GuardedBody {
            inner,
            cancelled: cancel.map(|c| Box::pin(c.cancelled_owned())),
            guard: Some(guard),
            ended: false,
            watch_errors: None,
            at_boundary: true,
        }
    }

    /// Ends a JSON watch with an `ERROR` event when the gateway closes it for a reason.
    pub fn with_watch_errors(mut self, slot: CloseSlot) -> Self {
        self.watch_errors = Some(slot);
        self
    }
}

/// The `ERROR` watch event for a stream the gateway closed: 401 when the credential lapsed (so
/// client-go re-runs its credential plugin), 403 otherwise.
pub fn watch_error_event(why: &str) -> Bytes {
    let (code, reason) = if why.starts_with("credential") {
        (401, "Unauthorized")
    } else {
        (403, "Forbidden")
    };
    let event = serde_json::json!({
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": why,
            "reason": reason,
            "code": code,
        }
    });
    let mut v = serde_json::to_vec(&event).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

impl<B> HttpBody for GuardedBody<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<crate::body::BoxError>,
{
    type Data = Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        if let Some(c) = this.cancelled.as_mut() {
            if c.as_mut().poll(cx).is_ready() {
                *this.ended = true;
                let why = this.watch_errors.as_ref().and_then(|s| s.reason());
                this.guard.take();
                if let (Some(why), true) = (why, *this.at_boundary) {
                    return Poll::Ready(Some(Ok(Frame::data(watch_error_event(&why)))));
                }
                return Poll::Ready(None);
            }
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !data.is_empty() {
                        *this.at_boundary = data.ends_with(b"\n");
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                *this.ended = true;
                this.guard.take();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                *this.ended = true;
                this.guard.take();
                Poll::Ready(Some(Err(e.into())))
            }
            other => other.map(|o| o.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || (self.cancelled.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
