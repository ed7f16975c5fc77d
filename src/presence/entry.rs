//! What one gateway stores for one room: the KV key (the room encoded, then this gateway instance) and the value
//! ([`Value`]: this gateway's members of the room, or only counts above `presence.max_members`, and why the members
//! that went since its previous write went). Pure: encoding, decoding and their bounds, unit-tested here.

use base64::Engine;
use serde::{Deserialize, Serialize};

/// Why a member left a room, as `member_left` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Departure {
    /// The client sent `leave` (or lost the room's permission on a token refresh).
    Leave,
    /// The connection ended, or its gateway stopped and removed its entries.
    Disconnect,
    /// Its gateway vanished without removing its entries: the entry expired (the bucket's `max_age`).
    GatewayLost,
}

impl Departure {
    /// The `reason` of `member_left`.
    pub fn as_str(self) -> &'static str {
        match self {
            Departure::Leave => "leave",
            Departure::Disconnect => "disconnect",
            Departure::GatewayLost => "gateway_lost",
        }
    }
}

/// One connection in a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMember {
    /// Connection id (`<gateway>-<n>`).
    pub conn: String,
    /// The token's `sub`; `None` for an anonymous connection.
    pub user: Option<String>,
}

/// A member that left since the gateway's previous write, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredLeft {
    /// Connection id.
    pub conn: String,
    /// `leave` or `disconnect` (a writer never says `gateway_lost`).
    pub reason: Departure,
}

/// One gateway's entry for one room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Value {
    /// The writing gateway's id.
    pub gw: String,
    /// Unix time of the write, milliseconds (diagnostics; expiry is the bucket's `max_age`).
    pub at: u64,
    /// This gateway's connections in the room.
    pub count: u64,
    /// Distinct non-null users among them.
    pub users: u64,
    /// The connections, when `count <= presence.max_members`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<StoredMember>>,
    /// Members gone since the previous write, with the reason (at most `presence.max_members`); a member missing
    /// from a new value and from this list left with `disconnect`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left: Vec<StoredLeft>,
}

impl Value {
    /// Parses a stored value; `None` for anything malformed (a value is written by any client with access to the
    /// bucket). A member list longer than `max_members` is dropped (counts only), so a reader's work stays bounded.
    pub fn parse(bytes: &[u8], max_members: usize) -> Option<Value> {
        let mut v: Value = serde_json::from_slice(bytes).ok()?;
        if v.members.as_ref().is_some_and(|m| m.len() > max_members) {
            v.members = None;
        }
        v.left.truncate(max_members);
        Some(v)
    }
}

/// The key part of a room: base64url without padding of its name. Room names may contain `: @ = +`, KV keys allow
/// only `[-/_=.a-zA-Z0-9]`, and base64url's alphabet is `[A-Za-z0-9_-]`. A 128-byte name gives 171 characters.
pub fn room_token(room: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(room.as_bytes())
}

/// The key of `room` for gateway `instance` (`<room_token>.<instance>`).
pub fn key(room: &str, instance: &str) -> String {
    format!("{}.{instance}", room_token(room))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv_key_ok(k: &str) -> bool {
        !k.is_empty()
            && !k.starts_with('.')
            && !k.ends_with('.')
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_' | b'=' | b'.'))
    }

    #[test]
    fn keys_of_every_room_name_are_valid_kv_keys_and_distinct() {
        let rooms = ["lobby", "a:b@c=d+e", "+", "=", "user:1@org", &"z".repeat(128), "a-b_c"];
        let keys: Vec<String> = rooms.iter().map(|r| key(r, "gw1-0123abcd")).collect();
        for k in &keys {
            assert!(kv_key_ok(k), "{k}");
            assert_eq!(
                k.matches('.').count(),
                1,
                "one token for the room, one for the instance: {k}"
            );
        }
        let distinct: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len());
        assert_eq!(room_token("a+b"), "YSti");
    }

    #[test]
    fn values_round_trip_and_oversized_lists_become_counts() {
        let v = Value {
            gw: "gw1".into(),
            at: 1,
            count: 2,
            users: 1,
            members: Some(vec![
                StoredMember {
                    conn: "gw1-1".into(),
                    user: Some("alice".into()),
                },
                StoredMember {
                    conn: "gw1-2".into(),
                    user: None,
                },
            ]),
            left: vec![StoredLeft {
                conn: "gw1-3".into(),
                reason: Departure::Leave,
            }],
        };
        let text = serde_json::to_vec(&v).expect("json");
        assert!(String::from_utf8_lossy(&text).contains(r#""reason":"leave""#));
        assert_eq!(Value::parse(&text, 10), Some(v.clone()));
        let small = Value::parse(&text, 1).expect("parses");
        assert_eq!((small.members, small.left.len(), small.count), (None, 1, 2));
        assert_eq!(Value::parse(b"{\"gw\":1}", 10), None);
        assert_eq!(Value::parse(b"", 10), None);
    }
}
