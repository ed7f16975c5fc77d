//! The socket side of one upgraded WebSocket: tungstenite parses what the client sends, and the gateway writes
//! server frames it built itself, once per message, shared by every recipient.
//!
//! Why not a `tokio_tungstenite::WebSocketStream`: it keeps a read buffer (`limits.read_buffer_size`) allocated for
//! the whole life of the connection, copies and re-frames every outgoing message into a write buffer of its own that
//! keeps its high-water capacity until close, and split into a reader and a writer it needs a lock and two tasks.
//! Here the connection's one task owns the socket, and:
//! - **reading** goes through tungstenite's [`WebSocketContext`] (masking, fragmentation, UTF-8, control frames,
//!   size limits: all tungstenite's), which exists only while bytes are in flight. An idle connection has none: its
//!   first read goes into a per-thread scratch buffer, and only when bytes arrive does a context (and its read buffer)
//!   get made, to be dropped again as soon as the socket runs dry at a message boundary. A 64 KiB message therefore
//!   leaves nothing behind once read;
//! - **writing** takes [`Frame`]s: complete server frames (header and payload; server frames are never masked), so a
//!   room message is framed once in `rooms::fan_out` and the same bytes go to every member. The writer hands up to
//!   [`MAX_IOV`] frames to one vectored write (plain TCP: straight from the shared bytes, no copy; TLS: rustls copies
//!   them into records, which it must), and keeps no buffer between batches. Pongs and the close reply tungstenite
//!   produces while reading land in a small control buffer ([`MAX_CONTROL_BYTES`]) written before the next frame.
//!
//! Every incoming frame is still charged to the rate limits as its header arrives ([`FrameMeter`], `crate::frames`),
//! on both read paths. On a connection that negotiated permessage-deflate the meter also marks compressed messages
//! (and shows them to tungstenite as binary); the read then inflates them here, bounded by `limits.max_message_size`,
//! with the worker thread's inflater (`crate::deflate`): the connection keeps no inflater of its own.

use std::{
    cell::RefCell,
    collections::VecDeque,
    fmt,
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};
use tokio_tungstenite::tungstenite::{
    self, Message, Utf8Bytes,
    error::{CapacityError, ProtocolError},
    protocol::{Role, WebSocketConfig, WebSocketContext},
};

mod sync_io;

use sync_io::SyncIo;

use crate::{
    config::LimitsConfig,
    deflate::InflateError,
    frame::Frame,
    frames::{Deflated, FrameMeter},
    metrics::Metrics,
    outbox::{CloseRequest, Item, Outbox},
};

/// Most frames handed to one vectored write (Linux accepts 1024 slices; 64 already fills a socket buffer).
pub const MAX_IOV: usize = 64;

/// Bound of the control bytes (pongs, the close reply) tungstenite may produce before the writer takes them. Past it
/// tungstenite keeps the newest pong itself (RFC 6455 lets a burst of pings be answered by the last one).
pub const MAX_CONTROL_BYTES: usize = 4096;

/// `limits.fragment_timeout`'s default (`crate::config` uses it).
pub const DEFAULT_FRAGMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes asked of the socket per read by the lingering close's discard (see [`Wire::finish`]), into the thread's
/// scratch buffer.
const DISCARD_READ: usize = 16 * 1024;

/// Queue storage (items) kept between batches; more is given back as soon as the batch is written.
const KEEP_BATCH_CAPACITY: usize = 64;

thread_local! {
    /// The read buffer of idle connections: a connection with no message in flight reads into this, so it needs
    /// none of its own. Used only inside one synchronous `poll_read`, never across an await.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// What a read produced.
pub enum Incoming {
    /// A message, and whether a frame of it was over the rate limits.
    Message(Message, bool),
    /// The client closed the TCP connection after its close frame (or tungstenite finished the close handshake).
    Closed,
}

/// What the write side needs the connection to act on.
pub enum WriteEvent {
    /// The outbox asks for the connection to close (a slow consumer, a requested close).
    Close(CloseRequest),
    /// A write started waiting for the socket: the write deadline starts now.
    Blocked,
    /// The socket refused a write.
    Failed(io::Error),
}

/// tungstenite's read state while a message is in flight, and since when a fragmented message is open (its first
/// frame was read and its final frame not yet): `limits.fragment_timeout` runs from there.
struct Reading {
    ctx: WebSocketContext,
    fragment_since: Option<Instant>,
}

impl Reading {
    fn new(part: Vec<u8>, config: &WebSocketConfig) -> Box<Reading> {
        Box::new(Reading {
            ctx: WebSocketContext::from_partially_read(part, Role::Server, Some(*config)),
            fragment_since: None,
        })
    }
}

/// The error a read fails with when a fragmented message stayed open longer than `limits.fragment_timeout` (close
/// 1008 `message not completed in time`, `crate::connection::read_error_close`).
#[derive(Debug)]
pub struct FragmentTimeout;

impl fmt::Display for FragmentTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("fragmented message not completed within limits.fragment_timeout")
    }
}

impl std::error::Error for FragmentTimeout {}

impl FragmentTimeout {
    /// Whether `e` is this error.
    pub fn is(e: &tungstenite::Error) -> bool {
        matches!(e, tungstenite::Error::Io(e) if e.get_ref().is_some_and(|inner| inner.is::<FragmentTimeout>()))
    }
}

/// The socket of one WebSocket and its read and write state; owned by the connection's task.
pub struct Wire<IO> {
    io: IO,
    /// tungstenite's read state, only while a message is in flight (see the module doc). Boxed: an idle connection
    /// pays one pointer for it.
    ctx: Option<Box<Reading>>,
    meter: FrameMeter,
    /// Pongs and the close reply tungstenite wrote, waiting to go out before the next frame. Bound:
    /// [`MAX_CONTROL_BYTES`].
    control: Vec<u8>,
    /// Frames taken from the outbox (or queued by the connection itself), oldest first. Freed once written, so an
    /// idle connection holds no queue storage; bound: one outbox batch plus a heartbeat ping and the close frame.
    batch: VecDeque<Item>,
    /// Bytes of the first frame in `batch` already written.
    written: usize,
    /// Since when the current write waits for the socket (the write deadline, `limits.write_timeout`).
    blocked_since: Option<Instant>,
    /// Payload bytes of the batch written so far, and when its oldest frame was queued: counted once per batch.
    batch_bytes: u64,
    batch_queued_at: Option<Instant>,
    /// The client's close frame arrived; tungstenite wrote the reply, so no other close frame may follow.
    peer_closed: bool,
    /// A read failed: tungstenite's state after an error is not to be read from again (the lingering close then
    /// only drains the socket).
    read_failed: bool,
    /// `limits.fragment_timeout`, in milliseconds (a `u32` fits in the padding beside the flags: no idle cost).
    fragment_timeout_ms: u32,
    /// `limits.read_buffer_size`: bytes asked of the socket per read.
    read_size: usize,
    /// `limits.write_buffer_size`: bytes handed to one vectored write (at least one frame).
    write_size: usize,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Wire<IO> {
    /// The wire over an upgraded socket. `pending` is what the HTTP layer read past the upgrade request (a client
    /// may send its first frames without waiting for the 101); it is charged and parsed first. A fragmented message
    /// may stay open for [`DEFAULT_FRAGMENT_TIMEOUT`] unless [`Wire::fragment_timeout`] says otherwise.
    pub fn new(io: IO, pending: &[u8], meter: FrameMeter, config: &WebSocketConfig) -> Self {
        let mut wire = Wire {
            io,
            ctx: None,
            meter,
            control: Vec::new(),
            batch: VecDeque::new(),
            written: 0,
            blocked_since: None,
            batch_bytes: 0,
            batch_queued_at: None,
            peer_closed: false,
            read_failed: false,
            fragment_timeout_ms: duration_ms(DEFAULT_FRAGMENT_TIMEOUT),
            read_size: config.read_buffer_size.max(64),
            write_size: config.write_buffer_size.max(1),
        };
        if !pending.is_empty() {
            let mut part = pending.to_vec();
            wire.meter.charge(&mut part);
            wire.ctx = Some(Reading::new(part, config));
        }
        wire
    }

    /// Sets how long a fragmented message may stay open (`limits.fragment_timeout`).
    pub fn fragment_timeout(mut self, timeout: Duration) -> Self {
        self.fragment_timeout_ms = duration_ms(timeout);
        self
    }

    /// Storage this wire holds beyond its own fields: tungstenite's context with (at least) its read buffer while a
    /// message is in flight, the control bytes, the batch's queue storage, the meter's verdicts. Zero for an idle
    /// connection once its heartbeat has passed (tests; `BENCHMARKS.md`).
    pub fn retained_bytes(&self) -> usize {
        let ctx = self
            .ctx
            .as_ref()
            .map_or(0, |_| std::mem::size_of::<Reading>() + self.read_size);
        ctx + self.control.capacity()
            + self.batch.capacity() * std::mem::size_of::<Item>()
            + self.meter.retained_bytes()
    }

    /// Whether the client went over `limits.max_rate_violations` refusals in a row (close 1008).
    pub fn abusive(&self) -> bool {
        self.meter.abusive()
    }

    /// Whether tungstenite produced control frames (pongs) that wait to be written.
    pub fn has_control(&self) -> bool {
        !self.control.is_empty()
    }

    /// Whether the client's close frame was received (and answered by tungstenite).
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Since when a write waits for the socket, if one does.
    pub fn blocked_since(&self) -> Option<Instant> {
        self.blocked_since
    }

    /// Queues a frame of the connection's own (the heartbeat ping) after what is queued.
    pub fn queue(&mut self, frame: Frame) {
        self.batch.push_back(Item::Control(frame));
    }

    /// Gives back the storage of an idle connection (called at its heartbeat): the batch's and the outbox's queue.
    /// Together with the read side, which keeps no buffer between messages, a connection that received or sent a
    /// burst is back to an idle connection's size within one heartbeat interval.
    pub fn shrink_if_idle(&mut self, outbox: &Outbox) {
        if self.batch.is_empty() && self.written == 0 {
            self.batch = VecDeque::new();
        }
        if self.control.is_empty() {
            self.control = Vec::new();
        }
        outbox.shrink_if_idle();
    }

    /// Reads the next message. `Pending` with the socket's waker registered when nothing complete has arrived.
    pub fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        config: &WebSocketConfig,
    ) -> Poll<Result<Incoming, tungstenite::Error>> {
        let read = self.poll_read_inner(cx, config);
        if let Poll::Ready(Err(_)) = &read {
            // Whatever failed, tungstenite's state is not read from again.
            self.read_failed = true;
            self.ctx = None;
        }
        read
    }

    fn poll_read_inner(
        &mut self,
        cx: &mut Context<'_>,
        config: &WebSocketConfig,
    ) -> Poll<Result<Incoming, tungstenite::Error>> {
        if self.read_failed {
            return Poll::Ready(Err(tungstenite::Error::AlreadyClosed));
        }
        if self.meter.abusive() {
            return Poll::Ready(Err(abuse()));
        }
        if self.ctx.is_none() {
            let mut part = ready!(read_idle(&mut self.io, cx, self.read_size))?;
            if part.is_empty() {
                // What tungstenite reports for a TCP end without a close frame, so both paths close alike.
                return Poll::Ready(Err(tungstenite::Error::Protocol(
                    ProtocolError::ResetWithoutClosingHandshake,
                )));
            }
            if !self.meter.charge(&mut part) {
                return Poll::Ready(Err(abuse()));
            }
            self.ctx = Some(Reading::new(part, config));
        }
        let Some(reading) = self.ctx.as_mut() else {
            unreachable!("made above");
        };
        if reading
            .fragment_since
            .is_some_and(|since| since.elapsed() > Duration::from_millis(u64::from(self.fragment_timeout_ms)))
        {
            return Poll::Ready(Err(tungstenite::Error::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                FragmentTimeout,
            ))));
        }
        let Reading { ctx, fragment_since } = &mut **reading;
        let mut io = SyncIo {
            io: &mut self.io,
            cx,
            meter: &mut self.meter,
            control: &mut self.control,
        };
        let read = ctx.read(&mut io);
        // The meter has seen every header read so far: a fragmented message opened (or still open) starts (or
        // keeps) its deadline; a completed one ends it.
        match (io.meter.message_open(), *fragment_since) {
            (true, None) => *fragment_since = Some(Instant::now()),
            (false, Some(_)) => *fragment_since = None,
            _ => {}
        }
        match read {
            Ok(msg) => {
                if let Message::Close(_) = msg {
                    // tungstenite queued its reply: move it to `control` now (it then reports the end, ignored).
                    self.peer_closed = true;
                    let _ = ctx.flush(&mut io);
                }
                let verdict = self.meter.next_verdict();
                let msg = match verdict.deflated {
                    Some(kind) => inflated(msg, kind, verdict.refused, config)?,
                    None => msg,
                };
                Poll::Ready(Ok(Incoming::Message(msg, verdict.refused)))
            }
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                // Dry at a message boundary, with every pong handed over: the context holds nothing worth keeping.
                if io.meter.at_message_boundary() && ctx.flush(&mut io).is_ok() {
                    self.ctx = None;
                }
                Poll::Pending
            }
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                Poll::Ready(Ok(Incoming::Closed))
            }
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    /// Writes what is queued, taking more from `outbox` whenever the batch is written. `Pending` when everything is
    /// written (the outbox's waker registered) or the socket is full (the socket's waker registered).
    pub fn poll_write(&mut self, cx: &mut Context<'_>, outbox: &Outbox, metrics: &Metrics) -> Poll<WriteEvent> {
        loop {
            match self.poll_drain(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(WriteEvent::Failed(e)),
                Poll::Pending => {
                    if self.blocked_since.is_none() {
                        self.blocked_since = Some(Instant::now());
                        return Poll::Ready(WriteEvent::Blocked);
                    }
                    return Poll::Pending;
                }
            }
            self.blocked_since = None;
            self.batch_done(metrics);
            if self.batch.capacity() > KEEP_BATCH_CAPACITY {
                // Grown for a burst: given back now, not kept for the connection's life.
                self.batch = VecDeque::new();
            }
            let (close, queued_at) = ready!(outbox.poll_batch(cx, &mut self.batch));
            metrics.note_depth(self.batch.len());
            self.batch_queued_at = queued_at;
            self.expand_gaps();
            if let Some(close) = close {
                return Poll::Ready(WriteEvent::Close(close));
            }
        }
    }

    /// Writes `batch` and `control` until both are empty and the socket is flushed.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.written == 0 && !self.control.is_empty() {
                // At a frame boundary: tungstenite's frames go next, whole.
                let control = Bytes::from(std::mem::take(&mut self.control));
                self.batch.push_front(Item::Control(Frame::raw(control)));
            }
            if self.batch.is_empty() {
                return Pin::new(&mut self.io).poll_flush(cx);
            }
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let mut count = 0;
            let mut bytes = 0;
            for (i, item) in self.batch.iter().enumerate() {
                let wire = item_frame(item).wire();
                let wire = if i == 0 { &wire[self.written..] } else { wire };
                if count == MAX_IOV || (count > 0 && bytes + wire.len() > self.write_size) {
                    break;
                }
                slices[count] = IoSlice::new(wire);
                count += 1;
                bytes += wire.len();
            }
            let n = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..count]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.advance(n);
        }
    }

    /// Forgets the first `n` written bytes of the batch.
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.batch.front() else { break };
            let left = item_frame(front).wire().len() - self.written;
            if n < left {
                self.written += n;
                return;
            }
            n -= left;
            self.written = 0;
            if let Some(item) = self.batch.pop_front() {
                self.batch_bytes += item_frame(&item).len() as u64;
            }
        }
    }

    /// Counts a fully written batch: one counter add and one histogram sample (its oldest frame), not one per frame.
    fn batch_done(&mut self, metrics: &Metrics) {
        if self.batch_bytes > 0 {
            metrics.bytes_out.inc_by(std::mem::take(&mut self.batch_bytes));
        }
        if let Some(t) = self.batch_queued_at.take() {
            metrics.delivery_seconds.observe(t.elapsed().as_secs_f64());
        }
    }

    /// Puts a `gap` notice before every room message that carries dropped messages (rare: only when the outbox's
    /// policy dropped some, so the batch is rebuilt only then).
    fn expand_gaps(&mut self) {
        if !self
            .batch
            .iter()
            .any(|i| matches!(i, Item::Room { gap, .. } if *gap > 0))
        {
            return;
        }
        let mut expanded = VecDeque::with_capacity(self.batch.len() + 1);
        for item in self.batch.drain(..) {
            if let Item::Room { room, gap, .. } = &item
                && *gap > 0
            {
                expanded.push_back(Item::Control(Frame::text(crate::protocol::gap(room, *gap))));
            }
            expanded.push_back(item);
        }
        self.batch = expanded;
    }

    /// Ends the connection's output: writes what is queued, here and still in the (closed) `outbox`, if
    /// `req.flush_queued` (a frame already begun is always finished, so the stream stays well-formed), then the close
    /// frame unless the client's close was answered already; all of it within `limits.write_timeout`. Then it ends
    /// its own stream (TLS: close_notify, then TCP FIN) and lingers, the way nginx's `lingering_close` does: it reads
    /// what the client still sends until the client's close frame or end of stream, at most `limits.close_linger`
    /// of wall time, and, once the client's frames are not parsed any more (over the rate limits, or after a
    /// protocol error), at most `limits.close_linger_bytes` read into the thread's scratch buffer and dropped.
    ///
    /// Why: a socket closed with unread bytes in it is reset, and a reset destroys the close frame still unread in
    /// the client's receive buffer; a client flooding while it is closed for flooding then sees a reset (1006)
    /// instead of 1008, and a browser app reconnects and floods again. The client that stops sending and reads finds
    /// the close frame, then the end of the stream, at once.
    pub async fn finish(
        &mut self,
        outbox: Option<&Outbox>,
        req: &CloseRequest,
        config: &WebSocketConfig,
        limits: &LimitsConfig,
    ) {
        let timeout = limits.write_timeout;
        if req.flush_queued {
            if let Some(outbox) = outbox {
                outbox.take_remaining(&mut self.batch);
                self.expand_gaps();
            }
        } else {
            let begun = if self.written > 0 { self.batch.pop_front() } else { None };
            self.batch.clear();
            self.batch.extend(begun);
        }
        if self.peer_closed {
            // The client's close is answered (the reply is in `control`): it sends nothing more.
            let ended = async {
                std::future::poll_fn(|cx| self.poll_drain(cx)).await?;
                std::future::poll_fn(|cx| Pin::new(&mut self.io).poll_shutdown(cx)).await
            };
            let _ = tokio::time::timeout(timeout, ended).await;
            return;
        }
        self.queue(Frame::close(req.code, &req.reason));
        let mut budget = limits.close_linger_bytes;
        // While the close frame waits for the socket, a flooding client's bytes are dropped as they come: a client
        // blocked writing its flood would otherwise never get to read what unblocks our write.
        let mut discarding = true;
        let ended = async {
            std::future::poll_fn(|cx| match self.poll_drain(cx) {
                Poll::Pending if discarding && (self.meter.abusive() || self.read_failed) => {
                    match poll_discard(&mut self.io, cx, &mut budget) {
                        // The client ended its stream: only our write is left.
                        Poll::Ready(Ok(())) => {
                            discarding = false;
                            Poll::Pending
                        }
                        // Over the budget: the close is given up, the socket closed.
                        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                        Poll::Pending => Poll::Pending,
                    }
                }
                polled => polled,
            })
            .await?;
            std::future::poll_fn(|cx| Pin::new(&mut self.io).poll_shutdown(cx)).await
        };
        if !matches!(tokio::time::timeout(timeout, ended).await, Ok(Ok(()))) {
            tracing::debug!("close frame not written in time");
            return;
        }
        let linger = async {
            loop {
                if self.meter.abusive() || self.read_failed {
                    // Its frames are not parsed any more: bytes are read and dropped until it goes (or the budget
                    // is spent).
                    let end = std::future::poll_fn(|cx| poll_discard(&mut self.io, cx, &mut budget)).await;
                    if let Err(e) = end {
                        tracing::debug!(error = %e, "lingering close cut short");
                    }
                    return;
                }
                // Parsed (and charged to the rate limits, which end this branch if exceeded) until its close frame.
                match std::future::poll_fn(|cx| self.poll_read(cx, config)).await {
                    Ok(Incoming::Message(Message::Close(_), _)) | Ok(Incoming::Closed) => return,
                    Ok(Incoming::Message(..)) => continue,
                    // Over the limits or unparsable from here on (`read_failed` is set): dropped raw above.
                    Err(_) => continue,
                }
            }
        };
        if tokio::time::timeout(limits.close_linger, linger).await.is_err() {
            tracing::debug!("lingering close timed out");
        }
    }

    /// Writes one frame and everything queued before it, within `timeout` (the conformance echo).
    #[cfg(feature = "conformance")]
    pub async fn send(&mut self, frame: Frame, timeout: Duration) -> bool {
        self.queue(frame);
        self.send_control(timeout).await
    }

    /// Writes what is queued (tungstenite's pongs among it), within `timeout` (the conformance echo).
    #[cfg(feature = "conformance")]
    pub async fn send_control(&mut self, timeout: Duration) -> bool {
        let drained = tokio::time::timeout(timeout, std::future::poll_fn(|cx| self.poll_drain(cx))).await;
        matches!(drained, Ok(Ok(())))
    }
}

/// The error a read fails with when a compressed message is not valid deflate data (close 1007 `invalid compressed
/// data`, `crate::connection::read_error_close`).
#[derive(Debug)]
pub struct InvalidDeflate;

impl fmt::Display for InvalidDeflate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid permessage-deflate data")
    }
}

impl std::error::Error for InvalidDeflate {}

impl InvalidDeflate {
    /// Whether `e` is this error.
    pub fn is(e: &tungstenite::Error) -> bool {
        matches!(e, tungstenite::Error::Io(e) if e.get_ref().is_some_and(|inner| inner.is::<InvalidDeflate>()))
    }
}

/// A compressed message (`crate::frames::Deflated`), which tungstenite assembled as binary, inflated within
/// `max_message_size` (over it: the `Capacity` error, close 1009, having inflated at most one byte more) with this
/// thread's inflater, and made text again (UTF-8 checked: close 1007) if it was text. A message over the rate limits
/// is not inflated: the connection only answers it `rate_limited`.
fn inflated(
    msg: Message,
    kind: Deflated,
    refused: bool,
    config: &WebSocketConfig,
) -> Result<Message, tungstenite::Error> {
    let Message::Binary(data) = msg else {
        // The meter made the message binary: anything else is a control frame, which is never compressed.
        return Ok(msg);
    };
    if refused {
        return Ok(match kind {
            Deflated::Text => Message::Text(Default::default()),
            Deflated::Binary => Message::Binary(data),
        });
    }
    let max = config.max_message_size.unwrap_or(usize::MAX);
    let plain = crate::deflate::inflate(&data, max).map_err(|e| match e {
        InflateError::TooBig { max } => tungstenite::Error::Capacity(CapacityError::MessageTooLong {
            size: max.saturating_add(1),
            max_size: max,
        }),
        InflateError::Invalid => tungstenite::Error::Io(io::Error::new(io::ErrorKind::InvalidData, InvalidDeflate)),
    })?;
    Ok(match kind {
        Deflated::Text => Message::Text(Utf8Bytes::try_from(plain)?),
        Deflated::Binary => Message::Binary(Bytes::from(plain)),
    })
}

fn item_frame(item: &Item) -> &Frame {
    match item {
        Item::Control(frame) | Item::Room { frame, .. } => frame,
    }
}

fn abuse() -> tungstenite::Error {
    tungstenite::Error::Io(io::Error::other("rate limit exceeded repeatedly"))
}

/// Reads and drops what the client sends, into the thread's scratch buffer (no allocation per read), until the socket
/// has nothing more for now (`Pending`), the client ends its stream (`Ok`), or a read fails or `budget` bytes were
/// dropped (`Err`).
fn poll_discard<IO: AsyncRead + Unpin>(io: &mut IO, cx: &mut Context<'_>, budget: &mut u64) -> Poll<io::Result<()>> {
    SCRATCH.with_borrow_mut(|scratch| {
        if scratch.len() < DISCARD_READ {
            scratch.resize(DISCARD_READ, 0);
        }
        loop {
            let mut buf = ReadBuf::new(&mut scratch[..DISCARD_READ]);
            ready!(Pin::new(&mut *io).poll_read(cx, &mut buf))?;
            let n = buf.filled().len() as u64;
            if n == 0 {
                return Poll::Ready(Ok(()));
            }
            if n > *budget {
                *budget = 0;
                return Poll::Ready(Err(io::Error::other("limits.close_linger_bytes spent")));
            }
            *budget -= n;
        }
    })
}

/// A duration in whole milliseconds, saturated to `u32` (49 days).
fn duration_ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// One read of an idle connection, into the thread's scratch buffer; the bytes read come back in a buffer sized for
/// the context that will parse them (`read_size`, or more).
fn read_idle<IO: AsyncRead + Unpin>(io: &mut IO, cx: &mut Context<'_>, read_size: usize) -> Poll<io::Result<Vec<u8>>> {
    SCRATCH.with_borrow_mut(|scratch| {
        if scratch.len() < read_size {
            scratch.resize(read_size, 0);
        }
        let mut buf = ReadBuf::new(&mut scratch[..read_size]);
        ready!(Pin::new(io).poll_read(cx, &mut buf))?;
        let read = buf.filled();
        let mut part = Vec::with_capacity(read_size.max(read.len()));
        part.extend_from_slice(read);
        Poll::Ready(Ok(part))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_the_shortest_header_for_their_length() {
        for (len, header) in [(0, 2), (125, 2), (126, 4), (65_535, 4), (65_536, 10)] {
            let text = "x".repeat(len);
            let f = Frame::text(&text);
            assert_eq!(f.len(), len);
            assert_eq!(f.wire().len(), len + header, "header of a {len}-byte payload");
            assert_eq!(f.wire()[0], 0x81, "final text frame");
            assert_eq!(f.payload(), text.as_bytes());
            // tungstenite parses what we framed into the same payload.
            let mut cursor = io::Cursor::new(f.wire().to_vec());
            let (h, n) = tungstenite::protocol::frame::FrameHeader::parse(&mut cursor)
                .expect("parse")
                .expect("complete header");
            assert_eq!((h.is_final, h.mask, n), (true, None, len as u64));
        }
        let close = Frame::close(4008, "slow consumer");
        assert_eq!(close.wire()[0], 0x88);
        assert_eq!(&close.payload()[..2], &4008u16.to_be_bytes());
        assert_eq!(Frame::ping().wire(), &[0x89, 0]);
    }

    /// The issue's "given back" target, at the level that decides it: after a 64 KiB message in each direction the
    /// wire holds what an idle one holds (nothing) once the socket ran dry and the heartbeat passed; tungstenite's
    /// read state (which kept its high-water capacity until close) is gone right after the message.
    #[tokio::test]
    async fn a_64_kib_message_each_way_leaves_nothing_behind() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let config = crate::Config::default();
        let limits = std::sync::Arc::new(crate::limits::Limits::new(&config));
        let ws = WebSocketConfig::default()
            .read_buffer_size(config.limits.read_buffer_size)
            .max_message_size(Some(config.limits.max_message_size))
            .max_frame_size(Some(config.limits.max_frame_size));
        let mut wire = Wire::new(server, &[], FrameMeter::new(limits.message_limiter(None)), &ws);
        assert_eq!(wire.retained_bytes(), 0, "a new wire holds nothing");

        // In: one masked 64 KiB text frame (a zero mask leaves the payload as it is).
        const LEN: usize = 64 * 1024;
        let mut frame = vec![0x81, 0x80 | 127];
        frame.extend_from_slice(&(LEN as u64).to_be_bytes());
        frame.extend_from_slice(&[0; 4]);
        frame.extend(std::iter::repeat_n(b'x', LEN));
        client.write_all(&frame).await.expect("send");
        let read = std::future::poll_fn(|cx| wire.poll_read(cx, &ws)).await.expect("read");
        let Incoming::Message(Message::Text(text), refused) = read else {
            panic!("not a text message");
        };
        assert_eq!((text.len(), refused), (LEN, false));
        drop(text);
        let dry = std::future::poll_fn(|cx| Poll::Ready(wire.poll_read(cx, &ws).is_pending())).await;
        assert!(dry, "nothing more to read");
        assert_eq!(wire.retained_bytes(), 0, "tungstenite's read state was not given back");

        // Out: one 64 KiB room message, written while the client reads it.
        let outbox = Outbox::new(1024, 1 << 20);
        let room: std::sync::Arc<str> = "r".into();
        outbox.push_room(&room, Frame::text("y".repeat(LEN)), crate::outbox::Overflow::Disconnect);
        let reader = tokio::spawn(async move {
            let mut got = vec![0; LEN + 10];
            client.read_exact(&mut got).await.map(|_| got)
        });
        let metrics = crate::metrics::Metrics::new();
        loop {
            let polled = std::future::poll_fn(|cx| Poll::Ready(wire.poll_write(cx, &outbox, &metrics))).await;
            match polled {
                Poll::Pending if wire.batch.is_empty() && wire.written == 0 => break,
                Poll::Pending | Poll::Ready(WriteEvent::Blocked) => tokio::task::yield_now().await,
                Poll::Ready(WriteEvent::Close(_) | WriteEvent::Failed(_)) => panic!("the write failed"),
            }
        }
        let got = reader.await.expect("reader").expect("read the frame");
        assert_eq!(&got[..2], &[0x81, 127], "one final text frame with a 64-bit length");
        assert!(got[10..].iter().all(|&b| b == b'y'));
        wire.shrink_if_idle(&outbox);
        assert_eq!(wire.retained_bytes(), 0, "the batch's storage was not given back");
        assert_eq!(outbox.capacity(), 0, "the outbox's storage was not given back");
    }

    /// A compressed message on a deflating connection comes out inflated (text again), keeps nothing afterwards (the
    /// inflater is the thread's), and one that inflates past `max_message_size` fails as a capacity error (1009).
    #[tokio::test]
    async fn a_compressed_message_is_inflated_and_leaves_nothing_behind() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let config = crate::Config::default();
        let limits = std::sync::Arc::new(crate::limits::Limits::new(&config));
        let ws = WebSocketConfig::default()
            .read_buffer_size(config.limits.read_buffer_size)
            .max_message_size(Some(config.limits.max_message_size))
            .max_frame_size(Some(config.limits.max_frame_size));
        let meter = FrameMeter::new(limits.message_limiter(None)).deflate(true);
        let mut wire = Wire::new(server, &[], meter, &ws);
        let masked = |payload: &[u8]| {
            let mut frame = vec![0xC1, 0x80 | 127];
            frame.extend_from_slice(&(payload.len() as u64).to_be_bytes());
            frame.extend_from_slice(&[0; 4]);
            frame.extend_from_slice(payload);
            frame
        };
        let text: String = (0..2000).map(|i| format!("{{\"n\":{i}}} ")).collect();
        let mut compressed = Vec::new();
        crate::deflate::compress(text.as_bytes(), 1, &mut compressed);
        client.write_all(&masked(&compressed)).await.expect("send");
        let read = std::future::poll_fn(|cx| wire.poll_read(cx, &ws)).await.expect("read");
        let Incoming::Message(Message::Text(got), false) = read else {
            panic!("not a text message");
        };
        assert_eq!(got.as_str(), text);
        drop(got);
        let dry = std::future::poll_fn(|cx| Poll::Ready(wire.poll_read(cx, &ws).is_pending())).await;
        assert!(dry, "nothing more to read");
        assert_eq!(wire.retained_bytes(), 0, "a compressed message left state behind");

        let mut bomb = Vec::new();
        crate::deflate::compress(&vec![b'a'; config.limits.max_message_size + 1], 9, &mut bomb);
        client.write_all(&masked(&bomb)).await.expect("send");
        let read = std::future::poll_fn(|cx| wire.poll_read(cx, &ws)).await;
        assert!(matches!(read, Err(tungstenite::Error::Capacity(_))), "{:?}", read.err());
    }

    /// After a read error tungstenite's state is never read again: the close lingers on raw reads. It used to read
    /// on from the failed context, which tripped a debug assertion in tungstenite (a panic in every Autobahn case
    /// closed for size) and, in release, could take the next read for the end of the stream.
    #[tokio::test]
    async fn a_failed_read_closes_without_reading_tungstenite_again() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let config = crate::Config::default();
        let limits = std::sync::Arc::new(crate::limits::Limits::new(&config));
        let ws = WebSocketConfig::default()
            .read_buffer_size(config.limits.read_buffer_size)
            .max_message_size(Some(config.limits.max_message_size))
            .max_frame_size(Some(config.limits.max_frame_size));
        let mut wire = Wire::new(server, &[], FrameMeter::new(limits.message_limiter(None)), &ws);
        // A binary frame announcing 1 MiB (over `max_frame_size`), then some of it.
        let mut frame = vec![0x82, 0x80 | 127];
        frame.extend_from_slice(&(1u64 << 20).to_be_bytes());
        frame.extend_from_slice(&[0; 4]);
        frame.extend(std::iter::repeat_n(0u8, 4096));
        client.write_all(&frame).await.expect("send");
        let read = std::future::poll_fn(|cx| wire.poll_read(cx, &ws)).await;
        assert!(matches!(read, Err(tungstenite::Error::Capacity(_))), "{:?}", read.err());
        // The client keeps sending while the gateway closes; the close frame still arrives, and nothing panics.
        client.write_all(&[0u8; 8192]).await.expect("send more");
        let req = CloseRequest {
            code: crate::protocol::close::TOO_BIG,
            reason: "message too big".into(),
            flush_queued: false,
        };
        let closing = tokio::spawn(async move {
            wire.finish(None, &req, &ws, &crate::config::LimitsConfig::default())
                .await;
        });
        let mut got = [0u8; 4];
        client.read_exact(&mut got).await.expect("the close frame");
        assert_eq!(got, [0x88, 17, 0x03, 0xF1], "close 1009 with its reason");
        drop(client);
        closing.await.expect("finish did not panic");
    }

    /// The lingering close drops at most `limits.close_linger_bytes` of a flood that does not stop: past it the
    /// socket is closed at once, not after `limits.close_linger`; and the client that reads meanwhile finds the close
    /// frame, then the end of the stream (the half-close), while its flood is still being written.
    #[tokio::test]
    async fn an_endless_flood_is_dropped_up_to_the_byte_budget() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let mut config = crate::Config::default();
        config.limits.close_linger = Duration::from_secs(60);
        config.limits.close_linger_bytes = 256 * 1024;
        let limits = std::sync::Arc::new(crate::limits::Limits::new(&config));
        let ws = WebSocketConfig::default()
            .max_message_size(Some(config.limits.max_message_size))
            .max_frame_size(Some(config.limits.max_frame_size));
        let mut wire = Wire::new(server, &[], FrameMeter::new(limits.message_limiter(None)), &ws);
        // A frame over `max_frame_size` fails the read: from then on the flood is dropped unparsed.
        let (mut rd, mut wr) = client.into_split();
        let mut frame = vec![0x82, 0x80 | 127];
        frame.extend_from_slice(&(1u64 << 20).to_be_bytes());
        frame.extend_from_slice(&[0; 4]);
        wr.write_all(&frame).await.expect("send");
        let read = std::future::poll_fn(|cx| wire.poll_read(cx, &ws)).await;
        assert!(matches!(read, Err(tungstenite::Error::Capacity(_))), "{:?}", read.err());
        let flood = tokio::spawn(async move {
            let chunk = [0u8; 16 * 1024];
            let mut sent = 0usize;
            while wr.write_all(&chunk).await.is_ok() {
                sent += chunk.len();
            }
            sent
        });
        let req = CloseRequest {
            code: crate::protocol::close::TOO_BIG,
            reason: "message too big".into(),
            flush_queued: false,
        };
        let started = Instant::now();
        let closing = tokio::spawn(async move { wire.finish(None, &req, &ws, &config.limits).await });
        let mut got = Vec::new();
        rd.read_to_end(&mut got)
            .await
            .expect("the close frame, then the end of the stream");
        assert_eq!(&got[..4], &[0x88, 17, 0x03, 0xF1], "close 1009 with its reason");
        closing.await.expect("finish");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the byte budget ended the linger"
        );
        let sent = flood.await.expect("flood");
        assert!(sent >= 256 * 1024, "only {sent} bytes sent: the budget was not spent");
    }

    #[test]
    fn text_with_builds_in_place() {
        let f = Frame::text_with(8, |b| b.extend_from_slice(b"{\"a\":1}"));
        assert_eq!(f.to_string(), "{\"a\":1}");
        assert_eq!(f.wire()[1], 7);
    }
}
