//! The gateway on a 3-node nats-server cluster (issue 13): it is given every node's URL; when the node it is connected
//! to dies, or enters lame-duck mode, it moves to another node, its rooms are subscribed again there, and the
//! WebSocket clients stay connected and get messages again. Three gateways on the cluster share rooms both ways. An R3
//! history stream and an R3 presence bucket survive the loss of a node.

mod common;

use std::time::Duration;

use common::{NatsServer, TestGateway, WsClient, free_port};
use roomwire::config::OneOrMany;
use serde_json::{Value, json};

/// Three nodes with routes to each other, short lame-duck timings, started and fully routed.
async fn cluster(dir: &std::path::Path) -> Vec<NatsServer> {
    cluster_with(dir, false).await
}

/// [`cluster`], with JetStream on every node (`js`), each with its own store.
async fn cluster_with(dir: &std::path::Path, js: bool) -> Vec<NatsServer> {
    let conf = dir.join("ldm.conf");
    std::fs::write(
        &conf,
        "lame_duck_duration: \"30s\"\nlame_duck_grace_period: \"200ms\"\n",
    )
    .unwrap();
    let cports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let routes = cports
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes = Vec::new();
    for (i, cport) in cports.iter().enumerate() {
        let cluster = format!("nats://127.0.0.1:{cport}");
        let name = format!("n{i}");
        let store = dir.join(format!("js{i}"));
        let mut args = vec![
            "-c",
            conf.to_str().unwrap(),
            "-n",
            &name,
            "--cluster_name",
            "rwtest",
            "--cluster",
            &cluster,
            "--routes",
            &routes,
        ];
        if js {
            args.extend(["-js", "-sd", store.to_str().unwrap()]);
        }
        nodes.push(NatsServer::start_with(&args).await);
    }
    // Routes form in the background: wait until every node has both peers.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    for n in &nodes {
        while n.log().matches("Route connection created").count() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "routes did not form:\n{}",
                n.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    nodes
}

fn all_urls(nodes: &[NatsServer]) -> OneOrMany {
    OneOrMany::Many(nodes.iter().map(NatsServer::url).collect())
}

/// The index of the node the gateway is connected to.
fn connected_node(gw: &TestGateway, nodes: &[NatsServer]) -> usize {
    let port = gw.gw.bridge().client().server_info().port;
    nodes
        .iter()
        .position(|n| n.port == port)
        .expect("connected to one of the nodes")
}

/// Publishes from `backend` to `room` until `client` gets a message (interest crosses routes asynchronously after
/// a resubscription), then drains what else arrived.
async fn delivered_again(backend: &async_nats::Client, client: &mut WsClient, room: &str, tag: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        backend
            .publish(format!("rooms.{room}"), json!({ "tag": tag }).to_string().into())
            .await
            .unwrap();
        let _ = backend.flush().await;
        if let Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) = tokio::time::timeout(
            Duration::from_millis(200),
            futures_util::StreamExt::next(&mut client.ws),
        )
        .await
        {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["op"] == "message" && v["data"]["tag"] == tag {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no delivery after the failover ({tag})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_connected_node_moves_the_gateway_and_keeps_the_clients() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path()).await;
    let gw = TestGateway::start(&nodes[0], |c| c.nats.url = all_urls(&nodes)).await;
    let mut client = gw.client().await;
    client.join("cluster-room").await;

    let dead = connected_node(&gw, &nodes);
    let other = (dead + 1) % 3;
    let backend = nodes[other].client().await;
    delivered_again(&backend, &mut client, "cluster-room", "before").await;

    nodes[dead].stop();
    // The gateway reconnects to a surviving node and subscribes the room again; the WebSocket stays open.
    delivered_again(&backend, &mut client, "cluster-room", "after").await;
    let now = connected_node(&gw, &nodes);
    assert_ne!(now, dead, "moved off the dead node");
    // And the client can still publish through it.
    client.publish("cluster-room", json!("still here")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lame_duck_mode_moves_the_gateway_without_dropping_clients() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path()).await;
    let gw = TestGateway::start(&nodes[0], |c| c.nats.url = all_urls(&nodes)).await;
    let mut client = gw.client().await;
    client.join("ldm-room").await;
    let ldm = connected_node(&gw, &nodes);
    let backend = nodes[(ldm + 1) % 3].client().await;
    delivered_again(&backend, &mut client, "ldm-room", "before").await;

    let status = std::process::Command::new(common::nats_server_bin())
        .arg("--signal")
        .arg(format!("ldm={}", nodes[ldm].pid()))
        .status()
        .unwrap();
    assert!(status.success());
    // The gateway leaves the lame-duck node at once (its lame-duck duration is 30 s) and delivery resumes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while connected_node(&gw, &nodes) == ldm {
        assert!(tokio::time::Instant::now() < deadline, "still on the lame-duck node");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    delivered_again(&backend, &mut client, "ldm-room", "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_on_three_nodes_share_rooms_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path()).await;
    let mut gws = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        gws.push(TestGateway::start(n, |c| c.server.gateway_id = Some(format!("gw{i}"))).await);
    }
    let mut clients = Vec::new();
    for gw in &gws {
        let mut c = gw.client().await;
        c.join("shared").await;
        clients.push(c);
    }
    // Lifecycle events name the gateway.
    let watcher = nodes[0].client().await;
    let mut events = common::nats_sub(&watcher, "roomwire.events.join").await;
    let mut late = gws[2].client().await;
    late.join("shared").await;
    let ev = common::next_msg(&mut events).await;
    let ev: Value = serde_json::from_slice(&ev.payload).unwrap();
    assert_eq!(ev["gateway"], "gw2", "{ev}");

    // Each gateway's client publishes; every other gateway's client receives (interest crosses the routes
    // asynchronously, so publish until the first one arrives, then each must arrive).
    for (from, _) in gws.iter().enumerate() {
        let tag = format!("from-gw{from}");
        for to in 0..3 {
            if to == from {
                continue;
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            'wait: loop {
                let r = clients[from]
                    .request(json!({"op":"publish","room":"shared","data":{"tag": tag}}), 7)
                    .await;
                assert_eq!(r["op"], "ack", "{r}");
                while let Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) = tokio::time::timeout(
                    Duration::from_millis(200),
                    futures_util::StreamExt::next(&mut clients[to].ws),
                )
                .await
                {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["data"]["tag"] == tag.as_str() {
                        break 'wait;
                    }
                }
                assert!(tokio::time::Instant::now() < deadline, "{tag} never reached gw{to}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_r3_history_stream_survives_a_node_and_recovery_stays_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster_with(dir.path(), true).await;
    js_ready(&nodes).await;
    let gw = TestGateway::start(&nodes[0], |c| {
        c.nats.url = all_urls(&nodes);
        c.history.enabled = true;
        c.history.rooms = vec![roomwire::room_pattern::RoomPattern::new("h-*")];
        c.history.replicas = 3;
        c.history.recover_timeout = Duration::from_secs(3);
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while gw.gw.history().and_then(|h| h.epoch()).is_none() {
        assert!(tokio::time::Instant::now() < deadline, "history stream not set up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut a = gw.client().await;
    let ack = a.request(json!({"op":"join","room":"h-r3"}), 1).await;
    assert!(ack["epoch"].is_string(), "{ack}");
    let dead = connected_node(&gw, &nodes);
    let survivor = (dead + 1) % 3;
    let js = async_nats::jetstream::new(nodes[survivor].client().await);
    // Stored before the loss: the client sees it live.
    let first = js
        .publish("rooms.h-r3", "0".into())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence;
    let m = a.recv_op("message").await;
    assert_eq!(m["seq"].as_u64(), Some(first), "{m}");
    drop(a);

    nodes[dead].stop();
    // Stored after the loss, by the two nodes left (retried while the stream elects a new leader).
    let mut stored = Vec::new();
    for i in 1..=10 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match js.publish("rooms.h-r3", i.to_string().into()).await {
                Ok(ack) => match ack.await {
                    Ok(ack) => {
                        stored.push(ack.sequence);
                        break;
                    }
                    Err(e) => assert!(tokio::time::Instant::now() < deadline, "not stored: {e}"),
                },
                Err(e) => assert!(tokio::time::Instant::now() < deadline, "not published: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    gw.wait_ready(true).await;
    let mut b = gw.client().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let r = loop {
        let r = b
            .request(
                json!({"op":"join","room":"h-r3","since":{"seq": first, "epoch": ack["epoch"]}}),
                2,
            )
            .await;
        if r["recovered"] == true {
            break r;
        }
        // JetStream may still be electing; a failed recovery leaves the client joined: leave and try again.
        assert!(tokio::time::Instant::now() < deadline, "never recovered: {r}");
        b.request(json!({"op":"leave","room":"h-r3"}), 3).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(r["epoch"], ack["epoch"], "same stream, same epoch");
    let mut got = Vec::new();
    while got.len() < 10 {
        let m = b.recv_op("message").await;
        got.push((m["data"].as_u64().unwrap(), m["seq"].as_u64().unwrap()));
    }
    assert_eq!(
        got.iter().map(|g| g.0).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(
        got.iter().map(|g| g.1).collect::<Vec<_>>(),
        stored,
        "the stored sequences, in order"
    );
}

/// Waits for JetStream on a fresh cluster: it answers once the nodes have elected a meta leader.
async fn js_ready(nodes: &[NatsServer]) {
    let probe = async_nats::jetstream::new(nodes[0].client().await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = probe.query_account().await;
        if r.is_ok() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "JetStream cluster not ready: {r:?}\n{}",
            nodes[0].log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A JetStream API request (`$JS.API.<api>`) over `nc`: the answer, or `None` if none came.
async fn js_api(nc: &async_nats::Client, api: &str, body: Value) -> Option<Value> {
    let r = nc
        .request(format!("$JS.API.{api}"), body.to_string().into())
        .await
        .ok()?;
    serde_json::from_slice(&r.payload).ok()
}

/// A client's next frame matching `want` within `deadline`; every frame read on the way (the matching one
/// included) is added to `log`.
async fn next_logged(
    c: &mut WsClient,
    deadline: tokio::time::Instant,
    log: &mut Vec<Value>,
    what: &str,
    want: impl Fn(&Value) -> bool,
) -> Value {
    loop {
        let msg = tokio::time::timeout_at(deadline, futures_util::StreamExt::next(&mut c.ws))
            .await
            .unwrap_or_else(|_| panic!("{what} in time; seen meanwhile: {log:?}"));
        match msg {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                log.push(v.clone());
                if want(&v) {
                    return v;
                }
            }
            Some(Ok(_)) => {}
            other => panic!("connection ended while waiting for {what}: {other:?}"),
        }
    }
}

/// The first frame of `log` matching `want`, else the client's next one ([`next_logged`]).
async fn event(
    c: &mut WsClient,
    deadline: tokio::time::Instant,
    log: &mut Vec<Value>,
    what: &str,
    want: impl Fn(&Value) -> bool,
) -> Value {
    match log.iter().find(|v| want(v)) {
        Some(v) => v.clone(),
        None => next_logged(c, deadline, log, what, want).await,
    }
}

/// Joins `room`; presence events may come before the ack (logged).
async fn join_logged(c: &mut WsClient, room: &str, log: &mut Vec<Value>) {
    c.send(json!({"op":"join","room":room,"id":1})).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let r = next_logged(c, deadline, log, "the join's answer", |v| v["id"] == 1).await;
    assert_eq!(r["op"], "ack", "join {room}: {r}");
}

/// Asks `presence` of `room` until it lists exactly the conns of `want`, before `deadline`.
async fn lists(c: &mut WsClient, room: &str, want: &[&str], deadline: tokio::time::Instant, log: &mut Vec<Value>) {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    for id in 10_000u64.. {
        c.send(json!({"op":"presence","room":room,"id":id})).await;
        let r = next_logged(c, deadline, log, "a presence answer", |v| v["id"] == id).await;
        let mut conns: Vec<String> = r["members"]
            .as_array()
            .map(|m| m.iter().filter_map(|m| m["conn"].as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        conns.sort();
        if r["op"] == "presence" && conns == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "presence of {room} is {r}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Presence with `replicas = 3` (issue 24) survives the loss of a node: two gateways on the cluster, a member on
/// each, the bucket's stream leader moved to the node gateway `a` is connected to, and that node killed. The bucket
/// elects a new leader, `a` moves to another node, and presence goes on: a member joining on either side afterwards
/// is seen by the other (`member_joined`), `presence` lists everyone on both, and nobody is reported gone (no
/// `member_left` at all, so no spurious `gateway_lost`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_presence_survives_the_loss_of_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster_with(dir.path(), true).await;
    js_ready(&nodes).await;
    let room = "p-r3";
    let gateway = |id: &'static str, nodes: &[NatsServer]| {
        let urls = all_urls(nodes);
        move |c: &mut roomwire::Config| {
            c.nats.url = urls;
            c.server.gateway_id = Some(id.into());
            c.presence.enabled = true;
            c.presence.rooms = vec![roomwire::room_pattern::RoomPattern::new("p-*")];
            c.presence.replicas = 3;
            // Entries are at most ttl / 3 old when the node dies and must be rewritten before they expire, after
            // the bucket's leader election (nats-server's raft waits 4-9 s before electing): 20 s leaves room.
            c.presence.ttl = Duration::from_secs(20);
            c.auth.anonymous.join = vec![roomwire::room_pattern::RoomPattern::new("p-*")];
        }
    };
    let a_gw = TestGateway::start(&nodes[0], gateway("gw-a", &nodes)).await;
    let b_gw = TestGateway::start(&nodes[1], gateway("gw-b", &nodes)).await;
    // The R3 bucket may need a retry at start while the cluster settles (`ensure_later`).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for gw in [&a_gw, &b_gw] {
        while !gw.gw.presence().expect("presence on").is_available() {
            assert!(tokio::time::Instant::now() < deadline, "presence bucket not set up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (mut a_log, mut b_log) = (Vec::new(), Vec::new());
    let within = |s| tokio::time::Instant::now() + Duration::from_secs(s);
    let is_joined = |conn: &str| {
        let conn = conn.to_owned();
        move |v: &Value| v["op"] == "member_joined" && v["room"] == room && v["conn"] == conn.as_str()
    };
    let mut a = a_gw.client().await;
    join_logged(&mut a, room, &mut a_log).await;
    let mut b = b_gw.client().await;
    join_logged(&mut b, room, &mut b_log).await;
    let (ac, bc) = (a.conn.clone(), b.conn.clone());
    event(&mut a, within(5), &mut a_log, "a: b joined", is_joined(&bc)).await;
    event(&mut b, within(5), &mut b_log, "b: b joined", is_joined(&bc)).await;
    lists(&mut a, room, &[&ac, &bc], within(5), &mut a_log).await;
    lists(&mut b, room, &[&ac, &bc], within(5), &mut b_log).await;

    // The bucket's stream leader onto the node `a` is connected to, then that node dies: the worst node to lose.
    let stream = format!("KV_{}", a_gw.gw.config().presence.bucket);
    let dead = connected_node(&a_gw, &nodes);
    let dead_name = format!("n{dead}");
    let admin = nodes[(dead + 1) % 3].client().await;
    let leader = || async {
        js_api(&admin, &format!("STREAM.INFO.{stream}"), json!({}))
            .await
            .and_then(|i| i["cluster"]["leader"].as_str().map(str::to_owned))
    };
    let deadline = within(20);
    while leader().await.as_deref() != Some(dead_name.as_str()) {
        let r = js_api(
            &admin,
            &format!("STREAM.LEADER.STEPDOWN.{stream}"),
            json!({"placement":{"preferred": dead_name}}),
        )
        .await;
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bucket's leader never moved to {dead_name}: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let b_node = connected_node(&b_gw, &nodes);
    nodes[dead].stop();
    eprintln!("killed n{dead}: the bucket's leader and gw-a's node (gw-b on n{b_node})");

    // A new leader is elected among the two left.
    let deadline = within(30);
    loop {
        match leader().await {
            Some(l) if l != dead_name => break,
            l => assert!(tokio::time::Instant::now() < deadline, "no new leader: {l:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Presence goes on, both ways: a new member on each side is seen by the other.
    let (mut c_log, mut d_log) = (Vec::new(), Vec::new());
    let mut c = a_gw.client().await;
    join_logged(&mut c, room, &mut c_log).await;
    let mut d = b_gw.client().await;
    join_logged(&mut d, room, &mut d_log).await;
    let (cc, dc) = (c.conn.clone(), d.conn.clone());
    event(&mut b, within(30), &mut b_log, "b: c joined", is_joined(&cc)).await;
    event(&mut a, within(30), &mut a_log, "a: d joined", is_joined(&dc)).await;
    let everyone = [ac.as_str(), bc.as_str(), cc.as_str(), dc.as_str()];
    lists(&mut a, room, &everyone, within(10), &mut a_log).await;
    lists(&mut b, room, &everyone, within(10), &mut b_log).await;
    lists(&mut c, room, &everyone, within(10), &mut c_log).await;
    assert_ne!(connected_node(&a_gw, &nodes), dead, "gw-a moved off the dead node");
    // Both gateways have written their entry since the loss (the joins above), so no entry of theirs can still
    // expire from the outage, and an expiry before those writes would have come first, in order: nobody left.
    for (who, log) in [("a", &a_log), ("b", &b_log), ("c", &c_log), ("d", &d_log)] {
        let gone: Vec<&Value> = log.iter().filter(|v| v["op"] == "member_left").collect();
        assert!(
            gone.is_empty(),
            "{who} was told of departures: {gone:?}; all it saw: {log:?}"
        );
    }
}
