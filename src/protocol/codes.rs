//! The codes of the client protocol (`docs/protocol.md`): the WebSocket close codes the gateway ends a connection
//! with ([`close`]) and the codes of `{"op":"error"}` frames ([`ErrorCode`]). Plain values, used by the encoding of
//! error frames and by whatever decides how a connection ends.

/// WebSocket close codes the gateway uses. Documented in `docs/protocol.md`.
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// Gateway shutting down, or heartbeat timeout.
    pub const GOING_AWAY: u16 = 1001;
    /// The reason sent with [`GOING_AWAY`] when a draining gateway closes a connection (SIGTERM, spread over
    /// `server.drain_window`). The client library recognises it and reconnects, to another gateway through the load
    /// balancer, after an extra random delay, so the clients of one gateway do not all land on the others at once.
    pub const DRAIN_REASON: &str = "going away: reconnect";
    /// The client broke the WebSocket protocol (unmasked or malformed frame, bad close frame, ...).
    pub const PROTOCOL: u16 = 1002;
    /// A text message that is not valid UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// Sustained abuse (rate limits exceeded again and again).
    pub const POLICY: u16 = 1008;
    /// A message over `limits.max_message_size`.
    pub const TOO_BIG: u16 = 1009;
    /// Unexpected internal failure.
    pub const INTERNAL: u16 = 1011;
    /// A history room's recovery could not catch up with the room (`docs/history.md`); reconnect and recover again.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The token expired and was not refreshed.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// The client did not read fast enough (overflow policy `disconnect`, or write timeout).
    pub const SLOW_CONSUMER: u16 = 4008;
    /// A backend disconnected the connection (`disconnect` over NATS); the client library does not reconnect.
    pub const DISCONNECTED: u16 = 4003;
}

/// Error codes carried by `{"op":"error"}` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Not JSON, unknown op, missing or mistyped field, binary frame.
    BadRequest,
    /// The room name is not in the safe set.
    InvalidRoom,
    /// Publish or leave for a room the connection has not joined.
    NotJoined,
    /// The payload does not fit (e.g. over NATS's max payload).
    TooLarge,
    /// NATS is down, or did not accept the publish in time.
    Unavailable,
    /// The connection's permissions do not allow this room.
    Forbidden,
    /// Over the per-connection or per-user message or byte rate.
    RateLimited,
    /// Over `rooms.max_rooms_per_connection`.
    TooManyRooms,
    /// A `refresh` token was refused.
    Unauthorized,
    /// `rpc`: nobody serves the method.
    NoResponders,
    /// `rpc`: no answer in time (the service may still have acted).
    Timeout,
}

impl ErrorCode {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidRoom => "invalid_room",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NoResponders => "no_responders",
            ErrorCode::Timeout => "timeout",
        }
    }
}
