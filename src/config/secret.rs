//! Secrets in the config: [`SecretSource`] is what the TOML says (`{ file = ".." }` or `{ env = ".." }`, never the
//! secret itself), and [`Secret`] is the loaded value, whose `Debug` prints `MASKED` so that it cannot reach a log
//! line. Used by `[nats]` (password, token, NKey seed) and `[[auth.keys]]` (HMAC secrets).

use std::{fmt, path::PathBuf};

use serde::{Deserialize, Serialize, Serializer};

use super::error::{ConfigError, invalid};

/// A secret value (password, HMAC key). `Debug` and `Display` never print it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself; call only where it is used, never to log.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MASKED")
    }
}

/// Where a secret comes from: `{ file = ".." }` (the file's text, trailing newline trimmed) or `{ env = ".." }` (an
/// environment variable). Exactly one of the two: anything else is refused when the file is parsed.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(try_from = "SecretTable")]
pub enum SecretSource {
    /// Read the secret from this file.
    File(PathBuf),
    /// Read the secret from this environment variable.
    Env(String),
}

/// The TOML form of a [`SecretSource`], read first so that a table naming both sources (or neither) is refused with
/// a message that says what to write.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretTable {
    file: Option<PathBuf>,
    env: Option<String>,
}

impl TryFrom<SecretTable> for SecretSource {
    type Error = &'static str;
    fn try_from(t: SecretTable) -> Result<Self, Self::Error> {
        match (t.file, t.env) {
            (Some(path), None) => Ok(SecretSource::File(path)),
            (None, Some(var)) => Ok(SecretSource::Env(var)),
            _ => Err("set exactly one of `file` or `env`"),
        }
    }
}

/// Written back in its TOML form (`{ file = ".." }` / `{ env = ".." }`): the source names where the secret is, never
/// the secret itself (`roomwire check-config --print`).
impl Serialize for SecretSource {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(1))?;
        match self {
            SecretSource::File(path) => map.serialize_entry("file", path)?,
            SecretSource::Env(var) => map.serialize_entry("env", var)?,
        }
        map.end()
    }
}

impl SecretSource {
    /// Loads the secret. `key` names the config key in errors.
    pub fn load(&self, key: &'static str) -> Result<Secret, ConfigError> {
        match self {
            SecretSource::File(path) => std::fs::read_to_string(path)
                .map(|s| Secret(s.trim_end_matches(['\r', '\n']).to_string()))
                .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display()))),
            SecretSource::Env(var) => std::env::var(var)
                .map(Secret)
                .map_err(|_| invalid(key, format!("environment variable {var} is not set"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_debug_is_masked() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "MASKED");
    }
}
