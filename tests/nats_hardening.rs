//! Issue 8, NATS side: a paused NATS is noticed within seconds (finding 13), the bytes waiting for NATS are bounded
//! (finding 13), a room whose subscription the server removed is not kept registered (finding 10), deep JSON never
//! reaches NATS (finding 11), and rooms are capped per user/address and created at a bounded rate (finding 6).
//! Everything runs against a real nats-server and real WebSocket clients over TLS.

mod common;

use std::{path::PathBuf, time::Duration};

use common::{NatsServer, TestGateway, WAIT, next_msg};
use roomwire::room_quota::QuotaKey;
use serde_json::{Value, json};
use tokio::time::Instant;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Polls `cond` until it holds (or fails the test after [`WAIT`]).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Finding 13: a paused NATS.

/// SIGSTOP on nats-server: with the default `nats.ping_interval` (2s) the gateway turns not-ready within about
/// 3 × 2 s and answers publishes `unavailable` at once; it recovers when the server resumes. Without a ping interval
/// (async-nats's default is 60 s) `/readyz` stayed 200 for minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_nats_turns_not_ready_within_seconds() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    assert_eq!(
        gw.gw.config().nats.ping_interval,
        Duration::from_secs(2),
        "the default is what is tested"
    );
    let mut c = gw.client().await;
    c.join("p").await;

    nats.pause_and_wait().await;
    let paused = Instant::now();
    gw.wait_ready(false).await;
    let took = paused.elapsed();
    // Detection is 3 intervals after the server's last word, which came at most one interval before the pause.
    assert!(took <= Duration::from_secs(7), "not-ready after {took:?}");

    let asked = Instant::now();
    let r = c.request(json!({"op":"publish","room":"p","data":1}), 1).await;
    assert_eq!(r["op"], "error", "{r}");
    assert_eq!(r["code"], "unavailable", "{r}");
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "refused at once, not after a timeout"
    );

    nats.resume();
    gw.wait_ready(true).await;
    c.publish("p", json!(2)).await;
}

/// While NATS is paused (and the pause not yet noticed: long ping interval), client publishes beyond
/// `nats.max_pending_bytes` are never handed to the NATS client: they are answered `unavailable` at the publish
/// timeout. Proof from the outside: after the server resumes, the only messages delivered are those acked plus at
/// most the budget's worth that was waiting. Without the budget every message was queued inside async-nats
/// (`client_capacity` × message size: +252 MB in the attack run) and delivered late although answered `unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_waiting_for_a_paused_nats_are_bounded() {
    const MSG: usize = 512 * KIB;
    const N: u64 = 40;
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.nats.ping_interval = Duration::from_secs(120);
        c.nats.max_pending_bytes = MIB;
        c.nats.publish_timeout = Duration::from_millis(300);
        c.limits.max_message_size = MIB;
        c.limits.max_frame_size = MIB;
        c.limits.max_pending_bytes = 4 * MIB;
        c.limits.max_write_buffer_size = 5 * MIB;
        c.limits.bytes_per_second = 1 << 30;
        c.limits.bytes_burst = 1 << 30;
        c.limits.max_inflight_publishes = 1000;
    })
    .await;
    let nc = nats.client().await;
    let mut sub = nc.subscribe("rooms.big").await.expect("subscribe");
    nc.flush().await.expect("flush");
    let mut c = gw.client().await;
    c.join("big").await;

    nats.pause_and_wait().await;
    let data = "x".repeat(MSG);
    for i in 0..N {
        c.send(json!({"op":"publish","room":"big","id":i,"data":data})).await;
    }
    let (mut acked, mut refused) = (0usize, 0usize);
    for _ in 0..N {
        let r = c.recv().await;
        match r["op"].as_str() {
            Some("ack") => acked += 1,
            Some("error") => {
                assert_eq!(r["code"], "unavailable", "{r}");
                refused += 1;
            }
            _ => panic!("unexpected frame {r}"),
        }
    }
    assert!(
        gw.gw.bridge().pending_bytes() <= MIB,
        "{}",
        gw.gw.bridge().pending_bytes()
    );
    assert!(refused > 0, "the pause must have blocked something (acked {acked})");

    nats.resume();
    // A last message through the same gateway connection: everything handed to NATS before it arrives before it.
    c.publish("big", json!("end")).await;
    let mut delivered = 0usize;
    loop {
        let m = next_msg(&mut sub).await;
        if &m.payload[..] == b"\"end\"" {
            break;
        }
        delivered += 1;
    }
    let budget_msgs = MIB / MSG;
    assert!(
        delivered <= acked + budget_msgs,
        "delivered {delivered}, acked {acked}, refused {refused}: refused messages reached NATS beyond the budget"
    );
    // Every byte comes back once NATS has written it.
    eventually("byte budget released", || gw.gw.bridge().pending_bytes() == 0).await;
}

// ---------------------------------------------------------------------------------------------------------------
// Finding 10: a room whose subscription the server removed.

/// A nats-server started from a config file that the test rewrites and reloads (SIGHUP).
struct ConfNats {
    nats: NatsServer,
    conf: PathBuf,
    _dir: tempfile::TempDir,
}

impl ConfNats {
    /// The gateway connects without credentials and becomes user `gw` (`no_auth_user`); `deny` lists subjects `gw`
    /// may not subscribe to.
    fn conf_text(deny: &[&str]) -> String {
        let deny: Vec<String> = deny.iter().map(|d| format!("{d:?}")).collect();
        format!(
            "authorization {{\n  users = [\n    {{ user: gw, password: gwpw, permissions: {{ subscribe: {{ allow: [\">\"], deny: [{}] }} }} }}\n  ]\n}}\nno_auth_user: gw\n",
            deny.join(", ")
        )
    }

    async fn start(deny: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("nats.conf");
        std::fs::write(&conf, Self::conf_text(deny)).expect("write conf");
        // Exits at once on a bad config: `NatsServer` notices that and fails with the server's log.
        let nats = NatsServer::start_with(&["-c", conf.to_str().expect("utf-8 path")]).await;
        ConfNats { nats, conf, _dir: dir }
    }

    fn url(&self) -> String {
        self.nats.url()
    }

    /// Rewrites the config with a new deny list and makes the server reload it.
    fn reload(&self, deny: &[&str]) {
        std::fs::write(&self.conf, Self::conf_text(deny)).expect("rewrite conf");
        self.nats.reload();
    }
}

/// The server removes the gateway's subscription of `rooms.secret` (permissions revoked by a config reload). The
/// room must not stay registered with nothing behind it: its members are told `left`, it leaves the registry, and a
/// later join is never left acked without a subscription (the server refuses it again: `unavailable`, or, if the
/// refusal arrives just after the ack, a `left` right behind it). Other rooms are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_removed_by_the_server_is_not_kept() {
    /// Joins `secret` and returns the reply. The server's refusal may reach the room before the ack is queued, so a
    /// `left` may come first; whatever the order, the last word about the room says whether it is joined.
    async fn join_secret(c: &mut common::WsClient, id: u64) -> serde_json::Value {
        c.send(json!({"op":"join","room":"secret","id":id})).await;
        loop {
            let f = c.recv().await;
            if f["id"] == json!(id) {
                return f;
            }
            assert_eq!(
                (f["op"].as_str(), f["room"].as_str()),
                (Some("left"), Some("secret")),
                "{f}"
            );
        }
    }

    let nats = ConfNats::start(&[]).await;
    let ca = std::sync::Arc::new(common::TestCa::new());
    let gw = TestGateway::start_with_ca(&nats.url(), ca, |_| {}).await;
    let mut a = gw.client().await;
    a.join("secret").await;
    a.join("open").await;
    assert_eq!(gw.gw.rooms().len(), 2);

    nats.reload(&["rooms.secret"]);
    let left = a.recv_op("left").await;
    assert_eq!(left["room"], "secret", "{left}");
    assert_eq!(left["reason"], "room subscription ended", "{left}");
    assert_eq!(gw.gw.rooms().len(), 1, "the dead room left the registry");

    // Joining again: the server refuses the new subscription, so no ack may stand.
    let mut b = gw.client().await;
    for c in [&mut a, &mut b] {
        let r = join_secret(c, 7).await;
        match r["op"].as_str() {
            Some("error") => assert_eq!(r["code"], "unavailable", "{r}"),
            Some("ack") => {
                let left = c.recv_op("left").await;
                assert_eq!(left["room"], "secret", "an ack must be followed by left: {left}");
            }
            _ => panic!("unexpected reply {r}"),
        }
    }
    eventually("no dead room registered", || gw.gw.rooms().len() == 1).await;

    // The other room still works end to end.
    let nc = async_nats::connect(nats.url()).await.expect("connect");
    nc.publish("rooms.open", "\"hi\"".into()).await.expect("publish");
    nc.flush().await.expect("flush");
    // A join the server refused as it was acked may be told `left` twice (before and after the ack): skip those.
    let m = loop {
        let f = a.recv().await;
        if f["op"] != "left" {
            break f;
        }
        assert_eq!(f["room"], "secret", "{f}");
    };
    assert_eq!(m["room"], "open", "{m}");

    // Permissions restored (the reload applies asynchronously): the room can be joined again and delivers. Until
    // the reload is in force a join is refused, or acked and then `left`; either way it is retried.
    nats.reload(&[]);
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "secret never joinable again");
        let r = join_secret(&mut b, 8).await;
        if r["op"] != "ack" {
            assert_eq!(r["code"], "unavailable", "{r}");
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        nc.publish("rooms.secret", "\"back\"".into()).await.expect("publish");
        nc.flush().await.expect("flush");
        let f = b.recv().await;
        if f["op"] == "message" {
            assert_eq!(f["room"], "secret", "{f}");
            break;
        }
        assert_eq!(f["op"], "left", "{f}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Finding 11: deep JSON.

/// `data` nested 32,000 deep (the attack) and just over `limits.max_json_depth` are answered `bad_request` and never
/// reach NATS; just within the limit is forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_json_never_reaches_nats() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    let depth = gw.gw.config().limits.max_json_depth;
    assert_eq!(depth, 32, "documented default");
    let nc = nats.client().await;
    let mut sub = nc.subscribe("rooms.deep").await.expect("subscribe");
    nc.flush().await.expect("flush");
    let mut c = gw.client().await;
    c.join("deep").await;

    let nested = |n: usize| format!("{}0{}", "[".repeat(n), "]".repeat(n));
    for n in [32_000, depth] {
        // The frame's object is level 1, so `data` nested `depth` deep is one level too many.
        c.send_text(&format!(
            r#"{{"op":"publish","room":"deep","id":1,"data":{}}}"#,
            nested(n)
        ))
        .await;
        let e = c.recv_op("error").await;
        assert_eq!(e["code"], "bad_request", "{e}");
        assert!(
            e["message"].as_str().unwrap_or("").len() < 100,
            "no echo of the input: {e}"
        );
    }
    let ok: Value = serde_json::from_str(&nested(depth - 1)).expect("valid JSON");
    c.publish("deep", ok.clone()).await;
    // The first (and only) message NATS saw is the one within the limit.
    let m = next_msg(&mut sub).await;
    assert_eq!(serde_json::from_slice::<Value>(&m.payload).expect("JSON"), ok);
    // The connection is still usable.
    let r = c.request(json!({"op":"ping"}), 2).await;
    assert_eq!(r["op"], "pong", "{r}");
}

// ---------------------------------------------------------------------------------------------------------------
// Finding 6: rooms per user/address and room-creation rate.

/// Anonymous connections from one address share `rooms.max_rooms_per_user` distinct rooms: a second connection
/// cannot add more, joining a room the address is in already is free, and leaving (or disconnecting) gives the
/// budget back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_per_address_are_capped() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.rooms.max_rooms_per_user = 3;
    })
    .await;
    let key = QuotaKey::Addr("127.0.0.1".parse().expect("ip"));
    let mut a = gw.client().await;
    for r in ["r1", "r2", "r3"] {
        a.join(r).await;
    }
    let e = a.request(json!({"op":"join","room":"r4"}), 1).await;
    assert_eq!(e["code"], "too_many_rooms", "{e}");

    // Another connection from the same address: same budget.
    let mut b = gw.client().await;
    let e = b.request(json!({"op":"join","room":"r4"}), 2).await;
    assert_eq!(e["code"], "too_many_rooms", "{e}");
    b.join("r1").await; // a room the address is in already costs nothing
    assert_eq!(gw.gw.rooms().rooms_of(&key), 3);

    // r3 is held by `a` only: leaving it frees one.
    let r = a.request(json!({"op":"leave","room":"r3"}), 3).await;
    assert_eq!(r["op"], "ack", "{r}");
    b.join("r4").await;
    // r1 is held by both: `a` leaving it frees nothing.
    let r = a.request(json!({"op":"leave","room":"r1"}), 4).await;
    assert_eq!(r["op"], "ack", "{r}");
    let e = a.request(json!({"op":"join","room":"r5"}), 5).await;
    assert_eq!(e["code"], "too_many_rooms", "{e}");

    // Disconnecting gives everything back; the accounting map forgets the address.
    drop(a);
    drop(b);
    eventually("rooms released on disconnect", || gw.gw.rooms().rooms_of(&key) == 0).await;
    assert_eq!(gw.gw.rooms().len(), 0);
    let mut c = gw.client().await;
    for r in ["x1", "x2", "x3"] {
        c.join(r).await;
    }
}

/// Creating rooms (a join that makes a new NATS subscription) is rated per address: past the burst, joins of new
/// rooms get `rate_limited`, joins of rooms that exist already still work, and the connection stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_creation_is_rate_limited() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.rooms.room_creations_per_second = 1;
        c.rooms.room_creations_burst = 3;
    })
    .await;
    let mut a = gw.client().await;
    for r in ["c1", "c2", "c3"] {
        a.join(r).await;
    }
    let e = a.request(json!({"op":"join","room":"c4"}), 1).await;
    assert_eq!(e["code"], "rate_limited", "{e}");
    assert_eq!(gw.gw.rooms().len(), 3, "no subscription made for the refused join");
    // An existing room is no creation.
    let mut b = gw.client().await;
    b.join("c1").await;
    // The refusal does not count as a joined room and the budget refills.
    let deadline = Instant::now() + WAIT;
    loop {
        let r = a.request(json!({"op":"join","room":"c4"}), 2).await;
        if r["op"] == "ack" {
            break;
        }
        assert_eq!(r["code"], "rate_limited", "{r}");
        assert!(Instant::now() < deadline, "creation budget never refilled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Measures the memory one room costs the gateway (RSS growth for 20,000 rooms, each with one member, made through
/// `Rooms::join` against a real NATS) and prints it. Not a pass/fail test: run it on purpose, in debug and release,
/// to update `docs/configuration.md`:
/// `cargo test --release --test nats_hardening memory_per_room -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, run by hand"]
async fn memory_per_room() {
    use roomwire::{
        outbox::Outbox,
        rooms::{Member, Membership},
    };
    const ROOMS: usize = 20_000;
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.rooms.max_rooms_per_user = 2 * ROOMS;
        c.rooms.room_creations_per_second = 1_000_000;
        c.rooms.room_creations_burst = 1_000_000;
    })
    .await;
    let outbox = std::sync::Arc::new(Outbox::new(1024, MIB));
    let key = QuotaKey::Addr("10.0.0.1".parse().expect("ip"));
    let join = |i: usize| {
        let rooms = gw.gw.rooms().clone();
        let member = Member {
            id: 1,
            outbox: outbox.clone(),
            key: key.clone(),
            hold: None,
        };
        async move { rooms.join(&format!("room-{i:06}"), member).await.expect("join") }
    };
    // Warm up allocator and NATS client buffers, then measure.
    let mut held: Vec<Membership> = Vec::with_capacity(ROOMS + 1000);
    for i in 0..1000 {
        held.push(join(ROOMS + i).await);
    }
    let (before, _) = common::rss();
    for chunk in (0..ROOMS).collect::<Vec<_>>().chunks(500) {
        let joins = chunk.iter().map(|&i| join(i));
        held.extend(futures_util::future::join_all(joins).await);
    }
    let (after, _) = common::rss();
    let per_room = (after.saturating_sub(before)) as f64 / ROOMS as f64;
    println!(
        "memory_per_room: {ROOMS} rooms, RSS {} -> {} KiB, {per_room:.0} bytes per room ({})",
        before / 1024,
        after / 1024,
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
    assert_eq!(gw.gw.rooms().len(), ROOMS + 1000);
}

/// An outage with clients still publishing (issue 13): while NATS is down, every publish is answered `unavailable`
/// at once (nothing waits for a dead link, so nothing piles up: the byte budget stays empty), `/readyz` says 503, the
/// WebSocket clients stay, and when NATS is back the gateway is ready again and delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_with_publishing_clients_stays_bounded_and_recovers() {
    let mut nats = common::NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| c.nats.publish_timeout = Duration::from_secs(2)).await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        let mut c = gw.client().await;
        c.join("outage").await;
        clients.push(c);
    }
    nats.stop();
    gw.wait_ready(false).await;
    let mut answered = 0;
    for round in 0..50u64 {
        for (i, c) in clients.iter_mut().enumerate() {
            let started = std::time::Instant::now();
            let r = c
                .request(
                    json!({"op":"publish","room":"outage","data":{"round": round}}),
                    1000 + i as u64,
                )
                .await;
            assert_eq!(r["code"], "unavailable", "{r}");
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "answered within publish_timeout"
            );
            answered += 1;
        }
        assert_eq!(gw.gw.bridge().pending_bytes(), 0, "nothing is buffered for a dead link");
    }
    assert_eq!(answered, 500);
    nats.restart().await;
    gw.wait_ready(true).await;
    let backend = nats.client().await;
    // The room is subscribed again after the reconnect: publish until the first client hears it.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        backend.publish("rooms.outage", "\"back\"".into()).await.unwrap();
        backend.flush().await.unwrap();
        if let Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) = tokio::time::timeout(
            Duration::from_millis(200),
            futures_util::StreamExt::next(&mut clients[0].ws),
        )
        .await
            && t.contains("\"back\"")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no delivery after NATS came back"
        );
    }
}
