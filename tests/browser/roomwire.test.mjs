// Roomwire in a real browser: Debian's chromium (playwright-core), the gateway binary over wss with a test
// certificate, a real nats-server with JetStream, a NATS backend in node, the demo's RPC service (examples/
// rpc_service.rs). Run by scripts/browser-tests.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Stack, Nats, launchBrowser, until, WAIT } from "./harness.mjs";

let stack;
let browser;
let nats;

before(async () => {
  stack = await Stack.start();
  browser = await launchBrowser(stack);
  nats = await Nats.connect(stack.natsPort);
});

after(async () => {
  nats?.close();
  await browser?.close();
  await stack?.stop();
});

/** A demo page (`/`) as `name` in `room`, once its join is acked. */
async function demoPage(name, room, extra = "") {
  const page = await browser.newPage();
  page.on("pageerror", (e) => console.error(`[${name}] page error:`, e));
  await page.goto(`${stack.origin}/?name=${name}&room=${room}${extra}`);
  if (!extra.includes("token=")) {
    await page.waitForFunction((r) => window.roomwireDemo?.rw.rooms().includes(r), room, { timeout: WAIT });
  }
  return page;
}

/**
 * A page running the client library directly (on the demo page's origin), with fast retries for the tests; `gw` (a
 * stack, or a gateway from `addGateway`) is the gateway it is served by and connects to.
 */
async function clientPage(room, gw = stack) {
  const page = await browser.newPage();
  page.on("pageerror", (e) => console.error("page error:", e));
  await page.goto(`${gw.origin}/healthz`);
  const ack = await page.evaluate(
    async ({ url, room }) => {
      const { connect } = await import("/client/roomwire.js");
      const rw = connect(url, { backoffBase: 100, backoffMax: 500 });
      window.rw = rw;
      window.got = [];
      window.states = [];
      window.presence = [];
      rw.on("message", (m) => window.got.push(m));
      rw.on("presence", (e) => window.presence.push(e));
      rw.on("state", (s) => window.states.push(s));
      return rw.join(room);
    },
    { url: gw.wsUrl, room },
  );
  return { page, ack };
}

const texts = (page) => page.$$eval("#log li[data-text]", (lis) => lis.map((li) => li.dataset.text));

test("the gateway serves the client with its content type and caching headers", async () => {
  const page = await browser.newPage();
  await page.goto(`${stack.origin}/healthz`);
  const get = (path, etag) =>
    page.evaluate(
      async ({ path, etag }) => {
        const r = await fetch(path, { cache: "no-store", headers: etag ? { "If-None-Match": etag } : {} });
        return { status: r.status, type: r.headers.get("content-type"), etag: r.headers.get("etag"), cache: r.headers.get("cache-control") };
      },
      { path, etag },
    );
  const js = await get("/client/roomwire.js");
  assert.equal(js.status, 200);
  assert.equal(js.type, "text/javascript; charset=utf-8");
  assert.match(js.etag, /^"[0-9a-f]{16}"$/);
  assert.match(js.cache, /max-age/);
  assert.equal((await get("/client/roomwire.js", js.etag)).status, 304);
  const dts = await get("/client/roomwire.d.ts");
  assert.equal(dts.type, "application/typescript");
  await page.close();
});

test("two pages chat in a room over wss", async () => {
  const alice = await demoPage("alice", "chat");
  const bob = await demoPage("bob", "chat");
  await alice.fill("#text", "hello bob");
  await alice.press("#text", "Enter");
  await until(async () => (await texts(bob)).includes("hello bob"), "bob sees alice's message");
  await bob.fill("#text", "hi alice");
  await bob.press("#text", "Enter");
  await until(async () => (await texts(alice)).includes("hi alice"), "alice sees bob's message");
  // Each tells its own messages apart.
  assert.equal(await alice.$eval('#log li[data-text="hello bob"]', (li) => li.classList.contains("mine")), true);
  assert.equal(await bob.$eval('#log li[data-text="hello bob"]', (li) => li.classList.contains("mine")), false);
  assert.equal(await alice.$eval("#status", (s) => s.dataset.state), "open");
  // permessage-deflate (issue 27): Chromium offers it, the gateway accepts it; a message over compression.min_size
  // (256 bytes) travels compressed both ways (Chromium compresses what it sends, the gateway the room message).
  assert.equal(
    await alice.evaluate(() => window.roomwireDemo.rw.ws.extensions),
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
  );
  const long = Array.from({ length: 45 }, (_, i) => `word${i % 7}`).join(" ");
  assert.ok(long.length > 256 && long.length <= 500);
  await alice.fill("#text", long);
  await alice.press("#text", "Enter");
  await until(async () => (await texts(bob)).includes(long), "bob sees alice's long (compressed) message");
  await alice.close();
  await bob.close();
});

test("a message published by a NATS backend appears in a page", async () => {
  const page = await demoPage("carol", "news");
  nats.pub("rooms.news", { name: "backend", text: "breaking: from NATS" });
  await until(async () => (await texts(page)).includes("breaking: from NATS"), "backend message in the page");
  await page.close();
});

test("a refused token stops reconnection with a visible reason", async () => {
  const page = await browser.newPage();
  let sockets = 0;
  page.on("websocket", () => sockets++);
  await page.goto(`${stack.origin}/?name=mallory&token=not-a-jwt`);
  await page.waitForFunction(() => document.querySelector("#status").dataset.state === "closed", null, {
    timeout: WAIT,
  });
  const shown = await page.textContent("#status");
  assert.match(shown, /disconnected: 401/, shown);
  const before = sockets;
  await page.waitForTimeout(1500); // retries would come within the backoff (500 ms first)
  assert.equal(sockets, before, "no reconnection after the refusal");
  await page.close();
});

test("a backend's disconnect stops the page with 4003 and its reason, without reconnecting", async () => {
  const page = await demoPage("dave", "kickroom");
  let sockets = 0;
  page.on("websocket", () => sockets++);
  const conn = await page.evaluate(() => window.roomwireDemo.rw.conn);
  assert.match(conn, /-\d+$/, conn);
  nats.pub("roomwire.control.disconnect", { conn, reason: "kicked by the test" });
  await page.waitForFunction(() => document.querySelector("#status").dataset.state === "closed", null, {
    timeout: WAIT,
  });
  const shown = await page.textContent("#status");
  assert.match(shown, /4003 kicked by the test/, shown);
  await page.waitForTimeout(1500); // a retry would come within the backoff (500 ms first)
  assert.equal(sockets, 0, "no reconnection after 4003");
  await page.close();
});

test("the offline queue delivers after the reconnect", async () => {
  const { page } = await clientPage("q");
  const seen = await nats.sub("rooms.q");
  await stack.stopGateway();
  await page.waitForFunction(() => window.rw.state !== "open", null, { timeout: WAIT });
  const sent = page.evaluate(() =>
    Promise.all(["q1", "q2", "q3"].map((t) => window.rw.publish("q", { t }).then((a) => a.op))),
  );
  await stack.startGateway();
  assert.deepEqual(await sent, ["ack", "ack", "ack"]);
  await nats.flush();
  assert.deepEqual(
    seen.map((m) => m.t),
    ["q1", "q2", "q3"],
  );
  await page.close();
});

test("after a gateway restart the page shows the messages sent meanwhile once, in order", async () => {
  const room = "h-recover";
  const { page, ack } = await clientPage(room);
  // A history room's join ack carries the stream position; without it nothing could be recovered.
  assert.equal(typeof ack.epoch, "string", `join ack without epoch: ${JSON.stringify(ack)}`);
  nats.pub(`rooms.${room}`, { n: 1 });
  await page.waitForFunction(() => window.got.length === 1, null, { timeout: WAIT });
  await stack.stopGateway();
  for (let n = 2; n <= 6; n++) nats.pub(`rooms.${room}`, { n });
  await nats.flush();
  await stack.startGateway();
  await page.waitForFunction(() => window.got.length >= 6, null, { timeout: WAIT });
  nats.pub(`rooms.${room}`, { n: 7 });
  await page.waitForFunction(() => window.got.some((m) => m.data.n === 7), null, { timeout: WAIT });
  const got = await page.evaluate(() => window.got.map((m) => ({ n: m.data.n, seq: m.seq })));
  assert.deepEqual(
    got.map((m) => m.n),
    [1, 2, 3, 4, 5, 6, 7],
  );
  assert.ok(got.every((m, i) => i === 0 || m.seq > got[i - 1].seq), "increasing seq");
  assert.ok((await page.evaluate(() => window.states)).includes("reconnecting"));
  await page.close();
});

/** The conns `page`'s client gets from `rw.presence(room)`, sorted. */
const presentConns = (page, room) =>
  page.evaluate(async (room) => (await window.rw.presence(room)).members.map((m) => m.conn).sort(), room);

/** Resolves with the first presence event of `page` matching `want` (a subset of its fields). */
const presenceEvent = (page, want) =>
  page
    .waitForFunction(
      (want) => window.presence.find((e) => Object.entries(want).every(([k, v]) => e[k] === v)),
      want,
      { timeout: WAIT },
    )
    .then((h) => h.jsonValue());

test("presence: two pages see each other arrive and leave", async () => {
  const room = "p-two";
  const a = (await clientPage(room)).page;
  const aConn = await a.evaluate(() => window.rw.conn);
  const b = (await clientPage(room)).page;
  const bConn = await b.evaluate(() => window.rw.conn);
  // A was there first: it hears B's arrival as an event ...
  const joined = await presenceEvent(a, { type: "joined", conn: bConn });
  assert.deepEqual(joined, { room, type: "joined", conn: bConn, user: null, first: true });
  // ... and B, arriving second, finds A in the room's presence (as A does B).
  const both = [aConn, bConn].sort();
  await until(async () => JSON.stringify(await presentConns(b, room)) === JSON.stringify(both), "B lists A and B");
  await until(async () => JSON.stringify(await presentConns(a, room)) === JSON.stringify(both), "A lists A and B");
  const stats = await b.evaluate((room) => window.rw.presenceStats(room), room);
  assert.deepEqual({ ...stats, id: 0 }, { op: "presence_stats", id: 0, room, count: 2, users: 0 });
  // Everyone hears every arrival, their own included.
  await presenceEvent(b, { type: "joined", conn: bConn });
  // B closes its tab: A sees it leave with `disconnect`, and the presence no longer lists it.
  await b.close();
  const left = await presenceEvent(a, { type: "left", conn: bConn });
  assert.deepEqual(left, { room, type: "left", conn: bConn, user: null, last: true, reason: "disconnect" });
  assert.deepEqual(await presentConns(a, room), [aConn]);
  // A third page that sends `leave` leaves with `leave`.
  const c = (await clientPage(room)).page;
  const cConn = await c.evaluate(() => window.rw.conn);
  await presenceEvent(a, { type: "joined", conn: cConn });
  await c.evaluate((room) => window.rw.leave(room), room);
  assert.equal((await presenceEvent(a, { type: "left", conn: cConn })).reason, "leave");
  await c.close();
  await a.close();
});

const members = (page) => page.$$eval("#members li", (lis) => lis.map((li) => li.textContent));

test("presence: the demo lists who is in the room, live", async () => {
  const alice = await demoPage("alice", "p-demo");
  await until(async () => (await members(alice)).join() === "alice (you)", "alice lists herself");
  const bob = await demoPage("bob", "p-demo");
  // Names come with the `hello` each page sends on joining and to every newcomer.
  await until(async () => (await members(alice)).join() === "alice (you),bob", `alice lists bob: ${await members(alice)}`);
  await until(async () => (await members(bob)).join() === "alice,bob (you)", `bob lists alice: ${await members(bob)}`);
  assert.equal(await alice.$eval("#member-count", (s) => s.textContent), "(2)");
  // After a gateway restart both come back as new connections: each page reloads the list when it has rejoined.
  const conns = async (page) => page.$$eval("#members li", (lis) => lis.map((li) => li.dataset.conn).sort().join());
  const before = await conns(alice);
  await stack.restartGateway();
  for (const [page, want] of [
    [alice, "alice (you),bob"],
    [bob, "alice,bob (you)"],
  ]) {
    await until(
      async () => (await members(page)).join() === want && (await conns(page)) !== before,
      `${want} after the restart: ${await members(page)}`,
    );
  }
  assert.deepEqual(await conns(alice), await conns(bob));
  await bob.close();
  await until(async () => (await members(alice)).join() === "alice (you)", "bob gone from alice's list");
  await alice.close();
});

test("presence: the members of a killed gateway leave with gateway_lost", async (t) => {
  // Its own stack: two gateways on one NATS, with a short presence.ttl (a lost gateway's entry expires after it).
  const two = await Stack.start({ presenceTtl: "3s", certFrom: stack });
  t.after(() => two.stop());
  const other = await two.addGateway();
  const room = "p-lost";
  const a = (await clientPage(room, two)).page;
  const aConn = await a.evaluate(() => window.rw.conn);
  const b = (await clientPage(room, other)).page;
  const bConn = await b.evaluate(() => window.rw.conn);
  await presenceEvent(a, { type: "joined", conn: bConn });
  other.process.kill("SIGKILL");
  const left = await presenceEvent(a, { type: "left", conn: bConn });
  assert.deepEqual(left, { room, type: "left", conn: bConn, user: null, last: true, reason: "gateway_lost" });
  assert.deepEqual(await presentConns(a, room), [aConn]);
  await b.close();
  await a.close();
});

test("rpc: a page calls the example service over wss; service errors and gateway refusals reject with their codes", async () => {
  if (!stack.rpcService) await stack.startRpcService();
  const { page } = await clientPage("rpc");
  const got = await page.evaluate(async () => {
    const rw = window.rw;
    const outcome = (p) =>
      p.then(
        (data) => ({ data }),
        (e) => ({ code: e.code, service: e.service ?? false, message: e.message }),
      );
    return {
      conn: rw.conn,
      roll: await outcome(rw.rpc("demo.roll", "3d6", { timeoutMs: 5000 })),
      time: await outcome(rw.rpc("demo.time")),
      bad: await outcome(rw.rpc("demo.roll", "3x6")),
      nobody: await outcome(rw.rpc("demo.nobody")),
      forbidden: await outcome(rw.rpc("orders.create", { item: 1 })),
      hostile: await outcome(rw.rpc("demo.>")),
    };
  });
  const { roll } = got;
  assert.equal(roll.data.dice, "3d6", JSON.stringify(got));
  assert.equal(roll.data.rolls.length, 3);
  assert.ok(roll.data.total >= 3 && roll.data.total <= 18, JSON.stringify(roll));
  assert.equal(roll.data.by, got.conn, "the service saw the caller's connection, stamped by the gateway");
  assert.ok(Math.abs(got.time.data.unix_ms - Date.now()) < 60000, JSON.stringify(got.time));
  assert.equal(got.bad.code, "400");
  assert.equal(got.bad.service, true);
  assert.match(got.bad.message, /NdM/);
  assert.deepEqual([got.nobody.code, got.nobody.service], ["no_responders", false]);
  assert.equal(got.forbidden.code, "forbidden", "anonymous may call demo.* only");
  assert.equal(got.hostile.code, "bad_request");
  await page.close();
});

test("rpc: a call while offline rejects disconnected at once; one the drop interrupts too, and is not re-sent", async () => {
  if (!stack.rpcService) await stack.startRpcService();
  // A responder that never answers: the call is still pending when the gateway goes.
  const hung = await nats.sub("rpc.demo.hang");
  const { page } = await clientPage("rpc-drop");
  await page.evaluate(() => {
    window.rw.rpc("demo.hang", { n: 1 }, { timeoutMs: 20000 }).then(
      () => (window.hang = "resolved"),
      (e) => (window.hang = e.code),
    );
  });
  await until(() => hung.length === 1, "the call reached NATS");
  await stack.stopGateway();
  await page.waitForFunction(() => window.hang !== undefined, null, { timeout: WAIT });
  assert.equal(await page.evaluate(() => window.hang), "disconnected");
  const offline = await page.evaluate(async () => {
    const started = performance.now();
    const code = await window.rw.rpc("demo.time").then(
      () => "resolved",
      (e) => e.code,
    );
    return { code, ms: performance.now() - started };
  });
  assert.equal(offline.code, "disconnected");
  assert.ok(offline.ms < 100, `rejected at once, not after a timeout: ${offline.ms} ms`);
  await stack.startGateway();
  await page.waitForFunction(() => window.rw.state === "open", null, { timeout: WAIT });
  const after = await page.evaluate(() => window.rw.rpc("demo.roll", "1d4"));
  assert.ok(after.total >= 1 && after.total <= 4, JSON.stringify(after));
  await nats.flush();
  assert.equal(hung.length, 1, "the interrupted call was not re-sent after the reconnect");
  await page.close();
});

test("rpc: /roll 2d6 in the demo is answered by the service and said in the room", async () => {
  if (!stack.rpcService) await stack.startRpcService();
  const alice = await demoPage("alice", "dice");
  const bob = await demoPage("bob", "dice");
  await alice.fill("#text", "/roll 2d6");
  await alice.press("#text", "Enter");
  const rolled = (page) => texts(page).then((ts) => ts.find((t) => /^🎲 rolled 2d6: \d+ \+ \d+ = \d+$/.test(t)));
  const seen = await until(() => rolled(bob), "bob sees alice's roll");
  assert.equal(await until(() => rolled(alice), "alice sees her roll"), seen);
  const [a, b, total] = seen.match(/\d+/g).slice(2).map(Number);
  assert.ok(a >= 1 && a <= 6 && b >= 1 && b <= 6 && total === a + b, seen);
  // A malformed roll is the service's error, shown to the caller only.
  await alice.fill("#text", "/roll 99d6");
  await alice.press("#text", "Enter");
  await until(
    () => alice.$$eval("#log li.notice", (lis) => lis.some((li) => li.textContent.startsWith("/roll failed: 400"))),
    "the service's refusal shown",
  );
  await alice.close();
  await bob.close();
});
