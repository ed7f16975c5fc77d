//! History rooms on a real `nats-server -js` (issue 11, `docs/history.md`): sequences on live frames, publish acks
//! with the stored sequence, exact recovery after a leave, a gateway restart, a NATS restart and across gateways,
//! every `recovered:false` cause, the `history` op, and what happens when the stream goes away.

mod common;

use std::time::Duration;

use common::{NatsServer, TestGateway, WsClient, nats_barrier};
use roomwire::{config::Config, room_pattern::RoomPattern};
use serde_json::{Value, json};

/// A nats-server with JetStream, its store in a directory that outlives restarts of the server.
async fn nats_js() -> (NatsServer, tempfile::TempDir) {
    let store = tempfile::tempdir().expect("store dir");
    let dir = store.path().to_str().expect("utf-8 path").to_owned();
    let nats = NatsServer::start_with(&["-js", "-sd", &dir]).await;
    (nats, store)
}

/// History on for rooms `h-*`.
fn history(c: &mut Config) {
    c.history.enabled = true;
    c.history.rooms = vec![RoomPattern::new("h-*")];
    c.history.recover_timeout = Duration::from_millis(1500);
}

/// Joins `room` (optionally with `since`) and returns the ack.
async fn join(c: &mut WsClient, room: &str, since: Option<Value>, id: u64) -> Value {
    let mut req = json!({"op":"join","room":room});
    if let Some(since) = since {
        req["since"] = since;
    }
    let ack = c.request(req, id).await;
    assert_eq!(ack["op"], "ack", "join {room}: {ack}");
    ack
}

/// Publishes `n` messages `{"n":i}` for `i` in `from..from+n` with plain core NATS, and waits until the server has
/// them (they are stored before the round trip returns: the stream captures in the same server).
async fn backend_publish(nc: &async_nats::Client, room: &str, from: u64, n: u64) {
    for i in from..from + n {
        nc.publish(format!("rooms.{room}"), json!({ "n": i }).to_string().into())
            .await
            .unwrap();
    }
    nats_barrier(nc).await;
}

/// Receives `n` message frames of `room`, returning their (n, seq), failing on any other frame.
async fn messages(c: &mut WsClient, room: &str, n: usize) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    while out.len() < n {
        let m = c.recv_op("message").await;
        assert_eq!(m["room"], room, "{m}");
        let seq = m["seq"].as_u64().unwrap_or_else(|| panic!("message without seq: {m}"));
        out.push((m["data"]["n"].as_u64().expect("n"), seq));
    }
    out
}

fn since(ack: &Value, seq: u64) -> Value {
    json!({"seq": seq, "epoch": ack["epoch"].clone()})
}

#[tokio::test]
async fn a_rejoin_with_since_gets_exactly_the_missed_messages_then_live_ones() {
    let (nats, _store) = nats_js().await;
    let gw = TestGateway::start(&nats, history).await;
    let nc = nats.client().await;

    let mut a = gw.client().await;
    let ack = join(&mut a, "h-chat", None, 1).await;
    assert!(ack["epoch"].as_str().is_some_and(|e| !e.is_empty()), "{ack}");
    assert_eq!(ack["seq"], 0, "empty room: {ack}");
    backend_publish(&nc, "h-chat", 0, 3).await;
    let live = messages(&mut a, "h-chat", 3).await;
    assert!(live.windows(2).all(|w| w[0].1 < w[1].1), "sequences increase: {live:?}");
    let last_seen = live[2].1;
    drop(a);

    // While nobody is in the room, a backend goes on with plain core NATS.
    backend_publish(&nc, "h-chat", 3, 50).await;

    let mut b = gw.client().await;
    let ack2 = join(&mut b, "h-chat", Some(since(&ack, last_seen)), 2).await;
    assert_eq!(ack2["recovered"], true, "{ack2}");
    assert_eq!(ack2["epoch"], ack["epoch"]);
    let missed = messages(&mut b, "h-chat", 50).await;
    let ns: Vec<u64> = missed.iter().map(|m| m.0).collect();
    assert_eq!(ns, (3..53).collect::<Vec<_>>(), "exactly the 50 missed, in order");
    assert_eq!(
        missed.last().unwrap().1,
        ack2["seq"].as_u64().unwrap(),
        "the ack's seq is the last replayed"
    );

    backend_publish(&nc, "h-chat", 53, 1).await;
    let next = messages(&mut b, "h-chat", 1).await;
    assert_eq!(next[0].0, 53, "then the live one, nothing twice");
    assert!(next[0].1 > missed.last().unwrap().1);
    b.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_publish_is_acked_with_the_stored_sequence_and_stored_once_per_msg_id() {
    let (nats, _store) = nats_js().await;
    let gw = TestGateway::start(&nats, history).await;
    let nc = nats.client().await;
    let js = async_nats::jetstream::new(nc.clone());

    let mut c = gw.client().await;
    join(&mut c, "h-pub", None, 1).await;
    let req = json!({"op":"publish","room":"h-pub","data":{"hello":1},"msg_id":"m-1"});
    let ack = c.request(req.clone(), 2).await;
    assert_eq!(ack["op"], "ack", "{ack}");
    let seq = ack["seq"].as_u64().expect("ack carries seq");
    let stream = js.get_stream("ROOMWIRE").await.expect("stream");
    let stored = stream.get_raw_message(seq).await.expect("stored message");
    assert_eq!(stored.subject.as_str(), "rooms.h-pub");
    assert_eq!(&stored.payload[..], br#"{"hello":1}"#);

    // The same msg_id again (a client re-sending after a reconnect): acked with the same sequence, stored once.
    let again = c.request(req, 3).await;
    assert_eq!(again["seq"].as_u64(), Some(seq), "{again}");
    let info = js.get_stream("ROOMWIRE").await.unwrap().info().await.unwrap().clone();
    assert_eq!(info.state.messages, 1, "stored once");

    // A room without history keeps plain acks.
    join(&mut c, "plain", None, 4).await;
    let plain = c.request(json!({"op":"publish","room":"plain","data":1}), 5).await;
    assert_eq!(plain, json!({"op":"ack","id":5}));

    // A bad msg_id is refused with the id.
    let bad = c
        .request(json!({"op":"publish","room":"h-pub","data":1,"msg_id":"no spaces"}), 6)
        .await;
    assert_eq!(bad["code"], "bad_request", "{bad}");
}

#[tokio::test]
async fn recovered_false_for_each_cause() {
    let (nats, _store) = nats_js().await;
    let gw = TestGateway::start(&nats, |c| {
        history(c);
        c.history.max_messages_per_room = 20;
        c.history.max_recover = 10;
    })
    .await;
    let nc = nats.client().await;

    let mut a = gw.client().await;
    let ack = join(&mut a, "h-x", None, 1).await;
    backend_publish(&nc, "h-x", 0, 1).await;
    let first = messages(&mut a, "h-x", 1).await[0].1;

    // Another epoch (the stream was recreated since).
    let mut b = gw.client().await;
    let r = join(
        &mut b,
        "h-x",
        Some(json!({"seq": first, "epoch": "not-this-stream"})),
        2,
    )
    .await;
    assert_eq!(r["recovered"], false, "{r}");
    assert_eq!(r["epoch"], ack["epoch"], "the current epoch is given for the resync");

    // More than max_recover (10) missed.
    backend_publish(&nc, "h-x", 1, 15).await;
    messages(&mut a, "h-x", 15).await;
    let r = join(&mut b, "h-y", None, 3).await; // unrelated room: b stays usable
    assert!(r["seq"].is_u64());
    let mut c = gw.client().await;
    let r = join(&mut c, "h-x", Some(since(&ack, first)), 4).await;
    assert_eq!(r["recovered"], false, "15 missed > max_recover: {r}");

    // Removed by the limits: 20 per room, so after 10 more the first message is gone.
    backend_publish(&nc, "h-x", 16, 10).await;
    messages(&mut a, "h-x", 10).await;
    let mut d = gw.client().await;
    let r = join(&mut d, "h-x", Some(since(&ack, first)), 5).await;
    assert_eq!(r["recovered"], false, "truncated: {r}");

    // A since past the room's end.
    let mut e = gw.client().await;
    let r = join(&mut e, "h-x", Some(since(&ack, 1_000_000)), 6).await;
    assert_eq!(r["recovered"], false, "{r}");

    // JetStream cannot answer in time: the server is frozen (the room exists on the gateway, so the join itself
    // needs no NATS round trip).
    let mut f = gw.client().await;
    nats.pause();
    let started = std::time::Instant::now();
    let r = join(&mut f, "h-x", Some(since(&ack, 30)), 7).await;
    nats.resume();
    assert_eq!(r["recovered"], false, "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered within recover_timeout"
    );

    // A non-history room answers since with recovered:false.
    let r = join(&mut f, "plain", Some(json!({"seq": 1, "epoch": "e"})), 8).await;
    assert_eq!(r["recovered"], false, "{r}");

    // A malformed since is a bad request carrying the id.
    let r = f
        .request(json!({"op":"join","room":"h-x","since":{"seq":-1,"epoch":"e"}}), 9)
        .await;
    assert_eq!(r["code"], "bad_request", "{r}");
}

#[tokio::test]
async fn recovery_survives_a_gateway_restart_and_a_nats_restart_with_its_store() {
    let (mut nats, _store) = nats_js().await;
    let nc = nats.client().await;
    let (ack, last) = {
        let mut gw = TestGateway::start(&nats, history).await;
        let mut a = gw.client().await;
        let ack = join(&mut a, "h-r", None, 1).await;
        backend_publish(&nc, "h-r", 0, 2).await;
        let last = messages(&mut a, "h-r", 2).await[1].1;
        drop(a);
        gw.shutdown().await;
        (ack, last)
    };
    backend_publish(&nc, "h-r", 2, 5).await;

    // A new gateway process (same stream).
    let gw = TestGateway::start(&nats, history).await;
    let mut b = gw.client().await;
    let r = join(&mut b, "h-r", Some(since(&ack, last)), 2).await;
    assert_eq!(r["recovered"], true, "{r}");
    let got: Vec<u64> = messages(&mut b, "h-r", 5).await.iter().map(|m| m.0).collect();
    assert_eq!(got, vec![2, 3, 4, 5, 6]);
    let last = r["seq"].as_u64().unwrap();
    drop(b);

    // NATS restarts with its store; the gateway reconnects.
    nats.restart().await;
    gw.wait_ready(true).await;
    let nc = nats.client().await;
    backend_publish(&nc, "h-r", 7, 3).await;
    let mut c = gw.client().await;
    let r = join(&mut c, "h-r", Some(since(&ack, last)), 3).await;
    assert_eq!(r["recovered"], true, "{r}");
    let got: Vec<u64> = messages(&mut c, "h-r", 3).await.iter().map(|m| m.0).collect();
    assert_eq!(got, vec![7, 8, 9]);
}

#[tokio::test]
async fn publish_on_one_gateway_recover_on_another() {
    let (nats, _store) = nats_js().await;
    let one = TestGateway::start(&nats, history).await;
    let two = TestGateway::start(&nats, history).await;

    let mut watcher = two.client().await;
    let ack = join(&mut watcher, "h-two", None, 1).await;
    let start = ack["seq"].as_u64().unwrap();
    drop(watcher);

    let mut writer = one.client().await;
    join(&mut writer, "h-two", None, 1).await;
    let mut seqs = Vec::new();
    for i in 0..4 {
        let r = writer
            .request(json!({"op":"publish","room":"h-two","data":{"n":i}}), 10 + i)
            .await;
        seqs.push(r["seq"].as_u64().expect("seq"));
    }

    let mut reader = two.client().await;
    let r = join(&mut reader, "h-two", Some(since(&ack, start)), 2).await;
    assert_eq!(r["recovered"], true, "{r}");
    let got = messages(&mut reader, "h-two", 4).await;
    assert_eq!(
        got.iter().map(|m| m.1).collect::<Vec<_>>(),
        seqs,
        "same sequences as the publish acks"
    );
    assert_eq!(got.iter().map(|m| m.0).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
}

#[tokio::test]
async fn history_returns_the_last_n_oldest_first() {
    let (nats, _store) = nats_js().await;
    let gw = TestGateway::start(&nats, |c| {
        history(c);
        c.history.max_history_limit = 5;
    })
    .await;
    let nc = nats.client().await;
    backend_publish(&nc, "h-log", 0, 12).await;

    let mut c = gw.client().await;
    let r = c.request(json!({"op":"history","room":"h-log","limit":3}), 1).await;
    assert_eq!(r["op"], "history", "{r}");
    assert_eq!(r["room"], "h-log");
    assert!(r["epoch"].is_string());
    let ns: Vec<u64> = r["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, vec![9, 10, 11]);
    let seqs: Vec<u64> = r["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));

    // The limit is capped.
    let r = c.request(json!({"op":"history","room":"h-log","limit":1000}), 2).await;
    assert_eq!(r["messages"].as_array().unwrap().len(), 5, "{r}");

    // Rooms without history, and rooms the client may not join, are refused.
    let r = c.request(json!({"op":"history","room":"plain","limit":3}), 3).await;
    assert_eq!(r["code"], "bad_request", "{r}");
    let r = c.request(json!({"op":"history","room":"h-log"}), 4).await;
    assert_eq!(r["code"], "bad_request", "missing limit: {r}");
}

#[tokio::test]
async fn without_the_stream_history_rooms_go_quiet_and_come_back_with_a_new_epoch() {
    let (nats, _store) = nats_js().await;
    let gw = TestGateway::start(&nats, |c| {
        history(c);
        c.history.epoch_refresh = Duration::from_millis(300);
    })
    .await;
    let nc = nats.client().await;
    let js = async_nats::jetstream::new(nc.clone());

    let mut a = gw.client().await;
    let ack = join(&mut a, "h-gone", None, 1).await;
    join(&mut a, "plain", None, 2).await;

    js.delete_stream("ROOMWIRE").await.expect("delete stream");
    // What the docs say happens: a history room's publish is refused (nothing can store it) ...
    let r = a.request(json!({"op":"publish","room":"h-gone","data":1}), 3).await;
    // (unless the gateway already made the stream again; then it is stored under a new epoch)
    if r["op"] == "error" {
        assert_eq!(r["code"], "unavailable", "{r}");
    }
    // ... while rooms without history are untouched.
    nc.publish("rooms.plain", "1".into()).await.unwrap();
    let m = a.recv_op("message").await;
    assert_eq!(m["room"], "plain");
    assert!(m.get("seq").is_none());

    // The gateway makes the stream again (manage_stream) and the epoch changes: an old recovery point is refused.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut b = gw.client().await;
        let r = join(&mut b, "h-gone", Some(since(&ack, 0)), 4).await;
        if r["epoch"].is_string() && r["epoch"] != ack["epoch"] {
            assert_eq!(r["recovered"], false, "{r}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "stream not recreated: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Live delivery in the history room is back, with sequences of the new stream.
    backend_publish(&nc, "h-gone", 100, 1).await;
    loop {
        let m = a.recv_op("message").await;
        if m["room"] == "h-gone" {
            assert_eq!(m["data"]["n"], 100);
            assert!(m["seq"].is_u64());
            break;
        }
    }
}

#[tokio::test]
async fn a_stream_that_must_not_be_managed_is_checked_at_start() {
    let (nats, _store) = nats_js().await;
    let ca = common::TestCa::new();
    let mut config = common::test_config(&nats.url(), &ca);
    history(&mut config);
    config.history.manage_stream = false;
    let err = roomwire::gateway::Gateway::start(config.clone(), Default::default())
        .await
        .expect_err("no stream yet");
    assert!(err.to_string().contains("does not exist"), "{err}");

    // A stream made by someone else with other limits: every difference is named.
    let js = async_nats::jetstream::new(nats.client().await);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "ROOMWIRE".into(),
        subjects: vec!["rooms.*".into()],
        max_messages_per_subject: 5,
        ..Default::default()
    })
    .await
    .unwrap();
    let err = roomwire::gateway::Gateway::start(config, Default::default())
        .await
        .expect_err("mismatch");
    let text = err.to_string();
    assert!(
        text.contains("max_messages_per_room") && text.contains("republish"),
        "{text}"
    );
}

#[tokio::test]
async fn without_jetstream_on_the_server_the_gateway_runs_without_history() {
    let nats = NatsServer::start().await; // no -js
    let gw = TestGateway::start(&nats, history).await;
    assert!(gw.gw.history().is_none());
    let mut c = gw.client().await;
    let ack = join(&mut c, "h-room", None, 1).await;
    assert!(ack.get("epoch").is_none(), "{ack}");
    let nc = nats.client().await;
    nc.publish("rooms.h-room", "1".into()).await.unwrap();
    let m = c.recv_op("message").await;
    assert!(m.get("seq").is_none(), "{m}");
}

/// Issue 22, finding 6: JetStream dedupes a `msg_id` across the whole stream, so the id must carry the room. The same
/// client reusing a `msg_id` in a second room used to get the first room's seq, and its message was dropped.
#[tokio::test]
async fn a_msg_id_reused_in_another_room_is_a_new_message() {
    let (nats, _store) = nats_js().await;
    let gw = TestGateway::start(&nats, history).await;
    let mut c = gw.client().await;
    join(&mut c, "h-one", None, 1).await;
    join(&mut c, "h-two", None, 2).await;
    let mut reader = gw.client().await;
    join(&mut reader, "h-two", None, 1).await;
    let one = c
        .request(json!({"op":"publish","room":"h-one","data":{"n":1},"msg_id":"m-1"}), 3)
        .await;
    let two = c
        .request(json!({"op":"publish","room":"h-two","data":{"n":2},"msg_id":"m-1"}), 4)
        .await;
    let (s1, s2) = (one["seq"].as_u64().expect("seq"), two["seq"].as_u64().expect("seq"));
    assert_ne!(
        s1, s2,
        "the second room's message was taken for a duplicate: {one} {two}"
    );
    assert_eq!(
        messages(&mut reader, "h-two", 1).await,
        vec![(2, s2)],
        "delivered to the second room"
    );
}
