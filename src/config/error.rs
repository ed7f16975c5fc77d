//! The error every config step returns ([`ConfigError`]) and [`invalid`], the one way the section checks build the
//! "invalid value" case, so that each message names its dotted key. A leaf: the other config files import it, it
//! imports none of them.

use std::path::PathBuf;

/// Errors from loading or validating a configuration. Each message names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// Path that failed.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key or a wrong type (toml's message names the key).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// Path that failed.
        path: PathBuf,
        /// toml's description, which names the key.
        message: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid value for `{key}`: {message}")]
    Invalid {
        /// Dotted key, e.g. `limits.max_pending_messages`.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// A [`ConfigError::Invalid`] for `key` (the dotted key, e.g. `limits.max_pending_messages`).
pub(super) fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}
