"""The MongoDB side of API keys, webhook endpoints and their deliveries (MongoStore's mixin).

Without multi-document transactions: a user's limit of keys or endpoints is kept by a `slot`
(0 to limit - 1) unique per user, so that concurrent inserts past the limit fail on the index
instead of counting first; an endpoint's cursor moves with a compare-and-set after its
deliveries are inserted under deterministic ids, so a process that dies between the two leaves
deliveries that the next one inserts again as no-ops.
"""
from __future__ import annotations

import datetime as dt
from typing import Any

from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.errors import BulkWriteError, DuplicateKeyError

from ...errors import Conflict
from ..base import MAX_ATTEMPTS_KEPT
from .connection import MongoBase

_BATCH = 500


class HooksMixin(MongoBase):
    """API keys, webhook endpoints and deliveries on MongoDB."""

    async def expire(self, now: dt.datetime) -> None:
        await super().expire(now)
        await self.expire_webhooks(now)

    async def _create_indexes(self) -> None:
        await super()._create_indexes()
        db = self.db
        self.api_keys = db["api_keys"]
        self.webhooks = db["webhooks"]
        self.deliveries = db["deliveries"]
        await self.api_keys.create_index([("keyHash", ASCENDING)], unique=True, name="key_hash")
        await self.api_keys.create_index([("userId", ASCENDING), ("slot", ASCENDING)],
                                         unique=True, name="user_slot")
        await self.api_keys.create_index([("userId", ASCENDING), ("createdAt", ASCENDING)],
                                         name="owner_created")
        await self.webhooks.create_index([("userId", ASCENDING), ("slot", ASCENDING)],
                                         unique=True, name="user_slot")
        await self.webhooks.create_index([("userId", ASCENDING), ("createdAt", ASCENDING)],
                                         name="owner_created")
        await self.webhooks.create_index([("enabled", ASCENDING)], name="enabled")
        await self.deliveries.create_index(
            [("endpointId", ASCENDING), ("createdAt", DESCENDING), ("_id", DESCENDING)],
            name="endpoint_created")
        await self.deliveries.create_index(
            [("endpointId", ASCENDING), ("status", ASCENDING), ("createdAt", DESCENDING),
             ("_id", DESCENDING)], name="endpoint_status_created")
        await self.deliveries.create_index([("status", ASCENDING), ("nextAttemptAt", ASCENDING)],
                                           name="due")
        # Finished deliveries go with the events; pending ones have no finishedAt and stay.
        await self.deliveries.create_index([("finishedAt", ASCENDING)], name="retention",
                                           expireAfterSeconds=self.event_retention_s)

    async def _insert_limited(self, collection: Any, doc: dict, limit: int) -> None:
        for _ in range(limit + 3):
            taken = {d.get("slot") for d in await collection.find(
                {"userId": doc["userId"]}, {"slot": True}).to_list(None)}
            free = next((i for i in range(limit) if i not in taken), None)
            if free is None:
                break
            try:
                await collection.insert_one({**doc, "slot": free})
                return
            except DuplicateKeyError:
                continue  # a concurrent insert took the slot: look again
        raise Conflict(f"limit of {limit} reached")

    # API keys --------------------------------------------------------------------------------

    async def insert_api_key(self, doc: dict, limit: int) -> None:
        await self._insert_limited(self.api_keys, doc, limit)

    async def api_keys_of(self, user_id: str) -> list[dict]:
        return await self.api_keys.find({"userId": user_id}).sort(
            [("createdAt", ASCENDING), ("_id", ASCENDING)]).to_list(None)

    async def api_key_by_hash(self, key_hash: str) -> dict | None:
        return await self.api_keys.find_one({"keyHash": key_hash})

    async def delete_api_key(self, key_id: str, user_id: str) -> bool:
        result = await self.api_keys.delete_one({"_id": key_id, "userId": user_id})
        return result.deleted_count == 1

    async def touch_api_key(self, key_id: str, now: dt.datetime) -> None:
        await self.api_keys.update_one({"_id": key_id}, {"$set": {"lastUsedAt": now}})

    async def api_keys_existing(self, key_ids: list[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(key_ids), _BATCH):
            found.update(d["_id"] for d in await self.api_keys.find(
                {"_id": {"$in": key_ids[i:i + _BATCH]}}, {"_id": True}).to_list(None))
        return found

    # webhook endpoints -----------------------------------------------------------------------

    async def insert_webhook(self, doc: dict, limit: int) -> None:
        await self._insert_limited(self.webhooks, doc, limit)

    async def webhooks_of(self, user_id: str) -> list[dict]:
        return await self.webhooks.find({"userId": user_id}).sort(
            [("createdAt", ASCENDING), ("_id", ASCENDING)]).to_list(None)

    async def webhook_by_id(self, webhook_id: str, user_id: str | None = None) -> dict | None:
        query: dict = {"_id": webhook_id}
        if user_id is not None:
            query["userId"] = user_id
        return await self.webhooks.find_one(query)

    async def update_webhook(self, webhook_id: str, user_id: str | None, fields: dict, *,
                             if_enabled: bool = False) -> dict | None:
        query: dict = {"_id": webhook_id}
        if user_id is not None:
            query["userId"] = user_id
        if if_enabled:
            query["enabled"] = True
        if not fields:
            return await self.webhooks.find_one(query)
        return await self.webhooks.find_one_and_update(query, {"$set": dict(fields)},
                                                       return_document=ReturnDocument.AFTER)

    async def delete_webhook(self, webhook_id: str, user_id: str) -> bool:
        result = await self.webhooks.delete_one({"_id": webhook_id, "userId": user_id})
        if result.deleted_count != 1:
            return False
        await self.deliveries.delete_many({"endpointId": webhook_id})
        return True

    async def webhooks_behind(self, limit: int = 100) -> list[dict]:
        # Per enabled endpoint, two small fields; the owners' counters in batches.
        behind: list[dict] = []
        cursor = self.webhooks.find({"enabled": True}, {"userId": True, "cursor": True})
        batch: list[dict] = []

        async def check(batch: list[dict]) -> None:
            users = list({d["userId"] for d in batch})
            # The counter is the user's last seq numbered (droid/store/mongo/outbox.py and
            # connection.py number envelopes there); one not stored yet only makes the
            # dispatcher look again at the next sweep.
            last = {d["_id"][4:]: int(d["value"]) for d in await self.counters.find(
                {"_id": {"$in": [f"seq:{u}" for u in users]}}, {"value": True}).to_list(None)}
            behind.extend(d for d in batch if last.get(d["userId"], 0) > d["cursor"])

        async for doc in cursor:
            batch.append(doc)
            if len(batch) == _BATCH:
                await check(batch)
                batch = []
                if len(behind) >= limit:
                    break
        if batch and len(behind) < limit:
            await check(batch)
        ids = [d["_id"] for d in behind[:limit]]
        if not ids:
            return []
        return await self.webhooks.find({"_id": {"$in": ids}}).to_list(None)

    async def advance_webhook(self, webhook_id: str, cursor: int, new_cursor: int,
                              deliveries: list[dict]) -> bool:
        if deliveries:
            try:
                await self.deliveries.insert_many([dict(d) for d in deliveries], ordered=False)
            except BulkWriteError as exc:
                # Already stored by a process that died before moving the cursor, or by one
                # racing this one: the same ids, the same deliveries.
                if any(e.get("code") != 11000 for e in exc.details.get("writeErrors", ())):
                    raise
        result = await self.webhooks.update_one(
            {"_id": webhook_id, "cursor": cursor, "enabled": True},
            {"$set": {"cursor": new_cursor}})
        return result.modified_count == 1

    async def webhook_failing(self, webhook_id: str, now: dt.datetime) -> dt.datetime | None:
        await self.webhooks.update_one({"_id": webhook_id, "failingSince": None},
                                       {"$set": {"failingSince": now}})
        doc = await self.webhooks.find_one({"_id": webhook_id}, {"failingSince": True})
        return None if doc is None else doc.get("failingSince")

    # deliveries ------------------------------------------------------------------------------

    async def insert_delivery(self, doc: dict) -> None:
        await self.deliveries.insert_one(dict(doc))

    async def claim_delivery(self, claim: str, now: dt.datetime,
                             lease_until: dt.datetime) -> dict | None:
        return await self.deliveries.find_one_and_update(
            {"status": "pending", "nextAttemptAt": {"$lte": now}},
            {"$set": {"claim": claim, "nextAttemptAt": lease_until}},
            sort=[("nextAttemptAt", ASCENDING)], return_document=ReturnDocument.AFTER)

    async def finish_attempt(self, delivery_id: str, claim: str, attempt: dict,
                             fields: dict) -> dict | None:
        update: dict = {"$push": {"attempts": {"$each": [attempt], "$slice": -MAX_ATTEMPTS_KEPT}},
                        "$set": {**fields, "claim": None}}
        if fields.get("status", "pending") != "pending":
            update["$set"]["finishedAt"] = fields.get("updatedAt")
        return await self.deliveries.find_one_and_update(
            {"_id": delivery_id, "claim": claim}, update, return_document=ReturnDocument.AFTER)

    async def delivery_by_id(self, delivery_id: str, endpoint_id: str) -> dict | None:
        return await self.deliveries.find_one({"_id": delivery_id, "endpointId": endpoint_id})

    async def deliveries_page(self, endpoint_id: str, *, status: str | None, limit: int,
                              after: tuple[dt.datetime, str] | None) -> list[dict]:
        query: dict = {"endpointId": endpoint_id}
        if status:
            query["status"] = status
        if after:
            created, last_id = after
            query["$or"] = [{"createdAt": {"$lt": created}},
                            {"createdAt": created, "_id": {"$lt": last_id}}]
        return await self.deliveries.find(query).sort(
            [("createdAt", DESCENDING), ("_id", DESCENDING)]).limit(limit).to_list(None)

    async def retry_delivery(self, delivery_id: str, endpoint_id: str, now: dt.datetime,
                             attempts_left: int) -> dict | None:
        return await self.deliveries.find_one_and_update(
            {"_id": delivery_id, "endpointId": endpoint_id, "status": {"$ne": "pending"}},
            {"$set": {"status": "pending", "nextAttemptAt": now, "attemptsLeft": attempts_left,
                      "updatedAt": now, "claim": None},
             "$unset": {"finishedAt": ""}},
            return_document=ReturnDocument.AFTER)

    async def expire_webhooks(self, now: dt.datetime) -> None:
        await self.deliveries.delete_many(
            {"finishedAt": {"$lt": now - dt.timedelta(seconds=self.event_retention_s)}})
