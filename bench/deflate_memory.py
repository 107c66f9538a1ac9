"""Memory per WebSocket with per-message deflate on and off (issue 22, finding 8).

    .venv/bin/python bench/deflate_memory.py                 # 500 sockets, each way
    .venv/bin/python bench/deflate_memory.py --sockets 1000 --unauthenticated

Starts `python -m droid` with DROID_WS_COMPRESSION=false, then =true, opens `--sockets`
WebSockets that offer permessage-deflate (the `websockets` client's default offer,
`permessage-deflate; client_max_window_bits`, as browsers send), each joined on /events and
exchanging one `ping`/`pong` (so both the server's compressor and decompressor have run), or
with `--unauthenticated` only the Engine.IO handshake; then reads the server's RSS. Prints RSS
per socket over the server at rest, each way, and what compression adds per socket.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import jwt
import websockets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "bench-secret-that-is-at-least-32-bytes-long!"


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def one(port: int, joined: bool, held: list) -> None:
    url = f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket"
    ws = await websockets.connect(url, compression="deflate", max_size=None, open_timeout=30)
    held.append(ws)
    assert (await ws.recv()).startswith("0{")
    if not joined:
        return
    token = jwt.encode({"sub": str(uuid.uuid4()), "exp": time.time() + 3600}, SECRET,
                       algorithm="HS256")
    await ws.send('40/events,{"token":"%s"}' % token)
    await ws.send('42/events,["ping",{"message":"%s"}]' % ("x" * 200))
    while True:
        frame = await asyncio.wait_for(ws.recv(), 30)
        if frame == "2":
            await ws.send("3")
        if frame.startswith('42/events,["pong"'):
            return


async def measure(compression: bool, sockets: int, joined: bool) -> dict:
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="droid-deflate-")
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "JWT_SECRET": SECRET,
           "DROID_DATA_DIR": ":memory:", "WORKER_CONCURRENCY": "0", "LOG_LEVEL": "WARNING",
           "DROID_WS_COMPRESSION": str(compression).lower(), "PYTHONPATH": ROOT,
           "DROID_ANON_SESSIONS_PER_ADDRESS": str(sockets + 10),
           "DROID_ANON_SESSIONS": str(sockets + 10)}
    proc = subprocess.Popen([sys.executable, "-m", "droid"], cwd=workdir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    held: list = []
    try:
        for _ in range(300):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        rest = rss_kb(proc.pid)
        for start in range(0, sockets, 100):
            await asyncio.gather(*(one(port, joined, held)
                                   for _ in range(start, min(sockets, start + 100))))
        await asyncio.sleep(1.0)
        loaded = rss_kb(proc.pid)
        negotiated = held[0].response.headers.get("Sec-WebSocket-Extensions")
        return {"compression": compression, "sockets": sockets, "restMB": rest / 1024,
                "loadedMB": loaded / 1024, "perSocketKB": (loaded - rest) / sockets,
                "negotiated": negotiated}
    finally:
        await asyncio.gather(*(ws.close() for ws in held), return_exceptions=True)
        proc.terminate()
        proc.wait(15)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sockets", type=int, default=500)
    parser.add_argument("--unauthenticated", action="store_true")
    args = parser.parse_args()
    off = await measure(False, args.sockets, not args.unauthenticated)
    on = await measure(True, args.sockets, not args.unauthenticated)
    for row in (off, on):
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}))
    print(f"per-message deflate adds {on['perSocketKB'] - off['perSocketKB']:.1f} KB per socket "
          f"({args.sockets} {'unauthenticated' if args.unauthenticated else 'joined'} sockets)")


if __name__ == "__main__":
    asyncio.run(main())
