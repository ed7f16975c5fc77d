//! Authentication at the upgrade, against a real nats-server over real TLS: a missing, malformed, expired, forged
//! or wrongly signed token is refused with 401 (never a 101), even when anonymous clients are allowed; tokens are read
//! from the `Authorization` header, the query and the cookie; HS256, ES256 and EdDSA keys; claims that would reach a
//! header or a room name are validated; token time arithmetic saturates; a JWKS encryption key is refused at start.

mod common;

use std::time::Duration;

use common::{jwt::*, *};
use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use roomwire::{Gateway, config::JwtKey};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const WS: &str = "/ws";

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

#[tokio::test]
async fn sub_unfit_for_a_header_or_a_room_is_401_and_others_still_publish() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| {
        keys.require(c);
        c.auth.personal_room = Some("user-{sub}".into());
    })
    .await;
    let long = "u".repeat(129);
    for bad in [
        "ann\r\nX-Injected: 1",
        "ann\n",
        "ann\u{7f}",
        "an n",
        "ann.smith",
        long.as_str(),
    ] {
        let r = bearer_client(&gw, &token_all_rooms(bad, 600)).await;
        assert_eq!(r.err(), Some(401), "sub {bad:?} must be refused at the upgrade");
    }
    // The gateway is fine and an ordinary user's publishes carry the user header.
    let nc = nats.client().await;
    let mut sub = nc.subscribe("rooms.lobby").await.unwrap();
    nc.flush().await.unwrap();
    let mut c = bearer_client(&gw, &token_all_rooms("ann@example", 600))
        .await
        .expect("valid sub");
    c.join("lobby").await;
    c.publish("lobby", json!(1)).await;
    let m = next_msg(&mut sub).await;
    let user = m
        .headers
        .as_ref()
        .and_then(|h| h.get("Roomwire-User"))
        .map(|v| v.as_str().to_owned());
    assert_eq!(user.as_deref(), Some("ann@example"));
}

#[tokio::test]
async fn far_future_exp_is_a_session_not_a_panic() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| {
        keys.require(c);
        c.auth.max_session = Duration::from_secs(3);
        c.auth.expiry_warning = Duration::from_secs(1);
    })
    .await;
    let forever = signed(&json!({ "sub": "ann", "exp": 1e19, "nbf": -0.0, "iat": 1e300, "rooms": ["*"] }));
    let started = Instant::now();
    let mut c = bearer_client(&gw, &forever)
        .await
        .expect("a far-future exp is accepted");
    assert_eq!(c.request(json!({"op": "ping"}), 1).await["op"], "pong");
    // A refresh with the same absurd exp is fine too.
    let r = c.request(json!({"op": "refresh", "token": forever}), 2).await;
    assert_eq!(r["op"], "ack", "{r}");
    // Defined outcome: the session ends at max_session, warned first, with the token-expired close.
    c.recv_op("token_expiring").await;
    let (code, reason) = c.expect_close().await;
    assert_eq!((code, reason.as_str()), (4001, "token expired"));
    assert!(
        started.elapsed() >= Duration::from_millis(2900),
        "{:?}",
        started.elapsed()
    );
    // Absurd nbf is refused, not overflowed.
    let later = signed(&json!({ "sub": "ann", "exp": now() + 600, "nbf": 1e19 }));
    assert_eq!(bearer_client(&gw, &later).await.err(), Some(401));
    let negative = signed(&json!({ "sub": "ann", "exp": -5 }));
    assert_eq!(bearer_client(&gw, &negative).await.err(), Some(401));
    // Still serving.
    let mut d = bearer_client(&gw, &token_all_rooms("bob", 600))
        .await
        .expect("ordinary client");
    assert_eq!(d.request(json!({"op": "ping"}), 3).await["op"], "pong");
}

#[tokio::test]
async fn jwks_encryption_key_is_refused_at_startup() {
    let nats = NatsServer::start().await;
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = kp.public_key_raw();
    let b64 = |b: &[u8]| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    };
    let jwks = |usage: &str| {
        json!({ "keys": [{ "kty": "EC", "crv": "P-256", "kid": "k1", "use": usage,
            "x": b64(&raw[1..33]), "y": b64(&raw[33..65]) }] })
        .to_string()
    };
    for (usage, ok) in [("enc", false), ("sig", true)] {
        let path = dir.path().join(format!("jwks-{usage}.json"));
        std::fs::write(&path, jwks(usage)).unwrap();
        let mut config = test_config(&nats.url(), &ca);
        config.auth.jwks_file = Some(path);
        config.validate().unwrap();
        match Gateway::start(config, CancellationToken::new()).await {
            Ok(_) => assert!(ok, "use={usage} must be refused"),
            Err(e) => {
                let msg = e.to_string();
                assert!(!ok, "use={usage} refused: {msg}");
                assert!(
                    msg.contains("auth.jwks_file") && msg.contains("\"k1\"") && msg.contains("sig"),
                    "{msg}"
                );
            }
        }
    }
}
