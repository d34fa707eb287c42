//! JSON lines in a local file, rotated by size.
//!
//! Before a line is written that would take the file past `maxSizeBytes`, the file is closed and
//! renamed to `<path>.1` (an existing `<path>.1` becomes `<path>.2`, and so on; the oldest beyond
//! `maxBackups` is overwritten), and a new `<path>` is opened. A single line larger than the limit
//! still goes into a fresh file on its own. Files are created with mode 0600: audit logs name
//! people and what they did. Lines are flushed to the OS after every batch; there is no fsync.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use super::LineSink;
use crate::audit::config::FileSinkConfig;

pub(crate) struct FileSink {
    path: PathBuf,
    max_size: u64,
    max_backups: u32,
    file: Option<BufWriter<File>>,
    size: u64,
}

impl FileSink {
    /// Opens (or creates) the file now, so a bad path is a startup error.
    pub(crate) fn open(cfg: &FileSinkConfig) -> io::Result<FileSink> {
        let mut sink = FileSink {
            path: cfg.path.clone(),
            max_size: cfg.max_size_bytes,
            max_backups: cfg.max_backups,
            file: None,
            size: 0,
        };
        sink.reopen()?;
        Ok(sink)
    }

    fn reopen(&mut self) -> io::Result<()> {
        let mut opts = OpenOptions::new();
        opts.create(true).append(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let file = opts.open(&self.path)?;
        self.size = file.metadata()?.len();
        self.file = Some(BufWriter::with_capacity(64 * 1024, file));
        Ok(())
    }

    fn backup(&self, n: u32) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    fn rotate(&mut self) -> io::Result<()> {
        if let Some(mut f) = self.file.take() {
            f.flush()?;
        }
        if self.max_backups == 0 {
            remove_if_exists(&self.path)?;
        } else {
            for n in (1..self.max_backups).rev() {
                rename_if_exists(&self.backup(n), &self.backup(n + 1))?;
            }
            rename_if_exists(&self.path, &self.backup(1))?;
        }
        self.reopen()
    }
}

fn rename_if_exists(from: &Path, to: &Path) -> io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

impl LineSink for FileSink {
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        let len = line.len() as u64;
        if self.file.is_none() {
            // A previous write failed; try again with a fresh handle.
            self.reopen()?;
        }
        if self.max_size > 0 && self.size > 0 && self.size.saturating_add(len) > self.max_size {
            self.rotate()?;
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("not open"))?;
        match file.write_all(line) {
            Ok(()) => {
                self.size += len;
                Ok(())
            }
            Err(e) => {
                self.file = None;
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush().inspect_err(|_| self.file = None),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(path: PathBuf, max_size_bytes: u64, max_backups: u32) -> FileSinkConfig {
        FileSinkConfig {
            path,
            max_size_bytes,
            max_backups,
            buffer_events: 16,
        }
    }

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap_or_default()
    }

    #[test]
    fn rotates_by_size_and_keeps_max_backups() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut s = FileSink::open(&cfg(path.clone(), 20, 2)).unwrap();
        // Each line is 10 bytes: two lines per file.
        for i in 0..7 {
            s.write_line(format!("line-{i:03}\n").as_bytes()).unwrap();
        }
        s.flush().unwrap();
        assert_eq!(read(&path), "line-006\n");
        assert_eq!(read(&s.backup(1)), "line-004\nline-005\n");
        assert_eq!(read(&s.backup(2)), "line-002\nline-003\n");
        assert!(!s.backup(3).exists(), "only maxBackups files are kept");
    }

    #[test]
    fn appends_to_an_existing_file_and_counts_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        std::fs::write(&path, "old-line\n0123456789\n").unwrap(); // 20 bytes
        let mut s = FileSink::open(&cfg(path.clone(), 25, 1)).unwrap();
        s.write_line(b"new-line\n").unwrap();
        s.flush().unwrap();
        assert_eq!(read(&path), "new-line\n");
        assert_eq!(read(&s.backup(1)), "old-line\n0123456789\n");
    }

    #[test]
    fn zero_backups_truncates_and_oversized_lines_still_land() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut s = FileSink::open(&cfg(path.clone(), 8, 0)).unwrap();
        s.write_line(b"a-very-long-line\n").unwrap();
        s.write_line(b"b-very-long-line\n").unwrap();
        s.flush().unwrap();
        assert_eq!(read(&path), "b-very-long-line\n");
        assert!(!s.backup(1).exists());
    }

    #[cfg(unix)]
    #[test]
    fn file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        FileSink::open(&cfg(path.clone(), 0, 0)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn missing_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(FileSink::open(&cfg(dir.path().join("nope/audit.log"), 0, 0)).is_err());
    }
}
