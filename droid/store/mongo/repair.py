"""The MongoDB store's start-up repair (droid/store/repair.py says what is repaired and why).

At every open: numberings and pending envelopes a crash left (without transactions,
droid/store/mongo/outbox.py) are completed. The first time this version opens the database:
the older version's Idempotency-Keys (the `idempotency` collection) move into the tasks they
name, or are released when the task does not exist, and every task updated within the event
retention is checked against its last stored envelope. A `meta` document marks the database as
checked; another process opening it meanwhile leaves the check to the one running it.
"""
from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from pymongo.errors import DuplicateKeyError

from ..envelopes import envelope_of, state_of
from ...util import loads
from ..base import Change
from ..repair import FORMAT, cutoff, needed, report
from .outbox import pending_entry

if TYPE_CHECKING:
    from . import MongoStore

STALE_LOCK = dt.timedelta(minutes=10)


async def repair(store: "MongoStore", now: dt.datetime) -> None:
    await store._sweep()
    if await store.meta.find_one({"_id": "format"}) is not None:
        return
    try:
        await store.meta.insert_one({"_id": "repairing", "at": now})
    except DuplicateKeyError:
        lock = await store.meta.find_one({"_id": "repairing"})
        if lock is not None and lock["at"] > now - STALE_LOCK:
            return  # another process is checking it now
        stale = lock["at"] if lock is not None else None
        taken = await store.meta.update_one({"_id": "repairing", "at": stale},
                                            {"$set": {"at": now}})
        if taken.modified_count != 1:
            return
    keys = await _move_keys(store, now)
    created, states = await _check_tasks(store, now)
    await store.meta.update_one({"_id": "format"}, {"$set": {"value": FORMAT, "at": now}},
                                upsert=True)
    await store.meta.delete_one({"_id": "repairing"})
    report(store, created, states, keys)


async def _move_keys(store: "MongoStore", now: dt.datetime) -> int:
    """The older version's keys into their tasks; those naming no task are released."""
    since = now - dt.timedelta(seconds=store.idempotency_ttl_s)
    released = 0
    async for key in store.idempotency.find({"createdAt": {"$gte": since}}):
        moved = await store.tasks.update_one(
            {"_id": key["taskId"], "userId": key["userId"], "idem": {"$exists": False}},
            {"$set": {"idem": {"u": key["userId"], "k": key["key"]},
                      "idemAt": key["createdAt"]}})
        if moved.matched_count == 0 and await store.tasks.find_one(
                {"_id": key["taskId"]}, {"_id": True}) is None:
            released += 1
    await store.idempotency.delete_many({})
    return released


async def _check_tasks(store: "MongoStore", now: dt.datetime) -> tuple[int, int]:
    """Each task's last stored envelope against its state (once: one pass over the events)."""
    last: dict[Any, str | None] = {}
    created: set = set()
    async for event in store.events.find({}, {"_id": False, "event": True, "envelope": True}
                                         ).sort([("userId", 1), ("seq", 1)]):
        envelope = event["envelope"]
        envelope = loads(envelope) if isinstance(envelope, str) else envelope
        task_id = (envelope.get("data") or {}).get("taskId")
        last[task_id] = state_of(envelope)
        if event["event"] == "task.created":
            created.add(task_id)
    since = cutoff(store, now)
    counts = {"created": 0, "states": 0}
    async for doc in store.tasks.find({"updatedAt": {"$gte": since}}).sort(
            [("userId", 1), ("createdAt", 1), ("_id", 1)]):
        event = needed(doc, last.get(doc["_id"]), doc["_id"] in created, since)
        if event is None:
            continue
        counts["created" if event == "task.created" else "states"] += 1
        await _write(store, doc, event, now)
    return counts["created"], counts["states"]


async def _write(store: "MongoStore", doc: dict, event: str, now: dt.datetime) -> None:
    """The envelope of the task's current state, through the store's atomic write path."""
    if store.transactions:
        envelope = envelope_of(event, doc, now)
        await store._txn(lambda session: store._append_in(session, doc["userId"], event,
                                                           envelope, now))
        return
    entry = pending_entry(Change(event, now))
    marked = await store.tasks.update_one({"_id": doc["_id"], "pending": None},
                                          {"$set": {"pending": entry, "pendingAt": now}})
    if marked.modified_count == 1:
        await store._flush(doc["userId"], doc["_id"], entry["id"])
