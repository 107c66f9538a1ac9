"""MongoDB persistence: collections, indexes, and the queries every layer above needs.

The same code runs on PyMongo's `AsyncMongoClient` (when MONGODB_URI is set) and on the embedded
mongomock engine (development and tests); it knows nothing of HTTP or Socket.IO.
"""
from __future__ import annotations

import datetime as dt
import inspect
import logging
from typing import Any

from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError, PyMongoError

from .errors import Conflict

log = logging.getLogger(__name__)

PRIORITY_RANK = {"low": 0, "normal": 1, "high": 2, "urgent": 3}
ACTIVE = ("pending", "processing")
FINAL = ("completed", "failed", "cancelled")


def open_client(uri: str | None) -> Any:
    """The database client: a real MongoDB for a URI, else the embedded in-memory engine.

    Must be called inside the event loop that will use it.
    """
    if uri:
        from pymongo import AsyncMongoClient

        return AsyncMongoClient(uri, tz_aware=False, serverSelectionTimeoutMS=5000,
                                appname="droid")
    from mongomock_motor import AsyncMongoMockClient

    return AsyncMongoMockClient()


class Store:
    """All reads and writes of Droid's documents."""

    def __init__(self, client: Any, db_name: str, *, event_retention_s: int = 48 * 3600,
                 owns_client: bool = True) -> None:
        self.client = client
        self.db = client[db_name]
        self.users = self.db["users"]
        self.agents = self.db["agents"]
        self.tasks = self.db["tasks"]
        self.events = self.db["events"]
        self.counters = self.db["counters"]
        self.idempotency = self.db["idempotency"]
        self.event_retention_s = event_retention_s
        self._owns_client = owns_client

    async def ensure_indexes(self) -> None:
        await self.users.create_index([("email", ASCENDING)], unique=True, name="email_unique")
        await self.agents.create_index([("ownerId", ASCENDING), ("createdAt", ASCENDING)],
                                       name="owner_created")
        await self.tasks.create_index([("userId", ASCENDING), ("createdAt", DESCENDING),
                                       ("_id", DESCENDING)], name="owner_created")
        await self.tasks.create_index([("status", ASCENDING), ("priorityRank", DESCENDING),
                                       ("createdAt", ASCENDING)], name="claim_order")
        await self.tasks.create_index([("status", ASCENDING), ("leaseExpiresAt", ASCENDING)],
                                      name="lease_expiry")
        await self.events.create_index([("userId", ASCENDING), ("seq", ASCENDING)],
                                       unique=True, name="user_seq")
        await self.events.create_index([("createdAt", ASCENDING)], name="retention",
                                       expireAfterSeconds=self.event_retention_s)
        await self.idempotency.create_index([("userId", ASCENDING), ("key", ASCENDING)],
                                            unique=True, name="user_key")
        await self.idempotency.create_index([("createdAt", ASCENDING)], name="expiry",
                                            expireAfterSeconds=24 * 3600)

    async def ping(self) -> bool:
        try:
            await self.db.command("ping")
            return True
        except PyMongoError:
            return False

    async def close(self) -> None:
        if self._owns_client:
            result = self.client.close()
            if inspect.isawaitable(result):
                await result

    # users -----------------------------------------------------------------------------------

    async def insert_user(self, doc: dict) -> None:
        """Raises Conflict when the e-mail is taken."""
        try:
            await self.users.insert_one(doc)
        except DuplicateKeyError:
            raise Conflict("Email is already registered") from None

    async def user_by_email(self, email: str) -> dict | None:
        return await self.users.find_one({"email": email})

    async def user_by_id(self, user_id: str) -> dict | None:
        return await self.users.find_one({"_id": user_id})

    # agents ----------------------------------------------------------------------------------

    async def insert_agent(self, doc: dict) -> None:
        await self.agents.insert_one(doc)

    async def agents_of(self, owner_id: str) -> list[dict]:
        return await self.agents.find({"ownerId": owner_id}).sort(
            [("createdAt", ASCENDING), ("_id", ASCENDING)]).to_list(None)

    async def agent_by_id(self, agent_id: str) -> dict | None:
        return await self.agents.find_one({"_id": agent_id})

    # tasks -----------------------------------------------------------------------------------

    async def insert_task(self, doc: dict) -> None:
        await self.tasks.insert_one(doc)

    async def task_by_id(self, task_id: str, user_id: str | None = None) -> dict | None:
        query: dict = {"_id": task_id}
        if user_id is not None:
            query["userId"] = user_id
        return await self.tasks.find_one(query)

    async def tasks_page(self, user_id: str, *, status: str | None, agent_id: str | None,
                         limit: int, after: tuple[dt.datetime, str] | None) -> list[dict]:
        """A user's tasks, newest first, strictly after the (createdAt, id) position."""
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

    async def update_task(self, query: dict, update: dict) -> dict | None:
        """Atomically apply `update` to the task matching `query`; the new document or None."""
        return await self.tasks.find_one_and_update(
            query, update, return_document=ReturnDocument.AFTER)

    async def claim_task(self, query: dict, update: dict) -> dict | None:
        """Atomically take the most urgent, oldest task matching `query`."""
        return await self.tasks.find_one_and_update(
            query, update, sort=[("priorityRank", DESCENDING), ("createdAt", ASCENDING)],
            return_document=ReturnDocument.AFTER)

    async def tasks_matching(self, query: dict, limit: int = 100) -> list[dict]:
        return await self.tasks.find(query).limit(limit).to_list(None)

    async def count_tasks(self, query: dict) -> int:
        return await self.tasks.count_documents(query)

    # events ----------------------------------------------------------------------------------

    async def next_seq(self, user_id: str) -> int:
        doc = await self.counters.find_one_and_update(
            {"_id": f"seq:{user_id}"}, {"$inc": {"value": 1}}, upsert=True,
            return_document=ReturnDocument.AFTER)
        return int(doc["value"])

    async def last_seq(self, user_id: str) -> int:
        doc = await self.counters.find_one({"_id": f"seq:{user_id}"})
        return int(doc["value"]) if doc else 0

    async def insert_event(self, doc: dict) -> None:
        await self.events.insert_one(doc)

    async def events_after(self, user_id: str, after: int, limit: int) -> list[dict]:
        return await self.events.find({"userId": user_id, "seq": {"$gt": after}}).sort(
            [("seq", ASCENDING)]).limit(limit).to_list(None)

    async def oldest_seq(self, user_id: str) -> int | None:
        docs = await self.events.find({"userId": user_id}).sort(
            [("seq", ASCENDING)]).limit(1).to_list(None)
        return int(docs[0]["seq"]) if docs else None

    # idempotency -----------------------------------------------------------------------------

    async def remember_key(self, user_id: str, key: str, task_id: str, now: dt.datetime) -> str:
        """Record key -> task; returns the task id already recorded when the key was used."""
        try:
            await self.idempotency.insert_one(
                {"userId": user_id, "key": key, "taskId": task_id, "createdAt": now})
            return task_id
        except DuplicateKeyError:
            doc = await self.idempotency.find_one({"userId": user_id, "key": key})
            return doc["taskId"] if doc else task_id

    async def key_task(self, user_id: str, key: str, since: dt.datetime) -> str | None:
        doc = await self.idempotency.find_one(
            {"userId": user_id, "key": key, "createdAt": {"$gte": since}})
        return doc["taskId"] if doc else None
