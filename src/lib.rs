//! Roomwire: a WebSocket gateway that bridges browser connections (wss) to NATS subjects.
//!
//! `main.rs` parses flags and calls [`server::run`]; the integration tests call the same function. One module per
//! concern: [`config`] (schema + validation), [`tls`], [`server`] (accept loop), [`http`] (TLS, routes, upgrade), [`connection`]
//! (reader and writer task per WebSocket), [`outbox`] (the bounded per-connection queue and overflow policies),
//! [`rooms`] (room registry and fan-out), [`bridge`] (NATS), [`protocol`] (wire format), [`auth`], [`limits`],
//! [`metrics`] and [`shutdown`].
#![warn(missing_docs)]

pub mod auth;
pub mod bridge;
pub mod config;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod connection;
pub mod frames;
pub mod gateway;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod outbox;
pub mod protocol;
pub mod room_pattern;
pub mod room_quota;
pub mod rooms;
pub mod server;
pub mod shutdown;
pub mod tls;
pub mod token;

pub use config::Config;
pub use gateway::Gateway;
pub use server::run;
