//! Backends in control (`docs/protocol.md`, "Control over NATS"): commands published to
//! `<nats.control_prefix>.<command>` reach every gateway, and each acts on its own connections.
//!
//! - `disconnect` closes a user's connections (or one connection) with 4003;
//! - `subscribe` / `unsubscribe` hand a room change to each of a user's connections, which its own task carries out
//!   between client ops (`outbox::Directive`: the connection alone touches its rooms);
//! - `revoke` closes the connections a token authenticates with 4001 and refuses the token at the upgrade and at
//!   `refresh` until the revocation expires ([`revocations`], kept in a KV bucket for gateways started later).
//!
//! The one control task ([`Control::run`]) reads the subscription, charges every command to a per-gateway rate
//! (`nats.control_commands_per_second`), parses it where it enters ([`command`]) and acts on the [`registry`] of open
//! connections. Nothing a command carries can crash the task: a malformed or unknown command is logged (rate-limited)
//! and counted (`roomwire_control_commands_total{reason}`), never answered.
//!
//! Bounds: the subscription's buffer (`nats.subscription_capacity`), the command rate, the directives waiting per
//! connection (`nats.control_max_pending_per_connection`) and the revocations (`auth.max_revocations`).

pub mod command;
pub mod registry;
pub mod revocations;

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use async_nats::jetstream;
use futures_util::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio_util::sync::CancellationToken;

use command::{Command, CommandError, Revocation, Target};
use registry::{Entry, Registry};
use revocations::{NotKept, Revocations, unix_now};

use crate::{
    auth::Identity,
    config::Config,
    metrics::{ControlOutcome, Metrics},
    outbox::{CloseRequest, Directive},
    protocol::close,
};

/// The close reason of a `disconnect` without one.
pub const DISCONNECT_REASON: &str = "disconnected by server";

/// The close reason of a revoked token's connection.
pub const REVOKED_REASON: &str = "token revoked";

/// The gateway's side of backend control: the open connections, the revocations, and the command task.
#[derive(Debug)]
pub struct Control {
    registry: Registry,
    revocations: Revocations,
    gateway: Arc<str>,
    prefix: String,
    enabled: bool,
    max_pending: usize,
    rate: NonZeroU32,
    connect_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Control {
    /// For `config`, on gateway `gateway`.
    pub fn new(config: &Config, gateway: Arc<str>, metrics: Arc<Metrics>) -> Self {
        Self {
            registry: Registry::default(),
            revocations: Revocations::new(&config.auth),
            gateway,
            prefix: config.nats.control_prefix.clone(),
            enabled: config.nats.control,
            max_pending: config.nats.control_max_pending_per_connection,
            rate: NonZeroU32::new(config.nats.control_commands_per_second).unwrap_or(NonZeroU32::MIN),
            connect_timeout: config.nats.connect_timeout,
            metrics,
        }
    }

    /// This gateway's open connections.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The revocations known here.
    pub fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    /// Whether `identity`'s token is revoked now.
    pub fn is_revoked(&self, identity: &Identity) -> bool {
        identity.user.is_some() && self.revocations.is_revoked(identity, unix_now())
    }

    /// Whether revocations stored before this gateway started are known (always, with `nats.control = false`).
    pub fn ready(&self) -> bool {
        !self.enabled || self.revocations.loaded()
    }

    /// The control task: until `shutdown`, acts on every command published under the prefix, and keeps the
    /// revocations in step with their bucket. Does nothing with `nats.control = false`.
    pub async fn run(self: Arc<Self>, client: async_nats::Client, shutdown: CancellationToken) {
        if !self.enabled {
            return;
        }
        let revocations = {
            let this = self.clone();
            let client = client.clone();
            let shutdown = shutdown.clone();
            async move { this.keep_revocations(client, shutdown).await }
        };
        let subject = format!("{}.*", self.prefix);
        let mut sub = loop {
            match client.subscribe(subject.clone()).await {
                Ok(sub) => break sub,
                Err(e) => {
                    tracing::warn!(error = %e, subject, "control subscription failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        let limiter: DefaultDirectRateLimiter = RateLimiter::direct(Quota::per_second(self.rate));
        let commands = async {
            while let Some(msg) = sub.next().await {
                let name = msg.subject.as_str().rsplit('.').next().unwrap_or("");
                if limiter.check().is_err() {
                    self.metrics.control_commands.inc(ControlOutcome::RateLimited);
                    tracing::warn!(command = %name.escape_debug(), "control command dropped: over nats.control_commands_per_second");
                    continue;
                }
                match command::parse(name, &msg.payload) {
                    Ok(cmd) => self.act(cmd).await,
                    Err(e) => {
                        let outcome = match e {
                            CommandError::Unknown(_) => ControlOutcome::Unknown,
                            CommandError::Malformed { .. } => ControlOutcome::Malformed,
                        };
                        self.metrics.control_commands.inc(outcome);
                        tracing::warn!(error = %e, "control command refused");
                    }
                }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = commands => {}
            _ = revocations => {}
        }
    }

    /// Acts on one checked command on this gateway's connections.
    pub async fn act(&self, cmd: Command) {
        let outcome = match &cmd {
            Command::Disconnect { target, reason } => {
                let entries = match target {
                    Target::User(user) => self.registry.of_user(user),
                    Target::Conn(conn) => command::local_conn(conn, &self.gateway)
                        .and_then(|id| self.registry.get(id))
                        .into_iter()
                        .collect(),
                };
                let reason = reason.clone().map_or(DISCONNECT_REASON.into(), Into::into);
                for e in &entries {
                    e.outbox.close(CloseRequest {
                        code: close::DISCONNECTED,
                        reason: std::borrow::Cow::clone(&reason),
                        flush_queued: true,
                    });
                }
                tracing::info!(?target, closed = entries.len(), "disconnect command");
                ControlOutcome::Disconnect
            }
            Command::Subscribe { user, room } | Command::Unsubscribe { user, room } => {
                let room: Arc<str> = room.as_str().into();
                let (directive, outcome) = match cmd {
                    Command::Subscribe { .. } => (Directive::Join(room), ControlOutcome::Subscribe),
                    _ => (Directive::Leave(room), ControlOutcome::Unsubscribe),
                };
                for e in self.registry.of_user(user) {
                    if !e.outbox.push_directive(directive.clone(), self.max_pending) {
                        self.metrics.control_commands.inc(ControlOutcome::Full);
                        tracing::warn!(
                            user,
                            "room command dropped: the connection has nats.control_max_pending_per_connection waiting"
                        );
                    }
                }
                outcome
            }
            Command::Revoke(r) => {
                let now = unix_now();
                match self.revocations.insert(r, now) {
                    Ok(()) => {
                        if let Err(e) = self.revocations.store(r, now).await {
                            tracing::warn!(error = %e, "revocation kept in memory only");
                        }
                    }
                    Err(NotKept::Expired) => {}
                    Err(NotKept::Full) => {
                        self.metrics.control_commands.inc(ControlOutcome::Full);
                        tracing::error!("revocation refused: auth.max_revocations reached (connections still closed)");
                    }
                }
                // By user through the users index; by `jti` a scan of the registry (a jti names no user).
                let entries: Vec<Entry> = match r {
                    Revocation::User { user, .. } => self
                        .registry
                        .of_user(user)
                        .into_iter()
                        .filter(|e| revoked_entry(r, e))
                        .collect(),
                    Revocation::Jti { .. } => self.registry.matching(|e| revoked_entry(r, e)),
                };
                for e in &entries {
                    e.outbox.close(CloseRequest {
                        code: close::TOKEN_EXPIRED,
                        reason: REVOKED_REASON.into(),
                        flush_queued: true,
                    });
                }
                tracing::info!(closed = entries.len(), "revoke command");
                ControlOutcome::Revoke
            }
        };
        self.metrics.control_commands.inc(outcome);
    }

    /// Opens the revocation bucket and follows it, reopening it whenever the watch ends; with a NATS server without
    /// JetStream (or a NATS user without access to it), revocations are kept in memory only (an error in the log,
    /// retried every 30 s).
    async fn keep_revocations(&self, client: async_nats::Client, shutdown: CancellationToken) {
        let js = jetstream::new(client);
        loop {
            let wait = match self.revocations.open(&js, self.connect_timeout).await {
                Ok(watch) => {
                    tracing::info!("revocation bucket loaded");
                    self.revocations.follow(watch).await;
                    Duration::from_secs(1)
                }
                Err(e) if jetstream_unusable(&e.0) => {
                    if !self.revocations.loaded() {
                        tracing::error!(error = %e, "revocations kept in memory only: JetStream is not available \
                            to this gateway (gateways started later will not know them)");
                    }
                    self.revocations.set_loaded();
                    Duration::from_secs(30)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "revocation bucket not open yet; retrying");
                    Duration::from_secs(2)
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// Whether a KV error says JetStream cannot be used at all (not enabled, not permitted), rather than not yet.
fn jetstream_unusable(error: &str) -> bool {
    let e = error.to_ascii_lowercase();
    e.contains("jetstream unavailable")
        || e.contains("no responders")
        || e.contains("not enabled")
        || e.contains("permission")
}

/// Whether the connection of `e` is authenticated by a token `r` revokes.
fn revoked_entry(r: &Revocation, e: &Entry) -> bool {
    let Some(t) = &e.token else { return false };
    match r {
        Revocation::Jti { jti, .. } => t.jti.as_deref() == Some(jti.as_str()),
        Revocation::User { user, issued_before } => {
            &*t.user == user.as_str() && t.issued_at.is_none_or(|iat| iat < *issued_before)
        }
    }
}
