//! The rules for room names and subject prefixes, and the room → NATS subject mapping: one leaf module, used by the
//! protocol parser (what a client may name), the config (prefixes, personal-room templates) and the rooms.

/// Longest room name, in bytes (all allowed characters are ASCII).
pub const MAX_ROOM_LEN: usize = 128;

/// Whether a room name is in the safe set: 1 to 128 bytes of `A-Z a-z 0-9 _ - : @ = +`.
///
/// Each of these is an ordinary character inside one NATS subject token: none is a wildcard (`*`, `>`), a token
/// separator (`.`), whitespace or a control character, and `$` (system subjects) is excluded. Because the room is one
/// token appended to a fixed prefix, the mapping room → subject is one-to-one.
pub fn valid_room(room: &str) -> bool {
    !room.is_empty()
        && room.len() <= MAX_ROOM_LEN
        && room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':' | b'@' | b'=' | b'+'))
}

/// Longest RPC method name, in bytes.
pub const MAX_METHOD_LEN: usize = 128;

/// Whether an RPC method name is 1 to 128 bytes of room-name tokens separated by single dots (`orders.create`): no
/// empty token, wildcard, `$` or whitespace, so `<prefix>.<method>` is a plain subject.
pub fn valid_method(method: &str) -> bool {
    !method.is_empty() && method.len() <= MAX_METHOD_LEN && method.split('.').all(valid_room)
}

/// Whether a configured subject prefix is dot-separated non-empty tokens of `[A-Za-z0-9_-]`.
pub fn valid_subject_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix
            .split('.')
            .all(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
}

/// Whether two subject prefixes overlap: equal, or one is a token-wise prefix of the other (`a` and `a.b` do, `a`
/// and `ab` do not).
pub fn prefixes_overlap(a: &str, b: &str) -> bool {
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    long == short || long.strip_prefix(short).is_some_and(|rest| rest.starts_with('.'))
}

/// The NATS subject of a (valid) room.
pub fn room_subject(prefix: &str, room: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + 1 + room.len());
    s.push_str(prefix);
    s.push('.');
    s.push_str(room);
    s
}
