//! Error chains for logs.

/// An error and all its sources, `outer: inner: innermost`, for logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        out.push_str(": ");
        out.push_str(&err.to_string());
        cur = err.source();
    }
    out
}

/// The cause of an error that is cloned and compared (a cached refusal): shared, and equal to
/// another when their messages are.
#[derive(Clone, Debug)]
pub struct SharedCause(pub std::sync::Arc<dyn std::error::Error + Send + Sync>);

impl std::fmt::Display for SharedCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SharedCause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for SharedCause {
    fn eq(&self, other: &SharedCause) -> bool {
        self.0.to_string() == other.0.to_string()
    }
}

impl Eq for SharedCause {}
