//! `--scenario recover`: a reconnect storm against history rooms (issue 11). `--conns` clients join `--rooms` history
//! rooms and note the join ack's position; all disconnect; a backend publishes `--missed` messages to every room;
//! then every client reconnects at once and rejoins with `since`. Reports the time until all have recovered (ack
//! `recovered:true` and every missed message received), the gateway's peak RSS during the storm, and the JetStream
//! requests the gateway made per recovering client (its `roomwire_history_requests` metric).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use futures_util::SinkExt;
use serde::Serialize;
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    sync::Semaphore,
};
use tokio_tungstenite::tungstenite::Message;

use super::{Args, Endpoint, Ws, next_data, print_line, proc_field};

#[derive(Serialize)]
struct Report {
    scenario: &'static str,
    label: Option<String>,
    conns: usize,
    rooms: usize,
    missed_per_room: u64,
    joined: u64,
    recovered: u64,
    not_recovered: u64,
    errors: u64,
    first_error: Option<String>,
    /// From the first reconnect to the last client holding every missed message.
    storm_secs: f64,
    /// The gateway's peak RSS during the storm (VmHWM after resetting it just before).
    peak_rss_kib: Option<u64>,
    rss_before_kib: Option<u64>,
    /// JetStream requests the gateway made for the storm, per recovering client.
    jetstream_requests_per_client: Option<f64>,
}

/// One client's position after its first join.
struct Position {
    room: String,
    epoch: String,
    seq: u64,
}

async fn ack_of(ws: &mut Ws) -> anyhow::Result<Value> {
    loop {
        let data = next_data(ws).await?;
        let v: Value = serde_json::from_slice(&data)?;
        match v["op"].as_str() {
            Some("ack") => return Ok(v),
            Some("error") => bail!("refused: {v}"),
            _ => {}
        }
    }
}

async fn first_join(endpoint: &Endpoint, source: Option<std::net::IpAddr>, room: String) -> anyhow::Result<Position> {
    let mut ws = endpoint.connect(source).await?;
    ws.send(Message::text(format!(r#"{{"op":"join","room":"{room}","id":1}}"#)))
        .await?;
    let ack = ack_of(&mut ws).await?;
    let epoch = ack["epoch"]
        .as_str()
        .ok_or_else(|| anyhow!("join ack without epoch (history off?): {ack}"))?;
    let seq = ack["seq"].as_u64().context("join ack without seq")?;
    let _ = ws.close(None).await;
    Ok(Position {
        epoch: epoch.to_owned(),
        seq,
        room,
    })
}

/// Rejoins with `since`; true when recovered and every one of `missed` messages arrived.
async fn rejoin(
    endpoint: &Endpoint,
    source: Option<std::net::IpAddr>,
    p: &Position,
    missed: u64,
) -> anyhow::Result<bool> {
    let mut ws = endpoint.connect(source).await?;
    let join = format!(
        r#"{{"op":"join","room":"{}","id":1,"since":{{"seq":{},"epoch":"{}"}}}}"#,
        p.room, p.seq, p.epoch
    );
    ws.send(Message::text(join)).await?;
    let ack = ack_of(&mut ws).await?;
    if ack["recovered"] != Value::Bool(true) {
        return Ok(false);
    }
    let mut got = 0;
    while got < missed {
        let data = next_data(&mut ws).await?;
        if data.starts_with(br#"{"op":"message""#) {
            got += 1;
        }
    }
    // Held open until the end of the storm would cost file descriptors only; the measure is done.
    let _ = ws.close(None).await;
    Ok(true)
}

/// Publishes `n` messages to each room over a plain NATS connection, then waits for the server's PONG.
async fn publish_missed(nats_url: &str, rooms: usize, n: u64) -> anyhow::Result<()> {
    let addr = nats_url.trim_start_matches("nats://");
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    let (r, mut w) = tcp.into_split();
    let mut lines = BufReader::new(r).lines();
    lines.next_line().await?; // INFO
    w.write_all(b"CONNECT {\"verbose\":false}\r\n").await?;
    let mut buf = Vec::with_capacity(1 << 20);
    for i in 0..n {
        for room in 0..rooms {
            let payload = format!(r#"{{"n":{i}}}"#);
            buf.extend_from_slice(format!("PUB rooms.r{room} {}\r\n{payload}\r\n", payload.len()).as_bytes());
        }
        if buf.len() > 512 * 1024 {
            w.write_all(&buf).await?;
            buf.clear();
        }
    }
    buf.extend_from_slice(b"PING\r\n");
    w.write_all(&buf).await?;
    while let Some(line) = lines.next_line().await? {
        if line.starts_with("PONG") {
            return Ok(());
        }
    }
    bail!("NATS closed before PONG")
}

/// `roomwire_history_requests` from the gateway's `/metrics` (plain HTTP on the WebSocket listener).
async fn history_requests(endpoint: &Endpoint) -> Option<f64> {
    let mut tcp = TcpStream::connect(endpoint.addr).await.ok()?;
    tcp.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut tcp, &mut body)
        .await
        .ok()?;
    body.lines()
        .find(|l| l.starts_with("roomwire_history_requests "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    proc_field(&status, "VmHWM:")
}

pub(super) async fn run(args: &Args) -> anyhow::Result<()> {
    let url = args.url.split(',').next().unwrap_or_default();
    let endpoint = Arc::new(Endpoint::parse(url).await?);
    if endpoint.tls.is_some() {
        bail!("the recover scenario reads /metrics over plain HTTP: use a ws:// gateway");
    }
    let nats_url = args.pub_url.clone().unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let source = |i: usize| Some(args.sources[i % args.sources.len()]);
    let limit = Arc::new(Semaphore::new(args.concurrency.max(1)));

    // 1. Everyone joins once and notes where the room was.
    let mut joins = Vec::new();
    for i in 0..args.conns {
        let (endpoint, limit, src) = (endpoint.clone(), limit.clone(), source(i));
        let room = format!("r{}", i % args.rooms.max(1));
        joins.push(tokio::spawn(async move {
            let _permit = limit.acquire_owned().await?;
            tokio::time::timeout(Duration::from_secs(30), first_join(&endpoint, src, room))
                .await
                .unwrap_or_else(|_| Err(anyhow!("first join timed out")))
        }));
    }
    let (mut positions, mut errors, mut first_error) = (Vec::new(), 0u64, None);
    for j in joins {
        match j.await? {
            Ok(p) => positions.push(p),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(format!("{e:#}"));
            }
        }
    }
    let joined = positions.len() as u64;
    eprintln!("roomwire-bench: {joined} joined; publishing {} per room", args.missed);

    // 2. While they are away, each room gets `missed` messages.
    publish_missed(&nats_url, args.rooms.max(1), args.missed).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 3. The storm: everyone rejoins at once with `since`.
    let pid = args.server_pid.first().copied();
    if let Some(pid) = pid {
        // Resets VmHWM to the current RSS, so the peak is the storm's.
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    }
    let rss_before = pid.and_then(super::rss_kib);
    let requests_before = history_requests(&endpoint).await;
    let (recovered, not_recovered) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let started = Instant::now();
    let storm = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut tasks = Vec::new();
    for (i, p) in positions.into_iter().enumerate() {
        let (endpoint, storm, src, missed) = (endpoint.clone(), storm.clone(), source(i), args.missed);
        let (recovered, not_recovered) = (recovered.clone(), not_recovered.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = storm.acquire_owned().await?;
            let ok = tokio::time::timeout(Duration::from_secs(60), rejoin(&endpoint, src, &p, missed))
                .await
                .unwrap_or_else(|_| Err(anyhow!("rejoin timed out")))?;
            if ok { &recovered } else { &not_recovered }.fetch_add(1, Relaxed);
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        if let Err(e) = t.await? {
            errors += 1;
            first_error.get_or_insert(format!("{e:#}"));
        }
    }
    let storm_secs = started.elapsed().as_secs_f64();
    let requests_after = history_requests(&endpoint).await;
    let recovered = recovered.load(Relaxed);
    print_line(&Report {
        scenario: "recover",
        label: args.label.clone(),
        conns: args.conns,
        rooms: args.rooms,
        missed_per_room: args.missed,
        joined,
        recovered,
        not_recovered: not_recovered.load(Relaxed),
        errors,
        first_error,
        storm_secs,
        peak_rss_kib: pid.and_then(peak_rss_kib),
        rss_before_kib: rss_before,
        jetstream_requests_per_client: requests_before
            .zip(requests_after)
            .map(|(b, a)| (a - b) / (recovered.max(1) as f64)),
    })
}
