"""Droid, started exactly as `python -m droid` starts it, plus three bench-only routes.

The launcher wraps `droid.app.make_app` so that the application it builds also serves:

    POST /bench/emit   {count, users, start?, rate?, event?}: emits `count` envelopes to the
                       rooms user:bench-user-{(start + i) % users} through Droid's real delivery
                       path, EventsService.publish (the specific event, then `task.event`),
                       with live-only envelopes (seq null, not stored: this measures
                       fan-out). As fast as possible (rate 0) or paced at
                       `rate` per second; data.sentAt is the emit time on CLOCK_MONOTONIC in ms
                       (the load generator reads the same clock). Answers {emitted, elapsedMs,
                       maxLagMs} once all are emitted.
    GET  /bench/stats  {sockets, engineSockets, gc: {count, totalMs, maxMs, byGeneration}}
                       (?reset=1 zeroes the gc figures after reading them; ?objects=1 adds the
                       live AsyncSocket / WebSocketHandler / IOStream / Task objects, slow)
    POST /bench/gc     gc.collect() then glibc's malloc_trim(0), answers {ok, collected, trimmed}
    POST /bench/heap   with BENCH_TRACEMALLOC=1 only: what grew since the previous call (tracemalloc)

then hands over to `droid.__main__.main()`, so the event loop, logging, configuration and any
start-up tuning are those of the real command. It prints `BENCH-READY port=<port> pid=<pid>` on
stdout once listening. Configuration comes from the environment like Droid's (bench/run.py sets
PORT=0, HOST=127.0.0.1, JWT_SECRET, DROID_DEMO_DELAY_S=0, LOG_LEVEL=WARNING).
"""
from __future__ import annotations

import asyncio
import ctypes
import gc
import os
import time
import tracemalloc
from typing import Any

import orjson
import tornado.web

import droid.__main__ as droid_main
import droid.app as droid_app
from droid.util import now_iso

TASK_ID = "6f1c2e7a-0000-4000-8000-00000000beef"
AGENT_ID = "00000000-0000-4000-8000-000000000001"


class GcPauses:
    """Counts garbage collections and their pauses, through gc.callbacks (cheap: two calls each)."""

    def __init__(self) -> None:
        self.reset()
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def reset(self) -> None:
        self.count = 0
        self.total_ms = 0.0
        self.max_ms = 0.0
        self.by_generation = {0: [0, 0.0, 0.0], 1: [0, 0.0, 0.0], 2: [0, 0.0, 0.0]}

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        ms = (time.perf_counter() - self._started) * 1000.0
        self.count += 1
        self.total_ms += ms
        self.max_ms = max(self.max_ms, ms)
        entry = self.by_generation[info["generation"]]
        entry[0] += 1
        entry[1] += ms
        entry[2] = max(entry[2], ms)

    def snapshot(self) -> dict:
        return {"count": self.count, "totalMs": self.total_ms, "maxMs": self.max_ms,
                "byGeneration": {str(g): {"count": c, "totalMs": t, "maxMs": m}
                                 for g, (c, t, m) in self.by_generation.items()}}


GC_PAUSES = GcPauses()


def _mono_ms() -> float:
    return time.monotonic_ns() / 1e6


class BenchHandler(tornado.web.RequestHandler):
    def initialize(self, droid: Any) -> None:
        self.droid = droid

    def check_xsrf_cookie(self) -> None:
        pass

    def reply(self, body: dict) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps(body))


class EmitHandler(BenchHandler):
    async def post(self) -> None:
        params = orjson.loads(self.request.body or b"{}")
        count = int(params.get("count", 1))
        users = int(params.get("users", 1))
        start = int(params.get("start", 0))
        rate = float(params.get("rate", 0) or 0)
        event = str(params.get("event", "task.processing"))
        publish = self.droid.gateway.events.publish
        t0 = _mono_ms()
        max_lag = 0.0
        interval = 1000.0 / rate if rate else 0.0
        for i in range(count):
            if rate:
                due = t0 + i * interval
                wait = due - _mono_ms()
                if wait > 0:
                    await asyncio.sleep(wait / 1000.0)
                max_lag = max(max_lag, _mono_ms() - due)
            user_id = f"bench-user-{(start + i) % users}"
            now = now_iso()
            data = {"taskId": TASK_ID, "userId": user_id, "agentId": AGENT_ID,
                    "status": "processing", "retryCount": 0, "startedAt": now, "updatedAt": now,
                    "i": i, "sentAt": _mono_ms()}
            await publish(user_id, {"event": event, "data": data, "timestamp": now,
                                    "seq": None})
        self.reply({"emitted": count, "elapsedMs": _mono_ms() - t0, "maxLagMs": max_lag})


class StatsHandler(BenchHandler):
    def get(self) -> None:
        body = {"sockets": len(self.droid.gateway.sockets),
                "engineSockets": len(self.droid.sio.eio.sockets),
                "gc": GC_PAUSES.snapshot()}
        if self.get_query_argument("objects", None):
            # live objects per type of the socket stack, closed ones included (slow: on demand)
            names = ("AsyncSocket", "WebSocketHandler", "WebSocketProtocol13", "IOStream", "Task")
            counts = dict.fromkeys(names, 0)
            for obj in gc.get_objects():
                for cls in type(obj).__mro__:
                    if cls.__name__ in counts:
                        counts[cls.__name__] += 1
                        break
            body["objects"] = counts
        if self.get_query_argument("reset", None):
            GC_PAUSES.reset()
        self.reply(body)


def _malloc_trim() -> bool:
    """Give free heap pages back to the system (glibc), as V8 does on its own after a GC."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


class GcHandler(BenchHandler):
    def post(self) -> None:
        collected = gc.collect()
        self.reply({"ok": True, "collected": collected, "trimmed": _malloc_trim()})


def install(droid: Any) -> None:
    """Add the bench routes to a built Droid, and announce readiness once it listens."""
    droid.application.add_handlers(r".*", [
        (r"/bench/emit", EmitHandler, {"droid": droid}),
        (r"/bench/stats", StatsHandler, {"droid": droid}),
        (r"/bench/gc", GcHandler, {"droid": droid}),
        (r"/bench/heap", HeapHandler, {"droid": droid}),
    ])
    start = droid.start

    async def start_and_announce(*args: Any, **kwargs: Any) -> None:
        await start(*args, **kwargs)
        print(f"BENCH-READY port={droid.port} pid={os.getpid()}", flush=True)

    droid.start = start_and_announce


class HeapHandler(BenchHandler):
    """POST /bench/heap (only with BENCH_TRACEMALLOC=1): the allocations that grew the most since
    the previous call, by line of code, to find what a workload leaves behind."""

    previous: Any = None

    def post(self) -> None:
        if not tracemalloc.is_tracing():
            self.reply({"ok": False, "message": "start with BENCH_TRACEMALLOC=1"})
            return
        gc.collect()
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)])
        top = []
        owners: dict[str, float] = {}
        if HeapHandler.previous is not None:
            stats = snapshot.compare_to(HeapHandler.previous, "traceback")
            for stat in stats[:int(self.get_query_argument("top", "15"))]:
                top.append({"sizeDiffKb": stat.size_diff / 1024, "countDiff": stat.count_diff,
                            "traceback": [f"{f.filename}:{f.lineno}" for f in stat.traceback][-6:]})
            for stat in stats:
                owner = _owner(stat.traceback)
                owners[owner] = owners.get(owner, 0.0) + stat.size_diff / 1024
        HeapHandler.previous = snapshot
        self.reply({"ok": True, "top": top, "byOwnerKb": owners})


# Whose code allocated: the innermost frame that belongs to one of these packages (so that an
# asyncio Task started by python-engineio counts as python-engineio's).
_OWNERS = (("/droid/", "droid"), ("/engineio/", "python-engineio"),
           ("/socketio/", "python-socketio"), ("/tornado/", "tornado"), ("/jwt/", "pyjwt"),
           ("/bench/", "bench"))


def _owner(traceback: Any) -> str:
    for frame in reversed(traceback):  # tracemalloc lists the oldest frame first
        for marker, name in _OWNERS:
            if marker in frame.filename:
                return name
    return "other (asyncio, stdlib)"


def main() -> None:
    if os.environ.get("BENCH_TRACEMALLOC"):
        tracemalloc.start(12)
    if os.environ.get("BENCH_WS_TRANSPORT") == "engineio":  # A/B: python-engineio's own loop
        droid_app.WS_TRANSPORT = False
    real_make_app = droid_app.make_app

    async def make_app(*args: Any, **kwargs: Any) -> Any:
        droid = await real_make_app(*args, **kwargs)
        install(droid)
        return droid

    droid_app.make_app = make_app
    if hasattr(droid_main, "make_app"):  # should __main__ ever import it at module level
        droid_main.make_app = make_app
    droid_main.main()


if __name__ == "__main__":
    main()
