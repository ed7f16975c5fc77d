//! The seam of a history room's join: the member's live frames are held ([`Hold`]) while its join reads the stream,
//! so that what the join read goes out first, and nothing is sent twice or skipped.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::frame::Frame;

/// Live frames of one member held while its join reads the stream, so that what it reads goes out first and nothing
/// is sent twice or skipped at the seam. Bounded by `history.max_held`: past it the frames are dropped and the hold
/// says so, and the join reads the stream again instead.
#[derive(Debug)]
pub struct Hold {
    state: Mutex<HoldState>,
    /// The room's last fanned-out sequence when the member was registered (under the room's lock): every message up
    /// to it went out before the member was there, every later one is offered to this hold. The exact seam on this
    /// gateway, whatever replica answers the join's own read.
    floor: std::sync::atomic::AtomicU64,
    /// Set (under `state`'s lock) once released: fan-out then skips the lock, so a history room's members cost no
    /// more than others on the hot path after their join.
    released: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct HoldState {
    holding: bool,
    /// (seq, previous seq of the room from `Nats-Last-Sequence`, frame), in arrival order.
    frames: std::collections::VecDeque<(u64, u64, Frame)>,
    max: usize,
    overflowed: bool,
}

/// Why [`Hold::release`] did not release: the caller must read the stream up to `up_to` and try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatchUp {
    /// Read the stream up to here (0: up to its current last message).
    pub up_to: u64,
}

impl Hold {
    /// A holding hold of at most `max` frames.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(HoldState {
                holding: true,
                frames: std::collections::VecDeque::new(),
                max,
                overflowed: false,
            }),
            floor: std::sync::atomic::AtomicU64::new(0),
            released: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The room's last fanned-out sequence when the member joined (see the field).
    pub fn floor(&self) -> u64 {
        self.floor.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(super) fn set_floor(&self, seq: u64) {
        self.floor.store(seq, std::sync::atomic::Ordering::Release);
    }

    /// Takes a live frame if still holding (true); false once released (the caller queues it as usual).
    pub(super) fn offer(&self, seq: u64, prev: u64, frame: &Frame) -> bool {
        if self.released.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        let mut s = self.state.lock();
        if !s.holding {
            return false;
        }
        if s.frames.len() >= s.max {
            s.overflowed = true;
            s.frames.clear();
        } else if !s.overflowed {
            s.frames.push_back((seq, prev, frame.clone()));
        }
        true
    }

    /// Ends the hold once the stream was read up to `after`: queues (through `push`, under the hold's lock, so a
    /// concurrent fan-out cannot overtake them) every held frame newer than `after`, then lets live frames through.
    /// Refuses with [`CatchUp`] when frames were dropped (overflow) or the first held frame says its room had a
    /// message after `after` that was not held (`Nats-Last-Sequence`, e.g. a replica that answered with an older
    /// last sequence): then the hold keeps holding, empty, and the caller reads the stream again.
    pub fn release(&self, after: u64, mut push: impl FnMut(Frame)) -> Result<(), CatchUp> {
        let mut s = self.state.lock();
        if s.overflowed {
            s.overflowed = false;
            s.frames.clear();
            return Err(CatchUp { up_to: 0 });
        }
        let first_new = s.frames.iter().find(|(seq, _, _)| *seq > after);
        if let Some(&(_, prev, _)) = first_new
            && prev > after
        {
            // Messages (after, prev] were stored before the hold saw anything of them: read them first.
            s.frames.retain(|(q, _, _)| *q > prev);
            return Err(CatchUp { up_to: prev });
        }
        for (seq, _, frame) in s.frames.drain(..) {
            if seq > after {
                push(frame);
            }
        }
        s.holding = false;
        s.frames = std::collections::VecDeque::new();
        self.released.store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Stops holding, queueing everything still held (a join that could not read the stream; its client was told
    /// it got no recovery).
    pub fn release_all(&self, mut push: impl FnMut(Frame)) {
        let mut s = self.state.lock();
        for (_, _, frame) in s.frames.drain(..) {
            push(frame);
        }
        s.overflowed = false;
        s.holding = false;
        s.frames = std::collections::VecDeque::new();
        self.released.store(true, std::sync::atomic::Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    //! The seam of a history join against a plain model: whatever the interleaving of live messages with the reads,
    //! and however small the hold, the member gets every message after its recovery point exactly once, in order.
    use proptest::prelude::*;

    use super::*;

    fn frame(seq: u64) -> Frame {
        Frame::text(seq.to_string())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn a_join_gets_every_message_after_its_point_once_in_order(
            gaps in proptest::collection::vec(1u64..4, 1..60),
            registered_at in 0usize..60,
            since_back in 0usize..60,
            lag in 0usize..5,
            arrivals in proptest::collection::vec(0usize..4, 0..80),
            max_held in 1usize..8,
        ) {
            // The room's stream: increasing, not contiguous.
            let mut seqs = Vec::new();
            let mut s = 0;
            for g in gaps { s += g; seqs.push(s); }
            let n = seqs.len();
            let registered = registered_at.min(n);               // messages before this were never held
            let since_idx = registered.saturating_sub(since_back); // the client has seqs[..since_idx]
            let since = if since_idx == 0 { 0 } else { seqs[since_idx - 1] };
            let stream = |upto: usize| seqs[..upto].to_vec();
            let mut published = registered; // messages stored (and republished) so far
            let hold = Hold::new(max_held);
            hold.set_floor(if registered == 0 { 0 } else { seqs[registered - 1] });
            let mut out: Vec<u64> = Vec::new();
            let mut arrivals = arrivals.into_iter();
            // Live messages arriving at some step: offered to the hold (or, once released, queued directly).
            let arrive = |published: &mut usize, out: &mut Vec<u64>, k: usize| {
                for _ in 0..k {
                    if *published >= n { break; }
                    let seq = seqs[*published];
                    let prev = if *published == 0 { 0 } else { seqs[*published - 1] };
                    if !hold.offer(seq, prev, &frame(seq)) { out.push(seq); }
                    *published += 1;
                }
            };
            arrive(&mut published, &mut out, arrivals.next().unwrap_or(0));
            // The join reads the room's last sequence, maybe from a replica `lag` messages behind.
            let stale_idx = published.saturating_sub(lag).max(since_idx);
            let stale = if stale_idx == 0 { 0 } else { seqs[stale_idx - 1] };
            // As the connection does: never below what went out before the member joined.
            let last = stale.max(hold.floor());
            let last_idx = seqs.iter().take_while(|&&q| q <= last).count();
            arrive(&mut published, &mut out, arrivals.next().unwrap_or(0));
            // Replay (since, last].
            out.extend(stream(last_idx).into_iter().filter(|&q| q > since));
            arrive(&mut published, &mut out, arrivals.next().unwrap_or(0));
            // Release, catching up as the connection does (without its limit of three rounds).
            let mut after = last;
            loop {
                let mut pushed = Vec::new();
                match hold.release(after, |f| pushed.push(f.as_text().parse::<u64>().unwrap())) {
                    Ok(()) => { out.extend(pushed); break; }
                    Err(CatchUp { up_to }) => {
                        let up_to = if up_to == 0 { seqs[..published].last().copied().unwrap_or(0) } else { up_to };
                        out.extend(stream(published).into_iter().filter(|&q| q > after && q <= up_to));
                        after = after.max(up_to);
                        arrive(&mut published, &mut out, arrivals.next().unwrap_or(0));
                    }
                }
            }
            arrive(&mut published, &mut out, n);
            let want: Vec<u64> = seqs.iter().copied().filter(|&q| q > since).collect();
            prop_assert_eq!(out, want);
        }
    }
}
