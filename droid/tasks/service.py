"""The task state machine: every change of a task's state happens here, and is published here.

pending -> processing -> completed | failed;  pending | processing -> cancelled;
processing -> pending (a failed attempt with retries left, a lost lease, or a shutdown).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import logging
import math
import time
from typing import Awaitable, Callable, Protocol

from ..errors import Conflict, Invalid, NotFound
from ..quotas import Quota, QuotaExceeded, task_size, too_many_per_minute
from ..store import PRIORITY_RANK, Store
from ..util import dumps, iso, loads, new_id, now_iso, to_ms, utcnow

log = logging.getLogger(__name__)

TASK_FIELDS = ("id", "userId", "agentId", "status", "priority", "prompt", "response", "error",
               "tokensUsed", "executionTimeMs", "retryCount", "metadata", "createdAt",
               "updatedAt", "startedAt", "completedAt")
_DATES = ("createdAt", "updatedAt", "startedAt", "completedAt")
_BASE = ("taskId", "userId", "agentId", "status")
EVENT_FIELDS = {
    "task.processing": _BASE + ("retryCount", "startedAt", "updatedAt"),
    "task.completed": _BASE + ("response", "tokensUsed", "executionTimeMs", "completedAt",
                               "updatedAt"),
    "task.failed": _BASE + ("error", "retryCount", "completedAt", "updatedAt"),
    "task.cancelled": _BASE + ("completedAt", "updatedAt"),
    # An addition to the contract: a task went back to `pending` (a retry, a lost worker, or a
    # shutdown), so that every state change is seen live.
    "task.pending": _BASE + ("error", "retryCount", "updatedAt"),
}
IDEMPOTENCY_WINDOW = dt.timedelta(hours=24)
LOST_WORKER = "The worker running this task stopped responding"


class Publisher(Protocol):
    async def publish(self, user_id: str, event: str, data: dict, *, durable: bool = True) -> None:
        """Deliver one event of a user's task (to storage and to live sockets)."""


class LogPublisher:
    """The publisher used when nothing else is plugged in: it only logs."""

    async def publish(self, user_id: str, event: str, data: dict, *, durable: bool = True) -> None:
        log.debug("%s for user %s", event, user_id)


def task_json(doc: dict) -> dict:
    """The public form of a stored task (the contract's field list, ISO dates)."""
    out = {f: doc.get(f) for f in TASK_FIELDS}
    out["id"] = doc["_id"]
    for f in _DATES:
        out[f] = iso(doc.get(f))
    out["retryCount"] = doc.get("retryCount", 0)
    # Stored as JSON text: user keys may hold anything ('$', '.', NUL) that BSON field names may not.
    raw = doc.get("metadataJson")
    out["metadata"] = loads(raw) if raw is not None else None
    return out


def event_data(event: str, task: dict) -> dict:
    if event == "task.created":
        return {**task, "taskId": task["id"]}
    full = {**task, "taskId": task["id"]}
    return {k: full.get(k) for k in EVENT_FIELDS[event]}


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
        # Users the per-minute quota refused, until their window ends (time.monotonic()): their
        # next requests are refused without a store call or reading their body (a flood's).
        self._full: dict[str, float] = {}
        self.publisher: Publisher = publisher or LogPublisher()
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self._created_listeners: list[Callable[[], None]] = []
        self._cancel_listeners: list[Callable[[str], None]] = []
        self._requeue_listeners: list[Callable[[float], None]] = []

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
        until = self._full.get(user_id)
        if until is None:
            return None
        left = until - time.monotonic()
        if left <= 0:
            del self._full[user_id]
            return None
        return too_many_per_minute(self.quota, max(1, math.ceil(left)))

    def _remember_full(self, user_id: str, retry_after: int) -> None:
        if len(self._full) >= 1024:  # bounded: the expired go first, else the oldest
            now = time.monotonic()
            for key in [k for k, t in self._full.items() if t <= now] or [next(iter(self._full))]:
                del self._full[key]
        # The store rounds the rest of the window up to whole seconds: remember a little less.
        self._full[user_id] = time.monotonic() + retry_after - 1

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
        # Counted against the user's quotas first (a replayed Idempotency-Key is refused too
        # while a quota refuses: its client retries after Retry-After and gets its task).
        try:
            vkey = await self.store.admit_task(user_id, to_ms(now), size, self.quota)
        except QuotaExceeded as exc:
            if exc.rule == "per-minute":
                self._remember_full(user_id, exc.retry_after or 1)
            raise
        if idempotency_key is not None:
            first = await self._claim_key(user_id, idempotency_key, task_id, now)
            if first != task_id:
                # A replay stores nothing: its bytes go back (the Python client sends a key with
                # every task and replays it after a lost answer). It still counts in its minute.
                await self.store.add_stored_bytes(user_id, -size)
                return await self._await_task(user_id, first), False
        doc = {"_id": task_id, "userId": user_id, "agentId": agent_id, "status": "pending",
               "priority": priority, "priorityRank": PRIORITY_RANK[priority], "prompt": prompt,
               "response": None, "error": None, "tokensUsed": None, "executionTimeMs": None,
               "retryCount": 0, "createdAt": now, "updatedAt": now,
               "metadataJson": metadata_json,
               "startedAt": None, "completedAt": None, "runAfter": now, "attempt": 0,
               "leaseOwner": None, "leaseExpiresAt": None, "vkey": vkey}
        await self.store.insert_task(doc)
        task = task_json(doc)
        await self._publish(user_id, "task.created", task)
        for listener in self._created_listeners:
            listener()
        return task, True

    async def _claim_key(self, user_id: str, key: str, task_id: str, now: dt.datetime) -> str:
        return await self.store.claim_key(user_id, key, task_id, now, now - IDEMPOTENCY_WINDOW)

    async def _await_task(self, user_id: str, task_id: str) -> dict:
        # A concurrent request with the same key may have reserved it a moment before inserting.
        for _ in range(50):
            doc = await self.store.task_by_id(task_id, user_id)
            if doc is not None:
                return task_json(doc)
            await asyncio.sleep(0.02)
        raise Conflict("A request with this Idempotency-Key is still being processed")

    async def cancel(self, user_id: str, task_id: str) -> dict:
        """Cancel a pending or processing task; 404 when not the caller's, 409 when finished."""
        now = utcnow()
        doc = await self._transition(self.store.cancel_task(task_id, user_id, now),
                                     "task.cancelled")
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
        return await self._transition(self.store.claim_task(owner, now, lease_until),
                                      "task.processing")

    async def renew(self, doc: dict, owner: str, lease_s: float) -> bool:
        """Extend the lease of a running attempt; False when the attempt is no longer ours."""
        until = utcnow() + dt.timedelta(seconds=lease_s)
        return await self.store.renew_lease(doc["_id"], doc["attempt"], owner, until)

    async def progress(self, doc: dict, delta: str) -> None:
        """Publish a piece of a running attempt's answer (live only, not a change of state)."""
        data = {"taskId": doc["_id"], "userId": doc["userId"], "agentId": doc["agentId"],
                "delta": delta, "updatedAt": now_iso()}
        try:
            await self.publisher.publish(doc["userId"], "task.progress", data, durable=False)
        except Exception:  # a lost piece of progress must not fail the attempt
            log.warning("publishing task.progress for task %s failed", doc["_id"], exc_info=True)

    async def complete(self, doc: dict, *, response: str, tokens_used: int,
                       execution_time_ms: int) -> bool:
        now = utcnow()
        return await self._end_attempt(
            doc, "task.completed",
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
                doc, "task.pending",
                {"status": "pending", "error": error, "updatedAt": now,
                 "runAfter": now + dt.timedelta(seconds=delay), "leaseOwner": None,
                 "leaseExpiresAt": None, "executionTimeMs": execution_time_ms},
                count_retry=True)
            if updated is None:
                return None
            self._requeued(delay)
            return "pending"
        updated = await self._end_attempt(
            doc, "task.failed",
            {"status": "failed", "error": error, "completedAt": now, "updatedAt": now,
             "leaseOwner": None, "leaseExpiresAt": None, "executionTimeMs": execution_time_ms})
        return "failed" if updated is not None else None

    async def requeue(self, doc: dict) -> bool:
        """Give an interrupted attempt back (shutdown): pending again, no retry used."""
        now = utcnow()
        updated = await self._end_attempt(
            doc, "task.pending",
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

    def _end_attempt(self, doc: dict, event: str, fields: dict, *,
                     count_retry: bool = False, stored_bytes: int = 0) -> Awaitable[dict | None]:
        """Move attempt `doc` on, if it is still the task's current one."""
        return self._transition(
            self.store.update_attempt(doc["_id"], doc["attempt"], fields, count_retry=count_retry),
            event, stored_bytes)

    async def _transition(self, change: Awaitable[dict | None], event: str,
                          stored_bytes: int = 0) -> dict | None:
        """Apply one atomic change of state in the store, count what it stored for the owner
        (an answer, against DROID_QUOTA_STORED_BYTES), then publish what it became."""
        doc = await change
        if doc is not None:
            if stored_bytes:
                await self.store.add_stored_bytes(doc["userId"], stored_bytes)
            await self._publish(doc["userId"], event, task_json(doc))
        return doc

    def _requeued(self, delay_s: float) -> None:
        for listener in self._requeue_listeners:
            listener(delay_s)

    async def _publish(self, user_id: str, event: str, task: dict) -> None:
        try:
            await self.publisher.publish(user_id, event, event_data(event, task))
        except Exception:  # the state is stored; a lost notification must not undo it
            log.exception("publishing %s for task %s failed", event, task["id"])
