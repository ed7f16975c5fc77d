//! The `presence` and `presence_stats` ops (`docs/presence.md`): who is in a room, over every gateway. Both need
//! join permission for the room (`forbidden`); a room without presence is `bad_request`. A room this gateway holds
//! is answered from its watched view at no cost; any other room costs one bounded read of its keys (a short-lived
//! JetStream consumer, at most `presence::bucket::REQUEST_TIMEOUT`, abandoned when the connection ends).

use tokio::time::Instant;

use super::Conn;
use crate::protocol::{self, ErrorCode};

/// Time one read of a room's presence gets.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl Conn {
    /// `{"op":"presence","room":R}` (or `presence_stats` when `stats`).
    pub(super) async fn presence(&mut self, id: Option<&str>, room: &str, stats: bool) {
        if !self.may_read(id, room).await {
            return;
        }
        let Some(p) = self.gw.presence().filter(|p| p.covers(room)).cloned() else {
            return self.error(id, ErrorCode::BadRequest, "this room has no presence").await;
        };
        let watched = self.gw.rooms().presence_of(room).and_then(|r| r.summary());
        let summary = match watched {
            Some(s) => s,
            None => {
                let read = p.read(room, Instant::now() + READ_TIMEOUT);
                let read = tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    r = read => r,
                };
                match read {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(room, error = %e, "presence read failed");
                        return self.error(id, ErrorCode::Unavailable, "presence unavailable").await;
                    }
                }
            }
        };
        let frame = if stats {
            protocol::presence_stats(id, room, summary.count, summary.users)
        } else {
            let members = summary
                .members
                .as_ref()
                .map(|m| m.iter().map(|m| (m.conn.as_str(), m.user.as_deref())));
            protocol::presence(id, room, summary.count, summary.users, members)
        };
        self.send(frame).await;
    }
}
