//! kube-apiserver's request attributes (RequestInfo), computed from method, path and query.
//! (Placeholder: the parser lands with the Cedar work.)

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
    pub verb: String,
    /// `api` or `apis` (empty for non-resource requests).
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
