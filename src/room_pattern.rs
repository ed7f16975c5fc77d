//! [`RoomPattern`]: a room name with `*` wildcards (`ticker-*`, `team-*-chat`, `*`), as written in
//! `[[rooms.policy]] pattern`, `[auth.anonymous]` and the permission claims of a token. It is split at its `*`s once,
//! when the configuration or the token is read, so a check (once per join, once per publish) is a few
//! `starts_with` / `ends_with` / `find` calls on the room name, not a walk over the pattern. `*` matches any run of
//! characters, including none; every other character matches itself. The tests (and the `room_subject` fuzz target)
//! check it against a plain dynamic-programming matcher.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// A compiled room pattern. Equality and `Debug`/`Display` use the pattern's text.
#[derive(Clone)]
pub struct RoomPattern {
    /// The pattern as written.
    text: Box<str>,
    /// How it matches, decided once.
    matcher: Matcher,
}

#[derive(Clone)]
enum Matcher {
    /// No `*`: the room must equal the text.
    Exact,
    /// `first*middle[0]*...*last`: the room starts with `first`, ends with `last`, and holds each `middle` piece in
    /// order in between (pieces may be empty; `*` alone is `first = last = ""`, no middle).
    Wild {
        first: Box<str>,
        middle: Box<[Box<str>]>,
        last: Box<str>,
    },
}

impl RoomPattern {
    /// Compiles `pattern`.
    pub fn new(pattern: &str) -> Self {
        let matcher = match pattern.split_once('*') {
            None => Matcher::Exact,
            Some((first, rest)) => {
                // `rest` has the text after the first `*`; its last piece is the suffix, the others sit between.
                let mut pieces: Vec<&str> = rest.split('*').collect();
                let last = pieces.pop().unwrap_or_default();
                Matcher::Wild {
                    first: first.into(),
                    middle: pieces.into_iter().filter(|p| !p.is_empty()).map(Into::into).collect(),
                    last: last.into(),
                }
            }
        };
        Self {
            text: pattern.into(),
            matcher,
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `room` matches.
    pub fn matches(&self, room: &str) -> bool {
        match &self.matcher {
            Matcher::Exact => room == &*self.text,
            Matcher::Wild { first, middle, last } => {
                if room.len() < first.len() + last.len() || !room.starts_with(&**first) || !room.ends_with(&**last) {
                    return false;
                }
                // Leftmost match of each piece in turn: taking the earliest place for one piece leaves the most room
                // for the next, so if any placement works this one does.
                let mut between = &room[first.len()..room.len() - last.len()];
                for piece in middle {
                    match between.find(&**piece) {
                        Some(at) => between = &between[at + piece.len()..],
                        None => return false,
                    }
                }
                true
            }
        }
    }
}

impl From<&str> for RoomPattern {
    fn from(pattern: &str) -> Self {
        Self::new(pattern)
    }
}

impl PartialEq for RoomPattern {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for RoomPattern {}

impl fmt::Debug for RoomPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.text, f)
    }
}

impl fmt::Display for RoomPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for RoomPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Ok(Self::new(&text))
    }
}

impl serde::Serialize for RoomPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

/// The plain model `RoomPattern` is checked against, by the property test below and by the `room_subject` fuzz
/// target.
#[cfg(any(test, fuzzing))]
pub mod model {
    /// `*` matches any run of bytes, everything else itself: `m[i][j]` = pattern[..i] matches text[..j].
    pub fn glob(pattern: &str, text: &str) -> bool {
        let (p, t) = (pattern.as_bytes(), text.as_bytes());
        let mut m = vec![vec![false; t.len() + 1]; p.len() + 1];
        m[0][0] = true;
        for i in 1..=p.len() {
            for j in 0..=t.len() {
                m[i][j] = if p[i - 1] == b'*' {
                    m[i - 1][j] || (j > 0 && m[i][j - 1])
                } else {
                    j > 0 && p[i - 1] == t[j - 1] && m[i - 1][j - 1]
                };
            }
        }
        m[p.len()][t.len()]
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    use model::glob as glob_model;

    #[test]
    fn examples() {
        let m = |p: &str, r: &str| RoomPattern::new(p).matches(r);
        assert!(m("*", "anything") && m("*", ""));
        assert!(m("ticker-*", "ticker-btc") && m("ticker-*", "ticker-") && !m("ticker-*", "tick"));
        assert!(m("team-*-chat", "team-42-chat") && !m("team-*-chat", "team-chat"));
        assert!(m("lobby", "lobby") && !m("lobby", "lobby2") && !m("lobby", "lobb"));
        assert!(m("a*b*a", "aba") && !m("a*a", "a"), "first and last may not overlap");
        assert!(m("*x*x*", "xx") && !m("*x*x*", "x"));
        assert!(m("**", "") && m("a**b", "ab"));
        assert_eq!(RoomPattern::new("a*").to_string(), "a*");
        assert_eq!(RoomPattern::from("a*"), RoomPattern::new("a*"));
    }

    proptest! {
        /// Against the plain model, over a small alphabet so that pieces repeat and overlap.
        #[test]
        fn agrees_with_the_model(pattern in "[ab*]{0,8}", room in "[ab]{0,10}") {
            prop_assert_eq!(RoomPattern::new(&pattern).matches(&room), glob_model(&pattern, &room));
        }
    }
}
