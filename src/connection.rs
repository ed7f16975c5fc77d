//! One upgraded WebSocket, served by one task: the [`Wire`] (the socket), one bounded [`Outbox`] between the world
//! and the socket, and the connection's state ([`Conn`]).
//!
//! The task ([`ConnTask`]) waits on everything at once: the gateway's stop state, one timer, the socket (write what
//! the outbox holds, read the next message), the handling of the message read last and the confirmations of
//! publishes. The write side alone touches the socket's output: it takes everything queued at once and hands it to
//! one vectored write, so a burst costs one syscall rather than one per frame; room frames were built once by the
//! fan-out and go out as they are. Handling a client op (join, publish, ...) may wait (for NATS, JetStream, queue
//! space): it runs as a future that owns the [`Conn`] while it works and hands it back when done ([`State`]), so
//! writing goes on meanwhile and no lock or second task is needed. Reading pauses while an op is handled, which keeps
//! ops in order and lets TCP push back on a client that sends faster than its ops complete.
//!
//! The task's life is a [`Phase`]: `Open` (the socket, and the state either idle here or with its handler: a type,
//! not a convention), then `Closing` (the boxed end owns both), then `Closed`.
//!
//! One task instead of a reader and a writer, and state made only when needed (tungstenite's read buffer while a
//! message is in flight, queue storage while frames wait, the publish confirmations of a publishing client), is what
//! keeps an idle connection small (`BENCHMARKS.md`, section 1; `size_tests` below pins it).
//!
//! The parts: [`deadlines`] (one timer for every deadline), [`ops`] (the client's ops), [`presence`] (the
//! `presence` and `presence_stats` ops), [`recovery`] (history joins), [`server_rooms`] (the token's server-side rooms
//! before the `welcome`, and the room changes backends ask for, `crate::control`), [`rpc`] (calls to NATS services),
//! [`replies`] (what a refused op looks like to the client) and [`ending`] (what each ending means, and the end
//! itself).
//!
//! How a connection always ends (a task that cannot end would hold its socket and slots until restart):
//! - the loop ends on the gateway's stop state (`shutdown::StopWatch`: the drain sets this connection's moment, the
//!   shutdown ends it now), a deadline, the socket, or a handler asking to close;
//! - the connection has one `CancellationToken` (a child of the root shutdown); every wait of a handler (queue space,
//!   NATS, a token check, JetStream) selects on it, and it is cancelled when the loop ends, so a handler in progress
//!   returns the `Conn` at its next wait;
//! - publishes awaiting NATS confirmation are futures owned by the task, not spawned tasks: at most
//!   `limits.max_inflight_publishes` of them (past that the loop stops reading, so TCP pushes back on the client),
//!   each bounded by its deadline, and they are dropped with the connection;
//! - when the loop ends it closes the outbox (producers and waiters see it at once), cancels the token, writes what
//!   the close asks for and the close frame within `limits.write_timeout`, then leaves every room;
//! - `Conn`'s `Drop` leaves every room (each membership is a guard, `rooms::Membership`, so a join cancelled halfway
//!   leaves nothing either), closes the outbox, cancels the token and releases the global and per-IP slots, so even
//!   a panic gives everything back.
//!
//! Every way a connection ends maps to one close code (`ending`, `protocol::close`, `docs/protocol.md`); whatever ends
//! it, the connection leaves all its rooms and a `disconnect` event is published.

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use futures_util::{StreamExt, stream::FuturesUnordered};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::Instant,
};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{Identity, Session},
    bridge::Origin,
    deflate::Agreement,
    frame::Frame,
    gateway::Gateway,
    limits::ConnSlot,
    outbox::{CloseRequest, Directive, Outbox},
    protocol::{self, ErrorCode, close},
    rooms::Membership,
    shutdown::{Stop, StopWatch},
    wire::{Incoming, Wire, WriteEvent},
};

mod deadlines;
mod ending;
mod ops;
mod presence;
mod recovery;
mod replies;
mod rpc;
mod server_rooms;

use deadlines::{Deadlines, Due};
pub use ending::read_error_close;
use ending::{close_req, conn_cancelled};

/// What the HTTP layer hands over after a successful upgrade.
#[derive(Debug)]
pub struct Accepted {
    /// Local connection number.
    pub id: u64,
    /// Client address (after trusted-proxy resolution).
    pub peer: SocketAddr,
    /// Who the client is.
    pub identity: Identity,
    /// Where the client got to in its server-side history rooms (the upgrade's `recover` parameter).
    pub recover: Vec<(String, protocol::Since)>,
    /// The connection's global permit and per-address count; released when the connection ends.
    pub slot: ConnSlot,
    /// The permessage-deflate offer accepted at the upgrade, if any.
    pub deflate: Option<Agreement>,
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

/// Where the connection's state is while the socket is open.
// Not boxed: the state is inline in the task for the connection's whole life (one allocation per connection).
#[allow(clippy::large_enum_variant)]
enum State {
    /// Here: the connection waits for input.
    Idle(Conn),
    /// With the handler of an op, which hands it back when done (or at its next wait once cancelled).
    Busy(Handling),
}

impl State {
    fn is_busy(&self) -> bool {
        matches!(self, State::Busy(_))
    }

    /// Hands the connection to a handler for `work`. Only called when idle; a busy state is left as it is.
    fn begin(&mut self, work: Work) {
        // A boxed zero-sized future does not allocate: the placeholder is free while the connection moves.
        let moving = State::Busy(Box::pin(std::future::pending()));
        *self = match std::mem::replace(self, moving) {
            State::Idle(conn) => State::Busy(handle(conn, work)),
            busy => {
                debug_assert!(false, "began an op while another was handled");
                busy
            }
        };
    }
}

/// The connection's life.
// Not boxed: `Open` is the connection's whole life; the end is boxed because it is short and rare.
#[allow(clippy::large_enum_variant)]
enum Phase<IO> {
    /// Serving: the socket, and the connection's state.
    Open { wire: Wire<IO>, state: State },
    /// Ending: the boxed end ([`ending::end`]) owns the socket and the state.
    Closing(Pin<Box<dyn Future<Output = ()> + Send>>),
    /// Over.
    Closed,
}

/// What serves an upgraded WebSocket, handed by the caller of [`crate::server::run_with`] down to the upgrade:
/// [`RoomEndpoint`] (the room protocol) in every real build; the Autobahn run passes its echo
/// (`crate::conformance::Echo`), so the HTTP layer needs no switch of its own.
pub trait Endpoint: Copy + Send + Sync + 'static {
    /// The connection's task for `wire`.
    fn serve<IO>(
        self,
        gw: Arc<Gateway>,
        wire: Wire<IO>,
        accepted: Accepted,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static;
}

/// The room protocol (`docs/protocol.md`): [`start`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RoomEndpoint;

impl Endpoint for RoomEndpoint {
    fn serve<IO>(
        self,
        gw: Arc<Gateway>,
        wire: Wire<IO>,
        accepted: Accepted,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        start(gw, wire, accepted)
    }
}

/// Starts serving one upgraded WebSocket; the returned future is the connection's task.
pub fn start<IO>(gw: Arc<Gateway>, wire: Wire<IO>, mut accepted: Accepted) -> ConnTask<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let recover = std::mem::take(&mut accepted.recover);
    let conn = Conn::new(gw.clone(), accepted);
    // The queue is empty, so the welcome always fits. With server-side rooms, the first handler sends it once they
    // are joined (`server_rooms`).
    if conn.identity.subs.is_empty() {
        let welcome = protocol::welcome(
            &conn.conn_id,
            gw.id(),
            conn.identity.user.as_deref(),
            conn.rpc_max_inflight(),
        );
        conn.outbox.try_push_control(Frame::text(welcome));
    }
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
        // The first handler publishes the `connect` event and joins the server-side rooms: no op of the client's is
        // handled (and no other event published) before it, while the welcome is written meanwhile.
        phase: Phase::Open {
            wire,
            state: State::Busy(handle(conn, Work::Connect(recover))),
        },
        driver: Driver {
            timer: tokio::time::sleep_until(deadlines.next(&gw, None, false)),
            stop: StopWatch::new(gw.stop_signal()),
            deadlines,
            confirms: None,
            gw,
            outbox,
            cancel,
        },
    }
}

pin_project_lite::pin_project! {
    /// One connection's task: a future written out by hand rather than an `async fn`, so that what an idle
    /// connection keeps is exactly these fields (an `async fn` with a `select!` loop kept several times as much:
    /// moved-from arguments, select branches and outputs each get slots of their own).
    pub struct ConnTask<IO> {
        phase: Phase<IO>,
        #[pin]
        driver: Driver,
    }
}

pin_project_lite::pin_project! {
    /// What the open connection waits on besides its socket and its handler.
    struct Driver {
        // Publishes awaiting NATS confirmation, made on the first publish. Bound: `limits.max_inflight_publishes`
        // (reading stops at it).
        confirms: Option<FuturesUnordered<Confirm>>,
        deadlines: Deadlines,
        #[pin]
        timer: tokio::time::Sleep,
        // The gateway's drain and shutdown.
        #[pin]
        stop: StopWatch,
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

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let mut driver = this.driver;
        loop {
            match this.phase {
                Phase::Open { wire, state } => {
                    let end = ready!(driver.as_mut().poll_open(wire, state, cx));
                    let driver = driver.as_mut().project();
                    // The first close request wins: if the outbox was closed first (a slow consumer), its reason is
                    // kept.
                    driver.outbox.close(end);
                    let end = driver
                        .outbox
                        .close_request()
                        .unwrap_or_else(|| close_req(close::NORMAL, "", true));
                    // A handler still running sees this at its next wait and hands the connection back.
                    driver.cancel.cancel();
                    *this.phase = match std::mem::replace(this.phase, Phase::Closed) {
                        Phase::Open { wire, state } => Phase::Closing(Box::pin(ending::end(state, wire, end))),
                        other => other,
                    };
                }
                Phase::Closing(ending) => {
                    ready!(ending.as_mut().poll(cx));
                    *this.phase = Phase::Closed;
                }
                Phase::Closed => return Poll::Ready(()),
            }
        }
    }
}

impl Driver {
    /// The open connection's loop: acts on whatever is ready, until something ends the connection; returns how to
    /// close.
    fn poll_open<IO>(
        self: Pin<&mut Self>,
        wire: &mut Wire<IO>,
        state: &mut State,
        cx: &mut Context<'_>,
    ) -> Poll<CloseRequest>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let mut this = self.project();
        let gw: &Gateway = this.gw;
        loop {
            if let Some(stop) = this.stop.as_mut().poll_change(gw.stop_signal(), cx) {
                match stop {
                    Stop::Stopping => return Poll::Ready(conn_cancelled(this.outbox)),
                    Stop::Draining => {
                        let delay = crate::shutdown::drain_delay(gw.config().server.drain_window);
                        this.deadlines.drain = Some(Instant::now() + delay);
                        rearm(this.timer.as_mut(), this.deadlines, gw, wire, state.is_busy());
                    }
                    Stop::Running => {}
                }
                continue;
            }
            if let State::Busy(handling) = state
                && let Poll::Ready((conn, handled)) = handling.as_mut().poll(cx)
            {
                if conn.token_changed {
                    (this.deadlines.warn, this.deadlines.expire) = conn.token_deadlines();
                }
                *state = State::Idle(conn);
                match handled {
                    Handled::Done => {}
                    Handled::Confirm(confirm) => this.confirms.get_or_insert_with(FuturesUnordered::new).push(confirm),
                    Handled::Close(req) => return Poll::Ready(req),
                }
                rearm(this.timer.as_mut(), this.deadlines, gw, wire, state.is_busy());
                continue;
            }
            if this.timer.as_mut().poll(cx).is_ready() {
                match this
                    .deadlines
                    .due(gw, wire, this.outbox, state.is_busy(), Instant::now())
                {
                    Due::Nothing => {}
                    Due::Close(req) => return Poll::Ready(req),
                    Due::Warn => {
                        let secs = this
                            .deadlines
                            .expire
                            .map_or(0, |e| e.saturating_duration_since(Instant::now()).as_secs());
                        state.begin(Work::Send(Frame::text(protocol::token_expiring(secs))));
                    }
                }
                rearm(this.timer.as_mut(), this.deadlines, gw, wire, state.is_busy());
                continue;
            }
            // A room change a backend asked for (`crate::control`), between the client's ops.
            if !state.is_busy()
                && let Some(directive) = this.outbox.take_directive()
            {
                state.begin(Work::Directive(directive));
                continue;
            }
            let inflight = this.confirms.as_ref().map_or(0, FuturesUnordered::len);
            let reading =
                !state.is_busy() && inflight < gw.config().limits.max_inflight_publishes && !wire.peer_closed();
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
                        match read {
                            Ok(Incoming::Message(msg, refused)) => state.begin(Work::Message(msg, refused, now)),
                            Ok(Incoming::Closed) => return Poll::Ready(close_req(close::NORMAL, "", true)),
                            Err(e) => return Poll::Ready(ending::read_error(gw, e, wire.abusive())),
                        }
                    }
                }
                rearm(this.timer.as_mut(), this.deadlines, gw, wire, state.is_busy());
                continue;
            }
            if !state.is_busy()
                && inflight > 0
                && let Some(confirms) = this.confirms.as_mut()
                && let Poll::Ready(Some(reply)) = confirms.poll_next_unpin(cx)
            {
                if let Some(frame) = reply {
                    state.begin(Work::Send(Frame::text(frame)));
                }
                continue;
            }
            return Poll::Pending;
        }
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

/// What the socket did.
enum Io {
    Read(Result<Incoming, tungstenite::Error>),
    Write(WriteEvent),
}

/// Writes what is queued, then reads if `reading`: one poll of the socket for the loop.
fn poll_io<IO>(cx: &mut Context<'_>, wire: &mut Wire<IO>, gw: &Gateway, outbox: &Outbox, reading: bool) -> Poll<Io>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
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
    /// Start: publish the `connect` event, join the server-side rooms (recovering those the client names), welcome.
    Connect(Vec<(String, protocol::Since)>),
    /// A room change a backend asked for.
    Directive(Directive),
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

/// Per-connection state, owned by the connection's task or by the handler working on it ([`State`]). Dropping it
/// gives back everything the connection held (see `Drop`).
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
    /// Joined rooms: dropping a [`Membership`] leaves its room. Bound: `rooms.max_rooms_per_connection`.
    rooms: HashMap<Arc<str>, Joined>,
    /// Set by `refresh`: the token deadlines must be recomputed.
    token_changed: bool,
    /// End of the session (`auth.max_session` from the upgrade) and the `refresh` budget.
    session: Session,
    /// Global permit and per-address count, released when the connection (this struct) is dropped.
    _slot: ConnSlot,
}

/// How a room was joined: who may make the connection leave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// The client's `join`: its `leave`, or a refresh whose token no longer allows it.
    Client,
    /// The token's `subs`: a refresh whose token no longer lists it, or an `unsubscribe` command.
    Token,
    /// A `subscribe` command: an `unsubscribe` command.
    Backend,
}

/// One joined room.
struct Joined {
    membership: Membership,
    via: Via,
}

impl std::ops::Deref for Joined {
    type Target = Membership;

    fn deref(&self) -> &Membership {
        &self.membership
    }
}

impl Drop for Conn {
    /// Runs however the connection ends, a panic included: rooms, outbox, gauge, registry entry and slots are given
    /// back.
    fn drop(&mut self) {
        self.rooms.clear();
        self.gw.control().registry().remove(self.id);
        self.outbox.close(close_req(close::INTERNAL, "internal error", false));
        self.cancel.cancel();
        self.gw.metrics().connections_open.dec();
    }
}

/// What a revocation matches of an authenticated identity's token.
fn token_facts(identity: &Identity) -> Option<crate::control::registry::TokenFacts> {
    Some(crate::control::registry::TokenFacts {
        user: identity.user.as_deref()?.into(),
        jti: identity.jti.as_deref().map(Arc::from),
        issued_at: identity.issued_at,
    })
}

impl Conn {
    fn new(gw: Arc<Gateway>, accepted: Accepted) -> Self {
        let Accepted {
            id,
            peer,
            identity,
            recover: _,
            slot,
            deflate,
        } = accepted;
        let conn_id: Arc<str> = format!("{}-{}", gw.id(), id).into();
        let outbox = Outbox::new(
            gw.config().limits.max_pending_messages,
            gw.config().limits.max_pending_bytes,
        );
        // A flag on the shared outbox is all a connection keeps of permessage-deflate (`crate::deflate`).
        let outbox = Arc::new(match deflate {
            Some(a) => outbox.with_deflate(a.max_compressed_plain()),
            None => outbox,
        });
        gw.metrics().connections.inc();
        gw.metrics().connections_open.inc();
        gw.control().registry().insert(
            id,
            crate::control::registry::Entry {
                outbox: outbox.clone(),
                token: token_facts(&identity).map(Arc::new),
            },
        );
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

    /// The `rpc_max_inflight` of the `welcome`: the bound of calls in flight, while RPC is on.
    fn rpc_max_inflight(&self) -> Option<usize> {
        let rpc = &self.gw.config().rpc;
        rpc.enabled.then_some(rpc.max_inflight_per_connection)
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
        let frame = self.deflated(frame.into());
        tokio::select! {
            _ = self.cancel.cancelled() => {}
            _ = self.outbox.push_control(frame) => {}
        }
    }

    /// A reply as this connection takes it: compressed (for this connection alone: a reply has one recipient) when
    /// it negotiated permessage-deflate and the reply is at least `compression.min_size` bytes (history batches,
    /// presence lists); acks and errors are smaller and stay plain.
    fn deflated(&self, frame: Frame) -> Frame {
        let c = &self.gw.config().compression;
        if c.enabled && self.outbox.deflate() && frame.len() >= c.min_size && self.outbox.takes_deflated(frame.len()) {
            frame.deflated(c.level).unwrap_or(frame)
        } else {
            frame
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{room_quota::QuotaKey, rooms::Member};

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
            recover: Vec::new(),
            slot: gw.limits().admit_connection(ip).expect("slot"),
            deflate: None,
        };
        let mut conn = Conn::new(gw.clone(), accepted);
        let member = Member {
            id: conn.id,
            outbox: conn.outbox.clone(),
            key: QuotaKey::for_client(None, conn.peer),
            hold: None,
        };
        let room = gw.rooms().join("lobby", member).await.expect("join");
        let joined = Joined {
            membership: room,
            via: Via::Client,
        };
        conn.rooms.insert(joined.name().clone(), joined);
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
            recover: Vec::new(),
            slot: gw.limits().admit_connection(peer.ip()).expect("slot"),
            deflate: None,
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
