//! Browser RPC to NATS services (issue 25) on a real nats-server, with responders written here on a plain NATS
//! client: answers, ADR-32 service errors, no responders, timeouts, permissions, hostile method names (nothing sent to
//! NATS), the per-connection in-flight cap and the identity headers the gateway stamps.

mod common;

use std::time::Duration;

use common::{
    NatsServer, TestGateway, WsClient, expect_error,
    jwt::{Keys, bearer, token},
    nats_sub,
};
use futures_util::StreamExt;
use roomwire::{config::Config, room_pattern::RoomPattern};
use serde_json::{Value, json};

/// Answers `rpc.echo` with what it saw (payload and headers), `rpc.fail` with an ADR-32 error, `rpc.late` after
/// 400 ms and never answers `rpc.slow`.
async fn responder(nats: &NatsServer) -> async_nats::Client {
    let nc = async_nats::connect(nats.url()).await.expect("responder connects");
    let mut sub = nc.subscribe("rpc.*").await.expect("subscribe");
    nc.flush().await.expect("flush");
    let answer = nc.clone();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let Some(reply) = msg.reply.clone() else { continue };
            let header = |name: &str| {
                msg.headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_owned())
            };
            match msg.subject.as_str() {
                "rpc.echo" => {
                    let all: Vec<String> = msg
                        .headers
                        .as_ref()
                        .map(|h| h.iter().map(|(k, _)| k.to_string()).collect())
                        .unwrap_or_default();
                    let body = json!({
                        "payload": String::from_utf8_lossy(&msg.payload),
                        "gateway": header("Roomwire-Gateway"),
                        "conn": header("Roomwire-Conn"),
                        "user": header("Roomwire-User"),
                        "deadline": header("Roomwire-Deadline"),
                        "headers": all,
                    });
                    answer.publish(reply, body.to_string().into()).await.unwrap();
                }
                "rpc.fail" => {
                    let mut h = async_nats::HeaderMap::new();
                    h.insert("Nats-Service-Error-Code", "409");
                    h.insert("Nats-Service-Error", "x".repeat(400).as_str());
                    answer.publish_with_headers(reply, h, "".into()).await.unwrap();
                }
                "rpc.big" => {
                    let body = format!("\"{}\"", "b".repeat(100_000));
                    answer.publish(reply, body.into()).await.unwrap();
                }
                "rpc.late" => {
                    let answer = answer.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(400)).await;
                        let _ = answer.publish(reply, "\"late\"".into()).await;
                        let _ = answer.flush().await;
                    });
                }
                _ => {}
            }
        }
    });
    nc
}

/// RPC on; tokens required.
fn rpc(keys: &Keys) -> impl FnOnce(&mut Config) + '_ {
    move |c| {
        keys.apply(c);
        c.rpc.enabled = true;
    }
}

async fn alice(gw: &TestGateway, methods: Value) -> WsClient {
    let t = token("alice", json!({ "rooms": ["*"], "rpc": methods }));
    gw.client_with(WS, &[("authorization", &bearer(&t))])
        .await
        .expect("alice connects")
}

const WS: &str = "/ws";

#[tokio::test]
async fn a_call_is_answered_with_the_services_data_and_stamped_headers() {
    let nats = NatsServer::start().await;
    let _service = responder(&nats).await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, rpc(&keys)).await;
    let mut c = alice(&gw, json!(["*"])).await;
    // Whatever the client adds, only `data` travels, and the gateway's headers are its own.
    let r = c
        .request(
            json!({"op":"rpc","method":"echo","data":{ "a" : [1, 2] },
                   "headers":{"Roomwire-User":"mallory"},"user":"mallory","Roomwire-Conn":"x"}),
            7,
        )
        .await;
    assert_eq!(r["op"], "rpc_result", "{r}");
    let d = &r["data"];
    assert_eq!(d["payload"], r#"{"a":[1,2]}"#, "compact JSON of data: {r}");
    assert_eq!(d["user"], "alice");
    assert_eq!(d["conn"], json!(c.conn));
    assert!(d["gateway"].as_str().is_some_and(|g| !g.is_empty()), "{r}");
    let deadline: u64 = d["deadline"]
        .as_str()
        .expect("deadline header")
        .parse()
        .expect("unix ms");
    let now = common::jwt::now() * 1000;
    assert!(deadline > now && deadline < now + 10_000, "{deadline} vs {now}");
    let mut headers: Vec<String> = serde_json::from_value(d["headers"].clone()).unwrap();
    headers.sort();
    assert_eq!(
        headers,
        [
            "Roomwire-Conn",
            "Roomwire-Deadline",
            "Roomwire-Gateway",
            "Roomwire-User"
        ],
        "only the gateway's headers"
    );
    // No data: `null`.
    let r = c.request(json!({"op":"rpc","method":"echo"}), 8).await;
    assert_eq!(r["data"]["payload"], "null", "{r}");
}

#[tokio::test]
async fn a_service_error_is_an_rpc_result_with_code_and_capped_message() {
    let nats = NatsServer::start().await;
    let _service = responder(&nats).await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, rpc(&keys)).await;
    let mut c = alice(&gw, json!(["*"])).await;
    let r = c.request(json!({"op":"rpc","method":"fail","data":1}), 1).await;
    assert_eq!(r["op"], "rpc_result", "{r}");
    assert!(r.get("data").is_none(), "{r}");
    assert_eq!(r["error"]["code"], "409");
    let m = r["error"]["message"].as_str().expect("message");
    assert!(m.len() <= 256 && m.starts_with("xxx"), "{m}");
}

#[tokio::test]
async fn no_responders_and_timeout_are_gateway_errors() {
    let nats = NatsServer::start().await;
    let _service = responder(&nats).await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| {
        rpc(&keys)(c);
        c.rpc.timeout = Duration::from_millis(300);
        c.rpc.max_timeout = Duration::from_millis(300);
    })
    .await;
    let mut c = alice(&gw, json!(["*"])).await;
    expect_error(&mut c, json!({"op":"rpc","method":"nobody.home"}), 1, "no_responders").await;
    // Capped by `max_timeout`: the client's 60 s become 300 ms.
    let started = std::time::Instant::now();
    expect_error(
        &mut c,
        json!({"op":"rpc","method":"slow","timeout_ms":60_000}),
        2,
        "timeout",
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    expect_error(
        &mut c,
        json!({"op":"rpc","method":"slow","timeout_ms":50}),
        3,
        "timeout",
    )
    .await;
    common::assert_alive(&mut c).await;
}

#[tokio::test]
async fn methods_outside_the_claim_and_anonymous_calls_are_forbidden() {
    let nats = NatsServer::start().await;
    let _service = responder(&nats).await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, rpc(&keys)).await;
    let mut c = alice(&gw, json!(["orders.*"])).await;
    expect_error(&mut c, json!({"op":"rpc","method":"echo"}), 1, "forbidden").await;
    // No claim: nothing.
    let t = token("bob", json!({ "rooms": ["*"] }));
    let mut b = gw.client_with(WS, &[("authorization", &bearer(&t))]).await.unwrap();
    expect_error(&mut b, json!({"op":"rpc","method":"echo"}), 1, "forbidden").await;

    let anon = TestGateway::start(&nats, |c| {
        c.rpc.enabled = true;
        c.auth.allow_anonymous = true;
    })
    .await;
    let mut a = anon.client().await;
    expect_error(&mut a, json!({"op":"rpc","method":"echo"}), 1, "forbidden").await;
    let listed = TestGateway::start(&nats, |c| {
        c.rpc.enabled = true;
        c.auth.allow_anonymous = true;
        c.auth.anonymous.rpc = vec![RoomPattern::new("echo")];
    })
    .await;
    let mut a = listed.client().await;
    let r = a.request(json!({"op":"rpc","method":"echo"}), 1).await;
    assert_eq!(r["op"], "rpc_result", "{r}");
    assert!(r["data"]["user"].is_null(), "anonymous: no user header: {r}");
}

#[tokio::test]
async fn hostile_method_names_are_bad_requests_with_nothing_sent_to_nats() {
    let nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, rpc(&keys)).await;
    let mut c = alice(&gw, json!(["*"])).await;
    let nc = async_nats::connect(nats.url()).await.unwrap();
    let mut all = nats_sub(&nc, ">").await;
    let long = "a".repeat(129);
    let bad: Vec<&str> = vec![
        "",
        ".",
        "a..b",
        ".a",
        "a.",
        "*",
        "a.*",
        ">",
        "a.>",
        "$SYS.x",
        "a.$x",
        "a b",
        "a\tb",
        "a\r\nPUB x 1",
        "é",
        &long,
        "a/b",
    ];
    for (i, m) in bad.iter().enumerate() {
        expect_error(&mut c, json!({"op":"rpc","method":m}), i as u64 + 1, "bad_request").await;
    }
    // Not a string, no method, no id.
    // A mistyped field fails the whole frame, as for any op: the error cannot name the id.
    c.send(json!({"op":"rpc","id":100,"method":5})).await;
    assert_eq!(c.recv_op("error").await["code"], "bad_request");
    expect_error(&mut c, json!({"op":"rpc"}), 101, "bad_request").await;
    c.send(json!({"op":"rpc","method":"echo"})).await;
    let r = c.recv_op("error").await;
    assert_eq!(r["code"], "bad_request", "{r}");
    // A 128-character method is fine as a name: it reaches NATS (where the `>` watcher sees it and never answers).
    let ok = format!("{}.{}", "a".repeat(63), "b".repeat(64));
    expect_error(&mut c, json!({"op":"rpc","method":ok,"timeout_ms":100}), 102, "timeout").await;
    let first = tokio::time::timeout(Duration::from_secs(2), all.next())
        .await
        .expect("the valid call reached NATS")
        .expect("message");
    assert_eq!(
        first.subject.as_str(),
        format!("rpc.{ok}"),
        "the hostile names sent nothing before it"
    );
}

#[tokio::test]
async fn calls_over_the_in_flight_cap_are_rate_limited() {
    let nats = NatsServer::start().await;
    let _service = responder(&nats).await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| {
        rpc(&keys)(c);
        c.rpc.max_inflight_per_connection = 2;
    })
    .await;
    let mut c = alice(&gw, json!(["*"])).await;
    for id in 1..=2 {
        c.send(json!({"op":"rpc","id":id,"method":"slow","timeout_ms":500}))
            .await;
    }
    c.send(json!({"op":"rpc","id":3,"method":"echo"})).await;
    let r = c.recv().await;
    assert_eq!(
        (r["id"].clone(), r["code"].clone()),
        (json!(3), json!("rate_limited")),
        "{r}"
    );
    for _ in 0..2 {
        let r = c.recv().await;
        assert_eq!(r["code"], "timeout", "{r}");
    }
    // The slots are back.
    let r = c.request(json!({"op":"rpc","method":"echo"}), 4).await;
    assert_eq!(r["op"], "rpc_result", "{r}");
}

#[tokio::test]
async fn a_late_answer_is_dropped_and_a_closed_connection_abandons_its_calls() {
    let nats = NatsServer::start().await;
    let _service = responder(&nats).await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, rpc(&keys)).await;
    let mut c = alice(&gw, json!(["*"])).await;
    expect_error(
        &mut c,
        json!({"op":"rpc","method":"late","timeout_ms":100}),
        1,
        "timeout",
    )
    .await;
    // The answer comes at 400 ms: nothing more is written for call 1.
    c.expect_silence(Duration::from_millis(700)).await;
    let r = c.request(json!({"op":"rpc","method":"late"}), 2).await;
    assert_eq!(
        (r["op"].clone(), r["data"].clone()),
        (json!("rpc_result"), json!("late")),
        "{r}"
    );

    // Closing mid-call: the connection ends at once (its call is dropped with it, no task is left behind).
    c.send(json!({"op":"rpc","id":3,"method":"late"})).await;
    c.send(json!({"op":"rpc","id":4,"method":"slow"})).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.ws.close(None).await.expect("close");
    // A close without a status is answered without one (1005).
    c.expect_close().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while gw.gw.metrics().connections_open.get() != 0 {
        assert!(tokio::time::Instant::now() < deadline, "the connection ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The late answer to a closed connection harms nobody; a new connection is served.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut d = alice(&gw, json!(["*"])).await;
    let r = d.request(json!({"op":"rpc","method":"echo"}), 3).await;
    assert_eq!(r["op"], "rpc_result", "{r}");
    d.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn an_answer_over_the_message_size_is_too_large_and_refresh_replaces_the_methods() {
    let nats = NatsServer::start().await;
    let _service = responder(&nats).await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, rpc(&keys)).await;
    let mut c = alice(&gw, json!(["echo", "big"])).await;
    expect_error(&mut c, json!({"op":"rpc","method":"big"}), 1, "too_large").await;
    let r = c.request(json!({"op":"rpc","method":"echo"}), 2).await;
    assert_eq!(r["op"], "rpc_result", "{r}");
    let t = token("alice", json!({ "rooms": ["*"], "rpc": ["big"] }));
    let r = c.request(json!({"op":"refresh","token":t}), 3).await;
    assert_eq!(r["op"], "ack", "{r}");
    expect_error(&mut c, json!({"op":"rpc","method":"echo"}), 4, "forbidden").await;
}

#[tokio::test]
async fn a_call_while_nats_is_down_is_unavailable() {
    let mut nats = NatsServer::start().await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, rpc(&keys)).await;
    let mut c = alice(&gw, json!(["*"])).await;
    nats.stop();
    gw.wait_ready(false).await;
    expect_error(&mut c, json!({"op":"rpc","method":"echo"}), 1, "unavailable").await;
}

/// The value of the sample line `line` (name and labels) in a scrape; a missing line fails the test.
fn sample(text: &str, line: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {line:?} in:\n{text}"))
}

#[tokio::test]
async fn calls_are_counted_by_result_and_timed() {
    let nats = NatsServer::start().await;
    let _service = responder(&nats).await;
    let keys = Keys::new();
    let gw = TestGateway::start(&nats, |c| {
        rpc(&keys)(c);
        c.server.public_metrics = true;
    })
    .await;
    let mut c = alice(&gw, json!(["echo", "fail", "nobody.*", "slow", "big"])).await;
    let (status, before) = gw.get("/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        !before.contains("roomwire_rpc_calls_total{"),
        "no series before a call: {before}"
    );
    assert_eq!(sample(&before, "roomwire_rpc_seconds_count"), 0.0);

    for id in 1..=2 {
        let r = c.request(json!({"op":"rpc","method":"echo"}), id).await;
        assert_eq!(r["op"], "rpc_result", "{r}");
    }
    let r = c.request(json!({"op":"rpc","method":"fail"}), 3).await;
    assert_eq!(r["error"]["code"], "409", "{r}");
    expect_error(&mut c, json!({"op":"rpc","method":"nobody.home"}), 4, "no_responders").await;
    expect_error(
        &mut c,
        json!({"op":"rpc","method":"slow","timeout_ms":50}),
        5,
        "timeout",
    )
    .await;
    expect_error(&mut c, json!({"op":"rpc","method":"big"}), 6, "too_large").await;
    expect_error(&mut c, json!({"op":"rpc","method":"a..b"}), 7, "bad_request").await;
    expect_error(&mut c, json!({"op":"rpc","method":"other"}), 8, "forbidden").await;

    let (_, after) = gw.get("/metrics").await.unwrap();
    for (result, n) in [
        ("ok", 2.0),
        ("service_error", 1.0),
        ("no_responders", 1.0),
        ("timeout", 1.0),
        ("too_large", 1.0),
        ("bad_request", 1.0),
        ("forbidden", 1.0),
    ] {
        let line = format!("roomwire_rpc_calls_total{{result=\"{result}\"}}");
        assert_eq!(sample(&after, &line), n, "{line}");
    }
    // Timed: every call that passed the gateway's checks (6), none of the two refused before NATS.
    assert_eq!(sample(&after, "roomwire_rpc_seconds_count"), 6.0, "{after}");
    assert!(
        sample(&after, "roomwire_rpc_seconds_sum") >= 0.05,
        "the timeout's 50 ms at least"
    );
}

#[tokio::test]
async fn the_welcome_states_the_in_flight_bound_when_rpc_is_on() {
    let nats = NatsServer::start().await;
    for (enabled, expected) in [(true, json!(3)), (false, Value::Null)] {
        let gw = TestGateway::start(&nats, |c| {
            c.auth.allow_anonymous = true;
            c.rpc.enabled = enabled;
            c.rpc.max_inflight_per_connection = 3;
        })
        .await;
        let (mut ws, _) =
            tokio_tungstenite::client_async(format!("wss://localhost:{}{WS}", gw.addr.port()), gw.tls().await)
                .await
                .expect("upgrade");
        let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(w))) =
            tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .expect("welcome in time")
        else {
            panic!("welcome")
        };
        let w: Value = serde_json::from_str(&w).unwrap();
        assert_eq!(
            (w["op"].clone(), w["rpc_max_inflight"].clone()),
            (json!("welcome"), expected),
            "{w}"
        );
    }
}

#[test]
fn rpc_config_is_validated() {
    let mut c = Config::default();
    c.auth.allow_anonymous = true;
    assert!(c.validate().is_ok());
    c.rpc.enabled = true;
    c.rpc.subject_prefix = c.rooms.subject_prefix.clone();
    let e = c.validate().expect_err("overlap refused").to_string();
    assert!(e.contains("rpc.subject_prefix"), "{e}");
    c.rpc.subject_prefix = format!("{}.calls", c.nats.events_prefix);
    let e = c.validate().expect_err("overlap refused").to_string();
    assert!(e.contains("rpc.subject_prefix"), "{e}");
    c.rpc.subject_prefix = "rpc".into();
    c.rpc.max_inflight_per_connection = c.limits.max_inflight_publishes + 1;
    let e = c.validate().expect_err("over the shared bound").to_string();
    assert!(e.contains("rpc.max_inflight_per_connection"), "{e}");
}
