//! Backends in control (issue 26, `docs/protocol.md`): server-side rooms from the token's `subs` claim (joined before
//! the `welcome`, reported there, never left by the client, recovered after a reconnect), and the commands backends
//! publish to `roomwire.control.<command>`: `disconnect`, `subscribe`, `unsubscribe`, `revoke` (kept in a KV bucket
//! for gateways started later), malformed and flooded commands. Real nats-server, real gateways, real wss clients.

mod common;

use std::time::Duration;

use common::{
    NatsServer, TestGateway, WsClient,
    jwt::{Keys, bearer, now, token},
    nats_barrier,
};
use roomwire::{config::Config, metrics::ControlOutcome, room_pattern::RoomPattern};
use serde_json::{Value, json};
use tokio::time::Instant;

const WS: &str = "/ws";

/// Tokens required, with the test keys; this gateway's id is `id`.
fn authed(keys: &Keys, id: &str) -> impl FnOnce(&mut Config) {
    let secret = keys.dir.path().join("hs.secret");
    let id = id.to_owned();
    move |c: &mut Config| {
        c.auth.allow_anonymous = false;
        c.auth.keys = vec![roomwire::config::JwtKey {
            kid: None,
            algorithm: jsonwebtoken::Algorithm::HS256,
            secret: Some(roomwire::config::SecretSource::File(secret)),
            public_key_file: None,
        }];
        c.server.gateway_id = Some(id);
    }
}

async fn connect(gw: &TestGateway, t: &str) -> WsClient {
    gw.client_with(WS, &[("authorization", &bearer(t))])
        .await
        .expect("upgrade accepted")
}

async fn command(nc: &async_nats::Client, name: &str, body: Value) {
    nc.publish(format!("roomwire.control.{name}"), body.to_string().into())
        .await
        .unwrap();
    nats_barrier(nc).await;
}

async fn backend_publish(nc: &async_nats::Client, room: &str, data: Value) {
    nc.publish(format!("rooms.{room}"), data.to_string().into())
        .await
        .unwrap();
    nats_barrier(nc).await;
}

/// Waits until `cond` holds, polling (a metric or registry read, not a sleep standing for an event).
async fn until(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_token_with_subs_receives_backend_messages_without_a_join_and_cannot_leave() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, authed(&keys, "gw1")).await;
    let nc = nats.client().await;
    let t = token("ann", json!({"subs": ["news", "team-7"], "rooms": ["lobby"]}));
    let mut c = connect(&gw, &t).await;
    assert_eq!(
        c.welcome["rooms"],
        json!([{"room":"news"},{"room":"team-7"}]),
        "{}",
        c.welcome
    );
    backend_publish(&nc, "team-7", json!({"hello": 1})).await;
    let m = c.recv_op("message").await;
    assert_eq!((m["room"].as_str(), &m["data"]), (Some("team-7"), &json!({"hello": 1})));
    // The client may not leave a server-side room, and it is still in it afterwards.
    let r = c.request(json!({"op":"leave","room":"news"}), 1).await;
    assert_eq!(
        (r["op"].as_str(), r["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "{r}"
    );
    backend_publish(&nc, "news", json!("still here")).await;
    assert_eq!(c.recv_op("message").await["data"], "still here");
    // It may read their presence or history even though its join patterns do not match: no `forbidden` there.
    let r = c.request(json!({"op":"history","room":"news","limit":1}), 2).await;
    assert_ne!(r["code"], "forbidden", "{r}");
    // The subs grant no publish right (the publish claim defaults to the join patterns).
    let r = c.request(json!({"op":"publish","room":"news","data":1}), 3).await;
    assert_eq!(r["code"], "forbidden", "{r}");
}

#[tokio::test]
async fn a_server_side_room_that_cannot_be_joined_is_reported_in_the_welcome() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| {
        authed(&keys, "gw1")(c);
        c.rooms.max_rooms_per_connection = 2;
        c.auth.personal_room = Some("user-{sub}".into());
        c.auth.join_personal_room = true;
    })
    .await;
    let nc = nats.client().await;
    let t = token("ann", json!({"subs": ["a.b", "ok", "ok", "third"]}));
    let c = connect(&gw, &t).await;
    assert_eq!(
        c.welcome["rooms"],
        json!([
            {"room":"a.b","error":"invalid_room"},
            {"room":"ok"},
            {"room":"third"},
            {"room":"user-ann","error":"too_many_rooms"},
        ]),
        "{}",
        c.welcome
    );
    let mut c = c;
    backend_publish(&nc, "third", json!(3)).await;
    assert_eq!(c.recv_op("message").await["room"], "third");
    assert_eq!(gw.gw.metrics().server_room_failures.get(), 2);
    // A token whose subs is not a list of strings is refused before the upgrade.
    let bad = token("ann", json!({"subs": "ok"}));
    assert_eq!(
        gw.client_with(WS, &[("authorization", &bearer(&bad))]).await.err(),
        Some(401)
    );
}

#[tokio::test]
async fn a_server_side_history_room_recovers_after_a_gateway_restart() {
    let store = tempfile::tempdir().unwrap();
    let dir = store.path().to_str().unwrap().to_owned();
    let nats = NatsServer::start_with(&["-js", "-sd", &dir]).await;
    let keys = Keys::new();
    let tweak = |c: &mut Config| {
        authed(&keys, "gw1")(c);
        c.history.enabled = true;
        c.history.rooms = vec![RoomPattern::new("h-*")];
    };
    let nc = nats.client().await;
    let t = token("ann", json!({"subs": ["h-feed", "plain"]}));
    let mut gw = TestGateway::start(&nats, tweak).await;
    let mut c = connect(&gw, &t).await;
    let rooms = c.welcome["rooms"].clone();
    assert_eq!(rooms[0]["room"], "h-feed", "{rooms}");
    let epoch = rooms[0]["epoch"]
        .as_str()
        .expect("a history room's welcome entry has its epoch")
        .to_owned();
    assert_eq!(rooms[0]["seq"], 0, "{rooms}");
    assert_eq!(rooms[1], json!({"room":"plain"}));
    for i in 1..=3 {
        backend_publish(&nc, "h-feed", json!({"n": i})).await;
    }
    let mut last = 0;
    for i in 1..=3 {
        let m = c.recv_op("message").await;
        assert_eq!(m["data"]["n"], i);
        last = m["seq"].as_u64().expect("seq");
    }
    // The gateway goes away; messages keep coming meanwhile.
    gw.shutdown().await;
    drop(c);
    for i in 4..=6 {
        backend_publish(&nc, "h-feed", json!({"n": i})).await;
    }
    let gw = TestGateway::start(&nats, tweak).await;
    let recover = json!({"h-feed": {"epoch": epoch, "seq": last}, "plain": {"epoch": "x", "seq": 1}}).to_string();
    let q: String = url_encode(&recover);
    let mut c = gw
        .client_with(&format!("{WS}?recover={q}"), &[("authorization", &bearer(&t))])
        .await
        .expect("upgrade accepted");
    let rooms = &c.welcome["rooms"];
    assert_eq!(rooms[0]["recovered"], true, "{rooms}");
    assert_eq!(rooms[0]["seq"], last + 3, "{rooms}");
    assert_eq!(
        rooms[1],
        json!({"room":"plain","recovered":false}),
        "no history: told it cannot"
    );
    // Exactly the missed ones, in order, then live ones: no gap, no duplicate.
    for i in 4..=6 {
        assert_eq!(c.recv_op("message").await["data"]["n"], i);
    }
    backend_publish(&nc, "h-feed", json!({"n": 7})).await;
    assert_eq!(c.recv_op("message").await["data"]["n"], 7);
    // A malformed `recover` is refused before the upgrade.
    let (status, body) = common::raw_upgrade(&gw, &format!("{WS}?recover=%7Bnope"), &[]).await;
    assert_eq!(status, 400, "{body}");
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn disconnect_by_user_closes_every_gateways_connections_within_a_second() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw1 = TestGateway::start(&nats, authed(&keys, "gw1")).await;
    let gw2 = TestGateway::start(&nats, authed(&keys, "gw2")).await;
    let nc = nats.client().await;
    let ann = token("ann", json!({"rooms": ["*"]}));
    let bob = token("bob", json!({"rooms": ["*"]}));
    let mut a1 = connect(&gw1, &ann).await;
    let mut a2 = connect(&gw2, &ann).await;
    let mut b1 = connect(&gw1, &bob).await;
    let started = Instant::now();
    command(&nc, "disconnect", json!({"user": "ann", "reason": "banned for spam"})).await;
    assert_eq!(a1.expect_close().await, (4003, "banned for spam".into()));
    assert_eq!(a2.expect_close().await, (4003, "banned for spam".into()));
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    // Bob stays; by connection id, only that connection goes, with the default reason.
    assert_eq!(b1.request(json!({"op":"ping"}), 1).await["op"], "pong");
    let mut b2 = connect(&gw2, &bob).await;
    command(&nc, "disconnect", json!({"conn": b2.conn})).await;
    assert_eq!(b2.expect_close().await, (4003, "disconnected by server".into()));
    assert_eq!(b1.request(json!({"op":"ping"}), 2).await["op"], "pong");
    until(|| gw2.gw.control().registry().is_empty(), "gw2's registry to empty").await;
}

#[tokio::test]
async fn subscribe_and_unsubscribe_move_a_users_connections() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw1 = TestGateway::start(&nats, authed(&keys, "gw1")).await;
    let gw2 = TestGateway::start(&nats, authed(&keys, "gw2")).await;
    let nc = nats.client().await;
    let ann = token("ann", json!({"rooms": ["lobby"]}));
    let mut a1 = connect(&gw1, &ann).await;
    let mut a2 = connect(&gw2, &ann).await;
    a1.join("lobby").await;
    command(&nc, "subscribe", json!({"user": "ann", "room": "team-1"})).await;
    assert_eq!(a1.recv_op("joined").await, json!({"op":"joined","room":"team-1"}));
    assert_eq!(a2.recv_op("joined").await, json!({"op":"joined","room":"team-1"}));
    backend_publish(&nc, "team-1", json!("hi team")).await;
    assert_eq!(a1.recv_op("message").await["data"], "hi team");
    assert_eq!(a2.recv_op("message").await["data"], "hi team");
    let r = a1.request(json!({"op":"leave","room":"team-1"}), 1).await;
    assert_eq!(r["code"], "forbidden", "{r}");
    // A room the client joined itself can be taken away too.
    command(&nc, "unsubscribe", json!({"user": "ann", "room": "team-1"})).await;
    command(&nc, "unsubscribe", json!({"user": "ann", "room": "lobby"})).await;
    for c in [&mut a1, &mut a2] {
        assert_eq!(
            c.recv_op("left").await,
            json!({"op":"left","room":"team-1","reason":"removed"})
        );
    }
    assert_eq!(
        a1.recv_op("left").await,
        json!({"op":"left","room":"lobby","reason":"removed"})
    );
    backend_publish(&nc, "team-1", json!("gone")).await;
    // The ping's pong comes first: nothing of team-1 in between.
    assert_eq!(a1.request(json!({"op":"ping"}), 2).await["op"], "pong");
    assert_eq!(a2.request(json!({"op":"ping"}), 2).await["op"], "pong");
    assert_eq!(gw1.gw.metrics().control_commands.get(ControlOutcome::Subscribe), 1);
}

#[tokio::test]
async fn revoke_by_jti_closes_the_connection_and_refuses_the_token_everywhere_and_later() {
    let store = tempfile::tempdir().unwrap();
    let dir = store.path().to_str().unwrap().to_owned();
    let nats = NatsServer::start_with(&["-js", "-sd", &dir]).await;
    let keys = Keys::new();
    let gw1 = TestGateway::start(&nats, authed(&keys, "gw1")).await;
    let gw2 = TestGateway::start(&nats, authed(&keys, "gw2")).await;
    let nc = nats.client().await;
    let revoked = token("ann", json!({"jti": "tok-1", "rooms": ["*"]}));
    let other = token("ann", json!({"jti": "tok-2", "rooms": ["*"]}));
    let mut c1 = connect(&gw1, &revoked).await;
    let mut c2 = connect(&gw1, &other).await;
    command(&nc, "revoke", json!({"jti": "tok-1", "until": now() + 600})).await;
    assert_eq!(c1.expect_close().await, (4001, "token revoked".into()));
    assert_eq!(c2.request(json!({"op":"ping"}), 1).await["op"], "pong");
    // Refused at the upgrade on the other gateway, and by `refresh`.
    let refused = gw2.client_with(WS, &[("authorization", &bearer(&revoked))]).await.err();
    assert_eq!(refused, Some(401));
    let r = c2.request(json!({"op":"refresh","token": revoked}), 2).await;
    assert_eq!(
        (r["code"].as_str(), r["message"].as_str()),
        (Some("unauthorized"), Some("token revoked"))
    );
    // A gateway started afterwards learns it from the bucket before it reports ready.
    let gw3 = TestGateway::start(&nats, authed(&keys, "gw3")).await;
    assert_eq!(gw3.gw.control().revocations().len(), 1);
    let refused = gw3.client_with(WS, &[("authorization", &bearer(&revoked))]).await.err();
    assert_eq!(refused, Some(401));
    connect(&gw3, &other).await;
    // By user: tokens issued before the time go, later ones stay.
    let old = token("bob", json!({"iat": now() - 100, "rooms": ["*"]}));
    let new = token("bob", json!({"iat": now() + 1, "rooms": ["*"]}));
    let mut b_old = connect(&gw2, &old).await;
    let mut b_new = connect(&gw2, &new).await;
    command(&nc, "revoke", json!({"user": "bob", "issued_before": now()})).await;
    assert_eq!(b_old.expect_close().await.0, 4001);
    assert_eq!(b_new.request(json!({"op":"ping"}), 1).await["op"], "pong");
    assert_eq!(
        gw1.client_with(WS, &[("authorization", &bearer(&old))]).await.err(),
        Some(401)
    );
}

#[tokio::test]
async fn malformed_and_flooded_commands_are_counted_and_harmless() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| {
        authed(&keys, "gw1")(c);
        c.nats.control_commands_per_second = 50;
    })
    .await;
    let nc = nats.client().await;
    let ann = token("ann", json!({"rooms": ["*"]}));
    let mut c = connect(&gw, &ann).await;
    c.join("lobby").await;
    let m = gw.gw.metrics().clone();
    for (name, body) in [
        ("disconnect", "not json".to_string()),
        ("disconnect", json!({"user": "a\nb"}).to_string()),
        ("revoke", json!({"jti": "x"}).to_string()),
        ("subscribe", json!({"user": "ann", "room": "a.>"}).to_string()),
        ("disconnect", "x".repeat(100_000)),
    ] {
        nc.publish(format!("roomwire.control.{name}"), body.into())
            .await
            .unwrap();
    }
    nc.publish("roomwire.control.reboot", "{}".into()).await.unwrap();
    nats_barrier(&nc).await;
    until(|| m.control_commands.get(ControlOutcome::Malformed) == 5, "5 malformed").await;
    until(|| m.control_commands.get(ControlOutcome::Unknown) == 1, "1 unknown").await;
    // A flood: past the rate, commands are dropped and counted, and the gateway keeps serving.
    for _ in 0..2_000 {
        nc.publish(
            "roomwire.control.unsubscribe",
            json!({"user":"nobody","room":"r"}).to_string().into(),
        )
        .await
        .unwrap();
    }
    nats_barrier(&nc).await;
    until(
        || {
            m.control_commands.get(ControlOutcome::RateLimited) + m.control_commands.get(ControlOutcome::Unsubscribe)
                == 2_000
        },
        "every flooded command accounted for",
    )
    .await;
    assert!(m.control_commands.get(ControlOutcome::RateLimited) >= 1_900);
    let mut other = connect(&gw, &ann).await;
    assert_eq!(other.request(json!({"op":"ping"}), 1).await["op"], "pong");
    backend_publish(&nc, "lobby", json!("alive")).await;
    assert_eq!(c.recv_op("message").await["data"], "alive");
}

#[tokio::test]
async fn overlapping_control_prefix_refuses_to_start() {
    let mut c = Config::default();
    c.auth.allow_anonymous = true;
    c.nats.control_prefix = "rooms.ctl".into();
    let e = c.validate().unwrap_err().to_string();
    assert!(
        e.contains("nats.control_prefix") && e.contains("rooms.subject_prefix"),
        "{e}"
    );
}

#[tokio::test]
async fn a_connection_dropped_while_its_server_side_rooms_are_joined_leaves_nothing() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, authed(&keys, "gw1")).await;
    let t = token("ann", json!({"subs": ["s-1", "s-2"]}));
    // NATS frozen: the first server-side join waits for its subscription, before any welcome.
    nats.pause_and_wait().await;
    let connecting = {
        let t = t.clone();
        let addr = gw.addr;
        let ca = gw.ca.clone();
        tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let tls = ca
                .connector()
                .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap();
            let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
                "wss://localhost:{}{WS}",
                addr.port()
            ))
            .unwrap();
            req.headers_mut().insert("authorization", bearer(&t).parse().unwrap());
            let (ws, _) = tokio_tungstenite::client_async(req, tls).await.unwrap();
            // Held open until the task is aborted; the welcome never comes while NATS is frozen.
            std::future::pending::<()>().await;
            drop(ws);
        })
    };
    until(
        || gw.gw.rooms().members_of("s-1") == 1,
        "the first server-side room's member registered",
    )
    .await;
    assert_eq!(gw.gw.control().registry().len(), 1);
    connecting.abort();
    let _ = connecting.await;
    until(|| gw.gw.metrics().connections_open.get() == 0, "the connection to end").await;
    assert_eq!(gw.gw.rooms().members_of("s-1"), 0, "ghost member");
    assert_eq!(gw.gw.rooms().members_of("s-2"), 0);
    assert!(gw.gw.control().registry().is_empty(), "registry entry left");
    nats.resume();
    until(|| gw.gw.rooms().is_empty(), "every room dropped").await;
}
