//! The NATS side: one async-nats client per gateway process, the headers that tag client publishes, lifecycle
//! events, and the error type of every NATS operation.
//!
//! async-nats is itself actor-style (a cloneable handle sending commands to one connection task), so [`Bridge`] is a
//! thin, cloneable wrapper that adds the gateway's own timeouts and bookkeeping. It reconnects forever; while it is
//! away `/readyz` answers 503 and client publishes are answered `unavailable` at once rather than buffered.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_nats::{HeaderMap, Subscriber, connection::State};
use bytes::Bytes;
use parking_lot::Mutex;

use crate::{config::NatsConfig, metrics::Metrics};

/// Header naming the gateway instance that published a client message.
pub const HDR_GATEWAY: &str = "Roomwire-Gateway";
/// Header naming the connection that published a client message.
pub const HDR_CONN: &str = "Roomwire-Conn";
/// Header naming the authenticated user (`sub`) that published a client message.
pub const HDR_USER: &str = "Roomwire-User";
/// Header present when the publisher asked to receive its own message (`"echo":true`).
pub const HDR_ECHO: &str = "Roomwire-Echo";

/// Errors of NATS operations, by what the client should be told.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// Could not connect (bad URL, bad credentials file).
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
    /// The NATS connection is down right now.
    #[error("NATS is not connected")]
    Disconnected,
    /// NATS did not accept the operation within the configured timeout.
    #[error("NATS did not answer in time")]
    Timeout,
    /// The payload is over the server's max_payload.
    #[error("payload over the NATS server's max_payload")]
    TooLarge,
    /// Any other NATS client error.
    #[error("NATS error: {0}")]
    Other(String),
}

impl BridgeError {
    /// Short reason label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            BridgeError::Connect(_) => "connect",
            BridgeError::Disconnected => "disconnected",
            BridgeError::Timeout => "timeout",
            BridgeError::TooLarge => "too_large",
            BridgeError::Other(_) => "error",
        }
    }
}

/// Who published a message, as the gateway tells backends in headers and events.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// Connection id (`<gateway>-<n>`).
    pub conn: &'a str,
    /// Authenticated user, if any.
    pub user: Option<&'a str>,
}

/// Cloneable handle to the gateway's NATS connection.
#[derive(Clone, Debug)]
pub struct Bridge {
    client: async_nats::Client,
    gateway_id: Arc<str>,
    events_prefix: Arc<str>,
    events: bool,
    timeout: Duration,
    /// Subscription id → room, to name the room in slow-consumer logs. One entry per live room.
    sids: Arc<Mutex<HashMap<u64, Arc<str>>>>,
}

impl Bridge {
    /// Connects (retrying in the background if NATS is not up yet, so the gateway starts and reports not-ready).
    pub async fn connect(cfg: &NatsConfig, gateway_id: Arc<str>, metrics: Arc<Metrics>) -> Result<Self, BridgeError> {
        let sids: Arc<Mutex<HashMap<u64, Arc<str>>>> = Arc::default();
        let mut opts = async_nats::ConnectOptions::new()
            .name(&cfg.name)
            .connection_timeout(cfg.connect_timeout)
            .subscription_capacity(cfg.subscription_capacity)
            .client_capacity(cfg.client_capacity)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                // 0, 100 ms, 200 ms, ... capped at 2 s: fast recovery after a NATS restart, no busy loop.
                Duration::from_millis((attempts as u64 * 100).min(2000))
            });
        if let Some(path) = &cfg.creds_file {
            opts = opts
                .credentials_file(path)
                .await
                .map_err(|e| BridgeError::Connect(format!("nats.creds_file {}: {e}", path.display())))?;
        }
        if let (Some(user), Some(pass)) = (&cfg.user, &cfg.password) {
            let pass = pass
                .load("nats.password")
                .map_err(|e| BridgeError::Connect(e.to_string()))?;
            opts = opts.user_and_password(user.clone(), pass.expose().to_string());
        }
        if let Some(token) = &cfg.token {
            let token = token
                .load("nats.token")
                .map_err(|e| BridgeError::Connect(e.to_string()))?;
            opts = opts.token(token.expose().to_string());
        }
        let cb_sids = sids.clone();
        opts = opts.event_callback(move |event| {
            let metrics = metrics.clone();
            let sids = cb_sids.clone();
            async move {
                match event {
                    async_nats::Event::SlowConsumer(sid) => {
                        metrics.nats_slow_consumers.inc();
                        let room = sids.lock().get(&sid).cloned();
                        tracing::warn!(
                            sid,
                            room = room.as_deref(),
                            "NATS slow consumer: room fan-out fell behind, messages dropped"
                        );
                    }
                    async_nats::Event::Disconnected => {
                        metrics.nats_disconnects.inc();
                        tracing::warn!("NATS disconnected");
                    }
                    async_nats::Event::Connected => tracing::info!("NATS connected"),
                    other => tracing::info!(event = %other, "NATS event"),
                }
            }
        });
        let urls: Vec<async_nats::ServerAddr> = cfg
            .url
            .to_vec()
            .iter()
            .map(|u| {
                u.parse()
                    .map_err(|e| BridgeError::Connect(format!("nats.url {u:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let client = opts
            .connect(urls)
            .await
            .map_err(|e| BridgeError::Connect(e.to_string()))?;
        Ok(Self {
            client,
            gateway_id,
            events_prefix: cfg.events_prefix.as_str().into(),
            events: cfg.events,
            timeout: cfg.publish_timeout,
            sids,
        })
    }

    /// Whether the NATS connection is up.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// This gateway's id.
    pub fn gateway_id(&self) -> &Arc<str> {
        &self.gateway_id
    }

    /// The NATS server's max payload (bytes).
    pub fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }

    /// Publishes a client message with the gateway's headers: hands it to the NATS connection (in order), bounded by
    /// `nats.publish_timeout`. Refused at once while NATS is away, so nothing piles up for a dead link.
    pub async fn publish(
        &self,
        subject: String,
        origin: Origin<'_>,
        echo: bool,
        payload: Bytes,
    ) -> Result<(), BridgeError> {
        if !self.is_connected() {
            return Err(BridgeError::Disconnected);
        }
        let max = self.max_payload();
        if max > 0 && payload.len() > max {
            return Err(BridgeError::TooLarge);
        }
        let mut headers = HeaderMap::new();
        headers.insert(HDR_GATEWAY, &*self.gateway_id);
        headers.insert(HDR_CONN, origin.conn);
        if let Some(user) = origin.user {
            headers.insert(HDR_USER, user);
        }
        if echo {
            headers.insert(HDR_ECHO, "1");
        }
        tokio::time::timeout(
            self.timeout,
            self.client.publish_with_headers(subject, headers, payload),
        )
        .await
        .map_err(|_| BridgeError::Timeout)?
        .map_err(|e| BridgeError::Other(e.to_string()))
    }

    /// Waits until everything handed to the NATS connection so far was written to its socket: what "accepted" means
    /// for core NATS. Bounded by `nats.publish_timeout`; a stalled or vanished server gives `Timeout`.
    pub async fn confirm(&self) -> Result<(), BridgeError> {
        tokio::time::timeout(self.timeout, self.client.flush())
            .await
            .map_err(|_| BridgeError::Timeout)?
            .map_err(|e| BridgeError::Other(e.to_string()))?;
        if self.is_connected() {
            Ok(())
        } else {
            Err(BridgeError::Disconnected)
        }
    }

    /// Subscribes to a room's subject and waits until the server has the subscription (a round trip, see
    /// [`Bridge::round_trip`]), so a message published by anyone right after the client's join ack is delivered.
    pub async fn subscribe(&self, subject: String, room: &Arc<str>) -> Result<Subscriber, BridgeError> {
        if !self.is_connected() {
            return Err(BridgeError::Disconnected);
        }
        let op = async {
            let sub = self
                .client
                .subscribe(subject)
                .await
                .map_err(|e| BridgeError::Other(e.to_string()))?;
            self.round_trip().await?;
            Ok::<_, BridgeError>(sub)
        };
        let sub = tokio::time::timeout(self.timeout, op)
            .await
            .map_err(|_| BridgeError::Timeout)??;
        if let Some(sid) = subscriber_sid(&sub) {
            self.sids.lock().insert(sid, room.clone());
        }
        Ok(sub)
    }

    /// Returns once the server has processed every command sent before it on this connection. `flush` only writes
    /// to the socket, and the server may still not have registered a SUB when a publish from another connection
    /// arrives; async-nats exposes no PING, so an empty message to a fresh inbox (`_INBOX.*`) does the round trip.
    async fn round_trip(&self) -> Result<(), BridgeError> {
        let other = |e: &dyn std::fmt::Display| BridgeError::Other(e.to_string());
        let inbox = self.client.new_inbox();
        let mut probe = self.client.subscribe(inbox.clone()).await.map_err(|e| other(&e))?;
        self.client.publish(inbox, Bytes::new()).await.map_err(|e| other(&e))?;
        self.client.flush().await.map_err(|e| other(&e))?;
        match futures_util::StreamExt::next(&mut probe).await {
            Some(_) => Ok(()),
            None => Err(BridgeError::Disconnected),
        }
    }

    /// Forgets a room's subscription id (the `Subscriber` itself unsubscribes on drop).
    pub fn forget(&self, sub: &Subscriber) {
        if let Some(sid) = subscriber_sid(sub) {
            self.sids.lock().remove(&sid);
        }
    }

    /// Publishes a lifecycle event (`connect`, `disconnect`, `join`, `leave`) as JSON. Best effort: skipped while
    /// NATS is away, bounded by the publish timeout, never fails the caller.
    pub async fn event(&self, kind: &'static str, origin: Origin<'_>, room: Option<&str>) {
        // Boxed so that callers (every connection task) do not carry this future's size while idle.
        Box::pin(self.event_inner(kind, origin, room)).await
    }

    async fn event_inner(&self, kind: &'static str, origin: Origin<'_>, room: Option<&str>) {
        if !self.events || !self.is_connected() {
            return;
        }
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let body = serde_json::json!({
            "event": kind,
            "conn": origin.conn,
            "gateway": &*self.gateway_id,
            "user": origin.user,
            "room": room,
            "time_ms": time_ms,
        });
        let subject = format!("{}.{kind}", self.events_prefix);
        let payload = Bytes::from(body.to_string());
        let _ = tokio::time::timeout(self.timeout, self.client.publish(subject, payload)).await;
    }

    /// Flushes pending publishes (shutdown), bounded by the publish timeout.
    pub async fn flush(&self) {
        let _ = tokio::time::timeout(self.timeout, self.client.flush()).await;
    }
}

/// async-nats keeps the subscription id private; its `Debug` output (`Subscriber { sid: N, .. }`) is the only way to
/// learn it, and it is needed only to name the room in slow-consumer logs. Returns None if the format changes.
fn subscriber_sid(sub: &Subscriber) -> Option<u64> {
    let dbg = format!("{sub:?}");
    let rest = dbg.split("sid: ").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}
