"""Droid, started exactly as `python -m droid` starts it, plus three bench-only routes.

The launcher wraps `droid.app.make_app` so that the application it builds also serves:

    POST /bench/emit   {count, users, start?, rate?, event?, stamp?}: publishes `count`
                       events to the users bench-user-{(start + i) % users} through Droid's real
                       path, `droid.events.publish_live` (droid/tasks/service.py's
                       EventsService): an envelope built as for a stored one but neither
                       numbered nor stored (seq null: this measures fan-out, not the store),
                       handed to the real-time Delivery, which writes the specific event, then
                       `task.event`, to each of the user's sockets. As fast as possible (rate 0)
                       or paced at `rate` per second: a timer at each event's due time
                       publishes it from its own callback (`run_eager`), as the Node
                       reference's setTimeout does, and when the loop comes back late, every
                       event due by then is published in that callback; data.sentAt is the
                       emit time on CLOCK_MONOTONIC in ms (the load generator reads the same
                       clock). With stamp "due" (and a rate),
                       data.sentAt is moved back by how late the event left its pace beyond
                       TIMER_SLACK_MS, so that a loop too busy to publish on time counts in the
                       latency, and the emit time is in data.publishedAt. Answers {emitted,
                       elapsedMs, maxLagMs} once all are emitted.
    GET  /bench/stats  {sockets, engineSockets, gc: {count, totalMs, maxMs, byGeneration}}
                       (?reset=1 zeroes the gc figures after reading them; ?objects=1 adds the
                       live AsyncSocket / Transport / WebSocketHandler / IOStream / Task
                       objects, slow; ?tracked=1 the objects the collector tracks, by type)
    POST /bench/gc     gc.collect() then glibc's malloc_trim(0), answers {ok, collected, trimmed}
    POST /bench/heap   with BENCH_TRACEMALLOC=1 only: what grew since the previous call (tracemalloc)

then hands over to `droid.__main__.main()`, so the event loop, logging, configuration and any
start-up tuning are those of the real command. It prints `BENCH-READY port=<port> pid=<pid>` on
stdout once listening. Configuration comes from the environment like Droid's (bench/run.py sets
PORT=0, HOST=127.0.0.1, JWT_SECRET, DROID_DEMO_DELAY_S=0, LOG_LEVEL=WARNING).
"""
from __future__ import annotations

import asyncio
import collections
import gc
import os
import sys
import time
import tracemalloc
from typing import Any

import orjson
import tornado.web

import droid.__main__ as droid_main
import droid.app as droid_app
from droid.collector import malloc_trim
from droid.realtime.eager import run_eager
from droid.util import now_iso

TASK_ID = "6f1c2e7a-0000-4000-8000-00000000beef"
# A timer of either runtime fires up to ~1 ms off its time (both are millisecond-grained: asyncio
# rounds epoll's timeout up, libuv counts whole ms), so lateness up to this much is the timer's,
# not a busy loop's: stamp "due" leaves it out (the same constant is in reference/server.js).
TIMER_SLACK_MS = 1.0
AGENT_ID = "00000000-0000-4000-8000-000000000001"


def _tally(entry: list, ms: float) -> None:
    """[count, total ms, longest ms] += one pause of `ms`."""
    entry[0] += 1
    entry[1] += ms
    entry[2] = max(entry[2], ms)


class GcPauses:
    """Counts garbage collections and their pauses, through gc.callbacks (cheap: two calls each)."""

    def __init__(self) -> None:
        self.reset()
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def reset(self) -> None:
        self.all = [0, 0.0, 0.0]  # count, total ms, longest ms
        self.by_generation = {0: [0, 0.0, 0.0], 1: [0, 0.0, 0.0], 2: [0, 0.0, 0.0]}

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        ms = (time.perf_counter() - self._started) * 1000.0
        _tally(self.all, ms)
        _tally(self.by_generation[info["generation"]], ms)

    def snapshot(self) -> dict:
        count, total_ms, max_ms = self.all
        return {"count": count, "totalMs": total_ms, "maxMs": max_ms,
                "byGeneration": {str(g): {"count": c, "totalMs": t, "maxMs": m}
                                 for g, (c, t, m) in self.by_generation.items()}}


GC_PAUSES = GcPauses()


class SlowCallbacks:
    """With BENCH_SLOW_MS=N: what holds the loop while events wait, by callback.

    Wraps asyncio's Handle._run and BaseEventLoop._run_once (private names of asyncio, bench-only
    and off by default). `callbacks`: every callback that ran N ms or longer, by coroutine (of a
    task's step) or function; `turns`: the turns of the loop that took N ms or longer in all, with
    what ran in them (count and total ms by callback), and how many such turns.
    """

    def __init__(self, threshold_ms: float) -> None:
        self.threshold_s = threshold_ms / 1000.0
        self.by_name: dict[str, list] = {}
        self.in_turns: dict[str, list] = {}
        self.turns = [0, 0.0, 0.0]  # long turns: count, total ms, longest ms
        self._turn: list[tuple[Any, float]] = []  # (callback, seconds) of this turn
        run, run_once = asyncio.events.Handle._run, asyncio.base_events.BaseEventLoop._run_once

        def _run(handle: asyncio.events.Handle) -> None:
            callback = handle._callback  # before it runs: a handle cancelled meanwhile has none
            t0 = time.perf_counter()
            run(handle)
            took = time.perf_counter() - t0
            self._turn.append((callback, took))
            if took >= self.threshold_s:
                self.add(self.by_name, self.name(callback), took * 1000.0)

        def _run_once(loop: asyncio.base_events.BaseEventLoop) -> None:
            self._turn.clear()
            run_once(loop)
            took = sum(t for _, t in self._turn)
            if took >= self.threshold_s:
                _tally(self.turns, took * 1000.0)
                for callback, t in self._turn:
                    self.add(self.in_turns, self.name(callback), t * 1000.0)

        asyncio.events.Handle._run = _run  # type: ignore[method-assign]
        asyncio.base_events.BaseEventLoop._run_once = _run_once  # type: ignore[method-assign]

    @staticmethod
    def name(callback: Any) -> str:
        owner = getattr(callback, "__self__", None)
        if isinstance(owner, asyncio.Task):
            coro = owner.get_coro()
            code = getattr(coro, "cr_code", None)
            return f"task {code.co_qualname if code else coro!r}"
        return getattr(callback, "__qualname__", repr(callback))

    @staticmethod
    def add(table: dict, name: str, ms: float) -> None:
        _tally(table.setdefault(name, [0, 0.0, 0.0]), ms)

    def reset(self) -> None:
        self.by_name.clear()
        self.in_turns.clear()
        self.turns = [0, 0.0, 0.0]

    def snapshot(self) -> dict:
        def top(table: dict) -> dict:
            rows = sorted(table.items(), key=lambda kv: -kv[1][1])[:25]
            return {name: {"count": c, "totalMs": round(t, 1), "maxMs": round(m, 2)}
                    for name, (c, t, m) in rows}
        return {"callbacks": top(self.by_name),
                "turns": {"count": self.turns[0], "totalMs": round(self.turns[1], 1),
                          "maxMs": round(self.turns[2], 2), "in": top(self.in_turns)}}


SLOW = (SlowCallbacks(float(os.environ["BENCH_SLOW_MS"])) if os.environ.get("BENCH_SLOW_MS")
        else None)
if SLOW is not None:
    # The meter wraps asyncio's own loop; uvloop (Droid's default) runs its callbacks in C.
    os.environ["DROID_EVENT_LOOP"] = "asyncio"
    print("bench: BENCH_SLOW_MS runs Droid on asyncio's loop (DROID_EVENT_LOOP=asyncio)",
          file=sys.stderr)


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
        due_stamp = params.get("stamp") == "due"
        publish = self.droid.events.publish_live
        t0 = _mono_ms()
        max_lag = 0.0

        async def one(i: int, due: float | None) -> None:
            nonlocal max_lag
            user_id = f"bench-user-{(start + i) % users}"
            now = now_iso()
            data = {"taskId": TASK_ID, "userId": user_id, "agentId": AGENT_ID,
                    "status": "processing", "retryCount": 0, "startedAt": now, "updatedAt": now,
                    "i": i, "sentAt": _mono_ms()}
            if due is not None:
                lag = data["sentAt"] - due
                max_lag = max(max_lag, lag)
                if due_stamp:
                    data["publishedAt"] = data["sentAt"]
                    data["sentAt"] -= max(0.0, lag - TIMER_SLACK_MS)
            await publish(user_id, event, data)

        if not rate:
            for i in range(count):
                await one(i, None)
        else:
            # Paced: a timer at each event's due time publishes every event due by then, at once
            # (`run_eager`: the publish runs in the timer's own callback up to where it yields),
            # as the Node reference's setTimeout does: a loop too busy to run the timer on time
            # delays each event by that much, and not by the turns a woken coroutine and its
            # tasks would add on top (1-2 turns: tens of ms on a saturated loop).
            loop = asyncio.get_running_loop()
            done: asyncio.Future = loop.create_future()
            interval = 1000.0 / rate
            pending: set[asyncio.Task] = set()
            next_i = 0

            def tick() -> None:
                nonlocal next_i
                try:
                    due_now = min(count, max(next_i + 1,
                                             int((_mono_ms() - t0) / interval) + 1))
                    for j in range(next_i, due_now):
                        task = run_eager(one(j, t0 + j * interval))
                        if task is not None:
                            pending.add(task)
                            task.add_done_callback(pending.discard)
                    next_i = due_now
                except Exception as exc:  # answered as a 500 by the handler
                    done.set_exception(exc)
                    return
                if next_i >= count:
                    done.set_result(None)
                else:  # loop.time() is time.monotonic(), the clock of _mono_ms()
                    loop.call_at((t0 + next_i * interval) / 1000.0, tick)

            loop.call_at(t0 / 1000.0, tick)
            await done
            if pending:
                await asyncio.gather(*pending)
        self.reply({"emitted": count, "elapsedMs": _mono_ms() - t0, "maxLagMs": max_lag})


class StatsHandler(BenchHandler):
    def get(self) -> None:
        body = {"sockets": len(self.droid.gateway.sockets),
                "engineSockets": len(self.droid.sio.eio.sockets),
                "gc": GC_PAUSES.snapshot()}
        if self.get_query_argument("objects", None):
            # live objects per type of the socket stack, closed ones included (slow: on demand)
            names = ("AsyncSocket", "Transport", "WebSocketHandler", "WebSocketProtocol13",
                     "IOStream", "Task")
            counts = dict.fromkeys(names, 0)
            for obj in gc.get_objects():
                for cls in type(obj).__mro__:
                    if cls.__name__ in counts:
                        counts[cls.__name__] += 1
                        break
            body["objects"] = counts
        if self.get_query_argument("tracked", None):
            # objects the collector tracks, by type (what a full collection walks): slow
            tracked = collections.Counter(
                f"coroutine {o.cr_code.co_qualname}" if type(o).__name__ == "coroutine"
                else f"method {getattr(o, '__qualname__', '?')}" if type(o).__name__ == "method"
                else type(o).__qualname__ for o in gc.get_objects())
            body["tracked"] = {"total": sum(tracked.values()), "frozen": gc.get_freeze_count(),
                               "byType": dict(tracked.most_common(40))}
        if SLOW is not None:
            body["slowCallbacks"] = SLOW.snapshot()
        if self.get_query_argument("reset", None):
            GC_PAUSES.reset()
            if SLOW is not None:
                SLOW.reset()
        self.reply(body)


class GcHandler(BenchHandler):
    def post(self) -> None:
        collected = gc.collect()
        # Free heap pages back to the system (glibc), as V8 does on its own after a GC.
        trim = malloc_trim()
        self.reply({"ok": True, "collected": collected, "trimmed": bool(trim and trim(0))})


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
        if os.environ.get("BENCH_GC_THRESHOLD"):  # experiments: the collector's thresholds
            # (after serving.py has set its own, once start-up is over)
            asyncio.get_running_loop().call_later(
                1.0, gc.set_threshold,
                *(int(t) for t in os.environ["BENCH_GC_THRESHOLD"].split(",")))
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
