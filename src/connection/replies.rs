//! What the client sees when an op is refused: one function per error type, giving the error frame's code and
//! message (`docs/protocol.md`), so each mapping is written once. Closes are mapped in `super::close`.

use crate::{
    auth::AuthError,
    bridge::{BridgeError, RpcFailure},
    protocol::ErrorCode,
    room_quota::QuotaError,
    rooms::JoinError,
};

/// A `join` the registry refused.
pub(super) fn join_refused(e: &JoinError) -> (ErrorCode, &'static str) {
    match e {
        JoinError::Capacity => (ErrorCode::Unavailable, "this gateway holds the maximum number of rooms"),
        JoinError::Quota(QuotaError::TooManyRooms) => (
            ErrorCode::TooManyRooms,
            "in the maximum number of rooms for this user or address",
        ),
        JoinError::Quota(QuotaError::CreationRate) => {
            (ErrorCode::RateLimited, "creating rooms too fast; try again later")
        }
        JoinError::Nats(_) => (ErrorCode::Unavailable, "messaging backend unavailable"),
    }
}

/// A `publish` NATS did not take.
pub(super) fn publish_refused(e: &BridgeError) -> (ErrorCode, &'static str) {
    match e {
        BridgeError::TooLarge => (ErrorCode::TooLarge, "message over the backend's maximum payload"),
        _ => (ErrorCode::Unavailable, "messaging backend unavailable"),
    }
}

/// An `rpc` call that got no answer.
pub(super) fn rpc_failed(e: RpcFailure) -> (ErrorCode, &'static str) {
    match e {
        RpcFailure::NoResponders => (ErrorCode::NoResponders, "no service answers this method"),
        RpcFailure::Timeout => (
            ErrorCode::Timeout,
            "no answer in time; the service may still have acted",
        ),
        RpcFailure::TooLarge => (ErrorCode::TooLarge, "request over the backend's maximum payload"),
        RpcFailure::Unavailable => (ErrorCode::Unavailable, "messaging backend unavailable"),
    }
}

/// A `refresh` whose token was refused: saturated checks are not the client's fault (`unavailable`), anything else
/// is `unauthorized` with the reason (which never quotes the token).
pub(super) fn refresh_refused(e: &AuthError) -> (ErrorCode, &'static str) {
    match e {
        AuthError::Busy | AuthError::Cancelled => (ErrorCode::Unavailable, e.reason()),
        _ => (ErrorCode::Unauthorized, e.reason()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_join_refusal_has_its_code() {
        assert_eq!(join_refused(&JoinError::Capacity).0, ErrorCode::Unavailable);
        assert_eq!(
            join_refused(&JoinError::Quota(QuotaError::TooManyRooms)).0,
            ErrorCode::TooManyRooms
        );
        assert_eq!(
            join_refused(&JoinError::Quota(QuotaError::CreationRate)).0,
            ErrorCode::RateLimited
        );
        assert_eq!(publish_refused(&BridgeError::TooLarge).0, ErrorCode::TooLarge);
        assert_eq!(publish_refused(&BridgeError::Timeout).0, ErrorCode::Unavailable);
    }
}
