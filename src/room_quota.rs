//! Per-user room accounting: how many distinct rooms one user (one address for anonymous clients) is in at once,
//! over all its connections, and how fast it may create rooms on this gateway.
//!
//! Without it the only room bound was the gateway-wide `rooms.max_rooms`, which a single address could fill alone
//! (25,600 rooms in 15 s from one address, +171 MB), after which every other user's new rooms got `unavailable`.
//! A [`QuotaKey`] is the JWT `sub` of an authenticated connection, else the client address (IPv6 by /64, like the
//! connection limits), so opening more connections or tabs does not multiply the cap.
//!
//! Bounds: the held-rooms map has one entry per key that is in at least one room (removed when it leaves its last),
//! each with at most `rooms.max_rooms_per_user` rooms, so it is bounded by the connected users; the creation-rate
//! limiter holds at most `limits.max_tracked_keys` keys (see `limits::BoundedKeyed`).
//!
//! [`RoomQuota`] is plain synchronous bookkeeping: `rooms::Rooms` calls it under its map lock, on every join and on
//! every way a member leaves a room, so the count cannot drift from the registry.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use parking_lot::Mutex;

use crate::{
    config::RoomsConfig,
    limits::{BoundedKeyed, ip_key, quota},
};

/// Whose room budget a connection draws on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum QuotaKey {
    /// An authenticated user (`sub`), whatever its address and number of connections.
    User(Arc<str>),
    /// An anonymous client's address (IPv4, or IPv6 /64; IPv4-mapped IPv6 counts as IPv4).
    Addr(IpAddr),
}

impl QuotaKey {
    /// The key of a connection: its user if authenticated, else its address.
    pub fn for_client(user: Option<&str>, peer: SocketAddr) -> Self {
        match user {
            Some(u) => QuotaKey::User(u.into()),
            None => QuotaKey::Addr(ip_key(peer.ip())),
        }
    }

    /// The user, for an authenticated connection.
    pub fn user(&self) -> Option<&Arc<str>> {
        match self {
            QuotaKey::User(u) => Some(u),
            QuotaKey::Addr(_) => None,
        }
    }
}

/// Why a join was refused by the per-user accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    /// The key is in `rooms.max_rooms_per_user` distinct rooms already.
    #[error("in the maximum number of rooms for this user or address")]
    TooManyRooms,
    /// The key created rooms faster than `rooms.room_creations_per_second` (+ burst).
    #[error("creating rooms too fast")]
    CreationRate,
}

/// Rooms held per key and the room-creation rate per key. See the module doc for its bounds.
pub struct RoomQuota {
    /// Key → (room → number of the key's connections in it). An entry exists only while the key is in a room.
    held: Mutex<HashMap<QuotaKey, HashMap<Arc<str>, u32>>>,
    max_per_key: usize,
    /// Room creations per key. ≤ `limits.max_tracked_keys` keys.
    creations: BoundedKeyed<QuotaKey>,
}

impl std::fmt::Debug for RoomQuota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomQuota")
            .field("keys", &self.held.lock().len())
            .field("max_per_key", &self.max_per_key)
            .finish_non_exhaustive()
    }
}

impl RoomQuota {
    /// Quotas from `rooms.max_rooms_per_user` and `rooms.room_creations_*`; at most `max_tracked_keys` keys in the
    /// rate limiter.
    pub fn new(config: &RoomsConfig, max_tracked_keys: usize) -> Self {
        Self {
            held: Mutex::default(),
            max_per_key: config.max_rooms_per_user,
            creations: BoundedKeyed::new(
                quota(config.room_creations_per_second, config.room_creations_burst),
                max_tracked_keys,
            ),
        }
    }

    /// Counts one more connection of `key` in `room`. Refused when `room` would be a new distinct room for a key
    /// that already holds `rooms.max_rooms_per_user` of them; another connection of the key joining a room the key
    /// is in costs nothing new.
    pub fn claim(&self, key: &QuotaKey, room: &Arc<str>) -> Result<(), QuotaError> {
        let mut held = self.held.lock();
        if let Some(rooms) = held.get_mut(key) {
            if let Some(n) = rooms.get_mut(room) {
                *n = n.saturating_add(1);
                return Ok(());
            }
            if rooms.len() >= self.max_per_key {
                return Err(QuotaError::TooManyRooms);
            }
            rooms.insert(room.clone(), 1);
            return Ok(());
        }
        // max_per_key ≥ 1 (validated), so a key's first room always fits.
        held.insert(key.clone(), HashMap::from([(room.clone(), 1)]));
        Ok(())
    }

    /// Undoes one [`RoomQuota::claim`] of `key` in `room`; drops the entries that reach zero.
    pub fn release(&self, key: &QuotaKey, room: &str) {
        let mut held = self.held.lock();
        let Some(rooms) = held.get_mut(key) else {
            return;
        };
        if let Some(n) = rooms.get_mut(room) {
            *n -= 1;
            if *n == 0 {
                rooms.remove(room);
            }
        }
        if rooms.is_empty() {
            held.remove(key);
        }
    }

    /// Charges one room creation to `key`; `Err` when it is over `rooms.room_creations_per_second` (+ burst).
    pub fn charge_creation(&self, key: &QuotaKey) -> Result<(), QuotaError> {
        // Pruned here, where a new key can appear, so the store stays within `limits.max_tracked_keys`.
        self.creations.prune(1);
        if self.creations.check(key, 1) {
            Ok(())
        } else {
            Err(QuotaError::CreationRate)
        }
    }

    /// Distinct rooms `key` is in.
    pub fn rooms_of(&self, key: &QuotaKey) -> usize {
        self.held.lock().get(key).map_or(0, HashMap::len)
    }

    /// Keys with at least one room, plus keys in the creation-rate limiter (tests assert this stays bounded).
    pub fn tracked_keys(&self) -> usize {
        self.held.lock().len() + self.creations.len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    fn quota_with(max_per_key: usize, per_second: u32, burst: u32) -> RoomQuota {
        let config = RoomsConfig {
            max_rooms_per_user: max_per_key,
            room_creations_per_second: per_second,
            room_creations_burst: burst,
            ..RoomsConfig::default()
        };
        RoomQuota::new(&config, 16)
    }

    fn user(s: &str) -> QuotaKey {
        QuotaKey::User(s.into())
    }

    #[test]
    fn key_is_user_else_address_by_64() {
        let a: SocketAddr = "[2001:db8::1]:5".parse().expect("addr");
        let b: SocketAddr = "[2001:db8::2]:6".parse().expect("addr");
        assert_eq!(QuotaKey::for_client(None, a), QuotaKey::for_client(None, b));
        assert_eq!(QuotaKey::for_client(Some("ann"), a), user("ann"));
        let v4: SocketAddr = "1.2.3.4:1".parse().expect("addr");
        let mapped: SocketAddr = "[::ffff:1.2.3.4]:2".parse().expect("addr");
        assert_eq!(QuotaKey::for_client(None, v4), QuotaKey::for_client(None, mapped));
    }

    #[test]
    fn distinct_rooms_capped_shared_rooms_free() {
        let q = quota_with(2, 1, 1);
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        q.claim(&user("u"), &a).expect("first");
        q.claim(&user("u"), &a).expect("second tab in the same room");
        q.claim(&user("u"), &b).expect("second room");
        assert_eq!(q.claim(&user("u"), &c), Err(QuotaError::TooManyRooms));
        assert!(q.claim(&user("v"), &c).is_ok(), "other users unaffected");
        q.release(&user("u"), "a");
        assert_eq!(
            q.claim(&user("u"), &c),
            Err(QuotaError::TooManyRooms),
            "a still held by one tab"
        );
        q.release(&user("u"), "a");
        q.claim(&user("u"), &c).expect("a fully left");
        for r in ["b", "c"] {
            q.release(&user("u"), r);
        }
        q.release(&user("v"), "c");
        assert_eq!(q.held.lock().len(), 0, "no entry for keys without rooms");
    }

    #[test]
    fn creation_rate_per_key() {
        let q = quota_with(10, 1, 3);
        for _ in 0..3 {
            q.charge_creation(&user("u")).expect("burst");
        }
        assert_eq!(q.charge_creation(&user("u")), Err(QuotaError::CreationRate));
        assert!(q.charge_creation(&user("v")).is_ok());
    }

    #[test]
    fn creation_limiter_keys_bounded() {
        let q = quota_with(10, 1, 3);
        for i in 0..1000 {
            q.charge_creation(&user(&format!("u{i}"))).expect("fresh key");
            assert!(q.creations.len() <= 16, "{}", q.creations.len());
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Claim(u8, u8),
        Release(u8, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..4, 0u8..6).prop_map(|(k, r)| Op::Claim(k, r)),
            (0u8..4, 0u8..6).prop_map(|(k, r)| Op::Release(k, r)),
        ]
    }

    proptest! {
        /// Random claims and releases across keys and rooms agree with a plain model: a multiset of rooms per key,
        /// where a claim of a new distinct room past the cap is refused and changes nothing.
        #[test]
        fn matches_plain_model(max in 1usize..4, ops in proptest::collection::vec(op(), 0..200)) {
            let q = quota_with(max, 1, 1);
            let mut model: HashMap<u8, HashMap<u8, u32>> = HashMap::new();
            let rooms: Vec<Arc<str>> = (0..6).map(|r| Arc::from(format!("r{r}"))).collect();
            let key = |k: u8| user(&format!("k{k}"));
            for op in ops {
                match op {
                    Op::Claim(k, r) => {
                        let m = model.entry(k).or_default();
                        let expect_ok = m.contains_key(&r) || m.len() < max;
                        let got = q.claim(&key(k), &rooms[r as usize]);
                        prop_assert_eq!(got.is_ok(), expect_ok);
                        if expect_ok {
                            *m.entry(r).or_default() += 1;
                        } else {
                            prop_assert_eq!(got, Err(QuotaError::TooManyRooms));
                        }
                    }
                    Op::Release(k, r) => {
                        // Only releases of something claimed: callers release what they claimed, exactly once.
                        let m = model.entry(k).or_default();
                        if let Some(n) = m.get_mut(&r) {
                            *n -= 1;
                            if *n == 0 {
                                m.remove(&r);
                            }
                            q.release(&key(k), &format!("r{r}"));
                        }
                    }
                }
                model.retain(|_, m| !m.is_empty());
                for k in 0..4u8 {
                    prop_assert_eq!(q.rooms_of(&key(k)), model.get(&k).map_or(0, HashMap::len));
                }
                prop_assert_eq!(q.held.lock().len(), model.len());
            }
        }
    }
}
