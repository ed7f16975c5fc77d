//! `[presence]`: who is in a room, across gateways, kept in a NATS KV bucket (`docs/presence.md`):
//! [`PresenceConfig`], its defaults and its checks.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, invalid};
use crate::room_pattern::RoomPattern;

/// `[presence]`: room presence in a JetStream KV bucket, one key per (room, gateway instance). See
/// `docs/presence.md`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// Presence (the `presence` and `presence_stats` ops, `member_joined`/`member_left` events) for rooms matching
    /// `rooms`. Needs JetStream; without it the gateway starts and answers presence ops `unavailable`. Default false.
    pub enabled: bool,
    /// Room patterns with presence. Default `["*"]`.
    pub rooms: Vec<RoomPattern>,
    /// The KV bucket. Default `ROOMWIRE_PRESENCE`.
    pub bucket: String,
    /// A gateway's entry for a room expires this long after its last write (the bucket's `max_age`); each gateway
    /// rewrites its entries every `ttl / 3`. Default `30s`; at least `1s`.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// The bucket's replicas (1, 3 or 5 in a cluster). Default 1.
    pub replicas: usize,
    /// Create or update the bucket at start. Off: the bucket must exist. Default true.
    pub manage_bucket: bool,
    /// Above this many connections in a room (over all gateways), only counts are kept and served: no member
    /// lists, no `member_joined`/`member_left` events. Also bounds what one gateway writes and reads per entry.
    /// Default 1000.
    pub max_members: usize,
    /// `presence` and `presence_stats` reads of rooms this gateway holds no member of, at once, gateway-wide: each
    /// costs a short-lived JetStream consumer, so a client cannot make the gateway open one per request at will.
    /// A read that finds no slot within its 2 s deadline is answered `unavailable`. Default 16.
    pub max_concurrent_reads: usize,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            rooms: vec![RoomPattern::new("*")],
            bucket: "ROOMWIRE_PRESENCE".into(),
            ttl: Duration::from_secs(30),
            replicas: 1,
            manage_bucket: true,
            max_members: 1000,
            max_concurrent_reads: 16,
        }
    }
}

impl PresenceConfig {
    /// Whether `room` has presence.
    pub fn covers(&self, room: &str) -> bool {
        self.enabled && self.rooms.iter().any(|p| p.matches(room))
    }

    /// Checks `[presence]` (only when enabled; a disabled section is never used).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        if self.rooms.is_empty() {
            return Err(invalid(
                "presence.rooms",
                "list at least one room pattern, or set enabled = false",
            ));
        }
        if self.bucket.is_empty()
            || !self
                .bucket
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid("presence.bucket", "use 1+ characters from [A-Za-z0-9_-]"));
        }
        if self.ttl < Duration::from_secs(1) || self.ttl > Duration::from_secs(24 * 3600) {
            return Err(invalid("presence.ttl", "must be between 1s and 24h"));
        }
        if self.max_concurrent_reads == 0 {
            return Err(invalid("presence.max_concurrent_reads", "must be at least 1"));
        }
        if !matches!(self.replicas, 1..=5) {
            return Err(invalid("presence.replicas", "must be between 1 and 5"));
        }
        if !(1..=100_000).contains(&self.max_members) {
            return Err(invalid("presence.max_members", "must be between 1 and 100000"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn parse(section: &str) -> Result<Config, String> {
        Config::parse(&format!("[auth]\nallow_anonymous = true\n[presence]\n{section}")).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_the_contract() {
        let c = parse("").expect("defaults");
        let p = &c.presence;
        assert!(!p.enabled);
        assert_eq!(p.rooms.len(), 1);
        assert!(p.rooms[0].matches("anything"));
        assert_eq!(p.bucket, "ROOMWIRE_PRESENCE");
        assert_eq!(p.ttl, std::time::Duration::from_secs(30));
        assert_eq!((p.replicas, p.manage_bucket, p.max_members), (1, true, 1000));
    }

    #[test]
    fn every_bad_value_names_its_key() {
        for (section, key) in [
            ("enabled = true\nrooms = []", "presence.rooms"),
            ("enabled = true\nbucket = \"a.b\"", "presence.bucket"),
            ("enabled = true\nttl = \"100ms\"", "presence.ttl"),
            ("enabled = true\nreplicas = 2\nreplicas = 7", "replicas"),
            ("enabled = true\nreplicas = 7", "presence.replicas"),
            ("enabled = true\nmax_members = 0", "presence.max_members"),
            ("enabled = true\nmax_member = 3", "max_member"),
        ] {
            let err = parse(section).expect_err(section);
            assert!(err.contains(key), "{section}: {err}");
        }
        assert!(parse("enabled = true\nttl = \"2s\"\nrooms = [\"chat-*\"]").is_ok());
    }
}
