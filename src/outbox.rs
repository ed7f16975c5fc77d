//! The one bounded queue between the world and a connection's writer task, with the overflow policies of
//! `docs/backpressure.md`.
//!
//! Producers (room fan-out tasks, the connection's own reader) call [`Outbox::push_room`] / [`Outbox::push_control`];
//! neither ever awaits the client. The writer takes everything queued in one go ([`Outbox::next_batch`]), feeds it to
//! the socket and flushes once, so a burst costs one syscall rather than one per frame.
//!
//! Why a `VecDeque` behind a mutex rather than a `tokio::mpsc` channel: `drop_oldest` must remove from the head and
//! `latest` must replace a queued message in place, which a channel cannot do from the producer side. The lock is
//! per connection and held for a handful of instructions (no allocation, no I/O inside), so the fan-out task and the
//! writer are the only two parties and contention is negligible; the writer swaps the whole queue out under one lock.
//!
//! Bounds: at most `limits.max_pending_messages` entries and `limits.max_pending_bytes` bytes of frames. The `gaps`
//! map holds at most one entry per joined room (`rooms.max_rooms_per_connection`).

use std::{collections::HashMap, collections::VecDeque, sync::Arc};

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::config::Overflow;

/// What is queued for the writer.
#[derive(Debug)]
pub enum Item {
    /// A reply to the client itself (ack, error, pong, notices): never dropped by a room policy.
    Control(Utf8Bytes),
    /// A room message, shared by every recipient of the same NATS message.
    Room {
        /// Room name (shared `Arc`, no allocation per recipient).
        room: Arc<str>,
        /// The pre-built frame.
        frame: Utf8Bytes,
        /// Messages of this room dropped just before this one; the writer sends a `gap` notice first.
        gap: u64,
    },
}

impl Item {
    fn len(&self) -> usize {
        match self {
            Item::Control(f) | Item::Room { frame: f, .. } => f.len(),
        }
    }
}

/// Why the writer must stop, set by [`Outbox::close`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseRequest {
    /// WebSocket close code (see `protocol::close`).
    pub code: u16,
    /// Close reason (≤ 123 bytes).
    pub reason: &'static str,
    /// Write what is queued before the close frame (graceful) or discard it (slow consumer).
    pub flush_queued: bool,
}

/// Outcome of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued.
    Queued,
    /// Queued, replacing an older pending message of the same room (`latest`).
    Conflated,
    /// Queued after dropping this many older pending room messages (`drop_oldest`).
    DroppedOldest(u64),
    /// Not queued: the queue is full (`drop_newest`).
    DroppedNewest,
    /// Not queued: the queue is full and the policy is `disconnect`; the outbox is now closed with 4008.
    Overflowed,
    /// Not queued: the connection is closing.
    Closed,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Item>,
    bytes: usize,
    /// Dropped counts of rooms that have no message queued yet to carry them.
    gaps: HashMap<Arc<str>, u64>,
    close: Option<CloseRequest>,
    /// Highest queue depth seen (messages), for metrics.
    high_water: usize,
}

/// Per-connection bounded outbound queue. Shared (`Arc`) by the connection's tasks and every room it is in.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    /// Wakes the writer when something was queued or a close was requested.
    wake_writer: Notify,
    /// Wakes producers waiting in [`Outbox::push_control`] when the writer took a batch.
    space: Notify,
    max_messages: usize,
    max_bytes: usize,
}

impl Outbox {
    /// A queue bounded to `max_messages` entries and `max_bytes` bytes.
    pub fn new(max_messages: usize, max_bytes: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            wake_writer: Notify::new(),
            space: Notify::new(),
            max_messages,
            max_bytes,
        }
    }

    fn fits(&self, s: &State, len: usize) -> bool {
        s.queue.len() < self.max_messages && s.bytes + len <= self.max_bytes
    }

    fn enqueue(&self, s: &mut State, item: Item) {
        s.bytes += item.len();
        s.queue.push_back(item);
        s.high_water = s.high_water.max(s.queue.len());
    }

    /// Queues a room message under `policy`. Never blocks.
    pub fn push_room(&self, room: &Arc<str>, frame: Utf8Bytes, policy: Overflow) -> Pushed {
        let len = frame.len();
        let outcome = {
            let mut s = self.state.lock();
            if s.close.is_some() {
                return Pushed::Closed;
            }
            if policy == Overflow::Latest {
                // Conflation: at most one pending message per `latest` room.
                if let Some(pos) = s
                    .queue
                    .iter()
                    .position(|i| matches!(i, Item::Room { room: r, .. } if r == room))
                {
                    let old_len = s.queue[pos].len();
                    if s.bytes - old_len + len <= self.max_bytes {
                        s.bytes = s.bytes - old_len + len;
                        // No gap notice: under `latest` superseded values are meant to disappear.
                        if let Item::Room { frame: f, .. } = &mut s.queue[pos] {
                            *f = frame;
                        }
                        drop(s);
                        return Pushed::Conflated;
                    }
                }
            }
            if self.fits(&s, len) {
                let gap = s.gaps.remove(room).unwrap_or(0);
                self.enqueue(
                    &mut s,
                    Item::Room {
                        room: room.clone(),
                        frame,
                        gap,
                    },
                );
                Pushed::Queued
            } else {
                match policy {
                    Overflow::Disconnect => {
                        s.close = Some(CloseRequest {
                            code: crate::protocol::close::SLOW_CONSUMER,
                            reason: "slow consumer",
                            flush_queued: false,
                        });
                        Pushed::Overflowed
                    }
                    Overflow::DropNewest | Overflow::Latest => {
                        *s.gaps.entry(room.clone()).or_insert(0) += 1;
                        return Pushed::DroppedNewest;
                    }
                    Overflow::DropOldest => {
                        // Drop room messages from the head until the new one fits; control frames stay.
                        let mut freed = 0u64;
                        while !self.fits(&s, len) {
                            let Some(pos) = s.queue.iter().position(|i| matches!(i, Item::Room { .. })) else {
                                break;
                            };
                            if let Some(Item::Room {
                                room: old_room,
                                frame: old,
                                gap,
                            }) = s.queue.remove(pos)
                            {
                                s.bytes -= old.len();
                                // Carry the loss (and any loss it carried) to the next queued message of that room,
                                // or to the next one pushed.
                                let lost = gap + 1;
                                let next = s.queue.iter_mut().skip(pos).find_map(|i| match i {
                                    Item::Room { room: r, gap, .. } if *r == old_room => Some(gap),
                                    _ => None,
                                });
                                match next {
                                    Some(g) => *g += lost,
                                    None => *s.gaps.entry(old_room).or_insert(0) += lost,
                                }
                                freed += 1;
                            }
                        }
                        if !self.fits(&s, len) {
                            *s.gaps.entry(room.clone()).or_insert(0) += 1;
                            return Pushed::DroppedNewest;
                        }
                        let gap = s.gaps.remove(room).unwrap_or(0);
                        self.enqueue(
                            &mut s,
                            Item::Room {
                                room: room.clone(),
                                frame,
                                gap,
                            },
                        );
                        if freed > 0 {
                            Pushed::DroppedOldest(freed)
                        } else {
                            Pushed::Queued
                        }
                    }
                }
            }
        };
        self.wake_writer.notify_one();
        if outcome == Pushed::Overflowed {
            // The reader may be waiting in `push_control`: it must see the close, or it waits for space forever
            // (the writer discards the queue without waking it) and the connection's task never ends.
            self.space.notify_waiters();
        }
        outcome
    }

    /// Queues a reply to the client, waiting for space if the queue is full. Waiting here is the inbound
    /// backpressure: the reader stops reading from a client that does not read its replies, and `write_timeout`
    /// eventually closes it. Returns false if the connection is closing.
    pub async fn push_control(&self, frame: Utf8Bytes) -> bool {
        loop {
            let space = self.space.notified();
            {
                let mut s = self.state.lock();
                if s.close.is_some() {
                    return false;
                }
                // A control frame is always admitted into an empty queue, whatever its size.
                if s.queue.is_empty() || self.fits(&s, frame.len()) {
                    self.enqueue(&mut s, Item::Control(frame));
                    drop(s);
                    self.wake_writer.notify_one();
                    return true;
                }
            }
            space.await;
        }
    }

    /// Queues a control frame only if it fits now (used for notices from other tasks). Returns whether it was queued.
    pub fn try_push_control(&self, frame: Utf8Bytes) -> bool {
        let mut s = self.state.lock();
        if s.close.is_some() || !self.fits(&s, frame.len()) {
            return false;
        }
        self.enqueue(&mut s, Item::Control(frame));
        drop(s);
        self.wake_writer.notify_one();
        true
    }

    /// Asks the writer to close the connection. The first request wins.
    pub fn close(&self, request: CloseRequest) {
        {
            let mut s = self.state.lock();
            if s.close.is_none() {
                s.close = Some(request);
            }
        }
        self.wake_writer.notify_one();
        self.space.notify_waiters();
    }

    /// The close request, if any.
    pub fn close_request(&self) -> Option<CloseRequest> {
        self.state.lock().close.clone()
    }

    /// Moves everything queued into `batch` (which should be empty) and returns the close request if one is set.
    /// Waits until there is something to do.
    pub async fn next_batch(&self, batch: &mut VecDeque<Item>) -> Option<CloseRequest> {
        loop {
            let woken = self.wake_writer.notified();
            {
                let mut s = self.state.lock();
                if let Some(close) = s.close.clone() {
                    if close.flush_queued {
                        std::mem::swap(&mut s.queue, batch);
                    } else {
                        s.queue.clear();
                    }
                    s.bytes = 0;
                    return Some(close);
                }
                if !s.queue.is_empty() {
                    std::mem::swap(&mut s.queue, batch);
                    s.bytes = 0;
                    drop(s);
                    self.space.notify_waiters();
                    return None;
                }
            }
            woken.await;
        }
    }

    /// Current depth (messages, bytes).
    pub fn depth(&self) -> (usize, usize) {
        let s = self.state.lock();
        (s.queue.len(), s.bytes)
    }

    /// Highest depth seen, in messages.
    pub fn high_water(&self) -> usize {
        self.state.lock().high_water
    }

    /// Forgets the pending gap count of a room the connection left.
    pub fn forget_room(&self, room: &str) {
        self.state.lock().gaps.remove(room);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> Utf8Bytes {
        Utf8Bytes::from(s.to_string())
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
