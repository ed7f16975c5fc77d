//! The files the gateway serves for browsers (`src/assets.rs`) and `/client/check`, over real TLS against a real
//! nats-server: content types, ETag revalidation, the demo only when `server.demo` is on, and the token check that
//! tells the browser client why an upgrade was refused.

mod common;

use common::{NatsServer, TestGateway};

fn request(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}\r\n")
}

#[tokio::test]
async fn client_library_is_served_with_type_and_etag() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    let (status, head, body) = gw.raw_head(&request("/client/roomwire.js", "")).await.unwrap();
    assert_eq!(status, 200, "{head}");
    let head = head.to_ascii_lowercase();
    assert!(head.contains("content-type: text/javascript; charset=utf-8"), "{head}");
    assert!(head.contains("cache-control: public, max-age=300"), "{head}");
    assert!(body.contains("export function connect"));
    let etag = head
        .lines()
        .find_map(|l| l.strip_prefix("etag: "))
        .expect("an etag")
        .to_owned();
    let (status, _, body) = gw
        .raw_head(&request("/client/roomwire.js", &format!("If-None-Match: {etag}\r\n")))
        .await
        .unwrap();
    assert_eq!(status, 304);
    assert!(body.is_empty());
    let (status, head, _) = gw.raw_head(&request("/client/roomwire.d.ts", "")).await.unwrap();
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/typescript")
    );
    // The demo is off by default.
    assert_eq!(gw.get("/").await.unwrap().0, 404);
    assert_eq!(gw.get("/demo/demo.js").await.unwrap().0, 404);
}

#[tokio::test]
async fn demo_is_served_when_on() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| c.server.demo = true).await;
    let (status, head, body) = gw.raw_head(&request("/", "")).await.unwrap();
    assert_eq!(status, 200);
    let head = head.to_ascii_lowercase();
    assert!(head.contains("content-type: text/html; charset=utf-8"), "{head}");
    assert!(head.contains("content-security-policy: default-src 'none'"), "{head}");
    assert!(body.contains("/client/roomwire.js") || body.contains("/demo/demo.js"));
    assert_eq!(gw.get("/demo/demo.js").await.unwrap().0, 200);
    assert_eq!(gw.get("/demo/demo.css").await.unwrap().0, 200);
}

#[tokio::test]
async fn token_check_answers_what_the_upgrade_would() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.server.allowed_origins = vec!["https://app.example.com".into()]
    })
    .await;
    let ok_origin = "Origin: https://app.example.com\r\n";
    // Anonymous allowed in the test config: no token is fine.
    assert_eq!(gw.raw_head(&request("/client/check", ok_origin)).await.unwrap().0, 200);
    let (status, _, body) = gw
        .raw_head(&request("/client/check?token=not-a-jwt", ok_origin))
        .await
        .unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(!body.trim().is_empty(), "the reason is in the body");
    let (status, head, _) = gw
        .raw_head(&request("/client/check", "Origin: https://evil.example.com\r\n"))
        .await
        .unwrap();
    assert_eq!(status, 403);
    assert!(!head.to_ascii_lowercase().contains("access-control-allow-origin"));
    let (status, head, _) = gw
        .raw_head(&request("/client/check", "Origin: https://app.example.com\r\n"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("access-control-allow-origin: https://app.example.com")
    );
}

/// Issue 22, finding 8: every `/client/check` costs a token check, so each is charged to its address's connection
/// rate like an upgrade, not only a connection's first request: a keep-alive loop of checks is answered 429 past the
/// burst, with no token work.
#[tokio::test]
async fn token_checks_on_a_keep_alive_connection_are_rate_limited() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.limits.connections_per_second_per_ip = 1;
        c.limits.connections_burst_per_ip = 5;
    })
    .await;
    let mut tls = gw.tls().await; // the accept took one of the burst
    let mut statuses = Vec::new();
    for _ in 0..8 {
        tls.write_all(b"GET /client/check?token=not-a-jwt HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        // One response: its head, then Content-Length bytes of body.
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        let status = loop {
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "the connection was closed after {statuses:?}");
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).into_owned();
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                continue;
            };
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .expect("content-length");
            if body.len() >= len {
                break head.split_whitespace().nth(1).unwrap().parse::<u16>().unwrap();
            }
        };
        statuses.push(status);
    }
    // The burst (5) was partly spent by this connection and the readiness probes of the start: a few 401s (the
    // token checked and refused), then 429s only (at 1/s nothing comes back within this loop).
    let first_429 = statuses
        .iter()
        .position(|&s| s == 429)
        .expect("no check was rate-limited");
    assert!(first_429 >= 1, "the first check is served: {statuses:?}");
    assert!(statuses[..first_429].iter().all(|&s| s == 401), "{statuses:?}");
    assert!(statuses[first_429..].iter().all(|&s| s == 429), "{statuses:?}");
}
