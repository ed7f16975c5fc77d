//! The test harness, shared by every integration test: a real `nats-server` on a dynamic port, killed on drop
//! ([`nats`], also the unit tests' launcher), tokens ([`jwt`]), a test CA made at test time, the gateway running
//! in-process on `127.0.0.1:0` with TLS, a WebSocket client over rustls that verifies the gateway's certificate, a
//! frame codec for what a conforming client never sends ([`frames`]) and the attack harness ([`hostile`]). Nothing
//! is mocked.
#![allow(dead_code)]

pub mod frames;
pub mod hostile;
pub mod jwt;
pub mod nats;

#[allow(unused_imports)]
pub use nats::{NatsServer, WAIT, free_port, nats_server_bin, wait_stopped};

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use futures_util::{SinkExt, StreamExt};
use roomwire::{Config, Gateway};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsConnector, client::TlsStream};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, client::IntoClientRequest, protocol::frame::coding::CloseCode},
};
use tokio_util::sync::CancellationToken;

/// A CA and a server certificate for localhost, made at test time.
pub struct TestCa {
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The CA's key and name, to issue more certificates (a rotation).
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "roomwire test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cert_file = dir.path().join("cert.pem");
        let key_file = dir.path().join("key.pem");
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        TestCa {
            dir,
            ca_pem: ca_cert.pem(),
            cert_file,
            key_file,
            issuer,
        }
    }

    /// Writes a new certificate and key for localhost, from the same CA, over `cert_file` and `key_file` (a rotation);
    /// returns the new certificate's DER.
    pub fn reissue(&self) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        // Key first, then the certificate: a reload in between fails (the pair does not match) and is retried.
        std::fs::write(&self.key_file, key.serialize_pem()).unwrap();
        std::fs::write(&self.cert_file, cert.pem()).unwrap();
        cert.der().to_vec()
    }

    pub fn connector(&self) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        TlsConnector::from(Arc::new(cfg))
    }
}

/// A config for tests: TLS with the test CA, anonymous allowed, generous DoS limits, quick timeouts.
pub fn test_config(nats_url: &str, ca: &TestCa) -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.server.gateway_id = Some("gwtest".into());
    c.server.shutdown_grace = Duration::from_secs(5);
    // Tests read the gateway's metrics over the public listener (the default is off).
    c.server.public_metrics = true;
    c.tls.enabled = true;
    c.tls.cert_file = ca.cert_file.clone();
    c.tls.key_file = ca.key_file.clone();
    c.nats.url = roomwire::config::OneOrMany::One(nats_url.to_string());
    c.nats.publish_timeout = Duration::from_secs(2);
    c.auth.allow_anonymous = true;
    c.limits.messages_per_second = 10_000;
    c.limits.messages_burst = 10_000;
    c.limits.connections_per_second_per_ip = 10_000;
    c.limits.connections_burst_per_ip = 10_000;
    c.limits.max_connections_per_ip = 10_000;
    c
}

/// The gateway running in-process. Dropping it cancels its shutdown token.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub gw: Arc<Gateway>,
    pub shutdown: CancellationToken,
    pub task: Option<tokio::task::JoinHandle<()>>,
    pub ca: Arc<TestCa>,
}

impl TestGateway {
    /// Starts a gateway on `127.0.0.1:0` against `nats`, after `tweak` adjusts the test config.
    pub async fn start(nats: &NatsServer, tweak: impl FnOnce(&mut Config)) -> Self {
        let ca = Arc::new(TestCa::new());
        Self::start_with_ca(&nats.url(), ca, tweak).await
    }

    pub async fn start_with_ca(nats_url: &str, ca: Arc<TestCa>, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config(nats_url, &ca);
        tweak(&mut config);
        config.validate().expect("test config valid");
        let listener = TcpListener::bind(config.server.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let gw = Gateway::start(config, shutdown.clone()).await.expect("gateway starts");
        let task = tokio::spawn(roomwire::run(listener, gw.clone()));
        let t = TestGateway {
            addr,
            gw,
            shutdown,
            task: Some(task),
            ca,
        };
        t.wait_ready(true).await;
        t
    }

    /// Waits until `/readyz` answers 200 (ready) or 503 (not ready).
    pub async fn wait_ready(&self, ready: bool) {
        let want = if ready { 200 } else { 503 };
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok((status, _)) = self.get("/readyz").await
                && status == want
            {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "readyz never became {want}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn tls(&self) -> TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        self.ca
            .connector()
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap()
    }

    /// A raw HTTP request over TLS; returns (status, body).
    pub async fn raw(&self, request: &str) -> std::io::Result<(u16, String)> {
        let mut tls = self.tls().await;
        tls.write_all(request.as_bytes()).await?;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut buf)).await;
        let text = String::from_utf8_lossy(&buf).to_string();
        let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }

    /// A raw HTTP request over TLS; returns (status, head, body), the head being the status line and headers as sent.
    pub async fn raw_head(&self, request: &str) -> std::io::Result<(u16, String, String)> {
        let mut tls = self.tls().await;
        tls.write_all(request.as_bytes()).await?;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut buf)).await;
        let text = String::from_utf8_lossy(&buf).to_string();
        let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        Ok((status, head.to_string(), body.to_string()))
    }

    pub async fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        self.raw(&format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        ))
        .await
    }

    /// Connects a WebSocket client (anonymous) and reads the welcome.
    pub async fn client(&self) -> WsClient {
        self.client_with(&self.gw.config().server.ws_path.clone(), &[])
            .await
            .expect("upgrade accepted")
    }

    /// Connects with a path (may carry a query) and extra headers. Err carries the HTTP status of a refusal.
    pub async fn client_with(&self, path: &str, headers: &[(&str, &str)]) -> Result<WsClient, u16> {
        let url = format!("wss://localhost:{}{}", self.addr.port(), path);
        let mut req = url.into_client_request().unwrap();
        for (k, v) in headers {
            req.headers_mut().insert(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        upgrade_over(req, self.tls().await).await
    }

    /// Cancels the shutdown token and waits for `serve` to return.
    pub async fn shutdown(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(WAIT, t)
                .await
                .expect("gateway stops in time")
                .unwrap();
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A WebSocket client over verified TLS.
pub struct WsClient {
    pub ws: WebSocketStream<TlsStream<TcpStream>>,
    /// Connection id from the welcome.
    pub conn: String,
    /// The welcome itself.
    pub welcome: Value,
}

impl WsClient {
    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::Text(v.to_string().into())).await.unwrap();
    }

    pub async fn send_text(&mut self, t: &str) {
        self.ws.send(Message::Text(t.to_string().into())).await.unwrap();
    }

    /// Next text frame as JSON (fails on timeout, close or non-text).
    pub async fn recv(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next()).await.expect("frame in time");
            match msg {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).expect("JSON frame"),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Next frame with the given op, failing on any other frame in between.
    pub async fn recv_op(&mut self, op: &str) -> Value {
        let v = self.recv().await;
        assert_eq!(v["op"], op, "unexpected frame {v}");
        v
    }

    /// Sends an op with `id` and returns the reply with that id (ack or error).
    pub async fn request(&mut self, mut v: Value, id: u64) -> Value {
        v["id"] = json!(id);
        self.send(v).await;
        loop {
            let r = self.recv().await;
            if r["id"] == json!(id) {
                return r;
            }
            assert_eq!(r["op"], "message", "unexpected frame while waiting for reply {id}: {r}");
        }
    }

    pub async fn join(&mut self, room: &str) {
        let r = self.request(json!({"op":"join","room":room}), 900_001).await;
        assert_eq!(r["op"], "ack", "join {room}: {r}");
    }

    pub async fn publish(&mut self, room: &str, data: Value) {
        let r = self
            .request(json!({"op":"publish","room":room,"data":data}), 900_002)
            .await;
        assert_eq!(r["op"], "ack", "publish {room}: {r}");
    }

    /// Waits for the close frame; returns (code, reason).
    pub async fn expect_close(&mut self) -> (u16, String) {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next()).await.expect("close in time");
            match msg {
                Some(Ok(Message::Close(Some(f)))) => return (u16::from(f.code), f.reason.to_string()),
                Some(Ok(Message::Close(None))) => return (u16::from(CloseCode::Status), String::new()),
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    /// Asserts that nothing arrives within `d` (used only to prove an absence).
    pub async fn expect_silence(&mut self, d: Duration) {
        match tokio::time::timeout(d, self.ws.next()).await {
            Err(_) => {}
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(other) => panic!("expected silence, got {other:?}"),
        }
    }
}

/// Waits for the next NATS message on a subscriber.
pub async fn next_msg(sub: &mut async_nats::Subscriber) -> async_nats::Message {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("NATS message in time")
        .expect("subscription open")
}

impl TestGateway {
    /// Connects an anonymous WebSocket client whose TCP receive buffer is fixed at `rcvbuf` bytes (the kernel
    /// doubles it and turns off autotuning), and reads the welcome. A client that then stops reading fills its
    /// window after a few hundred KiB instead of tens of MiB, so backpressure tests stall the gateway's writer fast.
    pub async fn client_small_rcvbuf(&self, rcvbuf: u32) -> WsClient {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(rcvbuf).unwrap();
        let tcp = socket.connect(self.addr).await.unwrap();
        let tls = self
            .ca
            .connector()
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let url = format!(
            "wss://localhost:{}{}",
            self.addr.port(),
            self.gw.config().server.ws_path
        );
        upgrade_over(url.into_client_request().unwrap(), tls)
            .await
            .expect("upgrade accepted")
    }
}

/// This process's resident set size and its peak since the last [`reset_peak_rss`], in bytes (Linux `/proc`).
pub fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let field = |name: &str| -> u64 {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in /proc/self/status"));
        let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets this process's peak RSS (`VmHWM`) to its current RSS (Linux ≥ 4.0: `echo 5 > /proc/self/clear_refs`).
pub fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM via /proc/self/clear_refs");
}

/// Room names of every hostile class (NATS wildcards and token separators, `$` subjects, whitespace and control
/// characters, non-ASCII, empty, over 128 bytes): each must be refused with `invalid_room`. Shared by the gateway and
/// hostile suites.
pub fn hostile_rooms() -> Vec<String> {
    let mut v: Vec<String> = [
        "a.b",
        "*",
        ">",
        "a.>",
        "a.*",
        "$SYS.x",
        "$SYS",
        "$x",
        " ",
        "\r\nPUB x",
        "\0",
        "",
        "a b",
        "a\tb",
        "\t",
        "a\n",
        "caf\u{e9}",
        "\u{65e5}\u{672c}",
        "a\u{200b}b",
        ".",
        "a.",
        ".a",
        "a..b",
        "a/b",
        "a\\b",
        "\"",
        "rooms.x",
        "\u{7f}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // More classes: glob characters inside a name, invisible and look-alike characters, line separators.
    for s in [
        "a*",
        "a>b",
        "$",
        "\u{feff}",
        "\u{ff41}",
        "a\u{301}",
        "\u{1F600}",
        "a\rb",
        "%2e",
        "a\u{85}",
        "\u{2028}",
    ] {
        v.push(s.to_string());
    }
    v.push("a".repeat(129));
    // 128 characters but 256 bytes: the bound is in bytes.
    v.push("\u{e9}".repeat(128));
    v.push("x".repeat(10_000));
    v
}

impl TestGateway {
    /// A TCP connection to the gateway from the local address `from` (any `127.x.y.z` on Linux's loopback), so a
    /// test can act as several client addresses.
    pub async fn tcp_from(&self, from: std::net::IpAddr) -> TcpStream {
        let socket = match from {
            std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4().unwrap(),
            std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6().unwrap(),
        };
        socket.bind(SocketAddr::new(from, 0)).unwrap();
        socket.connect(self.addr).await.unwrap()
    }

    /// The TLS handshake over `tcp`; `Err` when the gateway closed the connection instead (e.g. shed at accept).
    pub async fn try_tls_over(&self, tcp: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        let connect = self
            .ca
            .connector()
            .connect(ServerName::try_from("localhost").unwrap(), tcp);
        tokio::time::timeout(WAIT, connect)
            .await
            .expect("TLS handshake ends in time")
    }

    /// Like [`TestGateway::client_with`] from the local address `from`: `Err(None)` when the connection was closed
    /// before TLS completed (shed at accept), `Err(Some(status))` for an HTTP refusal.
    pub async fn try_client_from(
        &self,
        from: std::net::IpAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<WsClient, Option<u16>> {
        let tls = self.try_tls_over(self.tcp_from(from).await).await.map_err(|_| None)?;
        let url = format!("wss://localhost:{}{}", self.addr.port(), path);
        let mut req = url.into_client_request().unwrap();
        for (k, v) in headers {
            req.headers_mut().append(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        upgrade_over(req, tls).await.map_err(Some)
    }
}

/// Waits until the NATS server has processed everything `nc` sent so far. (`flush` only writes to the socket.) A
/// message to a fresh inbox comes back only after the server handled the commands before it on this connection.
pub async fn nats_barrier(nc: &async_nats::Client) -> String {
    let inbox = nc.new_inbox();
    let mut probe = nc.subscribe(inbox.clone()).await.unwrap();
    nc.publish(inbox.clone(), bytes::Bytes::new()).await.unwrap();
    nc.flush().await.unwrap();
    next_msg(&mut probe).await;
    inbox
}

/// A subscriber on a plain NATS connection, live on the server when this returns. A wildcard subscription that also
/// matches the barrier's inbox has that message drained.
pub async fn nats_sub(nc: &async_nats::Client, subject: &str) -> async_nats::Subscriber {
    let mut sub = nc.subscribe(subject.to_string()).await.unwrap();
    let inbox = nats_barrier(nc).await;
    if subject == ">" {
        assert_eq!(next_msg(&mut sub).await.subject.as_str(), inbox);
    }
    sub
}

impl TestGateway {
    /// Room messages the gateway dropped under `policy` so far.
    pub fn dropped(&self, policy: roomwire::config::Overflow) -> u64 {
        self.gw.metrics().dropped.get(policy)
    }

    /// Waits until the gateway has fanned out `n` NATS messages in all (so each is queued, parked or dropped).
    pub async fn wait_fanned_out(&self, n: u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.gw.metrics().room_messages.get() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "gateway fanned out {} of {n}",
                self.gw.metrics().room_messages.get()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The WebSocket handshake of `req` over `tls`, then the welcome. `Err` carries the HTTP status of a refusal.
async fn upgrade_over(
    req: tokio_tungstenite::tungstenite::handshake::client::Request,
    tls: TlsStream<TcpStream>,
) -> Result<WsClient, u16> {
    match tokio_tungstenite::client_async(req, tls).await {
        Ok((ws, _)) => {
            let mut c = WsClient {
                ws,
                conn: String::new(),
                welcome: Value::Null,
            };
            let welcome = c.recv_op("welcome").await;
            c.conn = welcome["conn"].as_str().unwrap().to_string();
            c.welcome = welcome;
            Ok(c)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("unexpected handshake error: {e}"),
    }
}

/// A raw WebSocket upgrade request (the connection closes after the answer); returns (status, body).
pub async fn raw_upgrade(gw: &TestGateway, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    gw.raw(&req).await.unwrap()
}

/// Polls the client (so tungstenite answers pings) for `d`, failing on anything but pings and pongs.
pub async fn poll_quietly(c: &mut WsClient, d: Duration) {
    let until = tokio::time::Instant::now() + d;
    while let Ok(msg) = tokio::time::timeout_at(until, c.ws.next()).await {
        match msg {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected only heartbeats, got {other:?}"),
        }
    }
}

/// Connects with `token` in the `Authorization` header. Err carries the HTTP status of a refusal.
pub async fn bearer_client(gw: &TestGateway, token: &str) -> Result<WsClient, u16> {
    gw.client_with(
        &gw.gw.config().server.ws_path.clone(),
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await
}

/// Sends an op carrying `id` and returns the error frame it must produce.
pub async fn expect_error(c: &mut WsClient, v: Value, id: u64, code: &str) -> Value {
    let r = c.request(v.clone(), id).await;
    assert_eq!(r["op"], "error", "{v} should fail with {code}: {r}");
    assert_eq!(r["code"], code, "{v}: {r}");
    assert!(
        r["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error has a message: {r}"
    );
    r
}

/// Proves the connection still serves requests: ping → pong.
pub async fn assert_alive(c: &mut WsClient) {
    c.send(json!({"op":"ping"})).await;
    assert_eq!(recv_raw(c).await, r#"{"op":"pong"}"#);
}

/// Next text frame, as the raw text the gateway wrote (to check exact bytes, e.g. an echoed `id`).
pub async fn recv_raw(c: &mut WsClient) -> String {
    loop {
        let msg = tokio::time::timeout(WAIT, c.ws.next()).await.expect("frame in time");
        match msg {
            Some(Ok(Message::Text(t))) => return t.to_string(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}
