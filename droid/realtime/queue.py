"""Each Engine.IO session's queue: lean, and the one door of what is written to a session.

python-engineio gives every session a queue (through `create_queue`, its public hook) and puts
every packet it sends there: the OPEN packet, python-socketio's CONNECT answers and acks, pings.
Droid's Delivery writes through the same door (`send_frames`). While the session has no
WebSocket (long-polling, or an upgrade not finished) the queue holds packets for the next poll;
once the transport is attached, everything is written at once instead.

**The slow-consumer bound** is checked here, once per write, whatever wrote: a session with more
than `Bound.messages` messages, or more than `Bound.bytes` bytes, not yet taken by its client
(queued, or written to a WebSocket and still in Tornado's buffer) is shed: one WARNING line, one
`on_shed` call (the metric), and its connection ends; the client can come back and resume with
`lastSeq`. Bytes are counted before the message being written, so that one large message alone
never trips the bound: a session holds at most the bound plus one message.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, Callable

from ..config import MAX_BACKLOG, MAX_BACKLOG_BYTES
from .wire import Frames

log = logging.getLogger("droid.transport")



@dataclasses.dataclass(frozen=True)
class Bound:
    """The slow-consumer bound, and what to call (with the Engine.IO sid) when it sheds one."""

    messages: int = MAX_BACKLOG
    bytes: int = MAX_BACKLOG_BYTES
    on_shed: Callable[[str], None] | None = None


class LeanQueue:
    """What python-engineio uses of asyncio.Queue (unbounded), in a tenth of the memory: an
    asyncio.Queue allocates four deques and an Event up front (about 3.3 KB, measured with
    tracemalloc). Items live in a list while
    there are any; waiters are futures, each handed the next item, in order. `bytes` counts the
    text of the packets it holds, for the slow-consumer bound."""

    __slots__ = ("_items", "_head", "_getters", "_unfinished", "_finished", "bytes")

    def __init__(self) -> None:
        self._items: list | None = None
        self._head = 0
        self.bytes = 0
        self._getters: list[asyncio.Future] | None = None
        self._unfinished = 0
        self._finished: asyncio.Event | None = None

    def qsize(self) -> int:
        return len(self._items) - self._head if self._items else 0

    def empty(self) -> bool:
        return not self.qsize()

    def waiting(self) -> bool:
        """True when a consumer waits in get() and holds no item yet."""
        getters = self._getters
        if getters and any(not g.done() for g in getters):
            return True
        self._getters = None  # only done (cancelled) getters left
        return False

    def put_nowait(self, item: Any) -> None:
        self._unfinished += 1
        if self._finished is not None:
            self._finished.clear()
        getters = self._getters
        while getters:
            getter = getters.pop(0)
            if not getter.done():
                getter.set_result(item)  # handed over: the consumer holds it now
                return
        if self._items is None:
            self._items = []
        self._items.append(item)
        self.bytes += _size(item)

    async def put(self, item: Any) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> Any:
        items = self._items
        if not items:
            raise asyncio.QueueEmpty
        item = items[self._head]
        items[self._head] = None
        self.bytes -= _size(item)
        self._head += 1
        if self._head == len(items):
            self._items, self._head = None, 0
        elif self._head > 64 and self._head * 2 > len(items):
            del items[:self._head]
            self._head = 0
        return item

    def get(self) -> asyncio.Future:
        """A future of the next item: `await queue.get()` as with asyncio.Queue, but no
        coroutine, so that python-engineio's `wait_for(queue.get(), timeout)` needs no task
        either (a task and its frame per socket, 1.6 KB, and one more per wake-up). A getter
        cancelled before an item came is skipped; one that timed out after its item came
        still returns it (asyncio.wait_for returns a result that is there)."""
        getter = asyncio.get_running_loop().create_future()
        if self.qsize():
            getter.set_result(self.get_nowait())
        else:
            if self._getters is None:
                self._getters = []
            self._getters.append(getter)
        return getter

    def task_done(self) -> None:
        if self._unfinished <= 0:
            raise ValueError("task_done() called too many times")
        self._unfinished -= 1
        if self._unfinished == 0 and self._finished is not None:
            self._finished.set()

    async def join(self) -> None:
        if self._unfinished:
            if self._finished is None:
                self._finished = asyncio.Event()
            await self._finished.wait()

    def clear(self) -> None:
        """Drop what is queued (a shed session's packets)."""
        self._items, self._head, self.bytes = None, 0, 0


def _size(item: Any) -> int:
    data = getattr(item, "data", None)
    return len(data) if isinstance(data, (str, bytes)) else 0


class SessionQueue(LeanQueue):
    """python-engineio's queue of one session, and the door of everything written to it."""

    __slots__ = ("bound", "session", "transport", "direct", "shed")

    def __init__(self, bound: Bound) -> None:
        super().__init__()
        self.bound = bound
        self.session: Any = None      # the AsyncSocket, once the engine server has made it
        self.transport: Any = None    # the WebSocket transport, once attached and live
        self.direct = 0               # messages written to the transport since it drained
        self.shed = False

    def put_nowait(self, item: Any) -> None:
        if self.shed:
            return
        transport = self.transport
        if transport is None:
            before = self.bytes
            super().put_nowait(item)
            self._check(before)
        elif item is not None:  # None: python-engineio waking its own (absent) writer
            before = self._written_before()
            transport.send_packet(item)
            self.direct += 1
            self._check(before)

    def send_frames(self, frames: Frames) -> None:
        """Delivery's pre-encoded packets: written at once on a live WebSocket, else queued."""
        if self.shed:
            return
        transport = self.transport
        if transport is not None and transport.live:
            before = self._written_before()
            transport.send_frames(frames)
            self.direct += frames.count
            self._check(before)
            return
        before = self.bytes
        for packet in frames.packets():
            super().put_nowait(packet)
        self._check(before)

    def pending(self) -> tuple[int, int]:
        """Messages and bytes written to this session that its client has not taken yet."""
        transport = self.transport
        if transport is None:
            return self.qsize(), self.bytes
        buffered = transport.buffered()
        return self.qsize() + (self.direct if buffered else 0), self.bytes + buffered

    def _written_before(self) -> int:
        buffered = self.transport.buffered()
        if not buffered:
            self.direct = 0  # everything written before has reached the kernel
        return self.bytes + buffered

    def _check(self, before: int) -> None:
        bound = self.bound
        if before > bound.bytes or self.pending()[0] > bound.messages:
            self.cut()

    def cut(self) -> None:
        """Shed this session now (the bound is passed, or a replay waited too long)."""
        if self.shed:
            return
        self.shed = True
        session = self.session
        sid = getattr(session, "sid", "?")
        messages, size = self.pending()
        log.warning("client %s fell %d messages or %d bytes behind (bound %d or %d): "
                    "disconnecting it", sid, messages, size, self.bound.messages,
                    self.bound.bytes)
        if self.bound.on_shed is not None:
            self.bound.on_shed(sid)
        super().clear()
        if self.transport is not None:
            self.transport.abort()  # the stream's end ends both sessions
        elif session is not None:
            session.server.end_session_soon(session)
