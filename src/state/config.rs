//! `state:` config types: the shared store's connection (`state.etcd`).
//!
//! Only the types and their defaults live here; [`EtcdConfig::validate`] is with the store it
//! configures (`state::etcd`).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::duration::GoDuration;

/// `state.etcd`: where the shared store lives.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EtcdConfig {
    /// Client URLs of the etcd members, `https://host:2379` (or `http://` for loopback tests).
    pub endpoints: Vec<String>,
    /// Every key the gateway writes starts with this (`/ztgate`): starts with `/`, no trailing `/`.
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    /// CA bundle etcd's serving certificates chain to; required for `https` endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate for etcd's `--client-cert-auth` (with `keyFile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Connect timeout, and the longest one attempt on one endpoint may take; a request is
    /// retried on the other endpoints and gives up after three times this.
    #[serde(default = "default_dial_timeout")]
    pub dial_timeout: GoDuration,
    /// How often the replica confirms, with a linearizable read on the member its watch is on,
    /// that the member has a quorum and the watch has delivered everything up to then.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval: GoDuration,
    /// How long after the last confirmation the replica keeps deciding from its last view.
    /// Past it, requests (and live streams) that need locks and posture fail closed with 503
    /// until etcd answers again. Not-ready (and quick 503s on writes) starts earlier, after
    /// `2 × heartbeatInterval + dialTimeout`.
    #[serde(default = "default_max_staleness")]
    pub max_staleness: GoDuration,
}

fn default_heartbeat() -> GoDuration {
    GoDuration(Duration::from_secs(1))
}

fn default_max_staleness() -> GoDuration {
    GoDuration(Duration::from_secs(30))
}

fn default_prefix() -> String {
    "/ztgate".into()
}

fn default_dial_timeout() -> GoDuration {
    GoDuration(Duration::from_secs(5))
}

impl EtcdConfig {
    /// Makes relative file paths relative to `base`.
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        for p in [&mut self.ca_file, &mut self.cert_file, &mut self.key_file]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }
}
