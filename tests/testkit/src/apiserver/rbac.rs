//! Authorization: kube-apiserver's request-info parsing (path + method + query → verb, API group,
//! resource, subresource, namespace, name), a small RBAC table, the built-in grants every
//! authenticated user has (discovery, SelfSubjectReview) and kube's `Forbidden` Status text.

use hyper::Response;
use serde_json::Value;

use super::respond::{self, Body};
use super::UserInfo;

pub(crate) const AUTHENTICATED: &str = "system:authenticated";
pub(crate) const UNAUTHENTICATED: &str = "system:unauthenticated";

/// One RBAC grant: any listed user or group may perform any listed verb on any listed resource
/// in any listed namespace.
#[derive(Clone, Debug)]
pub struct RbacRule {
    pub users: Vec<String>,
    pub groups: Vec<String>,
    /// Verbs; `"*"` means all.
    pub verbs: Vec<String>,
    /// Resources such as `"pods"`, `"pods/exec"`; `"*"` means all (subresources included) and
    /// `"*/exec"` a subresource of every resource.
    pub resources: Vec<String>,
    /// Namespaces; empty means every namespace and cluster-scoped requests too.
    pub namespaces: Vec<String>,
}

impl RbacRule {
    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// A grant to a group.
    pub fn for_group(group: &str, verbs: &[&str], resources: &[&str], namespaces: &[&str]) -> Self {
        RbacRule {
            users: Vec::new(),
            groups: vec![group.to_string()],
            verbs: Self::strings(verbs),
            resources: Self::strings(resources),
            namespaces: Self::strings(namespaces),
        }
    }

    /// A grant to a user.
    pub fn for_user(user: &str, verbs: &[&str], resources: &[&str], namespaces: &[&str]) -> Self {
        RbacRule {
            users: vec![user.to_string()],
            groups: Vec::new(),
            verbs: Self::strings(verbs),
            resources: Self::strings(resources),
            namespaces: Self::strings(namespaces),
        }
    }

    fn matches_subject(&self, u: &UserInfo) -> bool {
        self.users.contains(&u.username) || self.groups.iter().any(|g| u.groups.contains(g))
    }

    fn matches(&self, u: &UserInfo, verb: &str, resource: &str, sub: &str, ns: &str) -> bool {
        if !self.matches_subject(u) {
            return false;
        }
        if !self.verbs.iter().any(|v| v == "*" || v == verb) {
            return false;
        }
        let full = if sub.is_empty() {
            resource.to_string()
        } else {
            format!("{resource}/{sub}")
        };
        let resource_ok = self.resources.iter().any(|r| {
            r == "*" || *r == full || (!sub.is_empty() && r.strip_prefix("*/") == Some(sub))
        });
        if !resource_ok {
            return false;
        }
        self.namespaces.is_empty() || self.namespaces.iter().any(|n| n == ns)
    }
}

/// The demo table: `team-a` and `team-b` own pods (and their log/exec/attach/portforward
/// subresources) in their namespace; every authenticated user may read namespaces.
pub(crate) fn demo_rules() -> Vec<RbacRule> {
    let pod_resources = [
        "pods",
        "pods/log",
        "pods/exec",
        "pods/attach",
        "pods/portforward",
    ];
    vec![
        RbacRule::for_group("team-a", &["*"], &pod_resources, &["team-a"]),
        RbacRule::for_group("team-b", &["*"], &pod_resources, &["team-b"]),
        RbacRule::for_group(
            AUTHENTICATED,
            &["get", "list", "watch"],
            &["namespaces"],
            &[],
        ),
    ]
}

/// kube-apiserver's RequestInfo.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct RequestInfo {
    pub is_resource_request: bool,
    pub path: String,
    pub verb: String,
    pub api_prefix: String,
    pub api_group: String,
    pub api_version: String,
    pub namespace: String,
    pub resource: String,
    pub subresource: String,
    pub name: String,
    pub parts: Vec<String>,
}

impl RequestInfo {
    /// Parses a request the way k8s.io/apiserver's RequestInfoFactory does (API prefixes `api`
    /// and `apis`, the legacy `watch` path verb, `?watch`, and `fieldSelector=metadata.name=`).
    pub(crate) fn parse(method: &str, path: &str, query: &[(String, String)]) -> RequestInfo {
        let mut info = RequestInfo {
            path: path.to_string(),
            verb: method.to_ascii_lowercase(),
            ..Default::default()
        };
        let parts: Vec<&str> = path
            .trim_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        if parts.len() < 3 || !matches!(parts[0], "api" | "apis") {
            return info;
        }
        let nonresource = info.clone();
        info.api_prefix = parts[0].to_string();
        let mut cur = &parts[1..];
        if info.api_prefix == "apis" {
            if cur.len() < 3 {
                return nonresource;
            }
            info.api_group = cur[0].to_string();
            cur = &cur[1..];
        }
        info.is_resource_request = true;
        info.api_version = cur[0].to_string();
        cur = &cur[1..];

        if cur[0] == "watch" || cur[0] == "proxy" {
            if cur.len() < 2 {
                // kube answers this with an error; treat it as a path nobody may use.
                return nonresource;
            }
            info.verb = cur[0].to_string();
            cur = &cur[1..];
        } else {
            info.verb = match method {
                "POST" => "create",
                "GET" | "HEAD" => "get",
                "PUT" => "update",
                "PATCH" => "patch",
                "DELETE" => "delete",
                _ => "",
            }
            .to_string();
        }

        if cur[0] == "namespaces" && cur.len() > 1 {
            info.namespace = cur[1].to_string();
            if cur.len() > 2 && !matches!(cur[2], "status" | "finalize") {
                cur = &cur[2..];
            }
        }
        info.parts = cur.iter().map(|s| s.to_string()).collect();
        if cur.len() >= 3 && info.verb != "proxy" {
            info.subresource = cur[2].to_string();
        }
        if cur.len() >= 2 {
            info.name = cur[1].to_string();
        }
        if !cur.is_empty() {
            info.resource = cur[0].to_string();
        }

        if info.name.is_empty() && info.verb == "get" {
            info.verb = if respond::query_bool(query, "watch") {
                "watch".into()
            } else {
                "list".into()
            };
            if let Some(name) = field_selector_name(query) {
                info.name = name;
            }
        }
        if info.name.is_empty() && info.verb == "delete" {
            info.verb = "deletecollection".into();
        }
        info
    }
}

/// `metadata.name=X` from a `fieldSelector` (exact match only).
pub(crate) fn field_selector_name(query: &[(String, String)]) -> Option<String> {
    let fs = respond::query_get(query, "fieldSelector")?;
    fs.split(',').find_map(|term| {
        let (k, v) = term.split_once("==").or_else(|| term.split_once('='))?;
        (k.trim() == "metadata.name" && !v.is_empty() && !k.ends_with('!'))
            .then(|| v.trim().to_string())
    })
}

/// Non-resource URLs of `system:public-info-viewer` (authenticated and unauthenticated users).
pub(crate) fn is_public_info_path(path: &str) -> bool {
    matches!(
        path,
        "/healthz" | "/livez" | "/readyz" | "/version" | "/version/"
    )
}

/// Non-resource URLs of `system:discovery` (authenticated users).
fn is_discovery_path(path: &str) -> bool {
    matches!(
        path,
        "/api"
            | "/apis"
            | "/healthz"
            | "/livez"
            | "/readyz"
            | "/openapi"
            | "/version"
            | "/version/"
    ) || [
        "/api/",
        "/apis/",
        "/openapi/",
        "/healthz/",
        "/livez/",
        "/readyz/",
    ]
    .iter()
    .any(|p| path.starts_with(p))
}

/// Decides whether `user` may perform the request.
pub(crate) fn authorize(rules: &[RbacRule], user: &UserInfo, info: &RequestInfo) -> bool {
    let authenticated = user.groups.iter().any(|g| g == AUTHENTICATED);
    let unauthenticated = user.groups.iter().any(|g| g == UNAUTHENTICATED);
    if !info.is_resource_request {
        if info.verb != "get" {
            return false;
        }
        return (authenticated && is_discovery_path(&info.path))
            || ((authenticated || unauthenticated) && is_public_info_path(&info.path));
    }
    // system:basic-user
    if authenticated
        && info.verb == "create"
        && info.subresource.is_empty()
        && ((info.api_group == "authentication.k8s.io" && info.resource == "selfsubjectreviews")
            || (info.api_group == "authorization.k8s.io"
                && matches!(
                    info.resource.as_str(),
                    "selfsubjectaccessreviews" | "selfsubjectrulesreviews"
                )))
    {
        return true;
    }
    allows(
        rules,
        user,
        &info.verb,
        &info.resource,
        &info.subresource,
        &info.namespace,
    )
}

/// Whether any rule grants the verb on the resource in the namespace.
pub(crate) fn allows(
    rules: &[RbacRule],
    user: &UserInfo,
    verb: &str,
    resource: &str,
    sub: &str,
    ns: &str,
) -> bool {
    rules
        .iter()
        .any(|r| r.matches(user, verb, resource, sub, ns))
}

/// What a Forbidden message talks about (k8s.io/apiserver authorizer.Attributes).
#[derive(Clone, Debug, Default)]
pub(crate) struct Attributes<'a> {
    pub user: &'a str,
    pub verb: &'a str,
    pub resource_request: bool,
    pub path: &'a str,
    pub group: &'a str,
    pub resource: &'a str,
    pub subresource: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
}

impl<'a> Attributes<'a> {
    pub(crate) fn of(info: &'a RequestInfo, user: &'a str) -> Self {
        Attributes {
            user,
            verb: &info.verb,
            resource_request: info.is_resource_request,
            path: &info.path,
            group: &info.api_group,
            resource: &info.resource,
            subresource: &info.subresource,
            namespace: &info.namespace,
            name: &info.name,
        }
    }
}

/// `User "alice" cannot list resource "pods" in API group "" in the namespace "team-b"`.
pub(crate) fn forbidden_reason(a: &Attributes<'_>) -> String {
    if !a.resource_request {
        return format!("User {:?} cannot {} path {:?}", a.user, a.verb, a.path);
    }
    let resource = if a.subresource.is_empty() {
        a.resource.to_string()
    } else {
        format!("{}/{}", a.resource, a.subresource)
    };
    if a.namespace.is_empty() {
        format!(
            "User {:?} cannot {} resource {:?} in API group {:?} at the cluster scope",
            a.user, a.verb, resource, a.group
        )
    } else {
        format!(
            "User {:?} cannot {} resource {:?} in API group {:?} in the namespace {:?}",
            a.user, a.verb, resource, a.group, a.namespace
        )
    }
}

/// The full Forbidden Status body (apierrors.NewForbidden).
pub(crate) fn forbidden_value(a: &Attributes<'_>) -> Value {
    let reason = forbidden_reason(a);
    let qualified = if a.group.is_empty() {
        a.resource.to_string()
    } else {
        format!("{}.{}", a.resource, a.group)
    };
    let message = if qualified.is_empty() {
        format!("forbidden: {reason}")
    } else if a.name.is_empty() {
        format!("{qualified} is forbidden: {reason}")
    } else {
        format!("{qualified} {:?} is forbidden: {reason}", a.name)
    };
    respond::status_value(
        403,
        "Forbidden",
        &message,
        Some(respond::details(a.group, a.resource, a.name)),
    )
}

pub(crate) fn forbidden(a: &Attributes<'_>) -> Response<Body> {
    respond::json(http::StatusCode::FORBIDDEN, &forbidden_value(a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::respond::query_pairs;

    fn parse(method: &str, path_query: &str) -> RequestInfo {
        let (p, q) = path_query.split_once('?').unwrap_or((path_query, ""));
        RequestInfo::parse(method, p, &query_pairs(Some(q)))
    }

    fn user(name: &str, groups: &[&str]) -> UserInfo {
        UserInfo {
            username: name.into(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn parses_resource_paths() {
        let i = parse("GET", "/api/v1/namespaces/team-a/pods");
        assert!(i.is_resource_request);
        assert_eq!(
            (i.verb.as_str(), i.resource.as_str(), i.namespace.as_str()),
            ("list", "pods", "team-a")
        );
        let i = parse(
            "GET",
            "/api/v1/namespaces/team-a/pods?watch=true&resourceVersion=5",
        );
        assert_eq!(i.verb, "watch");
        let i = parse("GET", "/api/v1/pods?watch=1");
        assert_eq!((i.verb.as_str(), i.namespace.as_str()), ("watch", ""));
        let i = parse("GET", "/api/v1/watch/namespaces/team-a/pods/web-0");
        assert_eq!((i.verb.as_str(), i.name.as_str()), ("watch", "web-0"));
        let i = parse(
            "POST",
            "/api/v1/namespaces/team-a/pods/web-0/exec?command=sh",
        );
        assert_eq!(
            (
                i.verb.as_str(),
                i.resource.as_str(),
                i.subresource.as_str(),
                i.name.as_str()
            ),
            ("create", "pods", "exec", "web-0")
        );
        let i = parse("GET", "/api/v1/namespaces/team-a");
        assert_eq!(
            (
                i.verb.as_str(),
                i.resource.as_str(),
                i.name.as_str(),
                i.namespace.as_str()
            ),
            ("get", "namespaces", "team-a", "team-a")
        );
        let i = parse("GET", "/api/v1/namespaces");
        assert_eq!(
            (i.verb.as_str(), i.resource.as_str(), i.namespace.as_str()),
            ("list", "namespaces", "")
        );
        let i = parse("DELETE", "/api/v1/namespaces/team-a/pods");
        assert_eq!(i.verb, "deletecollection");
        let i = parse("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews");
        assert_eq!(
            (i.api_group.as_str(), i.resource.as_str(), i.verb.as_str()),
            ("authentication.k8s.io", "selfsubjectreviews", "create")
        );
        let i = parse(
            "GET",
            "/api/v1/namespaces/team-a/pods?fieldSelector=metadata.name%3Dweb-0&watch=1",
        );
        assert_eq!((i.verb.as_str(), i.name.as_str()), ("watch", "web-0"));
    }

    #[test]
    fn parses_non_resource_paths() {
        for p in [
            "/api",
            "/api/v1",
            "/apis",
            "/apis/authentication.k8s.io/v1",
            "/version",
            "/healthz",
            "/openapi/v3",
        ] {
            let i = parse("GET", p);
            assert!(!i.is_resource_request, "{p}");
            assert_eq!(i.verb, "get");
        }
    }

    #[test]
    fn demo_rbac() {
        let rules = demo_rules();
        let alice = user("alice", &["team-a", AUTHENTICATED]);
        assert!(authorize(
            &rules,
            &alice,
            &parse("GET", "/api/v1/namespaces/team-a/pods")
        ));
        assert!(authorize(
            &rules,
            &alice,
            &parse("POST", "/api/v1/namespaces/team-a/pods/web-0/exec")
        ));
        assert!(!authorize(
            &rules,
            &alice,
            &parse("GET", "/api/v1/namespaces/team-b/pods")
        ));
        assert!(!authorize(&rules, &alice, &parse("GET", "/api/v1/pods")));
        assert!(authorize(
            &rules,
            &alice,
            &parse("GET", "/api/v1/namespaces")
        ));
        assert!(authorize(
            &rules,
            &alice,
            &parse("GET", "/api/v1/namespaces/team-b")
        ));
        assert!(authorize(&rules, &alice, &parse("GET", "/api")));
        assert!(authorize(
            &rules,
            &alice,
            &parse("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews")
        ));
        assert!(!authorize(
            &rules,
            &alice,
            &parse("GET", "/api/v1/namespaces/team-a/configmaps")
        ));
        let gw = user("ztgate", &[AUTHENTICATED]);
        assert!(!authorize(
            &rules,
            &gw,
            &parse("GET", "/api/v1/namespaces/team-a/pods")
        ));
        let anon = user("system:anonymous", &[UNAUTHENTICATED]);
        assert!(authorize(&rules, &anon, &parse("GET", "/livez")));
        assert!(!authorize(&rules, &anon, &parse("GET", "/api")));
        assert!(!authorize(&rules, &alice, &parse("GET", "/metrics")));
    }

    #[test]
    fn forbidden_messages_match_kube() {
        let i = parse("GET", "/api/v1/namespaces/team-b/pods");
        let v = forbidden_value(&Attributes::of(&i, "alice"));
        assert_eq!(
            v["message"],
            r#"pods is forbidden: User "alice" cannot list resource "pods" in API group "" in the namespace "team-b""#
        );
        assert_eq!(v["reason"], "Forbidden");
        assert_eq!(v["code"], 403);
        assert_eq!(v["details"], serde_json::json!({"kind": "pods"}));

        let i = parse("POST", "/api/v1/namespaces/team-b/pods/db-0/exec");
        let v = forbidden_value(&Attributes::of(&i, "alice"));
        assert_eq!(
            v["message"],
            r#"pods "db-0" is forbidden: User "alice" cannot create resource "pods/exec" in API group "" in the namespace "team-b""#
        );
        assert_eq!(
            v["details"],
            serde_json::json!({"kind": "pods", "name": "db-0"})
        );

        let i = parse("GET", "/api/v1/pods");
        let v = forbidden_value(&Attributes::of(&i, "bob"));
        assert_eq!(
            v["message"],
            r#"pods is forbidden: User "bob" cannot list resource "pods" in API group "" at the cluster scope"#
        );

        let i = parse("GET", "/metrics");
        let v = forbidden_value(&Attributes::of(&i, "bob"));
        assert_eq!(
            v["message"],
            r#"forbidden: User "bob" cannot get path "/metrics""#
        );
    }
}
