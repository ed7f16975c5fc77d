//! A connection's deadlines, all served by one timer re-armed to the nearest: the heartbeat ping
//! (`limits.heartbeat_interval`), the heartbeat timeout (`limits.heartbeat_timeout` of silence), the write deadline
//! (`limits.write_timeout` from when a write started waiting for the socket), the token's expiry warning and expiry,
//! and the drain's moment. [`Deadlines::due`] says what is due, in order of precedence.

use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::Instant,
};

use super::ending::close_req;
use crate::{
    frame::Frame,
    gateway::Gateway,
    metrics::{Closed, SlowConsumer},
    outbox::{CloseRequest, Outbox},
    protocol::close,
    wire::Wire,
};

/// The deadlines of a connection, all served by one timer (see the module doc).
pub(super) struct Deadlines {
    /// Next heartbeat ping.
    pub(super) ping: Instant,
    /// Last frame from the client: the heartbeat timeout counts from here.
    pub(super) last_seen: Instant,
    /// The token's expiry warning and expiry (connections with a token).
    pub(super) warn: Option<Instant>,
    pub(super) expire: Option<Instant>,
    /// This connection's moment to close during a drain (set once the drain starts).
    pub(super) drain: Option<Instant>,
}

/// What the timer found due.
pub(super) enum Due {
    /// Nothing yet (re-armed).
    Nothing,
    /// The token's expiry warning: the handler sends it.
    Warn,
    /// End the connection.
    Close(CloseRequest),
}

impl Deadlines {
    /// The nearest deadline. The token's are left out while a handler holds the connection (`busy`): they are acted
    /// on once it is back.
    pub(super) fn next(&self, gw: &Gateway, blocked_since: Option<Instant>, busy: bool) -> Instant {
        let limits = &gw.config().limits;
        let mut next = self.ping.min(self.last_seen + limits.heartbeat_timeout);
        for t in [self.drain, blocked_since.map(|t| t + limits.write_timeout)]
            .into_iter()
            .flatten()
        {
            next = next.min(t);
        }
        if !busy {
            for t in [self.warn, self.expire].into_iter().flatten() {
                next = next.min(t);
            }
        }
        next
    }

    /// Acts on what is due at `now`, in order of precedence.
    pub(super) fn due<IO>(
        &mut self,
        gw: &Gateway,
        wire: &mut Wire<IO>,
        outbox: &Outbox,
        busy: bool,
        now: Instant,
    ) -> Due
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let limits = &gw.config().limits;
        if wire.blocked_since().is_some_and(|t| t + limits.write_timeout <= now) {
            gw.metrics().slow_consumers.inc(SlowConsumer::WriteTimeout);
            tracing::info!("write timed out: slow consumer dropped");
            return Due::Close(close_req(close::SLOW_CONSUMER, "slow consumer", false));
        }
        if self.drain.is_some_and(|t| t <= now) {
            // Flushed, then 1001 with the reason that tells the client library to reconnect elsewhere, later.
            return Due::Close(close_req(close::GOING_AWAY, close::DRAIN_REASON, true));
        }
        if self.last_seen + limits.heartbeat_timeout <= now {
            gw.metrics().closes.inc(Closed::HeartbeatTimeout);
            return Due::Close(close_req(close::GOING_AWAY, "heartbeat timeout", false));
        }
        if self.ping <= now {
            wire.shrink_if_idle(outbox);
            wire.queue(Frame::ping());
            self.ping = now + limits.heartbeat_interval;
        }
        if !busy {
            if self.expire.is_some_and(|t| t <= now) {
                gw.metrics().closes.inc(Closed::TokenExpired);
                return Due::Close(close_req(close::TOKEN_EXPIRED, "token expired", true));
            }
            if self.warn.is_some_and(|t| t <= now) {
                self.warn = None;
                return Due::Warn;
            }
        }
        Due::Nothing
    }
}
