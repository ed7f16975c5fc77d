//! A session's token over time: in-band `refresh` (narrower rooms leave revoked rooms, a bad token is refused and
//! the connection stays, anonymous and other-user refreshes are refused before any signature check, refreshes have
//! their own rate and a flood of bogus ones costs bounded checks), expiry (a warning, then close 4001; the leeway is
//! one rule for accepting and for closing) and `auth.max_session`. Real TLS clients, a real nats-server.

mod common;

use std::time::Duration;

use common::{jwt::*, *};
use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use roomwire::config::JwtKey;
use serde_json::{Value, json};
use tokio::time::Instant;

const WS: &str = "/ws";

fn is_error(r: &Value, code: &str) -> bool {
    r["op"] == "error" && r["code"] == code
}

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

#[tokio::test]
async fn token_inside_the_leeway_lives_until_exp_plus_leeway() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| {
        keys.require(c);
        c.auth.leeway_secs = 3;
        c.auth.expiry_warning = Duration::from_millis(500);
    })
    .await;
    // exp one second ago (whole seconds, so 1 to 2 s of leeway remain): accepted, and NOT closed at once.
    let lapsed = signed(&json!({ "sub": "ann", "exp": now() - 1, "rooms": ["*"] }));
    let started = Instant::now();
    let mut c = bearer_client(&gw, &lapsed).await.expect("inside the leeway");
    assert_eq!(c.request(json!({"op": "ping"}), 1).await["op"], "pong");
    c.join("lobby").await;
    let (code, _) = c.expect_close().await;
    assert_eq!(code, 4001);
    let lived = started.elapsed();
    assert!(lived >= Duration::from_millis(900), "closed {lived:?} after connecting");
    // Past exp + leeway: refused at the upgrade.
    let dead = signed(&json!({ "sub": "ann", "exp": now() - 4 }));
    assert_eq!(bearer_client(&gw, &dead).await.err(), Some(401));
}

#[tokio::test]
async fn anonymous_and_other_user_refreshes_are_refused_without_a_signature_check() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| {
        keys.require(c);
        c.auth.allow_anonymous = true;
    })
    .await;
    let mut anon = gw.client().await;
    let mut ann = bearer_client(&gw, &token_all_rooms("ann", 600)).await.expect("ann");
    let before = gw.gw.auth().verifications();
    // A correctly signed token: an anonymous connection may not adopt it.
    let r = anon
        .request(json!({"op": "refresh", "token": token_all_rooms("ann", 600)}), 1)
        .await;
    assert!(is_error(&r, "unauthorized"), "{r}");
    // Another user's token, valid or forged: refused from its unverified `sub`.
    let forged = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({ "sub": "mallory", "exp": now() + 600 }),
        &EncodingKey::from_secret(b"guess"),
    )
    .unwrap();
    for (i, t) in [token_all_rooms("mallory", 600), forged].iter().enumerate() {
        let r = ann.request(json!({"op": "refresh", "token": t}), 10 + i as u64).await;
        assert!(is_error(&r, "unauthorized"), "{r}");
        assert_eq!(r["message"], "token is for another user");
    }
    assert_eq!(gw.gw.auth().verifications(), before, "no signature was checked");
    // A genuine refresh is still checked and accepted.
    assert_eq!(
        ann.request(json!({"op": "refresh", "token": token_all_rooms("ann", 900)}), 20)
            .await["op"],
        "ack"
    );
    assert_eq!(gw.gw.auth().verifications(), before + 1);
}

#[tokio::test]
async fn refreshes_have_their_own_rate() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| {
        keys.require(c);
        c.limits.refreshes_per_minute = 2;
    })
    .await;
    let mut c = bearer_client(&gw, &token_all_rooms("ann", 600)).await.expect("ann");
    let before = gw.gw.auth().verifications();
    for i in 0..2 {
        assert_eq!(
            c.request(json!({"op": "refresh", "token": token_all_rooms("ann", 600)}), i)
                .await["op"],
            "ack"
        );
    }
    for i in 2..6 {
        let r = c
            .request(json!({"op": "refresh", "token": token_all_rooms("ann", 600)}), i)
            .await;
        assert!(is_error(&r, "rate_limited"), "{r}");
    }
    assert_eq!(gw.gw.auth().verifications(), before + 2);
    // Other ops are not affected, and another connection has its own budget.
    assert_eq!(c.request(json!({"op": "ping"}), 9).await["op"], "pong");
    let mut d = bearer_client(&gw, &token_all_rooms("ann", 600))
        .await
        .expect("second connection");
    assert_eq!(
        d.request(json!({"op": "refresh", "token": token_all_rooms("ann", 600)}), 1)
            .await["op"],
        "ack"
    );
}

#[tokio::test]
async fn max_session_closes_4001_whatever_refreshes_arrive() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| {
        keys.require(c);
        c.auth.max_session = Duration::from_secs(3);
        c.auth.expiry_warning = Duration::from_secs(1);
        c.limits.refreshes_per_minute = 100;
    })
    .await;
    let started = Instant::now();
    let mut c = bearer_client(&gw, &token_all_rooms("ann", 3600)).await.expect("ann");
    // Refresh with hour-long tokens until the warning comes: the session end does not move.
    let mut id = 0;
    let warned = loop {
        id += 1;
        let r = c
            .request(json!({"op": "refresh", "token": token_all_rooms("ann", 3600)}), id)
            .await;
        if r["op"] == "token_expiring" {
            break r;
        }
        assert_eq!(r["op"], "ack", "{r}");
        // The expiry warning may arrive between two replies.
        if let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(200), c.ws.next()).await
            && let Ok(text) = m.to_text()
            && let Ok(v) = serde_json::from_str::<Value>(text)
            && v["op"] == "token_expiring"
        {
            break v;
        }
    };
    assert!(warned["in"].as_u64().unwrap() <= 1, "{warned}");
    let (code, reason) = c.expect_close().await;
    assert_eq!((code, reason.as_str()), (4001, "token expired"));
    let lived = started.elapsed();
    assert!(
        lived >= Duration::from_millis(2900) && lived < Duration::from_secs(6),
        "{lived:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bogus_refresh_flood_costs_bounded_checks_and_a_bystander_stays_fast() {
    const FLOODERS: usize = 12;
    const REFRESHES: u64 = 60;
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (key, pem) = es256(dir.path());
    let gw = TestGateway::start(&nats, |c| {
        c.auth.allow_anonymous = true;
        c.auth.keys = vec![JwtKey {
            kid: None,
            algorithm: Algorithm::ES256,
            secret: None,
            public_key_file: Some(pem),
        }];
    })
    .await;
    let sign = |sub: &str, k: &EncodingKey| {
        jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &json!({ "sub": sub, "exp": now() + 600 }),
            k,
        )
        .unwrap()
    };
    let attacker_key = EncodingKey::from_ec_pem(
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .unwrap()
            .serialize_pem()
            .as_bytes(),
    )
    .unwrap();
    let bogus = sign("eve", &attacker_key);
    let mut flooders = Vec::new();
    for _ in 0..FLOODERS {
        flooders.push(bearer_client(&gw, &sign("eve", &key)).await.expect("eve"));
    }
    // Anonymous flooders too: refused before any check.
    for _ in 0..FLOODERS {
        flooders.push(gw.client().await);
    }
    let mut bystander = gw.client().await;
    let before = gw.gw.auth().verifications();
    let flood = flooders.into_iter().map(|mut c| {
        let bogus = bogus.clone();
        tokio::spawn(async move {
            for i in 0..REFRESHES {
                let r = c.request(json!({"op": "refresh", "token": bogus}), i).await;
                assert!(is_error(&r, "unauthorized") || is_error(&r, "rate_limited"), "{r}");
            }
        })
    });
    let flood: Vec<_> = flood.collect();
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let t = Instant::now();
        assert_eq!(bystander.request(json!({"op": "ping"}), i).await["op"], "pong");
        worst = worst.max(t.elapsed());
    }
    for f in flood {
        f.await.unwrap();
    }
    let checks = gw.gw.auth().verifications() - before;
    // Each authenticated flooder gets `refreshes_per_minute` checks (4 by default), anonymous ones none; without
    // the bounds this would be FLOODERS * 2 * REFRESHES = 1440.
    assert!(checks <= FLOODERS as u64 * 4, "{checks} signature checks");
    // Generous (a debug build on a shared machine): the bound that cannot flake is the check count above.
    assert!(worst < Duration::from_secs(2), "bystander ping took {worst:?}");
}
