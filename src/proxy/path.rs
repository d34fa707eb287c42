//! Request-target checks. kube-apiserver routes on the percent-decoded path, so the gateway
//! refuses any target the two sides could read differently: encoded slashes, backslashes or
//! dots, dot segments, empty segments, NUL, and absolute-form targets.

/// Why a target is refused (sent to the client as a 400 message).
pub fn check_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') {
        return Err("the request target must be an absolute path");
    }
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f")
        || lower.contains("%5c")
        || lower.contains("%2e")
        || lower.contains("%00")
    {
        return Err("encoded '/', '\\', '.' or NUL in the path are not accepted");
    }
    if path.contains('\\') {
        return Err("'\\' in the path is not accepted");
    }
    if path == "/" {
        return Ok(());
    }
    // One trailing slash is harmless: kube-apiserver trims it before splitting.
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    for seg in trimmed[1..].split('/') {
        if seg.is_empty() {
            return Err("empty path segments are not accepted");
        }
        if seg == "." || seg == ".." {
            return Err("dot segments in the path are not accepted");
        }
    }
    // Anything still percent-encoded must decode to valid UTF-8.
    if percent_encoding::percent_decode_str(path)
        .decode_utf8()
        .is_err()
    {
        return Err("the path does not decode to UTF-8");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_path;

    #[test]
    fn accepts_kubernetes_paths() {
        for p in [
            "/",
            "/api",
            "/api/v1/namespaces/team-a/pods",
            "/apis/apps/v1/namespaces/x/deployments/y/scale",
            "/api/v1/namespaces/team-a/pods/web-0/exec",
            "/openapi/v3/apis/apps/v1",
            "/api/v1/",
        ] {
            assert!(check_path(p).is_ok(), "{p}");
        }
    }

    #[test]
    fn refuses_ambiguous_paths() {
        for p in [
            "/api/v1/namespaces/team-a%2Fpods",
            "/api/v1/namespaces/team-a/pods/%2e%2e/secrets",
            "/api/v1/namespaces/team-a/pods/../../secrets",
            "/api/v1/namespaces/./pods",
            "/api//v1",
            "/api/v1/%00",
            "/api/v1\\namespaces",
            "api/v1",
            "/api/%ff",
        ] {
            assert!(check_path(p).is_err(), "{p}");
        }
    }
}
