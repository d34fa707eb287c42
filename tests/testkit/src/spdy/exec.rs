//! exec/attach over SPDY (the remotecommand protocols `v4.channel.k8s.io`, `v3.channel.k8s.io`,
//! `v2.channel.k8s.io` and `channel.k8s.io`; `v5.channel.k8s.io` is treated as v4), with a
//! container process that behaves like `cat`.
//!
//! The client opens one stream per channel, each carrying a `streamtype` header: `error`,
//! `stdin`, `stdout`, `stderr`, and `resize` with a TTY (v3+). It creates them one after the
//! other, waiting for each SYN_REPLY, and only then starts copying, in the order error, stdin,
//! stdout, stderr, resize.
//!
//! The "process" echoes every stdin byte to stdout. It exits when stdin is half-closed (or reset,
//! or, with a TTY, when it reads Ctrl-D), or shortly after the output streams exist when there is
//! no stdin stream at all. On exit: stdout and stderr are half-closed first (client-go waits for
//! both to reach EOF before it looks at the outcome), then the outcome goes on the error stream
//! and the error stream is half-closed, then the session is ended with GOAWAY.
//!
//! The outcome: with v4 a JSON `metav1.Status` (`{"metadata":{},"status":"Success"}`, which is
//! what the kubelet marshals); with v1-v3 success is an error stream closed without any data.

use std::time::Duration;

use tokio::time::Instant;

use super::frame::{header, Headers};
use super::session::{Handler, Out};

/// The v4 success status, as `json.Marshal(metav1.Status{Status: "Success"})` renders it.
pub(crate) const V4_SUCCESS: &[u8] = br#"{"metadata":{},"status":"Success"}"#;

/// With no stdin stream, how long to wait after the last output stream appeared (for stderr or
/// resize still being created) before the process "exits".
const NO_STDIN_GRACE: Duration = Duration::from_millis(200);

/// Ctrl-D: end of input on a terminal.
const EOT: u8 = 0x04;

pub(crate) struct Exec {
    v4: bool,
    error: Option<u32>,
    stdin: Option<u32>,
    stdout: Option<u32>,
    stderr: Option<u32>,
    resize: Option<u32>,
    /// Streams of unknown type, closed on exit too.
    others: Vec<u32>,
    /// stdin bytes read before a stdout stream existed.
    pending: Vec<u8>,
    no_stdin_deadline: Option<Instant>,
    exited: bool,
}

impl Exec {
    pub(crate) fn new(protocol: &str) -> Self {
        Self {
            // v5 (offered by kubectl 1.30+ even over SPDY) reports the outcome as v4 does.
            v4: ["v4.channel.k8s.io", "v5.channel.k8s.io"]
                .iter()
                .any(|p| protocol.trim().eq_ignore_ascii_case(p)),
            error: None,
            stdin: None,
            stdout: None,
            stderr: None,
            resize: None,
            others: Vec::new(),
            pending: Vec::new(),
            no_stdin_deadline: None,
            exited: false,
        }
    }

    fn tty(&self) -> bool {
        self.resize.is_some()
    }

    fn write_stdout(&mut self, out: &mut Out, data: &[u8]) {
        match self.stdout {
            Some(id) => out.data(id, data),
            None => self.pending.extend_from_slice(data),
        }
    }

    fn exit(&mut self, out: &mut Out) {
        if self.exited {
            return;
        }
        self.exited = true;
        self.no_stdin_deadline = None;
        // Output first, to its end...
        for id in [self.stdout, self.stderr].into_iter().flatten() {
            out.fin(id);
        }
        // ...then the outcome, which is what the client returns once output is complete.
        if let Some(id) = self.error {
            if self.v4 {
                out.data(id, V4_SUCCESS);
            }
            out.fin(id);
        }
        for id in [self.stdin, self.resize]
            .into_iter()
            .flatten()
            .chain(self.others.iter().copied())
        {
            out.fin(id);
        }
        out.close_session();
    }
}

impl Handler for Exec {
    fn stream_opened(&mut self, out: &mut Out, id: u32, headers: &Headers) {
        let kind = header(headers, "streamtype").unwrap_or("");
        let slot = match kind.to_ascii_lowercase().as_str() {
            "error" => &mut self.error,
            "stdin" => &mut self.stdin,
            "stdout" => &mut self.stdout,
            "stderr" => &mut self.stderr,
            "resize" => &mut self.resize,
            _ => {
                self.others.push(id);
                return;
            }
        };
        if slot.is_some() {
            // A second stream of one type: keep the first, and close this one with the rest.
            self.others.push(id);
            return;
        }
        *slot = Some(id);
        if self.exited {
            out.fin(id);
            return;
        }
        if self.stdout == Some(id) && !self.pending.is_empty() {
            let pending = std::mem::take(&mut self.pending);
            out.data(id, &pending);
        }
        // stdin is created before stdout and stderr: once an output stream exists without a
        // stdin stream, there is no stdin and the process runs to its end at once.
        if self.stdin.is_none() && (self.stdout.is_some() || self.stderr.is_some()) {
            self.no_stdin_deadline = Some(Instant::now() + NO_STDIN_GRACE);
        }
    }

    fn data(&mut self, out: &mut Out, id: u32, data: &[u8]) {
        if self.exited || Some(id) != self.stdin {
            // resize carries JSON terminal sizes; nothing else carries input.
            return;
        }
        if self.tty() {
            if let Some(pos) = data.iter().position(|&b| b == EOT) {
                self.write_stdout(out, &data[..pos]);
                self.exit(out);
                return;
            }
        }
        self.write_stdout(out, data);
    }

    fn remote_fin(&mut self, out: &mut Out, id: u32) {
        if Some(id) == self.stdin {
            self.exit(out);
        }
    }

    fn reset(&mut self, out: &mut Out, id: u32) {
        if Some(id) == self.stdin {
            self.exit(out);
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.no_stdin_deadline
    }

    fn on_deadline(&mut self, out: &mut Out) {
        self.no_stdin_deadline = None;
        if self.stdin.is_none() {
            self.exit(out);
        }
    }
}
