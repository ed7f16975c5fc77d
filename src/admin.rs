//! The admin listener (`[admin] listen`): HTTP/1.1 for operators and their tools, apart from the public listener so
//! that metrics and connection details need not be exposed to clients.
//!
//! Routes: `/metrics` (Prometheus text), `/healthz` (200 while the process runs), `/readyz` (200 only while connected
//! to NATS and not draining: it stays reachable here during a drain, when the public listener has stopped accepting),
//! and `/connz` (a JSON summary: connections, rooms, the top rooms by members, the NATS state).
//!
//! Plain HTTP unless `admin.tls_cert_file`/`tls_key_file` are set (tokio-rustls); with `admin.client_ca_file` too,
//! a client certificate from that CA is required in the handshake (mTLS). No other authentication: without mTLS, bind
//! it to loopback or a private network.
//!
//! Bounds, so that no client can hold the listener shut (a readiness probe must get through): at most
//! `admin.max_connections` connections, and `admin.max_connections_per_ip` from one address (more are closed at
//! accept); each connection lives at most `admin.connection_timeout` from accept, whatever it sends (hyper's header
//! timeout restarts with every request on a keep-alive connection, so alone it let a client that sends a request every
//! few seconds keep its slot forever); each request head must arrive within [`HEADER_TIMEOUT`]. The listener runs
//! until the root shutdown token is cancelled, i.e. through the whole drain.

use std::{collections::HashMap, convert::Infallible, net::IpAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};

use crate::gateway::Gateway;

/// Time a client gets to send a request head on the admin listener.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Rooms listed in `/connz`'s `top_rooms`.
pub const TOP_ROOMS: usize = 10;

/// Serves the admin routes on `listener` until the gateway's root shutdown token is cancelled. Spawn it with
/// [`Gateway::spawn`] so shutdown waits for it.
pub async fn serve(listener: TcpListener, gw: Arc<Gateway>, tls: Option<tokio_rustls::TlsAcceptor>) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, tls = tls.is_some(), "admin listening");
    }
    let permits = Arc::new(Semaphore::new(gw.config().admin.max_connections));
    let per_ip = PerIp::new(gw.config().admin.max_connections_per_ip);
    loop {
        let accepted = tokio::select! {
            _ = gw.shutdown().cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Over the cap: close at once (dropping the stream), rather than queue.
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "admin connection refused: admin.max_connections reached");
            continue;
        };
        let Some(held) = per_ip.admit(peer.ip()) else {
            tracing::debug!(%peer, "admin connection refused: admin.max_connections_per_ip reached");
            continue;
        };
        let conn_gw = gw.clone();
        let tls = tls.clone();
        let deadline = tokio::time::Instant::now() + gw.config().admin.connection_timeout;
        gw.spawn(async move {
            let (_permit, _held) = (permit, held);
            let serve = async {
                match tls {
                    None => serve_connection(conn_gw, tcp, peer).await,
                    // The handshake (the client-certificate check under mTLS) is bounded like the request head.
                    Some(acceptor) => match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => serve_connection(conn_gw, stream, peer).await,
                        Ok(Err(e)) => tracing::info!(%peer, error = %e, "admin TLS handshake refused"),
                        Err(_) => tracing::debug!(%peer, "admin TLS handshake timed out"),
                    },
                }
            };
            // Dropping the connection at the deadline closes it, whatever it was doing.
            if tokio::time::timeout_at(deadline, serve).await.is_err() {
                tracing::debug!(%peer, "admin connection closed at admin.connection_timeout");
            }
        });
    }
}

/// Admin connections per address, each at most `max`. Bound: one entry per open admin connection's address, so at
/// most `admin.max_connections` entries.
#[derive(Clone)]
struct PerIp {
    open: Arc<parking_lot::Mutex<HashMap<IpAddr, usize>>>,
    max: usize,
}

/// One admin connection's place in [`PerIp`], given back on drop.
struct PerIpSlot {
    open: Arc<parking_lot::Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl PerIp {
    fn new(max: usize) -> Self {
        Self {
            open: Arc::default(),
            max,
        }
    }

    /// A slot for one more connection from `ip`, unless it holds `max` already.
    fn admit(&self, ip: IpAddr) -> Option<PerIpSlot> {
        let mut open = self.open.lock();
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(PerIpSlot {
            open: self.open.clone(),
            ip,
        })
    }
}

impl Drop for PerIpSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock();
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// The admin listener's TLS acceptor when `admin.tls_cert_file` is set (with mTLS when `admin.client_ca_file` is).
pub fn acceptor(cfg: &crate::config::AdminConfig) -> Result<Option<tokio_rustls::TlsAcceptor>, crate::tls::TlsError> {
    let (Some(cert), Some(key)) = (&cfg.tls_cert_file, &cfg.tls_key_file) else {
        return Ok(None);
    };
    let config = crate::tls::load_admin_config(cert, key, cfg.client_ca_file.as_deref())?;
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
}

async fn serve_connection<IO>(gw: Arc<Gateway>, io: IO, peer: std::net::SocketAddr)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc_gw = gw.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let gw = svc_gw.clone();
        async move { Ok::<_, Infallible>(route(&gw, &req)) }
    });
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = gw.shutdown().cancelled() => {
            conn.as_mut().graceful_shutdown();
            // Bounded: a peer that never reads must not hold shutdown.
            tokio::time::timeout(HEADER_TIMEOUT, conn).await.unwrap_or(Ok(()))
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "admin connection ended with an error");
    }
}

fn route(gw: &Gateway, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => metrics(gw),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if gw.ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/connz" => {
            let mut resp = Response::new(Full::new(Bytes::from(connz(gw).to_string())));
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The Prometheus text exposition, for the admin listener and (with `server.public_metrics`) the public one.
pub fn metrics(gw: &Gateway) -> Response<Full<Bytes>> {
    gw.metrics().nats_connected.set(i64::from(gw.bridge().is_connected()));
    if let Some(h) = gw.history() {
        let requests = i64::try_from(h.replayer().requests()).unwrap_or(i64::MAX);
        gw.metrics().history_requests.set(requests);
    }
    let mut resp = text(StatusCode::OK, gw.metrics().render());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// The `/connz` summary. Room names are the clients' own (validated at join to a safe character set).
pub fn connz(gw: &Gateway) -> serde_json::Value {
    let top: Vec<serde_json::Value> = gw
        .rooms()
        .top_rooms(TOP_ROOMS)
        .into_iter()
        .map(|(room, members)| serde_json::json!({ "room": &*room, "members": members }))
        .collect();
    serde_json::json!({
        "gateway": &**gw.id(),
        "connections": gw.metrics().connections_open.get(),
        "rooms": gw.rooms().len(),
        "top_rooms": top,
        "nats": { "connected": gw.bridge().is_connected() },
        "ready": gw.ready(),
        "draining": gw.drain().is_cancelled(),
    })
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
