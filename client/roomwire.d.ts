// Types of the Roomwire browser client (/client/roomwire.js). Protocol: docs/protocol.md; guide: docs/client.md.

export interface ConnectOptions {
  /** A fixed token, sent as `?token=` (browsers cannot set headers on a WebSocket). */
  token?: string;
  /** Called before every (re)connect and on `token_expiring` (then sent with `refresh`). Wins over `token`. */
  getToken?: () => Promise<string> | string;
  /** First retry waits up to this many ms (full jitter). Default 500. */
  backoffBase?: number;
  /** No retry waits longer than this many ms. Default 30000. */
  backoffMax?: number;
  /** A connection open this long (ms) resets the backoff. Default 10000. */
  stableAfter?: number;
  /** An ack not received within this many ms rejects the promise with code `timeout`. Default 10000. */
  requestTimeout?: number;
  /** Milliseconds between app-level pings while open. Default 15000. */
  pingInterval?: number;
  /** No pong within this many ms: the link is dead, reconnect. Default 10000. */
  pingTimeout?: number;
  /** Publishes kept while offline; beyond, `publish` rejects with code `queue_full`. Default 256. */
  queueLimit?: number;
  /** Where to ask why a connection failed before opening (default `/client/check` on the gateway); false: never. */
  checkUrl?: string | false;
  /** After a draining gateway's close (1001 `going away: reconnect`), wait up to this many extra ms (random) before
   *  reconnecting, so the clients of one gateway do not reach the others all at once. Default 5000. */
  drainDelayMax?: number;
  /** RPC calls awaiting their answer at once; one more rejects with `rate_limited` without being sent. A gateway
   *  that states its own per-connection bound (`rpc_max_inflight` in `welcome`) lowers it. Default 64. */
  maxPendingCalls?: number;
  /** Milliseconds the client waits past a call's `timeoutMs` before giving up locally (`timeout`), so the gateway's
   *  own `timeout` answer normally comes first. Calls without `timeoutMs` wait `requestTimeout`. Default 2000. */
  rpcGrace?: number;
  /** WebSocket constructor (default `globalThis.WebSocket`). */
  WebSocket?: typeof WebSocket;
}

export type State = "connecting" | "open" | "reconnecting" | "closed";

export interface StateInfo {
  /** Why: the close that caused a reconnect, or why the client stopped. */
  reason?: string;
  /** Close code or HTTP status (401/403) that stopped it. */
  code?: number;
  /** Milliseconds until the next attempt (state `reconnecting`). */
  delay?: number;
  /** Connection id (state `open`). */
  conn?: string;
}

export interface Message<T = unknown> {
  room: string;
  /** The payload (absent when the backend's bytes were not UTF-8: see `dataB64`). */
  data: T;
  /** Base64 of a backend's non-UTF-8 payload. */
  dataB64?: string;
  /** Publishing connection's id; absent when a backend published. */
  from?: string;
  /** Stream sequence in history rooms. */
  seq?: number;
}

export interface Ack {
  op: "ack";
  id: number;
  /** Stream sequence: of the stored message (publish), or the room's last (join) in history rooms. */
  seq?: number;
  /** History rooms: opaque stream epoch. */
  epoch?: string;
  /** Recovering join: whether every missed message follows. */
  recovered?: boolean;
}

export interface HistoryAnswer {
  op: "history";
  id: number;
  room: string;
  epoch: string;
  messages: { seq: number; data: unknown; from?: string }[];
}

/** One connection in a presence room. `user` is the token's subject, null for an anonymous connection. */
export interface Member {
  conn: string;
  user: string | null;
}

/** `rw.presence(room)`: every connection in the room over all gateways. */
export interface PresenceAnswer {
  op: "presence";
  id: number;
  room: string;
  /** Connections in the room. */
  count: number;
  /** Distinct non-null users. */
  users: number;
  /** Absent when the room has more than the gateway's `presence.max_members` connections (then `truncated`). */
  members?: Member[];
  truncated?: true;
}

/** `rw.presenceStats(room)`: the counts only. */
export interface PresenceStats {
  op: "presence_stats";
  id: number;
  room: string;
  count: number;
  users: number;
}

/** Why a member left: it sent `leave`, its connection (or its gateway, gracefully) ended, or its gateway vanished. */
export type LeaveReason = "leave" | "disconnect" | "gateway_lost";

/** A connection joined or left a presence room this client is in (on any gateway; this client's own included). */
export type PresenceEvent =
  | {
      room: string;
      type: "joined";
      conn: string;
      user: string | null;
      /** The user's first connection in the room over all gateways (always true when anonymous). */
      first: boolean;
      last?: undefined;
      reason?: undefined;
    }
  | {
      room: string;
      type: "left";
      conn: string;
      user: string | null;
      first?: undefined;
      /** The user has no connection left in the room (always true when anonymous). */
      last: boolean;
      reason: LeaveReason;
    };

/** Settled into a promise: `code` is the gateway's error code, or `timeout`, `disconnected`, `queue_full`, `closed`.
 *  For `rpc`, when the service answered an error (ADR-32), `code` is the service's (e.g. "400") and `service` true. */
export declare class RoomwireError extends Error {
  constructor(code: string, message?: string, service?: boolean);
  code: string;
  service?: true;
}

/** Codes an `rpc` call rejects with when the gateway or the client (not the service) ends it (docs/rpc.md). */
export type RpcErrorCode =
  | "no_responders"
  | "timeout"
  | "too_large"
  | "rate_limited"
  | "unavailable"
  | "forbidden"
  | "bad_request"
  | "disconnected"
  | "closed";

export interface RpcOptions {
  /** The call's deadline in ms, capped by the gateway's `rpc.max_timeout`; default the gateway's `rpc.timeout`. */
  timeoutMs?: number;
  /** Same as `timeoutMs` (which wins when both are given). */
  timeout?: number;
}

export interface Events {
  message: (msg: Message) => void;
  state: (state: State, info: StateInfo) => void;
  gap: (gap: { room: string; dropped: number }) => void;
  /** A rejoin could not recover what was missed (`recovered:false`): reload the room's state. */
  resync: (room: string) => void;
  /** The gateway took the client out of `room`: `removed` (a backend's `unsubscribe`), or why a refresh or the room's
   *  end did. */
  left: (left: { room: string; reason: "removed" | string }) => void;
  /** The join of `room` was acked: the first time and after every rejoin following a reconnect. Also for server-side
   *  rooms: those the `welcome` lists (the token's `subs`) and those a backend adds (`subscribe`), with `ack` then
   *  `{room, epoch?, seq?, recovered?}`. What a reconnect may have made stale (the room's presence) is to be fetched
   *  again here. */
  joined: (room: string, ack: Ack) => void;
  /** `member_joined` / `member_left` of a presence room (not sent in rooms over `presence.max_members`). */
  presence: (event: PresenceEvent) => void;
  error: (err: RoomwireError) => void;
}

export declare class Roomwire {
  readonly state: State;
  /** Why the client stopped: e.g. `4003 <reason>` after a backend's `disconnect`, which is never retried. */
  readonly closeReason?: string;
  /** This connection's id (from `welcome`), undefined while not open. */
  readonly conn?: string;
  on<E extends keyof Events>(event: E, fn: Events[E]): this;
  off<E extends keyof Events>(event: E, fn?: Events[E]): this;
  /** Joins, and rejoins after every reconnect until `leave`. */
  join(room: string): Promise<Ack>;
  /** Rejects with `forbidden` for a server-side room (the token's `subs`, a backend's `subscribe`). */
  leave(room: string): Promise<Ack>;
  /** The rooms the client is in now: joined by it, or server-side (recovered after a reconnect by the gateway). */
  rooms(): string[];
  /** Waits in the offline queue while not connected. */
  publish(room: string, data: unknown, options?: { echo?: boolean }): Promise<Ack>;
  history(room: string, limit?: number): Promise<HistoryAnswer>;
  /** Who is in `room` over every gateway (needs join permission; rejects `bad_request` outside `presence.rooms`).
   *  Like `history`, rejects with `disconnected` while not connected. */
  presence(room: string): Promise<PresenceAnswer>;
  presenceStats(room: string): Promise<PresenceStats>;
  /** Calls a NATS service through the gateway (`<rpc.subject_prefix>.<method>`); resolves with its answer (a
   *  `Uint8Array` when the service's bytes were not UTF-8). Never queued offline, never re-sent: rejects at once with
   *  `disconnected` while not connected, and with `disconnected` when the connection drops before the answer (the
   *  call may have run). See `RpcErrorCode`; a service's error answer rejects with its code and `service: true`. */
  rpc<T = unknown>(method: string, data?: unknown, options?: RpcOptions): Promise<T>;
  /** True when `from` is one of this client's connections (now or before a reconnect). */
  isOwn(from: string | undefined): boolean;
  close(): void;
}

export declare function connect(url: string, options?: ConnectOptions): Roomwire;

/** Full-jitter delay (ms) before reconnect attempt `attempt` (0-based). */
export declare function backoffDelay(attempt: number, base?: number, max?: number, random?: () => number): number;

export declare class OfflineQueue<T = unknown> {
  constructor(limit?: number);
  readonly length: number;
  push(item: T): boolean;
  requeue(items: T[]): void;
  drain(): T[];
}

export declare class RoomCursor {
  epoch?: string;
  seq: number;
  readonly recoverable: boolean;
  accept(seq: number | undefined): boolean;
  onJoinAck(ack: Ack): "plain" | "joined" | "recovered" | "resync";
  since(): { seq: number; epoch: string } | undefined;
}

/** The reason of the close 1001 a draining gateway sends. */
export declare const DRAIN_REASON: string;
export declare const DEFAULTS: Readonly<Required<Omit<ConnectOptions, "token" | "getToken" | "WebSocket">>>;
