//! `kubectl auth can-i --list` through the gateway lists what the gateway's policy allows, not
//! kube-apiserver's RBAC rules: the real kubectl, a stand-in kube-apiserver whose RBAC allows
//! more than the policy does, and a gateway with a policy set in between.

use crate::support;

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::{send, Harness};
use ztgate::demo::DevSettings;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const DISCOVERY: &str = r#"
@id("discovery-read")
permit (principal, action == k8s::Action::"get", resource is k8s::NonResourceURL)
when {
  resource.path == "/api" || resource.path like "/api/*" ||
  resource.path == "/apis" || resource.path like "/apis/*" ||
  resource.path like "/openapi/*" || resource.path == "/version"
};
"#;

const TEAM_A: &str = r#"
@id("team-a-namespace")
permit (principal in k8s::Group::"team-a", action, resource in k8s::Namespace::"team-a");
"#;

const NO_POD_DELETION: &str = r#"
@id("no-pod-deletion")
@reason("deleting pods goes through the release pipeline, not kubectl")
forbid (
  principal,
  action in [k8s::Action::"delete", k8s::Action::"deletecollection"],
  resource is k8s::Resource
)
when { resource.resource == "pods" };
"#;

const WHOAMI: &str = r#"
@id("whoami")
permit (principal, action == k8s::Action::"create", resource is k8s::Resource)
when { resource.apiGroup == "authentication.k8s.io" && resource.resource == "selfsubjectreviews" };
"#;

/// Reads the time of the request: the answer depends on when it is asked.
const PROD_BUSINESS_HOURS: &str = r#"
@id("prod-business-hours")
@reason("changes to production are only allowed Monday to Friday, 08:00-18:00 UTC")
forbid (principal, action in k8s::Action::"write", resource in k8s::Namespace::"prod")
unless {
  context.requestTime.weekdayUtc >= 1 && context.requestTime.weekdayUtc <= 5 &&
  context.requestTime.hourUtc >= 8 && context.requestTime.hourUtc < 18
};
"#;

async fn start(policy: &str) -> (Harness, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("policy dir");
    std::fs::write(dir.path().join("policy.cedar"), policy).expect("write policy");
    let h = Harness::start_with(DevSettings {
        policies: vec![dir.path().to_path_buf()],
        ..Default::default()
    })
    .await;
    (h, dir)
}

/// What `kubectl auth can-i --list` printed: resource (`pods`, `pods/exec`,
/// `selfsubjectreviews.authentication.k8s.io`) -> verbs, and the non-resource URLs -> verbs.
#[derive(Debug, Default, PartialEq, Eq)]
struct Listed {
    resources: BTreeMap<String, BTreeSet<String>>,
    urls: BTreeMap<String, BTreeSet<String>>,
}

/// Parses kubectl's table: `Resources  Non-Resource URLs  Resource Names  Verbs`, where a
/// non-resource row has an empty first column.
fn parse_list(stdout: &str) -> Listed {
    let mut lines = stdout.lines();
    let header = lines.next().unwrap_or_default();
    assert!(
        header.starts_with("Resources") && header.contains("Non-Resource URLs"),
        "{stdout}"
    );
    let mut listed = Listed::default();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        // Columns are: name (absent on non-resource rows), [urls], [names], [verbs ...].
        let bracketed = |s: &str| {
            s.trim_start_matches('[')
                .trim_end_matches(']')
                .split_whitespace()
                .map(str::to_owned)
                .collect::<BTreeSet<String>>()
        };
        let verbs_at = line.rfind('[').expect("a verbs column");
        let verbs = bracketed(&line[verbs_at..]);
        let cols: Vec<&str> = line[..verbs_at].split_whitespace().collect();
        match cols.as_slice() {
            [url, "[]"] if url.starts_with('[') => {
                for u in bracketed(url) {
                    listed.urls.entry(u).or_default().extend(verbs.clone());
                }
            }
            [name, "[]", "[]"] => {
                listed
                    .resources
                    .entry(name.to_string())
                    .or_default()
                    .extend(verbs);
            }
            other => panic!("unexpected row {other:?} in:\n{stdout}"),
        }
    }
    listed
}

fn verbs(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

async fn can_i_list(h: &Harness, kc: &std::path::Path, ns: &str) -> (Listed, String) {
    let out = h.kubectl(kc, &["auth", "can-i", "--list", "-n", ns]).await;
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    (parse_list(&stdout), stderr)
}

/// What the stand-in received from the gateway on its own behalf (not forwarded for a caller).
fn gateways_own(h: &Harness) -> Vec<ztgate_testkit::RecordedRequest> {
    h.demo
        .apiserver
        .requests()
        .into_iter()
        .filter(|r| r.header_values("impersonate-user").is_empty())
        .collect()
}

fn discovery_urls() -> BTreeMap<String, BTreeSet<String>> {
    [
        "/api",
        "/api/*",
        "/apis",
        "/apis/*",
        "/openapi/*",
        "/version",
    ]
    .iter()
    .map(|u| (u.to_string(), verbs(&["get"])))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_auth_can_i_list_shows_what_policy_allows_not_kubes_rbac() {
    let (h, _p) = start(&format!("{DISCOVERY}{TEAM_A}{NO_POD_DELETION}{WHOAMI}")).await;
    let alice = h.kubeconfig("alice", &["team-a"]);
    h.demo.apiserver.clear_requests();

    let (listed, stderr) = can_i_list(&h, &alice, "team-a").await;
    let all = [
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    ];
    let expected: BTreeMap<String, BTreeSet<String>> = [
        ("configmaps", verbs(&all)),
        // The stand-in's RBAC lets team-a delete pods; the policy does not.
        (
            "pods",
            verbs(&["create", "get", "list", "patch", "update", "watch"]),
        ),
        ("pods/attach", verbs(&["create", "get"])),
        ("pods/exec", verbs(&["create", "get"])),
        ("pods/log", verbs(&["get"])),
        ("pods/portforward", verbs(&["create", "get"])),
        // Cluster-scoped, decided without a namespace.
        (
            "selfsubjectreviews.authentication.k8s.io",
            verbs(&["create"]),
        ),
        // Every authenticated caller may review itself, whatever the policy.
        (
            "selfsubjectaccessreviews.authorization.k8s.io",
            verbs(&["create"]),
        ),
    ]
    .into_iter()
    .map(|(r, v)| (r.to_string(), v))
    .collect();
    assert_eq!(listed.resources, expected, "stderr: {stderr}");
    // Every authenticated user may read namespaces by the stand-in's RBAC; the team-a permit
    // covers what is in team-a, not the cluster-scoped namespaces resource.
    assert!(!listed.resources.contains_key("namespaces"));
    assert_eq!(
        listed.urls,
        discovery_urls(),
        "health paths are not allowed"
    );
    assert!(
        !stderr.contains("incomplete"),
        "no policy reads the context: {stderr}"
    );

    // Answered by the gateway, which read discovery as itself: no impersonation, so the list
    // does not depend on the caller's own RBAC.
    let seen = h.demo.apiserver.requests();
    assert!(
        seen.iter()
            .all(|r| !r.path.contains("selfsubjectrulesreviews")),
        "{seen:?}"
    );
    let own = gateways_own(&h);
    let paths: BTreeSet<&str> = own.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        BTreeSet::from([
            "/api",
            "/api/v1",
            "/apis",
            "/apis/authentication.k8s.io/v1",
            "/apis/authorization.k8s.io/v1",
        ]),
        "{own:?}"
    );
    for r in &own {
        assert_eq!(
            r.authenticated_user.as_deref(),
            Some(ztgate_testkit::GATEWAY_USER),
            "{r:?}"
        );
        assert_eq!(r.status, 200, "{r:?}");
    }

    // Another namespace: only what the policy allows everywhere.
    h.demo.apiserver.clear_requests();
    let (listed, _) = can_i_list(&h, &alice, "team-b").await;
    assert_eq!(
        listed.resources,
        [
            (
                "selfsubjectreviews.authentication.k8s.io".to_string(),
                verbs(&["create"])
            ),
            (
                "selfsubjectaccessreviews.authorization.k8s.io".to_string(),
                verbs(&["create"])
            )
        ]
        .into_iter()
        .collect()
    );
    assert_eq!(listed.urls, discovery_urls());
    assert!(
        gateways_own(&h).is_empty(),
        "discovery is cached between reviews"
    );

    // Someone else's groups give someone else's list.
    let bob = h.kubeconfig("bob", &["team-b"]);
    let (listed, _) = can_i_list(&h, &bob, "team-a").await;
    assert_eq!(
        listed.resources.len(),
        2,
        "only the self-reviews: {listed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_agrees_with_kubectl_auth_can_i_on_each_row() {
    let (h, _p) = start(&format!("{DISCOVERY}{TEAM_A}{NO_POD_DELETION}{WHOAMI}")).await;
    let alice = h.kubeconfig("alice", &["team-a"]);
    let (listed, _) = can_i_list(&h, &alice, "team-a").await;
    let listed_allows = |resource: &str, verb: &str| {
        listed
            .resources
            .get(resource)
            .is_some_and(|v| v.contains(verb))
    };
    // Rows where the stand-in's RBAC agrees with the policy, or the policy denies: `can-i`
    // passes the policy's allows on to kube-apiserver, whose RBAC has the last word (its RBAC
    // table gives team-a no configmaps, so `can-i` says no to configmaps the list shows).
    // Cluster-scoped rows are asked with `-A`: with `-n`, kubectl asks about a namespace that
    // a request for a cluster-scoped resource never has.
    let rows: &[(&str, &str, &[&str], &str)] = &[
        ("get", "pods", &["-n", "team-a"], "pods"),
        ("list", "pods", &["-n", "team-a"], "pods"),
        ("watch", "pods", &["-n", "team-a"], "pods"),
        ("delete", "pods", &["-n", "team-a"], "pods"),
        ("deletecollection", "pods", &["-n", "team-a"], "pods"),
        (
            "create",
            "pods",
            &["-n", "team-a", "--subresource=exec"],
            "pods/exec",
        ),
        (
            "get",
            "pods",
            &["-n", "team-a", "--subresource=log"],
            "pods/log",
        ),
        ("list", "namespaces", &["-A"], "namespaces"),
        ("get", "namespaces", &["-A"], "namespaces"),
        (
            "create",
            "selfsubjectreviews.authentication.k8s.io",
            &["-A"],
            "selfsubjectreviews.authentication.k8s.io",
        ),
    ];
    for (verb, resource, extra, row) in rows {
        let mut args = vec!["auth", "can-i", verb, resource];
        args.extend_from_slice(extra);
        let out = h.kubectl(&alice, &args).await;
        let answer = text(&out.stdout);
        let yes = answer.trim() == "yes";
        assert_eq!(
            yes,
            listed_allows(row, verb),
            "can-i {verb} {resource} {extra:?} said {answer:?} ({}), the list says {:?}",
            text(&out.stderr),
            listed.resources.get(*row)
        );
        assert_eq!(out.status.code(), Some(if yes { 0 } else { 1 }));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_on_the_requests_context_makes_kubectl_warn_that_the_list_may_be_incomplete() {
    let (h, _p) = start(&format!(
        "{DISCOVERY}{TEAM_A}{NO_POD_DELETION}{PROD_BUSINESS_HOURS}"
    ))
    .await;
    let alice = h.kubeconfig("alice", &["team-a"]);
    let (listed, stderr) = can_i_list(&h, &alice, "team-a").await;
    assert!(
        stderr.contains(
            "Warning: the list may be incomplete: the gateway's policies have conditions on the \
             request's context (device, posture, credential, time or source address): these \
             rules are what this request is allowed, from this device, now"
        ),
        "{stderr}"
    );
    // Still the list for this request.
    assert_eq!(
        listed.resources.get("pods"),
        Some(&verbs(&[
            "create", "get", "list", "patch", "update", "watch"
        ]))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_review_is_answered_with_the_review_and_its_status() {
    let (h, _p) = start(&format!("{DISCOVERY}{TEAM_A}{NO_POD_DELETION}")).await;
    let cert = h.demo.env.pki.user("alice", &["team-a"]);
    let client = h.client(Some(&cert), false);
    let review = serde_json::json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectRulesReview",
        "spec": {"namespace": "team-a"},
    });
    let req = Request::post(h.uri("/apis/authorization.k8s.io/v1/selfsubjectrulesreviews"))
        .header("Content-Type", "application/json")
        .header("Accept", "application/json")
        .body(Full::new(Bytes::from(review.to_string())))
        .unwrap();
    let (code, _, body) = send(&client, req).await;
    assert_eq!(code, 201, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["kind"], "SelfSubjectRulesReview", "{v}");
    assert_eq!(v["apiVersion"], "authorization.k8s.io/v1", "{v}");
    assert_eq!(v["spec"]["namespace"], "team-a", "{v}");
    assert_eq!(v["status"]["incomplete"], false, "{v}");
    let pods = v["status"]["resourceRules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resources"].as_array().unwrap().contains(&"pods".into()))
        .unwrap_or_else(|| panic!("no rule for pods: {v}"));
    assert_eq!(pods["apiGroups"], serde_json::json!([""]), "{v}");
    assert_eq!(
        pods["verbs"],
        serde_json::json!(["create", "get", "list", "patch", "update", "watch"]),
        "{v}"
    );

    // Not a review at all.
    let req = Request::post(h.uri("/apis/authorization.k8s.io/v1/selfsubjectrulesreviews"))
        .header("Content-Type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"kind\":\"Secret\"}")))
        .unwrap();
    let (code, _, body) = send(&client, req).await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("expected a SelfSubjectRulesReview"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_discovery_the_list_has_only_non_resource_rules_and_says_why() {
    let dir = tempfile::tempdir().expect("policy dir");
    std::fs::write(
        dir.path().join("policy.cedar"),
        format!("{DISCOVERY}{TEAM_A}"),
    )
    .expect("write policy");
    let h = Harness::start_with(DevSettings {
        policies: vec![dir.path().to_path_buf()],
        request_timeout: "1s",
        ..Default::default()
    })
    .await;
    // kube-apiserver's group list does not come within the request timeout.
    h.demo
        .apiserver
        .set_path_delay("/apis", std::time::Duration::from_secs(3));
    let alice = h.kubeconfig("alice", &["team-a"]);
    let (listed, stderr) = can_i_list(&h, &alice, "team-a").await;
    assert!(
        stderr.contains(
            "Warning: the list may be incomplete: the gateway could not read the cluster's API \
             discovery ("
        ) && stderr.contains("no resource rules are listed"),
        "{stderr}"
    );
    assert!(listed.resources.is_empty(), "{listed:?}");
    assert_eq!(listed.urls, discovery_urls());
}
