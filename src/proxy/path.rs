//! Request-target checks. kube-apiserver routes on the percent-decoded path, so the gateway
//! refuses any target the two sides could read differently: encoded slashes, backslashes or
//! dots, dot segments, empty segments, NUL, and absolute-form targets.

/// No empty or dot segments in an absolute `path` ("/" has none).
fn check_segments(path: &str) -> Result<(), &'static str> {
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
    Ok(())
}

/// Why a target is refused (sent to the client as a 400 message).
///
/// Runs on every request: one pass over the bytes for what must not be there, then the
/// segments; percent-decoding (to check it gives UTF-8) only when there is a `%` at all.
pub fn check_path(path: &str) -> Result<(), &'static str> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err("the request target must be an absolute path");
    }
    let (mut encoded, mut backslash, mut percent) = (false, false, false);
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'%' => {
                percent = true;
                if let (Some(&h), Some(&l)) = (b.get(i + 1), b.get(i + 2)) {
                    encoded |= matches!(
                        (h, l.to_ascii_lowercase()),
                        (b'2', b'f') | (b'5', b'c') | (b'2', b'e') | (b'0', b'0')
                    );
                }
            }
            b'\\' => backslash = true,
            _ => {}
        }
    }
    if encoded {
        return Err("encoded '/', '\\', '.' or NUL in the path are not accepted");
    }
    if backslash {
        return Err("'\\' in the path is not accepted");
    }
    check_segments(path)?;
    // Anything still percent-encoded must decode to valid UTF-8 (without a `%`, the path is
    // its own decoding, and a `&str`).
    if percent
        && percent_encoding::percent_decode_str(path)
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

    /// The checks as first written (lower-casing a copy, a scan per encoded sequence, decoding
    /// always): the one-pass version must give the same answer, message included, for every
    /// target.
    fn reference(path: &str) -> Result<(), &'static str> {
        if !path.starts_with('/') {
            return Err("the request target must be an absolute path");
        }
        let lower = path.to_ascii_lowercase();
        if ["%2f", "%5c", "%2e", "%00"]
            .iter()
            .any(|e| lower.contains(e))
        {
            return Err("encoded '/', '\\', '.' or NUL in the path are not accepted");
        }
        if path.contains('\\') {
            return Err("'\\' in the path is not accepted");
        }
        // (the segment rules are unchanged and shared)
        super::check_segments(path)?;
        if percent_encoding::percent_decode_str(path)
            .decode_utf8()
            .is_err()
        {
            return Err("the path does not decode to UTF-8");
        }
        Ok(())
    }

    #[test]
    fn the_one_pass_check_answers_as_the_reference() {
        // Every target of up to four pieces from these (with and without a leading '/').
        let pieces = [
            "/", "a", ".", "..", "%", "%2", "%2f", "%2F", "%5C", "%5c", "%2E", "%00", "%0", "%ff",
            "%c3%a9", "%25", "\\", "é", "%%2f", "x%2",
        ];
        let mut checked = 0;
        let mut refused = 0;
        let mut targets = vec![String::new()];
        for _ in 0..4 {
            let mut next = Vec::new();
            for t in &targets {
                for p in pieces {
                    next.push(format!("{t}{p}"));
                }
            }
            for t in &next {
                for path in [t.clone(), format!("/{t}")] {
                    let got = check_path(&path);
                    assert_eq!(got, reference(&path), "{path:?}");
                    checked += 1;
                    refused += usize::from(got.is_err());
                }
            }
            targets = next;
        }
        // Both answers are well represented.
        assert!(
            refused > checked / 4 && refused < checked,
            "{refused} of {checked}"
        );
    }
}
