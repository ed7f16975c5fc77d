//! `[nats]`: the connection to NATS ([`NatsConfig`]): servers ([`OneOrMany`] URLs), credentials (as
//! [`SecretSource`]s, never inline), TLS toward NATS, timeouts, buffer bounds and lifecycle events.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::{
    error::{ConfigError, invalid},
    limits::LimitsConfig,
    secret::SecretSource,
};

/// One string or a list of strings (used for `nats.url`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A single value.
    One(String),
    /// Several values.
    Many(Vec<String>),
}

impl OneOrMany {
    /// All values as a list.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// `[nats]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL, or a list of them. Default `nats://127.0.0.1:4222`.
    pub url: OneOrMany,
    /// Client name shown by the NATS server. Default `roomwire`.
    pub name: String,
    /// Username (with `password`). Default none.
    pub user: Option<String>,
    /// Password source (`{ file = ".." }` or `{ env = ".." }`). Default none.
    pub password: Option<SecretSource>,
    /// Token source. Default none.
    pub token: Option<SecretSource>,
    /// `.creds` file (JWT + NKey). Default none.
    pub creds_file: Option<PathBuf>,
    /// NKey seed source (`{ file = ".." }` or `{ env = ".." }`), for servers with `nkey` users. Default none.
    pub nkey_seed: Option<SecretSource>,
    /// CA certificate(s) (PEM) the NATS server's certificate must chain to; setting it requires TLS. Default none
    /// (the system roots, when the server asks for TLS).
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for servers that verify clients (`verify: true`), with `tls_key_file`. Default none.
    pub tls_cert_file: Option<PathBuf>,
    /// Key of `tls_cert_file` (PEM). Default none.
    pub tls_key_file: Option<PathBuf>,
    /// Refuse a NATS server that does not offer TLS. Default false (true when `tls_ca_file` or a client certificate
    /// is set).
    pub tls_required: bool,
    /// Timeout of each connection attempt. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A client publish not accepted by NATS in this time is answered `unavailable`. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Messages buffered per room subscription between the NATS connection and the room's fan-out task; over it NATS
    /// reports a slow consumer and drops. Default 65536.
    pub subscription_capacity: usize,
    /// Commands (publishes, subscribes) buffered toward the NATS connection. Default 8192.
    pub client_capacity: usize,
    /// The NATS client sends a PING after this much silence from the server; after 3 unanswered intervals it drops
    /// the connection (gateway not ready, publishes `unavailable`, reconnect). A paused server is noticed within about
    /// 3 × this. Default `2s`.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// Bytes of client publishes (payload + subject + headers) handed to the NATS client and not yet written to its
    /// socket, over all connections. A publish waits for room here until `publish_timeout` (then `unavailable`); a
    /// single message larger than this is refused `too_large`. Default 8388608 (8 MiB).
    pub max_pending_bytes: usize,
    /// Subject prefix of lifecycle events (`<prefix>.connect`, `.disconnect`, `.join`, `.leave`).
    /// Default `roomwire.events`.
    pub events_prefix: String,
    /// Publish lifecycle events. Default true.
    pub events: bool,
    /// Act on backend commands published to `<control_prefix>.<command>` (`disconnect`, `unsubscribe`, `subscribe`,
    /// `revoke`; `docs/protocol.md`). Default true.
    pub control: bool,
    /// Subject prefix of backend commands. Must overlap no other prefix, and browsers must not be allowed to publish
    /// under it (`docs/security.md`). Default `roomwire.control`.
    pub control_prefix: String,
    /// Backend commands this gateway acts on per second (a burst of as many is allowed); the rest are dropped,
    /// counted and logged. Commands waiting to be handled are bounded like a room's (`subscription_capacity`).
    /// Default 1000.
    pub control_commands_per_second: u32,
    /// Room commands (`subscribe`, `unsubscribe`) waiting for one connection; past it further ones for that
    /// connection are dropped and counted. Default 16.
    pub control_max_pending_per_connection: usize,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: OneOrMany::One("nats://127.0.0.1:4222".into()),
            name: "roomwire".into(),
            user: None,
            password: None,
            token: None,
            creds_file: None,
            nkey_seed: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_required: false,
            connect_timeout: Duration::from_secs(5),
            publish_timeout: Duration::from_secs(5),
            subscription_capacity: 65_536,
            client_capacity: 8192,
            ping_interval: Duration::from_secs(2),
            max_pending_bytes: 8 * 1024 * 1024,
            events_prefix: "roomwire.events".into(),
            events: true,
            control: true,
            control_prefix: "roomwire.control".into(),
            control_commands_per_second: 1000,
            control_max_pending_per_connection: 16,
        }
    }
}

impl NatsConfig {
    /// Checks `[nats]`; `limits` because NATS must take the largest client message.
    pub fn validate(&self, limits: &LimitsConfig) -> Result<(), ConfigError> {
        if self.url.to_vec().is_empty() {
            return Err(invalid("nats.url", "at least one URL is required"));
        }
        if self.subscription_capacity == 0 {
            return Err(invalid("nats.subscription_capacity", "must be at least 1"));
        }
        if self.client_capacity == 0 {
            return Err(invalid("nats.client_capacity", "must be at least 1"));
        }
        if self.publish_timeout.is_zero() {
            return Err(invalid("nats.publish_timeout", "must be positive"));
        }
        if self.ping_interval.is_zero() {
            return Err(invalid("nats.ping_interval", "must be positive"));
        }
        if self.max_pending_bytes < limits.max_message_size || self.max_pending_bytes > u32::MAX as usize {
            return Err(invalid(
                "nats.max_pending_bytes",
                "must be between limits.max_message_size and 4294967295",
            ));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(invalid(
                "nats.tls_cert_file",
                "set both nats.tls_cert_file and nats.tls_key_file, or neither",
            ));
        }
        let methods = [
            self.user.is_some(),
            self.token.is_some(),
            self.creds_file.is_some(),
            self.nkey_seed.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return Err(invalid(
                "nats.user",
                "use one of user/password, token, creds_file or nkey_seed",
            ));
        }
        if self.password.is_some() && self.user.is_none() {
            return Err(invalid("nats.password", "needs `nats.user`"));
        }
        if !crate::room_name::valid_subject_prefix(&self.events_prefix) {
            return Err(invalid(
                "nats.events_prefix",
                "must be dot-separated tokens of [A-Za-z0-9_-]",
            ));
        }
        if !crate::room_name::valid_subject_prefix(&self.control_prefix) {
            return Err(invalid(
                "nats.control_prefix",
                "must be dot-separated tokens of [A-Za-z0-9_-]",
            ));
        }
        if self.control_commands_per_second == 0 {
            return Err(invalid("nats.control_commands_per_second", "must be at least 1"));
        }
        if self.control_max_pending_per_connection == 0 {
            return Err(invalid("nats.control_max_pending_per_connection", "must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::Config;

    #[test]
    fn nats_url_one_or_many() {
        let c =
            Config::parse("[auth]\nallow_anonymous = true\n[nats]\nurl = [\"nats://a:1\", \"nats://b:2\"]\n").unwrap();
        assert_eq!(c.nats.url.to_vec().len(), 2);
    }

    #[test]
    fn nats_hardening_keys_have_defaults_and_are_validated() {
        let c = Config::parse("[auth]\nallow_anonymous = true\n").unwrap();
        assert_eq!(c.nats.ping_interval, Duration::from_secs(2));
        assert_eq!(c.nats.max_pending_bytes, 8 * 1024 * 1024);
        assert_eq!(c.limits.max_json_depth, 32);
        assert_eq!(
            (
                c.rooms.max_rooms_per_user,
                c.rooms.room_creations_per_second,
                c.rooms.room_creations_burst
            ),
            (1000, 10, 100)
        );
        for (toml, key) in [
            ("[nats]\nping_interval = \"0s\"\n", "nats.ping_interval"),
            ("[nats]\nmax_pending_bytes = 1000\n", "nats.max_pending_bytes"),
            ("[nats]\nmax_pending_bytes = 4294967296\n", "nats.max_pending_bytes"),
            ("[limits]\nmax_json_depth = 1\n", "limits.max_json_depth"),
            ("[limits]\nmax_json_depth = 129\n", "limits.max_json_depth"),
            ("[rooms]\nmax_rooms_per_user = 0\n", "rooms.max_rooms_per_user"),
            (
                "[rooms]\nroom_creations_per_second = 0\n",
                "rooms.room_creations_per_second",
            ),
            ("[rooms]\nroom_creations_burst = 0\n", "rooms.room_creations_burst"),
        ] {
            let err = Config::parse(&format!("[auth]\nallow_anonymous = true\n{toml}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
    }
}
