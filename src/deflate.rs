//! permessage-deflate (RFC 7692) without per-connection compression state: the negotiation ([`negotiate`]), the
//! compression of one message ([`compress`]) and the bounded inflation of one client message ([`inflate`]).
//!
//! Why no state per connection: a compressor with a 32 KiB window costs every connection 64 KiB and more (the
//! trap of per-socket compressors), while the gateway builds each room message's frame once for every member. With
//! no context takeover in both directions (the gateway always answers `server_no_context_takeover;
//! client_no_context_takeover`) each message is compressed and inflated on its own, so one deflater and one inflater
//! per worker thread ([`thread_local!`], reset before every message, used inside one synchronous call and never
//! across an await) serve every connection, and a connection that negotiated deflate keeps only a small number (the
//! window it allows the gateway, [`Agreement`]).
//!
//! Window bits: the gateway's deflater (flate2 with miniz_oxide) always uses a 32 KiB window, and RFC 7692 lets a
//! client restrict it (`server_max_window_bits=N`). Rather than declining such an offer or keeping a compressor per
//! window size, the gateway accepts it and sends that client a compressed frame only when the whole plain payload
//! is at most 2^N bytes: a back reference inside one message never reaches further back than the message's length,
//! so such a frame fits any window of 2^N. Longer messages go to that client uncompressed (RSV1 clear, which RFC 7692
//! always allows). The client's own window (`client_max_window_bits`) needs nothing: the inflater accepts any window
//! up to 32 KiB, so the answer never restricts it.
//!
//! The inflation bound: [`inflate`] never holds more than `max + 1` bytes of output, so a deflate bomb (a few KiB
//! inflating to gigabytes) costs at most `limits.max_message_size` plus one byte before the connection closes 1009.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The extension's name in `Sec-WebSocket-Extensions`.
pub const EXTENSION: &str = "permessage-deflate";

/// What RFC 7692 says every message's deflate stream ends with after a sync flush: removed by the sender, appended
/// back by the receiver.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Output added to the inflation buffer at once (at most; the buffer doubles up to the bound).
const INFLATE_BLOCK: usize = 16 * 1024;

/// The largest window (bits) of RFC 7692, and the one the gateway's deflater and inflater use.
pub const MAX_WINDOW_BITS: u8 = 15;

/// The settings of `[compression]` the hot paths need, copied out of the config once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Messages whose payload is shorter go uncompressed (`compression.min_size`).
    pub min_size: usize,
    /// zlib level 1 (fastest) to 9 (`compression.level`).
    pub level: u8,
}

/// An accepted offer: what the connection keeps (one byte) and what the 101 answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreement {
    /// The window the client allows the gateway's frames (`server_max_window_bits`, 15 when it set none).
    pub server_window_bits: u8,
    /// Whether the client named `server_max_window_bits` (the answer must then repeat it).
    pub server_window_asked: bool,
}

impl Agreement {
    /// The `Sec-WebSocket-Extensions` value of the 101.
    pub fn response(&self) -> String {
        let mut r = format!("{EXTENSION}; server_no_context_takeover; client_no_context_takeover");
        if self.server_window_asked {
            r.push_str(&format!("; server_max_window_bits={}", self.server_window_bits));
        }
        r
    }

    /// The longest plain payload this client may be sent compressed (see the module doc on window bits).
    pub fn max_compressed_plain(&self) -> usize {
        if self.server_window_bits >= MAX_WINDOW_BITS {
            usize::MAX
        } else {
            1usize << self.server_window_bits
        }
    }
}

/// The first acceptable `permessage-deflate` offer among the `Sec-WebSocket-Extensions` header values (in order, as
/// RFC 7692 section 5 asks), or `None` when there is none. An offer with an unknown parameter, a duplicate one, or a
/// value out of RFC 7692's range is declined (the next offer is tried); so is every offer from a user agent known to
/// break (`user_agent`, see [`broken_user_agent`]).
pub fn negotiate<'a>(values: impl IntoIterator<Item = &'a str>, user_agent: Option<&str>) -> Option<Agreement> {
    if user_agent.is_some_and(broken_user_agent) {
        return None;
    }
    values.into_iter().flat_map(|v| v.split(',')).find_map(parse_offer)
}

/// One offer (`name; param; param=value`), if it is an acceptable `permessage-deflate` offer.
fn parse_offer(offer: &str) -> Option<Agreement> {
    let mut parts = offer.split(';');
    if !parts.next()?.trim().eq_ignore_ascii_case(EXTENSION) {
        return None;
    }
    let (mut server_nct, mut client_nct) = (false, false);
    let mut server_bits: Option<u8> = None;
    let mut client_bits: Option<Option<u8>> = None;
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(unquote(v.trim())?)),
            None => (param.trim(), None),
        };
        match (name.to_ascii_lowercase().as_str(), value) {
            ("server_no_context_takeover", None) if !server_nct => server_nct = true,
            ("client_no_context_takeover", None) if !client_nct => client_nct = true,
            ("server_max_window_bits", Some(v)) if server_bits.is_none() => server_bits = Some(window_bits(v)?),
            ("client_max_window_bits", None) if client_bits.is_none() => client_bits = Some(None),
            ("client_max_window_bits", Some(v)) if client_bits.is_none() => client_bits = Some(Some(window_bits(v)?)),
            // Unknown, duplicated, or a value where none belongs (or none where one must be): RFC 7692 section 7
            // says to decline this offer.
            _ => return None,
        }
    }
    Some(Agreement {
        server_window_bits: server_bits.unwrap_or(MAX_WINDOW_BITS),
        server_window_asked: server_bits.is_some(),
    })
}

/// A parameter value without its quotes (RFC 6455 allows a quoted-string); `None` for a malformed quote.
fn unquote(v: &str) -> Option<&str> {
    match v.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"').filter(|inner| !inner.contains('"')),
        None => (!v.contains('"')).then_some(v),
    }
}

/// A window-bits value: a decimal from 8 to 15 without leading zeros (RFC 7692 section 7.1.2).
fn window_bits(v: &str) -> Option<u8> {
    if v.starts_with('0') || v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) || v.len() > 2 {
        return None;
    }
    v.parse::<u8>().ok().filter(|b| (8..=15).contains(b))
}

/// Safari 15.0 to 15.3 offers permessage-deflate and then fails to inflate (WebKit bug 228296, fixed in 15.4); like
/// uWebSockets, the gateway declines the offer for them. Their user agents read `... Version/15.N[.P] ... Safari/...`
/// with N at most 3 (Chrome on iOS says `CriOS/`, not `Version/`).
pub fn broken_user_agent(ua: &str) -> bool {
    let Some(at) = ua.find(" Version/15.") else {
        return false;
    };
    let rest = &ua[at + " Version/15.".len()..];
    let end = rest.find(' ').unwrap_or(rest.len());
    let version = &rest[..end];
    let minor = version.split('.').next().unwrap_or("");
    let minor_ok = !minor.is_empty() && minor.bytes().all(|b| b.is_ascii_digit());
    minor_ok && minor.parse::<u32>().is_ok_and(|m| m <= 3) && rest[end..].contains(" Safari/")
}

thread_local! {
    /// This worker's deflater (raw deflate, 32 KiB window), reset before every message; made at first use with the
    /// level it was asked for, remade if another level is asked (only tests do).
    static DEFLATER: RefCell<Option<(u8, Compress)>> = const { RefCell::new(None) };
    /// This worker's inflater (raw deflate, 32 KiB window), reset before every message.
    static INFLATER: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

/// Appends `payload` compressed as one permessage-deflate message (raw deflate, sync flush, the 4-byte tail removed)
/// to `out`. Uses this thread's deflater, reset first: nothing of one message reaches another.
pub fn compress(payload: &[u8], level: u8, out: &mut Vec<u8>) {
    DEFLATER.with_borrow_mut(|slot| {
        let d = match slot {
            Some((l, d)) if *l == level => {
                d.reset();
                d
            }
            _ => {
                &mut slot
                    .insert((level, Compress::new(Compression::new(u32::from(level)), false)))
                    .1
            }
        };
        let start = out.len();
        // Deflate adds at most 5 bytes per 16 KiB stored block, plus the flush: rarely more than this.
        out.reserve(payload.len() + payload.len() / 1024 + 16);
        let mut consumed = 0usize;
        loop {
            if out.len() == out.capacity() {
                out.reserve(64 + payload.len() / 8);
            }
            let before = d.total_in();
            let status = d.compress_vec(&payload[consumed..], out, FlushCompress::Sync);
            consumed += (d.total_in() - before) as usize;
            // Done once all input is in and the flush fit (space left in the buffer).
            if status.is_err() || (consumed == payload.len() && out.len() < out.capacity()) {
                break;
            }
        }
        if out[start..].ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
    });
}

/// Why a compressed client message could not be inflated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates to more than the bound (`limits.max_message_size`): close 1009.
    #[error("inflated message over limits.max_message_size ({max} bytes)")]
    TooBig {
        /// The bound.
        max: usize,
    },
    /// Not a valid deflate stream: close 1007.
    #[error("invalid compressed data")]
    Invalid,
}

/// Inflates one permessage-deflate message (its tail appended back), holding at most `max + 1` bytes of output:
/// more is [`InflateError::TooBig`] at once. Uses this thread's inflater, reset first.
pub fn inflate(data: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
    INFLATER.with_borrow_mut(|slot| {
        let d = slot.get_or_insert_with(|| Decompress::new(false));
        d.reset(false);
        let mut out = Vec::new();
        for input in [data, &TAIL[..]] {
            if inflate_part(d, input, &mut out, max)? {
                break;
            }
        }
        Ok(out)
    })
}

/// Feeds `input` to `d`; `Ok(true)` when the stream ended (a final block: what follows is ignored).
fn inflate_part(d: &mut Decompress, input: &[u8], out: &mut Vec<u8>, max: usize) -> Result<bool, InflateError> {
    let mut consumed = 0usize;
    loop {
        if out.len() > max {
            return Err(InflateError::TooBig { max });
        }
        if out.len() == out.capacity() {
            // Doubling from one block, never past `max + 1`: one byte over the bound is enough to know.
            let grow = out.len().max(INFLATE_BLOCK).min(max.saturating_add(1) - out.len());
            out.reserve_exact(grow);
        }
        let (in_before, out_before) = (d.total_in(), out.len());
        let status = d
            .decompress_vec(&input[consumed..], out, FlushDecompress::None)
            .map_err(|_| InflateError::Invalid)?;
        consumed += (d.total_in() - in_before) as usize;
        if status == Status::StreamEnd {
            return if out.len() > max {
                Err(InflateError::TooBig { max })
            } else {
                Ok(true)
            };
        }
        let room_left = out.len() < out.capacity();
        if consumed == input.len() && room_left {
            return Ok(false);
        }
        if out.len() == out_before && d.total_in() == in_before && room_left {
            // No progress with input and room left: the stream is stuck (zlib's buffer error).
            return Ok(false);
        }
    }
}

#[cfg(test)]
mod tests;
