//! A connection's life after the upgrade: it ends and gives its slots back whatever its reader was doing, the
//! heartbeat closes a dead client and keeps a live one, and large messages are written with the shipped write-buffer
//! settings. Against a real nats-server over real TLS. (Frames charged to the rate limits: `floods.rs`.)

mod common;

use std::time::Duration;

use common::*;
use roomwire::config::{Overflow, RoomPolicy};
use serde_json::json;
use tokio::{io::AsyncReadExt, time::Instant};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_closes_a_dead_client_and_keeps_a_live_one() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.limits.heartbeat_interval = Duration::from_millis(200);
        c.limits.heartbeat_timeout = Duration::from_secs(1);
    })
    .await;
    let mut dead = gw.client().await;
    let mut live = gw.client().await;
    // `dead` is not polled meanwhile, so it never answers the server's pings.
    poll_quietly(&mut live, Duration::from_millis(2500)).await;
    assert_eq!(
        live.request(json!({"op": "ping"}), 1).await["op"],
        "pong",
        "a polled client stays open"
    );
    // Read what the server wrote to `dead` off the TLS stream itself, up to the end of the connection: through
    // tungstenite, reading would first answer the buffered pings, and writing to a socket the server has closed can
    // end in a reset that loses the close frame -- the close code must be seen, not assumed.
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(WAIT, dead.ws.get_mut().read_to_end(&mut raw))
        .await
        .expect("dead client closed in time");
    let frames = common::frames::parse_all(&raw);
    let (close, before) = frames.split_last().expect("frames from the server");
    assert!(
        before.iter().all(|f| f.opcode == common::frames::PING),
        "only heartbeat pings before the close: {before:?}"
    );
    assert!(!before.is_empty(), "the server pinged the dead client first");
    assert_eq!(close.close_code(), (1001, "heartbeat timeout".to_string()));
}
