//! Counters and gauges kept by every part of the gateway, exported in the Prometheus text format at `GET /metrics`.
//!
//! Hot-path counters are bumped once per NATS message (by the number of deliveries), never once per recipient.
//! Labelled families are used only for rare events (rejections, drops, errors), whose label values are static
//! strings, so the number of series is bounded by the code, not by traffic.

use std::sync::atomic::{AtomicI64, AtomicU64};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Label set with one `reason` label.
pub type ReasonLabels = [(&'static str, &'static str); 1];

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
    pub rejections: Family<ReasonLabels, Counter>,
    /// Client frames received.
    pub frames_in: Counter,
    /// Client publishes forwarded to NATS.
    pub publishes: Counter,
    /// Client publishes answered `unavailable`, by reason (`disconnected`, `timeout`, `error`).
    pub publish_failures: Family<ReasonLabels, Counter>,
    /// NATS messages fanned out to local members.
    pub room_messages: Counter,
    /// Frames queued for clients by fan-out (one per recipient).
    pub deliveries: Counter,
    /// Room messages not delivered, by policy (`drop_newest`, `drop_oldest`, `latest`, `closed`).
    pub dropped: Family<ReasonLabels, Counter>,
    /// Connections closed because they could not keep up (4008), by cause (`queue_full`, `write_timeout`).
    pub slow_consumers: Family<ReasonLabels, Counter>,
    /// Highest outbound queue depth (messages) any connection reached.
    pub queue_high_water: Gauge<i64, AtomicI64>,
    /// Error frames sent, by code.
    pub errors: Family<ReasonLabels, Counter>,
    /// Connections closed by the gateway, by close code name.
    pub closes: Family<ReasonLabels, Counter>,
    /// NATS subscriptions (rooms) held now.
    pub rooms: Gauge<i64, AtomicI64>,
    /// Slow-consumer events reported by the NATS client (a room's subscription buffer overflowed).
    pub nats_slow_consumers: Counter<u64, AtomicU64>,
    /// NATS disconnections seen.
    pub nats_disconnects: Counter,
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
            rejections: Family::default(),
            frames_in: Counter::default(),
            publishes: Counter::default(),
            publish_failures: Family::default(),
            room_messages: Counter::default(),
            deliveries: Counter::default(),
            dropped: Family::default(),
            slow_consumers: Family::default(),
            queue_high_water: Gauge::default(),
            errors: Family::default(),
            closes: Family::default(),
            rooms: Gauge::default(),
            nats_slow_consumers: Counter::default(),
            nats_disconnects: Counter::default(),
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
            m.rejections.clone(),
        );
        registry.register("frames_in", "Client frames received", m.frames_in.clone());
        registry.register("publishes", "Client publishes forwarded to NATS", m.publishes.clone());
        registry.register(
            "publish_failures",
            "Client publishes answered unavailable",
            m.publish_failures.clone(),
        );
        registry.register("room_messages", "NATS messages fanned out", m.room_messages.clone());
        registry.register(
            "deliveries",
            "Frames queued for clients by fan-out",
            m.deliveries.clone(),
        );
        registry.register("dropped", "Room messages not delivered, by policy", m.dropped.clone());
        registry.register(
            "slow_consumers",
            "Connections closed as slow consumers",
            m.slow_consumers.clone(),
        );
        registry.register(
            "queue_high_water",
            "Highest outbound queue depth seen",
            m.queue_high_water.clone(),
        );
        registry.register("errors", "Error frames sent, by code", m.errors.clone());
        registry.register(
            "closes",
            "Connections closed by the gateway, by reason",
            m.closes.clone(),
        );
        registry.register("rooms", "Rooms (NATS subscriptions) held", m.rooms.clone());
        registry.register(
            "nats_slow_consumers",
            "NATS client slow-consumer events",
            m.nats_slow_consumers.clone(),
        );
        registry.register("nats_disconnects", "NATS disconnections", m.nats_disconnects.clone());
        Metrics { registry, ..m }
    }

    /// Counts one event of a labelled family.
    pub fn bump(family: &Family<ReasonLabels, Counter>, reason: &'static str) {
        family.get_or_create(&[("reason", reason)]).inc();
    }

    /// Reads a labelled counter (tests and logs).
    pub fn get(family: &Family<ReasonLabels, Counter>, reason: &'static str) -> u64 {
        family.get_or_create(&[("reason", reason)]).get()
    }

    /// Raises the queue high-water gauge if `depth` is above it.
    pub fn note_depth(&self, depth: usize) {
        let depth = depth as i64;
        if depth > self.queue_high_water.get() {
            self.queue_high_water.set(depth);
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
