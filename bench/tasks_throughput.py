#!/usr/bin/env python3
"""End-to-end tasks/s through REST + worker + events, with many tasks already stored.

    .venv/bin/python bench/tasks_throughput.py             # SQLite: 1,000 / 10,000 / 100,000 stored
    .venv/bin/python bench/tasks_throughput.py --stored 1000 --backend mongo     # for the record
    .venv/bin/python bench/tasks_throughput.py --stored 100000 --profile   # + py-spy of the server
    .venv/bin/python bench/tasks_throughput.py --stored 1000,1000000 --seed-cache /tmp/seed \
        --src /path/to/an/older/tree        # the same seeded data for an older Droid

For each size: a fresh data folder is filled with that many completed tasks of 20 users, then
Droid is started as `python -m droid` starts it (`droid.__main__.main()`, through
`serve` below, which only adds a loop-lag probe) with its defaults (4 attempts at once) plus
DROID_DEMO_DELAY_S=0, LOG_LEVEL=WARNING and a fixed JWT_SECRET. The load: USERS users, each with
one python-socketio client (WebSocket) and WINDOW tasks in flight over aiohttp keep-alive HTTP:
POST /tasks, wait for that task's `task.completed` on the user's socket, next. A warm-up, then
--tasks measured tasks. Server on CPU 0, load on CPU 1 (taskset), as bench/run.py does.

Reported per size: tasks/s over the measured tasks, POST→task.completed latency p50/p99, the
server's CPU per task (from /proc), and the server's event-loop lag: a probe task in the server
sleeps 5 ms again and again and records how late it wakes (p50 / p99 / max over the measured
phase). The probe is this file's (`serve`), not Droid's: droid/ has no bench code. On SQLite the
launcher also accounts for every store call (`StoreHops`: calls per store method, time queued in
the store's thread, running SQL there, and coming back to the loop), in the JSON under
results[].loopLagMs.store. The JSON goes to bench/results/ (ignored by git).

Only for the bench: `serve` also answers GET /bench/lag (?reset=1 clears the samples).
Figures and what they show: bench/RESULTS.md.

Seeding, SQLite: always by this checkout's store (a child process `tasks_throughput.py seed`, so
whatever --src runs, old trees included, starts from the same file with this checkout's schema;
an older tree must read it, which additive schema changes allow): the store creates the file,
then the rows go in with executemany in one transaction, generated a chunk at a time (1,000,000
in about a minute, ~0.6 GB). With --seed-cache DIR the file of each size is made once and copied
for every run. MongoDB: `MongoStore.insert_task` one by one.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from run import NICE, favoured, wait_quiet  # bench/run.py's priority and quiet-machine wait

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
SECRET = "droid-bench-only-secret-0123456789abcdef"
SERVER_CPU, LOADGEN_CPU = "0", "1"
OLD_USERS = 20          # owners of the preloaded tasks
PROBE_INTERVAL_S = 0.005


# --- the server side: python -m droid plus a loop-lag probe ------------------------------------

def serve() -> None:
    """Run Droid exactly as `python -m droid` does, with a loop-lag probe and GET /bench/lag."""
    import tornado.web

    import droid.__main__ as droid_main
    import droid.app as droid_app

    samples: list[float] = []
    hops = StoreHops()
    if os.environ.get("MONGODB_URI") is None:
        hops.install()

    async def probe() -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(PROBE_INTERVAL_S)
            samples.append(loop.time() - start - PROBE_INTERVAL_S)

    class LagHandler(tornado.web.RequestHandler):
        def get(self) -> None:
            body = {**summary_ms(samples), "store": hops.summary()}
            if self.get_query_argument("reset", None):
                samples.clear()
                hops.reset()
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps(body))

    real_make_app = droid_app.make_app

    async def make_app(*args: Any, **kwargs: Any) -> Any:
        app = await real_make_app(*args, **kwargs)
        app.application.add_handlers(r".*", [(r"/bench/lag", LagHandler)])
        app._lag_probe = asyncio.get_running_loop().create_task(probe())  # kept alive
        return app

    droid_app.make_app = make_app
    droid_main.main()


class StoreHops:
    """Bench-only accounting of SqliteStore's thread hops (one per store call): how many, by
    store method, and where each one's time goes: waiting in the store thread's queue, running
    there (SQL), and coming back (from the thread's end to the event loop resuming the caller)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.by_method: dict[str, list[float]] = {}  # name -> [calls, queued, running, back]

    def install(self) -> None:
        from droid.store.sqlite import SqliteStore

        real_run = SqliteStore._run
        by_method = lambda: self.by_method  # noqa: E731 - reset() replaces the dict

        async def _run(store: Any, fn: Any, *args: Any) -> Any:
            name = sys._getframe(1).f_code.co_name
            submitted = time.perf_counter()
            times: list[float] = []

            def timed() -> Any:
                times.append(time.perf_counter())
                try:
                    return fn(*args)
                finally:
                    times.append(time.perf_counter())

            try:
                return await real_run(store, timed)
            finally:
                if len(times) == 2:
                    entry = by_method().setdefault(name, [0, 0.0, 0.0, 0.0])
                    entry[0] += 1
                    entry[1] += times[0] - submitted
                    entry[2] += times[1] - times[0]
                    entry[3] += time.perf_counter() - times[1]

        SqliteStore._run = _run

    def summary(self) -> dict:
        return {name: {"calls": int(c), "queuedUs": q / c * 1e6, "runUs": r / c * 1e6,
                       "backUs": b / c * 1e6}
                for name, (c, q, r, b) in sorted(self.by_method.items()) if c}


def summary_ms(samples: list[float]) -> dict:
    if not samples:
        return {"samples": 0}
    ordered = sorted(samples)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000

    return {"samples": len(ordered), "p50": pct(50), "p99": pct(99), "max": ordered[-1] * 1000}


# --- preloading --------------------------------------------------------------------------------

def old_users() -> list[dict]:
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None, microsecond=0)
    return [{"_id": str(uuid.uuid4()), "email": f"old-{n}@bench.example", "name": None,
             "passwordHash": "x", "createdAt": now - dt.timedelta(days=30)}
            for n in range(OLD_USERS)]


def old_tasks(count: int, users: list[dict], rng: random.Random) -> Iterator[dict]:
    """`count` completed tasks of `users`, created over the past days, one at a time."""
    from droid.store import PRIORITY_RANK

    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None, microsecond=0)
    priorities = list(PRIORITY_RANK)
    for i in range(count):
        created = now - dt.timedelta(seconds=(count - i) * 3)
        done = created + dt.timedelta(seconds=2)
        priority = rng.choice(priorities)
        yield {
            "_id": str(uuid.uuid4()), "userId": users[i % len(users)]["_id"],
            "agentId": "00000000-0000-4000-8000-000000000001", "status": "completed",
            "priority": priority, "priorityRank": PRIORITY_RANK[priority],
            "prompt": f"old task {i}: " + "lorem ipsum " * 8, "response": "an old answer " * 10,
            "error": None, "tokensUsed": 64, "executionTimeMs": 2000, "retryCount": 0,
            "metadataJson": None, "createdAt": created, "updatedAt": done, "startedAt": created,
            "completedAt": done, "runAfter": created, "attempt": 1, "leaseOwner": None,
            "leaseExpiresAt": None}


async def seed_sqlite(path: str, count: int) -> None:
    """Run by `tasks_throughput.py seed PATH COUNT` (this checkout's store): the store makes
    the file, then the rows go in through executemany, a chunk at a time, in one transaction."""
    from droid.store.sqlite import SqliteStore
    from droid.store.sqlite.rows import row_values

    store = SqliteStore(path)
    await store.open()
    try:
        def bulk() -> None:
            conn = store._conn
            users = old_users()
            conn.execute("BEGIN IMMEDIATE")
            for doc in users:
                store._insert("users", doc)
            sql = None
            chunk: list[list] = []
            for doc in old_tasks(count, users, random.Random(count)):
                names, values = row_values("tasks", doc)
                if sql is None:
                    sql = (f"INSERT INTO tasks ({', '.join(names)}) "
                           f"VALUES ({', '.join('?' * len(names))})")
                chunk.append(values)
                if len(chunk) == 10_000:
                    conn.executemany(sql, chunk)
                    chunk = []
            if chunk:
                conn.executemany(sql, chunk)
            conn.execute("COMMIT")

        await store._run(bulk)
    finally:
        await store.close()


async def preload_sqlite(path: str, count: int, cache: Path | None) -> None:
    """The data folder's file: seeded by this checkout in a child process (so that every --src
    starts from the same file), or copied from --seed-cache."""
    cached = cache / f"tasks-{count}.sqlite3" if cache is not None else None
    if cached is None or not cached.exists():
        target = cached or Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        for leftover in (partial, Path(f"{partial}-wal"), Path(f"{partial}-shm")):
            leftover.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        await asyncio.to_thread(subprocess.run, [sys.executable, __file__, "seed", str(partial),
                                                 str(count)], env=env, check=True)
        os.replace(partial, target)  # closed cleanly: no -wal left beside it
    if cached is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(shutil.copyfile, cached, path)


async def preload_mongo(uri: str, db: str, count: int) -> None:
    from droid.store.mongo import MongoStore

    users = old_users()
    store = MongoStore(uri, db)
    await store.open()
    try:
        for doc in users:
            await store.insert_user(doc)
        for doc in old_tasks(count, users, random.Random(count)):
            await store.insert_task(doc)
    finally:
        await store.close()


async def drop_mongo(uri: str, db: str) -> None:
    from droid.store.mongo import MongoStore

    store = MongoStore(uri, db)
    await store.open()
    try:
        await store.drop()
    finally:
        await store.close()


# --- the load ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PIN = {"on": True}


def cpu_pin(cpu: str) -> list[str]:
    if not PIN["on"] or (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        return []
    return ["taskset", "-c", cpu]


def machine_busy_s(cpu: str = "cpu") -> float:
    """CPU seconds used since boot by the whole machine ("cpu") or one core ("cpu0")."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.split(" ", 1)[0] == cpu:
            v = [int(x) for x in line.split()[1:9]]
            return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")
    return 0.0


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class User:
    def __init__(self, token: str) -> None:
        self.token = token
        self.waiting: dict[str, asyncio.Future] = {}
        self.early: set[str] = set()   # completed before the POST answer was read

    def completed(self, data: dict) -> None:
        task_id = data["data"]["taskId"]
        fut = self.waiting.pop(task_id, None)
        if fut is None:
            self.early.add(task_id)
        elif not fut.done():
            fut.set_result(time.perf_counter())


async def load(url: str, users_n: int, window: int, warmup: int, measured: int,
               server_pid: int) -> dict:
    import aiohttp
    import socketio

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        users: list[User] = []
        sockets = []
        for n in range(users_n):
            async with http.post(url + "/auth/register", json={
                    "email": f"bench-{n}-{uuid.uuid4().hex[:6]}@bench.example",
                    "password": "correct horse battery"}) as resp:
                body = await resp.json()
                assert resp.status == 201, body
            user = User(body["accessToken"])
            client = socketio.AsyncClient(reconnection=False)
            client.on("task.completed", user.completed, namespace="/events")
            await client.connect(url, namespaces=["/events"], auth={"token": user.token},
                                 transports=["websocket"], wait_timeout=10)
            users.append(user)
            sockets.append(client)

        total = warmup + measured
        issued = 0
        latencies: list[float] = []
        posts: list[float] = []
        marks: dict[str, float] = {}
        loop = asyncio.get_running_loop()

        async def one(user: User) -> bool:
            nonlocal issued
            if issued >= total:
                return False
            issued += 1
            n = issued
            if n == warmup + 1:
                async with http.get(url + "/bench/lag?reset=1") as resp:
                    await resp.read()
                marks["start"] = time.perf_counter()
                marks["cpu0"] = proc_cpu_s(server_pid)
                marks["self0"] = time.process_time()
                marks["machine0"] = machine_busy_s()
                marks["core0"] = machine_busy_s(f"cpu{SERVER_CPU}")
            sent = time.perf_counter()
            async with http.post(url + "/tasks", json={"prompt": f"bench task {n}"},
                                 headers={"Authorization": f"Bearer {user.token}"}) as resp:
                body = await resp.json()
                assert resp.status == 201, body
            task_id = body["id"]
            if n > warmup:
                posts.append(time.perf_counter() - sent)
            if task_id in user.early:
                user.early.discard(task_id)
                done = time.perf_counter()
            else:
                fut = loop.create_future()
                user.waiting[task_id] = fut
                done = await asyncio.wait_for(fut, 60)
            if n > warmup:
                latencies.append(done - sent)
                marks["end"] = max(marks.get("end", 0.0), done)
            return True

        async def lane(user: User) -> None:
            while await one(user):
                pass

        await asyncio.gather(*[lane(u) for u in users for _ in range(window)])
        cpu = proc_cpu_s(server_pid) - marks["cpu0"]
        own = time.process_time() - marks["self0"]
        machine = machine_busy_s() - marks["machine0"]
        core = machine_busy_s(f"cpu{SERVER_CPU}") - marks["core0"]
        async with http.get(url + "/bench/lag") as resp:
            lag = await resp.json()
        for client in sockets:
            await client.disconnect()
    elapsed = marks["end"] - marks["start"]
    latencies.sort()
    return {"tasksPerS": measured / elapsed, "elapsedS": elapsed,
            "latencyMs": {"p50": statistics.median(latencies) * 1000,
                          "p99": latencies[int(0.99 * (len(latencies) - 1))] * 1000,
                          "postP50": statistics.median(posts) * 1000},
            "serverCpuMsPerTask": cpu / measured * 1000, "serverCpuPct": cpu / elapsed * 100,
            "loadCpuPct": own / elapsed * 100,
            # everything else the machine did meanwhile (other users of the shared cores)
            "othersCpuPct": max(0.0, machine - cpu - own) / elapsed * 100,
            # ... and on the server's own core (when pinned): it had the rest of it
            "othersOnServerCorePct": max(0.0, core - cpu) / elapsed * 100,
            "loopLagMs": lag}


# --- one size ----------------------------------------------------------------------------------

async def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{log.read_text(errors='replace')}")
            try:
                async with http.get(url + "/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{log.read_text(errors='replace')}")
            await asyncio.sleep(0.1)


async def run_size(args: argparse.Namespace, stored: int, workdir: Path,
                   mongo_uri: str | None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MONGODB_", "LLM_", "REDIS_", "JWT_", "DROID_", "WORKER_"))}
    port = free_port()
    env.update(HOST="127.0.0.1", PORT=str(port), JWT_SECRET=SECRET, DROID_DEMO_DELAY_S="0",
               LOG_LEVEL="WARNING", PYTHONPATH=str(args.src),
               # Each user creates ~3,000 tasks a minute here: quotas are checked and counted
               # (their cost is measured) but set high enough not to refuse (issue 22).
               DROID_QUOTA_TASKS_PER_MINUTE="1000000")
    if args.worker_concurrency is not None:
        env["WORKER_CONCURRENCY"] = str(args.worker_concurrency)
    data = workdir / f"data-{stored}"
    t0 = time.perf_counter()
    if mongo_uri:
        db = f"bench_{uuid.uuid4().hex[:8]}"
        env.update(MONGODB_URI=mongo_uri, MONGODB_DB=db)
        await preload_mongo(mongo_uri, db, stored)
    else:
        env.update(DROID_DATA_DIR=str(data))
        await preload_sqlite(str(data / "droid.sqlite3"), stored, args.seed_cache)
    preload_s = time.perf_counter() - t0
    log = workdir / f"server-{stored}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*cpu_pin(SERVER_CPU), sys.executable, __file__, "serve"],
                                cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=favoured)
    spy = None
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_ready(url, proc, log)
        if args.profile:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            spy_out = RESULTS / f"{stamp}-tasks-{args.backend}-{stored}.txt"
            spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record",
                                    "--pid", str(proc.pid), "--format", "raw", "--rate", "250",
                                    "--output", str(spy_out)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        result = await load(url, args.users, args.window, args.warmup, args.tasks, proc.pid)
        result.update(stored=stored, preloadS=preload_s, backend=args.backend)
        if spy is not None:
            result["profile"] = str(spy_out)
        return result
    finally:
        if spy is not None and spy.poll() is None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if mongo_uri:
            await drop_mongo(mongo_uri, db)  # a real MongoDB (DROID_TEST_MONGODB_URI) keeps it
        errors = [line for line in log.read_text(errors="replace").splitlines()
                  if " ERROR " in line or "Traceback" in line]
        if errors:
            print(f"  server log of {stored} has {len(errors)} error lines; its end:\n"
                  + "\n".join(log.read_text(errors="replace").splitlines()[-30:]),
                  file=sys.stderr)


def row(r: dict) -> str:
    lag = r["loopLagMs"]
    return (f"| {r['backend']} | {r['stored']:,} | {r['tasksPerS']:.0f} | "
            f"{r['latencyMs']['p50']:.1f} / {r['latencyMs']['p99']:.1f} "
            f"(POST {r['latencyMs']['postP50']:.1f}) | "
            f"{r['serverCpuMsPerTask']:.2f} ({r['serverCpuPct']:.0f}%) | "
            f"{r['loadCpuPct']:.0f}% / {r['othersCpuPct']:.0f}% "
            f"({r['othersOnServerCorePct']:.0f}% on its core) | "
            f"{lag.get('p50', 0):.2f} / {lag.get('p99', 0):.2f} / {lag.get('max', 0):.1f} |")


async def main_async(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.stored.split(",")]
    RESULTS.mkdir(exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="droid-tasks-bench-") as tmp:
        with contextlib.ExitStack() as stack:
            uri = None
            if args.backend == "mongo":
                sys.path.insert(0, str(ROOT / "tests"))
                import mongo_server  # the tests' SecantusDB launcher (or DROID_TEST_MONGODB_URI)

                uri = stack.enter_context(mongo_server.mongodb_uri())
            for stored in sizes:
                print(f"{args.backend}: {stored:,} tasks stored ...", file=sys.stderr, flush=True)
                if args.wait_quiet:
                    # off the event loop: nothing else runs in this process meanwhile
                    used = wait_quiet(args.wait_quiet)
                    print(f"  other processes use {used:.0f}% of a core", file=sys.stderr)
                results.append(await run_size(args, stored, Path(tmp), uri))
                print("  " + row(results[-1]), file=sys.stderr, flush=True)
    print("| backend | tasks stored | tasks/s | POST → task.completed p50 / p99 (ms) | "
          "server CPU ms/task (busy) | load / others CPU | loop lag p50 / p99 / max (ms) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(row(r))
    if len(results) > 1:
        print(f"\nrate at {results[-1]['stored']:,} / rate at {results[0]['stored']:,}: "
              f"{results[-1]['tasksPerS'] / results[0]['tasksPerS']:.2f}x")
    out = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-tasks-throughput-{args.backend}.json"
    out.write_text(json.dumps({"args": vars(args), "loadavg": os.getloadavg(),
                               "results": results}, indent=2, default=str))
    print(f"\n(raw figures: {out.relative_to(ROOT)})")


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        sys.argv[1:2] = []
        serve()
        return
    if sys.argv[1:2] == ["seed"]:
        asyncio.run(seed_sqlite(sys.argv[2], int(sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stored", default="1000,10000,100000",
                        help="comma-separated numbers of tasks stored before the run")
    parser.add_argument("--backend", choices=("sqlite", "mongo"), default="sqlite",
                        help="mongo: a SecantusDB process (tests/mongo_server.py), or "
                             "DROID_TEST_MONGODB_URI when set")
    parser.add_argument("--tasks", type=int, default=3000, help="measured tasks per size")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--users", type=int, default=8, help="users, one socket each")
    parser.add_argument("--window", type=int, default=4, help="tasks in flight per user")
    parser.add_argument("--worker-concurrency", type=int, default=None,
                        help="WORKER_CONCURRENCY of the server (default: Droid's default, 4)")
    parser.add_argument("--src", type=Path, default=ROOT,
                        help="the Droid source tree to run (default: this checkout; e.g. an "
                             "export of a commit: git archive HEAD | tar -x -C DIR)")
    parser.add_argument("--wait-quiet", type=float, default=30.0, metavar="S",
                        help="before each size, wait up to S s for other processes to leave "
                             "the CPUs nearly idle (default 30; 0: do not wait)")
    parser.add_argument("--seed-cache", type=Path, default=None, metavar="DIR",
                        help="SQLite: keep each size's seeded file in DIR and copy it for every "
                             "run (made once, by this checkout's store)")
    parser.add_argument("--no-pin", action="store_true",
                        help="let the server and the load run on any core (default: server on "
                             "CPU 0, load on CPU 1)")
    parser.add_argument("--profile", action="store_true",
                        help="record the server with py-spy (pip install py-spy) into "
                             "bench/results/*-tasks-*.txt; summarise with "
                             "bench/profile_summary.py")
    args = parser.parse_args()
    args.src = args.src.resolve()
    PIN["on"] = not args.no_pin
    sys.path.insert(0, str(args.src))  # the preloading uses the same store code
    try:
        os.nice(NICE)  # as bench/run.py does: other processes disturb the bench less
    except OSError:
        pass
    if cpu_pin(LOADGEN_CPU):
        os.sched_setaffinity(0, {int(LOADGEN_CPU)})
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
