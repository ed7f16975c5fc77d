//! Authentication: turns the token a client presents at the upgrade (bearer header, `?token=` or a cookie) into an
//! [`Identity`] carrying the user and the room patterns it may join and publish to. An [`Authenticator`] is built
//! once at startup from `[auth]` (HMAC secrets, PEM public keys, a JWKS file), shared via `Arc`, and is read-only
//! afterwards. A token is accepted only if its header `alg` equals the configured algorithm of a key (so `alg: none`
//! and RS/HS confusion are refused), its signature verifies, `exp` is in the future and `nbf` in the past (both
//! with `auth.leeway_secs`), and `iss`/`aud` match when configured. Reading the token from the request is
//! [`crate::token`]'s job.
//!
//! Its parts, each using only the ones listed before it: `error` ([`AuthError`], what a refusal is and what the
//! client is told), `identity` ([`Identity`] and the rules on claims), `keys` (loading the keys and the validation
//! rules each carries), `verifier` (the cheap pre-checks and the signature check itself), `session` ([`Session`],
//! the session's end and `refresh` budget). This file ties them together in the [`Authenticator`], which also runs
//! signature checks off the async workers, bounded; the parts never use it.

mod error;
mod identity;
mod keys;
mod session;
#[cfg(test)]
mod testkit;
mod verifier;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::AuthConfig;
pub use error::AuthError;
pub use identity::{Identity, MAX_JTI_LEN, MAX_SUB_LEN, valid_sub};
use keys::load_keys;
pub use session::Session;
use verifier::{Verifier, unverified_sub};
// Kept here so `auth::extract_token` / `auth::redact_uri` (used by `http`) still resolve; new code uses `token::`.
pub use crate::token::{extract_token, redact_uri};

/// Verifies tokens and builds identities. Built once at startup by [`Authenticator::from_config`], read-only
/// afterwards (key rotation = restart).
///
/// Signature checks are the costly part of authentication (an ES256 or RS256 check takes tens to hundreds of
/// microseconds), and a client can make the gateway do them for free by sending bogus tokens. So the async entry
/// points ([`Authenticator::authenticate_bounded`], [`Authenticator::verify_bounded`]) first refuse what cannot
/// succeed (oversized or malformed tokens, no or too many candidate keys, a `sub` other than the connection's), then
/// run the check on tokio's blocking threads behind a global semaphore (`auth.max_concurrent_verifications`), and
/// give up with [`AuthError::Busy`] after waiting `auth.max_verification_wait` for it.
pub struct Authenticator {
    verifier: Arc<Verifier>,
    allow_anonymous: bool,
    /// The identity of every anonymous connection, built once: its pattern lists are shared (`Arc`), so an idle
    /// anonymous connection holds none of its own.
    anonymous: Identity,
    /// Signature checks running at once. Bound: `auth.max_concurrent_verifications`; a permit moves into the
    /// blocking task and is released when the check ends, even if its requester has gone.
    permits: Arc<Semaphore>,
    /// `auth.max_verification_wait`: longest wait for a permit.
    max_wait: Duration,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys are secrets (HMAC) or at least noise: print only their shape.
        let keys: Vec<_> = self.verifier.keys.iter().map(|k| (k.kid.as_deref(), k.alg)).collect();
        f.debug_struct("Authenticator")
            .field("keys", &keys)
            .field("allow_anonymous", &self.allow_anonymous)
            .finish()
    }
}

impl Authenticator {
    /// Loads every key named by `cfg`: HMAC secrets through [`crate::config::SecretSource::load`], PEM public
    /// keys (RS256, ES256, EdDSA) and the JWKS file (every key needs a `kid`; RSA `n`/`e`, EC P-256 `x`/`y`, OKP
    /// Ed25519 `x`; keys marked `"use":"enc"` or without `verify` in `key_ops` are refused). Errors name the config
    /// key and file.
    pub fn from_config(cfg: &AuthConfig) -> Result<Self, AuthError> {
        let keys = load_keys(cfg)?;
        let permits = match cfg.max_concurrent_verifications {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()) * 2,
            n => n,
        };
        Ok(Self {
            verifier: Arc::new(Verifier {
                keys,
                personal_room: cfg.personal_room.clone(),
                rooms_claim: cfg.rooms_claim.clone(),
                publish_claim: cfg.publish_claim.clone(),
                rpc_claim: cfg.rpc_claim.clone(),
                subs_claim: cfg.subs_claim.clone(),
                join_personal_room: cfg.join_personal_room,
                leeway: Duration::from_secs(cfg.leeway_secs),
                max_keys_per_token: cfg.max_keys_per_token,
                verifications: AtomicU64::new(0),
            }),
            allow_anonymous: cfg.allow_anonymous,
            anonymous: Identity::anonymous(&cfg.anonymous),
            permits: Arc::new(Semaphore::new(permits)),
            max_wait: cfg.max_verification_wait,
        })
    }

    /// No token: an anonymous identity (permissions `auth.anonymous`) if `auth.allow_anonymous`, else
    /// [`AuthError::Missing`]. A token is always verified, even when anonymous access is allowed.
    ///
    /// Synchronous: the signature check runs on the calling thread. Connections use
    /// [`Authenticator::authenticate_bounded`].
    pub fn authenticate(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        match token {
            Some(t) => self.verify(t),
            None if self.allow_anonymous => Ok(self.anonymous.clone()),
            None => Err(AuthError::Missing),
        }
    }

    /// [`Authenticator::authenticate`] with the signature check off the async workers and bounded (see
    /// [`Authenticator::verify_bounded`]).
    pub async fn authenticate_bounded(
        &self,
        token: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<Identity, AuthError> {
        match token {
            Some(t) => self.verify_bounded(t, None, cancel).await,
            None if self.allow_anonymous => Ok(self.anonymous.clone()),
            None => Err(AuthError::Missing),
        }
    }

    /// Verifies a JWT and builds the user's identity from its claims, on the calling thread.
    ///
    /// Candidate keys are those whose configured algorithm equals the header's `alg`; if the header has a `kid`,
    /// only keys with that `kid` or without any `kid` are candidates; more than `auth.max_keys_per_token`
    /// candidates is [`AuthError::UnknownKey`] before any check. The first candidate whose signature verifies
    /// decides (claim errors such as `Expired` are reported from it).
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let candidates = self.verifier.candidates(token)?;
        self.verifier.check(token, &candidates)
    }

    /// Like [`Authenticator::verify`], for a connection: refuses what cannot succeed before any signature check
    /// (a token over 16 KiB or malformed, no or too many candidate keys, and, when `expected_sub` is given, a token
    /// whose unverified `sub` differs: [`AuthError::WrongUser`]); then waits at most `auth.max_verification_wait`
    /// for one of the `auth.max_concurrent_verifications` slots ([`AuthError::Busy`] if none frees) and runs the
    /// check on a blocking thread. Both waits also watch `cancel` ([`AuthError::Cancelled`]); a check already
    /// running then finishes on its own, still holding its slot, so the bound stays true.
    pub async fn verify_bounded(
        &self,
        token: &str,
        expected_sub: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<Identity, AuthError> {
        let candidates = self.verifier.candidates(token)?;
        if let Some(want) = expected_sub
            && unverified_sub(token).as_deref() != Some(want)
        {
            return Err(AuthError::WrongUser);
        }
        let permit = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(AuthError::Cancelled),
            p = tokio::time::timeout(self.max_wait, self.permits.clone().acquire_owned()) => match p {
                Ok(Ok(permit)) => permit,
                // Timed out (or the semaphore closed, which never happens): the checks are saturated.
                _ => return Err(AuthError::Busy),
            },
        };
        let verifier = self.verifier.clone();
        let token = token.to_owned();
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            verifier.check(&token, &candidates)
        });
        tokio::select! {
            biased;
            _ = cancel.cancelled() => Err(AuthError::Cancelled),
            r = task => r.unwrap_or_else(|e| {
                // A panic inside the JWT library, or the runtime shutting down: the token is not accepted.
                tracing::warn!(error = %e, "token verification task failed");
                Err(AuthError::Malformed)
            }),
        }
    }

    /// Signature checks performed so far (one per candidate key tried). Cheap refusals do not count.
    pub fn verifications(&self) -> u64 {
        self.verifier.verifications.load(Ordering::Relaxed)
    }

    /// Slots for signature checks not in use right now (`auth.max_concurrent_verifications` when idle).
    pub fn available_verification_slots(&self) -> usize {
        self.permits.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{Algorithm, EncodingKey};

    use super::*;
    use crate::config::Permissions;
    use testkit::*;
    use verifier::MAX_TOKEN_LEN;

    #[test]
    fn anonymous_only_when_allowed_and_tokens_still_verified() {
        let mut f = Fixture::new();
        f.add_hs("HS256", None, "s");
        assert!(matches!(f.auth().authenticate(None), Err(AuthError::Missing)));
        f.cfg.allow_anonymous = true;
        f.cfg.anonymous = Permissions {
            join: vec!["public-*".into()],
            publish: vec![],
            rpc: vec![],
        };
        let auth = f.auth();
        let id = auth.authenticate(None).expect("anonymous");
        assert!(id.user.is_none() && id.may_join("public-1") && !id.may_publish("public-1"));
        // The text the client gets comes from the refusal itself (not a variant built by the test).
        let refused = auth.authenticate(Some("garbage")).err();
        assert!(matches!(refused, Some(AuthError::Malformed)));
        assert_eq!(refused.map(|e| e.reason()), Some("malformed token"));
    }

    #[tokio::test]
    async fn bounded_verification_refuses_early_and_gives_up_when_saturated() {
        let (_f, auth) = hs_auth(|c| {
            c.max_concurrent_verifications = 1;
            c.max_verification_wait = Duration::from_millis(50);
        });
        let cancel = CancellationToken::new();
        let alice = hs(&claims("alice"));
        // Off the worker, and the identity comes back.
        let id = auth
            .verify_bounded(&alice, Some("alice"), &cancel)
            .await
            .expect("valid");
        assert_eq!(id.user.as_deref(), Some("alice"));
        assert_eq!(auth.verifications(), 1);
        // Another user's token, even a correctly signed one, and malformed or oversized tokens: no check at all.
        let bob = hs(&claims("bob"));
        assert!(matches!(
            auth.verify_bounded(&bob, Some("alice"), &cancel).await,
            Err(AuthError::WrongUser)
        ));
        let forged = sign(Algorithm::HS256, None, &claims("bob"), &EncodingKey::from_secret(b"x"));
        assert!(matches!(
            auth.verify_bounded(&forged, Some("alice"), &cancel).await,
            Err(AuthError::WrongUser)
        ));
        let huge = format!("{alice}{}", "A".repeat(MAX_TOKEN_LEN));
        assert!(matches!(
            auth.verify_bounded(&huge, None, &cancel).await,
            Err(AuthError::Malformed)
        ));
        assert!(matches!(
            auth.verify_bounded("a.b", None, &cancel).await,
            Err(AuthError::Malformed)
        ));
        assert_eq!(auth.verifications(), 1);
        // Every slot taken: the check gives up after max_verification_wait instead of queueing.
        let held = auth.permits.clone().acquire_owned().await.expect("permit");
        assert_eq!(auth.available_verification_slots(), 0);
        assert!(matches!(
            auth.verify_bounded(&alice, None, &cancel).await,
            Err(AuthError::Busy)
        ));
        // The wait watches cancellation.
        let cancelled = CancellationToken::new();
        cancelled.cancel();
        assert!(matches!(
            auth.verify_bounded(&alice, None, &cancelled).await,
            Err(AuthError::Cancelled)
        ));
        drop(held);
        assert!(auth.authenticate_bounded(Some(&alice), &cancel).await.is_ok());
        assert_eq!(auth.verifications(), 2);
        assert_eq!(auth.available_verification_slots(), 1);
    }
}
