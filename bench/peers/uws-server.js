// uWebSockets.js peer for scripts/bench: plain JSON text frames, rooms are uWS topics (app.publish), the
// near-the-limit reference.
//
// Usage: node uws-server.js [port] [host] [compression]
//   compression: off (default), shared (uWS.SHARED_COMPRESSOR: no context takeover, each published message compressed
//   per publish, the closest to Roomwire's compress-once) or dedicated (uWS.DEDICATED_COMPRESSOR: a 32 KiB sliding
//   window per socket, context takeover; the per-connection reference).
//   client -> server   {"op":"join","room":"r0","id":1}        subscribe to topic r0, acked with {"op":"ack","id":1}
//   client -> server   {"op":"pub","room":"r0","data":{...}}    publish {"op":"message","room":"r0","data":{...}}
"use strict";
const uWS = require("@trufflesuite/uws-js-unofficial");

const port = Number(process.argv[2] || 9400);
const host = process.argv[3] || "127.0.0.1";
const mode = process.argv[4] || "off";
const compressionModes = { off: uWS.DISABLED, shared: uWS.SHARED_COMPRESSOR, dedicated: uWS.DEDICATED_COMPRESSOR };
if (!(mode in compressionModes)) {
  console.error(`uws-server: compression must be one of ${Object.keys(compressionModes).join(", ")}`);
  process.exit(2);
}
const compress = mode !== "off";
const decoder = new TextDecoder();

const app = uWS.App();
app.ws("/*", {
  compression: compressionModes[mode],
  maxPayloadLength: 64 * 1024,
  idleTimeout: 0, // no server-side idle close: the generator's idle clients send nothing
  // maxBackpressure / closeOnBackpressureLimit are left at uWS's defaults: what a user gets out of the box.
  message: (ws, message) => {
    let m;
    try {
      m = JSON.parse(decoder.decode(message));
    } catch (_) {
      return;
    }
    if (m.op === "join") {
      ws.subscribe(String(m.room));
      ws.send(JSON.stringify({ op: "ack", id: m.id }), false, false);
    } else if (m.op === "pub") {
      const room = String(m.room);
      app.publish(room, '{"op":"message","room":' + JSON.stringify(room) + ',"data":' + JSON.stringify(m.data) + "}", false, compress);
    }
  },
});
app.listen(host, port, (token) => {
  if (!token) {
    console.error(`uws-server: cannot listen on ${host}:${port}`);
    process.exit(1);
  }
  console.error(`uws-server listening on ${host}:${port} pid ${process.pid}`);
});
