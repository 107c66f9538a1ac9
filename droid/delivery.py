"""Delivery of task envelopes to this process's /events sockets: in order, exactly once, fast.

The one place that goes under python-socketio. The gateway's own events (`connected`, `pong`,
`resync`, ...) are written here too (`send`), and `connections.count` when one process holds every
socket; with Redis that count (a room emit that python-socketio's Redis manager fans out) and
python-socketio's own packets (CONNECT answers, acks, DISCONNECT) go through python-socketio.

**Order and exactly-once.** Every subscribed socket has an Outbox holding the next `seq` its
client expects. An envelope is written when it is that one; an older one (already sent by a
replay, or heard twice) is dropped; a newer one is held until the gap before it is filled, by
the envelope itself arriving (from this process or, over Redis, from another) or from the event
store after `gap_wait_s`. A hole that the store never fills (a publisher that died between
numbering an envelope and storing it) is skipped after `gap_give_up_s`. A replay (`attach`)
advances the same counter, so resuming needs no lock against publishing, in this process or any
other: envelopes published during the replay are held and released after it. A resume whose next
envelopes are not in the store yet because they are still being stored waits for them the same
way, rather than answering `resync` for a history that is not lost.

**Speed.** A room emit through python-socketio costs, per recipient, an asyncio task, a queue
hop, a writer wake-up with its own `wait_for` timer, and the framing. Here each envelope is
encoded once (as the Socket.IO packet, and as the WebSocket frame holding it) and the same bytes
are written to every recipient's Tornado stream, with no task per recipient. That is only done
where it cannot reorder anything: a WebSocket transport without per-message deflate whose
python-engineio writer is idle, waiting on an empty queue. Any other socket (long-polling, deflate
negotiated, writer busy or packets queued) gets the same pre-encoded packet through
python-engineio's own queue, behind what is already there. With Droid's WebSocket transport
(droid/transport.py, what make_app wires) the frames go to `Transport.send_frames`, which writes
everything in the order it is sent; the queue is then only for sockets not (yet) on a WebSocket.

**Bounds.** A socket with more than `max_backlog` messages, or more than `max_backlog_bytes`
bytes, not yet written (in python-engineio's queue, in Tornado's write buffer through
python-engineio, or written here) is disconnected rather than buffered without bound; the client
can come back and resume with `lastSeq`. Bytes are counted before the message being written, so
that one large message alone never trips the bound: a socket holds at most the bound plus one
message.

**Memory.** `EngineServer` gives each Engine.IO socket a `LeanQueue` through python-engineio's
`create_queue` hook, and `websocket_handler` gives the Tornado driver's receive queue one too:
two asyncio.Queues per socket cost about 6 KB of the 43 KB an idle socket took.
"""
from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any, Callable

import engineio
import engineio.packet
from tornado.iostream import StreamClosedError

from .util import dumps

log = logging.getLogger("droid.delivery")

MAX_BACKLOG = 1000
MAX_BACKLOG_BYTES = 4 * 1024 * 1024
REPLAY_BATCH = 500
GAP_WAIT_S = 0.2
GAP_GIVE_UP_S = 3.0
# A resume whose next seqs are missing from the store waits for them (up to GAP_GIVE_UP_S) only
# when so few are missing that publishers still storing them could explain it.
IN_FLIGHT_MAX = 64
DRAIN_TIMEOUT_S = 30.0


class Frames:
    """Socket.IO EVENT packets carrying one payload, encoded once for every socket and
    transport: the JSON of the payload is built once, and so are the WebSocket frames, back to
    back in one buffer. An envelope goes out as two: its specific event, then `task.event`."""

    __slots__ = ("texts", "count", "ws_bytes", "_packets")

    def __init__(self, namespace: str, events: tuple[str, ...], payload: dict) -> None:
        head, body = b"2" + namespace.encode() + b",[", b"," + dumps(payload) + b"]"
        self.texts = tuple(head + dumps(event) + body for event in events)
        self.count = len(self.texts)
        self.ws_bytes = b"".join(_ws_frame(b"4" + text) for text in self.texts)
        self._packets: tuple[engineio.packet.Packet, ...] | None = None

    @property
    def packets(self) -> tuple[engineio.packet.Packet, ...]:
        """The same packets for python-engineio's queue (long-polling, or a busy writer)."""
        if self._packets is None:
            self._packets = tuple(engineio.packet.Packet(engineio.packet.MESSAGE,
                                                         data=text.decode())
                                  for text in self.texts)
        return self._packets


def _ws_frame(payload: bytes) -> bytes:
    """One unfragmented WebSocket text frame (RFC 6455 5.2; a server never masks)."""
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x81, size)
    elif size <= 0xFFFF:
        head = struct.pack("!BBH", 0x81, 126, size)
    else:
        head = struct.pack("!BBQ", 0x81, 127, size)
    return head + payload


class Outbox:
    """What is known about one socket's place in its user's envelope stream."""

    __slots__ = ("sid", "eio_sid", "user_id", "next_seq", "held", "replaying", "subscribed",
                 "direct", "gap_task", "attaching")

    def __init__(self, sid: str, eio_sid: str, user_id: str) -> None:
        self.sid = sid
        self.eio_sid = eio_sid
        self.user_id = user_id
        self.next_seq = 0            # 0 until attached: nothing is delivered before that
        self.held: dict[int, Frames] = {}
        self.replaying = False
        self.subscribed = False
        self.direct = 0              # messages written straight to the stream since it drained
        self.gap_task: asyncio.Task | None = None
        self.attaching: asyncio.Lock | None = None


class Delivery:
    """The /events sockets of this process, by user, and the envelopes written to them."""

    def __init__(self, sio: Any, store: Any, namespace: str, *, max_backlog: int = MAX_BACKLOG,
                 max_backlog_bytes: int = MAX_BACKLOG_BYTES, gap_wait_s: float = GAP_WAIT_S,
                 gap_give_up_s: float = GAP_GIVE_UP_S) -> None:
        self.sio = sio
        self.store = store
        self.namespace = namespace
        self.max_backlog = max_backlog
        self.max_backlog_bytes = max_backlog_bytes
        self.gap_wait_s = gap_wait_s
        self.gap_give_up_s = gap_give_up_s
        self.outboxes: dict[str, Outbox] = {}
        self.by_user: dict[str, dict[str, Outbox]] = {}
        # WebSocket handlers by Engine.IO sid, for sockets that upgraded from long-polling
        # (those that opened on a WebSocket are found through their environ).
        self.websockets: dict[str, Any] = {}
        self.on_shed: Callable[[str], None] | None = None  # metrics hook
        self._shed: list[Outbox] = []
        self._tasks: set[asyncio.Task] = set()

    # sockets ---------------------------------------------------------------------------------

    def add(self, sid: str, user_id: str) -> None:
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, self.namespace)
        box = Outbox(sid, eio_sid, user_id)
        self.outboxes[sid] = box
        self.by_user.setdefault(user_id, {})[sid] = box

    def remove(self, sid: str) -> None:
        box = self.outboxes.pop(sid, None)
        if box is None:
            return
        box.subscribed = False
        box.held.clear()
        if box.gap_task is not None:
            box.gap_task.cancel()
        boxes = self.by_user.get(box.user_id)
        if boxes is not None:
            boxes.pop(sid, None)
            if not boxes:
                del self.by_user[box.user_id]

    async def attach(self, sid: str, last_seq: int | None) -> int | None:
        """Subscribe a socket: write what it missed after `last_seq`, then everything new.

        Without `last_seq`, only what is published from now on. Returns the oldest seq still
        kept when the history no longer reaches back to `last_seq` (nothing is replayed then:
        the client must resync over REST), else None.
        """
        box = self.outboxes.get(sid)
        if box is None:
            return None
        if box.attaching is None:
            box.attaching = asyncio.Lock()
        async with box.attaching:  # one replay at a time per socket
            box.subscribed = True
            box.replaying = True
            box.held.clear()
            try:
                return await self._replay(box, last_seq)
            finally:
                box.replaying = False
                self._release(box)
                self._shed_laggards()

    async def _replay(self, box: Outbox, last_seq: int | None) -> int | None:
        user_id = box.user_id
        last = await self.store.last_seq(user_id)
        if last_seq is None:
            # Only what is published from now on, and whatever reached this socket while the
            # store was read is that, even when the read already counted it (numbered between
            # the read's start and its answer): start there, not after it.
            box.next_seq = min(last + 1, min(box.held)) if box.held else last + 1
            return None
        waited = 0.0
        while True:
            if last_seq >= last:
                box.next_seq = last + 1
                return None
            oldest = await self.store.oldest_seq(user_id)
            if oldest is not None and oldest <= last_seq + 1:
                break
            # What follows last_seq is not stored: expired (the client must resync), or
            # numbered by a publisher, here or in another process, that has not stored it yet.
            # The second is only ever the newest few seqs, and lasts milliseconds: wait for it
            # as the gap watcher does, rather than tell the client its history is gone.
            missing = (last if oldest is None else oldest - 1) - last_seq
            if missing > IN_FLIGHT_MAX or waited >= self.gap_give_up_s:
                box.next_seq = last + 1
                return oldest if oldest is not None else last + 1
            await asyncio.sleep(self.gap_wait_s)
            waited += self.gap_wait_s
            if self.outboxes.get(box.sid) is not box or not box.subscribed:
                return None
            last = await self.store.last_seq(user_id)
        box.next_seq = last_seq + 1
        while self.outboxes.get(box.sid) is box and box.subscribed:
            docs = await self.store.events_after(user_id, box.next_seq - 1, REPLAY_BATCH)
            hole = False
            for doc in docs:
                envelope = doc["envelope"]
                frames = self.frames(envelope["event"], envelope)
                if not hole and envelope["seq"] == box.next_seq:
                    self._write(box, frames)
                    box.next_seq += 1
                    if self._backlog(box) > self.max_backlog // 2 or \
                            self._backlog_bytes(box) > self.max_backlog_bytes // 2:
                        await self._drain(box)
                else:
                    # Numbered but not stored yet (or never will be): hold the rest, and
                    # let the gap watcher wait for it once the replay is over.
                    hole = True
                    box.held[envelope["seq"]] = frames
            if hole or len(docs) < REPLAY_BATCH or box.next_seq > last:
                return None
        return None

    def detach(self, sid: str) -> None:
        """Stop delivering envelopes to a socket (unsubscribe.tasks)."""
        box = self.outboxes.get(sid)
        if box is not None:
            box.subscribed = False
            box.held.clear()

    # envelopes -------------------------------------------------------------------------------

    def frames(self, event: str, envelope: dict) -> Frames:
        return Frames(self.namespace, (event, "task.event"), envelope)

    def send(self, sid: str, event: str, payload: dict) -> None:
        """One event (not an envelope) to one socket of this process, in order with the rest."""
        box = self.outboxes.get(sid)
        if box is not None:
            self._write(box, Frames(self.namespace, (event,), payload))
            self._shed_laggards()

    def deliver(self, user_id: str, event: str, envelope: dict) -> None:
        """Hand one envelope to every local socket of its user."""
        boxes = self.by_user.get(user_id)
        if not boxes:
            return
        frames = self.frames(event, envelope)
        seq = envelope.get("seq")
        for box in list(boxes.values()):
            if not box.subscribed:
                continue
            if seq is None:  # live-only (task.progress): no place in the order to keep
                if not box.replaying:
                    self._write(box, frames)
            elif seq < box.next_seq:
                continue  # sent already, by a replay or from another process
            elif seq == box.next_seq and not box.replaying:
                self._write(box, frames)
                box.next_seq += 1
                if box.held:
                    self._release(box)
            else:
                box.held[seq] = frames
                if not box.replaying:
                    self._watch_gap(box)
        self._shed_laggards()

    def catch_up(self) -> None:
        """Look in the store for envelopes this process may have missed (Redis was away)."""
        for user_id in list(self.by_user):
            self._spawn(self._catch_up(user_id))

    async def _catch_up(self, user_id: str) -> None:
        boxes = [b for b in self.by_user.get(user_id, {}).values() if b.subscribed]
        if not boxes:
            return
        after = min(b.next_seq for b in boxes) - 1
        while True:
            docs = await self.store.events_after(user_id, after, REPLAY_BATCH)
            for doc in docs:
                self.deliver(user_id, doc["event"], doc["envelope"])
                after = doc["seq"]
            if len(docs) < REPLAY_BATCH:
                return

    def _release(self, box: Outbox) -> None:
        """Write the held envelopes that are next in line; watch for a gap before the rest."""
        held = box.held
        while held:
            frames = held.pop(box.next_seq, None)
            if frames is None:
                for seq in [s for s in held if s < box.next_seq]:
                    del held[seq]
                if held:
                    self._watch_gap(box)
                return
            self._write(box, frames)
            box.next_seq += 1

    def _watch_gap(self, box: Outbox) -> None:
        if box.gap_task is None or box.gap_task.done():
            box.gap_task = self._spawn(self._fill_gap(box))

    async def _fill_gap(self, box: Outbox) -> None:
        waited = 0.0
        while box.held and self.outboxes.get(box.sid) is box:
            await asyncio.sleep(self.gap_wait_s)
            waited += self.gap_wait_s
            if box.replaying or not box.held:
                return  # the replay releases what is held when it ends
            try:
                docs = await self.store.events_after(box.user_id, box.next_seq - 1,
                                                     min(box.held) - box.next_seq)
            except Exception:
                log.warning("reading missed envelopes for %s failed", box.sid, exc_info=True)
                docs = []
            if box.replaying or self.outboxes.get(box.sid) is not box:
                return
            for doc in docs:
                if doc["seq"] == box.next_seq:
                    envelope = doc["envelope"]
                    self._write(box, self.frames(envelope["event"], envelope))
                    box.next_seq += 1
            self._release(box)
            if box.held and waited >= self.gap_give_up_s:
                log.warning("client %s: envelope %d of user %s never arrived; skipping to %d",
                            box.sid, box.next_seq, box.user_id, min(box.held))
                box.next_seq = min(box.held)
                self._release(box)
            self._shed_laggards()

    # writing ---------------------------------------------------------------------------------

    def _write(self, box: Outbox, frames: Frames) -> None:
        sock = self.sio.eio.sockets.get(box.eio_sid)
        if sock is None or sock.closed:
            return
        transport = self._transport(box.eio_sid)
        if transport is not None:  # droid.transport's WebSocket: it writes, in order, or queues
            buffered = transport.buffered()
            if not buffered:
                box.direct = 0  # everything written before has reached the kernel
            before = sock.queue.bytes + buffered
            if transport.send_frames(frames.ws_bytes, frames.texts):
                box.direct += frames.count
            else:
                for packet in frames.packets:
                    sock.queue.put_nowait(packet)
            if sock.queue.qsize() + (box.direct if transport.buffered() else 0) > \
                    self.max_backlog or before > self.max_backlog_bytes:
                self._shed.append(box)
            return
        queue = sock.queue
        queued = queue.qsize()
        handler = self._websocket(box.eio_sid) if sock.upgraded else None
        conn = getattr(handler, "ws_connection", None)
        before = _pending_bytes(sock, conn)
        if (queued == 0 and conn is not None and conn._compressor is None
                and _writer_idle(queue) and not conn.is_closing()):
            stream = conn.stream
            if not stream._write_buffer:
                box.direct = 0  # everything written before has reached the kernel
            try:
                stream.write(frames.ws_bytes)
            except StreamClosedError:
                return  # the client is gone; its disconnect is on its way
            box.direct += frames.count
        else:
            for packet in frames.packets:
                queue.put_nowait(packet)
        if _pending(box, sock, handler, conn) > self.max_backlog or \
                before > self.max_backlog_bytes:
            self._shed.append(box)

    def _backlog(self, box: Outbox) -> int:
        sock = self.sio.eio.sockets.get(box.eio_sid)
        if sock is None or sock.closed:
            return 0
        transport = self._transport(box.eio_sid)
        if transport is not None:
            return sock.queue.qsize() + (box.direct if transport.buffered() else 0)
        handler = self._websocket(box.eio_sid) if sock.upgraded else None
        return _pending(box, sock, handler, getattr(handler, "ws_connection", None))

    def _backlog_bytes(self, box: Outbox) -> int:
        sock = self.sio.eio.sockets.get(box.eio_sid)
        if sock is None or sock.closed:
            return 0
        transport = self._transport(box.eio_sid)
        if transport is not None:
            return sock.queue.bytes + transport.buffered()
        handler = self._websocket(box.eio_sid) if sock.upgraded else None
        return _pending_bytes(sock, getattr(handler, "ws_connection", None))

    async def _drain(self, box: Outbox) -> None:
        """Wait until a replay's backlog is down to a quarter of the bound, so that a long
        replay paces itself by the client instead of tripping the slow-consumer limit; a client
        that reads nothing for `DRAIN_TIMEOUT_S` is dropped."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_TIMEOUT_S
        while self.outboxes.get(box.sid) is box and (
                self._backlog(box) > self.max_backlog // 4
                or self._backlog_bytes(box) > self.max_backlog_bytes // 4):
            if loop.time() > deadline:
                self._shed.append(box)
                return
            await asyncio.sleep(0.005)

    def close_websocket(self, eio_sid: str) -> None:
        """Close the WebSocket of an Engine.IO session, if it has one open."""
        transport = self._transport(eio_sid)
        if transport is not None:
            transport.close(1008)
            return
        handler = self._websocket(eio_sid)
        if getattr(handler, "ws_connection", None) is not None:
            handler.close(1008)

    def _transport(self, eio_sid: str) -> Any:
        """The droid.transport WebSocket of a session, when the engine server is Droid's."""
        transports = getattr(self.sio.eio, "ws_transports", None)
        return transports.get(eio_sid) if transports is not None else None

    def _websocket(self, eio_sid: str) -> Any:
        handler = self.websockets.get(eio_sid)
        if handler is None:
            environ = self.sio.environ.get(eio_sid)
            handler = environ.get("tornado.handler") if environ else None
        return handler

    def _shed_laggards(self) -> None:
        if not self._shed:
            return
        laggards, self._shed = self._shed, []
        for box in dict.fromkeys(laggards):
            if self.outboxes.get(box.sid) is not box:
                continue
            log.warning("client %s fell more than %d messages or %d bytes behind: "
                        "disconnecting it", box.sid, self.max_backlog, self.max_backlog_bytes)
            if self.on_shed is not None:
                self.on_shed(box.sid)
            self.remove(box.sid)
            self._spawn(self._drop(box))

    async def _drop(self, box: Outbox) -> None:
        sock = self.sio.eio.sockets.get(box.eio_sid)
        if sock is None or sock.closed:
            return
        transport = self._transport(box.eio_sid)
        if transport is not None:
            transport.abort()  # as below: the stream's end ends both sessions
            return
        conn = getattr(self._websocket(box.eio_sid), "ws_connection", None)
        if sock.upgraded and conn is not None:
            # No close handshake: the client is not reading. Closing the stream fails the
            # pending writes and ends the Engine.IO and Socket.IO sessions at once.
            conn.stream.close()
            return
        try:
            await self.sio.disconnect(box.sid, namespace=self.namespace)
            # Closing without waiting: its queue would never drain.
            await sock.close(wait=False, abort=True)
        except Exception:
            log.debug("disconnecting %s failed", box.sid, exc_info=True)

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)


def _pending(box: Outbox, sock: Any, handler: Any, conn: Any) -> int:
    """Messages written to a socket that have not left the process yet: in python-engineio's
    queue, in Tornado's buffer through python-engineio, and written here still in that buffer."""
    direct = box.direct if conn is not None and conn.stream._write_buffer else 0
    return sock.queue.qsize() + direct + getattr(handler, "unwritten", 0)


def _pending_bytes(sock: Any, conn: Any) -> int:
    """Bytes written to a socket that have not left the process yet: in python-engineio's queue
    (characters of its text packets) and in the WebSocket stream's write buffer."""
    return sock.queue.bytes + (len(conn.stream._write_buffer) if conn is not None else 0)


def _writer_idle(queue: Any) -> bool:
    """True when python-engineio's writer waits in queue.get() with nothing in hand.

    While it is still writing a batch (or between two batches) anything written around it
    could overtake what it holds; then the queue is the only safe way in.
    """
    return queue.waiting()


class LeanQueue:
    """What python-engineio and its Tornado driver use of asyncio.Queue (unbounded), in a tenth
    of the memory: two of these per socket, where an asyncio.Queue allocates four deques and an
    Event up front (about 3.3 KB each, measured with tracemalloc). Items live in a list while
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


def _size(item: Any) -> int:
    data = getattr(item, "data", None)
    return len(data) if isinstance(data, (str, bytes)) else 0


class EngineServer(engineio.AsyncServer):
    """python-engineio's server with a LeanQueue per socket (`create_queue` is its public hook
    for the queue each socket gets)."""

    def create_queue(self, *args: Any, **kwargs: Any) -> Any:
        return LeanQueue() if not args and not kwargs else super().create_queue(*args, **kwargs)


def websocket_handler(base: type, delivery: Delivery, *, compression: bool) -> type:
    """python-engineio's Tornado handler, made to (1) register WebSockets that upgraded from
    long-polling with `delivery`, (2) negotiate per-message deflate only when `compression`,
    and (3) drop a WebSocket client that falls more than `max_backlog` messages or
    `max_backlog_bytes` bytes behind in what python-engineio hands to Tornado without waiting
    for it to be written.
    """

    class Handler(base):  # type: ignore[misc, valid-type]
        unwritten = 0
        upgraded_sid: str | None = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.receive_queue = LeanQueue()

        def get_compression_options(self) -> dict | None:
            return {} if compression else None

        def open(self, *args: Any, **kwargs: Any) -> Any:
            sid = self.get_query_argument("sid", None)
            if sid:
                self.upgraded_sid = sid
                delivery.websockets[sid] = self
            return super().open(*args, **kwargs)

        def on_close(self) -> None:
            if self.upgraded_sid is not None and \
                    delivery.websockets.get(self.upgraded_sid) is self:
                del delivery.websockets[self.upgraded_sid]
            super().on_close()

        def write_message(self, message: Any, binary: bool = False) -> Any:
            conn = self.ws_connection
            before = len(conn.stream._write_buffer) if conn is not None else 0
            written = super().write_message(message, binary)
            self.unwritten += 1
            written.add_done_callback(self._written)
            if conn is not None and (self.unwritten > delivery.max_backlog
                                     or before > delivery.max_backlog_bytes):
                log.warning("WebSocket client %s is %d messages (%d bytes) behind: disconnecting",
                            self.request.remote_ip, self.unwritten, before)
                conn.stream.close()
            return written

        def _written(self, future: asyncio.Future) -> None:
            self.unwritten -= 1
            if not future.cancelled():
                future.exception()  # a write failed because the connection closed: expected

    return Handler
