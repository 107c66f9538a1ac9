"""Running a coroutine without a task until it has to wait (what Python 3.12's eager tasks do).

The transport hands each frame to python-socketio with `run_eager`: a PONG, or an EVENT that
python-socketio runs in its own task, costs no task here; a CONNECT that reads the store gets
one, which Tornado awaits before the next frame, so frames are still handled in order.
"""
from __future__ import annotations

import asyncio
import collections.abc
import contextvars
import logging
from typing import Any, Callable

log = logging.getLogger("droid.realtime")

# The context of the timers each socket keeps (token expiry, connect deadline): one empty
# Context for all of them, where call_later would copy the caller's for each (three objects the
# collector tracks, per socket, and what the caller's context held: a finished coroutine).
QUIET = contextvars.Context()


def run_eager(coro: Any) -> asyncio.Task | None:
    """Run a coroutine now, up to where it first waits: None if it finished there, else a Task
    that runs the rest. It runs in a copy of the current context, the Task too. Exceptions
    raised before the first wait propagate."""
    ctx = contextvars.copy_context()
    try:
        awaited = ctx.run(coro.send, None)
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(_Resumed(coro, awaited), context=ctx)


class _Resumed(collections.abc.Coroutine):
    """A coroutine that already yielded `awaited`, as a coroutine a Task can run from where it
    is: its first step hands the Task that same future, later steps and anything thrown in
    (cancellation, even before the first step) go to the coroutine."""

    __slots__ = ("coro", "awaited", "started")

    def __init__(self, coro: Any, awaited: Any) -> None:
        self.coro, self.awaited, self.started = coro, awaited, False

    def send(self, value: Any) -> Any:
        if not self.started:
            self.started = True
            awaited, self.awaited = self.awaited, None
            return awaited
        return self.coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        self.started, self.awaited = True, None
        if val is None and tb is None:
            return self.coro.throw(typ)
        return self.coro.throw(typ, val, tb)

    def close(self) -> None:
        self.awaited = None
        self.coro.close()

    def __next__(self) -> Any:
        return self.send(None)

    def __iter__(self) -> "_Resumed":
        return self

    def __await__(self) -> "_Resumed":
        return self


def spawn_logged(coro: Any, what: str) -> None:
    """run_eager for work nobody waits for: failures are logged, never lost."""
    try:
        task = run_eager(coro)
    except Exception:
        log.exception("%s failed", what)
        return
    if task is not None:
        _pending.add(task)
        task.add_done_callback(_finished(what))


_pending: set[asyncio.Task] = set()


def _finished(what: str) -> Callable[[asyncio.Task], None]:
    def done(task: asyncio.Task) -> None:
        _pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", what, exc_info=task.exception())
    return done
