//! `[rooms]`: room-to-subject mapping, the caps on rooms per connection, user and gateway, and the overflow policy
//! of each room ([`RoomsConfig::overflow_for`]: the first matching `[[rooms.policy]]`, else `[rooms] overflow`). The
//! policy type itself, `Overflow`, lives with the outbox that applies it.

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, invalid};
use crate::{outbox::Overflow, room_pattern::RoomPattern};

/// One `[[rooms.policy]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoomPolicy {
    /// Room pattern: exact name, or with `*` wildcards (`ticker-*`).
    pub pattern: RoomPattern,
    /// Overflow policy for matching rooms.
    pub overflow: Overflow,
}

/// `[rooms]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoomsConfig {
    /// Room `R` maps to subject `<subject_prefix>.R`. Default `rooms`.
    pub subject_prefix: String,
    /// Overflow policy of rooms no `[[rooms.policy]]` matches. Default `disconnect`.
    pub overflow: Overflow,
    /// Per-room-pattern overflow policies, first match wins.
    pub policy: Vec<RoomPolicy>,
    /// Rooms one connection may be in at once; over it: `too_many_rooms`. Default 100.
    pub max_rooms_per_connection: usize,
    /// Distinct rooms (NATS subscriptions) this gateway holds at once; over it: `unavailable`. Default 100000.
    pub max_rooms: usize,
    /// Distinct rooms one user (one address, IPv6 /64, for anonymous clients) is in at once, over all its
    /// connections; over it: `too_many_rooms`. Default 1000.
    pub max_rooms_per_user: usize,
    /// Sustained rate at which one user (or address) may create rooms on this gateway (a join that makes a new NATS
    /// subscription; joining a room that exists already is free); over it: `rate_limited`. Default 10.
    pub room_creations_per_second: u32,
    /// Burst of room creations above the sustained rate. Default 100.
    pub room_creations_burst: u32,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        Self {
            subject_prefix: "rooms".into(),
            overflow: Overflow::Disconnect,
            policy: Vec::new(),
            max_rooms_per_connection: 100,
            max_rooms: 100_000,
            max_rooms_per_user: 1000,
            room_creations_per_second: 10,
            room_creations_burst: 100,
        }
    }
}

impl RoomsConfig {
    /// The overflow policy for `room`.
    pub fn overflow_for(&self, room: &str) -> Overflow {
        self.policy
            .iter()
            .find(|p| p.pattern.matches(room))
            .map_or(self.overflow, |p| p.overflow)
    }

    /// Checks `[rooms]` and its `[[rooms.policy]]` entries.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !crate::room_name::valid_subject_prefix(&self.subject_prefix) {
            return Err(invalid(
                "rooms.subject_prefix",
                "must be dot-separated tokens of [A-Za-z0-9_-]",
            ));
        }
        if self.policy.iter().any(|p| p.pattern.as_str().is_empty()) {
            return Err(invalid("rooms.policy.pattern", "must not be empty"));
        }
        for (key, v) in [
            ("rooms.max_rooms_per_connection", self.max_rooms_per_connection),
            ("rooms.max_rooms", self.max_rooms),
            ("rooms.max_rooms_per_user", self.max_rooms_per_user),
            (
                "rooms.room_creations_per_second",
                self.room_creations_per_second as usize,
            ),
            ("rooms.room_creations_burst", self.room_creations_burst as usize),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, Overflow};

    #[test]
    fn policies_first_match_wins() {
        // Overlapping patterns, each of which also matches rooms the later ones match: the order decides.
        let c = Config::parse(
            "[auth]\nallow_anonymous = true\n[rooms]\noverflow = \"drop_newest\"\n\
             [[rooms.policy]]\npattern = \"ticker-btc*\"\noverflow = \"drop_oldest\"\n\
             [[rooms.policy]]\npattern = \"ticker-*\"\noverflow = \"latest\"\n\
             [[rooms.policy]]\npattern = \"*-btc\"\noverflow = \"disconnect\"\n\
             [[rooms.policy]]\npattern = \"*\"\noverflow = \"latest\"\n",
        )
        .unwrap();
        assert_eq!(c.rooms.policy.len(), 4);
        // Matches all four: the first wins.
        assert_eq!(c.rooms.overflow_for("ticker-btc"), Overflow::DropOldest);
        // Matches the 2nd and 4th (and the 3rd's `*-btc` does not apply): the 2nd wins.
        assert_eq!(c.rooms.overflow_for("ticker-eth"), Overflow::Latest);
        // Matches the 3rd and 4th: the 3rd wins over the catch-all after it.
        assert_eq!(c.rooms.overflow_for("chat-btc"), Overflow::Disconnect);
        // Only the catch-all.
        assert_eq!(c.rooms.overflow_for("lobby"), Overflow::Latest);

        // Without a catch-all, rooms no pattern matches get `[rooms] overflow`, not a policy's.
        let c = Config::parse(
            "[auth]\nallow_anonymous = true\n[rooms]\noverflow = \"drop_newest\"\n\
             [[rooms.policy]]\npattern = \"ticker-*\"\noverflow = \"latest\"\n\
             [[rooms.policy]]\npattern = \"ticker-btc\"\noverflow = \"disconnect\"\n",
        )
        .unwrap();
        assert_eq!(
            c.rooms.overflow_for("ticker-btc"),
            Overflow::Latest,
            "a later exact match loses"
        );
        assert_eq!(c.rooms.overflow_for("lobby"), Overflow::DropNewest);
        assert_eq!(
            c.rooms.overflow_for("ticker"),
            Overflow::DropNewest,
            "`ticker-*` needs the dash"
        );
        // And with no `[rooms] overflow`, the documented default.
        let c = Config::parse("[auth]\nallow_anonymous = true\n").unwrap();
        assert_eq!(c.rooms.overflow_for("lobby"), Overflow::Disconnect);
    }
}
