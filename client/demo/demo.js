// Roomwire demo chat: plain DOM on top of /client/roomwire.js. Served at / when `[server] demo = true`.
// Query parameters: name=<display name>, room=<first room>, token=<JWT>, ws=<WebSocket path, default /ws>.
// Every text from the network goes through textContent, never innerHTML (and the page's CSP forbids inline code).
import { connect } from "/client/roomwire.js";

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

let name = params.get("name") || localStorage.getItem("roomwire-name") || `guest-${Math.floor(Math.random() * 9000 + 1000)}`;
$("name").value = name;
$("name-form").addEventListener("submit", (e) => {
  e.preventDefault();
  name = $("name").value.trim().slice(0, 32) || name;
  localStorage.setItem("roomwire-name", name);
});
$("name").addEventListener("change", () => $("name-form").requestSubmit());

const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${params.get("ws") || "/ws"}`;
const rw = connect(wsUrl, params.get("token") ? { token: params.get("token") } : {});
window.roomwireDemo = { rw }; // for the browser tests and the curious

/**
 * room -> { log: <li>[], seen: Set<seq>, unread, item: <li> in the room list, members: Map<conn, user> (presence),
 * count and truncated (a room over presence.max_members: counts only), loading: presence events received while a
 * `presence` request is on its way (applied again on top of its answer), or null }
 */
const rooms = new Map();
const names = new Map(); // conn id -> display name, learned from messages (`from`)
const joinLines = new Map(); // conn id -> the "joined" line, renamed once the name is known
let active = null;
let reconnectedAt = 0;

function status(state, info) {
  const s = $("status");
  s.className = `status ${state}`;
  s.dataset.state = state;
  let text = state;
  if (state === "reconnecting" && info.delay !== undefined) text = `reconnecting in ${(info.delay / 1000).toFixed(1)} s`;
  if (state === "closed") text = `disconnected: ${info.reason || "closed"}`;
  $("status-text").textContent = text;
}
let wasOpen = false;
rw.on("state", (state, info) => {
  status(state, info);
  if (state === "open" && wasOpen) {
    reconnectedAt = Date.now();
    for (const room of rooms.keys()) notice(room, "reconnected: messages sent meanwhile are marked “recovered”");
  }
  if (state === "open") wasOpen = true;
  if (state === "closed") for (const room of rooms.keys()) notice(room, `disconnected: ${info.reason}`);
});

function show(room) {
  active = room;
  const r = rooms.get(room);
  r.unread = 0;
  for (const [n, x] of rooms) {
    x.item.classList.toggle("active", n === room);
    x.item.querySelector(".badge").textContent = x.unread ? String(x.unread) : "";
  }
  $("log").replaceChildren(...r.log);
  $("log").scrollTop = $("log").scrollHeight;
  $("text").placeholder = `Message #${room}`;
  renderMembers();
}

// ---- who is in the room: the `presence` answer after every (re)join, then `presence` events ----

function renderMembers() {
  const r = active && rooms.get(active);
  const items = [];
  if (r && r.truncated) items.push(el("li", "count", `${r.count} connections`));
  else if (r) {
    for (const [conn, user] of r.members) {
      const li = el("li", rw.isOwn(conn) ? "me" : "", who(conn, user));
      li.dataset.conn = conn;
      items.push(li);
    }
    items.sort((a, b) => a.textContent.localeCompare(b.textContent));
  }
  $("members").replaceChildren(...items);
  $("member-count").textContent = r && (r.truncated || r.members.size) ? `(${r.truncated ? r.count : r.members.size})` : "";
}

function applyPresence(r, e) {
  if (e.type === "joined") r.members.set(e.conn, e.user);
  else r.members.delete(e.conn);
}

async function loadPresence(room) {
  const r = rooms.get(room);
  if (!r) return;
  const loading = [];
  r.loading = loading;
  try {
    const p = await rw.presence(room);
    if (r.loading !== loading) return; // a newer load is on its way
    r.count = p.count;
    r.truncated = !!p.truncated;
    r.members = new Map((p.members || []).map((m) => [m.conn, m.user]));
    // Events that came while asking: replayed in order, they give the same result whether or not the answer counted them.
    for (const e of loading) applyPresence(r, e);
  } catch {
    // presence off for this room, or the connection dropped (the rejoin's `joined` loads again)
  } finally {
    if (r.loading === loading) r.loading = null;
  }
  if (room === active) renderMembers();
}

const hello = (room) => rw.publish(room, { type: "hello", name, ts: Date.now() }).catch(() => {});
// After the first join and every rejoin: say who we are (a reconnect is a new conn) and reload the member list.
rw.on("joined", (room) => {
  hello(room);
  loadPresence(room);
});
rw.on("presence", (e) => {
  const r = rooms.get(e.room);
  if (!r) return;
  r.loading?.push(e);
  applyPresence(r, e);
  // Names travel in `hello` messages: greet newcomers so they can name everyone already here.
  if (e.type === "joined" && !rw.isOwn(e.conn)) hello(e.room);
  if (e.room === active) renderMembers();
});

function append(room, li) {
  const r = rooms.get(room);
  if (!r) return;
  r.log.push(li);
  if (r.log.length > 500) r.log.shift().remove();
  if (room === active) {
    $("log").append(li);
    $("log").scrollTop = $("log").scrollHeight;
  } else {
    r.unread++;
    r.item.querySelector(".badge").textContent = String(r.unread);
  }
}

function notice(room, text) {
  append(room, el("li", "notice", text));
}

function who(conn, user) {
  if (rw.isOwn(conn)) return `${name} (you)`;
  return names.get(conn) || user || `guest ${conn ? conn.split("-").pop() : "?"}`;
}

function render(room, { data, from, seq }, recovered) {
  const r = rooms.get(room);
  if (!r) return;
  if (seq !== undefined) {
    if (r.seen.has(seq)) return; // the history preload and a live message may overlap
    r.seen.add(seq);
    if (r.seen.size > 1000) r.seen.delete(r.seen.values().next().value); // bounded, like the log
  }
  if (data && typeof data === "object" && data.bot && data.type === "event") {
    const conn = data.conn;
    const verb = data.event === "join" ? "joined" : "left";
    const li = el("li", "event", `→ ${who(conn, data.user)} ${verb}`);
    if (data.event === "join" && !names.has(conn) && !rw.isOwn(conn)) joinLines.set(conn, li);
    return append(room, li);
  }
  if (data && typeof data === "object" && data.type === "hello") {
    if (from) names.set(from, String(data.name));
    const line = joinLines.get(from);
    if (line) {
      line.textContent = `→ ${data.name} joined`;
      joinLines.delete(from);
    }
    if (room === active) renderMembers();
    return undefined;
  }
  const text = data && typeof data === "object" ? (data.text ?? JSON.stringify(data)) : String(data);
  const sender = data && typeof data === "object" && data.name ? String(data.name) : from ? who(from) : "backend";
  if (from && data && data.name) names.set(from, String(data.name));
  const mine = rw.isOwn(from);
  const bot = !!(data && data.bot);
  const li = el("li", `${mine ? "mine" : ""} ${bot ? "bot" : ""}`);
  li.dataset.text = text;
  if (seq !== undefined) li.dataset.seq = String(seq);
  const wasRecovered = recovered || (reconnectedAt && data && data.ts && data.ts < reconnectedAt);
  if (wasRecovered) {
    li.classList.add("recovered");
    li.title = "recovered after a reconnect";
  }
  const head = el("span", "who", sender);
  if (bot) head.append(el("em", "tag", "bot"));
  if (wasRecovered) head.append(el("em", "tag", "recovered"));
  li.append(head, el("span", "", text));
  append(room, li);
}

rw.on("message", (m) => render(m.room, m, false));
rw.on("gap", ({ room, dropped }) => notice(room, `${dropped} messages lost (this tab read too slowly)`));
rw.on("resync", async (room) => {
  notice(room, "could not recover everything missed: showing the latest");
  loadHistory(room);
});
rw.on("left", ({ room, reason }) => {
  notice(room, `removed from #${room}: ${reason}`);
  const r = rooms.get(room);
  if (r) r.members.clear();
  if (room === active) renderMembers();
});
rw.on("error", (e) => active && notice(active, `error: ${e.code} ${e.message}`));

async function loadHistory(room) {
  try {
    const h = await rw.history(room, 30);
    for (const m of h.messages) render(room, m, false);
  } catch {
    // rooms without history answer an error: nothing to show
  }
}

async function join(room) {
  if (!rooms.has(room)) {
    const item = el("li", "", `#${room}`);
    item.append(el("span", "badge"));
    item.addEventListener("click", () => show(room));
    $("rooms").append(item);
    rooms.set(room, { log: [], seen: new Set(), unread: 0, item, members: new Map(), count: 0, truncated: false, loading: null });
  }
  show(room);
  try {
    const ack = await rw.join(room);
    if (ack.epoch !== undefined) await loadHistory(room);
  } catch (e) {
    notice(room, `could not join: ${e.code || ""} ${e.message}`);
  }
}

$("room-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const room = $("room").value.trim();
  if (room) join(room);
  $("room").value = "";
});

/**
 * `/roll 2d6`: an RPC to `demo.roll` (examples/rpc_service.rs, through the gateway's `rpc` op; docs/rpc.md). The
 * answer is said in the room for everyone to see; a refusal is shown to the caller only. (A real game would let the
 * service publish the result into the room itself, so that no client could forge a roll.)
 */
async function roll(room, spec) {
  try {
    const r = await rw.rpc("demo.roll", spec || "1d6", { timeoutMs: 3000 });
    const mod = r.modifier ? ` ${r.modifier > 0 ? "+" : "-"} ${Math.abs(r.modifier)}` : "";
    const text = `🎲 rolled ${r.dice}: ${r.rolls.join(" + ")}${mod} = ${r.total}`;
    await rw.publish(room, { name, text, roll: r, ts: Date.now() }, { echo: true });
  } catch (err) {
    notice(room, `/roll failed: ${err.code} ${err.message}`);
  }
}

/** `/time`: the service's clock, shown to the caller. */
async function time(room) {
  try {
    const t = await rw.rpc("demo.time", null, { timeoutMs: 3000 });
    notice(room, `service time: ${new Date(t.unix_ms).toISOString()}`);
  } catch (err) {
    notice(room, `/time failed: ${err.code} ${err.message}`);
  }
}

$("send-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("text").value.trim();
  if (!text || !active) return;
  $("text").value = "";
  const room = active;
  const [cmd, arg] = text.split(/\s+/, 2);
  if (cmd === "/roll") return void roll(room, arg);
  if (cmd === "/time") return void time(room);
  rw.publish(room, { name, text, ts: Date.now() }, { echo: true }).catch((err) =>
    notice(room, `not sent: ${err.code} ${err.message}`),
  );
});

join(params.get("room") || "lobby");
