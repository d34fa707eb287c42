//! `audit.k8s.io/v1` `Event`, serialized the way kube-apiserver writes it.
//!
//! Field names, field order and `omitempty` behaviour follow
//! k8s.io/apiserver `pkg/apis/audit/v1/types.go`: `level`, `auditID`, `stage`, `requestURI`,
//! `verb`, `user`, `requestReceivedTimestamp` and `stageTimestamp` are always written; every other
//! field is left out when empty. Timestamps are `metav1.MicroTime`: RFC 3339 in UTC with exactly
//! six fractional digits (`2026-11-26T15:04:05.123456Z`).
//!
//! One writer makes the JSON of every event: [`EventParts::write_stages`] on the request path,
//! [`Event::write_json`] for an event built ahead (a stream's completion, written when the stream
//! ends); both write an `EventView`. The types here are read with serde (events written by
//! kube-apiserver, tests) but never written with it.
//!
//! There is deliberately no field for headers, request bodies or response bodies: the gateway
//! never records them (see [`super::policy`], which refuses the `Request` and `RequestResponse`
//! levels), so a bearer token has nowhere to land. The request URI is the one place a client could
//! put a secret; [`redact_request_uri`] removes `access_token` and `token` query parameters.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::SystemTime;

use bytes::Bytes;
use http::{Method, Uri};
use serde::{Deserialize, Serialize};

use crate::authn::Identity;
use crate::authz::requestinfo::RequestInfo;
pub use crate::util::time::MicroTime;

/// `apiVersion` of audit events and policies.
pub const API_VERSION: &str = "audit.k8s.io/v1";

/// The header kube-apiserver reads an audit ID from (and echoes on its response). The gateway
/// sends its own audit ID upstream under this name, so both audit logs carry the same ID.
pub const AUDIT_ID_HEADER: &str = "Audit-ID";

/// `allow`, `deny` or `error`: what the gateway decided.
pub const ANNOTATION_DECISION: &str = "ztgate.dev/decision";
/// Why: the policy's reason, the authentication failure, the upstream error.
pub const ANNOTATION_REASON: &str = "ztgate.dev/reason";
/// Which policy (id or file) decided.
pub const ANNOTATION_POLICY: &str = "ztgate.dev/policy";
/// How the caller authenticated (`x509`, `oidc`, ...).
pub const ANNOTATION_AUTHN_METHOD: &str = "ztgate.dev/authn-method";
/// The device id from the device certificate.
pub const ANNOTATION_DEVICE_ID: &str = "ztgate.dev/device-id";
/// A short posture summary (e.g. `fresh`, `stale`, `missing`, `failed:disk_encrypted`).
pub const ANNOTATION_POSTURE: &str = "ztgate.dev/posture";
/// Why a long-lived stream was closed by the gateway (token expired, posture, policy, lock).
pub const ANNOTATION_STREAM_CLOSED: &str = "ztgate.dev/stream-closed";

/// Values of [`ANNOTATION_DECISION`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
    Error,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::Error => "error",
        }
    }
}

/// How much of a request is recorded (`audit.k8s.io/v1` `Level`).
///
/// The gateway only ever records `Metadata`; `Request` and `RequestResponse` exist so that events
/// written by kube-apiserver can be read, and so the policy loader can name them when it refuses
/// them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Level {
    None,
    Metadata,
    Request,
    RequestResponse,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::None => "None",
            Level::Metadata => "Metadata",
            Level::Request => "Request",
            Level::RequestResponse => "RequestResponse",
        }
    }
}

/// The stage of request handling an event is written at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Stage {
    /// As soon as the request is received, before anything else is done with it.
    RequestReceived,
    /// Response headers sent, body not yet complete (long-running requests: watch, exec, ...).
    ResponseStarted,
    /// The response is complete.
    ResponseComplete,
    /// The handler panicked.
    Panic,
}

impl Stage {
    pub const ALL: [Stage; 4] = [
        Stage::RequestReceived,
        Stage::ResponseStarted,
        Stage::ResponseComplete,
        Stage::Panic,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::RequestReceived => "RequestReceived",
            Stage::ResponseStarted => "ResponseStarted",
            Stage::ResponseComplete => "ResponseComplete",
            Stage::Panic => "Panic",
        }
    }
}

/// One audit event (`audit.k8s.io/v1` `Event`). Field order is kube-apiserver's.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    #[serde(default = "event_kind")]
    pub kind: String,
    #[serde(default = "api_version")]
    pub api_version: String,
    pub level: Level,
    #[serde(rename = "auditID")]
    pub audit_id: String,
    pub stage: Stage,
    #[serde(rename = "requestURI")]
    pub request_uri: String,
    pub verb: String,
    /// The authenticated user; `{}` when authentication failed.
    #[serde(default)]
    pub user: UserInfo,
    /// The user the request was forwarded as, when the caller impersonated (`kubectl --as`).
    #[serde(default)]
    pub impersonated_user: Option<UserInfo>,
    #[serde(rename = "sourceIPs", default)]
    pub source_ips: Vec<String>,
    #[serde(default)]
    pub user_agent: String,
    #[serde(default)]
    pub object_ref: Option<ObjectReference>,
    #[serde(default)]
    pub response_status: Option<ResponseStatus>,
    pub request_received_timestamp: MicroTime,
    pub stage_timestamp: MicroTime,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

fn event_kind() -> String {
    "Event".to_owned()
}

fn api_version() -> String {
    API_VERSION.to_owned()
}

/// `authentication.k8s.io/v1` `UserInfo`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct UserInfo {
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub extra: BTreeMap<String, Vec<String>>,
}

impl UserInfo {
    pub fn from_identity(identity: &Identity) -> UserInfo {
        UserInfo {
            username: identity.user().to_owned(),
            uid: identity.uid().unwrap_or_default().to_owned(),
            groups: identity.groups().to_vec(),
            extra: identity.extra().clone(),
        }
    }
}

impl From<&Identity> for UserInfo {
    fn from(identity: &Identity) -> Self {
        UserInfo::from_identity(identity)
    }
}

/// `audit.k8s.io/v1` `ObjectReference` (only for resource requests).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectReference {
    #[serde(default)]
    pub resource: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub api_group: String,
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub resource_version: String,
    #[serde(default)]
    pub subresource: String,
}

impl ObjectReference {
    /// The object reference kube-apiserver records: `None` for non-resource requests.
    pub fn from_request_info(info: &RequestInfo) -> Option<ObjectReference> {
        info.is_resource_request.then(|| ObjectReference {
            resource: info.resource.clone(),
            namespace: info.namespace.clone(),
            name: info.name.clone(),
            api_group: info.api_group.clone(),
            api_version: info.api_version.clone(),
            subresource: info.subresource.clone(),
            ..ObjectReference::default()
        })
    }
}

/// The `metav1.Status` kube-apiserver records as `responseStatus`: `{"metadata":{},"code":200}`
/// for a success, with `status`, `message` and `reason` for a failure.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct ResponseStatus {
    /// Always `{}` (Go's `omitempty` never omits a struct).
    #[serde(default)]
    pub metadata: ListMeta,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub code: i32,
}

/// `metav1.ListMeta`, always empty here; other fields are ignored when reading.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct ListMeta {}

impl ResponseStatus {
    /// A response status for an HTTP code, with the failure's reason and message when known
    /// (the `reason` and `message` of the `metav1.Status` body the client got).
    pub fn new(code: u16, reason: Option<&str>, message: Option<&str>) -> ResponseStatus {
        let failed = reason.is_some() || message.is_some();
        ResponseStatus {
            metadata: ListMeta {},
            status: if failed && code >= 400 {
                "Failure".to_owned()
            } else {
                String::new()
            },
            message: message.unwrap_or_default().to_owned(),
            reason: reason.unwrap_or_default().to_owned(),
            code: i32::from(code),
        }
    }
}

/// `audit.k8s.io/v1` `EventList`, the body of a webhook POST.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventList<E = Event> {
    pub kind: String,
    pub api_version: String,
    #[serde(default)]
    pub metadata: ListMeta,
    pub items: Vec<E>,
}

impl<E> EventList<E> {
    pub fn new(items: Vec<E>) -> EventList<E> {
        EventList {
            kind: "EventList".to_owned(),
            api_version: API_VERSION.to_owned(),
            metadata: ListMeta {},
            items,
        }
    }
}

impl Event {
    /// Appends the event as one JSON line's worth of bytes (what serde_json would write for
    /// it with Go's `omitempty` rules, without its byte-by-byte escaping of strings that need
    /// none).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        EventView {
            kind: &self.kind,
            api_version: &self.api_version,
            level: self.level,
            audit_id: &self.audit_id,
            stage: self.stage,
            request_uri: &self.request_uri,
            verb: &self.verb,
            user: UserView::of(&self.user),
            impersonated_user: self.impersonated_user.as_ref().map(UserView::of),
            source_ips: Ips::Text(&self.source_ips),
            user_agent: &self.user_agent,
            object_ref: self.object_ref.as_ref().map(|o| {
                [
                    ("resource", o.resource.as_str()),
                    ("namespace", &o.namespace),
                    ("name", &o.name),
                    ("uid", &o.uid),
                    ("apiGroup", &o.api_group),
                    ("apiVersion", &o.api_version),
                    ("resourceVersion", &o.resource_version),
                    ("subresource", &o.subresource),
                ]
            }),
            response_status: self.response_status.as_ref().map(|r| StatusView {
                status: &r.status,
                message: &r.message,
                reason: &r.reason,
                code: r.code,
            }),
            request_received: self.request_received_timestamp,
            stage_timestamp: self.stage_timestamp,
            annotations: &self.annotations,
            extra_annotation: None,
        }
        .write_json(out);
    }
}

/// An event's fields, borrowed: what both [`Event::write_json`] and
/// [`EventParts::write_json`] write, so a request's events are serialized straight from its
/// parts without first copying every field into an [`Event`].
struct EventView<'a> {
    kind: &'a str,
    api_version: &'a str,
    level: Level,
    audit_id: &'a str,
    stage: Stage,
    request_uri: &'a str,
    verb: &'a str,
    user: UserView<'a>,
    impersonated_user: Option<UserView<'a>>,
    source_ips: Ips<'a>,
    user_agent: &'a str,
    /// `objectRef`'s fields in kube-apiserver's order; empty ones are left out.
    object_ref: Option<[(&'static str, &'a str); 8]>,
    response_status: Option<StatusView<'a>>,
    request_received: MicroTime,
    stage_timestamp: MicroTime,
    annotations: &'a BTreeMap<String, String>,
    /// One more annotation, written in key order, unless `annotations` has its key.
    extra_annotation: Option<(&'a str, &'a str)>,
}

struct UserView<'a> {
    username: &'a str,
    uid: &'a str,
    groups: &'a [String],
    extra: &'a BTreeMap<String, Vec<String>>,
}

/// No extra user fields (for a request whose caller is unknown).
static NO_EXTRA: BTreeMap<String, Vec<String>> = BTreeMap::new();

impl<'a> UserView<'a> {
    fn of(u: &'a UserInfo) -> UserView<'a> {
        UserView {
            username: &u.username,
            uid: &u.uid,
            groups: &u.groups,
            extra: &u.extra,
        }
    }

    fn of_identity(id: Option<&'a Identity>) -> UserView<'a> {
        match id {
            Some(id) => UserView {
                username: id.user(),
                uid: id.uid().unwrap_or_default(),
                groups: id.groups(),
                extra: id.extra(),
            },
            None => UserView {
                username: "",
                uid: "",
                groups: &[],
                extra: &NO_EXTRA,
            },
        }
    }

    fn write_json(&self, out: &mut Vec<u8>) {
        let mut first = true;
        for (name, v) in [("username", self.username), ("uid", self.uid)] {
            if !v.is_empty() {
                json_key(out, &mut first, name);
                json_str(out, v);
            }
        }
        if !self.groups.is_empty() {
            json_key(out, &mut first, "groups");
            json_strs(out, self.groups);
        }
        if !self.extra.is_empty() {
            json_key(out, &mut first, "extra");
            out.push(b'{');
            for (i, (k, vs)) in self.extra.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                json_str(out, k);
                out.push(b':');
                json_strs(out, vs);
            }
            out.push(b'}');
        }
        out.extend_from_slice(if first { &b"{}"[..] } else { &b"}"[..] });
    }
}

/// `sourceIPs`, as text (a built event) or as addresses (a request's parts).
enum Ips<'a> {
    Text(&'a [String]),
    Addrs(&'a [IpAddr]),
}

struct StatusView<'a> {
    status: &'a str,
    message: &'a str,
    reason: &'a str,
    code: i32,
}

/// Where an event's stage-dependent values lie in its JSON (see [`EventView::write_json_marked`]).
struct StageMarks {
    /// The value of `stage`.
    stage: std::ops::Range<usize>,
    /// `,"responseStatus":{...}`, or the empty place where it would be.
    status: std::ops::Range<usize>,
    /// The value of `stageTimestamp`.
    stage_timestamp: std::ops::Range<usize>,
}

impl EventView<'_> {
    fn write_json(&self, out: &mut Vec<u8>) {
        self.write_json_marked(out);
    }

    /// The event for another stage of the same request, written by copying `first` (an event
    /// written by [`EventView::write_json_marked`] from a view that differs from this one only in
    /// `stage`, `response_status` and `stage_timestamp`) around this view's values of those:
    /// the same bytes as `self.write_json(out)`, without escaping every string again.
    fn write_json_restaged(&self, first: &[u8], marks: &StageMarks, out: &mut Vec<u8>) {
        out.reserve(first.len() + 64);
        out.extend_from_slice(&first[..marks.stage.start]);
        json_str(out, self.stage.as_str());
        out.extend_from_slice(&first[marks.stage.end..marks.status.start]);
        self.write_status(out);
        out.extend_from_slice(&first[marks.status.end..marks.stage_timestamp.start]);
        write_time(out, &self.stage_timestamp);
        out.extend_from_slice(&first[marks.stage_timestamp.end..]);
    }

    fn write_status(&self, out: &mut Vec<u8>) {
        if let Some(r) = &self.response_status {
            out.extend_from_slice(b",\"responseStatus\":{\"metadata\":{}");
            for (name, v) in [
                ("status", r.status),
                ("message", r.message),
                ("reason", r.reason),
            ] {
                if !v.is_empty() {
                    out.extend_from_slice(b",\"");
                    out.extend_from_slice(name.as_bytes());
                    out.extend_from_slice(b"\":");
                    json_str(out, v);
                }
            }
            if r.code != 0 {
                out.extend_from_slice(b",\"code\":");
                out.extend_from_slice(fmt_i32(r.code, &mut [0; 11]));
            }
            out.push(b'}');
        }
    }

    /// Writes the event and says where its stage-dependent values are.
    fn write_json_marked(&self, out: &mut Vec<u8>) -> StageMarks {
        out.extend_from_slice(b"{\"kind\":");
        json_str(out, self.kind);
        out.extend_from_slice(b",\"apiVersion\":");
        json_str(out, self.api_version);
        out.extend_from_slice(b",\"level\":");
        json_str(out, self.level.as_str());
        out.extend_from_slice(b",\"auditID\":");
        json_str(out, self.audit_id);
        out.extend_from_slice(b",\"stage\":");
        let stage_start = out.len();
        json_str(out, self.stage.as_str());
        let stage = stage_start..out.len();
        out.extend_from_slice(b",\"requestURI\":");
        json_str(out, self.request_uri);
        out.extend_from_slice(b",\"verb\":");
        json_str(out, self.verb);
        out.extend_from_slice(b",\"user\":");
        self.user.write_json(out);
        if let Some(u) = &self.impersonated_user {
            out.extend_from_slice(b",\"impersonatedUser\":");
            u.write_json(out);
        }
        match self.source_ips {
            Ips::Text(ips) if !ips.is_empty() => {
                out.extend_from_slice(b",\"sourceIPs\":");
                json_strs(out, ips);
            }
            Ips::Addrs(ips) if !ips.is_empty() => {
                out.extend_from_slice(b",\"sourceIPs\":[");
                for (i, ip) in ips.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.push(b'"');
                    write_ip(out, ip);
                    out.push(b'"');
                }
                out.push(b']');
            }
            _ => {}
        }
        if !self.user_agent.is_empty() {
            out.extend_from_slice(b",\"userAgent\":");
            json_str(out, self.user_agent);
        }
        if let Some(fields) = &self.object_ref {
            out.extend_from_slice(b",\"objectRef\":");
            let mut first = true;
            for (name, v) in fields {
                if !v.is_empty() {
                    json_key(out, &mut first, name);
                    json_str(out, v);
                }
            }
            out.extend_from_slice(if first { &b"{}"[..] } else { &b"}"[..] });
        }
        let status_start = out.len();
        self.write_status(out);
        let status = status_start..out.len();
        out.extend_from_slice(b",\"requestReceivedTimestamp\":");
        write_time(out, &self.request_received);
        out.extend_from_slice(b",\"stageTimestamp\":");
        let ts_start = out.len();
        write_time(out, &self.stage_timestamp);
        let stage_timestamp = ts_start..out.len();
        let extra = self
            .extra_annotation
            .filter(|(k, _)| !self.annotations.contains_key(*k));
        if !self.annotations.is_empty() || extra.is_some() {
            out.extend_from_slice(b",\"annotations\":{");
            let mut first = true;
            let mut put = |out: &mut Vec<u8>, k: &str, v: &str| {
                if !first {
                    out.push(b',');
                }
                first = false;
                json_str(out, k);
                out.push(b':');
                json_str(out, v);
            };
            let mut pending = extra;
            for (k, v) in self.annotations {
                if let Some((ek, ev)) = pending.filter(|(ek, _)| *ek < k.as_str()) {
                    put(out, ek, ev);
                    pending = None;
                }
                put(out, k, v);
            }
            if let Some((ek, ev)) = pending {
                put(out, ek, ev);
            }
            out.push(b'}');
        }
        out.push(b'}');
        StageMarks {
            stage,
            status,
            stage_timestamp,
        }
    }
}

/// A timestamp as a JSON string (its text never needs escaping).
fn write_time(out: &mut Vec<u8>, t: &MicroTime) {
    out.push(b'"');
    t.write(out);
    out.push(b'"');
}

/// An address as its `Display` writes it (its text never needs escaping); IPv4 without `fmt`.
fn write_ip(out: &mut Vec<u8>, ip: &IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(fmt_i32(i32::from(octet), &mut [0; 11]));
            }
        }
        IpAddr::V6(_) => {
            use std::io::Write as _;
            // Writing to a Vec cannot fail.
            let _ = write!(out, "{ip}");
        }
    }
}

/// An `i32` in decimal, without `fmt`.
fn fmt_i32(v: i32, buf: &mut [u8; 11]) -> &[u8] {
    let mut n = v.unsigned_abs();
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if v < 0 {
        i -= 1;
        buf[i] = b'-';
    }
    &buf[i..]
}

/// `{"name":` for the first field of an object, `,"name":` for the others.
fn json_key(out: &mut Vec<u8>, first: &mut bool, name: &str) {
    out.push(if *first { b'{' } else { b',' });
    *first = false;
    out.push(b'"');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

fn json_strs(out: &mut Vec<u8>, items: &[String]) {
    out.push(b'[');
    for (i, s) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        json_str(out, s);
    }
    out.push(b']');
}

/// A JSON string as `serde_json` writes it: `"` and `\\` escaped, control characters as `\n`-style
/// or `\u00XX` escapes, everything else (UTF-8 included) as is.
fn json_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.push(b'"');
    // No early exit: this loop vectorizes, and most strings need no escaping at all.
    let plain = !bytes.iter().fold(false, |acc, &b| {
        acc | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if plain {
        out.extend_from_slice(bytes);
    } else {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut start = 0;
        let mut unicode = *b"\\u0000";
        for (i, &b) in bytes.iter().enumerate() {
            let esc: &[u8] = match b {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                0x08 => b"\\b",
                0x0c => b"\\f",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0x00..=0x1f => {
                    unicode[4] = HEX[(b >> 4) as usize];
                    unicode[5] = HEX[(b & 0xf) as usize];
                    &unicode
                }
                _ => continue,
            };
            out.extend_from_slice(&bytes[start..i]);
            out.extend_from_slice(esc);
            start = i + 1;
        }
        out.extend_from_slice(&bytes[start..]);
    }
    out.push(b'"');
}

/// Query parameter names removed from `requestURI` (compared case-insensitively, after
/// percent-decoding the name): kube-apiserver itself does not read tokens from the query, but a
/// misbehaving client might put one there, and the audit log must never hold a credential.
pub const REDACTED_QUERY_PARAMS: [&str; 2] = ["access_token", "token"];

/// The request URI as kube-apiserver logs it (path and query as received), minus any
/// `access_token` or `token` query parameter.
pub fn redact_request_uri(uri: &Uri) -> std::borrow::Cow<'_, str> {
    let path = uri.path();
    let Some(query) = uri.query() else {
        return path.into();
    };
    let keep = |pair: &&str| {
        let name = pair.split_once('=').map_or(*pair, |(n, _)| n);
        let name = name.replace('+', " ");
        let name = percent_encoding::percent_decode_str(&name).decode_utf8_lossy();
        !REDACTED_QUERY_PARAMS
            .iter()
            .any(|r| name.eq_ignore_ascii_case(r))
    };
    // Nothing to remove (every request but a misbehaving client's): the target as received,
    // borrowed — this runs for each audit event.
    if let Some(pq) = uri.path_and_query() {
        if pq.as_str().len() == path.len() + 1 + query.len() && query.split('&').all(|p| keep(&p)) {
            return pq.as_str().into();
        }
    }
    let kept: Vec<&str> = query.split('&').filter(keep).collect();
    if kept.is_empty() {
        path.into()
    } else {
        format!("{path}?{}", kept.join("&")).into()
    }
}

/// kube-apiserver's limit on the recorded user agent (`maxUserAgentLength`).
pub const MAX_USER_AGENT_LEN: usize = 1024;
const USER_AGENT_TRUNCATED: &str = "...TRUNCATED";

fn truncate_user_agent(ua: &str) -> std::borrow::Cow<'_, str> {
    if ua.len() <= MAX_USER_AGENT_LEN {
        return ua.into();
    }
    let mut end = MAX_USER_AGENT_LEN;
    while !ua.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{USER_AGENT_TRUNCATED}", &ua[..end]).into()
}

/// The response part of an event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResponseInfo<'a> {
    pub code: u16,
    /// `reason` of the `metav1.Status` the client got (`Forbidden`, `Unauthorized`, ...).
    pub reason: Option<&'a str>,
    /// `message` of that Status.
    pub message: Option<&'a str>,
}

/// Everything an event is built from. Build one per request, then call [`EventParts::build`] for
/// each stage that is recorded.
#[derive(Clone, Debug)]
pub struct EventParts<'a> {
    pub audit_id: &'a str,
    pub method: &'a Method,
    /// The request target as received; `requestURI` is its path and query, redacted by
    /// [`redact_request_uri`].
    pub uri: &'a Uri,
    pub user_agent: Option<&'a str>,
    pub source_ips: &'a [IpAddr],
    pub received: SystemTime,
    /// The authenticated caller; `None` when authentication failed.
    pub identity: Option<&'a Identity>,
    /// Who the request was forwarded as, when the caller impersonated.
    pub impersonated: Option<&'a UserInfo>,
    /// The request's attributes; `verb` and `objectRef` come from here. Without it (a request
    /// refused before it could be classified), `verb` is the lower-cased HTTP method.
    pub request_info: Option<&'a RequestInfo>,
    pub response: Option<ResponseInfo<'a>>,
    pub annotations: BTreeMap<String, String>,
}

impl<'a> EventParts<'a> {
    pub fn new(
        audit_id: &'a str,
        method: &'a Method,
        uri: &'a Uri,
        received: SystemTime,
    ) -> EventParts<'a> {
        EventParts {
            audit_id,
            method,
            uri,
            user_agent: None,
            source_ips: &[],
            received,
            identity: None,
            impersonated: None,
            request_info: None,
            response: None,
            annotations: BTreeMap::new(),
        }
    }

    /// Sets an annotation (use the `ANNOTATION_*` keys).
    pub fn annotate(&mut self, key: &str, value: impl Into<String>) -> &mut Self {
        self.annotations.insert(key.to_owned(), value.into());
        self
    }

    /// Sets `ztgate.dev/decision`.
    pub fn decision(&mut self, decision: Decision) -> &mut Self {
        self.annotate(ANNOTATION_DECISION, decision.as_str())
    }

    /// The event for `stage`, stamped now — except `RequestReceived`, stamped when the request
    /// was received: the gateway builds it only once it has the answer, and kube-apiserver's
    /// `RequestReceived` event says when the request arrived.
    pub fn build(&self, level: Level, stage: Stage) -> Event {
        self.build_at(level, stage, self.stamp(stage))
    }

    /// When an event for `stage` is stamped (see [`EventParts::build`]).
    pub fn stamp(&self, stage: Stage) -> SystemTime {
        match stage {
            Stage::RequestReceived => self.received,
            _ => SystemTime::now(),
        }
    }

    /// Appends the event for `stage`, stamped `at`, as JSON: the same bytes as
    /// `self.build_at(level, stage, at).write_json(out)` without building the [`Event`]. Only
    /// the tests write one stage alone (`tests::parts_write_the_json_of_the_event_they_build`,
    /// against which [`EventParts::write_stages`], the request path, is checked).
    #[cfg(test)]
    pub fn write_json(&self, level: Level, stage: Stage, at: SystemTime, out: &mut Vec<u8>) {
        self.write_stages(level, [(stage, at)], |_, json| out.extend_from_slice(&json));
    }

    /// The events for several stages of the request (each with its stamp), as JSON, handed to
    /// `emit` in order: the same bytes as [`EventParts::write_json`] for each, but only the first
    /// is written field by field; the others copy it around their own `stage`,
    /// `responseStatus` and `stageTimestamp`.
    pub fn write_stages(
        &self,
        level: Level,
        stages: impl IntoIterator<Item = (Stage, SystemTime)>,
        mut emit: impl FnMut(Stage, Bytes),
    ) {
        let mut stages = stages.into_iter();
        let Some((stage, at)) = stages.next() else {
            return;
        };
        let verb_lower;
        let verb = match self.request_info {
            Some(info) => info.verb.as_str(),
            None => {
                verb_lower = self.method.as_str().to_ascii_lowercase();
                &verb_lower
            }
        };
        let request_uri = redact_request_uri(self.uri);
        let user_agent = self.user_agent.map(truncate_user_agent).unwrap_or_default();
        let object_ref = self
            .request_info
            .filter(|info| info.is_resource_request)
            .map(|info| {
                [
                    ("resource", info.resource.as_str()),
                    ("namespace", &info.namespace),
                    ("name", &info.name),
                    ("uid", ""),
                    ("apiGroup", &info.api_group),
                    ("apiVersion", &info.api_version),
                    ("resourceVersion", ""),
                    ("subresource", &info.subresource),
                ]
            });
        let status_for = |stage: Stage| match stage {
            Stage::RequestReceived => None,
            _ => self.response.map(|r| StatusView {
                status: if (r.reason.is_some() || r.message.is_some()) && r.code >= 400 {
                    "Failure"
                } else {
                    ""
                },
                message: r.message.unwrap_or_default(),
                reason: r.reason.unwrap_or_default(),
                code: i32::from(r.code),
            }),
        };
        let mut view = EventView {
            kind: "Event",
            api_version: API_VERSION,
            level,
            audit_id: self.audit_id,
            stage,
            request_uri: &request_uri,
            verb,
            user: UserView::of_identity(self.identity),
            impersonated_user: self.impersonated.map(UserView::of),
            source_ips: Ips::Addrs(self.source_ips),
            user_agent: &user_agent,
            object_ref,
            response_status: status_for(stage),
            request_received: MicroTime(self.received),
            stage_timestamp: MicroTime(at),
            annotations: &self.annotations,
            extra_annotation: self
                .identity
                .map(|id| (ANNOTATION_AUTHN_METHOD, id.method().as_str())),
        };
        let mut first = Vec::with_capacity(1024);
        let marks = view.write_json_marked(&mut first);
        // Shared, not copied: the later stages are written from it after it is handed out.
        let first = Bytes::from(first);
        emit(stage, first.clone());
        for (stage, at) in stages {
            view.stage = stage;
            view.response_status = status_for(stage);
            view.stage_timestamp = MicroTime(at);
            let mut json = Vec::new();
            view.write_json_restaged(&first, &marks, &mut json);
            emit(stage, Bytes::from(json));
        }
    }

    /// The event for `stage`, stamped `at`.
    pub fn build_at(&self, level: Level, stage: Stage, at: SystemTime) -> Event {
        let verb = match self.request_info {
            Some(info) => info.verb.clone(),
            None => self.method.as_str().to_ascii_lowercase(),
        };
        let mut annotations = self.annotations.clone();
        if let Some(id) = self.identity {
            annotations
                .entry(ANNOTATION_AUTHN_METHOD.to_owned())
                .or_insert_with(|| id.method().as_str().to_owned());
        }
        Event {
            kind: event_kind(),
            api_version: api_version(),
            level,
            audit_id: self.audit_id.to_owned(),
            stage,
            request_uri: redact_request_uri(self.uri).into_owned(),
            verb,
            user: self
                .identity
                .map(UserInfo::from_identity)
                .unwrap_or_default(),
            impersonated_user: self.impersonated.cloned(),
            source_ips: self.source_ips.iter().map(ToString::to_string).collect(),
            user_agent: self
                .user_agent
                .map(|ua| truncate_user_agent(ua).into_owned())
                .unwrap_or_default(),
            object_ref: self
                .request_info
                .and_then(ObjectReference::from_request_info),
            response_status: match stage {
                Stage::RequestReceived => None,
                _ => self
                    .response
                    .map(|r| ResponseStatus::new(r.code, r.reason, r.message)),
            },
            request_received_timestamp: MicroTime(self.received),
            stage_timestamp: MicroTime(at),
            annotations,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// An event's JSON, as text.
    fn json(ev: &Event) -> String {
        let mut out = Vec::new();
        ev.write_json(&mut out);
        String::from_utf8(out).unwrap()
    }

    /// `t` truncated to microseconds, as events carry it.
    fn micros(t: SystemTime) -> SystemTime {
        MicroTime::parse(&MicroTime(t).to_rfc3339_micro())
            .unwrap()
            .0
    }

    #[test]
    fn json_writer_reads_back_and_escapes_as_serde_json() {
        let odd = [
            "",
            "plain",
            "quote \" and \\ backslash",
            "control \u{0} \u{1} \u{8} \u{9} \u{a} \u{c} \u{d} \u{1f} \u{7f} end",
            "ünïcødé ✓ 😀",
            "</script>&'",
        ];
        let user = |i: usize| UserInfo {
            username: odd[i % odd.len()].to_owned(),
            uid: odd[(i + 1) % odd.len()].to_owned(),
            groups: odd.iter().take(i % 4).map(|s| s.to_string()).collect(),
            extra: if i % 2 == 0 {
                BTreeMap::new()
            } else {
                BTreeMap::from([
                    ("scopes".to_owned(), vec![odd[i % odd.len()].to_owned()]),
                    (odd[(i + 2) % odd.len()].to_owned(), vec![]),
                ])
            },
        };
        let mut checked = 0;
        for i in 0..48 {
            let o = |k: usize| odd[(i + k) % odd.len()].to_owned();
            let ev = Event {
                kind: "Event".into(),
                api_version: API_VERSION.into(),
                level: [
                    Level::None,
                    Level::Metadata,
                    Level::Request,
                    Level::RequestResponse,
                ][i % 4],
                audit_id: o(0),
                stage: Stage::ALL[i % 4],
                request_uri: o(1),
                verb: o(2),
                user: if i % 5 == 0 {
                    UserInfo::default()
                } else {
                    user(i)
                },
                impersonated_user: (i % 3 == 0).then(|| user(i + 1)),
                source_ips: odd.iter().take(i % 3).map(|s| s.to_string()).collect(),
                user_agent: o(3),
                object_ref: match i % 3 {
                    0 => None,
                    1 => Some(ObjectReference::default()),
                    _ => Some(ObjectReference {
                        resource: o(0),
                        namespace: o(1),
                        name: o(2),
                        uid: o(3),
                        api_group: o(4),
                        api_version: o(5),
                        resource_version: o(6),
                        subresource: o(7),
                    }),
                },
                response_status: match i % 4 {
                    0 => None,
                    1 => Some(ResponseStatus::default()),
                    2 => Some(ResponseStatus::new(200, None, None)),
                    _ => Some(ResponseStatus::new(403, Some(&o(1)), Some(&o(2)))),
                },
                request_received_timestamp: MicroTime(micros(
                    SystemTime::UNIX_EPOCH
                        + Duration::from_nanos(1_764_000_000_123_456_789 / 48 * i as u64),
                )),
                stage_timestamp: MicroTime(micros(if i == 7 {
                    SystemTime::UNIX_EPOCH - Duration::from_secs(1)
                } else {
                    SystemTime::now()
                })),
                annotations: (0..i % 4).map(|k| (o(k), o(k + 1))).collect(),
            };
            let line = json(&ev);
            let back: Event = serde_json::from_str(&line).unwrap();
            assert_eq!(back, ev, "event {i}: {line}");
            checked += 1;
        }
        assert_eq!(checked, 48);
        // strings are escaped exactly as serde_json escapes them
        for s in odd {
            let mut mine = Vec::new();
            json_str(&mut mine, s);
            assert_eq!(
                String::from_utf8(mine).unwrap(),
                serde_json::to_string(s).unwrap()
            );
        }
    }

    fn ts(s: &str) -> SystemTime {
        MicroTime::parse(s).unwrap().0
    }

    /// An event as kube-apiserver writes it to its log backend (one line, reformatted here).
    const KUBE_EXAMPLE: &str = r#"{
        "kind":"Event","apiVersion":"audit.k8s.io/v1","level":"Metadata",
        "auditID":"0b4a1a0f-6f6e-4b1e-9d6c-3f2a5c1e7d10","stage":"ResponseComplete",
        "requestURI":"/api/v1/namespaces/default/pods/web-0/log?container=app","verb":"get",
        "user":{"username":"alice@example.com","groups":["dev","system:authenticated"]},
        "sourceIPs":["10.0.0.7"],"userAgent":"kubectl/v1.31.0 (linux/amd64) kubernetes/abcdef0",
        "objectRef":{"resource":"pods","namespace":"default","name":"web-0","apiVersion":"v1","subresource":"log"},
        "responseStatus":{"metadata":{},"code":200},
        "requestReceivedTimestamp":"2026-11-26T15:04:05.123456Z",
        "stageTimestamp":"2026-11-26T15:04:05.234567Z",
        "annotations":{"authorization.k8s.io/decision":"allow","authorization.k8s.io/reason":""}
    }"#;

    #[test]
    fn kube_example_round_trips_byte_for_byte() {
        let want: serde_json::Value = serde_json::from_str(KUBE_EXAMPLE).unwrap();
        let ev: Event = serde_json::from_str(KUBE_EXAMPLE).unwrap();
        assert_eq!(ev.level, Level::Metadata);
        assert_eq!(ev.stage, Stage::ResponseComplete);
        let line = json(&ev);
        let minified = serde_json::to_string(&want).unwrap();
        // serde_json::Value sorts keys; compare as values, and check the field order separately.
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&line).unwrap(),
            want
        );
        assert!(line.starts_with(
            r#"{"kind":"Event","apiVersion":"audit.k8s.io/v1","level":"Metadata","auditID":"#
        ));
        assert!(line.contains(r#""responseStatus":{"metadata":{},"code":200},"requestReceivedTimestamp":"2026-11-26T15:04:05.123456Z","stageTimestamp":"2026-11-26T15:04:05.234567Z""#));
        assert_eq!(line.len(), minified.len());
    }

    #[test]
    fn built_event_matches_kube_shape_and_omits_empty_fields() {
        let method = Method::GET;
        let uri: Uri =
            "/api/v1/namespaces/default/pods/web-0/log?container=app&access_token=SECRET"
                .parse()
                .unwrap();
        let info =
            crate::authz::requestinfo::request_info(&method, uri.path(), uri.query()).unwrap();
        let ips = ["10.0.0.7".parse().unwrap()];
        let mut parts = EventParts::new(
            "0b4a1a0f-6f6e-4b1e-9d6c-3f2a5c1e7d10",
            &method,
            &uri,
            ts("2026-11-26T15:04:05.123456Z"),
        );
        parts.source_ips = &ips;
        parts.user_agent = Some("kubectl/v1.31.0");
        parts.request_info = Some(&info);
        parts.response = Some(ResponseInfo {
            code: 200,
            ..Default::default()
        });
        parts.decision(Decision::Allow);
        let ev = parts.build_at(
            Level::Metadata,
            Stage::ResponseComplete,
            ts("2026-11-26T15:04:05.234567Z"),
        );
        let got: serde_json::Value = serde_json::from_str(&json(&ev)).unwrap();
        let want = serde_json::json!({
            "kind": "Event",
            "apiVersion": "audit.k8s.io/v1",
            "level": "Metadata",
            "auditID": "0b4a1a0f-6f6e-4b1e-9d6c-3f2a5c1e7d10",
            "stage": "ResponseComplete",
            "requestURI": "/api/v1/namespaces/default/pods/web-0/log?container=app",
            "verb": "get",
            "user": {},
            "sourceIPs": ["10.0.0.7"],
            "userAgent": "kubectl/v1.31.0",
            "objectRef": {"resource": "pods", "namespace": "default", "name": "web-0",
                          "apiVersion": "v1", "subresource": "log"},
            "responseStatus": {"metadata": {}, "code": 200},
            "requestReceivedTimestamp": "2026-11-26T15:04:05.123456Z",
            "stageTimestamp": "2026-11-26T15:04:05.234567Z",
            "annotations": {"ztgate.dev/decision": "allow"}
        });
        assert_eq!(got, want);

        // RequestReceived carries no responseStatus; a non-resource request no objectRef.
        let uri2: Uri = "/version".parse().unwrap();
        let parts2 = EventParts::new("id", &method, &uri2, SystemTime::now());
        let v: serde_json::Value = serde_json::from_str(&json(
            &parts2.build(Level::Metadata, Stage::RequestReceived),
        ))
        .unwrap();
        let obj = v.as_object().unwrap();
        for absent in [
            "responseStatus",
            "objectRef",
            "sourceIPs",
            "userAgent",
            "annotations",
            "impersonatedUser",
        ] {
            assert!(!obj.contains_key(absent), "{absent} should be omitted: {v}");
        }
        for present in ["level", "auditID", "stage", "requestURI", "verb", "user"] {
            assert!(
                obj.contains_key(present),
                "{present} must always be written"
            );
        }
        assert_eq!(v["verb"], "get");
    }

    #[test]
    fn failure_status_has_reason_and_message() {
        let method = Method::GET;
        let uri: Uri = "/api/v1/pods".parse().unwrap();
        let mut ev = EventParts::new("id", &method, &uri, SystemTime::now())
            .build(Level::Metadata, Stage::ResponseComplete);
        ev.response_status = Some(ResponseStatus::new(
            403,
            Some("Forbidden"),
            Some("pods is forbidden: denied by policy"),
        ));
        let v: serde_json::Value = serde_json::from_str(&json(&ev)).unwrap();
        assert_eq!(
            v["responseStatus"],
            serde_json::json!({"metadata": {}, "status": "Failure",
                "message": "pods is forbidden: denied by policy", "reason": "Forbidden", "code": 403})
        );
    }

    #[test]
    fn tokens_are_stripped_from_the_request_uri() {
        let r = |s: &str| redact_request_uri(&s.parse::<Uri>().unwrap()).into_owned();
        assert_eq!(r("/api/v1/pods"), "/api/v1/pods");
        assert_eq!(r("/api/v1/pods?watch=1&token=abc"), "/api/v1/pods?watch=1");
        assert_eq!(r("/api/v1/pods?access_token=abc"), "/api/v1/pods");
        assert_eq!(
            r("/x?Access%5FToken=abc&a=b&TOKEN&tokenx=1"),
            "/x?a=b&tokenx=1"
        );
        assert_eq!(r("/x?a=token"), "/x?a=token");
    }

    #[test]
    fn long_user_agents_are_truncated_like_kube() {
        let ua = "é".repeat(600);
        let t = truncate_user_agent(&ua);
        assert!(t.ends_with("...TRUNCATED"));
        assert!(t.len() <= MAX_USER_AGENT_LEN + USER_AGENT_TRUNCATED.len());
    }

    #[test]
    fn request_received_is_stamped_when_the_request_arrived() {
        let method = Method::GET;
        let uri: Uri = "/api/v1/pods".parse().unwrap();
        let received = SystemTime::now() - std::time::Duration::from_secs(5);
        let parts = EventParts::new("id", &method, &uri, received);
        let rr = parts.build(Level::Metadata, Stage::RequestReceived);
        assert_eq!(rr.stage_timestamp, rr.request_received_timestamp);
        let rc = parts.build(Level::Metadata, Stage::ResponseComplete);
        assert!(
            rc.stage_timestamp.0 > received,
            "later stages are stamped when built"
        );
    }
}
