//! Charges every frame a client sends to its rate limits the moment the frame's header arrives.
//!
//! tungstenite hands the reader whole messages only: a client sending pings, pongs or endless empty continuation
//! frames never produces a message the reader could charge, and a backlog read while the CPU was busy would be
//! charged only when processed (after its sender had gone). So the connection's socket reads (`crate::wire`) pass
//! every byte through [`FrameMeter::charge`], which scans the WebSocket frame headers in the bytes as they are read
//! (without touching the bytes tungstenite parses) and charges each frame, whatever its opcode, one message and its
//! length in bytes to the connection's (and user's) [`MessageLimiter`].
//!
//! The verdicts reach the connection in order: one entry per message tungstenite will yield (a control frame, or the
//! final frame of a data message), saying whether any frame of it was refused and whether it is compressed ([`FrameMeter::next_verdict`]). The
//! connection answers a refused text or binary message with `rate_limited` and does not process it. After
//! `limits.max_rate_violations` refusals in a row the meter turns abusive, reads fail, and the connection closes with
//! 1008.
//!
//! The meter also knows where the stream stands ([`FrameMeter::at_message_boundary`]): no frame half received and no
//! fragmented message open, which is when `crate::wire` may drop tungstenite's read state.
//!
//! Bounds: the scanner keeps 14 bytes of header state; the verdict queue holds one entry per message read ahead of the
//! connection, which is at most one read (`limits.read_buffer_size` bytes, >= 2 bytes per frame) plus the partial
//! message, and is capped at [`MAX_PENDING_VERDICTS`] (beyond it the connection is treated as abusive).

use std::collections::VecDeque;

use crate::limits::MessageLimiter;

/// Most verdicts waiting for the connection; unreachable by a well-formed stream read in `read_buffer_size` chunks.
pub const MAX_PENDING_VERDICTS: usize = 65_536;

/// Frame header scanner: tracks where frames start in the byte stream.
#[derive(Debug, Default)]
struct Scanner {
    /// Header bytes collected so far (2 to 14 bytes: base, extended length, mask).
    header: [u8; 14],
    have: u8,
    /// Payload bytes of the current frame still to skip.
    skip: u64,
}

/// What the scanner reports.
enum Event<'a> {
    /// The first byte of a frame, in the read buffer tungstenite is about to parse.
    Start(&'a mut u8),
    /// A frame's complete header.
    Header(Header),
}

/// RSV1, the permessage-deflate bit; RSV2 and RSV3 beside it.
const RSV1: u8 = 0x40;
const RSV_ALL: u8 = 0x70;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;

/// The kind of a compressed message, which tungstenite is shown as binary (see [`FrameMeter::charge`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deflated {
    /// A compressed text message: its inflated bytes must be UTF-8.
    Text,
    /// A compressed binary message.
    Binary,
}

/// What the meter knows of one message tungstenite yields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verdict {
    /// A frame of it was over the rate limits.
    pub refused: bool,
    /// It is compressed (RSV1 on its first frame, on a connection that negotiated permessage-deflate).
    pub deflated: Option<Deflated>,
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
    /// Feeds bytes as read from the socket: calls `on` with the first byte of every frame as it arrives (which it may
    /// rewrite: see [`FrameMeter::charge`]) and with every frame whose header completed.
    fn feed(&mut self, bytes: &mut [u8], mut on: impl FnMut(Event<'_>)) {
        let mut pos = 0;
        while pos < bytes.len() {
            if self.skip > 0 {
                let n = usize::try_from(self.skip).unwrap_or(usize::MAX).min(bytes.len() - pos);
                self.skip -= n as u64;
                pos += n;
                continue;
            }
            let have = usize::from(self.have);
            if have == 0 {
                on(Event::Start(&mut bytes[pos]));
            }
            let need = if have < 2 {
                2
            } else {
                header_len([self.header[0], self.header[1]])
            };
            let take = (need - have).min(bytes.len() - pos);
            self.header[have..have + take].copy_from_slice(&bytes[pos..pos + take]);
            self.have += take as u8;
            pos += take;
            let have = usize::from(self.have);
            if have >= 2 && have == header_len([self.header[0], self.header[1]]) {
                let header = parse_header(&self.header[..have]);
                self.have = 0;
                self.skip = header.payload_len;
                on(Event::Header(header));
            }
        }
    }

    /// No frame is partly received.
    fn at_frame_boundary(&self) -> bool {
        self.have == 0 && self.skip == 0
    }
}

/// The rate-limit charge of every incoming frame, and the verdicts for the connection (see the module docs).
#[derive(Debug)]
pub struct FrameMeter {
    scanner: Scanner,
    limiter: MessageLimiter,
    /// One entry per message, in the order tungstenite yields them: `true` if a frame of it was refused. Allocated
    /// only while verdicts wait (a connection reading one message at a time keeps at most a few).
    verdicts: VecDeque<Verdict>,
    /// A frame of the data message being received (possibly fragmented) was refused.
    message_refused: bool,
    /// The data message being received is compressed.
    message_deflated: Option<Deflated>,
    /// The connection negotiated permessage-deflate: RSV1 on a message's first frame means compressed.
    deflate: bool,
    /// A fragmented data message is open (its final frame not seen yet).
    in_message: bool,
    /// Over `limits.max_rate_violations` refusals in a row, or too many verdicts waiting: reads fail from now on.
    abusive: bool,
}

impl FrameMeter {
    /// A meter charging `limiter`.
    pub fn new(limiter: MessageLimiter) -> Self {
        Self {
            scanner: Scanner::default(),
            limiter,
            verdicts: VecDeque::new(),
            message_refused: false,
            message_deflated: None,
            deflate: false,
            in_message: false,
            abusive: false,
        }
    }

    /// Whether the connection negotiated permessage-deflate (see [`FrameMeter::charge`]).
    pub fn deflate(mut self, negotiated: bool) -> Self {
        self.deflate = negotiated;
        self
    }

    /// Charges the frames in freshly read `bytes`. Returns false once the connection is abusive.
    ///
    /// On a connection that negotiated permessage-deflate it also rewrites, in place and before tungstenite parses
    /// them, the first byte of a compressed message's first frame (RSV1 set on a text or binary frame that opens a
    /// message): RSV1 cleared (tungstenite knows no extension and fails any frame with it) and the opcode made binary
    /// (tungstenite would check the compressed bytes of a text message for UTF-8). Tungstenite then unmasks and
    /// assembles the message as usual, within `limits.max_message_size` for the compressed bytes, and its verdict
    /// ([`Verdict::deflated`]) tells the reader to inflate it and, for text, check the UTF-8 (`crate::wire`). RSV1 on
    /// a control or continuation frame, RSV2 or RSV3 anywhere, or RSV1 without the extension, are left as they are:
    /// tungstenite fails them as protocol errors (close 1002), as RFC 7692 section 6 asks.
    pub fn charge(&mut self, bytes: &mut [u8]) -> bool {
        let Self {
            scanner,
            limiter,
            verdicts,
            message_refused,
            message_deflated,
            deflate,
            in_message,
            ..
        } = self;
        scanner.feed(bytes, |event| match event {
            Event::Start(b0) => {
                let opcode = *b0 & 0x0f;
                let opens = (opcode == OP_TEXT || opcode == OP_BINARY) && !*in_message;
                if !opens {
                    return;
                }
                *message_deflated = None;
                if *deflate && *b0 & RSV_ALL == RSV1 {
                    *message_deflated = Some(if opcode == OP_TEXT {
                        Deflated::Text
                    } else {
                        Deflated::Binary
                    });
                    *b0 = (*b0 & !(RSV1 | 0x0f)) | OP_BINARY;
                }
            }
            Event::Header(h) => {
                let refused = limiter.check_frame(h.frame_len).is_err();
                if h.is_control() {
                    // Control frames are yielded on their own, even in the middle of a fragmented message.
                    verdicts.push_back(Verdict {
                        refused,
                        deflated: None,
                    });
                } else {
                    *message_refused |= refused;
                    *in_message = !h.fin;
                    if h.fin {
                        verdicts.push_back(Verdict {
                            refused: std::mem::take(message_refused),
                            deflated: message_deflated.take(),
                        });
                    }
                }
            }
        });
        if limiter.abusive() || verdicts.len() > MAX_PENDING_VERDICTS {
            self.abusive = true;
        }
        if verdicts.is_empty() && verdicts.capacity() > 16 {
            *verdicts = VecDeque::new();
        }
        !self.abusive
    }

    /// What the meter knows of the next message tungstenite yielded: whether it was (partly) over the rate limits,
    /// and whether it is compressed. A message the scanner has not seen (impossible for a consistent stream) counts
    /// as within limits and uncompressed.
    pub fn next_verdict(&mut self) -> Verdict {
        let verdict = self.verdicts.pop_front().unwrap_or_default();
        if self.verdicts.is_empty() {
            // The common case (one message per read) costs no storage kept between messages.
            self.verdicts = VecDeque::new();
        }
        verdict
    }

    /// Whether the connection must be closed with 1008.
    pub fn abusive(&self) -> bool {
        self.abusive
    }

    /// Storage held for waiting verdicts.
    pub fn retained_bytes(&self) -> usize {
        self.verdicts.capacity() * std::mem::size_of::<Verdict>()
    }

    /// A fragmented data message is open: its first frame's header was read, its final frame's not yet.
    pub fn message_open(&self) -> bool {
        self.in_message
    }

    /// No frame is half received and no fragmented message is open.
    pub fn at_message_boundary(&self) -> bool {
        self.scanner.at_frame_boundary() && !self.in_message
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
                let mut c = c.to_vec();
                s.feed(&mut c, |e| {
                    if let Event::Header(h) = e {
                        got.push((h.fin, h.opcode, h.payload_len))
                    }
                });
            }
            assert_eq!(got, specs, "chunk size {chunk}");
        }
    }

    /// On a deflating connection the first frame of a compressed message is shown to tungstenite as binary without
    /// RSV1, and its verdict says what it was; RSV1 anywhere else, or without the extension, is left for tungstenite
    /// to refuse. Whatever the chunking.
    #[test]
    fn compressed_messages_are_marked_and_rewritten_whatever_the_chunking() {
        let with_rsv = |rsv: u8, fin: bool, opcode: u8, len: u64| {
            let mut f = frame(fin, opcode, len);
            f[0] |= rsv << 4;
            f
        };
        let stream: Vec<u8> = [
            with_rsv(4, true, 1, 3),    // compressed text
            with_rsv(0, true, 1, 3),    // plain text
            with_rsv(4, false, 2, 200), // compressed binary, fragmented
            with_rsv(0, true, 9, 0),    // a ping in between
            with_rsv(0, true, 0, 70_000),
            with_rsv(4, true, 9, 0),  // RSV1 on a ping: untouched
            with_rsv(4, false, 1, 1), // compressed text ...
            with_rsv(4, true, 0, 1),  // ... RSV1 on its continuation: untouched
            with_rsv(2, true, 1, 1),  // RSV2: untouched
        ]
        .concat();
        for chunk in [1, 2, 5, 13, 4096, stream.len()] {
            for deflate in [true, false] {
                let mut m = FrameMeter::new(limiter(1000, 1000)).deflate(deflate);
                let mut bytes = stream.clone();
                for c in bytes.chunks_mut(chunk) {
                    assert!(m.charge(c));
                }
                let verdicts: Vec<_> = (0..8).map(|_| m.next_verdict().deflated).collect();
                let starts: Vec<u8> = {
                    let mut v = Vec::new();
                    let mut s = Scanner::default();
                    let mut b = bytes.clone();
                    s.feed(&mut b, |e| {
                        if let Event::Start(b0) = e {
                            v.push(*b0)
                        }
                    });
                    v
                };
                if deflate {
                    assert_eq!(
                        verdicts,
                        [
                            Some(Deflated::Text),
                            None,
                            None,
                            Some(Deflated::Binary),
                            None,
                            // tungstenite refuses its continuation's RSV1 before this verdict is read.
                            Some(Deflated::Text),
                            None,
                            None
                        ],
                        "chunk {chunk}"
                    );
                    assert_eq!(
                        starts,
                        [0x82, 0x81, 0x02, 0x89, 0x80, 0xC9, 0x02, 0xC0, 0xA1],
                        "chunk {chunk}"
                    );
                } else {
                    assert!(verdicts.iter().all(Option::is_none), "chunk {chunk}");
                    assert_eq!(bytes, stream, "nothing rewritten without the extension");
                }
            }
        }
    }

    #[test]
    fn huge_lengths_saturate() {
        let mut h = vec![0x82, 0x80 | 127];
        h.extend_from_slice(&u64::MAX.to_be_bytes());
        h.extend_from_slice(&[0; 4]);
        let mut s = Scanner::default();
        let mut got = None;
        s.feed(&mut h, |e| {
            if let Event::Header(hd) = e {
                got = Some(hd)
            }
        });
        let hd = got.expect("header parsed");
        assert_eq!(hd.payload_len, u64::MAX);
        assert_eq!(hd.frame_len, u64::MAX);
    }

    fn limiter(burst: u32, violations: u32) -> MessageLimiter {
        let mut c = crate::Config::default();
        c.limits.messages_per_second = 1;
        c.limits.messages_burst = burst;
        c.limits.max_rate_violations = violations;
        std::sync::Arc::new(crate::limits::Limits::new(&c)).message_limiter(None)
    }

    #[test]
    fn verdicts_follow_message_order_and_fragments_accumulate() {
        // Burst of 3 frames: text(1 frame), ping, then a 3-fragment text whose second fragment is over budget.
        let mut m = FrameMeter::new(limiter(3, 100));
        let mut bytes = frame(true, 1, 2);
        bytes.extend(frame(true, 9, 0));
        bytes.extend(frame(false, 1, 1));
        bytes.extend(frame(false, 0, 1));
        bytes.extend(frame(true, 0, 1));
        assert!(m.charge(&mut bytes));
        assert!(!m.next_verdict().refused, "text within budget");
        assert!(!m.next_verdict().refused, "ping within budget");
        assert!(m.next_verdict().refused, "fragmented text with a refused fragment");
        assert!(!m.next_verdict().refused, "nothing more queued");
    }

    #[test]
    fn empty_continuations_and_pings_become_abusive() {
        let mut m = FrameMeter::new(limiter(10, 20));
        let mut bytes = frame(false, 1, 0);
        for _ in 0..40 {
            bytes.extend(frame(false, 0, 0));
        }
        assert!(!m.charge(&mut bytes), "endless empty continuations are abusive");
        assert!(m.abusive());
        let mut m = FrameMeter::new(limiter(10, 20));
        let mut pings: Vec<u8> = (0..40).flat_map(|_| frame(true, 9, 0)).collect();
        assert!(!m.charge(&mut pings), "a ping flood is abusive");
        assert!(m.abusive());
    }
}
