//! Live streams (watch, logs -f, exec, attach, port-forward) and in-flight requests.
//!
//! Every long-lived response is registered here with a cancellation token; closing it ends the
//! stream cleanly (a watch or log body ends with its terminating chunk, an upgraded connection is
//! shut down). Shutdown uses this today; the re-verifier (token expiry, posture, locks) closes
//! individual streams through the same handles.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::telemetry::Metrics;
use crate::util::sync::lock;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamKind {
    Watch,
    Logs,
    Exec,
    Attach,
    PortForward,
    /// The `proxy` verb or subresource, and other long-running reads (`/debug/pprof/`).
    Proxy,
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
            StreamKind::Proxy => "proxy",
            StreamKind::Upgrade => "upgrade",
        }
    }
}

struct Entry {
    kind: StreamKind,
    subject: StreamSubject,
    cancel: CancellationToken,
    slot: CloseSlot,
    check: Option<Arc<dyn Recheck>>,
}

/// Who holds a stream, for matching locks against live streams: the authenticated caller, the
/// identity it acts as (`kubectl --as`), and its device. Matched as a request is, through
/// [`StreamSubject::lock_subject`].
#[derive(Clone, Debug)]
pub struct StreamSubject {
    pub caller: Arc<crate::authn::Identity>,
    pub acting: Option<Arc<crate::authn::Identity>>,
    pub device: Option<String>,
}

impl StreamSubject {
    /// The subject locks are matched against, the same as for the request that opened it.
    pub fn lock_subject(&self) -> crate::state::LockSubject<'_> {
        crate::state::LockSubject::of(&self.caller, self.acting.as_deref(), self.device.as_deref())
    }
}

/// Why the gateway closed a stream: the HTTP status it stands for (401: the credential or
/// posture lapsed, so client-go re-runs its credential plugin; 403: a lock or policy) and a
/// message for the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub message: String,
}

impl CloseReason {
    /// A stream closed because the decision that opened it now refuses it: the same status and
    /// message a new request would get.
    pub fn of(e: &crate::refusal::PipelineError) -> CloseReason {
        let status = crate::errors::ToStatus::to_status(e);
        CloseReason {
            code: status.code,
            message: status.message,
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> CloseReason {
        CloseReason {
            code: 401,
            message: message.into(),
        }
    }

    pub fn forbidden(message: impl Into<String>) -> CloseReason {
        CloseReason {
            code: 403,
            message: message.into(),
        }
    }

    /// Shutdown and other closes that are nobody's fault.
    pub fn unavailable(message: impl Into<String>) -> CloseReason {
        CloseReason {
            code: 503,
            message: message.into(),
        }
    }

    /// The `reason` field of the `Status` this close is reported with.
    pub fn status_reason(&self) -> &'static str {
        match self.code {
            401 => "Unauthorized",
            403 => "Forbidden",
            _ => "ServiceUnavailable",
        }
    }

    /// A `metav1.Status` JSON object for this close.
    pub fn status_json(&self) -> serde_json::Value {
        let mut status = crate::errors::Status::failure(
            http::StatusCode::SERVICE_UNAVAILABLE,
            self.status_reason(),
            self.message.clone(),
        );
        status.code = self.code;
        status.to_value()
    }
}

/// Called once when a stream ends, with why the gateway closed it (None: it ended by itself).
pub type CloseHook = Box<dyn FnOnce(Option<&str>) + Send>;

/// Where a stream's end is reported (audit), and why the gateway closed it, if it did.
#[derive(Clone, Default)]
pub struct CloseSlot {
    inner: Arc<Mutex<(Option<CloseHook>, Option<CloseReason>)>>,
}

impl CloseSlot {
    /// Sets the hook run when the stream ends.
    pub fn on_close(&self, hook: CloseHook) {
        lock(&self.inner).0 = Some(hook);
    }

    /// Why the gateway closed the stream, once it has.
    pub fn reason(&self) -> Option<String> {
        lock(&self.inner).1.as_ref().map(|r| r.message.clone())
    }

    /// Why the gateway closed the stream, with its status code, once it has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        lock(&self.inner).1.clone()
    }

    /// Records why the stream is being closed (the first reason wins).
    pub fn set_reason(&self, why: CloseReason) {
        let mut g = lock(&self.inner);
        if g.1.is_none() {
            g.1 = Some(why);
        }
    }

    fn fire(&self) {
        let (hook, reason) = {
            let mut g = lock(&self.inner);
            (g.0.take(), g.1.as_ref().map(|r| r.message.clone()))
        };
        if let Some(h) = hook {
            h(reason.as_deref());
        }
    }
}

/// What the re-verifier decided about a live stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It may go on; check it again at `until` (the earliest of its credential's expiry, its
    /// posture's expiry, its maximum age), or only on events when `None`.
    Keep { until: Option<SystemTime> },
    /// It must be closed.
    Close(CloseReason),
}

/// Re-decides whether a live stream may continue: the request's decision is made again, by the
/// same decider, against the current state. Runs on the re-verifier task; a check may wait (a
/// posture provider), so checks are futures.
pub trait Recheck: Send + Sync {
    fn recheck(&self, now: SystemTime) -> Pin<Box<dyn Future<Output = Verdict> + Send + '_>>;
}

/// The registry of live streams.
pub struct StreamRegistry {
    root: CancellationToken,
    next: AtomicU64,
    live: Mutex<HashMap<u64, Entry>>,
    /// When each stream must be checked again, earliest first. Entries of streams that have
    /// ended, or were re-scheduled, are skipped when they come up.
    deadlines: Mutex<BinaryHeap<Reverse<(SystemTime, u64)>>>,
    /// Wakes the re-verifier: a new earliest deadline, or work queued in `pending`.
    wake: Notify,
    /// Streams to re-check as soon as possible (events: policy, posture).
    pending: Mutex<Pending>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Pending {
    all: bool,
    devices: HashSet<String>,
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

    pub fn token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    pub fn kind(&self) -> StreamKind {
        self.kind
    }

    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        lock(&self.registry.live).remove(&self.id);
        self.registry.metrics.stream_closed(self.kind.as_str());
        self.slot.fire();
    }
}

/// How many stream checks run between yields of the re-verifier task.
const CHECKS_PER_YIELD: usize = 64;

/// The deadline heap is compacted once it holds at least this many entries and more than
/// `DEADLINES_SLACK` per live stream.
const DEADLINES_COMPACT_MIN: usize = 1024;
const DEADLINES_SLACK: usize = 4;

impl StreamRegistry {
    pub fn new(metrics: Arc<Metrics>) -> Arc<StreamRegistry> {
        Arc::new(StreamRegistry {
            root: CancellationToken::new(),
            next: AtomicU64::new(1),
            live: Mutex::new(HashMap::new()),
            deadlines: Mutex::new(BinaryHeap::new()),
            wake: Notify::new(),
            pending: Mutex::new(Pending::default()),
            metrics,
        })
    }

    /// Registers a stream without re-verification (it is still closed by locks and shutdown).
    pub fn register(self: &Arc<Self>, kind: StreamKind, subject: StreamSubject) -> StreamHandle {
        self.register_checked(kind, subject, None, None)
    }

    /// Registers a stream that the re-verifier checks with `check` at `first_check` and on
    /// every policy or posture event that concerns it.
    pub fn register_checked(
        self: &Arc<Self>,
        kind: StreamKind,
        subject: StreamSubject,
        check: Option<Arc<dyn Recheck>>,
        first_check: Option<SystemTime>,
    ) -> StreamHandle {
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
                check,
            },
        );
        if let Some(at) = first_check {
            self.schedule(id, at);
        }
        self.metrics.stream_opened(kind.as_str());
        StreamHandle {
            id,
            kind,
            registry: self.clone(),
            cancel,
            slot,
        }
    }

    fn schedule(&self, id: u64, at: SystemTime) {
        let mut heap = lock(&self.deadlines);
        let earliest = heap.peek().is_none_or(|Reverse((t, _))| at < *t);
        heap.push(Reverse((at, id)));
        // An ended stream's entry stays until its deadline comes, and a credential or posture
        // record can live for hours: with streams opening and closing all day the heap grew by
        // one entry per stream until then. Once ended streams' entries dominate, drop them, so
        // the heap stays proportional to the live streams. `live` is read under the heap's lock,
        // and a stream is in `live` before its first deadline is pushed: no entry of a live
        // stream is ever dropped.
        if heap.len() >= DEADLINES_COMPACT_MIN {
            let live = lock(&self.live);
            if heap.len() > DEADLINES_SLACK * live.len() {
                heap.retain(|Reverse((_, id))| live.contains_key(id));
            }
        }
        drop(heap);
        if earliest {
            self.wake.notify_one();
        }
    }

    /// Closes every live stream (shutdown).
    pub fn close_all(&self, why: &str) {
        for e in lock(&self.live).values() {
            e.slot.set_reason(CloseReason::unavailable(why));
        }
        self.root.cancel();
    }

    /// Closes the streams whose holder matches; returns how many.
    pub fn close_matching(
        &self,
        matches: impl Fn(&StreamSubject) -> bool,
        why: &CloseReason,
    ) -> usize {
        let live = lock(&self.live);
        let mut n = 0;
        for e in live.values().filter(|e| matches(&e.subject)) {
            e.slot.set_reason(why.clone());
            e.cancel.cancel();
            n += 1;
        }
        if n > 0 {
            self.metrics.streams_reverified_closed(why.code, n);
        }
        n
    }

    /// Asks the re-verifier to check every stream again soon (policy changed).
    pub fn recheck_all(&self) {
        lock(&self.pending).all = true;
        self.wake.notify_one();
    }

    /// Asks the re-verifier to check this device's streams again soon (posture changed).
    pub fn recheck_device(&self, device: &str) {
        lock(&self.pending).devices.insert(device.to_owned());
        self.wake.notify_one();
    }

    pub fn count(&self) -> usize {
        lock(&self.live).len()
    }

    pub fn count_kind(&self, kind: StreamKind) -> usize {
        lock(&self.live).values().filter(|e| e.kind == kind).count()
    }

    /// The re-verifier: one task that checks streams when their deadline comes and when events
    /// ask for it. Returns when `stop` is cancelled.
    pub async fn run_reverifier(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let next = lock(&self.deadlines).peek().map(|Reverse((t, _))| *t);
            let sleep = match next {
                Some(t) => t
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
            }
            self.run_once(SystemTime::now()).await;
        }
    }

    /// One round: the pending events, then the deadlines that have come. Returns how many
    /// streams it closed.
    pub async fn run_once(&self, now: SystemTime) -> usize {
        let pending = std::mem::take(&mut *lock(&self.pending));
        let mut due: Vec<u64> = Vec::new();
        {
            let mut heap = lock(&self.deadlines);
            while let Some(Reverse((t, id))) = heap.peek().copied() {
                if t > now {
                    break;
                }
                heap.pop();
                due.push(id);
            }
        }
        let mut work: Vec<(u64, Arc<dyn Recheck>, CancellationToken, CloseSlot)> = {
            let live = lock(&self.live);
            let pick = |id: &u64, e: &Entry| {
                e.check
                    .as_ref()
                    .map(|c| (*id, c.clone(), e.cancel.clone(), e.slot.clone()))
            };
            if pending.all {
                live.iter().filter_map(|(id, e)| pick(id, e)).collect()
            } else {
                let mut v: Vec<_> = due
                    .iter()
                    .filter_map(|id| live.get(id).and_then(|e| pick(id, e)))
                    .collect();
                if !pending.devices.is_empty() {
                    v.extend(live.iter().filter_map(|(id, e)| {
                        let d = e.subject.device.as_deref()?;
                        pending.devices.contains(d).then(|| pick(id, e))?
                    }));
                }
                v
            }
        };
        work.sort_by_key(|w| w.0);
        work.dedup_by_key(|w| w.0);
        let mut closed = 0;
        let mut closed_by_code: HashMap<u16, usize> = HashMap::new();
        for (i, (id, check, cancel, slot)) in work.into_iter().enumerate() {
            if cancel.is_cancelled() {
                continue;
            }
            match check.recheck(now).await {
                Verdict::Keep { until } => {
                    if let Some(t) = until {
                        self.schedule(id, t);
                    }
                }
                Verdict::Close(why) => {
                    *closed_by_code.entry(why.code).or_default() += 1;
                    tracing::info!(stream = id, reason = %why.message, "re-verification closed a stream");
                    slot.set_reason(why);
                    cancel.cancel();
                    closed += 1;
                }
            }
            if (i + 1) % CHECKS_PER_YIELD == 0 {
                tokio::task::yield_now().await;
            }
        }
        for (code, n) in closed_by_code {
            self.metrics.streams_reverified_closed(code, n);
        }
        closed
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
    /// as soon as it is cancelled. A JSON watch closed by the gateway for a reason ends with an
    /// `ERROR` event carrying a `Status`, then the body's normal end.
    ///
    /// The normal end is deliberate. `kubectl get --watch` exits 0 whatever ends its watch
    /// (`k8s.io/kubectl/pkg/cmd/get/get.go` discards the watch loop's error), so no ending can
    /// make it fail; what is left to choose is whether the user sees why. After a normal end
    /// kubectl prints the event's `Status` (message included). After an abrupt end (an error from
    /// this body: HTTP/2 `RST_STREAM`, HTTP/1.1 a connection closed without its last chunk) the
    /// `ERROR` event just written is lost: HTTP/2 shows only client-go's own "unable to decode an
    /// event from the watch stream: stream error ... INTERNAL_ERROR" and HTTP/1.1 shows nothing.
    /// docs/operations.md has the details.
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
        // Closed in the middle of an event: the `ERROR` event to send once that event is
        // complete, and how long its rest may take to come.
        finishing: Option<(Pin<Box<tokio::time::Sleep>>, Bytes)>,
        // The `ERROR` event, to send as the last frame.
        last: Option<Bytes>,
    }
}

/// How long a watch closed in the middle of an event waits for the rest of that event before it
/// ends without its `ERROR` event. kube-apiserver writes an event at once, so its rest is
/// normally already on its way; the bound keeps an upstream that stalls mid-event from holding a
/// revoked stream open, and is well inside the second in which a lock closes live streams.
const FINISH_EVENT_WITHIN: Duration = Duration::from_millis(250);

impl<B> GuardedBody<B> {
    pub fn new(inner: B, guard: Box<dyn Send>, cancel: Option<CancellationToken>) -> Self {
        GuardedBody {
            inner,
            cancelled: cancel.map(|c| Box::pin(c.cancelled_owned())),
            guard: Some(guard),
            ended: false,
            watch_errors: None,
            at_boundary: true,
            finishing: None,
            last: None,
        }
    }

    /// Ends a JSON watch with an `ERROR` event when the gateway closes it for a reason.
    pub fn with_watch_errors(mut self, slot: CloseSlot) -> Self {
        self.watch_errors = Some(slot);
        self
    }
}

/// The `ERROR` watch event for a stream the gateway closed, carrying its `Status` (401 when the
/// credential or posture lapsed, so client-go re-runs its credential plugin; 403 otherwise).
pub fn watch_error_event(why: &CloseReason) -> Bytes {
    let event = serde_json::json!({"type": "ERROR", "object": why.status_json()});
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
        if let Some(event) = this.last.take() {
            *this.ended = true;
            return Poll::Ready(Some(Ok(Frame::data(event))));
        }
        if this.finishing.is_none() {
            if let Some(c) = this.cancelled.as_mut() {
                if c.as_mut().poll(cx).is_ready() {
                    this.guard.take();
                    let why = this.watch_errors.as_ref().and_then(|s| s.close_reason());
                    let Some(why) = why else {
                        *this.ended = true;
                        return Poll::Ready(None);
                    };
                    if *this.at_boundary {
                        *this.ended = true;
                        return Poll::Ready(Some(Ok(Frame::data(watch_error_event(&why)))));
                    }
                    // An event is half sent: an `ERROR` event after it would be malformed JSON,
                    // which client-go reports as a decoding error instead of the message. Let
                    // that one event finish, and nothing after it.
                    *this.finishing = Some((
                        Box::pin(tokio::time::sleep(FINISH_EVENT_WITHIN)),
                        watch_error_event(&why),
                    ));
                }
            }
        }
        if let Some((deadline, _)) = this.finishing.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                *this.ended = true;
                return Poll::Ready(None);
            }
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if this.finishing.is_none() {
                    if let Some(data) = frame.data_ref() {
                        if !data.is_empty() {
                            *this.at_boundary = data.ends_with(b"\n");
                        }
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                let Ok(data) = frame.into_data() else {
                    // Trailers would end the response before the `ERROR` event; a watch has none.
                    *this.ended = true;
                    return Poll::Ready(None);
                };
                match data.iter().position(|b| *b == b'\n') {
                    Some(i) => {
                        // The event ends here; what follows is a later event, which the closed
                        // stream must not deliver.
                        *this.last = this.finishing.take().map(|(_, event)| event);
                        *this.at_boundary = true;
                        Poll::Ready(Some(Ok(Frame::data(data.slice(..=i)))))
                    }
                    None => Poll::Ready(Some(Ok(Frame::data(data)))),
                }
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
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || (self.cancelled.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod deadline_tests {
    use super::*;

    struct Never;
    impl Recheck for Never {
        fn recheck(&self, _now: SystemTime) -> Pin<Box<dyn Future<Output = Verdict> + Send + '_>> {
            Box::pin(async { Verdict::Keep { until: None } })
        }
    }

    fn subject() -> StreamSubject {
        StreamSubject {
            caller: Arc::new(crate::authn::Identity::from_review(
                "alice".into(),
                None,
                Vec::new(),
                Default::default(),
            )),
            acting: None,
            device: None,
        }
    }

    #[test]
    fn ended_streams_do_not_pile_up_in_the_deadline_heap() {
        let reg = StreamRegistry::new(Arc::new(Metrics::new()));
        let far = SystemTime::now() + Duration::from_secs(24 * 3600);
        let check: Arc<dyn Recheck> = Arc::new(Never);
        let kept: Vec<StreamHandle> = (0..10)
            .map(|_| {
                reg.register_checked(StreamKind::Watch, subject(), Some(check.clone()), Some(far))
            })
            .collect();
        // 100,000 streams open and close, each with a deadline a day away.
        for _ in 0..100_000 {
            drop(reg.register_checked(StreamKind::Exec, subject(), Some(check.clone()), Some(far)));
        }
        let heap = lock(&reg.deadlines).len();
        assert!(
            heap <= DEADLINES_COMPACT_MIN,
            "{heap} entries for 10 live streams"
        );
        // The live streams' entries are all still there.
        let ids: HashSet<u64> = lock(&reg.deadlines)
            .iter()
            .map(|Reverse((_, id))| *id)
            .collect();
        for h in &kept {
            assert!(ids.contains(&h.id()), "stream {} lost its deadline", h.id());
        }
    }
}
