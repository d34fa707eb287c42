//! Known Kubernetes escalation paths, asked of the shipped policy sets: the demo's policies and
//! `config/policies` (which `deploy/base/policies` copies; tests/it/docs.rs keeps them equal). Each
//! path must be denied to every example persona, by policy and not by an evaluation error, and
//! each persona must keep a few things it is there to do, so that denying everything cannot pass.
//!
//! The answers are the ones an operator gets from `ztgate policy check`: the real binary is asked
//! every row for the personas whose permits reach furthest, and every legitimate row; the whole
//! persona-by-row table is asked of the same policy engine in-process, with the request built as
//! `policy check` builds it (one binary run loads and validates the set, ~0.15 s of CPU in a
//! debug build, too much to repeat for every cell). Impersonation targets are not resources
//! `policy check` can name, so those rows ask the decision the gateway makes for `kubectl --as`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use std::time::Duration;

use ztgate::authn::CredentialFacts;
use ztgate::authz::cedar::{
    DeviceFacts, ImpersonationKind, ImpersonationTarget, PolicyEngine, PostureFacts, RequestFacts,
    Subject,
};
use ztgate::authz::requestinfo::RequestInfo;

/// The most a caller can bring: an MFA login from a managed, encrypted device with a fresh
/// posture report, so that no denial below is only for want of a device.
const DEVICE: &str = r#"{"id":"laptop-1","bound":true,"postureAgeSeconds":60,"posture":{"os":"linux","osVersion":"6.1","diskEncrypted":true,"firewall":true,"screenLock":true,"managed":true,"source":"mdm"}}"#;

/// Where a row's namespace comes from.
#[derive(Clone, Copy)]
enum Ns {
    /// Cluster-scoped.
    None,
    /// The namespace the persona works in.
    Home,
    /// A namespace the persona has no business in.
    Elsewhere,
    Fixed(&'static str),
}

/// One request, as `policy check` flags.
#[derive(Clone, Copy)]
struct Req {
    what: &'static str,
    verb: &'static str,
    resource: &'static str,
    group: &'static str,
    ns: Ns,
    name: &'static str,
}

const fn req(
    what: &'static str,
    verb: &'static str,
    resource: &'static str,
    group: &'static str,
    ns: Ns,
    name: &'static str,
) -> Req {
    Req {
        what,
        verb,
        resource,
        group,
        ns,
        name,
    }
}

const RBAC: &str = "rbac.authorization.k8s.io";
const CERTS: &str = "certificates.k8s.io";
const ADMISSION: &str = "admissionregistration.k8s.io";

/// Denied to every persona of both sets (unless a persona lists the row as its job).
#[rustfmt::skip]
const ESCALATIONS: &[Req] = &[
    req("delete the namespace (and all in it)", "delete", "namespaces", "", Ns::Home, "@home"),
    req("finalize the namespace away", "update", "namespaces/finalize", "", Ns::Home, "@home"),
    req("relabel the namespace's pod security level", "patch", "namespaces", "", Ns::Home, "@home"),
    req("mint a service account token", "create", "serviceaccounts/token", "", Ns::Home, "default"),
    req("read a secret", "get", "secrets", "", Ns::Home, "db"),
    req("list secrets", "list", "secrets", "", Ns::Home, ""),
    req("watch secrets", "watch", "secrets", "", Ns::Home, ""),
    req("proxy to a pod", "get", "pods/proxy", "", Ns::Home, "web-0"),
    req("proxy to a service", "get", "services/proxy", "", Ns::Home, "web"),
    req("the legacy proxy verb", "proxy", "services", "", Ns::Home, "web"),
    req("read through the kubelet", "get", "nodes/proxy", "", Ns::None, "node-1"),
    req("run commands through the kubelet", "create", "nodes/proxy", "", Ns::None, "node-1"),
    req("escalate a role", "escalate", "roles", RBAC, Ns::Home, "admin"),
    req("escalate a cluster role", "escalate", "clusterroles", RBAC, Ns::None, "cluster-admin"),
    req("bind a role", "bind", "roles", RBAC, Ns::Home, "admin"),
    req("bind a cluster role", "bind", "clusterroles", RBAC, Ns::None, "cluster-admin"),
    req("create a role", "create", "roles", RBAC, Ns::Home, ""),
    req("create an aggregated cluster role", "create", "clusterroles", RBAC, Ns::None, ""),
    req("create a role binding", "create", "rolebindings", RBAC, Ns::Home, ""),
    req("patch a role binding", "patch", "rolebindings", RBAC, Ns::Home, "edit"),
    req("create a cluster role binding", "create", "clusterrolebindings", RBAC, Ns::None, ""),
    req("patch a cluster role binding", "patch", "clusterrolebindings", RBAC, Ns::None, "admins"),
    req("exec elsewhere", "create", "pods/exec", "", Ns::Elsewhere, "web-0"),
    req("attach elsewhere", "create", "pods/attach", "", Ns::Elsewhere, "web-0"),
    req("exec elsewhere (WebSocket SubjectAccessReview)", "get", "pods/exec", "", Ns::Elsewhere, "web-0"),
    req("create a pod in kube-system", "create", "pods", "", Ns::Fixed("kube-system"), ""),
    req("exec in kube-system", "create", "pods/exec", "", Ns::Fixed("kube-system"), "etcd-0"),
    req("change kube-system's config", "update", "configmaps", "", Ns::Fixed("kube-system"), "coredns"),
    req("run a DaemonSet in kube-system", "create", "daemonsets", "apps", Ns::Fixed("kube-system"), ""),
    req("request a certificate", "create", "certificatesigningrequests", CERTS, Ns::None, ""),
    req("approve a certificate", "update", "certificatesigningrequests/approval", CERTS, Ns::None, "csr-1"),
    req("approve for a signer", "approve", "signers", CERTS, Ns::None, "kubernetes.io/kube-apiserver-client"),
    req("sign for a signer", "sign", "signers", CERTS, Ns::None, "kubernetes.io/kube-apiserver-client"),
    req("change a validating webhook", "update", "validatingwebhookconfigurations", ADMISSION, Ns::None, "policy"),
    req("add a mutating webhook", "create", "mutatingwebhookconfigurations", ADMISSION, Ns::None, ""),
    req("patch a mutating webhook", "patch", "mutatingwebhookconfigurations", ADMISSION, Ns::None, "inject"),
    req("register an API service", "create", "apiservices", "apiregistration.k8s.io", Ns::None, ""),
    req("ask whose a token is", "create", "tokenreviews", "authentication.k8s.io", Ns::None, ""),
];

/// Only the demo forbids deleting pods; an eviction is a deletion.
#[rustfmt::skip]
const DEMO_ESCALATIONS: &[Req] = &[
    req("evict a pod (deletes it)", "create", "pods/eviction", "", Ns::Home, "web-0"),
    req("delete all pods", "deletecollection", "pods", "", Ns::Home, ""),
];

/// Impersonation targets nobody may take on through the gateway.
#[rustfmt::skip]
const IMPERSONATIONS: &[(&str, Kind)] = &[
    ("system:admin", Kind::User),
    ("system:kube-controller-manager", Kind::User),
    ("system:node:node-1", Kind::User),
    ("system:serviceaccount:kube-system:default", Kind::User),
    ("system:serviceaccount:kube-system:clusterrole-aggregation-controller", Kind::User),
    ("system:masters", Kind::Group),
    ("system:serviceaccounts", Kind::Group),
    ("system:nodes", Kind::Group),
    ("break-glass", Kind::Group),
    ("platform-admins", Kind::Group),
];

#[derive(Clone, Copy, Debug)]
enum Kind {
    User,
    Group,
}

struct Persona {
    user: &'static str,
    groups: &'static [&'static str],
    auth_method: &'static str,
    home: &'static str,
    elsewhere: &'static str,
    /// Escalation rows (by `what`) that are this persona's job.
    exempt: &'static [&'static str],
    /// What it is there to do: each must stay allowed.
    allowed: &'static [Req],
    /// Impersonation it may do.
    may_impersonate: &'static [(&'static str, Kind)],
    /// Asked every escalation row through the binary as well.
    through_binary: bool,
}

const fn persona(user: &'static str, groups: &'static [&'static str]) -> Persona {
    Persona {
        user,
        groups,
        auth_method: "oidc",
        home: "team-a",
        elsewhere: "team-b",
        exempt: &[],
        allowed: &[],
        may_impersonate: &[],
        through_binary: false,
    }
}

/// Non-resource requests in `allowed` rows: `resource` is the path.
const NON_RESOURCE: &str = "@path";

const fn path(what: &'static str, verb: &'static str, p: &'static str) -> Req {
    req(what, verb, p, NON_RESOURCE, Ns::None, "")
}

#[rustfmt::skip]
const DEMO_PERSONAS: &[Persona] = &[
    Persona {
        allowed: &[
            path("discovery", "get", "/apis/apps/v1"),
            req("list pods", "list", "pods", "", Ns::Home, ""),
            req("exec", "create", "pods/exec", "", Ns::Home, "web-0"),
            req("port-forward", "create", "pods/portforward", "", Ns::Home, "web-0"),
            req("follow logs", "get", "pods/log", "", Ns::Home, "web-0"),
            req("deploy", "create", "deployments", "apps", Ns::Home, ""),
            req("write a secret", "create", "secrets", "", Ns::Home, ""),
            req("create a service account", "create", "serviceaccounts", "", Ns::Home, ""),
        ],
        through_binary: true,
        ..persona("alice@example.com", &["team-a"])
    },
    Persona {
        auth_method: "x509",
        allowed: &[
            path("list locks", "get", "/v1/locks"),
            path("lock someone", "post", "/v1/locks"),
            path("unlock", "delete", "/v1/locks/1"),
        ],
        ..persona("sec-admin", &["security"])
    },
];

#[rustfmt::skip]
const EXAMPLE_PERSONAS: &[Persona] = &[
    Persona {
        allowed: &[
            path("discovery", "get", "/version"),
            req("list pods", "list", "pods", "", Ns::Home, ""),
            req("deploy", "create", "deployments", "apps", Ns::Home, ""),
            req("delete a pod", "delete", "pods", "", Ns::Home, "web-0"),
            req("exec", "create", "pods/exec", "", Ns::Home, "web-0"),
            req("write a secret", "create", "secrets", "", Ns::Home, ""),
            req("create a service account", "create", "serviceaccounts", "", Ns::Home, ""),
        ],
        through_binary: true,
        ..persona("alice", &["team-a"])
    },
    Persona {
        home: "team-b",
        elsewhere: "team-a",
        allowed: &[
            req("list pods", "list", "pods", "", Ns::Home, ""),
            req("roll out", "patch", "deployments", "apps", Ns::Home, "api"),
        ],
        ..persona("bob", &["team-b"])
    },
    Persona {
        allowed: &[
            req("list pods anywhere", "list", "pods", "", Ns::Elsewhere, ""),
            req("read kube-system", "get", "deployments", "apps", Ns::Fixed("kube-system"), "coredns"),
            req("list nodes", "list", "nodes", "", Ns::None, ""),
        ],
        ..persona("vera", &["viewers"])
    },
    Persona {
        home: "prod",
        elsewhere: "team-a",
        // Writes in prod depend on the hour; reads do not.
        allowed: &[req("list pods", "list", "pods", "", Ns::Home, "")],
        ..persona("olga", &["prod-operators"])
    },
    Persona {
        elsewhere: "kube-system",
        allowed: &[
            req("deploy anywhere", "create", "deployments", "apps", Ns::Fixed("team-b"), ""),
            req("delete a pod", "delete", "pods", "", Ns::Home, "web-0"),
            req("exec in a team's namespace", "create", "pods/exec", "", Ns::Fixed("team-b"), "web-0"),
            req("create a namespace", "create", "namespaces", "", Ns::None, ""),
            req("list nodes", "list", "nodes", "", Ns::None, ""),
            req("read kube-system", "get", "configmaps", "", Ns::Fixed("kube-system"), "coredns"),
            req("review access", "create", "subjectaccessreviews", "authorization.k8s.io", Ns::None, ""),
        ],
        may_impersonate: &[("bob", Kind::User)],
        through_binary: true,
        ..persona("root", &["platform-admins"])
    },
    Persona {
        elsewhere: "kube-system",
        exempt: &["read a secret", "list secrets", "watch secrets"],
        allowed: &[
            req("read a secret", "get", "secrets", "", Ns::Home, "db"),
            req("list kube-system's secrets", "list", "secrets", "", Ns::Fixed("kube-system"), ""),
        ],
        ..persona("gwen", &["break-glass"])
    },
    Persona {
        allowed: &[path("discovery", "get", "/apis")],
        may_impersonate: &[("system:serviceaccount:team-a:builder", Kind::User)],
        ..persona("sue", &["support"])
    },
    Persona {
        auth_method: "x509",
        home: "ci",
        elsewhere: "team-a",
        allowed: &[
            req("deploy", "create", "deployments", "apps", Ns::Home, ""),
            req("roll out", "patch", "deployments", "apps", Ns::Home, "api"),
        ],
        ..persona("spiffe://example.org/ns/ci/sa/deployer", &[])
    },
];

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// The demo's policies, written where `policy check` can read them.
fn demo_policies() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("demo.cedar");
    std::fs::write(&file, ztgate::demo::DEMO_POLICIES).unwrap();
    (dir, file)
}

fn namespace_and_name<'a>(p: &'a Persona, r: &'a Req) -> (&'a str, &'a str) {
    let ns = match r.ns {
        Ns::None => "",
        Ns::Home => p.home,
        Ns::Elsewhere => p.elsewhere,
        Ns::Fixed(ns) => ns,
    };
    let name = if r.name == "@home" { p.home } else { r.name };
    (ns, name)
}

fn describe(p: &Persona, r: &Req) -> String {
    let (ns, name) = namespace_and_name(p, r);
    format!(
        "{} ({} {} -n {ns:?} --name {name:?}) for {}",
        r.what, r.verb, r.resource, p.user
    )
}

/// `ztgate policy check` of `r` for `p`: (allowed, what it printed). Panics on an evaluation
/// error or a failure to load, which are not answers.
fn binary_allows(policies: &Path, p: &Persona, r: &Req) -> (bool, String) {
    let (ns, name) = namespace_and_name(p, r);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ztgate"));
    cmd.args(["policy", "check", "--policies"])
        .arg(policies)
        .args([
            "--user",
            p.user,
            "--verb",
            r.verb,
            "--auth-method",
            p.auth_method,
        ])
        .args(["--amr", "pwd", "--amr", "mfa", "--device", DEVICE]);
    for g in p.groups {
        cmd.args(["--group", g]);
    }
    if r.group == NON_RESOURCE {
        cmd.args(["--non-resource-url", r.resource]);
    } else {
        cmd.args([
            "--resource",
            r.resource,
            "--api-group",
            r.group,
            "-n",
            ns,
            "--name",
            name,
        ]);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = format!("{}: {}", describe(p, r), text.trim());
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "policy check failed: {shown}"
    );
    assert!(
        !text.contains("\nerror:") && !text.contains("could not be evaluated"),
        "an evaluation error is not an answer: {shown}"
    );
    (out.status.success(), shown)
}

/// [`DEVICE`], as the engine takes it.
fn device() -> DeviceFacts {
    DeviceFacts {
        id: "laptop-1".into(),
        bound: true,
        posture_age: Some(Duration::from_secs(60)),
        posture: Some(PostureFacts {
            os: "linux".into(),
            os_version: "6.1".into(),
            disk_encrypted: true,
            firewall: true,
            screen_lock: true,
            managed: true,
            edr_score: None,
            source: "mdm".into(),
            self_reported: false,
        }),
    }
}

/// What `policy check` answers, asked of `engine` in-process: the request facts `src/cli.rs`
/// builds from the same flags.
fn engine_allows(engine: &PolicyEngine, p: &Persona, r: &Req) -> (bool, String) {
    let (ns, name) = namespace_and_name(p, r);
    let info = if r.group == NON_RESOURCE {
        RequestInfo {
            is_resource_request: false,
            path: r.resource.into(),
            verb: r.verb.into(),
            ..Default::default()
        }
    } else {
        let (resource, subresource) = r.resource.split_once('/').unwrap_or((r.resource, ""));
        RequestInfo {
            is_resource_request: true,
            verb: r.verb.into(),
            api_prefix: if r.group.is_empty() { "api" } else { "apis" }.into(),
            api_group: r.group.into(),
            api_version: "v1".into(),
            namespace: ns.into(),
            resource: resource.into(),
            subresource: subresource.into(),
            name: name.into(),
            ..Default::default()
        }
    };
    let groups: Vec<String> = p.groups.iter().map(|g| g.to_string()).collect();
    let facts = CredentialFacts {
        amr: vec!["pwd".into(), "mfa".into()],
        ..Default::default()
    };
    let device = device();
    let d = engine.decide_subject(
        &Subject {
            user: p.user,
            uid: None,
            groups: &groups,
            method: p.auth_method,
            facts: &facts,
        },
        &RequestFacts {
            info: &info,
            verb: r.verb,
            source_ip: [127, 0, 0, 1].into(),
            now: SystemTime::now(),
            device: Some(&device),
            websocket: false,
        },
    );
    let shown = format!("{}: {d:?}", describe(p, r));
    assert!(
        d.errors.is_empty(),
        "an evaluation error is not an answer: {shown}"
    );
    (d.allowed, shown)
}

fn load(policies: &Path) -> PolicyEngine {
    PolicyEngine::load(&[policies.to_owned()]).unwrap_or_else(|e| panic!("{e}"))
}

type Case<'a> = (&'a Persona, Req, bool);

fn wrong(want: bool, (allowed, shown): (bool, String)) -> Option<String> {
    let expected = if want { "allowed" } else { "denied" };
    (allowed != want).then(|| format!("expected {expected}: {shown}"))
}

/// The cases the engine answers differently from what they want.
fn engine_wrong_answers(policies: &Path, cases: &[Case<'_>]) -> Vec<String> {
    let engine = load(policies);
    cases
        .iter()
        .filter_map(|(p, r, want)| wrong(*want, engine_allows(&engine, p, r)))
        .collect()
}

/// The cases `ztgate policy check` answers differently from what they want, on both cores.
fn binary_wrong_answers(policies: &Path, cases: &[Case<'_>]) -> Vec<String> {
    std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .chunks(cases.len().div_ceil(2).max(1))
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .filter_map(|(p, r, want)| wrong(*want, binary_allows(policies, p, r)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

fn escalation_cases<'a>(personas: &'a [Persona], rows: &[&[Req]]) -> Vec<Case<'a>> {
    let mut cases = Vec::new();
    for p in personas {
        for r in rows.iter().flat_map(|rows| rows.iter()) {
            if !p.exempt.contains(&r.what) {
                cases.push((p, *r, false));
            }
        }
    }
    cases
}

fn legitimate_cases(personas: &[Persona]) -> Vec<Case<'_>> {
    let mut cases = Vec::new();
    for p in personas {
        assert!(!p.allowed.is_empty(), "{} has nothing to do", p.user);
        for r in p.allowed {
            cases.push((p, *r, true));
        }
    }
    cases
}

/// Every case through the engine; through the binary, every legitimate case and every case of
/// the personas marked `through_binary`.
fn wrong_answers(policies: &Path, cases: &[Case<'_>]) -> Vec<String> {
    let mut wrong = engine_wrong_answers(policies, cases);
    let by_binary: Vec<Case<'_>> = cases
        .iter()
        .filter(|(p, _, want)| *want || p.through_binary)
        .cloned()
        .collect();
    assert!(!by_binary.is_empty());
    wrong.extend(binary_wrong_answers(policies, &by_binary));
    wrong
}

fn assert_none(wrong: Vec<String>) {
    assert!(
        wrong.is_empty(),
        "{} wrong answers:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

#[test]
fn the_demo_policies_deny_every_escalation_path_to_every_persona() {
    let (_dir, policies) = demo_policies();
    let cases = escalation_cases(DEMO_PERSONAS, &[ESCALATIONS, DEMO_ESCALATIONS]);
    assert_none(wrong_answers(&policies, &cases));
}

#[test]
fn the_demo_personas_keep_what_they_are_there_to_do() {
    let (_dir, policies) = demo_policies();
    assert_none(wrong_answers(&policies, &legitimate_cases(DEMO_PERSONAS)));
}

#[test]
fn the_example_policies_deny_every_escalation_path_to_every_persona() {
    let cases = escalation_cases(EXAMPLE_PERSONAS, &[ESCALATIONS]);
    assert_none(wrong_answers(&repo("config/policies"), &cases));
}

#[test]
fn the_example_personas_keep_what_they_are_there_to_do() {
    let cases = legitimate_cases(EXAMPLE_PERSONAS);
    assert_none(wrong_answers(&repo("config/policies"), &cases));
}

/// The decision the gateway makes for `kubectl --as` / `--as-group`.
fn may_impersonate(engine: &PolicyEngine, p: &Persona, target: &str, kind: Kind) -> bool {
    let groups: Vec<String> = p.groups.iter().map(|g| g.to_string()).collect();
    let facts = CredentialFacts {
        amr: vec!["pwd".into(), "mfa".into()],
        ..Default::default()
    };
    let subject = Subject {
        user: p.user,
        uid: None,
        groups: &groups,
        method: p.auth_method,
        facts: &facts,
    };
    let info = RequestInfo {
        is_resource_request: false,
        path: "/version".into(),
        verb: "get".into(),
        ..Default::default()
    };
    let req = RequestFacts {
        info: &info,
        verb: "get",
        source_ip: [127, 0, 0, 1].into(),
        now: SystemTime::now(),
        device: None,
        websocket: false,
    };
    let target = ImpersonationTarget {
        kind: match kind {
            Kind::User => ImpersonationKind::User,
            Kind::Group => ImpersonationKind::Group,
        },
        value: target.into(),
    };
    let d = engine.decide_subject_impersonation(&subject, &req, &target);
    assert!(d.errors.is_empty(), "{} as {target:?}: {d:?}", p.user);
    d.allowed
}

fn impersonation_wrong_answers(policies: &Path, personas: &[Persona]) -> Vec<String> {
    let engine = load(policies);
    let mut wrong = Vec::new();
    for p in personas {
        for (target, kind) in IMPERSONATIONS {
            if may_impersonate(&engine, p, target, *kind) {
                wrong.push(format!(
                    "expected denied: {} impersonates {kind:?} {target}",
                    p.user
                ));
            }
        }
        for (target, kind) in p.may_impersonate {
            if !may_impersonate(&engine, p, target, *kind) {
                wrong.push(format!(
                    "expected allowed: {} impersonates {kind:?} {target}",
                    p.user
                ));
            }
        }
    }
    wrong
}

#[test]
fn nobody_impersonates_system_identities_or_privileged_groups_in_either_set() {
    let (_dir, demo) = demo_policies();
    let mut wrong = impersonation_wrong_answers(&demo, DEMO_PERSONAS);
    wrong.extend(impersonation_wrong_answers(
        &repo("config/policies"),
        EXAMPLE_PERSONAS,
    ));
    assert_none(wrong);
}
