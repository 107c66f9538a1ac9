"""MongoBase: the MongoDB store's client, its collections and indexes, and the store's lifecycle
(open, close, expiry, ping); how it writes a change with its envelope; and how it fails.

A change of a task and its envelope are one atomic write. Which kind is decided at open from
the server's `hello`:

- a replica set or a sharded cluster (`setName`, or `msg: isdbgrid`; Atlas is one): a
  multi-document transaction holds the change, the user's counter (`seq`) and the envelope
  (`_txn`, retried on transient errors such as write conflicts). A process killed in the middle
  of one leaves it open on the server, holding the documents it wrote, until the server aborts
  it (`transactionLifetimeLimitSeconds`, 60 s by default): meanwhile the changes of that user
  (whose counter it holds) answer 503, and claims pass over the task it held;
- a standalone server, which has no transactions: the change and its envelope, not numbered
  yet, are one update of the task's document, and a second step numbers the envelope into the
  log (droid/store/mongo/outbox.py), which start-up and a check every WATCH_EVERY_S complete
  after a crash. A task whose envelope is still pending cannot change again until it is
  numbered, so nothing is lost and nothing is numbered twice.

Any PyMongo error out of a store method is a StoreFailing (a 503), and the store is failing
until a write succeeds again (a probe write every WATCH_EVERY_S finds out without traffic).
"""
from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import random
from typing import Any, Awaitable, Callable, TypeVar

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient
from pymongo.errors import DuplicateKeyError, OperationFailure, PyMongoError

from ...util import dumps, utcnow
from ..base import Store, StoreUnavailable
from ..health import StoreFailing
from ..slim import pack

log = logging.getLogger(__name__)
T = TypeVar("T")

_WRITE_CONFLICT = 112
TXN_TRIES = 20  # a transaction that meets write conflicts (concurrent claims) is run again
# Fields of a task document that only the store reads: never returned with the task.
HIDDEN = {"idem": False, "idemAt": False, "pending": False, "pendingAt": False}
KEYS_EVERY_S = 60.0  # how often Idempotency-Keys past their TTL are dropped from their tasks


def event_doc(user_id: str, seq: int, event: str, envelope: dict, at: dt.datetime) -> dict:
    """An envelope as the event log stores it, whoever writes it: JSON text (it carries user
    metadata, whose keys may hold what BSON field names cannot, '\\0', and it is only read back
    whole), without what its task's document holds (droid/store/slim.py)."""
    return {"userId": user_id, "seq": seq, "event": event,
            "envelope": dumps(pack(envelope)).decode(), "createdAt": at}


def _hosts(uri: str) -> str:
    """The host list of a MongoDB URI, without its credentials or options."""
    rest = uri.split("://", 1)[-1]
    return rest.split("/", 1)[0].split("?", 1)[0].rsplit("@", 1)[-1]


def _reason(exc: PyMongoError) -> str:
    """PyMongo's message without the topology description it appends on a timeout."""
    text = str(exc).split(", Timeout:", 1)[0].split(" (configured timeouts", 1)[0]
    return f"{text[:300]} ({type(exc).__name__})"


class _NoCounter(Exception):
    """A user's first envelope: the counter is created outside the transaction, which then runs
    again (creating it inside would make concurrent first envelopes collide)."""

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id


class MongoBase(Store):
    kind = "mongodb"

    def __init__(self, uri: str, db_name: str, *, transactions: bool | None = None,
                 **kwargs: int) -> None:
        """`transactions`: None to decide from the server's `hello` (tests force one way)."""
        super().__init__(**kwargs)
        self.uri = uri
        self.db_name = db_name
        self.client: AsyncMongoClient | None = None
        self.transactions = False
        self._transactions = transactions
        self._watcher: asyncio.Task | None = None
        self._keys_expired_at = 0.0

    def describe(self) -> str:
        return f"MongoDB store {_hosts(self.uri)}/{self.db_name}"

    async def open(self) -> None:
        if self.client is not None:
            return
        # Created here, inside the event loop that uses it (the async client must not cross loops).
        self.client = AsyncMongoClient(self.uri, tz_aware=False, serverSelectionTimeoutMS=5000,
                                       appname="droid")
        self.writes  # created before anything may report a failure
        try:
            await self._create_indexes()
            hello = await self.client.admin.command("hello")
            detected = bool(hello.get("setName")) or hello.get("msg") == "isdbgrid"
            self.transactions = detected if self._transactions is None else self._transactions
            log.info("%s: %s", self.describe(),
                     "a task's change and its envelope in one transaction" if self.transactions
                     else "no transactions (a standalone server): a task's envelope is written "
                          "with its change in its document, then numbered into the log")
            from .repair import repair  # start-up repair, through this store's own writes

            await repair(self, utcnow())
        except BaseException as exc:
            # Not half open: a failed open leaves the store closed, and open() may be retried.
            client, self.client = self.client, None
            await client.close()
            if isinstance(exc, PyMongoError):
                raise StoreUnavailable(f"MongoDB at {_hosts(self.uri)} cannot be used: "
                                       f"{_reason(exc)}") from None
            raise
        self._watcher = asyncio.create_task(self._watch_forever(), name="droid-mongo-watch")

    async def _create_indexes(self) -> None:
        db = self.client[self.db_name]
        self.db = db
        self.users = db["users"]
        self.agents = db["agents"]
        self.tasks = db["tasks"]
        self.events = db["events"]
        self.counters = db["counters"]
        self.idempotency = db["idempotency"]  # an older version's keys (repaired at open)
        self.meta = db["meta"]
        await self.users.create_index([("email", ASCENDING)], unique=True, name="email_unique")
        await self.agents.create_index([("ownerId", ASCENDING), ("createdAt", ASCENDING)],
                                       name="owner_created")
        await self.tasks.create_index([("userId", ASCENDING), ("createdAt", DESCENDING),
                                       ("_id", DESCENDING)], name="owner_created")
        await self.tasks.create_index([("status", ASCENDING), ("priorityRank", DESCENDING),
                                       ("createdAt", ASCENDING)], name="claim_order")
        await self.tasks.create_index([("status", ASCENDING), ("leaseExpiresAt", ASCENDING)],
                                      name="lease_expiry")
        # An Idempotency-Key lives in the task it names ({u: userId, k: key}): claimed by the
        # insert of the task itself, on every deployment.
        await self.tasks.create_index([("idem", ASCENDING)], unique=True, sparse=True,
                                      name="idempotency_key")
        await self.tasks.create_index([("idemAt", ASCENDING)], sparse=True,
                                      name="idempotency_expiry")
        await self.tasks.create_index([("pendingAt", ASCENDING)], sparse=True,
                                      name="pending_envelope")
        await self.counters.create_index([("numbering.since", ASCENDING)], sparse=True,
                                         name="numbering")
        await self.events.create_index([("userId", ASCENDING), ("seq", ASCENDING)],
                                       unique=True, name="user_seq")
        # TTL indexes do the routine expiry; expire() does the same on demand.
        await self.events.create_index([("createdAt", ASCENDING)], name="retention",
                                       expireAfterSeconds=self.event_retention_s)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            try:
                await self._watcher
            except asyncio.CancelledError:
                pass
            self._watcher = None
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
        await self._expire_keys(now)

    async def _expire_keys(self, now: dt.datetime) -> None:
        # A TTL index deletes documents, not fields: an expired key is taken off its task.
        await self.tasks.update_many(
            {"idemAt": {"$lt": now - dt.timedelta(seconds=self.idempotency_ttl_s)}},
            {"$unset": {"idem": "", "idemAt": ""}})

    # health ----------------------------------------------------------------------------------

    async def probe(self) -> None:
        await self.meta.update_one({"_id": "probe"}, {"$set": {"at": utcnow()}}, upsert=True)

    async def watch(self) -> None:
        try:
            if not self.transactions:
                await self._sweep()
            loop = asyncio.get_running_loop()
            if loop.time() - self._keys_expired_at >= KEYS_EVERY_S:
                self._keys_expired_at = loop.time()
                await self._expire_keys(utcnow())
        except PyMongoError as exc:
            self.writes.failed(_reason(exc))
            return
        await super().watch()

    async def _sweep(self) -> None:
        """Number the envelopes left pending (droid/store/mongo/outbox.py)."""

    # the write path --------------------------------------------------------------------------

    async def _txn(self, body: Callable[[Any], Awaitable[T]], tries: int = TXN_TRIES) -> T:
        """`body(session)` in one multi-document transaction, run again on transient errors
        (write conflicts, a primary stepping down) up to `tries` times; a commit whose result is
        unknown is retried as such (commits are idempotent)."""
        async with self.client.start_session() as session:
            attempt = 0
            while True:
                await session.start_transaction()
                try:
                    result = await body(session)
                except BaseException as exc:
                    if session.in_transaction:
                        try:
                            await session.abort_transaction()
                        except PyMongoError:
                            pass
                    if isinstance(exc, _NoCounter):  # not a failed try: the counter is made
                        await self._create_counter(exc.user_id)
                        continue
                    attempt += 1
                    if _transient(exc) and attempt < tries:
                        # Jittered and growing, so that writers of one user's counter spread out.
                        await asyncio.sleep(random.uniform(0, min(0.2, 0.002 * 2 ** attempt)))
                        continue
                    raise
                for commit in range(3):
                    try:
                        await session.commit_transaction()
                        return result
                    except PyMongoError as exc:
                        if exc.has_error_label("UnknownTransactionCommitResult") and commit < 2:
                            continue
                        attempt += 1
                        if not _transient(exc) or attempt >= tries:
                            raise
                        break  # transient: run the whole transaction again

    async def _append_in(self, session: Any, user_id: str, event: str, envelope: dict,
                         at: dt.datetime) -> int:
        """Inside a transaction: number an envelope with the user's next seq and store it."""
        counter = await self.counters.find_one_and_update(
            {"_id": f"seq:{user_id}"}, {"$inc": {"value": 1}}, return_document=True,
            session=session)
        if counter is None:
            raise _NoCounter(user_id)
        envelope["seq"] = seq = int(counter["value"])
        await self.events.insert_one(event_doc(user_id, seq, event, envelope, at),
                                     session=session)
        return seq

    async def _create_counter(self, user_id: str) -> None:
        # Created once, then only ever $inc'd: concurrent upserts of a new counter may each
        # insert-then-retry (MongoDB before 4.2 raises DuplicateKeyError; SecantusDB applies
        # the $inc but returns no document, losing the number).
        try:
            await self.counters.insert_one({"_id": f"seq:{user_id}", "value": 0})
        except DuplicateKeyError:
            pass


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, PyMongoError) and exc.has_error_label("TransientTransactionError")


# Methods whose success proves that writes succeed again; those of _MAYBE only when they changed
# something (None or False: nothing matched, and nothing was written).
_WRITES = frozenset(("insert_user", "insert_agent", "insert_task", "claim_task", "cancel_task",
                     "admit_task", "add_stored_bytes",
                     "update_attempt", "renew_lease", "insert_event", "append_event",
                     "next_seq", "probe"))
_MAYBE = frozenset(("claim_task", "cancel_task", "update_attempt", "renew_lease"))
_UNGUARDED = frozenset(("open", "close", "ping", "drop", "health", "watch", "describe",
                        "on_recovered"))


def guarded(cls: type[MongoBase]) -> type[MongoBase]:
    """Wrap every method of the Store interface: a PyMongo error is a StoreFailing (a 503 in
    the error shape, never a bare 500), and marks the store failing until a write succeeds."""
    for name in dir(Store):
        if name.startswith("_") or name in _UNGUARDED:
            continue
        fn = getattr(cls, name)
        if asyncio.iscoroutinefunction(fn):
            setattr(cls, name, _guard(fn, name in _WRITES, name in _MAYBE))
    return cls


def _guard(fn: Callable[..., Awaitable[T]], writes: bool,
           maybe: bool) -> Callable[..., Awaitable[T]]:
    @functools.wraps(fn)
    async def method(self: MongoBase, *args: Any, **kwargs: Any) -> T:
        try:
            result = await fn(self, *args, **kwargs)
        except PyMongoError as exc:
            # Write conflicts that outlasted the retries are documents held (by a transaction
            # of a killed process, until the server aborts it), not a failing database.
            if not (isinstance(exc, OperationFailure) and exc.code == _WRITE_CONFLICT):
                self.writes.failed(_reason(exc))
            raise StoreFailing() from exc
        if writes and not (maybe and (result is None or result is False)):
            self.writes.recovered()
        return result

    return method
