"""Where issue 22's limits meet issue 23's API keys and webhooks, and issue 24's client.

- Quotas are the user's, whichever credential creates the task: a `write` API key's tasks and
  the user's token's share one count; a `read` key is refused (403) before any quota is looked
  at, and counts nothing.
- A replayed Idempotency-Key (the Python client sends one with every task, and replays it after
  a lost answer) stores nothing, so it adds nothing to the stored bytes.
- Webhooks are made from the stored event log, whose task.created envelopes are stored without
  the prompt and metadata (droid/store/slim.py): a delivery still carries the whole task, and the
  dispatcher reads the log in pieces of at most DROID_MAX_PAGE_BYTES.

Droid in-process (conftest's droid_factory), real HTTP clients, a real receiver on 127.0.0.1.
"""
from __future__ import annotations

import sqlite3
from typing import AsyncIterator

import pytest
import pytest_asyncio
from standardwebhooks import Webhook

from conftest import Api
from droid.quotas import task_size
from droid.store.sqlite import SqliteStore
from webhook_receiver import Receiver

pytestmark = pytest.mark.asyncio

FAST = {"DROID_WEBHOOK_ALLOW_PRIVATE": "true", "DROID_WEBHOOK_RETRY_SCHEDULE": "0,0.2,0.2"}


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    made = await Receiver().start()
    yield made
    await made.stop()


async def new_key(api: Api, token: str, scope: str) -> str:
    reply = await api.post("/api-keys", {"name": scope, "scope": scope}, token=token)
    assert reply.status == 201, reply.body
    return reply.body["key"]


async def test_api_keys_share_their_users_quotas_and_a_read_key_counts_nothing(droid_factory):
    app = await droid_factory(DROID_QUOTA_TASKS_PER_MINUTE=3, WORKER_CONCURRENCY=0)
    api = Api(app.url)
    user = await api.register()
    token = user["token"]
    writer, reader = await new_key(api, token, "write"), await new_key(api, token, "read")
    # A read key is refused by its scope, before the quota: nothing is counted.
    for _ in range(5):
        refused = await api.post("/tasks", {"prompt": "no"}, token=reader)
        assert refused.status == 403 and refused.message == "API key scope does not allow this"
    assert await app.store.stored_bytes(user["id"]) == 0
    created = [await api.post("/tasks", {"prompt": "by key"}, token=writer),
               await api.post("/tasks", {"prompt": "by token"}, token=token),
               await api.post("/tasks", {"prompt": "by key"}, token=writer)]
    assert [r.status for r in created] == [201] * 3
    assert {r.body["userId"] for r in created} == {user["id"]}
    # The fourth of the minute is refused whichever credential asks: one user, one count.
    by_key = await api.post("/tasks", {"prompt": "one more"}, token=writer)
    assert by_key.status == 429 and 1 <= int(by_key.headers["Retry-After"]) <= 60
    assert by_key.message.startswith("Quota exceeded: at most 3 tasks created per minute")
    by_token = await api.post("/tasks", {"prompt": "one more"}, token=token)
    assert by_token.status == 429
    assert by_token.message.startswith("Quota exceeded: at most 3 tasks created per minute")
    # While it holds, the scope still comes first for a read key.
    assert (await api.post("/tasks", {"prompt": "no"}, token=reader)).status == 403
    # And a read key still reads the tasks the write key made, in bounded pages.
    listed = await api.get("/tasks", token=reader)
    assert listed.status == 200 and len(listed.body["items"]) == 3
    api.close()


async def test_a_replayed_idempotency_key_adds_no_stored_bytes(droid_factory):
    app = await droid_factory(WORKER_CONCURRENCY=0)
    api = Api(app.url)
    user = await api.register()
    body = {"prompt": "once " * 1000, "metadata": {"run": 7}}
    first = await api.post("/tasks", body, token=user["token"], headers={"Idempotency-Key": "k1"})
    assert first.status == 201
    size = task_size(body["prompt"], '{"run":7}')
    assert await app.store.stored_bytes(user["id"]) == size
    for _ in range(3):  # a client replaying a lost answer
        again = await api.post("/tasks", body, token=user["token"],
                               headers={"Idempotency-Key": "k1"})
        assert again.status == 200 and again.body["id"] == first.body["id"]
    assert await app.store.stored_bytes(user["id"]) == size
    other = await api.post("/tasks", body, token=user["token"], headers={"Idempotency-Key": "k2"})
    assert other.status == 201
    assert await app.store.stored_bytes(user["id"]) == 2 * size
    api.close()


async def test_webhooks_carry_whole_tasks_from_slim_envelopes_read_in_bounded_pieces(
        droid_factory, receiver, monkeypatch):
    # The envelopes are stored by a process that does not dispatch; another one, started after,
    # finds the endpoint behind and turns the whole backlog into deliveries.
    quiet = await droid_factory(**FAST, DROID_WEBHOOK_CONCURRENCY=0, WORKER_CONCURRENCY=0)
    store = quiet.store
    api = Api(quiet.url)
    user = await api.register()
    made = await api.post("/webhooks", {"url": receiver.url, "events": ["task.created"]},
                          token=user["token"])
    assert made.status == 201, made.body
    secret = made.body["secret"]
    tasks = []
    for n in range(8):
        reply = await api.post("/tasks", {"prompt": f"{n} " + "w" * 30_000,
                                          "metadata": {"n": n, "pad": "m" * 1000}},
                               token=user["token"])
        assert reply.status == 201
        tasks.append(reply.body)
    reads: list[int] = []
    events_after = store.events_after

    async def counted(*args, **kwargs):
        page = await events_after(*args, **kwargs)
        reads.append(len(page))
        return page

    monkeypatch.setattr(store, "events_after", counted)
    await droid_factory(**FAST, DROID_MAX_PAGE_BYTES=65536, WORKER_CONCURRENCY=0)
    await receiver.wait_for(lambda: len(receiver.of("task.created")) == 8)
    by_task = {}
    for got in receiver.of("task.created"):
        body = Webhook(secret).verify(got.body, got.headers)
        by_task[body["data"]["taskId"]] = body["data"]
    for task in tasks:
        data = by_task[task["id"]]
        assert data == {**task, "taskId": task["id"], "seq": data["seq"]}
        assert data["prompt"].endswith("w" * 30_000) and data["metadata"]["pad"] == "m" * 1000
    # No read of the log held more than about 64 KiB: two envelopes of 31 KB and the one past.
    assert reads and max(reads) <= 3, reads
    if isinstance(store, SqliteStore):  # the prompts came from the tasks' rows
        conn = sqlite3.connect(store.path)
        rows = conn.execute("SELECT length(envelope) FROM events WHERE userId = ? AND "
                            "event = 'task.created'", (user["id"],)).fetchall()
        conn.close()
        assert len(rows) == 8 and all(size < 2_000 for (size,) in rows), rows
    api.close()
