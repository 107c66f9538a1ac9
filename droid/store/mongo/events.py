"""Event envelopes in the MongoDB store: each user's numbered log."""
from __future__ import annotations

import datetime as dt

from pymongo import ASCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

from ...errors import Conflict
from ...util import loads
from ..slim import Page, task_of, text_size, unpack
from .connection import MongoBase, event_doc


class EventsMixin(MongoBase):
    async def next_seq(self, user_id: str) -> int:
        # No upsert: concurrent upserts of a new counter may each insert-then-retry (MongoDB
        # before 4.2 raises DuplicateKeyError; SecantusDB applies the $inc but returns no
        # document, losing the number). The counter is created once, then only ever $inc'd.
        key = f"seq:{user_id}"
        while True:
            doc = await self.counters.find_one_and_update(
                {"_id": key}, {"$inc": {"value": 1}}, return_document=ReturnDocument.AFTER)
            if doc is not None:
                return int(doc["value"])
            try:
                await self.counters.insert_one({"_id": key, "value": 0})
            except DuplicateKeyError:
                pass

    async def last_seq(self, user_id: str) -> int:
        doc = await self.counters.find_one({"_id": f"seq:{user_id}"})
        return int(doc["value"]) if doc else 0

    async def insert_event(self, doc: dict) -> None:
        stored = event_doc(doc["userId"], doc["seq"], doc["event"], doc["envelope"],
                           doc["createdAt"])
        try:
            await self.events.insert_one(stored)
        except DuplicateKeyError:
            raise Conflict(f"event {doc['seq']} of this user is already stored") from None

    async def append_event(self, user_id: str, event: str, envelope: dict,
                           created_at: dt.datetime) -> int:
        if not self.transactions:
            return await super().append_event(user_id, event, envelope, created_at)
        try:
            return await self._txn(lambda session: self._append_in(
                session, user_id, event, envelope, created_at))
        except DuplicateKeyError:
            raise Conflict("an event of this user with the next seq is already stored") from None

    async def events_after(self, user_id: str, after: int, limit: int,
                           max_bytes: int | None = None) -> list[dict]:
        out, size = Page(), 0
        cursor = self.events.find({"userId": user_id, "seq": {"$gt": after}},
                                  {"_id": False}).sort([("seq", ASCENDING)]).limit(limit)
        async for doc in cursor:
            text = doc["envelope"]
            stored = loads(text) if isinstance(text, str) else text
            task_id = task_of(stored)
            row = None
            if task_id is not None:  # put back what the task's row holds (slim.py)
                row = await self.tasks.find_one(
                    {"_id": task_id}, {"prompt": True, "metadataJson": True, "response": True})
                row = {k: v for k, v in (row or {}).items() if k != "_id"} or None
            doc["envelope"] = unpack(stored, row)
            out.append(doc)
            size += text_size(text if isinstance(text, str) else "", *(row or {}).values())
            if max_bytes and size >= max_bytes:
                out.truncated = True
                break
        await cursor.close()
        return out

    async def oldest_seq(self, user_id: str) -> int | None:
        doc = await self.events.find_one({"userId": user_id}, sort=[("seq", ASCENDING)])
        return int(doc["seq"]) if doc else None

    async def delete_events(self, user_id: str, up_to_seq: int | None = None) -> int:
        query: dict = {"userId": user_id}
        if up_to_seq is not None:
            query["seq"] = {"$lte": up_to_seq}
        return (await self.events.delete_many(query)).deleted_count
