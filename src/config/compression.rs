//! `[compression]`: permessage-deflate (RFC 7692, issue 27): [`CompressionConfig`], its defaults and its checks.

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, invalid};

/// `[compression]`: whether the gateway accepts a client's permessage-deflate offer, and how it compresses.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionConfig {
    /// Whether a client's `permessage-deflate` offer is accepted. A client that offers nothing (or when this is
    /// false) gets uncompressed frames only. Default true.
    pub enabled: bool,
    /// Messages (room messages, replies) with a shorter payload go uncompressed (RSV1 clear) to every client.
    /// Default 256 bytes.
    pub min_size: usize,
    /// zlib compression level, 1 (fastest) to 9 (smallest). Each room message is compressed once for all its
    /// members, whatever the level. Default 1.
    pub level: u8,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            min_size: 256,
            level: 1,
        }
    }
}

impl CompressionConfig {
    /// Checks `[compression]`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=9).contains(&self.level) {
            return Err(invalid("compression.level", "must be from 1 (fastest) to 9 (smallest)"));
        }
        Ok(())
    }

    /// What the compressing paths need (`crate::deflate::Settings`).
    pub fn settings(&self) -> crate::deflate::Settings {
        crate::deflate::Settings {
            min_size: self.min_size,
            level: self.level,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_level_range() {
        let c = CompressionConfig::default();
        assert!(c.enabled);
        assert_eq!((c.min_size, c.level), (256, 1));
        assert!(c.validate().is_ok());
        for level in [0, 10] {
            let e = CompressionConfig { level, ..c.clone() }
                .validate()
                .unwrap_err()
                .to_string();
            assert!(e.contains("compression.level"), "{e}");
        }
    }
}
