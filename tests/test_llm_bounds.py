"""What an LLM API may send back and ask for (issue 22, finding 5), against the real fake LLM
server on loopback: answers bounded in bytes, bodies read with a bound, `max_tokens` when
configured, a 429's Retry-After honoured by the whole worker, no redirect to another origin."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio

from droid.tasks.agents import DEFAULT_AGENT_ID
from droid.tasks.llm import AgentError, OpenAIProvider
from tests.fake_llm import FakeLLM, Step

pytestmark = pytest.mark.asyncio
MIB = 1024 * 1024


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeLLM]:
    server = FakeLLM()
    await server.start()
    yield server
    await server.stop()


@pytest_asyncio.fixture
async def providers() -> AsyncIterator[Callable[..., OpenAIProvider]]:
    made: list[OpenAIProvider] = []

    def build(base_url: str, **kw) -> OpenAIProvider:
        kw.setdefault("timeout_s", 20.0)
        provider = OpenAIProvider(base_url, None, "m", **kw)
        made.append(provider)
        return provider

    yield build
    for provider in made:
        await provider.close()


async def nothing(delta: str) -> None:
    pass


async def failure(provider: OpenAIProvider) -> AgentError:
    with pytest.raises(AgentError) as caught:
        await provider.run(model="", system_prompt="", prompt="hi", on_delta=nothing)
    return caught.value


async def test_a_streamed_answer_longer_than_the_bound_fails_and_is_not_read_on(
        fake: FakeLLM, providers) -> None:
    fake.script(Step("stream_big", size=50 * MIB))
    error = await failure(providers(fake.base_url, max_answer_bytes=256 * 1024))
    assert error.message == ("The LLM's answer is longer than 262144 bytes "
                             "(LLM_MAX_ANSWER_BYTES)")
    assert not error.retryable
    (request,) = fake.requests
    await asyncio.wait_for(request.ended.wait(), 10)
    # It hung up: the fake stopped writing a little past the bound (socket buffers), not at 50 MB.
    assert request.outcome == "client_left" and request.sent_bytes < 8 * MIB


async def test_a_200_mb_json_body_is_not_read_whole(fake: FakeLLM, providers) -> None:
    fake.script(Step("json_big", size=200 * MIB))
    error = await failure(providers(fake.base_url, max_answer_bytes=64 * 1024))
    assert error.message == ("The LLM API sent the answer's body larger than 327680 bytes "
                             "(4 x LLM_MAX_ANSWER_BYTES + 64 KiB); not read further")
    assert not error.retryable
    (request,) = fake.requests
    await asyncio.wait_for(request.ended.wait(), 10)
    assert request.sent_bytes < 16 * MIB


async def test_max_tokens_is_sent_only_when_configured(fake: FakeLLM, providers) -> None:
    await providers(fake.base_url).run(model="", system_prompt="", prompt="hi", on_delta=nothing)
    await providers(fake.base_url, max_tokens=50).run(model="", system_prompt="", prompt="hi",
                                                      on_delta=nothing)
    first, second = fake.requests
    assert "max_tokens" not in first.body and second.body["max_tokens"] == 50


async def test_a_redirect_to_another_origin_is_not_followed(fake: FakeLLM, providers) -> None:
    async with FakeLLM() as elsewhere:
        fake.script(Step("redirect", location=elsewhere.base_url + "/chat/completions"))
        error = await failure(providers(fake.base_url))
        assert error.message == (f"The LLM API at {fake.base_url} redirected the request to "
                                 f"another origin (http://127.0.0.1:{elsewhere.port}); Droid "
                                 "does not follow it")
        assert not error.retryable
        assert elsewhere.requests == []  # the prompt never went there
    # Within the same origin a redirect is still followed.
    fake.script(Step("redirect", location="/v1/chat/completions"), "stream")
    result = await providers(fake.base_url).run(model="", system_prompt="", prompt="again",
                                                on_delta=nothing)
    assert result.response and fake.requests[-1].body["messages"][-1]["content"] == "again"


async def test_a_429_retry_after_holds_every_task_pending_until_then(fake: FakeLLM,
                                                                     droid_factory) -> None:
    """The attempt that got the 429 goes back to pending until Retry-After, and no other task
    is sent to the LLM meanwhile: they wait as pending too."""
    fake.script(Step("error429", headers={"Retry-After": "2"}))
    app = await droid_factory(LLM_BASE_URL=fake.base_url, LLM_MODEL="m", WORKER_CONCURRENCY=2)
    first, _ = await app.tasks.create("user-1", agent_id=DEFAULT_AGENT_ID, prompt="one")
    (refused,) = await fake.wait_for_requests(1)
    await asyncio.wait_for(refused.ended.wait(), 5)
    second, _ = await app.tasks.create("user-1", agent_id=DEFAULT_AGENT_ID, prompt="two")

    async def done(task_id: str) -> dict:
        while (await app.tasks.get("user-1", task_id))["status"] != "completed":
            await asyncio.sleep(0.05)
        return await app.tasks.get("user-1", task_id)

    one, two = await asyncio.wait_for(asyncio.gather(done(first["id"]), done(second["id"])), 15)
    assert one["retryCount"] == 1 and two["retryCount"] == 0
    later = fake.requests[1:]
    assert len(later) == 2
    assert min(r.at for r in later) - refused.at >= 1.9  # nothing reached the LLM before


async def test_a_retry_after_longer_than_the_maximum_fails_the_task(fake: FakeLLM,
                                                                   droid_factory) -> None:
    fake.script(Step("error429", headers={"Retry-After": "3600"}))
    app = await droid_factory(LLM_BASE_URL=fake.base_url, LLM_MODEL="m",
                              LLM_RETRY_AFTER_MAX_S=600)
    task, _ = await app.tasks.create("user-1", agent_id=DEFAULT_AGENT_ID, prompt="one")

    async def failed() -> dict:
        while (found := await app.tasks.get("user-1", task["id"]))["status"] != "failed":
            await asyncio.sleep(0.05)
        return found

    found = await asyncio.wait_for(failed(), 10)
    assert found["retryCount"] == 0 and len(fake.requests) == 1
    assert found["error"].startswith("LLM API returned HTTP 429")
    assert found["error"].endswith("(it asked to wait 3600 s, more than LLM_RETRY_AFTER_MAX_S, "
                                   "600 s)")


async def test_an_answer_over_the_bound_fails_the_task_through_droid(fake: FakeLLM,
                                                                    droid_factory) -> None:
    fake.script(Step("stream_big", size=50 * MIB))
    app = await droid_factory(LLM_BASE_URL=fake.base_url, LLM_MODEL="m",
                              LLM_MAX_ANSWER_BYTES=65536)
    task, _ = await app.tasks.create("user-1", agent_id=DEFAULT_AGENT_ID, prompt="long")

    async def failed() -> dict:
        while (found := await app.tasks.get("user-1", task["id"]))["status"] != "failed":
            await asyncio.sleep(0.05)
        return found

    found = await asyncio.wait_for(failed(), 10)
    assert found["response"] is None and found["retryCount"] == 0
    assert found["error"] == "The LLM's answer is longer than 65536 bytes (LLM_MAX_ANSWER_BYTES)"
    assert len(fake.requests) == 1 and fake.requests[0].sent_bytes < 8 * MIB
