//! Negotiation parsing (edge cases and a property), the compression round trip and the inflation bound.

use proptest::prelude::*;

use super::*;

fn offer(values: &[&str]) -> Option<Agreement> {
    negotiate(values.iter().copied(), None)
}

const PLAIN: Agreement = Agreement {
    server_window_bits: 15,
    server_window_asked: false,
};

#[test]
fn browsers_offers_are_accepted() {
    // Chromium and Firefox.
    assert_eq!(offer(&["permessage-deflate; client_max_window_bits"]), Some(PLAIN));
    assert_eq!(offer(&["permessage-deflate"]), Some(PLAIN));
    assert_eq!(
        PLAIN.response(),
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    );
    assert_eq!(offer(&[]), None, "no offer, no extension");
    assert_eq!(offer(&["x-webkit-deflate-frame"]), None);
    assert_eq!(offer(&["PerMessage-Deflate ;Client_Max_Window_Bits=10"]), Some(PLAIN));
}

#[test]
fn every_parameter_of_rfc_7692() {
    let a = offer(&[
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10; \
         client_max_window_bits=9",
    ])
    .expect("accepted");
    assert_eq!((a.server_window_bits, a.server_window_asked), (10, true));
    assert_eq!(
        a.response(),
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10"
    );
    assert_eq!(a.max_compressed_plain(), 1024);
    assert_eq!(PLAIN.max_compressed_plain(), usize::MAX);
    let quoted = offer(&["permessage-deflate; server_max_window_bits=\"12\""]).expect("quoted value");
    assert_eq!(quoted.server_window_bits, 12);
    let fifteen = offer(&["permessage-deflate; server_max_window_bits=15"]).expect("15");
    assert!(
        fifteen.response().ends_with("; server_max_window_bits=15"),
        "repeated when asked"
    );
}

#[test]
fn malformed_and_duplicate_parameters_decline_the_offer() {
    for bad in [
        "permessage-deflate; server_max_window_bits",
        "permessage-deflate; server_max_window_bits=7",
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; server_max_window_bits=010",
        "permessage-deflate; server_max_window_bits=+9",
        "permessage-deflate; server_max_window_bits=",
        "permessage-deflate; server_max_window_bits=9; server_max_window_bits=9",
        "permessage-deflate; client_max_window_bits=0",
        "permessage-deflate; client_max_window_bits; client_max_window_bits",
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        "permessage-deflate; client_no_context_takeover=1",
        "permessage-deflate; server_no_context_takeover=\"\"",
        "permessage-deflate; mystery",
        "permessage-deflate; server_max_window_bits=\"9",
        "permessage-deflate; server_max_window_bits=9\"",
        "permessage-deflate; server_max_window_bits=\"9\"\"",
        "permessage-deflate;; client_max_window_bits",
        "permessage-deflate x",
    ] {
        assert_eq!(offer(&[bad]), None, "{bad:?} must be declined");
    }
}

#[test]
fn the_first_acceptable_offer_wins() {
    let a = offer(&["permessage-deflate; mystery, permessage-deflate; server_max_window_bits=11, permessage-deflate"]);
    assert_eq!(a.map(|a| a.server_window_bits), Some(11));
    // Across header lines too, in order.
    let b = offer(&[
        "foo; bar=1",
        "permessage-deflate; server_max_window_bits=99",
        "permessage-deflate",
    ]);
    assert_eq!(b, Some(PLAIN));
}

#[test]
fn safari_15_0_to_15_3_is_declined() {
    let ua = |v: &str| {
        format!(
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/{v} \
             Safari/605.1.15"
        )
    };
    for v in ["15.0", "15.1", "15.2", "15.3", "15.3.1"] {
        assert!(broken_user_agent(&ua(v)), "{v}");
        assert_eq!(negotiate(["permessage-deflate"], Some(&ua(v))), None, "{v}");
    }
    for v in ["15.4", "15.6.1", "16.0", "14.1.2", "15.x"] {
        assert!(!broken_user_agent(&ua(v)), "{v}");
    }
    let chrome = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0 Safari/537.36";
    assert!(!broken_user_agent(chrome));
    assert!(!broken_user_agent("Version/15.1"), "not Safari");
    assert_eq!(negotiate(["permessage-deflate"], Some(chrome)), Some(PLAIN));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever the header says, negotiation answers without panicking, and an accepted offer's answer is itself
    /// an acceptable offer naming the same window.
    #[test]
    fn negotiation_never_panics_and_answers_consistently(
        parts in proptest::collection::vec(
            prop_oneof![
                Just("permessage-deflate".to_string()),
                Just(";".to_string()),
                Just(",".to_string()),
                Just(" ".to_string()),
                Just("=".to_string()),
                Just("\"".to_string()),
                Just("server_max_window_bits".to_string()),
                Just("client_max_window_bits".to_string()),
                Just("server_no_context_takeover".to_string()),
                Just("client_no_context_takeover".to_string()),
                (0u32..20).prop_map(|n| n.to_string()),
                "[ -~]{0,4}",
            ],
            0..16,
        )
    ) {
        let header = parts.concat();
        if let Some(a) = offer(&[&header]) {
            prop_assert!((8..=15).contains(&a.server_window_bits));
            let again = offer(&[&a.response()]);
            prop_assert_eq!(again.map(|b| b.server_window_bits), Some(a.server_window_bits));
        }
    }

    /// What [`compress`] makes, [`inflate`] gives back, at every level.
    #[test]
    fn compress_then_inflate_is_the_identity(data in proptest::collection::vec(0u8..4, 0..3000), level in 1u8..=9) {
        let mut out = Vec::new();
        compress(&data, level, &mut out);
        prop_assert!(!out.ends_with(&TAIL) || out.len() < TAIL.len());
        prop_assert_eq!(inflate(&out, data.len()), Ok(data.clone()));
    }
}

#[test]
fn json_compresses_to_about_half_and_back() {
    let json: String = (0..6)
        .map(|i| {
            format!(
                r#"{{"user":"user-{i}","text":"hello there, this is message {i} of the chat","ts":{}}}"#,
                1_700_000_000 + i
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    let mut out = Vec::new();
    compress(json.as_bytes(), 1, &mut out);
    assert!(out.len() < json.len() * 2 / 3, "{} of {}", out.len(), json.len());
    assert_eq!(inflate(&out, 1 << 20).expect("inflate"), json.as_bytes());
    // The deflater is reset per message: the same input compresses to the same bytes again.
    let mut again = Vec::new();
    compress(json.as_bytes(), 1, &mut again);
    assert_eq!(out, again);
}

#[test]
fn a_bomb_stops_one_byte_over_the_bound() {
    // 64 MiB of zeros compress to ~64 KiB; the bound is 64 KiB.
    let bomb = {
        let mut c = Compress::new(Compression::best(), false);
        let zeros = vec![0u8; 64 << 20];
        let mut out = Vec::with_capacity(1 << 20);
        c.compress_vec(&zeros, &mut out, FlushCompress::Sync).expect("compress");
        out
    };
    assert!(bomb.len() < 256 * 1024, "{}", bomb.len());
    let max = 64 * 1024;
    assert_eq!(inflate(&bomb, max), Err(InflateError::TooBig { max }));
    // Exactly at the bound is fine; one byte over is not.
    let mut exact = Vec::new();
    compress(&vec![7u8; max], 1, &mut exact);
    assert_eq!(inflate(&exact, max).map(|v| v.len()), Ok(max));
    let mut over = Vec::new();
    compress(&vec![7u8; max + 1], 1, &mut over);
    assert_eq!(inflate(&over, max), Err(InflateError::TooBig { max }));
}

#[test]
fn the_inflation_buffer_never_grows_past_the_bound() {
    // Drive the same loop as `inflate`, watching the buffer's capacity.
    let mut bomb = Vec::new();
    compress(&vec![0u8; 8 << 20], 9, &mut bomb);
    let max = 100_000;
    let mut d = Decompress::new(false);
    let mut out = Vec::new();
    assert_eq!(
        inflate_part(&mut d, &bomb, &mut out, max),
        Err(InflateError::TooBig { max })
    );
    assert!(out.capacity() <= max + 1, "capacity {}", out.capacity());
}

#[test]
fn empty_messages_final_blocks_and_garbage() {
    // RFC 7692 7.2.3.6: an empty message may be sent as a single 0x00 byte; or as nothing at all.
    assert_eq!(inflate(&[0x00], 10), Ok(vec![]));
    assert_eq!(inflate(&[], 10), Ok(vec![]));
    let mut empty = Vec::new();
    compress(b"", 1, &mut empty);
    assert_eq!(inflate(&empty, 10), Ok(vec![]));
    // A sender that ends the message with a final block (BFINAL) instead of a sync flush.
    let mut c = Compress::new(Compression::default(), false);
    let mut fin = Vec::with_capacity(256);
    c.compress_vec(b"hello hello hello", &mut fin, FlushCompress::Finish)
        .expect("compress");
    assert_eq!(inflate(&fin, 100).as_deref(), Ok(&b"hello hello hello"[..]));
    // Not deflate at all (reserved block type 3).
    assert_eq!(inflate(&[0xff, 0xff, 0xff], 100), Err(InflateError::Invalid));
    // The next message inflates fine after an invalid one: the inflater is reset.
    assert_eq!(inflate(&fin, 100).as_deref(), Ok(&b"hello hello hello"[..]));
}

/// What compressing a room message costs, in thread CPU time (so other processes on the machine do not count): the
/// figure behind BENCHMARKS.md's "compression per delivery" (divide by the room's members). Chat-like JSON of 200 to
/// 800 bytes, as `roomwire-bench --payload-kind chat` publishes. Run with
/// `cargo test --lib deflate::tests::compression_cost -- --ignored --nocapture` (miniz_oxide is optimised even in
/// dev builds, see Cargo.toml).
#[test]
#[ignore = "a measurement, not a check"]
fn compression_cost() {
    fn thread_cpu_ns() -> u64 {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid timespec for the duration of the call.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }
    let words = [
        "the", "to", "and", "meeting", "deploy", "today", "release", "review", "please", "thanks", "ok", "lunch",
        "build", "fixed", "issue", "ticket", "customer", "call", "later", "done", "merged", "branch", "test", "green",
    ];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let messages: Vec<String> = (0..2000)
        .map(|i| {
            let target = 200 + (next() % 601) as usize;
            let mut m = format!(
                r#"{{"op":"message","room":"r0","data":{{"ts":1764941234567890123,"id":"m{i}","user":{{"id":"u{}","name":"user-{}"}},"kind":"chat","text":""#,
                next() % 10_000,
                next() % 500
            );
            while m.len() + 20 < target {
                m.push_str(words[(next() % words.len() as u64) as usize]);
                m.push(' ');
            }
            m.push_str(r#"","reactions":[]}}"#);
            m
        })
        .collect();
    let plain: usize = messages.iter().map(String::len).sum();
    for level in [1u8, 6] {
        let mut out = Vec::new();
        let mut compressed = 0;
        let t0 = thread_cpu_ns();
        for m in &messages {
            out.clear();
            compress(m.as_bytes(), level, &mut out);
            compressed += out.len();
        }
        let per = (thread_cpu_ns() - t0) as f64 / messages.len() as f64 / 1000.0;
        let t1 = thread_cpu_ns();
        let mut one = Vec::new();
        for m in &messages {
            one.clear();
            compress(m.as_bytes(), level, &mut one);
            let _ = inflate(&one, 1 << 20).expect("inflate");
        }
        let both = (thread_cpu_ns() - t1) as f64 / messages.len() as f64 / 1000.0;
        eprintln!(
            "level {level}: {:.1} µs to compress a message (mean {} → {} bytes); compress + inflate {:.1} µs; per delivery \
             in a room of 1,000: {:.4} µs",
            per,
            plain / messages.len(),
            compressed / messages.len(),
            both,
            per / 1000.0
        );
    }
}
