//! Building blocks of the rate limits: [`quota`] (a rate and its burst, never zero), [`ip_key`] (the key an
//! address is counted under: IPv4 as is, IPv6 by its /64) and [`BoundedKeyed`], a keyed rate limiter whose number of
//! keys stays bounded. A leaf: used by the other parts of `limits` and by `room_quota`.

use std::{
    net::{IpAddr, Ipv6Addr},
    num::NonZeroU32,
};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use parking_lot::RwLock;

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
