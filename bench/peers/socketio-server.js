// Socket.IO 4.8 peer for scripts/bench: rooms with a join event, and a "pub" event from the generator's publisher
// connection that broadcasts to a room (encoded once per broadcast by the default in-memory adapter).
//
// Usage: node socketio-server.js [port] [host]
//   client -> server   42<id>["join","r0"]          join room r0, acked with 43<id>[]
//   client -> server   42["pub","r0",{...payload}]   broadcast {"op":"message","room":"r0","data":payload} as event "msg"
//   server -> client   42["msg",{...}]
"use strict";
const http = require("http");
const { Server } = require("socket.io");

const port = Number(process.argv[2] || 9300);
const host = process.argv[3] || "127.0.0.1";

const io = new Server({
  transports: ["websocket"], // the generator speaks Engine.IO v4 over WebSocket directly, no polling
  perMessageDeflate: false,
  httpCompression: false,
  serveClient: false,
  maxHttpBufferSize: 1e6,
});

io.on("connection", (socket) => {
  socket.on("join", (room, ack) => {
    socket.join(String(room));
    if (typeof ack === "function") ack();
  });
  socket.on("pub", (room, data) => {
    io.to(String(room)).emit("msg", { op: "message", room: String(room), data });
  });
});

// io.listen(port) would bind every address; bind the loopback host explicitly through our own http server.
const httpServer = http.createServer();
io.attach(httpServer);
httpServer.listen(port, host, () => {
  console.error(`socketio-server listening on ${host}:${port} pid ${process.pid}`);
});
