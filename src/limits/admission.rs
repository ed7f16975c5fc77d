//! Admission of new connections: the global cap (`server.max_connections`, with a small pool of over-capacity
//! answers), the per-address rate of new connections and cap on open ones ([`Admission::admit`] returns an
//! [`IpGuard`] that releases the slot on drop), and the [`ConnSlot`] a connection owns from accept to close. Why a
//! connection was refused: [`Rejection`] (HTTP 429 at the upgrade) and [`Shed`] (closed at accept). Uses
//! [`super::keyed`].

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::keyed::{BoundedKeyed, ip_key, quota};
use crate::Config;

/// Why a new connection was refused: shed at accept for a direct client ([`Limits::admit_peer`](super::Limits::admit_peer)), answered with
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

/// Open connections per IP key; an entry exists only while its count is > 0.
type ConnCounts = Arc<Mutex<HashMap<IpAddr, usize>>>;

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

/// The connection counts: global, and per address (rate of new connections, open connections). Bounded:
/// `conn_rate` by `limits.max_tracked_keys` keys, `conns` by the number of open connections.
pub(super) struct Admission {
    /// New connections per IP key. ≤ `limits.max_tracked_keys` keys.
    pub(super) conn_rate: BoundedKeyed<IpAddr>,
    /// Open connections per IP key: one entry per key with ≥ 1 open connection, removed at 0.
    pub(super) conns: ConnCounts,
    max_per_ip: usize,
    /// Global connection cap (`server.max_connections`); a permit lives as long as its connection's task.
    conn_permits: Arc<Semaphore>,
    /// Small pool for answering connections over the cap, so rejecting cannot itself exhaust memory.
    reject_permits: Arc<Semaphore>,
}

impl Admission {
    pub(super) fn new(config: &Config) -> Self {
        let l = &config.limits;
        Self {
            conn_rate: BoundedKeyed::new(
                quota(l.connections_per_second_per_ip, l.connections_burst_per_ip),
                l.max_tracked_keys,
            ),
            conns: Arc::default(),
            max_per_ip: l.max_connections_per_ip,
            conn_permits: Arc::new(Semaphore::new(config.server.max_connections)),
            reject_permits: Arc::new(Semaphore::new(REJECT_POOL)),
        }
    }

    /// The [`ConnSlot`] of a connection whose address was admitted (`None`: a trusted proxy's, counted at the
    /// upgrade): a global permit, or a place in the small pool of over-capacity answers.
    pub(super) fn slot(&self, address: Option<IpGuard>) -> Result<ConnSlot, Shed> {
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

    /// Charges `ip`'s new-connection rate, then takes one of its slots: see [`Limits::admit`](super::Limits::admit).
    pub(super) fn admit(&self, ip: IpAddr) -> Result<IpGuard, Rejection> {
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

    /// Charges one token-checking request to `ip`'s connection rate: see
    /// [`Limits::charge_check`](super::Limits::charge_check).
    pub(super) fn charge_check(&self, ip: IpAddr) -> Result<(), Rejection> {
        let allowed = self.conn_rate.check(&ip_key(ip), 1);
        self.conn_rate.prune(0);
        if allowed {
            Ok(())
        } else {
            Err(Rejection::ConnectionRate)
        }
    }

    /// Addresses with at least one open connection counted against them.
    pub(super) fn open_addresses(&self) -> usize {
        self.conns.lock().len()
    }

    /// Keys held by the connection-rate limiter plus the per-IP connection map.
    pub(super) fn tracked_keys(&self) -> usize {
        self.conn_rate.len() + self.conns.lock().len()
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

#[cfg(test)]
mod tests {
    use crate::limits::{Limits, Rejection, testkit::*};

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
        assert!(l.admission.conns.lock().is_empty(), "entries removed at 0");
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
}
