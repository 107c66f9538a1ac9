"""Envelopes without transactions (a standalone MongoDB): how an envelope written with its change
into the task's document reaches the user's log, exactly once and with no hole in `seq`.

A change writes, in one update of the task's document (atomic on every deployment), its new
state and `pending: {id, event, at}` (with `pendingAt`, indexed). The update's filter asks for
no pending envelope: a task's state cannot move on while its last envelope is not numbered, so
the envelope's data, built when it is numbered, is the task as that change left it.

Numbering uses the user's counter document as a lock: a compare-and-set on (`value`, no
`numbering`) increments `value` and records `numbering: {id, task, seq, envelope, since}`. The
holder then inserts the event ((userId, seq) is unique), takes `pending` off the task, and
releases the counter; each step is idempotent. Whoever finds a numbering older than GRACE_S (its
process died) finishes it: start-up, the check every WATCH_EVERY_S (`_sweep`), or another write
of the same user; the same for a pending envelope that nobody numbered. The counter is read
before the task, and the compare-and-set fails if the counter moved since: an envelope numbered
by someone else meanwhile is seen as gone, never numbered twice.

Whoever numbers an envelope that is not its own hands it to the store's recovered listeners
(the task service delivers it then); the writer that made the change delivers its own.
"""
from __future__ import annotations

import asyncio
import datetime as dt

from pymongo.errors import DuplicateKeyError

from ..envelopes import envelope_of
from ...util import dumps, loads, new_id, utcnow
from ..base import Change
from .connection import MongoBase, event_doc

GRACE_S = 1.0  # a numbering or pending envelope this old is taken for its writer's crash
_WAIT_S = 0.005
_GRACE = dt.timedelta(seconds=GRACE_S)


def pending_entry(change: Change) -> dict:
    """What a change writes into the task's document: its envelope, not numbered yet."""
    return {"id": new_id(), "event": change.event, "at": change.at}


class OutboxMixin(MongoBase):
    async def _flush(self, user_id: str, task_id: str, entry_id: str, *,
                     own: bool = True) -> dict | None:
        """Number the envelope `entry_id` pending in the task into its user's log; the envelope,
        or None when someone else numbered it (and delivers it). Not `own`: delivered from here
        through the recovered listeners."""
        key = f"seq:{user_id}"
        while True:
            counter = await self.counters.find_one({"_id": key})
            if counter is None:
                await self._create_counter(user_id)
                continue
            numbering = counter.get("numbering")
            if numbering is not None:
                await self._wait_or_finish(key, numbering)
                continue
            task = await self.tasks.find_one({"_id": task_id})
            pending = task.get("pending") if task is not None else None
            if pending is None or pending["id"] != entry_id:
                return None
            envelope = envelope_of(pending["event"], task, pending["at"])
            envelope["seq"] = seq = int(counter["value"]) + 1
            numbering = {"id": entry_id, "task": task_id, "user": user_id, "seq": seq,
                         "event": pending["event"], "at": pending["at"],
                         "envelope": dumps(envelope).decode(), "since": utcnow()}
            won = await self.counters.update_one(
                {"_id": key, "value": counter["value"], "numbering": None},
                {"$set": {"value": seq, "numbering": numbering}})
            if won.modified_count != 1:
                continue  # another envelope of the user was numbered meanwhile
            await self._finish(key, numbering, envelope)
            if not own:
                self._recovered([envelope])
            return envelope

    async def _finish(self, key: str, numbering: dict, envelope: dict | None = None) -> None:
        """Complete a numbering (anyone's: every step may be done twice). The numbering keeps
        the whole envelope (what a finisher delivers); the log stores it as every writer does."""
        if envelope is None:
            envelope = loads(numbering["envelope"])
        try:
            await self.events.insert_one(event_doc(numbering["user"], numbering["seq"],
                                                   numbering["event"], envelope,
                                                   numbering["at"]))
        except DuplicateKeyError:
            pass  # inserted already: by its writer, or by another finisher
        await self.tasks.update_one({"_id": numbering["task"], "pending.id": numbering["id"]},
                                    {"$unset": {"pending": "", "pendingAt": ""}})
        await self.counters.update_one({"_id": key, "numbering.id": numbering["id"]},
                                       {"$unset": {"numbering": ""}})

    async def _wait_or_finish(self, key: str, numbering: dict) -> None:
        """Another numbering of the user holds the counter: wait for it, or finish it when its
        writer seems gone."""
        if utcnow() - numbering["since"] < _GRACE:
            await asyncio.sleep(_WAIT_S)
            return
        await self._finish(key, numbering)
        self._recovered([loads(numbering["envelope"])])

    async def _settle(self, task_id: str) -> None:
        """Wait until the task has no pending envelope; number it when its writer seems gone
        (a change of the task is blocked until then)."""
        deadline = asyncio.get_running_loop().time() + 2 * GRACE_S
        while True:
            task = await self.tasks.find_one({"_id": task_id},
                                             {"userId": True, "pending": True, "pendingAt": True})
            pending = task.get("pending") if task is not None else None
            if pending is None:
                return
            if (utcnow() - task["pendingAt"] >= _GRACE
                    or asyncio.get_running_loop().time() > deadline):
                await self._flush(task["userId"], task_id, pending["id"], own=False)
                return
            await asyncio.sleep(_WAIT_S)

    async def _sweep(self) -> None:
        """Finish what crashed writers left: numberings, then envelopes still pending; the
        envelopes numbered here are delivered through the recovered listeners."""
        old = utcnow() - _GRACE
        envelopes = []
        async for counter in self.counters.find({"numbering.since": {"$lt": old}}):
            await self._finish(counter["_id"], counter["numbering"])
            envelopes.append(loads(counter["numbering"]["envelope"]))
        async for task in self.tasks.find({"pendingAt": {"$lt": old}},
                                          {"userId": True, "pending": True}):
            envelope = await self._flush(task["userId"], task["_id"], task["pending"]["id"])
            if envelope is not None:
                envelopes.append(envelope)
        self._recovered(envelopes)
