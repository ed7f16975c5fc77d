//! `--deflate`: subscribers that negotiate permessage-deflate (RFC 7692) and inflate what arrives compressed.
//!
//! tungstenite has no deflate support and refuses RSV1, so this is a minimal client of its own for the two JSON text
//! protocols that matter here (Roomwire, uws): its own upgrade request with the offer browsers send
//! (`permessage-deflate; client_max_window_bits`), server frames read raw (unmasked), a compressed message inflated
//! with a per-connection inflater (reset per message when the server said `server_no_context_takeover`, kept across
//! messages otherwise, as uWS's dedicated compressor needs), client frames sent masked and uncompressed (RSV1 clear,
//! which RFC 7692 allows), pings answered. The inflating costs the generator's CPU, never the server's.

use anyhow::{Context as _, bail};
use flate2::{Decompress, FlushDecompress};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{BenchStream, Endpoint, Stats, Target, find_timestamps};

/// The tail RFC 7692 senders strip from every message.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

pub(crate) struct DeflateWs {
    stream: BenchStream,
    /// Bytes read and not yet parsed.
    buf: Vec<u8>,
    inflater: Decompress,
    /// The server compresses each message on its own: reset the inflater per message.
    no_context: bool,
}

/// Upgrades with the browsers' permessage-deflate offer; fails if the server does not accept it.
pub(crate) async fn connect(endpoint: &Endpoint, source: Option<std::net::IpAddr>) -> anyhow::Result<DeflateWs> {
    let mut stream = endpoint.stream(source).await?;
    let uri: tokio_tungstenite::tungstenite::http::Uri = endpoint.url.parse()?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n",
        endpoint.host
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::with_capacity(8 * 1024);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection ended during the upgrade");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    if !head.starts_with("http/1.1 101") {
        bail!("upgrade refused: {}", head.lines().next().unwrap_or(""));
    }
    let extensions = head
        .lines()
        .find_map(|l| l.strip_prefix("sec-websocket-extensions:"))
        .context("the server declined permessage-deflate")?
        .trim()
        .to_string();
    if !extensions.starts_with("permessage-deflate") {
        bail!("unexpected extension {extensions:?}");
    }
    buf.drain(..head_end);
    Ok(DeflateWs {
        stream,
        buf,
        inflater: Decompress::new(false),
        no_context: extensions.contains("server_no_context_takeover"),
    })
}

impl DeflateWs {
    async fn send_frame(&mut self, opcode: u8, payload: &[u8]) -> anyhow::Result<()> {
        let mask = [0x5a, 0x13, 0xc7, 0x2e];
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&f).await?;
        Ok(())
    }

    pub(crate) async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        self.send_frame(0x1, text.as_bytes()).await
    }

    /// One whole frame: (first byte, payload).
    async fn next_frame(&mut self) -> anyhow::Result<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let (b0, b1) = (self.buf[0], self.buf[1]);
                let (len, at) = match b1 & 0x7f {
                    126 if self.buf.len() >= 4 => (u64::from(u16::from_be_bytes([self.buf[2], self.buf[3]])), 4),
                    127 if self.buf.len() >= 10 => {
                        (u64::from_be_bytes(self.buf[2..10].try_into().expect("8 bytes")), 10)
                    }
                    126 | 127 => (u64::MAX, 0),
                    n => (u64::from(n), 2),
                };
                if len != u64::MAX && self.buf.len() as u64 >= at as u64 + len {
                    let end = at + len as usize;
                    let payload = self.buf[at..end].to_vec();
                    self.buf.drain(..end);
                    return Ok((b0, payload));
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("connection ended");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next text or binary message, inflated if it came compressed; pings answered on the way.
    pub(crate) async fn next_message(&mut self) -> anyhow::Result<Vec<u8>> {
        let mut message = Vec::new();
        let mut compressed = false;
        loop {
            let (b0, payload) = self.next_frame().await?;
            match b0 & 0x0f {
                0x9 => self.send_frame(0xA, &payload).await?,
                0xA => {}
                0x8 => bail!("closed by server: {payload:?}"),
                op => {
                    if op != 0 {
                        compressed = b0 & 0x40 != 0;
                        message.clear();
                    }
                    message.extend_from_slice(&payload);
                    if b0 & 0x80 != 0 {
                        return if compressed {
                            self.inflate(&message)
                        } else {
                            Ok(message)
                        };
                    }
                }
            }
        }
    }

    fn inflate(&mut self, data: &[u8]) -> anyhow::Result<Vec<u8>> {
        if self.no_context {
            self.inflater.reset(false);
        }
        let mut out = Vec::with_capacity(data.len() * 4 + 64);
        for input in [data, &TAIL[..]] {
            let mut consumed = 0;
            loop {
                if out.len() == out.capacity() {
                    out.reserve(out.len().max(1024));
                }
                let before = self.inflater.total_in();
                self.inflater
                    .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
                    .context("invalid deflate data from the server")?;
                consumed += (self.inflater.total_in() - before) as usize;
                if consumed == input.len() && out.len() < out.capacity() {
                    break;
                }
            }
        }
        Ok(out)
    }
}

/// Joins `room` (Roomwire or uws) and returns once the server acked.
pub(crate) async fn join(ws: &mut DeflateWs, target: Target, room: &str) -> anyhow::Result<()> {
    if target == Target::Roomwire {
        loop {
            if String::from_utf8_lossy(&ws.next_message().await?).contains("\"welcome\"") {
                break;
            }
        }
    }
    ws.send_text(&format!(r#"{{"op":"join","room":"{room}","id":1}}"#))
        .await?;
    loop {
        let reply = ws.next_message().await?;
        let text = String::from_utf8_lossy(&reply);
        if text.contains("\"error\"") {
            bail!("join refused: {text}");
        }
        if text.contains("\"ack\"") {
            return Ok(());
        }
    }
}

/// Receives until the connection ends, recording the latency of every message.
pub(crate) async fn read_loop(mut ws: DeflateWs, stats: &Stats) {
    let mut stamps = Vec::new();
    while let Ok(data) = ws.next_message().await {
        stamps.clear();
        find_timestamps(&data, &mut stamps);
        stats.record(&stamps);
    }
    stats.closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}
