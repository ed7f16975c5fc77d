//! One TCP connection's life before it becomes a WebSocket: TLS handshake, HTTP/1.1 (hyper), the routes
//! (`/healthz`, `/readyz`, `/metrics`, the WebSocket path, `/client/check`, the embedded files of [`crate::assets`]),
//! and the upgrade checks in order: upgrade headers, Origin,
//! client address (forwarding header from trusted proxies) and its per-IP limits, token; then the 101, which accepts
//! a permessage-deflate offer when `[compression]` allows it (`crate::deflate`). Every refusal is an HTTP
//! status with a short text body ([`Reject::response`]), never a 101.
//!
//! The handshake deadline (`server.handshake_timeout`) is absolute from TCP accept and covers the whole TLS + HTTP
//! phase: a connection that has not upgraded by then is closed, whatever it sends. hyper's own
//! `header_read_timeout` restarts for every request, so keep-alive requests alone (`GET /healthz` every 2 s) would
//! otherwise hold a socket and a global slot forever. After a successful upgrade the WebSocket moves to a task of its
//! own (sized for it alone), taking the connection's global permit and per-IP guard with it, so they live exactly as
//! long as the connection.
//!
//! At capacity (over `server.max_connections`) a connection still gets one answer before it is closed: `/healthz`
//! 200 (the process is alive; an orchestrator must not restart a full gateway), `/metrics`, `/readyz` 503
//! `at capacity` (a load balancer sends new clients elsewhere), and 503 on the WebSocket path.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
    upgrade::OnUpgrade,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::oneshot,
    time::Instant,
};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use tracing::Instrument;

use crate::{
    auth::{self, AuthError, Identity},
    connection::{Accepted, Endpoint},
    deflate::Agreement,
    frames::FrameMeter,
    gateway::Gateway,
    limits::{ConnSlot, ForwardedError, IpGuard, Rejection},
    metrics::Rejected,
    wire::Wire,
};

/// Sub-protocol name a client may request; echoed when offered.
pub const SUBPROTOCOL: &str = "roomwire.v1";

/// Why a request was not upgraded. Each maps to one status in [`Reject::response`].
#[derive(Debug, thiserror::Error)]
pub enum Reject {
    /// Unknown path.
    #[error("not found")]
    NotFound,
    /// A plain request to the WebSocket path.
    #[error("this endpoint only accepts WebSocket upgrades")]
    UpgradeRequired,
    /// Upgrade headers present but wrong (version, key, method).
    #[error("bad WebSocket upgrade: {0}")]
    BadUpgrade(&'static str),
    /// Origin not in `server.allowed_origins`.
    #[error("origin not allowed")]
    Origin,
    /// Per-IP connection count or rate (of a client counted at the upgrade, behind a trusted proxy).
    #[error("{}", .0.reason())]
    Limited(Rejection),
    /// A trusted proxy's forwarding header is malformed: there is no client address to count.
    #[error("{0}")]
    Forwarded(ForwardedError),
    /// Over `server.max_connections`.
    #[error("server at capacity")]
    Capacity,
    /// Token missing or invalid.
    #[error("{}", .0.reason())]
    Unauthorized(AuthError),
}

impl From<AuthError> for Reject {
    /// A refused token is 401; saturated checks or a shutdown are not the client's fault, so 503.
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Busy | AuthError::Cancelled => Reject::Capacity,
            e => Reject::Unauthorized(e),
        }
    }
}

impl Reject {
    /// HTTP status of this refusal.
    pub fn status(&self) -> StatusCode {
        match self {
            Reject::NotFound => StatusCode::NOT_FOUND,
            Reject::UpgradeRequired => StatusCode::UPGRADE_REQUIRED,
            Reject::BadUpgrade(_) => StatusCode::BAD_REQUEST,
            Reject::Origin => StatusCode::FORBIDDEN,
            Reject::Limited(_) => StatusCode::TOO_MANY_REQUESTS,
            Reject::Forwarded(_) => StatusCode::BAD_REQUEST,
            Reject::Capacity => StatusCode::SERVICE_UNAVAILABLE,
            Reject::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        }
    }

    /// Metrics reason.
    fn reason(&self) -> Rejected {
        match self {
            Reject::NotFound => Rejected::NotFound,
            Reject::UpgradeRequired | Reject::BadUpgrade(_) => Rejected::BadUpgrade,
            Reject::Origin => Rejected::Origin,
            Reject::Limited(Rejection::ConnectionRate) => Rejected::Rate,
            Reject::Limited(Rejection::TooManyPerIp) => Rejected::PerIp,
            Reject::Forwarded(_) => Rejected::Forwarded,
            Reject::Capacity => Rejected::Capacity,
            Reject::Unauthorized(_) => Rejected::Unauthorized,
        }
    }

    /// The response the client sees.
    pub fn response(&self) -> Response<Full<Bytes>> {
        let mut resp = text(self.status(), format!("{self}\n"));
        if let Reject::UpgradeRequired = self {
            resp.headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        if let Reject::Unauthorized(_) = self {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
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

/// What the HTTP service hands back to the connection task after answering 101.
struct Upgrade {
    on_upgrade: OnUpgrade,
    identity: Identity,
    client: SocketAddr,
    /// Where the client got to in its server-side history rooms (the `recover` query parameter).
    recover: Vec<(String, crate::protocol::Since)>,
    /// The per-IP slot of a client counted at the upgrade (behind a trusted proxy); `None` when the connection was
    /// counted by its peer address at accept.
    ip_guard: Option<IpGuard>,
    /// The permessage-deflate offer accepted, if any.
    deflate: Option<Agreement>,
}

/// One accepted TCP connection's task: TLS (if enabled), HTTP, then the WebSocket session if upgraded, all of it
/// before the upgrade within `deadline` (accept + `server.handshake_timeout`). `slot` holds the connection's global
/// permit and per-address count (for a trusted proxy, the count is added at the upgrade by forwarded address); it
/// moves into the session on upgrade, and every other path (refusal, timeout, failed handshake, panic) drops it here.
pub async fn handshake<S: Endpoint>(
    gw: Arc<Gateway>,
    tcp: TcpStream,
    peer: SocketAddr,
    deadline: Instant,
    slot: ConnSlot,
    session: S,
) {
    let _ = tcp.set_nodelay(true);
    match gw.tls() {
        Some(tls) => {
            // rustls's unbuffered API: no TLS buffer stays with an idle connection (`crate::tls_stream`).
            let accept = crate::tls_stream::TlsStream::accept(tcp, tls.current());
            match tokio::time::timeout_at(deadline, accept).await {
                Ok(Ok(stream)) => serve_http(gw, stream, peer, deadline, slot, session).await,
                Ok(Err(e)) => {
                    gw.metrics().rejections.inc(Rejected::Tls);
                    tracing::debug!(error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    gw.metrics().rejections.inc(Rejected::HandshakeTimeout);
                    tracing::debug!("TLS handshake timed out");
                }
            }
        }
        None => serve_http(gw, tcp, peer, deadline, slot, session).await,
    }
}

/// HTTP until the upgrade (under the absolute deadline), then the session in a task of its own.
async fn serve_http<IO, S: Endpoint>(
    gw: Arc<Gateway>,
    io: IO,
    peer: SocketAddr,
    deadline: Instant,
    mut slot: ConnSlot,
    session: S,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let over_capacity = slot.over_capacity();
    let counted_at_accept = slot.counted_at_accept();
    // One absolute deadline for every request on this connection (see the module doc): dropping the HTTP
    // connection at the deadline closes the socket, and this task's slots go with it.
    let phase = http_phase(&gw, io, peer, deadline, over_capacity, counted_at_accept);
    let upgrade = match tokio::time::timeout_at(deadline, phase).await {
        Ok(Some(upgrade)) => upgrade,
        Ok(None) => return,
        Err(_) => {
            gw.metrics().rejections.inc(Rejected::HandshakeTimeout);
            tracing::debug!("not upgraded within the handshake deadline: closed");
            return;
        }
    };
    // A trusted proxy's connection is counted from here on under its client's address (see `upgrade`).
    if let Some(guard) = upgrade.ip_guard {
        slot.count_forwarded(guard);
    }
    let upgraded = match upgrade.on_upgrade.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    // Back to the socket itself: hyper's upgraded IO is a boxed trait object with a replay buffer in front, a
    // pointer and a vtable call on every read and write of the connection's life.
    let parts = match upgraded.downcast::<TokioIo<IO>>() {
        Ok(parts) => parts,
        Err(_) => {
            tracing::warn!("upgraded connection of an unexpected type: closed");
            return;
        }
    };
    // Every frame the client sends is charged to its rate limits as it arrives (see `crate::frames`), the bytes
    // hyper read past the upgrade request included.
    let meter = FrameMeter::new(gw.limits().message_limiter(upgrade.identity.user.as_deref()))
        .deflate(upgrade.deflate.is_some());
    let wire = Wire::new(parts.io.into_inner(), &parts.read_buf, meter, &gw.ws_config())
        .fragment_timeout(gw.config().limits.fragment_timeout);
    let id = gw.next_conn_id();
    let span = tracing::Span::current();
    span.record("peer", tracing::field::display(upgrade.client));
    span.record("id", id);
    if let Some(user) = upgrade.identity.user.as_deref() {
        span.record("user", tracing::field::debug(user));
    }
    let accepted = Accepted {
        id,
        peer: upgrade.client,
        identity: upgrade.identity,
        recover: upgrade.recover,
        slot,
        deflate: upgrade.deflate,
    };
    // The WebSocket gets a task of its own, sized for the WebSocket alone: this handshake task's state (TLS and
    // HTTP futures, their arguments) would otherwise stay allocated for the whole life of every idle connection.
    let span = tracing::Span::current();
    gw.clone().spawn(session.serve(gw, wire, accepted).instrument(span));
}

/// Serves HTTP until the connection closes or is upgraded; returns the upgrade, if any. The caller bounds it by the
/// handshake deadline.
async fn http_phase<IO>(
    gw: &Arc<Gateway>,
    io: IO,
    peer: SocketAddr,
    deadline: Instant,
    over_capacity: bool,
    counted_at_accept: bool,
) -> Option<Upgrade>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = oneshot::channel::<Upgrade>();
    let tx = Arc::new(Mutex::new(Some(tx)));
    let svc_gw = gw.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let gw = svc_gw.clone();
        let tx = tx.clone();
        async move { Ok::<_, Infallible>(route(&gw, req, peer, over_capacity, counted_at_accept, &tx).await) }
    });
    // Only bounds the first request head; later ones are bounded by the caller's absolute deadline.
    let remaining = deadline.saturating_duration_since(Instant::now());
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(remaining.max(std::time::Duration::from_millis(1)))
        .max_buf_size(gw.config().server.max_header_bytes)
        .keep_alive(!over_capacity);
    let conn = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = gw.shutdown().cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
    // `route` sends the upgrade before its 101 is written, so it is already here if there is one. Awaiting `rx`
    // would hang forever otherwise: its sender lives in the service inside `conn`, which is still alive here, and
    // the task would keep the socket and its connection permit.
    rx.try_recv().ok()
}

async fn route(
    gw: &Gateway,
    req: Request<Incoming>,
    peer: SocketAddr,
    over_capacity: bool,
    counted_at_accept: bool,
    tx: &Mutex<Option<oneshot::Sender<Upgrade>>>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match path {
        // Liveness: the process runs and answers, full or not.
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            // This probe is a new connection over the cap, so a new client would be refused too: steer them away.
            if over_capacity {
                text(StatusCode::SERVICE_UNAVAILABLE, "at capacity\n")
            } else if gw.ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        // Off unless `server.public_metrics = true`: then it is a 404 like any unknown path, served by the admin
        // listener instead.
        "/metrics" if gw.config().server.public_metrics => crate::admin::metrics(gw),
        p if p == gw.config().server.ws_path && over_capacity => {
            gw.metrics().rejections.inc(Reject::Capacity.reason());
            Reject::Capacity.response()
        }
        p if p == gw.config().server.ws_path => match upgrade(gw, req, peer, counted_at_accept, tx).await {
            Ok(resp) => resp,
            Err(reject) => {
                gw.metrics().rejections.inc(reject.reason());
                tracing::debug!(status = %reject.status(), reason = %reject, "upgrade refused");
                reject.response()
            }
        },
        "/client/check" => token_check(gw, &req, peer).await,
        _ => crate::assets::serve(path, req.method(), req.headers(), gw.config().server.demo)
            .unwrap_or_else(|| Reject::NotFound.response()),
    }
}

/// `/client/check`: the upgrade's Origin and token checks without the upgrade (200, or the status the upgrade would
/// answer). Browsers never see the status of a refused WebSocket upgrade, only a close 1006, so the client library asks
/// here after a connection failed before opening, to tell a refused token (stop retrying, show why) from a network
/// failure (retry). It costs what a refused upgrade costs (one signature check, bounded by
/// `auth.max_concurrent_verifications`), so every request is charged like an upgrade to its client address's
/// connection rate (`limits.connections_per_second_per_ip`; 429 past it), before any token work: eight keep-alive
/// connections asking in a loop used to take 1.5 cores.
async fn token_check(gw: &Gateway, req: &Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
    let charged = gw
        .limits()
        .client_ip(peer, req.headers())
        .map_err(Reject::Forwarded)
        .and_then(|ip| gw.limits().charge_check(ip).map_err(Reject::Limited));
    if let Err(reject) = charged {
        gw.metrics().rejections.inc(reject.reason());
        return reject.response();
    }
    let origin_ok = gw.limits().origin_allowed(req.headers());
    let verdict = if origin_ok {
        let token = auth::extract_token(req.headers(), req.uri(), gw.config().auth.cookie.as_deref());
        gw.auth()
            .authenticate_bounded(token.as_deref(), gw.shutdown())
            .await
            .and_then(|identity| match gw.control().is_revoked(&identity) {
                true => Err(AuthError::Revoked),
                false => Ok(()),
            })
            .map_err(Reject::from)
    } else {
        Err(Reject::Origin)
    };
    let mut resp = match verdict {
        Ok(()) => text(StatusCode::OK, "ok\n"),
        Err(reject) => reject.response(),
    };
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // A page on an allowed origin may read the answer (the token is its own; the answer reveals nothing else).
    if let (true, Some(origin)) = (origin_ok, req.headers().get(header::ORIGIN)) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    resp
}

fn header_has_token(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The upgrade checks, in the order of the module doc (headers, Origin, client address and its count, token), then
/// the 101. One function on purpose: each check is a few lines and their order is the security property, which reads
/// best top to bottom.
async fn upgrade(
    gw: &Gateway,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    counted_at_accept: bool,
    tx: &Mutex<Option<oneshot::Sender<Upgrade>>>,
) -> Result<Response<Full<Bytes>>, Reject> {
    if !header_has_token(&req, header::UPGRADE, "websocket") {
        return Err(Reject::UpgradeRequired);
    }
    if req.method() != hyper::Method::GET {
        return Err(Reject::BadUpgrade("method must be GET"));
    }
    // RFC 6455 section 4.1: the opening handshake is HTTP/1.1 or later (hyper would otherwise answer an HTTP/1.0
    // request with "HTTP/1.0 101", which no HTTP/1.0 party understands).
    if req.version() < hyper::Version::HTTP_11 {
        return Err(Reject::BadUpgrade("HTTP/1.1 required"));
    }
    if !header_has_token(&req, header::CONNECTION, "upgrade") {
        return Err(Reject::BadUpgrade("missing `Connection: upgrade`"));
    }
    if req.headers().get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Err(Reject::BadUpgrade("Sec-WebSocket-Version must be 13"));
    }
    let key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or(Reject::BadUpgrade("missing Sec-WebSocket-Key"))?;
    if key.len() != 24 {
        return Err(Reject::BadUpgrade("malformed Sec-WebSocket-Key"));
    }
    let accept = derive_accept_key(key.as_bytes());
    if !gw.limits().origin_allowed(req.headers()) {
        return Err(Reject::Origin);
    }
    // A direct client was counted by its peer address at accept. A trusted proxy's client is counted here, by the
    // address in the configured forwarding header (a malformed one is refused, never replaced by the proxy's).
    let (client, ip_guard) = if counted_at_accept {
        (SocketAddr::new(peer.ip().to_canonical(), peer.port()), None)
    } else {
        let ip = gw.limits().client_ip(peer, req.headers()).map_err(Reject::Forwarded)?;
        let guard = gw.limits().admit(ip).map_err(Reject::Limited)?;
        (SocketAddr::new(ip, peer.port()), Some(guard))
    };
    // Checked before the token: a malformed one costs no signature check.
    let recover = match req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("recover=")))
    {
        Some(raw) => crate::protocol::parse_recover(raw, gw.config().rooms.max_rooms_per_connection)
            .map_err(Reject::BadUpgrade)?,
        None => Vec::new(),
    };
    let token = auth::extract_token(req.headers(), req.uri(), gw.config().auth.cookie.as_deref());
    // The signature check runs off the async workers, bounded (auth.max_concurrent_verifications).
    let identity = gw
        .auth()
        .authenticate_bounded(token.as_deref(), gw.shutdown())
        .await
        .and_then(|identity| match gw.control().is_revoked(&identity) {
            true => Err(AuthError::Revoked),
            false => Ok(identity),
        })
        .map_err(Reject::from)
        .inspect_err(|reject| {
            if let Reject::Unauthorized(e) = reject {
                tracing::info!(uri = %auth::redact_uri(req.uri()), reason = %e, "authentication failed");
            }
        })?;
    let subprotocol = header_has_token(&req, header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL);
    let deflate = negotiate_deflate(gw, &req);

    let Some(tx) = tx.lock().take() else {
        return Err(Reject::BadUpgrade("connection already upgraded"));
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let _ = tx.send(Upgrade {
        on_upgrade,
        identity,
        client,
        recover,
        ip_guard,
        deflate,
    });

    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).map_err(|_| Reject::BadUpgrade("key"))?,
    );
    if subprotocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(SUBPROTOCOL));
    }
    if let Some(agreement) = deflate
        && let Ok(value) = HeaderValue::from_str(&agreement.response())
    {
        h.insert(header::SEC_WEBSOCKET_EXTENSIONS, value);
    }
    Ok(resp)
}

/// The client's permessage-deflate offer the gateway accepts (`crate::deflate::negotiate`), unless
/// `compression.enabled = false`. A client that offers nothing is answered with no extension, as before issue 27.
fn negotiate_deflate(gw: &Gateway, req: &Request<Incoming>) -> Option<Agreement> {
    if !gw.config().compression.enabled {
        return None;
    }
    let offers = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok());
    let user_agent = req.headers().get(header::USER_AGENT).and_then(|v| v.to_str().ok());
    crate::deflate::negotiate(offers, user_agent)
}
