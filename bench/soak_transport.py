"""Soak of issue 22's transport floods against one real `python -m droid` (not a timed test).

    .venv/bin/python bench/soak_transport.py                     # 3 floods of 60 s, ~7 minutes
    .venv/bin/python bench/soak_transport.py --seconds 20 --quiet 30 --floods resets

One server, started as `python -m droid` with `ulimit -n 1024` (`--nofile`), takes three floods
in turn, each from two load-generator processes of its own (niced by 10: an attacker's CPU is
not the server's; `--pin`: the server on the first core, the load on the second), then a quiet
period:

- `sessions`: unauthenticated Engine.IO sessions, the attack of finding 1: long-polling
  handshakes (`GET /socket.io/?EIO=4&transport=polling`) as fast as each keep-alive connection
  is answered, over 64 connections from 64 source addresses on 127.0.0.0/8, never sending a
  CONNECT;
- `descriptors`: as many connections as the load generator can hold (2,000, twice the server's
  limit), half idle, half unauthenticated WebSockets, each reopened as soon as the server
  closes or refuses it (finding 2);
- `resets`: handshakes reset right after their request (SO_LINGER 0), WebSocket and
  long-polling alternately, 64 at a time (finding 7).

All along, the server's RSS, open descriptors and CPU are sampled every 0.5 s, and a prober on a
kept-alive connection times `GET /health` every 0.1 s. For each flood: RSS at rest (the 10 s
before it), its peak, and RSS a minute after it ended (`--quiet`), which must be within 20% of
that rest (also given against the process's first rest, before any flood); `/health`
p50/p99/max over the flood and the quiet period (p99 must stay under 100 ms, and no probe may
fail); the server log's lines during the flood. A PNG per flood goes to `--plots` (matplotlib, the `bench` extra), the
samples and summary as JSON to `--json`.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import os
import random
import resource
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECRET = "soak-secret-that-is-at-least-32-bytes-long!"
FLOODS = ("sessions", "descriptors", "resets")
# The load generators share the machine with the server (an attacker's CPU would not): niced,
# so that the server is not kept off a core by them.
LOAD_NICE = 10
POLLING = b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: soak\r\n\r\n"


def websocket_request(path: str = "/socket.io/?EIO=4&transport=websocket",
                      close: bool = False) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: soak\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {key}\r\n\r\n").encode()


# the load generators (run as `--worker KIND`, one asyncio loop per process) -------------------

class Counts(dict):
    def add(self, key: str, n: int = 1) -> None:
        self[key] = self.get(key, 0) + n


async def read_answer(reader: asyncio.StreamReader) -> int:
    """One HTTP answer (head and Content-Length body); its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


async def sessions_flood(port: int, until: float, conns: int, base: int, counts: Counts) -> None:
    async def one(i: int) -> None:
        source = f"127.{20 + base}.{i // 250}.{i % 250 + 1}"
        while time.monotonic() < until:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                               local_addr=(source, 0))
            except OSError:
                counts.add("connect errors")
                await asyncio.sleep(0.05)
                continue
            try:
                while time.monotonic() < until:
                    writer.write(POLLING)
                    counts.add(str(await asyncio.wait_for(read_answer(reader), 10)))
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
                counts.add("dropped")
            finally:
                writer.close()
    await asyncio.gather(*(one(i) for i in range(conns)))


async def descriptors_flood(port: int, until: float, conns: int, base: int,
                            counts: Counts) -> None:
    async def one(i: int) -> None:
        while time.monotonic() < until:
            source = f"127.{40 + base}.{random.randrange(250)}.{random.randrange(1, 250)}"
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                               local_addr=(source, 0))
            except OSError:
                counts.add("connect errors")
                await asyncio.sleep(0.05)
                continue
            counts.add("opened")
            try:
                if i % 2:
                    writer.write(websocket_request())
                left = until - time.monotonic()
                data = await asyncio.wait_for(reader.read(1024), max(0.1, left))
                if data.startswith(b"HTTP/1.1 503"):
                    counts.add("503 (over the cap)")
                elif data.startswith(b"HTTP/1.1 101"):
                    counts.add("websockets")
                    await asyncio.wait_for(reader.read(), max(0.1, until - time.monotonic()))
                    counts.add("closed by the server")
                elif data.startswith(b"HTTP/1.1 429"):
                    counts.add("429 (sessions per address)")
                elif data.startswith(b"HTTP/1.1 503"):
                    counts.add("503")
                elif not data:
                    counts.add("closed by the server")
                else:
                    counts.add(data[:12].decode(errors="replace"))
            except asyncio.TimeoutError:
                pass
            except (OSError, asyncio.IncompleteReadError):
                counts.add("reset")
            finally:
                writer.close()
    await asyncio.gather(*(one(i) for i in range(conns)))


async def resets_flood(port: int, until: float, conns: int, base: int, counts: Counts) -> None:
    loop = asyncio.get_running_loop()
    linger = struct.pack("ii", 1, 0)

    async def one(i: int) -> None:
        n = 0
        while time.monotonic() < until:
            n += 1
            sock = socket.socket()
            sock.setblocking(False)
            try:
                sock.bind((f"127.{60 + base}.{i}.{n % 250 + 1}", 0))
                await loop.sock_connect(sock, ("127.0.0.1", port))
                await loop.sock_sendall(sock, websocket_request() if n % 2 else POLLING)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                counts.add("websocket resets" if n % 2 else "polling resets")
            except OSError:
                counts.add("connect errors")
                await asyncio.sleep(0.05)
            finally:
                sock.close()
    await asyncio.gather(*(one(i) for i in range(conns)))


def worker(kind: str, port: int, seconds: float, conns: int, base: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    counts = Counts()
    flood = {"sessions": sessions_flood, "descriptors": descriptors_flood,
             "resets": resets_flood}[kind]
    asyncio.run(flood(port, time.monotonic() + seconds, conns, base, counts))
    print(json.dumps(counts), flush=True)


# the server and what is sampled -------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pin(cpu: int | None, nice: int = 0):
    def preexec() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        if nice:
            os.nice(nice)
    return preexec


def start_server(workdir: str, port: int, nofile: tuple[int, int], log_level: str,
                 cpu: int | None, bare: bool = False) -> subprocess.Popen:
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "JWT_SECRET": SECRET,
           "DROID_DATA_DIR": os.path.join(workdir, "data"), "WORKER_CONCURRENCY": "0",
           "LOG_LEVEL": log_level, "DROID_ENV": "development",
           "PYTHONPATH": str(ROOT)}

    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
        pin(cpu)()
    log = open(os.path.join(workdir, "server.log"), "wb")
    command = [sys.executable, "-c", BARE] if bare else [sys.executable, "-m", "droid"]
    proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=log,
                            stderr=subprocess.STDOUT, preexec_fn=preexec)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start; see " + log.name)


# `--bare`: the same floods against a Tornado application that only answers /health (and 404s
# the rest), to tell what the machine and the load generators allow from what Droid does.
BARE = """
import asyncio, os, tornado.web, tornado.httpserver, tornado.netutil
class Health(tornado.web.RequestHandler):
    def get(self):
        self.write({"status": "ok"})
async def main():
    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/health", Health)]))
    server.add_sockets(tornado.netutil.bind_sockets(int(os.environ["PORT"]), "127.0.0.1",
                                                    backlog=1024))
    await asyncio.Event().wait()
asyncio.run(main())
"""


def proc_sample(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return {"rssMB": rss / 1024, "fds": len(os.listdir(f"/proc/{pid}/fd")), "cpuS": cpu}


class Sampler(threading.Thread):
    """The server's RSS, descriptors and CPU every `every` seconds."""

    def __init__(self, pid: int, t0: float, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.t0, self.every = pid, t0, every
        self.samples: list[dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                sample = proc_sample(self.pid)
            except (OSError, StopIteration):
                return
            sample["t"] = round(time.monotonic() - self.t0, 2)
            self.samples.append(sample)


class Prober(threading.Thread):
    """GET /health every `every` seconds on a kept-alive connection (a new one when it is
    lost: a lost one is an error sample, and so is a non-200)."""

    def __init__(self, port: int, t0: float, every: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.port, self.t0, self.every = port, t0, every
        self.samples: list[tuple[float, float | None]] = []  # (t, ms), None: failed
        self.stop = threading.Event()

    def run(self) -> None:
        conn = None
        while not self.stop.wait(self.every):
            started = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                reply = conn.getresponse()
                reply.read()
                ms = 1000 * (time.monotonic() - started) if reply.status == 200 else None
            except (OSError, http.client.HTTPException):
                ms = None
                if conn is not None:
                    conn.close()
                conn = None
            self.samples.append((round(started - self.t0, 3), ms))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_flood(kind: str, args: argparse.Namespace, port: int, load_cpu: int | None) -> dict:
    conns = {"sessions": 32, "descriptors": 1000, "resets": 32}[kind]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", kind, "--port", str(port),
                               "--seconds", str(args.seconds), "--conns", str(conns),
                               "--base", str(i)],
                              stdout=subprocess.PIPE, preexec_fn=pin(load_cpu, LOAD_NICE))
             for i in range(2)]
    counts: Counts = Counts()
    for proc in procs:
        out, _ = proc.communicate(timeout=args.seconds + 60)
        for key, value in json.loads(out.decode().strip().splitlines()[-1]).items():
            counts.add(key, value)
    return dict(sorted(counts.items()))


def plot(kind: str, phase: dict, samples: list[dict], health: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0, t1, t2 = phase["restFrom"], phase["floodFrom"], phase["floodTo"]
    end = phase["quietTo"]
    win = [s for s in samples if t0 <= s["t"] <= end]
    hwin = [(t, ms) for t, ms in health if t0 <= t <= end]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, sharex=True, figsize=(9, 7.5))
    ts = [s["t"] - t1 for s in win]
    rest = phase["rssRestMB"]
    ax1.plot(ts, [s["rssMB"] for s in win], color="tab:blue")
    ax1.axhspan(rest, rest * 1.2, color="tab:green", alpha=0.15, label="rest to rest + 20%")
    ax1.set_ylabel("RSS (MiB)")
    ax1.legend(loc="upper right")
    ax2.plot(ts, [s["fds"] for s in win], color="tab:orange")
    ax2.set_ylabel("open descriptors")
    ok = [(t - t1, ms) for t, ms in hwin if ms is not None]
    failed = [t - t1 for t, ms in hwin if ms is None]
    ax3.plot([t for t, _ in ok], [ms for _, ms in ok], ".", markersize=2, color="tab:purple")
    if failed:
        ax3.plot(failed, [1] * len(failed), "x", color="red", label="failed")
        ax3.legend(loc="upper right")
    ax3.axhline(100, color="red", linewidth=0.8, linestyle="--")
    ax3.set_yscale("log")
    ax3.set_ylabel("GET /health (ms)")
    ax3.set_xlabel("seconds since the flood started")
    for ax in (ax1, ax2, ax3):
        ax.axvspan(0, t2 - t1, color="tab:red", alpha=0.08)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{kind} flood: RSS {rest:.0f} -> peak {phase['rssPeakMB']:.0f} -> "
                 f"{phase['rssAfterMB']:.0f} MiB; /health p99 {phase['health']['p99']:.1f} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_lines(path: str, start: int) -> tuple[int, int, list[str]]:
    """Lines and bytes the server log grew by since `start` bytes, and some of them."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read()
    lines = data.decode(errors="replace").splitlines()
    return len(lines), len(data), lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--floods", default=",".join(FLOODS))
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each flood")
    parser.add_argument("--quiet", type=float, default=60.0,
                        help="seconds after each flood before RSS is compared with rest")
    parser.add_argument("--rest", type=float, default=10.0)
    parser.add_argument("--nofile", default="1024,1024", help="the server's soft,hard ulimit -n")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--bare", action="store_true",
                        help="flood a Tornado app that only answers /health instead (a control)")
    parser.add_argument("--pin", action="store_true",
                        help="server on CPU 0, load generators on CPU 1 (a quiet machine)")
    parser.add_argument("--plots", default=str(ROOT / "bench" / "plots"))
    parser.add_argument("--json", help="write samples and summary here")
    parser.add_argument("--worker", choices=FLOODS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--conns", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--base", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.port, args.seconds, args.conns, args.base)

    floods = [f for f in args.floods.split(",") if f]
    two = len(os.sched_getaffinity(0)) >= 2
    server_cpu, load_cpu = (0, 1) if two and args.pin else (None, None)
    nofile = tuple(int(x) for x in args.nofile.split(","))
    workdir = tempfile.mkdtemp(prefix="droid-soak-transport-")
    port = free_port()
    proc = start_server(workdir, port, nofile, args.log_level, server_cpu, args.bare)
    t0 = time.monotonic()
    sampler, prober = Sampler(proc.pid, t0), Prober(port, t0)
    sampler.start()
    prober.start()
    log_path = os.path.join(workdir, "server.log")
    print(f"droid pid {proc.pid} on port {port} (ulimit -n {args.nofile}, log {log_path}); "
          f"floods {', '.join(floods)} of {args.seconds:g} s, then {args.quiet:g} s quiet")
    Path(args.plots).mkdir(parents=True, exist_ok=True)
    results = {}
    first_rest = None
    try:
        time.sleep(3.0)  # start-up settles
        for kind in floods:
            rest_from = time.monotonic() - t0
            time.sleep(args.rest)
            log_start = os.path.getsize(log_path)
            flood_from = time.monotonic() - t0
            counts = run_flood(kind, args, port, load_cpu)
            flood_to = time.monotonic() - t0
            lines, size, text = log_lines(log_path, log_start)
            time.sleep(args.quiet)
            quiet_to = time.monotonic() - t0
            samples = list(sampler.samples)
            rest = [s["rssMB"] for s in samples if rest_from <= s["t"] < flood_from]
            if first_rest is None:
                first_rest = round(statistics.median(rest), 1)
            during = [s for s in samples if flood_from <= s["t"] <= flood_to]
            after = [s["rssMB"] for s in samples if quiet_to - 5 <= s["t"] <= quiet_to]
            health = [ms for t, ms in prober.samples if flood_from <= t <= quiet_to]
            ok = [ms for ms in health if ms is not None]
            cpu = [s["cpuS"] for s in samples if flood_from <= s["t"] <= flood_to]
            phase = {
                "restFrom": rest_from, "floodFrom": flood_from, "floodTo": flood_to,
                "quietTo": quiet_to, "load": counts,
                "rssRestMB": round(statistics.median(rest), 1),
                "rssPeakMB": round(max(s["rssMB"] for s in during), 1),
                "rssAfterMB": round(statistics.median(after), 1),
                "fdsRest": [s["fds"] for s in samples if s["t"] < flood_from][-1],
                "fdsPeak": max(s["fds"] for s in during),
                "fdsAfter": samples[-1]["fds"],
                "serverCpuPct": round(100 * (cpu[-1] - cpu[0]) / (flood_to - flood_from), 1),
                "health": {"n": len(health), "failed": len(health) - len(ok),
                           "p50": round(statistics.median(ok), 2),
                           "p99": round(percentile(ok, 0.99), 2),
                           "max": round(max(ok), 1)},
                "logLines": lines, "logBytes": size,
                "logTracebacks": sum("Traceback" in line for line in text),
            }
            phase["rssAfterVsRest"] = round(phase["rssAfterMB"] / phase["rssRestMB"], 3)
            phase["rssFirstRestMB"] = first_rest
            phase["rssAfterVsFirstRest"] = round(phase["rssAfterMB"] / first_rest, 3)
            phase["pass"] = (phase["rssAfterVsRest"] <= 1.2 and phase["health"]["p99"] < 100
                             and phase["health"]["failed"] == 0)
            results[kind] = phase
            name = f"soak-{kind}{'-bare' if args.bare else ''}.png"
            plot(kind, phase, samples, prober.samples, Path(args.plots) / name)
            print(json.dumps({kind: {k: v for k, v in phase.items()
                                     if k not in ("restFrom", "floodFrom", "floodTo", "quietTo")}},
                             indent=1), flush=True)
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}")
    finally:
        sampler.stop.set()
        prober.stop.set()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    verdict = all(r["pass"] for r in results.values())
    print(f"{'PASS' if verdict else 'FAIL'}: RSS back within 20% of rest {args.quiet:g} s after "
          f"each flood, /health p99 < 100 ms and no failed probe")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "samples": sampler.samples,
                       "health": prober.samples, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
