//! Message rates: each connection's [`MessageLimiter`] (`limits.messages_per_second`/`bytes_per_second`, with
//! bursts) also charges its user's budget, shared by all of the user's connections ([`MessageRates`]); a refusal is
//! [`RateLimited`], and `limits.max_rate_violations` refusals in a row mark the connection abusive. Uses
//! [`super::keyed`].

use std::{num::NonZeroU32, sync::Arc};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::keyed::{BoundedKeyed, quota};
use crate::Config;

/// A message was refused by a rate limit (the client gets a `rate_limited` error frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limited")]
pub struct RateLimited;

/// The quotas of every connection and the budgets shared by each user's connections. Built once from the config;
/// each user store holds ≤ `limits.max_tracked_keys` keys (see [`MessageRates::limiter`]).
pub(super) struct MessageRates {
    /// Messages per user, shared by the user's connections. ≤ `limits.max_tracked_keys` keys.
    pub(super) user_msgs: BoundedKeyed<Arc<str>>,
    /// Bytes per user, shared by the user's connections. ≤ `limits.max_tracked_keys` keys.
    pub(super) user_bytes: BoundedKeyed<Arc<str>>,
    msg_quota: Quota,
    byte_quota: Quota,
    max_violations: u32,
}

impl MessageRates {
    pub(super) fn new(config: &Config) -> Self {
        let l = &config.limits;
        let msg_quota = quota(l.messages_per_second, l.messages_burst);
        let byte_quota = quota(l.bytes_per_second, l.bytes_burst);
        Self {
            user_msgs: BoundedKeyed::new(msg_quota, l.max_tracked_keys),
            user_bytes: BoundedKeyed::new(byte_quota, l.max_tracked_keys),
            msg_quota,
            byte_quota,
            max_violations: l.max_rate_violations,
        }
    }

    /// A limiter for one connection, charging `user`'s budget too if set.
    pub(super) fn limiter(self: &Arc<Self>, user: Option<&str>) -> MessageLimiter {
        if user.is_some() {
            // A new connection is where a new user key appears, so the user stores are bounded here (not on the
            // per-message path). A store cleared by the last resort refills with the keys of connected users only,
            // so it can exceed `max_tracked_keys` only if more distinct users than that are connected at once
            // (itself bounded by `server.max_connections`).
            self.user_msgs.prune(1);
            self.user_bytes.prune(1);
        }
        MessageLimiter {
            rates: Arc::clone(self),
            user: user.map(Arc::from),
            msgs: RateLimiter::direct(self.msg_quota),
            bytes: RateLimiter::direct(self.byte_quota),
            violations: 0,
        }
    }

    /// Keys held by the user stores.
    pub(super) fn tracked_keys(&self) -> usize {
        self.user_msgs.len() + self.user_bytes.len()
    }
}

/// Rate limits of one connection (message count and bytes), also charging its user's shared budget. Owned by the
/// connection's task.
pub struct MessageLimiter {
    /// The user budgets and `limits.max_rate_violations`, shared with every connection's limiter.
    rates: Arc<MessageRates>,
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
                .is_none_or(|u| self.rates.user_msgs.check(u, 1) && self.rates.user_bytes.check(u, n));
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
        self.violations >= self.rates.max_violations
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::limits::{Limits, RateLimited, testkit::*};

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
