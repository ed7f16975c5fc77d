//! permessage-deflate (issue 27) end to end: the negotiation in the 101, room messages compressed once and sent to
//! the members that negotiated it while the others get the same message plain, compressed and uncompressed client
//! messages (whole and fragmented), what an attacker can do with compressed input (a bomb: 1009; RSV1 where it does
//! not belong: 1002; data that is not deflate or not UTF-8: 1007), and a real client, Python's `websockets` with its
//! default compression, over wss and ws (`scripts/install-websockets` installs it project-locally on first use).

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Command, Stdio},
};

use common::{frames::*, hostile::*, *};
use serde_json::{Value, json};

const OFFER: &str = "permessage-deflate; client_max_window_bits";
const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// A chat-like JSON value of about `len` bytes, the same every time (the benchmark's generator does the same).
fn chat(seed: u64, len: usize) -> Value {
    let words = [
        "hello", "there", "meeting", "at", "noon", "see", "you", "soon", "ok", "thanks", "the", "deploy",
    ];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut text = String::new();
    while text.len() + 80 < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(words[(x % words.len() as u64) as usize]);
    }
    json!({"user": format!("user-{}", seed % 97), "ts": 1_700_000_000 + seed, "kind": "chat", "text": text})
}

/// A client frame carrying `payload` compressed (RSV1 set), final or not.
fn compressed(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    roomwire::deflate::compress(payload, 6, &mut out);
    frame(fin, 4, opcode, true, &out)
}

async fn join(ws: &mut RawWs, room: &str) {
    ws.send(&client(
        TEXT,
        json!({"op":"join","room":room,"id":1}).to_string().as_bytes(),
    ))
    .await;
    let ack = ws.next_json().await;
    assert_eq!(ack["op"], "ack", "{ack}");
}

/// The next room message frame (raw, so its RSV bits can be checked) and its JSON, inflated if compressed.
async fn next_message(ws: &mut RawWs) -> (ServerFrame, Value) {
    loop {
        let f = ws.next_frame().await.expect("a frame");
        if f.opcode != TEXT {
            continue;
        }
        let plain = if f.rsv == 4 {
            roomwire::deflate::inflate(&f.payload, 1 << 24).expect("valid deflate")
        } else {
            f.payload.clone()
        };
        let v: Value = serde_json::from_slice(&plain).expect("JSON");
        if v["op"] == "message" {
            return (f, v);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiation_answers_offers_and_nothing_else() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    // (request headers, the 101's Sec-WebSocket-Extensions)
    type Case<'a> = (Vec<(&'a str, &'a str)>, Option<&'a str>);
    let cases: Vec<Case> = vec![
        (vec![], None),
        (vec![("Sec-WebSocket-Extensions", OFFER)], Some(ANSWER)),
        (vec![("Sec-WebSocket-Extensions", "permessage-deflate")], Some(ANSWER)),
        (
            vec![(
                "Sec-WebSocket-Extensions",
                "permessage-deflate; server_max_window_bits=10",
            )],
            Some(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10",
            ),
        ),
        (
            vec![(
                "Sec-WebSocket-Extensions",
                "permessage-deflate; server_max_window_bits=7",
            )],
            None,
        ),
        (
            vec![(
                "Sec-WebSocket-Extensions",
                "permessage-deflate; bogus, x-webkit-deflate-frame",
            )],
            None,
        ),
        (
            vec![
                ("Sec-WebSocket-Extensions", OFFER),
                (
                    "User-Agent",
                    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) \
                     Version/15.2 Safari/605.1.15",
                ),
            ],
            None,
        ),
    ];
    for (headers, want) in cases {
        let (_ws, resp) = RawWs::connect_with(&gw, &headers).await;
        assert_eq!(resp.header("sec-websocket-extensions"), want, "{headers:?}");
    }
    let off = TestGateway::start(&nats, |c| c.compression.enabled = false).await;
    let (_ws, resp) = RawWs::connect_with(&off, &[("Sec-WebSocket-Extensions", OFFER)]).await;
    assert_eq!(
        resp.header("sec-websocket-extensions"),
        None,
        "compression.enabled = false"
    );
}

/// One room, four members: a plain one, two that negotiated deflate (one of them restricting the gateway's window
/// to 512 bytes) and a publisher. A large message reaches the deflating member compressed (RSV1) and everyone else
/// plain, with the same content; a small one (under `compression.min_size`) is plain for everyone. A deflating client
/// may send compressed messages (whole or fragmented) and uncompressed ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_messages_are_compressed_for_the_members_that_negotiated() {
    let nats = NatsServer::start().await;
    let gw = TestGateway::start(&nats, |_| {}).await;
    let (mut plain, _) = RawWs::connect_with(&gw, &[]).await;
    let (mut deflating, _) = RawWs::connect_with(&gw, &[("Sec-WebSocket-Extensions", OFFER)]).await;
    let (mut narrow, resp) = RawWs::connect_with(
        &gw,
        &[(
            "Sec-WebSocket-Extensions",
            "permessage-deflate; server_max_window_bits=9",
        )],
    )
    .await;
    assert!(deflating.deflate && narrow.deflate, "{}", resp.head);
    for ws in [&mut plain, &mut deflating, &mut narrow] {
        join(ws, "chat").await;
    }
    let mut publisher = gw.client().await;
    publisher.join("chat").await;
    let big = chat(1, 700);
    let small = json!({"text": "hi"});
    publisher.publish("chat", big.clone()).await;
    publisher.publish("chat", small.clone()).await;

    let (f, v) = next_message(&mut deflating).await;
    assert_eq!((f.rsv, &v["data"]), (4, &big), "large message compressed");
    let compressed_len = f.payload.len();
    let (f, v) = next_message(&mut deflating).await;
    assert_eq!((f.rsv, &v["data"]), (0, &small), "small message plain");
    for (name, ws) in [("plain", &mut plain), ("narrow window", &mut narrow)] {
        let (f, v) = next_message(ws).await;
        assert_eq!((f.rsv, &v["data"]), (0, &big), "{name}: large message plain");
        assert!(
            f.payload.len() > compressed_len * 3 / 2,
            "{name}: compression saved little"
        );
        let (f, v) = next_message(ws).await;
        assert_eq!((f.rsv, &v["data"]), (0, &small), "{name}: small message plain");
    }

    // From the deflating client: compressed whole, uncompressed (allowed: RSV1 clear), compressed in fragments.
    let publish = |data: &Value, id: u32| json!({"op":"publish","room":"chat","data":data,"id":id}).to_string();
    let whole = chat(2, 500);
    deflating
        .send(&compressed(true, TEXT, publish(&whole, 2).as_bytes()))
        .await;
    let unc = chat(3, 400);
    deflating.send(&client(TEXT, publish(&unc, 3).as_bytes())).await;
    let fragmented = chat(4, 800);
    let mut deflated = Vec::new();
    roomwire::deflate::compress(publish(&fragmented, 4).as_bytes(), 6, &mut deflated);
    let (a, b) = deflated.split_at(deflated.len() / 2);
    deflating
        .send(&[frame(false, 4, TEXT, true, a), frame(true, 0, CONT, true, b)].concat())
        .await;
    for want in [&whole, &unc, &fragmented] {
        let (_, v) = next_message(&mut plain).await;
        assert_eq!(&v["data"], want);
    }
    // A compressed message with no content: an empty text message, answered as a bad request, not a close.
    deflating.send(&frame(true, 4, TEXT, true, &[0x00])).await;
    let mut replies = Vec::new();
    while replies.len() < 4 {
        let v = deflating.next_json().await;
        if v["op"] != "message" {
            replies.push(v);
        }
    }
    assert_eq!(
        replies[..3].iter().map(|r| r["id"].clone()).collect::<Vec<_>>(),
        [2, 3, 4]
    );
    assert_eq!(replies[3]["op"], "error", "{}", replies[3]);
}

/// Compressed input from an attacker, on a gateway with 4 KiB messages: each closes as RFC 6455/7692 ask, and a
/// bystander keeps receiving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_compressed_input_closes_with_the_right_code() {
    let h = Harness::start(|_| {}).await;
    let bomb = {
        let mut out = Vec::new();
        roomwire::deflate::compress(&vec![b' '; 1 << 20], 9, &mut out);
        out
    };
    assert!(bomb.len() < MAX_FRAME, "the bomb fits one frame: {}", bomb.len());
    let cases: Vec<(&str, Vec<u8>, (u16, &str))> = vec![
        (
            "a 1 MiB bomb in 1 KiB",
            frame(true, 4, TEXT, true, &bomb),
            (1009, "message too big"),
        ),
        (
            "RSV1 on a ping",
            frame(true, 4, PING, true, b""),
            (1002, "protocol error"),
        ),
        (
            "RSV1 on a continuation",
            [frame(false, 4, TEXT, true, b"x"), frame(true, 4, CONT, true, b"y")].concat(),
            (1002, "protocol error"),
        ),
        (
            "RSV2 with deflate",
            frame(true, 2, TEXT, true, b"x"),
            (1002, "protocol error"),
        ),
        ("RSV1|RSV2", frame(true, 6, TEXT, true, b"x"), (1002, "protocol error")),
        (
            "not deflate",
            frame(true, 4, TEXT, true, &[0xff, 0xff, 0xff]),
            (1007, "invalid compressed data"),
        ),
        (
            "invalid UTF-8 inside",
            compressed(true, TEXT, &[0xc3, 0x28, 0xa0]),
            (1007, "invalid UTF-8"),
        ),
    ];
    for (name, bytes, want) in cases {
        let (mut ws, resp) = RawWs::connect_with(&h.gw, &[("Sec-WebSocket-Extensions", OFFER)]).await;
        assert_eq!(resp.header("sec-websocket-extensions"), Some(ANSWER));
        ws.send(&bytes).await;
        let (code, reason, texts) = ws.expect_close().await;
        assert_eq!((code, reason.as_str()), want, "{name}; before the close: {texts:?}");
    }
    // A compressed message whose compressed bytes are over `limits.max_message_size` is refused by tungstenite
    // before any inflation.
    let (mut ws, _) = RawWs::connect_with(&h.gw, &[("Sec-WebSocket-Extensions", OFFER)]).await;
    ws.send(&frame(false, 4, TEXT, true, &[0u8; 1500])).await;
    let (code, _, _, _) = ws
        .flood_until_close(frame(false, 0, CONT, true, &[0u8; 1500]), 100_000)
        .await;
    assert_eq!(code, 1009, "compressed fragments past max_message_size");
    h.by.assert_receiving().await;
}

/// Python's `websockets` (`tests/compression/client.py`), with its default permessage-deflate, in a room with a
/// member that negotiated nothing (over wss) and with a NATS backend: each receives what the other publishes, over
/// wss and over ws.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_deflating_client_and_a_plain_one_share_a_room() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let installed = Command::new(root.join("scripts/install-websockets"))
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/install-websockets runs");
    assert!(installed.status.success(), "scripts/install-websockets failed");
    let pythonpath = String::from_utf8(installed.stdout).expect("path").trim().to_string();
    let nats = NatsServer::start().await;
    let backend = async_nats::connect(nats.url()).await.expect("NATS");
    let gw = TestGateway::start(&nats, |_| {}).await;
    let ca = gw.ca.dir.path().join("ca.pem");
    std::fs::write(&ca, &gw.ca.ca_pem).expect("write the CA");
    let plain_gw = PlainGateway::start(&nats).await;
    for tls in [true, false] {
        let (scheme, port) = if tls {
            ("wss", gw.addr.port())
        } else {
            ("ws", plain_gw.addr.port())
        };
        let url = format!("{scheme}://localhost:{port}/ws");
        // The harness's client speaks wss only: over ws the backend alone is the other side.
        let mut plain = if tls { Some(gw.client().await) } else { None };
        if let Some(p) = plain.as_mut() {
            p.join("chat").await;
        }
        let mut sub = backend.subscribe("rooms.chat").await.expect("subscribe");
        backend.flush().await.expect("flush");

        let mut child = Command::new("python3")
            .arg(root.join("tests/compression/client.py"))
            .arg(&url)
            .arg(&ca)
            .env("PYTHONPATH", &pythonpath)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs");
        let mut stdin = child.stdin.take().expect("stdin");
        let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(serde_json::from_str::<Value>(&line).expect("JSON line"));
            }
        });
        let hello = next_line(&mut lines).await;
        assert_eq!(hello["extensions"], ANSWER, "{scheme}: {hello}");

        // Python publishes a large and a small message (websockets compresses both); the plain member and the
        // backend get them.
        let (big, small) = (chat(10, 600), json!({"text": "short"}));
        writeln!(stdin, "{big}\n{small}").expect("to python");
        stdin.flush().expect("flush");
        assert_eq!(next_line(&mut lines).await["published"], 2);
        for want in [&big, &small] {
            let m = next_msg(&mut sub).await;
            assert_eq!(
                &serde_json::from_slice::<Value>(&m.payload).expect("JSON"),
                want,
                "{scheme}"
            );
            if let Some(p) = plain.as_mut() {
                assert_eq!(&p.recv_op("message").await["data"], want, "{scheme}");
            }
        }
        // The backend publishes; Python gets the large one compressed by the gateway, the small one plain, and the
        // plain member both plain.
        let (big2, small2) = (chat(11, 750), json!({"text": "ok"}));
        for v in [&big2, &small2] {
            backend
                .publish("rooms.chat", v.to_string().into())
                .await
                .expect("publish");
        }
        let got = next_line(&mut lines).await;
        assert_eq!(got["got"], json!([big2, small2]), "{scheme}");
        if let Some(p) = plain.as_mut() {
            for want in [&big2, &small2] {
                assert_eq!(&p.recv_op("message").await["data"], want, "{scheme}");
            }
        }
        let status = child.wait().expect("python exits");
        assert!(status.success(), "{scheme}: the Python client failed");
    }
}

async fn next_line(lines: &mut tokio::sync::mpsc::UnboundedReceiver<Value>) -> Value {
    tokio::time::timeout(WAIT, lines.recv())
        .await
        .expect("the Python client in time")
        .expect("the Python client ended early")
}

/// A gateway without TLS (`ws://`), in-process on `127.0.0.1:0`, ready once NATS is connected.
struct PlainGateway {
    addr: std::net::SocketAddr,
    shutdown: tokio_util::sync::CancellationToken,
}

impl PlainGateway {
    async fn start(nats: &NatsServer) -> Self {
        let ca = TestCa::new();
        let mut config = test_config(&nats.url(), &ca);
        config.tls.enabled = false;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = tokio_util::sync::CancellationToken::new();
        let gw = roomwire::Gateway::start(config, shutdown.clone())
            .await
            .expect("gateway starts");
        tokio::spawn(roomwire::run(listener, gw.clone()));
        let deadline = tokio::time::Instant::now() + WAIT;
        while !gw.ready() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the plain gateway never got ready"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        PlainGateway { addr, shutdown }
    }
}

impl Drop for PlainGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
