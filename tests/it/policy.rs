//! Cedar policy at the gateway, seen end to end: kubectl users get kube-apiserver's `Forbidden`
//! with the policy's reason (and the cluster never sees the request), `kubectl auth can-i` and
//! `kubectl --as` are answered by policy, policy files reload live (and a broken file changes
//! nothing), kube-apiserver's SubjectAccessReview webhook answers from the same policies, and
//! exec is denied when policy says so.

use crate::support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::{eventually, get, send, status_of, Harness};
use ztgate::demo::DevSettings;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// kubectl needs discovery before it asks for anything real.
const DISCOVERY: &str = r#"
@id("discovery-read")
permit (
  principal,
  action == k8s::Action::"get",
  resource is k8s::NonResourceURL
)
when {
  resource.path == "/api" || resource.path like "/api/*" ||
  resource.path == "/apis" || resource.path like "/apis/*" ||
  resource.path like "/openapi/*" || resource.path == "/version"
};
"#;

const TEAM_A: &str = r#"
@id("team-a-namespace")
permit (
  principal in k8s::Group::"team-a",
  action,
  resource in k8s::Namespace::"team-a"
);
"#;

const POD_DELETE_REASON: &str = "deleting pods goes through the release pipeline, not kubectl";

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

const PODS_A: &str = "/api/v1/namespaces/team-a/pods";

/// Writes `name` in `dir` in one step (write aside, then rename), so that the gateway's reloader
/// never reads half a file.
fn write_policy(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write policy");
    std::fs::rename(&tmp, dir.join(name)).expect("rename policy");
}

/// A gateway whose policy directory holds `files`, reloaded every 200ms, with the
/// SubjectAccessReview webhook on. Returns the harness and the policy directory.
async fn start_with_policies(files: &[(&str, &str)]) -> (Harness, tempfile::TempDir) {
    let policies = tempfile::tempdir().expect("policy dir");
    for (name, text) in files {
        write_policy(policies.path(), name, text);
    }
    let h = Harness::start_with(DevSettings {
        policies: vec![policies.path().to_path_buf()],
        policy_reload_interval: "200ms",
        webhooks: true,
        ..Default::default()
    })
    .await;
    (h, policies)
}

fn policy_dir(d: &tempfile::TempDir) -> PathBuf {
    d.path().to_path_buf()
}

/// Requests the stand-in received whose path contains `fragment`.
fn upstream_saw(h: &Harness, fragment: &str) -> Vec<ztgate_testkit::RecordedRequest> {
    h.demo
        .apiserver
        .requests()
        .into_iter()
        .filter(|r| r.path.contains(fragment))
        .collect()
}

fn message_of(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["message"].as_str().unwrap_or_default().to_owned()
}

async fn metrics_text(h: &Harness) -> String {
    let ops = h.demo.gateway.ops_addr.expect("ops port");
    let plain = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        plain.request(get(&format!("http://{ops}/metrics"))),
    )
    .await
    .expect("metrics in time")
    .expect("metrics answer");
    String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

/// The value of a metric sample line that starts with `series` (name and labels), if present.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

// ------------------------------------------------------------------------------------------
// 1. kubectl: allowed and denied

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_sees_policy_denials_as_forbidden_with_the_reason_and_the_cluster_never_sees_them()
{
    let (h, _p) = start_with_policies(&[(
        "policy.cedar",
        &format!("{DISCOVERY}{TEAM_A}{NO_POD_DELETION}"),
    )])
    .await;
    let kc = h.kubeconfig("alice", &["team-a"]);

    // Allowed by "team-a-namespace" (and by the stand-in's RBAC).
    let out = h.kubectl(&kc, &["get", "pods", "-n", "team-a"]).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("web-0"), "{}", text(&out.stdout));

    // No permit for team-b: the gateway's wording, with its reason. (The stand-in's RBAC would
    // refuse too, but without ": no policy allows it" and only after receiving the request.)
    h.demo.apiserver.clear_requests();
    let out = h.kubectl(&kc, &["get", "pods", "-n", "team-b"]).await;
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(
            r#"Error from server (Forbidden): pods is forbidden: User "alice" cannot list resource "pods" in API group "" in the namespace "team-b": no policy allows it"#
        ),
        "{stderr}"
    );
    assert!(
        upstream_saw(&h, "/namespaces/team-b").is_empty(),
        "the list in team-b reached the stand-in"
    );

    // A forbid wins over the team permit (the stand-in's RBAC would allow this delete).
    h.demo.apiserver.clear_requests();
    let out = h
        .kubectl(
            &kc,
            &["delete", "pod", "web-1", "-n", "team-a", "--wait=false"],
        )
        .await;
    assert!(!out.status.success(), "stdout: {}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            r#"Error from server (Forbidden): pods "web-1" is forbidden: User "alice" cannot delete resource "pods" in API group "" in the namespace "team-a": {POD_DELETE_REASON}"#
        )),
        "{stderr}"
    );
    let deletes: Vec<_> = h
        .demo
        .apiserver
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .collect();
    assert!(
        deletes.is_empty(),
        "a DELETE reached the stand-in: {deletes:?}"
    );
    let out = h.kubectl(&kc, &["get", "pods", "-n", "team-a"]).await;
    assert!(text(&out.stdout).contains("web-1"), "web-1 was deleted");
}

// ------------------------------------------------------------------------------------------
// 2. kubectl auth can-i

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_auth_can_i_answers_what_policy_decides() {
    let (h, _p) = start_with_policies(&[(
        "policy.cedar",
        &format!("{DISCOVERY}{TEAM_A}{NO_POD_DELETION}"),
    )])
    .await;
    let kc = h.kubeconfig("alice", &["team-a"]);

    let can_i = |args: &'static [&'static str]| {
        let h = &h;
        let kc = kc.clone();
        async move {
            let mut all = vec!["auth", "can-i"];
            all.extend_from_slice(args);
            let out = h.kubectl(&kc, &all).await;
            (out.status.code(), text(&out.stdout), text(&out.stderr))
        }
    };

    // Allowed by policy, then by the stand-in's RBAC.
    let (code, stdout, stderr) = can_i(&["list", "pods", "-n", "team-a"]).await;
    assert_eq!(stdout.trim(), "yes", "stderr: {stderr}");
    assert_eq!(code, Some(0));

    // The stand-in's RBAC allows every verb on pods in team-a: only the gateway says no.
    h.demo.apiserver.clear_requests();
    let (code, stdout, stderr) = can_i(&["delete", "pods", "-n", "team-a"]).await;
    assert_eq!(
        stdout.trim(),
        format!("no - {POD_DELETE_REASON}"),
        "stderr: {stderr}"
    );
    assert_eq!(code, Some(1));
    assert!(
        upstream_saw(&h, "selfsubjectaccessreviews").is_empty(),
        "a denied review is answered by the gateway"
    );

    // No permit at all.
    let (code, stdout, stderr) = can_i(&["list", "pods", "-n", "team-b"]).await;
    assert_eq!(
        stdout.trim(),
        "no - no policy allows it",
        "stderr: {stderr}"
    );
    assert_eq!(code, Some(1));
}

// ------------------------------------------------------------------------------------------
// 3. kubectl --as

const IMPERSONATION: &str = include_str!("../../config/policies/60-impersonation.cedar");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_as_is_allowed_only_where_policy_allows_impersonation() {
    let (h, _p) = start_with_policies(&[
        ("00-discovery.cedar", DISCOVERY),
        ("60-impersonation.cedar", IMPERSONATION),
    ])
    .await;
    let sa = "system:serviceaccount:team-a:builder";
    let as_sa = format!("--as={sa}");

    // bob (support) may impersonate team-a's service accounts.
    let bob = h.kubeconfig("bob", &["support"]);
    h.demo.apiserver.clear_requests();
    let out = h
        .kubectl(&bob, &[&as_sa, "auth", "whoami", "-o", "json"])
        .await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)));
    let info = &v["status"]["userInfo"];
    assert_eq!(info["username"], sa, "{v}");
    assert_eq!(
        info["extra"]["ztgate.dev/original-user"],
        serde_json::json!(["bob"]),
        "{v}"
    );
    // bob's own groups do not travel with the impersonated identity.
    let groups = info["groups"].as_array().cloned().unwrap_or_default();
    assert!(!groups.contains(&serde_json::json!("support")), "{v}");
    let ssr = upstream_saw(&h, "/selfsubjectreviews");
    assert_eq!(ssr.len(), 1, "{ssr:?}");
    assert_eq!(ssr[0].header_values("impersonate-user"), [sa]);
    assert!(ssr[0].header_values("impersonate-group").is_empty());
    assert_eq!(
        ssr[0].authenticated_user.as_deref(),
        Some(ztgate_testkit::GATEWAY_USER)
    );

    // alice has no permit to impersonate: refused at the gateway.
    let alice = h.kubeconfig("alice", &["team-a"]);
    h.demo.apiserver.clear_requests();
    let out = h
        .kubectl(&alice, &[&as_sa, "auth", "whoami", "-o", "json"])
        .await;
    assert!(!out.status.success(), "stdout: {}", text(&out.stdout));
    // kubectl words a refused SelfSubjectReview its own way, and hides the Status text of a
    // refused discovery request ("Forbidden: unknown", as with kube-apiserver itself): a raw
    // GET shows the gateway's message.
    assert!(
        text(&out.stderr).contains("do not have permission"),
        "{}",
        text(&out.stderr)
    );
    let out = h.kubectl(&alice, &[&as_sa, "get", "--raw", PODS_A]).await;
    assert!(!out.status.success(), "stdout: {}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("Forbidden"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            r#"users "{sa}" is forbidden: User "alice" cannot impersonate resource "users" in API group "" at the cluster scope: no policy allows it"#
        )),
        "{stderr}"
    );
    let seen = h.demo.apiserver.requests();
    assert!(seen.is_empty(), "reached the stand-in: {seen:?}");

    // The same over raw HTTP: exactly 403, a Forbidden Status.
    let client = h.client(Some(&h.demo.env.pki.user("alice", &["team-a"])), false);
    let req = Request::get(h.uri(PODS_A))
        .header("Impersonate-User", sa)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (code, _, body) = send(&client, req).await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(status_of(&body), (403, "Forbidden".to_owned()));
    assert!(body.contains("cannot impersonate"), "{body}");
    assert!(h.demo.apiserver.requests().is_empty());

    // Nobody impersonates system: users, not even support.
    let out = h
        .kubectl(&bob, &["--as=system:admin", "auth", "whoami", "-o", "json"])
        .await;
    assert!(!out.status.success(), "stdout: {}", text(&out.stdout));
    let out = h
        .kubectl(&bob, &["--as=system:admin", "get", "--raw", PODS_A])
        .await;
    assert!(!out.status.success(), "stdout: {}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(
            r#"users "system:admin" is forbidden: User "bob" cannot impersonate resource "users" in API group "" at the cluster scope: impersonating system: users or groups is not allowed"#
        ),
        "{stderr}"
    );
    let seen = h.demo.apiserver.requests();
    assert!(seen.is_empty(), "reached the stand-in: {seen:?}");
}

// ------------------------------------------------------------------------------------------
// 4. Live reload

const FORBID_LIST_A: &str = r#"
@id("no-listing-in-team-a")
@reason("listing is switched off in team-a")
forbid (
  principal,
  action == k8s::Action::"list",
  resource in k8s::Namespace::"team-a"
);
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_changes_apply_at_the_next_reload_and_a_broken_file_keeps_the_last_good_set() {
    let (h, p) = start_with_policies(&[("teams.cedar", &format!("{DISCOVERY}{TEAM_A}"))]).await;
    let dir = policy_dir(&p);
    let client = h.client(Some(&h.demo.env.pki.user("alice", &["team-a"])), false);
    let web0 = "/api/v1/namespaces/team-a/pods/web-0";

    let (code, _, body) = send(&client, get(&h.uri(PODS_A))).await;
    assert_eq!(code, 200, "{body}");

    // Overwrite the file: the list in team-a is now forbidden.
    write_policy(
        &dir,
        "teams.cedar",
        &format!("{DISCOVERY}{TEAM_A}{FORBID_LIST_A}"),
    );
    // The change is in force after about one reload interval (200 ms); the bound is far above
    // that, so a loaded machine does not fail the test, but a reload that never comes does.
    let written = Instant::now();
    let body = eventually(
        Duration::from_secs(10),
        "the new policy is in force after the file changed",
        || async {
            let (code, _, body) = send(&client, get(&h.uri(PODS_A))).await;
            if code == 403 {
                return Some(body);
            }
            assert_eq!(code, 200, "{body}");
            None
        },
    )
    .await;
    eprintln!("policy change in force after {:?}", written.elapsed());
    assert!(body.contains("listing is switched off in team-a"), "{body}");
    // The rest of the new set is in force too.
    let (code, _, body) = send(&client, get(&h.uri(web0))).await;
    assert_eq!(code, 200, "{body}");

    // A broken file (a permit for the list, then a syntax error) is refused as a whole.
    let before = sample(
        &metrics_text(&h).await,
        r#"ztgate_policy_reloads_total{result="failure"}"#,
    )
    .unwrap_or(0.0);
    write_policy(
        &dir,
        "teams.cedar",
        &format!(
            "{DISCOVERY}{TEAM_A}\n@id(\"let-them-list\")\npermit (principal, action == k8s::Action::\"list\", resource);\npermit (principal, action resource) when {{ ;\n"
        ),
    );
    let failures = eventually(
        Duration::from_secs(10),
        "a failed reload is counted in ztgate_policy_reloads_total",
        || async {
            let m = metrics_text(&h).await;
            sample(&m, r#"ztgate_policy_reloads_total{result="failure"}"#).filter(|n| *n > before)
        },
    )
    .await;
    assert!(failures >= 1.0, "{failures}");
    // Still the previous set: the list stays forbidden (nothing of the broken file applies) and
    // everything else it allowed still works (the gateway did not fall back to deny-all). The
    // sleeps are the case under test: the set must stay as it was across several reload
    // intervals.
    for _ in 0..3 {
        let (code, _, body) = send(&client, get(&h.uri(PODS_A))).await;
        assert_eq!(code, 403, "{body}");
        assert!(body.contains("listing is switched off in team-a"), "{body}");
        let (code, _, body) = send(&client, get(&h.uri(web0))).await;
        assert_eq!(code, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Fixing the file brings the change in.
    write_policy(&dir, "teams.cedar", &format!("{DISCOVERY}{TEAM_A}"));
    let fixed = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the fixed policy is in force",
        || async { (send(&client, get(&h.uri(PODS_A))).await.0 == 200).then_some(()) },
    )
    .await;
    eprintln!("fixed policy in force after {:?}", fixed.elapsed());
}

// ------------------------------------------------------------------------------------------
// 5. The SubjectAccessReview webhook

const SAR: &str = "/apis/authorization.k8s.io/v1/subjectaccessreviews";

fn sar_body(user: &str, groups: &[&str], namespace: &str, verb: &str, resource: &str) -> String {
    serde_json::json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": user,
            "groups": groups,
            "resourceAttributes": {"namespace": namespace, "verb": verb, "resource": resource}
        }
    })
    .to_string()
}

async fn post_sar(
    h: &Harness,
    client: &support::RawClient,
    body: String,
) -> (u16, String, Option<serde_json::Value>) {
    let req = Request::post(h.uri(SAR))
        .header("Content-Type", "application/json")
        .header("Accept", "application/json, */*")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let (code, _, body) = send(client, req).await;
    let v = serde_json::from_str(&body).ok();
    (code, body, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_access_review_webhook_answers_from_policy_for_kube_apiserver_only() {
    let (h, _p) = start_with_policies(&[(
        "policy.cedar",
        &format!("{DISCOVERY}{TEAM_A}{NO_POD_DELETION}"),
    )])
    .await;
    let apiserver_cert = h
        .demo
        .env
        .pki
        .cluster_ca
        .issue_client("kube-apiserver", &[]);
    let kube = support::raw_client(
        &h.demo.env.pki.gateway_ca.cert_pem(),
        Some(&apiserver_cert),
        false,
    );
    h.demo.apiserver.clear_requests();

    // Allowed by "team-a-namespace".
    let (code, body, v) = post_sar(
        &h,
        &kube,
        sar_body("alice", &["team-a"], "team-a", "list", "pods"),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let v = v.expect("JSON");
    assert_eq!(v["apiVersion"], "authorization.k8s.io/v1", "{v}");
    assert_eq!(v["kind"], "SubjectAccessReview", "{v}");
    assert_eq!(v["status"]["allowed"], true, "{v}");
    assert_ne!(v["status"]["denied"], true, "{v}");

    // An explicit forbid: denied, with the policy's reason.
    let (code, body, v) = post_sar(
        &h,
        &kube,
        sar_body("alice", &["team-a"], "team-a", "delete", "pods"),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let v = v.expect("JSON");
    assert_eq!(v["status"]["allowed"], false, "{v}");
    assert_eq!(v["status"]["denied"], true, "{v}");
    assert_eq!(v["status"]["reason"], POD_DELETE_REASON, "{v}");

    // No policy applies: no opinion (kube-apiserver asks its next authorizer).
    let (code, body, v) = post_sar(
        &h,
        &kube,
        sar_body("alice", &["team-a"], "team-b", "list", "pods"),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let v = v.expect("JSON");
    assert_eq!(v["status"]["allowed"], false, "{v}");
    assert!(
        v["status"].get("denied").is_none() || v["status"]["denied"] == false,
        "no opinion must not deny: {v}"
    );

    // The groups come from the review, not from the caller's certificate.
    let (_, _, v) = post_sar(
        &h,
        &kube,
        sar_body("alice", &["team-b"], "team-a", "list", "pods"),
    )
    .await;
    assert_eq!(v.expect("JSON")["status"]["allowed"], false);

    assert!(
        h.demo.apiserver.requests().is_empty(),
        "reviews are answered by the gateway"
    );

    // Anyone else is refused: a user certificate (even one that could list in team-a) and no
    // certificate at all.
    for (what, cert) in [
        (
            "user certificate",
            Some(h.demo.env.pki.user("alice", &["team-a"])),
        ),
        ("no certificate", None),
    ] {
        let client = h.client(cert.as_ref(), false);
        let (code, body, _) = post_sar(
            &h,
            &client,
            sar_body("alice", &["team-a"], "team-a", "list", "pods"),
        )
        .await;
        assert!(code == 401 || code == 403, "{what}: {code} {body}");
        assert!(!body.contains("\"allowed\""), "{what}: {body}");
        assert!(
            h.demo.apiserver.requests().is_empty(),
            "{what}: reached the stand-in"
        );
    }
}

// ------------------------------------------------------------------------------------------
// 6. exec

const NO_EXEC: &str = r#"
@id("no-exec-in-team-a")
@reason("exec is switched off in team-a")
forbid (
  principal,
  action == k8s::Action::"create",
  resource is k8s::Resource in k8s::Namespace::"team-a"
)
when { resource.resource == "pods" && resource.subresource == "exec" };
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_forbidding_pods_exec_refuses_kubectl_exec() {
    let (h, _p) =
        start_with_policies(&[("policy.cedar", &format!("{DISCOVERY}{TEAM_A}{NO_EXEC}"))]).await;
    let kc = h.kubeconfig("alice", &["team-a"]);
    let expected = r#"pods "web-0" is forbidden: User "alice" cannot create resource "pods/exec" in API group "" in the namespace "team-a": exec is switched off in team-a"#;

    // WebSocket first (kubectl's default; it falls back to SPDY on an upgrade failure), then
    // SPDY alone. The stand-in's RBAC allows exec for team-a, so only the gateway refuses.
    for ws in ["true", "false"] {
        h.demo.apiserver.clear_requests();
        let out = h
            .kubectl_env(
                &kc,
                &["exec", "-i", "web-0", "-n", "team-a", "--", "cat"],
                &[("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", ws)],
                Some(b"should not get through\n"),
            )
            .await;
        let stderr = text(&out.stderr);
        assert!(
            !out.status.success(),
            "websockets={ws}: exec ran: {}",
            text(&out.stdout)
        );
        assert!(
            stderr.contains("Forbidden") || stderr.contains("forbidden"),
            "{stderr}"
        );
        assert!(stderr.contains(expected), "websockets={ws}: {stderr}");
        assert!(
            upstream_saw(&h, "/exec").is_empty(),
            "websockets={ws}: the exec reached the stand-in"
        );
    }

    // A WebSocket GET is authorized as `create` (the forbid names only `create`).
    let client = h.client(Some(&h.demo.env.pki.user("alice", &["team-a"])), false);
    let req = Request::get(
        h.uri("/api/v1/namespaces/team-a/pods/web-0/exec?command=cat&stdin=true&stdout=true"),
    )
    .header("Connection", "Upgrade")
    .header("Upgrade", "websocket")
    .header("Sec-WebSocket-Version", "13")
    .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
    .header("Sec-WebSocket-Protocol", "v5.channel.k8s.io")
    .body(Full::new(Bytes::new()))
    .unwrap();
    let (code, _, body) = send(&client, req).await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(status_of(&body), (403, "Forbidden".to_owned()));
    assert_eq!(message_of(&body), expected);
    assert!(upstream_saw(&h, "/exec").is_empty());

    // The policy is about exec only: other pod access in team-a still works.
    let out = h
        .kubectl(&kc, &["get", "pod", "web-0", "-n", "team-a"])
        .await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("web-0"));
}

/// kube-apiserver configured with `authorization.k8s.io/v1beta1` for its webhook posts the groups
/// as `spec.group` (v1beta1's JSON name), not `spec.groups`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_access_review_v1beta1_reads_the_groups_kube_apiserver_sends() {
    let (h, _p) = start_with_policies(&[(
        "policy.cedar",
        &format!("{DISCOVERY}{TEAM_A}{NO_POD_DELETION}"),
    )])
    .await;
    let apiserver_cert = h
        .demo
        .env
        .pki
        .cluster_ca
        .issue_client("kube-apiserver", &[]);
    let kube = support::raw_client(
        &h.demo.env.pki.gateway_ca.cert_pem(),
        Some(&apiserver_cert),
        false,
    );
    let body = serde_json::json!({
        "apiVersion": "authorization.k8s.io/v1beta1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": "alice",
            "group": ["team-a"],
            "resourceAttributes": {"namespace": "team-a", "verb": "list", "resource": "pods"}
        }
    })
    .to_string();
    let req = Request::post(h.uri("/apis/authorization.k8s.io/v1beta1/subjectaccessreviews"))
        .header("Content-Type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let (code, _, body) = send(&kube, req).await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["apiVersion"], "authorization.k8s.io/v1beta1", "{v}");
    assert_eq!(
        v["status"]["allowed"], true,
        "a team-a member may list pods in team-a: {v}"
    );
}
