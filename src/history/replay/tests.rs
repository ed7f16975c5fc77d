//! The [`Replayer`](super::Replayer)'s tests, against a real `nats-server` with JetStream (a memory stream over
//! `rooms.*`): exact ranges, last N and last sequence, truncation instead of a silent gap, deadlines, shared reads
//! and the cache, and the leader path (a responder short of `up_to`, a stream without `allow_direct`). In a file of
//! their own so that `replay.rs` reads as the policy alone; the property tests of the pure logic stay beside it
//! (`segment`, `cache`).

use async_nats::HeaderMap;
use bytes::Bytes;

use super::*;
use crate::test_support::Nats;

const WAIT: Duration = Duration::from_secs(10);

fn soon() -> Instant {
    Instant::now() + WAIT
}

/// A memory stream over `rooms.*`; `extra` is merged into its config.
async fn stream(client: &async_nats::Client, name: &str, extra: serde_json::Value) {
    let mut cfg = serde_json::json!({"name": name, "subjects": ["rooms.*"], "storage": "memory"});
    for (k, v) in extra.as_object().expect("object") {
        cfg[k] = v.clone();
    }
    let reply = client
        .request(format!("$JS.API.STREAM.CREATE.{name}"), cfg.to_string().into())
        .await
        .expect("stream create");
    let v: serde_json::Value = serde_json::from_slice(&reply.payload).expect("json");
    assert!(v.get("error").is_none(), "stream create: {v}");
}

/// Publishes (with a header, as the gateway does) and returns the stored seq from the PubAck.
async fn publish(client: &async_nats::Client, subject: &str, payload: String) -> u64 {
    let mut h = HeaderMap::new();
    h.insert("Roomwire-From", "u1");
    let reply = client
        .request_with_headers(subject.to_string(), h, payload.into())
        .await
        .expect("publish");
    let v: serde_json::Value = serde_json::from_slice(&reply.payload).expect("ack json");
    v["seq"].as_u64().unwrap_or_else(|| panic!("ack without seq: {v}"))
}

async fn setup(extra: serde_json::Value) -> (Nats, async_nats::Client) {
    let nats = Nats::start_js().await;
    let client = async_nats::connect(nats.url()).await.expect("connect");
    stream(&client, "HIST", extra).await;
    (nats, client)
}

fn seqs(m: &[Stored]) -> Vec<u64> {
    m.iter().map(|m| m.seq).collect()
}

/// Publishes `n` messages alternating rooms a and b; returns the seqs of room a and of room b.
async fn fill(client: &async_nats::Client, n: usize) -> (Vec<u64>, Vec<u64>) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..n {
        a.push(publish(client, "rooms.a", format!("a{i}")).await);
        if i % 3 == 0 {
            b.push(publish(client, "rooms.b", format!("b{i}")).await);
        }
    }
    (a, b)
}

#[tokio::test]
async fn range_last_and_last_seq_are_exact() {
    let (_nats, client) = setup(serde_json::json!({"allow_direct": true})).await;
    let (a, b) = fill(&client, 60).await;
    let r = Replayer::new(client.clone(), "HIST".into(), &ReplayConfig::default());
    let last = r.last_seq("rooms.a", soon()).await.expect("last_seq");
    assert_eq!(last, *a.last().unwrap());
    assert_eq!(r.last_seq("rooms.none", soon()).await.expect("last_seq"), 0);

    // Missed the last 50 of room a: exactly those, in order, payloads and original headers kept.
    let got = r.range("rooms.a", a[9], last, 1000, soon()).await.expect("range");
    assert_eq!(seqs(&got), a[10..].to_vec());
    assert_eq!(got[0].payload, Bytes::from("a10"));
    let h = got[0].headers.as_ref().expect("headers");
    assert_eq!(h.get("Roomwire-From").map(|v| v.as_str()), Some("u1"));
    assert!(h.get("Nats-Sequence").is_none(), "direct get headers stripped");
    // From an empty room.
    let all = r.range("rooms.a", 0, last, 1000, soon()).await.expect("range from 0");
    assert_eq!(seqs(&all), a);
    // More than max missing.
    assert!(matches!(
        r.range("rooms.a", a[9], last, 49, soon()).await,
        Err(ReplayError::TooMany)
    ));
    // Nothing missed.
    assert!(
        r.range("rooms.a", last, last, 10, soon())
            .await
            .expect("empty")
            .is_empty()
    );

    // The history op.
    assert_eq!(
        seqs(&r.last("rooms.a", 7, soon()).await.expect("last")),
        a[53..].to_vec()
    );
    assert_eq!(seqs(&r.last("rooms.b", 100, soon()).await.expect("last b")), b);
    assert!(r.last("rooms.none", 5, soon()).await.expect("last none").is_empty());
    assert!(matches!(
        r.range("rooms.*", 0, last, 10, soon()).await,
        Err(ReplayError::Unavailable(_))
    ));
}

#[tokio::test]
async fn last_of_a_long_room_probes_instead_of_reading_it_all() {
    let (_nats, client) = setup(serde_json::json!({"allow_direct": true})).await;
    let (a, _) = fill(&client, 600).await;
    let r = Replayer::new(client.clone(), "HIST".into(), &ReplayConfig::default());
    let got = r.last("rooms.a", 20, soon()).await.expect("last");
    assert_eq!(seqs(&got), a[580..].to_vec());
    // First probe, last_seq, at most LAST_PROBES probes, and a read of one batch (not the 600 messages).
    let used = r.requests();
    assert!(used <= 2 + LAST_PROBES as u64 + 1, "requests {used}");
}

#[tokio::test]
async fn removed_history_is_truncated_never_a_silent_gap() {
    let (_nats, client) = setup(serde_json::json!({"allow_direct": true, "max_msgs_per_subject": 5})).await;
    let (a, b) = fill(&client, 10).await;
    let cfg = ReplayConfig {
        max_messages_per_room: 5,
        ..ReplayConfig::default()
    };
    let r = Replayer::new(client.clone(), "HIST".into(), &cfg);
    let last = r.last_seq("rooms.a", soon()).await.expect("last_seq");
    // a[0..5] were removed by the per-room limit: after a[1] messages are missing.
    assert!(matches!(
        r.range("rooms.a", a[1], last, 100, soon()).await,
        Err(ReplayError::Truncated)
    ));
    // a[5] is still stored: what follows it is whole.
    assert_eq!(
        seqs(&r.range("rooms.a", a[5], last, 100, soon()).await.expect("whole")),
        a[6..].to_vec()
    );
    // `after` is a message of another room: no witness.
    let foreign = *b.iter().find(|s| **s > a[5]).unwrap();
    assert!(matches!(
        r.range("rooms.a", foreign, last, 100, soon()).await,
        Err(ReplayError::Truncated)
    ));
    // From an empty room with the room at its limit: older messages may be gone.
    assert!(matches!(
        r.range("rooms.a", 0, last, 100, soon()).await,
        Err(ReplayError::Truncated)
    ));
}

#[tokio::test]
async fn a_paused_server_times_out_at_the_deadline() {
    let (nats, client) = setup(serde_json::json!({"allow_direct": true})).await;
    let (a, _) = fill(&client, 5).await;
    let r = Replayer::new(client.clone(), "HIST".into(), &ReplayConfig::default());
    nats.pause();
    let start = Instant::now();
    let deadline = start + Duration::from_millis(300);
    let got = r.range("rooms.a", a[0], a[4], 100, deadline).await;
    let lseq = r.last_seq("rooms.a", deadline).await;
    let last = r.last("rooms.a", 3, deadline).await;
    nats.resume();
    assert!(matches!(got, Err(ReplayError::Timeout)), "{got:?}");
    assert!(matches!(lseq, Err(ReplayError::Timeout)), "{lseq:?}");
    assert!(matches!(last, Err(ReplayError::Timeout)), "{last:?}");
    assert!(start.elapsed() < Duration::from_secs(2), "waited {:?}", start.elapsed());
    // Nothing was left in flight.
    assert!(r.inner.state.lock().inflight.is_empty());
}

#[tokio::test]
async fn concurrent_and_recent_recoveries_share_one_read() {
    let (_nats, client) = setup(serde_json::json!({"allow_direct": true})).await;
    let (a, _) = fill(&client, 120).await;
    let r = Arc::new(Replayer::new(client.clone(), "HIST".into(), &ReplayConfig::default()));
    let last = *a.last().unwrap();
    let calls = (0..50).map(|i| {
        let r = r.clone();
        // Different starts inside the same missed range.
        let after = a[19 + i % 3];
        async move { r.range("rooms.a", after, last, 1000, soon()).await }
    });
    let results = futures_util::future::join_all(calls).await;
    for (i, res) in results.iter().enumerate() {
        let want = a[20 + i % 3..].to_vec();
        assert_eq!(seqs(res.as_ref().expect("range")), want);
    }
    // Callers that joined later than the first read's start may have started one more read of their own
    // (a wider range); never one per caller.
    let first = r.requests();
    assert!(first <= 3, "requests for 50 concurrent recoveries: {first}");
    // A recent range is served from the cache.
    let again = r.range("rooms.a", a[30], last, 1000, soon()).await.expect("cached");
    assert_eq!(seqs(&again), a[31..].to_vec());
    assert_eq!(r.requests(), first);
    // Newer messages: only the newer part is read (one request), and the whole answer is exact.
    let more: Vec<u64> = {
        let mut v = Vec::new();
        for i in 0..5 {
            v.push(publish(&client, "rooms.a", format!("m{i}")).await);
        }
        v
    };
    let ext = r
        .range("rooms.a", a[19], *more.last().unwrap(), 1000, soon())
        .await
        .expect("extended");
    let mut want = a[20..].to_vec();
    want.extend(&more);
    assert_eq!(seqs(&ext), want);
    assert_eq!(r.requests(), first + 1);
}

#[tokio::test]
async fn a_responder_short_of_up_to_is_completed_from_the_leader() {
    // A single server cannot lag, but a range whose up_to is beyond what the direct get answers takes the same
    // path: the batch ends (pending 0) before up_to, and the leader is asked for the rest.
    let (_nats, client) = setup(serde_json::json!({"allow_direct": true})).await;
    let (a, _) = fill(&client, 10).await;
    let r = Replayer::new(client.clone(), "HIST".into(), &ReplayConfig::default());
    let got = r.range("rooms.a", a[4], a[9] + 50, 100, soon()).await.expect("range");
    assert_eq!(seqs(&got), a[5..].to_vec());
    assert_eq!(r.requests(), 2, "one batch, one leader get");
}

#[tokio::test]
async fn without_allow_direct_reads_go_to_the_leader() {
    let (_nats, client) = setup(serde_json::json!({"allow_direct": false})).await;
    let (a, b) = fill(&client, 12).await;
    let r = Replayer::new(client.clone(), "HIST".into(), &ReplayConfig::default());
    let last = r.last_seq("rooms.a", soon()).await.expect("last_seq");
    assert_eq!(last, a[11]);
    let got = r.range("rooms.a", a[2], last, 100, soon()).await.expect("range");
    assert_eq!(seqs(&got), a[3..].to_vec());
    assert_eq!(got[0].payload, Bytes::from("a3"));
    let h = got[0].headers.as_ref().expect("headers");
    assert_eq!(h.get("Roomwire-From").map(|v| v.as_str()), Some("u1"));
    assert!(matches!(
        r.range("rooms.a", b[1], last, 100, soon()).await,
        Err(ReplayError::Truncated)
    ));
    assert_eq!(
        seqs(&r.last("rooms.a", 4, soon()).await.expect("last")),
        a[8..].to_vec()
    );
}
