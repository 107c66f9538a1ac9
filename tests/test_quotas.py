"""Per-user quotas, fair claims, stored envelopes and bounded pages (issue 22, finding 3).

Quotas are kept in the store: two real processes on one data folder share them. Fairness: one
user's 10,000 pending tasks do not hold back another user's one. Envelopes: the prompt is stored
once (in the task), not again in its task.created envelope, and read back whole. Pages of
GET /events and GET /tasks stop at DROID_MAX_PAGE_BYTES and lose nothing across pages.
"""
from __future__ import annotations

import asyncio
import sqlite3

import pytest

from conftest import Api, wait_until
from droid_process import spawn  # noqa: F401 - a fixture
from droid.quotas import Quota, task_size
from droid.store.sqlite import SqliteStore
from droid.tasks.agents import DEFAULT_AGENT_ID
from droid.util import new_id, to_ms, utcnow

pytestmark = pytest.mark.asyncio


async def post_task(api: Api, token: str, prompt: str = "hello", **fields) -> object:
    return await api.post("/tasks", {"prompt": prompt, **fields}, token=token)


async def test_quotas_are_shared_by_every_process(spawn, tmp_path):
    data = tmp_path / "data"
    env = dict(DROID_DATA_DIR=str(data), JWT_SECRET="q" * 40, WORKER_CONCURRENCY=0,
               DROID_QUOTA_TASKS_PER_MINUTE=4, DROID_QUOTA_PENDING_TASKS=3)
    one, two = spawn("one", **env), spawn("two", **env)
    await one.ready()
    await two.ready()
    api1, api2 = Api(one.url), Api(two.url)
    user = await api1.register()
    token = user["token"]
    created = [await post_task(api1, token), await post_task(api1, token),
               await post_task(api2, token)]
    assert [r.status for r in created] == [201] * 3
    refused = await post_task(api2, token)  # the 4th pending one, on the other process
    assert refused.status == 429 and refused.headers["Retry-After"] == "5"
    assert refused.body == {"statusCode": 429, "error": "Too Many Requests", "message": (
        "Quota exceeded: at most 3 tasks pending at once (DROID_QUOTA_PENDING_TASKS); retry "
        "once some have run")}
    cancelled = await api2.post(f"/tasks/{created[0].body['id']}/cancel", token=token)
    assert cancelled.status == 200
    assert (await post_task(api1, token)).status == 201  # the 4th of this minute
    refused = await post_task(api2, token)
    assert refused.status == 429 and 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.message.startswith("Quota exceeded: at most 4 tasks created per minute "
                                      "(DROID_QUOTA_TASKS_PER_MINUTE); retry in ")
    # Until the window ends this process refuses the user at once, its body unread...
    again = await api2.request("POST", "/tasks", raw=b"not json", token=token)
    assert again.status == 429 and again.message.startswith("Quota exceeded: at most 4 tasks")
    # ... while the other one, which has not been told yet, reads it first.
    assert (await api1.request("POST", "/tasks", raw=b"not json", token=token)).status == 400
    other = await api2.register()  # another user has quotas of its own
    assert (await post_task(api2, other["token"])).status == 201
    api1.close()
    api2.close()


async def test_stored_bytes_are_a_413_and_count_the_answers(droid_factory):
    app = await droid_factory(DROID_QUOTA_STORED_BYTES=100_000)
    api = Api(app.url)
    user = await api.register()
    first = await post_task(api, user["token"], "é" * 20_000)  # 40,000 bytes of UTF-8
    assert first.status == 201

    async def completed() -> bool:
        task = await api.get(f"/tasks/{first.body['id']}", token=user["token"])
        return task.body["status"] == "completed"

    await wait_until(completed)
    answer = (await api.get(f"/tasks/{first.body['id']}", token=user["token"])).body["response"]
    used = 40_000 + len(answer.encode())
    assert await app.store.stored_bytes(user["id"]) == used
    second = await post_task(api, user["token"], "x" * 30_000, metadata={"k": "v" * 100})
    assert second.status == 201
    used += 30_000 + len('{"k":"' + "v" * 100 + '"}')
    refused = await post_task(api, user["token"], "y" * 30_000)
    assert refused.status == 413 and "Retry-After" not in refused.headers
    assert refused.body == {"statusCode": 413, "error": "Payload Too Large", "message": (
        f"Quota exceeded: at most 100000 bytes stored per user (DROID_QUOTA_STORED_BYTES); "
        f"{await app.store.stored_bytes(user['id'])} are used and this task needs 30000")}
    assert await app.store.stored_bytes(user["id"]) >= used
    api.close()


async def test_a_users_10000_pending_tasks_do_not_starve_another_users_one(droid_factory):
    app = await droid_factory(WORKER_CONCURRENCY=0, DROID_DEMO_DELAY_S=0)
    store = app.store
    hog = new_id()
    quota = Quota(0, 0, 0)
    for n in range(10_000):
        now = utcnow()
        vkey = await store.admit_task(hog, to_ms(now), task_size("busy", None), quota)
        await store.insert_task({
            "_id": new_id(), "userId": hog, "agentId": DEFAULT_AGENT_ID, "status": "pending",
            "priority": "urgent", "priorityRank": 3, "prompt": f"busy {n}", "response": None,
            "error": None, "tokensUsed": None, "executionTimeMs": None, "retryCount": 0,
            "metadataJson": None, "createdAt": now, "updatedAt": now, "startedAt": None,
            "completedAt": None, "runAfter": now, "attempt": 0, "leaseOwner": None,
            "leaseExpiresAt": None, "vkey": vkey})
    api = Api(app.url)
    user = await api.register()
    mine = await post_task(api, user["token"], "just one", priority="low")
    assert mine.status == 201
    await droid_factory(WORKER_CONCURRENCY=1, DROID_DEMO_DELAY_S=0)  # now the work starts

    async def done() -> bool:
        task = await api.get(f"/tasks/{mine.body['id']}", token=user["token"])
        return task.body["status"] == "completed"

    await wait_until(done, timeout=20)
    started = (await store.task_by_id(mine.body["id"]))["startedAt"]
    ran = await store.tasks_page(hog, status="completed", agent_id=None, limit=1000, after=None)
    before = [t for t in ran if t["startedAt"] < started]
    assert len(before) <= 2  # a turn of the hog's (and a tie), not 10,000
    api.close()


async def test_a_prompt_is_stored_once_and_envelopes_read_back_whole(droid_factory, listen,
                                                                    tmp_path):
    app = await droid_factory(DROID_DEMO_DELAY_S=0)
    api = Api(app.url)
    user = await api.register()
    prompt, metadata = "p" * 32_000, {"m": "q" * 16_000}
    task = (await post_task(api, user["token"], prompt, metadata=metadata)).body

    async def completed() -> bool:
        reply = await api.get(f"/tasks/{task['id']}", token=user["token"])
        return reply.body["status"] == "completed"

    await wait_until(completed)
    if isinstance(app.store, SqliteStore):  # what the file holds
        conn = sqlite3.connect(app.store.path)
        rows = conn.execute("SELECT event, length(envelope) FROM events WHERE userId = ?",
                            (user["id"],)).fetchall()
        conn.close()
        assert rows and all(size < 2_000 for _, size in rows), rows
    page = (await api.get("/events?after=0", token=user["token"])).body["items"]
    created = next(e for e in page if e["event"] == "task.created")
    assert created["data"] == {**task, "taskId": task["id"]}  # the whole task, as published
    done = next(e for e in page if e["event"] == "task.completed")
    final = (await api.get(f"/tasks/{task['id']}", token=user["token"])).body
    assert done["data"]["response"] == final["response"] and final["response"]
    # A resume replays the same envelopes, whole.
    listener = await listen(app.url, auth={"token": user["token"], "lastSeq": 0})
    replayed = await listener.next("task.created")
    assert replayed == created
    api.close()


async def test_pages_stop_at_their_byte_bound_and_lose_nothing(droid_factory):
    app = await droid_factory(DROID_MAX_PAGE_BYTES=65536, WORKER_CONCURRENCY=0)
    api = Api(app.url)
    user = await api.register()
    ids = [(await post_task(api, user["token"], f"{n} " + "z" * 30_000)).body["id"]
           for n in range(10)]
    seen, after, pages = [], 0, 0
    while True:
        reply = await api.get(f"/events?after={after}&limit=1000", token=user["token"])
        assert reply.status == 200
        items = reply.body["items"]
        if not items:
            break
        assert len(items) <= 3  # about 64 KiB: two envelopes of 30 KB and the one past it
        pages += 1
        seen += [e["data"]["taskId"] for e in items]
        assert all(e["data"]["prompt"].endswith("z" * 30_000) for e in items)
        after = reply.body["lastSeq"]
    assert seen == ids and pages >= 4
    listed, cursor = [], None
    while True:
        query = "/tasks?limit=100" + (f"&cursor={cursor}" if cursor else "")
        reply = (await api.get(query, token=user["token"])).body
        assert len(reply["items"]) <= 3
        listed += [t["id"] for t in reply["items"]]
        cursor = reply["nextCursor"]
        if cursor is None:
            break
    assert listed == ids[::-1]
    api.close()
