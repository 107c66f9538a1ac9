"""The publisher of task envelopes (EventsService): what the task service hands every envelope to.

It numbers each envelope with the user's `seq` and stores it for resume, then hands it to the
listeners of this process (the real-time Delivery of /events sockets, the SSE streams) and to
the relay (Redis, when there are several processes), which hands it to every other process's
publisher (`receive`). It knows nothing of Socket.IO or HTTP: the layers above subscribe. Those
that work from the stored log instead (webhooks) only hear that an envelope was stored here
(`listen_stored`).
"""
from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Callable, Protocol

from ..store import Store
from ..util import iso, now_iso, utcnow

log = logging.getLogger("droid.EventsService")

Listener = Callable[[str, str, dict], None]
StoredListener = Callable[[str, str, int], None]


class Relay(Protocol):
    """Carries envelopes to the other processes (droid.realtime.cluster.RedisManager)."""

    async def publish_envelope(self, user_id: str, event: str, envelope: dict) -> None: ...


class KeyedLocks:
    """One asyncio.Lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, list] = {}

    def __call__(self, key: str) -> "_Held":
        return _Held(self, key)


class _Held:
    def __init__(self, owner: KeyedLocks, key: str) -> None:
        self.owner, self.key = owner, key

    async def __aenter__(self) -> None:
        entry = self.owner._locks.setdefault(self.key, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            await entry[0].acquire()
        except BaseException:  # cancelled while waiting: no longer a user of the lock
            self._leave(entry)
            raise

    async def __aexit__(self, *exc: Any) -> None:
        entry = self.owner._locks[self.key]
        entry[0].release()
        self._leave(entry)

    def _leave(self, entry: list) -> None:
        entry[1] -= 1
        if entry[1] == 0:
            del self.owner._locks[self.key]


class EventsService:
    """Publishes task events: numbered, stored for resume, handed to this process's listeners
    and to the other processes."""

    def __init__(self, store: Store, metrics: Any = None, relay: Relay | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.relay = relay  # its envelopes come back through `receive` in every other process
        self._listeners: list[Listener] = []
        self._stored_listeners: list[StoredListener] = []
        self.user_locks = KeyedLocks()
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._emitted: dict[str, Any] = {}  # events_emitted's child counter by event name

    def listen(self, listener: Listener) -> None:
        """Call `listener(user_id, event, envelope)` with every envelope of this process's users,
        published here or received from another process (the real-time Delivery does)."""
        self._listeners.append(listener)

    def listen_stored(self, listener: StoredListener) -> None:
        """Call `listener(user_id, event, seq)` once this process has stored an envelope (the
        webhook dispatcher: a wake-up only; it reads what to deliver from the stored log)."""
        self._stored_listeners.append(listener)

    def watch(self, user_id: str) -> "StreamWatch":
        """Set whenever an envelope of the user is published, holding the live-only ones
        (`task.progress`, not stored) until the SSE stream takes them."""
        wakeup = StreamWatch()
        self._watchers.setdefault(user_id, set()).add(wakeup)
        return wakeup

    def unwatch(self, user_id: str, wakeup: asyncio.Event) -> None:
        watchers = self._watchers.get(user_id)
        if watchers is not None:
            watchers.discard(wakeup)
            if not watchers:
                del self._watchers[user_id]

    async def publish(self, user_id: str, event: str, data: dict, *, durable: bool = True) -> None:
        if not durable:
            envelope = {"event": event, "data": data, "timestamp": now_iso(), "seq": None}
            await self._fan_out(user_id, event, envelope)
            return
        # One lock per user in this process, so that its envelopes leave in seq order (sockets
        # would put them back in order anyway, but without having to wait for a gap).
        async with self.user_locks(user_id):
            now = utcnow()
            envelope = {"event": event, "data": data, "timestamp": iso(now), "seq": None}
            await self.store.append_event(user_id, event, envelope, now)  # numbers it: seq
            for stored in self._stored_listeners:
                stored(user_id, event, envelope["seq"])
            await self._fan_out(user_id, event, envelope)

    async def _fan_out(self, user_id: str, event: str, envelope: dict) -> None:
        self.receive(user_id, event, envelope)
        if self.relay is not None:
            await self.relay.publish_envelope(user_id, event, envelope)
        else:
            # Listeners write without waiting; let the loop serve sockets between two publishes
            # even when the store answers without waiting either.
            await asyncio.sleep(0)
        if self.metrics is not None:
            counter = self._emitted.get(event)
            if counter is None:  # labels() takes a lock and builds a key: once per event name
                counter = self._emitted[event] = self.metrics.events_emitted.labels(event=event)
            counter.inc()

    def receive(self, user_id: str, event: str, envelope: dict) -> None:
        """An envelope published here or, through the relay, by another process."""
        for listener in self._listeners:
            listener(user_id, event, envelope)
        live = envelope["seq"] is None
        for wakeup in self._watchers.get(user_id, ()):
            if live:
                wakeup.live.append(envelope)
            wakeup.set()
        log.debug("delivered %s seq=%s of user %s", event, envelope["seq"], user_id)



class StreamWatch(asyncio.Event):
    """An SSE stream's wake-up, with the live-only envelopes published since it last looked.

    Bounded: a stream that does not keep up loses the oldest pieces of progress (the finished
    task carries the whole answer), never a stored envelope, which it reads from the store.
    """

    LIVE_MAX = 256

    def __init__(self) -> None:
        super().__init__()
        self.live: collections.deque[dict] = collections.deque(maxlen=self.LIVE_MAX)

    def take_live(self) -> list[dict]:
        items = list(self.live)
        self.live.clear()
        return items
