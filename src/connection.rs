//! One upgraded WebSocket, served by one task: the [`Wire`] (the socket), one bounded [`Outbox`] between the world
//! and the socket, and the connection's state ([`Conn`]).
//!
//! The task's loop ([`drive`]) waits on everything at once: its cancellation, the drain, one timer, the socket (write
//! what the outbox holds, read the next message) and the handling of the message read last. The write side alone
//! touches the socket's output: it takes everything queued at once and hands it to one vectored write, so a burst
//! costs one syscall rather than one per frame; room frames were built once by the fan-out and go out as they are.
//! Handling a client op (join, publish, ...) may wait (for NATS, JetStream, queue space): it runs as a future that
//! owns the [`Conn`] while it works and hands it back when done, so writing goes on meanwhile and no lock or second
//! task is needed. Reading pauses while an op is handled, which keeps ops in order and lets TCP push back on a client
//! that sends faster than its ops complete.
//!
//! One task instead of a reader and a writer, and state made only when needed (tungstenite's read buffer while a
//! message is in flight, queue storage while frames wait, the publish confirmations of a publishing client), is what
//! keeps an idle connection small (`BENCHMARKS.md`, section 1).
//!
//! One timer serves every deadline, re-armed to the nearest: the heartbeat ping (`limits.heartbeat_interval`), the
//! heartbeat timeout (`limits.heartbeat_timeout` of silence), the write deadline (`limits.write_timeout` from when
//! a write started waiting for the socket), the token's expiry warning and expiry, and the drain's moment.
//!
//! How a connection always ends (a task that cannot end would hold its socket and slots until restart):
//! - the connection has one `CancellationToken` (a child of the root shutdown); every wait of a handler (queue space,
//!   NATS, a token check, JetStream) selects on it, and the loop ends on it;
//! - publishes awaiting NATS confirmation are futures owned by the loop, not spawned tasks: at most
//!   `limits.max_inflight_publishes` of them (past that the loop stops reading, so TCP pushes back on the client),
//!   each bounded by its deadline, and they are dropped with the connection;
//! - when the loop ends it closes the outbox (producers and waiters see it at once), cancels the token (a handler in
//!   progress returns the `Conn` at its next wait), writes what the close asks for and the close frame within
//!   `limits.write_timeout`, then leaves every room;
//! - `Conn`'s `Drop` leaves every room, closes the outbox, cancels the token and releases the global and per-IP
//!   slots, so even a panic gives everything back.
//!
//! Every way a connection ends maps to one close code (see `protocol::close` and `docs/protocol.md`); whatever ends
//! it, the connection leaves all its rooms and a `disconnect` event is published.

use std::{collections::HashMap, net::SocketAddr, pin::Pin, sync::Arc};

use bytes::Bytes;
use futures_util::{StreamExt, stream::FuturesUnordered};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::Instant,
};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{AuthError, Identity, Session},
    bridge::{BridgeError, Origin},
    gateway::Gateway,
    limits::ConnSlot,
    metrics::{Closed, SlowConsumer},
    outbox::{CloseRequest, Outbox},
    protocol::{self, ClientOp, ErrorCode, close},
    room_quota::{QuotaError, QuotaKey},
    rooms::{Hold, JoinError, Member, Room},
    shutdown::Stop,
    wire::{Frame, Incoming, Wire, WriteEvent},
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
}

/// A publish awaiting NATS confirmation; yields the reply frame, if the client asked for one (an `id`).
type Confirm = Pin<Box<dyn Future<Output = Option<String>> + Send>>;

/// The handling of one client op: owns the connection's state while it runs and hands it back with the outcome.
type Handling = Pin<Box<dyn Future<Output = (Conn, Handled)> + Send>>;

/// What handling one message asks of the connection.
enum Handled {
    /// Nothing more.
    Done,
    /// Poll this publish confirmation beside reading.
    Confirm(Confirm),
    /// Close the connection.
    Close(CloseRequest),
}

/// Starts serving one upgraded WebSocket; the returned future is the connection's task.
pub fn start<IO>(gw: Arc<Gateway>, wire: Wire<IO>, accepted: Accepted) -> ConnTask<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Conn::new(gw.clone(), accepted);
    // The queue is empty, so the welcome always fits.
    let welcome = protocol::welcome(&conn.conn_id, gw.id(), conn.identity.user.as_deref());
    conn.outbox.try_push_control(Frame::text(welcome));
    tracing::debug!(conn = %conn.conn_id, user = conn.identity.user.as_deref(), "connected");
    let now = Instant::now();
    let (warn, expire) = conn.token_deadlines();
    let deadlines = Deadlines {
        ping: now + gw.config().limits.heartbeat_interval,
        last_seen: now,
        warn,
        expire,
        drain: None,
    };
    let outbox = conn.outbox.clone();
    let cancel = conn.cancel.clone();
    ConnTask {
        timer: tokio::time::sleep_until(deadlines.next(&gw, None, false)),
        stop: gw.stop_signal().changed(),
        stop_armed: false,
        stop_seen: Stop::Running,
        deadlines,
        // The first handler publishes the `connect` event: no op of the client's is handled (and no other event
        // published) before it, while the welcome is written meanwhile.
        handling: Some(handle(conn, Work::Event("connect"))),
        conn: None,
        confirms: None,
        wire: Some(wire),
        ending: None,
        gw,
        outbox,
        cancel,
    }
}

pin_project_lite::pin_project! {
    #[project = ConnTaskProj]
    /// One connection's task: a future written out by hand rather than an `async fn`, so that what an idle
    /// connection keeps is exactly these fields (an `async fn` with a `select!` loop kept several times as much:
    /// moved-from arguments, select branches and outputs each get slots of their own). It polls, in order: the
    /// gateway's stop state, the handler, the timer, the socket (write, then read), and publish
    /// confirmations; once something ends the connection it runs the boxed end ([`close`]). The gateway's drain and
    /// shutdown reach it through `shutdown::StopSignal`.
    pub struct ConnTask<IO> {
        // The connection's state; `None` while a handler holds it.
        conn: Option<Conn>,
        // `None` once handed to the end.
        wire: Option<Wire<IO>>,
        // The op being handled, which owns `conn` meanwhile.
        handling: Option<Handling>,
        // Publishes awaiting NATS confirmation, made on the first publish. Bound: `limits.max_inflight_publishes`
        // (reading stops at it).
        confirms: Option<FuturesUnordered<Confirm>>,
        deadlines: Deadlines,
        #[pin]
        timer: tokio::time::Sleep,
        // The gateway's drain and shutdown (`shutdown::StopSignal`): registered once, then one atomic load per
        // wake-up (the tokens themselves cost a lock, shared by every connection, on every poll).
        #[pin]
        stop: tokio::sync::futures::OwnedNotified,
        stop_armed: bool,
        stop_seen: Stop,
        // The end, once the loop is over.
        ending: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
        gw: Arc<Gateway>,
        outbox: Arc<Outbox>,
        cancel: CancellationToken,
    }
}

impl<IO> Future for ConnTask<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let mut this = self.project();
        if this.ending.is_none() {
            let end = std::task::ready!(poll_loop(&mut this, cx));
            // The first close request wins: if the outbox was closed first (a slow consumer), its reason is kept.
            this.outbox.close(end);
            let end = this
                .outbox
                .close_request()
                .unwrap_or_else(|| close_req(close::NORMAL, "", true));
            // A handler still running sees this at its next wait and hands the connection back.
            this.cancel.cancel();
            let conn = this.conn.take();
            let handling = this.handling.take();
            let wire = this.wire.take().expect("the wire is handed over once");
            *this.ending = Some(Box::pin(async move {
                let conn = match (conn, handling) {
                    (Some(conn), _) => conn,
                    (None, Some(handling)) => handling.await.0,
                    (None, None) => unreachable!("the connection is either here or with its handler"),
                };
                close(conn, wire, end).await;
            }));
        }
        match this.ending.as_mut() {
            Some(ending) => ending.as_mut().poll(cx),
            None => unreachable!("set above"),
        }
    }
}

/// The connection's loop: acts on whatever is ready, until something ends the connection; returns how to close.
fn poll_loop<IO>(this: &mut ConnTaskProj<'_, IO>, cx: &mut std::task::Context<'_>) -> std::task::Poll<CloseRequest>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    use std::task::Poll;
    let gw: &Gateway = this.gw;
    let wire = this.wire.as_mut().expect("the wire stays until the end");
    loop {
        if !*this.stop_armed {
            // Registers the wait; it is ready only if the state changed since it was made, which the read below sees.
            let _ = this.stop.as_mut().poll(cx);
            *this.stop_armed = true;
        }
        let stop = gw.stop_signal().get();
        if stop != *this.stop_seen {
            *this.stop_seen = stop;
            this.stop.set(gw.stop_signal().changed());
            *this.stop_armed = false;
            match stop {
                Stop::Stopping => return Poll::Ready(conn_cancelled(this.outbox)),
                Stop::Draining => {
                    let delay = crate::shutdown::drain_delay(gw.config().server.drain_window);
                    this.deadlines.drain = Some(Instant::now() + delay);
                    rearm(this.timer.as_mut(), this.deadlines, gw, wire, this.conn.is_none());
                }
                Stop::Running => {}
            }
            continue;
        }
        if let Some(handling) = this.handling.as_mut()
            && let Poll::Ready((c, handled)) = handling.as_mut().poll(cx)
        {
            *this.handling = None;
            if c.token_changed {
                (this.deadlines.warn, this.deadlines.expire) = c.token_deadlines();
            }
            *this.conn = Some(c);
            match handled {
                Handled::Done => {}
                Handled::Confirm(confirm) => this.confirms.get_or_insert_with(FuturesUnordered::new).push(confirm),
                Handled::Close(req) => return Poll::Ready(req),
            }
            rearm(this.timer.as_mut(), this.deadlines, gw, wire, this.conn.is_none());
            continue;
        }
        if this.timer.as_mut().poll(cx).is_ready() {
            match this
                .deadlines
                .due(gw, wire, this.outbox, this.conn.is_none(), Instant::now())
            {
                Due::Nothing => {}
                Due::Close(req) => return Poll::Ready(req),
                Due::Warn => {
                    let c = this.conn.take().expect("not busy");
                    let secs = this
                        .deadlines
                        .expire
                        .map_or(0, |e| e.saturating_duration_since(Instant::now()).as_secs());
                    *this.handling = Some(handle(c, Work::Send(Frame::text(protocol::token_expiring(secs)))));
                }
            }
            rearm(this.timer.as_mut(), this.deadlines, gw, wire, this.conn.is_none());
            continue;
        }
        let inflight = this.confirms.as_ref().map_or(0, FuturesUnordered::len);
        let reading =
            this.conn.is_some() && inflight < gw.config().limits.max_inflight_publishes && !wire.peer_closed();
        if let Poll::Ready(io) = poll_io(cx, wire, gw, this.outbox, reading) {
            match io {
                // The write deadline starts: the timer must know.
                Io::Write(WriteEvent::Blocked) => {}
                Io::Write(WriteEvent::Close(req)) => return Poll::Ready(req),
                Io::Write(WriteEvent::Failed(e)) => {
                    tracing::debug!(error = %e, "write failed: client gone");
                    return Poll::Ready(close_req(close::GOING_AWAY, "write failed", false));
                }
                Io::Read(read) => {
                    let now = Instant::now();
                    this.deadlines.last_seen = now;
                    let Some(c) = this.conn.take() else {
                        unreachable!("reading only when not busy");
                    };
                    match read {
                        Ok(Incoming::Message(msg, refused)) => {
                            *this.handling = Some(handle(c, Work::Message(msg, refused, now)));
                        }
                        Ok(Incoming::Closed) => {
                            *this.conn = Some(c);
                            return Poll::Ready(close_req(close::NORMAL, "", true));
                        }
                        Err(e) => {
                            let req = c.read_error(e, wire.abusive());
                            *this.conn = Some(c);
                            return Poll::Ready(req);
                        }
                    }
                }
            }
            rearm(this.timer.as_mut(), this.deadlines, gw, wire, this.conn.is_none());
            continue;
        }
        if this.conn.is_some()
            && inflight > 0
            && let Some(confirms) = this.confirms.as_mut()
            && let Poll::Ready(Some(reply)) = confirms.poll_next_unpin(cx)
        {
            if let Some(frame) = reply {
                let c = this.conn.take().expect("not busy");
                *this.handling = Some(handle(c, Work::Send(Frame::text(frame))));
            }
            continue;
        }
        return Poll::Pending;
    }
}

/// Re-arms the timer to the nearest deadline.
fn rearm<IO>(timer: Pin<&mut tokio::time::Sleep>, deadlines: &Deadlines, gw: &Gateway, wire: &Wire<IO>, busy: bool)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let next = deadlines.next(gw, wire.blocked_since(), busy);
    if next != timer.deadline() {
        timer.reset(next);
    }
}

/// Ends the connection: leaves every room, writes the close, releases the slots and publishes the events.
async fn close<IO>(mut conn: Conn, mut wire: Wire<IO>, end: CloseRequest)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let gw = conn.gw.clone();
    tracing::debug!(conn = %conn.conn_id, code = end.code, reason = end.reason, "connection closing");
    // Leave every room before anything else so fan-out stops queueing for us.
    let rooms = conn.leave_all();
    // Flush (or not, per the close request) and send the close frame; bounded by write_timeout.
    wire.finish(
        Some(&conn.outbox),
        &end,
        &gw.ws_config(),
        gw.config().limits.write_timeout,
    )
    .await;
    drop(wire);
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

/// The deadlines of a connection, all served by one timer (see the module doc).
struct Deadlines {
    /// Next heartbeat ping.
    ping: Instant,
    /// Last frame from the client: the heartbeat timeout counts from here.
    last_seen: Instant,
    /// The token's expiry warning and expiry (connections with a token).
    warn: Option<Instant>,
    expire: Option<Instant>,
    /// This connection's moment to close during a drain (set once the drain starts).
    drain: Option<Instant>,
}

/// What the timer found due.
enum Due {
    /// Nothing yet (re-armed).
    Nothing,
    /// The token's expiry warning: the handler sends it.
    Warn,
    /// End the connection.
    Close(CloseRequest),
}

impl Deadlines {
    /// The nearest deadline. The token's are left out while a handler holds the connection (`busy`): they are acted
    /// on once it is back.
    fn next(&self, gw: &Gateway, blocked_since: Option<Instant>, busy: bool) -> Instant {
        let limits = &gw.config().limits;
        let mut next = self.ping.min(self.last_seen + limits.heartbeat_timeout);
        for t in [self.drain, blocked_since.map(|t| t + limits.write_timeout)]
            .into_iter()
            .flatten()
        {
            next = next.min(t);
        }
        if !busy {
            for t in [self.warn, self.expire].into_iter().flatten() {
                next = next.min(t);
            }
        }
        next
    }

    /// Acts on what is due at `now`, in order of precedence.
    fn due<IO>(&mut self, gw: &Gateway, wire: &mut Wire<IO>, outbox: &Outbox, busy: bool, now: Instant) -> Due
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let limits = &gw.config().limits;
        if wire.blocked_since().is_some_and(|t| t + limits.write_timeout <= now) {
            gw.metrics().slow_consumers.inc(SlowConsumer::WriteTimeout);
            tracing::info!("write timed out: slow consumer dropped");
            return Due::Close(close_req(close::SLOW_CONSUMER, "slow consumer", false));
        }
        if self.drain.is_some_and(|t| t <= now) {
            // Flushed, then 1001 with the reason that tells the client library to reconnect elsewhere, later.
            return Due::Close(close_req(close::GOING_AWAY, close::DRAIN_REASON, true));
        }
        if self.last_seen + limits.heartbeat_timeout <= now {
            gw.metrics().closes.inc(Closed::HeartbeatTimeout);
            return Due::Close(close_req(close::GOING_AWAY, "heartbeat timeout", false));
        }
        if self.ping <= now {
            wire.shrink_if_idle(outbox);
            wire.queue(Frame::ping());
            self.ping = now + limits.heartbeat_interval;
        }
        if !busy {
            if self.expire.is_some_and(|t| t <= now) {
                gw.metrics().closes.inc(Closed::TokenExpired);
                return Due::Close(close_req(close::TOKEN_EXPIRED, "token expired", true));
            }
            if self.warn.is_some_and(|t| t <= now) {
                self.warn = None;
                return Due::Warn;
            }
        }
        Due::Nothing
    }
}

/// What the socket did.
enum Io {
    Read(Result<Incoming, tungstenite::Error>),
    Write(WriteEvent),
}

/// Writes what is queued, then reads if `reading`: one poll of the socket for the loop.
fn poll_io<IO>(
    cx: &mut std::task::Context<'_>,
    wire: &mut Wire<IO>,
    gw: &Gateway,
    outbox: &Outbox,
    reading: bool,
) -> std::task::Poll<Io>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    use std::task::Poll;
    if let Poll::Ready(event) = wire.poll_write(cx, outbox, gw.metrics()) {
        return Poll::Ready(Io::Write(event));
    }
    if reading && let Poll::Ready(read) = wire.poll_read(cx, &gw.ws_config()) {
        return Poll::Ready(Io::Read(read));
    }
    // Reading may have produced a pong: write it now rather than at the next wake-up.
    if wire.has_control()
        && let Poll::Ready(event) = wire.poll_write(cx, outbox, gw.metrics())
    {
        return Poll::Ready(Io::Write(event));
    }
    Poll::Pending
}

/// What a handler does with the connection.
enum Work {
    /// Publish a lifecycle event of the connection (`connect`).
    Event(&'static str),
    /// Handle a message read at `arrived`, refused or not by the rate limits.
    Message(Message, bool, Instant),
    /// Queue a frame, waiting for queue space (a publish confirmation, the token's expiry warning).
    Send(Frame),
}

/// Runs `work` on the connection as its handler: the future owns the connection and hands it back with the outcome,
/// early (with `Done`) if the connection is cancelled meanwhile. Boxed: only a connection handling something pays for
/// the handler's state.
fn handle(conn: Conn, work: Work) -> Handling {
    Box::pin(async move {
        let mut conn = conn;
        let cancel = conn.cancel.clone();
        let handled = tokio::select! {
            biased;
            _ = cancel.cancelled() => Handled::Done,
            handled = conn.work(work) => handled,
        };
        (conn, handled)
    })
}

/// The close to report once the connection's token is cancelled: the outbox's reason if it closed first, otherwise
/// a shutdown.
fn conn_cancelled(outbox: &Outbox) -> CloseRequest {
    outbox
        .close_request()
        .unwrap_or_else(|| close_req(close::GOING_AWAY, "server shutting down", true))
}

/// Per-connection state, owned by the connection's loop or by the handler working on it. Dropping it gives back
/// everything the connection held (see `Drop`).
struct Conn {
    gw: Arc<Gateway>,
    id: u64,
    /// Client address (after trusted-proxy resolution): the room-quota key of anonymous connections.
    peer: SocketAddr,
    conn_id: Arc<str>,
    identity: Identity,
    outbox: Arc<Outbox>,
    /// Ends the connection's waits: cancelled when the loop ends, by the root shutdown (it is a child), and on drop.
    cancel: CancellationToken,
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
    /// Runs however the connection ends, a panic included: rooms, outbox, gauge and slots are given back.
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

    /// Maps a read error to the close the client sees; `abusive` when the rate limits ended the reading.
    fn read_error(&self, e: tungstenite::Error, abusive: bool) -> CloseRequest {
        let m = &self.gw.metrics();
        if abusive {
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
    async fn send(&self, frame: impl Into<Frame>) {
        let frame = frame.into();
        tokio::select! {
            _ = self.cancel.cancelled() => {}
            _ = self.outbox.push_control(frame) => {}
        }
    }

    /// Does what a handler was started for.
    async fn work(&mut self, work: Work) -> Handled {
        match work {
            Work::Event(kind) => {
                self.event(kind, None).await;
                Handled::Done
            }
            Work::Message(msg, refused, arrived) => self.on_message(msg, refused, arrived).await,
            Work::Send(frame) => {
                self.send(frame).await;
                Handled::Done
            }
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

    /// Hands a publish to NATS in order and returns its confirmation, which the connection polls beside reading. Both
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

#[cfg(test)]
mod size_tests {
    use super::*;

    /// What an idle connection costs the heap is mostly its task: the future [`start`] returns, stored in the task
    /// for the connection's whole life. Everything rare or large (the handlers, the close, the events) is boxed so it
    /// costs only while it runs; this keeps it that way.
    #[tokio::test]
    async fn an_idle_connections_task_stays_small() {
        let (_nats, gw) = crate::test_support::gateway(|_| {}).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (tcp, peer) = listener.accept().await.expect("accept");
        let meter = crate::frames::FrameMeter::new(gw.limits().message_limiter(None));
        let wire = Wire::new(tcp, &[], meter, &gw.ws_config());
        let accepted = Accepted {
            id: gw.next_conn_id(),
            peer,
            identity: Identity::anonymous(&gw.config().auth.anonymous),
            slot: gw.limits().admit_connection(peer.ip()).expect("slot"),
        };
        let task = start(gw.clone(), wire, accepted);
        let size = std::mem::size_of_val(&task);
        eprintln!(
            "connection future: {size} bytes (Conn {}, Wire {})",
            std::mem::size_of::<Conn>(),
            std::mem::size_of::<Wire<tokio::net::TcpStream>>()
        );
        assert!(size <= 1280, "an idle connection's task holds {size} bytes");
    }
}
