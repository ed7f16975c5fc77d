//! Autobahn conformance, cases 1 to 10, 12 and 13 (permessage-deflate), through kosoku (a Rust/PyO3 runner of the Autobahn TestSuite's own case
//! files; `scripts/autobahn` installs it project-locally and runs this test).
//!
//! Needs the cargo feature `conformance` (see `src/conformance.rs`): the gateway then echoes every upgraded WebSocket.
//! Everything else is production: the shipped `config/gateway.toml` (so the shipped `[limits]` build the
//! `WebSocketConfig`: read buffer, write buffers, 64 KiB `max_message_size` / `max_frame_size`), the real accept loop
//! and the real HTTP upgrade, without TLS (`tls.enabled = false`) because kosoku speaks plain `ws://`. Only the rate
//! limits are raised, so that the 9.x performance cases (thousands of messages per connection) measure framing
//! and not `limits.messages_per_second`.
//!
//! `tests/autobahn/run.py` runs the cases and compares each one's outcome with `tests/autobahn/expected.json`; any
//! difference fails this test, listing the cases that differ.

mod common;

use std::{path::PathBuf, process::Stdio, time::Duration};

use common::NatsServer;
use roomwire::{Config, Gateway, config::OneOrMany};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The whole run (517 cases) must end within this; measured at about 2.5 minutes on a loaded machine.
const RUN_LIMIT: Duration = Duration::from_secs(600);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shipped configuration with only what the conformance run needs changed.
fn conformance_config(nats_url: &str) -> Config {
    let mut c = Config::load(&root().join("config/gateway.toml")).expect("config/gateway.toml loads");
    c.server.listen = "127.0.0.1:0".parse().expect("address");
    c.tls.enabled = false;
    c.nats.url = OneOrMany::One(nats_url.to_string());
    c.auth.allow_anonymous = true;
    // 9.x sends up to thousands of messages per case and kosoku opens one connection per case: no rate limit may
    // decide an outcome. Sizes, buffers and timeouts stay as shipped.
    let l = &mut c.limits;
    l.messages_per_second = 1_000_000;
    l.messages_burst = 1_000_000;
    l.bytes_per_second = u32::MAX;
    l.bytes_burst = u32::MAX;
    l.max_rate_violations = u32::MAX;
    l.connections_per_second_per_ip = 100_000;
    l.connections_burst_per_ip = 100_000;
    l.max_connections_per_ip = 10_000;
    c.validate().expect("conformance config valid");
    c
}

/// Where kosoku is installed (`pip install --target`): `$KOSOKU_PATH`, else `.tools/kosoku`.
fn kosoku_path() -> PathBuf {
    let p = std::env::var_os("KOSOKU_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".tools/kosoku"));
    assert!(
        p.join("kosoku").is_dir(),
        "kosoku not found in {}: run scripts/autobahn (it installs it) or set KOSOKU_PATH",
        p.display()
    );
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autobahn_cases_match_expectations() {
    let kosoku = kosoku_path();
    let nats = NatsServer::start().await;
    let config = conformance_config(&nats.url());
    let shipped = Config::default().limits;
    assert_eq!(
        config.limits.max_message_size, shipped.max_message_size,
        "run with the shipped size limit"
    );
    assert_eq!(
        config.limits.max_frame_size, shipped.max_frame_size,
        "run with the shipped frame limit"
    );
    let ws_path = config.server.ws_path.clone();
    let listener = TcpListener::bind(config.server.listen).await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let shutdown = CancellationToken::new();
    let gw = Gateway::start(config, shutdown.clone()).await.expect("gateway starts");
    assert!(gw.tls().is_none(), "the conformance run is plain ws://");
    let server = tokio::spawn(roomwire::server::run_with(
        listener,
        gw.clone(),
        roomwire::conformance::Echo,
    ));

    let out_dir = std::env::var_os("AUTOBAHN_REPORT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/autobahn"));
    let python = std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into());
    let mut cmd = tokio::process::Command::new(python);
    cmd.arg(root().join("tests/autobahn/run.py"))
        .arg("--url")
        .arg(format!("ws://{addr}{ws_path}"))
        .arg("--expected")
        .arg(root().join("tests/autobahn/expected.json"))
        .arg("--out")
        .arg(&out_dir)
        .env("PYTHONPATH", &kosoku)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(cases) = std::env::var_os("AUTOBAHN_CASES") {
        cmd.arg("--cases").arg(cases);
    }
    if std::env::var_os("AUTOBAHN_UPDATE").is_some_and(|v| v == "1") {
        cmd.arg("--update");
    }
    let status = tokio::time::timeout(RUN_LIMIT, cmd.status())
        .await
        .expect("the Autobahn run finishes in time")
        .expect("run tests/autobahn/run.py");

    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), server).await;
    assert!(
        status.success(),
        "Autobahn outcomes differ from tests/autobahn/expected.json (see the list above; full reports in {})",
        out_dir.display()
    );
}
