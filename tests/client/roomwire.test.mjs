// Unit tests of the browser client's pure logic (backoff, offline queue, dedup) and of its reconnect bookkeeping
// over an in-memory socket. Run: node --test tests/client/ (scripts/browser-tests runs them too).
// The real gateway, NATS and browser are exercised by tests/browser/.
import { test } from "node:test";
import assert from "node:assert/strict";
import { backoffDelay, DRAIN_REASON, OfflineQueue, RoomCursor, connect } from "../../client/roomwire.js";

test("backoff: full jitter below a cap that doubles up to the max", () => {
  assert.equal(backoffDelay(0, 500, 30000, () => 0), 0);
  assert.equal(backoffDelay(0, 500, 30000, () => 0.999999), 499);
  assert.equal(backoffDelay(3, 500, 30000, () => 0.5), 2000); // cap 4000
  assert.equal(backoffDelay(10, 500, 30000, () => 0.5), 15000); // cap clamped to 30000
  assert.equal(backoffDelay(1e9, 500, 30000, () => 0.999999), 29999); // no overflow to Infinity/NaN
  assert.equal(backoffDelay(-4, 500, 30000, () => 0.5), 250);
  for (let attempt = 0; attempt < 40; attempt++) {
    const d = backoffDelay(attempt, 500, 30000);
    assert.ok(Number.isInteger(d) && d >= 0 && d < Math.min(30000, 500 * 2 ** attempt), `${attempt}: ${d}`);
  }
});

test("offline queue: bounded, refuses when full, requeue keeps order", () => {
  const q = new OfflineQueue(3);
  assert.ok(q.push("c"));
  assert.ok(q.push("d"));
  assert.ok(q.push("e"));
  assert.equal(q.push("f"), false, "full: refused, not dropped silently");
  q.requeue(["a", "b"]); // unacked publishes of the lost connection come first
  assert.deepEqual(q.drain(), ["a", "b", "c", "d", "e"]);
  assert.equal(q.length, 0);
  assert.ok(q.push("g"));
});

test("dedup: a cursor delivers each seq once, in increasing order", () => {
  const c = new RoomCursor();
  assert.equal(c.recoverable, false);
  assert.equal(c.since(), undefined);
  assert.ok(c.accept(undefined), "rooms without history: no seq, always delivered");
  assert.equal(c.onJoinAck({ op: "ack", id: 1, epoch: "e1", seq: 10 }), "joined");
  assert.deepEqual(c.since(), { seq: 10, epoch: "e1" });
  const delivered = [5, 10, 11, 13, 12, 13, 20, 11].filter((s) => c.accept(s));
  assert.deepEqual(delivered, [11, 13, 20]);
  // A recovering rejoin replays from the cursor; the seam may repeat what live traffic already brought.
  assert.equal(c.onJoinAck({ op: "ack", id: 2, recovered: true, epoch: "e1", seq: 25 }), "recovered");
  assert.equal(c.seq, 20, "a recovering ack does not move the cursor: the replay does");
  assert.deepEqual([20, 21, 22, 25, 22, 26].filter((s) => c.accept(s)), [21, 22, 25, 26]);
});

test("dedup: recovered:false or a new epoch resyncs from the room's present", () => {
  const c = new RoomCursor();
  c.onJoinAck({ op: "ack", epoch: "e1", seq: 3 });
  c.accept(7);
  assert.equal(c.onJoinAck({ op: "ack", recovered: false, epoch: "e1", seq: 90 }), "resync");
  assert.deepEqual(c.since(), { seq: 90, epoch: "e1" });
  assert.equal(c.accept(90), false);
  assert.ok(c.accept(91));
  assert.equal(c.onJoinAck({ op: "ack", recovered: true, epoch: "e2", seq: 4 }), "resync", "stream recreated");
  assert.ok(c.accept(5));
});

/** An in-memory WebSocket: the test plays the gateway. */
class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.sent = [];
    FakeSocket.all.push(this);
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close() {}
  open(conn) {
    this.onopen?.();
    this.deliver({ op: "welcome", conn, gateway: "gw" });
  }
  deliver(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }
  drop(code = 1006, reason = "") {
    this.onclose?.({ code, reason });
  }
}

const tick = () => new Promise((r) => setTimeout(r, 0));
const opts = { WebSocket: FakeSocket, backoffBase: 1, backoffMax: 1, checkUrl: false, pingInterval: 1e9 };

test("client: offline publishes and unacked ones go out after the rejoin with their original msg_id", async (t) => {
  FakeSocket.all = [];
  const rw = connect("wss://gw.test/ws", { ...opts, queueLimit: 3 });
  t.after(() => rw.close()); // a failed assertion must not leave its timers running
  const seen = [];
  rw.on("message", (m) => seen.push(m.seq));
  const joined = rw.join("lobby");
  await tick();
  const s1 = FakeSocket.all[0];
  s1.open("gw-1");
  const join1 = s1.sent.find((f) => f.op === "join");
  assert.equal(join1.since, undefined);
  s1.deliver({ op: "ack", id: join1.id, epoch: "E", seq: 4 });
  await joined;
  await tick();
  const p1 = rw.publish("lobby", "one");
  const pub1 = s1.sent.find((f) => f.op === "publish");
  assert.match(pub1.msg_id, /^[A-Za-z0-9_\-:.]{1,64}$/);
  s1.deliver({ op: "message", room: "lobby", data: "x", seq: 5 });
  s1.drop(); // before the ack of "one"
  const p2 = rw.publish("lobby", "two"); // offline
  const p3 = rw.publish("lobby", "three");
  const p4 = rw.publish("lobby", "four"); // queue: one (requeued), two, three -> full
  await assert.rejects(p4, { code: "queue_full" });
  await new Promise((r) => setTimeout(r, 10));
  const s2 = FakeSocket.all[1];
  assert.ok(s2, "reconnected");
  s2.open("gw-2");
  const join2 = s2.sent.find((f) => f.op === "join");
  assert.deepEqual(join2.since, { seq: 5, epoch: "E" }, "recovering join from the last delivered seq");
  assert.equal(s2.sent.filter((f) => f.op === "publish").length, 0, "no publish before the room is rejoined");
  s2.deliver({ op: "ack", id: join2.id, recovered: true, epoch: "E", seq: 7 });
  for (const seq of [5, 6, 7]) s2.deliver({ op: "message", room: "lobby", data: "y", seq });
  await tick();
  const pubs = s2.sent.filter((f) => f.op === "publish");
  assert.deepEqual(pubs.map((f) => f.data), ["one", "two", "three"]);
  assert.equal(pubs[0].msg_id, pub1.msg_id, "re-sent with the same msg_id");
  assert.equal(new Set(pubs.map((f) => f.msg_id)).size, 3);
  for (const f of pubs) s2.deliver({ op: "ack", id: f.id, seq: 100 + f.id });
  await Promise.all([p1, p2, p3]);
  assert.deepEqual(seen, [5, 6, 7], "each seq once, in order");
  rw.close();
  assert.equal(rw.state, "closed");
});

test("client: recovered:false emits resync; 1008 stops with a reason", async (t) => {
  FakeSocket.all = [];
  const rw = connect("wss://gw.test/ws", opts);
  t.after(() => rw.close());
  const resyncs = [];
  const states = [];
  rw.on("resync", (room) => resyncs.push(room));
  rw.on("state", (s, info) => states.push([s, info.reason]));
  rw.join("r");
  await tick();
  FakeSocket.all[0].open("gw-1");
  const j = FakeSocket.all[0].sent.find((f) => f.op === "join");
  FakeSocket.all[0].deliver({ op: "ack", id: j.id, epoch: "E", seq: 1 });
  await tick();
  FakeSocket.all[0].drop();
  await new Promise((r) => setTimeout(r, 10));
  FakeSocket.all[1].open("gw-2");
  const j2 = FakeSocket.all[1].sent.find((f) => f.op === "join");
  FakeSocket.all[1].deliver({ op: "ack", id: j2.id, recovered: false, epoch: "E", seq: 50 });
  await tick();
  assert.deepEqual(resyncs, ["r"]);
  FakeSocket.all[1].drop(1008);
  await new Promise((r) => setTimeout(r, 10));
  assert.equal(FakeSocket.all.length, 2, "no reconnect after 1008");
  assert.equal(rw.state, "closed");
  assert.match(rw.closeReason, /1008/);
  assert.deepEqual(states.at(-1)[0], "closed");
});

test("client: a draining gateway's close adds a random delay of up to drainDelayMax before the reconnect", async (t) => {
  FakeSocket.all = [];
  const rw = connect("wss://gw.test/ws", { ...opts, drainDelayMax: 10000 });
  t.after(() => rw.close());
  const delays = [];
  rw.on("state", (s, info) => s === "reconnecting" && delays.push([info.reason, info.delay]));
  await tick();
  const saved = Math.random;
  Math.random = () => 0.5;
  try {
    FakeSocket.all[0].open("gw-1");
    FakeSocket.all[0].drop(1001, DRAIN_REASON);
  } finally {
    Math.random = saved;
  }
  assert.deepEqual(delays, [[`1001 ${DRAIN_REASON}`, 0 + 5000]], "backoff (max 1 ms, so 0 at 0.5) + half of 10000");
  assert.equal(FakeSocket.all.length, 1, "no reconnect before the delay");
  rw.close();
  // Any other close: no extra delay.
  FakeSocket.all = [];
  const rw2 = connect("wss://gw.test/ws", { ...opts, drainDelayMax: 10000 });
  t.after(() => rw2.close());
  const delays2 = [];
  rw2.on("state", (s, info) => s === "reconnecting" && delays2.push(info.delay));
  await tick();
  FakeSocket.all[0].open("gw-1");
  FakeSocket.all[0].drop(1001, "server shutting down");
  assert.ok(delays2[0] < 10, `no drain delay: ${delays2}`);
});

/** A client joined to `room` over a fresh FakeSocket: `{ rw, sock }`. */
async function joinedClient(t, room) {
  FakeSocket.all = [];
  const rw = connect("wss://gw.test/ws", opts);
  t.after(() => rw.close());
  const joined = rw.join(room);
  await tick();
  const sock = FakeSocket.all[0];
  sock.open("gw-1");
  const j = sock.sent.find((f) => f.op === "join");
  sock.deliver({ op: "ack", id: j.id });
  await joined;
  return { rw, sock };
}

test("presence: requests carry an id and resolve with the answer; an error frame rejects with its code", async (t) => {
  const { rw, sock } = await joinedClient(t, "p");
  const members = rw.presence("p");
  const stats = rw.presenceStats("p");
  const secret = rw.presence("secret");
  const [q1, q2, q3] = sock.sent.slice(-3);
  assert.deepEqual(q1, { op: "presence", room: "p", id: q1.id });
  assert.deepEqual(q2, { op: "presence_stats", room: "p", id: q2.id });
  assert.equal(new Set([q1.id, q2.id, q3.id]).size, 3, "distinct ids");
  // Answered out of order: each promise gets the frame with its own id.
  const statsAnswer = { op: "presence_stats", id: q2.id, room: "p", count: 2, users: 1 };
  const answer = {
    op: "presence",
    id: q1.id,
    room: "p",
    count: 2,
    users: 1,
    members: [
      { conn: "gw-1", user: null },
      { conn: "gw-7", user: "u1" },
    ],
  };
  sock.deliver(statsAnswer);
  sock.deliver({ op: "error", id: q3.id, code: "forbidden", message: "not allowed" });
  sock.deliver(answer);
  assert.deepEqual(await members, answer);
  assert.deepEqual(await stats, statsAnswer);
  await assert.rejects(secret, { name: "RoomwireError", code: "forbidden" });
  // Over max_members: counts only.
  const big = rw.presence("p");
  const q4 = sock.sent.at(-1);
  sock.deliver({ op: "presence", id: q4.id, room: "p", count: 5000, users: 4000, truncated: true });
  const b = await big;
  assert.equal(b.truncated, true);
  assert.equal(b.members, undefined);
});

test("presence: like history, a request while offline rejects disconnected, and so does one the drop interrupts", async (t) => {
  const { rw, sock } = await joinedClient(t, "p");
  const inFlight = rw.presence("p");
  const statsInFlight = rw.presenceStats("p");
  sock.drop();
  await assert.rejects(inFlight, { code: "disconnected" });
  await assert.rejects(statsInFlight, { code: "disconnected" });
  await assert.rejects(rw.presence("p"), { code: "disconnected" });
  await assert.rejects(rw.presenceStats("p"), { code: "disconnected" });
  rw.close();
  await assert.rejects(rw.presence("p"), { code: "disconnected" });
  FakeSocket.all = [];
  const unanswered = connect("wss://gw.test/ws", { ...opts, requestTimeout: 5 });
  t.after(() => unanswered.close());
  await tick();
  FakeSocket.all[0].open("gw-9");
  await assert.rejects(unanswered.presence("p"), { code: "timeout" });
});

test("presence: member_joined / member_left become presence events; other rooms' are dropped", async (t) => {
  const { rw, sock } = await joinedClient(t, "p");
  const seen = [];
  rw.on("presence", (e) => seen.push(e));
  sock.deliver({ op: "member_joined", room: "p", conn: "gw-2", user: "ann", first: true });
  sock.deliver({ op: "member_joined", room: "p", conn: "gw-3", user: null, first: true });
  sock.deliver({ op: "member_joined", room: "elsewhere", conn: "gw-4", user: "bo", first: true });
  sock.deliver({ op: "member_left", room: "p", conn: "gw-2", user: "ann", last: false, reason: "leave" });
  sock.deliver({ op: "member_left", room: "p", conn: "gw-5", user: "cy", last: true, reason: "gateway_lost" });
  assert.deepEqual(seen, [
    { room: "p", type: "joined", conn: "gw-2", user: "ann", first: true },
    { room: "p", type: "joined", conn: "gw-3", user: null, first: true },
    { room: "p", type: "left", conn: "gw-2", user: "ann", last: false, reason: "leave" },
    { room: "p", type: "left", conn: "gw-5", user: "cy", last: true, reason: "gateway_lost" },
  ]);
  assert.ok(!("last" in seen[0]) && !("reason" in seen[0]), "joined: no last/reason");
  assert.ok(!("first" in seen[2]), "left: no first");
  // After leave(), frames still in flight for the room are not delivered.
  rw.leave("p").catch(() => {}); // never acked here
  sock.deliver({ op: "member_left", room: "p", conn: "gw-3", user: null, last: true, reason: "disconnect" });
  assert.equal(seen.length, 4);
});

test("joined fires on the first join ack and again after each rejoin, so presence can be reloaded", async (t) => {
  FakeSocket.all = [];
  const rw = connect("wss://gw.test/ws", opts);
  t.after(() => rw.close());
  const joins = [];
  rw.on("joined", (room, ack) => joins.push([room, ack.id]));
  rw.join("p");
  await tick();
  FakeSocket.all[0].open("gw-1");
  const j1 = FakeSocket.all[0].sent.find((f) => f.op === "join");
  FakeSocket.all[0].deliver({ op: "ack", id: j1.id });
  await tick();
  assert.deepEqual(joins, [["p", j1.id]]);
  FakeSocket.all[0].drop();
  await new Promise((r) => setTimeout(r, 10));
  FakeSocket.all[1].open("gw-2");
  const j2 = FakeSocket.all[1].sent.find((f) => f.op === "join");
  assert.equal(joins.length, 1, "not before the rejoin's ack");
  FakeSocket.all[1].deliver({ op: "ack", id: j2.id });
  await tick();
  assert.deepEqual(joins, [
    ["p", j1.id],
    ["p", j2.id],
  ]);
  // A refused join is not `joined`.
  const refused = rw.join("q");
  const j3 = FakeSocket.all[1].sent.at(-1);
  FakeSocket.all[1].deliver({ op: "error", id: j3.id, code: "forbidden" });
  await assert.rejects(refused, { code: "forbidden" });
  assert.equal(joins.length, 2);
});

test("client: server-side rooms from welcome and joined; recovered through the upgrade's recover; 4003 stops", async (t) => {
  FakeSocket.all = [];
  const rw = connect("wss://gw.test/ws", opts);
  t.after(() => rw.close());
  const joined = [];
  const left = [];
  const seen = [];
  const states = [];
  rw.on("joined", (room, info) => joined.push([room, info.recovered]));
  rw.on("left", (l) => left.push([l.room, l.reason]));
  rw.on("message", (m) => seen.push([m.room, m.seq]));
  rw.on("state", (s, info) => states.push([s, info.reason]));
  await tick();
  const s1 = FakeSocket.all[0];
  assert.equal(new URL(s1.url).searchParams.get("recover"), null, "nothing to recover on the first connection");
  s1.onopen?.();
  s1.deliver({
    op: "welcome",
    conn: "gw-1",
    gateway: "gw",
    rooms: [{ room: "feed", epoch: "E", seq: 3 }, { room: "team" }, { room: "a.b", error: "invalid_room" }],
  });
  assert.deepEqual(rw.rooms().sort(), ["feed", "team"]);
  assert.equal(s1.sent.filter((f) => f.op === "join").length, 0, "server-side rooms are not joined by the client");
  await assert.rejects(rw.leave("feed"), { code: "forbidden" });
  s1.deliver({ op: "message", room: "feed", data: 1, seq: 4 });
  s1.deliver({ op: "joined", room: "extra" });
  assert.ok(rw.rooms().includes("extra"));
  s1.deliver({ op: "left", room: "team", reason: "removed" });
  assert.ok(!rw.rooms().includes("team"));
  s1.drop();
  await new Promise((r) => setTimeout(r, 10));
  const s2 = FakeSocket.all[1];
  const recover = JSON.parse(new URL(s2.url).searchParams.get("recover"));
  assert.deepEqual(recover.feed, { epoch: "E", seq: 4 }, "the gateway recovers feed from the last delivered seq");
  s2.onopen?.();
  s2.deliver({ op: "welcome", conn: "gw-2", gateway: "gw", rooms: [{ room: "feed", epoch: "E", seq: 6, recovered: true }] });
  for (const seq of [4, 5, 6]) s2.deliver({ op: "message", room: "feed", data: 1, seq });
  assert.deepEqual(seen, [["feed", 4], ["feed", 5], ["feed", 6]], "each seq once");
  assert.deepEqual(
    s2.sent.filter((f) => f.op === "join").map((f) => f.room),
    ["extra"],
    "a backend's room is rejoined like the client's own",
  );
  assert.deepEqual(joined.slice(0, 3), [["feed", undefined], ["team", undefined], ["extra", undefined]]);
  assert.deepEqual(joined[3], ["feed", true]);
  assert.deepEqual(left, [["team", "removed"]]);
  s2.drop(4003, "kicked by ann");
  assert.equal(rw.state, "closed");
  assert.equal(rw.closeReason, "4003 kicked by ann");
  await new Promise((r) => setTimeout(r, 10));
  assert.equal(FakeSocket.all.length, 2, "no reconnect after 4003");
});

/** A client open over a fresh FakeSocket whose welcome carries `welcome` extras (e.g. `rpc_max_inflight`). */
async function openClient(t, extra = {}, welcome = {}) {
  FakeSocket.all = [];
  const rw = connect("wss://gw.test/ws", { ...opts, ...extra });
  t.after(() => rw.close());
  await tick();
  const sock = FakeSocket.all[0];
  sock.onopen?.();
  sock.deliver({ op: "welcome", conn: "gw-1", gateway: "gw", ...welcome });
  return { rw, sock };
}

test("rpc: the frame is the protocol's; answers resolve with data, errors reject with the gateway's or service's code", async (t) => {
  const { rw, sock } = await openClient(t);
  const roll = rw.rpc("demo.roll", "2d6", { timeoutMs: 1500 });
  const f = sock.sent.at(-1);
  assert.deepEqual(f, { op: "rpc", method: "demo.roll", data: "2d6", timeout_ms: 1500, id: f.id });
  const plain = rw.rpc("demo.time");
  const g = sock.sent.at(-1);
  assert.deepEqual(g, { op: "rpc", method: "demo.time", data: null, id: g.id }, "no data: null; no timeout: the gateway's");
  const bytes = rw.rpc("blob", { a: 1 }, { timeout: 10 }); // `timeout` is an alias of timeoutMs
  const b = sock.sent.at(-1);
  assert.equal(b.timeout_ms, 10);
  const missing = rw.rpc("nobody.home");
  const m = sock.sent.at(-1);
  const failing = rw.rpc("demo.roll", "2x6");
  const e = sock.sent.at(-1);
  // Out of order, each to its own promise.
  sock.deliver({ op: "rpc_result", id: g.id, data: { unix_ms: 5 } });
  sock.deliver({ op: "error", id: m.id, code: "no_responders", message: "no service answers this method" });
  sock.deliver({ op: "rpc_result", id: e.id, error: { code: "400", message: "dice as NdM" } });
  sock.deliver({ op: "rpc_result", id: b.id, data_b64: "AP8=" });
  sock.deliver({ op: "rpc_result", id: f.id, data: { total: 7 } });
  assert.deepEqual(await roll, { total: 7 });
  assert.deepEqual(await plain, { unix_ms: 5 });
  assert.deepEqual(await bytes, new Uint8Array([0, 255]));
  await assert.rejects(missing, (err) => err.code === "no_responders" && err.service === undefined);
  await assert.rejects(failing, { name: "RoomwireError", code: "400", message: "dice as NdM", service: true });
  assert.equal(rw.calls, 0, "every slot given back");
  // Refused locally, nothing sent.
  const sent = sock.sent.length;
  await assert.rejects(rw.rpc(""), { code: "bad_request" });
  await assert.rejects(rw.rpc(5), { code: "bad_request" });
  await assert.rejects(rw.rpc("m", 1, { timeoutMs: -1 }), { code: "bad_request" });
  await assert.rejects(rw.rpc("m", 1, { timeoutMs: NaN }), { code: "bad_request" });
  assert.equal(sock.sent.length, sent);
});

test("rpc: offline calls reject disconnected at once and are never queued; a drop rejects the pending ones", async (t) => {
  FakeSocket.all = [];
  const rw = connect("wss://gw.test/ws", opts);
  t.after(() => rw.close());
  await assert.rejects(rw.rpc("demo.time"), { code: "disconnected" }, "connecting: not open yet");
  await tick();
  const s1 = FakeSocket.all[0];
  s1.open("gw-1");
  const a = rw.rpc("demo.slow");
  const b = rw.rpc("demo.slow", 1, { timeoutMs: 60000 });
  assert.equal(rw.calls, 2);
  s1.drop();
  await assert.rejects(a, { code: "disconnected" });
  await assert.rejects(b, (err) => err.code === "disconnected" && /may have run/.test(err.message));
  assert.equal(rw.calls, 0);
  await assert.rejects(rw.rpc("demo.time"), { code: "disconnected" }, "reconnecting: not queued");
  await new Promise((r) => setTimeout(r, 10));
  const s2 = FakeSocket.all[1];
  s2.open("gw-2");
  await tick();
  assert.equal(s2.sent.filter((f) => f.op === "rpc").length, 0, "nothing re-sent after the reconnect");
  // The old connection's answer, should one arrive, settles nothing and raises no error event.
  const errors = [];
  rw.on("error", (e) => errors.push(e));
  s2.deliver({ op: "error", id: s1.sent.find((f) => f.op === "rpc").id, code: "timeout" });
  assert.deepEqual(errors, []);
  rw.close();
  await assert.rejects(rw.rpc("demo.time"), { code: "closed" });
});

test("rpc: pending calls are bounded by the gateway's rpc_max_inflight and maxPendingCalls, and freed by timeouts", async (t) => {
  const { rw, sock } = await openClient(t, { maxPendingCalls: 5, rpcGrace: 5 }, { rpc_max_inflight: 2 });
  const one = rw.rpc("m", 1);
  const two = rw.rpc("m", 2, { timeoutMs: 10 }); // given up locally at 10 + 5 ms
  await assert.rejects(rw.rpc("m", 3), { code: "rate_limited" }, "the gateway's bound (2), not the option's (5)");
  assert.equal(sock.sent.filter((f) => f.op === "rpc").length, 2, "the refused call was not sent");
  await assert.rejects(two, { code: "timeout" });
  assert.equal(rw.pending.size, 1, "the timed-out call is forgotten");
  const three = rw.rpc("m", 4);
  const [f1, f2, f3] = sock.sent.filter((f) => f.op === "rpc");
  // The gateway's late answer to the call given up: dropped, no error event.
  const errors = [];
  rw.on("error", (e) => errors.push(e));
  sock.deliver({ op: "error", id: f2.id, code: "timeout", message: "late" });
  sock.deliver({ op: "rpc_result", id: f2.id, data: "late" });
  assert.deepEqual(errors, []);
  sock.deliver({ op: "rpc_result", id: f1.id, data: "a" });
  sock.deliver({ op: "rpc_result", id: f3.id, data: "c" });
  assert.deepEqual(await Promise.all([one, three]), ["a", "c"]);
  assert.equal(rw.calls, 0);
  // A gateway that states no bound (RPC off, or an older one): the option alone bounds.
  const { rw: rw2 } = await openClient(t, { maxPendingCalls: 3 });
  const calls = [1, 2, 3].map((n) => rw2.rpc("m", n));
  await assert.rejects(rw2.rpc("m", 4), { code: "rate_limited" });
  assert.equal(rw2.calls, 3);
  rw2.close();
  for (const c of calls) await assert.rejects(c, { code: "disconnected" });
  assert.equal(rw2.calls, 0);
});
