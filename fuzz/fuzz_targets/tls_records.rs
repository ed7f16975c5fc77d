//! Fuzz target: the record handling of the public listener's TLS stream (`src/tls_stream.rs`).
//!
//! Input: one byte picking how the socket cuts what arrives (1..=128 bytes per read, or multiples of 256 up to
//! 32 KiB), then the bytes a client sends. A server stream runs its handshake on them and, if that succeeds, reads to
//! the end, writes more than a record and shuts down. It never panics, never polls forever without reading, and
//! never holds more than its documented bounds (`MAX_INCOMING` received bytes, whatever the records claim).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| roomwire::tls_stream::fuzz::records(data));
