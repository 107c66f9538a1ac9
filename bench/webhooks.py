#!/usr/bin/env python3
"""Webhooks under load: nothing lost, duplicates counted, deliveries/s and delay.

    .venv/bin/python bench/webhooks.py                      # 2,000 tasks, 1 then 2 processes
    .venv/bin/python bench/webhooks.py --tasks 500 --processes 1

Droid runs as `python -m droid` (one process, or several on one SQLite file: all of them run
tasks and deliver webhooks) with the demo agent at zero delay, DROID_WEBHOOK_ALLOW_PRIVATE=true
and a shortened retry schedule (DROID_WEBHOOK_RETRY_SCHEDULE, default "0,1,2,5,10"). USERS users
each add one endpoint (the default events: task.completed, task.failed, task.cancelled) pointing
at a real HTTP receiver in this process on 127.0.0.1, and submit their share of --tasks with an
API key (WINDOW requests in flight each). The receiver verifies every delivery's signature with
the `standardwebhooks` package and fails a third of the first attempts at random (500).

Reported: whether every task.completed reached the receiver with a 2xx (at least once), the
duplicates (events answered 2xx more than once), deliveries/s (2xx answers over the span from
the first to the last), and the delay from the event (the body's timestamp: when task.completed
was stored) to its first attempt and to its first 2xx (p50 / p99 / max): the first includes the
dispatch and claim, the second also a retry for the third that failed. JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.web
from standardwebhooks import Webhook
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from run import favoured, wait_quiet  # bench/run.py's priority and quiet-machine wait

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
SECRET = "droid-bench-only-secret-0123456789abcdef"
USERS = 4
WINDOW = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy since boot (all cores)."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + parts[4]
    return (sum(parts[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def pct(samples: list[float], p: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


class Receiver:
    """Records every delivery; fails a third of first attempts; verifies signatures."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.secrets: dict[str, str] = {}   # url path -> secret
        self.first_seen: dict[str, float] = {}
        self.first_ok: dict[str, float] = {}
        self.ok_count: dict[str, int] = {}
        self.event_at: dict[str, float] = {}
        self.task_of: dict[str, str] = {}
        self.failed_first = 0
        self.requests = 0
        self.bad_signatures = 0
        self.ok_times: list[float] = []
        self.changed = asyncio.Event()

    async def start(self) -> int:
        receiver = self

        class Handler(tornado.web.RequestHandler):
            def post(self, *_: Any) -> None:
                now = time.time()
                receiver.requests += 1
                headers = {k.lower(): v for k, v in self.request.headers.get_all()}
                try:
                    body = Webhook(receiver.secrets[self.request.path]).verify(
                        self.request.body, headers)
                except Exception:
                    receiver.bad_signatures += 1
                    self.set_status(400)
                    return
                ident = headers["webhook-id"]
                first = ident not in receiver.first_seen
                if first:
                    receiver.first_seen[ident] = now
                    receiver.event_at[ident] = dt.datetime.fromisoformat(
                        body["timestamp"].replace("Z", "+00:00")).timestamp()
                    receiver.task_of[ident] = body["data"].get("taskId", "")
                    if receiver.rng.random() < 1 / 3:
                        receiver.failed_first += 1
                        self.set_status(500)
                        return
                receiver.ok_count[ident] = receiver.ok_count.get(ident, 0) + 1
                receiver.first_ok.setdefault(ident, now)
                receiver.ok_times.append(now)
                receiver.changed.set()
                self.set_status(204)

            def check_xsrf_cookie(self) -> None:
                pass

        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1", backlog=1024)
        server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/.*", Handler)]))
        server.add_sockets(sockets)
        self.server = server
        return sockets[0].getsockname()[1]


async def call(http: AsyncHTTPClient, method: str, url: str, body: Any = None,
               token: str | None = None) -> Any:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    reply = await http.fetch(HTTPRequest(url, method=method, headers=headers,
                                         body=json.dumps(body) if body is not None else
                                         (b"" if method == "POST" else None),
                                         request_timeout=60), raise_error=False)
    if reply.code >= 300:
        raise RuntimeError(f"{method} {url}: {reply.code} {reply.body[:200]!r}")
    return json.loads(reply.body) if reply.body else None


async def wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    http = AsyncHTTPClient(force_instance=True)
    deadline = time.monotonic() + 60
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"droid exited:\n{log.read_text()[-3000:]}")
            try:
                if (await http.fetch(url + "/health", raise_error=False)).code == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"droid did not start:\n{log.read_text()[-3000:]}")
            await asyncio.sleep(0.1)
    finally:
        http.close()


async def run(args: argparse.Namespace, processes: int) -> dict:
    rng = random.Random(args.seed)
    receiver = Receiver(rng)
    port = await receiver.start()
    work = Path(tempfile.mkdtemp(prefix="droid-bench-webhooks-"))
    procs: list[subprocess.Popen] = []
    urls = []
    for i in range(processes):
        p = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(
            ("DROID_", "MONGODB_", "REDIS_", "LLM_", "JWT_", "WORKER_"))}
        env.update(HOST="127.0.0.1", PORT=str(p), DROID_DATA_DIR=str(work / "data"),
                   JWT_SECRET=SECRET, DROID_DEMO_DELAY_S="0", LOG_LEVEL="WARNING",
                   DROID_WEBHOOK_ALLOW_PRIVATE="true", DROID_ENV="test",
                   DROID_WEBHOOK_RETRY_SCHEDULE=args.schedule, PYTHONPATH=str(ROOT),
                   # Each user submits --tasks / 4 within seconds: quotas are checked and counted
                   # but set high enough not to refuse (issue 22).
                   DROID_QUOTA_TASKS_PER_MINUTE="1000000", DROID_QUOTA_PENDING_TASKS="1000000")
        log = work / f"droid-{i}.log"
        command = [sys.executable, "-m", "droid"]
        if args.profile:  # cProfile (CPU time) of each server, written when it stops (SIGTERM)
            RESULTS.mkdir(exist_ok=True)
            out = RESULTS / f"webhooks-{processes}-{i}.prof"
            command[1:] = ["-c", "import cProfile, sys, time; import droid.__main__ as m; "
                           "p = cProfile.Profile(time.process_time); sys.argv = ['droid']; "
                           f"p.runcall(m.main); p.dump_stats({str(out)!r})"]
        procs.append(subprocess.Popen(command, cwd=work, env=env, stdout=open(log, "wb"),
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      preexec_fn=favoured))
        urls.append(f"http://127.0.0.1:{p}")
        await wait_ready(urls[-1], procs[-1], log)
    http = AsyncHTTPClient(force_instance=True, max_clients=USERS * WINDOW + 8)
    proc_cpu: dict[int, float] = {}
    busy_before = machine_busy_s()
    try:
        keys = []
        for u in range(USERS):
            auth = await call(http, "POST", urls[0] + "/auth/register",
                              {"email": f"bench-{u}-{time.time_ns()}@example.com",
                               "password": "correct horse battery"})
            key = (await call(http, "POST", urls[0] + "/api-keys", {"name": "bench"},
                              token=auth["accessToken"]))["key"]
            if not args.no_endpoints:
                hook = await call(http, "POST", urls[0] + "/webhooks",
                                  {"url": f"http://127.0.0.1:{port}/u{u}"}, token=key)
                receiver.secrets[f"/u{u}"] = hook["secret"]
            keys.append(key)
        per_user = args.tasks // USERS
        task_ids: list[str] = []
        started = time.time()

        async def lane(u: int, n: int, offset: int) -> None:
            for i in range(n):
                task = await call(http, "POST", urls[(u + offset) % len(urls)] + "/tasks",
                                  {"prompt": f"bench {u}/{i}"}, token=keys[u])
                task_ids.append(task["id"])

        await asyncio.gather(*(lane(u, per_user // WINDOW + (w < per_user % WINDOW), w)
                               for u in range(USERS) for w in range(WINDOW)))
        submitted = time.time() - started
        wanted = set(task_ids)
        deadline = time.monotonic() + args.timeout
        while True:
            delivered = {receiver.task_of[i] for i in receiver.first_ok}
            if wanted <= delivered or time.monotonic() > deadline or args.no_endpoints:
                break
            receiver.changed.clear()
            try:
                await asyncio.wait_for(receiver.changed.wait(), 1)
            except asyncio.TimeoutError:
                pass
        # let late duplicates show up: a short, bounded look after the last delivery
        await asyncio.sleep(args.settle)
        proc_cpu.update({p.pid: cpu_seconds(p.pid) for p in procs})
    finally:
        http.close()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        receiver.server.stop()
    cpu_s = [proc_cpu.get(p.pid, 0.0) for p in procs]
    delivered = {receiver.task_of[i] for i in receiver.first_ok}
    first_attempt = [receiver.first_seen[i] - receiver.event_at[i] for i in receiver.first_seen]
    first_ok = [receiver.first_ok[i] - receiver.event_at[i] for i in receiver.first_ok]
    if not first_ok:  # --no-endpoints
        first_attempt = first_ok = [float("nan")]
    span = (max(receiver.ok_times) - min(receiver.ok_times)) if receiver.ok_times else 0
    return {
        "processes": processes, "tasks": len(task_ids), "submitSeconds": round(submitted, 2),
        "allDelivered": set(task_ids) <= delivered, "missing": len(set(task_ids) - delivered),
        "requests": receiver.requests, "failedFirstAttempts": receiver.failed_first,
        "duplicates": sum(n - 1 for n in receiver.ok_count.values()),
        "badSignatures": receiver.bad_signatures,
        "deliveriesPerSecond": round(len(receiver.ok_times) / span, 1) if span else None,
        "toFirstAttemptMs": {k: round(1000 * v, 1) for k, v in (
            ("p50", statistics.median(first_attempt)), ("p99", pct(first_attempt, 99)),
            ("max", max(first_attempt)))},
        "toFirst2xxMs": {k: round(1000 * v, 1) for k, v in (
            ("p50", statistics.median(first_ok)), ("p99", pct(first_ok, 99)),
            ("max", max(first_ok)))},
        "schedule": args.schedule,
        "serverCpuSeconds": [round(c, 2) for c in cpu_s],
        "serverCpuMsPerTask": round(1000 * sum(cpu_s) / max(1, len(task_ids)), 2),
        "machineBusyCores": round((machine_busy_s() - busy_before) /
                                  max(1e-9, time.time() - started), 2),
    }


async def main_async(args: argparse.Namespace) -> None:
    results = []
    favoured()  # this process too: it is the receiver and the load
    for n in [int(x) for x in args.processes.split(",")]:
        others = wait_quiet(args.wait_quiet) if args.wait_quiet else None
        result = await run(args, n)
        result["othersCpuPctBefore"] = others
        results.append(result)
        print(json.dumps(result))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"webhooks-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"results": results, "args": vars(args)}, indent=2))
    print("\n| processes | tasks | all delivered | 1st attempts failed | duplicates | "
          "deliveries/s | event -> 1st attempt p50 / p99 (ms) | event -> 1st 2xx p50 / p99 (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        a, b = r["toFirstAttemptMs"], r["toFirst2xxMs"]
        print(f"| {r['processes']} | {r['tasks']:,} | {'yes' if r['allDelivered'] else 'NO'} | "
              f"{r['failedFirstAttempts']:,} | {r['duplicates']} | {r['deliveriesPerSecond']} | "
              f"{a['p50']} / {a['p99']} | {b['p50']} / {b['p99']} |")
    print(f"\n{out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument("--schedule", default="0,1,2,5,10",
                        help="DROID_WEBHOOK_RETRY_SCHEDULE of the run")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--wait-quiet", type=float, default=120.0,
                        help="wait up to S s for other processes to leave the CPUs idle")
    parser.add_argument("--no-endpoints", action="store_true",
                        help="the same load without any endpoint (the server's CPU without "
                             "webhooks, to compare)")
    parser.add_argument("--profile", action="store_true",
                        help="run each server under cProfile (bench/results/webhooks-N-i.prof)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
