//! Fuzz target: the client op parser (`protocol::parse_request`) and the frames built from what it returns.
//!
//! Never panics, on any text. For an accepted op: the `id` is at most `MAX_ID_LEN` bytes of one JSON number or string
//! and comes back unchanged in `ack`, `pong` and `error` frames; a `publish`'s `data` is compact JSON with the same
//! value as the client's; every frame the gateway builds from client text is valid JSON. A refused frame's error text
//! stays short whatever the client sent (it is echoed to the client and logged).
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use roomwire::protocol::{self, ClientOp, ErrorCode, MAX_ERROR_TEXT, MAX_ID_LEN};
use serde_json::value::RawValue;

fuzz_target!(|data: &[u8]| {
    // WebSocket text frames are UTF-8 (tungstenite refuses others with 1007); NATS payloads are any bytes.
    check_message(data);
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = protocol::compact_json(text);
    match protocol::parse_request(text) {
        Ok(req) => check_accepted(text, req),
        Err(e) => {
            assert!(
                e.message.len() <= MAX_ERROR_TEXT,
                "error text of {} bytes: {:?}",
                e.message.len(),
                e.message
            );
            if let Some(id) = e.id {
                check_id(id);
            }
            assert_json(protocol::error(e.id, ErrorCode::BadRequest, &e.message));
        }
    }
});

fn check_accepted(text: &str, req: protocol::Request<'_>) {
    if let Some(id) = req.id {
        check_id(id);
    }
    match req.op {
        ClientOp::Join { room, since } => {
            check_room(&room);
            if let Some(since) = since {
                assert!(since.epoch.len() <= protocol::MAX_EPOCH_LEN);
            }
        }
        ClientOp::Leave { room }
        | ClientOp::History { room, .. }
        | ClientOp::Presence { room }
        | ClientOp::PresenceStats { room } => check_room(&room),
        ClientOp::Publish { room, data, msg_id, .. } => {
            check_room(&room);
            if let Some(m) = msg_id {
                assert!(protocol::valid_msg_id(&m), "accepted msg_id {m:?}");
            }
            // `data` is the client's value, compacted: valid JSON, already compact, never longer than the original.
            let raw: BTreeMap<String, &RawValue> = serde_json::from_str(text).expect("an accepted op is a JSON object");
            let original = raw.get("data").expect("publish has data").get();
            assert!(data.len() <= original.len());
            assert!(
                matches!(protocol::compact_json(&data), std::borrow::Cow::Borrowed(_)),
                "not compact: {data:?}"
            );
            let a: Result<serde_json::Value, _> = serde_json::from_str(original);
            let b: Result<serde_json::Value, _> = serde_json::from_str(&data);
            match (a, b) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "compaction changed the value"),
                // Numbers serde_json cannot hold (1e999) fail both ways; anything else must agree.
                (a, b) => assert_eq!(a.is_ok(), b.is_ok(), "{original:?} -> {data:?}"),
            }
            assert_json(protocol::message(&room, data.as_bytes(), None, Some(u64::MAX)));
        }
        ClientOp::Rpc { data, .. } => {
            // `id` is required; the method is checked by the connection (so the error carries the id).
            let id = req.id.expect("an accepted rpc has an id");
            assert!(
                matches!(protocol::compact_json(&data), std::borrow::Cow::Borrowed(_)),
                "not compact: {data:?}"
            );
            assert_json(protocol::rpc_result(id, data.as_bytes()));
        }
        ClientOp::Ping => assert_json(protocol::pong(req.id)),
        // The token is only handed to the verifier, which has its own tests.
        ClientOp::Refresh { .. } => {}
    }
}

/// An accepted `id` is one JSON number or string of at most `MAX_ID_LEN` bytes, echoed byte for byte.
fn check_id(id: &str) {
    assert!(id.len() <= MAX_ID_LEN, "id of {} bytes", id.len());
    let v: &RawValue = serde_json::from_str(id).expect("id is one JSON value");
    assert_eq!(v.get(), id, "id has surrounding whitespace");
    assert!(
        id.starts_with('"') || id.starts_with('-') || id.as_bytes()[0].is_ascii_digit(),
        "id {id:?}"
    );
    for frame in [
        protocol::ack(id),
        protocol::pong(Some(id)),
        protocol::error(Some(id), ErrorCode::NotJoined, "x"),
    ] {
        let fields: BTreeMap<String, &RawValue> = serde_json::from_str(&frame).expect("frame is a JSON object");
        assert_eq!(
            fields.get("id").map(|v| v.get()),
            Some(id),
            "id not echoed exactly in {frame}"
        );
    }
}

/// Whatever room text a client sends, the frames that name it are valid JSON that carry it exactly; and if the room
/// is in the safe set, its subject is a valid NATS subject.
fn check_room(room: &str) {
    for frame in [protocol::gap(room, u64::MAX), protocol::left(room, "forbidden")] {
        let v: serde_json::Value = serde_json::from_str(&frame).expect("frame is JSON");
        assert_eq!(v["room"].as_str(), Some(room));
    }
    if protocol::valid_room(room) {
        let subject = protocol::room_subject("rooms", room);
        assert!(async_nats::Subject::validated(&subject).is_ok(), "{subject:?}");
        assert_eq!(subject.split('.').count(), 2);
    }
}

/// A NATS payload reaches the browser intact: JSON embedded as is, other text as a JSON string, bytes as base64.
fn check_message(payload: &[u8]) {
    let frame = protocol::message("r", payload, Some("c1"), None);
    let fields: BTreeMap<String, &RawValue> = serde_json::from_str(&frame).expect("message frame is a JSON object");
    assert_eq!(fields.get("from").map(|v| v.get()), Some(r#""c1""#));
    match (std::str::from_utf8(payload), fields.get("data"), fields.get("data_b64")) {
        (Ok(text), Some(data), None) => {
            let as_string: Result<String, _> = serde_json::from_str(data.get());
            assert!(
                data.get() == text.trim() || as_string.as_deref().ok() == Some(text),
                "{text:?} carried as {}",
                data.get()
            );
        }
        (Err(_), None, Some(b64)) => assert!(b64.get().starts_with('"')),
        _ => panic!("wrong payload field in {frame:?}"),
    }
}

/// Syntax check only: `RawValue` accepts numbers that `serde_json::Value` cannot hold (1e999), as browsers do.
fn assert_json(frame: String) {
    if let Err(e) = serde_json::from_str::<&RawValue>(&frame) {
        panic!("frame is not JSON ({e}): {frame:?}");
    }
}
