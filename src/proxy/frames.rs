//! Frame boundaries of upgraded exec/attach sessions, and the frames the gateway adds when it
//! closes one, so that kubectl prints why instead of a dropped connection.
//!
//! The relay in [`super::upgrade`] copies bytes as they come; the trackers here only read frame
//! headers as the bytes pass (never payloads, except the few SPDY control frames whose header
//! blocks say which stream is the error stream) and know, at any point, whether the bytes sent to
//! the client so far end at a frame boundary. Only there can the gateway add a frame of its own:
//!
//! - WebSocket (`v5`/`v4.channel.k8s.io`, `v4.base64.channel.k8s.io`, `base64.channel.k8s.io`,
//!   `channel.k8s.io`): a message on channel 3 (error), then a close frame (1000). A message that
//!   was sent in fragments must be complete first.
//! - SPDY/3.1 (`X-Stream-Protocol-Version` `v4.channel.k8s.io` and older): a DATA frame with FIN
//!   on the client-created stream whose `streamtype` header is `error`, then GOAWAY. Which stream
//!   that is comes from the client's SYN_STREAM header blocks: one zlib stream per direction for
//!   the whole session, with the SPDY/3 dictionary, so every block the client sends has to be
//!   inflated until the error stream is known (after that nothing more is inflated).
//!
//! What the error channel carries follows the kubelet: a JSON `metav1.Status` for `v4` and `v5`
//! (client-go prints its `message`), the message text for older versions (client-go prints
//! "error executing remote command: `<text>`").
//!
//! Port-forward sessions carry no error channel for the whole session: they are just closed, and
//! kubectl reports the lost connection.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use flate2::{Decompress, FlushDecompress, Status};
use http::HeaderMap;

use crate::streams::{CloseReason, StreamKind};

/// What a protocol version puts on the error channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorFormat {
    /// A JSON `metav1.Status` (`v4` and later).
    Status,
    /// The message text (`channel.k8s.io` .. `v3.channel.k8s.io`).
    Text,
}

impl ErrorFormat {
    fn payload(self, why: &CloseReason) -> Vec<u8> {
        match self {
            ErrorFormat::Status => serde_json::to_vec(&why.status_json()).unwrap_or_default(),
            ErrorFormat::Text => why.message.clone().into_bytes(),
        }
    }
}

/// The remotecommand channel protocols the gateway knows how to end with a message, keyed by
/// the negotiated WebSocket subprotocol: (base64 text messages, error format).
fn websocket_protocol(protocol: &str) -> Option<(bool, ErrorFormat)> {
    match protocol {
        "v5.channel.k8s.io" | "v4.channel.k8s.io" => Some((false, ErrorFormat::Status)),
        "v4.base64.channel.k8s.io" => Some((true, ErrorFormat::Status)),
        "base64.channel.k8s.io" => Some((true, ErrorFormat::Text)),
        // No subprotocol: kube-apiserver speaks `channel.k8s.io`.
        "" | "channel.k8s.io" | "v2.channel.k8s.io" | "v3.channel.k8s.io" => {
            Some((false, ErrorFormat::Text))
        }
        _ => None,
    }
}

/// The same over SPDY, keyed by `X-Stream-Protocol-Version`.
fn spdy_protocol(protocol: &str) -> Option<ErrorFormat> {
    match protocol {
        // v5 is a WebSocket protocol, but a server that negotiates it over SPDY reports as v4.
        "v5.channel.k8s.io" | "v4.channel.k8s.io" => Some(ErrorFormat::Status),
        "" | "channel.k8s.io" | "v2.channel.k8s.io" | "v3.channel.k8s.io" => {
            Some(ErrorFormat::Text)
        }
        _ => None,
    }
}

/// The trackers of one upgraded session, for both directions.
pub struct Framing {
    /// Frames from kube-apiserver to the client: where the gateway's own frames may go.
    pub from_server: ServerFrames,
    /// Frames from the client (SPDY only): which stream is the error stream.
    pub from_client: Option<SpdyFrames<ClientSide>>,
}

/// The framing of an upgraded exec/attach session, from the kind of stream and kube-apiserver's
/// `101 Switching Protocols` headers. `None`: the session is closed without a message
/// (port-forward, other upgrades, protocols the gateway does not know).
pub fn framing_for(kind: StreamKind, response: &HeaderMap) -> Option<Framing> {
    if !matches!(kind, StreamKind::Exec | StreamKind::Attach) {
        return None;
    }
    let value = |name: &str| {
        response
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .unwrap_or("")
    };
    let upgrade = value("upgrade");
    if upgrade.eq_ignore_ascii_case("websocket") {
        let (base64, format) = websocket_protocol(value("sec-websocket-protocol"))?;
        Some(Framing {
            from_server: ServerFrames::WebSocket {
                frames: WsFrames::default(),
                base64,
                format,
            },
            from_client: None,
        })
    } else if upgrade.eq_ignore_ascii_case("spdy/3.1") {
        let format = spdy_protocol(value("x-stream-protocol-version"))?;
        let shared = Arc::new(SpdyShared::default());
        Some(Framing {
            from_server: ServerFrames::Spdy {
                frames: SpdyFrames::new(ServerSide::new(shared.clone())),
                format,
            },
            from_client: Some(SpdyFrames::new(ClientSide::new(shared))),
        })
    } else {
        None
    }
}

/// The frames kube-apiserver sends to the client, tracked by protocol.
pub enum ServerFrames {
    WebSocket {
        frames: WsFrames,
        base64: bool,
        format: ErrorFormat,
    },
    Spdy {
        frames: SpdyFrames<ServerSide>,
        format: ErrorFormat,
    },
}

impl ServerFrames {
    /// Advances over bytes that are forwarded as they are.
    pub fn advance(&mut self, data: &[u8]) {
        match self {
            ServerFrames::WebSocket { frames, .. } => frames.advance(data),
            ServerFrames::Spdy { frames, .. } => frames.advance(data),
        }
    }

    /// Advances over the shortest prefix of `data` that ends where the gateway may add a frame,
    /// and returns its length (all of `data` when no such point is in it; 0 when already there).
    pub fn advance_to_boundary(&mut self, data: &[u8]) -> usize {
        match self {
            ServerFrames::WebSocket { frames, .. } => frames.advance_to_boundary(data),
            ServerFrames::Spdy { frames, .. } => frames.advance_to_boundary(data),
        }
    }

    /// Whether the bytes so far end where the gateway may add a frame.
    pub fn at_boundary(&self) -> bool {
        match self {
            ServerFrames::WebSocket { frames, .. } => frames.at_boundary(),
            ServerFrames::Spdy { frames, .. } => frames.at_boundary(),
        }
    }

    /// The bytes that end the session with `why`, to be sent at a boundary. `None` when the
    /// server has already ended the session (a WebSocket close, a SPDY GOAWAY): nothing may
    /// follow.
    pub fn closing(&self, why: &CloseReason) -> Option<Vec<u8>> {
        match self {
            ServerFrames::WebSocket {
                frames,
                base64,
                format,
            } => {
                if frames.closed() {
                    return None;
                }
                Some(websocket_closing(*base64, *format, why))
            }
            ServerFrames::Spdy { frames, format } => {
                let seen = frames.observer();
                if seen.goaway {
                    return None;
                }
                let mut out = Vec::new();
                if let Some(id) = seen.shared.error_stream() {
                    if !seen.error_closed {
                        spdy_data_fin(&mut out, id, &format.payload(why));
                    }
                }
                spdy_goaway(&mut out, seen.shared.last_stream());
                Some(out)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket

const WS_FIN: u8 = 0x80;
const WS_TEXT: u8 = 0x1;
const WS_BINARY: u8 = 0x2;
const WS_CLOSE: u8 = 0x8;
/// The remotecommand error channel.
const ERROR_CHANNEL: u8 = 3;
/// RFC 6455 close status 1000: client-go reads any other close as an error of its own.
const WS_NORMAL_CLOSURE: u16 = 1000;

/// Frame boundaries in what a WebSocket server sends (RFC 6455 section 5.2): a 2-byte header,
/// a 16- or 64-bit extended length, a masking key when masked (a server's frames are not, but
/// it costs nothing to follow one that is), then the payload.
#[derive(Debug, Default)]
pub struct WsFrames {
    head: [u8; 14],
    have: usize,
    remaining: u64,
    /// A data frame without FIN has passed and its message has not ended: another message may
    /// not start yet (control frames may).
    fragmented: bool,
    /// A close frame has passed: nothing may follow it.
    closed: bool,
}

impl WsFrames {
    pub fn advance(&mut self, data: &[u8]) {
        self.walk(data, false);
    }

    pub fn advance_to_boundary(&mut self, data: &[u8]) -> usize {
        self.walk(data, true)
    }

    /// At a frame boundary, and not inside a fragmented message.
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.remaining == 0 && !self.fragmented
    }

    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Header length once its first two bytes are known.
    fn header_len(&self) -> usize {
        let ext = match self.head[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.head[1] & 0x80 != 0 { 4 } else { 0 };
        2 + ext + mask
    }

    fn header_done(&mut self) {
        let len = match self.head[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.head[2..10]);
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        };
        let fin = self.head[0] & WS_FIN != 0;
        let opcode = self.head[0] & 0x0f;
        if opcode & 0x8 != 0 {
            self.closed |= opcode == WS_CLOSE;
        } else {
            // A first frame or a continuation: the message goes on until a frame with FIN.
            self.fragmented = !fin;
        }
        self.have = 0;
        self.remaining = len;
    }

    fn walk(&mut self, data: &[u8], stop: bool) -> usize {
        if stop && self.at_boundary() {
            return 0;
        }
        let mut i = 0;
        while i < data.len() {
            if self.remaining > 0 {
                let left = data.len() - i;
                let take = usize::try_from(self.remaining).map_or(left, |r| r.min(left));
                i += take;
                self.remaining -= take as u64;
            } else {
                let want = if self.have < 2 { 2 } else { self.header_len() };
                let take = (want - self.have).min(data.len() - i);
                self.head[self.have..self.have + take].copy_from_slice(&data[i..i + take]);
                self.have += take;
                i += take;
                if self.have < 2 || self.have < self.header_len() {
                    continue;
                }
                self.header_done();
            }
            if stop && self.at_boundary() {
                return i;
            }
        }
        i
    }
}

fn ws_frame(out: &mut Vec<u8>, opcode: u8, first: &[u8], rest: &[u8]) {
    let len = first.len() + rest.len();
    out.push(WS_FIN | opcode);
    match len {
        0..=125 => out.push(len as u8),
        126..=0xffff => {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(first);
    out.extend_from_slice(rest);
}

/// The error-channel message, then a normal close.
pub fn websocket_closing(base64: bool, format: ErrorFormat, why: &CloseReason) -> Vec<u8> {
    let payload = format.payload(why);
    let mut out = Vec::with_capacity(payload.len() * 4 / 3 + 32);
    if base64 {
        // base64 protocols: text messages, the channel as an ASCII digit.
        let text = base64::engine::general_purpose::STANDARD.encode(&payload);
        ws_frame(&mut out, WS_TEXT, &[b'0' + ERROR_CHANNEL], text.as_bytes());
    } else {
        ws_frame(&mut out, WS_BINARY, &[ERROR_CHANNEL], &payload);
    }
    ws_frame(&mut out, WS_CLOSE, &WS_NORMAL_CLOSURE.to_be_bytes(), &[]);
    out
}

// ---------------------------------------------------------------------------------------------
// SPDY/3.1

const SPDY_VERSION: u16 = 3;
const SPDY_SYN_STREAM: u16 = 1;
const SPDY_SYN_REPLY: u16 = 2;
const SPDY_RST_STREAM: u16 = 3;
const SPDY_GOAWAY: u16 = 7;
const SPDY_HEADERS: u16 = 8;
const SPDY_FLAG_FIN: u8 = 0x01;
/// Largest payload a 24-bit length can carry.
const SPDY_MAX_PAYLOAD: usize = (1 << 24) - 1;
/// Largest compressed header block the gateway inflates; a client that sends a larger one is
/// not followed further (its session is then closed with GOAWAY only).
const MAX_HEADER_FRAME: usize = 256 * 1024;
/// Largest inflated header block.
const MAX_HEADER_BLOCK: usize = 1024 * 1024;

/// The 8-byte header of a SPDY frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpdyHead {
    pub control: bool,
    /// Control frames: the frame type.
    pub frame_type: u16,
    /// Data frames: the stream id.
    pub stream_id: u32,
    pub flags: u8,
    pub len: usize,
}

/// What a direction's tracker looks at as frames pass.
pub trait SpdyObserver {
    /// How many leading payload bytes of this frame to see once it has passed (0: none).
    fn wants(&self, head: &SpdyHead) -> usize;
    /// A frame has passed, with the payload bytes it asked for.
    fn frame(&mut self, head: &SpdyHead, payload: &[u8]);
}

/// Frame boundaries in one direction of a SPDY/3.1 session: an 8-byte header with a 24-bit
/// payload length, for control and data frames alike.
pub struct SpdyFrames<O> {
    head: [u8; 8],
    have: usize,
    current: SpdyHead,
    remaining: usize,
    keep: usize,
    payload: Vec<u8>,
    observer: O,
}

impl<O: SpdyObserver> SpdyFrames<O> {
    pub fn new(observer: O) -> Self {
        SpdyFrames {
            head: [0; 8],
            have: 0,
            current: SpdyHead::default(),
            remaining: 0,
            keep: 0,
            payload: Vec::new(),
            observer,
        }
    }

    pub fn observer(&self) -> &O {
        &self.observer
    }

    pub fn advance(&mut self, data: &[u8]) {
        self.walk(data, false);
    }

    pub fn advance_to_boundary(&mut self, data: &[u8]) -> usize {
        self.walk(data, true)
    }

    pub fn at_boundary(&self) -> bool {
        self.have == 0
    }

    fn header_done(&mut self) {
        let h = &self.head;
        let first = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let control = first & 0x8000_0000 != 0;
        self.current = SpdyHead {
            control,
            frame_type: if control { (first & 0xffff) as u16 } else { 0 },
            stream_id: if control { 0 } else { first & 0x7fff_ffff },
            flags: h[4],
            len: u32::from_be_bytes([0, h[5], h[6], h[7]]) as usize,
        };
        self.remaining = self.current.len;
        self.keep = self.observer.wants(&self.current).min(self.current.len);
        self.payload.clear();
        if self.remaining == 0 {
            self.frame_done();
        }
    }

    fn frame_done(&mut self) {
        self.observer.frame(&self.current, &self.payload);
        self.payload.clear();
        self.have = 0;
    }

    fn walk(&mut self, data: &[u8], stop: bool) -> usize {
        if stop && self.at_boundary() {
            return 0;
        }
        let mut i = 0;
        while i < data.len() {
            if self.have < 8 {
                let take = (8 - self.have).min(data.len() - i);
                self.head[self.have..self.have + take].copy_from_slice(&data[i..i + take]);
                self.have += take;
                i += take;
                if self.have < 8 {
                    continue;
                }
                self.header_done();
            } else {
                let take = self.remaining.min(data.len() - i);
                if self.payload.len() < self.keep {
                    let k = (self.keep - self.payload.len()).min(take);
                    self.payload.extend_from_slice(&data[i..i + k]);
                }
                i += take;
                self.remaining -= take;
                if self.remaining == 0 {
                    self.frame_done();
                }
            }
            if stop && self.at_boundary() {
                return i;
            }
        }
        i
    }
}

/// What the two directions of a SPDY session share: the error stream (0 until known) and the
/// highest stream id the client opened.
#[derive(Debug, Default)]
pub struct SpdyShared {
    error_stream: AtomicU32,
    last_stream: AtomicU32,
}

impl SpdyShared {
    pub fn error_stream(&self) -> Option<u32> {
        match self.error_stream.load(Ordering::Acquire) {
            0 => None,
            id => Some(id),
        }
    }

    pub fn last_stream(&self) -> u32 {
        self.last_stream.load(Ordering::Acquire)
    }
}

fn stream_id_of(payload: &[u8]) -> Option<u32> {
    let b = payload.get(..4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff)
}

/// The client's side of a SPDY session: the header blocks it sends, inflated until the stream
/// whose `streamtype` is `error` has been seen.
pub struct ClientSide {
    shared: Arc<SpdyShared>,
    /// The client's zlib stream; `None` once the error stream is known (or the blocks could not
    /// be followed): nothing is inflated after that.
    inflate: Option<Decompress>,
}

impl ClientSide {
    pub fn new(shared: Arc<SpdyShared>) -> Self {
        ClientSide {
            shared,
            inflate: Some(Decompress::new(true)),
        }
    }

    pub fn error_stream(&self) -> Option<u32> {
        self.shared.error_stream()
    }

    fn header_block(&mut self, block: &[u8]) -> Option<Vec<(String, String)>> {
        let inflate = self.inflate.as_mut()?;
        match inflate_block(inflate, block).and_then(|raw| parse_header_block(&raw)) {
            Some(headers) => Some(headers),
            None => {
                tracing::debug!("SPDY header block not understood; the error stream stays unknown");
                self.inflate = None;
                None
            }
        }
    }
}

impl SpdyObserver for ClientSide {
    fn wants(&self, head: &SpdyHead) -> usize {
        if !head.control {
            return 0;
        }
        match head.frame_type {
            SPDY_SYN_STREAM | SPDY_SYN_REPLY | SPDY_HEADERS if self.inflate.is_some() => {
                head.len.min(MAX_HEADER_FRAME + 1)
            }
            // Only its stream id, for GOAWAY's last-good-stream-id.
            SPDY_SYN_STREAM => 4,
            _ => 0,
        }
    }

    fn frame(&mut self, head: &SpdyHead, payload: &[u8]) {
        if !head.control {
            return;
        }
        let block_at = match head.frame_type {
            SPDY_SYN_STREAM => 10,
            SPDY_SYN_REPLY | SPDY_HEADERS => 4,
            _ => return,
        };
        let id = stream_id_of(payload);
        if head.frame_type == SPDY_SYN_STREAM {
            if let Some(id) = id {
                self.shared.last_stream.fetch_max(id, Ordering::AcqRel);
            }
        }
        if self.inflate.is_none() {
            return;
        }
        if payload.len() < head.len || head.len > MAX_HEADER_FRAME || payload.len() < block_at {
            // A block the gateway did not keep whole: the zlib stream cannot be followed.
            self.inflate = None;
            return;
        }
        let Some(headers) = self.header_block(&payload[block_at..]) else {
            return;
        };
        if head.frame_type != SPDY_SYN_STREAM {
            return;
        }
        let is_error = headers
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case("streamtype") && v.eq_ignore_ascii_case("error"));
        if let (true, Some(id)) = (is_error, id) {
            self.shared.error_stream.store(id, Ordering::Release);
            // Nothing else in the client's header blocks matters.
            self.inflate = None;
        }
    }
}

/// The server's side of a SPDY session: whether it has already ended the error stream or the
/// session, in which case the gateway must not write on them.
pub struct ServerSide {
    shared: Arc<SpdyShared>,
    goaway: bool,
    error_closed: bool,
}

impl ServerSide {
    pub fn new(shared: Arc<SpdyShared>) -> Self {
        ServerSide {
            shared,
            goaway: false,
            error_closed: false,
        }
    }

    fn ends_error_stream(&mut self, id: u32) {
        if self.shared.error_stream() == Some(id) {
            self.error_closed = true;
        }
    }
}

impl SpdyObserver for ServerSide {
    fn wants(&self, head: &SpdyHead) -> usize {
        match (head.control, head.frame_type) {
            (true, SPDY_RST_STREAM | SPDY_SYN_REPLY) => 4,
            _ => 0,
        }
    }

    fn frame(&mut self, head: &SpdyHead, payload: &[u8]) {
        if !head.control {
            if head.flags & SPDY_FLAG_FIN != 0 {
                self.ends_error_stream(head.stream_id);
            }
            return;
        }
        match head.frame_type {
            SPDY_GOAWAY => self.goaway = true,
            SPDY_RST_STREAM => {
                if let Some(id) = stream_id_of(payload) {
                    self.ends_error_stream(id);
                }
            }
            SPDY_SYN_REPLY if head.flags & SPDY_FLAG_FIN != 0 => {
                if let Some(id) = stream_id_of(payload) {
                    self.ends_error_stream(id);
                }
            }
            _ => {}
        }
    }
}

fn spdy_data_fin(out: &mut Vec<u8>, stream_id: u32, data: &[u8]) {
    let data = &data[..data.len().min(SPDY_MAX_PAYLOAD)];
    out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(&((u32::from(SPDY_FLAG_FIN) << 24) | data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn spdy_goaway(out: &mut Vec<u8>, last_good_stream: u32) {
    out.extend_from_slice(&(0x8000 | SPDY_VERSION).to_be_bytes());
    out.extend_from_slice(&SPDY_GOAWAY.to_be_bytes());
    out.extend_from_slice(&8u32.to_be_bytes());
    out.extend_from_slice(&(last_good_stream & 0x7fff_ffff).to_be_bytes());
    // Status 0: OK.
    out.extend_from_slice(&0u32.to_be_bytes());
}

/// Inflates one header block, continuing the direction's zlib stream (each block ends with a
/// sync flush, so it inflates completely on its own).
fn inflate_block(inflate: &mut Decompress, block: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(block.len() * 4 + 64);
    let mut consumed = 0usize;
    loop {
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity().max(256));
        }
        let (in_before, out_before) = (inflate.total_in(), inflate.total_out());
        let result = inflate.decompress_vec(&block[consumed..], &mut out, FlushDecompress::Sync);
        consumed += (inflate.total_in() - in_before) as usize;
        let progressed = inflate.total_in() != in_before || inflate.total_out() != out_before;
        match result {
            Ok(Status::StreamEnd) => return Some(out),
            Ok(_) => {}
            Err(e) => match e.needs_dictionary() {
                Some(super::spdy_dictionary::DICTIONARY_ID) => {
                    inflate
                        .set_dictionary(super::spdy_dictionary::dictionary())
                        .ok()?;
                    continue;
                }
                _ => return None,
            },
        }
        if out.len() > MAX_HEADER_BLOCK {
            return None;
        }
        if consumed == block.len() && out.len() < out.capacity() {
            return Some(out);
        }
        if !progressed {
            return None;
        }
    }
}

/// Parses an inflated header block: a 32-bit count, then length-prefixed names and values.
fn parse_header_block(mut block: &[u8]) -> Option<Vec<(String, String)>> {
    fn take<'a>(block: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if block.len() < n {
            return None;
        }
        let (head, rest) = block.split_at(n);
        *block = rest;
        Some(head)
    }
    fn take_len(block: &mut &[u8]) -> Option<usize> {
        let b = take(block, 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
    let count = take_len(&mut block)?;
    if count > block.len() / 8 {
        return None;
    }
    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        let n = take_len(&mut block)?;
        let name = String::from_utf8_lossy(take(&mut block, n)?).into_owned();
        let n = take_len(&mut block)?;
        let value = String::from_utf8_lossy(take(&mut block, n)?).into_owned();
        headers.push((name, value));
    }
    Some(headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    fn locked() -> CloseReason {
        CloseReason::forbidden("access is locked: laptop reported stolen")
    }

    /// A server WebSocket frame (unmasked) with `len` payload bytes of `fill`.
    fn ws(fin: bool, opcode: u8, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        ws_frame(&mut out, opcode, &vec![0x5a; len], &[]);
        if !fin {
            out[0] &= !WS_FIN;
        }
        out
    }

    /// Feeds `data` one byte at a time; returns the offsets (after the byte) at boundaries.
    fn ws_boundaries(t: &mut WsFrames, data: &[u8]) -> Vec<usize> {
        let mut at = Vec::new();
        for (i, b) in data.iter().enumerate() {
            t.advance(std::slice::from_ref(b));
            if t.at_boundary() {
                at.push(i + 1);
            }
        }
        at
    }

    #[test]
    fn websocket_boundaries_with_frames_split_byte_by_byte() {
        // 7-bit, 16-bit and 64-bit lengths, and an empty frame.
        let frames = [
            ws(true, WS_BINARY, 5),
            ws(true, WS_BINARY, 300),
            ws(true, WS_BINARY, 70_000),
            ws(true, WS_BINARY, 0),
        ];
        assert_eq!(frames[1][1], 126);
        assert_eq!(frames[2][1], 127);
        let all: Vec<u8> = frames.concat();
        let mut ends = Vec::new();
        let mut end = 0;
        for f in &frames {
            end += f.len();
            ends.push(end);
        }
        let mut t = WsFrames::default();
        assert!(t.at_boundary());
        assert_eq!(ws_boundaries(&mut t, &all), ends);
    }

    #[test]
    fn websocket_masked_frames_are_followed_too() {
        let mut f = vec![WS_FIN | WS_BINARY, 0x80 | 3, 1, 2, 3, 4, 9, 9, 9];
        f.extend(ws(true, WS_BINARY, 1));
        let mut t = WsFrames::default();
        assert_eq!(ws_boundaries(&mut t, &f), vec![9, 12]);
    }

    #[test]
    fn websocket_huge_64_bit_length_is_skipped_without_touching_the_payload() {
        // 5 GB announced: followed by counting, never by buffering or looking at the bytes.
        let len: u64 = 5_000_000_000;
        let mut head = vec![WS_FIN | WS_BINARY, 127];
        head.extend_from_slice(&len.to_be_bytes());
        let mut t = WsFrames::default();
        t.advance(&head);
        assert!(!t.at_boundary());
        let chunk = vec![0u8; 1 << 20];
        let mut left = len;
        while left > chunk.len() as u64 {
            t.advance(&chunk);
            left -= chunk.len() as u64;
        }
        assert!(!t.at_boundary());
        // The last read holds the end of the frame and the start of the next one: the gateway
        // may send its own frame only after exactly the end.
        let mut last = vec![0u8; left as usize];
        last.extend(ws(true, WS_BINARY, 10));
        let n = t.advance_to_boundary(&last);
        assert_eq!(n as u64, left);
        assert!(t.at_boundary());
        assert_eq!(
            t.advance_to_boundary(&last[n..]),
            0,
            "already at a boundary"
        );
    }

    #[test]
    fn websocket_advance_to_boundary_stops_at_the_end_of_the_frame_in_flight() {
        let a = ws(true, WS_BINARY, 20);
        let b = ws(true, WS_BINARY, 20);
        let mut t = WsFrames::default();
        t.advance(&a[..7]);
        let mut rest = a[7..].to_vec();
        rest.extend(&b);
        assert_eq!(t.advance_to_boundary(&rest), a.len() - 7);
        assert!(t.at_boundary());
        // A header split across reads: not a boundary until the frame it starts has ended.
        let mut t = WsFrames::default();
        assert_eq!(t.advance_to_boundary(&b), 0, "nothing in flight");
        t.advance(&b[..1]);
        assert!(!t.at_boundary());
        assert_eq!(t.advance_to_boundary(&b[1..]), b.len() - 1);
        assert!(t.at_boundary());
    }

    #[test]
    fn websocket_waits_for_the_end_of_a_fragmented_message() {
        let first = ws(false, WS_BINARY, 4);
        let ping = ws(true, 0x9, 2);
        let middle = ws(false, 0x0, 4);
        let last = ws(true, 0x0, 4);
        let all = [first.clone(), ping.clone(), middle.clone(), last.clone()].concat();
        let mut t = WsFrames::default();
        assert_eq!(ws_boundaries(&mut t, &all), vec![all.len()]);
        let mut t = WsFrames::default();
        t.advance(&first);
        assert!(!t.at_boundary(), "inside a fragmented message");
        let n = t.advance_to_boundary(&all[first.len()..]);
        assert_eq!(n, ping.len() + middle.len() + last.len());
    }

    /// Decodes the frames the gateway sends with a real WebSocket client.
    async fn client_reads(bytes: Vec<u8>) -> Vec<tokio_tungstenite::tungstenite::Message> {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        let (mut server, client) = tokio::io::duplex(64 * 1024);
        server.write_all(&bytes).await.unwrap();
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            client,
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            None,
        )
        .await;
        let mut got = Vec::new();
        while let Some(Ok(m)) = ws.next().await {
            let close = m.is_close();
            got.push(m);
            if close {
                break;
            }
        }
        got
    }

    #[tokio::test]
    async fn websocket_closing_is_a_status_on_channel_3_then_a_normal_close() {
        use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
        use tokio_tungstenite::tungstenite::Message;
        let mut headers = HeaderMap::new();
        headers.insert("upgrade", "websocket".parse().unwrap());
        for (protocol, base64, format) in [
            ("v5.channel.k8s.io", false, ErrorFormat::Status),
            ("v4.channel.k8s.io", false, ErrorFormat::Status),
            ("v4.base64.channel.k8s.io", true, ErrorFormat::Status),
            ("base64.channel.k8s.io", true, ErrorFormat::Text),
            ("channel.k8s.io", false, ErrorFormat::Text),
        ] {
            headers.insert("sec-websocket-protocol", protocol.parse().unwrap());
            let f = framing_for(StreamKind::Exec, &headers).expect(protocol);
            assert!(f.from_client.is_none());
            let bytes = f.from_server.closing(&locked()).unwrap();
            let got = client_reads(bytes).await;
            assert_eq!(got.len(), 2, "{protocol}: {got:?}");
            let payload = match (&got[0], base64) {
                (Message::Binary(b), false) => {
                    assert_eq!(b[0], 3, "{protocol}");
                    b[1..].to_vec()
                }
                (Message::Text(t), true) => {
                    assert_eq!(&t.as_bytes()[..1], b"3", "{protocol}");
                    base64::engine::general_purpose::STANDARD
                        .decode(&t.as_bytes()[1..])
                        .unwrap()
                }
                (m, _) => panic!("{protocol}: {m:?}"),
            };
            match format {
                ErrorFormat::Status => {
                    let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                    assert_eq!(v["kind"], "Status");
                    assert_eq!(v["status"], "Failure");
                    assert_eq!(v["reason"], "Forbidden");
                    assert_eq!(v["code"], 403);
                    assert_eq!(v["message"], "access is locked: laptop reported stolen");
                }
                ErrorFormat::Text => {
                    assert_eq!(payload, b"access is locked: laptop reported stolen");
                }
            }
            match &got[1] {
                Message::Close(Some(c)) => assert_eq!(c.code, CloseCode::Normal),
                m => panic!("{protocol}: {m:?}"),
            }
        }
    }

    #[test]
    fn websocket_nothing_is_added_after_the_servers_close() {
        let mut headers = HeaderMap::new();
        headers.insert("upgrade", "websocket".parse().unwrap());
        headers.insert(
            "sec-websocket-protocol",
            "v5.channel.k8s.io".parse().unwrap(),
        );
        let mut f = framing_for(StreamKind::Attach, &headers).unwrap();
        f.from_server.advance(&ws(true, WS_BINARY, 3));
        assert!(f.from_server.closing(&locked()).is_some());
        f.from_server.advance(&ws(true, WS_CLOSE, 2));
        assert!(f.from_server.closing(&locked()).is_none());
    }

    #[test]
    fn only_exec_and_attach_with_known_protocols_get_a_message() {
        let mut ws_headers = HeaderMap::new();
        ws_headers.insert("upgrade", "websocket".parse().unwrap());
        ws_headers.insert(
            "sec-websocket-protocol",
            "SPDY/3.1+portforward.k8s.io".parse().unwrap(),
        );
        assert!(framing_for(StreamKind::PortForward, &ws_headers).is_none());
        assert!(framing_for(StreamKind::Exec, &ws_headers).is_none());
        let mut spdy_headers = HeaderMap::new();
        spdy_headers.insert("upgrade", "SPDY/3.1".parse().unwrap());
        spdy_headers.insert(
            "x-stream-protocol-version",
            "portforward.k8s.io".parse().unwrap(),
        );
        assert!(framing_for(StreamKind::PortForward, &spdy_headers).is_none());
        assert!(framing_for(StreamKind::Exec, &spdy_headers).is_none());
        spdy_headers.insert(
            "x-stream-protocol-version",
            "v4.channel.k8s.io".parse().unwrap(),
        );
        assert!(framing_for(StreamKind::Exec, &spdy_headers).is_some());
        assert!(framing_for(StreamKind::PortForward, &spdy_headers).is_none());
        assert!(framing_for(StreamKind::Upgrade, &spdy_headers).is_none());
        assert!(framing_for(StreamKind::Watch, &spdy_headers).is_none());
    }

    // -- SPDY ------------------------------------------------------------------------------

    fn deflater() -> Compress {
        let mut c = Compress::new(Compression::default(), true);
        c.set_dictionary(crate::proxy::spdy_dictionary::dictionary())
            .unwrap();
        c
    }

    fn block(c: &mut Compress, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut raw = (headers.len() as u32).to_be_bytes().to_vec();
        for (n, v) in headers {
            raw.extend((n.len() as u32).to_be_bytes());
            raw.extend(n.as_bytes());
            raw.extend((v.len() as u32).to_be_bytes());
            raw.extend(v.as_bytes());
        }
        let mut out = Vec::with_capacity(raw.len() + 256);
        let mut consumed = 0;
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(256);
            }
            let before = c.total_in();
            c.compress_vec(&raw[consumed..], &mut out, FlushCompress::Sync)
                .unwrap();
            consumed += (c.total_in() - before) as usize;
            if consumed == raw.len() && out.len() < out.capacity() {
                return out;
            }
        }
    }

    fn control(frame_type: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = (0x8000u16 | SPDY_VERSION).to_be_bytes().to_vec();
        out.extend(frame_type.to_be_bytes());
        out.extend(((u32::from(flags) << 24) | payload.len() as u32).to_be_bytes());
        out.extend(payload);
        out
    }

    fn syn_stream(c: &mut Compress, id: u32, streamtype: &str) -> Vec<u8> {
        let mut p = id.to_be_bytes().to_vec();
        p.extend(0u32.to_be_bytes());
        p.extend([0, 0]);
        p.extend(block(c, &[("streamtype", streamtype), ("port", "")]));
        control(SPDY_SYN_STREAM, 0, &p)
    }

    fn syn_reply(id: u32, flags: u8) -> Vec<u8> {
        // An empty header block is enough for the server side, which does not inflate.
        control(SPDY_SYN_REPLY, flags, &id.to_be_bytes())
    }

    fn data(id: u32, flags: u8, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        spdy_data_fin(&mut out, id, &vec![7u8; len]);
        out[4] = flags;
        out
    }

    fn spdy_exec() -> Framing {
        let mut h = HeaderMap::new();
        h.insert("upgrade", "SPDY/3.1".parse().unwrap());
        h.insert(
            "x-stream-protocol-version",
            "v4.channel.k8s.io".parse().unwrap(),
        );
        framing_for(StreamKind::Exec, &h).unwrap()
    }

    /// A data frame: (stream, flags, payload).
    type DataFrame = (u32, u8, Vec<u8>);

    /// Parses the gateway's closing bytes: data frames, and GOAWAY's last-good-stream-id.
    fn parse_closing(mut b: &[u8]) -> (Vec<DataFrame>, Option<u32>) {
        let mut datas = Vec::new();
        let mut goaway = None;
        while !b.is_empty() {
            let first = u32::from_be_bytes(b[..4].try_into().unwrap());
            let flags = b[4];
            let len = u32::from_be_bytes([0, b[5], b[6], b[7]]) as usize;
            let payload = &b[8..8 + len];
            if first & 0x8000_0000 == 0 {
                datas.push((first, flags, payload.to_vec()));
            } else {
                assert_eq!(first, 0x8003_0007, "only GOAWAY is added");
                assert_eq!(len, 8);
                assert_eq!(&payload[4..], &[0, 0, 0, 0], "status OK");
                goaway = Some(u32::from_be_bytes(payload[..4].try_into().unwrap()));
            }
            b = &b[8 + len..];
        }
        (datas, goaway)
    }

    #[test]
    fn spdy_error_stream_is_found_in_compressed_headers_even_when_not_first() {
        for chunk in [1usize, 3, 7, 64, 4096] {
            let mut z = deflater();
            // One zlib stream for the whole direction: the later blocks refer back to earlier
            // ones, so every block must be inflated in order.
            let client = [
                syn_stream(&mut z, 1, "stdin"),
                data(1, 0, 5),
                syn_stream(&mut z, 3, "stdout"),
                syn_stream(&mut z, 5, "error"),
                syn_stream(&mut z, 7, "stderr"),
                data(1, 0, 3),
            ]
            .concat();
            let mut f = spdy_exec();
            let c = f.from_client.as_mut().unwrap();
            for part in client.chunks(chunk) {
                c.advance(part);
            }
            assert!(c.at_boundary());
            assert_eq!(c.observer().error_stream(), Some(5), "chunk {chunk}");
            let out = f.from_server.closing(&locked()).unwrap();
            let (datas, goaway) = parse_closing(&out);
            assert_eq!(goaway, Some(7), "the last stream the client opened");
            assert_eq!(datas.len(), 1);
            let (id, flags, payload) = &datas[0];
            assert_eq!((*id, *flags), (5, SPDY_FLAG_FIN));
            let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
            assert_eq!(v["status"], "Failure");
            assert_eq!(v["code"], 403);
            assert_eq!(v["message"], "access is locked: laptop reported stolen");
        }
    }

    #[test]
    fn spdy_v1_to_v3_error_stream_carries_the_text() {
        let mut h = HeaderMap::new();
        h.insert("upgrade", "SPDY/3.1".parse().unwrap());
        h.insert(
            "x-stream-protocol-version",
            "v3.channel.k8s.io".parse().unwrap(),
        );
        let mut f = framing_for(StreamKind::Exec, &h).unwrap();
        let mut z = deflater();
        f.from_client
            .as_mut()
            .unwrap()
            .advance(&syn_stream(&mut z, 1, "error"));
        let (datas, goaway) = parse_closing(&f.from_server.closing(&locked()).unwrap());
        assert_eq!(datas[0].2, b"access is locked: laptop reported stolen");
        assert_eq!(goaway, Some(1));
    }

    #[test]
    fn spdy_unknown_error_stream_gets_goaway_only() {
        let f = spdy_exec();
        let (datas, goaway) = parse_closing(&f.from_server.closing(&locked()).unwrap());
        assert!(datas.is_empty());
        assert_eq!(goaway, Some(0));
    }

    #[test]
    fn spdy_nothing_is_written_on_what_the_server_ended() {
        let mut f = spdy_exec();
        let mut z = deflater();
        f.from_client
            .as_mut()
            .unwrap()
            .advance(&syn_stream(&mut z, 1, "error"));
        f.from_server.advance(&syn_reply(1, 0));
        f.from_server.advance(&data(1, 0, 4));
        let (datas, _) = parse_closing(&f.from_server.closing(&locked()).unwrap());
        assert_eq!(datas.len(), 1, "open error stream: the status goes there");
        // The process exited: its outcome went on the error stream with FIN.
        f.from_server.advance(&data(1, SPDY_FLAG_FIN, 34));
        let (datas, goaway) = parse_closing(&f.from_server.closing(&locked()).unwrap());
        assert!(datas.is_empty());
        assert_eq!(goaway, Some(1));
        // ...and then the session.
        f.from_server.advance(&control(SPDY_GOAWAY, 0, &[0; 8]));
        assert!(f.from_server.closing(&locked()).is_none());
    }

    #[test]
    fn spdy_reset_error_stream_gets_no_data() {
        let mut f = spdy_exec();
        let mut z = deflater();
        f.from_client
            .as_mut()
            .unwrap()
            .advance(&syn_stream(&mut z, 3, "error"));
        let mut rst = 3u32.to_be_bytes().to_vec();
        rst.extend(5u32.to_be_bytes());
        f.from_server.advance(&control(SPDY_RST_STREAM, 0, &rst));
        let (datas, _) = parse_closing(&f.from_server.closing(&locked()).unwrap());
        assert!(datas.is_empty());
    }

    #[test]
    fn spdy_boundaries_only_between_frames_up_to_the_24_bit_maximum() {
        let big = data(1, 0, SPDY_MAX_PAYLOAD);
        let small = data(3, 0, 2);
        let all = [big.clone(), syn_reply(5, 0), small.clone()].concat();
        let ends = [big.len(), big.len() + 12, all.len()];
        let mut f = spdy_exec();
        let t = &mut f.from_server;
        let mut seen = Vec::new();
        let mut pos = 0;
        // Reads of odd sizes that straddle every header.
        for part in all.chunks(65_521) {
            let mut rest = part;
            while !rest.is_empty() {
                let n = t.advance_to_boundary(rest);
                let n = if n == 0 {
                    // Already at a boundary: forward normally up to the next one.
                    t.advance(&rest[..1]);
                    1
                } else {
                    n
                };
                pos += n;
                rest = &rest[n..];
                if t.at_boundary() {
                    seen.push(pos);
                }
            }
        }
        assert_eq!(seen, ends);
    }

    #[test]
    fn spdy_header_split_across_reads_is_not_a_boundary() {
        let mut f = spdy_exec();
        let t = &mut f.from_server;
        let frame = data(1, 0, 10);
        for i in 0..frame.len() - 1 {
            t.advance(&frame[i..=i]);
            assert!(!t.at_boundary(), "after {} bytes", i + 1);
        }
        t.advance(&frame[frame.len() - 1..]);
        assert!(t.at_boundary());
    }

    #[test]
    fn spdy_garbage_header_block_leaves_the_error_stream_unknown() {
        let mut f = spdy_exec();
        let c = f.from_client.as_mut().unwrap();
        let mut p = 1u32.to_be_bytes().to_vec();
        p.extend([0; 6]);
        p.extend(b"not zlib at all");
        c.advance(&control(SPDY_SYN_STREAM, 0, &p));
        assert_eq!(c.observer().error_stream(), None);
        let mut z = deflater();
        c.advance(&syn_stream(&mut z, 3, "error"));
        assert_eq!(c.observer().error_stream(), None, "no longer followed");
        let (datas, goaway) = parse_closing(&f.from_server.closing(&locked()).unwrap());
        assert!(datas.is_empty());
        assert_eq!(goaway, Some(3));
    }
}
