//! Admission before the upgrade, over real TLS against a real nats-server: the handshake deadline is absolute from
//! accept (keep-alive requests do not extend it), connections are counted per address from accept and shed at once
//! over `limits.max_connections_per_ip` (the slot comes back exactly once on every path), `/healthz` stays 200 at
//! capacity while `/readyz` says "at capacity", and the forwarding header of trusted proxies is the configured one
//! only, read from its right-most untrusted hop, with malformed values refused (400).

mod common;

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use common::{NatsServer, TestGateway, WAIT, WsClient, raw_upgrade};
use roomwire::{config::ForwardedHeader, metrics::Rejected};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::client::TlsStream;

const WS: &str = "/ws";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The address the tests' "attacker" uses; ordinary clients come from other loopback addresses.
fn attacker() -> IpAddr {
    ip("127.0.0.1")
}

/// Reads one HTTP response (head + `Content-Length` body) from a keep-alive connection; `None` on EOF or error.
async fn read_response(tls: &mut TlsStream<TcpStream>) -> Option<(u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                let status = head.split_whitespace().nth(1)?.parse().ok()?;
                return Some((status, body.to_string()));
            }
        }
        match tokio::time::timeout(WAIT, tls.read(&mut chunk))
            .await
            .expect("read in time")
        {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Sends raw request bytes over TLS from `from` and returns (status, body) of the answer (the request should ask
/// for `Connection: close`).
async fn raw_from(gw: &TestGateway, from: IpAddr, request: &[u8]) -> (u16, String) {
    let mut tls = gw.try_tls_over(gw.tcp_from(from).await).await.expect("TLS handshake");
    tls.write_all(request).await.unwrap();
    read_response(&mut tls).await.expect("a response")
}

async fn get_from(gw: &TestGateway, from: IpAddr, path: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    raw_from(gw, from, req.as_bytes()).await
}

/// A raw WebSocket upgrade request (as bytes, so a test can put non-ASCII in a header).
fn upgrade_request(headers: &[(&str, &[u8])]) -> Vec<u8> {
    let mut req = format!(
        "GET {WS} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    )
    .into_bytes();
    for (k, v) in headers {
        req.extend_from_slice(k.as_bytes());
        req.extend_from_slice(b": ");
        req.extend_from_slice(v);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    req
}

/// `roomwire_rejections_total{reason=..}` as the gateway counts it.
fn rejections(gw: &TestGateway, reason: Rejected) -> u64 {
    gw.gw.metrics().rejections.get(reason)
}

/// Opens a WebSocket client from `from`, retrying while it is shed (a slot released by a connection that just
/// closed comes back asynchronously on the server).
async fn client_retrying(gw: &TestGateway, from: IpAddr, headers: &[(&str, &str)]) -> common::WsClient {
    let deadline = Instant::now() + WAIT;
    loop {
        match gw.try_client_from(from, WS, headers).await {
            Ok(c) => return c,
            Err(None) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("connection refused: {e:?}"),
        }
    }
}

/// Asserts that `from` can hold exactly `n` connections before any HTTP: `n` TLS handshakes complete (retrying
/// while earlier connections' slots come back) and the next one is shed at once. Returns the held connections.
async fn holds_exactly(gw: &TestGateway, from: IpAddr, n: usize) -> Vec<TlsStream<TcpStream>> {
    let mut held = Vec::new();
    let deadline = Instant::now() + WAIT;
    while held.len() < n {
        match gw.try_tls_over(gw.tcp_from(from).await).await {
            Ok(tls) => held.push(tls),
            Err(_) => {
                assert!(Instant::now() < deadline, "only {} of {n} slots came back", held.len());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let shed_before = rejections(gw, Rejected::ShedPerIp);
    let started = Instant::now();
    assert!(
        gw.try_tls_over(gw.tcp_from(from).await).await.is_err(),
        "connection {} from {from} was not shed",
        n + 1
    );
    assert!(
        started.elapsed() < gw.gw.config().server.handshake_timeout / 2,
        "shed at once, not at the handshake deadline"
    );
    assert_eq!(rejections(gw, Rejected::ShedPerIp), shed_before + 1);
    held
}

/// Sends a keep-alive `GET /healthz` every 400 ms (each restarts hyper's header timer, never the deadline) until
/// the gateway closes the connection; fails if it is still open at `give_up`. Returns the number of answers.
async fn keep_alive_until_cut(tls: &mut TlsStream<TcpStream>, give_up: Instant) -> usize {
    let mut answered = 0;
    loop {
        if tls
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .is_err()
        {
            return answered;
        }
        match read_response(tls).await {
            Some((status, body)) => {
                assert_eq!((status, body.as_str()), (200, "ok\n"));
                answered += 1;
            }
            None => return answered,
        }
        assert!(
            Instant::now() < give_up,
            "connection still open after {answered} keep-alive requests"
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Finding 2: the handshake deadline is absolute from accept
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn keep_alive_requests_are_cut_at_the_handshake_deadline() {
    const DEADLINE: Duration = Duration::from_secs(2);
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| c.server.handshake_timeout = DEADLINE).await;
    let timeouts_before = rejections(&gw, Rejected::HandshakeTimeout);
    let accepted = Instant::now();
    let mut tls = gw.try_tls_over(gw.tcp_from(attacker()).await).await.expect("TLS");
    let answered = keep_alive_until_cut(&mut tls, accepted + DEADLINE * 3).await;
    let cut_at = accepted.elapsed();
    assert!(
        answered >= 3,
        "keep-alive worked before the deadline ({answered} answers)"
    );
    assert!(
        cut_at >= DEADLINE - Duration::from_millis(100) && cut_at < DEADLINE + Duration::from_millis(1500),
        "cut after {cut_at:?}, deadline {DEADLINE:?}"
    );
    assert_eq!(rejections(&gw, Rejected::HandshakeTimeout), timeouts_before + 1);
}

#[tokio::test]
async fn upgrade_after_keep_alive_requests_still_works_within_the_deadline() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| c.server.handshake_timeout = Duration::from_secs(5)).await;
    let mut tls = gw.try_tls_over(gw.tcp_from(attacker()).await).await.expect("TLS");
    for _ in 0..3 {
        tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_response(&mut tls).await.expect("answer").0, 200);
    }
    let url = format!("wss://localhost:{}{WS}", gw.addr.port());
    let (ws, _) = tokio_tungstenite::client_async(url, tls).await.expect("upgrade");
    let mut c = common::WsClient {
        ws,
        conn: String::new(),
        welcome: serde_json::Value::Null,
    };
    c.recv_op("welcome").await;
    assert_eq!(c.request(json!({"op": "ping"}), 1).await["op"], "pong");
}

// ---------------------------------------------------------------------------------------------------------------
// Finding 2: per-address counting from accept
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn one_address_is_shed_at_accept_and_cannot_hold_the_global_cap() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.server.max_connections = 4;
        c.limits.max_connections_per_ip = 3;
    })
    .await;
    // The attacker opens more raw TCP connections than its share and never starts TLS. Before counting from
    // accept, 4 of them held the whole global cap until the handshake deadline.
    let mut raw = Vec::new();
    for _ in 0..6 {
        raw.push(gw.tcp_from(attacker()).await);
    }
    // Connections are accepted in order, so the last ones are past the per-address cap: closed at once.
    for (i, tcp) in raw.iter_mut().enumerate().skip(3) {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut byte)).await;
        assert!(
            matches!(read, Ok(Ok(0) | Err(_))),
            "raw connection {i} was not closed at once: {read:?}"
        );
    }
    assert_eq!(rejections(&gw, Rejected::ShedPerIp), 3);
    // An ordinary client from another address still gets in and works.
    let mut bystander = gw
        .try_client_from(ip("127.0.0.2"), WS, &[])
        .await
        .expect("bystander admitted");
    assert_eq!(bystander.request(json!({"op": "ping"}), 1).await["op"], "pong");
    // Now the gateway is full (3 held + bystander): liveness and metrics still answer, from a third address.
    assert_eq!(get_from(&gw, ip("127.0.0.3"), "/healthz").await, (200, "ok\n".into()));
    let (status, metrics) = get_from(&gw, ip("127.0.0.3"), "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("roomwire_rejections_total{reason=\"shed_per_ip\"} 3"),
        "{metrics}"
    );
    assert_eq!(
        gw.try_client_from(ip("127.0.0.3"), WS, &[]).await.err(),
        Some(Some(503))
    );
    // The bystander still works while the attacker holds its share.
    assert_eq!(bystander.request(json!({"op": "ping"}), 2).await["op"], "pong");
}

#[tokio::test]
async fn per_address_slot_comes_back_exactly_once_on_every_path() {
    const CAP: usize = 2;
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.server.handshake_timeout = Duration::from_secs(1);
        c.limits.max_connections_per_ip = CAP;
    })
    .await;
    let a = attacker();

    // Silent until the handshake deadline: the server closes them and their slots come back.
    let mut held = holds_exactly(&gw, a, CAP).await;
    for tls in &mut held {
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(WAIT, tls.read(&mut buf))
            .await
            .expect("closed at the deadline");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    drop(held);

    // Keep-alive HTTP requests until the deadline cuts them (the HTTP phase's own timeout path).
    let mut held = holds_exactly(&gw, a, CAP).await;
    let give_up = Instant::now() + WAIT;
    let cuts = held.iter_mut().map(|tls| keep_alive_until_cut(tls, give_up));
    for answered in futures_util::future::join_all(cuts).await {
        assert!(answered >= 1, "keep-alive answered before the deadline");
    }
    drop(held);

    // A failed TLS handshake (garbage instead of a ClientHello).
    for _ in 0..CAP {
        let mut tcp = gw.tcp_from(a).await;
        tcp.write_all(b"\x16\x03\x01\x00\x05hello, not TLS\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let _ = tokio::time::timeout(WAIT, tcp.read(&mut buf)).await.expect("closed");
    }
    drop(holds_exactly(&gw, a, CAP).await);

    // Plain HTTP requests and refused upgrades.
    for _ in 0..CAP {
        assert_eq!(get_from(&gw, a, "/healthz").await.0, 200);
        assert_eq!(get_from(&gw, a, "/nope").await.0, 404);
        assert_eq!(get_from(&gw, a, WS).await.0, 426);
    }
    drop(holds_exactly(&gw, a, CAP).await);

    // Upgraded WebSockets: the slot moves into the WebSocket task and comes back when it closes.
    let mut clients = Vec::new();
    for _ in 0..CAP {
        clients.push(client_retrying(&gw, a, &[]).await);
    }
    assert_eq!(
        gw.try_client_from(a, WS, &[]).await.err(),
        Some(None),
        "the cap holds upgraded connections"
    );
    for c in &mut clients {
        assert_eq!(c.request(json!({"op": "ping"}), 1).await["op"], "pong");
    }
    drop(clients);
    // Exactly CAP again: a slot released twice would let a third in, one never released would keep one out.
    drop(holds_exactly(&gw, a, CAP).await);
    let drained = Instant::now() + WAIT;
    while gw.gw.limits().tracked_keys() > 1 {
        assert!(
            Instant::now() < drained,
            "per-IP entries left: {}",
            gw.gw.limits().tracked_keys()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn connection_rate_is_charged_at_accept() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.limits.connections_per_second_per_ip = 1;
        c.limits.connections_burst_per_ip = 5;
        // The readiness probes come from 127.0.0.1: as a trusted proxy it is not charged at accept, so the probes
        // cannot spend a burst (or be shed) before the test starts.
        c.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let a = ip("127.0.0.4");
    let mut opened = 0;
    let mut shed = false;
    for _ in 0..8 {
        match gw.try_tls_over(gw.tcp_from(a).await).await {
            Ok(_) => opened += 1,
            Err(_) => {
                shed = true;
                break;
            }
        }
    }
    assert!(shed, "the new-connection rate was not enforced at accept");
    // One cell per second refills: a slow machine may fit one more in.
    assert!((5..=6).contains(&opened), "{opened} connections before the first shed");
    assert_eq!(rejections(&gw, Rejected::ShedRate), 1);
    assert!(
        gw.try_client_from(ip("127.0.0.5"), WS, &[]).await.is_ok(),
        "other addresses unaffected"
    );
}

// ---------------------------------------------------------------------------------------------------------------
// Finding 3: /healthz at capacity
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn healthz_is_200_and_readyz_says_at_capacity_when_full() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| c.server.max_connections = 1).await;
    let mut only = client_retrying_503(&gw).await;
    let from = ip("127.0.0.2");
    assert_eq!(get_from(&gw, from, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(get_from(&gw, from, "/readyz").await, (503, "at capacity\n".into()));
    let (status, metrics) = get_from(&gw, from, "/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("roomwire_connections_open 1"), "{metrics}");
    assert_eq!(gw.try_client_from(from, WS, &[]).await.err(), Some(Some(503)));
    assert_eq!(get_from(&gw, from, "/nope").await.0, 404);
    // Over the cap, one answer per connection: no keep-alive on a borrowed slot.
    let mut tls = gw.try_tls_over(gw.tcp_from(from).await).await.expect("TLS");
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut tls).await.expect("answer").0, 200);
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut rest))
        .await
        .expect("closed after one answer");
    assert_eq!(only.request(json!({"op": "ping"}), 1).await["op"], "pong");
    // With room again, /readyz is 200.
    drop(only);
    gw.wait_ready(true).await;
}

/// The one client of a `max_connections = 1` gateway (the readiness probe may hold the slot for a moment).
async fn client_retrying_503(gw: &TestGateway) -> common::WsClient {
    let deadline = Instant::now() + WAIT;
    loop {
        match gw.try_client_from(attacker(), WS, &[]).await {
            Ok(c) => return c,
            Err(Some(503)) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("refused: {e:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Finding 7: forwarded-address spoofing
// ---------------------------------------------------------------------------------------------------------------

/// A gateway behind a "proxy" at 127.0.0.1 that forwards `header`; one connection per client address.
async fn behind_proxy(nats: &NatsServer, header: ForwardedHeader) -> TestGateway {
    TestGateway::start(nats, move |c| {
        c.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        c.server.forwarded_header = header;
        c.limits.max_connections_per_ip = 1;
    })
    .await
}

#[tokio::test]
async fn only_the_configured_forwarding_header_is_read() {
    let nats = NatsServer::start().await;
    let proxy = attacker();
    // A proxy that writes only `Forwarded`: a client-written X-Forwarded-For must not pick the address.
    let gw = behind_proxy(&nats, ForwardedHeader::Forwarded).await;
    let _victim = gw
        .try_client_from(proxy, WS, &[("forwarded", "for=203.0.113.1")])
        .await
        .expect("first client");
    let spoof = [("x-forwarded-for", "203.0.113.77"), ("forwarded", "for=203.0.113.1")];
    assert_eq!(gw.try_client_from(proxy, WS, &spoof).await.err(), Some(Some(429)));
    let _other = gw
        .try_client_from(proxy, WS, &[("forwarded", "for=\"[2001:db8::1]:4711\";proto=https")])
        .await
        .expect("IPv6 client, own budget");
    // The right-most untrusted hop decides, across several header lines.
    let lines = [
        ("forwarded", "for=203.0.113.99"),
        ("forwarded", "for=203.0.113.1;proto=https"),
    ];
    assert_eq!(gw.try_client_from(proxy, WS, &lines).await.err(), Some(Some(429)));

    // A proxy that writes X-Real-IP.
    let gw = behind_proxy(&nats, ForwardedHeader::XRealIp).await;
    let _a = gw
        .try_client_from(proxy, WS, &[("x-real-ip", "203.0.113.1")])
        .await
        .expect("first client");
    let spoof = [("x-forwarded-for", "203.0.113.77"), ("x-real-ip", "203.0.113.1")];
    assert_eq!(gw.try_client_from(proxy, WS, &spoof).await.err(), Some(Some(429)));
    let twice = [("x-real-ip", "203.0.113.5"), ("x-real-ip", "203.0.113.6")];
    assert_eq!(gw.try_client_from(proxy, WS, &twice).await.err(), Some(Some(400)));

    // The default, X-Forwarded-For: a client-written `Forwarded` is ignored.
    let gw = behind_proxy(&nats, ForwardedHeader::XForwardedFor).await;
    let _a = gw
        .try_client_from(proxy, WS, &[("x-forwarded-for", "203.0.113.1")])
        .await
        .expect("first client");
    let spoof = [("forwarded", "for=203.0.113.77"), ("x-forwarded-for", "203.0.113.1")];
    assert_eq!(gw.try_client_from(proxy, WS, &spoof).await.err(), Some(Some(429)));
    // Left-most entries are client-written: only the right-most untrusted hop counts.
    let spoof = [("x-forwarded-for", "203.0.113.9, 203.0.113.1")];
    assert_eq!(gw.try_client_from(proxy, WS, &spoof).await.err(), Some(Some(429)));
}

#[tokio::test]
async fn malformed_forwarding_headers_are_400_not_the_proxy_address() {
    let nats = NatsServer::start().await;
    let proxy = attacker();
    let gw = behind_proxy(&nats, ForwardedHeader::XForwardedFor).await;
    let cases: [(&[u8], &str); 6] = [
        ("203.0.113.1, caf\u{e9}".as_bytes(), "forwarding header is not ASCII"),
        (b"\xff", "forwarding header is not ASCII"),
        (b"", "forwarding header is empty"),
        (b"203.0.113.1,", "forwarding header is empty"),
        (b"203.0.113.1, junk", "forwarding header is malformed"),
        (b"unknown", "forwarded address is unknown or obfuscated"),
    ];
    for (value, reason) in cases {
        let (status, body) = raw_from(&gw, proxy, &upgrade_request(&[("X-Forwarded-For", value)])).await;
        assert_eq!(
            (status, body.trim()),
            (400, reason),
            "{}",
            String::from_utf8_lossy(value)
        );
    }
    assert_eq!(rejections(&gw, Rejected::Forwarded), cases.len() as u64);
    let gw = behind_proxy(&nats, ForwardedHeader::Forwarded).await;
    for (value, reason) in [
        ("for=_hidden", "forwarded address is unknown or obfuscated"),
        ("for=203.0.113.1, proto=https", "forwarding header is empty"),
        ("for=\"[2001:db8::1]:4711", "forwarding header is malformed"),
    ] {
        let (status, body) = raw_from(&gw, proxy, &upgrade_request(&[("Forwarded", value.as_bytes())])).await;
        assert_eq!((status, body.trim()), (400, reason), "{value}");
    }
    // A refusal never took the proxy's own slot: the proxy (no header) still connects as itself.
    let mut own = gw.try_client_from(proxy, WS, &[]).await.expect("proxy's own address");
    assert_eq!(own.request(json!({"op": "ping"}), 1).await["op"], "pong");
}

#[tokio::test]
async fn untrusted_peers_are_counted_by_their_own_address() {
    let nats = NatsServer::start().await;
    let gw = behind_proxy(&nats, ForwardedHeader::XForwardedFor).await;
    // 127.0.0.2 is not a trusted proxy: its X-Forwarded-For is ignored and it is counted (and shed) at accept.
    let direct = ip("127.0.0.2");
    let _a = gw
        .try_client_from(direct, WS, &[("x-forwarded-for", "203.0.113.1")])
        .await
        .expect("first client");
    assert_eq!(
        gw.try_client_from(direct, WS, &[("x-forwarded-for", "203.0.113.2")])
            .await
            .err(),
        Some(None),
        "second connection from one untrusted address is shed at accept"
    );
    // Its malformed header is not even read.
    let (status, _) = raw_from(&gw, ip("127.0.0.3"), &upgrade_request(&[("X-Forwarded-For", b"\xff")])).await;
    assert_eq!(status, 101);
}

// -------------------------------------------------------------------------------------------------------------------
// Origin allow-list, connection caps and rates (per address, global, behind trusted proxies)
// -------------------------------------------------------------------------------------------------------------------

/// Connects, retrying while the refusal is `retry_on` (a slot released by a closing connection frees up
/// asynchronously on the server).
async fn connect_retrying(gw: &TestGateway, headers: &[(&str, &str)], retry_on: u16) -> WsClient {
    let deadline = Instant::now() + WAIT;
    loop {
        match gw.client_with(WS, headers).await {
            Ok(c) => return c,
            Err(s) if s == retry_on && Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(s) => panic!("connection refused with {s}"),
        }
    }
}

#[tokio::test]
async fn origin_allow_list() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.server.allowed_origins = vec!["https://app.example.com".into(), "*.example.org".into()];
    })
    .await;
    for foreign in [
        "https://evil.com",
        "https://app.example.com.evil.com",
        "https://example.org",
        "null",
    ] {
        assert_eq!(
            gw.client_with(WS, &[("origin", foreign)]).await.err(),
            Some(403),
            "{foreign}"
        );
    }
    assert_eq!(gw.client_with(WS, &[]).await.err(), Some(403), "missing Origin");
    let (status, body) = raw_upgrade(&gw, WS, &[("Origin", "https://evil.com")]).await;
    assert_eq!((status, body.trim()), (403, "origin not allowed"));
    for allowed in [
        "https://app.example.com",
        "https://APP.example.com",
        "https://chat.example.org",
        "http://a.b.example.org",
    ] {
        assert!(gw.client_with(WS, &[("origin", allowed)]).await.is_ok(), "{allowed}");
    }
}

#[tokio::test]
async fn global_max_connections_is_503() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| c.server.max_connections = 2).await;
    // The readiness probe's connection may still hold its slot for a moment: retry on 503 for the first two.
    let a = connect_retrying(&gw, &[], 503).await;
    let _b = connect_retrying(&gw, &[], 503).await;
    assert_eq!(gw.client_with(WS, &[]).await.err(), Some(503));
    let (status, body) = raw_upgrade(&gw, WS, &[]).await;
    assert_eq!((status, body.trim()), (503, "server at capacity"));
    // Liveness stays 200 at capacity (a full gateway is healthy); readiness steers new clients away.
    let (status, body) = gw.get("/healthz").await.unwrap();
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, body) = gw.get("/readyz").await.unwrap();
    assert_eq!((status, body.trim()), (503, "at capacity"));
    drop(a);
    let _c = connect_retrying(&gw, &[], 503).await;
}

#[tokio::test]
async fn per_ip_concurrent_cap_sheds_at_accept() {
    // Counted by peer address from accept: the connection over the cap is closed before TLS, plain HTTP included
    // (tests/admission.rs covers the details: shedding, slot release on every path, other addresses).
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| c.limits.max_connections_per_ip = 2).await;
    let me = "127.0.0.1".parse().unwrap();
    let a = gw.try_client_from(me, WS, &[]).await.expect("first");
    let _b = gw.try_client_from(me, WS, &[]).await.expect("second");
    assert_eq!(
        gw.try_client_from(me, WS, &[]).await.err(),
        Some(None),
        "shed at accept"
    );
    assert!(
        gw.try_tls_over(gw.tcp_from(me).await).await.is_err(),
        "plain HTTP is counted too"
    );
    drop(a);
    let deadline = Instant::now() + WAIT;
    while gw.try_client_from(me, WS, &[]).await.is_err() {
        assert!(Instant::now() < deadline, "slot never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn per_ip_connection_rate_sheds_at_accept() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.limits.connections_per_second_per_ip = 1;
        c.limits.connections_burst_per_ip = 3;
        // The readiness probes come from 127.0.0.1: as a trusted proxy it is not charged at accept, so the probes
        // cannot spend the burst (or be shed) before the test starts.
        c.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let me = "127.0.0.2".parse().unwrap();
    for _ in 0..3 {
        drop(gw.try_client_from(me, WS, &[]).await.expect("within the burst"));
    }
    // One cell comes back per second: a slow machine may get one more in; the refusal must come soon after.
    let mut refused = None;
    for _ in 0..5 {
        if let Err(s) = gw.try_client_from(me, WS, &[]).await {
            refused = Some(s);
            break;
        }
    }
    assert_eq!(refused, Some(None), "shed at accept");
}

#[tokio::test]
async fn forwarded_for_is_honoured_only_from_trusted_proxies() {
    let nats = NatsServer::start().await;
    let trusted = TestGateway::start(&nats, |c| {
        c.limits.max_connections_per_ip = 1;
        c.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let _a = trusted
        .client_with(WS, &[("x-forwarded-for", "203.0.113.1")])
        .await
        .expect("first client");
    let _b = trusted
        .client_with(WS, &[("x-forwarded-for", "203.0.113.2")])
        .await
        .expect("second client, own budget");
    let _c = trusted
        .client_with(WS, &[("x-forwarded-for", "[2001:db8::3]:443")])
        .await
        .expect("IPv6 with port");
    assert_eq!(
        trusted
            .client_with(WS, &[("x-forwarded-for", "203.0.113.1")])
            .await
            .err(),
        Some(429)
    );
    // Left-most entries are client-controlled: only the right-most untrusted hop counts.
    let spoofed = "203.0.113.9, 203.0.113.2";
    assert_eq!(
        trusted.client_with(WS, &[("x-forwarded-for", spoofed)]).await.err(),
        Some(429)
    );
    // The proxy itself (no header) has its own budget.
    let _d = trusted.client_with(WS, &[]).await.expect("proxy's own address");

    // An untrusted peer is counted by its own address at accept: its header is never read.
    let untrusted = TestGateway::start(&nats, |c| c.limits.max_connections_per_ip = 1).await;
    let me = "127.0.0.2".parse().unwrap();
    let _e = untrusted
        .try_client_from(me, WS, &[("x-forwarded-for", "203.0.113.1")])
        .await
        .expect("first client");
    assert_eq!(
        untrusted
            .try_client_from(me, WS, &[("x-forwarded-for", "203.0.113.2")])
            .await
            .err(),
        Some(None)
    );
}

#[tokio::test]
async fn address_spray_through_trusted_proxy_keeps_limiter_memory_bounded() {
    const MAX: usize = 500;
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        c.limits.max_tracked_keys = MAX;
        // Slow refill, so sprayed keys stay "recent" and eviction has real work to do.
        c.limits.connections_per_second_per_ip = 1;
        c.limits.connections_burst_per_ip = 5;
    })
    .await;
    let limits = gw.gw.limits().clone();
    for i in 0..10_000u32 {
        let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        drop(limits.admit(ip).expect("a fresh address is admitted"));
        assert!(
            limits.tracked_keys() <= MAX,
            "after {i} addresses: {} keys",
            limits.tracked_keys()
        );
        if i % 2000 == 1999 {
            // A real connection through the proxy from a fresh address, among the spray.
            let xff = format!("198.51.100.{}", i / 2000);
            let mut c = gw
                .client_with(WS, &[("x-forwarded-for", &xff)])
                .await
                .expect("real client admitted");
            assert_eq!(c.request(json!({"op": "ping"}), 1).await["op"], "pong");
            // The keyed limiter stays within the bound; the per-IP count of open connections adds one entry per
            // connected address (bounded by the connections themselves, not by `max_tracked_keys`).
            assert!(
                limits.tracked_keys() <= MAX + 1,
                "{} keys with one connection open",
                limits.tracked_keys()
            );
            drop(c);
            // The server drops that entry when the connection's task ends.
            let deadline = Instant::now() + WAIT;
            while limits.open_addresses() != 0 {
                assert!(Instant::now() < deadline, "connection task did not end");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(
                limits.tracked_keys() <= MAX,
                "{} keys after the connection closed",
                limits.tracked_keys()
            );
        }
    }
    // The gateway itself counted the five real connections among the spray (the spray never reached it as one).
    assert_eq!(gw.gw.metrics().connections.get(), 5);
}
