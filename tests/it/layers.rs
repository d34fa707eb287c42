//! The crate's import graph: no cycles among its files, and no import from a lower layer up to a
//! higher one.
//!
//! Every file under `src/` is read; its `crate::…`, `super::…`, `self::…` paths and the paths
//! that name one of its own child modules are resolved to the file that defines the module they
//! name. A name a module re-exports (`pub use child::Item;`, `pub use child::*;`) is traced to
//! the file it comes from, so `crate::config::load_file` is an import of `config::load`.
//! A module's files are one unit: a parent using its children is not an import, and a child
//! using its parent is one for the layers but not for cycles. Test code (`#[cfg(test)]` items,
//! `tests.rs` files) and `src/fuzzing.rs` (the fuzz targets' entry points, which reach everywhere
//! on purpose) are left out, as is `src/main.rs` (a separate crate that uses the library by its
//! name).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The layers, bottom to top: a file may import from its own layer and the ones below.
/// A module path belongs to the layer of its longest prefix in this table.
const LAYERS: &[(&str, &[&str])] = &[
    // General helpers every part may use: the crypto provider (`lib.rs`), error chains and
    // locks, constant-time comparison, body types, the `metav1.Status` builder, Go durations,
    // YAML line maps, and the file reloader.
    (
        "base",
        &[
            "",
            "util",
            "ct",
            "body",
            "errors",
            "config::duration",
            "config::linemap",
            "reload",
        ],
    ),
    // Certificates, keys and TLS configs on both sides, and the HTTPS clients built on them.
    ("tls", &["tls"]),
    // The config file's types: the file's own sections, and each part's config types beside the
    // part.
    (
        "config",
        &[
            "config",
            "audit::config",
            "device::config",
            "posture::config",
            "sso::config",
            "state::config",
        ],
    ),
    // The parts that know who is asking and what is stored: identities, devices, locks and
    // posture records; and the OIDC relying party (the `ztgate login` client, whose provider
    // client and kubeconfig writer the sign-in pages share).
    ("leaves", &["authn", "device", "state", "login"]),
    // What a request means to Kubernetes and what policy says about it; device posture, which
    // hands policy its facts.
    ("authz", &["authz", "posture"]),
    // Loading and checking a config file (the checks compile its policies).
    ("config check", &["config::load", "config::validate"]),
    // One decision per request, and everything that can stop a request, by side.
    ("decide", &["decide", "refusal"]),
    // Carrying a decided request: forwarding, live streams, audit, metrics and logs, the
    // cluster's discovery read as the gateway, readiness.
    (
        "serve",
        &[
            "proxy",
            "streams",
            "audit",
            "telemetry",
            "discovery",
            "readiness",
        ],
    ),
    // Classifying a request (once, right after TLS) to what will handle it.
    ("route", &["route"]),
    // The handlers of one kind of request each: the pipeline, the gateway's own APIs, the
    // review webhooks, the sign-in pages, the self-reviews.
    (
        "handlers",
        &[
            "pipeline",
            "webhook",
            "locks",
            "posture::api",
            "sso",
            "authz::rules",
        ],
    ),
    // The listener: accepts connections and hands each request to its handler.
    ("listener", &["listener"]),
    // Assembling the gateway from config, and reloading it.
    ("assembly", &["server", "gateway"]),
    // The command line and the demo.
    ("cli", &["cli", "demo"]),
];

/// One source file.
struct File {
    /// The absolute paths its code uses.
    imports: BTreeSet<String>,
    /// What it re-exports by name (`pub use a::b::C;`): the name and the path it stands for.
    reexports: BTreeMap<String, String>,
    /// The modules it re-exports everything of (`pub use a::b::*;`).
    globs: Vec<String>,
    /// The names of the public items it defines.
    items: BTreeSet<String>,
}

#[test]
fn imports_follow_the_layers_and_form_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = read_crate(&src);

    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut upward = Vec::new();
    for (module, file) in &files {
        for import in &file.imports {
            let Some(target) = resolve(import, &files) else {
                continue;
            };
            // A module's own children are its parts, and a parent re-exporting its children's
            // items is how a module shows its face (its users are traced to the child itself).
            if &target == module || is_ancestor(module, &target) {
                continue;
            }
            let (from, to) = (layer_of(module), layer_of(&target));
            if to.0 > from.0 {
                upward.push(format!(
                    "{} ({}) imports {} ({}) via `{}`",
                    display(module),
                    from.1,
                    display(&target),
                    to.1,
                    import
                ));
            }
            // A module's files are one unit: a child using its parent is how Rust modules are
            // built, not a cycle.
            if is_ancestor(&target, module) {
                continue;
            }
            edges.entry(module.clone()).or_default().insert(target);
        }
    }

    let cycles = cycles(&edges);
    let mut report = String::new();
    for c in &cycles {
        let mut names: Vec<String> = c.iter().map(|m| display(m)).collect();
        names.push(names[0].clone());
        report.push_str(&format!("cycle: {}\n", names.join(" -> ")));
    }
    upward.sort();
    upward.dedup();
    for u in &upward {
        report.push_str(&format!("upward import: {u}\n"));
    }
    assert!(
        report.is_empty(),
        "the crate's imports break its layering (tests/it/layers.rs has the table):\n{report}"
    );
}

#[test]
fn every_module_has_a_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = read_crate(&src);
    let unplaced: Vec<&String> = files
        .keys()
        .filter(|m| {
            !m.is_empty()
                && !LAYERS
                    .iter()
                    .flat_map(|(_, prefixes)| prefixes.iter())
                    .any(|p| !p.is_empty() && (m == p || m.starts_with(&format!("{p}::"))))
        })
        .collect();
    assert!(
        unplaced.is_empty(),
        "modules with no layer in tests/it/layers.rs: {unplaced:?}"
    );
}

#[test]
fn the_checks_see_re_exports_cycles_and_layers() {
    let file = |code: &str, module: &str| {
        let code = without_tests(&strip(code));
        let children = child_modules(&code);
        let (reexports, globs) = reexports(&code, module, &children);
        File {
            imports: imports(&code, module, &children),
            reexports,
            globs,
            items: public_items(&code),
        }
    };
    let files: BTreeMap<String, File> = [
        (
            "config",
            file(
                "mod load; pub use load::{load_file}; // crate::proxy::X\n",
                "config",
            ),
        ),
        (
            "config::load",
            file("use crate::decide::Decider;", "config::load"),
        ),
        (
            "decide",
            file(
                "fn f() { let s = \"crate::tls::x\"; crate::config::load_file(); }\n\
                 #[cfg(test)] mod tests { use crate::proxy::Y; }",
                "decide",
            ),
        ),
    ]
    .into_iter()
    .map(|(m, f)| (m.to_owned(), f))
    .collect();
    assert_eq!(
        resolve("config::load_file", &files).as_deref(),
        Some("config::load")
    );
    assert_eq!(
        files["decide"].imports,
        BTreeSet::from(["config::load_file".to_owned()]),
        "comments, strings and test code are not imports"
    );
    let edges: BTreeMap<String, BTreeSet<String>> = files
        .iter()
        .map(|(m, f)| {
            let targets = f
                .imports
                .iter()
                .filter_map(|i| resolve(i, &files))
                .filter(|t| t != m && !is_ancestor(m, t))
                .collect();
            (m.clone(), targets)
        })
        .collect();
    assert_eq!(
        cycles(&edges),
        vec![vec!["config::load".to_owned(), "decide".to_owned()]]
    );
    assert!(layer_of("config::load").0 > layer_of("config").0);
    assert!(layer_of("config::duration").0 < layer_of("tls").0);
    assert_eq!(layer_of("").1, "base");
}

fn display(module: &str) -> String {
    if module.is_empty() {
        "crate root".to_owned()
    } else {
        module.to_owned()
    }
}

fn is_ancestor(ancestor: &str, module: &str) -> bool {
    ancestor.is_empty() || module.starts_with(&format!("{ancestor}::"))
}

/// The layer (its index and name) of `module`: its longest prefix in [`LAYERS`].
fn layer_of(module: &str) -> (usize, &'static str) {
    let mut best: Option<(usize, usize, &'static str)> = None;
    for (i, (name, prefixes)) in LAYERS.iter().enumerate() {
        for p in prefixes.iter() {
            let matches = if p.is_empty() {
                module.is_empty()
            } else {
                module == *p || module.starts_with(&format!("{p}::"))
            };
            if matches && best.is_none_or(|(len, _, _)| p.len() > len) {
                best = Some((p.len(), i, name));
            }
        }
    }
    best.map_or((usize::MAX, "no layer"), |(_, i, name)| (i, name))
}

/// The module (file) an absolute path names: its longest prefix that is a module, or, when the
/// next name is one that module re-exports, the module it comes from.
fn resolve(path: &str, files: &BTreeMap<String, File>) -> Option<String> {
    let mut path = path.to_owned();
    // Re-exports chain (a parent re-exporting what a child re-exports); a few steps suffice.
    for _ in 0..8 {
        let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
        let n = (0..=segs.len())
            .rev()
            .find(|n| files.contains_key(&segs[..*n].join("::")))?;
        let module = segs[..n].join("::");
        let Some(name) = segs.get(n) else {
            return Some(module);
        };
        let file = &files[&module];
        if let Some(from) = file.reexports.get(*name) {
            path = std::iter::once(from.as_str())
                .chain(segs[n + 1..].iter().copied())
                .collect::<Vec<_>>()
                .join("::");
            continue;
        }
        let from_glob = file
            .globs
            .iter()
            .find(|g| files.get(*g).is_some_and(|f| f.items.contains(*name)));
        return Some(from_glob.cloned().unwrap_or(module));
    }
    None
}

/// Every file of the crate by module path, with the absolute paths it uses.
fn read_crate(src: &Path) -> BTreeMap<String, File> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("src/ is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let rel = path.strip_prefix(src).expect("under src/");
            let mut segs: Vec<String> = rel
                .with_extension("")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            let file_name = segs.last().cloned().unwrap_or_default();
            if file_name == "tests" || rel == Path::new("fuzzing.rs") || rel == Path::new("main.rs")
            {
                continue;
            }
            let is_dir_module = file_name == "mod" || rel == Path::new("lib.rs");
            if is_dir_module {
                segs.pop();
            }
            let module = segs.join("::");
            let text = std::fs::read_to_string(&path).expect("a source file is readable");
            let code = without_tests(&strip(&text));
            let children = child_modules(&code);
            let imports = imports(&code, &module, &children);
            let (reexports, globs) = reexports(&code, &module, &children);
            let items = public_items(&code);
            out.insert(
                module,
                File {
                    imports,
                    reexports,
                    globs,
                    items,
                },
            );
        }
    }
    out
}

/// What a file re-exports: by name, and whole modules (globs).
fn reexports(
    code: &str,
    module: &str,
    children: &BTreeSet<String>,
) -> (BTreeMap<String, String>, Vec<String>) {
    let mut named = BTreeMap::new();
    let mut globs = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("pub") {
        let after = &rest[at + 3..];
        let boundary = rest[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_alphanumeric() && c != '_');
        // `pub use`, `pub(crate) use`, `pub(super) use`.
        let after_vis = match after.strip_prefix('(') {
            Some(v) => v.split_once(')').map_or("", |(_, r)| r),
            None => after,
        };
        let stmt = after_vis.trim_start();
        if boundary && stmt.starts_with("use ") {
            let end = stmt.find(';').unwrap_or(stmt.len());
            let tree = &stmt[4..end];
            for path in imports(tree, module, children) {
                if let Some(glob) = path.strip_suffix("::*") {
                    globs.push(glob.to_owned());
                } else if let Some((_, name)) = path.rsplit_once("::") {
                    named.insert(name.to_owned(), path.clone());
                }
            }
        }
        rest = &rest[at + 3..];
    }
    (named, globs)
}

/// The names of the public items a file defines.
fn public_items(code: &str) -> BTreeSet<String> {
    const KINDS: &[&str] = &[
        "struct", "enum", "fn", "type", "const", "static", "trait", "union",
    ];
    let words: Vec<&str> = code
        .split(|c: char| !c.is_alphanumeric() && c != '_')
        .filter(|w| !w.is_empty())
        .collect();
    let mut out = BTreeSet::new();
    for (i, w) in words.iter().enumerate() {
        if KINDS.contains(w) && words[i.saturating_sub(3)..i].contains(&"pub") {
            if let Some(name) = words.get(i + 1) {
                out.insert((*name).to_owned());
            }
        }
    }
    out
}

/// The absolute paths (`a::b::c`) a file's code uses; a glob ends in `::*`.
fn imports(code: &str, module: &str, children: &BTreeSet<String>) -> BTreeSet<String> {
    // The module `super` and `self` are relative to (a `mod.rs` is its directory's module).
    let here: Vec<&str> = module.split("::").filter(|s| !s.is_empty()).collect();
    let mut out = BTreeSet::new();
    let bytes = code.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let at_word_start = i == 0 || !is_ident(bytes[i - 1]) && bytes[i - 1] != b':';
        if !at_word_start || !is_ident(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && is_ident(bytes[i]) {
            i += 1;
        }
        let first = &code[start..i];
        if !code[i..].starts_with("::") {
            continue;
        }
        let base: Option<Vec<String>> = match first {
            "crate" => Some(Vec::new()),
            "super" | "self" => {
                let mut base: Vec<String> = here.iter().map(|s| s.to_string()).collect();
                if first == "super" {
                    base.pop();
                }
                Some(base)
            }
            name if children.contains(name) => {
                let mut base: Vec<String> = here.iter().map(|s| s.to_string()).collect();
                base.push(name.to_owned());
                Some(base)
            }
            _ => None,
        };
        let Some(base) = base else {
            continue;
        };
        let (paths, end) = path_tree(code, i + 2, &base);
        out.extend(paths);
        i = end;
    }
    out
}

/// The paths of a use tree (or a plain path) that starts at `pos`, right after `prefix::`;
/// returns them and where the tree ends.
fn path_tree(code: &str, mut pos: usize, prefix: &[String]) -> (Vec<String>, usize) {
    let bytes = code.as_bytes();
    let mut segs: Vec<String> = prefix.to_vec();
    loop {
        while pos < bytes.len() && bytes[pos].is_ascii_whitespace() {
            pos += 1;
        }
        if pos < bytes.len() && bytes[pos] == b'{' {
            let mut out = Vec::new();
            pos += 1;
            loop {
                while pos < bytes.len() && (bytes[pos].is_ascii_whitespace() || bytes[pos] == b',')
                {
                    pos += 1;
                }
                if pos >= bytes.len() || bytes[pos] == b'}' {
                    return (out, pos + 1);
                }
                let (paths, end) = path_tree(code, pos, &segs);
                out.extend(paths);
                // Skip `as name` and anything else up to the next item of the group.
                let mut p = end;
                while p < bytes.len() && bytes[p] != b',' && bytes[p] != b'}' {
                    p += 1;
                }
                pos = p;
            }
        }
        if pos < bytes.len() && bytes[pos] == b'*' {
            segs.push("*".to_owned());
            return (vec![segs.join("::")], pos + 1);
        }
        let start = pos;
        while pos < bytes.len() && is_ident(bytes[pos]) {
            pos += 1;
        }
        let seg = &code[start..pos];
        match seg {
            "" => return (vec![segs.join("::")], pos),
            "super" => {
                segs.pop();
            }
            "self" => {}
            _ => segs.push(seg.to_owned()),
        }
        if code[pos..].starts_with("::") {
            pos += 2;
        } else {
            return (vec![segs.join("::")], pos);
        }
    }
}

/// The names of the child modules a file declares (`mod name;`).
fn child_modules(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for stmt in code.split(';') {
        let words: Vec<&str> = stmt.split_whitespace().collect();
        if let Some(pos) = words.iter().position(|w| *w == "mod") {
            if pos + 2 == words.len() {
                out.insert(words[pos + 1].to_owned());
            }
        }
    }
    out
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The code without comments, and with the contents of string and character literals blanked
/// (their braces and paths are text, not code).
fn strip(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == b'r'
            && (i == 0 || !is_ident(b[i - 1]))
            && matches!(b.get(i + 1), Some(b'#') | Some(b'"'))
        {
            // A raw string: r"…" or r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            j += 1;
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            while j < b.len() && !b[j..].starts_with(&close) {
                j += 1;
            }
            i = j + close.len();
            out.push_str("\"\"");
        } else if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == b'\'' {
            // A character literal ('x', '\n', '\u{7f}'), or a lifetime ('a).
            if b.get(i + 1) == Some(&b'\\') {
                let mut j = i + 2;
                while j < b.len() && b[j] != b'\'' {
                    j += 1;
                }
                i = j + 1;
                out.push_str("' '");
            } else if b.get(i + 2) == Some(&b'\'') {
                i += 3;
                out.push_str("' '");
            } else if let Some(len) = text[i + 1..].chars().next().map(char::len_utf8) {
                if b.get(i + 1 + len) == Some(&b'\'') {
                    i += 2 + len;
                    out.push_str("' '");
                } else {
                    out.push('\'');
                    i += 1;
                }
            } else {
                i += 1;
            }
        } else {
            let ch_len = text[i..].chars().next().map_or(1, char::len_utf8);
            out.push_str(&text[i..i + ch_len]);
            i += ch_len;
        }
    }
    out
}

/// The code without the items marked `#[cfg(test)]`.
fn without_tests(code: &str) -> String {
    const MARK: &str = "#[cfg(test)]";
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find(MARK) {
        out.push_str(&rest[..at]);
        let item = &rest[at + MARK.len()..];
        let b = item.as_bytes();
        // The item ends at its first `;` outside braces, or at the brace closing its body.
        let mut depth = 0usize;
        let mut end = b.len();
        for (i, &c) in b.iter().enumerate() {
            match c {
                b'{' => depth += 1,
                b'}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                b';' if depth == 0 => {
                    end = i + 1;
                    break;
                }
                _ => {}
            }
        }
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

/// The cycles of `edges` (strongly connected components with more than one module), each
/// listed along its edges from its first module.
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let nodes: BTreeSet<&String> = edges
        .iter()
        .flat_map(|(k, v)| std::iter::once(k).chain(v.iter()))
        .collect();
    let reaches = |from: &String| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(n) = todo.pop() {
            for next in edges.get(&n).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let reach: BTreeMap<&String, BTreeSet<String>> =
        nodes.iter().map(|n| (*n, reaches(n))).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for n in &nodes {
        if done.contains(*n) || !reach[n].contains(*n) {
            continue;
        }
        let component: BTreeSet<String> = reach[n]
            .iter()
            .filter(|m| reach[m].contains(*n))
            .cloned()
            .collect();
        done.extend(component.iter().cloned());
        out.push(walk_cycle(n, &component, edges));
    }
    out
}

/// A cycle through `start` inside `component`, by breadth-first search back to `start`.
fn walk_cycle(
    start: &String,
    component: &BTreeSet<String>,
    edges: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<String> {
    let mut parent: BTreeMap<String, String> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start.clone()]);
    while let Some(n) = queue.pop_front() {
        for next in edges.get(&n).into_iter().flatten() {
            if !component.contains(next) {
                continue;
            }
            if next == start {
                let mut path = vec![n.clone()];
                let mut cur = n.clone();
                while let Some(p) = parent.get(&cur) {
                    path.push(p.clone());
                    cur = p.clone();
                }
                path.reverse();
                return path;
            }
            if !parent.contains_key(next) && next != start {
                parent.insert(next.clone(), n.clone());
                queue.push_back(next.clone());
            }
        }
    }
    vec![start.clone()]
}
