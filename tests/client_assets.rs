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
