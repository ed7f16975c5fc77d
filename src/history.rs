//! History rooms: the JetStream stream that stores room messages, its epoch, and the seams the connection uses
//! (`docs/history.md`).
//!
//! - **Capture.** The stream `history.stream` covers every room subject (`<subject_prefix>.*`), so a backend that
//!   publishes with plain core NATS is stored like a client. Which rooms *serve* history (sequences, recovery,
//!   `history`) is `history.rooms`; the others are stored but never read back.
//! - **Live sequence.** The stream republishes each stored message to `<live_prefix>.<subject_prefix>.<room>` with
//!   its stream sequence in `Nats-Sequence`. A history room's live subscription is that subject, so every live frame
//!   carries `"seq"` and is ordered by the stream. The cost: a message reaches clients only once JetStream stored
//!   it; while JetStream cannot store, history rooms are silent (publishes are answered `unavailable`), and other
//!   rooms are untouched.
//! - **Reads** go through [`Replayer`] (batched direct gets, shared between concurrent recoveries), never per-client
//!   consumers, and at most `history.max_concurrent_reads` at once.
//! - **Epoch.** The stream's creation time, checked every `history.epoch_refresh`: a recreated stream restarts its
//!   sequences, so a recovery point from the old one must not be trusted.
//!
//! The parts, each a file under `history/`, none depending back on the one that uses it:
//! - `stream`: the stream's setup, checks and epoch, and the [`History`] handle (live subjects, read slots, message
//!   ids);
//! - `replay`: the [`Replayer`] and its policy: which reads to make for a recovery's range, the `history` op's last N
//!   and a room's last sequence, and how concurrent callers share them (single flight);
//! - `direct`: the JetStream requests themselves (batched direct gets, the stream leader when a replica lags or
//!   direct gets are off) and the parsing of their replies;
//! - `segment`: what one range read found, and the truncation rule (when a slice of it is whole);
//! - `cache`: recent segments per room, bounded in bytes and rooms;
//! - `stored`: the values a read gives back ([`Stored`], [`ReplayError`]).

mod cache;
mod direct;
mod replay;
mod segment;
mod stored;
mod stream;

pub use replay::{ReplayConfig, Replayer};
pub use stored::{ReplayError, Stored};
pub use stream::{History, HistoryError};
