"""Tasks in the MongoDB store: creation, reads, claims and the moves of an attempt.

A change is one `find_one_and_update` (or the insert) whose filter holds the precondition (a
claim takes only a pending, due task, of the user whose turn it is: quotas.py; an attempt is
changed only while it is the current one), with its envelope: in the same transaction, or,
without transactions, pending in the same document and numbered right after
(droid/store/mongo/connection.py and outbox.py). An Idempotency-Key is a field of the task it
names (`idem`, unique), so the insert of the task is the claim of its key.
"""
from __future__ import annotations

import datetime as dt
from typing import Any

from pymongo import DESCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError, PyMongoError

from ...quotas import Quota
from ...util import to_ms
from ..base import ACTIVE, STATUSES, Change
from ..envelopes import envelope_of
from ..slim import Page, row_size
from .connection import HIDDEN, TXN_TRIES
from .outbox import OutboxMixin, pending_entry
from .quotas import QuotasMixin

_CANDIDATES = 8


class TasksMixin(QuotasMixin, OutboxMixin):
    async def insert_task(self, doc: dict, change: Change | None = None, *,
                          key: str | None = None, key_since: dt.datetime | None = None,
                          quota: Quota | None = None, size: int = 0) -> dict:
        if quota is not None:  # the step before the insert (quotas.py)
            doc["vkey"] = await self.admit_task(doc["userId"], to_ms(doc["createdAt"]), size,
                                                quota)
        stored = dict(doc)
        if key is not None:
            stored["idem"] = {"u": doc["userId"], "k": key}
            stored["idemAt"] = doc["createdAt"]
        while True:
            try:
                await self._insert_task(doc, stored, change)
                return doc
            except DuplicateKeyError:
                if key is None:
                    raise
            holder = await self.tasks.find_one({"idem": stored["idem"]})
            if holder is None:
                continue  # taken off its task meanwhile: free again
            if key_since is not None and holder["idemAt"] < key_since:
                # Claimed before the window: take it off that task (unless someone just did).
                await self.tasks.update_one({"_id": holder["_id"], "idemAt": holder["idemAt"]},
                                            {"$unset": {"idem": "", "idemAt": ""}})
                continue
            if quota is not None:
                # A replay stores nothing: its bytes go back; it still counts in its minute.
                await self.add_stored_bytes(doc["userId"], -size)
            return {k: v for k, v in holder.items() if k not in HIDDEN}

    async def _insert_task(self, doc: dict, stored: dict, change: Change | None) -> None:
        if change is None:
            await self.tasks.insert_one(stored)
        elif self.transactions:
            async def body(session: Any) -> dict:
                await self.tasks.insert_one(stored, session=session)
                envelope = envelope_of(change.event, doc, change.at)
                await self._append_in(session, doc["userId"], change.event, envelope, change.at)
                return envelope

            change.envelope = await self._txn(body)
        else:
            entry = pending_entry(change)
            await self.tasks.insert_one({**stored, "pending": entry, "pendingAt": change.at})
            change.envelope = await self._flush(doc["userId"], doc["_id"], entry["id"])

    async def task_by_id(self, task_id: str, user_id: str | None = None) -> dict | None:
        query: dict = {"_id": task_id}
        if user_id is not None:
            query["userId"] = user_id
        return await self.tasks.find_one(query, HIDDEN)

    async def tasks_page(self, user_id: str, *, status: str | None, agent_id: str | None,
                         limit: int, after: tuple[dt.datetime, str] | None,
                         max_bytes: int | None = None) -> list[dict]:
        query: dict = {"userId": user_id}
        if status:
            query["status"] = status
        if agent_id:
            query["agentId"] = agent_id
        if after:
            created, last_id = after
            query["$or"] = [{"createdAt": {"$lt": created}},
                            {"createdAt": created, "_id": {"$lt": last_id}}]
        out, size = Page(), 0
        cursor = self.tasks.find(query, HIDDEN).sort(
            [("createdAt", DESCENDING), ("_id", DESCENDING)]).limit(limit)
        async for doc in cursor:
            out.append(doc)
            size += row_size(doc)
            if max_bytes and size >= max_bytes:
                out.truncated = len(out) < limit
                break
        await cursor.close()
        return out

    async def claim_task(self, owner: str, now: dt.datetime, lease_until: dt.datetime,
                         change: Change | None = None) -> dict | None:
        update = {"$set": {"status": "processing", "startedAt": now, "updatedAt": now,
                           "leaseOwner": owner, "leaseExpiresAt": lease_until},
                  "$inc": {"attempt": 1}}
        # Users take turns, each user's most urgent first (quotas.py).
        return await self._claim_fair(
            lambda query, sort: self._claim_one(change, query, update, sort), now)

    async def _claim_one(self, change: Change | None, query: dict, update: dict,
                         sort: list) -> dict | None:
        """The first task matching `query` in `sort` order, claimed with its envelope."""
        if change is None or not self.transactions:
            return await self._change(change, query, update, sort=sort)
        # In a transaction, task by task among the first ones: a task that another claim (or a
        # transaction left open by a killed process, until the server aborts it) holds is
        # passed over after two tries, where a sorted find-and-modify would meet it first
        # every time.
        candidates = await self.tasks.find(query, {"_id": True}).sort(sort).limit(
            _CANDIDATES).to_list(None)
        for candidate in candidates:
            try:
                doc = await self._change(change, {**query, "_id": candidate["_id"]}, update,
                                         tries=2)
            except PyMongoError as exc:
                if not exc.has_error_label("TransientTransactionError"):
                    raise
                continue
            if doc is not None:
                return doc
        return None  # none due, or all taken or held meanwhile: the next claim looks again

    async def cancel_task(self, task_id: str, user_id: str, now: dt.datetime,
                          change: Change | None = None) -> dict | None:
        return await self._change(
            change, {"_id": task_id, "userId": user_id, "status": {"$in": list(ACTIVE)}},
            {"$set": {"status": "cancelled", "updatedAt": now, "completedAt": now,
                      "leaseOwner": None, "leaseExpiresAt": None}})

    async def update_attempt(self, task_id: str, attempt: int, fields: dict, *,
                             count_retry: bool = False, change: Change | None = None,
                             stored_bytes: int = 0) -> dict | None:
        update: dict = {"$set": dict(fields)} if fields else {}
        if count_retry:
            update["$inc"] = {"retryCount": 1}
        current = {"_id": task_id, "status": "processing", "attempt": attempt}
        if not update:  # nothing to change: the attempt as it is, if it is still current
            return await self.tasks.find_one(current, HIDDEN)
        doc = await self._change(change, current, update)
        if doc is not None and stored_bytes:  # not in the change's write (quotas.py)
            await self.add_stored_bytes(doc["userId"], stored_bytes)
        return doc

    async def _change(self, change: Change | None, query: dict, update: dict, *,
                      sort: list | None = None, tries: int = TXN_TRIES) -> dict | None:
        """One atomic change of a task matching `query`, with the envelope of `change`."""
        if change is None:
            return await self.tasks.find_one_and_update(
                query, update, HIDDEN, sort=sort, return_document=ReturnDocument.AFTER)
        if self.transactions:
            async def body(session: Any) -> tuple[dict | None, dict | None]:
                doc = await self.tasks.find_one_and_update(
                    query, update, HIDDEN, sort=sort, return_document=ReturnDocument.AFTER,
                    session=session)
                if doc is None:
                    return None, None
                envelope = envelope_of(change.event, doc, change.at)
                await self._append_in(session, doc["userId"], change.event, envelope,
                                      change.at)
                return doc, envelope

            doc, change.envelope = await self._txn(body, tries)
            return doc
        for _ in range(3):
            entry = pending_entry(change)
            marked = {**update, "$set": {**update.get("$set", {}), "pending": entry,
                                         "pendingAt": change.at}}
            doc = await self.tasks.find_one_and_update(
                {**query, "pending": None}, marked, HIDDEN, sort=sort,
                return_document=ReturnDocument.AFTER)
            if doc is not None:
                change.envelope = await self._flush(doc["userId"], doc["_id"], entry["id"])
                return doc
            if sort is not None:
                return None  # a claim: a task whose envelope is pending waits for the sweep
            # The task's last envelope is not numbered yet: it cannot change before it is.
            blocked = await self.tasks.find_one({**query, "pending": {"$ne": None}},
                                                {"_id": True})
            if blocked is None:
                return None
            await self._settle(blocked["_id"])
        return None

    async def renew_lease(self, task_id: str, attempt: int, owner: str,
                          until: dt.datetime) -> bool:
        result = await self.tasks.update_one(
            {"_id": task_id, "status": "processing", "attempt": attempt, "leaseOwner": owner},
            {"$set": {"leaseExpiresAt": until}})
        return result.matched_count == 1

    async def expired_leases(self, now: dt.datetime, limit: int = 100) -> list[dict]:
        return await self.tasks.find(
            {"status": "processing", "leaseExpiresAt": {"$lt": now}}, HIDDEN).limit(
                limit).to_list(None)

    async def count_by_status(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        async for row in await self.tasks.aggregate(
                [{"$group": {"_id": "$status", "n": {"$sum": 1}}}]):
            if row["_id"] in counts:
                counts[row["_id"]] = int(row["n"])
        return counts

    async def count_due(self, now: dt.datetime) -> int:
        return await self.tasks.count_documents({"status": "pending", "runAfter": {"$lte": now}})

