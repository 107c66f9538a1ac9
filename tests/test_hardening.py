"""Issue 14: bounded by bytes and by time, and nothing lost to odd input.

One section per finding of the outside attack, each against a real server (both stores where the
database matters): what a user may store, request bodies and heads, Engine.IO requests, slow
clients, token errors, log lines, proxies, static files, and login/registration rate limits.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
import uuid
from typing import Any, AsyncIterator

import jwt
import pytest
import pytest_asyncio
import tornado.testing

from conftest import TEST_SECRET, Api, make_config, wait_until
from droid.app import make_app
from droid.store.mongo import MongoStore
from droid.store.sqlite import SqliteStore

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture(params=["sqlite", "mongo"])
async def served(request, tmp_path) -> AsyncIterator[tuple[Any, Api]]:
    """A Droid on each store (MongoDB: SecantusDB or DROID_TEST_MONGODB_URI) and a client."""
    if request.param == "mongo":
        store: Any = MongoStore(request.getfixturevalue("mongo_uri"),
                                f"droid_test_{uuid.uuid4().hex[:12]}")
    else:
        store = SqliteStore(str(tmp_path / "droid.sqlite3"))
    await store.open()
    app = await make_app(make_config(DROID_DEMO_DELAY_S=0), store=store)
    sock, _ = tornado.testing.bind_unused_port()
    await app.start([sock])
    api = Api(app.url)
    try:
        yield app, api
    finally:
        api.close()
        await app.stop()
        if request.param == "mongo":
            await store.drop()
        await store.close()


def nested(levels: int) -> dict:
    """An object `levels` deep: {"a": {"a": ... 1}} (the outer object is level 1)."""
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


async def readable(api: Api, token: str) -> dict:
    """Everything of the user the REST API can list, asserting each answer is a 200."""
    tasks = await api.get("/tasks?limit=100", token=token)
    events = await api.get("/events?after=0&limit=1000", token=token)
    assert tasks.status == 200, tasks.body
    assert events.status == 200, events.body
    return {"tasks": tasks.body["items"], "events": events.body["items"]}


# 1. metadata depth and size ------------------------------------------------------------------

async def test_deep_or_large_metadata_is_400_and_the_user_stays_readable(served, listen):
    app, api = served
    user = await api.register()
    for levels in (33, 251, 252, 253, 254, 300, 1000):
        # Written by hand: JSON encoders refuse such depths too.
        raw = ('{"prompt": "p", "metadata": ' + '{"a": ' * levels + "1" + "}" * levels + "}")
        reply = await api.post("/tasks", raw=raw.encode(), token=user["token"])
        assert reply.status == 400, (levels, reply.status, reply.body)
        assert reply.message == "metadata must be nested at most 32 levels deep", reply.body
    deep_list: Any = [1]
    for _ in range(40):
        deep_list = [deep_list]
    reply = await api.post("/tasks", {"prompt": "p", "metadata": {"l": deep_list}},
                           token=user["token"])
    assert reply.status == 400 and "32 levels" in reply.message
    reply = await api.post("/tasks", {"prompt": "p", "metadata": {"x": "y" * 16_400}},
                           token=user["token"])
    assert reply.status == 400 and reply.message == "metadata must be at most 16384 bytes as JSON"
    assert await readable(api, user["token"]) == {"tasks": [], "events": []}

    # At the limits it is accepted, and readable everywhere: REST, the event log, live.
    sock = await listen(app.url, user["token"])
    await sock.next("connected")
    for metadata in (nested(32), {"x": "y" * (16 * 1024 - 8)}):
        reply = await api.post("/tasks", {"prompt": "p", "metadata": metadata},
                               token=user["token"])
        assert reply.status == 201, reply.body
        assert reply.body["metadata"] == metadata
        created = await sock.next("task.created",
                                  where=lambda d: d["data"]["id"] == reply.body["id"])
        assert created["data"]["metadata"] == metadata
    seen = await readable(api, user["token"])
    assert len(seen["tasks"]) == 2
    assert [e["data"]["metadata"] for e in seen["events"] if e["event"] == "task.created"] == \
        [nested(32), {"x": "y" * (16 * 1024 - 8)}]


# 2. keys and values a database cannot hold -----------------------------------------------------

@pytest.mark.parametrize("metadata, message", [
    ({"a\u0000b": 1}, "metadata keys must not contain NUL characters"),
    ({"ok": [{"\u0000": 1}]}, "metadata keys must not contain NUL characters"),
    ({"x": {"$ref": "tasks", "$id": 1}}, "metadata keys must not start with $"),
    ({"$where": "1"}, "metadata keys must not start with $"),
    ({"big": 2**63}, "metadata integers must fit in 64 bits (-2^63 to 2^63-1)"),
    ({"big": [18446744073709551615]}, "metadata integers must fit in 64 bits (-2^63 to 2^63-1)"),
])
async def test_metadata_a_database_cannot_hold_is_400(served, metadata, message):
    _, api = served
    user = await api.register()
    reply = await api.post("/tasks", {"prompt": "p", "metadata": metadata}, token=user["token"])
    assert reply.status == 400, reply.body
    assert reply.message == message
    assert await readable(api, user["token"]) == {"tasks": [], "events": []}


async def test_odd_but_storable_metadata_is_stored_published_and_readable(served, listen):
    """Whatever is accepted reaches the event log and the sockets, with no hole in `seq`."""
    app, api = served
    user = await api.register()
    sock = await listen(app.url, user["token"])
    await sock.next("connected")
    odd = [
        {"a.b": {"": "\u0000 in a value is fine", "ключ": "é😀"}},
        {"max": 2**63 - 1, "min": -2**63, "f": 1.5e308, "neg": -0.0},
        {"where": {"k": "$gt: a value may start with $"}, "t": True, "n": None},
    ]
    ids = []
    for metadata in odd:
        reply = await api.post("/tasks", {"prompt": "p\u0000q", "metadata": metadata},
                               token=user["token"])
        assert reply.status == 201, reply.body
        assert reply.body["metadata"] == metadata
        ids.append(reply.body["id"])
    for task_id, metadata in zip(ids, odd):
        created = await sock.next("task.created", where=lambda d, i=task_id: d["data"]["id"] == i)
        assert created["data"]["metadata"] == metadata
        final = await sock.next("task.completed",
                                where=lambda d, i=task_id: d["data"]["taskId"] == i)
        assert final["seq"] > created["seq"]
    seen = await readable(api, user["token"])
    seqs = [e["seq"] for e in seen["events"]]
    assert seqs == list(range(1, len(seqs) + 1))  # every envelope was stored: no hole
    stored = {e["data"]["id"]: e["data"]["metadata"] for e in seen["events"]
              if e["event"] == "task.created"}
    assert stored == dict(zip(ids, odd))
    assert {t["id"]: t["metadata"] for t in seen["tasks"]} == dict(zip(ids, odd))
