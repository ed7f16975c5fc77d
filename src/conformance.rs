//! Test-only echo endpoint for the Autobahn conformance run (`scripts/autobahn`, `tests/autobahn.rs`).
//!
//! Compiled only with the cargo feature `conformance`, which no release build enables: with it, every upgraded
//! WebSocket echoes text and binary messages instead of speaking the room protocol. Everything before the echo is the
//! production path: the accept loop, the HTTP upgrade and its checks (`crate::http`), and the connection's socket
//! layer ([`Wire`]: tungstenite's reading with the `WebSocketConfig` built from `[limits]`, the gateway's own frame
//! writing, the rate-limit meter). Read errors close with the codes `crate::connection` uses
//! (`connection::read_error_close`: 1009 over a size limit, 1002 protocol error, 1007 invalid UTF-8), so Autobahn
//! sees the frames and close codes a real client would. permessage-deflate is negotiated by the same upgrade and
//! inflated by the same wire; the echo compresses its replies like the gateway's other frames.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    connection::{Accepted, Endpoint, read_error_close},
    frame::Frame,
    gateway::Gateway,
    outbox::CloseRequest,
    protocol::close,
    wire::{Incoming, Wire},
};

/// The echo as an [`Endpoint`]: `crate::server::run_with(listener, gw, Echo)`.
#[derive(Debug, Clone, Copy)]
pub struct Echo;

impl Endpoint for Echo {
    fn serve<IO>(
        self,
        gw: Arc<Gateway>,
        wire: Wire<IO>,
        accepted: Accepted,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        echo(gw, wire, accepted)
    }
}

/// Echoes one WebSocket until it closes; this is the connection's task.
pub async fn echo<IO>(gw: Arc<Gateway>, mut wire: Wire<IO>, accepted: Accepted)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Held until the echo ends, like a real connection holds its global and per-IP slots.
    let _slot = accepted.slot;
    // permessage-deflate negotiated: echoes of at least `compression.min_size` bytes go back compressed (Autobahn 12
    // and 13), each compressed on its own like every frame of the gateway.
    let deflate = accepted.deflate.map(|_| gw.config().compression.settings());
    let cancel = gw.shutdown().clone();
    let limits = &gw.config().limits;
    let write_timeout = limits.write_timeout;
    let config = gw.ws_config();
    let end = |code, reason: &'static str| CloseRequest {
        code,
        reason: reason.into(),
        flush_queued: true,
    };
    loop {
        let read = tokio::select! {
            _ = cancel.cancelled() => {
                wire.finish(None, &end(close::GOING_AWAY, "server shutting down"), &config, limits).await;
                return;
            }
            read = std::future::poll_fn(|cx| wire.poll_read(cx, &config)) => read,
        };
        let echo = match read {
            Ok(Incoming::Message(Message::Text(text), _)) => Frame::text(text.as_str()),
            Ok(Incoming::Message(Message::Binary(data), _)) => Frame::binary(&data),
            // The close reply tungstenite queued is written by `finish`, which adds no close frame of its own.
            Ok(Incoming::Message(Message::Close(_), _)) | Ok(Incoming::Closed) => {
                wire.finish(None, &end(close::NORMAL, ""), &config, limits).await;
                return;
            }
            // Pings are answered by tungstenite while reading; the pong goes out with the next write.
            Ok(Incoming::Message(Message::Ping(_) | Message::Pong(_) | Message::Frame(_), _)) => {
                if !wire.send_control(write_timeout).await {
                    return;
                }
                continue;
            }
            Err(e) => {
                let (code, reason) =
                    read_error_close(&e).map_or((close::NORMAL, ""), |(code, reason, _)| (code, reason));
                tracing::debug!(error = %e, code, "echo: read error");
                wire.finish(None, &end(code, reason), &config, limits).await;
                return;
            }
        };
        let echo = match deflate {
            Some(d) => echo.compressed(d.level),
            None => echo,
        };
        if !wire.send(echo, write_timeout).await {
            return;
        }
    }
}
