//! Audit policy in kube-apiserver's `audit.k8s.io/v1` `Policy` shape.
//!
//! Rules are tried in order and the first one that matches decides the level and the stages to
//! omit; matching follows k8s.io/apiserver `pkg/audit/policy/checker.go`:
//!
//! - `users`: the authenticated user's name is listed; `userGroups`: one of its groups is listed
//!   (an unauthenticated request has no name and no groups);
//! - `verbs`: the request's Kubernetes verb is listed (`*` is not a wildcard here, as in kube);
//! - `resources` / `namespaces`: only resource requests match. `namespaces` lists namespaces
//!   (`""` matches cluster-scoped requests). Each `resources` entry matches when its `group` equals
//!   the request's API group (`""` = core) and either `resources` is empty or one of its entries
//!   matches: `*` (everything, subresources included), `pods` (the resource itself, *not* its
//!   subresources), `pods/log` (that subresource), `*/log` (that subresource of any resource),
//!   `pods/*` (the resource and all its subresources); `resourceNames`, when set, must also list
//!   the object's name;
//! - `nonResourceURLs`: only non-resource requests match; an entry is an exact path, `*`, or a
//!   prefix ending in `*` (`/healthz*`).
//!
//! The stages a rule omits are the union of its own `omitStages` and the policy's.
//!
//! Two deliberate differences from kube-apiserver:
//!
//! - when no rule matches, the level is `Metadata` (kube's is `None`): a gateway whose job is to
//!   record who did what should fail towards recording. Write a last rule `- level: None` to get
//!   kube's behaviour;
//! - the levels `Request` and `RequestResponse` are refused: the gateway never records request or
//!   response bodies (they hold secrets, and the gateway streams bodies it never parses). Use
//!   kube-apiserver's own audit log for bodies and join on the audit ID.

use std::path::Path;

use serde::Deserialize;

use super::event::{Level, Stage, UserInfo, API_VERSION};
use super::AuditError;
use crate::authn::Identity;
use crate::authz::requestinfo::RequestInfo;

/// A set of stages (small bit set).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StageSet(u8);

impl StageSet {
    pub const EMPTY: StageSet = StageSet(0);

    fn bit(stage: Stage) -> u8 {
        match stage {
            Stage::RequestReceived => 1,
            Stage::ResponseStarted => 2,
            Stage::ResponseComplete => 4,
            Stage::Panic => 8,
        }
    }

    pub fn contains(self, stage: Stage) -> bool {
        self.0 & Self::bit(stage) != 0
    }

    pub fn insert(&mut self, stage: Stage) {
        self.0 |= Self::bit(stage);
    }

    pub fn union(self, other: StageSet) -> StageSet {
        StageSet(self.0 | other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl FromIterator<Stage> for StageSet {
    fn from_iter<T: IntoIterator<Item = Stage>>(iter: T) -> Self {
        let mut s = StageSet::EMPTY;
        for st in iter {
            s.insert(st);
        }
        s
    }
}

/// What the policy says about one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyDecision {
    pub level: Level,
    pub omit_stages: StageSet,
}

impl PolicyDecision {
    pub const NONE: PolicyDecision = PolicyDecision {
        level: Level::None,
        omit_stages: StageSet::EMPTY,
    };

    /// Whether an event for `stage` is to be written.
    pub fn records(&self, stage: Stage) -> bool {
        self.level != Level::None && !self.omit_stages.contains(stage)
    }
}

/// The caller as the policy sees it: a user name and groups.
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    pub name: &'a str,
    pub groups: &'a [String],
}

impl<'a> From<&'a Identity> for Subject<'a> {
    fn from(id: &'a Identity) -> Self {
        Subject {
            name: id.user(),
            groups: id.groups(),
        }
    }
}

impl<'a> From<&'a UserInfo> for Subject<'a> {
    fn from(u: &'a UserInfo) -> Self {
        Subject {
            name: &u.username,
            groups: &u.groups,
        }
    }
}

/// `GroupResources` of a policy rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GroupResources {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub resources: Vec<String>,
    #[serde(default)]
    pub resource_names: Vec<String>,
}

/// One rule (`PolicyRule`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyRule {
    pub level: Level,
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub user_groups: Vec<String>,
    #[serde(default)]
    pub verbs: Vec<String>,
    #[serde(default)]
    pub resources: Vec<GroupResources>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default, rename = "nonResourceURLs")]
    pub non_resource_urls: Vec<String>,
    #[serde(default)]
    pub omit_stages: Vec<Stage>,
    /// Accepted for compatibility with kube policies; meaningless without bodies.
    #[serde(default)]
    pub omit_managed_fields: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PolicyFile {
    api_version: String,
    kind: String,
    /// `ObjectMeta`; ignored.
    #[serde(default)]
    #[allow(dead_code)]
    metadata: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    rules: Vec<PolicyRule>,
    #[serde(default)]
    omit_stages: Vec<Stage>,
    #[serde(default)]
    #[allow(dead_code)]
    omit_managed_fields: Option<bool>,
}

/// A loaded, checked audit policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditPolicy {
    rules: Vec<PolicyRule>,
    /// Per rule: the union of its `omitStages` and the policy's.
    rule_omit: Vec<StageSet>,
    omit_stages: StageSet,
}

impl AuditPolicy {
    /// The policy used when no policy file is configured: every request at `Metadata`.
    pub fn metadata_for_everything() -> AuditPolicy {
        AuditPolicy::default()
    }

    /// Reads and checks a policy file (YAML or JSON).
    pub fn load(path: &Path) -> Result<AuditPolicy, AuditError> {
        let refused = |source| AuditError::Policy {
            path: path.display().to_string(),
            source,
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| refused(super::PolicyFileError::Read(e)))?;
        AuditPolicy::from_yaml(&text).map_err(|e| refused(super::PolicyFileError::Invalid(e)))
    }

    /// Parses and checks a policy. The error names the offending field.
    pub fn from_yaml(text: &str) -> Result<AuditPolicy, PolicyError> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let file: PolicyFile = serde_path_to_error::deserialize(de).map_err(PolicyError::Parse)?;
        if file.api_version != API_VERSION {
            return Err(PolicyError::ApiVersion(file.api_version));
        }
        if file.kind != "Policy" {
            return Err(PolicyError::Kind(file.kind));
        }
        for (index, rule) in file.rules.iter().enumerate() {
            check_rule(rule).map_err(|problem| PolicyError::Rule { index, problem })?;
        }
        let omit_stages: StageSet = file.omit_stages.iter().copied().collect();
        let rule_omit = file
            .rules
            .iter()
            .map(|r| {
                r.omit_stages
                    .iter()
                    .copied()
                    .collect::<StageSet>()
                    .union(omit_stages)
            })
            .collect();
        Ok(AuditPolicy {
            rules: file.rules,
            rule_omit,
            omit_stages,
        })
    }

    pub fn rules(&self) -> &[PolicyRule] {
        &self.rules
    }

    /// The level and omitted stages for a request: the first matching rule's, else `Metadata`
    /// with the policy's `omitStages`. `user` is `None` when authentication failed; `info` is
    /// `None` when the request was refused before its attributes were computed (then only rules
    /// without verbs, resources, namespaces and nonResourceURLs can match).
    pub fn evaluate(
        &self,
        user: Option<Subject<'_>>,
        info: Option<&RequestInfo>,
    ) -> PolicyDecision {
        for (rule, omit) in self.rules.iter().zip(&self.rule_omit) {
            if rule_matches(rule, user, info) {
                return PolicyDecision {
                    level: rule.level,
                    omit_stages: *omit,
                };
            }
        }
        PolicyDecision {
            level: Level::Metadata,
            omit_stages: self.omit_stages,
        }
    }
}

/// Why an audit policy is refused; the text starts with the offending field's path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// Not YAML, or not a policy's fields.
    #[error("{}", parse_message(.0))]
    Parse(#[source] serde_path_to_error::Error<serde_yaml_ng::Error>),
    #[error("apiVersion: must be {API_VERSION:?}, got {0:?}")]
    ApiVersion(String),
    #[error("kind: must be \"Policy\", got {0:?}")]
    Kind(String),
    /// A rule the gateway cannot apply.
    #[error("rules[{index}].{problem}")]
    Rule {
        index: usize,
        #[source]
        problem: RuleProblem,
    },
}

/// The parse error, after the path of the field it is about (when it is about one).
fn parse_message(e: &serde_path_to_error::Error<serde_yaml_ng::Error>) -> String {
    let path = e.path().to_string();
    if path == "." || path.is_empty() {
        e.inner().to_string()
    } else {
        format!("{path}: {}", e.inner())
    }
}

/// What is wrong with one rule of an audit policy.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuleProblem {
    /// `Request` or `RequestResponse`.
    #[error(
        "level: {:?} is not supported: ztgate never records request or response bodies \
         (use None or Metadata; record bodies in kube-apiserver's own audit log and join \
         on the audit ID)",
        .0.as_str()
    )]
    BodyLevel(Level),
    #[error(
        "nonResourceURLs: cannot be combined with resources or namespaces (a request is \
         either a resource request or not)"
    )]
    NonResourceWithResources,
    #[error(
        "nonResourceURLs[{index}]: {url:?} must start with \"/\" and may only end in \"*\" \
         (or be \"*\")"
    )]
    NonResourceUrl { index: usize, url: String },
    #[error(
        "resources[{group}].resources[{index}]: {resource:?} must be \"*\", \"<resource>\", \
         \"<resource>/<subresource>\", \"*/<subresource>\" or \"<resource>/*\""
    )]
    Resource {
        group: usize,
        index: usize,
        resource: String,
    },
}

fn check_rule(rule: &PolicyRule) -> Result<(), RuleProblem> {
    match rule.level {
        Level::None | Level::Metadata => {}
        Level::Request | Level::RequestResponse => return Err(RuleProblem::BodyLevel(rule.level)),
    }
    if !rule.non_resource_urls.is_empty()
        && (!rule.resources.is_empty() || !rule.namespaces.is_empty())
    {
        return Err(RuleProblem::NonResourceWithResources);
    }
    for (j, url) in rule.non_resource_urls.iter().enumerate() {
        let star = url.find('*');
        let ok = url == "*" || (url.starts_with('/') && star.is_none_or(|at| at == url.len() - 1));
        if !ok {
            return Err(RuleProblem::NonResourceUrl {
                index: j,
                url: url.clone(),
            });
        }
    }
    for (j, gr) in rule.resources.iter().enumerate() {
        for (k, res) in gr.resources.iter().enumerate() {
            let ok = !res.is_empty()
                && match res.split_once('/') {
                    None => true,
                    Some((r, sub)) => !r.is_empty() && !sub.is_empty() && !sub.contains('/'),
                };
            if !ok {
                return Err(RuleProblem::Resource {
                    group: j,
                    index: k,
                    resource: res.clone(),
                });
            }
        }
    }
    Ok(())
}

fn rule_matches(rule: &PolicyRule, user: Option<Subject<'_>>, info: Option<&RequestInfo>) -> bool {
    if !rule.users.is_empty() {
        match user {
            Some(u) if rule.users.iter().any(|n| n == u.name) => {}
            _ => return false,
        }
    }
    if !rule.user_groups.is_empty() {
        match user {
            Some(u) if u.groups.iter().any(|g| rule.user_groups.contains(g)) => {}
            _ => return false,
        }
    }
    if !rule.verbs.is_empty() {
        match info {
            Some(i) if rule.verbs.contains(&i.verb) => {}
            _ => return false,
        }
    }
    if !rule.namespaces.is_empty() || !rule.resources.is_empty() {
        return info.is_some_and(|i| matches_resource(rule, i));
    }
    if !rule.non_resource_urls.is_empty() {
        return info.is_some_and(|i| matches_non_resource(rule, i));
    }
    true
}

fn matches_non_resource(rule: &PolicyRule, info: &RequestInfo) -> bool {
    if info.is_resource_request {
        return false;
    }
    rule.non_resource_urls.iter().any(|spec| {
        spec == "*"
            || *spec == info.path
            || spec
                .strip_suffix('*')
                .is_some_and(|prefix| info.path.starts_with(prefix))
    })
}

fn matches_resource(rule: &PolicyRule, info: &RequestInfo) -> bool {
    if !info.is_resource_request {
        return false;
    }
    if !rule.namespaces.is_empty() && !rule.namespaces.contains(&info.namespace) {
        return false;
    }
    if rule.resources.is_empty() {
        return true;
    }
    let resource = info.resource.as_str();
    let sub = info.subresource.as_str();
    for gr in &rule.resources {
        if gr.group != info.api_group {
            continue;
        }
        if gr.resources.is_empty() {
            return true;
        }
        if !gr.resource_names.is_empty() && !gr.resource_names.contains(&info.name) {
            continue;
        }
        for res in &gr.resources {
            let hit = match res.split_once('/') {
                None => res == "*" || (sub.is_empty() && res == resource),
                Some(("*", s)) => !sub.is_empty() && s == sub,
                Some((r, "*")) => r == resource,
                Some((r, s)) => r == resource && s == sub,
            };
            if hit {
                return true;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::requestinfo::request_info;
    use http::Method;

    fn info(method: &str, target: &str) -> RequestInfo {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        request_info(&Method::from_bytes(method.as_bytes()).unwrap(), path, query).unwrap()
    }

    fn groups(g: &[&str]) -> Vec<String> {
        g.iter().map(|s| s.to_string()).collect()
    }

    const POLICY: &str = r#"
apiVersion: audit.k8s.io/v1
kind: Policy
metadata:
  name: ztgate
omitStages: [RequestReceived]
rules:
  # 0: noisy health checks
  - level: None
    nonResourceURLs: ["/healthz*", "/version", "/readyz"]
  # 1: a robot we never audit
  - level: None
    users: ["system:kube-proxy"]
    verbs: ["watch"]
  # 2: logs of one pod, by name
  - level: Metadata
    resources:
      - group: ""
        resources: ["pods/log"]
        resourceNames: ["web-0"]
    omitStages: [ResponseStarted]
  # 3: events are noise, except in kube-system
  - level: None
    namespaces: ["default", "team-a"]
    resources:
      - group: ""
        resources: ["events"]
  # 4: nothing from this group about secrets
  - level: None
    userGroups: ["quiet"]
    resources:
      - group: ""
        resources: ["secrets"]
  # 5: any status subresource
  - level: None
    resources:
      - group: ""
        resources: ["*/status"]
  # 6: deployments and all their subresources
  - level: None
    resources:
      - group: apps
        resources: ["deployments/*"]
  # 7: pods themselves (not subresources) in kube-system
  - level: None
    namespaces: ["kube-system"]
    resources:
      - group: ""
        resources: ["pods"]
  # 8: cluster-scoped core requests
  - level: None
    namespaces: [""]
    resources:
      - group: ""
"#;

    fn eval(p: &AuditPolicy, user: &str, g: &[&str], method: &str, target: &str) -> PolicyDecision {
        let gs = groups(g);
        p.evaluate(
            Some(Subject {
                name: user,
                groups: &gs,
            }),
            Some(&info(method, target)),
        )
    }

    fn level(p: &AuditPolicy, user: &str, g: &[&str], method: &str, target: &str) -> Level {
        eval(p, user, g, method, target).level
    }

    #[test]
    fn non_resource_urls_with_wildcards() {
        let p = AuditPolicy::from_yaml(POLICY).unwrap();
        assert_eq!(level(&p, "a", &[], "GET", "/healthz"), Level::None);
        assert_eq!(level(&p, "a", &[], "GET", "/healthz/etcd"), Level::None);
        assert_eq!(level(&p, "a", &[], "GET", "/version"), Level::None);
        assert_eq!(level(&p, "a", &[], "GET", "/version/x"), Level::Metadata);
        assert_eq!(level(&p, "a", &[], "GET", "/livez"), Level::Metadata);
        // A resource request never matches a nonResourceURLs rule.
        let star = AuditPolicy::from_yaml(
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: None\n  nonResourceURLs: ['*']\n",
        )
        .unwrap();
        assert_eq!(level(&star, "a", &[], "GET", "/metrics"), Level::None);
        assert_eq!(
            level(&star, "a", &[], "GET", "/api/v1/pods"),
            Level::Metadata
        );
    }

    #[test]
    fn users_and_verbs_must_both_match() {
        let p = AuditPolicy::from_yaml(POLICY).unwrap();
        let u = "system:kube-proxy";
        let ep = "/api/v1/namespaces/x/endpoints";
        assert_eq!(
            level(&p, u, &[], "GET", &format!("{ep}?watch=true")),
            Level::None
        );
        assert_eq!(level(&p, u, &[], "GET", ep), Level::Metadata);
        assert_eq!(
            level(&p, "alice", &[], "GET", &format!("{ep}?watch=1")),
            Level::Metadata
        );
    }

    #[test]
    fn subresources_and_resource_names() {
        let p = AuditPolicy::from_yaml(POLICY).unwrap();
        let d = eval(&p, "a", &[], "GET", "/api/v1/namespaces/x/pods/web-0/log");
        assert_eq!(d.level, Level::Metadata);
        // Rule 2's own omitStages plus the policy's.
        assert!(d.omit_stages.contains(Stage::ResponseStarted));
        assert!(d.omit_stages.contains(Stage::RequestReceived));
        assert!(!d.records(Stage::RequestReceived));
        assert!(d.records(Stage::ResponseComplete));
        // Another pod's log: rule 2 does not match; nothing else does -> default.
        let d = eval(&p, "a", &[], "GET", "/api/v1/namespaces/x/pods/web-1/log");
        assert_eq!(d.level, Level::Metadata);
        assert!(!d.omit_stages.contains(Stage::ResponseStarted));
        assert!(d.omit_stages.contains(Stage::RequestReceived));

        // "*/status" matches any status subresource, but not the resource itself.
        assert_eq!(
            level(&p, "a", &[], "PUT", "/api/v1/namespaces/x/pods/p/status"),
            Level::None
        );
        assert_eq!(
            level(&p, "a", &[], "PATCH", "/api/v1/nodes/n1/status"),
            Level::None
        );
        // "deployments/*" matches the resource and all its subresources.
        assert_eq!(
            level(
                &p,
                "a",
                &[],
                "GET",
                "/apis/apps/v1/namespaces/x/deployments/d"
            ),
            Level::None
        );
        assert_eq!(
            level(
                &p,
                "a",
                &[],
                "PUT",
                "/apis/apps/v1/namespaces/x/deployments/d/scale"
            ),
            Level::None
        );
        // ...but only in its group.
        assert_eq!(
            level(
                &p,
                "a",
                &[],
                "GET",
                "/apis/other.io/v1/namespaces/x/deployments/d"
            ),
            Level::Metadata
        );
        // "pods" does not cover "pods/exec" (kube's rule).
        assert_eq!(
            level(&p, "a", &[], "GET", "/api/v1/namespaces/kube-system/pods"),
            Level::None
        );
        assert_eq!(
            level(
                &p,
                "a",
                &[],
                "POST",
                "/api/v1/namespaces/kube-system/pods/p/exec"
            ),
            Level::Metadata
        );
    }

    #[test]
    fn namespaces_and_groups() {
        let p = AuditPolicy::from_yaml(POLICY).unwrap();
        assert_eq!(
            level(&p, "a", &[], "GET", "/api/v1/namespaces/default/events"),
            Level::None
        );
        assert_eq!(
            level(&p, "a", &[], "GET", "/api/v1/namespaces/team-a/events"),
            Level::None
        );
        assert_eq!(
            level(&p, "a", &[], "GET", "/api/v1/namespaces/prod/events"),
            Level::Metadata
        );
        // userGroups: one matching group is enough.
        assert_eq!(
            level(
                &p,
                "a",
                &["x", "quiet"],
                "GET",
                "/api/v1/namespaces/prod/secrets"
            ),
            Level::None
        );
        assert_eq!(
            level(&p, "a", &["x"], "GET", "/api/v1/namespaces/prod/secrets"),
            Level::Metadata
        );
        // namespaces: [""] matches cluster-scoped requests (rule 8), not namespaced ones.
        assert_eq!(level(&p, "a", &[], "GET", "/api/v1/nodes"), Level::None);
        assert_eq!(
            level(&p, "a", &[], "GET", "/api/v1/namespaces/prod/configmaps"),
            Level::Metadata
        );
    }

    #[test]
    fn first_match_wins() {
        let p = AuditPolicy::from_yaml(
            r#"
apiVersion: audit.k8s.io/v1
kind: Policy
rules:
  - level: Metadata
    users: [alice]
  - level: None
    verbs: [get, list]
  - level: Metadata
    verbs: [get]
"#,
        )
        .unwrap();
        assert_eq!(
            level(&p, "alice", &[], "GET", "/api/v1/pods"),
            Level::Metadata
        );
        assert_eq!(
            level(&p, "bob", &[], "GET", "/api/v1/namespaces/a/pods/x"),
            Level::None
        );
        assert_eq!(
            level(&p, "bob", &[], "DELETE", "/api/v1/namespaces/a/pods/x"),
            Level::Metadata
        );
    }

    #[test]
    fn unauthenticated_and_unclassified_requests() {
        let p = AuditPolicy::from_yaml(
            r#"
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [ResponseStarted]
rules:
  - level: None
    users: [alice]
  - level: None
    verbs: [get]
  - level: None
    nonResourceURLs: ["*"]
"#,
        )
        .unwrap();
        // No user, no request info: only rules without conditions could match -> default.
        let d = p.evaluate(None, None);
        assert_eq!(d.level, Level::Metadata);
        assert!(d.omit_stages.contains(Stage::ResponseStarted));
        // No user but request info: the verb rule matches.
        let get = info("GET", "/api/v1/namespaces/a/pods/x");
        assert_eq!(p.evaluate(None, Some(&get)).level, Level::None);
        // ... and a list is not a get.
        let list = info("GET", "/api/v1/namespaces/a/pods");
        assert_eq!(p.evaluate(None, Some(&list)).level, Level::Metadata);
    }

    #[test]
    fn default_policy_records_metadata() {
        let p = AuditPolicy::metadata_for_everything();
        let d = p.evaluate(None, None);
        assert_eq!(d.level, Level::Metadata);
        assert!(Stage::ALL.iter().all(|s| d.records(*s)));
        assert!(!PolicyDecision::NONE.records(Stage::ResponseComplete));
    }

    /// The example in docs/audit.md.
    #[test]
    fn documented_example_parses() {
        let doc = include_str!("../../docs/audit.md");
        let start = doc
            .find("```yaml\napiVersion: audit.k8s.io/v1")
            .expect("example in docs")
            + 8;
        let end = start + doc[start..].find("```").unwrap();
        let p = AuditPolicy::from_yaml(&doc[start..end]).unwrap();
        assert_eq!(p.rules().len(), 4);
        assert_eq!(level(&p, "a", &[], "GET", "/apis/apps/v1"), Level::None);
        let d = eval(&p, "a", &[], "POST", "/api/v1/namespaces/x/pods/p/exec");
        assert_eq!(d.level, Level::Metadata);
        assert!(!d.records(Stage::RequestReceived));
        assert_eq!(
            level(&p, "a", &[], "GET", "/api/v1/namespaces/x/events"),
            Level::None
        );
    }

    #[test]
    fn bodies_and_bad_rules_are_refused() {
        let head = "apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n";
        let err = AuditPolicy::from_yaml(&format!("{head}- level: Metadata\n- level: Request\n"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("rules[1].level:"), "{err}");
        assert!(
            err.contains("never records request or response bodies"),
            "{err}"
        );
        let err = AuditPolicy::from_yaml(&format!("{head}- level: RequestResponse\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"RequestResponse\" is not supported"),
            "{err}"
        );
        let err = AuditPolicy::from_yaml(&format!("{head}- level: Verbose\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("rules[0].level"), "{err}");
        let err = AuditPolicy::from_yaml(&format!("{head}- level: None\n  user: [a]\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `user`"), "{err}");
        let err = AuditPolicy::from_yaml(&format!(
            "{head}- level: None\n  nonResourceURLs: ['/a*b']\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("rules[0].nonResourceURLs[0]"), "{err}");
        let err = AuditPolicy::from_yaml(&format!(
            "{head}- level: None\n  nonResourceURLs: ['/a']\n  namespaces: [x]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("cannot be combined"), "{err}");
        let err = AuditPolicy::from_yaml(&format!(
            "{head}- level: None\n  resources: [{{group: '', resources: ['a/b/c']}}]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("rules[0].resources[0].resources[0]"),
            "{err}"
        );
        let err = AuditPolicy::from_yaml("apiVersion: audit.k8s.io/v1beta1\nkind: Policy\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("apiVersion"), "{err}");
        let err = AuditPolicy::from_yaml(&format!("{head}- level: None\n  omitStages: [Done]\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("omitStages"), "{err}");
    }
}
