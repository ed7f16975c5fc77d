//! Hostile JSON content after the upgrade: deep nesting, huge numbers and ids, large fields (never echoed in full),
//! hostile room names, payloads over NATS's max_payload. Each gets its exact error reply, nothing reaches NATS that
//! should not, and an ordinary client (the [`Bystander`]) keeps receiving throughout. Then what a buggy client sends
//! through a conforming WebSocket library: invalid JSON, unknown ops, missing or mistyped fields, binary frames,
//! messages over `limits.max_message_size` (1009), ops on rooms not joined.

mod common;

use bytes::Bytes;
use common::{frames::*, hostile::*, *};
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{
    Message,
    protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    },
};

/// Sends `text` as one text frame and returns the next JSON frame.
async fn reply_to(ws: &mut RawWs, text: &str) -> Value {
    ws.send(&client(TEXT, text.as_bytes())).await;
    ws.next_json().await
}

/// Waits until NATS has seen everything `nc` sent, then returns the next message on `sub` that a sentinel publish
/// through `ws` produces: proof that nothing else was published on `sub` before it.
async fn first_after(ws: &mut RawWs, sub: &mut async_nats::Subscriber, room: &str) -> Vec<u8> {
    let r = reply_to(
        ws,
        &format!(r#"{{"op":"publish","room":"{room}","data":"sentinel","id":"s"}}"#),
    )
    .await;
    assert_eq!(r, json!({"op":"ack","id":"s"}));
    next_msg(sub).await.payload.to_vec()
}

/// `data` nested beyond `limits.max_json_depth` is bad_request and never reaches NATS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_json_is_bad_request_and_never_reaches_nats() {
    // needs: finding 11 (nats)
    let h = Harness::start(|c| {
        c.limits.max_message_size = 64 * 1024;
        c.limits.max_frame_size = 64 * 1024;
    })
    .await;
    let nc = h.nats.client().await;
    let mut sub = nc.subscribe("rooms.deep").await.unwrap();
    nc.flush().await.unwrap();
    let mut ws = RawWs::connect(&h.gw).await;
    assert_eq!(
        reply_to(&mut ws, r#"{"op":"join","room":"deep","id":1}"#).await,
        json!({"op":"ack","id":1})
    );
    // Shallow nesting passes.
    let shallow = format!("{}1{}", "[".repeat(8), "]".repeat(8));
    let r = reply_to(
        &mut ws,
        &format!(r#"{{"op":"publish","room":"deep","data":{shallow},"id":2}}"#),
    )
    .await;
    assert_eq!(r, json!({"op":"ack","id":2}));
    assert_eq!(next_msg(&mut sub).await.payload.as_ref(), shallow.as_bytes());
    for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
        let deep = format!("{}1{}", open.repeat(10_000), close.repeat(10_000));
        let r = reply_to(
            &mut ws,
            &format!(r#"{{"op":"publish","room":"deep","data":{deep},"id":3}}"#),
        )
        .await;
        // No `id`: a frame this deep is refused before it is parsed, so its id is never read (docs/protocol.md).
        assert_eq!(
            (r["op"].as_str(), r["code"].as_str(), r.get("id")),
            (Some("error"), Some("bad_request"), None),
            "{r}"
        );
    }
    assert_eq!(first_after(&mut ws, &mut sub, "deep").await, b"\"sentinel\"");
    h.by.assert_receiving().await;
}

/// Ids are a number or a string of at most 64 bytes of JSON text, echoed exactly; anything else is bad_request
/// without an id. Huge numbers in `data` are forwarded verbatim (the gateway never converts them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_numbers_and_ids() {
    let h = Harness::start(|_| {}).await;
    let nc = h.nats.client().await;
    let mut sub = nc.subscribe("rooms.nums").await.unwrap();
    nc.flush().await.unwrap();
    let mut ws = RawWs::connect(&h.gw).await;
    let id_string_64 = format!("\"{}\"", "i".repeat(62));
    let digits_64 = "9".repeat(64);
    for id in [
        id_string_64.as_str(),
        digits_64.as_str(),
        "1e999",
        "-1e-999",
        "-0",
        "18446744073709551616",
    ] {
        ws.send(&client(TEXT, format!(r#"{{"op":"ping","id":{id}}}"#).as_bytes()))
            .await;
        let f = loop {
            let f = ws.next_frame().await.expect("reply");
            if f.opcode == TEXT {
                break f.text();
            }
        };
        assert_eq!(f, format!(r#"{{"op":"pong","id":{id}}}"#), "id {id} echoed exactly");
    }
    let too_long_string = format!("\"{}\"", "i".repeat(63));
    let too_many_digits = "9".repeat(65);
    // `null` is no id at all (the reply has none).
    assert_eq!(
        reply_to(&mut ws, r#"{"op":"ping","id":null}"#).await,
        json!({"op":"pong"})
    );
    for id in [too_long_string.as_str(), too_many_digits.as_str(), "true", "{}", "[1]"] {
        let r = reply_to(&mut ws, &format!(r#"{{"op":"ping","id":{id}}}"#)).await;
        assert_eq!(
            r,
            json!({"op":"error","code":"bad_request","message":"`id` must be a number or a string of at most 64 bytes"}),
            "id {id}"
        );
    }
    assert_eq!(
        reply_to(&mut ws, r#"{"op":"join","room":"nums","id":1}"#).await,
        json!({"op":"ack","id":1})
    );
    let huge_int = "7".repeat(1500);
    for data in [
        huge_int.as_str(),
        "1e999999",
        "-1E-999999",
        "123456789012345678901234567890.5e-10",
    ] {
        let r = reply_to(
            &mut ws,
            &format!(r#"{{"op":"publish","room":"nums","data":{data},"id":2}}"#),
        )
        .await;
        assert_eq!(r, json!({"op":"ack","id":2}), "data {data}");
        assert_eq!(
            next_msg(&mut sub).await.payload.as_ref(),
            data.as_bytes(),
            "forwarded verbatim"
        );
    }
    // A long unknown op is named by a short prefix only.
    let r = reply_to(&mut ws, &format!(r#"{{"op":"{}","id":3}}"#, "x".repeat(1500))).await;
    assert_eq!((r["code"].as_str(), r["id"].as_u64()), (Some("bad_request"), Some(3)));
    assert!(r["message"].as_str().unwrap().len() < 100, "{r}");
    h.by.assert_receiving().await;
}

/// Error texts never echo client input beyond a short prefix: a 1500-byte bad field gets a short error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_replies_do_not_echo_large_input() {
    // needs: finding 1 (lead)
    let h = Harness::start(|_| {}).await;
    let mut ws = RawWs::connect(&h.gw).await;
    let long = "e".repeat(1500);
    for text in [
        format!(r#"{{"op":"publish","room":"r","data":1,"echo":"{long}","id":4}}"#),
        format!(r#"{{"op":"join","room":{{"{long}":1}},"id":4}}"#),
        format!(r#"{{"op":"ping","id":4,"{long}"#),
    ] {
        let r = reply_to(&mut ws, &text).await;
        assert_eq!(r["code"], "bad_request", "{r}");
        let m = r["message"].as_str().unwrap();
        assert!(m.len() < 200, "error message of {} bytes echoes the input", m.len());
    }
    h.by.assert_receiving().await;
}

/// Every class of hostile room name is invalid_room -- also when spelled with JSON escapes, which decode to the same
/// characters -- no room is created and nothing reaches NATS. Names that are not valid JSON strings (a lone
/// surrogate escape) are bad_request. The plain list is shared with tests/gateway.rs ([`hostile_rooms`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_room_names_are_refused() {
    let h = Harness::start(|c| {
        c.limits.max_message_size = 64 * 1024;
        c.limits.max_frame_size = 64 * 1024;
    })
    .await;
    let nc = h.nats.client().await;
    let mut all = nc.subscribe("rooms.>").await.unwrap();
    nc.flush().await.unwrap();
    let mut ws = RawWs::connect(&h.gw).await;
    let mut names: Vec<String> = hostile_rooms()
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    assert!(names.len() > 30, "the shared list is not empty");
    // Escaped spellings of a dot, wildcards, `$`, NUL, CR/LF, a space, and non-ASCII.
    for escaped in [
        r#""a\u002eb""#,
        r#""\u002a""#,
        r#""\u003e""#,
        r#""\u0024SYS""#,
        r#""a\u0000""#,
        r#""\r\n""#,
        r#""a\u0020b""#,
        r#""caf\u00e9""#,
        r#""\ud83d\ude00""#,
    ] {
        names.push(escaped.to_string());
    }
    for (i, name) in names.iter().enumerate() {
        for op in ["join", "leave"] {
            let r = reply_to(&mut ws, &format!(r#"{{"op":"{op}","room":{name},"id":{i}}}"#)).await;
            assert_eq!(
                (r["code"].as_str(), r["id"].as_u64()),
                (Some("invalid_room"), Some(i as u64)),
                "{op} {name}: {r}"
            );
        }
        let r = reply_to(
            &mut ws,
            &format!(r#"{{"op":"publish","room":{name},"data":1,"id":{i}}}"#),
        )
        .await;
        assert_eq!(
            (r["code"].as_str(), r["id"].as_u64()),
            (Some("invalid_room"), Some(i as u64)),
            "publish {name}: {r}"
        );
    }
    for bad_json in [r#""\ud800""#, r#""a\x""#, "\"a\nb\""] {
        let r = reply_to(&mut ws, &format!(r#"{{"op":"join","room":{bad_json},"id":1}}"#)).await;
        assert_eq!(r["code"], "bad_request", "{bad_json}: {r}");
    }
    assert_eq!(h.gw.gw.rooms().len(), 1, "only the bystander's room exists");
    assert_eq!(
        reply_to(&mut ws, r#"{"op":"join","room":"ok","id":"j"}"#).await,
        json!({"op":"ack","id":"j"})
    );
    // The sentinel through a valid room is the first thing on `rooms.>` apart from the bystander's traffic.
    let r = reply_to(&mut ws, r#"{"op":"publish","room":"ok","data":"sentinel","id":"s"}"#).await;
    assert_eq!(r, json!({"op":"ack","id":"s"}));
    let first = loop {
        let m = next_msg(&mut all).await;
        if m.subject.as_str() != format!("rooms.{BYSTANDER_ROOM}") {
            break m;
        }
    };
    assert_eq!(
        (first.subject.as_str(), first.payload.as_ref()),
        ("rooms.ok", &b"\"sentinel\""[..]),
        "nothing was published on a hostile subject"
    );
    h.by.assert_receiving().await;
}

/// A publish over NATS's `max_payload` is too_large, the connection stays, and one under it goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_over_nats_max_payload_is_too_large() {
    // nats-server has no command-line flag for max_payload: it is set in a config file.
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, "max_payload: 1024\n").unwrap();
    let nats = NatsServer::start_with(&["-c", conf.to_str().unwrap()]).await;
    let h = Harness::start_nats(nats, |c| c.limits.max_frame_size = MAX_MESSAGE).await;
    let nc = h.nats.client().await;
    let mut sub = nc.subscribe("rooms.big").await.unwrap();
    nc.flush().await.unwrap();
    let mut ws = RawWs::connect(&h.gw).await;
    assert_eq!(
        reply_to(&mut ws, r#"{"op":"join","room":"big","id":1}"#).await,
        json!({"op":"ack","id":1})
    );
    for size in [1100, 2000, MAX_MESSAGE - 100] {
        let data = "x".repeat(size);
        let r = reply_to(
            &mut ws,
            &format!(r#"{{"op":"publish","room":"big","data":"{data}","id":2}}"#),
        )
        .await;
        assert_eq!(
            r,
            json!({"op":"error","code":"too_large","id":2,"message":"message over the backend's maximum payload"}),
            "{size} bytes"
        );
    }
    let data = "x".repeat(500);
    let r = reply_to(
        &mut ws,
        &format!(r#"{{"op":"publish","room":"big","data":"{data}","id":3}}"#),
    )
    .await;
    assert_eq!(r, json!({"op":"ack","id":3}));
    assert_eq!(
        next_msg(&mut sub).await.payload.len(),
        502,
        "the first message NATS saw is the small one"
    );
    h.by.assert_receiving().await;
}

// -------------------------------------------------------------------------------------------------------------------
// Malformed frames and ops (through tungstenite: what a buggy client sends)
// -------------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn publish_and_leave_need_a_joined_room() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    let nc = nats.client().await;
    let mut sub = nats_sub(&nc, "rooms.>").await;
    let mut a = gw.client().await;
    expect_error(&mut a, json!({"op":"publish","room":"lobby","data":1}), 1, "not_joined").await;
    expect_error(&mut a, json!({"op":"leave","room":"lobby"}), 2, "not_joined").await;
    a.join("other").await;
    expect_error(&mut a, json!({"op":"publish","room":"lobby","data":1}), 3, "not_joined").await;
    // Nothing was published for the refused attempt: the first message on rooms.> is this one.
    a.publish("other", json!("ok")).await;
    assert_eq!(next_msg(&mut sub).await.subject.as_str(), "rooms.other");
}

#[tokio::test]
async fn invalid_json_is_bad_request_and_connection_survives() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    let mut a = gw.client().await;
    for text in [
        "not json",
        "{",
        "",
        "[]",
        "42",
        r#"{"op":"join","room":"x","id":1"#,
        "{\"op\":\"ping\"}\n}",
    ] {
        a.send_text(text).await;
        let e = a.recv_op("error").await;
        assert_eq!(e["code"], "bad_request", "{text:?}: {e}");
        assert!(e.get("id").is_none(), "{e}");
    }
    assert_alive(&mut a).await;
    a.join("lobby").await;
    a.publish("lobby", json!({"still":"works"})).await;
}

#[tokio::test]
async fn unknown_op_and_missing_or_mistyped_fields_are_bad_request() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    let mut a = gw.client().await;
    let cases = [
        json!({"op":"subscribe","room":"lobby"}),
        json!({"op":"JOIN","room":"lobby"}),
        json!({"op":"join"}),
        json!({"op":"leave"}),
        json!({"op":"publish","room":"lobby"}),
        json!({"op":"publish","data":1}),
    ];
    for (i, v) in cases.into_iter().enumerate() {
        let e = expect_error(&mut a, v, i as u64 + 1, "bad_request").await;
        assert_eq!(e["id"], i + 1, "the id of a parsable frame is echoed");
    }
    for v in [
        json!({"room":"lobby"}),
        json!({"op":7}),
        json!({"op":"join","room":5}),
        json!({"op":null}),
    ] {
        a.send(v.clone()).await;
        assert_eq!(a.recv_op("error").await["code"], "bad_request", "{v}");
    }
    assert_eq!(gw.gw.rooms().len(), 0);
    assert_alive(&mut a).await;
}

#[tokio::test]
async fn binary_frames_are_bad_request() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    let mut a = gw.client().await;
    a.ws.send(Message::Binary(Bytes::from_static(br#"{"op":"ping"}"#)))
        .await
        .unwrap();
    let e = a.recv_op("error").await;
    assert_eq!(e["code"], "bad_request");
    assert_alive(&mut a).await;
}

fn small_frames(c: &mut roomwire::Config) {
    c.limits.max_message_size = 1024;
    c.limits.max_frame_size = 1024;
}

#[tokio::test]
async fn oversized_message_closes_with_1009() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, small_frames).await;
    let mut a = gw.client().await;
    a.join("lobby").await;
    // Just under the limit is fine.
    let data = "x".repeat(900);
    a.publish("lobby", json!(data)).await;
    let big = format!(r#"{{"op":"publish","room":"lobby","data":"{}"}}"#, "x".repeat(1100));
    a.send_text(&big).await;
    let (code, _) = a.expect_close().await;
    assert_eq!(code, 1009);
}

#[tokio::test]
async fn oversized_fragmented_message_closes_with_1009() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, small_frames).await;
    let mut a = gw.client().await;
    // Each frame is within max_frame_size; the reassembled message is not.
    let part = Bytes::from(vec![b' '; 600]);
    a.ws.send(Message::Frame(Frame::message(
        part.clone(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await
    .unwrap();
    a.ws.send(Message::Frame(Frame::message(part, OpCode::Data(Data::Continue), true)))
        .await
        .unwrap();
    let (code, _) = a.expect_close().await;
    assert_eq!(code, 1009);
}
