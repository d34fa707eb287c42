//! Kubernetes' legacy ABAC policy files (`--authorization-policy-file`) translated into Cedar.
//!
//! An ABAC file holds one JSON policy object per line; blank lines and lines starting with `#`
//! are skipped. [`to_cedar`] turns every policy line into one Cedar `permit` (on the same line
//! of the output, so that parse and validation errors of the generated text point at the ABAC
//! line) which the policy engine then validates and evaluates like any other policy.
//!
//! The translation reproduces kube-apiserver's ABAC authorizer (`pkg/auth/authorizer/abac`):
//!
//! * versions: `abac.authorization.kubernetes.io/v1beta1` (`{"apiVersion", "kind": "Policy",
//!   "spec": {...}}`) and the legacy v0 form (`{"user": "alice", ...}` with the fields at the
//!   top level, with or without `"apiVersion": "abac.authorization.kubernetes.io/v0"`), each
//!   converted to the internal form exactly as kube converts it (v0: an empty user and group is
//!   `system:authenticated`, an empty namespace or resource is `*`, the API group is always `*`,
//!   and empty namespace and resource also allow every non-resource path; both versions: a user
//!   or group of `*` becomes group `system:authenticated` and drops the user).
//! * subject: `user` equals the user name and `group` is one of the caller's groups (both must
//!   hold when both are given); neither matches nobody. `system:authenticated` matches every
//!   caller (the gateway only ever sees authenticated callers) and `system:unauthenticated`
//!   matches none.
//! * verb: `readonly` allows get, list and watch only (kube's `IsReadOnly`); otherwise every
//!   verb. ABAC lines never allow `impersonate`, which the gateway decides on its own resource
//!   types.
//! * resource requests: `namespace`, `resource` and `apiGroup` each equal the request's, or are
//!   `*`; an empty value matches only an empty one (`namespace: ""` only cluster-scoped requests,
//!   `apiGroup: ""` only the core group).
//! * non-resource requests: `nonResourcePath` is `*`, the exact path, or `/prefix/*` for every
//!   path starting with `/prefix/`.
//!
//! One deliberate difference: subresources are part of the resource. `"resource": "pods"`
//! matches only requests without a subresource (so it grants neither `pods/exec` nor `pods/log`)
//! and `"resource": "pods/log"` matches the `log` subresource of pods; `*` still matches
//! everything. kube's ABAC ignores subresources, which lets a read-only `pods` rule open
//! `pods/exec` and `pods/attach` (authorized as `get` by older kube-apiservers).
//!
//! Stricter than kube, by design: unknown fields, a missing or unsupported `apiVersion`, a
//! `kind` other than `Policy` and values of the wrong type are errors, where kube ignores
//! unknown fields and reads a line with an unregistered `apiVersion` or without a `kind` as a v0
//! policy (which, its v1beta1 fields ignored, grants everything to everyone).

use std::fmt::Write as _;

use serde::Deserialize;

/// A problem in an ABAC policy file. `line` and `column` are 1-based (`column` in characters).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{origin}:{line}:{column}: {message}")]
pub struct AbacError {
    pub origin: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// What is wrong with one line of an ABAC file (the text of [`AbacError::message`]).
#[derive(Debug, thiserror::Error)]
enum LineError {
    /// Not JSON, or JSON that is not a policy of the version it names.
    #[error("{what}: {}{}", json_message(source), json_hint(source))]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("expected a JSON object (one ABAC policy per line)")]
    NotAnObject,
    #[error("apiVersion must be a string")]
    ApiVersionNotString,
    #[error(
        "unsupported apiVersion {0:?} (expected {V1BETA1:?}, or {V0:?} for the unversioned form)"
    )]
    UnsupportedApiVersion(String),
    /// kube would read the line as an unversioned policy, ignoring `spec`.
    #[error("missing apiVersion (expected {V1BETA1:?})")]
    MissingApiVersion,
    #[error("unsupported kind {0:?} (expected \"Policy\")")]
    UnsupportedKind(String),
    #[error("missing kind (expected \"Policy\")")]
    MissingKind,
}

const V1BETA1: &str = "abac.authorization.kubernetes.io/v1beta1";
const V0: &str = "abac.authorization.kubernetes.io/v0";
const ALL_AUTHENTICATED: &str = "system:authenticated";
const ALL_UNAUTHENTICATED: &str = "system:unauthenticated";

/// `{"apiVersion": ".../v1beta1", "kind": "Policy", "spec": {...}}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct V1beta1Policy {
    #[allow(dead_code)]
    api_version: String,
    kind: Option<String>,
    spec: V1beta1Spec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct V1beta1Spec {
    user: Option<String>,
    group: Option<String>,
    readonly: Option<bool>,
    api_group: Option<String>,
    resource: Option<String>,
    namespace: Option<String>,
    non_resource_path: Option<String>,
}

/// The unversioned (v0) form, optionally with `"apiVersion": ".../v0", "kind": "Policy"`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct V0Policy {
    #[allow(dead_code)]
    api_version: Option<String>,
    kind: Option<String>,
    user: Option<String>,
    group: Option<String>,
    readonly: Option<bool>,
    resource: Option<String>,
    namespace: Option<String>,
}

/// kube's internal `abac.Policy` spec, after version conversion.
#[derive(Debug, Default, PartialEq, Eq)]
struct Rule {
    user: String,
    group: String,
    readonly: bool,
    api_group: String,
    resource: String,
    namespace: String,
    non_resource_path: String,
}

impl From<V1beta1Spec> for Rule {
    fn from(s: V1beta1Spec) -> Rule {
        let mut rule = Rule {
            user: s.user.unwrap_or_default(),
            group: s.group.unwrap_or_default(),
            readonly: s.readonly.unwrap_or(false),
            api_group: s.api_group.unwrap_or_default(),
            resource: s.resource.unwrap_or_default(),
            namespace: s.namespace.unwrap_or_default(),
            non_resource_path: s.non_resource_path.unwrap_or_default(),
        };
        // v1beta1 conversion: a user or group of "*" means every authenticated subject, and
        // the other of the two is dropped.
        if rule.user == "*" || rule.group == "*" {
            rule.group = ALL_AUTHENTICATED.to_owned();
            rule.user.clear();
        }
        rule
    }
}

impl From<V0Policy> for Rule {
    fn from(p: V0Policy) -> Rule {
        let user = p.user.unwrap_or_default();
        let group = p.group.unwrap_or_default();
        let namespace = p.namespace.unwrap_or_default();
        let resource = p.resource.unwrap_or_default();
        let mut rule = Rule {
            readonly: p.readonly.unwrap_or(false),
            // Every v0 rule matches all API groups.
            api_group: "*".to_owned(),
            // An empty namespace and resource also allow every non-resource path.
            non_resource_path: if namespace.is_empty() && resource.is_empty() {
                "*".to_owned()
            } else {
                String::new()
            },
            // An empty namespace (resource) matches every namespace (resource).
            namespace: if namespace.is_empty() {
                "*".to_owned()
            } else {
                namespace
            },
            resource: if resource.is_empty() {
                "*".to_owned()
            } else {
                resource
            },
            user,
            group,
        };
        // No user and no group: every authenticated subject.
        if rule.user.is_empty() && rule.group.is_empty() {
            rule.group = ALL_AUTHENTICATED.to_owned();
        }
        if rule.user == "*" || rule.group == "*" {
            rule.group = ALL_AUTHENTICATED.to_owned();
            rule.user.clear();
        }
        rule
    }
}

/// Translates an ABAC policy file into Cedar policy text. Each non-empty, non-comment line
/// becomes one `permit` with `@id("<origin>:<line>")`; errors name the line (and column when
/// serde_json gives one).
///
/// Line N of the output is the translation of line N of the input (blank lines stay blank,
/// `#` comments become `//` comments), so positions the policy engine reports in the generated
/// text are on the ABAC line they came from.
pub fn to_cedar(origin: &str, text: &str) -> Result<String, Vec<AbacError>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = String::with_capacity(text.len() * 2);
    let mut errors = Vec::new();
    for (index, raw) in text.split('\n').enumerate() {
        let number = index + 1;
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if index > 0 {
            out.push('\n');
        }
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        if let Some(comment) = trimmed.strip_prefix('#') {
            out.push_str("//");
            out.push_str(&comment_safe(comment));
            continue;
        }
        match parse_line(line) {
            Ok(rule) => out.push_str(&permit(origin, number, &rule, trimmed)),
            Err((column, e)) => errors.push(AbacError {
                origin: origin.to_owned(),
                line: number,
                column,
                message: e.to_string(),
            }),
        }
    }
    if errors.is_empty() {
        if !out.ends_with('\n') {
            out.push('\n');
        }
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Parses one policy line into kube's internal form; errors carry a 1-based character column.
fn parse_line(line: &str) -> Result<Rule, (usize, LineError)> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| json_error(line, e, "invalid JSON"))?;
    let Some(object) = value.as_object() else {
        return Err((first_column(line), LineError::NotAnObject));
    };
    let column_of = |key: &str| {
        line.find(&format!("\"{key}\""))
            .map_or_else(|| first_column(line), |i| char_column(line, i))
    };
    let api_version = match object.get("apiVersion") {
        None => None,
        Some(serde_json::Value::String(v)) => Some(v.as_str()),
        Some(_) => {
            return Err((column_of("apiVersion"), LineError::ApiVersionNotString));
        }
    };
    let rule = match api_version {
        Some(V1BETA1) => {
            let p: V1beta1Policy =
                serde_json::from_str(line).map_err(|e| json_error(line, e, "bad policy"))?;
            check_kind(p.kind.as_deref()).map_err(|m| (column_of("kind"), m))?;
            Rule::from(p.spec)
        }
        Some(V0) => {
            let p: V0Policy =
                serde_json::from_str(line).map_err(|e| json_error(line, e, "bad policy"))?;
            check_kind(p.kind.as_deref()).map_err(|m| (column_of("kind"), m))?;
            Rule::from(p)
        }
        Some(other) => {
            return Err((
                column_of("apiVersion"),
                LineError::UnsupportedApiVersion(other.to_owned()),
            ));
        }
        None if object.contains_key("kind") || object.contains_key("spec") => {
            // kube would read this line as an unversioned policy, ignoring `spec`.
            return Err((first_column(line), LineError::MissingApiVersion));
        }
        None => {
            let p: V0Policy =
                serde_json::from_str(line).map_err(|e| json_error(line, e, "bad policy"))?;
            Rule::from(p)
        }
    };
    Ok(rule)
}

fn check_kind(kind: Option<&str>) -> Result<(), LineError> {
    match kind {
        Some("Policy") => Ok(()),
        Some(other) => Err(LineError::UnsupportedKind(other.to_owned())),
        None => Err(LineError::MissingKind),
    }
}

/// A serde_json error as (character column, error). serde_json counts columns in bytes.
fn json_error(line: &str, e: serde_json::Error, what: &'static str) -> (usize, LineError) {
    let column = if e.line() == 0 || e.column() == 0 {
        first_column(line)
    } else {
        // serde_json points at the last byte it read; for a string token (an unknown key, a
        // string of the wrong type) point at its opening quote instead.
        let mut at = e.column().min(line.len()) - 1;
        if line.as_bytes()[at] == b'"' {
            at = string_start(line, at);
        }
        while !line.is_char_boundary(at) {
            at -= 1;
        }
        char_column(line, at)
    };
    (column, LineError::Json { what, source: e })
}

/// serde_json's message without the " at line L column C" it appends (the error carries the
/// position already).
fn json_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

fn json_hint(e: &serde_json::Error) -> &'static str {
    if json_message(e).starts_with("unknown field") {
        " (ABAC field names are case-sensitive; unknown fields are rejected)"
    } else {
        ""
    }
}

/// Byte index of the opening quote of the JSON string whose closing quote is at `close`.
fn string_start(line: &str, close: usize) -> usize {
    let bytes = line.as_bytes();
    let mut i = close;
    while i > 0 {
        i -= 1;
        if bytes[i] == b'"' {
            let backslashes = bytes[..i].iter().rev().take_while(|&&b| b == b'\\').count();
            if backslashes % 2 == 0 {
                return i;
            }
        }
    }
    close
}

/// Column (1-based, in characters) of the first non-blank character.
fn first_column(line: &str) -> usize {
    line.len() - line.trim_start().len() + 1
}

fn char_column(line: &str, byte: usize) -> usize {
    line[..byte].chars().count() + 1
}

/// The Cedar `permit` for one rule, on a single line, followed by the source as a comment.
fn permit(origin: &str, number: usize, rule: &Rule, source: &str) -> String {
    let mut principal = "principal".to_owned();
    let mut conditions: Vec<String> = Vec::new();
    let mut matches_nobody = false;

    // Subject. After conversion a "*" user or group has become group system:authenticated.
    if rule.user.is_empty() && rule.group.is_empty() {
        matches_nobody = true;
    }
    if !rule.user.is_empty() {
        // `name` is the user name forwarded to kube-apiserver, for users and workloads alike.
        conditions.push(format!("principal.name == {}", lit(&rule.user)));
    }
    match rule.group.as_str() {
        "" | ALL_AUTHENTICATED => {}
        ALL_UNAUTHENTICATED => matches_nobody = true,
        group => principal = format!("principal in k8s::Group::{}", lit(group)),
    }

    let action = if rule.readonly {
        r#"action in [k8s::Action::"get", k8s::Action::"list", k8s::Action::"watch"]"#
    } else {
        "action"
    };

    // Resource requests (kube's resourceMatches, with subresources).
    let mut resource_conditions: Vec<String> = Vec::new();
    let mut namespace_scope = None;
    match rule.namespace.as_str() {
        "*" => {}
        "" => resource_conditions.push(r#"resource.namespace == """#.to_owned()),
        ns => namespace_scope = Some(ns),
    }
    if rule.resource != "*" {
        let (resource, subresource) = rule
            .resource
            .split_once('/')
            .unwrap_or((rule.resource.as_str(), ""));
        resource_conditions.push(format!("resource.resource == {}", lit(resource)));
        resource_conditions.push(format!("resource.subresource == {}", lit(subresource)));
    }
    if rule.api_group != "*" {
        resource_conditions.push(format!("resource.apiGroup == {}", lit(&rule.api_group)));
    }

    // Non-resource requests (kube's nonResourceMatches). An empty path matches none.
    let path = rule.non_resource_path.as_str();
    let non_resource_condition = if path.is_empty() {
        None
    } else if let Some(prefix) = path.strip_suffix('*') {
        // kube trims every trailing '*' and matches the rest as a prefix.
        let prefix = prefix.trim_end_matches('*');
        Some(if prefix.is_empty() {
            None
        } else {
            Some(format!("resource.path like {}", like_prefix(prefix)))
        })
    } else {
        Some(Some(format!("resource.path == {}", lit(path))))
    };

    let resource = match non_resource_condition {
        None => {
            // Resource requests only: the namespace goes into the scope (the engine slices
            // policies by it); `resource in k8s::Namespace::"ns"` is `resource.namespace == "ns"`.
            conditions.extend(resource_conditions);
            match namespace_scope {
                Some(ns) => format!("resource is k8s::Resource in k8s::Namespace::{}", lit(ns)),
                None => "resource is k8s::Resource".to_owned(),
            }
        }
        Some(non_resource) => {
            if let Some(ns) = namespace_scope {
                resource_conditions.insert(0, format!("resource.namespace == {}", lit(ns)));
            }
            let mut api = vec!["resource is k8s::Resource".to_owned()];
            api.extend(resource_conditions);
            let mut other = vec!["resource is k8s::NonResourceURL".to_owned()];
            other.extend(non_resource);
            conditions.push(format!(
                "(({}) || ({}))",
                api.join(" && "),
                other.join(" && ")
            ));
            "resource".to_owned()
        }
    };

    if matches_nobody {
        // kube accepts such a line and never matches it; the validator warns about it.
        conditions = vec!["false".to_owned()];
    }
    let mut out = String::new();
    let _ = write!(
        out,
        "@id({}) permit ({principal}, {action}, {resource})",
        lit(&format!("{origin}:{number}"))
    );
    if !conditions.is_empty() {
        let _ = write!(out, " when {{ {} }}", conditions.join(" && "));
    }
    out.push_str("; // ");
    if matches_nobody {
        out.push_str("matches nobody: ");
    }
    out.push_str(&comment_safe(source));
    out
}

/// A Cedar string literal.
fn lit(s: &str) -> String {
    escape(s, false)
}

/// A Cedar `like` pattern matching every string that starts with `prefix`.
fn like_prefix(prefix: &str) -> String {
    let mut pattern = escape(prefix, true);
    pattern.insert(pattern.len() - 1, '*');
    pattern
}

fn escape(s: &str, pattern: bool) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '*' if pattern => out.push_str("\\*"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Text safe to put in a `//` comment: no line breaks.
fn comment_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
                ' '
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::{Duration, SystemTime};

    use http::Method;

    use super::*;
    use crate::authn::CredentialFacts;
    use crate::authz::cedar::{
        ImpersonationKind, ImpersonationTarget, PolicyEngine, RequestFacts, Subject,
    };
    use crate::authz::requestinfo::{authorizer_checks, request_info, RequestInfo};

    const ORIGIN: &str = "abac.jsonl";

    /// The example file of https://kubernetes.io/docs/reference/access-authn-authz/abac/.
    const KUBE_DOCS_EXAMPLE: &str = r#"# Alice can do anything to all resources
{"apiVersion": "abac.authorization.kubernetes.io/v1beta1", "kind": "Policy", "spec": {"user": "alice", "namespace": "*", "resource": "*", "apiGroup": "*"}}

# The kubelet can read any pods
{"apiVersion": "abac.authorization.kubernetes.io/v1beta1", "kind": "Policy", "spec": {"user": "kubelet", "namespace": "*", "resource": "pods", "readonly": true}}
# The kubelet can read and write events
{"apiVersion": "abac.authorization.kubernetes.io/v1beta1", "kind": "Policy", "spec": {"user": "kubelet", "namespace": "*", "resource": "events"}}
# Bob can just read pods in namespace "projectCaribou"
{"apiVersion": "abac.authorization.kubernetes.io/v1beta1", "kind": "Policy", "spec": {"user": "bob", "namespace": "projectCaribou", "resource": "pods", "readonly": true}}
# Anyone can make read-only requests to all non-resource paths
{"apiVersion": "abac.authorization.kubernetes.io/v1beta1", "kind": "Policy", "spec": {"group": "system:authenticated", "readonly": true, "nonResourcePath": "*"}}
{"apiVersion": "abac.authorization.kubernetes.io/v1beta1", "kind": "Policy", "spec": {"group": "system:unauthenticated", "readonly": true, "nonResourcePath": "*"}}
"#;

    fn translate(text: &str) -> String {
        to_cedar(ORIGIN, text).unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn engine(text: &str) -> PolicyEngine {
        let cedar = translate(text);
        PolicyEngine::from_sources(&[(ORIGIN.into(), cedar.clone())])
            .unwrap_or_else(|e| panic!("{e}\n--- generated:\n{cedar}"))
    }

    /// A v1beta1 line with the given spec.
    fn v1(spec: &str) -> String {
        format!(
            r#"{{"apiVersion": "abac.authorization.kubernetes.io/v1beta1", "kind": "Policy", "spec": {spec}}}"#
        )
    }

    struct Caller {
        user: String,
        groups: Vec<String>,
        method: &'static str,
        facts: CredentialFacts,
    }

    fn caller(user: &str, groups: &[&str]) -> Caller {
        Caller {
            user: user.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            method: "oidc",
            facts: CredentialFacts::default(),
        }
    }

    impl Caller {
        fn subject(&self) -> Subject<'_> {
            Subject {
                user: &self.user,
                uid: None,
                groups: &self.groups,
                method: self.method,
                facts: &self.facts,
            }
        }
    }

    fn facts<'a>(info: &'a RequestInfo, verb: &'a str) -> RequestFacts<'a> {
        RequestFacts {
            info,
            verb,
            source_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            now: SystemTime::UNIX_EPOCH + Duration::from_secs(1_704_103_200),
            device: None,
            websocket: false,
        }
    }

    /// The gateway's decision for `method target` (target = path with optional `?query`),
    /// including the extra `create` check of exec/attach/portforward.
    fn allowed(engine: &PolicyEngine, who: &Caller, method: &str, target: &str) -> bool {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        let info = request_info(&method, path, query).unwrap();
        let (first, second) = authorizer_checks(&info, &method);
        let decision = engine.decide_subject(&who.subject(), &facts(&info, first));
        assert!(decision.errors.is_empty(), "{:?}", decision.errors);
        match (decision.allowed, second) {
            (true, Some(verb)) => {
                let d = engine.decide_subject(&who.subject(), &facts(&info, verb));
                assert!(d.errors.is_empty(), "{:?}", d.errors);
                d.allowed
            }
            (allowed, _) => allowed,
        }
    }

    fn errors(text: &str) -> Vec<AbacError> {
        match to_cedar(ORIGIN, text) {
            Ok(cedar) => panic!("expected errors, got:\n{cedar}"),
            Err(e) => e,
        }
    }

    #[test]
    fn kube_docs_example_validates_and_decides_as_kube() {
        let e = engine(KUBE_DOCS_EXAMPLE);
        assert_eq!(e.policy_count(), 6);
        // The system:unauthenticated line matches nobody here; the validator says so, on the
        // ABAC file's own line.
        let warnings = e.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("abac.jsonl:12:1: ") && warnings[0].contains("impossible"),
            "{warnings:?}"
        );
        let alice = caller("alice", &[]);
        let kubelet = caller("kubelet", &["system:nodes"]);
        let bob = caller("bob", &["dev"]);
        let carol = caller("carol", &[]);

        // Alice can do anything to all resources, in every namespace and group.
        assert!(allowed(
            &e,
            &alice,
            "POST",
            "/apis/apps/v1/namespaces/x/deployments"
        ));
        assert!(allowed(&e, &alice, "DELETE", "/api/v1/nodes/n1"));
        assert!(allowed(&e, &alice, "GET", "/api/v1/pods?watch=true"));
        // ... but her line has no nonResourcePath: non-resource reads come from the
        // system:authenticated line, writes from nothing.
        assert!(allowed(&e, &alice, "GET", "/version"));
        assert!(!allowed(&e, &alice, "POST", "/logs"));

        // The kubelet reads pods everywhere (core group only) ...
        assert!(allowed(&e, &kubelet, "GET", "/api/v1/pods"));
        assert!(allowed(&e, &kubelet, "GET", "/api/v1/namespaces/a/pods/p"));
        assert!(allowed(
            &e,
            &kubelet,
            "GET",
            "/api/v1/namespaces/a/pods?watch=1"
        ));
        assert!(!allowed(
            &e,
            &kubelet,
            "DELETE",
            "/api/v1/namespaces/a/pods/p"
        ));
        assert!(!allowed(
            &e,
            &kubelet,
            "GET",
            "/apis/metrics.k8s.io/v1beta1/pods"
        ));
        assert!(!allowed(
            &e,
            &kubelet,
            "GET",
            "/api/v1/namespaces/a/secrets"
        ));
        // ... and reads and writes events.
        assert!(allowed(&e, &kubelet, "POST", "/api/v1/namespaces/a/events"));
        assert!(allowed(
            &e,
            &kubelet,
            "PATCH",
            "/api/v1/namespaces/a/events/e"
        ));

        // Bob just reads pods in projectCaribou.
        assert!(allowed(
            &e,
            &bob,
            "GET",
            "/api/v1/namespaces/projectCaribou/pods"
        ));
        assert!(allowed(
            &e,
            &bob,
            "GET",
            "/api/v1/namespaces/projectCaribou/pods/p"
        ));
        assert!(!allowed(
            &e,
            &bob,
            "POST",
            "/api/v1/namespaces/projectCaribou/pods"
        ));
        assert!(!allowed(&e, &bob, "GET", "/api/v1/namespaces/other/pods"));
        assert!(!allowed(&e, &bob, "GET", "/api/v1/pods"));
        assert!(!allowed(
            &e,
            &bob,
            "GET",
            "/api/v1/namespaces/projectCaribou/services"
        ));

        // Anyone reads every non-resource path, and nothing else.
        for who in [&alice, &kubelet, &bob, &carol] {
            assert!(allowed(&e, who, "GET", "/healthz"));
            assert!(allowed(&e, who, "GET", "/apis"));
            assert!(allowed(&e, who, "GET", "/openapi/v3/apis/apps/v1"));
            assert!(!allowed(&e, who, "POST", "/healthz"));
            // HEAD is verb "head", not read-only for kube.
            assert!(!allowed(&e, who, "HEAD", "/healthz"));
        }
        assert!(!allowed(&e, &carol, "GET", "/api/v1/namespaces/a/pods"));
    }

    #[test]
    fn output_is_line_aligned_and_carries_ids() {
        let cedar = translate(KUBE_DOCS_EXAMPLE);
        let lines: Vec<&str> = cedar.lines().collect();
        assert_eq!(lines.len(), KUBE_DOCS_EXAMPLE.lines().count());
        for (i, (src, out)) in KUBE_DOCS_EXAMPLE.lines().zip(&lines).enumerate() {
            if src.starts_with('{') {
                assert!(out.starts_with(&format!("@id(\"abac.jsonl:{}\") permit (", i + 1)));
            } else if src.starts_with('#') {
                assert!(out.starts_with("//"), "{out}");
            } else {
                assert!(out.is_empty());
            }
        }
        assert_eq!(
            lines[4],
            r#"@id("abac.jsonl:5") permit (principal, action in [k8s::Action::"get", k8s::Action::"list", k8s::Action::"watch"], resource is k8s::Resource) when { principal.name == "kubelet" && resource.resource == "pods" && resource.subresource == "" && resource.apiGroup == "" }; // {"apiVersion": "abac.authorization.kubernetes.io/v1beta1", "kind": "Policy", "spec": {"user": "kubelet", "namespace": "*", "resource": "pods", "readonly": true}}"#
        );
        assert!(
            lines[8].contains(r#"resource is k8s::Resource in k8s::Namespace::"projectCaribou""#)
        );
        assert!(lines[11].contains("when { false }; // matches nobody: "));

        // The second example of docs/policy.md.
        let ops = translate(&v1(
            r#"{"group": "ops", "readonly": true, "nonResourcePath": "/metrics/*"}"#,
        ));
        assert!(ops.starts_with(
            r#"@id("abac.jsonl:1") permit (principal in k8s::Group::"ops", action in [k8s::Action::"get", k8s::Action::"list", k8s::Action::"watch"], resource) when { ((resource is k8s::Resource && resource.namespace == "" && resource.resource == "" && resource.subresource == "" && resource.apiGroup == "") || (resource is k8s::NonResourceURL && resource.path like "/metrics/*")) }; // "#
        ), "{ops}");
    }

    #[test]
    fn subresources_need_their_own_rule() {
        let e = engine(&[
            v1(r#"{"user": "viewer", "namespace": "*", "resource": "pods", "readonly": true}"#),
            v1(r#"{"user": "logs", "namespace": "*", "resource": "pods/log", "readonly": true}"#),
            v1(r#"{"user": "ops", "namespace": "*", "resource": "pods/exec"}"#),
            v1(r#"{"user": "admin", "namespace": "*", "resource": "*", "apiGroup": "*"}"#),
            v1(r#"{"user": "reader", "namespace": "*", "resource": "*", "apiGroup": "*", "readonly": true}"#),
        ].join("\n"));
        let pod = "/api/v1/namespaces/a/pods/p";
        let log = "/api/v1/namespaces/a/pods/p/log";
        let exec = "/api/v1/namespaces/a/pods/p/exec?command=sh";

        // kube would let a read-only "pods" rule read logs and (before 1.35) exec; here not.
        let viewer = caller("viewer", &[]);
        assert!(allowed(&e, &viewer, "GET", pod));
        assert!(!allowed(&e, &viewer, "GET", log));
        assert!(!allowed(&e, &viewer, "GET", exec));
        assert!(!allowed(
            &e,
            &viewer,
            "GET",
            "/api/v1/namespaces/a/pods/p/status"
        ));

        // "pods/log" grants the subresource, and only it.
        let logs = caller("logs", &[]);
        assert!(allowed(&e, &logs, "GET", log));
        assert!(!allowed(&e, &logs, "GET", pod));
        assert!(!allowed(&e, &logs, "GET", exec));

        let ops = caller("ops", &[]);
        assert!(allowed(&e, &ops, "GET", exec)); // get, then create
        assert!(allowed(&e, &ops, "POST", exec));
        assert!(!allowed(&e, &ops, "GET", pod));

        // "*" still matches every subresource.
        let admin = caller("admin", &[]);
        assert!(allowed(&e, &admin, "GET", exec));
        assert!(allowed(&e, &admin, "GET", log));
        let reader = caller("reader", &[]);
        assert!(allowed(&e, &reader, "GET", log));
        // A read-only rule allows exec's `get` but not its `create`.
        assert!(!allowed(&e, &reader, "GET", exec));
    }

    #[test]
    fn subjects_match_as_in_kube() {
        let e = engine(&[
            v1(r#"{"user": "u1", "group": "g1", "namespace": "*", "resource": "configmaps"}"#),
            v1(r#"{"group": "g2", "namespace": "*", "resource": "secrets"}"#),
            // kube's v1beta1 conversion: "*" user means everyone, and the group is dropped.
            v1(r#"{"user": "*", "group": "g3", "namespace": "*", "resource": "services"}"#),
            v1(r#"{"user": "u4", "group": "*", "namespace": "*", "resource": "endpoints"}"#),
            // Neither user nor group: matches nobody (but loads).
            v1(r#"{"namespace": "*", "resource": "*", "apiGroup": "*"}"#),
            v1(r#"{"group": "system:unauthenticated", "namespace": "*", "resource": "*", "apiGroup": "*"}"#),
            v1(r#"{"user": "spiffe://example.org/ns/ci/sa/deployer", "namespace": "ci", "resource": "deployments", "apiGroup": "apps"}"#),
        ].join("\n"));
        let cm = "/api/v1/namespaces/a/configmaps";
        assert!(allowed(&e, &caller("u1", &["g1"]), "GET", cm));
        assert!(!allowed(&e, &caller("u1", &["other"]), "GET", cm));
        assert!(!allowed(&e, &caller("u9", &["g1"]), "GET", cm));

        let secrets = "/api/v1/namespaces/a/secrets";
        assert!(allowed(&e, &caller("anyone", &["x", "g2"]), "GET", secrets));
        assert!(!allowed(&e, &caller("anyone", &["x"]), "GET", secrets));

        assert!(allowed(
            &e,
            &caller("zed", &[]),
            "POST",
            "/api/v1/namespaces/a/services"
        ));
        assert!(allowed(
            &e,
            &caller("zed", &[]),
            "POST",
            "/api/v1/namespaces/a/endpoints"
        ));

        let nobody = caller("nobody", &["system:unauthenticated"]);
        assert!(!allowed(&e, &nobody, "GET", "/api/v1/namespaces/a/pods"));
        assert!(!allowed(&e, &nobody, "GET", "/api/v1/nodes"));

        // A user name matches workloads too: it is the name forwarded to kube-apiserver.
        let mut workload = caller("spiffe://example.org/ns/ci/sa/deployer", &[]);
        workload.method = "x509";
        assert!(workload.subject().is_workload());
        let deploy = "/apis/apps/v1/namespaces/ci/deployments";
        assert!(allowed(&e, &workload, "POST", deploy));
        assert!(!allowed(
            &e,
            &workload,
            "POST",
            "/apis/apps/v1/namespaces/prod/deployments"
        ));
    }

    #[test]
    fn namespace_and_api_group_empty_match_only_empty() {
        let e = engine(
            &[
                v1(r#"{"user": "cluster", "namespace": "", "resource": "*", "apiGroup": "*"}"#),
                v1(r#"{"user": "core", "namespace": "*", "resource": "*"}"#),
            ]
            .join("\n"),
        );
        let cluster = caller("cluster", &[]);
        assert!(allowed(&e, &cluster, "GET", "/api/v1/nodes"));
        assert!(allowed(
            &e,
            &cluster,
            "DELETE",
            "/apis/rbac.authorization.k8s.io/v1/clusterroles/x"
        ));
        // Listing across all namespaces has an empty namespace, in kube too.
        assert!(allowed(&e, &cluster, "GET", "/api/v1/pods"));
        assert!(!allowed(&e, &cluster, "GET", "/api/v1/namespaces/a/pods"));
        assert!(!allowed(&e, &cluster, "GET", "/version"));

        let core = caller("core", &[]);
        assert!(allowed(&e, &core, "GET", "/api/v1/namespaces/a/pods"));
        assert!(allowed(&e, &core, "GET", "/api/v1/nodes"));
        assert!(!allowed(
            &e,
            &core,
            "GET",
            "/apis/apps/v1/namespaces/a/deployments"
        ));
    }

    #[test]
    fn non_resource_paths() {
        let e = engine(
            &[
                v1(r#"{"user": "exact", "nonResourcePath": "/healthz"}"#),
                v1(r#"{"user": "prefix", "nonResourcePath": "/foo/*", "readonly": true}"#),
                v1(r#"{"user": "star", "nonResourcePath": "/a*b**"}"#),
                v1(r#"{"user": "all", "nonResourcePath": "**"}"#),
            ]
            .join("\n"),
        );
        let exact = caller("exact", &[]);
        assert!(allowed(&e, &exact, "GET", "/healthz"));
        assert!(allowed(&e, &exact, "POST", "/healthz"));
        assert!(!allowed(&e, &exact, "GET", "/healthz/ping"));
        assert!(!allowed(&e, &exact, "GET", "/api/v1/namespaces/a/pods"));

        let prefix = caller("prefix", &[]);
        assert!(allowed(&e, &prefix, "GET", "/foo/"));
        assert!(allowed(&e, &prefix, "GET", "/foo/bar/baz"));
        assert!(!allowed(&e, &prefix, "GET", "/foo"));
        assert!(!allowed(&e, &prefix, "GET", "/foobar"));
        assert!(!allowed(&e, &prefix, "PUT", "/foo/bar"));

        // Inner '*' is literal; only the trailing ones make a prefix.
        let star = caller("star", &[]);
        assert!(allowed(&e, &star, "GET", "/a*b"));
        assert!(allowed(&e, &star, "DELETE", "/a*bc/d"));
        assert!(!allowed(&e, &star, "GET", "/axb"));

        let all = caller("all", &[]);
        assert!(allowed(&e, &all, "OPTIONS", "/anything"));
        assert!(allowed(&e, &all, "GET", "/"));
        // Resource fields are all empty: only (malformed) resource requests with empty
        // resource, namespace and group match, exactly as in kube.
        assert!(!allowed(&e, &all, "GET", "/api/v1/nodes"));
        assert!(allowed(&e, &all, "GET", "/api/v1//x"));
    }

    #[test]
    fn unversioned_lines_convert_as_in_kube() {
        let e = engine(
            r#"{"user":"admin"}
{"user":"scheduler", "readonly": true, "resource": "pods"}
{"user":"alice", "namespace": "projectCaribou"}
{"readonly": true}
{"apiVersion": "abac.authorization.kubernetes.io/v0", "kind": "Policy", "group": "ops", "resource": "nodes"}
{"user": "*", "group": "ignored", "resource": "leases"}
"#,
        );
        let admin = caller("admin", &[]);
        assert!(allowed(
            &e,
            &admin,
            "DELETE",
            "/apis/apps/v1/namespaces/a/deployments/d"
        ));
        assert!(allowed(&e, &admin, "POST", "/logs"));
        assert!(allowed(&e, &admin, "GET", exec_path()));

        let scheduler = caller("scheduler", &[]);
        assert!(allowed(
            &e,
            &scheduler,
            "GET",
            "/apis/metrics.k8s.io/v1beta1/namespaces/a/pods"
        ));
        assert!(!allowed(
            &e,
            &scheduler,
            "POST",
            "/api/v1/namespaces/a/pods"
        ));

        let alice = caller("alice", &[]);
        assert!(allowed(
            &e,
            &alice,
            "POST",
            "/apis/apps/v1/namespaces/projectCaribou/deployments"
        ));
        assert!(!allowed(
            &e,
            &alice,
            "POST",
            "/apis/apps/v1/namespaces/other/deployments"
        ));
        assert!(!allowed(&e, &alice, "POST", "/healthz"));

        // {"readonly": true}: every authenticated user reads everything, paths included.
        let anyone = caller("anyone", &[]);
        assert!(allowed(
            &e,
            &anyone,
            "GET",
            "/api/v1/namespaces/a/secrets/s"
        ));
        assert!(allowed(&e, &anyone, "GET", "/metrics"));
        assert!(!allowed(&e, &anyone, "POST", "/api/v1/namespaces/a/pods"));

        assert!(allowed(
            &e,
            &caller("x", &["ops"]),
            "DELETE",
            "/api/v1/nodes/n"
        ));
        assert!(!allowed(&e, &caller("x", &[]), "DELETE", "/api/v1/nodes/n"));
        assert!(allowed(
            &e,
            &caller("y", &[]),
            "POST",
            "/apis/coordination.k8s.io/v1/namespaces/a/leases"
        ));
    }

    fn exec_path() -> &'static str {
        "/api/v1/namespaces/a/pods/p/exec?command=sh"
    }

    #[test]
    fn abac_never_grants_impersonation() {
        let e = engine(&v1(
            r#"{"user": "alice", "namespace": "*", "resource": "*", "apiGroup": "*", "nonResourcePath": "*"}"#,
        ));
        let alice = caller("alice", &[]);
        let info = request_info(&Method::GET, "/api/v1/namespaces/a/pods", None).unwrap();
        assert!(allowed(&e, &alice, "GET", "/api/v1/namespaces/a/pods"));
        assert!(allowed(&e, &alice, "PUT", "/anything"));
        for kind in [ImpersonationKind::User, ImpersonationKind::Group] {
            let target = ImpersonationTarget {
                kind,
                value: "bob".into(),
            };
            let d = e.decide_subject_impersonation(
                &alice.subject(),
                &facts(&info, "impersonate"),
                &target,
            );
            assert!(d.errors.is_empty(), "{:?}", d.errors);
            assert!(!d.allowed);
        }
    }

    #[test]
    fn strings_are_escaped() {
        let text = format!(
            "\u{feff}{}\r\n{}\r\n",
            v1(
                r#"{"user": "we\"ird\\name\u0007", "group": "gr\"oup", "namespace": "ns\"x", "resource": "*", "apiGroup": "*"}"#
            ),
            v1(r#"{"user": "p", "nonResourcePath": "/q\"x\\*y/*"}"#),
        );
        let cedar = to_cedar("dir/we\"ird.abac", &text).unwrap();
        assert!(cedar.starts_with(r#"@id("dir/we\"ird.abac:1")"#), "{cedar}");
        let e = PolicyEngine::from_sources(&[("dir/we\"ird.abac".into(), cedar.clone())])
            .unwrap_or_else(|e| panic!("{e}\n{cedar}"));
        let weird = caller("we\"ird\\name\u{7}", &["gr\"oup"]);
        let info = RequestInfo {
            is_resource_request: true,
            path: "/api/v1/namespaces/ns\"x/pods".into(),
            verb: "list".into(),
            api_prefix: "api".into(),
            api_version: "v1".into(),
            namespace: "ns\"x".into(),
            resource: "pods".into(),
            ..Default::default()
        };
        assert!(
            e.decide_subject(&weird.subject(), &facts(&info, "list"))
                .allowed
        );
        let plain = caller("we\"ird\\name", &["gr\"oup"]);
        assert!(
            !e.decide_subject(&plain.subject(), &facts(&info, "list"))
                .allowed
        );

        let p = caller("p", &[]);
        assert!(allowed(&e, &p, "GET", "/q\"x\\*y/z"));
        assert!(!allowed(&e, &p, "GET", "/q\"x\\ay/z"));
    }

    #[test]
    fn errors_name_line_and_column() {
        let text = [
            "# comment",
            r#"{"user": "alice",}"#,
            &v1(r#"{"user": "alice", "verb": "get"}"#),
            &v1(r#"{"user": "alice", "readOnly": true}"#),
            r#"{"apiVersion": "abac.authorization.kubernetes.io/v2", "kind": "Policy", "spec": {"user": "a"}}"#,
            r#"{"apiVersion": "abac.authorization.kubernetes.io/v1beta1", "kind": "Role", "spec": {"user": "a"}}"#,
            r#"{"apiVersion": "abac.authorization.kubernetes.io/v1beta1", "spec": {"user": "a"}}"#,
            r#"{"kind": "Policy", "spec": {"user": "a"}}"#,
            &v1(r#"{"user": "a", "readonly": "true"}"#),
            "[1, 2]",
            r#"{"user": "ok"}"#,
            r#"{"user": "b", "apiGroup": "*"}"#,
            r#"  {"apiVersion": 1}"#,
        ]
        .join("\n");
        let errs = errors(&text);
        let summary: Vec<(usize, usize)> = errs.iter().map(|e| (e.line, e.column)).collect();
        assert_eq!(
            summary,
            vec![
                (2, 18),
                (3, 104),
                (4, 104),
                (5, 2),
                (6, 60),
                (7, 1),
                (8, 1),
                (9, 112),
                (10, 1),
                (12, 15),
                (13, 4),
            ],
            "{errs:#?}"
        );
        let msg = |line: usize| {
            errs.iter()
                .find(|e| e.line == line)
                .map(|e| e.message.clone())
                .unwrap()
        };
        assert!(
            msg(2).starts_with("invalid JSON: trailing comma"),
            "{}",
            msg(2)
        );
        assert!(
            msg(3).starts_with("bad policy: unknown field `verb`"),
            "{}",
            msg(3)
        );
        assert!(msg(4).contains("unknown field `readOnly`"), "{}", msg(4));
        assert!(msg(4).contains("case-sensitive"));
        assert!(msg(5).contains("unsupported apiVersion"));
        assert!(msg(6).contains("unsupported kind \"Role\""));
        assert!(msg(7).contains("missing kind"));
        assert!(msg(8).contains("missing apiVersion"));
        assert!(
            msg(9).contains("invalid type: string \"true\", expected a boolean"),
            "{}",
            msg(9)
        );
        assert!(msg(10).contains("expected a JSON object"));
        // v0 has no apiGroup.
        assert!(msg(12).contains("unknown field `apiGroup`"), "{}", msg(12));
        assert!(msg(13).contains("apiVersion must be a string"));
        assert_eq!(
            errs[0].to_string(),
            format!("abac.jsonl:2:18: {}", errs[0].message)
        );
    }

    #[test]
    fn empty_and_comment_only_files_load() {
        let cedar = translate("\n# nothing here\n   \n");
        let e = PolicyEngine::from_sources(&[(ORIGIN.into(), cedar)]).unwrap();
        assert_eq!(e.policy_count(), 0);
    }
}
