"""MongoBase: the MongoDB store's client, its collections and indexes, and the store's lifecycle
(open, close, expiry, ping); the mixins of each group of collections build on it."""
from __future__ import annotations

import datetime as dt
import logging

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient
from pymongo.errors import PyMongoError

from ..base import Store, StoreUnavailable

log = logging.getLogger(__name__)


def _hosts(uri: str) -> str:
    """The host list of a MongoDB URI, without its credentials or options."""
    rest = uri.split("://", 1)[-1]
    return rest.split("/", 1)[0].split("?", 1)[0].rsplit("@", 1)[-1]


def _reason(exc: PyMongoError) -> str:
    """PyMongo's message without the topology description it appends on a timeout."""
    text = str(exc).split(", Timeout:", 1)[0].split(" (configured timeouts", 1)[0]
    return f"{text[:300]} ({type(exc).__name__})"



class MongoBase(Store):
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

