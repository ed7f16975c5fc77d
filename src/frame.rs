//! One complete server-to-client WebSocket frame ([`Frame`]), built once and shared: a leaf value type, used by the
//! protocol's encoders, the rooms' fan-out, the outbox and the wire that writes it.

use std::fmt;

use bytes::Bytes;

/// Room left before a frame's payload for the longest header (2 + 8 bytes: no mask on server frames).
const HEADROOM: usize = 10;

/// RSV1: set on the first frame of a compressed message (RFC 7692).
const RSV1: u8 = 0x40;

const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;

/// A complete server-to-client WebSocket frame, header and payload in one shared buffer: cloning it is a refcount
/// increment, so one frame serves every member of a room.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    /// Header then payload, as written to the socket.
    wire: Bytes,
    /// Length of the header at the start of `wire` (2, 4 or 10).
    header: u8,
}

impl Frame {
    /// A text frame of `text`.
    pub fn text(text: impl AsRef<str>) -> Frame {
        let text = text.as_ref();
        Self::build(OP_TEXT, text.len(), |b| b.extend_from_slice(text.as_bytes()))
    }

    /// A text frame whose payload `write` appends to the buffer it is given (which already holds the header's room):
    /// the payload is built in place, with no copy. `write` must append valid UTF-8.
    pub fn text_with(capacity: usize, write: impl FnOnce(&mut Vec<u8>)) -> Frame {
        let frame = Self::build(OP_TEXT, capacity, write);
        debug_assert!(
            std::str::from_utf8(frame.payload()).is_ok(),
            "text frame with invalid UTF-8"
        );
        frame
    }

    /// A binary frame of `data` (the conformance echo).
    pub fn binary(data: &[u8]) -> Frame {
        Self::build(OP_BINARY, data.len(), |b| b.extend_from_slice(data))
    }

    /// A ping with an empty payload (the heartbeat).
    pub fn ping() -> Frame {
        Self::build(OP_PING, 0, |_| {})
    }

    /// A close frame with `code` and `reason` (at most 123 bytes, which every reason in `protocol::close` is).
    pub fn close(code: u16, reason: &str) -> Frame {
        let reason = &reason.as_bytes()[..reason.len().min(123)];
        Self::build(OP_CLOSE, 2 + reason.len(), |b| {
            b.extend_from_slice(&code.to_be_bytes());
            b.extend_from_slice(reason);
        })
    }

    /// This frame's message compressed (permessage-deflate, RSV1 set), once, for every member that negotiated it;
    /// `None` when compressing would not make it smaller. Only for text and binary frames.
    pub fn deflated(&self, level: u8) -> Option<Frame> {
        let frame = self.compressed(level);
        (frame.len() < self.len()).then_some(frame)
    }

    /// This frame's message compressed even when that makes it larger (the conformance echo: see
    /// `crate::conformance`).
    pub fn compressed(&self, level: u8) -> Frame {
        let opcode = self.wire.first().map_or(OP_TEXT, |b| b & 0x0f);
        debug_assert!(
            opcode == OP_TEXT || opcode == OP_BINARY,
            "only data frames are compressed"
        );
        let payload = self.payload();
        let mut b = Vec::with_capacity(HEADROOM + payload.len() / 2 + 16);
        b.resize(HEADROOM, 0);
        crate::deflate::compress(payload, level, &mut b);
        let len = b.len() - HEADROOM;
        let (mut header, n) = header(opcode, len);
        header[0] |= RSV1;
        let start = HEADROOM - n;
        b[start..HEADROOM].copy_from_slice(&header[..n]);
        Frame {
            wire: Bytes::from(b).slice(start..),
            header: n as u8,
        }
    }

    /// Whether this is a compressed frame (RSV1 set).
    pub fn is_deflated(&self) -> bool {
        self.header > 0 && self.wire.first().is_some_and(|b| b & RSV1 != 0)
    }

    /// Bytes already framed elsewhere (tungstenite's pongs and close reply), written as they are.
    pub(crate) fn raw(wire: Bytes) -> Frame {
        Frame { wire, header: 0 }
    }

    fn build(opcode: u8, capacity: usize, write: impl FnOnce(&mut Vec<u8>)) -> Frame {
        let mut b = Vec::with_capacity(HEADROOM + capacity);
        b.resize(HEADROOM, 0);
        write(&mut b);
        let len = b.len() - HEADROOM;
        let (header, n) = header(opcode, len);
        let start = HEADROOM - n;
        b[start..HEADROOM].copy_from_slice(&header[..n]);
        Frame {
            wire: Bytes::from(b).slice(start..),
            header: n as u8,
        }
    }

    /// Payload length: what the outbox's byte bounds count.
    pub fn len(&self) -> usize {
        self.wire.len() - usize::from(self.header)
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The payload (for a text frame, its UTF-8 text).
    pub fn payload(&self) -> &[u8] {
        &self.wire[usize::from(self.header)..]
    }

    /// The payload as text (lossy for binary frames); for tests and logs.
    pub fn as_text(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(self.payload())
    }

    /// Header and payload, as written.
    pub fn wire(&self) -> &[u8] {
        &self.wire
    }
}

impl From<String> for Frame {
    fn from(text: String) -> Frame {
        Frame::text(text)
    }
}

impl From<&str> for Frame {
    fn from(text: &str) -> Frame {
        Frame::text(text)
    }
}

impl fmt::Display for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_text())
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Frame({:?})", self.as_text())
    }
}

/// The header of an unmasked, final frame of `len` payload bytes, and its length.
fn header(opcode: u8, len: usize) -> ([u8; HEADROOM], usize) {
    let mut h = [0u8; HEADROOM];
    h[0] = 0x80 | opcode;
    if len < 126 {
        h[1] = len as u8;
        (h, 2)
    } else if let Ok(len) = u16::try_from(len) {
        h[1] = 126;
        h[2..4].copy_from_slice(&len.to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}
