//! `kubectl auth can-i --list` (SelfSubjectRulesReview) answered from the gateway's policy.
//!
//! kube-apiserver would list its own RBAC rules, including what the gateway refuses. The
//! gateway answers instead, from the same decisions `kubectl auth can-i <verb> <resource>`
//! gets: every verb of every resource the cluster's discovery lists (see [`crate::discovery`])
//! is decided as a SelfSubjectAccessReview with those attributes would be — namespaced
//! resources in the review's namespace, cluster-scoped ones without a namespace — and so is
//! `get` on a fixed list of well-known non-resource paths ([`NON_RESOURCE_PATHS`]).
//!
//! The list is only as exact as its inputs: it says `incomplete` (and why, in
//! `evaluationError`, which kubectl prints as a warning) when discovery could not be read, and
//! when the policies read the request's context (device, posture, time, source address), since
//! the listed rules are then what this request, from this device, now, is allowed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::{json, Value};

use crate::authn::Identity;
use crate::authz::cedar::Decision;
use crate::authz::requestinfo::RequestInfo;
use crate::body::Body;
use crate::decide::Decider;
use crate::discovery::Discovery;
use crate::discovery::DiscoveryCache;
use crate::proxy::Upstream;
use crate::refusal::PipelineError;

/// The non-resource paths whose `get` is listed: discovery, version, health and OpenAPI, the
/// paths kubectl and kube's own `system:discovery` role are about. A `/*` path is decided as
/// itself, so a policy matches it with `like "/api/*"`, as it would match any path below.
pub const NON_RESOURCE_PATHS: &[&str] = &[
    "/api",
    "/api/*",
    "/apis",
    "/apis/*",
    "/healthz",
    "/livez",
    "/openapi/*",
    "/readyz",
    "/version",
];

/// One `resourceRules` entry of a SelfSubjectRulesReview status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceRule {
    pub verbs: Vec<String>,
    pub api_groups: Vec<String>,
    pub resources: Vec<String>,
    /// Always empty: rules are listed per resource, not per object.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub resource_names: Vec<String>,
}

/// One `nonResourceRules` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NonResourceRule {
    pub verbs: Vec<String>,
    #[serde(rename = "nonResourceURLs")]
    pub non_resource_urls: Vec<String>,
}

/// A SelfSubjectRulesReview's `status` (`SubjectRulesReviewStatus`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RulesStatus {
    pub resource_rules: Vec<ResourceRule>,
    pub non_resource_rules: Vec<NonResourceRule>,
    pub incomplete: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub evaluation_error: String,
}

impl RulesStatus {
    /// Marks the list incomplete, adding `why` to the evaluation error.
    pub fn mark_incomplete(&mut self, why: &str) {
        self.incomplete = true;
        if !self.evaluation_error.is_empty() {
            self.evaluation_error.push_str("; ");
        }
        self.evaluation_error.push_str(why);
    }
}

/// The attributes a SelfSubjectAccessReview with these `resourceAttributes` is decided with.
fn resource_attributes(
    r: &crate::discovery::ApiResource,
    verb: &str,
    namespace: &str,
) -> RequestInfo {
    // Built by the function the SelfSubjectAccessReview path uses, so that `--list` and
    // `kubectl auth can-i <verb> <resource>` decide the very same attributes.
    crate::decide::info_from_attributes(&json!({"resourceAttributes": {
        "verb": verb,
        "group": r.group,
        "version": r.version,
        "resource": r.resource,
        "subresource": r.subresource,
        "namespace": namespace,
    }}))
    .expect("resourceAttributes make a RequestInfo")
}

fn non_resource_attributes(path: &str) -> RequestInfo {
    crate::decide::info_from_attributes(
        &json!({"nonResourceAttributes": {"verb": "get", "path": path}}),
    )
    .expect("nonResourceAttributes make a RequestInfo")
}

/// What `decide` allows in `namespace`, as a SelfSubjectRulesReview status: each discovered
/// resource's verbs (namespaced resources in `namespace`, cluster-scoped ones without one),
/// resources of one group with the same allowed verbs in one rule; `get` on
/// [`NON_RESOURCE_PATHS`]. Incomplete when `discovery` misses some group versions; other
/// reasons are the caller's to add ([`RulesStatus::mark_incomplete`]).
pub fn rules_status(
    discovery: &Discovery,
    namespace: &str,
    decide: &dyn Fn(&RequestInfo) -> Decision,
) -> RulesStatus {
    // group -> resource ("pods/exec") -> allowed verbs
    let mut allowed: BTreeMap<&str, BTreeMap<String, BTreeSet<&str>>> = BTreeMap::new();
    for r in &discovery.resources {
        let ns = if r.namespaced { namespace } else { "" };
        let verbs: BTreeSet<&str> = r.verbs.iter().map(String::as_str).collect();
        for verb in verbs {
            if decide(&resource_attributes(r, verb, ns)).allowed {
                allowed
                    .entry(r.group.as_str())
                    .or_default()
                    .entry(r.name())
                    .or_default()
                    .insert(verb);
            }
        }
    }
    // (group, verbs) -> resources: one rule per verb set within a group keeps the list short.
    let mut grouped: BTreeMap<(&str, Vec<&str>), Vec<String>> = BTreeMap::new();
    for (group, resources) in allowed {
        for (name, verbs) in resources {
            grouped
                .entry((group, verbs.into_iter().collect()))
                .or_default()
                .push(name);
        }
    }
    let resource_rules = grouped
        .into_iter()
        .map(|((group, verbs), resources)| ResourceRule {
            verbs: verbs.into_iter().map(str::to_owned).collect(),
            api_groups: vec![group.to_owned()],
            resources,
            resource_names: Vec::new(),
        })
        .collect();
    let paths: Vec<String> = NON_RESOURCE_PATHS
        .iter()
        .filter(|p| decide(&non_resource_attributes(p)).allowed)
        .map(|p| p.to_string())
        .collect();
    let non_resource_rules = if paths.is_empty() {
        Vec::new()
    } else {
        vec![NonResourceRule {
            verbs: vec!["get".into()],
            non_resource_urls: paths,
        }]
    };
    let mut status = RulesStatus {
        resource_rules,
        non_resource_rules,
        ..Default::default()
    };
    if !discovery.missing.is_empty() {
        let which: Vec<String> = discovery
            .missing
            .iter()
            .map(|(gv, why)| format!("{gv} ({why})"))
            .collect();
        status.mark_incomplete(&format!(
            "the gateway could not read the resource lists of {} from kube-apiserver: their \
             resources are not listed",
            which.join(", ")
        ));
    }
    status
}

/// Why the list depends on the request it was made for.
pub const CONTEXT_DEPENDENT: &str = "the gateway's policies have conditions on the request's \
     context (device, posture, credential, time or source address): these rules are what this \
     request is allowed, from this device, now";

/// What the rules review uses: the decider (its policy step), the cluster's API discovery
/// (cached, read from kube-apiserver as the gateway) and how long a caller waits for it.
pub struct RulesReview {
    pub decider: Arc<Decider>,
    pub discovery: DiscoveryCache,
    pub upstream: Arc<Upstream>,
    pub request_timeout: std::time::Duration,
}

/// Who asks for their rules, with the facts their own request was decided with.
pub struct Asker {
    /// The caller, or whom it impersonates.
    pub identity: Arc<Identity>,
    /// The device and its posture, as the decider saw them for this request.
    pub device: Option<crate::authz::cedar::DeviceFacts>,
    pub source_ip: std::net::IpAddr,
    pub now: std::time::SystemTime,
    /// The review's API version (`v1`, `v1beta1`).
    pub api_version: String,
}

/// Answers a SelfSubjectRulesReview (`POST .../selfsubjectrulesreviews`) for the asker from
/// policy, through the decider's policy step, with `201 Created` and the review with its
/// status, as kube-apiserver does. Only called with policies configured.
pub async fn serve(
    review: &Arc<RulesReview>,
    req: Request<Incoming>,
    asker: Asker,
) -> Result<Response<Body>, PipelineError> {
    // kubectl sends protobuf; other clients JSON.
    let (_, bytes, is_protobuf) = crate::authz::kubeproto::read_review(req).await?;
    let namespace = if is_protobuf {
        crate::authz::kubeproto::self_subject_rules_review_namespace(&bytes).ok_or_else(|| {
            PipelineError::BadRequest("not a protobuf SelfSubjectRulesReview".into())
        })?
    } else {
        json_namespace(&bytes)?
    };

    // A caller waits for discovery no longer than for any request; the fetch goes on without
    // it, for the next review.
    let discovery = {
        let fetching = review.clone();
        let get = review.discovery.get(move |previous| async move {
            crate::discovery::fetch(&fetching.upstream, previous.as_deref()).await
        });
        match tokio::time::timeout(review.request_timeout, get).await {
            Ok(Ok(d)) => Ok(d),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "kube-apiserver did not answer within {}s; still trying",
                review.request_timeout.as_secs_f64()
            )),
        }
    };

    // Hundreds of decisions on a large cluster: CPU work, kept off the request threads.
    let started = Instant::now();
    let status = {
        let review = review.clone();
        let identity = asker.identity.clone();
        let device = asker.device.clone();
        let (source_ip, now) = (asker.source_ip, asker.now);
        let namespace = namespace.clone();
        tokio::task::spawn_blocking(move || {
            let decide = |attributes: &RequestInfo| {
                review.decider.policy_decision(
                    &identity,
                    attributes,
                    device.as_ref(),
                    source_ip,
                    now,
                )
            };
            let mut status = match &discovery {
                Ok(d) => rules_status(d, &namespace, &decide),
                Err(e) => {
                    let mut s = rules_status(&Discovery::default(), &namespace, &decide);
                    s.mark_incomplete(&format!(
                        "the gateway could not read the cluster's API discovery ({e}): no \
                         resource rules are listed"
                    ));
                    s
                }
            };
            if review
                .decider
                .authorizer()
                .engine()
                .is_some_and(|engine| engine.reads_context())
            {
                status.mark_incomplete(CONTEXT_DEPENDENT);
            }
            status
        })
        .await
        .map_err(|e| match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(_) => PipelineError::ShuttingDown,
        })?
    };
    tracing::debug!(
        user = asker.identity.user(),
        namespace = %namespace,
        rules = status.resource_rules.len(),
        incomplete = status.incomplete,
        ms = started.elapsed().as_secs_f64() * 1000.0,
        "SelfSubjectRulesReview answered from policy"
    );
    let review = json!({
        "kind": "SelfSubjectRulesReview",
        "apiVersion": format!("authorization.k8s.io/{}", asker.api_version),
        "metadata": {"creationTimestamp": null},
        "spec": {"namespace": namespace},
        "status": status,
    });
    Ok(crate::body::json_response(StatusCode::CREATED, &review))
}

/// `spec.namespace` of a JSON SelfSubjectRulesReview (`""` when absent).
fn json_namespace(body: &[u8]) -> Result<String, PipelineError> {
    let review: Value = serde_json::from_slice(body).map_err(|e| {
        PipelineError::BadRequest(format!("not a SelfSubjectRulesReview: {e}").into())
    })?;
    if !review.is_object() {
        return Err(PipelineError::BadRequest(
            "not a SelfSubjectRulesReview: not a JSON object".into(),
        ));
    }
    match review["kind"].as_str() {
        None | Some("SelfSubjectRulesReview") => {}
        Some(kind) => {
            return Err(PipelineError::BadRequest(
                format!("expected a SelfSubjectRulesReview, got a {kind}").into(),
            ))
        }
    }
    match &review["spec"]["namespace"] {
        Value::Null => Ok(String::new()),
        Value::String(ns) => Ok(ns.clone()),
        _ => Err(PipelineError::BadRequest(
            "spec.namespace must be a string".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::ApiResource;

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

    const ALL: &[&str] = &[
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    ];

    fn cluster() -> Discovery {
        Discovery::new(
            [vec![
                res("", "configmaps", true, ALL),
                res("", "namespaces", false, ALL),
                res("", "pods", true, ALL),
                res("", "pods/exec", true, &["create", "get"]),
                res("", "pods/log", true, &["get"]),
                res("", "secrets", true, ALL),
                res("apps", "deployments", true, ALL),
                res("apps", "statefulsets", true, ALL),
                res("rbac.authorization.k8s.io", "clusterroles", false, ALL),
            ]],
            Vec::new(),
        )
    }

    fn allow(yes: bool) -> Decision {
        Decision {
            allowed: yes,
            ..Default::default()
        }
    }

    fn rule(group: &str, resources: &[&str], verbs: &[&str]) -> ResourceRule {
        ResourceRule {
            verbs: verbs.iter().map(|v| v.to_string()).collect(),
            api_groups: vec![group.into()],
            resources: resources.iter().map(|r| r.to_string()).collect(),
            resource_names: Vec::new(),
        }
    }

    const READ: &[&str] = &["get", "list", "watch"];

    #[test]
    fn resources_of_a_group_with_the_same_verbs_share_a_rule() {
        // Reads everything in team-a except secrets; writes deployments; execs into pods.
        let decide = |i: &RequestInfo| {
            let read = matches!(i.verb.as_str(), "get" | "list" | "watch");
            allow(
                i.is_resource_request
                    && i.namespace == "team-a"
                    && i.resource != "secrets"
                    && ((read && i.subresource != "exec")
                        || (i.resource == "deployments" && i.verb != "deletecollection")
                        || (i.subresource == "exec" && i.verb == "create")),
            )
        };
        let status = rules_status(&cluster(), "team-a", &decide);
        assert_eq!(
            status.resource_rules,
            [
                rule("", &["pods/exec"], &["create"]),
                rule("", &["pods/log"], &["get"]),
                rule("", &["configmaps", "pods"], READ),
                rule(
                    "apps",
                    &["deployments"],
                    &["create", "delete", "get", "list", "patch", "update", "watch"]
                ),
                rule("apps", &["statefulsets"], READ),
            ]
        );
        assert!(status.non_resource_rules.is_empty());
        assert!(!status.incomplete);
        assert_eq!(status.evaluation_error, "");
    }

    #[test]
    fn namespaced_resources_are_decided_in_the_namespace_and_cluster_scoped_ones_without() {
        let seen = std::sync::Mutex::new(Vec::new());
        let decide = |i: &RequestInfo| {
            if i.is_resource_request {
                seen.lock()
                    .unwrap()
                    .push((i.resource.clone(), i.namespace.clone()));
            }
            // A namespace-scoped grant, and a cluster-wide read of cluster roles.
            allow(
                i.namespace == "team-a"
                    || (i.namespace.is_empty() && i.resource == "clusterroles" && i.verb == "get"),
            )
        };
        let status = rules_status(&cluster(), "team-a", &decide);
        for (resource, ns) in seen.lock().unwrap().iter() {
            let cluster_scoped = resource == "namespaces" || resource == "clusterroles";
            assert_eq!(
                ns.is_empty(),
                cluster_scoped,
                "{resource} decided in {ns:?}"
            );
        }
        let listed: Vec<&str> = status
            .resource_rules
            .iter()
            .flat_map(|r| r.resources.iter().map(String::as_str))
            .collect();
        assert!(!listed.contains(&"namespaces"), "{listed:?}");
        assert!(listed.contains(&"clusterroles"), "{listed:?}");
        assert!(listed.contains(&"secrets"), "{listed:?}");
        assert!(status.resource_rules.contains(&rule(
            "rbac.authorization.k8s.io",
            &["clusterroles"],
            &["get"]
        )));

        // Another namespace: only what is allowed without one.
        let status = rules_status(&cluster(), "team-b", &decide);
        assert_eq!(
            status.resource_rules,
            [rule(
                "rbac.authorization.k8s.io",
                &["clusterroles"],
                &["get"]
            )]
        );
    }

    #[test]
    fn every_decision_is_what_a_self_subject_access_review_with_those_attributes_decides() {
        let seen = std::sync::Mutex::new(Vec::new());
        let decide = |i: &RequestInfo| {
            seen.lock().unwrap().push(i.clone());
            allow(false)
        };
        let status = rules_status(&cluster(), "team-a", &decide);
        assert!(status.resource_rules.is_empty() && status.non_resource_rules.is_empty());
        let seen = seen.into_inner().unwrap();
        let exec = seen
            .iter()
            .find(|i| i.subresource == "exec" && i.verb == "create")
            .unwrap();
        let ssar = crate::decide::info_from_attributes(&json!({"resourceAttributes": {
            "namespace": "team-a", "verb": "create", "version": "v1",
            "resource": "pods", "subresource": "exec"}}))
        .unwrap();
        assert_eq!(*exec, ssar);
        let deploy = seen
            .iter()
            .find(|i| i.resource == "deployments" && i.verb == "list")
            .unwrap();
        assert_eq!(
            (deploy.api_prefix.as_str(), deploy.api_group.as_str()),
            ("apis", "apps")
        );
        // Each verb of each resource once, and each non-resource path once.
        let resource_decisions = seen.iter().filter(|i| i.is_resource_request).count();
        let verbs: usize = cluster().resources.iter().map(|r| r.verbs.len()).sum();
        assert_eq!(resource_decisions, verbs);
        let paths: Vec<&str> = seen
            .iter()
            .filter(|i| !i.is_resource_request)
            .map(|i| {
                assert_eq!(i.verb, "get");
                i.path.as_str()
            })
            .collect();
        assert_eq!(paths, NON_RESOURCE_PATHS);
    }

    #[test]
    fn allowed_non_resource_paths_are_one_get_rule() {
        let decide = |i: &RequestInfo| {
            allow(!i.is_resource_request && (i.path.starts_with("/api") || i.path == "/version"))
        };
        let status = rules_status(&cluster(), "team-a", &decide);
        assert!(status.resource_rules.is_empty());
        assert_eq!(
            status.non_resource_rules,
            [NonResourceRule {
                verbs: vec!["get".into()],
                non_resource_urls: ["/api", "/api/*", "/apis", "/apis/*", "/version"]
                    .map(String::from)
                    .to_vec(),
            }]
        );
    }

    #[test]
    fn missing_discovery_makes_the_list_incomplete_and_says_why() {
        let mut d = cluster();
        d.missing = vec![(
            "metrics.k8s.io/v1beta1".into(),
            "GET /apis/metrics.k8s.io/v1beta1: kube-apiserver answered 503".into(),
        )];
        let status = rules_status(&d, "team-a", &|_| allow(true));
        assert!(status.incomplete);
        assert_eq!(
            status.evaluation_error,
            "the gateway could not read the resource lists of metrics.k8s.io/v1beta1 (GET \
             /apis/metrics.k8s.io/v1beta1: kube-apiserver answered 503) from kube-apiserver: \
             their resources are not listed"
        );
        // What was read is still listed.
        assert!(!status.resource_rules.is_empty());

        let mut status = rules_status(&Discovery::default(), "team-a", &|_| allow(true));
        assert!(!status.incomplete && status.resource_rules.is_empty());
        assert_eq!(status.non_resource_rules[0].non_resource_urls.len(), 9);
        status.mark_incomplete("first");
        status.mark_incomplete(CONTEXT_DEPENDENT);
        assert!(status.incomplete);
        assert_eq!(
            status.evaluation_error,
            format!("first; {CONTEXT_DEPENDENT}")
        );
    }

    #[test]
    fn the_status_serializes_as_kube_apiserver_writes_it() {
        let status = RulesStatus {
            resource_rules: vec![rule("", &["pods"], &["get"])],
            non_resource_rules: vec![NonResourceRule {
                verbs: vec!["get".into()],
                non_resource_urls: vec!["/api".into()],
            }],
            incomplete: false,
            evaluation_error: String::new(),
        };
        assert_eq!(
            serde_json::to_value(&status).unwrap(),
            json!({
                "resourceRules": [{"verbs": ["get"], "apiGroups": [""], "resources": ["pods"]}],
                "nonResourceRules": [{"verbs": ["get"], "nonResourceURLs": ["/api"]}],
                "incomplete": false,
            })
        );
    }

    #[test]
    fn the_engine_tells_whether_a_policy_reads_the_requests_context() {
        let engine = |text: &str| {
            crate::authz::cedar::PolicyEngine::from_sources(&[("p.cedar".into(), text.into())])
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let scope_only = "permit (principal in k8s::Group::\"team-a\", action, resource in k8s::Namespace::\"team-a\");";
        for text in [
            scope_only,
            // Conditions on the resource, a string and a comment that say "context".
            "// the context of this rule\npermit (principal, action, resource is k8s::Resource) when { resource.name == \"context\" };",
        ] {
            assert!(!engine(text).reads_context(), "{text}");
        }
        for text in [
            "forbid (principal, action, resource) unless { context has device };",
            "permit (principal, action, resource) when { context.authn.mfa };",
            "forbid (principal, action in k8s::Action::\"write\", resource) unless { context.requestTime.hourUtc < 18 };",
            "permit (principal, action, resource) when { context.sourceIp.isInRange(ip(\"10.0.0.0/8\")) };",
        ] {
            assert!(
                engine(&format!("{scope_only}\n{text}")).reads_context(),
                "{text}"
            );
        }
    }

    fn ld(num: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![((num << 3) | 2) as u8, payload.len() as u8];
        v.extend_from_slice(payload);
        v
    }

    fn protobuf_review(kind: &[u8], namespace: Option<&[u8]>) -> Vec<u8> {
        let spec = namespace.map(|ns| ld(1, ns)).unwrap_or_default();
        let obj = [ld(1, b""), ld(2, &spec)].concat();
        let tm = [ld(1, b"authorization.k8s.io/v1"), ld(2, kind)].concat();
        [b"k8s\0".to_vec(), ld(1, &tm), ld(2, &obj)].concat()
    }

    #[test]
    fn reads_the_namespace_of_kubectls_protobuf_review_and_of_json() {
        assert_eq!(
            crate::authz::kubeproto::self_subject_rules_review_namespace(&protobuf_review(
                b"SelfSubjectRulesReview",
                Some(b"team-a")
            ))
            .as_deref(),
            Some("team-a")
        );
        assert_eq!(
            crate::authz::kubeproto::self_subject_rules_review_namespace(&protobuf_review(
                b"SelfSubjectRulesReview",
                None
            ))
            .as_deref(),
            Some("")
        );
        assert_eq!(
            crate::authz::kubeproto::self_subject_rules_review_namespace(&protobuf_review(
                b"SelfSubjectAccessReview",
                Some(b"x")
            )),
            None
        );
        assert_eq!(
            crate::authz::kubeproto::self_subject_rules_review_namespace(b"k8s\0\xff\xff"),
            None
        );
        assert_eq!(
            crate::authz::kubeproto::self_subject_rules_review_namespace(b"{}"),
            None
        );

        let ns = json_namespace(
            br#"{"kind":"SelfSubjectRulesReview","apiVersion":"authorization.k8s.io/v1","spec":{"namespace":"team-a"}}"#,
        )
        .unwrap();
        assert_eq!(ns, "team-a");
        assert_eq!(json_namespace(br#"{"spec":{}}"#).unwrap(), "");
        assert!(json_namespace(br#"{"kind":"Secret"}"#).is_err());
        assert!(json_namespace(br#"{"spec":{"namespace":1}}"#).is_err());
        assert!(json_namespace(b"[]").is_err());
    }
}
