//! TLS for the public listener on rustls's unbuffered API: a server stream that holds buffers only while bytes are in
//! flight.
//!
//! Why not tokio-rustls here: its `ServerConnection` keeps a 4 KiB read buffer for the whole life of the connection
//! (rustls's deframer resizes it to 4096 bytes at every read, even with nothing buffered), which was more than the
//! rest of an idle WebSocket connection together. On the unbuffered API the caller owns the buffers, so this stream
//! keeps what TLS itself needs (keys and state) and nothing else while idle:
//! - received TLS bytes go into a per-thread scratch buffer first, and into a buffer of the connection's own only if
//!   a record is left incomplete; decrypted data waits in a buffer of its own only if the reader took less than a
//!   record's worth;
//! - outgoing records are encrypted into a buffer that is freed once the socket took it.
//!
//! rustls does all of TLS (handshake, records, alerts, key updates, tickets); this module only moves bytes between
//! its states and the socket. The admin listener, which is not on the hot path, keeps tokio-rustls.
//!
//! Bounds (every buffer the peer can grow; [`TlsStream::retained_bytes`] sums them):
//! - `incoming` never holds more than [`MAX_INCOMING`] bytes (about 66 KiB), its capacity included. rustls's
//!   unbuffered API keeps every record of an unfinished handshake message in this buffer, record headers, tags and
//!   padding included, so without a cap one handshake message claiming 64 KiB, sent one byte per padded record, held
//!   a gigabyte (issue 22). A read never asks for more than the room left; once rustls cannot make progress with a
//!   full buffer the stream fails with `InvalidData` and the connection is closed.
//! - `plaintext` holds what one pass over `incoming` decrypted (so at most [`MAX_INCOMING`]), and more is read only
//!   once it is taken.
//! - `outgoing` holds one write's records, at most [`MAX_WRITE`] bytes of plaintext per write (a write first waits
//!   for the previous ones to reach the socket), or one handshake flight (the server's own, sized by its
//!   certificates), plus what rustls queues while reading: alerts and a close_notify, which its own counters bound
//!   (4 warning alerts, 1 renegotiation refusal; answers to key updates wait for the next write).
//!
//! All three are freed when empty, so an idle connection holds none of them.
//!
//! On a rustls error the fatal alert rustls queued (`bad_record_mac`, `decode_error`, ...) is written before the
//! error is returned, as far as the socket takes it at once; the stream is failed from then on: reads and writes
//! return an error, while `poll_flush` and `poll_shutdown` still deliver what is left of the alert.

use std::{
    cell::RefCell,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use rustls::{
    ServerConfig,
    server::UnbufferedServerConnection,
    unbuffered::{AppDataRecord, ConnectionState, EncodeError, EncryptError, UnbufferedStatus},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read from the socket at a time (a TLS record is at most 16 KiB plus overhead; several reads may make one).
const READ_SIZE: usize = 16 * 1024 + 512;

/// Most application bytes gathered into one record by a vectored write.
const GATHER: usize = 16 * 1024;

/// Most TLS bytes `incoming` may hold, capacity included: what rustls legitimately needs buffered at once.
///
/// rustls needs a whole record before it decrypts it (at most 2^14 + 2048 bytes of payload plus a 5-byte header,
/// its `MAX_WIRE_SIZE`: 18,437), and keeps a handshake message's records until the message is complete; it refuses
/// a handshake message over 0xffff bytes (plus a 4-byte header). In records filled to 2^14 bytes, as every honest
/// peer sends them, such a message spans at most 6 records, each with under 64 bytes of header, tag and nonce, so
/// 65,539 and 6 × 64 bytes: 65,923, which 66 KiB covers with a margin. A legitimate client's whole flight is a few
/// KiB (a ClientHello, or a Finished; Roomwire asks for no client certificate). tokio-rustls, before this module,
/// refused over 64 KiB of handshake data the same way.
pub const MAX_INCOMING: usize = 66 * 1024;

/// Most application bytes one `poll_write` encrypts (four full records), so that `outgoing` stays bounded whatever
/// the caller hands over at once; `write_all` loops over the rest.
pub const MAX_WRITE: usize = 4 * 16 * 1024;

thread_local! {
    /// Where an idle connection's reads land, so that it needs no read buffer of its own (used only inside one
    /// synchronous poll).
    static READ_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Where a vectored write's frames are gathered into one record's worth of plaintext.
    static GATHER_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// What rustls was asked to do besides processing what arrived.
#[derive(Clone, Copy)]
enum Give<'a> {
    Nothing,
    Data(&'a [u8]),
    CloseNotify,
}

/// Where rustls stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// It needs more bytes from the peer (the handshake is not done).
    NeedRead,
    /// Application data may be sent (the handshake is done and nothing is left to process).
    Open,
    /// Closed both ways.
    Closed,
}

/// A server-side TLS stream over `IO` (see the module doc).
pub struct TlsStream<IO> {
    io: IO,
    conn: UnbufferedServerConnection,
    /// TLS bytes received but not processed yet (an incomplete record); empty, without storage, otherwise.
    incoming: Vec<u8>,
    /// Decrypted bytes the reader has not taken yet, from `plain_pos`.
    plaintext: Vec<u8>,
    plain_pos: usize,
    /// Records to send, from `out_pos`; freed once written.
    outgoing: Vec<u8>,
    out_pos: usize,
    /// The peer sent close_notify, or the TCP stream ended.
    read_eof: bool,
    /// close_notify queued (on shutdown).
    close_sent: bool,
    /// rustls failed (or the peer overflowed `incoming`): only the queued alert may still be sent.
    failed: bool,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> TlsStream<IO> {
    /// Runs the handshake with `config` over `io`.
    pub async fn accept(io: IO, config: Arc<ServerConfig>) -> io::Result<Self> {
        let mut stream = Self::new(io, config)?;
        std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
        Ok(stream)
    }

    /// A stream whose handshake has not started: [`Self::poll_handshake`] runs it.
    fn new(io: IO, config: Arc<ServerConfig>) -> io::Result<Self> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        Ok(TlsStream {
            io,
            conn,
            incoming: Vec::new(),
            plaintext: Vec::new(),
            plain_pos: 0,
            outgoing: Vec::new(),
            out_pos: 0,
            read_eof: false,
            close_sent: false,
            failed: false,
        })
    }

    /// The socket under the TLS.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Heap bytes the stream's own buffers hold now (capacity, not length): 0 while idle, never much over
    /// [`MAX_INCOMING`] + [`MAX_WRITE`] (see the module doc). rustls's connection state is not counted.
    pub fn retained_bytes(&self) -> usize {
        self.incoming.capacity() + self.plaintext.capacity() + self.outgoing.capacity()
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let (step, _) = self.step(cx, Give::Nothing)?;
            ready!(self.poll_flush_outgoing(cx))?;
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            match step {
                Step::Closed => return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into())),
                Step::NeedRead | Step::Open => {
                    if ready!(self.poll_read_more(cx))? == 0 {
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                }
            }
        }
    }

    /// [`Self::process`], and on an error the fatal alert rustls queued is written at once if the socket takes it.
    fn step(&mut self, cx: &mut Context<'_>, send: Give<'_>) -> io::Result<(Step, usize)> {
        let result = self.process(send);
        if result.is_err() {
            // Best effort: a full socket keeps the rest for `poll_flush`/`poll_shutdown`, if the caller gets there.
            let _ = self.poll_flush_outgoing(cx);
        }
        result
    }

    /// Lets rustls process what was received (decrypted data goes to `plaintext`, records to send to `outgoing`)
    /// and, once it may, encrypt `send`. Returns where it stopped and how many bytes of `send` it took. On an error
    /// the stream is failed, with rustls's alert in `outgoing` (see [`Self::fail`]).
    fn process(&mut self, send: Give<'_>) -> io::Result<(Step, usize)> {
        if self.failed {
            return Err(failed());
        }
        let result = self.process_records(send);
        if result.is_err() {
            self.fail();
        }
        result
    }

    /// Marks the stream failed, frees what was received, and moves the alert rustls queued for the peer (if any)
    /// into `outgoing`.
    fn fail(&mut self) {
        self.failed = true;
        self.incoming = Vec::new();
        self.plaintext = Vec::new();
        self.plain_pos = 0;
        // rustls hands queued records out before it looks at the input again; an empty input keeps it from doing
        // anything else. A fatal alert is one record; the bound only guards against a state that keeps yielding.
        for _ in 0..4 {
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
            let Ok(ConnectionState::EncodeTlsData(mut encode)) = state else {
                break;
            };
            let encoded = append(&mut self.outgoing, 64, |buf| match encode.encode(buf) {
                Ok(n) => Ok(n),
                Err(EncodeError::InsufficientSize(e)) => Err(Some(e.required_size)),
                Err(_) => Err(None),
            });
            if encoded.is_err() {
                break;
            }
        }
    }

    fn process_records(&mut self, mut send: Give<'_>) -> io::Result<(Step, usize)> {
        let mut taken = 0;
        loop {
            let Self {
                conn,
                incoming,
                plaintext,
                outgoing,
                read_eof,
                close_sent,
                ..
            } = self;
            let UnbufferedStatus { mut discard, state } = conn.process_tls_records(incoming);
            let step = match state.map_err(tls_error)? {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let AppDataRecord { discard: more, payload } = record.map_err(tls_error)?;
                        discard += more;
                        plaintext.extend_from_slice(payload);
                    }
                    None
                }
                // The config never enables early data (`max_early_data_size` is 0), so rustls never yields it.
                ConnectionState::ReadEarlyData(_) => return Err(io::Error::other("unexpected TLS early data")),
                ConnectionState::EncodeTlsData(mut encode) => {
                    append(outgoing, 2048, |buf| match encode.encode(buf) {
                        Ok(n) => Ok(n),
                        Err(EncodeError::InsufficientSize(e)) => Err(Some(e.required_size)),
                        Err(_) => Err(None),
                    })?;
                    None
                }
                ConnectionState::TransmitTlsData(mut transmit) => {
                    // The records stay in `outgoing`, in order, until the socket takes them; rustls only needs to
                    // know they will be sent.
                    if let Give::Data(data) = send
                        && let Some(mut traffic) = transmit.may_encrypt_app_data()
                    {
                        encrypt(outgoing, data, |d, buf| traffic.encrypt(d, buf))?;
                        taken = data.len();
                        send = Give::Nothing;
                    }
                    transmit.done();
                    None
                }
                ConnectionState::BlockedHandshake => Some(Step::NeedRead),
                ConnectionState::WriteTraffic(mut traffic) => {
                    match send {
                        Give::Data(data) => {
                            encrypt(outgoing, data, |d, buf| traffic.encrypt(d, buf))?;
                            taken = data.len();
                        }
                        Give::CloseNotify if !*close_sent => {
                            encrypt(outgoing, &[], |_, buf| traffic.queue_close_notify(buf))?;
                            *close_sent = true;
                        }
                        Give::CloseNotify | Give::Nothing => {}
                    }
                    Some(Step::Open)
                }
                ConnectionState::PeerClosed => {
                    *read_eof = true;
                    None
                }
                ConnectionState::Closed => {
                    *read_eof = true;
                    Some(Step::Closed)
                }
                _ => return Err(io::Error::other("unexpected TLS connection state")),
            };
            incoming.drain(..discard);
            if incoming.is_empty() && incoming.capacity() > 0 {
                *incoming = Vec::new();
            }
            if let Some(step) = step {
                return Ok((step, taken));
            }
        }
    }

    /// Writes `outgoing` to the socket; frees it once written.
    fn poll_flush_outgoing(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        if self.outgoing.capacity() > 0 {
            self.outgoing = Vec::new();
        }
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }

    /// Reads more TLS bytes into `incoming` (through the scratch buffer), never past [`MAX_INCOMING`]. Returns how
    /// many; 0 at the end of the TCP stream. Called only once rustls processed what `incoming` holds, so a full
    /// `incoming` is more than rustls may need (see [`MAX_INCOMING`]): the stream fails.
    fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.failed {
            return Poll::Ready(Err(failed()));
        }
        let room = MAX_INCOMING - self.incoming.len();
        if room == 0 {
            self.fail();
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS peer sent more than 66 KiB that could not be processed",
            )));
        }
        let Self { io, incoming, .. } = self;
        READ_SCRATCH.with_borrow_mut(|scratch| {
            if scratch.len() < READ_SIZE {
                scratch.resize(READ_SIZE, 0);
            }
            let mut buf = ReadBuf::new(&mut scratch[..READ_SIZE.min(room)]);
            ready!(Pin::new(io).poll_read(cx, &mut buf))?;
            let read = buf.filled();
            let needed = incoming.len() + read.len();
            if needed > incoming.capacity() {
                // Doubling, but never past the cap: the capacity is what the connection costs.
                let target = needed.max(incoming.capacity() * 2).min(MAX_INCOMING);
                incoming.reserve_exact(target - incoming.len());
            }
            incoming.extend_from_slice(read);
            Poll::Ready(Ok(read.len()))
        })
    }

    fn take_plaintext(&mut self, buf: &mut ReadBuf<'_>) {
        let available = &self.plaintext[self.plain_pos..];
        let n = available.len().min(buf.remaining());
        buf.put_slice(&available[..n]);
        self.plain_pos += n;
        if self.plain_pos == self.plaintext.len() {
            self.plaintext = Vec::new();
            self.plain_pos = 0;
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.plain_pos < this.plaintext.len() {
                this.take_plaintext(buf);
                return Poll::Ready(Ok(()));
            }
            if this.read_eof {
                return Poll::Ready(Ok(()));
            }
            let (step, _) = this.step(cx, Give::Nothing)?;
            // What rustls wants sent (alerts, key update answers, tickets) goes out now; a full socket does not hold
            // up the read.
            if let Poll::Ready(Err(e)) = this.poll_flush_outgoing(cx) {
                return Poll::Ready(Err(e));
            }
            if this.plain_pos < this.plaintext.len() || this.read_eof {
                continue;
            }
            if step == Step::Closed {
                this.read_eof = true;
                continue;
            }
            if ready!(this.poll_read_more(cx))? == 0 {
                // The TCP stream ended without close_notify: an end of stream like any other for the layers above.
                this.read_eof = true;
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        // What was encrypted before must be on the socket first: that is the stream's backpressure.
        ready!(this.poll_flush_outgoing(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let buf = &buf[..buf.len().min(MAX_WRITE)];
        loop {
            let (step, taken) = this.step(cx, Give::Data(buf))?;
            if taken > 0 {
                // Accepted: it is in `outgoing` now, written here as far as the socket takes it, the rest later.
                if let Poll::Ready(Err(e)) = this.poll_flush_outgoing(cx) {
                    return Poll::Ready(Err(e));
                }
                return Poll::Ready(Ok(taken));
            }
            match step {
                Step::Closed => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Step::Open => return Poll::Ready(Err(io::Error::other("TLS refused application data"))),
                Step::NeedRead => {
                    ready!(this.poll_flush_outgoing(cx))?;
                    if ready!(this.poll_read_more(cx))? == 0 {
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                }
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut nonempty = bufs.iter().filter(|b| !b.is_empty());
        match (nonempty.next(), nonempty.next()) {
            (None, _) => return self.poll_write(cx, &[]),
            (Some(one), None) => return self.poll_write(cx, one),
            _ => {}
        }
        // Many frames: one record's worth of them in one go (one encryption, one record header), not one each.
        GATHER_SCRATCH.with_borrow_mut(|gather| {
            gather.clear();
            for b in bufs {
                if !gather.is_empty() && gather.len() + b.len() > GATHER {
                    break;
                }
                gather.extend_from_slice(b);
            }
            self.poll_write(cx, gather)
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_flush_outgoing(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A failed stream sends no close_notify: its fatal alert (already in `outgoing`) closed TLS.
        if !self.close_sent && !self.failed {
            self.process(Give::CloseNotify)?;
            self.close_sent = true;
        }
        ready!(self.poll_flush_outgoing(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Appends what `write` produces to `out`, growing the room it is given to what it asks for (`Err(Some(size))`).
fn append(out: &mut Vec<u8>, first: usize, mut write: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>) -> io::Result<()> {
    let mut room = first;
    for _ in 0..4 {
        let start = out.len();
        out.resize(start + room, 0);
        match write(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(Some(required)) => {
                out.truncate(start);
                room = required;
            }
            Err(None) => {
                out.truncate(start);
                return Err(io::Error::other("TLS record could not be encoded"));
            }
        }
    }
    Err(io::Error::other("TLS record buffer kept growing"))
}

/// Encrypts `data` into records appended to `out`.
fn encrypt(
    out: &mut Vec<u8>,
    data: &[u8],
    mut seal: impl FnMut(&[u8], &mut [u8]) -> Result<usize, EncryptError>,
) -> io::Result<()> {
    // One record per 16 KiB, each with at most 22 bytes of header, type and tag, is what TLS 1.3 and 1.2 add.
    let guess = data.len() + (data.len() / (16 * 1024) + 1) * 64;
    append(out, guess, |buf| match seal(data, buf) {
        Ok(n) => Ok(n),
        Err(EncryptError::InsufficientSize(e)) => Err(Some(e.required_size)),
        Err(_) => Err(None),
    })
}

/// What a failed stream answers from then on (the first error said why).
fn failed() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "TLS connection failed earlier")
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}
