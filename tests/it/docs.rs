//! Documentation and deployment files that must keep up with the code:
//!
//! - every config field is documented in `docs/configuration.md` (a maximal example config is
//!   parsed with the real schema, which rejects unknown fields, and re-serialized, which emits
//!   every field the schema has — so a new field fails here until it is documented);
//! - the gateway config shipped in `deploy/base/` passes the same checks as `ztgate config check`;
//! - the kube-apiserver webhook kubeconfigs in `deploy/kube-apiserver/` are exactly what
//!   `ztgate webhook-config` prints.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_yaml_ng::Value;
use ztgate::config::GatewayConfig;
use ztgate_testkit::TestPki;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    let p = repo(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A config with every field of the schema set (values need not pass validation, only parse).
const MAXIMAL: &str = r#"
apiVersion: ztgate.dev/v1alpha1
kind: GatewayConfig
listener:
  address: 0.0.0.0:8443
  servingCertificate:
    certFile: tls/tls.crt
    keyFile: tls/tls.key
  clientCertificateBundles:
    - name: users
      caFile: users-ca.crt
  reloadInterval: 10s
operations:
  address: 0.0.0.0:9090
upstream:
  url: https://kubernetes.default.svc:443
  caFile: ca.crt
  clientCertificate:
    certFile: upstream.crt
    keyFile: upstream.key
  tokenFile: token
  serverName: kubernetes.default.svc
  healthPath: /readyz
authentication:
  x509:
    bundle: users
  jwt:
    - issuer:
        url: https://idp.example.com
        discoveryURL: https://idp.internal/.well-known/openid-configuration
        audiences: [kubernetes]
        audienceMatchPolicy: MatchAny
        certificateAuthority: "-----BEGIN CERTIFICATE-----"
        certificateAuthorityFile: idp-ca.crt
      claimValidationRules:
        - claim: hd
          requiredValue: example.com
          expression: "claims.hd == 'example.com'"
          message: wrong domain
      claimMappings:
        username: {claim: email, prefix: "", expression: claims.email}
        groups: {claim: groups, prefix: "oidc:", expression: claims.groups}
        uid: {claim: sub, expression: claims.sub}
        extra:
          - key: example.com/tenant
            valueExpression: claims.tenant
      userValidationRules:
        - expression: "!user.username.startsWith('system:')"
          message: no system users
      signingAlgorithms: [RS256, ES256]
      clockLeeway: 30s
      maxTokenLifetime: 12h
      maxTokenBytes: 16384
      claimsForPolicy: [amr, acr]
  tokenReview:
    callerBundle: apiserver
  workloads:
    - trustDomain: prod.example.org
      bundle: apiserver
      usernamePrefix: "spiffe:"
  devices:
    bundle: apiserver
    deviceId:
      from: uriPrefix
      prefix: "urn:device:"
    posture:
      required: true
      maxAge: 24h
      issuers:
        - issuer:
            url: https://mdm.example.com
            discoveryURL: https://mdm.internal/.well-known/openid-configuration
            audiences: [ztgate-posture]
            audienceMatchPolicy: MatchAny
            certificateAuthority: "-----BEGIN CERTIFICATE-----"
            certificateAuthorityFile: mdm-ca.crt
          source: mdm
          signingAlgorithms: [ES256]
          maxAge: 12h
      selfReports:
        ttl: 1h
      provider:
        url: https://posture.example.com/v1/query
        certificateAuthorityFile: posture-ca.crt
        tokenFile: posture-token
        cacheTtl: 5m
        timeout: 2s
        requestsPerSecond: 10
        maxBatch: 100
        failClosed: true
state:
  directory: state
  etcd:
    endpoints: [https://etcd-0.etcd:2379]
    keyPrefix: /ztgate
    caFile: etcd-ca.crt
    certFile: etcd-client.crt
    keyFile: etcd-client.key
    dialTimeout: 5s
    heartbeatInterval: 1s
    maxStaleness: 30s
authorization:
  policies: [policies]
  reloadInterval: 2s
  subjectAccessReview:
    callerBundle: apiserver
    defaultDecision: NoOpinion
    gatewayUsers: [system:serviceaccount:ztgate:ztgate]
audit:
  policyFile: audit-policy.yaml
  overflow: Drop
  sinks:
    - type: file
      path: /var/log/ztgate/audit.log
      maxSizeBytes: 104857600
      maxBackups: 5
      bufferEvents: 10000
    - type: stdout
      bufferEvents: 10000
    - type: webhook
      url: https://audit.example.com/ingest
      caFile: audit-ca.crt
      clientCertificate: {certFile: audit.crt, keyFile: audit.key}
      batchMaxEvents: 400
      batchMaxWait: 1s
      bufferEvents: 10000
      retryBackoff: 500ms
      maxRetries: 5
      timeout: 10s
sso:
  issuer: https://idp.example.com
  clientId: ztgate-gateway
  clientSecretFile: sso-client-secret
  externalUrl: https://ztgate.example.com
  scopes: [openid, email, profile]
  sessionKeyFile: sso-session.key
  sessionTtl: 15m
  gatewayCaFile: gateway-ca.crt
  cli:
    clientId: ztgate-cli
    scopes: [openid, email, profile, offline_access]
    grant: browser
    command: ztgate
timeouts:
  request: 60s
  upstreamConnect: 5s
  headerRead: 10s
  tlsHandshake: 10s
  idleConnection: 90s
  shutdownGrace: 30s
  maxStreamAge: 12h
limits:
  maxHeaderBytes: 32768
  maxRequestBodyBytes: 3145728
  maxConcurrentStreams: 250
  maxInflightRequests: 400
logging:
  format: json
  level: info
"#;

/// Every key path of a YAML value: `listener.servingCertificate.certFile`,
/// `audit.sinks[].maxSizeBytes` (list items as `[]`). Intermediate keys are included.
fn key_paths(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        Value::Mapping(m) => {
            for (k, v) in m {
                let k = k.as_str().expect("string keys");
                let path = if prefix.is_empty() {
                    k.to_owned()
                } else {
                    format!("{prefix}.{k}")
                };
                out.insert(path.clone());
                key_paths(v, &path, out);
            }
        }
        Value::Sequence(s) => {
            for item in s {
                key_paths(item, &format!("{prefix}[]"), out);
            }
        }
        Value::Tagged(t) => key_paths(&t.value, prefix, out),
        _ => {}
    }
}

fn paths_of(yaml: &str) -> BTreeSet<String> {
    let v: Value = serde_yaml_ng::from_str(yaml).unwrap();
    let mut out = BTreeSet::new();
    key_paths(&v, "", &mut out);
    out
}

/// The text of `docs/configuration.md` under each `## ` heading (subsections included), keyed
/// by the heading in lower case.
fn doc_sections(doc: &str) -> Vec<(String, String)> {
    let mut sections: Vec<(String, String)> = vec![(String::new(), String::new())];
    let mut in_code = false;
    for line in doc.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        }
        if !in_code {
            if let Some(h) = line.strip_prefix("## ") {
                sections.push((h.trim().to_lowercase(), String::new()));
                continue;
            }
        }
        let text = &mut sections.last_mut().unwrap().1;
        text.push_str(line);
        text.push('\n');
    }
    sections
}

/// The field names a section documents: each `` `code` `` span outside code blocks, split into
/// path segments (`servingCertificate.certFile`, `sinks[i].type`, `.keyFile`).
fn documented_names(section: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut in_code = false;
    for line in section.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        for (i, span) in line.split('`').enumerate() {
            if i % 2 == 0 {
                continue;
            }
            for seg in span.split(['.', '/', ' ']) {
                let seg = seg.split('[').next().unwrap_or_default();
                if !seg.is_empty() {
                    names.insert(seg.to_owned());
                }
            }
        }
    }
    names
}

/// Key paths not documented in their section of docs/configuration.md: a top-level key in
/// "Top level", anything under `listener` in "## listener", and so on.
fn undocumented(paths: &BTreeSet<String>) -> Vec<String> {
    let doc = read("docs/configuration.md");
    let sections = doc_sections(&doc);
    let section = |name: &str| {
        sections
            .iter()
            .find(|(h, _)| h == name)
            .map(|(_, t)| documented_names(t))
    };
    let mut missing = Vec::new();
    for path in paths {
        let top = path.split(['.', '[']).next().unwrap();
        let leaf = path.rsplit('.').next().unwrap().trim_end_matches("[]");
        let heading = if path == top {
            "top level".to_owned()
        } else {
            top.to_lowercase()
        };
        match section(&heading) {
            None => missing.push(format!("{path}: no \"## {heading}\" section")),
            Some(names) if !names.contains(leaf) => {
                missing.push(format!("{path}: `{leaf}` is not in \"## {heading}\""))
            }
            Some(_) => {}
        }
    }
    missing
}

#[test]
fn every_config_field_is_documented() {
    // deny_unknown_fields everywhere: each key of the example is a real field.
    let cfg: GatewayConfig = serde_yaml_ng::from_str(MAXIMAL)
        .unwrap_or_else(|e| panic!("the maximal example no longer parses: {e}"));
    let example = paths_of(MAXIMAL);

    // Serialization writes every field (defaults included), so a field added to the schema
    // shows up here even though the example does not have it yet.
    let serialized = paths_of(&serde_yaml_ng::to_string(&cfg).unwrap());
    let new: Vec<_> = serialized.difference(&example).collect();
    assert!(
        new.is_empty(),
        "fields in the schema but not in the maximal example of tests/it/docs.rs (add them there \
         and document them in docs/configuration.md): {new:#?}"
    );

    let all: BTreeSet<String> = example.union(&serialized).cloned().collect();
    let missing = undocumented(&all);
    assert!(
        missing.is_empty(),
        "config fields without documentation in docs/configuration.md (write each field name \
         as `name` in its section's table):\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_doc_check_notices_a_missing_field() {
    let mut paths = BTreeSet::new();
    paths.insert("listener.noSuchField".to_owned());
    paths.insert("noSuchSection.field".to_owned());
    paths.insert("listener.servingCertificate.certFile".to_owned());
    let missing = undocumented(&paths);
    assert_eq!(missing.len(), 2, "{missing:?}");
}

/// Writes what `deploy/base/config/config.yaml` names under `root` and returns the config text
/// with its absolute paths moved there.
fn deploy_config_in(root: &Path) -> String {
    deploy_file_in(root, "deploy/base/config/config.yaml")
}

/// [`deploy_config_in`] for any of the deploy configs (`file`, relative to the repository).
fn deploy_file_in(root: &Path, file: &str) -> String {
    let pki = TestPki::new();
    let etc = root.join("etc/ztgate");
    let sa = root.join("serviceaccount");
    for d in ["tls", "users-ca", "policies"] {
        std::fs::create_dir_all(etc.join(d)).unwrap();
    }
    std::fs::create_dir_all(&sa).unwrap();
    pki.gateway_serving.write(&etc.join("tls"), "tls");
    std::fs::write(etc.join("users-ca/ca.crt"), pki.users_ca.cert_pem()).unwrap();
    std::fs::create_dir_all(etc.join("etcd")).unwrap();
    pki.gateway_client.write(&etc.join("etcd"), "tls");
    std::fs::write(etc.join("etcd/ca.crt"), pki.cluster_ca.cert_pem()).unwrap();
    let state = root.join("var/lib/ztgate");
    std::fs::write(sa.join("ca.crt"), pki.cluster_ca.cert_pem()).unwrap();
    std::fs::write(sa.join("token"), "token\n").unwrap();
    for entry in std::fs::read_dir(repo("deploy/base/policies")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, etc.join("policies").join(p.file_name().unwrap())).unwrap();
    }
    read(file)
        .replace(
            "/var/run/secrets/kubernetes.io/serviceaccount/",
            &format!("{}/", sa.display()),
        )
        .replace("/etc/ztgate/", &format!("{}/", etc.display()))
        .replace("/var/lib/ztgate/", &format!("{}/", state.display()))
}

#[test]
fn deploy_config_passes_config_check() {
    let dir = tempfile::tempdir().unwrap();
    let text = deploy_config_in(dir.path());
    let cfg = ztgate::config::load_str(&text, "deploy/base/config/config.yaml", dir.path())
        .unwrap_or_else(|e| panic!("deploy/base/config/config.yaml:\n{e}"));
    let authz = cfg.authorization.expect("the deployment enables Cedar");
    assert_eq!(authz.policies.len(), 1);
    assert_eq!(
        cfg.operations.address.as_deref(),
        Some("0.0.0.0:9090"),
        "the Deployment's probes and NetworkPolicy use the operations port 9090"
    );
    assert!(cfg.listener.address.ends_with(":8443"));
}

#[test]
fn deploy_configs_keep_locks_in_a_durable_store() {
    let dir = tempfile::tempdir().unwrap();
    let text = deploy_config_in(dir.path());
    let cfg = ztgate::config::load_str(&text, "deploy/base/config/config.yaml", dir.path())
        .unwrap_or_else(|e| panic!("deploy/base/config/config.yaml:\n{e}"));
    let state = cfg.state.expect("the base's replicas share state");
    let etcd = state.etcd.expect("two replicas: state.etcd");
    assert_eq!(etcd.endpoints.len(), 3, "every member of components/etcd");

    let file = "deploy/overlays/single-replica/config.yaml";
    let dir = tempfile::tempdir().unwrap();
    let text = deploy_file_in(dir.path(), file);
    let cfg = ztgate::config::load_str(&text, file, dir.path())
        .unwrap_or_else(|e| panic!("{file}:\n{e}"));
    let state = cfg.state.expect("one replica: state.directory");
    assert!(state.etcd.is_none() && state.directory.is_some(), "{file}");
}

#[test]
fn deploy_policies_match_the_examples() {
    let names = |dir: &str| -> BTreeSet<String> {
        std::fs::read_dir(repo(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".cedar"))
            .collect()
    };
    let want = names("config/policies");
    assert_eq!(names("deploy/base/policies"), want);
    for n in &want {
        assert_eq!(
            read(&format!("deploy/base/policies/{n}")),
            read(&format!("config/policies/{n}")),
            "deploy/base/policies/{n} differs from config/policies/{n}: copy it again"
        );
    }
}

#[test]
fn webhook_kubeconfigs_are_what_webhook_config_prints() {
    for (kind, file) in [
        (
            "tokenreview",
            "deploy/kube-apiserver/tokenreview-webhook.yaml",
        ),
        (
            "subjectaccessreview",
            "deploy/kube-apiserver/subjectaccessreview-webhook.yaml",
        ),
    ] {
        let text = read(file);
        let v: Value = serde_yaml_ng::from_str(&text).unwrap();
        let s = |v: &Value| v.as_str().unwrap_or_else(|| panic!("{file}")).to_owned();
        let cluster = &v["clusters"][0]["cluster"];
        let user = &v["users"][0]["user"];
        let server = s(&cluster["server"]);
        let base = server.split("/apis/").next().unwrap();
        let want = ztgate::cli::webhook_config(
            base,
            kind,
            Path::new(&s(&cluster["certificate-authority"])),
            Path::new(&s(&user["client-certificate"])),
            Path::new(&s(&user["client-key"])),
        )
        .unwrap();
        assert_eq!(
            text, want,
            "{file} differs from `ztgate webhook-config --kind {kind}`"
        );
    }
}
