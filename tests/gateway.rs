//! End-to-end tests of the core gateway (issue 2, section 6): a real nats-server per test, the gateway in-process
//! with TLS from a test CA, WebSocket clients that verify the certificate, and plain async-nats clients playing the
//! backend. Every test waits for events; `expect_silence` (short) is used only to prove an absence.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_tungstenite::tungstenite::Message;

const SILENCE: Duration = Duration::from_millis(300);

/// Next message that is not request/reply plumbing (`_INBOX.*`, e.g. the gateway's subscription round trips).
async fn next_non_inbox(sub: &mut async_nats::Subscriber) -> async_nats::Message {
    loop {
        let msg = next_msg(sub).await;
        if !msg.subject.starts_with("_INBOX.") {
            return msg;
        }
    }
}

fn header(msg: &async_nats::Message, name: &str) -> Option<String> {
    msg.headers.as_ref()?.get(name).map(|v| v.as_str().to_string())
}

/// GET on the nats-server monitoring port; the JSON body.
async fn monitor(port: u16, path: &str) -> Value {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.expect("monitoring port");
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut buf))
        .await
        .expect("monitoring answers")
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (_, body) = text.split_once("\r\n\r\n").expect("HTTP response");
    serde_json::from_str(body).expect("JSON body")
}

/// Room subjects the gateway's NATS connection (client name `roomwire`) is subscribed to, per the server: its
/// standing subscriptions (backend commands, the request inbox) are left out.
async fn gateway_subs(port: u16) -> Vec<String> {
    let connz = monitor(port, "/connz?subs=1").await;
    let conns = connz["connections"].as_array().expect("connections");
    let gw = conns
        .iter()
        .find(|c| c["name"] == "roomwire")
        .expect("gateway connection listed");
    let mut subs: Vec<String> = gw["subscriptions_list"]
        .as_array()
        .map(|l| l.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    subs.retain(|s| s != "roomwire.control.*" && !s.starts_with("_INBOX."));
    subs.sort();
    subs
}

/// Waits until the server reports exactly `want` as the gateway's subscriptions.
async fn wait_gateway_subs(port: u16, want: &[&str]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let subs = gateway_subs(port).await;
        if subs == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gateway subscriptions {subs:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- welcome and ops ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn welcome_names_connection_and_gateway() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    let url = format!("wss://localhost:{}/ws", gw.addr.port());
    let tls = gw.tls().await;
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    let first = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    let Message::Text(text) = first else {
        panic!("welcome is a text frame: {first:?}")
    };
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["op"], "welcome");
    assert_eq!(v["gateway"], "gwtest");
    let conn = v["conn"].as_str().expect("conn is a string");
    assert!(conn.starts_with("gwtest-"), "conn id {conn}");
    // Every connection gets its own id.
    let b = gw.client().await;
    assert_ne!(b.conn, conn);
}

#[tokio::test]
async fn join_leave_publish_are_acked_with_their_id() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    let mut a = gw.client().await;
    a.send_text(r#"{"op":"join","room":"lobby","id":1}"#).await;
    assert_eq!(recv_raw(&mut a).await, r#"{"op":"ack","id":1}"#);
    a.send_text(r#"{"op":"publish","room":"lobby","data":{"x":1},"id":2}"#)
        .await;
    assert_eq!(recv_raw(&mut a).await, r#"{"op":"ack","id":2}"#);
    a.send_text(r#"{"op":"leave","room":"lobby","id":3}"#).await;
    assert_eq!(recv_raw(&mut a).await, r#"{"op":"ack","id":3}"#);
    // Joining a room twice is harmless and acked.
    a.send_text(r#"{"op":"join","room":"lobby","id":4}"#).await;
    assert_eq!(recv_raw(&mut a).await, r#"{"op":"ack","id":4}"#);
    a.send_text(r#"{"op":"join","room":"lobby","id":5}"#).await;
    assert_eq!(recv_raw(&mut a).await, r#"{"op":"ack","id":5}"#);
}

#[tokio::test]
async fn ping_gets_pong() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    let mut a = gw.client().await;
    a.send_text(r#"{"op":"ping"}"#).await;
    assert_eq!(recv_raw(&mut a).await, r#"{"op":"pong"}"#);
    a.send_text(r#"{"op":"ping","id":"p1"}"#).await;
    let v: Value = serde_json::from_str(&recv_raw(&mut a).await).unwrap();
    assert_eq!(v, json!({"op":"pong","id":"p1"}));
}

#[tokio::test]
async fn id_is_echoed_exactly_as_given() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    let mut a = gw.client().await;
    for id in [
        r#""abc""#,
        r#""with \"quotes\" and \\ ü""#,
        "0",
        "-7",
        "18446744073709551615",
        "1.5",
    ] {
        a.send_text(&format!(r#"{{"op":"join","room":"lobby","id":{id}}}"#))
            .await;
        assert_eq!(
            recv_raw(&mut a).await,
            format!(r#"{{"op":"ack","id":{id}}}"#),
            "id {id}"
        );
    }
    // Errors echo the id too.
    a.send_text(r#"{"op":"publish","room":"elsewhere","data":1,"id":"e-1"}"#)
        .await;
    let e: Value = serde_json::from_str(&recv_raw(&mut a).await).unwrap();
    assert_eq!(
        (e["op"].as_str(), e["id"].as_str(), e["code"].as_str()),
        (Some("error"), Some("e-1"), Some("not_joined"))
    );
}

#[tokio::test]
async fn no_ack_without_id_but_errors_still_sent() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    let mut a = gw.client().await;
    // Frames are answered in order, so if any of these produced an ack it would arrive before the pong.
    a.send(json!({"op":"join","room":"lobby"})).await;
    a.send(json!({"op":"publish","room":"lobby","data":"x"})).await;
    a.send(json!({"op":"leave","room":"lobby"})).await;
    assert_alive(&mut a).await;
    assert_eq!(gw.gw.rooms().len(), 0, "the id-less join and leave were carried out");
    // An error is sent even without an id, and carries no id.
    a.send(json!({"op":"publish","room":"lobby","data":"x"})).await;
    let e = a.recv_op("error").await;
    assert_eq!(e["code"], "not_joined");
    assert!(e.get("id").is_none(), "{e}");
}

// ---- delivery between clients ------------------------------------------------------------------------------------

#[tokio::test]
async fn two_clients_in_one_room_hear_each_other_and_no_one_else() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    let (mut a, mut b, mut c) = (gw.client().await, gw.client().await, gw.client().await);
    a.join("lobby").await;
    b.join("lobby").await;
    c.join("other").await;
    a.publish("lobby", json!({"from":"a"})).await;
    let m = b.recv_op("message").await;
    assert_eq!(
        m,
        json!({"op":"message","room":"lobby","data":{"from":"a"},"from":a.conn})
    );
    b.publish("lobby", json!([1, "two", null])).await;
    let m = a.recv_op("message").await;
    assert_eq!(
        m,
        json!({"op":"message","room":"lobby","data":[1,"two",null],"from":b.conn})
    );
    c.expect_silence(SILENCE).await;
}

#[tokio::test]
async fn sender_gets_no_echo_unless_it_asks() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    let (mut a, mut b) = (gw.client().await, gw.client().await);
    a.join("lobby").await;
    b.join("lobby").await;
    a.publish("lobby", json!(1)).await;
    assert_eq!(b.recv_op("message").await["data"], 1);
    let r = a
        .request(json!({"op":"publish","room":"lobby","data":2,"echo":true}), 7)
        .await;
    assert_eq!(r["op"], "ack");
    assert_eq!(b.recv_op("message").await["data"], 2);
    // Both went through the same room subscription in order: had message 1 been echoed, it would come first.
    let m = a.recv_op("message").await;
    assert_eq!(m, json!({"op":"message","room":"lobby","data":2,"from":a.conn}));
    a.expect_silence(SILENCE).await;
}

#[tokio::test]
async fn leave_stops_delivery() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    let (mut a, mut b, mut c) = (gw.client().await, gw.client().await, gw.client().await);
    a.join("lobby").await;
    b.join("lobby").await;
    c.join("lobby").await;
    let r = b.request(json!({"op":"leave","room":"lobby"}), 1).await;
    assert_eq!(r["op"], "ack");
    a.publish("lobby", json!("after-leave")).await;
    assert_eq!(c.recv_op("message").await["data"], "after-leave");
    // Message 1 has been fanned out (c got it). Had b still been a member it would be queued ahead of this ack.
    b.send(json!({"op":"join","room":"lobby","id":2})).await;
    assert_eq!(b.recv().await, json!({"op":"ack","id":2}));
    a.publish("lobby", json!("after-rejoin")).await;
    assert_eq!(b.recv_op("message").await["data"], "after-rejoin");
    assert_eq!(c.recv_op("message").await["data"], "after-rejoin");
    // Leaving again: nothing arrives, and publishing now is refused.
    b.request(json!({"op":"leave","room":"lobby"}), 3).await;
    a.publish("lobby", json!("gone")).await;
    assert_eq!(c.recv_op("message").await["data"], "gone");
    b.expect_silence(SILENCE).await;
    expect_error(&mut b, json!({"op":"publish","room":"lobby","data":1}), 4, "not_joined").await;
}

#[tokio::test]
async fn clients_on_two_gateways_share_rooms_through_nats() {
    let nats = NatsServer::start().await;
    let gw1 = TestGateway::start(&nats, |_| {}).await;
    let gw2 = TestGateway::start(&nats, |c| c.server.gateway_id = Some("gwother".into())).await;
    let mut a = gw1.client().await;
    let mut b = gw2.client().await;
    a.join("lobby").await;
    b.join("lobby").await;
    a.publish("lobby", json!({"n":1})).await;
    let m = b.recv_op("message").await;
    assert_eq!(m["data"], json!({"n":1}));
    assert_eq!(m["from"], json!(a.conn));
    b.publish("lobby", json!({"n":2})).await;
    assert_eq!(a.recv_op("message").await["data"], json!({"n":2}));
}

// ---- backend ⇄ clients through plain NATS -----------------------------------------------------------------------

#[tokio::test]
async fn backend_publish_reaches_every_member() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    let (mut a, mut b) = (gw.client().await, gw.client().await);
    a.join("lobby").await;
    b.join("lobby").await;
    let nc = nats.client().await;
    nc.publish("rooms.lobby", r#"{"k":[1,{"z":"y"}]}"#.into())
        .await
        .unwrap();
    nc.flush().await.unwrap();
    for c in [&mut a, &mut b] {
        let m = c.recv_op("message").await;
        assert_eq!(m, json!({"op":"message","room":"lobby","data":{"k":[1,{"z":"y"}]}}));
        assert!(m.get("from").is_none(), "no `from` for backend messages: {m}");
    }
    // A subject of another room reaches nobody here.
    nc.publish("rooms.other", "1".into()).await.unwrap();
    nc.flush().await.unwrap();
    a.expect_silence(SILENCE).await;
}

#[tokio::test]
async fn client_publish_reaches_backend_as_compact_json_with_headers() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    let nc = nats.client().await;
    let mut sub = nats_sub(&nc, "rooms.lobby").await;
    let mut a = gw.client().await;
    a.join("lobby").await;
    let data = "{ \"a\" : [ 1 , 2 ] ,\n\t\"s\" : \"x  y\\n\" , \"u\":\"\\u00e9\" }";
    a.send_text(&format!(r#"{{"op":"publish","room":"lobby","id":1,"data":{data}}}"#))
        .await;
    assert_eq!(a.recv_op("ack").await["id"], 1);
    let msg = next_msg(&mut sub).await;
    assert_eq!(msg.subject.as_str(), "rooms.lobby");
    assert_eq!(
        std::str::from_utf8(&msg.payload).unwrap(),
        r#"{"a":[1,2],"s":"x  y\n","u":"\u00e9"}"#
    );
    assert_eq!(header(&msg, "Roomwire-Gateway").as_deref(), Some("gwtest"));
    assert_eq!(header(&msg, "Roomwire-Conn").as_deref(), Some(a.conn.as_str()));
    // Scalars are sent as their JSON text.
    for (data, payload) in [
        (json!("hi"), r#""hi""#),
        (json!(42), "42"),
        (json!(true), "true"),
        (json!(null), "null"),
    ] {
        a.publish("lobby", data.clone()).await;
        let msg = next_msg(&mut sub).await;
        assert_eq!(std::str::from_utf8(&msg.payload).unwrap(), payload, "data {data}");
    }
}

#[tokio::test]
async fn backend_payloads_that_are_not_json() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    let mut a = gw.client().await;
    a.join("lobby").await;
    let nc = nats.client().await;
    let cases: Vec<(Bytes, Value)> = vec![
        (Bytes::from_static(b"hello world"), json!({"data":"hello world"})),
        (Bytes::from_static(b"{\"half\":"), json!({"data":"{\"half\":"})),
        (
            Bytes::from("h\u{e9}llo \u{1F600}"),
            json!({"data":"h\u{e9}llo \u{1F600}"}),
        ),
        (Bytes::from_static(b""), json!({"data":""})),
        (Bytes::from_static(b"  {\"ws\":1}\n"), json!({"data":{"ws":1}})),
        (Bytes::from_static(&[0xff, 0x00, 0x01]), json!({"data_b64":"/wAB"})),
        (Bytes::from_static(&[0xc3, 0x28]), json!({"data_b64":"wyg="})),
    ];
    for (payload, want) in &cases {
        nc.publish("rooms.lobby", payload.clone()).await.unwrap();
        nc.flush().await.unwrap();
        let m = a.recv_op("message").await;
        let mut expected = json!({"op":"message","room":"lobby"});
        for (k, v) in want.as_object().unwrap() {
            expected[k] = v.clone();
        }
        assert_eq!(m, expected, "payload {payload:?}");
    }
}

// ---- room names --------------------------------------------------------------------------------------------------

#[tokio::test]
async fn hostile_room_names_are_refused_without_nats_traffic() {
    let nats = NatsServer::start_with(&["-m", "-1"]).await;
    let mport = nats.monitor_port.expect("monitoring port");
    let gw = TestGateway::start(&nats, |c| c.nats.events = false).await;
    let nc = nats.client().await;
    let mut all = nats_sub(&nc, ">").await;
    let mut a = gw.client().await;
    let rooms = hostile_rooms();
    assert!(rooms.len() > 20);
    let mut id = 0;
    for room in &rooms {
        for op in [
            json!({"op":"join","room":room}),
            json!({"op":"publish","room":room,"data":{"x":1}}),
            json!({"op":"publish","room":room,"data":{"x":1},"echo":true}),
            json!({"op":"leave","room":room}),
        ] {
            id += 1;
            let e = expect_error(&mut a, op, id, "invalid_room").await;
            assert_eq!(e["id"], id);
        }
    }
    assert_eq!(gw.gw.rooms().len(), 0, "no room was created");
    assert_eq!(
        gateway_subs(mport).await,
        Vec::<String>::new(),
        "no subscription reached NATS"
    );
    // A sentinel through a valid room must be the very first thing the `>` subscriber sees.
    a.join("sentinel").await;
    a.publish("sentinel", json!("sentinel")).await;
    let first = next_non_inbox(&mut all).await;
    assert_eq!(first.subject.as_str(), "rooms.sentinel");
    assert_eq!(&first.payload[..], b"\"sentinel\"");
    assert_eq!(gateway_subs(mport).await, vec!["rooms.sentinel".to_string()]);
    assert_alive(&mut a).await;
}

#[tokio::test]
async fn every_safe_character_works_and_maps_one_to_one() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    let nc = nats.client().await;
    let mut a = gw.client().await;
    let long = "r".repeat(128);
    for room in ["Az09_-", "a:b@c=d+e", "A", "a", long.as_str()] {
        let mut sub = nats_sub(&nc, &format!("rooms.{room}")).await;
        a.join(room).await;
        a.publish(room, json!(room)).await;
        let msg = next_msg(&mut sub).await;
        assert_eq!(msg.subject.as_str(), format!("rooms.{room}"));
        nc.publish(format!("rooms.{room}"), "\"back\"".into()).await.unwrap();
        nc.flush().await.unwrap();
        let m = a.recv_op("message").await;
        assert_eq!((m["room"].as_str(), m["data"].as_str()), (Some(room), Some("back")));
    }
    // Names differing only in case are different rooms.
    let mut b = gw.client().await;
    b.join("A").await;
    a.publish("a", json!("lower")).await;
    b.expect_silence(SILENCE).await;
}

// ---- HTTP surface ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn http_routes() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    assert_eq!(gw.get("/healthz").await.unwrap().0, 200);
    assert_eq!(gw.get("/readyz").await.unwrap().0, 200);
    for path in ["/", "/nope", "/ws/extra", "/healthz/x", "/WS"] {
        assert_eq!(gw.get(path).await.unwrap().0, 404, "{path}");
    }
    // docs/protocol.md: a plain request to the WebSocket path is 426 with `Upgrade: websocket`.
    let (status, head, body) = gw
        .raw_head("GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(status, 426, "non-upgrade GET /ws: {head}");
    let upgrade = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case("upgrade").then(|| v.trim().to_string())
    });
    assert_eq!(upgrade.as_deref(), Some("websocket"), "{head}");
    assert_eq!(body.trim(), "this endpoint only accepts WebSocket upgrades");
}

#[tokio::test]
async fn readyz_follows_nats() {
    let mut nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    assert_eq!(gw.get("/readyz").await.unwrap().0, 200);
    nats.stop();
    gw.wait_ready(false).await;
    assert_eq!(
        gw.get("/healthz").await.unwrap().0,
        200,
        "healthz stays 200 while NATS is away"
    );
    nats.restart().await;
    gw.wait_ready(true).await;
}

// ---- NATS unavailable --------------------------------------------------------------------------------------------

#[tokio::test]
async fn nats_down_gives_unavailable_and_recovers() {
    let mut nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    let mut a = gw.client().await;
    a.join("lobby").await;
    nats.stop();
    gw.wait_ready(false).await;
    expect_error(
        &mut a,
        json!({"op":"publish","room":"lobby","data":1}),
        1,
        "unavailable",
    )
    .await;
    expect_error(&mut a, json!({"op":"join","room":"newroom"}), 2, "unavailable").await;
    assert_eq!(gw.gw.rooms().len(), 1, "the failed join left no room behind");
    assert_alive(&mut a).await;
    nats.restart().await;
    gw.wait_ready(true).await;
    // The room's subscription came back with the connection: an echoed publish goes through it.
    let r = a
        .request(json!({"op":"publish","room":"lobby","data":"back","echo":true}), 3)
        .await;
    assert_eq!(r["op"], "ack", "{r}");
    assert_eq!(a.recv_op("message").await["data"], "back");
    a.join("newroom").await;
}

#[tokio::test]
async fn join_not_confirmed_in_time_is_unavailable() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| c.nats.publish_timeout = Duration::from_millis(500)).await;
    let mut a = gw.client().await;
    a.join("lobby").await;
    // A frozen server keeps its TCP connection open but answers nothing: the subscription is never confirmed.
    nats.pause_and_wait().await;
    expect_error(&mut a, json!({"op":"join","room":"frozen"}), 1, "unavailable").await;
    assert_eq!(gw.gw.rooms().len(), 1, "the failed join left no room behind");
    assert_alive(&mut a).await;
    nats.resume();
    a.join("frozen").await;
    let nc = nats.client().await;
    nc.publish("rooms.frozen", "\"thawed\"".into()).await.unwrap();
    nc.flush().await.unwrap();
    assert_eq!(a.recv_op("message").await["data"], "thawed");
}

#[tokio::test]
async fn publish_over_nats_max_payload_is_too_large() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, "max_payload: 1024\n").unwrap();
    let nats = NatsServer::start_with(&["-c", conf.to_str().unwrap()]).await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    let mut a = gw.client().await;
    a.join("lobby").await;
    let data = "x".repeat(2000);
    expect_error(
        &mut a,
        json!({"op":"publish","room":"lobby","data":data}),
        1,
        "too_large",
    )
    .await;
    a.publish("lobby", json!("small")).await;
}

// ---- subscriptions and lifecycle ---------------------------------------------------------------------------------

#[tokio::test]
async fn one_nats_subscription_per_room_per_gateway() {
    let nats = NatsServer::start_with(&["-m", "-1"]).await;
    let mport = nats.monitor_port.expect("monitoring port");
    let gw = TestGateway::start(&nats, |_| {}).await;
    let (mut a, mut b) = (gw.client().await, gw.client().await);
    wait_gateway_subs(mport, &[]).await;
    a.join("lobby").await;
    b.join("lobby").await;
    a.join("other").await;
    assert_eq!(gw.gw.rooms().len(), 2);
    wait_gateway_subs(mport, &["rooms.lobby", "rooms.other"]).await;
    a.request(json!({"op":"leave","room":"lobby"}), 1).await;
    assert_eq!(gw.gw.rooms().len(), 2, "b still holds lobby");
    wait_gateway_subs(mport, &["rooms.lobby", "rooms.other"]).await;
    b.request(json!({"op":"leave","room":"lobby"}), 2).await;
    assert_eq!(gw.gw.rooms().len(), 1, "last leave drops the room");
    wait_gateway_subs(mport, &["rooms.other"]).await;
    // Disconnecting counts as leaving.
    a.ws.close(None).await.unwrap();
    wait_gateway_subs(mport, &[]).await;
    assert_eq!(gw.gw.rooms().len(), 0);
}

#[tokio::test]
async fn lifecycle_events_are_published() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    let nc = nats.client().await;
    let mut events = nats_sub(&nc, "roomwire.events.>").await;
    let mut a = gw.client().await;
    let check = |msg: async_nats::Message, kind: &str, room: Option<&str>, conn: &str| {
        assert_eq!(msg.subject.as_str(), format!("roomwire.events.{kind}"));
        let v: Value = serde_json::from_slice(&msg.payload).expect("event is JSON");
        assert_eq!(v["event"], kind, "{v}");
        assert_eq!(v["conn"], conn, "{v}");
        assert_eq!(v["gateway"], "gwtest", "{v}");
        match room {
            Some(r) => assert_eq!(v["room"], r, "{v}"),
            None => assert!(v["room"].is_null(), "{v}"),
        }
        assert!(v["time_ms"].as_u64().is_some_and(|t| t > 1_600_000_000_000), "{v}");
    };
    check(next_msg(&mut events).await, "connect", None, &a.conn);
    a.join("lobby").await;
    check(next_msg(&mut events).await, "join", Some("lobby"), &a.conn);
    a.request(json!({"op":"leave","room":"lobby"}), 1).await;
    check(next_msg(&mut events).await, "leave", Some("lobby"), &a.conn);
    // A connection that goes away while in a room leaves it, then disconnects.
    a.join("kept").await;
    check(next_msg(&mut events).await, "join", Some("kept"), &a.conn);
    let conn = a.conn.clone();
    a.ws.close(None).await.unwrap();
    check(next_msg(&mut events).await, "leave", Some("kept"), &conn);
    check(next_msg(&mut events).await, "disconnect", None, &conn);
    // Refused ops produce no events.
    let mut b = gw.client().await;
    check(next_msg(&mut events).await, "connect", None, &b.conn);
    expect_error(&mut b, json!({"op":"join","room":"a.b"}), 2, "invalid_room").await;
    b.join("ok").await;
    check(next_msg(&mut events).await, "join", Some("ok"), &b.conn);
}

#[tokio::test]
async fn events_can_be_disabled() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |c| c.nats.events = false).await;
    let nc = nats.client().await;
    let mut all = nats_sub(&nc, ">").await;
    let mut a = gw.client().await;
    a.join("lobby").await;
    a.publish("lobby", json!(1)).await;
    assert_eq!(
        next_non_inbox(&mut all).await.subject.as_str(),
        "rooms.lobby",
        "no event came first"
    );
}

// ---- shutdown ----------------------------------------------------------------------------------------------------

#[tokio::test]
async fn shutdown_flushes_queued_frames_then_closes_with_1001() {
    let nats = NatsServer::start().await;
    let mut gw = TestGateway::start(&nats, |c| {
        c.limits.max_pending_messages = 10_000;
        c.limits.max_pending_bytes = 16 * 1024 * 1024;
        c.limits.max_write_buffer_size = 17 * 1024 * 1024;
    })
    .await;
    let (mut a, mut c) = (gw.client().await, gw.client().await);
    // a joins first, so fan-out queues each message for a before c: once c has the last one, a has all of them.
    a.join("lobby").await;
    c.join("lobby").await;
    let nc = nats.client().await;
    const N: usize = 300;
    let filler = "f".repeat(512);
    for i in 0..N {
        nc.publish("rooms.lobby", json!({"i":i,"f":filler}).to_string().into())
            .await
            .unwrap();
    }
    nc.flush().await.unwrap();
    for i in 0..N {
        assert_eq!(c.recv_op("message").await["data"]["i"], i);
    }
    // a has read nothing yet: its frames are queued (in the outbox or the socket) when shutdown starts.
    let read_a = async {
        for i in 0..N {
            assert_eq!(
                a.recv_op("message").await["data"]["i"],
                i,
                "queued frames are flushed first"
            );
        }
        a.expect_close().await
    };
    let (_, (code, _), (code_c, _)) = tokio::join!(gw.shutdown(), read_a, c.expect_close());
    assert_eq!(code, 1001);
    assert_eq!(code_c, 1001);
}

#[tokio::test]
async fn shutdown_delivers_pending_acks() {
    let nats = NatsServer::start().await;
    let mut gw = TestGateway::start(&nats, |_| {}).await;
    let mut a = gw.client().await;
    a.join("lobby").await;
    let nc = nats.client().await;
    let mut sub = nats_sub(&nc, "rooms.lobby").await;
    a.send(json!({"op":"publish","room":"lobby","data":"last","id":9}))
        .await;
    // Once NATS has the message the gateway has read the frame; shut down right away.
    assert_eq!(&next_msg(&mut sub).await.payload[..], b"\"last\"");
    let read_a = async {
        let r = a.recv().await;
        (r, a.expect_close().await)
    };
    let (_, (r, (code, _))) = tokio::join!(gw.shutdown(), read_a);
    assert_eq!(r, json!({"op":"ack","id":9}));
    assert_eq!(code, 1001);
}

// ---- CLI ---------------------------------------------------------------------------------------------------------

async fn check_config(config: &std::path::Path, cwd: &std::path::Path) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_roomwire"))
        .args(["check-config", "--config"])
        .arg(config)
        .current_dir(cwd)
        .output()
        .await
        .expect("run roomwire check-config")
}

#[tokio::test]
async fn check_config_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[server]\nlisten_port = 8443\n", "listen_port"),
        (
            "[nats]\nurl = \"nats://127.0.0.1:4222\"\nsubjct_prefix = \"x\"\n",
            "subjct_prefix",
        ),
        ("[bogus]\nx = 1\n", "bogus"),
        ("[limits]\nmax_message_size = 10\n", "limits.max_message_size"),
        ("[server]\nlisten = \"not an address\"\n", "listen"),
    ];
    for (i, (toml, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, toml).unwrap();
        let out = check_config(&path, dir.path()).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{toml:?} accepted");
        assert!(
            stderr.contains(key),
            "{toml:?}: message does not name `{key}`: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let out = check_config(&dir.path().join("missing.toml"), dir.path()).await;
    assert!(!out.status.success());
}

#[tokio::test]
async fn check_config_accepts_shipped_config() {
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.toml");
    assert!(
        shipped.exists(),
        "config/gateway.toml is shipped: {}",
        shipped.display()
    );
    // The shipped file names certs/dev-*.pem relative to the working directory: provide them there.
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("certs")).unwrap();
    std::fs::copy(&ca.cert_file, dir.path().join("certs/dev-cert.pem")).unwrap();
    std::fs::copy(&ca.key_file, dir.path().join("certs/dev-key.pem")).unwrap();
    let out = check_config(&shipped, dir.path()).await;
    assert!(
        out.status.success(),
        "shipped config rejected: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without the certificate files the same config is a clear error, not a panic.
    let empty = tempfile::tempdir().unwrap();
    let out = check_config(&shipped, empty.path()).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("dev-cert.pem") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

// ---- the harness itself ------------------------------------------------------------------------------------------

/// A nats-server that cannot start is reported at once, with its own error, instead of a ten-second "did not start".
#[tokio::test]
#[should_panic(expected = "nats-server exited at start")]
async fn harness_notices_a_nats_server_that_fails_to_start() {
    NatsServer::start_with(&["--no_such_flag"]).await;
}

/// A restarted nats-server comes back on the port it chose the first time, so the gateway reconnects to it.
#[tokio::test]
async fn harness_restarts_nats_on_the_same_port() {
    let mut nats = NatsServer::start_with(&["-m", "-1"]).await;
    let (port, mport) = (nats.port, nats.monitor_port);
    assert!(port != 0 && mport.is_some_and(|m| m != 0 && m != port));
    nats.restart().await;
    assert_eq!((nats.port, nats.monitor_port), (port, mport));
}
