//! The accept loop: [`run`] accepts until shutdown, then waits (bounded) for every connection to close.
//!
//! The loop only accepts: it asks [`Limits::admit_connection`](crate::limits::Limits::admit_connection) for the
//! connection's slot (shedding it at once, before any TLS work, when its address is over
//! `limits.max_connections_per_ip` or its new-connection rate, or when even the over-capacity answers are busy) and
//! spawns the connection's task; TLS, HTTP and the WebSocket upgrade all happen in that task
//! ([`crate::http::handshake`]) under the handshake deadline, absolute from accept. On shutdown it stops accepting,
//! every task sees the cancelled token, and the wait for them is bounded by `server.shutdown_grace`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    time::Instant,
};
use tracing::Instrument;

use crate::{
    connection::{Endpoint, RoomEndpoint},
    gateway::Gateway,
};

/// Serves `listener` with `gateway` until its drain or shutdown token is cancelled, then closes every connection
/// (after a drain: each at its own moment within `server.drain_window`; then whatever is left at once, bounded by
/// `server.shutdown_grace`) and flushes NATS. Called by `main` and by the tests, after [`Gateway::start`].
pub async fn run(listener: TcpListener, gateway: Arc<Gateway>) {
    run_with(listener, gateway, RoomEndpoint).await;
}

/// [`run`], with upgraded WebSockets served by `session` (the Autobahn run passes its echo).
pub async fn run_with<S: Endpoint>(listener: TcpListener, gateway: Arc<Gateway>, session: S) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "listening");
    }
    #[cfg(unix)]
    reload_certificates_on_sighup(&gateway);
    reload_certificates_on_change(&gateway);
    loop {
        let accepted = tokio::select! {
            _ = gateway.shutdown().cancelled() => break,
            _ = gateway.drain().cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => spawn_connection(&gateway, tcp, peer, session),
            Err(e) => {
                // EMFILE/ENFILE and friends: back off instead of spinning on a full descriptor table.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    if !gateway.shutdown().is_cancelled() {
        drain(&gateway).await;
    }
    tracing::info!("shutting down: closing connections");
    let tracker = gateway.tracker();
    tracker.close();
    // Everything left (handshakes in progress, rooms, history maintenance, stragglers of the drain) ends now.
    gateway.shutdown().cancel();
    let grace = gateway.config().server.shutdown_grace;
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(open = tracker.len(), "shutdown grace expired with tasks still running");
    }
    gateway.bridge().flush().await;
    tracing::info!("shutdown complete");
}

/// The drain: every WebSocket closes itself at its own moment within `server.drain_window` (see
/// [`crate::shutdown::drain_turn`]); this waits until none is open, at most the window plus `server.shutdown_grace`
/// (a connection whose writer is stuck must not hold the process). The connection gauge has no change notification,
/// so it is polled; 20 ms is far below the spread that matters and costs nothing over a few seconds.
async fn drain(gateway: &Gateway) {
    let server = &gateway.config().server;
    let open = || gateway.metrics().connections_open.get();
    tracing::info!(open = open(), window = ?server.drain_window, "draining: closing connections over the window");
    let deadline = Instant::now() + server.drain_window + server.shutdown_grace;
    while open() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if open() > 0 {
        tracing::warn!(
            open = open(),
            "drain window and grace over with connections still open: closing them now"
        );
    }
}

/// Takes the connection's slot and spawns its task; everything else happens in that task.
fn spawn_connection<S: Endpoint>(gateway: &Arc<Gateway>, tcp: TcpStream, peer: SocketAddr, session: S) {
    let deadline = Instant::now() + gateway.config().server.handshake_timeout;
    // Counted by address from accept, whatever the connection goes on to do (plain HTTP included), so one address
    // cannot hold more than its share of sockets and global slots. Shedding costs an accept and a close, not a TLS
    // handshake. Trusted proxies are counted by forwarded address at the upgrade.
    let slot = match gateway.limits().admit_connection(peer.ip()) {
        Ok(slot) => slot,
        Err(shed) => {
            gateway.metrics().rejections.inc(shed.reason());
            tracing::debug!(%peer, reason = ?shed, "connection shed at accept");
            return; // dropping the stream closes it
        }
    };
    // `id` and `user` are recorded at the upgrade; the user (a token's `sub`) as Debug, so it is quoted and escaped
    // and cannot forge a log line.
    let span = tracing::info_span!("conn", %peer, id = tracing::field::Empty, user = tracing::field::Empty);
    let task = crate::http::handshake(gateway.clone(), tcp, peer, deadline, slot, session);
    gateway.spawn(task.instrument(span));
}

/// Certificate rotation without a signal: every `tls.watch_interval`, the size and modification time of the
/// certificate and key files are compared with the last seen; a change reloads them (the same reload as SIGHUP).
/// Polling two `stat`s, rather than inotify, follows the symlink swaps of Kubernetes secrets and cert-manager, works
/// on every filesystem, and needs no dependency. A pair caught half-written fails to load, is logged, and the old
/// certificate stays; the next write changes the files again and is picked up.
fn reload_certificates_on_change(gateway: &Arc<Gateway>) {
    let every = gateway.config().tls.watch_interval;
    let Some(tls) = gateway.tls() else { return };
    if every.is_zero() {
        return;
    }
    let mut seen = tls.files_fingerprint();
    let gw = gateway.clone();
    gateway.spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = gw.shutdown().cancelled() => break,
                _ = tick.tick() => {}
            }
            let Some(tls) = gw.tls() else { break };
            let now = tls.files_fingerprint();
            if now.is_none() || now == seen {
                continue;
            }
            seen = now;
            match tls.reload() {
                Ok(()) => tracing::info!("TLS certificate files changed: reloaded"),
                Err(e) => tracing::error!(error = %e, "TLS certificate files changed but do not load; keeping the previous certificate"),
            }
        }
    });
}

/// Certificate rotation: SIGHUP re-reads `tls.cert_file` / `tls.key_file`. New handshakes use the new pair; open
/// connections are untouched. A bad pair is logged and the old one stays.
#[cfg(unix)]
fn reload_certificates_on_sighup(gateway: &Arc<Gateway>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    let gw = gateway.clone();
    gateway.spawn(async move {
        loop {
            tokio::select! {
                _ = gw.shutdown().cancelled() => break,
                got = hup.recv() => if got.is_none() { break },
            }
            if let Some(tls) = gw.tls() {
                match tls.reload() {
                    Ok(()) => tracing::info!("TLS certificate reloaded"),
                    Err(e) => tracing::error!(error = %e, "TLS reload failed; keeping the previous certificate"),
                }
            }
        }
    });
}
