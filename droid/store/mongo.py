"""The MongoDB store: PyMongo's AsyncMongoClient, what production uses (MONGODB_URI).

Every method is one or two commands on indexed fields; atomic changes are single
`find_one_and_update` calls whose filter holds the precondition (a claim takes only a pending,
due task; an attempt is changed only while it is the current one).
"""
from __future__ import annotations

import datetime as dt
import logging

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReturnDocument
from pymongo.errors import DuplicateKeyError, PyMongoError

from ..errors import Conflict
from ..util import dumps, loads
from .base import ACTIVE, STATUSES, Store, StoreUnavailable
from .mongo_accounts import MongoAccounts
from .mongo_hooks import MongoHooks
from .mongo_quotas import MongoQuotas
from .slim import Page, pack, row_size, task_of, text_size, unpack

log = logging.getLogger(__name__)



def _hosts(uri: str) -> str:
    """The host list of a MongoDB URI, without its credentials or options."""
    rest = uri.split("://", 1)[-1]
    return rest.split("/", 1)[0].split("?", 1)[0].rsplit("@", 1)[-1]


def _reason(exc: PyMongoError) -> str:
    """PyMongo's message without the topology description it appends on a timeout."""
    text = str(exc).split(", Timeout:", 1)[0].split(" (configured timeouts", 1)[0]
    return f"{text[:300]} ({type(exc).__name__})"

class MongoStore(MongoHooks, MongoAccounts, MongoQuotas, Store):
    kind = "mongodb"

    def __init__(self, uri: str, db_name: str, **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.uri = uri
        self.db_name = db_name
        self.client: AsyncMongoClient | None = None

    async def open(self) -> None:
        if self.client is not None:
            return
        # Created here, inside the event loop that uses it (the async client must not cross loops).
        self.client = AsyncMongoClient(self.uri, tz_aware=False, serverSelectionTimeoutMS=5000,
                                       appname="droid")
        try:
            await self._create_indexes()
        except BaseException as exc:
            # Not half open: a failed open leaves the store closed, and open() may be retried.
            client, self.client = self.client, None
            await client.close()
            if isinstance(exc, PyMongoError):
                raise StoreUnavailable(f"MongoDB at {_hosts(self.uri)} cannot be used: "
                                       f"{_reason(exc)}") from None
            raise

    async def _create_indexes(self) -> None:
        db = self.client[self.db_name]
        self.db = db
        self.users = db["users"]
        self.agents = db["agents"]
        self.tasks = db["tasks"]
        self.events = db["events"]
        self.counters = db["counters"]
        self.idempotency = db["idempotency"]
        await self.users.create_index([("email", ASCENDING)], unique=True, name="email_unique")
        await self._accounts_indexes()
        await self._quotas_indexes()
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
        # TTL indexes do the routine expiry; expire() does the same on demand.
        await self.events.create_index([("createdAt", ASCENDING)], name="retention",
                                       expireAfterSeconds=self.event_retention_s)
        await self.idempotency.create_index([("userId", ASCENDING), ("key", ASCENDING)],
                                            unique=True, name="user_key")
        await self.idempotency.create_index([("createdAt", ASCENDING)], name="expiry",
                                            expireAfterSeconds=self.idempotency_ttl_s)
        await self._create_hook_indexes()

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.close()

    async def ping(self) -> bool:
        try:
            await self.db.command("ping")
            return True
        except PyMongoError:
            return False

    async def drop(self) -> None:
        """Delete the whole database (tests)."""
        await self.client.drop_database(self.db_name)

    async def expire(self, now: dt.datetime) -> None:
        await self.events.delete_many(
            {"createdAt": {"$lt": now - dt.timedelta(seconds=self.event_retention_s)}})
        await self.idempotency.delete_many(
            {"createdAt": {"$lt": now - dt.timedelta(seconds=self.idempotency_ttl_s)}})
        await self.expire_webhooks(now)

    # users -----------------------------------------------------------------------------------

    async def user_by_email(self, email: str) -> dict | None:
        return await self.users.find_one({"email": email})

    async def user_by_id(self, user_id: str) -> dict | None:
        return await self.users.find_one({"_id": user_id})

    # agents ----------------------------------------------------------------------------------

    async def insert_agent(self, doc: dict) -> None:
        await self.agents.insert_one(dict(doc))

    async def agents_of(self, owner_id: str) -> list[dict]:
        return await self.agents.find({"ownerId": owner_id}).sort(
            [("createdAt", ASCENDING), ("_id", ASCENDING)]).to_list(None)

    async def agent_by_id(self, agent_id: str) -> dict | None:
        return await self.agents.find_one({"_id": agent_id})

    # tasks -----------------------------------------------------------------------------------

    async def insert_task(self, doc: dict) -> None:
        await self.tasks.insert_one(dict(doc))

    async def task_by_id(self, task_id: str, user_id: str | None = None) -> dict | None:
        query: dict = {"_id": task_id}
        if user_id is not None:
            query["userId"] = user_id
        return await self.tasks.find_one(query)

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
        cursor = self.tasks.find(query).sort(
            [("createdAt", DESCENDING), ("_id", DESCENDING)]).limit(limit)
        async for doc in cursor:
            out.append(doc)
            size += row_size(doc)
            if max_bytes and size >= max_bytes:
                out.truncated = len(out) < limit
                break
        await cursor.close()
        return out

    async def claim_task(self, owner: str, now: dt.datetime,
                         lease_until: dt.datetime) -> dict | None:
        # Users take turns, each user's most urgent first (mongo_quotas.py).
        return await self._claim_fair(
            {"$set": {"status": "processing", "startedAt": now, "updatedAt": now,
                      "leaseOwner": owner, "leaseExpiresAt": lease_until},
             "$inc": {"attempt": 1}}, now)

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

    # events ----------------------------------------------------------------------------------

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
        stored = {**doc, "envelope": dumps(pack(doc["envelope"])).decode()}
        try:
            await self.events.insert_one(stored)
        except DuplicateKeyError:
            raise Conflict(f"event {doc['seq']} of this user is already stored") from None

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

    # idempotency -----------------------------------------------------------------------------

    async def claim_key(self, user_id: str, key: str, task_id: str, now: dt.datetime,
                        since: dt.datetime) -> str:
        try:
            await self.idempotency.insert_one(
                {"userId": user_id, "key": key, "taskId": task_id, "createdAt": now})
            return task_id
        except DuplicateKeyError:
            pass
        # Used before the window: take it over, unless a concurrent request just did.
        taken = await self.idempotency.find_one_and_update(
            {"userId": user_id, "key": key, "createdAt": {"$lt": since}},
            {"$set": {"taskId": task_id, "createdAt": now}})
        if taken is not None:
            return task_id
        doc = await self.idempotency.find_one({"userId": user_id, "key": key})
        return doc["taskId"] if doc else task_id
