// The browser tests' stack, all real and on dynamic ports: nats-server with JetStream, the gateway binary with TLS
// (a self-signed certificate made by `roomwire gen-cert`, trusted by Chromium through its SPKI hash and nothing
// else), Debian's chromium driven by playwright-core, a NATS backend speaking the NATS text protocol over TCP, and
// the demo's RPC service (examples/rpc_service.rs, built by scripts/browser-tests) when a test asks for it.
// Every process started here is killed when the test process exits (and its pid written to $ROOMWIRE_BT_PIDS, which
// scripts/browser-tests kills on exit too, should this process die first).
import { spawn, execFileSync } from "node:child_process";
import { X509Certificate, createHash } from "node:crypto";
import fs from "node:fs";
import https from "node:https";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { once } from "node:events";

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), "../..");
export const WAIT = 15000;

const children = new Set();
function track(child) {
  children.add(child);
  if (process.env.ROOMWIRE_BT_PIDS) fs.appendFileSync(process.env.ROOMWIRE_BT_PIDS, `${child.pid}\n`);
  child.on("exit", () => children.delete(child));
  return child;
}
function killAll() {
  for (const c of children) {
    try {
      c.kill("SIGKILL");
    } catch {
      // gone
    }
  }
}
process.on("exit", killAll);
for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => process.exit(130));

/** Resolves when `pred()` is truthy; rejects after `ms` naming `what`. Polls: these are other processes. */
export async function until(pred, what, ms = WAIT) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await pred();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function freePort() {
  const s = net.createServer();
  s.listen(0, "127.0.0.1");
  await once(s, "listening");
  const { port } = s.address();
  s.close();
  await once(s, "close");
  return port;
}

export class Stack {
  /**
   * Options: `presenceTtl` (the gateways' `presence.ttl`, default the gateway's), `certFrom` (another stack: use its
   * certificate, so a browser launched for that one trusts this one too).
   */
  static async start(opts = {}) {
    const st = new Stack();
    st.opts = opts;
    st.dir = fs.mkdtempSync(path.join(os.tmpdir(), "roomwire-bt-"));
    st.bin = process.env.ROOMWIRE_BIN || path.join(root, "target/debug/roomwire");
    await st.startNats();
    if (opts.certFrom) {
      for (const f of ["dev-cert.pem", "dev-key.pem"]) fs.copyFileSync(path.join(opts.certFrom.dir, f), path.join(st.dir, f));
    } else {
      execFileSync(st.bin, ["gen-cert", "--dir", st.dir], { stdio: "ignore" });
    }
    const pem = fs.readFileSync(path.join(st.dir, "dev-cert.pem"), "utf8");
    st.pem = pem;
    const spki = new X509Certificate(pem).publicKey.export({ type: "spki", format: "der" });
    st.spkiHash = createHash("sha256").update(spki).digest("base64");
    st.port = await freePort();
    st.config = st.writeConfig(st.port, "gateway.toml");
    st.history = true;
    await st.startGateway();
    return st;
  }

  async startNats() {
    const portsDir = path.join(this.dir, "ports");
    fs.mkdirSync(portsDir);
    const bin = process.env.NATS_SERVER || path.join(root, ".tools/nats/bin/nats-server");
    const args = ["-a", "127.0.0.1", "-p", "-1", "-js", "-sd", path.join(this.dir, "js"), "--ports_file_dir", portsDir];
    this.nats = track(spawn(bin, args, { stdio: "ignore" }));
    const file = await until(() => fs.readdirSync(portsDir).find((f) => f.endsWith(".ports")), "nats ports file");
    const ports = JSON.parse(fs.readFileSync(path.join(portsDir, file), "utf8"));
    this.natsPort = Number(ports.nats[0].split(":").pop());
  }

  /** Writes the gateway's config, with history for rooms `h-*` and presence in every room. */
  writeConfig(port, name) {
    const base = `
[server]
listen = "127.0.0.1:${port}"
demo = true
shutdown_grace = "2s"
[tls]
cert_file = "${path.join(this.dir, "dev-cert.pem")}"
key_file = "${path.join(this.dir, "dev-key.pem")}"
[nats]
url = "nats://127.0.0.1:${this.natsPort}"
[auth]
allow_anonymous = true
[auth.anonymous]
join = ["*"]
publish = ["*"]
rpc = ["demo.*"]
[rpc]
enabled = true
`;
    const ttl = this.opts.presenceTtl ? `ttl = "${this.opts.presenceTtl}"\n` : "";
    const config = path.join(this.dir, name);
    fs.writeFileSync(config, `${base}\n[history]\nenabled = true\nrooms = ["h-*"]\n[presence]\nenabled = true\n${ttl}`);
    execFileSync(this.bin, ["check-config", "--config", config], { stdio: "inherit" });
    return config;
  }

  async startGateway() {
    this.gateway = await this.spawnGateway(this.config, this.port, "gateway.log");
  }

  async spawnGateway(config, port, logName) {
    const log = fs.openSync(path.join(this.dir, logName), "a");
    const child = track(spawn(this.bin, ["--config", config], { stdio: ["ignore", log, log] }));
    // Ready when /healthz answers over TLS, the certificate verified against itself (it is self-signed).
    await until(() => this.healthz(port), "gateway /healthz");
    return child;
  }

  /**
   * A second gateway on the same NATS (its own port, the same settings): `{ process, port, origin, wsUrl }`. Killed
   * with the test process, or by the test (`process.kill("SIGKILL")`).
   */
  async addGateway() {
    const port = await freePort();
    const n = (this.extra = (this.extra || 1) + 1);
    const config = this.writeConfig(port, `gateway-${n}.toml`);
    const child = await this.spawnGateway(config, port, `gateway-${n}.log`);
    return { process: child, port, origin: `https://localhost:${port}`, wsUrl: `wss://localhost:${port}/ws` };
  }

  /**
   * Starts the demo's RPC service (examples/rpc_service.rs) on this stack's NATS; resolves once its endpoints are
   * subscribed (it says so on stdout). Killed with the stack's other processes.
   */
  async startRpcService() {
    const bin = process.env.ROOMWIRE_RPC_SERVICE || path.join(root, "target/debug/examples/rpc_service");
    const child = track(spawn(bin, [`nats://127.0.0.1:${this.natsPort}`], { stdio: ["ignore", "pipe", "inherit"] }));
    let out = "";
    child.stdout.on("data", (d) => (out += d));
    await until(() => out.includes("rpc service on") || child.exitCode !== null, "the rpc service's endpoints");
    if (child.exitCode !== null) throw new Error(`rpc service exited: ${child.exitCode}`);
    this.rpcService = child;
    return child;
  }

  healthz(port = this.port) {
    return new Promise((resolve) => {
      const req = https.get(
        { host: "127.0.0.1", port, path: "/healthz", servername: "localhost", ca: this.pem },
        (res) => {
          res.resume();
          resolve(res.statusCode === 200);
        },
      );
      req.on("error", () => resolve(false));
    });
  }

  async stopGateway() {
    const g = this.gateway;
    if (!g || g.exitCode !== null) return;
    g.kill("SIGTERM");
    await once(g, "exit");
  }

  async restartGateway() {
    await this.stopGateway();
    await this.startGateway();
  }

  get origin() {
    return `https://localhost:${this.port}`;
  }

  get wsUrl() {
    return `wss://localhost:${this.port}/ws`;
  }

  log() {
    return fs.readFileSync(path.join(this.dir, "gateway.log"), "utf8");
  }

  async stop() {
    this.rpcService?.kill("SIGTERM");
    await this.stopGateway();
    this.nats.kill("SIGTERM");
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

/** A NATS backend in a few lines of the NATS text protocol (CONNECT, PUB, SUB, PING; MSG and HMSG parsed). */
export class Nats {
  static async connect(port) {
    const n = new Nats();
    n.sock = net.connect(port, "127.0.0.1");
    n.buf = Buffer.alloc(0);
    n.subs = new Map();
    n.pongs = [];
    n.sid = 0;
    n.sock.on("data", (d) => n.onData(d));
    await once(n.sock, "connect");
    n.sock.write('CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":false}\r\n');
    await n.flush();
    return n;
  }

  pub(subject, data) {
    const payload = Buffer.from(typeof data === "string" ? data : JSON.stringify(data));
    this.sock.write(`PUB ${subject} ${payload.length}\r\n`);
    this.sock.write(payload);
    this.sock.write("\r\n");
  }

  /** Subscribes; returns the array its messages' payloads (parsed JSON) are pushed to. */
  async sub(subject) {
    const sid = String(++this.sid);
    const messages = [];
    this.subs.set(sid, messages);
    this.sock.write(`SUB ${subject} ${sid}\r\n`);
    await this.flush();
    return messages;
  }

  /** PING/PONG round trip: everything written before has been processed by the server. */
  flush() {
    return new Promise((resolve) => {
      this.pongs.push(resolve);
      this.sock.write("PING\r\n");
    });
  }

  onData(d) {
    this.buf = Buffer.concat([this.buf, d]);
    for (;;) {
      const eol = this.buf.indexOf("\r\n");
      if (eol < 0) return;
      const line = this.buf.subarray(0, eol).toString();
      const parts = line.split(" ");
      if (parts[0] === "MSG" || parts[0] === "HMSG") {
        const total = Number(parts.at(-1));
        const hdr = parts[0] === "HMSG" ? Number(parts.at(-2)) : 0;
        if (this.buf.length < eol + 2 + total + 2) return;
        const body = this.buf.subarray(eol + 2 + hdr, eol + 2 + total).toString();
        this.buf = this.buf.subarray(eol + 2 + total + 2);
        const list = this.subs.get(parts[2]);
        if (list) list.push(JSON.parse(body));
        continue;
      }
      this.buf = this.buf.subarray(eol + 2);
      if (parts[0] === "PING") this.sock.write("PONG\r\n");
      else if (parts[0] === "PONG") this.pongs.shift()?.();
      else if (parts[0] === "-ERR") throw new Error(`NATS: ${line}`);
    }
  }

  close() {
    this.sock.destroy();
  }
}

/** Debian's chromium (never a downloaded build), trusting exactly the stack's certificate. */
export async function launchBrowser(stack) {
  const { chromium } = await import("playwright-core");
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: [`--ignore-certificate-errors-spki-list=${stack.spkiHash}`, "--no-sandbox"],
  });
}
