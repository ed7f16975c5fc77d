//! Backend commands as they arrive on `<nats.control_prefix>.<command>` (`docs/protocol.md`, "Control over NATS"),
//! parsed and checked here, where they enter: every value that later reaches a close frame, a room subject, a log
//! line or a timer is validated (user names as `sub` claims are, room names as rooms are, reasons within the 123
//! bytes a close frame carries, times saturating).

use serde::Deserialize;

use crate::{auth::valid_sub, room_name::valid_room};

/// Longest command payload accepted, in bytes.
pub const MAX_COMMAND_BYTES: usize = 4096;

/// Longest close reason a `disconnect` may give (a close frame's payload is at most 125 bytes, 2 of them the code).
pub const MAX_REASON_BYTES: usize = 123;

/// Longest `jti` a `revoke` may name (the same bound as the claim, `auth::MAX_JTI_LEN`).
pub const MAX_JTI_BYTES: usize = crate::auth::MAX_JTI_LEN;

/// Who a `disconnect` closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every connection of this user, on every gateway.
    User(String),
    /// One connection, by its id (`<gateway id>-<number>`, as `welcome` gave it).
    Conn(String),
}

/// What a `revoke` revokes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    /// The token with this `jti`, until `until`.
    Jti {
        /// The token's `jti`.
        jti: String,
        /// Unix seconds; the revocation ends then.
        until: u64,
    },
    /// Every token of `user` issued (`iat`) before `issued_before`; tokens without `iat` too.
    User {
        /// The tokens' `sub`.
        user: String,
        /// Unix seconds.
        issued_before: u64,
    },
}

/// One checked command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Close with 4003, with the given reason or `disconnected by server`.
    Disconnect {
        /// Whom to close.
        target: Target,
        /// The close reason (at most [`MAX_REASON_BYTES`], no control characters).
        reason: Option<String>,
    },
    /// The user's connections leave the room.
    Unsubscribe {
        /// Whose connections.
        user: String,
        /// A valid room name.
        room: String,
    },
    /// The user's connections join the room as a server-side room.
    Subscribe {
        /// Whose connections.
        user: String,
        /// A valid room name.
        room: String,
    },
    /// Close matching connections with 4001 and refuse the tokens until the revocation expires.
    Revoke(Revocation),
}

/// Why a command was refused (logged and counted, never answered: commands are fire-and-forget).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The subject names no known command.
    #[error("unknown command {0:?}")]
    Unknown(String),
    /// The payload is not what the command takes.
    #[error("malformed {command} command: {why}")]
    Malformed {
        /// The command.
        command: &'static str,
        /// What is wrong with it.
        why: String,
    },
}

/// The commands, by the last token of their subject.
pub const COMMANDS: [&str; 4] = ["disconnect", "unsubscribe", "subscribe", "revoke"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    user: Option<String>,
    conn: Option<String>,
    reason: Option<String>,
    room: Option<String>,
    jti: Option<String>,
    until: Option<u64>,
    issued_before: Option<u64>,
}

/// Parses the command named `name` (the subject's last token) from `payload`.
pub fn parse(name: &str, payload: &[u8]) -> Result<Command, CommandError> {
    let Some(&command) = COMMANDS.iter().find(|c| **c == name) else {
        let shown: String = name.chars().take(64).collect();
        return Err(CommandError::Unknown(shown));
    };
    let bad = |why: &str| CommandError::Malformed {
        command,
        why: why.to_owned(),
    };
    if payload.len() > MAX_COMMAND_BYTES {
        return Err(bad("payload over 4096 bytes"));
    }
    let body: Body = serde_json::from_slice(payload).map_err(|e| CommandError::Malformed {
        command,
        why: format!("not the expected JSON object ({})", e.classify_str()),
    })?;
    let user = |u: Option<String>| match u {
        Some(u) if valid_sub(&u) => Ok(u),
        Some(_) => Err(bad("`user` must be 1-128 visible ASCII characters")),
        None => Err(bad("`user` is required")),
    };
    let room = |r: Option<String>| match r {
        Some(r) if valid_room(&r) => Ok(r),
        Some(_) => Err(bad("`room` is not a valid room name")),
        None => Err(bad("`room` is required")),
    };
    let only = |allowed: &[&str]| {
        let present = [
            ("user", body.user.is_some()),
            ("conn", body.conn.is_some()),
            ("reason", body.reason.is_some()),
            ("room", body.room.is_some()),
            ("jti", body.jti.is_some()),
            ("until", body.until.is_some()),
            ("issued_before", body.issued_before.is_some()),
        ];
        match present.iter().find(|(k, set)| *set && !allowed.contains(k)) {
            Some((k, _)) => Err(CommandError::Malformed {
                command,
                why: format!("`{k}` does not belong to this command"),
            }),
            None => Ok(()),
        }
    };
    match command {
        "disconnect" => {
            only(&["user", "conn", "reason"])?;
            let target = match (body.user, body.conn) {
                (Some(u), None) => Target::User(user(Some(u))?),
                (None, Some(c)) if valid_conn_id(&c) => Target::Conn(c),
                (None, Some(_)) => return Err(bad("`conn` is not a connection id")),
                _ => return Err(bad("give exactly one of `user` or `conn`")),
            };
            let reason = match body.reason {
                Some(r) if r.len() > MAX_REASON_BYTES => return Err(bad("`reason` over 123 bytes")),
                Some(r) if r.chars().any(char::is_control) => return Err(bad("`reason` has control characters")),
                r => r,
            };
            Ok(Command::Disconnect { target, reason })
        }
        "unsubscribe" | "subscribe" => {
            only(&["user", "room"])?;
            let (user, room) = (user(body.user)?, room(body.room)?);
            Ok(match command {
                "subscribe" => Command::Subscribe { user, room },
                _ => Command::Unsubscribe { user, room },
            })
        }
        _ => {
            only(&["user", "jti", "until", "issued_before"])?;
            match (body.jti, body.until, body.user, body.issued_before) {
                (Some(jti), Some(until), None, None) => {
                    if jti.is_empty() || jti.len() > MAX_JTI_BYTES || !jti.bytes().all(|b| b.is_ascii_graphic()) {
                        return Err(bad("`jti` must be 1-128 visible ASCII characters"));
                    }
                    Ok(Command::Revoke(Revocation::Jti { jti, until }))
                }
                (None, None, Some(u), Some(issued_before)) => Ok(Command::Revoke(Revocation::User {
                    user: user(Some(u))?,
                    issued_before,
                })),
                _ => Err(bad("give `jti` with `until`, or `user` with `issued_before`")),
            }
        }
    }
}

/// Whether `c` looks like a connection id: visible ASCII, at most 200 bytes, with a `-` before its number.
fn valid_conn_id(c: &str) -> bool {
    c.len() <= 200
        && c.bytes().all(|b| b.is_ascii_graphic())
        && c.rsplit_once('-')
            .is_some_and(|(gw, n)| !gw.is_empty() && n.parse::<u64>().is_ok())
}

/// `gateway`'s connection number in a connection id, if the id is of this gateway.
pub fn local_conn(conn: &str, gateway: &str) -> Option<u64> {
    let (gw, n) = conn.rsplit_once('-')?;
    (gw == gateway).then(|| n.parse().ok()).flatten()
}

/// A short name for serde_json's error class (the message could quote the payload).
trait Classify {
    fn classify_str(&self) -> &'static str;
}

impl Classify for serde_json::Error {
    fn classify_str(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "io",
            serde_json::error::Category::Syntax => "syntax",
            serde_json::error::Category::Data => "unexpected field or type",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_parses() {
        assert_eq!(
            parse("disconnect", br#"{"user":"ann","reason":"banned"}"#),
            Ok(Command::Disconnect {
                target: Target::User("ann".into()),
                reason: Some("banned".into())
            })
        );
        assert_eq!(
            parse("disconnect", br#"{"conn":"gw1-42"}"#),
            Ok(Command::Disconnect {
                target: Target::Conn("gw1-42".into()),
                reason: None
            })
        );
        assert_eq!(
            parse("subscribe", br#"{"user":"ann","room":"team-1"}"#),
            Ok(Command::Subscribe {
                user: "ann".into(),
                room: "team-1".into()
            })
        );
        assert_eq!(
            parse("unsubscribe", br#"{"user":"ann","room":"team-1"}"#),
            Ok(Command::Unsubscribe {
                user: "ann".into(),
                room: "team-1".into()
            })
        );
        assert_eq!(
            parse("revoke", br#"{"jti":"t-1","until":99}"#),
            Ok(Command::Revoke(Revocation::Jti {
                jti: "t-1".into(),
                until: 99
            }))
        );
        assert_eq!(
            parse("revoke", br#"{"user":"ann","issued_before":99}"#),
            Ok(Command::Revoke(Revocation::User {
                user: "ann".into(),
                issued_before: 99
            }))
        );
    }

    #[test]
    fn malformed_commands_are_refused_with_a_reason() {
        let long = format!(r#"{{"user":"a","reason":"{}"}}"#, "x".repeat(124));
        for (name, body) in [
            ("disconnect", "{}"),
            ("disconnect", r#"{"user":"a","conn":"g-1"}"#),
            ("disconnect", r#"{"user":"a b"}"#),
            ("disconnect", r#"{"user":""}"#),
            ("disconnect", r#"{"conn":"nonumber"}"#),
            ("disconnect", r#"{"user":"a","reason":"line\nbreak"}"#),
            ("disconnect", long.as_str()),
            ("disconnect", r#"{"user":"a","room":"r"}"#),
            ("disconnect", r#"{"user":"a","extra":1}"#),
            ("disconnect", "not json"),
            ("disconnect", "[1,2]"),
            ("subscribe", r#"{"user":"a"}"#),
            ("subscribe", r#"{"user":"a","room":"a.b"}"#),
            ("subscribe", r#"{"user":"a","room":">"}"#),
            ("unsubscribe", r#"{"room":"r"}"#),
            ("revoke", r#"{"jti":"j"}"#),
            ("revoke", r#"{"jti":"j","until":-1}"#),
            ("revoke", r#"{"jti":"j k","until":1}"#),
            ("revoke", r#"{"user":"a","until":1}"#),
            ("revoke", r#"{"jti":"j","until":1,"user":"a","issued_before":1}"#),
            ("revoke", r#"{"user":"a","issued_before":1e400}"#),
        ] {
            let got = parse(name, body.as_bytes());
            assert!(
                matches!(got, Err(CommandError::Malformed { .. })),
                "{name} {body}: {got:?}"
            );
        }
        assert!(matches!(parse("reboot", b"{}"), Err(CommandError::Unknown(_))));
        let huge = vec![b' '; MAX_COMMAND_BYTES + 1];
        assert!(matches!(
            parse("disconnect", &huge),
            Err(CommandError::Malformed { .. })
        ));
    }

    #[test]
    fn connection_ids_are_matched_to_this_gateway() {
        assert_eq!(local_conn("gw1-42", "gw1"), Some(42));
        assert_eq!(local_conn("gw-a-7", "gw-a"), Some(7));
        assert_eq!(local_conn("gw2-42", "gw1"), None);
        assert_eq!(local_conn("gw1-x", "gw1"), None);
        assert_eq!(local_conn("42", "gw1"), None);
    }
}
