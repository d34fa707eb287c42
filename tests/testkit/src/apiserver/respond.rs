//! How the stand-in answers: the response body type, `metav1.Status` error bodies in
//! kube-apiserver's shape, JSON/text responses, content negotiation (`as=Table`) and query-string
//! decoding.

use std::convert::Infallible;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use serde_json::{json, Value};

/// Every response body the stand-in produces.
pub(crate) type Body = BoxBody<Bytes, Infallible>;

/// Response extension marking a streaming (long-lived) response: the response delay configured
/// with `ApiServer::set_response_delay` is not applied to it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Streaming;

pub(crate) const JSON: &str = "application/json";
pub(crate) const TABLE_JSON: &str = "application/json;as=Table;v=v1;g=meta.k8s.io";

pub(crate) fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

pub(crate) fn empty() -> Body {
    full(Bytes::new())
}

/// A JSON response with `Content-Type: application/json`.
pub(crate) fn json(code: StatusCode, v: &Value) -> Response<Body> {
    json_as(code, v, JSON)
}

/// A JSON response with the given content type.
pub(crate) fn json_as(code: StatusCode, v: &Value, content_type: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(v.to_string()));
    *resp.status_mut() = code;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    resp
}

pub(crate) fn text(code: StatusCode, s: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(full(s));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// A `metav1.Status` failure body.
pub(crate) fn status_value(
    code: u16,
    reason: &str,
    message: &str,
    details: Option<Value>,
) -> Value {
    let mut v = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "code": code,
    });
    if !reason.is_empty() {
        v["reason"] = Value::String(reason.to_string());
    }
    if let Some(d) = details {
        v["details"] = d;
    }
    v
}

/// A `metav1.Status` failure response.
pub(crate) fn status(
    code: u16,
    reason: &str,
    message: &str,
    details: Option<Value>,
) -> Response<Body> {
    let sc = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json(sc, &status_value(code, reason, message, details))
}

/// `details` of a Status naming a resource kind (e.g. "pods") and an optional name.
pub(crate) fn details(group: &str, kind: &str, name: &str) -> Value {
    let mut d = serde_json::Map::new();
    if !name.is_empty() {
        d.insert("name".into(), Value::String(name.into()));
    }
    if !group.is_empty() {
        d.insert("group".into(), Value::String(group.into()));
    }
    if !kind.is_empty() {
        d.insert("kind".into(), Value::String(kind.into()));
    }
    Value::Object(d)
}

pub(crate) fn unauthorized() -> Response<Body> {
    status(401, "Unauthorized", "Unauthorized", None)
}

/// `pods "x" not found`.
pub(crate) fn not_found(kind: &str, name: &str) -> Response<Body> {
    status(
        404,
        "NotFound",
        &format!("{kind} \"{name}\" not found"),
        Some(details("", kind, name)),
    )
}

/// 404 for a path the server does not serve.
pub(crate) fn not_found_path() -> Response<Body> {
    status(
        404,
        "NotFound",
        "the server could not find the requested resource",
        Some(json!({})),
    )
}

pub(crate) fn already_exists(kind: &str, name: &str) -> Response<Body> {
    status(
        409,
        "AlreadyExists",
        &format!("{kind} \"{name}\" already exists"),
        Some(details("", kind, name)),
    )
}

pub(crate) fn bad_request(message: &str) -> Response<Body> {
    status(400, "BadRequest", message, None)
}

pub(crate) fn method_not_allowed() -> Response<Body> {
    status(
        405,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource",
        Some(json!({})),
    )
}

pub(crate) fn internal_error(message: &str) -> Response<Body> {
    status(500, "InternalError", message, None)
}

/// What the client asked for in `Accept`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Want {
    /// The plain object / list.
    Object,
    /// A `meta.k8s.io/v1` Table.
    Table(IncludeObject),
}

/// The `includeObject` query parameter of a Table request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IncludeObject {
    /// `PartialObjectMetadata` (the default).
    Metadata,
    /// The full object.
    Object,
}

/// Reads `Accept`: the first media range the stand-in can serve wins. Ranges naming a kind the
/// stand-in does not produce (`as=APIGroupDiscoveryList`, `as=PartialObjectMetadataList`, …) are
/// skipped, exactly as a server without them would.
pub(crate) fn negotiate(headers: &HeaderMap, query: &[(String, String)]) -> Want {
    let include = match query_get(query, "includeObject") {
        Some("Object") => IncludeObject::Object,
        _ => IncludeObject::Metadata,
    };
    for value in headers.get_all(header::ACCEPT) {
        let Ok(value) = value.to_str() else { continue };
        for range in value.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let mime = parts.next().unwrap_or("").to_ascii_lowercase();
            if !matches!(mime.as_str(), "application/json" | "application/*" | "*/*") {
                continue;
            }
            let mut as_kind = None;
            let mut group = None;
            let mut version = None;
            for p in parts {
                if let Some((k, v)) = p.split_once('=') {
                    match k.trim() {
                        "as" => as_kind = Some(v.trim().to_string()),
                        "g" => group = Some(v.trim().to_string()),
                        "v" => version = Some(v.trim().to_string()),
                        _ => {}
                    }
                }
            }
            match as_kind.as_deref() {
                None => return Want::Object,
                Some("Table")
                    if group.as_deref() == Some("meta.k8s.io")
                        && matches!(version.as_deref(), Some("v1" | "v1beta1")) =>
                {
                    return Want::Table(include)
                }
                _ => continue,
            }
        }
    }
    Want::Object
}

/// Decodes a query string (`application/x-www-form-urlencoded`) into pairs, in order.
pub(crate) fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    let Some(q) = query else { return Vec::new() };
    q.split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (form_decode(k), form_decode(v))
        })
        .collect()
}

fn form_decode(s: &str) -> String {
    let s = s.replace('+', " ");
    percent_encoding::percent_decode_str(&s)
        .decode_utf8_lossy()
        .into_owned()
}

/// The first value of a query parameter.
pub(crate) fn query_get<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Every value of a query parameter.
#[cfg(test)]
pub(crate) fn query_all<'a>(q: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    q.iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// A boolean query parameter the way apimachinery converts it: absent is false, "0" and
/// "false" (any case) are false, anything else is true.
pub(crate) fn query_bool(q: &[(String, String)], key: &str) -> bool {
    match query_get(q, key) {
        None => false,
        Some(v) => !(v == "0" || v.eq_ignore_ascii_case("false")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn kubectl_table_accept_wants_table() {
        let h = accept("application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json");
        assert_eq!(negotiate(&h, &[]), Want::Table(IncludeObject::Metadata));
        let q = query_pairs(Some("includeObject=Object"));
        assert_eq!(negotiate(&h, &q), Want::Table(IncludeObject::Object));
    }

    #[test]
    fn aggregated_discovery_falls_back_to_plain_json() {
        let h = accept("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json");
        assert_eq!(negotiate(&h, &[]), Want::Object);
        assert_eq!(negotiate(&HeaderMap::new(), &[]), Want::Object);
    }

    #[test]
    fn query_decoding() {
        let q = query_pairs(Some("command=echo&command=a+b%21&watch=1&x"));
        assert_eq!(query_all(&q, "command"), vec!["echo", "a b!"]);
        assert!(query_bool(&q, "watch"));
        assert!(query_bool(&q, "x"));
        assert!(!query_bool(&q, "missing"));
        let q = query_pairs(Some("watch=false&stdin=0"));
        assert!(!query_bool(&q, "watch"));
        assert!(!query_bool(&q, "stdin"));
    }

    #[test]
    fn status_shape() {
        let v = status_value(
            404,
            "NotFound",
            "pods \"x\" not found",
            Some(details("", "pods", "x")),
        );
        assert_eq!(v["kind"], "Status");
        assert_eq!(v["status"], "Failure");
        assert_eq!(v["code"], 404);
        assert_eq!(v["details"], json!({"name": "x", "kind": "pods"}));
    }
}
