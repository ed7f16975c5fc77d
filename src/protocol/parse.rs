//! Parsing of client ops: one text frame into a [`Request`] (the op and its `id`), or a [`ParseError`] that keeps
//! the `id` when it could be recovered and echoes at most a short prefix of what the client sent. The JSON helpers
//! the parser relies on live here too: the one-pass nesting check that runs before any parser reads the frame, and
//! the whitespace compaction of a publish's `data`.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

/// Longest `id` a client may attach to an op, in bytes of its JSON text.
pub const MAX_ID_LEN: usize = 64;

/// A client op as it arrived, borrowed from the frame text. Unknown fields are ignored (forward compatibility).
#[derive(Debug, Deserialize)]
struct RawOp<'a> {
    #[serde(borrow)]
    op: Cow<'a, str>,
    #[serde(borrow, default)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    /// `Some` for any present value, `null` included (a plain `Option` would read `null` as absent).
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(default)]
    echo: Option<bool>,
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
    /// `join`: `{"seq":S,"epoch":E}`; checked after the frame parsed, so its error can carry the id.
    #[serde(borrow, default)]
    since: Option<&'a RawValue>,
    #[serde(borrow, default)]
    msg_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    limit: Option<&'a RawValue>,
    #[serde(borrow, default)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    timeout_ms: Option<&'a RawValue>,
}

/// Where a recovering join starts: the last message the client has (`seq`) in the stream it came from (`epoch`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Since {
    /// Stream sequence of the last message the client has (0: none).
    pub seq: u64,
    /// The stream's epoch as the gateway gave it (at most [`MAX_EPOCH_LEN`] bytes).
    pub epoch: String,
}

/// Longest `recover` query value accepted, in bytes, before decoding.
pub const MAX_RECOVER_LEN: usize = 16 * 1024;

/// The upgrade's `recover` query parameter (`docs/protocol.md`, "Server-side rooms"): where the client got to in each
/// server-side history room, as a percent-encoded JSON object `{"<room>":{"epoch":"<epoch>","seq":<n>}, ...}`. The
/// gateway recovers those rooms exactly as a `join` with `since` would. At most `max_rooms` entries; every room name
/// and epoch is checked here, where it enters.
pub fn parse_recover(encoded: &str, max_rooms: usize) -> Result<Vec<(String, Since)>, &'static str> {
    if encoded.len() > MAX_RECOVER_LEN {
        return Err("`recover` is longer than 16 KiB");
    }
    let json = percent_encoding::percent_decode_str(encoded)
        .decode_utf8()
        .map_err(|_| "`recover` is not percent-encoded UTF-8")?;
    if json_depth_exceeds(json.as_bytes(), 3) {
        return Err("`recover` is nested too deeply");
    }
    let map: std::collections::BTreeMap<String, Since> =
        serde_json::from_str(&json).map_err(|_| "`recover` must be {\"<room>\":{\"epoch\":<string>,\"seq\":<n>}}")?;
    if map.len() > max_rooms {
        return Err("`recover` names more rooms than rooms.max_rooms_per_connection");
    }
    for (room, since) in &map {
        if !crate::room_name::valid_room(room) {
            return Err("`recover` names an invalid room");
        }
        if since.epoch.len() > MAX_EPOCH_LEN {
            return Err("`recover` has an epoch longer than 64 bytes");
        }
    }
    Ok(map.into_iter().collect())
}

/// Longest `since.epoch` accepted (the gateway's epochs are far shorter).
pub const MAX_EPOCH_LEN: usize = 64;
/// Longest `msg_id` accepted.
pub const MAX_MSG_ID_LEN: usize = 64;

/// Whether `id` is a usable publish `msg_id`: 1 to [`MAX_MSG_ID_LEN`] bytes of `A-Z a-z 0-9 _ - : .` (it becomes part
/// of a NATS header value).
pub fn valid_msg_id(id: &str) -> bool {
    (1..=MAX_MSG_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':' | b'.'))
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

/// A parsed client op.
#[derive(Debug, PartialEq)]
pub enum ClientOp<'a> {
    /// Join a room, recovering what was missed since `since` when given (history rooms).
    Join {
        /// Room name (validated later, so the error can carry the id).
        room: Cow<'a, str>,
        /// Recovery point.
        since: Option<Since>,
    },
    /// The last `limit` stored messages of a history room.
    History {
        /// Room name.
        room: Cow<'a, str>,
        /// How many (capped by `history.max_history_limit`).
        limit: u64,
    },
    /// Who is in a room (`docs/presence.md`).
    Presence {
        /// Room name.
        room: Cow<'a, str>,
    },
    /// How many are in a room.
    PresenceStats {
        /// Room name.
        room: Cow<'a, str>,
    },
    /// Leave a room.
    Leave {
        /// Room name.
        room: Cow<'a, str>,
    },
    /// Publish `data` to a room.
    Publish {
        /// Room name.
        room: Cow<'a, str>,
        /// Compact JSON text of the payload.
        data: Cow<'a, str>,
        /// Deliver to the sender as well.
        echo: bool,
        /// Client's idempotency key: a retried publish with the same key is stored once (history rooms).
        msg_id: Option<Cow<'a, str>>,
    },
    /// Call an RPC method: a NATS request on `<rpc.subject_prefix>.<method>` (validated later, so the error can carry
    /// the id).
    Rpc {
        /// Method name.
        method: Cow<'a, str>,
        /// Compact JSON text of the payload (`null` when absent).
        data: Cow<'a, str>,
        /// The client's deadline in milliseconds (capped by `rpc.max_timeout`).
        timeout_ms: Option<u64>,
    },
    /// Application-level ping (browsers cannot see WebSocket pings).
    Ping,
    /// Replace the connection's token.
    Refresh {
        /// The new JWT.
        token: Cow<'a, str>,
    },
}

/// A request: the op and its optional `id`, kept as the client's JSON text so it is echoed back exactly.
#[derive(Debug)]
pub struct Request<'a> {
    /// The `id` JSON text (a number or a string), if given.
    pub id: Option<&'a str>,
    /// The op.
    pub op: ClientOp<'a>,
}

/// Why a frame could not be parsed; carries the `id` when it could be recovered so the error can name it.
#[derive(Debug, PartialEq)]
pub struct ParseError<'a> {
    /// The request id, if the frame was JSON with a usable `id`.
    pub id: Option<&'a str>,
    /// Human-readable reason.
    pub message: Cow<'static, str>,
}

fn bad<'a>(id: Option<&'a str>, message: impl Into<Cow<'static, str>>) -> ParseError<'a> {
    ParseError {
        id,
        message: message.into(),
    }
}

/// Nesting limit used by [`parse_request`]: the default of `limits.max_json_depth`.
pub const DEFAULT_MAX_JSON_DEPTH: usize = 32;

/// Parses one text frame into a request, refusing JSON nested deeper than [`DEFAULT_MAX_JSON_DEPTH`].
pub fn parse_request(text: &str) -> Result<Request<'_>, ParseError<'_>> {
    parse_request_with_depth(text, DEFAULT_MAX_JSON_DEPTH)
}

/// Parses one text frame into a request, refusing JSON whose arrays/objects nest deeper than `max_depth`
/// (`limits.max_json_depth`; the frame's own object is level 1) before anything else reads it. serde_json forwards a
/// `RawValue` of any depth, and a backend's parser may refuse or crash on it (Python's `json.loads` raises on 32,000
/// levels), so the gateway refuses it with `bad_request` and nothing reaches NATS.
pub fn parse_request_with_depth(text: &str, max_depth: usize) -> Result<Request<'_>, ParseError<'_>> {
    if json_depth_exceeds(text.as_bytes(), max_depth) {
        return Err(bad(None, format!("JSON nested deeper than {max_depth} levels")));
    }
    let raw: RawOp<'_> = serde_json::from_str(text).map_err(|e| bad(None, json_error(&e)))?;
    let id = match raw.id {
        None => None,
        Some(v) => {
            let t = v.get();
            let ok =
                t.len() <= MAX_ID_LEN && (t.starts_with('"') || t.starts_with('-') || t.as_bytes()[0].is_ascii_digit());
            if !ok {
                return Err(bad(None, "`id` must be a number or a string of at most 64 bytes"));
            }
            Some(t)
        }
    };
    fn need_room<'b>(room: Option<Cow<'b, str>>, id: Option<&'b str>) -> Result<Cow<'b, str>, ParseError<'b>> {
        room.ok_or_else(|| bad(id, "missing field `room`"))
    }
    let op = match raw.op.as_ref() {
        "join" => {
            let room = need_room(raw.room, id)?;
            let since = match raw.since {
                None => None,
                Some(v) => {
                    let since: Since = serde_json::from_str(v.get())
                        .map_err(|_| bad(id, "`since` must be {\"seq\":<integer >= 0>,\"epoch\":<string>}"))?;
                    if since.epoch.len() > MAX_EPOCH_LEN {
                        return Err(bad(id, "`since.epoch` is longer than 64 bytes"));
                    }
                    Some(since)
                }
            };
            ClientOp::Join { room, since }
        }
        "history" => {
            let room = need_room(raw.room, id)?;
            let limit = match raw.limit {
                None => return Err(bad(id, "missing field `limit`")),
                Some(v) => {
                    serde_json::from_str::<u64>(v.get()).map_err(|_| bad(id, "`limit` must be an integer >= 0"))?
                }
            };
            ClientOp::History { room, limit }
        }
        "presence" => ClientOp::Presence {
            room: need_room(raw.room, id)?,
        },
        "presence_stats" => ClientOp::PresenceStats {
            room: need_room(raw.room, id)?,
        },
        "leave" => ClientOp::Leave {
            room: need_room(raw.room, id)?,
        },
        "publish" => {
            let room = need_room(raw.room, id)?;
            let data = raw.data.ok_or_else(|| bad(id, "missing field `data`"))?;
            let msg_id = match raw.msg_id {
                None => None,
                Some(v) => match serde_json::from_str::<Cow<'_, str>>(v.get()) {
                    Ok(m) if valid_msg_id(&m) => Some(m),
                    _ => {
                        return Err(bad(
                            id,
                            "`msg_id` must be a string of 1-64 characters of A-Z a-z 0-9 _ - : .",
                        ));
                    }
                },
            };
            ClientOp::Publish {
                room,
                data: compact_json(data.get()),
                echo: raw.echo.unwrap_or(false),
                msg_id,
            }
        }
        "rpc" => {
            if id.is_none() {
                return Err(bad(None, "missing field `id`"));
            }
            let method = raw.method.ok_or_else(|| bad(id, "missing field `method`"))?;
            let data = raw.data.map_or(Cow::Borrowed("null"), |d| compact_json(d.get()));
            let timeout_ms = match raw.timeout_ms {
                None => None,
                Some(v) => Some(
                    serde_json::from_str::<u64>(v.get())
                        .map_err(|_| bad(id, "`timeout_ms` must be an integer >= 0"))?,
                ),
            };
            ClientOp::Rpc {
                method,
                data,
                timeout_ms,
            }
        }
        "ping" => ClientOp::Ping,
        "refresh" => ClientOp::Refresh {
            token: raw.token.ok_or_else(|| bad(id, "missing field `token`"))?,
        },
        other => {
            let shown: String = other.chars().take(32).collect();
            return Err(bad(id, format!("unknown op {shown:?}")));
        }
    };
    Ok(Request { id, op })
}

/// Whether `json` nests arrays/objects deeper than `max`: one pass, no recursion, brackets inside strings (escapes
/// included) not counted. Meant to run before a parser; on text that is not JSON the answer is only a bound, and the
/// parser then refuses the text anyway.
pub fn json_depth_exceeds(json: &[u8], max: usize) -> bool {
    let mut text = JsonText::default();
    let mut depth = 0usize;
    for &b in json {
        if !text.structural(b) {
            continue;
        }
        match b {
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Where a single-pass scanner is in JSON text: inside a string (escapes included) or not.
#[derive(Debug, Default)]
struct JsonText {
    in_str: bool,
    esc: bool,
}

impl JsonText {
    /// Feeds the next byte; true if it is structural: outside every string, and not a quote.
    fn structural(&mut self, b: u8) -> bool {
        if self.in_str {
            if self.esc {
                self.esc = false;
            } else if b == b'\\' {
                self.esc = true;
            } else if b == b'"' {
                self.in_str = false;
            }
            false
        } else if b == b'"' {
            self.in_str = true;
            false
        } else {
            true
        }
    }
}

/// serde's text for a refused frame, shortened: it quotes the offending value whole ("invalid type: string \"...\""),
/// so a 60 KB field would come back in the error frame and the log. Keeps a prefix and the position.
fn json_error(e: &serde_json::Error) -> String {
    const PREFIX: usize = 96;
    let text = e.to_string();
    // serde_json prints no position when it has none (line 0).
    let at = if e.line() == 0 {
        String::new()
    } else {
        format!(" at line {} column {}", e.line(), e.column())
    };
    let what = text.strip_suffix(at.as_str()).unwrap_or(&text);
    let mut end = what.len().min(PREFIX);
    while !what.is_char_boundary(end) {
        end -= 1;
    }
    let more = if end < what.len() { "..." } else { "" };
    format!("invalid request: {}{more}{at}", &what[..end])
}

/// Removes insignificant whitespace from valid JSON text. Borrows when there is none (the common case).
pub fn compact_json(raw: &str) -> Cow<'_, str> {
    let blank = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let mut text = JsonText::default();
    if !raw.bytes().any(|b| text.structural(b) && blank(b)) {
        return Cow::Borrowed(raw);
    }
    let mut text = JsonText::default();
    let out: Vec<u8> = raw.bytes().filter(|&b| !(text.structural(b) && blank(b))).collect();
    // Only ASCII whitespace was removed, so the bytes are still UTF-8.
    Cow::Owned(String::from_utf8(out).unwrap_or_else(|_| raw.to_owned()))
}

#[cfg(test)]
mod recover_tests {
    use super::*;

    #[test]
    fn recover_positions_are_checked_where_they_enter() {
        let enc = |s: &str| percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string();
        let ok = parse_recover(
            &enc(r#"{"news":{"epoch":"e1","seq":7},"a:b":{"epoch":"e2","seq":0}}"#),
            4,
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(
            ok[1],
            (
                "news".into(),
                Since {
                    seq: 7,
                    epoch: "e1".into()
                }
            )
        );
        for bad in [
            "not json",
            r#"{"a.b":{"epoch":"e","seq":1}}"#,
            r#"{"a":{"epoch":"e","seq":-1}}"#,
            r#"{"a":{"epoch":"e"}}"#,
            r#"{"a":{"epoch":"e","seq":1,"x":1}}"#,
            r#"[1]"#,
            r#"{"a":{"epoch":[[[[1]]]],"seq":1}}"#,
        ] {
            assert!(parse_recover(&enc(bad), 4).is_err(), "{bad}");
        }
        let long = format!(r#"{{"a":{{"epoch":"{}","seq":1}}}}"#, "e".repeat(65));
        assert!(parse_recover(&enc(&long), 4).is_err());
        let many = r#"{"a":{"epoch":"e","seq":1},"b":{"epoch":"e","seq":1}}"#;
        assert!(parse_recover(&enc(many), 1).is_err());
        assert!(parse_recover(&"%7B".repeat(6000), 4).is_err());
        assert!(parse_recover("%FF", 4).is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::MAX_ERROR_TEXT;

    #[test]
    fn json_depth_counts_only_structure() {
        assert!(!json_depth_exceeds(b"{}", 1));
        assert!(json_depth_exceeds(b"{\"a\":[]}", 1));
        assert!(!json_depth_exceeds(b"{\"a\":[]}", 2));
        // Brackets inside strings, escaped quotes and escaped backslashes do not count.
        assert!(!json_depth_exceeds(br#"{"a":"[[[[{{{{"}"#, 1));
        assert!(!json_depth_exceeds(br#"{"a":"\"[[[[","b":"\\"}"#, 1));
        assert!(json_depth_exceeds(br#"{"a":"\\",  "b":[[1]]}"#, 2));
        // Siblings do not add up: depth is nesting, not count.
        let wide = format!("{{\"a\":[{}]}}", vec!["[]"; 1000].join(","));
        assert!(!json_depth_exceeds(wide.as_bytes(), 3));
        assert!(json_depth_exceeds(wide.as_bytes(), 2));
    }

    #[test]
    fn deep_data_is_refused_before_parsing() {
        let nest = |n: usize| {
            format!(
                r#"{{"op":"publish","room":"a","id":1,"data":{}1{}}}"#,
                "[".repeat(n),
                "]".repeat(n)
            )
        };
        // The frame's object is level 1, so `data` may nest max - 1 levels.
        assert!(parse_request_with_depth(&nest(31), 32).is_ok());
        let text = nest(32);
        let e = parse_request_with_depth(&text, 32).unwrap_err();
        assert!(e.message.contains("deeper than 32"), "{}", e.message);
        assert!(e.message.len() < 64, "the error does not echo the input");
        let text = nest(32_000);
        let e = parse_request(&text).unwrap_err();
        assert!(e.message.contains("deeper than"), "{}", e.message);
        // Strings full of brackets are data, not depth.
        let s = format!(r#"{{"op":"publish","room":"a","data":"{}"}}"#, "[".repeat(10_000));
        assert!(parse_request_with_depth(&s, 2).is_ok());
        // Deep `id` or unknown fields count too: the whole frame is bounded, not only `data`.
        let deep_extra = format!(r#"{{"op":"ping","x":{}{}}}"#, "{\"a\":".repeat(40), "}".repeat(40));
        assert!(parse_request_with_depth(&deep_extra, 32).is_err());
    }

    #[test]
    fn publish_data_may_be_null() {
        let r = parse_request(r#"{"op":"publish","room":"a","data":null}"#).unwrap();
        assert_eq!(
            r.op,
            ClientOp::Publish {
                room: "a".into(),
                data: "null".into(),
                echo: false,
                msg_id: None
            }
        );
        assert!(parse_request(r#"{"op":"publish","room":"a"}"#).is_err());
    }

    #[test]
    fn parses_every_op() {
        let r = parse_request(r#"{"op":"join","room":"lobby","id":1}"#).unwrap();
        assert_eq!(r.id, Some("1"));
        assert_eq!(
            r.op,
            ClientOp::Join {
                room: "lobby".into(),
                since: None
            }
        );
        let r = parse_request(r#"{"op":"publish","room":"a","data":{ "x" : [1, 2] , "s":"a b"},"echo":true}"#).unwrap();
        assert_eq!(
            r.op,
            ClientOp::Publish {
                room: "a".into(),
                data: r#"{"x":[1,2],"s":"a b"}"#.into(),
                echo: true,
                msg_id: None
            }
        );
        assert_eq!(parse_request(r#"{"op":"ping"}"#).unwrap().op, ClientOp::Ping);
        let r = parse_request(r#"{"op":"leave","room":"a","id":"x-1"}"#).unwrap();
        assert_eq!(r.id, Some(r#""x-1""#));
    }

    #[test]
    fn rejects_bad_requests() {
        assert!(parse_request("not json").is_err());
        assert!(parse_request(r#"{"op":"dance"}"#).is_err());
        let e = parse_request(r#"{"op":"join","id":7}"#).unwrap_err();
        assert_eq!(e.id, Some("7"));
        assert!(parse_request(r#"{"op":"publish","room":"a"}"#).is_err());
        assert!(parse_request(r#"{"op":"join","room":"a","id":{"x":1}}"#).is_err());
        assert!(parse_request(r#"[1,2]"#).is_err());
    }

    #[test]
    fn parse_errors_echo_only_a_short_prefix() {
        // Found by `scripts/fuzz` (target parse_request): serde's error text quoted the whole offending value, so a
        // 60 KB bad field came back in the error frame (and the log line).
        let big = "V".repeat(60_000);
        for text in [
            format!(r#"{{"op":"ping","echo":"{big}"}}"#),
            format!(r#""{big}""#),
            format!(r#"{{"op":"join","room":"a","id":1,"echo":"{}"}}"#, "é".repeat(30_000)),
        ] {
            let e = parse_request(&text).unwrap_err();
            assert!(
                e.message.len() <= MAX_ERROR_TEXT,
                "{} bytes: {}",
                e.message.len(),
                e.message
            );
            assert!(
                e.message.starts_with("invalid request: invalid type: string"),
                "{}",
                e.message
            );
            assert!(e.message.contains(" at line 1 column "), "{}", e.message);
        }
        let e = parse_request(r#"{"op":"ping","echo":"x"}"#).unwrap_err();
        assert_eq!(
            e.message,
            r#"invalid request: invalid type: string "x", expected a boolean at line 1 column 23"#
        );
    }

    #[test]
    fn compaction_keeps_strings() {
        assert_eq!(compact_json(r#"{ "a b" : "c\" d" }"#), r#"{"a b":"c\" d"}"#);
        assert!(matches!(compact_json(r#"{"a":1}"#), Cow::Borrowed(_)));
    }
}
