//! Why authentication failed: [`AuthError`], one variant per refusal (plus `Config`, a bad `[auth]` section at
//! startup), with [`AuthError::reason`], the only text a client is shown, and the mapping from `jsonwebtoken`'s
//! errors to it. A leaf: the other parts of `auth` use it, it uses none of them.

use jsonwebtoken::errors::ErrorKind;

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
    /// A claim that would reach a header, a log line or a room name is not acceptable (see [`valid_sub`](super::valid_sub)).
    #[error("token claim `{0}` is not acceptable")]
    InvalidClaim(&'static str),
    /// A `refresh` token whose `sub` is not the connection's user (read before any signature check).
    #[error("token is for another user")]
    WrongUser,
    /// The token was revoked by a backend (`revoke` over NATS) and the revocation has not expired.
    #[error("token revoked")]
    Revoked,
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
            AuthError::InvalidClaim("sub") => "token `sub` not acceptable",
            AuthError::InvalidClaim(_) => "token claim not acceptable",
            AuthError::Revoked => "token revoked",
            AuthError::WrongUser => "token is for another user",
            AuthError::Busy => "authentication busy; try again",
            AuthError::Cancelled => "cancelled",
            AuthError::Config { .. } => "authentication misconfigured",
        }
    }

    pub(super) fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        AuthError::Config {
            key: key.into(),
            message: message.into(),
        }
    }
}

pub(super) fn map_jwt_error(e: &jsonwebtoken::errors::Error) -> AuthError {
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
