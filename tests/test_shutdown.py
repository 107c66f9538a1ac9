"""Graceful shutdown of the worker (Droid.stop()): running attempts finish within a bound or go
back to `pending` without using a retry; no task is lost, and another instance takes them up.
"""
from __future__ import annotations

import asyncio

import pytest

from tests.fake_llm import DEFAULT_ANSWER, Step
from tests.test_worker import fake, llm, session  # noqa: F401 - fixtures and helpers

pytestmark = pytest.mark.asyncio


async def test_stop_returns_running_and_queued_work_to_pending(droid_factory, session, fake,
                                                               shared_store):
    fake.script("hang")
    app = await droid_factory(**llm(fake, WORKER_CONCURRENCY=1))
    app.worker.shutdown_grace_s = 0.2
    s = await session(app)
    running = await s.create("hangs until shutdown")
    await s.wait("task.processing", running["id"])
    await fake.wait_for_requests(1)
    queued = await s.create("never started")

    await asyncio.wait_for(app.stop(), 5)

    back = await s.wait("task.pending", running["id"])
    assert back["retryCount"] == 0 and back["error"] is None
    assert s.story(running["id"]) == ["task.created", "task.processing", "task.pending"]
    assert s.story(queued["id"]) == ["task.created"]
    (request,) = fake.requests  # the queued task was not claimed while stopping
    await asyncio.wait_for(request.ended.wait(), 5)
    assert request.outcome == "client_left"

    heir = await droid_factory(**llm(fake, WORKER_CONCURRENCY=2))
    h = await session(heir, s.user, replay_after=await shared_store.last_seq(s.user["id"]))
    for task in (running, queued):
        done = await h.wait("task.completed", task["id"])
        assert done["response"] == DEFAULT_ANSWER
        stored = await h.task(task["id"])
        assert stored["status"] == "completed" and stored["retryCount"] == 0
    assert len(fake.requests) == 3


async def test_stop_lets_an_attempt_that_ends_in_time_complete(droid_factory, session, fake):
    answer = " ".join(["nearly"] * 10)
    fake.script(Step("stream", answer=answer, chunk_delay_s=0.03))
    app = await droid_factory(**llm(fake, WORKER_CONCURRENCY=1))
    s = await session(app)
    task = await s.create("finish me")
    await s.wait("task.progress", task["id"])

    await asyncio.wait_for(app.stop(), 5)  # the default grace (5 s) covers the rest

    done = await s.wait("task.completed", task["id"])
    assert done["response"] == answer
    assert s.story(task["id"]) == ["task.created", "task.processing", "task.completed"]
    assert fake.requests[0].outcome == "answered"


async def test_stop_is_bounded_when_an_attempt_outlasts_the_grace(droid_factory, session, fake):
    # An attempt still running after the grace period is cancelled and given back.
    fake.script(Step("stream", answer=" ".join(["slow"] * 100), chunk_delay_s=0.05))
    app = await droid_factory(**llm(fake, WORKER_CONCURRENCY=1))
    app.worker.shutdown_grace_s = 0.2
    s = await session(app)
    task = await s.create("too slow")
    await s.wait("task.progress", task["id"])
    await asyncio.wait_for(app.stop(), 5)
    back = await s.wait("task.pending", task["id"])
    assert back["retryCount"] == 0
    assert not app.worker.running


async def test_instance_without_worker_stops_and_leaves_tasks_pending(droid_factory, session,
                                                                      fake, shared_store):
    app = await droid_factory(**llm(fake, WORKER_CONCURRENCY=0))
    s = await session(app)
    task = await s.create("nobody runs me")
    await asyncio.wait_for(app.stop(), 5)
    heir = await droid_factory(**llm(fake, WORKER_CONCURRENCY=1))
    h = await session(heir, s.user, replay_after=await shared_store.last_seq(s.user["id"]))
    await h.wait("task.completed", task["id"])
    assert (await h.task(task["id"]))["retryCount"] == 0
