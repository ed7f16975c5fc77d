//! The gateway's shared state ([`Gateway`]) and the accept loop ([`run`], [`Gateway::serve`]).
//!
//! The accept loop only accepts: it counts the connection against its peer address (shedding it at once, before any
//! TLS work, when that address is over `limits.max_connections_per_ip` or its new-connection rate), takes a permit
//! from the global connection cap and spawns the connection's task; TLS, HTTP and the WebSocket upgrade all happen
//! in that task (see [`crate::http`]) under the handshake deadline, absolute from accept.
//! On shutdown it stops accepting, every task sees the cancelled token, and the wait for them is bounded by
//! `server.shutdown_grace`.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    auth::{AuthError, Authenticator},
    bridge::{Bridge, BridgeError},
    config::Config,
    limits::Limits,
    metrics::Metrics,
    rooms::Rooms,
    tls::{Tls, TlsError},
};

/// Startup failures of the gateway.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is inconsistent (the same checks as `Config::load`, for configs built in code).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Certificate or key problem.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// NATS options problem (bad URL or credentials file).
    #[error(transparent)]
    Nats(#[from] BridgeError),
    /// Authentication keys problem.
    #[error("auth: {0}")]
    Auth(#[from] AuthError),
}

/// Everything a connection task needs, shared by all of them.
#[derive(Debug)]
pub struct Gateway {
    /// Validated configuration.
    pub config: Config,
    /// This instance's id (NATS headers, events, connection ids).
    pub gateway_id: Arc<str>,
    /// NATS connection.
    pub bridge: Bridge,
    /// Room registry and fan-out.
    pub rooms: Arc<Rooms>,
    /// Token verification.
    pub auth: Authenticator,
    /// DoS limits.
    pub limits: Arc<Limits>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// TLS acceptor, when `tls.enabled`.
    pub tls: Option<Tls>,
    /// WebSocket settings applied to every upgraded connection.
    pub ws_config: WebSocketConfig,
    /// Root shutdown token; every task holds it or a child.
    pub shutdown: CancellationToken,
    /// Every task spawned for connections and rooms, awaited on shutdown.
    pub tracker: TaskTracker,
    /// Global connection cap (`server.max_connections`); a permit lives as long as its connection's task.
    conn_permits: Arc<Semaphore>,
    /// Small pool for answering 503 to connections over the cap, so rejecting cannot itself exhaust memory.
    reject_permits: Arc<Semaphore>,
    next_conn: AtomicU64,
}

/// Connections over the cap that may be answered 503 at once; beyond that they are just closed.
const REJECT_POOL: usize = 64;

impl Gateway {
    /// Validates what needs files or the network (certificates, keys, NATS options) and connects to NATS (in the
    /// background if it is not up yet).
    pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Arc<Self>, ServerError> {
        config.validate()?;
        let gateway_id: Arc<str> = match &config.server.gateway_id {
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
        let bridge = Bridge::connect(&config.nats, gateway_id.clone(), metrics.clone()).await?;
        let tracker = TaskTracker::new();
        let rooms = Rooms::new(
            bridge.clone(),
            config.rooms.clone(),
            config.limits.max_tracked_keys,
            metrics.clone(),
            tracker.clone(),
            shutdown.clone(),
        );
        let limits = Arc::new(Limits::new(&config));
        let l = &config.limits;
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(l.read_buffer_size)
            .write_buffer_size(l.write_buffer_size)
            .max_write_buffer_size(l.max_write_buffer_size)
            .max_message_size(Some(l.max_message_size))
            .max_frame_size(Some(l.max_frame_size));
        tracing::info!(gateway = %gateway_id, tls = config.tls.enabled, "gateway started");
        Ok(Arc::new(Self {
            conn_permits: Arc::new(Semaphore::new(config.server.max_connections)),
            reject_permits: Arc::new(Semaphore::new(REJECT_POOL)),
            next_conn: AtomicU64::new(1),
            config,
            gateway_id,
            bridge,
            rooms,
            auth,
            limits,
            metrics,
            tls,
            ws_config,
            shutdown,
            tracker,
        }))
    }

    /// A new local connection number.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the gateway should receive traffic: connected to NATS and not shutting down.
    pub fn ready(&self) -> bool {
        self.bridge.is_connected() && !self.shutdown.is_cancelled()
    }

    /// Accepts until shutdown, then waits (at most `server.shutdown_grace`) for every connection to close.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "listening");
        }
        #[cfg(unix)]
        self.spawn_reload_on_sighup();
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((tcp, peer)) => self.spawn_connection(tcp, peer),
                Err(e) => {
                    // EMFILE/ENFILE and friends: back off instead of spinning on a full descriptor table.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        drop(listener);
        tracing::info!("shutting down: closing connections");
        self.tracker.close();
        let grace = self.config.server.shutdown_grace;
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_err() {
            tracing::warn!(
                open = self.tracker.len(),
                "shutdown grace expired with tasks still running"
            );
        }
        self.bridge.flush().await;
        tracing::info!("shutdown complete");
    }

    /// Certificate rotation: SIGHUP re-reads `tls.cert_file` / `tls.key_file`. New handshakes use the new pair;
    /// open connections are untouched. A bad pair is logged and the old one stays.
    #[cfg(unix)]
    fn spawn_reload_on_sighup(self: &Arc<Self>) {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        let gw = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = gw.shutdown.cancelled() => break,
                    got = hup.recv() => if got.is_none() { break },
                }
                if let Some(tls) = &gw.tls {
                    match tls.reload() {
                        Ok(()) => tracing::info!("TLS certificate reloaded"),
                        Err(e) => tracing::error!(error = %e, "TLS reload failed; keeping the previous certificate"),
                    }
                }
            }
        });
    }

    fn spawn_connection(self: &Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let deadline = Instant::now() + self.config.server.handshake_timeout;
        // Counted by address from accept, whatever the connection goes on to do (plain HTTP included), so one
        // address cannot hold more than its share of sockets and global slots. Over it: closed at once, which costs
        // an accept and a close, not a TLS handshake. Trusted proxies are counted by forwarded address at the upgrade.
        let ip_guard = match self.limits.admit_peer(peer.ip()) {
            Ok(guard) => guard,
            Err(why) => {
                Metrics::bump(&self.metrics.rejections, why.shed_label());
                tracing::debug!(%peer, reason = why.reason(), "connection shed at accept");
                return; // dropping the stream closes it
            }
        };
        let permit = match self.conn_permits.clone().try_acquire_owned() {
            Ok(p) => Admission::Admitted(p),
            Err(_) => match self.reject_permits.clone().try_acquire_owned() {
                Ok(p) => Admission::OverCapacity(p),
                Err(_) => {
                    Metrics::bump(&self.metrics.rejections, "capacity");
                    return; // dropping the stream closes it
                }
            },
        };
        let span = tracing::info_span!("conn", %peer);
        let gw = self.clone();
        let fut = crate::http::handle(gw, tcp, peer, deadline, permit, ip_guard);
        self.tracker.spawn(fut.instrument(span));
    }
}

/// Whether a connection got a slot under the global cap.
#[derive(Debug)]
pub enum Admission {
    /// Within `server.max_connections`; the permit is held until the connection ends.
    Admitted(OwnedSemaphorePermit),
    /// Over the cap: answer 503 and close.
    OverCapacity(OwnedSemaphorePermit),
}

/// Starts the gateway and serves `listener` until `shutdown` is cancelled. Called by `main` and by the tests.
pub async fn run(listener: TcpListener, config: Config, shutdown: CancellationToken) -> Result<(), ServerError> {
    let gateway = Gateway::start(config, shutdown).await?;
    gateway.serve(listener).await;
    Ok(())
}
