//! The token cache of `ztgate login`: one JSON file per (issuer, client, scopes) under the user's
//! cache directory, mode 0600 in a 0700 directory, replaced atomically; and a lock file next to
//! it, so that many kubectl processes started at once do one login or refresh between them.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::LoginError;

/// What is kept between runs. The refresh token is the one long-lived secret; it never leaves
/// this file except towards the provider's token endpoint.
#[derive(Clone, Deserialize, Serialize)]
pub struct CachedTokens {
    pub issuer: String,
    pub client_id: String,
    /// The ID token, presented to the gateway as the bearer token.
    pub id_token: String,
    /// The ID token's `exp`, seconds since the epoch.
    pub expiry: i64,
    /// The ID token's `sub`: a refreshed token must name the same subject.
    pub subject: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
}

impl std::fmt::Debug for CachedTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedTokens")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("expiry", &self.expiry)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

/// The cache directory: `--cache-dir`, else `$XDG_CACHE_HOME/ztgate`, else `~/.cache/ztgate`.
pub fn cache_dir(explicit: Option<&Path>) -> Result<PathBuf, LoginError> {
    if let Some(d) = explicit {
        return Ok(d.to_owned());
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("ztgate"));
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".cache").join("ztgate")),
        None => Err(LoginError::Cache(
            "neither XDG_CACHE_HOME nor HOME is set; pass --cache-dir".into(),
        )),
    }
}

/// One cache entry and its lock.
pub struct TokenCache {
    dir: PathBuf,
    key: String,
}

/// Held while a process reads, refreshes and writes the entry; released when dropped (and by
/// the kernel when the process dies).
pub struct CacheLock {
    _file: File,
}

impl TokenCache {
    pub fn new(dir: PathBuf, issuer: &str, client_id: &str, scopes: &[String]) -> TokenCache {
        let mut h = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for part in [issuer, client_id] {
            h.update(part.as_bytes());
            h.update(&[0]);
        }
        let mut scopes = scopes.to_vec();
        scopes.sort();
        h.update(scopes.join(" ").as_bytes());
        let digest = h.finish();
        let key: String = digest.as_ref()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        TokenCache { dir, key }
    }

    pub fn token_path(&self) -> PathBuf {
        self.dir.join(format!("{}.json", self.key))
    }

    fn lock_path(&self) -> PathBuf {
        self.dir.join(format!("{}.lock", self.key))
    }

    fn ensure_dir(&self) -> Result<(), LoginError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| io_err(&self.dir, e))
    }

    /// Waits for the entry's lock (another process may be signing in).
    pub async fn lock(&self) -> Result<CacheLock, LoginError> {
        self.ensure_dir()?;
        let path = self.lock_path();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        tokio::task::spawn_blocking(move || {
            fs4::fs_std::FileExt::lock_exclusive(&file)
                .map(|()| CacheLock { _file: file })
                .map_err(|e| io_err(&path, e))
        })
        .await
        .map_err(|e| LoginError::Cache(format!("lock task: {e}")))?
    }

    /// The cached tokens, if any; an unreadable or foreign entry counts as none.
    pub fn read(&self, issuer: &str, client_id: &str) -> Option<CachedTokens> {
        let bytes = std::fs::read(self.token_path()).ok()?;
        let t: CachedTokens = serde_json::from_slice(&bytes).ok()?;
        (t.issuer == issuer && t.client_id == client_id).then_some(t)
    }

    /// Replaces the entry atomically; the file is created 0600.
    pub fn write(&self, tokens: &CachedTokens) -> Result<(), LoginError> {
        self.ensure_dir()?;
        let path = self.token_path();
        let tmp = self.dir.join(format!("{}.json.tmp", self.key));
        let _ = std::fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io_err(&tmp, e))?;
        let body = serde_json::to_vec(tokens).expect("tokens serialize");
        f.write_all(&body)
            .and_then(|()| f.sync_all())
            .map_err(|e| io_err(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))
    }

    pub fn remove(&self) -> Result<(), LoginError> {
        match std::fs::remove_file(self.token_path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io_err(&self.token_path(), e))
            }
            _ => Ok(()),
        }
    }
}

/// Removes every token file in `dir` (`ztgate logout`); returns how many there were.
pub fn clear_all(dir: &Path) -> Result<usize, LoginError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err(dir, e)),
    };
    let mut n = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".json") || name.ends_with(".json.tmp") {
            std::fs::remove_file(&path).map_err(|e| io_err(&path, e))?;
            if name.ends_with(".json") {
                n += 1;
            }
        }
    }
    Ok(n)
}

fn io_err(path: &Path, e: std::io::Error) -> LoginError {
    LoginError::Cache(format!("{}: {e}", path.display()))
}
