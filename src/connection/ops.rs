//! The client's ops (`docs/protocol.md`): each message read is handled here, on the connection's state, by a
//! handler future that owns it meanwhile (see the parent module). Every wait of a handler (queue space, NATS, a token
//! check, JetStream) also watches the connection's cancellation. What a refusal looks like to the client is decided
//! in one place, [`super::replies`].

use std::sync::Arc;

use bytes::Bytes;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::{Confirm, Conn, Handled, Joined, Via, Work, ending::close_req, replies};
use crate::{
    auth::AuthError,
    protocol::{self, ClientOp, ErrorCode, close},
    room_quota::QuotaKey,
    rooms::{Hold, Member},
};

impl Conn {
    /// Does what a handler was started for.
    pub(super) async fn work(&mut self, work: Work) -> Handled {
        match work {
            Work::Connect(recover) => {
                self.event("connect", None).await;
                self.join_server_rooms(recover).await;
                Handled::Done
            }
            Work::Directive(directive) => {
                self.directive(directive).await;
                Handled::Done
            }
            Work::Message(msg, refused, arrived) => self.on_message(msg, refused, arrived).await,
            Work::Send(frame) => {
                self.send(frame).await;
                Handled::Done
            }
        }
    }

    /// Handles one message.
    async fn on_message(&mut self, msg: Message, refused: bool, arrived: Instant) -> Handled {
        match msg {
            Message::Text(text) => {
                self.gw.metrics().frames_in.inc();
                self.gw.metrics().bytes_in.inc_by(text.len() as u64);
                if refused {
                    let id = protocol::parse_request_with_depth(&text, self.gw.config().limits.max_json_depth)
                        .ok()
                        .and_then(|r| r.id);
                    self.rate_limited(id).await;
                } else {
                    return self.on_text(&text, arrived).await;
                }
            }
            Message::Binary(data) => {
                self.gw.metrics().frames_in.inc();
                self.gw.metrics().bytes_in.inc_by(data.len() as u64);
                if refused {
                    self.rate_limited(None).await;
                } else {
                    self.error(
                        None,
                        ErrorCode::BadRequest,
                        "binary frames are not supported in protocol v1",
                    )
                    .await;
                }
            }
            Message::Close(_) => return Handled::Close(close_req(close::NORMAL, "", true)),
            // Already charged by the meter; tungstenite answers pings itself.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
        Handled::Done
    }

    async fn rate_limited(&self, id: Option<&str>) {
        self.error(id, ErrorCode::RateLimited, "rate limit exceeded; message not processed")
            .await;
    }

    /// Handles one text frame within the rate limits.
    async fn on_text(&mut self, text: &str, arrived: Instant) -> Handled {
        let request = match protocol::parse_request_with_depth(text, self.gw.config().limits.max_json_depth) {
            Ok(r) => r,
            Err(e) => {
                self.error(e.id, ErrorCode::BadRequest, &e.message).await;
                return Handled::Done;
            }
        };
        let id = request.id;
        match request.op {
            ClientOp::Ping => self.send(protocol::pong(id)).await,
            ClientOp::Join { room, since } => self.join(id, &room, since).await,
            ClientOp::History { room, limit } => self.history(id, &room, limit).await,
            ClientOp::Leave { room } => self.leave(id, &room).await,
            ClientOp::Presence { room } => self.presence(id, &room, false).await,
            ClientOp::PresenceStats { room } => self.presence(id, &room, true).await,
            ClientOp::Publish {
                room,
                data,
                echo,
                msg_id,
            } => {
                return match self.publish(id, &room, &data, echo, msg_id.as_deref(), arrived).await {
                    Some(confirm) => Handled::Confirm(confirm),
                    None => Handled::Done,
                };
            }
            ClientOp::Refresh { token } => self.refresh(id, &token).await,
            ClientOp::Rpc {
                method,
                data,
                timeout_ms,
            } => {
                return match self.rpc(id, &method, &data, timeout_ms).await {
                    Some(call) => Handled::Confirm(call),
                    None => Handled::Done,
                };
            }
        }
        Handled::Done
    }

    /// Leaves every joined room (no events); returns their names.
    pub(super) fn leave_all(&mut self) -> Vec<Arc<str>> {
        self.rooms.drain().map(|(name, _joined)| name).collect()
    }

    /// Leaves one joined room: registry, pending gap count, and the `leave` event.
    pub(super) async fn leave_room(&mut self, room: &str) -> bool {
        let Some(joined) = self.rooms.remove(room) else {
            return false;
        };
        joined.membership.leave();
        self.outbox.forget_room(room);
        self.event("leave", Some(room)).await;
        true
    }

    /// Whether the client may read `room` (`history`, `presence`): a valid name it may join; otherwise answers the
    /// error (`invalid_room` or `forbidden`).
    pub(super) async fn may_read(&self, id: Option<&str>, room: &str) -> bool {
        if !self.check_room(id, room).await {
            return false;
        }
        // A server-side room is readable while the connection is in it, whatever the join patterns say.
        let server_side = self.rooms.get(room).is_some_and(|j| j.via != Via::Client);
        if !server_side && !self.identity.may_join(room) {
            self.error(id, ErrorCode::Forbidden, "not allowed to join this room")
                .await;
            return false;
        }
        true
    }

    pub(super) async fn check_room(&self, id: Option<&str>, room: &str) -> bool {
        if protocol::valid_room(room) {
            return true;
        }
        self.error(
            id,
            ErrorCode::InvalidRoom,
            "room names are 1-128 characters of A-Z a-z 0-9 _ - : @ = +",
        )
        .await;
        false
    }

    async fn join(&mut self, id: Option<&str>, room: &str, since: Option<protocol::Since>) {
        if !self.check_room(id, room).await {
            return;
        }
        // Rooms whose subscription ended under us (we were told `left`) are not joined any more: forget them, so a
        // join makes a fresh subscription instead of being acked with nothing behind it.
        self.rooms.retain(|_, r| r.is_live());
        if self.rooms.contains_key(room) {
            return self.ack(id).await;
        }
        if !self.identity.may_join(room) {
            return self
                .error(id, ErrorCode::Forbidden, "not allowed to join this room")
                .await;
        }
        if self.rooms.len() >= self.gw.config().rooms.max_rooms_per_connection {
            return self
                .error(id, ErrorCode::TooManyRooms, "joined the maximum number of rooms")
                .await;
        }
        // A history room's live frames are held until the join has read the stream (`recovery`).
        let hold = self
            .gw
            .history()
            .filter(|h| h.covers(room))
            .map(|h| Hold::new(h.config().max_held));
        let member = Member {
            id: self.id,
            outbox: self.outbox.clone(),
            key: QuotaKey::for_client(self.identity.user.as_deref(), self.peer),
            hold: hold.clone(),
        };
        match self.gw.rooms().join(room, member).await {
            Ok(entry) => {
                match hold {
                    Some(hold) => self.join_history(id, entry.room(), hold, since).await,
                    // No history here: nothing to recover, and the client must know it.
                    None if since.is_some() => self.send(protocol::ack_join(id, room, Some(false), None)).await,
                    None => self.ack(id).await,
                }
                // The server may refuse a new subscription just after the round trip that confirmed it; the room
                // then tells its members `left`, possibly before the ack above. Repeat it after the ack so the last
                // word the client hears about the room is the true one (a client may so hear `left` twice).
                if !entry.is_live() {
                    self.send(protocol::left(room, crate::rooms::ENDED_REASON)).await;
                    return;
                }
                let joined = Joined {
                    membership: entry,
                    via: Via::Client,
                };
                self.rooms.insert(joined.name().clone(), joined);
                self.event("join", Some(room)).await;
            }
            Err(e) => {
                let (code, message) = replies::join_refused(&e);
                tracing::debug!(room, error = %e, "join refused");
                self.error(id, code, message).await
            }
        }
    }

    async fn leave(&mut self, id: Option<&str>, room: &str) {
        if !self.check_room(id, room).await {
            return;
        }
        if self.rooms.get(room).is_some_and(|j| j.via != Via::Client) {
            return self
                .error(
                    id,
                    ErrorCode::Forbidden,
                    "a server-side room cannot be left by the client",
                )
                .await;
        }
        if !self.leave_room(room).await {
            return self.error(id, ErrorCode::NotJoined, "not in this room").await;
        }
        self.ack(id).await;
    }

    /// Hands a publish to NATS in order and returns its confirmation, which the connection polls beside reading. Both
    /// steps are bounded by `nats.publish_timeout` from the frame's arrival, so every reply honours it.
    async fn publish(
        &mut self,
        id: Option<&str>,
        room: &str,
        data: &str,
        echo: bool,
        msg_id: Option<&str>,
        arrived: Instant,
    ) -> Option<Confirm> {
        if !self.check_room(id, room).await {
            return None;
        }
        // A room whose subscription the server ended is no longer joined (its members were told with `left`).
        if !self.rooms.get(room).is_some_and(|r| r.is_live()) {
            self.error(id, ErrorCode::NotJoined, "join the room before publishing to it")
                .await;
            return None;
        }
        if !self.identity.may_publish(room) {
            self.error(id, ErrorCode::Forbidden, "not allowed to publish to this room")
                .await;
            return None;
        }
        let deadline = arrived + self.gw.config().nats.publish_timeout;
        let subject = protocol::room_subject(&self.gw.config().rooms.subject_prefix, room);
        let payload = Bytes::copy_from_slice(data.as_bytes());
        // A history room's message goes to the stream with an id, so a retried publish is stored once.
        let history = self.gw.history().filter(|h| h.covers(room)).cloned();
        let stored_id = history
            .as_ref()
            .map(|h| h.msg_id(self.identity.user.as_deref(), &self.conn_id, room, msg_id));
        let store = history.as_ref().zip(stored_id.as_deref()).map(|(h, m)| (h.js(), m));
        // Handing the message to the NATS client happens here, in order; only the confirmation runs apart.
        let published = match self
            .gw
            .bridge()
            .publish(subject, self.origin(), echo, payload, store, deadline)
            .await
        {
            Ok(published) => published,
            Err(e) => {
                self.publish_failed(id, e).await;
                return None;
            }
        };
        self.gw.metrics().publishes.inc();
        let id = id.map(str::to_owned);
        let gw = self.gw.clone();
        // Confirmed even without an `id` (then nothing is sent): the message's bytes count against
        // `nats.max_pending_bytes` until NATS has written it.
        Some(Box::pin(async move {
            match published.confirm(deadline).await {
                Ok(None) => id.map(|id| protocol::ack(&id)),
                Ok(Some(seq)) => id.map(|id| protocol::ack_seq(&id, seq)),
                Err(e) => {
                    gw.metrics().publish_failures.inc(e.kind());
                    gw.metrics().errors.inc(ErrorCode::Unavailable);
                    let message = "messaging backend did not accept the message";
                    id.map(|id| protocol::error(Some(&id), ErrorCode::Unavailable, message))
                }
            }
        }))
    }

    async fn publish_failed(&self, id: Option<&str>, e: crate::bridge::BridgeError) {
        self.gw.metrics().publish_failures.inc(e.kind());
        tracing::debug!(error = %e, "publish failed");
        let (code, message) = replies::publish_refused(&e);
        self.error(id, code, message).await
    }

    /// Replaces the connection's identity with a fresh token's. Refusals that need no signature check come first
    /// (anonymous connection, over `limits.refreshes_per_minute`, then inside `verify_bounded`: malformed token,
    /// no or too many keys, another `sub`); the check itself runs off the async workers, bounded.
    async fn refresh(&mut self, id: Option<&str>, token: &str) {
        let Some(user) = self.identity.user.clone() else {
            return self
                .error(id, ErrorCode::Unauthorized, "anonymous connections cannot refresh")
                .await;
        };
        if !self.session.try_refresh() {
            return self
                .error(id, ErrorCode::RateLimited, "too many refreshes; token not checked")
                .await;
        }
        let identity = match self.gw.auth().verify_bounded(token, Some(&user), &self.cancel).await {
            Ok(identity) => identity,
            // The connection is ending: the read loop sees the cancellation next.
            Err(AuthError::Cancelled) => return,
            Err(e) => {
                let (code, message) = replies::refresh_refused(&e);
                return self.error(id, code, message).await;
            }
        };
        if identity.user != self.identity.user {
            // verify_bounded compared the unverified `sub`; the verified one must agree.
            return self
                .error(id, ErrorCode::Unauthorized, "token is for another user")
                .await;
        }
        if self.gw.control().is_revoked(&identity) {
            let (code, message) = replies::refresh_refused(&AuthError::Revoked);
            return self.error(id, code, message).await;
        }
        self.identity = identity;
        self.token_changed = true;
        if let Some(facts) = super::token_facts(&self.identity) {
            self.gw.control().registry().update_token(self.id, facts);
        }
        // Leave rooms the new claims no longer allow, and say so: rooms the client joined that its join patterns no
        // longer match, and server-side rooms of the old token that the new one does not list (rooms a backend
        // subscribed it to stay). New `subs` are not joined by a refresh.
        let revoked: Vec<Arc<str>> = self
            .rooms
            .iter()
            .filter(|(r, j)| match j.via {
                Via::Client => !self.identity.may_join(r),
                Via::Token => !self.identity.subs.iter().any(|s| s.as_str() == &***r),
                Via::Backend => false,
            })
            .map(|(r, _)| r.clone())
            .collect();
        for room in revoked {
            self.leave_room(&room).await;
            self.send(protocol::left(&room, "permission revoked by token refresh"))
                .await;
        }
        self.ack(id).await;
    }
}
