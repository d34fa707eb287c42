//! Policy loading: files and directories to sources, sources to one validated policy set.
//!
//! Each file is parsed on its own (so that parse errors carry that file's line and column), every
//! policy gets a unique id (`@id("...")` when present, else `<file name>:<index>`), then the
//! merged set is validated against the schema in strict mode and validation errors are mapped
//! back to the file that holds the offending policy.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::ffi::DetailedError;
use cedar_policy::{PolicyId, PolicySet, ValidationMode, Validator};

use super::index::PolicyIndex;
use super::schema::CompiledSchema;
use super::{diagnostic_message, PolicyError, PolicyErrors};

/// A validated policy set and what was derived from it; swapped as a whole on reload.
pub(crate) struct Loaded {
    pub epoch: u64,
    pub schema: Arc<CompiledSchema>,
    pub policies: PolicySet,
    pub index: PolicyIndex,
    /// Where the policies came from, in load order.
    pub origins: Vec<String>,
    /// Validator warnings (`origin:line:col: message`); they do not stop a load.
    pub warnings: Vec<String>,
}

/// Reads policy files: a file is read as is (whatever its extension); a directory contributes
/// its `*.cedar`, `*.jsonl` and `*.abac` files (not recursive), sorted by file name. Legacy
/// Kubernetes ABAC files (`.jsonl`, `.abac`) are translated to Cedar line for line, so errors
/// still point at the ABAC file's lines.
pub fn read_sources(paths: &[PathBuf]) -> Result<Vec<(String, String)>, PolicyErrors> {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    let io_error = |path: &Path, e: std::io::Error| PolicyError {
        origin: path.display().to_string(),
        line: None,
        column: None,
        message: e.to_string(),
    };
    for path in paths {
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => match std::fs::read_dir(path) {
                Ok(entries) => {
                    let mut found: Vec<PathBuf> = Vec::new();
                    for entry in entries {
                        match entry {
                            Ok(entry) => {
                                let p = entry.path();
                                let is_cedar = p.extension().is_some_and(|ext| {
                                    ext == "cedar" || ext == "jsonl" || ext == "abac"
                                });
                                if is_cedar && p.is_file() {
                                    found.push(p);
                                }
                            }
                            Err(e) => errors.push(io_error(path, e)),
                        }
                    }
                    found.sort();
                    files.extend(found);
                }
                Err(e) => errors.push(io_error(path, e)),
            },
            Ok(_) => files.push(path.clone()),
            Err(e) => errors.push(io_error(path, e)),
        }
    }
    let mut sources = Vec::with_capacity(files.len());
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text)
                if file
                    .extension()
                    .is_some_and(|e| e == "jsonl" || e == "abac") =>
            {
                let origin = file.display().to_string();
                match crate::authz::abac::to_cedar(&origin, &text) {
                    Ok(cedar) => sources.push((origin, cedar)),
                    Err(errs) => errors.extend(errs.into_iter().map(|e| PolicyError {
                        origin: e.origin,
                        line: Some(e.line),
                        column: Some(e.column),
                        message: e.message,
                    })),
                }
            }
            Ok(text) => sources.push((file.display().to_string(), text)),
            Err(e) => errors.push(io_error(&file, e)),
        }
    }
    if errors.is_empty() {
        Ok(sources)
    } else {
        Err(PolicyErrors { errors })
    }
}

/// The short name used in generated policy ids: the file name without directories.
fn short_name(origin: &str) -> &str {
    Path::new(origin)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(origin)
}

/// Parses, names and validates `sources`, producing a ready-to-use policy set.
pub(crate) fn compile(
    schema: Arc<CompiledSchema>,
    sources: &[(String, String)],
    epoch: u64,
) -> Result<Loaded, PolicyErrors> {
    let mut errors = Vec::new();
    let mut merged = PolicySet::new();
    // policy id -> index into `sources`
    let mut owner: HashMap<String, usize> = HashMap::new();

    for (source_index, (origin, text)) in sources.iter().enumerate() {
        let parsed = match PolicySet::from_str(text) {
            Ok(set) => set,
            Err(parse_errors) => {
                for e in parse_errors.iter() {
                    errors.push(PolicyError::diagnostic(
                        origin,
                        text,
                        &DetailedError::from(e),
                    ));
                }
                continue;
            }
        };
        if parsed.templates().next().is_some() {
            errors.push(PolicyError::at(
                origin,
                text,
                text.find("?principal").or_else(|| text.find("?resource")),
                "policy templates (?principal / ?resource slots) are not supported".into(),
            ));
            continue;
        }
        for (position, policy) in parsed.policies().enumerate() {
            // PolicySet::from_str names policies "policy<N>" in source order.
            let generated: &str = policy.id().as_ref();
            let index = generated
                .strip_prefix("policy")
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(position);
            let id = match policy.annotation("id") {
                Some(id) if id.trim().is_empty() => {
                    errors.push(PolicyError::at(
                        origin,
                        text,
                        text.find("@id"),
                        "empty @id annotation".into(),
                    ));
                    continue;
                }
                Some(id) => id.to_owned(),
                None => {
                    // Two files with the same name in different directories: fall back to the
                    // full origin for the second one rather than fail.
                    let short = format!("{}:{index}", short_name(origin));
                    if owner.contains_key(&short) {
                        format!("{origin}:{index}")
                    } else {
                        short
                    }
                }
            };
            if let Some(&first) = owner.get(&id) {
                errors.push(PolicyError::at(
                    origin,
                    text,
                    text.find(&format!("@id(\"{id}\")")),
                    format!(
                        "duplicate policy id {id:?} (already used in {})",
                        sources[first].0
                    ),
                ));
                continue;
            }
            owner.insert(id.clone(), source_index);
            if let Err(e) = merged.add(policy.new_id(PolicyId::new(&id))) {
                errors.push(PolicyError::at(origin, text, None, e.to_string()));
            }
        }
    }
    if !errors.is_empty() {
        return Err(PolicyErrors { errors });
    }

    let validator = Validator::new(schema.schema.clone());
    let result = validator.validate(&merged, ValidationMode::Strict);
    let locate = |policy_id: &PolicyId, d: &DetailedError| -> PolicyError {
        match owner.get(AsRef::<str>::as_ref(policy_id)) {
            Some(&i) => PolicyError::diagnostic(&sources[i].0, &sources[i].1, d),
            None => PolicyError {
                origin: policy_id.to_string(),
                line: None,
                column: None,
                message: diagnostic_message(d),
            },
        }
    };
    for e in result.validation_errors() {
        errors.push(locate(e.policy_id(), &DetailedError::from(e)));
    }
    let warnings: Vec<String> = result
        .validation_warnings()
        .map(|w| locate(w.policy_id(), &DetailedError::from(w)).to_string())
        .collect();
    if !errors.is_empty() {
        return Err(PolicyErrors { errors });
    }
    for w in &warnings {
        tracing::warn!(warning = %w, "cedar policy warning");
    }

    let index = PolicyIndex::build(&schema, &merged).map_err(|e| PolicyErrors {
        errors: vec![PolicyError {
            origin: "policy index".into(),
            line: None,
            column: None,
            message: e.to_string(),
        }],
    })?;
    Ok(Loaded {
        epoch,
        schema,
        policies: merged,
        index,
        origins: sources.iter().map(|(o, _)| o.clone()).collect(),
        warnings,
    })
}
