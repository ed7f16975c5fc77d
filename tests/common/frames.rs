//! A tiny WebSocket frame codec (RFC 6455 section 5.2) for tests that must send what a conforming client never
//! would -- unmasked frames, RSV bits, oversized or fragmented control frames, lying 64-bit lengths -- and read the
//! server's frames byte for byte (tungstenite's client refuses to send invalid frames and answers pings on its own,
//! which would hide what the server did).

/// Continuation frame.
pub const CONT: u8 = 0x0;
/// Text frame.
pub const TEXT: u8 = 0x1;
/// Binary frame.
pub const BINARY: u8 = 0x2;
/// Close frame.
pub const CLOSE: u8 = 0x8;
/// Ping frame.
pub const PING: u8 = 0x9;
/// Pong frame.
pub const PONG: u8 = 0xA;

/// The masking key every test frame uses (any key is valid; a fixed one keeps failures reproducible).
pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// The header of a frame: FIN, the three RSV bits (`rsv` = 0..=7, RSV1 is 4), the opcode, a masking key if
/// `masked`, and `len` as the payload length, encoded in the shortest form (7, 16 or 64 bits) -- whatever the
/// payload that follows really is, so a header may lie.
pub fn header(fin: bool, rsv: u8, opcode: u8, masked: bool, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(14);
    out.push((u8::from(fin) << 7) | ((rsv & 0x7) << 4) | (opcode & 0xf));
    let mask_bit = if masked { 0x80 } else { 0 };
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= u64::from(u16::MAX) {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    if masked {
        out.extend_from_slice(&MASK);
    }
    out
}

/// A whole frame with any combination of flags; the payload is masked when `masked`.
pub fn frame(fin: bool, rsv: u8, opcode: u8, masked: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = header(fin, rsv, opcode, masked, payload.len() as u64);
    if masked {
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// A valid client frame: FIN set, no RSV bits, masked.
pub fn client(opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame(true, 0, opcode, true, payload)
}

/// A client close frame with a code and a reason.
pub fn close(code: u16, reason: &str) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(reason.as_bytes());
    client(CLOSE, &body)
}

/// One frame as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFrame {
    /// FIN bit.
    pub fin: bool,
    /// RSV bits (must be 0 from Roomwire: it negotiates no extension).
    pub rsv: u8,
    /// Opcode.
    pub opcode: u8,
    /// Whether the server masked it (it must not).
    pub masked: bool,
    /// Payload (unmasked).
    pub payload: Vec<u8>,
}

impl ServerFrame {
    /// Code and reason of a close frame (1005, "" for an empty body).
    pub fn close_code(&self) -> (u16, String) {
        assert_eq!(self.opcode, CLOSE, "not a close frame: {self:?}");
        match self.payload.as_slice() {
            [] => (1005, String::new()),
            [a, b, reason @ ..] => (
                u16::from_be_bytes([*a, *b]),
                String::from_utf8(reason.to_vec()).expect("close reason is UTF-8"),
            ),
            other => panic!("close frame with a {}-byte body", other.len()),
        }
    }

    /// The payload as text (panics if it is not UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8(self.payload.clone()).expect("UTF-8 payload")
    }
}

/// Parses the first frame in `buf`; `None` if `buf` does not hold a whole frame yet. Returns the frame and the
/// number of bytes it took.
pub fn parse(buf: &[u8]) -> Option<(ServerFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let (b0, b1) = (buf[0], buf[1]);
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7f {
        126 => (u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)), 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let mask = if masked {
        let m: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(m)
    } else {
        None
    };
    let end = at.checked_add(usize::try_from(len).ok()?)?;
    let mut payload = buf.get(at..end)?.to_vec();
    if let Some(m) = mask {
        payload.iter_mut().enumerate().for_each(|(i, b)| *b ^= m[i % 4]);
    }
    Some((
        ServerFrame {
            fin: b0 & 0x80 != 0,
            rsv: (b0 >> 4) & 0x7,
            opcode: b0 & 0xf,
            masked,
            payload,
        },
        end,
    ))
}

/// Every whole frame in `buf`, in order (a trailing partial frame is ignored).
pub fn parse_all(mut buf: &[u8]) -> Vec<ServerFrame> {
    let mut out = Vec::new();
    while let Some((f, used)) = parse(buf) {
        out.push(f);
        buf = &buf[used..];
    }
    out
}

#[test]
fn round_trip_and_length_forms() {
    for len in [0usize, 125, 126, 65_535, 65_536] {
        let payload = vec![7u8; len];
        let (f, used) = parse(&frame(true, 0, BINARY, true, &payload)).expect("whole frame");
        assert_eq!((f.payload.len(), used > len, f.masked), (len, true, true));
        assert_eq!(f.payload, payload);
    }
    assert_eq!(header(true, 0, TEXT, false, 1 << 63)[1], 127);
    assert_eq!(
        &header(true, 0, TEXT, false, 1 << 63)[2..10],
        &(1u64 << 63).to_be_bytes()
    );
    assert_eq!(header(false, 4, PING, false, 0)[0], 0b0100_1001);
    assert!(
        parse(&header(true, 0, TEXT, false, 10)).is_none(),
        "a header alone is not a whole frame"
    );
    assert_eq!(parse_all(&[close(1000, "bye"), client(PING, b"x")].concat()).len(), 2);
}
