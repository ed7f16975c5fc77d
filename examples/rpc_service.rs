//! The demo's RPC backend: a NATS service on async-nats's service API (ADR-32: `$SRV.PING`/`INFO`/`STATS` come with
//! it, and `nats micro ls` lists it) answering `demo.roll` and `demo.time`, which browsers call with `rw.rpc(..)`
//! through the gateway (docs/rpc.md). It never talks to the gateway: method `M` is a NATS request on `rpc.M`
//! (`[rpc] subject_prefix` in config/gateway.toml), and the shipped config lets anonymous clients call `demo.*`.
//!
//! - `demo.roll`, data `"2d6"` (or `{"dice":"2d6"}`; `NdM`, optionally `+K`/`-K`): `{"dice","rolls","modifier",
//!   "total","by"}`; a malformed spec is an ADR-32 error answer (code 400), which the browser sees as a rejection
//!   with that code and message.
//! - `demo.time`: `{"unix_ms":..}`, the service's clock.
//!
//! Run: `cargo run --example rpc_service -- [nats://127.0.0.1:4222]` (scripts/dev starts it). Several copies share
//! the load: the service API subscribes in a queue group.

use std::time::SystemTime;

use anyhow::Context;
use async_nats::service::{ServiceExt, error::Error as ServiceError};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};

/// The gateway's `[rpc] subject_prefix` in config/gateway.toml.
const PREFIX: &str = "rpc";
/// The methods' first token: `[auth.anonymous] rpc = ["demo.*"]` in config/gateway.toml.
const GROUP: &str = "demo";
/// At most this many dice, of at most this many sides, and a modifier of at most this size: the answer stays small
/// whatever a caller asks.
const MAX_DICE: u32 = 20;
const MAX_SIDES: u32 = 1000;
const MAX_MODIFIER: i64 = 1000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let nc = async_nats::ConnectOptions::new()
        .name("roomwire-rpc-service")
        .retry_on_initial_connect()
        .connect(&url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let service = nc
        .service_builder()
        .description("Roomwire demo: dice and clock")
        .start("roomwire-demo", "1.0.0")
        .await
        .map_err(|e| anyhow::anyhow!("starting the service: {e}"))?;
    let group = service.group(format!("{PREFIX}.{GROUP}"));
    let endpoint = |name: &'static str| {
        let group = &group;
        async move {
            group
                .endpoint(name)
                .await
                .map_err(|e| anyhow::anyhow!("adding endpoint {name}: {e}"))
        }
    };
    let mut roll_requests = endpoint("roll").await?;
    let mut time_requests = endpoint("time").await?;
    println!("rpc service on {url}: {PREFIX}.{GROUP}.roll and {PREFIX}.{GROUP}.time");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (request, answer) = tokio::select! {
            Some(r) = roll_requests.next() => {
                let answer = roll(&r.message.payload, caller(&r.message));
                (r, answer)
            }
            Some(r) = time_requests.next() => (r, Ok(json!({ "unix_ms": now_ms() }))),
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            else => break,
        };
        let answer = answer.map(|v| Bytes::from(v.to_string()));
        // A caller gone (timed out, closed its tab) is no reason to stop serving the others.
        if let Err(e) = request.respond(answer).await {
            eprintln!("answer not sent: {e}");
        }
    }
    // Unsubscribes the endpoints: calls made from now on are answered `no_responders` at once, not `timeout`.
    let _ = service.stop().await;
    let _ = nc.flush().await;
    Ok(())
}

/// Who called, from the headers the gateway stamps (`Roomwire-User` when authenticated, else the connection id).
/// Clients cannot set these: the gateway sends only its own headers.
fn caller(message: &async_nats::Message) -> Option<String> {
    let headers = message.headers.as_ref()?;
    headers
        .get("Roomwire-User")
        .or_else(|| headers.get("Roomwire-Conn"))
        .map(|v| v.as_str().to_owned())
}

/// `demo.roll`: the payload is the compact JSON of the browser's `data`.
fn roll(payload: &[u8], by: Option<String>) -> Result<Value, ServiceError> {
    let data: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
    let spec = match &data {
        Value::String(s) => Some(s.as_str()),
        Value::Object(o) => o.get("dice").and_then(Value::as_str),
        _ => None,
    };
    let dice = spec.and_then(parse_dice).ok_or_else(|| ServiceError {
        code: 400,
        status: format!("dice as NdM or NdM+K: 1-{MAX_DICE} dice of 2-{MAX_SIDES} sides, e.g. 2d6"),
    })?;
    let rolls: Vec<u32> = (0..dice.count).map(|_| rand::random_range(1..=dice.sides)).collect();
    let total = rolls.iter().map(|&r| i64::from(r)).sum::<i64>() + dice.modifier;
    Ok(json!({
        "dice": dice.to_string(),
        "rolls": rolls,
        "modifier": dice.modifier,
        "total": total,
        "by": by,
    }))
}

/// A parsed `NdM+K`.
#[derive(Debug, PartialEq, Eq)]
struct Dice {
    count: u32,
    sides: u32,
    modifier: i64,
}

impl std::fmt::Display for Dice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}d{}", self.count, self.sides)?;
        if self.modifier != 0 {
            write!(f, "{:+}", self.modifier)?;
        }
        Ok(())
    }
}

/// `NdM`, `dM` (one die), `NdM+K`, `NdM-K`; within the bounds above, else `None`.
fn parse_dice(spec: &str) -> Option<Dice> {
    let spec = spec.trim().to_ascii_lowercase();
    let (count, rest) = spec.split_once('d')?;
    let count: u32 = if count.is_empty() { 1 } else { count.parse().ok()? };
    let (sides, modifier) = match rest.find(['+', '-']) {
        Some(at) => (&rest[..at], rest[at..].parse::<i64>().ok()?),
        None => (rest, 0),
    };
    let sides: u32 = sides.parse().ok()?;
    let ok = (1..=MAX_DICE).contains(&count) && (2..=MAX_SIDES).contains(&sides) && modifier.abs() <= MAX_MODIFIER;
    ok.then_some(Dice { count, sides, modifier })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dice_specs() {
        let d = |count, sides, modifier| Some(Dice { count, sides, modifier });
        assert_eq!(parse_dice("2d6"), d(2, 6, 0));
        assert_eq!(parse_dice(" D20 "), d(1, 20, 0));
        assert_eq!(parse_dice("3d8+2"), d(3, 8, 2));
        assert_eq!(parse_dice("1d4-1"), d(1, 4, -1));
        for bad in [
            "", "d", "2d", "0d6", "21d6", "2d1", "2d1001", "2d6+", "2d6+1001", "2x6", "-1d6", "2d6d6", "2d+6",
        ] {
            assert_eq!(parse_dice(bad), None, "{bad:?}");
        }
        assert_eq!(parse_dice("3d8+2").unwrap().to_string(), "3d8+2");
        assert_eq!(parse_dice("1d4-1").unwrap().to_string(), "1d4-1");
    }

    #[test]
    fn rolls_stay_in_range_and_bad_specs_are_400() {
        for _ in 0..100 {
            let v = roll(br#"{"dice":"2d6+1"}"#, Some("alice".into())).unwrap();
            let total = v["total"].as_i64().unwrap();
            assert!((3..=13).contains(&total), "{v}");
            assert_eq!(v["rolls"].as_array().unwrap().len(), 2);
            assert_eq!(v["by"], "alice");
        }
        assert_eq!(roll(br#""d20""#, None).unwrap()["dice"], "1d20");
        let e = roll(b"42", None).unwrap_err();
        assert_eq!(e.code, 400);
        assert!(roll(b"not json", None).is_err());
    }
}
