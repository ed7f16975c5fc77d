//! Certificate rotation (issue 14): new certificate files on disk are picked up without a signal; a new client gets
//! the new certificate while an old client's session goes on; a broken certificate is refused and the old one kept.

mod common;

use std::time::Duration;

use common::{NatsServer, TestCa, TestGateway, WAIT};
use serde_json::json;

/// The DER of the certificate a new TLS handshake gets.
async fn served_cert(gw: &TestGateway) -> Vec<u8> {
    let tls = gw.tls().await;
    tls.get_ref().1.peer_certificates().expect("server certificate")[0].to_vec()
}

#[tokio::test]
async fn rotated_files_are_served_to_new_clients_and_old_sessions_stay() {
    let nats = NatsServer::start().await;
    let ca = std::sync::Arc::new(TestCa::new());
    let gw = TestGateway::start_with_ca(&nats.url(), ca.clone(), |c| {
        c.tls.watch_interval = Duration::from_millis(50);
    })
    .await;
    let before = served_cert(&gw).await;
    let mut old = gw.client().await;
    old.join("rotation").await;

    // Make sure the new files get another modification time than the old ones, whatever the filesystem's resolution.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let new_cert = ca.reissue();
    assert_ne!(new_cert, before);
    let deadline = tokio::time::Instant::now() + WAIT;
    while served_cert(&gw).await != new_cert {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // The session opened under the old certificate goes on.
    let r = old.request(json!({"op":"ping"}), 1).await;
    assert_eq!(r["op"], "pong");
    old.publish("rotation", json!("still here")).await;

    // A broken certificate: refused, logged, and the last good one stays.
    std::fs::write(
        &ca.cert_file,
        "-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    // Several check intervals pass; new handshakes keep getting the last good certificate.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            served_cert(&gw).await,
            new_cert,
            "the broken certificate replaced the good one"
        );
    }
    let r = old.request(json!({"op":"ping"}), 2).await;
    assert_eq!(r["op"], "pong");
}
