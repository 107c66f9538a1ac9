"""The SQLite store's one thread, and the hop of a call to it and of its answer back to the loop."""
from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class StoreThread:
    """The store's one thread, and the hop of a call to it and of its answer back to the loop.

    Hand-written rather than a one-thread ThreadPoolExecutor with `loop.run_in_executor`: a task
    makes six store calls, and that pair spends about half as much CPU again per call as this
    (a concurrent Future with its Condition, a work item, and the chaining of both Futures; ~45
    against ~30 us per hop on one core, bench/RESULTS.md). What it keeps of the executor: calls
    run one at a time in the order they were made; a call whose caller was cancelled before it
    started is skipped; an exception reaches the caller. The thread is a daemon: a process that
    exits without closing the store leaves at most an unfinished transaction, which SQLite rolls
    back (tests/test_store.py covers the hop).
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., T], args: tuple) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        self._calls.put((loop, answer, fn, args))
        return answer

    def stop(self) -> None:
        """Let the thread end once the calls made before this one have run."""
        self._calls.put(None)

    def _serve(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            self._answer(*item)
            del item  # hold nothing of a call while waiting for the next

    @staticmethod
    def _answer(loop: asyncio.AbstractEventLoop, answer: asyncio.Future, fn: Callable[..., T],
                args: tuple) -> None:
        if answer.cancelled():
            return
        try:
            value: Any = fn(*args)
            reply = _succeed
        except BaseException as exc:  # as the executor does: the caller gets it
            value, reply = exc, _fail
        try:
            loop.call_soon_threadsafe(reply, answer, value)
        except RuntimeError:  # the loop is closed: nobody waits for the answer any more
            pass


def _succeed(answer: asyncio.Future, result: Any) -> None:
    if not answer.done():
        answer.set_result(result)


def _fail(answer: asyncio.Future, exc: BaseException) -> None:
    if not answer.done():
        answer.set_exception(exc)

