//! Room registry and fan-out: exactly one NATS subscription per room per gateway process, created on the first
//! local join and dropped on the last leave, with one fan-out task per room.
//!
//! The hot path is [`fan_out`]: a NATS message becomes one WebSocket frame (`Utf8Bytes`, built once), and each
//! local member gets a reference-counted clone pushed into its [`Outbox`] without awaiting anything. A member that
//! cannot keep up is handled by the room's overflow policy inside its own outbox; the others are not delayed.
//!
//! Bounds: at most `rooms.max_rooms` rooms (the map), and each room's member list holds one entry per joined
//! connection (each connection is in at most `rooms.max_rooms_per_connection` rooms).

use std::{collections::HashMap, sync::Arc};

use futures_util::StreamExt;
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    bridge::{Bridge, BridgeError, HDR_CONN, HDR_ECHO, HDR_GATEWAY},
    config::{Overflow, RoomsConfig},
    metrics::Metrics,
    outbox::{Outbox, Pushed},
    protocol,
};

/// One local member of a room: a connection's id and its outbox.
#[derive(Debug, Clone)]
pub struct Member {
    /// Local connection number (the `<n>` of `<gateway>-<n>`), for echo suppression.
    pub id: u64,
    /// The connection's outbound queue.
    pub outbox: Arc<Outbox>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Readiness {
    Pending,
    Ready,
    Failed,
}

/// A room held by this gateway.
#[derive(Debug)]
pub struct Room {
    name: Arc<str>,
    policy: Overflow,
    members: RwLock<Vec<Member>>,
    ready: watch::Sender<Readiness>,
    cancel: CancellationToken,
}

impl Room {
    /// The room's name, shared by every frame queued for it.
    pub fn name(&self) -> &Arc<str> {
        &self.name
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
}

/// The registry of rooms with local members.
#[derive(Debug)]
pub struct Rooms {
    map: Mutex<HashMap<Arc<str>, Arc<Room>>>,
    bridge: Bridge,
    config: RoomsConfig,
    metrics: Arc<Metrics>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Rooms {
    /// An empty registry. Room tasks are spawned on `tracker` and end with `shutdown`.
    pub fn new(
        bridge: Bridge,
        config: RoomsConfig,
        metrics: Arc<Metrics>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            map: Mutex::default(),
            bridge,
            config,
            metrics,
            tracker,
            shutdown,
        })
    }

    /// Adds `member` to `room` (a valid name), subscribing on NATS if it is the first local member. Returns once
    /// the subscription is live on the NATS server, so a publish made after the client's ack reaches it.
    pub async fn join(self: &Arc<Self>, room: &str, member: Member) -> Result<Arc<Room>, JoinError> {
        let id = member.id;
        let (entry, created) = {
            let mut map = self.map.lock();
            match map.get(room) {
                Some(r) => {
                    r.members.write().push(member);
                    (r.clone(), false)
                }
                None => {
                    if map.len() >= self.config.max_rooms {
                        return Err(JoinError::Capacity);
                    }
                    let name: Arc<str> = room.into();
                    let r = Arc::new(Room {
                        policy: self.config.overflow_for(room),
                        name: name.clone(),
                        members: RwLock::new(vec![member]),
                        ready: watch::Sender::new(Readiness::Pending),
                        cancel: self.shutdown.child_token(),
                    });
                    map.insert(name, r.clone());
                    self.metrics.rooms.set(map.len() as i64);
                    (r, true)
                }
            }
        };
        if created {
            let rooms = self.clone();
            let room = entry.clone();
            self.tracker.spawn(async move { rooms.room_task(room).await });
        }
        let mut ready = entry.ready.subscribe();
        let state = ready
            .wait_for(|r| *r != Readiness::Pending)
            .await
            .map(|r| *r)
            .unwrap_or(Readiness::Failed);
        if state == Readiness::Ready {
            Ok(entry)
        } else {
            self.detach(&entry, id);
            Err(JoinError::Nats(BridgeError::Disconnected))
        }
    }

    /// Removes member `id` from `room`. Returns whether it was a member.
    pub fn leave(&self, room: &str, id: u64) -> bool {
        let entry = self.map.lock().get(room).cloned();
        match entry {
            Some(r) => self.detach(&r, id),
            None => false,
        }
    }

    /// Removes member `id` from this exact room instance; drops the room (and its subscription) when it empties.
    fn detach(&self, room: &Arc<Room>, id: u64) -> bool {
        let mut map = self.map.lock();
        let mut members = room.members.write();
        let Some(pos) = members.iter().position(|m| m.id == id) else {
            return false;
        };
        members.swap_remove(pos);
        if members.is_empty() {
            if map.get(&room.name).is_some_and(|r| Arc::ptr_eq(r, room)) {
                map.remove(&room.name);
                self.metrics.rooms.set(map.len() as i64);
            }
            room.cancel.cancel();
        }
        true
    }

    /// Number of rooms held.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// Whether no room is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Subscribes, signals readiness, then fans out until the room empties or the gateway shuts down.
    async fn room_task(self: Arc<Self>, room: Arc<Room>) {
        let subject = protocol::room_subject(&self.config.subject_prefix, &room.name);
        let mut sub = match self.bridge.subscribe(subject, &room.name).await {
            Ok(sub) => sub,
            Err(e) => {
                tracing::warn!(room = %room.name, error = %e, "room subscription failed");
                {
                    let mut map = self.map.lock();
                    if map.get(&room.name).is_some_and(|r| Arc::ptr_eq(r, &room)) {
                        map.remove(&room.name);
                        self.metrics.rooms.set(map.len() as i64);
                    }
                }
                room.ready.send_replace(Readiness::Failed);
                return;
            }
        };
        room.ready.send_replace(Readiness::Ready);
        tracing::debug!(room = %room.name, "room subscribed");
        loop {
            tokio::select! {
                biased;
                _ = room.cancel.cancelled() => break,
                msg = sub.next() => match msg {
                    Some(msg) => fan_out(&room, &msg, self.bridge.gateway_id(), &self.metrics),
                    None => break,
                },
            }
        }
        self.bridge.forget(&sub);
        // Dropping the subscriber unsubscribes on NATS.
        drop(sub);
        tracing::debug!(room = %room.name, "room unsubscribed");
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

/// Delivers one NATS message to every local member of `room` except the echo-suppressed sender. Builds the frame
/// once; per member it is one refcount increment and one push into a bounded queue, never an await.
pub fn fan_out(room: &Room, msg: &async_nats::Message, gateway_id: &str, metrics: &Metrics) {
    let skip = echo_skip(msg, gateway_id);
    let from = msg.headers.as_ref().and_then(|h| h.get(HDR_CONN)).map(|v| v.as_str());
    let frame = Utf8Bytes::from(protocol::message(&room.name, &msg.payload, from));
    let (mut delivered, mut dropped, mut overflowed) = (0u64, 0u64, 0u64);
    {
        let members = room.members.read();
        for m in members.iter() {
            if Some(m.id) == skip {
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
        let label = match room.policy {
            Overflow::DropOldest => "drop_oldest",
            Overflow::Latest => "latest",
            _ => "drop_newest",
        };
        metrics.dropped.get_or_create(&[("reason", label)]).inc_by(dropped);
    }
    if overflowed > 0 {
        metrics
            .slow_consumers
            .get_or_create(&[("reason", "queue_full")])
            .inc_by(overflowed);
        tracing::info!(room = %room.name, count = overflowed, "slow consumer(s) disconnected: outbound queue full");
    }
}
