//! Discovery documents: `/version`, `/api`, `/api/v1`, `/apis`, `/apis/authentication.k8s.io`
//! and its versions (unaggregated; kubectl falls back from aggregated discovery to these).

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

fn authn_group() -> Value {
    let v1 = json!({ "groupVersion": "authentication.k8s.io/v1", "version": "v1" });
    json!({
        "name": "authentication.k8s.io",
        "versions": [v1],
        "preferredVersion": v1,
    })
}

pub(crate) fn api_group_list() -> Value {
    json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": [authn_group()] })
}

pub(crate) fn authn_api_group() -> Value {
    let mut g = authn_group();
    g["kind"] = json!("APIGroup");
    g["apiVersion"] = json!("v1");
    g
}

pub(crate) fn authn_resources(version: &str) -> Value {
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": format!("authentication.k8s.io/{version}"),
        "resources": [
            resource("selfsubjectreviews", "selfsubjectreview", false, "SelfSubjectReview", &["create"], &[]),
        ],
    })
}
