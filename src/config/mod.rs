//! The versioned YAML configuration (`apiVersion: ztgate.dev/v1alpha1`, `kind: GatewayConfig`):
//! its schema, loading with errors that name the field path and line, and validation.
//!
//! This module never touches the network and never logs secrets; it only reads the config file
//! and checks that the files it names are readable and well-formed.

pub mod duration;
pub mod jwt;
mod linemap;
mod load;
pub mod types;
pub mod validate;

pub use duration::{DurationError, GoDuration};
pub use load::{load_file, load_str, resolve_paths};
pub use types::*;
pub use validate::{validate, Issue};

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A certificate and its private key, as two PEM files (the gateway's serving certificate, the
/// client certificates it presents).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CertKeyFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// One problem in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or other origin) the config came from.
    pub origin: String,
    /// Field path, e.g. `listener.servingCertificate.certFile` or `upstream.url`.
    pub path: String,
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    /// 1-based column in the file, when known.
    pub column: Option<usize>,
    pub message: String,
}

/// Every problem found in a config file, so an operator fixes them in one pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors {
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        if self.path.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.path, self.message)
        }
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[cfg(test)]
mod tests;
