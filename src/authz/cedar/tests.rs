use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::*;
use crate::authn::InstanceId;

const MONDAY_10_UTC: u64 = 1_704_067_200 + 10 * 3600; // 2024-01-01 was a Monday
const SATURDAY_10_UTC: u64 = MONDAY_10_UTC + 5 * 86_400;

fn at(epoch: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(epoch)
}

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/policies")
}

fn examples() -> PolicyEngine {
    PolicyEngine::load(&[examples_dir()]).unwrap_or_else(|e| panic!("{e}"))
}

fn engine(text: &str) -> PolicyEngine {
    PolicyEngine::from_sources(&[("test.cedar".into(), text.into())])
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A caller: owns what a [`Subject`] borrows, and the instance id its identity would have (so
/// the tests decide the way the gateway does, through an identity's `Recent`).
struct Caller {
    user: String,
    uid: Option<String>,
    groups: Vec<String>,
    method: &'static str,
    facts: CredentialFacts,
    memo: InstanceId,
}

impl Caller {
    fn new(user: &str, groups: &[&str]) -> Caller {
        Caller {
            user: user.into(),
            uid: None,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            method: "oidc",
            facts: CredentialFacts {
                issuer: Some("https://idp.example".into()),
                issued_at: Some(at(MONDAY_10_UTC - 300)),
                ..Default::default()
            },
            memo: InstanceId::next(),
        }
    }
    fn mfa(mut self) -> Caller {
        self.facts.amr = vec!["pwd".into(), "mfa".into()];
        self
    }
    fn subject(&self) -> Subject<'_> {
        Subject {
            user: &self.user,
            uid: self.uid.as_deref(),
            groups: &self.groups,
            method: self.method,
            facts: &self.facts,
        }
    }
}

fn resource(verb: &str, group: &str, resource: &str, ns: &str, name: &str) -> RequestInfo {
    let (prefix, version) = if group.is_empty() {
        ("api", "v1")
    } else {
        ("apis", "v1")
    };
    let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
    let mut path = format!("/{prefix}/");
    if !group.is_empty() {
        path.push_str(group);
        path.push('/');
    }
    path.push_str(version);
    if !ns.is_empty() {
        path.push_str(&format!("/namespaces/{ns}"));
    }
    path.push_str(&format!("/{resource}"));
    if !name.is_empty() {
        path.push_str(&format!("/{name}"));
    }
    if !subresource.is_empty() {
        path.push_str(&format!("/{subresource}"));
    }
    RequestInfo {
        is_resource_request: true,
        path,
        verb: verb.into(),
        api_prefix: prefix.into(),
        api_group: group.into(),
        api_version: version.into(),
        namespace: ns.into(),
        resource: resource.into(),
        subresource: subresource.into(),
        name: name.into(),
        parts: Vec::new(),
    }
}

fn non_resource(verb: &str, path: &str) -> RequestInfo {
    RequestInfo {
        is_resource_request: false,
        path: path.into(),
        verb: verb.into(),
        ..Default::default()
    }
}

fn managed_device() -> DeviceFacts {
    DeviceFacts {
        id: "dev-1".into(),
        bound: true,
        posture: Some(PostureFacts {
            os: "macos".into(),
            os_version: "14.5".into(),
            disk_encrypted: true,
            firewall: true,
            screen_lock: true,
            managed: true,
            edr_score: Some(90),
            source: "mdm".into(),
            self_reported: false,
        }),
        posture_age: Some(Duration::from_secs(120)),
    }
}

struct Req<'a> {
    info: &'a RequestInfo,
    verb: &'a str,
    now: SystemTime,
    device: Option<&'a DeviceFacts>,
    ip: IpAddr,
}

impl<'a> Req<'a> {
    fn new(info: &'a RequestInfo) -> Req<'a> {
        Req {
            info,
            verb: &info.verb,
            now: at(MONDAY_10_UTC),
            device: None,
            ip: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
        }
    }
    fn facts(&self) -> RequestFacts<'a> {
        RequestFacts {
            info: self.info,
            verb: self.verb,
            source_ip: self.ip,
            now: self.now,
            device: self.device,
            websocket: false,
        }
    }
}

fn decide(e: &PolicyEngine, caller: &Caller, req: &Req<'_>) -> Decision {
    e.decide_with(&caller.subject(), &req.facts(), Some(caller.memo))
}

// ------------------------------------------------------------------ schema and loading

#[test]
fn embedded_schema_parses_and_is_the_config_file() {
    let on_disk = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/ztgate.cedarschema"),
    )
    .unwrap();
    assert_eq!(on_disk, SCHEMA_TEXT);
    let schema = CompiledSchema::embedded().unwrap();
    for verb in [
        "get",
        "list",
        "watch",
        "create",
        "update",
        "patch",
        "delete",
        "deletecollection",
        "proxy",
        "impersonate",
        "bind",
        "escalate",
        "approve",
        "sign",
        "use",
        "post",
        "put",
        "head",
        "options",
        "read",
        "write",
    ] {
        assert!(schema.action(verb).is_some(), "missing action {verb}");
    }
}

#[test]
fn example_policies_validate() {
    let e = examples();
    assert_eq!(e.epoch(), 1);
    assert!(e.policy_count() >= 12, "{}", e.policy_count());
    assert_eq!(e.origins().len(), 7);
    // sorted by file name
    let origins = e.origins();
    let mut sorted = origins.clone();
    sorted.sort();
    assert_eq!(origins, sorted);
    assert!(e.warnings().is_empty(), "{:?}", e.warnings());
}

#[test]
fn parse_error_names_file_line_and_column() {
    let good = (
        "good.cedar".to_string(),
        "permit(principal, action, resource);\n".to_string(),
    );
    let bad = (
        "bad.cedar".to_string(),
        "// comment\npermit(principal, action, resource)\nwhen { true }\nforbid(principal, action, resource) when { ! };\n"
            .to_string(),
    );
    let err = PolicyEngine::from_sources(&[good, bad]).unwrap_err();
    let first = &err.errors[0];
    assert_eq!(first.origin, "bad.cedar");
    // without the ';', `forbid` reads as a condition keyword and the `(` after it is unexpected
    assert_eq!((first.line, first.column), (Some(4), Some(7)), "{err}");
    assert!(
        err.to_string()
            .starts_with("bad.cedar:4:7: unexpected token"),
        "{err}"
    );
}

#[test]
fn validation_error_is_mapped_to_its_file() {
    let a = (
        "a.cedar".to_string(),
        "permit(principal, action, resource);\n".to_string(),
    );
    let b = (
        "dir/b.cedar".to_string(),
        "@id(\"needs-has\")\npermit(principal, action == k8s::Action::\"get\", resource)\nwhen {\n  context.device.bound\n};\n"
            .to_string(),
    );
    let err = PolicyEngine::from_sources(&[a, b]).unwrap_err();
    assert_eq!(err.errors.len(), 1, "{err}");
    let e = &err.errors[0];
    assert_eq!(e.origin, "dir/b.cedar");
    assert_eq!(e.line, Some(4), "{err}");
    assert_eq!(e.column, Some(3), "{err}");
    assert!(e.message.contains("device"), "{err}");
}

#[test]
fn unknown_entity_type_and_action_are_rejected() {
    let err = PolicyEngine::from_sources(&[(
        "x.cedar".into(),
        "permit(principal, action == k8s::Action::\"frobnicate\", resource);".into(),
    )])
    .unwrap_err();
    assert_eq!(err.errors[0].line, Some(1), "{err}");
    assert!(err.to_string().contains("frobnicate"), "{err}");
}

#[test]
fn duplicate_ids_and_templates_are_rejected() {
    let err = PolicyEngine::from_sources(&[
        (
            "a.cedar".into(),
            "@id(\"x\") permit(principal, action, resource);".into(),
        ),
        (
            "b.cedar".into(),
            "\n@id(\"x\") forbid(principal, action, resource);".into(),
        ),
    ])
    .unwrap_err();
    assert_eq!(err.errors[0].origin, "b.cedar");
    assert_eq!(err.errors[0].line, Some(2));
    assert!(err.to_string().contains("duplicate policy id"), "{err}");

    let err = PolicyEngine::from_sources(&[(
        "t.cedar".into(),
        "permit(principal == ?principal, action, resource);".into(),
    )])
    .unwrap_err();
    assert!(err.to_string().contains("templates"), "{err}");
}

#[test]
fn generated_ids_name_file_and_index() {
    let e = PolicyEngine::from_sources(&[(
        "/etc/ztgate/policies/team.cedar".into(),
        "forbid(principal, action, resource is k8s::NonResourceURL);\npermit(principal, action, resource);"
            .into(),
    )])
    .unwrap();
    let caller = Caller::new("alice", &[]);
    let info = resource("get", "", "pods", "x", "");
    let d = decide(&e, &caller, &Req::new(&info));
    assert!(d.allowed);
    assert_eq!(d.determining, vec!["team.cedar:1".to_string()]);
    let info = non_resource("get", "/metrics");
    let d = decide(&e, &caller, &Req::new(&info));
    assert_eq!(d.determining, vec!["team.cedar:0".to_string()]);
}

#[test]
fn directory_loading_reads_only_cedar_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("b.cedar"),
        "permit(principal, action, resource);",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("a.cedar"),
        "forbid(principal, action, resource);",
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not cedar").unwrap();
    let e = PolicyEngine::load(&[dir.path().to_path_buf()]).unwrap();
    assert_eq!(e.policy_count(), 2);
    let origins = e.origins();
    assert!(origins[0].ends_with("a.cedar") && origins[1].ends_with("b.cedar"));

    let err = PolicyEngine::load(&[dir.path().join("missing.cedar")]).unwrap_err();
    assert!(err.to_string().contains("missing.cedar"), "{err}");
}

#[test]
fn line_col_counts_characters() {
    assert_eq!(line_col("abc", 0), (1, 1));
    assert_eq!(line_col("ab\ncd", 3), (2, 1));
    assert_eq!(line_col("ab\ncd", 4), (2, 2));
    assert_eq!(line_col("é\néx", 5), (2, 2));
    assert_eq!(line_col("é\néx", 4), (2, 1)); // inside a character: its start
    assert_eq!(line_col("ab", 99), (1, 3));
}

// ------------------------------------------------------------------ decisions

#[test]
fn default_deny() {
    let e = engine("permit(principal in k8s::Group::\"team-a\", action, resource);");
    let info = resource("get", "", "pods", "team-a", "web");
    let d = decide(&e, &Caller::new("bob", &["team-b"]), &Req::new(&info));
    assert!(!d.allowed && !d.explicit_deny);
    assert!(d.determining.is_empty() && d.errors.is_empty());
    assert_eq!(decision_reason(&d), "no policy allows it");
}

#[test]
fn permit_by_group_and_namespace() {
    let e = examples();
    let alice = Caller::new("alice", &["team-a"]);
    let info = resource("list", "", "pods", "team-a", "");
    let d = decide(&e, &alice, &Req::new(&info));
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.determining, vec!["team-a-namespace".to_string()]);

    let info = resource("list", "", "pods", "team-b", "");
    assert!(!decide(&e, &alice, &Req::new(&info)).allowed);

    let info = resource("list", "", "namespaces", "", "");
    assert!(!decide(&e, &alice, &Req::new(&info)).allowed);

    let viewer = Caller::new("vera", &["viewers"]);
    let info = resource("watch", "apps", "deployments", "team-b", "");
    assert!(decide(&e, &viewer, &Req::new(&info)).allowed);
    let info = resource("delete", "apps", "deployments", "team-b", "api");
    assert!(!decide(&e, &viewer, &Req::new(&info)).allowed);

    let info = non_resource("get", "/apis/apps/v1");
    assert!(decide(&e, &viewer, &Req::new(&info)).allowed);
    let info = non_resource("post", "/apis");
    assert!(!decide(&e, &viewer, &Req::new(&info)).allowed);
}

#[test]
fn forbid_wins_with_reason() {
    let e = examples();
    let info = resource("get", "", "secrets", "team-a", "db");
    let alice = Caller::new("alice", &["team-a"]);
    let d = decide(&e, &alice, &Req::new(&info));
    assert!(!d.allowed && d.explicit_deny, "{d:?}");
    assert_eq!(d.determining, vec!["secrets-break-glass-only".to_string()]);
    assert_eq!(
        d.reason.as_deref(),
        Some("reading secrets is reserved to the break-glass group")
    );

    let bg = Caller::new("root", &["break-glass"]);
    assert!(decide(&e, &bg, &Req::new(&info)).allowed);
}

#[test]
fn evaluation_error_denies_even_when_cedar_would_allow() {
    // The forbid overflows (epochSeconds * 10^10 > i64::MAX): Cedar skips an erroring policy and
    // would allow through the permit; the engine denies and reports the error.
    let e = engine(
        "@id(\"all\") permit(principal, action, resource);\n\
         @id(\"overflow\") forbid(principal, action, resource) when { context.requestTime.epochSeconds * 10000000000 > 0 };",
    );
    let info = resource("get", "", "pods", "team-a", "");
    let d = decide(&e, &Caller::new("alice", &[]), &Req::new(&info));
    assert!(!d.allowed, "{d:?}");
    assert!(!d.explicit_deny);
    assert_eq!(d.determining, vec!["overflow".to_string()]);
    assert_eq!(d.errors.len(), 1);
    assert!(d.errors[0].contains("overflow"), "{:?}", d.errors);
    assert_eq!(
        decision_reason(&d),
        "policy \"overflow\" could not be evaluated"
    );

    // An entity literal that does not exist in the request's entities is also a runtime error.
    let e = engine(
        "@id(\"deref\") permit(principal, action, resource) when { k8s::Group::\"nobody\".name == \"x\" };",
    );
    let d = decide(&e, &Caller::new("alice", &[]), &Req::new(&info));
    assert!(!d.allowed && !d.errors.is_empty(), "{d:?}");
}

#[test]
fn unknown_verb_denies_with_error() {
    // as in production: no schema check of the built request
    let e = engine("permit(principal, action, resource);").with_schema_checks(false);
    let info = resource("frobnicate", "", "pods", "team-a", "");
    let d = decide(&e, &Caller::new("alice", &[]), &Req::new(&info));
    assert!(!d.allowed);
    assert!(d.errors[0].contains("frobnicate"));

    // A verb that exists but does not apply to this resource type is rejected by the schema.
    let info = non_resource("list", "/metrics");
    let d = decide(&e, &Caller::new("alice", &[]), &Req::new(&info));
    assert!(!d.allowed && !d.errors.is_empty(), "{d:?}");
    assert!(d.errors[0].contains("does not apply"), "{d:?}");
    // action groups are not verbs
    let info = resource("read", "", "pods", "team-a", "");
    let d = decide(&e, &Caller::new("alice", &[]), &Req::new(&info));
    assert!(!d.allowed && !d.errors.is_empty(), "{d:?}");
    // and the same verbs are fine where they apply
    let info = non_resource("post", "/apis");
    assert!(decide(&e, &Caller::new("alice", &[]), &Req::new(&info)).allowed);
}

#[test]
fn exec_needs_device_and_mfa() {
    let e = examples();
    let info = resource("create", "", "pods/exec", "team-a", "web");
    let device = managed_device();

    let plain = Caller::new("alice", &["team-a"]);
    let d = decide(&e, &plain, &Req::new(&info));
    assert!(!d.allowed && d.explicit_deny);
    assert_eq!(
        d.determining,
        vec!["exec-needs-managed-device-and-mfa".to_string()]
    );

    let mfa = Caller::new("alice", &["team-a"]).mfa();
    // no device at all: `context has device` is false, the forbid applies, no error
    let d = decide(&e, &mfa, &Req::new(&info));
    assert!(
        !d.allowed && d.explicit_deny && d.errors.is_empty(),
        "{d:?}"
    );

    let mut req = Req::new(&info);
    req.device = Some(&device);
    let d = decide(&e, &mfa, &req);
    assert!(d.allowed, "{d:?}");

    // device without posture
    let bare = DeviceFacts {
        posture: None,
        posture_age: None,
        ..managed_device()
    };
    req.device = Some(&bare);
    assert!(!decide(&e, &mfa, &req).allowed);

    // stale posture
    let stale = DeviceFacts {
        posture_age: Some(Duration::from_secs(7200)),
        ..managed_device()
    };
    req.device = Some(&stale);
    assert!(!decide(&e, &mfa, &req).allowed);

    // plain pod reads need no device
    let info = resource("get", "", "pods", "team-a", "web");
    assert!(decide(&e, &plain, &Req::new(&info)).allowed);
}

#[test]
fn production_needs_managed_device_and_business_hours() {
    let e = examples();
    let op = Caller::new("olga", &["prod-operators"]);
    let device = managed_device();
    let list = resource("list", "", "pods", "prod", "");
    let patch = resource("patch", "apps", "deployments", "prod", "api");

    let d = decide(&e, &op, &Req::new(&list));
    assert!(!d.allowed && d.explicit_deny);
    assert_eq!(d.determining, vec!["prod-needs-managed-device".to_string()]);

    let mut req = Req::new(&list);
    req.device = Some(&device);
    assert!(decide(&e, &op, &req).allowed);

    let mut req = Req::new(&patch);
    req.device = Some(&device);
    assert!(decide(&e, &op, &req).allowed, "Monday 10:00 UTC");
    req.now = at(SATURDAY_10_UTC);
    let d = decide(&e, &op, &req);
    assert!(!d.allowed && d.explicit_deny);
    assert_eq!(d.determining, vec!["prod-business-hours".to_string()]);
    req.now = at(MONDAY_10_UTC + 8 * 3600); // 18:00
    assert!(!decide(&e, &op, &req).allowed);
    // reads are fine on Saturday
    let mut req = Req::new(&list);
    req.device = Some(&device);
    req.now = at(SATURDAY_10_UTC);
    assert!(decide(&e, &op, &req).allowed);
}

#[test]
fn several_forbids_are_all_reported_in_load_order() {
    let e = examples();
    let admin = Caller::new("root", &["platform-admins"]);
    let info = resource("create", "", "pods/exec", "prod", "web");
    let mut req = Req::new(&info);
    req.now = at(SATURDAY_10_UTC);
    let d = decide(&e, &admin, &req);
    assert!(!d.allowed && d.explicit_deny);
    assert_eq!(
        d.determining,
        vec![
            "exec-needs-managed-device-and-mfa".to_string(),
            "prod-needs-managed-device".to_string(),
            "prod-business-hours".to_string(),
        ]
    );
    assert_eq!(
        d.reason.as_deref(),
        Some("exec, attach and port-forward need a managed device and an MFA login")
    );
}

#[test]
fn workloads_and_users() {
    let e = examples();
    let info = resource("update", "apps", "deployments", "ci", "app");
    let mut svid = Caller::new("spiffe://example.org/ns/ci/sa/deployer", &[]);
    svid.method = "x509";
    let d = decide(&e, &svid, &Req::new(&info));
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.determining, vec!["ci-deployer".to_string()]);

    // A token can not make a workload, whatever the user name says.
    let token = Caller::new("spiffe://example.org/ns/ci/sa/deployer", &[]);
    assert!(!token.subject().is_workload());
    assert!(!decide(&e, &token, &Req::new(&info)).allowed);

    let other = Caller {
        method: "x509",
        ..Caller::new("spiffe://evil.example/ns/ci/sa/deployer", &[])
    };
    assert!(!decide(&e, &other, &Req::new(&info)).allowed);
}

#[test]
fn claims_are_tags_and_attributes_are_visible() {
    let e = engine(
        r#"
        @id("sre-by-claim")
        permit(principal is k8s::User, action == k8s::Action::"get", resource)
        when {
          principal.hasTag("department") && principal.getTag("department").contains("sre") &&
          principal has uid && principal.uid == "u-1" &&
          principal has issuer && principal.issuer == "https://idp.example" &&
          principal.authMethod == "oidc" &&
          principal.groups.contains(k8s::Group::"g1") &&
          context.authn.amr.contains("mfa") &&
          context.authn has tokenAgeSeconds && context.authn.tokenAgeSeconds == 300 &&
          context.sourceIp.isInRange(ip("10.0.0.0/8")) &&
          !context.websocket && context.requestVerb == "get" &&
          context.requestTime.weekdayUtc == 1 && context.requestTime.hourUtc == 10 &&
          context.requestTime.minuteUtc == 0
        };
        "#,
    );
    let info = resource("get", "", "pods", "a", "");
    let mut caller = Caller::new("sam", &["g1"]).mfa();
    caller.uid = Some("u-1".into());
    let d = decide(&e, &caller, &Req::new(&info));
    assert!(!d.allowed && d.errors.is_empty(), "no claim yet: {d:?}");
    // a token with the claim: another identity, with a memo of its own (an identity never
    // changes; this test object does)
    caller.facts.claims = BTreeMap::from([(
        "department".to_string(),
        vec!["sre".to_string(), "ops".to_string()],
    )]);
    caller.memo = InstanceId::next();
    let d = decide(&e, &caller, &Req::new(&info));
    assert!(d.allowed, "{d:?}");
}

#[test]
fn resource_attributes_and_device_posture_are_visible() {
    let e = engine(
        r#"
        permit(principal, action == k8s::Action::"create", resource is k8s::Resource in k8s::Namespace::"n")
        when {
          resource.apiGroup == "" && resource.apiVersion == "v1" && resource.resource == "pods" &&
          resource.subresource == "exec" && resource.namespace == "n" && resource.name == "web" &&
          context has device && context.device.id == "dev-1" && context.device.bound &&
          context.device has posture && context.device.posture.os == "macos" &&
          context.device.posture.osVersion == "14.5" && context.device.posture.firewall &&
          context.device.posture.screenLock && context.device.posture.source == "mdm" &&
          !context.device.posture.selfReported &&
          context.device.posture has edrScore && context.device.posture.edrScore >= 80 &&
          context.device has postureAgeSeconds && context.device.postureAgeSeconds == 120
        };
        "#,
    );
    let info = resource("create", "", "pods/exec", "n", "web");
    let device = managed_device();
    let mut req = Req::new(&info);
    req.device = Some(&device);
    assert!(decide(&e, &Caller::new("a", &[]), &req).allowed);
}

#[test]
fn impersonation_decisions() {
    let e = examples();
    let info = resource("get", "", "pods", "team-a", "");
    let req = Req::new(&info);
    let support = Caller::new("sue", &["support"]);
    let user = |v: &str| ImpersonationTarget {
        kind: ImpersonationKind::User,
        value: v.into(),
    };
    let d = e.decide_subject_impersonation(
        &support.subject(),
        &req.facts(),
        &user("system:serviceaccount:team-a:builder"),
    );
    assert!(d.allowed, "{d:?}");
    assert_eq!(
        d.determining,
        vec!["support-impersonates-team-a-serviceaccounts".to_string()]
    );
    let d = e.decide_subject_impersonation(
        &support.subject(),
        &req.facts(),
        &user("system:serviceaccount:team-b:builder"),
    );
    assert!(!d.allowed && !d.explicit_deny);
    let group = ImpersonationTarget {
        kind: ImpersonationKind::Group,
        value: "team-a".into(),
    };
    assert!(
        !e.decide_subject_impersonation(&support.subject(), &req.facts(), &group)
            .allowed
    );

    let admin = Caller::new("root", &["platform-admins"]);
    let d = e.decide_subject_impersonation(&admin.subject(), &req.facts(), &user("bob"));
    assert!(d.allowed);
    let d = e.decide_subject_impersonation(&admin.subject(), &req.facts(), &user("system:admin"));
    assert!(!d.allowed && d.explicit_deny);
    let masters = ImpersonationTarget {
        kind: ImpersonationKind::Group,
        value: "system:masters".into(),
    };
    let d = e.decide_subject_impersonation(&admin.subject(), &req.facts(), &masters);
    assert!(!d.allowed && d.explicit_deny);
    assert_eq!(
        d.reason.as_deref(),
        Some("impersonating system: users or groups is not allowed")
    );

    let e = engine(
        r#"
        permit(principal, action == k8s::Action::"impersonate", resource is k8s::ImpersonatedExtra)
        when { resource.key == "scopes" && resource.value == "view" };
        permit(principal, action == k8s::Action::"impersonate", resource is k8s::ImpersonatedUid)
        when { resource.uid == "1234" };
        "#,
    );
    let extra = |key: &str, value: &str| ImpersonationTarget {
        kind: ImpersonationKind::Extra { key: key.into() },
        value: value.into(),
    };
    let s = Caller::new("a", &[]);
    assert!(
        e.decide_subject_impersonation(&s.subject(), &req.facts(), &extra("scopes", "view"))
            .allowed
    );
    assert!(
        !e.decide_subject_impersonation(&s.subject(), &req.facts(), &extra("scopes", "edit"))
            .allowed
    );
    let uid = ImpersonationTarget {
        kind: ImpersonationKind::Uid,
        value: "1234".into(),
    };
    assert!(
        e.decide_subject_impersonation(&s.subject(), &req.facts(), &uid)
            .allowed
    );
    // the request's own resource never counts as an impersonation target
    let e = engine("permit(principal, action, resource is k8s::Resource);");
    assert!(
        !e.decide_subject_impersonation(&s.subject(), &req.facts(), &user("bob"))
            .allowed
    );
}

#[test]
fn source_address_ranges() {
    let e = engine(
        r#"permit(principal, action, resource) when {
             context.sourceIp.isInRange(ip("10.0.0.0/8")) || context.sourceIp.isInRange(ip("2001:db8::/32"))
           };"#,
    );
    let info = resource("get", "", "pods", "a", "");
    let caller = Caller::new("a", &[]);
    for _ in 0..2 {
        for (ip, allowed) in [
            ("10.1.2.3", true),
            ("192.168.1.1", false),
            ("2001:db8::1", true),
            ("2001:db9::1", false),
            ("10.255.0.1", true),
        ] {
            let mut req = Req::new(&info);
            req.ip = ip.parse().unwrap();
            assert_eq!(decide(&e, &caller, &req).allowed, allowed, "{ip}");
        }
    }
}

// ------------------------------------------------------------------ reload

#[test]
fn reload_swaps_atomically_and_keeps_the_last_good_set() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.cedar");
    std::fs::write(
        &file,
        "@id(\"a\") permit(principal in k8s::Group::\"a\", action, resource);",
    )
    .unwrap();
    let e = PolicyEngine::load(&[dir.path().to_path_buf()]).unwrap();
    let info = resource("get", "", "pods", "x", "");
    let a = Caller::new("u", &["a"]);
    let b = Caller::new("u", &["b"]);
    assert_eq!(e.epoch(), 1);
    assert!(decide(&e, &a, &Req::new(&info)).allowed);
    assert!(!decide(&e, &b, &Req::new(&info)).allowed);

    std::fs::write(
        &file,
        "@id(\"b\") permit(principal in k8s::Group::\"b\", action, resource);",
    )
    .unwrap();
    assert_eq!(e.reload(&[dir.path().to_path_buf()]).unwrap(), 2);
    assert_eq!(e.epoch(), 2);
    assert!(!decide(&e, &a, &Req::new(&info)).allowed);
    assert!(decide(&e, &b, &Req::new(&info)).allowed);

    // a second file with an error: nothing changes
    std::fs::write(
        dir.path().join("q.cedar"),
        "permit(principal, action, resource) when { context.device.bound };",
    )
    .unwrap();
    let err = e.reload(&[dir.path().to_path_buf()]).unwrap_err();
    assert!(err.to_string().contains("q.cedar:1:"), "{err}");
    assert_eq!(e.epoch(), 2);
    assert_eq!(e.policy_count(), 1);
    assert!(decide(&e, &b, &Req::new(&info)).allowed);
    assert!(!decide(&e, &a, &Req::new(&info)).allowed);
}

#[test]
fn decisions_during_reloads_see_one_whole_set() {
    // Two sets that each allow exactly one of two groups; a decision made while reloads run in
    // another thread must always come from one set, never a mixture (never both or neither).
    let set_a = vec![(
        "s.cedar".to_string(),
        "permit(principal in k8s::Group::\"a\", action, resource);\nforbid(principal in k8s::Group::\"b\", action, resource);"
            .to_string(),
    )];
    let set_b = vec![(
        "s.cedar".to_string(),
        "permit(principal in k8s::Group::\"b\", action, resource);\nforbid(principal in k8s::Group::\"a\", action, resource);"
            .to_string(),
    )];
    let e = std::sync::Arc::new(PolicyEngine::from_sources(&set_a).unwrap());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reloader = {
        let (e, stop) = (e.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let set = if n % 2 == 0 { &set_b } else { &set_a };
                e.reload_sources(set).unwrap();
                n += 1;
            }
            n
        })
    };
    let info = resource("get", "", "pods", "x", "");
    let both = Caller::new("u", &["a", "b"]);
    let a = Caller::new("u", &["a"]);
    let b = Caller::new("u", &["b"]);
    for _ in 0..200 {
        let da = decide(&e, &a, &Req::new(&info));
        let db = decide(&e, &b, &Req::new(&info));
        assert!(da.errors.is_empty() && db.errors.is_empty());
        let d = decide(&e, &both, &Req::new(&info));
        assert!(!d.allowed && d.explicit_deny);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reloads = reloader.join().unwrap();
    assert_eq!(e.epoch(), 1 + reloads);
}

// ------------------------------------------------------------------ slicing

#[test]
fn slicing_gives_the_same_decisions_as_the_whole_set() {
    let sliced = examples();
    // the production path: no schema checks of the built requests
    let whole = examples().with_slicing(false).with_schema_checks(false);
    let callers = [
        Caller::new("alice", &["team-a"]).mfa(),
        Caller::new("vera", &["viewers"]),
        Caller::new("olga", &["prod-operators"]),
        Caller::new("root", &["platform-admins", "break-glass"]),
        Caller::new("nobody", &[]),
        Caller {
            method: "x509",
            ..Caller::new("spiffe://example.org/ns/ci/sa/deployer", &[])
        },
    ];
    let mut infos = Vec::new();
    for verb in [
        "get", "list", "watch", "create", "update", "patch", "delete",
    ] {
        for ns in ["team-a", "team-b", "prod", "ci", ""] {
            for res in ["pods", "pods/exec", "secrets", "deployments"] {
                let group = if res == "deployments" { "apps" } else { "" };
                infos.push(resource(verb, group, res, ns, "x"));
            }
        }
    }
    for (verb, path) in [("get", "/version"), ("get", "/metrics"), ("post", "/apis")] {
        infos.push(non_resource(verb, path));
    }
    let device = managed_device();
    let mut checked = 0;
    for caller in &callers {
        for info in &infos {
            for device in [None, Some(&device)] {
                for now in [at(MONDAY_10_UTC), at(SATURDAY_10_UTC)] {
                    let mut req = Req::new(info);
                    req.device = device;
                    req.now = now;
                    let a = decide(&sliced, caller, &req);
                    let b = decide(&whole, caller, &req);
                    assert_eq!(a, b, "{} {} {}", caller.user, info.verb, info.path);
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 1000);
}

// ------------------------------------------------------------------ messages

#[test]
fn reason_messages_read_like_kube_apiserver() {
    let forbid = |id: &str, reason: Option<&str>| Decision {
        allowed: false,
        explicit_deny: true,
        determining: vec![id.into()],
        reason: reason.map(str::to_owned),
        errors: vec![],
    };
    let info = resource("list", "", "pods", "prod", "");
    assert_eq!(
        reason_message(&info, "alice", "list", &forbid("prod-needs-managed-device", None)),
        "pods is forbidden: User \"alice\" cannot list resource \"pods\" in API group \"\" in the namespace \"prod\": denied by policy \"prod-needs-managed-device\""
    );
    assert_eq!(
        reason_message(
            &info,
            "alice",
            "list",
            &forbid("prod-needs-managed-device", Some("production is only reachable from a managed device"))
        ),
        "pods is forbidden: User \"alice\" cannot list resource \"pods\" in API group \"\" in the namespace \"prod\": production is only reachable from a managed device"
    );
    let info = resource("create", "", "pods/exec", "team-a", "web");
    assert_eq!(
        reason_message(&info, "alice", "create", &Decision::default()),
        "pods \"web\" is forbidden: User \"alice\" cannot create resource \"pods/exec\" in API group \"\" in the namespace \"team-a\": no policy allows it"
    );
    let info = resource("list", "rbac.authorization.k8s.io", "clusterroles", "", "");
    assert_eq!(
        reason_message(&info, "bob", "list", &Decision::default()),
        "clusterroles.rbac.authorization.k8s.io is forbidden: User \"bob\" cannot list resource \"clusterroles\" in API group \"rbac.authorization.k8s.io\" at the cluster scope: no policy allows it"
    );
    let info = non_resource("get", "/metrics");
    assert_eq!(
        reason_message(&info, "alice", "get", &Decision::default()),
        "forbidden: User \"alice\" cannot get path \"/metrics\": no policy allows it"
    );
    let errored = Decision {
        determining: vec!["p".into()],
        errors: vec!["error while evaluating policy `p`: overflow".into()],
        ..Decision::default()
    };
    assert_eq!(
        reason_message(&info, "alice", "get", &errored),
        "forbidden: User \"alice\" cannot get path \"/metrics\": policy \"p\" could not be evaluated"
    );
}

// ------------------------------------------------------------------ build cache

#[test]
fn build_cache_gives_the_same_decisions_as_building_each_time() {
    // the production path (no schema checks) with and without the cache
    let cached = examples().with_schema_checks(false);
    let fresh = examples().with_schema_checks(false).with_build_cache(false);
    let mut spiffe = Caller::new("spiffe://example.org/ns/ci/sa/deployer", &[]);
    spiffe.method = "x509";
    let callers = [
        Caller::new("alice", &["team-a"]).mfa(),
        Caller::new("alice", &["team-a"]),
        Caller::new("alice", &[]).mfa(),
        Caller::new("vera", &["viewers"]),
        Caller::new("olga", &["prod-operators"]),
        Caller::new("root", &["platform-admins", "break-glass"]),
        Caller::new("root", &["platform-admins"]),
        spiffe,
    ];
    let mut infos = Vec::new();
    for verb in ["get", "create", "delete"] {
        for ns in ["team-a", "prod", ""] {
            for res in ["pods", "pods/exec", "secrets"] {
                infos.push(resource(verb, "", res, ns, "x"));
            }
        }
    }
    infos.push(non_resource("get", "/version"));
    infos.push(non_resource("get", "/metrics"));
    let managed = managed_device();
    let mut stale = managed_device();
    stale.posture_age = Some(Duration::from_millis(120_999));
    let mut unmanaged = managed_device();
    if let Some(p) = unmanaged.posture.as_mut() {
        p.managed = false;
    }
    let devices = [None, Some(&managed), Some(&stale), Some(&unmanaged)];
    let target = ImpersonationTarget {
        kind: ImpersonationKind::User,
        value: "system:serviceaccount:team-a:builder".into(),
    };
    let mut checked = 0;
    // twice over: the second round is answered from the cache
    for _ in 0..2 {
        for caller in &callers {
            for info in &infos {
                for device in devices {
                    for now in [at(MONDAY_10_UTC), at(SATURDAY_10_UTC)] {
                        let mut req = Req::new(info);
                        req.device = device;
                        req.now = now;
                        let a = decide(&cached, caller, &req);
                        let b = decide(&fresh, caller, &req);
                        assert_eq!(a, b, "{} {} {}", caller.user, info.verb, info.path);
                        let (s, r) = (caller.subject(), req.facts());
                        assert_eq!(
                            cached.impersonation_with(&s, &r, &target, Some(caller.memo)),
                            fresh.decide_subject_impersonation(&s, &r, &target),
                        );
                        // and without the identity's memo, from the caches alone
                        assert_eq!(cached.decide_subject(&s, &r), b);
                        checked += 1;
                    }
                }
            }
        }
    }
    assert!(checked > 1000);
    let (subjects, entities, contexts) = cached.built.as_ref().unwrap().sizes();
    // the two callers that differ only in their `amr` (a context input) share a principal
    assert_eq!(subjects, callers.len() as u64 - 1);
    assert!(entities > 0 && contexts > 0);
}

#[test]
fn build_cache_tells_apart_callers_and_requests_that_differ_in_one_fact() {
    let e = engine(
        r#"
        permit(principal in k8s::Group::"g", action == k8s::Action::"get", resource)
        when {
          principal.hasTag("dept") && principal.getTag("dept").contains("sre") &&
          context.authn.mfa &&
          context.authn has tokenAgeSeconds && context.authn.tokenAgeSeconds < 301 &&
          context.requestTime.epochSeconds < 1704103201 &&
          context has device && context.device has postureAgeSeconds &&
          context.device.postureAgeSeconds < 121 &&
          context.device has posture && context.device.posture.managed && !context.websocket
        };
        "#,
    );
    let info = resource("get", "", "pods", "a", "");
    let device = managed_device();
    let mut caller = Caller::new("sam", &["g"]).mfa();
    caller.facts.claims = BTreeMap::from([("dept".to_string(), vec!["sre".to_string()])]);
    // 2024-01-01T10:00:00Z: token 300 s old, posture 120 s old
    let base = || {
        let mut r = Req::new(&info);
        r.device = Some(&device);
        r
    };
    let allowed = |caller: &Caller, req: &Req<'_>| decide(&e, caller, req).allowed;
    for _ in 0..3 {
        assert!(allowed(&caller, &base()));
    }
    // the same user, one fact different: each its own principal and context
    let mut other = Caller::new("sam", &[]).mfa();
    other.facts.claims = caller.facts.claims.clone();
    assert!(!allowed(&other, &base()), "groups");
    let mut other = Caller::new("sam", &["g"]).mfa();
    other.facts.claims = BTreeMap::from([("dept".to_string(), vec!["ops".to_string()])]);
    assert!(!allowed(&other, &base()), "claims");
    let mut other = Caller::new("sam", &["g"]);
    other.facts.claims = caller.facts.claims.clone();
    assert!(!allowed(&other, &base()), "amr");
    let mut other = Caller::new("sam", &["g"]).mfa();
    other.facts.claims = caller.facts.claims.clone();
    other.facts.issued_at = Some(at(MONDAY_10_UTC - 301));
    assert!(!allowed(&other, &base()), "issued at");
    // the same caller, the time, the posture age or the device one second (or one bit) later
    let mut req = base();
    req.now = at(MONDAY_10_UTC) + Duration::from_millis(999);
    assert!(allowed(&caller, &req), "within the second");
    req.now = at(MONDAY_10_UTC + 1);
    assert!(!allowed(&caller, &req), "next second");
    let mut older = managed_device();
    older.posture_age = Some(Duration::from_millis(120_999));
    let mut req = base();
    req.device = Some(&older);
    assert!(allowed(&caller, &req), "posture age within the second");
    older.posture_age = Some(Duration::from_secs(121));
    let mut req = base();
    req.device = Some(&older);
    assert!(!allowed(&caller, &req), "posture age");
    let mut unmanaged = managed_device();
    if let Some(p) = unmanaged.posture.as_mut() {
        p.managed = false;
    }
    let mut req = base();
    req.device = Some(&unmanaged);
    assert!(!allowed(&caller, &req), "posture");
    let mut req = base();
    req.device = None;
    assert!(!allowed(&caller, &req), "no device");
    let facts = RequestFacts {
        websocket: true,
        ..base().facts()
    };
    assert!(
        !e.decide_subject(&caller.subject(), &facts).allowed,
        "websocket"
    );
    // and the first caller is still allowed
    assert!(allowed(&caller, &base()));
}

#[test]
fn build_cache_keeps_resources_apart() {
    let e = engine(
        r#"permit(principal, action == k8s::Action::"get", resource is k8s::Resource in k8s::Namespace::"a")
           when { resource.name == "x" && resource.subresource == "" };"#,
    );
    let caller = Caller::new("a", &[]);
    for _ in 0..2 {
        for (info, allowed) in [
            (resource("get", "", "pods", "a", "x"), true),
            (resource("get", "", "pods", "b", "x"), false),
            (resource("get", "", "pods", "a", "y"), false),
            (resource("get", "", "pods/log", "a", "x"), false),
            (resource("list", "", "pods", "a", "x"), false),
        ] {
            assert_eq!(
                decide(&e, &caller, &Req::new(&info)).allowed,
                allowed,
                "{info:?}"
            );
        }
    }
}

#[test]
fn remembered_decisions_follow_policy_reloads_and_the_context() {
    let e = engine(r#"permit(principal, action == k8s::Action::"get", resource);"#);
    let info = resource("get", "", "pods", "a", "x");
    let caller = Caller::new("a", &[]);
    for _ in 0..3 {
        assert!(decide(&e, &caller, &Req::new(&info)).allowed);
    }
    // the same request after a reload is decided by the new set
    e.reload_sources(&[(
        "p.cedar".into(),
        r#"permit(principal, action == k8s::Action::"get", resource) when { context has device };"#
            .into(),
    )])
    .unwrap();
    for _ in 0..2 {
        assert!(!decide(&e, &caller, &Req::new(&info)).allowed, "reloaded");
    }
    // the same entities in another context (a device now) are decided again, and back
    let device = managed_device();
    for _ in 0..2 {
        let mut with_device = Req::new(&info);
        with_device.device = Some(&device);
        assert!(decide(&e, &caller, &with_device).allowed, "device");
        assert!(!decide(&e, &caller, &Req::new(&info)).allowed, "no device");
    }
}

#[test]
fn an_identitys_memo_is_only_used_by_the_engine_that_made_it() {
    // Two engines at the same epoch (1) over the same schema, deciding differently: the
    // entities an identity remembers from one carry a decision the other must not reuse.
    let allow = engine(r#"permit(principal, action, resource);"#);
    let deny = engine(r#"permit(principal, action, resource) when { false };"#);
    assert_eq!((allow.epoch(), deny.epoch()), (1, 1));
    let caller = Caller::new("alice", &["team-a"]);
    let info = resource("get", "", "pods", "team-a", "web-0");
    let req = Req::new(&info);
    for _ in 0..3 {
        assert!(decide(&allow, &caller, &req).allowed);
        assert!(!decide(&deny, &caller, &req).allowed);
    }
    // and a reload of one engine is seen through the memo
    allow
        .reload_sources(&[(
            "p.cedar".into(),
            "forbid(principal, action, resource);".into(),
        )])
        .expect("reload");
    assert!(!decide(&allow, &caller, &req).allowed);
}

#[test]
fn an_identitys_memo_keeps_nothing_the_caches_let_go() {
    let e = engine(r#"permit(principal, action, resource);"#);
    let caller = Caller::new("alice", &["team-a"]);
    let info = resource("get", "", "pods", "team-a", "web-0");
    let req = Req::new(&info);
    assert!(decide(&e, &caller, &req).allowed);
    let cache = e.built.as_ref().unwrap();
    assert_eq!(cache.recent_reaches(caller.memo), Some([true; 3]));
    // Evicted from the caches: gone, though the identity still has its memo (which holds no
    // more than the caches do, however many identities the token cache keeps).
    cache.clear();
    // moka removes invalidated entries over a few rounds of its housekeeping
    for _ in 0..50 {
        if cache.recent_reaches(caller.memo) == Some([false; 3]) {
            break;
        }
        cache.run_pending_tasks();
    }
    assert_eq!(cache.recent_reaches(caller.memo), Some([false; 3]));
    assert!(decide(&e, &caller, &req).allowed);
    assert_eq!(cache.recent_reaches(caller.memo), Some([true; 3]));
}

#[test]
fn requests_that_differ_in_any_context_input_are_decided_apart() {
    // One policy per context attribute, each reading it; the cached engine decides the base
    // request first (so its context is cached and remembered), then each variant, which
    // differs from the base in that one input: every variant must be decided afresh, as the
    // engine without the cache decides it, and differently from the base.
    let policies = format!(
        r#"
        @id("method") permit(principal, action == k8s::Action::"get", resource)
          when {{ context.authn.method == "x509"}};
        @id("issuer") permit(principal, action == k8s::Action::"get", resource)
          when {{ context.authn has issuer && context.authn.issuer == "https://other.example"}};
        @id("amr") permit(principal, action == k8s::Action::"get", resource)
          when {{ context.authn.mfa}};
        @id("token-age") permit(principal, action == k8s::Action::"get", resource)
          when {{ context.authn has tokenAgeSeconds && context.authn.tokenAgeSeconds > 1000}};
        @id("device-id") permit(principal, action == k8s::Action::"get", resource)
          when {{ context has device && context.device.id == "dev-2"}};
        @id("device-bound") permit(principal, action == k8s::Action::"get", resource)
          when {{ context has device && !context.device.bound}};
        @id("posture") permit(principal, action == k8s::Action::"get", resource)
          when {{ context has device && context.device has posture &&
                 !context.device.posture.managed}};
        @id("posture-age") permit(principal, action == k8s::Action::"get", resource)
          when {{ context has device && context.device has postureAgeSeconds &&
                 context.device.postureAgeSeconds > 1000}};
        @id("source-ip") permit(principal, action == k8s::Action::"get", resource)
          when {{ context.sourceIp.isInRange(ip("192.168.0.0/16"))}};
        @id("websocket") permit(principal, action == k8s::Action::"get", resource)
          when {{ context.websocket}};
        @id("verb") permit(principal, action == k8s::Action::"get", resource)
          when {{ context.requestVerb == "watch"}};
        @id("time") permit(principal, action == k8s::Action::"get", resource)
          when {{ context.requestTime.epochSeconds == {} }};
        "#,
        MONDAY_10_UTC + 1
    );
    let e = engine(&policies);
    let fresh = engine(&policies).with_build_cache(false);

    let base_caller = || {
        let mut c = Caller::new("alice", &["team-a"]);
        c.method = "oidc";
        c
    };
    let base_device = managed_device();
    let info = resource("get", "", "pods", "team-a", "web-0");
    let mut watch = info.clone();
    watch.verb = "watch".into();

    type Variant = Box<dyn Fn(&mut Caller, &mut DeviceFacts, &mut Req<'_>, &mut bool)>;
    let variants: Vec<(&str, Variant)> = vec![
        ("method", Box::new(|c, _, _, _| c.method = "x509")),
        (
            "issuer",
            Box::new(|c, _, _, _| c.facts.issuer = Some("https://other.example".into())),
        ),
        (
            "amr",
            Box::new(|c, _, _, _| c.facts.amr = vec!["mfa".into()]),
        ),
        (
            "token-age",
            Box::new(|c, _, _, _| c.facts.issued_at = Some(at(MONDAY_10_UTC - 5_000))),
        ),
        ("device-id", Box::new(|_, d, _, _| d.id = "dev-2".into())),
        ("device-bound", Box::new(|_, d, _, _| d.bound = false)),
        (
            "posture",
            Box::new(|_, d, _, _| {
                if let Some(p) = d.posture.as_mut() {
                    p.managed = false;
                }
            }),
        ),
        (
            "posture-age",
            Box::new(|_, d, _, _| d.posture_age = Some(Duration::from_secs(5_000))),
        ),
        (
            "source-ip",
            Box::new(|_, _, r, _| r.ip = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 1))),
        ),
        ("websocket", Box::new(|_, _, _, ws| *ws = true)),
        // the request's own verb, under the same authorizer verb
        ("verb", Box::new(|_, _, r, _| r.verb = "get")),
        ("time", Box::new(|_, _, r, _| r.now = at(MONDAY_10_UTC + 1))),
    ];
    for (name, vary) in &variants {
        let caller = base_caller();
        let decide_ws = |e: &PolicyEngine, c: &Caller, r: &Req<'_>, ws: bool| {
            let facts = RequestFacts {
                websocket: ws,
                ..r.facts()
            };
            e.decide_with(&c.subject(), &facts, Some(c.memo))
        };
        let mut req = Req::new(&info);
        req.device = Some(&base_device);
        let base = decide_ws(&e, &caller, &req, false);
        assert!(
            !base.allowed,
            "{name}: the base request matches no policy: {base:?}"
        );
        // the base again: answered from the cache and the identity's Recent
        assert_eq!(decide_ws(&e, &caller, &req, false), base);

        let mut varied_caller = base_caller();
        let mut device = managed_device();
        let mut websocket = false;
        let mut req = Req::new(if *name == "verb" { &watch } else { &info });
        vary(&mut varied_caller, &mut device, &mut req, &mut websocket);
        // The same identity making another request shares its Recent; a caller whose
        // credential differs is another identity.
        if varied_caller.method == caller.method && varied_caller.facts == caller.facts {
            varied_caller.memo = caller.memo;
        }
        req.device = Some(&device);
        let got = decide_ws(&e, &varied_caller, &req, websocket);
        let want = decide_ws(&fresh, &varied_caller, &req, websocket);
        assert_eq!(got, want, "{name}");
        assert!(
            got.allowed,
            "{name}: the variant is decided on its own context: {got:?}"
        );
        assert_eq!(got.determining, vec![name.to_string()], "{name}");
    }
}
