//! Just enough of Kubernetes' protobuf encoding to read a `SelfSubjectAccessReview`, which
//! kubectl (`auth can-i`) sends as `application/vnd.kubernetes.protobuf`.
//!
//! Layout (k8s.io/apimachinery runtime/serializer/protobuf): the magic `k8s\0`, then a
//! `runtime.Unknown` {1: typeMeta {1: apiVersion, 2: kind}, 2: raw, 3: contentEncoding,
//! 4: contentType}; `raw` is the object: {1: metadata, 2: spec, 3: status}. The spec is
//! {1: resourceAttributes {1 namespace, 2 verb, 3 group, 4 version, 5 resource, 6 subresource,
//! 7 name}, 2: nonResourceAttributes {1 path, 2 verb}}.

use serde_json::{json, Map, Value};

const MAGIC: &[u8] = b"k8s\0";

/// One protobuf field: (number, payload) for length-delimited fields; other wire types skipped.
fn fields(mut buf: &[u8]) -> Option<Vec<(u64, &[u8])>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let (key, rest) = varint(buf)?;
        buf = rest;
        let (num, wire) = (key >> 3, key & 7);
        match wire {
            0 => buf = varint(buf)?.1,
            1 => buf = buf.get(8..)?,
            2 => {
                let (len, rest) = varint(buf)?;
                let len = usize::try_from(len).ok()?;
                out.push((num, rest.get(..len)?));
                buf = rest.get(len..)?;
            }
            5 => buf = buf.get(4..)?,
            _ => return None,
        }
    }
    Some(out)
}

fn varint(buf: &[u8]) -> Option<(u64, &[u8])> {
    let mut v = 0u64;
    for (i, b) in buf.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, &buf[i + 1..]));
        }
    }
    None
}

fn strings(msg: &[u8], names: &[(u64, &str)]) -> Option<Map<String, Value>> {
    let mut m = Map::new();
    for (num, payload) in fields(msg)? {
        if let Some((_, name)) = names.iter().find(|(n, _)| *n == num) {
            m.insert(
                (*name).into(),
                Value::from(std::str::from_utf8(payload).ok()?),
            );
        }
    }
    Some(m)
}

/// Decodes a protobuf `SelfSubjectAccessReview` into its JSON form (apiVersion, kind, spec).
pub fn self_subject_access_review(body: &[u8]) -> Option<Value> {
    let unknown = fields(body.strip_prefix(MAGIC)?)?;
    let mut api_version = String::new();
    let mut kind = String::new();
    let mut raw: &[u8] = &[];
    for (num, payload) in unknown {
        match num {
            1 => {
                let tm = strings(payload, &[(1, "apiVersion"), (2, "kind")])?;
                api_version = tm
                    .get("apiVersion")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .into();
                kind = tm
                    .get("kind")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .into();
            }
            2 => raw = payload,
            _ => {}
        }
    }
    if kind != "SelfSubjectAccessReview" {
        return None;
    }
    let mut spec = Map::new();
    for (num, payload) in fields(raw)? {
        if num != 2 {
            continue;
        }
        for (snum, sp) in fields(payload)? {
            match snum {
                1 => {
                    let ra = strings(
                        sp,
                        &[
                            (1, "namespace"),
                            (2, "verb"),
                            (3, "group"),
                            (4, "version"),
                            (5, "resource"),
                            (6, "subresource"),
                            (7, "name"),
                        ],
                    )?;
                    spec.insert("resourceAttributes".into(), Value::Object(ra));
                }
                2 => {
                    let nra = strings(sp, &[(1, "path"), (2, "verb")])?;
                    spec.insert("nonResourceAttributes".into(), Value::Object(nra));
                }
                _ => {}
            }
        }
    }
    Some(json!({"apiVersion": api_version, "kind": kind, "metadata": {}, "spec": spec}))
}

/// `spec.namespace` of a protobuf SelfSubjectRulesReview (k8s.io/apimachinery's envelope:
/// `k8s\0`, then a `runtime.Unknown` {1: typeMeta {1: apiVersion, 2: kind}, 2: raw}, where
/// `raw` is the object {1: metadata, 2: spec {1: namespace}, 3: status}). None when it is not
/// one.
pub fn self_subject_rules_review_namespace(body: &[u8]) -> Option<String> {
    let mut kind = "";
    let mut raw: &[u8] = &[];
    for (num, payload) in fields(body.strip_prefix(MAGIC)?)? {
        match num {
            1 => {
                for (n, p) in fields(payload)? {
                    if n == 2 {
                        kind = std::str::from_utf8(p).ok()?;
                    }
                }
            }
            2 => raw = payload,
            _ => {}
        }
    }
    if kind != "SelfSubjectRulesReview" {
        return None;
    }
    let mut namespace = String::new();
    for (num, spec) in fields(raw)? {
        if num == 2 {
            for (n, p) in fields(spec)? {
                if n == 1 {
                    namespace = std::str::from_utf8(p).ok()?.to_owned();
                }
            }
        }
    }
    Some(namespace)
}

/// The largest self-review body read (a review is a few hundred bytes).
const MAX_REVIEW_BYTES: usize = 64 * 1024;

/// Reads a self-review request: its head, its body (at most 64 KiB) and whether the body is
/// protobuf (kubectl's choice) rather than JSON.
pub async fn read_review(
    req: http::Request<hyper::body::Incoming>,
) -> Result<(http::request::Parts, bytes::Bytes, bool), crate::body::TooLarge> {
    use http_body_util::BodyExt;
    let (parts, body) = req.into_parts();
    let bytes = http_body_util::Limited::new(body, MAX_REVIEW_BYTES)
        .collect()
        .await
        .map_err(|_| crate::body::TooLarge {
            limit: MAX_REVIEW_BYTES as u64,
        })?
        .to_bytes();
    let is_protobuf = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/vnd.kubernetes.protobuf"));
    Ok((parts, bytes, is_protobuf))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ld(num: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![((num << 3) | 2) as u8, payload.len() as u8];
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn decodes_kubectl_can_i() {
        let ra = [ld(1, b"team-a"), ld(2, b"delete"), ld(5, b"pods")].concat();
        let spec = ld(1, &ra);
        let obj = [ld(1, b""), ld(2, &spec)].concat();
        let tm = [
            ld(1, b"authorization.k8s.io/v1"),
            ld(2, b"SelfSubjectAccessReview"),
        ]
        .concat();
        let body = [MAGIC.to_vec(), ld(1, &tm), ld(2, &obj)].concat();
        let v = self_subject_access_review(&body).unwrap();
        assert_eq!(v["apiVersion"], "authorization.k8s.io/v1");
        assert_eq!(v["spec"]["resourceAttributes"]["verb"], "delete");
        assert_eq!(v["spec"]["resourceAttributes"]["namespace"], "team-a");
        assert_eq!(v["spec"]["resourceAttributes"]["resource"], "pods");
    }

    #[test]
    fn refuses_other_kinds_and_garbage() {
        assert!(self_subject_access_review(b"{}").is_none());
        assert!(self_subject_access_review(b"k8s\0\xff\xff").is_none());
        let tm = [ld(1, b"v1"), ld(2, b"Secret")].concat();
        let body = [MAGIC.to_vec(), ld(1, &tm)].concat();
        assert!(self_subject_access_review(&body).is_none());
    }
}
