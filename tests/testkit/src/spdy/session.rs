//! The server side of a SPDY/3.1 session: reads frames, keeps the stream table, answers the
//! session-level frames (PING, SETTINGS, WINDOW_UPDATE, GOAWAY) itself and hands stream events
//! to a [`Handler`] (exec or port-forward).
//!
//! Reading and writing are decoupled: the session loop encodes every outgoing frame in order
//! (the header compressor is one stream, so encoding order is wire order) and queues the bytes
//! for a writer running beside it. The loop therefore never stops reading because the peer is
//! slow to read, which is what an echo server needs to avoid deadlocking against a peer that
//! writes before it reads.

use std::collections::HashMap;
use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use super::frame::{
    Decoder, Encoder, Frame, Headers, FLAG_FIN, FLAG_UNIDIRECTIONAL, GOAWAY_OK,
    GOAWAY_PROTOCOL_ERROR, RST_INVALID_STREAM, RST_PROTOCOL_ERROR, RST_REFUSED_STREAM,
};

/// Largest DATA payload sent in one frame.
const MAX_DATA_CHUNK: usize = 32 * 1024;

/// Received bytes (per stream and per session) after which a WINDOW_UPDATE is sent.
const WINDOW_UPDATE_THRESHOLD: u32 = 32 * 1024;

/// How long to keep reading (and discarding) after sending GOAWAY, waiting for the peer to close.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Stream events of one session.
pub(crate) trait Handler {
    /// The peer opened stream `id` (already answered with SYN_REPLY). `fin` reports the peer's
    /// half being closed by the SYN_STREAM itself; [`Handler::remote_fin`] follows in that case.
    fn stream_opened(&mut self, out: &mut Out, id: u32, headers: &Headers);
    /// DATA arrived on stream `id` (never empty).
    fn data(&mut self, out: &mut Out, id: u32, data: &[u8]);
    /// The peer half-closed stream `id`.
    fn remote_fin(&mut self, out: &mut Out, id: u32);
    /// The peer reset stream `id`; the stream is gone.
    fn reset(&mut self, out: &mut Out, id: u32) {
        let _ = (out, id);
    }
    /// When [`Handler::on_deadline`] wants to run, if ever.
    fn deadline(&self) -> Option<Instant> {
        None
    }
    /// Called once the deadline from [`Handler::deadline`] passed.
    fn on_deadline(&mut self, out: &mut Out) {
        let _ = out;
    }
}

#[derive(Debug, Default)]
struct StreamState {
    remote_closed: bool,
    local_closed: bool,
    /// Received bytes not yet acknowledged with WINDOW_UPDATE.
    unacked: u32,
}

/// The sending side handed to a [`Handler`]: writes frames on streams of the session.
pub(crate) struct Out {
    encoder: Encoder,
    tx: Option<mpsc::UnboundedSender<Vec<u8>>>,
    streams: HashMap<u32, StreamState>,
    last_stream_id: u32,
    session_unacked: u32,
    close_requested: bool,
    error: Option<io::Error>,
}

impl Out {
    fn new(tx: mpsc::UnboundedSender<Vec<u8>>) -> Self {
        Self {
            encoder: Encoder::new(),
            tx: Some(tx),
            streams: HashMap::new(),
            last_stream_id: 0,
            session_unacked: 0,
            close_requested: false,
            error: None,
        }
    }

    fn send(&mut self, frame: &Frame) {
        let Some(tx) = &self.tx else { return };
        let mut buf = Vec::new();
        match self.encoder.encode(frame, &mut buf) {
            // A send error means the writer is gone (peer closed); the read side notices too.
            Ok(()) => drop(tx.send(buf)),
            Err(e) => {
                if self.error.is_none() {
                    self.error = Some(e);
                }
            }
        }
    }

    /// Whether stream `id` is open and its local half not yet closed.
    pub(crate) fn can_send(&self, id: u32) -> bool {
        self.streams.get(&id).is_some_and(|s| !s.local_closed)
    }

    /// Sends `data` on stream `id` (split into frames as needed).
    pub(crate) fn data(&mut self, id: u32, data: &[u8]) {
        if !self.can_send(id) {
            return;
        }
        for chunk in data.chunks(MAX_DATA_CHUNK) {
            self.send(&Frame::Data {
                stream_id: id,
                flags: 0,
                data: Bytes::copy_from_slice(chunk),
            });
        }
    }

    /// Half-closes stream `id` from this side (an empty DATA frame with FIN).
    pub(crate) fn fin(&mut self, id: u32) {
        if !self.can_send(id) {
            return;
        }
        self.send(&Frame::Data {
            stream_id: id,
            flags: FLAG_FIN,
            data: Bytes::new(),
        });
        self.mark_local_closed(id);
    }

    /// Ends the session: GOAWAY is sent once the handler returns, then the connection closes.
    pub(crate) fn close_session(&mut self) {
        self.close_requested = true;
    }

    fn mark_local_closed(&mut self, id: u32) {
        if let Some(s) = self.streams.get_mut(&id) {
            s.local_closed = true;
            if s.remote_closed {
                self.streams.remove(&id);
            }
        }
    }

    fn mark_remote_closed(&mut self, id: u32) {
        if let Some(s) = self.streams.get_mut(&id) {
            s.remote_closed = true;
            if s.local_closed {
                self.streams.remove(&id);
            }
        }
    }

    /// Accounts received DATA for flow control, answering with WINDOW_UPDATE frames. (The peer
    /// kubectl uses, spdystream, neither enforces nor needs them; a SPDY/3.1 peer that honours
    /// the 64 KiB default windows does.)
    fn consumed(&mut self, id: u32, n: usize) {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        self.session_unacked = self.session_unacked.saturating_add(n);
        if self.session_unacked >= WINDOW_UPDATE_THRESHOLD {
            let delta = std::mem::take(&mut self.session_unacked);
            self.send(&Frame::WindowUpdate {
                stream_id: 0,
                delta,
            });
        }
        let mut update = None;
        if let Some(s) = self.streams.get_mut(&id) {
            s.unacked = s.unacked.saturating_add(n);
            if s.unacked >= WINDOW_UPDATE_THRESHOLD && !s.remote_closed {
                update = Some(std::mem::take(&mut s.unacked));
            }
        }
        if let Some(delta) = update {
            self.send(&Frame::WindowUpdate {
                stream_id: id,
                delta,
            });
        }
    }

    fn goaway(&mut self, status: u32) {
        let last = self.last_stream_id;
        self.send(&Frame::GoAway {
            last_good_stream_id: last,
            status,
        });
        // Dropping the sender lets the writer flush everything queued, then shut down.
        self.tx = None;
    }
}

/// Runs one server session over `io` until the peer closes, sends GOAWAY, or the handler ends it.
pub(crate) async fn run<IO, H>(io: IO, mut handler: H) -> io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let (mut rd, wr) = tokio::io::split(io);
    let (tx, rx) = mpsc::unbounded_channel();
    let writer_failed = Notify::new();
    let writer = write_loop(wr, rx, &writer_failed);
    let reader = async {
        let mut out = Out::new(tx);
        let result = read_loop(&mut rd, &mut handler, &mut out, &writer_failed).await;
        // Whatever happened, let the writer flush and finish.
        out.tx = None;
        result
    };
    let (read_result, write_result) = tokio::join!(reader, writer);
    read_result?;
    match write_result {
        Err(e) if !is_disconnect(&e) => Err(e),
        _ => Ok(()),
    }
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::NotConnected
    )
}

async fn write_loop<W>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    failed: &Notify,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let result = async {
        while let Some(buf) = rx.recv().await {
            wr.write_all(&buf).await?;
            if rx.is_empty() {
                wr.flush().await?;
            }
        }
        wr.flush().await?;
        // Closing our direction: the peer reads EOF after everything we sent.
        let _ = wr.shutdown().await;
        Ok(())
    }
    .await;
    if result.is_err() {
        failed.notify_one();
    }
    result
}

async fn read_loop<R, H>(
    rd: &mut R,
    handler: &mut H,
    out: &mut Out,
    writer_failed: &Notify,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    H: Handler,
{
    let mut decoder = Decoder::new();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    // Set once GOAWAY went out: read and discard until the peer closes or this passes.
    let mut draining: Option<Instant> = None;
    loop {
        loop {
            let frame = match decoder.decode(&mut buf) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    if draining.is_none() {
                        out.goaway(GOAWAY_PROTOCOL_ERROR);
                    }
                    return Err(e);
                }
            };
            if draining.is_some() {
                continue;
            }
            if dispatch(frame, handler, out) == Flow::PeerGoneAway {
                return Ok(());
            }
            if let Some(e) = out.error.take() {
                out.goaway(GOAWAY_PROTOCOL_ERROR);
                return Err(e);
            }
            if out.close_requested {
                out.goaway(GOAWAY_OK);
                draining = Some(Instant::now() + DRAIN_TIMEOUT);
            }
        }
        let handler_deadline = if draining.is_none() {
            handler.deadline()
        } else {
            None
        };
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if is_disconnect(&e) => return Ok(()),
                Err(e) => return Err(e),
            },
            () = sleep_until(handler_deadline) => {
                handler.on_deadline(out);
                if out.close_requested {
                    out.goaway(GOAWAY_OK);
                    draining = Some(Instant::now() + DRAIN_TIMEOUT);
                }
            }
            () = sleep_until(draining) => return Ok(()),
            () = writer_failed.notified() => return Ok(()),
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    PeerGoneAway,
}

fn dispatch<H: Handler>(frame: Frame, handler: &mut H, out: &mut Out) -> Flow {
    match frame {
        Frame::SynStream {
            stream_id,
            flags,
            headers,
            ..
        } => {
            // Streams the client opens have odd ids, strictly increasing.
            if stream_id == 0 || stream_id % 2 == 0 || stream_id <= out.last_stream_id {
                out.send(&Frame::RstStream {
                    stream_id: stream_id.max(1),
                    status: RST_PROTOCOL_ERROR,
                });
                return Flow::Continue;
            }
            if out.close_requested {
                out.send(&Frame::RstStream {
                    stream_id,
                    status: RST_REFUSED_STREAM,
                });
                return Flow::Continue;
            }
            out.last_stream_id = stream_id;
            out.streams.insert(
                stream_id,
                StreamState {
                    remote_closed: false,
                    local_closed: flags & FLAG_UNIDIRECTIONAL != 0,
                    unacked: 0,
                },
            );
            // spdystream waits for this reply before it writes on the stream, and drops DATA
            // for a stream it has not seen replied: it must precede anything else on it.
            out.send(&Frame::SynReply {
                stream_id,
                flags: 0,
                headers: Vec::new(),
            });
            handler.stream_opened(out, stream_id, &headers);
            if flags & FLAG_FIN != 0 {
                out.mark_remote_closed(stream_id);
                handler.remote_fin(out, stream_id);
            }
        }
        Frame::Data {
            stream_id,
            flags,
            data,
        } => {
            let open = out
                .streams
                .get(&stream_id)
                .is_some_and(|s| !s.remote_closed);
            if !open {
                if stream_id % 2 == 1 && stream_id > out.last_stream_id {
                    out.send(&Frame::RstStream {
                        stream_id,
                        status: RST_INVALID_STREAM,
                    });
                }
                // Otherwise: DATA for a stream already closed or reset; ignore it.
                return Flow::Continue;
            }
            if !data.is_empty() {
                out.consumed(stream_id, data.len());
                handler.data(out, stream_id, &data);
            }
            if flags & FLAG_FIN != 0 {
                out.mark_remote_closed(stream_id);
                handler.remote_fin(out, stream_id);
            }
        }
        Frame::Headers {
            stream_id, flags, ..
        } => {
            if flags & FLAG_FIN != 0
                && out
                    .streams
                    .get(&stream_id)
                    .is_some_and(|s| !s.remote_closed)
            {
                out.mark_remote_closed(stream_id);
                handler.remote_fin(out, stream_id);
            }
        }
        Frame::RstStream { stream_id, .. } => {
            if out.streams.remove(&stream_id).is_some() {
                handler.reset(out, stream_id);
            }
        }
        Frame::Ping { id } => {
            // Client-initiated pings have odd ids: echo them. Even ids would answer pings of
            // ours, and this server sends none.
            if id % 2 == 1 {
                out.send(&Frame::Ping { id });
            }
        }
        Frame::GoAway { .. } => return Flow::PeerGoneAway,
        // This server does not hold back data for the peer's windows (spdystream never sends
        // WINDOW_UPDATE, so honouring a 64 KiB window would stall it): nothing to track.
        Frame::Settings { .. }
        | Frame::WindowUpdate { .. }
        | Frame::SynReply { .. }
        | Frame::UnknownControl { .. } => {}
    }
    Flow::Continue
}
