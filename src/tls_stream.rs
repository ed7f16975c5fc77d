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

impl<IO> TlsStream<IO> {
    /// Heap bytes the stream's own buffers hold now (capacity, not length): 0 while idle, never much over
    /// [`MAX_INCOMING`] + [`MAX_WRITE`] (see the module doc). rustls's connection state is not counted.
    pub fn retained_bytes(&self) -> usize {
        self.incoming.capacity() + self.plaintext.capacity() + self.outgoing.capacity()
    }
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
        // rustls hands out what it queued (a fatal alert is one record) before it looks at the input again. One call
        // only: a second one would process the input anew (and, after a decrypt error, fail on the same record
        // again). The input must be the buffer rustls saw: its handshake deframer remembers offsets into it.
        let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut self.incoming);
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) = state {
            let _ = append(&mut self.outgoing, 64, |buf| match encode.encode(buf) {
                Ok(n) => Ok(n),
                Err(EncodeError::InsufficientSize(e)) => Err(Some(e.required_size)),
                Err(_) => Err(None),
            });
        }
        self.incoming = Vec::new();
        self.plaintext = Vec::new();
        self.plain_pos = 0;
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
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    // rustls counts on the discard being done before its next call (`fail` makes one).
                    incoming.drain(..discard);
                    return Err(tls_error(e));
                }
            };
            let step = match state {
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
fn append(
    out: &mut Vec<u8>,
    first: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
) -> io::Result<()> {
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

/// What the fuzz target and the unit tests drive a server stream with: a test certificate, and a peer whose bytes
/// are fixed in advance (`fuzz/fuzz_targets/tls_records.rs` calls [`fuzz::records`]).
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzz {
    use std::sync::OnceLock;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    use super::*;

    /// A self-signed certificate for `localhost` and a server config built like `tls::load_server_config`'s (TLS 1.3
    /// and 1.2, ALPN `http/1.1`), made once per process.
    pub fn server_config() -> (Arc<ServerConfig>, CertificateDer<'static>) {
        static CONFIG: OnceLock<(Arc<ServerConfig>, CertificateDer<'static>)> = OnceLock::new();
        CONFIG
            .get_or_init(|| {
                let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("test cert");
                let cert = certified.cert.der().clone();
                let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()));
                let mut config =
                    ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                        .expect("versions")
                        .with_no_client_auth()
                        .with_single_cert(vec![cert.clone()], key)
                        .expect("test config");
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                (Arc::new(config), cert)
            })
            .clone()
    }

    /// A peer that sends `input` in reads of `chunk` bytes, every other read first answering `Pending` (so the
    /// stream is seen between reads), then ends; it takes every write.
    pub struct Scripted<'a> {
        input: &'a [u8],
        chunk: usize,
        pending: bool,
        /// Bytes the stream wrote.
        pub written: usize,
    }

    impl<'a> Scripted<'a> {
        pub fn new(input: &'a [u8], chunk: usize) -> Self {
            Scripted {
                input,
                chunk: chunk.max(1),
                pending: false,
                written: 0,
            }
        }
    }

    impl AsyncRead for Scripted<'_> {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            self.pending = !self.pending;
            if self.pending && !self.input.is_empty() {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = self.chunk.min(self.input.len()).min(buf.remaining());
            let (now, rest) = self.input.split_at(n);
            buf.put_slice(now);
            self.input = rest;
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Scripted<'_> {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.written += buf.len();
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// The bounds of the module doc, checked whenever the stream is between two polls.
    pub fn check_bounds<IO>(stream: &TlsStream<IO>) {
        assert!(
            stream.incoming.capacity() <= MAX_INCOMING,
            "incoming holds {} bytes",
            stream.incoming.capacity()
        );
        assert!(
            stream.plaintext.capacity() <= MAX_INCOMING,
            "plaintext holds {}",
            stream.plaintext.capacity()
        );
        assert!(
            stream.retained_bytes() <= MAX_INCOMING + MAX_WRITE + 4096,
            "{} bytes",
            stream.retained_bytes()
        );
    }

    /// Fuzz entry: `data[0]` picks the read size (1..=128 bytes, or a multiple of 256 up to 32 KiB); the rest is what
    /// a client sends. A server stream runs its handshake on it and, if that succeeds, reads to the end, writes
    /// more than a record and shuts down. It never panics, never loops without reading, and never holds more than
    /// its bounds.
    pub fn records(data: &[u8]) {
        let Some((&pick, input)) = data.split_first() else {
            return;
        };
        let chunk = if pick < 128 {
            usize::from(pick) + 1
        } else {
            usize::from(pick - 127) * 256
        };
        let (config, _) = server_config();
        let mut stream = TlsStream::new(Scripted::new(input, chunk), config).expect("server connection");
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // Each poll either reads (at least one byte, or the end) or ends; twice the input's length is plenty.
        let mut polls = 2 * input.len() + 16;
        let mut tick = |stream: &TlsStream<Scripted<'_>>| {
            check_bounds(stream);
            polls -= 1;
            assert!(polls > 0, "the stream keeps polling without reading");
        };
        let handshake = loop {
            match stream.poll_handshake(&mut cx) {
                Poll::Ready(r) => break r,
                Poll::Pending => tick(&stream),
            }
        };
        check_bounds(&stream);
        if handshake.is_err() {
            return;
        }
        let mut buf = [0u8; 4096];
        loop {
            let mut read = ReadBuf::new(&mut buf);
            match Pin::new(&mut stream).poll_read(&mut cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => break,
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return,
                Poll::Pending => {}
            }
            tick(&stream);
        }
        let big = vec![7u8; 3 * MAX_WRITE / 2];
        if let Poll::Ready(Ok(n)) = Pin::new(&mut stream).poll_write(&mut cx, &big) {
            assert!(n <= MAX_WRITE, "one write took {n} bytes");
        }
        check_bounds(&stream);
        let _ = Pin::new(&mut stream).poll_shutdown(&mut cx);
        check_bounds(&stream);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use futures_util::FutureExt as _;
    use rustls::{
        ClientConfig, ClientConnection, ConnectionTrafficSecrets, ContentType, ProtocolVersion, RootCertStore,
        crypto::cipher::{OutboundChunks, OutboundPlainMessage},
        pki_types::ServerName,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};
    use tokio_rustls::{TlsConnector, client};

    use super::fuzz::{check_bounds, server_config};
    use super::*;

    /// A real rustls client trusting the test certificate; TLS 1.3 with AES-128-GCM only, so that the attack tests
    /// know which cipher to seal their own records with; secrets extractable for the same reason.
    fn client_config() -> Arc<ClientConfig> {
        let (_, cert) = server_config();
        let mut roots = RootCertStore::empty();
        roots.add(cert).expect("root");
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = vec![rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256];
        let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.enable_secret_extraction = true;
        Arc::new(config)
    }

    /// The server's socket: an in-memory pipe (large enough that neither side waits for the other to read) of
    /// which the server reads and writes at most `max` bytes per call.
    struct Trickle {
        io: DuplexStream,
        max: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let max = self.max.min(buf.remaining());
            let mut part = ReadBuf::new(&mut buf.initialize_unfilled()[..max]);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut part))?;
            let n = part.filled().len();
            buf.advance(n);
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Trickle {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let max = self.max.min(buf.len());
            Pin::new(&mut self.io).poll_write(cx, &buf[..max])
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    const PIPE: usize = 4 << 20;

    /// A client and a server stream, both past the handshake; the server reads and writes at most `max` bytes at a
    /// time (1: every record arrives split at every byte).
    async fn pair(max: usize) -> (client::TlsStream<DuplexStream>, TlsStream<Trickle>) {
        let (client_io, server_io) = duplex(PIPE);
        let (config, _) = server_config();
        let connector = TlsConnector::from(client_config());
        let name = ServerName::try_from("localhost").expect("name");
        let (client, server) = tokio::join!(
            connector.connect(name, client_io),
            TlsStream::accept(Trickle { io: server_io, max }, config)
        );
        let server = server.expect("server handshake");
        assert_eq!(
            server.retained_bytes(),
            0,
            "a stream past its handshake holds no buffer"
        );
        (client.expect("client handshake"), server)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Reads exactly `len` bytes from the server stream.
    async fn read_n(server: &mut TlsStream<Trickle>, len: usize) -> Vec<u8> {
        let mut got = vec![0; len];
        server.read_exact(&mut got).await.expect("server read");
        got
    }

    #[tokio::test]
    async fn records_split_at_every_byte_and_writes_larger_than_a_record() {
        let (mut client, mut server) = pair(1).await;
        // Several records each way, every one delivered a byte at a time.
        let up = pattern(40_000);
        let down = pattern(3 * MAX_WRITE / 2 + 17);
        let client_side = async {
            client.write_all(&up).await.expect("client write");
            client.flush().await.expect("client flush");
            let mut got = vec![0; down.len()];
            client.read_exact(&mut got).await.expect("client read");
            got
        };
        let server_side = async {
            let got = read_n(&mut server, up.len()).await;
            server.write_all(&down).await.expect("server write");
            server.flush().await.expect("server flush");
            got
        };
        let (client_got, server_got) = tokio::join!(client_side, server_side);
        assert!(server_got == up, "the server read other bytes than the client wrote");
        assert!(client_got == down, "the client read other bytes than the server wrote");
        assert_eq!(
            server.retained_bytes(),
            0,
            "nothing kept once everything was taken and sent"
        );
    }

    #[tokio::test]
    async fn one_write_encrypts_at_most_max_write() {
        let (mut client, mut server) = pair(usize::MAX).await;
        let data = pattern(3 * MAX_WRITE);
        let n = std::future::poll_fn(|cx| Pin::new(&mut server).poll_write(cx, &data))
            .await
            .expect("write");
        assert_eq!(n, MAX_WRITE);
        assert!(
            server.retained_bytes() <= MAX_WRITE + 4096,
            "{}",
            server.retained_bytes()
        );
        server.write_all(&data[n..]).await.expect("write the rest");
        server.flush().await.expect("flush");
        let mut got = vec![0; data.len()];
        client.read_exact(&mut got).await.expect("client read");
        assert!(got == data);
    }

    #[tokio::test]
    async fn several_records_per_read() {
        let (mut client, mut server) = pair(usize::MAX).await;
        // 200 records of 10 bytes, all in the pipe before the server reads once.
        let mut sent = Vec::new();
        for i in 0..200u32 {
            let msg = pattern(10 + i as usize % 3);
            client.write_all(&msg).await.expect("client write");
            sent.extend_from_slice(&msg);
        }
        client.flush().await.expect("flush");
        let mut buf = vec![0; sent.len() + 100];
        let n = server.read(&mut buf).await.expect("server read");
        // One read of the socket took every record: all of their data is there at once.
        assert_eq!(n, sent.len(), "one read gave {n} of {} bytes", sent.len());
        assert!(buf[..n] == sent[..]);
        assert_eq!(server.retained_bytes(), 0);
    }

    #[tokio::test]
    async fn close_notify_both_ways() {
        let (mut client, mut server) = pair(usize::MAX).await;
        client.write_all(b"last words").await.expect("write");
        client.shutdown().await.expect("client close_notify");
        assert_eq!(read_n(&mut server, 10).await, b"last words");
        let mut buf = [0; 16];
        assert_eq!(server.read(&mut buf).await.expect("read after close_notify"), 0);
        assert_eq!(server.read(&mut buf).await.expect("and again"), 0);
        server.write_all(b"bye").await.expect("the server may still write");
        server.shutdown().await.expect("server close_notify");
        let mut got = Vec::new();
        // tokio-rustls ends a read with Ok(0) only on close_notify (a bare TCP end is UnexpectedEof).
        client.read_to_end(&mut got).await.expect("the client saw close_notify");
        assert_eq!(got, b"bye");
        assert_eq!(server.retained_bytes(), 0);
    }

    #[tokio::test]
    async fn peer_stopping_mid_record() {
        let (client, mut server) = pair(usize::MAX).await;
        let (mut io, mut conn) = client.into_inner();
        conn.writer().write_all(&pattern(5000)).expect("plaintext");
        let mut record = Vec::new();
        conn.write_tls(&mut record).expect("record");
        assert!(record.len() > 5000);
        io.write_all(&record[..2500]).await.expect("half a record");
        drop(io);
        let mut buf = [0; 8192];
        // The stream ends (the layers above see an end of stream, as for any TCP end without close_notify); what
        // was half a record is freed with the stream.
        let n = server.read(&mut buf).await.expect("end of stream");
        assert_eq!(n, 0);
        assert!(server.retained_bytes() <= 2500 * 2, "{}", server.retained_bytes());
    }

    #[tokio::test]
    async fn key_updates_from_the_client() {
        let (mut client, mut server) = pair(1).await;
        for round in 0..5u8 {
            // Requests a KeyUpdate of the server too: its next write must answer with one.
            client.get_mut().1.refresh_traffic_keys().expect("key update");
            client.write_all(&[round; 100]).await.expect("write");
            client.flush().await.expect("flush");
            assert_eq!(read_n(&mut server, 100).await, [round; 100]);
            server.write_all(&[round + 100; 50]).await.expect("server write");
            server.flush().await.expect("server flush");
            let mut got = [0; 50];
            client
                .read_exact(&mut got)
                .await
                .expect("the client reads with the server's new keys");

            assert_eq!(got, [round + 100; 50]);
        }
        assert_eq!(server.retained_bytes(), 0);
    }

    #[tokio::test]
    async fn a_corrupt_record_gets_bad_record_mac_before_the_close() {
        let (client, mut server) = pair(usize::MAX).await;
        let (mut io, mut conn) = client.into_inner();
        conn.writer().write_all(b"hello").expect("plaintext");
        let mut record = Vec::new();
        conn.write_tls(&mut record).expect("record");
        let last = record.len() - 1;
        record[last] ^= 1;
        io.write_all(&record).await.expect("send");
        let mut buf = [0; 64];
        let err = server
            .read(&mut buf)
            .await
            .expect_err("a corrupt record fails the read");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        drop(server);
        // The server's tickets, then its alert: the client's rustls reports which alert it got.
        let mut from_server = Vec::new();
        io.read_to_end(&mut from_server).await.expect("client read");
        let mut rd = &from_server[..];
        let result = loop {
            if rd.is_empty() {
                break conn.process_new_packets().map(|_| ());
            }
            conn.read_tls(&mut rd).expect("read_tls");
            if let Err(e) = conn.process_new_packets() {
                break Err(e);
            }
        };
        assert_eq!(
            result,
            Err(rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac)),
            "the client must receive bad_record_mac"
        );
    }

    /// A handshake message claiming 0xffff bytes and its bytes, one handshake byte per record, each record
    /// `record(byte)` built by the caller.
    fn fragmented(kind: u8, record: impl FnMut(u8) -> Vec<u8>) -> impl Iterator<Item = Vec<u8>> {
        let header = [kind, 0x00, 0xff, 0xff];
        header
            .into_iter()
            .chain(std::iter::repeat(0x42))
            .take(4 + 0xffff)
            .map(record)
    }

    /// Feeds `records` to the server a batch at a time (each batch one or more whole records, so several per
    /// read), polling `poll` after each; the bounds must hold throughout and the stream must fail with
    /// `InvalidData` before the handshake message ends.
    async fn attack<F>(
        mut client: DuplexStream,
        server: &mut TlsStream<Trickle>,
        records: impl Iterator<Item = Vec<u8>>,
        batch: usize,
        mut poll: F,
    ) where
        F: FnMut(&mut TlsStream<Trickle>, &mut Context<'_>) -> Poll<io::Result<()>>,
    {
        let mut sent = 0usize;
        let mut pending = Vec::new();
        for (i, record) in records.enumerate() {
            pending.extend_from_slice(&record);
            if (i + 1) % batch != 0 {
                continue;
            }
            client.write_all(&pending).await.expect("attacker write");
            sent += pending.len();
            pending.clear();
            // Until the server has read what was sent (the pipe is large enough not to block the attacker).
            let outcome = std::future::poll_fn(|cx| poll(server, cx)).now_or_never();
            check_bounds(server);
            assert!(server.incoming.len() <= MAX_INCOMING);
            match outcome {
                None => {}
                Some(Ok(())) => panic!("the attack was accepted"),
                Some(Err(e)) => {
                    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
                    assert!(sent >= MAX_INCOMING, "failed after only {sent} bytes: {e}");
                    assert_eq!(server.incoming.capacity(), 0, "a failed stream frees what it received");
                    return;
                }
            }
        }
        panic!("the server took the whole fragmented message ({sent} bytes)");
    }

    /// Issue 22, before the handshake: a ClientHello claiming 64 KiB, one byte per plaintext record (6 bytes on
    /// the wire per byte of message). Without the cap the server kept 393 KB for it; with it, it fails at 66 KiB.
    #[tokio::test]
    async fn fragmented_client_hello_is_cut_at_the_cap() {
        let (client, server_io) = duplex(PIPE);
        let (config, _) = server_config();
        let mut server = TlsStream::new(
            Trickle {
                io: server_io,
                max: usize::MAX,
            },
            config,
        )
        .expect("server");
        let records = fragmented(0x01, |b| vec![0x16, 0x03, 0x01, 0x00, 0x01, b]);
        attack(client, &mut server, records, 512, |s, cx| s.poll_handshake(cx)).await;
    }

    /// Issue 22, after the handshake (the same holds after the WebSocket upgrade): a KeyUpdate claiming 64 KiB,
    /// one byte per record, each record padded to the 2^14 + 1 bytes TLS 1.3 allows. Without the cap every record
    /// added 16 KiB (a gigabyte per connection); with it, the read fails at the fifth record.
    #[tokio::test]
    async fn fragmented_key_update_with_padded_records_is_cut_at_the_cap() {
        let (client, mut server) = pair(usize::MAX).await;
        let (io, conn) = client.into_inner();
        let secrets = conn.dangerous_extract_secrets().expect("secrets");
        let (mut seq, ConnectionTrafficSecrets::Aes128Gcm { key, iv }) = secrets.tx else {
            panic!("the client config offers AES-128-GCM only");
        };
        let rustls::SupportedCipherSuite::Tls13(suite) = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        else {
            unreachable!("a TLS 1.3 suite")
        };
        let mut sealer = suite.aead_alg.encrypter(key, iv);
        let records = fragmented(0x18, move |b| {
            // TLSInnerPlaintext: the content, its real type, zero padding; the sealer appends the "type" given
            // here (0, more padding) after it.
            let mut inner = vec![0u8; 16 * 1024];
            inner[0] = b;
            inner[1] = u8::from(ContentType::Handshake);
            let plain = OutboundPlainMessage {
                typ: ContentType::from(0u8),
                version: ProtocolVersion::TLSv1_2,
                payload: OutboundChunks::Single(&inner),
            };
            let sealed = sealer.encrypt(plain, seq).expect("seal");
            seq += 1;
            sealed.encode()
        });
        let mut buf = [0u8; 64];
        attack(io, &mut server, records, 1, |s, cx| {
            let mut read = ReadBuf::new(&mut buf);
            match ready!(Pin::new(s).poll_read(cx, &mut read)) {
                Ok(()) if read.filled().is_empty() => Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                other => Poll::Ready(other),
            }
        })
        .await;
    }

    #[test]
    fn fuzz_entry_on_a_real_client_hello_and_on_the_attack() {
        let mut conn =
            ClientConnection::new(client_config(), ServerName::try_from("localhost").expect("name")).expect("client");
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).expect("client hello");
        for pick in [0u8, 5, 127, 128, 200, 255] {
            let mut data = vec![pick];
            data.extend_from_slice(&hello);
            fuzz::records(&data);
        }
        let mut data = vec![255u8];
        for record in fragmented(0x01, |b| vec![0x16, 0x03, 0x01, 0x00, 0x01, b]).take(20_000) {
            data.extend_from_slice(&record);
        }
        fuzz::records(&data);
    }

    /// Writes the fuzz seeds (`cargo test --lib write_fuzz_seeds -- --ignored`): a real client's first flight cut
    /// four ways, and the start of the fragmented-ClientHello attack.
    #[test]
    #[ignore]
    fn write_fuzz_seeds() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/tls_records");
        std::fs::create_dir_all(&dir).expect("seed dir");
        let mut conn =
            ClientConnection::new(client_config(), ServerName::try_from("localhost").expect("name")).expect("client");
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).expect("client hello");
        for pick in [0u8, 4, 127, 200] {
            let mut data = vec![pick];
            data.extend_from_slice(&hello);
            std::fs::write(dir.join(format!("client-hello-{pick}")), data).expect("write seed");
        }
        let mut data = vec![130u8];
        for record in fragmented(0x01, |b| vec![0x16, 0x03, 0x01, 0x00, 0x01, b]).take(2000) {
            data.extend_from_slice(&record);
        }
        std::fs::write(dir.join("fragmented-client-hello"), data).expect("write seed");
    }
}
