//! The history stream and the handle the connections use ([`History`]): the stream's configuration, its creation or
//! check at start ([`History::ensure`]) and its upkeep ([`History::maintain`]: the epoch, a deleted stream created
//! again), the live subject of a history room, the read slots (`history.max_concurrent_reads`) and the message ids
//! JetStream dedupes on. What the stream is for, and how rooms use it, is in `history`'s module doc.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use async_nats::jetstream::{
    self,
    stream::{Config as StreamConfig, DiscardPolicy, Republish, StorageType},
};
use parking_lot::RwLock;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

use super::replay::{ReplayConfig, Replayer};
use crate::{config::HistoryConfig, protocol};

/// Why the history stream cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// `manage_stream = false` and the stream is missing.
    #[error("history stream {0:?} does not exist (history.manage_stream = false, so the gateway does not create it)")]
    Missing(String),
    /// `manage_stream = false` and the stream's settings differ from `[history]`.
    #[error("history stream {stream:?} does not match [history]: {differences}")]
    Mismatch {
        /// Stream name.
        stream: String,
        /// Every difference, `key: stream has X, config wants Y`.
        differences: String,
    },
    /// The JetStream API refused or failed.
    #[error("JetStream: {0}")]
    Api(String),
}

/// The history stream and what the connections need from it.
pub struct History {
    cfg: HistoryConfig,
    subject_prefix: String,
    js: jetstream::Context,
    replayer: Replayer,
    /// The stream's epoch once known (`None` until the stream could be read).
    epoch: RwLock<Option<Arc<str>>>,
    /// `history.max_concurrent_reads`.
    reads: Arc<Semaphore>,
    /// Source of gateway-made message ids (publishes without a client `msg_id`).
    next_id: AtomicU64,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History")
            .field("stream", &self.cfg.stream)
            .field("epoch", &self.epoch())
            .finish_non_exhaustive()
    }
}

impl History {
    /// The history of `cfg` over `client`; no I/O until [`History::ensure`].
    pub fn new(client: async_nats::Client, cfg: &HistoryConfig, subject_prefix: &str) -> Self {
        let replay = ReplayConfig {
            cache_bytes: cfg.replay_cache_bytes,
            cache_entries: cfg.replay_cache_rooms,
            cache_ttl: cfg.replay_cache_ttl,
            max_inflight: cfg.replay_max_inflight,
            max_read: cfg.max_recover,
            max_messages_per_room: u64::from(cfg.max_messages_per_room),
            batch: cfg.replay_batch,
            batch_bytes: cfg.replay_batch_bytes,
        };
        let js = jetstream::ContextBuilder::new()
            .timeout(cfg.recover_timeout)
            .build(client.clone());
        Self {
            replayer: Replayer::new(client, cfg.stream.clone(), &replay),
            js,
            subject_prefix: subject_prefix.to_owned(),
            epoch: RwLock::new(None),
            reads: Arc::new(Semaphore::new(cfg.max_concurrent_reads)),
            next_id: AtomicU64::new(1),
            cfg: cfg.clone(),
        }
    }

    /// `[history]`.
    pub fn config(&self) -> &HistoryConfig {
        &self.cfg
    }

    /// Whether `room` is a history room.
    pub fn covers(&self, room: &str) -> bool {
        self.cfg.covers(room)
    }

    /// The JetStream context (publishes to the stream).
    pub fn js(&self) -> &jetstream::Context {
        &self.js
    }

    /// The reader of stored messages.
    pub fn replayer(&self) -> &Replayer {
        &self.replayer
    }

    /// The subject a history room's live messages are republished to.
    pub fn live_subject(&self, room: &str) -> String {
        format!(
            "{}.{}",
            self.cfg.live_prefix,
            protocol::room_subject(&self.subject_prefix, room)
        )
    }

    /// The stream's current epoch, if known.
    pub fn epoch(&self) -> Option<Arc<str>> {
        self.epoch.read().clone()
    }

    /// A message id for a publish to `room`: the client's `msg_id` scoped to its user (or, for an anonymous client,
    /// to its connection, so one anonymous client cannot suppress another's messages by guessing ids) and to the
    /// room, else a fresh one. JetStream dedupes on this id across the whole stream, so the scope must be part of it
    /// and must be unambiguous: every scope part is length-prefixed (`u:5:alice:5:lobby:m1`), since users, rooms and
    /// `msg_id`s may all contain `:` (`alice` + `x:m1` and `alice:x` + `m1` used to make the same id).
    pub fn msg_id(&self, user: Option<&str>, conn: &str, room: &str, client_id: Option<&str>) -> String {
        match client_id {
            Some(m) => scoped_msg_id(user, conn, room, m),
            None => format!("g:{conn}:{}", self.next_id.fetch_add(1, Relaxed)),
        }
    }

    /// A read slot (`history.max_concurrent_reads`), waiting at most until `deadline`.
    pub async fn read_slot(&self, deadline: Instant) -> Option<OwnedSemaphorePermit> {
        tokio::time::timeout_at(deadline, self.reads.clone().acquire_owned())
            .await
            .ok()?
            .ok()
    }

    /// The stream configuration `[history]` asks for.
    pub fn stream_config(&self) -> StreamConfig {
        let rooms = format!("{}.*", self.subject_prefix);
        StreamConfig {
            name: self.cfg.stream.clone(),
            subjects: vec![rooms.clone()],
            max_messages_per_subject: i64::from(self.cfg.max_messages_per_room),
            max_age: self.cfg.max_age,
            num_replicas: self.cfg.replicas,
            duplicate_window: self.cfg.duplicate_window,
            storage: StorageType::File,
            discard: DiscardPolicy::Old,
            allow_direct: true,
            republish: Some(Republish {
                source: rooms,
                destination: format!("{}.{}.{{{{wildcard(1)}}}}", self.cfg.live_prefix, self.subject_prefix),
                headers_only: false,
            }),
            ..Default::default()
        }
    }

    /// Creates or updates the stream (`manage_stream`), or checks that it exists and matches; then reads the epoch.
    pub async fn ensure(&self) -> Result<(), HistoryError> {
        let want = self.stream_config();
        let info = if self.cfg.manage_stream {
            self.js
                .create_or_update_stream(want)
                .await
                .map_err(|e| HistoryError::Api(format!("creating or updating stream {:?}: {e}", self.cfg.stream)))?
        } else {
            let mut stream = self.js.get_stream(&self.cfg.stream).await.map_err(|e| {
                if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(_)) {
                    HistoryError::Missing(self.cfg.stream.clone())
                } else {
                    HistoryError::Api(e.to_string())
                }
            })?;
            let info = stream
                .info()
                .await
                .map_err(|e| HistoryError::Api(e.to_string()))?
                .clone();
            let differences = differences(&info.config, &want);
            if !differences.is_empty() {
                return Err(HistoryError::Mismatch {
                    stream: self.cfg.stream.clone(),
                    differences: differences.join("; "),
                });
            }
            info
        };
        self.set_epoch(&info);
        Ok(())
    }

    /// Reads the stream's creation time again and updates the epoch.
    pub async fn refresh_epoch(&self) -> Result<(), HistoryError> {
        let mut stream = self
            .js
            .get_stream(&self.cfg.stream)
            .await
            .map_err(|e| HistoryError::Api(e.to_string()))?;
        let info = stream.info().await.map_err(|e| HistoryError::Api(e.to_string()))?;
        self.set_epoch(info);
        Ok(())
    }

    fn set_epoch(&self, info: &jetstream::stream::Info) {
        let epoch: Arc<str> = format!("{:x}", info.created.unix_timestamp_nanos()).into();
        let mut current = self.epoch.write();
        if current.as_deref() != Some(&*epoch) {
            if current.is_some() {
                tracing::warn!(stream = %self.cfg.stream, %epoch, "history stream was recreated: new epoch");
            }
            *current = Some(epoch);
        }
    }

    /// Keeps the stream (and its epoch) current until `shutdown`: every `epoch_refresh`, and at once after NATS
    /// was unreachable at start. With `manage_stream`, a stream deleted under the gateway is created again.
    pub async fn maintain(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut every = tokio::time::interval(self.cfg.epoch_refresh);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            let result = if self.cfg.manage_stream || self.epoch().is_none() {
                self.ensure().await
            } else {
                self.refresh_epoch().await
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "history stream not available");
            }
        }
    }
}

/// Stream settings that differ from what `[history]` asks for, each as `key: stream has X, config wants Y`.
fn differences(have: &StreamConfig, want: &StreamConfig) -> Vec<String> {
    let mut out = Vec::new();
    let mut check = |key: &str, have: String, want: String| {
        if have != want {
            out.push(format!("{key}: stream has {have}, config wants {want}"));
        }
    };
    check(
        "subjects (covering the room subjects)",
        format!("{:?}", have.subjects.iter().any(|s| want.subjects.contains(s))),
        "true".into(),
    );
    check(
        "max_msgs_per_subject (history.max_messages_per_room)",
        have.max_messages_per_subject.to_string(),
        want.max_messages_per_subject.to_string(),
    );
    check(
        "max_age (history.max_age)",
        fmt_duration(have.max_age),
        fmt_duration(want.max_age),
    );
    check(
        "num_replicas (history.replicas)",
        have.num_replicas.to_string(),
        want.num_replicas.to_string(),
    );
    check("allow_direct", have.allow_direct.to_string(), "true".into());
    check(
        "republish (history.live_prefix)",
        format!(
            "{:?}",
            have.republish
                .as_ref()
                .map(|r| (&r.source, &r.destination, r.headers_only))
        ),
        format!(
            "{:?}",
            want.republish
                .as_ref()
                .map(|r| (&r.source, &r.destination, r.headers_only))
        ),
    );
    out
}

fn fmt_duration(d: Duration) -> String {
    format!("{d:?}")
}

/// A client's `msg_id` scoped to its user (else its connection) and room, each scope part length-prefixed so that no
/// two different (scope, room, id) give the same string.
fn scoped_msg_id(user: Option<&str>, conn: &str, room: &str, m: &str) -> String {
    match user {
        Some(user) => format!("u:{}:{user}:{}:{room}:{m}", user.len(), room.len()),
        None => format!("c:{}:{conn}:{}:{room}:{m}", conn.len(), room.len()),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::scoped_msg_id;

    #[test]
    fn the_issues_collisions_are_gone() {
        assert_ne!(
            scoped_msg_id(Some("alice"), "gw-1", "lobby", "x:m1"),
            scoped_msg_id(Some("alice:x"), "gw-1", "lobby", "m1"),
            "user alice with x:m1 against user alice:x with m1"
        );
        assert_ne!(
            scoped_msg_id(Some("alice"), "gw-1", "a", "m1"),
            scoped_msg_id(Some("alice"), "gw-1", "b", "m1"),
            "one user's msg_id reused in a second room"
        );
        assert_ne!(
            scoped_msg_id(Some("gw-1"), "gw-1", "a", "m1"),
            scoped_msg_id(None, "gw-1", "a", "m1"),
            "a user named like a connection"
        );
    }

    proptest! {
        /// Different scopes, rooms or ids never make the same id, whatever `:` they contain.
        #[test]
        fn scoped_ids_are_injective(
            a in (proptest::option::of("[a:]{0,4}"), "[a:]{1,4}", "[a:]{1,4}", "[a:]{1,4}"),
            b in (proptest::option::of("[a:]{0,4}"), "[a:]{1,4}", "[a:]{1,4}", "[a:]{1,4}"),
        ) {
            let id = |(u, c, r, m): &(Option<String>, String, String, String)| {
                // The connection only scopes anonymous clients.
                let scope = match u { Some(u) => (Some(u.clone()), String::new()), None => (None, c.clone()) };
                (scope, r.clone(), m.clone(), scoped_msg_id(u.as_deref(), c, r, m))
            };
            let (sa, ra, ma, ia) = id(&a);
            let (sb, rb, mb, ib) = id(&b);
            prop_assert_eq!(ia == ib, (sa, ra, ma) == (sb, rb, mb));
        }
    }
}
