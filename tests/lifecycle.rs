//! Every connection ends and gives its slots back, whatever its reader was doing; every frame is charged to the rate
//! limits; large messages are written with the shipped write-buffer settings. Regression tests for issue 8's
//! findings 1, 4 and 9, against a real nats-server over real TLS.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use roomwire::config::{Overflow, RoomPolicy};
use serde_json::json;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{
    Message,
    protocol::frame::{Frame, coding::Data, coding::OpCode},
};

/// Waits until the gateway holds no open WebSocket connection; returns how long it took.
async fn until_no_connection(gw: &TestGateway, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if gw.gw.metrics().connections_open.get() == 0 {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "connection still open after {within:?}: its task never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Finding 1: a client that never reads fills its queue with room messages, then sends requests, so the reader
/// waits for queue space. When the writer gives up (write_timeout), the reader must end too and the slot come back;
/// before the fix it stayed parked forever, and `max_connections` such clients locked everyone out.
#[tokio::test]
async fn reader_waiting_for_queue_space_ends_when_the_writer_times_out() {
    let nats = NatsServer::start().await;
    let write_timeout = Duration::from_secs(1);
    let gw = TestGateway::start(&nats, |c| {
        c.server.max_connections = 1;
        c.limits.write_timeout = write_timeout;
        c.limits.max_pending_messages = 8;
        c.rooms.policy.push(RoomPolicy {
            pattern: "flood".into(),
            overflow: Overflow::DropNewest,
        });
    })
    .await;
    let mut victim = gw.client_small_rcvbuf(4096).await;
    victim.join("flood").await;
    // Fill the socket buffers and then the queue: the writer stalls on a client that never reads. Paced, so the
    // writer is never the bottleneck before the socket is full (a burst would mostly be dropped while it is still
    // writing, and the socket might never fill): ~10 MB at ~30 MB/s, against a few MB of kernel buffers.
    let nc = nats.client().await;
    let big = json!("x".repeat(32 * 1024)).to_string();
    let mut pace = tokio::time::interval(Duration::from_millis(1));
    for _ in 0..300 {
        pace.tick().await;
        nc.publish("rooms.flood", big.clone().into()).await.unwrap();
    }
    nc.flush().await.unwrap();
    // Requests whose replies cannot be queued: the reader now waits for space.
    for i in 0..50 {
        victim.send(json!({"op":"ping","id":i})).await;
    }
    let took = until_no_connection(&gw, write_timeout + Duration::from_secs(5)).await;
    assert!(
        took < write_timeout + Duration::from_secs(3),
        "slot released only after {took:?}"
    );
    // The only slot is free again: an ordinary client gets in and works.
    let mut other = gw.client().await;
    other.join("lobby").await;
    drop(victim);
}

/// Finding 4: WebSocket pings were not charged (100,000 pings got 100,000 pongs). Every frame counts now, and a
/// flood is closed with 1008.
#[tokio::test]
async fn ping_flood_is_closed_with_1008() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.limits.messages_per_second = 10;
        c.limits.messages_burst = 20;
        c.limits.max_rate_violations = 10;
    })
    .await;
    let mut bystander = gw.client().await;
    bystander.join("lobby").await;
    let mut c = gw.client().await;
    for _ in 0..2_000 {
        if c.ws.feed(Message::Ping(Default::default())).await.is_err() {
            break;
        }
    }
    let _ = c.ws.flush().await;
    let (code, reason) = c.expect_close().await;
    assert_eq!((code, reason.as_str()), (1008, "rate limit exceeded repeatedly"));
    // The bystander is unaffected.
    let nc = nats.client().await;
    nc.publish("rooms.lobby", "{\"still\":true}".into()).await.unwrap();
    assert_eq!(bystander.recv_op("message").await["data"]["still"], true);
}

/// Finding 4: binary frames were not charged (400 binary frames of 60 KB got 400 replies and no 1008). Over the byte
/// budget they are answered `rate_limited`, and repeated abuse is closed with 1008.
#[tokio::test]
async fn binary_frames_are_charged_to_the_byte_budget() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.limits.bytes_per_second = 64 * 1024;
        c.limits.bytes_burst = 128 * 1024;
        c.limits.max_rate_violations = 5;
    })
    .await;
    let mut c = gw.client().await;
    let blob = vec![7u8; 60 * 1024];
    // Within the budget: the documented answer to a binary frame.
    c.ws.send(Message::Binary(blob.clone().into())).await.unwrap();
    let r = c.recv_op("error").await;
    assert_eq!(r["code"], "bad_request", "{r}");
    // Over it: rate_limited, then 1008.
    for _ in 0..20 {
        if c.ws.send(Message::Binary(blob.clone().into())).await.is_err() {
            break;
        }
    }
    let mut codes = Vec::new();
    let close = loop {
        match tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut c.ws))
            .await
            .expect("frame in time")
        {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                codes.push(v["code"].as_str().unwrap_or_default().to_string());
            }
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(codes.iter().any(|c| c == "rate_limited"), "{codes:?}");
    assert_eq!(close, Some(1008), "answers before the close: {codes:?}");
}

/// Finding 4: empty continuation frames never complete a message, so a charge per message never saw them.
#[tokio::test]
async fn endless_empty_continuation_frames_are_closed_with_1008() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.limits.messages_per_second = 10;
        c.limits.messages_burst = 20;
        c.limits.max_rate_violations = 10;
    })
    .await;
    let mut c = gw.client().await;
    let first = Frame::message(b"{".to_vec(), OpCode::Data(Data::Text), false);
    c.ws.feed(Message::Frame(first)).await.unwrap();
    for _ in 0..2_000 {
        let empty = Frame::message(Vec::new(), OpCode::Data(Data::Continue), false);
        if c.ws.feed(Message::Frame(empty)).await.is_err() {
            break;
        }
    }
    let _ = c.ws.flush().await;
    let (code, _) = c.expect_close().await;
    assert_eq!(code, 1008);
}

/// Finding 9: with the shipped defaults, a message close to the outbound queue's byte bound used to fail with
/// "write buffer full" (logged as a shutdown). It is delivered now; `Config::validate` refuses settings that would
/// break it.
#[tokio::test]
async fn large_room_message_is_delivered_with_default_write_buffers() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    let defaults = roomwire::config::LimitsConfig::default();
    assert_eq!(
        gw.gw.config().limits.max_write_buffer_size,
        defaults.max_write_buffer_size,
        "the test runs the shipped write-buffer settings"
    );
    let mut c = gw.client().await;
    c.join("big").await;
    let nc = nats.client().await;
    let text = "y".repeat(700 * 1024);
    nc.publish("rooms.big", json!(text).to_string().into()).await.unwrap();
    let m = c.recv_op("message").await;
    assert_eq!(m["data"].as_str().map(str::len), Some(700 * 1024));
    // Still alive afterwards.
    c.join("other").await;

    let mut bad = roomwire::Config::default();
    bad.auth.allow_anonymous = true;
    bad.limits.max_write_buffer_size = 256 * 1024;
    let err = bad.validate().expect_err("too small for max_pending_bytes").to_string();
    assert!(err.contains("limits.max_write_buffer_size"), "{err}");
}
