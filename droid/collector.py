"""When Python's cycle collector runs in a serving process, so that its pauses stay short
whatever the number of sockets.

CPython 3.11's collector walks, in a full collection, every object it tracks: with 10,000
sockets connected that is about 250,000 objects and a pause of 150-200 ms during which no event
goes out (bench/scale.py measured such pauses in the p99 of events under connection churn).
Most of those objects live as long as their socket and are freed by reference counting when it
goes (droid/realtime keeps a socket's teardown free of reference cycles; tests/test_rooms.py and
tests/test_churn.py check it with the collector off).

So the collector is run in small steps: every STEP_S, a collection of everything not yet frozen,
after which the survivors are frozen (`gc.freeze()`, public since 3.7): each step walks only what
was made since the previous one, and automatic full collections, which would walk it all, are
left to the steps. A frozen object that later becomes cyclic garbage would be kept, so every
THAW_S everything is unfrozen and collected once (one long pause an hour), and garbage cycles
cannot build up for longer than that.
"""
from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import time
from typing import Callable

log = logging.getLogger("droid.collector")

# A step walks what was made since the previous one: under 1,000 reconnects a second at 10,000
# sockets, a step a second paused 15-35 ms, a step every 0.25 s 2-7 ms, for less time in all
# (bench/scale.py; bench/RESULTS.md, issue 21). Every 0.1 s was no better.
STEP_S = 0.25
THAW_S = 3600.0
TRIM_S = 60.0
# gen0 and gen1 stay automatic (they walk only young objects); gen2 runs only from the steps.
THRESHOLDS = (10_000, 50, 1_000_000)


class Collector:
    """Runs the steps on the event loop until stopped."""

    def __init__(self, *, step_s: float = STEP_S, thaw_s: float = THAW_S,
                 trim_s: float = TRIM_S) -> None:
        self.step_s = step_s
        self.thaw_s = thaw_s
        self.trim_s = trim_s
        self._timer: asyncio.TimerHandle | None = None
        self._thawed_at = self._trimmed_at = time.monotonic()
        self._trim = malloc_trim()
        self._trimming: asyncio.Future | None = None
        self.longest_ms = 0.0
        self.trims = 0

    def start(self) -> None:
        """Freeze what start-up built, take over full collections, and start stepping."""
        gc.collect()
        gc.freeze()
        gc.set_threshold(*THRESHOLDS)
        self._timer = asyncio.get_running_loop().call_later(self.step_s, self._step)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _step(self) -> None:
        started = time.perf_counter()
        if time.monotonic() - self._thawed_at >= self.thaw_s:
            self._thawed_at = time.monotonic()
            gc.unfreeze()
        gc.collect()
        gc.freeze()
        self.longest_ms = max(self.longest_ms, (time.perf_counter() - started) * 1000)
        loop = asyncio.get_running_loop()
        if (self._trim is not None and time.monotonic() - self._trimmed_at >= self.trim_s
                and (self._trimming is None or self._trimming.done())):
            self._trimmed_at = time.monotonic()
            self._trimming = loop.run_in_executor(None, self._trim, 0)
            self._trimming.add_done_callback(self._trimmed)
        self._timer = loop.call_later(self.step_s, self._step)

    def _trimmed(self, done: asyncio.Future) -> None:
        if done.cancelled() or done.exception() is not None:
            log.warning("malloc_trim failed: %r", None if done.cancelled() else done.exception())
            return
        self.trims += 1


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own symbols: libc's among them
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim
