//! `[history]`: which rooms keep history in a JetStream stream, the stream's limits, and the bounds of recovery,
//! `history` reads and the replay cache ([`HistoryConfig`]). Checked against `[nats]`, whose subscription capacity
//! a replay batch must stay below.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    error::{ConfigError, invalid},
    nats::NatsConfig,
};
use crate::room_pattern::RoomPattern;

/// `[history]`: which rooms keep history in a JetStream stream, the stream's limits, and the bounds of recovery and
/// `history` reads. See `docs/history.md`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// History for rooms matching `rooms`. Default false.
    pub enabled: bool,
    /// Room patterns that have history. Default `["*"]`.
    pub rooms: Vec<RoomPattern>,
    /// The JetStream stream over the room subjects. Default `ROOMWIRE`.
    pub stream: String,
    /// The stream's `max_msgs_per_subject`: messages kept per room. Default 1000.
    pub max_messages_per_room: u32,
    /// The stream's `max_age`. Default `24h`.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// The stream's replicas (1, 3 or 5 in a cluster). Default 1.
    pub replicas: usize,
    /// The most messages replayed on one recovering join; more missing answers `recovered:false`. Default 1000.
    pub max_recover: usize,
    /// Create or update the stream at start. Off: the stream must exist and match, or the gateway does not start.
    /// Default true.
    pub manage_stream: bool,
    /// Subject prefix the stream republishes stored room messages under (`<live_prefix>.<subject_prefix>.<room>`);
    /// the gateway's live subscription of a history room. Default `roomwire.live`.
    pub live_prefix: String,
    /// The stream's duplicate window: a publish retried with the same message id within it is stored once.
    /// Default `2m`.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Time JetStream gets to answer a recovering join, a join's last sequence or a `history` request. Default `2s`.
    #[serde(with = "humantime_serde")]
    pub recover_timeout: Duration,
    /// Cap of a `history` request's `limit`. Default 100.
    pub max_history_limit: usize,
    /// Payload bytes in one `history` answer; past it the oldest messages are left out. Default 262144.
    pub max_history_bytes: usize,
    /// Live messages held for one member while its recovery is replayed; over it the replay catches up from the
    /// stream again. Default 1000.
    pub max_held: usize,
    /// Recovering joins and `history` requests reading JetStream at once, over all connections. One more waits for a
    /// slot until `recover_timeout` (then `recovered:false`, or `unavailable`). A connection reads one at a time: its
    /// reader waits for the answer, so it cannot multiply this. Default 256.
    pub max_concurrent_reads: usize,
    /// How often the stream's identity (the epoch) is checked, so a recreated stream is noticed. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub epoch_refresh: Duration,
    /// Bytes of recently read history cached to serve recovery storms (`docs/history.md`). Default 8388608.
    pub replay_cache_bytes: usize,
    /// Rooms in that cache. Default 1024.
    pub replay_cache_rooms: usize,
    /// How long a cached range is reused. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub replay_cache_ttl: Duration,
    /// JetStream reads in flight at once, over all rooms. Default 64.
    pub replay_max_inflight: usize,
    /// Messages per direct-get batch. Default 256 (below `nats.subscription_capacity`).
    pub replay_batch: usize,
    /// Bytes per direct-get batch reply. Default 1048576.
    pub replay_batch_bytes: usize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            rooms: vec![RoomPattern::new("*")],
            stream: "ROOMWIRE".into(),
            max_messages_per_room: 1000,
            max_age: Duration::from_secs(24 * 3600),
            replicas: 1,
            max_recover: 1000,
            manage_stream: true,
            live_prefix: "roomwire.live".into(),
            duplicate_window: Duration::from_secs(120),
            recover_timeout: Duration::from_secs(2),
            max_history_limit: 100,
            max_history_bytes: 256 * 1024,
            max_held: 1000,
            max_concurrent_reads: 256,
            epoch_refresh: Duration::from_secs(10),
            replay_cache_bytes: 8 * 1024 * 1024,
            replay_cache_rooms: 1024,
            replay_cache_ttl: Duration::from_secs(5),
            replay_max_inflight: 64,
            replay_batch: 256,
            replay_batch_bytes: 1024 * 1024,
        }
    }
}

impl HistoryConfig {
    /// Whether `room` keeps history.
    pub fn covers(&self, room: &str) -> bool {
        self.enabled && self.rooms.iter().any(|p| p.matches(room))
    }

    /// Checks `[history]` (only when enabled; a disabled section is never used).
    pub fn validate(&self, nats: &NatsConfig) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        let token_ok =
            |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !token_ok(&self.stream) {
            return Err(invalid("history.stream", "use 1+ characters from [A-Za-z0-9_-]"));
        }
        if self.live_prefix.is_empty() || !self.live_prefix.split('.').all(token_ok) {
            return Err(invalid(
                "history.live_prefix",
                "use dot-separated tokens of [A-Za-z0-9_-]",
            ));
        }
        if self.rooms.is_empty() {
            return Err(invalid(
                "history.rooms",
                "list at least one room pattern, or set enabled = false",
            ));
        }
        if self.max_messages_per_room == 0 {
            return Err(invalid("history.max_messages_per_room", "must be at least 1"));
        }
        if self.max_age.is_zero() || self.duplicate_window.is_zero() || self.duplicate_window > self.max_age {
            return Err(invalid(
                "history.duplicate_window",
                "max_age and duplicate_window must be positive, duplicate_window <= max_age",
            ));
        }
        if !matches!(self.replicas, 1..=5) {
            return Err(invalid("history.replicas", "must be between 1 and 5"));
        }
        for (key, value) in [
            ("history.max_recover", self.max_recover),
            ("history.max_history_limit", self.max_history_limit),
            ("history.max_history_bytes", self.max_history_bytes),
            ("history.max_held", self.max_held),
            ("history.max_concurrent_reads", self.max_concurrent_reads),
            ("history.replay_cache_rooms", self.replay_cache_rooms),
            ("history.replay_max_inflight", self.replay_max_inflight),
            ("history.replay_batch", self.replay_batch),
            ("history.replay_batch_bytes", self.replay_batch_bytes),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.replay_batch >= nats.subscription_capacity {
            return Err(invalid(
                "history.replay_batch",
                "must be below nats.subscription_capacity",
            ));
        }
        if self.recover_timeout.is_zero() || self.epoch_refresh.is_zero() {
            return Err(invalid(
                "history.recover_timeout",
                "recover_timeout and epoch_refresh must be positive",
            ));
        }
        Ok(())
    }
}
