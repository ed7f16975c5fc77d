//! DoS protection primitives, checked before and after the WebSocket upgrade: the client IP behind trusted
//! proxies, the `Origin` allow-list, the new-connection rate and concurrent-connection cap per IP ([`Limits::admit`]
//! returns an [`IpGuard`] that releases the slot on drop), and per-connection message/byte rates that also charge a
//! per-user budget shared by all of a user's connections ([`MessageLimiter`]). One [`Limits`] is built at startup
//! and shared via `Arc`. Every map here is bounded: the keyed rate limiters by `limits.max_tracked_keys`, the
//! per-IP connection counts by the number of open connections.
//!
//! Where an address is counted: a direct client by its TCP peer address at accept ([`Limits::admit_peer`], before
//! any TLS work, so a flood from one address costs an accept and a close); a client behind a proxy in
//! `server.trusted_proxies` by the address in the one configured forwarding header, at the upgrade
//! ([`Limits::client_ip`]). A malformed forwarding header is refused ([`ForwardedError`], HTTP 400) rather than
//! replaced by the proxy's address, which would pool every client behind it into one budget (or let one client pick
//! another's).
//!
//! IPv6 clients are keyed by their /64 prefix (one subscriber usually owns a whole /64, so per-address keys would
//! let one client spray addresses); IPv4-mapped IPv6 addresses are treated as IPv4.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    num::NonZeroU32,
    sync::Arc,
};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use hyper::http::{HeaderMap, header};
use ipnet::IpNet;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{Config, config::ForwardedHeader};

fn nz(v: u32) -> NonZeroU32 {
    // Config::validate refuses zero rates; clamp anyway so a hand-built config cannot panic here.
    NonZeroU32::new(v).unwrap_or(NonZeroU32::MIN)
}

pub(crate) fn quota(per_second: u32, burst: u32) -> Quota {
    Quota::per_second(nz(per_second)).allow_burst(nz(burst))
}

/// Key used for per-IP accounting: IPv4 as is, IPv6 truncated to its /64.
pub(crate) fn ip_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// A keyed limiter whose key count stays within `max` (see [`BoundedKeyed::prune`]).
pub(crate) struct BoundedKeyed<K: std::hash::Hash + Eq + Clone> {
    /// Swapped for a fresh limiter as the last-resort eviction; checks take the read lock.
    limiter: RwLock<DefaultKeyedRateLimiter<K>>,
    quota: Quota,
    max: usize,
}

impl<K: std::hash::Hash + Eq + Clone> BoundedKeyed<K> {
    pub(crate) fn new(quota: Quota, max: usize) -> Self {
        Self {
            limiter: RwLock::new(RateLimiter::keyed(quota)),
            quota,
            max,
        }
    }

    /// Charges `n` cells to `key`. A request larger than the burst is refused like a rate excess.
    pub(crate) fn check(&self, key: &K, n: u32) -> bool {
        let Some(n) = NonZeroU32::new(n) else {
            return true;
        };
        matches!(self.limiter.read().check_key_n(key, n), Ok(Ok(())))
    }

    pub(crate) fn len(&self) -> usize {
        self.limiter.read().len()
    }

    /// Keeps the key count ≤ `max - headroom` (headroom = keys about to be inserted): first drops keys whose state
    /// is back to "fresh" (`retain_recent`), and if that is not enough, replaces the whole store. This last resort
    /// forgets every key's history, so an attacker spraying keys can reset other clients' budgets; it only happens
    /// under such a spray, and the per-IP concurrency cap and the global connection cap still hold.
    pub(crate) fn prune(&self, headroom: usize) {
        let limit = self.max.saturating_sub(headroom);
        if self.len() <= limit {
            return;
        }
        let mut guard = self.limiter.write();
        guard.retain_recent();
        if guard.len() > limit {
            *guard = RateLimiter::keyed(self.quota);
        } else {
            guard.shrink_to_fit();
        }
    }
}

/// Why a new connection was refused: shed at accept for a direct client ([`Limits::admit_peer`]), answered with
/// HTTP 429 at the upgrade for a client behind a trusted proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The IP opened connections faster than `limits.connections_per_second_per_ip` (+ burst).
    ConnectionRate,
    /// The IP already holds `limits.max_connections_per_ip` open connections.
    TooManyPerIp,
}

impl Rejection {
    /// Short public text for the 429 body.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::ConnectionRate => "connection rate exceeded",
            Rejection::TooManyPerIp => "too many connections from this address",
        }
    }
}

/// Why a trusted proxy's forwarding header gave no client address (answered with HTTP 400). The texts are fixed:
/// they never echo the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ForwardedError {
    /// A line of the header has bytes outside visible ASCII.
    #[error("forwarding header is not ASCII")]
    NonAscii,
    /// The header, or the entry that decides the client, is empty (or a `Forwarded` element has no `for=`).
    #[error("forwarding header is empty")]
    Empty,
    /// The deciding entry is not an IP address (with an optional port).
    #[error("forwarding header is malformed")]
    Unparsable,
    /// The deciding entry is `unknown` or an obfuscated identifier (`_hidden`): there is no address to count.
    #[error("forwarded address is unknown or obfuscated")]
    Obfuscated,
    /// `X-Real-IP` appears on more than one line: the proxy appended instead of replacing the client's own.
    #[error("forwarding header repeated")]
    Repeated,
}

/// A message was refused by a rate limit (the client gets a `rate_limited` error frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limited")]
pub struct RateLimited;

/// Open connections per IP key; an entry exists only while its count is > 0.
type ConnCounts = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// Shared DoS-protection state. Built once from the config; every map in it is bounded (see the module doc).
pub struct Limits {
    trusted_proxies: Vec<IpNet>,
    /// `server.forwarded_header`: the only header read from trusted proxies.
    forwarded_header: ForwardedHeader,
    /// Parsed `server.allowed_origins`; empty = allow all.
    origins: Vec<OriginRule>,
    /// New connections per IP key. ≤ `limits.max_tracked_keys` keys.
    conn_rate: BoundedKeyed<IpAddr>,
    /// Open connections per IP key: one entry per key with ≥ 1 open connection, removed at 0.
    conns: ConnCounts,
    max_per_ip: usize,
    /// Messages per user, shared by the user's connections. ≤ `limits.max_tracked_keys` keys.
    user_msgs: BoundedKeyed<Arc<str>>,
    /// Bytes per user, shared by the user's connections. ≤ `limits.max_tracked_keys` keys.
    user_bytes: BoundedKeyed<Arc<str>>,
    msg_quota: Quota,
    byte_quota: Quota,
    max_violations: u32,
    /// Global connection cap (`server.max_connections`); a permit lives as long as its connection's task.
    conn_permits: Arc<Semaphore>,
    /// Small pool for answering connections over the cap, so rejecting cannot itself exhaust memory.
    reject_permits: Arc<Semaphore>,
}

/// Connections over `server.max_connections` that may still get one answer (503, `/healthz`); beyond that they are
/// closed at accept.
const REJECT_POOL: usize = 64;

/// Why a new TCP connection was closed at accept, before any TLS work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// Its address is over `limits.max_connections_per_ip` or the per-IP connection rate.
    Address(Rejection),
    /// The gateway is over `server.max_connections` and its pool of over-capacity answers is busy too.
    Capacity,
}

impl Shed {
    /// Metrics reason (`roomwire_rejections_total{reason}`).
    pub fn reason(&self) -> crate::metrics::Rejected {
        use crate::metrics::Rejected;
        match self {
            Shed::Address(Rejection::TooManyPerIp) => Rejected::ShedPerIp,
            Shed::Address(Rejection::ConnectionRate) => Rejected::ShedRate,
            Shed::Capacity => Rejected::Capacity,
        }
    }
}

/// A connection's places under the caps, owned together from accept to close: its global permit (or a place in the
/// over-capacity answer pool) and its per-address count. Dropping it releases both, exactly once, however the
/// connection ends.
#[derive(Debug)]
pub struct ConnSlot {
    _global: OwnedSemaphorePermit,
    over_capacity: bool,
    /// `None` until the upgrade for a trusted proxy's connection, whose client is counted by forwarded address.
    address: Option<IpGuard>,
}

impl ConnSlot {
    /// Over `server.max_connections`: the connection gets one answer and is closed.
    pub fn over_capacity(&self) -> bool {
        self.over_capacity
    }

    /// Whether the connection was counted by its peer address at accept (false for a trusted proxy).
    pub fn counted_at_accept(&self) -> bool {
        self.address.is_some()
    }

    /// Counts a trusted proxy's connection under its client's (forwarded) address, from the upgrade on.
    pub fn count_forwarded(&mut self, guard: IpGuard) {
        self.address.get_or_insert(guard);
    }
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("tracked_keys", &self.tracked_keys())
            .finish_non_exhaustive()
    }
}

impl Limits {
    /// Builds the limiters from `server.allowed_origins`, `server.trusted_proxies` and the `[limits]` rates.
    pub fn new(config: &Config) -> Self {
        let l = &config.limits;
        let max = l.max_tracked_keys;
        let msg_quota = quota(l.messages_per_second, l.messages_burst);
        let byte_quota = quota(l.bytes_per_second, l.bytes_burst);
        Self {
            trusted_proxies: config.server.trusted_proxies.clone(),
            forwarded_header: config.server.forwarded_header,
            origins: config
                .server
                .allowed_origins
                .iter()
                .map(|o| OriginRule::parse(o))
                .collect(),
            conn_rate: BoundedKeyed::new(quota(l.connections_per_second_per_ip, l.connections_burst_per_ip), max),
            conns: Arc::default(),
            max_per_ip: l.max_connections_per_ip,
            user_msgs: BoundedKeyed::new(msg_quota, max),
            user_bytes: BoundedKeyed::new(byte_quota, max),
            msg_quota,
            byte_quota,
            max_violations: l.max_rate_violations,
            conn_permits: Arc::new(Semaphore::new(config.server.max_connections)),
            reject_permits: Arc::new(Semaphore::new(REJECT_POOL)),
        }
    }

    /// Admits a new TCP connection at accept, before any TLS work: its per-address count and rate (see
    /// [`Limits::admit_peer`]), then a global permit, or a place in the small pool of over-capacity answers.
    pub fn admit_connection(&self, peer: IpAddr) -> Result<ConnSlot, Shed> {
        let address = self.admit_peer(peer).map_err(Shed::Address)?;
        let (global, over_capacity) = match self.conn_permits.clone().try_acquire_owned() {
            Ok(p) => (p, false),
            Err(_) => {
                let p = self
                    .reject_permits
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| Shed::Capacity)?;
                (p, true)
            }
        };
        Ok(ConnSlot {
            _global: global,
            over_capacity,
            address,
        })
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// Whether `ip` is in `server.trusted_proxies`.
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.trusted(ip)
    }

    /// The client's IP: the peer address, unless the peer is in `server.trusted_proxies`; then the right-most entry
    /// of `server.forwarded_header` (all lines, in order) that is not itself a trusted proxy, or the left-most entry
    /// when every hop is trusted. Only that header is read. A trusted peer that sends no such header is its own
    /// client (a health check from the proxy). A header that is not ASCII, empty, or whose deciding entry is not an
    /// address (garbage, `unknown`, `_hidden`) is an error: the caller answers 400.
    pub fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> Result<IpAddr, ForwardedError> {
        let peer_ip = peer.ip().to_canonical();
        if !self.trusted(peer_ip) {
            return Ok(peer_ip);
        }
        let mut lines = Vec::new();
        for v in headers.get_all(self.forwarded_header.name()) {
            lines.push(v.to_str().map_err(|_| ForwardedError::NonAscii)?);
        }
        if lines.is_empty() {
            return Ok(peer_ip);
        }
        let chain: Vec<Result<&str, ForwardedError>> = match self.forwarded_header {
            ForwardedHeader::XForwardedFor => lines.iter().flat_map(|l| l.split(',')).map(Ok).collect(),
            ForwardedHeader::Forwarded => lines.iter().flat_map(|l| forwarded_for_values(l)).collect(),
            ForwardedHeader::XRealIp if lines.len() > 1 => return Err(ForwardedError::Repeated),
            ForwardedHeader::XRealIp => vec![Ok(lines[0])],
        };
        let mut leftmost = None;
        for entry in chain.iter().rev() {
            let ip = parse_forwarded_ip(entry.as_ref().map_err(|e| *e)?)?.to_canonical();
            if !self.trusted(ip) {
                return Ok(ip);
            }
            leftmost = Some(ip);
        }
        // Every hop is a trusted proxy: the left-most is the client as the first proxy saw it.
        leftmost.ok_or(ForwardedError::Empty)
    }

    /// Whether the request's `Origin` is allowed by `server.allowed_origins`. An empty list allows everything;
    /// otherwise a request without `Origin` is refused. Rules: exact origins (`https://app.example.com`,
    /// case-insensitive), `*.example.com` (any scheme) and `https://*.example.com`. A wildcard needs at least one
    /// label (`example.com` itself does not match `*.example.com`) and matches the port only if it names one.
    pub fn origin_allowed(&self, headers: &HeaderMap) -> bool {
        if self.origins.is_empty() {
            return true;
        }
        let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let origin = origin.trim().to_ascii_lowercase();
        self.origins.iter().any(|r| r.matches(&origin))
    }

    /// Admits a new connection from `ip` (before the upgrade): charges the IP's new-connection rate, then takes
    /// one of its `limits.max_connections_per_ip` slots. The returned guard releases the slot on drop; keep it for
    /// the connection's lifetime.
    pub fn admit(&self, ip: IpAddr) -> Result<IpGuard, Rejection> {
        let key = ip_key(ip);
        let allowed = self.conn_rate.check(&key, 1);
        self.conn_rate.prune(0);
        if !allowed {
            return Err(Rejection::ConnectionRate);
        }
        let mut conns = self.conns.lock();
        let count = conns.entry(key).or_insert(0);
        if *count >= self.max_per_ip {
            return Err(Rejection::TooManyPerIp);
        }
        *count += 1;
        Ok(IpGuard {
            conns: Arc::clone(&self.conns),
            key,
        })
    }

    /// Charges one request that costs what an upgrade costs (a token check: `/client/check`) to `ip`'s connection
    /// rate (`limits.connections_per_second_per_ip`), as every request, not only a connection's first.
    pub fn charge_check(&self, ip: IpAddr) -> Result<(), Rejection> {
        let allowed = self.conn_rate.check(&ip_key(ip), 1);
        self.conn_rate.prune(0);
        if allowed {
            Ok(())
        } else {
            Err(Rejection::ConnectionRate)
        }
    }

    /// Admits a new TCP connection from `peer` at accept, before any TLS work: like [`Limits::admit`] keyed by the
    /// peer address, except for peers in `server.trusted_proxies`, which get `Ok(None)` (their clients are counted
    /// by forwarded address at the upgrade). The guard is the connection's per-address slot: it moves with the
    /// connection into its WebSocket task and is released, once, when dropped.
    pub fn admit_peer(&self, peer: IpAddr) -> Result<Option<IpGuard>, Rejection> {
        if self.trusted(peer) {
            return Ok(None);
        }
        self.admit(peer.to_canonical()).map(Some)
    }

    /// Addresses with at least one open connection counted against them.
    pub fn open_addresses(&self) -> usize {
        self.conns.lock().len()
    }

    /// Keys held by the keyed limiters plus the per-IP connection map (tests assert this stays bounded).
    pub fn tracked_keys(&self) -> usize {
        self.conn_rate.len() + self.user_msgs.len() + self.user_bytes.len() + self.conns.lock().len()
    }

    /// A limiter for one connection: `limits.messages_per_second`/`bytes_per_second` (with bursts) for the
    /// connection itself and, if `user` is set, the same quotas for the user across all its connections.
    pub fn message_limiter(self: &Arc<Self>, user: Option<&str>) -> MessageLimiter {
        if user.is_some() {
            // A new connection is where a new user key appears, so the user stores are bounded here (not on the
            // per-message path). A store cleared by the last resort refills with the keys of connected users only,
            // so it can exceed `max_tracked_keys` only if more distinct users than that are connected at once
            // (itself bounded by `server.max_connections`).
            self.user_msgs.prune(1);
            self.user_bytes.prune(1);
        }
        MessageLimiter {
            limits: Arc::clone(self),
            user: user.map(Arc::from),
            msgs: RateLimiter::direct(self.msg_quota),
            bytes: RateLimiter::direct(self.byte_quota),
            violations: 0,
        }
    }
}

/// The `for=` value of each element of one `Forwarded` line (RFC 7239), in order, respecting quoted strings. An
/// element without `for=`, or with two, gives an error in its position (it matters only if that position decides).
fn forwarded_for_values(line: &str) -> Vec<Result<&str, ForwardedError>> {
    split_unquoted(line, b',')
        .into_iter()
        .map(|element| {
            let mut found = Err(ForwardedError::Empty);
            for pair in split_unquoted(element, b';') {
                if let Some((k, v)) = pair.split_once('=')
                    && k.trim().eq_ignore_ascii_case("for")
                {
                    if found.is_ok() {
                        return Err(ForwardedError::Unparsable);
                    }
                    found = Ok(v);
                }
            }
            found
        })
        .collect()
}

/// Splits `s` at `sep` outside double-quoted strings (a backslash escapes the next byte inside quotes).
fn split_unquoted(s: &str, sep: u8) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, b) in s.bytes().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            _ if b == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// Parses one `X-Forwarded-For` / `X-Real-IP` entry or `Forwarded` `for=` value: `1.2.3.4`, `1.2.3.4:80`, `::1`,
/// `[::1]`, `"[::1]:80"`, `"[::1]:_port"` (surrounding quotes optional). `unknown` and obfuscated identifiers
/// (`_hidden`) are [`ForwardedError::Obfuscated`]; anything else that is not an address is
/// [`ForwardedError::Unparsable`].
fn parse_forwarded_ip(entry: &str) -> Result<IpAddr, ForwardedError> {
    let mut s = entry.trim();
    if s.is_empty() {
        return Err(ForwardedError::Empty);
    }
    if s.starts_with('"') || s.ends_with('"') {
        s = s
            .strip_prefix('"')
            .and_then(|r| r.strip_suffix('"'))
            .ok_or(ForwardedError::Unparsable)?;
    }
    if s.eq_ignore_ascii_case("unknown") || s.starts_with('_') {
        return Err(ForwardedError::Obfuscated);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(ip);
    }
    let (host, port) = match s.strip_prefix('[') {
        // `[v6]` or `[v6]:port`
        Some(rest) => {
            let (host, after) = rest.split_once(']').ok_or(ForwardedError::Unparsable)?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or(ForwardedError::Unparsable)?),
            };
            (host.parse::<Ipv6Addr>().map(IpAddr::V6), port)
        }
        // `v4:port` (a bare IPv6 address parsed above)
        None => {
            let (host, port) = s.split_once(':').ok_or(ForwardedError::Unparsable)?;
            (host.parse::<std::net::Ipv4Addr>().map(IpAddr::V4), Some(port))
        }
    };
    let port_ok = port.is_none_or(|p| {
        p.parse::<u16>().is_ok()
            || (p.len() > 1
                && p.starts_with('_')
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')))
    });
    match host {
        Ok(ip) if port_ok => Ok(ip),
        _ => Err(ForwardedError::Unparsable),
    }
}

/// One connection's slot in the per-IP count; dropping it releases the slot (and the map entry at 0).
#[derive(Debug)]
pub struct IpGuard {
    conns: ConnCounts,
    key: IpAddr,
}

impl Drop for IpGuard {
    fn drop(&mut self) {
        let mut conns = self.conns.lock();
        if let Some(count) = conns.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                conns.remove(&self.key);
            }
        }
    }
}

/// Rate limits of one connection (message count and bytes), also charging its user's shared budget. Owned by the
/// connection's task.
pub struct MessageLimiter {
    limits: Arc<Limits>,
    user: Option<Arc<str>>,
    msgs: DefaultDirectRateLimiter,
    bytes: DefaultDirectRateLimiter,
    /// Consecutive refusals; reset by a success.
    violations: u32,
}

impl std::fmt::Debug for MessageLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageLimiter")
            .field("user", &self.user)
            .field("violations", &self.violations)
            .finish()
    }
}

impl MessageLimiter {
    /// Charges one message of `bytes` bytes to the connection and, if any, to the user. `Err` means the client
    /// gets `rate_limited` (cells already taken by an earlier check in the chain are not refunded).
    pub fn check(&mut self, bytes: usize) -> Result<(), RateLimited> {
        let n = u32::try_from(bytes).unwrap_or(u32::MAX);
        let ok = self.msgs.check().is_ok()
            && NonZeroU32::new(n).is_none_or(|n| matches!(self.bytes.check_n(n), Ok(Ok(()))))
            && self
                .user
                .as_ref()
                .is_none_or(|u| self.limits.user_msgs.check(u, 1) && self.limits.user_bytes.check(u, n));
        if ok {
            self.violations = 0;
            Ok(())
        } else {
            self.violations = self.violations.saturating_add(1);
            Err(RateLimited)
        }
    }

    /// Charges one incoming WebSocket frame of `frame_len` bytes (header included, saturated), whatever its opcode.
    pub fn check_frame(&mut self, frame_len: u64) -> Result<(), RateLimited> {
        self.check(usize::try_from(frame_len).unwrap_or(usize::MAX))
    }

    /// True once `limits.max_rate_violations` refusals happened in a row: the caller closes with 1008.
    pub fn abusive(&self) -> bool {
        self.violations >= self.limits.max_violations
    }
}

/// One parsed `server.allowed_origins` entry (lower-cased).
#[derive(Debug)]
enum OriginRule {
    /// Whole origin, e.g. `https://app.example.com` (trailing `/` removed).
    Exact(String),
    /// `[scheme://]*.suffix[:port]`; `suffix` starts with `.`.
    Wildcard {
        scheme: Option<String>,
        suffix: String,
        port: Option<String>,
    },
}

impl OriginRule {
    fn parse(rule: &str) -> Self {
        let rule = rule.trim().trim_end_matches('/').to_ascii_lowercase();
        let (scheme, rest) = match rule.split_once("://") {
            Some((s, r)) => (Some(s.to_owned()), r.to_owned()),
            None => (None, rule.clone()),
        };
        match rest.strip_prefix('*') {
            Some(tail) if tail.starts_with('.') => {
                let (suffix, port) = match tail.rsplit_once(':') {
                    Some((h, p)) => (h.to_owned(), Some(p.to_owned())),
                    None => (tail.to_owned(), None),
                };
                OriginRule::Wildcard { scheme, suffix, port }
            }
            _ => OriginRule::Exact(rule),
        }
    }

    /// `origin` is lower-cased.
    fn matches(&self, origin: &str) -> bool {
        match self {
            OriginRule::Exact(o) => o == origin,
            OriginRule::Wildcard { scheme, suffix, port } => {
                let Some((o_scheme, authority)) = origin.split_once("://") else {
                    return false;
                };
                if scheme.as_deref().is_some_and(|s| s != o_scheme) {
                    return false;
                }
                let (host, o_port) = match authority.rsplit_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (authority, None),
                };
                let Some(label) = host.strip_suffix(suffix.as_str()) else {
                    return false;
                };
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                    && !label.starts_with('.')
                    && port.as_deref() == o_port
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::http::HeaderValue;

    fn config() -> Config {
        let mut c = Config::default();
        c.server.trusted_proxies = vec!["10.0.0.0/8".parse().expect("net"), "::1/128".parse().expect("net")];
        c.server.allowed_origins = vec![
            "https://app.example.com".into(),
            "*.example.org".into(),
            "https://*.example.net".into(),
        ];
        c
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().expect("header value"));
        }
        h
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn limits_with(header: ForwardedHeader) -> Limits {
        let mut c = config();
        c.server.forwarded_header = header;
        Limits::new(&c)
    }

    /// The client address a trusted proxy (10.1.2.3) forwarding `pairs` yields.
    fn via_proxy(l: &Limits, pairs: &[(&'static str, &str)]) -> Result<IpAddr, ForwardedError> {
        l.client_ip(sa("10.1.2.3:1000"), &headers(pairs))
    }

    #[test]
    fn client_ip_trusts_only_configured_proxies() {
        let l = Limits::new(&config());
        let xff = headers(&[("x-forwarded-for", "6.6.6.6, 1.2.3.4, 10.0.0.7")]);
        // Untrusted peer: its header is ignored (spoofing), even a malformed one.
        assert_eq!(l.client_ip(sa("5.5.5.5:1000"), &xff), Ok(ip("5.5.5.5")));
        let junk = headers(&[("x-forwarded-for", "junk")]);
        assert_eq!(l.client_ip(sa("5.5.5.5:1000"), &junk), Ok(ip("5.5.5.5")));
        // Trusted peer: right-most untrusted entry, skipping a trusted hop; the spoofed left entry is ignored.
        assert_eq!(l.client_ip(sa("10.1.2.3:1000"), &xff), Ok(ip("1.2.3.4")));
        // No header: the proxy is its own client (its health checks).
        assert_eq!(l.client_ip(sa("10.1.2.3:1000"), &HeaderMap::new()), Ok(ip("10.1.2.3")));
        // Only trusted hops: the left-most one, as the first proxy saw it (not the peer).
        assert_eq!(
            via_proxy(&l, &[("x-forwarded-for", "10.9.9.9, 10.0.0.7")]),
            Ok(ip("10.9.9.9"))
        );
        // IPv4-mapped peer counts as its IPv4 address; IPv4-mapped entries too.
        assert_eq!(l.client_ip(sa("[::ffff:10.1.2.3]:1"), &xff), Ok(ip("1.2.3.4")));
        assert_eq!(
            via_proxy(&l, &[("x-forwarded-for", "::ffff:1.2.3.4")]),
            Ok(ip("1.2.3.4"))
        );
        assert!(l.is_trusted_proxy(ip("10.1.2.3")) && !l.is_trusted_proxy(ip("5.5.5.5")));
    }

    #[test]
    fn only_the_configured_header_is_read() {
        let both = [
            ("x-forwarded-for", "1.1.1.1"),
            ("forwarded", "for=2.2.2.2"),
            ("x-real-ip", "3.3.3.3"),
        ];
        let xff = limits_with(ForwardedHeader::XForwardedFor);
        let fwd = limits_with(ForwardedHeader::Forwarded);
        let real = limits_with(ForwardedHeader::XRealIp);
        assert_eq!(via_proxy(&xff, &both), Ok(ip("1.1.1.1")));
        assert_eq!(via_proxy(&fwd, &both), Ok(ip("2.2.2.2")));
        assert_eq!(via_proxy(&real, &both), Ok(ip("3.3.3.3")));
        // A client-written X-Forwarded-For does not override a proxy that writes only `Forwarded`: the client
        // (behind a proxy that ignores XFF) cannot pick its own address.
        assert_eq!(
            via_proxy(&fwd, &[("x-forwarded-for", "6.6.6.6"), ("forwarded", "for=1.2.3.4")]),
            Ok(ip("1.2.3.4"))
        );
        // ... and a proxy that writes only XFF ignores a client-written `Forwarded`.
        assert_eq!(
            via_proxy(&xff, &[("forwarded", "for=6.6.6.6")]),
            Ok(ip("10.1.2.3")),
            "configured header absent: the proxy itself"
        );
        assert_eq!(
            via_proxy(&xff, &[("forwarded", "for=6.6.6.6"), ("x-forwarded-for", "1.2.3.4")]),
            Ok(ip("1.2.3.4"))
        );
    }

    #[test]
    fn x_forwarded_for_rightmost_untrusted_hop() {
        let l = limits_with(ForwardedHeader::XForwardedFor);
        let xff = |v: &str| via_proxy(&l, &[("x-forwarded-for", v)]);
        assert_eq!(xff("1.2.3.4"), Ok(ip("1.2.3.4")));
        assert_eq!(xff("6.6.6.6,1.2.3.4"), Ok(ip("1.2.3.4")));
        assert_eq!(xff("  6.6.6.6 ,  1.2.3.4  "), Ok(ip("1.2.3.4")));
        assert_eq!(xff("6.6.6.6, 1.2.3.4, 10.0.0.7, ::1"), Ok(ip("1.2.3.4")));
        // Ports and IPv6 forms.
        assert_eq!(xff("1.2.3.4:5678"), Ok(ip("1.2.3.4")));
        assert_eq!(xff("2001:db8::1"), Ok(ip("2001:db8::1")));
        assert_eq!(xff("[2001:db8::1]"), Ok(ip("2001:db8::1")));
        assert_eq!(xff("[2001:db8::1]:443"), Ok(ip("2001:db8::1")));
        assert_eq!(xff("\"[2001:db8::1]:443\""), Ok(ip("2001:db8::1")));
        // Garbage left of the deciding entry is the client's own business.
        assert_eq!(xff("junk, unknown, _x, , 1.2.3.4"), Ok(ip("1.2.3.4")));
        // Several header lines form one list, in order: the last line's right-most entry decides.
        let multi = [("x-forwarded-for", "6.6.6.6"), ("x-forwarded-for", "1.2.3.4, 10.0.0.1")];
        assert_eq!(via_proxy(&l, &multi), Ok(ip("1.2.3.4")));
        let multi = [("x-forwarded-for", "1.2.3.4"), ("x-forwarded-for", "junk")];
        assert_eq!(via_proxy(&l, &multi), Err(ForwardedError::Unparsable));
    }

    #[test]
    fn x_forwarded_for_malformed_is_refused_not_replaced_by_the_proxy() {
        let l = limits_with(ForwardedHeader::XForwardedFor);
        let xff = |v: &str| via_proxy(&l, &[("x-forwarded-for", v)]);
        assert_eq!(xff(""), Err(ForwardedError::Empty));
        assert_eq!(xff("   "), Err(ForwardedError::Empty));
        assert_eq!(xff("1.2.3.4,"), Err(ForwardedError::Empty));
        assert_eq!(
            xff("1.2.3.4, , 10.0.0.1"),
            Err(ForwardedError::Empty),
            "empty entry decides"
        );
        assert_eq!(xff("junk"), Err(ForwardedError::Unparsable));
        assert_eq!(xff("1.2.3.4, junk"), Err(ForwardedError::Unparsable));
        assert_eq!(xff("1.2.3"), Err(ForwardedError::Unparsable));
        assert_eq!(xff("01.2.3.4"), Err(ForwardedError::Unparsable));
        assert_eq!(xff("1.2.3.4:99999"), Err(ForwardedError::Unparsable));
        assert_eq!(xff("1.2.3.4:"), Err(ForwardedError::Unparsable));
        assert_eq!(xff("[2001:db8::1"), Err(ForwardedError::Unparsable));
        assert_eq!(xff("[2001:db8::1]x"), Err(ForwardedError::Unparsable));
        assert_eq!(xff("[1.2.3.4]"), Err(ForwardedError::Unparsable));
        assert_eq!(xff("\"1.2.3.4"), Err(ForwardedError::Unparsable));
        assert_eq!(xff("fe80::1%eth0"), Err(ForwardedError::Unparsable));
        assert_eq!(xff("unknown"), Err(ForwardedError::Obfuscated));
        assert_eq!(xff("1.2.3.4, UNKNOWN"), Err(ForwardedError::Obfuscated));
        assert_eq!(xff("_hidden"), Err(ForwardedError::Obfuscated));
        // Non-ASCII (obs-text) anywhere in any line: refused, not read as "no header".
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            HeaderValue::from_bytes("1.2.3.4".as_bytes()).expect("value"),
        );
        h.append(
            "x-forwarded-for",
            HeaderValue::from_bytes("5.6.7.8, caf\u{e9}".as_bytes()).expect("value"),
        );
        assert_eq!(l.client_ip(sa("10.1.2.3:1"), &h), Err(ForwardedError::NonAscii));
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_bytes(b"\xff\xfe").expect("value"));
        assert_eq!(l.client_ip(sa("10.1.2.3:1"), &h), Err(ForwardedError::NonAscii));
    }

    #[test]
    fn forwarded_rfc7239_rightmost_untrusted_hop() {
        let l = limits_with(ForwardedHeader::Forwarded);
        let fwd = |v: &str| via_proxy(&l, &[("forwarded", v)]);
        assert_eq!(fwd("for=1.2.3.4"), Ok(ip("1.2.3.4")));
        assert_eq!(fwd("For=1.2.3.4;proto=https;by=10.0.0.1"), Ok(ip("1.2.3.4")));
        assert_eq!(fwd("proto=https;for=1.2.3.4"), Ok(ip("1.2.3.4")));
        assert_eq!(
            fwd("for=6.6.6.6, for=\"[2001:db8::1]:4711\";proto=https"),
            Ok(ip("2001:db8::1"))
        );
        assert_eq!(fwd("for=\"[2001:db8::1]\""), Ok(ip("2001:db8::1")));
        assert_eq!(fwd("for=\"1.2.3.4:80\""), Ok(ip("1.2.3.4")));
        assert_eq!(
            fwd("for=\"[2001:db8::1]:_port\""),
            Ok(ip("2001:db8::1")),
            "obfuscated port"
        );
        assert_eq!(fwd("for=6.6.6.6, for=1.2.3.4, for=10.0.0.9"), Ok(ip("1.2.3.4")));
        // A quoted string may hold `,` and `;`: they do not split elements (here left of the deciding one).
        assert_eq!(fwd("for=\"x,y;z\", for=1.2.3.4"), Ok(ip("1.2.3.4")));
        // Several lines.
        let multi = [("forwarded", "for=6.6.6.6"), ("forwarded", "for=1.2.3.4;proto=https")];
        assert_eq!(via_proxy(&l, &multi), Ok(ip("1.2.3.4")));
        // Only trusted hops: the left-most.
        assert_eq!(fwd("for=10.0.0.1, for=10.0.0.2"), Ok(ip("10.0.0.1")));
    }

    #[test]
    fn forwarded_malformed_is_refused() {
        let l = limits_with(ForwardedHeader::Forwarded);
        let fwd = |v: &str| via_proxy(&l, &[("forwarded", v)]);
        assert_eq!(fwd(""), Err(ForwardedError::Empty));
        assert_eq!(
            fwd("proto=https"),
            Err(ForwardedError::Empty),
            "no for= in the deciding element"
        );
        assert_eq!(fwd("for=1.2.3.4, proto=https"), Err(ForwardedError::Empty));
        assert_eq!(fwd("for="), Err(ForwardedError::Empty));
        assert_eq!(
            fwd("for=1.2.3.4;for=5.6.7.8"),
            Err(ForwardedError::Unparsable),
            "for= twice"
        );
        assert_eq!(fwd("for=junk"), Err(ForwardedError::Unparsable));
        assert_eq!(
            fwd("for=\"[2001:db8::1]:4711"),
            Err(ForwardedError::Unparsable),
            "unterminated quote"
        );
        assert_eq!(fwd("for=unknown"), Err(ForwardedError::Obfuscated));
        assert_eq!(fwd("for=_hidden"), Err(ForwardedError::Obfuscated));
        assert_eq!(fwd("for=\"_gazonk\""), Err(ForwardedError::Obfuscated));
        assert_eq!(
            fwd("for=1.2.3.4, for=_hidden;proto=https"),
            Err(ForwardedError::Obfuscated)
        );
        // An obfuscated hop left of the deciding one does not matter.
        assert_eq!(fwd("for=_hidden, for=1.2.3.4"), Ok(ip("1.2.3.4")));
        let mut h = HeaderMap::new();
        h.append(
            "forwarded",
            HeaderValue::from_bytes("for=1.2.3.4;host=caf\u{e9}".as_bytes()).expect("value"),
        );
        assert_eq!(l.client_ip(sa("10.1.2.3:1"), &h), Err(ForwardedError::NonAscii));
    }

    #[test]
    fn x_real_ip_single_value() {
        let l = limits_with(ForwardedHeader::XRealIp);
        let real = |v: &str| via_proxy(&l, &[("x-real-ip", v)]);
        assert_eq!(real("1.2.3.4"), Ok(ip("1.2.3.4")));
        assert_eq!(real("[2001:db8::1]:80"), Ok(ip("2001:db8::1")));
        assert_eq!(real("10.0.0.5"), Ok(ip("10.0.0.5")), "the only value, trusted or not");
        assert_eq!(real(""), Err(ForwardedError::Empty));
        assert_eq!(real("1.2.3.4, 5.6.7.8"), Err(ForwardedError::Unparsable), "not a list");
        assert_eq!(real("unknown"), Err(ForwardedError::Obfuscated));
        let twice = [("x-real-ip", "6.6.6.6"), ("x-real-ip", "1.2.3.4")];
        assert_eq!(via_proxy(&l, &twice), Err(ForwardedError::Repeated));
    }

    #[test]
    fn admit_peer_counts_direct_clients_and_skips_trusted_proxies() {
        let mut c = config();
        c.limits.max_connections_per_ip = 1;
        let l = Limits::new(&c);
        let g = l.admit_peer(ip("1.2.3.4")).expect("first").expect("counted");
        assert_eq!(l.admit_peer(ip("1.2.3.4")).err(), Some(Rejection::TooManyPerIp));
        assert_eq!(
            l.admit_peer(ip("::ffff:1.2.3.4")).err(),
            Some(Rejection::TooManyPerIp),
            "mapped"
        );
        assert!(
            matches!(l.admit_peer(ip("10.1.2.3")), Ok(None)),
            "trusted proxy: counted at the upgrade"
        );
        assert!(matches!(l.admit_peer(ip("10.1.2.3")), Ok(None)));
        drop(g);
        assert!(l.admit_peer(ip("1.2.3.4")).expect("freed").is_some());
        use crate::metrics::{Reason, Rejected};
        assert_eq!(Shed::Address(Rejection::TooManyPerIp).reason(), Rejected::ShedPerIp);
        assert_eq!(Shed::Address(Rejection::ConnectionRate).reason().as_str(), "shed_rate");
    }

    #[test]
    fn origins_exact_wildcard_and_missing() {
        let l = Limits::new(&config());
        let ok = |o: &str| l.origin_allowed(&headers(&[("origin", o)]));
        assert!(ok("https://app.example.com") && ok("HTTPS://App.Example.com"));
        assert!(!ok("http://app.example.com") && !ok("https://app.example.com.evil.io"));
        assert!(ok("https://a.example.org") && ok("http://a.b.example.org"));
        assert!(!ok("https://example.org") && !ok("https://evilexample.org") && !ok("https://a.example.org:8443"));
        assert!(ok("https://x.example.net") && !ok("http://x.example.net"));
        assert!(!ok("null"));
        assert!(!l.origin_allowed(&HeaderMap::new()));
        let open = Limits::new(&Config::default());
        assert!(open.origin_allowed(&HeaderMap::new()));
    }

    #[test]
    fn admit_caps_concurrency_and_guard_drop_frees() {
        let mut c = config();
        c.limits.max_connections_per_ip = 2;
        let l = Limits::new(&c);
        let a = ip("1.2.3.4");
        let g1 = l.admit(a).expect("first");
        let g2 = l.admit(a).expect("second");
        assert_eq!(l.admit(a).err(), Some(Rejection::TooManyPerIp));
        assert!(l.admit(ip("1.2.3.5")).is_ok(), "other IPs unaffected");
        drop(g1);
        let g3 = l.admit(a).expect("slot freed");
        drop((g2, g3));
        assert!(l.conns.lock().is_empty(), "entries removed at 0");
        // IPv6 addresses of one /64 share the cap.
        let _v1 = l.admit(ip("2001:db8::1")).expect("v6");
        let _v2 = l.admit(ip("2001:db8::2")).expect("v6");
        assert_eq!(l.admit(ip("2001:db8::3")).err(), Some(Rejection::TooManyPerIp));
    }

    #[test]
    fn admit_limits_connection_rate() {
        let mut c = config();
        c.limits.connections_per_second_per_ip = 1;
        c.limits.connections_burst_per_ip = 3;
        let l = Limits::new(&c);
        let a = ip("1.2.3.4");
        for _ in 0..3 {
            drop(l.admit(a).expect("within burst"));
        }
        assert_eq!(l.admit(a).err(), Some(Rejection::ConnectionRate));
        // The 429 body comes from the refusal itself (not a variant built by the test).
        assert_eq!(l.admit(a).err().map(|r| r.reason()), Some("connection rate exceeded"));
        assert!(l.admit(ip("1.2.3.5")).is_ok());
    }

    #[test]
    fn ip_spray_keeps_tracked_keys_bounded() {
        let mut c = config();
        c.limits.max_tracked_keys = 1000;
        let l = Arc::new(Limits::new(&c));
        for i in 0..10_000u32 {
            let addr = IpAddr::V4(std::net::Ipv4Addr::from(0x0b00_0000 + i));
            drop(l.admit(addr).expect("fresh IP admitted"));
            assert!(l.tracked_keys() <= 1000, "after {i}: {}", l.tracked_keys());
        }
        for i in 0..3000 {
            let mut m = l.message_limiter(Some(&format!("user-{i}")));
            m.check(10).expect("fresh user");
        }
        assert!(l.tracked_keys() <= 3 * 1000, "{}", l.tracked_keys());
        assert!(l.conn_rate.len() <= 1000 && l.user_msgs.len() <= 1000 && l.user_bytes.len() <= 1000);
    }

    #[test]
    fn message_limiter_refuses_over_rate_and_flags_abuse() {
        let mut c = config();
        c.limits.messages_per_second = 1;
        c.limits.messages_burst = 5;
        c.limits.max_rate_violations = 3;
        let l = Arc::new(Limits::new(&c));
        let mut m = l.message_limiter(None);
        for _ in 0..5 {
            m.check(100).expect("within burst");
        }
        for _ in 0..2 {
            assert_eq!(m.check(100), Err(RateLimited));
        }
        assert!(!m.abusive());
        assert_eq!(m.check(100), Err(RateLimited));
        assert!(m.abusive());
        // Bytes: one message larger than the byte burst is refused.
        let mut m = l.message_limiter(None);
        assert_eq!(m.check(c.limits.bytes_burst as usize + 1), Err(RateLimited));
        assert!(m.check(10).is_ok(), "a success resets the streak");
        assert!(!m.abusive());
    }

    #[test]
    fn connections_of_one_user_share_the_budget() {
        let mut c = config();
        c.limits.messages_per_second = 1;
        c.limits.messages_burst = 4;
        let l = Arc::new(Limits::new(&c));
        let mut tab1 = l.message_limiter(Some("ann"));
        let mut tab2 = l.message_limiter(Some("ann"));
        let mut other = l.message_limiter(Some("bob"));
        for _ in 0..2 {
            tab1.check(1).expect("ann budget");
            tab2.check(1).expect("ann budget");
        }
        assert_eq!(tab1.check(1), Err(RateLimited));
        assert_eq!(tab2.check(1), Err(RateLimited));
        assert!(other.check(1).is_ok(), "bob has his own budget");
    }
}
