//! SPDY/3.1 framing: frame layouts, header blocks and their zlib compression.
//!
//! Every frame starts with an 8-byte header. A control frame has the control bit set, a 15-bit
//! version (3) and a 16-bit type, then 8 bits of flags and a 24-bit payload length; a data frame
//! has the control bit clear and a 31-bit stream id, then flags and length the same way.
//!
//! Header blocks (in SYN_STREAM, SYN_REPLY and HEADERS) are a 32-bit pair count followed by
//! length-prefixed (32-bit) names and values, compressed with zlib using the SPDY/3 dictionary.
//! Each direction of a session is ONE zlib stream: it is never reset between frames, and each
//! block ends with a sync flush so the peer can decode it on its own.

use std::io;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::dictionary::{dictionary, DICTIONARY_ID};

/// The SPDY version spoken.
pub(crate) const VERSION: u16 = 3;

/// Control frame types.
pub(crate) const TYPE_SYN_STREAM: u16 = 1;
pub(crate) const TYPE_SYN_REPLY: u16 = 2;
pub(crate) const TYPE_RST_STREAM: u16 = 3;
pub(crate) const TYPE_SETTINGS: u16 = 4;
pub(crate) const TYPE_PING: u16 = 6;
pub(crate) const TYPE_GOAWAY: u16 = 7;
pub(crate) const TYPE_HEADERS: u16 = 8;
pub(crate) const TYPE_WINDOW_UPDATE: u16 = 9;

/// FIN flag (data frames, SYN_STREAM, SYN_REPLY, HEADERS).
pub(crate) const FLAG_FIN: u8 = 0x01;
/// UNIDIRECTIONAL flag (SYN_STREAM).
pub(crate) const FLAG_UNIDIRECTIONAL: u8 = 0x02;

/// RST_STREAM status codes used here.
pub(crate) const RST_PROTOCOL_ERROR: u32 = 1;
pub(crate) const RST_INVALID_STREAM: u32 = 2;
pub(crate) const RST_REFUSED_STREAM: u32 = 3;

/// GOAWAY status codes.
pub(crate) const GOAWAY_OK: u32 = 0;
pub(crate) const GOAWAY_PROTOCOL_ERROR: u32 = 1;

/// SETTINGS id of the initial per-stream window.
#[cfg(test)]
pub(crate) const SETTINGS_INITIAL_WINDOW_SIZE: u32 = 7;

/// Largest payload a frame's 24-bit length can carry.
pub(crate) const MAX_PAYLOAD: usize = (1 << 24) - 1;

/// Largest decompressed header block accepted.
const MAX_HEADER_BLOCK: usize = 1 << 20;

/// A header block: lower-case names with their values (several values of one name are joined by
/// NUL bytes on the wire and kept that way here).
pub(crate) type Headers = Vec<(String, String)>;

/// Looks a header up by name (names on the wire are lower case; compared case-insensitively).
pub(crate) fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    SynStream {
        stream_id: u32,
        associated_id: u32,
        priority: u8,
        slot: u8,
        flags: u8,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings {
        flags: u8,
        /// (flags, id, value)
        entries: Vec<(u8, u32, u32)>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    Data {
        stream_id: u32,
        flags: u8,
        data: Bytes,
    },
    /// A control frame of a type this implementation does not handle (NOOP from SPDY/2,
    /// CREDENTIAL, ...): the spec says to ignore it.
    UnknownControl {
        version: u16,
        frame_type: u16,
    },
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn put_control_header(out: &mut Vec<u8>, frame_type: u16, flags: u8, len: usize) -> io::Result<()> {
    if len > MAX_PAYLOAD {
        return Err(invalid("SPDY control frame too large"));
    }
    out.put_u16(0x8000 | VERSION);
    out.put_u16(frame_type);
    // Checked above: len fits in 24 bits.
    out.put_u32((u32::from(flags) << 24) | (len as u32));
    Ok(())
}

fn put_u32_len(out: &mut Vec<u8>, len: usize) -> io::Result<()> {
    let len = u32::try_from(len).map_err(|_| invalid("SPDY header field too large"))?;
    out.put_u32(len);
    Ok(())
}

/// Serialises a header block (uncompressed).
pub(crate) fn encode_header_block(headers: &Headers) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    put_u32_len(&mut out, headers.len())?;
    for (name, value) in headers {
        let name = name.to_ascii_lowercase();
        put_u32_len(&mut out, name.len())?;
        out.extend_from_slice(name.as_bytes());
        put_u32_len(&mut out, value.len())?;
        out.extend_from_slice(value.as_bytes());
    }
    Ok(out)
}

/// Parses an uncompressed header block.
pub(crate) fn decode_header_block(mut block: &[u8]) -> io::Result<Headers> {
    fn take<'a>(block: &mut &'a [u8], n: usize) -> io::Result<&'a [u8]> {
        if block.len() < n {
            return Err(invalid("truncated SPDY header block"));
        }
        let (head, rest) = block.split_at(n);
        *block = rest;
        Ok(head)
    }
    fn take_len(block: &mut &[u8]) -> io::Result<usize> {
        let b = take(block, 4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
    let count = take_len(&mut block)?;
    // Each pair takes at least 8 bytes: refuse counts the block cannot hold.
    if count > block.len() / 8 {
        return Err(invalid("SPDY header block count exceeds its size"));
    }
    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        let n = take_len(&mut block)?;
        let name = String::from_utf8_lossy(take(&mut block, n)?).to_ascii_lowercase();
        let n = take_len(&mut block)?;
        let value = String::from_utf8_lossy(take(&mut block, n)?).into_owned();
        headers.push((name, value));
    }
    Ok(headers)
}

/// The sending half of a session's framing: owns the outgoing zlib stream.
pub(crate) struct Encoder {
    deflate: Compress,
}

impl Encoder {
    pub(crate) fn new() -> Self {
        let mut deflate = Compress::new(Compression::default(), true);
        // Set before any output: the zlib header then carries FDICT and the dictionary id, as
        // Go's zlib.NewWriterLevelDict (spdystream) does.
        deflate
            .set_dictionary(dictionary())
            .expect("setting the SPDY dictionary on a fresh zlib stream cannot fail");
        Self { deflate }
    }

    /// Compresses one header block, ending it with a sync flush.
    pub(crate) fn compress_headers(&mut self, headers: &Headers) -> io::Result<Vec<u8>> {
        let raw = encode_header_block(headers)?;
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut consumed = 0usize;
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(256);
            }
            let before_in = self.deflate.total_in();
            self.deflate
                .compress_vec(&raw[consumed..], &mut out, FlushCompress::Sync)
                .map_err(|e| invalid(format!("SPDY header compression failed: {e}")))?;
            consumed += (self.deflate.total_in() - before_in) as usize;
            // Done once all input is in and the flush did not run out of output space.
            if consumed == raw.len() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }

    /// Serialises a frame, appending it to `out`.
    pub(crate) fn encode(&mut self, frame: &Frame, out: &mut Vec<u8>) -> io::Result<()> {
        match frame {
            Frame::SynStream {
                stream_id,
                associated_id,
                priority,
                slot,
                flags,
                headers,
            } => {
                let block = self.compress_headers(headers)?;
                put_control_header(out, TYPE_SYN_STREAM, *flags, 10 + block.len())?;
                out.put_u32(stream_id & 0x7fff_ffff);
                out.put_u32(associated_id & 0x7fff_ffff);
                out.put_u8((priority & 0x07) << 5);
                out.put_u8(*slot);
                out.extend_from_slice(&block);
            }
            Frame::SynReply {
                stream_id,
                flags,
                headers,
            } => {
                let block = self.compress_headers(headers)?;
                put_control_header(out, TYPE_SYN_REPLY, *flags, 4 + block.len())?;
                out.put_u32(stream_id & 0x7fff_ffff);
                out.extend_from_slice(&block);
            }
            Frame::Headers {
                stream_id,
                flags,
                headers,
            } => {
                let block = self.compress_headers(headers)?;
                put_control_header(out, TYPE_HEADERS, *flags, 4 + block.len())?;
                out.put_u32(stream_id & 0x7fff_ffff);
                out.extend_from_slice(&block);
            }
            Frame::RstStream { stream_id, status } => {
                put_control_header(out, TYPE_RST_STREAM, 0, 8)?;
                out.put_u32(stream_id & 0x7fff_ffff);
                out.put_u32(*status);
            }
            Frame::Settings { flags, entries } => {
                put_control_header(out, TYPE_SETTINGS, *flags, 4 + 8 * entries.len())?;
                put_u32_len(out, entries.len())?;
                for (flags, id, value) in entries {
                    out.put_u32((u32::from(*flags) << 24) | (id & 0x00ff_ffff));
                    out.put_u32(*value);
                }
            }
            Frame::Ping { id } => {
                put_control_header(out, TYPE_PING, 0, 4)?;
                out.put_u32(*id);
            }
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                put_control_header(out, TYPE_GOAWAY, 0, 8)?;
                out.put_u32(last_good_stream_id & 0x7fff_ffff);
                out.put_u32(*status);
            }
            Frame::WindowUpdate { stream_id, delta } => {
                put_control_header(out, TYPE_WINDOW_UPDATE, 0, 8)?;
                out.put_u32(stream_id & 0x7fff_ffff);
                out.put_u32(delta & 0x7fff_ffff);
            }
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                if data.len() > MAX_PAYLOAD {
                    return Err(invalid("SPDY data frame too large"));
                }
                out.put_u32(stream_id & 0x7fff_ffff);
                out.put_u32((u32::from(*flags) << 24) | (data.len() as u32));
                out.extend_from_slice(data);
            }
            Frame::UnknownControl { .. } => {
                return Err(invalid("cannot encode an unknown SPDY control frame"));
            }
        }
        Ok(())
    }
}

/// The receiving half of a session's framing: owns the incoming zlib stream.
pub(crate) struct Decoder {
    inflate: Decompress,
}

impl Decoder {
    pub(crate) fn new() -> Self {
        Self {
            inflate: Decompress::new(true),
        }
    }

    /// Decompresses one header block (continuing the session's zlib stream).
    pub(crate) fn decompress_headers(&mut self, input: &[u8]) -> io::Result<Headers> {
        let mut out = Vec::with_capacity(input.len() * 4 + 64);
        let mut consumed = 0usize;
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(256));
            }
            let before_in = self.inflate.total_in();
            let before_out = self.inflate.total_out();
            let result =
                self.inflate
                    .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync);
            consumed += (self.inflate.total_in() - before_in) as usize;
            let progressed =
                self.inflate.total_in() != before_in || self.inflate.total_out() != before_out;
            match result {
                Ok(Status::StreamEnd) => break,
                Ok(_) => {}
                Err(e) => match e.needs_dictionary() {
                    Some(id) if id != DICTIONARY_ID => {
                        return Err(invalid(format!(
                            "SPDY header block wants dictionary {id:#010x}, not the SPDY/3 one"
                        )))
                    }
                    Some(_) => {
                        self.inflate.set_dictionary(dictionary()).map_err(|e| {
                            invalid(format!("SPDY header block wants another dictionary: {e}"))
                        })?;
                        continue;
                    }
                    None => return Err(invalid(format!("SPDY header decompression failed: {e}"))),
                },
            }
            if out.len() > MAX_HEADER_BLOCK {
                return Err(invalid("SPDY header block too large"));
            }
            if consumed == input.len() && out.len() < out.capacity() {
                break;
            }
            if !progressed {
                return Err(invalid("SPDY header block is truncated"));
            }
        }
        decode_header_block(&out)
    }

    /// Takes one complete frame off the front of `buf`, if `buf` holds one.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> io::Result<Option<Frame>> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let len = (u32::from_be_bytes([0, buf[5], buf[6], buf[7]])) as usize;
        if buf.len() < 8 + len {
            buf.reserve(8 + len - buf.len());
            return Ok(None);
        }
        let mut head = buf.split_to(8);
        let mut payload = buf.split_to(len).freeze();
        let first = head.get_u32();
        let flags = head.get_u8();
        if first & 0x8000_0000 == 0 {
            return Ok(Some(Frame::Data {
                stream_id: first & 0x7fff_ffff,
                flags,
                data: payload,
            }));
        }
        let version = ((first >> 16) & 0x7fff) as u16;
        let frame_type = (first & 0xffff) as u16;
        if version != VERSION {
            return Err(invalid(format!("unsupported SPDY version {version}")));
        }
        let need = |n: usize| -> io::Result<()> {
            if len < n {
                Err(invalid(format!(
                    "SPDY control frame type {frame_type} too short ({len} bytes)"
                )))
            } else {
                Ok(())
            }
        };
        let frame = match frame_type {
            TYPE_SYN_STREAM => {
                need(10)?;
                let stream_id = payload.get_u32() & 0x7fff_ffff;
                let associated_id = payload.get_u32() & 0x7fff_ffff;
                let priority = payload.get_u8() >> 5;
                let slot = payload.get_u8();
                let headers = self.decompress_headers(&payload)?;
                Frame::SynStream {
                    stream_id,
                    associated_id,
                    priority,
                    slot,
                    flags,
                    headers,
                }
            }
            TYPE_SYN_REPLY | TYPE_HEADERS => {
                need(4)?;
                let stream_id = payload.get_u32() & 0x7fff_ffff;
                let headers = self.decompress_headers(&payload)?;
                if frame_type == TYPE_SYN_REPLY {
                    Frame::SynReply {
                        stream_id,
                        flags,
                        headers,
                    }
                } else {
                    Frame::Headers {
                        stream_id,
                        flags,
                        headers,
                    }
                }
            }
            TYPE_RST_STREAM => {
                need(8)?;
                Frame::RstStream {
                    stream_id: payload.get_u32() & 0x7fff_ffff,
                    status: payload.get_u32(),
                }
            }
            TYPE_SETTINGS => {
                need(4)?;
                let count = payload.get_u32() as usize;
                if count > payload.len() / 8 {
                    return Err(invalid("SPDY SETTINGS count exceeds its size"));
                }
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    let flag_id = payload.get_u32();
                    let value = payload.get_u32();
                    entries.push(((flag_id >> 24) as u8, flag_id & 0x00ff_ffff, value));
                }
                Frame::Settings { flags, entries }
            }
            TYPE_PING => {
                need(4)?;
                Frame::Ping {
                    id: payload.get_u32(),
                }
            }
            TYPE_GOAWAY => {
                need(4)?;
                let last_good_stream_id = payload.get_u32() & 0x7fff_ffff;
                // SPDY/3 added the status; tolerate its absence.
                let status = if payload.len() >= 4 {
                    payload.get_u32()
                } else {
                    GOAWAY_OK
                };
                Frame::GoAway {
                    last_good_stream_id,
                    status,
                }
            }
            TYPE_WINDOW_UPDATE => {
                need(8)?;
                Frame::WindowUpdate {
                    stream_id: payload.get_u32() & 0x7fff_ffff,
                    delta: payload.get_u32() & 0x7fff_ffff,
                }
            }
            _ => Frame::UnknownControl {
                version,
                frame_type,
            },
        };
        Ok(Some(frame))
    }
}

#[cfg(test)]
mod tests {
    use super::super::dictionary::DICTIONARY_LEN;
    use super::*;

    fn hdrs(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn roundtrip(enc: &mut Encoder, dec: &mut Decoder, frame: &Frame) -> Frame {
        let mut wire = Vec::new();
        enc.encode(frame, &mut wire).unwrap();
        let mut buf = BytesMut::from(&wire[..]);
        let got = dec.decode(&mut buf).unwrap().expect("one whole frame");
        assert!(buf.is_empty(), "decoder left bytes behind");
        got
    }

    #[test]
    fn spdy_header_block_roundtrip_with_dictionary() {
        let mut enc = Encoder::new();
        let mut dec = Decoder::new();
        // The first block starts the zlib stream: its header must advertise the dictionary.
        let first = enc
            .compress_headers(&hdrs(&[("streamtype", "error")]))
            .unwrap();
        assert_eq!(first[0], 0x78, "zlib CMF");
        assert_ne!(first[1] & 0x20, 0, "FDICT must be set");
        assert_eq!(
            u32::from_be_bytes([first[2], first[3], first[4], first[5]]),
            DICTIONARY_ID
        );
        assert!(first.ends_with(&[0, 0, 0xff, 0xff]), "sync flush marker");
        assert_eq!(
            dec.decompress_headers(&first).unwrap(),
            hdrs(&[("streamtype", "error")])
        );
        // Later blocks continue the same streams in both directions.
        for i in 0..20 {
            let h = hdrs(&[
                ("streamtype", "data"),
                ("port", "8080"),
                ("requestid", &i.to_string()),
                ("multi", "a\0b"),
            ]);
            let frame = Frame::SynStream {
                stream_id: 2 * i + 1,
                associated_id: 0,
                priority: 0,
                slot: 0,
                flags: 0,
                headers: h,
            };
            assert_eq!(roundtrip(&mut enc, &mut dec, &frame), frame);
        }
        let reply = Frame::SynReply {
            stream_id: 7,
            flags: FLAG_FIN,
            headers: Vec::new(),
        };
        assert_eq!(roundtrip(&mut enc, &mut dec, &reply), reply);
        assert_eq!(dictionary().len(), DICTIONARY_LEN);
    }

    /// A header block produced by an independent zlib (CPython's, i.e. C zlib, with
    /// `zdict=` the SPDY dictionary, level 9, Z_SYNC_FLUSH, as Go's spdystream framer does):
    /// the SYN_STREAM header block `{"streamtype": "error"}` followed by
    /// `{"streamtype": "stdin"}` on the same stream.
    #[test]
    fn spdy_decodes_blocks_from_reference_zlib() {
        let mut dec = Decoder::new();
        let first = dec.decompress_headers(REF_BLOCK_1).unwrap();
        assert_eq!(first, hdrs(&[("streamtype", "error")]));
        let second = dec.decompress_headers(REF_BLOCK_2).unwrap();
        assert_eq!(second, hdrs(&[("streamtype", "stdin")]));
    }

    const REF_BLOCK_1: &[u8] = &[
        0x78, 0xf9, 0xe3, 0xc6, 0xa7, 0xc2, 0x02, 0xa6, 0x23, 0x46, 0x70, 0x3a, 0x2b, 0x29, 0x4a,
        0x4d, 0xcc, 0x85, 0x16, 0x25, 0xac, 0xa9, 0xa0, 0x80, 0x06, 0x00, 0x00, 0x00, 0xff, 0xff,
    ];
    const REF_BLOCK_2: &[u8] = &[
        0xc2, 0x2e, 0x55, 0x5c, 0x02, 0xcc, 0x2e, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff,
    ];

    #[test]
    fn spdy_control_frames_roundtrip() {
        let mut enc = Encoder::new();
        let mut dec = Decoder::new();
        for frame in [
            Frame::Ping { id: 7 },
            Frame::GoAway {
                last_good_stream_id: 9,
                status: GOAWAY_PROTOCOL_ERROR,
            },
            Frame::RstStream {
                stream_id: 3,
                status: RST_REFUSED_STREAM,
            },
            Frame::Settings {
                flags: 0,
                entries: vec![(0, SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20)],
            },
            Frame::WindowUpdate {
                stream_id: 0,
                delta: 65536,
            },
            Frame::Data {
                stream_id: 5,
                flags: FLAG_FIN,
                data: Bytes::from_static(b"hello"),
            },
        ] {
            assert_eq!(roundtrip(&mut enc, &mut dec, &frame), frame);
        }
        // Exact layout of a PING: control bit + version 3, type 6, no flags, length 4.
        let mut wire = Vec::new();
        enc.encode(&Frame::Ping { id: 0x0102_0304 }, &mut wire)
            .unwrap();
        assert_eq!(wire, [0x80, 0x03, 0x00, 0x06, 0, 0, 0, 4, 1, 2, 3, 4]);
        // A data frame: stream id, FIN flag, 24-bit length.
        wire.clear();
        enc.encode(
            &Frame::Data {
                stream_id: 3,
                flags: FLAG_FIN,
                data: Bytes::from_static(b"ab"),
            },
            &mut wire,
        )
        .unwrap();
        assert_eq!(wire, [0, 0, 0, 3, 1, 0, 0, 2, b'a', b'b']);
    }

    #[test]
    fn spdy_partial_frames_wait_for_more_bytes() {
        let mut enc = Encoder::new();
        let mut dec = Decoder::new();
        let mut wire = Vec::new();
        enc.encode(
            &Frame::Data {
                stream_id: 1,
                flags: 0,
                data: Bytes::from_static(b"xyz"),
            },
            &mut wire,
        )
        .unwrap();
        let mut buf = BytesMut::new();
        for (i, b) in wire.iter().enumerate() {
            buf.put_u8(*b);
            let got = dec.decode(&mut buf).unwrap();
            assert_eq!(got.is_some(), i == wire.len() - 1);
        }
    }
}
