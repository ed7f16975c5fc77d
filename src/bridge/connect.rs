//! Connecting to NATS: the credentials and TLS options from `nats.*`, [`Bridge::connect`] (which waits, bounded,
//! for the first outcome so a refused login stops the start), and what the NATS client's events change in the
//! gateway ([`EventLog`]: counters, lame-duck moves, rooms a server refused, one log line per event).

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_nats::connection::State;
use parking_lot::Mutex;
use tokio::sync::Semaphore;

use super::{
    Bridge, BridgeError,
    publish::release_when_written,
    room_sub::{Subjects, denied_subscription},
};
use crate::{config::NatsConfig, metrics::Metrics};

/// `nats.creds_file`, `nats.user`/`nats.password`, `nats.token`, `nats.nkey_seed` and TLS to NATS
/// (`nats.tls_*`), as configured.
async fn with_credentials(
    mut opts: async_nats::ConnectOptions,
    cfg: &NatsConfig,
) -> Result<async_nats::ConnectOptions, BridgeError> {
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
    if let Some(seed) = &cfg.nkey_seed {
        let seed = seed
            .load("nats.nkey_seed")
            .map_err(|e| BridgeError::Connect(e.to_string()))?;
        // A malformed seed would only fail inside the first connection attempt, retried forever: check it now.
        nkeys::KeyPair::from_seed(seed.expose())
            .map_err(|e| BridgeError::Connect(format!("nats.nkey_seed: not a valid NKey seed: {e}")))?;
        opts = opts.nkey(seed.expose().to_string());
    }
    let mut tls = cfg.tls_required;
    if let Some(ca) = &cfg.tls_ca_file {
        // async-nats reads the file at connect; a missing or unreadable one must stop the start, not be retried.
        std::fs::metadata(ca).map_err(|e| BridgeError::Connect(format!("nats.tls_ca_file {}: {e}", ca.display())))?;
        opts = opts.add_root_certificates(ca.clone());
        tls = true;
    }
    if let (Some(cert), Some(key)) = (&cfg.tls_cert_file, &cfg.tls_key_file) {
        for (name, path) in [("nats.tls_cert_file", cert), ("nats.tls_key_file", key)] {
            std::fs::metadata(path).map_err(|e| BridgeError::Connect(format!("{name} {}: {e}", path.display())))?;
        }
        opts = opts.add_client_certificate(cert.clone(), key.clone());
        tls = true;
    }
    Ok(opts.require_tls(tls))
}

/// What the NATS client's events change in the gateway (counters, the rooms a server refused), and one log line
/// per event.
struct EventLog {
    /// The outcome of failed connection attempts, read by [`Bridge::connect`]: `Err(reason)` when refused for its
    /// credentials or for TLS (then the start stops with that reason instead of retrying forever in silence),
    /// `Ok(())` for any other failure (unreachable: the gateway starts and retries in the background).
    refused: tokio::sync::watch::Sender<Option<Result<(), String>>>,
    /// The client, once made: a server entering lame-duck mode makes the gateway move to another server at once.
    client: Arc<std::sync::OnceLock<async_nats::Client>>,
    metrics: Arc<Metrics>,
    sids: Arc<Mutex<HashMap<u64, Arc<str>>>>,
    subjects: Subjects,
}

impl EventLog {
    fn on_event(&self, event: async_nats::Event) {
        match event {
            async_nats::Event::ServerError(async_nats::ServerError::Other(text)) => {
                // The server dropped (or refused) a subscription: end the room so that it is not kept registered
                // with nothing behind it (async-nats itself keeps the `Subscriber` open).
                match denied_subscription(&text) {
                    Some((subject, sid)) => {
                        tracing::warn!(subject, sid, "NATS refused a room subscription (permissions violation)");
                        if let Some(e) = self.subjects.lock().get(subject)
                            && (sid.is_none() || e.sid.is_none() || e.sid == sid)
                        {
                            e.token.cancel();
                        }
                    }
                    None => tracing::warn!(error = %text, "NATS server error"),
                }
            }
            async_nats::Event::SlowConsumer(sid) => {
                self.metrics.nats_slow_consumers.inc();
                let room = self.sids.lock().get(&sid).cloned();
                tracing::warn!(
                    sid,
                    room = room.as_deref(),
                    "NATS slow consumer: room fan-out fell behind, messages dropped"
                );
            }
            async_nats::Event::Disconnected => {
                self.metrics.nats_disconnects.inc();
                tracing::warn!("NATS disconnected");
            }
            async_nats::Event::Connected => tracing::info!("NATS connected"),
            async_nats::Event::LameDuckMode => {
                // The server is going away and will close us within its lame-duck duration. Moving now, while it
                // still answers, beats waiting for its close: rooms are resubscribed on the next server, and the
                // WebSocket clients never notice. A lame-duck server takes no new connections, so the reconnect goes
                // elsewhere. One short task per event, not per connection.
                tracing::warn!("NATS server entered lame-duck mode: reconnecting to another server");
                if let Some(client) = self.client.get().cloned() {
                    tokio::spawn(async move {
                        if let Err(e) = client.force_reconnect().await {
                            tracing::warn!(error = %e, "reconnect after lame-duck mode failed");
                        }
                    });
                }
            }
            async_nats::Event::ClientError(async_nats::ClientError::Other(text))
                if ["authorization violation", "failed signing nonce", "TLS error"].contains(&text.as_str()) =>
            {
                tracing::error!(error = %text, "NATS refused the connection");
                self.refused.send_replace(Some(Err(text)));
            }
            async_nats::Event::ClientError(async_nats::ClientError::Other(text)) => {
                tracing::warn!(error = %text, "NATS connection attempt failed");
                self.refused
                    .send_if_modified(|r| r.is_none() && r.replace(Ok(())).is_none());
            }
            other => tracing::info!(event = %other, "NATS event"),
        }
    }
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
            .ping_interval(cfg.ping_interval)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                // 0, 100 ms, 200 ms, ... capped at 2 s: fast recovery after a NATS restart, no busy loop.
                Duration::from_millis((attempts as u64 * 100).min(2000))
            });
        opts = with_credentials(opts, cfg).await?;
        let subjects: Subjects = Arc::default();
        let (refused, mut refusal) = tokio::sync::watch::channel(None);
        let client_cell: Arc<std::sync::OnceLock<async_nats::Client>> = Arc::default();
        let events = Arc::new(EventLog {
            refused,
            client: client_cell.clone(),
            metrics,
            sids: sids.clone(),
            subjects: subjects.clone(),
        });
        opts = opts.event_callback(move |event| {
            let events = events.clone();
            async move { events.on_event(event) }
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
        let _ = client_cell.set(client.clone());
        // The first attempts run in the background (the gateway starts even if NATS is not up yet). A server that
        // answers but refuses the credentials or the TLS setup would be retried forever with nothing but a log line:
        // wait for the first outcome (bounded) and make a refusal a startup error that names it.
        let first_outcome = async {
            loop {
                match refusal.borrow_and_update().clone() {
                    Some(Err(reason)) => return Some(reason),
                    Some(Ok(())) => return None,
                    None => {}
                }
                if client.connection_state() == State::Connected {
                    return None;
                }
                tokio::select! {
                    _ = refusal.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        };
        if let Ok(Some(reason)) = tokio::time::timeout(cfg.connect_timeout, first_outcome).await {
            return Err(BridgeError::Connect(format!(
                "NATS refused the connection ({reason}): check nats.user/password, nats.token, nats.creds_file, \
                 nats.nkey_seed and nats.tls_*"
            )));
        }
        // Unbounded in type only: every entry holds at least 160 of the `nats.max_pending_bytes` byte permits.
        let (releaser, queue) = tokio::sync::mpsc::unbounded_channel();
        // Not on the gateway's tracker: it holds nothing a shutdown must wait for, and ends with the client.
        tokio::spawn(release_when_written(client.clone(), queue));
        Ok(Self {
            releaser,
            client,
            gateway_id,
            events_prefix: cfg.events_prefix.as_str().into(),
            events: cfg.events,
            timeout: cfg.publish_timeout,
            sids,
            pending: Arc::new(Semaphore::new(cfg.max_pending_bytes)),
            max_pending: cfg.max_pending_bytes,
            subjects,
        })
    }
}
