//! The admin listener: over TLS with client-certificate verification (issue 14, mTLS), a scraper with a certificate
//! from `admin.client_ca_file` reads `/metrics` and one without is refused in the handshake; and no client can hold
//! it shut (issue 22, finding 5): each connection lives at most `admin.connection_timeout` from accept, however often
//! it sends requests, and one address holds at most `admin.max_connections_per_ip` of the `max_connections`.

mod common;

use std::{net::SocketAddr, sync::Arc, time::Duration};

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

/// Starts the admin listener (plain HTTP) of a gateway configured by `tweak`.
async fn plain_admin(nats: &NatsServer, tweak: impl FnOnce(&mut roomwire::Config)) -> (TestGateway, SocketAddr) {
    let gw = TestGateway::start(nats, tweak).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(roomwire::admin::serve(listener, gw.gw.clone(), None));
    (gw, addr)
}

/// A TCP connection to `addr` from the source address `from`.
async fn tcp_from(from: &str, addr: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// One keep-alive request; `None` once the server closed the connection.
async fn keep_alive_get(tcp: &mut tokio::net::TcpStream, path: &str) -> Option<String> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    loop {
        let n = tcp.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        // The probes answer short bodies ending in a newline.
        if let Some((_, body)) = text.split_once("\r\n\r\n")
            && body.ends_with('\n')
        {
            return Some(text.into_owned());
        }
    }
}

/// Every slot taken by keep-alive connections that each send a request every 200 ms: before the fix the header
/// timeout restarted with each request and the slots were held for as long as the attack lasted. Now each
/// connection is closed at `admin.connection_timeout` from its accept, and a probe gets in.
#[tokio::test]
async fn keep_alive_requests_cannot_hold_the_admin_listener() {
    let nats = NatsServer::start().await;
    let lifetime = Duration::from_secs(1);
    let (_gw, addr) = plain_admin(&nats, |c| {
        c.admin.max_connections = 4;
        c.admin.max_connections_per_ip = 4;
        c.admin.connection_timeout = lifetime;
    })
    .await;
    let start = tokio::time::Instant::now();
    let mut attackers = Vec::new();
    for _ in 0..4 {
        let mut tcp = tcp_from("127.0.0.1", addr).await;
        assert!(keep_alive_get(&mut tcp, "/healthz").await.is_some(), "admitted");
        attackers.push(tokio::spawn(async move {
            let mut answered = 0u32;
            while keep_alive_get(&mut tcp, "/healthz").await.is_some() {
                answered += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            answered
        }));
    }
    for a in attackers {
        let cut = tokio::time::timeout(lifetime * 5, a).await;
        assert!(
            cut.is_ok(),
            "an attacker kept its admin connection past {:?}",
            lifetime * 5
        );
    }
    assert!(start.elapsed() >= lifetime, "closed before its lifetime");
    let mut probe = tcp_from("127.0.0.1", addr).await;
    let answer = keep_alive_get(&mut probe, "/readyz")
        .await
        .expect("the probe is served");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// One address holds at most `admin.max_connections_per_ip`: its next connection is closed at accept, while a
/// probe from another address is served.
#[tokio::test]
async fn one_address_cannot_take_every_admin_slot() {
    let nats = NatsServer::start().await;
    let (_gw, addr) = plain_admin(&nats, |c| {
        c.admin.max_connections = 16;
        c.admin.max_connections_per_ip = 2;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut tcp = tcp_from("127.0.0.1", addr).await;
        assert!(keep_alive_get(&mut tcp, "/healthz").await.is_some(), "admitted");
        held.push(tcp);
    }
    let mut third = tcp_from("127.0.0.1", addr).await;
    assert!(
        keep_alive_get(&mut third, "/healthz").await.is_none(),
        "a third connection from one address"
    );
    let mut other = tcp_from("127.0.0.2", addr).await;
    let answer = keep_alive_get(&mut other, "/readyz")
        .await
        .expect("another address is served");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // A held connection given back frees its address's slot.
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut again = tcp_from("127.0.0.1", addr).await;
        if keep_alive_get(&mut again, "/healthz").await.is_some() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the slot was never given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
