"""droid.llm: the demo agent, and the OpenAI-compatible provider against a real fake server."""
from __future__ import annotations

import ast
import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

import droid.tasks.llm
from droid.tasks.agents import DEFAULT_AGENT_ID
from droid.tasks.llm import (
    AgentError,
    AgentResult,
    DemoProvider,
    OpenAIProvider,
    estimate_tokens,
    make_provider,
)
from tests.fake_llm import DEFAULT_ANSWER, FakeLLM, Step, refused_url, split_answer

KEY = "sk-secret-XYZ"


class Deltas:
    """An on_delta callback that records what it is given."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.arrived = asyncio.Event()

    async def __call__(self, delta: str) -> None:
        self.items.append(delta)
        self.arrived.set()


@pytest.fixture(autouse=True)
def no_error_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Nothing here may log an error, Tornado included (e.g. for an aborted response)."""
    yield
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeLLM]:
    server = FakeLLM()
    await server.start()
    yield server
    await server.stop()


@pytest_asyncio.fixture
async def providers() -> AsyncIterator[Callable[..., OpenAIProvider]]:
    """Build OpenAIProviders that are closed after the test."""
    made: list[OpenAIProvider] = []

    def build(base_url: str, api_key: str | None = None, model: str | None = "default-model",
              timeout_s: float = 5.0, stream: bool = True) -> OpenAIProvider:
        provider = OpenAIProvider(base_url, api_key, model, timeout_s=timeout_s, stream=stream)
        made.append(provider)
        return provider

    yield build
    for provider in made:
        await provider.close()


async def ask(provider: OpenAIProvider | DemoProvider, prompt: str = "Say hello",
              model: str = "", system_prompt: str = "You are terse.",
              on_delta: Deltas | None = None) -> AgentResult:
    return await provider.run(model=model, system_prompt=system_prompt, prompt=prompt,
                              on_delta=on_delta or Deltas())


async def failure(provider: OpenAIProvider, **kwargs: object) -> AgentError:
    with pytest.raises(AgentError) as caught:
        await ask(provider, **kwargs)  # type: ignore[arg-type]
    return caught.value


# Demo agent ------------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_demo_says_it_is_the_demo_agent_and_quotes_the_prompt() -> None:
    deltas = Deltas()
    result = await ask(DemoProvider(delay_s=0), prompt="What is the capital of France?",
                       on_delta=deltas)
    assert "Droid's built-in demo agent" in result.response
    assert "no LLM is configured" in result.response
    assert "«What is the capital of France?»" in result.response
    assert len(deltas.items) > 1
    assert "".join(deltas.items) == result.response


@pytest.mark.asyncio
async def test_demo_tokens_follow_the_stated_rule() -> None:
    prompt = "x" * 101
    result = await ask(DemoProvider(delay_s=0), prompt=prompt)
    assert result.tokens_used == math.ceil(101 / 4) + math.ceil(len(result.response) / 4)
    assert result.tokens_used == estimate_tokens(prompt, result.response)


@pytest.mark.asyncio
async def test_demo_quotes_only_the_first_200_characters() -> None:
    prompt = "a" * 200 + "b" * 50
    result = await ask(DemoProvider(delay_s=0), prompt=prompt)
    assert "«" + "a" * 200 + "…»" in result.response
    assert "b" not in result.response.split("«")[1].split("»")[0]


@pytest.mark.asyncio
@pytest.mark.parametrize("prompt", [
    "Olá, como você está? 日本語のテキスト 🚀🤖 עברית",
    "z" * 32_000,
    "line one\nline two\r\n\ttabbed \x00 nul",
    "lone surrogate \ud800 here",
    "",
    "   ",
], ids=["unicode", "32000-chars", "control-chars", "lone-surrogate", "empty", "blank"])
async def test_demo_never_fails(prompt: str) -> None:
    deltas = Deltas()
    result = await DemoProvider(delay_s=0).run(model="", system_prompt="", prompt=prompt,
                                               on_delta=deltas)
    assert result.response.startswith("This is Droid's built-in demo agent")
    assert "".join(deltas.items) == result.response
    result.response.encode("utf-8")  # publishable as JSON
    assert result.tokens_used == estimate_tokens(prompt, result.response)


@pytest.mark.asyncio
async def test_demo_spreads_its_pieces_over_the_delay() -> None:
    deltas = Deltas()
    started = time.monotonic()
    await ask(DemoProvider(delay_s=0.2), on_delta=deltas)
    elapsed = time.monotonic() - started
    assert 0.18 <= elapsed < 1.5
    assert len(deltas.items) > 1


@pytest.mark.asyncio
async def test_demo_with_zero_delay_never_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_sleep(delay: float, result: object = None) -> None:
        raise AssertionError("the demo slept with delay_s=0")

    monkeypatch.setattr("droid.tasks.llm.asyncio.sleep", no_sleep)
    deltas = Deltas()
    await ask(DemoProvider(delay_s=0), on_delta=deltas)
    assert len(deltas.items) > 1


@pytest.mark.asyncio
async def test_make_provider_picks_by_base_url() -> None:
    demo = make_provider(base_url=None, api_key=None, model=None, timeout_s=1, demo_delay_s=0.5)
    assert isinstance(demo, DemoProvider)
    assert demo.name == "demo"
    assert demo.delay_s == 0.5
    real = make_provider(base_url="http://127.0.0.1:9/v1/", api_key=KEY, model="m",
                         timeout_s=7, demo_delay_s=0)
    assert isinstance(real, OpenAIProvider)
    assert real.name == "openai"
    assert real.url == "http://127.0.0.1:9/v1/chat/completions"
    assert real.timeout_s == 7
    assert KEY not in repr(real)
    await real.close()
    await demo.close()


# OpenAI-compatible provider: answers ----------------------------------------------------------

@pytest.mark.asyncio
async def test_plain_json_answer_with_tokens_from_usage(fake: FakeLLM, providers) -> None:
    deltas = Deltas()
    result = await ask(providers(fake.base_url, stream=False), prompt="Say hello",
                       on_delta=deltas)
    assert result == AgentResult(response=DEFAULT_ANSWER, tokens_used=28)
    assert deltas.items == [DEFAULT_ANSWER]
    (request,) = fake.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["Content-Type"] == "application/json"
    assert request.body == {
        "model": "default-model", "stream": False,
        "messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "Say hello"}],
    }


@pytest.mark.asyncio
async def test_streaming_deltas_arrive_in_order_with_usage(fake: FakeLLM, providers) -> None:
    fake.answer = "One two three four five six seven."
    deltas = Deltas()
    result = await ask(providers(fake.base_url), on_delta=deltas)
    assert deltas.items == split_answer(fake.answer)
    assert len(deltas.items) == 7
    assert result == AgentResult(response=fake.answer, tokens_used=28)
    body = fake.requests[0].body
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


@pytest.mark.asyncio
async def test_stream_arrives_piece_by_piece(fake: FakeLLM, providers) -> None:
    fake.script(Step("stream", answer="slow and steady wins", chunk_delay_s=0.05))
    deltas = Deltas()
    task = asyncio.ensure_future(ask(providers(fake.base_url), on_delta=deltas))
    await asyncio.wait_for(deltas.arrived.wait(), 5)
    assert not task.done()  # the first piece came before the answer was complete
    result = await task
    assert result.response == "slow and steady wins"
    assert deltas.items == ["slow ", "and ", "steady ", "wins"]


@pytest.mark.asyncio
async def test_stream_without_usage_estimates_tokens(fake: FakeLLM, providers) -> None:
    fake.script("stream_no_usage")
    result = await ask(providers(fake.base_url), prompt="p" * 40)
    assert result.response == DEFAULT_ANSWER
    assert result.tokens_used == 10 + math.ceil(len(DEFAULT_ANSWER) / 4)


@pytest.mark.asyncio
async def test_stream_ending_without_done_is_accepted(fake: FakeLLM, providers) -> None:
    fake.script("stream_no_done")
    result = await ask(providers(fake.base_url))
    assert result == AgentResult(response=DEFAULT_ANSWER, tokens_used=28)


@pytest.mark.asyncio
async def test_json_reply_to_a_streaming_request_is_read(fake: FakeLLM, providers) -> None:
    fake.script(Step("ok", usage={"prompt_tokens": 3, "completion_tokens": 4}))
    deltas = Deltas()
    result = await ask(providers(fake.base_url), on_delta=deltas)
    assert result == AgentResult(response=DEFAULT_ANSWER, tokens_used=7)
    assert deltas.items == [DEFAULT_ANSWER]


@pytest.mark.asyncio
async def test_unicode_survives_the_stream(fake: FakeLLM, providers) -> None:
    answer = "Olá 🚀 日本語 — ok"
    fake.script(Step("stream", answer=answer))
    result = await ask(providers(fake.base_url), prompt="Ünïcødé? 🤖")
    assert result.response == answer
    assert fake.requests[0].body["messages"][1]["content"] == "Ünïcødé? 🤖"


@pytest.mark.asyncio
async def test_empty_system_prompt_sends_only_the_user_message(fake: FakeLLM, providers) -> None:
    await ask(providers(fake.base_url), system_prompt="", prompt="hi")
    assert fake.requests[0].body["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.asyncio
async def test_agent_model_overrides_the_default(fake: FakeLLM, providers) -> None:
    provider = providers(fake.base_url, model="default-model")
    await ask(provider, model="agent-model")
    await ask(provider, model="")
    assert [r.body["model"] for r in fake.requests] == ["agent-model", "default-model"]


@pytest.mark.asyncio
async def test_no_model_anywhere_is_not_retryable(fake: FakeLLM, providers) -> None:
    error = await failure(providers(fake.base_url, model=None), model="")
    assert not error.retryable
    assert "model" in error.message
    assert fake.requests == []


@pytest.mark.asyncio
async def test_authorization_header_is_sent_only_with_a_key(fake: FakeLLM, providers) -> None:
    await ask(providers(fake.base_url, api_key=KEY))
    await ask(providers(fake.base_url, api_key=None))
    with_key, without_key = fake.requests
    assert with_key.headers["Authorization"] == f"Bearer {KEY}"
    assert "Authorization" not in without_key.headers


@pytest.mark.asyncio
async def test_base_url_may_end_with_a_slash_or_the_endpoint(fake: FakeLLM, providers) -> None:
    await ask(providers(fake.base_url + "/"))
    await ask(providers(fake.base_url + "/chat/completions"))
    assert [r.path for r in fake.requests] == ["/v1/chat/completions"] * 2


# OpenAI-compatible provider: errors -----------------------------------------------------------

@pytest.mark.asyncio
async def test_http_500_is_retryable_and_names_the_status(fake: FakeLLM, providers) -> None:
    fake.script("error500")
    error = await failure(providers(fake.base_url, api_key=KEY))
    assert error.retryable
    assert error.message.startswith("LLM API returned HTTP 500: Fake failure 500")
    assert "Bearer [redacted]" in error.message  # the fake echoed the header back
    assert KEY not in error.message


@pytest.mark.asyncio
async def test_http_429_is_retryable(fake: FakeLLM, providers) -> None:
    fake.script("error429")
    error = await failure(providers(fake.base_url))
    assert error.retryable
    assert "HTTP 429" in error.message


@pytest.mark.asyncio
async def test_http_400_is_not_retryable(fake: FakeLLM, providers) -> None:
    fake.script(Step("error400", answer="Invalid model 'nope'"))
    error = await failure(providers(fake.base_url))
    assert not error.retryable
    assert error.message == "LLM API returned HTTP 400: Invalid model 'nope'"


@pytest.mark.asyncio
@pytest.mark.parametrize(("status", "retryable"), [
    (401, False), (403, False), (404, False), (422, False),
    (408, True), (409, True), (502, True), (503, True),
])
async def test_status_decides_retry(fake: FakeLLM, providers, status: int,
                                    retryable: bool) -> None:
    fake.script(f"error{status}")
    error = await failure(providers(fake.base_url))
    assert error.retryable is retryable
    assert f"HTTP {status}" in error.message


@pytest.mark.asyncio
async def test_error_detail_is_short_and_on_one_line(fake: FakeLLM, providers) -> None:
    fake.script(Step("error500", answer="first line\nsecond\tline " + "x" * 1000))
    error = await failure(providers(fake.base_url))
    detail = error.message.removeprefix("LLM API returned HTTP 500: ")
    assert detail.startswith("first line second line xxx")
    assert len(detail) <= 200
    assert detail.endswith("…")


@pytest.mark.asyncio
async def test_hanging_server_times_out(fake: FakeLLM, providers) -> None:
    fake.script("hang")
    started = time.monotonic()
    error = await failure(providers(fake.base_url, timeout_s=0.3))
    assert time.monotonic() - started < 3
    assert error.retryable
    assert error.message == "LLM API timed out after 0.3s"
    (request,) = fake.requests
    await asyncio.wait_for(request.ended.wait(), 5)
    assert request.outcome == "client_left"


@pytest.mark.asyncio
async def test_timeout_covers_a_stream_that_stalls(fake: FakeLLM, providers) -> None:
    fake.script("stream_hang")
    deltas = Deltas()
    error = await failure(providers(fake.base_url, timeout_s=0.3), on_delta=deltas)
    assert error.retryable
    assert "timed out" in error.message
    assert deltas.items == [split_answer(DEFAULT_ANSWER)[0]]


@pytest.mark.asyncio
@pytest.mark.parametrize(("behaviour", "stream"), [
    ("malformed", True), ("malformed", False), ("no_choices", False), ("html", True),
    ("stream_malformed", True), ("stream_empty", True),
])
async def test_malformed_answer_is_retryable(fake: FakeLLM, providers, behaviour: str,
                                             stream: bool) -> None:
    fake.script(behaviour)
    error = await failure(providers(fake.base_url, stream=stream))
    assert error.retryable
    assert error.message.startswith("LLM returned a malformed response")


@pytest.mark.asyncio
async def test_error_event_in_the_stream_is_retryable(fake: FakeLLM, providers) -> None:
    fake.script("stream_error")
    error = await failure(providers(fake.base_url))
    assert error.retryable
    assert error.message == "LLM API reported an error: Fake stream failure"


@pytest.mark.asyncio
async def test_refused_connection_is_retryable() -> None:
    url = refused_url()
    provider = OpenAIProvider(url, KEY, "m", timeout_s=5)
    try:
        error = await failure(provider)
    finally:
        await provider.close()
    assert error.retryable
    assert error.message.startswith(f"Could not connect to the LLM API at {url}")


@pytest.mark.asyncio
async def test_untrusted_tls_certificate_is_not_retryable() -> None:
    async with FakeLLM(tls=True) as server:
        provider = OpenAIProvider(server.base_url, KEY, "m", timeout_s=5)
        try:
            error = await failure(provider)
        finally:
            await provider.close()
    assert not error.retryable
    assert error.message == (f"Could not connect to the LLM API at {server.base_url}: "
                             "TLS certificate verification failed")
    assert server.requests == []


@pytest.mark.asyncio
@pytest.mark.parametrize("behaviour", ["reset", "stream_cut"])
async def test_connection_dropped_by_the_server_is_retryable(fake: FakeLLM, providers,
                                                             behaviour: str) -> None:
    fake.script(behaviour)
    error = await failure(providers(fake.base_url))
    assert error.retryable
    assert "closed the connection" in error.message


@pytest.mark.asyncio
@pytest.mark.parametrize("behaviour", [
    "error500", "error429", "error400", "error401", "hang", "malformed", "no_choices",
    "stream_malformed", "stream_empty", "stream_error", "reset", "stream_cut",
    Step("error400", answer=f"key {KEY} is not valid"),
    Step("error503", answer=f"Authorization: Bearer {KEY}"),
], ids=str)
async def test_key_never_appears_in_an_error(fake: FakeLLM, providers,
                                             behaviour: str | Step) -> None:
    fake.script(behaviour)
    error = await failure(providers(fake.base_url, api_key=KEY, timeout_s=0.3))
    for text in (error.message, str(error), repr(error)):
        assert KEY not in text
        assert "XYZ" not in text


@pytest.mark.asyncio
async def test_on_delta_failure_is_not_disguised(fake: FakeLLM, providers) -> None:
    async def broken(delta: str) -> None:
        raise RuntimeError("publisher down")

    with pytest.raises(RuntimeError, match="publisher down"):
        await providers(fake.base_url).run(model="", system_prompt="", prompt="hi",
                                           on_delta=broken)


@pytest.mark.asyncio
async def test_cancel_mid_stream_drops_the_request(fake: FakeLLM, providers) -> None:
    fake.script(Step("stream", answer="a b c d e f g h i j k l m n o p", chunk_delay_s=0.05))
    deltas = Deltas()
    task = asyncio.ensure_future(ask(providers(fake.base_url), on_delta=deltas))
    await asyncio.wait_for(deltas.arrived.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    seen = len(deltas.items)
    (request,) = fake.requests
    await asyncio.wait_for(request.ended.wait(), 5)
    assert request.outcome == "client_left"
    assert len(deltas.items) == seen < 16


@pytest.mark.asyncio
async def test_cancel_while_waiting_logs_nothing(fake: FakeLLM, providers) -> None:
    fake.script("hang")
    task = asyncio.ensure_future(ask(providers(fake.base_url)))
    await fake.wait_for_requests(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await fake.stop()  # ends the abandoned request
    await asyncio.wait_for(fake.requests[0].ended.wait(), 5)


@pytest.mark.asyncio
async def test_repr_and_close(fake: FakeLLM) -> None:
    provider = OpenAIProvider(fake.base_url, KEY, "m")
    assert KEY not in repr(provider)
    assert "key=set" in repr(provider)
    await provider.close()  # before any request
    await ask(provider)
    await provider.close()
    await provider.close()


# OpenAI-compatible provider: connections, the SDK, and what it may not do ----------------------

@pytest.mark.asyncio
@pytest.mark.parametrize("behaviour", ["hang", "stream_hang"])
async def test_cancel_closes_the_connection_within_a_second(fake: FakeLLM, providers,
                                                            behaviour: str) -> None:
    """Before the first byte or mid-stream: the server learns at once that nobody waits."""
    fake.script(behaviour)
    deltas = Deltas()
    task = asyncio.ensure_future(ask(providers(fake.base_url, timeout_s=30), on_delta=deltas))
    (request,) = await fake.wait_for_requests(1)
    if behaviour == "stream_hang":
        await asyncio.wait_for(deltas.arrived.wait(), 5)
    assert not request.disconnected
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await fake.wait_until(lambda: request.disconnected, timeout_s=1.0)
    await asyncio.wait_for(request.ended.wait(), 1.0)
    assert request.outcome == "client_left"


@pytest.mark.asyncio
async def test_cancelling_a_task_closes_its_llm_connection_within_a_second(
        fake: FakeLLM, droid_factory) -> None:
    """The same through the worker: a user's cancel cancels the attempt's task."""
    fake.script("hang")
    app = await droid_factory(LLM_BASE_URL=fake.base_url, LLM_MODEL="m", LLM_TIMEOUT_S=30,
                              TASK_TIMEOUT_S=30, WORKER_CONCURRENCY=1)
    task, _ = await app.tasks.create("user-1", agent_id=DEFAULT_AGENT_ID, prompt="cancel me")
    (request,) = await fake.wait_for_requests(1)
    assert not request.disconnected
    await app.tasks.cancel("user-1", task["id"])
    await fake.wait_until(lambda: request.disconnected, timeout_s=1.0)


@pytest.mark.asyncio
async def test_timeout_bounds_the_whole_request(fake: FakeLLM, providers) -> None:
    """LLM_TIMEOUT_S is for the whole answer, not for each read: a trickle cannot outlive it."""
    fake.script(Step("stream", answer="a b c d e f g h i j k l m n o p", chunk_delay_s=0.1))
    deltas = Deltas()
    error = await failure(providers(fake.base_url, timeout_s=0.5), on_delta=deltas)
    assert error.message == "LLM API timed out after 0.5s"
    assert error.retryable
    assert 0 < len(deltas.items) < 16
    (request,) = fake.requests
    await fake.wait_until(lambda: request.disconnected, timeout_s=1.0)
    await asyncio.wait_for(request.ended.wait(), 5)
    assert request.outcome == "client_left"


@pytest.mark.asyncio
async def test_close_closes_the_kept_alive_connection(fake: FakeLLM) -> None:
    provider = OpenAIProvider(fake.base_url, KEY, "m")
    await ask(provider)
    await ask(provider)
    assert fake.open_connections == 1  # one connection, kept alive and reused
    await provider.close()
    await fake.wait_until(lambda: fake.open_connections == 0, timeout_s=1.0)


@pytest.mark.asyncio
async def test_stopping_droid_closes_the_llm_client(fake: FakeLLM, droid_factory) -> None:
    app = await droid_factory(LLM_BASE_URL=fake.base_url, LLM_MODEL="m", LLM_API_KEY=KEY,
                              WORKER_CONCURRENCY=1)
    provider = app.worker.provider
    assert isinstance(provider, OpenAIProvider)
    await ask(provider)
    assert fake.open_connections == 1
    await app.stop()
    await fake.wait_until(lambda: fake.open_connections == 0, timeout_s=1.0)


@pytest.mark.asyncio
async def test_sdk_environment_variables_are_not_used(fake: FakeLLM, providers,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Droid reads its own configuration only: an OPENAI_API_KEY meant for OpenAI must never be
    sent to the configured server, and OPENAI_BASE_URL must not redirect the requests."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    monkeypatch.setenv("OPENAI_BASE_URL", refused_url())
    await ask(providers(fake.base_url, api_key=None))
    (request,) = fake.requests
    assert "Authorization" not in request.headers
    assert "sk-from-the-environment" not in str(request.headers)


@pytest.mark.asyncio
async def test_requests_are_not_logged_with_their_url(fake: FakeLLM, providers,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """The SDK's HTTP library would log each request's URL at INFO; Droid keeps it quiet."""
    caplog.set_level(logging.INFO)
    await ask(providers(fake.base_url, api_key=KEY))
    fake.script("error401")
    await failure(providers(fake.base_url, api_key=KEY))
    logged = [r for r in caplog.records if not r.name.startswith("tornado")]
    assert logged == []


@pytest.mark.asyncio
async def test_the_sdk_does_not_retry(fake: FakeLLM, providers) -> None:
    """The worker owns retries and backoff; one attempt is one request."""
    fake.script("error503", "error429", "reset")
    for _ in range(3):
        assert (await failure(providers(fake.base_url))).retryable
    assert len(fake.requests) == 3


def test_llm_imports_nothing_private() -> None:
    """droid/tasks/llm.py uses Tornado and the openai SDK through their public names only."""
    tree = ast.parse(Path(droid.tasks.llm.__file__).read_text(encoding="utf-8"))
    private: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] in ("tornado", "openai", "httpx", "httpx2", "httpcore") and any(
                    part.startswith("_") for part in parts):
                private.append(name)
    assert private == []
    # ... and reaches into no private attribute of them either (`openai._client`, `x._send`).
    attributes = {node.attr for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id in ("openai", "tornado")}
    assert {a for a in attributes if a.startswith("_")} == set()
