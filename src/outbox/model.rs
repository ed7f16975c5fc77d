//! The outbox checked against a plain model of `docs/backpressure.md`, for several rooms with mixed policies sharing
//! one queue. [`fuzz_ops`] decodes a byte string into a queue configuration and a run of operations (room pushes,
//! control pushes, drains, leaves, closes), applies each to a real [`Outbox`] and to [`Model`], and asserts:
//!
//! - the outbox and the model agree on every outcome, every batch, and the whole state after every operation;
//! - bounds: the queue never holds more than `max_messages` entries nor more than `max_bytes` bytes (a control frame
//!   larger than that only alone), parked values are at most one per `latest` room, each at most `max_bytes`;
//! - per room: messages arrive in the order pushed, each accepted message is delivered unless its own policy dropped
//!   it (`drop_oldest`) or superseded it (`latest`) or the connection closed, each gap notice counts exactly the
//!   messages lost since the room's previous delivered message, and pushed = delivered + dropped + conflated (+ those
//!   discarded by a close or a leave);
//! - a policy never acts on another policy's rooms: `disconnect` and `drop_newest` rooms lose nothing once queued;
//! - a `latest` room ends with its last value delivered after the final drain;
//! - the drop counts the pushes report (what `fan_out` adds to `roomwire_dropped_total`, per policy) equal the gap
//!   notices plus the drops still owed, exactly.
//!
//! The property test below runs it on random inputs; `fuzz/fuzz_targets/outbox.rs` runs it under libFuzzer.

use std::{collections::HashMap, collections::VecDeque, sync::Arc};

use crate::frame::Frame;
use futures_util::FutureExt;

use super::{CloseRequest, Item, Outbox, Pushed};
use crate::outbox::Overflow;

/// Rooms in a run: enough for two rooms of one policy next to rooms of the others.
const ROOMS: usize = 5;

/// One message in the model: a room message (`room` is an index) or a control frame (`room` is `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    room: Option<usize>,
    frame: String,
    gap: u64,
    /// Its room was left after it was queued: no push acts on it any more, it is just written.
    settled: bool,
}

/// The documented semantics, written as plainly as possible: a `Vec` for the queue, a `Vec` for the parked `latest`
/// values, sizes recomputed by summing, `drop_oldest` tried on a copy and kept only if the new message then fits.
#[derive(Debug, Clone)]
pub struct Model {
    max_messages: usize,
    max_bytes: usize,
    policy: [Overflow; ROOMS],
    queue: Vec<Entry>,
    parked: Vec<Entry>,
    owed: [u64; ROOMS],
    close: Option<CloseRequest>,
}

impl Model {
    fn new(max_messages: usize, max_bytes: usize, policy: [Overflow; ROOMS]) -> Self {
        Self {
            max_messages,
            max_bytes,
            policy,
            queue: Vec::new(),
            parked: Vec::new(),
            owed: [0; ROOMS],
            close: None,
        }
    }

    fn bytes(&self) -> usize {
        self.queue.iter().map(|e| e.frame.len()).sum()
    }

    fn fits(&self, len: usize) -> bool {
        self.queue.len() < self.max_messages && self.bytes() + len <= self.max_bytes
    }

    fn append(&mut self, e: Entry) {
        self.queue.push(e);
    }

    fn append_new(&mut self, room: usize, frame: String) {
        let gap = std::mem::take(&mut self.owed[room]);
        self.append(Entry {
            room: Some(room),
            frame,
            gap,
            settled: false,
        });
    }

    /// The documented semantics of every policy, written out plainly in one place: the model is meant to be read
    /// against docs/backpressure.md line by line, so it is not split the way the real outbox is.
    fn push_room(&mut self, room: usize, frame: String) -> Pushed {
        if self.close.is_some() {
            return Pushed::Closed;
        }
        let len = frame.len();
        if self.policy[room] != Overflow::Latest && self.fits(len) {
            self.append_new(room, frame);
            return Pushed::Queued;
        }
        match self.policy[room] {
            Overflow::Disconnect => {
                self.close = Some(CloseRequest {
                    code: crate::protocol::close::SLOW_CONSUMER,
                    reason: "slow consumer".into(),
                    flush_queued: false,
                });
                Pushed::Overflowed
            }
            Overflow::DropNewest => {
                self.owed[room] += 1;
                Pushed::DroppedNewest
            }
            Overflow::DropOldest => {
                let mut trial = self.clone();
                let mut evicted = 0;
                while !trial.fits(len) {
                    let oldest = trial
                        .queue
                        .iter()
                        .position(|e| !e.settled && e.room.is_some_and(|r| trial.policy[r] == Overflow::DropOldest));
                    let Some(i) = oldest else {
                        self.owed[room] += 1;
                        return Pushed::DroppedNewest;
                    };
                    let old = trial.queue.remove(i);
                    let r = old.room.unwrap_or_default();
                    match trial.queue[i..].iter_mut().find(|e| e.room == Some(r)) {
                        Some(next) => next.gap += old.gap + 1,
                        None => trial.owed[r] += old.gap + 1,
                    }
                    evicted += 1;
                }
                *self = trial;
                self.append_new(room, frame);
                Pushed::DroppedOldest(evicted)
            }
            Overflow::Latest => {
                if len > self.max_bytes {
                    self.owed[room] += 1;
                    return Pushed::DroppedNewest;
                }
                let gap = std::mem::take(&mut self.owed[room]);
                let queued = self.queue.iter().position(|e| e.room == Some(room) && !e.settled);
                if let Some(i) = queued {
                    if self.bytes() - self.queue[i].frame.len() + len <= self.max_bytes {
                        self.queue[i].frame = frame;
                        self.queue[i].gap += gap;
                    } else {
                        let old = self.queue.remove(i);
                        self.parked.push(Entry {
                            frame,
                            gap: old.gap + gap,
                            ..old
                        });
                    }
                    return Pushed::Conflated;
                }
                if let Some(p) = self.parked.iter_mut().find(|p| p.room == Some(room)) {
                    p.frame = frame;
                    p.gap += gap;
                    return Pushed::Conflated;
                }
                let e = Entry {
                    room: Some(room),
                    frame,
                    gap,
                    settled: false,
                };
                if self.fits(len) {
                    self.append(e);
                    Pushed::Queued
                } else {
                    self.parked.push(e);
                    Pushed::Parked
                }
            }
        }
    }

    fn control_entry(frame: String) -> Entry {
        Entry {
            room: None,
            frame,
            gap: 0,
            settled: false,
        }
    }

    fn try_push_control(&mut self, frame: String) -> bool {
        if self.close.is_some() || !self.fits(frame.len()) {
            return false;
        }
        self.append(Self::control_entry(frame));
        true
    }

    /// `None`: it would wait for space.
    fn push_control(&mut self, frame: String) -> Option<bool> {
        if self.close.is_some() {
            return Some(false);
        }
        if !self.queue.is_empty() && !self.fits(frame.len()) {
            return None;
        }
        self.append(Self::control_entry(frame));
        Some(true)
    }

    fn unpark(&mut self) {
        while !self.parked.is_empty() && self.fits(self.parked[0].frame.len()) {
            let p = self.parked.remove(0);
            self.append(p);
        }
    }

    /// `None`: it would wait for something to do.
    fn next_batch(&mut self) -> Option<(Vec<Entry>, Option<CloseRequest>)> {
        if let Some(close) = self.close.clone() {
            let mut batch = std::mem::take(&mut self.queue);
            let parked = std::mem::take(&mut self.parked);
            if close.flush_queued {
                batch.extend(parked);
            } else {
                batch.clear();
            }
            return Some((batch, Some(close)));
        }
        if self.queue.is_empty() {
            self.unpark();
        }
        if self.queue.is_empty() {
            return None;
        }
        let batch = std::mem::take(&mut self.queue);
        self.unpark();
        Some((batch, None))
    }

    fn close(&mut self, request: CloseRequest) {
        if self.close.is_none() {
            self.close = Some(request);
        }
    }

    fn forget_room(&mut self, room: usize) {
        self.owed[room] = 0;
        self.parked.retain(|p| p.room != Some(room));
        for e in self.queue.iter_mut().filter(|e| e.room == Some(room)) {
            e.settled = true;
        }
    }
}

/// Reads the fuzzer's bytes; zeros once they run out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        *first
    }
}

fn policy_of(b: u8) -> Overflow {
    [
        Overflow::Disconnect,
        Overflow::DropOldest,
        Overflow::DropNewest,
        Overflow::Latest,
    ][usize::from(b % 4)]
}

/// What happened to one room push, for the checks at the end.
#[derive(Debug)]
struct PushRecord {
    room: usize,
    /// Which membership of the room (a leave starts a new one).
    term: u32,
    outcome: Pushed,
    /// The gap notice it was delivered with, once delivered.
    delivered: Option<u64>,
}

/// Runs one decoded scenario against the outbox and the model.
struct Harness {
    outbox: Outbox,
    model: Model,
    names: [Arc<str>; ROOMS],
    term: [u32; ROOMS],
    pushes: Vec<PushRecord>,
    /// Drops owed to a room's membership when it was left.
    owed_at_leave: HashMap<(usize, u32), u64>,
    /// Last message delivered per room (order check).
    last_delivered: [Option<usize>; ROOMS],
    controls_admitted: Vec<u64>,
    controls_delivered: Vec<u64>,
    next_control: u64,
    /// A close that discards what is queued happened.
    discarded: bool,
    /// Gap counts carried by the messages that close discarded, by policy: drops the pushes reported that no gap
    /// notice will tell.
    discarded_gaps: [u64; 4],
    closed_seen: bool,
}

impl Harness {
    fn new(max_messages: usize, max_bytes: usize, policy: [Overflow; ROOMS]) -> Self {
        Self {
            outbox: Outbox::new(max_messages, max_bytes),
            model: Model::new(max_messages, max_bytes, policy),
            names: std::array::from_fn(|i| Arc::from(format!("r{i}"))),
            term: [0; ROOMS],
            pushes: Vec::new(),
            owed_at_leave: HashMap::new(),
            last_delivered: [None; ROOMS],
            controls_admitted: Vec::new(),
            controls_delivered: Vec::new(),
            next_control: 0,
            discarded: false,
            discarded_gaps: [0; 4],
            closed_seen: false,
        }
    }

    /// A frame of `len` bytes or a little more, starting with its id in hex (`c` first for control frames).
    fn frame(prefix: &str, id: u64, len: usize) -> String {
        let mut f = format!("{prefix}{id:x}");
        while f.len() < len {
            f.push('.');
        }
        f
    }

    fn push_room(&mut self, room: usize, len: usize, fresh_arc: bool) {
        let id = self.pushes.len() as u64;
        let frame = Self::frame("", id, len);
        // Fan-out passes the room's own `Arc`; a leave/join or another caller may pass an equal one.
        let name = if fresh_arc {
            Arc::from(&*self.names[room])
        } else {
            self.names[room].clone()
        };
        let got = self
            .outbox
            .push_room(&name, Frame::text(&frame), self.model.policy[room]);
        let want = self.model.push_room(room, frame);
        assert_eq!(got, want, "push #{id} to room {room}");
        if got == Pushed::Overflowed {
            self.discard();
        }
        self.pushes.push(PushRecord {
            room,
            term: self.term[room],
            outcome: got,
            delivered: None,
        });
    }

    fn push_control(&mut self, len: usize, wait_allowed: bool) {
        let id = self.next_control;
        self.next_control += 1;
        let frame = Self::frame("c", id, len);
        let admitted = if wait_allowed {
            let got = self.outbox.push_control(Frame::text(&frame)).now_or_never();
            assert_eq!(got, self.model.push_control(frame), "push_control #{id}");
            got == Some(true)
        } else {
            let got = self.outbox.try_push_control(Frame::text(&frame));
            assert_eq!(got, self.model.try_push_control(frame), "try_push_control #{id}");
            got
        };
        if admitted {
            self.controls_admitted.push(id);
        }
    }

    fn entry_of(&self, item: &Item) -> Entry {
        match item {
            Item::Control(f) => Model::control_entry(f.to_string()),
            Item::Room { room, frame, gap, .. } => Entry {
                room: self.names.iter().position(|n| n == room),
                frame: frame.to_string(),
                gap: *gap,
                settled: false,
            },
        }
    }

    /// Returns false when there was nothing to take.
    fn next_batch(&mut self) -> bool {
        let mut batch = VecDeque::new();
        let got = self.outbox.next_batch(&mut batch).now_or_never();
        let want = self.model.next_batch();
        let Some(close) = got else {
            assert!(want.is_none(), "the writer would wait, the model has {want:?}");
            return false;
        };
        let Some((want_batch, want_close)) = want else {
            panic!("the model would wait, the outbox gave {batch:?}");
        };
        assert_eq!(close, want_close, "close request");
        let mut entries: Vec<Entry> = batch.iter().map(|i| self.entry_of(i)).collect();
        let mut want_batch = want_batch;
        entries
            .iter_mut()
            .chain(want_batch.iter_mut())
            .for_each(|e| e.settled = false);
        assert_eq!(entries, want_batch, "batch");
        if close.is_none() {
            self.check_bounds(batch.len(), batch.iter().map(Item::len).sum(), "batch");
        } else {
            self.closed_seen = true;
        }
        for e in entries {
            self.delivered(e);
        }
        true
    }

    fn delivered(&mut self, e: Entry) {
        let digits = e.frame.trim_end_matches('.');
        let Some(room) = e.room else {
            let id = u64::from_str_radix(digits.strip_prefix('c').unwrap_or(digits), 16).expect("control id");
            self.controls_delivered.push(id);
            return;
        };
        let id = usize::from_str_radix(digits, 16).expect("message id");
        let p = &mut self.pushes[id];
        assert_eq!(p.room, room, "message #{id} delivered as room {room}");
        assert!(p.delivered.is_none(), "message #{id} delivered twice");
        assert!(
            matches!(
                p.outcome,
                Pushed::Queued | Pushed::Parked | Pushed::Conflated | Pushed::DroppedOldest(_)
            ),
            "message #{id} delivered after {:?}",
            p.outcome
        );
        p.delivered = Some(e.gap);
        if let Some(last) = self.last_delivered[room] {
            assert!(last < id, "room {room}: message #{id} after #{last}");
        }
        self.last_delivered[room] = Some(id);
    }

    fn forget_room(&mut self, room: usize) {
        // Drops owed to the room when it is left: in the gaps map, or carried by its parked value (discarded).
        let owed = {
            let s = self.outbox.state.lock();
            // (After a discarding close they are counted in `discarded_gaps` already.)
            let parked = s
                .parked
                .iter()
                .filter(|p| !self.discarded && p.room == self.names[room]);
            let parked = parked.map(|p| p.gap);
            s.gaps.get(&*self.names[room]).copied().unwrap_or(0) + parked.sum::<u64>()
        };
        self.owed_at_leave.insert((room, self.term[room]), owed);
        self.outbox.forget_room(&self.names[room]);
        self.model.forget_room(room);
        self.term[room] += 1;
    }

    fn close(&mut self, flush_queued: bool) {
        let request = CloseRequest {
            code: if flush_queued { 1001 } else { 4008 },
            reason: "test".into(),
            flush_queued,
        };
        if self.model.close.is_none() && !flush_queued {
            self.discard();
        }
        self.outbox.close(request.clone());
        self.model.close(request);
    }

    /// A close that discards the queue was just requested: notes the gap counts the discarded messages carried.
    fn discard(&mut self) {
        self.discarded = true;
        let s = self.outbox.state.lock();
        let parked = s.parked.iter().map(|p| (&p.room, p.gap));
        let queued = s.queue.iter().filter_map(|i| match i {
            Item::Room { room, gap, .. } => Some((room, *gap)),
            Item::Control(_) => None,
        });
        for (room, gap) in queued.chain(parked) {
            let i = self.names.iter().position(|n| n == room).expect("known room");
            self.discarded_gaps[self.model.policy[i] as usize] += gap;
        }
    }

    fn check_bounds(&self, len: usize, bytes: usize, what: &str) {
        let m = &self.model;
        assert!(len <= m.max_messages, "{what}: {len} messages > {}", m.max_messages);
        assert!(
            bytes <= m.max_bytes || len == 1,
            "{what}: {bytes} bytes > {} in {len} messages",
            m.max_bytes
        );
    }

    /// The outbox's whole state equals the model's, and its bounds and counters hold.
    fn check_state(&self) {
        let s = self.outbox.state.lock();
        let queue: Vec<Entry> = s.queue.iter().map(|i| self.entry_of(i)).collect();
        let strip = |v: &[Entry]| {
            v.iter()
                .map(|e| Entry {
                    settled: false,
                    ..e.clone()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(queue, strip(&self.model.queue), "queue");
        let parked: Vec<Entry> = s
            .parked
            .iter()
            .map(|p| {
                self.entry_of(&Item::Room {
                    room: p.room.clone(),
                    frame: p.frame.clone(),
                    gap: p.gap,
                    policy: Overflow::Latest,
                })
            })
            .collect();
        assert_eq!(parked, strip(&self.model.parked), "parked");
        for (i, name) in self.names.iter().enumerate() {
            assert_eq!(
                s.gaps.get(&**name).copied().unwrap_or(0),
                self.model.owed[i],
                "owed to room {i}"
            );
        }
        // Owed counts exist only while positive, one per room at most.
        assert!(s.gaps.values().all(|&g| g > 0), "zero owed count kept");
        assert!(
            s.gaps.keys().all(|k| self.names.contains(k)),
            "owed count of an unknown room"
        );
        assert_eq!(s.close, self.model.close, "close request");
        // Counters kept beside the queue.
        let bytes: usize = s.queue.iter().map(Item::len).sum();
        assert_eq!(s.bytes, bytes, "byte count");
        let of = |p: Overflow| {
            s.queue
                .iter()
                .filter(move |i| matches!(i, Item::Room { policy, .. } if *policy == p))
        };
        assert_eq!(s.evictable, of(Overflow::DropOldest).count(), "evictable count");
        assert_eq!(
            s.evictable_bytes,
            of(Overflow::DropOldest).map(Item::len).sum::<usize>(),
            "evictable bytes"
        );
        assert_eq!(s.latest_queued, of(Overflow::Latest).count(), "latest count");
        // Bounds.
        self.check_bounds(s.queue.len(), s.bytes, "queue");
        let latest_rooms = self.model.policy.iter().filter(|&&p| p == Overflow::Latest).count();
        assert!(
            s.parked.len() <= latest_rooms,
            "{} parked for {latest_rooms} latest rooms",
            s.parked.len()
        );
        for (i, p) in s.parked.iter().enumerate() {
            assert!(p.frame.len() <= self.model.max_bytes, "parked value over max_bytes");
            assert!(
                s.parked.iter().skip(i + 1).all(|q| q.room != p.room),
                "two parked values for one room"
            );
        }
    }

    /// Drains what is left and checks the ledger of every room.
    fn finish(mut self) {
        for _ in 0..=ROOMS + 2 {
            if !self.next_batch() || self.closed_seen {
                break;
            }
            self.check_state();
        }
        if self.model.close.is_none() {
            assert!(!self.next_batch(), "still not drained");
            assert!(self.model.parked.is_empty(), "parked values left after the final drain");
        }
        // Control frames: all admitted ones, in order (a prefix if a close discarded the rest).
        if self.discarded {
            assert!(self.controls_admitted.starts_with(&self.controls_delivered));
        } else {
            assert_eq!(
                self.controls_delivered, self.controls_admitted,
                "control frames lost or reordered"
            );
        }
        let mut reported = [0u64; 4];
        let mut accounted = [0u64; 4];
        for room in 0..ROOMS {
            for term in 0..=self.term[room] {
                self.check_room(room, term, &mut reported, &mut accounted);
            }
        }
        for (a, d) in accounted.iter_mut().zip(self.discarded_gaps) {
            *a += d;
        }
        assert_eq!(
            reported, accounted,
            "drops reported by pushes != gap notices + owed (per policy)"
        );
    }

    /// One membership of one room (long on purpose: one assertion per documented invariant, in the order the docs
    /// state them). Adds its drops as the pushes reported them (`reported`) and as the gap notices and
    /// owed counts show them, plus superseded values (`accounted`), by policy.
    fn check_room(&self, room: usize, term: u32, reported: &mut [u64; 4], accounted: &mut [u64; 4]) {
        let policy = self.model.policy[room];
        let pushes: Vec<&PushRecord> = self
            .pushes
            .iter()
            .filter(|p| p.room == room && p.term == term)
            .collect();
        let left = term < self.term[room];
        let owed = if left {
            self.owed_at_leave[&(room, term)]
        } else {
            self.outbox
                .state
                .lock()
                .gaps
                .get(&*self.names[room])
                .copied()
                .unwrap_or(0)
        };
        let accepted = |p: &PushRecord| {
            matches!(
                p.outcome,
                Pushed::Queued | Pushed::Parked | Pushed::Conflated | Pushed::DroppedOldest(_)
            )
        };
        let mut lost = 0u64;
        let mut gaps = 0u64;
        let mut not_delivered = 0u64;
        let mut conflated = 0u64;
        for p in &pushes {
            let allowed = match policy {
                Overflow::Disconnect => matches!(p.outcome, Pushed::Queued | Pushed::Overflowed | Pushed::Closed),
                Overflow::DropNewest => matches!(p.outcome, Pushed::Queued | Pushed::DroppedNewest | Pushed::Closed),
                Overflow::DropOldest => matches!(
                    p.outcome,
                    Pushed::Queued | Pushed::DroppedOldest(_) | Pushed::DroppedNewest | Pushed::Closed
                ),
                Overflow::Latest => matches!(
                    p.outcome,
                    Pushed::Queued | Pushed::Parked | Pushed::Conflated | Pushed::DroppedNewest | Pushed::Closed
                ),
            };
            assert!(allowed, "room {room} ({policy:?}): outcome {:?}", p.outcome);
            reported[policy as usize] += match p.outcome {
                Pushed::DroppedNewest | Pushed::Conflated => 1,
                Pushed::DroppedOldest(n) => n,
                _ => 0,
            };
            conflated += u64::from(p.outcome == Pushed::Conflated);
            match p.delivered {
                Some(gap) => {
                    assert_eq!(
                        gap, lost,
                        "room {room} ({policy:?}): gap notice {gap}, {lost} lost before it"
                    );
                    gaps += gap;
                    lost = 0;
                }
                None if p.outcome == Pushed::DroppedNewest => lost += 1,
                None if accepted(p) => {
                    not_delivered += 1;
                    // Under drop_oldest an accepted message that never arrived was evicted: a loss.
                    if policy == Overflow::DropOldest {
                        lost += 1;
                    }
                }
                None => {}
            }
        }
        accounted[policy as usize] += gaps + owed + conflated;
        // After the last delivered message, what is lost is owed; a close that discards the queue may also have
        // discarded the message that was to carry it.
        let lost_to_close = |n: u64| if self.discarded { n } else { 0 };
        assert!(
            owed <= lost && owed + lost_to_close(lost) >= lost,
            "room {room} ({policy:?}): owed {owed}, lost {lost}"
        );
        match policy {
            Overflow::Disconnect | Overflow::DropNewest => {
                assert_eq!(
                    not_delivered,
                    lost_to_close(not_delivered),
                    "room {room} ({policy:?}) lost a message"
                );
                if policy == Overflow::Disconnect {
                    assert_eq!(gaps + lost, 0, "room {room}: disconnect reported a loss");
                }
            }
            Overflow::DropOldest => {}
            Overflow::Latest => {
                // Superseded values, plus at most the one pending value a leave or a close discarded.
                let discardable = u64::from(left || self.discarded);
                assert!(
                    conflated <= not_delivered && not_delivered <= conflated + discardable,
                    "room {room} (latest): {not_delivered} not delivered, {conflated} conflated"
                );
                // It ends with its last value.
                if !left
                    && !self.discarded
                    && let Some(last) = pushes.iter().rev().find(|p| accepted(p))
                {
                    assert!(
                        last.delivered.is_some(),
                        "room {room} (latest): last value not delivered"
                    );
                }
            }
        }
    }
}

/// Decodes `data` into a queue configuration and a run of operations, runs it against [`Outbox`] and [`Model`], and
/// panics on any disagreement or broken property (see the module documentation).
pub fn fuzz_ops(data: &[u8]) {
    let mut input = Input(data);
    let max_messages = 1 + usize::from(input.byte() % 6);
    let max_bytes = 8 + usize::from(input.byte() % 100);
    let policy: [Overflow; ROOMS] = std::array::from_fn(|_| policy_of(input.byte()));
    let mut h = Harness::new(max_messages, max_bytes, policy);
    while !input.0.is_empty() {
        let op = input.byte();
        let arg = input.byte();
        let len = usize::from(arg / 8) % 40;
        match op % 16 {
            0..=9 => h.push_room(usize::from(arg) % ROOMS, len, op & 0x80 != 0),
            10 => h.push_control(len, false),
            11 => h.push_control(len, true),
            12..=13 => {
                h.next_batch();
            }
            14 => h.forget_room(usize::from(arg) % ROOMS),
            _ => match arg % 8 {
                0 => h.close(false),
                1 => h.close(true),
                _ => {
                    h.next_batch();
                }
            },
        }
        h.check_state();
    }
    h.finish();
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Random pushes across five rooms with mixed policies, control pushes, drains, leaves and closes.
        #[test]
        fn outbox_agrees_with_its_model(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            super::fuzz_ops(&data);
        }
    }
}
