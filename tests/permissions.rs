//! Who may do what once connected: the token's `sub` in NATS headers and lifecycle events, anonymous permissions
//! and no user, join and publish outside the permitted room patterns (forbidden, the connection stays), personal
//! rooms. Real TLS clients, a real nats-server.

mod common;

use common::{jwt::*, *};
use futures_util::StreamExt;
use roomwire::config::Permissions;
use serde_json::{Value, json};

const WS: &str = "/ws";

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
            rpc: vec![],
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
