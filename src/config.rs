//! Gateway configuration: the TOML file's schema, its defaults (in one place per section: the `Default` impls in
//! `config/`) and [`Config::validate`], which turns a parsed file into values the rest of the gateway can trust.
//!
//! Every section uses `deny_unknown_fields`, so a typo is a startup error that names the key. Every bound the gateway
//! enforces (queues, maps, limiters, timeouts) is a field here; `docs/configuration.md` and the shipped
//! `config/gateway.toml` document each one with its default. Secrets are never read from the TOML itself: the file
//! names a file or an environment variable, and the loaded value is a [`Secret`] whose `Debug` prints `MASKED`.
//!
//! One file per section group under `config/`: `server` (`[server]`, `[tls]`, `[admin]`), `nats`, `rooms`, `limits`,
//! `auth` (keys, algorithms, permissions), `history`, `presence`, `rpc`, `compression` and `log`, plus the shared leaves `error` ([`ConfigError`]) and
//! `secret` ([`Secret`], [`SecretSource`]). This file holds the whole [`Config`], its loading and the order of the
//! checks, and re-exports every public type, so the rest of the crate names them `crate::config::X`.

mod auth;
mod compression;
mod error;
mod history;
mod limits;
mod log;
mod nats;
mod presence;
mod rooms;
mod rpc;
mod secret;
mod server;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use self::{
    auth::{
        AuthConfig, JwtKey, KeyMaterial, Permissions, SUPPORTED_ALGORITHMS, algorithm_name, is_supported_algorithm,
    },
    compression::CompressionConfig,
    error::ConfigError,
    history::HistoryConfig,
    limits::LimitsConfig,
    log::{LogConfig, LogFormat},
    nats::{NatsConfig, OneOrMany},
    presence::PresenceConfig,
    rooms::{RoomPolicy, RoomsConfig},
    rpc::RpcConfig,
    secret::{Secret, SecretSource},
    server::{AdminConfig, ForwardedHeader, ServerConfig, TlsConfig},
};
pub use crate::outbox::Overflow;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listener, HTTP and shutdown settings.
    pub server: ServerConfig,
    /// TLS termination.
    pub tls: TlsConfig,
    /// Connection to NATS.
    pub nats: NatsConfig,
    /// Room naming, subject mapping and overflow policies.
    pub rooms: RoomsConfig,
    /// Per-connection bounds: message sizes, queues, rates.
    pub limits: LimitsConfig,
    /// Authentication and default permissions.
    pub auth: AuthConfig,
    /// Room history in JetStream and missed-message recovery (`docs/history.md`).
    pub history: HistoryConfig,
    /// Room presence across gateways in a JetStream KV bucket (`docs/presence.md`).
    pub presence: PresenceConfig,
    /// Browser calls to NATS services (`rpc` op).
    pub rpc: RpcConfig,
    /// permessage-deflate: negotiation and compression (`docs/protocol.md`).
    pub compression: CompressionConfig,
    /// Log format and level.
    pub log: LogConfig,
    /// The admin listener (metrics, health, `/connz`), off unless `listen` is set.
    pub admin: AdminConfig,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges and consistency, section by section in file order (so the first mistake in the file is the
    /// one reported). Messages name the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        self.nats.validate(&self.limits)?;
        self.rooms.validate()?;
        self.limits.validate()?;
        self.history.validate(&self.nats)?;
        self.presence.validate()?;
        self.auth.validate()?;
        if self.rpc.enabled {
            if self.rpc.max_inflight_per_connection > self.limits.max_inflight_publishes {
                return Err(ConfigError::Invalid {
                    key: "rpc.max_inflight_per_connection",
                    message: "must be at most limits.max_inflight_publishes (calls share that bound)".into(),
                });
            }
            self.rpc.validate(&[
                ("rooms.subject_prefix", &self.rooms.subject_prefix),
                ("nats.events_prefix", &self.nats.events_prefix),
                ("history.live_prefix", &self.history.live_prefix),
            ])?;
        }
        self.check_prefixes()?;
        self.compression.validate()?;
        self.log.validate()?;
        self.admin.validate(&self.server)
    }
}

impl Config {
    /// Refuses a configuration in which two subject prefixes in use overlap (equal, or one a token-wise prefix of
    /// the other): a browser's room, call or event could then reach a backend command, or the reverse. The key
    /// named is the later one in this list.
    fn check_prefixes(&self) -> Result<(), ConfigError> {
        let mut used: Vec<(&'static str, &str)> = vec![
            ("rooms.subject_prefix", &self.rooms.subject_prefix),
            ("nats.events_prefix", &self.nats.events_prefix),
        ];
        if self.history.enabled {
            used.push(("history.live_prefix", &self.history.live_prefix));
        }
        if self.rpc.enabled {
            used.push(("rpc.subject_prefix", &self.rpc.subject_prefix));
        }
        if self.nats.control {
            used.push(("nats.control_prefix", &self.nats.control_prefix));
        }
        for (i, (key, prefix)) in used.iter().enumerate() {
            if let Some((other, _)) = used[..i]
                .iter()
                .find(|(_, p)| crate::room_name::prefixes_overlap(p, prefix))
            {
                return Err(ConfigError::Invalid {
                    key,
                    message: format!("overlaps `{other}`; choose a prefix of its own"),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_prefixes_are_refused() {
        let base = "[auth]\nallow_anonymous = true\n";
        for (extra, key) in [
            ("[nats]\ncontrol_prefix = \"rooms\"\n", "nats.control_prefix"),
            (
                "[nats]\ncontrol_prefix = \"roomwire.events.ctl\"\n",
                "nats.control_prefix",
            ),
            ("[nats]\ncontrol_prefix = \"roomwire\"\n", "nats.control_prefix"),
            ("[nats]\nevents_prefix = \"rooms.ev\"\n", "nats.events_prefix"),
            (
                "[rpc]\nenabled = true\nsubject_prefix = \"roomwire.control\"\n",
                "prefix",
            ),
        ] {
            let err = Config::parse(&format!("{base}{extra}")).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains("overlaps"), "{extra}: {err}");
        }
        // Turned off, the control prefix is not in use.
        assert!(Config::parse(&format!("{base}[nats]\ncontrol = false\ncontrol_prefix = \"rooms\"\n")).is_ok());
        // A shared first token is no overlap.
        assert!(Config::parse(&format!("{base}[nats]\ncontrol_prefix = \"roomwire.ctl\"\n")).is_ok());
    }

    #[test]
    fn empty_file_gets_defaults_but_needs_auth() {
        let err = Config::parse("").unwrap_err().to_string();
        assert!(err.contains("auth.keys"), "{err}");
        let c = Config::parse("[auth]\nallow_anonymous = true\n").unwrap();
        assert_eq!(c.server.listen.port(), 8443);
        assert_eq!(c.rooms.subject_prefix, "rooms");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[server]\nlisten = \"127.0.0.1:1\"\nlistne = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listne"), "{err}");
    }

    #[test]
    fn bad_value_is_named() {
        let err = Config::parse("[auth]\nallow_anonymous = true\n[limits]\nmax_pending_messages = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("limits.max_pending_messages"), "{err}");
    }
}
