//! `--scenario rpc`: browser RPC through the gateway against the same NATS request made directly (issue 25). A
//! responder must already serve `--method` (scripts/bench-rpc starts examples/rpc_service.rs). Two phases of the same
//! shape, one after the other so they never share the cores: `--conns` closed-loop callers, each with one call in
//! flight (send, wait for the answer, send again), for `--warmup` then `--duration` seconds:
//!
//! - `gateway`: each caller is its own WebSocket connection sending `{"op":"rpc",..}` and reading `rpc_result`;
//! - `direct`: the callers share one async-nats client (as the gateway's calls share its one NATS connection) and
//!   each sends `client.request("<prefix>.<method>")`.
//!
//! Reports calls per second, p50/p90/p99/max round trip of each phase, and the differences (what the gateway adds:
//! the WebSocket hop, the JSON, the checks and the gateway's own NATS request). One JSON line, like the other scenarios.

use std::{
    cell::RefCell,
    rc::Rc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use futures_util::SinkExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;

use super::{Args, Endpoint, Ws, new_histogram, next_data, print_line};

#[derive(Serialize)]
struct Phase {
    calls: u64,
    errors: u64,
    first_error: Option<String>,
    calls_per_sec: f64,
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
    max_us: u64,
}

#[derive(Serialize)]
struct Report {
    scenario: &'static str,
    label: Option<String>,
    method: String,
    callers: usize,
    secs: f64,
    gateway: Phase,
    direct: Phase,
    /// gateway p50 − direct p50, and the same at p99: the latency the gateway adds.
    added_p50_us: i64,
    added_p99_us: i64,
}

/// What the callers of one phase record: latencies (µs) of the calls that ended inside the measured window.
struct Tally {
    hist: Histogram<u64>,
    calls: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn new() -> Self {
        Tally {
            hist: new_histogram(),
            calls: 0,
            errors: 0,
            first_error: None,
        }
    }

    fn phase(&self, secs: f64) -> Phase {
        let q = |p: f64| self.hist.value_at_quantile(p);
        Phase {
            calls: self.calls,
            errors: self.errors,
            first_error: self.first_error.clone(),
            calls_per_sec: self.calls as f64 / secs,
            p50_us: q(0.5),
            p90_us: q(0.9),
            p99_us: q(0.99),
            max_us: self.hist.max(),
        }
    }
}

/// The window calls are counted in: from `start` (after the warm-up) to `end`.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

impl Window {
    /// Records one call that was sent at `sent` and answered (`Ok`) or failed now.
    fn record(self, tally: &RefCell<Tally>, sent: Instant, outcome: Result<(), String>) {
        let now = Instant::now();
        if sent < self.start || now > self.end {
            return;
        }
        let mut t = tally.borrow_mut();
        match outcome {
            Ok(()) => {
                t.calls += 1;
                let us = now.duration_since(sent).as_micros() as u64;
                t.hist.saturating_record(us.max(1));
            }
            Err(e) => {
                t.errors += 1;
                t.first_error.get_or_insert(e);
            }
        }
    }
}

/// One caller over its own WebSocket: calls `method` until the window ends.
async fn gateway_caller(mut ws: Ws, method: String, window: Window, tally: Rc<RefCell<Tally>>) -> anyhow::Result<()> {
    let mut id: u64 = 0;
    while Instant::now() < window.end {
        id += 1;
        let frame = format!(r#"{{"op":"rpc","id":{id},"method":"{method}","data":null}}"#);
        let sent = Instant::now();
        ws.send(Message::text(frame)).await?;
        let want = format!(r#""id":{id}"#);
        let outcome = loop {
            let data = next_data(&mut ws).await?;
            let text = std::str::from_utf8(&data).unwrap_or("");
            if !text.contains(&want) {
                continue; // not this call's answer (nothing else is expected, but be strict)
            }
            break if text.starts_with(r#"{"op":"rpc_result""#) && !text.contains(r#""error":"#) {
                Ok(())
            } else {
                Err(text.chars().take(200).collect())
            };
        };
        window.record(&tally, sent, outcome);
    }
    let _ = ws.close(None).await;
    Ok(())
}

/// One caller on the shared NATS client: requests the subject until the window ends.
async fn direct_caller(nc: async_nats::Client, subject: String, window: Window, tally: Rc<RefCell<Tally>>) {
    while Instant::now() < window.end {
        let sent = Instant::now();
        let outcome = match nc.request(subject.clone(), "null".into()).await {
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        };
        window.record(&tally, sent, outcome);
    }
}

pub async fn run(args: &Args) -> anyhow::Result<()> {
    let method = args.method.clone();
    if method.is_empty() {
        bail!("--method is empty");
    }
    let endpoint = Endpoint::parse(&args.url).await?;
    let nats_url = args.pub_url.clone().unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let subject = format!("{}.{method}", args.rpc_prefix);
    let warmup = Duration::from_secs_f64(args.warmup);
    let measured = Duration::from_secs_f64(args.duration);

    // Gateway phase: connect every caller first (and read its welcome), then start the clock.
    let mut sockets = Vec::with_capacity(args.conns);
    for _ in 0..args.conns {
        let mut ws = endpoint.connect(args.sources.first().copied()).await?;
        let welcome = next_data(&mut ws).await?;
        if !welcome.starts_with(br#"{"op":"welcome""#) {
            bail!("expected welcome, got {}", String::from_utf8_lossy(&welcome));
        }
        sockets.push(ws);
    }
    let start = Instant::now() + warmup;
    let window = Window {
        start,
        end: start + measured,
    };
    let tally = Rc::new(RefCell::new(Tally::new()));
    let local = tokio::task::LocalSet::new();
    let callers: Vec<_> = sockets
        .into_iter()
        .map(|ws| local.spawn_local(gateway_caller(ws, method.clone(), window, tally.clone())))
        .collect();
    local
        .run_until(async {
            for c in callers {
                c.await.context("caller panicked")??;
            }
            anyhow::Ok(())
        })
        .await?;
    let gateway = tally.borrow().phase(measured.as_secs_f64());

    // Direct phase: the same callers on one NATS client.
    let nc = async_nats::connect(&nats_url)
        .await
        .with_context(|| format!("connecting to {nats_url}"))?;
    nc.request(subject.clone(), "null".into())
        .await
        .with_context(|| format!("nobody answers {subject}"))?;
    let start = Instant::now() + warmup;
    let window = Window {
        start,
        end: start + measured,
    };
    let tally = Rc::new(RefCell::new(Tally::new()));
    let local = tokio::task::LocalSet::new();
    let callers: Vec<_> = (0..args.conns)
        .map(|_| local.spawn_local(direct_caller(nc.clone(), subject.clone(), window, tally.clone())))
        .collect();
    local
        .run_until(async {
            for c in callers {
                c.await.context("caller panicked")?;
            }
            anyhow::Ok(())
        })
        .await?;
    let direct = tally.borrow().phase(measured.as_secs_f64());

    print_line(&Report {
        scenario: "rpc",
        label: args.label.clone(),
        method,
        callers: args.conns,
        secs: measured.as_secs_f64(),
        added_p50_us: gateway.p50_us as i64 - direct.p50_us as i64,
        added_p99_us: gateway.p99_us as i64 - direct.p99_us as i64,
        gateway,
        direct,
    })
}
