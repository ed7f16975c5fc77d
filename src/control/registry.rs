//! This gateway's open connections, found by connection number or by user: what a backend command acts on.
//!
//! A connection registers itself when it starts and unregisters when its state is dropped (however it ends, a panic
//! included), so the index holds exactly the live connections. An entry keeps what commands need and nothing else:
//! the connection's outbox (to close it, or hand it a room change) and the token facts a revocation matches (`jti`,
//! `iat`), updated by `refresh`. Anonymous connections are indexed by number only.
//!
//! Bounds: one entry per open connection (`server.max_connections`), one user key per authenticated user with a
//! connection here.

use std::{collections::HashMap, sync::Arc};

use parking_lot::Mutex;

use crate::outbox::Outbox;

/// What a command needs of one connection. Two words: every open connection has one, anonymous ones included.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The connection's queue: closing it closes the connection; directives reach its task through it.
    pub outbox: Arc<Outbox>,
    /// The token now authenticating the connection; `None` for anonymous connections.
    pub token: Option<Arc<TokenFacts>>,
}

/// What revocations match of a connection's token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFacts {
    /// The JWT `sub`.
    pub user: Arc<str>,
    /// The JWT `jti`.
    pub jti: Option<Arc<str>>,
    /// The JWT `iat`.
    pub issued_at: Option<u64>,
}

impl Entry {
    /// The connection's user, `None` when anonymous.
    pub fn user(&self) -> Option<&str> {
        self.token.as_deref().map(|t| &*t.user)
    }
}

#[derive(Debug, Default)]
struct Inner {
    conns: HashMap<u64, Entry>,
    /// Connection numbers of each user's connections.
    users: HashMap<Arc<str>, Vec<u64>>,
}

/// The index of this gateway's open connections.
#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<Inner>,
}

impl Registry {
    /// Adds connection `id` (replacing an entry of the same number, which cannot be live).
    pub fn insert(&self, id: u64, entry: Entry) {
        let mut inner = self.inner.lock();
        if let Some(token) = &entry.token {
            inner.users.entry(token.user.clone()).or_default().push(id);
        }
        if let Some(old) = inner.conns.insert(id, entry) {
            unlink(&mut inner.users, old.user(), id);
        }
    }

    /// Removes connection `id`.
    pub fn remove(&self, id: u64) {
        let mut inner = self.inner.lock();
        if let Some(old) = inner.conns.remove(&id) {
            unlink(&mut inner.users, old.user(), id);
        }
        if inner.conns.is_empty() && inner.conns.capacity() > 1024 {
            inner.conns.shrink_to_fit();
            inner.users.shrink_to_fit();
        }
    }

    /// Records the token a `refresh` put in place on connection `id` (same user: a refresh cannot change it).
    pub fn update_token(&self, id: u64, token: TokenFacts) {
        if let Some(e) = self.inner.lock().conns.get_mut(&id)
            && e.user() == Some(&*token.user)
        {
            e.token = Some(Arc::new(token));
        }
    }

    /// Connection `id`, if open here.
    pub fn get(&self, id: u64) -> Option<Entry> {
        self.inner.lock().conns.get(&id).cloned()
    }

    /// Every connection of `user` here.
    pub fn of_user(&self, user: &str) -> Vec<Entry> {
        let inner = self.inner.lock();
        inner
            .users
            .get(user)
            .map(|ids| ids.iter().filter_map(|id| inner.conns.get(id)).cloned().collect())
            .unwrap_or_default()
    }

    /// Every connection whose entry matches `pred` (a revocation by `jti` scans: revocations are rare and the scan
    /// holds the lock for a few nanoseconds per connection).
    pub fn matching(&self, mut pred: impl FnMut(&Entry) -> bool) -> Vec<Entry> {
        self.inner.lock().conns.values().filter(|e| pred(e)).cloned().collect()
    }

    /// Open connections indexed.
    pub fn len(&self) -> usize {
        self.inner.lock().conns.len()
    }

    /// Whether no connection is indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn unlink(users: &mut HashMap<Arc<str>, Vec<u64>>, user: Option<&str>, id: u64) {
    let Some(user) = user else { return };
    if let Some(ids) = users.get_mut(user) {
        ids.retain(|&i| i != id);
        if ids.is_empty() {
            users.remove(user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(user: Option<&str>) -> Entry {
        Entry {
            outbox: Arc::new(Outbox::new(4, 1024)),
            token: user.map(|u| {
                Arc::new(TokenFacts {
                    user: u.into(),
                    jti: None,
                    issued_at: None,
                })
            }),
        }
    }

    #[test]
    fn users_index_follows_inserts_and_removals() {
        let r = Registry::default();
        r.insert(1, entry(Some("ann")));
        r.insert(2, entry(Some("ann")));
        r.insert(3, entry(Some("bob")));
        r.insert(4, entry(None));
        assert_eq!((r.len(), r.of_user("ann").len(), r.of_user("bob").len()), (4, 2, 1));
        r.remove(1);
        r.remove(3);
        assert_eq!((r.of_user("ann").len(), r.of_user("bob").len()), (1, 0));
        assert!(
            !r.inner.lock().users.contains_key("bob"),
            "an emptied user key is dropped"
        );
        let facts = |user: &str| TokenFacts {
            user: user.into(),
            jti: Some("j".into()),
            issued_at: Some(5),
        };
        r.update_token(2, facts("mallory"));
        assert!(
            r.get(2).and_then(|e| e.token).is_some_and(|t| t.jti.is_none()),
            "another user's token is ignored"
        );
        r.update_token(2, facts("ann"));
        assert_eq!(
            r.get(2).and_then(|e| e.token).and_then(|t| t.jti.clone()).as_deref(),
            Some("j")
        );
        assert_eq!(
            r.matching(|e| e.token.as_ref().is_some_and(|t| t.issued_at == Some(5)))
                .len(),
            1
        );
        r.remove(2);
        r.remove(4);
        assert!(r.is_empty() && r.inner.lock().users.is_empty());
    }
}
