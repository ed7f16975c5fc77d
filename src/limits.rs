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
//!
//! Its parts, each using only the ones listed before it: `keyed` (quotas, the per-IP key, key-bounded limiters),
//! `client_addr` (trusted proxies and forwarding headers), `origin` (the `Origin` allow-list), `admission`
//! (connection slots and per-address counts: [`ConnSlot`], [`IpGuard`]) and `messages` ([`MessageLimiter`]). This
//! file ties them together in [`Limits`]; the parts never use it.

mod admission;
mod client_addr;
mod keyed;
mod messages;
mod origin;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use hyper::http::HeaderMap;

use crate::Config;
use admission::Admission;
pub use admission::{ConnSlot, IpGuard, Rejection, Shed};
pub use client_addr::ForwardedError;
use client_addr::TrustedProxies;
pub(crate) use keyed::{BoundedKeyed, ip_key, quota};
use messages::MessageRates;
pub use messages::{MessageLimiter, RateLimited};
use origin::Origins;

/// Shared DoS-protection state. Built once from the config; every map in it is bounded (see the module doc).
pub struct Limits {
    /// `server.trusted_proxies` and `server.forwarded_header`.
    proxies: TrustedProxies,
    /// Parsed `server.allowed_origins`; empty = allow all.
    origins: Origins,
    /// The global connection cap and the per-IP connection rate and counts.
    admission: Admission,
    /// Message and byte quotas, and the per-user budgets; shared with every [`MessageLimiter`].
    messages: Arc<MessageRates>,
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
        Self {
            proxies: TrustedProxies::new(config),
            origins: Origins::new(&config.server.allowed_origins),
            admission: Admission::new(config),
            messages: Arc::new(MessageRates::new(config)),
        }
    }

    /// Admits a new TCP connection at accept, before any TLS work: its per-address count and rate (see
    /// [`Limits::admit_peer`]), then a global permit, or a place in the small pool of over-capacity answers.
    pub fn admit_connection(&self, peer: IpAddr) -> Result<ConnSlot, Shed> {
        let address = self.admit_peer(peer).map_err(Shed::Address)?;
        self.admission.slot(address)
    }

    /// Whether `ip` is in `server.trusted_proxies`.
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.proxies.trusted(ip)
    }

    /// The client's IP: the peer address, unless the peer is in `server.trusted_proxies`; then the right-most entry
    /// of `server.forwarded_header` (all lines, in order) that is not itself a trusted proxy, or the left-most entry
    /// when every hop is trusted. Only that header is read. A trusted peer that sends no such header is its own
    /// client (a health check from the proxy). A header that is not ASCII, empty, or whose deciding entry is not an
    /// address (garbage, `unknown`, `_hidden`) is an error: the caller answers 400.
    pub fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> Result<IpAddr, ForwardedError> {
        self.proxies.client_ip(peer, headers)
    }

    /// Whether the request's `Origin` is allowed by `server.allowed_origins`. An empty list allows everything;
    /// otherwise a request without `Origin` is refused. Rules: exact origins (`https://app.example.com`,
    /// case-insensitive), `*.example.com` (any scheme) and `https://*.example.com`. A wildcard needs at least one
    /// label (`example.com` itself does not match `*.example.com`) and matches the port only if it names one.
    pub fn origin_allowed(&self, headers: &HeaderMap) -> bool {
        self.origins.allowed(headers)
    }

    /// Admits a new connection from `ip` (before the upgrade): charges the IP's new-connection rate, then takes
    /// one of its `limits.max_connections_per_ip` slots. The returned guard releases the slot on drop; keep it for
    /// the connection's lifetime.
    pub fn admit(&self, ip: IpAddr) -> Result<IpGuard, Rejection> {
        self.admission.admit(ip)
    }

    /// Charges one request that costs what an upgrade costs (a token check: `/client/check`) to `ip`'s connection
    /// rate (`limits.connections_per_second_per_ip`), as every request, not only a connection's first.
    pub fn charge_check(&self, ip: IpAddr) -> Result<(), Rejection> {
        self.admission.charge_check(ip)
    }

    /// Admits a new TCP connection from `peer` at accept, before any TLS work: like [`Limits::admit`] keyed by the
    /// peer address, except for peers in `server.trusted_proxies`, which get `Ok(None)` (their clients are counted
    /// by forwarded address at the upgrade). The guard is the connection's per-address slot: it moves with the
    /// connection into its WebSocket task and is released, once, when dropped.
    pub fn admit_peer(&self, peer: IpAddr) -> Result<Option<IpGuard>, Rejection> {
        if self.proxies.trusted(peer) {
            return Ok(None);
        }
        self.admission.admit(peer.to_canonical()).map(Some)
    }

    /// Addresses with at least one open connection counted against them.
    pub fn open_addresses(&self) -> usize {
        self.admission.open_addresses()
    }

    /// Keys held by the keyed limiters plus the per-IP connection map (tests assert this stays bounded).
    pub fn tracked_keys(&self) -> usize {
        self.admission.tracked_keys() + self.messages.tracked_keys()
    }

    /// A limiter for one connection: `limits.messages_per_second`/`bytes_per_second` (with bursts) for the
    /// connection itself and, if `user` is set, the same quotas for the user across all its connections.
    pub fn message_limiter(self: &Arc<Self>, user: Option<&str>) -> MessageLimiter {
        self.messages.limiter(user)
    }
}

/// Test-only helpers shared by the unit tests of `limits` and its parts.
#[cfg(test)]
mod testkit {
    use std::net::IpAddr;

    use hyper::http::HeaderMap;

    use crate::Config;

    pub(super) fn config() -> Config {
        let mut c = Config::default();
        c.server.trusted_proxies = vec!["10.0.0.0/8".parse().expect("net"), "::1/128".parse().expect("net")];
        c.server.allowed_origins = vec![
            "https://app.example.com".into(),
            "*.example.org".into(),
            "https://*.example.net".into(),
        ];
        c
    }

    pub(super) fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().expect("header value"));
        }
        h
    }

    pub(super) fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testkit::*;

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
        assert!(
            l.admission.conn_rate.len() <= 1000
                && l.messages.user_msgs.len() <= 1000
                && l.messages.user_bytes.len() <= 1000
        );
    }
}
