//! A connection's history-room work (`docs/history.md`): the join of a history room (its ack carries the stream
//! position; with `since` it replays what the client missed), and the `history` request.
//!
//! The seam of a join: the member was registered with a [`Hold`], so its live frames wait while the stream is read.
//! The ack and the replayed messages are queued first, then the hold is released, dropping held frames the replay
//! already covered. Replayed frames go through the connection's bounded outbox like replies: the connection waits for
//! space (and the connection's cancellation), so a recovery is paced by the client and never grows memory, and a
//! client that stops reading is closed by `write_timeout` as always.

use std::sync::Arc;

use tokio::time::Instant;

use super::{Conn, ending::close_req};
use crate::{
    bridge::HDR_CONN,
    frame::Frame,
    history::{History, ReplayError, Stored},
    protocol::{self, ErrorCode, Since, close},
    rooms::{CatchUp, Hold, Room},
};

/// Times a join reads the stream again because its hold overflowed, before it gives up and closes the connection
/// (the client reconnects and recovers from where it got to).
const MAX_CATCH_UPS: usize = 3;

/// What reading the stream for a join gave.
enum Outcome {
    /// A plain join: the room's position.
    Plain { epoch: Arc<str>, last: u64 },
    /// A recovering join that can be served exactly: the missed messages, oldest first.
    Recovered {
        epoch: Arc<str>,
        last: u64,
        missed: Arc<[Stored]>,
    },
    /// A recovering join that cannot be served; the position when the stream answered.
    NotRecovered {
        position: Option<(Arc<str>, u64)>,
        why: &'static str,
    },
    /// A plain join while the stream does not answer: acked without a position.
    NoPosition { why: &'static str },
}

fn reason(e: &ReplayError) -> &'static str {
    match e {
        ReplayError::Truncated => "messages after `since` were already removed",
        ReplayError::TooMany => "more than history.max_recover messages missed",
        ReplayError::Timeout => "JetStream did not answer in time",
        ReplayError::Unavailable(_) => "JetStream unavailable",
    }
}

/// Reads the room's position and, for `since`, the messages after it (bounded by `history.max_recover` and
/// `history.recover_timeout`, one of `history.max_concurrent_reads` slots).
///
/// The position is the later of the stream's answer and `floor`, the last message this gateway fanned out to the room
/// before the member joined: a replica that lags may answer an older last sequence, and messages that went out
/// before the join were never held, so they must be replayed.
async fn read(h: &History, subject: &str, since: Option<&Since>, floor: u64, deadline: Instant) -> Outcome {
    let fail = |position, why| match since {
        Some(_) => Outcome::NotRecovered { position, why },
        None => Outcome::NoPosition { why },
    };
    let Some(epoch) = h.epoch() else {
        return fail(None, "history stream not set up yet");
    };
    let Some(_slot) = h.read_slot(deadline).await else {
        return fail(None, "too many history reads in flight");
    };
    let last = match h.replayer().last_seq(subject, deadline).await {
        Ok(last) => last.max(floor),
        Err(e) => return fail(None, reason(&e)),
    };
    let Some(since) = since else {
        return Outcome::Plain { epoch, last };
    };
    let position = Some((epoch.clone(), last));
    if since.epoch != *epoch {
        return fail(position, "the stream was recreated (epoch differs)");
    }
    if since.seq > last {
        return fail(position, "`since.seq` is past the room's last message");
    }
    if since.seq == last {
        let missed: Arc<[Stored]> = Arc::from(Vec::new());
        return Outcome::Recovered { epoch, last, missed };
    }
    match h
        .replayer()
        .range(subject, since.seq, last, h.config().max_recover, deadline)
        .await
    {
        Ok(missed) => Outcome::Recovered { epoch, last, missed },
        Err(e) => fail(position, reason(&e)),
    }
}

/// The message frame of a stored message, as live delivery would have built it.
fn frame(room: &str, m: &Stored) -> Frame {
    let from = m.headers.as_ref().and_then(|h| h.get(HDR_CONN)).map(|v| v.as_str());
    protocol::message_frame(room, &m.payload, from, Some(m.seq))
}

/// What reading the stream gave a join, and what is left to do once the join's reply (an ack, the `welcome`, a
/// `joined`) is queued: replay the missed messages, then release the hold.
pub(super) struct HistoryJoin {
    h: Arc<History>,
    outcome: Outcome,
}

impl HistoryJoin {
    /// The answer to a recovery (`since`), if one was asked.
    pub(super) fn recovered(&self) -> Option<bool> {
        match self.outcome {
            Outcome::Recovered { .. } => Some(true),
            Outcome::NotRecovered { .. } => Some(false),
            Outcome::Plain { .. } | Outcome::NoPosition { .. } => None,
        }
    }

    /// The room's position, when the stream answered.
    pub(super) fn position(&self) -> Option<(&str, u64)> {
        match &self.outcome {
            Outcome::Plain { epoch, last } | Outcome::Recovered { epoch, last, .. } => Some((epoch, *last)),
            Outcome::NotRecovered { position, .. } => position.as_ref().map(|(e, l)| (&**e, *l)),
            Outcome::NoPosition { .. } => None,
        }
    }
}

impl Conn {
    /// Acks the join of a history room with its position, replays what `since` missed, then lets live frames
    /// through.
    pub(super) async fn join_history(
        &mut self,
        id: Option<&str>,
        room: &Arc<Room>,
        hold: Arc<Hold>,
        since: Option<Since>,
    ) {
        let Some(join) = self.read_history(room, &hold, since).await else {
            hold.release_all(|f| self.push_live(room, f));
            return self.ack(id).await;
        };
        self.send(protocol::ack_join(id, room.name(), join.recovered(), join.position()))
            .await;
        self.complete_history(room, &hold, join).await;
    }

    /// Reads the stream for the join of a history room whose live frames `hold` keeps: its position and, for
    /// `since`, the missed messages. `None` without history here, or when the connection ends meanwhile.
    pub(super) async fn read_history(
        &self,
        room: &Arc<Room>,
        hold: &Hold,
        since: Option<Since>,
    ) -> Option<HistoryJoin> {
        let h = self.gw.history().cloned()?;
        let subject = protocol::room_subject(&self.gw.config().rooms.subject_prefix, room.name());
        let deadline = Instant::now() + h.config().recover_timeout;
        let outcome = tokio::select! {
            _ = self.cancel.cancelled() => return None,
            o = read(&h, &subject, since.as_ref(), hold.floor(), deadline) => o,
        };
        let metrics = self.gw.metrics();
        match &outcome {
            Outcome::Recovered { missed, .. } => {
                metrics.recoveries.inc(crate::metrics::Recovery::Recovered);
                metrics.replayed.inc_by(missed.len() as u64);
            }
            Outcome::NotRecovered { why, .. } => {
                metrics.recoveries.inc(crate::metrics::Recovery::NotRecovered);
                tracing::debug!(room = %room.name(), why, "recovering join answered recovered:false");
            }
            Outcome::NoPosition { why } => {
                tracing::debug!(room = %room.name(), why, "history join acked without a position");
            }
            Outcome::Plain { .. } => {}
        }
        Some(HistoryJoin { h, outcome })
    }

    /// After the join's reply: replays what was missed, then releases the hold (reading again when it overflowed).
    pub(super) async fn complete_history(&self, room: &Arc<Room>, hold: &Hold, join: HistoryJoin) {
        let HistoryJoin { h, outcome } = join;
        let subject = protocol::room_subject(&self.gw.config().rooms.subject_prefix, room.name());
        match outcome {
            Outcome::Plain { last, .. } => self.release(&h, room, hold, &subject, last).await,
            Outcome::Recovered { last, missed, .. } => {
                for m in missed.iter() {
                    self.send(frame(room.name(), m)).await;
                }
                self.release(&h, room, hold, &subject, last).await;
            }
            Outcome::NotRecovered { .. } | Outcome::NoPosition { .. } => hold.release_all(|f| self.push_live(room, f)),
        }
    }

    /// Queues a held live frame under the room's policy (it is live traffic, only late).
    fn push_live(&self, room: &Room, frame: Frame) {
        let _ = self.outbox.push_room(room.name(), frame, room.policy());
    }

    /// Releases the hold after the stream was read up to `after`; when the hold overflowed (or missed messages),
    /// reads the stream again from `after` and retries, at most [`MAX_CATCH_UPS`] times, then closes the connection
    /// with 1013 (try again later): its client reconnects and recovers from its last message.
    async fn release(&self, h: &History, room: &Arc<Room>, hold: &Hold, subject: &str, mut after: u64) {
        for _ in 0..MAX_CATCH_UPS {
            let CatchUp { up_to } = match hold.release(after, |f| self.push_live(room, f)) {
                Ok(()) => return,
                Err(c) => c,
            };
            let deadline = Instant::now() + h.config().recover_timeout;
            let read = async {
                let up_to = match up_to {
                    0 => h.replayer().last_seq(subject, deadline).await?,
                    n => n,
                };
                let missed = h
                    .replayer()
                    .range(subject, after, up_to, h.config().max_recover, deadline)
                    .await?;
                Ok::<_, ReplayError>((up_to, missed))
            };
            let (up_to, missed) = tokio::select! {
                _ = self.cancel.cancelled() => return,
                r = read => match r {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::info!(room = %room.name(), error = %e, "history catch-up failed");
                        break;
                    }
                },
            };
            for m in missed.iter() {
                self.send(frame(room.name(), m)).await;
            }
            after = after.max(up_to);
        }
        hold.release_all(|_| {});
        self.outbox.close(close_req(
            close::TRY_AGAIN_LATER,
            "history recovery could not catch up",
            true,
        ));
    }

    /// `{"op":"history","room":R,"limit":N}`: the last N (capped) stored messages of a history room the client may
    /// join, newest kept when they exceed `history.max_history_bytes`.
    pub(super) async fn history(&mut self, id: Option<&str>, room: &str, limit: u64) {
        if !self.may_read(id, room).await {
            return;
        }
        let Some(h) = self.gw.history().filter(|h| h.covers(room)).cloned() else {
            return self
                .error(id, ErrorCode::BadRequest, "this room keeps no history")
                .await;
        };
        let limit = usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .min(h.config().max_history_limit);
        let subject = protocol::room_subject(&self.gw.config().rooms.subject_prefix, room);
        let deadline = Instant::now() + h.config().recover_timeout;
        let read = async {
            let epoch = h.epoch().ok_or(ReplayError::Unavailable("stream not set up".into()))?;
            let _slot = h.read_slot(deadline).await.ok_or(ReplayError::Timeout)?;
            let messages = match limit {
                0 => Arc::from(Vec::new()),
                n => h.replayer().last(&subject, n, deadline).await?,
            };
            Ok::<_, ReplayError>((epoch, messages))
        };
        let (epoch, messages) = tokio::select! {
            _ = self.cancel.cancelled() => return,
            r = read => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(room, error = %e, "history request failed");
                    return self.error(id, ErrorCode::Unavailable, reason(&e)).await;
                }
            },
        };
        // Newest first until the byte budget is spent, then back to oldest-first order.
        let budget = h.config().max_history_bytes;
        let mut spent = 0usize;
        let mut kept: Vec<(u64, &[u8], Option<&str>)> = Vec::new();
        for m in messages.iter().rev() {
            spent = spent.saturating_add(m.payload.len());
            if spent > budget {
                break;
            }
            let from = m.headers.as_ref().and_then(|h| h.get(HDR_CONN)).map(|v| v.as_str());
            kept.push((m.seq, &m.payload, from));
        }
        kept.reverse();
        self.send(protocol::history(id, room, &epoch, &kept)).await;
    }
}
