//! Backpressure (issue 3): a client that does not read never hurts the others, every overflow policy does what
//! `docs/backpressure.md` says, a slow or absent NATS is answered `unavailable`, and the gateway's memory stays within
//! what its configured bounds allow.
//!
//! A "stalled" client is a [`WsClient`] the test simply does not read from, with a small TCP receive buffer so that
//! only the gateway's socket send buffer (a few MiB on loopback) stands between it and the outbox. Memory is the peak
//! RSS of this process (the gateway runs in-process), so the tests here run one at a time (see [`serial`]).

mod common;

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use roomwire::{bridge::Failure, config::Overflow, metrics::SlowConsumer};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

const KIB: usize = 1024;
const MIB: u64 = 1024 * 1024;

/// Receive buffer of stalled clients (the kernel doubles it).
const STALLED_RCVBUF: u32 = 32 * 1024;

/// Every test holds this for its whole run: RSS is per process, and one test's traffic must not count in another's
/// figures (nor its CPU use make another's deadlines flaky). An async mutex: each test has its own runtime, and a
/// panicking test releases it without poisoning it.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// Returns the allocator's free memory to the OS, so that RSS measures live memory: without it, heap freed by an
/// earlier test would absorb a later test's growth unseen.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: glibc's malloc_trim only releases free pages; it has no preconditions.
        unsafe { malloc_trim(0) };
    }
}

/// Payload of message `n`: JSON, `pad.len()` + about 20 bytes.
fn payload(n: u64, pad: &str) -> Bytes {
    Bytes::from(format!(r#"{{"n":{n},"p":"{pad}"}}"#))
}

/// Sequence number of a `message` frame built from [`payload`], without parsing the padding as JSON (the ordinary
/// clients of the flood test read tens of MiB). None for any other frame.
fn seq_of(frame: &str) -> Option<u64> {
    if !frame.starts_with(r#"{"op":"message""#) {
        return None;
    }
    let rest = &frame[frame.find(r#""data":{"n":"#)? + r#""data":{"n":"#.len()..];
    rest[..rest.find(',')?].parse().ok()
}

/// What a client saw of one room after a stall, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Message(u64),
    Gap(u64),
}

/// Reads frames until a reply with `id` (the pong of a `ping`), returning the room messages and gap notices before it.
async fn read_until_reply(c: &mut WsClient, room: &str, id: u64) -> Vec<Seen> {
    let mut seen = Vec::new();
    loop {
        let v = c.recv().await;
        if v["id"] == json!(id) {
            assert_eq!(v["op"], "pong", "{v}");
            return seen;
        }
        seen.push(classify(&v, room));
    }
}

fn classify(v: &Value, room: &str) -> Seen {
    assert_eq!(v["room"], room, "frame of another room: {v}");
    match v["op"].as_str() {
        Some("message") => Seen::Message(v["data"]["n"].as_u64().expect("numbered message")),
        Some("gap") => Seen::Gap(v["dropped"].as_u64().expect("gap count")),
        _ => panic!("unexpected frame {v}"),
    }
}

/// Checks a stream of messages numbered from 0 with gap notices: numbers strictly increase, and a gap notice stands
/// right before the next message and names exactly how many numbers are missing before it. When `gaps_required` is
/// false (`latest`), holes without a notice are allowed but any notice must still be exact. Returns the messages'
/// numbers and the total of the gap notices.
fn check_order_and_gaps(seen: &[Seen], gaps_required: bool) -> (Vec<u64>, u64) {
    let mut next = 0u64;
    let mut pending_gap: Option<u64> = None;
    let mut numbers = Vec::new();
    let mut gap_total = 0;
    for s in seen {
        match *s {
            Seen::Gap(n) => {
                assert!(pending_gap.is_none(), "two gap notices in a row: {seen:?}");
                assert!(n > 0, "empty gap notice");
                pending_gap = Some(n);
                gap_total += n;
            }
            Seen::Message(n) => {
                assert!(n >= next, "message {n} after {} (order broken)", next.wrapping_sub(1));
                let missing = n - next;
                match pending_gap.take() {
                    Some(g) => assert_eq!(
                        g, missing,
                        "gap notice says {g} dropped before {n}, {missing} are missing"
                    ),
                    None if gaps_required => assert_eq!(missing, 0, "{missing} missing before {n}, no gap notice"),
                    None => {}
                }
                numbers.push(n);
                next = n + 1;
            }
        }
    }
    assert!(pending_gap.is_none(), "gap notice not followed by a message");
    (numbers, gap_total)
}

/// Reads a client that must get messages `0..count` of the flood room in order, and nothing else. Reports how many
/// arrived on `progress` so the publisher can pace itself.
async fn read_all_in_order(mut c: WsClient, count: u64, progress: watch::Sender<u64>) {
    let mut next = 0u64;
    while next < count {
        let frame = tokio::time::timeout(WAIT, c.ws.next())
            .await
            .unwrap_or_else(|_| panic!("ordinary client {}: message {next} not in time", c.conn));
        match frame {
            Some(Ok(Message::Text(t))) => {
                let n = seq_of(&t).unwrap_or_else(|| panic!("ordinary client {}: unexpected frame {t}", c.conn));
                assert_eq!(n, next, "ordinary client {}: out of order or lost", c.conn);
                next += 1;
                progress.send_replace(next);
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("ordinary client {}: expected a message, got {other:?}", c.conn),
        }
    }
}

/// Drains a stalled client after its connection was ended for being slow: it must see a prefix `0..k` of the flood
/// in order, then either the 4008 close or (if `write_timeout` passed first) a dropped connection. Returns `k` and
/// which of the two ended it.
async fn drain_slow_consumer(mut c: WsClient) -> (u64, &'static str) {
    let mut next = 0u64;
    loop {
        let frame = tokio::time::timeout(WAIT, c.ws.next())
            .await
            .expect("stalled client: close in time");
        match frame {
            Some(Ok(Message::Text(t))) => {
                let n = seq_of(&t).unwrap_or_else(|| panic!("stalled client: unexpected frame {t}"));
                assert_eq!(n, next, "stalled client: out of order");
                next += 1;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 4008, "close reason {:?}", f.reason);
                return (next, "closed 4008");
            }
            // Dropped after write_timeout: the close frame could not be written into the full socket.
            None | Some(Err(_)) => return (next, "dropped"),
            other => panic!("stalled client: unexpected {other:?}"),
        }
    }
}

fn slow_consumers(gw: &TestGateway, reason: SlowConsumer) -> u64 {
    gw.gw.metrics().slow_consumers.get(reason)
}

/// Issue 3, tests 1 and 4: N ordinary clients and one that never reads, a backend publishing as fast as the ordinary
/// clients take it. They get every message in order and in time; the stalled one is closed as a slow consumer; and
/// the gateway's peak memory growth stays far below the flood's size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_client_costs_the_others_nothing_and_memory_stays_bounded() {
    let _serial = serial().await;
    const ORDINARY: usize = 5;
    const MESSAGES: u64 = 16_384;
    const SIZE: usize = 4 * KIB;
    const QUEUE: usize = 16;
    // Messages the publisher may have ahead of the slowest ordinary client: under the queue bound, so a healthy
    // client is never the one that overflows.
    const WINDOW: u64 = QUEUE as u64 / 2;
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.limits.max_pending_messages = QUEUE;
        c.limits.max_pending_bytes = 64 * KIB;
        c.limits.write_timeout = Duration::from_secs(20);
        c.nats.subscription_capacity = 256;
    })
    .await;
    let cfg = &gw.gw.config();

    let mut stalled = gw.client_small_rcvbuf(STALLED_RCVBUF).await;
    stalled.join("flood").await;
    let mut progress = Vec::new();
    let mut readers = Vec::new();
    for _ in 0..ORDINARY {
        let mut c = gw.client().await;
        c.join("flood").await;
        let (tx, rx) = watch::channel(0u64);
        progress.push(rx);
        readers.push(tokio::spawn(read_all_in_order(c, MESSAGES, tx)));
    }
    let backend = nats.client().await;
    let pad = "x".repeat(SIZE - 20);

    trim_heap();
    let (rss_before, _) = rss();
    reset_peak_rss();
    let started = Instant::now();
    let mut queue_full_at = None;
    let mut longest_wait = Duration::ZERO;
    for n in 0..MESSAGES {
        if n >= WINDOW {
            let waiting = Instant::now();
            for rx in &mut progress {
                let waited = tokio::time::timeout(WAIT, rx.wait_for(|&got| got + WINDOW > n))
                    .await
                    .is_ok();
                assert!(
                    waited,
                    "an ordinary client stopped receiving at {} of {n}",
                    *rx.borrow()
                );
            }
            longest_wait = longest_wait.max(waiting.elapsed());
        }
        backend.publish("rooms.flood", payload(n, &pad)).await.unwrap();
        if queue_full_at.is_none() && slow_consumers(&gw, SlowConsumer::QueueFull) > 0 {
            queue_full_at = Some(n);
        }
    }
    backend.flush().await.unwrap();
    for r in readers {
        r.await.unwrap();
    }
    let elapsed = started.elapsed();
    let (rss_after, peak) = rss();

    let flood_bytes = MESSAGES * SIZE as u64;
    // What the bounds allow: per connection a full queue, tungstenite's write buffer and a batch being written; the
    // room's NATS subscription buffer; and 16 MiB for the allocator, TLS and test-side buffers.
    let conns = ORDINARY as u64 + 1;
    let allowed = conns * (2 * cfg.limits.max_pending_bytes + cfg.limits.max_write_buffer_size) as u64
        + cfg.nats.subscription_capacity as u64 * SIZE as u64
        + 16 * MIB;
    let growth = peak.saturating_sub(rss_before);
    println!(
        "flood: {MESSAGES} x {SIZE} B = {} MiB to {ORDINARY} clients in {elapsed:?}; queue overflowed at message \
         {queue_full_at:?}; RSS before {} MiB, peak {} MiB (+{:.1} MiB), after {} MiB; \
         allowed growth {} MiB",
        flood_bytes / MIB,
        rss_before / MIB,
        peak / MIB,
        growth as f64 / MIB as f64,
        rss_after / MIB,
        allowed / MIB
    );
    assert!(
        flood_bytes >= 2 * allowed,
        "flood too small to tell a bounded queue from an unbounded one"
    );
    assert!(
        growth < allowed,
        "RSS grew {growth} bytes, over the {allowed} the bounds allow"
    );

    // The stalled client overflowed its queue (policy disconnect) while the flood went on, and was closed: it got
    // a prefix of the flood, then 4008 (or, had write_timeout passed first, a dropped connection).
    assert!(queue_full_at.is_some(), "the stalled client's queue never overflowed");
    let (prefix, ended) = drain_slow_consumer(stalled).await;
    println!("stalled client: got messages 0..{prefix}, then {ended}");
    assert!(prefix < MESSAGES, "the stalled client got everything");
    // Test 4: the stalled peer added no delay. Generous bounds (TLS in a debug build), but far below write_timeout,
    // which is how long a fan-out that waited on the stalled client would hold everyone up.
    println!("longest wait for the slowest ordinary client to take a message: {longest_wait:?}");
    assert!(
        longest_wait < Duration::from_secs(2),
        "an ordinary client was held up {longest_wait:?}"
    );
    assert!(elapsed < WAIT, "delivery took {elapsed:?}");
}

/// Messages published between two looks at the gateway in [`flood_until`].
const CHUNK: u64 = 64;

/// Publishes numbered messages (from 0) into `room` in chunks of [`CHUNK`] until `enough()`, and returns how many it
/// published. With `fanned_out`, each chunk is first waited for until that gateway has fanned all of it out, so
/// `enough` sees the chunk's whole effect (leave it out when the room may vanish: a disconnected last member).
async fn flood_until(
    backend: &async_nats::Client,
    room: &str,
    pad: &str,
    fanned_out: Option<&TestGateway>,
    mut enough: impl FnMut() -> bool,
) -> u64 {
    let subject = format!("rooms.{room}");
    let base = fanned_out.map_or(0, |gw| gw.gw.metrics().room_messages.get());
    let deadline = Instant::now() + WAIT;
    let mut n = 0;
    loop {
        assert!(
            Instant::now() < deadline,
            "the stalled client's queue never overflowed ({n} published)"
        );
        for _ in 0..CHUNK {
            backend.publish(subject.clone(), payload(n, pad)).await.unwrap();
            n += 1;
        }
        backend.flush().await.unwrap();
        if let Some(gw) = fanned_out {
            gw.wait_fanned_out(base + n).await;
        }
        if enough() {
            return n;
        }
    }
}

/// For [`flood_until`]: true once `total` (a drop counter) reached `at_least` and two chunks in a row were dropped
/// whole, so the writer is stuck behind the client's full socket (a writer merely slower than the bursts takes a
/// batch every few messages). "Whole" allows one message: fan-out counts a message as fanned out just before it
/// counts its drop, so the last one may not be counted yet.
fn stalled_and_dropped(total: u64, state: &mut (u64, u32), at_least: u64) -> bool {
    let (last, streak) = state;
    *streak = if total - *last >= CHUNK - 1 { *streak + 1 } else { 0 };
    *last = total;
    *streak >= 2 && total >= at_least
}

/// A gateway with small queues and a long `write_timeout` (a stall then a resume must not be taken for a dead
/// client), a stalled client in `room`, and a backend.
async fn stalled_in(
    nats: &NatsServer,
    room: &str,
    tweak: impl FnOnce(&mut roomwire::Config),
) -> (TestGateway, WsClient, async_nats::Client) {
    let gw = TestGateway::start(nats, |c| {
        c.limits.max_pending_messages = 16;
        c.limits.max_pending_bytes = 64 * KIB;
        c.limits.write_timeout = Duration::from_secs(20);
        tweak(c);
    })
    .await;
    let mut client = gw.client_small_rcvbuf(STALLED_RCVBUF).await;
    client.join(room).await;
    let backend = nats.client().await;
    (gw, client, backend)
}

/// Policy `drop_oldest` / `drop_newest`: the stalled client keeps its connection; after it resumes reading it gets
/// messages in order, each hole announced by a `gap` notice with its exact size just before the next message, and
/// the messages it lost plus those it got add up to all that was published.
async fn drop_policy(policy: Overflow) {
    let _serial = serial().await;
    let nats = NatsServer::start().await;
    let room = "feed-1";
    let (gw, mut client, backend) = stalled_in(&nats, room, |c| {
        c.rooms.policy.push(roomwire::config::RoomPolicy {
            pattern: "feed-*".into(),
            overflow: policy,
        });
    })
    .await;
    let pad = "x".repeat(4 * KIB - 20);
    let mut last = (0, 0);
    let published = flood_until(&backend, room, &pad, Some(&gw), || {
        stalled_and_dropped(gw.dropped(policy), &mut last, 256)
    })
    .await;
    // Everything published is now queued or dropped; a ping's pong comes after all that is queued.
    client.send(json!({"op":"ping","id":77})).await;
    let mut seen = read_until_reply(&mut client, room, 77).await;
    // Losses at the end of the stall are told before the next message: send one more.
    backend
        .publish(format!("rooms.{room}"), payload(published, &pad))
        .await
        .unwrap();
    let tail = loop {
        let s = classify(&client.recv().await, room);
        seen.push(s);
        if s == Seen::Message(published) {
            break seen.len() - 1;
        }
    };
    let (numbers, gap_total) = check_order_and_gaps(&seen, true);
    println!(
        "{policy:?}: published {published} (+1), received {}, gap notices {:?}",
        numbers.len(),
        seen.iter()
            .filter_map(|s| if let Seen::Gap(n) = s { Some(*n) } else { None })
            .collect::<Vec<_>>()
    );
    assert_eq!(
        numbers.len() as u64 + gap_total,
        published + 1,
        "received + announced drops != published"
    );
    assert_eq!(
        gap_total,
        gw.dropped(policy),
        "gap notices disagree with the dropped counter"
    );
    assert!(gap_total >= 256);
    assert_eq!(
        slow_consumers(&gw, SlowConsumer::QueueFull),
        0,
        "the connection must be kept"
    );
    match policy {
        // The newest were kept: the last message of the flood arrived, and nothing was owed after it.
        roomwire::config::Overflow::DropOldest => {
            assert_eq!(
                numbers[numbers.len() - 2],
                published - 1,
                "drop_oldest lost the newest message"
            );
            assert_eq!(seen[tail - 1], Seen::Message(published - 1));
        }
        // The oldest were kept and the newest dropped: the tail message carries the trailing loss.
        _ => assert!(
            matches!(seen[tail - 1], Seen::Gap(_)),
            "drop_newest: the tail should carry a gap notice"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_drop_oldest_reports_gaps_and_keeps_the_newest() {
    drop_policy(Overflow::DropOldest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_drop_newest_reports_gaps_and_keeps_the_oldest() {
    drop_policy(Overflow::DropNewest).await;
}

/// Policy `disconnect` (the default): the stalled client gets, in order, what had been written to its socket before
/// its queue overflowed (the queue itself is discarded), then the close frame 4008 as soon as it reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_disconnect_closes_with_4008() {
    let _serial = serial().await;
    let nats = NatsServer::start().await;
    let (gw, client, backend) = stalled_in(&nats, "chat", |_| {}).await;
    let pad = "x".repeat(4 * KIB - 20);
    let published = flood_until(&backend, "chat", &pad, None, || {
        slow_consumers(&gw, SlowConsumer::QueueFull) >= 1
    })
    .await;
    let (prefix, ended) = drain_slow_consumer(client).await;
    println!("disconnect: published {published}, client got 0..{prefix}, then {ended}");
    assert_eq!(
        ended, "closed 4008",
        "write_timeout is 20 s: the close frame must get through"
    );
    assert!(prefix < published);
    assert_eq!(slow_consumers(&gw, SlowConsumer::QueueFull), 1);
    assert_eq!(slow_consumers(&gw, SlowConsumer::WriteTimeout), 0);
}

/// Policy `latest` for `ticker-*`: after a stall the client gets the newest value, and far fewer messages than were
/// published (the in-between ones were superseded in its queue, not kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_latest_delivers_only_the_newest_after_a_stall() {
    let _serial = serial().await;
    let nats = NatsServer::start().await;
    let room = "ticker-btc";
    let (gw, mut client, backend) = stalled_in(&nats, room, |c| {
        c.rooms.overflow = roomwire::config::Overflow::Disconnect;
        c.rooms.policy.push(roomwire::config::RoomPolicy {
            pattern: "ticker-*".into(),
            overflow: roomwire::config::Overflow::Latest,
        });
    })
    .await;
    let pad = "x".repeat(4 * KIB - 20);
    // Stop once the writer is stuck and thousands were superseded: whatever the socket absorbed before the stall
    // (up to about a thousand such messages) is then well under half of what was published.
    let mut last = (0, 0);
    let published = flood_until(&backend, room, &pad, Some(&gw), || {
        stalled_and_dropped(gw.dropped(Overflow::Latest), &mut last, 2000)
    })
    .await;
    client.send(json!({"op":"ping","id":78})).await;
    let seen = read_until_reply(&mut client, room, 78).await;
    let (numbers, _) = check_order_and_gaps(&seen, false);
    println!("latest: published {published}, received {}", numbers.len());
    assert_eq!(numbers.last(), Some(&(published - 1)), "the newest value must arrive");
    assert!(
        (numbers.len() as u64) * 2 < published,
        "{} of {published} arrived: not conflated",
        numbers.len()
    );
    assert_eq!(numbers.len() as u64 + gw.dropped(Overflow::Latest), published);
    assert_eq!(
        slow_consumers(&gw, SlowConsumer::QueueFull),
        0,
        "latest never disconnects"
    );
}

/// A client that never reads again is handled by the write deadline even when its policy never disconnects
/// (`drop_newest`): once a write has waited `write_timeout`, the connection is dropped and counted as a slow consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_reading_client_is_dropped_after_write_timeout() {
    let _serial = serial().await;
    let nats = NatsServer::start().await;
    let write_timeout = Duration::from_secs(1);
    let (gw, mut client, backend) = stalled_in(&nats, "feed-2", |c| {
        c.rooms.overflow = roomwire::config::Overflow::DropNewest;
        c.limits.write_timeout = write_timeout;
    })
    .await;
    let pad = "x".repeat(4 * KIB - 20);
    let open = gw.gw.metrics().connections_open.get();
    assert_eq!(open, 1);
    let started = Instant::now();
    // The socket fills after a few MiB (well under a second here), then the write deadline runs.
    flood_until(&backend, "feed-2", &pad, None, || {
        gw.gw.metrics().connections_open.get() == 0
    })
    .await;
    let elapsed = started.elapsed();
    println!("never reading: dropped {elapsed:?} after the flood began (write_timeout {write_timeout:?})");
    assert!(elapsed < write_timeout * 4, "dropped only after {elapsed:?}");
    assert_eq!(slow_consumers(&gw, SlowConsumer::WriteTimeout), 1);
    assert_eq!(slow_consumers(&gw, SlowConsumer::QueueFull), 0);
    // What was written before the stall is still in order with exact gap notices, then the connection ends.
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, client.ws.next())
            .await
            .expect("end of stream in time")
        {
            Some(Ok(Message::Text(t))) => seen.push(classify(&serde_json::from_str(&t).unwrap(), "feed-2")),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    // A gap notice may be the last thing written, its message cut off by the drop.
    if let Some(Seen::Gap(_)) = seen.last() {
        seen.pop();
    }
    let (numbers, _) = check_order_and_gaps(&seen, true);
    assert!(!numbers.is_empty(), "the client got nothing before the stall");
}

/// How NATS goes away in [`nats_outage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outage {
    /// SIGSTOP: the TCP connection stays up, nothing is read; publishes time out.
    Paused,
    /// Killed: the gateway sees the disconnect and refuses publishes at once.
    Stopped,
}

/// NATS goes away while a client floods publishes: every reply is `unavailable` and comes in time, the gateway
/// stops reading from the flooder instead of buffering (memory stays bounded), other clients are still served, and
/// delivery resumes when NATS is back.
async fn nats_outage(outage: Outage) {
    use std::sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    };
    let _serial = serial().await;
    const SIZE: usize = 4 * KIB;
    const FLOOD: u64 = 16_384;
    const INFLIGHT: usize = 4;
    let publish_timeout = Duration::from_secs(1);
    let mut nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.nats.publish_timeout = publish_timeout;
        c.nats.client_capacity = 256;
        c.limits.max_inflight_publishes = INFLIGHT;
        c.limits.messages_per_second = 1_000_000;
        c.limits.messages_burst = 1_000_000;
        c.limits.bytes_per_second = u32::MAX;
        c.limits.bytes_burst = u32::MAX;
    })
    .await;
    let cfg = &gw.gw.config();
    let mut b = gw.client().await;
    let mut c = gw.client().await;
    b.join("lobby").await;
    c.join("lobby").await;
    let mut flooder = gw.client().await;
    flooder.join("uplink").await;
    b.publish("lobby", json!({"before":1})).await;
    assert_eq!(c.recv_op("message").await["data"], json!({"before":1}));

    match outage {
        Outage::Paused => nats.pause(),
        Outage::Stopped => {
            nats.stop();
            gw.wait_ready(false).await;
        }
    }
    trim_heap();
    let (rss_before, _) = rss();
    reset_peak_rss();
    let sent_at = Arc::new(Mutex::new(Vec::<Instant>::with_capacity(FLOOD as usize)));
    let sent_bytes = Arc::new(AtomicU64::new(0));
    let (mut sink, mut stream) = flooder.ws.split();
    let flood = {
        let (sent_at, sent_bytes) = (sent_at.clone(), sent_bytes.clone());
        let pad = "x".repeat(SIZE - 20);
        tokio::spawn(async move {
            for id in 0..FLOOD {
                let frame = format!(r#"{{"op":"publish","id":{id},"room":"uplink","data":{{"n":{id},"p":"{pad}"}}}}"#);
                let len = frame.len() as u64;
                sent_at.lock().unwrap().push(Instant::now());
                if sink.send(Message::Text(frame.into())).await.is_err() {
                    break;
                }
                sent_bytes.fetch_add(len, Ordering::Relaxed);
            }
        })
    };
    // Paused: publishes wait for NATS (at most INFLIGHT at once, each for publish_timeout), so a few seconds give a
    // handful of replies. Stopped: every publish is refused at once, so the whole flood is answered.
    let want = match outage {
        Outage::Paused => 3 * INFLIGHT as u64,
        Outage::Stopped => FLOOD,
    };
    let started = Instant::now();
    let (mut worst, mut max_silence, mut last_reply) = (Duration::ZERO, Duration::ZERO, started);
    let (mut unavailable, mut acked, mut pings) = (0u64, 0u64, 0u64);
    while unavailable < want {
        let frame = tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("publish reply in time");
        let v: Value = match frame {
            Some(Ok(Message::Text(t))) => serde_json::from_str(&t).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        };
        let id = v["id"].as_u64().expect("reply id");
        let latency = sent_at.lock().unwrap()[id as usize].elapsed();
        max_silence = max_silence.max(last_reply.elapsed());
        last_reply = Instant::now();
        if v["op"] == "ack" {
            // Core NATS "accepted" means written to the socket toward NATS: a paused server's socket buffers take a
            // few MiB before the first timeout. Once publishes time out, none may be acked while NATS is away.
            assert!(
                outage == Outage::Paused && unavailable == 0,
                "ack while NATS is away: {v}"
            );
            acked += 1;
            continue;
        }
        assert_eq!(v["op"], "error", "{v}");
        assert_eq!(v["code"], "unavailable", "{v}");
        worst = worst.max(latency);
        unavailable += 1;
        // While NATS is away, the others are still served: the gateway itself is not stuck.
        if unavailable % 1024 == 1 {
            pings += 1;
            let r = c.request(json!({"op":"ping"}), 1000 + unavailable).await;
            assert_eq!(r["op"], "pong");
        }
    }
    let answered_in = started.elapsed();
    let (rss_now, peak) = rss();
    let sent = sent_bytes.load(Ordering::Relaxed);
    let growth = peak.saturating_sub(rss_before);
    // What the bounds allow: the flooder's in-flight publishes and its queued replies, the NATS client's command
    // buffer full of them, the read and write buffers of tungstenite, and 16 MiB for the allocator, TLS and the test.
    let l = &cfg.limits;
    let allowed = (l.max_inflight_publishes * l.max_message_size
        + cfg.nats.client_capacity * SIZE
        + l.max_pending_bytes
        + l.max_write_buffer_size
        + l.read_buffer_size) as u64
        + 16 * MIB;
    println!(
        "{outage:?}: {acked} acked, then {want} unavailable in {answered_in:?}; longest wait for a reply \
         {max_silence:?}, worst latency {worst:?}; flooder sent {:.1} MiB of {} MiB; RSS before {} MiB, peak +{:.1} \
         MiB, now {} MiB; allowed growth {} MiB; {pings} pings answered meanwhile",
        sent as f64 / MIB as f64,
        FLOOD * SIZE as u64 / MIB,
        rss_before / MIB,
        growth as f64 / MIB as f64,
        rss_now / MIB,
        allowed / MIB
    );
    assert!(
        FLOOD * SIZE as u64 >= 2 * allowed,
        "flood too small to tell bounded from unbounded"
    );
    assert!(
        growth < allowed,
        "RSS grew {growth} bytes, over the {allowed} the bounds allow"
    );
    match outage {
        Outage::Paused => {
            // With publishes in flight, one times out every publish_timeout at the latest: nothing hangs.
            let bound = publish_timeout + Duration::from_millis(500);
            assert!(
                max_silence < bound,
                "no reply for {max_silence:?} while publishes were pending"
            );
            // The gateway stopped reading from the flooder: most of the flood is still with the client.
            assert!(
                sent < FLOOD * SIZE as u64 / 4,
                "the gateway kept reading {sent} bytes while NATS was paused"
            );
            assert!(gw.gw.metrics().publish_failures.get(Failure::Timeout) >= want);
        }
        Outage::Stopped => {
            // Refused at once, not after the timeout.
            assert!(max_silence < publish_timeout / 2, "no reply for {max_silence:?}");
            assert_eq!(gw.gw.metrics().publish_failures.get(Failure::Disconnected), FLOOD);
        }
    }
    flood.abort();
    drop(stream);

    // NATS comes back: delivery between other clients continues.
    match outage {
        Outage::Paused => nats.resume(),
        Outage::Stopped => nats.restart().await,
    }
    gw.wait_ready(true).await;
    b.publish("lobby", json!({"after":1})).await;
    assert_eq!(c.recv_op("message").await["data"], json!({"after":1}));
    let backend = nats.client().await;
    backend.publish("rooms.lobby", r#"{"after":2}"#.into()).await.unwrap();
    backend.flush().await.unwrap();
    assert_eq!(b.recv_op("message").await["data"], json!({"after":2}));
    assert_eq!(c.recv_op("message").await["data"], json!({"after":2}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_paused_publishes_time_out_unavailable_and_memory_stays_bounded() {
    nats_outage(Outage::Paused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_stopped_publishes_refused_unavailable_and_memory_stays_bounded() {
    nats_outage(Outage::Stopped).await;
}
