//! The HTML pages of the web login: plain, accessible, no JavaScript, no external resources.

use std::fmt::Write;

/// Escapes text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;line-height:1.5;max-width:46rem;margin:2rem auto;padding:0 1rem;color:#1b1b1b}\
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem}dt{font-weight:600}dd{margin:0 0 .6rem 0}\
pre{background:#f3f3f3;border:1px solid #ccc;padding:.8rem;white-space:pre-wrap;word-break:break-all}\
a.button,button{display:inline-block;font-size:1rem;padding:.5rem 1rem;border:2px solid #1a4d8f;border-radius:4px;background:#1a4d8f;color:#fff;text-decoration:none;cursor:pointer}\
button.secondary{background:#fff;color:#1a4d8f}a:focus,button:focus{outline:3px solid #f5a623;outline-offset:2px}\
.error{border-left:4px solid #b00020;padding-left:1rem}";

/// A whole page around `body` (already HTML).
pub fn layout(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
<title>{} - ztgate</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n",
        esc(title)
    )
}

/// What the signed-in page shows.
pub struct SignedIn<'a> {
    pub user: &'a str,
    pub groups: &'a [String],
    pub issuer: &'a str,
    pub session_ends: &'a str,
    pub command: &'a str,
    pub kubeconfig_file: &'a str,
}

pub fn signed_in(p: &SignedIn<'_>) -> String {
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>You are signed in</h1>\n<dl>\n<dt>User</dt><dd id=\"user\">{}</dd>\n",
        esc(p.user)
    );
    let groups = if p.groups.is_empty() {
        "none".to_owned()
    } else {
        p.groups
            .iter()
            .map(|g| esc(g))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = write!(
        b,
        "<dt>Groups</dt><dd id=\"groups\">{groups}</dd>\n<dt>Identity provider</dt><dd>{}</dd>\n<dt>This page session ends</dt><dd>{}</dd>\n</dl>\n",
        esc(p.issuer),
        esc(p.session_ends)
    );
    let _ = write!(
        b,
        "<h2>Use kubectl through this gateway</h2>\n\
<p>The kubeconfig below holds no secret: kubectl runs <code>ztgate login</code>, which signs you in \
with your browser the first time and keeps a short-lived token in your cache.</p>\n\
<p><a class=\"button\" id=\"download\" href=\"/kubeconfig\" download=\"{file}\">Download kubeconfig</a></p>\n\
<p>Or write it with this command:</p>\n<pre id=\"command\"><code>{cmd}</code></pre>\n\
<p>Then:</p>\n<pre><code>export KUBECONFIG=$PWD/{file}\nkubectl auth whoami</code></pre>\n\
<h2>Sign out</h2>\n<form method=\"post\" action=\"/logout\"><button class=\"secondary\" type=\"submit\">Sign out of this page</button></form>\n",
        file = esc(p.kubeconfig_file),
        cmd = esc(p.command),
    );
    layout("Signed in", &b)
}

pub fn signed_out() -> String {
    layout(
        "Signed out",
        "<h1>You are signed out</h1>\n<p>Your session on this page has ended. Tokens kept by \
<code>ztgate login</code> on your machine are removed with <code>ztgate logout</code>.</p>\n\
<p><a class=\"button\" href=\"/login\">Sign in again</a></p>",
    )
}

/// A refusal: what happened, in words the user can act on (never a token or a secret).
pub fn error(title: &str, message: &str) -> String {
    layout(
        title,
        &format!(
            "<div class=\"error\" role=\"alert\"><h1>{}</h1>\n<p id=\"message\">{}</p></div>\n\
<p><a class=\"button\" href=\"/login\">Start again</a></p>",
            esc(title),
            esc(message)
        ),
    )
}
