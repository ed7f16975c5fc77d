//! How a connection ends: the one place that says which close each ending means (its code, reason and metrics
//! label), and the end itself ([`close`]): leave every room, write what the close asks for and the close frame,
//! release the slots, then publish the `leave` and `disconnect` events.
//!
//! Every way a connection ends maps to one close code (see `protocol::close` and `docs/protocol.md`).

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite;

use super::{Conn, State};
use crate::{
    bridge::Origin,
    gateway::Gateway,
    metrics::Closed,
    outbox::{CloseRequest, Outbox},
    protocol::close,
    wire::Wire,
};

/// The end of a connection whose loop is over: takes the connection's state back from its handler if one holds it
/// (the handler sees the cancellation at its next wait and returns), then [`close`]s.
pub(super) async fn end<IO>(state: State, wire: Wire<IO>, req: CloseRequest)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let conn = match state {
        State::Idle(conn) => conn,
        State::Busy(handling) => handling.await.0,
    };
    close(conn, wire, req).await;
}

/// Ends the connection: leaves every room, writes the close, releases the slots and publishes the events.
async fn close<IO>(mut conn: Conn, mut wire: Wire<IO>, end: CloseRequest)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let gw = conn.gw.clone();
    tracing::debug!(conn = %conn.conn_id, code = end.code, reason = %end.reason, "connection closing");
    // Leave every room before anything else so fan-out stops queueing for us.
    let rooms = conn.leave_all();
    // Flush (or not, per the close request) and send the close frame; bounded by write_timeout.
    wire.finish(Some(&conn.outbox), &end, &gw.ws_config(), &gw.config().limits)
        .await;
    drop(wire);
    let (conn_id, user) = (conn.conn_id.clone(), conn.identity.user.clone());
    // Releases the global and per-IP slots and the gauges now, not after the events below.
    drop(conn);
    let origin = Origin {
        conn: &conn_id,
        user: user.as_deref(),
    };
    // Best effort and bounded as a whole: a NATS outage must not keep a finished connection's task around.
    let events = async {
        for room in &rooms {
            gw.bridge().event("leave", origin, Some(room)).await;
        }
        gw.bridge().event("disconnect", origin, None).await;
    };
    let _ = tokio::time::timeout(gw.config().nats.publish_timeout, events).await;
    tracing::debug!(conn = %conn_id, "disconnected");
}

pub(super) fn close_req(code: u16, reason: &'static str, flush_queued: bool) -> CloseRequest {
    CloseRequest {
        code,
        reason: reason.into(),
        flush_queued,
    }
}

/// The close to report once the connection's token is cancelled: the outbox's reason if it closed first, otherwise
/// a shutdown.
pub(super) fn conn_cancelled(outbox: &Outbox) -> CloseRequest {
    outbox
        .close_request()
        .unwrap_or_else(|| close_req(close::GOING_AWAY, "server shutting down", true))
}

/// The close for a failed read; `abusive` when the rate limits ended the reading.
pub(super) fn read_error(gw: &Gateway, e: tungstenite::Error, abusive: bool) -> CloseRequest {
    let m = gw.metrics();
    if abusive {
        m.closes.inc(Closed::RateAbuse);
        // Flushed: the client sees the `rate_limited` answers that led here (bounded by the queue).
        return close_req(close::POLICY, "rate limit exceeded repeatedly", true);
    }
    match read_error_close(&e) {
        Some((code, reason, label)) => {
            tracing::info!(error = %e, code, "closing on a read error");
            m.closes.inc(label);
            close_req(code, reason, false)
        }
        None => {
            tracing::debug!(error = %e, "client gone without a close frame");
            m.closes.inc(Closed::ClientGone);
            close_req(close::NORMAL, "", false)
        }
    }
}

/// The close a read error from tungstenite stands for, as (code, reason, metrics reason); `None` when the client is
/// simply gone (its TCP connection ended or was reset, with or without a close frame: nothing can reach it any more,
/// and it broke no rule). Shared with the conformance echo, so Autobahn checks the codes real clients get.
pub fn read_error_close(e: &tungstenite::Error) -> Option<(u16, &'static str, Closed)> {
    use tungstenite::error::ProtocolError;
    match e {
        tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        tungstenite::Error::Capacity(_) => Some((close::TOO_BIG, "message too big", Closed::TooBig)),
        e if crate::wire::FragmentTimeout::is(e) => {
            Some((close::POLICY, "message not completed in time", Closed::FragmentTimeout))
        }
        e if crate::wire::InvalidDeflate::is(e) => Some((
            close::INVALID_DATA,
            "invalid compressed data",
            Closed::InvalidCompressed,
        )),
        tungstenite::Error::Protocol(_) => Some((close::PROTOCOL, "protocol error", Closed::ProtocolError)),
        tungstenite::Error::Utf8(_) => Some((close::INVALID_DATA, "invalid UTF-8", Closed::InvalidUtf8)),
        _ => None,
    }
}
