//! TLS termination: loading the PEM certificate chain and key into a rustls server config (TLS 1.2 and 1.3, ALPN
//! `http/1.1`), hot reload of that config, and `roomwire gen-cert` (a self-signed development certificate).
//!
//! The handshake itself runs in each connection's task (never in the accept loop), under the handshake deadline.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use arc_swap::ArcSwap;
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};

use crate::config::TlsConfig;

/// TLS setup errors; each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file is missing, unreadable or holds no certificate.
    #[error("tls.cert_file {path}: {message}")]
    Cert {
        /// File.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The key file is missing, unreadable or holds no usable key.
    #[error("tls.key_file {path}: {message}")]
    Key {
        /// File.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// rustls refused the pair (e.g. the key does not match the certificate).
    #[error("tls: certificate and key rejected: {0}")]
    Rustls(#[from] rustls::Error),
    /// Writing generated files failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(String),
}

/// Builds a rustls server config from PEM files.
pub fn load_server_config(cfg: &TlsConfig) -> Result<ServerConfig, TlsError> {
    let cert_err = |message: String| TlsError::Cert {
        path: cfg.cert_file.clone(),
        message,
    };
    let key_err = |message: String| TlsError::Key {
        path: cfg.key_file.clone(),
        message,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert_file)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_err("no certificate found in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file).map_err(|e| key_err(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The admin listener's TLS: its own certificate, and with `client_ca` a required client certificate chaining to that
/// CA (mTLS), checked in the handshake before any HTTP is read.
pub fn load_admin_config(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<ServerConfig, TlsError> {
    let files = TlsConfig {
        enabled: true,
        cert_file: cert.to_owned(),
        key_file: key.to_owned(),
        ..TlsConfig::default()
    };
    let mut config = load_server_config(&files)?;
    if let Some(ca) = client_ca {
        let ca_err = |message: String| TlsError::Cert {
            path: ca.to_owned(),
            message,
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).map_err(|e| ca_err(e.to_string()))? {
            roots
                .add(c.map_err(|e| ca_err(e.to_string()))?)
                .map_err(|e| ca_err(e.to_string()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| ca_err(e.to_string()))?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| ca_err(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| ca_err(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| ca_err(e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    Ok(config)
}

/// The TLS acceptor in use, replaceable at run time (certificate rotation) without dropping connections: each new
/// handshake takes the current config; established sessions keep theirs.
#[derive(Debug)]
pub struct Tls {
    config: TlsConfig,
    current: ArcSwap<ServerConfig>,
}

impl Tls {
    /// Loads the configured certificate and key.
    pub fn new(config: &TlsConfig) -> Result<Self, TlsError> {
        let server = load_server_config(config)?;
        Ok(Self {
            config: config.clone(),
            current: ArcSwap::from_pointee(server),
        })
    }

    /// The config a new handshake uses now (the public listener's `crate::tls_stream`).
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// What the certificate and key files look like now (size and modification time of each, symlinks followed),
    /// to notice a rotation without reading or parsing them. `None` if either cannot be read.
    pub fn files_fingerprint(&self) -> Option<[(u64, std::time::SystemTime); 2]> {
        let stat = |p: &Path| fs::metadata(p).ok().and_then(|m| Some((m.len(), m.modified().ok()?)));
        Some([stat(&self.config.cert_file)?, stat(&self.config.key_file)?])
    }

    /// Re-reads the certificate and key files; on error the old ones stay in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let server = load_server_config(&self.config)?;
        self.current.store(Arc::new(server));
        Ok(())
    }
}

/// Writes a self-signed certificate for `localhost`, `127.0.0.1` and `::1` into `dir` (`dev-cert.pem`,
/// `dev-key.pem`). Returns the two paths.
pub fn generate_dev_cert(dir: &Path) -> Result<(PathBuf, PathBuf), TlsError> {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let certified = rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let cert_path = dir.join("dev-cert.pem");
    let key_path = dir.join("dev-key.pem");
    fs::write(&cert_path, certified.cert.pem()).map_err(|source| TlsError::Write {
        path: cert_path.clone(),
        source,
    })?;
    fs::write(&key_path, certified.signing_key.serialize_pem()).map_err(|source| TlsError::Write {
        path: key_path.clone(),
        source,
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600));
    }
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_cert_loads_and_missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = generate_dev_cert(dir.path()).unwrap();
        let cfg = TlsConfig {
            enabled: true,
            cert_file: cert,
            key_file: key,
            ..TlsConfig::default()
        };
        let tls = Tls::new(&cfg).unwrap();
        tls.reload().unwrap();
        let missing = TlsConfig {
            enabled: true,
            cert_file: dir.path().join("nope.pem"),
            key_file: cfg.key_file,
            ..TlsConfig::default()
        };
        let err = load_server_config(&missing).unwrap_err().to_string();
        assert!(err.contains("tls.cert_file") && err.contains("nope.pem"), "{err}");
    }
}
