//! Header hygiene and impersonation: what the client sent is cleaned *before* the gateway adds
//! the identity headers, so no client value can survive or be mistaken for the gateway's.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::authn::Identity;

/// Hop-by-hop headers (RFC 9110 section 7.6.1 and the historical ones proxies drop).
/// Names made once: removing by a `&str` parses the name again on every request.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Header names the gateway writes on every request, made once (a `&str` name is parsed again
/// on every insert).
pub static AUDIT_ID: HeaderName = HeaderName::from_static("audit-id");
static IMPERSONATE_USER: HeaderName = HeaderName::from_static("impersonate-user");
static IMPERSONATE_GROUP: HeaderName = HeaderName::from_static("impersonate-group");
static IMPERSONATE_UID: HeaderName = HeaderName::from_static("impersonate-uid");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Is this header one a client must never get through to kube-apiserver?
fn is_identity_header(name: &str) -> bool {
    // HeaderName is always lower-case, so prefix checks are case-insensitive by construction.
    name == "authorization"
        || name.starts_with("impersonate-")
        || name.starts_with("x-remote-")
        || name.starts_with("x-forwarded-")
        || name == "forwarded"
        || name == "x-real-ip"
        || name == "host"
        // Every name with an underscore, as nginx does (`underscores_in_headers off`): a hop
        // that maps `_` to `-` (CGI, WSGI, some proxies) would read `Impersonate_User` as
        // `Impersonate-User`, and no header kube-apiserver or kubectl uses has one.
        || name.contains('_')
}

/// `Sec-WebSocket-Protocol`, where a WebSocket client that cannot set `Authorization` (a
/// browser) puts its bearer token.
static SEC_WEBSOCKET_PROTOCOL: HeaderName = HeaderName::from_static("sec-websocket-protocol");

/// The subprotocol prefix kube-apiserver reads a bearer token from
/// (`base64url.bearer.authorization.k8s.io.<base64url token>`).
const BEARER_SUBPROTOCOL: &[u8] = b"base64url.bearer.authorization.k8s.io.";

/// Is this `Sec-WebSocket-Protocol` entry a bearer token? kube-apiserver takes an entry as one
/// when, trimmed of white space (Go's `strings.TrimSpace`, which includes non-ASCII spaces), it
/// starts with [`BEARER_SUBPROTOCOL`]. This matches the prefix anywhere in the entry and in any
/// case, so no difference in what counts as white space lets a token through.
fn is_bearer_subprotocol(entry: &[u8]) -> bool {
    entry
        .windows(BEARER_SUBPROTOCOL.len())
        .any(|w| w.eq_ignore_ascii_case(BEARER_SUBPROTOCOL))
}

/// Removes bearer-token entries from `Sec-WebSocket-Protocol`, keeping the other subprotocols
/// in the client's order (one header, entries joined by `, `), or dropping the header when none
/// is left. kube-apiserver would authenticate from such an entry, and a token the gateway did
/// not verify must never reach it; the header is left as sent when it carries none.
fn remove_bearer_subprotocols(headers: &mut HeaderMap) {
    let carries_token = headers.get_all(&SEC_WEBSOCKET_PROTOCOL).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(is_bearer_subprotocol)
    });
    if !carries_token {
        return;
    }
    let kept: Vec<Vec<u8>> = headers
        .get_all(&SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter(|e| !is_bearer_subprotocol(e))
        .map(|e| e.trim_ascii().to_vec())
        .filter(|e| !e.is_empty())
        .collect();
    headers.remove(&SEC_WEBSOCKET_PROTOCOL);
    if kept.is_empty() {
        return;
    }
    // Made of parts of valid header values joined by `, `: itself a valid header value.
    if let Ok(v) = HeaderValue::from_bytes(&kept.join(&b", "[..])) {
        headers.insert(SEC_WEBSOCKET_PROTOCOL.clone(), v);
    }
}

/// Removes the headers named in `Connection`, then the hop-by-hop headers themselves.
/// `Content-Length` is never removed that way: it frames the message, and the gateway's body
/// limit and retry decisions read it after this.
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| n != header::CONTENT_LENGTH)
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    // One look at each name present (usually none is hop-by-hop) instead of a hashed removal
    // per hop-by-hop name.
    if headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        for h in &HOP_BY_HOP {
            headers.remove(h);
        }
    }
}

/// The `X-Forwarded-For` value for a client address. The last value made on this thread is
/// kept and shared (most requests come from the address before them), so it is not formatted
/// per request.
pub fn forwarded_for(ip: std::net::IpAddr) -> HeaderValue {
    use std::cell::RefCell;
    thread_local! {
        static LAST: RefCell<Option<(std::net::IpAddr, HeaderValue)>> = const { RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((at, value)) if *at == ip => value.clone(),
            _ => {
                let value =
                    HeaderValue::from_str(&ip.to_string()).expect("an IP is a header value");
                *last = Some((ip, value.clone()));
                value
            }
        }
    })
}

/// Removes hop-by-hop headers, every header named in `Connection`, every identity-bearing
/// header (and every name with an underscore), and bearer tokens among the WebSocket
/// subprotocols. Must run before the gateway adds its own headers.
pub fn sanitize_request_headers(headers: &mut HeaderMap) {
    remove_hop_by_hop(headers);
    remove_bearer_subprotocols(headers);
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| is_identity_header(k.as_str()))
        .cloned()
        .collect();
    for n in doomed {
        headers.remove(n);
    }
}

/// Removes hop-by-hop headers (and those named in `Connection`) from a response.
pub fn sanitize_response_headers(headers: &mut HeaderMap) {
    remove_hop_by_hop(headers);
}

/// Error when an identity cannot be written as headers (it is refused, never a 500).
#[derive(Debug, thiserror::Error)]
#[error("identity field {0} cannot be written as a header value")]
pub struct UnencodableIdentity(pub &'static str);

/// Adds the impersonation headers for `identity` (made once per identity, then shared).
pub fn set_impersonation(
    headers: &mut HeaderMap,
    identity: &Identity,
) -> Result<(), UnencodableIdentity> {
    let made = identity
        .impersonation_headers(impersonation_headers)
        .map_err(UnencodableIdentity)?;
    for (name, value) in made.iter() {
        if name == IMPERSONATE_USER || name == IMPERSONATE_UID {
            headers.insert(name.clone(), value.clone());
        } else {
            headers.append(name.clone(), value.clone());
        }
    }
    Ok(())
}

/// The impersonation headers for `identity`, in order: user, groups, uid, extras.
fn impersonation_headers(identity: &Identity) -> Result<crate::authn::HeaderList, &'static str> {
    let value = |s: &str, what| HeaderValue::from_str(s).map_err(|_| what);
    let mut out = Vec::with_capacity(2 + identity.groups().len() + identity.extra().len());
    out.push((IMPERSONATE_USER.clone(), value(identity.user(), "user")?));
    for g in identity.groups() {
        out.push((IMPERSONATE_GROUP.clone(), value(g, "group")?));
    }
    if let Some(uid) = identity.uid() {
        out.push((IMPERSONATE_UID.clone(), value(uid, "uid")?));
    }
    for (k, vs) in identity.extra() {
        let name = HeaderName::from_bytes(
            format!("impersonate-extra-{}", crate::authz::encode_extra_key(k)).as_bytes(),
        )
        .map_err(|_| "extra key")?;
        for v in vs {
            out.push((name.clone(), value(v, "extra value")?));
        }
    }
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_each_clients_own_address() {
        let ips: Vec<std::net::IpAddr> = [
            "10.0.0.1",
            "10.0.0.1",
            "2001:db8::7",
            "10.0.0.2",
            "10.0.0.1",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        for ip in &ips {
            assert_eq!(forwarded_for(*ip), ip.to_string().as_str());
        }
        std::thread::spawn(move || {
            for ip in ips.iter().rev() {
                assert_eq!(forwarded_for(*ip), ip.to_string().as_str());
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn strips_every_identity_and_hop_by_hop_header_in_any_case() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("Authorization", "Bearer x"),
            ("Impersonate-User", "admin"),
            ("impersonate-group", "system:masters"),
            ("IMPERSONATE-UID", "1"),
            ("Impersonate-Extra-Scopes", "all"),
            ("X-Remote-User", "admin"),
            ("X-Remote-Group", "system:masters"),
            ("X-Forwarded-For", "1.2.3.4"),
            ("Transfer-Encoding", "chunked"),
            ("Connection", "keep-alive, X-Custom"),
            ("X-Custom", "1"),
            ("Accept", "application/json"),
        ] {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        sanitize_request_headers(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["accept"]);
    }

    #[test]
    fn every_header_name_with_an_underscore_is_dropped() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("Impersonate_User", "admin"),
            ("X_Remote_Group", "system:masters"),
            ("x_forwarded_for", "6.6.6.6"),
            ("_", "1"),
            ("X_Custom", "1"),
            ("X-Custom", "kept"),
        ] {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        sanitize_request_headers(&mut h);
        let left: Vec<(&str, &str)> = h
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(left, [("x-custom", "kept")]);
    }

    #[test]
    fn bearer_subprotocols_are_removed_and_the_others_kept_in_order() {
        let token = "base64url.bearer.authorization.k8s.io.c2VjcmV0";
        let cases: &[(&[&str], Option<&str>)] = &[
            (
                &["v5.channel.k8s.io, v4.channel.k8s.io"],
                Some("v5.channel.k8s.io, v4.channel.k8s.io"),
            ),
            (
                &[&format!("{token}, v5.channel.k8s.io,v4.channel.k8s.io")],
                Some("v5.channel.k8s.io, v4.channel.k8s.io"),
            ),
            (
                &[&format!("v5.channel.k8s.io,{token}"), "v4.channel.k8s.io"],
                Some("v5.channel.k8s.io, v4.channel.k8s.io"),
            ),
            (&[token], None),
            (&[&format!(" {token} ,")], None),
            (
                &[&token.to_uppercase(), "v4.channel.k8s.io"],
                Some("v4.channel.k8s.io"),
            ),
            // What Go's TrimSpace would trim (here U+00A0) does not hide one.
            (
                &[&format!("\u{a0}{token}, v4.channel.k8s.io")],
                Some("v4.channel.k8s.io"),
            ),
            (
                &[&format!("x{token}, v4.channel.k8s.io")],
                Some("v4.channel.k8s.io"),
            ),
        ];
        for (values, want) in cases {
            let mut h = HeaderMap::new();
            for v in *values {
                h.append(
                    "sec-websocket-protocol",
                    HeaderValue::from_bytes(v.as_bytes()).unwrap(),
                );
            }
            sanitize_request_headers(&mut h);
            let got: Vec<&[u8]> = h
                .get_all("sec-websocket-protocol")
                .iter()
                .map(|v| v.as_bytes())
                .collect();
            match want {
                Some(w) => assert_eq!(got, [w.as_bytes()], "{values:?}"),
                None => assert!(got.is_empty(), "{values:?}: {got:?}"),
            }
        }
    }

    #[test]
    fn extra_keys_round_trip_like_client_go() {
        for (key, want) in [
            ("scopes", "scopes"),
            ("example.org/team", "example.org%2Fteam"),
            ("a b%c", "a%20b%25c"),
            ("ünï", "%C3%BCn%C3%AF"),
        ] {
            assert_eq!(crate::authz::encode_extra_key(key), want);
            assert_eq!(crate::authz::decode_extra_key(want).unwrap(), key);
        }
    }

    #[test]
    fn connection_cannot_name_away_the_content_length() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("content-length, x-a"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        h.insert("x-a", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.get(header::CONTENT_LENGTH).unwrap(), "12");
        assert!(h.get("x-a").is_none());
        assert!(h.get(header::CONNECTION).is_none());
    }
}
