//! A real `nats-server` on a dynamic port, killed on drop: the one launcher of the unit tests
//! (`src/test_support.rs` includes this file) and the integration tests (`tests/common`). It depends on no part of
//! the roomwire crate, so both sides can compile it.
#![allow(dead_code)]

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use tokio::net::TcpStream;

/// How long any single expected event may take before a test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// Path of the nats-server binary: `$NATS_SERVER`, else the project-local install made by `scripts/test`.
pub fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NATS_SERVER") {
        return PathBuf::from(p);
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/nats/bin/nats-server");
    assert!(
        local.exists(),
        "nats-server not found at {}: run scripts/test (it installs it) or set NATS_SERVER",
        local.display()
    );
    local
}

/// A port that was free a moment ago (bind to 0, read it, release it). Racy: another process may take it before it
/// is used. [`NatsServer`] does not need it (nats-server picks its own ports); kept for callers that do (cluster
/// route ports).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real nats-server on a dynamic port, killed on drop.
///
/// The server chooses its port itself (`-p -1`) and reports it in a ports file (`--ports_file_dir`), so there is no
/// window in which another process can take a port we picked. A restart reuses the port it got the first time.
/// `-m -1` among the extra arguments gives a monitoring port the same way ([`NatsServer::monitor_port`]).
pub struct NatsServer {
    pub port: u16,
    /// The monitoring port, when started with `-m` (e.g. `-m -1`).
    pub monitor_port: Option<u16>,
    child: Option<Child>,
    extra: Vec<String>,
    /// Holds the ports file, the server's log (stderr) and, with [`NatsServer::start_js`], the JetStream store.
    dir: tempfile::TempDir,
}

impl NatsServer {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts with extra command-line arguments (e.g. `["-c", "nats.conf"]`, `["-m", "-1"]`).
    pub async fn start_with(extra: &[&str]) -> Self {
        let mut s = Self::unstarted(extra);
        s.spawn().await;
        s
    }

    /// With JetStream enabled (`-js`), its store in the server's temp dir (so it survives a [`NatsServer::restart`]).
    pub async fn start_js() -> Self {
        let mut s = Self::unstarted(&["-js", "-sd"]);
        let store = s.dir.path().join("js");
        s.extra.push(store.to_str().expect("utf-8 temp path").to_owned());
        s.spawn().await;
        s
    }

    fn unstarted(extra: &[&str]) -> Self {
        NatsServer {
            port: 0,
            monitor_port: None,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            dir: tempfile::tempdir().expect("temp dir for nats-server"),
        }
    }

    /// The server's log so far (its stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats-server.log")).unwrap_or_default()
    }

    async fn spawn(&mut self) {
        // First start: let the server choose (-1). Restart: the ports it got, so clients reconnect to the same URL.
        let port = if self.port == 0 {
            "-1".to_string()
        } else {
            self.port.to_string()
        };
        let mut extra = self.extra.clone();
        if let (Some(m), Some(i)) = (self.monitor_port, extra.iter().position(|a| a == "-m")) {
            extra[i + 1] = m.to_string();
        }
        let ports_dir = self.dir.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).expect("ports dir");
        let log = std::fs::File::create(self.dir.path().join("nats-server.log")).expect("nats-server log file");
        let bin = nats_server_bin();
        let child = Command::new(&bin)
            .args(["-a", "127.0.0.1", "-p", &port])
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .args(&extra)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("start {} (run scripts/test, which installs it): {e}", bin.display()));
        let pid = child.id();
        self.child = Some(child);
        // Wait for the ports file (written once the listeners are up), noticing a server that exits instead.
        let ports_file = ports_dir.join(format!("{}_{pid}.ports", bin.file_name().unwrap().to_string_lossy()));
        let deadline = tokio::time::Instant::now() + WAIT;
        let ports: Value = loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("try_wait nats-server") {
                panic!("nats-server exited at start ({status}):\n{}", self.log());
            }
            if let Ok(text) = std::fs::read_to_string(&ports_file)
                && let Ok(v) = serde_json::from_str::<Value>(&text)
            {
                break v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nats-server did not start:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let port_of = |key: &str| -> Option<u16> {
            let url = ports[key].as_array()?.first()?.as_str()?;
            url.rsplit(':').next()?.trim_end_matches('/').parse().ok()
        };
        self.port = port_of("nats").unwrap_or_else(|| panic!("client port in the ports file: {ports}"));
        self.monitor_port = port_of("monitoring");
        // The ports file is written once the listeners are up, but check that the client port takes connections.
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nats-server does not accept:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Kills the server (as a crash would).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    /// Sends `sig` (e.g. `-HUP`) to the server.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} nats-server");
    }

    /// Makes the server reload its config file (SIGHUP), as `nats-server --signal reload` does.
    pub fn reload(&self) {
        self.signal("-HUP");
    }

    /// Freezes the server (SIGSTOP): TCP stays open but nothing is read. Returns once every thread of the server is
    /// stopped, so nothing sent afterwards can still be processed.
    pub fn pause(&self) {
        self.signal("-STOP");
        wait_stopped(self.pid());
    }

    /// The same as [`NatsServer::pause`] (which waits until the server is stopped), for async callers.
    pub async fn pause_and_wait(&self) {
        self.pause();
    }

    /// Unfreezes it (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url()).await.expect("connect to nats")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // Resume a paused server first, so the kill and wait() below return promptly.
            let _ = Command::new("kill").args(["-CONT", &c.id().to_string()]).status();
        }
        self.stop();
    }
}

/// Waits until every thread of `pid` is stopped (`/proc/<pid>/task/*/stat` state `T` or `t`): SIGSTOP reaches a
/// running multi-threaded process asynchronously, and a request sent in between would still be answered. Fails the
/// test if that takes longer than [`WAIT`].
pub fn wait_stopped(pid: u32) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/<pid>/task");
        let all_stopped = tasks.flatten().all(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // The state follows the parenthesised command name.
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
        });
        if all_stopped {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "nats-server did not stop");
        std::thread::sleep(Duration::from_millis(2));
    }
}
