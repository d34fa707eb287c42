//! Discovery documents: `/version`, `/api`, `/api/v1`, `/apis`, and the groups
//! `authentication.k8s.io` and `authorization.k8s.io` with their versions (unaggregated; kubectl
//! falls back from aggregated discovery to these).
//!
//! Every resource the stand-in serves is listed as kube-apiserver lists it: its `namespaced`
//! scope and its `verbs`, subresources (`pods/exec`, ...) included, so that what is built from
//! discovery (kubectl's resource mapping, the gateway's `kubectl auth can-i --list`) sees the
//! cluster a real one would.

use std::net::SocketAddr;

use serde_json::{json, Value};

pub(crate) fn version() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": "v1.32.0",
        "gitCommit": "70d3cc986aa8221cd1dfb1121852688902d3bf53",
        "gitTreeState": "clean",
        "buildDate": "2024-12-11T17:59:15Z",
        "goVersion": "go1.23.3",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

pub(crate) fn api_versions(addr: SocketAddr) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            { "clientCIDR": "0.0.0.0/0", "serverAddress": addr.to_string() }
        ],
    })
}

fn resource(
    name: &str,
    singular: &str,
    namespaced: bool,
    kind: &str,
    verbs: &[&str],
    short: &[&str],
) -> Value {
    let mut r = json!({
        "name": name,
        "singularName": singular,
        "namespaced": namespaced,
        "kind": kind,
        "verbs": verbs,
    });
    if !short.is_empty() {
        r["shortNames"] = json!(short);
    }
    r
}

const ALL_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

pub(crate) fn core_v1_resources() -> Value {
    let mut pods = resource("pods", "pod", true, "Pod", ALL_VERBS, &["po"]);
    pods["categories"] = json!(["all"]);
    json!({
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            resource("configmaps", "configmap", true, "ConfigMap", ALL_VERBS, &["cm"]),
            resource("namespaces", "namespace", false, "Namespace",
                &["create", "delete", "get", "list", "patch", "update", "watch"], &["ns"]),
            pods,
            resource("pods/attach", "", true, "PodAttachOptions", &["create", "get"], &[]),
            resource("pods/exec", "", true, "PodExecOptions", &["create", "get"], &[]),
            resource("pods/log", "", true, "Pod", &["get"], &[]),
            resource("pods/portforward", "", true, "PodPortForwardOptions", &["create", "get"], &[]),
        ],
    })
}

/// An `APIGroup` with one version, as listed in `/apis`.
fn group(name: &str) -> Value {
    let v1 = json!({ "groupVersion": format!("{name}/v1"), "version": "v1" });
    json!({
        "name": name,
        "versions": [v1],
        "preferredVersion": v1,
    })
}

pub(crate) const AUTHENTICATION: &str = "authentication.k8s.io";
pub(crate) const AUTHORIZATION: &str = "authorization.k8s.io";

pub(crate) fn api_group_list() -> Value {
    json!({
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [group(AUTHENTICATION), group(AUTHORIZATION)],
    })
}

/// The `APIGroup` document of `name` (`/apis/<name>`).
pub(crate) fn api_group(name: &str) -> Value {
    let mut g = group(name);
    g["kind"] = json!("APIGroup");
    g["apiVersion"] = json!("v1");
    g
}

pub(crate) fn authn_resources(version: &str) -> Value {
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": format!("{AUTHENTICATION}/{version}"),
        "resources": [
            resource("selfsubjectreviews", "selfsubjectreview", false, "SelfSubjectReview", &["create"], &[]),
        ],
    })
}

pub(crate) fn authz_resources() -> Value {
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": format!("{AUTHORIZATION}/v1"),
        "resources": [
            resource("selfsubjectaccessreviews", "selfsubjectaccessreview", false,
                "SelfSubjectAccessReview", &["create"], &[]),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(name, namespaced, verbs)` of every entry of an APIResourceList.
    fn entries(list: &Value) -> Vec<(String, bool, Vec<String>)> {
        list["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let verbs = r["verbs"].as_array().expect("verbs listed");
                (
                    r["name"].as_str().unwrap().to_owned(),
                    r["namespaced"].as_bool().expect("scope listed"),
                    verbs
                        .iter()
                        .map(|v| v.as_str().unwrap().to_owned())
                        .collect(),
                )
            })
            .collect()
    }

    #[test]
    fn every_served_resource_is_listed_with_its_scope_and_verbs() {
        let core = entries(&core_v1_resources());
        let find = |name: &str| {
            core.iter()
                .find(|(n, _, _)| n == name)
                .unwrap_or_else(|| panic!("{name} not listed"))
                .clone()
        };
        let all: Vec<String> = ALL_VERBS.iter().map(|v| v.to_string()).collect();
        assert_eq!(find("pods"), ("pods".into(), true, all.clone()));
        assert_eq!(find("configmaps"), ("configmaps".into(), true, all));
        let ns = find("namespaces");
        assert!(!ns.1, "namespaces are cluster-scoped");
        assert!(!ns.2.contains(&"deletecollection".to_string()));
        // kube-apiserver lists the connect subresources with the verbs they are authorized as.
        for (sub, verbs) in [
            ("pods/attach", &["create", "get"][..]),
            ("pods/exec", &["create", "get"]),
            ("pods/log", &["get"]),
            ("pods/portforward", &["create", "get"]),
        ] {
            assert_eq!(
                find(sub),
                (
                    sub.to_string(),
                    true,
                    verbs.iter().map(|v| v.to_string()).collect()
                )
            );
        }
        for (list, name) in [
            (authn_resources("v1"), "selfsubjectreviews"),
            (authz_resources(), "selfsubjectaccessreviews"),
        ] {
            assert_eq!(
                entries(&list),
                [(name.to_string(), false, vec!["create".to_string()])]
            );
        }
        // Every group in /apis has its resource list at its preferred version.
        let groups: Vec<String> = api_group_list()["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                g["preferredVersion"]["groupVersion"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            groups,
            ["authentication.k8s.io/v1", "authorization.k8s.io/v1"]
        );
        assert_eq!(api_group(AUTHORIZATION)["kind"], "APIGroup");
    }
}
