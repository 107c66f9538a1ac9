"""The store conformance suite: every method of droid.store.base.Store, on every backend.

Each test runs on an SQLite file, an in-memory SQLite database and MongoDB over the wire
(SecantusDB from tests/mongo_server.py, or DROID_TEST_MONGODB_URI; each test its own database,
dropped afterwards). Where a test needs several store objects on one database (several
connections, as several processes have), the in-memory backend, which is private to one store
object, gives the same store each time and the concurrency comes from coroutines alone.
The MongoDB share stays small, since SecantusDB scans and sorts in memory (tens of ms per claim);
the concurrency tests run ten times the counts on SQLite.

A change of a task and its envelope are one atomic write; on MongoDB that is a transaction on a
replica set (SecantusDB answers as one) and, on a standalone server, the envelope pending in the
task's document and numbered right after (droid/store/mongo/outbox.py). The tests of those
writes also run on "mongo-standalone": a SecantusDB started as a standalone server (with
DROID_TEST_MONGODB_URI, that server with its transactions turned off in the store).
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import pathlib
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from typing import AsyncIterator

import pytest
import pytest_asyncio
from pymongo import AsyncMongoClient

import mongo_server
from droid.emails import normalise, with_forms
from droid.errors import Conflict
from droid.quotas import Quota, QuotaExceeded
from droid.store import PRIORITY_RANK, STATUSES, Change, Store, StoreFailing
from droid.store.base import MAX_ATTEMPTS_KEPT
from droid.store.envelopes import envelope_of, event_data, state_of, task_json
from droid.store.mongo import MongoStore
from droid.store.sqlite import SqliteStore
from droid.util import dumps, to_ms, utcnow
from redis_server import die_with_parent

pytestmark = pytest.mark.asyncio

BACKENDS = ("sqlite-file", "sqlite-memory", "mongo")
# The tests of a task's changes with their envelopes: every way a store writes them.
WRITES = BACKENDS + ("mongo-standalone",)
# Backends whose database outlives a store object (repair at open).
REOPENED = ("sqlite-file", "mongo", "mongo-standalone")
ROOT = pathlib.Path(__file__).resolve().parent.parent
EPOCH_2000 = dt.datetime(2000, 1, 1)


class Backend:
    """Opens store objects on the one database of a test and removes it afterwards."""

    def __init__(self, name: str, tmp_path, mongo_uri: str | None) -> None:
        self.name = name
        # An in-memory SQLite database belongs to one store object: it cannot be shared.
        self.shared = name != "sqlite-memory"
        self.path = str(tmp_path / "droid.sqlite3")
        self.mongo_uri = mongo_uri
        self.db_name = f"droid_store_{uuid.uuid4().hex[:12]}"
        self.opened: list[Store] = []
        # SecantusDB scans and sorts in memory: the MongoDB share stays small.
        self.scale = 1 if self.mongo else 10

    @property
    def mongo(self) -> bool:
        return self.name.startswith("mongo")

    def new(self, **kwargs: int) -> Store:
        if self.name == "mongo":
            return MongoStore(self.mongo_uri, self.db_name, **kwargs)
        if self.name == "mongo-standalone":
            # SecantusDB --standalone: the store finds out itself; a server given by URI may
            # have transactions: turned off, so that the path without them is what runs.
            forced = False if os.environ.get(mongo_server.URI_ENV) else None
            return MongoStore(self.mongo_uri, self.db_name, transactions=forced, **kwargs)
        return SqliteStore(self.path if self.name == "sqlite-file" else ":memory:", **kwargs)

    async def fresh(self, **kwargs: int) -> Store:
        """A new, opened store object (for sqlite-memory: a new, empty database)."""
        store = self.new(**kwargs)
        await store.open()
        self.opened.append(store)
        return store

    async def open(self, **kwargs: int) -> Store:
        """A store object on the test's database: a new one for each call where the database
        can be shared, else always the first one."""
        if not self.shared and self.opened:
            return self.opened[0]
        return await self.fresh(**kwargs)

    async def peers(self, n: int) -> list[Store]:
        return [await self.open() for _ in range(n)]

    async def close(self) -> None:
        for store in reversed(self.opened):
            await store.close()
        if self.mongo:
            client: AsyncMongoClient = AsyncMongoClient(self.mongo_uri)
            try:
                await client.drop_database(self.db_name)
            finally:
                await client.close()


@pytest_asyncio.fixture(params=BACKENDS)
async def backend(request, tmp_path) -> AsyncIterator[Backend]:
    uri = {"mongo": "mongo_uri", "mongo-standalone": "mongo_standalone_uri"}.get(request.param)
    if uri is not None:
        uri = request.getfixturevalue(uri)
    made = Backend(request.param, tmp_path, uri)
    try:
        yield made
    finally:
        await made.close()


@pytest_asyncio.fixture
async def store(backend: Backend) -> Store:
    return await backend.open()


def new_id() -> str:
    return str(uuid.uuid4())


def user_doc(email: str | None = None, **over) -> dict:
    """A user as the store keeps one (with its normalised e-mail, droid/emails.py)."""
    return with_forms({
        "_id": new_id(), "email": email or f"u-{uuid.uuid4().hex[:8]}@example.com",
        "name": None, "passwordHash": "$argon2id$v=19$fake", "createdAt": utcnow(), **over})


def task_doc(user_id: str, *, created: dt.datetime | None = None, priority: str = "normal",
             status: str = "pending", agent_id: str = "agent-1", **over) -> dict:
    """A task document shaped as droid.tasks creates it."""
    created = created or utcnow()
    return {"_id": new_id(), "userId": user_id, "agentId": agent_id, "status": status,
            "priority": priority, "priorityRank": PRIORITY_RANK[priority], "prompt": "Say hi",
            "response": None, "error": None, "tokensUsed": None, "executionTimeMs": None,
            "retryCount": 0, "metadataJson": None, "createdAt": created, "updatedAt": created,
            "startedAt": None, "completedAt": None, "runAfter": created, "attempt": 0,
            "leaseOwner": None, "leaseExpiresAt": None, "vkey": None, **over}


def event_doc(user_id: str, seq: int, created: dt.datetime | None = None) -> dict:
    created = created or utcnow()
    # Not task.created or task.completed: those are stored without what their task's row holds
    # (droid/store/slim.py), and this one has no task.
    envelope = {"event": "task.failed", "seq": seq, "timestamp": "2026-01-01T00:00:00.000Z",
                "data": {"taskId": f"t{seq}", "text": "ünïcødé ✓", "n": [1, 2.5, None, True],
                         "nested": {"empty": {}, "none": None},
                         # User metadata: keys a BSON field name cannot be, stored all the same.
                         "metadata": {"a.b": 1, "$set": {"x": 2}, "nul\x00key": "v", "": 0}}}
    return {"userId": user_id, "seq": seq, "event": "task.failed", "envelope": envelope,
            "createdAt": created}


def event_fields(doc: dict) -> dict:
    return {k: doc[k] for k in ("userId", "seq", "event", "envelope", "createdAt")}


def secs(n: float) -> dt.timedelta:
    return dt.timedelta(seconds=n)


# lifecycle ---------------------------------------------------------------------------------


async def test_open_and_close_are_idempotent_and_open_keeps_data(backend: Backend) -> None:
    store = await backend.open()
    assert await store.ping() is True
    user = user_doc()
    await store.insert_user(user)
    await store.open()
    assert await store.ping() is True
    assert await store.user_by_id(user["_id"]) == user
    await store.close()
    await store.close()


async def test_a_mongo_store_that_cannot_open_is_left_closed() -> None:
    """Run in a process of its own: PyMongo's async monitor leaves the socket of a refused
    connect unclosed when the client is closed mid-attempt, and its ResourceWarning would fail
    whichever test of this process collected it."""
    script = textwrap.dedent("""
        import asyncio
        from droid.store import StoreUnavailable
        from droid.store.mongo import MongoStore

        async def main():
            # Nothing listens on port 9 of 127.0.0.1: server selection gives up after 5 s.
            store = MongoStore("mongodb://127.0.0.1:9/", "droid_none")
            try:
                await store.open()
            except StoreUnavailable as exc:
                assert "MongoDB at 127.0.0.1:9 cannot be used" in str(exc), exc
            else:
                raise AssertionError("open() succeeded")
            assert store.client is None, "half open: a client left behind"
            await store.close()
            print("closed")

        asyncio.run(main())
    """)
    result = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", script], cwd=ROOT,
                                     capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "closed", result.stderr


async def test_a_new_store_object_sees_the_data_except_in_memory(backend: Backend) -> None:
    first = await backend.fresh()
    user = user_doc()
    await first.insert_user(user)
    task = task_doc(user["_id"])
    await first.insert_task(task)
    await first.close()
    second = await backend.fresh()
    if backend.name == "sqlite-memory":  # DROID_DATA_DIR=:memory: is a throwaway database
        assert await second.user_by_id(user["_id"]) is None
    else:
        assert await second.user_by_id(user["_id"]) == user
        assert await second.task_by_id(task["_id"]) == task


# users -------------------------------------------------------------------------------------


async def test_user_round_trip_by_email_and_by_id(store: Store) -> None:
    user = user_doc(name="Ada")
    await store.insert_user(user)
    assert await store.user_by_email(user["email"]) == user
    got = await store.user_by_id(user["_id"])
    assert got == user
    assert got["createdAt"].tzinfo is None
    assert await store.user_by_email("nobody@example.com") is None
    assert await store.user_by_id(new_id()) is None


async def test_duplicate_email_is_a_conflict_and_keeps_the_first_user(store: Store) -> None:
    first = user_doc("same@example.com")
    await store.insert_user(first)
    second = user_doc("same@example.com")
    with pytest.raises(Conflict):
        await store.insert_user(second)
    assert await store.user_by_email("same@example.com") == first
    assert await store.user_by_id(second["_id"]) is None


async def test_users_by_their_normalised_email_and_look_alikes_refused(store: Store) -> None:
    user = user_doc("Ada@Example.com".lower())
    await store.insert_user(user)
    assert await store.user_by_email_key(normalise("ADA@example.com").key) == user
    assert await store.user_by_email_key("nobody@example.com") is None
    for email, message in (("\uff41da@example.com", "Email is already registered"),
                           ("\u0430da@example.com",
                            "Email looks like an address that is already registered")):
        with pytest.raises(Conflict) as refused:
            await store.insert_user(user_doc(email))
        assert refused.value.message == message
    # A user given without its forms gets them (so two such users never collide on a null).
    bare = {"_id": new_id(), "email": "bare@example.com", "name": None, "passwordHash": "x",
            "createdAt": utcnow()}
    other = {**bare, "_id": new_id(), "email": "other@example.com"}
    await store.insert_user(bare)
    await store.insert_user(other)
    assert (await store.user_by_email_key("other@example.com"))["_id"] == other["_id"]


# agents ------------------------------------------------------------------------------------


async def test_agents_of_a_user_oldest_first(store: Store) -> None:
    now = utcnow()
    owner, other = new_id(), new_id()
    docs = [{"_id": new_id(), "name": f"a{i}", "model": None, "systemPrompt": "Be brief",
             "description": None, "ownerId": owner, "createdAt": now - secs(10 - i)}
            for i in range(3)]
    for doc in (docs[2], docs[0], docs[1]):
        await store.insert_agent(doc)
    await store.insert_agent({**docs[0], "_id": new_id(), "ownerId": other})
    assert await store.agents_of(owner) == docs
    assert await store.agents_of(new_id()) == []
    assert await store.agent_by_id(docs[1]["_id"]) == docs[1]
    assert await store.agent_by_id(new_id()) is None


# tasks: reads ------------------------------------------------------------------------------


async def test_task_round_trip_and_owner_check(store: Store) -> None:
    user, other = new_id(), new_id()
    task = task_doc(user, metadataJson='{"k":"v"}', prompt="Ünïcødé ✓ " + "x" * 5000)
    await store.insert_task(task)
    got = await store.task_by_id(task["_id"])
    assert got == task
    assert all(got[k].tzinfo is None for k in ("createdAt", "updatedAt", "runAfter"))
    assert await store.task_by_id(task["_id"], user) == task
    assert await store.task_by_id(task["_id"], other) is None
    assert await store.task_by_id(new_id()) is None
    assert await store.task_by_id(new_id(), user) is None


async def test_tasks_page_newest_first_with_a_cursor_across_ties(store: Store) -> None:
    user, other = new_id(), new_id()
    base = utcnow() - secs(60)
    docs = []
    # Three tasks share one createdAt: the cursor must order and split them by _id.
    for i, offset in enumerate([0, 1, 1, 1, 2, 3, 3]):
        doc = task_doc(user, created=base + secs(offset))
        doc["_id"] = f"task-{(i * 5) % 7:02d}-{uuid.uuid4().hex[:6]}"
        docs.append(doc)
    for doc in reversed(docs):
        await store.insert_task(doc)
    await store.insert_task(task_doc(other, created=base + secs(5)))
    expected = sorted(docs, key=lambda d: (d["createdAt"], d["_id"]), reverse=True)

    for limit in (1, 2, 3):
        seen: list[dict] = []
        after = None
        for _ in range(len(docs) + 1):  # bounded: a cursor that repeats itself must not hang
            page = await store.tasks_page(user, status=None, agent_id=None, limit=limit,
                                          after=after)
            assert len(page) <= limit
            if not page:
                break
            seen += page
            after = (page[-1]["createdAt"], page[-1]["_id"])
        assert [d["_id"] for d in seen] == [d["_id"] for d in expected]
    whole = await store.tasks_page(user, status=None, agent_id=None, limit=100, after=None)
    assert whole == expected


async def test_tasks_page_filters_by_status_and_agent(store: Store) -> None:
    user = new_id()
    base = utcnow() - secs(60)
    docs = [task_doc(user, created=base + secs(i), status=status, agent_id=agent)
            for i, (status, agent) in enumerate([("pending", "a1"), ("completed", "a1"),
                                                 ("completed", "a2"), ("failed", "a2"),
                                                 ("completed", "a1")])]
    for doc in docs:
        await store.insert_task(doc)

    async def ids(status: str | None, agent_id: str | None) -> list[str]:
        page = await store.tasks_page(user, status=status, agent_id=agent_id, limit=10,
                                      after=None)
        return [d["_id"] for d in page]

    assert await ids("completed", None) == [docs[4]["_id"], docs[2]["_id"], docs[1]["_id"]]
    assert await ids(None, "a2") == [docs[3]["_id"], docs[2]["_id"]]
    assert await ids("completed", "a1") == [docs[4]["_id"], docs[1]["_id"]]
    assert await ids("cancelled", None) == []
    after = (docs[4]["createdAt"], docs[4]["_id"])
    page = await store.tasks_page(user, status="completed", agent_id=None, limit=1, after=after)
    assert [d["_id"] for d in page] == [docs[2]["_id"]]


# tasks: claims -----------------------------------------------------------------------------


async def test_claim_takes_most_urgent_then_oldest_due_task(store: Store) -> None:
    user = new_id()
    now = utcnow()
    t = [now - secs(100 - i) for i in range(10)]
    due = {
        "urgent-new": task_doc(user, created=t[5], priority="urgent"),
        "high-old": task_doc(user, created=t[1], priority="high"),
        "high-new": task_doc(user, created=t[3], priority="high"),
        "normal-due-now": task_doc(user, created=t[0], runAfter=now),
        "low-oldest": task_doc(user, created=t[0] - secs(50), priority="low"),
    }
    not_due = [
        task_doc(user, created=t[0], priority="urgent", runAfter=now + secs(1)),
        task_doc(user, created=t[0], priority="urgent", status="completed"),
        task_doc(user, created=t[0], priority="urgent", status="cancelled"),
        task_doc(user, created=t[0], priority="urgent", status="processing", attempt=1),
    ]
    for doc in [*not_due, *due.values()]:
        await store.insert_task(doc)

    lease_until = now + secs(30)
    claimed = []
    while (doc := await store.claim_task("worker-1", now, lease_until)) is not None:
        claimed.append(doc)
    order = ["urgent-new", "high-old", "high-new", "normal-due-now", "low-oldest"]
    assert [d["_id"] for d in claimed] == [due[name]["_id"] for name in order]
    first = due["urgent-new"]
    assert claimed[0] == {**first, "status": "processing", "startedAt": now, "updatedAt": now,
                          "leaseOwner": "worker-1", "leaseExpiresAt": lease_until, "attempt": 1}
    assert await store.task_by_id(first["_id"]) == claimed[0]
    for doc in not_due:
        assert await store.task_by_id(doc["_id"]) == doc
    # The future task becomes due once its time has come.
    later = await store.claim_task("worker-1", now + secs(1), lease_until)
    assert later is not None and later["_id"] == not_due[0]["_id"]


async def test_claim_on_an_empty_store_is_none(store: Store) -> None:
    now = utcnow()
    assert await store.claim_task("w", now, now + secs(30)) is None


async def test_concurrent_claims_never_hand_out_one_attempt_twice(backend: Backend) -> None:
    stores = await backend.peers(3)
    user = new_id()
    base = utcnow() - secs(60)
    n = 30 * backend.scale
    docs = [task_doc(user, created=base + dt.timedelta(milliseconds=i),
                     priority=("low", "normal", "high")[i % 3]) for i in range(n)]
    for doc in docs:
        await stores[0].insert_task(doc)
    now = utcnow()
    claims: list[tuple[str, int, str]] = []

    async def claimer(store: Store, name: str) -> None:
        while (doc := await store.claim_task(name, now, now + secs(30))) is not None:
            assert doc["leaseOwner"] == name
            claims.append((doc["_id"], doc["attempt"], name))

    await asyncio.gather(*(claimer(store, f"s{i}-c{j}")
                           for i, store in enumerate(stores) for j in range(10)))
    assert sorted(c[0] for c in claims) == sorted(d["_id"] for d in docs)
    assert {c[1] for c in claims} == {1}
    for task_id, _, name in claims:
        stored = await stores[1].task_by_id(task_id)
        assert (stored["status"], stored["attempt"], stored["leaseOwner"]) == \
            ("processing", 1, name)
    assert (await stores[2].count_by_status())["processing"] == n


async def claim_and_count(store: Store, name: str, claimers: int, seqs: int,
                          user: str) -> dict:
    """One process's share of a race: `claimers` coroutines claim until nothing is due while
    `seqs` next_seq calls for `user` run alongside."""
    claims: list[list] = []

    async def claimer(j: int) -> None:
        while True:
            now = utcnow()
            doc = await store.claim_task(f"{name}-{j}", now, now + secs(30))
            if doc is None:
                return
            claims.append([doc["_id"], doc["attempt"], doc["leaseOwner"]])

    results = await asyncio.gather(*(claimer(j) for j in range(claimers)),
                                   *(store.next_seq(user) for _ in range(seqs)))
    return {"claims": claims, "seqs": results[claimers:]}


async def child_main(kind: str, where: str, db_name: str, name: str, claimers: int, seqs: int,
                     user: str) -> None:
    """A process of the cross-process race: open, say ready, wait for the start line on stdin,
    race, print what it got as JSON."""
    store = MongoStore(where, db_name) if kind == "mongo" else SqliteStore(where)
    await store.open()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    got = await claim_and_count(store, name, claimers, seqs, user)
    await store.close()
    print(json.dumps(got), flush=True)


async def test_claims_and_seq_across_processes(backend: Backend) -> None:
    """Three processes on one database (SQLite file or MongoDB) race for the same tasks and the
    same user's seq. The in-memory database cannot be shared: there, three coroutine groups on
    the one store."""
    store = await backend.open()
    user = new_id()
    base = utcnow() - secs(60)
    n = 30 * backend.scale
    docs = [task_doc(new_id(), created=base + dt.timedelta(milliseconds=i),
                     priority=("normal", "urgent")[i % 2]) for i in range(n)]
    for doc in docs:
        await store.insert_task(doc)
    seqs = 20 * backend.scale
    names = ["p0", "p1", "p2"]
    if not backend.shared:
        shares = await asyncio.gather(*(claim_and_count(store, name, 10, seqs, user)
                                        for name in names))
    else:
        where = backend.mongo_uri if backend.name == "mongo" else backend.path
        code = ("import asyncio, sys; sys.path[:0] = ['tests', '.']; import test_store; "
                "asyncio.run(test_store.child_main(*sys.argv[1:5], *map(int, sys.argv[5:7]), "
                "sys.argv[7]))")
        procs = [await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, backend.name, where, backend.db_name, name, "10",
            str(seqs), user, cwd=str(ROOT), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, preexec_fn=die_with_parent()) for name in names]
        try:
            for proc in procs:
                line = await asyncio.wait_for(proc.stdout.readline(), 60)
                assert line == b"ready\n", line
            for proc in procs:  # all three start at once
                proc.stdin.write(b"go\n")
                await proc.stdin.drain()
            outs = [await asyncio.wait_for(proc.communicate(), 120) for proc in procs]
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        assert [proc.returncode for proc in procs] == [0, 0, 0]
        shares = [json.loads(out) for out, _ in outs]

    claims = [c for share in shares for c in share["claims"]]
    assert sorted(c[0] for c in claims) == sorted(d["_id"] for d in docs)
    assert {c[1] for c in claims} == {1}
    for task_id, _, owner in claims:
        assert (await store.task_by_id(task_id))["leaseOwner"] == owner
    assert sorted(s for share in shares for s in share["seqs"]) == list(range(1, 3 * seqs + 1))
    assert await store.last_seq(user) == 3 * seqs


# tasks: attempts ---------------------------------------------------------------------------


async def test_update_attempt_sets_fields_and_counts_a_retry(store: Store) -> None:
    user = new_id()
    task = task_doc(user, created=utcnow() - secs(5))
    await store.insert_task(task)
    now = utcnow()
    claimed = await store.claim_task("w1", now, now + secs(30))
    retry_at = now + secs(2)
    back = await store.update_attempt(
        task["_id"], 1, {"status": "pending", "error": "boom", "updatedAt": now,
                         "runAfter": retry_at, "leaseOwner": None, "leaseExpiresAt": None,
                         "executionTimeMs": 12}, count_retry=True)
    assert back == {**claimed, "status": "pending", "error": "boom", "runAfter": retry_at,
                    "leaseOwner": None, "leaseExpiresAt": None, "executionTimeMs": 12,
                    "retryCount": 1}
    assert await store.task_by_id(task["_id"]) == back
    # Pending is not an attempt: nothing to update until it is claimed again.
    assert await store.update_attempt(task["_id"], 1, {"error": "late"}) is None
    assert await store.claim_task("w2", now, now + secs(30)) is None  # not due yet
    again = await store.claim_task("w2", retry_at, retry_at + secs(30))
    assert (again["attempt"], again["retryCount"], again["leaseOwner"]) == (2, 1, "w2")
    done = await store.update_attempt(
        task["_id"], 2, {"status": "completed", "response": "hi", "tokensUsed": 3, "error": None,
                         "completedAt": retry_at, "updatedAt": retry_at, "leaseOwner": None,
                         "leaseExpiresAt": None})
    assert done == {**again, "status": "completed", "response": "hi", "tokensUsed": 3,
                    "error": None, "completedAt": retry_at, "leaseOwner": None,
                    "leaseExpiresAt": None}
    # An end already recorded is final.
    assert await store.update_attempt(task["_id"], 2, {"status": "failed"}) is None
    assert await store.task_by_id(task["_id"]) == done


async def test_update_attempt_with_nothing_to_set_reads_the_current_attempt(store: Store) -> None:
    user = new_id()
    task = task_doc(user, created=utcnow() - secs(5))
    await store.insert_task(task)
    now = utcnow()
    claimed = await store.claim_task("w1", now, now + secs(30))
    assert await store.update_attempt(task["_id"], 1, {}) == claimed
    assert await store.update_attempt(task["_id"], 2, {}) is None  # not the current attempt
    assert await store.task_by_id(task["_id"]) == claimed


async def test_a_stale_attempt_cannot_overwrite_a_newer_one(backend: Backend) -> None:
    old_worker, new_worker = await backend.peers(2)
    task = task_doc(new_id(), created=utcnow() - secs(5))
    await old_worker.insert_task(task)
    now = utcnow()
    first = await old_worker.claim_task("old", now, now + secs(1))
    # The lease ran out; a reaper put the attempt back and another worker took the task.
    assert await new_worker.update_attempt(
        task["_id"], 1, {"status": "pending", "runAfter": now, "leaseOwner": None,
                         "leaseExpiresAt": None}, count_retry=True) is not None
    second = await new_worker.claim_task("new", now + secs(2), now + secs(30))
    assert (first["attempt"], second["attempt"]) == (1, 2)

    late = await old_worker.update_attempt(
        task["_id"], 1, {"status": "completed", "response": "stale", "leaseOwner": None})
    assert late is None
    assert await old_worker.renew_lease(task["_id"], 1, "old", now + secs(60)) is False
    assert await new_worker.task_by_id(task["_id"]) == second


async def test_concurrent_ends_of_one_attempt_record_exactly_one(backend: Backend) -> None:
    stores = await backend.peers(3)
    task = task_doc(new_id(), created=utcnow() - secs(5))
    await stores[0].insert_task(task)
    now = utcnow()
    await stores[0].claim_task("w", now, now + secs(30))

    results = await asyncio.gather(*(
        stores[i % 3].update_attempt(task["_id"], 1, {"status": "completed",
                                                      "response": f"answer {i}"})
        for i in range(12)))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert await stores[1].task_by_id(task["_id"]) == winners[0]


async def test_cancel_only_active_tasks_and_only_by_their_owner(store: Store) -> None:
    owner, other = new_id(), new_id()
    now = utcnow()
    pending = task_doc(owner, created=now - secs(5))
    done = task_doc(owner, created=now - secs(5), status="completed", completedAt=now)
    for doc in (pending, done):
        await store.insert_task(doc)

    assert await store.cancel_task(pending["_id"], other, now) is None
    assert await store.task_by_id(pending["_id"]) == pending
    cancelled = await store.cancel_task(pending["_id"], owner, now)
    assert cancelled == {**pending, "status": "cancelled", "completedAt": now, "updatedAt": now}
    assert await store.cancel_task(pending["_id"], owner, now + secs(1)) is None
    assert await store.task_by_id(pending["_id"]) == cancelled
    assert await store.cancel_task(done["_id"], owner, now) is None
    assert await store.task_by_id(done["_id"]) == done
    assert await store.cancel_task(new_id(), owner, now) is None


async def test_cancel_of_a_running_attempt_clears_its_lease_and_wins(store: Store) -> None:
    owner = new_id()
    task = task_doc(owner, created=utcnow() - secs(5))
    await store.insert_task(task)
    now = utcnow()
    claimed = await store.claim_task("w", now, now + secs(30))
    later = now + secs(1)
    cancelled = await store.cancel_task(task["_id"], owner, later)
    assert cancelled == {**claimed, "status": "cancelled", "completedAt": later,
                         "updatedAt": later, "leaseOwner": None, "leaseExpiresAt": None}
    assert await store.update_attempt(task["_id"], 1, {"status": "completed"}) is None
    assert await store.renew_lease(task["_id"], 1, "w", later + secs(30)) is False
    assert await store.task_by_id(task["_id"]) == cancelled


async def test_cancel_racing_the_end_of_an_attempt_one_wins(backend: Backend) -> None:
    user_side, worker_side = await backend.peers(2)
    owner = new_id()
    docs = [task_doc(owner, created=utcnow() - secs(5)) for _ in range(4)]
    for doc in docs:
        await user_side.insert_task(doc)
    now = utcnow()
    for _ in docs:
        await worker_side.claim_task("w", now, now + secs(30))
    for doc in docs:
        cancel, end = await asyncio.gather(
            user_side.cancel_task(doc["_id"], owner, now),
            worker_side.update_attempt(doc["_id"], 1, {"status": "completed",
                                                       "completedAt": now}))
        assert (cancel is None) != (end is None)
        winner = cancel or end
        assert await user_side.task_by_id(doc["_id"]) == winner


async def test_renew_lease_only_by_the_owner_of_the_current_attempt(store: Store) -> None:
    task = task_doc(new_id(), created=utcnow() - secs(5))
    await store.insert_task(task)
    now = utcnow()
    assert await store.renew_lease(task["_id"], 0, "w", now + secs(60)) is False  # pending
    claimed = await store.claim_task("w", now, now + secs(30))
    until = now + secs(60)
    assert await store.renew_lease(task["_id"], 1, "intruder", until) is False
    assert await store.renew_lease(task["_id"], 2, "w", until) is False
    assert await store.renew_lease(new_id(), 1, "w", until) is False
    assert await store.task_by_id(task["_id"]) == claimed
    assert await store.renew_lease(task["_id"], 1, "w", until) is True
    assert await store.task_by_id(task["_id"]) == {**claimed, "leaseExpiresAt": until}


async def test_expired_leases_are_the_processing_tasks_past_their_lease(store: Store) -> None:
    user = new_id()
    now = utcnow()
    expired = [task_doc(user, status="processing", attempt=1, leaseOwner="dead",
                        leaseExpiresAt=now - secs(i + 1)) for i in range(3)]
    alive = task_doc(user, status="processing", attempt=1, leaseOwner="alive",
                     leaseExpiresAt=now + secs(30))
    pending = task_doc(user, created=now - secs(100))
    finished = task_doc(user, status="completed", attempt=1, leaseExpiresAt=now - secs(60))
    for doc in (*expired, alive, pending, finished):
        await store.insert_task(doc)
    got = await store.expired_leases(now)
    assert sorted(d["_id"] for d in got) == sorted(d["_id"] for d in expired)
    assert {d["_id"]: d for d in got} == {d["_id"]: d for d in expired}
    limited = await store.expired_leases(now, limit=2)
    assert len(limited) == 2 and {d["_id"] for d in limited} <= {d["_id"] for d in expired}
    assert await store.expired_leases(now - secs(10)) == []


async def test_count_by_status_and_count_due(store: Store) -> None:
    now = utcnow()
    assert await store.count_by_status() == {status: 0 for status in STATUSES}
    assert await store.count_due(now) == 0
    user, other = new_id(), new_id()
    docs = [
        task_doc(user, runAfter=now - secs(5)),
        task_doc(other, runAfter=now - secs(1)),
        task_doc(user, runAfter=now),
        task_doc(user, runAfter=now + secs(5)),
        task_doc(user, status="processing", runAfter=now - secs(5)),
        task_doc(user, status="completed"),
        task_doc(other, status="completed"),
        task_doc(user, status="failed"),
    ]
    for doc in docs:
        await store.insert_task(doc)
    assert await store.count_by_status() == {"pending": 4, "processing": 1, "completed": 2,
                                             "failed": 1, "cancelled": 0}
    assert await store.count_due(now) == 3
    assert await store.count_due(now + secs(5)) == 4
    assert await store.count_due(now - secs(3)) == 1


# events ------------------------------------------------------------------------------------


async def test_next_seq_counts_per_user_from_one(store: Store) -> None:
    alice, bob = new_id(), new_id()
    assert await store.last_seq(alice) == 0
    assert [await store.next_seq(alice) for _ in range(3)] == [1, 2, 3]
    assert await store.next_seq(bob) == 1
    assert await store.last_seq(alice) == 3
    assert await store.last_seq(bob) == 1
    assert await store.last_seq(new_id()) == 0


async def test_next_seq_has_no_gap_or_repeat_under_concurrent_publishers(
        backend: Backend) -> None:
    stores = await backend.peers(3)
    alice, bob = new_id(), new_id()
    n = 80 * backend.scale  # three in four for alice, one in four for bob
    calls = [stores[i % 3].next_seq(alice if i % 4 else bob) for i in range(n)]
    results = await asyncio.gather(*calls)
    got_alice = sorted(r for i, r in enumerate(results) if i % 4)
    got_bob = sorted(r for i, r in enumerate(results) if not i % 4)
    assert got_alice == list(range(1, n * 3 // 4 + 1))
    assert got_bob == list(range(1, n // 4 + 1))
    assert [await s.last_seq(alice) for s in stores] == [n * 3 // 4] * 3
    assert await stores[0].last_seq(bob) == n // 4


async def test_events_after_ascending_with_limit(store: Store) -> None:
    alice, bob = new_id(), new_id()
    docs = [event_doc(alice, seq) for seq in range(1, 8)]
    for doc in (docs[3], docs[0], docs[6], docs[1], docs[5], docs[2], docs[4]):
        await store.insert_event(doc)
    await store.insert_event(event_doc(bob, 4))
    got = await store.events_after(alice, 0, 100)
    assert [event_fields(d) for d in got] == docs
    assert [d["seq"] for d in await store.events_after(alice, 2, 3)] == [3, 4, 5]
    assert [d["seq"] for d in await store.events_after(alice, 6, 3)] == [7]
    assert await store.events_after(alice, 7, 3) == []
    assert [d["seq"] for d in await store.events_after(bob, 0, 10)] == [4]
    assert await store.events_after(new_id(), 0, 10) == []


async def test_insert_event_keeps_user_and_seq_unique(store: Store) -> None:
    alice, bob = new_id(), new_id()
    first = event_doc(alice, 1)
    await store.insert_event(first)
    await store.insert_event(event_doc(bob, 1))
    duplicate = {**event_doc(alice, 1), "event": "task.failed"}
    with pytest.raises(Conflict):
        await store.insert_event(duplicate)
    assert [event_fields(d) for d in await store.events_after(alice, 0, 10)] == [first]


async def test_append_event_numbers_and_stores_in_one_call(store: Store) -> None:
    alice, bob = new_id(), new_id()
    assert await store.next_seq(alice) == 1  # append_event shares next_seq's counter
    stored = []
    for n in range(3):
        doc = event_doc(alice, 0)
        envelope = {**doc["envelope"], "seq": None}
        assert await store.append_event(alice, "task.failed", envelope, doc["createdAt"]) \
            == n + 2
        assert envelope["seq"] == n + 2
        stored.append({**doc, "seq": n + 2, "envelope": envelope})
    assert await store.append_event(bob, "task.failed", {"seq": None}, utcnow()) == 1
    assert await store.last_seq(alice) == 4
    assert await store.next_seq(alice) == 5
    assert [event_fields(d) for d in await store.events_after(alice, 0, 10)] == stored
    assert [(d["event"], d["envelope"]) for d in await store.events_after(bob, 0, 10)] == \
        [("task.failed", {"seq": 1})]


async def test_sqlite_append_event_numbers_nothing_it_does_not_store(tmp_path) -> None:
    """One transaction: an envelope that cannot be stored leaves its number unused (no seq
    numbered but never stored, which a resume would have to wait out as a gap)."""
    store = SqliteStore(str(tmp_path / "droid.sqlite3"))
    await store.open()
    try:
        alice = new_id()
        await store.insert_event(event_doc(alice, 1))  # seq 1 taken, the counter still at 0
        with pytest.raises(Conflict):
            await store.append_event(alice, "task.created", {"seq": None}, utcnow())
        assert await store.last_seq(alice) == 0
        assert await store.append_event(new_id(), "task.created", {"seq": None}, utcnow()) == 1
    finally:
        await store.close()


async def test_append_event_has_no_gap_or_repeat_under_concurrent_publishers(
        backend: Backend) -> None:
    stores = await backend.peers(3)
    alice = new_id()
    n = 60 * backend.scale
    envelopes = [{"event": "task.created", "data": {"i": i}, "seq": None} for i in range(n)]
    seqs = await asyncio.gather(*(stores[i % 3].append_event(alice, "task.created", env,
                                                             utcnow())
                                  for i, env in enumerate(envelopes)))
    assert sorted(seqs) == list(range(1, n + 1))
    assert [env["seq"] for env in envelopes] == list(seqs)
    got = await stores[1].events_after(alice, 0, n + 1)
    assert [d["seq"] for d in got] == list(range(1, n + 1))
    assert all(d["envelope"] == envelopes[d["envelope"]["data"]["i"]] for d in got)


async def test_oldest_seq_and_delete_events(store: Store) -> None:
    alice, bob = new_id(), new_id()
    assert await store.oldest_seq(alice) is None
    for seq in range(3, 9):
        await store.insert_event(event_doc(alice, seq))
    for seq in range(1, 4):
        await store.insert_event(event_doc(bob, seq))
    assert await store.oldest_seq(alice) == 3
    assert await store.delete_events(alice, 5) == 3
    assert await store.oldest_seq(alice) == 6
    assert [d["seq"] for d in await store.events_after(alice, 0, 10)] == [6, 7, 8]
    assert await store.delete_events(alice, 5) == 0
    assert await store.delete_events(alice) == 3
    assert await store.oldest_seq(alice) is None
    assert await store.events_after(alice, 0, 10) == []
    assert await store.oldest_seq(bob) == 1
    assert await store.delete_events(new_id()) == 0


async def test_expire_removes_only_old_events_and_keys(backend: Backend) -> None:
    store = await backend.open(event_retention_s=3600, idempotency_ttl_s=7200)
    alice = new_id()
    now = utcnow()
    old_events = [event_doc(alice, 1, now - secs(3601)), event_doc(alice, 2, now - secs(3700))]
    kept_events = [event_doc(alice, 3, now - secs(3500)), event_doc(alice, 4, now)]
    for doc in (*old_events, *kept_events):
        await store.insert_event(doc)
    old = task_doc(alice, created=now - secs(7201))
    kept = task_doc(alice, created=now - secs(3601))
    assert await store.insert_task(old, key="old", key_since=EPOCH_2000) == old
    assert await store.insert_task(kept, key="kept", key_since=EPOCH_2000) == kept

    await store.expire(now)
    assert [event_fields(d) for d in await store.events_after(alice, 0, 10)] == kept_events
    assert await store.oldest_seq(alice) == 3
    assert await store.last_seq(alice) == 0  # expiry never touches the counter
    # With `key_since` far in the past a remembered key always wins: only a forgotten one is free.
    new, newer = task_doc(alice), task_doc(alice)
    assert await store.insert_task(new, key="old", key_since=EPOCH_2000) == new
    assert await store.insert_task(newer, key="kept", key_since=EPOCH_2000) == kept
    assert await store.task_by_id(old["_id"]) == old  # the task itself is kept


# idempotency -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", WRITES, indirect=True)
async def test_a_key_names_the_first_task_of_its_user_and_an_old_key_is_taken_over(
        backend: Backend) -> None:
    store = await backend.open()
    alice, bob = new_id(), new_id()
    now = utcnow()
    day_ago = now - secs(86400)
    first = task_doc(alice, created=now - secs(60))
    created = Change("task.created", now - secs(60))
    assert await store.insert_task(first, created, key="k", key_since=day_ago) == first
    assert created.envelope["seq"] == 1
    # The same key again: the first task, and nothing stored (no task, no envelope).
    again = Change("task.created", now)
    second = task_doc(alice, created=now)
    assert await store.insert_task(second, again, key="k", key_since=day_ago) == first
    assert again.envelope is None and await store.task_by_id(second["_id"]) is None
    assert await store.last_seq(alice) == 1
    other_key = task_doc(alice, created=now)
    assert await store.insert_task(other_key, key="other-key", key_since=day_ago) == other_key
    bobs = task_doc(bob, created=now)
    assert await store.insert_task(bobs, key="k", key_since=day_ago) == bobs
    # Claimed before `key_since`: the key is free again, and from then on names the new task.
    later = task_doc(alice, created=now + secs(10))
    assert await store.insert_task(later, key="k", key_since=now - secs(30)) == later
    assert await store.insert_task(task_doc(alice, created=now + secs(20)), key="k",
                                   key_since=now - secs(30)) == later
    assert await store.insert_task(task_doc(bob), key="k", key_since=day_ago) == bobs
    assert await store.task_by_id(first["_id"]) == first


@pytest.mark.parametrize("stale", [False, True], ids=["new-key", "stale-key"])
@pytest.mark.parametrize("backend", WRITES, indirect=True)
async def test_concurrent_inserts_with_one_key_store_one_task_and_one_envelope(
        backend: Backend, stale: bool) -> None:
    stores = await backend.peers(3)
    alice = new_id()
    now = utcnow()
    since = now - secs(3600)
    if stale:
        ancient = task_doc(alice, created=now - secs(7200))
        assert await stores[0].insert_task(ancient, key="k", key_since=EPOCH_2000) == ancient
    docs = [task_doc(alice, created=now) for _ in range(20)]
    changes = [Change("task.created", now) for _ in docs]
    results = await asyncio.gather(*(
        stores[i % 3].insert_task(doc, change, key="k", key_since=since)
        for i, (doc, change) in enumerate(zip(docs, changes))))
    winners = [doc for doc, got in zip(docs, results) if got == doc]
    assert len(winners) == 1, results
    assert results == [winners[0]] * 20
    assert [c.envelope is not None for c in changes].count(True) == 1
    assert [e["envelope"]["data"]["taskId"] for e in await stores[1].events_after(alice, 0, 50)] \
        == [winners[0]["_id"]]
    page = await stores[2].tasks_page(alice, status=None, agent_id=None, limit=50, after=None)
    assert len(page) == (2 if stale else 1)


async def test_sqlite_a_key_naming_no_task_is_released(tmp_path) -> None:
    """A key an older version claimed before it crashed, without its task: the request that
    brings it creates the task (never a 409 for a day)."""
    store = SqliteStore(str(tmp_path / "droid.sqlite3"))
    await store.open()
    try:
        alice = new_id()
        now = utcnow()
        await store._run(lambda: store._conn.execute(
            "INSERT INTO idempotency (userId, key, taskId, createdAt) VALUES (?, 'k', 'lost', ?)",
            (alice, int((now - EPOCH_2000).total_seconds() * 1000))))
        doc = task_doc(alice, created=now)
        change = Change("task.created", now)
        assert await store.insert_task(doc, change, key="k", key_since=now - secs(60)) == doc
        assert change.envelope["seq"] == 1
        assert await store.insert_task(task_doc(alice), key="k", key_since=now - secs(60)) == doc
    finally:
        await store.close()


# a task's changes with their envelopes ---------------------------------------------------------


def assert_envelope(change: Change, doc: dict, seq: int) -> None:
    """The envelope the store returned is the change's, built from the task as it now is."""
    assert change.envelope == {"event": change.event, "seq": seq,
                               "data": event_data(change.event, task_json(doc)),
                               "timestamp": change.at.isoformat(timespec="milliseconds") + "Z"}


@pytest.mark.parametrize("backend", WRITES, indirect=True)
async def test_each_change_of_a_task_stores_its_envelope_with_it(backend: Backend) -> None:
    store = await backend.open()
    alice = new_id()
    t0 = utcnow() - secs(10)
    doc = task_doc(alice, created=t0, metadataJson='{"k":[1,"é"]}')
    changes = []

    created = Change("task.created", t0)
    assert await store.insert_task(doc, created) == doc
    assert_envelope(created, doc, 1)
    assert created.envelope["data"]["metadata"] == {"k": [1, "é"]}
    changes.append(created)

    claimed = Change("task.processing", t0 + secs(1))
    running = await store.claim_task("w", claimed.at, claimed.at + secs(30), claimed)
    assert running["status"] == "processing" and running == await store.task_by_id(doc["_id"])
    assert_envelope(claimed, running, 2)
    changes.append(claimed)

    retry = Change("task.pending", t0 + secs(2))
    back = await store.update_attempt(doc["_id"], 1, {
        "status": "pending", "error": "boom", "updatedAt": retry.at, "runAfter": retry.at,
        "leaseOwner": None, "leaseExpiresAt": None}, count_retry=True, change=retry)
    assert back["retryCount"] == 1
    assert_envelope(retry, back, 3)
    assert retry.envelope["data"]["retryCount"] == 1
    changes.append(retry)

    again = Change("task.processing", t0 + secs(3))
    await store.claim_task("w", again.at, again.at + secs(30), again)
    done = Change("task.completed", t0 + secs(4))
    finished = await store.update_attempt(doc["_id"], 2, {
        "status": "completed", "response": "hi", "tokensUsed": 3, "completedAt": done.at,
        "updatedAt": done.at, "leaseOwner": None, "leaseExpiresAt": None}, change=done)
    assert_envelope(done, finished, 5)
    changes += [again, done]

    other = task_doc(alice, created=t0 + secs(5))
    await store.insert_task(other, Change("task.created", t0 + secs(5)))
    cancelled = Change("task.cancelled", t0 + secs(6))
    gone = await store.cancel_task(other["_id"], alice, cancelled.at, cancelled)
    assert_envelope(cancelled, gone, 7)
    changes.append(cancelled)

    stored = await store.events_after(alice, 0, 50)
    assert [d["seq"] for d in stored] == list(range(1, 8))
    mine = [d for d in stored if d["envelope"]["data"]["taskId"] == doc["_id"]]
    assert [d["envelope"] for d in mine] == [c.envelope for c in changes[:5]]
    assert [(d["event"], d["createdAt"]) for d in mine] == [(c.event, c.at) for c in changes[:5]]
    assert stored[-1]["envelope"] == cancelled.envelope
    assert state_of(mine[-1]["envelope"]) == (await store.task_by_id(doc["_id"]))["status"]
    assert await store.last_seq(alice) == 7


@pytest.mark.parametrize("backend", WRITES, indirect=True)
async def test_a_change_that_changes_nothing_stores_no_envelope(backend: Backend) -> None:
    store = await backend.open()
    alice = new_id()
    now = utcnow()
    nothing = Change("task.processing", now)
    assert await store.claim_task("w", now, now + secs(30), nothing) is None
    assert nothing.envelope is None
    done = task_doc(alice, status="completed", completedAt=now)
    await store.insert_task(done)
    refused = Change("task.cancelled", now)
    assert await store.cancel_task(done["_id"], alice, now, refused) is None
    assert await store.cancel_task(new_id(), alice, now, refused) is None
    stale = Change("task.completed", now)
    assert await store.update_attempt(done["_id"], 1, {"status": "completed"},
                                      change=stale) is None
    assert refused.envelope is None and stale.envelope is None
    assert await store.last_seq(alice) == 0 and await store.events_after(alice, 0, 10) == []
    assert await store.task_by_id(done["_id"]) == done


@pytest.mark.parametrize("backend", WRITES, indirect=True)
async def test_concurrent_changes_of_one_user_number_without_gap_or_repeat(
        backend: Backend) -> None:
    """Creates, claims and ends racing in three store objects: every change stored with its
    envelope, seqs 1..n once each, and every task's last envelope is its state."""
    stores = await backend.peers(3)
    alice = new_id()
    n = 6 * backend.scale
    base = utcnow() - secs(60)
    docs = [task_doc(alice, created=base + dt.timedelta(milliseconds=i)) for i in range(n)]
    changes: list[Change] = []

    async def create(i: int) -> None:
        change = Change("task.created", docs[i]["createdAt"])
        changes.append(change)
        await stores[i % 3].insert_task(docs[i], change)

    async def work(store: Store) -> None:
        while True:
            now = utcnow()
            claim = Change("task.processing", now)
            doc = await store.claim_task("w", now, now + secs(30), claim)
            if doc is None:
                if len(changes) >= n:  # every create has begun; nothing due now
                    return
                await asyncio.sleep(0.01)
                continue
            end = Change("task.completed", utcnow())
            changes.extend([claim, end])
            assert await store.update_attempt(doc["_id"], doc["attempt"], {
                "status": "completed", "completedAt": end.at, "updatedAt": end.at},
                change=end) is not None

    await asyncio.gather(*(create(i) for i in range(n)), *(work(s) for s in stores))
    for store in stores:  # a task created after a worker looked last
        await work(store)
    assert len(changes) == 3 * n and all(c.envelope is not None for c in changes)
    assert sorted(c.envelope["seq"] for c in changes) == list(range(1, 3 * n + 1))
    stored = await stores[1].events_after(alice, 0, 4 * n)
    assert [d["seq"] for d in stored] == list(range(1, 3 * n + 1))
    last = {d["envelope"]["data"]["taskId"]: state_of(d["envelope"]) for d in stored}
    for doc in docs:
        assert last[doc["_id"]] == (await stores[2].task_by_id(doc["_id"]))["status"] \
            == "completed"


@pytest.mark.parametrize("backend", ("sqlite-file", "sqlite-memory", "mongo"), indirect=True)
async def test_a_change_whose_envelope_cannot_be_stored_is_not_stored(backend: Backend) -> None:
    """One transaction: the envelope's seq is taken already (stored behind the counter's
    back), so its insert fails, and the change goes with it. (Without transactions the change
    is stored with its envelope pending first: see the tests of the outbox below.)"""
    store = await backend.open()
    alice = new_id()
    await store.insert_event(event_doc(alice, 1))  # seq 1 taken; the counter still at 0
    doc = task_doc(alice)
    change = Change("task.created", utcnow())
    with pytest.raises((sqlite3.IntegrityError, StoreFailing)):
        await store.insert_task(doc, change)
    assert change.envelope is None
    assert await store.task_by_id(doc["_id"]) is None
    assert await store.last_seq(alice) == 0


# without transactions: envelopes pending in the task's document (droid/store/mongo/outbox.py) --


def pending(event: str, at: dt.datetime, entry_id: str | None = None) -> dict:
    """What a change writes into a task's document before its envelope is numbered."""
    return {"pending": {"id": entry_id or new_id(), "event": event, "at": at}, "pendingAt": at}


@pytest.mark.parametrize("backend", ("mongo-standalone",), indirect=True)
async def test_without_transactions_what_a_crashed_writer_left_is_numbered(
        backend: Backend) -> None:
    """A writer that died after its change (the envelope pending in the task's document), and
    one that died holding the user's counter while numbering: the next store to open completes
    both, in order and with no hole, and the periodic check does the same while running."""
    store = await backend.open()
    assert store.transactions is False
    alice = new_id()
    old = utcnow() - secs(30)
    left = task_doc(alice, created=old)
    await store.tasks.insert_one({**left, **pending("task.created", old)})
    held = task_doc(alice, created=old - secs(1))
    entry = pending("task.created", old - secs(1))
    await store.tasks.insert_one({**held, **entry})
    envelope = {**envelope_of("task.created", held, old - secs(1)), "seq": 1}
    await store.counters.insert_one({"_id": f"seq:{alice}", "value": 1, "numbering": {
        "id": entry["pending"]["id"], "task": held["_id"], "user": alice, "seq": 1,
        "event": "task.created", "at": old - secs(1), "envelope": dumps(envelope).decode(),
        "since": old}})

    reopened = await backend.fresh()
    stored = await reopened.events_after(alice, 0, 10)
    assert [(d["seq"], d["envelope"]["data"]["taskId"]) for d in stored] == \
        [(1, held["_id"]), (2, left["_id"])]
    assert stored[0]["envelope"] == envelope
    assert await reopened.task_by_id(left["_id"]) == left  # nothing pending any more
    assert await reopened.tasks.count_documents({"pending": {"$exists": True}}) == 0
    assert (await reopened.counters.find_one({"_id": f"seq:{alice}"})) == \
        {"_id": f"seq:{alice}", "value": 2}

    # While running: the check every WATCH_EVERY_S numbers what is pending for over GRACE_S,
    # and hands it to the recovered listeners (the task service delivers it).
    later = task_doc(alice, created=old)
    await reopened.tasks.insert_one({**later, **pending("task.created", old)})
    recovered: list[dict] = []
    reopened.on_recovered(recovered.extend)
    await reopened.watch()
    assert [(e["seq"], e["data"]["taskId"]) for e in recovered] == [(3, later["_id"])]


@pytest.mark.parametrize("backend", ("mongo-standalone",), indirect=True)
async def test_without_transactions_a_task_does_not_change_before_its_envelope_is_numbered(
        backend: Backend) -> None:
    """The cancel of a task whose last envelope is still pending (its writer died) numbers that
    envelope first, then cancels: the log has both, in order; a claim leaves such a task to the
    periodic check rather than change it."""
    store = await backend.open()
    alice = new_id()
    old = utcnow() - secs(30)
    stuck = task_doc(alice, created=old)
    await store.tasks.insert_one({**stuck, **pending("task.created", old)})
    now = utcnow()
    assert await store.claim_task("w", now, now + secs(30), Change("task.processing", now)) \
        is None
    recovered: list[dict] = []
    store.on_recovered(recovered.extend)
    cancel = Change("task.cancelled", now)
    gone = await store.cancel_task(stuck["_id"], alice, now, cancel)
    assert gone["status"] == "cancelled" and cancel.envelope["seq"] == 2
    assert [e["event"] for e in recovered] == ["task.created"]  # numbered here: delivered
    assert [(d["seq"], d["event"]) for d in await store.events_after(alice, 0, 10)] == \
        [(1, "task.created"), (2, "task.cancelled")]


# start-up repair --------------------------------------------------------------------------------


async def forget_the_check(backend: Backend, store: Store) -> None:
    """Make the database look as an older version left it: never checked by this one."""
    if backend.mongo:
        await store.meta.delete_one({"_id": "format"})
    else:
        await store._run(lambda: store._conn.execute("DELETE FROM meta WHERE key = 'format'"))


async def key_of_an_older_version(backend: Backend, store: Store, user_id: str, key: str,
                                  task_id: str, at: dt.datetime) -> None:
    if backend.mongo:
        await store.idempotency.insert_one({"userId": user_id, "key": key, "taskId": task_id,
                                            "createdAt": at})
    else:
        await store._run(lambda: store._conn.execute(
            "INSERT INTO idempotency (userId, key, taskId, createdAt) VALUES (?, ?, ?, ?)",
            (user_id, key, task_id, int((at - dt.datetime(1970, 1, 1)).total_seconds() * 1000))))


@pytest.mark.parametrize("backend", REOPENED, indirect=True)
async def test_opening_repairs_what_an_older_version_left_once(backend: Backend, caplog) -> None:
    caplog.set_level(logging.INFO, "droid.store.repair")
    store = await backend.open()
    alice, bob = new_id(), new_id()
    now = utcnow()
    # Stored without its task.created (and not due, so that the claim below takes the other).
    unannounced = task_doc(alice, created=now - secs(30), runAfter=now + secs(3600))
    await store.insert_task(unannounced)
    # Created and claimed with their envelopes, then completed without one.
    ran = task_doc(alice, created=now - secs(20))
    await store.insert_task(ran, Change("task.created", now - secs(20)))
    await store.claim_task("w", now - secs(10), now + secs(30),
                           Change("task.processing", now - secs(10)))
    completed = await store.update_attempt(ran["_id"], 1, {
        "status": "completed", "response": "done", "completedAt": now, "updatedAt": now})
    # Whole, and too old to be looked at (its envelopes would have expired).
    whole = task_doc(bob, created=now - secs(5))
    await store.insert_task(whole, Change("task.created", now - secs(5)))
    ancient = task_doc(bob, created=now - secs(4 * 86400), status="completed")
    await store.insert_task(ancient)
    kept = task_doc(bob, created=now - secs(60))
    await store.insert_task(kept, Change("task.created", now - secs(60)))
    await key_of_an_older_version(backend, store, alice, "lost", new_id(), now - secs(40))
    await key_of_an_older_version(backend, store, bob, "kept", kept["_id"], now - secs(60))
    await forget_the_check(backend, store)

    reopened = await backend.fresh()
    repaired = [r.getMessage() for r in caplog.records if "repaired" in r.getMessage()]
    assert len(repaired) == 1, repaired
    assert ("1 tasks without task.created" in repaired[0]
            and "1 tasks whose last envelope was not their state" in repaired[0]
            and "1 Idempotency-Keys naming no task" in repaired[0]), repaired[0]
    events = await reopened.events_after(alice, 0, 10)
    assert [(d["seq"], d["event"], d["envelope"]["data"]["taskId"]) for d in events] == [
        (1, "task.created", ran["_id"]), (2, "task.processing", ran["_id"]),
        (3, "task.created", unannounced["_id"]), (4, "task.completed", ran["_id"])]
    assert events[2]["envelope"]["data"] == event_data("task.created", task_json(unannounced))
    assert events[3]["envelope"]["data"] == event_data("task.completed", task_json(completed))
    assert await reopened.last_seq(bob) == 2  # nothing written for bob's tasks
    # The released key creates its task; the kept one still names its task.
    fresh = task_doc(alice)
    assert await reopened.insert_task(fresh, key="lost", key_since=now - secs(3600)) == fresh
    assert await reopened.insert_task(task_doc(bob), key="kept",
                                      key_since=now - secs(3600)) == kept
    # Once per database: the next open finds it checked.
    await reopened.insert_task(task_doc(alice))  # would be repaired, were it checked again
    caplog.clear()
    again = await backend.fresh()
    assert await again.last_seq(alice) == 4
    assert not [r for r in caplog.records if "repaired" in r.getMessage()]


# failures -----------------------------------------------------------------------------------


async def test_sqlite_a_full_database_fails_loudly_and_recovers_by_itself(tmp_path,
                                                                         caplog) -> None:
    """SQLITE_FULL (here: the connection's page limit) is a StoreFailing, a 503: nothing of the
    change is stored, the store is failing (once in the log) until a write succeeds again,
    which its probe finds out without traffic."""
    caplog.set_level(logging.INFO, "droid.store")
    store = SqliteStore(str(tmp_path / "droid.sqlite3"))
    await store.open()
    try:
        alice = new_id()
        await store.insert_task(task_doc(alice), Change("task.created", utcnow()))
        await store._run(lambda: store._conn.execute(
            "PRAGMA max_page_count = %d" % store._conn.execute(
                "PRAGMA page_count").fetchone()[0]))
        for _ in range(3):
            doc = task_doc(alice, prompt="x" * 100_000)
            change = Change("task.created", utcnow())
            with pytest.raises(StoreFailing) as failed:
                await store.insert_task(doc, change)
            assert failed.value.status == 503 and failed.value.retry_after > 0
            assert change.envelope is None and await store.task_by_id(doc["_id"]) is None
        assert await store.last_seq(alice) == 1  # reads still answer
        assert "full" in store.failing and await store.health() == "failing"
        await store.watch()  # the probe fails too: still failing
        assert await store.health() == "failing"
        await store._run(lambda: store._conn.execute("PRAGMA max_page_count = 1073741823"))
        await store.watch()
        assert store.failing is None and await store.health() == "ok"
        doc = task_doc(alice, prompt="x" * 100_000)
        assert await store.insert_task(doc, Change("task.created", utcnow())) == doc
        lines = [r.getMessage() for r in caplog.records if r.name == "droid.store.health"]
        assert len(lines) == 2 and "writes fail (database or disk is full)" in lines[0]
        assert str(tmp_path / "droid.sqlite3") in lines[0]
        assert lines[1].endswith("writes succeed again")
    finally:
        await store.close()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_sqlite_a_file_deleted_or_replaced_under_the_store_is_never_written_into(
        tmp_path, caplog, how: str) -> None:
    path = tmp_path / "droid.sqlite3"
    store = SqliteStore(str(path))
    await store.open()
    try:
        alice = new_id()
        await store.insert_task(task_doc(alice), Change("task.created", utcnow()))
        os.remove(path)
        if how == "replaced":
            path.write_bytes(b"")  # another file at the path (a restore, a copy)
        await store.watch()  # what the store does every WATCH_EVERY_S
        assert store.failing == f"the file was {how}" and await store.health() == "failing"
        with pytest.raises(StoreFailing):
            await store.insert_task(task_doc(alice), Change("task.created", utcnow()))
        with pytest.raises(StoreFailing):
            await store.last_seq(alice)
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and str(path) in errors[0].getMessage()
        assert f"was {how}" in errors[0].getMessage()
    finally:
        await store.close()


# API keys, webhook endpoints and deliveries (issue 23) -------------------------------------


def key_doc(user_id: str, n: int = 0, **over) -> dict:
    return {"_id": new_id(), "userId": user_id, "name": f"key {n}", "prefix": f"droid_sk_{n:08d}",
            "scope": "write", "keyHash": uuid.uuid4().hex, "createdAt": utcnow(),
            "lastUsedAt": None, **over}


def webhook_doc(user_id: str, **over) -> dict:
    now = utcnow()
    return {"_id": new_id(), "userId": user_id, "url": "https://example.com/hook",
            "events": ["task.completed"], "description": None, "enabled": True,
            "disabledReason": None, "secret": "whsec_abc", "previousSecret": None,
            "previousSecretUntil": None, "cursor": 0, "failingSince": None, "createdAt": now,
            "updatedAt": now, **over}


def delivery_doc(endpoint_id: str, user_id: str, seq: int | None, *, due: dt.datetime,
                 created: dt.datetime | None = None, **over) -> dict:
    created = created or utcnow()
    return {"_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{endpoint_id}/{seq}")) if seq is not None
            else new_id(), "endpointId": endpoint_id, "userId": user_id, "event": "task.completed",
            "seq": seq, "webhookId": f"msg_{seq}", "payload": '{"type":"task.completed"}',
            "status": "pending", "attempts": [], "attemptsLeft": 3, "nextAttemptAt": due,
            "claim": None, "createdAt": created, "updatedAt": created, **over}


def strip(doc: dict | None) -> dict | None:
    """A stored document without the fields only one backend keeps for itself."""
    if doc is None:
        return None
    return {k: v for k, v in doc.items() if k not in ("slot", "finishedAt")}


async def test_api_keys_round_trip(store: Store) -> None:
    alice, bob = new_id(), new_id()
    base = utcnow()
    first = key_doc(alice, 1, createdAt=base)
    second = key_doc(alice, 2, createdAt=base + secs(1), scope="read")
    for doc in (second, first, key_doc(bob)):
        await store.insert_api_key(doc, 20)
    assert [strip(d) for d in await store.api_keys_of(alice)] == [first, second]
    assert strip(await store.api_key_by_hash(second["keyHash"])) == second
    assert await store.api_key_by_hash("nope") is None
    await store.touch_api_key(first["_id"], base + secs(5))
    assert (await store.api_key_by_hash(first["keyHash"]))["lastUsedAt"] == base + secs(5)
    assert await store.api_keys_existing([first["_id"], second["_id"], "gone"]) == \
        {first["_id"], second["_id"]}
    assert await store.delete_api_key(first["_id"], bob) is False
    assert await store.delete_api_key(first["_id"], alice) is True
    assert await store.delete_api_key(first["_id"], alice) is False
    assert await store.api_key_by_hash(first["keyHash"]) is None
    assert await store.api_keys_existing([first["_id"]]) == set()


@pytest.mark.parametrize("kind", ["api_key", "webhook"])
async def test_a_users_limit_holds_under_concurrent_inserts(backend: Backend, kind: str) -> None:
    stores = await backend.peers(3)
    alice, bob = new_id(), new_id()
    make = key_doc if kind == "api_key" else lambda u, n=0: webhook_doc(u)
    insert = [getattr(s, f"insert_{kind}") for s in stores]
    await insert[0](make(bob), 3)  # another user's keys do not count
    results = await asyncio.gather(*(insert[i % 3](make(alice, i), 3) for i in range(12)),
                                   return_exceptions=True)
    assert sum(r is None for r in results) == 3, results
    assert all(isinstance(r, Conflict) for r in results if r is not None)
    listed = await getattr(stores[0], "api_keys_of" if kind == "api_key" else "webhooks_of")(alice)
    assert len(listed) == 3
    # Deleting one frees its place.
    if kind == "api_key":
        assert await stores[1].delete_api_key(listed[0]["_id"], alice)
    else:
        assert await stores[1].delete_webhook(listed[0]["_id"], alice)
    await insert[2](make(alice), 3)
    with pytest.raises(Conflict):
        await insert[0](make(alice), 3)


async def test_webhooks_round_trip_update_and_owner_check(store: Store) -> None:
    alice, bob = new_id(), new_id()
    base = utcnow()
    first = webhook_doc(alice, createdAt=base, updatedAt=base)
    second = webhook_doc(alice, createdAt=base + secs(1), events=["task.failed", "task.created"])
    await store.insert_webhook(second, 10)
    await store.insert_webhook(first, 10)
    assert [strip(d) for d in await store.webhooks_of(alice)] == [first, second]
    assert await store.webhooks_of(bob) == []
    assert strip(await store.webhook_by_id(first["_id"])) == first
    assert strip(await store.webhook_by_id(first["_id"], alice)) == first
    assert await store.webhook_by_id(first["_id"], bob) is None

    assert await store.update_webhook(first["_id"], bob, {"url": "https://x"}) is None
    changed = await store.update_webhook(first["_id"], alice, {
        "enabled": False, "disabledReason": "410 Gone", "events": ["task.cancelled"],
        "previousSecretUntil": base + secs(86400)})
    assert strip(changed) == {**first, "enabled": False, "disabledReason": "410 Gone",
                              "events": ["task.cancelled"],
                              "previousSecretUntil": base + secs(86400)}
    # if_enabled: a disabled endpoint is not disabled again
    assert await store.update_webhook(first["_id"], None, {"disabledReason": "again"},
                                      if_enabled=True) is None
    assert strip(await store.update_webhook(second["_id"], None, {}, if_enabled=True)) == second

    assert await store.webhook_failing(first["_id"], base + secs(10)) == base + secs(10)
    assert await store.webhook_failing(first["_id"], base + secs(20)) == base + secs(10)
    assert await store.webhook_failing("gone", base) is None
    await store.update_webhook(first["_id"], None, {"failingSince": None})
    assert await store.webhook_failing(first["_id"], base + secs(30)) == base + secs(30)


async def test_webhooks_behind_and_a_cursor_that_moves_once(backend: Backend) -> None:
    stores = await backend.peers(2)
    store = stores[0]
    alice, bob = new_id(), new_id()
    hook = webhook_doc(alice)
    off = webhook_doc(alice, enabled=False)
    quiet = webhook_doc(bob)
    for doc in (hook, off, quiet):
        await store.insert_webhook(doc, 10)
    assert await store.webhooks_behind() == []
    now = utcnow()
    for _ in range(3):
        await store.append_event(alice, "task.completed",
                                 {"event": "task.completed", "data": {}, "timestamp": "t"}, now)
    assert [d["_id"] for d in await store.webhooks_behind()] == [hook["_id"]]

    due = utcnow()
    made = [delivery_doc(hook["_id"], alice, seq, due=due) for seq in (1, 3)]
    # Two processes race to turn seq 1..3 into deliveries: one wins, nothing is stored twice.
    won = await asyncio.gather(*(s.advance_webhook(hook["_id"], 0, 3, made) for s in stores))
    assert sorted(won) == [False, True]
    assert await store.advance_webhook(hook["_id"], 0, 3, made) is False
    page = await store.deliveries_page(hook["_id"], status=None, limit=10, after=None)
    assert sorted(d["seq"] for d in page) == [1, 3]
    assert strip(await store.webhook_by_id(hook["_id"]))["cursor"] == 3
    assert await store.webhooks_behind() == []
    # A disabled endpoint's cursor does not move.
    assert await store.advance_webhook(off["_id"], 0, 3, []) is False
    # A delivery already stored (its process died before moving the cursor) is stored once.
    await store.append_event(alice, "task.failed",
                             {"event": "task.failed", "data": {}, "timestamp": "t"}, now)
    again = [delivery_doc(hook["_id"], alice, 4, due=due)]
    await store.insert_delivery(again[0])
    assert await store.advance_webhook(hook["_id"], 3, 4, again) is True
    page = await store.deliveries_page(hook["_id"], status=None, limit=10, after=None)
    assert sorted(d["seq"] for d in page) == [1, 3, 4]

    # enabled again from the present (cursor = the last seq): behind only after a new envelope
    assert await store.update_webhook(off["_id"], alice, {"enabled": True, "cursor": 4})
    assert [d["_id"] for d in await store.webhooks_behind()] == []
    await store.append_event(alice, "task.created",
                             {"event": "task.created", "data": {}, "timestamp": "t"}, now)
    assert sorted(d["_id"] for d in await store.webhooks_behind()) == sorted(
        [hook["_id"], off["_id"]])
    assert await store.advance_webhook(off["_id"], 4, 5, []) is True
    assert [d["_id"] for d in await store.webhooks_behind()] == [hook["_id"]]

    assert await store.delete_webhook(hook["_id"], bob) is False
    assert await store.delete_webhook(hook["_id"], alice) is True
    assert await store.deliveries_page(hook["_id"], status=None, limit=10, after=None) == []
    assert await store.webhook_by_id(hook["_id"]) is None


async def test_deliveries_are_claimed_once_and_again_after_the_lease(backend: Backend) -> None:
    stores = await backend.peers(3)
    store = stores[0]
    alice = new_id()
    hook = webhook_doc(alice)
    await store.insert_webhook(hook, 10)
    now = utcnow()
    n = 4 * backend.scale
    docs = [delivery_doc(hook["_id"], alice, i, due=now - secs(n - i)) for i in range(n)]
    future = delivery_doc(hook["_id"], alice, 10_000, due=now + secs(60))
    for doc in (*docs, future):
        await store.insert_delivery(doc)
    lease = now + secs(30)
    claims = await asyncio.gather(*(stores[i % 3].claim_delivery(f"c{i}", now, lease)
                                    for i in range(2 * n)))
    got = [c for c in claims if c is not None]
    assert sorted(c["_id"] for c in got) == sorted(d["_id"] for d in docs)
    assert all(c["nextAttemptAt"] == lease and c["claim"].startswith("c") for c in got)
    assert await store.claim_delivery("late", now, lease) is None
    # Once the lease has run out, the delivery is due again, for another claim.
    again = await store.claim_delivery("next", lease, lease + secs(30))
    assert again is not None and again["_id"] == docs[0]["_id"]
    first = next(c for c in got if c["_id"] == docs[0]["_id"])
    attempt = {"at": "2026-01-01T00:00:00.000Z", "statusCode": 500, "durationMs": 3,
               "error": None, "response": "no", "instance": "i1"}
    assert await store.finish_attempt(first["_id"], first["claim"], attempt,
                                      {"status": "failed"}) is None  # no longer its claim
    done = await store.finish_attempt(again["_id"], "next", attempt,
                                      {"status": "pending", "attemptsLeft": 2,
                                       "nextAttemptAt": now + secs(5), "updatedAt": now})
    assert done["attempts"] == [attempt] and done["claim"] is None
    assert done["attemptsLeft"] == 2 and done["nextAttemptAt"] == now + secs(5)
    assert await store.finish_attempt(again["_id"], "next", attempt, {}) is None


async def test_finish_attempt_keeps_the_last_attempts_and_retry(store: Store) -> None:
    alice = new_id()
    hook = webhook_doc(alice)
    await store.insert_webhook(hook, 10)
    now = utcnow()
    doc = delivery_doc(hook["_id"], alice, 1, due=now)
    await store.insert_delivery(doc)
    for i in range(MAX_ATTEMPTS_KEPT + 3):
        claimed = await store.claim_delivery(f"c{i}", now + secs(i), now + secs(i + 1))
        assert claimed is not None
        final = await store.finish_attempt(
            doc["_id"], f"c{i}", {"at": str(i), "statusCode": 503, "durationMs": i,
                                  "error": None, "response": ""},
            {"status": "pending", "nextAttemptAt": now + secs(i + 1), "updatedAt": now})
    assert [a["at"] for a in final["attempts"]] == [str(i) for i in range(3, MAX_ATTEMPTS_KEPT + 3)]
    assert await store.retry_delivery(doc["_id"], hook["_id"], now, 1) is None  # still pending
    claimed = await store.claim_delivery("last", now + secs(100), now + secs(101))
    await store.finish_attempt(doc["_id"], "last", {"at": "x"},
                               {"status": "failed", "nextAttemptAt": None, "updatedAt": now})
    assert await store.retry_delivery(doc["_id"], "another-endpoint", now, 1) is None
    retried = await store.retry_delivery(doc["_id"], hook["_id"], now + secs(200), 1)
    assert retried["status"] == "pending" and retried["attemptsLeft"] == 1
    assert retried["nextAttemptAt"] == now + secs(200)
    assert strip(await store.delivery_by_id(doc["_id"], hook["_id"])) == strip(retried)
    assert await store.delivery_by_id(doc["_id"], "another-endpoint") is None


async def test_deliveries_page_newest_first_by_status_and_expiry(backend: Backend) -> None:
    store = await backend.open(event_retention_s=3600)
    alice = new_id()
    hook = webhook_doc(alice)
    await store.insert_webhook(hook, 10)
    now = utcnow()
    docs = [delivery_doc(hook["_id"], alice, i, due=now, created=now - secs(100 - i // 2),
                         status=("pending", "succeeded", "failed")[i % 3],
                         updatedAt=now - secs(4000 if i < 6 else 10))
            for i in range(12)]
    for doc in docs:
        await store.insert_delivery(doc)
    newest_first = sorted(docs, key=lambda d: (d["createdAt"], d["_id"]), reverse=True)
    seen, after = [], None
    while True:
        page = await store.deliveries_page(hook["_id"], status=None, limit=5, after=after)
        seen += [d["_id"] for d in page]
        if len(page) < 5:
            break
        after = (page[-1]["createdAt"], page[-1]["_id"])
    assert seen == [d["_id"] for d in newest_first]
    failed = await store.deliveries_page(hook["_id"], status="failed", limit=10, after=None)
    assert [d["_id"] for d in failed] == [d["_id"] for d in newest_first
                                           if d["status"] == "failed"]
    if backend.name == "mongo":  # finished deliveries carry the date the retention counts from
        await store.deliveries.update_many({"status": {"$ne": "pending"}},
                                           [{"$set": {"finishedAt": "$updatedAt"}}])
    await store.expire(now)
    left = await store.deliveries_page(hook["_id"], status=None, limit=20, after=None)
    # Finished and older than the retention: gone. Pending ones stay whatever their age.
    assert sorted(d["_id"] for d in left) == sorted(
        d["_id"] for i, d in enumerate(docs) if i >= 6 or d["status"] == "pending")


# quotas and fair claims (droid/quotas.py) ----------------------------------------------------


async def test_admit_task_counts_and_refuses_by_each_quota(store: Store) -> None:
    from droid.quotas import Quota, QuotaExceeded

    user, now = new_id(), utcnow()
    ms = to_ms(now)
    quota = Quota(tasks_per_minute=3, pending_tasks=0, stored_bytes=1000)
    keys = [await store.admit_task(user, ms + n, 100, quota) for n in range(3)]
    assert keys == sorted(keys) and len(set(keys)) == 3
    with pytest.raises(QuotaExceeded) as refused:
        await store.admit_task(user, ms + 10, 100, quota)
    assert refused.value.status == 429 and 1 <= refused.value.retry_after <= 60
    assert await store.admit_task(user, ms + 60_001, 100, quota)  # the next minute
    with pytest.raises(QuotaExceeded) as refused:
        await store.admit_task(user, ms + 60_002, 700, quota)
    assert refused.value.status == 413 and refused.value.retry_after is None
    assert await store.stored_bytes(user) == 400
    await store.add_stored_bytes(user, 50)
    assert await store.stored_bytes(user) == 450
    pending = Quota(tasks_per_minute=0, pending_tasks=2, stored_bytes=0)
    other = new_id()
    for _ in range(2):
        await store.insert_task(task_doc(other, vkey=await store.admit_task(other, ms, 1,
                                                                           pending)))
    with pytest.raises(QuotaExceeded) as refused:
        await store.admit_task(other, ms, 1, pending)
    assert refused.value.status == 429 and refused.value.retry_after == 5


async def test_claims_take_turns_between_users_and_keep_priority_within_one(store: Store) -> None:
    from droid.quotas import Quota

    quota, base = Quota(0, 0, 0), utcnow() - secs(60)
    hog, late = new_id(), new_id()

    async def create(user: str, n: int, priority: str = "normal") -> dict:
        created = base + dt.timedelta(milliseconds=n)
        doc = task_doc(user, created=created, priority=priority,
                       vkey=await store.admit_task(user, to_ms(created), 1, quota))
        await store.insert_task(doc)
        return doc

    hogs = [await create(hog, n) for n in range(6)]
    mine_low = await create(late, 10, "low")
    mine_urgent = await create(late, 11, "urgent")
    now = utcnow()
    order = []
    while (doc := await store.claim_task("w", now, now + secs(30))) is not None:
        order.append(doc["_id"])
    # The late user's two tasks run within the hog's first turns, its urgent one first.
    assert order.index(mine_urgent["_id"]) < order.index(mine_low["_id"]) <= 4
    assert [i for i in order if i in {h["_id"] for h in hogs}] == [h["_id"] for h in hogs]


# where quotas, fair claims and webhooks meet the write of a change (issues 19, 22, 23) ---------


@pytest.mark.parametrize("backend", WRITES, indirect=True)
async def test_an_insert_admits_its_task_and_a_refused_one_stores_nothing(
        backend: Backend) -> None:
    store = await backend.open()
    alice, now = new_id(), utcnow()
    quota = Quota(tasks_per_minute=2, pending_tasks=0, stored_bytes=0)
    docs = [task_doc(alice, created=now) for _ in range(3)]
    changes = [Change("task.created", now) for _ in docs]
    for doc, change in zip(docs[:2], changes):
        assert await store.insert_task(doc, change, quota=quota, size=10) == doc
    assert docs[0]["vkey"] < docs[1]["vkey"]
    assert [t["vkey"] for t in [await store.task_by_id(d["_id"]) for d in docs[:2]]] == \
        [docs[0]["vkey"], docs[1]["vkey"]]
    with pytest.raises(QuotaExceeded) as refused:
        await store.insert_task(docs[2], changes[2], key="k", key_since=EPOCH_2000, quota=quota,
                                size=10)
    assert refused.value.status == 429
    # Nothing of it: no task, no envelope, no key, no bytes.
    assert await store.task_by_id(docs[2]["_id"]) is None and changes[2].envelope is None
    assert [e["seq"] for e in await store.events_after(alice, 0, 10)] == [1, 2]
    assert await store.stored_bytes(alice) == 20

    # A replayed key stores nothing and gives its bytes back (it counts in its minute).
    bob = new_id()
    free = Quota(tasks_per_minute=0, pending_tasks=0, stored_bytes=1000)
    first = task_doc(bob, created=now)
    assert await store.insert_task(first, Change("task.created", now), key="k",
                                   key_since=EPOCH_2000, quota=free, size=100) == first
    replay = Change("task.created", now)
    assert strip(await store.insert_task(task_doc(bob, created=now), replay, key="k",
                                         key_since=EPOCH_2000, quota=free, size=100)) == \
        strip(await store.task_by_id(first["_id"]))
    assert replay.envelope is None and await store.last_seq(bob) == 1
    assert await store.stored_bytes(bob) == 100


async def test_sqlite_an_insert_that_fails_counts_nothing_against_the_quotas(tmp_path) -> None:
    """On SQLite the admission is in the insert's transaction: a failed insert leaves no count
    (with the admission a step of its own, the minute's count and the bytes stayed)."""
    store = SqliteStore(str(tmp_path / "droid.sqlite3"))
    await store.open()
    try:
        alice, now = new_id(), utcnow()
        quota = Quota(tasks_per_minute=1, pending_tasks=0, stored_bytes=0)
        doc = task_doc(alice, created=now)
        await store.insert_task(doc)  # stored without admission: its id is taken
        with pytest.raises(sqlite3.IntegrityError):
            await store.insert_task(dict(doc), Change("task.created", now), quota=quota, size=7)
        assert await store.stored_bytes(alice) == 0
        assert await store.last_seq(alice) == 0
        # The minute's one task is still to be had.
        assert await store.insert_task(task_doc(alice, created=now), quota=quota, size=7)
        assert await store.stored_bytes(alice) == 7
    finally:
        await store.close()


@pytest.mark.parametrize("backend", WRITES, indirect=True)
async def test_an_answer_is_counted_with_the_change_that_stores_it(backend: Backend) -> None:
    store = await backend.open()
    alice, now = new_id(), utcnow()
    doc = task_doc(alice, created=now - secs(1))
    await store.insert_task(doc, Change("task.created", now - secs(1)),
                            quota=Quota(0, 0, 0), size=5)
    running = await store.claim_task("w", now, now + secs(30), Change("task.processing", now))
    done = Change("task.completed", now)
    fields = {"status": "completed", "response": "hello", "completedAt": now, "updatedAt": now,
              "leaseOwner": None, "leaseExpiresAt": None}
    assert await store.update_attempt(doc["_id"], running["attempt"], fields, change=done,
                                      stored_bytes=5)
    assert done.envelope["seq"] == 3 and await store.stored_bytes(alice) == 10
    # An attempt no longer current changes nothing and counts nothing.
    stale = Change("task.completed", now)
    assert await store.update_attempt(doc["_id"], running["attempt"], fields, change=stale,
                                      stored_bytes=5) is None
    assert stale.envelope is None and await store.stored_bytes(alice) == 10


@pytest.mark.parametrize("backend", WRITES, indirect=True)
async def test_fair_claims_store_their_envelopes(backend: Backend) -> None:
    store = await backend.open()
    hog, late, base = new_id(), new_id(), utcnow() - secs(60)
    quota = Quota(0, 0, 0)
    made = []
    for n, user in enumerate([hog] * 4 + [late]):
        at = base + dt.timedelta(milliseconds=n)
        doc = task_doc(user, created=at)
        await store.insert_task(doc, Change("task.created", at), quota=quota, size=1)
        made.append(doc)
    now = utcnow()
    claimed = []
    while True:
        change = Change("task.processing", now)
        doc = await store.claim_task("w", now, now + secs(30), change)
        if doc is None:
            assert change.envelope is None
            break
        assert change.envelope["event"] == "task.processing"
        assert change.envelope["data"]["taskId"] == doc["_id"]
        claimed.append(doc["_id"])
    assert sorted(claimed) == sorted(d["_id"] for d in made)
    assert claimed.index(made[-1]["_id"]) <= 2  # the late user's turn comes early
    # Each task's last stored envelope is its state, and seqs have no hole.
    for user in (hog, late):
        events = await store.events_after(user, 0, 50)
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        last = {e["envelope"]["data"]["taskId"]: e["envelope"] for e in events}
        for task_id, envelope in last.items():
            assert state_of(envelope) == (await store.task_by_id(task_id))["status"]


@pytest.mark.parametrize("backend", WRITES, indirect=True)
async def test_webhooks_behind_follows_the_envelopes_of_task_changes(backend: Backend) -> None:
    """What the webhook sweep reads (SQLite: the trigger on the event log; MongoDB: the users'
    counters) follows envelopes written with their task's change, on every write path."""
    store = await backend.open()
    alice, now = new_id(), utcnow()
    hook = webhook_doc(alice)
    await store.insert_webhook(hook, 10)
    doc = task_doc(alice, created=now)
    created = Change("task.created", now)
    await store.insert_task(doc, created)
    assert [d["_id"] for d in await store.webhooks_behind()] == [hook["_id"]]
    assert await store.advance_webhook(hook["_id"], 0, created.envelope["seq"], [])
    assert await store.webhooks_behind() == []
    claimed = Change("task.processing", now)
    await store.claim_task("w", now, now + secs(30), claimed)
    assert [d["_id"] for d in await store.webhooks_behind()] == [hook["_id"]]
    events = await store.events_after(alice, 0, 10)
    assert [e["envelope"] for e in events] == [created.envelope, claimed.envelope]


async def test_a_users_first_tasks_at_once_are_all_admitted(backend: Backend) -> None:
    """Concurrent first tasks of a user, on several store objects: the one that creates the
    user's `usage` row makes none of the others a per-minute refusal."""
    stores = await backend.peers(3)
    for round_ in range(5):
        user, ms = new_id(), to_ms(utcnow())
        quota = Quota(tasks_per_minute=100, pending_tasks=0, stored_bytes=0)
        keys = await asyncio.gather(*(stores[i % 3].admit_task(user, ms + i % 2, 1, quota)
                                      for i in range(12)))
        assert len(keys) == 12 and await stores[0].stored_bytes(user) == 12, round_


async def test_processes_started_together_on_a_new_data_folder_all_open_it(tmp_path) -> None:
    """Four processes open 40 new SQLite files at the same instants (a Procfile's web and
    worker on a fresh folder). SQLite refuses the switch to WAL at once, without waiting,
    while another connection makes it; this failed about one start in six."""
    rounds = 40
    script = textwrap.dedent("""
        import asyncio, sys, time
        from droid.store.sqlite import SqliteStore

        async def main(folder, rounds, start_at):
            for i in range(rounds):
                while time.time() < start_at + i * 0.05:
                    pass
                store = SqliteStore(f"{folder}/{i}/droid.sqlite3")
                await store.open()
                await store.close()
            print("opened", rounds)

        asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
    """)
    start_at = time.time() + 3.0  # after the four have imported droid
    results = await asyncio.gather(*(asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", script, str(tmp_path), str(rounds), str(start_at)],
        cwd=ROOT, capture_output=True, text=True, timeout=120) for _ in range(4)))
    for result in results:
        assert result.returncode == 0 and result.stdout.strip() == f"opened {rounds}", \
            result.stderr[-600:]
