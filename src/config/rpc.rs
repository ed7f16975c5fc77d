//! `[rpc]`: browser calls to NATS services (issue 25): [`RpcConfig`], its defaults and its checks.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, invalid};

/// `[rpc]`: the `rpc` op, a NATS request on `<subject_prefix>.<method>`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RpcConfig {
    /// Whether the `rpc` op is served. Default false.
    pub enabled: bool,
    /// Method `M` is requested on `<subject_prefix>.M`. Default `rpc`.
    pub subject_prefix: String,
    /// Deadline of a call without `timeout_ms`. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Cap of a client's `timeout_ms`. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub max_timeout: Duration,
    /// Calls awaiting their answer on one connection; one more is `rate_limited`. Default 16.
    pub max_inflight_per_connection: usize,
}

impl Default for RpcConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            subject_prefix: "rpc".into(),
            timeout: Duration::from_secs(5),
            max_timeout: Duration::from_secs(30),
            max_inflight_per_connection: 16,
        }
    }
}

use crate::room_name::prefixes_overlap as overlaps;

impl RpcConfig {
    /// Checks `[rpc]` against the other live prefixes (`(key, prefix)` pairs).
    pub fn validate(&self, others: &[(&str, &str)]) -> Result<(), ConfigError> {
        if !crate::room_name::valid_subject_prefix(&self.subject_prefix) {
            return Err(invalid(
                "rpc.subject_prefix",
                "use dot-separated tokens of [A-Za-z0-9_-]",
            ));
        }
        if let Some((key, _)) = others.iter().find(|(_, p)| overlaps(&self.subject_prefix, p)) {
            return Err(invalid(
                "rpc.subject_prefix",
                format!("overlaps `{key}`; choose a prefix of its own"),
            ));
        }
        if self.timeout.is_zero() {
            return Err(invalid("rpc.timeout", "must be more than 0"));
        }
        if self.max_timeout < self.timeout {
            return Err(invalid("rpc.max_timeout", "must be at least `rpc.timeout`"));
        }
        if self.max_inflight_per_connection == 0 {
            return Err(invalid("rpc.max_inflight_per_connection", "must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overlaps() {
        let c = RpcConfig::default();
        assert!(!c.enabled);
        assert!(c.validate(&[("rooms.subject_prefix", "rooms")]).is_ok());
        assert!(c.validate(&[("rooms.subject_prefix", "rpc")]).is_err());
        assert!(c.validate(&[("rooms.subject_prefix", "rpc.rooms")]).is_err());
        assert!(c.validate(&[("rooms.subject_prefix", "rpcx")]).is_ok());
        let bad = RpcConfig {
            max_inflight_per_connection: 0,
            ..RpcConfig::default()
        };
        let e = bad.validate(&[]).unwrap_err().to_string();
        assert!(e.contains("rpc.max_inflight_per_connection"), "{e}");
    }
}
