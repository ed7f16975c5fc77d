//! Issue 8, finding 8: overflow policies when several rooms share one connection's queue. Each policy only acts on
//! messages of rooms under that policy, and `latest` rooms end with their last value. A real nats-server, the gateway
//! in-process, and one real TLS WebSocket client that stops reading (a small TCP receive buffer, as in
//! `tests/backpressure.rs`).

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use roomwire::config::{Overflow, RoomPolicy};
use serde_json::{Value, json};

/// Receive buffer of the stalled client (the kernel doubles it).
const STALLED_RCVBUF: u32 = 32 * 1024;
/// `limits.max_pending_messages` of the test gateway.
const QUEUE: usize = 16;

/// Payload of message `n`: JSON, `pad.len()` + about 20 bytes.
fn payload(n: u64, pad: &str) -> Bytes {
    Bytes::from(format!(r#"{{"n":{n},"p":"{pad}"}}"#))
}

/// What the client saw of one room: messages by number, gap notices by count.
#[derive(Debug, Default)]
struct RoomLog {
    numbers: Vec<u64>,
    /// (gap count, number of the message it stood before).
    gaps: Vec<(u64, Option<u64>)>,
}

impl RoomLog {
    /// Numbers strictly increase and each gap notice, right before a message, counts exactly the numbers missing
    /// before it. Holes without a notice only where `silent_holes` (superseded `latest` values). Returns the total of
    /// the gap notices.
    fn check(&self, room: &str, silent_holes: bool) -> u64 {
        let mut expected = 0u64;
        let mut gaps = self.gaps.iter().peekable();
        let mut total = 0;
        for &n in &self.numbers {
            assert!(n >= expected, "{room}: message {n} after {}", expected.wrapping_sub(1));
            let missing = n - expected;
            match gaps.next_if(|(_, before)| *before == Some(n)) {
                Some(&(g, _)) => {
                    assert_eq!(g, missing, "{room}: gap notice says {g} before {n}, {missing} missing");
                    total += g;
                }
                None if !silent_holes => assert_eq!(missing, 0, "{room}: {missing} missing before {n}, no notice"),
                None => {}
            }
            expected = n + 1;
        }
        assert!(
            gaps.next().is_none(),
            "{room}: gap notice not followed by a message: {:?}",
            self.gaps
        );
        total
    }
}

/// Publishes `count` numbered messages (from `first`) to `room` and flushes.
async fn publish(backend: &async_nats::Client, room: &str, first: u64, count: u64, pad: &str) {
    for n in first..first + count {
        backend.publish(format!("rooms.{room}"), payload(n, pad)).await.unwrap();
    }
    backend.flush().await.unwrap();
}

/// One connection in a `disconnect` room, a `drop_oldest` room and two `latest` rooms, whose client stops reading.
/// While its writer is stuck: a few chat messages are queued, then a feed flood fills the queue (drop_oldest may
/// evict only feed messages: before the fix it evicted the chat messages and the queued ticker value first), then
/// `ticker-b` publishes into the full queue (before the fix its values were dropped, so the client kept a stale one).
/// Once the client reads: chat complete and without gap notices, feed in order with exact gap notices, and both
/// tickers end with their last value; the counters agree with what the client saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_on_one_connection_act_only_on_their_own_rooms() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.limits.max_pending_messages = QUEUE;
        c.limits.max_pending_bytes = 64 * 1024;
        // A stall then a resume must not be taken for a dead client.
        c.limits.write_timeout = Duration::from_secs(20);
        c.rooms.overflow = Overflow::Disconnect;
        for (pattern, overflow) in [("feed-*", Overflow::DropOldest), ("ticker-*", Overflow::Latest)] {
            c.rooms.policy.push(RoomPolicy {
                pattern: pattern.into(),
                overflow,
            });
        }
    })
    .await;
    let mut client = gw.client_small_rcvbuf(STALLED_RCVBUF).await;
    for room in ["chat", "feed-1", "ticker-a", "ticker-b"] {
        client.join(room).await;
    }
    let backend = nats.client().await;
    let big = "x".repeat(32 * 1024);

    // 1. Stall the writer with ticker-a (latest: it never holds more than one entry of the queue). Values are
    // published one at a time with a short pause, so the writer writes nearly every one and the socket fills (a few
    // MiB). The writer is stuck once a value published after a long pause still finds the previous one queued
    // (conflated), three times in a row: a writer that is merely busy takes a value in well under a millisecond.
    let mut ticker_a = 0u64;
    let mut fanned = gw.gw.metrics().room_messages.get();
    let mut stuck_probes = 0;
    let deadline = Instant::now() + 2 * WAIT;
    while stuck_probes < 3 {
        assert!(
            Instant::now() < deadline,
            "the writer never stalled ({ticker_a} published)"
        );
        let pause = if stuck_probes == 0 { 2 } else { 100 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let before = gw.dropped(Overflow::Latest);
        publish(&backend, "ticker-a", ticker_a, 1, &big).await;
        ticker_a += 1;
        fanned += 1;
        gw.wait_fanned_out(fanned).await;
        stuck_probes = if gw.dropped(Overflow::Latest) > before {
            stuck_probes + 1
        } else {
            0
        };
    }

    // 2. A few chat messages (disconnect): the queue has room for them.
    const CHAT: u64 = 4;
    publish(&backend, "chat", 0, CHAT, "c").await;
    fanned += CHAT;
    gw.wait_fanned_out(fanned).await;

    // 3. A feed flood (drop_oldest) four times the queue: it may evict only its own messages.
    const FEED: u64 = 4 * QUEUE as u64;
    publish(&backend, "feed-1", 0, FEED, &"f".repeat(500)).await;
    fanned += FEED;
    gw.wait_fanned_out(fanned).await;

    // 4. Both tickers publish into the full queue: ticker-a replaces its queued value, ticker-b has none queued.
    const TICKER_B: u64 = 5;
    publish(&backend, "ticker-a", ticker_a, 3, "a").await;
    ticker_a += 3;
    publish(&backend, "ticker-b", 0, TICKER_B, "b").await;
    fanned += 3 + TICKER_B;
    gw.wait_fanned_out(fanned).await;
    assert_eq!(
        gw.gw
            .metrics()
            .slow_consumers
            .get(roomwire::metrics::SlowConsumer::QueueFull),
        0,
        "nobody overflowed a disconnect room"
    );

    // The client reads again; the pong comes after everything that was queued or parked before the ping.
    client.send(json!({"op":"ping","id":5})).await;
    let mut logs: std::collections::HashMap<String, RoomLog> = Default::default();
    loop {
        let v: Value = client.recv().await;
        if v["id"] == json!(5) {
            assert_eq!(v["op"], "pong", "{v}");
            break;
        }
        let room = v["room"]
            .as_str()
            .unwrap_or_else(|| panic!("unexpected frame {v}"))
            .to_string();
        let log = logs.entry(room).or_default();
        match v["op"].as_str() {
            Some("message") => log.numbers.push(v["data"]["n"].as_u64().expect("numbered")),
            Some("gap") => log.gaps.push((v["dropped"].as_u64().expect("count"), None)),
            _ => panic!("unexpected frame {v}"),
        }
        // A gap notice stands before the next message: note which.
        if let Some(&n) = log.numbers.last()
            && let Some(g) = log.gaps.last_mut()
            && g.1.is_none()
            && v["op"] == "message"
        {
            g.1 = Some(n);
        }
    }
    for (room, log) in &logs {
        println!(
            "{room}: {} received, last {:?}, gap notices {:?}",
            log.numbers.len(),
            log.numbers.last(),
            log.gaps
        );
    }
    println!("ticker-a published {ticker_a}");
    let log = |room: &str| logs.get(room).unwrap_or_else(|| panic!("nothing of {room} arrived"));

    // The disconnect room lost nothing and got no gap notice.
    assert_eq!(
        log("chat").numbers,
        (0..CHAT).collect::<Vec<_>>(),
        "chat messages evicted"
    );
    assert!(
        log("chat").gaps.is_empty(),
        "gap notice for the chat room: {:?}",
        log("chat").gaps
    );
    log("chat").check("chat", false);

    // The drop_oldest room: in order, exact notices, the newest kept, and the counter agrees.
    let feed_gaps = log("feed-1").check("feed-1", false);
    assert_eq!(
        log("feed-1").numbers.last(),
        Some(&(FEED - 1)),
        "drop_oldest lost the newest"
    );
    assert_eq!(log("feed-1").numbers.len() as u64 + feed_gaps, FEED);
    assert!(feed_gaps > 0, "the feed never overflowed");
    assert_eq!(
        feed_gaps,
        gw.dropped(Overflow::DropOldest),
        "gap notices disagree with the dropped counter"
    );

    // Both latest rooms end with their last value; every value is delivered or counted as superseded.
    log("ticker-a").check("ticker-a", true);
    log("ticker-b").check("ticker-b", true);
    assert_eq!(
        log("ticker-a").numbers.last(),
        Some(&(ticker_a - 1)),
        "ticker-a ended on a stale value"
    );
    assert_eq!(
        log("ticker-b").numbers.last(),
        Some(&(TICKER_B - 1)),
        "ticker-b ended on a stale value"
    );
    assert_eq!(
        log("ticker-a").numbers.len() as u64 + log("ticker-b").numbers.len() as u64 + gw.dropped(Overflow::Latest),
        ticker_a + TICKER_B,
        "latest: received + superseded != published"
    );
    assert_eq!(gw.dropped(Overflow::DropNewest), 0);
}
