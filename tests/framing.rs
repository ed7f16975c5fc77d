//! WebSocket framing, written by hand ([`common::frames`]) over real TLS since tungstenite's client refuses to send
//! invalid frames: lying 64-bit lengths and oversized messages (1009), framing violations (1002), reserved close
//! codes, invalid UTF-8 (1007), and a fragmented message held open past `limits.fragment_timeout` (1008). An
//! ordinary client (the [`Bystander`]) keeps receiving throughout.

mod common;

use std::time::Duration;

use common::{frames::*, hostile::*, *};
use serde_json::json;
use tokio::time::Instant;

/// Sends `bytes` on a fresh raw connection and returns the close (code, reason).
async fn close_after(h: &Harness, bytes: &[u8]) -> (u16, String) {
    let mut ws = RawWs::connect(&h.gw).await;
    ws.send(bytes).await;
    let (code, reason, texts) = ws.expect_close().await;
    assert!(texts.is_empty(), "no reply before the close: {texts:?}");
    (code, reason)
}

const PROTOCOL_ERROR: (u16, &str) = (1002, "protocol error");
const TOO_BIG: (u16, &str) = (1009, "message too big");

/// Lengths of 2^63 and beyond (the most significant bit must be 0), and the largest legal 64-bit length: tungstenite
/// sees a frame over `max_frame_size` from its header alone and reports a capacity error, so the close is 1009.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_lengths_of_2_pow_63_close_1009() {
    let h = Harness::start(|_| {}).await;
    for len in [1u64 << 63, u64::MAX, (1 << 63) - 1, (MAX_FRAME + 1) as u64] {
        let mut bytes = header(true, 0, TEXT, true, len);
        bytes.extend_from_slice(b"{\"op\":");
        let (code, reason) = close_after(&h, &bytes).await;
        assert_eq!((code, reason.as_str()), TOO_BIG, "length {len}");
    }
    h.by.assert_receiving().await;
}

/// A message over `max_message_size`, sent as one frame over `max_frame_size`, or as frames each within it: 1009.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_close_1009() {
    let h = Harness::start(|_| {}).await;
    let big = vec![b' '; MAX_FRAME + 1];
    let (code, reason) = close_after(&h, &client(TEXT, &big)).await;
    assert_eq!((code, reason.as_str()), TOO_BIG, "one frame over max_frame_size");
    let (code, reason) = close_after(&h, &client(BINARY, &big)).await;
    assert_eq!((code, reason.as_str()), TOO_BIG, "binary frame over max_frame_size");
    // Endless non-empty fragments: the reassembled message passes max_message_size.
    let mut ws = RawWs::connect(&h.gw).await;
    ws.send(&frame(false, 0, TEXT, true, &[b' '; 1000])).await;
    // 100 MB of fragments in all: far more than loopback socket buffers absorb, so the flood can only stop early
    // because the server closed (a limit of 1,000 fragments, 1 MB, could all sit in the buffers of a loaded machine
    // before the server read the first 64 KiB).
    let (code, reason, texts, written) = ws
        .flood_until_close(frame(false, 0, CONT, true, &[b' '; 1000]), 100_000)
        .await;
    assert_eq!((code, reason.as_str()), TOO_BIG, "after {written} fragments: {texts:?}");
    assert!(written < 100_000, "the server closed before the flood ended");
    h.by.assert_receiving().await;
}

/// Every framing violation is closed with 1002 "protocol error", and nothing is answered before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_violations_close_1002() {
    let h = Harness::start(|_| {}).await;
    let ping_op = br#"{"op":"ping"}"#;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unmasked text frame", frame(true, 0, TEXT, false, ping_op)),
        ("unmasked ping", frame(true, 0, PING, false, b"")),
        ("RSV1 on a text frame", frame(true, 4, TEXT, true, ping_op)),
        ("RSV2 on a text frame", frame(true, 2, TEXT, true, ping_op)),
        ("RSV3 on a text frame", frame(true, 1, TEXT, true, ping_op)),
        ("RSV1 on a ping", frame(true, 4, PING, true, b"")),
        ("ping over 125 bytes", client(PING, &[b'p'; 126])),
        ("pong over 125 bytes", client(PONG, &[b'p'; 126])),
        ("close over 125 bytes", close(1000, &"c".repeat(124))),
        ("fragmented ping", frame(false, 0, PING, true, b"x")),
        ("fragmented close", frame(false, 0, CLOSE, true, &1000u16.to_be_bytes())),
        ("continuation without a start", client(CONT, ping_op)),
        (
            "new text frame inside a fragmented message",
            [frame(false, 0, TEXT, true, b"{"), client(TEXT, ping_op)].concat(),
        ),
        ("reserved opcode 3", client(0x3, b"")),
        ("reserved opcode 0xB", client(0xB, b"")),
        ("close with a 1-byte body", client(CLOSE, &[0x03])),
    ];
    for (what, bytes) in &cases {
        let (code, reason) = close_after(&h, bytes).await;
        assert_eq!((code, reason.as_str()), PROTOCOL_ERROR, "{what}");
    }
    h.by.assert_receiving().await;
}

/// A close frame with a code no endpoint may send (reserved, or outside 1000-4999): tungstenite answers it itself
/// with 1002 and its own reason, "Protocol violation". A valid code is echoed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_with_a_reserved_code_closes_1002() {
    let h = Harness::start(|_| {}).await;
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, u16::MAX] {
        let (got, reason) = close_after(&h, &close(code, "")).await;
        assert_eq!((got, reason.as_str()), (1002, "Protocol violation"), "code {code}");
    }
    for code in [1000u16, 1001, 3000, 4999] {
        let (got, _) = close_after(&h, &close(code, "bye")).await;
        assert_eq!(got, code, "a valid close code is echoed");
    }
    h.by.assert_receiving().await;
}

/// Invalid UTF-8 in a text message, whole or split across fragments (and in a close reason): 1007.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_closes_1007() {
    let h = Harness::start(|_| {}).await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "lone continuation byte",
            client(TEXT, b"{\"op\":\"ping\",\"x\":\"\x80\"}"),
        ),
        ("overlong encoding", client(TEXT, b"\xc0\xaf")),
        ("surrogate", client(TEXT, b"\xed\xa0\x80")),
        ("beyond U+10FFFF", client(TEXT, b"\xf4\x90\x80\x80")),
        (
            "split across fragments, invalid once joined",
            [frame(false, 0, TEXT, true, b"\xe2\x82"), client(CONT, b"\x28")].concat(),
        ),
        ("close reason", client(CLOSE, b"\x03\xe8\xff")),
    ];
    for (what, bytes) in &cases {
        let (code, reason) = close_after(&h, bytes).await;
        assert_eq!((code, reason.as_str()), (1007, "invalid UTF-8"), "{what}");
    }
    // A valid character split across two fragments is fine.
    let mut ws = RawWs::connect(&h.gw).await;
    ws.send(
        &[
            frame(false, 0, TEXT, true, b"{\"op\":\"ping\",\"id\":\"\xe2\x82"),
            client(CONT, b"\xac\"}"),
        ]
        .concat(),
    )
    .await;
    assert_eq!(ws.next_json().await, json!({"op":"pong","id":"\u{20ac}"}));
    h.by.assert_receiving().await;
}

/// Issue 22, finding 8: an open fragmented message holds tungstenite's reassembly and read buffers (about 2 x
/// `max_message_size` at worst), and pings between fragments kept it open for as long as the client liked. It may
/// now stay open `limits.fragment_timeout` from its first frame: the next frame after that closes the connection
/// with 1008 `message not completed in time`. A message completed in time, pings between its fragments, is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragmented_message_kept_open_by_pings_is_closed_at_its_deadline() {
    const DEADLINE: Duration = Duration::from_millis(400);
    let h = Harness::start(|c| c.limits.fragment_timeout = DEADLINE).await;
    let mut ws = RawWs::connect(&h.gw).await;
    // In time: fragments with a ping between them, answered as one message.
    ws.send(&frame(false, 0, TEXT, true, br#"{"op":"#)).await;
    ws.send(&client(PING, b"p")).await;
    ws.send(&frame(true, 0, CONT, true, br#""ping","id":1}"#)).await;
    assert_eq!(ws.next_json().await, json!({"op":"pong","id":1}));
    // Kept open: a ping every 50 ms (the attacker's pace), each answered, until the gateway closes.
    let opened = Instant::now();
    ws.send(&frame(false, 0, TEXT, true, &[b' '; 1000])).await;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let (code, reason) = loop {
        tick.tick().await;
        assert!(opened.elapsed() < WAIT, "the message is still open after {WAIT:?}");
        ws.send(&client(PING, b"p")).await;
        let f = ws.next_frame().await.expect("a pong or the close frame");
        match f.opcode {
            PONG => continue,
            CLOSE => break f.close_code(),
            _ => panic!("unexpected frame {f:?}"),
        }
    };
    let took = opened.elapsed();
    assert_eq!((code, reason.as_str()), (1008, "message not completed in time"));
    assert!(took >= DEADLINE, "closed after {took:?}, before the deadline");
    let (_, ended) = read_until_closed(&mut ws.rd).await;
    assert!(ended < WAIT, "TCP not closed after the close frame");
    h.by.assert_receiving().await;
}
