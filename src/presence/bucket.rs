//! The presence bucket and the handle the rooms and connections use ([`Presence`]): this gateway instance's id, the
//! bucket's setup at start ([`Presence::ensure`]), writes and removals of this instance's entries, and reads of a
//! room's entries (a live watch, [`Presence::watch`], or one bounded read, [`Presence::read`]).
//!
//! Expiry: the bucket's `max_age` is `presence.ttl`, and it is made with limit markers (ADR-48,
//! `subject_delete_marker_ttl`): when an entry ages out, the server leaves a marker (`Nats-Marker-Reason: MaxAge`)
//! that watchers receive, so a gateway that died without removing its entries is seen as `gateway_lost` by every
//! other gateway at most `ttl` after its last refresh. An entry removed by its gateway (a `KV-Operation: DEL`) is a
//! `disconnect`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwapOption;
use async_nats::{
    HeaderMap,
    jetstream::{
        self,
        consumer::{DeliverPolicy, ReplayPolicy, push},
        kv,
    },
};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::time::Instant;

use super::{
    entry::{self, Departure, Value},
    view::{Change, MAX_ENTRIES, Summary, View},
};
use crate::{config::PresenceConfig, metrics::Metrics};

/// Why presence could not be read or set up.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    /// The bucket is not there (no JetStream, not created yet, or `manage_bucket = false` and missing).
    #[error("presence bucket unavailable")]
    Unavailable,
    /// JetStream did not answer in time.
    #[error("JetStream did not answer in time")]
    Timeout,
    /// The JetStream API refused or failed.
    #[error("JetStream: {0}")]
    Api(String),
}

/// The presence bucket and what the rooms and connections need from it.
pub struct Presence {
    cfg: PresenceConfig,
    /// This gateway's id (the `gw` of the values it writes).
    gateway: Arc<str>,
    /// This run of the gateway: `<gateway id>-<16 random hex digits>`, new on every start, so a restarted gateway
    /// never writes over (or resurrects) the entries of its previous run; those expire on their own.
    instance: Arc<str>,
    js: jetstream::Context,
    client: async_nats::Client,
    /// The bucket once set up; `None` while it is not (no JetStream: presence ops answer `unavailable`).
    store: ArcSwapOption<kv::Store>,
    metrics: Arc<Metrics>,
    /// Test hook ([`Presence::vanish`]): stop every write and removal, as if the process had been killed.
    vanished: AtomicBool,
    /// Reads of rooms without local members at once (`presence.max_concurrent_reads`): each costs a consumer.
    reads: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presence")
            .field("bucket", &self.cfg.bucket)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

/// Time JetStream gets for one presence request (a write, a removal, a read's consumer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

impl Presence {
    /// The presence of `cfg` over `client`, for gateway `gateway`; no I/O until [`Presence::ensure`].
    pub fn new(client: async_nats::Client, cfg: &PresenceConfig, gateway: &Arc<str>, metrics: Arc<Metrics>) -> Self {
        let js = jetstream::ContextBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .build(client.clone());
        Self {
            instance: format!("{gateway}-{:016x}", rand::random::<u64>()).into(),
            gateway: gateway.clone(),
            cfg: cfg.clone(),
            js,
            client,
            store: ArcSwapOption::empty(),
            metrics,
            vanished: AtomicBool::new(false),
            reads: Arc::new(tokio::sync::Semaphore::new(cfg.max_concurrent_reads)),
        }
    }

    /// `[presence]`.
    pub fn config(&self) -> &PresenceConfig {
        &self.cfg
    }

    /// Whether `room` has presence.
    pub fn covers(&self, room: &str) -> bool {
        self.cfg.covers(room)
    }

    /// This gateway's id.
    pub fn gateway(&self) -> &Arc<str> {
        &self.gateway
    }

    /// This run's instance id (the second part of every key it writes).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Whether the bucket is set up.
    pub fn is_available(&self) -> bool {
        self.store.load().is_some()
    }

    /// The bucket configuration `[presence]` asks for.
    pub fn bucket_config(&self) -> kv::Config {
        let max_value = (self.cfg.max_members.saturating_mul(512) + 65_536).min(1 << 20);
        kv::Config {
            bucket: self.cfg.bucket.clone(),
            description: "Roomwire presence: one key per (room, gateway instance)".into(),
            history: 1,
            max_age: self.cfg.ttl,
            max_value_size: max_value as i32,
            storage: jetstream::stream::StorageType::Memory,
            num_replicas: self.cfg.replicas,
            limit_markers: Some(self.cfg.ttl),
            ..Default::default()
        }
    }

    /// Creates or updates the bucket (`manage_bucket`), or opens the existing one.
    pub async fn ensure(&self) -> Result<(), PresenceError> {
        let store = if self.cfg.manage_bucket {
            self.js
                .create_or_update_key_value(self.bucket_config())
                .await
                .map_err(|e| PresenceError::Api(format!("creating or updating bucket {:?}: {e}", self.cfg.bucket)))?
        } else {
            self.js
                .get_key_value(&self.cfg.bucket)
                .await
                .map_err(|e| PresenceError::Api(format!("opening bucket {:?}: {e}", self.cfg.bucket)))?
        };
        self.store.store(Some(Arc::new(store)));
        Ok(())
    }

    /// Keeps trying [`Presence::ensure`] every `ttl / 3` until it works or `shutdown` (NATS was not reachable at
    /// start, or JetStream was not ready).
    pub async fn ensure_later(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        while !self.is_available() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.cfg.ttl / 3) => {}
            }
            match self.ensure().await {
                Ok(()) => tracing::info!(bucket = %self.cfg.bucket, "presence bucket set up"),
                Err(e) => tracing::debug!(error = %e, "presence bucket not set up yet"),
            }
        }
    }

    /// Test hook standing for `kill -9`: from now on this gateway writes and removes nothing, so its entries expire
    /// in the bucket as a dead gateway's would.
    #[doc(hidden)]
    pub fn vanish(&self) {
        self.vanished.store(true, Ordering::Relaxed);
    }

    /// Writes this instance's entry for `room`. One write per call; the caller coalesces. Returns the write's
    /// stream sequence (`None`: nothing written, [`Presence::vanish`]).
    pub async fn put(&self, room: &str, value: &Value) -> Result<Option<u64>, PresenceError> {
        if self.vanished.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let store = self.store.load_full().ok_or(PresenceError::Unavailable)?;
        let bytes = Bytes::from(serde_json::to_vec(value).map_err(|e| PresenceError::Api(e.to_string()))?);
        self.metrics.presence_writes.inc();
        let seq = store
            .put(entry::key(room, &self.instance), bytes)
            .await
            .map_err(|e| PresenceError::Api(e.to_string()))?;
        Ok(Some(seq))
    }

    /// Removes this instance's entry for `room` (watchers see its members leave with `disconnect`).
    pub async fn remove(&self, room: &str) -> Result<(), PresenceError> {
        if self.vanished.load(Ordering::Relaxed) {
            return Ok(());
        }
        let store = self.store.load_full().ok_or(PresenceError::Unavailable)?;
        self.metrics.presence_writes.inc();
        store
            .delete(entry::key(room, &self.instance))
            .await
            .map_err(|e| PresenceError::Api(e.to_string()))
    }

    /// Starts a watch of every entry of `room`: the latest of each key (the snapshot, `pending` messages), then every
    /// change. An ordered consumer: it recreates itself after a NATS reconnect.
    pub async fn watch(&self, room: &str) -> Result<Watch, PresenceError> {
        let store = self.store.load_full().ok_or(PresenceError::Unavailable)?;
        let consumer = store
            .stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                description: Some("roomwire presence watch".into()),
                filter_subject: format!("{}{}.*", store.prefix, entry::room_token(room)),
                replay_policy: ReplayPolicy::Instant,
                deliver_policy: DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(|e| PresenceError::Api(e.to_string()))?;
        let pending = consumer.cached_info().num_pending;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| PresenceError::Api(e.to_string()))?;
        Ok(Watch {
            pending,
            messages,
            prefix: store.prefix.clone(),
            max_members: self.cfg.max_members,
        })
    }

    /// Reads every entry of `room` once (a room without local members): at most [`MAX_ENTRIES`] entries, until
    /// `deadline`.
    pub async fn read(&self, room: &str, deadline: Instant) -> Result<Summary, PresenceError> {
        let read = async {
            let _slot = self.reads.acquire().await.map_err(|_| PresenceError::Unavailable)?;
            let mut watch = self.watch(room).await?;
            let mut view = View::new(self.cfg.max_members);
            let mut left = watch.pending.min(MAX_ENTRIES as u64);
            while left > 0 {
                let Some(item) = watch.next().await else { break };
                let Some(seen) = item else { continue };
                view.apply(&seen.key, seen.change);
                left -= 1;
                if seen.pending == 0 {
                    break;
                }
            }
            Ok(view.summary())
        };
        tokio::time::timeout_at(deadline, read)
            .await
            .unwrap_or(Err(PresenceError::Timeout))
    }
}

/// One change seen by a [`Watch`].
#[derive(Debug)]
pub struct Seen {
    /// The entry's key within the room (the gateway instance).
    pub key: String,
    /// What happened to it.
    pub change: Change,
    /// Messages still to come that existed when this one was delivered (0: caught up).
    pub pending: u64,
    /// The message's stream sequence.
    pub seq: u64,
}

/// A watch of one room's entries ([`Presence::watch`]).
pub struct Watch {
    /// Entries in the snapshot when the watch started.
    pub pending: u64,
    messages: push::Ordered,
    prefix: String,
    max_members: usize,
}

impl Watch {
    /// The next change: `None` when the watch ended, `Some(None)` for a message that is not a usable entry.
    pub async fn next(&mut self) -> Option<Option<Seen>> {
        let msg = match self.messages.next().await? {
            Ok(msg) => msg,
            Err(e) => {
                tracing::debug!(error = %e, "presence watch error");
                return Some(None);
            }
        };
        let (pending, seq) = msg.info().map_or((0, 0), |i| (i.pending, i.stream_sequence));
        let key = msg.subject.strip_prefix(self.prefix.as_str()).unwrap_or_default();
        let Some((_room, instance)) = key.split_once('.') else {
            return Some(None);
        };
        let change = match operation(msg.headers.as_ref()) {
            Op::Put => match Value::parse(&msg.payload, self.max_members) {
                Some(v) => Change::Put(v),
                None => return Some(None),
            },
            Op::Removed => Change::Gone(Departure::Disconnect),
            Op::Expired => Change::Gone(Departure::GatewayLost),
        };
        Some(Some(Seen {
            key: instance.to_owned(),
            change,
            pending,
            seq,
        }))
    }
}

enum Op {
    Put,
    Removed,
    Expired,
}

/// What a KV message is: a put, a removal (`KV-Operation: DEL`/`PURGE`), or an expiry marker (`Nats-Marker-Reason:
/// MaxAge`, ADR-48).
fn operation(headers: Option<&HeaderMap>) -> Op {
    let Some(h) = headers else { return Op::Put };
    if let Some(op) = h.get("KV-Operation") {
        return match op.as_str() {
            "DEL" | "PURGE" => Op::Removed,
            _ => Op::Put,
        };
    }
    match h.get("Nats-Marker-Reason").map(|r| r.as_str()) {
        Some("MaxAge") => Op::Expired,
        Some(_) => Op::Removed,
        None => Op::Put,
    }
}
