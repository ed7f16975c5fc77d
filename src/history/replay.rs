//! Reading stored room messages back from the history stream: the missed range of a recovering join
//! ([`Replayer::range`]), the last N of the `history` op ([`Replayer::last`]) and a room's last sequence
//! ([`Replayer::last_seq`]).
//!
//! The JetStream requests themselves (direct gets, the leader fallback) are `direct`'s, the truncation rule is
//! `segment`'s and the bounded cache is `cache`'s; this module decides what to read and who shares it.
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

use futures_util::{
    FutureExt,
    future::{BoxFuture, Shared, WeakShared},
};
use parking_lot::Mutex;
use tokio::{sync::Semaphore, time::Instant};

use super::{
    cache::Cache,
    direct::StreamReader,
    segment::Segment,
    stored::{ReplayError, Stored},
};

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

/// Probes `last` makes to find where the last N of a room start, before reading from the best bound found.
const LAST_PROBES: usize = 8;

/// Reads stored room messages by direct get, with single flight and a small bounded cache per subject.
pub struct Replayer {
    /// Shared with the read futures, which must be `'static` to be shared between callers.
    inner: Arc<Inner>,
}

/// The connection, bounds, counters and maps a read needs.
struct Inner {
    /// The JetStream requests (direct gets, leader gets) and their counter.
    reader: StreamReader,
    cfg: ReplayConfig,
    /// Concurrent JetStream reads (`max_inflight` permits); a read waits for one until its deadline.
    reads: Semaphore,
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
            reader: StreamReader::new(client, stream, cfg.batch, cfg.batch_bytes),
            reads: Semaphore::new(cfg.max_inflight),
            state: Arc::new(Mutex::new(State {
                cache: Cache::new(cfg.cache_bytes, cfg.cache_entries, cfg.cache_ttl),
                inflight: HashMap::new(),
            })),
            cfg,
            next_flight: AtomicU64::new(0),
        };
        Replayer { inner: Arc::new(inner) }
    }

    /// The stream this replayer reads.
    pub fn stream(&self) -> &str {
        self.inner.reader.stream()
    }

    /// JetStream API requests made so far (benchmark: requests per recovering client); also exported as a metric.
    pub fn requests(&self) -> u64 {
        self.inner.reader.requests()
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
        self.reader.last_seq(subject, deadline).await
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
        let Some((first, count)) = self.reader.probe(subject, 0, deadline).await? else {
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
                match self.reader.probe(subject, guess, deadline).await? {
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
        let read = self.reader.read_from(subject, lo, u64::MAX, limit, deadline).await?.0;
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
            .reader
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

#[cfg(test)]
mod tests;
