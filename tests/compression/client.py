"""A real permessage-deflate client for tests/compression.rs: the Python `websockets` library with its default
compression (it offers `permessage-deflate; client_max_window_bits` and compresses every message it sends).

Usage: client.py URL [CAFILE]. Talks line-delimited JSON on stdout/stdin with the Rust test:
  prints {"extensions": <the 101's Sec-WebSocket-Extensions>} once connected and joined to room "chat";
  publishes the two messages read from stdin (one JSON value per line), waiting for each ack;
  prints {"published": 2};
  then prints {"got": [data, data]} for the next two room messages it receives, and closes normally.
"""
import asyncio
import json
import ssl
import sys

from websockets.asyncio.client import connect


async def recv_op(ws, op):
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if msg.get("op") == op:
            return msg
        if msg.get("op") == "error":
            raise SystemExit(f"error frame: {msg}")


def say(obj):
    print(json.dumps(obj), flush=True)


async def main(url, cafile):
    ctx = None
    if url.startswith("wss:"):
        ctx = ssl.create_default_context(cafile=cafile)
    async with connect(url, ssl=ctx, max_size=2**20) as ws:
        await recv_op(ws, "welcome")
        await ws.send(json.dumps({"op": "join", "room": "chat", "id": 1}))
        await recv_op(ws, "ack")
        say({"extensions": ws.response.headers.get("Sec-WebSocket-Extensions")})
        loop = asyncio.get_running_loop()
        for i in range(2):
            line = await loop.run_in_executor(None, sys.stdin.readline)
            data = json.loads(line)
            await ws.send(json.dumps({"op": "publish", "room": "chat", "data": data, "id": 10 + i}))
            await recv_op(ws, "ack")
        say({"published": 2})
        got = []
        while len(got) < 2:
            got.append((await recv_op(ws, "message"))["data"])
        say({"got": got})


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
