//! `roomwire-bench`: the load generator behind `scripts/bench` (issue 5). It drives Roomwire and the peers users would
//! pick instead (nats-server's own WebSocket listener, Socket.IO 4.8, uWebSockets.js) with the same clients, and prints
//! one JSON line of results.
//!
//! Shape of a run: subscriber connections (spread over source addresses, and over child processes with `--procs` so
//! that no process holds more than ~15k sockets) connect and join their room (`r<i % rooms>`); the coordinating
//! process measures the server's RSS before and after; then, unless the scenario is `idle`, one publisher sends
//! payloads carrying a send timestamp (ns since the UNIX epoch) at each `--rate` step for `--duration` seconds, and the
//! subscribers record the end-to-end latency of every message they receive in an HDR histogram. Roomwire and nats-ws
//! are fed from the backend side by a plain NATS TCP connection (`PUB rooms.<room>`); Socket.IO and uWS by a WebSocket
//! publisher connection of the same server. Children talk to the coordinator over stdin/stdout, one JSON line each
//! way (`ready`, then a `snap` → snapshot per step), and the coordinator merges their histograms.
//!
//! Wire formats per target: `roomwire` (welcome → join/ack → `{"op":"message",..}`), `nats-ws` (NATS text protocol
//! over WebSocket: CONNECT/SUB/PING → PONG, several `MSG` per frame, PING → PONG), `socketio` (Engine.IO v4 over
//! WebSocket: `0{..}` → `40` → `40{..}`, `420["join",r]` → `430[]`, `2` → `3`, events `42["msg",..]`) and `uws`
//! (`{"op":"join"}` → `{"op":"ack"}`, then plain JSON text), `sockudo` (Pusher protocol 7 over WebSocket, published
//! through Sockudo's HTTP events API: `pusher.rs`).

mod deflate;
mod pusher;
mod recover;
mod rpc;

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use clap::{Parser, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// The most connections one process opens when `--procs` is 0 (auto); the per-process limit here is 20,000 files.
const CONNS_PER_PROC: usize = 15_000;
/// Longest latency the histogram holds, in µs (60 s); longer ones are clamped to it.
const MAX_LATENCY_US: u64 = 60_000_000;
/// Linux's USER_HZ, the unit of utime/stime in /proc/<pid>/stat.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

#[derive(Parser, Debug, Clone)]
#[command(about = "WebSocket rooms load generator for Roomwire and its peers; prints one JSON line")]
struct Args {
    /// Which server speaks at --url.
    #[arg(long, value_enum)]
    target: Target,
    /// Subscriber endpoint, ws:// or wss:// (wss certificates are not verified), e.g. ws://127.0.0.1:9443/ws. A
    /// comma-separated list spreads the subscribers over several gateways: connection i uses URL `i % n` (scale-out).
    #[arg(long)]
    url: String,
    /// Publisher endpoint: nats://host:port for roomwire and nats-ws (default nats://127.0.0.1:4222); a ws:// URL for
    /// socketio and uws (default: --url).
    #[arg(long)]
    pub_url: Option<String>,
    /// Subscriber connections in total.
    #[arg(long, default_value_t = 1000)]
    conns: usize,
    /// Source addresses the subscribers bind to, round-robin (one address runs out of ports near 28k).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    sources: Vec<IpAddr>,
    /// Rooms; connection i joins room `r<i % rooms>`; publishes go round-robin over the rooms.
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    /// What to measure.
    #[arg(long, value_enum, default_value = "fanout")]
    scenario: Scenario,
    /// Publishes per second, one value per step (fanout/rooms raise it until saturation).
    #[arg(long, value_delimiter = ',', default_value = "100")]
    rate: Vec<u64>,
    /// Seconds per rate step; for `idle`, seconds to hold the connections after measuring.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Fraction of subscribers that stop reading after joining (0.01 = 1%).
    #[arg(long, default_value_t = 0.0)]
    stalled: f64,
    /// Payload size in bytes (at least 40: it carries the timestamp). Ignored with `--payload-kind chat`.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// What the published payloads look like: `pad` (a timestamp and `--payload` bytes of "x") or `chat` (chat-like
    /// JSON of 200 to 800 bytes, the same sequence every run: see `chat_payload`).
    #[arg(long, value_enum, default_value = "pad")]
    payload_kind: PayloadKind,
    /// Subscribers offer permessage-deflate (`permessage-deflate; client_max_window_bits`) and inflate what arrives
    /// compressed, with this generator's own minimal client (tungstenite has no deflate). Roomwire and uws only.
    #[arg(long)]
    deflate: bool,
    /// Processes holding the subscribers; 0 = one per 15,000 connections.
    #[arg(long, default_value_t = 0)]
    procs: usize,
    /// Connection attempts in flight per process.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Server process ids: RSS is read from the first, CPU time summed over all (e.g. roomwire,nats-server).
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Processes whose RSS is reported one by one (e.g. every gateway of a scale-out run).
    #[arg(long, value_delimiter = ',')]
    rss_pid: Vec<u32>,
    /// Seconds of publishing at the first rate before the first measured step.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Seconds to wait after every subscriber joined, before measuring RSS and publishing.
    #[arg(long, default_value_t = 1.0)]
    settle: f64,
    /// `rooms` scenario: the best step is the highest delivered/s whose p99 stays under this.
    #[arg(long, default_value_t = 50.0)]
    p99_limit_ms: f64,
    /// A step delivering less than this fraction of what it should counts as saturated and ends the ramp.
    #[arg(long, default_value_t = 0.9)]
    saturation: f64,
    /// `recover` scenario: messages published to each room while its clients are away.
    #[arg(long, default_value_t = 100)]
    missed: u64,
    /// `idle` scenario, Roomwire and nats-ws: after measuring, publish one message of this many payload bytes to every
    /// room (so every client receives one), wait until all arrived, idle `--burst-idle` seconds and measure RSS
    /// again: whether buffers that grew for a burst are given back. 0 = no burst.
    #[arg(long, default_value_t = 0)]
    burst: usize,
    /// Seconds to idle after the burst before measuring.
    #[arg(long, default_value_t = 30.0)]
    burst_idle: f64,
    /// `rpc` scenario: the method called (a responder must serve `<rpc-prefix>.<method>`).
    #[arg(long, default_value = "demo.time")]
    method: String,
    /// `rpc` scenario: the gateway's `rpc.subject_prefix`, for the direct requests.
    #[arg(long, default_value = "rpc")]
    rpc_prefix: String,
    /// `sockudo`: the Pusher app, `id:key:secret`, as in Sockudo's config (subscribers connect to `/app/<key>`, the
    /// publisher signs with the secret).
    #[arg(long, default_value = "roomwire-bench:bench-key:bench-secret")]
    pusher_app: String,
    /// Free text copied into the result (e.g. "run 2").
    #[arg(long)]
    label: Option<String>,
    /// Internal: run as a child holding connections `offset,count`.
    #[arg(long, hide = true)]
    worker: Option<String>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Target {
    Roomwire,
    NatsWs,
    Socketio,
    Uws,
    Sockudo,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum PayloadKind {
    Pad,
    Chat,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Scenario {
    /// Connect, join, measure memory, hold.
    Idle,
    /// One room, rate raised until delivered/s stops following: best = highest delivered/s.
    Fanout,
    /// Many rooms: best = highest delivered/s with p99 under --p99-limit-ms; the ramp ends after two saturated steps
    /// in a row.
    Rooms,
    /// Fixed rate(s): best = the last step.
    Latency,
    /// Reconnect storm against history rooms (`recover.rs`).
    Recover,
    /// RPC calls through the gateway against direct NATS requests to the same responder (`rpc.rs`).
    Rpc,
    /// Connect and join with `--concurrency` attempts in flight per process (the whole `--conns` for a reconnect
    /// storm, 10 for a paced open), then wait `--settle` seconds (30 for the memory a storm leaves behind) and
    /// measure like `idle`; adds handshakes/s, the server's CPU for the handshakes and each client's time from its
    /// TCP connect to its join's confirmation.
    Storm,
}

// ---------------------------------------------------------------------------------------------------------------
// Statistics shared by the subscribers of one process, and their serialisable snapshots.

/// Counters of one process's subscribers. A snapshot resets them, so each snapshot covers one step.
struct Stats {
    delivered: AtomicU64,
    frames: AtomicU64,
    closed: AtomicU64,
    hist: Mutex<Histogram<u64>>,
}

/// Bytes the subscribers of this process read from their sockets (WebSocket bytes: after TLS), handshakes included.
static WIRE_BYTES: AtomicU64 = AtomicU64::new(0);

#[derive(Serialize, Deserialize, Default)]
struct Snapshot {
    delivered: u64,
    frames: u64,
    /// WebSocket bytes read by the subscribers since the last snapshot.
    #[serde(default)]
    wire_bytes: u64,
    closed: u64,
    /// Sparse histogram: (latency µs, count).
    hist: Vec<(u64, u64)>,
}

#[derive(Serialize, Deserialize, Default, Clone)]
struct Ready {
    connected: u64,
    connect_errors: u64,
    stalled: u64,
    first_error: Option<String>,
    /// Sparse histogram (µs, count) of each joined client's time from its TCP connect to its join's confirmation
    /// (TLS, the WebSocket upgrade, the server's first message and the join's ack in between).
    join_us: Vec<(u64, u64)>,
}

impl Stats {
    fn new() -> Self {
        Stats {
            delivered: AtomicU64::new(0),
            frames: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            hist: Mutex::new(new_histogram()),
        }
    }

    /// Records one received frame holding the given send timestamps.
    fn record(&self, timestamps: &[u64]) {
        self.frames.fetch_add(1, Relaxed);
        if timestamps.is_empty() {
            return;
        }
        let now = now_ns();
        self.delivered.fetch_add(timestamps.len() as u64, Relaxed);
        let mut hist = self.hist.lock().expect("stats lock");
        for &ts in timestamps {
            hist.saturating_record((now.saturating_sub(ts) / 1000).clamp(1, MAX_LATENCY_US));
        }
    }

    fn take(&self) -> Snapshot {
        let mut hist = self.hist.lock().expect("stats lock");
        let sparse = sparse(&hist);
        hist.reset();
        Snapshot {
            delivered: self.delivered.swap(0, Relaxed),
            frames: self.frames.swap(0, Relaxed),
            wire_bytes: WIRE_BYTES.swap(0, Relaxed),
            closed: self.closed.swap(0, Relaxed),
            hist: sparse,
        }
    }
}

/// A histogram's recorded values as (value, count) pairs, to send between processes.
fn sparse(hist: &Histogram<u64>) -> Vec<(u64, u64)> {
    hist.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Chat-like JSON of 200 to 800 bytes for message `i` (`--payload-kind chat`): a sender, a room, a kind and a text of
/// words drawn from a fixed 64-word vocabulary, the length and the words chosen by a xorshift64 generator seeded
/// with `i` (splitmix64), so every run publishes the same sequence; only `ts` (the send time) differs. What a chat
/// message compresses like: repeated keys and common words, no shared context between messages.
fn chat_payload(ts: u64, i: u64) -> String {
    const WORDS: [&str; 64] = [
        "the", "to", "and", "a", "of", "in", "is", "it", "you", "that", "for", "on", "with", "this", "we", "are",
        "meeting", "deploy", "today", "tomorrow", "release", "review", "please", "thanks", "ok", "sure", "lunch",
        "build", "fixed", "broken", "issue", "ticket", "customer", "call", "later", "now", "done", "merged", "branch",
        "test", "green", "red", "server", "client", "latency", "room", "message", "channel", "team", "weekend",
        "monday", "friday", "coffee", "lol", "great", "idea", "let's", "ship", "it", "again", "why", "how", "when",
        "where",
    ];
    let mut x = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let target = 200 + (next() % 601) as usize;
    let head = format!(
        r#"{{"ts":{ts},"id":"m{i}","user":{{"id":"u{}","name":"user-{}"}},"kind":"chat","text":""#,
        next() % 10_000,
        next() % 500
    );
    let tail = r#"","reactions":[]}"#;
    let mut text = String::new();
    while head.len() + text.len() + tail.len() < target {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(WORDS[(next() % 64) as usize]);
    }
    text.truncate(target.saturating_sub(head.len() + tail.len()).max(1));
    format!("{head}{text}{tail}")
}

/// Every `"ts":<digits>` in `data`, appended to `out`; also `\"ts\":<digits>`, the same inside a JSON string (Pusher
/// events carry their data as one).
fn find_timestamps(data: &[u8], out: &mut Vec<u64>) {
    const KEY: &[u8] = b"\"ts";
    let mut i = 0;
    while let Some(pos) = data[i..].windows(KEY.len()).position(|w| w == KEY) {
        let mut j = i + pos + KEY.len();
        if data[j..].starts_with(b"\":") {
            j += 2;
        } else if data[j..].starts_with(b"\\\":") {
            j += 3;
        } else {
            i = j;
            continue;
        }
        let mut ts = 0u64;
        while let Some(d) = data.get(j).filter(|b| b.is_ascii_digit()) {
            ts = ts.wrapping_mul(10).wrapping_add(u64::from(d - b'0'));
            j += 1;
        }
        out.push(ts);
        i = j;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Transport: TCP bound to a source address, optionally TLS (certificates not verified), then WebSocket.

/// A parsed ws:// or wss:// endpoint, resolved once.
#[derive(Clone)]
struct Endpoint {
    url: String,
    addr: SocketAddr,
    host: String,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Endpoint {
    async fn parse(url: &str) -> anyhow::Result<Self> {
        let uri: tokio_tungstenite::tungstenite::http::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
        let tls = match uri.scheme_str() {
            Some("ws") => None,
            Some("wss") => Some(tls_connector()),
            _ => bail!("{url}: expected ws:// or wss://"),
        };
        let host = uri
            .host()
            .context("URL without host")?
            .trim_matches(['[', ']'])
            .to_string();
        let port = uri.port_u16().unwrap_or(if tls.is_some() { 443 } else { 80 });
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await?
            .next()
            .context("host did not resolve")?;
        Ok(Endpoint {
            url: url.to_string(),
            addr,
            host,
            tls,
        })
    }

    /// TCP (from `source`), then TLS for wss.
    async fn stream(&self, source: Option<IpAddr>) -> anyhow::Result<BenchStream> {
        let tcp = tcp_connect(self.addr, source).await?;
        Ok(match &self.tls {
            None => BenchStream::Plain(tcp),
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())?;
                BenchStream::Tls(Box::new(connector.connect(name, tcp).await.context("TLS handshake")?))
            }
        })
    }

    async fn connect(&self, source: Option<IpAddr>) -> anyhow::Result<Ws> {
        let stream = self.stream(source).await?;
        let config = WebSocketConfig::default()
            .read_buffer_size(8 * 1024)
            .write_buffer_size(0);
        let request = self.url.as_str().into_client_request()?;
        let (ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
            .await
            .context("WebSocket handshake")?;
        Ok(ws)
    }
}

async fn tcp_connect(addr: SocketAddr, source: Option<IpAddr>) -> anyhow::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("bind {ip}"))?;
    }
    let tcp = socket.connect(addr).await.with_context(|| format!("connect {addr}"))?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

type Ws = WebSocketStream<BenchStream>;

/// TCP or TLS over TCP (tokio-tungstenite's own `MaybeTlsStream` needs a TLS feature the project does not enable).
enum BenchStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for BenchStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len() as u64;
        match self.get_mut() {
            BenchStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            BenchStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
        .map_ok(|()| {
            WIRE_BYTES.fetch_add(buf.filled().len() as u64 - before, Relaxed);
        })
    }
}

impl AsyncWrite for BenchStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            BenchStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            BenchStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            BenchStream::Plain(s) => Pin::new(s).poll_flush(cx),
            BenchStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            BenchStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            BenchStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

fn tls_connector() -> tokio_rustls::TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// The bench talks to a self-signed dev certificate on loopback: accept any certificate, check nothing.
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------------------------------
// NATS text protocol (incremental: a frame or read may hold several messages, or end inside one).

enum NatsEvent<'a> {
    Msg(&'a [u8]),
    Ping,
    Pong,
    Err(&'a [u8]),
}

#[derive(Default)]
struct NatsParser {
    pending: Vec<u8>,
}

impl NatsParser {
    fn feed(&mut self, data: &[u8], mut on: impl FnMut(NatsEvent<'_>)) {
        if self.pending.is_empty() {
            let used = parse_nats(data, &mut on);
            self.pending.extend_from_slice(&data[used..]);
        } else {
            self.pending.extend_from_slice(data);
            let used = parse_nats(&self.pending, &mut on);
            self.pending.drain(..used);
        }
    }
}

/// Parses complete protocol lines (and MSG payloads) from `data`; returns the bytes consumed.
fn parse_nats(data: &[u8], on: &mut impl FnMut(NatsEvent<'_>)) -> usize {
    let mut pos = 0;
    while let Some(eol) = data[pos..].windows(2).position(|w| w == b"\r\n").map(|e| pos + e) {
        let line = &data[pos..eol];
        if line.starts_with(b"MSG ") {
            let size: usize = line
                .rsplit(|&b| b == b' ')
                .next()
                .and_then(|s| std::str::from_utf8(s).ok())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let end = eol + 2 + size;
            if data.len() < end + 2 {
                break;
            }
            on(NatsEvent::Msg(&data[eol + 2..end]));
            pos = end + 2;
            continue;
        }
        if line == b"PING" {
            on(NatsEvent::Ping);
        } else if line == b"PONG" {
            on(NatsEvent::Pong);
        } else if line.starts_with(b"-ERR") {
            on(NatsEvent::Err(line));
        } // INFO and +OK need nothing.
        pos = eol + 2;
    }
    pos
}

// ---------------------------------------------------------------------------------------------------------------
// Subscribers: connect, join, then read (or stall) until the process ends.

/// Joins `room` with the target's protocol and returns once the server confirmed it.
async fn join(ws: &mut Ws, target: Target, room: &str) -> anyhow::Result<()> {
    match target {
        Target::Roomwire => {
            wait_text(ws, |t| t.contains("\"welcome\"")).await?;
            ws.send(Message::text(format!(r#"{{"op":"join","room":"{room}","id":1}}"#)))
                .await?;
            let ack = wait_text(ws, |t| t.contains("\"ack\"") || t.contains("\"error\"")).await?;
            if ack.contains("\"error\"") {
                bail!("join refused: {ack}");
            }
        }
        Target::Uws => {
            ws.send(Message::text(format!(r#"{{"op":"join","room":"{room}","id":1}}"#)))
                .await?;
            wait_text(ws, |t| t.contains("\"ack\"")).await?;
        }
        Target::Sockudo => {
            wait_text(ws, |t| t.contains("pusher:connection_established")).await?;
            ws.send(Message::text(format!(
                r#"{{"event":"pusher:subscribe","data":{{"channel":"{room}"}}}}"#
            )))
            .await?;
            let ack = wait_text(ws, |t| {
                t.contains("pusher_internal:subscription_succeeded") || t.contains("pusher:error")
            })
            .await?;
            if ack.contains("pusher:error") {
                bail!("subscribe refused: {ack}");
            }
        }
        Target::Socketio => {
            wait_text(ws, |t| t.starts_with('0')).await?;
            ws.send(Message::text("40")).await?;
            wait_text(ws, |t| t.starts_with("40")).await?;
            ws.send(Message::text(format!(r#"420["join","{room}"]"#))).await?;
            wait_text(ws, |t| t.starts_with("430")).await?;
        }
        Target::NatsWs => {
            let hello = format!(
                "CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1}}\r\nSUB rooms.{room} 1\r\nPING\r\n"
            );
            ws.send(Message::binary(hello.into_bytes())).await?;
            let mut parser = NatsParser::default();
            loop {
                let data = next_data(ws).await?;
                let (mut pong, mut err) = (false, None);
                parser.feed(&data, |ev| match ev {
                    NatsEvent::Pong => pong = true,
                    NatsEvent::Err(e) => err = Some(String::from_utf8_lossy(e).into_owned()),
                    _ => {}
                });
                if let Some(e) = err {
                    bail!("nats: {e}");
                }
                if pong {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Reads until a text (or binary) message satisfies `done`; answers Engine.IO pings meanwhile.
async fn wait_text(ws: &mut Ws, done: impl Fn(&str) -> bool) -> anyhow::Result<String> {
    loop {
        let data = next_data(ws).await?;
        let text = String::from_utf8_lossy(&data);
        if done(&text) {
            return Ok(text.into_owned());
        }
        if text == "2" {
            ws.send(Message::text("3")).await?;
        }
    }
}

async fn next_data(ws: &mut Ws) -> anyhow::Result<bytes::Bytes> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(t.into()),
            Some(Ok(Message::Binary(b))) => return Ok(b),
            Some(Ok(Message::Close(c))) => bail!("closed by server: {c:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => bail!("connection ended"),
        }
    }
}

/// Receives until the connection ends, recording the latency of every message.
async fn read_loop(mut ws: Ws, target: Target, stats: &Stats) {
    let mut parser = NatsParser::default();
    let mut stamps = Vec::new();
    while let Some(msg) = ws.next().await {
        let data: bytes::Bytes = match msg {
            Ok(Message::Text(t)) => t.into(),
            Ok(Message::Binary(b)) => b,
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        stamps.clear();
        let reply = match target {
            Target::NatsWs => {
                let mut ping = false;
                parser.feed(&data, |ev| match ev {
                    NatsEvent::Msg(payload) => find_timestamps(payload, &mut stamps),
                    NatsEvent::Ping => ping = true,
                    _ => {}
                });
                ping.then(|| Message::binary(&b"PONG\r\n"[..]))
            }
            Target::Socketio if &data[..] == b"2" => Some(Message::text("3")),
            Target::Sockudo if data.windows(12).any(|w| w == b"pusher:ping\"") => {
                Some(Message::text(r#"{"event":"pusher:pong","data":{}}"#))
            }
            _ => {
                find_timestamps(&data, &mut stamps);
                None
            }
        };
        stats.record(&stamps);
        if let Some(reply) = reply
            && ws.send(reply).await.is_err()
        {
            break;
        }
    }
    stats.closed.fetch_add(1, Relaxed);
}

/// Opens connections `offset..offset+count` (global indices, so rooms, sources and stalled clients are the same
/// whatever the process split) and returns once each has joined or failed.
async fn run_subscribers(args: &Args, offset: usize, count: usize, stats: Arc<Stats>) -> anyhow::Result<Ready> {
    let mut endpoints = Vec::new();
    for url in args.url.split(',') {
        endpoints.push(Endpoint::parse(url).await?);
    }
    let stalled_every = if args.stalled > 0.0 {
        (1.0 / args.stalled).round().max(1.0) as usize
    } else {
        0
    };
    let deflating = args.deflate;
    if deflating && !matches!(args.target, Target::Roomwire | Target::Uws) {
        bail!("--deflate is for roomwire and uws");
    }
    let limit = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Result<(bool, u64), String>>();
    for i in offset..offset + count {
        let permit = limit.clone().acquire_owned().await?;
        let endpoint = endpoints[i % endpoints.len()].clone();
        let (stats, done_tx) = (stats.clone(), done_tx.clone());
        let source = (args.sources.len() > 1 || args.sources[0] != IpAddr::from([127, 0, 0, 1]))
            .then(|| args.sources[i % args.sources.len()]);
        let room = format!("r{}", i % args.rooms.max(1));
        let (target, stalled) = (args.target, stalled_every > 0 && i % stalled_every == stalled_every / 2);
        if deflating {
            tokio::spawn(async move {
                let started = Instant::now();
                let joined = tokio::time::timeout(Duration::from_secs(30), async {
                    let mut ws = deflate::connect(&endpoint, source).await?;
                    deflate::join(&mut ws, target, &room).await?;
                    anyhow::Ok(ws)
                })
                .await
                .unwrap_or_else(|_| Err(anyhow!("connect+join timed out")));
                drop(permit);
                match joined {
                    Ok(ws) => {
                        let _ = done_tx.send(Ok((stalled, started.elapsed().as_micros() as u64)));
                        drop(done_tx);
                        if stalled {
                            let _keep = ws;
                            std::future::pending::<()>().await;
                        } else {
                            deflate::read_loop(ws, &stats).await;
                        }
                    }
                    Err(e) => {
                        let _ = done_tx.send(Err(format!("{e:#}")));
                    }
                }
            });
            continue;
        }
        tokio::spawn(async move {
            let started = Instant::now();
            let joined = tokio::time::timeout(Duration::from_secs(30), async {
                let mut ws = endpoint.connect(source).await?;
                join(&mut ws, target, &room).await?;
                anyhow::Ok(ws)
            })
            .await
            .unwrap_or_else(|_| Err(anyhow!("connect+join timed out")));
            drop(permit);
            match joined {
                Ok(ws) => {
                    let _ = done_tx.send(Ok((stalled, started.elapsed().as_micros() as u64)));
                    drop(done_tx);
                    if stalled {
                        // Holds the socket open and never reads: the server's buffers towards it fill up.
                        let _keep = ws;
                        std::future::pending::<()>().await;
                    } else {
                        read_loop(ws, target, &stats).await;
                    }
                }
                Err(e) => {
                    let _ = done_tx.send(Err(format!("{e:#}")));
                }
            }
        });
    }
    drop(done_tx);
    let mut ready = Ready::default();
    let mut join_hist = new_histogram();
    for _ in 0..count {
        let Some(result) = done_rx.recv().await else { break };
        match result {
            Ok((stalled, join_us)) => {
                ready.connected += 1;
                ready.stalled += u64::from(stalled);
                join_hist.saturating_record(join_us.clamp(1, MAX_LATENCY_US));
            }
            Err(e) => {
                ready.connect_errors += 1;
                ready.first_error.get_or_insert(e);
            }
        }
    }
    ready.join_us = sparse(&join_hist);
    Ok(ready)
}

/// Child process: hold a slice of the subscribers and answer the coordinator's `snap` lines on stdin.
async fn worker_main(args: Args, spec: &str) -> anyhow::Result<()> {
    let (offset, count) = spec
        .split_once(',')
        .and_then(|(o, c)| Some((o.parse().ok()?, c.parse().ok()?)))
        .context("--worker wants offset,count")?;
    let stats = Arc::new(Stats::new());
    let ready = run_subscribers(&args, offset, count, stats.clone()).await?;
    print_line(&ready)?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        match line.trim() {
            "snap" => print_line(&stats.take())?,
            _ => break,
        }
    }
    std::process::exit(0);
}

fn print_line(value: &impl Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// Coordinator side: the subscriber processes, the publisher, server probes, and the result.

/// The coordinator's view of one subscriber process (itself, or a child).
// One value per process role, a handful per run: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
enum Workers {
    Local(Arc<Stats>, Option<tokio::task::JoinHandle<anyhow::Result<Ready>>>),
    Child(
        tokio::process::Child,
        tokio::process::ChildStdin,
        tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    ),
}

impl Workers {
    fn spawn(args: &Args, offset: usize, count: usize, procs: usize) -> anyhow::Result<Self> {
        if procs == 1 {
            let stats = Arc::new(Stats::new());
            let (a, s) = (args.clone(), stats.clone());
            let task = tokio::spawn(async move { run_subscribers(&a, offset, count, s).await });
            return Ok(Workers::Local(stats, Some(task)));
        }
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .args(std::env::args_os().skip(1))
            .arg("--worker")
            .arg(format!("{offset},{count}"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawn worker process")?;
        let stdin = child.stdin.take().context("child stdin")?;
        let lines = BufReader::new(child.stdout.take().context("child stdout")?).lines();
        Ok(Workers::Child(child, stdin, lines))
    }

    async fn ready(&mut self) -> anyhow::Result<Ready> {
        match self {
            Workers::Local(_, task) => task.take().context("ready twice")?.await?,
            Workers::Child(_, _, lines) => {
                let line = lines.next_line().await?.context("worker exited before ready")?;
                Ok(serde_json::from_str(&line)?)
            }
        }
    }

    async fn snapshot(&mut self) -> anyhow::Result<Snapshot> {
        match self {
            Workers::Local(stats, _) => Ok(stats.take()),
            Workers::Child(_, stdin, lines) => {
                stdin.write_all(b"snap\n").await?;
                let line = lines.next_line().await?.context("worker exited")?;
                Ok(serde_json::from_str(&line)?)
            }
        }
    }

    async fn stop(self) {
        if let Workers::Child(mut child, mut stdin, _) = self {
            let _ = stdin.write_all(b"quit\n").await;
            drop(stdin);
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}

/// Publishes round-robin over the rooms at the rate in `rate` (0 = paused), counting into `published`.
/// `connected` fires once the publisher's connection is up and, for NATS, confirmed by a PONG.
async fn run_publisher(
    args: Args,
    rate: watch::Receiver<u64>,
    published: Arc<AtomicU64>,
    connected: tokio::sync::oneshot::Sender<()>,
) -> anyhow::Result<()> {
    let payload_pad = args.payload.saturating_sub(35).max(1);
    let payload_kind = args.payload_kind;
    let rooms = args.rooms.max(1);
    let mut room_i = 0usize;
    // Appends one publish of the next room, stamped now, in the target's framing.
    let mut encode = move |out: &mut Vec<u8>, target: Target| {
        let room = room_i % rooms;
        room_i += 1;
        let payload = match payload_kind {
            PayloadKind::Pad => format!(r#"{{"ts":{},"pad":"{}"}}"#, now_ns(), "x".repeat(payload_pad)),
            PayloadKind::Chat => chat_payload(now_ns(), room_i as u64),
        };
        match target {
            Target::Roomwire | Target::NatsWs => {
                out.extend_from_slice(format!("PUB rooms.r{room} {}\r\n{payload}\r\n", payload.len()).as_bytes())
            }
            Target::Socketio => out.extend_from_slice(format!(r#"42["pub","r{room}",{payload}]"#).as_bytes()),
            Target::Uws => {
                out.extend_from_slice(format!(r#"{{"op":"pub","room":"r{room}","data":{payload}}}"#).as_bytes())
            }
            // The channel, a tab, the event's data (split again by the Sockudo publisher).
            Target::Sockudo => out.extend_from_slice(format!("r{room}\t{payload}").as_bytes()),
        }
    };
    let mut pacer = Pacer::new(rate);
    match args.target {
        Target::Sockudo => {
            let base = args.pub_url.clone().unwrap_or_else(|| "http://127.0.0.1:6001".into());
            let errors = Arc::new(AtomicU64::new(0));
            let queues = pusher::start(&base, pusher::App::parse(&args.pusher_app)?, errors.clone()).await?;
            let _ = connected.send(());
            let (mut next, mut one) = (0usize, Vec::new());
            loop {
                let n = pacer.due().await;
                if errors.load(Relaxed) > 0 {
                    bail!("the Sockudo events API failed (see above)");
                }
                let mut events = Vec::with_capacity(pusher::BATCH);
                for i in 0..n {
                    one.clear();
                    encode(&mut one, args.target);
                    let text = String::from_utf8_lossy(&one);
                    let (channel, data) = text.split_once('\t').context("encoded event")?;
                    events.push((channel.to_string(), data.to_string()));
                    if events.len() == pusher::BATCH || i + 1 == n {
                        queues[next % queues.len()]
                            .send(std::mem::take(&mut events))
                            .map_err(|_| anyhow!("a Sockudo publishing connection ended"))?;
                        next += 1;
                    }
                }
                published.fetch_add(n, Relaxed);
            }
        }
        Target::Roomwire | Target::NatsWs => {
            let url = args.pub_url.clone().unwrap_or_else(|| "nats://127.0.0.1:4222".into());
            let addr = url.trim_start_matches("nats://");
            let addr = tokio::net::lookup_host(addr).await?.next().context("NATS address")?;
            let mut tcp = tcp_connect(addr, None).await?;
            tcp.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1}\r\nPING\r\n")
                .await?;
            let (mut rd, mut wr) = tcp.into_split();
            let (mut parser, mut buf, mut batch) = (NatsParser::default(), vec![0u8; 64 * 1024], Vec::new());
            let mut pong = false;
            while !pong {
                let n = rd.read(&mut buf).await?;
                if n == 0 {
                    bail!("NATS closed the publisher connection");
                }
                parser.feed(&buf[..n], |ev| pong |= matches!(ev, NatsEvent::Pong));
            }
            let _ = connected.send(());
            loop {
                tokio::select! {
                    n = pacer.due() => {
                        batch.clear();
                        for _ in 0..n { encode(&mut batch, args.target); }
                        wr.write_all(&batch).await?;
                        published.fetch_add(n, Relaxed);
                    }
                    r = rd.read(&mut buf) => {
                        let n = r?;
                        if n == 0 { bail!("NATS closed the publisher connection"); }
                        let mut ping = false;
                        parser.feed(&buf[..n], |ev| if let NatsEvent::Ping = ev { ping = true });
                        if ping { wr.write_all(b"PONG\r\n").await?; }
                    }
                }
            }
        }
        Target::Socketio | Target::Uws => {
            let url = args
                .pub_url
                .clone()
                .unwrap_or_else(|| args.url.split(',').next().unwrap_or_default().to_string());
            let mut ws = Endpoint::parse(&url).await?.connect(None).await?;
            if args.target == Target::Socketio {
                wait_text(&mut ws, |t| t.starts_with('0')).await?;
                ws.send(Message::text("40")).await?;
                wait_text(&mut ws, |t| t.starts_with("40")).await?;
            }
            let (mut sink, mut stream) = ws.split();
            let _ = connected.send(());
            let mut one = Vec::new();
            loop {
                tokio::select! {
                    n = pacer.due() => {
                        for _ in 0..n {
                            one.clear();
                            encode(&mut one, args.target);
                            sink.feed(Message::text(String::from_utf8_lossy(&one).into_owned())).await?;
                        }
                        sink.flush().await?;
                        published.fetch_add(n, Relaxed);
                    }
                    msg = stream.next() => match msg {
                        Some(Ok(Message::Text(t))) if t.as_str() == "2" => sink.send(Message::text("3")).await?,
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(e.into()),
                        None => bail!("publisher connection closed"),
                    },
                }
            }
        }
    }
}

/// Turns a target rate into batches every millisecond; when the publisher falls behind by more than 50 ms of
/// publishes it drops the deficit instead of bursting (the shortfall shows as published < rate × secs).
struct Pacer {
    rate: watch::Receiver<u64>,
    current: u64,
    since: Instant,
    sent: u64,
    tick: tokio::time::Interval,
}

impl Pacer {
    fn new(rate: watch::Receiver<u64>) -> Self {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let current = *rate.borrow();
        Pacer {
            rate,
            current,
            since: Instant::now(),
            sent: 0,
            tick,
        }
    }

    /// Waits for the next tick and returns how many publishes are due (≥ 1).
    async fn due(&mut self) -> u64 {
        loop {
            self.tick.tick().await;
            if self.rate.has_changed().unwrap_or(false) {
                self.current = *self.rate.borrow_and_update();
                (self.since, self.sent) = (Instant::now(), 0);
            }
            if self.current == 0 {
                continue;
            }
            let target = (self.current as f64 * self.since.elapsed().as_secs_f64()) as u64;
            let mut due = target.saturating_sub(self.sent);
            let cap = (self.current / 20).max(1);
            if due > cap {
                self.sent += due - cap;
                due = cap;
            }
            if due > 0 {
                self.sent += due;
                return due;
            }
        }
    }
}

/// Memory and CPU probes of the server processes and the kernel (all from /proc).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    proc_field(&status, "VmRSS:")
}

fn rss_peak_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    proc_field(&status, "VmHWM:")
}

fn cpu_secs(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            // After the command: state is field 3, utime 14 and stime 15 (1-based), i.e. indices 11 and 12 here.
            Some((fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?) / CLOCK_TICKS_PER_SEC)
        })
        .sum()
}

/// Kernel slab memory in KiB (socket structures of both ends of every loopback connection live here).
fn slab_kib() -> Option<u64> {
    proc_field(&std::fs::read_to_string("/proc/meminfo").ok()?, "Slab:")
}

fn proc_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[derive(Serialize, Clone)]
struct Step {
    rate: u64,
    secs: f64,
    published: u64,
    expected: u64,
    delivered: u64,
    frames: u64,
    delivered_per_s: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
    closed: u64,
    server_cpu_s: f64,
    cpu_s_per_million: Option<f64>,
    /// WebSocket bytes the subscribers read during the step (frame headers included), and per delivered message.
    wire_bytes: u64,
    wire_bytes_per_delivery: Option<f64>,
    saturated: bool,
}

#[derive(Serialize)]
struct Report {
    target: Target,
    scenario: Scenario,
    label: Option<String>,
    url: String,
    conns: usize,
    procs: usize,
    rooms: usize,
    payload: usize,
    payload_kind: PayloadKind,
    deflate: bool,
    connected: u64,
    connect_errors: u64,
    first_error: Option<String>,
    stalled: u64,
    connect_secs: f64,
    /// Clients joined per second of the connect phase (all of it: the first attempt to the last confirmation).
    handshakes_per_s: f64,
    /// Server CPU seconds (summed over `--server-pid`) during the connect phase.
    connect_cpu_s: f64,
    cpu_s_per_1000_handshakes: Option<f64>,
    /// Each client's time from its TCP connect to its join's confirmation: p50, p99, max.
    join_p50_us: u64,
    join_p99_us: u64,
    join_max_us: u64,
    /// The first server process's peak RSS (VmHWM) right after the connect phase.
    rss_peak_kib: Option<u64>,
    rss_before_kib: Option<u64>,
    rss_after_kib: Option<u64>,
    rss_kib_per_conn: Option<f64>,
    /// `--rss-pid` processes: RSS before and after connecting, KiB, in the order given.
    rss_each_kib: Vec<(Option<u64>, Option<u64>)>,
    /// Kernel slab growth per connection, both loopback ends together (system-wide, so roughly 2 sockets' worth).
    kernel_slab_kib_per_conn: Option<f64>,
    /// `--burst`: RSS growth per connection (from before connecting) after the burst and `--burst-idle` seconds.
    rss_after_burst_kib_per_conn: Option<f64>,
    /// `--burst`: clients that received the burst.
    burst_delivered: u64,
    steps: Vec<Step>,
    best: Option<Step>,
    closed: u64,
}

async fn coordinator_main(args: Args) -> anyhow::Result<()> {
    if args.scenario == Scenario::Recover {
        return recover::run(&args).await;
    }
    if args.scenario == Scenario::Rpc {
        return rpc::run(&args).await;
    }
    let procs = if args.procs == 0 {
        args.conns.div_ceil(CONNS_PER_PROC).max(1)
    } else {
        args.procs
    };
    let pid = args.server_pid.first().copied();
    let rss_before = pid.and_then(rss_kib);
    let rss_each_before: Vec<Option<u64>> = args.rss_pid.iter().map(|&p| rss_kib(p)).collect();
    let slab_before = slab_kib();
    let cpu_before = cpu_secs(&args.server_pid);
    let started = Instant::now();

    let mut workers = Vec::new();
    let per = args.conns.div_ceil(procs);
    for p in 0..procs {
        let offset = p * per;
        let count = per.min(args.conns.saturating_sub(offset));
        workers.push(Workers::spawn(&args, offset, count, procs)?);
    }
    let mut ready = Ready::default();
    let mut join_hist = new_histogram();
    for w in &mut workers {
        let r = w.ready().await?;
        ready.connected += r.connected;
        ready.connect_errors += r.connect_errors;
        ready.stalled += r.stalled;
        if ready.first_error.is_none() {
            ready.first_error = r.first_error;
        }
        for (v, c) in r.join_us {
            join_hist.saturating_record_n(v, c);
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let connect_cpu_s = cpu_secs(&args.server_pid) - cpu_before;
    let rss_peak_kib = pid.and_then(rss_peak_kib);
    eprintln!(
        "roomwire-bench: {} connected, {} errors in {connect_secs:.1}s",
        ready.connected, ready.connect_errors
    );
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let rss_after = pid.and_then(rss_kib);
    let rss_each_kib = rss_each_before
        .into_iter()
        .zip(args.rss_pid.iter().map(|&p| rss_kib(p)))
        .collect();
    let slab_after = slab_kib();
    let per_conn = |before: Option<u64>, after: Option<u64>| {
        Some((after? as f64 - before? as f64) / (ready.connected.max(1) as f64))
    };

    let mut steps = Vec::new();
    let mut closed = 0;
    let (mut rss_after_burst, mut burst_delivered) = (None, 0);
    if args.scenario == Scenario::Idle && args.burst > 0 && matches!(args.target, Target::Roomwire | Target::NatsWs) {
        for w in &mut workers {
            closed += w.snapshot().await?.closed; // counts from here
        }
        publish_burst(&args).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while burst_delivered < ready.connected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            for w in &mut workers {
                let snap = w.snapshot().await?;
                burst_delivered += snap.delivered;
                closed += snap.closed;
            }
        }
        tokio::time::sleep(Duration::from_secs_f64(args.burst_idle)).await;
        rss_after_burst = pid.and_then(rss_kib);
    }
    if matches!(args.scenario, Scenario::Idle | Scenario::Storm) {
        tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
        for w in &mut workers {
            closed += w.snapshot().await?.closed;
        }
    } else {
        let (rate_tx, rate_rx) = watch::channel(0u64);
        let published = Arc::new(AtomicU64::new(0));
        let (up_tx, up_rx) = tokio::sync::oneshot::channel();
        let publisher = tokio::spawn(run_publisher(args.clone(), rate_rx, published.clone(), up_tx));
        if tokio::time::timeout(Duration::from_secs(10), up_rx).await.is_err() || publisher.is_finished() {
            publisher.abort();
            bail!("publisher did not connect: {:?}", publisher.await);
        }
        // Warm-up at the first rate, not measured (the next snapshot discards it).
        rate_tx.send(args.rate[0])?;
        tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
        let readers = ready.connected.saturating_sub(ready.stalled);
        let mut saturated_in_a_row = 0;
        for &rate in &args.rate {
            for w in &mut workers {
                closed += w.snapshot().await?.closed; // discard what arrived before this step
            }
            let (cpu0, t0, pub0) = (cpu_secs(&args.server_pid), Instant::now(), published.load(Relaxed));
            rate_tx.send(rate)?;
            tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
            let mut hist = new_histogram();
            let (mut delivered, mut frames, mut step_closed, mut wire_bytes) = (0, 0, 0, 0);
            for w in &mut workers {
                let snap = w.snapshot().await?;
                delivered += snap.delivered;
                frames += snap.frames;
                wire_bytes += snap.wire_bytes;
                step_closed += snap.closed;
                for (v, c) in snap.hist {
                    hist.saturating_record_n(v, c);
                }
            }
            let secs = t0.elapsed().as_secs_f64();
            let cpu = cpu_secs(&args.server_pid) - cpu0;
            let published_now = published.load(Relaxed) - pub0;
            closed += step_closed;
            if publisher.is_finished() {
                break;
            }
            let expected = (rate as f64 * secs * readers as f64 / args.rooms.max(1) as f64) as u64;
            let step = Step {
                rate,
                secs,
                published: published_now,
                expected,
                delivered,
                frames,
                delivered_per_s: delivered as f64 / secs,
                p50_us: hist.value_at_quantile(0.5),
                p99_us: hist.value_at_quantile(0.99),
                p999_us: hist.value_at_quantile(0.999),
                max_us: hist.max(),
                closed: step_closed,
                server_cpu_s: cpu,
                cpu_s_per_million: (!args.server_pid.is_empty() && delivered > 0).then(|| cpu / delivered as f64 * 1e6),
                wire_bytes,
                wire_bytes_per_delivery: (delivered > 0).then(|| wire_bytes as f64 / delivered as f64),
                // A step where the server closed clients (e.g. as slow consumers) is past saturation, whatever it
                // delivered: the remaining clients are fewer than the scenario asks for.
                saturated: (delivered as f64) < args.saturation * expected as f64 || step_closed > 0,
            };
            eprintln!(
                "roomwire-bench: rate {rate}/s → {:.0} delivered/s, p99 {} µs{}",
                step.delivered_per_s,
                step.p99_us,
                if step.saturated { " (saturated)" } else { "" }
            );
            saturated_in_a_row = if step.saturated { saturated_in_a_row + 1 } else { 0 };
            steps.push(step);
            // Many rooms goes on past one saturated step: on a shared machine one step can lose its core for a moment,
            // and the best step is chosen by p99 anyway. Two in a row end it.
            let enough = match args.scenario {
                Scenario::Latency => false,
                Scenario::Rooms => saturated_in_a_row >= 2,
                _ => saturated_in_a_row >= 1,
            };
            if enough {
                break;
            }
        }
        rate_tx.send(0)?;
        if publisher.is_finished() {
            if let Ok(Err(e)) = publisher.await {
                bail!("publisher failed: {e:#}");
            }
        } else {
            publisher.abort();
        }
    }
    for w in workers {
        w.stop().await;
    }

    let limit_us = (args.p99_limit_ms * 1000.0) as u64;
    let best = match args.scenario {
        Scenario::Idle | Scenario::Recover | Scenario::Rpc | Scenario::Storm => None,
        Scenario::Fanout => steps
            .iter()
            .filter(|s| s.closed == 0)
            .max_by(|a, b| a.delivered_per_s.total_cmp(&b.delivered_per_s))
            .cloned(),
        Scenario::Rooms => steps
            .iter()
            .filter(|s| s.p99_us <= limit_us && s.closed == 0)
            .max_by(|a, b| a.delivered_per_s.total_cmp(&b.delivered_per_s))
            .cloned(),
        Scenario::Latency => steps.last().cloned(),
    };
    print_line(&Report {
        target: args.target,
        scenario: args.scenario,
        label: args.label.clone(),
        url: args.url.clone(),
        conns: args.conns,
        procs,
        rooms: args.rooms,
        payload: args.payload,
        payload_kind: args.payload_kind,
        deflate: args.deflate,
        connected: ready.connected,
        connect_errors: ready.connect_errors,
        first_error: ready.first_error,
        stalled: ready.stalled,
        connect_secs,
        handshakes_per_s: ready.connected as f64 / connect_secs.max(1e-9),
        connect_cpu_s,
        cpu_s_per_1000_handshakes: (!args.server_pid.is_empty() && ready.connected > 0)
            .then(|| connect_cpu_s / ready.connected as f64 * 1000.0),
        join_p50_us: join_hist.value_at_quantile(0.5),
        join_p99_us: join_hist.value_at_quantile(0.99),
        join_max_us: join_hist.max(),
        rss_peak_kib,
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        rss_kib_per_conn: per_conn(rss_before, rss_after),
        rss_each_kib,
        kernel_slab_kib_per_conn: per_conn(slab_before, slab_after),
        rss_after_burst_kib_per_conn: per_conn(rss_before, rss_after_burst),
        burst_delivered,
        steps,
        best,
        closed,
    })
}

/// `--burst`: one message of `--burst` payload bytes (carrying a timestamp, like every measured message) to each
/// room, over NATS, flushed with a PING.
async fn publish_burst(args: &Args) -> anyhow::Result<()> {
    let url = args.pub_url.clone().unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let addr = url.trim_start_matches("nats://");
    let addr = tokio::net::lookup_host(addr).await?.next().context("NATS address")?;
    let mut tcp = tcp_connect(addr, None).await?;
    let mut out = b"CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1}\r\n".to_vec();
    let pad = "x".repeat(args.burst.saturating_sub(35).max(1));
    for room in 0..args.rooms.max(1) {
        let payload = format!(r#"{{"ts":{},"pad":"{pad}"}}"#, now_ns());
        out.extend_from_slice(format!("PUB rooms.r{room} {}\r\n{payload}\r\n", payload.len()).as_bytes());
    }
    out.extend_from_slice(b"PING\r\n");
    tcp.write_all(&out).await?;
    let (mut parser, mut buf, mut pong) = (NatsParser::default(), vec![0u8; 4096], false);
    while !pong {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            bail!("NATS closed the burst connection");
        }
        parser.feed(&buf[..n], |ev| pong |= matches!(ev, NatsEvent::Pong));
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.sources.is_empty() || args.rate.is_empty() || args.rooms == 0 || args.payload < 40 {
        bail!("need at least one --sources address and --rate, --rooms ≥ 1 and --payload ≥ 40");
    }
    // One thread per process: scripts/bench pins the generator to its own core, and --procs adds processes.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        match args.worker.clone() {
            Some(spec) => worker_main(args, &spec).await,
            None => coordinator_main(args).await,
        }
    })
}
