//! The one bounded queue between the world and a connection's writer (the write side of its task, `crate::wire`),
//! with the overflow policies of `docs/backpressure.md`.
//!
//! Producers (room fan-out tasks, the connection's own handlers) call [`Outbox::push_room`] /
//! [`Outbox::push_control`]; neither ever awaits the client. Only the push that makes the queue non-empty wakes the
//! writer, which takes everything queued in one go ([`Outbox::poll_batch`]) and hands it to vectored writes, so a burst
//! costs one wake-up and one syscall per 64 frames rather than one per frame. The writer's drained batch becomes the
//! next queue (no allocation per batch while busy), and when nothing is queued both give their storage back (an idle
//! connection holds none).
//!
//! Why a `VecDeque` behind a mutex rather than a `tokio::mpsc` channel: `drop_oldest` must remove from the head and
//! `latest` must replace a queued message in place, which a channel cannot do from the producer side. The lock is
//! per connection and held for a handful of instructions (no allocation, no I/O inside), so the fan-out task and the
//! writer are the only two parties and contention is negligible; the writer swaps the whole queue out under one lock.
//!
//! Several rooms share the queue, so each policy only ever acts on messages of rooms under that policy (one function
//! per policy below): `disconnect` and `drop_newest` act only on the message being pushed; `drop_oldest` evicts only
//! messages of `drop_oldest` rooms (each queued room message carries its policy); `latest` only replaces its own
//! room's pending value. A `latest` value that finds the queue full of other rooms' messages is *parked* outside it
//! (at most one per room: a newer value replaces it) and moved in, before anything pushed later, as soon as the writer
//! takes a batch, so a ticker that stops still ends with its last value delivered.
//!
//! Bounds: the queue holds at most `limits.max_pending_messages` entries and `limits.max_pending_bytes` bytes (the
//! one exception: a control frame larger than that is admitted into an empty queue, alone). Parked values: at most one
//! per joined `latest` room (`rooms.max_rooms_per_connection`), each at most `max_pending_bytes`; a parked value is
//! always the newest frame of its room, the same refcounted frame every member of the room holds, so parking adds no
//! copy. The `gaps` map holds at most one entry per joined room.

use std::{collections::HashMap, collections::VecDeque, sync::Arc};

use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::frame::Frame;

/// What to do when a connection's outbound queue is full. See `docs/backpressure.md`.
#[derive(Debug, Clone, Copy, serde::Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Close the connection with 4008 "slow consumer".
    Disconnect,
    /// Drop the oldest queued message of the room; a `gap` notice tells the client.
    DropOldest,
    /// Drop the message that does not fit; a `gap` notice tells the client.
    DropNewest,
    /// Keep only the newest pending message of the room (conflation).
    Latest,
}

/// The outbox checked against a plain model of `docs/backpressure.md` (property test and fuzz target).
#[cfg(any(test, fuzzing))]
pub mod model;

/// What is queued for the writer.
#[derive(Debug)]
pub enum Item {
    /// A reply to the client itself (ack, error, pong, notices): never dropped by a room policy.
    Control(Frame),
    /// A room message, shared by every recipient of the same NATS message.
    Room {
        /// Room name (shared `Arc`, no allocation per recipient).
        room: Arc<str>,
        /// The pre-built frame.
        frame: Frame,
        /// Messages of this room dropped just before this one; the writer sends a `gap` notice first.
        gap: u64,
        /// The room's overflow policy, so that `drop_oldest` evicts only messages of `drop_oldest` rooms and `latest`
        /// replaces only its own. `disconnect` (which no push acts on) once the connection has left the room.
        policy: Overflow,
    },
}

impl Item {
    fn len(&self) -> usize {
        match self {
            Item::Control(f) | Item::Room { frame: f, .. } => f.len(),
        }
    }
}

/// A room change a backend asked of the connection (`subscribe` / `unsubscribe` over NATS, `crate::control`),
/// carried out by the connection's own task between client ops ([`Outbox::take_directive`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Directive {
    /// Join the room as a server-side room (`{"op":"joined"}`).
    Join(Arc<str>),
    /// Leave the room, however it was joined (`{"op":"left","reason":"removed"}`).
    Leave(Arc<str>),
}

/// Why the writer must stop, set by [`Outbox::close`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseRequest {
    /// WebSocket close code (see `protocol::close`).
    pub code: u16,
    /// Close reason (≤ 123 bytes): a fixed text, or a backend's (`disconnect` with `reason`, checked where it
    /// enters).
    pub reason: std::borrow::Cow<'static, str>,
    /// Write what is queued before the close frame (graceful) or discard it (slow consumer).
    pub flush_queued: bool,
}

/// Outcome of a push. Each variant says exactly how many room messages the push dropped (for the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued.
    Queued,
    /// Held outside the full queue as its room's newest value (`latest`), moved in when the writer takes a batch.
    /// Nothing dropped.
    Parked,
    /// Replaced its room's pending value, which is dropped (superseded) without a gap notice (`latest`).
    Conflated,
    /// Queued after evicting this many older messages of `drop_oldest` rooms (possibly other rooms than its own).
    DroppedOldest(u64),
    /// Not queued, and counted in its room's next gap notice: the queue is full (`drop_newest`; `drop_oldest` when
    /// evicting every `drop_oldest` message would not make room; `latest` for a frame larger than the whole queue).
    DroppedNewest,
    /// Not queued: the queue is full and the policy is `disconnect`; the outbox is now closed with 4008.
    Overflowed,
    /// Not queued: the connection is closing.
    Closed,
}

/// A `latest` room's newest value, waiting outside a full queue.
#[derive(Debug)]
struct Parked {
    room: Arc<str>,
    frame: Frame,
    /// Messages of the room dropped just before this value.
    gap: u64,
}

impl Parked {
    fn into_item(self) -> Item {
        Item::Room {
            room: self.room,
            frame: self.frame,
            gap: self.gap,
            policy: Overflow::Latest,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Item>,
    bytes: usize,
    /// `drop_oldest` messages in `queue`, and their bytes: what evicting could free, known without a scan.
    evictable: usize,
    evictable_bytes: usize,
    /// `latest` messages in `queue`: a `latest` push looks for its room's value only when there is one.
    latest_queued: usize,
    /// `latest` values that did not fit, oldest first; at most one per room.
    parked: VecDeque<Parked>,
    /// Dropped counts of rooms that have no message queued yet to carry them.
    gaps: HashMap<Arc<str>, u64>,
    close: Option<CloseRequest>,
    /// Room changes asked by backends, oldest first; at most the bound given to [`Outbox::push_directive`].
    directives: VecDeque<Directive>,
    /// When the oldest item now queued was queued (set by the push into an empty queue).
    oldest: Option<tokio::time::Instant>,
    /// `oldest` of the batch the writer took last, for the delivery-time histogram.
    batch_oldest: Option<tokio::time::Instant>,
}

impl State {
    /// The drops owed to `room`'s next message (the hash lookup is skipped while nothing is owed to anyone).
    fn take_gap(&mut self, room: &str) -> u64 {
        if self.gaps.is_empty() {
            0
        } else {
            self.gaps.remove(room).unwrap_or(0)
        }
    }

    /// Owes `n` more drops to `room`'s next message.
    fn owe_gap(&mut self, room: &Arc<str>, n: u64) {
        let owed = self.gaps.entry(room.clone()).or_insert(0);
        *owed = owed.saturating_add(n);
    }

    /// Forgets what was queued (the writer took it, or the connection is closing).
    fn queue_taken(&mut self) {
        self.batch_oldest = self.oldest.take();
        self.bytes = 0;
        self.evictable = 0;
        self.evictable_bytes = 0;
        self.latest_queued = 0;
    }
}

/// Same room: the pointer test covers fan-out, which passes the room's own `Arc` to every push.
fn same_room(a: &Arc<str>, b: &Arc<str>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

/// Per-connection bounded outbound queue. Shared (`Arc`) by the connection's tasks and every room it is in.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    /// Wakes the connection's task (its writer side) when something was queued or a close was requested. A waker
    /// rather than a `Notify`: only the first push after the writer went idle pays for a wake-up.
    wake_writer: AtomicWaker,
    /// Wakes producers waiting in [`Outbox::push_control`] when the writer took a batch.
    space: Notify,
    /// Someone waits on `space`: only then does taking a batch pay for `notify_waiters` (a lock).
    space_wanted: std::sync::atomic::AtomicBool,
    max_messages: usize,
    max_bytes: usize,
    /// The connection's RPC calls awaiting their answer (`rpc.max_inflight_per_connection`): kept here, on the heap
    /// the connection already shares, so an idle connection's task does not grow.
    rpc_inflight: std::sync::atomic::AtomicUsize,
    /// A directive is waiting: the connection's loop looks under the lock only then.
    has_directives: std::sync::atomic::AtomicBool,
    /// permessage-deflate: the longest plain payload this connection takes compressed (`deflate::Agreement`), 0
    /// when it did not negotiate the extension. The only compression state a connection has: room fan-out and
    /// replies read it to choose between the plain and the deflated frame.
    deflate_max: usize,
}

impl Outbox {
    /// A queue bounded to `max_messages` entries and `max_bytes` bytes.
    pub fn new(max_messages: usize, max_bytes: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            wake_writer: AtomicWaker::new(),
            space: Notify::new(),
            space_wanted: std::sync::atomic::AtomicBool::new(false),
            max_messages,
            max_bytes,
            rpc_inflight: std::sync::atomic::AtomicUsize::new(0),
            has_directives: std::sync::atomic::AtomicBool::new(false),
            deflate_max: 0,
        }
    }

    /// The queue of a connection that negotiated permessage-deflate and takes payloads up to `max_plain` bytes
    /// compressed (`usize::MAX` unless it restricted the gateway's window).
    pub fn with_deflate(mut self, max_plain: usize) -> Self {
        self.deflate_max = max_plain;
        self
    }

    /// Whether a message of `plain_len` payload bytes goes to this connection compressed, when a compressed frame
    /// of it exists.
    pub fn takes_deflated(&self, plain_len: usize) -> bool {
        plain_len <= self.deflate_max
    }

    /// Whether this connection negotiated permessage-deflate.
    pub fn deflate(&self) -> bool {
        self.deflate_max > 0
    }

    /// Takes one of `max` RPC call slots; false when all are taken. Give it back with [`Outbox::release_rpc`].
    pub fn try_acquire_rpc(&self, max: usize) -> bool {
        use std::sync::atomic::Ordering;
        self.rpc_inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .is_ok()
    }

    /// Gives back a slot taken by [`Outbox::try_acquire_rpc`].
    pub fn release_rpc(&self) {
        self.rpc_inflight.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }

    fn fits(&self, s: &State, len: usize) -> bool {
        s.queue.len() < self.max_messages && s.bytes + len <= self.max_bytes
    }

    fn enqueue(&self, s: &mut State, item: Item) {
        let len = item.len();
        s.bytes += len;
        match &item {
            Item::Room {
                policy: Overflow::DropOldest,
                ..
            } => {
                s.evictable += 1;
                s.evictable_bytes += len;
            }
            Item::Room {
                policy: Overflow::Latest,
                ..
            } => s.latest_queued += 1,
            _ => {}
        }
        if s.queue.is_empty() {
            // One clock read per batch a connection's writer will take, not per item.
            s.oldest = Some(tokio::time::Instant::now());
        }
        s.queue.push_back(item);
    }

    /// Queues a new room message, carrying the drops owed to its room.
    fn enqueue_room(&self, s: &mut State, room: &Arc<str>, frame: Frame, policy: Overflow) -> Pushed {
        let gap = s.take_gap(room);
        self.enqueue(
            s,
            Item::Room {
                room: room.clone(),
                frame,
                gap,
                policy,
            },
        );
        Pushed::Queued
    }

    /// Queues a room message under `policy`. Never blocks.
    pub fn push_room(&self, room: &Arc<str>, frame: Frame, policy: Overflow) -> Pushed {
        let (outcome, first) = {
            let mut guard = self.state.lock();
            let s = &mut *guard;
            if s.close.is_some() {
                return Pushed::Closed;
            }
            let was_empty = s.queue.is_empty();
            let outcome = match policy {
                Overflow::Disconnect => self.push_disconnect(s, room, frame),
                Overflow::DropNewest => self.push_drop_newest(s, room, frame),
                Overflow::DropOldest => self.push_drop_oldest(s, room, frame),
                Overflow::Latest => self.push_latest(s, room, frame),
            };
            (outcome, was_empty && !s.queue.is_empty())
        };
        match outcome {
            // Only the push that makes the queue non-empty wakes the writer: until it takes the batch, the later
            // ones find it woken already (the hot path's most expensive step was a wake per push).
            Pushed::Queued | Pushed::DroppedOldest(_) if first => self.wake_writer.wake(),
            Pushed::Queued | Pushed::DroppedOldest(_) => {}
            Pushed::Overflowed => {
                self.wake_writer.wake();
                // The reader may be waiting in `push_control`: it must see the close, or it waits for space forever
                // (the writer discards the queue without waking it) and the connection's task never ends.
                self.space.notify_waiters();
            }
            // Nothing new in the queue: a conflated value replaced one the writer was already woken for, and a parked
            // one is moved in by the writer itself when it takes its next batch.
            Pushed::Parked | Pushed::Conflated | Pushed::DroppedNewest | Pushed::Closed => {}
        }
        outcome
    }

    /// `disconnect`: a full queue closes the connection with 4008; queued messages are never touched.
    fn push_disconnect(&self, s: &mut State, room: &Arc<str>, frame: Frame) -> Pushed {
        if self.fits(s, frame.len()) {
            return self.enqueue_room(s, room, frame, Overflow::Disconnect);
        }
        s.close = Some(CloseRequest {
            code: crate::protocol::close::SLOW_CONSUMER,
            reason: "slow consumer".into(),
            flush_queued: false,
        });
        Pushed::Overflowed
    }

    /// `drop_newest`: a message that does not fit is dropped and owed to its room's next gap notice.
    fn push_drop_newest(&self, s: &mut State, room: &Arc<str>, frame: Frame) -> Pushed {
        if self.fits(s, frame.len()) {
            return self.enqueue_room(s, room, frame, Overflow::DropNewest);
        }
        s.owe_gap(room, 1);
        Pushed::DroppedNewest
    }

    /// `drop_oldest`: evict the oldest queued messages of `drop_oldest` rooms until the new one fits. If evicting all
    /// of them would not be enough (the queue is full of other rooms' messages or control frames), evict nothing
    /// and drop the new one instead, so no drop is made in vain.
    fn push_drop_oldest(&self, s: &mut State, room: &Arc<str>, frame: Frame) -> Pushed {
        let len = frame.len();
        if self.fits(s, len) {
            return self.enqueue_room(s, room, frame, Overflow::DropOldest);
        }
        let could_fit =
            s.queue.len() - s.evictable < self.max_messages && s.bytes - s.evictable_bytes + len <= self.max_bytes;
        if !could_fit {
            s.owe_gap(room, 1);
            return Pushed::DroppedNewest;
        }
        let mut evicted = 0u64;
        let mut from = 0;
        while !self.fits(s, len)
            && let Some(pos) = Self::evict_oldest(s, from)
        {
            from = pos;
            evicted += 1;
        }
        debug_assert!(self.fits(s, len), "drop_oldest counters out of step with the queue");
        self.enqueue_room(s, room, frame, Overflow::DropOldest);
        Pushed::DroppedOldest(evicted)
    }

    /// Removes the first `drop_oldest` message at or after `from` and owes its loss (and the losses it carried) to
    /// the next message of its room: the next one still queued, else the next one pushed. Returns its position.
    fn evict_oldest(s: &mut State, from: usize) -> Option<usize> {
        let pos = from
            + s.queue.range(from..).position(|i| {
                matches!(
                    i,
                    Item::Room {
                        policy: Overflow::DropOldest,
                        ..
                    }
                )
            })?;
        let Some(Item::Room { room, frame, gap, .. }) = s.queue.remove(pos) else {
            unreachable!("position() matched a room message");
        };
        s.bytes -= frame.len();
        s.evictable -= 1;
        s.evictable_bytes -= frame.len();
        let lost = gap.saturating_add(1);
        let next = s.queue.range_mut(pos..).find_map(|i| match i {
            Item::Room { room: r, gap, .. } if same_room(r, &room) => Some(gap),
            _ => None,
        });
        match next {
            Some(g) => *g = g.saturating_add(lost),
            None => s.owe_gap(&room, lost),
        }
        Some(pos)
    }

    /// `latest`: at most one pending value per room, the newest. It replaces the room's queued value in place, or
    /// its parked value; with neither, it is queued if it fits and parked if not. It never touches another room.
    fn push_latest(&self, s: &mut State, room: &Arc<str>, frame: Frame) -> Pushed {
        let len = frame.len();
        if len > self.max_bytes {
            // Larger than the whole queue: it could never be delivered. Lost, and told like any other loss.
            s.owe_gap(room, 1);
            return Pushed::DroppedNewest;
        }
        let gap = s.take_gap(room);
        if s.latest_queued > 0
            && let Some(pos) = s
                .queue
                .iter()
                .position(|i| matches!(i, Item::Room { room: r, policy: Overflow::Latest, .. } if same_room(r, room)))
        {
            return self.replace_queued(s, pos, frame, gap);
        }
        if let Some(p) = s.parked.iter_mut().find(|p| same_room(&p.room, room)) {
            p.frame = frame;
            p.gap = p.gap.saturating_add(gap);
            return Pushed::Conflated;
        }
        let item = Item::Room {
            room: room.clone(),
            frame,
            gap,
            policy: Overflow::Latest,
        };
        if self.fits(s, len) {
            self.enqueue(s, item);
            return Pushed::Queued;
        }
        let Item::Room { room, frame, gap, .. } = item else {
            unreachable!("built as a room message above");
        };
        s.parked.push_back(Parked { room, frame, gap });
        Pushed::Parked
    }

    /// Replaces the `latest` value queued at `pos`. Superseded values get no gap notice, but the drops owed before
    /// the new value (`gap`) add to those owed before the old one.
    fn replace_queued(&self, s: &mut State, pos: usize, frame: Frame, gap: u64) -> Pushed {
        let (old_len, len) = (s.queue[pos].len(), frame.len());
        if s.bytes - old_len + len <= self.max_bytes {
            s.bytes = s.bytes - old_len + len;
            if let Item::Room { frame: f, gap: g, .. } = &mut s.queue[pos] {
                *f = frame;
                *g = g.saturating_add(gap);
            }
            return Pushed::Conflated;
        }
        // The newer value is larger than the room left: the older one goes (superseded), the newer one is parked.
        if let Some(Item::Room { room, gap: old_gap, .. }) = s.queue.remove(pos) {
            s.bytes -= old_len;
            s.latest_queued -= 1;
            s.parked.push_back(Parked {
                room,
                frame,
                gap: old_gap.saturating_add(gap),
            });
        }
        Pushed::Conflated
    }

    /// Moves parked `latest` values into the queue, longest parked first, while they fit. Called when the writer has
    /// just emptied the queue, so at least the first one fits.
    fn unpark(&self, s: &mut State) {
        while let Some(p) = s.parked.front()
            && self.fits(s, p.frame.len())
            && let Some(p) = s.parked.pop_front()
        {
            self.enqueue(s, p.into_item());
        }
    }

    /// Queues a reply to the client, waiting for space if the queue is full. Waiting here is the inbound
    /// backpressure: the reader stops reading from a client that does not read its replies, and `write_timeout`
    /// eventually closes it. Returns false if the connection is closing.
    pub async fn push_control(&self, frame: Frame) -> bool {
        loop {
            let space = self.space.notified();
            // Before looking: a batch taken after the look then wakes this wait (it was made before the flag).
            self.space_wanted.store(true, std::sync::atomic::Ordering::SeqCst);
            {
                let mut s = self.state.lock();
                if s.close.is_some() {
                    return false;
                }
                // A control frame is always admitted into an empty queue, whatever its size.
                let first = s.queue.is_empty();
                if first || self.fits(&s, frame.len()) {
                    self.enqueue(&mut s, Item::Control(frame));
                    drop(s);
                    if first {
                        self.wake_writer.wake();
                    }
                    return true;
                }
            }
            space.await;
        }
    }

    /// Queues a control frame only if it fits now, never waiting: for the welcome, and for notices a room task sends
    /// to its members (`left`), which must not wait on one slow client. Returns whether it was queued.
    pub fn try_push_control(&self, frame: Frame) -> bool {
        let mut s = self.state.lock();
        if s.close.is_some() || !self.fits(&s, frame.len()) {
            return false;
        }
        let first = s.queue.is_empty();
        self.enqueue(&mut s, Item::Control(frame));
        drop(s);
        if first {
            self.wake_writer.wake();
        }
        true
    }

    /// Queues a room change for the connection's task and wakes it; false (nothing queued) when `max` are already
    /// waiting or the connection is closing.
    pub fn push_directive(&self, directive: Directive, max: usize) -> bool {
        {
            let mut s = self.state.lock();
            if s.close.is_some() || s.directives.len() >= max {
                return false;
            }
            s.directives.push_back(directive);
            self.has_directives.store(true, std::sync::atomic::Ordering::Release);
        }
        self.wake_writer.wake();
        true
    }

    /// The oldest waiting room change, if any (one atomic load while there is none).
    pub fn take_directive(&self) -> Option<Directive> {
        if !self.has_directives.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let mut s = self.state.lock();
        let next = s.directives.pop_front();
        if s.directives.is_empty() {
            self.has_directives.store(false, std::sync::atomic::Ordering::Release);
            s.directives = VecDeque::new();
        }
        next
    }

    /// Asks the writer to close the connection. The first request wins.
    pub fn close(&self, request: CloseRequest) {
        {
            let mut s = self.state.lock();
            if s.close.is_none() {
                s.close = Some(request);
            }
        }
        self.wake_writer.wake();
        self.space.notify_waiters();
    }

    /// The close request, if any.
    pub fn close_request(&self) -> Option<CloseRequest> {
        self.state.lock().close.clone()
    }

    /// Moves everything queued into `batch` (which should be empty) and returns the close request if one is set;
    /// `Pending` (with the caller's waker registered) while there is nothing to do. The queue and the batch swap
    /// their storage. Parked
    /// `latest` values then move into the emptied queue, for the next batch; a graceful close (`flush_queued`) hands
    /// them over at once, after the queue.
    /// Also returns when the batch's oldest item was queued (for the delivery-time histogram; one clock read per batch).
    pub fn poll_batch(
        &self,
        cx: &mut std::task::Context<'_>,
        batch: &mut VecDeque<Item>,
    ) -> std::task::Poll<(Option<CloseRequest>, Option<tokio::time::Instant>)> {
        // Registered before looking, so a push after the look wakes us.
        self.wake_writer.register(cx.waker());
        let mut guard = self.state.lock();
        let s = &mut *guard;
        if let Some(close) = s.close.clone() {
            if close.flush_queued {
                batch.append(&mut s.queue);
                batch.extend(s.parked.drain(..).map(Parked::into_item));
            }
            s.queue = VecDeque::new();
            s.parked = VecDeque::new();
            s.queue_taken();
            return std::task::Poll::Ready((Some(close), s.batch_oldest.take()));
        }
        if s.queue.is_empty() {
            // Not reached while the invariants hold (a value is parked only behind a non-empty queue), but a
            // parked value must never wait for a push that may not come.
            self.unpark(s);
        }
        if s.queue.is_empty() {
            // Nothing more to write: the connection is idle, so neither the writer's batch nor the queue keeps
            // storage (a busy writer always finds more queued and swaps instead, allocating nothing per batch).
            if batch.is_empty() && batch.capacity() > 0 {
                *batch = VecDeque::new();
            }
            if s.queue.capacity() > 0 {
                s.queue = VecDeque::new();
            }
            if s.parked.capacity() > 0 && s.parked.is_empty() {
                s.parked = VecDeque::new();
            }
            return std::task::Poll::Pending;
        }
        // The writer's drained batch becomes the queue: a busy connection allocates no queue storage per batch (the
        // writer gives back storage that grew for a burst, and an idle connection's at its heartbeat).
        if batch.is_empty() {
            std::mem::swap(&mut s.queue, batch);
        } else {
            batch.append(&mut s.queue);
        }
        s.queue_taken();
        let queued_at = s.batch_oldest.take();
        self.unpark(s);
        drop(guard);
        if self.space_wanted.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.space.notify_waiters();
        }
        std::task::Poll::Ready((None, queued_at))
    }

    /// What a closed outbox still hands over, without waiting: everything queued (and parked) if the close request
    /// says to flush it, nothing otherwise. The connection calls it once, when it writes its close.
    pub fn take_remaining(&self, batch: &mut VecDeque<Item>) {
        let mut guard = self.state.lock();
        let s = &mut *guard;
        if s.close.as_ref().is_some_and(|c| c.flush_queued) {
            batch.append(&mut s.queue);
            batch.extend(s.parked.drain(..).map(Parked::into_item));
        }
        s.queue = VecDeque::new();
        s.parked = VecDeque::new();
        s.queue_taken();
    }

    /// [`Outbox::poll_batch`] as a future (tests, the model).
    pub async fn next_batch(&self, batch: &mut VecDeque<Item>) -> Option<CloseRequest> {
        std::future::poll_fn(|cx| self.poll_batch(cx, batch)).await.0
    }

    /// Gives back the queue's storage if nothing is queued (the writer calls it when the connection is idle, at its
    /// heartbeat), so storage that grew for a burst does not stay for the connection's life.
    pub fn shrink_if_idle(&self) {
        let mut s = self.state.lock();
        if s.queue.is_empty() && s.queue.capacity() > 0 {
            s.queue = VecDeque::new();
        }
        if s.parked.is_empty() && s.parked.capacity() > 0 {
            s.parked = VecDeque::new();
        }
        if s.gaps.is_empty() && s.gaps.capacity() > 0 {
            s.gaps = HashMap::new();
        }
    }

    /// Queue storage held, in items (tests).
    pub fn capacity(&self) -> usize {
        let s = self.state.lock();
        s.queue.capacity() + s.parked.capacity()
    }

    /// Current depth of the queue (messages, bytes); parked `latest` values are not in it.
    pub fn depth(&self) -> (usize, usize) {
        let s = self.state.lock();
        (s.queue.len(), s.bytes)
    }

    /// Forgets a room the connection left: its pending gap count and its parked value (never delivered after the
    /// leave). Messages of it already queued are still written, before the leave's ack, as they are: they are
    /// re-marked `disconnect`, which no push acts on, so that if the client joins the room again, a push for the new
    /// membership neither replaces (`latest`) nor evicts (`drop_oldest`) them and no loss crosses from one membership
    /// to the next. Runs once per leave, not per message, so the scan is affordable.
    pub fn forget_room(&self, room: &str) {
        let mut guard = self.state.lock();
        let s = &mut *guard;
        s.gaps.remove(room);
        s.parked.retain(|p| &*p.room != room);
        for item in s.queue.iter_mut() {
            if let Item::Room {
                room: r, frame, policy, ..
            } = item
                && &**r == room
            {
                match policy {
                    Overflow::DropOldest => {
                        s.evictable -= 1;
                        s.evictable_bytes -= frame.len();
                    }
                    Overflow::Latest => s.latest_queued -= 1,
                    Overflow::Disconnect | Overflow::DropNewest => {}
                }
                *policy = Overflow::Disconnect;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> Frame {
        Frame::text(s)
    }

    async fn drain(o: &Outbox) -> Vec<(String, u64)> {
        let mut b = VecDeque::new();
        o.next_batch(&mut b).await;
        b.into_iter()
            .map(|i| match i {
                Item::Control(c) => (c.to_string(), 0),
                Item::Room { frame, gap, .. } => (frame.to_string(), gap),
            })
            .collect()
    }

    #[tokio::test]
    async fn disconnect_policy_closes_on_overflow() {
        let o = Outbox::new(2, 1000);
        let r: Arc<str> = "r".into();
        assert_eq!(o.push_room(&r, f("1"), Overflow::Disconnect), Pushed::Queued);
        assert_eq!(o.push_room(&r, f("2"), Overflow::Disconnect), Pushed::Queued);
        assert_eq!(o.push_room(&r, f("3"), Overflow::Disconnect), Pushed::Overflowed);
        assert_eq!(o.close_request().unwrap().code, 4008);
        assert_eq!(o.push_room(&r, f("4"), Overflow::Disconnect), Pushed::Closed);
    }

    #[tokio::test]
    async fn drop_newest_reports_gap_on_next() {
        let o = Outbox::new(2, 1000);
        let r: Arc<str> = "r".into();
        for i in 0..5 {
            o.push_room(&r, f(&i.to_string()), Overflow::DropNewest);
        }
        assert_eq!(drain(&o).await, vec![("0".into(), 0), ("1".into(), 0)]);
        o.push_room(&r, f("5"), Overflow::DropNewest);
        assert_eq!(drain(&o).await, vec![("5".into(), 3)]);
    }

    #[tokio::test]
    async fn drop_oldest_keeps_newest_and_order() {
        let o = Outbox::new(2, 1000);
        let r: Arc<str> = "r".into();
        for i in 0..5 {
            o.push_room(&r, f(&i.to_string()), Overflow::DropOldest);
        }
        assert_eq!(drain(&o).await, vec![("3".into(), 3), ("4".into(), 0)]);
    }

    #[tokio::test]
    async fn latest_conflates_per_room() {
        let o = Outbox::new(10, 1000);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        for i in 0..5 {
            o.push_room(&a, f(&format!("a{i}")), Overflow::Latest);
            o.push_room(&b, f(&format!("b{i}")), Overflow::Latest);
        }
        let got: Vec<String> = drain(&o).await.into_iter().map(|x| x.0).collect();
        assert_eq!(got, vec!["a4", "b4"]);
    }

    #[tokio::test]
    async fn byte_bound_applies() {
        let o = Outbox::new(100, 10);
        let r: Arc<str> = "r".into();
        assert_eq!(o.push_room(&r, f("123456"), Overflow::DropNewest), Pushed::Queued);
        assert_eq!(
            o.push_room(&r, f("123456"), Overflow::DropNewest),
            Pushed::DroppedNewest
        );
        assert_eq!(o.depth(), (1, 6));
    }

    /// Issue 8 finding 8: `drop_oldest` evicted the head of the queue whatever its room, so a `disconnect` room lost a
    /// message and got a gap notice.
    #[tokio::test]
    async fn drop_oldest_never_evicts_another_policys_message() {
        let o = Outbox::new(2, 1000);
        let (chat, feed): (Arc<str>, Arc<str>) = ("chat".into(), "feed".into());
        assert_eq!(o.push_room(&chat, f("c1"), Overflow::Disconnect), Pushed::Queued);
        assert_eq!(o.push_room(&feed, f("f1"), Overflow::DropOldest), Pushed::Queued);
        assert_eq!(
            o.push_room(&feed, f("f2"), Overflow::DropOldest),
            Pushed::DroppedOldest(1)
        );
        assert_eq!(drain(&o).await, vec![("c1".into(), 0), ("f2".into(), 1)]);
        // A queue full of another policy's messages: the new one is dropped, nothing queued is touched.
        o.push_room(&chat, f("c2"), Overflow::Disconnect);
        o.push_room(&chat, f("c3"), Overflow::Disconnect);
        assert_eq!(o.push_room(&feed, f("f3"), Overflow::DropOldest), Pushed::DroppedNewest);
        assert_eq!(drain(&o).await, vec![("c2".into(), 0), ("c3".into(), 0)]);
        assert!(o.close_request().is_none());
    }

    /// Issue 8 finding 8: with the queue full of other rooms' messages, `latest` dropped the newest value, so a ticker
    /// that stopped left the client with a stale one.
    #[tokio::test]
    async fn latest_ends_with_its_last_value_when_other_rooms_fill_the_queue() {
        let o = Outbox::new(2, 1000);
        let (chat, ticker): (Arc<str>, Arc<str>) = ("chat".into(), "ticker".into());
        assert_eq!(o.push_room(&ticker, f("t1"), Overflow::Latest), Pushed::Queued);
        assert_eq!(o.push_room(&chat, f("c1"), Overflow::Disconnect), Pushed::Queued);
        assert_eq!(o.push_room(&ticker, f("t2"), Overflow::Latest), Pushed::Conflated);
        let first = drain(&o).await;
        assert_eq!(first, vec![("t2".into(), 0), ("c1".into(), 0)]);
        o.push_room(&chat, f("c2"), Overflow::Disconnect);
        o.push_room(&chat, f("c3"), Overflow::Disconnect);
        // The queue is full of chat messages: t3 then t4 wait outside it, t4 replacing t3.
        assert_eq!(o.push_room(&ticker, f("t3"), Overflow::Latest), Pushed::Parked);
        assert_eq!(o.push_room(&ticker, f("t4"), Overflow::Latest), Pushed::Conflated);
        assert_eq!(o.depth(), (2, 4));
        let mut seen = drain(&o).await;
        seen.extend(drain(&o).await);
        assert_eq!(
            seen,
            vec![("c2".into(), 0), ("c3".into(), 0), ("t4".into(), 0)],
            "the ticker must end with its last value"
        );
    }

    /// Issue 8 finding 8: when evicting every `drop_oldest` message could not make room (the rest of the queue being
    /// control frames), messages were evicted in vain and the push reported one drop where two happened.
    #[tokio::test]
    async fn drop_counts_are_exact_when_control_frames_fill_the_queue() {
        let o = Outbox::new(10, 10);
        let feed: Arc<str> = "feed".into();
        let dropped = |p: Pushed| match p {
            Pushed::DroppedNewest | Pushed::Conflated => 1,
            Pushed::DroppedOldest(n) => n,
            _ => 0,
        };
        let mut reported = dropped(o.push_room(&feed, f("ab"), Overflow::DropOldest));
        assert!(o.try_push_control(f("cccccccc")));
        reported += dropped(o.push_room(&feed, f("12345"), Overflow::DropOldest));
        let mut seen = drain(&o).await;
        reported += dropped(o.push_room(&feed, f("z"), Overflow::DropOldest));
        seen.extend(drain(&o).await);
        let told: u64 = seen.iter().map(|(_, gap)| gap).sum();
        assert_eq!(
            told, reported,
            "gap notices {seen:?} disagree with the drops the pushes reported"
        );
        assert_eq!(seen, vec![("ab".into(), 0), ("cccccccc".into(), 0), ("z".into(), 1)]);
    }

    /// A room left and joined again: the new membership's values neither replace nor evict what was queued before the
    /// leave, and a parked value of the old membership is not delivered.
    #[tokio::test]
    async fn leaving_a_room_settles_its_queued_messages() {
        let o = Outbox::new(2, 1000);
        let (ticker, chat): (Arc<str>, Arc<str>) = ("ticker".into(), "chat".into());
        o.push_room(&ticker, f("t1"), Overflow::Latest);
        o.push_room(&chat, f("c1"), Overflow::Disconnect);
        o.forget_room("ticker");
        assert_eq!(o.push_room(&ticker, f("t2"), Overflow::Latest), Pushed::Parked);
        assert_eq!(drain(&o).await, vec![("t1".into(), 0), ("c1".into(), 0)]);
        assert_eq!(drain(&o).await, vec![("t2".into(), 0)]);
        o.push_room(&chat, f("c2"), Overflow::Disconnect);
        o.push_room(&chat, f("c3"), Overflow::Disconnect);
        assert_eq!(o.push_room(&ticker, f("t3"), Overflow::Latest), Pushed::Parked);
        o.forget_room("ticker");
        assert_eq!(drain(&o).await, vec![("c2".into(), 0), ("c3".into(), 0)]);
        let mut batch = VecDeque::new();
        assert!(
            futures_util::FutureExt::now_or_never(o.next_batch(&mut batch)).is_none(),
            "parked value of a left room delivered: {batch:?}"
        );
    }

    #[tokio::test]
    async fn control_waits_for_space() {
        let o = Arc::new(Outbox::new(1, 1000));
        assert!(o.push_control(f("a")).await);
        let o2 = o.clone();
        let waiter = tokio::spawn(async move { o2.push_control(f("b")).await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        assert_eq!(drain(&o).await.len(), 1);
        assert!(waiter.await.unwrap());
    }
}
