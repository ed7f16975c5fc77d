//! Room membership ends with the connection, however the connection ends (issue 22, finding 1): a connection closed
//! while its `join` waits (for the room's NATS subscription, or for the history read of a recovering join) leaves no
//! member, no room, no subscription and no quota behind. Each way a join can be cancelled is tried: the heartbeat
//! timeout, the write timeout, the drain, and a history recovery waiting on JetStream. Before the fix every one of
//! these left a ghost member in the room for as long as the gateway ran.

mod common;

use std::time::Duration;

use common::*;
use roomwire::{config::Config, room_pattern::RoomPattern, room_quota::QuotaKey};
use serde_json::json;
use tokio::time::Instant;

/// Waits until the gateway holds no open WebSocket connection.
async fn until_no_connection(gw: &TestGateway) {
    let deadline = Instant::now() + WAIT;
    while gw.gw.metrics().connections_open.get() != 0 {
        assert!(Instant::now() < deadline, "a connection stayed open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `what` holds (the NATS side settles asynchronously after a resume).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Anonymous clients from 127.0.0.1 share one room-quota key.
fn local_key() -> QuotaKey {
    QuotaKey::Addr("127.0.0.1".parse().expect("ip"))
}

/// After the mid-join connections are gone: no room has a member, and once NATS answers again no room, no quota
/// and no subscription remain.
async fn assert_nothing_left(gw: &TestGateway, nats: &NatsServer, rooms: &[String]) {
    for room in rooms {
        assert_eq!(gw.gw.rooms().members_of(room), 0, "ghost member left in {room}");
    }
    nats.resume();
    eventually("every room dropped", || gw.gw.rooms().is_empty()).await;
    eventually("the room quota given back", || {
        gw.gw.rooms().rooms_of(&local_key()) == 0
    })
    .await;
    // The room tasks end and unsubscribe: a backend publish to those rooms finds no gateway subscriber.
    let nc = nats.client().await;
    let fanned_out = gw.gw.metrics().room_messages.get();
    for room in rooms {
        nc.publish(format!("rooms.{room}"), "{}".into()).await.expect("publish");
    }
    nats_barrier(&nc).await;
    assert_eq!(
        gw.gw.metrics().room_messages.get(),
        fanned_out,
        "a dropped room still received its subject"
    );
}

/// Sends `join` for a new room on each of `n` fresh clients while NATS is frozen, so each join waits for its
/// subscription; returns the clients (not read from again) and the rooms.
async fn joins_waiting_on_frozen_nats(gw: &TestGateway, nats: &NatsServer, n: usize) -> (Vec<WsClient>, Vec<String>) {
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(gw.client().await);
    }
    nats.pause_and_wait().await;
    let rooms: Vec<String> = (0..n).map(|i| format!("ghost-{i}")).collect();
    for (c, room) in clients.iter_mut().zip(&rooms) {
        c.send(json!({"op":"join","room":room,"id":1})).await;
    }
    // Each join registered its member and now waits for the subscription.
    eventually("every join registered", || {
        rooms.iter().all(|r| gw.gw.rooms().members_of(r) == 1)
    })
    .await;
    (clients, rooms)
}

/// The repro: five clients join new rooms while NATS is frozen and stop reading; the heartbeat closes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_cancelled_by_the_heartbeat_leaves_no_member() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.limits.heartbeat_interval = Duration::from_millis(300);
        c.limits.heartbeat_timeout = Duration::from_millis(800);
        c.nats.publish_timeout = Duration::from_secs(30);
    })
    .await;
    let (clients, rooms) = joins_waiting_on_frozen_nats(&gw, &nats, 5).await;
    until_no_connection(&gw).await;
    assert_nothing_left(&gw, &nats, &rooms).await;
    drop(clients);
}

/// A join waiting for its subscription while the socket is blocked: the write timeout ends the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_cancelled_by_the_write_timeout_leaves_no_member() {
    let nats = NatsServer::start().await;
    // Long enough for the join below to be sent after the socket filled, before the writer gives up.
    let write_timeout = Duration::from_secs(4);
    let gw = TestGateway::start(&nats, |c| {
        c.limits.write_timeout = write_timeout;
        c.limits.max_pending_messages = 8;
        // The join's subscription must still be waiting when the writer gives up (not failed by its own timeout).
        c.nats.publish_timeout = Duration::from_secs(30);
        c.rooms.overflow = roomwire::config::Overflow::DropNewest;
    })
    .await;
    // A client with a small receive window that never reads: paced room messages fill its socket (as in
    // tests/lifecycle.rs: ~10 MB against a few MB of kernel buffers), so the writer blocks.
    let mut stalled = gw.client_small_rcvbuf(4096).await;
    stalled.join("burst").await;
    let nc = nats.client().await;
    let big = json!("x".repeat(32 * 1024)).to_string();
    let mut pace = tokio::time::interval(Duration::from_millis(1));
    for _ in 0..300 {
        pace.tick().await;
        nc.publish("rooms.burst", big.clone().into()).await.expect("publish");
    }
    nats_barrier(&nc).await;
    gw.wait_fanned_out(300).await;
    nats.pause_and_wait().await;
    stalled.send(json!({"op":"join","room":"ghost-w","id":1})).await;
    eventually("the join registered", || gw.gw.rooms().members_of("ghost-w") == 1).await;
    until_no_connection(&gw).await;
    assert!(
        gw.gw
            .metrics()
            .slow_consumers
            .get(roomwire::metrics::SlowConsumer::WriteTimeout)
            >= 1
    );
    assert_eq!(gw.gw.rooms().members_of("burst"), 0, "the joined room left");
    assert_nothing_left(&gw, &nats, &["ghost-w".to_owned()]).await;
    drop(stalled);
}

/// A drain reaches connections whose join waits: they close (1001) and leave nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_cancelled_by_the_drain_leaves_no_member() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.server.drain_window = Duration::ZERO;
        c.nats.publish_timeout = Duration::from_secs(30);
    })
    .await;
    let (mut clients, rooms) = joins_waiting_on_frozen_nats(&gw, &nats, 3).await;
    gw.gw.drain().cancel();
    for c in &mut clients {
        let (code, _) = c.expect_close().await;
        assert_eq!(code, 1001, "drained");
    }
    until_no_connection(&gw).await;
    assert_nothing_left(&gw, &nats, &rooms).await;
}

fn history(c: &mut Config) {
    c.history.enabled = true;
    c.history.rooms = vec![RoomPattern::new("h-*")];
    c.history.recover_timeout = Duration::from_secs(30);
    c.limits.heartbeat_interval = Duration::from_millis(300);
    c.limits.heartbeat_timeout = Duration::from_millis(800);
    c.nats.publish_timeout = Duration::from_secs(30);
}

/// A recovering join of a history room that is already subscribed waits on JetStream only; the heartbeat ends the
/// connection (and the bystander's, which is not read either) while it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_cancelled_during_history_recovery_leaves_no_member() {
    let store = tempfile::tempdir().expect("store dir");
    let nats = NatsServer::start_with(&["-js", "-sd", store.path().to_str().expect("utf-8")]).await;
    let gw = TestGateway::start(&nats, history).await;
    let mut bystander = gw.client().await;
    let ack = bystander.request(json!({"op":"join","room":"h-room"}), 1).await;
    assert_eq!(ack["op"], "ack", "{ack}");
    let epoch = ack["epoch"].as_str().expect("epoch").to_owned();
    let mut late = gw.client().await;
    nats.pause_and_wait().await;
    late.send(json!({"op":"join","room":"h-room","id":2,"since":{"epoch":epoch,"seq":0}}))
        .await;
    eventually("the recovering join registered", || {
        gw.gw.rooms().members_of("h-room") == 2
    })
    .await;
    until_no_connection(&gw).await;
    assert_nothing_left(&gw, &nats, &["h-room".to_owned()]).await;
    drop((bystander, late));
}
