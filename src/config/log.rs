//! `[log]`: the log format and level ([`LogConfig`]); the level is checked at load so that a typo is an error rather
//! than a silent `info`.

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, invalid};

/// `[log]`: how the gateway logs (through `tracing`, to stdout).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `"human"` (one line per event, for terminals and journald) or `"json"` (one JSON object per line, for log
    /// pipelines). Default `"human"`.
    pub format: LogFormat,
    /// The level filter, in `RUST_LOG` syntax (`"info"`, `"roomwire=debug,info"`). `RUST_LOG`, when set, wins.
    /// Default `"info"`.
    pub level: Option<String>,
}

/// `log.format`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

impl LogConfig {
    /// Checks `[log]`: the level must parse (a typo would otherwise silently log at `info`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(level) = &self.level {
            tracing_subscriber::EnvFilter::try_new(level)
                .map_err(|e| invalid("log.level", format!("{level:?}: {e}")))?;
        }
        Ok(())
    }
}
