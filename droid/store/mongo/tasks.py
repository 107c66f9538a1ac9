"""Tasks in the MongoDB store: creation, reads, claims and the moves of an attempt."""
from __future__ import annotations

import datetime as dt

from pymongo import ASCENDING, DESCENDING, ReturnDocument

from ..base import ACTIVE, STATUSES
from .connection import MongoBase


class TasksMixin(MongoBase):
    async def insert_task(self, doc: dict) -> None:
        await self.tasks.insert_one(dict(doc))

    async def task_by_id(self, task_id: str, user_id: str | None = None) -> dict | None:
        query: dict = {"_id": task_id}
        if user_id is not None:
            query["userId"] = user_id
        return await self.tasks.find_one(query)

    async def tasks_page(self, user_id: str, *, status: str | None, agent_id: str | None,
                         limit: int, after: tuple[dt.datetime, str] | None) -> list[dict]:
        query: dict = {"userId": user_id}
        if status:
            query["status"] = status
        if agent_id:
            query["agentId"] = agent_id
        if after:
            created, last_id = after
            query["$or"] = [{"createdAt": {"$lt": created}},
                            {"createdAt": created, "_id": {"$lt": last_id}}]
        return await self.tasks.find(query).sort(
            [("createdAt", DESCENDING), ("_id", DESCENDING)]).limit(limit).to_list(None)

    async def claim_task(self, owner: str, now: dt.datetime,
                         lease_until: dt.datetime) -> dict | None:
        return await self.tasks.find_one_and_update(
            {"status": "pending", "runAfter": {"$lte": now}},
            {"$set": {"status": "processing", "startedAt": now, "updatedAt": now,
                      "leaseOwner": owner, "leaseExpiresAt": lease_until},
             "$inc": {"attempt": 1}},
            sort=[("priorityRank", DESCENDING), ("createdAt", ASCENDING)],
            return_document=ReturnDocument.AFTER)

    async def cancel_task(self, task_id: str, user_id: str, now: dt.datetime) -> dict | None:
        return await self.tasks.find_one_and_update(
            {"_id": task_id, "userId": user_id, "status": {"$in": list(ACTIVE)}},
            {"$set": {"status": "cancelled", "updatedAt": now, "completedAt": now,
                      "leaseOwner": None, "leaseExpiresAt": None}},
            return_document=ReturnDocument.AFTER)

    async def update_attempt(self, task_id: str, attempt: int, fields: dict, *,
                             count_retry: bool = False) -> dict | None:
        update: dict = {"$set": dict(fields)} if fields else {}
        if count_retry:
            update["$inc"] = {"retryCount": 1}
        current = {"_id": task_id, "status": "processing", "attempt": attempt}
        if not update:  # nothing to change: the attempt as it is, if it is still current
            return await self.tasks.find_one(current)
        return await self.tasks.find_one_and_update(current, update,
                                                    return_document=ReturnDocument.AFTER)

    async def renew_lease(self, task_id: str, attempt: int, owner: str,
                          until: dt.datetime) -> bool:
        result = await self.tasks.update_one(
            {"_id": task_id, "status": "processing", "attempt": attempt, "leaseOwner": owner},
            {"$set": {"leaseExpiresAt": until}})
        return result.matched_count == 1

    async def expired_leases(self, now: dt.datetime, limit: int = 100) -> list[dict]:
        return await self.tasks.find(
            {"status": "processing", "leaseExpiresAt": {"$lt": now}}).limit(limit).to_list(None)

    async def count_by_status(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        async for row in await self.tasks.aggregate(
                [{"$group": {"_id": "$status", "n": {"$sum": 1}}}]):
            if row["_id"] in counts:
                counts[row["_id"]] = int(row["n"])
        return counts

    async def count_due(self, now: dt.datetime) -> int:
        return await self.tasks.count_documents({"status": "pending", "runAfter": {"$lte": now}})

