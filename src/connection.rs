//! One upgraded WebSocket: a reader (this task) and a writer task, with one bounded [`Outbox`] between the world and
//! the writer.
//!
//! The writer alone owns the sink. It takes everything queued at once, feeds it and flushes once, under
//! `limits.write_timeout`; it also sends the heartbeat pings. The reader parses client ops, enforces rate limits,
//! joins and leaves rooms, forwards publishes to NATS (at most `limits.max_inflight_publishes` awaiting NATS: past
//! that it stops reading, so TCP pushes back on the client), and watches the heartbeat and token deadlines.
//!
//! Every way a connection ends maps to one close code (see `protocol::close` and `docs/protocol.md`); whatever ends
//! it, the connection leaves all its rooms and a `disconnect` event is published.

use std::{collections::HashMap, collections::VecDeque, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::{
    SinkExt, StreamExt,
    stream::{SplitSink, SplitStream},
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::Semaphore,
    task::JoinHandle,
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
    auth::Identity,
    bridge::{BridgeError, Origin},
    limits::{IpGuard, MessageLimiter},
    metrics::Metrics,
    outbox::{CloseRequest, Item, Outbox},
    protocol::{self, ClientOp, ErrorCode, close},
    room_quota::{QuotaError, QuotaKey},
    rooms::{JoinError, Member, Room},
    server::{Admission, Gateway},
};

/// What the HTTP layer hands over after a successful upgrade.
#[derive(Debug)]
pub struct Accepted {
    /// Local connection number.
    pub id: u64,
    /// Client address (after trusted-proxy resolution).
    pub peer: SocketAddr,
    /// Who the client is.
    pub identity: Identity,
    /// The connection's slot under `server.max_connections` and its per-IP count; released when the connection ends.
    pub slots: (Admission, IpGuard),
}

/// Serves one WebSocket until it closes; the returned future is the connection's task.
///
/// Setup is synchronous on purpose: the returned future then holds only what lives as long as the connection
/// (an async fn would also keep its arguments' slots, the whole `WebSocketStream` among them, for the connection's
/// lifetime, which is measurable memory per idle connection).
pub fn serve<S>(gw: Arc<Gateway>, ws: WebSocketStream<S>, accepted: Accepted) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Accepted {
        id,
        peer,
        identity,
        slots,
    } = accepted;
    let conn_id: Arc<str> = format!("{}-{}", gw.gateway_id, id).into();
    let outbox = Arc::new(Outbox::new(
        gw.config.limits.max_pending_messages,
        gw.config.limits.max_pending_bytes,
    ));
    // Cancelled by the writer when it ends, and by the root shutdown (it is a child).
    let cancel = gw.shutdown.child_token();
    let (sink, stream) = ws.split();
    gw.metrics.connections.inc();
    gw.metrics.connections_open.inc();
    // The queue is empty, so the welcome always fits.
    let welcome = protocol::welcome(&conn_id, &gw.gateway_id, identity.user.as_deref());
    outbox.try_push_control(Utf8Bytes::from(welcome));
    let writer =
        tokio::spawn(write_loop(sink, outbox.clone(), cancel.clone(), gw.clone()).instrument(tracing::Span::current()));
    let conn = Conn {
        limiter: gw.limits.message_limiter(identity.user.as_deref()),
        inflight: Arc::new(Semaphore::new(gw.config.limits.max_inflight_publishes)),
        gw,
        id,
        peer,
        conn_id,
        identity,
        outbox,
        rooms: HashMap::new(),
        token_changed: false,
        _slots: slots,
    };
    run(conn, stream, writer, cancel)
}

/// The reader side of a connection, then the cleanup every way of ending shares.
async fn run<S>(
    mut conn: Conn,
    stream: SplitStream<WebSocketStream<S>>,
    writer: JoinHandle<()>,
    cancel: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let origin = Origin {
        conn: &conn.conn_id,
        user: conn.identity.user.as_deref(),
    };
    conn.gw.bridge.event("connect", origin, None).await;
    tracing::debug!(conn = %conn.conn_id, user = conn.identity.user.as_deref(), "connected");

    let end = conn.read_loop(stream, &cancel).await;
    tracing::debug!(conn = %conn.conn_id, ?end, "reader finished");
    conn.outbox.close(end);

    // Leave every room before anything else so fan-out stops queueing for us.
    let rooms: Vec<Arc<str>> = conn.rooms.keys().cloned().collect();
    for room in &rooms {
        conn.gw.rooms.leave(room, conn.id);
    }
    // The writer flushes (or not, per the close request) and sends the close frame; bounded by write_timeout.
    let grace = conn.gw.config.limits.write_timeout + Duration::from_millis(100);
    if tokio::time::timeout(grace, writer).await.is_err() {
        tracing::debug!(conn = %conn.conn_id, "writer did not finish in time");
    }
    cancel.cancel();
    let origin = Origin {
        conn: &conn.conn_id,
        user: conn.identity.user.as_deref(),
    };
    for room in &rooms {
        conn.gw.bridge.event("leave", origin, Some(room)).await;
    }
    conn.gw.bridge.event("disconnect", origin, None).await;
    conn.gw.metrics.connections_open.dec();
    tracing::debug!(conn = %conn.conn_id, "disconnected");
}

/// Per-connection state owned by the reader.
struct Conn {
    gw: Arc<Gateway>,
    id: u64,
    /// Client address (after trusted-proxy resolution): the room-quota key of anonymous connections.
    peer: SocketAddr,
    conn_id: Arc<str>,
    identity: Identity,
    outbox: Arc<Outbox>,
    /// Joined rooms. Bound: `rooms.max_rooms_per_connection`.
    rooms: HashMap<Arc<str>, Arc<Room>>,
    limiter: MessageLimiter,
    /// Publishes awaiting NATS confirmation. Bound: `limits.max_inflight_publishes`.
    inflight: Arc<Semaphore>,
    /// Set by `refresh`: the token deadlines must be recomputed.
    token_changed: bool,
    /// Global and per-IP slots, released when the connection (this struct) is dropped.
    _slots: (Admission, IpGuard),
}

fn close_req(code: u16, reason: &'static str, flush_queued: bool) -> CloseRequest {
    CloseRequest {
        code,
        reason,
        flush_queued,
    }
}

impl Conn {
    /// Reads until the client leaves, a deadline passes or the gateway shuts down; returns how to close.
    async fn read_loop<S>(
        &mut self,
        mut stream: SplitStream<WebSocketStream<S>>,
        cancel: &CancellationToken,
    ) -> CloseRequest
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let heartbeat_timeout = self.gw.config.limits.heartbeat_timeout;
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
        loop {
            if self.token_changed {
                self.token_changed = false;
                (warn_at, expire_at) = self.token_deadlines();
                warn.as_mut().reset(warn_at.unwrap_or_else(far));
                expire.as_mut().reset(expire_at.unwrap_or_else(far));
            }
            tokio::select! {
                _ = cancel.cancelled() => {
                    if let Some(req) = self.outbox.close_request() {
                        return req;
                    }
                    return close_req(close::GOING_AWAY, "server shutting down", true);
                }
                _ = &mut heartbeat => {
                    let due = last_seen + heartbeat_timeout;
                    if due > Instant::now() {
                        heartbeat.as_mut().reset(due);
                        continue;
                    }
                    Metrics::bump(&self.gw.metrics.closes, "heartbeat_timeout");
                    return close_req(close::GOING_AWAY, "heartbeat timeout", false);
                }
                _ = &mut warn, if warn_at.is_some() => {
                    let secs = expire_at.map_or(0, |e| e.saturating_duration_since(Instant::now()).as_secs());
                    self.send(protocol::token_expiring(secs)).await;
                    warn_at = None;
                }
                _ = &mut expire, if expire_at.is_some() => {
                    Metrics::bump(&self.gw.metrics.closes, "token_expired");
                    return close_req(close::TOKEN_EXPIRED, "token expired", true);
                }
                frame = stream.next() => {
                    last_seen = Instant::now();
                    match frame {
                        None => return close_req(close::NORMAL, "", true),
                        Some(Ok(Message::Text(text))) => {
                            // Boxed: the request handlers' futures are large, and inline they would be part of every
                            // idle connection's task; boxed, only a connection handling a frame pays for them.
                            if let Some(req) = Box::pin(self.on_text(&text)).await {
                                return req;
                            }
                        }
                        Some(Ok(Message::Binary(_))) => {
                            self.error(None, ErrorCode::BadRequest, "binary frames are not supported in protocol v1").await;
                        }
                        Some(Ok(Message::Close(_))) => return close_req(close::NORMAL, "", true),
                        Some(Ok(_)) => {} // ping/pong: tungstenite answers pings itself
                        Some(Err(e)) => return self.read_error(e),
                    }
                }
            }
        }
    }

    /// Maps a read error to the close the client sees.
    fn read_error(&self, e: tungstenite::Error) -> CloseRequest {
        let m = &self.gw.metrics;
        match e {
            tungstenite::Error::Capacity(e) => {
                tracing::info!(error = %e, "message or frame over the size limit");
                Metrics::bump(&m.closes, "too_big");
                close_req(close::TOO_BIG, "message too big", false)
            }
            tungstenite::Error::Protocol(e) => {
                tracing::info!(error = %e, "protocol error");
                Metrics::bump(&m.closes, "protocol_error");
                close_req(1002, "protocol error", false)
            }
            tungstenite::Error::Utf8(_) => {
                Metrics::bump(&m.closes, "invalid_utf8");
                close_req(1007, "invalid UTF-8", false)
            }
            e => {
                tracing::debug!(error = %e, "read error");
                close_req(close::NORMAL, "", false)
            }
        }
    }

    /// Instants of the expiry warning and of the expiry, for a token with `exp`.
    fn token_deadlines(&self) -> (Option<Instant>, Option<Instant>) {
        let Some(exp) = self.identity.expires_at else {
            return (None, None);
        };
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let left = Duration::from_secs(exp.saturating_sub(now_unix));
        let expire = Instant::now() + left;
        let warn = expire
            .checked_sub(self.gw.config.auth.expiry_warning)
            .unwrap_or_else(Instant::now);
        (Some(warn), Some(expire))
    }

    async fn send(&self, frame: String) {
        self.outbox.push_control(Utf8Bytes::from(frame)).await;
    }

    async fn ack(&self, id: Option<&str>) {
        if let Some(id) = id {
            self.send(protocol::ack(id)).await;
        }
    }

    async fn error(&self, id: Option<&str>, code: ErrorCode, message: &str) {
        Metrics::bump(&self.gw.metrics.errors, code.as_str());
        self.send(protocol::error(id, code, message)).await;
    }

    /// Handles one text frame. Returns a close request when the connection must end.
    async fn on_text(&mut self, text: &str) -> Option<CloseRequest> {
        self.gw.metrics.frames_in.inc();
        if self.limiter.check(text.len()).is_err() {
            if self.limiter.abusive() {
                Metrics::bump(&self.gw.metrics.closes, "rate_abuse");
                return Some(close_req(close::POLICY, "rate limit exceeded repeatedly", false));
            }
            let id = protocol::parse_request_with_depth(text, self.gw.config.limits.max_json_depth)
                .ok()
                .and_then(|r| r.id);
            self.error(id, ErrorCode::RateLimited, "rate limit exceeded; message not processed")
                .await;
            return None;
        }
        let request = match protocol::parse_request_with_depth(text, self.gw.config.limits.max_json_depth) {
            Ok(r) => r,
            Err(e) => {
                self.error(e.id, ErrorCode::BadRequest, &e.message).await;
                return None;
            }
        };
        let id = request.id;
        match request.op {
            ClientOp::Ping => self.send(protocol::pong(id)).await,
            ClientOp::Join { room } => self.join(id, &room).await,
            ClientOp::Leave { room } => self.leave(id, &room).await,
            ClientOp::Publish { room, data, echo } => self.publish(id, &room, &data, echo).await,
            ClientOp::Refresh { token } => self.refresh(id, &token).await,
        }
        None
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

    async fn join(&mut self, id: Option<&str>, room: &str) {
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
        if self.rooms.len() >= self.gw.config.rooms.max_rooms_per_connection {
            return self
                .error(id, ErrorCode::TooManyRooms, "joined the maximum number of rooms")
                .await;
        }
        let member = Member {
            id: self.id,
            outbox: self.outbox.clone(),
            key: QuotaKey::for_client(self.identity.user.as_deref(), self.peer),
        };
        match self.gw.rooms.join(room, member).await {
            Ok(entry) => {
                self.rooms.insert(entry.name().clone(), entry);
                self.ack(id).await;
                let origin = Origin {
                    conn: &self.conn_id,
                    user: self.identity.user.as_deref(),
                };
                self.gw.bridge.event("join", origin, Some(room)).await;
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
        if self.rooms.remove(room).is_none() {
            return self.error(id, ErrorCode::NotJoined, "not in this room").await;
        }
        self.gw.rooms.leave(room, self.id);
        self.outbox.forget_room(room);
        self.ack(id).await;
        let origin = Origin {
            conn: &self.conn_id,
            user: self.identity.user.as_deref(),
        };
        self.gw.bridge.event("leave", origin, Some(room)).await;
    }

    async fn publish(&mut self, id: Option<&str>, room: &str, data: &str, echo: bool) {
        if !self.check_room(id, room).await {
            return;
        }
        if !self.rooms.contains_key(room) {
            return self
                .error(id, ErrorCode::NotJoined, "join the room before publishing to it")
                .await;
        }
        if !self.identity.may_publish(room) {
            return self
                .error(id, ErrorCode::Forbidden, "not allowed to publish to this room")
                .await;
        }
        // Inbound backpressure: with max_inflight_publishes awaiting NATS, wait here (and so stop reading).
        let Ok(permit) = self.inflight.clone().acquire_owned().await else {
            return;
        };
        let subject = protocol::room_subject(&self.gw.config.rooms.subject_prefix, room);
        let origin = Origin {
            conn: &self.conn_id,
            user: self.identity.user.as_deref(),
        };
        let payload = Bytes::copy_from_slice(data.as_bytes());
        let deadline = Instant::now() + self.gw.config.nats.publish_timeout;
        // Handing the message to the NATS client happens here, in order; only the confirmation runs apart.
        let published = match self.gw.bridge.publish(subject, origin, echo, payload, deadline).await {
            Ok(published) => published,
            Err(e) => {
                drop(permit);
                return self.publish_failed(id, e).await;
            }
        };
        self.gw.metrics.publishes.inc();
        let id = id.map(str::to_owned);
        let (gw, outbox) = (self.gw.clone(), self.outbox.clone());
        // Confirmed even without an `id` (then nothing is sent): the message's bytes count against
        // `nats.max_pending_bytes` until NATS has written it.
        tokio::spawn(async move {
            let result = published.confirm(deadline).await;
            let frame = match (result, id) {
                (_, None) => None,
                (Ok(()), Some(id)) => Some(protocol::ack(&id)),
                (Err(e), Some(id)) => {
                    Metrics::bump(&gw.metrics.publish_failures, e.label());
                    Metrics::bump(&gw.metrics.errors, ErrorCode::Unavailable.as_str());
                    Some(protocol::error(
                        Some(&id),
                        ErrorCode::Unavailable,
                        "messaging backend did not accept the message",
                    ))
                }
            };
            if let Some(frame) = frame {
                outbox.push_control(Utf8Bytes::from(frame)).await;
            }
            drop(permit);
        });
    }

    async fn publish_failed(&self, id: Option<&str>, e: BridgeError) {
        Metrics::bump(&self.gw.metrics.publish_failures, e.label());
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

    async fn refresh(&mut self, id: Option<&str>, token: &str) {
        let identity = match self.gw.auth.verify(token) {
            Ok(identity) => identity,
            Err(e) => return self.error(id, ErrorCode::Unauthorized, e.reason()).await,
        };
        if identity.user != self.identity.user {
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
            self.rooms.remove(&room);
            self.gw.rooms.leave(&room, self.id);
            self.outbox.forget_room(&room);
            self.send(protocol::left(&room, "permission revoked by token refresh"))
                .await;
            let origin = Origin {
                conn: &self.conn_id,
                user: self.identity.user.as_deref(),
            };
            self.gw.bridge.event("leave", origin, Some(&room)).await;
        }
        self.ack(id).await;
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
    let limits = &gw.config.limits;
    let mut ping = tokio::time::interval_at(Instant::now() + limits.heartbeat_interval, limits.heartbeat_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch: VecDeque<Item> = VecDeque::new();
    loop {
        let close = tokio::select! {
            close = outbox.next_batch(&mut batch) => close,
            _ = ping.tick() => {
                if !timed_write(&gw, limits.write_timeout, sink.send(Message::Ping(Bytes::new()))).await {
                    break;
                }
                continue;
            }
            // The reader ended without a close request reaching us first (should not happen, but never hang).
            _ = cancel.cancelled(), if outbox.close_request().is_none() => {
                outbox.close(close_req(close::GOING_AWAY, "server shutting down", true));
                continue;
            }
        };
        gw.metrics.note_depth(batch.len());
        let wrote = timed_write(&gw, limits.write_timeout, async {
            for item in batch.drain(..) {
                match item {
                    Item::Control(frame) => sink.feed(Message::Text(frame)).await?,
                    Item::Room { room, frame, gap } => {
                        if gap > 0 {
                            sink.feed(Message::Text(protocol::gap(&room, gap).into())).await?;
                        }
                        sink.feed(Message::Text(frame)).await?;
                    }
                }
            }
            sink.flush().await
        })
        .await;
        if !wrote {
            batch.clear();
            break;
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
    cancel.cancel();
}

/// Runs a write under `write_timeout`. A timeout marks the client a slow consumer. Returns whether it succeeded.
async fn timed_write(
    gw: &Gateway,
    timeout: Duration,
    write: impl std::future::Future<Output = Result<(), tungstenite::Error>>,
) -> bool {
    match tokio::time::timeout(timeout, write).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "write failed");
            false
        }
        Err(_) => {
            Metrics::bump(&gw.metrics.slow_consumers, "write_timeout");
            tracing::info!("write timed out: slow consumer dropped");
            false
        }
    }
}
