#!/usr/bin/env python3
"""Where an idle socket's memory goes in Droid: tracemalloc's per-socket breakdown.

    .venv/bin/python bench/memprofile.py --sockets 1000

Starts bench/droid_server.py with BENCH_TRACEMALLOC=1 (tracemalloc on, 12 frames), takes a heap
snapshot (`POST /bench/heap`), opens `--sockets` WebSocket clients on /events (Engine.IO 4 over a
direct WebSocket, authenticated, each waiting for `connected`; two sockets per user, as in
bench/run.py), lets them sit idle for a moment, takes a second snapshot and prints what grew,
divided by the number of sockets: by owner (the innermost frame of the allocation that belongs to
Droid, python-engineio, python-socketio, Tornado or PyJWT; asyncio and the standard library
otherwise) and the largest allocation sites. `--json PATH` also writes it as JSON.

tracemalloc counts Python allocations only (not the kernel's socket buffers nor allocator
overhead), so these figures are below the RSS per socket that bench/run.py measures; they show
where the Python side of a socket goes.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import sys
import time
import urllib.request
from pathlib import Path

import jwt
import websockets

BENCH = Path(__file__).resolve().parent
SECRET = "droid-bench-only-secret-0123456789abcdef"


def post(url: str) -> dict:
    req = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


async def open_socket(base: str, user: str,
                      ready: asyncio.Semaphore) -> websockets.ClientConnection:
    token = jwt.encode({"sub": user, "exp": int(time.time()) + 86400}, SECRET, algorithm="HS256")
    async with ready:
        ws = await websockets.connect(base + "/socket.io/?EIO=4&transport=websocket",
                                      compression=None, max_size=None, open_timeout=60)
        opening = await ws.recv()
        assert opening.startswith("0{"), opening
        await ws.send('40/events,' + json.dumps({"token": token}))
        while True:
            msg = await asyncio.wait_for(ws.recv(), 60)
            if msg == "2":
                await ws.send("3")
            elif msg.startswith('42/events,["connected"'):
                ws.answering = asyncio.create_task(answer(ws))  # from now on, while others connect
                return ws


async def answer(ws: websockets.ClientConnection) -> None:
    """Answer pings and read everything else, as an idle client does."""
    try:
        async for msg in ws:
            if msg == "2":
                await ws.send("3")
    except websockets.ConnectionClosed:
        pass


async def idle(sockets: list) -> None:
    await asyncio.sleep(2.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sockets", type=int, default=1000)
    ap.add_argument("--top", type=int, default=25, help="allocation sites to list")
    ap.add_argument("--json", type=Path, help="also write the breakdown here")
    args = ap.parse_args()
    env = dict(os.environ, PORT="0", HOST="127.0.0.1", JWT_SECRET=SECRET,
               LOG_LEVEL=os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
               DROID_DEMO_DELAY_S="0", DROID_ENV="development", BENCH_TRACEMALLOC="1",
               # every socket's handshake comes from one address, the load generator's
               DROID_ANON_SESSIONS_PER_ADDRESS="1000000", DROID_ANON_SESSIONS="1000000")
    for name in ("MONGODB_URI", "REDIS_URL", "LLM_BASE_URL"):
        env.pop(name, None)
    env["DROID_DATA_DIR"] = tempfile.mkdtemp(prefix="droid-memprofile-")  # a fresh store
    proc = subprocess.Popen([sys.executable, str(BENCH / "droid_server.py")], cwd=BENCH, env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        if not line.startswith("BENCH-READY"):
            sys.exit(f"server did not start: {line!r}")
        port = dict(f.split("=") for f in line.split()[1:])["port"]
        url = f"http://127.0.0.1:{port}"
        post(url + "/bench/heap")

        async def run() -> dict:
            sem = asyncio.Semaphore(50)
            sockets = await asyncio.gather(*(open_socket(url.replace("http", "ws"),
                                                         f"bench-user-{i // 2}", sem)
                                             for i in range(args.sockets)))
            await idle(sockets)
            with urllib.request.urlopen(url + "/bench/stats", timeout=60) as resp:
                connected = json.loads(resp.read())["sockets"]
            if connected != args.sockets:
                sys.exit(f"only {connected} of {args.sockets} sockets are connected")
            heap = await asyncio.to_thread(post, f"{url}/bench/heap?top={args.top}")
            await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
            for ws in sockets:
                ws.answering.cancel()
            return heap

        heap = asyncio.run(run())
    finally:
        proc.terminate()
        proc.wait(15)
    n = args.sockets
    owners = sorted(heap["byOwnerKb"].items(), key=lambda kv: -kv[1])
    total = sum(v for _, v in owners)
    print(f"tracemalloc, {n} idle sockets: {total / n:.2f} KB per socket")
    print("| owner | KB per socket |\n|---|---|")
    for owner, kb in owners:
        print(f"| {owner} | {kb / n:.2f} |")
    print(f"| total | {total / n:.2f} |")
    print("\nlargest allocation sites (KB per socket, objects per socket, innermost frames):")
    for t in heap["top"]:
        print(f"  {t['sizeDiffKb'] / n:6.2f} KB {t['countDiff'] / n:5.1f}  "
              + " <- ".join(reversed([f.split('site-packages/')[-1] for f in t["traceback"][-3:]])))
    if args.json:
        args.json.write_text(json.dumps({"sockets": n, "perSocketKb": total / n,
                                         "byOwnerKbPerSocket": {o: kb / n for o, kb in owners},
                                         "top": heap["top"]}, indent=1))


if __name__ == "__main__":
    main()
