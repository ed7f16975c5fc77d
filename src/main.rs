//! The `roomwire` binary: parses flags, loads the config, starts tracing, binds, and calls [`roomwire::run`].

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use roomwire::{Config, config::LogFormat};
use tracing_subscriber::{
    Layer,
    filter::{EnvFilter, LevelFilter, Targets},
    layer::{Filter, SubscriberExt},
    registry::LookupSpan,
    util::SubscriberInitExt,
};

/// Roomwire: a WebSocket gateway bridging browser rooms to NATS subjects.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, global = true, default_value = "config/gateway.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Validate the configuration file and exit (non-zero with a message naming the bad key). Every secret source
    /// (environment variable, file) must resolve.
    CheckConfig {
        /// Also print the effective configuration (defaults filled in, secrets masked).
        #[arg(long)]
        print: bool,
        /// Format of `--print`.
        #[arg(long, value_enum, default_value = "toml")]
        format: PrintFormat,
    },
    /// Write a self-signed development certificate for localhost into a directory.
    GenCert {
        /// Output directory.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
}

/// `check-config --format`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum PrintFormat {
    Toml,
    Json,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::GenCert { dir } => {
            let (cert, key) = roomwire::tls::generate_dev_cert(&dir).context("gen-cert")?;
            println!("wrote {} and {}", cert.display(), key.display());
            Ok(())
        }
        Command::CheckConfig { print, format } => {
            let config = Config::load(&cli.config)?;
            if config.tls.enabled {
                roomwire::tls::load_server_config(&config.tls)?;
            }
            roomwire::auth::Authenticator::from_config(&config.auth)?;
            roomwire::admin::acceptor(&config.admin)?;
            check_nats_secrets(&config.nats)?;
            if print {
                let value = masked(&config).context("serialising the configuration")?;
                let text = match format {
                    PrintFormat::Toml => toml::to_string_pretty(&without_nulls(value)).context("writing TOML")?,
                    PrintFormat::Json => serde_json::to_string_pretty(&value).context("writing JSON")?,
                };
                println!("{text}");
            } else {
                println!("{}: ok", cli.config.display());
            }
            Ok(())
        }
        Command::Serve => serve(&cli.config),
    }
}

/// The allocator (feature `jemalloc`, on by default). A reconnect storm (thousands of TLS and WebSocket handshakes at
/// once) allocates far more than the connections keep; glibc's malloc kept that transient memory in its arenas, so the
/// RSS after the first storm was 1.6-1.7x what a paced open leaves, and stayed there (issue 28). jemalloc with the
/// options below gives it back within seconds: see [`malloc_conf`] and BENCHMARKS.md ("Performance against the
/// peers").
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read by jemalloc itself before `main` (hence a static and not a call): a background thread
/// purges unused dirty pages after about 1 s (`dirty_decay_ms:1000`) and returns them to the system at once
/// (`muzzy_decay_ms:0`: no lazily-freed middle stage that RSS would still count). The default (10 s, then 10 s more
/// as muzzy) purges only when an allocating thread passes by, which an idle gateway after a storm never does. An
/// operator can still override any of them with the environment variable `_RJEM_MALLOC_CONF` (read after this).
/// The symbol is jemalloc's `malloc_conf` under tikv-jemalloc-sys's `_rjem_` prefix (its own test,
/// `tests/malloc_conf_set.rs`, declares it the same way).
#[cfg(all(feature = "jemalloc", target_os = "linux"))]
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: Option<&'static std::ffi::c_char> = Some(
    // SAFETY: a pointer to the first byte of a 'static NUL-terminated string, which is what jemalloc reads.
    unsafe { &*c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr() },
);

/// Large transient buffers (a room message of 64 KiB or more, built once and shared by every member) get pages of
/// their own, returned to the system when the message is gone: in glibc's heap they would leave holes that keep the
/// process's RSS at its high-water mark long after a burst (BENCHMARKS.md, section 1). A `mallopt` knob of glibc, for
/// builds without the `jemalloc` feature (jemalloc returns such memory itself).
fn return_large_buffers_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "jemalloc")))]
    // SAFETY: mallopt only sets an allocator parameter; called once, before the runtime starts any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
    }
}

/// Resolves the NATS secret sources (`nats.password`, `nats.token`) and checks that `nats.creds_file` is readable, as
/// the gateway would at start: a missing variable or file is an error now rather than at the first connection.
fn check_nats_secrets(nats: &roomwire::config::NatsConfig) -> anyhow::Result<()> {
    if let Some(p) = &nats.password {
        p.load("nats.password")?;
    }
    if let Some(t) = &nats.token {
        t.load("nats.token")?;
    }
    if let Some(seed) = &nats.nkey_seed {
        seed.load("nats.nkey_seed")?;
    }
    if let Some(path) = &nats.creds_file {
        std::fs::metadata(path).with_context(|| format!("nats.creds_file {}", path.display()))?;
    }
    Ok(())
}

/// The configuration as a JSON value, secrets masked. Secret sources print as what they name (`{ env = "VAR" }`,
/// `{ file = ".." }`), never their value; the one place a secret can sit in the file itself is the userinfo of a
/// `nats.url` (`nats://user:pass@host`, `nats://token@host`), which is replaced by `MASKED`.
fn masked(config: &Config) -> anyhow::Result<serde_json::Value> {
    let mut value = serde_json::to_value(config)?;
    match value.pointer_mut("/nats/url") {
        Some(serde_json::Value::String(url)) => *url = mask_userinfo(url),
        Some(serde_json::Value::Array(urls)) => {
            for url in urls {
                if let serde_json::Value::String(u) = url {
                    *u = mask_userinfo(u);
                }
            }
        }
        _ => {}
    }
    Ok(value)
}

/// TOML has no null: an unset optional key is left out, as it would be in the file.
fn without_nulls(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().filter(|v| !v.is_null()).map(without_nulls).collect()),
        other => other,
    }
}

/// `scheme://user:pass@host` → `scheme://user:MASKED@host`; `scheme://token@host` → `scheme://MASKED@host`.
fn mask_userinfo(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let authority_end = url[start..].find(['/', '?', '#']).map_or(url.len(), |i| start + i);
    let Some(at) = url[start..authority_end].rfind('@').map(|i| start + i) else {
        return url.to_string();
    };
    let userinfo = &url[start..at];
    let masked = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:MASKED"),
        None => "MASKED".to_string(),
    };
    format!("{}{masked}{}", &url[..start], &url[at..])
}

/// Crates whose debug/trace logs can show what crosses the wire: tungstenite logs every frame with its payload at
/// trace (a `refresh` carries a token), the HTTP and TLS crates can show headers (`Authorization`, cookies) or
/// record contents.
const WIRE_CRATES: [&str; 7] = [
    "tungstenite",
    "tokio_tungstenite",
    "hyper",
    "hyper_util",
    "rustls",
    "tokio_rustls",
    "h2",
];

/// The most these crates may log, whatever `RUST_LOG` asks (`docs/security.md`: tokens never reach the logs).
const WIRE_CRATES_MAX: LevelFilter = LevelFilter::INFO;

/// The log filter: `rust_log` (the `RUST_LOG` syntax; `info` when absent or invalid) AND a cap of
/// [`WIRE_CRATES_MAX`] on [`WIRE_CRATES`]. The cap is a separate filter both must pass, not a directive added to
/// `RUST_LOG`'s, so no directive can lift it (not `tungstenite::protocol=trace`, which is more specific than a
/// `tungstenite` cap would be, nor a span directive such as `[conn]=trace`).
fn log_filter<S>(rust_log: Option<&str>) -> impl Filter<S> + Send + Sync + 'static
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    use tracing_subscriber::filter::FilterExt;
    let wanted = rust_log
        .and_then(|spec| EnvFilter::try_new(spec).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    // async-nats logs every connection event at INFO itself; `bridge` logs each once, with the gateway's context.
    let caps = Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_targets(WIRE_CRATES.map(|c| (c, WIRE_CRATES_MAX)))
        .with_target("async_nats", LevelFilter::WARN);
    wanted.and(caps)
}

fn serve(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    init_logging(&config.log);
    return_large_buffers_to_the_system();
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    runtime.block_on(async {
        let listener = bind_public(config.server.listen)
            .with_context(|| format!("binding server.listen {}", config.server.listen))?;
        let shutdown = tokio_util::sync::CancellationToken::new();
        let gateway = roomwire::Gateway::start(config, shutdown)
            .await
            .context("gateway failed to start")?;
        roomwire::shutdown::on_signals(gateway.drain().clone());
        if let Some(addr) = gateway.config().admin.listen {
            let admin = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding admin.listen {addr}"))?;
            let tls = roomwire::admin::acceptor(&gateway.config().admin).context("admin TLS")?;
            gateway.spawn(roomwire::admin::serve(admin, gateway.clone(), tls));
        }
        roomwire::run(listener, gateway).await;
        Ok(())
    })
}

/// The public listener's accept queue. A reconnect storm sends thousands of SYNs at once: with tokio's default
/// backlog (1,024) 10,000 clients at once overflowed it about 30,000 times, and every dropped SYN waited 1 s, 3 s, ...
/// for the client's retry, which made the storm's p99 time to the first message several seconds (BENCHMARKS.md,
/// "Reconnect storm"). The kernel caps it at `net.core.somaxconn` (4,096 by default since Linux 5.4), so this asks
/// for whatever the host allows.
const LISTEN_BACKLOG: u32 = 65_535;

/// Binds `server.listen` as `TcpListener::bind` does (`SO_REUSEADDR` on Unix), with [`LISTEN_BACKLOG`].
fn bind_public(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Starts tracing as `[log]` says: `RUST_LOG` when set, else `log.level` (default `info`), always under the
/// [`WIRE_CRATES`] cap; human lines (colours only on a terminal) or one JSON object per line, with the span
/// fields (connection id, address, user) on every event.
fn init_logging(log: &roomwire::config::LogConfig) {
    use std::io::IsTerminal;
    let rust_log = std::env::var("RUST_LOG").ok().filter(|v| !v.trim().is_empty());
    let spec = rust_log.as_deref().or(log.level.as_deref());
    let layer = match log.format {
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stdout().is_terminal())
            .with_filter(log_filter(spec))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(log_filter(spec))
            .boxed(),
    };
    // `init` also routes the `log` crate (tungstenite, rustls) into tracing, through the same filter.
    tracing_subscriber::registry().with(layer).init();
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Cursor, Write},
        sync::{Arc, Mutex},
    };

    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocket};
    use tracing_subscriber::{Layer, layer::SubscriberExt, util::SubscriberInitExt};

    use super::{log_filter, mask_userinfo};

    #[test]
    fn nats_url_credentials_are_masked() {
        assert_eq!(mask_userinfo("nats://a:s3cret@h:4222"), "nats://a:MASKED@h:4222");
        assert_eq!(mask_userinfo("tls://tok3n@h"), "tls://MASKED@h");
        assert_eq!(mask_userinfo("nats://h:4222"), "nats://h:4222");
        assert_eq!(mask_userinfo("nats://h/p@x"), "nats://h/p@x");
        assert_eq!(mask_userinfo("nats://u:p:q@h"), "nats://u:MASKED@h");
    }

    /// A `MakeWriter` collecting everything logged.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A masked client text frame, as a browser sends it.
    fn client_text_frame(payload: &[u8]) -> Vec<u8> {
        assert!(payload.len() < 126);
        let mask = [0x11, 0x22, 0x33, 0x44];
        let mut f = vec![0x81, 0x80 | payload.len() as u8];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    /// Logs what a real tungstenite logs when it reads a `refresh` frame, plus one line of our own, under `rust_log`
    /// and (when `capped`) the shipped filter; returns the log text.
    fn log_a_refresh_frame(rust_log: &str, capped: bool) -> String {
        let out = Captured::default();
        let writer = out.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || writer.clone());
        let subscriber = if capped {
            tracing_subscriber::registry().with(layer.with_filter(log_filter(Some(rust_log))).boxed())
        } else {
            let plain = tracing_subscriber::EnvFilter::new(rust_log);
            tracing_subscriber::registry().with(layer.with_filter(plain).boxed())
        };
        tracing::subscriber::with_default(subscriber, || {
            let frame = client_text_frame(br#"{"op":"refresh","token":"SECRET-TOKEN"}"#);
            let mut ws = WebSocket::from_raw_socket(Cursor::new(frame), Role::Server, None);
            let msg = ws.read().expect("frame parses");
            assert!(msg.to_text().expect("text").contains("SECRET-TOKEN"));
            tracing::trace!(target: "roomwire::connection", "our own trace line");
        });
        let bytes = out.0.lock().expect("lock").clone();
        String::from_utf8(bytes).expect("utf8")
    }

    #[test]
    fn wire_crates_never_log_frames_even_at_trace() {
        // Route the `log` crate (which tungstenite uses) into tracing, as `init` does in `serve`.
        let _ = tracing_subscriber::registry().try_init();

        // Control: without the cap, RUST_LOG=trace shows the token (so this test can see a leak).
        let leaked = log_a_refresh_frame("trace", false);
        assert!(
            leaked.contains("SECRET-TOKEN"),
            "control must capture tungstenite's trace: {leaked}"
        );

        for spec in [
            "trace",
            "tungstenite=trace,tokio_tungstenite=trace",
            "tungstenite::protocol=trace",
            "[conn]=trace,trace",
        ] {
            let text = log_a_refresh_frame(spec, true);
            assert!(!text.contains("SECRET-TOKEN"), "RUST_LOG={spec} leaked a token: {text}");
            if spec.contains("trace,trace") || spec == "trace" {
                assert!(
                    text.contains("our own trace line"),
                    "RUST_LOG={spec} must still show our traces: {text}"
                );
            }
        }
        // An invalid spec falls back to `info`.
        let text = log_a_refresh_frame("=%%=", true);
        assert!(
            !text.contains("our own trace line") && !text.contains("SECRET-TOKEN"),
            "{text}"
        );
    }
}
