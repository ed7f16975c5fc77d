//! `[limits]`: the per-connection bounds ([`LimitsConfig`]): message, frame, buffer and queue sizes (which bound one
//! another, see `validate_sizes`), rates and their bursts, per-address caps, heartbeats and the closing bounds.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, invalid};

/// Largest header of a frame the gateway sends (2 bytes + 8-byte extended length; server frames are not masked),
/// rounded up.
const MAX_FRAME_HEADER: usize = 14;

/// `[limits]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest WebSocket message from a client, in bytes (after reassembly of fragments). Over it: close 1009.
    /// Default 65536.
    pub max_message_size: usize,
    /// Largest single WebSocket frame from a client. Default 65536.
    pub max_frame_size: usize,
    /// Bytes asked of the socket per read, and the starting size of tungstenite's read buffer while a message is
    /// in flight. An idle connection holds no read buffer at all: it reads into a per-thread scratch buffer, and
    /// tungstenite's state is made when bytes arrive and dropped when the socket runs dry at a message boundary
    /// (`crate::wire`). A larger frame grows the buffer while it is read. Default 2048.
    pub read_buffer_size: usize,
    /// Most bytes handed to one vectored write to the socket (at least one whole frame). Default 16384.
    pub write_buffer_size: usize,
    /// Bound of tungstenite's own write buffer, which carries only what tungstenite writes itself (pongs and the
    /// reply to a client's close): room messages and replies are written by the gateway from the shared, pre-built
    /// frames, with no per-connection copy. Must be at least `write_buffer_size + max_pending_bytes + 14` (the rule
    /// of the earlier design, when tungstenite wrote every frame; kept so configurations validate as before).
    /// Default 1114112 (1 MiB + 64 KiB).
    pub max_write_buffer_size: usize,
    /// Outbound queue bound, in messages, per connection. Default 1024.
    pub max_pending_messages: usize,
    /// Outbound queue bound, in bytes, per connection. Default 1048576.
    pub max_pending_bytes: usize,
    /// A write (or flush) to a client that does not finish in this time closes the connection. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Client publishes awaiting NATS at once per connection; beyond it the gateway stops reading from the client.
    /// Default 64.
    pub max_inflight_publishes: usize,
    /// Sustained messages per second per connection (and per user). Over it: error `rate_limited`. Default 100.
    pub messages_per_second: u32,
    /// Burst of messages above the sustained rate. Default 200.
    pub messages_burst: u32,
    /// Sustained inbound bytes per second per connection (and per user). Default 1048576.
    pub bytes_per_second: u32,
    /// Burst of inbound bytes. Default 2097152 (must be ≥ `max_message_size`).
    pub bytes_burst: u32,
    /// After this many `rate_limited` answers in a row the connection is closed with 1008. Default 50.
    pub max_rate_violations: u32,
    /// Deepest nesting of arrays/objects in a client frame (the frame's own object is level 1, so a publish's `data`
    /// may nest `max_json_depth - 1` levels); deeper: `bad_request`, nothing reaches NATS. Between 2 and 128.
    /// Default 32.
    pub max_json_depth: usize,
    /// Concurrent connections per client IP. Over it: 429. Default 256.
    pub max_connections_per_ip: usize,
    /// New connections per second per client IP. Default 20.
    pub connections_per_second_per_ip: u32,
    /// Burst of new connections per IP. Default 100.
    pub connections_burst_per_ip: u32,
    /// Distinct IPs (and users) tracked by the keyed limiters; the oldest entries are evicted beyond it. Default 100000.
    pub max_tracked_keys: usize,
    /// Server sends a WebSocket ping this often. Default `25s`.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A connection from which nothing (data or pong) arrived for this long is closed (1001 "heartbeat timeout").
    /// Default `60s`.
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
    /// `refresh` requests per minute per connection (burst: the same number); over it the refresh is answered
    /// `rate_limited` without its signature being checked. Default 4.
    pub refreshes_per_minute: u32,
    /// Longest the gateway keeps reading (and dropping) what a client still sends after the gateway's close frame
    /// and the end of its own stream (TLS close_notify, then TCP FIN): the lingering close, so a client flooding
    /// while it is closed reads the close frame instead of a TCP reset. Ends earlier at the client's close frame or
    /// end of stream. Each lingering connection keeps its slots until then. Between 10ms and 60s. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub close_linger: Duration,
    /// Most bytes the lingering close reads and drops without parsing them (once the client is over the rate limits
    /// or broke the protocol); past it the socket is closed at once, which a flood still arriving sees as a reset.
    /// Read through one fixed per-thread buffer: no allocation per read. At least 1. Default 4194304 (4 MiB).
    pub close_linger_bytes: u64,
    /// Longest a fragmented message may stay open, from its first frame: an open message holds tungstenite's
    /// reassembly buffer (up to `max_message_size`) and its read buffer (up to `max_frame_size` plus
    /// `read_buffer_size`), which a client sending pings between fragments could otherwise keep forever. Over it: close
    /// 1008 `message not completed in time`. Checked whenever the client sends something; a client that goes silent
    /// mid-message is closed by `heartbeat_timeout` instead. At least 10ms. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub fragment_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_message_size: 64 * 1024,
            max_frame_size: 64 * 1024,
            read_buffer_size: 2048,
            write_buffer_size: 16 * 1024,
            max_write_buffer_size: 1024 * 1024 + 64 * 1024,
            max_pending_messages: 1024,
            max_pending_bytes: 1024 * 1024,
            write_timeout: Duration::from_secs(10),
            max_inflight_publishes: 64,
            messages_per_second: 100,
            messages_burst: 200,
            bytes_per_second: 1024 * 1024,
            bytes_burst: 2 * 1024 * 1024,
            max_rate_violations: 50,
            max_json_depth: 32,
            max_connections_per_ip: 256,
            connections_per_second_per_ip: 20,
            connections_burst_per_ip: 100,
            max_tracked_keys: 100_000,
            heartbeat_interval: Duration::from_secs(25),
            heartbeat_timeout: Duration::from_secs(60),
            refreshes_per_minute: 4,
            close_linger: Duration::from_secs(5),
            close_linger_bytes: 4 * 1024 * 1024,
            fragment_timeout: Duration::from_secs(10),
        }
    }
}

impl LimitsConfig {
    /// Checks `[limits]`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_sizes()?;
        if self.write_timeout.is_zero() {
            return Err(invalid("limits.write_timeout", "must be positive"));
        }
        if !(Duration::from_millis(10)..=Duration::from_secs(60)).contains(&self.close_linger) {
            return Err(invalid("limits.close_linger", "must be between 10ms and 60s"));
        }
        if self.close_linger_bytes == 0 {
            return Err(invalid("limits.close_linger_bytes", "must be at least 1"));
        }
        if self.fragment_timeout < Duration::from_millis(10) {
            return Err(invalid("limits.fragment_timeout", "must be at least 10ms"));
        }
        for (key, v) in [
            ("limits.max_pending_messages", self.max_pending_messages),
            ("limits.max_inflight_publishes", self.max_inflight_publishes),
            ("limits.messages_per_second", self.messages_per_second as usize),
            ("limits.messages_burst", self.messages_burst as usize),
            ("limits.bytes_per_second", self.bytes_per_second as usize),
            (
                "limits.connections_per_second_per_ip",
                self.connections_per_second_per_ip as usize,
            ),
            (
                "limits.connections_burst_per_ip",
                self.connections_burst_per_ip as usize,
            ),
            ("limits.max_rate_violations", self.max_rate_violations as usize),
            ("limits.refreshes_per_minute", self.refreshes_per_minute as usize),
            ("limits.max_connections_per_ip", self.max_connections_per_ip),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if (self.bytes_burst as usize) < self.max_message_size {
            return Err(invalid(
                "limits.bytes_burst",
                "must be at least limits.max_message_size",
            ));
        }
        if !(2..=128).contains(&self.max_json_depth) {
            return Err(invalid("limits.max_json_depth", "must be between 2 and 128"));
        }
        if self.max_tracked_keys < 16 {
            return Err(invalid("limits.max_tracked_keys", "must be at least 16"));
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_timeout <= self.heartbeat_interval {
            return Err(invalid(
                "limits.heartbeat_timeout",
                "must exceed limits.heartbeat_interval (> 0)",
            ));
        }
        Ok(())
    }

    /// The message, frame, buffer and queue sizes, which bound one another.
    fn validate_sizes(&self) -> Result<(), ConfigError> {
        if self.max_message_size < 256 {
            return Err(invalid("limits.max_message_size", "must be at least 256"));
        }
        if self.max_frame_size == 0 || self.max_frame_size > self.max_message_size {
            return Err(invalid(
                "limits.max_frame_size",
                "must be between 1 and limits.max_message_size",
            ));
        }
        if !(256..=1024 * 1024).contains(&self.read_buffer_size) {
            return Err(invalid("limits.read_buffer_size", "must be between 256 and 1048576"));
        }
        // Written when tungstenite wrote every frame (it had to hold the largest frame the outbox admits on top of
        // `write_buffer_size`). The gateway now writes frames itself, but the rule stays: a configuration that was
        // valid stays valid and one that was refused stays refused.
        let largest_frame = self.max_pending_bytes.saturating_add(MAX_FRAME_HEADER);
        let needed = self.write_buffer_size.saturating_add(largest_frame);
        if self.max_write_buffer_size < needed {
            return Err(invalid(
                "limits.max_write_buffer_size",
                format!(
                    "must be at least limits.write_buffer_size + limits.max_pending_bytes + {MAX_FRAME_HEADER} \
                     ({needed}), or the largest queued message cannot be written"
                ),
            ));
        }
        if self.max_pending_bytes < self.max_message_size {
            return Err(invalid(
                "limits.max_pending_bytes",
                "must be at least limits.max_message_size",
            ));
        }
        Ok(())
    }
}
