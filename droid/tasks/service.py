"""The task state machine (TaskService): every change of a task's state happens here; and the
delivery of each change's envelope (EventsService).

pending -> processing -> completed | failed;  pending | processing -> cancelled;
processing -> pending (a failed attempt with retries left, a lost lease, or a shutdown).

Each change is one atomic write of the store, with its envelope (`Change`): the task's new state
and its numbered envelope are stored together or not at all. Only once that write has
committed is the envelope handed to the publisher, EventsService, which only delivers: to this
process's listeners (the real-time Delivery of /events sockets), the SSE streams watching the
user, and the other processes through the relay (Redis). It knows nothing of Socket.IO or HTTP:
the layers above subscribe. Those that work from the stored log instead (webhooks) only hear
that an envelope was stored here (`listen_stored`).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import datetime as dt
import logging
from typing import Any, Awaitable, Callable, Protocol

from ..errors import Conflict, Invalid, NotFound
from ..quotas import FullUsers, Quota, QuotaExceeded, task_size
from ..store import PRIORITY_RANK, Change, Store
from ..store.envelopes import task_json
from ..util import dumps, loads, new_id, now_iso, utcnow


log = logging.getLogger(__name__)
# The publisher's lines carry the name `EventsService` (docs/contract.md).
events_log = logging.getLogger("droid.EventsService")

IDEMPOTENCY_WINDOW = dt.timedelta(hours=24)
LOST_WORKER = "The worker running this task stopped responding"


class Publisher(Protocol):
    async def publish(self, user_id: str, envelope: dict) -> None:
        """Deliver an envelope of a user's task to the owner's live sockets: one stored already
        (numbered), or a live-only one (`seq` None)."""


class LogPublisher:
    """The publisher used when nothing else is plugged in: it only logs."""

    async def publish(self, user_id: str, envelope: dict) -> None:
        log.debug("%s seq=%s for user %s", envelope["event"], envelope["seq"], user_id)


def encode_cursor(doc: dict) -> str:
    created: dt.datetime = doc["createdAt"]
    raw = dumps([int(created.replace(tzinfo=dt.timezone.utc).timestamp() * 1000), doc["_id"]])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        ms, task_id = loads(raw)
        if not isinstance(ms, int) or not isinstance(task_id, str) or isinstance(ms, bool):
            raise ValueError
        created = dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).replace(tzinfo=None)
        return created, task_id
    except (ValueError, TypeError, binascii.Error, OverflowError, OSError):
        raise Invalid("cursor is invalid") from None


class TaskService:
    """Creates, reads and moves tasks; the only writer of a task's `status`."""

    def __init__(self, store: Store, publisher: Publisher | None = None, *, max_retries: int = 2,
                 retry_backoff_s: float = 1.0, quota: Quota | None = None,
                 max_page_bytes: int | None = None) -> None:
        self.store = store
        self.quota = quota or Quota()
        self.max_page_bytes = max_page_bytes
        # Users the per-minute quota refused, until their window ends: their next requests are
        # refused without a store call or reading their body (a flood's).
        self._full = FullUsers(self.quota)
        self.publisher: Publisher = publisher or LogPublisher()
        store.on_recovered(self._deliver_recovered)
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self._created_listeners: list[Callable[[], None]] = []
        self._cancel_listeners: list[Callable[[str], None]] = []
        self._requeue_listeners: list[Callable[[float], None]] = []
        self._delivering: set[asyncio.Task] = set()

    def on_created(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after a task is created here (a worker wakes up)."""
        self._created_listeners.append(listener)

    def on_cancelled(self, listener: Callable[[str], None]) -> None:
        """Call `listener(task_id)` after a task is cancelled here (its attempt stops)."""
        self._cancel_listeners.append(listener)

    def on_requeued(self, listener: Callable[[float], None]) -> None:
        """Call `listener(delay_s)` when a task goes back to pending, due in `delay_s` seconds."""
        self._requeue_listeners.append(listener)

    def retry_delay(self, retry_count: int) -> float:
        """Backoff before the retry after `retry_count` earlier retries: doubling, at most 60 s."""
        return min(self.retry_backoff_s * (2 ** retry_count), 60.0)

    # reads -----------------------------------------------------------------------------------

    async def get(self, user_id: str, task_id: str) -> dict:
        doc = await self.store.task_by_id(task_id, user_id)
        if doc is None:
            raise NotFound("Task not found")
        return task_json(doc)

    async def page(self, user_id: str, *, status: str | None = None, agent_id: str | None = None,
                   limit: int = 20, cursor: str | None = None) -> dict:
        after = decode_cursor(cursor) if cursor else None
        docs = await self.store.tasks_page(user_id, status=status, agent_id=agent_id,
                                           limit=limit + 1, after=after,
                                           max_bytes=self.max_page_bytes)
        # Fewer than `limit` + 1 rows when the page reached max_bytes: there may be more.
        more = len(docs) > limit or (0 < len(docs) <= limit and getattr(docs, "truncated", False))
        docs = docs[:limit]
        return {"items": [task_json(d) for d in docs],
                "nextCursor": encode_cursor(docs[-1]) if more else None}

    # changes made by users -------------------------------------------------------------------

    def refused(self, user_id: str) -> QuotaExceeded | None:
        """The per-minute quota's refusal of the user while it holds (as the store said it
        last), else None: the caller answers it without creating anything."""
        return self._full.refused(user_id)

    async def create(self, user_id: str, *, agent_id: str, prompt: str, priority: str = "normal",
                     metadata: dict | None = None,
                     idempotency_key: str | None = None) -> tuple[dict, bool]:
        """Create a pending task; with an idempotency key seen before, the first task instead.

        Returns (task, created).
        """
        now = utcnow()
        task_id = new_id()
        metadata_json = dumps(metadata).decode() if metadata is not None else None
        size = task_size(prompt, metadata_json)
        doc = {"_id": task_id, "userId": user_id, "agentId": agent_id, "status": "pending",
               "priority": priority, "priorityRank": PRIORITY_RANK[priority], "prompt": prompt,
               "response": None, "error": None, "tokensUsed": None, "executionTimeMs": None,
               "retryCount": 0, "createdAt": now, "updatedAt": now,
               "metadataJson": metadata_json,
               "startedAt": None, "completedAt": None, "runAfter": now, "attempt": 0,
               "leaseOwner": None, "leaseExpiresAt": None}
        change = Change("task.created", now)
        # Counted against the user's quotas first (a replayed Idempotency-Key is refused too
        # while a quota refuses: its client retries after Retry-After and gets its task), then
        # the key is claimed in the same write as the task it names: a key never outlives a
        # task that was not stored, and a second request with it gets the first task (its
        # bytes given back: the Python client sends a key with every task and replays it after
        # a lost answer; it still counts in its minute).
        try:
            stored = await self.store.insert_task(doc, change, key=idempotency_key,
                                                  key_since=now - IDEMPOTENCY_WINDOW,
                                                  quota=self.quota, size=size)
        except QuotaExceeded as exc:
            self._full.remember(user_id, exc)
            raise
        if stored["_id"] != task_id:
            return task_json(stored), False
        await self._publish(user_id, change)

        for listener in self._created_listeners:
            listener()
        return task_json(doc), True

    async def cancel(self, user_id: str, task_id: str) -> dict:
        """Cancel a pending or processing task; 404 when not the caller's, 409 when finished."""
        now = utcnow()
        change = Change("task.cancelled", now)
        doc = await self._transition(self.store.cancel_task(task_id, user_id, now, change),
                                     change)
        if doc is None:
            existing = await self.store.task_by_id(task_id, user_id)
            if existing is None:
                raise NotFound("Task not found")
            raise Conflict(f"Task is already {existing['status']}")
        for listener in self._cancel_listeners:
            listener(task_id)
        return task_json(doc)

    # changes made by workers -----------------------------------------------------------------

    async def claim(self, owner: str, lease_s: float) -> dict | None:
        """Take the most urgent pending task that is due, under a lease; None when none is."""
        now = utcnow()
        lease_until = now + dt.timedelta(seconds=lease_s)
        change = Change("task.processing", now)
        return await self._transition(self.store.claim_task(owner, now, lease_until, change),
                                      change)

    async def renew(self, doc: dict, owner: str, lease_s: float) -> bool:
        """Extend the lease of a running attempt; False when the attempt is no longer ours."""
        until = utcnow() + dt.timedelta(seconds=lease_s)
        return await self.store.renew_lease(doc["_id"], doc["attempt"], owner, until)

    async def progress(self, doc: dict, delta: str) -> None:
        """Publish a piece of a running attempt's answer (live only, not a change of state)."""
        now = now_iso()
        data = {"taskId": doc["_id"], "userId": doc["userId"], "agentId": doc["agentId"],
                "delta": delta, "updatedAt": now}
        envelope = {"event": "task.progress", "data": data, "timestamp": now, "seq": None}
        try:
            await self.publisher.publish(doc["userId"], envelope)
        except Exception:  # a lost piece of progress must not fail the attempt
            log.warning("publishing task.progress for task %s failed", doc["_id"], exc_info=True)

    async def complete(self, doc: dict, *, response: str, tokens_used: int,
                       execution_time_ms: int) -> bool:
        now = utcnow()
        return await self._end_attempt(
            doc, Change("task.completed", now),
            {"status": "completed", "response": response, "tokensUsed": tokens_used,
             "executionTimeMs": execution_time_ms, "error": None, "completedAt": now,
             "updatedAt": now, "leaseOwner": None, "leaseExpiresAt": None},
            stored_bytes=len(response.encode("utf-8", "surrogatepass"))) is not None

    async def fail_attempt(self, doc: dict, error: str, *, execution_time_ms: int | None = None,
                           retryable: bool = True,
                           not_before_s: float | None = None) -> str | None:
        """End a failed attempt: back to pending while retries remain, else failed. A retry is
        due after the backoff, or after `not_before_s` when that is longer (a 429's Retry-After).

        Returns the new status, or None when the attempt was no longer current (cancelled,
        or taken over after its lease ran out).
        """
        now = utcnow()
        retries = doc.get("retryCount", 0)
        if retryable and retries < self.max_retries:
            delay = max(self.retry_delay(retries), not_before_s or 0.0)
            updated = await self._end_attempt(
                doc, Change("task.pending", now),
                {"status": "pending", "error": error, "updatedAt": now,
                 "runAfter": now + dt.timedelta(seconds=delay), "leaseOwner": None,
                 "leaseExpiresAt": None, "executionTimeMs": execution_time_ms},
                count_retry=True)
            if updated is None:
                return None
            self._requeued(delay)
            return "pending"
        updated = await self._end_attempt(
            doc, Change("task.failed", now),
            {"status": "failed", "error": error, "completedAt": now, "updatedAt": now,
             "leaseOwner": None, "leaseExpiresAt": None, "executionTimeMs": execution_time_ms})
        return "failed" if updated is not None else None

    async def requeue(self, doc: dict) -> bool:
        """Give an interrupted attempt back (shutdown): pending again, no retry used."""
        now = utcnow()
        updated = await self._end_attempt(
            doc, Change("task.pending", now),
            {"status": "pending", "updatedAt": now, "runAfter": now, "leaseOwner": None,
             "leaseExpiresAt": None})
        if updated is None:
            return False
        self._requeued(0.0)
        return True

    async def reap_expired(self) -> int:
        """End the attempts whose lease ran out (their process died); returns how many.

        A lost attempt counts as a failed one: back to pending with `retryCount + 1` while
        retries remain, else failed with LOST_WORKER. Counting it bounds a task that kills
        every process that runs it (a "poison" task) to TASK_MAX_RETRIES + 1 attempts, instead
        of taking down one worker after another forever.
        """
        expired = await self.store.expired_leases(utcnow())
        count = 0
        for doc in expired:
            if await self.fail_attempt(doc, LOST_WORKER) is not None:
                log.warning("task %s: lease of %s ran out; attempt counted as failed",
                            doc["_id"], doc.get("leaseOwner"))
                count += 1
        return count

    async def current_status(self, task_id: str) -> tuple[str, int] | None:
        doc = await self.store.task_by_id(task_id)
        return (doc["status"], doc.get("attempt", 0)) if doc else None

    # the one place a state changes -----------------------------------------------------------

    def _end_attempt(self, doc: dict, change: Change, fields: dict, *,
                     count_retry: bool = False, stored_bytes: int = 0) -> Awaitable[dict | None]:
        """Move attempt `doc` on, if it is still the task's current one; `stored_bytes` (an
        answer) are counted for its owner, against DROID_QUOTA_STORED_BYTES, with the change."""
        return self._transition(
            self.store.update_attempt(doc["_id"], doc["attempt"], fields,
                                      count_retry=count_retry, change=change,
                                      stored_bytes=stored_bytes), change)

    async def _transition(self, write: Awaitable[dict | None], change: Change) -> dict | None:
        """Apply one atomic change of state in the store (its envelope stored with it), then
        deliver the envelope."""
        doc = await write
        if doc is not None:
            await self._publish(doc["userId"], change)

        return doc

    def _requeued(self, delay_s: float) -> None:
        for listener in self._requeue_listeners:
            listener(delay_s)

    async def _publish(self, user_id: str, change: Change) -> None:
        envelope = change.envelope
        if envelope is None:  # numbered by another (MongoDB without transactions): it delivers
            return
        try:
            await self.publisher.publish(user_id, envelope)
        except Exception:  # stored with the state: a client resuming gets it all the same
            log.exception("delivering %s seq=%s of user %s failed", envelope["event"],
                          envelope["seq"], user_id)

    def _deliver_recovered(self, envelopes: list[dict]) -> None:
        """Envelopes the store numbered on its own (pending after a failed write): delivered
        now, in a task of their own (the store calls this from its periodic check)."""
        async def deliver() -> None:
            for envelope in envelopes:
                user_id = envelope["data"].get("userId")
                if user_id is not None:
                    try:
                        await self.publisher.publish(user_id, envelope)
                    except Exception:
                        log.exception("delivering recovered %s seq=%s failed",
                                      envelope["event"], envelope["seq"])

        task = asyncio.get_running_loop().create_task(deliver())
        self._delivering.add(task)
        task.add_done_callback(self._delivering.discard)


# delivery ------------------------------------------------------------------------------------

Listener = Callable[[str, str, dict], None]
StoredListener = Callable[[str, str, int], None]


class Relay(Protocol):
    """Carries envelopes to the other processes (droid.realtime.cluster.RedisManager)."""

    async def publish_envelope(self, user_id: str, event: str, envelope: dict) -> None: ...


class EventsService:
    """The publisher: delivers task envelopes, stored already (numbered by the store in the
    write of their change) or live-only (`seq` None), to this process's listeners and SSE
    streams and, through the relay, to the other processes."""

    def __init__(self, metrics: Any = None, relay: Relay | None = None) -> None:
        self.metrics = metrics
        self.relay = relay  # its envelopes come back through `receive` in every other process
        self._listeners: list[Listener] = []
        self._stored_listeners: list[StoredListener] = []
        self._watchers: dict[str, set[StreamWatch]] = {}
        self._emitted: dict[str, Any] = {}  # events_emitted's child counter by event name

    def listen(self, listener: Listener) -> None:
        """Call `listener(user_id, event, envelope)` with every envelope of this process's users,
        published here or received from another process (the real-time Delivery does)."""
        self._listeners.append(listener)

    def listen_stored(self, listener: StoredListener) -> None:
        """Call `listener(user_id, event, seq)` for every envelope this process stored (the
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
            watchers.discard(wakeup)  # type: ignore[arg-type]
            if not watchers:
                del self._watchers[user_id]

    async def publish(self, user_id: str, envelope: dict) -> None:
        """Deliver an envelope of the user: one this process stored (numbered), or a live-only
        one (`seq` None). Envelopes stored one after the other reach it in seq order when their
        writes answer in that order (the SQLite store's one thread); otherwise each socket
        holds an early one until the one before it arrives (droid/realtime/delivery.py)."""
        event = envelope["event"]
        if envelope["seq"] is not None:
            for stored in self._stored_listeners:
                stored(user_id, event, envelope["seq"])
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

    async def publish_live(self, user_id: str, event: str, data: dict) -> None:
        """Deliver an envelope that is not stored (`seq` None): as `task.progress` is."""
        await self.publish(user_id, {"event": event, "data": data, "timestamp": now_iso(),
                                     "seq": None})

    def receive(self, user_id: str, event: str, envelope: dict) -> None:
        """An envelope published here or, through the relay, by another process."""
        for listener in self._listeners:
            listener(user_id, event, envelope)
        live = envelope["seq"] is None
        for wakeup in self._watchers.get(user_id, ()):
            if live:
                wakeup.live.append(envelope)
            wakeup.set()
        events_log.debug("delivered %s seq=%s of user %s", event, envelope["seq"], user_id)


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
