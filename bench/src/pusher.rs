//! The Pusher side of the generator, for Sockudo (issue 28): the publisher is a backend that sends events through the
//! HTTP events API, as Pusher backends do (`POST /apps/<id>/batch_events`, up to [`BATCH`] events per request, signed
//! with the app's secret), over a few HTTP/1.1 connections with one request in flight each (Sockudo answers the events
//! API with `connection: close`, so each request opens a connection anew); subscribers speak the Pusher WebSocket protocol
//! 7 (`pusher:connection_established` → `pusher:subscribe` → `pusher_internal:subscription_succeeded`, then events;
//! `pusher:ping` → `pusher:pong`), in `main.rs`'s `join` and `read_loop`.
//!
//! Request signature (Sockudo's `AuthValidator::authenticate_pusher_api_request`, Pusher's documented scheme):
//! `auth_signature = hex(HMAC-SHA256(secret, "POST\n<path>\n<sorted query without auth_signature>"))`, the query
//! holding `auth_key`, `auth_timestamp` (seconds, within 600 s of the server's clock), `auth_version=1.0` and
//! `body_md5` (hex MD5 of the body).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use anyhow::{Context as _, bail};
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Events per `batch_events` request: Sockudo's default `event_limits.max_batch_size` (Pusher's limit too).
pub const BATCH: usize = 10;
/// HTTP connections the publisher spreads its requests over (one request in flight on each).
const CONNECTIONS: usize = 8;

/// The app the generator and Sockudo's config agree on (`--pusher-app id:key:secret`).
#[derive(Clone, Debug)]
pub struct App {
    pub id: String,
    pub key: String,
    pub secret: String,
}

impl App {
    pub fn parse(spec: &str) -> anyhow::Result<Self> {
        let mut parts = spec.splitn(3, ':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(id), Some(key), Some(secret)) if !id.is_empty() && !key.is_empty() && !secret.is_empty() => Ok(App {
                id: id.into(),
                key: key.into(),
                secret: secret.into(),
            }),
            _ => bail!("--pusher-app wants id:key:secret"),
        }
    }
}

/// The request line's path and query for a signed POST of `body` to `path` at `timestamp` (UNIX seconds).
pub fn signed_target(app: &App, path: &str, body: &[u8], timestamp: u64) -> String {
    let body_md5 = hex(&Md5::digest(body));
    let query = format!(
        "auth_key={}&auth_timestamp={timestamp}&auth_version=1.0&body_md5={body_md5}",
        app.key
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(app.secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(format!("POST\n{path}\n{query}").as_bytes());
    let signature = hex(&mac.finalize().into_bytes());
    format!("{path}?{query}&auth_signature={signature}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One `batch_events` body: every (channel, data) pair as event `msg`, data carried as a JSON string.
pub fn batch_body(events: &[(String, String)]) -> Vec<u8> {
    let batch: Vec<serde_json::Value> = events
        .iter()
        .map(|(channel, data)| serde_json::json!({"name": "msg", "channel": channel, "data": data}))
        .collect();
    serde_json::to_vec(&serde_json::json!({ "batch": batch })).expect("JSON of strings")
}

/// Starts the publishing connections to `http://host:port` and returns the queue that feeds them: each item is one
/// request's events. A request that fails ends its connection's task with the error in `errors`.
pub async fn start(
    base: &str,
    app: App,
    errors: Arc<AtomicU64>,
) -> anyhow::Result<Vec<mpsc::UnboundedSender<Vec<(String, String)>>>> {
    let addr = base.trim_start_matches("http://").trim_end_matches('/');
    let addr = tokio::net::lookup_host(addr)
        .await?
        .next()
        .context("Sockudo HTTP address")?;
    // Fail early (before the subscribers wait for events) if nothing listens.
    drop(
        TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?,
    );
    let mut queues = Vec::new();
    for _ in 0..CONNECTIONS {
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<(String, String)>>();
        let (app, errors) = (app.clone(), errors.clone());
        tokio::spawn(async move {
            let (mut tcp, mut buf) = (None, Vec::with_capacity(4096));
            while let Some(events) = rx.recv().await {
                if let Err(e) = post(addr, &mut tcp, &app, &events, &mut buf).await {
                    eprintln!("roomwire-bench: Sockudo events API: {e:#}");
                    errors.fetch_add(1, Relaxed);
                    return;
                }
            }
        });
        queues.push(tx);
    }
    Ok(queues)
}

/// One signed `batch_events` request and its response (status 200 expected; the body is read and dropped), on the
/// connection in `conn`, opened first if there is none; a `connection: close` response leaves none.
async fn post(
    addr: std::net::SocketAddr,
    conn: &mut Option<TcpStream>,
    app: &App,
    events: &[(String, String)],
    buf: &mut Vec<u8>,
) -> anyhow::Result<()> {
    let tcp = match conn {
        Some(tcp) => tcp,
        None => {
            let tcp = TcpStream::connect(addr)
                .await
                .with_context(|| format!("connect {addr}"))?;
            tcp.set_nodelay(true)?;
            conn.insert(tcp)
        }
    };
    let body = batch_body(events);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let target = signed_target(app, &format!("/apps/{}/batch_events", app.id), &body, now);
    let mut request = format!(
        "POST {target} HTTP/1.1\r\nhost: sockudo\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    tcp.write_all(&request).await?;
    // Response: headers up to the blank line, then content-length bytes.
    buf.clear();
    let mut chunk = [0u8; 4096];
    let (head_end, length, close) = loop {
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            if !head.starts_with("http/1.1 200") {
                let status = String::from_utf8_lossy(&buf[..end])
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                bail!("{status}");
            }
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .context("response without content-length")?;
            let close = head.lines().any(|l| l.trim() == "connection: close");
            break (end + 4, length, close);
        }
    };
    while buf.len() < head_end + length {
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed in a response body");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if close {
        *conn = None;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_covers_method_path_and_sorted_query() {
        let app = App::parse("1:key:secret").unwrap();
        let target = signed_target(&app, "/apps/1/batch_events", b"{}", 1_700_000_000);
        // MD5("{}") = 99914b932bd37a50b983c5e7c90ae93b.
        let query = "auth_key=key&auth_timestamp=1700000000&auth_version=1.0&body_md5=99914b932bd37a50b983c5e7c90ae93b";
        let mut mac = Hmac::<Sha256>::new_from_slice(b"secret").unwrap();
        mac.update(format!("POST\n/apps/1/batch_events\n{query}").as_bytes());
        let expected = hex(&mac.finalize().into_bytes());
        assert_eq!(
            target,
            format!("/apps/1/batch_events?{query}&auth_signature={expected}")
        );
    }

    #[test]
    fn data_travels_as_a_json_string() {
        let body = batch_body(&[("r1".into(), r#"{"ts":5}"#.into())]);
        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"batch":[{"channel":"r1","data":"{\"ts\":5}","name":"msg"}]}"#
        );
    }
}
