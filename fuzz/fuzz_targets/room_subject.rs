//! Fuzz target: room name → NATS subject (`protocol::valid_room`, `protocol::room_subject`).
//!
//! Input: `prefix \0 room_a \0 room_b` (missing parts are empty). For every room the safe set accepts, under the
//! default prefix and under any prefix `valid_subject_prefix` accepts, the subject is exactly the prefix's tokens plus
//! one, no token is or contains a wildcard (`*`, `>`), it is never a `$` (system) subject, it has no whitespace or
//! control character, async-nats accepts it, and stripping the prefix gives the room back. The mapping is one-to-one:
//! two different (prefix, room) pairs never give the same subject.
//!
//! The prefix text doubles as a permission pattern: `RoomPattern` (which decides joins, publishes and room policies)
//! agrees with a plain dynamic-programming matcher on every accepted room.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roomwire::protocol::{MAX_ROOM_LEN, room_subject, valid_room, valid_subject_prefix};
use roomwire::room_pattern::RoomPattern;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == 0);
    let mut next = || String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let (prefix, a, b) = (next(), next(), next());

    let pattern = RoomPattern::new(&prefix);
    for room in [a.as_str(), b.as_str()] {
        if valid_room(room) && prefix.len() <= 256 {
            assert_eq!(
                pattern.matches(room),
                roomwire::room_pattern::model::glob(&prefix, room),
                "pattern {prefix:?}, room {room:?}"
            );
        }
    }

    let mut prefixes = vec!["rooms".to_owned()];
    if valid_subject_prefix(&prefix) {
        prefixes.push(prefix);
    }
    let mut seen: Vec<(String, &str, &str)> = Vec::new();
    for p in &prefixes {
        for room in [a.as_str(), b.as_str()] {
            if !valid_room(room) {
                continue;
            }
            let subject = check_one(p, room);
            for (other, op, oroom) in &seen {
                if *other == subject {
                    assert!(
                        *op == p.as_str() && *oroom == room,
                        "{op}/{oroom} and {p}/{room} both map to {subject}"
                    );
                }
            }
            seen.push((subject, p.as_str(), room));
        }
    }
});

fn check_one(prefix: &str, room: &str) -> String {
    assert!(!room.is_empty() && room.len() <= MAX_ROOM_LEN);
    let subject = room_subject(prefix, room);
    let tokens: Vec<&str> = subject.split('.').collect();
    assert_eq!(
        tokens.len(),
        prefix.split('.').count() + 1,
        "{room:?} adds more than one token: {subject:?}"
    );
    assert_eq!(*tokens.last().expect("non-empty"), room);
    assert_eq!(
        subject.strip_prefix(prefix).and_then(|s| s.strip_prefix('.')),
        Some(room)
    );
    for t in &tokens {
        assert!(!t.is_empty(), "empty token in {subject:?}");
        assert!(!t.contains('*') && !t.contains('>'), "wildcard in {subject:?}");
    }
    assert!(
        !subject.starts_with('$') && !room.contains('$'),
        "system subject {subject:?}"
    );
    assert!(
        subject.chars().all(|c| c.is_ascii_graphic()),
        "whitespace, control or non-ASCII character in {subject:?}"
    );
    assert!(
        async_nats::Subject::validated(&subject).is_ok(),
        "async-nats refuses {subject:?}"
    );
    subject
}
