//! Test support shared by the unit tests: a real nats-server on a port it picks itself, and a gateway on it.
#![cfg(test)]

use std::{process::Stdio, sync::Arc, time::Duration};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{Config, gateway::Gateway};

/// A real nats-server on a port it picks itself (`-p -1`, learnt from its ports file); killed on drop.
pub(crate) struct Nats {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Nats {
    pub(crate) async fn start() -> Self {
        Self::start_with(false).await
    }

    /// With JetStream enabled (`-js`, its store in the server's temp dir).
    pub(crate) async fn start_js() -> Self {
        Self::start_with(true).await
    }

    async fn start_with(js: bool) -> Self {
        let bin = std::env::var("NATS_SERVER")
            .unwrap_or_else(|_| format!("{}/.tools/nats/bin/nats-server", env!("CARGO_MANIFEST_DIR")));
        let dir = tempfile::tempdir().expect("tempdir");
        let ports = dir.path().join("ports");
        std::fs::create_dir_all(&ports).expect("ports dir");
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(["-a", "127.0.0.1", "-p", "-1", "--ports_file_dir"])
            .arg(&ports);
        if js {
            cmd.args(["-js", "-sd"]).arg(dir.path().join("js"));
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {bin} (run scripts/test, which installs it): {e}"));
        // Owned from here on, so the server is killed (Drop) even if the wait below fails.
        let mut nats = Nats {
            child,
            url: String::new(),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ports = std::fs::read_dir(nats._dir.path().join("ports"))
                .expect("ports dir")
                .flatten()
                .find_map(|f| std::fs::read_to_string(f.path()).ok())
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
            if let Some(url) = ports.as_ref().and_then(|p| p["nats"][0].as_str()) {
                nats.url = url.to_string();
                return nats;
            }
            assert!(Instant::now() < deadline, "nats-server did not write its ports file");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Nats {
    /// The client URL.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub(crate) fn pause(&self) {
        self.signal("-STOP");
        wait_stopped(self.child.id());
    }

    /// Unfreezes it (SIGCONT).
    pub(crate) fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} nats-server");
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gateway (TLS off, anonymous allowed, `tweak` applied) connected to a fresh nats-server.
pub(crate) async fn gateway(tweak: impl FnOnce(&mut Config)) -> (Nats, Arc<Gateway>) {
    let nats = Nats::start().await;
    let mut config = Config::default();
    config.tls.enabled = false;
    config.auth.allow_anonymous = true;
    config.nats.url = crate::config::OneOrMany::One(nats.url.clone());
    tweak(&mut config);
    let gw = Gateway::start(config, CancellationToken::new()).await.expect("gateway");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw.bridge().is_connected() {
        assert!(Instant::now() < deadline, "NATS connection");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (nats, gw)
}

/// Waits until every thread of `pid` is stopped (state `T`): SIGSTOP reaches a running multi-threaded process
/// asynchronously, and a request sent in between would still be answered.
pub fn wait_stopped(pid: u32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let all_stopped = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks.flatten().all(|t| {
                    std::fs::read_to_string(t.path().join("stat"))
                        .ok()
                        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('T')))
                        .unwrap_or(true)
                })
            })
            .unwrap_or(true);
        if all_stopped || std::time::Instant::now() > deadline {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}
