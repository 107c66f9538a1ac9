"""Soak: a real `python -m droid` holding slow and stalled clients, its memory sampled over time.

    .venv/bin/python bench/soak_slow_clients.py                  # 500 clients, 120 s
    .venv/bin/python bench/soak_slow_clients.py --clients 500 --duration 300 --json out.json

Three kinds of client, in equal parts, each replaced as soon as the server lets go of it, so that
the server holds about `--clients` of them all along:

- slow heads: a request head sent one byte a second, never finished (cut by
  DROID_HEADER_TIMEOUT_S, then opened again);
- stalled WebSockets: Socket.IO connected on /events with a 4 KB receive buffer, never reading,
  while their users' tasks carry large envelopes (a 32,000-character prompt and 16 KiB of
  metadata: about 100 KB per envelope and socket). Cut by the slow-consumer bound in bytes
  (DROID_MAX_BACKLOG_BYTES), or reopened after `--stall-s`;
- stalled long-polling sessions: connected on /events, never polling again (cut by the same
  bound, or by Engine.IO's ping timeout), reopened after `--stall-s`.

A publisher creates such tasks over REST all along (WORKER_CONCURRENCY=0: only `task.created`,
the large envelope), and a healthy client times `GET /health`. Every `--every` seconds the
server's RSS (/proc/PID/status) and open descriptors are sampled. Memory is bounded when RSS
levels off while clients keep coming: the summary compares the peak of the first and the last
third of the run.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import jwt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "soak-secret-that-is-at-least-32-bytes-long!"
PROMPT = "Summarise this. " + "x" * (32_000 - 16)
METADATA = {"blob": "m" * (16 * 1024 - 20)}


def token(user: str) -> str:
    return jwt.encode({"sub": user, "iat": int(time.time()), "exp": int(time.time()) + 86400},
                      SECRET, algorithm="HS256")


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Stats:
    def __init__(self) -> None:
        self.opened = {"slow-head": 0, "stalled-ws": 0, "stalled-polling": 0}
        self.cut = {"slow-head": 0, "stalled-ws": 0, "stalled-polling": 0}
        self.live = {"slow-head": 0, "stalled-ws": 0, "stalled-polling": 0}
        self.tasks = 0
        self.health_ms: list[float] = []
        self.refused = 0


async def slow_head(port: int, stats: Stats, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.5)
            continue
        stats.opened["slow-head"] += 1
        stats.live["slow-head"] += 1
        head = b"GET /health HTTP/1.1\r\nHost: soak\r\nX-Slow: " + b"s" * 10_000
        try:
            for byte in head:
                if stop.is_set():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                try:  # one byte a second; EOF means the server cut us
                    if await asyncio.wait_for(reader.read(1), 1.0) == b"":
                        break
                except asyncio.TimeoutError:
                    pass
            else:
                continue
            if not stop.is_set():
                stats.cut["slow-head"] += 1
        except OSError:
            stats.cut["slow-head"] += 1
        finally:
            stats.live["slow-head"] -= 1
            writer.close()


async def stalled_ws(port: int, user: str, stats: Stats, stop: asyncio.Event,
                     stall_s: float) -> None:
    while not stop.is_set():
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(raw, ("127.0.0.1", port))
            reader, writer = await asyncio.open_connection(sock=raw, limit=4096)
        except OSError:
            raw.close()
            await asyncio.sleep(0.5)
            continue
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((
            "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: soak\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {key}\r\n\r\n").encode())
        try:
            status = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            writer.close()
            await asyncio.sleep(0.5)
            continue
        if not status.startswith(b"HTTP/1.1 101"):
            writer.close()
            await asyncio.sleep(1)
            continue
        text = ('40/events,{"token":"%s"}' % token(user)).encode()
        mask = os.urandom(4)
        size = len(text)
        head = bytes([0x81, 0x80 | size]) if size < 126 else \
            bytes([0x81, 0xFE]) + size.to_bytes(2, "big")
        writer.write(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(text)))
        stats.opened["stalled-ws"] += 1
        stats.live["stalled-ws"] += 1
        # Never read again: the server holds what it writes, up to its bound.
        deadline = time.monotonic() + stall_s * random.uniform(0.5, 1.5)
        while not stop.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        stats.live["stalled-ws"] -= 1
        writer.close()


async def http(port: int, method: str, path: str, body: bytes = b"",
               headers: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n" \
               f"Content-Length: {len(body)}\r\n"
        for name, value in (headers or {}).items():
            head += f"{name}: {value}\r\n"
        writer.write(head.encode() + b"\r\n" + body)
        data = await asyncio.wait_for(reader.read(), timeout)
        status = int(data.split(b" ", 2)[1]) if data else 0
        return status, data.partition(b"\r\n\r\n")[2]
    finally:
        writer.close()


async def stalled_polling(port: int, user: str, stats: Stats, stop: asyncio.Event,
                          stall_s: float) -> None:
    base = "/socket.io/?EIO=4&transport=polling"
    while not stop.is_set():
        try:
            status, body = await http(port, "GET", base)
            sid = re.search(rb'"sid":"([^"]+)"', body).group(1).decode()
            status, _ = await http(port, "POST", f"{base}&sid={sid}",
                                   ('40/events,{"token":"%s"}' % token(user)).encode())
            if status != 200:
                raise OSError(status)
            await http(port, "GET", f"{base}&sid={sid}", timeout=10)
        except (OSError, AttributeError, asyncio.TimeoutError, IndexError, ValueError):
            await asyncio.sleep(1)
            continue
        stats.opened["stalled-polling"] += 1
        stats.live["stalled-polling"] += 1
        deadline = time.monotonic() + stall_s * random.uniform(0.5, 1.5)
        while not stop.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        stats.live["stalled-polling"] -= 1


async def publisher(port: int, users: list[str], rate: float, stats: Stats,
                    stop: asyncio.Event) -> None:
    body = json.dumps({"prompt": PROMPT, "metadata": METADATA}).encode()
    tokens = {u: token(u) for u in users}
    while not stop.is_set():
        started = time.monotonic()
        user = random.choice(users)
        try:
            status, _ = await http(port, "POST", "/tasks", body,
                                   {"Authorization": f"Bearer {tokens[user]}",
                                    "Content-Type": "application/json"})
            if status == 201:
                stats.tasks += 1
        except (OSError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(max(0.0, 1 / rate - (time.monotonic() - started)))


async def health(port: int, stats: Stats, stop: asyncio.Event) -> None:
    while not stop.is_set():
        started = time.monotonic()
        try:
            status, _ = await http(port, "GET", "/health", timeout=10)
            if status == 200:
                stats.health_ms.append(1000 * (time.monotonic() - started))
        except (OSError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(0.5)


def start_server(data_dir: str) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": "0", "JWT_SECRET": SECRET,
           "DROID_DATA_DIR": data_dir, "WORKER_CONCURRENCY": "0", "LOG_LEVEL": "WARNING",
           "DROID_ENV": "development",
           # its hundreds of clients all come from 127.0.0.1
           "DROID_ANON_SESSIONS_PER_ADDRESS": "100000"}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env["PORT"] = str(port)
    log = open(os.path.join(data_dir, "server.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "droid"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the server did not start; see " + log.name)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--rate", type=float, default=20.0, help="large tasks created a second")
    parser.add_argument("--hot-users", type=int, default=0,
                        help="create tasks for only this many users (0: all of them)")
    parser.add_argument("--stall-s", type=float, default=40.0,
                        help="how long a stalled client stays before it is replaced")
    parser.add_argument("--json", help="write the samples and the summary here")
    args = parser.parse_args()

    data_dir = tempfile.mkdtemp(prefix="droid-soak-")
    proc, port = start_server(data_dir)
    stats, stop = Stats(), asyncio.Event()
    per_kind = args.clients // 3
    users = [f"soak-{uuid.uuid4().hex[:8]}" for _ in range(-(-2 * per_kind // 19))]
    samples: list[dict] = []
    try:
        await asyncio.sleep(3.0)  # start-up settles (python -m droid freezes what it built)
        baseline = rss_kb(proc.pid)
        print(f"droid pid {proc.pid} on port {port}; RSS at rest {baseline / 1024:.1f} MB; "
              f"{args.clients} clients, {args.rate:g} tasks/s of ~100 KB envelopes, "
              f"{len(users)} users")
        tasks = [asyncio.create_task(slow_head(port, stats, stop)) for _ in range(per_kind)]
        tasks += [asyncio.create_task(stalled_ws(port, users[i % len(users)], stats, stop,
                                                 args.stall_s)) for i in range(per_kind)]
        tasks += [asyncio.create_task(stalled_polling(port, users[i % len(users)], stats, stop,
                                                      args.stall_s))
                  for i in range(args.clients - 2 * per_kind)]
        hot = users[:args.hot_users] if args.hot_users else users
        tasks += [asyncio.create_task(publisher(port, hot, args.rate, stats, stop)),
                  asyncio.create_task(health(port, stats, stop))]
        started = time.monotonic()
        print(f"{'t (s)':>6} {'RSS MB':>7} {'fds':>5} {'heads':>6} {'ws':>4} {'polling':>7} "
              f"{'tasks':>6} {'heads cut':>9}")
        while time.monotonic() - started < args.duration:
            await asyncio.sleep(args.every)
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}")
            sample = {"t": round(time.monotonic() - started, 1), "rssMB": rss_kb(proc.pid) / 1024,
                      "fds": fds(proc.pid), "live": dict(stats.live), "tasks": stats.tasks}
            samples.append(sample)
            print(f"{sample['t']:>6.0f} {sample['rssMB']:>7.1f} {sample['fds']:>5} "
                  f"{stats.live['slow-head']:>6} {stats.live['stalled-ws']:>4} "
                  f"{stats.live['stalled-polling']:>7} {stats.tasks:>6} "
                  f"{stats.cut['slow-head']:>9}", flush=True)
        stop.set()
        await asyncio.wait(tasks, timeout=15)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    third = max(1, len(samples) // 3)
    first, last = samples[:third], samples[-third:]
    behind = 0
    with open(os.path.join(data_dir, "server.log")) as log:
        for line in log:
            behind += "behind" in line and "disconnecting" in line
    summary = {
        "clients": args.clients, "durationS": args.duration, "tasks": stats.tasks,
        "rssAtRestMB": round(baseline / 1024, 1),
        "rssPeakMB": round(max(s["rssMB"] for s in samples), 1),
        "rssPeakFirstThirdMB": round(max(s["rssMB"] for s in first), 1),
        "rssPeakLastThirdMB": round(max(s["rssMB"] for s in last), 1),
        "rssEndMB": round(samples[-1]["rssMB"], 1),
        "opened": stats.opened, "slowHeadsCut": stats.cut["slow-head"],
        "slowConsumersCut": behind,
        "healthMs": {"p50": round(statistics.median(stats.health_ms), 1),
                     "p99": round(sorted(stats.health_ms)[int(0.99 * len(stats.health_ms))], 1),
                     "n": len(stats.health_ms)} if stats.health_ms else None,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "samples": samples}, f, indent=1)


if __name__ == "__main__":
    asyncio.run(main())
