// Roomwire browser client: one dependency-free ES module, no build step. Served by the gateway at
// /client/roomwire.js (types beside it at /client/roomwire.d.ts). Protocol: docs/protocol.md; guide: docs/client.md.
//
//   import { connect } from "/client/roomwire.js";
//   const rw = connect("wss://chat.example.com/ws", { getToken: async () => fetchToken() });
//   rw.on("message", ({ room, data, from, seq }) => render(room, data));
//   await rw.join("lobby");
//   await rw.publish("lobby", { text: "hi" });
//
// What it does for the application: reconnects with capped exponential backoff and full jitter; stops with a reason
// when retrying cannot help (token refused at the upgrade, 4001 with no way to get a new token, 1008); rejoins every
// room after a reconnect, with `since` for history rooms, and drops anything it already delivered, so handlers see
// each missed message once, in order; keeps publishes made while offline in a bounded queue and sends them (and the
// ones whose ack the old connection never brought) after the reconnect with their original `msg_id`, so the gateway's
// JetStream dedup stores each once; turns acks into promises with a timeout; pings to notice a dead link before TCP.
// Presence (docs/presence.md): `presence`/`presenceStats` ask who is in a room over every gateway; the gateway's
// `member_joined`/`member_left` become `presence` events; `joined` after every (re)join says when to ask again.
// RPC (docs/rpc.md): `rpc(method, data)` calls a NATS service through the gateway and settles with its answer. Calls
// are never queued offline nor re-sent after a reconnect (a call may have acted even when its answer was lost): they
// reject with `disconnected` instead, and at most `maxPendingCalls` (or the gateway's bound, from `welcome`) wait.

/** Default options (see `ConnectOptions` in roomwire.d.ts). */
export const DEFAULTS = Object.freeze({
  backoffBase: 500, // ms: first retry waits up to this
  backoffMax: 30000, // ms: retries never wait longer than this
  stableAfter: 10000, // ms open before the backoff starts again from backoffBase
  requestTimeout: 10000, // ms for an ack
  pingInterval: 15000, // ms between app-level pings while open
  pingTimeout: 10000, // ms without the pong: the link is dead, reconnect
  queueLimit: 256, // publishes kept while offline (and unacked across a reconnect)
  checkUrl: undefined, // URL asked why a connection failed before opening; default: /client/check on the ws host
  drainDelayMax: 5000, // ms: extra random wait before reconnecting after a draining gateway's close
  maxPendingCalls: 64, // rpc calls awaiting an answer; the gateway's own bound (welcome's rpc_max_inflight) lowers it
  rpcGrace: 2000, // ms the client waits past a call's timeoutMs, so the gateway's `timeout` answer normally comes first
});

/**
 * Close 1001 with this reason: the gateway is draining (docs/protocol.md). Its clients reconnect, through the load
 * balancer, to another gateway; the extra random wait (up to `drainDelayMax`) keeps them from arriving all at once.
 */
export const DRAIN_REASON = "going away: reconnect";

/** Close codes after which retrying cannot help (docs/protocol.md). 4001 only when there is no getToken. */
const FATAL_CLOSE = new Map([
  [1008, "rate limit exceeded repeatedly"],
  [4001, "token expired"],
  [4003, "disconnected by server"],
]);

/** Join refusals worth retrying after a reconnect: the gateway may still be connecting to NATS. */
const TRANSIENT = new Set(["unavailable", "rate_limited", "timeout"]);

/**
 * Delay before reconnect attempt `attempt` (0-based): "full jitter", uniform in [0, min(max, base * 2^attempt)).
 * Jitter spreads a crowd of clients that lost the same gateway instead of bringing them back all at once.
 */
export function backoffDelay(attempt, base = DEFAULTS.backoffBase, max = DEFAULTS.backoffMax, random = Math.random) {
  const exp = Math.min(30, Math.max(0, attempt | 0)); // 2^30 * base already exceeds any sane max
  const cap = Math.min(max, base * 2 ** exp);
  return Math.floor(random() * cap);
}

/**
 * Error settled into a request's promise: `.code` is the gateway's error code or one of the client's own; for an
 * `rpc` the service answered with an error (ADR-32), `.code` is the service's and `.service` is true.
 */
export class RoomwireError extends Error {
  constructor(code, message, service = false) {
    super(message || code);
    this.name = "RoomwireError";
    this.code = code;
    if (service) this.service = true;
  }
}

/** The bytes of a `data_b64` answer (a backend's payload that is not UTF-8). */
function fromBase64(b64) {
  return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
}

/**
 * Publishes waiting for a connection, in order, bounded: `push` refuses (returns false) when full, so the caller
 * rejects the promise instead of dropping silently. `requeue` puts publishes whose ack never came back at the front,
 * ahead of newer ones, keeping the order the application published in.
 */
export class OfflineQueue {
  constructor(limit = DEFAULTS.queueLimit) {
    this.limit = limit;
    this.items = [];
  }
  get length() {
    return this.items.length;
  }
  push(item) {
    if (this.items.length >= this.limit) return false;
    this.items.push(item);
    return true;
  }
  /** Puts `items` (oldest first) back at the front. They were accepted before, so they may exceed the limit. */
  requeue(items) {
    this.items = items.concat(this.items);
  }
  drain() {
    const out = this.items;
    this.items = [];
    return out;
  }
}

/**
 * Per history room: the epoch and the last sequence delivered to the application. `accept(seq)` says whether a
 * message is new; at-or-below the cursor is a duplicate (the seam between a recovery replay and live traffic, or a
 * re-delivery), dropped. Messages without `seq` (rooms without history) are always accepted.
 */
export class RoomCursor {
  constructor() {
    this.epoch = undefined;
    this.seq = 0;
  }
  /** True when the room has history (a join ack carried an epoch): rejoins then send `since`. */
  get recoverable() {
    return this.epoch !== undefined;
  }
  accept(seq) {
    if (typeof seq !== "number") return true;
    if (seq <= this.seq) return false;
    this.seq = seq;
    return true;
  }
  /** A join ack: `{epoch, seq}` of a history room, `recovered` when it answered a recovering join. */
  onJoinAck(ack) {
    if (ack.epoch === undefined) return "plain";
    if (ack.recovered === false || (this.epoch !== undefined && ack.epoch !== this.epoch)) {
      // The gap cannot be filled: start again from the room's present.
      this.epoch = ack.epoch;
      this.seq = typeof ack.seq === "number" ? ack.seq : 0;
      return "resync";
    }
    if (ack.recovered !== true && typeof ack.seq === "number" && ack.seq > this.seq) this.seq = ack.seq;
    this.epoch = ack.epoch;
    return ack.recovered === true ? "recovered" : "joined";
  }
  /** The `since` of a recovering join, or undefined for a plain one. */
  since() {
    return this.recoverable ? { seq: this.seq, epoch: this.epoch } : undefined;
  }
}

/** A msg_id prefix unique to this client object: [A-Za-z0-9], 16 characters. */
function randomPrefix() {
  const bytes = new Uint8Array(12);
  if (globalThis.crypto && globalThis.crypto.getRandomValues) globalThis.crypto.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  const abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
  let s = "";
  for (const b of bytes) s += abc[b % abc.length];
  return s;
}

/** Opens a client. See `Roomwire` in roomwire.d.ts. */
export function connect(url, options = {}) {
  return new Roomwire(url, options);
}

export class Roomwire {
  constructor(url, options = {}) {
    this.url = url;
    this.opts = { ...DEFAULTS, ...options };
    this.WebSocketImpl = options.WebSocket || globalThis.WebSocket;
    this.state = "connecting";
    /** Why the client stopped (state "closed"), or undefined. */
    this.closeReason = undefined;
    /** This connection's id from `welcome` (`from` of its own messages), and all it had, for `isOwn`. */
    this.conn = undefined;
    this.conns = [];
    this.handlers = new Map();
    this.roomState = new Map(); // room -> { cursor, waiters: [{resolve, reject}], joined, server }
    this.pending = new Map(); // id -> request
    this.calls = 0; // rpc calls in `pending`: bounded by _callLimit()
    this.rpcMaxInflight = undefined; // the gateway's per-connection bound on calls (welcome), if it said
    this.queue = new OfflineQueue(this.opts.queueLimit);
    this.nextId = 1;
    this.msgPrefix = randomPrefix();
    this.msgCounter = 0;
    this.attempt = 0;
    this.ws = null;
    this.ready = false; // welcome received and every room rejoined: publishes go out directly
    this.timers = new Set();
    this.openedAt = 0;
    this.token = options.token;
    this._open();
  }

  // ---- public API ----

  on(event, fn) {
    if (!this.handlers.has(event)) this.handlers.set(event, new Set());
    this.handlers.get(event).add(fn);
    return this;
  }

  off(event, fn) {
    const set = this.handlers.get(event);
    if (set) fn ? set.delete(fn) : set.clear();
    return this;
  }

  /** Joins `room` (again after every reconnect until `leave`). Resolves with the ack. */
  join(room) {
    let entry = this.roomState.get(room);
    if (!entry) {
      entry = { cursor: new RoomCursor(), waiters: [], joined: false };
      this.roomState.set(room, entry);
    }
    const p = new Promise((resolve, reject) => entry.waiters.push({ resolve, reject }));
    if (this._isOpen() && entry.waiters.length === 1) this._sendJoin(room, entry).catch(() => {});
    return p;
  }

  /** The rooms this client is in now: those it joined, and the server-side ones (token `subs`, backend `subscribe`). */
  rooms() {
    return [...this.roomState].filter(([, e]) => e.joined).map(([room]) => room);
  }

  leave(room) {
    const entry = this.roomState.get(room);
    if (entry && entry.server) {
      return Promise.reject(new RoomwireError("forbidden", "a server-side room cannot be left by the client"));
    }
    this.roomState.delete(room);
    if (!this._isOpen()) return Promise.resolve({ op: "ack" });
    return this._request({ op: "leave", room });
  }

  /** Publishes `data`; while offline it waits in the bounded queue. Resolves with the ack (`seq` in history rooms). */
  publish(room, data, { echo } = {}) {
    const frame = { op: "publish", room, data, msg_id: `${this.msgPrefix}-${++this.msgCounter}` };
    if (echo !== undefined) frame.echo = !!echo;
    return new Promise((resolve, reject) => {
      const item = { frame, resolve, reject };
      if (this.state === "closed") return reject(new RoomwireError("closed", this.closeReason || "client closed"));
      if (this.ready) return this._send(item);
      if (!this.queue.push(item)) reject(new RoomwireError("queue_full", "offline queue full: publish not sent"));
    });
  }

  /** The last `limit` messages of a history room, oldest first. */
  history(room, limit = 50) {
    return this._request({ op: "history", room, limit });
  }

  /**
   * Who is in `room` over every gateway: `{op, id, room, count, users, members: [{conn, user}]}`, or `truncated: true`
   * and no `members` in a room over the gateway's `presence.max_members`. Needs join permission, not membership.
   */
  presence(room) {
    return this._request({ op: "presence", room });
  }

  /** How many are in `room`: `{op, id, room, count, users}` (connections, distinct non-null users). */
  presenceStats(room) {
    return this._request({ op: "presence_stats", room });
  }

  /**
   * Calls `method` (a NATS request on `<rpc.subject_prefix>.<method>`, made by the gateway) with `data`; resolves with
   * the service's answer (a `Uint8Array` when its bytes were not UTF-8). Rejects with a RoomwireError: the gateway's
   * code (`no_responders`, `timeout`, `forbidden`, `bad_request`, `rate_limited`, `too_large`, `unavailable`), the
   * service's (`service: true`), `disconnected` (not connected now, or the connection dropped before the answer: the
   * call is never re-sent, and may or may not have run), `closed`, or `rate_limited` from the client itself when
   * `maxPendingCalls` (or the gateway's bound) calls already wait. `timeoutMs` is capped by the gateway's
   * `rpc.max_timeout`; without it the gateway's `rpc.timeout` applies.
   */
  rpc(method, data, { timeoutMs, timeout } = {}) {
    const ms = timeoutMs ?? timeout;
    return new Promise((resolve, reject) => {
      if (this.state === "closed") return reject(new RoomwireError("closed", this.closeReason || "client closed"));
      if (!this._isOpen()) return reject(new RoomwireError("disconnected", "not connected: calls are not queued"));
      if (typeof method !== "string" || !method) return reject(new RoomwireError("bad_request", "method: a non-empty string"));
      if (ms !== undefined && !(Number.isFinite(ms) && ms > 0)) {
        return reject(new RoomwireError("bad_request", "timeoutMs: a positive number of milliseconds"));
      }
      const limit = this._callLimit();
      if (this.calls >= limit) {
        return reject(new RoomwireError("rate_limited", `${limit} calls already await an answer`));
      }
      const frame = { op: "rpc", method, data: data === undefined ? null : data };
      if (ms !== undefined) frame.timeout_ms = Math.ceil(ms);
      // Every way a call ends (answer, error, local timeout, disconnect) passes here once: the count stays exact.
      this.calls++;
      let settled = false;
      const settle = (fn, value) => {
        if (settled) return;
        settled = true;
        this.calls--;
        fn(value);
      };
      // Past the call's own deadline plus a grace, the gateway's answer is overdue: give up locally (`timeout`).
      const wait = ms !== undefined ? ms + this.opts.rpcGrace : this.opts.requestTimeout;
      this._send(
        {
          frame,
          resolve: (f) => settle(resolve, f.data_b64 !== undefined ? fromBase64(f.data_b64) : f.data),
          reject: (err) => settle(reject, err),
        },
        wait,
      );
    });
  }

  /** True when `from` is one of this client's connections (its own messages, echoed or recovered). */
  isOwn(from) {
    return from !== undefined && this.conns.includes(from);
  }

  close() {
    this._stop("closed by the application", 1000);
  }

  // ---- connection life ----

  async _open() {
    // The first attempt is "connecting"; later ones were announced as "reconnecting" by _retry.
    if (this.attempt === 0 && !this.conns.length) this._setState("connecting");
    if (this.opts.getToken) {
      try {
        this.token = await this.opts.getToken();
      } catch (e) {
        return this._retry(`getToken failed: ${e && e.message}`);
      }
      if (this.state === "closed") return;
    }
    let ws;
    try {
      ws = new this.WebSocketImpl(this._url(), "roomwire.v1");
    } catch (e) {
      return this._stop(`bad URL: ${e && e.message}`);
    }
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
    };
    ws.onmessage = (ev) => this._onFrame(ev.data);
    ws.onclose = (ev) => {
      if (this.ws !== ws) return; // replaced (dead link) or stopped
      this._lost(ev.code, ev.reason, opened);
    };
    ws.onerror = () => {}; // always followed by close
  }

  _url() {
    // Server-side history rooms are recovered by the gateway before its welcome: it needs their positions now.
    const recover = {};
    for (const [room, entry] of this.roomState) {
      const since = entry.server && entry.cursor.since();
      if (since) recover[room] = { epoch: since.epoch, seq: since.seq };
    }
    const hasRecover = Object.keys(recover).length > 0;
    if (!this.token && !hasRecover) return this.url;
    const u = new URL(this.url);
    if (this.token) u.searchParams.set("token", this.token);
    if (hasRecover) u.searchParams.set("recover", JSON.stringify(recover));
    return u.toString();
  }

  _checkUrl() {
    if (this.opts.checkUrl === false) return undefined;
    const u = new URL(this.opts.checkUrl || "/client/check", this.url.replace(/^ws/, "http"));
    if (this.token) u.searchParams.set("token", this.token);
    return u.toString();
  }

  async _lost(code, reason, opened) {
    this._detach();
    if (this.state === "closed") return;
    if (FATAL_CLOSE.has(code) && !(code === 4001 && this.opts.getToken)) {
      return this._stop(`${code} ${reason || FATAL_CLOSE.get(code)}`, code);
    }
    if (!opened) {
      // Browsers hide the status of a refused upgrade: ask the gateway whether it is the token or the origin.
      const verdict = await this._check();
      if (this.state === "closed") return;
      if (verdict) return this._stop(verdict.reason, verdict.status);
    }
    // A connection that stayed up a while resets the backoff; one that dies at once keeps it growing.
    if (opened && Date.now() - this.openedAt >= this.opts.stableAfter) this.attempt = 0;
    const extra = code === 1001 && reason === DRAIN_REASON ? Math.floor(Math.random() * this.opts.drainDelayMax) : 0;
    this._retry(`${code}${reason ? " " + reason : ""}`, extra);
  }

  /** `{status, reason}` when the gateway refuses this token or origin (401/403), else undefined (retry). */
  async _check() {
    const url = this._checkUrl();
    if (!url || typeof fetch !== "function") return undefined;
    try {
      const resp = await fetch(url, { cache: "no-store", credentials: "same-origin" });
      if (resp.status === 401 || resp.status === 403) {
        const text = (await resp.text()).trim().slice(0, 200);
        return { status: resp.status, reason: `${resp.status} ${text || "refused"}` };
      }
    } catch {
      // Unreachable or cross-origin without CORS: nothing learned, keep retrying.
    }
    return undefined;
  }

  _retry(why, extra = 0) {
    const delay = backoffDelay(this.attempt++, this.opts.backoffBase, this.opts.backoffMax) + extra;
    this._setState("reconnecting", { reason: why, delay });
    this._timer(() => this._open(), delay);
  }

  /** Forgets the socket: pending non-publish requests fail, unacked publishes go back to the queue. */
  _detach() {
    const ws = this.ws;
    this.ws = null;
    this.ready = false;
    this.conn = undefined;
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close();
      } catch {
        // already closing
      }
    }
    const resend = [];
    for (const req of this.pending.values()) {
      clearTimeout(req.timer);
      if (req.frame.op === "publish") resend.push(req);
      else if (req.frame.op === "join" || req.frame.op === "ping") continue; // joins are redone from `rooms`
      else if (req.frame.op === "rpc") {
        // Never re-sent: the service may have acted on it already (the gateway never retries either).
        req.reject(new RoomwireError("disconnected", "connection lost before the answer: the call may have run"));
      } else req.reject(new RoomwireError("disconnected", "connection lost before the answer"));
    }
    this.pending.clear();
    // Same msg_id on the re-send: in a history room the gateway's JetStream dedup keeps one copy.
    resend.sort((a, b) => a.order - b.order);
    this.queue.requeue(resend.map(({ frame, resolve, reject }) => ({ frame, resolve, reject })));
    for (const entry of this.roomState.values()) entry.joined = false;
  }

  _stop(reason, code) {
    if (this.state === "closed") return;
    this.closeReason = reason;
    this.state = "closed";
    this._detach();
    const err = new RoomwireError("closed", reason);
    for (const item of this.queue.drain()) item.reject(err);
    for (const entry of this.roomState.values()) for (const w of entry.waiters.splice(0)) w.reject(err);
    this._emit("state", "closed", { reason, code });
  }

  _setState(s, info) {
    if (this.state === "closed") return;
    this.state = s;
    this._emit("state", s, info || {});
  }

  _timer(fn, ms) {
    // setTimeout fires at once for delays over 2^31 - 1 ms: clamp, so a huge option means "rarely", not "always".
    const t = setTimeout(
      () => {
        this.timers.delete(t);
        fn();
      },
      Math.min(ms, 2 ** 31 - 1),
    );
    this.timers.add(t);
    return t;
  }

  _isOpen() {
    return !!this.ws && this.conn !== undefined;
  }

  // ---- frames ----

  _onFrame(text) {
    let f;
    try {
      f = JSON.parse(text);
    } catch {
      return;
    }
    switch (f.op) {
      case "welcome":
        return this._welcome(f);
      case "message":
        return this._message(f);
      case "ack":
      case "pong":
      case "history":
      case "presence":
      case "presence_stats":
        return this._answer(f, null);
      case "rpc_result": {
        const e = f.error;
        if (!e) return this._answer(f, null);
        const code = typeof e === "object" && e !== null ? String(e.code) : "error";
        return this._answer(f, new RoomwireError(code, (e && e.message) || code, true));
      }
      case "error":
        if (f.id !== undefined && this.pending.has(f.id)) return this._answer(f, new RoomwireError(f.code, f.message));
        // A late answer to a request already settled here (timed out locally): its promise has spoken.
        if (typeof f.id === "number" && f.id < this.nextId) return undefined;
        return this._emit("error", new RoomwireError(f.code, f.message));
      case "member_joined":
      case "member_left":
        return this._member(f);
      case "gap":
        return this._emit("gap", { room: f.room, dropped: f.dropped });
      case "left": {
        this.roomState.delete(f.room);
        return this._emit("left", { room: f.room, reason: f.reason });
      }
      case "joined":
        return this._serverRoom(f);
      case "token_expiring":
        return this._refresh();
      default:
        return undefined;
    }
  }

  _welcome(f) {
    this.conn = f.conn;
    this.conns.push(f.conn);
    if (this.conns.length > 32) this.conns.shift();
    this.openedAt = Date.now();
    this.user = f.user;
    // Gateways with RPC on say their per-connection bound; calls over it would only be refused there.
    this.rpcMaxInflight = Number.isInteger(f.rpc_max_inflight) && f.rpc_max_inflight > 0 ? f.rpc_max_inflight : undefined;
    this._setState("open", { conn: f.conn });
    this._schedulePing();
    // Server-side rooms come with the welcome, already joined (and recovered); those it no longer lists are gone.
    const listed = new Set();
    for (const r of Array.isArray(f.rooms) ? f.rooms : []) {
      listed.add(r.room);
      if (r.error) {
        const err = new RoomwireError(r.error, `server-side room ${r.room} not joined`);
        err.room = r.room;
        this._emit("error", err);
      } else this._serverRoom(r);
    }
    for (const [room, entry] of this.roomState) {
      if (entry.server && !listed.has(room) && entry.server !== "backend") {
        this.roomState.delete(room);
        this._emit("left", { room, reason: "removed" });
      }
    }
    // Rejoin every room, then send what waited: a publish must not reach the gateway before its room's join.
    const ws = this.ws;
    const joins = [];
    for (const [room, entry] of this.roomState) {
      if (!listed.has(room)) joins.push(this._rejoin(room, entry, ws));
    }
    Promise.all(joins).then(() => {
      if (this.ws !== ws || !this._isOpen()) return;
      this.ready = true;
      for (const item of this.queue.drain()) this._send(item);
    });
  }

  /** A server-side room the gateway reports joined (in `welcome`, or `joined` after a backend's `subscribe`). */
  _serverRoom(f) {
    let entry = this.roomState.get(f.room);
    if (!entry) {
      entry = { cursor: new RoomCursor(), waiters: [], joined: false };
      this.roomState.set(f.room, entry);
    }
    // "token" rooms come back with every welcome; "backend" ones are rejoined after a reconnect like the client's.
    entry.server = f.op === "joined" ? "backend" : "token";
    entry.joined = true;
    // A history room we had a position in, rejoined without an answer to its recovery (the `recover` parameter did
    // not reach the gateway): what was missed is unknown, so resync rather than skip silently.
    const unanswered = entry.cursor.recoverable && f.epoch !== undefined && f.recovered === undefined;
    const outcome = entry.cursor.onJoinAck(unanswered ? { ...f, recovered: false } : f);
    for (const w of entry.waiters.splice(0)) w.resolve(f);
    if (outcome === "resync") this._emit("resync", f.room);
    this._emit("joined", f.room, f);
  }

  /** A rejoin after a reconnect: transient refusals (a gateway still connecting to NATS) are retried. Never rejects. */
  async _rejoin(room, entry, ws) {
    for (let attempt = 0; ; attempt++) {
      try {
        return await this._sendJoin(room, entry, true);
      } catch (err) {
        if (!TRANSIENT.has(err.code) || attempt >= 8 || this.ws !== ws) return undefined;
        await new Promise((r) => this._timer(r, backoffDelay(attempt + 1, this.opts.backoffBase, this.opts.backoffMax)));
        if (this.ws !== ws || this.roomState.get(room) !== entry) return undefined;
      }
    }
  }

  _sendJoin(room, entry, retrying = false) {
    const frame = { op: "join", room };
    const since = entry.cursor.since();
    if (since) frame.since = since;
    return this._request(frame).then(
      (ack) => {
        if (this.roomState.get(room) !== entry) return ack; // left meanwhile
        entry.joined = true;
        const outcome = entry.cursor.onJoinAck(ack);
        for (const w of entry.waiters.splice(0)) w.resolve(ack);
        if (outcome === "resync") this._emit("resync", room);
        this._emit("joined", room, ack);
        return ack;
      },
      (err) => {
        if (err.code === "disconnected") throw err; // redone after the reconnect
        if (retrying && TRANSIENT.has(err.code)) throw err; // _rejoin tries again
        // Refused (forbidden, invalid_room, ...) or, for a first join, any failure: the application decides.
        if (this.roomState.get(room) === entry) this.roomState.delete(room);
        for (const w of entry.waiters.splice(0)) w.reject(err);
        throw err;
      },
    );
  }

  _message(f) {
    const entry = this.roomState.get(f.room);
    if (!entry) return; // left already
    if (!entry.cursor.accept(f.seq)) return; // already delivered
    const msg = { room: f.room, data: f.data, from: f.from, seq: f.seq };
    if (f.data_b64 !== undefined) msg.dataB64 = f.data_b64;
    this._emit("message", msg);
  }

  /** A presence event: `{room, type, conn, user}` and `first` (joined) or `last` and `reason` (left). */
  _member(f) {
    if (!this.roomState.has(f.room)) return; // left already
    const e = { room: f.room, type: f.op === "member_joined" ? "joined" : "left", conn: f.conn, user: f.user ?? null };
    if (e.type === "joined") e.first = f.first;
    else {
      e.last = f.last;
      e.reason = f.reason;
    }
    this._emit("presence", e);
  }

  _answer(f, err) {
    const req = this.pending.get(f.id);
    if (!req) return;
    this.pending.delete(f.id);
    clearTimeout(req.timer);
    err ? req.reject(err) : req.resolve(f);
  }

  _request(frame) {
    return new Promise((resolve, reject) => {
      if (!this._isOpen()) return reject(new RoomwireError("disconnected", "not connected"));
      this._send({ frame, resolve, reject });
    });
  }

  /** How many rpc calls may wait at once: the option, lowered to the gateway's bound when it stated one. */
  _callLimit() {
    return Math.min(this.opts.maxPendingCalls, this.rpcMaxInflight ?? Infinity);
  }

  _send(item, wait = this.opts.requestTimeout) {
    const id = this.nextId++;
    const req = { ...item, frame: { ...item.frame, id }, order: id };
    req.timer = setTimeout(
      () => {
        if (this.pending.get(id) !== req) return;
        // Forgotten here, so a late answer finds nothing to settle.
        this.pending.delete(id);
        req.reject(new RoomwireError("timeout", `no answer to ${req.frame.op} within ${wait} ms`));
      },
      Math.min(wait, 2 ** 31 - 1),
    );
    this.pending.set(id, req);
    try {
      this.ws.send(JSON.stringify(req.frame));
    } catch {
      // The close event follows and re-queues it (publishes) or fails it.
    }
  }

  _schedulePing() {
    this._timer(() => {
      if (!this._isOpen()) return;
      const ws = this.ws;
      const dead = this._timer(() => {
        if (this.ws === ws) this._lost(4000, "no pong: dead link", true);
      }, this.opts.pingTimeout);
      this._request({ op: "ping" }).then(
        () => {
          clearTimeout(dead);
          this.timers.delete(dead);
          this._schedulePing();
        },
        () => {},
      );
    }, this.opts.pingInterval);
  }

  async _refresh() {
    if (!this.opts.getToken) return; // the gateway closes with 4001 at expiry; reported then
    try {
      this.token = await this.opts.getToken();
      await this._request({ op: "refresh", token: this.token });
    } catch (e) {
      this._emit("error", e instanceof RoomwireError ? e : new RoomwireError("refresh_failed", String(e)));
    }
  }

  _emit(event, ...args) {
    const set = this.handlers.get(event);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(...args);
      } catch (e) {
        // A throwing handler must not break the client; surface it asynchronously.
        setTimeout(() => {
          throw e;
        });
      }
    }
  }
}
