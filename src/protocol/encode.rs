//! Encoding of the frames the gateway sends (welcome, ack, pong, error, gap, left, token_expiring, message,
//! history): each written straight into a byte buffer, with no intermediate `serde_json::Value`. A room message frame
//! is built once per NATS message ([`message_frame`]) and then shared by every recipient.

use std::borrow::Cow;

use base64::Engine;
use serde_json::value::RawValue;

use super::codes::ErrorCode;

/// Longest error text a refused frame produces, in bytes: the fixed wording plus a short prefix of what the client
/// sent, never the whole of it (the text goes back to the client and into the log).
pub const MAX_ERROR_TEXT: usize = 256;

fn push_json_str(buf: &mut Vec<u8>, s: &str) {
    // serde_json never fails writing a &str into a Vec.
    let _ = serde_json::to_writer(&mut *buf, s);
}

/// `{"op":"welcome","conn":C,"gateway":G,"user":U?,"rpc_max_inflight":N?}`; `rpc_max_inflight` (when RPC is on) is
/// `rpc.max_inflight_per_connection`, so a client can bound its own pending calls instead of being refused.
pub fn welcome(conn: &str, gateway: &str, user: Option<&str>, rpc_max_inflight: Option<usize>) -> String {
    let mut b = Vec::with_capacity(96);
    b.extend_from_slice(br#"{"op":"welcome","conn":"#);
    push_json_str(&mut b, conn);
    b.extend_from_slice(br#","gateway":"#);
    push_json_str(&mut b, gateway);
    if let Some(u) = user {
        b.extend_from_slice(br#","user":"#);
        push_json_str(&mut b, u);
    }
    if let Some(n) = rpc_max_inflight {
        b.extend_from_slice(br#","rpc_max_inflight":"#);
        b.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }
    b.push(b'}');
    into_string(b)
}

/// How a server-side room (token `subs`, a `subscribe` command) came out: joined (with the room's position for a
/// history room, and `recovered` when the client asked to recover it), or not joined, with the error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerRoom<'a> {
    /// Joined.
    Joined {
        /// The room.
        room: &'a str,
        /// Answer to a recovery asked for in the upgrade's `recover`.
        recovered: Option<bool>,
        /// `(epoch, seq)` of a history room whose stream answered.
        position: Option<(&'a str, u64)>,
    },
    /// Not joined.
    Failed {
        /// The room as the token or the command named it.
        room: &'a str,
        /// Why.
        code: ErrorCode,
    },
}

fn push_server_room(b: &mut Vec<u8>, r: &ServerRoom<'_>) {
    match r {
        ServerRoom::Joined {
            room,
            recovered,
            position,
        } => {
            b.extend_from_slice(br#""room":"#);
            push_json_str(b, room);
            if let Some((epoch, seq)) = position {
                b.extend_from_slice(br#","epoch":"#);
                push_json_str(b, epoch);
                b.extend_from_slice(format!(r#","seq":{seq}"#).as_bytes());
            }
            if let Some(r) = recovered {
                b.extend_from_slice(if *r {
                    br#","recovered":true"#
                } else {
                    br#","recovered":false"#
                });
            }
        }
        ServerRoom::Failed { room, code } => {
            b.extend_from_slice(br#""room":"#);
            push_json_str(b, room);
            b.extend_from_slice(br#","error":"#);
            push_json_str(b, code.as_str());
        }
    }
}

/// `{"op":"welcome","conn":C,"gateway":G,"user":U?,"rooms":[{"room":R,"epoch":E?,"seq":S?,"recovered":B?} or
/// {"room":R,"error":CODE}, ...]}`: the welcome of a connection with server-side rooms.
pub fn welcome_with_rooms(
    conn: &str,
    gateway: &str,
    user: Option<&str>,
    rpc_max_inflight: Option<usize>,
    rooms: &[ServerRoom<'_>],
) -> String {
    let mut w = welcome(conn, gateway, user, rpc_max_inflight).into_bytes();
    w.pop();
    w.extend_from_slice(br#","rooms":["#);
    for (i, r) in rooms.iter().enumerate() {
        if i > 0 {
            w.push(b',');
        }
        w.push(b'{');
        push_server_room(&mut w, r);
        w.push(b'}');
    }
    w.extend_from_slice(b"]}");
    into_string(w)
}

/// `{"op":"joined","room":R,"epoch":E?,"seq":S?}`: a backend made the connection join R (`subscribe` over NATS).
pub fn joined(room: &ServerRoom<'_>) -> String {
    let mut b = Vec::with_capacity(64);
    b.extend_from_slice(br#"{"op":"joined","#);
    push_server_room(&mut b, room);
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

/// `{"op":"rpc_result","id":N,"data":D}`: a service's answer; the payload is carried as in room messages.
pub fn rpc_result(id: &str, payload: &[u8]) -> String {
    let mut b = Vec::with_capacity(48 + id.len() + payload.len());
    b.extend_from_slice(br#"{"op":"rpc_result","id":"#);
    b.extend_from_slice(id.as_bytes());
    push_payload(&mut b, payload);
    b.push(b'}');
    into_string(b)
}

/// `{"op":"rpc_result","id":N,"error":{"code":C,"message":M}}`: the service answered an error (ADR-32); `M` is cut to
/// [`MAX_ERROR_TEXT`] bytes.
pub fn rpc_error(id: &str, code: &str, message: &str) -> String {
    let message = short(message);
    let mut b = Vec::with_capacity(64 + id.len() + code.len() + message.len());
    b.extend_from_slice(br#"{"op":"rpc_result","id":"#);
    b.extend_from_slice(id.as_bytes());
    b.extend_from_slice(br#","error":{"code":"#);
    push_json_str(&mut b, code);
    b.extend_from_slice(br#","message":"#);
    push_json_str(&mut b, &message);
    b.extend_from_slice(b"}}");
    into_string(b)
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

fn push_user(b: &mut Vec<u8>, user: Option<&str>) {
    b.extend_from_slice(br#","user":"#);
    match user {
        Some(u) => push_json_str(b, u),
        None => b.extend_from_slice(b"null"),
    }
}

fn push_head(b: &mut Vec<u8>, op: &str, id: Option<&str>, room: &str) {
    b.extend_from_slice(br#"{"op":""#);
    b.extend_from_slice(op.as_bytes());
    b.extend_from_slice(b"\",");
    if let Some(id) = id {
        b.extend_from_slice(br#""id":"#);
        b.extend_from_slice(id.as_bytes());
        b.push(b',');
    }
    b.extend_from_slice(br#""room":"#);
    push_json_str(b, room);
}

/// `{"op":"presence","id":N,"room":R,"count":C,"users":U,"members":[{"conn":..,"user":..},...]}`; with `members`
/// `None` (a room over `presence.max_members`): `"truncated":true` instead of the list.
pub fn presence<'a>(
    id: Option<&str>,
    room: &str,
    count: u64,
    users: u64,
    members: Option<impl ExactSizeIterator<Item = (&'a str, Option<&'a str>)>>,
) -> String {
    let n = members.as_ref().map_or(0, |m| m.len());
    let mut b = Vec::with_capacity(96 + room.len() + n * 48);
    push_head(&mut b, "presence", id, room);
    b.extend_from_slice(format!(r#","count":{count},"users":{users}"#).as_bytes());
    match members {
        Some(members) => {
            b.extend_from_slice(br#","members":["#);
            for (i, (conn, user)) in members.enumerate() {
                if i > 0 {
                    b.push(b',');
                }
                b.extend_from_slice(br#"{"conn":"#);
                push_json_str(&mut b, conn);
                push_user(&mut b, user);
                b.push(b'}');
            }
            b.extend_from_slice(b"]}");
        }
        None => b.extend_from_slice(br#","truncated":true}"#),
    }
    into_string(b)
}

/// `{"op":"presence_stats","id":N,"room":R,"count":C,"users":U}`
pub fn presence_stats(id: Option<&str>, room: &str, count: u64, users: u64) -> String {
    let mut b = Vec::with_capacity(80 + room.len());
    push_head(&mut b, "presence_stats", id, room);
    b.extend_from_slice(format!(r#","count":{count},"users":{users}}}"#).as_bytes());
    into_string(b)
}

/// `{"op":"member_joined","room":R,"conn":C,"user":U,"first":B}`
pub fn member_joined(room: &str, conn: &str, user: Option<&str>, first: bool) -> String {
    let mut b = Vec::with_capacity(96 + room.len());
    push_head(&mut b, "member_joined", None, room);
    b.extend_from_slice(br#","conn":"#);
    push_json_str(&mut b, conn);
    push_user(&mut b, user);
    b.extend_from_slice(if first {
        br#","first":true}"#
    } else {
        br#","first":false}"#
    });
    into_string(b)
}

/// `{"op":"member_left","room":R,"conn":C,"user":U,"last":B,"reason":"leave"|"disconnect"|"gateway_lost"}`
pub fn member_left(room: &str, conn: &str, user: Option<&str>, last: bool, reason: &str) -> String {
    let mut b = Vec::with_capacity(112 + room.len());
    push_head(&mut b, "member_left", None, room);
    b.extend_from_slice(br#","conn":"#);
    push_json_str(&mut b, conn);
    push_user(&mut b, user);
    b.extend_from_slice(if last { br#","last":true"# } else { br#","last":false"# });
    b.extend_from_slice(br#","reason":"#);
    push_json_str(&mut b, reason);
    b.push(b'}');
    into_string(b)
}

fn into_string(b: Vec<u8>) -> String {
    // Every byte above comes from ASCII literals, serde_json output or text that was already valid UTF-8.
    String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::parse_request;

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
    fn welcome_frames() {
        assert_eq!(
            welcome("gw-1", "gw", Some("al\"ice"), None),
            r#"{"op":"welcome","conn":"gw-1","gateway":"gw","user":"al\"ice"}"#
        );
        assert_eq!(
            welcome("gw-2", "gw", None, Some(16)),
            r#"{"op":"welcome","conn":"gw-2","gateway":"gw","rpc_max_inflight":16}"#
        );
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

    #[test]
    fn presence_frames_are_the_contract() {
        let members = [("gw-1", Some("alice")), ("gw-2", None)];
        let v: serde_json::Value =
            serde_json::from_str(&presence(Some("7"), "a:b", 2, 1, Some(members.iter().copied()))).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"op":"presence","id":7,"room":"a:b","count":2,"users":1,
                "members":[{"conn":"gw-1","user":"alice"},{"conn":"gw-2","user":null}]})
        );
        let none: Option<std::iter::Empty<(&str, Option<&str>)>> = None;
        let v: serde_json::Value = serde_json::from_str(&presence(Some("\"x\""), "r", 5000, 9, none)).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"op":"presence","id":"x","room":"r","count":5000,"users":9,"truncated":true})
        );
        let v: serde_json::Value = serde_json::from_str(&presence_stats(Some("1"), "r", 3, 2)).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"op":"presence_stats","id":1,"room":"r","count":3,"users":2})
        );
        let v: serde_json::Value = serde_json::from_str(&member_joined("r", "c\"1", None, true)).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"op":"member_joined","room":"r","conn":"c\"1","user":null,"first":true})
        );
        let v: serde_json::Value =
            serde_json::from_str(&member_left("r", "c", Some("u"), false, "gateway_lost")).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"op":"member_left","room":"r","conn":"c","user":"u","last":false,"reason":"gateway_lost"})
        );
    }
}
