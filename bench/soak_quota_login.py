"""Soak: the quota flood and the login flood of issue 22 against one real `python -m droid`.

    .venv/bin/python bench/soak_quota_login.py                 # 60 s per flood, 60 s after each
    .venv/bin/python bench/soak_quota_login.py --seconds 10    # a quick look

One process with its defaults (quotas, argon2 bounds, the demo agent) on a fresh data folder.
After a rest, two floods, each followed by as long a quiet time:

- quota: one account (a token signed with the server's key) creates tasks as fast as 16
  connections allow, each with a 32,000-character prompt and 16 KiB of metadata (the issue's
  1.18 GB in 20 s), while 8 clients read `GET /events?after=0&limit=1000` again and again;
- login: 200 source addresses on 127.0.0.0/8, each under its per-address limit (one wrong
  password every 2.5 s: 80 a second in all), while a real user signs in every 2 s from an
  address of its own, and times it.

All along, every 0.25 s: the server's RSS and open descriptors (/proc), the time `GET /health`
takes on a connection of its own, and the machine's load average (the machine is shared: other
processes' load shows in /health's times). Printed: per phase RSS (start, peak, end), /health p50
/ p99 / max, the answers by status, the real user's sign-in times; RSS a minute after each flood
against its resting level. Written: bench/results/*-soak-quota-login.json and an SVG plot of RSS
and /health latency over time (`--plot`, default bench/plots/soak_quota_login.svg).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import jwt
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SECRET = "soak-secret-that-is-at-least-32-bytes-long!"
PROMPT = "Summarise this. " + "x" * (32_000 - 16)
METADATA = {"blob": "m" * (16 * 1024 - 20)}
USERS = 1  # one token, as in the issue: its quotas are what stops it
SAMPLE_S = 0.25


def token(user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 86400}, SECRET, algorithm="HS256")


def proc_status(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open descriptors) of the server."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


class Run:
    def __init__(self, pid: int, url: str) -> None:
        self.pid, self.url = pid, url
        self.t0 = time.monotonic()
        self.samples: list[dict] = []  # {t, phase, rssKiB, fds, healthMs}
        self.phase = "rest"
        self.answers: dict[str, collections.Counter] = collections.defaultdict(
            collections.Counter)
        self.user_logins: list[tuple[int, float]] = []
        self.http = AsyncHTTPClient(force_instance=True, max_clients=400)

    async def fetch(self, path: str, *, method: str = "GET", body: bytes | None = None,
                    headers: dict | None = None, source: str | None = None,
                    timeout: float = 30) -> tuple[int, bytes]:
        try:
            reply = await self.http.fetch(HTTPRequest(
                self.url + path, method=method, body=body, headers=headers,
                network_interface=source, request_timeout=timeout), raise_error=False)
            return reply.code, reply.body or b""
        except OSError:
            return 0, b""


async def sampler(run: Run, stop: asyncio.Event) -> None:
    health = AsyncHTTPClient(force_instance=True)
    while not stop.is_set():
        start = time.perf_counter()
        try:
            await health.fetch(run.url + "/health", request_timeout=10, raise_error=False)
            took = (time.perf_counter() - start) * 1000
        except OSError:
            took = 10_000.0
        rss, fds = proc_status(run.pid)
        run.samples.append({"t": round(time.monotonic() - run.t0, 2), "phase": run.phase,
                            "rssKiB": rss, "fds": fds, "healthMs": round(took, 2),
                            "load1": os.getloadavg()[0]})
        try:
            await asyncio.wait_for(stop.wait(), SAMPLE_S)
        except asyncio.TimeoutError:
            pass
    health.close()


async def quota_flood(run: Run, seconds: float, creators: int = 16, readers: int = 8) -> None:
    tokens = [token(f"soak-{uuid.uuid4().hex[:8]}") for _ in range(USERS)]
    body = json.dumps({"prompt": PROMPT, "metadata": METADATA}).encode()
    until = time.monotonic() + seconds

    async def creator(n: int) -> None:
        headers = {"Authorization": f"Bearer {tokens[n % USERS]}",
                   "Content-Type": "application/json"}
        while time.monotonic() < until:
            status, _ = await run.fetch("/tasks", method="POST", body=body, headers=headers)
            run.answers["POST /tasks"][status] += 1

    async def reader(n: int) -> None:
        headers = {"Authorization": f"Bearer {tokens[n % USERS]}"}
        while time.monotonic() < until:
            status, _ = await run.fetch("/events?after=0&limit=1000", headers=headers)
            run.answers["GET /events"][status] += 1

    await asyncio.gather(*[creator(n) for n in range(creators)],
                         *[reader(n) for n in range(readers)])


async def login_flood(run: Run, seconds: float) -> None:
    email, password = f"real-{uuid.uuid4().hex[:8]}@example.com", "correct horse battery"
    body = json.dumps({"email": email, "password": password}).encode()
    headers = {"Content-Type": "application/json"}
    status, _ = await run.fetch("/auth/register", method="POST", body=body, headers=headers,
                                source="127.0.9.1")
    assert status == 201, status
    until = time.monotonic() + seconds

    async def attacker(n: int) -> None:
        source = f"127.0.{10 + n // 250}.{1 + n % 250}"
        await asyncio.sleep(n * 2.5 / 200)  # spread over the period
        while time.monotonic() < until:
            started = time.monotonic()
            # A new e-mail each time (registered or not costs one argon2 check alike), so that
            # no per-account limit stops it before the password is checked.
            wrong = json.dumps({"email": f"{uuid.uuid4().hex[:12]}@example.com",
                                "password": f"wrong {n}"}).encode()
            status, _ = await run.fetch("/auth/login", method="POST", body=wrong,
                                        headers=headers, source=source)
            run.answers["POST /auth/login (flood)"][status] += 1
            await asyncio.sleep(max(0.0, 2.5 - (time.monotonic() - started)))

    async def real_user() -> None:
        """Signs in every 2 s, as a client does: after a 503 it waits its Retry-After (1 s) and
        tries again (5 tries at most); the time is until it is in (or gives up)."""
        while time.monotonic() < until:
            started = time.perf_counter()
            for _ in range(5):
                status, _ = await run.fetch("/auth/login", method="POST", body=body,
                                            headers=headers, source="127.0.9.1")
                if status != 503:
                    break
                await asyncio.sleep(1.0)
            run.user_logins.append((status, (time.perf_counter() - started) * 1000))
            await asyncio.sleep(2.0)

    await asyncio.gather(*[attacker(n) for n in range(200)], real_user())


def start_server(data_dir: str, port: int, extra: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MONGODB_", "LLM_", "REDIS_", "JWT_", "DROID_", "WORKER_"))}
    env.update(HOST="127.0.0.1", PORT=str(port), JWT_SECRET=SECRET, DROID_DATA_DIR=data_dir,
               LOG_LEVEL="WARNING", PYTHONPATH=str(ROOT))
    env.update(item.split("=", 1) for item in extra)
    return subprocess.Popen([sys.executable, "-m", "droid"], cwd=data_dir, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(
                                os.path.join(data_dir, "server.log"), "wb"))


def summary(run: Run, rest_kib: float) -> list[str]:
    lines = ["| phase | s | RSS start / peak / end (MiB) | descriptors max | /health p50 / p99 / "
             "max (ms) | machine load (1 min) |", "|---|---|---|---|---|---|"]
    phases: dict[str, list[dict]] = collections.OrderedDict()
    for s in run.samples:
        phases.setdefault(s["phase"], []).append(s)
    for name, rows in phases.items():
        rss = [r["rssKiB"] / 1024 for r in rows]
        ms = sorted(r["healthMs"] for r in rows)
        p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
        lines.append(f"| {name} | {rows[-1]['t'] - rows[0]['t']:.0f} | {rss[0]:.0f} / "
                     f"{max(rss):.0f} / {rss[-1]:.0f} | {max(r['fds'] for r in rows)} | "
                     f"{statistics.median(ms):.1f} / {p99:.1f} / {ms[-1]:.1f} | "
                     f"{statistics.mean(r['load1'] for r in rows):.1f} |")
    lines.append("")
    for name in ("after quota", "after login"):
        rows = phases.get(name)
        if rows:
            lines.append(f"{name}: RSS at the end {rows[-1]['rssKiB'] / 1024:.0f} MiB, "
                         f"{rows[-1]['rssKiB'] / rest_kib:.2f}x the resting "
                         f"{rest_kib / 1024:.0f} MiB")
    for what, counts in run.answers.items():
        lines.append(f"{what}: " + ", ".join(f"{c:,} x {s}" for s, c in sorted(counts.items())))
    if run.user_logins:
        ms = sorted(t for _, t in run.user_logins)
        lines.append(f"real user's sign-ins: {len(ms)}, statuses "
                     f"{dict(collections.Counter(s for s, _ in run.user_logins))}, "
                     f"median {statistics.median(ms):.0f} ms, max {ms[-1]:.0f} ms")
    return lines


def svg(run: Run, path: Path) -> None:
    """RSS (MiB, left axis) and /health latency (ms, right axis) over time, phases shaded."""
    w, h, pad = 900, 300, 40
    t_max = max(s["t"] for s in run.samples) or 1
    rss_max = max(s["rssKiB"] for s in run.samples) / 1024 * 1.1
    ms_max = max(10.0, max(s["healthMs"] for s in run.samples) * 1.1)
    x = lambda t: pad + (w - 2 * pad) * t / t_max  # noqa: E731
    y = lambda v, top: h - pad - (h - 2 * pad) * v / top  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             'font-family="sans-serif" font-size="11">', '<rect width="100%" height="100%" '
             'fill="white"/>']
    start = None
    for i, s in enumerate(run.samples + [{"phase": None, "t": t_max}]):
        if start is None or s["phase"] != start[0]:
            if start is not None and start[0].startswith(("quota", "login")):
                parts.append(f'<rect x="{x(start[1]):.1f}" y="{pad}" width="'
                             f'{x(s["t"]) - x(start[1]):.1f}" height="{h - 2 * pad}" '
                             'fill="#fde8d0"/>')
            if start is not None:
                parts.append(f'<text x="{x(start[1]) + 2:.1f}" y="{pad - 4}">{start[0]}</text>')
            start = (s["phase"], s["t"])
    for key, top, colour, scale in (("rssKiB", rss_max, "#1f5fbf", 1 / 1024),
                                    ("healthMs", ms_max, "#c0392b", 1)):
        points = " ".join(f"{x(s['t']):.1f},{y(s[key] * scale, top):.1f}" for s in run.samples)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.2" '
                     f'points="{points}"/>')
    parts += [f'<text x="{pad}" y="{h - 10}" fill="#1f5fbf">RSS (MiB, 0-{rss_max:.0f})</text>',
              f'<text x="{w // 2}" y="{h - 10}" fill="#c0392b">/health (ms, 0-{ms_max:.0f})'
              '</text>', f'<text x="{w - pad - 60}" y="{h - 10}">{t_max:.0f} s</text>',
              "</svg>"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="droid-soak-quota-") as data:
        sock_port = int(args.port)
        proc = start_server(data, sock_port, args.env)
        run = Run(proc.pid, f"http://127.0.0.1:{sock_port}")
        try:
            for _ in range(200):
                if (await run.fetch("/health", timeout=2))[0] == 200:
                    break
                await asyncio.sleep(0.1)
            stop = asyncio.Event()
            sampling = asyncio.ensure_future(sampler(run, stop))
            await asyncio.sleep(args.rest)
            rest_kib = statistics.median(s["rssKiB"] for s in run.samples)
            for name, flood in (("quota", quota_flood), ("login", login_flood)):
                if args.only and name != args.only:
                    continue
                run.phase = name
                if name == "quota":
                    await flood(run, args.seconds, args.creators, args.readers)
                else:
                    await flood(run, args.seconds)
                run.phase = f"after {name}"
                await asyncio.sleep(args.after)
            stop.set()
            await sampling
        finally:
            proc.terminate()
            proc.wait(30)
            run.http.close()
    lines = summary(run, rest_kib)
    print("\n".join(lines))
    out = BENCH / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}-soak-quota-login.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "samples": run.samples, "summary": lines,
                               "answers": {k: dict(v) for k, v in run.answers.items()},
                               "userLogins": run.user_logins}, indent=1, default=str))
    svg(run, Path(args.plot))
    print(f"\n(raw: {out.relative_to(ROOT)}; plot: {args.plot})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each flood")
    parser.add_argument("--after", type=float, default=None,
                        help="quiet time after each flood (default: --seconds)")
    parser.add_argument("--rest", type=float, default=10.0, help="quiet time before the first")
    parser.add_argument("--port", default="3979")
    parser.add_argument("--only", choices=("quota", "login"), help="run one flood only")
    parser.add_argument("--creators", type=int, default=16,
                        help="connections creating tasks in the quota flood")
    parser.add_argument("--readers", type=int, default=8,
                        help="clients reading GET /events in the quota flood")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="more environment for the server (repeatable)")
    parser.add_argument("--plot", default=str(BENCH / "plots" / "soak_quota_login.svg"))
    arguments = parser.parse_args()
    if arguments.after is None:
        arguments.after = arguments.seconds
    asyncio.run(main(arguments))
