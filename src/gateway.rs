//! The state every connection shares, built once at startup by [`Gateway::start`]: the validated configuration, the
//! NATS bridge, the room registry, the token verifier, the limits, the metrics, the TLS acceptor, the root shutdown
//! token and the tracker of every spawned task.
//!
//! Fields are private; the methods say what each part is for. The accept loop (`crate::server`), the handshake
//! (`crate::http`) and the session (`crate::connection`) all depend on this module, and it depends on none of them,
//! so a connection's life reads in one direction: accept → TLS and HTTP → upgrade → session.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    auth::{AuthError, Authenticator},
    bridge::{Bridge, BridgeError},
    config::{Config, ConfigError},
    control::Control,
    history::{History, HistoryError},
    limits::Limits,
    metrics::Metrics,
    presence::{Presence, PresenceError},
    rooms::Rooms,
    tls::{Tls, TlsError},
};

/// Startup failures of the gateway.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is inconsistent (the same checks as `Config::load`, for configs built in code).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Certificate or key problem.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// NATS options problem (bad URL or credentials file).
    #[error(transparent)]
    Nats(#[from] BridgeError),
    /// Authentication keys problem.
    #[error("auth: {0}")]
    Auth(#[from] AuthError),
    /// The history stream is missing, does not match `[history]`, or JetStream refused it.
    #[error("history: {0}")]
    History(#[from] HistoryError),
}

/// Everything a connection needs, shared by all of them (`Arc<Gateway>`).
#[derive(Debug)]
pub struct Gateway {
    config: Config,
    /// This instance's id (NATS headers, events, connection ids).
    id: Arc<str>,
    bridge: Bridge,
    /// `None` unless `history.enabled`.
    history: Option<Arc<History>>,
    /// `None` unless `presence.enabled`; its bucket may be unavailable (no JetStream).
    presence: Option<Arc<Presence>>,
    rooms: Arc<Rooms>,
    /// Backend commands over NATS: the open connections and the revocations.
    control: Arc<Control>,
    auth: Authenticator,
    limits: Arc<Limits>,
    metrics: Arc<Metrics>,
    /// `None` when `tls.enabled = false`.
    tls: Option<Tls>,
    /// Applied to every upgraded connection (built from `[limits]`).
    ws_config: WebSocketConfig,
    /// Root shutdown token; every task holds it or a child.
    shutdown: CancellationToken,
    /// Cancelled on the first SIGTERM/SIGINT: stop accepting, not ready, close connections over
    /// `server.drain_window` (`crate::shutdown`).
    drain: CancellationToken,
    /// `drain` and `shutdown` as one atomic for the connections (see [`StopSignal`]).
    stop: Arc<crate::shutdown::StopSignal>,
    /// Every task spawned for connections and rooms; shutdown waits for them, bounded by `server.shutdown_grace`.
    tracker: TaskTracker,
    next_conn: AtomicU64,
}

impl Gateway {
    /// Validates the configuration and what needs files (certificates, keys), and connects to NATS (in the
    /// background if it is not up yet, so the gateway starts and reports not-ready).
    pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Arc<Self>, StartError> {
        config.validate()?;
        let id: Arc<str> = match &config.server.gateway_id {
            Some(id) => id.as_str().into(),
            None => format!("gw{:08x}", rand::random::<u32>()).into(),
        };
        let tls = if config.tls.enabled {
            Some(Tls::new(&config.tls)?)
        } else {
            None
        };
        let auth = Authenticator::from_config(&config.auth)?;
        let metrics = Arc::new(Metrics::new());
        let bridge = Bridge::connect(&config.nats, id.clone(), metrics.clone()).await?;
        let tracker = TaskTracker::new();
        let history = match config.history.enabled {
            true => start_history(&config, &bridge, &tracker, &shutdown).await?,
            false => None,
        };
        let presence = match config.presence.enabled {
            true => Some(start_presence(&config, &id, &bridge, &metrics, &tracker, &shutdown).await),
            false => None,
        };
        let rooms = Rooms::new(
            bridge.clone(),
            history.clone(),
            presence.clone(),
            config.rooms.clone(),
            config.compression.enabled.then(|| config.compression.settings()),
            config.limits.max_tracked_keys,
            metrics.clone(),
            tracker.clone(),
            shutdown.clone(),
        );
        let control = Arc::new(Control::new(&config, id.clone(), metrics.clone()));
        tracker.spawn(control.clone().run(bridge.client().clone(), shutdown.clone()));
        let limits = Arc::new(Limits::new(&config));
        let l = &config.limits;
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(l.read_buffer_size)
            .write_buffer_size(l.write_buffer_size)
            .max_write_buffer_size(l.max_write_buffer_size)
            .max_message_size(Some(l.max_message_size))
            .max_frame_size(Some(l.max_frame_size));
        tracing::info!(gateway = %id, tls = config.tls.enabled, "gateway started");
        let drain = CancellationToken::new();
        let stop = Arc::new(crate::shutdown::StopSignal::default());
        tracker.spawn(stop.clone().watch(drain.clone(), shutdown.clone()));
        Ok(Arc::new(Self {
            next_conn: AtomicU64::new(1),
            config,
            id,
            bridge,
            history,
            presence,
            rooms,
            control,
            auth,
            limits,
            metrics,
            tls,
            ws_config,
            shutdown,
            drain,
            stop,
            tracker,
        }))
    }

    /// The validated configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// This instance's id, as NATS headers, lifecycle events and connection ids name it.
    pub fn id(&self) -> &Arc<str> {
        &self.id
    }

    /// The NATS connection.
    pub fn bridge(&self) -> &Bridge {
        &self.bridge
    }

    /// The history stream, when `history.enabled`.
    pub fn history(&self) -> Option<&Arc<History>> {
        self.history.as_ref()
    }

    /// Presence, when `presence.enabled` (its bucket may be unavailable: [`Presence::is_available`]).
    pub fn presence(&self) -> Option<&Arc<Presence>> {
        self.presence.as_ref()
    }

    /// The room registry and fan-out.
    pub fn rooms(&self) -> &Arc<Rooms> {
        &self.rooms
    }

    /// Backend control: the registry of open connections and the revocations.
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// Token verification.
    pub fn auth(&self) -> &Authenticator {
        &self.auth
    }

    /// Connection caps, rate limits, origins and client addresses.
    pub fn limits(&self) -> &Arc<Limits> {
        &self.limits
    }

    /// Counters and gauges.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The TLS acceptor, when `tls.enabled`.
    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    /// WebSocket settings for every upgraded connection.
    pub fn ws_config(&self) -> WebSocketConfig {
        self.ws_config
    }

    /// The root shutdown token: cancelled on SIGINT/SIGTERM (or by the caller of `run`).
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// The drain token: cancel it to stop accepting, turn `/readyz` to 503 and close every WebSocket at a random
    /// moment within `server.drain_window`; [`crate::run`] then cancels the root token and returns.
    pub fn drain(&self) -> &CancellationToken {
        &self.drain
    }

    /// The drain and shutdown state as connections read it on every wake-up (one atomic, no lock).
    pub fn stop_signal(&self) -> &crate::shutdown::StopSignal {
        &self.stop
    }

    /// Spawns a task that shutdown waits for (bounded by `server.shutdown_grace`).
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// Every task spawned through [`Gateway::spawn`] and by the rooms.
    pub(crate) fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// A new local connection number.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether the gateway should receive traffic: connected to NATS, the stored revocations known (`crate::control`),
    /// and neither draining nor shutting down.
    pub fn ready(&self) -> bool {
        self.bridge.is_connected()
            && self.control.ready()
            && !self.drain.is_cancelled()
            && !self.shutdown.is_cancelled()
    }
}

/// Sets up the history stream when NATS answers within `nats.connect_timeout`:
/// - a missing or mismatched stream with `manage_stream = false` stops the start, naming what differs;
/// - a NATS server without JetStream (or one that refuses the stream) runs the gateway without history, with an
///   error in the log, so the shipped configuration also works against a plain `nats-server`;
/// - NATS not reachable yet: the maintenance task sets the stream up once it is, and history rooms answer without a
///   position meanwhile.
async fn start_history(
    config: &Config,
    bridge: &Bridge,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<Option<Arc<History>>, StartError> {
    let history = Arc::new(History::new(
        bridge.client().clone(),
        &config.history,
        &config.rooms.subject_prefix,
    ));
    let connected = tokio::time::timeout(config.nats.connect_timeout, async {
        while !bridge.is_connected() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .is_ok();
    if connected {
        match history.ensure().await {
            Ok(()) => {}
            Err(HistoryError::Api(text)) if jetstream_absent(&text) => {
                tracing::error!(error = %text, "history disabled: JetStream is not enabled on this NATS server \
                    (start nats-server with -js, or set history.enabled = false)");
                return Ok(None);
            }
            // JetStream is there but not ready (a cluster electing its leaders, a timeout): keep history on, the
            // maintenance task sets the stream up as soon as JetStream answers.
            Err(e @ HistoryError::Api(_)) => tracing::warn!(error = %e, "history stream not set up yet; retrying"),
            Err(e) => return Err(e.into()),
        }
    } else {
        tracing::warn!("NATS not reachable at start: the history stream is set up once it is");
    }
    tracker.spawn(history.clone().maintain(shutdown.clone()));
    Ok(Some(history))
}

/// Sets up the presence bucket when NATS answers within `nats.connect_timeout`. Presence never stops the start: a
/// NATS server without JetStream leaves it unavailable (an error in the log; presence ops answer `unavailable`), and
/// any other failure (NATS not reachable yet, JetStream not ready, a missing bucket with `manage_bucket = false`) is
/// retried in the background every `presence.ttl / 3`.
async fn start_presence(
    config: &Config,
    id: &Arc<str>,
    bridge: &Bridge,
    metrics: &Arc<Metrics>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Arc<Presence> {
    let presence = Arc::new(Presence::new(
        bridge.client().clone(),
        &config.presence,
        id,
        metrics.clone(),
    ));
    let connected = tokio::time::timeout(config.nats.connect_timeout, async {
        while !bridge.is_connected() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .is_ok();
    if connected {
        match presence.ensure().await {
            Ok(()) => return presence,
            Err(PresenceError::Api(text)) if jetstream_absent(&text) => {
                tracing::error!(error = %text, "presence unavailable: JetStream is not enabled on this NATS server \
                    (start nats-server with -js, or set presence.enabled = false)");
                return presence;
            }
            Err(e) => tracing::warn!(error = %e, "presence bucket not set up yet; retrying"),
        }
    } else {
        tracing::warn!("NATS not reachable at start: the presence bucket is set up once it is");
    }
    tracker.spawn(presence.clone().ensure_later(shutdown.clone()));
    presence
}

/// Whether a JetStream API error says the server has no JetStream at all (nobody answers the API, or the account
/// has it disabled), as opposed to JetStream being busy or still electing leaders.
fn jetstream_absent(error: &str) -> bool {
    let e = error.to_ascii_lowercase();
    e.contains("jetstream unavailable") || e.contains("no responders") || e.contains("not enabled")
}
