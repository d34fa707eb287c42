//! `ztgate device report`: the posture facts of the local machine that can be read without
//! privileges, posted to the gateway over mTLS with the device certificate.
//!
//! Every fact is best effort: what cannot be detected is left out ("unknown"), never guessed.
//! Nothing here needs root; commands are run with a short timeout and their absence is fine.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, Request};
use http_body_util::{BodyExt, Full};

use super::SelfReport;
use crate::state::Posture;

/// The facts of this machine.
pub async fn local_posture() -> Posture {
    let mut p = Posture::default();
    if cfg!(target_os = "macos") {
        p.os = Some("macos".into());
        p.os_version = run("sw_vers", &["-productVersion"]).await;
        p.disk_encrypted = run("fdesetup", &["status"])
            .await
            .map(|s| s.contains("FileVault is On"));
        p.firewall = run(
            "/usr/libexec/ApplicationFirewall/socketfilterfw",
            &["--getglobalstate"],
        )
        .await
        .map(|s| s.contains("enabled"));
        p.screen_lock = None;
    } else if cfg!(target_os = "linux") {
        p.os = Some("linux".into());
        let os_release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
        p.os_version = os_release_field(&os_release, "PRETTY_NAME")
            .or_else(|| os_release_field(&os_release, "VERSION_ID"));
        p.disk_encrypted = linux_root_encrypted(Path::new("/"));
        p.firewall = linux_firewall();
        p.screen_lock = run(
            "gsettings",
            &["get", "org.gnome.desktop.screensaver", "lock-enabled"],
        )
        .await
        .and_then(|s| match s.as_str() {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        });
        if let Ok(k) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
            p.extra
                .insert("kernel".into(), serde_json::Value::String(k.trim().into()));
        }
    } else {
        p.os = Some(std::env::consts::OS.into());
    }
    p
}

/// Runs a command with a 3 s limit; its trimmed stdout when it succeeds.
async fn run(cmd: &str, args: &[&str]) -> Option<String> {
    let child = tokio::process::Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(3), child).await {
        Ok(Ok(out)) if out.status.success() => {
            Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        }
        _ => None,
    }
}

/// A `KEY=value` (optionally quoted) line of os-release(5).
pub fn os_release_field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix('=')?;
        let v = v.trim().trim_matches('"').trim_matches('\'');
        (!v.is_empty()).then(|| v.to_owned())
    })
}

/// Is the file system holding `path` on a dm-crypt (LUKS) device? Read from /proc/self/mountinfo
/// and /sys/block/dm-*/dm/uuid, which need no privileges. `None` when it cannot be told.
fn linux_root_encrypted(path: &Path) -> Option<bool> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_str()?;
    // Field 5 is the mount point; after " - " come fs type and source.
    let line = mountinfo
        .lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some(want))?;
    let (_, tail) = line.split_once(" - ")?;
    let mut tail = tail.split(' ');
    let fstype = tail.next()?;
    let source = tail.next()?;
    if matches!(fstype, "overlay" | "tmpfs" | "zfs" | "btrfs" | "fuse") && !source.starts_with('/')
    {
        return None;
    }
    let dev = std::fs::canonicalize(source).ok()?;
    let name = dev.file_name()?.to_str()?.to_owned();
    Some(dm_is_crypt(&name, 0))
}

/// Whether block device `name` is dm-crypt, or a device-mapper device stacked on one.
fn dm_is_crypt(name: &str, depth: u8) -> bool {
    if depth > 8 {
        return false;
    }
    let base = PathBuf::from("/sys/block").join(name);
    if let Ok(uuid) = std::fs::read_to_string(base.join("dm/uuid")) {
        if uuid.starts_with("CRYPT-") {
            return true;
        }
    }
    std::fs::read_dir(base.join("slaves"))
        .map(|rd| {
            rd.flatten()
                .any(|e| dm_is_crypt(&e.file_name().to_string_lossy(), depth + 1))
        })
        .unwrap_or(false)
}

/// ufw's or firewalld's configured state; `None` when neither is installed.
fn linux_firewall() -> Option<bool> {
    if let Ok(conf) = std::fs::read_to_string("/etc/ufw/ufw.conf") {
        return Some(os_release_field(&conf, "ENABLED").is_some_and(|v| v == "yes"));
    }
    if Path::new("/usr/lib/systemd/system/firewalld.service").exists() {
        return Some(
            Path::new("/etc/systemd/system/multi-user.target.wants/firewalld.service").exists(),
        );
    }
    None
}

/// Where and how to post a report.
pub struct ReportTarget {
    /// The gateway's URL, e.g. `https://ztgate.example.com:8443`.
    pub server: String,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Why a report was not stored. The message names the file or the URL it is about.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// A file of the device's TLS material could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The gateway's CA bundle is unusable.
    #[error(transparent)]
    Ca(#[from] crate::tls::client::ClientTlsError),
    /// The device certificate or key is unusable.
    #[error(transparent)]
    Certificate(#[from] crate::tls::TlsError),
    /// The certificate and key do not make a client identity.
    #[error("device certificate and key: {0}")]
    ClientAuth(#[source] rustls::Error),
    /// The report could not be written as JSON.
    #[error("{0}")]
    Encode(#[source] serde_json::Error),
    /// The request could not be built.
    #[error("{url}: {source}")]
    Request {
        url: String,
        #[source]
        source: http::Error,
    },
    /// The gateway did not answer in time.
    #[error("{url}: no answer within 30s")]
    Timeout { url: String },
    /// The connection or the exchange failed; the message carries the whole chain of causes,
    /// so the error has no source (a chain printer would say them twice).
    #[error("{url}: {}", crate::util::chain::error_chain(cause))]
    Connect {
        url: String,
        cause: hyper_util::client::legacy::Error,
    },
    /// The answer broke off.
    #[error("{url}: {source}")]
    Body {
        url: String,
        #[source]
        source: hyper::Error,
    },
    /// The gateway answered with an error; `message` is its `Status` message (or its body).
    #[error("the gateway refused the report ({status}): {message}")]
    Refused {
        status: http::StatusCode,
        message: String,
    },
}

/// Posts `report` to `{server}/v1/devices/posture` with the device certificate; returns the
/// stored record as the gateway answered it.
pub async fn post_report(
    target: &ReportTarget,
    report: &SelfReport,
) -> Result<String, ReportError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| ReportError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    let roots = crate::tls::client::roots_from_pem(&read(&target.ca_file)?)?;
    let certs = crate::tls::pem::certs_from_pem(&target.cert_file, &read(&target.cert_file)?)?;
    let key = crate::tls::pem::key_from_pem(&target.key_file, &read(&target.key_file)?)?;
    let tls = crate::tls::client::config_builder(roots)?
        .with_client_auth_cert(certs, key)
        .map_err(ReportError::ClientAuth)?;
    let client = crate::tls::client::https_client::<Full<Bytes>>(
        tls,
        Duration::from_secs(10),
        Duration::from_secs(1),
        0,
    );
    let url = format!("{}{}", target.server.trim_end_matches('/'), super::API_PATH);
    let body = serde_json::to_vec(report).map_err(ReportError::Encode)?;
    let req = Request::post(&url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|source| ReportError::Request {
            url: url.clone(),
            source,
        })?;
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .map_err(|_| ReportError::Timeout { url: url.clone() })?
        .map_err(|cause| ReportError::Connect {
            url: url.clone(),
            cause,
        })?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|source| ReportError::Body {
            url: url.clone(),
            source,
        })?
        .to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if status.is_success() {
        Ok(text)
    } else {
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
            .unwrap_or(text);
        Err(ReportError::Refused { status, message })
    }
}

/// A self-report of this machine, collected now.
pub async fn collect_report() -> SelfReport {
    SelfReport {
        device_id: None,
        attributes: local_posture().await,
        collected_at: Some(SystemTime::now()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_fields_are_read_quoted_or_not() {
        let t =
            "NAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nID=debian\nPRETTY_NAME='Debian 12'\n";
        assert_eq!(os_release_field(t, "VERSION_ID").as_deref(), Some("12"));
        assert_eq!(os_release_field(t, "ID").as_deref(), Some("debian"));
        assert_eq!(
            os_release_field(t, "PRETTY_NAME").as_deref(),
            Some("Debian 12")
        );
        assert_eq!(
            os_release_field(t, "NAME").as_deref(),
            Some("Debian GNU/Linux")
        );
        assert_eq!(os_release_field(t, "VERSION"), None);
    }

    #[tokio::test]
    async fn the_local_machine_reports_its_os() {
        let p = local_posture().await;
        assert_eq!(p.os.as_deref(), Some(std::env::consts::OS));
        #[cfg(target_os = "linux")]
        assert!(p.os_version.is_some(), "/etc/os-release is readable here");
    }
}
