mod common;
use common::*;
use serde_json::json;

#[tokio::test]
async fn smoke() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    a.join("lobby").await;
    b.join("lobby").await;
    a.publish("lobby", json!({"hi":1})).await;
    let m = b.recv_op("message").await;
    assert_eq!(m["data"], json!({"hi":1}));
    assert_eq!(m["from"], json!(a.conn));
    let nc = nats.client().await;
    nc.publish("rooms.lobby", "{\"x\":2}".into()).await.unwrap();
    nc.flush().await.unwrap();
    assert_eq!(a.recv_op("message").await["data"], json!({"x":2}));
    assert_eq!(b.recv_op("message").await["data"], json!({"x":2}));
}
