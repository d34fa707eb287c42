//! Session tests, driven by a small SPDY client that behaves like spdystream: it opens streams
//! with odd ids and waits for each SYN_REPLY before using the stream.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::exec::V4_SUCCESS;
use super::frame::{Decoder, Encoder, Frame, FLAG_FIN, GOAWAY_OK};

const WAIT: Duration = Duration::from_secs(10);

struct Client {
    enc: Encoder,
    wr: WriteHalf<DuplexStream>,
    frames: mpsc::UnboundedReceiver<Frame>,
    /// Frames received while waiting for something else.
    backlog: Vec<Frame>,
    next_id: u32,
}

async fn read_frames(mut rd: ReadHalf<DuplexStream>, tx: mpsc::UnboundedSender<Frame>) {
    let mut dec = Decoder::new();
    let mut buf = BytesMut::new();
    loop {
        while let Some(frame) = dec.decode(&mut buf).expect("server sent a malformed frame") {
            if tx.send(frame).is_err() {
                return;
            }
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

impl Client {
    fn start(
        server_side: DuplexStream,
        client_side: DuplexStream,
        exec: Option<&str>,
    ) -> (Self, JoinHandle<std::io::Result<()>>) {
        let server = match exec {
            Some(protocol) => {
                let protocol = protocol.to_string();
                tokio::spawn(async move { super::serve_exec(server_side, &protocol).await })
            }
            None => tokio::spawn(super::serve_portforward(server_side)),
        };
        let (rd, wr) = tokio::io::split(client_side);
        let (tx, frames) = mpsc::unbounded_channel();
        tokio::spawn(read_frames(rd, tx));
        let client = Self {
            enc: Encoder::new(),
            wr,
            frames,
            backlog: Vec::new(),
            next_id: 1,
        };
        (client, server)
    }

    fn exec(protocol: &str) -> (Self, JoinHandle<std::io::Result<()>>) {
        let (a, b) = tokio::io::duplex(16 * 1024);
        Self::start(a, b, Some(protocol))
    }

    fn portforward() -> (Self, JoinHandle<std::io::Result<()>>) {
        let (a, b) = tokio::io::duplex(16 * 1024);
        Self::start(a, b, None)
    }

    async fn send(&mut self, frame: Frame) {
        let mut wire = Vec::new();
        self.enc.encode(&frame, &mut wire).unwrap();
        self.wr.write_all(&wire).await.unwrap();
    }

    /// The next frame from the server (None once it closed the connection).
    async fn recv(&mut self) -> Option<Frame> {
        if !self.backlog.is_empty() {
            return Some(self.backlog.remove(0));
        }
        tokio::time::timeout(WAIT, self.frames.recv())
            .await
            .expect("timed out waiting for a frame from the server")
    }

    /// Waits for a frame matching `pred`, keeping the others for later.
    async fn wait_for(&mut self, pred: impl Fn(&Frame) -> bool) -> Frame {
        if let Some(pos) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(pos);
        }
        loop {
            let frame = tokio::time::timeout(WAIT, self.frames.recv())
                .await
                .expect("timed out waiting for a frame from the server")
                .expect("server closed the connection");
            if pred(&frame) {
                return frame;
            }
            self.backlog.push(frame);
        }
    }

    /// Opens a stream and waits for its SYN_REPLY, as spdystream's CreateStream + Wait do.
    async fn open(&mut self, headers: &[(&str, &str)]) -> u32 {
        let id = self.next_id;
        self.next_id += 2;
        self.send(Frame::SynStream {
            stream_id: id,
            associated_id: 0,
            priority: 0,
            slot: 0,
            flags: 0,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        })
        .await;
        let reply = self
            .wait_for(|f| matches!(f, Frame::SynReply { stream_id, .. } if *stream_id == id))
            .await;
        assert_eq!(
            reply,
            Frame::SynReply {
                stream_id: id,
                flags: 0,
                headers: Vec::new()
            }
        );
        id
    }

    async fn data(&mut self, id: u32, data: &[u8]) {
        self.send(Frame::Data {
            stream_id: id,
            flags: 0,
            data: Bytes::copy_from_slice(data),
        })
        .await;
    }

    async fn fin(&mut self, id: u32) {
        self.send(Frame::Data {
            stream_id: id,
            flags: FLAG_FIN,
            data: Bytes::new(),
        })
        .await;
    }

    async fn ping(&mut self, id: u32) {
        self.send(Frame::Ping { id }).await;
        let pong = self.wait_for(|f| matches!(f, Frame::Ping { .. })).await;
        assert_eq!(pong, Frame::Ping { id });
    }

    /// Every frame until the server closes the connection.
    async fn rest(&mut self) -> Vec<Frame> {
        let mut frames = std::mem::take(&mut self.backlog);
        while let Some(f) = self.recv().await {
            frames.push(f);
        }
        frames
    }
}

fn is_data(f: &Frame, id: u32) -> bool {
    matches!(f, Frame::Data { stream_id, .. } if *stream_id == id)
}

fn payload(frames: &[Frame], id: u32) -> Vec<u8> {
    let mut v = Vec::new();
    for f in frames {
        if let Frame::Data {
            stream_id, data, ..
        } = f
        {
            if *stream_id == id {
                v.extend_from_slice(data);
            }
        }
    }
    v
}

fn fin_index(frames: &[Frame], id: u32) -> usize {
    let fins: Vec<usize> = frames
        .iter()
        .enumerate()
        .filter(|(_, f)| matches!(f, Frame::Data { stream_id, flags, .. } if *stream_id == id && flags & FLAG_FIN != 0))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        fins.len(),
        1,
        "stream {id} must be half-closed exactly once: {frames:?}"
    );
    fins[0]
}

async fn server_result(server: JoinHandle<std::io::Result<()>>) {
    tokio::time::timeout(WAIT, server)
        .await
        .expect("server session did not end")
        .expect("server task panicked")
        .expect("server session failed");
}

#[tokio::test]
async fn spdy_exec_v4_echoes_stdin_and_reports_success() {
    let (mut c, server) = Client::exec("v4.channel.k8s.io");
    let error = c.open(&[("streamtype", "error")]).await;
    let stdin = c.open(&[("streamtype", "stdin")]).await;
    let stdout = c.open(&[("streamtype", "stdout")]).await;
    let stderr = c.open(&[("streamtype", "stderr")]).await;
    assert_eq!((error, stdin, stdout, stderr), (1, 3, 5, 7));
    c.ping(1).await;
    c.data(stdin, b"hello ").await;
    c.data(stdin, b"world\n").await;
    c.ping(3).await;
    c.fin(stdin).await;
    let frames = c.rest().await;

    assert_eq!(payload(&frames, stdout), b"hello world\n");
    assert_eq!(payload(&frames, stderr), b"");
    assert_eq!(payload(&frames, error), V4_SUCCESS);
    let stdout_fin = fin_index(&frames, stdout);
    let stderr_fin = fin_index(&frames, stderr);
    let error_fin = fin_index(&frames, error);
    let status_at = frames
        .iter()
        .position(|f| matches!(f, Frame::Data { stream_id, data, .. } if *stream_id == error && !data.is_empty()))
        .unwrap();
    assert!(stdout_fin < status_at && stderr_fin < status_at && status_at < error_fin);
    let last_stdout = frames.iter().rposition(|f| is_data(f, stdout)).unwrap();
    assert_eq!(last_stdout, stdout_fin);
    assert_eq!(
        frames.last(),
        Some(&Frame::GoAway {
            last_good_stream_id: stderr,
            status: GOAWAY_OK
        })
    );
    drop(c);
    server_result(server).await;
}

#[tokio::test]
async fn spdy_exec_v3_success_is_an_empty_error_stream() {
    let (mut c, server) = Client::exec("v3.channel.k8s.io");
    let error = c.open(&[("streamtype", "error")]).await;
    let stdin = c.open(&[("streamtype", "stdin")]).await;
    let stdout = c.open(&[("streamtype", "stdout")]).await;
    c.data(stdin, b"abc").await;
    c.fin(stdin).await;
    let frames = c.rest().await;
    assert_eq!(payload(&frames, stdout), b"abc");
    assert_eq!(payload(&frames, error), b"");
    assert!(fin_index(&frames, stdout) < fin_index(&frames, error));
    assert!(matches!(frames.last(), Some(Frame::GoAway { .. })));
    drop(c);
    server_result(server).await;
}

#[tokio::test]
async fn spdy_exec_without_stdin_exits_at_once() {
    let (mut c, server) = Client::exec("v4.channel.k8s.io");
    let error = c.open(&[("streamtype", "error")]).await;
    let stdout = c.open(&[("streamtype", "stdout")]).await;
    let stderr = c.open(&[("streamtype", "stderr")]).await;
    let frames = c.rest().await;
    fin_index(&frames, stdout);
    fin_index(&frames, stderr);
    assert_eq!(payload(&frames, error), V4_SUCCESS);
    drop(c);
    server_result(server).await;
}

#[tokio::test]
async fn spdy_exec_tty_ends_on_ctrl_d() {
    let (mut c, server) = Client::exec("v4.channel.k8s.io");
    let error = c.open(&[("streamtype", "error")]).await;
    let stdin = c.open(&[("streamtype", "stdin")]).await;
    let stdout = c.open(&[("streamtype", "stdout")]).await;
    let resize = c.open(&[("streamtype", "resize")]).await;
    c.data(resize, br#"{"Width":80,"Height":24}"#).await;
    c.data(stdin, b"ls\r\x04ignored").await;
    let frames = c.rest().await;
    assert_eq!(payload(&frames, stdout), b"ls\r");
    assert_eq!(payload(&frames, error), V4_SUCCESS);
    drop(c);
    server_result(server).await;
}

#[tokio::test]
async fn spdy_exec_large_stdin_while_reading() {
    let (mut c, server) = Client::exec("v4.channel.k8s.io");
    let _error = c.open(&[("streamtype", "error")]).await;
    let stdin = c.open(&[("streamtype", "stdin")]).await;
    let stdout = c.open(&[("streamtype", "stdout")]).await;
    // Write far more than the duplex buffer and the 64 KiB SPDY default window hold, without
    // reading in between: the server must keep reading while its echo queues up.
    let input: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    for chunk in input.chunks(30_000) {
        c.data(stdin, chunk).await;
    }
    c.fin(stdin).await;
    let frames = c.rest().await;
    assert_eq!(payload(&frames, stdout), input);
    assert!(frames
        .iter()
        .any(|f| matches!(f, Frame::WindowUpdate { stream_id, .. } if *stream_id == stdin)));
    drop(c);
    server_result(server).await;
}

#[tokio::test]
async fn spdy_portforward_echoes_two_concurrent_requests() {
    let (mut c, server) = Client::portforward();
    // Request 0: error stream (half-closed at once, as client-go does), then data stream.
    let err0 = c
        .open(&[
            ("streamtype", "error"),
            ("port", "8080"),
            ("requestid", "0"),
        ])
        .await;
    c.fin(err0).await;
    let data0 = c
        .open(&[("streamtype", "data"), ("port", "8080"), ("requestid", "0")])
        .await;
    let err1 = c
        .open(&[
            ("streamtype", "error"),
            ("port", "8080"),
            ("requestid", "1"),
        ])
        .await;
    c.fin(err1).await;
    let data1 = c
        .open(&[("streamtype", "data"), ("port", "8080"), ("requestid", "1")])
        .await;
    c.ping(5).await;

    c.data(data0, b"first-a ").await;
    c.data(data1, b"second-a ").await;
    c.data(data0, b"first-b").await;
    c.data(data1, b"second-b").await;
    let mut got0 = Vec::new();
    let mut got1 = Vec::new();
    while got0.len() < 15 || got1.len() < 17 {
        match c.recv().await.expect("server closed early") {
            Frame::Data {
                stream_id,
                data,
                flags,
            } => {
                assert_eq!(flags & FLAG_FIN, 0);
                if stream_id == data0 {
                    got0.extend_from_slice(&data);
                } else if stream_id == data1 {
                    got1.extend_from_slice(&data);
                } else {
                    panic!("unexpected data on stream {stream_id}");
                }
            }
            other => panic!("unexpected frame {other:?}"),
        }
    }
    assert_eq!(got0, b"first-a first-b");
    assert_eq!(got1, b"second-a second-b");

    // Closing request 0's data stream closes its data and error streams, with no error text.
    c.fin(data0).await;
    let f = c.recv().await.unwrap();
    assert_eq!(
        f,
        Frame::Data {
            stream_id: data0,
            flags: FLAG_FIN,
            data: Bytes::new()
        }
    );
    let f = c.recv().await.unwrap();
    assert_eq!(
        f,
        Frame::Data {
            stream_id: err0,
            flags: FLAG_FIN,
            data: Bytes::new()
        }
    );
    // Request 1 still works.
    c.data(data1, b"more").await;
    let f = c.recv().await.unwrap();
    assert!(
        matches!(f, Frame::Data { stream_id, ref data, .. } if stream_id == data1 && &data[..] == b"more")
    );
    c.fin(data1).await;
    let f = c.recv().await.unwrap();
    assert!(
        matches!(f, Frame::Data { stream_id, flags, .. } if stream_id == data1 && flags == FLAG_FIN)
    );
    let f = c.recv().await.unwrap();
    assert!(
        matches!(f, Frame::Data { stream_id, flags, ref data } if stream_id == err1 && flags == FLAG_FIN && data.is_empty())
    );

    // A new request on the same session, then the client goes away.
    let err2 = c
        .open(&[("streamtype", "error"), ("port", "80"), ("requestid", "2")])
        .await;
    let data2 = c
        .open(&[("streamtype", "data"), ("port", "80"), ("requestid", "2")])
        .await;
    assert!(err2 > data1 && data2 > err2);
    c.data(data2, b"x").await;
    c.send(Frame::GoAway {
        last_good_stream_id: 0,
        status: GOAWAY_OK,
    })
    .await;
    let rest = c.rest().await;
    assert_eq!(payload(&rest, data2), b"x");
    server_result(server).await;
}

#[tokio::test]
async fn spdy_portforward_bad_port_reports_on_error_stream() {
    let (mut c, server) = Client::portforward();
    let err = c
        .open(&[
            ("streamtype", "error"),
            ("port", "nope"),
            ("requestid", "0"),
        ])
        .await;
    let data = c
        .open(&[("streamtype", "data"), ("port", "nope"), ("requestid", "0")])
        .await;
    let mut msg = Vec::new();
    loop {
        match c.recv().await.unwrap() {
            Frame::Data {
                stream_id,
                flags,
                data: d,
            } if stream_id == err => {
                msg.extend_from_slice(&d);
                if flags & FLAG_FIN != 0 {
                    break;
                }
            }
            Frame::Data { stream_id, .. } if stream_id == data => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
    assert!(String::from_utf8_lossy(&msg).contains("invalid port"));
    // The client closing the connection ends the session.
    c.wr.shutdown().await.unwrap();
    server_result(server).await;
}

#[tokio::test]
async fn spdy_session_ends_when_client_closes() {
    let (mut c, server) = Client::portforward();
    c.ping(7).await;
    // SETTINGS and WINDOW_UPDATE are accepted silently.
    c.send(Frame::Settings {
        flags: 0,
        entries: vec![(0, super::frame::SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20)],
    })
    .await;
    c.send(Frame::WindowUpdate {
        stream_id: 0,
        delta: 1000,
    })
    .await;
    c.ping(9).await;
    c.wr.shutdown().await.unwrap();
    server_result(server).await;
    assert_eq!(c.rest().await, Vec::<Frame>::new());
}
