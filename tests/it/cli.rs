//! `ztgate policy validate|check` and `ztgate webhook-config`, run as a user runs them.

use std::process::Command;

fn ztgate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ztgate"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn policy_validate_accepts_the_shipped_examples() {
    let (code, out, err) = ztgate(&["policy", "validate", "config/policies"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("policies valid"), "{out}");
}

#[test]
fn policy_validate_names_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.cedar");
    std::fs::write(
        &bad,
        "// fine\npermit(principal, action, resource)\nwhen { resource.nosuch == 1 };\n",
    )
    .unwrap();
    let (code, _, err) = ztgate(&["policy", "validate", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("bad.cedar:3:"), "{err}");
    assert!(err.contains("nosuch"), "{err}");
}

#[test]
fn policy_check_answers_like_kubectl_auth_can_i() {
    let base = [
        "policy",
        "check",
        "--policies",
        "config/policies",
        "--user",
        "alice",
        "--group",
        "team-a",
    ];
    let (code, out, _) = ztgate(
        &[
            &base[..],
            &["--verb", "list", "--resource", "pods", "-n", "team-a"],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("yes"), "{out}");
    let (code, out, _) = ztgate(
        &[
            &base[..],
            &["--verb", "get", "--resource", "secrets", "-n", "team-a"],
        ]
        .concat(),
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("no - "), "{out}");
    assert!(out.contains("secrets"), "{out}");
}

/// `--verb impersonate` asks what `kubectl --as` asks (and kube-apiserver's impersonation
/// reviews): users, service accounts (by namespace and name) and groups as impersonation targets.
#[test]
fn policy_check_answers_impersonation_as_kubectl_as_is_decided() {
    let check = |extra: &[&str]| {
        let base = [
            "policy",
            "check",
            "--policies",
            "config/policies",
            "--user",
            "bob",
            "--group",
            "support",
            "--verb",
            "impersonate",
        ];
        ztgate(&[&base[..], extra].concat())
    };
    let (code, out, _) = check(&[
        "--resource",
        "serviceaccounts",
        "-n",
        "team-a",
        "--name",
        "builder",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("yes"), "{out}");
    let (code, out, _) = check(&[
        "--resource",
        "users",
        "--name",
        "system:serviceaccount:team-a:builder",
    ]);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = check(&["--resource", "users", "--name", "system:admin"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("impersonating system: users or groups is not allowed"),
        "{out}"
    );
    let (code, out, _) = check(&["--resource", "groups", "--name", "system:masters"]);
    assert_eq!(code, 1, "{out}");
    let (code, out, _) = check(&[
        "--resource",
        "serviceaccounts",
        "-n",
        "team-b",
        "--name",
        "builder",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("no - "), "{out}");
}

#[test]
fn webhook_config_is_a_kubeconfig_pointing_at_the_review_endpoint() {
    let (code, out, err) = ztgate(&[
        "webhook-config",
        "--server",
        "https://ztgate.ztgate-system.svc",
        "--ca",
        "/etc/ztgate/ca.crt",
        "--client-cert",
        "/etc/kubernetes/pki/ztgate-client.crt",
        "--client-key",
        "/etc/kubernetes/pki/ztgate-client.key",
    ]);
    assert_eq!(code, 0, "{err}");
    let doc: serde_json::Value = serde_yaml_ng::from_str(&out).unwrap();
    assert_eq!(doc["kind"], "Config");
    assert_eq!(
        doc["clusters"][0]["cluster"]["server"],
        "https://ztgate.ztgate-system.svc/apis/authentication.k8s.io/v1/tokenreviews"
    );
    assert_eq!(
        doc["users"][0]["user"]["client-certificate"],
        "/etc/kubernetes/pki/ztgate-client.crt"
    );
}

#[test]
fn legacy_abac_files_load_with_subresources_modelled() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("legacy.jsonl"),
        r#"{"apiVersion": "abac.authorization.kubernetes.io/v1beta1", "kind": "Policy", "spec": {"user": "kubelet", "namespace": "*", "resource": "pods", "readonly": true}}
"#,
    )
    .unwrap();
    let d = dir.path().to_str().unwrap();
    let check = |verb: &str, resource: &str| {
        ztgate(&[
            "policy",
            "check",
            "--policies",
            d,
            "--user",
            "kubelet",
            "--verb",
            verb,
            "--resource",
            resource,
            "-n",
            "default",
        ])
        .0
    };
    assert_eq!(check("list", "pods"), 0, "read-only pods allows list");
    assert_eq!(check("delete", "pods"), 1, "read-only");
    assert_eq!(
        check("get", "pods/log"),
        1,
        "a pods rule does not grant pods/log"
    );
    assert_eq!(check("create", "pods/exec"), 1, "nor pods/exec");

    std::fs::write(dir.path().join("broken.jsonl"), "{\"apiVersion\": \"abac.authorization.kubernetes.io/v1beta1\", \"kind\": \"Policy\", \"spec\": {\"usr\": \"x\"}}\n").unwrap();
    let (code, _, err) = ztgate(&["policy", "validate", d]);
    assert_eq!(code, 1);
    assert!(err.contains("broken.jsonl:1:"), "{err}");
}
