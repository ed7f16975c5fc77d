//! Counters and gauges kept by every part of the gateway, exported in the Prometheus text format at `GET /metrics`.
//!
//! Hot-path counters are bumped once per NATS message (by the number of deliveries), never once per recipient.
//! Labelled families are used only for rare events (rejections, drops, errors) and for RPC calls (one count per call,
//! which is a request/reply and never a fan-out). Their one label (`reason`; `result` for RPC calls) takes its values
//! from an enum per family ([`Reason`]), never from a string at a call site, so the number of series is bounded by the
//! code, not by traffic; reading a counter ([`ByReason::get`]) never creates a series.

use std::{
    marker::PhantomData,
    sync::atomic::{AtomicI64, AtomicU64, Ordering},
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Label set with one label (`reason`, or the family's [`Reason::LABEL`]).
type ReasonLabels = [(&'static str, &'static str); 1];

/// A closed set of values for a family's one label.
pub trait Reason: Copy {
    /// The label's name: `reason` unless a family says otherwise (`result` for RPC calls, whose "ok" is no reason).
    const LABEL: &'static str = "reason";
    /// The label value (snake_case).
    fn as_str(self) -> &'static str;
}

/// A counter family with one label ([`Reason::LABEL`]) whose values are the `R`s.
#[derive(Debug)]
pub struct ByReason<R> {
    family: Family<ReasonLabels, Counter>,
    _reason: PhantomData<fn(R)>,
}

impl<R> Default for ByReason<R> {
    fn default() -> Self {
        Self {
            family: Family::default(),
            _reason: PhantomData,
        }
    }
}

impl<R: Reason> ByReason<R> {
    /// Counts one event.
    pub fn inc(&self, reason: R) {
        self.inc_by(reason, 1);
    }

    /// Counts `n` events.
    pub fn inc_by(&self, reason: R, n: u64) {
        self.family.get_or_create(&[(R::LABEL, reason.as_str())]).inc_by(n);
    }

    /// The count so far (0 for a reason never counted; reading creates no series).
    pub fn get(&self, reason: R) -> u64 {
        self.family.get(&[(R::LABEL, reason.as_str())]).map_or(0, |c| c.get())
    }
}

/// Why a connection was refused before the upgrade, or shed at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// The TLS handshake failed.
    Tls,
    /// Not upgraded within `server.handshake_timeout` of accept.
    HandshakeTimeout,
    /// Shed at accept: the address holds `limits.max_connections_per_ip` connections.
    ShedPerIp,
    /// Shed at accept: the address opens connections too fast.
    ShedRate,
    /// Over `server.max_connections` (or the token checks are saturated).
    Capacity,
    /// Unknown path.
    NotFound,
    /// Not a valid WebSocket upgrade.
    BadUpgrade,
    /// `Origin` not allowed.
    Origin,
    /// Behind a trusted proxy: the forwarded address opens connections too fast.
    Rate,
    /// Behind a trusted proxy: the forwarded address holds too many connections.
    PerIp,
    /// A malformed forwarding header from a trusted proxy.
    Forwarded,
    /// Missing or invalid token.
    Unauthorized,
}

impl Reason for Rejected {
    fn as_str(self) -> &'static str {
        match self {
            Rejected::Tls => "tls",
            Rejected::HandshakeTimeout => "handshake_timeout",
            Rejected::ShedPerIp => "shed_per_ip",
            Rejected::ShedRate => "shed_rate",
            Rejected::Capacity => "capacity",
            Rejected::NotFound => "not_found",
            Rejected::BadUpgrade => "bad_upgrade",
            Rejected::Origin => "origin",
            Rejected::Rate => "rate",
            Rejected::PerIp => "per_ip",
            Rejected::Forwarded => "forwarded",
            Rejected::Unauthorized => "unauthorized",
        }
    }
}

/// Why the gateway closed a connection (besides slow consumers, counted apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Nothing heard within `limits.heartbeat_timeout` (1001).
    HeartbeatTimeout,
    /// The token (or the session) expired (4001).
    TokenExpired,
    /// `limits.max_rate_violations` refused frames in a row (1008).
    RateAbuse,
    /// A message or frame over the size limits (1009).
    TooBig,
    /// A fragmented message left open past `limits.fragment_timeout` (1008).
    FragmentTimeout,
    /// A WebSocket protocol violation (1002).
    ProtocolError,
    /// Invalid UTF-8 in a text message (1007).
    InvalidUtf8,
    /// A compressed message that is not valid deflate data (1007).
    InvalidCompressed,
    /// An outgoing frame over `limits.max_write_buffer_size` (1011; `Config::validate` makes it unreachable).
    WriteBufferFull,
    /// The client's connection ended without a close frame (TCP closed or reset: a tab closed, a network lost). An
    /// ordinary disconnect, counted apart so that `protocol_error` counts only real violations.
    ClientGone,
}

impl Reason for Closed {
    fn as_str(self) -> &'static str {
        match self {
            Closed::HeartbeatTimeout => "heartbeat_timeout",
            Closed::TokenExpired => "token_expired",
            Closed::RateAbuse => "rate_abuse",
            Closed::TooBig => "too_big",
            Closed::FragmentTimeout => "fragment_timeout",
            Closed::ProtocolError => "protocol_error",
            Closed::InvalidUtf8 => "invalid_utf8",
            Closed::InvalidCompressed => "invalid_compressed",
            Closed::WriteBufferFull => "write_buffer_full",
            Closed::ClientGone => "client_gone",
        }
    }
}

/// What kind of NATS failure a client publish met (`roomwire_publish_failures_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Could not connect.
    Connect,
    /// NATS is away.
    Disconnected,
    /// NATS did not accept it in time.
    Timeout,
    /// Over the server's `max_payload` or the byte budget.
    TooLarge,
    /// The server refused it.
    Refused,
    /// Any other client error.
    Error,
}

impl Reason for Failure {
    fn as_str(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Disconnected => "disconnected",
            Failure::Timeout => "timeout",
            Failure::TooLarge => "too_large",
            Failure::Refused => "refused",
            Failure::Error => "error",
        }
    }
}

/// How a recovering join (`since`) was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// `recovered:true`: the missed messages were replayed.
    Recovered,
    /// `recovered:false`: the client must resync.
    NotRecovered,
}

impl Reason for Recovery {
    fn as_str(self) -> &'static str {
        match self {
            Recovery::Recovered => "recovered",
            Recovery::NotRecovered => "not_recovered",
        }
    }
}

/// What became of a backend command (`crate::control`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlOutcome {
    /// A `disconnect` was carried out.
    Disconnect,
    /// A `subscribe` was handed to the user's connections.
    Subscribe,
    /// An `unsubscribe` was handed to the user's connections.
    Unsubscribe,
    /// A `revoke` was carried out.
    Revoke,
    /// Not the JSON its command takes (or an invalid user, room, reason, time).
    Malformed,
    /// A subject naming no command.
    Unknown,
    /// Over `nats.control_commands_per_second`: dropped.
    RateLimited,
    /// A bound was reached: a connection's pending room commands, or `auth.max_revocations`.
    Full,
}

impl Reason for ControlOutcome {
    fn as_str(self) -> &'static str {
        match self {
            ControlOutcome::Disconnect => "disconnect",
            ControlOutcome::Subscribe => "subscribe",
            ControlOutcome::Unsubscribe => "unsubscribe",
            ControlOutcome::Revoke => "revoke",
            ControlOutcome::Malformed => "malformed",
            ControlOutcome::Unknown => "unknown",
            ControlOutcome::RateLimited => "rate_limited",
            ControlOutcome::Full => "full",
        }
    }
}

/// Why a connection was closed as a slow consumer (4008).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowConsumer {
    /// Its queue overflowed under policy `disconnect`.
    QueueFull,
    /// A write did not finish within `limits.write_timeout`.
    WriteTimeout,
}

impl Reason for SlowConsumer {
    fn as_str(self) -> &'static str {
        match self {
            SlowConsumer::QueueFull => "queue_full",
            SlowConsumer::WriteTimeout => "write_timeout",
        }
    }
}

/// How an `rpc` op ended (`roomwire_rpc_calls_total{result}`): every call is counted once, refused ones included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcResult {
    /// `rpc_result` with the service's data.
    Ok,
    /// `rpc_result` with the service's ADR-32 error.
    ServiceError,
    /// Nobody serves the method.
    NoResponders,
    /// No answer within the call's timeout.
    Timeout,
    /// The request over NATS's `max_payload`, or the answer over `limits.max_message_size`.
    TooLarge,
    /// NATS is away or refused the request.
    Unavailable,
    /// Refused before NATS: RPC off, or a malformed method name.
    BadRequest,
    /// Refused before NATS: the method is outside the caller's permissions.
    Forbidden,
    /// Refused before NATS: `rpc.max_inflight_per_connection` calls already wait.
    RateLimited,
}

impl Reason for RpcResult {
    const LABEL: &'static str = "result";
    fn as_str(self) -> &'static str {
        match self {
            RpcResult::Ok => "ok",
            RpcResult::ServiceError => "service_error",
            RpcResult::NoResponders => "no_responders",
            RpcResult::Timeout => "timeout",
            RpcResult::TooLarge => "too_large",
            RpcResult::Unavailable => "unavailable",
            RpcResult::BadRequest => "bad_request",
            RpcResult::Forbidden => "forbidden",
            RpcResult::RateLimited => "rate_limited",
        }
    }
}

/// Room messages are dropped by the room's overflow policy.
impl Reason for crate::outbox::Overflow {
    fn as_str(self) -> &'static str {
        match self {
            crate::outbox::Overflow::Disconnect => "disconnect",
            crate::outbox::Overflow::DropOldest => "drop_oldest",
            crate::outbox::Overflow::DropNewest => "drop_newest",
            crate::outbox::Overflow::Latest => "latest",
        }
    }
}

/// Error frames are counted by their code.
impl Reason for crate::protocol::ErrorCode {
    fn as_str(self) -> &'static str {
        crate::protocol::ErrorCode::as_str(self)
    }
}

/// All metrics of one gateway process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// WebSocket connections established.
    pub connections: Counter,
    /// WebSocket connections open now.
    pub connections_open: Gauge<i64, AtomicI64>,
    /// Connections refused before the upgrade, by reason (`origin`, `unauthorized`, `per_ip`, `rate`, `capacity`,
    /// `handshake_timeout`, `bad_upgrade`, `forwarded`), and connections shed at accept without TLS work
    /// (`shed_per_ip`, `shed_rate`).
    pub rejections: ByReason<Rejected>,
    /// Client frames received.
    pub frames_in: Counter,
    /// Client publishes forwarded to NATS.
    pub publishes: Counter,
    /// Client publishes answered `unavailable` or `too_large`, by reason (`disconnected`, `timeout`, `error`, ...).
    pub publish_failures: ByReason<Failure>,
    /// NATS messages fanned out to local members.
    pub room_messages: Counter,
    /// Frames queued for clients by fan-out (one per recipient).
    pub deliveries: Counter,
    /// Writes (puts and removals) of presence entries to the KV bucket (`docs/presence.md`): at most one per room
    /// per flush interval while its membership changes, plus the refresh every `presence.ttl / 3`.
    pub presence_writes: Counter,
    /// Room messages not delivered, by policy (`drop_newest`, `drop_oldest`, `latest`).
    pub dropped: ByReason<crate::outbox::Overflow>,
    /// Connections closed because they could not keep up (4008), by cause (`queue_full`, `write_timeout`).
    pub slow_consumers: ByReason<SlowConsumer>,
    /// Highest outbound queue depth (messages) any connection reached.
    pub queue_high_water: Gauge<i64, AtomicI64>,
    /// Error frames sent, by code.
    pub errors: ByReason<crate::protocol::ErrorCode>,
    /// Connections closed by the gateway, by reason.
    pub closes: ByReason<Closed>,
    /// NATS subscriptions (rooms) held now.
    pub rooms: Gauge<i64, AtomicI64>,
    /// Slow-consumer events reported by the NATS client (a room's subscription buffer overflowed).
    pub nats_slow_consumers: Counter<u64, AtomicU64>,
    /// NATS disconnections seen.
    pub nats_disconnects: Counter,
    /// Recovering joins, by outcome (`recovered`, `not_recovered`).
    pub recoveries: ByReason<Recovery>,
    /// Messages replayed to recovering clients.
    pub replayed: Counter,
    /// Backend commands, by outcome (`disconnect`, `subscribe`, `unsubscribe`, `revoke`, `malformed`, `unknown`,
    /// `rate_limited`, `full`).
    pub control_commands: ByReason<ControlOutcome>,
    /// Server-side rooms (token `subs`, `subscribe` commands) that could not be joined.
    pub server_room_failures: Counter,
    /// JetStream requests made to read history (direct gets, leader gets), set from the reader at each scrape.
    pub history_requests: Gauge<i64, AtomicI64>,
    /// Payload bytes of the messages clients sent.
    pub bytes_in: Counter,
    /// Bytes of the frames written to clients (their JSON text).
    pub bytes_out: Counter,
    /// Whether the NATS connection is up (1) or not (0), set at each scrape.
    pub nats_connected: Gauge<i64, AtomicI64>,
    /// Time from a frame being queued for a client (for room messages: as the NATS message is fanned out) to the
    /// end of its write, sampled once per written batch (its oldest frame).
    pub delivery_seconds: prometheus_client::metrics::histogram::Histogram,
    /// RPC calls, by how they ended (`ok`, `service_error`, `no_responders`, `timeout`, `too_large`, `unavailable`,
    /// and the refusals before NATS: `bad_request`, `forbidden`, `rate_limited`).
    pub rpc_calls: ByReason<RpcResult>,
    /// Time from an RPC request sent to NATS to its answer (or its failure: timeouts land at the call's deadline),
    /// once per call that passed the gateway's checks (method, permission, in-flight bound).
    pub rpc_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `roomwire_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("roomwire");
        let m = Metrics {
            connections: Counter::default(),
            connections_open: Gauge::default(),
            rejections: ByReason::default(),
            frames_in: Counter::default(),
            publishes: Counter::default(),
            publish_failures: ByReason::default(),
            room_messages: Counter::default(),
            deliveries: Counter::default(),
            presence_writes: Counter::default(),
            dropped: ByReason::default(),
            slow_consumers: ByReason::default(),
            queue_high_water: Gauge::default(),
            errors: ByReason::default(),
            closes: ByReason::default(),
            rooms: Gauge::default(),
            nats_slow_consumers: Counter::default(),
            recoveries: ByReason::default(),
            replayed: Counter::default(),
            control_commands: ByReason::default(),
            server_room_failures: Counter::default(),
            history_requests: Gauge::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            nats_connected: Gauge::default(),
            // 50 µs to about 1.6 s.
            delivery_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.00005, 2.0, 16),
            ),
            nats_disconnects: Counter::default(),
            rpc_calls: ByReason::default(),
            // 100 µs to about 13 s (`rpc.timeout` defaults to 5 s).
            rpc_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 18),
            ),
            registry: Registry::default(),
        };
        registry.register(
            "connections",
            "WebSocket connections established",
            m.connections.clone(),
        );
        registry.register(
            "connections_open",
            "WebSocket connections open now",
            m.connections_open.clone(),
        );
        registry.register(
            "rejections",
            "Connections refused before the upgrade, by reason",
            m.rejections.family.clone(),
        );
        registry.register("frames_in", "Client frames received", m.frames_in.clone());
        registry.register("publishes", "Client publishes forwarded to NATS", m.publishes.clone());
        registry.register(
            "publish_failures",
            "Client publishes answered unavailable",
            m.publish_failures.family.clone(),
        );
        registry.register("room_messages", "NATS messages fanned out", m.room_messages.clone());
        registry.register(
            "presence_writes",
            "Presence entries written or removed in the KV bucket",
            m.presence_writes.clone(),
        );
        registry.register(
            "deliveries",
            "Frames queued for clients by fan-out",
            m.deliveries.clone(),
        );
        registry.register(
            "dropped",
            "Room messages not delivered, by policy",
            m.dropped.family.clone(),
        );
        registry.register(
            "slow_consumers",
            "Connections closed as slow consumers",
            m.slow_consumers.family.clone(),
        );
        registry.register(
            "queue_high_water",
            "Highest outbound queue depth seen",
            m.queue_high_water.clone(),
        );
        registry.register("errors", "Error frames sent, by code", m.errors.family.clone());
        registry.register(
            "closes",
            "Connections closed by the gateway, by reason",
            m.closes.family.clone(),
        );
        registry.register("rooms", "Rooms (NATS subscriptions) held", m.rooms.clone());
        registry.register(
            "nats_slow_consumers",
            "NATS client slow-consumer events",
            m.nats_slow_consumers.clone(),
        );
        registry.register("nats_disconnects", "NATS disconnections", m.nats_disconnects.clone());
        registry.register(
            "recoveries",
            "Recovering joins of history rooms, by outcome",
            m.recoveries.family.clone(),
        );
        registry.register(
            "replayed",
            "Stored messages replayed to recovering clients",
            m.replayed.clone(),
        );
        registry.register(
            "control_commands",
            "Backend commands over NATS, by outcome",
            m.control_commands.family.clone(),
        );
        registry.register(
            "server_room_failures",
            "Server-side rooms that could not be joined",
            m.server_room_failures.clone(),
        );
        registry.register("bytes_in", "Payload bytes of client messages", m.bytes_in.clone());
        registry.register("bytes_out", "Bytes of frames written to clients", m.bytes_out.clone());
        registry.register(
            "nats_connected",
            "NATS connection up (1) or down (0)",
            m.nats_connected.clone(),
        );
        registry.register(
            "delivery_seconds",
            "Time from a frame queued for a client to the end of its write, once per written batch",
            m.delivery_seconds.clone(),
        );
        registry.register(
            "history_requests",
            "JetStream requests made to read history (direct gets; shared reads count once)",
            m.history_requests.clone(),
        );
        registry.register(
            "rpc_calls",
            "RPC calls, by result (refusals before NATS included)",
            m.rpc_calls.family.clone(),
        );
        registry.register(
            "rpc_seconds",
            "Time from an RPC request sent to NATS to its answer or failure",
            m.rpc_seconds.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Raises the queue high-water gauge if `depth` is above it (one atomic `fetch_max`, no lost update).
    pub fn note_depth(&self, depth: usize) {
        let depth = i64::try_from(depth).unwrap_or(i64::MAX);
        // A load first: every connection's writer calls this per batch, and a write to one shared cache line from
        // every core is what it must not cost when the mark does not move.
        let mark = self.queue_high_water.inner();
        if depth > mark.load(Ordering::Relaxed) {
            mark.fetch_max(depth, Ordering::Relaxed);
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
