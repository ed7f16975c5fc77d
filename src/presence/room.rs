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
//! - **A watch that stops seeing is made again.** The watch must see this gateway's own writes (its filter covers
//!   them, and there is one at least every `ttl / 3`); one that has not delivered a write made [`STALE_AFTER`] ago
//!   is dropped and made again. (Losing the NATS node that held the bucket's leader can leave the client's ordered
//!   consumer retrying, forever, the creation of a consumer the server assigned to the dead node.) A watch made
//!   again resyncs: its snapshot is diffed against the view it replaces, so the members who came and went
//!   meanwhile get their events.
//! - **The end.** When the room empties, or the gateway stops, the writer writes the last departures and removes
//!   the entry, each bounded by [`super::bucket::REQUEST_TIMEOUT`]; watchers elsewhere see the members leave with
//!   their reason, and `disconnect` for any still listed.

use std::{collections::VecDeque, sync::Arc, time::Duration};

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

/// A watch that has not delivered one of this gateway's own writes this long after the write succeeded is stale,
/// and made again. (A healthy watch delivers it within milliseconds; an ordered consumer that lost its node
/// recreates itself in about 10 s, or never: see the module's doc.)
pub const STALE_AFTER: Duration = Duration::from_secs(5);

/// Longest wait before a failed write is tried again ([`retry_after`]): an entry is rewritten within this long of
/// the bucket answering again.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Most own writes awaiting their sighting by the watch (at one per [`FLUSH_INTERVAL`], more than [`STALE_AFTER`]
/// holds); a newer write is not tracked when full, the oldest one decides staleness anyway.
const MAX_UNSEEN: usize = 64;

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
    /// This gateway's writes the watch has not delivered yet: (stream sequence, when it was acknowledged), oldest
    /// first (bound: [`MAX_UNSEEN`]).
    unseen: Mutex<VecDeque<(u64, Instant)>>,
    /// Notified when `unseen` gets a write.
    written: Notify,
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
            unseen: Mutex::default(),
            written: Notify::new(),
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

    /// Writes this instance's value; whether the write went through. A failed write's departures are kept for the
    /// next one, so they keep their reason.
    async fn put(&self) -> bool {
        let value = self.value();
        match self.presence.put(&self.room, &value).await {
            Ok(Some(seq)) => {
                let mut unseen = self.unseen.lock();
                if unseen.len() < MAX_UNSEEN {
                    unseen.push_back((seq, Instant::now()));
                }
                drop(unseen);
                self.written.notify_one();
                true
            }
            Ok(None) => true,
            Err(e) => {
                tracing::debug!(room = %self.room, error = %e, "presence write failed");
                let mut local = self.local.lock();
                let mut left = value.left;
                left.append(&mut local.left);
                left.truncate(self.presence.config().max_members);
                local.left = left;
                false
            }
        }
    }

    /// The watch delivered stream sequence `seq`: this gateway's writes up to it are seen.
    fn seen(&self, seq: u64) {
        let mut unseen = self.unseen.lock();
        while unseen.front().is_some_and(|&(s, _)| s <= seq) {
            unseen.pop_front();
        }
    }

    /// Returns once the oldest own write the watch has not delivered is [`STALE_AFTER`] old.
    async fn stale(&self) {
        loop {
            let oldest = self.unseen.lock().front().map(|&(_, at)| at);
            match oldest {
                None => self.written.notified().await,
                Some(at) => {
                    tokio::time::sleep_until(at + STALE_AFTER).await;
                    if self.unseen.lock().front().is_some_and(|&(_, a)| a <= at) {
                        return;
                    }
                }
            }
        }
    }

    /// Makes `fresh` (a watch's snapshot) the view: silently the first time, else diffed against the view the
    /// watch had before it ended (`previous`), whose events are delivered.
    fn install(&self, fresh: View, previous: &mut Option<View>) {
        let view = match previous.take() {
            None => fresh,
            Some(mut old) => {
                let ttl_ms = self.presence.config().ttl.as_millis() as u64;
                let now = now_ms();
                // An entry missing from the snapshot expired if its last write is older than the ttl, else its
                // gateway removed it.
                let events = old.resync(fresh, |v| {
                    if now.saturating_sub(v.at) >= ttl_ms {
                        Departure::GatewayLost
                    } else {
                        Departure::Disconnect
                    }
                });
                self.deliver(&events);
                old
            }
        };
        *self.view.lock() = Some(view);
        self.watching.notify_one();
    }

    /// The writer: one write per [`FLUSH_INTERVAL`] at most while the membership changes, and one every `ttl / 3`.
    /// A failed write is tried again sooner ([`retry_after`]): waiting a whole `ttl / 3` after each failure, two
    /// failures in a row (a leader election of the bucket's stream takes seconds) let the entry expire.
    async fn write(&self, cancel: &CancellationToken) {
        let refresh = self.presence.config().ttl / 3;
        let mut last: Option<Instant> = None;
        let mut next_refresh = Instant::now() + refresh;
        let mut failures = 0u32;
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
            let written = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                w = self.put() => w,
            };
            last = Some(started);
            failures = if written { 0 } else { failures + 1 };
            next_refresh = started
                + if written {
                    refresh
                } else {
                    retry_after(failures).min(refresh)
                };
        }
    }

    /// The room's watch: snapshot, then events; made again if it ends or goes stale ([`RoomPresence::stale`]).
    async fn watch(&self, cancel: &CancellationToken) {
        // The view of the watch that ended, kept to resync the next one against.
        let mut previous: Option<View> = None;
        loop {
            let opened = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                w = self.presence.watch(&self.room) => w,
            };
            match opened {
                Ok(mut watch) => {
                    // The writes acknowledged before the consumer was made are in its snapshot (or overwritten).
                    self.unseen.lock().clear();
                    let mut view = View::new(self.presence.config().max_members);
                    let mut snapshot = watch.pending;
                    if snapshot == 0 {
                        self.install(View::new(self.presence.config().max_members), &mut previous);
                    }
                    loop {
                        let seen = tokio::select! {
                            biased;
                            _ = cancel.cancelled() => return,
                            seen = watch.next() => seen,
                            _ = self.stale() => {
                                tracing::debug!(room = %self.room, "presence watch missed this gateway's write");
                                break;
                            }
                        };
                        let Some(seen) = seen else { break };
                        let Some(seen) = seen else { continue };
                        self.seen(seen.seq);
                        if snapshot > 0 {
                            view.apply(&seen.key, seen.change);
                            snapshot -= 1;
                            if snapshot == 0 || seen.pending == 0 {
                                snapshot = 0;
                                self.install(std::mem::replace(&mut view, View::new(0)), &mut previous);
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
                    // Until the next watch has its snapshot, `presence` reads the bucket.
                    previous = self.view.lock().take().or(previous);
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

/// How long the writer waits before trying again after `failures` failed writes in a row (at least 1): from
/// [`FLUSH_INTERVAL`], doubling, at most [`RETRY_MAX`] (the writer also caps it at `ttl / 3`).
fn retry_after(failures: u32) -> Duration {
    FLUSH_INTERVAL
        .saturating_mul(1 << failures.saturating_sub(1).min(8))
        .min(RETRY_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_writes_are_retried_with_a_bounded_backoff() {
        let ms = |n| retry_after(n).as_millis();
        assert_eq!([ms(1), ms(2), ms(3), ms(4), ms(5)], [150, 300, 600, 1200, 2000]);
        assert_eq!(ms(1000), 2000);
    }
}
