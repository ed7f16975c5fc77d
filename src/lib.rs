//! Roomwire: a WebSocket gateway that bridges browser connections (wss) to NATS subjects.
//!
//! `main.rs` parses flags, starts a [`Gateway`] and calls [`run`]; the integration tests do the same. A connection's
//! life reads in one direction, one module per step: [`server`] (the accept loop) → [`http`] (TLS, HTTP routes and the
//! upgrade) → [`connection`] (the session: one task per WebSocket) over [`wire`] (its socket: tungstenite reads,
//! pre-built frames are written). They share [`gateway`] (the state every
//! connection needs) and depend on the concerns below, none of which depends back on them:
//! [`config`] (schema and validation), [`tls`], [`limits`] (connection slots, rates, origins, client addresses),
//! [`frames`] (every incoming frame charged to the rate limits), [`auth`] (JWT verification) and [`token`] (where the
//! token comes from), [`outbox`] (the bounded per-connection queue and its overflow policies), [`rooms`] (registry and
//! fan-out) with [`room_quota`], [`room_pattern`] and [`room_name`] (the naming rules), [`bridge`] (NATS),
//! [`protocol`] (wire format), [`frame`] (one server frame, built once and shared, and its deflated twin),
//! [`deflate`] (permessage-deflate: negotiation, one compression per message, bounded inflation), [`metrics`] and [`shutdown`].
//! [`history`] keeps room history in a JetStream stream and reads stored room messages back from it (JetStream
//! direct gets); [`presence`] keeps who is in each room, over every gateway, in a JetStream KV bucket; [`control`] acts
//! on backend commands over NATS (disconnect, subscribe, unsubscribe, revoke) through a registry of the open
//! connections; [`deflate`] is permessage-deflate (negotiation, compress once, bounded inflate). No module imports
//! another in a circle (`scripts/modgraph`, run by `scripts/test`).
//! [`assets`] holds the files served as they are (the browser client library, the demo chat).
#![warn(missing_docs)]

pub mod admin;
pub mod assets;
pub mod auth;
pub mod bridge;
pub mod config;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod connection;
pub mod control;
pub mod deflate;
pub mod frame;
pub mod frames;
pub mod gateway;
pub mod history;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod outbox;
pub mod presence;
pub mod protocol;
pub mod room_name;
pub mod room_pattern;
pub mod room_quota;
pub mod rooms;
pub mod server;
pub mod shutdown;
#[cfg(test)]
mod test_support;
pub mod tls;
pub mod tls_stream;
pub mod token;
pub mod wire;

pub use config::Config;
pub use gateway::Gateway;
pub use server::run;
