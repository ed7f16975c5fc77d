//! Metrics across a scripted session (issue 14): scrape, act, scrape, and every metric the session touched moved.

mod common;

use common::{NatsServer, TestGateway, nats_barrier};
use serde_json::json;

/// The value of the first sample line starting with `name` (e.g. `roomwire_rooms ` or
/// `roomwire_delivery_seconds_count`). A missing metric fails the test: a renamed metric must not read as 0.
fn value(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name:?} in:\n{text}"))
}

#[tokio::test]
async fn a_scripted_session_moves_the_metrics() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    let (status, before) = gw.get("/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(value(&before, "roomwire_nats_connected "), 1.0, "{before}");
    assert_eq!(value(&before, "roomwire_connections_open "), 0.0);

    let mut c = gw.client().await;
    c.join("metered").await;
    c.publish("metered", json!({"hello": "world"})).await;
    let nc = nats.client().await;
    nc.publish("rooms.metered", "\"from a backend\"".into()).await.unwrap();
    nats_barrier(&nc).await;
    let m = c.recv_op("message").await;
    assert_eq!(m["data"], "from a backend");
    let r = c.request(json!({"op":"publish","room":"not-joined","data":1}), 9).await;
    assert_eq!(r["code"], "not_joined");

    let (_, after) = gw.get("/metrics").await.unwrap();
    assert_eq!(value(&after, "roomwire_connections_open "), 1.0, "{after}");
    assert_eq!(value(&after, "roomwire_rooms "), 1.0);
    assert!(value(&after, "roomwire_bytes_in_total") > value(&before, "roomwire_bytes_in_total"));
    assert!(value(&after, "roomwire_bytes_out_total") > value(&before, "roomwire_bytes_out_total"));
    assert!(value(&after, "roomwire_frames_in_total") >= 3.0);
    assert!(value(&after, "roomwire_publishes_total") >= 1.0);
    assert!(value(&after, "roomwire_deliveries_total") >= 1.0);
    assert!(value(&after, "roomwire_delivery_seconds_count") >= 1.0, "{after}");
    assert!(
        after.contains(r#"roomwire_errors_total{reason="not_joined"} 1"#),
        "{after}"
    );

    drop(c);
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let (_, text) = gw.get("/metrics").await.unwrap();
        if value(&text, "roomwire_connections_open ") == 0.0 && value(&text, "roomwire_rooms ") == 0.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "connection and room not released: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Issue 22, finding 7: a client whose TCP connection ends without a close frame (closed, or reset) is an ordinary
/// disconnect: counted as `client_gone`, never as `protocol_error` (which used to count every such disconnect, so the
/// counter an operator alerts on grew with normal traffic).
#[tokio::test]
async fn a_client_that_drops_tcp_is_client_gone_not_a_protocol_error() {
    use roomwire::metrics::Closed;
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    let closed = gw.client().await;
    let reset = gw.client().await;
    // Reset: SO_LINGER 0 makes the close an RST (a zero linger never blocks, which is what the deprecation is about).
    #[allow(deprecated)]
    reset
        .ws
        .get_ref()
        .get_ref()
        .0
        .set_linger(Some(std::time::Duration::ZERO))
        .unwrap();
    drop(closed);
    drop(reset);
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while gw.gw.metrics().connections_open.get() != 0 {
        assert!(tokio::time::Instant::now() < deadline, "connections not ended");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let closes = &gw.gw.metrics().closes;
    assert_eq!(
        closes.get(Closed::ProtocolError),
        0,
        "a disconnect counted as a protocol error"
    );
    assert_eq!(closes.get(Closed::ClientGone), 2);
    let (_, text) = gw.get("/metrics").await.unwrap();
    assert_eq!(
        value(&text, r#"roomwire_closes_total{reason="client_gone"}"#),
        2.0,
        "{text}"
    );
}
