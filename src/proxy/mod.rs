//! Forwarding to kube-apiserver: header hygiene, impersonation, streaming bodies, upgrades.
//!
//! This module only forwards what `authz` has authorized (it takes an [`Authorized`]), and must
//! never pass a client's identity headers through, never pool a connection whose upgrade failed,
//! and never buffer a streaming response.

pub mod forward;
pub mod frames;
pub mod headers;
pub mod path;
pub mod spdy_dictionary;
pub mod upgrade;

pub use forward::{Upstream, UpstreamError};

/// What kind of request this is, for timeouts and stream tracking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestShape {
    /// An ordinary request: subject to the request timeout.
    Unary,
    /// A long-lived response (watch, logs -f): no request timeout, registered as a stream.
    Streaming(crate::streams::StreamKind),
    /// An HTTP/1.1 upgrade (exec, attach, port-forward over WebSocket or SPDY).
    Upgrade(crate::streams::StreamKind),
}

fn query_flag(query: Option<&str>, key: &str) -> bool {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .any(|(k, v)| k == key && (v == "true" || v == "1"))
}

/// Classifies a request from its method, path, query and upgrade headers.
pub fn shape_of(req: &http::Request<impl Sized>) -> RequestShape {
    use crate::streams::StreamKind;
    let path = req.uri().path();
    let query = req.uri().query();
    let last = path.trim_end_matches('/').rsplit('/').next().unwrap_or("");
    if req.version() <= http::Version::HTTP_11 && req.headers().contains_key(http::header::UPGRADE)
    {
        let connection_upgrade = req
            .headers()
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        if connection_upgrade {
            let kind = match last {
                "exec" => StreamKind::Exec,
                "attach" => StreamKind::Attach,
                "portforward" => StreamKind::PortForward,
                _ => StreamKind::Upgrade,
            };
            return RequestShape::Upgrade(kind);
        }
    }
    if query_flag(query, "watch")
        || path.starts_with("/api/v1/watch/")
        || path
            .strip_prefix("/apis/")
            .and_then(|rest| rest.splitn(3, '/').nth(2))
            .is_some_and(|rest| rest.starts_with("watch/"))
    {
        return RequestShape::Streaming(StreamKind::Watch);
    }
    if last == "log" && query_flag(query, "follow") {
        return RequestShape::Streaming(StreamKind::Logs);
    }
    RequestShape::Unary
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::streams::StreamKind;

    fn shape(uri: &str, upgrade: bool) -> RequestShape {
        let mut b = http::Request::builder().uri(uri);
        if upgrade {
            b = b
                .header("connection", "Upgrade")
                .header("upgrade", "websocket");
        }
        shape_of(&b.body(()).unwrap())
    }

    #[test]
    fn classifies_streams() {
        assert_eq!(
            shape("/api/v1/namespaces/a/pods", false),
            RequestShape::Unary
        );
        assert_eq!(
            shape("/api/v1/namespaces/a/pods?watch=1&resourceVersion=5", false),
            RequestShape::Streaming(StreamKind::Watch)
        );
        assert_eq!(
            shape("/api/v1/watch/namespaces/a/pods", false),
            RequestShape::Streaming(StreamKind::Watch)
        );
        assert_eq!(
            shape("/apis/apps/v1/watch/deployments", false),
            RequestShape::Streaming(StreamKind::Watch)
        );
        assert_eq!(
            shape("/api/v1/namespaces/a/pods/p/log?follow=true", false),
            RequestShape::Streaming(StreamKind::Logs)
        );
        assert_eq!(
            shape("/api/v1/namespaces/a/pods/p/log", false),
            RequestShape::Unary
        );
        assert_eq!(
            shape("/api/v1/namespaces/a/pods/p/exec?command=cat", true),
            RequestShape::Upgrade(StreamKind::Exec)
        );
        assert_eq!(
            shape("/api/v1/namespaces/a/pods/p/portforward", true),
            RequestShape::Upgrade(StreamKind::PortForward)
        );
        assert_eq!(
            shape("/api/v1/namespaces/a/pods?watch=false", false),
            RequestShape::Unary
        );
    }
}
