//! Logs of the real binary (issue 14): `[log] format = "json"` writes one JSON object per line, every connection's
//! lines carry its id, address and user, and a client's token never appears, whatever the level.

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use common::{NatsServer, TestCa, free_port};
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

const SECRET: &str = "a-test-hmac-secret-of-some-length-0123456789";

#[tokio::test]
async fn json_logs_parse_line_by_line_and_never_hold_a_token() {
    let nats = NatsServer::start().await;
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hs.secret"), SECRET).unwrap();
    let port = free_port();
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
[tls]
cert_file = {cert:?}
key_file = {key:?}
[nats]
url = "{nats}"
[auth]
allow_anonymous = false
[[auth.keys]]
algorithm = "HS256"
secret = {{ file = {secret:?} }}
[log]
format = "json"
level = "trace"
"#,
        cert = ca.cert_file.to_str().unwrap(),
        key = ca.key_file.to_str().unwrap(),
        nats = nats.url(),
        secret = dir.path().join("hs.secret").to_str().unwrap(),
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_roomwire"))
        .args(["--config", path.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines = std::thread::spawn(move || BufReader::new(stdout).lines().map_while(Result::ok).collect::<Vec<_>>());

    // Wait for the listener, then: one client with a valid token (query string, as browsers send it), one with a
    // forged one, one that sends its token again in a `refresh`.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "gateway did not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "alice", "exp": now + 600, "rooms": ["*"]}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let forged = format!("{}x", &token[..token.len() - 1]);
    for (t, ok) in [(&token, true), (&forged, false)] {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = ca.connector().connect(name, tcp).await.unwrap();
        let req = format!("wss://localhost:{port}/ws?token={t}")
            .into_client_request()
            .unwrap();
        match tokio_tungstenite::client_async(req, tls).await {
            Ok((mut ws, _)) => {
                assert!(ok, "a forged token was accepted");
                let join = json!({"op":"join","room":"logs","id":1}).to_string();
                ws.send(Message::text(join)).await.unwrap();
                let refresh = json!({"op":"refresh","token": t,"id":2}).to_string();
                ws.send(Message::text(refresh)).await.unwrap();
                let mut acks = 0;
                while acks < 2 {
                    if let Some(Ok(Message::Text(m))) = ws.next().await
                        && m.contains("\"id\"")
                    {
                        acks += 1;
                    }
                }
                ws.close(None).await.unwrap();
                while ws.next().await.is_some() {}
            }
            Err(_) => assert!(!ok, "the valid token was refused"),
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    terminate(child.id());
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    let lines = lines.join().unwrap();
    assert!(lines.len() > 5, "some logs: {lines:?}");
    let signature = token.rsplit('.').next().unwrap();
    let mut conn_lines = 0;
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
        assert!(
            !line.contains(signature) && !line.contains(&token),
            "a token in the logs: {line}"
        );
        if v["span"]["name"] == "conn" && v["span"]["user"].is_string() {
            assert!(v["span"]["id"].is_number() && v["span"]["peer"].is_string(), "{line}");
            conn_lines += 1;
        }
    }
    assert!(
        conn_lines > 0,
        "connection lines carry the connection's span: {lines:#?}"
    );
}

/// SIGTERM, as an orchestrator sends it.
fn terminate(pid: u32) {
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}
