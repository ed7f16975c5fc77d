//! Charges every frame a client sends to its rate limits the moment the frame's header arrives.
//!
//! tungstenite hands the reader whole messages only: a client sending pings, pongs or endless empty continuation
//! frames never produces a message the reader could charge, and a backlog read while the CPU was busy would be
//! charged only when processed (after its sender had gone). So the upgraded socket is wrapped in [`Metered`], which
//! scans the WebSocket frame headers in the bytes as they are read (without touching the bytes tungstenite parses) and
//! charges each frame, whatever its opcode, one message and its length in bytes to the connection's (and user's)
//! [`MessageLimiter`].
//!
//! The verdicts reach the reader through [`Meter`]: one entry per message tungstenite will yield (a control frame,
//! or the final frame of a data message), in the order it yields them, saying whether any frame of it was refused.
//! The reader answers a refused text or binary message with `rate_limited` and does not process it. After
//! `limits.max_rate_violations` refusals in a row the wrapper fails the read, and the reader closes with 1008.
//!
//! Bounds: the scanner keeps 14 bytes of header state; the verdict queue holds one entry per message read ahead of the
//! reader, which is at most one read (`limits.read_buffer_size` bytes, ≥ 2 bytes per frame) plus the partial message,
//! and is capped at [`MAX_PENDING_VERDICTS`] (beyond it the connection is treated as abusive).

use std::{
    collections::VecDeque,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::limits::MessageLimiter;

/// Most verdicts waiting for the reader; unreachable by a well-formed stream read in `read_buffer_size` chunks.
pub const MAX_PENDING_VERDICTS: usize = 65_536;

/// What the reader learns about each message, shared with the [`Metered`] socket wrapper.
#[derive(Debug, Default)]
pub struct Meter {
    /// One entry per message, in the order tungstenite yields them: `true` if a frame of it was refused.
    verdicts: Mutex<VecDeque<bool>>,
    /// Set when the connection went over `limits.max_rate_violations` refusals in a row.
    abusive: AtomicBool,
}

impl Meter {
    /// Whether the next message the reader received was (partly) over the rate limits. A message the scanner has
    /// not seen (impossible for a consistent stream) counts as within limits.
    pub fn next_refused(&self) -> bool {
        self.verdicts.lock().pop_front().unwrap_or(false)
    }

    /// Whether the connection must be closed with 1008.
    pub fn abusive(&self) -> bool {
        self.abusive.load(Ordering::Relaxed)
    }
}

/// Frame header scanner: tracks where frames start in the byte stream.
#[derive(Debug, Default)]
struct Scanner {
    /// Header bytes collected so far (2 to 14 bytes: base, extended length, mask).
    header: [u8; 14],
    have: u8,
    /// Payload bytes of the current frame still to skip.
    skip: u64,
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    fin: bool,
    opcode: u8,
    /// Header plus payload length, saturated.
    frame_len: u64,
    payload_len: u64,
}

impl Header {
    fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

/// Length of the whole header given its first two bytes.
fn header_len(b0_b1: [u8; 2]) -> usize {
    let ext = match b0_b1[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if b0_b1[1] & 0x80 != 0 { 4 } else { 0 };
    2 + ext + mask
}

fn parse_header(h: &[u8]) -> Header {
    let len7 = h[1] & 0x7f;
    let payload_len = match len7 {
        126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
        127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
        n => u64::from(n),
    };
    Header {
        fin: h[0] & 0x80 != 0,
        opcode: h[0] & 0x0f,
        frame_len: payload_len.saturating_add(h.len() as u64),
        payload_len,
    }
}

impl Scanner {
    /// Feeds bytes as read from the socket; calls `on_frame` for every frame whose header completed.
    fn feed(&mut self, mut bytes: &[u8], mut on_frame: impl FnMut(Header)) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = usize::try_from(self.skip).unwrap_or(usize::MAX).min(bytes.len());
                self.skip -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            let have = usize::from(self.have);
            let need = if have < 2 {
                2
            } else {
                header_len([self.header[0], self.header[1]])
            };
            let take = (need - have).min(bytes.len());
            self.header[have..have + take].copy_from_slice(&bytes[..take]);
            self.have += take as u8;
            bytes = &bytes[take..];
            let have = usize::from(self.have);
            if have >= 2 && have == header_len([self.header[0], self.header[1]]) {
                let header = parse_header(&self.header[..have]);
                self.have = 0;
                self.skip = header.payload_len;
                on_frame(header);
            }
        }
    }
}

/// The upgraded socket with every incoming frame charged to the rate limits (see the module docs).
#[derive(Debug)]
pub struct Metered<S> {
    io: S,
    scanner: Scanner,
    limiter: MessageLimiter,
    meter: Arc<Meter>,
    /// A frame of the data message being received (possibly fragmented) was refused.
    message_refused: bool,
}

impl<S> Metered<S> {
    /// Wraps `io`, charging `limiter`; the returned [`Meter`] goes to the connection's reader.
    pub fn new(io: S, limiter: MessageLimiter) -> (Self, Arc<Meter>) {
        let meter = Arc::new(Meter::default());
        let wrapped = Self {
            io,
            scanner: Scanner::default(),
            limiter,
            meter: meter.clone(),
            message_refused: false,
        };
        (wrapped, meter)
    }

    /// Charges the frames in freshly read `bytes`. Returns false once the connection is abusive.
    fn charge(&mut self, bytes: &[u8]) -> bool {
        let Self {
            scanner,
            limiter,
            meter,
            message_refused,
            ..
        } = self;
        let mut verdicts = meter.verdicts.lock();
        scanner.feed(bytes, |h| {
            let refused = limiter.check_frame(h.frame_len).is_err();
            if h.is_control() {
                // Control frames are yielded on their own, even in the middle of a fragmented message.
                verdicts.push_back(refused);
            } else {
                *message_refused |= refused;
                if h.fin {
                    verdicts.push_back(std::mem::take(message_refused));
                }
            }
        });
        let abusive = limiter.abusive() || verdicts.len() > MAX_PENDING_VERDICTS;
        drop(verdicts);
        if abusive {
            meter.abusive.store(true, Ordering::Relaxed);
        }
        !abusive
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.meter.abusive() {
            return Poll::Ready(Err(io::Error::other("rate limit exceeded repeatedly")));
        }
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if !this.charge(&buf.filled()[before..]) {
                    return Poll::Ready(Err(io::Error::other("rate limit exceeded repeatedly")));
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes a client frame header (masked) for `payload_len` bytes.
    fn frame(fin: bool, opcode: u8, payload_len: u64) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload_len {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&n.to_be_bytes());
            }
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend(std::iter::repeat_n(0xAB, payload_len as usize));
        f
    }

    #[test]
    fn scanner_finds_every_frame_whatever_the_chunking() {
        let specs: Vec<(bool, u8, u64)> = vec![
            (true, 1, 5),
            (false, 1, 0),
            (false, 0, 0),
            (true, 9, 0),
            (false, 0, 200),
            (true, 0, 70_000),
            (true, 2, 125),
            (true, 10, 3),
            (true, 8, 2),
        ];
        let bytes: Vec<u8> = specs.iter().flat_map(|&(f, o, n)| frame(f, o, n)).collect();
        for chunk in [1, 2, 3, 7, 13, 1000, bytes.len()] {
            let mut s = Scanner::default();
            let mut got = Vec::new();
            for c in bytes.chunks(chunk) {
                s.feed(c, |h| got.push((h.fin, h.opcode, h.payload_len)));
            }
            assert_eq!(got, specs, "chunk size {chunk}");
        }
    }

    #[test]
    fn huge_lengths_saturate() {
        let mut h = vec![0x82, 0x80 | 127];
        h.extend_from_slice(&u64::MAX.to_be_bytes());
        h.extend_from_slice(&[0; 4]);
        let mut s = Scanner::default();
        let mut got = None;
        s.feed(&h, |hd| got = Some(hd));
        let hd = got.expect("header parsed");
        assert_eq!(hd.payload_len, u64::MAX);
        assert_eq!(hd.frame_len, u64::MAX);
    }

    fn limiter(burst: u32, violations: u32) -> MessageLimiter {
        let mut c = crate::Config::default();
        c.limits.messages_per_second = 1;
        c.limits.messages_burst = burst;
        c.limits.max_rate_violations = violations;
        Arc::new(crate::limits::Limits::new(&c)).message_limiter(None)
    }

    #[test]
    fn verdicts_follow_message_order_and_fragments_accumulate() {
        // Burst of 3 frames: text(1 frame), ping, then a 3-fragment text whose second fragment is over budget.
        let (mut m, meter) = Metered::new((), limiter(3, 100));
        let mut bytes = frame(true, 1, 2);
        bytes.extend(frame(true, 9, 0));
        bytes.extend(frame(false, 1, 1));
        bytes.extend(frame(false, 0, 1));
        bytes.extend(frame(true, 0, 1));
        assert!(m.charge(&bytes));
        assert!(!meter.next_refused(), "text within budget");
        assert!(!meter.next_refused(), "ping within budget");
        assert!(meter.next_refused(), "fragmented text with a refused fragment");
        assert!(!meter.next_refused(), "nothing more queued");
    }

    #[test]
    fn empty_continuations_and_pings_become_abusive() {
        let (mut m, meter) = Metered::new((), limiter(10, 20));
        let mut bytes = frame(false, 1, 0);
        for _ in 0..40 {
            bytes.extend(frame(false, 0, 0));
        }
        assert!(!m.charge(&bytes), "endless empty continuations are abusive");
        assert!(meter.abusive());
        let (mut m, meter) = Metered::new((), limiter(10, 20));
        let pings: Vec<u8> = (0..40).flat_map(|_| frame(true, 9, 0)).collect();
        assert!(!m.charge(&pings), "a ping flood is abusive");
        assert!(meter.abusive());
    }
}
