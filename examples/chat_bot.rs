//! A backend that lives only on NATS, for the demo chat: it answers `!help`, `!time`, `!echo <text>`, `!rooms` and
//! `!kick <name>` said in any room, and relays the gateway's join/leave lifecycle events into the room they concern, so browsers see
//! who comes and goes. It never talks to the gateway: a room `R` is the subject `rooms.R`, events arrive on
//! `roomwire.events.join` / `.leave` (docs/protocol.md, "What backends see" and "Lifecycle events").
//!
//! `!kick <name>` disconnects whoever last spoke under that name, through the control subject
//! (`roomwire.control.disconnect`, docs/protocol.md "Control over NATS"): the bot learns each name's connection from
//! the `Roomwire-Conn` header of its messages. The demo trusts everyone; a real backend would check who asks.
//!
//! Run: `cargo run --example chat_bot -- [nats://127.0.0.1:4222]` (scripts/dev starts it). Its own messages carry
//! `"bot": true`, and it ignores every message that does, so it never answers itself.

use std::{
    collections::{BTreeSet, HashMap},
    time::SystemTime,
};

use anyhow::Context;
use futures_util::StreamExt;
use serde_json::{Value, json};

/// Subject prefix of rooms and of lifecycle events: the gateway's defaults (`rooms.subject_prefix`,
/// `nats.events_prefix`).
const ROOMS: &str = "rooms";
const EVENTS: &str = "roomwire.events";
/// Subject prefix of backend commands (`nats.control_prefix`).
const CONTROL: &str = "roomwire.control";
/// Rooms remembered for `!rooms`; bounded so a flood of room names cannot grow the bot.
const MAX_ROOMS: usize = 1000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let nc = async_nats::ConnectOptions::new()
        .name("roomwire-chat-bot")
        .retry_on_initial_connect()
        .connect(&url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let mut said = nc.subscribe(format!("{ROOMS}.*")).await?;
    let mut events = nc.subscribe(format!("{EVENTS}.*")).await?;
    println!("chat bot on {url}: listening to {ROOMS}.* and {EVENTS}.*");
    let mut rooms = BTreeSet::new();
    // Display name -> the connection that last spoke under it (for `!kick`); bounded like `rooms`.
    let mut speakers: HashMap<String, String> = HashMap::new();
    loop {
        tokio::select! {
            Some(msg) = said.next() => {
                let Some(room) = msg.subject.strip_prefix(&format!("{ROOMS}.")).map(str::to_owned) else { continue };
                if rooms.len() < MAX_ROOMS {
                    rooms.insert(room.clone());
                }
                let Ok(data) = serde_json::from_slice::<Value>(&msg.payload) else { continue };
                let conn = msg.headers.as_ref().and_then(|h| h.get("Roomwire-Conn")).map(|v| v.as_str().to_owned());
                if let (Some(name), Some(conn)) = (data.get("name").and_then(Value::as_str), conn)
                    && (speakers.len() < MAX_ROOMS || speakers.contains_key(name))
                {
                    speakers.insert(name.to_owned(), conn);
                }
                if let Some(reply) = kick(&nc, &data, &speakers).await {
                    say(&nc, &room, json!({"bot": true, "name": "bot", "text": reply, "ts": now_ms()})).await;
                } else if let Some(reply) = answer(&data, &rooms) {
                    say(&nc, &room, json!({"bot": true, "name": "bot", "text": reply, "ts": now_ms()})).await;
                }
            }
            Some(msg) = events.next() => {
                let Ok(event) = serde_json::from_slice::<Value>(&msg.payload) else { continue };
                if let Some((room, relay)) = relay(&event) {
                    say(&nc, &room, relay).await;
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            else => break,
        }
    }
    Ok(())
}

/// The bot's answer to a chat message, if it is a command (and not the bot's own message).
fn answer(data: &Value, rooms: &BTreeSet<String>) -> Option<String> {
    if data.get("bot").and_then(Value::as_bool) == Some(true) {
        return None;
    }
    let text = data.get("text")?.as_str()?.trim();
    let who = data.get("name").and_then(Value::as_str).unwrap_or("you");
    let (cmd, rest) = text.split_once(' ').unwrap_or((text, ""));
    match cmd {
        "!help" => {
            Some("I answer !time, !echo <text>, !rooms and !kick <name>, and announce who joins and leaves.".into())
        }
        "!time" => Some(format!("{who}, it is {} UTC here.", utc(now_ms() / 1000))),
        // Truncated: a command must not make the bot publish more than it was sent.
        "!echo" => Some(rest.chars().take(500).collect()),
        "!rooms" => Some(format!(
            "rooms I have heard from: {}",
            rooms.iter().take(20).cloned().collect::<Vec<_>>().join(", ")
        )),
        _ => None,
    }
}

/// `!kick <name>`: disconnects the connection that last spoke as `name` (close 4003, which the client library does
/// not retry). Returns what to say in the room, or `None` for any other message.
async fn kick(nc: &async_nats::Client, data: &Value, speakers: &HashMap<String, String>) -> Option<String> {
    if data.get("bot").and_then(Value::as_bool) == Some(true) {
        return None;
    }
    let text = data.get("text")?.as_str()?.trim();
    let target = text.strip_prefix("!kick ")?.trim();
    let who = data.get("name").and_then(Value::as_str).unwrap_or("someone");
    let Some(conn) = speakers.get(target) else {
        return Some(format!("I have not heard anyone called {target:?}."));
    };
    // At most 123 bytes of close reason, without control characters: the name is cut short and cleaned.
    let mut reason = String::from("kicked by ");
    for c in who.chars().filter(|c| !c.is_control()) {
        if reason.len() + c.len_utf8() > 123 {
            break;
        }
        reason.push(c);
    }
    let command = json!({"conn": conn, "reason": reason});
    if let Err(e) = nc
        .publish(format!("{CONTROL}.disconnect"), command.to_string().into())
        .await
    {
        return Some(format!("could not kick: {e}"));
    }
    Some(format!("{who} kicked {target}."))
}

/// A join/leave lifecycle event turned into a message for its room: `(room, message)`.
fn relay(event: &Value) -> Option<(String, Value)> {
    let kind = event.get("event")?.as_str()?;
    if kind != "join" && kind != "leave" {
        return None;
    }
    let room = event.get("room")?.as_str()?.to_owned();
    let message = json!({
        "bot": true,
        "type": "event",
        "event": kind,
        "conn": event.get("conn"),
        "user": event.get("user"),
        "room": room,
        "ts": now_ms(),
    });
    Some((room, message))
}

async fn say(nc: &async_nats::Client, room: &str, data: Value) {
    if let Err(e) = nc.publish(format!("{ROOMS}.{room}"), data.to_string().into()).await {
        eprintln!("publish to {room} failed: {e}");
    }
}

/// `YYYY-MM-DD HH:MM:SS` of a Unix time (civil-from-days, H. Hinnant), to keep the example free of a date crate.
fn utc(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
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
    fn answers_commands_not_itself() {
        let rooms = BTreeSet::from(["lobby".to_string()]);
        assert!(answer(&json!({"text": "!help"}), &rooms).is_some());
        assert_eq!(
            answer(&json!({"text": "!echo hi there"}), &rooms).as_deref(),
            Some("hi there")
        );
        assert!(answer(&json!({"text": "!help", "bot": true}), &rooms).is_none());
        assert!(answer(&json!({"text": "hello"}), &rooms).is_none());
        assert!(answer(&json!("!help"), &rooms).is_none());
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20");
    }

    #[test]
    fn relays_join_and_leave_only() {
        let join = json!({"event":"join","conn":"gw1-7","gateway":"gw1","user":null,"room":"lobby","time_ms":1});
        let (room, msg) = relay(&join).expect("join relayed");
        assert_eq!(room, "lobby");
        assert_eq!(msg["event"], "join");
        assert_eq!(msg["conn"], "gw1-7");
        assert!(relay(&json!({"event":"connect","conn":"gw1-7","room":null})).is_none());
    }
}
