//! Authentication: turns the token a client presents at the upgrade (bearer header, `?token=` or a cookie) into an
//! [`Identity`] carrying the user and the room patterns it may join and publish to. An [`Authenticator`] is built
//! once at startup from `[auth]` (HMAC secrets, PEM public keys, a JWKS file), shared via `Arc`, and is read-only
//! afterwards. A token is accepted only if its header `alg` equals the configured algorithm of a key (so `alg: none`
//! and RS/HS confusion are refused), its signature verifies, `exp` is in the future and `nbf` in the past (both
//! with `auth.leeway_secs`), and `iss`/`aud` match when configured. Reading the token from the request is
//! [`crate::token`]'s job.

use std::{
    num::NonZeroU32,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use jsonwebtoken::{
    Algorithm, AlgorithmFamily, DecodingKey, Validation,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyOperations, PublicKeyUse},
};
use serde_json::Value;
use tokio::{sync::Semaphore, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::config::{AuthConfig, Config, ConfigError, KeyMaterial, Permissions, SUPPORTED_ALGORITHMS};
use crate::protocol;
use crate::room_pattern::RoomPattern;
// Kept here so `auth::extract_token` / `auth::redact_uri` (used by `http`) still resolve; new code uses `token::`.
pub use crate::token::{extract_token, redact_uri};

/// Longest token accepted, in bytes; longer ones are `Malformed` before any parsing or crypto.
const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Why a token (or its absence) was refused, or why the `[auth]` section could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token and anonymous access is disabled.
    #[error("no token presented")]
    Missing,
    /// Not a JWT (shape, base64, JSON, unknown `alg` such as `none`) or a claim has the wrong type.
    #[error("malformed token")]
    Malformed,
    /// A required claim (`exp`, `sub`, and `iss`/`aud` when configured) is absent.
    #[error("token lacks the `{0}` claim")]
    MissingClaim(&'static str),
    /// `exp` (plus leeway) is in the past.
    #[error("token expired")]
    Expired,
    /// `nbf` (minus leeway) is in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// No candidate key verified the signature.
    #[error("bad token signature")]
    BadSignature,
    /// No configured key has the token's `alg` (and `kid`, if the token names one).
    #[error("no key for this token's alg/kid")]
    UnknownKey,
    /// `iss` differs from `auth.issuer`.
    #[error("wrong token issuer")]
    WrongIssuer,
    /// `aud` is not one of `auth.audience`.
    #[error("wrong token audience")]
    WrongAudience,
    /// A claim that would reach a header, a log line or a room name is not acceptable (see [`valid_sub`]).
    #[error("token claim `{0}` is not acceptable")]
    InvalidClaim(&'static str),
    /// A `refresh` token whose `sub` is not the connection's user (read before any signature check).
    #[error("token is for another user")]
    WrongUser,
    /// No signature-check slot freed within `auth.max_verification_wait`.
    #[error("token checks saturated")]
    Busy,
    /// The connection (or the gateway) ended while the check waited.
    #[error("cancelled")]
    Cancelled,
    /// The `[auth]` section could not be turned into keys (startup only).
    #[error("invalid `{key}`: {message}")]
    Config {
        /// Config key or file at fault, e.g. `auth.keys.public_key_file`.
        key: String,
        /// What is wrong (names the file where there is one).
        message: String,
    },
}

impl AuthError {
    /// Short public text for the 401 body or the error frame. Never contains token material.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "token required",
            AuthError::Malformed => "malformed token",
            AuthError::MissingClaim(_) => "token lacks a required claim",
            AuthError::Expired => "token expired",
            AuthError::NotYetValid => "token not yet valid",
            AuthError::BadSignature => "invalid token signature",
            AuthError::UnknownKey => "unknown token key",
            AuthError::WrongIssuer => "wrong token issuer",
            AuthError::WrongAudience => "wrong token audience",
            AuthError::InvalidClaim(_) => "token `sub` not acceptable",
            AuthError::WrongUser => "token is for another user",
            AuthError::Busy => "authentication busy; try again",
            AuthError::Cancelled => "cancelled",
            AuthError::Config { .. } => "authentication misconfigured",
        }
    }

    fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        AuthError::Config {
            key: key.into(),
            message: message.into(),
        }
    }
}

fn map_jwt_error(e: &jsonwebtoken::errors::Error) -> AuthError {
    match e.kind() {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidAlgorithm => AuthError::UnknownKey,
        ErrorKind::MissingRequiredClaim(c) => match c.as_str() {
            "exp" => AuthError::MissingClaim("exp"),
            "iss" => AuthError::MissingClaim("iss"),
            "aud" => AuthError::MissingClaim("aud"),
            "sub" => AuthError::MissingClaim("sub"),
            _ => AuthError::Malformed,
        },
        ErrorKind::InvalidToken
        | ErrorKind::InvalidClaimFormat(_)
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => AuthError::Malformed,
        // Key-format problems surfacing at verification: the token is not accepted.
        _ => AuthError::BadSignature,
    }
}

/// One verification key: its algorithm is fixed by configuration, never taken from the token.
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
    /// Validation for this key's algorithm with the configured leeway, issuer and audience.
    validation: Validation,
}

/// The keys and claim rules: everything a signature check needs, shared with the blocking threads that run them.
struct Verifier {
    /// All keys from `auth.keys` then the JWKS file, in that order.
    keys: Vec<Key>,
    personal_room: Option<String>,
    rooms_claim: String,
    publish_claim: String,
    /// `auth.leeway_secs`: a token is accepted, and its connection lives, until `exp` plus this.
    leeway: Duration,
    /// `auth.max_keys_per_token`: most candidate keys (signature checks) one token may cost.
    max_keys_per_token: usize,
    /// Signature checks performed (one per candidate key tried); read by tests and operators.
    verifications: AtomicU64,
}

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
    anonymous: Permissions,
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
        let mut keys = Vec::new();
        for k in &cfg.keys {
            // A supported algorithm with the secret or public key file it needs: the rule validation applies.
            let material = k.material().map_err(|e| match e {
                ConfigError::Invalid { key, message } => AuthError::config(key, message),
                other => AuthError::config("auth.keys", other.to_string()),
            })?;
            let alg = k.algorithm;
            let key = match material {
                KeyMaterial::Secret(src) => {
                    let secret = src
                        .load("auth.keys.secret")
                        .map_err(|e| AuthError::config("auth.keys.secret", e.to_string()))?;
                    if secret.expose().is_empty() {
                        return Err(AuthError::config("auth.keys.secret", "secret is empty"));
                    }
                    DecodingKey::from_secret(secret.expose().as_bytes())
                }
                KeyMaterial::PublicKeyFile(path) => load_pem(alg, path)?,
            };
            keys.push(Key {
                kid: k.kid.clone(),
                alg,
                key,
                validation: validation(cfg, alg),
            });
        }
        if let Some(path) = &cfg.jwks_file {
            keys.extend(load_jwks(cfg, path)?);
        }
        // Keys without `kid` are candidates for every token of their algorithm: more of them than a token may cost
        // would refuse every such token, so say it now rather than at the first connection.
        for k in &keys {
            let kidless = keys.iter().filter(|o| o.alg == k.alg && o.kid.is_none()).count();
            if kidless > cfg.max_keys_per_token {
                return Err(AuthError::config(
                    "auth.keys",
                    format!(
                        "{kidless} {:?} keys have no `kid`, more than auth.max_keys_per_token ({}): give them a `kid`",
                        k.alg, cfg.max_keys_per_token
                    ),
                ));
            }
        }
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
                leeway: Duration::from_secs(cfg.leeway_secs),
                max_keys_per_token: cfg.max_keys_per_token,
                verifications: AtomicU64::new(0),
            }),
            allow_anonymous: cfg.allow_anonymous,
            anonymous: cfg.anonymous.clone(),
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
            None if self.allow_anonymous => Ok(Identity::anonymous(&self.anonymous)),
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
            None if self.allow_anonymous => Ok(Identity::anonymous(&self.anonymous)),
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

impl Verifier {
    /// The cheap part: size, header, and the indices of the keys a signature check would try.
    fn candidates(&self, token: &str) -> Result<Vec<usize>, AuthError> {
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let candidates: Vec<usize> = self
            .keys
            .iter()
            .enumerate()
            .filter(|(_, k)| {
                k.alg == header.alg
                    && match (&header.kid, &k.kid) {
                        (Some(want), Some(have)) => want == have,
                        _ => true,
                    }
            })
            .map(|(i, _)| i)
            .collect();
        if candidates.is_empty() || candidates.len() > self.max_keys_per_token {
            // Too many: the token must name its key with `kid` (one bogus token must not cost N checks).
            return Err(AuthError::UnknownKey);
        }
        Ok(candidates)
    }

    /// The costly part: tries each candidate key, then builds the identity.
    fn check(&self, token: &str, candidates: &[usize]) -> Result<Identity, AuthError> {
        let mut data = None;
        for k in candidates.iter().filter_map(|&i| self.keys.get(i)) {
            self.verifications.fetch_add(1, Ordering::Relaxed);
            match jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &k.key, &k.validation) {
                Ok(d) => {
                    data = Some(d);
                    break;
                }
                // Signature or key-format failure: another candidate may still verify. Claim errors come only after
                // a verified signature, so they are final.
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::InvalidSignature
                            | ErrorKind::InvalidEcdsaKey
                            | ErrorKind::InvalidEddsaKey
                            | ErrorKind::InvalidRsaKey(_)
                            | ErrorKind::InvalidKeyFormat
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(map_jwt_error(&e)),
            }
        }
        let data = data.ok_or(AuthError::BadSignature)?;
        self.identity_from_claims(&data.claims, SystemTime::now())
    }

    fn identity_from_claims(
        &self,
        claims: &serde_json::Map<String, Value>,
        now: SystemTime,
    ) -> Result<Identity, AuthError> {
        let sub = match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(_) => return Err(AuthError::Malformed),
            None => return Err(AuthError::MissingClaim("sub")),
        };
        // `sub` becomes the NATS header `Roomwire-User` (a CR or LF there panics async-nats), a log field and maybe
        // a room name: only visible ASCII, bounded.
        if !valid_sub(&sub) {
            return Err(AuthError::InvalidClaim("sub"));
        }
        let personal = self.personal_room.as_ref().map(|t| t.replace("{sub}", &sub));
        if personal.as_deref().is_some_and(|room| !protocol::valid_room(room)) {
            return Err(AuthError::InvalidClaim("sub"));
        }
        // jsonwebtoken has already refused a negative, non-numeric or past `exp`; a fractional one is rounded.
        let expires_at = match claims.get("exp") {
            Some(v) => v.as_u64().or_else(|| v.as_f64().map(|f| f.round() as u64)),
            None => None,
        };
        let join = pattern_list(claims.get(&self.rooms_claim))?.unwrap_or_default();
        let publish = pattern_list(claims.get(&self.publish_claim))?.unwrap_or_else(|| join.clone());
        let identity = Identity {
            user: Some(sub),
            expires_at,
            grace: self.leeway,
            join,
            publish,
            personal,
        };
        // jsonwebtoken compares whole seconds; decide with the same instant the connection's deadline will use, so
        // an accepted token never gives a connection that is closed at once.
        if identity.expires_in(now).is_some_and(|left| left.is_zero()) {
            return Err(AuthError::Expired);
        }
        Ok(identity)
    }
}

/// Longest `sub` accepted, in bytes.
pub const MAX_SUB_LEN: usize = 128;

/// Whether a `sub` claim is acceptable: 1 to [`MAX_SUB_LEN`] bytes of visible ASCII (`!` to `~`; no spaces, no
/// control characters, nothing outside ASCII). With `auth.personal_room`, the room it yields must also be valid.
pub fn valid_sub(sub: &str) -> bool {
    !sub.is_empty() && sub.len() <= MAX_SUB_LEN && sub.bytes().all(|b| b.is_ascii_graphic())
}

/// The `sub` of a token's payload, read WITHOUT verifying anything: only to refuse early a token that could not be
/// accepted anyway. `None` if the payload is not base64url JSON or has no string `sub`.
fn unverified_sub(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    #[derive(serde::Deserialize)]
    struct Sub {
        sub: Option<String>,
    }
    serde_json::from_slice::<Sub>(&bytes).ok()?.sub
}

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

/// A claim that must be an array of room patterns (strings), compiled here once for the connection's life: `None`
/// if absent, `Malformed` if of another type.
fn pattern_list(v: Option<&Value>) -> Result<Option<Vec<RoomPattern>>, AuthError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(RoomPattern::new).ok_or(AuthError::Malformed))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(AuthError::Malformed),
    }
}

fn validation(cfg: &AuthConfig, alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = cfg.leeway_secs;
    v.validate_exp = true;
    v.validate_nbf = true;
    let mut required = vec!["exp", "sub"];
    if let Some(iss) = &cfg.issuer {
        v.set_issuer(&[iss]);
        required.push("iss");
    }
    if cfg.audience.is_empty() {
        v.validate_aud = false;
    } else {
        v.set_audience(&cfg.audience);
        required.push("aud");
    }
    v.set_required_spec_claims(&required);
    v
}

fn load_pem(alg: Algorithm, path: &Path) -> Result<DecodingKey, AuthError> {
    let key = "auth.keys.public_key_file";
    let pem =
        std::fs::read(path).map_err(|e| AuthError::config(key, format!("cannot read {}: {e}", path.display())))?;
    let parsed = match alg {
        Algorithm::RS256 => DecodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 => DecodingKey::from_ec_pem(&pem),
        _ => DecodingKey::from_ed_pem(&pem),
    };
    parsed.map_err(|e| AuthError::config(key, format!("{}: not a {alg:?} public key PEM: {e}", path.display())))
}

fn load_jwks(cfg: &AuthConfig, path: &Path) -> Result<Vec<Key>, AuthError> {
    let ckey = "auth.jwks_file";
    let bad = |msg: String| AuthError::config(ckey, format!("{}: {msg}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let set: JwkSet = serde_json::from_str(&text).map_err(|e| bad(format!("not a JWKS: {e}")))?;
    let mut keys = Vec::with_capacity(set.keys.len());
    for (i, jwk) in set.keys.iter().enumerate() {
        let kid = jwk
            .common
            .key_id
            .clone()
            .ok_or_else(|| bad(format!("key #{i} has no `kid`")))?;
        // A key published for encryption (or anything but signatures) must not verify signatures.
        match &jwk.common.public_key_use {
            None | Some(PublicKeyUse::Signature) => {}
            Some(other) => {
                return Err(bad(format!(
                    "key {kid:?}: `use` is {other:?}, not \"sig\": only signature keys may verify tokens"
                )));
            }
        }
        if let Some(ops) = &jwk.common.key_operations
            && !ops.contains(&KeyOperations::Verify)
        {
            return Err(bad(format!("key {kid:?}: `key_ops` lacks \"verify\"")));
        }
        // The key type fixes the algorithm family (and the curve, the one its supported algorithm uses).
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => AlgorithmFamily::Ec,
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => AlgorithmFamily::Ed,
            _ => {
                return Err(bad(format!(
                    "key {kid:?}: only RSA, EC P-256 and OKP Ed25519 keys are supported"
                )));
            }
        };
        let of_family: Vec<Algorithm> = SUPPORTED_ALGORITHMS
            .iter()
            .copied()
            .filter(|a| a.family() == family)
            .collect();
        // A declared `alg` must be a supported one of the key's family (an RSA key declared RS512 is refused, not
        // reinterpreted); without one, the family's only supported algorithm.
        let alg = match jwk.common.key_algorithm {
            Some(declared) => Algorithm::try_from(declared).ok().filter(|a| of_family.contains(a)),
            None => match of_family.as_slice() {
                [only] => Some(*only),
                _ => None,
            },
        }
        .ok_or_else(|| bad(format!("key {kid:?}: unsupported or inconsistent `alg`")))?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(format!("key {kid:?}: {e}")))?;
        keys.push(Key {
            kid: Some(kid),
            alg,
            key,
            validation: validation(cfg, alg),
        });
    }
    Ok(keys)
}

/// Who a connection is and which rooms it may use. Cheap enough to clone once per connection.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The JWT `sub`; `None` for anonymous connections.
    pub user: Option<String>,
    /// The JWT `exp` (unix seconds); `None` for anonymous connections.
    pub expires_at: Option<u64>,
    /// `auth.leeway_secs`: the identity is valid until `exp` plus this ([`Identity::expires_in`]).
    grace: Duration,
    /// `*` glob patterns of rooms that may be joined.
    join: Vec<RoomPattern>,
    /// `*` glob patterns of rooms that may be published to.
    publish: Vec<RoomPattern>,
    /// The personal room (`auth.personal_room` with `{sub}` replaced), matched exactly, never as a glob: a `sub`
    /// containing `*` must not widen the grant.
    personal: Option<String>,
}

impl Identity {
    /// An anonymous identity with the given permissions.
    pub fn anonymous(perms: &Permissions) -> Identity {
        Identity {
            user: None,
            expires_at: None,
            grace: Duration::ZERO,
            join: perms.join.clone(),
            publish: perms.publish.clone(),
            personal: None,
        }
    }

    /// Time left at `now` before this identity expires (`exp` + `auth.leeway_secs`, the same rule that accepted
    /// the token): zero once past, `None` without `exp`. Saturating: an `exp` of 1e19 gives a huge duration, never a
    /// panic (callers turn it into an `Instant` with `checked_add`).
    pub fn expires_in(&self, now: SystemTime) -> Option<Duration> {
        let exp = self.expires_at?;
        let end = Duration::from_secs(exp).saturating_add(self.grace);
        let since_epoch = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO);
        Some(end.saturating_sub(since_epoch))
    }

    /// Whether `room` may be joined.
    pub fn may_join(&self, room: &str) -> bool {
        self.personal.as_deref() == Some(room) || self.join.iter().any(|p| p.matches(room))
    }

    /// Whether messages may be published to `room`.
    pub fn may_publish(&self, room: &str) -> bool {
        self.personal.as_deref() == Some(room) || self.publish.iter().any(|p| p.matches(room))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::{SystemTime, UNIX_EPOCH};

    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    use super::*;
    use crate::config::{JwtKey, SecretSource};

    /// Test-only RSA 2048 key pair (generated with `openssl genpkey -algorithm RSA`); not used anywhere else.
    const RSA_PRIVATE: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIIEvAIBADANBgkqhkiG9w0BAQEFAASCBKYwggSiAgEAAoIBAQDLwG/L8mlEbnWx\n\
GLOuPCMIv5Sp4xSsCQHoCCV6gtYwMR34ZmBZwoWqHvZj6rPJTq1t1a88An7fxVuD\n\
6MT7+rPlkSXDQXfndGLAIXWUygnIFf56tdzAX3kcYHeaa7GBUqufB/sltPxFgslU\n\
bHwoeayQ7W98CAkWdqq+gw+uGQNB/0IYPnNErrHcX8amTi5VC0bQU1xNnIxz9M6S\n\
bc6Vzd1VLogr4qCzy0JrtiIYn02At3rmlpSocGMkw4dqSVOQreOCD5dqZHWy4VdN\n\
y+EAt37yvt41NPloz+s0gd2XSILC1GTP0Crw+ZgbW+3rIrhf5G+ufoNdRJga1ovI\n\
nNl2Jei5AgMBAAECgf8ahJpy2v725Nk31smWTT9Rojbk2H898wL1HXvF2I11sRMz\n\
3gfFkho9T8mpiKMNAuS1140kKKFYrc2PfkYdJ+b53uS1NqGjv2Mw7PC2IlSByocz\n\
iV6B/PGIParwktcvVGfrBOs+G0+8mnoQcEsyn7betNg2lrnaVqkDa/xm5celoJbM\n\
ZhAECJlfLhcIuIr8JJKW3z7EbH+ROT3MW+MHJ3f9IlbDnLo7spQLJ2hJ6v3s0JPJ\n\
tADaOmFgs45yAGWFAzIYcJNjDbcUR6oZRq5AY52RHHPSUH/LugnPv+e7pW8SHS3Z\n\
0Eso4WoMXWd8aYOzDQaxoctt7ATQ1WovvepUTW0CgYEA/Jo5VVSImgSpJCiFlBvc\n\
fflMh13dtbQ+AgOB2Yc+ppg9SqDVJE7wSIn4ZL83Sr+DpHSH4vDVlM4m6AARn04p\n\
llBlQN6J8CldyK+H2YBgbbZl3JbSB7NuITOQA1V0qurWNSYMJsewiEPzgYmhabiW\n\
mKQGTqF4wfWRQQ7MaWiFegUCgYEAzn4BxxqiVE0hKQ+kZu8VsWteBlgr/kIUc1Q0\n\
FU2fb2bOSsbCka11WgqRDzJhnO/fO9odeyA8Ab1UTUfDJvfpkHjT0VcdM3/wBZcb\n\
fqUydjqOvVsQ4uEN7AMjtYie85gIR26nu1qt96u05ozmxxA+hj/T+nX01fKSCp4M\n\
2XmjDiUCgYEA5FrPpdJLw2CfP67aQzCEveVXR7CVs6QDwnJFOs9G1fgewI5w4Ofz\n\
1L/Vq84pQAuuCEfIaGJr0qAjD+ywAaH5eoenYWNMs63RuJDmcLvbcJNJtocpzAhr\n\
cNxaPolMdQ7jIx0IMy6m6ijzw5EWOKrEia0Ofpr+vekvrO6h4FC7CbkCgYEAuoT7\n\
mhum0bsx3uMwP4Jq9+3h6p0ub+bEjkBbI3sQLxKP+N981RX30LOGwFFj9tx9qpSk\n\
2JkPWwrn4T6XOtXo9gUOYCPuTpyb9JC/1y/lWwId+VEO+cEMUEmtscaMvcBwigWc\n\
IRIR3owNRcu0kc9MivuQwMZXuAH6hPiq5q6G6LkCgYAFScZyy7hT0A0UMFSj46/m\n\
dd2t5eCKuDdcdAfaxTzxUwnzjBRwHW7f4/0yI99xeAcIsK010CWWWAvxwzKsEYrN\n\
AvBQLskZlA80r/BTSZKdQNspeJvc9TibDOD6UCHlVf3nzKUQn+2B6bNF5lJOLTmt\n\
YXXW2n4Xq+xKXl0fj38Myg==\n\
-----END PRIVATE KEY-----\n\
";
    const RSA_PUBLIC: &str = "\
-----BEGIN PUBLIC KEY-----\n\
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAy8Bvy/JpRG51sRizrjwj\n\
CL+UqeMUrAkB6AgleoLWMDEd+GZgWcKFqh72Y+qzyU6tbdWvPAJ+38Vbg+jE+/qz\n\
5ZElw0F353RiwCF1lMoJyBX+erXcwF95HGB3mmuxgVKrnwf7JbT8RYLJVGx8KHms\n\
kO1vfAgJFnaqvoMPrhkDQf9CGD5zRK6x3F/Gpk4uVQtG0FNcTZyMc/TOkm3Olc3d\n\
VS6IK+Kgs8tCa7YiGJ9NgLd65paUqHBjJMOHaklTkK3jgg+XamR1suFXTcvhALd+\n\
8r7eNTT5aM/rNIHdl0iCwtRkz9Aq8PmYG1vt6yK4X+Rvrn6DXUSYGtaLyJzZdiXo\n\
uQIDAQAB\n\
-----END PUBLIC KEY-----\n\
";

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs()
    }

    fn claims(sub: &str) -> Value {
        json!({ "sub": sub, "exp": now() + 600 })
    }

    fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_owned);
        encode(&h, claims, key).expect("sign")
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        cfg: AuthConfig,
    }

    /// A directory holding key files; `add_*` append keys to `cfg.keys`.
    impl Fixture {
        fn new() -> Self {
            Self {
                _dir: tempfile::tempdir().expect("tempdir"),
                cfg: AuthConfig::default(),
            }
        }
        fn file(&self, name: &str, text: &str) -> std::path::PathBuf {
            let path = self._dir.path().join(name);
            std::fs::File::create(&path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .expect("write fixture");
            path
        }
        fn add_hs(&mut self, alg: &str, kid: Option<&str>, secret: &str) {
            let path = self.file(&format!("secret-{alg}-{kid:?}-{secret}"), &format!("{secret}\n"));
            self.cfg.keys.push(JwtKey {
                kid: kid.map(str::to_owned),
                algorithm: alg.parse().expect("algorithm"),
                secret: Some(SecretSource::File(path)),
                public_key_file: None,
            });
        }
        fn add_pem(&mut self, alg: &str, kid: Option<&str>, pem: &str) {
            let path = self.file(&format!("pub-{alg}-{kid:?}.pem"), pem);
            self.cfg.keys.push(JwtKey {
                kid: kid.map(str::to_owned),
                algorithm: alg.parse().expect("algorithm"),
                secret: None,
                public_key_file: Some(path),
            });
        }
        fn auth(&self) -> Authenticator {
            Authenticator::from_config(&self.cfg).expect("auth config loads")
        }
    }

    /// A fresh P-256 or Ed25519 key pair: signing key, public key PEM, raw public key (SEC1 point or 32 bytes).
    fn ec_pair(alg: &'static rcgen::SignatureAlgorithm) -> (EncodingKey, String, Vec<u8>) {
        let kp = rcgen::KeyPair::generate_for(alg).expect("keygen");
        let private = kp.serialize_pem();
        let enc = if std::ptr::eq(alg, &rcgen::PKCS_ED25519) {
            EncodingKey::from_ed_pem(private.as_bytes())
        } else {
            EncodingKey::from_ec_pem(private.as_bytes())
        };
        (
            enc.expect("private key"),
            kp.public_key_pem(),
            kp.public_key_raw().to_vec(),
        )
    }

    fn b64url(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    #[test]
    fn hmac_family_signs_and_verifies() {
        for (name, alg) in [
            ("HS256", Algorithm::HS256),
            ("HS384", Algorithm::HS384),
            ("HS512", Algorithm::HS512),
        ] {
            let mut f = Fixture::new();
            f.add_hs(name, None, "correct horse battery staple");
            let t = sign(
                alg,
                None,
                &claims("alice"),
                &EncodingKey::from_secret(b"correct horse battery staple"),
            );
            let id = f.auth().verify(&t).expect(name);
            assert_eq!(id.user.as_deref(), Some("alice"));
            assert!(id.expires_at.is_some());
        }
    }

    #[test]
    fn rsa_ec_ed_sign_and_verify() {
        let mut f = Fixture::new();
        f.add_pem("RS256", None, RSA_PUBLIC);
        let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).expect("rsa private");
        let (ec, ec_pub, _) = ec_pair(&rcgen::PKCS_ECDSA_P256_SHA256);
        f.add_pem("ES256", None, &ec_pub);
        let (ed, ed_pub, _) = ec_pair(&rcgen::PKCS_ED25519);
        f.add_pem("EdDSA", None, &ed_pub);
        let auth = f.auth();
        for (alg, key) in [
            (Algorithm::RS256, &rsa),
            (Algorithm::ES256, &ec),
            (Algorithm::EdDSA, &ed),
        ] {
            let id = auth
                .verify(&sign(alg, None, &claims("bob"), key))
                .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
            assert_eq!(id.user.as_deref(), Some("bob"));
        }
    }

    #[test]
    fn expired_and_not_yet_valid_are_refused() {
        let mut f = Fixture::new();
        f.add_hs("HS256", None, "s3cret");
        f.cfg.leeway_secs = 5;
        let auth = f.auth();
        let key = EncodingKey::from_secret(b"s3cret");
        let old = json!({ "sub": "a", "exp": now() - 60 });
        assert!(matches!(
            auth.verify(&sign(Algorithm::HS256, None, &old, &key)),
            Err(AuthError::Expired)
        ));
        let within_leeway = json!({ "sub": "a", "exp": now() - 2 });
        assert!(auth.verify(&sign(Algorithm::HS256, None, &within_leeway, &key)).is_ok());
        let future = json!({ "sub": "a", "exp": now() + 600, "nbf": now() + 300 });
        assert!(matches!(
            auth.verify(&sign(Algorithm::HS256, None, &future, &key)),
            Err(AuthError::NotYetValid)
        ));
        let no_exp = json!({ "sub": "a" });
        assert!(matches!(
            auth.verify(&sign(Algorithm::HS256, None, &no_exp, &key)),
            Err(AuthError::MissingClaim("exp"))
        ));
        let no_sub = json!({ "exp": now() + 60 });
        assert!(matches!(
            auth.verify(&sign(Algorithm::HS256, None, &no_sub, &key)),
            Err(AuthError::MissingClaim("sub"))
        ));
    }

    #[test]
    fn alg_none_and_alg_confusion_are_refused() {
        let mut f = Fixture::new();
        f.add_hs("HS256", None, "s3cret");
        f.add_pem("RS256", None, RSA_PUBLIC);
        let auth = f.auth();
        let b64 = |v: &Value| b64url(v.to_string().as_bytes());
        let none = format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT"})),
            b64(&claims("eve"))
        );
        assert!(matches!(auth.verify(&none), Err(AuthError::Malformed)));
        // HS256 signed with the RSA *public* key as HMAC secret: must not verify.
        let confused = sign(
            Algorithm::HS256,
            None,
            &claims("eve"),
            &EncodingKey::from_secret(RSA_PUBLIC.as_bytes()),
        );
        assert!(matches!(auth.verify(&confused), Err(AuthError::BadSignature)));
        // An algorithm no key is configured for.
        let hs512 = sign(
            Algorithm::HS512,
            None,
            &claims("eve"),
            &EncodingKey::from_secret(b"s3cret"),
        );
        assert!(matches!(auth.verify(&hs512), Err(AuthError::UnknownKey)));
        assert!(matches!(auth.verify("not.a.jwt"), Err(AuthError::Malformed)));
        assert!(matches!(auth.verify(""), Err(AuthError::Malformed)));
    }

    #[test]
    fn wrong_key_is_refused() {
        let mut f = Fixture::new();
        f.add_hs("HS256", None, "right");
        let (_, ec_pub, _) = ec_pair(&rcgen::PKCS_ECDSA_P256_SHA256);
        f.add_pem("ES256", None, &ec_pub);
        let auth = f.auth();
        let t = sign(
            Algorithm::HS256,
            None,
            &claims("a"),
            &EncodingKey::from_secret(b"wrong"),
        );
        assert!(matches!(auth.verify(&t), Err(AuthError::BadSignature)));
        let (other_ec, _, _) = ec_pair(&rcgen::PKCS_ECDSA_P256_SHA256);
        let t = sign(Algorithm::ES256, None, &claims("a"), &other_ec);
        assert!(matches!(auth.verify(&t), Err(AuthError::BadSignature)));
    }

    #[test]
    fn kid_selects_the_key_and_jwks_loads() {
        let mut f = Fixture::new();
        f.add_hs("HS256", Some("k1"), "one");
        f.add_hs("HS256", Some("k2"), "two");
        // JWKS with an EC and an Ed key, built from fresh key pairs.
        let (ec, _, ec_raw) = ec_pair(&rcgen::PKCS_ECDSA_P256_SHA256);
        let (ed, _, ed_raw) = ec_pair(&rcgen::PKCS_ED25519);
        let ec_jwk = json!({ "kty": "EC", "crv": "P-256", "kid": "ec-1", "alg": "ES256",
            "x": b64url(&ec_raw[1..33]), "y": b64url(&ec_raw[33..65]) });
        let ed_jwk = json!({ "kty": "OKP", "crv": "Ed25519", "kid": "ed-1", "x": b64url(&ed_raw) });
        // RSA: n and e pulled from the SPKI DER of the fixture (fixed offsets of a 2048-bit key with e = 65537).
        let der = {
            use base64::Engine;
            let body: String = RSA_PUBLIC.lines().filter(|l| !l.starts_with("-----")).collect();
            base64::engine::general_purpose::STANDARD
                .decode(body)
                .expect("fixture base64")
        };
        let rsa_jwk = json!({ "kty": "RSA", "kid": "rsa-1", "n": b64url(&der[33..289]), "e": b64url(&der[291..294]) });
        let jwks = json!({ "keys": [ec_jwk, ed_jwk, rsa_jwk] }).to_string();
        f.cfg.jwks_file = Some(f.file("jwks.json", &jwks));
        let auth = f.auth();

        let two = EncodingKey::from_secret(b"two");
        assert!(
            auth.verify(&sign(Algorithm::HS256, Some("k2"), &claims("a"), &two))
                .is_ok()
        );
        // Right secret, wrong kid: the k1 key is the only candidate.
        assert!(matches!(
            auth.verify(&sign(Algorithm::HS256, Some("k1"), &claims("a"), &two)),
            Err(AuthError::BadSignature)
        ));
        assert!(matches!(
            auth.verify(&sign(Algorithm::HS256, Some("k9"), &claims("a"), &two)),
            Err(AuthError::UnknownKey)
        ));
        // No kid in the token: every key of the algorithm is tried.
        assert!(auth.verify(&sign(Algorithm::HS256, None, &claims("a"), &two)).is_ok());
        assert!(
            auth.verify(&sign(Algorithm::ES256, Some("ec-1"), &claims("a"), &ec))
                .is_ok()
        );
        assert!(
            auth.verify(&sign(Algorithm::EdDSA, Some("ed-1"), &claims("a"), &ed))
                .is_ok()
        );
        let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).expect("rsa private");
        assert!(
            auth.verify(&sign(Algorithm::RS256, Some("rsa-1"), &claims("a"), &rsa))
                .is_ok()
        );
        // The Ed key's kid with an ES256 token: alg must match the key's.
        assert!(matches!(
            auth.verify(&sign(Algorithm::ES256, Some("ed-1"), &claims("a"), &ec)),
            Err(AuthError::UnknownKey)
        ));

        let mut bad = Fixture::new();
        bad.cfg.jwks_file = Some(bad.file("jwks.json", r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"AAAA"}]}"#));
        let err = Authenticator::from_config(&bad.cfg).unwrap_err().to_string();
        assert!(err.contains("auth.jwks_file") && err.contains("kid"), "{err}");
    }

    #[test]
    fn config_errors_name_the_key() {
        let mut f = Fixture::new();
        f.add_pem("ES256", None, "not a pem");
        let err = Authenticator::from_config(&f.cfg).unwrap_err().to_string();
        assert!(
            err.contains("auth.keys.public_key_file") && err.contains(".pem"),
            "{err}"
        );
        let mut f = Fixture::new();
        f.cfg.keys.push(JwtKey {
            kid: None,
            algorithm: Algorithm::HS256,
            secret: Some(SecretSource::Env("ROOMWIRE_TEST_UNSET_VAR".into())),
            public_key_file: None,
        });
        let err = Authenticator::from_config(&f.cfg).unwrap_err().to_string();
        assert!(err.contains("auth.keys.secret"), "{err}");
    }

    #[test]
    fn issuer_and_audience() {
        let mut f = Fixture::new();
        f.add_hs("HS256", None, "s");
        f.cfg.issuer = Some("https://idp".into());
        f.cfg.audience = vec!["roomwire".into()];
        let auth = f.auth();
        let key = EncodingKey::from_secret(b"s");
        let ok = json!({ "sub": "a", "exp": now() + 60, "iss": "https://idp", "aud": "roomwire" });
        assert!(auth.verify(&sign(Algorithm::HS256, None, &ok, &key)).is_ok());
        let iss = json!({ "sub": "a", "exp": now() + 60, "iss": "https://evil", "aud": "roomwire" });
        assert!(matches!(
            auth.verify(&sign(Algorithm::HS256, None, &iss, &key)),
            Err(AuthError::WrongIssuer)
        ));
        let aud = json!({ "sub": "a", "exp": now() + 60, "iss": "https://idp", "aud": ["other"] });
        assert!(matches!(
            auth.verify(&sign(Algorithm::HS256, None, &aud, &key)),
            Err(AuthError::WrongAudience)
        ));
        let no_iss = json!({ "sub": "a", "exp": now() + 60, "aud": "roomwire" });
        assert!(matches!(
            auth.verify(&sign(Algorithm::HS256, None, &no_iss, &key)),
            Err(AuthError::MissingClaim("iss"))
        ));
    }

    #[test]
    fn permissions_patterns_and_personal_room() {
        let mut f = Fixture::new();
        f.add_hs("HS256", None, "s");
        f.cfg.personal_room = Some("user-{sub}".into());
        let auth = f.auth();
        let key = EncodingKey::from_secret(b"s");
        let c = json!({ "sub": "ann", "exp": now() + 60, "rooms": ["chat-*", "lobby"], "publish": ["chat-*"] });
        let id = auth.verify(&sign(Algorithm::HS256, None, &c, &key)).expect("valid");
        assert!(id.may_join("chat-42") && id.may_join("lobby") && !id.may_join("admin"));
        assert!(id.may_publish("chat-42") && !id.may_publish("lobby"));
        assert!(id.may_join("user-ann") && id.may_publish("user-ann") && !id.may_join("user-bob"));

        // No publish claim: publish = join patterns.
        let c = json!({ "sub": "ann", "exp": now() + 60, "rooms": ["lobby"] });
        let id = auth.verify(&sign(Algorithm::HS256, None, &c, &key)).expect("valid");
        assert!(id.may_publish("lobby") && !id.may_publish("chat-1"));

        // A `*` in sub cannot widen the personal room into a glob: it does not even make a valid room name.
        let c = json!({ "sub": "*", "exp": now() + 60 });
        assert!(matches!(
            auth.verify(&sign(Algorithm::HS256, None, &c, &key)),
            Err(AuthError::InvalidClaim("sub"))
        ));

        let c = json!({ "sub": "ann", "exp": now() + 60, "rooms": "lobby" });
        assert!(matches!(
            auth.verify(&sign(Algorithm::HS256, None, &c, &key)),
            Err(AuthError::Malformed)
        ));
    }

    #[test]
    fn anonymous_only_when_allowed_and_tokens_still_verified() {
        let mut f = Fixture::new();
        f.add_hs("HS256", None, "s");
        assert!(matches!(f.auth().authenticate(None), Err(AuthError::Missing)));
        f.cfg.allow_anonymous = true;
        f.cfg.anonymous = Permissions {
            join: vec!["public-*".into()],
            publish: vec![],
        };
        let auth = f.auth();
        let id = auth.authenticate(None).expect("anonymous");
        assert!(id.user.is_none() && id.may_join("public-1") && !id.may_publish("public-1"));
        // The text the client gets comes from the refusal itself (not a variant built by the test).
        let refused = auth.authenticate(Some("garbage")).err();
        assert!(matches!(refused, Some(AuthError::Malformed)));
        assert_eq!(refused.map(|e| e.reason()), Some("malformed token"));
    }

    fn hs_auth(tweak: impl FnOnce(&mut AuthConfig)) -> (Fixture, Authenticator) {
        let mut f = Fixture::new();
        f.add_hs("HS256", None, "s");
        tweak(&mut f.cfg);
        let auth = f.auth();
        (f, auth)
    }

    fn hs(claims: &Value) -> String {
        sign(Algorithm::HS256, None, claims, &EncodingKey::from_secret(b"s"))
    }

    #[test]
    fn sub_must_be_header_and_log_safe() {
        let (_f, auth) = hs_auth(|_| {});
        for bad in [
            "a\r\nX-Evil: 1",
            "a\nb",
            "a\u{0}b",
            "tab\there",
            "with space",
            "caf\u{e9}",
            &"x".repeat(129),
        ] {
            let t = hs(&json!({ "sub": bad, "exp": now() + 60 }));
            assert!(
                matches!(auth.verify(&t), Err(AuthError::InvalidClaim("sub"))),
                "{bad:?} must be refused"
            );
        }
        for good in [
            "auth0|5f7c8ec7c33c6c004bbafe82",
            "alice@example.com",
            "https://idp/u/1",
            &"x".repeat(128),
        ] {
            let t = hs(&json!({ "sub": good, "exp": now() + 60 }));
            assert_eq!(auth.verify(&t).expect(good).user.as_deref(), Some(good));
        }
        // The reason shown and logged never carries the claim.
        let e = AuthError::InvalidClaim("sub");
        assert!(!e.reason().contains('\n') && !e.to_string().contains("evil"));
    }

    #[test]
    fn sub_must_make_a_valid_personal_room() {
        let (_f, auth) = hs_auth(|c| c.personal_room = Some("user-{sub}".into()));
        let t = hs(&json!({ "sub": "auth0|abc", "exp": now() + 60 }));
        assert!(matches!(auth.verify(&t), Err(AuthError::InvalidClaim("sub"))));
        let t = hs(&json!({ "sub": &"x".repeat(124), "exp": now() + 60 }));
        assert!(
            matches!(auth.verify(&t), Err(AuthError::InvalidClaim("sub"))),
            "room over 128"
        );
        // `.` is not a room character (it separates NATS subject tokens): such a `sub` cannot have a personal room.
        let t = hs(&json!({ "sub": "ann@example.com", "exp": now() + 60 }));
        assert!(matches!(auth.verify(&t), Err(AuthError::InvalidClaim("sub"))));
        let t = hs(&json!({ "sub": "ann@example", "exp": now() + 60 }));
        assert!(auth.verify(&t).expect("valid").may_join("user-ann@example"));
    }

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
    fn leeway_is_one_rule_for_accepting_and_for_closing() {
        let (f, _auth) = hs_auth(|c| c.leeway_secs = 5);
        let verifier = Authenticator::from_config(&f.cfg).expect("loads").verifier;
        let exp = 1_700_000_000u64;
        let claims = |exp: u64| match json!({ "sub": "a", "exp": exp }) {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let at = |secs: f64| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs);
        // Past exp but inside the leeway: accepted, and it stays open for the rest of the leeway, not 0 s.
        let id = verifier
            .identity_from_claims(&claims(exp), at(exp as f64 + 4.5))
            .expect("inside leeway");
        assert_eq!(id.expires_in(at(exp as f64 + 4.5)), Some(Duration::from_millis(500)));
        // At exp + leeway: refused (it would be closed at once).
        assert!(matches!(
            verifier.identity_from_claims(&claims(exp), at(exp as f64 + 5.0)),
            Err(AuthError::Expired)
        ));
        // Through the whole path: a token 2 s past exp with 5 s leeway has ~3 s left.
        let auth = f.auth();
        let id = auth
            .verify(&hs(&json!({ "sub": "a", "exp": now() - 2 })))
            .expect("inside leeway");
        let left = id.expires_in(SystemTime::now()).expect("exp");
        assert!(
            left > Duration::from_secs(1) && left <= Duration::from_secs(3),
            "{left:?}"
        );
    }

    #[test]
    fn many_keys_without_kid_are_bounded() {
        // Four kid-less keys of one algorithm: every kid-less token would cost four checks; refused at load.
        let mut f = Fixture::new();
        for s in ["a", "b", "c", "d"] {
            f.add_hs("HS256", None, s);
        }
        let err = Authenticator::from_config(&f.cfg).unwrap_err().to_string();
        assert!(err.contains("auth.keys") && err.contains("max_keys_per_token"), "{err}");
        f.cfg.max_keys_per_token = 4;
        assert!(Authenticator::from_config(&f.cfg).is_ok());

        // Keys with kids: a token naming one costs one check; a token naming none is refused before any check.
        let mut f = Fixture::new();
        for k in ["k1", "k2", "k3", "k4"] {
            f.add_hs("HS256", Some(k), k);
        }
        let auth = f.auth();
        let t = sign(Algorithm::HS256, None, &claims("a"), &EncodingKey::from_secret(b"k4"));
        assert!(matches!(auth.verify(&t), Err(AuthError::UnknownKey)));
        assert_eq!(auth.verifications(), 0);
        let t = sign(
            Algorithm::HS256,
            Some("k4"),
            &claims("a"),
            &EncodingKey::from_secret(b"k4"),
        );
        assert!(auth.verify(&t).is_ok());
        assert_eq!(auth.verifications(), 1);
        // Two keys without kid under the default bound of 3: both tried.
        let mut f = Fixture::new();
        f.add_hs("HS256", None, "old");
        f.add_hs("HS256", None, "new");
        let auth = f.auth();
        let t = sign(Algorithm::HS256, None, &claims("a"), &EncodingKey::from_secret(b"new"));
        assert!(auth.verify(&t).is_ok());
        assert_eq!(auth.verifications(), 2);
    }

    #[test]
    fn jwks_encryption_keys_are_refused() {
        let (_, _, ec_raw) = ec_pair(&rcgen::PKCS_ECDSA_P256_SHA256);
        let jwk = |extra: Value| {
            let mut k = json!({ "kty": "EC", "crv": "P-256", "kid": "ec-1",
                "x": b64url(&ec_raw[1..33]), "y": b64url(&ec_raw[33..65]) });
            for (name, v) in extra.as_object().expect("object") {
                k[name] = v.clone();
            }
            json!({ "keys": [k] }).to_string()
        };
        for (extra, want) in [
            (json!({ "use": "enc" }), "`use`"),
            (json!({ "use": "other" }), "`use`"),
            (json!({ "key_ops": ["encrypt"] }), "key_ops"),
            (json!({ "alg": "RS256" }), "alg"),
        ] {
            let mut f = Fixture::new();
            f.cfg.jwks_file = Some(f.file("jwks.json", &jwk(extra.clone())));
            let err = Authenticator::from_config(&f.cfg).unwrap_err().to_string();
            assert!(err.contains("auth.jwks_file") && err.contains(want), "{extra}: {err}");
        }
        for extra in [
            json!({ "use": "sig" }),
            json!({ "key_ops": ["verify"] }),
            json!({ "alg": "ES256" }),
        ] {
            let mut f = Fixture::new();
            f.cfg.jwks_file = Some(f.file("jwks.json", &jwk(extra.clone())));
            assert!(Authenticator::from_config(&f.cfg).is_ok(), "{extra}");
        }
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
