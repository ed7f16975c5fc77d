//! One upgraded WebSocket: a reader (this task) and a writer task, with one bounded [`Outbox`] between the world and
//! the writer.
//!
//! The writer alone owns the sink. It takes everything queued at once, feeds it and flushes once, under
//! `limits.write_timeout`; it also sends the heartbeat pings. The reader parses client ops, joins and leaves rooms,
//! forwards publishes to NATS, and watches the heartbeat and token deadlines. Every frame was already charged to the
//! rate limits as it arrived (see [`crate::frames`]); the reader only acts on the verdict.
//!
//! How a connection always ends (a task that cannot end would hold its socket and slots until restart):
//! - the connection has one `CancellationToken` (a child of the root shutdown). The writer cancels it whenever it stops
//!   (its socket failed, a write timed out, it sent the close frame), and closes the outbox first, so anything waiting
//!   for queue space wakes up;
//! - every wait of the reader (a frame, queue space, NATS, a token check) sits in a `select!` with that token;
//! - publishes awaiting NATS confirmation are futures owned by the reader's loop, not spawned tasks: at
//!   most `limits.max_inflight_publishes` of them (past that the reader stops reading, so TCP pushes back on the
//!   client), each bounded by its deadline, and they are dropped with the connection;
//! - `Conn`'s `Drop` leaves every room, closes the outbox, cancels the writer and releases the global and per-IP
//!   slots, so even a panic in the reader gives everything back.
//!
//! Every way a connection ends maps to one close code (see `protocol::close` and `docs/protocol.md`); whatever ends
//! it, the connection leaves all its rooms and a `disconnect` event is published.

use std::{collections::HashMap, collections::VecDeque, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::{
    SinkExt, StreamExt,
    stream::{FuturesUnordered, SplitSink, SplitStream},
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::Instant,
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        self, Message, Utf8Bytes,
        protocol::{CloseFrame, frame::coding::CloseCode},
    },
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    auth::{AuthError, Identity, Session},
    bridge::{BridgeError, Origin},
    frames::Meter,
    gateway::Gateway,
    limits::ConnSlot,
    metrics::{Closed, SlowConsumer},
    outbox::{CloseRequest, Item, Outbox},
    protocol::{self, ClientOp, ErrorCode, close},
    room_quota::{QuotaError, QuotaKey},
    rooms::{Hold, JoinError, Member, Room},
};

mod recovery;

/// What the HTTP layer hands over after a successful upgrade.
#[derive(Debug)]
pub struct Accepted {
    /// Local connection number.
    pub id: u64,
    /// Client address (after trusted-proxy resolution).
    pub peer: SocketAddr,
    /// Who the client is.
    pub identity: Identity,
    /// The connection's global permit and per-address count; released when the connection ends.
    pub slot: ConnSlot,
    /// Rate-limit verdicts of the frames the socket wrapper charged (see [`crate::frames`]).
    pub meter: Arc<Meter>,
}

/// A publish awaiting NATS confirmation; yields the reply frame, if the client asked for one (an `id`).
type Confirm = Pin<Box<dyn Future<Output = Option<String>> + Send>>;

/// What handling one message asks of the reader.
enum Handled {
    /// Nothing more.
    Done,
    /// Poll this publish confirmation beside reading.
    Confirm(Confirm),
    /// Close the connection.
    Close(CloseRequest),
}

/// Starts serving one upgraded WebSocket: spawns its writer and returns the session, which is the connection's task.
///
/// Setup is synchronous on purpose: the returned future then holds only what lives as long as the connection
/// (an async fn would also keep its arguments' slots, the whole `WebSocketStream` among them, for the connection's
/// lifetime, which is measurable memory per idle connection).
pub fn start<S>(gw: Arc<Gateway>, ws: WebSocketStream<S>, accepted: Accepted) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sink, stream) = ws.split();
    let conn = Conn::new(gw, accepted);
    // The queue is empty, so the welcome always fits.
    let welcome = protocol::welcome(&conn.conn_id, conn.gw.id(), conn.identity.user.as_deref());
    conn.outbox.try_push_control(Utf8Bytes::from(welcome));
    let writer = write_loop(sink, conn.outbox.clone(), conn.cancel.clone(), conn.gw.clone());
    let writer = conn.gw.spawn(writer.instrument(tracing::Span::current()));
    session(conn, stream, writer)
}

/// The reader side of a connection, then the cleanup every way of ending shares.
async fn session<S>(mut conn: Conn, stream: SplitStream<WebSocketStream<S>>, writer: tokio::task::JoinHandle<()>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let gw = conn.gw.clone();
    conn.event("connect", None).await;
    tracing::debug!(conn = %conn.conn_id, user = conn.identity.user.as_deref(), "connected");

    let end = conn.read_loop(stream).await;
    // The first close request wins: if the writer failed, its reason is the one the outbox keeps.
    conn.outbox.close(end);
    let end = conn
        .outbox
        .close_request()
        .unwrap_or_else(|| close_req(close::NORMAL, "", true));
    tracing::debug!(conn = %conn.conn_id, code = end.code, reason = end.reason, "connection closing");

    // Leave every room before anything else so fan-out stops queueing for us.
    let rooms = conn.leave_all();
    // The writer flushes (or not, per the close request) and sends the close frame; bounded by write_timeout.
    let grace = gw.config().limits.write_timeout + Duration::from_millis(100);
    if tokio::time::timeout(grace, writer).await.is_err() {
        tracing::debug!(conn = %conn.conn_id, "writer did not finish in time");
    }
    let (conn_id, user) = (conn.conn_id.clone(), conn.identity.user.clone());
    // Releases the global and per-IP slots and the gauges now, not after the events below.
    drop(conn);
    let origin = Origin {
        conn: &conn_id,
        user: user.as_deref(),
    };
    // Best effort and bounded as a whole: a NATS outage must not keep a finished connection's task around.
    let events = async {
        for room in &rooms {
            gw.bridge().event("leave", origin, Some(room)).await;
        }
        gw.bridge().event("disconnect", origin, None).await;
    };
    let _ = tokio::time::timeout(gw.config().nats.publish_timeout, events).await;
    tracing::debug!(conn = %conn_id, "disconnected");
}

/// Per-connection state owned by the reader. Dropping it gives back everything the connection held (see `Drop`).
struct Conn {
    gw: Arc<Gateway>,
    id: u64,
    /// Client address (after trusted-proxy resolution): the room-quota key of anonymous connections.
    peer: SocketAddr,
    conn_id: Arc<str>,
    identity: Identity,
    outbox: Arc<Outbox>,
    /// Ends the connection: cancelled by the writer when it stops, by the root shutdown (it is a child), and on drop.
    cancel: CancellationToken,
    /// Verdicts of the rate limits, one per received message.
    meter: Arc<Meter>,
    /// Joined rooms. Bound: `rooms.max_rooms_per_connection`.
    rooms: HashMap<Arc<str>, Arc<Room>>,
    /// Set by `refresh`: the token deadlines must be recomputed.
    token_changed: bool,
    /// End of the session (`auth.max_session` from the upgrade) and the `refresh` budget.
    session: Session,
    /// Global permit and per-address count, released when the connection (this struct) is dropped.
    _slot: ConnSlot,
}

impl Drop for Conn {
    /// Runs however the connection ends, a panic included: rooms, outbox, writer, gauge and slots are given back.
    fn drop(&mut self) {
        for room in self.rooms.keys() {
            self.gw.rooms().leave(room, self.id);
        }
        self.outbox.close(close_req(close::INTERNAL, "internal error", false));
        self.cancel.cancel();
        self.gw.metrics().connections_open.dec();
    }
}

fn close_req(code: u16, reason: &'static str, flush_queued: bool) -> CloseRequest {
    CloseRequest {
        code,
        reason,
        flush_queued,
    }
}

impl Conn {
    fn new(gw: Arc<Gateway>, accepted: Accepted) -> Self {
        let Accepted {
            id,
            peer,
            identity,
            slot,
            meter,
        } = accepted;
        let conn_id: Arc<str> = format!("{}-{}", gw.id(), id).into();
        let outbox = Arc::new(Outbox::new(
            gw.config().limits.max_pending_messages,
            gw.config().limits.max_pending_bytes,
        ));
        gw.metrics().connections.inc();
        gw.metrics().connections_open.inc();
        Conn {
            session: Session::new(gw.config(), &identity, Instant::now()),
            cancel: gw.shutdown().child_token(),
            gw,
            id,
            peer,
            conn_id,
            identity,
            outbox,
            meter,
            rooms: HashMap::new(),
            token_changed: false,
            _slot: slot,
        }
    }

    /// Who this connection is, as NATS headers and events name it.
    fn origin(&self) -> Origin<'_> {
        Origin {
            conn: &self.conn_id,
            user: self.identity.user.as_deref(),
        }
    }

    /// Publishes a lifecycle event for this connection.
    async fn event(&self, kind: &'static str, room: Option<&str>) {
        self.gw.bridge().event(kind, self.origin(), room).await;
    }

    /// Reads until the client leaves, a deadline passes or the connection is cancelled; returns how to close.
    async fn read_loop<S>(&mut self, mut stream: SplitStream<WebSocketStream<S>>) -> CloseRequest
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let cancel = self.cancel.clone();
        let heartbeat_timeout = self.gw.config().limits.heartbeat_timeout;
        let max_inflight = self.gw.config().limits.max_inflight_publishes;
        // Timers are created once and re-armed, not rebuilt per frame: a busy connection costs no timer churn.
        // `last_seen` is refreshed per frame; the heartbeat timer re-arms itself from it when it fires.
        let mut last_seen = Instant::now();
        let heartbeat = tokio::time::sleep_until(last_seen + heartbeat_timeout);
        tokio::pin!(heartbeat);
        let (mut warn_at, mut expire_at) = self.token_deadlines();
        let far = || Instant::now() + Duration::from_secs(86_400 * 365);
        let warn = tokio::time::sleep_until(warn_at.unwrap_or_else(far));
        let expire = tokio::time::sleep_until(expire_at.unwrap_or_else(far));
        tokio::pin!(warn, expire);
        // Publishes awaiting NATS confirmation. Bound: `limits.max_inflight_publishes` (the reader stops reading at
        // it). A local, not a field: the handlers borrow `self` across awaits, which would need these futures `Sync`.
        let mut confirms: FuturesUnordered<Confirm> = FuturesUnordered::new();
        // This connection's moment to close during a drain (armed only once the drain starts).
        let drain_turn = crate::shutdown::drain_turn(self.gw.drain().clone(), self.gw.config().server.drain_window);
        tokio::pin!(drain_turn);
        loop {
            if self.token_changed {
                self.token_changed = false;
                (warn_at, expire_at) = self.token_deadlines();
                warn.as_mut().reset(warn_at.unwrap_or_else(far));
                expire.as_mut().reset(expire_at.unwrap_or_else(far));
            }
            let reading = confirms.len() < max_inflight;
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return self.cancelled(),
                // Flushed, then 1001 with the reason that tells the client library to reconnect elsewhere, later.
                _ = &mut drain_turn => return close_req(close::GOING_AWAY, close::DRAIN_REASON, true),
                _ = &mut heartbeat => {
                    let due = last_seen + heartbeat_timeout;
                    if due > Instant::now() {
                        heartbeat.as_mut().reset(due);
                        continue;
                    }
                    self.gw.metrics().closes.inc(Closed::HeartbeatTimeout);
                    return close_req(close::GOING_AWAY, "heartbeat timeout", false);
                }
                _ = &mut expire, if expire_at.is_some() => {
                    self.gw.metrics().closes.inc(Closed::TokenExpired);
                    return close_req(close::TOKEN_EXPIRED, "token expired", true);
                }
                _ = &mut warn, if warn_at.is_some() => {
                    let secs = expire_at.map_or(0, |e| e.saturating_duration_since(Instant::now()).as_secs());
                    self.send(protocol::token_expiring(secs)).await;
                    warn_at = None;
                }
                Some(reply) = confirms.next(), if !confirms.is_empty() => {
                    if let Some(frame) = reply {
                        self.send(frame).await;
                    }
                }
                frame = stream.next(), if reading => {
                    last_seen = Instant::now();
                    let msg = match frame {
                        None => return close_req(close::NORMAL, "", true),
                        Some(Err(e)) => return self.read_error(e),
                        Some(Ok(msg)) => msg,
                    };
                    let refused = self.meter.next_refused();
                    // Boxed: the request handlers' futures are large, and inline they would be part of every idle
                    // connection's task; boxed, only a connection handling a frame pays for them.
                    let handled = Box::pin(self.on_message(msg, refused, last_seen));
                    let outcome = tokio::select! {
                        biased;
                        _ = cancel.cancelled() => return self.cancelled(),
                        outcome = handled => outcome,
                    };
                    match outcome {
                        Handled::Done => {}
                        Handled::Confirm(confirm) => confirms.push(confirm),
                        Handled::Close(req) => return req,
                    }
                }
            }
        }
    }

    /// The close to report once the connection's token is cancelled: the writer's reason if it stopped first,
    /// otherwise a shutdown.
    fn cancelled(&self) -> CloseRequest {
        self.outbox
            .close_request()
            .unwrap_or_else(|| close_req(close::GOING_AWAY, "server shutting down", true))
    }

    /// Maps a read error to the close the client sees.
    fn read_error(&self, e: tungstenite::Error) -> CloseRequest {
        let m = &self.gw.metrics();
        if self.meter.abusive() {
            m.closes.inc(Closed::RateAbuse);
            // Flushed: the client sees the `rate_limited` answers that led here (bounded by the queue).
            return close_req(close::POLICY, "rate limit exceeded repeatedly", true);
        }
        match read_error_close(&e) {
            Some((code, reason, label)) => {
                tracing::info!(error = %e, code, "closing on a read error");
                m.closes.inc(label);
                close_req(code, reason, false)
            }
            None => {
                tracing::debug!(error = %e, "read error");
                close_req(close::NORMAL, "", false)
            }
        }
    }

    /// Instants of the expiry warning and of the expiry (the token's `exp` + leeway, or the end of the session if
    /// earlier), for a connection with a token. Saturating: no `exp` can make this panic.
    fn token_deadlines(&self) -> (Option<Instant>, Option<Instant>) {
        let now = Instant::now();
        let Some(expire) = self.session.expiry(&self.identity, now) else {
            return (None, None);
        };
        let warn = expire.checked_sub(self.gw.config().auth.expiry_warning).unwrap_or(now);
        (Some(warn), Some(expire))
    }

    /// Queues a reply, waiting for queue space (which stops reading from a client that does not read its replies)
    /// but never past the connection's end.
    async fn send(&self, frame: String) {
        tokio::select! {
            _ = self.cancel.cancelled() => {}
            _ = self.outbox.push_control(Utf8Bytes::from(frame)) => {}
        }
    }

    async fn ack(&self, id: Option<&str>) {
        if let Some(id) = id {
            self.send(protocol::ack(id)).await;
        }
    }

    async fn error(&self, id: Option<&str>, code: ErrorCode, message: &str) {
        self.gw.metrics().errors.inc(code);
        self.send(protocol::error(id, code, message)).await;
    }

    /// Handles one message.
    async fn on_message(&mut self, msg: Message, refused: bool, arrived: Instant) -> Handled {
        match msg {
            Message::Text(text) => {
                self.gw.metrics().frames_in.inc();
                self.gw.metrics().bytes_in.inc_by(text.len() as u64);
                if refused {
                    let id = protocol::parse_request_with_depth(&text, self.gw.config().limits.max_json_depth)
                        .ok()
                        .and_then(|r| r.id);
                    self.rate_limited(id).await;
                } else {
                    return self.on_text(&text, arrived).await;
                }
            }
            Message::Binary(data) => {
                self.gw.metrics().frames_in.inc();
                self.gw.metrics().bytes_in.inc_by(data.len() as u64);
                if refused {
                    self.rate_limited(None).await;
                } else {
                    self.error(
                        None,
                        ErrorCode::BadRequest,
                        "binary frames are not supported in protocol v1",
                    )
                    .await;
                }
            }
            Message::Close(_) => return Handled::Close(close_req(close::NORMAL, "", true)),
            // Already charged by the meter; tungstenite answers pings itself.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
        Handled::Done
    }

    async fn rate_limited(&self, id: Option<&str>) {
        self.error(id, ErrorCode::RateLimited, "rate limit exceeded; message not processed")
            .await;
    }

    /// Handles one text frame within the rate limits.
    async fn on_text(&mut self, text: &str, arrived: Instant) -> Handled {
        let request = match protocol::parse_request_with_depth(text, self.gw.config().limits.max_json_depth) {
            Ok(r) => r,
            Err(e) => {
                self.error(e.id, ErrorCode::BadRequest, &e.message).await;
                return Handled::Done;
            }
        };
        let id = request.id;
        match request.op {
            ClientOp::Ping => self.send(protocol::pong(id)).await,
            ClientOp::Join { room, since } => self.join(id, &room, since).await,
            ClientOp::History { room, limit } => self.history(id, &room, limit).await,
            ClientOp::Leave { room } => self.leave(id, &room).await,
            ClientOp::Publish {
                room,
                data,
                echo,
                msg_id,
            } => {
                return match self.publish(id, &room, &data, echo, msg_id.as_deref(), arrived).await {
                    Some(confirm) => Handled::Confirm(confirm),
                    None => Handled::Done,
                };
            }
            ClientOp::Refresh { token } => self.refresh(id, &token).await,
        }
        Handled::Done
    }

    /// Leaves every joined room (no events); returns their names.
    fn leave_all(&mut self) -> Vec<Arc<str>> {
        let rooms: Vec<Arc<str>> = self.rooms.drain().map(|(name, _)| name).collect();
        for room in &rooms {
            self.gw.rooms().leave(room, self.id);
        }
        rooms
    }

    /// Leaves one joined room: registry, pending gap count, and the `leave` event.
    async fn leave_room(&mut self, room: &str) -> bool {
        if self.rooms.remove(room).is_none() {
            return false;
        }
        self.gw.rooms().leave(room, self.id);
        self.outbox.forget_room(room);
        self.event("leave", Some(room)).await;
        true
    }

    async fn check_room(&self, id: Option<&str>, room: &str) -> bool {
        if protocol::valid_room(room) {
            return true;
        }
        self.error(
            id,
            ErrorCode::InvalidRoom,
            "room names are 1-128 characters of A-Z a-z 0-9 _ - : @ = +",
        )
        .await;
        false
    }

    async fn join(&mut self, id: Option<&str>, room: &str, since: Option<protocol::Since>) {
        if !self.check_room(id, room).await {
            return;
        }
        // Rooms whose subscription ended under us (we were told `left`) are not joined any more: forget them, so a
        // join makes a fresh subscription instead of being acked with nothing behind it.
        self.rooms.retain(|_, r| r.is_live());
        if self.rooms.contains_key(room) {
            return self.ack(id).await;
        }
        if !self.identity.may_join(room) {
            return self
                .error(id, ErrorCode::Forbidden, "not allowed to join this room")
                .await;
        }
        if self.rooms.len() >= self.gw.config().rooms.max_rooms_per_connection {
            return self
                .error(id, ErrorCode::TooManyRooms, "joined the maximum number of rooms")
                .await;
        }
        // A history room's live frames are held until the join has read the stream (`recovery`).
        let hold = self
            .gw
            .history()
            .filter(|h| h.covers(room))
            .map(|h| Hold::new(h.config().max_held));
        let member = Member {
            id: self.id,
            outbox: self.outbox.clone(),
            key: QuotaKey::for_client(self.identity.user.as_deref(), self.peer),
            hold: hold.clone(),
        };
        match self.gw.rooms().join(room, member).await {
            Ok(entry) => {
                match hold {
                    Some(hold) => self.join_history(id, &entry, hold, since).await,
                    // No history here: nothing to recover, and the client must know it.
                    None if since.is_some() => self.send(protocol::ack_join(id, room, Some(false), None)).await,
                    None => self.ack(id).await,
                }
                // The server may refuse a new subscription just after the round trip that confirmed it; the room
                // then tells its members `left`, possibly before the ack above. Repeat it after the ack so the last
                // word the client hears about the room is the true one (a client may so hear `left` twice).
                if !entry.is_live() {
                    self.send(protocol::left(room, crate::rooms::ENDED_REASON)).await;
                    return;
                }
                self.rooms.insert(entry.name().clone(), entry);
                self.event("join", Some(room)).await;
            }
            Err(JoinError::Capacity) => {
                self.error(
                    id,
                    ErrorCode::Unavailable,
                    "this gateway holds the maximum number of rooms",
                )
                .await
            }
            Err(JoinError::Quota(QuotaError::TooManyRooms)) => {
                self.error(
                    id,
                    ErrorCode::TooManyRooms,
                    "in the maximum number of rooms for this user or address",
                )
                .await
            }
            Err(JoinError::Quota(QuotaError::CreationRate)) => {
                self.error(id, ErrorCode::RateLimited, "creating rooms too fast; try again later")
                    .await
            }
            Err(JoinError::Nats(e)) => {
                tracing::info!(room, error = %e, "join failed");
                self.error(id, ErrorCode::Unavailable, "messaging backend unavailable")
                    .await
            }
        }
    }

    async fn leave(&mut self, id: Option<&str>, room: &str) {
        if !self.check_room(id, room).await {
            return;
        }
        if !self.leave_room(room).await {
            return self.error(id, ErrorCode::NotJoined, "not in this room").await;
        }
        self.ack(id).await;
    }

    /// Hands a publish to NATS in order and returns its confirmation, which the reader polls beside reading. Both
    /// steps are bounded by `nats.publish_timeout` from the frame's arrival, so every reply honours it.
    async fn publish(
        &mut self,
        id: Option<&str>,
        room: &str,
        data: &str,
        echo: bool,
        msg_id: Option<&str>,
        arrived: Instant,
    ) -> Option<Confirm> {
        if !self.check_room(id, room).await {
            return None;
        }
        // A room whose subscription the server ended is no longer joined (its members were told with `left`).
        if !self.rooms.get(room).is_some_and(|r| r.is_live()) {
            self.error(id, ErrorCode::NotJoined, "join the room before publishing to it")
                .await;
            return None;
        }
        if !self.identity.may_publish(room) {
            self.error(id, ErrorCode::Forbidden, "not allowed to publish to this room")
                .await;
            return None;
        }
        let deadline = arrived + self.gw.config().nats.publish_timeout;
        let subject = protocol::room_subject(&self.gw.config().rooms.subject_prefix, room);
        let payload = Bytes::copy_from_slice(data.as_bytes());
        // A history room's message goes to the stream with an id, so a retried publish is stored once.
        let history = self.gw.history().filter(|h| h.covers(room)).cloned();
        let stored_id = history
            .as_ref()
            .map(|h| h.msg_id(self.identity.user.as_deref(), &self.conn_id, msg_id));
        let store = history.as_ref().zip(stored_id.as_deref()).map(|(h, m)| (h.js(), m));
        // Handing the message to the NATS client happens here, in order; only the confirmation runs apart.
        let published = match self
            .gw
            .bridge()
            .publish(subject, self.origin(), echo, payload, store, deadline)
            .await
        {
            Ok(published) => published,
            Err(e) => {
                self.publish_failed(id, e).await;
                return None;
            }
        };
        self.gw.metrics().publishes.inc();
        let id = id.map(str::to_owned);
        let gw = self.gw.clone();
        // Confirmed even without an `id` (then nothing is sent): the message's bytes count against
        // `nats.max_pending_bytes` until NATS has written it.
        Some(Box::pin(async move {
            match published.confirm(deadline).await {
                Ok(None) => id.map(|id| protocol::ack(&id)),
                Ok(Some(seq)) => id.map(|id| protocol::ack_seq(&id, seq)),
                Err(e) => {
                    gw.metrics().publish_failures.inc(e.kind());
                    gw.metrics().errors.inc(ErrorCode::Unavailable);
                    let message = "messaging backend did not accept the message";
                    id.map(|id| protocol::error(Some(&id), ErrorCode::Unavailable, message))
                }
            }
        }))
    }

    async fn publish_failed(&self, id: Option<&str>, e: BridgeError) {
        self.gw.metrics().publish_failures.inc(e.kind());
        match e {
            BridgeError::TooLarge => {
                self.error(id, ErrorCode::TooLarge, "message over the backend's maximum payload")
                    .await
            }
            e => {
                tracing::debug!(error = %e, "publish failed");
                self.error(id, ErrorCode::Unavailable, "messaging backend unavailable")
                    .await
            }
        }
    }

    /// Replaces the connection's identity with a fresh token's. Refusals that need no signature check come first
    /// (anonymous connection, over `limits.refreshes_per_minute`, then inside `verify_bounded`: malformed token,
    /// no or too many keys, another `sub`); the check itself runs off the async workers, bounded.
    async fn refresh(&mut self, id: Option<&str>, token: &str) {
        let Some(user) = self.identity.user.clone() else {
            return self
                .error(id, ErrorCode::Unauthorized, "anonymous connections cannot refresh")
                .await;
        };
        if !self.session.try_refresh() {
            return self
                .error(id, ErrorCode::RateLimited, "too many refreshes; token not checked")
                .await;
        }
        let identity = match self.gw.auth().verify_bounded(token, Some(&user), &self.cancel).await {
            Ok(identity) => identity,
            // The connection is ending: the read loop sees the cancellation next.
            Err(AuthError::Cancelled) => return,
            Err(e @ AuthError::Busy) => return self.error(id, ErrorCode::Unavailable, e.reason()).await,
            Err(e) => return self.error(id, ErrorCode::Unauthorized, e.reason()).await,
        };
        if identity.user != self.identity.user {
            // verify_bounded compared the unverified `sub`; the verified one must agree.
            return self
                .error(id, ErrorCode::Unauthorized, "token is for another user")
                .await;
        }
        self.identity = identity;
        self.token_changed = true;
        // Leave rooms the new claims no longer allow, and say so.
        let revoked: Vec<Arc<str>> = self
            .rooms
            .keys()
            .filter(|r| !self.identity.may_join(r))
            .cloned()
            .collect();
        for room in revoked {
            self.leave_room(&room).await;
            self.send(protocol::left(&room, "permission revoked by token refresh"))
                .await;
        }
        self.ack(id).await;
    }
}

/// The close a read error from tungstenite stands for, as (code, reason, metrics reason); `None` when the client is
/// simply gone. Shared with the conformance echo, so Autobahn checks the codes real clients get.
pub fn read_error_close(e: &tungstenite::Error) -> Option<(u16, &'static str, Closed)> {
    match e {
        tungstenite::Error::Capacity(_) => Some((close::TOO_BIG, "message too big", Closed::TooBig)),
        tungstenite::Error::Protocol(_) => Some((close::PROTOCOL, "protocol error", Closed::ProtocolError)),
        tungstenite::Error::Utf8(_) => Some((close::INVALID_DATA, "invalid UTF-8", Closed::InvalidUtf8)),
        _ => None,
    }
}

/// Stops the connection when the writer ends, however it ends (a panic included): closes the outbox, so a reader
/// waiting for queue space wakes up, and cancels the connection, so the reader stops.
struct WriterEnd<'a> {
    outbox: &'a Outbox,
    cancel: &'a CancellationToken,
}

impl Drop for WriterEnd<'_> {
    fn drop(&mut self) {
        self.outbox.close(close_req(close::INTERNAL, "internal error", false));
        self.cancel.cancel();
    }
}

/// The writer task: the only owner of the sink.
async fn write_loop<S>(
    mut sink: SplitSink<WebSocketStream<S>, Message>,
    outbox: Arc<Outbox>,
    cancel: CancellationToken,
    gw: Arc<Gateway>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _end = WriterEnd {
        outbox: &outbox,
        cancel: &cancel,
    };
    let limits = &gw.config().limits;
    let mut ping = tokio::time::interval_at(Instant::now() + limits.heartbeat_interval, limits.heartbeat_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch: VecDeque<Item> = VecDeque::new();
    loop {
        let close = tokio::select! {
            close = outbox.next_batch(&mut batch) => close,
            _ = ping.tick() => {
                if let Err(failed) = timed_write(limits.write_timeout, sink.send(Message::Ping(Bytes::new()))).await {
                    outbox.close(failed.close(&gw));
                    break;
                }
                continue;
            }
            // Shutdown (the root token) reached us before the reader asked for a close: flush and say goodbye.
            _ = cancel.cancelled(), if outbox.close_request().is_none() => {
                outbox.close(close_req(close::GOING_AWAY, "server shutting down", true));
                continue;
            }
        };
        gw.metrics().note_depth(batch.len());
        let queued_at = outbox.take_batch_start();
        let mut bytes = 0u64;
        let wrote = timed_write(limits.write_timeout, async {
            for item in batch.drain(..) {
                match item {
                    Item::Control(frame) => {
                        bytes += frame.len() as u64;
                        sink.feed(Message::Text(frame)).await?
                    }
                    Item::Room { room, frame, gap, .. } => {
                        if gap > 0 {
                            sink.feed(Message::Text(protocol::gap(&room, gap).into())).await?;
                        }
                        bytes += frame.len() as u64;
                        sink.feed(Message::Text(frame)).await?;
                    }
                }
            }
            sink.flush().await
        })
        .await;
        if let Err(failed) = wrote {
            batch.clear();
            outbox.close(failed.close(&gw));
            break;
        }
        // Per batch, not per frame: one histogram sample (the batch's oldest frame) and one counter add.
        gw.metrics().bytes_out.inc_by(bytes);
        if let Some(t) = queued_at {
            gw.metrics().delivery_seconds.observe(t.elapsed().as_secs_f64());
        }
        if let Some(req) = close {
            let frame = CloseFrame {
                code: CloseCode::from(req.code),
                reason: req.reason.into(),
            };
            if req.code == close::SLOW_CONSUMER {
                tracing::info!("closing slow consumer");
            }
            let _ = tokio::time::timeout(limits.write_timeout, sink.send(Message::Close(Some(frame)))).await;
            break;
        }
    }
}

/// Why a write to the client failed.
enum WriteFailed {
    /// It did not finish within `limits.write_timeout`: a slow consumer.
    Timeout,
    /// The socket or tungstenite refused it.
    Error(tungstenite::Error),
}

impl WriteFailed {
    /// Logs and counts the failure, and gives the close it stands for.
    fn close(self, gw: &Gateway) -> CloseRequest {
        match self {
            WriteFailed::Timeout => {
                gw.metrics().slow_consumers.inc(SlowConsumer::WriteTimeout);
                tracing::info!("write timed out: slow consumer dropped");
                close_req(close::SLOW_CONSUMER, "slow consumer", false)
            }
            WriteFailed::Error(tungstenite::Error::WriteBufferFull(_)) => {
                // Config::validate makes this unreachable for frames the outbox admits; say so loudly if not.
                gw.metrics().closes.inc(Closed::WriteBufferFull);
                tracing::warn!("outgoing frame over limits.max_write_buffer_size: connection closed");
                close_req(close::INTERNAL, "internal error", false)
            }
            WriteFailed::Error(e) => {
                tracing::debug!(error = %e, "write failed: client gone");
                close_req(close::GOING_AWAY, "write failed", false)
            }
        }
    }
}

/// Runs a write under `write_timeout`.
async fn timed_write(
    timeout: Duration,
    write: impl std::future::Future<Output = Result<(), tungstenite::Error>>,
) -> Result<(), WriteFailed> {
    match tokio::time::timeout(timeout, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(WriteFailed::Error(e)),
        Err(_) => Err(WriteFailed::Timeout),
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    /// Finding 5: a panic in a connection's task must still give back its rooms, gauge, global and per-IP slots.
    #[tokio::test]
    async fn a_panicking_connection_still_gives_everything_back() {
        let (_nats, gw) = crate::test_support::gateway(|config| {
            config.limits.max_connections_per_ip = 1;
            config.server.max_connections = 1;
        })
        .await;
        let ip = "192.0.2.7".parse().expect("ip");
        let other: std::net::IpAddr = "192.0.2.8".parse().expect("ip");
        let over_capacity = || {
            let slot = gw
                .limits()
                .admit_connection(other)
                .expect("a slot or an over-capacity answer");
            slot.over_capacity()
        };
        let accepted = Accepted {
            id: gw.next_conn_id(),
            peer: SocketAddr::new(ip, 4000),
            identity: Identity::anonymous(&gw.config().auth.anonymous),
            slot: gw.limits().admit_connection(ip).expect("slot"),
            meter: Arc::default(),
        };
        let mut conn = Conn::new(gw.clone(), accepted);
        let member = Member {
            id: conn.id,
            outbox: conn.outbox.clone(),
            key: QuotaKey::for_client(None, conn.peer),
            hold: None,
        };
        let room = gw.rooms().join("lobby", member).await.expect("join");
        conn.rooms.insert(room.name().clone(), room);
        assert_eq!((gw.rooms().len(), gw.metrics().connections_open.get()), (1, 1));
        assert!(over_capacity(), "the only global slot is held");
        assert!(gw.limits().admit(ip).is_err(), "the per-IP slot is held");
        let cancel = conn.cancel.clone();

        let task = tokio::spawn(async move {
            let _conn = conn;
            panic!("a bug in a connection task");
        });
        assert!(task.await.expect_err("the task panicked").is_panic());

        assert!(gw.rooms().is_empty(), "room left");
        assert_eq!(gw.metrics().connections_open.get(), 0, "gauge");
        assert!(!over_capacity(), "global slot");
        assert!(gw.limits().admit(ip).is_ok(), "per-IP slot");
        assert!(cancel.is_cancelled(), "writer told to stop");
    }
}
