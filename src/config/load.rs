//! Reading a config: YAML → schema (errors with field path, line and column) → relative paths
//! resolved against the file's directory → semantic validation (every problem, each with its
//! field path and line).

use std::path::{Path, PathBuf};

use serde_yaml_ng::Value;

use super::linemap::LineMap;
use super::types::GatewayConfig;
use super::validate::{self, Issue};
use super::{ConfigError, ConfigErrors};

/// Reads, parses and validates a config file, including the files it names. Relative paths in
/// the file are resolved against the file's directory.
pub fn load_file(path: &Path) -> Result<GatewayConfig, ConfigErrors> {
    let origin = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        errors: vec![ConfigError {
            origin: origin.clone(),
            path: String::new(),
            line: None,
            column: None,
            message: format!("cannot read config file: {e}"),
        }],
    })?;
    let base_dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    load_str(&src, &origin, base_dir)
}

/// Parses and validates a config held in memory. `origin` names it in error messages (usually
/// the file name); relative file paths in it are resolved against `base_dir`.
pub fn load_str(src: &str, origin: &str, base_dir: &Path) -> Result<GatewayConfig, ConfigErrors> {
    let lines = LineMap::build(src);
    let at = |path: &str, message: String| {
        let pos = lines.locate(path);
        ConfigError {
            origin: origin.to_string(),
            path: path.to_string(),
            line: pos.map(|p| p.0),
            column: pos.map(|p| p.1),
            message,
        }
    };
    let fail = |errors: Vec<ConfigError>| Err(ConfigErrors { errors });

    // 1. YAML syntax, document shape, apiVersion and kind. A different apiVersion may have a
    //    different schema, so schema errors would only confuse: report the header alone.
    let value: Value = match serde_yaml_ng::from_str(src) {
        Ok(v) => v,
        Err(e) => return fail(vec![yaml_error(origin, "", &e)]),
    };
    let root = match &value {
        Value::Mapping(m) => m,
        Value::Null => {
            return fail(vec![at(
                "",
                format!(
                    "the file is empty; expected a {} with apiVersion: {}",
                    super::KIND,
                    super::API_VERSION
                ),
            )])
        }
        other => {
            return fail(vec![at(
                "",
                format!(
                    "expected a mapping (apiVersion, kind, listener, upstream, ...), found {}",
                    describe(other)
                ),
            )])
        }
    };
    let scalar = |key: &str| {
        root.get(key).map(|v| match v {
            Value::String(s) => s.clone(),
            other => serde_yaml_ng::to_string(other)
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
        })
    };
    let header = validate::check_header(scalar("apiVersion").as_deref(), scalar("kind").as_deref());
    if !header.is_empty() {
        return fail(issues_to_errors(header, &at));
    }

    // 2. The schema, with the path of the offending field.
    let de = serde_yaml_ng::Deserializer::from_str(src);
    let mut cfg: GatewayConfig = match serde_path_to_error::deserialize(de) {
        Ok(cfg) => cfg,
        Err(e) => {
            let path = match e.path().to_string() {
                p if p == "." => String::new(),
                p => p,
            };
            let mut err = yaml_error(origin, &path, e.inner());
            if err.line.is_none() {
                let pos = lines.locate(&path);
                err.line = pos.map(|p| p.0);
                err.column = pos.map(|p| p.1);
            }
            return fail(vec![err]);
        }
    };

    // 3. Relative paths, then 4. every semantic check.
    resolve_paths(&mut cfg, base_dir);
    let issues = validate::validate(&cfg);
    if issues.is_empty() {
        Ok(cfg)
    } else {
        fail(issues_to_errors(issues, &at))
    }
}

/// Makes every relative file path in `cfg` relative to `base_dir` instead (absolute paths are
/// left alone). [`load_file`] and [`load_str`] already do this.
pub fn resolve_paths(cfg: &mut GatewayConfig, base_dir: &Path) {
    let fix = |p: &mut PathBuf| {
        if p.is_relative() && !p.as_os_str().is_empty() {
            *p = base_dir.join(&*p);
        }
    };
    let l = &mut cfg.listener;
    fix(&mut l.serving_certificate.cert_file);
    fix(&mut l.serving_certificate.key_file);
    for b in &mut l.client_certificate_bundles {
        fix(&mut b.ca_file);
    }
    let u = &mut cfg.upstream;
    fix(&mut u.ca_file);
    if let Some(ck) = &mut u.client_certificate {
        fix(&mut ck.cert_file);
        fix(&mut ck.key_file);
    }
    if let Some(t) = &mut u.token_file {
        fix(t);
    }
    for j in &mut cfg.authentication.jwt {
        j.resolve_paths(base_dir);
    }
    if let Some(a) = &mut cfg.authorization {
        for p in &mut a.policies {
            fix(p);
        }
    }
    if let Some(s) = &mut cfg.sso {
        s.resolve_paths(base_dir);
    }
    if let Some(st) = &mut cfg.state {
        if let Some(d) = &mut st.directory {
            fix(d);
        }
        if let Some(e) = &mut st.etcd {
            e.resolve_paths(base_dir);
        }
    }
    if let Some(a) = &mut cfg.audit {
        if let Some(p) = &mut a.policy_file {
            fix(p);
        }
        for sink in &mut a.sinks {
            match sink {
                crate::audit::config::SinkConfig::File(f) => fix(&mut f.path),
                crate::audit::config::SinkConfig::Webhook(w) => {
                    fix(&mut w.ca_file);
                    if let Some(ck) = &mut w.client_certificate {
                        fix(&mut ck.cert_file);
                        fix(&mut ck.key_file);
                    }
                }
                _ => {}
            }
        }
    }
}

fn issues_to_errors(
    issues: Vec<Issue>,
    at: &impl Fn(&str, String) -> ConfigError,
) -> Vec<ConfigError> {
    let mut errors: Vec<ConfigError> = issues.into_iter().map(|i| at(&i.path, i.message)).collect();
    // In file order, so the operator can walk down the file; stable for equal lines.
    errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
    errors
}

fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// A serde_yaml_ng error as a [`ConfigError`]: its position, and its message without the
/// position and path that the error's own Display adds (we print those ourselves).
fn yaml_error(origin: &str, path: &str, e: &serde_yaml_ng::Error) -> ConfigError {
    let loc = e.location();
    let mut msg = e.to_string();
    if let Some(loc) = &loc {
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(i) = msg.find(&suffix) {
            msg.replace_range(i..i + suffix.len(), "");
        }
    }
    // serde_yaml_ng prefixes its own notion of the path ("listener.address: ..."); a path has
    // no spaces, while every message's first words do.
    if let Some((head, rest)) = msg.split_once(": ") {
        let is_path = !head.is_empty()
            && head
                .chars()
                .all(|c| c.is_alphanumeric() || "._-[]?".contains(c));
        if is_path {
            msg = rest.to_string();
        }
    }
    ConfigError {
        origin: origin.to_string(),
        path: path.to_string(),
        line: loc.as_ref().map(|l| l.line()),
        column: loc.as_ref().map(|l| l.column()),
        // serde quotes names with backticks; the rest of our messages use double quotes.
        message: msg.replace('`', "\""),
    }
}
