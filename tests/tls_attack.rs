//! The fragmented-handshake attack against the running gateway (issue 22, finding 4): eight connections from one
//! address each send a 64 KiB handshake message one byte per TLS record, every record padded to the 2^14 + 1 bytes TLS
//! 1.3 allows. Before `tls_stream` capped what it keeps, each such connection held about 1 GiB; the gateway's RSS must
//! now stay within 50 MiB of its figure before the attack, and each attacker is closed. (The record handling itself is
//! unit-tested in `tls_stream::tests`, before and after the upgrade; this is the whole gateway, measured.)

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use rustls::{
    ConnectionTrafficSecrets, ContentType, ProtocolVersion,
    crypto::cipher::{OutboundChunks, OutboundPlainMessage},
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Records sent per attacker at most: 4,000 × 16 KiB = 64 MiB each, so a gateway without the cap would be far over
/// the 50 MiB bound with eight attackers, while the test stays bounded either way.
const MAX_RECORDS: usize = 4_000;

/// A TLS 1.3 client (AES-128-GCM only, so the attacker knows which cipher to seal its own records with) whose traffic
/// secrets can be extracted.
fn attacker_config(ca: &TestCa) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256];
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.enable_secret_extraction = true;
    Arc::new(config)
}

/// One attacker: a real handshake, then a KeyUpdate claiming 65,535 bytes, one byte per padded record, until the
/// gateway closes the connection or `MAX_RECORDS` were sent. Returns how many records the gateway took.
async fn attack(gw: &TestGateway, config: Arc<rustls::ClientConfig>) -> usize {
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("handshake");
    let (mut io, conn) = tls.into_inner();
    let secrets = conn.dangerous_extract_secrets().expect("secrets");
    let (mut seq, ConnectionTrafficSecrets::Aes128Gcm { key, iv }) = secrets.tx else {
        panic!("AES-128-GCM only");
    };
    let rustls::SupportedCipherSuite::Tls13(suite) = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
    else {
        panic!("a TLS 1.3 suite");
    };
    let mut sealer = suite.aead_alg.encrypter(key, iv);
    // The handshake message: type KeyUpdate (24), length 0xffff, then its body; each byte in a record of its own.
    let message = [0x18u8, 0x00, 0xff, 0xff].into_iter().chain(std::iter::repeat(0x42));
    let mut sent = 0;
    for byte in message.take(MAX_RECORDS) {
        // TLSInnerPlaintext: the content byte, its real type, zero padding up to 2^14 bytes.
        let mut inner = vec![0u8; 16 * 1024];
        inner[0] = byte;
        inner[1] = u8::from(ContentType::Handshake);
        let plain = OutboundPlainMessage {
            typ: ContentType::from(0u8),
            version: ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(&inner),
        };
        let record = sealer.encrypt(plain, seq).expect("seal").encode();
        seq += 1;
        if io.write_all(&record).await.is_err() {
            break;
        }
        sent += 1;
    }
    // Whatever was sent, the gateway must end the connection (the cap, or at worst its handshake deadline).
    let mut sink = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, io.read(&mut sink)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the attacker's connection was never closed"),
        }
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_fragmented_handshakes_from_one_address_stay_within_50_mib() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| {
        c.limits.max_connections_per_ip = 16;
        c.server.handshake_timeout = Duration::from_secs(10);
    })
    .await;
    let config = attacker_config(&gw.ca);
    // The idle figure: warm up the TLS and HTTP paths with an ordinary client first.
    let mut bystander = gw.client().await;
    bystander.join("lobby").await;
    let (idle, _) = rss();
    reset_peak_rss();
    let attackers: Vec<_> = (0..8).map(|_| attack(&gw, config.clone())).collect();
    let taken = futures_util::future::join_all(attackers).await;
    let (_, peak) = rss();
    let grew = peak.saturating_sub(idle);
    println!(
        "fragmented handshakes: RSS idle {} KiB, peak {} KiB (+{} KiB); records taken per attacker: {taken:?}",
        idle / 1024,
        peak / 1024,
        grew / 1024
    );
    assert!(grew <= 50 << 20, "the attack grew RSS by {} MiB", grew >> 20);
    assert!(
        taken.iter().all(|&n| n < MAX_RECORDS),
        "an attacker's records were all taken: {taken:?}"
    );
    // The gateway still serves.
    assert_eq!(
        bystander.request(serde_json::json!({"op":"ping"}), 1).await["op"],
        "pong"
    );
}
