//! The attack catalogue (issue 8, "Conformance and the attack catalogue"): each hostile input with the exact outcome
//! the attacker gets -- an HTTP status before the upgrade, an error frame or a close code after it -- while an
//! ordinary client (the [`Bystander`]) keeps receiving room messages from a NATS publisher in the same test, before,
//! during and after the attack.
//!
//! Frames are written by hand ([`common::frames`]) over a real TLS stream, since tungstenite's client refuses to send
//! invalid frames. Cases that depend on a fix still in progress elsewhere carry a `// needs:` comment naming it; the
//! table of cases and outcomes is in `docs/security.md`.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use common::{frames::*, *};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf},
    net::TcpStream,
    sync::watch,
    task::JoinHandle,
    time::Instant,
};
use tokio_rustls::client::TlsStream;

const WS: &str = "/ws";
/// A valid `Sec-WebSocket-Key` (the RFC 6455 sample).
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// The handshake deadline of every test here: short, so deadline cases are fast.
const HANDSHAKE: Duration = Duration::from_millis(500);
/// `limits.max_message_size` and `limits.max_frame_size` of every test here (unless a test raises them).
const MAX_MESSAGE: usize = 4096;
const MAX_FRAME: usize = 2048;
/// The room the bystander is in, and the longest pause between two of its messages the tests accept.
const BYSTANDER_ROOM: &str = "bystander";
const MAX_STALL: Duration = Duration::from_secs(5);

// ---- the ordinary client ---------------------------------------------------------------------------------------

/// What the bystander's reader has seen so far.
#[derive(Debug, Clone, Default)]
struct Seen {
    /// Highest sequence number received (they arrive in order, none missing, or `failure` is set).
    last: u64,
    /// Longest time between two received messages.
    max_stall: Duration,
    /// Why the bystander stopped receiving, if it did.
    failure: Option<String>,
}

/// An ordinary client joined to [`BYSTANDER_ROOM`], fed by a NATS publisher every 20 ms, read by a task of its own
/// (which also answers the gateway's heartbeat pings).
struct Bystander {
    published: Arc<AtomicU64>,
    seen: watch::Receiver<Seen>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Bystander {
    async fn start(gw: &TestGateway, nats: &NatsServer) -> Self {
        let mut c = gw.client().await;
        c.join(BYSTANDER_ROOM).await;
        let nc = nats.client().await;
        let (tx, seen) = watch::channel(Seen::default());
        let reader = tokio::spawn(async move {
            let mut last_at = Instant::now();
            loop {
                let failure = match tokio::time::timeout(WAIT, c.ws.next()).await {
                    Err(_) => Some("no frame for 10 s".to_string()),
                    Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) => {
                        let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                        let want = tx.borrow().last + 1;
                        match v["data"]["seq"].as_u64() {
                            Some(n) if v["op"] == "message" && n == want => {
                                let now = Instant::now();
                                tx.send_modify(|s| {
                                    s.last = n;
                                    s.max_stall = s.max_stall.max(now - last_at);
                                });
                                last_at = now;
                                None
                            }
                            _ => Some(format!("expected message {want}, got {t}")),
                        }
                    }
                    Ok(Some(Ok(
                        tokio_tungstenite::tungstenite::Message::Ping(_)
                        | tokio_tungstenite::tungstenite::Message::Pong(_),
                    ))) => None,
                    Ok(other) => Some(format!("unexpected {other:?}")),
                };
                if let Some(f) = failure {
                    tx.send_modify(|s| s.failure = Some(f));
                    return;
                }
            }
        });
        let published = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (published.clone(), stop.clone());
        let publisher = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            while !s.load(Ordering::Relaxed) {
                tick.tick().await;
                let n = p.load(Ordering::Relaxed) + 1;
                let body = json!({ "seq": n }).to_string();
                if nc
                    .publish(format!("rooms.{BYSTANDER_ROOM}"), body.into())
                    .await
                    .is_err()
                {
                    return;
                }
                p.store(n, Ordering::Relaxed);
            }
        });
        let b = Bystander {
            published,
            seen,
            stop,
            tasks: vec![reader, publisher],
        };
        b.assert_receiving().await;
        b
    }

    /// Asserts that the bystander has been receiving throughout: every message so far arrived, in order, none
    /// more than [`MAX_STALL`] after the previous one, and a message published after this call began arrives.
    async fn assert_receiving(&self) {
        let target = self.published.load(Ordering::Relaxed) + 1;
        let mut seen = self.seen.clone();
        let got = tokio::time::timeout(WAIT, seen.wait_for(|s| s.last >= target || s.failure.is_some()))
            .await
            .expect("the bystander received a fresh message in time")
            .expect("bystander reader alive")
            .clone();
        assert!(got.failure.is_none(), "bystander: {:?}", got.failure);
        assert!(got.max_stall < MAX_STALL, "bystander stalled for {:?}", got.max_stall);
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

/// A nats-server, a gateway with the hostile-test limits (after `tweak`), and a bystander already receiving.
struct Harness {
    gw: TestGateway,
    by: Bystander,
    nats: NatsServer,
}

fn hostile_config(c: &mut roomwire::Config) {
    c.server.handshake_timeout = HANDSHAKE;
    c.server.max_header_bytes = 8192;
    c.limits.max_message_size = MAX_MESSAGE;
    c.limits.max_frame_size = MAX_FRAME;
    c.nats.events = false;
}

impl Harness {
    async fn start(tweak: impl FnOnce(&mut roomwire::Config)) -> Self {
        Self::start_nats(NatsServer::start().await, tweak).await
    }

    async fn start_nats(nats: NatsServer, tweak: impl FnOnce(&mut roomwire::Config)) -> Self {
        let gw = TestGateway::start(&nats, |c| {
            hostile_config(c);
            tweak(c);
        })
        .await;
        let by = Bystander::start(&gw, &nats).await;
        Harness { gw, by, nats }
    }
}

// ---- raw HTTP and raw WebSocket ----------------------------------------------------------------------------------

fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
    )
}

/// An HTTP response read off the wire.
#[derive(Debug)]
struct HttpResponse {
    status: u16,
    /// The head (status line and headers), as sent.
    head: String,
    body: String,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Reads one HTTP response head (and its `Content-Length` body) from `rd`; `None` if the connection ends first.
/// Bytes after it stay in `buf`.
async fn read_response<R: AsyncReadExt + Unpin>(rd: &mut R, buf: &mut Vec<u8>) -> Option<HttpResponse> {
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match tokio::time::timeout(WAIT, rd.read(&mut chunk))
            .await
            .expect("response in time")
        {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let mut resp = HttpResponse {
        status,
        head,
        body: String::new(),
    };
    let len: usize = resp
        .header("content-length")
        .map_or(0, |v| v.parse().expect("Content-Length"));
    while buf.len() < head_end + len {
        match tokio::time::timeout(WAIT, rd.read(&mut chunk))
            .await
            .expect("body in time")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let end = buf.len().min(head_end + len);
    resp.body = String::from_utf8_lossy(&buf[head_end..end]).to_string();
    buf.drain(..end);
    Some(resp)
}

/// Sends `request` over a fresh TLS connection and reads one response.
async fn http(gw: &TestGateway, request: &[u8]) -> HttpResponse {
    let mut tls = gw.tls().await;
    tls.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    read_response(&mut tls, &mut buf)
        .await
        .expect("a response before the connection ends")
}

/// Reads until the peer closes; returns what arrived and how long it took. Panics if it stays open past `WAIT`.
async fn read_until_closed<R: AsyncReadExt + Unpin>(rd: &mut R) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, rd.read_to_end(&mut got))
        .await
        .expect("the server closes the connection");
    (got, started.elapsed())
}

type Tls = TlsStream<TcpStream>;

/// How long a blind flood takes to write ([`RawWs::blind_flood`]), in how many writes: longer than the 1 s the
/// gateway lingered before issue 22, well within `limits.close_linger` (5 s).
const SLOW_FLOOD: Duration = Duration::from_millis(1500);
const SLOW_FLOOD_WRITES: u32 = 100;

/// A WebSocket client that writes raw frames and reads the server's frames byte for byte. It never answers pings
/// (none arrive within these tests' length: the heartbeat interval is the default 25 s).
struct RawWs {
    rd: ReadHalf<Tls>,
    wr: Option<WriteHalf<Tls>>,
    buf: Vec<u8>,
}

impl RawWs {
    /// Upgrades (sending `pipelined` in the same write as the request) and reads the welcome.
    async fn connect_pipelined(gw: &TestGateway, pipelined: &[u8]) -> (Self, Value) {
        let mut tls = gw.tls().await;
        tls.write_all(&[upgrade_request(WS).as_bytes(), pipelined].concat())
            .await
            .unwrap();
        let mut buf = Vec::new();
        let resp = read_response(&mut tls, &mut buf).await.expect("upgrade response");
        assert_eq!(resp.status, 101, "{}", resp.head);
        let (rd, wr) = tokio::io::split(tls);
        let mut ws = RawWs { rd, wr: Some(wr), buf };
        let welcome = ws.next_json().await;
        assert_eq!(welcome["op"], "welcome", "{welcome}");
        (ws, welcome)
    }

    async fn connect(gw: &TestGateway) -> Self {
        Self::connect_pipelined(gw, &[]).await.0
    }

    async fn send(&mut self, bytes: &[u8]) {
        let wr = self.wr.as_mut().expect("writer");
        wr.write_all(bytes).await.unwrap();
        wr.flush().await.unwrap();
    }

    /// The next frame from the server; `None` once the connection has ended.
    async fn next_frame(&mut self) -> Option<ServerFrame> {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if let Some((f, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                assert!(
                    !f.masked && f.rsv == 0,
                    "server frames are unmasked, without RSV bits: {f:?}"
                );
                return Some(f);
            }
            match tokio::time::timeout(WAIT, self.rd.read(&mut chunk))
                .await
                .expect("a frame within 10 s (the server went silent)")
            {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next text frame as JSON (pings and pongs skipped).
    async fn next_json(&mut self) -> Value {
        loop {
            let f = self
                .next_frame()
                .await
                .expect("a text frame, not the end of the connection");
            match f.opcode {
                PING | PONG => continue,
                TEXT => return serde_json::from_slice(&f.payload).expect("JSON"),
                _ => panic!("expected a text frame, got {f:?}"),
            }
        }
    }

    /// Reads up to the close frame (skipping pongs and pings; text frames are returned alongside), then checks that
    /// the server also ends the TCP connection. Returns (code, reason, text frames before the close).
    async fn expect_close(&mut self) -> (u16, String, Vec<String>) {
        let mut texts = Vec::new();
        loop {
            let Some(f) = self.next_frame().await else {
                panic!("connection ended without a close frame (text frames before: {texts:?})");
            };
            match f.opcode {
                PING | PONG => continue,
                TEXT => texts.push(f.text()),
                CLOSE => {
                    let (code, reason) = f.close_code();
                    let (_, took) = read_until_closed(&mut self.rd).await;
                    assert!(took < WAIT, "TCP not closed after the close frame");
                    return (code, reason, texts);
                }
                _ => panic!("unexpected frame {f:?}"),
            }
        }
    }

    /// Writes `chunk` again and again (at most `limit` times) from a task of its own while reading here, until the
    /// server closes; returns the close like [`RawWs::expect_close`] and how many chunks were written.
    async fn flood_until_close(&mut self, chunk: Vec<u8>, limit: usize) -> (u16, String, Vec<String>, usize) {
        let mut wr = self.wr.take().expect("writer");
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let writer = tokio::spawn(async move {
            let mut n = 0;
            while n < limit && !s.load(Ordering::Relaxed) {
                if wr.write_all(&chunk).await.is_err() {
                    break;
                }
                n += 1;
            }
            let _ = wr.flush().await;
            n
        });
        // Pongs and error frames come back throughout: keep reading so the server never blocks on us.
        let mut texts = Vec::new();
        let close = loop {
            let Ok(f) = tokio::time::timeout(WAIT, self.next_frame()).await else {
                panic!(
                    "no close frame: the server went silent (last text frames: {:?})",
                    &texts[texts.len().saturating_sub(3)..]
                );
            };
            let Some(f) = f else {
                panic!(
                    "connection ended without a close frame (last text frames: {:?})",
                    &texts[texts.len().saturating_sub(3)..]
                );
            };
            match f.opcode {
                PING | PONG => continue,
                TEXT => texts.push(f.text()),
                CLOSE => break f.close_code(),
                _ => panic!("unexpected frame {f:?}"),
            }
        };
        stop.store(true, Ordering::Relaxed);
        let written = writer.await.unwrap();
        (close.0, close.1, texts, written)
    }

    /// Writes all of `flood` without reading (as an attacker does), then reads: the close frame 1008 must come
    /// (text frames and pongs before it are skipped), then the clean end of the stream (TLS close_notify), not a
    /// reset. Returns what went wrong instead.
    async fn blind_flood(&mut self, flood: &[u8]) -> Result<(), String> {
        let wr = self.wr.as_mut().expect("writer");
        // The pace of the attacker, not a wait for an event: the flood must outlast what a fast loopback client
        // takes (a few ms), as a scripted client's does, for the gateway's linger to be put to the test.
        let mut tick = tokio::time::interval(SLOW_FLOOD / SLOW_FLOOD_WRITES);
        let written = async {
            for part in flood.chunks(flood.len().div_ceil(SLOW_FLOOD_WRITES as usize)) {
                tick.tick().await;
                wr.write_all(part).await?;
                wr.flush().await?;
            }
            std::io::Result::Ok(())
        };
        match tokio::time::timeout(WAIT, written).await {
            Err(_) => return Err("the flood could not be written within 10 s".into()),
            Ok(Err(e)) => return Err(format!("writing the flood: {e}")),
            Ok(Ok(())) => {}
        }
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if let Some((f, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                match f.opcode {
                    PING | PONG | TEXT => continue,
                    CLOSE if f.close_code() == (1008, "rate limit exceeded repeatedly".into()) => break,
                    _ => return Err(format!("unexpected frame {f:?}")),
                }
            }
            match tokio::time::timeout(WAIT, self.rd.read(&mut chunk)).await {
                Err(_) => return Err("no close frame within 10 s".into()),
                Ok(Ok(0)) => return Err("the connection ended without a close frame".into()),
                Ok(Err(e)) => return Err(format!("no close frame: {e}")),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
        let mut rest = Vec::new();
        match tokio::time::timeout(WAIT, self.rd.read_to_end(&mut rest)).await {
            Err(_) => Err("the server did not end the stream after its close frame".into()),
            Ok(Err(e)) => Err(format!("after the close frame: {e}")),
            Ok(Ok(_)) => Ok(()),
        }
    }
}

// ---- HTTP phase --------------------------------------------------------------------------------------------------

/// One header over `server.max_header_bytes`: hyper answers 431 (its buffer limit is `max_header_bytes`) and closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_header_is_431() {
    let h = Harness::start(|_| {}).await;
    let pad = "a".repeat(20_000);
    let req = upgrade_request(WS).replace("\r\n\r\n", &format!("\r\nX-Pad: {pad}\r\n\r\n"));
    let resp = http(&h.gw, req.as_bytes()).await;
    assert_eq!(resp.status, 431, "{}", resp.head);
    // Many medium headers adding up past the limit: the same.
    let many: String = (0..60).map(|i| format!("X-Pad-{i}: {}\r\n", "b".repeat(200))).collect();
    let req = upgrade_request(WS).replace("\r\n\r\n", &format!("\r\n{many}\r\n"));
    assert_eq!(http(&h.gw, req.as_bytes()).await.status, 431);
    h.by.assert_receiving().await;
}

/// More than 100 headers (hyper's header count limit), each tiny and all well under `max_header_bytes`: 431.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numerous_headers_are_431() {
    let h = Harness::start(|_| {}).await;
    let many: String = (0..101).map(|i| format!("X-{i}: y\r\n")).collect();
    assert!(many.len() < 4096);
    let req = upgrade_request(WS).replace("\r\n\r\n", &format!("\r\n{many}\r\n"));
    let resp = http(&h.gw, req.as_bytes()).await;
    assert_eq!(resp.status, 431, "{}", resp.head);
    // 90 headers (plus the 5 of the upgrade) are fine.
    let few: String = (0..90).map(|i| format!("X-{i}: y\r\n")).collect();
    let req = upgrade_request(WS).replace("\r\n\r\n", &format!("\r\n{few}\r\n"));
    assert_eq!(http(&h.gw, req.as_bytes()).await.status, 101);
    h.by.assert_receiving().await;
}

/// A request head dripped one byte every 20 ms is cut at the handshake deadline, with no response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_a_byte_at_a_time_are_cut_at_the_handshake_deadline() {
    let h = Harness::start(|_| {}).await;
    let started = Instant::now();
    let (mut rd, mut wr) = tokio::io::split(h.gw.tls().await);
    let req = format!(
        "GET {WS} HTTP/1.1\r\nHost: localhost\r\n{}",
        "X-Slow: y\r\n".repeat(100)
    );
    let drip = tokio::spawn(async move {
        for b in req.bytes() {
            if wr.write_all(&[b]).await.is_err() || wr.flush().await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let (got, _) = read_until_closed(&mut rd).await;
    let elapsed = started.elapsed();
    drip.abort();
    assert_eq!(
        String::from_utf8_lossy(&got),
        "",
        "no response, the connection is just closed"
    );
    assert!(
        elapsed >= HANDSHAKE - Duration::from_millis(100),
        "cut too early: {elapsed:?}"
    );
    assert!(
        elapsed < HANDSHAKE + Duration::from_secs(2),
        "cut too late: {elapsed:?}"
    );
    h.by.assert_receiving().await;
}

/// A TCP connection that never sends a ClientHello, or only part of one, is closed at the handshake deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_hello_is_cut_at_the_handshake_deadline() {
    let h = Harness::start(|_| {}).await;
    // A TLS record header announcing a 512-byte handshake message, then nothing.
    for prefix in [&b""[..], &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01][..]] {
        let started = Instant::now();
        let mut tcp = TcpStream::connect(h.gw.addr).await.unwrap();
        tcp.write_all(prefix).await.unwrap();
        let (got, _) = read_until_closed(&mut tcp).await;
        let elapsed = started.elapsed();
        assert!(got.is_empty(), "{prefix:?}: server sent {got:?}");
        assert!(
            elapsed >= HANDSHAKE - Duration::from_millis(100),
            "{prefix:?}: cut too early: {elapsed:?}"
        );
        assert!(
            elapsed < HANDSHAKE + Duration::from_secs(2),
            "{prefix:?}: cut too late: {elapsed:?}"
        );
    }
    // Plain HTTP on the TLS port is not a ClientHello: refused at once, well before the deadline.
    let started = Instant::now();
    let mut tcp = TcpStream::connect(h.gw.addr).await.unwrap();
    tcp.write_all(upgrade_request(WS).as_bytes()).await.unwrap();
    let (got, _) = read_until_closed(&mut tcp).await;
    assert!(started.elapsed() < HANDSHAKE, "plain HTTP took {:?}", started.elapsed());
    assert!(
        !String::from_utf8_lossy(&got).contains("HTTP/1.1"),
        "no HTTP answer in clear: {got:?}"
    );
    h.by.assert_receiving().await;
}

/// Keep-alive requests do not extend the handshake deadline: a connection that has not upgraded within
/// `handshake_timeout` of its accept is closed, whatever it sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_requests_are_cut_at_the_handshake_deadline() {
    // needs: finding 2 (admission)
    let h = Harness::start(|_| {}).await;
    let started = Instant::now();
    let mut tls = h.gw.tls().await;
    let mut buf = Vec::new();
    let mut answered = 0;
    while started.elapsed() < HANDSHAKE * 6 {
        if tls
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .is_err()
        {
            break;
        }
        match read_response(&mut tls, &mut buf).await {
            Some(r) => {
                assert_eq!(r.status, 200);
                answered += 1;
            }
            None => break,
        }
        tokio::time::sleep(HANDSHAKE / 5).await;
    }
    let elapsed = started.elapsed();
    assert!(answered >= 1, "the first request is answered");
    assert!(
        elapsed < HANDSHAKE + Duration::from_millis(400),
        "keep-alive kept the connection {elapsed:?} past a {HANDSHAKE:?} deadline ({answered} answers)"
    );
    h.by.assert_receiving().await;
}

/// Every malformed upgrade gets its own status and a short text body, never a 101.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_upgrade_requests_get_their_status() {
    let h = Harness::start(|_| {}).await;
    let good = upgrade_request(WS);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "plain GET",
            format!("GET {WS} HTTP/1.1\r\nHost: localhost\r\n\r\n"),
            426,
            "this endpoint only accepts WebSocket upgrades",
        ),
        (
            "Upgrade: h2c",
            good.replace("Upgrade: websocket", "Upgrade: h2c"),
            426,
            "this endpoint only accepts WebSocket upgrades",
        ),
        (
            "POST",
            good.replacen("GET", "POST", 1)
                .replace("\r\n\r\n", "\r\nContent-Length: 0\r\n\r\n"),
            400,
            "bad WebSocket upgrade: method must be GET",
        ),
        (
            "PUT",
            good.replacen("GET", "PUT", 1)
                .replace("\r\n\r\n", "\r\nContent-Length: 0\r\n\r\n"),
            400,
            "bad WebSocket upgrade: method must be GET",
        ),
        (
            "missing key",
            good.replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), ""),
            400,
            "bad WebSocket upgrade: missing Sec-WebSocket-Key",
        ),
        (
            "23-byte key",
            good.replace(KEY, &KEY[1..]),
            400,
            "bad WebSocket upgrade: malformed Sec-WebSocket-Key",
        ),
        (
            "25-byte key",
            good.replace(KEY, &format!("{KEY}A")),
            400,
            "bad WebSocket upgrade: malformed Sec-WebSocket-Key",
        ),
        (
            "version 8",
            good.replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"),
            400,
            "bad WebSocket upgrade: Sec-WebSocket-Version must be 13",
        ),
        (
            "no version",
            good.replace("Sec-WebSocket-Version: 13\r\n", ""),
            400,
            "bad WebSocket upgrade: Sec-WebSocket-Version must be 13",
        ),
        (
            "missing Connection: upgrade",
            good.replace("Connection: Upgrade", "Connection: keep-alive"),
            400,
            "bad WebSocket upgrade: missing `Connection: upgrade`",
        ),
        (
            "HTTP/1.0",
            good.replace("HTTP/1.1", "HTTP/1.0"),
            400,
            "bad WebSocket upgrade: HTTP/1.1 required",
        ),
        ("unknown path", upgrade_request("/nope"), 404, "not found"),
    ];
    for (what, req, status, body) in &cases {
        let resp = http(&h.gw, req.as_bytes()).await;
        assert_eq!(
            (resp.status, resp.body.trim()),
            (*status, *body),
            "{what}: {}{}",
            resp.head,
            resp.body
        );
        if *status == 426 {
            assert_eq!(resp.header("upgrade"), Some("websocket"), "{what}");
        }
    }
    // The same request, well formed, is upgraded.
    assert_eq!(http(&h.gw, good.as_bytes()).await.status, 101);
    h.by.assert_receiving().await;
}

/// A WebSocket frame sent in the same packet as the upgrade request, before the 101, is not lost: hyper hands the
/// bytes it read ahead to the upgraded connection, and the gateway answers the frame after the welcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_pipelined_before_the_101_is_read_after_the_welcome() {
    let h = Harness::start(|_| {}).await;
    let ping = client(TEXT, br#"{"op":"ping","id":7}"#);
    let (mut ws, _) = RawWs::connect_pipelined(&h.gw, &ping).await;
    assert_eq!(ws.next_json().await, json!({"op":"pong","id":7}));
    ws.send(&client(TEXT, br#"{"op":"ping","id":8}"#)).await;
    assert_eq!(ws.next_json().await, json!({"op":"pong","id":8}));
    h.by.assert_receiving().await;
}

// ---- WebSocket framing -------------------------------------------------------------------------------------------

/// Sends `bytes` on a fresh raw connection and returns the close (code, reason).
async fn close_after(h: &Harness, bytes: &[u8]) -> (u16, String) {
    let mut ws = RawWs::connect(&h.gw).await;
    ws.send(bytes).await;
    let (code, reason, texts) = ws.expect_close().await;
    assert!(texts.is_empty(), "no reply before the close: {texts:?}");
    (code, reason)
}

const PROTOCOL_ERROR: (u16, &str) = (1002, "protocol error");
const TOO_BIG: (u16, &str) = (1009, "message too big");

/// Lengths of 2^63 and beyond (the most significant bit must be 0), and the largest legal 64-bit length: tungstenite
/// sees a frame over `max_frame_size` from its header alone and reports a capacity error, so the close is 1009.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_lengths_of_2_pow_63_close_1009() {
    let h = Harness::start(|_| {}).await;
    for len in [1u64 << 63, u64::MAX, (1 << 63) - 1, (MAX_FRAME + 1) as u64] {
        let mut bytes = header(true, 0, TEXT, true, len);
        bytes.extend_from_slice(b"{\"op\":");
        let (code, reason) = close_after(&h, &bytes).await;
        assert_eq!((code, reason.as_str()), TOO_BIG, "length {len}");
    }
    h.by.assert_receiving().await;
}

/// A message over `max_message_size`, sent as one frame over `max_frame_size`, or as frames each within it: 1009.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_close_1009() {
    let h = Harness::start(|_| {}).await;
    let big = vec![b' '; MAX_FRAME + 1];
    let (code, reason) = close_after(&h, &client(TEXT, &big)).await;
    assert_eq!((code, reason.as_str()), TOO_BIG, "one frame over max_frame_size");
    let (code, reason) = close_after(&h, &client(BINARY, &big)).await;
    assert_eq!((code, reason.as_str()), TOO_BIG, "binary frame over max_frame_size");
    // Endless non-empty fragments: the reassembled message passes max_message_size.
    let mut ws = RawWs::connect(&h.gw).await;
    ws.send(&frame(false, 0, TEXT, true, &[b' '; 1000])).await;
    // 100 MB of fragments in all: far more than loopback socket buffers absorb, so the flood can only stop early
    // because the server closed (a limit of 1,000 fragments, 1 MB, could all sit in the buffers of a loaded machine
    // before the server read the first 64 KiB).
    let (code, reason, texts, written) = ws
        .flood_until_close(frame(false, 0, CONT, true, &[b' '; 1000]), 100_000)
        .await;
    assert_eq!((code, reason.as_str()), TOO_BIG, "after {written} fragments: {texts:?}");
    assert!(written < 100_000, "the server closed before the flood ended");
    h.by.assert_receiving().await;
}

/// Endless EMPTY continuation frames add nothing to the message size, so only charging every frame to the rate
/// limits ends them: rate_limited is not answered per frame (no whole message), the close is 1008.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_empty_continuations_close_1008() {
    // needs: finding 4 (lead)
    let h = Harness::start(|c| {
        c.limits.messages_per_second = 100;
        c.limits.messages_burst = 100;
        c.limits.max_rate_violations = 20;
    })
    .await;
    let mut ws = RawWs::connect(&h.gw).await;
    ws.send(&frame(false, 0, TEXT, true, b"{")).await;
    let chunk = frame(false, 0, CONT, true, b"").repeat(1000);
    let (code, reason, _, written) = ws.flood_until_close(chunk, 2000).await;
    assert_eq!(
        (code, reason.as_str()),
        (1008, "rate limit exceeded repeatedly"),
        "after {written}k empty continuation frames"
    );
    h.by.assert_receiving().await;
}

/// Every framing violation is closed with 1002 "protocol error", and nothing is answered before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_violations_close_1002() {
    let h = Harness::start(|_| {}).await;
    let ping_op = br#"{"op":"ping"}"#;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unmasked text frame", frame(true, 0, TEXT, false, ping_op)),
        ("unmasked ping", frame(true, 0, PING, false, b"")),
        ("RSV1 on a text frame", frame(true, 4, TEXT, true, ping_op)),
        ("RSV2 on a text frame", frame(true, 2, TEXT, true, ping_op)),
        ("RSV3 on a text frame", frame(true, 1, TEXT, true, ping_op)),
        ("RSV1 on a ping", frame(true, 4, PING, true, b"")),
        ("ping over 125 bytes", client(PING, &[b'p'; 126])),
        ("pong over 125 bytes", client(PONG, &[b'p'; 126])),
        ("close over 125 bytes", close(1000, &"c".repeat(124))),
        ("fragmented ping", frame(false, 0, PING, true, b"x")),
        ("fragmented close", frame(false, 0, CLOSE, true, &1000u16.to_be_bytes())),
        ("continuation without a start", client(CONT, ping_op)),
        (
            "new text frame inside a fragmented message",
            [frame(false, 0, TEXT, true, b"{"), client(TEXT, ping_op)].concat(),
        ),
        ("reserved opcode 3", client(0x3, b"")),
        ("reserved opcode 0xB", client(0xB, b"")),
        ("close with a 1-byte body", client(CLOSE, &[0x03])),
    ];
    for (what, bytes) in &cases {
        let (code, reason) = close_after(&h, bytes).await;
        assert_eq!((code, reason.as_str()), PROTOCOL_ERROR, "{what}");
    }
    h.by.assert_receiving().await;
}

/// A close frame with a code no endpoint may send (reserved, or outside 1000-4999): tungstenite answers it itself
/// with 1002 and its own reason, "Protocol violation". A valid code is echoed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_with_a_reserved_code_closes_1002() {
    let h = Harness::start(|_| {}).await;
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, u16::MAX] {
        let (got, reason) = close_after(&h, &close(code, "")).await;
        assert_eq!((got, reason.as_str()), (1002, "Protocol violation"), "code {code}");
    }
    for code in [1000u16, 1001, 3000, 4999] {
        let (got, _) = close_after(&h, &close(code, "bye")).await;
        assert_eq!(got, code, "a valid close code is echoed");
    }
    h.by.assert_receiving().await;
}

/// Invalid UTF-8 in a text message, whole or split across fragments (and in a close reason): 1007.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_closes_1007() {
    let h = Harness::start(|_| {}).await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "lone continuation byte",
            client(TEXT, b"{\"op\":\"ping\",\"x\":\"\x80\"}"),
        ),
        ("overlong encoding", client(TEXT, b"\xc0\xaf")),
        ("surrogate", client(TEXT, b"\xed\xa0\x80")),
        ("beyond U+10FFFF", client(TEXT, b"\xf4\x90\x80\x80")),
        (
            "split across fragments, invalid once joined",
            [frame(false, 0, TEXT, true, b"\xe2\x82"), client(CONT, b"\x28")].concat(),
        ),
        ("close reason", client(CLOSE, b"\x03\xe8\xff")),
    ];
    for (what, bytes) in &cases {
        let (code, reason) = close_after(&h, bytes).await;
        assert_eq!((code, reason.as_str()), (1007, "invalid UTF-8"), "{what}");
    }
    // A valid character split across two fragments is fine.
    let mut ws = RawWs::connect(&h.gw).await;
    ws.send(
        &[
            frame(false, 0, TEXT, true, b"{\"op\":\"ping\",\"id\":\"\xe2\x82"),
            client(CONT, b"\xac\"}"),
        ]
        .concat(),
    )
    .await;
    assert_eq!(ws.next_json().await, json!({"op":"pong","id":"\u{20ac}"}));
    h.by.assert_receiving().await;
}

// ---- floods ------------------------------------------------------------------------------------------------------

/// WebSocket pings are charged like messages: a flood is closed with 1008 instead of getting a pong each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_flood_closes_1008() {
    // needs: finding 4 (lead)
    let h = Harness::start(|c| {
        c.limits.messages_per_second = 100;
        c.limits.messages_burst = 100;
        c.limits.max_rate_violations = 20;
    })
    .await;
    let mut ws = RawWs::connect(&h.gw).await;
    let chunk = client(PING, b"").repeat(1000);
    let (code, reason, _, written) = ws.flood_until_close(chunk, 100).await;
    assert_eq!(
        (code, reason.as_str()),
        (1008, "rate limit exceeded repeatedly"),
        "after {written}k pings"
    );
    h.by.assert_receiving().await;
}

/// Binary frames are charged too: each over-budget one is answered rate_limited, then the connection is closed 1008.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_flood_closes_1008() {
    // needs: finding 4 (lead)
    let h = Harness::start(|c| {
        c.limits.messages_per_second = 100;
        c.limits.messages_burst = 100;
        c.limits.max_rate_violations = 20;
    })
    .await;
    let mut ws = RawWs::connect(&h.gw).await;
    let chunk = client(BINARY, &[0u8; 1000]).repeat(100);
    let (code, reason, texts, written) = ws.flood_until_close(chunk, 100).await;
    assert_eq!(
        (code, reason.as_str()),
        (1008, "rate limit exceeded repeatedly"),
        "after {written}00 binary frames"
    );
    let codes: Vec<String> = texts
        .iter()
        .map(|t| {
            serde_json::from_str::<Value>(t).unwrap()["code"]
                .as_str()
                .unwrap_or("?")
                .to_string()
        })
        .collect();
    assert!(
        codes.iter().all(|c| c == "bad_request" || c == "rate_limited"),
        "{codes:?}"
    );
    assert!(codes.iter().any(|c| c == "rate_limited"), "{codes:?}");
    h.by.assert_receiving().await;
}

/// Issue 22, finding 2: a flood the client writes without reading, as an attacker (or a buggy browser app) does, ends
/// with the client reading the documented close frame and then the end of the stream (TLS close_notify), never a
/// reset. Each kind: 20,000 frames of 16 bytes (fragments: 4 bytes, so the rate limits end them before
/// `max_message_size`), written over [`SLOW_FLOOD`] at the pace of a scripted client, before the first read; 20
/// connections of each kind at once. Before the fix the gateway stopped reading 1 s after its close frame and closed
/// the socket with the rest of the flood unread: the client's writes, then its read, met a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blind_floods_of_every_kind_end_with_the_close_frame_20_of_20() {
    const FRAMES: usize = 20_000;
    const RUNS: usize = 20;
    let h = Harness::start(|c| {
        c.limits.messages_per_second = 100;
        c.limits.messages_burst = 100;
        c.limits.max_rate_violations = 20;
    })
    .await;
    let p = [b'x'; 16];
    let mut fragments = frame(false, 0, TEXT, true, b"{");
    fragments.extend(frame(false, 0, CONT, true, &p[..4]).repeat(FRAMES - 1));
    let mut close_after = client(BINARY, &p).repeat(FRAMES);
    close_after.extend(close(1000, "done"));
    let floods = [
        ("text", client(TEXT, &p).repeat(FRAMES)),
        ("binary", client(BINARY, &p).repeat(FRAMES)),
        ("ping", client(PING, &p).repeat(FRAMES)),
        ("pong", client(PONG, &p).repeat(FRAMES)),
        ("fragments", fragments),
        ("close after the flood", close_after),
    ];
    let mut failures = Vec::new();
    let gw = &h.gw;
    for (kind, flood) in &floods {
        let runs = (0..RUNS).map(|run| async move {
            let mut ws = RawWs::connect(gw).await;
            ws.blind_flood(flood)
                .await
                .map_err(|e| format!("{kind}, run {run}: {e}"))
        });
        failures.extend(
            futures_util::future::join_all(runs)
                .await
                .into_iter()
                .filter_map(Result::err),
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} floods: {failures:#?}",
        failures.len(),
        RUNS * floods.len()
    );
    h.by.assert_receiving().await;
}

/// Issue 22, finding 8: an open fragmented message holds tungstenite's reassembly and read buffers (about 2 x
/// `max_message_size` at worst), and pings between fragments kept it open for as long as the client liked. It may
/// now stay open `limits.fragment_timeout` from its first frame: the next frame after that closes the connection
/// with 1008 `message not completed in time`. A message completed in time, pings between its fragments, is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragmented_message_kept_open_by_pings_is_closed_at_its_deadline() {
    const DEADLINE: Duration = Duration::from_millis(400);
    let h = Harness::start(|c| c.limits.fragment_timeout = DEADLINE).await;
    let mut ws = RawWs::connect(&h.gw).await;
    // In time: fragments with a ping between them, answered as one message.
    ws.send(&frame(false, 0, TEXT, true, br#"{"op":"#)).await;
    ws.send(&client(PING, b"p")).await;
    ws.send(&frame(true, 0, CONT, true, br#""ping","id":1}"#)).await;
    assert_eq!(ws.next_json().await, json!({"op":"pong","id":1}));
    // Kept open: a ping every 50 ms (the attacker's pace), each answered, until the gateway closes.
    let opened = Instant::now();
    ws.send(&frame(false, 0, TEXT, true, &[b' '; 1000])).await;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let (code, reason) = loop {
        tick.tick().await;
        assert!(opened.elapsed() < WAIT, "the message is still open after {WAIT:?}");
        ws.send(&client(PING, b"p")).await;
        let f = ws.next_frame().await.expect("a pong or the close frame");
        match f.opcode {
            PONG => continue,
            CLOSE => break f.close_code(),
            _ => panic!("unexpected frame {f:?}"),
        }
    };
    let took = opened.elapsed();
    assert_eq!((code, reason.as_str()), (1008, "message not completed in time"));
    assert!(took >= DEADLINE, "closed after {took:?}, before the deadline");
    let (_, ended) = read_until_closed(&mut ws.rd).await;
    assert!(ended < WAIT, "TCP not closed after the close frame");
    h.by.assert_receiving().await;
}

// ---- JSON content ------------------------------------------------------------------------------------------------

/// Sends `text` as one text frame and returns the next JSON frame.
async fn reply_to(ws: &mut RawWs, text: &str) -> Value {
    ws.send(&client(TEXT, text.as_bytes())).await;
    ws.next_json().await
}

/// Waits until NATS has seen everything `nc` sent, then returns the next message on `sub` that a sentinel publish
/// through `ws` produces: proof that nothing else was published on `sub` before it.
async fn first_after(ws: &mut RawWs, sub: &mut async_nats::Subscriber, room: &str) -> Vec<u8> {
    let r = reply_to(
        ws,
        &format!(r#"{{"op":"publish","room":"{room}","data":"sentinel","id":"s"}}"#),
    )
    .await;
    assert_eq!(r, json!({"op":"ack","id":"s"}));
    next_msg(sub).await.payload.to_vec()
}

/// `data` nested beyond `limits.max_json_depth` is bad_request and never reaches NATS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_json_is_bad_request_and_never_reaches_nats() {
    // needs: finding 11 (nats)
    let h = Harness::start(|c| {
        c.limits.max_message_size = 64 * 1024;
        c.limits.max_frame_size = 64 * 1024;
    })
    .await;
    let nc = h.nats.client().await;
    let mut sub = nc.subscribe("rooms.deep").await.unwrap();
    nc.flush().await.unwrap();
    let mut ws = RawWs::connect(&h.gw).await;
    assert_eq!(
        reply_to(&mut ws, r#"{"op":"join","room":"deep","id":1}"#).await,
        json!({"op":"ack","id":1})
    );
    // Shallow nesting passes.
    let shallow = format!("{}1{}", "[".repeat(8), "]".repeat(8));
    let r = reply_to(
        &mut ws,
        &format!(r#"{{"op":"publish","room":"deep","data":{shallow},"id":2}}"#),
    )
    .await;
    assert_eq!(r, json!({"op":"ack","id":2}));
    assert_eq!(next_msg(&mut sub).await.payload.as_ref(), shallow.as_bytes());
    for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
        let deep = format!("{}1{}", open.repeat(10_000), close.repeat(10_000));
        let r = reply_to(
            &mut ws,
            &format!(r#"{{"op":"publish","room":"deep","data":{deep},"id":3}}"#),
        )
        .await;
        // No `id`: a frame this deep is refused before it is parsed, so its id is never read (docs/protocol.md).
        assert_eq!(
            (r["op"].as_str(), r["code"].as_str(), r.get("id")),
            (Some("error"), Some("bad_request"), None),
            "{r}"
        );
    }
    assert_eq!(first_after(&mut ws, &mut sub, "deep").await, b"\"sentinel\"");
    h.by.assert_receiving().await;
}

/// Ids are a number or a string of at most 64 bytes of JSON text, echoed exactly; anything else is bad_request
/// without an id. Huge numbers in `data` are forwarded verbatim (the gateway never converts them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_numbers_and_ids() {
    let h = Harness::start(|_| {}).await;
    let nc = h.nats.client().await;
    let mut sub = nc.subscribe("rooms.nums").await.unwrap();
    nc.flush().await.unwrap();
    let mut ws = RawWs::connect(&h.gw).await;
    let id_string_64 = format!("\"{}\"", "i".repeat(62));
    let digits_64 = "9".repeat(64);
    for id in [
        id_string_64.as_str(),
        digits_64.as_str(),
        "1e999",
        "-1e-999",
        "-0",
        "18446744073709551616",
    ] {
        ws.send(&client(TEXT, format!(r#"{{"op":"ping","id":{id}}}"#).as_bytes()))
            .await;
        let f = loop {
            let f = ws.next_frame().await.expect("reply");
            if f.opcode == TEXT {
                break f.text();
            }
        };
        assert_eq!(f, format!(r#"{{"op":"pong","id":{id}}}"#), "id {id} echoed exactly");
    }
    let too_long_string = format!("\"{}\"", "i".repeat(63));
    let too_many_digits = "9".repeat(65);
    // `null` is no id at all (the reply has none).
    assert_eq!(
        reply_to(&mut ws, r#"{"op":"ping","id":null}"#).await,
        json!({"op":"pong"})
    );
    for id in [too_long_string.as_str(), too_many_digits.as_str(), "true", "{}", "[1]"] {
        let r = reply_to(&mut ws, &format!(r#"{{"op":"ping","id":{id}}}"#)).await;
        assert_eq!(
            r,
            json!({"op":"error","code":"bad_request","message":"`id` must be a number or a string of at most 64 bytes"}),
            "id {id}"
        );
    }
    assert_eq!(
        reply_to(&mut ws, r#"{"op":"join","room":"nums","id":1}"#).await,
        json!({"op":"ack","id":1})
    );
    let huge_int = "7".repeat(1500);
    for data in [
        huge_int.as_str(),
        "1e999999",
        "-1E-999999",
        "123456789012345678901234567890.5e-10",
    ] {
        let r = reply_to(
            &mut ws,
            &format!(r#"{{"op":"publish","room":"nums","data":{data},"id":2}}"#),
        )
        .await;
        assert_eq!(r, json!({"op":"ack","id":2}), "data {data}");
        assert_eq!(
            next_msg(&mut sub).await.payload.as_ref(),
            data.as_bytes(),
            "forwarded verbatim"
        );
    }
    // A long unknown op is named by a short prefix only.
    let r = reply_to(&mut ws, &format!(r#"{{"op":"{}","id":3}}"#, "x".repeat(1500))).await;
    assert_eq!((r["code"].as_str(), r["id"].as_u64()), (Some("bad_request"), Some(3)));
    assert!(r["message"].as_str().unwrap().len() < 100, "{r}");
    h.by.assert_receiving().await;
}

/// Error texts never echo client input beyond a short prefix: a 1500-byte bad field gets a short error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_replies_do_not_echo_large_input() {
    // needs: finding 1 (lead)
    let h = Harness::start(|_| {}).await;
    let mut ws = RawWs::connect(&h.gw).await;
    let long = "e".repeat(1500);
    for text in [
        format!(r#"{{"op":"publish","room":"r","data":1,"echo":"{long}","id":4}}"#),
        format!(r#"{{"op":"join","room":{{"{long}":1}},"id":4}}"#),
        format!(r#"{{"op":"ping","id":4,"{long}"#),
    ] {
        let r = reply_to(&mut ws, &text).await;
        assert_eq!(r["code"], "bad_request", "{r}");
        let m = r["message"].as_str().unwrap();
        assert!(m.len() < 200, "error message of {} bytes echoes the input", m.len());
    }
    h.by.assert_receiving().await;
}

/// Every class of hostile room name is invalid_room -- also when spelled with JSON escapes, which decode to the same
/// characters -- no room is created and nothing reaches NATS. Names that are not valid JSON strings (a lone
/// surrogate escape) are bad_request. The plain list is shared with tests/gateway.rs ([`hostile_rooms`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_room_names_are_refused() {
    let h = Harness::start(|c| {
        c.limits.max_message_size = 64 * 1024;
        c.limits.max_frame_size = 64 * 1024;
    })
    .await;
    let nc = h.nats.client().await;
    let mut all = nc.subscribe("rooms.>").await.unwrap();
    nc.flush().await.unwrap();
    let mut ws = RawWs::connect(&h.gw).await;
    let mut names: Vec<String> = hostile_rooms()
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    assert!(names.len() > 30, "the shared list is not empty");
    // Escaped spellings of a dot, wildcards, `$`, NUL, CR/LF, a space, and non-ASCII.
    for escaped in [
        r#""a\u002eb""#,
        r#""\u002a""#,
        r#""\u003e""#,
        r#""\u0024SYS""#,
        r#""a\u0000""#,
        r#""\r\n""#,
        r#""a\u0020b""#,
        r#""caf\u00e9""#,
        r#""\ud83d\ude00""#,
    ] {
        names.push(escaped.to_string());
    }
    for (i, name) in names.iter().enumerate() {
        for op in ["join", "leave"] {
            let r = reply_to(&mut ws, &format!(r#"{{"op":"{op}","room":{name},"id":{i}}}"#)).await;
            assert_eq!(
                (r["code"].as_str(), r["id"].as_u64()),
                (Some("invalid_room"), Some(i as u64)),
                "{op} {name}: {r}"
            );
        }
        let r = reply_to(
            &mut ws,
            &format!(r#"{{"op":"publish","room":{name},"data":1,"id":{i}}}"#),
        )
        .await;
        assert_eq!(
            (r["code"].as_str(), r["id"].as_u64()),
            (Some("invalid_room"), Some(i as u64)),
            "publish {name}: {r}"
        );
    }
    for bad_json in [r#""\ud800""#, r#""a\x""#, "\"a\nb\""] {
        let r = reply_to(&mut ws, &format!(r#"{{"op":"join","room":{bad_json},"id":1}}"#)).await;
        assert_eq!(r["code"], "bad_request", "{bad_json}: {r}");
    }
    assert_eq!(h.gw.gw.rooms().len(), 1, "only the bystander's room exists");
    assert_eq!(
        reply_to(&mut ws, r#"{"op":"join","room":"ok","id":"j"}"#).await,
        json!({"op":"ack","id":"j"})
    );
    // The sentinel through a valid room is the first thing on `rooms.>` apart from the bystander's traffic.
    let r = reply_to(&mut ws, r#"{"op":"publish","room":"ok","data":"sentinel","id":"s"}"#).await;
    assert_eq!(r, json!({"op":"ack","id":"s"}));
    let first = loop {
        let m = next_msg(&mut all).await;
        if m.subject.as_str() != format!("rooms.{BYSTANDER_ROOM}") {
            break m;
        }
    };
    assert_eq!(
        (first.subject.as_str(), first.payload.as_ref()),
        ("rooms.ok", &b"\"sentinel\""[..]),
        "nothing was published on a hostile subject"
    );
    h.by.assert_receiving().await;
}

/// A publish over NATS's `max_payload` is too_large, the connection stays, and one under it goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_over_nats_max_payload_is_too_large() {
    // nats-server has no command-line flag for max_payload: it is set in a config file.
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, "max_payload: 1024\n").unwrap();
    let nats = NatsServer::start_with(&["-c", conf.to_str().unwrap()]).await;
    let h = Harness::start_nats(nats, |c| c.limits.max_frame_size = MAX_MESSAGE).await;
    let nc = h.nats.client().await;
    let mut sub = nc.subscribe("rooms.big").await.unwrap();
    nc.flush().await.unwrap();
    let mut ws = RawWs::connect(&h.gw).await;
    assert_eq!(
        reply_to(&mut ws, r#"{"op":"join","room":"big","id":1}"#).await,
        json!({"op":"ack","id":1})
    );
    for size in [1100, 2000, MAX_MESSAGE - 100] {
        let data = "x".repeat(size);
        let r = reply_to(
            &mut ws,
            &format!(r#"{{"op":"publish","room":"big","data":"{data}","id":2}}"#),
        )
        .await;
        assert_eq!(
            r,
            json!({"op":"error","code":"too_large","id":2,"message":"message over the backend's maximum payload"}),
            "{size} bytes"
        );
    }
    let data = "x".repeat(500);
    let r = reply_to(
        &mut ws,
        &format!(r#"{{"op":"publish","room":"big","data":"{data}","id":3}}"#),
    )
    .await;
    assert_eq!(r, json!({"op":"ack","id":3}));
    assert_eq!(
        next_msg(&mut sub).await.payload.len(),
        502,
        "the first message NATS saw is the small one"
    );
    h.by.assert_receiving().await;
}
