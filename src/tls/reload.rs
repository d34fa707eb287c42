//! Polling reloader for certificate files.
//!
//! Every interval the files are read and compared with what was last loaded; on a change the
//! new material is parsed and, only if it is valid, swapped in. A bad new file keeps the last
//! good material and logs why. Reading the whole (small) files rather than watching inodes is
//! what makes the Kubernetes Secret/ConfigMap `..data` symlink swap work.

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Spawns a task that calls `apply` with the files' contents whenever any of them changes.
/// `apply` returns an error message when the new contents are unusable.
pub fn spawn_file_reloader<F>(
    what: &'static str,
    paths: Vec<PathBuf>,
    interval: Duration,
    stop: CancellationToken,
    mut apply: F,
) where
    F: FnMut(&[Vec<u8>]) -> Result<(), String> + Send + 'static,
{
    let mut last: Vec<Vec<u8>> = paths
        .iter()
        .map(|p| std::fs::read(p).unwrap_or_default())
        .collect();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let mut current = Vec::with_capacity(paths.len());
            let mut read_error = None;
            for p in &paths {
                match tokio::fs::read(p).await {
                    Ok(b) => current.push(b),
                    Err(e) => {
                        read_error = Some(format!("{}: {e}", p.display()));
                        break;
                    }
                }
            }
            if let Some(e) = read_error {
                tracing::warn!(what, error = %e, "cannot read rotated file; keeping the last good one");
                continue;
            }
            if current == last {
                continue;
            }
            match apply(&current) {
                Ok(()) => {
                    tracing::info!(what, "reloaded after file change");
                    last = current;
                }
                Err(e) => {
                    tracing::warn!(what, error = %e, "rotated file is invalid; keeping the last good one");
                    // Remember it so a bad file is reported once, not every tick.
                    last = current;
                }
            }
        }
    });
}
