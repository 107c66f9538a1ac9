"""Webhooks over real `python -m droid` processes on one SQLite file (issue 23): what a process
publishes is delivered even when it is SIGKILLed right after, by another process, and two
processes delivering from one store never make one attempt twice at once."""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import pytest_asyncio
from standardwebhooks import Webhook

from conftest import TEST_SECRET, Api, wait_until
from droid_process import spawn  # noqa: F401 - a fixture
from webhook_receiver import Receiver, Reply

pytestmark = pytest.mark.asyncio


def shared_env(tmp_path: Path, **env: Any) -> dict[str, Any]:
    return {"DROID_DATA_DIR": str(tmp_path / "shared-data"), "JWT_SECRET": TEST_SECRET,
            "DROID_DEMO_DELAY_S": "0.05", "DROID_WEBHOOK_ALLOW_PRIVATE": "true",
            "DROID_WEBHOOK_RETRY_SCHEDULE": "0,0.5,0.5", "DROID_WEBHOOK_TIMEOUT_S": "1", **env}


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    made = await Receiver().start()
    yield made
    await made.stop()


async def instance_of(api: Api) -> str:
    return (await api.get("/health")).body["instance"]


async def test_the_publisher_dies_right_after_and_another_process_delivers(
        tmp_path, spawn, receiver) -> None:
    """a runs the task and publishes task.completed, but neither turns events into deliveries
    nor delivers (DROID_WEBHOOK_CONCURRENCY=0); it is SIGKILLed as soon as the task is
    completed. b, which runs no task, finds the envelope in the stored log and delivers it."""
    env = shared_env(tmp_path)
    a = spawn("a", WORKER_CONCURRENCY=1, DROID_WEBHOOK_CONCURRENCY=0, **env)
    b = spawn("b", WORKER_CONCURRENCY=0, **env)
    await a.ready()
    await b.ready()
    api_a, api_b = Api(a.url), Api(b.url)
    try:
        user = await api_b.register()
        endpoint = (await api_b.post("/webhooks", {"url": receiver.url},
                                     token=user["token"])).body
        task = (await api_a.post("/tasks", {"prompt": "then die"}, token=user["token"])).body

        async def completed() -> bool:
            reply = await api_b.get(f"/tasks/{task['id']}", token=user["token"])
            return reply.body["status"] == "completed"

        await wait_until(completed, 20, interval=0.005)
        a.kill()
        got = (await receiver.wait_for(lambda: receiver.of("task.completed"), 15))[0]
        body = Webhook(endpoint["secret"]).verify(got.body, got.headers)
        assert body["data"]["taskId"] == task["id"]
        items = (await api_b.get(f"/webhooks/{endpoint['id']}/deliveries",
                                 token=user["token"])).body["items"]
        assert [a["instance"] for a in items[0]["attempts"]] == [await instance_of(api_b)]
    finally:
        api_a.close()
        api_b.close()


async def test_a_process_killed_mid_attempt_leaves_it_to_another_after_the_lease(
        tmp_path, spawn, receiver) -> None:
    """a claims the delivery and is SIGKILLed while the receiver holds its request; b, started
    only then (so the attempt in flight was a's), delivers it once the lease has run out, with
    the same webhook-id."""
    receiver.answer = lambda r: Reply(200, delay_s=30) if len(receiver.received) == 1 \
        else Reply(200)
    env = shared_env(tmp_path)
    a = spawn("a", WORKER_CONCURRENCY=1, **env)
    await a.ready()
    api_a = Api(a.url)
    api_b = None
    try:
        user = await api_a.register()
        endpoint = (await api_a.post("/webhooks", {"url": receiver.url},
                                     token=user["token"])).body
        await api_a.post("/tasks", {"prompt": "hold on"}, token=user["token"])
        first = (await receiver.wait_for(lambda: receiver.received, 15))[0]
        a.kill()
        b = spawn("b", WORKER_CONCURRENCY=0, **env)
        await b.ready()
        api_b = Api(b.url)
        second = (await receiver.wait_for(lambda: receiver.received[1:], 15))[0]
        assert second.webhook_id == first.webhook_id
        assert second.at - first.at >= 3.0 - 0.1  # the lease: 2 x 1 s + 1 s
        Webhook(endpoint["secret"]).verify(second.body, second.headers)

        async def succeeded() -> list:
            items = (await api_b.get(f"/webhooks/{endpoint['id']}/deliveries",
                                     token=user["token"])).body["items"]
            return items if items and items[0]["status"] == "succeeded" else []

        [item] = await wait_until(succeeded, 10)
        # a's attempt was never recorded (it died in it); b's was
        assert [x["instance"] for x in item["attempts"]] == [await instance_of(api_b)]
    finally:
        api_a.close()
        if api_b is not None:
            api_b.close()


async def test_two_processes_never_make_one_attempt_twice(tmp_path, spawn, receiver) -> None:
    receiver.answer = lambda r: Reply(200, delay_s=0.1)
    env = shared_env(tmp_path)
    # a runs the tasks and delivers one at a time; b delivers two at a time: both take a share
    a = spawn("a", WORKER_CONCURRENCY=4, DROID_WEBHOOK_CONCURRENCY=1, **env)
    b = spawn("b", WORKER_CONCURRENCY=0, DROID_WEBHOOK_CONCURRENCY=2, **env)
    await a.ready()
    await b.ready()
    api_a, api_b = Api(a.url), Api(b.url)
    try:
        user = await api_a.register()
        endpoint = (await api_a.post("/webhooks", {"url": receiver.url},
                                     token=user["token"])).body
        n = 40
        for i in range(n):
            assert (await api_a.post("/tasks", {"prompt": f"#{i}"},
                                     token=user["token"])).status == 201
        await receiver.wait_for(lambda: len(receiver.of("task.completed")) >= n, 60)

        async def all_succeeded() -> list:
            items = (await api_b.get(f"/webhooks/{endpoint['id']}/deliveries?limit=100",
                                     token=user["token"])).body["items"]
            return items if len(items) == n and all(
                i["status"] == "succeeded" for i in items) else []

        items = await wait_until(all_succeeded, 20)
        per_id = collections.Counter(r.webhook_id for r in receiver.received)
        assert len(per_id) == n and set(per_id.values()) == {1}, per_id.most_common(3)
        assert set(receiver.max_in_flight_per_id.values()) == {1}
        assert all(len(i["attempts"]) == 1 for i in items)
        by = collections.Counter(i["attempts"][0]["instance"] for i in items)
        assert set(by) == {await instance_of(api_a), await instance_of(api_b)}, by
        for got in receiver.received:
            Webhook(endpoint["secret"]).verify(got.body, got.headers)
    finally:
        api_a.close()
        api_b.close()
