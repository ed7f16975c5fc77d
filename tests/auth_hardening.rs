//! Issue 8, findings 5 and 12: claims that reach a header or a room name are validated at the upgrade (401), token
//! time arithmetic saturates (an `exp` of 1e19 is a session bounded by `auth.max_session`, not a panic), the leeway
//! is one rule for accepting a token and for closing its connection, and `refresh` cannot be used to make the
//! gateway check signatures for free (anonymous and other-user refreshes are refused before any check, refreshes
//! have their own rate, checks run off the async workers). Real TLS clients, a real nats-server.
mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use roomwire::{
    Config, Gateway,
    config::{JwtKey, SecretSource},
};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "auth-hardening-hs256-secret";
const WS: &str = "/ws";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// The HMAC secret on disk; `apply` makes the gateway require HS256 tokens signed with it.
struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hs.secret"), format!("{SECRET}\n")).unwrap();
        Keys { dir }
    }

    fn apply(&self, c: &mut Config) {
        c.auth.allow_anonymous = false;
        c.auth.keys = vec![JwtKey {
            kid: None,
            algorithm: Algorithm::HS256,
            secret: Some(SecretSource::File(self.dir.path().join("hs.secret"))),
            public_key_file: None,
        }];
    }
}

/// An HS256 token with exactly these claims.
fn signed(claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn token(sub: &str, ttl: u64) -> String {
    signed(&json!({ "sub": sub, "exp": now() + ttl, "rooms": ["*"] }))
}

async fn connect(gw: &TestGateway, token: &str) -> Result<WsClient, u16> {
    gw.client_with(WS, &[("authorization", &format!("Bearer {token}"))])
        .await
}

fn is_error(r: &Value, code: &str) -> bool {
    r["op"] == "error" && r["code"] == code
}

// ---------------------------------------------------------------------------------------------------------------
// Finding 5: claims, time arithmetic, leeway
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn sub_unfit_for_a_header_or_a_room_is_401_and_others_still_publish() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| {
        keys.apply(c);
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
        let r = connect(&gw, &token(bad, 600)).await;
        assert_eq!(r.err(), Some(401), "sub {bad:?} must be refused at the upgrade");
    }
    // The gateway is fine and an ordinary user's publishes carry the user header.
    let nc = nats.client().await;
    let mut sub = nc.subscribe("rooms.lobby").await.unwrap();
    nc.flush().await.unwrap();
    let mut c = connect(&gw, &token("ann@example", 600)).await.expect("valid sub");
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
        keys.apply(c);
        c.auth.max_session = Duration::from_secs(3);
        c.auth.expiry_warning = Duration::from_secs(1);
    })
    .await;
    let forever = signed(&json!({ "sub": "ann", "exp": 1e19, "nbf": -0.0, "iat": 1e300, "rooms": ["*"] }));
    let started = Instant::now();
    let mut c = connect(&gw, &forever).await.expect("a far-future exp is accepted");
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
    assert_eq!(connect(&gw, &later).await.err(), Some(401));
    let negative = signed(&json!({ "sub": "ann", "exp": -5 }));
    assert_eq!(connect(&gw, &negative).await.err(), Some(401));
    // Still serving.
    let mut d = connect(&gw, &token("bob", 600)).await.expect("ordinary client");
    assert_eq!(d.request(json!({"op": "ping"}), 3).await["op"], "pong");
}

#[tokio::test]
async fn token_inside_the_leeway_lives_until_exp_plus_leeway() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| {
        keys.apply(c);
        c.auth.leeway_secs = 3;
        c.auth.expiry_warning = Duration::from_millis(500);
    })
    .await;
    // exp one second ago (whole seconds, so 1 to 2 s of leeway remain): accepted, and NOT closed at once.
    let lapsed = signed(&json!({ "sub": "ann", "exp": now() - 1, "rooms": ["*"] }));
    let started = Instant::now();
    let mut c = connect(&gw, &lapsed).await.expect("inside the leeway");
    assert_eq!(c.request(json!({"op": "ping"}), 1).await["op"], "pong");
    c.join("lobby").await;
    let (code, _) = c.expect_close().await;
    assert_eq!(code, 4001);
    let lived = started.elapsed();
    assert!(lived >= Duration::from_millis(900), "closed {lived:?} after connecting");
    // Past exp + leeway: refused at the upgrade.
    let dead = signed(&json!({ "sub": "ann", "exp": now() - 4 }));
    assert_eq!(connect(&gw, &dead).await.err(), Some(401));
}

// ---------------------------------------------------------------------------------------------------------------
// Finding 12: refresh as a CPU weapon, max session, JWKS use=enc
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn anonymous_and_other_user_refreshes_are_refused_without_a_signature_check() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| {
        keys.apply(c);
        c.auth.allow_anonymous = true;
    })
    .await;
    let mut anon = gw.client().await;
    let mut ann = connect(&gw, &token("ann", 600)).await.expect("ann");
    let before = gw.gw.auth().verifications();
    // A correctly signed token: an anonymous connection may not adopt it.
    let r = anon
        .request(json!({"op": "refresh", "token": token("ann", 600)}), 1)
        .await;
    assert!(is_error(&r, "unauthorized"), "{r}");
    // Another user's token, valid or forged: refused from its unverified `sub`.
    let forged = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({ "sub": "mallory", "exp": now() + 600 }),
        &EncodingKey::from_secret(b"guess"),
    )
    .unwrap();
    for (i, t) in [token("mallory", 600), forged].iter().enumerate() {
        let r = ann.request(json!({"op": "refresh", "token": t}), 10 + i as u64).await;
        assert!(is_error(&r, "unauthorized"), "{r}");
        assert_eq!(r["message"], "token is for another user");
    }
    assert_eq!(gw.gw.auth().verifications(), before, "no signature was checked");
    // A genuine refresh is still checked and accepted.
    assert_eq!(
        ann.request(json!({"op": "refresh", "token": token("ann", 900)}), 20)
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
        keys.apply(c);
        c.limits.refreshes_per_minute = 2;
    })
    .await;
    let mut c = connect(&gw, &token("ann", 600)).await.expect("ann");
    let before = gw.gw.auth().verifications();
    for i in 0..2 {
        assert_eq!(
            c.request(json!({"op": "refresh", "token": token("ann", 600)}), i).await["op"],
            "ack"
        );
    }
    for i in 2..6 {
        let r = c.request(json!({"op": "refresh", "token": token("ann", 600)}), i).await;
        assert!(is_error(&r, "rate_limited"), "{r}");
    }
    assert_eq!(gw.gw.auth().verifications(), before + 2);
    // Other ops are not affected, and another connection has its own budget.
    assert_eq!(c.request(json!({"op": "ping"}), 9).await["op"], "pong");
    let mut d = connect(&gw, &token("ann", 600)).await.expect("second connection");
    assert_eq!(
        d.request(json!({"op": "refresh", "token": token("ann", 600)}), 1).await["op"],
        "ack"
    );
}

#[tokio::test]
async fn max_session_closes_4001_whatever_refreshes_arrive() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| {
        keys.apply(c);
        c.auth.max_session = Duration::from_secs(3);
        c.auth.expiry_warning = Duration::from_secs(1);
        c.limits.refreshes_per_minute = 100;
    })
    .await;
    let started = Instant::now();
    let mut c = connect(&gw, &token("ann", 3600)).await.expect("ann");
    // Refresh with hour-long tokens until the warning comes: the session end does not move.
    let mut id = 0;
    let warned = loop {
        id += 1;
        let r = c
            .request(json!({"op": "refresh", "token": token("ann", 3600)}), id)
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

/// ES256 key pair on disk for the CPU test: checks cost real time.
fn es256(dir: &std::path::Path) -> (EncodingKey, std::path::PathBuf) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let path = dir.join("es256.pem");
    std::fs::write(&path, kp.public_key_pem()).unwrap();
    (EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(), path)
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
        flooders.push(connect(&gw, &sign("eve", &key)).await.expect("eve"));
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
