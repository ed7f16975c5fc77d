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

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_nats::{HeaderMap, Subscriber, connection::State};
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

use crate::{config::NatsConfig, metrics::Metrics};

/// Header naming the gateway instance that published a client message.
pub const HDR_GATEWAY: &str = "Roomwire-Gateway";
/// Header naming the connection that published a client message.
pub const HDR_CONN: &str = "Roomwire-Conn";
/// Header naming the authenticated user (`sub`) that published a client message.
pub const HDR_USER: &str = "Roomwire-User";
/// Header present when the publisher asked to receive its own message (`"echo":true`).
pub const HDR_ECHO: &str = "Roomwire-Echo";

/// Errors of NATS operations, by what the client should be told.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// Could not connect (bad URL, bad credentials file).
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
    /// The NATS connection is down right now.
    #[error("NATS is not connected")]
    Disconnected,
    /// NATS did not accept the operation within the configured timeout.
    #[error("NATS did not answer in time")]
    Timeout,
    /// The payload is over the server's max_payload, or the message over `nats.max_pending_bytes`.
    #[error("payload over the NATS server's max_payload or nats.max_pending_bytes")]
    TooLarge,
    /// The NATS server refused the subscription (permissions violation).
    #[error("NATS refused the subscription")]
    Refused,
    /// Any other NATS client error.
    #[error("NATS error: {0}")]
    Other(String),
}

pub use crate::metrics::Failure;

impl BridgeError {
    /// Its kind, for metrics.
    pub fn kind(&self) -> Failure {
        match self {
            BridgeError::Connect(_) => Failure::Connect,
            BridgeError::Disconnected => Failure::Disconnected,
            BridgeError::Timeout => Failure::Timeout,
            BridgeError::TooLarge => Failure::TooLarge,
            BridgeError::Refused => Failure::Refused,
            BridgeError::Other(_) => Failure::Error,
        }
    }
}

/// Who published a message, as the gateway tells backends in headers and events.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// Connection id (`<gateway>-<n>`).
    pub conn: &'a str,
    /// Authenticated user, if any.
    pub user: Option<&'a str>,
}

/// `nats.creds_file`, `nats.user`/`nats.password`, `nats.token`, `nats.nkey_seed` and TLS to NATS
/// (`nats.tls_*`), as configured.
async fn with_credentials(
    mut opts: async_nats::ConnectOptions,
    cfg: &NatsConfig,
) -> Result<async_nats::ConnectOptions, BridgeError> {
    if let Some(path) = &cfg.creds_file {
        opts = opts
            .credentials_file(path)
            .await
            .map_err(|e| BridgeError::Connect(format!("nats.creds_file {}: {e}", path.display())))?;
    }
    if let (Some(user), Some(pass)) = (&cfg.user, &cfg.password) {
        let pass = pass
            .load("nats.password")
            .map_err(|e| BridgeError::Connect(e.to_string()))?;
        opts = opts.user_and_password(user.clone(), pass.expose().to_string());
    }
    if let Some(token) = &cfg.token {
        let token = token
            .load("nats.token")
            .map_err(|e| BridgeError::Connect(e.to_string()))?;
        opts = opts.token(token.expose().to_string());
    }
    if let Some(seed) = &cfg.nkey_seed {
        let seed = seed
            .load("nats.nkey_seed")
            .map_err(|e| BridgeError::Connect(e.to_string()))?;
        // A malformed seed would only fail inside the first connection attempt, retried forever: check it now.
        nkeys::KeyPair::from_seed(seed.expose())
            .map_err(|e| BridgeError::Connect(format!("nats.nkey_seed: not a valid NKey seed: {e}")))?;
        opts = opts.nkey(seed.expose().to_string());
    }
    let mut tls = cfg.tls_required;
    if let Some(ca) = &cfg.tls_ca_file {
        // async-nats reads the file at connect; a missing or unreadable one must stop the start, not be retried.
        std::fs::metadata(ca).map_err(|e| BridgeError::Connect(format!("nats.tls_ca_file {}: {e}", ca.display())))?;
        opts = opts.add_root_certificates(ca.clone());
        tls = true;
    }
    if let (Some(cert), Some(key)) = (&cfg.tls_cert_file, &cfg.tls_key_file) {
        for (name, path) in [("nats.tls_cert_file", cert), ("nats.tls_key_file", key)] {
            std::fs::metadata(path).map_err(|e| BridgeError::Connect(format!("{name} {}: {e}", path.display())))?;
        }
        opts = opts.add_client_certificate(cert.clone(), key.clone());
        tls = true;
    }
    Ok(opts.require_tls(tls))
}

/// What the NATS client's events change in the gateway (counters, the rooms a server refused), and one log line
/// per event.
struct EventLog {
    /// The outcome of failed connection attempts, read by [`Bridge::connect`]: `Err(reason)` when refused for its
    /// credentials or for TLS (then the start stops with that reason instead of retrying forever in silence),
    /// `Ok(())` for any other failure (unreachable: the gateway starts and retries in the background).
    refused: tokio::sync::watch::Sender<Option<Result<(), String>>>,
    /// The client, once made: a server entering lame-duck mode makes the gateway move to another server at once.
    client: Arc<std::sync::OnceLock<async_nats::Client>>,
    metrics: Arc<Metrics>,
    sids: Arc<Mutex<HashMap<u64, Arc<str>>>>,
    subjects: Subjects,
}

impl EventLog {
    fn on_event(&self, event: async_nats::Event) {
        match event {
            async_nats::Event::ServerError(async_nats::ServerError::Other(text)) => {
                // The server dropped (or refused) a subscription: end the room so that it is not kept registered
                // with nothing behind it (async-nats itself keeps the `Subscriber` open).
                match denied_subscription(&text) {
                    Some((subject, sid)) => {
                        tracing::warn!(subject, sid, "NATS refused a room subscription (permissions violation)");
                        if let Some(e) = self.subjects.lock().get(subject)
                            && (sid.is_none() || e.sid.is_none() || e.sid == sid)
                        {
                            e.token.cancel();
                        }
                    }
                    None => tracing::warn!(error = %text, "NATS server error"),
                }
            }
            async_nats::Event::SlowConsumer(sid) => {
                self.metrics.nats_slow_consumers.inc();
                let room = self.sids.lock().get(&sid).cloned();
                tracing::warn!(
                    sid,
                    room = room.as_deref(),
                    "NATS slow consumer: room fan-out fell behind, messages dropped"
                );
            }
            async_nats::Event::Disconnected => {
                self.metrics.nats_disconnects.inc();
                tracing::warn!("NATS disconnected");
            }
            async_nats::Event::Connected => tracing::info!("NATS connected"),
            async_nats::Event::LameDuckMode => {
                // The server is going away and will close us within its lame-duck duration. Moving now, while it
                // still answers, beats waiting for its close: rooms are resubscribed on the next server, and the
                // WebSocket clients never notice. A lame-duck server takes no new connections, so the reconnect goes
                // elsewhere. One short task per event, not per connection.
                tracing::warn!("NATS server entered lame-duck mode: reconnecting to another server");
                if let Some(client) = self.client.get().cloned() {
                    tokio::spawn(async move {
                        if let Err(e) = client.force_reconnect().await {
                            tracing::warn!(error = %e, "reconnect after lame-duck mode failed");
                        }
                    });
                }
            }
            async_nats::Event::ClientError(async_nats::ClientError::Other(text))
                if ["authorization violation", "failed signing nonce", "TLS error"].contains(&text.as_str()) =>
            {
                tracing::error!(error = %text, "NATS refused the connection");
                self.refused.send_replace(Some(Err(text)));
            }
            async_nats::Event::ClientError(async_nats::ClientError::Other(text)) => {
                tracing::warn!(error = %text, "NATS connection attempt failed");
                self.refused
                    .send_if_modified(|r| r.is_none() && r.replace(Ok(())).is_none());
            }
            other => tracing::info!(event = %other, "NATS event"),
        }
    }
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
    /// Queue of the releaser task ([`release_when_written`]), for the bytes of unconfirmed publishes.
    releaser: tokio::sync::mpsc::UnboundedSender<OwnedSemaphorePermit>,
    /// Subject → (generation, token) of the room subscription on it, so a server-side end of a subscription (a
    /// permissions violation reported by the server) ends the room. One entry per live room ([`RoomSub`] removes
    /// its own entry on drop; the generation keeps a dying instance from removing its successor's).
    subjects: Subjects,
}

type Subjects = Arc<Mutex<HashMap<String, SubEntry>>>;

/// What the event callback needs to end one room subscription.
#[derive(Debug)]
struct SubEntry {
    generation: u64,
    /// Known once async-nats has handed out the `Subscriber`; lets a reload's report (which names the sid) end
    /// exactly the subscription it removed, not a newer one on the same subject.
    sid: Option<u64>,
    token: tokio_util::sync::CancellationToken,
}

/// Bytes a client publish costs besides its payload, subject and header values: the `HPUB` line, `NATS/1.0`, the
/// four header names and their framing (an upper bound, so the budget errs on the safe side).
const HEADER_OVERHEAD: usize = 160;

/// Source of [`RoomSub`] generations (unique per process).
static NEXT_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A room's live NATS subscription. [`RoomSub::next`] ends (`None`) when async-nats ends the subscription or when the
/// server reports that it refused or removed it; dropping it unsubscribes and forgets its bookkeeping.
#[derive(Debug)]
pub struct RoomSub {
    /// `None` only while [`Bridge::subscribe`] is still making it.
    sub: Option<Subscriber>,
    subject: String,
    generation: u64,
    sid: Option<u64>,
    /// Cancelled by the event callback when the server refuses or removes this subscription.
    denied: tokio_util::sync::CancellationToken,
    sids: Arc<Mutex<HashMap<u64, Arc<str>>>>,
    subjects: Subjects,
}

impl RoomSub {
    /// The next message, or `None` once the subscription is over (whoever ended it).
    pub async fn next(&mut self) -> Option<async_nats::Message> {
        let sub = self.sub.as_mut()?;
        tokio::select! {
            biased;
            _ = self.denied.cancelled() => None,
            msg = futures_util::StreamExt::next(sub) => msg,
        }
    }

    /// Whether the server reported that it refused or removed this subscription.
    pub fn denied(&self) -> bool {
        self.denied.is_cancelled()
    }
}

impl Drop for RoomSub {
    fn drop(&mut self) {
        if let Some(sid) = self.sid {
            self.sids.lock().remove(&sid);
        }
        let mut subjects = self.subjects.lock();
        if subjects
            .get(&self.subject)
            .is_some_and(|e| e.generation == self.generation)
        {
            subjects.remove(&self.subject);
        }
        // Dropping `sub` (after this) unsubscribes on NATS.
    }
}

/// A client publish handed to the NATS client; holds its bytes against `nats.max_pending_bytes` until confirmed or
/// dropped.
///
/// "Released" means released by the caller: a message whose confirmation timed out, or that was dropped
/// unconfirmed, is still in async-nats's buffers, so its bytes pass to the bridge's releaser task, which gives them
/// back only once the NATS connection has written everything handed to it so far (or the client is closed). The
/// budget therefore bounds the bytes really waiting for NATS, not just those someone still waits on.
#[derive(Debug)]
pub struct Published {
    /// `None` once handed on (confirmed, or passed to the releaser).
    permit: Option<OwnedSemaphorePermit>,
    client: async_nats::Client,
    releaser: tokio::sync::mpsc::UnboundedSender<OwnedSemaphorePermit>,
    /// JetStream's acknowledgement, for a message published to the history stream.
    ack: Option<async_nats::jetstream::context::PublishAckFuture>,
}

impl Published {
    /// Waits until the NATS connection has written it (flush), at most until `deadline`; releases the bytes.
    ///
    /// A flush covers everything handed to the connection before it, so this confirms this message (core NATS has
    /// no per-message acknowledgement: "written to the server's socket" is what accepted means). A stalled or
    /// vanished server gives `Timeout` or `Disconnected`; then the bytes stay counted until NATS writes the message
    /// (see the type's doc).
    ///
    /// A message published to the history stream is confirmed by JetStream's acknowledgement instead, which says
    /// it is stored; its sequence is returned (`None` for a core publish).
    pub async fn confirm(mut self, deadline: Instant) -> Result<Option<u64>, BridgeError> {
        if let Some(ack) = self.ack.take() {
            let ack = tokio::time::timeout_at(deadline, ack.into_future())
                .await
                .map_err(|_| BridgeError::Timeout)?
                .map_err(|e| BridgeError::Other(e.to_string()))?;
            // Stored, so written: the bytes are free.
            drop(self.permit.take());
            return Ok(Some(ack.sequence));
        }
        tokio::time::timeout_at(deadline, self.client.flush())
            .await
            .map_err(|_| BridgeError::Timeout)?
            .map_err(|e| BridgeError::Other(e.to_string()))?;
        // Written: the bytes are free now, whatever the connection's state.
        drop(self.permit.take());
        if self.client.connection_state() == State::Connected {
            Ok(None)
        } else {
            Err(BridgeError::Disconnected)
        }
    }
}

impl Drop for Published {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            // If the releaser is gone (client closed), the permit is dropped here: nothing will be written anyway.
            let _ = self.releaser.send(permit);
        }
    }
}

/// Gives back the bytes of unconfirmed publishes once NATS has written them: takes every permit queued, flushes the
/// client (which completes once everything handed to it before is written, also across a reconnect), then drops
/// them. Ends when the bridge and every `Published` are gone. A closed client fails the flush at once: nothing
/// more will be written, so the bytes are given back rather than blocking publishes forever.
///
/// The queue is unbounded as a channel, but bounded by the byte budget itself: each permit in it holds at least
/// `HEADER_OVERHEAD` bytes of `nats.max_pending_bytes`.
async fn release_when_written(
    client: async_nats::Client,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<OwnedSemaphorePermit>,
) {
    let mut batch = Vec::new();
    while queue.recv_many(&mut batch, 1024).await > 0 {
        // An error means the client is closed: nothing more will be written, so the bytes are free as well.
        let _ = client.flush().await;
        batch.clear();
    }
}

impl Bridge {
    /// Connects (retrying in the background if NATS is not up yet, so the gateway starts and reports not-ready).
    pub async fn connect(cfg: &NatsConfig, gateway_id: Arc<str>, metrics: Arc<Metrics>) -> Result<Self, BridgeError> {
        let sids: Arc<Mutex<HashMap<u64, Arc<str>>>> = Arc::default();
        let mut opts = async_nats::ConnectOptions::new()
            .name(&cfg.name)
            .connection_timeout(cfg.connect_timeout)
            .subscription_capacity(cfg.subscription_capacity)
            .client_capacity(cfg.client_capacity)
            .ping_interval(cfg.ping_interval)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                // 0, 100 ms, 200 ms, ... capped at 2 s: fast recovery after a NATS restart, no busy loop.
                Duration::from_millis((attempts as u64 * 100).min(2000))
            });
        opts = with_credentials(opts, cfg).await?;
        let subjects: Subjects = Arc::default();
        let (refused, mut refusal) = tokio::sync::watch::channel(None);
        let client_cell: Arc<std::sync::OnceLock<async_nats::Client>> = Arc::default();
        let events = Arc::new(EventLog {
            refused,
            client: client_cell.clone(),
            metrics,
            sids: sids.clone(),
            subjects: subjects.clone(),
        });
        opts = opts.event_callback(move |event| {
            let events = events.clone();
            async move { events.on_event(event) }
        });
        let urls: Vec<async_nats::ServerAddr> = cfg
            .url
            .to_vec()
            .iter()
            .map(|u| {
                u.parse()
                    .map_err(|e| BridgeError::Connect(format!("nats.url {u:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let client = opts
            .connect(urls)
            .await
            .map_err(|e| BridgeError::Connect(e.to_string()))?;
        let _ = client_cell.set(client.clone());
        // The first attempts run in the background (the gateway starts even if NATS is not up yet). A server that
        // answers but refuses the credentials or the TLS setup would be retried forever with nothing but a log line:
        // wait for the first outcome (bounded) and make a refusal a startup error that names it.
        let first_outcome = async {
            loop {
                match refusal.borrow_and_update().clone() {
                    Some(Err(reason)) => return Some(reason),
                    Some(Ok(())) => return None,
                    None => {}
                }
                if client.connection_state() == State::Connected {
                    return None;
                }
                tokio::select! {
                    _ = refusal.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        };
        if let Ok(Some(reason)) = tokio::time::timeout(cfg.connect_timeout, first_outcome).await {
            return Err(BridgeError::Connect(format!(
                "NATS refused the connection ({reason}): check nats.user/password, nats.token, nats.creds_file, \
                 nats.nkey_seed and nats.tls_*"
            )));
        }
        // Unbounded in type only: every entry holds at least 160 of the `nats.max_pending_bytes` byte permits.
        let (releaser, queue) = tokio::sync::mpsc::unbounded_channel();
        // Not on the gateway's tracker: it holds nothing a shutdown must wait for, and ends with the client.
        tokio::spawn(release_when_written(client.clone(), queue));
        Ok(Self {
            releaser,
            client,
            gateway_id,
            events_prefix: cfg.events_prefix.as_str().into(),
            events: cfg.events,
            timeout: cfg.publish_timeout,
            sids,
            pending: Arc::new(Semaphore::new(cfg.max_pending_bytes)),
            max_pending: cfg.max_pending_bytes,
            subjects,
        })
    }

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

    /// Waits for byte budget (until `deadline`), then hands the message to async-nats (until `deadline`).
    ///
    /// Refused at once while NATS is away (`Disconnected`), so nothing piles up for a dead link, and when it can never
    /// fit (`TooLarge`: over the server's `max_payload` or over `nats.max_pending_bytes`). Messages of one caller are
    /// handed over in call order.
    ///
    /// With `store` (a history room: the JetStream context and the message id), the message is published to the
    /// stream with a `Nats-Msg-Id` header, and [`Published::confirm`] waits for JetStream's acknowledgement and
    /// returns the stored sequence.
    pub async fn publish(
        &self,
        subject: String,
        origin: Origin<'_>,
        echo: bool,
        payload: Bytes,
        store: Option<(&async_nats::jetstream::Context, &str)>,
        deadline: Instant,
    ) -> Result<Published, BridgeError> {
        if !self.is_connected() {
            return Err(BridgeError::Disconnected);
        }
        let max = self.max_payload();
        if max > 0 && payload.len() > max {
            return Err(BridgeError::TooLarge);
        }
        // What the message costs while it waits: payload, subject and headers (their names and framing included).
        let cost = payload
            .len()
            .saturating_add(subject.len())
            .saturating_add(self.gateway_id.len())
            .saturating_add(origin.conn.len())
            .saturating_add(origin.user.map_or(0, str::len))
            .saturating_add(HEADER_OVERHEAD);
        if cost > self.max_pending {
            return Err(BridgeError::TooLarge);
        }
        // `max_pending` ≤ u32::MAX (validated), so the cast cannot truncate.
        let permit = tokio::time::timeout_at(deadline, self.pending.clone().acquire_many_owned(cost as u32))
            .await
            .map_err(|_| BridgeError::Timeout)?
            .map_err(|_| BridgeError::Disconnected)?;
        let mut headers = HeaderMap::new();
        headers.insert(HDR_GATEWAY, &*self.gateway_id);
        headers.insert(HDR_CONN, origin.conn);
        if let Some(user) = origin.user {
            headers.insert(HDR_USER, user);
        }
        if echo {
            headers.insert(HDR_ECHO, "1");
        }
        let ack = match store {
            None => {
                tokio::time::timeout_at(deadline, self.client.publish_with_headers(subject, headers, payload))
                    .await
                    .map_err(|_| BridgeError::Timeout)?
                    .map_err(|e| BridgeError::Other(e.to_string()))?;
                None
            }
            Some((js, msg_id)) => {
                let message = async_nats::jetstream::message::PublishMessage::build()
                    .payload(payload)
                    .headers(headers)
                    .message_id(msg_id);
                let ack = tokio::time::timeout_at(deadline, js.send_publish(subject, message))
                    .await
                    .map_err(|_| BridgeError::Timeout)?
                    .map_err(|e| BridgeError::Other(e.to_string()))?;
                Some(ack)
            }
        };
        Ok(Published {
            permit: Some(permit),
            client: self.client.clone(),
            releaser: self.releaser.clone(),
            ack,
        })
    }

    /// Subscribes to a room's subject and waits until the server has the subscription (a round trip, see
    /// `Bridge::round_trip`), so a message published by anyone right after the client's join ack is delivered.
    pub async fn subscribe(&self, subject: String, room: &Arc<str>) -> Result<RoomSub, BridgeError> {
        if !self.is_connected() {
            return Err(BridgeError::Disconnected);
        }
        // Registered before the SUB is sent, so a refusal the server sends in answer to it is not missed.
        let denied = tokio_util::sync::CancellationToken::new();
        let generation = NEXT_GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.subjects.lock().insert(
            subject.clone(),
            SubEntry {
                generation,
                sid: None,
                token: denied.clone(),
            },
        );
        let mut room_sub = RoomSub {
            sub: None,
            subject,
            generation,
            sid: None,
            denied,
            sids: self.sids.clone(),
            subjects: self.subjects.clone(),
        };
        let op = async {
            let sub = self
                .client
                .subscribe(room_sub.subject.clone())
                .await
                .map_err(|e| BridgeError::Other(e.to_string()))?;
            room_sub.sid = subscriber_sid(&sub);
            room_sub.sub = Some(sub);
            if let Some(e) = self.subjects.lock().get_mut(&room_sub.subject)
                && e.generation == generation
            {
                e.sid = room_sub.sid;
            }
            self.round_trip().await
        };
        // On any error `room_sub` is dropped here, which unsubscribes and forgets it.
        tokio::time::timeout(self.timeout, op)
            .await
            .map_err(|_| BridgeError::Timeout)??;
        if room_sub.denied.is_cancelled() {
            return Err(BridgeError::Refused);
        }
        if let Some(sid) = room_sub.sid {
            self.sids.lock().insert(sid, room.clone());
        }
        Ok(room_sub)
    }

    /// Returns once the server has processed every command sent before it on this connection. `flush` only writes
    /// to the socket, and the server may still not have registered a SUB when a publish from another connection
    /// arrives; async-nats exposes no PING, so an empty message to a fresh inbox (`_INBOX.*`) does the round trip.
    async fn round_trip(&self) -> Result<(), BridgeError> {
        let other = |e: &dyn std::fmt::Display| BridgeError::Other(e.to_string());
        let inbox = self.client.new_inbox();
        let mut probe = self.client.subscribe(inbox.clone()).await.map_err(|e| other(&e))?;
        self.client.publish(inbox, Bytes::new()).await.map_err(|e| other(&e))?;
        self.client.flush().await.map_err(|e| other(&e))?;
        match futures_util::StreamExt::next(&mut probe).await {
            Some(_) => Ok(()),
            None => Err(BridgeError::Disconnected),
        }
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

/// The subject (and sid, when given) of a server error that reports a refused or removed subscription: nats-server
/// sends `Permissions Violation for Subscription to "<subject>"` when a SUB is not allowed and, after a config
/// reload that revokes it, `... to "<subject>" (sid "<sid>")` for every existing subscription it removes. The text
/// is nats-server's (`server/client.go`); `denied_subscription_parses_server_text` pins the parsing, and a test
/// against a real server reloads permissions to prove it end to end.
fn denied_subscription(text: &str) -> Option<(&str, Option<u64>)> {
    let rest = text.trim().trim_matches('\'');
    let prefix = "permissions violation for subscription to ";
    let head = rest.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    // The subject is quoted; a queue-group form adds ` using queue "<q>"` after it.
    let quoted = rest[prefix.len()..].trim().strip_prefix('"')?;
    let (subject, tail) = quoted.split_once('"')?;
    let sid = tail
        .split_once("(sid \"")
        .and_then(|(_, t)| t.split('"').next())
        .and_then(|n| n.parse().ok());
    (!subject.is_empty()).then_some((subject, sid))
}

/// async-nats keeps the subscription id private; its `Debug` output (`Subscriber { sid: N, .. }`) is the only way to
/// learn it, and it is needed only to name the room in slow-consumer logs. Returns None if the format changes;
/// `subscriber_sid_reads_debug_format` pins the format of the async-nats version in use, so an upgrade that changes
/// it fails the tests instead of silently dropping room names from the logs.
fn subscriber_sid(sub: &Subscriber) -> Option<u64> {
    let dbg = format!("{sub:?}");
    let rest = dbg.split("sid: ").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_subscription_parses_server_text() {
        // As async-nats hands over nats-server's `-ERR '...'` text (quotes around the whole text stripped or not).
        let plain = r#"Permissions Violation for Subscription to "rooms.secret""#;
        assert_eq!(denied_subscription(plain), Some(("rooms.secret", None)));
        assert_eq!(denied_subscription(&format!("'{plain}'")), Some(("rooms.secret", None)));
        let queue = r#"Permissions Violation for Subscription to "rooms.a" using queue "q""#;
        assert_eq!(denied_subscription(queue), Some(("rooms.a", None)));
        assert_eq!(
            denied_subscription(r#"permissions violation for subscription to "x.y""#),
            Some(("x.y", None))
        );
        // After a config reload revokes a subscription (nats-server `processSubsOnConfigReload`).
        let reload = r#"Permissions Violation for Subscription to "rooms.secret" (sid "5")"#;
        assert_eq!(denied_subscription(reload), Some(("rooms.secret", Some(5))));
        assert_eq!(
            denied_subscription(r#"Permissions Violation for Publish to "rooms.a""#),
            None
        );
        assert_eq!(denied_subscription("maximum subscriptions exceeded"), None);
        assert_eq!(
            denied_subscription(r#"Permissions Violation for Subscription to """#),
            None
        );
        assert_eq!(denied_subscription("Permissions"), None);
    }

    /// Pins the `Debug` format `subscriber_sid` reads: if an async-nats upgrade changes it, this fails. No server is
    /// needed: with `retry_on_initial_connect` the client hands out subscribers before it is connected.
    #[tokio::test]
    async fn subscriber_sid_reads_debug_format() {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("nats://127.0.0.1:1")
            .await
            .expect("client without a server");
        let a = client.subscribe("a").await.expect("subscribe a");
        let b = client.subscribe("b").await.expect("subscribe b");
        let (sa, sb) = (subscriber_sid(&a), subscriber_sid(&b));
        assert!(sa.is_some() && sb.is_some(), "Debug format changed: {a:?}");
        assert_ne!(sa, sb, "each subscription has its own id");
        assert!(format!("{a:?}").contains(&format!("sid: {}", sa.unwrap_or(0))));
    }
}
