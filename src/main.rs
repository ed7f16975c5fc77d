//! The `roomwire` binary: parses flags, loads the config, starts tracing, binds, and calls [`roomwire::run`].

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use roomwire::Config;

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
    /// Validate the configuration file and exit (non-zero with a message naming the bad key).
    CheckConfig,
    /// Write a self-signed development certificate for localhost into a directory.
    GenCert {
        /// Output directory.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::GenCert { dir } => {
            let (cert, key) = roomwire::tls::generate_dev_cert(&dir).context("gen-cert")?;
            println!("wrote {} and {}", cert.display(), key.display());
            Ok(())
        }
        Command::CheckConfig => {
            let config = Config::load(&cli.config)?;
            if config.tls.enabled {
                roomwire::tls::load_server_config(&config.tls)?;
            }
            roomwire::auth::Authenticator::from_config(&config.auth)?;
            println!("{}: ok", cli.config.display());
            Ok(())
        }
        Command::Serve => serve(&cli.config),
    }
}

fn serve(path: &std::path::Path) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let config = Config::load(path)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("binding server.listen {}", config.server.listen))?;
        let shutdown = roomwire::shutdown::on_signals();
        roomwire::run(listener, config, shutdown)
            .await
            .context("gateway failed to start")
    })
}
