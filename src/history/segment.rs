//! A [`Segment`]: every stored message of one room subject in a range, as one read found them, and whether the
//! history it holds is whole. A range read produces a segment, the cache keeps it, and callers take slices of it.
//!
//! Truncation is decided conservatively from a *witness*: a range read of `(after, up_to]` starts at `after` itself,
//! and the history after `after` is whole only if message `after` is still stored under the same subject. Limits
//! (`max_msgs_per_subject`, `max_age`) remove a subject's messages oldest first, so while `after` is stored nothing
//! newer of that subject was removed. If `after` is gone, or is a message of another subject, the answer is
//! [`ReplayError::Truncated`]. `after == 0` (the room was empty when the client last knew it) has no witness: it is
//! trusted unless the room holds `max_messages_per_room` messages up to `up_to` (then the per-room limit may have
//! removed some). A room that was empty, then filled and aged out entirely past `max_age`, cannot be told apart.

use std::sync::Arc;

use super::{
    direct::Read,
    stored::{ReplayError, Stored},
};

/// Every stored message of one subject in `(lo, hi]`, as read at `at`. Complete: no message of the subject in that
/// range was missing from the store at read time.
#[derive(Debug)]
pub(super) struct Segment {
    pub(super) lo: u64,
    pub(super) hi: u64,
    /// Whether the history after `lo` is whole: message `lo` was stored under this subject at read time (or, for
    /// `lo == 0`, the room held fewer than `max_messages_per_room` messages).
    pub(super) lo_ok: bool,
    /// Set when an extension found its witness gone: a slice with `after <= cut` is Truncated.
    pub(super) cut: Option<u64>,
    /// Ascending by seq, all in `(lo, hi]`.
    pub(super) msgs: Arc<[Stored]>,
    /// Payload + header bytes, charged to the cache.
    pub(super) bytes: usize,
}

impl Segment {
    /// From the messages read from `witness` on (the message `witness` itself included when stored).
    pub(super) fn assemble(witness: u64, hi: u64, read: Vec<Read>, max_per_room: u64) -> Segment {
        let lo_ok = if witness > 0 {
            read.first().is_some_and(|m| m.seq == witness)
        } else {
            max_per_room == 0 || (read.iter().filter(|m| m.seq <= hi).count() as u64) < max_per_room
        };
        let msgs: Vec<Stored> = read
            .into_iter()
            .filter(|m| m.seq > witness && m.seq <= hi)
            .map(|m| m.stored)
            .collect();
        let bytes = msgs.iter().map(stored_bytes).sum();
        Segment {
            lo: witness,
            hi,
            lo_ok,
            cut: None,
            msgs: Arc::from(msgs),
            bytes,
        }
    }

    /// `base` followed by an extension read from `ext.lo` (the last message of `base`, or its `lo`). When the
    /// extension's witness is gone, the history up to it is cut: only slices after it stay whole.
    pub(super) fn extend(base: &Segment, ext: Segment) -> Segment {
        let msgs: Vec<Stored> = base.msgs.iter().chain(ext.msgs.iter()).cloned().collect();
        Segment {
            lo: base.lo,
            hi: ext.hi,
            lo_ok: base.lo_ok,
            cut: if ext.lo_ok { base.cut } else { Some(ext.lo) },
            msgs: Arc::from(msgs),
            bytes: base.bytes + ext.bytes,
        }
    }

    /// Where an extension of this segment reads from: its last message (a witness that nothing newer was removed),
    /// or its `lo` when it holds none.
    pub(super) fn witness(&self) -> u64 {
        self.msgs.last().map_or(self.lo, |m| m.seq)
    }

    pub(super) fn covers(&self, after: u64, up_to: u64) -> bool {
        self.lo <= after && after <= self.hi && up_to <= self.hi
    }

    /// The messages in `(after, up_to]`: `None` when this segment does not cover the range, Truncated when the
    /// history after `after` may have lost messages (message `after` was not stored under this subject).
    pub(super) fn slice(&self, after: u64, up_to: u64) -> Option<Result<Arc<[Stored]>, ReplayError>> {
        if !self.covers(after, up_to) {
            return None;
        }
        let whole = if self.cut.is_some_and(|c| after <= c) {
            false
        } else if after == self.lo {
            self.lo_ok
        } else {
            self.msgs.binary_search_by_key(&after, |m| m.seq).is_ok()
        };
        if !whole {
            return Some(Err(ReplayError::Truncated));
        }
        let start = self.msgs.partition_point(|m| m.seq <= after);
        let end = self.msgs.partition_point(|m| m.seq <= up_to);
        if start == 0 && end == self.msgs.len() {
            return Some(Ok(self.msgs.clone()));
        }
        Some(Ok(Arc::from(&self.msgs[start..end])))
    }
}

/// What a stored message is charged to the cache: payload, headers and a fixed overhead.
pub(super) fn stored_bytes(m: &Stored) -> usize {
    let h: usize = m.headers.as_ref().map_or(0, |h| {
        h.iter()
            .map(|(n, vs)| {
                vs.iter()
                    .map(|v| AsRef::<str>::as_ref(n).len() + v.as_str().len() + 4)
                    .sum::<usize>()
            })
            .sum()
    });
    m.payload.len() + h + 64
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bytes::Bytes;
    use proptest::prelude::*;

    use super::*;

    fn seqs(m: &[Stored]) -> Vec<u64> {
        m.iter().map(|m| m.seq).collect()
    }

    /// The store as a plain model: every message ever published (seq -> room 0/1), and what a per-room limit left.
    fn model(rooms: &[u8], limit: usize) -> (BTreeMap<u64, u8>, BTreeMap<u64, u8>) {
        let all: BTreeMap<u64, u8> = rooms.iter().enumerate().map(|(i, r)| (i as u64 + 1, *r)).collect();
        let mut kept = BTreeMap::new();
        for room in 0..2u8 {
            let of: Vec<u64> = all.iter().filter(|(_, r)| **r == room).map(|(s, _)| *s).collect();
            for s in &of[of.len().saturating_sub(limit)..] {
                kept.insert(*s, room);
            }
        }
        (all, kept)
    }

    /// What a read of room 0 from `witness` returns on a store holding `kept`.
    fn read(kept: &BTreeMap<u64, u8>, witness: u64) -> Vec<Read> {
        kept.range(witness..)
            .filter(|(_, r)| **r == 0)
            .map(|(s, _)| Read {
                seq: *s,
                subject: "rooms.0".into(),
                pending: 0,
                stored: Stored {
                    seq: *s,
                    payload: Bytes::new(),
                    headers: None,
                },
            })
            .collect()
    }

    proptest! {
        /// Whatever was removed, a slice of a segment (read once, or read then extended after more publishes and
        /// removals) is either Truncated or exactly every message ever published to the room in (after, up_to]:
        /// never a silent gap, never an extra.
        #[test]
        fn a_slice_is_exact_or_truncated(
            rooms in proptest::collection::vec(0u8..2, 1..40),
            more in proptest::collection::vec(0u8..2, 0..20),
            limit in 1usize..8,
            after in 0u64..60,
            up_to in 0u64..60,
            extend in any::<bool>(),
        ) {
            let (_, kept1) = model(&rooms, limit);
            let hi1 = rooms.len() as u64;
            let after1 = after.min(hi1);
            let mut seg = Segment::assemble(after1, hi1, read(&kept1, after1), limit as u64);
            let mut history = rooms.clone();
            if extend {
                history.extend(&more);
                let (_, kept2) = model(&history, limit);
                let hi2 = history.len() as u64;
                let w = seg.witness();
                seg = Segment::extend(&seg, Segment::assemble(w, hi2, read(&kept2, w), limit as u64));
            }
            let (all, _) = model(&history, limit);
            if let Some(Ok(msgs)) = seg.slice(after, up_to.max(after)) {
                let want: Vec<u64> = all
                    .iter()
                    .filter(|(s, r)| **s > after && **s <= up_to && **r == 0)
                    .map(|(s, _)| *s)
                    .collect();
                prop_assert_eq!(seqs(&msgs), want);
            }
        }
    }
}
