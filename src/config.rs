//! Gateway configuration: the TOML file's schema, its defaults (in one place: the `Default` impls below) and
//! [`Config::validate`], which turns a parsed file into values the rest of the gateway can trust.
//!
//! Every section uses `deny_unknown_fields`, so a typo is a startup error that names the key. Every bound the gateway
//! enforces (queues, maps, limiters, timeouts) is a field here; `docs/configuration.md` and the shipped
//! `config/gateway.toml` document each one with its default. Secrets are never read from the TOML itself: the file
//! names a file or an environment variable, and the loaded value is a [`Secret`] whose `Debug` prints `MASKED`.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use jsonwebtoken::{Algorithm, AlgorithmFamily};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::room_pattern::RoomPattern;

/// Errors from loading or validating a configuration. Each message names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// Path that failed.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key or a wrong type (toml's message names the key).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// Path that failed.
        path: PathBuf,
        /// toml's description, which names the key.
        message: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid value for `{key}`: {message}")]
    Invalid {
        /// Dotted key, e.g. `limits.max_pending_messages`.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// A secret value (password, HMAC key). `Debug` and `Display` never print it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself; call only where it is used, never to log.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MASKED")
    }
}

/// Where a secret comes from: `{ file = ".." }` (the file's text, trailing newline trimmed) or `{ env = ".." }` (an
/// environment variable). Exactly one of the two: anything else is refused when the file is parsed.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(try_from = "SecretTable")]
pub enum SecretSource {
    /// Read the secret from this file.
    File(PathBuf),
    /// Read the secret from this environment variable.
    Env(String),
}

/// The TOML form of a [`SecretSource`], read first so that a table naming both sources (or neither) is refused with
/// a message that says what to write.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretTable {
    file: Option<PathBuf>,
    env: Option<String>,
}

impl TryFrom<SecretTable> for SecretSource {
    type Error = &'static str;
    fn try_from(t: SecretTable) -> Result<Self, Self::Error> {
        match (t.file, t.env) {
            (Some(path), None) => Ok(SecretSource::File(path)),
            (None, Some(var)) => Ok(SecretSource::Env(var)),
            _ => Err("set exactly one of `file` or `env`"),
        }
    }
}

/// Written back in its TOML form (`{ file = ".." }` / `{ env = ".." }`): the source names where the secret is, never
/// the secret itself (`roomwire check-config --print`).
impl Serialize for SecretSource {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(1))?;
        match self {
            SecretSource::File(path) => map.serialize_entry("file", path)?,
            SecretSource::Env(var) => map.serialize_entry("env", var)?,
        }
        map.end()
    }
}

impl SecretSource {
    /// Loads the secret. `key` names the config key in errors.
    pub fn load(&self, key: &'static str) -> Result<Secret, ConfigError> {
        match self {
            SecretSource::File(path) => std::fs::read_to_string(path)
                .map(|s| Secret(s.trim_end_matches(['\r', '\n']).to_string()))
                .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display()))),
            SecretSource::Env(var) => std::env::var(var)
                .map(Secret)
                .map_err(|_| invalid(key, format!("environment variable {var} is not set"))),
        }
    }
}

/// The JWT algorithms a key may use (`[[auth.keys]] algorithm`, and the keys of `auth.jwks_file`): the one list that
/// config validation, key loading and JWKS loading consult. HMAC ones take a `secret`, the others a public key.
pub const SUPPORTED_ALGORITHMS: [Algorithm; 6] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::ES256,
    Algorithm::EdDSA,
];

/// Whether the gateway verifies tokens signed with `alg` (see [`SUPPORTED_ALGORITHMS`]).
pub fn is_supported_algorithm(alg: Algorithm) -> bool {
    SUPPORTED_ALGORITHMS.contains(&alg)
}

/// The text `[[auth.keys]] algorithm` uses for `alg` (`HS256`, `EdDSA`, ...).
pub fn algorithm_name(alg: Algorithm) -> String {
    format!("{alg:?}")
}

/// `[[auth.keys]] algorithm`: one of [`SUPPORTED_ALGORITHMS`], by the name jsonwebtoken gives it.
fn deserialize_algorithm<'de, D: Deserializer<'de>>(d: D) -> Result<Algorithm, D::Error> {
    let name = String::deserialize(d)?;
    name.parse::<Algorithm>()
        .ok()
        .filter(|&alg| is_supported_algorithm(alg))
        .ok_or_else(|| {
            let names: Vec<String> = SUPPORTED_ALGORITHMS.iter().map(|&a| algorithm_name(a)).collect();
            serde::de::Error::custom(format!(
                "unsupported algorithm {name:?} (use one of {})",
                names.join(", ")
            ))
        })
}

/// One string or a list of strings (used for `nats.url`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A single value.
    One(String),
    /// Several values.
    Many(Vec<String>),
}

impl OneOrMany {
    /// All values as a list.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// Largest header of a frame the gateway sends (2 bytes + 8-byte extended length; server frames are not masked),
/// rounded up.
const MAX_FRAME_HEADER: usize = 14;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listener, HTTP and shutdown settings.
    pub server: ServerConfig,
    /// TLS termination.
    pub tls: TlsConfig,
    /// Connection to NATS.
    pub nats: NatsConfig,
    /// Room naming, subject mapping and overflow policies.
    pub rooms: RoomsConfig,
    /// Per-connection bounds: message sizes, queues, rates.
    pub limits: LimitsConfig,
    /// Authentication and default permissions.
    pub auth: AuthConfig,
    /// Room history in JetStream and missed-message recovery (`docs/history.md`).
    pub history: HistoryConfig,
    /// Log format and level.
    pub log: LogConfig,
    /// The admin listener (metrics, health, `/connz`), off unless `listen` is set.
    pub admin: AdminConfig,
}

/// `[log]`: how the gateway logs (through `tracing`, to stdout).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `"human"` (one line per event, for terminals and journald) or `"json"` (one JSON object per line, for log
    /// pipelines). Default `"human"`.
    pub format: LogFormat,
    /// The level filter, in `RUST_LOG` syntax (`"info"`, `"roomwire=debug,info"`). `RUST_LOG`, when set, wins.
    /// Default `"info"`.
    pub level: Option<String>,
}

/// `log.format`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// `[admin]`: a second, plain-HTTP listener for operators (`/metrics`, `/healthz`, `/readyz`, `/connz`). Bind it to
/// loopback or a private network: it has no TLS and no authentication.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin listener, e.g. `"127.0.0.1:9090"`. Default: none (no admin listener).
    pub listen: Option<SocketAddr>,
    /// Connections open at once on the admin listener; more are closed at accept. Default 16.
    pub max_connections: usize,
    /// Admin connections open at once from one address; more are closed at accept, so one client cannot hold every
    /// `max_connections` slot. Default 4.
    pub max_connections_per_ip: usize,
    /// How long one admin connection may live, absolute from accept: it covers the TLS handshake and every request
    /// on a keep-alive connection (a client that sends a request every few seconds cannot keep its slot). A scraper
    /// simply reconnects. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub connection_timeout: Duration,
    /// Serve the admin listener over TLS with this PEM certificate chain (with `tls_key_file`). Default none (plain
    /// HTTP).
    pub tls_cert_file: Option<PathBuf>,
    /// Key of `tls_cert_file` (PEM). Default none.
    pub tls_key_file: Option<PathBuf>,
    /// Require a client certificate issued by this CA (PEM) on the admin listener (mTLS): a scraper without one is
    /// refused in the handshake. Needs `tls_cert_file`. Default none.
    pub client_ca_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: None,
            max_connections: 16,
            max_connections_per_ip: 4,
            connection_timeout: Duration::from_secs(30),
            tls_cert_file: None,
            tls_key_file: None,
            client_ca_file: None,
        }
    }
}

/// `[history]`: which rooms keep history in a JetStream stream, the stream's limits, and the bounds of recovery and
/// `history` reads. See `docs/history.md`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// History for rooms matching `rooms`. Default false.
    pub enabled: bool,
    /// Room patterns that have history. Default `["*"]`.
    pub rooms: Vec<RoomPattern>,
    /// The JetStream stream over the room subjects. Default `ROOMWIRE`.
    pub stream: String,
    /// The stream's `max_msgs_per_subject`: messages kept per room. Default 1000.
    pub max_messages_per_room: u32,
    /// The stream's `max_age`. Default `24h`.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// The stream's replicas (1, 3 or 5 in a cluster). Default 1.
    pub replicas: usize,
    /// The most messages replayed on one recovering join; more missing answers `recovered:false`. Default 1000.
    pub max_recover: usize,
    /// Create or update the stream at start. Off: the stream must exist and match, or the gateway does not start.
    /// Default true.
    pub manage_stream: bool,
    /// Subject prefix the stream republishes stored room messages under (`<live_prefix>.<subject_prefix>.<room>`);
    /// the gateway's live subscription of a history room. Default `roomwire.live`.
    pub live_prefix: String,
    /// The stream's duplicate window: a publish retried with the same message id within it is stored once.
    /// Default `2m`.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Time JetStream gets to answer a recovering join, a join's last sequence or a `history` request. Default `2s`.
    #[serde(with = "humantime_serde")]
    pub recover_timeout: Duration,
    /// Cap of a `history` request's `limit`. Default 100.
    pub max_history_limit: usize,
    /// Payload bytes in one `history` answer; past it the oldest messages are left out. Default 262144.
    pub max_history_bytes: usize,
    /// Live messages held for one member while its recovery is replayed; over it the replay catches up from the
    /// stream again. Default 1000.
    pub max_held: usize,
    /// Recovering joins and `history` requests reading JetStream at once, over all connections. One more waits for a
    /// slot until `recover_timeout` (then `recovered:false`, or `unavailable`). A connection reads one at a time: its
    /// reader waits for the answer, so it cannot multiply this. Default 256.
    pub max_concurrent_reads: usize,
    /// How often the stream's identity (the epoch) is checked, so a recreated stream is noticed. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub epoch_refresh: Duration,
    /// Bytes of recently read history cached to serve recovery storms (`docs/history.md`). Default 8388608.
    pub replay_cache_bytes: usize,
    /// Rooms in that cache. Default 1024.
    pub replay_cache_rooms: usize,
    /// How long a cached range is reused. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub replay_cache_ttl: Duration,
    /// JetStream reads in flight at once, over all rooms. Default 64.
    pub replay_max_inflight: usize,
    /// Messages per direct-get batch. Default 256 (below `nats.subscription_capacity`).
    pub replay_batch: usize,
    /// Bytes per direct-get batch reply. Default 1048576.
    pub replay_batch_bytes: usize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            rooms: vec![RoomPattern::new("*")],
            stream: "ROOMWIRE".into(),
            max_messages_per_room: 1000,
            max_age: Duration::from_secs(24 * 3600),
            replicas: 1,
            max_recover: 1000,
            manage_stream: true,
            live_prefix: "roomwire.live".into(),
            duplicate_window: Duration::from_secs(120),
            recover_timeout: Duration::from_secs(2),
            max_history_limit: 100,
            max_history_bytes: 256 * 1024,
            max_held: 1000,
            max_concurrent_reads: 256,
            epoch_refresh: Duration::from_secs(10),
            replay_cache_bytes: 8 * 1024 * 1024,
            replay_cache_rooms: 1024,
            replay_cache_ttl: Duration::from_secs(5),
            replay_max_inflight: 64,
            replay_batch: 256,
            replay_batch_bytes: 1024 * 1024,
        }
    }
}

impl HistoryConfig {
    /// Whether `room` keeps history.
    pub fn covers(&self, room: &str) -> bool {
        self.enabled && self.rooms.iter().any(|p| p.matches(room))
    }

    /// Checks `[history]` (only when enabled; a disabled section is never used).
    pub fn validate(&self, nats: &NatsConfig) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        let token_ok =
            |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !token_ok(&self.stream) {
            return Err(invalid("history.stream", "use 1+ characters from [A-Za-z0-9_-]"));
        }
        if self.live_prefix.is_empty() || !self.live_prefix.split('.').all(token_ok) {
            return Err(invalid(
                "history.live_prefix",
                "use dot-separated tokens of [A-Za-z0-9_-]",
            ));
        }
        if self.rooms.is_empty() {
            return Err(invalid(
                "history.rooms",
                "list at least one room pattern, or set enabled = false",
            ));
        }
        if self.max_messages_per_room == 0 {
            return Err(invalid("history.max_messages_per_room", "must be at least 1"));
        }
        if self.max_age.is_zero() || self.duplicate_window.is_zero() || self.duplicate_window > self.max_age {
            return Err(invalid(
                "history.duplicate_window",
                "max_age and duplicate_window must be positive, duplicate_window <= max_age",
            ));
        }
        if !matches!(self.replicas, 1..=5) {
            return Err(invalid("history.replicas", "must be between 1 and 5"));
        }
        for (key, value) in [
            ("history.max_recover", self.max_recover),
            ("history.max_history_limit", self.max_history_limit),
            ("history.max_history_bytes", self.max_history_bytes),
            ("history.max_held", self.max_held),
            ("history.max_concurrent_reads", self.max_concurrent_reads),
            ("history.replay_cache_rooms", self.replay_cache_rooms),
            ("history.replay_max_inflight", self.replay_max_inflight),
            ("history.replay_batch", self.replay_batch),
            ("history.replay_batch_bytes", self.replay_batch_bytes),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.replay_batch >= nats.subscription_capacity {
            return Err(invalid(
                "history.replay_batch",
                "must be below nats.subscription_capacity",
            ));
        }
        if self.recover_timeout.is_zero() || self.epoch_refresh.is_zero() {
            return Err(invalid(
                "history.recover_timeout",
                "recover_timeout and epoch_refresh must be positive",
            ));
        }
        Ok(())
    }
}

/// `[server]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on. Default `0.0.0.0:8443`.
    pub listen: SocketAddr,
    /// Identifier of this gateway instance, put in NATS headers and lifecycle events. Default: random at startup.
    pub gateway_id: Option<String>,
    /// Path of the WebSocket endpoint. Default `/ws`.
    pub ws_path: String,
    /// Global cap on open connections (TCP accepted, any stage). Over it: 503 before the upgrade. Default 50000.
    pub max_connections: usize,
    /// Absolute deadline from TCP accept for TLS + HTTP + upgrade (slowloris guard): a connection that has not upgraded
    /// by then is closed, however many keep-alive requests it made. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Largest HTTP request head (request line + headers) accepted, in bytes. Default 16384.
    pub max_header_bytes: usize,
    /// On SIGINT/SIGTERM: time allowed for clients to be closed (1001) and NATS flushed before exit. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// On SIGTERM/SIGINT: each WebSocket is closed (1001 `going away: reconnect`) at a random moment within this window
    /// after the signal, so its clients reconnect elsewhere spread out rather than all at once. `0s` closes all at
    /// once. `server.shutdown_grace` applies after it. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub drain_window: Duration,
    /// Serve `/metrics` on the public listener too. Default false: metrics tell an attacker the gateway's load and
    /// limits, so they are served publicly only when asked for; scrape the admin listener (`[admin] listen`).
    pub public_metrics: bool,
    /// Allowed `Origin` values for the upgrade: exact origins (`https://app.example.com`) or `*.example.com` /
    /// `https://*.example.com` wildcards. Empty (default) = any origin, including none.
    pub allowed_origins: Vec<String>,
    /// Proxies (IPs or CIDRs) whose forwarding header (`server.forwarded_header`) is trusted. Connections from them
    /// are counted per client address at the upgrade, by the forwarded address. Default: none.
    pub trusted_proxies: Vec<IpNet>,
    /// The one header that carries the client address when the peer is in `trusted_proxies`:
    /// `"x-forwarded-for"`, `"forwarded"` (RFC 7239 `for=`) or `"x-real-ip"`. Any other forwarding header is
    /// ignored. Default `"x-forwarded-for"`.
    pub forwarded_header: ForwardedHeader,
    /// Serve the demo chat at `/` (and its script and style under `/demo/`). The browser client library is served
    /// at `/client/roomwire.js` either way. Default false.
    pub demo: bool,
}

/// Which header a trusted proxy uses to pass on the client's address (`server.forwarded_header`).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (the right-most untrusted entry is the client).
    #[default]
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client;proto=https, for=proxy1` (the right-most untrusted `for=` is the client).
    #[serde(rename = "forwarded")]
    Forwarded,
    /// `X-Real-IP: client`, a single address set (not appended) by the proxy.
    #[serde(rename = "x-real-ip")]
    XRealIp,
}

impl ForwardedHeader {
    /// The header's name, lower-case.
    pub fn name(self) -> &'static str {
        match self {
            ForwardedHeader::XForwardedFor => "x-forwarded-for",
            ForwardedHeader::Forwarded => "forwarded",
            ForwardedHeader::XRealIp => "x-real-ip",
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8443".parse().expect("static address"),
            gateway_id: None,
            ws_path: "/ws".into(),
            max_connections: 50_000,
            handshake_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            shutdown_grace: Duration::from_secs(10),
            drain_window: Duration::from_secs(10),
            public_metrics: false,
            allowed_origins: Vec::new(),
            trusted_proxies: Vec::new(),
            forwarded_header: ForwardedHeader::XForwardedFor,
            demo: false,
        }
    }
}

/// `[tls]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Terminate TLS (wss). When false the listener speaks plain ws (behind a TLS-terminating proxy). Default true.
    pub enabled: bool,
    /// PEM certificate chain. Default `certs/dev-cert.pem`.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1). Default `certs/dev-key.pem`.
    pub key_file: PathBuf,
    /// How often the certificate and key files are checked for changes (size and modification time, following
    /// symlinks); a change reloads them as SIGHUP does. `0s` turns the check off. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub watch_interval: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            cert_file: "certs/dev-cert.pem".into(),
            key_file: "certs/dev-key.pem".into(),
            watch_interval: Duration::from_secs(10),
        }
    }
}

/// `[nats]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL, or a list of them. Default `nats://127.0.0.1:4222`.
    pub url: OneOrMany,
    /// Client name shown by the NATS server. Default `roomwire`.
    pub name: String,
    /// Username (with `password`). Default none.
    pub user: Option<String>,
    /// Password source (`{ file = ".." }` or `{ env = ".." }`). Default none.
    pub password: Option<SecretSource>,
    /// Token source. Default none.
    pub token: Option<SecretSource>,
    /// `.creds` file (JWT + NKey). Default none.
    pub creds_file: Option<PathBuf>,
    /// NKey seed source (`{ file = ".." }` or `{ env = ".." }`), for servers with `nkey` users. Default none.
    pub nkey_seed: Option<SecretSource>,
    /// CA certificate(s) (PEM) the NATS server's certificate must chain to; setting it requires TLS. Default none
    /// (the system roots, when the server asks for TLS).
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for servers that verify clients (`verify: true`), with `tls_key_file`. Default none.
    pub tls_cert_file: Option<PathBuf>,
    /// Key of `tls_cert_file` (PEM). Default none.
    pub tls_key_file: Option<PathBuf>,
    /// Refuse a NATS server that does not offer TLS. Default false (true when `tls_ca_file` or a client certificate
    /// is set).
    pub tls_required: bool,
    /// Timeout of each connection attempt. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A client publish not accepted by NATS in this time is answered `unavailable`. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Messages buffered per room subscription between the NATS connection and the room's fan-out task; over it NATS
    /// reports a slow consumer and drops. Default 65536.
    pub subscription_capacity: usize,
    /// Commands (publishes, subscribes) buffered toward the NATS connection. Default 8192.
    pub client_capacity: usize,
    /// The NATS client sends a PING after this much silence from the server; after 3 unanswered intervals it drops
    /// the connection (gateway not ready, publishes `unavailable`, reconnect). A paused server is noticed within about
    /// 3 × this. Default `2s`.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// Bytes of client publishes (payload + subject + headers) handed to the NATS client and not yet written to its
    /// socket, over all connections. A publish waits for room here until `publish_timeout` (then `unavailable`); a
    /// single message larger than this is refused `too_large`. Default 8388608 (8 MiB).
    pub max_pending_bytes: usize,
    /// Subject prefix of lifecycle events (`<prefix>.connect`, `.disconnect`, `.join`, `.leave`).
    /// Default `roomwire.events`.
    pub events_prefix: String,
    /// Publish lifecycle events. Default true.
    pub events: bool,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: OneOrMany::One("nats://127.0.0.1:4222".into()),
            name: "roomwire".into(),
            user: None,
            password: None,
            token: None,
            creds_file: None,
            nkey_seed: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_required: false,
            connect_timeout: Duration::from_secs(5),
            publish_timeout: Duration::from_secs(5),
            subscription_capacity: 65_536,
            client_capacity: 8192,
            ping_interval: Duration::from_secs(2),
            max_pending_bytes: 8 * 1024 * 1024,
            events_prefix: "roomwire.events".into(),
            events: true,
        }
    }
}

pub use crate::outbox::Overflow;

/// One `[[rooms.policy]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoomPolicy {
    /// Room pattern: exact name, or with `*` wildcards (`ticker-*`).
    pub pattern: RoomPattern,
    /// Overflow policy for matching rooms.
    pub overflow: Overflow,
}

/// `[rooms]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoomsConfig {
    /// Room `R` maps to subject `<subject_prefix>.R`. Default `rooms`.
    pub subject_prefix: String,
    /// Overflow policy of rooms no `[[rooms.policy]]` matches. Default `disconnect`.
    pub overflow: Overflow,
    /// Per-room-pattern overflow policies, first match wins.
    pub policy: Vec<RoomPolicy>,
    /// Rooms one connection may be in at once; over it: `too_many_rooms`. Default 100.
    pub max_rooms_per_connection: usize,
    /// Distinct rooms (NATS subscriptions) this gateway holds at once; over it: `unavailable`. Default 100000.
    pub max_rooms: usize,
    /// Distinct rooms one user (one address, IPv6 /64, for anonymous clients) is in at once, over all its
    /// connections; over it: `too_many_rooms`. Default 1000.
    pub max_rooms_per_user: usize,
    /// Sustained rate at which one user (or address) may create rooms on this gateway (a join that makes a new NATS
    /// subscription; joining a room that exists already is free); over it: `rate_limited`. Default 10.
    pub room_creations_per_second: u32,
    /// Burst of room creations above the sustained rate. Default 100.
    pub room_creations_burst: u32,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        Self {
            subject_prefix: "rooms".into(),
            overflow: Overflow::Disconnect,
            policy: Vec::new(),
            max_rooms_per_connection: 100,
            max_rooms: 100_000,
            max_rooms_per_user: 1000,
            room_creations_per_second: 10,
            room_creations_burst: 100,
        }
    }
}

impl RoomsConfig {
    /// The overflow policy for `room`.
    pub fn overflow_for(&self, room: &str) -> Overflow {
        self.policy
            .iter()
            .find(|p| p.pattern.matches(room))
            .map_or(self.overflow, |p| p.overflow)
    }
}

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

/// One `[[auth.keys]]` entry: a key tokens may be signed with, and the one algorithm it accepts.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JwtKey {
    /// Key id matched against the token header's `kid`; a key without `kid` matches any token of its algorithm.
    pub kid: Option<String>,
    /// One of [`SUPPORTED_ALGORITHMS`]: `HS256`, `HS384`, `HS512`, `RS256`, `ES256` or `EdDSA`.
    #[serde(deserialize_with = "deserialize_algorithm")]
    pub algorithm: Algorithm,
    /// HMAC secret source (HS* only).
    pub secret: Option<SecretSource>,
    /// PEM public key file (RS256, ES256, EdDSA).
    pub public_key_file: Option<PathBuf>,
}

/// Permissions granted to a connection: room patterns it may join and publish to.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Permissions {
    /// Patterns of rooms that may be joined. Default `["*"]`.
    pub join: Vec<RoomPattern>,
    /// Patterns of rooms that may be published to. Default `["*"]`.
    pub publish: Vec<RoomPattern>,
}

impl Default for Permissions {
    fn default() -> Self {
        Self {
            join: vec![RoomPattern::new("*")],
            publish: vec![RoomPattern::new("*")],
        }
    }
}

/// `[auth]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Accept connections without a token. Default false; the shipped dev config sets true.
    pub allow_anonymous: bool,
    /// Permissions of anonymous connections.
    pub anonymous: Permissions,
    /// Keys accepted for JWT verification.
    pub keys: Vec<JwtKey>,
    /// JWKS file (JSON) with further public keys, selected by `kid`.
    pub jwks_file: Option<PathBuf>,
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Required `aud` (one of), if set.
    pub audience: Vec<String>,
    /// Clock leeway for `exp`/`nbf`, in seconds: a token is accepted until `exp + leeway_secs`, and a connection
    /// authenticated by it lives until that same instant. At most 3600. Default 30.
    pub leeway_secs: u64,
    /// Cookie carrying the token, if any (besides `Authorization: Bearer` and `?token=`).
    pub cookie: Option<String>,
    /// Personal room template granted to every user for join and publish; `{sub}` is replaced. Default none.
    pub personal_room: Option<String>,
    /// Name of the JWT claim holding join patterns (array of strings). Default `rooms`.
    pub rooms_claim: String,
    /// Name of the claim holding publish patterns. Default `publish`.
    pub publish_claim: String,
    /// A `token_expiring` warning is sent this long before `exp`. Default `60s`.
    #[serde(with = "humantime_serde")]
    pub expiry_warning: Duration,
    /// An authenticated connection is closed with 4001 this long after it was opened, whatever `refresh` requests
    /// arrived (a `token_expiring` warning comes `expiry_warning` before). Between 1s and 365 days. Default `24h`.
    #[serde(with = "humantime_serde")]
    pub max_session: Duration,
    /// A token without `kid` is refused (`unknown token key`) when more than this many configured keys share its
    /// algorithm, so one bogus token costs at most this many signature checks. Default 3.
    pub max_keys_per_token: usize,
    /// Signature checks running at once in the whole gateway, on tokio's blocking threads (never on the async
    /// workers). 0 = twice the number of CPU cores. Default 0.
    pub max_concurrent_verifications: usize,
    /// A token check that waited this long for one of the `max_concurrent_verifications` slots is given up: the
    /// upgrade is answered 503 and a `refresh` `unavailable`. Default `1s`.
    #[serde(with = "humantime_serde")]
    pub max_verification_wait: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            allow_anonymous: false,
            anonymous: Permissions::default(),
            keys: Vec::new(),
            jwks_file: None,
            issuer: None,
            audience: Vec::new(),
            leeway_secs: 30,
            cookie: None,
            personal_room: None,
            rooms_claim: "rooms".into(),
            publish_claim: "publish".into(),
            expiry_warning: Duration::from_secs(60),
            max_session: Duration::from_secs(24 * 3600),
            max_keys_per_token: 3,
            max_concurrent_verifications: 0,
            max_verification_wait: Duration::from_secs(1),
        }
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges and consistency, section by section in file order (so the first mistake in the file is the
    /// one reported). Messages name the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        self.nats.validate(&self.limits)?;
        self.rooms.validate()?;
        self.limits.validate()?;
        self.history.validate(&self.nats)?;
        self.auth.validate()?;
        self.log.validate()?;
        self.admin.validate(&self.server)
    }
}

impl LogConfig {
    /// Checks `[log]`: the level must parse (a typo would otherwise silently log at `info`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(level) = &self.level {
            tracing_subscriber::EnvFilter::try_new(level)
                .map_err(|e| invalid("log.level", format!("{level:?}: {e}")))?;
        }
        Ok(())
    }
}

impl AdminConfig {
    /// Checks `[admin]`: not on the public listener's address, at least one connection.
    pub fn validate(&self, server: &ServerConfig) -> Result<(), ConfigError> {
        if self.max_connections == 0 {
            return Err(invalid("admin.max_connections", "must be at least 1"));
        }
        if self.max_connections_per_ip == 0 {
            return Err(invalid("admin.max_connections_per_ip", "must be at least 1"));
        }
        if self.connection_timeout.is_zero() {
            return Err(invalid("admin.connection_timeout", "must be more than 0s"));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(invalid(
                "admin.tls_cert_file",
                "set both admin.tls_cert_file and admin.tls_key_file, or neither",
            ));
        }
        if self.client_ca_file.is_some() && self.tls_cert_file.is_none() {
            return Err(invalid(
                "admin.client_ca_file",
                "client certificates need admin.tls_cert_file and tls_key_file",
            ));
        }
        if let Some(addr) = self.listen
            && addr == server.listen
            && addr.port() != 0
        {
            return Err(invalid("admin.listen", "must differ from server.listen"));
        }
        Ok(())
    }
}

impl ServerConfig {
    /// Checks `[server]`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.ws_path.starts_with('/') {
            return Err(invalid("server.ws_path", "must start with '/'"));
        }
        if self.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        if self.handshake_timeout.is_zero() {
            return Err(invalid("server.handshake_timeout", "must be positive"));
        }
        if self.max_header_bytes < 8192 {
            // hyper's smallest read buffer.
            return Err(invalid("server.max_header_bytes", "must be at least 8192"));
        }
        if let Some(id) = &self.gateway_id
            && (id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        {
            return Err(invalid("server.gateway_id", "use 1+ characters from [A-Za-z0-9_-]"));
        }
        for origin in &self.allowed_origins {
            if origin.is_empty() || origin.contains(char::is_whitespace) {
                return Err(invalid("server.allowed_origins", format!("bad origin {origin:?}")));
            }
        }
        Ok(())
    }
}

impl NatsConfig {
    /// Checks `[nats]`; `limits` because NATS must take the largest client message.
    pub fn validate(&self, limits: &LimitsConfig) -> Result<(), ConfigError> {
        if self.url.to_vec().is_empty() {
            return Err(invalid("nats.url", "at least one URL is required"));
        }
        if self.subscription_capacity == 0 {
            return Err(invalid("nats.subscription_capacity", "must be at least 1"));
        }
        if self.client_capacity == 0 {
            return Err(invalid("nats.client_capacity", "must be at least 1"));
        }
        if self.publish_timeout.is_zero() {
            return Err(invalid("nats.publish_timeout", "must be positive"));
        }
        if self.ping_interval.is_zero() {
            return Err(invalid("nats.ping_interval", "must be positive"));
        }
        if self.max_pending_bytes < limits.max_message_size || self.max_pending_bytes > u32::MAX as usize {
            return Err(invalid(
                "nats.max_pending_bytes",
                "must be between limits.max_message_size and 4294967295",
            ));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(invalid(
                "nats.tls_cert_file",
                "set both nats.tls_cert_file and nats.tls_key_file, or neither",
            ));
        }
        let methods = [
            self.user.is_some(),
            self.token.is_some(),
            self.creds_file.is_some(),
            self.nkey_seed.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return Err(invalid(
                "nats.user",
                "use one of user/password, token, creds_file or nkey_seed",
            ));
        }
        if self.password.is_some() && self.user.is_none() {
            return Err(invalid("nats.password", "needs `nats.user`"));
        }
        if !crate::room_name::valid_subject_prefix(&self.events_prefix) {
            return Err(invalid(
                "nats.events_prefix",
                "must be dot-separated tokens of [A-Za-z0-9_-]",
            ));
        }
        Ok(())
    }
}

impl RoomsConfig {
    /// Checks `[rooms]` and its `[[rooms.policy]]` entries.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !crate::room_name::valid_subject_prefix(&self.subject_prefix) {
            return Err(invalid(
                "rooms.subject_prefix",
                "must be dot-separated tokens of [A-Za-z0-9_-]",
            ));
        }
        if self.policy.iter().any(|p| p.pattern.as_str().is_empty()) {
            return Err(invalid("rooms.policy.pattern", "must not be empty"));
        }
        for (key, v) in [
            ("rooms.max_rooms_per_connection", self.max_rooms_per_connection),
            ("rooms.max_rooms", self.max_rooms),
            ("rooms.max_rooms_per_user", self.max_rooms_per_user),
            (
                "rooms.room_creations_per_second",
                self.room_creations_per_second as usize,
            ),
            ("rooms.room_creations_burst", self.room_creations_burst as usize),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        Ok(())
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

impl AuthConfig {
    /// Checks `[auth]` and its `[[auth.keys]]` entries.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.allow_anonymous && self.keys.is_empty() && self.jwks_file.is_none() {
            return Err(invalid(
                "auth.keys",
                "no key configured and auth.allow_anonymous is false: nobody could connect",
            ));
        }
        for key in &self.keys {
            key.validate()?;
        }
        if let Some(t) = &self.personal_room
            && !t.contains("{sub}")
        {
            return Err(invalid("auth.personal_room", "must contain {sub}"));
        }
        if let Some(t) = &self.personal_room
            && !crate::room_name::valid_room(&t.replace("{sub}", "u"))
        {
            return Err(invalid(
                "auth.personal_room",
                "must be a valid room name (A-Z a-z 0-9 _ - : @ = +) once {sub} is replaced",
            ));
        }
        if self.leeway_secs > 3600 {
            // jsonwebtoken computes `now - leeway` in u64: an absurd leeway must not reach it.
            return Err(invalid("auth.leeway_secs", "must be at most 3600"));
        }
        if self.max_session < Duration::from_secs(1) || self.max_session > Duration::from_secs(365 * 86_400) {
            return Err(invalid("auth.max_session", "must be between 1s and 365 days"));
        }
        if self.max_keys_per_token == 0 {
            return Err(invalid("auth.max_keys_per_token", "must be at least 1"));
        }
        if self.max_verification_wait.is_zero() {
            return Err(invalid("auth.max_verification_wait", "must be positive"));
        }
        Ok(())
    }
}

/// What verifies a key's signatures, by its algorithm's family (see [`JwtKey::material`]).
#[derive(Debug, Clone, Copy)]
pub enum KeyMaterial<'a> {
    /// An HMAC secret (HS256, HS384, HS512).
    Secret(&'a SecretSource),
    /// A PEM public key (RS256, ES256, EdDSA).
    PublicKeyFile(&'a Path),
}

impl JwtKey {
    /// Checks one `[[auth.keys]]` entry (see [`JwtKey::material`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.material().map(|_| ())
    }

    /// The key material this entry's algorithm needs: a `secret` for HMAC, a `public_key_file` otherwise. Refuses an
    /// unsupported algorithm (a file naming one fails to parse already; this catches a configuration built in code)
    /// and a missing secret or file. Config validation and key loading both go through here.
    pub fn material(&self) -> Result<KeyMaterial<'_>, ConfigError> {
        let name = algorithm_name(self.algorithm);
        if !is_supported_algorithm(self.algorithm) {
            return Err(invalid(
                "auth.keys.algorithm",
                format!("unsupported algorithm {name:?}"),
            ));
        }
        if self.algorithm.family() == AlgorithmFamily::Hmac {
            let secret = self.secret.as_ref();
            secret
                .map(KeyMaterial::Secret)
                .ok_or_else(|| invalid("auth.keys.secret", format!("{name} needs `secret`")))
        } else {
            let file = self.public_key_file.as_deref();
            file.map(KeyMaterial::PublicKeyFile)
                .ok_or_else(|| invalid("auth.keys.public_key_file", format!("{name} needs `public_key_file`")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gets_defaults_but_needs_auth() {
        let err = Config::parse("").unwrap_err().to_string();
        assert!(err.contains("auth.keys"), "{err}");
        let c = Config::parse("[auth]\nallow_anonymous = true\n").unwrap();
        assert_eq!(c.server.listen.port(), 8443);
        assert_eq!(c.rooms.subject_prefix, "rooms");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[server]\nlisten = \"127.0.0.1:1\"\nlistne = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listne"), "{err}");
    }

    #[test]
    fn bad_value_is_named() {
        let err = Config::parse("[auth]\nallow_anonymous = true\n[limits]\nmax_pending_messages = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("limits.max_pending_messages"), "{err}");
    }

    #[test]
    fn nats_url_one_or_many() {
        let c =
            Config::parse("[auth]\nallow_anonymous = true\n[nats]\nurl = [\"nats://a:1\", \"nats://b:2\"]\n").unwrap();
        assert_eq!(c.nats.url.to_vec().len(), 2);
    }

    #[test]
    fn policies_first_match_wins() {
        // Overlapping patterns, each of which also matches rooms the later ones match: the order decides.
        let c = Config::parse(
            "[auth]\nallow_anonymous = true\n[rooms]\noverflow = \"drop_newest\"\n\
             [[rooms.policy]]\npattern = \"ticker-btc*\"\noverflow = \"drop_oldest\"\n\
             [[rooms.policy]]\npattern = \"ticker-*\"\noverflow = \"latest\"\n\
             [[rooms.policy]]\npattern = \"*-btc\"\noverflow = \"disconnect\"\n\
             [[rooms.policy]]\npattern = \"*\"\noverflow = \"latest\"\n",
        )
        .unwrap();
        assert_eq!(c.rooms.policy.len(), 4);
        // Matches all four: the first wins.
        assert_eq!(c.rooms.overflow_for("ticker-btc"), Overflow::DropOldest);
        // Matches the 2nd and 4th (and the 3rd's `*-btc` does not apply): the 2nd wins.
        assert_eq!(c.rooms.overflow_for("ticker-eth"), Overflow::Latest);
        // Matches the 3rd and 4th: the 3rd wins over the catch-all after it.
        assert_eq!(c.rooms.overflow_for("chat-btc"), Overflow::Disconnect);
        // Only the catch-all.
        assert_eq!(c.rooms.overflow_for("lobby"), Overflow::Latest);

        // Without a catch-all, rooms no pattern matches get `[rooms] overflow`, not a policy's.
        let c = Config::parse(
            "[auth]\nallow_anonymous = true\n[rooms]\noverflow = \"drop_newest\"\n\
             [[rooms.policy]]\npattern = \"ticker-*\"\noverflow = \"latest\"\n\
             [[rooms.policy]]\npattern = \"ticker-btc\"\noverflow = \"disconnect\"\n",
        )
        .unwrap();
        assert_eq!(
            c.rooms.overflow_for("ticker-btc"),
            Overflow::Latest,
            "a later exact match loses"
        );
        assert_eq!(c.rooms.overflow_for("lobby"), Overflow::DropNewest);
        assert_eq!(
            c.rooms.overflow_for("ticker"),
            Overflow::DropNewest,
            "`ticker-*` needs the dash"
        );
        // And with no `[rooms] overflow`, the documented default.
        let c = Config::parse("[auth]\nallow_anonymous = true\n").unwrap();
        assert_eq!(c.rooms.overflow_for("lobby"), Overflow::Disconnect);
    }

    #[test]
    fn auth_hardening_keys_are_validated() {
        let c = Config::parse("[auth]\nallow_anonymous = true\n").unwrap();
        assert_eq!(c.auth.max_session, Duration::from_secs(86_400));
        assert_eq!(c.limits.refreshes_per_minute, 4);
        assert_eq!(c.auth.max_keys_per_token, 3);
        for (bad, key) in [
            (
                "[auth]\nallow_anonymous = true\nleeway_secs = 3601\n",
                "auth.leeway_secs",
            ),
            (
                "[auth]\nallow_anonymous = true\nmax_session = \"0s\"\n",
                "auth.max_session",
            ),
            (
                "[auth]\nallow_anonymous = true\nmax_session = \"400days\"\n",
                "auth.max_session",
            ),
            (
                "[auth]\nallow_anonymous = true\nmax_keys_per_token = 0\n",
                "auth.max_keys_per_token",
            ),
            (
                "[auth]\nallow_anonymous = true\nmax_verification_wait = \"0s\"\n",
                "auth.max_verification_wait",
            ),
            (
                "[auth]\nallow_anonymous = true\npersonal_room = \"u.{sub}\"\n",
                "auth.personal_room",
            ),
            (
                "[auth]\nallow_anonymous = true\n[limits]\nrefreshes_per_minute = 0\n",
                "limits.refreshes_per_minute",
            ),
        ] {
            let err = Config::parse(bad).unwrap_err().to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn nats_hardening_keys_have_defaults_and_are_validated() {
        let c = Config::parse("[auth]\nallow_anonymous = true\n").unwrap();
        assert_eq!(c.nats.ping_interval, Duration::from_secs(2));
        assert_eq!(c.nats.max_pending_bytes, 8 * 1024 * 1024);
        assert_eq!(c.limits.max_json_depth, 32);
        assert_eq!(
            (
                c.rooms.max_rooms_per_user,
                c.rooms.room_creations_per_second,
                c.rooms.room_creations_burst
            ),
            (1000, 10, 100)
        );
        for (toml, key) in [
            ("[nats]\nping_interval = \"0s\"\n", "nats.ping_interval"),
            ("[nats]\nmax_pending_bytes = 1000\n", "nats.max_pending_bytes"),
            ("[nats]\nmax_pending_bytes = 4294967296\n", "nats.max_pending_bytes"),
            ("[limits]\nmax_json_depth = 1\n", "limits.max_json_depth"),
            ("[limits]\nmax_json_depth = 129\n", "limits.max_json_depth"),
            ("[rooms]\nmax_rooms_per_user = 0\n", "rooms.max_rooms_per_user"),
            (
                "[rooms]\nroom_creations_per_second = 0\n",
                "rooms.room_creations_per_second",
            ),
            ("[rooms]\nroom_creations_burst = 0\n", "rooms.room_creations_burst"),
        ] {
            let err = Config::parse(&format!("[auth]\nallow_anonymous = true\n{toml}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
    }

    #[test]
    fn key_algorithms_and_secret_sources_are_typed() {
        let key = |body: &str| format!("[auth]\n[[auth.keys]]\n{body}\n");
        for alg in SUPPORTED_ALGORITHMS {
            let name = algorithm_name(alg);
            let material = if alg.family() == AlgorithmFamily::Hmac {
                "secret = { env = \"RW_SECRET\" }"
            } else {
                "public_key_file = \"k.pem\""
            };
            let c = Config::parse(&key(&format!("algorithm = \"{name}\"\n{material}"))).expect(&name);
            assert_eq!(c.auth.keys[0].algorithm, alg);
        }
        let c = Config::parse(&key("algorithm = \"HS512\"\nsecret = { file = \"s.txt\" }")).unwrap();
        assert_eq!(c.auth.keys[0].secret, Some(SecretSource::File("s.txt".into())));
        // Known to jsonwebtoken but not supported here, unknown, wrong case: refused where the file is parsed.
        for bad in ["PS256", "RS512", "ES384", "none", "hs256", ""] {
            let err = Config::parse(&key(&format!("algorithm = \"{bad}\"\npublic_key_file = \"k.pem\"")))
                .unwrap_err()
                .to_string();
            assert!(err.contains("algorithm") && err.contains("unsupported"), "{bad}: {err}");
        }
        // Built in code: validation still refuses it, naming the key.
        let mut c = Config::parse("[auth]\nallow_anonymous = true\n").unwrap();
        c.auth.keys.push(JwtKey {
            kid: None,
            algorithm: Algorithm::PS256,
            secret: None,
            public_key_file: Some("k.pem".into()),
        });
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("auth.keys.algorithm") && err.contains("\"PS256\""),
            "{err}"
        );
        for (body, want) in [
            ("algorithm = \"HS256\"", "auth.keys.secret"),
            ("algorithm = \"EdDSA\"", "auth.keys.public_key_file"),
            (
                "algorithm = \"HS256\"\nsecret = { file = \"a\", env = \"B\" }",
                "exactly one of `file` or `env`",
            ),
            ("algorithm = \"HS256\"\nsecret = {}", "exactly one of `file` or `env`"),
            ("algorithm = \"HS256\"\nsecret = { path = \"a\" }", "path"),
        ] {
            let err = Config::parse(&key(body)).unwrap_err().to_string();
            assert!(err.contains(want), "{body}: {err}");
        }
        let c = Config::parse(
            "[auth]\nallow_anonymous = true\n[nats]\nuser = \"u\"\npassword = { env = \"RW_NATS_PASSWORD\" }\n",
        )
        .unwrap();
        assert_eq!(c.nats.password, Some(SecretSource::Env("RW_NATS_PASSWORD".into())));
        let err = c
            .nats
            .password
            .as_ref()
            .map(|p| p.load("nats.password"))
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("nats.password"), "{err}");
    }

    #[test]
    fn room_patterns_are_compiled_at_load() {
        let c = Config::parse(
            "[auth]\nallow_anonymous = true\n[auth.anonymous]\njoin = [\"public-*\", \"lobby\"]\npublish = []\n",
        )
        .unwrap();
        assert_eq!(
            c.auth.anonymous.join,
            vec![RoomPattern::new("public-*"), RoomPattern::new("lobby")]
        );
        assert!(c.auth.anonymous.join[0].matches("public-1") && !c.auth.anonymous.join[1].matches("lobby2"));
        assert!(c.auth.anonymous.publish.is_empty());
        let err =
            Config::parse("[auth]\nallow_anonymous = true\n[[rooms.policy]]\npattern = \"\"\noverflow = \"latest\"\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("rooms.policy.pattern"), "{err}");
    }

    #[test]
    fn secret_debug_is_masked() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "MASKED");
    }

    #[test]
    fn forwarded_header_is_one_of_three() {
        let base = "[auth]\nallow_anonymous = true\n";
        assert_eq!(
            Config::parse(base).unwrap().server.forwarded_header,
            ForwardedHeader::XForwardedFor
        );
        for (v, want) in [
            ("x-forwarded-for", ForwardedHeader::XForwardedFor),
            ("forwarded", ForwardedHeader::Forwarded),
            ("x-real-ip", ForwardedHeader::XRealIp),
        ] {
            let c = Config::parse(&format!("{base}[server]\nforwarded_header = \"{v}\"\n")).unwrap();
            assert_eq!(c.server.forwarded_header, want);
            assert_eq!(want.name(), v);
        }
        let err = Config::parse(&format!("{base}[server]\nforwarded_header = \"X-Client-IP\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("forwarded_header"), "{err}");
    }
}
