//! Fuzz target: permessage-deflate (`roomwire::deflate`) on what a client controls.
//!
//! Never panics, on any bytes. Inflating arbitrary bytes (a compressed message as tungstenite assembled it) never
//! yields more than the bound, whatever the stream claims; compressing then inflating gives the bytes back; and the
//! negotiation of any header text either declines or answers with an offer it would accept again, with the same window.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roomwire::deflate::{InflateError, compress, inflate, negotiate};

/// A small bound, so that bombs are found quickly.
const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    match inflate(data, MAX) {
        Ok(out) => assert!(out.len() <= MAX, "{} bytes inflated past the bound", out.len()),
        Err(InflateError::TooBig { max }) => assert_eq!(max, MAX),
        Err(InflateError::Invalid) => {}
    }
    let mut compressed = Vec::new();
    compress(data, 1 + data.first().map_or(0, |b| b % 9), &mut compressed);
    assert_eq!(inflate(&compressed, data.len()).as_deref(), Ok(data), "round trip");
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(a) = negotiate([text], None) {
            let again = negotiate([a.response().as_str()], None).expect("the answer is an acceptable offer");
            assert_eq!(again.server_window_bits, a.server_window_bits);
        }
        let _ = negotiate(text.split('\n'), Some(text));
    }
});
