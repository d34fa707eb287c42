//! SPDY/3.1 server sessions for exec/attach (remotecommand) and port-forward, as kubectl's SPDY
//! transport (client-go over moby/spdystream) expects them from the kube-apiserver after
//! `101 Switching Protocols`.
//!
//! - [`frame`]: frame layouts and header blocks, compressed with one zlib stream per direction
//!   using the SPDY/3 dictionary ([`dictionary`]).
//! - [`session`]: the session loop: SYN_REPLY to every SYN_STREAM, PING echo, SETTINGS and
//!   WINDOW_UPDATE accepted, GOAWAY handling, and stream events to a handler.
//! - [`exec`]: the remotecommand channels with a `cat`-like process.
//! - [`portforward`]: data streams echoed back, error streams closed cleanly.
//!
//! A session ends when the client closes the connection or sends GOAWAY (`Ok(())`); an exec
//! session also ends on its own once the process exits, with GOAWAY from this side.

#[path = "../../../../src/proxy/spdy_dictionary.rs"]
mod dictionary;
mod exec;
mod frame;
mod portforward;
mod session;

#[cfg(test)]
mod kubectl_e2e;
#[cfg(test)]
mod tests;

use tokio::io::{AsyncRead, AsyncWrite};

/// Serves a remotecommand (exec/attach) SPDY session after the 101 upgrade.
///
/// `protocol` is the negotiated `X-Stream-Protocol-Version` (`v4.channel.k8s.io`,
/// `v3.channel.k8s.io`, `v2.channel.k8s.io` or `channel.k8s.io`). The process behaves like
/// `cat`: stdin is echoed to stdout, and it exits successfully when stdin ends.
pub async fn serve_exec<IO>(io: IO, protocol: &str) -> std::io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    session::run(io, exec::Exec::new(protocol)).await
}

/// Serves a port-forward SPDY session after the 101 upgrade: echoes every data stream back.
pub async fn serve_portforward<IO>(io: IO) -> std::io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    session::run(io, portforward::PortForward::new()).await
}
