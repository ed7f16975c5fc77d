//! The error type of every NATS operation ([`BridgeError`]), by what the client should be told, and its kind for
//! metrics (`metrics::Failure`, re-exported as `bridge::Failure`).

use crate::metrics::Failure;

/// Errors of NATS operations, by what the client should be told.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// Could not connect (bad URL, bad credentials file).
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
    /// The NATS connection is down right now.
    #[error("NATS is not connected")]
    Disconnected,
    /// NATS did not accept the operation within the configured timeout.
    #[error("NATS did not answer in time")]
    Timeout,
    /// The payload is over the server's max_payload, or the message over `nats.max_pending_bytes`.
    #[error("payload over the NATS server's max_payload or nats.max_pending_bytes")]
    TooLarge,
    /// The NATS server refused the subscription (permissions violation).
    #[error("NATS refused the subscription")]
    Refused,
    /// Any other NATS client error.
    #[error("NATS error: {0}")]
    Other(String),
}

impl BridgeError {
    /// Its kind, for metrics.
    pub fn kind(&self) -> Failure {
        match self {
            BridgeError::Connect(_) => Failure::Connect,
            BridgeError::Disconnected => Failure::Disconnected,
            BridgeError::Timeout => Failure::Timeout,
            BridgeError::TooLarge => Failure::TooLarge,
            BridgeError::Refused => Failure::Refused,
            BridgeError::Other(_) => Failure::Error,
        }
    }
}
