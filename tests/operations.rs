//! Operations (issue 14) against the real `roomwire` binary: drain on SIGTERM spread over `server.drain_window`,
//! JSON logs without tokens, the admin listener, `check-config --print`. Each test runs the binary with a temporary
//! config, a real nats-server and real WebSocket clients over verified TLS.

mod common;

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::*;
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    process::{Child, Command},
    sync::mpsc,
    time::Instant,
};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The reason a draining gateway closes with (public contract, `docs/protocol.md`).
const DRAIN_REASON: &str = "going away: reconnect";

/// The roomwire binary, running with a temporary config; killed on drop.
struct Binary {
    child: Child,
    /// Every line it wrote, stdout and stderr.
    lines: Arc<Mutex<Vec<String>>>,
    /// New lines, as they come (for waiting on a log line).
    rx: mpsc::UnboundedReceiver<String>,
    /// The tasks reading stdout and stderr; they end at the pipes' end.
    readers: Vec<tokio::task::JoinHandle<()>>,
    /// The public listener's address (from the `listening` log line).
    addr: SocketAddr,
    ca: TestCa,
    _dir: tempfile::TempDir,
}

/// A config for the binary: TLS with `ca`, anonymous allowed, generous per-IP limits, then `extra` appended (whole
/// sections, e.g. `[log]`; keys of `[server]` go in `server_extra`).
fn config_text(nats: &NatsServer, ca: &TestCa, server_extra: &str, extra: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
gateway_id = "gwops"
shutdown_grace = "5s"
{server_extra}

[tls]
enabled = true
cert_file = "{cert}"
key_file = "{key}"

[nats]
url = "{url}"

[auth]
allow_anonymous = true

[limits]
messages_per_second = 10000
messages_burst = 10000
connections_per_second_per_ip = 10000
connections_burst_per_ip = 10000
max_connections_per_ip = 10000

{extra}
"#,
        cert = ca.cert_file.display(),
        key = ca.key_file.display(),
        url = nats.url(),
    )
}

impl Binary {
    /// Starts the binary with `config` (TOML text) and waits until its public listener is up.
    async fn start(ca: TestCa, config: &str, envs: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path: PathBuf = dir.path().join("gateway.toml");
        std::fs::write(&path, config).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_roomwire"));
        cmd.arg("--config")
            .arg(&path)
            .current_dir(dir.path())
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn roomwire");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut readers = Vec::new();
        for pipe in [
            Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(stderr),
        ] {
            let (lines, tx) = (lines.clone(), tx.clone());
            readers.push(tokio::spawn(async move {
                let mut reader = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    lines.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            }));
        }
        let addr = tokio::time::timeout(WAIT, async {
            while let Some(line) = rx.recv().await {
                if line.contains("listening") && !line.contains("admin") {
                    return addr_in(&line);
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("no `listening` line: {:?}", lines.lock().unwrap()));
        let b = Binary {
            child,
            lines,
            rx,
            readers,
            addr,
            ca,
            _dir: dir,
        };
        b.wait_ready().await;
        b
    }

    fn pid(&self) -> String {
        self.child.id().expect("running").to_string()
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.pid()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} failed");
    }

    async fn tls(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        self.ca
            .connector()
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap()
    }

    /// A WebSocket client on `path` (which may carry a query), welcome read.
    async fn client(&self, path: &str) -> WsClient {
        let req = format!("wss://localhost:{}{path}", self.addr.port())
            .into_client_request()
            .unwrap();
        let (ws, _) = tokio_tungstenite::client_async(req, self.tls().await)
            .await
            .expect("upgrade accepted");
        let mut c = WsClient {
            ws,
            conn: String::new(),
            welcome: serde_json::Value::Null,
        };
        let welcome = c.recv_op("welcome").await;
        c.conn = welcome["conn"].as_str().unwrap().to_string();
        c
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut conn = KeepAlive::open(self).await;
            if conn.get("/readyz").await.0 == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "never ready: {:?}",
                self.lines.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits for the process to exit; its status code.
    async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("did not exit within {within:?}: {:?}", self.lines.lock().unwrap()))
            .unwrap()
            .code()
    }

    /// The admin listener's address (from its `admin listening` log line).
    async fn admin_addr(&mut self) -> SocketAddr {
        let find = |lines: &[String]| {
            lines
                .iter()
                .find(|l| l.contains("admin listening"))
                .and_then(|l| addr_in(l))
        };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(addr) = find(&self.log()) {
                return addr;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let got = tokio::time::timeout(left, self.rx.recv()).await;
            assert!(
                matches!(got, Ok(Some(_))),
                "no `admin listening` line: {:?}",
                self.log()
            );
        }
    }

    /// Everything the exited process wrote (waits for the readers to reach the pipes' end).
    async fn full_log(&mut self) -> Vec<String> {
        for r in self.readers.drain(..) {
            tokio::time::timeout(WAIT, r).await.expect("pipes closed").unwrap();
        }
        self.log()
    }

    fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

/// The first `host:port` after `addr` in a log line (human `addr=..` or JSON `"addr":".."`).
fn addr_in(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("addr")? + 4..];
    let rest = rest.trim_start_matches(['=', '"', ':']);
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == ':' || c == '[' || c == ']'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// One keep-alive HTTP/1.1 connection over TLS, for several requests in a row.
struct KeepAlive {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
}

impl KeepAlive {
    async fn open(b: &Binary) -> Self {
        KeepAlive { tls: b.tls().await }
    }

    /// GET `path`; (status, body). Reads exactly the response (Content-Length), so the connection can go on.
    async fn get(&mut self, path: &str) -> (u16, String) {
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        self.tls.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        tokio::time::timeout(WAIT, async {
            loop {
                let n = self.tls.read(&mut chunk).await.unwrap();
                assert!(
                    n > 0,
                    "connection closed mid-response: {}",
                    String::from_utf8_lossy(&buf)
                );
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                        return (status, body.to_string());
                    }
                }
            }
        })
        .await
        .expect("response in time")
    }
}

// ---- drain ---------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn sigterm_drains_connections_spread_over_the_window_then_exits_0() {
    const N: usize = 12;
    let window = Duration::from_secs(2);
    let nats = NatsServer::start().await;
    let ca = TestCa::new();
    let config = config_text(&nats, &ca, "drain_window = \"2s\"", "");
    let mut bin = Binary::start(ca, &config, &[]).await;
    let mut clients = Vec::new();
    for _ in 0..N {
        clients.push(bin.client("/ws").await);
    }
    // A load balancer's keep-alive probe connection: ready before, 503 at once after the signal.
    let mut probe = KeepAlive::open(&bin).await;
    assert_eq!(probe.get("/readyz").await.0, 200);

    let signalled = Instant::now();
    bin.signal("-TERM");
    let closes = futures_util::future::join_all(clients.iter_mut().map(|c| async move {
        let close = c.expect_close().await;
        (close, signalled.elapsed())
    }));
    let readyz = async {
        let (status, body) = probe.get("/readyz").await;
        (status, body, signalled.elapsed())
    };
    let (closes, (status, body, readyz_at)) = tokio::join!(closes, readyz);
    assert_eq!((status, body.trim()), (503, "not ready"), "readyz during the drain");
    let first_close = closes.iter().map(|(_, at)| *at).min().unwrap();
    assert!(
        readyz_at <= first_close.max(Duration::from_millis(500)),
        "readyz turned 503 at {readyz_at:?}, not at once (first close at {first_close:?})"
    );
    // New connections are no longer accepted.
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(bin.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting during the drain");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    for ((code, reason), _) in &closes {
        assert_eq!((*code, reason.as_str()), (1001, DRAIN_REASON));
    }
    let mut at: Vec<Duration> = closes.iter().map(|(_, at)| *at).collect();
    at.sort();
    let (first, last) = (at[0], at[N - 1]);
    // Uniform over 2 s: 12 closes all within 500 ms of each other has probability ~ 12 * 0.25^11 (3e-6).
    assert!(
        last - first >= Duration::from_millis(500),
        "closes not spread: {at:?} (all within {:?})",
        last - first
    );
    assert!(
        last <= window + Duration::from_millis(1500),
        "closes past the window: {at:?}"
    );
    assert_eq!(bin.exit_code(WAIT).await, Some(0), "{:?}", bin.log());
}

#[tokio::test]
async fn drain_window_zero_closes_everyone_at_once() {
    let nats = NatsServer::start().await;
    let ca = TestCa::new();
    let config = config_text(&nats, &ca, "drain_window = \"0s\"", "");
    let mut bin = Binary::start(ca, &config, &[]).await;
    let mut a = bin.client("/ws").await;
    let mut b = bin.client("/ws").await;
    let signalled = Instant::now();
    bin.signal("-TERM");
    let (ca_, cb) = tokio::join!(a.expect_close(), b.expect_close());
    assert_eq!((ca_.0, ca_.1.as_str()), (1001, DRAIN_REASON));
    assert_eq!((cb.0, cb.1.as_str()), (1001, DRAIN_REASON));
    assert!(
        signalled.elapsed() < Duration::from_secs(2),
        "{:?}",
        signalled.elapsed()
    );
    assert_eq!(bin.exit_code(WAIT).await, Some(0));
}

#[tokio::test]
async fn second_signal_exits_at_once() {
    let nats = NatsServer::start().await;
    let ca = TestCa::new();
    let config = config_text(&nats, &ca, "drain_window = \"60s\"", "");
    let mut bin = Binary::start(ca, &config, &[]).await;
    let _clients = [bin.client("/ws").await, bin.client("/ws").await];
    bin.signal("-TERM");
    // Wait for the drain to have begun (its log line) before the second signal.
    tokio::time::timeout(WAIT, async {
        while let Some(line) = bin.rx.recv().await {
            if line.contains("draining") {
                return;
            }
        }
    })
    .await
    .expect("drain logged");
    let second = Instant::now();
    bin.signal("-TERM");
    assert_eq!(bin.exit_code(WAIT).await, Some(1), "{:?}", bin.log());
    assert!(second.elapsed() < Duration::from_secs(3), "{:?}", second.elapsed());
}

// ---- logs ----------------------------------------------------------------------------------------------------------

const LOG_SECRET: &str = "ops-test-hmac-secret-0123456789abcdef";

fn hs256(claims: &serde_json::Value) -> String {
    common::jwt::hs256(LOG_SECRET.as_bytes(), claims)
}

#[tokio::test]
async fn json_logs_parse_line_by_line_and_never_contain_the_token() {
    let nats = NatsServer::start().await;
    let ca = TestCa::new();
    let auth = r#"[auth]
allow_anonymous = false
[[auth.keys]]
algorithm = "HS256"
secret = { env = "RW_OPS_TEST_SECRET" }
"#;
    let config = config_text(
        &nats,
        &ca,
        "drain_window = \"0s\"",
        "[log]\nformat = \"json\"\nlevel = \"trace\"\n",
    )
    .replace("[auth]\nallow_anonymous = true\n", auth);
    let mut bin = Binary::start(ca, &config, &[("RW_OPS_TEST_SECRET", LOG_SECRET)]).await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = hs256(&serde_json::json!({ "sub": "ann", "exp": exp, "rooms": ["*"] }));
    let mut c = bin.client(&format!("/ws?token={token}")).await;
    c.join("lobby").await;
    c.publish("lobby", serde_json::json!("hello")).await;
    // A refused token (right signature scheme, wrong key) in the query string, and a refresh with the good one.
    let forged = token[..token.rfind('.').unwrap()].to_string() + ".AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let req = format!("wss://localhost:{}/ws?token={forged}", bin.addr.port())
        .into_client_request()
        .unwrap();
    assert!(tokio_tungstenite::client_async(req, bin.tls().await).await.is_err());
    let r = c.request(serde_json::json!({"op":"refresh","token":token}), 7).await;
    assert_eq!(r["op"], "ack", "{r}");
    bin.signal("-TERM");
    assert_eq!(c.expect_close().await.0, 1001);
    assert_eq!(bin.exit_code(WAIT).await, Some(0));
    let log = bin.full_log().await;
    assert!(log.len() > 5, "too few lines to mean anything: {log:?}");
    let signature = &token[token.rfind('.').unwrap() + 1..];
    let mut saw_user_span = false;
    for line in &log {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
        for secret in [token.as_str(), forged.as_str(), signature, LOG_SECRET] {
            assert!(!line.contains(secret), "a secret reached the log: {line}");
        }
        if v["span"]["name"] == "conn" && v["span"]["user"].as_str().is_some_and(|u| u.contains("ann")) {
            assert!(v["span"]["id"].is_u64() && v["span"]["peer"].is_string(), "{line}");
            saw_user_span = true;
        }
    }
    assert!(
        saw_user_span,
        "no event inside a connection span with its id, address and user: {log:?}"
    );
}

// ---- admin listener ------------------------------------------------------------------------------------------------

/// A plain-HTTP GET (the admin listener has no TLS); (status, body).
async fn plain_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut buf))
        .await
        .expect("admin answers in time")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn admin_listener_serves_metrics_connz_and_readyz_through_the_drain() {
    let nats = NatsServer::start().await;
    let ca = TestCa::new();
    let config = config_text(
        &nats,
        &ca,
        // `public_metrics` left at its default: off (issue 22, finding 3; it used to default to on).
        "drain_window = \"1s\"",
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
    );
    let mut bin = Binary::start(ca, &config, &[]).await;
    let admin = bin.admin_addr().await;

    // The public listener keeps its probes but no longer serves /metrics.
    let mut public = KeepAlive::open(&bin).await;
    assert_eq!(public.get("/metrics").await.0, 404);
    assert_eq!(public.get("/healthz").await.0, 200);
    assert_eq!(public.get("/readyz").await.0, 200);

    let (status, body) = plain_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("roomwire_connections_open 0"), "{body}");
    assert_eq!(plain_get(admin, "/healthz").await.0, 200);
    assert_eq!(plain_get(admin, "/readyz").await.0, 200);
    assert_eq!(plain_get(admin, "/nope").await.0, 404);

    let mut clients = Vec::new();
    for rooms in [&["big", "small"][..], &["big"], &["big", "mid"], &["mid"]] {
        let mut c = bin.client("/ws").await;
        for r in rooms {
            c.join(r).await;
        }
        clients.push(c);
    }
    let (status, body) = plain_get(admin, "/connz").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("connz is JSON");
    assert_eq!(v["gateway"], "gwops");
    assert_eq!(v["connections"], 4, "{v}");
    assert_eq!(v["rooms"], 3, "{v}");
    assert_eq!(
        v["top_rooms"],
        serde_json::json!([
            {"room":"big","members":3},
            {"room":"mid","members":2},
            {"room":"small","members":1}
        ])
    );
    assert_eq!(v["nats"]["connected"], true);
    assert_eq!(v["draining"], false);
    let (_, body) = plain_get(admin, "/metrics").await;
    assert!(body.contains("roomwire_connections_open 4"), "{body}");

    bin.signal("-TERM");
    // While the public listener no longer accepts, the admin one says "not ready" (and still serves metrics).
    let deadline = Instant::now() + WAIT;
    while plain_get(admin, "/readyz").await.0 != 503 {
        assert!(Instant::now() < deadline, "admin /readyz never turned 503");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, body) = plain_get(admin, "/connz").await;
    assert!(body.contains("\"draining\":true"), "{body}");
    for c in &mut clients {
        assert_eq!(c.expect_close().await.0, 1001);
    }
    assert_eq!(bin.exit_code(WAIT).await, Some(0));
}

// ---- check-config --print ------------------------------------------------------------------------------------------

async fn check_config(
    dir: &std::path::Path,
    toml_text: &str,
    args: &[&str],
    envs: &[(&str, &str)],
) -> std::process::Output {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, toml_text).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_roomwire"));
    cmd.args(["check-config", "--config"])
        .arg(&path)
        .args(args)
        .current_dir(dir);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().await.expect("run check-config")
}

#[tokio::test]
async fn check_config_print_masks_secrets_and_requires_secret_sources() {
    let dir = tempfile::tempdir().unwrap();
    let hs = dir.path().join("hs.secret");
    std::fs::write(&hs, "file-secret-value-0123456789abcdef\n").unwrap();
    let text = format!(
        r#"[server]
listen = "127.0.0.1:8443"
drain_window = "3s"

[tls]
enabled = false

[nats]
url = ["nats://alice:hunter2@127.0.0.1:4222", "nats://s3cr3ttoken@127.0.0.1:4223"]
user = "alice"
password = {{ env = "RW_CHECK_NATS_PASSWORD" }}

[[auth.keys]]
kid = "a"
algorithm = "HS256"
secret = {{ env = "RW_CHECK_HMAC" }}

[[auth.keys]]
kid = "b"
algorithm = "HS256"
secret = {{ file = "{hs}" }}

[log]
format = "json"

[admin]
listen = "127.0.0.1:9090"
"#,
        hs = hs.display()
    );
    let envs = [
        ("RW_CHECK_NATS_PASSWORD", "env-password-value"),
        ("RW_CHECK_HMAC", "env-hmac-value-0123456789abcdef"),
    ];
    let secrets = [
        "hunter2",
        "s3cr3ttoken",
        "env-password-value",
        "env-hmac-value",
        "file-secret-value",
    ];

    for format in ["toml", "json"] {
        let out = check_config(dir.path(), &text, &["--print", "--format", format], &envs).await;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{format}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for s in secrets {
            assert!(!stdout.contains(s), "{format}: secret {s} printed:\n{stdout}");
        }
        let v: serde_json::Value = match format {
            "toml" => {
                serde_json::to_value(toml::from_str::<toml::Value>(&stdout).expect("printed TOML parses")).unwrap()
            }
            _ => serde_json::from_str(&stdout).expect("printed JSON parses"),
        };
        // Effective: defaults filled in, the file's values kept, secret sources shown by name.
        assert_eq!(v["server"]["drain_window"], "3s", "{format}: {v}");
        assert_eq!(v["server"]["shutdown_grace"], "10s", "{format}: {v}");
        assert_eq!(v["server"]["public_metrics"], false, "off by default");
        assert_eq!(v["admin"]["listen"], "127.0.0.1:9090");
        assert_eq!(v["log"]["format"], "json");
        assert_eq!(
            v["nats"]["url"],
            serde_json::json!(["nats://alice:MASKED@127.0.0.1:4222", "nats://MASKED@127.0.0.1:4223"])
        );
        assert_eq!(
            v["nats"]["password"],
            serde_json::json!({"env": "RW_CHECK_NATS_PASSWORD"})
        );
        assert_eq!(
            v["auth"]["keys"][0]["secret"],
            serde_json::json!({"env": "RW_CHECK_HMAC"})
        );
    }

    // A secret source that does not resolve is an error naming its key.
    let cases = [(vec![envs[1]], "nats.password"), (vec![envs[0]], "RW_CHECK_HMAC")];
    for (envs, key) in cases {
        let out = check_config(dir.path(), &text, &["--print"], &envs).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{key}: accepted");
        assert!(stderr.contains(key), "{key}: {stderr}");
        assert!(out.stdout.is_empty(), "nothing printed on error");
    }
    std::fs::remove_file(&hs).unwrap();
    let out = check_config(dir.path(), &text, &[], &envs).await;
    assert!(!out.status.success(), "missing secret file accepted");
    assert!(String::from_utf8_lossy(&out.stderr).contains("hs.secret"));
}
