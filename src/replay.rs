//! Reading stored room messages back from the history stream: the missed range of a recovering join
//! ([`Replayer::range`]), the last N of the `history` op ([`Replayer::last`]) and a room's last sequence
//! ([`Replayer::last_seq`]).
//!
//! Reads are JetStream *direct gets* (`$JS.API.DIRECT.GET.<stream>`, ADR-31), never per-client consumers: a direct get
//! is answered by any replica from its local store, without the meta group or the JetStream API queue, and one batched
//! request (`{"seq":S,"next_by_subj":subj,"batch":N,"max_bytes":B}`) returns up to N messages of the subject followed by
//! an end-of-batch status message (`204 EOB`, headers `Nats-Num-Pending` and `Nats-Last-Sequence`). Each batch uses
//! its own inbox subscription, and every wait is bounded by the caller's absolute deadline.
//!
//! A replica may lag: it answers from a store that does not hold `up_to` yet. That shows as a batch that ends
//! (`Nats-Num-Pending: 0`, or 404) before `up_to`; the rest is then read from the stream leader with
//! `$JS.API.STREAM.MSG.GET.<stream>` (read-after-write coherent, one message per request), so a lagging replica never
//! produces a silent gap. The same leader path serves a stream without `allow_direct` (no responders to the direct
//! get): it is correct but costs one JetStream API request per message, so the gateway's own stream always has
//! `allow_direct`.
//!
//! Truncation is decided conservatively from a *witness*: a range read of `(after, up_to]` starts at `after` itself,
//! and the history after `after` is whole only if message `after` is still stored under the same subject. Limits
//! (`max_msgs_per_subject`, `max_age`) remove a subject's messages oldest first, so while `after` is stored nothing
//! newer of that subject was removed. If `after` is gone, or is a message of another subject, the answer is
//! [`ReplayError::Truncated`]. `after == 0` (the room was empty when the client last knew it) has no witness: it is
//! trusted unless the room holds `max_messages_per_room` messages up to `up_to` (then the per-room limit may have
//! removed some). A room that was empty, then filled and aged out entirely past `max_age`, cannot be told apart.
//!
//! Many clients recovering the same room at once share reads: per subject one read is in flight (single flight, a
//! `Shared` future every caller whose range it covers awaits), and its result stays in a small cache for `cache_ttl`,
//! so later callers take a slice, or extend the cached range by reading only what is newer. Both maps are bounded
//! (`max_inflight` reads, `cache_entries` rooms, `cache_bytes` bytes); an in-flight entry is removed when its read
//! ends or when every caller waiting on it has given up (a guard in the read future), never left behind.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_nats::{HeaderMap, StatusCode};
use base64::Engine;
use bytes::Bytes;
use futures_util::{
    FutureExt, StreamExt,
    future::{BoxFuture, Shared, WeakShared},
};
use parking_lot::Mutex;
use serde::Deserialize;
use tokio::{sync::Semaphore, time::Instant};

/// One stored room message, as read from the stream.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The stream sequence.
    pub seq: u64,
    /// The message payload.
    pub payload: Bytes,
    /// The original message's headers (the gateway's from/echo headers), without the `Nats-*` headers a direct get
    /// adds (`Nats-Stream`, `Nats-Subject`, `Nats-Sequence`, `Nats-Time-Stamp`, `Nats-Num-Pending`,
    /// `Nats-Last-Sequence`). `None` when the message had none.
    pub headers: Option<HeaderMap>,
}

/// Why a read could not be answered. `Clone` because one shared read answers many callers.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReplayError {
    /// Messages after `after` were already removed by the stream's limits.
    #[error("history truncated")]
    Truncated,
    /// More than `max` messages are missing.
    #[error("too many missed messages")]
    TooMany,
    /// JetStream did not answer before the deadline.
    #[error("jetstream timed out")]
    Timeout,
    /// JetStream unavailable or another failure (text is for logs, never for clients).
    #[error("jetstream unavailable: {0}")]
    Unavailable(String),
}

/// The replayer's bounds. The lead maps them from `[history]` at merge; each field names its key and default.
#[derive(Debug, Clone)]
pub struct ReplayConfig {
    /// Bytes of cached messages (payload + headers) over all rooms (`history.replay_cache_bytes`, default 8 MiB).
    /// A range bigger than this is served but not cached.
    pub cache_bytes: usize,
    /// Rooms in the cache at once (`history.replay_cache_rooms`, default 1024); the oldest entry goes first.
    pub cache_entries: usize,
    /// How long a cached range is reused (`history.replay_cache_ttl`, default "5s"). Reusing a range read a few
    /// seconds ago is exact: it holds every message of the range as stored at read time.
    pub cache_ttl: Duration,
    /// JetStream reads in flight at once, over all rooms (`history.replay_max_inflight`, default 64); also the bound
    /// of the in-flight map. A read waits (until its deadline) for a slot.
    pub max_inflight: usize,
    /// The most messages one range read collects before answering TooMany (`history.max_recover`, default 1000).
    /// A caller's own `max` above this still gets TooMany past `max_read`.
    pub max_read: usize,
    /// The stream's `max_msgs_per_subject` (`history.max_messages_per_room`, default 1000; 0 = unlimited): a read
    /// with `after == 0` that finds this many messages may have lost older ones, so it answers Truncated.
    pub max_messages_per_room: u64,
    /// Messages per direct-get batch request (`history.replay_batch`, default 256). Must stay below the NATS
    /// client's `subscription_capacity`, or a batch overflows the inbox subscription.
    pub batch: usize,
    /// `max_bytes` of one batch reply (`history.replay_batch_bytes`, default 1 MiB): the server ends the batch once
    /// it has sent this much (the reply is held in memory).
    pub batch_bytes: usize,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig {
            cache_bytes: 8 << 20,
            cache_entries: 1024,
            cache_ttl: Duration::from_secs(5),
            max_inflight: 64,
            max_read: 1000,
            max_messages_per_room: 1000,
            batch: 256,
            batch_bytes: 1 << 20,
        }
    }
}

/// After the direct get answered "no responders" (stream without `allow_direct`), reads go to the leader for this
/// long before trying direct gets again (the stream may have been edited).
const NO_DIRECT_RETRY: Duration = Duration::from_secs(10);

/// Probes `last` makes to find where the last N of a room start, before reading from the best bound found.
const LAST_PROBES: usize = 8;

/// The headers a direct get adds to a stored message (stripped from [`Stored::headers`]).
const DIRECT_HEADERS: [&str; 6] = [
    "Nats-Stream",
    "Nats-Subject",
    "Nats-Sequence",
    "Nats-Time-Stamp",
    "Nats-Num-Pending",
    "Nats-Last-Sequence",
];

/// Reads stored room messages by direct get, with single flight and a small bounded cache per subject.
pub struct Replayer {
    /// Shared with the read futures, which must be `'static` to be shared between callers.
    inner: Arc<Inner>,
}

/// The connection, bounds, counters and maps a read needs.
struct Inner {
    client: async_nats::Client,
    stream: String,
    cfg: ReplayConfig,
    /// `$JS.API.DIRECT.GET.<stream>`.
    direct_subject: String,
    /// `$JS.API.STREAM.MSG.GET.<stream>`.
    leader_subject: String,
    /// JetStream API requests made (direct gets, leader gets).
    requests: AtomicU64,
    /// Concurrent JetStream reads (`max_inflight` permits); a read waits for one until its deadline.
    reads: Semaphore,
    /// Until when reads skip the direct get (set on "no responders").
    no_direct_until: Mutex<Option<Instant>>,
    /// Cache and in-flight reads; the lock is never held across an await.
    state: Arc<Mutex<State>>,
    /// Ids of in-flight reads, so a finished read removes its own map entry and not a newer one.
    next_flight: AtomicU64,
}

/// A read's shared outcome: the segment it produced.
type FlightFuture = Shared<BoxFuture<'static, Result<Arc<Segment>, ReplayError>>>;

/// One in-flight read of a subject: the segment it will produce covers `(lo, hi]`.
struct Flight {
    id: u64,
    lo: u64,
    hi: u64,
    fut: WeakShared<BoxFuture<'static, Result<Arc<Segment>, ReplayError>>>,
}

/// Cached segments and in-flight reads, per subject.
#[derive(Default)]
struct State {
    cache: Cache,
    /// At most `max_inflight` entries; an entry whose waiters all gave up is removed by the read's drop guard.
    inflight: HashMap<String, Flight>,
}

impl Replayer {
    /// A replayer reading stream `stream` over `client`.
    pub fn new(client: async_nats::Client, stream: String, cfg: &ReplayConfig) -> Self {
        let cfg = ReplayConfig {
            max_inflight: cfg.max_inflight.max(1),
            batch: cfg.batch.max(1),
            batch_bytes: cfg.batch_bytes.max(1),
            ..cfg.clone()
        };
        let inner = Inner {
            direct_subject: format!("$JS.API.DIRECT.GET.{stream}"),
            leader_subject: format!("$JS.API.STREAM.MSG.GET.{stream}"),
            reads: Semaphore::new(cfg.max_inflight),
            client,
            stream,
            state: Arc::new(Mutex::new(State {
                cache: Cache::new(cfg.cache_bytes, cfg.cache_entries, cfg.cache_ttl),
                inflight: HashMap::new(),
            })),
            cfg,
            requests: AtomicU64::new(0),
            no_direct_until: Mutex::new(None),
            next_flight: AtomicU64::new(0),
        };
        Replayer { inner: Arc::new(inner) }
    }

    /// The stream this replayer reads.
    pub fn stream(&self) -> &str {
        &self.inner.stream
    }

    /// JetStream API requests made so far (benchmark: requests per recovering client); also exported as a metric.
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// The seq of the last stored message of `subject` (0 when none) - used for the join ack's "seq".
    ///
    /// Answered by any replica (a direct get), so a lagging replica may answer an older seq: the caller detects that
    /// from the live messages it holds (their `Nats-Last-Sequence` above the answer) and reads the difference with
    /// [`Replayer::range`]. Not coalesced: a shared answer could predate the caller's registration as a member.
    pub async fn last_seq(&self, subject: &str, deadline: Instant) -> Result<u64, ReplayError> {
        self.inner.last_seq(subject, deadline).await
    }

    /// Every stored message of `subject` with after < seq <= up_to, oldest first, or an error
    /// (Truncated / TooMany when more than `max` / Timeout). Concurrent and recent reads of the same subject share
    /// one JetStream read (single flight + small bounded cache): "the gateway reads each missed range once".
    pub async fn range(
        &self,
        subject: &str,
        after: u64,
        up_to: u64,
        max: usize,
        deadline: Instant,
    ) -> Result<Arc<[Stored]>, ReplayError> {
        self.inner.range(subject, after, up_to, max, deadline).await
    }

    /// The last `n` stored messages of `subject`, oldest first (the `history` op).
    ///
    /// Direct gets cannot read backwards, but every message of a batch carries `Nats-Num-Pending` (how many messages
    /// of the subject follow it). A one-message batch from the start gives the room's first seq and count C; when
    /// C > n, at most [`LAST_PROBES`] more one-message probes (interpolating between the room's first and last seq)
    /// look for a start with at least n messages after it, then one batched read from the best start found keeps the
    /// last n. The read is bounded by the room's count, itself bounded by `max_messages_per_room`. Not cached: the
    /// last n change with every publish.
    pub async fn last(&self, subject: &str, n: usize, deadline: Instant) -> Result<Arc<[Stored]>, ReplayError> {
        self.inner.last(subject, n, deadline).await
    }
}

impl Inner {
    /// The seq of the last stored message of `subject` (0 when none) - used for the join ack's "seq".
    ///
    /// Answered by any replica (a direct get), so a lagging replica may answer an older seq: the caller detects that
    /// from the live messages it holds (their `Nats-Last-Sequence` above the answer) and reads the difference with
    /// [`Replayer::range`]. Not coalesced: a shared answer could predate the caller's registration as a member.
    pub async fn last_seq(&self, subject: &str, deadline: Instant) -> Result<u64, ReplayError> {
        check_subject(subject)?;
        let body = serde_json::json!({ "last_by_subj": subject }).to_string();
        if self.direct_allowed() {
            match self.direct_one(body.clone(), deadline).await? {
                One::Found(m) => return Ok(m.seq),
                One::NotFound => return Ok(0),
                One::NoResponders => self.mark_no_direct(),
            }
        }
        Ok(self.leader_get(body, deadline).await?.map_or(0, |m| m.seq))
    }

    async fn range(
        self: &Arc<Self>,
        subject: &str,
        after: u64,
        up_to: u64,
        max: usize,
        deadline: Instant,
    ) -> Result<Arc<[Stored]>, ReplayError> {
        check_subject(subject)?;
        if up_to <= after {
            // Nothing missed (or `after` is ahead of a lagging replica's answer): nothing to read.
            return Ok(Arc::from(Vec::new()));
        }
        // A shared read that timed out on its creator's (earlier) deadline is retried once on ours.
        for _ in 0..2 {
            let flight = self.flight_for(subject, after, up_to, deadline);
            let seg = match flight {
                Ok(seg) => seg,
                Err((fut, wider)) => match tokio::time::timeout_at(deadline, fut).await {
                    Err(_) => return Err(ReplayError::Timeout),
                    Ok(Err(ReplayError::Timeout)) if Instant::now() < deadline => continue,
                    // A shared read of a wider range can overflow `max_read` while ours would not: read ours (callers
                    // of the same range share the TooMany instead).
                    Ok(Err(ReplayError::TooMany)) if wider => {
                        self.read_uncoalesced(subject, after, up_to, deadline).await?
                    }
                    Ok(r) => r?,
                },
            };
            return match seg.slice(after, up_to) {
                Some(Ok(msgs)) if msgs.len() > max => Err(ReplayError::TooMany),
                Some(r) => r,
                // The flight covered our range when we joined it; a segment that does not is a bug, not a gap.
                None => Err(ReplayError::Unavailable("shared read did not cover the range".into())),
            };
        }
        Err(ReplayError::Timeout)
    }

    async fn last(&self, subject: &str, n: usize, deadline: Instant) -> Result<Arc<[Stored]>, ReplayError> {
        check_subject(subject)?;
        if n == 0 {
            return Ok(Arc::from(Vec::new()));
        }
        let _permit = self.permit(deadline).await?;
        // First message of the room and how many the room holds.
        let Some((first, count)) = self.probe(subject, 0, deadline).await? else {
            return Ok(Arc::from(Vec::new()));
        };
        let n64 = n as u64;
        let (mut lo, mut lo_count) = (first, count);
        // `u64::MAX`: no count (leader path), so no probing: the walk from the first message is bounded below.
        if count > n64 && count != u64::MAX {
            let last = self.last_seq(subject, deadline).await?.max(first);
            let mut hi = last + 1; // count(>= hi) < n
            for _ in 0..LAST_PROBES {
                if lo_count - n64 <= (n64 / 4).max(8) || hi <= lo + 1 {
                    break;
                }
                // Interpolate assuming the room's messages are spread evenly over (lo, hi).
                let skip = lo_count - n64;
                let span = hi - lo;
                let guess = lo + ((span as u128 * skip as u128 / lo_count as u128) as u64).clamp(1, span - 1);
                match self.probe(subject, guess, deadline).await? {
                    Some((seq, c)) if c >= n64 => (lo, lo_count) = (seq, c),
                    _ => hi = guess,
                }
            }
        }
        // Read to the end of the room; messages published meanwhile are read too, up to one batch more (under a
        // publish storm the answer is then n consecutive messages from a moment ago). Without a count (leader path),
        // the room's limit bounds the walk.
        let bound = (self.cfg.max_messages_per_room as usize).max(self.cfg.max_read).max(n);
        let limit = usize::try_from(lo_count)
            .unwrap_or(usize::MAX)
            .min(bound)
            .saturating_add(self.cfg.batch);
        let read = self.read_from(subject, lo, u64::MAX, limit, deadline).await?.0;
        let skip = read.len().saturating_sub(n);
        Ok(read.into_iter().skip(skip).map(|m| m.stored).collect())
    }

    /// Either a cached segment that answers `(after, up_to]`, or the shared read to await (joined or started).
    fn flight_for(
        self: &Arc<Self>,
        subject: &str,
        after: u64,
        up_to: u64,
        deadline: Instant,
    ) -> Result<Arc<Segment>, (FlightFuture, bool)> {
        let mut st = self.state.lock();
        let now = Instant::now();
        let base = match st.cache.get(subject, now) {
            Some(seg) if seg.covers(after, up_to) => return Ok(seg),
            // Extend a cached segment that starts early enough: only what is newer than it is read.
            Some(seg) if seg.lo <= after && after <= seg.hi => Some(seg),
            _ => None,
        };
        if let Some(f) = st.inflight.get(subject)
            && f.lo <= after
            && up_to <= f.hi
            && let Some(fut) = f.fut.upgrade()
        {
            let wider = (f.lo, f.hi) != (after, up_to);
            return Err((fut, wider));
        }
        if !st.inflight.contains_key(subject) && st.inflight.len() >= self.cfg.max_inflight {
            st.inflight.retain(|_, f| f.fut.upgrade().is_some());
        }
        let id = self.next_flight.fetch_add(1, Ordering::Relaxed);
        let (lo, hi) = (base.as_ref().map_or(after, |b| b.lo), up_to);
        let fut = self
            .read_future(subject.to_string(), base, after, up_to, deadline, id)
            .shared();
        // The map entry is only an index for joiners; when the map is full, the read runs unshared.
        if (st.inflight.contains_key(subject) || st.inflight.len() < self.cfg.max_inflight)
            && let Some(weak) = fut.downgrade()
        {
            st.inflight
                .insert(subject.to_string(), Flight { id, lo, hi, fut: weak });
        }
        Err((fut, false))
    }

    /// The read behind a flight: reads `(witness, up_to]` (extending `base` when given), caches the segment, and
    /// removes its in-flight entry when it ends or is dropped by every waiter.
    fn read_future(
        self: &Arc<Self>,
        subject: String,
        base: Option<Arc<Segment>>,
        after: u64,
        up_to: u64,
        deadline: Instant,
        id: u64,
    ) -> BoxFuture<'static, Result<Arc<Segment>, ReplayError>> {
        // The future must be 'static (it is shared between callers): it owns a handle of the replayer.
        let inner = self.clone();
        async move {
            let _guard = FlightGuard {
                state: inner.state.clone(),
                subject: subject.clone(),
                id,
            };
            let seg = Arc::new(inner.read_segment(&subject, base, after, up_to, deadline).await?);
            inner.state.lock().cache.insert(&subject, seg.clone(), Instant::now());
            Ok(seg)
        }
        .boxed()
    }

    /// A read of exactly `(after, up_to]`, not shared and not cached.
    async fn read_uncoalesced(
        &self,
        subject: &str,
        after: u64,
        up_to: u64,
        deadline: Instant,
    ) -> Result<Arc<Segment>, ReplayError> {
        Ok(Arc::new(
            self.read_segment(subject, None, after, up_to, deadline).await?,
        ))
    }

    /// Reads `(after, up_to]`, or with `base` (a cached segment starting at or before `after`) only what is newer
    /// than `base`, from its witness on, and appends it.
    async fn read_segment(
        &self,
        subject: &str,
        base: Option<Arc<Segment>>,
        after: u64,
        up_to: u64,
        deadline: Instant,
    ) -> Result<Segment, ReplayError> {
        let _permit = self.permit(deadline).await?;
        let witness = base.as_ref().map_or(after, |b| b.witness());
        // The witness itself, `max_read` messages and one more to see the overflow.
        let (read, _) = self
            .read_from(subject, witness, up_to, self.cfg.max_read.saturating_add(2), deadline)
            .await?;
        if read.iter().filter(|m| m.seq > witness && m.seq <= up_to).count() > self.cfg.max_read {
            return Err(ReplayError::TooMany);
        }
        let seg = Segment::assemble(witness, up_to, read, self.cfg.max_messages_per_room);
        Ok(match base {
            Some(base) => Segment::extend(&base, seg),
            None => seg,
        })
    }

    async fn permit(&self, deadline: Instant) -> Result<tokio::sync::SemaphorePermit<'_>, ReplayError> {
        match tokio::time::timeout_at(deadline, self.reads.acquire()).await {
            Err(_) => Err(ReplayError::Timeout),
            Ok(p) => p.map_err(|_| ReplayError::Unavailable("replayer closed".into())),
        }
    }

    fn direct_allowed(&self) -> bool {
        self.no_direct_until.lock().is_none_or(|until| Instant::now() >= until)
    }

    fn mark_no_direct(&self) {
        tracing::warn!(stream = %self.stream, "direct get has no responders (allow_direct off?): reading from the stream leader");
        *self.no_direct_until.lock() = Some(Instant::now() + NO_DIRECT_RETRY);
    }

    /// One-message batch from `seq`: the first message of `subject` at or after `seq` and how many messages of the
    /// subject there are from it on (itself included).
    async fn probe(&self, subject: &str, seq: u64, deadline: Instant) -> Result<Option<(u64, u64)>, ReplayError> {
        if self.direct_allowed() {
            match self.direct_batch(subject, seq, 1, deadline).await? {
                Batch::Msgs { msgs, .. } => {
                    return Ok(msgs.first().map(|m| (m.seq, m.pending.saturating_add(1))));
                }
                Batch::NotFound => return Ok(None),
                Batch::NoResponders => self.mark_no_direct(),
            }
        }
        // Without direct gets there is no pending count: the leader path reads the whole room from `seq`.
        let body = serde_json::json!({ "seq": seq, "next_by_subj": subject }).to_string();
        Ok(self.leader_get(body, deadline).await?.map(|m| (m.seq, u64::MAX)))
    }

    /// Every message of `subject` with seq >= `from` up to the first one at or beyond `up_to` (included), stopping
    /// early once more than `limit` messages are collected (then `.1` is true). Direct gets first; when the
    /// responder has nothing more but `up_to` is not reached (a lagging replica), the rest comes from the leader.
    async fn read_from(
        &self,
        subject: &str,
        from: u64,
        up_to: u64,
        limit: usize,
        deadline: Instant,
    ) -> Result<(Vec<Read>, bool), ReplayError> {
        let mut out: Vec<Read> = Vec::new();
        let mut next = from;
        let mut direct = self.direct_allowed();
        loop {
            if out.len() > limit {
                return Ok((out, true));
            }
            if direct {
                let want = limit
                    .saturating_add(1)
                    .saturating_sub(out.len())
                    .clamp(1, self.cfg.batch);
                match self.direct_batch(subject, next, want, deadline).await? {
                    Batch::NoResponders => {
                        self.mark_no_direct();
                        direct = false;
                    }
                    // The responder has nothing at or after `next`: the leader decides (lagging replica).
                    Batch::NotFound => direct = false,
                    Batch::Msgs { msgs, pending, last } => {
                        out.extend(msgs);
                        if last >= up_to || (pending == 0 && up_to == u64::MAX) {
                            return Ok((out, false));
                        }
                        next = last + 1;
                        // The responder has no more, yet `up_to` is not reached: it lags; ask the leader.
                        direct = pending > 0;
                    }
                }
            } else {
                let body = serde_json::json!({ "seq": next, "next_by_subj": subject }).to_string();
                match self.leader_get(body, deadline).await? {
                    // The leader is authoritative: nothing more is stored.
                    None => return Ok((out, false)),
                    Some(m) => {
                        if m.subject != subject {
                            return Err(ReplayError::Unavailable(format!(
                                "leader answered subject {}",
                                m.subject
                            )));
                        }
                        let seq = m.seq;
                        out.push(m);
                        if seq >= up_to {
                            return Ok((out, false));
                        }
                        next = seq + 1;
                    }
                }
            }
        }
    }

    /// One batched direct get: `{"seq":from,"next_by_subj":subject,"batch":n}` on a fresh inbox, read until the EOB
    /// status (or a 404 / no responders), each wait bounded by `deadline`.
    async fn direct_batch(&self, subject: &str, from: u64, n: usize, deadline: Instant) -> Result<Batch, ReplayError> {
        let inbox = self.client.new_inbox();
        let mut sub = tokio::time::timeout_at(deadline, self.client.subscribe(inbox.clone()))
            .await
            .map_err(|_| ReplayError::Timeout)?
            .map_err(unavailable)?;
        let body = serde_json::json!({
            "seq": from,
            "next_by_subj": subject,
            "batch": n,
            "max_bytes": self.cfg.batch_bytes,
        })
        .to_string();
        self.requests.fetch_add(1, Ordering::Relaxed);
        tokio::time::timeout_at(
            deadline,
            self.client
                .publish_with_reply(self.direct_subject.clone(), inbox, Bytes::from(body)),
        )
        .await
        .map_err(|_| ReplayError::Timeout)?
        .map_err(unavailable)?;
        let mut msgs = Vec::new();
        loop {
            let msg = tokio::time::timeout_at(deadline, sub.next())
                .await
                .map_err(|_| ReplayError::Timeout)?
                .ok_or_else(|| ReplayError::Unavailable("inbox subscription closed".into()))?;
            match msg.status.map(|s| s.as_u16()) {
                None => {
                    if msgs.len() >= n {
                        return Err(ReplayError::Unavailable("direct get sent more than the batch".into()));
                    }
                    let m = parse_direct(msg)?;
                    if m.subject != subject {
                        return Err(ReplayError::Unavailable(format!(
                            "direct get answered subject {}",
                            m.subject
                        )));
                    }
                    msgs.push(m);
                }
                Some(204) => {
                    let h = msg.headers.as_ref();
                    let pending = header_u64(h, "Nats-Num-Pending")
                        .ok_or_else(|| ReplayError::Unavailable("EOB without Nats-Num-Pending".into()))?;
                    let last = header_u64(h, "Nats-Last-Sequence").unwrap_or(0);
                    if msgs.is_empty() {
                        return Ok(Batch::NotFound);
                    }
                    return Ok(Batch::Msgs { msgs, pending, last });
                }
                Some(404) if msgs.is_empty() => return Ok(Batch::NotFound),
                Some(503) => return Ok(Batch::NoResponders),
                Some(code) => {
                    return Err(ReplayError::Unavailable(format!(
                        "direct get status {code} {}",
                        msg.description.unwrap_or_default()
                    )));
                }
            }
        }
    }

    /// A single direct get (no batch), e.g. `last_by_subj`.
    async fn direct_one(&self, body: String, deadline: Instant) -> Result<One, ReplayError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let req = self.client.request(self.direct_subject.clone(), Bytes::from(body));
        let msg = match tokio::time::timeout_at(deadline, req).await {
            Err(_) => return Err(ReplayError::Timeout),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => return Ok(One::NoResponders),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::TimedOut => return Err(ReplayError::Timeout),
            Ok(Err(e)) => return Err(unavailable(e)),
            Ok(Ok(msg)) => msg,
        };
        match msg.status {
            None => Ok(One::Found(parse_direct(msg)?)),
            Some(StatusCode::NOT_FOUND) => Ok(One::NotFound),
            Some(StatusCode::NO_RESPONDERS) => Ok(One::NoResponders),
            Some(code) => Err(ReplayError::Unavailable(format!("direct get status {code}"))),
        }
    }

    /// `$JS.API.STREAM.MSG.GET.<stream>`: answered by the stream leader only (read-after-write coherent); `None` when
    /// no message matches.
    async fn leader_get(&self, body: String, deadline: Instant) -> Result<Option<Read>, ReplayError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let req = self.client.request(self.leader_subject.clone(), Bytes::from(body));
        let msg = match tokio::time::timeout_at(deadline, req).await {
            Err(_) => return Err(ReplayError::Timeout),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::TimedOut => return Err(ReplayError::Timeout),
            Ok(Err(e)) => return Err(unavailable(e)),
            Ok(Ok(msg)) => msg,
        };
        parse_leader(&msg.payload)
    }
}

/// Removes a flight's in-flight entry when its read ends or every waiter dropped it (only its own entry: a newer
/// flight of the same subject may have replaced it).
struct FlightGuard {
    state: Arc<Mutex<State>>,
    subject: String,
    id: u64,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        let mut st = self.state.lock();
        if st.inflight.get(&self.subject).is_some_and(|f| f.id == self.id) {
            st.inflight.remove(&self.subject);
        }
    }
}

/// One message as read (direct or leader), before it becomes a [`Stored`].
#[derive(Debug, Clone)]
struct Read {
    seq: u64,
    subject: String,
    /// `Nats-Num-Pending` of a batch: messages of the subject after this one (0 when unknown).
    pending: u64,
    stored: Stored,
}

enum Batch {
    Msgs { msgs: Vec<Read>, pending: u64, last: u64 },
    NotFound,
    NoResponders,
}

enum One {
    Found(Read),
    NotFound,
    NoResponders,
}

fn unavailable(e: impl std::fmt::Display) -> ReplayError {
    ReplayError::Unavailable(e.to_string())
}

/// Subjects come from validated room names; a wildcard here would read other rooms' messages.
fn check_subject(subject: &str) -> Result<(), ReplayError> {
    let bad = subject.is_empty()
        || subject.split('.').any(|t| t.is_empty() || t == "*" || t == ">")
        || subject.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control());
    if bad {
        return Err(ReplayError::Unavailable(format!("not a room subject: {subject:?}")));
    }
    Ok(())
}

fn header_u64(h: Option<&HeaderMap>, name: &str) -> Option<u64> {
    h?.get(name)?.as_str().trim().parse().ok()
}

/// A direct get reply: headers `Nats-Sequence`, `Nats-Subject` (+ `Nats-Num-Pending` in a batch) and the original
/// message's own headers.
fn parse_direct(msg: async_nats::Message) -> Result<Read, ReplayError> {
    let h = msg.headers.as_ref();
    let seq = header_u64(h, "Nats-Sequence")
        .filter(|s| *s > 0)
        .ok_or_else(|| ReplayError::Unavailable("direct get reply without Nats-Sequence".into()))?;
    let subject = h
        .and_then(|h| h.get("Nats-Subject"))
        .map(|v| v.as_str().to_string())
        .ok_or_else(|| ReplayError::Unavailable("direct get reply without Nats-Subject".into()))?;
    let pending = header_u64(h, "Nats-Num-Pending").unwrap_or(0);
    Ok(Read {
        seq,
        subject,
        pending,
        stored: Stored {
            seq,
            payload: msg.payload,
            headers: msg.headers.as_ref().and_then(original_headers),
        },
    })
}

/// The message's own headers: everything but what a direct get adds.
fn original_headers(h: &HeaderMap) -> Option<HeaderMap> {
    let mut out = HeaderMap::new();
    for (name, values) in h.iter() {
        let n: &str = name.as_ref();
        if DIRECT_HEADERS.iter().any(|d| d.eq_ignore_ascii_case(n)) {
            continue;
        }
        for v in values {
            out.append(name.clone(), v.clone());
        }
    }
    (!out.is_empty()).then_some(out)
}

/// A `STREAM.MSG.GET` reply: `{"message":{"subject","seq","hdrs"(base64),"data"(base64)}}` or
/// `{"error":{"code":404,..}}` when no message matches.
fn parse_leader(payload: &[u8]) -> Result<Option<Read>, ReplayError> {
    #[derive(Deserialize)]
    struct Resp {
        message: Option<Msg>,
        error: Option<ApiError>,
    }
    #[derive(Deserialize)]
    struct Msg {
        subject: String,
        seq: u64,
        hdrs: Option<String>,
        data: Option<String>,
    }
    #[derive(Deserialize)]
    struct ApiError {
        code: u16,
        description: Option<String>,
    }
    let resp: Resp = serde_json::from_slice(payload).map_err(|e| unavailable(format!("msg get reply: {e}")))?;
    if let Some(e) = resp.error {
        if e.code == 404 {
            return Ok(None);
        }
        return Err(ReplayError::Unavailable(format!(
            "msg get: {} {}",
            e.code,
            e.description.unwrap_or_default()
        )));
    }
    let m = resp
        .message
        .ok_or_else(|| ReplayError::Unavailable("msg get reply without message".into()))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let payload = match m.data {
        Some(d) => b64.decode(d).map_err(|e| unavailable(format!("msg get data: {e}")))?,
        None => Vec::new(),
    };
    let headers = match m.hdrs {
        Some(h) => parse_header_block(&b64.decode(h).map_err(|e| unavailable(format!("msg get hdrs: {e}")))?),
        None => None,
    };
    Ok(Some(Read {
        seq: m.seq,
        subject: m.subject,
        pending: 0,
        stored: Stored {
            seq: m.seq,
            payload: Bytes::from(payload),
            headers,
        },
    }))
}

/// `NATS/1.0\r\nName: value\r\n...\r\n\r\n` -> headers (`None` when empty or unparsable lines only).
fn parse_header_block(block: &[u8]) -> Option<HeaderMap> {
    let text = std::str::from_utf8(block).ok()?;
    let mut out = HeaderMap::new();
    for line in text.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let Ok(name) = async_nats::HeaderName::try_from(name.trim()) else {
            continue;
        };
        out.append(name, value.trim());
    }
    (!out.is_empty()).then_some(out)
}

/// Every stored message of one subject in `(lo, hi]`, as read at `at`. Complete: no message of the subject in that
/// range was missing from the store at read time.
#[derive(Debug)]
struct Segment {
    lo: u64,
    hi: u64,
    /// Whether the history after `lo` is whole: message `lo` was stored under this subject at read time (or, for
    /// `lo == 0`, the room held fewer than `max_messages_per_room` messages).
    lo_ok: bool,
    /// Set when an extension found its witness gone: a slice with `after <= cut` is Truncated.
    cut: Option<u64>,
    /// Ascending by seq, all in `(lo, hi]`.
    msgs: Arc<[Stored]>,
    /// Payload + header bytes, charged to the cache.
    bytes: usize,
}

impl Segment {
    /// From the messages read from `witness` on (the message `witness` itself included when stored).
    fn assemble(witness: u64, hi: u64, read: Vec<Read>, max_per_room: u64) -> Segment {
        let lo_ok = if witness > 0 {
            read.first().is_some_and(|m| m.seq == witness)
        } else {
            max_per_room == 0 || (read.iter().filter(|m| m.seq <= hi).count() as u64) < max_per_room
        };
        let msgs: Vec<Stored> = read
            .into_iter()
            .filter(|m| m.seq > witness && m.seq <= hi)
            .map(|m| m.stored)
            .collect();
        let bytes = msgs.iter().map(stored_bytes).sum();
        Segment {
            lo: witness,
            hi,
            lo_ok,
            cut: None,
            msgs: Arc::from(msgs),
            bytes,
        }
    }

    /// `base` followed by an extension read from `ext.lo` (the last message of `base`, or its `lo`). When the
    /// extension's witness is gone, the history up to it is cut: only slices after it stay whole.
    fn extend(base: &Segment, ext: Segment) -> Segment {
        let msgs: Vec<Stored> = base.msgs.iter().chain(ext.msgs.iter()).cloned().collect();
        Segment {
            lo: base.lo,
            hi: ext.hi,
            lo_ok: base.lo_ok,
            cut: if ext.lo_ok { base.cut } else { Some(ext.lo) },
            msgs: Arc::from(msgs),
            bytes: base.bytes + ext.bytes,
        }
    }

    /// Where an extension of this segment reads from: its last message (a witness that nothing newer was removed),
    /// or its `lo` when it holds none.
    fn witness(&self) -> u64 {
        self.msgs.last().map_or(self.lo, |m| m.seq)
    }

    fn covers(&self, after: u64, up_to: u64) -> bool {
        self.lo <= after && after <= self.hi && up_to <= self.hi
    }

    /// The messages in `(after, up_to]`: `None` when this segment does not cover the range, Truncated when the
    /// history after `after` may have lost messages (message `after` was not stored under this subject).
    fn slice(&self, after: u64, up_to: u64) -> Option<Result<Arc<[Stored]>, ReplayError>> {
        if !self.covers(after, up_to) {
            return None;
        }
        let whole = if self.cut.is_some_and(|c| after <= c) {
            false
        } else if after == self.lo {
            self.lo_ok
        } else {
            self.msgs.binary_search_by_key(&after, |m| m.seq).is_ok()
        };
        if !whole {
            return Some(Err(ReplayError::Truncated));
        }
        let start = self.msgs.partition_point(|m| m.seq <= after);
        let end = self.msgs.partition_point(|m| m.seq <= up_to);
        if start == 0 && end == self.msgs.len() {
            return Some(Ok(self.msgs.clone()));
        }
        Some(Ok(Arc::from(&self.msgs[start..end])))
    }
}

fn stored_bytes(m: &Stored) -> usize {
    let h: usize = m.headers.as_ref().map_or(0, |h| {
        h.iter()
            .map(|(n, vs)| {
                vs.iter()
                    .map(|v| AsRef::<str>::as_ref(n).len() + v.as_str().len() + 4)
                    .sum::<usize>()
            })
            .sum()
    });
    m.payload.len() + h + 64
}

/// The recent segments, one per subject, bounded in bytes and entries; entries expire after `ttl`.
struct Cache {
    max_bytes: usize,
    max_entries: usize,
    ttl: Duration,
    bytes: usize,
    entries: HashMap<String, (Instant, Arc<Segment>)>,
}

impl Default for Cache {
    fn default() -> Self {
        Cache::new(0, 0, Duration::ZERO)
    }
}

impl Cache {
    fn new(max_bytes: usize, max_entries: usize, ttl: Duration) -> Self {
        Cache {
            max_bytes,
            max_entries,
            ttl,
            bytes: 0,
            entries: HashMap::new(),
        }
    }

    fn get(&mut self, subject: &str, now: Instant) -> Option<Arc<Segment>> {
        let (at, seg) = self.entries.get(subject)?;
        if now.duration_since(*at) >= self.ttl {
            self.remove(subject);
            return None;
        }
        Some(seg.clone())
    }

    fn remove(&mut self, subject: &str) {
        if let Some((_, seg)) = self.entries.remove(subject) {
            self.bytes -= seg.bytes;
        }
    }

    /// Replaces the subject's segment; then drops expired entries and, while over a bound, the oldest.
    fn insert(&mut self, subject: &str, seg: Arc<Segment>, now: Instant) {
        self.remove(subject);
        if seg.bytes > self.max_bytes || self.max_entries == 0 {
            return;
        }
        self.bytes += seg.bytes;
        self.entries.insert(subject.to_string(), (now, seg));
        let ttl = self.ttl;
        let expired: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, (at, _))| now.duration_since(*at) >= ttl)
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            self.remove(&k);
        }
        while self.bytes > self.max_bytes || self.entries.len() > self.max_entries {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

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

    /// The store as a plain model: every message ever published (seq -> room 0/1), and what a per-room limit left.
    fn model(rooms: &[u8], limit: usize) -> (BTreeMap<u64, u8>, BTreeMap<u64, u8>) {
        let all: BTreeMap<u64, u8> = rooms.iter().enumerate().map(|(i, r)| (i as u64 + 1, *r)).collect();
        let mut kept = BTreeMap::new();
        for room in 0..2u8 {
            let of: Vec<u64> = all.iter().filter(|(_, r)| **r == room).map(|(s, _)| *s).collect();
            for s in &of[of.len().saturating_sub(limit)..] {
                kept.insert(*s, room);
            }
        }
        (all, kept)
    }

    /// What a read of room 0 from `witness` returns on a store holding `kept`.
    fn read(kept: &BTreeMap<u64, u8>, witness: u64) -> Vec<Read> {
        kept.range(witness..)
            .filter(|(_, r)| **r == 0)
            .map(|(s, _)| Read {
                seq: *s,
                subject: "rooms.0".into(),
                pending: 0,
                stored: Stored {
                    seq: *s,
                    payload: Bytes::new(),
                    headers: None,
                },
            })
            .collect()
    }

    proptest! {
        /// Whatever was removed, a slice of a segment (read once, or read then extended after more publishes and
        /// removals) is either Truncated or exactly every message ever published to the room in (after, up_to]:
        /// never a silent gap, never an extra.
        #[test]
        fn a_slice_is_exact_or_truncated(
            rooms in proptest::collection::vec(0u8..2, 1..40),
            more in proptest::collection::vec(0u8..2, 0..20),
            limit in 1usize..8,
            after in 0u64..60,
            up_to in 0u64..60,
            extend in any::<bool>(),
        ) {
            let (_, kept1) = model(&rooms, limit);
            let hi1 = rooms.len() as u64;
            let after1 = after.min(hi1);
            let mut seg = Segment::assemble(after1, hi1, read(&kept1, after1), limit as u64);
            let mut history = rooms.clone();
            if extend {
                history.extend(&more);
                let (_, kept2) = model(&history, limit);
                let hi2 = history.len() as u64;
                let w = seg.witness();
                seg = Segment::extend(&seg, Segment::assemble(w, hi2, read(&kept2, w), limit as u64));
            }
            let (all, _) = model(&history, limit);
            if let Some(Ok(msgs)) = seg.slice(after, up_to.max(after)) {
                let want: Vec<u64> = all
                    .iter()
                    .filter(|(s, r)| **s > after && **s <= up_to && **r == 0)
                    .map(|(s, _)| *s)
                    .collect();
                prop_assert_eq!(seqs(&msgs), want);
            }
        }

        /// The cache stays within its bounds whatever is inserted.
        #[test]
        fn the_cache_stays_bounded(
            inserts in proptest::collection::vec((0u8..20, 0usize..30, 0u64..10), 1..80),
            max_bytes in 0usize..3000,
            max_entries in 0usize..6,
        ) {
            let mut cache = Cache::new(max_bytes, max_entries, Duration::from_secs(5));
            let t0 = Instant::now();
            for (room, n, dt) in inserts {
                let msgs: Vec<Stored> = (1..=n as u64)
                    .map(|s| Stored { seq: s, payload: Bytes::from(vec![0u8; 10]), headers: None })
                    .collect();
                let bytes = msgs.iter().map(stored_bytes).sum();
                let seg = Segment { lo: 0, hi: n as u64, lo_ok: true, cut: None, msgs: Arc::from(msgs), bytes };
                cache.insert(&format!("rooms.{room}"), Arc::new(seg), t0 + Duration::from_secs(dt));
                prop_assert!(cache.bytes <= max_bytes);
                prop_assert!(cache.entries.len() <= max_entries);
                prop_assert_eq!(cache.bytes, cache.entries.values().map(|(_, s)| s.bytes).sum::<usize>());
            }
        }
    }
}
