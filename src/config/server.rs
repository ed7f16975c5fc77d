//! The listeners: `[server]` (the public WebSocket listener: address, handshake bounds, shutdown, origins and
//! trusted proxies, as [`ServerConfig`]), `[tls]` (its certificate, as [`TlsConfig`]) and `[admin]` (the operators'
//! second listener, as [`AdminConfig`], checked against `[server]` so the two never share an address).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::error::{ConfigError, invalid};

/// `[server]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on. Default `0.0.0.0:8443`.
    pub listen: SocketAddr,
    /// Identifier of this gateway instance, put in NATS headers and lifecycle events. Default: random at startup.
    pub gateway_id: Option<String>,
    /// Path of the WebSocket endpoint. Default `/ws`.
    pub ws_path: String,
    /// Global cap on open connections (TCP accepted, any stage). Over it: 503 before the upgrade. Default 50000.
    pub max_connections: usize,
    /// Absolute deadline from TCP accept for TLS + HTTP + upgrade (slowloris guard): a connection that has not upgraded
    /// by then is closed, however many keep-alive requests it made. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Largest HTTP request head (request line + headers) accepted, in bytes. Default 16384.
    pub max_header_bytes: usize,
    /// On SIGINT/SIGTERM: time allowed for clients to be closed (1001) and NATS flushed before exit. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// On SIGTERM/SIGINT: each WebSocket is closed (1001 `going away: reconnect`) at a random moment within this window
    /// after the signal, so its clients reconnect elsewhere spread out rather than all at once. `0s` closes all at
    /// once. `server.shutdown_grace` applies after it. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub drain_window: Duration,
    /// Serve `/metrics` on the public listener too. Default false: metrics tell an attacker the gateway's load and
    /// limits, so they are served publicly only when asked for; scrape the admin listener (`[admin] listen`).
    pub public_metrics: bool,
    /// Allowed `Origin` values for the upgrade: exact origins (`https://app.example.com`) or `*.example.com` /
    /// `https://*.example.com` wildcards. Empty (default) = any origin, including none.
    pub allowed_origins: Vec<String>,
    /// Proxies (IPs or CIDRs) whose forwarding header (`server.forwarded_header`) is trusted. Connections from them
    /// are counted per client address at the upgrade, by the forwarded address. Default: none.
    pub trusted_proxies: Vec<IpNet>,
    /// The one header that carries the client address when the peer is in `trusted_proxies`:
    /// `"x-forwarded-for"`, `"forwarded"` (RFC 7239 `for=`) or `"x-real-ip"`. Any other forwarding header is
    /// ignored. Default `"x-forwarded-for"`.
    pub forwarded_header: ForwardedHeader,
    /// Serve the demo chat at `/` (and its script and style under `/demo/`). The browser client library is served
    /// at `/client/roomwire.js` either way. Default false.
    pub demo: bool,
}

/// Which header a trusted proxy uses to pass on the client's address (`server.forwarded_header`).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (the right-most untrusted entry is the client).
    #[default]
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client;proto=https, for=proxy1` (the right-most untrusted `for=` is the client).
    #[serde(rename = "forwarded")]
    Forwarded,
    /// `X-Real-IP: client`, a single address set (not appended) by the proxy.
    #[serde(rename = "x-real-ip")]
    XRealIp,
}

impl ForwardedHeader {
    /// The header's name, lower-case.
    pub fn name(self) -> &'static str {
        match self {
            ForwardedHeader::XForwardedFor => "x-forwarded-for",
            ForwardedHeader::Forwarded => "forwarded",
            ForwardedHeader::XRealIp => "x-real-ip",
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8443".parse().expect("static address"),
            gateway_id: None,
            ws_path: "/ws".into(),
            max_connections: 50_000,
            handshake_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            shutdown_grace: Duration::from_secs(10),
            drain_window: Duration::from_secs(10),
            public_metrics: false,
            allowed_origins: Vec::new(),
            trusted_proxies: Vec::new(),
            forwarded_header: ForwardedHeader::XForwardedFor,
            demo: false,
        }
    }
}

impl ServerConfig {
    /// Checks `[server]`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.ws_path.starts_with('/') {
            return Err(invalid("server.ws_path", "must start with '/'"));
        }
        if self.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        if self.handshake_timeout.is_zero() {
            return Err(invalid("server.handshake_timeout", "must be positive"));
        }
        if self.max_header_bytes < 8192 {
            // hyper's smallest read buffer.
            return Err(invalid("server.max_header_bytes", "must be at least 8192"));
        }
        if let Some(id) = &self.gateway_id
            && (id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        {
            return Err(invalid("server.gateway_id", "use 1+ characters from [A-Za-z0-9_-]"));
        }
        for origin in &self.allowed_origins {
            if origin.is_empty() || origin.contains(char::is_whitespace) {
                return Err(invalid("server.allowed_origins", format!("bad origin {origin:?}")));
            }
        }
        Ok(())
    }
}

/// `[tls]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Terminate TLS (wss). When false the listener speaks plain ws (behind a TLS-terminating proxy). Default true.
    pub enabled: bool,
    /// PEM certificate chain. Default `certs/dev-cert.pem`.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1). Default `certs/dev-key.pem`.
    pub key_file: PathBuf,
    /// How often the certificate and key files are checked for changes (size and modification time, following
    /// symlinks); a change reloads them as SIGHUP does. `0s` turns the check off. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub watch_interval: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            cert_file: "certs/dev-cert.pem".into(),
            key_file: "certs/dev-key.pem".into(),
            watch_interval: Duration::from_secs(10),
        }
    }
}

/// `[admin]`: a second, plain-HTTP listener for operators (`/metrics`, `/healthz`, `/readyz`, `/connz`). Bind it to
/// loopback or a private network: it has no TLS and no authentication.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin listener, e.g. `"127.0.0.1:9090"`. Default: none (no admin listener).
    pub listen: Option<SocketAddr>,
    /// Connections open at once on the admin listener; more are closed at accept. Default 16.
    pub max_connections: usize,
    /// Admin connections open at once from one address; more are closed at accept, so one client cannot hold every
    /// `max_connections` slot. Default 4.
    pub max_connections_per_ip: usize,
    /// How long one admin connection may live, absolute from accept: it covers the TLS handshake and every request
    /// on a keep-alive connection (a client that sends a request every few seconds cannot keep its slot). A scraper
    /// simply reconnects. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub connection_timeout: Duration,
    /// Serve the admin listener over TLS with this PEM certificate chain (with `tls_key_file`). Default none (plain
    /// HTTP).
    pub tls_cert_file: Option<PathBuf>,
    /// Key of `tls_cert_file` (PEM). Default none.
    pub tls_key_file: Option<PathBuf>,
    /// Require a client certificate issued by this CA (PEM) on the admin listener (mTLS): a scraper without one is
    /// refused in the handshake. Needs `tls_cert_file`. Default none.
    pub client_ca_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: None,
            max_connections: 16,
            max_connections_per_ip: 4,
            connection_timeout: Duration::from_secs(30),
            tls_cert_file: None,
            tls_key_file: None,
            client_ca_file: None,
        }
    }
}

impl AdminConfig {
    /// Checks `[admin]`: not on the public listener's address, at least one connection.
    pub fn validate(&self, server: &ServerConfig) -> Result<(), ConfigError> {
        if self.max_connections == 0 {
            return Err(invalid("admin.max_connections", "must be at least 1"));
        }
        if self.max_connections_per_ip == 0 {
            return Err(invalid("admin.max_connections_per_ip", "must be at least 1"));
        }
        if self.connection_timeout.is_zero() {
            return Err(invalid("admin.connection_timeout", "must be more than 0s"));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(invalid(
                "admin.tls_cert_file",
                "set both admin.tls_cert_file and admin.tls_key_file, or neither",
            ));
        }
        if self.client_ca_file.is_some() && self.tls_cert_file.is_none() {
            return Err(invalid(
                "admin.client_ca_file",
                "client certificates need admin.tls_cert_file and tls_key_file",
            ));
        }
        if let Some(addr) = self.listen
            && addr == server.listen
            && addr.port() != 0
        {
            return Err(invalid("admin.listen", "must differ from server.listen"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn forwarded_header_is_one_of_three() {
        let base = "[auth]\nallow_anonymous = true\n";
        assert_eq!(
            Config::parse(base).unwrap().server.forwarded_header,
            ForwardedHeader::XForwardedFor
        );
        for (v, want) in [
            ("x-forwarded-for", ForwardedHeader::XForwardedFor),
            ("forwarded", ForwardedHeader::Forwarded),
            ("x-real-ip", ForwardedHeader::XRealIp),
        ] {
            let c = Config::parse(&format!("{base}[server]\nforwarded_header = \"{v}\"\n")).unwrap();
            assert_eq!(c.server.forwarded_header, want);
            assert_eq!(want.name(), v);
        }
        let err = Config::parse(&format!("{base}[server]\nforwarded_header = \"X-Client-IP\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("forwarded_header"), "{err}");
    }
}
