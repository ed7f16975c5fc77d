//! The attack harness: a gateway with short limits, an ordinary client (the [`Bystander`]) that keeps receiving room
//! messages from a NATS publisher before, during and after an attack, and raw HTTP and raw WebSocket clients
//! ([`RawWs`], frames from [`super::frames`]) over a real TLS stream, since tungstenite's client refuses to send invalid
//! frames. Used by the handshake, framing, floods and input suites; the table of cases is in `docs/security.md`.
#![allow(dead_code)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

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

use super::{NatsServer, TestGateway, WAIT, frames::*};

pub const WS: &str = "/ws";
/// A valid `Sec-WebSocket-Key` (the RFC 6455 sample).
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// The handshake deadline of every test here: short, so deadline cases are fast.
pub const HANDSHAKE: Duration = Duration::from_millis(500);
/// `limits.max_message_size` and `limits.max_frame_size` of every test here (unless a test raises them).
pub const MAX_MESSAGE: usize = 4096;
pub const MAX_FRAME: usize = 2048;
/// The room the bystander is in, and the longest pause between two of its messages the tests accept.
pub const BYSTANDER_ROOM: &str = "bystander";
pub const MAX_STALL: Duration = Duration::from_secs(5);

// ---- the ordinary client ---------------------------------------------------------------------------------------

/// What the bystander's reader has seen so far.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// Highest sequence number received (they arrive in order, none missing, or `failure` is set).
    pub last: u64,
    /// Longest time between two received messages.
    pub max_stall: Duration,
    /// Why the bystander stopped receiving, if it did.
    pub failure: Option<String>,
}

/// An ordinary client joined to [`BYSTANDER_ROOM`], fed by a NATS publisher every 20 ms, read by a task of its own
/// (which also answers the gateway's heartbeat pings).
pub struct Bystander {
    pub published: Arc<AtomicU64>,
    pub seen: watch::Receiver<Seen>,
    pub stop: Arc<AtomicBool>,
    pub tasks: Vec<JoinHandle<()>>,
}

impl Bystander {
    pub async fn start(gw: &TestGateway, nats: &NatsServer) -> Self {
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
    pub async fn assert_receiving(&self) {
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
pub struct Harness {
    pub gw: TestGateway,
    pub by: Bystander,
    pub nats: NatsServer,
}

pub fn hostile_config(c: &mut roomwire::Config) {
    c.server.handshake_timeout = HANDSHAKE;
    c.server.max_header_bytes = 8192;
    c.limits.max_message_size = MAX_MESSAGE;
    c.limits.max_frame_size = MAX_FRAME;
    c.nats.events = false;
}

impl Harness {
    pub async fn start(tweak: impl FnOnce(&mut roomwire::Config)) -> Self {
        Self::start_nats(NatsServer::start().await, tweak).await
    }

    pub async fn start_nats(nats: NatsServer, tweak: impl FnOnce(&mut roomwire::Config)) -> Self {
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

pub fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
    )
}

/// An HTTP response read off the wire.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// The head (status line and headers), as sent.
    pub head: String,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Reads one HTTP response head (and its `Content-Length` body) from `rd`; `None` if the connection ends first.
/// Bytes after it stay in `buf`.
pub async fn read_response<R: AsyncReadExt + Unpin>(rd: &mut R, buf: &mut Vec<u8>) -> Option<HttpResponse> {
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
pub async fn http(gw: &TestGateway, request: &[u8]) -> HttpResponse {
    let mut tls = gw.tls().await;
    tls.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    read_response(&mut tls, &mut buf)
        .await
        .expect("a response before the connection ends")
}

/// Reads until the peer closes; returns what arrived and how long it took. Panics if it stays open past `WAIT`.
pub async fn read_until_closed<R: AsyncReadExt + Unpin>(rd: &mut R) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, rd.read_to_end(&mut got))
        .await
        .expect("the server closes the connection");
    (got, started.elapsed())
}

pub type Tls = TlsStream<TcpStream>;

/// How long a blind flood takes to write ([`RawWs::blind_flood`]), in how many writes: longer than the 1 s the
/// gateway lingered before issue 22, well within `limits.close_linger` (5 s).
pub const SLOW_FLOOD: Duration = Duration::from_millis(1500);
pub const SLOW_FLOOD_WRITES: u32 = 100;

/// A WebSocket client that writes raw frames and reads the server's frames byte for byte. It never answers pings
/// (none arrive within these tests' length: the heartbeat interval is the default 25 s).
pub struct RawWs {
    pub rd: ReadHalf<Tls>,
    pub wr: Option<WriteHalf<Tls>>,
    pub buf: Vec<u8>,
    /// permessage-deflate was negotiated: frames with RSV1 are allowed and [`RawWs::next_json`] inflates them.
    pub deflate: bool,
}

impl RawWs {
    /// Upgrades (sending `pipelined` in the same write as the request) and reads the welcome.
    pub async fn connect_pipelined(gw: &TestGateway, pipelined: &[u8]) -> (Self, Value) {
        let mut tls = gw.tls().await;
        tls.write_all(&[upgrade_request(WS).as_bytes(), pipelined].concat())
            .await
            .unwrap();
        let mut buf = Vec::new();
        let resp = read_response(&mut tls, &mut buf).await.expect("upgrade response");
        assert_eq!(resp.status, 101, "{}", resp.head);
        let (rd, wr) = tokio::io::split(tls);
        let mut ws = RawWs {
            rd,
            wr: Some(wr),
            buf,
            deflate: false,
        };
        let welcome = ws.next_json().await;
        assert_eq!(welcome["op"], "welcome", "{welcome}");
        (ws, welcome)
    }

    /// Upgrades with `headers` (e.g. a `Sec-WebSocket-Extensions` offer) and reads the welcome; returns the 101 too.
    /// The connection counts as deflating when the 101 accepted permessage-deflate.
    pub async fn connect_with(gw: &TestGateway, headers: &[(&str, &str)]) -> (Self, HttpResponse) {
        let mut tls = gw.tls().await;
        let mut req = upgrade_request(WS);
        req.truncate(req.len() - 2);
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        tls.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let resp = read_response(&mut tls, &mut buf).await.expect("upgrade response");
        assert_eq!(resp.status, 101, "{}", resp.head);
        let (rd, wr) = tokio::io::split(tls);
        let deflate = resp
            .header("sec-websocket-extensions")
            .is_some_and(|e| e.starts_with("permessage-deflate"));
        let mut ws = RawWs {
            rd,
            wr: Some(wr),
            buf,
            deflate,
        };
        let welcome = ws.next_json().await;
        assert_eq!(welcome["op"], "welcome", "{welcome}");
        (ws, resp)
    }

    pub async fn connect(gw: &TestGateway) -> Self {
        Self::connect_pipelined(gw, &[]).await.0
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        let wr = self.wr.as_mut().expect("writer");
        wr.write_all(bytes).await.unwrap();
        wr.flush().await.unwrap();
    }

    /// The next frame from the server; `None` once the connection has ended.
    pub async fn next_frame(&mut self) -> Option<ServerFrame> {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if let Some((f, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                let rsv_ok = f.rsv == 0 || (self.deflate && f.rsv == 4 && matches!(f.opcode, TEXT | BINARY));
                assert!(
                    !f.masked && rsv_ok,
                    "server frames are unmasked, without RSV bits (RSV1 on data frames if deflating): {f:?}"
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
    pub async fn next_json(&mut self) -> Value {
        loop {
            let f = self
                .next_frame()
                .await
                .expect("a text frame, not the end of the connection");
            match f.opcode {
                PING | PONG => continue,
                TEXT if f.rsv == 4 => {
                    let plain = roomwire::deflate::inflate(&f.payload, 1 << 24).expect("valid deflate");
                    return serde_json::from_slice(&plain).expect("JSON");
                }
                TEXT => return serde_json::from_slice(&f.payload).expect("JSON"),
                _ => panic!("expected a text frame, got {f:?}"),
            }
        }
    }

    /// Reads up to the close frame (skipping pongs and pings; text frames are returned alongside), then checks that
    /// the server also ends the TCP connection. Returns (code, reason, text frames before the close).
    pub async fn expect_close(&mut self) -> (u16, String, Vec<String>) {
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
    pub async fn flood_until_close(&mut self, chunk: Vec<u8>, limit: usize) -> (u16, String, Vec<String>, usize) {
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
    pub async fn blind_flood(&mut self, flood: &[u8]) -> Result<(), String> {
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
