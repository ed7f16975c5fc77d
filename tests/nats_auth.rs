//! Credentials and TLS toward NATS (issue 13) against real nats-server processes: user/password, token, NKey,
//! `.creds` (operator mode, JWTs made here), TLS with a CA file; refused credentials stop the start with the reason
//! instead of a silent retry loop.

mod common;

use std::path::Path;

use common::{NatsServer, TestCa, TestGateway, jwt::b64url};
use roomwire::config::{Config, SecretSource};
use serde_json::json;

/// A nats-server with `conf` (without a port: the harness picks one).
async fn nats_with(dir: &Path, conf: &str) -> NatsServer {
    let path = dir.join("nats.conf");
    std::fs::write(&path, conf).unwrap();
    NatsServer::start_with(&["-c", path.to_str().unwrap()]).await
}

fn secret_file(dir: &Path, name: &str, value: &str) -> SecretSource {
    let path = dir.join(name);
    std::fs::write(&path, value).unwrap();
    SecretSource::File(path)
}

/// A client joins `room` on the gateway; `backend` publishes to it; the client gets it.
async fn delivers(gw: &TestGateway, backend: &async_nats::Client, room: &str) {
    let mut c = gw.client().await;
    c.join(room).await;
    backend
        .publish(format!("rooms.{room}"), json!({"via": "nats"}).to_string().into())
        .await
        .unwrap();
    backend.flush().await.unwrap();
    let m = c.recv_op("message").await;
    assert_eq!(m["data"], json!({"via": "nats"}));
}

async fn start_err(nats_url: &str, tweak: impl FnOnce(&mut Config)) -> String {
    let ca = TestCa::new();
    let mut config = common::test_config(nats_url, &ca);
    tweak(&mut config);
    let started = std::time::Instant::now();
    let err = roomwire::gateway::Gateway::start(config, Default::default())
        .await
        .expect_err("refused credentials stop the start");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "answered promptly"
    );
    err.to_string()
}

#[tokio::test]
async fn user_and_password_are_used_and_a_wrong_password_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let nats = nats_with(dir.path(), "authorization { user: rw, password: s3cret }\n").await;
    let backend = async_nats::ConnectOptions::with_user_and_password("rw".into(), "s3cret".into())
        .connect(nats.url())
        .await
        .unwrap();
    let gw = TestGateway::start(&nats, |c| {
        c.nats.user = Some("rw".into());
        c.nats.password = Some(secret_file(dir.path(), "pass", "s3cret\n"));
    })
    .await;
    delivers(&gw, &backend, "auth-up").await;

    let err = start_err(&nats.url(), |c| {
        c.nats.user = Some("rw".into());
        c.nats.password = Some(secret_file(dir.path(), "wrong", "nope"));
    })
    .await;
    assert!(err.contains("authorization violation"), "{err}");
}

#[tokio::test]
async fn a_token_and_an_nkey_are_used() {
    let dir = tempfile::tempdir().unwrap();
    let user = nkeys::KeyPair::new_user();
    let conf = format!("authorization {{ users = [ {{ nkey: {} }} ] }}\n", user.public_key());
    let nats = nats_with(dir.path(), &conf).await;
    let seed = user.seed().unwrap();
    let backend = async_nats::ConnectOptions::with_nkey(seed.clone())
        .connect(nats.url())
        .await
        .unwrap();
    let gw = TestGateway::start(&nats, |c| {
        c.nats.nkey_seed = Some(secret_file(dir.path(), "seed", &seed))
    })
    .await;
    delivers(&gw, &backend, "nkey-up").await;
    // Another key is refused at start.
    let other = nkeys::KeyPair::new_user().seed().unwrap();
    let err = start_err(&nats.url(), |c| {
        c.nats.nkey_seed = Some(secret_file(dir.path(), "other", &other))
    })
    .await;
    assert!(err.contains("authorization violation"), "{err}");

    let dir2 = tempfile::tempdir().unwrap();
    let nats = nats_with(dir2.path(), "authorization { token: t0ken }\n").await;
    let backend = async_nats::ConnectOptions::with_token("t0ken".into())
        .connect(nats.url())
        .await
        .unwrap();
    let gw = TestGateway::start(&nats, |c| {
        c.nats.token = Some(secret_file(dir2.path(), "token", "t0ken"))
    })
    .await;
    delivers(&gw, &backend, "token-up").await;
}

#[tokio::test]
async fn tls_to_nats_with_a_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(); // a CA and a certificate for 127.0.0.1, used here by nats-server
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    let conf = format!(
        "tls {{ cert_file: {:?}, key_file: {:?} }}\n",
        ca.cert_file.to_str().unwrap(),
        ca.key_file.to_str().unwrap()
    );
    let nats = nats_with(dir.path(), &conf).await;
    let backend = async_nats::ConnectOptions::new()
        .add_root_certificates(ca_file.clone())
        .require_tls(true)
        .connect(nats.url())
        .await
        .unwrap();
    let gw = TestGateway::start(&nats, |c| c.nats.tls_ca_file = Some(ca_file.clone())).await;
    delivers(&gw, &backend, "tls-up").await;

    // A CA that did not sign the server's certificate: async-nats reports the failed handshake as an I/O error, like
    // an unreachable server, so the gateway starts, stays not ready, and keeps trying (docs/operations.md).
    let wrong = TestCa::new();
    let wrong_file = dir.path().join("wrong-ca.pem");
    std::fs::write(&wrong_file, &wrong.ca_pem).unwrap();
    let ca2 = std::sync::Arc::new(TestCa::new());
    let mut config = common::test_config(&nats.url(), &ca2);
    config.nats.tls_ca_file = Some(wrong_file);
    let refused_before = nats.log().matches(HANDSHAKE_ERROR).count();
    let gw = roomwire::gateway::Gateway::start(config, Default::default())
        .await
        .expect("starts");
    // Not a sleep: wait until the server has seen the gateway's TLS handshake fail twice (a first attempt and a
    // retry), so the gateway has really tried that CA. A gateway that accepted the server anyway would be connected,
    // and ready, by then. (The gateway above, with the right CA, is the positive control: it delivered.)
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while nats.log().matches(HANDSHAKE_ERROR).count() < refused_before + 2 {
        assert!(!gw.ready(), "not ready with a CA that does not verify the server");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway did not try to connect twice:\n{}",
            nats.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!gw.ready(), "not ready with a CA that does not verify the server");
    // A CA file that is not there stops the start.
    let err = start_err(&nats.url(), |c| {
        c.nats.tls_ca_file = Some(dir.path().join("missing.pem"))
    })
    .await;
    assert!(err.contains("nats.tls_ca_file"), "{err}");
}

/// What nats-server logs when a client's TLS handshake fails (here: the client refused the server's certificate).
const HANDSHAKE_ERROR: &str = "TLS handshake error";

/// `header.claims.signature` of a NATS JWT signed by `issuer`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let header = b64url(json!({"typ": "JWT", "alg": "ed25519-nkey"}).to_string().as_bytes());
    let claims = json!({
        "jti": format!("{:032X}", rand_u128(subject)),
        "iat": 1_700_000_000u64,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let body = b64url(claims.to_string().as_bytes());
    let signing_input = format!("{header}.{body}");
    let sig = issuer.sign(signing_input.as_bytes()).unwrap();
    format!("{signing_input}.{}", b64url(&sig))
}

fn rand_u128(seed: &str) -> u128 {
    seed.bytes()
        .fold(0x9e37_79b9_7f4a_7c15u128, |h, b| h.rotate_left(7) ^ u128::from(b))
}

#[tokio::test]
async fn a_creds_file_in_operator_mode() {
    let dir = tempfile::tempdir().unwrap();
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let op_jwt = jwt(
        &operator,
        &operator.public_key(),
        "op",
        json!({"type": "operator", "version": 2}),
    );
    let acc_jwt = jwt(
        &operator,
        &account.public_key(),
        "app",
        json!({"type": "account", "version": 2,
               "limits": {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                          "wildcards": true, "conn": -1, "leaf": -1}}),
    );
    let user_jwt = jwt(
        &account,
        &user.public_key(),
        "gateway",
        json!({"type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}),
    );
    let conf = format!(
        "operator: {op_jwt}\nresolver: MEMORY\nresolver_preload: {{ {}: {acc_jwt} }}\n",
        account.public_key()
    );
    let nats = nats_with(dir.path(), &conf).await;
    let creds = format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().unwrap()
    );
    let creds_file = dir.path().join("gateway.creds");
    std::fs::write(&creds_file, creds).unwrap();
    let backend = async_nats::ConnectOptions::with_credentials_file(creds_file.clone())
        .await
        .unwrap()
        .connect(nats.url())
        .await
        .expect("backend with the creds");
    let gw = TestGateway::start(&nats, |c| c.nats.creds_file = Some(creds_file.clone())).await;
    delivers(&gw, &backend, "creds-up").await;

    // A user signed by an account the server does not know is refused at start.
    let stranger = nkeys::KeyPair::new_account();
    let bad_user = jwt(
        &stranger,
        &user.public_key(),
        "x",
        json!({"type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}),
    );
    let bad = dir.path().join("bad.creds");
    std::fs::write(
        &bad,
        format!(
            "-----BEGIN NATS USER JWT-----\n{bad_user}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        ),
    )
    .unwrap();
    let err = start_err(&nats.url(), |c| c.nats.creds_file = Some(bad)).await;
    assert!(err.contains("authorization violation"), "{err}");
}
