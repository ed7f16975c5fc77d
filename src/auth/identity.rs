//! Who a connection is: [`Identity`], the user and the room patterns it may join and publish to, built from a
//! verified token's claims (or from `auth.anonymous`), and the rules a claim meets before it may reach a NATS header,
//! a log line or a room name ([`valid_sub`], [`pattern_list`]). Uses only [`super::error`].

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde_json::Value;

use super::error::AuthError;
use crate::config::Permissions;
use crate::room_pattern::RoomPattern;

/// Longest `sub` accepted, in bytes.
pub const MAX_SUB_LEN: usize = 128;

/// Longest `jti` accepted, in bytes.
pub const MAX_JTI_LEN: usize = 128;

/// Whether a `sub` claim is acceptable: 1 to [`MAX_SUB_LEN`] bytes of visible ASCII (`!` to `~`; no spaces, no
/// control characters, nothing outside ASCII). With `auth.personal_room`, the room it yields must also be valid.
pub fn valid_sub(sub: &str) -> bool {
    !sub.is_empty() && sub.len() <= MAX_SUB_LEN && sub.bytes().all(|b| b.is_ascii_graphic())
}

/// A claim that must be an array of room names (strings): `None` if absent, `Malformed` if of another type.
/// Duplicates are dropped (the first stays); names are checked when joined.
pub(super) fn room_list(v: Option<&Value>) -> Result<Vec<String>, AuthError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => {
            let mut rooms: Vec<String> = Vec::with_capacity(items.len());
            for item in items {
                let room = item.as_str().ok_or(AuthError::Malformed)?;
                if !rooms.iter().any(|r| r == room) {
                    rooms.push(room.to_owned());
                }
            }
            Ok(rooms)
        }
        Some(_) => Err(AuthError::Malformed),
    }
}

/// A claim that must be an array of room patterns (strings), compiled here once for the connection's life: `None`
/// if absent, `Malformed` if of another type.
pub(super) fn pattern_list(v: Option<&Value>) -> Result<Option<Vec<RoomPattern>>, AuthError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(RoomPattern::new).ok_or(AuthError::Malformed))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(AuthError::Malformed),
    }
}

/// Who a connection is and which rooms it may use. Cheap enough to clone once per connection.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The JWT `sub`; `None` for anonymous connections.
    pub user: Option<String>,
    /// The JWT `exp` (unix seconds); `None` for anonymous connections.
    pub expires_at: Option<u64>,
    /// `auth.leeway_secs`: the identity is valid until `exp` plus this ([`Identity::expires_in`]).
    pub(super) grace: Duration,
    /// `*` glob patterns of rooms that may be joined.
    pub(super) join: Arc<[RoomPattern]>,
    /// `*` glob patterns of rooms that may be published to.
    pub(super) publish: Arc<[RoomPattern]>,
    /// `*` glob patterns of RPC methods that may be called.
    pub(super) rpc: Arc<[RoomPattern]>,
    /// The personal room (`auth.personal_room` with `{sub}` replaced), matched exactly, never as a glob: a `sub`
    /// containing `*` must not widen the grant.
    pub(super) personal: Option<String>,
    /// Server-side rooms (`auth.subs_claim`, plus the personal room with `auth.join_personal_room`): joined for the
    /// connection before its `welcome`, without a `join`. Names as the token gave them, without duplicates; each is
    /// checked when it is joined (an invalid one is reported in `welcome`, never fails the connection).
    pub subs: Vec<String>,
    /// The JWT `jti` (at most [`MAX_JTI_LEN`] visible ASCII bytes): what a `revoke` by `jti` matches.
    pub jti: Option<String>,
    /// The JWT `iat` (unix seconds): what a `revoke` by user and `issued_before` compares.
    pub issued_at: Option<u64>,
}

impl Identity {
    /// An anonymous identity with the given permissions.
    pub fn anonymous(perms: &Permissions) -> Identity {
        Identity {
            user: None,
            expires_at: None,
            grace: Duration::ZERO,
            join: perms.join.as_slice().into(),
            publish: perms.publish.as_slice().into(),
            rpc: perms.rpc.as_slice().into(),
            personal: None,
            subs: Vec::new(),
            jti: None,
            issued_at: None,
        }
    }

    /// Time left at `now` before this identity expires (`exp` + `auth.leeway_secs`, the same rule that accepted
    /// the token): zero once past, `None` without `exp`. Saturating: an `exp` of 1e19 gives a huge duration, never a
    /// panic (callers turn it into an `Instant` with `checked_add`).
    pub fn expires_in(&self, now: SystemTime) -> Option<Duration> {
        let exp = self.expires_at?;
        let end = Duration::from_secs(exp).saturating_add(self.grace);
        let since_epoch = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO);
        Some(end.saturating_sub(since_epoch))
    }

    /// Whether `room` may be joined.
    pub fn may_join(&self, room: &str) -> bool {
        self.personal.as_deref() == Some(room) || self.join.iter().any(|p| p.matches(room))
    }

    /// Whether the RPC `method` may be called.
    pub fn may_call(&self, method: &str) -> bool {
        self.rpc.iter().any(|p| p.matches(method))
    }

    /// Whether messages may be published to `room`.
    pub fn may_publish(&self, room: &str) -> bool {
        self.personal.as_deref() == Some(room) || self.publish.iter().any(|p| p.matches(room))
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{Algorithm, EncodingKey};
    use serde_json::json;

    use super::*;
    use crate::auth::testkit::*;

    #[test]
    fn permissions_patterns_and_personal_room() {
        let mut f = Fixture::new();
        f.add_hs("HS256", None, "s");
        f.cfg.personal_room = Some("user-{sub}".into());
        let auth = f.auth();
        let key = EncodingKey::from_secret(b"s");
        let c = json!({ "sub": "ann", "exp": now() + 60, "rooms": ["chat-*", "lobby"], "publish": ["chat-*"] });
        let id = auth.verify(&sign(Algorithm::HS256, None, &c, &key)).expect("valid");
        assert!(id.may_join("chat-42") && id.may_join("lobby") && !id.may_join("admin"));
        assert!(id.may_publish("chat-42") && !id.may_publish("lobby"));
        assert!(id.may_join("user-ann") && id.may_publish("user-ann") && !id.may_join("user-bob"));

        // No publish claim: publish = join patterns.
        let c = json!({ "sub": "ann", "exp": now() + 60, "rooms": ["lobby"] });
        let id = auth.verify(&sign(Algorithm::HS256, None, &c, &key)).expect("valid");
        assert!(id.may_publish("lobby") && !id.may_publish("chat-1"));

        // A `*` in sub cannot widen the personal room into a glob: it does not even make a valid room name.
        let c = json!({ "sub": "*", "exp": now() + 60 });
        assert!(matches!(
            auth.verify(&sign(Algorithm::HS256, None, &c, &key)),
            Err(AuthError::InvalidClaim("sub"))
        ));

        let c = json!({ "sub": "ann", "exp": now() + 60, "rooms": "lobby" });
        assert!(matches!(
            auth.verify(&sign(Algorithm::HS256, None, &c, &key)),
            Err(AuthError::Malformed)
        ));
    }

    #[test]
    fn sub_must_be_header_and_log_safe() {
        let (_f, auth) = hs_auth(|_| {});
        for bad in [
            "a\r\nX-Evil: 1",
            "a\nb",
            "a\u{0}b",
            "tab\there",
            "with space",
            "caf\u{e9}",
            &"x".repeat(129),
        ] {
            let t = hs(&json!({ "sub": bad, "exp": now() + 60 }));
            assert!(
                matches!(auth.verify(&t), Err(AuthError::InvalidClaim("sub"))),
                "{bad:?} must be refused"
            );
        }
        for good in [
            "auth0|5f7c8ec7c33c6c004bbafe82",
            "alice@example.com",
            "https://idp/u/1",
            &"x".repeat(128),
        ] {
            let t = hs(&json!({ "sub": good, "exp": now() + 60 }));
            assert_eq!(auth.verify(&t).expect(good).user.as_deref(), Some(good));
        }
        // The reason shown and logged never carries the claim.
        let e = AuthError::InvalidClaim("sub");
        assert!(!e.reason().contains('\n') && !e.to_string().contains("evil"));
    }

    #[test]
    fn sub_must_make_a_valid_personal_room() {
        let (_f, auth) = hs_auth(|c| c.personal_room = Some("user-{sub}".into()));
        let t = hs(&json!({ "sub": "auth0|abc", "exp": now() + 60 }));
        assert!(matches!(auth.verify(&t), Err(AuthError::InvalidClaim("sub"))));
        let t = hs(&json!({ "sub": &"x".repeat(124), "exp": now() + 60 }));
        assert!(
            matches!(auth.verify(&t), Err(AuthError::InvalidClaim("sub"))),
            "room over 128"
        );
        // `.` is not a room character (it separates NATS subject tokens): such a `sub` cannot have a personal room.
        let t = hs(&json!({ "sub": "ann@example.com", "exp": now() + 60 }));
        assert!(matches!(auth.verify(&t), Err(AuthError::InvalidClaim("sub"))));
        let t = hs(&json!({ "sub": "ann@example", "exp": now() + 60 }));
        assert!(auth.verify(&t).expect("valid").may_join("user-ann@example"));
    }
}
