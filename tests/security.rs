//! Security rules of issue 4, one test per rule, each asserting the exact HTTP status, error code or close code the
//! client sees: JWT authentication at the upgrade, token sources, identities in NATS headers and events, per-room
//! permissions, in-band refresh and expiry, the Origin allow-list, connection caps and rates (per IP, global, behind
//! trusted proxies), the handshake deadline, header limits, message rates (per connection and per user), rooms per
//! connection, the heartbeat, and isolation of an ordinary client from a flooding one.
mod common;

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::*;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use roomwire::{
    Config,
    config::{JwtKey, Permissions, SecretSource},
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "test-hs256-secret-for-roomwire";
const WS: &str = "/ws";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// HMAC key material on disk (the secret is read from a file, never from the config itself).
struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hs.secret"), format!("{SECRET}\n")).unwrap();
        Keys { dir }
    }

    /// Requires tokens (no anonymous), HS256 with the secret file, no leeway.
    fn apply(&self, c: &mut Config) {
        c.auth.allow_anonymous = false;
        c.auth.leeway_secs = 0;
        c.auth.keys = vec![JwtKey {
            kid: None,
            algorithm: Algorithm::HS256,
            secret: Some(SecretSource::File(self.dir.path().join("hs.secret"))),
            public_key_file: None,
        }];
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

/// An HS256 token for `sub` valid `ttl` seconds, with `extra` claims merged in.
fn token_ttl(sub: &str, ttl: i64, extra: Value) -> String {
    let mut claims = json!({ "sub": sub, "exp": (now() as i64 + ttl) });
    if let Value::Object(m) = extra {
        for (k, v) in m {
            claims[k] = v;
        }
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn token(sub: &str, extra: Value) -> String {
    token_ttl(sub, 600, extra)
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A raw WebSocket upgrade request (the connection closes after the answer); returns (status, body).
async fn raw_upgrade(gw: &TestGateway, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    gw.raw(&req).await.unwrap()
}

/// Polls the client (so tungstenite answers pings) for `d`, failing on anything but pings and pongs.
async fn poll_quietly(c: &mut WsClient, d: Duration) {
    let until = Instant::now() + d;
    while let Ok(msg) = tokio::time::timeout_at(until, c.ws.next()).await {
        match msg {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected only heartbeats, got {other:?}"),
        }
    }
}

/// Connects, retrying while the refusal is `retry_on` (a slot released by a closing connection frees up
/// asynchronously on the server).
async fn connect_retrying(gw: &TestGateway, headers: &[(&str, &str)], retry_on: u16) -> WsClient {
    let deadline = Instant::now() + WAIT;
    loop {
        match gw.client_with(WS, headers).await {
            Ok(c) => return c,
            Err(s) if s == retry_on && Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(s) => panic!("connection refused with {s}"),
        }
    }
}

/// Sends a text frame without waiting for anything.
async fn feed(c: &mut WsClient, v: Value) {
    c.ws.feed(Message::Text(v.to_string().into())).await.unwrap();
}

// ---------------------------------------------------------------------------------------------------------------
// Authentication at the upgrade
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn missing_token_is_401_when_anonymous_is_not_allowed() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| keys.apply(c)).await;
    assert_eq!(gw.client_with(WS, &[]).await.err(), Some(401));
    let (status, body) = raw_upgrade(&gw, WS, &[]).await;
    assert_eq!((status, body.trim()), (401, "token required"));
}

#[tokio::test]
async fn bad_tokens_are_401_never_101() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| keys.apply(c)).await;
    let expired = token_ttl("alice", -120, json!({}));
    let wrong_key = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "alice", "exp": now() + 600}),
        &EncodingKey::from_secret(b"not the secret"),
    )
    .unwrap();
    let alg_none = format!(
        "{}.{}.",
        b64url(json!({"alg": "none", "typ": "JWT"}).to_string().as_bytes()),
        b64url(json!({"sub": "alice", "exp": now() + 600}).to_string().as_bytes())
    );
    // A valid token's payload with its signature removed must not pass either.
    let good = token("alice", json!({}));
    let stripped = format!("{}.", good.rsplit_once('.').unwrap().0);
    let cases = [
        ("malformed", "not-a-jwt".to_string(), "malformed token"),
        ("expired", expired, "token expired"),
        ("wrongly signed", wrong_key, "invalid token signature"),
        ("alg none", alg_none, "malformed token"),
        ("signature stripped", stripped, "invalid token signature"),
    ];
    for (what, t, reason) in &cases {
        let (status, body) = raw_upgrade(&gw, WS, &[("Authorization", &bearer(t))]).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body.trim(), *reason, "{what}");
        assert_eq!(
            gw.client_with(WS, &[("authorization", &bearer(t))]).await.err(),
            Some(401),
            "{what}"
        );
        assert_eq!(
            gw.client_with(&format!("{WS}?token={t}"), &[]).await.err(),
            Some(401),
            "{what} in query"
        );
    }
    // The same request with the good token is upgraded.
    let (status, _) = raw_upgrade(&gw, WS, &[("Authorization", &bearer(&good))]).await;
    assert_eq!(status, 101);
}

#[tokio::test]
async fn bad_token_is_refused_even_when_anonymous_is_allowed() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| {
        keys.apply(c);
        c.auth.allow_anonymous = true;
    })
    .await;
    let expired = token_ttl("alice", -120, json!({}));
    assert_eq!(
        gw.client_with(WS, &[("authorization", &bearer(&expired))]).await.err(),
        Some(401)
    );
    let c = gw.client_with(WS, &[]).await.expect("anonymous without a token");
    drop(c);
}

#[tokio::test]
async fn token_from_bearer_query_and_cookie_is_accepted() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| {
        keys.apply(c);
        c.auth.cookie = Some("rw_token".into());
    })
    .await;
    let t = token("alice", json!({}));
    let mut via_header = gw
        .client_with(WS, &[("authorization", &bearer(&t))])
        .await
        .expect("bearer");
    let mut via_query = gw
        .client_with(&format!("{WS}?room=x&token={t}"), &[])
        .await
        .expect("query");
    let cookie = format!("theme=dark; rw_token={t}");
    let mut via_cookie = gw.client_with(WS, &[("cookie", &cookie)]).await.expect("cookie");
    for c in [&mut via_header, &mut via_query, &mut via_cookie] {
        let r = c.request(json!({"op": "ping"}), 1).await;
        assert_eq!(r["op"], "pong");
    }
    // A cookie with another name is not a token.
    let other = format!("session={t}");
    assert_eq!(gw.client_with(WS, &[("cookie", &other)]).await.err(), Some(401));
}

#[tokio::test]
async fn welcome_names_the_user() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| keys.apply(c)).await;
    // client_with consumes the welcome; read it here by hand instead.
    let t = token("alice", json!({}));
    let url = format!("wss://localhost:{}{WS}?token={t}", gw.addr.port());
    let (mut ws, _) = tokio_tungstenite::client_async(url, gw.tls().await)
        .await
        .expect("upgrade");
    let Some(Ok(Message::Text(w))) = tokio::time::timeout(WAIT, ws.next()).await.unwrap() else {
        panic!("welcome")
    };
    let w: Value = serde_json::from_str(&w).unwrap();
    assert_eq!((w["op"].as_str(), w["user"].as_str()), (Some("welcome"), Some("alice")));
}

#[tokio::test]
async fn asymmetric_es256_and_eddsa_tokens() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let ec_pub = keys.write("ec.pem", &ec.public_key_pem());
    let ed_pub = keys.write("ed.pem", &ed.public_key_pem());
    let gw = TestGateway::start(&nats, |c| {
        keys.apply(c);
        for (alg, path) in [(Algorithm::ES256, ec_pub), (Algorithm::EdDSA, ed_pub)] {
            c.auth.keys.push(JwtKey {
                kid: None,
                algorithm: alg,
                secret: None,
                public_key_file: Some(path),
            });
        }
    })
    .await;
    let claims = json!({"sub": "carol", "exp": now() + 600});
    let es = EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap();
    let eddsa = EncodingKey::from_ed_pem(ed.serialize_pem().as_bytes()).unwrap();
    for (alg, key) in [(Algorithm::ES256, &es), (Algorithm::EdDSA, &eddsa)] {
        let t = jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap();
        let mut c = gw
            .client_with(WS, &[("authorization", &bearer(&t))])
            .await
            .unwrap_or_else(|s| panic!("{alg:?}: {s}"));
        assert_eq!(c.request(json!({"op": "ping"}), 1).await["op"], "pong");
    }
    // Signed by another P-256 key: refused.
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let other = EncodingKey::from_ec_pem(other.serialize_pem().as_bytes()).unwrap();
    let t = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &other).unwrap();
    let (status, body) = raw_upgrade(&gw, WS, &[("Authorization", &bearer(&t))]).await;
    assert_eq!((status, body.trim()), (401, "invalid token signature"));
}

// ---------------------------------------------------------------------------------------------------------------
// Identity in NATS headers and lifecycle events
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn sub_is_in_publish_headers_and_lifecycle_events() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| keys.apply(c)).await;
    let nc = nats.client().await;
    // The connect event follows the upgrade at once: the subscription must be in place before.
    let mut events = nats_sub(&nc, "roomwire.events.>").await;
    let mut room = nats_sub(&nc, "rooms.lobby").await;

    let t = token("alice", json!({"rooms": ["lobby"]}));
    let mut c = gw.client_with(WS, &[("authorization", &bearer(&t))]).await.unwrap();
    c.join("lobby").await;
    c.publish("lobby", json!({"n": 1})).await;
    let m = next_msg(&mut room).await;
    let h = m.headers.as_ref().expect("headers");
    assert_eq!(h.get("Roomwire-User").map(|v| v.as_str()), Some("alice"));
    assert_eq!(h.get("Roomwire-Conn").map(|v| v.as_str()), Some(c.conn.as_str()));
    drop(c);

    let mut seen = Vec::new();
    while seen.len() < 4 {
        let Ok(Some(m)) = tokio::time::timeout(WAIT, events.next()).await else {
            panic!("lifecycle events missing; got only {seen:?}");
        };
        let e: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(e["user"], "alice", "event {e}");
        seen.push((e["event"].as_str().unwrap().to_string(), e["room"].clone()));
    }
    let want = [
        ("connect", Value::Null),
        ("join", json!("lobby")),
        ("leave", json!("lobby")),
        ("disconnect", Value::Null),
    ];
    let want: Vec<_> = want.iter().map(|(k, r)| (k.to_string(), r.clone())).collect();
    assert_eq!(seen, want);
}

// ---------------------------------------------------------------------------------------------------------------
// Permissions
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn anonymous_has_its_own_permissions_and_no_user() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| {
        keys.apply(c);
        c.auth.allow_anonymous = true;
        c.auth.anonymous = Permissions {
            join: vec!["public-*".into()],
            publish: vec!["public-chat".into()],
        };
    })
    .await;
    let nc = nats.client().await;
    let mut sub = nats_sub(&nc, "rooms.public-chat").await;
    let mut anon = gw.client().await;
    anon.join("public-news").await;
    let r = anon.request(json!({"op": "join", "room": "private"}), 1).await;
    assert_eq!(
        (r["op"].as_str(), r["code"].as_str()),
        (Some("error"), Some("forbidden"))
    );
    let r = anon
        .request(json!({"op": "publish", "room": "public-news", "data": 1}), 2)
        .await;
    assert_eq!(r["code"], "forbidden");
    anon.join("public-chat").await;
    anon.publish("public-chat", json!("hi")).await;
    let m = next_msg(&mut sub).await;
    let h = m.headers.as_ref().expect("headers");
    assert!(h.get("Roomwire-User").is_none(), "anonymous publish carries no user");
    // A token holder is not limited to the anonymous permissions.
    let mut alice = gw
        .client_with(
            WS,
            &[("authorization", &bearer(&token("alice", json!({"rooms": ["private"]}))))],
        )
        .await
        .unwrap();
    alice.join("private").await;
}

#[tokio::test]
async fn join_and_publish_outside_patterns_are_forbidden_and_connection_stays() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| keys.apply(c)).await;
    let t = token(
        "bob",
        json!({"rooms": ["lobby", "team-42-*"], "publish": ["team-42-*"]}),
    );
    let mut c = gw.client_with(WS, &[("authorization", &bearer(&t))]).await.unwrap();
    for (i, room) in ["admin", "team-43-x", "team-42"].iter().enumerate() {
        let r = c.request(json!({"op": "join", "room": room}), i as u64).await;
        assert_eq!(
            (r["op"].as_str(), r["code"].as_str()),
            (Some("error"), Some("forbidden")),
            "{room}"
        );
    }
    c.join("lobby").await;
    let r = c
        .request(json!({"op": "publish", "room": "lobby", "data": 1}), 10)
        .await;
    assert_eq!(
        (r["op"].as_str(), r["code"].as_str()),
        (Some("error"), Some("forbidden"))
    );
    c.join("team-42-ops").await;
    c.publish("team-42-ops", json!({"ok": true})).await;
    assert_eq!(c.request(json!({"op": "ping"}), 11).await["op"], "pong");
}

#[tokio::test]
async fn personal_room_is_granted_to_its_owner_only() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| {
        keys.apply(c);
        c.auth.personal_room = Some("user-{sub}".into());
    })
    .await;
    let mut alice = gw
        .client_with(WS, &[("authorization", &bearer(&token("alice", json!({}))))])
        .await
        .unwrap();
    alice.join("user-alice").await;
    alice.publish("user-alice", json!("note to self")).await;
    let r = alice.request(json!({"op": "join", "room": "user-bob"}), 1).await;
    assert_eq!(r["code"], "forbidden");
    // A `*` in sub could not widen the grant (the personal room is matched literally), and since `user-*` is not a
    // valid room name such a sub is refused at the upgrade (issue 8, finding 5).
    let star = gw
        .client_with(WS, &[("authorization", &bearer(&token("*", json!({}))))])
        .await;
    assert_eq!(star.err(), Some(401));
}

// ---------------------------------------------------------------------------------------------------------------
// Refresh and expiry
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn refresh_with_narrower_token_leaves_revoked_rooms() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| keys.apply(c)).await;
    let nc = nats.client().await;
    let mut events = nats_sub(&nc, "roomwire.events.leave").await;
    let wide = token("ann", json!({"rooms": ["chat-*", "ops"]}));
    let mut c = gw.client_with(WS, &[("authorization", &bearer(&wide))]).await.unwrap();
    c.join("chat-1").await;
    c.join("ops").await;

    let narrow = token("ann", json!({"rooms": ["chat-*"]}));
    c.send(json!({"op": "refresh", "token": narrow, "id": 7})).await;
    let left = c.recv_op("left").await;
    assert_eq!(left["room"], "ops");
    assert_eq!(c.recv_op("ack").await["id"], 7);
    let e: Value = serde_json::from_slice(&next_msg(&mut events).await.payload).unwrap();
    assert_eq!((e["room"].as_str(), e["user"].as_str()), (Some("ops"), Some("ann")));

    // The revoked room is gone and may not be joined again; the kept one still works.
    let r = c.request(json!({"op": "publish", "room": "ops", "data": 1}), 8).await;
    assert_eq!(r["code"], "not_joined");
    let r = c.request(json!({"op": "join", "room": "ops"}), 9).await;
    assert_eq!(r["code"], "forbidden");
    c.publish("chat-1", json!("still here")).await;
    // Messages of the revoked room no longer arrive.
    nc.publish("rooms.ops", "{\"x\":1}".into()).await.unwrap();
    nc.publish("rooms.chat-1", "{\"x\":2}".into()).await.unwrap();
    nc.flush().await.unwrap();
    let m = c.recv_op("message").await;
    assert_eq!((m["room"].as_str(), &m["data"]), (Some("chat-1"), &json!({"x": 2})));
}

#[tokio::test]
async fn refresh_with_bad_token_is_unauthorized_and_connection_stays() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| keys.apply(c)).await;
    let mut c = gw
        .client_with(
            WS,
            &[("authorization", &bearer(&token("ann", json!({"rooms": ["*"]}))))],
        )
        .await
        .unwrap();
    c.join("lobby").await;
    let wrong_sig = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "ann", "exp": now() + 600}),
        &EncodingKey::from_secret(b"nope"),
    )
    .unwrap();
    let cases = [
        ("garbage", "garbage".to_string()),
        ("expired", token_ttl("ann", -120, json!({}))),
        ("wrong signature", wrong_sig),
        ("other user", token("mallory", json!({"rooms": ["*"]}))),
    ];
    for (i, (what, t)) in cases.iter().enumerate() {
        let r = c.request(json!({"op": "refresh", "token": t}), i as u64).await;
        assert_eq!(
            (r["op"].as_str(), r["code"].as_str()),
            (Some("error"), Some("unauthorized")),
            "{what}: {r}"
        );
    }
    // Claims unchanged: still in the room, may still publish.
    c.publish("lobby", json!(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiring_token_gets_warning_then_close_4001_unless_refreshed() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| {
        keys.apply(c);
        c.auth.expiry_warning = Duration::from_secs(2);
    })
    .await;
    let short = token_ttl("ann", 4, json!({"rooms": ["*"]}));
    let mut lapsing = gw.client_with(WS, &[("authorization", &bearer(&short))]).await.unwrap();
    let mut refreshing = gw.client_with(WS, &[("authorization", &bearer(&short))]).await.unwrap();
    let started = Instant::now();
    let lapse = async {
        let w = lapsing.recv_op("token_expiring").await;
        let secs = w["in"].as_u64().expect("`in` seconds");
        assert!(secs <= 2, "{w}");
        let (code, reason) = lapsing.expect_close().await;
        assert_eq!((code, reason.as_str()), (4001, "token expired"));
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_secs(2), "closed too early: {elapsed:?}");
    };
    let refresh = async {
        refreshing.recv_op("token_expiring").await;
        let fresh = token_ttl("ann", 600, json!({"rooms": ["*"]}));
        let r = refreshing.request(json!({"op": "refresh", "token": fresh}), 1).await;
        assert_eq!(r["op"], "ack");
        // Past the old token's expiry the connection is still open and answers.
        poll_quietly(&mut refreshing, Duration::from_secs(4)).await;
        assert_eq!(refreshing.request(json!({"op": "ping"}), 2).await["op"], "pong");
    };
    tokio::join!(lapse, refresh);
}

// ---------------------------------------------------------------------------------------------------------------
// Origin allow-list
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn origin_allow_list() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.server.allowed_origins = vec!["https://app.example.com".into(), "*.example.org".into()];
    })
    .await;
    for foreign in [
        "https://evil.com",
        "https://app.example.com.evil.com",
        "https://example.org",
        "null",
    ] {
        assert_eq!(
            gw.client_with(WS, &[("origin", foreign)]).await.err(),
            Some(403),
            "{foreign}"
        );
    }
    assert_eq!(gw.client_with(WS, &[]).await.err(), Some(403), "missing Origin");
    let (status, body) = raw_upgrade(&gw, WS, &[("Origin", "https://evil.com")]).await;
    assert_eq!((status, body.trim()), (403, "origin not allowed"));
    for allowed in [
        "https://app.example.com",
        "https://APP.example.com",
        "https://chat.example.org",
        "http://a.b.example.org",
    ] {
        assert!(gw.client_with(WS, &[("origin", allowed)]).await.is_ok(), "{allowed}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Connection caps and rates
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn global_max_connections_is_503() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| c.server.max_connections = 2).await;
    // The readiness probe's connection may still hold its slot for a moment: retry on 503 for the first two.
    let a = connect_retrying(&gw, &[], 503).await;
    let _b = connect_retrying(&gw, &[], 503).await;
    assert_eq!(gw.client_with(WS, &[]).await.err(), Some(503));
    let (status, body) = raw_upgrade(&gw, WS, &[]).await;
    assert_eq!((status, body.trim()), (503, "server at capacity"));
    // Liveness stays 200 at capacity (a full gateway is healthy); readiness steers new clients away.
    let (status, body) = gw.get("/healthz").await.unwrap();
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, body) = gw.get("/readyz").await.unwrap();
    assert_eq!((status, body.trim()), (503, "at capacity"));
    drop(a);
    let _c = connect_retrying(&gw, &[], 503).await;
}

#[tokio::test]
async fn per_ip_concurrent_cap_sheds_at_accept() {
    // Counted by peer address from accept: the connection over the cap is closed before TLS, plain HTTP included
    // (tests/admission.rs covers the details: shedding, slot release on every path, other addresses).
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| c.limits.max_connections_per_ip = 2).await;
    let me = "127.0.0.1".parse().unwrap();
    let a = gw.try_client_from(me, WS, &[]).await.expect("first");
    let _b = gw.try_client_from(me, WS, &[]).await.expect("second");
    assert_eq!(
        gw.try_client_from(me, WS, &[]).await.err(),
        Some(None),
        "shed at accept"
    );
    assert!(
        gw.try_tls_over(gw.tcp_from(me).await).await.is_err(),
        "plain HTTP is counted too"
    );
    drop(a);
    let deadline = Instant::now() + WAIT;
    while gw.try_client_from(me, WS, &[]).await.is_err() {
        assert!(Instant::now() < deadline, "slot never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn per_ip_connection_rate_sheds_at_accept() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.limits.connections_per_second_per_ip = 1;
        c.limits.connections_burst_per_ip = 3;
        // The readiness probes come from 127.0.0.1: as a trusted proxy it is not charged at accept, so the probes
        // cannot spend the burst (or be shed) before the test starts.
        c.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let me = "127.0.0.2".parse().unwrap();
    for _ in 0..3 {
        drop(gw.try_client_from(me, WS, &[]).await.expect("within the burst"));
    }
    // One cell comes back per second: a slow machine may get one more in; the refusal must come soon after.
    let mut refused = None;
    for _ in 0..5 {
        if let Err(s) = gw.try_client_from(me, WS, &[]).await {
            refused = Some(s);
            break;
        }
    }
    assert_eq!(refused, Some(None), "shed at accept");
}

#[tokio::test]
async fn forwarded_for_is_honoured_only_from_trusted_proxies() {
    let nats = NatsServer::start().await;
    let trusted = TestGateway::start(&nats, |c| {
        c.limits.max_connections_per_ip = 1;
        c.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let _a = trusted
        .client_with(WS, &[("x-forwarded-for", "203.0.113.1")])
        .await
        .expect("first client");
    let _b = trusted
        .client_with(WS, &[("x-forwarded-for", "203.0.113.2")])
        .await
        .expect("second client, own budget");
    let _c = trusted
        .client_with(WS, &[("x-forwarded-for", "[2001:db8::3]:443")])
        .await
        .expect("IPv6 with port");
    assert_eq!(
        trusted
            .client_with(WS, &[("x-forwarded-for", "203.0.113.1")])
            .await
            .err(),
        Some(429)
    );
    // Left-most entries are client-controlled: only the right-most untrusted hop counts.
    let spoofed = "203.0.113.9, 203.0.113.2";
    assert_eq!(
        trusted.client_with(WS, &[("x-forwarded-for", spoofed)]).await.err(),
        Some(429)
    );
    // The proxy itself (no header) has its own budget.
    let _d = trusted.client_with(WS, &[]).await.expect("proxy's own address");

    // An untrusted peer is counted by its own address at accept: its header is never read.
    let untrusted = TestGateway::start(&nats, |c| c.limits.max_connections_per_ip = 1).await;
    let me = "127.0.0.2".parse().unwrap();
    let _e = untrusted
        .try_client_from(me, WS, &[("x-forwarded-for", "203.0.113.1")])
        .await
        .expect("first client");
    assert_eq!(
        untrusted
            .try_client_from(me, WS, &[("x-forwarded-for", "203.0.113.2")])
            .await
            .err(),
        Some(None)
    );
}

#[tokio::test]
async fn address_spray_through_trusted_proxy_keeps_limiter_memory_bounded() {
    const MAX: usize = 500;
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        c.limits.max_tracked_keys = MAX;
        // Slow refill, so sprayed keys stay "recent" and eviction has real work to do.
        c.limits.connections_per_second_per_ip = 1;
        c.limits.connections_burst_per_ip = 5;
    })
    .await;
    let limits = gw.gw.limits().clone();
    for i in 0..10_000u32 {
        let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        drop(limits.admit(ip).expect("a fresh address is admitted"));
        assert!(
            limits.tracked_keys() <= MAX,
            "after {i} addresses: {} keys",
            limits.tracked_keys()
        );
        if i % 2000 == 1999 {
            // A real connection through the proxy from a fresh address, among the spray.
            let xff = format!("198.51.100.{}", i / 2000);
            let mut c = gw
                .client_with(WS, &[("x-forwarded-for", &xff)])
                .await
                .expect("real client admitted");
            assert_eq!(c.request(json!({"op": "ping"}), 1).await["op"], "pong");
            // The keyed limiter stays within the bound; the per-IP count of open connections adds one entry per
            // connected address (bounded by the connections themselves, not by `max_tracked_keys`).
            assert!(
                limits.tracked_keys() <= MAX + 1,
                "{} keys with one connection open",
                limits.tracked_keys()
            );
            drop(c);
            // The server drops that entry when the connection's task ends.
            let deadline = Instant::now() + WAIT;
            while limits.open_addresses() != 0 {
                assert!(Instant::now() < deadline, "connection task did not end");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(
                limits.tracked_keys() <= MAX,
                "{} keys after the connection closed",
                limits.tracked_keys()
            );
        }
    }
    // The gateway itself counted the five real connections among the spray (the spray never reached it as one).
    assert_eq!(gw.gw.metrics().connections.get(), 5);
}

// ---------------------------------------------------------------------------------------------------------------
// Handshake deadline and header limits
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_tcp_client_is_cut_at_the_handshake_deadline() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| c.server.handshake_timeout = Duration::from_millis(500)).await;
    let started = Instant::now();
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(WAIT, tcp.read(&mut buf))
        .await
        .expect("server closes the silent connection");
    let elapsed = started.elapsed();
    assert!(matches!(r, Ok(0) | Err(_)), "expected EOF, got {r:?}");
    assert!(elapsed >= Duration::from_millis(400), "cut too early: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "cut too late: {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_after_tls_are_cut_at_the_handshake_deadline() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| c.server.handshake_timeout = Duration::from_millis(500)).await;
    let started = Instant::now();
    let tls = gw.tls().await;
    let (mut rd, mut wr) = tokio::io::split(tls);
    // Drip a header line every 100 ms for up to 10 s: far past the deadline if nothing cuts it.
    let drip = tokio::spawn(async move {
        let _ = wr.write_all(b"GET /ws HTTP/1.1\r\nHost: localhost\r\n").await;
        for i in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if wr.write_all(format!("X-Slow-{i}: y\r\n").as_bytes()).await.is_err() || wr.flush().await.is_err() {
                break;
            }
        }
    });
    let mut got = Vec::new();
    let r = tokio::time::timeout(WAIT, rd.read_to_end(&mut got))
        .await
        .expect("server cuts the slow client");
    let elapsed = started.elapsed();
    drip.abort();
    let text = String::from_utf8_lossy(&got);
    assert!(!text.contains(" 101 "), "slow client was upgraded: {text}");
    drop(r); // EOF or a reset: either way the server cut it
    assert!(elapsed < Duration::from_secs(3), "cut too late: {elapsed:?}");
}

#[tokio::test]
async fn oversized_headers_are_refused_without_upgrade() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| c.server.max_header_bytes = 8192).await;
    let pad = "a".repeat(20_000);
    let (status, _) = raw_upgrade(&gw, WS, &[("X-Pad", &pad)]).await;
    // hyper answers 431 when the head outgrows its buffer.
    assert_eq!(status, 431);
    // Just under the limit still works.
    let pad = "a".repeat(4000);
    assert!(gw.client_with(WS, &[("x-pad", &pad)]).await.is_ok());
}

// ---------------------------------------------------------------------------------------------------------------
// Message rates, rooms per connection
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn message_rate_gives_rate_limited_and_nothing_is_published() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.limits.messages_per_second = 1;
        c.limits.messages_burst = 5;
    })
    .await;
    let nc = nats.client().await;
    let mut sub = nats_sub(&nc, "rooms.r").await;
    let mut c = gw.client().await;
    c.join("r").await; // 1 of the 5
    for i in 1..=6 {
        feed(
            &mut c,
            json!({"op": "publish", "room": "r", "data": {"seq": i}, "id": i}),
        )
        .await;
    }
    c.ws.flush().await.unwrap();
    let mut replies = std::collections::BTreeMap::new();
    while replies.len() < 6 {
        let r = c.recv().await;
        replies.insert(r["id"].as_u64().expect("reply with id"), r);
    }
    for i in 1..=4 {
        assert_eq!(replies[&i]["op"], "ack", "{}", replies[&i]);
    }
    for i in 5..=6 {
        assert_eq!(
            (replies[&i]["op"].as_str(), replies[&i]["code"].as_str()),
            (Some("error"), Some("rate_limited"))
        );
    }
    // Once the budget refills, a sentinel goes out on the gateway's NATS connection, after 5 and 6 had they been
    // published: NATS must have seen 1..4 and then the sentinel.
    let deadline = Instant::now() + WAIT;
    loop {
        let r = c
            .request(json!({"op": "publish", "room": "r", "data": {"sentinel": true}}), 100)
            .await;
        if r["op"] == "ack" {
            break;
        }
        assert_eq!(r["code"], "rate_limited", "{r}");
        assert!(Instant::now() < deadline, "budget never refilled");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut seen = Vec::new();
    loop {
        let m = next_msg(&mut sub).await;
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        if v["sentinel"] == true {
            break;
        }
        seen.push(v["seq"].as_u64().unwrap());
    }
    assert_eq!(seen, vec![1, 2, 3, 4]);
}

#[tokio::test]
async fn byte_rate_gives_rate_limited() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.limits.max_message_size = 1024;
        c.limits.max_frame_size = 1024;
        c.limits.bytes_per_second = 1;
        c.limits.bytes_burst = 2048;
    })
    .await;
    let mut c = gw.client().await;
    c.join("r").await;
    let big = "x".repeat(900);
    for i in 1..=2 {
        let r = c.request(json!({"op": "publish", "room": "r", "data": big}), i).await;
        assert_eq!(r["op"], "ack", "{r}");
    }
    let r = c.request(json!({"op": "publish", "room": "r", "data": big}), 3).await;
    assert_eq!(r["code"], "rate_limited");
}

#[tokio::test]
async fn sustained_abuse_is_closed_with_1008() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.limits.messages_per_second = 1;
        c.limits.messages_burst = 5;
        c.limits.max_rate_violations = 5;
    })
    .await;
    let mut c = gw.client().await;
    for i in 0..50 {
        // The server may close mid-flood; later sends can fail.
        if c.ws
            .feed(Message::Text(json!({"op": "ping", "id": i}).to_string().into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let _ = c.ws.flush().await;
    let (code, reason) = c.expect_close().await;
    assert_eq!((code, reason.as_str()), (1008, "rate limit exceeded repeatedly"));
}

#[tokio::test]
async fn per_user_rate_is_shared_by_the_users_connections() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| {
        keys.apply(c);
        c.limits.messages_per_second = 1;
        c.limits.messages_burst = 10;
    })
    .await;
    let auth = bearer(&token("ann", json!({})));
    let mut tab1 = gw.client_with(WS, &[("authorization", &auth)]).await.unwrap();
    let mut tab2 = gw.client_with(WS, &[("authorization", &auth)]).await.unwrap();
    let mut bob = gw
        .client_with(WS, &[("authorization", &bearer(&token("bob", json!({}))))])
        .await
        .unwrap();
    for i in 0..6 {
        assert_eq!(tab1.request(json!({"op": "ping"}), i).await["op"], "pong");
    }
    // tab2 has its own per-connection budget of 10, but ann's shared budget has only 4 left.
    let mut codes = Vec::new();
    for i in 0..6 {
        let r = tab2.request(json!({"op": "ping"}), i).await;
        codes.push(r["code"].as_str().unwrap_or(r["op"].as_str().unwrap()).to_string());
    }
    assert_eq!(codes, ["pong", "pong", "pong", "pong", "rate_limited", "rate_limited"]);
    assert_eq!(tab1.request(json!({"op": "ping"}), 99).await["code"], "rate_limited");
    for i in 0..6 {
        assert_eq!(
            bob.request(json!({"op": "ping"}), i).await["op"],
            "pong",
            "bob has his own budget"
        );
    }
}

#[tokio::test]
async fn max_rooms_per_connection_is_too_many_rooms() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| c.rooms.max_rooms_per_connection = 2).await;
    let mut c = gw.client().await;
    c.join("a").await;
    c.join("b").await;
    let r = c.request(json!({"op": "join", "room": "c"}), 1).await;
    assert_eq!(
        (r["op"].as_str(), r["code"].as_str()),
        (Some("error"), Some("too_many_rooms"))
    );
    // Re-joining a room already held is not a new room.
    c.join("a").await;
    let r = c.request(json!({"op": "leave", "room": "a"}), 2).await;
    assert_eq!(r["op"], "ack");
    c.join("c").await;
}

// ---------------------------------------------------------------------------------------------------------------
// Heartbeat
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_closes_a_dead_client_and_keeps_a_live_one() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.limits.heartbeat_interval = Duration::from_millis(200);
        c.limits.heartbeat_timeout = Duration::from_secs(1);
    })
    .await;
    let mut dead = gw.client().await;
    let mut live = gw.client().await;
    // `dead` is not polled meanwhile, so it never answers the server's pings.
    poll_quietly(&mut live, Duration::from_millis(2500)).await;
    assert_eq!(
        live.request(json!({"op": "ping"}), 1).await["op"],
        "pong",
        "a polled client stays open"
    );
    // Read what the server wrote to `dead` off the TLS stream itself, up to the end of the connection: through
    // tungstenite, reading would first answer the buffered pings, and writing to a socket the server has closed can
    // end in a reset that loses the close frame -- the close code must be seen, not assumed.
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(WAIT, dead.ws.get_mut().read_to_end(&mut raw))
        .await
        .expect("dead client closed in time");
    let frames = common::frames::parse_all(&raw);
    let (close, before) = frames.split_last().expect("frames from the server");
    assert!(
        before.iter().all(|f| f.opcode == common::frames::PING),
        "only heartbeat pings before the close: {before:?}"
    );
    assert!(!before.is_empty(), "the server pinged the dead client first");
    assert_eq!(close.close_code(), (1001, "heartbeat timeout".to_string()));
}

// ---------------------------------------------------------------------------------------------------------------
// Isolation from a flooding client
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooding_client_does_not_delay_an_ordinary_client_in_the_same_room() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.limits.messages_per_second = 50;
        c.limits.messages_burst = 50;
        c.limits.max_rate_violations = u32::MAX; // keep the flooder connected so it floods for the whole test
    })
    .await;
    let mut flooder = gw.client().await;
    flooder.join("room").await;
    let mut ordinary = gw.client().await;
    ordinary.join("room").await;
    let flooder_conn = flooder.conn.clone();

    // The flooder writes as fast as it can and reads its replies, counting the refusals.
    let stop = tokio_util::sync::CancellationToken::new();
    let (mut tx, mut rx) = flooder.ws.split();
    let stop_w = stop.clone();
    let writer = tokio::spawn(async move {
        let frame = json!({"op": "publish", "room": "room", "data": {"flood": true}}).to_string();
        let mut sent = 0u64;
        while !stop_w.is_cancelled() {
            for _ in 0..64 {
                if tx.feed(Message::Text(frame.clone().into())).await.is_err() {
                    return sent;
                }
                sent += 1;
            }
            if tx.flush().await.is_err() {
                return sent;
            }
            tokio::task::yield_now().await;
        }
        sent
    });
    let reader = tokio::spawn(async move {
        let mut limited = 0u64;
        // Ends with the connection: 1001 at shutdown, or 4008 if its replies overflowed its own queue.
        while let Some(Ok(m)) = rx.next().await {
            if let Message::Text(t) = m
                && t.contains("rate_limited")
            {
                limited += 1;
            }
        }
        limited
    });

    // Meanwhile a backend publishes 50 stamped messages into the room, and the ordinary client publishes too.
    let nc = nats.client().await;
    let sender = tokio::spawn(async move {
        for i in 0..50u64 {
            let sent_at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64;
            nc.publish("rooms.room", json!({"seq": i, "at": sent_at}).to_string().into())
                .await
                .unwrap();
            nc.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let mut next_seq = 0u64;
    let mut worst = Duration::ZERO;
    let mut own = 0u64;
    let mut acks = 0u64;
    while next_seq < 50 {
        let m = ordinary.recv().await;
        assert_ne!(m["op"], "gap", "the ordinary client lost messages: {m}");
        if m["op"] == "ack" {
            acks += 1;
            continue;
        }
        assert_eq!(m["op"], "message", "{m}");
        if m["from"] == json!(flooder_conn) {
            continue;
        }
        let d = &m["data"];
        assert_eq!(d["seq"], next_seq, "in order, none lost: {m}");
        let now_us = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64;
        worst = worst.max(Duration::from_micros(now_us.saturating_sub(d["at"].as_u64().unwrap())));
        next_seq += 1;
        if next_seq.is_multiple_of(10) {
            // The ordinary client's own publishes are not throttled by the flooder's budget.
            ordinary
                .send(json!({"op": "publish", "room": "room", "data": {"mine": own}, "id": 1000 + own}))
                .await;
            own += 1;
        }
    }
    sender.await.unwrap();
    stop.cancel();
    let sent = tokio::time::timeout(WAIT, writer)
        .await
        .expect("flooder writer not stuck")
        .unwrap();
    // Collect the remaining acks of the ordinary client's publishes (message frames may interleave).
    while acks < own {
        let r = ordinary.recv().await;
        if r["op"] == "ack" {
            acks += 1;
        } else {
            assert_eq!(r["op"], "message", "{r}");
        }
    }
    drop(ordinary);
    // However the flooder's connection ended or ends, its server task finishes and lets go of the socket.
    gw.shutdown.cancel();
    let limited = tokio::time::timeout(WAIT, reader)
        .await
        .expect("flooder reader ends")
        .unwrap();
    // The flood was real as the gateway saw it (not as the flooder's own loop counted it): it read the frames and
    // refused them.
    let frames_in = gw.gw.metrics().frames_in.get();
    let refused = gw.gw.metrics().errors.get(roomwire::protocol::ErrorCode::RateLimited);
    assert!(
        frames_in > 1000 && refused >= 50 && limited >= 50,
        "the flood was real: {sent} sent, {frames_in} read, {refused} refused, {limited} refusals received"
    );
    assert!(worst < Duration::from_millis(1000), "worst delivery delay {worst:?}");
}
