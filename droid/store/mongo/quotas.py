"""MongoDB: per-user quotas (droid/quotas.py) and fair claims, a mixin of MongoStore; the same
rules as droid/store/sqlite/quotas.py, with single-document atomic updates.

A `usage` document per user holds the current minute's window, the stored bytes and the user's
last place in the fair queue; each check is a conditional `find_one_and_update` (counted only if
it passes), so concurrent processes never pass the per-minute or byte quota. The admission is the
step before the task's insert (droid/store/mongo/tasks.py), not part of its write: an insert that
fails after it leaves it counted. A claim looks at the heads of the fair queue, then claims a
head's user's most urgent due task with its envelope (tasks.py `_claim_one`: in a transaction, or
with the envelope pending in the task's document); the swap of their places is two more updates
(not atomic with the claim: a lost swap only reorders ties).
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable

from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

from ...quotas import Quota, too_many_bytes, too_many_pending, too_many_per_minute
from .connection import MongoBase

WINDOW_MS = 60_000
USER_ORDER = [("priorityRank", DESCENDING), ("createdAt", ASCENDING)]
HEADS = 8  # heads of the fair queue a claim looks at in one round
ROUNDS = 3  # rounds before a claim gives up until the next one (others took every head)


class QuotasMixin(MongoBase):
    async def _create_indexes(self) -> None:
        await super()._create_indexes()
        await self._quotas_indexes()

    async def _quotas_indexes(self) -> None:
        self.usage = self.db["usage"]
        await self.tasks.create_index([("status", ASCENDING), ("vkey", ASCENDING)],
                                      name="fair_queue")
        await self.tasks.create_index([("userId", ASCENDING), ("status", ASCENDING),
                                       ("priorityRank", DESCENDING), ("createdAt", ASCENDING)],
                                      name="user_claim_order")

    async def _window(self, user_id: str, now_ms: int, quota: Quota) -> None:
        """Count a task in the user's current minute, or raise."""
        limit = quota.tasks_per_minute or 2 ** 62
        while True:
            counted = await self.usage.find_one_and_update(
                {"_id": user_id, "windowStart": {"$gt": now_ms - WINDOW_MS},
                 "windowCount": {"$lt": limit}}, {"$inc": {"windowCount": 1}})
            if counted is not None:
                return
            restarted = await self.usage.find_one_and_update(
                {"_id": user_id, "windowStart": {"$lte": now_ms - WINDOW_MS}},
                {"$set": {"windowStart": now_ms, "windowCount": 1}})
            if restarted is not None:
                return
            doc = await self.usage.find_one({"_id": user_id})
            if doc is not None:
                if doc["windowCount"] < limit or doc["windowStart"] <= now_ms - WINDOW_MS:
                    continue  # created, or its window restarted, by another request meanwhile
                wait = doc["windowStart"] + WINDOW_MS - now_ms
                raise too_many_per_minute(quota, max(1, -(-wait // 1000)))
            try:
                await self.usage.insert_one({"_id": user_id, "windowStart": now_ms,
                                             "windowCount": 1, "storedBytes": 0, "lastVkey": 0})
                return
            except DuplicateKeyError:
                continue  # created meanwhile by another request: count there

    async def admit_task(self, user_id: str, now_ms: int, size: int, quota: Quota) -> int:
        if quota.pending_tasks:
            pending = await self.tasks.count_documents(
                {"userId": user_id, "status": "pending"}, limit=quota.pending_tasks)
            if pending >= quota.pending_tasks:
                raise too_many_pending(quota)
        await self._window(user_id, now_ms, quota)
        room = quota.stored_bytes - size if quota.stored_bytes else 2 ** 62
        usage = await self.usage.find_one_and_update(
            {"_id": user_id, "storedBytes": {"$lte": room}}, {"$inc": {"storedBytes": size}},
            return_document=ReturnDocument.AFTER)
        if usage is None:
            doc = await self.usage.find_one_and_update({"_id": user_id},
                                                       {"$inc": {"windowCount": -1}})
            raise too_many_bytes(quota, int((doc or {}).get("storedBytes", 0)), size)
        head = await self.tasks.find_one({"status": "pending", "vkey": {"$type": "number"}},
                                         {"vkey": True}, sort=[("vkey", ASCENDING)])
        if head is None:
            head = await self.counters.find_one({"_id": "fair-queue"}) or {}
            head = {"vkey": head.get("value", 0)}
        vkey = max(int(head["vkey"]), int(usage.get("lastVkey", 0))) + 1
        await self.usage.update_one({"_id": user_id}, {"$max": {"lastVkey": vkey}})
        await self.counters.update_one({"_id": "fair-queue"}, {"$max": {"value": vkey}},
                                       upsert=True)
        return vkey

    async def add_stored_bytes(self, user_id: str, size: int) -> None:
        await self.usage.update_one({"_id": user_id}, {"$inc": {"storedBytes": size}})

    async def stored_bytes(self, user_id: str) -> int:
        doc = await self.usage.find_one({"_id": user_id})
        return int(doc["storedBytes"]) if doc else 0

    async def _claim_fair(self, claim_one: Callable[[dict, list], Awaitable[dict | None]],
                          now: Any) -> dict | None:
        """Users take turns: the first head of the fair queue whose user has a task
        `claim_one(query, sort)` takes; None when none is due, or none could be taken now
        (claimed meanwhile, held by another transaction, its envelope not numbered yet): the
        next claim looks again."""
        due = {"status": "pending", "runAfter": {"$lte": now}}
        for _ in range(ROUNDS):
            heads = await self.tasks.find(due, {"userId": True, "vkey": True}).sort(
                [("vkey", ASCENDING)]).limit(HEADS).to_list(None)
            users: set = set()
            for head in heads:
                if head["userId"] in users:
                    continue
                users.add(head["userId"])
                doc = await claim_one({**due, "userId": head["userId"]}, USER_ORDER)
                if doc is None:
                    continue  # taken meanwhile, or not to be taken now: the next user
                if doc["_id"] != head["_id"] and doc.get("vkey") != head.get("vkey"):
                    await self.tasks.update_one({"_id": head["_id"], "status": "pending"},
                                                {"$set": {"vkey": doc.get("vkey")}})
                    await self.tasks.update_one({"_id": doc["_id"]},
                                                {"$set": {"vkey": head.get("vkey")}})
                    doc["vkey"] = head.get("vkey")
                return doc
            if len(heads) < HEADS:
                return None  # every due task was looked at
        return None
