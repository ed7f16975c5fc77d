//! Client protocol v1 (see `docs/protocol.md`): parsing of client ops, the frames the gateway sends, error codes,
//! close codes, room-name validation and the room → subject mapping.
//!
//! Everything here is pure and synchronous so it can be unit-tested and fuzzed without a network. Outgoing frames are
//! written straight into a byte buffer (no intermediate `serde_json::Value`), and a room message frame is built once
//! per NATS message and then shared by every recipient.

use std::borrow::Cow;

use base64::Engine;
use serde::Deserialize;
use serde_json::value::RawValue;

pub use crate::room_name::{MAX_ROOM_LEN, room_subject, valid_room, valid_subject_prefix};
/// Longest `id` a client may attach to an op, in bytes of its JSON text.
pub const MAX_ID_LEN: usize = 64;
/// Longest error text a refused frame produces, in bytes: the fixed wording plus a short prefix of what the client
/// sent, never the whole of it (the text goes back to the client and into the log).
pub const MAX_ERROR_TEXT: usize = 256;

/// WebSocket close codes the gateway uses. Documented in `docs/protocol.md`.
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// Gateway shutting down, or heartbeat timeout.
    pub const GOING_AWAY: u16 = 1001;
    /// The reason sent with [`GOING_AWAY`] when a draining gateway closes a connection (SIGTERM, spread over
    /// `server.drain_window`). The client library recognises it and reconnects, to another gateway through the load
    /// balancer, after an extra random delay, so the clients of one gateway do not all land on the others at once.
    pub const DRAIN_REASON: &str = "going away: reconnect";
    /// The client broke the WebSocket protocol (unmasked or malformed frame, bad close frame, ...).
    pub const PROTOCOL: u16 = 1002;
    /// A text message that is not valid UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// Sustained abuse (rate limits exceeded again and again).
    pub const POLICY: u16 = 1008;
    /// A message over `limits.max_message_size`.
    pub const TOO_BIG: u16 = 1009;
    /// Unexpected internal failure.
    pub const INTERNAL: u16 = 1011;
    /// A history room's recovery could not catch up with the room (`docs/history.md`); reconnect and recover again.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The token expired and was not refreshed.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// The client did not read fast enough (overflow policy `disconnect`, or write timeout).
    pub const SLOW_CONSUMER: u16 = 4008;
}

/// Error codes carried by `{"op":"error"}` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Not JSON, unknown op, missing or mistyped field, binary frame.
    BadRequest,
    /// The room name is not in the safe set.
    InvalidRoom,
    /// Publish or leave for a room the connection has not joined.
    NotJoined,
    /// The payload does not fit (e.g. over NATS's max payload).
    TooLarge,
    /// NATS is down, or did not accept the publish in time.
    Unavailable,
    /// The connection's permissions do not allow this room.
    Forbidden,
    /// Over the per-connection or per-user message or byte rate.
    RateLimited,
    /// Over `rooms.max_rooms_per_connection`.
    TooManyRooms,
    /// A `refresh` token was refused.
    Unauthorized,
}

impl ErrorCode {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidRoom => "invalid_room",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::Unauthorized => "unauthorized",
        }
    }
}

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

// ---- outgoing frames -------------------------------------------------------------------------------------------

fn push_json_str(buf: &mut Vec<u8>, s: &str) {
    // serde_json never fails writing a &str into a Vec.
    let _ = serde_json::to_writer(&mut *buf, s);
}

/// `{"op":"welcome","conn":C,"gateway":G,"user":U?}`
pub fn welcome(conn: &str, gateway: &str, user: Option<&str>) -> String {
    let mut b = Vec::with_capacity(64);
    b.extend_from_slice(br#"{"op":"welcome","conn":"#);
    push_json_str(&mut b, conn);
    b.extend_from_slice(br#","gateway":"#);
    push_json_str(&mut b, gateway);
    if let Some(u) = user {
        b.extend_from_slice(br#","user":"#);
        push_json_str(&mut b, u);
    }
    b.push(b'}');
    into_string(b)
}

/// `{"op":"ack","id":N}`
pub fn ack(id: &str) -> String {
    format!(r#"{{"op":"ack","id":{id}}}"#)
}

/// `{"op":"ack","id":N,"seq":S}`: a publish stored in a history room.
pub fn ack_seq(id: &str, seq: u64) -> String {
    format!(r#"{{"op":"ack","id":{id},"seq":{seq}}}"#)
}

/// The ack of a join of a history room, or of a recovering join: `{"op":"ack","id":N?,"room":R,"recovered":B?,
/// "epoch":E?,"seq":L?}`. `recovered` answers a join with `since`; `epoch` and `seq` (the room's last stored message)
/// are there whenever the stream answered. Sent even without an id: the client needs the position.
pub fn ack_join(id: Option<&str>, room: &str, recovered: Option<bool>, position: Option<(&str, u64)>) -> String {
    let mut b = Vec::with_capacity(96 + room.len());
    b.extend_from_slice(br#"{"op":"ack","#);
    if let Some(id) = id {
        b.extend_from_slice(br#""id":"#);
        b.extend_from_slice(id.as_bytes());
        b.push(b',');
    }
    b.extend_from_slice(br#""room":"#);
    push_json_str(&mut b, room);
    if let Some(r) = recovered {
        b.extend_from_slice(if r {
            br#","recovered":true"#
        } else {
            br#","recovered":false"#
        });
    }
    if let Some((epoch, seq)) = position {
        b.extend_from_slice(br#","epoch":"#);
        push_json_str(&mut b, epoch);
        b.extend_from_slice(format!(r#","seq":{seq}"#).as_bytes());
    }
    b.push(b'}');
    into_string(b)
}

/// `{"op":"history","id":M,"room":R,"epoch":E,"messages":[{"seq":..,"data":..,"from":..},...]}`.
pub fn history(id: Option<&str>, room: &str, epoch: &str, messages: &[(u64, &[u8], Option<&str>)]) -> String {
    let size: usize = messages
        .iter()
        .map(|(_, p, f)| 48 + p.len() * 4 / 3 + f.map_or(0, str::len))
        .sum();
    let mut b = Vec::with_capacity(96 + room.len() + epoch.len() + size);
    b.extend_from_slice(br#"{"op":"history","#);
    if let Some(id) = id {
        b.extend_from_slice(br#""id":"#);
        b.extend_from_slice(id.as_bytes());
        b.push(b',');
    }
    b.extend_from_slice(br#""room":"#);
    push_json_str(&mut b, room);
    b.extend_from_slice(br#","epoch":"#);
    push_json_str(&mut b, epoch);
    b.extend_from_slice(br#","messages":["#);
    for (i, (seq, payload, from)) in messages.iter().enumerate() {
        if i > 0 {
            b.push(b',');
        }
        b.extend_from_slice(format!(r#"{{"seq":{seq}"#).as_bytes());
        push_payload(&mut b, payload);
        push_from(&mut b, *from);
        b.push(b'}');
    }
    b.extend_from_slice(b"]}");
    into_string(b)
}

/// `{"op":"pong"}` (with the `id` when given).
pub fn pong(id: Option<&str>) -> String {
    match id {
        Some(id) => format!(r#"{{"op":"pong","id":{id}}}"#),
        None => r#"{"op":"pong"}"#.to_string(),
    }
}

/// `message` cut to at most [`MAX_ERROR_TEXT`] bytes, at a character boundary, marked with `…` when cut.
fn short(message: &str) -> Cow<'_, str> {
    if message.len() <= MAX_ERROR_TEXT {
        return Cow::Borrowed(message);
    }
    let mut end = MAX_ERROR_TEXT - '…'.len_utf8();
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…", &message[..end]))
}

/// `{"op":"error","id":N?,"code":C,"message":M}`; `M` is cut to [`MAX_ERROR_TEXT`] bytes.
pub fn error(id: Option<&str>, code: ErrorCode, message: &str) -> String {
    let message = short(message);
    let message = message.as_ref();
    let mut b = Vec::with_capacity(64 + message.len());
    b.extend_from_slice(br#"{"op":"error","#);
    if let Some(id) = id {
        b.extend_from_slice(br#""id":"#);
        b.extend_from_slice(id.as_bytes());
        b.push(b',');
    }
    b.extend_from_slice(br#""code":""#);
    b.extend_from_slice(code.as_str().as_bytes());
    b.extend_from_slice(br#"","message":"#);
    push_json_str(&mut b, message);
    b.push(b'}');
    into_string(b)
}

/// `{"op":"gap","room":R,"dropped":N}`: N messages of room R were dropped for this client.
pub fn gap(room: &str, dropped: u64) -> String {
    let mut b = Vec::with_capacity(48 + room.len());
    b.extend_from_slice(br#"{"op":"gap","room":"#);
    push_json_str(&mut b, room);
    b.extend_from_slice(format!(r#","dropped":{dropped}}}"#).as_bytes());
    into_string(b)
}

/// `{"op":"left","room":R,"reason":M}`: the gateway removed the connection from a room (e.g. after a refresh).
pub fn left(room: &str, reason: &str) -> String {
    let mut b = Vec::with_capacity(48 + room.len());
    b.extend_from_slice(br#"{"op":"left","room":"#);
    push_json_str(&mut b, room);
    b.extend_from_slice(br#","reason":"#);
    push_json_str(&mut b, reason);
    b.push(b'}');
    into_string(b)
}

/// `{"op":"token_expiring","in":S}`: the token expires in S seconds; send `refresh`.
pub fn token_expiring(secs: u64) -> String {
    format!(r#"{{"op":"token_expiring","in":{secs}}}"#)
}

/// How a NATS payload is carried in a message frame.
pub enum Payload<'a> {
    /// Valid JSON: embedded as `data`.
    Json(&'a str),
    /// UTF-8 but not JSON: embedded as a JSON string in `data`.
    Text(&'a str),
    /// Anything else: base64 in `data_b64`.
    Binary(&'a [u8]),
}

/// Classifies a NATS payload. Empty payloads are text (`""`).
pub fn classify_payload(payload: &[u8]) -> Payload<'_> {
    match std::str::from_utf8(payload) {
        Ok(text) => {
            if !text.is_empty() && serde_json::from_str::<&RawValue>(text).is_ok() {
                Payload::Json(text.trim())
            } else {
                Payload::Text(text)
            }
        }
        Err(_) => Payload::Binary(payload),
    }
}

/// `{"op":"message","room":R,"data":D,"from":F?,"seq":S?}` built once per NATS message; every recipient shares it.
/// `seq` is the stream sequence of a history room's message.
pub fn message(room: &str, payload: &[u8], from: Option<&str>, seq: Option<u64>) -> String {
    let mut b = Vec::with_capacity(message_capacity(room, payload, from));
    push_message(&mut b, room, payload, from, seq);
    into_string(b)
}

/// [`message`] as a complete WebSocket frame, built in place: the fan-out builds it once per NATS message and every
/// member of the room gets the same bytes.
pub fn message_frame(room: &str, payload: &[u8], from: Option<&str>, seq: Option<u64>) -> crate::frame::Frame {
    crate::frame::Frame::text_with(message_capacity(room, payload, from), |b| {
        push_message(b, room, payload, from, seq)
    })
}

fn message_capacity(room: &str, payload: &[u8], from: Option<&str>) -> usize {
    64 + room.len() + payload.len() + from.map_or(0, str::len)
}

fn push_message(b: &mut Vec<u8>, room: &str, payload: &[u8], from: Option<&str>, seq: Option<u64>) {
    b.extend_from_slice(br#"{"op":"message","room":"#);
    push_json_str(b, room);
    push_payload(b, payload);
    push_from(b, from);
    if let Some(seq) = seq {
        b.extend_from_slice(br#","seq":"#);
        b.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    }
    b.push(b'}');
}

fn push_from(b: &mut Vec<u8>, from: Option<&str>) {
    if let Some(from) = from {
        b.extend_from_slice(br#","from":"#);
        push_json_str(b, from);
    }
}

/// `,"data":D` (or `,"data_b64":"..."`) for a NATS payload.
fn push_payload(b: &mut Vec<u8>, payload: &[u8]) {
    match classify_payload(payload) {
        Payload::Json(json) => {
            b.extend_from_slice(br#","data":"#);
            b.extend_from_slice(json.as_bytes());
        }
        Payload::Text(text) => {
            b.extend_from_slice(br#","data":"#);
            push_json_str(b, text);
        }
        Payload::Binary(bytes) => {
            b.extend_from_slice(br#","data_b64":""#);
            b.extend_from_slice(base64::engine::general_purpose::STANDARD.encode(bytes).as_bytes());
            b.push(b'"');
        }
    }
}

fn into_string(b: Vec<u8>) -> String {
    // Every byte above comes from ASCII literals, serde_json output or text that was already valid UTF-8.
    String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
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

    use super::*;

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
    fn room_names() {
        for ok in ["lobby", "a", "team-42_x", "user:1@org", &"a".repeat(128)] {
            assert!(valid_room(ok), "{ok}");
        }
        for bad in [
            "",
            "a.b",
            "*",
            ">",
            "a.>",
            "$SYS.x",
            " ",
            "a b",
            "\r\nPUB x",
            "\0",
            "é",
            &"a".repeat(129),
            "a\tb",
        ] {
            assert!(!valid_room(bad), "{bad:?}");
        }
    }

    #[test]
    fn message_frames() {
        assert_eq!(
            message("r", br#"{"a":1}"#, Some("c1"), None),
            r#"{"op":"message","room":"r","data":{"a":1},"from":"c1"}"#
        );
        assert_eq!(
            message("r", b"hello", None, None),
            r#"{"op":"message","room":"r","data":"hello"}"#
        );
        assert_eq!(
            message("r", &[0xff, 0x00], None, None),
            r#"{"op":"message","room":"r","data_b64":"/wA="}"#
        );
        assert_eq!(
            message("r", b"", None, None),
            r#"{"op":"message","room":"r","data":""}"#
        );
        let v: serde_json::Value = serde_json::from_str(&message("r", b"a\"b\n", None, None)).unwrap();
        assert_eq!(v["data"], "a\"b\n");
    }

    #[test]
    fn error_frames_are_json() {
        let v: serde_json::Value = serde_json::from_str(&error(Some("3"), ErrorCode::NotJoined, "no \"x\"")).unwrap();
        assert_eq!(v["id"], 3);
        assert_eq!(v["code"], "not_joined");
        let v: serde_json::Value = serde_json::from_str(&gap("r", 5)).unwrap();
        assert_eq!(v["dropped"], 5);
    }

    #[test]
    fn compaction_keeps_strings() {
        assert_eq!(compact_json(r#"{ "a b" : "c\" d" }"#), r#"{"a b":"c\" d"}"#);
        assert!(matches!(compact_json(r#"{"a":1}"#), Cow::Borrowed(_)));
    }

    #[test]
    fn arbitrary_input_never_panics() {
        // A cheap deterministic fuzz pass (xorshift), mixing random bytes with fragments of valid requests.
        let pieces = [
            r#"{"op":"#,
            r#""publish""#,
            r#","room":"#,
            r#""a""#,
            r#","data":"#,
            "[",
            "]",
            "{",
            "}",
            ",",
            "\\",
            "\"",
            "null",
            "1e999",
            "-",
            r"\u0000",
            " ",
        ];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let mut text = String::new();
            for _ in 0..(next() % 12) {
                let r = next();
                if r % 3 == 0 {
                    text.push(char::from_u32((r >> 8) as u32 % 0x11_0000).unwrap_or('?'));
                } else {
                    text.push_str(pieces[(r >> 8) as usize % pieces.len()]);
                }
            }
            if let Ok(Request {
                op: ClientOp::Publish { data, .. },
                ..
            }) = parse_request(&text)
            {
                assert!(
                    serde_json::from_str::<serde_json::Value>(&data).is_ok(),
                    "{text:?} -> {data:?}"
                );
            }
            let _ = compact_json(&text);
            let _ = message("r", text.as_bytes(), None, None);
        }
    }

    #[test]
    fn error_messages_never_echo_more_than_a_short_prefix() {
        // The attack: a bad field whose 60 KB value serde quotes in its error text.
        let huge = format!(r#"{{"op":"ping","id":1,"echo":"{}"}}"#, "é".repeat(30_000));
        let e = parse_request(&huge).map(|_| ()).expect_err("bad echo field");
        let frame = error(e.id, ErrorCode::BadRequest, &e.message);
        let v: serde_json::Value = serde_json::from_str(&frame).expect("valid JSON");
        let msg = v["message"].as_str().expect("message");
        assert!(msg.len() <= MAX_ERROR_TEXT, "{} bytes", msg.len());
        assert!(frame.len() < 400, "{} bytes", frame.len());
        // Any other message is cut too, at a character boundary.
        let cut = short(&"é".repeat(300)).into_owned();
        assert!(cut.len() <= MAX_ERROR_TEXT && cut.ends_with('…'), "{cut}");
        assert!(error(None, ErrorCode::BadRequest, &"é".repeat(300)).contains(cut.as_str()));
        assert_eq!(short("short"), "short");
    }
}
