//! The JetStream side of every history read: batched direct gets, single direct gets and leader gets over one
//! connection, and the parsing of their replies into [`Read`]s. What to read and when (single flight, the cache,
//! truncation, the last N) is decided in `replay` and `segment`; this module only talks to the stream.
//!
//! Reads are JetStream *direct gets* (`$JS.API.DIRECT.GET.<stream>`, ADR-31), never per-client consumers: a direct get
//! is answered by any replica from its local store, without the meta group or the JetStream API queue, and one batched
//! request (`{"seq":S,"next_by_subj":subj,"batch":N,"max_bytes":B}`) returns up to N messages of the subject followed by
//! an end-of-batch status message (`204 EOB`, headers `Nats-Num-Pending` and `Nats-Last-Sequence`). Each batch uses
//! its own inbox subscription, and every wait is bounded by the caller's absolute deadline.
//!
//! A replica may lag: it answers from a store that does not hold `up_to` yet. That shows as a batch that ends
//! (`Nats-Num-Pending: 0`, or 404) before `up_to`; the rest is then read from the stream leader with
//! `$JS.API.STREAM.MSG.GET.<stream>` (read-after-write coherent, one message per request), so a lagging replica never
//! produces a silent gap. The same leader path serves a stream without `allow_direct` (no responders to the direct
//! get): it is correct but costs one JetStream API request per message, so the gateway's own stream always has
//! `allow_direct`.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use async_nats::{HeaderMap, StatusCode};
use base64::Engine;
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde::Deserialize;
use tokio::time::Instant;

use super::stored::{ReplayError, Stored};

/// After the direct get answered "no responders" (stream without `allow_direct`), reads go to the leader for this
/// long before trying direct gets again (the stream may have been edited).
const NO_DIRECT_RETRY: Duration = Duration::from_secs(10);

/// The headers a direct get adds to a stored message (stripped from [`Stored::headers`]).
const DIRECT_HEADERS: [&str; 6] = [
    "Nats-Stream",
    "Nats-Subject",
    "Nats-Sequence",
    "Nats-Time-Stamp",
    "Nats-Num-Pending",
    "Nats-Last-Sequence",
];

/// The JetStream requests of one stream's reads: direct gets first, the stream leader when the responder has no more
/// or direct gets have no responders. Counts every request it makes.
pub(super) struct StreamReader {
    client: async_nats::Client,
    stream: String,
    /// `$JS.API.DIRECT.GET.<stream>`.
    direct_subject: String,
    /// `$JS.API.STREAM.MSG.GET.<stream>`.
    leader_subject: String,
    /// Messages per direct-get batch request (`ReplayConfig::batch`, at least 1).
    batch: usize,
    /// `max_bytes` of one batch reply (`ReplayConfig::batch_bytes`, at least 1).
    batch_bytes: usize,
    /// JetStream API requests made (direct gets, leader gets).
    requests: AtomicU64,
    /// Until when reads skip the direct get (set on "no responders").
    no_direct_until: Mutex<Option<Instant>>,
}

impl StreamReader {
    /// A reader of stream `stream` over `client`, asking for `batch` messages (at most `batch_bytes`) per batch.
    pub(super) fn new(client: async_nats::Client, stream: String, batch: usize, batch_bytes: usize) -> Self {
        StreamReader {
            direct_subject: format!("$JS.API.DIRECT.GET.{stream}"),
            leader_subject: format!("$JS.API.STREAM.MSG.GET.{stream}"),
            client,
            stream,
            batch,
            batch_bytes,
            requests: AtomicU64::new(0),
            no_direct_until: Mutex::new(None),
        }
    }

    /// The stream this reader reads.
    pub(super) fn stream(&self) -> &str {
        &self.stream
    }

    /// JetStream API requests made so far.
    pub(super) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The seq of the last stored message of `subject` (0 when none) - used for the join ack's "seq".
    ///
    /// Answered by any replica (a direct get), so a lagging replica may answer an older seq: the caller detects that
    /// from the live messages it holds (their `Nats-Last-Sequence` above the answer) and reads the difference with
    /// [`Replayer::range`](super::Replayer::range). Not coalesced: a shared answer could predate the caller's
    /// registration as a member.
    pub(super) async fn last_seq(&self, subject: &str, deadline: Instant) -> Result<u64, ReplayError> {
        let body = serde_json::json!({ "last_by_subj": subject }).to_string();
        if self.direct_allowed() {
            match self.direct_one(body.clone(), deadline).await? {
                One::Found(m) => return Ok(m.seq),
                One::NotFound => return Ok(0),
                One::NoResponders => self.mark_no_direct(),
            }
        }
        Ok(self.leader_get(body, deadline).await?.map_or(0, |m| m.seq))
    }

    fn direct_allowed(&self) -> bool {
        self.no_direct_until.lock().is_none_or(|until| Instant::now() >= until)
    }

    fn mark_no_direct(&self) {
        tracing::warn!(stream = %self.stream, "direct get has no responders (allow_direct off?): reading from the stream leader");
        *self.no_direct_until.lock() = Some(Instant::now() + NO_DIRECT_RETRY);
    }

    /// One-message batch from `seq`: the first message of `subject` at or after `seq` and how many messages of the
    /// subject there are from it on (itself included).
    pub(super) async fn probe(
        &self,
        subject: &str,
        seq: u64,
        deadline: Instant,
    ) -> Result<Option<(u64, u64)>, ReplayError> {
        if self.direct_allowed() {
            match self.direct_batch(subject, seq, 1, deadline).await? {
                Batch::Msgs { msgs, .. } => {
                    return Ok(msgs.first().map(|m| (m.seq, m.pending.saturating_add(1))));
                }
                Batch::NotFound => return Ok(None),
                Batch::NoResponders => self.mark_no_direct(),
            }
        }
        // Without direct gets there is no pending count: the leader path reads the whole room from `seq`.
        let body = serde_json::json!({ "seq": seq, "next_by_subj": subject }).to_string();
        Ok(self.leader_get(body, deadline).await?.map(|m| (m.seq, u64::MAX)))
    }

    /// Every message of `subject` with seq >= `from` up to the first one at or beyond `up_to` (included), stopping
    /// early once more than `limit` messages are collected (then `.1` is true). Direct gets first; when the
    /// responder has nothing more but `up_to` is not reached (a lagging replica), the rest comes from the leader.
    pub(super) async fn read_from(
        &self,
        subject: &str,
        from: u64,
        up_to: u64,
        limit: usize,
        deadline: Instant,
    ) -> Result<(Vec<Read>, bool), ReplayError> {
        let mut out: Vec<Read> = Vec::new();
        let mut next = from;
        let mut direct = self.direct_allowed();
        loop {
            if out.len() > limit {
                return Ok((out, true));
            }
            if direct {
                let want = limit.saturating_add(1).saturating_sub(out.len()).clamp(1, self.batch);
                match self.direct_batch(subject, next, want, deadline).await? {
                    Batch::NoResponders => {
                        self.mark_no_direct();
                        direct = false;
                    }
                    // The responder has nothing at or after `next`: the leader decides (lagging replica).
                    Batch::NotFound => direct = false,
                    Batch::Msgs { msgs, pending, last } => {
                        out.extend(msgs);
                        if last >= up_to || (pending == 0 && up_to == u64::MAX) {
                            return Ok((out, false));
                        }
                        next = last + 1;
                        // The responder has no more, yet `up_to` is not reached: it lags; ask the leader.
                        direct = pending > 0;
                    }
                }
            } else {
                let body = serde_json::json!({ "seq": next, "next_by_subj": subject }).to_string();
                match self.leader_get(body, deadline).await? {
                    // The leader is authoritative: nothing more is stored.
                    None => return Ok((out, false)),
                    Some(m) => {
                        if m.subject != subject {
                            return Err(ReplayError::Unavailable(format!(
                                "leader answered subject {}",
                                m.subject
                            )));
                        }
                        let seq = m.seq;
                        out.push(m);
                        if seq >= up_to {
                            return Ok((out, false));
                        }
                        next = seq + 1;
                    }
                }
            }
        }
    }

    /// One batched direct get: `{"seq":from,"next_by_subj":subject,"batch":n}` on a fresh inbox, read until the EOB
    /// status (or a 404 / no responders), each wait bounded by `deadline`.
    async fn direct_batch(&self, subject: &str, from: u64, n: usize, deadline: Instant) -> Result<Batch, ReplayError> {
        let inbox = self.client.new_inbox();
        let mut sub = tokio::time::timeout_at(deadline, self.client.subscribe(inbox.clone()))
            .await
            .map_err(|_| ReplayError::Timeout)?
            .map_err(unavailable)?;
        let body = serde_json::json!({
            "seq": from,
            "next_by_subj": subject,
            "batch": n,
            "max_bytes": self.batch_bytes,
        })
        .to_string();
        self.requests.fetch_add(1, Ordering::Relaxed);
        tokio::time::timeout_at(
            deadline,
            self.client
                .publish_with_reply(self.direct_subject.clone(), inbox, Bytes::from(body)),
        )
        .await
        .map_err(|_| ReplayError::Timeout)?
        .map_err(unavailable)?;
        let mut msgs = Vec::new();
        loop {
            let msg = tokio::time::timeout_at(deadline, sub.next())
                .await
                .map_err(|_| ReplayError::Timeout)?
                .ok_or_else(|| ReplayError::Unavailable("inbox subscription closed".into()))?;
            match msg.status.map(|s| s.as_u16()) {
                None => {
                    if msgs.len() >= n {
                        return Err(ReplayError::Unavailable("direct get sent more than the batch".into()));
                    }
                    let m = parse_direct(msg)?;
                    if m.subject != subject {
                        return Err(ReplayError::Unavailable(format!(
                            "direct get answered subject {}",
                            m.subject
                        )));
                    }
                    msgs.push(m);
                }
                Some(204) => {
                    let h = msg.headers.as_ref();
                    let pending = header_u64(h, "Nats-Num-Pending")
                        .ok_or_else(|| ReplayError::Unavailable("EOB without Nats-Num-Pending".into()))?;
                    let last = header_u64(h, "Nats-Last-Sequence").unwrap_or(0);
                    if msgs.is_empty() {
                        return Ok(Batch::NotFound);
                    }
                    return Ok(Batch::Msgs { msgs, pending, last });
                }
                Some(404) if msgs.is_empty() => return Ok(Batch::NotFound),
                Some(503) => return Ok(Batch::NoResponders),
                Some(code) => {
                    return Err(ReplayError::Unavailable(format!(
                        "direct get status {code} {}",
                        msg.description.unwrap_or_default()
                    )));
                }
            }
        }
    }

    /// A single direct get (no batch), e.g. `last_by_subj`.
    async fn direct_one(&self, body: String, deadline: Instant) -> Result<One, ReplayError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let req = self.client.request(self.direct_subject.clone(), Bytes::from(body));
        let msg = match tokio::time::timeout_at(deadline, req).await {
            Err(_) => return Err(ReplayError::Timeout),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => return Ok(One::NoResponders),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::TimedOut => return Err(ReplayError::Timeout),
            Ok(Err(e)) => return Err(unavailable(e)),
            Ok(Ok(msg)) => msg,
        };
        match msg.status {
            None => Ok(One::Found(parse_direct(msg)?)),
            Some(StatusCode::NOT_FOUND) => Ok(One::NotFound),
            Some(StatusCode::NO_RESPONDERS) => Ok(One::NoResponders),
            Some(code) => Err(ReplayError::Unavailable(format!("direct get status {code}"))),
        }
    }

    /// `$JS.API.STREAM.MSG.GET.<stream>`: answered by the stream leader only (read-after-write coherent); `None` when
    /// no message matches.
    async fn leader_get(&self, body: String, deadline: Instant) -> Result<Option<Read>, ReplayError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let req = self.client.request(self.leader_subject.clone(), Bytes::from(body));
        let msg = match tokio::time::timeout_at(deadline, req).await {
            Err(_) => return Err(ReplayError::Timeout),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::TimedOut => return Err(ReplayError::Timeout),
            Ok(Err(e)) => return Err(unavailable(e)),
            Ok(Ok(msg)) => msg,
        };
        parse_leader(&msg.payload)
    }
}

/// One message as read (direct or leader), before it becomes a [`Stored`].
#[derive(Debug, Clone)]
pub(super) struct Read {
    pub(super) seq: u64,
    pub(super) subject: String,
    /// `Nats-Num-Pending` of a batch: messages of the subject after this one (0 when unknown).
    pub(super) pending: u64,
    pub(super) stored: Stored,
}

enum Batch {
    Msgs { msgs: Vec<Read>, pending: u64, last: u64 },
    NotFound,
    NoResponders,
}

enum One {
    Found(Read),
    NotFound,
    NoResponders,
}

fn unavailable(e: impl std::fmt::Display) -> ReplayError {
    ReplayError::Unavailable(e.to_string())
}

fn header_u64(h: Option<&HeaderMap>, name: &str) -> Option<u64> {
    h?.get(name)?.as_str().trim().parse().ok()
}

/// A direct get reply: headers `Nats-Sequence`, `Nats-Subject` (+ `Nats-Num-Pending` in a batch) and the original
/// message's own headers.
fn parse_direct(msg: async_nats::Message) -> Result<Read, ReplayError> {
    let h = msg.headers.as_ref();
    let seq = header_u64(h, "Nats-Sequence")
        .filter(|s| *s > 0)
        .ok_or_else(|| ReplayError::Unavailable("direct get reply without Nats-Sequence".into()))?;
    let subject = h
        .and_then(|h| h.get("Nats-Subject"))
        .map(|v| v.as_str().to_string())
        .ok_or_else(|| ReplayError::Unavailable("direct get reply without Nats-Subject".into()))?;
    let pending = header_u64(h, "Nats-Num-Pending").unwrap_or(0);
    Ok(Read {
        seq,
        subject,
        pending,
        stored: Stored {
            seq,
            payload: msg.payload,
            headers: msg.headers.as_ref().and_then(original_headers),
        },
    })
}

/// The message's own headers: everything but what a direct get adds.
fn original_headers(h: &HeaderMap) -> Option<HeaderMap> {
    let mut out = HeaderMap::new();
    for (name, values) in h.iter() {
        let n: &str = name.as_ref();
        if DIRECT_HEADERS.iter().any(|d| d.eq_ignore_ascii_case(n)) {
            continue;
        }
        for v in values {
            out.append(name.clone(), v.clone());
        }
    }
    (!out.is_empty()).then_some(out)
}

/// A `STREAM.MSG.GET` reply: `{"message":{"subject","seq","hdrs"(base64),"data"(base64)}}` or
/// `{"error":{"code":404,..}}` when no message matches.
fn parse_leader(payload: &[u8]) -> Result<Option<Read>, ReplayError> {
    #[derive(Deserialize)]
    struct Resp {
        message: Option<Msg>,
        error: Option<ApiError>,
    }
    #[derive(Deserialize)]
    struct Msg {
        subject: String,
        seq: u64,
        hdrs: Option<String>,
        data: Option<String>,
    }
    #[derive(Deserialize)]
    struct ApiError {
        code: u16,
        description: Option<String>,
    }
    let resp: Resp = serde_json::from_slice(payload).map_err(|e| unavailable(format!("msg get reply: {e}")))?;
    if let Some(e) = resp.error {
        if e.code == 404 {
            return Ok(None);
        }
        return Err(ReplayError::Unavailable(format!(
            "msg get: {} {}",
            e.code,
            e.description.unwrap_or_default()
        )));
    }
    let m = resp
        .message
        .ok_or_else(|| ReplayError::Unavailable("msg get reply without message".into()))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let payload = match m.data {
        Some(d) => b64.decode(d).map_err(|e| unavailable(format!("msg get data: {e}")))?,
        None => Vec::new(),
    };
    let headers = match m.hdrs {
        Some(h) => parse_header_block(&b64.decode(h).map_err(|e| unavailable(format!("msg get hdrs: {e}")))?),
        None => None,
    };
    Ok(Some(Read {
        seq: m.seq,
        subject: m.subject,
        pending: 0,
        stored: Stored {
            seq: m.seq,
            payload: Bytes::from(payload),
            headers,
        },
    }))
}

/// `NATS/1.0\r\nName: value\r\n...\r\n\r\n` -> headers (`None` when empty or unparsable lines only).
fn parse_header_block(block: &[u8]) -> Option<HeaderMap> {
    let text = std::str::from_utf8(block).ok()?;
    let mut out = HeaderMap::new();
    for line in text.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let Ok(name) = async_nats::HeaderName::try_from(name.trim()) else {
            continue;
        };
        out.append(name, value.trim());
    }
    (!out.is_empty()).then_some(out)
}
