"""droid.worker and the task state machine it drives, end to end: REST in, Socket.IO events out,
a real OpenAI-compatible server (tests/fake_llm.py) on loopback in place of the LLM.

Several Droid instances sharing one database stand for several processes. Without Redis, events
reach only the sockets of the instance that publishes them, so each listener is connected to the
instance whose worker it watches.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import re
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from conftest import ISO_RE, Api, Listener, wait_until
from droid.app import Droid
from droid.tasks.llm import estimate_tokens, make_provider
from droid.tasks.service import LOST_WORKER
from droid.util import new_id, utcnow
from tests.fake_llm import DEFAULT_ANSWER, FakeLLM, Step, refused_url, split_answer

pytestmark = pytest.mark.asyncio

KEY = "sk-secret-worker-XYZ"
USAGE_TOTAL = 28  # fake_llm.DEFAULT_USAGE["total_tokens"]
STATE_EVENTS = ("task.created", "task.processing", "task.progress", "task.pending",
                "task.completed", "task.failed", "task.cancelled")


# helpers ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Session:
    """One user, a REST client and a recording socket, both on one Droid instance."""

    app: Droid
    api: Api
    user: dict
    events: Listener

    @property
    def token(self) -> str:
        return self.user["token"]

    async def create(self, prompt: str = "Say hello", **fields: Any) -> dict:
        reply = await self.api.post("/tasks", {"prompt": prompt, **fields}, token=self.token)
        assert reply.status == 201, reply.body
        return reply.body

    async def task(self, task_id: str) -> dict:
        reply = await self.api.get(f"/tasks/{task_id}", token=self.token)
        assert reply.status == 200, reply.body
        return reply.body

    async def cancel(self, task_id: str) -> dict:
        reply = await self.api.post(f"/tasks/{task_id}/cancel", token=self.token)
        assert reply.status == 200, reply.body
        return reply.body

    async def wait(self, event: str, task_id: str, timeout: float = 5.0,
                   **fields: Any) -> dict:
        """The data of the first `event` of this task (with these field values), waiting for it."""
        envelope = await self.events.next(
            event, timeout=timeout,
            where=lambda e: e["data"]["taskId"] == task_id
            and all(e["data"].get(k) == v for k, v in fields.items()))
        return envelope["data"]

    def story(self, task_id: str, *, progress: bool = False) -> list[str]:
        """The state events of one task this socket saw, in order (progress left out)."""
        return [name for name, envelope in self.events.events
                if name in STATE_EVENTS and envelope["data"]["taskId"] == task_id
                and (progress or name != "task.progress")]

    def data(self, event: str, task_id: str) -> list[dict]:
        return [e["data"] for e in self.events.of(event) if e["data"]["taskId"] == task_id]

    async def stored_story(self, task_id: str) -> list[str]:
        """The state events of one task as stored, whichever instance published them."""
        reply = await self.api.get("/events?after=0&limit=1000", token=self.token)
        return [e["event"] for e in reply.body["items"] if e["data"]["taskId"] == task_id]

    async def last_seq(self) -> int:
        """The seq of this user's latest stored event."""
        return (await self.api.get("/events?after=0&limit=1000", token=self.token)
                ).body["lastSeq"]


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeLLM]:
    server = FakeLLM()
    await server.start()
    yield server
    await server.stop()


@pytest_asyncio.fixture
async def session(listen) -> AsyncIterator[Callable[..., Awaitable[Session]]]:
    """open(app, user=None, replay_after=None): a Session on `app`, for a new user or for `user`
    (from another session); with `replay_after`, the socket first replays the stored events
    after that seq (so it misses nothing an instance did before the socket was connected)."""
    clients: list[Api] = []

    async def open_session(app: Droid, user: dict | None = None, *,
                           replay_after: int | None = None) -> Session:
        api = Api(app.url)
        clients.append(api)
        user = user or await api.register()
        auth = {"token": user["token"]}
        if replay_after is not None:
            auth["lastSeq"] = replay_after
        return Session(app, api, user, await listen(app.url, auth=auth))

    yield open_session
    for api in clients:
        api.close()


def llm(fake: FakeLLM | None = None, *, base_url: str | None = None, **env: Any) -> dict:
    """Environment for an instance using the fake LLM, with fast leases and backoff."""
    return {"LLM_BASE_URL": base_url or fake.base_url, "LLM_MODEL": "m", "LLM_API_KEY": KEY,
            "DROID_LEASE_S": "0.3", "TASK_TIMEOUT_S": "5", "TASK_MAX_RETRIES": "2",
            "DROID_RETRY_BACKOFF_S": "0.02", **env}


def prompt_of(request: Any) -> str:
    return request.body["messages"][-1]["content"]


async def kill_worker(app: Droid) -> None:
    """Simulate the death of the process running `app`'s worker: its loop and attempts vanish
    without stop(), so nothing is given back and the leases are no longer renewed."""
    worker = app.worker
    doomed = [worker._loop_task, *worker.running.values()]
    for task in doomed:
        task.cancel()
    await asyncio.gather(*doomed, return_exceptions=True)
    worker._loop_task = None


# answers ---------------------------------------------------------------------------------------

async def test_plain_answer_completes_with_usage_tokens(droid_factory, session, fake):
    fake.mode = "json"
    app = await droid_factory(**llm(fake))
    s = await session(app)
    task = await s.create("What is Droid?")
    done = await s.wait("task.completed", task["id"])

    assert done["response"] == DEFAULT_ANSWER
    assert done["tokensUsed"] == USAGE_TOTAL
    assert isinstance(done["executionTimeMs"], int) and done["executionTimeMs"] >= 0
    assert re.match(ISO_RE, done["completedAt"]) and done["status"] == "completed"
    assert s.story(task["id"], progress=True) == [
        "task.created", "task.processing", "task.progress", "task.completed"]
    assert s.data("task.progress", task["id"])[0]["delta"] == DEFAULT_ANSWER
    processing = s.data("task.processing", task["id"])[0]
    assert processing["retryCount"] == 0 and re.match(ISO_RE, processing["startedAt"])

    (request,) = fake.requests
    assert request.body["model"] == "m"
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert [m["role"] for m in request.body["messages"]] == ["system", "user"]
    assert prompt_of(request) == "What is Droid?"

    stored = await s.task(task["id"])
    assert stored["status"] == "completed" and stored["response"] == DEFAULT_ANSWER
    assert stored["tokensUsed"] == USAGE_TOTAL and stored["retryCount"] == 0
    assert stored["error"] is None and stored["startedAt"] <= stored["completedAt"]


async def test_streamed_answer_goes_out_as_progress_then_completed(droid_factory, session, fake):
    fake.chunk_delay_s = 0.01
    app = await droid_factory(**llm(fake))
    s = await session(app)
    task = await s.create()
    done = await s.wait("task.completed", task["id"])

    deltas = [d["delta"] for d in s.data("task.progress", task["id"])]
    assert deltas == split_answer(DEFAULT_ANSWER)
    assert "".join(deltas) == done["response"] == DEFAULT_ANSWER
    assert done["tokensUsed"] == USAGE_TOTAL
    story = s.story(task["id"], progress=True)
    assert story[:2] == ["task.created", "task.processing"] and story[-1] == "task.completed"
    assert set(story[2:-1]) == {"task.progress"}
    assert fake.requests[0].body["stream"] is True
    # Progress is live only: it is not stored for replay, state changes are.
    stored = await s.api.get("/events?after=0", token=s.token)
    assert [e["event"] for e in stored.body["items"]] == [
        "task.created", "task.processing", "task.completed"]


async def test_stream_without_usage_counts_tokens_by_the_estimate(droid_factory, session, fake):
    fake.script("stream_no_usage")
    app = await droid_factory(**llm(fake))
    s = await session(app)
    task = await s.create("Count my tokens")
    done = await s.wait("task.completed", task["id"])
    assert done["tokensUsed"] == estimate_tokens("Count my tokens", DEFAULT_ANSWER)


async def test_agent_model_and_system_prompt_override_the_defaults(droid_factory, session, fake):
    app = await droid_factory(**llm(fake))
    s = await session(app)
    agent = await s.api.post("/agents", {"name": "Poet", "model": "poet-model",
                                         "systemPrompt": "Answer in verse."}, token=s.token)
    assert agent.status == 201
    own = await s.create("A poem", agentId=agent.body["id"])
    default = await s.create("Plain")
    await s.wait("task.completed", own["id"])
    await s.wait("task.completed", default["id"])

    by_prompt = {prompt_of(r): r.body for r in fake.requests}
    assert by_prompt["A poem"]["model"] == "poet-model"
    assert by_prompt["A poem"]["messages"][0] == {"role": "system",
                                                  "content": "Answer in verse."}
    assert by_prompt["Plain"]["model"] == "m"


async def test_default_agent_without_llm_model_fails_with_a_clear_error(droid_factory, session,
                                                                        fake):
    # The configuration refuses LLM_BASE_URL without LLM_MODEL (tests/test_config.py); a
    # provider built without a model still fails the task cleanly, without calling the API.
    provider = make_provider(base_url=fake.base_url, api_key=KEY, model=None, timeout_s=5)
    app = await droid_factory(provider=provider, **{k: v for k, v in llm(fake).items()
                                                    if not k.startswith("LLM_")})
    s = await session(app)
    task = await s.create()
    failed = await s.wait("task.failed", task["id"])
    assert failed["error"].startswith("No LLM model is configured")
    assert failed["retryCount"] == 0
    assert fake.requests == []


async def test_demo_agent_answers_when_no_llm_is_configured(droid_factory, session):
    app = await droid_factory()
    s = await session(app)
    task = await s.create("Tell me about the demo agent")
    done = await s.wait("task.completed", task["id"])

    assert done["response"].startswith("This is Droid's built-in demo agent")
    assert "Tell me about the demo agent" in done["response"]
    assert done["tokensUsed"] == estimate_tokens("Tell me about the demo agent",
                                                 done["response"])
    story = s.story(task["id"], progress=True)
    assert story[:2] == ["task.created", "task.processing"] and story[-1] == "task.completed"
    assert "".join(d["delta"] for d in s.data("task.progress", task["id"])) == done["response"]


# failures and retries --------------------------------------------------------------------------

FAILURES = {
    "error500": "LLM API returned HTTP 500",
    "error429": "LLM API returned HTTP 429",
    "hang": "The attempt timed out after 0.3 s",
    "malformed": "LLM returned a malformed response",
    "refused": "Could not connect to the LLM API at http://127.0.0.1:",
}


@pytest.mark.parametrize("behaviour", list(FAILURES))
async def test_failed_attempts_are_retried_then_the_task_fails(droid_factory, session, fake,
                                                               behaviour):
    env = llm(fake, TASK_MAX_RETRIES=2)
    if behaviour == "refused":
        env["LLM_BASE_URL"] = refused_url()
    else:
        fake.mode = behaviour
    if behaviour == "hang":
        env["TASK_TIMEOUT_S"] = "0.3"
    app = await droid_factory(**env)
    s = await session(app)
    task = await s.create()
    failed = await s.wait("task.failed", task["id"])

    assert failed["error"].startswith(FAILURES[behaviour])
    assert failed["retryCount"] == 2 and re.match(ISO_RE, failed["completedAt"])
    assert s.story(task["id"]) == ["task.created"] + [
        "task.processing", "task.pending"] * 2 + ["task.processing", "task.failed"]
    pending = s.data("task.pending", task["id"])
    assert [p["retryCount"] for p in pending] == [1, 2]
    assert all(p["error"].startswith(FAILURES[behaviour]) for p in pending)
    assert [p["retryCount"] for p in s.data("task.processing", task["id"])] == [0, 1, 2]
    for text in [failed["error"], *(p["error"] for p in pending)]:
        assert KEY not in text and "XYZ" not in text

    stored = await s.task(task["id"])
    assert stored["status"] == "failed" and stored["retryCount"] == 2
    assert stored["error"] == failed["error"] and stored["response"] is None
    if behaviour != "refused":
        assert len(fake.requests) == 3
    if behaviour == "hang":  # each timed-out request was dropped, not left open
        for request in fake.requests:
            await asyncio.wait_for(request.ended.wait(), 5)
            assert request.outcome == "client_left"


async def test_non_retryable_error_fails_at_once(droid_factory, session, fake):
    fake.mode = "error400"
    app = await droid_factory(**llm(fake, TASK_MAX_RETRIES=3))
    s = await session(app)
    task = await s.create()
    failed = await s.wait("task.failed", task["id"])
    assert failed["error"].startswith("LLM API returned HTTP 400")
    assert KEY not in failed["error"]
    assert failed["retryCount"] == 0
    assert s.story(task["id"]) == ["task.created", "task.processing", "task.failed"]
    assert len(fake.requests) == 1


async def test_a_retry_can_succeed(droid_factory, session, fake):
    fake.script("error503")
    app = await droid_factory(**llm(fake))
    s = await session(app)
    task = await s.create()
    done = await s.wait("task.completed", task["id"])
    assert done["response"] == DEFAULT_ANSWER
    assert s.story(task["id"]) == ["task.created", "task.processing", "task.pending",
                                   "task.processing", "task.completed"]
    stored = await s.task(task["id"])
    assert stored["retryCount"] == 1 and stored["error"] is None


async def test_zero_retries_fails_on_the_first_error(droid_factory, session, fake):
    fake.mode = "error500"
    app = await droid_factory(**llm(fake, TASK_MAX_RETRIES=0))
    s = await session(app)
    task = await s.create()
    failed = await s.wait("task.failed", task["id"])
    assert failed["retryCount"] == 0 and len(fake.requests) == 1


async def test_slow_event_publishing_loses_no_end_of_attempt(droid_factory, session, fake):
    # While an attempt publishes its own end, its guard sees the task move on: it must not take
    # that for a cancel and interrupt the publishing.
    app = await droid_factory(**llm(fake))
    s = await session(app)
    real = app.tasks.publisher

    class SlowPublisher:
        async def publish(self, user_id: str, envelope: dict) -> None:
            if envelope["event"] in ("task.pending", "task.completed"):
                await asyncio.sleep(0.3)  # a slow fan-out: a whole lease period
            await real.publish(user_id, envelope)

    app.tasks.publisher = SlowPublisher()
    fake.script("error500")
    task = await s.create()
    await s.wait("task.completed", task["id"])
    assert s.story(task["id"]) == ["task.created", "task.processing", "task.pending",
                                   "task.processing", "task.completed"]
    assert not app.worker.running


async def test_a_failing_progress_publish_does_not_fail_the_attempt(droid_factory, session, fake,
                                                                   caplog):
    app = await droid_factory(**llm(fake))
    s = await session(app)
    real = app.tasks.publisher

    class FlakyPublisher:
        async def publish(self, user_id: str, envelope: dict) -> None:
            if envelope["event"] == "task.progress":
                raise ConnectionError("event bus down")
            await real.publish(user_id, envelope)

    app.tasks.publisher = FlakyPublisher()
    task = await s.create()
    done = await s.wait("task.completed", task["id"])
    assert done["response"] == DEFAULT_ANSWER and not s.data("task.progress", task["id"])
    assert any("publishing task.progress" in r.getMessage() for r in caplog.records)


async def test_an_unexpected_provider_error_fails_the_attempt_and_is_logged(droid_factory,
                                                                           session, caplog):
    class BrokenProvider:
        name = "broken"

        async def run(self, **_: Any) -> Any:
            raise ZeroDivisionError("a bug")

        async def close(self) -> None:
            pass

    app = await droid_factory(BrokenProvider(), TASK_MAX_RETRIES=1)
    s = await session(app)
    task = await s.create()
    failed = await s.wait("task.failed", task["id"])
    assert failed["error"] == "Internal error while running the task"  # never str(exc)
    assert failed["retryCount"] == 1
    crashes = [r for r in caplog.records if r.getMessage().endswith("attempt crashed")]
    assert len(crashes) == 2 and crashes[0].exc_info[0] is ZeroDivisionError


# claiming --------------------------------------------------------------------------------------

async def test_tasks_are_claimed_by_priority_then_age(droid_factory, session, fake):
    idle = await droid_factory(**llm(fake, WORKER_CONCURRENCY=0))
    s = await session(idle)
    priorities = ["low", "normal", "urgent", "high", "normal", "low", "urgent", "high", "normal"]
    created = [await s.create(f"task {i} ({p})", priority=p) for i, p in enumerate(priorities)]
    assert fake.requests == []

    await droid_factory(**llm(fake, WORKER_CONCURRENCY=1))

    async def all_done() -> bool:
        return all([await _done(s, t["id"]) for t in created])

    await wait_until(all_done, timeout=10)
    rank = {"urgent": 0, "high": 1, "normal": 2, "low": 3}
    by_prompt = {t["prompt"]: t for t in created}
    claimed = [by_prompt[prompt_of(r)] for r in fake.requests]
    assert sorted(t["id"] for t in claimed) == sorted(t["id"] for t in created)
    # Most urgent first, oldest first within a priority (createdAt has millisecond precision:
    # two tasks created within the same millisecond may go either way).
    order = [(rank[t["priority"]], t["createdAt"]) for t in claimed]
    assert order == sorted(order)
    started = [(await s.task(t["id"]))["startedAt"] for t in claimed]
    assert started == sorted(started)


async def test_created_and_retried_tasks_start_without_waiting_for_a_poll(droid_factory, session,
                                                                          fake):
    app = await droid_factory(**llm(fake))
    s = await session(app)
    first = await s.create("first")
    await s.wait("task.completed", first["id"])
    # From now on only a wake-up can start a task within the test's timeouts.
    app.worker.poll_s = 600
    app.worker.reap_every_s = 600
    fake.script("error500")
    second = await s.create("second")
    await s.wait("task.completed", second["id"], timeout=3)
    assert s.story(second["id"]) == ["task.created", "task.processing", "task.pending",
                                     "task.processing", "task.completed"]


async def test_two_instances_never_run_the_same_attempt_twice(droid_factory, session, fake):
    fake.answer_for = lambda body: f"echo: {body['messages'][-1]['content']}"
    fake.chunk_delay_s = 0.002
    # A longer lease here: 8 attempts streaming at once keep the test's one event loop busy,
    # and this test is about claiming (leases have their own tests).
    env = llm(fake, WORKER_CONCURRENCY=4, DROID_LEASE_S=1)
    a, b = await droid_factory(**env), await droid_factory(**env)
    sa = await session(a)
    sb = await session(b, sa.user)
    count = 40
    tasks = [await (sa if i % 2 else sb).create(f"race {i}") for i in range(count)]

    async def all_done() -> bool:
        page = await sa.api.get("/tasks?status=completed&limit=100", token=sa.token)
        return len(page.body["items"]) == count

    await wait_until(all_done, timeout=20)
    requests = collections.Counter(prompt_of(r) for r in fake.requests)
    assert requests == collections.Counter(t["prompt"] for t in tasks)  # each exactly once
    for t in tasks:
        stored = await sa.task(t["id"])
        assert stored["response"] == f"echo: {t['prompt']}" and stored["retryCount"] == 0
    # Without Redis a socket hears its own instance's events, plus those of the other instance
    # that it finds in the event store when its seqs show a gap; never one twice.
    # (Those come late: each gap is waited for before the store is read.)
    def runs() -> list[list[str]]:
        return [[e["data"]["taskId"] for e in s.events.of("task.processing")] for s in (sa, sb)]

    async def all_heard() -> bool:
        return set(runs()[0]) | set(runs()[1]) == {t["id"] for t in tasks}

    await wait_until(all_heard, timeout=20)
    runs = runs()
    assert all(len(r) == len(set(r)) for r in runs)
    assert sa.events.of("task.processing") and sb.events.of("task.processing")
    assert not sa.events.of("task.pending") and not sb.events.of("task.pending")


# cancel ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("behaviour", ["hang", "slow_stream"])
async def test_cancel_stops_the_running_attempt(droid_factory, session, fake, behaviour):
    if behaviour == "hang":
        fake.script("hang")
    else:
        fake.script(Step("stream", answer=" ".join(["word"] * 200), chunk_delay_s=0.02))
    app = await droid_factory(**llm(fake))
    s = await session(app)
    task = await s.create("cancel me")
    if behaviour == "hang":
        await s.wait("task.processing", task["id"])
        await fake.wait_for_requests(1)
    else:
        await s.wait("task.progress", task["id"])

    cancelled = await s.cancel(task["id"])
    assert cancelled["status"] == "cancelled"
    await s.wait("task.cancelled", task["id"])
    (request,) = fake.requests
    await asyncio.wait_for(request.ended.wait(), 5)
    assert request.outcome == "client_left"
    await wait_until(lambda: _true(not app.worker.running))

    # A later task completes on the same worker; by then the cancelled one has long had its
    # chance to end wrongly.
    later = await s.create("after")
    await s.wait("task.completed", later["id"])
    assert s.story(task["id"]) == ["task.created", "task.processing", "task.cancelled"]
    stored = await s.task(task["id"])
    assert stored["status"] == "cancelled" and stored["response"] is None
    again = await s.api.post(f"/tasks/{task['id']}/cancel", token=s.token)
    assert again.status == 409


async def test_cancel_through_another_instance_stops_the_attempt(droid_factory, session, fake):
    fake.script("hang")
    runner = await droid_factory(**llm(fake, WORKER_CONCURRENCY=1))
    front = await droid_factory(**llm(fake, WORKER_CONCURRENCY=0))
    on_runner = await session(runner)
    on_front = await session(front, on_runner.user)
    task = await on_runner.create("cancel me elsewhere")
    await on_runner.wait("task.processing", task["id"])
    await fake.wait_for_requests(1)

    await on_front.cancel(task["id"])
    await on_front.wait("task.cancelled", task["id"])
    # The runner's guard polls the task, sees it cancelled and stops the LLM call.
    await asyncio.wait_for(fake.requests[0].ended.wait(), 5)
    assert fake.requests[0].outcome == "client_left"
    await wait_until(lambda: _true(not runner.worker.running))

    later = await on_runner.create("after")
    await on_runner.wait("task.completed", later["id"])
    # Nothing after the cancel; the runner's socket has the front's task.cancelled from the
    # event store (its later envelopes showed a gap in seq).
    assert on_runner.story(task["id"]) == ["task.created", "task.processing", "task.cancelled"]
    assert (await on_front.task(task["id"]))["status"] == "cancelled"


async def test_cancel_of_a_pending_task_means_it_never_runs(droid_factory, session, fake):
    idle = await droid_factory(**llm(fake, WORKER_CONCURRENCY=0))
    s = await session(idle)
    doomed = await s.create("never run me")
    kept = await s.create("run me")
    await s.cancel(doomed["id"])
    await droid_factory(**llm(fake, WORKER_CONCURRENCY=2))
    await wait_until(lambda: _done(s, kept["id"]))
    assert [prompt_of(r) for r in fake.requests] == ["run me"]
    assert (await s.task(doomed["id"]))["status"] == "cancelled"


# leases ----------------------------------------------------------------------------------------

async def test_task_of_a_dead_instance_is_taken_up_after_its_lease(droid_factory, session, fake):
    fake.script("hang")
    dead = await droid_factory(**llm(fake, WORKER_CONCURRENCY=1))
    s = await session(dead)
    task = await s.create("survive a crash")
    await s.wait("task.processing", task["id"])
    await fake.wait_for_requests(1)
    await kill_worker(dead)
    assert (await s.task(task["id"]))["status"] == "processing"
    seq = await s.last_seq()

    heir = await droid_factory(**llm(fake, WORKER_CONCURRENCY=1))
    h = await session(heir, s.user, replay_after=seq)
    done = await h.wait("task.completed", task["id"])
    assert done["response"] == DEFAULT_ANSWER
    assert h.story(task["id"]) == ["task.pending", "task.processing", "task.completed"]
    assert await h.stored_story(task["id"]) == [
        "task.created", "task.processing", "task.pending", "task.processing", "task.completed"]
    (lost,) = h.data("task.pending", task["id"])
    assert lost["error"] == LOST_WORKER and lost["retryCount"] == 1
    stored = await h.task(task["id"])
    assert stored["retryCount"] == 1 and stored["status"] == "completed"
    assert len(fake.requests) == 2


async def test_lost_attempt_with_no_retries_left_fails(droid_factory, session, fake, shared_store):
    idle = await droid_factory(**llm(fake, WORKER_CONCURRENCY=0, TASK_MAX_RETRIES=1))
    s = await session(idle)
    task = await s.create("lost twice")
    # What a process that died mid-attempt leaves behind, its last retry already used.
    past = utcnow() - dt.timedelta(seconds=5)
    claimed = await shared_store.claim_task(f"gone-{new_id()}", utcnow(), past)
    assert claimed is not None and claimed["_id"] == task["id"]
    await shared_store.update_attempt(task["id"], claimed["attempt"], {}, count_retry=True)
    seq = await s.last_seq()
    heir = await droid_factory(**llm(fake, WORKER_CONCURRENCY=1, TASK_MAX_RETRIES=1))
    h = await session(heir, s.user, replay_after=seq)
    failed = await h.wait("task.failed", task["id"])
    assert failed["error"] == LOST_WORKER and failed["retryCount"] == 1
    assert fake.requests == []


async def test_a_long_attempt_keeps_its_lease(droid_factory, session, fake):
    # The answer takes four lease periods; the other worker must not take it over. (Both are
    # started first: starting an instance blocks the test's event loop for a while, which a
    # real process running beside another would not.)
    fake.script(Step("stream", answer=" ".join(["slow"] * 12), chunk_delay_s=0.1))
    a = await droid_factory(**llm(fake, WORKER_CONCURRENCY=1))
    await droid_factory(**llm(fake, WORKER_CONCURRENCY=1))
    sa = await session(a)
    task = await sa.create("long one")
    await wait_until(lambda: _done(sa, task["id"]), timeout=10)  # whichever worker runs it
    assert (await sa.task(task["id"]))["response"] == " ".join(["slow"] * 12)
    assert len(fake.requests) == 1
    assert await sa.stored_story(task["id"]) == [
        "task.created", "task.processing", "task.completed"]


async def _true(value: Any) -> Any:
    return value


async def _done(s: Session, task_id: str) -> bool:
    return (await s.task(task_id))["status"] == "completed"
