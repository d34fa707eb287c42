//! kube-apiserver's request attributes (RequestInfo), computed from method, path and query.
//!
//! This follows k8s.io/apiserver `pkg/endpoints/request/requestinfo.go` (`RequestInfoFactory`
//! with `APIPrefixes {"api","apis"}` and `GrouplessAPIPrefixes {"api"}`) rule for rule, including
//! the parts it borrows from elsewhere:
//!
//! - the path is percent-decoded the way Go's `net/url` fills `URL.Path`, then split on `/`;
//! - the query is read the way Go's `URL.Query()` reads it (pairs that fail to decode, or that
//!   hold a `;`, are dropped silently);
//! - for a `get` without a name, the query is decoded into `ListOptions` the way
//!   `metainternalversionscheme.ParameterCodec` does it: `watch` and the `metadata.name` term of
//!   `fieldSelector` count only when *every* option decodes (`labelSelector`, `fieldSelector`,
//!   `limit`, `timeoutSeconds`); when one fails, kube logs it, falls back to `list` (or `watch`
//!   when the first `watch` value is not `false`/`0`) and sets no name.
//!
//! Where Go would carry a byte string that Rust's `String` can't hold (a path or a
//! `metadata.name` that isn't UTF-8), and where Go's own behaviour depends on its version (more
//! than 10000 query parameters), the request is refused instead: see [`RequestInfoError`].

use std::borrow::Cow;
use std::collections::BTreeSet;

use http::Method;

/// The attributes kube-apiserver derives for a request
/// (k8s.io/apiserver pkg/endpoints/request/requestinfo.go).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestInfo {
    /// True for `/api/...` and `/apis/...` resource paths; false for everything else.
    pub is_resource_request: bool,
    /// The request path (percent-decoded form the attributes were computed from).
    pub path: String,
    /// Kubernetes verb: get, list, watch, create, update, patch, delete, deletecollection,
    /// proxy; for non-resource requests the lower-cased HTTP method (get, post, put, ...).
    /// Empty for a resource request whose method has no verb (OPTIONS, CONNECT, ...), as in kube.
    pub verb: String,
    /// `api` or `apis` (empty for most non-resource requests; kube leaves `apis` set on
    /// `/apis/<group>/<version>`, which is still a non-resource request).
    pub api_prefix: String,
    /// Empty for the core group.
    pub api_group: String,
    pub api_version: String,
    pub namespace: String,
    pub resource: String,
    pub subresource: String,
    pub name: String,
    /// Path segments after the group/version (and after `namespaces/<ns>` when present).
    pub parts: Vec<String>,
}

/// Why [`request_info`] could not compute the attributes. Every case should be refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestInfoError {
    /// A `%` in the path not followed by two hex digits; Go's `net/url` rejects the request
    /// line, so net/http answers 400 before kube-apiserver sees it.
    #[error("invalid percent-encoding {0:?} in request path")]
    InvalidPathEscape(String),
    /// The percent-decoded path is not UTF-8 (Go would carry the raw bytes on).
    #[error("percent-decoded request path is not valid UTF-8")]
    PathNotUtf8,
    /// `/api/v1/watch` or `/api/v1/proxy` with nothing after the path verb; kube-apiserver
    /// answers 500 ("unable to determine kind and namespace from url").
    #[error(
        "unable to determine kind and namespace from url: nothing follows the {0:?} path verb"
    )]
    NothingAfterPathVerb(String),
    /// More query parameters than Go's `net/url` parses by default (recent Go releases then
    /// ignore the whole query, older ones read it all), so kube's reading depends on its build.
    #[error("query has more than {MAX_QUERY_PARAMS} parameters")]
    TooManyQueryParameters,
    /// The `metadata.name` of a list/watch `fieldSelector` is not UTF-8.
    #[error("fieldSelector metadata.name is not valid UTF-8")]
    SelectorNameNotUtf8,
}

/// Go's `net/url` default cap on the number of query parameters (`urlmaxqueryparams`).
pub const MAX_QUERY_PARAMS: usize = 10_000;

/// kube-apiserver's RequestInfoFactory with APIPrefixes {"api","apis"}, GrouplessAPIPrefixes {"api"}.
/// `path` is the raw path (may be percent-encoded; it is decoded the way Go's `net/url` fills
/// `URL.Path`, which kube-apiserver routes on), `query` the raw query string.
pub fn request_info(
    method: &Method,
    path: &str,
    query: Option<&str>,
) -> Result<RequestInfo, RequestInfoError> {
    let path = decode_path(path)?;

    // Start as a non-resource request until proven otherwise.
    let mut info = RequestInfo {
        path: path.clone().into_owned(),
        verb: method.as_str().to_ascii_lowercase(),
        ..RequestInfo::default()
    };

    let trimmed = path.trim_matches('/');
    let segments: Vec<&str> = if trimmed.is_empty() {
        Vec::new()
    } else {
        trimmed.split('/').collect()
    };
    if segments.len() < 3 {
        return Ok(info);
    }
    let prefix = segments[0];
    if prefix != "api" && prefix != "apis" {
        return Ok(info);
    }
    info.api_prefix = prefix.to_owned();
    let mut rest = &segments[1..];

    if prefix != "api" {
        // Grouped prefix: needs group, version and at least one more segment.
        if rest.len() < 3 {
            return Ok(info);
        }
        info.api_group = rest[0].to_owned();
        rest = &rest[1..];
    }

    info.is_resource_request = true;
    info.api_version = rest[0].to_owned();
    rest = &rest[1..];

    // Deprecated path verbs: /api/v1/watch/..., /api/v1/proxy/...
    if rest[0] == "watch" || rest[0] == "proxy" {
        if rest.len() < 2 {
            return Err(RequestInfoError::NothingAfterPathVerb(rest[0].to_owned()));
        }
        info.verb = rest[0].to_owned();
        rest = &rest[1..];
    } else {
        info.verb = match method.as_str() {
            "POST" => "create",
            "GET" | "HEAD" => "get",
            "PUT" => "update",
            "PATCH" => "patch",
            "DELETE" => "delete",
            _ => "",
        }
        .to_owned();
    }

    // namespaces/{namespace}/{resource}/...: parts become relative to the resource, except for
    // the namespace object itself and its status/finalize subresources.
    if rest[0] == "namespaces" && rest.len() > 1 {
        info.namespace = rest[1].to_owned();
        if rest.len() > 2 && rest[2] != "status" && rest[2] != "finalize" {
            rest = &rest[2..];
        }
    }

    info.parts = rest.iter().map(|s| (*s).to_owned()).collect();

    // parts: resource/name/subresource/other/stuff/not/interpreted
    if info.parts.len() >= 3 && info.verb != "proxy" {
        info.subresource = info.parts[2].clone();
    }
    if info.parts.len() >= 2 {
        info.name = info.parts[1].clone();
    }
    info.resource = info.parts[0].clone();

    // No name and a get: a list or a watch, possibly narrowed to one name by fieldSelector.
    if info.name.is_empty() && info.verb == "get" {
        let query = GoQuery::parse(query.unwrap_or(""))?;
        match list_options(&query) {
            Ok(opts) => {
                info.verb = if opts.watch { "watch" } else { "list" }.to_owned();
                if let Some(name) = opts.name {
                    if is_valid_path_segment_name(&name) {
                        info.name = String::from_utf8(name)
                            .map_err(|_| RequestInfoError::SelectorNameNotUtf8)?;
                    }
                }
            }
            Err(()) => {
                // kube: "An error in parsing request will result in default to "list" and not
                // setting "name" field", but a watch is still reported as a watch.
                let watch = query
                    .watch
                    .as_deref()
                    .is_some_and(|v| !(v == b"0" || v.eq_ignore_ascii_case(b"false")));
                info.verb = if watch { "watch" } else { "list" }.to_owned();
            }
        }
    }

    if info.name.is_empty() && info.verb == "delete" {
        info.verb = "deletecollection".to_owned();
    }

    Ok(info)
}

/// The verb the *authorizer* sees. Same as `info.verb` except for the pod "connect"
/// subresources `exec`, `attach` and `portforward` requested with GET (or HEAD): those are
/// authorized as `create`.
///
/// kube-apiserver 1.35+ (`AuthorizePodWebsocketUpgradeCreatePermission`, beta, on by default)
/// checks `create` in the connect handler of these subresources for *every* GET, not only for
/// WebSocket upgrades: a GET carrying an SPDY upgrade reaches the kubelet just the same. So the
/// result does not depend on `is_websocket_upgrade`; the parameter is kept for callers that
/// have it. SPDY POSTs are `create` already. kube additionally authorizes the GET as `get` in its
/// authorization filter; [`authorizer_checks`] gives both verbs.
pub fn authorizer_verb<'a>(
    info: &'a RequestInfo,
    method: &Method,
    is_websocket_upgrade: bool,
) -> &'a str {
    let _ = is_websocket_upgrade;
    if connect_requires_create(info, method) {
        "create"
    } else {
        &info.verb
    }
}

/// Every verb kube-apiserver 1.35+ authorizes for this request, in order: the verb its
/// authorization filter checks (`info.verb`), then the extra `create` its pod connect handler
/// checks for GET/HEAD on `exec`, `attach` and `portforward`.
pub fn authorizer_checks<'a>(
    info: &'a RequestInfo,
    method: &Method,
) -> (&'a str, Option<&'static str>) {
    let extra = connect_requires_create(info, method).then_some("create");
    (&info.verb, extra)
}

fn connect_requires_create(info: &RequestInfo, method: &Method) -> bool {
    info.is_resource_request
        && (method == Method::GET || method == Method::HEAD)
        && info.verb == "get"
        && info.api_group.is_empty()
        && info.resource == "pods"
        && matches!(info.subresource.as_str(), "exec" | "attach" | "portforward")
}

// ---------------------------------------------------------------------------------------------
// Go net/url

/// Percent-decodes a path the way Go's `url.Parse` fills `URL.Path` (`+` stays `+`).
fn decode_path(raw: &str) -> Result<Cow<'_, str>, RequestInfoError> {
    if !raw.contains('%') {
        return Ok(Cow::Borrowed(raw));
    }
    let bytes = go_unescape(raw.as_bytes(), false)
        .map(Cow::into_owned)
        .map_err(|at| {
            let end = (at + 3).min(raw.len());
            RequestInfoError::InvalidPathEscape(
                String::from_utf8_lossy(&raw.as_bytes()[at..end]).into(),
            )
        })?;
    String::from_utf8(bytes)
        .map(Cow::Owned)
        .map_err(|_| RequestInfoError::PathNotUtf8)
}

/// Go's `unescape`: `%XX` must be two hex digits; in a query component `+` is a space.
/// On error, the byte offset of the bad `%`.
fn go_unescape(s: &[u8], query_component: bool) -> Result<Cow<'_, [u8]>, usize> {
    if !s
        .iter()
        .any(|b| *b == b'%' || (query_component && *b == b'+'))
    {
        return Ok(Cow::Borrowed(s));
    }
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'%' => {
                let hi = s.get(i + 1).and_then(|b| hex_value(*b));
                let lo = s.get(i + 2).and_then(|b| hex_value(*b));
                match (hi, lo) {
                    (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                    _ => return Err(i),
                }
                i += 3;
            }
            b'+' if query_component => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(Cow::Owned(out))
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The first value of each `ListOptions` query parameter whose decoding can fail or that
/// RequestInfo reads, as Go's `URL.Query()` yields them (raw bytes; Go strings are bytes).
#[derive(Default)]
struct GoQuery<'a> {
    watch: Option<Cow<'a, [u8]>>,
    label_selector: Option<Cow<'a, [u8]>>,
    field_selector: Option<Cow<'a, [u8]>>,
    timeout_seconds: Option<Cow<'a, [u8]>>,
    limit: Option<Cow<'a, [u8]>>,
}

impl<'a> GoQuery<'a> {
    /// Go's `url.ParseQuery`, keeping only what RequestInfo needs.
    fn parse(raw: &'a str) -> Result<Self, RequestInfoError> {
        let mut q = GoQuery::default();
        if raw.is_empty() {
            return Ok(q);
        }
        if raw.bytes().filter(|b| *b == b'&').count() + 1 > MAX_QUERY_PARAMS {
            return Err(RequestInfoError::TooManyQueryParameters);
        }
        for pair in raw.split('&') {
            // Go refuses `;` as a separator: the pair is dropped (and an error is recorded,
            // which `URL.Query()` discards).
            if pair.is_empty() || pair.contains(';') {
                continue;
            }
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let Ok(key) = go_unescape(key.as_bytes(), true) else {
                continue;
            };
            let slot = match &*key {
                b"watch" => &mut q.watch,
                b"labelSelector" => &mut q.label_selector,
                b"fieldSelector" => &mut q.field_selector,
                b"timeoutSeconds" => &mut q.timeout_seconds,
                b"limit" => &mut q.limit,
                _ => continue,
            };
            if slot.is_some() {
                continue;
            }
            if let Ok(value) = go_unescape(value.as_bytes(), true) {
                *slot = Some(value);
            }
        }
        Ok(q)
    }
}

// ---------------------------------------------------------------------------------------------
// ListOptions decoding (metainternalversionscheme.ParameterCodec.DecodeParameters)

struct ListOpts {
    watch: bool,
    /// The value `fieldSelector` requires `metadata.name` to equal, if any.
    name: Option<Vec<u8>>,
}

/// url.Values -> v1.ListOptions -> internalversion.ListOptions; `Err` when any step fails.
fn list_options(q: &GoQuery) -> Result<ListOpts, ()> {
    // runtime.Convert_Slice_string_To_bool: only "0" and EqualFold "false" are false.
    let watch = q
        .watch
        .as_deref()
        .is_some_and(|v| !(v == b"0" || go_equal_fold_false(v)));
    // runtime.Convert_Slice_string_To_Pointer_int64 / _int64: strconv.ParseInt(s, 10, 64).
    for v in [&q.timeout_seconds, &q.limit].into_iter().flatten() {
        go_parse_int64(v)?;
    }
    if let Some(sel) = &q.label_selector {
        label_selector_is_valid(sel)?;
    }
    let name = match &q.field_selector {
        Some(sel) => field_selector_exact_name(sel)?,
        None => None,
    };
    Ok(ListOpts { watch, name })
}

/// Go's `strings.EqualFold(v, "false")`: simple Unicode case folding, under which
/// U+017F LATIN SMALL LETTER LONG S also matches `s`.
fn go_equal_fold_false(v: &[u8]) -> bool {
    let Ok(v) = std::str::from_utf8(v) else {
        return false;
    };
    let mut chars = v.chars();
    for want in "false".chars() {
        match chars.next() {
            Some(c) if c.eq_ignore_ascii_case(&want) => {}
            Some('\u{17f}') if want == 's' => {}
            _ => return false,
        }
    }
    chars.next().is_none()
}

/// Go's `strconv.ParseInt(s, 10, 64)`: optional sign, ASCII digits, in range. Rust's `i64`
/// parser accepts exactly the same inputs.
fn go_parse_int64(v: &[u8]) -> Result<i64, ()> {
    std::str::from_utf8(v)
        .map_err(|_| ())?
        .parse::<i64>()
        .map_err(|_| ())
}

/// k8s.io/apimachinery `api/validation/path.IsValidPathSegmentName`.
fn is_valid_path_segment_name(name: &[u8]) -> bool {
    name != b"." && name != b".." && !name.contains(&b'/') && !name.contains(&b'%')
}

// ---------------------------------------------------------------------------------------------
// fields.ParseSelector + RequiresExactMatch("metadata.name")

/// Parses a field selector and returns the value the first (in sorted term order) `=`/`==`
/// term on `metadata.name` requires, as `andTerm.RequiresExactMatch` does.
fn field_selector_exact_name(selector: &[u8]) -> Result<Option<Vec<u8>>, ()> {
    let mut terms = split_field_terms(selector);
    terms.sort_unstable();
    let mut found = None;
    for term in terms {
        if term.is_empty() {
            continue;
        }
        let (lhs, op, rhs) = split_field_term(term).ok_or(())?;
        let value = unescape_field_value(rhs)?;
        if found.is_none() && op != FieldOp::NotEquals && lhs == b"metadata.name" {
            found = Some(value);
        }
    }
    Ok(found)
}

/// Splits on commas not escaped by a backslash (the backslash stays in the term).
fn split_field_terms(selector: &[u8]) -> Vec<&[u8]> {
    let mut terms = Vec::new();
    if selector.is_empty() {
        return terms;
    }
    let mut start = 0;
    let mut in_slash = false;
    for (i, &b) in selector.iter().enumerate() {
        if in_slash {
            in_slash = false;
        } else if b == b'\\' {
            in_slash = true;
        } else if b == b',' {
            terms.push(&selector[start..i]);
            start = i + 1;
        }
    }
    terms.push(&selector[start..]);
    terms
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FieldOp {
    NotEquals,
    Equals,
}

/// Splits at the first operator: at each position `!=`, then `==`, then `=`.
fn split_field_term(term: &[u8]) -> Option<(&[u8], FieldOp, &[u8])> {
    for i in 0..term.len() {
        let rest = &term[i..];
        if rest.starts_with(b"!=") {
            return Some((&term[..i], FieldOp::NotEquals, &term[i + 2..]));
        }
        if rest.starts_with(b"==") {
            return Some((&term[..i], FieldOp::Equals, &term[i + 2..]));
        }
        if rest.starts_with(b"=") {
            return Some((&term[..i], FieldOp::Equals, &term[i + 1..]));
        }
    }
    None
}

/// `fields.UnescapeValue`: `\\`, `\,` and `\=` are escapes; any other escape, a lone trailing
/// backslash, or an unescaped `,`/`=` is an error. Like Go, which walks the value rune by rune
/// once it holds a special character, each byte of invalid UTF-8 becomes U+FFFD in that case.
fn unescape_field_value(s: &[u8]) -> Result<Vec<u8>, ()> {
    if !s.iter().any(|b| matches!(b, b'\\' | b',' | b'=')) {
        return Ok(s.to_vec());
    }
    let mut out = Vec::with_capacity(s.len());
    let mut in_slash = false;
    let mut i = 0;
    while i < s.len() {
        let (rune, width) = go_decode_rune(&s[i..]);
        i += width;
        if in_slash {
            match rune {
                '\\' | ',' | '=' => out.push(rune as u8),
                _ => return Err(()),
            }
            in_slash = false;
            continue;
        }
        match rune {
            '\\' => in_slash = true,
            ',' | '=' => return Err(()),
            _ => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(rune.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    if in_slash {
        return Err(());
    }
    Ok(out)
}

/// Go's `utf8.DecodeRune`: an invalid encoding is U+FFFD with width 1.
fn go_decode_rune(s: &[u8]) -> (char, usize) {
    let width = match s[0] {
        0x00..=0x7f => return (s[0] as char, 1),
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => return (char::REPLACEMENT_CHARACTER, 1),
    };
    match s.get(..width).map(std::str::from_utf8) {
        Some(Ok(text)) => (
            text.chars().next().unwrap_or(char::REPLACEMENT_CHARACTER),
            width,
        ),
        _ => (char::REPLACEMENT_CHARACTER, 1),
    }
}

// ---------------------------------------------------------------------------------------------
// labels.Parse (validity only)

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tok {
    Error,
    EndOfString,
    ClosedPar,
    Comma,
    DoesNotExist,
    DoubleEquals,
    Equals,
    GreaterThan,
    Identifier,
    In,
    LessThan,
    NotEquals,
    NotIn,
    OpenPar,
}

fn literal_token(s: &[u8]) -> Option<Tok> {
    Some(match s {
        b")" => Tok::ClosedPar,
        b"," => Tok::Comma,
        b"!" => Tok::DoesNotExist,
        b"==" => Tok::DoubleEquals,
        b"=" => Tok::Equals,
        b">" => Tok::GreaterThan,
        b"in" => Tok::In,
        b"<" => Tok::LessThan,
        b"!=" => Tok::NotEquals,
        b"notin" => Tok::NotIn,
        b"(" => Tok::OpenPar,
        _ => return None,
    })
}

fn is_label_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn is_label_special(b: u8) -> bool {
    matches!(b, b'=' | b'!' | b'(' | b')' | b',' | b'>' | b'<')
}

/// The label-selector lexer. Like Go's, `read` yields 0 at the end without advancing, and a
/// NUL byte in the input reads as 0 too (after advancing), so it ends the token it meets.
struct Lexer<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Lexer<'_> {
    fn read(&mut self) -> u8 {
        match self.s.get(self.pos) {
            Some(&b) => {
                self.pos += 1;
                b
            }
            None => 0,
        }
    }

    fn unread(&mut self) {
        self.pos -= 1;
    }

    fn scan_id_or_keyword(&mut self) -> (Tok, Vec<u8>) {
        let mut buf = Vec::new();
        loop {
            let ch = self.read();
            if ch == 0 {
                break;
            }
            if is_label_special(ch) || is_label_whitespace(ch) {
                self.unread();
                break;
            }
            buf.push(ch);
        }
        match literal_token(&buf) {
            Some(tok) => (tok, buf),
            None => (Tok::Identifier, buf),
        }
    }

    fn scan_special_symbol(&mut self) -> (Tok, Vec<u8>) {
        let mut last: Option<(Tok, Vec<u8>)> = None;
        let mut buf = Vec::new();
        loop {
            let ch = self.read();
            if ch == 0 {
                break;
            }
            if !is_label_special(ch) {
                self.unread();
                break;
            }
            buf.push(ch);
            if let Some(tok) = literal_token(&buf) {
                last = Some((tok, buf.clone()));
            } else if last.is_some() {
                self.unread();
                break;
            }
        }
        last.unwrap_or((Tok::Error, buf))
    }

    fn lex(&mut self) -> (Tok, Vec<u8>) {
        let mut ch = self.read();
        while is_label_whitespace(ch) {
            ch = self.read();
        }
        if ch == 0 {
            return (Tok::EndOfString, Vec::new());
        }
        self.unread();
        if is_label_special(ch) {
            self.scan_special_symbol()
        } else {
            self.scan_id_or_keyword()
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum LabelOp {
    In,
    NotIn,
    Equals,
    DoubleEquals,
    NotEquals,
    GreaterThan,
    LessThan,
    Exists,
    DoesNotExist,
}

struct LabelParser {
    items: Vec<(Tok, Vec<u8>)>,
    position: usize,
}

/// Token context: in `Values`, the keywords `in`/`notin` are plain identifiers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ctx {
    KeyAndOperator,
    Values,
}

impl LabelParser {
    fn tok_at(&self, i: usize, ctx: Ctx) -> (Tok, &[u8]) {
        let (tok, lit) = self
            .items
            .get(i)
            .map_or((Tok::EndOfString, &[][..]), |(t, l)| (*t, l.as_slice()));
        match tok {
            Tok::In | Tok::NotIn if ctx == Ctx::Values => (Tok::Identifier, lit),
            _ => (tok, lit),
        }
    }

    fn lookahead(&self, ctx: Ctx) -> Tok {
        self.tok_at(self.position, ctx).0
    }

    fn consume(&mut self, ctx: Ctx) -> (Tok, Vec<u8>) {
        self.position += 1;
        let (tok, lit) = self.tok_at(self.position - 1, ctx);
        (tok, lit.to_vec())
    }

    fn parse(&mut self) -> Result<(), ()> {
        loop {
            match self.lookahead(Ctx::Values) {
                Tok::Identifier | Tok::DoesNotExist => {
                    self.parse_requirement()?;
                    match self.consume(Ctx::Values).0 {
                        Tok::EndOfString => return Ok(()),
                        Tok::Comma => {
                            let next = self.lookahead(Ctx::Values);
                            if next != Tok::Identifier && next != Tok::DoesNotExist {
                                return Err(());
                            }
                        }
                        _ => return Err(()),
                    }
                }
                Tok::EndOfString => return Ok(()),
                _ => return Err(()),
            }
        }
    }

    fn parse_requirement(&mut self) -> Result<(), ()> {
        let (key, op) = self.parse_key_and_infer_operator()?;
        if let Some(op @ (LabelOp::Exists | LabelOp::DoesNotExist)) = op {
            return validate_requirement(&key, op, &BTreeSet::new());
        }
        let op = self.parse_operator()?;
        let values = match op {
            LabelOp::In | LabelOp::NotIn => self.parse_values()?,
            _ => self.parse_exact_value()?,
        };
        validate_requirement(&key, op, &values)
    }

    fn parse_key_and_infer_operator(&mut self) -> Result<(Vec<u8>, Option<LabelOp>), ()> {
        let mut op = None;
        let (mut tok, mut literal) = self.consume(Ctx::Values);
        if tok == Tok::DoesNotExist {
            op = Some(LabelOp::DoesNotExist);
            (tok, literal) = self.consume(Ctx::Values);
        }
        if tok != Tok::Identifier || !is_qualified_name(&literal) {
            return Err(());
        }
        if matches!(self.lookahead(Ctx::Values), Tok::EndOfString | Tok::Comma)
            && op != Some(LabelOp::DoesNotExist)
        {
            op = Some(LabelOp::Exists);
        }
        Ok((literal, op))
    }

    fn parse_operator(&mut self) -> Result<LabelOp, ()> {
        Ok(match self.consume(Ctx::KeyAndOperator).0 {
            Tok::In => LabelOp::In,
            Tok::Equals => LabelOp::Equals,
            Tok::DoubleEquals => LabelOp::DoubleEquals,
            Tok::GreaterThan => LabelOp::GreaterThan,
            Tok::LessThan => LabelOp::LessThan,
            Tok::NotIn => LabelOp::NotIn,
            Tok::NotEquals => LabelOp::NotEquals,
            _ => return Err(()),
        })
    }

    fn parse_values(&mut self) -> Result<BTreeSet<Vec<u8>>, ()> {
        if self.consume(Ctx::Values).0 != Tok::OpenPar {
            return Err(());
        }
        match self.lookahead(Ctx::Values) {
            Tok::Identifier | Tok::Comma => {
                let values = self.parse_identifiers_list()?;
                if self.consume(Ctx::Values).0 != Tok::ClosedPar {
                    return Err(());
                }
                Ok(values)
            }
            Tok::ClosedPar => {
                self.consume(Ctx::Values);
                Ok(BTreeSet::from([Vec::new()]))
            }
            _ => Err(()),
        }
    }

    fn parse_identifiers_list(&mut self) -> Result<BTreeSet<Vec<u8>>, ()> {
        let mut values = BTreeSet::new();
        loop {
            let (tok, lit) = self.consume(Ctx::Values);
            match tok {
                Tok::Identifier => {
                    values.insert(lit);
                    match self.lookahead(Ctx::Values) {
                        Tok::Comma => continue,
                        Tok::ClosedPar => return Ok(values),
                        _ => return Err(()),
                    }
                }
                Tok::Comma => {
                    if values.is_empty() {
                        values.insert(Vec::new());
                    }
                    match self.lookahead(Ctx::Values) {
                        Tok::ClosedPar => {
                            values.insert(Vec::new());
                            return Ok(values);
                        }
                        Tok::Comma => {
                            values.insert(Vec::new());
                        }
                        _ => {}
                    }
                }
                _ => return Err(()),
            }
        }
    }

    fn parse_exact_value(&mut self) -> Result<BTreeSet<Vec<u8>>, ()> {
        if matches!(self.lookahead(Ctx::Values), Tok::EndOfString | Tok::Comma) {
            return Ok(BTreeSet::from([Vec::new()]));
        }
        match self.consume(Ctx::Values) {
            (Tok::Identifier, lit) => Ok(BTreeSet::from([lit])),
            _ => Err(()),
        }
    }
}

/// `labels.NewRequirement`'s checks.
fn validate_requirement(key: &[u8], op: LabelOp, values: &BTreeSet<Vec<u8>>) -> Result<(), ()> {
    let count_ok = match op {
        LabelOp::In | LabelOp::NotIn => !values.is_empty(),
        LabelOp::Equals | LabelOp::DoubleEquals | LabelOp::NotEquals => values.len() == 1,
        LabelOp::Exists | LabelOp::DoesNotExist => values.is_empty(),
        LabelOp::GreaterThan | LabelOp::LessThan => {
            values.len() == 1 && values.iter().all(|v| go_parse_int64(v).is_ok())
        }
    };
    if count_ok && is_qualified_name(key) && values.iter().all(|v| is_label_value(v)) {
        Ok(())
    } else {
        Err(())
    }
}

/// `labels.Parse` succeeds on this selector.
fn label_selector_is_valid(selector: &[u8]) -> Result<(), ()> {
    let mut lexer = Lexer {
        s: selector,
        pos: 0,
    };
    let mut items = Vec::new();
    loop {
        let item = lexer.lex();
        let end = item.0 == Tok::EndOfString;
        items.push(item);
        if end {
            break;
        }
    }
    LabelParser { items, position: 0 }.parse()
}

/// `validation.IsQualifiedName`: `[DNS-1123 subdomain "/"] name`, name at most 63 characters
/// of `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`.
fn is_qualified_name(value: &[u8]) -> bool {
    let mut parts = value.split(|b| *b == b'/');
    let (prefix, name) = match (parts.next(), parts.next(), parts.next()) {
        (Some(name), None, None) => (None, name),
        (Some(prefix), Some(name), None) => (Some(prefix), name),
        _ => return false,
    };
    if let Some(prefix) = prefix {
        if !is_dns1123_subdomain(prefix) {
            return false;
        }
    }
    !name.is_empty() && name.len() <= 63 && is_alnum_dash_underscore_dot(name)
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]` (non-empty).
fn is_alnum_dash_underscore_dot(s: &[u8]) -> bool {
    match (s.first(), s.last()) {
        (Some(first), Some(last)) => {
            first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && s.iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

/// `validation.IsValidLabelValue`: empty, or at most 63 characters of the qualified-name form.
fn is_label_value(v: &[u8]) -> bool {
    v.is_empty() || (v.len() <= 63 && is_alnum_dash_underscore_dot(v))
}

/// `validation.IsDNS1123Subdomain`: at most 253 characters of dot-separated
/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?` labels.
fn is_dns1123_subdomain(s: &[u8]) -> bool {
    s.len() <= 253
        && s.split(|b| *b == b'.')
            .all(|label| match (label.first(), label.last()) {
                (Some(first), Some(last)) => {
                    (first.is_ascii_lowercase() || first.is_ascii_digit())
                        && (last.is_ascii_lowercase() || last.is_ascii_digit())
                        && label
                            .iter()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
                }
                _ => false,
            })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected attributes, written as `R|N key=value ...`: `R` a resource request, `N` a
    /// non-resource one; keys `verb`, `prefix`, `group`, `v`, `ns`, `res`, `sub`, `name`,
    /// `parts` (slash-separated) and `path` (defaults to the request path); absent keys are empty.
    fn expected(path: &str, spec: &str) -> RequestInfo {
        let mut tokens = spec.split_whitespace();
        let mut info = RequestInfo {
            is_resource_request: match tokens.next() {
                Some("R") => true,
                Some("N") => false,
                other => panic!("spec must start with R or N, got {other:?}"),
            },
            path: path.to_owned(),
            ..RequestInfo::default()
        };
        for token in tokens {
            let (key, value) = token.split_once('=').expect("key=value");
            let value = value.to_owned();
            match key {
                "verb" => info.verb = value,
                "prefix" => info.api_prefix = value,
                "group" => info.api_group = value,
                "v" => info.api_version = value,
                "ns" => info.namespace = value,
                "res" => info.resource = value,
                "sub" => info.subresource = value,
                "name" => info.name = value,
                "parts" => info.parts = value.split('/').map(str::to_owned).collect(),
                "path" => info.path = value,
                _ => panic!("unknown key {key}"),
            }
        }
        info
    }

    type Row = (
        &'static str,
        &'static str,
        Option<&'static str>,
        &'static str,
        &'static str,
    );

    #[rustfmt::skip]
    const CASES: &[Row] = &[
        // --- discovery and other non-resource paths ---
        ("GET", "/", None, "N verb=get", "root: fewer than 3 segments is non-resource"),
        ("GET", "/api", None, "N verb=get", "/api discovery: fewer than 3 segments"),
        ("GET", "/apis", None, "N verb=get", "/apis discovery: fewer than 3 segments"),
        ("GET", "/apis/apps", None, "N verb=get", "/apis/<group> discovery: fewer than 3 segments"),
        ("GET", "/api/v1", None, "N verb=get", "/api/<version> discovery: fewer than 3 segments"),
        ("GET", "/apis/apps/v1", None, "N verb=get prefix=apis", "grouped prefix needs 4 segments; kube has already set APIPrefix when it returns non-resource"),
        ("DELETE", "/apis/apps/v1", None, "N verb=delete prefix=apis", "non-resource verb is the lower-cased method"),
        ("GET", "/version", None, "N verb=get", "first segment not an API prefix"),
        ("GET", "/healthz", None, "N verb=get", "first segment not an API prefix"),
        ("GET", "/healthz/etcd", None, "N verb=get", "first segment not an API prefix"),
        ("GET", "/openapi/v2", None, "N verb=get", "first segment not an API prefix"),
        ("GET", "/openapi/v3/apis/apps/v1", None, "N verb=get", "API prefix only counts as the first segment"),
        ("GET", "/metrics", None, "N verb=get", "first segment not an API prefix"),
        ("POST", "/version", None, "N verb=post", "non-resource verbs are the lower-cased method, not create"),
        ("PUT", "/logs/kube-apiserver.log", None, "N verb=put", "non-resource verb is the lower-cased method"),
        ("OPTIONS", "/api", None, "N verb=options", "non-resource verb is the lower-cased method"),
        ("HEAD", "/healthz", None, "N verb=head", "non-resource HEAD stays head (only resource HEAD maps to get)"),
        ("GET", "/Api/v1/pods", None, "N verb=get", "API prefixes match case-sensitively"),
        // --- core group, namespaced, CRUD ---
        ("GET", "/api/v1/namespaces/ns/pods", None, "R verb=list prefix=api v=v1 ns=ns res=pods parts=pods", "GET without name is list"),
        ("GET", "/api/v1/namespaces/ns/pods/p", None, "R verb=get prefix=api v=v1 ns=ns res=pods name=p parts=pods/p", "GET with name is get"),
        ("POST", "/api/v1/namespaces/ns/pods", None, "R verb=create prefix=api v=v1 ns=ns res=pods parts=pods", "POST is create"),
        ("PUT", "/api/v1/namespaces/ns/pods/p", None, "R verb=update prefix=api v=v1 ns=ns res=pods name=p parts=pods/p", "PUT is update"),
        ("PATCH", "/api/v1/namespaces/ns/pods/p", None, "R verb=patch prefix=api v=v1 ns=ns res=pods name=p parts=pods/p", "PATCH is patch"),
        ("DELETE", "/api/v1/namespaces/ns/pods/p", None, "R verb=delete prefix=api v=v1 ns=ns res=pods name=p parts=pods/p", "DELETE with name is delete"),
        ("DELETE", "/api/v1/namespaces/ns/pods", None, "R verb=deletecollection prefix=api v=v1 ns=ns res=pods parts=pods", "DELETE without name is deletecollection"),
        ("HEAD", "/api/v1/namespaces/ns/pods/p", None, "R verb=get prefix=api v=v1 ns=ns res=pods name=p parts=pods/p", "HEAD is get"),
        ("HEAD", "/api/v1/namespaces/ns/pods", None, "R verb=list prefix=api v=v1 ns=ns res=pods parts=pods", "HEAD without name becomes list like GET"),
        ("OPTIONS", "/api/v1/namespaces/ns/pods/p", None, "R verb= prefix=api v=v1 ns=ns res=pods name=p parts=pods/p", "resource request with an unmapped method gets the empty verb"),
        ("PROPFIND", "/api/v1/namespaces/ns/pods", None, "R verb= prefix=api v=v1 ns=ns res=pods parts=pods", "unmapped method: empty verb, and no list/deletecollection rewrite"),
        ("GET", "/api/v1/pods", None, "R verb=list prefix=api v=v1 res=pods parts=pods", "list across all namespaces: no namespace"),
        ("GET", "/apis/apps/v1/namespaces/ns/deployments/d", None, "R verb=get prefix=apis group=apps v=v1 ns=ns res=deployments name=d parts=deployments/d", "grouped resource"),
        ("GET", "/apis/apps/v1/deployments", None, "R verb=list prefix=apis group=apps v=v1 res=deployments parts=deployments", "grouped list across namespaces"),
        // --- cluster-scoped and the namespace object ---
        ("GET", "/api/v1/nodes", None, "R verb=list prefix=api v=v1 res=nodes parts=nodes", "cluster-scoped list"),
        ("GET", "/api/v1/nodes/n1", None, "R verb=get prefix=api v=v1 res=nodes name=n1 parts=nodes/n1", "cluster-scoped get"),
        ("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles/admin", None, "R verb=get prefix=apis group=rbac.authorization.k8s.io v=v1 res=clusterroles name=admin parts=clusterroles/admin", "cluster-scoped grouped get"),
        ("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", None, "R verb=create prefix=apis group=authorization.k8s.io v=v1 res=subjectaccessreviews parts=subjectaccessreviews", "cluster-scoped create"),
        ("GET", "/api/v1/namespaces", None, "R verb=list prefix=api v=v1 res=namespaces parts=namespaces", "namespaces list: no namespace"),
        ("POST", "/api/v1/namespaces", None, "R verb=create prefix=api v=v1 res=namespaces parts=namespaces", "namespace create"),
        ("GET", "/api/v1/namespaces/ns", None, "R verb=get prefix=api v=v1 ns=ns res=namespaces name=ns parts=namespaces/ns", "namespace object: namespace is set to its own name"),
        ("DELETE", "/api/v1/namespaces/ns", None, "R verb=delete prefix=api v=v1 ns=ns res=namespaces name=ns parts=namespaces/ns", "namespace delete"),
        ("PUT", "/api/v1/namespaces/ns/status", None, "R verb=update prefix=api v=v1 ns=ns res=namespaces sub=status name=ns parts=namespaces/ns/status", "status is a namespace subresource, not a namespaced resource"),
        ("PUT", "/api/v1/namespaces/ns/finalize", None, "R verb=update prefix=api v=v1 ns=ns res=namespaces sub=finalize name=ns parts=namespaces/ns/finalize", "finalize is a namespace subresource"),
        ("GET", "/api/v1/namespaces/ns/statuses", None, "R verb=list prefix=api v=v1 ns=ns res=statuses parts=statuses", "only the exact words status/finalize are namespace subresources"),
        // --- subresources ---
        ("GET", "/api/v1/namespaces/ns/pods/p/log", None, "R verb=get prefix=api v=v1 ns=ns res=pods sub=log name=p parts=pods/p/log", "pods/log"),
        ("GET", "/api/v1/namespaces/ns/pods/p/log", Some("follow=true&container=c"), "R verb=get prefix=api v=v1 ns=ns res=pods sub=log name=p parts=pods/p/log", "named requests ignore the query"),
        ("POST", "/api/v1/namespaces/ns/pods/p/exec", Some("command=sh&stdin=true"), "R verb=create prefix=api v=v1 ns=ns res=pods sub=exec name=p parts=pods/p/exec", "SPDY exec is a POST: create"),
        ("GET", "/api/v1/namespaces/ns/pods/p/exec", Some("command=sh"), "R verb=get prefix=api v=v1 ns=ns res=pods sub=exec name=p parts=pods/p/exec", "WebSocket exec is a GET: RequestInfo says get"),
        ("POST", "/api/v1/namespaces/ns/pods/p/attach", None, "R verb=create prefix=api v=v1 ns=ns res=pods sub=attach name=p parts=pods/p/attach", "pods/attach"),
        ("POST", "/api/v1/namespaces/ns/pods/p/portforward", None, "R verb=create prefix=api v=v1 ns=ns res=pods sub=portforward name=p parts=pods/p/portforward", "pods/portforward"),
        ("PUT", "/api/v1/namespaces/ns/pods/p/status", None, "R verb=update prefix=api v=v1 ns=ns res=pods sub=status name=p parts=pods/p/status", "pods/status"),
        ("PATCH", "/api/v1/namespaces/ns/pods/p/ephemeralcontainers", None, "R verb=patch prefix=api v=v1 ns=ns res=pods sub=ephemeralcontainers name=p parts=pods/p/ephemeralcontainers", "pods/ephemeralcontainers"),
        ("PATCH", "/apis/apps/v1/namespaces/ns/deployments/d/scale", None, "R verb=patch prefix=apis group=apps v=v1 ns=ns res=deployments sub=scale name=d parts=deployments/d/scale", "deployments/scale"),
        ("POST", "/api/v1/namespaces/ns/serviceaccounts/sa/token", None, "R verb=create prefix=api v=v1 ns=ns res=serviceaccounts sub=token name=sa parts=serviceaccounts/sa/token", "serviceaccounts/token"),
        ("GET", "/api/v1/namespaces/ns/pods/p/proxy/some/path", None, "R verb=get prefix=api v=v1 ns=ns res=pods sub=proxy name=p parts=pods/p/proxy/some/path", "a 4th+ part keeps subresource as parts[2]"),
        ("GET", "/api/v1/namespaces/ns/services/https:svc:443/proxy/", None, "R verb=get prefix=api v=v1 ns=ns res=services sub=proxy name=https:svc:443 parts=services/https:svc:443/proxy", "services/proxy with a scheme:name:port name"),
        ("GET", "/api/v1/nodes/n1/proxy/metrics", None, "R verb=get prefix=api v=v1 res=nodes sub=proxy name=n1 parts=nodes/n1/proxy/metrics", "nodes/proxy"),
        // --- deprecated path verbs ---
        ("GET", "/api/v1/watch/namespaces/ns/pods", None, "R verb=watch prefix=api v=v1 ns=ns res=pods parts=pods", "watch path verb is stripped and sets the verb"),
        ("GET", "/api/v1/watch/pods", None, "R verb=watch prefix=api v=v1 res=pods parts=pods", "watch path verb across namespaces"),
        ("GET", "/api/v1/watch/namespaces/ns/pods/p", None, "R verb=watch prefix=api v=v1 ns=ns res=pods name=p parts=pods/p", "watch path verb with a name stays watch"),
        ("GET", "/api/v1/watch/namespaces", None, "R verb=watch prefix=api v=v1 res=namespaces parts=namespaces", "watch of the namespaces collection"),
        ("GET", "/api/v1/watch/namespaces/ns", None, "R verb=watch prefix=api v=v1 ns=ns res=namespaces name=ns parts=namespaces/ns", "watch of one namespace object"),
        ("GET", "/apis/apps/v1/watch/namespaces/ns/deployments", None, "R verb=watch prefix=apis group=apps v=v1 ns=ns res=deployments parts=deployments", "watch path verb under a group"),
        ("GET", "/api/v1/watch/pods", Some("watch=false"), "R verb=watch prefix=api v=v1 res=pods parts=pods", "path verb is not get, so the watch query is not consulted"),
        ("DELETE", "/api/v1/watch/pods", None, "R verb=watch prefix=api v=v1 res=pods parts=pods", "path verb wins over the method"),
        ("GET", "/api/v1/proxy/namespaces/ns/pods/p/some/path", None, "R verb=proxy prefix=api v=v1 ns=ns res=pods name=p parts=pods/p/some/path", "proxy path verb: no subresource from further parts"),
        ("POST", "/api/v1/proxy/nodes/n1/stats", None, "R verb=proxy prefix=api v=v1 res=nodes name=n1 parts=nodes/n1/stats", "proxy path verb whatever the method"),
        ("GET", "/api/v1/namespaces/ns/watch", None, "R verb=list prefix=api v=v1 ns=ns res=watch parts=watch", "watch is only a path verb right after the version"),
        // --- watch query ---
        ("GET", "/api/v1/pods", Some("watch=true"), "R verb=watch prefix=api v=v1 res=pods parts=pods", "watch=true"),
        ("GET", "/api/v1/pods", Some("watch=1"), "R verb=watch prefix=api v=v1 res=pods parts=pods", "watch=1"),
        ("GET", "/api/v1/pods", Some("watch=false"), "R verb=list prefix=api v=v1 res=pods parts=pods", "watch=false"),
        ("GET", "/api/v1/pods", Some("watch=0"), "R verb=list prefix=api v=v1 res=pods parts=pods", "watch=0"),
        ("GET", "/api/v1/pods", Some("watch=FaLsE"), "R verb=list prefix=api v=v1 res=pods parts=pods", "false matches case-insensitively (EqualFold)"),
        ("GET", "/api/v1/pods", Some("watch=yes"), "R verb=watch prefix=api v=v1 res=pods parts=pods", "Convert_Slice_string_To_bool: anything but 0/false is true (not strconv.ParseBool)"),
        ("GET", "/api/v1/pods", Some("watch="), "R verb=watch prefix=api v=v1 res=pods parts=pods", "an empty watch value is true"),
        ("GET", "/api/v1/pods", Some("watch"), "R verb=watch prefix=api v=v1 res=pods parts=pods", "a bare watch key has the empty value: true"),
        ("GET", "/api/v1/pods", Some("watch=false&watch=true"), "R verb=list prefix=api v=v1 res=pods parts=pods", "first value wins"),
        ("GET", "/api/v1/pods", Some("w%61tch=1"), "R verb=watch prefix=api v=v1 res=pods parts=pods", "query keys are percent-decoded"),
        ("GET", "/api/v1/pods", Some("Watch=true"), "R verb=list prefix=api v=v1 res=pods parts=pods", "query keys match case-sensitively"),
        ("GET", "/api/v1/pods", Some("watch=true;x=y"), "R verb=list prefix=api v=v1 res=pods parts=pods", "Go drops a pair containing ';'"),
        ("GET", "/api/v1/pods", Some("watch=%zz&watch=false"), "R verb=list prefix=api v=v1 res=pods parts=pods", "Go drops a pair whose value does not decode; the next one is first"),
        ("GET", "/api/v1/pods", Some("watch=fal%C5%BFe"), "R verb=list prefix=api v=v1 res=pods parts=pods", "EqualFold folds U+017F long s to s"),
        ("GET", "/api/v1/pods", Some("watch=fal%C5%BFe&limit=x"), "R verb=watch prefix=api v=v1 res=pods parts=pods", "after a decode error kube re-reads watch with ToLower, which does not fold long s"),
        ("GET", "/api/v1/namespaces/ns/pods/p", Some("watch=true"), "R verb=get prefix=api v=v1 ns=ns res=pods name=p parts=pods/p", "a named GET is get whatever the query"),
        ("GET", "/api/v1/pods", Some("watch=true&labelSelector=app%20in"), "R verb=watch prefix=api v=v1 res=pods parts=pods", "decode error: still a watch when watch is not false/0"),
        ("GET", "/api/v1/pods", Some("watch=FALSE&labelSelector=app%20in"), "R verb=list prefix=api v=v1 res=pods parts=pods", "decode error: ToLower(FALSE) is false"),
        // --- fieldSelector metadata.name ---
        ("GET", "/api/v1/namespaces/ns/pods", Some("fieldSelector=metadata.name%3Dp1"), "R verb=list prefix=api v=v1 ns=ns res=pods name=p1 parts=pods", "fieldSelector metadata.name=x names the list"),
        ("GET", "/api/v1/namespaces/ns/pods", Some("fieldSelector=metadata.name%3D%3Dp1"), "R verb=list prefix=api v=v1 ns=ns res=pods name=p1 parts=pods", "metadata.name==x is the same exact match"),
        ("GET", "/api/v1/namespaces/ns/pods", Some("fieldSelector=metadata.name=p1"), "R verb=list prefix=api v=v1 ns=ns res=pods name=p1 parts=pods", "Go splits a query pair at its first '=' only"),
        ("GET", "/api/v1/namespaces/ns/pods", Some("watch=1&fieldSelector=metadata.name%3Dp1&resourceVersion=5"), "R verb=watch prefix=api v=v1 ns=ns res=pods name=p1 parts=pods", "single-object watch via fieldSelector"),
        ("GET", "/api/v1/pods", Some("fieldSelector=spec.nodeName%3Dn1,metadata.name%3Dp1"), "R verb=list prefix=api v=v1 res=pods name=p1 parts=pods", "combined with another term"),
        ("GET", "/api/v1/pods", Some("fieldSelector=status.phase!%3DRunning,metadata.name%3D%3Dp1"), "R verb=list prefix=api v=v1 res=pods name=p1 parts=pods", "combined with a != term"),
        ("GET", "/api/v1/pods", Some("fieldSelector=metadata.name!%3Dp1"), "R verb=list prefix=api v=v1 res=pods parts=pods", "!= is not an exact match"),
        ("GET", "/api/v1/pods", Some("fieldSelector=metadata.name%3Db,metadata.name%3Da"), "R verb=list prefix=api v=v1 res=pods name=a parts=pods", "terms are sorted; the first exact match wins"),
        ("GET", "/api/v1/pods", Some("fieldSelector=metadata.name%20%3Dp1"), "R verb=list prefix=api v=v1 res=pods parts=pods", "the field is not trimmed"),
        ("GET", "/api/v1/pods", Some("fieldSelector=metadata.name%3D"), "R verb=list prefix=api v=v1 res=pods parts=pods", "an empty name leaves the name empty"),
        ("GET", "/api/v1/pods", Some("fieldSelector=metadata.name%3Da%5C,b"), "R verb=list prefix=api v=v1 res=pods name=a,b parts=pods", "backslash-escaped comma is data"),
        ("GET", "/api/v1/pods", Some("fieldSelector=metadata.name%3Dp%252Fq"), "R verb=list prefix=api v=v1 res=pods parts=pods", "a name with % is not a valid path segment name"),
        ("GET", "/api/v1/pods", Some("fieldSelector=metadata.name%3Dp%2Fq"), "R verb=list prefix=api v=v1 res=pods parts=pods", "a name with / is not a valid path segment name"),
        ("GET", "/api/v1/pods", Some("fieldSelector=metadata.name%3D.."), "R verb=list prefix=api v=v1 res=pods parts=pods", "'..' is not a valid path segment name"),
        ("GET", "/api/v1/pods", Some("fieldSelector=metadata.name%3Da%3Db"), "R verb=list prefix=api v=v1 res=pods parts=pods", "unescaped = in a value is a parse error: no name"),
        ("GET", "/api/v1/pods", Some("fieldSelector=garbage"), "R verb=list prefix=api v=v1 res=pods parts=pods", "malformed fieldSelector: list, no name"),
        ("GET", "/api/v1/pods", Some("fieldSelector=garbage&watch=true"), "R verb=watch prefix=api v=v1 res=pods parts=pods", "malformed fieldSelector: watch survives the fallback"),
        ("GET", "/api/v1/pods", Some("fieldSelector=metadata.name%3Dp1,garbage"), "R verb=list prefix=api v=v1 res=pods parts=pods", "one bad term spoils the whole selector"),
        ("GET", "/api/v1/pods", Some("fieldSelector=metadata.name%3Dp1&labelSelector=app%3Dweb,tier%20in%20(a,b)"), "R verb=list prefix=api v=v1 res=pods name=p1 parts=pods", "a valid labelSelector keeps the name"),
        ("GET", "/api/v1/pods", Some("fieldSelector=metadata.name%3Dp1&labelSelector=app%3D%3D%3D"), "R verb=list prefix=api v=v1 res=pods parts=pods", "a malformed labelSelector (app===) drops the name"),
        ("GET", "/api/v1/pods", Some("fieldSelector=metadata.name%3Dp1&limit=500&timeoutSeconds=30"), "R verb=list prefix=api v=v1 res=pods name=p1 parts=pods", "integer options that parse keep the name"),
        ("GET", "/api/v1/pods", Some("fieldSelector=metadata.name%3Dp1&limit=ten"), "R verb=list prefix=api v=v1 res=pods parts=pods", "a non-integer limit drops the name"),
        ("GET", "/api/v1/pods", Some("fieldSelector=metadata.name%3Dp1&timeoutSeconds="), "R verb=list prefix=api v=v1 res=pods parts=pods", "an empty timeoutSeconds fails ParseInt"),
        ("GET", "/api/v1/pods", Some("fieldSelector=metadata.name%3Dp1&continue=x&resourceVersionMatch=bogus"), "R verb=list prefix=api v=v1 res=pods name=p1 parts=pods", "string options never fail to decode"),
        ("GET", "/api/v1/pods", Some("fieldSelector=metadata.name%3Dp%ZZ"), "R verb=list prefix=api v=v1 res=pods parts=pods", "an undecodable pair is dropped"),
        ("GET", "/api/v1/pods", Some("fieldselector=metadata.name%3Dp1"), "R verb=list prefix=api v=v1 res=pods parts=pods", "fieldSelector key is case-sensitive"),
        ("DELETE", "/api/v1/namespaces/ns/pods", Some("fieldSelector=metadata.name%3Dp1"), "R verb=deletecollection prefix=api v=v1 ns=ns res=pods parts=pods", "only a get is narrowed by fieldSelector"),
        ("GET", "/api/v1/namespaces/ns/pods/p", Some("fieldSelector=metadata.name%3Dother"), "R verb=get prefix=api v=v1 ns=ns res=pods name=p parts=pods/p", "a named get ignores fieldSelector"),
        ("GET", "/api/v1/watch/pods", Some("fieldSelector=metadata.name%3Dp1"), "R verb=watch prefix=api v=v1 res=pods parts=pods", "path-verb watch does not read fieldSelector"),
        // --- trailing slash, names, CRDs, encoding ---
        ("GET", "/api/v1/namespaces/ns/pods/", None, "R verb=list prefix=api v=v1 ns=ns res=pods parts=pods", "trailing slash is trimmed for splitting; path keeps it"),
        ("GET", "/api/v1/namespaces/ns/pods/p/", None, "R verb=get prefix=api v=v1 ns=ns res=pods name=p parts=pods/p", "trailing slash after a name"),
        ("GET", "/api/v1/", None, "N verb=get", "trailing slash does not add a segment"),
        ("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com", None, "R verb=get prefix=apis group=apiextensions.k8s.io v=v1 res=customresourcedefinitions name=widgets.example.com parts=customresourcedefinitions/widgets.example.com", "names with dots"),
        ("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles/system:controller:foo", None, "R verb=get prefix=apis group=rbac.authorization.k8s.io v=v1 res=clusterroles name=system:controller:foo parts=clusterroles/system:controller:foo", "names with colons"),
        ("GET", "/apis/example.com/v1alpha1/namespaces/x/widgets/w", None, "R verb=get prefix=apis group=example.com v=v1alpha1 ns=x res=widgets name=w parts=widgets/w", "custom resource"),
        ("GET", "/apis/example.com/v1alpha1/widgets", Some("watch=true"), "R verb=watch prefix=apis group=example.com v=v1alpha1 res=widgets parts=widgets", "custom resource watch"),
        ("GET", "/api/v1/namespaces/ns/configmaps/my%3Acm", None, "R verb=get prefix=api v=v1 ns=ns res=configmaps name=my:cm parts=configmaps/my:cm path=/api/v1/namespaces/ns/configmaps/my:cm", "segments are percent-decoded; path is the decoded form"),
        ("GET", "/api/v1/namespaces/n%73/pods", None, "R verb=list prefix=api v=v1 ns=ns res=pods parts=pods path=/api/v1/namespaces/ns/pods", "decoding happens before the structural checks"),
        ("GET", "/%61pi/v1/pods", None, "R verb=list prefix=api v=v1 res=pods parts=pods path=/api/v1/pods", "even the prefix is matched after decoding"),
        ("GET", "/api/v1/namespaces/ns/configmaps/a+b", None, "R verb=get prefix=api v=v1 ns=ns res=configmaps name=a+b parts=configmaps/a+b", "+ is literal in a path"),
        ("GET", "/api/v1/namespaces/ns/configmaps/caf%C3%A9", None, "R verb=get prefix=api v=v1 ns=ns res=configmaps name=café parts=configmaps/café path=/api/v1/namespaces/ns/configmaps/café", "UTF-8 in a decoded segment"),
        ("GET", "/api/v1/namespaces/ns/pods", Some(""), "R verb=list prefix=api v=v1 ns=ns res=pods parts=pods", "an empty query is no query"),
    ];

    #[test]
    fn table() {
        assert!(CASES.len() >= 60);
        let mut failures = Vec::new();
        for (method, path, query, spec, why) in CASES {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let want = expected(path, spec);
            match request_info(&method, path, *query) {
                Ok(got) if got == want => {}
                other => failures.push(format!(
                    "{method} {path} ?{query:?}\n  why:  {why}\n  want: {want:?}\n  got:  {other:?}"
                )),
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn errors() {
        let get = Method::GET;
        assert_eq!(
            request_info(&get, "/api/v1/watch", None),
            Err(RequestInfoError::NothingAfterPathVerb("watch".into())),
            "kube answers 500 when nothing follows a path verb"
        );
        assert_eq!(
            request_info(&get, "/apis/apps/v1/proxy/", None),
            Err(RequestInfoError::NothingAfterPathVerb("proxy".into()))
        );
        assert_eq!(
            request_info(&get, "/api/v1/pods/bad%zz", None),
            Err(RequestInfoError::InvalidPathEscape("%zz".into())),
            "Go's url parser rejects a bad escape (net/http answers 400)"
        );
        assert_eq!(
            request_info(&get, "/api/v1/pods/bad%4", None),
            Err(RequestInfoError::InvalidPathEscape("%4".into()))
        );
        assert_eq!(
            request_info(&get, "/api/v1/pods/%ff", None),
            Err(RequestInfoError::PathNotUtf8)
        );
        assert_eq!(
            request_info(
                &get,
                "/api/v1/pods",
                Some("fieldSelector=metadata.name%3D%ff")
            ),
            Err(RequestInfoError::SelectorNameNotUtf8)
        );
        // Invalid UTF-8 *with* an escape is walked rune by rune in Go: U+FFFD per bad byte.
        let info = request_info(
            &get,
            "/api/v1/pods",
            Some("fieldSelector=metadata.name%3D%ff%5C%5C"),
        )
        .unwrap();
        assert_eq!(info.name, "\u{fffd}\\");
        // Go's default cap: 10000 parameters parse, 10001 do not.
        let at_cap = "a=1&".repeat(MAX_QUERY_PARAMS - 1) + "watch=1";
        assert_eq!(
            request_info(&get, "/api/v1/pods", Some(&at_cap))
                .unwrap()
                .verb,
            "watch"
        );
        let over_cap = "a=1&".repeat(MAX_QUERY_PARAMS) + "watch=1";
        assert_eq!(
            request_info(&get, "/api/v1/pods", Some(&over_cap)),
            Err(RequestInfoError::TooManyQueryParameters)
        );
        // The query is only read for list/watch.
        assert!(request_info(&Method::POST, "/api/v1/pods", Some(&over_cap)).is_ok());
    }

    #[test]
    fn authorizer_verbs() {
        let info = |method: &Method, path: &str| request_info(method, path, None).unwrap();
        let get = Method::GET;
        let post = Method::POST;
        for sub in ["exec", "attach", "portforward"] {
            let path = format!("/api/v1/namespaces/ns/pods/p/{sub}");
            let i = info(&get, &path);
            assert_eq!(i.verb, "get");
            assert_eq!(
                authorizer_verb(&i, &get, true),
                "create",
                "websocket GET {sub}"
            );
            assert_eq!(
                authorizer_verb(&i, &get, false),
                "create",
                "GET {sub} without websocket (e.g. SPDY upgrade over GET) still needs create"
            );
            assert_eq!(authorizer_checks(&i, &get), ("get", Some("create")));
            let i = info(&Method::HEAD, &path);
            assert_eq!(authorizer_verb(&i, &Method::HEAD, false), "create");
            let i = info(&post, &path);
            assert_eq!(
                authorizer_verb(&i, &post, false),
                "create",
                "SPDY POST {sub}"
            );
            assert_eq!(authorizer_checks(&i, &post), ("create", None));
        }
        let log = info(&get, "/api/v1/namespaces/ns/pods/p/log");
        assert_eq!(
            authorizer_verb(&log, &get, true),
            "get",
            "pods/log stays get"
        );
        assert_eq!(authorizer_checks(&log, &get), ("get", None));
        let proxy = info(&get, "/api/v1/namespaces/ns/pods/p/proxy/x");
        assert_eq!(
            authorizer_verb(&proxy, &get, true),
            "get",
            "pods/proxy stays get"
        );
        let node_proxy = info(&get, "/api/v1/nodes/n/proxy/x");
        assert_eq!(authorizer_verb(&node_proxy, &get, true), "get");
        let crd = info(&get, "/apis/example.com/v1/namespaces/ns/pods/p/exec");
        assert_eq!(
            authorizer_verb(&crd, &get, true),
            "get",
            "only core-group pods"
        );
        let watch = request_info(&get, "/api/v1/pods", Some("watch=1")).unwrap();
        assert_eq!(authorizer_verb(&watch, &get, true), "watch");
        let path_watch = info(&get, "/api/v1/watch/namespaces/ns/pods/p/exec");
        assert_eq!(authorizer_verb(&path_watch, &get, true), "watch");
        let non_resource = info(&get, "/healthz");
        assert_eq!(authorizer_verb(&non_resource, &get, true), "get");
    }

    #[test]
    fn label_selectors() {
        let valid = [
            "",
            "app",
            "!app",
            "app=web",
            "app==web",
            "app!=web",
            "app=",
            "app in (a,b)",
            "app notin (a)",
            "app in ()",
            "app in (,a)",
            "app in (in,notin)",
            "in=notin",
            "x in (foo,,baz),y,z notin ()",
            "replicas>3",
            "replicas<3",
            "app==",
            "example.com/app=web",
            "a.b-c_d=E.f-G_h",
            " app = web , tier ",
            "app \u{0}garbage",
        ];
        for sel in valid {
            assert!(label_selector_is_valid(sel.as_bytes()).is_ok(), "{sel:?}");
        }
        let invalid = [
            "app in",
            "app in (a",
            "app in a",
            "app=web=x",
            "=web",
            ",app",
            "app,",
            "!app=web",
            "app=we b",
            "replicas>x",
            "replicas>",
            "replicas<-3",
            "app===",
            "-app",
            "app-=x",
            "app=-x",
            "Example.com/app",
            "a/b/c",
            "/app",
            "app=caf\u{e9}",
            "app>=3",
            "app, \u{0}x",
            &"a".repeat(64),
        ];
        for sel in invalid {
            assert!(label_selector_is_valid(sel.as_bytes()).is_err(), "{sel:?}");
        }
    }
}
