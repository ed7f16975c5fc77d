//! Revoked tokens (`revoke` commands): kept in memory for the checks (every upgrade and `refresh`), and in a JetStream
//! KV bucket (`auth.revocation_bucket`) so that a gateway started later honours them too.
//!
//! Two kinds, as the command gives them:
//! - by `jti`, until a time: key `jti.<base64url(jti)>`, value the `until` (unix seconds);
//! - by user, for tokens issued before a time: key `user.<base64url(user)>.<issued_before>`, value the same time.
//!   Such a revocation matters only while a token issued before it can still be used: `auth.max_session` (plus
//!   `auth.leeway_secs`) after `issued_before`, the longest any session started with such a token lasts. A token with
//!   a later `exp` is refused at the upgrade anyway for as long as the revocation lasts, and
//!   tokens must carry `iat` to escape it (a token without `iat` counts as issued before).
//!
//! Every entry is written with a per-message TTL (ADR-43; the bucket is made with limit markers) ending when the
//! revocation stops mattering, so the bucket empties itself; the memory copy forgets an entry at the same time
//! (checked at each lookup, pruned as it fills). Every gateway receiving a command writes it (the keys are
//! deterministic, so the writes agree; the first creates the key, the others find it there) and every gateway
//! watches the bucket, so a command missed while a gateway was away is still learnt.
//!
//! Bounds: at most `auth.max_revocations` entries in memory, and the bucket's `max_bytes` is sized for as many; a
//! revocation past the bound is refused, logged at error level and counted, never silently dropped.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwapOption;
use async_nats::jetstream::{self, kv};
use base64::Engine;
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;

use super::command::Revocation;
use crate::{auth::Identity, config::AuthConfig};

/// Bytes of bucket storage planned per revocation (key, value, headers and the server's overhead).
const BYTES_PER_ENTRY: i64 = 512;

/// Longest TTL written to the bucket: ten years (a longer `until` is kept in memory as given).
const MAX_TTL_SECS: u64 = 10 * 365 * 86_400;

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The bucket could not be used.
#[derive(Debug, thiserror::Error)]
#[error("revocation bucket: {0}")]
pub struct BucketError(pub String);

/// Why a revocation was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotKept {
    /// It had already expired.
    Expired,
    /// `auth.max_revocations` are kept already.
    Full,
}

#[derive(Debug, Default)]
struct Lists {
    /// `jti` → until (unix seconds).
    jti: HashMap<String, u64>,
    /// user → the latest `issued_before`.
    users: HashMap<String, u64>,
}

impl Lists {
    fn len(&self) -> usize {
        self.jti.len() + self.users.len()
    }

    fn prune(&mut self, now: u64, user_span: u64) {
        self.jti.retain(|_, until| *until > now);
        self.users.retain(|_, before| before.saturating_add(user_span) > now);
    }
}

/// The revocations this gateway knows.
#[derive(Debug)]
pub struct Revocations {
    lists: Mutex<Lists>,
    max: usize,
    /// How long a revocation by user matters after its `issued_before`: `auth.max_session` + `auth.leeway_secs`.
    user_span: u64,
    bucket: String,
    replicas: usize,
    store: ArcSwapOption<kv::Store>,
    /// The bucket's entries have been read once (or there is no bucket to read): the gateway may report ready.
    loaded: AtomicBool,
}

impl Revocations {
    /// Empty, for `[auth]`.
    pub fn new(cfg: &AuthConfig) -> Self {
        Self {
            lists: Mutex::default(),
            max: cfg.max_revocations,
            user_span: cfg.max_session.as_secs().saturating_add(cfg.leeway_secs),
            bucket: cfg.revocation_bucket.clone(),
            replicas: cfg.revocation_replicas,
            store: ArcSwapOption::empty(),
            loaded: AtomicBool::new(false),
        }
    }

    /// Whether `identity`'s token is revoked at `now` (unix seconds).
    pub fn is_revoked(&self, identity: &Identity, now: u64) -> bool {
        let lists = self.lists.lock();
        if let Some(jti) = &identity.jti
            && lists.jti.get(jti).is_some_and(|until| *until > now)
        {
            return true;
        }
        if let Some(user) = &identity.user
            && let Some(&before) = lists.users.get(user)
        {
            return before.saturating_add(self.user_span) > now && identity.issued_at.is_none_or(|iat| iat < before);
        }
        false
    }

    /// Keeps `r` in memory (not in the bucket: [`Revocations::store`]).
    pub fn insert(&self, r: &Revocation, now: u64) -> Result<(), NotKept> {
        let mut lists = self.lists.lock();
        let (known, live) = match r {
            Revocation::Jti { jti, until } => (lists.jti.contains_key(jti), *until > now),
            Revocation::User { user, issued_before } => (
                lists.users.contains_key(user),
                issued_before.saturating_add(self.user_span) > now,
            ),
        };
        if !live {
            return Err(NotKept::Expired);
        }
        if !known && lists.len() >= self.max {
            lists.prune(now, self.user_span);
            if lists.len() >= self.max {
                return Err(NotKept::Full);
            }
        }
        match r {
            Revocation::Jti { jti, until } => {
                let e = lists.jti.entry(jti.clone()).or_insert(0);
                *e = (*e).max(*until);
            }
            Revocation::User { user, issued_before } => {
                let e = lists.users.entry(user.clone()).or_insert(0);
                *e = (*e).max(*issued_before);
            }
        }
        Ok(())
    }

    /// Revocations kept in memory.
    pub fn len(&self) -> usize {
        self.lists.lock().len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the bucket's entries have been read (or there is no bucket to read).
    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Marks the revocations loaded without a bucket (NATS without JetStream: memory only).
    pub fn set_loaded(&self) {
        self.loaded.store(true, Ordering::Release);
    }

    /// The bucket key and TTL of `r` at `now`.
    fn key_and_ttl(&self, r: &Revocation, now: u64) -> (String, u64, Duration) {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let (key, value, end) = match r {
            Revocation::Jti { jti, until } => (format!("jti.{}", b64(jti)), *until, *until),
            Revocation::User { user, issued_before } => (
                format!("user.{}.{issued_before}", b64(user)),
                *issued_before,
                issued_before.saturating_add(self.user_span),
            ),
        };
        // The server takes whole seconds, at least 1; at most ten years (the memory copy keeps a longer one).
        (
            key,
            value,
            Duration::from_secs(end.saturating_sub(now).clamp(1, MAX_TTL_SECS)),
        )
    }

    /// Writes `r` to the bucket (created by the first gateway to get it; the same key from another gateway finds
    /// it there). Nothing happens without a bucket.
    pub async fn store(&self, r: &Revocation, now: u64) -> Result<(), BucketError> {
        let Some(store) = self.store.load_full() else {
            return Ok(());
        };
        let (key, value, ttl) = self.key_and_ttl(r, now);
        match store.create_with_ttl(&key, Bytes::from(value.to_string()), ttl).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(BucketError(e.to_string())),
        }
    }

    /// Learns one bucket entry (a put: kept; a delete or purge of a `jti`: forgotten, so an operator can lift a
    /// revocation by deleting its key). Unknown or malformed keys are ignored.
    fn learn(&self, entry: &kv::Entry, now: u64) {
        let decode = |s: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(s)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
        };
        let value = std::str::from_utf8(&entry.value)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok());
        let parsed = match entry.key.split('.').collect::<Vec<_>>().as_slice() {
            ["jti", j] => decode(j).map(|jti| (jti, true)),
            ["user", u, _] => decode(u).map(|user| (user, false)),
            _ => None,
        };
        let Some((name, is_jti)) = parsed else {
            return;
        };
        match entry.operation {
            kv::Operation::Put => {
                let Some(t) = value else { return };
                let r = match is_jti {
                    true => Revocation::Jti { jti: name, until: t },
                    false => Revocation::User {
                        user: name,
                        issued_before: t,
                    },
                };
                if let Err(NotKept::Full) = self.insert(&r, now) {
                    tracing::error!(
                        max = self.max,
                        "revocation from the bucket not kept: auth.max_revocations reached"
                    );
                }
            }
            kv::Operation::Delete | kv::Operation::Purge if is_jti => {
                self.lists.lock().jti.remove(&name);
            }
            _ => {}
        }
    }

    /// The bucket configuration.
    fn bucket_config(&self) -> kv::Config {
        kv::Config {
            bucket: self.bucket.clone(),
            description: "Roomwire token revocations (revoke commands); entries expire on their own".into(),
            history: 1,
            max_bytes: i64::try_from(self.max)
                .unwrap_or(i64::MAX / BYTES_PER_ENTRY)
                .saturating_mul(BYTES_PER_ENTRY),
            // The stream counts headers (the TTL, the key operation) in the size, not just the value.
            max_value_size: 1024,
            num_replicas: self.replicas,
            // Enables per-message TTLs; markers of expired entries live a minute.
            limit_markers: Some(Duration::from_secs(60)),
            ..Default::default()
        }
    }

    /// Opens the bucket (creating it when missing) and reads every entry in it; returns the watch that goes on with
    /// the changes. Bounded by `timeout`.
    pub async fn open(&self, js: &jetstream::Context, timeout: Duration) -> Result<kv::Watch, BucketError> {
        let open = async {
            let store = match js.get_key_value(&self.bucket).await {
                Ok(s) => s,
                Err(_) => js
                    .create_key_value(self.bucket_config())
                    .await
                    .map_err(|e| BucketError(e.to_string()))?,
            };
            let mut watch = store
                .watch_with_history(">")
                .await
                .map_err(|e| BucketError(e.to_string()))?;
            let status = store.status().await.map_err(|e| BucketError(e.to_string()))?;
            if status.values() > 0 {
                while let Some(entry) = watch.next().await {
                    let entry = entry.map_err(|e| BucketError(e.to_string()))?;
                    self.learn(&entry, unix_now());
                    if entry.delta == 0 {
                        break;
                    }
                }
            }
            self.store.store(Some(Arc::new(store)));
            Ok::<_, BucketError>(watch)
        };
        let watch = tokio::time::timeout(timeout, open)
            .await
            .map_err(|_| BucketError("timed out".into()))??;
        self.set_loaded();
        Ok(watch)
    }

    /// Learns the bucket's changes until the watch ends (an error, a NATS reconnect that ended it).
    pub async fn follow(&self, mut watch: kv::Watch) {
        while let Some(entry) = watch.next().await {
            match entry {
                Ok(entry) => self.learn(&entry, unix_now()),
                Err(e) => {
                    tracing::debug!(error = %e, "revocation watch ended");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AuthConfig, Permissions};

    fn identity(user: &str, jti: Option<&str>, iat: Option<u64>) -> Identity {
        let mut id = Identity::anonymous(&Permissions::default());
        id.user = Some(user.into());
        id.jti = jti.map(str::to_owned);
        id.issued_at = iat;
        id
    }

    #[test]
    fn jti_and_user_revocations_match_and_expire() {
        let cfg = AuthConfig {
            max_session: Duration::from_secs(100),
            leeway_secs: 0,
            ..Default::default()
        };
        let r = Revocations::new(&cfg);
        let now = 1_000;
        r.insert(
            &Revocation::Jti {
                jti: "t1".into(),
                until: 1_050,
            },
            now,
        )
        .unwrap();
        assert!(r.is_revoked(&identity("ann", Some("t1"), Some(900)), now));
        assert!(!r.is_revoked(&identity("ann", Some("t2"), Some(900)), now));
        assert!(
            !r.is_revoked(&identity("ann", Some("t1"), Some(900)), 1_050),
            "until is exclusive"
        );
        r.insert(
            &Revocation::User {
                user: "bob".into(),
                issued_before: 990,
            },
            now,
        )
        .unwrap();
        assert!(r.is_revoked(&identity("bob", None, Some(989)), now));
        assert!(
            r.is_revoked(&identity("bob", None, None), now),
            "no iat counts as before"
        );
        assert!(!r.is_revoked(&identity("bob", None, Some(990)), now));
        assert!(
            !r.is_revoked(&identity("bob", None, Some(100)), 1_090),
            "max_session after issued_before"
        );
        // A later issued_before widens; an earlier one does not narrow.
        r.insert(
            &Revocation::User {
                user: "bob".into(),
                issued_before: 995,
            },
            now,
        )
        .unwrap();
        r.insert(
            &Revocation::User {
                user: "bob".into(),
                issued_before: 10,
            },
            now,
        )
        .unwrap_err();
        assert!(r.is_revoked(&identity("bob", None, Some(993)), now));
    }

    #[test]
    fn the_bound_refuses_and_prunes() {
        let cfg = AuthConfig {
            max_revocations: 2,
            ..Default::default()
        };
        let r = Revocations::new(&cfg);
        let jti = |j: &str, until| Revocation::Jti { jti: j.into(), until };
        r.insert(&jti("a", 20), 10).unwrap();
        r.insert(&jti("b", 30), 10).unwrap();
        assert_eq!(r.insert(&jti("c", 30), 10), Err(NotKept::Full));
        // Updating a known one is no growth.
        r.insert(&jti("b", 40), 10).unwrap();
        // Once `a` expired, room is made.
        r.insert(&jti("c", 30), 25).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r.insert(&jti("d", 5), 10), Err(NotKept::Expired));
    }

    #[test]
    fn keys_are_valid_kv_keys_and_ttls_saturate() {
        let r = Revocations::new(&AuthConfig::default());
        let (key, _, ttl) = r.key_and_ttl(
            &Revocation::Jti {
                jti: "a/b.c*>".into(),
                until: u64::MAX,
            },
            5,
        );
        assert!(
            key.starts_with("jti.")
                && key[4..]
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(ttl, Duration::from_secs(MAX_TTL_SECS));
        let (key, _, ttl) = r.key_and_ttl(
            &Revocation::User {
                user: "x".into(),
                issued_before: 1,
            },
            u64::MAX,
        );
        assert_eq!((key.as_str(), ttl), ("user.eA.1", Duration::from_secs(1)));
    }
}
