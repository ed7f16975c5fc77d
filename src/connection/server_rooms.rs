//! Server-side rooms (`docs/protocol.md`, "Server-side rooms"): rooms the token lists (`auth.subs_claim`, and the
//! personal room with `auth.join_personal_room`), joined before the `welcome`, and rooms a backend adds or removes
//! over NATS (`subscribe` / `unsubscribe`, handed to the connection as an `outbox::Directive`).
//!
//! The seam is the same as for a history join (`recovery`): each room's member is registered with a hold, so its
//! live frames wait; the reply that names the room (the `welcome`, or `joined`) is queued first, then the missed
//! messages a recovery replays, then the hold is released. So no room message ever precedes the frame that tells
//! the client it is in the room, and a recovered room has no gap and no duplicate.
//!
//! A room that cannot be joined (an invalid name, too many rooms, a NATS refusal) never fails the connection: it is
//! reported in the `welcome` with its error code (`joined` is simply not sent for a command), and counted
//! (`roomwire_server_room_failures_total`).

use std::sync::Arc;

use super::{Conn, Joined, Via, recovery::HistoryJoin, replies};
use crate::{
    frame::Frame,
    outbox::Directive,
    protocol::{self, ErrorCode, ServerRoom, Since},
    room_quota::QuotaKey,
    rooms::{Hold, Member, Room},
};

/// A server-side room joined, its live frames held until [`Conn::open_server_room`].
struct Entered {
    room: Arc<Room>,
    hold: Arc<Hold>,
    history: Option<HistoryJoin>,
    /// The client asked to recover this room but it keeps no history here.
    unrecoverable: bool,
}

impl Entered {
    fn reply<'a>(&'a self, name: &'a str) -> ServerRoom<'a> {
        let (recovered, position) = match &self.history {
            Some(h) => (h.recovered(), h.position()),
            None => (self.unrecoverable.then_some(false), None),
        };
        ServerRoom::Joined {
            room: name,
            recovered,
            position,
        }
    }
}

impl Conn {
    /// Joins the token's server-side rooms, recovering those `recover` names, then sends the `welcome` listing them,
    /// then lets their messages through. Does nothing (the `welcome` went out at the start) without such rooms.
    pub(super) async fn join_server_rooms(&mut self, recover: Vec<(String, Since)>) {
        if self.identity.subs.is_empty() {
            return;
        }
        let subs = self.identity.subs.clone();
        let mut outcomes: Vec<(String, Result<Entered, ErrorCode>)> = Vec::with_capacity(subs.len());
        for room in subs {
            let since = recover.iter().find(|(r, _)| *r == room).map(|(_, s)| s.clone());
            let entered = self.enter_server_room(&room, since, Via::Token).await;
            if self.cancel.is_cancelled() {
                return;
            }
            outcomes.push((room, entered));
        }
        let replies: Vec<ServerRoom<'_>> = outcomes
            .iter()
            .map(|(name, r)| match r {
                Ok(e) => e.reply(name),
                Err(code) => ServerRoom::Failed {
                    room: name,
                    code: *code,
                },
            })
            .collect();
        let welcome = protocol::welcome_with_rooms(
            &self.conn_id,
            self.gw.id(),
            self.identity.user.as_deref(),
            self.rpc_max_inflight(),
            &replies,
        );
        drop(replies);
        self.send(Frame::text(welcome)).await;
        for (_, entered) in outcomes {
            if let Ok(entered) = entered {
                self.open_server_room(entered).await;
            }
        }
    }

    /// Carries out a room change a backend asked for.
    pub(super) async fn directive(&mut self, directive: Directive) {
        match directive {
            Directive::Join(room) => {
                if let Some(joined) = self.rooms.get_mut(&room)
                    && joined.is_live()
                {
                    // Already in it: it becomes server-side (a `leave` is now refused), nothing else changes.
                    if joined.via == Via::Client {
                        joined.via = Via::Backend;
                    }
                    let reply = ServerRoom::Joined {
                        room: &room,
                        recovered: None,
                        position: None,
                    };
                    return self.send(protocol::joined(&reply)).await;
                }
                match self.enter_server_room(&room, None, Via::Backend).await {
                    Ok(entered) => {
                        self.send(protocol::joined(&entered.reply(&room))).await;
                        self.open_server_room(entered).await;
                    }
                    Err(code) => {
                        tracing::info!(room = %room, code = code.as_str(), "subscribe command: room not joined")
                    }
                }
            }
            Directive::Leave(room) => {
                if self.leave_room(&room).await {
                    self.send(protocol::left(&room, "removed")).await;
                }
            }
        }
    }

    /// Joins `room` as a server-side room with its live frames held, and reads its stream (a history room).
    async fn enter_server_room(&mut self, room: &str, since: Option<Since>, via: Via) -> Result<Entered, ErrorCode> {
        let result = self.try_enter(room, since, via).await;
        if result.is_err() {
            self.gw.metrics().server_room_failures.inc();
        }
        result
    }

    async fn try_enter(&mut self, room: &str, since: Option<Since>, via: Via) -> Result<Entered, ErrorCode> {
        if !protocol::valid_room(room) {
            return Err(ErrorCode::InvalidRoom);
        }
        self.rooms.retain(|_, r| r.is_live());
        if self.rooms.len() >= self.gw.config().rooms.max_rooms_per_connection {
            return Err(ErrorCode::TooManyRooms);
        }
        let history = self.gw.history().filter(|h| h.covers(room));
        // Every server-side room is held, history or not: its frames must not precede the reply naming it.
        let max_held = history.map_or(self.gw.config().limits.max_pending_messages, |h| h.config().max_held);
        let hold = Hold::new(max_held);
        let member = Member {
            id: self.id,
            outbox: self.outbox.clone(),
            key: QuotaKey::for_client(self.identity.user.as_deref(), self.peer),
            hold: Some(hold.clone()),
        };
        let membership = match self.gw.rooms().join(room, member).await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(room, error = %e, "server-side room refused");
                return Err(replies::join_refused(&e).0);
            }
        };
        if !membership.is_live() {
            return Err(ErrorCode::Unavailable);
        }
        let room_arc = membership.room().clone();
        let history_join = match history {
            Some(_) => self.read_history(&room_arc, &hold, since.clone()).await,
            None => None,
        };
        self.rooms.insert(membership.name().clone(), Joined { membership, via });
        self.event("join", Some(room)).await;
        Ok(Entered {
            room: room_arc,
            hold,
            unrecoverable: since.is_some() && history.is_none(),
            history: history_join,
        })
    }

    /// After the reply naming the room: replays what a recovery missed and lets the room's live frames through.
    async fn open_server_room(&self, entered: Entered) {
        let Entered {
            room, hold, history, ..
        } = entered;
        match history {
            Some(join) => self.complete_history(&room, &hold, join).await,
            None => hold.release_all(|f| {
                let _ = self.outbox.push_room(room.name(), f, room.policy());
            }),
        }
    }
}
