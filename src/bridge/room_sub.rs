//! Room subscriptions: [`Bridge::subscribe`] (which waits for a round trip so the server has the SUB before the
//! join is acked), [`RoomSub`] (a room's live subscription), and the bookkeeping that lets a server's refusal or
//! removal of a subscription end its room: the subject → generation and cancellation map ([`Subjects`]) the event
//! callback reads, the parsing of nats-server's refusal text, and the subscription id read for slow-consumer logs.

use std::{collections::HashMap, sync::Arc};

use async_nats::Subscriber;
use bytes::Bytes;
use parking_lot::Mutex;

use super::{Bridge, BridgeError};

pub(super) type Subjects = Arc<Mutex<HashMap<String, SubEntry>>>;

/// What the event callback needs to end one room subscription.
#[derive(Debug)]
pub(super) struct SubEntry {
    pub(super) generation: u64,
    /// Known once async-nats has handed out the `Subscriber`; lets a reload's report (which names the sid) end
    /// exactly the subscription it removed, not a newer one on the same subject.
    pub(super) sid: Option<u64>,
    pub(super) token: tokio_util::sync::CancellationToken,
}

/// Source of [`RoomSub`] generations (unique per process).
static NEXT_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A room's live NATS subscription. [`RoomSub::next`] ends (`None`) when async-nats ends the subscription or when the
/// server reports that it refused or removed it; dropping it unsubscribes and forgets its bookkeeping.
#[derive(Debug)]
pub struct RoomSub {
    /// `None` only while [`Bridge::subscribe`] is still making it.
    sub: Option<Subscriber>,
    subject: String,
    generation: u64,
    sid: Option<u64>,
    /// Cancelled by the event callback when the server refuses or removes this subscription.
    denied: tokio_util::sync::CancellationToken,
    sids: Arc<Mutex<HashMap<u64, Arc<str>>>>,
    subjects: Subjects,
}

impl RoomSub {
    /// The next message, or `None` once the subscription is over (whoever ended it).
    pub async fn next(&mut self) -> Option<async_nats::Message> {
        let sub = self.sub.as_mut()?;
        tokio::select! {
            biased;
            _ = self.denied.cancelled() => None,
            msg = futures_util::StreamExt::next(sub) => msg,
        }
    }

    /// Whether the server reported that it refused or removed this subscription.
    pub fn denied(&self) -> bool {
        self.denied.is_cancelled()
    }
}

impl Drop for RoomSub {
    fn drop(&mut self) {
        if let Some(sid) = self.sid {
            self.sids.lock().remove(&sid);
        }
        let mut subjects = self.subjects.lock();
        if subjects
            .get(&self.subject)
            .is_some_and(|e| e.generation == self.generation)
        {
            subjects.remove(&self.subject);
        }
        // Dropping `sub` (after this) unsubscribes on NATS.
    }
}

impl Bridge {
    /// Subscribes to a room's subject and waits until the server has the subscription (a round trip, see
    /// `Bridge::round_trip`), so a message published by anyone right after the client's join ack is delivered.
    pub async fn subscribe(&self, subject: String, room: &Arc<str>) -> Result<RoomSub, BridgeError> {
        if !self.is_connected() {
            return Err(BridgeError::Disconnected);
        }
        // Registered before the SUB is sent, so a refusal the server sends in answer to it is not missed.
        let denied = tokio_util::sync::CancellationToken::new();
        let generation = NEXT_GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.subjects.lock().insert(
            subject.clone(),
            SubEntry {
                generation,
                sid: None,
                token: denied.clone(),
            },
        );
        let mut room_sub = RoomSub {
            sub: None,
            subject,
            generation,
            sid: None,
            denied,
            sids: self.sids.clone(),
            subjects: self.subjects.clone(),
        };
        let op = async {
            let sub = self
                .client
                .subscribe(room_sub.subject.clone())
                .await
                .map_err(|e| BridgeError::Other(e.to_string()))?;
            room_sub.sid = subscriber_sid(&sub);
            room_sub.sub = Some(sub);
            if let Some(e) = self.subjects.lock().get_mut(&room_sub.subject)
                && e.generation == generation
            {
                e.sid = room_sub.sid;
            }
            self.round_trip().await
        };
        // On any error `room_sub` is dropped here, which unsubscribes and forgets it.
        tokio::time::timeout(self.timeout, op)
            .await
            .map_err(|_| BridgeError::Timeout)??;
        if room_sub.denied.is_cancelled() {
            return Err(BridgeError::Refused);
        }
        if let Some(sid) = room_sub.sid {
            self.sids.lock().insert(sid, room.clone());
        }
        Ok(room_sub)
    }

    /// Returns once the server has processed every command sent before it on this connection. `flush` only writes
    /// to the socket, and the server may still not have registered a SUB when a publish from another connection
    /// arrives; async-nats exposes no PING, so an empty message to a fresh inbox (`_INBOX.*`) does the round trip.
    async fn round_trip(&self) -> Result<(), BridgeError> {
        let other = |e: &dyn std::fmt::Display| BridgeError::Other(e.to_string());
        let inbox = self.client.new_inbox();
        let mut probe = self.client.subscribe(inbox.clone()).await.map_err(|e| other(&e))?;
        self.client.publish(inbox, Bytes::new()).await.map_err(|e| other(&e))?;
        self.client.flush().await.map_err(|e| other(&e))?;
        match futures_util::StreamExt::next(&mut probe).await {
            Some(_) => Ok(()),
            None => Err(BridgeError::Disconnected),
        }
    }
}

/// The subject (and sid, when given) of a server error that reports a refused or removed subscription: nats-server
/// sends `Permissions Violation for Subscription to "<subject>"` when a SUB is not allowed and, after a config
/// reload that revokes it, `... to "<subject>" (sid "<sid>")` for every existing subscription it removes. The text
/// is nats-server's (`server/client.go`); `denied_subscription_parses_server_text` pins the parsing, and a test
/// against a real server reloads permissions to prove it end to end.
pub(super) fn denied_subscription(text: &str) -> Option<(&str, Option<u64>)> {
    let rest = text.trim().trim_matches('\'');
    let prefix = "permissions violation for subscription to ";
    let head = rest.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    // The subject is quoted; a queue-group form adds ` using queue "<q>"` after it.
    let quoted = rest[prefix.len()..].trim().strip_prefix('"')?;
    let (subject, tail) = quoted.split_once('"')?;
    let sid = tail
        .split_once("(sid \"")
        .and_then(|(_, t)| t.split('"').next())
        .and_then(|n| n.parse().ok());
    (!subject.is_empty()).then_some((subject, sid))
}

/// async-nats keeps the subscription id private; its `Debug` output (`Subscriber { sid: N, .. }`) is the only way to
/// learn it, and it is needed only to name the room in slow-consumer logs. Returns None if the format changes;
/// `subscriber_sid_reads_debug_format` pins the format of the async-nats version in use, so an upgrade that changes
/// it fails the tests instead of silently dropping room names from the logs.
fn subscriber_sid(sub: &Subscriber) -> Option<u64> {
    let dbg = format!("{sub:?}");
    let rest = dbg.split("sid: ").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_subscription_parses_server_text() {
        // As async-nats hands over nats-server's `-ERR '...'` text (quotes around the whole text stripped or not).
        let plain = r#"Permissions Violation for Subscription to "rooms.secret""#;
        assert_eq!(denied_subscription(plain), Some(("rooms.secret", None)));
        assert_eq!(denied_subscription(&format!("'{plain}'")), Some(("rooms.secret", None)));
        let queue = r#"Permissions Violation for Subscription to "rooms.a" using queue "q""#;
        assert_eq!(denied_subscription(queue), Some(("rooms.a", None)));
        assert_eq!(
            denied_subscription(r#"permissions violation for subscription to "x.y""#),
            Some(("x.y", None))
        );
        // After a config reload revokes a subscription (nats-server `processSubsOnConfigReload`).
        let reload = r#"Permissions Violation for Subscription to "rooms.secret" (sid "5")"#;
        assert_eq!(denied_subscription(reload), Some(("rooms.secret", Some(5))));
        assert_eq!(
            denied_subscription(r#"Permissions Violation for Publish to "rooms.a""#),
            None
        );
        assert_eq!(denied_subscription("maximum subscriptions exceeded"), None);
        assert_eq!(
            denied_subscription(r#"Permissions Violation for Subscription to """#),
            None
        );
        assert_eq!(denied_subscription("Permissions"), None);
    }

    /// Pins the `Debug` format `subscriber_sid` reads: if an async-nats upgrade changes it, this fails. No server is
    /// needed: with `retry_on_initial_connect` the client hands out subscribers before it is connected.
    #[tokio::test]
    async fn subscriber_sid_reads_debug_format() {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("nats://127.0.0.1:1")
            .await
            .expect("client without a server");
        let a = client.subscribe("a").await.expect("subscribe a");
        let b = client.subscribe("b").await.expect("subscribe b");
        let (sa, sb) = (subscriber_sid(&a), subscriber_sid(&b));
        assert!(sa.is_some() && sb.is_some(), "Debug format changed: {a:?}");
        assert_ne!(sa, sb, "each subscription has its own id");
        assert!(format!("{a:?}").contains(&format!("sid: {}", sa.unwrap_or(0))));
    }
}
