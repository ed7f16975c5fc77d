//! Room registry and fan-out: exactly one NATS subscription per room per gateway process, created on the first
//! local join and dropped on the last leave, with one fan-out task per room.
//!
//! The hot path is [`fan_out`]: a NATS message becomes one complete WebSocket frame ([`Frame`], header and payload,
//! built once), and each local member gets a reference-counted clone pushed into its [`Outbox`] without awaiting
//! anything; the members' writers put those same bytes on their sockets. A member that cannot keep up is handled by the room's overflow policy inside its own outbox; the others are not delayed.
//!
//! Bounds: at most `rooms.max_rooms` rooms (the map), and each room's member list holds one entry per joined
//! connection (each connection is in at most `rooms.max_rooms_per_connection` rooms). Per user (per address for
//! anonymous clients) at most `rooms.max_rooms_per_user` distinct rooms, and room creations (new NATS subscriptions)
//! at `rooms.room_creations_per_second`: see [`RoomQuota`], charged here on every join and released on every way a
//! member leaves.
//!
//! A room whose subscription ends while it has members (the NATS server refused or removed it, e.g. permissions
//! revoked by a config reload; or the NATS client was closed) is removed at once, and its members are told
//! `{"op":"left","room":..,"reason":"room subscription ended"}`, so no later join is acked for a room with nothing
//! behind it. It is not resubscribed: in async-nats 0.51 a subscription only ends when the server refused or removed
//! it (async-nats itself keeps such a `Subscriber` open and only reports the server's error; `bridge::RoomSub` turns
//! that report into the end of the subscription) or when the client is closed, and in both cases resubscribing would
//! fail the same way. A client that joins again makes a fresh subscription. One window remains: a refusal of a *new*
//! subscription arrives as an event handled on async-nats's event task, which may run just after the round trip
//! that confirms the SUB, so such a join can be acked and then followed at once by `left`.

use std::{collections::HashMap, sync::Arc};

use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

mod hold;

pub use hold::{CatchUp, Hold};

use crate::{
    bridge::{Bridge, BridgeError, HDR_CONN, HDR_ECHO, HDR_GATEWAY},
    config::{Overflow, RoomsConfig},
    deflate::Settings,
    frame::Frame,
    history::History,
    metrics::{Metrics, SlowConsumer},
    outbox::{Outbox, Pushed},
    presence::{Departure, Presence, RoomPresence},
    protocol,
    room_quota::{QuotaError, QuotaKey, RoomQuota},
};

/// One local member of a room: a connection's id, its outbox and whose room budget it draws on.
#[derive(Debug, Clone)]
pub struct Member {
    /// Local connection number (the `<n>` of `<gateway>-<n>`), for echo suppression.
    pub id: u64,
    /// The connection's outbound queue.
    pub outbox: Arc<Outbox>,
    /// The connection's user, or its address if anonymous (`rooms.max_rooms_per_user`, room-creation rate).
    pub key: QuotaKey,
    /// While set and holding, this member's live frames wait here instead of in its outbox: a history room's join
    /// reads the stream first (the ack's sequence, a recovery's missed messages) and must queue those before any
    /// live frame ([`Hold`]).
    pub hold: Option<Arc<Hold>>,
}

/// Reason given to the members of a room whose NATS subscription ended.
pub const ENDED_REASON: &str = "room subscription ended";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Readiness {
    Pending,
    Ready,
    /// The subscription could not be made, or it ended; the room is out of the map for good.
    Failed,
}

/// A room held by this gateway.
#[derive(Debug)]
pub struct Room {
    name: Arc<str>,
    policy: Overflow,
    /// A history room: subscribed to the stream's republished subject, its frames carry `"seq"`.
    history: bool,
    /// The highest sequence fanned out so far (history rooms); written under the members read lock by the room
    /// task, read under the write lock by a join, so a join sees exactly the messages that went out before it.
    last_seq: std::sync::atomic::AtomicU64,
    /// The room's own lock: fan-out reads it for a whole message, joins and leaves write it. It is never taken while
    /// holding the registry's map lock (nor the reverse), so a big room's fan-out never stalls other rooms' joins.
    members: RwLock<Members>,
    ready: watch::Sender<Readiness>,
    cancel: CancellationToken,
    /// The room's presence (`crate::presence`), when `presence.rooms` covers it: told of every join and leave under
    /// the members lock, its task (writer and watch) ends with `cancel`.
    presence: Option<Arc<RoomPresence>>,
}

impl Room {
    /// The room's overflow policy.
    pub fn policy(&self) -> Overflow {
        self.policy
    }

    /// The room's name, shared by every frame queued for it.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Whether the room still has its NATS subscription. False once it ended: a connection holding this room must
    /// not treat itself as joined (it was told `left`).
    pub fn is_live(&self) -> bool {
        *self.ready.borrow() == Readiness::Ready
    }
}

/// Why a join failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The subscription could not be made (NATS down or slow).
    #[error(transparent)]
    Nats(#[from] BridgeError),
    /// This gateway holds `rooms.max_rooms` rooms already.
    #[error("this gateway holds the maximum number of rooms")]
    Capacity,
    /// Over the user's (or address's) `rooms.max_rooms_per_user` or room-creation rate.
    #[error(transparent)]
    Quota(#[from] QuotaError),
}

/// One connection's place in one room, from the moment [`Rooms::join`] registered it. Dropping it is the only way to
/// leave: it takes the member out of this exact room instance (a newer room of the same name is never touched),
/// gives back the user's room quota, and drops the room with its NATS subscription when it was the last member. So
/// a member cannot outlive its connection whichever way that ends: a `leave`, the connection's end, a join cancelled
/// while it waited for the subscription or for a history read, a panic.
#[derive(Debug)]
pub struct Membership {
    rooms: Arc<Rooms>,
    room: Arc<Room>,
    id: u64,
    /// Why the member goes when this guard drops: `Disconnect` unless [`Membership::leave`] said otherwise.
    reason: Departure,
}

impl Membership {
    /// The room joined.
    pub fn room(&self) -> &Arc<Room> {
        &self.room
    }

    /// Leaves the room because the client asked to (presence reports `leave`, not `disconnect`).
    pub fn leave(mut self) {
        self.reason = Departure::Leave;
    }
}

impl std::ops::Deref for Membership {
    type Target = Room;

    fn deref(&self) -> &Room {
        &self.room
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        // Nothing to do when the room already let its members go (`end_room`).
        self.rooms.detach(&self.room, self.id, self.reason);
    }
}

/// A room's members, and whether it is closing (it emptied or its subscription ended): a closing room takes no new
/// member, and a join that finds it still in the map retries until the closer has removed it.
#[derive(Debug, Default)]
struct Members {
    list: Vec<Member>,
    closing: bool,
}

/// The registry of rooms with local members.
#[derive(Debug)]
pub struct Rooms {
    map: Mutex<HashMap<Arc<str>, Arc<Room>>>,
    bridge: Bridge,
    /// History rooms subscribe to the stream's republished subject (their messages carry sequences).
    history: Option<Arc<History>>,
    /// Presence rooms get a [`RoomPresence`] (`presence.enabled`).
    presence: Option<Arc<Presence>>,
    config: RoomsConfig,
    /// `[compression]` when enabled: room messages of at least `min_size` bytes get a deflated frame for the members
    /// that negotiated permessage-deflate.
    deflate: Option<Settings>,
    /// Rooms per user/address and room-creation rate; updated under `map`'s lock.
    quota: RoomQuota,
    metrics: Arc<Metrics>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Rooms {
    /// An empty registry. Room tasks are spawned on `tracker` and end with `shutdown`. `max_tracked_keys`
    /// (`limits.max_tracked_keys`) bounds the keys of the room-creation rate limiter; `deflate` is `[compression]`
    /// when enabled.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        bridge: Bridge,
        history: Option<Arc<History>>,
        presence: Option<Arc<Presence>>,
        config: RoomsConfig,
        deflate: Option<Settings>,
        max_tracked_keys: usize,
        metrics: Arc<Metrics>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            deflate,
            map: Mutex::default(),
            bridge,
            history,
            presence,
            quota: RoomQuota::new(&config, max_tracked_keys),
            config,
            metrics,
            tracker,
            shutdown,
        })
    }

    /// Adds `member` to `room` (a valid name), subscribing on NATS if it is the first local member. Returns once
    /// the subscription is live on the NATS server, so a publish made after the client's ack reaches it.
    ///
    /// Charges `member.key`: one more distinct room unless the key is in it already (`rooms.max_rooms_per_user`),
    /// and a room creation when this join makes the room (`rooms.room_creations_per_second`).
    ///
    /// The member is registered before the wait for the subscription and is owned by the returned [`Membership`]
    /// from that moment: if this future is dropped while it waits (the connection closed mid-join), the guard
    /// takes the member out again, with its quota and, if it was the last, the room and its subscription.
    pub async fn join(self: &Arc<Self>, room: &str, member: Member) -> Result<Membership, JoinError> {
        let id = member.id;
        let mut member = Some(member);
        let (entry, created) = loop {
            // The map lock and a room's lock are never held together (see `Room::members`).
            let existing = self.map.lock().get(room).cloned();
            if let Some(r) = existing {
                let added = {
                    let mut members = r.members.write();
                    if members.closing {
                        false
                    } else {
                        let m = member.take().expect("member is added once");
                        self.quota.claim(&m.key, &r.name)?;
                        if let Some(hold) = &m.hold {
                            hold.set_floor(r.last_seq.load(std::sync::atomic::Ordering::Acquire));
                        }
                        if let Some(p) = &r.presence {
                            p.joined(m.id, m.key.user().cloned(), m.outbox.clone());
                        }
                        members.list.push(m);
                        true
                    }
                };
                if added {
                    break (r, false);
                }
                // Closing: its closer removes it from the map right after; then this join makes a new one.
                tokio::task::yield_now().await;
                continue;
            }
            let mut map = self.map.lock();
            if map.contains_key(room) {
                continue; // another join made it meanwhile
            }
            if map.len() >= self.config.max_rooms {
                return Err(JoinError::Capacity);
            }
            let m = member.take().expect("member is added once");
            let name: Arc<str> = room.into();
            self.quota.claim(&m.key, &name)?;
            if let Err(e) = self.quota.charge_creation(&m.key) {
                self.quota.release(&m.key, &name);
                return Err(e.into());
            }
            let presence = self
                .presence
                .as_ref()
                .filter(|p| p.covers(room))
                .map(|p| RoomPresence::new(p.clone(), name.clone()));
            if let Some(p) = &presence {
                p.joined(m.id, m.key.user().cloned(), m.outbox.clone());
            }
            let r = Arc::new(Room {
                presence,
                history: self.history.as_ref().is_some_and(|h| h.covers(room)),
                last_seq: std::sync::atomic::AtomicU64::new(0),
                policy: self.config.overflow_for(room),
                name: name.clone(),
                members: RwLock::new(Members {
                    list: vec![m],
                    closing: false,
                }),
                ready: watch::Sender::new(Readiness::Pending),
                cancel: self.shutdown.child_token(),
            });
            map.insert(name, r.clone());
            self.metrics.rooms.set(map.len() as i64);
            break (r, true);
        };
        // No await between the member's registration above and this guard.
        let membership = Membership {
            rooms: self.clone(),
            room: entry,
            id,
            reason: Departure::Disconnect,
        };
        if created {
            let rooms = self.clone();
            let room = membership.room.clone();
            if let Some(p) = &room.presence {
                self.tracker.spawn(p.clone().run(room.cancel.clone()));
            }
            self.tracker.spawn(async move { rooms.room_task(room).await });
        }
        let mut ready = membership.room.ready.subscribe();
        let state = ready
            .wait_for(|r| *r != Readiness::Pending)
            .await
            .map(|r| *r)
            .unwrap_or(Readiness::Failed);
        if state == Readiness::Ready {
            Ok(membership)
        } else {
            // Dropping the guard detaches the member.
            Err(JoinError::Nats(BridgeError::Disconnected))
        }
    }

    /// The presence of `room` when this gateway holds it and it is a presence room.
    pub fn presence_of(&self, room: &str) -> Option<Arc<RoomPresence>> {
        let entry = self.map.lock().get(room).cloned();
        entry.and_then(|r| r.presence.clone())
    }

    /// Local members of `room` on this gateway (0 when the room is not held).
    pub fn members_of(&self, room: &str) -> usize {
        let entry = self.map.lock().get(room).cloned();
        entry.map_or(0, |r| r.members.read().list.len())
    }

    /// Distinct rooms the user (or address) `key` is in on this gateway.
    pub fn rooms_of(&self, key: &QuotaKey) -> usize {
        self.quota.rooms_of(key)
    }

    /// Keys tracked by the per-user room accounting (tests assert this stays bounded).
    pub fn tracked_keys(&self) -> usize {
        self.quota.tracked_keys()
    }

    /// Removes member `id` from this exact room instance; drops the room (and its subscription) when it empties.
    fn detach(&self, room: &Arc<Room>, id: u64, reason: Departure) -> bool {
        let emptied = {
            let mut members = room.members.write();
            let Some(pos) = members.list.iter().position(|m| m.id == id) else {
                return false;
            };
            let member = members.list.swap_remove(pos);
            self.quota.release(&member.key, &room.name);
            if let Some(p) = &room.presence {
                p.departed(id, reason);
            }
            members.closing |= members.list.is_empty();
            members.list.is_empty()
        };
        if emptied {
            self.unregister(room);
            room.cancel.cancel();
        }
        true
    }

    /// Removes `room` from the map if the map still holds this instance (a newer room of the same name stays).
    fn unregister(&self, room: &Arc<Room>) {
        let mut map = self.map.lock();
        if map.get(&room.name).is_some_and(|r| Arc::ptr_eq(r, room)) {
            map.remove(&room.name);
            self.metrics.rooms.set(map.len() as i64);
        }
    }

    /// Number of rooms held.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// Whether no room is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `n` rooms with the most local members, most first (ties by name), for the admin `/connz`. Costs a pass
    /// over the rooms (at most `rooms.max_rooms`); the map lock is released before any room's lock is taken.
    pub fn top_rooms(&self, n: usize) -> Vec<(Arc<str>, usize)> {
        let rooms: Vec<Arc<Room>> = self.map.lock().values().cloned().collect();
        let mut counted: Vec<(Arc<str>, usize)> = rooms
            .iter()
            .map(|r| (r.name.clone(), r.members.read().list.len()))
            .collect();
        let by_size = |a: &(Arc<str>, usize), b: &(Arc<str>, usize)| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0));
        if counted.len() > n && n > 0 {
            counted.select_nth_unstable_by(n - 1, by_size);
        }
        counted.truncate(n);
        counted.sort_by(by_size);
        counted
    }

    /// Subscribes, signals readiness, then fans out until the room empties or the gateway shuts down, or until the
    /// subscription ends under it (then [`Rooms::end_room`]).
    async fn room_task(self: Arc<Self>, room: Arc<Room>) {
        let subject = match (&self.history, room.history) {
            (Some(h), true) => h.live_subject(&room.name),
            _ => protocol::room_subject(&self.config.subject_prefix, &room.name),
        };
        // The room may empty while its subscription is made (its only join cancelled): stop waiting then.
        let subscribed = tokio::select! {
            biased;
            _ = room.cancel.cancelled() => {
                room.ready.send_replace(Readiness::Failed);
                return;
            }
            s = self.bridge.subscribe(subject, &room.name) => s,
        };
        let mut sub = match subscribed {
            Ok(sub) => sub,
            Err(e) => {
                tracing::warn!(room = %room.name, error = %e, "room subscription failed");
                // Waiting joins see `Failed` and detach themselves; no new member may join meanwhile.
                room.members.write().closing = true;
                self.unregister(&room);
                room.ready.send_replace(Readiness::Failed);
                return;
            }
        };
        room.ready.send_replace(Readiness::Ready);
        tracing::debug!(room = %room.name, "room subscribed");
        // Pinned once: a fresh wait per message would lock the token twice per message.
        let cancelled = room.cancel.cancelled();
        tokio::pin!(cancelled);
        loop {
            tokio::select! {
                biased;
                _ = &mut cancelled => break,
                msg = sub.next() => match msg {
                    Some(msg) => fan_out(&room, &msg, self.bridge.gateway_id(), self.deflate, &self.metrics),
                    None => {
                        tracing::warn!(room = %room.name, denied = sub.denied(), "room subscription ended under it");
                        self.end_room(&room);
                        break;
                    }
                },
            }
        }
        // Dropping the subscription unsubscribes on NATS and forgets its bookkeeping.
        drop(sub);
        tracing::debug!(room = %room.name, "room unsubscribed");
    }

    /// Removes a room whose subscription ended while it may still have members: out of the map (so the next join
    /// makes a fresh subscription), marked failed (so a join waiting on it is refused), its members released from
    /// their quotas and told `left`. The notice is best effort (`try_push_control`, never a wait inside the room
    /// task): a member whose queue is full misses it; its next join of the room makes a new subscription anyway.
    fn end_room(&self, room: &Arc<Room>) {
        let members = {
            let mut members = room.members.write();
            members.closing = true;
            std::mem::take(&mut members.list)
        };
        for m in &members {
            self.quota.release(&m.key, &room.name);
            if let Some(p) = &room.presence {
                p.departed(m.id, Departure::Disconnect);
            }
        }
        // Ends the room's presence task (it removes this gateway's entry for the room).
        room.cancel.cancel();
        room.ready.send_replace(Readiness::Failed);
        self.unregister(room);
        let frame = Frame::text(protocol::left(&room.name, ENDED_REASON));
        for m in members {
            m.outbox.forget_room(&room.name);
            m.outbox.try_push_control(frame.clone());
        }
    }
}

/// Local connection number to skip for echo suppression: set when this gateway published the message for one of
/// its connections and the publisher did not ask for an echo.
fn echo_skip(msg: &async_nats::Message, gateway_id: &str) -> Option<u64> {
    let headers = msg.headers.as_ref()?;
    if headers.get(HDR_ECHO).is_some() || headers.get(HDR_GATEWAY)?.as_str() != gateway_id {
        return None;
    }
    let conn = headers.get(HDR_CONN)?.as_str();
    conn.strip_prefix(gateway_id)?.strip_prefix('-')?.parse().ok()
}

/// The stream sequence of a republished history message and the previous sequence of its room (`Nats-Sequence`,
/// `Nats-Last-Sequence`).
fn sequence(msg: &async_nats::Message) -> (Option<u64>, u64) {
    let Some(h) = msg.headers.as_ref() else {
        return (None, 0);
    };
    let num = |name: &str| h.get(name).and_then(|v| v.as_str().parse::<u64>().ok());
    (num("Nats-Sequence"), num("Nats-Last-Sequence").unwrap_or(0))
}

/// Delivers one NATS message to every local member of `room` except the echo-suppressed sender. Builds the frame
/// once; per member it is one refcount increment and one push into a bounded queue, never an await.
///
/// permessage-deflate (`deflate`, `[compression]` when enabled): a message of at least `min_size` bytes is compressed
/// once, when the first member that negotiated the extension comes up (a room without such members pays nothing),
/// and every such member gets that same deflated frame; so at most two frames per message, plain and deflated. When
/// compressing would not make it smaller, everyone gets the plain frame.
pub fn fan_out(room: &Room, msg: &async_nats::Message, gateway_id: &str, deflate: Option<Settings>, metrics: &Metrics) {
    let skip = echo_skip(msg, gateway_id);
    let from = msg.headers.as_ref().and_then(|h| h.get(HDR_CONN)).map(|v| v.as_str());
    let (seq, prev) = if room.history { sequence(msg) } else { (None, 0) };
    let frame = protocol::message_frame(&room.name, &msg.payload, from, seq);
    let compressible = deflate.filter(|d| frame.len() >= d.min_size);
    // Not built yet (`None`), built (`Some(Some)`), or not worth it (`Some(None)`).
    let mut deflated: Option<Option<Frame>> = None;
    let (mut delivered, mut dropped, mut overflowed) = (0u64, 0u64, 0u64);
    {
        let members = room.members.read();
        if let Some(seq) = seq {
            room.last_seq.fetch_max(seq, std::sync::atomic::Ordering::AcqRel);
        }
        for m in members.list.iter() {
            if Some(m.id) == skip {
                continue;
            }
            let frame = match compressible {
                Some(d) if m.outbox.takes_deflated(frame.len()) => deflated
                    .get_or_insert_with(|| frame.deflated(d.level))
                    .as_ref()
                    .unwrap_or(&frame),
                _ => &frame,
            };
            if let Some(hold) = &m.hold
                && hold.offer(seq.unwrap_or(0), prev, frame)
            {
                delivered += 1;
                continue;
            }
            // Each dropped message is counted once, by the push that dropped it: the superseded value for
            // `Conflated`, the evicted ones (all of `drop_oldest` rooms, so under this room's label) for
            // `DroppedOldest`, the new one for `DroppedNewest`.
            match m.outbox.push_room(&room.name, frame.clone(), room.policy) {
                Pushed::Queued | Pushed::Parked => delivered += 1,
                Pushed::DroppedOldest(n) => {
                    delivered += 1;
                    dropped += n;
                }
                Pushed::Conflated => {
                    delivered += 1;
                    dropped += 1;
                }
                Pushed::DroppedNewest => dropped += 1,
                Pushed::Overflowed => overflowed += 1,
                Pushed::Closed => {}
            }
        }
    }
    metrics.room_messages.inc();
    metrics.deliveries.inc_by(delivered);
    if dropped > 0 {
        // Only the drop policies drop (`disconnect` closes instead), so the policy is the reason.
        metrics.dropped.inc_by(room.policy, dropped);
    }
    if overflowed > 0 {
        metrics.slow_consumers.inc_by(SlowConsumer::QueueFull, overflowed);
        tracing::info!(room = %room.name, count = overflowed, "slow consumer(s) disconnected: outbound queue full");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn member(id: u64) -> Member {
        Member {
            id,
            outbox: Arc::new(Outbox::new(16, 1 << 20)),
            key: QuotaKey::User(format!("user-{id}").into()),
            hold: None,
        }
    }

    /// A fan-out in progress holds its room's member lock. A join of that room waits for it (it must), but it must
    /// not hold up joins and leaves of other rooms: it used to wait for the room lock while holding the map lock.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    #[allow(clippy::await_holding_lock)] // on purpose: the guard stands for a fan-out in progress
    async fn a_busy_room_does_not_stall_other_rooms() {
        let (_nats, gw) = crate::test_support::gateway(|_| {}).await;
        let rooms = gw.rooms().clone();
        let big = rooms.join("big", member(1)).await.expect("join big");
        let small = rooms.join("small", member(2)).await.expect("join small");

        let fanning_out = big.members.read();
        let blocked = {
            let rooms = rooms.clone();
            tokio::spawn(async move { rooms.join("big", member(3)).await })
        };
        // Give the blocked join time to take whatever it takes before waiting for the room lock.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let others = {
            let rooms = rooms.clone();
            tokio::spawn(async move {
                drop(small);
                let left = rooms.members_of("small") == 0;
                rooms.join("other", member(4)).await.map(|other| (left, other))
            })
        };
        let done = tokio::time::timeout(Duration::from_secs(3), others).await;
        drop(fanning_out);
        let _other = match done {
            Ok(Ok(Ok((true, other)))) => other,
            done => panic!("another room's leave and join finished while a fan-out held its room: {done:?}"),
        };
        let _joined = blocked
            .await
            .expect("task")
            .expect("the join of the busy room completes once it is free");
        assert_eq!(rooms.len(), 2, "big and other");
        drop(big);
    }

    /// Issue 27: a room message goes out as at most two frames, plain and deflated, each shared by the members that
    /// take it (the same bytes, not a copy per member); a member that restricted the window below the message's
    /// length gets the plain one; a message under `compression.min_size` is plain for everyone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fan_out_builds_at_most_two_frames_shared_by_their_members() {
        let (_nats, gw) = crate::test_support::gateway(|_| {}).await;
        let rooms = gw.rooms().clone();
        let with = |id: u64, max_plain: usize| {
            let outbox = Outbox::new(16, 1 << 20);
            Member {
                outbox: Arc::new(if max_plain > 0 {
                    outbox.with_deflate(max_plain)
                } else {
                    outbox
                }),
                ..member(id)
            }
        };
        let members = [with(1, usize::MAX), with(2, usize::MAX), with(3, 0), with(4, 512)];
        let outboxes: Vec<Arc<Outbox>> = members.iter().map(|m| m.outbox.clone()).collect();
        let mut joined = Vec::new();
        for m in members {
            joined.push(rooms.join("chat", m).await.expect("join"));
        }
        let room = joined[0].room().clone();
        let settings = Some(crate::deflate::Settings {
            min_size: 256,
            level: 1,
        });
        let message = |payload: String| async_nats::Message {
            subject: "rooms.chat".into(),
            reply: None,
            payload: payload.into(),
            headers: None,
            status: None,
            description: None,
            length: 0,
        };
        let big = format!(r#"{{"text":"{}"}}"#, "chat message text ".repeat(60));
        fan_out(&room, &message(big.clone()), "gw", settings, gw.metrics());
        fan_out(&room, &message(r#"{"text":"hi"}"#.into()), "gw", settings, gw.metrics());
        let frames: Vec<Vec<Frame>> = outboxes
            .iter()
            .map(|o| {
                let mut batch = std::collections::VecDeque::new();
                futures_util::FutureExt::now_or_never(o.next_batch(&mut batch)).expect("frames queued");
                batch
                    .into_iter()
                    .map(|i| match i {
                        crate::outbox::Item::Room { frame, .. } | crate::outbox::Item::Control(frame) => frame,
                    })
                    .collect()
            })
            .collect();
        let [a, b, plain, narrow] = &frames[..] else {
            panic!("four members");
        };
        assert!(
            a[0].is_deflated() && b[0].is_deflated(),
            "deflating members get the deflated frame"
        );
        assert_eq!(a[0].wire().as_ptr(), b[0].wire().as_ptr(), "one deflated frame, shared");
        assert!(
            !plain[0].is_deflated() && !narrow[0].is_deflated(),
            "the others get the plain frame"
        );
        assert_eq!(
            plain[0].wire().as_ptr(),
            narrow[0].wire().as_ptr(),
            "one plain frame, shared"
        );
        assert!(big.len() > 512, "over the narrow member's window");
        let inflated = crate::deflate::inflate(a[0].payload(), 1 << 20).expect("inflate");
        assert_eq!(inflated, plain[0].payload(), "the same message");
        for f in [a, b, plain, narrow] {
            assert!(!f[1].is_deflated(), "a message under min_size is plain for everyone");
        }
        drop(joined);
    }

    /// The map and the rooms agree under concurrent joins and leaves of a few rooms: every room in the map has
    /// members, and every member is in exactly the room it joined last.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_joins_and_leaves_keep_the_registry_consistent() {
        let (_nats, gw) = crate::test_support::gateway(|_| {}).await;
        let rooms = gw.rooms().clone();
        let mut tasks = Vec::new();
        for id in 0..8u64 {
            let rooms = rooms.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..30u64 {
                    let name = format!("r{}", (id + i) % 3);
                    let joined = rooms.join(&name, member(id)).await.expect("join");
                    assert!(rooms.members_of(&name) >= 1, "in {name}");
                    drop(joined);
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        assert!(rooms.is_empty(), "{} rooms left with no member", rooms.len());
    }
}

#[cfg(test)]
mod model_tests {
    //! Membership against a plain model (issue 22): whatever mix of completed joins, joins dropped after any number
    //! of polls (a connection closed mid-join), leaves and disconnects, over several rooms and connections, every
    //! room's member count equals the connections holding a membership of it, the registry holds exactly the rooms
    //! with members, and each user's room quota counts exactly their rooms.
    use std::collections::HashMap;

    use proptest::{prelude::*, test_runner::TestRunner};

    use super::*;

    const CONNS: u8 = 4;
    const ROOMS: u8 = 3;

    #[derive(Debug, Clone)]
    enum Op {
        Join(u8, u8),
        /// A join whose future is dropped after this many polls (0: never polled).
        CancelledJoin(u8, u8, u8),
        Leave(u8, u8),
        Disconnect(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..CONNS, 0..ROOMS).prop_map(|(c, r)| Op::Join(c, r)),
            (0..CONNS, 0..ROOMS, 0..4u8).prop_map(|(c, r, p)| Op::CancelledJoin(c, r, p)),
            (0..CONNS, 0..ROOMS).prop_map(|(c, r)| Op::Leave(c, r)),
            (0..CONNS).prop_map(Op::Disconnect),
        ]
    }

    fn name(r: u8) -> String {
        format!("model-{r}")
    }

    fn key(c: u8) -> QuotaKey {
        QuotaKey::User(format!("user-{c}").into())
    }

    fn member(c: u8) -> Member {
        Member {
            id: u64::from(c),
            outbox: Arc::new(Outbox::new(16, 1 << 20)),
            key: key(c),
            hold: None,
        }
    }

    async fn run(rooms: &Arc<Rooms>, ops: Vec<Op>) -> Result<(), TestCaseError> {
        let mut held: HashMap<(u8, u8), Membership> = HashMap::new();
        for op in ops {
            match op {
                Op::Join(c, r) if !held.contains_key(&(c, r)) => {
                    let m = rooms
                        .join(&name(r), member(c))
                        .await
                        .map_err(|e| TestCaseError::fail(format!("join: {e}")))?;
                    held.insert((c, r), m);
                }
                Op::CancelledJoin(c, r, polls) if !held.contains_key(&(c, r)) => {
                    let room = name(r);
                    let mut join = std::pin::pin!(rooms.join(&room, member(c)));
                    for _ in 0..polls {
                        if futures_util::poll!(join.as_mut()).is_ready() {
                            break; // completed: its membership (or error) is dropped with the future's output
                        }
                        tokio::task::yield_now().await;
                    }
                }
                Op::Leave(c, r) => drop(held.remove(&(c, r))),
                Op::Disconnect(c) => held.retain(|(held_by, _), _| *held_by != c),
                _ => {}
            }
            for r in 0..ROOMS {
                let want = held.keys().filter(|(_, in_room)| *in_room == r).count();
                prop_assert_eq!(rooms.members_of(&name(r)), want, "members of room {}", r);
            }
            let live: std::collections::HashSet<u8> = held.keys().map(|(_, r)| *r).collect();
            prop_assert_eq!(rooms.len(), live.len(), "rooms held");
            for c in 0..CONNS {
                let want = held.keys().filter(|(by, _)| *by == c).count();
                prop_assert_eq!(rooms.rooms_of(&key(c)), want, "room quota of user {}", c);
            }
        }
        drop(held);
        prop_assert!(rooms.is_empty(), "rooms left after every connection went");
        Ok(())
    }

    #[test]
    fn member_counts_equal_the_live_connections_that_joined() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (_nats, gw) = rt.block_on(crate::test_support::gateway(|c| {
            c.rooms.room_creations_per_second = 1_000_000;
            c.rooms.room_creations_burst = 1_000_000;
        }));
        let rooms = gw.rooms().clone();
        let mut runner = TestRunner::new(ProptestConfig::with_cases(64));
        let result = runner.run(&proptest::collection::vec(op(), 1..40), |ops| {
            rt.block_on(run(&rooms, ops))
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    }
}
