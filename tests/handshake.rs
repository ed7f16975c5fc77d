//! The HTTP phase before the upgrade, written by hand over real TLS: the handshake deadline (a silent client, slow
//! headers, no ClientHello, keep-alive requests), header limits (431, never a 101), each malformed upgrade with its
//! own status, and a frame pipelined before the 101. An ordinary client (the [`Bystander`]) keeps receiving room
//! messages throughout the attack cases. The table of cases and outcomes is in `docs/security.md`.

mod common;

use std::time::Duration;

use common::{frames::*, hostile::*, *};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

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

/// One header over `server.max_header_bytes`: hyper answers 431 (its buffer limit is `max_header_bytes`) and closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_header_is_431() {
    let h = Harness::start(|_| {}).await;
    let pad = "a".repeat(20_000);
    let req = upgrade_request(WS).replace("\r\n\r\n", &format!("\r\nX-Pad: {pad}\r\n\r\n"));
    let resp = http(&h.gw, req.as_bytes()).await;
    assert_eq!(resp.status, 431, "{}", resp.head);
    // Many medium headers adding up past the limit: the same.
    let many: String = (0..60).map(|i| format!("X-Pad-{i}: {}\r\n", "b".repeat(200))).collect();
    let req = upgrade_request(WS).replace("\r\n\r\n", &format!("\r\n{many}\r\n"));
    assert_eq!(http(&h.gw, req.as_bytes()).await.status, 431);
    h.by.assert_receiving().await;
}

/// More than 100 headers (hyper's header count limit), each tiny and all well under `max_header_bytes`: 431.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numerous_headers_are_431() {
    let h = Harness::start(|_| {}).await;
    let many: String = (0..101).map(|i| format!("X-{i}: y\r\n")).collect();
    assert!(many.len() < 4096);
    let req = upgrade_request(WS).replace("\r\n\r\n", &format!("\r\n{many}\r\n"));
    let resp = http(&h.gw, req.as_bytes()).await;
    assert_eq!(resp.status, 431, "{}", resp.head);
    // 90 headers (plus the 5 of the upgrade) are fine.
    let few: String = (0..90).map(|i| format!("X-{i}: y\r\n")).collect();
    let req = upgrade_request(WS).replace("\r\n\r\n", &format!("\r\n{few}\r\n"));
    assert_eq!(http(&h.gw, req.as_bytes()).await.status, 101);
    h.by.assert_receiving().await;
}

/// A request head dripped one byte every 20 ms is cut at the handshake deadline, with no response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_a_byte_at_a_time_are_cut_at_the_handshake_deadline() {
    let h = Harness::start(|_| {}).await;
    let started = Instant::now();
    let (mut rd, mut wr) = tokio::io::split(h.gw.tls().await);
    let req = format!(
        "GET {WS} HTTP/1.1\r\nHost: localhost\r\n{}",
        "X-Slow: y\r\n".repeat(100)
    );
    let drip = tokio::spawn(async move {
        for b in req.bytes() {
            if wr.write_all(&[b]).await.is_err() || wr.flush().await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let (got, _) = read_until_closed(&mut rd).await;
    let elapsed = started.elapsed();
    drip.abort();
    assert_eq!(
        String::from_utf8_lossy(&got),
        "",
        "no response, the connection is just closed"
    );
    assert!(
        elapsed >= HANDSHAKE - Duration::from_millis(100),
        "cut too early: {elapsed:?}"
    );
    assert!(
        elapsed < HANDSHAKE + Duration::from_secs(2),
        "cut too late: {elapsed:?}"
    );
    h.by.assert_receiving().await;
}

/// A TCP connection that never sends a ClientHello, or only part of one, is closed at the handshake deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_hello_is_cut_at_the_handshake_deadline() {
    let h = Harness::start(|_| {}).await;
    // A TLS record header announcing a 512-byte handshake message, then nothing.
    for prefix in [&b""[..], &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01][..]] {
        let started = Instant::now();
        let mut tcp = TcpStream::connect(h.gw.addr).await.unwrap();
        tcp.write_all(prefix).await.unwrap();
        let (got, _) = read_until_closed(&mut tcp).await;
        let elapsed = started.elapsed();
        assert!(got.is_empty(), "{prefix:?}: server sent {got:?}");
        assert!(
            elapsed >= HANDSHAKE - Duration::from_millis(100),
            "{prefix:?}: cut too early: {elapsed:?}"
        );
        assert!(
            elapsed < HANDSHAKE + Duration::from_secs(2),
            "{prefix:?}: cut too late: {elapsed:?}"
        );
    }
    // Plain HTTP on the TLS port is not a ClientHello: refused at once, well before the deadline.
    let started = Instant::now();
    let mut tcp = TcpStream::connect(h.gw.addr).await.unwrap();
    tcp.write_all(upgrade_request(WS).as_bytes()).await.unwrap();
    let (got, _) = read_until_closed(&mut tcp).await;
    assert!(started.elapsed() < HANDSHAKE, "plain HTTP took {:?}", started.elapsed());
    assert!(
        !String::from_utf8_lossy(&got).contains("HTTP/1.1"),
        "no HTTP answer in clear: {got:?}"
    );
    h.by.assert_receiving().await;
}

/// Keep-alive requests do not extend the handshake deadline: a connection that has not upgraded within
/// `handshake_timeout` of its accept is closed, whatever it sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_requests_are_cut_at_the_handshake_deadline() {
    // needs: finding 2 (admission)
    let h = Harness::start(|_| {}).await;
    let started = Instant::now();
    let mut tls = h.gw.tls().await;
    let mut buf = Vec::new();
    let mut answered = 0;
    while started.elapsed() < HANDSHAKE * 6 {
        if tls
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .is_err()
        {
            break;
        }
        match read_response(&mut tls, &mut buf).await {
            Some(r) => {
                assert_eq!(r.status, 200);
                answered += 1;
            }
            None => break,
        }
        tokio::time::sleep(HANDSHAKE / 5).await;
    }
    let elapsed = started.elapsed();
    assert!(answered >= 1, "the first request is answered");
    assert!(
        elapsed < HANDSHAKE + Duration::from_millis(400),
        "keep-alive kept the connection {elapsed:?} past a {HANDSHAKE:?} deadline ({answered} answers)"
    );
    h.by.assert_receiving().await;
}

/// Every malformed upgrade gets its own status and a short text body, never a 101.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_upgrade_requests_get_their_status() {
    let h = Harness::start(|_| {}).await;
    let good = upgrade_request(WS);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "plain GET",
            format!("GET {WS} HTTP/1.1\r\nHost: localhost\r\n\r\n"),
            426,
            "this endpoint only accepts WebSocket upgrades",
        ),
        (
            "Upgrade: h2c",
            good.replace("Upgrade: websocket", "Upgrade: h2c"),
            426,
            "this endpoint only accepts WebSocket upgrades",
        ),
        (
            "POST",
            good.replacen("GET", "POST", 1)
                .replace("\r\n\r\n", "\r\nContent-Length: 0\r\n\r\n"),
            400,
            "bad WebSocket upgrade: method must be GET",
        ),
        (
            "PUT",
            good.replacen("GET", "PUT", 1)
                .replace("\r\n\r\n", "\r\nContent-Length: 0\r\n\r\n"),
            400,
            "bad WebSocket upgrade: method must be GET",
        ),
        (
            "missing key",
            good.replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), ""),
            400,
            "bad WebSocket upgrade: missing Sec-WebSocket-Key",
        ),
        (
            "23-byte key",
            good.replace(KEY, &KEY[1..]),
            400,
            "bad WebSocket upgrade: malformed Sec-WebSocket-Key",
        ),
        (
            "25-byte key",
            good.replace(KEY, &format!("{KEY}A")),
            400,
            "bad WebSocket upgrade: malformed Sec-WebSocket-Key",
        ),
        (
            "version 8",
            good.replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"),
            400,
            "bad WebSocket upgrade: Sec-WebSocket-Version must be 13",
        ),
        (
            "no version",
            good.replace("Sec-WebSocket-Version: 13\r\n", ""),
            400,
            "bad WebSocket upgrade: Sec-WebSocket-Version must be 13",
        ),
        (
            "missing Connection: upgrade",
            good.replace("Connection: Upgrade", "Connection: keep-alive"),
            400,
            "bad WebSocket upgrade: missing `Connection: upgrade`",
        ),
        (
            "HTTP/1.0",
            good.replace("HTTP/1.1", "HTTP/1.0"),
            400,
            "bad WebSocket upgrade: HTTP/1.1 required",
        ),
        ("unknown path", upgrade_request("/nope"), 404, "not found"),
    ];
    for (what, req, status, body) in &cases {
        let resp = http(&h.gw, req.as_bytes()).await;
        assert_eq!(
            (resp.status, resp.body.trim()),
            (*status, *body),
            "{what}: {}{}",
            resp.head,
            resp.body
        );
        if *status == 426 {
            assert_eq!(resp.header("upgrade"), Some("websocket"), "{what}");
        }
    }
    // The same request, well formed, is upgraded.
    assert_eq!(http(&h.gw, good.as_bytes()).await.status, 101);
    h.by.assert_receiving().await;
}

/// A WebSocket frame sent in the same packet as the upgrade request, before the 101, is not lost: hyper hands the
/// bytes it read ahead to the upgraded connection, and the gateway answers the frame after the welcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_pipelined_before_the_101_is_read_after_the_welcome() {
    let h = Harness::start(|_| {}).await;
    let ping = client(TEXT, br#"{"op":"ping","id":7}"#);
    let (mut ws, _) = RawWs::connect_pipelined(&h.gw, &ping).await;
    assert_eq!(ws.next_json().await, json!({"op":"pong","id":7}));
    ws.send(&client(TEXT, br#"{"op":"ping","id":8}"#)).await;
    assert_eq!(ws.next_json().await, json!({"op":"pong","id":8}));
    h.by.assert_receiving().await;
}
