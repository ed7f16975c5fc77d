//! What a read of the history stream gives back: a stored room message ([`Stored`]), or why the read could not be
//! answered ([`ReplayError`]). A leaf of `history/`: the JetStream reads (`direct`), the segments and the cache built
//! from them and the [`Replayer`](super::Replayer) all speak these two types, so none of them depends on another for
//! its vocabulary.

use async_nats::HeaderMap;
use bytes::Bytes;

/// One stored room message, as read from the stream.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The stream sequence.
    pub seq: u64,
    /// The message payload.
    pub payload: Bytes,
    /// The original message's headers (the gateway's from/echo headers), without the `Nats-*` headers a direct get
    /// adds (`Nats-Stream`, `Nats-Subject`, `Nats-Sequence`, `Nats-Time-Stamp`, `Nats-Num-Pending`,
    /// `Nats-Last-Sequence`). `None` when the message had none.
    pub headers: Option<HeaderMap>,
}

/// Why a read could not be answered. `Clone` because one shared read answers many callers.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReplayError {
    /// Messages after `after` were already removed by the stream's limits.
    #[error("history truncated")]
    Truncated,
    /// More than `max` messages are missing.
    #[error("too many missed messages")]
    TooMany,
    /// JetStream did not answer before the deadline.
    #[error("jetstream timed out")]
    Timeout,
    /// JetStream unavailable or another failure (text is for logs, never for clients).
    #[error("jetstream unavailable: {0}")]
    Unavailable(String),
}
