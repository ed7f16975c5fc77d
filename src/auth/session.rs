//! Per-connection authentication state: a [`Session`] knows when an authenticated connection must end whatever
//! `refresh`es arrive (`auth.max_session` from its start), holds its `refresh` budget (`limits.refreshes_per_minute`)
//! and gives the deadline at which it closes with 4001. Uses [`super::identity`].

use std::{
    num::NonZeroU32,
    time::{Duration, SystemTime},
};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

use super::identity::Identity;
use crate::config::Config;

/// Per-connection authentication state: when an authenticated session ends whatever refreshes arrive
/// (`auth.max_session` from its start), and the connection's `refresh` budget (`limits.refreshes_per_minute`).
pub struct Session {
    /// `None` for anonymous connections, which have no token to outlive.
    ends_at: Option<Instant>,
    refreshes: DefaultDirectRateLimiter,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("ends_at", &self.ends_at).finish()
    }
}

impl Session {
    /// A session starting at `start`, for `identity`.
    pub fn new(config: &Config, identity: &Identity, start: Instant) -> Self {
        let per_minute = NonZeroU32::new(config.limits.refreshes_per_minute).unwrap_or(NonZeroU32::MIN);
        Self {
            ends_at: identity
                .user
                .as_ref()
                // Validation caps max_session at a year, so this does not overflow; saturate anyway.
                .map(|_| {
                    start
                        .checked_add(config.auth.max_session)
                        .unwrap_or_else(|| far_instant(start))
                }),
            refreshes: RateLimiter::direct(Quota::per_minute(per_minute)),
        }
    }

    /// Charges one `refresh`; false when over `limits.refreshes_per_minute`.
    pub fn try_refresh(&self) -> bool {
        self.refreshes.check().is_ok()
    }

    /// When the connection must close with 4001: the earlier of the token's expiry (`exp` + leeway) and the end of
    /// the session. `None` for a connection without a token. Never panics, whatever `exp` says: a deadline
    /// beyond what `Instant` can hold is the session's end.
    pub fn expiry(&self, identity: &Identity, now: Instant) -> Option<Instant> {
        let token = identity
            .expires_in(SystemTime::now())
            .map(|left| now.checked_add(left).unwrap_or_else(|| far_instant(now)));
        match (token, self.ends_at) {
            (Some(t), Some(s)) => Some(t.min(s)),
            (t, s) => t.or(s),
        }
    }
}

/// An instant about a year after `now`, or `now` itself if even that does not fit (never panics).
fn far_instant(now: Instant) -> Instant {
    now.checked_add(Duration::from_secs(365 * 86_400)).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::auth::{AuthError, testkit::*};
    use crate::config::Permissions;

    #[test]
    fn absurd_times_never_panic() {
        let (_f, auth) = hs_auth(|_| {});
        let mut config = Config::default();
        config.auth.max_session = Duration::from_secs(3600);
        let start = Instant::now();
        // Far-future exp: accepted, and the connection's deadline is the end of its session.
        for exp in [json!(1e19), json!(u64::MAX), json!(1.8e19)] {
            let t = hs(&json!({ "sub": "a", "exp": exp }));
            match auth.verify(&t) {
                Ok(id) => {
                    assert!(id.expires_in(SystemTime::now()).expect("has exp") > Duration::from_secs(86_400 * 365));
                    let session = Session::new(&config, &id, start);
                    assert_eq!(
                        session.expiry(&id, Instant::now()),
                        Some(start + Duration::from_secs(3600))
                    );
                }
                Err(e) => assert!(matches!(e, AuthError::Malformed), "{exp}: {e:?}"),
            }
        }
        // Negative, fractional, huge nbf/iat.
        let cases = [
            (json!({ "sub": "a", "exp": -1 }), "malformed"),
            (json!({ "sub": "a", "exp": -1e19 }), "malformed"),
            (json!({ "sub": "a", "exp": f64::MAX }), "malformed"),
            (json!({ "sub": "a", "exp": "soon" }), "malformed"),
            (json!({ "sub": "a", "exp": (now() + 60) as f64 + 0.5 }), "ok"),
            (json!({ "sub": "a", "exp": now() + 60, "nbf": 1e19 }), "nbf"),
            (json!({ "sub": "a", "exp": now() + 60, "nbf": -5 }), "malformed"),
            (json!({ "sub": "a", "exp": now() + 60, "nbf": 0.5 }), "ok"),
            (json!({ "sub": "a", "exp": now() + 60, "iat": 1e19 }), "ok"),
            (json!({ "sub": "a", "exp": now() + 60, "iat": -1e300 }), "ok"),
        ];
        for (c, want) in cases {
            let got = match auth.verify(&hs(&c)) {
                Ok(_) => "ok",
                // An `exp` jsonwebtoken cannot read as a u64 counts as absent.
                Err(AuthError::Malformed | AuthError::MissingClaim("exp")) => "malformed",
                Err(AuthError::NotYetValid) => "nbf",
                Err(e) => panic!("{c}: {e:?}"),
            };
            assert_eq!(got, want, "{c}");
        }
        // Identity arithmetic saturates on its own.
        let id = Identity {
            expires_at: Some(u64::MAX),
            grace: Duration::from_secs(u64::MAX),
            ..Identity::anonymous(&Permissions::default())
        };
        assert_eq!(id.expires_in(SystemTime::UNIX_EPOCH), Some(Duration::MAX));
        assert!(Session::new(&config, &id, start).expiry(&id, Instant::now()).is_some());
    }

    #[test]
    fn refresh_budget_and_session_end() {
        let mut config = Config::default();
        config.limits.refreshes_per_minute = 2;
        config.auth.max_session = Duration::from_secs(60);
        let start = Instant::now();
        let anon = Identity::anonymous(&Permissions::default());
        let s = Session::new(&config, &anon, start);
        assert_eq!(
            s.expiry(&anon, start),
            None,
            "anonymous connections have no token deadline"
        );
        let (_f, auth) = hs_auth(|_| {});
        let id = auth
            .verify(&hs(&json!({ "sub": "a", "exp": now() + 7200 })))
            .expect("valid");
        let s = Session::new(&config, &id, start);
        assert!(s.try_refresh() && s.try_refresh() && !s.try_refresh());
        // A token valid for two hours still ends with the one-minute session.
        assert_eq!(s.expiry(&id, start), Some(start + Duration::from_secs(60)));
        let id = auth
            .verify(&hs(&json!({ "sub": "a", "exp": now() + 10 })))
            .expect("valid");
        let left = s.expiry(&id, start).expect("deadline") - start;
        assert!(
            left > Duration::from_secs(30) && left <= Duration::from_secs(40),
            "exp + 30 s leeway: {left:?}"
        );
    }
}
