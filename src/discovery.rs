//! The cluster's API resources, as kube-apiserver's discovery documents list them, for answers
//! the gateway builds from policy alone (`kubectl auth can-i --list`, see `authz::rules`).
//!
//! The documents are read as the gateway itself (its own client certificate or token, never a
//! caller's identity), so every caller sees the same resources and no caller's permissions
//! shape the list. They change rarely (an upgrade, a new CRD), so they are kept for [`TTL`]:
//! an older list is still answered at once while one refresh runs in the background; callers
//! that find nothing wait for a single shared fetch; a failed refresh keeps the last good list.
//!
//! The core is pure: [`core_versions`], [`preferred_group_versions`] and [`resource_list`]
//! parse the documents (`/api`, `/apis`, `/api/v1` or `/apis/<group>/<version>`) into a
//! [`Discovery`]; [`fetch`] and [`DiscoveryCache`] only move them.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Deserialize;

use crate::proxy::{Upstream, UpstreamError};

/// How long a discovery snapshot is answered without a refresh.
pub const TTL: Duration = Duration::from_secs(300);

/// After a failed fetch, how long callers get that failure instead of waiting for another
/// fetch: a kube-apiserver that is down must not make every review wait for a timeout.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(10);

/// The largest discovery document read (kube-apiserver's largest, `/api/v1`, is ~10 KiB; CRD
/// groups are smaller).
const MAX_DOCUMENT: usize = 4 << 20;

/// Group versions whose resource lists are read at once.
const CONCURRENT_FETCHES: usize = 8;

/// One resource (or subresource) of one group version, as discovery lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiResource {
    /// `""` for the core group.
    pub group: String,
    pub version: String,
    /// The plural resource name: `pods` for both `pods` and `pods/exec`.
    pub resource: String,
    /// `exec` for `pods/exec`; `""` for the resource itself.
    pub subresource: String,
    pub namespaced: bool,
    /// The authorizer verbs discovery lists (`get`, `list`, `watch`, `create`, ...).
    pub verbs: Vec<String>,
}

impl ApiResource {
    /// `pods` or `pods/exec`, as RBAC rules and `kubectl auth can-i --list` name it.
    pub fn name(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }
}

/// The cluster's resources: every group's preferred version (and the core group's versions).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Discovery {
    /// Sorted by group, resource, subresource.
    pub resources: Vec<ApiResource>,
    /// Group versions whose resource list could not be read, and none was known before:
    /// `(group version, why)`. Their resources are missing from `resources`.
    pub missing: Vec<(String, String)>,
}

impl Discovery {
    /// A snapshot from resource lists (see [`resource_list`]) and the group versions that
    /// could not be read.
    pub fn new(
        lists: impl IntoIterator<Item = Vec<ApiResource>>,
        missing: Vec<(String, String)>,
    ) -> Discovery {
        let mut resources: Vec<ApiResource> = lists.into_iter().flatten().collect();
        resources.sort_by(|a, b| {
            (&a.group, &a.resource, &a.subresource, &a.version).cmp(&(
                &b.group,
                &b.resource,
                &b.subresource,
                &b.version,
            ))
        });
        let mut missing = missing;
        missing.sort();
        Discovery { resources, missing }
    }

    /// The resources of one group version (`v1`, `apps/v1`).
    fn of_group_version(&self, group_version: &str) -> Vec<ApiResource> {
        let (group, version) = split_group_version(group_version);
        self.resources
            .iter()
            .filter(|r| r.group == group && r.version == version)
            .cloned()
            .collect()
    }
}

/// Why discovery could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// kube-apiserver could not be reached, or failed mid-answer.
    #[error("GET {path}: {error}")]
    Upstream { path: String, error: UpstreamError },
    /// kube-apiserver answered, but not with the document.
    #[error("GET {path}: kube-apiserver answered {status}")]
    Status { path: String, status: u16 },
    /// The answer is not the discovery document it should be.
    #[error("GET {path}: not a discovery document: {error}")]
    Parse {
        path: String,
        error: serde_json::Error,
    },
    /// The fetch ended without a result (it panicked, or the runtime is shutting down).
    #[error("reading discovery was interrupted")]
    Interrupted,
}

#[derive(Deserialize)]
struct ApiVersionsDoc {
    versions: Vec<String>,
}

#[derive(Deserialize)]
struct GroupListDoc {
    groups: Vec<GroupDoc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GroupDoc {
    #[serde(default)]
    versions: Vec<GroupVersionDoc>,
    preferred_version: Option<GroupVersionDoc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GroupVersionDoc {
    group_version: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResourceListDoc {
    group_version: String,
    resources: Vec<ResourceDoc>,
}

#[derive(Deserialize)]
struct ResourceDoc {
    name: String,
    #[serde(default)]
    namespaced: bool,
    #[serde(default)]
    verbs: Vec<String>,
}

/// `("", "v1")` for `v1`, `("apps", "v1")` for `apps/v1`.
fn split_group_version(gv: &str) -> (&str, &str) {
    gv.split_once('/').unwrap_or(("", gv))
}

/// The versions of the core group, from `/api` (an `APIVersions`).
pub fn core_versions(doc: &[u8]) -> Result<Vec<String>, serde_json::Error> {
    Ok(serde_json::from_slice::<ApiVersionsDoc>(doc)?.versions)
}

/// Every group's preferred group version (`apps/v1`), from `/apis` (an `APIGroupList`); a group
/// that names no preferred version contributes its first.
pub fn preferred_group_versions(doc: &[u8]) -> Result<Vec<String>, serde_json::Error> {
    let list: GroupListDoc = serde_json::from_slice(doc)?;
    Ok(list
        .groups
        .into_iter()
        .filter_map(|g| {
            g.preferred_version
                .or_else(|| g.versions.into_iter().next())
                .map(|v| v.group_version)
        })
        .collect())
}

/// The resources of one `APIResourceList` (`/api/v1`, `/apis/<group>/<version>`). The group
/// is the list's, not the `group` a subresource entry may name: that one is the group of the
/// subresource's kind (`pods/eviction` names `policy`), while kube-apiserver authorizes the
/// request under the path's group.
pub fn resource_list(doc: &[u8]) -> Result<Vec<ApiResource>, serde_json::Error> {
    let list: ResourceListDoc = serde_json::from_slice(doc)?;
    let (group, version) = split_group_version(&list.group_version);
    Ok(list
        .resources
        .into_iter()
        .filter(|r| !r.name.is_empty())
        .map(|r| {
            let (resource, subresource) = r.name.split_once('/').unwrap_or((&r.name, ""));
            ApiResource {
                group: group.to_owned(),
                version: version.to_owned(),
                resource: resource.to_owned(),
                subresource: subresource.to_owned(),
                namespaced: r.namespaced,
                verbs: r.verbs,
            }
        })
        .collect())
}

/// Reads one document as the gateway.
async fn document(upstream: &Upstream, path: &str) -> Result<bytes::Bytes, DiscoveryError> {
    let (status, body) = upstream
        .get_as_gateway(path, MAX_DOCUMENT)
        .await
        .map_err(|error| DiscoveryError::Upstream {
            path: path.to_owned(),
            error,
        })?;
    if !status.is_success() {
        return Err(DiscoveryError::Status {
            path: path.to_owned(),
            status: status.as_u16(),
        });
    }
    Ok(body)
}

/// Parses a document read from `path`.
fn parsed<T>(
    path: &str,
    doc: &[u8],
    parse: impl FnOnce(&[u8]) -> Result<T, serde_json::Error>,
) -> Result<T, DiscoveryError> {
    parse(doc).map_err(|error| DiscoveryError::Parse {
        path: path.to_owned(),
        error,
    })
}

/// Reads the cluster's discovery as the gateway: `/api` and `/apis`, then the resource list of
/// every core version and every group's preferred version. Without `/api` or `/apis` there is
/// nothing to go on (an error); a group version whose list fails (an aggregated API that is
/// down answers 503) keeps its resources from `previous` when it has them, and is reported in
/// [`Discovery::missing`] when it does not, like kubectl's partial discovery.
pub async fn fetch(
    upstream: &Upstream,
    previous: Option<&Discovery>,
) -> Result<Discovery, DiscoveryError> {
    let (api, apis) = tokio::join!(document(upstream, "/api"), document(upstream, "/apis"));
    let mut group_versions = parsed("/api", &api?, core_versions)?;
    group_versions.extend(parsed("/apis", &apis?, preferred_group_versions)?);
    let lists: Vec<(String, Result<Vec<ApiResource>, DiscoveryError>)> =
        futures_util::stream::iter(group_versions)
            .map(|gv| async move {
                let path = if gv.contains('/') {
                    format!("/apis/{gv}")
                } else {
                    format!("/api/{gv}")
                };
                let list = match document(upstream, &path).await {
                    Ok(doc) => parsed(&path, &doc, resource_list),
                    Err(e) => Err(e),
                };
                (gv, list)
            })
            .buffer_unordered(CONCURRENT_FETCHES)
            .collect()
            .await;
    let mut found = Vec::with_capacity(lists.len());
    let mut missing = Vec::new();
    for (gv, list) in lists {
        match list {
            Ok(list) => found.push(list),
            Err(e) => {
                let kept = previous
                    .map(|p| p.of_group_version(&gv))
                    .unwrap_or_default();
                if kept.is_empty() {
                    tracing::warn!(group_version = %gv, error = %e, "discovery: resource list unavailable");
                    missing.push((gv, e.to_string()));
                } else {
                    tracing::warn!(group_version = %gv, error = %e, "discovery: resource list unavailable; keeping the last one read");
                    found.push(kept);
                }
            }
        }
    }
    Ok(Discovery::new(found, missing))
}

/// The last discovery read, refreshed when older than its TTL; cheap to clone (shared).
#[derive(Clone)]
pub struct DiscoveryCache {
    inner: Arc<CacheInner>,
}

struct CacheInner {
    ttl: Duration,
    retry: Duration,
    state: Mutex<CacheState>,
    /// Held by the one fetch in flight.
    refresh: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Default)]
struct CacheState {
    current: Option<(Arc<Discovery>, Instant)>,
    /// The last fetch's failure, until a fetch succeeds.
    failure: Option<(Arc<DiscoveryError>, Instant)>,
}

impl DiscoveryCache {
    /// Snapshots are answered without a refresh for `ttl`; see [`TTL`].
    pub fn new(ttl: Duration) -> DiscoveryCache {
        DiscoveryCache::with_retry(ttl, RETRY_AFTER_FAILURE)
    }

    /// Like [`DiscoveryCache::new`]; after a failed fetch, callers get the failure for `retry`
    /// instead of waiting for another fetch.
    pub fn with_retry(ttl: Duration, retry: Duration) -> DiscoveryCache {
        DiscoveryCache {
            inner: Arc::new(CacheInner {
                ttl,
                retry,
                state: Mutex::new(CacheState::default()),
                refresh: Arc::new(tokio::sync::Mutex::new(())),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, CacheState> {
        crate::util::sync::lock(&self.inner.state)
    }

    /// A failure recent enough to be answered instead of fetching again.
    fn recent_failure(&self, state: &CacheState) -> Option<Arc<DiscoveryError>> {
        state
            .failure
            .as_ref()
            .filter(|(_, at)| at.elapsed() < self.inner.retry)
            .map(|(e, _)| e.clone())
    }

    /// The discovery to answer with. A fresh snapshot is returned as is; an older one too,
    /// while a refresh starts in the background (unless one is running); with none, the caller
    /// waits for the one fetch in flight, starting it if needed. `fetch` is given the snapshot
    /// it replaces; it runs as its own task, so a caller that goes away does not cancel it.
    pub async fn get<F, Fut>(&self, fetch: F) -> Result<Arc<Discovery>, Arc<DiscoveryError>>
    where
        F: FnOnce(Option<Arc<Discovery>>) -> Fut,
        Fut: Future<Output = Result<Discovery, DiscoveryError>> + Send + 'static,
    {
        {
            let state = self.state();
            if let Some((d, at)) = &state.current {
                let d = d.clone();
                if at.elapsed() >= self.inner.ttl && self.recent_failure(&state).is_none() {
                    if let Ok(guard) = self.inner.refresh.clone().try_lock_owned() {
                        drop(state);
                        self.spawn_fetch(guard, fetch(Some(d.clone())));
                    }
                }
                return Ok(d);
            }
            if let Some(e) = self.recent_failure(&state) {
                return Err(e);
            }
        }
        // Nothing to answer with: one fetch for every caller.
        let guard = self.inner.refresh.clone().lock_owned().await;
        {
            let state = self.state();
            if let Some((d, _)) = &state.current {
                return Ok(d.clone());
            }
            if let Some(e) = self.recent_failure(&state) {
                return Err(e);
            }
        }
        // Runs to its end even when this caller is dropped; its result is stored either way.
        let _ = self.spawn_fetch(guard, fetch(None)).await;
        let state = self.state();
        match (&state.current, &state.failure) {
            (Some((d, _)), _) => Ok(d.clone()),
            (None, Some((e, _))) => Err(e.clone()),
            (None, None) => Err(Arc::new(DiscoveryError::Interrupted)),
        }
    }

    fn spawn_fetch(
        &self,
        guard: tokio::sync::OwnedMutexGuard<()>,
        fetch: impl Future<Output = Result<Discovery, DiscoveryError>> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let cache = self.clone();
        tokio::spawn(async move {
            let result = fetch.await;
            let mut state = cache.state();
            match result {
                Ok(d) => {
                    state.current = Some((Arc::new(d), Instant::now()));
                    state.failure = None;
                }
                Err(e) => {
                    if state.current.is_some() {
                        tracing::warn!(error = %e, "discovery refresh failed; keeping the last list read");
                    } else {
                        tracing::warn!(error = %e, "discovery unavailable");
                    }
                    state.failure = Some((Arc::new(e), Instant::now()));
                }
            }
            drop(state);
            drop(guard);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const CORE_V1: &str = r#"{
      "kind": "APIResourceList", "groupVersion": "v1",
      "resources": [
        {"name": "namespaces", "singularName": "namespace", "namespaced": false, "kind": "Namespace",
         "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"], "shortNames": ["ns"]},
        {"name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod",
         "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]},
        {"name": "pods/eviction", "singularName": "", "namespaced": true, "group": "policy",
         "version": "v1", "kind": "Eviction", "verbs": ["create"]},
        {"name": "pods/exec", "singularName": "", "namespaced": true, "kind": "PodExecOptions",
         "verbs": ["create", "get"]}
      ]
    }"#;

    fn res(group: &str, name: &str, namespaced: bool, verbs: &[&str]) -> ApiResource {
        let (resource, subresource) = name.split_once('/').unwrap_or((name, ""));
        ApiResource {
            group: group.into(),
            version: "v1".into(),
            resource: resource.into(),
            subresource: subresource.into(),
            namespaced,
            verbs: verbs.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn a_resource_list_gives_resources_and_subresources_under_the_lists_group() {
        let list = resource_list(CORE_V1.as_bytes()).unwrap();
        assert_eq!(
            list,
            vec![
                res(
                    "",
                    "namespaces",
                    false,
                    &["create", "delete", "get", "list", "patch", "update", "watch"]
                ),
                res(
                    "",
                    "pods",
                    true,
                    &[
                        "create",
                        "delete",
                        "deletecollection",
                        "get",
                        "list",
                        "patch",
                        "update",
                        "watch"
                    ]
                ),
                // Authorized as the core group's pods/eviction, whatever group its kind is in.
                res("", "pods/eviction", true, &["create"]),
                res("", "pods/exec", true, &["create", "get"]),
            ]
        );
        assert_eq!(list[3].name(), "pods/exec");

        let apps = br#"{"kind":"APIResourceList","apiVersion":"v1","groupVersion":"apps/v1",
            "resources":[{"name":"deployments/scale","namespaced":true,"group":"autoscaling",
            "version":"v1","kind":"Scale","verbs":["get","patch","update"]}]}"#;
        let list = resource_list(apps).unwrap();
        assert_eq!(
            list,
            vec![ApiResource {
                group: "apps".into(),
                ..res("", "deployments/scale", true, &["get", "patch", "update"])
            }]
        );
        assert!(
            resource_list(b"{}").is_err(),
            "a list names its group version"
        );
        assert!(resource_list(b"<html>").is_err());
    }

    #[test]
    fn group_lists_give_preferred_versions_and_core_versions_come_from_api() {
        let apis = br#"{"kind":"APIGroupList","apiVersion":"v1","groups":[
          {"name":"apps","versions":[{"groupVersion":"apps/v1","version":"v1"}],
           "preferredVersion":{"groupVersion":"apps/v1","version":"v1"}},
          {"name":"flowcontrol.apiserver.k8s.io","versions":[
             {"groupVersion":"flowcontrol.apiserver.k8s.io/v1","version":"v1"},
             {"groupVersion":"flowcontrol.apiserver.k8s.io/v1beta3","version":"v1beta3"}],
           "preferredVersion":{"groupVersion":"flowcontrol.apiserver.k8s.io/v1","version":"v1"}},
          {"name":"legacy.example.com","versions":[
             {"groupVersion":"legacy.example.com/v1beta1","version":"v1beta1"}]}
        ]}"#;
        assert_eq!(
            preferred_group_versions(apis).unwrap(),
            [
                "apps/v1",
                "flowcontrol.apiserver.k8s.io/v1",
                "legacy.example.com/v1beta1"
            ]
        );
        let api = br#"{"kind":"APIVersions","versions":["v1"],"serverAddressByClientCIDRs":[]}"#;
        assert_eq!(core_versions(api).unwrap(), ["v1"]);
        // A JSON answer that is not the document (a Status, say) is an error, not "no groups".
        assert!(preferred_group_versions(br#"{"kind":"Status","code":503}"#).is_err());
        assert!(core_versions(b"{}").is_err());
    }

    #[test]
    fn a_snapshot_is_sorted_and_keeps_what_it_misses() {
        let d = Discovery::new(
            [
                vec![res("apps", "deployments", true, &["get"])],
                resource_list(CORE_V1.as_bytes()).unwrap(),
            ],
            vec![("metrics.k8s.io/v1beta1".into(), "503".into())],
        );
        let names: Vec<(String, String)> = d
            .resources
            .iter()
            .map(|r| (r.group.clone(), r.name()))
            .collect();
        assert_eq!(
            names,
            [
                ("", "namespaces"),
                ("", "pods"),
                ("", "pods/eviction"),
                ("", "pods/exec"),
                ("apps", "deployments"),
            ]
            .map(|(g, n)| (g.to_string(), n.to_string()))
        );
        assert_eq!(d.of_group_version("apps/v1").len(), 1);
        assert_eq!(d.of_group_version("v1").len(), 4);
        assert_eq!(d.missing.len(), 1);
    }

    fn snapshot(n: usize) -> Discovery {
        Discovery::new(
            [vec![res("", &format!("r{n}"), true, &["get"])]],
            Vec::new(),
        )
    }

    fn failure() -> DiscoveryError {
        DiscoveryError::Status {
            path: "/apis".into(),
            status: 503,
        }
    }

    #[tokio::test]
    async fn callers_without_a_snapshot_share_one_fetch() {
        let cache = DiscoveryCache::new(TTL);
        let calls = Arc::new(AtomicUsize::new(0));
        let gets = (0..10).map(|_| {
            let calls = calls.clone();
            cache.get(move |_| async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(snapshot(1))
            })
        });
        let got = futures_util::future::join_all(gets).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let first = got[0].as_ref().unwrap();
        assert!(got.iter().all(|d| Arc::ptr_eq(d.as_ref().unwrap(), first)));
    }

    #[tokio::test]
    async fn an_old_snapshot_is_answered_at_once_while_one_refresh_replaces_it() {
        let cache = DiscoveryCache::with_retry(Duration::ZERO, Duration::ZERO);
        let first = cache.get(|_| async { Ok(snapshot(1)) }).await.unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        let c = calls.clone();
        let got = cache
            .get(move |previous| async move {
                assert_eq!(previous.unwrap().resources[0].resource, "r1");
                c.fetch_add(1, Ordering::SeqCst);
                let _ = wait.await;
                Ok(snapshot(2))
            })
            .await
            .unwrap();
        assert!(Arc::ptr_eq(&got, &first), "answered with the old snapshot");
        // While that refresh runs, no second one starts.
        let c = calls.clone();
        let again = cache
            .get(move |_| async move {
                c.fetch_add(1, Ordering::SeqCst);
                Ok(snapshot(3))
            })
            .await
            .unwrap();
        assert!(Arc::ptr_eq(&again, &first));
        release.send(()).unwrap();
        for _ in 0..100 {
            let d = cache.get(|_| async { Err(failure()) }).await.unwrap();
            if d.resources[0].resource == "r2" {
                assert_eq!(calls.load(Ordering::SeqCst), 1);
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the refresh never replaced the snapshot");
    }

    #[tokio::test]
    async fn a_failed_refresh_keeps_the_last_good_snapshot() {
        let cache = DiscoveryCache::with_retry(Duration::ZERO, Duration::from_secs(60));
        let first = cache.get(|_| async { Ok(snapshot(1)) }).await.unwrap();
        let _ = cache.get(|_| async { Err(failure()) }).await.unwrap();
        // Let the background refresh fail.
        let _ = cache.inner.refresh.lock().await;
        let calls = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let c = calls.clone();
            let d = cache
                .get(move |_| async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    Ok(snapshot(2))
                })
                .await
                .unwrap();
            assert!(Arc::ptr_eq(&d, &first));
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "no refresh right after a failure"
        );
    }

    #[tokio::test]
    async fn with_nothing_read_a_failure_is_answered_and_not_retried_at_once() {
        let cache = DiscoveryCache::with_retry(TTL, Duration::from_secs(60));
        let e = cache.get(|_| async { Err(failure()) }).await.unwrap_err();
        assert_eq!(e.to_string(), "GET /apis: kube-apiserver answered 503");
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let again = cache
            .get(move |_| async move {
                c.fetch_add(1, Ordering::SeqCst);
                Ok(snapshot(1))
            })
            .await;
        assert!(again.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 0);

        // Once the retry interval has passed, the next caller fetches again.
        let cache = DiscoveryCache::with_retry(TTL, Duration::ZERO);
        assert!(cache.get(|_| async { Err(failure()) }).await.is_err());
        let d = cache.get(|_| async { Ok(snapshot(1)) }).await.unwrap();
        assert_eq!(d.resources.len(), 1);
    }
}
