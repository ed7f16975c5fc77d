//! The admin listener over TLS with client-certificate verification (issue 14, mTLS): a scraper with a certificate
//! from `admin.client_ca_file` reads `/metrics`; one without is refused in the handshake.

mod common;

use std::sync::Arc;

use common::{NatsServer, TestCa, TestGateway};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CA for clients and one client certificate from it: (CA PEM, client cert PEM, client key PEM).
fn client_ca_and_cert() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["prometheus".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

async fn get_metrics(addr: std::net::SocketAddr, ca: &TestCa, client: Option<(&str, &str)>) -> std::io::Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                .map(Result::unwrap)
                .collect();
            builder
                .with_client_auth_cert(chain, PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap())
                .unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    tls.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = String::new();
    tls.read_to_string(&mut out).await?;
    Ok(out)
}

#[tokio::test]
async fn admin_mtls_lets_only_certified_scrapers_in() {
    let nats = NatsServer::start().await;
    let ca = Arc::new(TestCa::new());
    let (client_ca, client_cert, client_key) = client_ca_and_cert();
    let dir = tempfile::tempdir().unwrap();
    let client_ca_file = dir.path().join("clients-ca.pem");
    std::fs::write(&client_ca_file, &client_ca).unwrap();
    let gw = TestGateway::start_with_ca(&nats.url(), ca.clone(), |c| {
        c.admin.tls_cert_file = Some(ca.cert_file.clone());
        c.admin.tls_key_file = Some(ca.key_file.clone());
        c.admin.client_ca_file = Some(client_ca_file.clone());
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = roomwire::admin::acceptor(&gw.gw.config().admin).unwrap();
    assert!(acceptor.is_some());
    tokio::spawn(roomwire::admin::serve(listener, gw.gw.clone(), acceptor));

    let out = get_metrics(addr, &ca, Some((&client_cert, &client_key)))
        .await
        .expect("scrape with a client certificate");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("roomwire_connections_open"), "{out}");

    // No client certificate: refused in the handshake (TLS 1.3 reports it on the first read).
    if let Ok(out) = get_metrics(addr, &ca, None).await {
        assert!(
            !out.contains("roomwire_"),
            "metrics served without a client certificate: {out}"
        );
    }
    // A client certificate from another CA: refused too.
    let (_, other_cert, other_key) = client_ca_and_cert();
    if let Ok(out) = get_metrics(addr, &ca, Some((&other_cert, &other_key))).await {
        assert!(!out.contains("roomwire_"), "metrics served to a stranger: {out}");
    }
}
