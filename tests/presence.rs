//! Presence across gateways on a real `nats-server -js` (issue 24, `docs/presence.md`): two in-process gateways on
//! one NATS, real TLS clients. Each sees the other's members and their arrivals; a leave is `leave`, a drained
//! gateway's members `disconnect`, a vanished gateway's members `gateway_lost` once its entries expire; refusals;
//! and the KV writes of a room are coalesced, also under churn across rooms (and, run by hand, the write-rate figure of
//! BENCHMARKS.md: `presence_write_rate`).

mod common;

use std::time::Duration;

use common::{NatsServer, TestGateway, WsClient};
use futures_util::StreamExt;
use roomwire::{config::Config, room_pattern::RoomPattern};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

async fn nats_js() -> (NatsServer, tempfile::TempDir) {
    let store = tempfile::tempdir().expect("store dir");
    let dir = store.path().to_str().expect("utf-8 path").to_owned();
    let nats = NatsServer::start_with(&["-js", "-sd", &dir]).await;
    (nats, store)
}

/// Sends `v` with `id` and returns the reply with that id, skipping presence events and messages.
async fn ask(c: &mut WsClient, mut v: Value, id: u64) -> Value {
    v["id"] = json!(id);
    c.send(v).await;
    wait_for(c, Duration::from_secs(5), |r| r["id"] == json!(id)).await
}

async fn join(c: &mut WsClient, room: &str) {
    let r = ask(c, json!({"op":"join","room":room}), 900_001).await;
    assert_eq!(r["op"], "ack", "join {room}: {r}");
}

/// [`presence`] on a gateway with its own id (test gateways share one otherwise, and so would their conn ids).
fn named(id: &'static str) -> impl FnOnce(&mut Config) {
    move |c| {
        presence(c);
        c.server.gateway_id = Some(id.into());
    }
}

/// Presence on for rooms `p-*`; anonymous clients may join `p-*` and `n-*`.
fn presence(c: &mut Config) {
    c.presence.enabled = true;
    c.presence.rooms = vec![RoomPattern::new("p-*")];
    c.presence.ttl = Duration::from_secs(2);
    c.auth.anonymous.join = vec![RoomPattern::new("p-*"), RoomPattern::new("n-*")];
}

/// The next frame matching `want` within `within`, skipping any other.
async fn wait_for(c: &mut WsClient, within: Duration, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let msg = tokio::time::timeout_at(deadline, c.ws.next())
            .await
            .expect("the awaited frame arrived in time");
        match msg {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).expect("JSON frame");
                if want(&v) {
                    return v;
                }
            }
            Some(Ok(_)) => {}
            other => panic!("connection ended while waiting: {other:?}"),
        }
    }
}

fn joined(room: &str, conn: &str) -> impl Fn(&Value) -> bool {
    let (room, conn) = (room.to_owned(), conn.to_owned());
    move |v| v["op"] == "member_joined" && v["room"] == room && v["conn"] == conn
}

fn left(room: &str, conn: &str) -> impl Fn(&Value) -> bool {
    let (room, conn) = (room.to_owned(), conn.to_owned());
    move |v| v["op"] == "member_left" && v["room"] == room && v["conn"] == conn
}

/// Asks `presence` until it lists every conn of `want` (and no other), within `within`; returns the answer.
async fn presence_lists(c: &mut WsClient, room: &str, want: &[&str], within: Duration) -> Value {
    let deadline = Instant::now() + within;
    let mut id = 1000;
    loop {
        id += 1;
        let r = ask(c, json!({"op":"presence","room":room}), id).await;
        assert_eq!(r["op"], "presence", "{r}");
        let mut conns: Vec<String> = r["members"]
            .as_array()
            .expect("members")
            .iter()
            .map(|m| m["conn"].as_str().expect("conn").to_owned())
            .collect();
        conns.sort();
        let mut expected: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        expected.sort();
        if conns == expected {
            return r;
        }
        assert!(Instant::now() < deadline, "presence of {room} is {r}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn two_gateways_see_each_other_join_and_leave() {
    let (nats, _store) = nats_js().await;
    let one = TestGateway::start(&nats, named("gw-one")).await;
    let two = TestGateway::start(&nats, named("gw-two")).await;
    let room = "p-lobby";

    let mut a = one.client().await;
    join(&mut a, room).await;
    let mut b = two.client().await;
    join(&mut b, room).await;
    // Within 2 s of B's join ack, A gets `member_joined` for B and both list both.
    let started = Instant::now();
    let ev = wait_for(&mut a, Duration::from_secs(2), joined(room, &b.conn)).await;
    assert_eq!(ev["user"], Value::Null, "{ev}");
    assert_eq!(ev["first"], true, "anonymous connections are always first: {ev}");
    let (ac, bc) = (a.conn.clone(), b.conn.clone());
    let r = presence_lists(&mut a, room, &[&ac, &bc], Duration::from_secs(2)).await;
    assert_eq!((r["count"].as_u64(), r["users"].as_u64()), (Some(2), Some(0)), "{r}");
    // B sees its own arrival as everyone does (before `presence_lists`, which skips events).
    wait_for(&mut b, Duration::from_secs(2), joined(room, &bc)).await;
    presence_lists(&mut b, room, &[&ac, &bc], Duration::from_secs(2)).await;
    assert!(started.elapsed() < Duration::from_secs(2));

    let s = ask(&mut b, json!({"op":"presence_stats","room":room}), 7).await;
    assert_eq!(s, json!({"op":"presence_stats","id":7,"room":room,"count":2,"users":0}));

    // A room without local members is read from the bucket.
    let mut c = one.client().await;
    let r = presence_lists(&mut c, room, &[&ac, &bc], Duration::from_secs(2)).await;
    assert_eq!(r["count"], 2, "{r}");

    // B leaves: A hears `leave`, and B is no longer listed.
    let r = ask(&mut b, json!({"op":"leave","room":room}), 8).await;
    assert_eq!(r["op"], "ack", "{r}");
    let ev = wait_for(&mut a, Duration::from_secs(2), left(room, &bc)).await;
    assert_eq!(
        (ev["reason"].as_str(), ev["last"].as_bool()),
        (Some("leave"), Some(true)),
        "{ev}"
    );
    presence_lists(&mut a, room, &[&ac], Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_drained_gateways_members_disconnect() {
    let (nats, _store) = nats_js().await;
    let one = TestGateway::start(&nats, named("gw-one")).await;
    let mut two = TestGateway::start(&nats, named("gw-two")).await;
    let room = "p-drain";
    let mut a = one.client().await;
    join(&mut a, room).await;
    let mut b = two.client().await;
    join(&mut b, room).await;
    let bc = b.conn.clone();
    wait_for(&mut a, Duration::from_secs(2), joined(room, &bc)).await;

    two.shutdown().await;
    let ev = wait_for(&mut a, Duration::from_secs(3), left(room, &bc)).await;
    assert_eq!(ev["reason"], "disconnect", "{ev}");
    assert_eq!(ev["last"], true, "{ev}");
    let ac = a.conn.clone();
    presence_lists(&mut a, room, &[&ac], Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_vanished_gateways_members_are_lost_when_its_entries_expire() {
    let (nats, _store) = nats_js().await;
    let one = TestGateway::start(&nats, named("gw-one")).await;
    let mut two = TestGateway::start(&nats, named("gw-two")).await;
    let room = "p-crash";
    let mut a = one.client().await;
    join(&mut a, room).await;
    let mut b = two.client().await;
    join(&mut b, room).await;
    let bc = b.conn.clone();
    wait_for(&mut a, Duration::from_secs(2), joined(room, &bc)).await;

    // kill -9: from now on gateway two writes and removes nothing; then it goes away.
    two.gw.presence().expect("presence on").vanish();
    let killed = Instant::now();
    two.shutdown().await;
    drop(b);
    let ttl = Duration::from_secs(2);
    let ev = wait_for(&mut a, ttl + Duration::from_secs(5), left(room, &bc)).await;
    assert_eq!(ev["reason"], "gateway_lost", "{ev}");
    assert!(
        killed.elapsed() >= ttl / 2,
        "expired, not removed: {:?}",
        killed.elapsed()
    );
    let ac = a.conn.clone();
    presence_lists(&mut a, room, &[&ac], Duration::from_secs(1)).await;
}

/// A gateway restarting after a crash is a new instance: its new members are listed beside the old entry until that
/// expires (`gateway_lost`), and nothing of the old run comes back, although both runs share the gateway id and so
/// the connection ids (`gw-re-1` twice).
#[tokio::test]
async fn a_restarted_gateway_never_resurrects_its_old_entries() {
    let (nats, _store) = nats_js().await;
    let one = TestGateway::start(&nats, named("gw-one")).await;
    let room = "p-restart";
    let mut a = one.client().await;
    join(&mut a, room).await;
    let ac = a.conn.clone();

    let mut first = TestGateway::start(&nats, named("gw-re")).await;
    let mut old = first.client().await;
    join(&mut old, room).await;
    let oc = old.conn.clone();
    wait_for(&mut a, Duration::from_secs(2), joined(room, &oc)).await;
    // kill -9, then a restart under the same gateway id.
    first.gw.presence().expect("presence on").vanish();
    first.shutdown().await;
    drop(old);
    let second = TestGateway::start(&nats, named("gw-re")).await;
    let mut new = second.client().await;
    join(&mut new, room).await;
    let nc = new.conn.clone();
    assert_eq!(
        nc, oc,
        "both runs number their connections alike: the instance tells them apart"
    );
    // The old run's entry expires and is reported as such; the new run's member stays.
    let ev = wait_for(&mut a, Duration::from_secs(2) + Duration::from_secs(5), |v| {
        v["op"] == "member_left" && v["room"] == room && v["reason"] == "gateway_lost"
    })
    .await;
    assert_eq!(ev["conn"], oc.as_str(), "{ev}");
    let listed = presence_lists(&mut a, room, &[&ac, &nc], Duration::from_secs(2)).await;
    assert_eq!(listed["count"], 2, "{listed}");
    // Nothing of the old run comes back at its next refresh time (ttl / 3) or later.
    let quiet = Instant::now() + Duration::from_secs(2);
    while Instant::now() < quiet {
        let r = presence_lists(&mut a, room, &[&ac, &nc], Duration::from_secs(1)).await;
        assert_eq!(r["count"], 2, "{r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn presence_needs_join_permission_and_a_presence_room() {
    let (nats, _store) = nats_js().await;
    let gw = TestGateway::start(&nats, presence).await;
    let mut c = gw.client().await;
    for (op, room, code) in [
        ("presence", "q-secret", "forbidden"),
        ("presence_stats", "q-secret", "forbidden"),
        ("presence", "n-plain", "bad_request"),
        ("presence_stats", "n-plain", "bad_request"),
    ] {
        let r = c.request(json!({"op":op,"room":room}), 3).await;
        assert_eq!(
            (r["op"].as_str(), r["code"].as_str()),
            (Some("error"), Some(code)),
            "{op} {room}: {r}"
        );
    }
    let r = c.request(json!({"op":"presence","room":"p-empty"}), 4).await;
    assert_eq!(
        r,
        json!({"op":"presence","id":4,"room":"p-empty","count":0,"users":0,"members":[]})
    );

    // Presence off: every room is bad_request.
    let off = TestGateway::start(&nats, |c| c.auth.anonymous.join = vec![RoomPattern::new("*")]).await;
    let mut c = off.client().await;
    let r = c.request(json!({"op":"presence","room":"p-x"}), 5).await;
    assert_eq!(r["code"], "bad_request", "{r}");
}

#[tokio::test]
async fn writes_of_a_room_are_coalesced() {
    let (nats, _store) = nats_js().await;
    let gw = TestGateway::start(&nats, presence).await;
    let room = "p-busy";
    let mut watcher = gw.client().await;
    join(&mut watcher, room).await;
    let wc = watcher.conn.clone();
    wait_for(&mut watcher, Duration::from_secs(2), joined(room, &wc)).await;

    let writes = || gw.gw.metrics().presence_writes.get();
    let before = writes();
    let started = Instant::now();
    let mut clients = futures_util::future::join_all((0..20).map(|_| gw.client())).await;
    futures_util::future::join_all(clients.iter_mut().map(|c| join(c, room))).await;
    let last = clients.last().expect("clients").conn.clone();
    wait_for(&mut watcher, Duration::from_secs(3), joined(room, &last)).await;
    futures_util::future::join_all(clients.iter_mut().map(|c| ask(c, json!({"op":"leave","room":room}), 5))).await;
    let elapsed = started.elapsed();
    // 40 membership changes; the last of them is written within a flush interval.
    wait_for(&mut watcher, Duration::from_secs(3), left(room, &last)).await;
    let total = started.elapsed();
    let made = writes() - before;
    let flush = roomwire::presence::FLUSH_INTERVAL;
    let bound = (total.as_millis() / flush.as_millis()) as u64 + 2;
    eprintln!("40 joins and leaves in {elapsed:?}, {made} writes in {total:?}");
    assert!(
        made <= bound,
        "{made} writes for 40 changes in {total:?} (bound {bound})"
    );
    assert!(made < 20, "{made} writes for 40 changes");
}

/// What [`churn`] drives: `churners` clients joining and leaving among `rooms` rooms at `rate` joins and leaves per
/// second in all, for `secs`; each room also has one resident member (so the rooms live through the run, and the
/// figure is the churn's, not rooms being made and ended).
struct Churn {
    rooms: usize,
    churners: usize,
    rate: u32,
    secs: f64,
}

/// What [`churn`] measured over its window.
#[derive(Debug)]
struct Measured {
    events: u64,
    secs: f64,
    /// `roomwire_presence_writes_total` over the window.
    writes: u64,
    /// Messages on the bucket's subjects (`$KV.<bucket>.>`) seen by a NATS subscriber over the window.
    kv_messages: u64,
    /// The shortest time between two messages on one key, as the subscriber received them.
    min_gap: Duration,
    /// Keys that got messages.
    keys: usize,
}

impl Measured {
    fn events_per_s(&self) -> f64 {
        self.events as f64 / self.secs
    }
    fn writes_per_s(&self) -> f64 {
        self.writes as f64 / self.secs
    }
}

/// One gateway with presence, `c.rooms` residents, then `c.churners` real TLS WebSocket clients, each joining a room
/// and leaving it in turn on a fixed schedule (together `c.rate` events per second; each waits for its ack). Counts
/// the presence writes (the metric, and the KV messages a NATS subscriber sees) over the churn.
async fn churn(c: &Churn, tweak: impl FnOnce(&mut Config)) -> Measured {
    use std::sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    };
    let (nats, _store) = nats_js().await;
    let gw = TestGateway::start(&nats, |cfg| {
        presence(cfg);
        cfg.rooms.max_rooms_per_user = 100_000;
        cfg.rooms.room_creations_per_second = 100_000;
        cfg.rooms.room_creations_burst = 100_000;
        tweak(cfg);
    })
    .await;
    let bucket = gw.gw.config().presence.bucket.clone();
    let room = |i: usize| format!("p-churn-{i:04}");

    // Residents: one per room, each joined and listed by `presence` (the room's first write is made and watched),
    // then read and discarded in the background.
    let mut drains = Vec::new();
    for batch in (0..c.rooms).collect::<Vec<_>>().chunks(50) {
        let residents = futures_util::future::join_all(batch.iter().map(|&i| {
            let gw = &gw;
            let name = room(i);
            async move {
                let mut r = gw.client().await;
                join(&mut r, &name).await;
                let me = r.conn.clone();
                presence_lists(&mut r, &name, &[&me], Duration::from_secs(10)).await;
                r
            }
        }))
        .await;
        for mut r in residents {
            drains.push(tokio::spawn(async move { while r.ws.next().await.is_some() {} }));
        }
    }
    let mut churners = futures_util::future::join_all((0..c.churners).map(|_| gw.client())).await;

    // Every message on the bucket's subjects, with when it was received.
    let watcher = nats.client().await;
    let mut kv = watcher
        .subscribe(format!("$KV.{bucket}.>"))
        .await
        .expect("subscribe to the bucket's subjects");
    watcher.flush().await.expect("flush");
    let seen = Arc::new(parking_lot::Mutex::new(Vec::<(String, Instant)>::new()));
    let recorder = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(m) = kv.next().await {
                seen.lock().push((m.subject.to_string(), Instant::now()));
            }
        })
    };

    let events = Arc::new(AtomicU64::new(0));
    let period = Duration::from_secs_f64(c.churners as f64 / f64::from(c.rate));
    let per_client = (c.secs / period.as_secs_f64()).round() as u64;
    let writes = || gw.gw.metrics().presence_writes.get();
    let (before, started) = (writes(), Instant::now());
    futures_util::future::join_all(churners.iter_mut().enumerate().map(|(n, client)| {
        let events = events.clone();
        let offset = period.mul_f64(n as f64 / c.churners as f64);
        let name = move |k: u64| room((n * 7 + k as usize * 13) % c.rooms);
        async move {
            let mut tick = tokio::time::interval_at(started + offset, period);
            for k in 0..per_client {
                tick.tick().await;
                let (op, r) = if k % 2 == 0 {
                    ("join", name(k))
                } else {
                    ("leave", name(k - 1))
                };
                let reply = ask(client, json!({"op":op,"room":r}), k + 1).await;
                assert_eq!(reply["op"], "ack", "{op} {r}: {reply}");
                events.fetch_add(1, Ordering::Relaxed);
            }
        }
    }))
    .await;
    let (after, ended) = (writes(), Instant::now());
    // Messages sent by the end of the window have arrived once a round trip made after it returns.
    watcher.flush().await.expect("flush");
    recorder.abort();
    for d in drains {
        d.abort();
    }

    let mut per_key: std::collections::HashMap<String, Vec<Instant>> = Default::default();
    let mut kv_messages = 0;
    for (subject, at) in seen.lock().iter() {
        if (started..=ended).contains(at) {
            kv_messages += 1;
            per_key.entry(subject.clone()).or_default().push(*at);
        }
    }
    let min_gap = per_key
        .values()
        .flat_map(|t| t.windows(2).map(|w| w[1] - w[0]))
        .min()
        .unwrap_or(Duration::MAX);
    Measured {
        events: events.load(Ordering::Relaxed),
        secs: (ended - started).as_secs_f64(),
        writes: after - before,
        kv_messages,
        min_gap,
        keys: per_key.len(),
    }
}

fn report(c: &Churn, m: &Measured) {
    let flush = roomwire::presence::FLUSH_INTERVAL.as_secs_f64();
    println!(
        "presence_write_rate: {} rooms, {} churning clients, {:.0} joins+leaves/s for {:.1} s ({}): \
         {} writes = {:.0} writes/s (KV messages seen: {}, {:.0}/s, on {} keys; shortest gap on one key {:?}); \
         bound {:.0}/s ({} rooms / {:.0} ms), a write per event would be {:.0}/s",
        c.rooms,
        c.churners,
        m.events_per_s(),
        m.secs,
        if cfg!(debug_assertions) { "debug" } else { "release" },
        m.writes,
        m.writes_per_s(),
        m.kv_messages,
        m.kv_messages as f64 / m.secs,
        m.keys,
        m.min_gap,
        c.rooms as f64 / flush,
        c.rooms,
        flush * 1000.0,
        m.events_per_s(),
    );
}

/// The write-rate figure of BENCHMARKS.md ("Presence writes"): 1,000 joins and leaves per second across 100 rooms,
/// by 200 real clients, for 10 s; KV writes per second against the bound (one per room per `FLUSH_INTERVAL`) and
/// against a write per event. Other shapes: `CHURN_RATE`, `CHURN_ROOMS`, `CHURN_CLIENTS`, `CHURN_SECS`.
/// `cargo test --release --test presence presence_write_rate -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, run by hand"]
async fn presence_write_rate() {
    let env = |k: &str, d: f64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let c = Churn {
        rooms: env("CHURN_ROOMS", 100.0) as usize,
        churners: env("CHURN_CLIENTS", 200.0) as usize,
        rate: env("CHURN_RATE", 1000.0) as u32,
        secs: env("CHURN_SECS", 10.0),
    };
    // The shipped ttl (30 s: a refresh every 10 s), not the tests' short one.
    let m = churn(&c, |cfg| cfg.presence.ttl = Duration::from_secs(30)).await;
    report(&c, &m);
    let bound = c.rooms as f64 / roomwire::presence::FLUSH_INTERVAL.as_secs_f64();
    assert!(m.writes_per_s() <= bound * 1.05, "{m:?}");
}

/// The same churn, small: 10 rooms at 200 joins and leaves per second for 2 s make at most one write per room per
/// flush interval (a write per event would be twice that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_across_rooms_stays_under_a_write_per_room_per_flush() {
    let c = Churn {
        rooms: 10,
        churners: 20,
        rate: 200,
        secs: 2.0,
    };
    let m = churn(&c, |_| {}).await;
    report(&c, &m);
    let flush = roomwire::presence::FLUSH_INTERVAL;
    let bound = c.rooms as u64 * ((m.secs / flush.as_secs_f64()) as u64 + 1);
    assert!(m.writes <= bound, "{} writes, bound {bound}: {m:?}", m.writes);
    assert!(m.events >= 300, "the churn ran: {m:?}");
    assert!(m.writes < m.events / 2, "{m:?}");
}
