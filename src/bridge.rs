//! The NATS side: one async-nats client per gateway process, the headers that tag client publishes, lifecycle
//! events, and the error type of every NATS operation.
//!
//! async-nats is itself actor-style (a cloneable handle sending commands to one connection task), so [`Bridge`] is a
//! thin, cloneable wrapper that adds the gateway's own timeouts and bookkeeping. It reconnects forever; while it is
//! away `/readyz` answers 503 and client publishes are answered `unavailable` at once rather than buffered.
//!
//! A hung server (paused, or a black-holed link) is noticed by async-nats's own PINGs: one after every
//! `nats.ping_interval` of silence from the server, and the connection is dropped when a third would be outstanding
//! (async-nats's `MAX_PENDING_PINGS` is 2), so within about 3 × `ping_interval` of the server's last word.
//!
//! Client publishes hold their size against one gateway-wide byte budget (`nats.max_pending_bytes`, a semaphore
//! counting bytes) from the moment they are handed to async-nats until the connection has written them
//! ([`Published::confirm`]) or the caller gives up: async-nats buffers up to `nats.client_capacity` *commands* of any
//! size, so without this a stalled server let memory grow by `client_capacity` × message size.
//!
//! The parts, each a file under `bridge/`, re-exported here: `connect` (credentials, [`Bridge::connect`] and the
//! NATS client's events), `publish` (the `HDR_*` headers, [`Bridge::publish`], [`Published`] and the byte budget's
//! releaser), `room_sub` ([`Bridge::subscribe`], [`RoomSub`] and the bookkeeping of subscriptions a server refused)
//! and `error` ([`BridgeError`]). `connect` uses `publish` and `room_sub`; they use neither each other nor it.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_nats::connection::State;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

mod connect;
mod error;
mod publish;
mod room_sub;
mod rpc;

pub use error::BridgeError;
pub use publish::{HDR_CONN, HDR_ECHO, HDR_GATEWAY, HDR_USER, Published};
pub use room_sub::RoomSub;
use room_sub::Subjects;
pub use rpc::{HDR_DEADLINE, RpcFailure};

pub use crate::metrics::Failure;

/// Who published a message, as the gateway tells backends in headers and events.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// Connection id (`<gateway>-<n>`).
    pub conn: &'a str,
    /// Authenticated user, if any.
    pub user: Option<&'a str>,
}

/// Cloneable handle to the gateway's NATS connection.
#[derive(Clone, Debug)]
pub struct Bridge {
    client: async_nats::Client,
    gateway_id: Arc<str>,
    events_prefix: Arc<str>,
    events: bool,
    timeout: Duration,
    /// Subscription id → room, to name the room in slow-consumer logs. One entry per live room.
    sids: Arc<Mutex<HashMap<u64, Arc<str>>>>,
    /// Byte budget of client publishes not yet written to the NATS socket: `nats.max_pending_bytes` permits, one per
    /// byte; a [`Published`] holds its message's share until confirmed or dropped.
    pending: Arc<Semaphore>,
    /// `nats.max_pending_bytes`: a message costing more is refused as `TooLarge` (it could never get the permits).
    max_pending: usize,
    /// Queue of the releaser task ([`publish::release_when_written`]), for the bytes of unconfirmed publishes.
    releaser: tokio::sync::mpsc::UnboundedSender<OwnedSemaphorePermit>,
    /// Subject → (generation, token) of the room subscription on it, so a server-side end of a subscription (a
    /// permissions violation reported by the server) ends the room. One entry per live room ([`RoomSub`] removes
    /// its own entry on drop; the generation keeps a dying instance from removing its successor's).
    subjects: Subjects,
}

impl Bridge {
    /// The NATS client, for the history stream (JetStream API and direct gets).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Whether the NATS connection is up.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// This gateway's id.
    pub fn gateway_id(&self) -> &Arc<str> {
        &self.gateway_id
    }

    /// The NATS server's max payload (bytes).
    pub fn max_payload(&self) -> usize {
        // An atomic async-nats updates on every (re)connect; `server_info()` would clone the whole INFO per publish.
        self.client.max_payload()
    }

    /// Bytes of the byte budget in use right now (handed to NATS, not yet confirmed or dropped).
    pub fn pending_bytes(&self) -> usize {
        self.max_pending.saturating_sub(self.pending.available_permits())
    }

    /// Publishes a lifecycle event (`connect`, `disconnect`, `join`, `leave`) as JSON. Best effort: skipped while
    /// NATS is away, bounded by the publish timeout, never fails the caller.
    pub async fn event(&self, kind: &'static str, origin: Origin<'_>, room: Option<&str>) {
        // Boxed so that callers (every connection task) do not carry this future's size while idle.
        Box::pin(self.event_inner(kind, origin, room)).await
    }

    async fn event_inner(&self, kind: &'static str, origin: Origin<'_>, room: Option<&str>) {
        if !self.events || !self.is_connected() {
            return;
        }
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let body = serde_json::json!({
            "event": kind,
            "conn": origin.conn,
            "gateway": &*self.gateway_id,
            "user": origin.user,
            "room": room,
            "time_ms": time_ms,
        });
        let subject = format!("{}.{kind}", self.events_prefix);
        let payload = Bytes::from(body.to_string());
        let _ = tokio::time::timeout(self.timeout, self.client.publish(subject, payload)).await;
    }

    /// Flushes pending publishes (shutdown), bounded by the publish timeout.
    pub async fn flush(&self) {
        let _ = tokio::time::timeout(self.timeout, self.client.flush()).await;
    }
}
