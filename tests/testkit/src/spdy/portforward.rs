//! port-forward over SPDY (`portforward.k8s.io`), with every forwarded port an echo server.
//!
//! For each forwarded connection client-go opens two streams carrying the same `port` and
//! `requestid` headers: first `streamtype: error` (which it half-closes at once: it never writes
//! to it), then `streamtype: data`. Everything read on the data stream is written back on it.
//! When the client half-closes the data stream, this side half-closes it too, then half-closes
//! the error stream without writing to it: client-go waits for EOF on the error stream (an
//! empty read means no error) before it finishes the connection, as the kubelet does by closing
//! both streams once forwarding ends. The error stream only carries text when something fails
//! (here: a data stream without a usable `port` header).

use std::collections::HashMap;

use super::frame::{header, Headers};
use super::session::{Handler, Out};

#[derive(Debug)]
enum Kind {
    Error,
    Data,
    Other,
}

#[derive(Default)]
pub(crate) struct PortForward {
    kinds: HashMap<u32, (Kind, String)>,
    /// Error stream of each request id.
    error_streams: HashMap<String, u32>,
}

impl PortForward {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn finish_request(&mut self, out: &mut Out, data_id: u32) {
        let Some((_, request)) = self.kinds.remove(&data_id) else {
            return;
        };
        out.fin(data_id);
        if let Some(error_id) = self.error_streams.remove(&request) {
            out.fin(error_id);
            self.kinds.remove(&error_id);
        }
    }
}

fn request_key(headers: &Headers) -> String {
    // Clients older than the `requestID` header (Kubernetes < 1.6) pair streams by port.
    match header(headers, "requestid") {
        Some(id) => format!("id:{id}"),
        None => format!("port:{}", header(headers, "port").unwrap_or("")),
    }
}

impl Handler for PortForward {
    fn stream_opened(&mut self, out: &mut Out, id: u32, headers: &Headers) {
        let key = request_key(headers);
        let kind = match header(headers, "streamtype") {
            Some(t) if t.eq_ignore_ascii_case("error") => Kind::Error,
            Some(t) if t.eq_ignore_ascii_case("data") => Kind::Data,
            _ => Kind::Other,
        };
        match kind {
            Kind::Error => {
                self.error_streams.insert(key.clone(), id);
            }
            Kind::Data => {
                let port_ok = header(headers, "port")
                    .and_then(|p| p.trim().parse::<u16>().ok())
                    .is_some_and(|p| p > 0);
                if !port_ok {
                    if let Some(&error_id) = self.error_streams.get(&key) {
                        let msg = format!(
                            "invalid port {:?} in data stream for request {key}",
                            header(headers, "port").unwrap_or("")
                        );
                        out.data(error_id, msg.as_bytes());
                    }
                    self.kinds.insert(id, (Kind::Data, key));
                    self.finish_request(out, id);
                    return;
                }
            }
            Kind::Other => {
                // Unknown stream type: nothing will use it; close our half.
                out.fin(id);
            }
        }
        self.kinds.insert(id, (kind, key));
    }

    fn data(&mut self, out: &mut Out, id: u32, data: &[u8]) {
        if matches!(self.kinds.get(&id), Some((Kind::Data, _))) {
            out.data(id, data);
        }
    }

    fn remote_fin(&mut self, out: &mut Out, id: u32) {
        if matches!(self.kinds.get(&id), Some((Kind::Data, _))) {
            self.finish_request(out, id);
        }
    }

    fn reset(&mut self, out: &mut Out, id: u32) {
        match self.kinds.get(&id) {
            Some((Kind::Data, _)) => self.finish_request(out, id),
            Some((Kind::Error, key)) => {
                let key = key.clone();
                self.error_streams.remove(&key);
                self.kinds.remove(&id);
            }
            _ => {
                self.kinds.remove(&id);
            }
        }
    }
}
