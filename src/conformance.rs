//! Test-only echo endpoint for the Autobahn conformance run (`scripts/autobahn`, `tests/autobahn.rs`).
//!
//! Compiled only with the cargo feature `conformance`, which no release build enables: with it, every upgraded
//! WebSocket echoes text and binary messages instead of speaking the room protocol. Everything before the echo is the
//! production path: the accept loop, the HTTP upgrade and its checks (`crate::http`), and the `WebSocketConfig` built
//! in `crate::server` from `[limits]` (read buffer, write buffers, `max_message_size`, `max_frame_size`). Read errors
//! close with the codes `crate::connection` uses (`connection::read_error_close`) (1009 over a size limit, 1002 protocol error, 1007 invalid UTF-8),
//! so Autobahn sees the close codes a real client would.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        self, Message,
        protocol::{CloseFrame, frame::coding::CloseCode},
    },
};

use crate::{
    connection::{Accepted, read_error_close},
    gateway::Gateway,
    protocol::close,
};

/// Echoes one WebSocket until it closes; this is the connection's task. Takes what `connection::start` takes, so
/// `crate::http` picks one or the other at compile time.
pub async fn echo<S>(gw: Arc<Gateway>, mut ws: WebSocketStream<S>, accepted: Accepted)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Held until the echo ends, like a real connection holds its global and per-IP slots.
    let _slot = accepted.slot;
    let cancel = gw.shutdown().clone();
    let write_timeout = gw.config().limits.write_timeout;
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => {
                send_close(&mut ws, close::GOING_AWAY, "server shutting down", write_timeout).await;
                return;
            }
            msg = ws.next() => msg,
        };
        match msg {
            // The peer closed (tungstenite already answered its close frame) or the TCP connection ended.
            None | Some(Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed)) => return,
            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                let sent = tokio::select! {
                    _ = cancel.cancelled() => false,
                    r = tokio::time::timeout(write_timeout, ws.send(m)) => matches!(r, Ok(Ok(()))),
                };
                if !sent {
                    return;
                }
            }
            // Pings are answered and close frames replied to by tungstenite while reading; keep reading so the reply
            // is flushed and the stream ends.
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_))) => {}
            Some(Err(e)) => {
                let (code, reason) =
                    read_error_close(&e).map_or((close::NORMAL, ""), |(code, reason, _)| (code, reason));
                tracing::debug!(error = %e, code, "echo: read error");
                send_close(&mut ws, code, reason, write_timeout).await;
                return;
            }
        }
    }
}

/// Sends a close frame (bounded by `write_timeout`); the caller then drops the stream, which closes TCP.
async fn send_close<S>(ws: &mut WebSocketStream<S>, code: u16, reason: &'static str, timeout: std::time::Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(timeout, ws.send(Message::Close(Some(frame)))).await;
}
