//! kube-apiserver stand-in (placeholder; implemented by the apiserver work item).
use std::collections::BTreeMap;
pub struct ApiServer;
pub struct ApiServerOptions;
pub struct RecordedRequest;
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserInfo {
    pub username: String,
    pub uid: Option<String>,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}
