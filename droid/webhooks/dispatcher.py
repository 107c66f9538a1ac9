"""From the stored event log to webhook deliveries: nothing published is lost.

Deliveries are derived from each user's stored envelopes, not from the publisher's in-memory
path, so an envelope that matches an endpoint becomes a delivery even when the process that
published it dies right after storing it. Each endpoint keeps a cursor, the last seq of its
owner's log it has turned into deliveries; moving the cursor and storing the deliveries is one
store change with a compare-and-set on the cursor (Store.advance_webhook), so two processes
never make one delivery twice, whoever gets there.

What starts the work: an envelope of a user stored by this process (`stored`, called by the
publisher: the common case, at once), and a sweep every SWEEP_S seconds for the endpoints whose
cursor is behind their owner's log (envelopes of processes that died, of processes that do not
dispatch, or published before an endpoint created elsewhere was known here). What a user's
endpoints want is remembered for KNOWN_S, so that an envelope no endpoint wants (every envelope of
a user without endpoints, a task.created when only terminal events are wanted) costs nothing when
it is published: the cursor passes it with the next wanted one, or with the sweep.

A hole in a user's log (a seq numbered but not stored yet, possible where numbering and storing
are two steps) holds the cursor back until it fills, or for HOLE_S at most (the publisher died
between the two: that seq will never be stored).
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import Callable

from ..store import Store
from ..util import utcnow
from .service import new_delivery

log = logging.getLogger(__name__)

SWEEP_S = 2.0
KNOWN_S = 2.0
HOLE_S = 5.0
BATCH = 200
MAX_ROUNDS = 50  # batches per catch-up; the sweep goes on from there
_KNOWN_MAX = 100_000


class Dispatcher:
    def __init__(self, store: Store, *, attempts: int, first_delay_s: float = 0.0,
                 on_created: Callable[[], None] = lambda: None,
                 max_bytes: int | None = None) -> None:
        self.store = store
        # A read of the log stops at BATCH envelopes or at this many bytes (DROID_MAX_PAGE_BYTES):
        # envelopes are read back whole (prompts, metadata, answers of up to
        # LLM_MAX_ANSWER_BYTES), and each delivery made holds its envelope again.
        self.max_bytes = max_bytes
        self.attempts = attempts
        self.first_delay = dt.timedelta(seconds=first_delay_s)
        self.on_created = on_created
        self._dirty: set[str] = set()
        # user id -> (the events their enabled endpoints want, until when: monotonic)
        self._wanted: dict[str, tuple[frozenset, float]] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.created = 0  # deliveries this process made (tests, logs)

    # what wakes it ---------------------------------------------------------------------------

    def stored(self, user_id: str, event: str, seq: int) -> None:
        """An envelope of the user was stored by this process (the publisher's hook)."""
        known = self._wanted.get(user_id)
        if known is not None:
            wanted, until = known
            if until > time.monotonic():
                if event not in wanted:
                    return  # no endpoint wants it: the cursor passes it with the next one
            else:
                del self._wanted[user_id]
        self._dirty.add(user_id)
        self._wakeup.set()

    def changed(self, user_id: str) -> None:
        """The user's endpoints changed in this process."""
        self._wanted.pop(user_id, None)
        self._dirty.add(user_id)
        self._wakeup.set()

    # the loop --------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="droid-webhook-dispatch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        next_sweep = time.monotonic()
        while True:
            timeout = max(0.0, next_sweep - time.monotonic())
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            self._wakeup.clear()
            try:
                users, self._dirty = self._dirty, set()
                for user_id in users:
                    await self.catch_up(user_id)
                if time.monotonic() >= next_sweep:
                    await self.sweep()
                    next_sweep = time.monotonic() + SWEEP_S
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("turning events into webhook deliveries failed; will try again",
                            exc_info=True)
                next_sweep = min(next_sweep, time.monotonic() + SWEEP_S)

    async def catch_up(self, user_id: str) -> int:
        """Turn the user's new envelopes into deliveries for each enabled endpoint; how many."""
        endpoints = [e for e in await self.store.webhooks_of(user_id) if e["enabled"]]
        if len(self._wanted) >= _KNOWN_MAX:
            self._wanted.clear()
        self._wanted[user_id] = (frozenset(ev for e in endpoints for ev in e["events"]),
                                 time.monotonic() + KNOWN_S)
        if not endpoints:
            return 0
        return await self._advance(user_id, endpoints)

    async def sweep(self) -> int:
        """Catch up every endpoint whose cursor is behind its owner's log; how many made."""
        made = 0
        by_user: dict[str, list[dict]] = {}
        for endpoint in await self.store.webhooks_behind(limit=500):
            by_user.setdefault(endpoint["userId"], []).append(endpoint)
        for user_id, endpoints in by_user.items():
            made += await self._advance(user_id, endpoints)
        return made

    async def _advance(self, user_id: str, endpoints: list[dict]) -> int:
        made = 0
        for _ in range(MAX_ROUNDS):
            if not endpoints:
                break
            low = min(e["cursor"] for e in endpoints)
            events = await self.store.events_after(user_id, low, BATCH,
                                                   max_bytes=self.max_bytes)
            if not events:
                break
            now = utcnow()
            again = []
            for endpoint in endpoints:
                cursor, deliveries = self._plan(endpoint, events, now)
                if cursor == endpoint["cursor"]:
                    continue  # caught up, or waiting for a hole to fill
                if await self.store.advance_webhook(endpoint["_id"], endpoint["cursor"], cursor,
                                                    deliveries):
                    endpoint["cursor"] = cursor
                    made += len(deliveries)
                    self.created += len(deliveries)
                    again.append(endpoint)
                    continue
                # Another process moved it first, maybe not as far as this one's envelopes:
                # go on from where it is now.
                fresh = await self.store.webhook_by_id(endpoint["_id"])
                if fresh is not None and fresh["enabled"]:
                    again.append(fresh)
            if made:
                self.on_created()
            endpoints = again
        return made

    def _plan(self, endpoint: dict, events: list[dict], now: dt.datetime) -> tuple[int, list]:
        """Where the endpoint's cursor may move in these events, and the deliveries on the way."""
        cursor = endpoint["cursor"]
        wanted = set(endpoint["events"])
        out = []
        for doc in events:
            seq = doc["seq"]
            if seq <= cursor:
                continue
            if seq != cursor + 1 and now - doc["createdAt"] < dt.timedelta(seconds=HOLE_S):
                break  # seq cursor + 1 may still be stored: come back for it
            cursor = seq
            if doc["event"] in wanted:
                envelope = doc["envelope"]
                out.append(new_delivery(endpoint, doc["event"], seq, envelope["timestamp"],
                                        envelope["data"], attempts_left=self.attempts, now=now,
                                        due=now + self.first_delay))
        return cursor, out
