//! One room's presence on this gateway ([`RoomPresence`]), made with the room on its first local join and ended with
//! it on its last leave (`crate::rooms`): this gateway's members of the room, the writer of this instance's entry,
//! and the room's one KV watch, whose changes become `member_joined`/`member_left` for the local members.
//!
//! - **Writes are coalesced.** A join or a leave only marks the room dirty; the writer writes the whole member list
//!   at most once per [`FLUSH_INTERVAL`], however many connections came and went, and rewrites it every `ttl / 3`
//!   so it does not expire. Members that left since the previous write are listed with their reason (`leave` or
//!   `disconnect`), at most `presence.max_members` of them.
//! - **One watch per room**, never per connection, started with the room's task. Its snapshot (the entries that
//!   existed when it started) is applied silently; every later change is diffed into events ([`super::view`]),
//!   pushed to each local member with the non-blocking `Outbox::try_push_control` (a full queue misses the event).
//! - **The end.** When the room empties, or the gateway stops, the writer writes the last departures and removes
//!   the entry, each bounded by [`super::bucket::REQUEST_TIMEOUT`]; watchers elsewhere see the members leave with
//!   their reason, and `disconnect` for any still listed.

use std::{sync::Arc, time::Duration};

use parking_lot::Mutex;
use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    bucket::{Presence, REQUEST_TIMEOUT},
    entry::{Departure, StoredLeft, StoredMember, Value, now_ms},
    view::{Event, Summary, View},
};
use crate::{frame::Frame, outbox::Outbox, protocol};

/// Shortest time between two writes of one room's entry by one gateway: the membership changes of this window go
/// out as one write.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(150);

/// How long a watch that ended (NATS gone for good, the bucket deleted) waits before it is made again.
const REWATCH_DELAY: Duration = Duration::from_secs(1);

/// A local member, as presence knows it.
#[derive(Debug)]
struct Local {
    /// Local connection number.
    id: u64,
    user: Option<Arc<str>>,
    outbox: Arc<Outbox>,
}

#[derive(Debug, Default)]
struct LocalState {
    /// This gateway's members of the room (bound: the room's members).
    members: Vec<Local>,
    /// Departures since the last write, with their reason (bound: `presence.max_members`).
    left: Vec<StoredLeft>,
}

/// One room's presence on this gateway.
#[derive(Debug)]
pub struct RoomPresence {
    presence: Arc<Presence>,
    room: Arc<str>,
    local: Mutex<LocalState>,
    /// Set on each membership change; the writer waits on it.
    dirty: Notify,
    /// The watched view, once its snapshot is in (`None` before, and while the watch is made again).
    view: Mutex<Option<View>>,
    /// Notified when the watch has its snapshot: the first write waits for it (at most [`REQUEST_TIMEOUT`]), so
    /// this gateway's own first members arrive as changes, with their `member_joined`, not inside the snapshot.
    watching: Notify,
}

impl RoomPresence {
    /// The presence of `room`; [`RoomPresence::run`] does the work.
    pub fn new(presence: Arc<Presence>, room: Arc<str>) -> Arc<Self> {
        Arc::new(Self {
            presence,
            room,
            local: Mutex::default(),
            dirty: Notify::new(),
            view: Mutex::new(None),
            watching: Notify::new(),
        })
    }

    /// A local connection joined (called under the room's member lock, so calls come in membership order).
    pub fn joined(&self, id: u64, user: Option<Arc<str>>, outbox: Arc<Outbox>) {
        self.local.lock().members.push(Local { id, user, outbox });
        self.dirty.notify_one();
    }

    /// A local connection left, for `reason`.
    pub fn departed(&self, id: u64, reason: Departure) {
        let mut local = self.local.lock();
        if let Some(pos) = local.members.iter().position(|m| m.id == id) {
            local.members.swap_remove(pos);
            if local.left.len() < self.presence.config().max_members {
                let conn = self.conn_id(id);
                local.left.push(StoredLeft { conn, reason });
            }
        }
        drop(local);
        self.dirty.notify_one();
    }

    fn conn_id(&self, id: u64) -> String {
        format!("{}-{id}", self.presence.gateway())
    }

    /// The room as the watch sees it, once the watch has its snapshot.
    pub fn summary(&self) -> Option<Summary> {
        self.view.lock().as_ref().map(View::summary)
    }

    /// Writes and watches until `cancel` (the room emptied, or the gateway stops), then writes the last departures
    /// and removes this instance's entry.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        tokio::join!(self.write(&cancel), self.watch(&cancel));
        let finish = async {
            if !self.local.lock().left.is_empty() {
                self.put().await;
            }
            if let Err(e) = self.presence.remove(&self.room).await {
                tracing::debug!(room = %self.room, error = %e, "presence entry not removed");
            }
        };
        let _ = tokio::time::timeout(REQUEST_TIMEOUT * 2, finish).await;
    }

    /// This instance's value now; takes the departures it reports.
    fn value(&self) -> Value {
        let max = self.presence.config().max_members;
        let mut local = self.local.lock();
        let left = std::mem::take(&mut local.left);
        let mut users: Vec<&str> = local.members.iter().filter_map(|m| m.user.as_deref()).collect();
        users.sort_unstable();
        users.dedup();
        let members = (local.members.len() <= max).then(|| {
            local
                .members
                .iter()
                .map(|m| StoredMember {
                    conn: self.conn_id(m.id),
                    user: m.user.as_deref().map(str::to_owned),
                })
                .collect()
        });
        Value {
            gw: self.presence.gateway().to_string(),
            at: now_ms(),
            count: local.members.len() as u64,
            users: users.len() as u64,
            members,
            left,
        }
    }

    async fn put(&self) {
        let value = self.value();
        if let Err(e) = self.presence.put(&self.room, &value).await {
            tracing::debug!(room = %self.room, error = %e, "presence write failed");
        }
    }

    /// The writer: one write per [`FLUSH_INTERVAL`] at most while the membership changes, and one every `ttl / 3`.
    async fn write(&self, cancel: &CancellationToken) {
        let refresh = self.presence.config().ttl / 3;
        let mut last: Option<Instant> = None;
        let mut next_refresh = Instant::now() + refresh;
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            _ = self.watching.notified() => {}
            _ = tokio::time::sleep(REQUEST_TIMEOUT) => {}
        }
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = self.dirty.notified() => {}
                _ = tokio::time::sleep_until(next_refresh) => {}
            }
            if let Some(last) = last {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep_until(last + FLUSH_INTERVAL) => {}
                }
            }
            let started = Instant::now();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = self.put() => {}
            }
            last = Some(started);
            next_refresh = started + refresh;
        }
    }

    /// The room's watch: snapshot, then events; made again if it ends.
    async fn watch(&self, cancel: &CancellationToken) {
        loop {
            let opened = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                w = self.presence.watch(&self.room) => w,
            };
            match opened {
                Ok(mut watch) => {
                    let mut view = View::new(self.presence.config().max_members);
                    let mut snapshot = watch.pending;
                    if snapshot == 0 {
                        *self.view.lock() = Some(View::new(self.presence.config().max_members));
                        self.watching.notify_one();
                    }
                    loop {
                        let seen = tokio::select! {
                            biased;
                            _ = cancel.cancelled() => return,
                            seen = watch.next() => seen,
                        };
                        let Some(seen) = seen else { break };
                        let Some(seen) = seen else { continue };
                        if snapshot > 0 {
                            view.apply(&seen.key, seen.change);
                            snapshot -= 1;
                            if snapshot == 0 || seen.pending == 0 {
                                snapshot = 0;
                                *self.view.lock() = Some(std::mem::replace(&mut view, View::new(0)));
                                self.watching.notify_one();
                            }
                            continue;
                        }
                        let events = match self.view.lock().as_mut() {
                            Some(view) => view.apply(&seen.key, seen.change),
                            None => Vec::new(),
                        };
                        self.deliver(&events);
                    }
                    tracing::debug!(room = %self.room, "presence watch ended; watching again");
                    *self.view.lock() = None;
                }
                Err(e) => tracing::debug!(room = %self.room, error = %e, "presence watch failed"),
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(REWATCH_DELAY) => {}
            }
        }
    }

    /// Pushes each event, built once, to every local member without waiting for anyone.
    fn deliver(&self, events: &[Event]) {
        for event in events {
            let text = match event {
                Event::Joined { conn, user, first } => {
                    protocol::member_joined(&self.room, conn, user.as_deref(), *first)
                }
                Event::Left {
                    conn,
                    user,
                    last,
                    reason,
                } => protocol::member_left(&self.room, conn, user.as_deref(), *last, reason.as_str()),
            };
            let frame = Frame::text(text);
            for m in self.local.lock().members.iter() {
                m.outbox.try_push_control(frame.clone());
            }
        }
    }
}
