//! Client publishes: the headers that tag them (`HDR_*`), [`Bridge::publish`] under the gateway-wide byte budget
//! (`nats.max_pending_bytes`), [`Published`] (a publish awaiting its confirmation: a flush, or JetStream's
//! acknowledgement for a history room) and the releaser task that gives back the bytes of publishes nobody waits on
//! once NATS has written them.

use async_nats::{HeaderMap, connection::State};
use bytes::Bytes;
use tokio::{sync::OwnedSemaphorePermit, time::Instant};

use super::{Bridge, BridgeError, Origin};

/// Header naming the gateway instance that published a client message.
pub const HDR_GATEWAY: &str = "Roomwire-Gateway";
/// Header naming the connection that published a client message.
pub const HDR_CONN: &str = "Roomwire-Conn";
/// Header naming the authenticated user (`sub`) that published a client message.
pub const HDR_USER: &str = "Roomwire-User";
/// Header present when the publisher asked to receive its own message (`"echo":true`).
pub const HDR_ECHO: &str = "Roomwire-Echo";

/// Bytes a client publish costs besides its payload, subject and header values: the `HPUB` line, `NATS/1.0`, the
/// four header names and their framing (an upper bound, so the budget errs on the safe side).
const HEADER_OVERHEAD: usize = 160;

/// A client publish handed to the NATS client; holds its bytes against `nats.max_pending_bytes` until confirmed or
/// dropped.
///
/// "Released" means released by the caller: a message whose confirmation timed out, or that was dropped
/// unconfirmed, is still in async-nats's buffers, so its bytes pass to the bridge's releaser task, which gives them
/// back only once the NATS connection has written everything handed to it so far (or the client is closed). The
/// budget therefore bounds the bytes really waiting for NATS, not just those someone still waits on.
#[derive(Debug)]
pub struct Published {
    /// `None` once handed on (confirmed, or passed to the releaser).
    permit: Option<OwnedSemaphorePermit>,
    client: async_nats::Client,
    releaser: tokio::sync::mpsc::UnboundedSender<OwnedSemaphorePermit>,
    /// JetStream's acknowledgement, for a message published to the history stream.
    ack: Option<async_nats::jetstream::context::PublishAckFuture>,
}

impl Published {
    /// Waits until the NATS connection has written it (flush), at most until `deadline`; releases the bytes.
    ///
    /// A flush covers everything handed to the connection before it, so this confirms this message (core NATS has
    /// no per-message acknowledgement: "written to the server's socket" is what accepted means). A stalled or
    /// vanished server gives `Timeout` or `Disconnected`; then the bytes stay counted until NATS writes the message
    /// (see the type's doc).
    ///
    /// A message published to the history stream is confirmed by JetStream's acknowledgement instead, which says
    /// it is stored; its sequence is returned (`None` for a core publish).
    pub async fn confirm(mut self, deadline: Instant) -> Result<Option<u64>, BridgeError> {
        if let Some(ack) = self.ack.take() {
            let ack = tokio::time::timeout_at(deadline, ack.into_future())
                .await
                .map_err(|_| BridgeError::Timeout)?
                .map_err(|e| BridgeError::Other(e.to_string()))?;
            // Stored, so written: the bytes are free.
            drop(self.permit.take());
            return Ok(Some(ack.sequence));
        }
        tokio::time::timeout_at(deadline, self.client.flush())
            .await
            .map_err(|_| BridgeError::Timeout)?
            .map_err(|e| BridgeError::Other(e.to_string()))?;
        // Written: the bytes are free now, whatever the connection's state.
        drop(self.permit.take());
        if self.client.connection_state() == State::Connected {
            Ok(None)
        } else {
            Err(BridgeError::Disconnected)
        }
    }
}

impl Drop for Published {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            // If the releaser is gone (client closed), the permit is dropped here: nothing will be written anyway.
            let _ = self.releaser.send(permit);
        }
    }
}

/// Gives back the bytes of unconfirmed publishes once NATS has written them: takes every permit queued, flushes the
/// client (which completes once everything handed to it before is written, also across a reconnect), then drops
/// them. Ends when the bridge and every `Published` are gone. A closed client fails the flush at once: nothing
/// more will be written, so the bytes are given back rather than blocking publishes forever.
///
/// The queue is unbounded as a channel, but bounded by the byte budget itself: each permit in it holds at least
/// `HEADER_OVERHEAD` bytes of `nats.max_pending_bytes`.
pub(super) async fn release_when_written(
    client: async_nats::Client,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<OwnedSemaphorePermit>,
) {
    let mut batch = Vec::new();
    while queue.recv_many(&mut batch, 1024).await > 0 {
        // An error means the client is closed: nothing more will be written, so the bytes are free as well.
        let _ = client.flush().await;
        batch.clear();
    }
}

impl Bridge {
    /// Waits for byte budget (until `deadline`), then hands the message to async-nats (until `deadline`).
    ///
    /// Refused at once while NATS is away (`Disconnected`), so nothing piles up for a dead link, and when it can never
    /// fit (`TooLarge`: over the server's `max_payload` or over `nats.max_pending_bytes`). Messages of one caller are
    /// handed over in call order.
    ///
    /// With `store` (a history room: the JetStream context and the message id), the message is published to the
    /// stream with a `Nats-Msg-Id` header, and [`Published::confirm`] waits for JetStream's acknowledgement and
    /// returns the stored sequence.
    pub async fn publish(
        &self,
        subject: String,
        origin: Origin<'_>,
        echo: bool,
        payload: Bytes,
        store: Option<(&async_nats::jetstream::Context, &str)>,
        deadline: Instant,
    ) -> Result<Published, BridgeError> {
        if !self.is_connected() {
            return Err(BridgeError::Disconnected);
        }
        let max = self.max_payload();
        if max > 0 && payload.len() > max {
            return Err(BridgeError::TooLarge);
        }
        // What the message costs while it waits: payload, subject and headers (their names and framing included).
        let cost = payload
            .len()
            .saturating_add(subject.len())
            .saturating_add(self.gateway_id.len())
            .saturating_add(origin.conn.len())
            .saturating_add(origin.user.map_or(0, str::len))
            .saturating_add(HEADER_OVERHEAD);
        if cost > self.max_pending {
            return Err(BridgeError::TooLarge);
        }
        // `max_pending` ≤ u32::MAX (validated), so the cast cannot truncate.
        let permit = tokio::time::timeout_at(deadline, self.pending.clone().acquire_many_owned(cost as u32))
            .await
            .map_err(|_| BridgeError::Timeout)?
            .map_err(|_| BridgeError::Disconnected)?;
        let mut headers = HeaderMap::new();
        headers.insert(HDR_GATEWAY, &*self.gateway_id);
        headers.insert(HDR_CONN, origin.conn);
        if let Some(user) = origin.user {
            headers.insert(HDR_USER, user);
        }
        if echo {
            headers.insert(HDR_ECHO, "1");
        }
        let ack = match store {
            None => {
                tokio::time::timeout_at(deadline, self.client.publish_with_headers(subject, headers, payload))
                    .await
                    .map_err(|_| BridgeError::Timeout)?
                    .map_err(|e| BridgeError::Other(e.to_string()))?;
                None
            }
            Some((js, msg_id)) => {
                let message = async_nats::jetstream::message::PublishMessage::build()
                    .payload(payload)
                    .headers(headers)
                    .message_id(msg_id);
                let ack = tokio::time::timeout_at(deadline, js.send_publish(subject, message))
                    .await
                    .map_err(|_| BridgeError::Timeout)?
                    .map_err(|e| BridgeError::Other(e.to_string()))?;
                Some(ack)
            }
        };
        Ok(Published {
            permit: Some(permit),
            client: self.client.clone(),
            releaser: self.releaser.clone(),
            ack,
        })
    }
}
