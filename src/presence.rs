//! Presence (`docs/presence.md`): who is in a room over every gateway, kept in a NATS KV bucket, and the
//! `member_joined`/`member_left` events derived from it.
//!
//! The model: each gateway instance (a new id on every start) writes one key per room it has members in,
//! `<room as base64url>.<instance>`, whose value lists its members of the room (counts only above
//! `presence.max_members`). Writes are coalesced per room and refreshed every `ttl / 3`; the bucket's `max_age` is
//! `ttl`, so the entries of a gateway that died expire, and the server's limit markers (ADR-48) tell every watcher.
//! Each room with local members has one watch of its keys; the changes it sees become the events, so all gateways
//! derive the same events from the same history.
//!
//! The parts, none depending back on the one that uses it: `entry` (keys and values: pure), `view` (every entry of a
//! room merged, and the events a change means: pure), `bucket` (the [`Presence`] handle: the bucket, writes, watches
//! and reads) and `room` ([`RoomPresence`]: one room's members, writer and watch, owned by the room in
//! `crate::rooms`).

mod bucket;
mod entry;
mod room;
mod view;

pub use bucket::{Presence, PresenceError};
pub use entry::Departure;
pub use room::{FLUSH_INTERVAL, RoomPresence};
pub use view::Summary;
