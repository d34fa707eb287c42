//! The object store (namespaces and pods with a global resourceVersion), server-side Table
//! rendering, and watch streams (one JSON event per chunk, fed by a broadcast channel).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde_json::{json, Value};
use time::OffsetDateTime;
use tokio::sync::broadcast;

use super::respond::{Body, IncludeObject, Want};

/// Kinds the store knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Pods,
    Namespaces,
    ConfigMaps,
}

impl Kind {
    pub(crate) fn resource(self) -> &'static str {
        match self {
            Kind::Pods => "pods",
            Kind::Namespaces => "namespaces",
            Kind::ConfigMaps => "configmaps",
        }
    }

    fn list_kind(self) -> &'static str {
        match self {
            Kind::Pods => "PodList",
            Kind::Namespaces => "NamespaceList",
            Kind::ConfigMaps => "ConfigMapList",
        }
    }
}

/// A stored object and its creation time (for the Age column).
#[derive(Clone, Debug)]
pub(crate) struct Obj {
    pub value: Value,
    pub created: OffsetDateTime,
}

impl Obj {
    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }

    fn namespace(&self) -> &str {
        self.value["metadata"]["namespace"].as_str().unwrap_or("")
    }
}

/// A change, as watchers see it.
#[derive(Clone, Debug)]
pub(crate) struct Event {
    pub kind: Kind,
    pub event_type: &'static str,
    pub rv: u64,
    pub obj: Obj,
}

struct Inner {
    rv: u64,
    /// Recent events, replayed to a watch that starts from an older resourceVersion.
    history: VecDeque<Arc<Event>>,
    uid_seq: u64,
    namespaces: BTreeMap<String, Obj>,
    pods: BTreeMap<(String, String), Obj>,
}

/// How many recent events a watch can be replayed from.
const HISTORY: usize = 1000;

/// Namespaces and pods.
pub(crate) struct Store {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Arc<Event>>,
    seed: u64,
}

/// RFC 3339 in UTC with second precision, as Kubernetes writes timestamps.
pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// The Age column: kubectl's short human-readable duration.
pub(crate) fn human_age(d: Duration) -> String {
    let s = d.as_secs();
    if s < 120 {
        return format!("{s}s");
    }
    let m = s / 60;
    if m < 10 {
        return match s % 60 {
            0 => format!("{m}m"),
            r => format!("{m}m{r}s"),
        };
    }
    if m < 180 {
        return format!("{m}m");
    }
    let h = m / 60;
    if h < 8 {
        return match m % 60 {
            0 => format!("{h}h"),
            r => format!("{h}h{r}m"),
        };
    }
    if h < 48 {
        return format!("{h}h");
    }
    if h < 24 * 8 {
        return match h % 24 {
            0 => format!("{}d", h / 24),
            r => format!("{}d{r}h", h / 24),
        };
    }
    if h < 24 * 365 * 2 {
        return format!("{}d", h / 24);
    }
    format!("{}y", h / 24 / 365)
}

fn age(created: OffsetDateTime) -> String {
    let d = OffsetDateTime::now_utc() - created;
    human_age(Duration::from_secs(d.whole_seconds().max(0) as u64))
}

impl Store {
    /// The demo data: namespaces default, team-a, team-b; pods team-a/web-0, team-a/web-1,
    /// team-b/db-0 (created five minutes ago).
    pub(crate) fn seeded() -> Store {
        let (tx, _) = broadcast::channel(1024);
        let seed = OffsetDateTime::now_utc().unix_timestamp_nanos() as u64;
        let store = Store {
            inner: Mutex::new(Inner {
                rv: 100,
                history: VecDeque::new(),
                uid_seq: 0,
                namespaces: BTreeMap::new(),
                pods: BTreeMap::new(),
            }),
            tx,
            seed,
        };
        let then = OffsetDateTime::now_utc() - time::Duration::minutes(5);
        for ns in ["default", "team-a", "team-b"] {
            store.create_namespace_at(ns, then);
        }
        for (ns, name) in [("team-a", "web-0"), ("team-a", "web-1"), ("team-b", "db-0")] {
            let _ = store.create_pod_at(ns, name, None, then);
        }
        store
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn uid(&self, inner: &mut Inner) -> String {
        inner.uid_seq += 1;
        let x = self.seed ^ inner.uid_seq.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let y = inner.uid_seq.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (self.seed >> 7);
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            (x >> 32) as u32,
            (x >> 16) as u16,
            (x & 0xfff) as u16,
            (y >> 52) as u16 & 0xfff,
            y & 0xffff_ffff_ffff
        )
    }

    fn emit(&self, inner: &mut Inner, kind: Kind, event_type: &'static str, obj: &Obj) {
        let ev = Arc::new(Event {
            kind,
            event_type,
            rv: inner.rv,
            obj: obj.clone(),
        });
        if inner.history.len() >= HISTORY {
            inner.history.pop_front();
        }
        inner.history.push_back(ev.clone());
        let _ = self.tx.send(ev);
    }

    fn create_namespace_at(&self, name: &str, created: OffsetDateTime) {
        let mut inner = self.lock();
        if inner.namespaces.contains_key(name) {
            return;
        }
        inner.rv += 1;
        let rv = inner.rv;
        let uid = self.uid(&mut inner);
        let obj = Obj {
            value: json!({
                "kind": "Namespace",
                "apiVersion": "v1",
                "metadata": {
                    "name": name,
                    "uid": uid,
                    "resourceVersion": rv.to_string(),
                    "creationTimestamp": rfc3339(created),
                    "labels": { "kubernetes.io/metadata.name": name },
                },
                "spec": { "finalizers": ["kubernetes"] },
                "status": { "phase": "Active" },
            }),
            created,
        };
        inner.namespaces.insert(name.to_string(), obj.clone());
        self.emit(&mut inner, Kind::Namespaces, "ADDED", &obj);
    }

    /// Creates a pod (`spec` from the request body, or the default container). `Err` carries the
    /// existing pod when the name is taken.
    pub(crate) fn create_pod(
        &self,
        ns: &str,
        name: &str,
        body: Option<&Value>,
    ) -> Result<Value, ()> {
        self.create_pod_at(ns, name, body, OffsetDateTime::now_utc())
    }

    fn create_pod_at(
        &self,
        ns: &str,
        name: &str,
        body: Option<&Value>,
        created: OffsetDateTime,
    ) -> Result<Value, ()> {
        let mut inner = self.lock();
        let key = (ns.to_string(), name.to_string());
        if inner.pods.contains_key(&key) {
            return Err(());
        }
        inner.rv += 1;
        let rv = inner.rv;
        let uid = self.uid(&mut inner);
        let spec = body
            .and_then(|b| b.get("spec"))
            .filter(|s| s.get("containers").and_then(Value::as_array).is_some())
            .cloned()
            .unwrap_or_else(
                || json!({ "containers": [{ "name": "app", "image": "example/app:1" }] }),
            );
        let mut metadata = json!({
            "name": name,
            "namespace": ns,
            "uid": uid,
            "resourceVersion": rv.to_string(),
            "creationTimestamp": rfc3339(created),
        });
        if let Some(labels) = body.and_then(|b| b["metadata"].get("labels")) {
            metadata["labels"] = labels.clone();
        }
        let started = rfc3339(created);
        let statuses: Vec<Value> = spec["containers"]
            .as_array()
            .map(|cs| {
                cs.iter()
                    .map(|c| {
                        json!({
                            "name": c["name"],
                            "image": c["image"],
                            "imageID": "",
                            "ready": true,
                            "started": true,
                            "restartCount": 0,
                            "state": { "running": { "startedAt": started } },
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let obj = Obj {
            value: json!({
                "kind": "Pod",
                "apiVersion": "v1",
                "metadata": metadata,
                "spec": spec,
                "status": {
                    "phase": "Running",
                    "conditions": [
                        { "type": "Initialized", "status": "True", "lastTransitionTime": started },
                        { "type": "Ready", "status": "True", "lastTransitionTime": started },
                        { "type": "ContainersReady", "status": "True", "lastTransitionTime": started },
                        { "type": "PodScheduled", "status": "True", "lastTransitionTime": started },
                    ],
                    "hostIP": "10.0.0.1",
                    "podIP": "10.244.0.10",
                    "startTime": started,
                    "containerStatuses": statuses,
                },
            }),
            created,
        };
        inner.pods.insert(key, obj.clone());
        self.emit(&mut inner, Kind::Pods, "ADDED", &obj);
        Ok(obj.value)
    }

    /// Deletes a pod, returning it (with the resourceVersion of the deletion).
    pub(crate) fn delete_pod(&self, ns: &str, name: &str) -> Option<Value> {
        let mut inner = self.lock();
        let mut obj = inner.pods.remove(&(ns.to_string(), name.to_string()))?;
        inner.rv += 1;
        let rv = inner.rv;
        obj.value["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        self.emit(&mut inner, Kind::Pods, "DELETED", &obj);
        Some(obj.value)
    }

    pub(crate) fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<Obj> {
        let inner = self.lock();
        match kind {
            Kind::Pods => inner.pods.get(&(ns.to_string(), name.to_string())).cloned(),
            Kind::Namespaces => inner.namespaces.get(name).cloned(),
            Kind::ConfigMaps => None,
        }
    }

    pub(crate) fn namespace_exists(&self, ns: &str) -> bool {
        self.lock().namespaces.contains_key(ns)
    }

    fn list_locked(inner: &Inner, kind: Kind, ns: &str, name: Option<&str>) -> Vec<Obj> {
        let keep = |o: &&Obj| name.is_none_or(|n| o.name() == n);
        match kind {
            Kind::Pods => inner
                .pods
                .values()
                .filter(|o| ns.is_empty() || o.namespace() == ns)
                .filter(keep)
                .cloned()
                .collect(),
            Kind::Namespaces => inner.namespaces.values().filter(keep).cloned().collect(),
            Kind::ConfigMaps => Vec::new(),
        }
    }

    /// Objects of a kind (in `ns` when non-empty), with the current resourceVersion.
    pub(crate) fn list(&self, kind: Kind, ns: &str, name: Option<&str>) -> (u64, Vec<Obj>) {
        let inner = self.lock();
        (inner.rv, Self::list_locked(&inner, kind, ns, name))
    }

    /// Subscribes to changes and returns, atomically with the subscription, the current
    /// resourceVersion, the current objects and the remembered events newer than `since`.
    #[allow(clippy::type_complexity)]
    fn subscribe(
        &self,
        kind: Kind,
        ns: &str,
        name: Option<&str>,
        since: Option<u64>,
    ) -> (
        u64,
        Vec<Obj>,
        VecDeque<Arc<Event>>,
        broadcast::Receiver<Arc<Event>>,
    ) {
        let inner = self.lock();
        let rx = self.tx.subscribe();
        let replay = match since {
            Some(rv) => inner
                .history
                .iter()
                .filter(|e| e.rv > rv)
                .cloned()
                .collect(),
            None => VecDeque::new(),
        };
        (
            inner.rv,
            Self::list_locked(&inner, kind, ns, name),
            replay,
            rx,
        )
    }
}

/// A `List` object.
pub(crate) fn list_value(kind: Kind, rv: u64, objs: &[Obj]) -> Value {
    json!({
        "kind": kind.list_kind(),
        "apiVersion": "v1",
        "metadata": { "resourceVersion": rv.to_string() },
        "items": objs.iter().map(|o| o.value.clone()).collect::<Vec<_>>(),
    })
}

fn column(name: &str, ty: &str, format: &str, description: &str) -> Value {
    json!({ "name": name, "type": ty, "format": format, "description": description, "priority": 0 })
}

fn column_definitions(kind: Kind) -> Value {
    let name = column(
        "Name",
        "string",
        "name",
        "Name must be unique within a namespace.",
    );
    let age = column(
        "Age",
        "string",
        "",
        "CreationTimestamp is a timestamp representing the server time when this object was created.",
    );
    match kind {
        Kind::Pods => json!([
            name,
            column(
                "Ready",
                "string",
                "",
                "The aggregate readiness state of this pod for accepting traffic."
            ),
            column(
                "Status",
                "string",
                "",
                "The aggregate status of the containers in this pod."
            ),
            column(
                "Restarts",
                "integer",
                "",
                "The number of times the containers in this pod have been restarted."
            ),
            age,
        ]),
        Kind::Namespaces => json!([
            name,
            column("Status", "string", "", "The status of the namespace"),
            age,
        ]),
        Kind::ConfigMaps => json!([
            name,
            column("Data", "string", "", "Number of data entries."),
            age,
        ]),
    }
}

fn row(kind: Kind, obj: &Obj, include: IncludeObject) -> Value {
    let v = &obj.value;
    let cells = match kind {
        Kind::Pods => {
            let statuses = v["status"]["containerStatuses"].as_array();
            let total = v["spec"]["containers"].as_array().map_or(0, Vec::len);
            let ready = statuses.map_or(0, |s| s.iter().filter(|c| c["ready"] == true).count());
            let restarts: i64 = statuses.map_or(0, |s| {
                s.iter().filter_map(|c| c["restartCount"].as_i64()).sum()
            });
            json!([
                obj.name(),
                format!("{ready}/{total}"),
                v["status"]["phase"],
                restarts,
                age(obj.created),
            ])
        }
        Kind::Namespaces => json!([obj.name(), v["status"]["phase"], age(obj.created)]),
        Kind::ConfigMaps => json!([obj.name(), 0, age(obj.created)]),
    };
    let object = match include {
        IncludeObject::Object => v.clone(),
        IncludeObject::Metadata => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": v["metadata"],
        }),
    };
    json!({ "cells": cells, "object": object })
}

/// A `meta.k8s.io/v1` Table of the objects.
pub(crate) fn table(kind: Kind, rv: u64, objs: &[Obj], include: IncludeObject) -> Value {
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": { "resourceVersion": rv.to_string() },
        "columnDefinitions": column_definitions(kind),
        "rows": objs.iter().map(|o| row(kind, o, include)).collect::<Vec<_>>(),
    })
}

/// Which events a watch delivers.
#[derive(Clone, Debug)]
pub(crate) struct WatchSpec {
    pub kind: Kind,
    /// Empty: every namespace.
    pub namespace: String,
    pub name: Option<String>,
    /// `resourceVersion` query parameter.
    pub resource_version: Option<String>,
    pub timeout: Option<Duration>,
    pub want: Want,
}

fn event_line(event_type: &str, kind: Kind, obj: &Obj, rv: u64, want: Want) -> Bytes {
    let object = match want {
        Want::Object => obj.value.clone(),
        Want::Table(include) => table(kind, rv, std::slice::from_ref(obj), include),
    };
    let mut line = json!({ "type": event_type, "object": object }).to_string();
    line.push('\n');
    Bytes::from(line)
}

struct WatchState {
    spec: WatchSpec,
    initial: std::vec::IntoIter<Obj>,
    initial_rv: u64,
    min_rv: u64,
    replay: VecDeque<Arc<Event>>,
    rx: broadcast::Receiver<Arc<Event>>,
    deadline: Option<tokio::time::Instant>,
}

/// Starts a watch: ADDED for existing objects when `resourceVersion` is absent, "" or "0",
/// then every matching change, until `timeoutSeconds` passes or the client goes away.
pub(crate) fn watch_body(store: &Store, spec: WatchSpec) -> Body {
    let from_start = matches!(
        spec.resource_version.as_deref(),
        None | Some("") | Some("0")
    );
    let since: Option<u64> = if from_start {
        None
    } else {
        spec.resource_version
            .as_deref()
            .and_then(|s| s.parse().ok())
    };
    let (current_rv, existing, replay, rx) =
        store.subscribe(spec.kind, &spec.namespace, spec.name.as_deref(), since);
    let min_rv = since.unwrap_or(current_rv);
    let initial = if from_start { existing } else { Vec::new() };
    let state = WatchState {
        deadline: spec.timeout.map(|t| tokio::time::Instant::now() + t),
        spec,
        initial: initial.into_iter(),
        initial_rv: current_rv,
        min_rv,
        replay,
        rx,
    };
    let s = stream::unfold(state, |mut st| async move {
        if let Some(obj) = st.initial.next() {
            let line = event_line("ADDED", st.spec.kind, &obj, st.initial_rv, st.spec.want);
            return Some((Ok(Frame::data(line)), st));
        }
        loop {
            let ev = match st.replay.pop_front() {
                Some(ev) => ev,
                None => {
                    let recv = st.rx.recv();
                    let ev = match st.deadline {
                        Some(d) => match tokio::time::timeout_at(d, recv).await {
                            Ok(r) => r,
                            Err(_) => return None,
                        },
                        None => recv.await,
                    };
                    match ev {
                        Ok(ev) => ev,
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            };
            if ev.kind != st.spec.kind || ev.rv <= st.min_rv {
                continue;
            }
            if !st.spec.namespace.is_empty() && ev.obj.namespace() != st.spec.namespace {
                continue;
            }
            if st.spec.name.as_deref().is_some_and(|n| n != ev.obj.name()) {
                continue;
            }
            let line = event_line(ev.event_type, ev.kind, &ev.obj, ev.rv, st.spec.want);
            return Some((Ok(Frame::data(line)), st));
        }
    });
    StreamBody::new(s).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        assert_eq!(human_age(Duration::from_secs(5)), "5s");
        assert_eq!(human_age(Duration::from_secs(300)), "5m");
        assert_eq!(human_age(Duration::from_secs(330)), "5m30s");
        assert_eq!(human_age(Duration::from_secs(3600 * 3)), "3h");
        assert_eq!(human_age(Duration::from_secs(3600 * 50)), "2d2h");
    }

    #[test]
    fn seeded_store() {
        let s = Store::seeded();
        let (rv, pods) = s.list(Kind::Pods, "team-a", None);
        assert_eq!(pods.len(), 2);
        assert!(rv > 100);
        assert_eq!(s.list(Kind::Pods, "", None).1.len(), 3);
        assert_eq!(s.list(Kind::Namespaces, "", None).1.len(), 3);
        assert!(s.create_pod("team-a", "web-0", None).is_err());
        let t = table(Kind::Pods, rv, &pods, IncludeObject::Metadata);
        assert_eq!(
            t["rows"][0]["cells"],
            json!(["web-0", "1/1", "Running", 0, "5m"])
        );
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(t["columnDefinitions"][3]["type"], "integer");
        let deleted = s.delete_pod("team-a", "web-0").unwrap();
        assert_eq!(deleted["metadata"]["name"], "web-0");
        assert!(s.get(Kind::Pods, "team-a", "web-0").is_none());
    }
}
