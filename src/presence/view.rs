//! A room's presence as one gateway sees it: every gateway instance's latest entry for the room, merged ([`View`]).
//! Applying a change to one entry gives the `member_joined`/`member_left` events it means ([`Event`]), computed from
//! the difference between the entry's old and new member lists, so every gateway derives the same events from the
//! same KV history. `first`/`last` count a user's connections over all entries. Pure and unit-tested here.
//!
//! Bounds: at most [`MAX_ENTRIES`] entries (gateway instances) per room, each with at most `presence.max_members`
//! members ([`super::entry::Value::parse`]); the user counts hold one key per distinct user listed.

use std::collections::{HashMap, HashSet};

use super::entry::{Departure, StoredMember, Value};

/// Most gateway instances tracked for one room; more entries (only a misbehaving writer makes them) are ignored.
pub const MAX_ENTRIES: usize = 1024;

/// What happened to one gateway's entry.
#[derive(Debug, Clone)]
pub enum Change {
    /// A new value.
    Put(Value),
    /// The entry is gone: removed by its gateway (`Disconnect`) or expired (`GatewayLost`).
    Gone(Departure),
}

/// A presence event for the local members of the room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `member_joined`.
    Joined {
        /// Connection id.
        conn: String,
        /// User, `None` when anonymous.
        user: Option<String>,
        /// The user's first connection in the room (always true for anonymous connections).
        first: bool,
    },
    /// `member_left`.
    Left {
        /// Connection id.
        conn: String,
        /// User, `None` when anonymous.
        user: Option<String>,
        /// The user has no connection left in the room (always true for anonymous connections).
        last: bool,
        /// Why.
        reason: Departure,
    },
}

/// The answer to `presence` / `presence_stats`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Connections in the room over all gateways.
    pub count: u64,
    /// Distinct non-null users (when some gateway stores only counts: the sum of each gateway's distinct users, an
    /// upper bound).
    pub users: u64,
    /// Every member, unless the room is over `presence.max_members` (then `None`: `"truncated":true`).
    pub members: Option<Vec<StoredMember>>,
}

/// Every gateway's entry for one room, merged.
#[derive(Debug)]
pub struct View {
    max_members: usize,
    entries: HashMap<String, Value>,
    /// Listed connections per non-null user, over every entry with a member list.
    user_conns: HashMap<String, u32>,
}

impl View {
    /// An empty view; rooms over `max_members` connections get counts only.
    pub fn new(max_members: usize) -> Self {
        Self {
            max_members,
            entries: HashMap::new(),
            user_conns: HashMap::new(),
        }
    }

    /// Connections over all entries.
    pub fn count(&self) -> u64 {
        self.entries.values().map(|v| v.count).sum()
    }

    /// Whether the room is served as counts only.
    pub fn truncated(&self) -> bool {
        self.count() > self.max_members as u64 || self.entries.values().any(|v| v.members.is_none())
    }

    /// Applies a change of entry `key` and returns its events (none while the room is over `max_members`, before or
    /// after the change).
    pub fn apply(&mut self, key: &str, change: Change) -> Vec<Event> {
        if !self.entries.contains_key(key) && self.entries.len() >= MAX_ENTRIES {
            return Vec::new();
        }
        let quiet = self.truncated();
        let old = self.entries.remove(key);
        let (new, gone_reason) = match change {
            Change::Put(v) => (Some(v), Departure::Disconnect),
            Change::Gone(reason) => (None, reason),
        };
        let old_members = old.as_ref().and_then(|v| v.members.as_deref()).unwrap_or(&[]);
        let new_members = new.as_ref().and_then(|v| v.members.as_deref()).unwrap_or(&[]);
        let new_conns: HashSet<&str> = new_members.iter().map(|m| m.conn.as_str()).collect();
        let old_conns: HashSet<&str> = old_members.iter().map(|m| m.conn.as_str()).collect();
        let mut events = Vec::new();
        for m in old_members.iter().filter(|m| !new_conns.contains(m.conn.as_str())) {
            let reason = match &new {
                Some(v) => v
                    .left
                    .iter()
                    .find(|l| l.conn == m.conn)
                    .map_or(Departure::Disconnect, |l| l.reason),
                None => gone_reason,
            };
            let last = self.forget_user(m.user.as_deref());
            events.push(Event::Left {
                conn: m.conn.clone(),
                user: m.user.clone(),
                last,
                reason,
            });
        }
        for m in new_members.iter().filter(|m| !old_conns.contains(m.conn.as_str())) {
            let first = self.count_user(m.user.as_deref());
            events.push(Event::Joined {
                conn: m.conn.clone(),
                user: m.user.clone(),
                first,
            });
        }
        if let Some(v) = new {
            self.entries.insert(key.to_owned(), v);
        }
        if quiet || self.truncated() {
            events.clear();
        }
        events
    }

    /// Replaces this view by `snapshot`, a fresh read of every entry (a watch made again after it ended or went
    /// stale), and returns the events the difference means: what changed while no watch was looking is reported as
    /// if seen live. An entry missing from the snapshot is gone for the reason `gone` gives its last value.
    pub fn resync(&mut self, snapshot: View, gone: impl Fn(&Value) -> Departure) -> Vec<Event> {
        let mut events = Vec::new();
        let missing: Vec<(String, Departure)> = self
            .entries
            .iter()
            .filter(|(k, _)| !snapshot.entries.contains_key(k.as_str()))
            .map(|(k, v)| (k.clone(), gone(v)))
            .collect();
        for (key, reason) in missing {
            events.extend(self.apply(&key, Change::Gone(reason)));
        }
        for (key, value) in snapshot.entries {
            events.extend(self.apply(&key, Change::Put(value)));
        }
        events
    }

    /// One more listed connection of `user`; whether it is the user's first.
    fn count_user(&mut self, user: Option<&str>) -> bool {
        let Some(user) = user else { return true };
        let n = self.user_conns.entry(user.to_owned()).or_insert(0);
        *n += 1;
        *n == 1
    }

    /// One listed connection of `user` fewer; whether it was the user's last.
    fn forget_user(&mut self, user: Option<&str>) -> bool {
        let Some(user) = user else { return true };
        match self.user_conns.get_mut(user) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.user_conns.remove(user);
                true
            }
            None => true,
        }
    }

    /// What `presence` answers.
    pub fn summary(&self) -> Summary {
        let count = self.count();
        if self.truncated() {
            return Summary {
                count,
                users: self.entries.values().map(|v| v.users).sum(),
                members: None,
            };
        }
        let mut members: Vec<StoredMember> = self
            .entries
            .values()
            .flat_map(|v| v.members.iter().flatten().cloned())
            .collect();
        members.sort_by(|a, b| a.conn.cmp(&b.conn));
        Summary {
            count,
            users: self.user_conns.len() as u64,
            members: Some(members),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::entry::StoredLeft;

    fn m(conn: &str, user: Option<&str>) -> StoredMember {
        StoredMember {
            conn: conn.into(),
            user: user.map(Into::into),
        }
    }

    fn value(members: Vec<StoredMember>, left: Vec<(&str, Departure)>) -> Value {
        Value {
            gw: "gw".into(),
            at: 0,
            count: members.len() as u64,
            users: members
                .iter()
                .filter_map(|m| m.user.as_ref())
                .collect::<HashSet<_>>()
                .len() as u64,
            members: Some(members),
            left: left
                .into_iter()
                .map(|(c, reason)| StoredLeft { conn: c.into(), reason })
                .collect(),
        }
    }

    fn joined(conn: &str, user: Option<&str>, first: bool) -> Event {
        Event::Joined {
            conn: conn.into(),
            user: user.map(Into::into),
            first,
        }
    }

    fn left(conn: &str, user: Option<&str>, last: bool, reason: Departure) -> Event {
        Event::Left {
            conn: conn.into(),
            user: user.map(Into::into),
            last,
            reason,
        }
    }

    #[test]
    fn first_and_last_count_over_every_gateway() {
        let mut v = View::new(100);
        let ev = v.apply("a", Change::Put(value(vec![m("a-1", Some("alice"))], vec![])));
        assert_eq!(ev, vec![joined("a-1", Some("alice"), true)]);
        let ev = v.apply(
            "b",
            Change::Put(value(vec![m("b-1", Some("alice")), m("b-2", None)], vec![])),
        );
        assert_eq!(ev, vec![joined("b-1", Some("alice"), false), joined("b-2", None, true)]);
        let s = v.summary();
        assert_eq!((s.count, s.users, s.members.map(|m| m.len())), (3, 1, Some(3)));
        // a-1 leaves with `leave`: alice still has b-1.
        let ev = v.apply("a", Change::Put(value(vec![], vec![("a-1", Departure::Leave)])));
        assert_eq!(ev, vec![left("a-1", Some("alice"), false, Departure::Leave)]);
        // Gateway b expires: both of its members are lost.
        let ev = v.apply("b", Change::Gone(Departure::GatewayLost));
        assert_eq!(
            ev,
            vec![
                left("b-1", Some("alice"), true, Departure::GatewayLost),
                left("b-2", None, true, Departure::GatewayLost)
            ]
        );
        assert_eq!(v.summary().count, 0);
    }

    #[test]
    fn a_member_missing_from_the_left_list_disconnected_and_a_removed_entry_means_disconnect() {
        let mut v = View::new(100);
        v.apply("a", Change::Put(value(vec![m("a-1", None), m("a-2", None)], vec![])));
        let ev = v.apply("a", Change::Put(value(vec![m("a-2", None)], vec![])));
        assert_eq!(ev, vec![left("a-1", None, true, Departure::Disconnect)]);
        let ev = v.apply("a", Change::Gone(Departure::Disconnect));
        assert_eq!(ev, vec![left("a-2", None, true, Departure::Disconnect)]);
    }

    #[test]
    fn over_max_members_only_counts_and_no_events() {
        let mut v = View::new(2);
        v.apply(
            "a",
            Change::Put(value(vec![m("a-1", Some("u1")), m("a-2", Some("u2"))], vec![])),
        );
        let ev = v.apply("b", Change::Put(value(vec![m("b-1", Some("u3"))], vec![])));
        assert!(ev.is_empty(), "{ev:?}");
        let s = v.summary();
        assert_eq!((s.count, s.users, s.members), (3, 3, None));
        // Back under the limit: events again, and the user counts stayed right.
        let ev = v.apply("b", Change::Gone(Departure::Disconnect));
        assert!(ev.is_empty(), "the change that brings it back is still quiet");
        let ev = v.apply(
            "a",
            Change::Put(value(vec![m("a-1", Some("u1"))], vec![("a-2", Departure::Leave)])),
        );
        assert_eq!(ev, vec![left("a-2", Some("u2"), true, Departure::Leave)]);
    }

    #[test]
    fn a_resync_reports_what_changed_unseen() {
        let mut v = View::new(100);
        v.apply(
            "a",
            Change::Put(value(vec![m("a-1", Some("alice")), m("a-2", None)], vec![])),
        );
        v.apply("b", Change::Put(value(vec![m("b-1", None)], vec![])));
        v.apply("c", Change::Put(value(vec![m("c-1", Some("alice"))], vec![])));
        // Unseen: a-2 left, a-3 joined; b's entry is gone; c unchanged; d arrived.
        let mut snapshot = View::new(100);
        snapshot.apply(
            "a",
            Change::Put(value(
                vec![m("a-1", Some("alice")), m("a-3", Some("bob"))],
                vec![("a-2", Departure::Leave)],
            )),
        );
        snapshot.apply("c", Change::Put(value(vec![m("c-1", Some("alice"))], vec![])));
        snapshot.apply("d", Change::Put(value(vec![m("d-1", Some("alice"))], vec![])));
        let mut ev = v.resync(snapshot, |_| Departure::GatewayLost);
        ev.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(
            ev,
            vec![
                joined("a-3", Some("bob"), true),
                joined("d-1", Some("alice"), false),
                left("a-2", None, true, Departure::Leave),
                left("b-1", None, true, Departure::GatewayLost),
            ]
        );
        let s = v.summary();
        assert_eq!((s.count, s.users), (4, 2));
        // The same snapshot again: nothing happened.
        let mut again = View::new(100);
        for (k, e) in &v.entries {
            again.apply(k, Change::Put(e.clone()));
        }
        assert!(v.resync(again, |_| Departure::Disconnect).is_empty());
    }

    #[test]
    fn entries_are_bounded() {
        let mut v = View::new(10_000);
        for i in 0..MAX_ENTRIES + 5 {
            v.apply(
                &format!("k{i}"),
                Change::Put(value(vec![m(&format!("c{i}"), None)], vec![])),
            );
        }
        assert_eq!(v.summary().count, MAX_ENTRIES as u64);
    }
}
