//! The replay cache: the recent [`Segment`] of each room subject, so that clients recovering the same room shortly
//! after one another share one read (a later caller takes a slice, or extends the segment by reading only what is
//! newer). Bounded in bytes (`cache_bytes`) and in rooms (`cache_entries`); an entry expires after `cache_ttl`, and
//! while over a bound the oldest goes first.

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio::time::Instant;

use super::segment::Segment;

/// The recent segments, one per subject, bounded in bytes and entries; entries expire after `ttl`.
pub(super) struct Cache {
    max_bytes: usize,
    max_entries: usize,
    ttl: Duration,
    bytes: usize,
    entries: HashMap<String, (Instant, Arc<Segment>)>,
}

impl Default for Cache {
    fn default() -> Self {
        Cache::new(0, 0, Duration::ZERO)
    }
}

impl Cache {
    pub(super) fn new(max_bytes: usize, max_entries: usize, ttl: Duration) -> Self {
        Cache {
            max_bytes,
            max_entries,
            ttl,
            bytes: 0,
            entries: HashMap::new(),
        }
    }

    pub(super) fn get(&mut self, subject: &str, now: Instant) -> Option<Arc<Segment>> {
        let (at, seg) = self.entries.get(subject)?;
        if now.duration_since(*at) >= self.ttl {
            self.remove(subject);
            return None;
        }
        Some(seg.clone())
    }

    fn remove(&mut self, subject: &str) {
        if let Some((_, seg)) = self.entries.remove(subject) {
            self.bytes -= seg.bytes;
        }
    }

    /// Replaces the subject's segment; then drops expired entries and, while over a bound, the oldest.
    pub(super) fn insert(&mut self, subject: &str, seg: Arc<Segment>, now: Instant) {
        self.remove(subject);
        if seg.bytes > self.max_bytes || self.max_entries == 0 {
            return;
        }
        self.bytes += seg.bytes;
        self.entries.insert(subject.to_string(), (now, seg));
        let ttl = self.ttl;
        let expired: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, (at, _))| now.duration_since(*at) >= ttl)
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            self.remove(&k);
        }
        while self.bytes > self.max_bytes || self.entries.len() > self.max_entries {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use proptest::prelude::*;

    use super::*;
    use crate::history::{segment::stored_bytes, stored::Stored};

    proptest! {
        /// The cache stays within its bounds whatever is inserted.
        #[test]
        fn the_cache_stays_bounded(
            inserts in proptest::collection::vec((0u8..20, 0usize..30, 0u64..10), 1..80),
            max_bytes in 0usize..3000,
            max_entries in 0usize..6,
        ) {
            let mut cache = Cache::new(max_bytes, max_entries, Duration::from_secs(5));
            let t0 = Instant::now();
            for (room, n, dt) in inserts {
                let msgs: Vec<Stored> = (1..=n as u64)
                    .map(|s| Stored { seq: s, payload: Bytes::from(vec![0u8; 10]), headers: None })
                    .collect();
                let bytes = msgs.iter().map(stored_bytes).sum();
                let seg = Segment { lo: 0, hi: n as u64, lo_ok: true, cut: None, msgs: Arc::from(msgs), bytes };
                cache.insert(&format!("rooms.{room}"), Arc::new(seg), t0 + Duration::from_secs(dt));
                prop_assert!(cache.bytes <= max_bytes);
                prop_assert!(cache.entries.len() <= max_entries);
                prop_assert_eq!(cache.bytes, cache.entries.values().map(|(_, s)| s.bytes).sum::<usize>());
            }
        }
    }
}
