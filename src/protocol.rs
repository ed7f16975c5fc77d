//! Client protocol v1 (see `docs/protocol.md`): parsing of client ops, the frames the gateway sends, error codes,
//! close codes, room-name validation and the room → subject mapping.
//!
//! Everything here is pure and synchronous so it can be unit-tested and fuzzed without a network. Outgoing frames are
//! written straight into a byte buffer (no intermediate `serde_json::Value`), and a room message frame is built once
//! per NATS message and then shared by every recipient.
//!
//! The parts, each a file under `protocol/`, re-exported here so that every path is `protocol::X`: `codes` (the
//! close codes, [`close`], and [`ErrorCode`]), `parse` (client ops, [`parse_request`], and the JSON nesting and
//! compaction helpers) and `encode` (the server's frames, [`message_frame`] among them). `encode` uses `codes`;
//! nothing else depends across them. The room-name rules live in `room_name` and are re-exported here as well.

mod codes;
mod encode;
mod parse;

pub use codes::{ErrorCode, close};
pub use encode::{
    MAX_ERROR_TEXT, Payload, ServerRoom, ack, ack_join, ack_seq, classify_payload, error, gap, history, joined, left,
    member_joined, member_left, message, message_frame, pong, presence, presence_stats, rpc_error, rpc_result,
    token_expiring, welcome, welcome_with_rooms,
};
pub use parse::{
    ClientOp, DEFAULT_MAX_JSON_DEPTH, MAX_EPOCH_LEN, MAX_ID_LEN, MAX_MSG_ID_LEN, MAX_RECOVER_LEN, ParseError, Request,
    Since, compact_json, json_depth_exceeds, parse_recover, parse_request, parse_request_with_depth, valid_msg_id,
};

pub use crate::room_name::{
    MAX_METHOD_LEN, MAX_ROOM_LEN, room_subject, valid_method, valid_room, valid_subject_prefix,
};

#[cfg(test)]
mod tests {
    use super::*;

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
}
