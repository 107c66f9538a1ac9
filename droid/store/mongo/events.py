"""Event envelopes in the MongoDB store: each user's numbered log."""
from __future__ import annotations

import datetime as dt

from pymongo import ASCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

from ...errors import Conflict
from ...util import dumps, loads
from .connection import MongoBase


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
        # The envelope is stored as JSON text: it carries user metadata, whose keys may hold
        # what BSON field names cannot ('\0'), and it is only ever read back whole.
        stored = {**doc, "envelope": dumps(doc["envelope"]).decode()}
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

    async def events_after(self, user_id: str, after: int, limit: int) -> list[dict]:
        docs = await self.events.find({"userId": user_id, "seq": {"$gt": after}},
                                      {"_id": False}).sort([("seq", ASCENDING)]).limit(
                                          limit).to_list(None)
        for doc in docs:
            if isinstance(doc["envelope"], str):
                doc["envelope"] = loads(doc["envelope"])
        return docs

    async def oldest_seq(self, user_id: str) -> int | None:
        doc = await self.events.find_one({"userId": user_id}, sort=[("seq", ASCENDING)])
        return int(doc["seq"]) if doc else None

    async def delete_events(self, user_id: str, up_to_seq: int | None = None) -> int:
        query: dict = {"userId": user_id}
        if up_to_seq is not None:
            query["seq"] = {"$lte": up_to_seq}
        return (await self.events.delete_many(query)).deleted_count
