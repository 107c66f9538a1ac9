"""LLM providers: the built-in demo agent and any OpenAI-compatible chat-completions API.

A provider turns one prompt into one answer. It writes the answer piece by piece through an
`on_delta` coroutine (the worker publishes each piece as `task.progress`) and returns the whole
answer with a token count. The concatenation of the pieces is always the final answer.

Every failure is an `AgentError` whose `message` is safe to show the task's owner: it never holds
the API key or the Authorization header, and `retryable` says whether another attempt may succeed.

The OpenAI-compatible provider is the `openai` package's `AsyncOpenAI` client, through its public
API only; what this module adds is the mapping of its errors and of `usage`, the bounds of an
answer (LLM_MAX_ANSWER_BYTES, `max_tokens` when LLM_MAX_TOKENS is set), a 429's Retry-After
(`ready_in()`: no request before it), and the HTTP client of droid/tasks/llm_http.py under the SDK
(bounded bodies, no redirect to another origin). The package is
imported when such a provider is built, so the demo agent does not pay for it (about 30 MB and
0.7 s at start-up). This module knows nothing of the web layer, Socket.IO or the database.
Prompts and keys are never logged.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import orjson

if TYPE_CHECKING:
    from openai import AsyncOpenAI

log = logging.getLogger(__name__)

OnDelta = Callable[[str], Awaitable[None]]

MALFORMED = "LLM returned a malformed response"
MAX_ANSWER_BYTES = 1024 * 1024  # LLM_MAX_ANSWER_BYTES's default
_BODY_SLACK = 64 * 1024  # a body or an event may hold this much besides 4 x the answer (escapes)
_DETAIL_MAX = 200
_REDACTED = "[redacted]"
# Keys shorter than this are not secrets worth scrubbing, and replacing a one- or two-letter
# "key" (Ollama accepts anything) everywhere would garble every message.
_MIN_SCRUB_LEN = 4
_BEARER_RE = re.compile(r"(?i)\b(bearer)\s+[^\s\"',;}]+")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")
_WORD_RE = re.compile(r"\S+\s*|\s+")


class AgentError(Exception):
    """An attempt failed. `message` is user-visible; `retryable` says whether to try again, and
    `retry_after_s`, when the LLM API said so (a 429's Retry-After), not before how long."""

    def __init__(self, message: str, *, retryable: bool,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.retry_after_s = retry_after_s

    def __repr__(self) -> str:
        return f"AgentError({self.message!r}, retryable={self.retryable})"


@dataclasses.dataclass(frozen=True)
class AgentResult:
    response: str
    tokens_used: int


class Provider(Protocol):
    """What the worker needs from a provider."""

    name: str

    async def run(self, *, model: str, system_prompt: str, prompt: str,
                  on_delta: OnDelta) -> AgentResult: ...

    async def close(self) -> None: ...


def estimate_tokens(prompt: str, response: str) -> int:
    """The rule used when no count is reported: ceil(len(prompt)/4) + ceil(len(response)/4)."""
    return math.ceil(len(prompt) / 4) + math.ceil(len(response) / 4)


def _split_pieces(text: str, pieces: int) -> list[str]:
    """Split `text` at word boundaries into at most `pieces` non-empty parts that join to it."""
    words = _WORD_RE.findall(text)
    count = len(words)
    n = max(1, min(pieces, count))
    cuts = [i * count // n for i in range(n + 1)]
    return [piece for piece in ("".join(words[cuts[i]:cuts[i + 1]]) for i in range(n)) if piece]


def _printable(text: str) -> str:
    """Text that always encodes to UTF-8: a lone surrogate (possible from JSON) becomes U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class DemoProvider:
    """Droid's built-in demo agent: answers locally, with no LLM and no network.

    The answer says plainly that it comes from the demo agent and quotes the start of the
    prompt. It is written in several pieces through `on_delta`, spread evenly over `delay_s`
    seconds (0 emits the same pieces without sleeping).

    Tokens used: ceil(len(prompt) / 4) + ceil(len(response) / 4), lengths in characters.
    """

    name = "demo"
    _PIECES = 8
    _QUOTE_MAX = 200

    def __init__(self, delay_s: float = 1.5) -> None:
        self.delay_s = max(0.0, delay_s)

    def __repr__(self) -> str:
        return f"DemoProvider(delay_s={self.delay_s:g})"

    def compose(self, *, model: str, system_prompt: str, prompt: str) -> str:
        """The demo answer for a prompt; never raises."""
        quote = " ".join(_printable(prompt[: self._QUOTE_MAX]).split())
        if len(prompt) > self._QUOTE_MAX:
            quote += "…"
        asked = f"You asked: «{quote}»." if quote else "You sent an empty prompt."
        persona = (" The agent's system prompt was noted, but a demo agent cannot follow it."
                   if system_prompt.strip() else "")
        return (
            "This is Droid's built-in demo agent (no LLM is configured). "
            f"{asked} Your prompt is {len(prompt):,} characters long.{persona} "
            "To get real answers, set LLM_BASE_URL (and LLM_API_KEY and LLM_MODEL if needed) "
            "to any OpenAI-compatible chat-completions API, such as OpenAI, Ollama, vLLM "
            "or a llama.cpp server, and restart Droid."
        )

    async def run(self, *, model: str, system_prompt: str, prompt: str,
                  on_delta: OnDelta) -> AgentResult:
        """Write the demo answer through `on_delta` and return it. Raises nothing of its own."""
        response = self.compose(model=model, system_prompt=system_prompt, prompt=prompt)
        pieces = _split_pieces(response, self._PIECES)
        pause = self.delay_s / len(pieces)
        for piece in pieces:
            if pause > 0:
                await asyncio.sleep(pause)
            await on_delta(piece)
        return AgentResult(response=response, tokens_used=estimate_tokens(prompt, response))

    async def close(self) -> None:
        """Nothing to release; here so every provider can be closed alike."""


def _display_url(url: str) -> str:
    """`url` without credentials, query or fragment: safe for a message or a log line."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "the configured URL"
    return f"{parts.scheme}://{host}{port}{parts.path}".rstrip("/")


def _field(obj: Any, name: str) -> Any:
    """`obj[name]` or `obj.name`, else None: the SDK builds its models from whatever the server
    sent without validating them, and a JSON answer is read as plain dicts."""
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _usage_tokens(usage: Any) -> int | None:
    """`usage.total_tokens`, else prompt + completion tokens, else None."""
    total = _int_or_none(_field(usage, "total_tokens"))
    if total is not None:
        return total
    prompt = _int_or_none(_field(usage, "prompt_tokens"))
    completion = _int_or_none(_field(usage, "completion_tokens"))
    if prompt is not None and completion is not None:
        return prompt + completion
    return None


def _error_text(obj: Any) -> str:
    """The human part of an error body: OpenAI `{error: {message}}`, Ollama `{error: "…"}`, …"""
    if isinstance(obj, dict):
        for key in ("error", "message", "detail", "msg"):
            if obj.get(key):
                return _error_text(obj[key])
        return ""
    if isinstance(obj, list) and obj:
        return _error_text(obj[0])
    if isinstance(obj, str):
        return obj
    return ""


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from, outermost first (the SDK wraps its HTTP
    library's, which wrap the socket's): read without depending on which library that is."""
    found: list[BaseException] = []
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop(0)
        if any(current is seen for seen in found):
            continue
        found.append(current)
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        if current.__cause__ is not None or current.__context__ is not None:
            pending.append(current.__cause__ or current.__context__)  # type: ignore[arg-type]
    return found


def _quiet_transport_logs() -> None:
    """The SDK's HTTP library logs every request at INFO with its full URL (credentials in
    LLM_BASE_URL included); Droid logged none. An explicit level set by the operator stays."""
    for name in ("httpx", "httpx2"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


class _Answer:
    """The pieces of one answer as they reach `on_delta`, and its token count. An answer longer
    than `max_bytes` (UTF-8) fails the attempt as soon as it passes the bound."""

    def __init__(self, on_delta: OnDelta, max_bytes: int) -> None:
        self.on_delta = on_delta
        self.max_bytes = max_bytes
        self.size = 0
        self.parts: list[str] = []
        self.tokens: int | None = None
        self.events = 0
        self.delta_error: BaseException | None = None

    async def add(self, content: Any) -> None:
        if not isinstance(content, str) or not content:
            return
        self.size += len(content.encode("utf-8", "surrogatepass"))
        if self.size > self.max_bytes:
            raise AgentError(f"The LLM's answer is longer than {self.max_bytes} bytes "
                             "(LLM_MAX_ANSWER_BYTES)", retryable=False)
        self.parts.append(content)
        try:
            await self.on_delta(content)
        except Exception as exc:
            self.delta_error = exc  # the caller's own failure: passed on, never mapped
            raise

    def count(self, usage: Any) -> None:
        tokens = _usage_tokens(usage)
        if tokens is not None:
            self.tokens = tokens


class OpenAIProvider:
    """Any OpenAI-compatible chat-completions API (OpenAI, Ollama, vLLM, llama.cpp server, …).

    `base_url` is the API root, such as `https://api.openai.com/v1` or `http://localhost:11434/v1`;
    requests go to `{base_url}/chat/completions`. `timeout_s` bounds each whole request,
    connection and streamed body included. The SDK does not retry (`max_retries=0`): the worker
    has its own retries and backoff. Without a key no Authorization header is sent.
    """

    name = "openai"

    def __init__(self, base_url: str, api_key: str | None, model: str | None,
                 timeout_s: float = 60.0, stream: bool = True,
                 max_answer_bytes: int = MAX_ANSWER_BYTES, max_tokens: int | None = None) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/chat/completions")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model or None
        self.timeout_s = timeout_s
        self.stream = stream
        self.max_answer_bytes = max_answer_bytes
        self.max_tokens = max_tokens
        self._api_key = api_key or None
        self._client: AsyncOpenAI | None = None
        # A 429 with Retry-After: no request to this API before this time (time.monotonic()).
        self._paused_until = 0.0
        # Built now, at start-up: importing the SDK and building its client during a first task
        # would stall the event loop, every socket and lease renewal included, for a second.
        self._sdk()

    def __repr__(self) -> str:
        # Never the key.
        return (f"OpenAIProvider(base_url={_display_url(self.base_url)!r}, model={self.model!r}, "
                f"key={'set' if self._api_key else 'unset'})")

    def _sdk(self) -> AsyncOpenAI:
        if self._client is None:
            import httpx2
            import openai

            from .llm_http import BoundedTransport, origin_of

            _quiet_transport_logs()
            # The SDK requires a key: without one it gets a placeholder that is never sent (see
            # _headers). Passing it also keeps the SDK from reading OPENAI_API_KEY.
            transport = BoundedTransport(
                origin_of(httpx2.URL(self.base_url)),
                body_max=4 * self.max_answer_bytes + _BODY_SLACK,
                event_max=4 * self.max_answer_bytes + _BODY_SLACK,
                # The SDK's own connection limits (it sets them only on a transport it builds).
                inner=httpx2.AsyncHTTPTransport(limits=httpx2.Limits(
                    max_connections=1000, max_keepalive_connections=100)))
            self._client = openai.AsyncOpenAI(
                base_url=self.base_url, api_key=self._api_key or "none", timeout=self.timeout_s,
                max_retries=0, http_client=openai.DefaultAsyncHttpx2Client(
                    transport=transport, timeout=self.timeout_s))
            self._client.chat.completions  # noqa: B018 - the SDK imports its resources lazily
        return self._client

    def _headers(self) -> dict[str, Any]:
        """No Authorization header without a key (Ollama and llama.cpp servers want none)."""
        if self._api_key:
            return {}
        import openai

        return {"Authorization": openai.Omit()}

    async def close(self) -> None:
        """Close the SDK client and its connections (attempts still running end with an error)."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    def _scrub(self, text: str, limit: int | None = None) -> str:
        """`text` on one line, without the key or any bearer token, at most `limit` characters."""
        if self._api_key and len(self._api_key) >= _MIN_SCRUB_LEN:
            text = text.replace(self._api_key, _REDACTED)
        text = _BEARER_RE.sub(lambda m: f"{m.group(1)} {_REDACTED}", text)
        text = " ".join(_CONTROL_RE.sub(" ", _printable(text)).split())
        if limit is not None and len(text) > limit:
            text = text[: limit - 1].rstrip() + "…"
        return text

    def _fail(self, message: str, *, retryable: bool,
              retry_after_s: float | None = None) -> AgentError:
        return AgentError(self._scrub(message), retryable=retryable, retry_after_s=retry_after_s)

    def ready_in(self) -> float:
        """Seconds until this API may be asked again (a 429's Retry-After); 0 when it may now."""
        return max(0.0, self._paused_until - time.monotonic())

    async def run(self, *, model: str, system_prompt: str, prompt: str,
                  on_delta: OnDelta) -> AgentResult:
        """Ask the API, writing the answer through `on_delta` as it streams in.

        `model` (the agent's) overrides the configured default. Raises AgentError: retryable for
        timeouts, connection failures, HTTP 408/409/429/5xx and malformed answers; not retryable
        for other HTTP 4xx, a TLS certificate that does not verify and a missing model. What
        `on_delta` raises is raised as it is. Cancelling the caller closes the request's
        connection at once, which tells the server to stop working on it.
        """
        chosen = model or self.model
        if not chosen:
            raise AgentError("No LLM model is configured: set LLM_MODEL or give the agent a model",
                             retryable=False)
        messages = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": prompt})
        answer = _Answer(on_delta, self.max_answer_bytes)
        client = self._sdk()
        paused = self.ready_in()
        if paused > 0:
            raise AgentError(f"The LLM API asked to wait {math.ceil(paused)} more seconds "
                             "(HTTP 429 Retry-After)", retryable=True, retry_after_s=paused)
        extra: dict[str, Any] = {}
        if self.max_tokens is not None:
            extra["max_tokens"] = self.max_tokens
        log.debug("LLM request to %s (model %s, stream %s)", _display_url(self.url), chosen,
                  self.stream)
        try:
            # The SDK's timeout bounds each connect and read; this bounds the whole request.
            async with asyncio.timeout(self.timeout_s):
                if self.stream:
                    # Leaving this block, by an error or a cancel, closes the connection.
                    async with await client.chat.completions.create(
                            model=chosen, messages=messages, stream=True,
                            stream_options={"include_usage": True},
                            extra_headers=self._headers(), **extra) as stream:
                        await self._read_stream(stream, answer)
                else:
                    await self._read_completion(await client.chat.completions.create(
                        model=chosen, messages=messages, stream=False,
                        extra_headers=self._headers(), **extra), answer)
        except Exception as exc:
            if exc is answer.delta_error:
                raise
            if isinstance(exc, AgentError):
                raise self._fail(exc.message, retryable=exc.retryable,
                                 retry_after_s=exc.retry_after_s) from None
            raise self._error(exc) from None
        text = "".join(answer.parts)
        if not text:
            reason = "no content in the stream" if answer.events else "no content"
            raise self._fail(f"{MALFORMED} ({reason})", retryable=True)
        tokens = answer.tokens if answer.tokens is not None else estimate_tokens(prompt, text)
        return AgentResult(response=text, tokens_used=tokens)

    async def _read_stream(self, stream: Any, answer: _Answer) -> None:
        media = stream.response.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "text/event-stream":
            # A whole JSON answer to a streaming request: some servers do that.
            await self._read_completion(orjson.loads(await stream.response.aread()), answer)
            return
        async for chunk in stream:
            answer.events += 1
            answer.count(_field(chunk, "usage"))
            choices = _field(chunk, "choices")
            if isinstance(choices, list) and choices:
                await answer.add(_field(_field(choices[0], "delta"), "content"))

    async def _read_completion(self, completion: Any, answer: _Answer) -> None:
        """Read a whole answer: the SDK's model, a dict, or the text of a body that is not JSON."""
        if isinstance(completion, (str, bytes)):
            raise AgentError(f"{MALFORMED} (not JSON)", retryable=True)
        choices = _field(completion, "choices")
        if not isinstance(choices, list) or not choices:
            error = _field(completion, "error")
            if error:
                raise AgentError("LLM API reported an error: "
                                 f"{self._scrub(_error_text(error), _DETAIL_MAX)}", retryable=True)
            raise AgentError(f"{MALFORMED} (no choices)", retryable=True)
        answer.count(_field(completion, "usage"))
        await answer.add(_field(_field(choices[0], "message"), "content"))

    def _error(self, exc: Exception) -> AgentError:
        """The AgentError for what the SDK (or the timeout) raised."""
        import openai

        from .llm_http import BodyTooLarge, ForeignRedirect

        where = _display_url(self.base_url)
        for cause in _causes(exc):
            if isinstance(cause, BodyTooLarge):
                return self._fail(f"The LLM API sent {cause.what} larger than {cause.limit} bytes "
                                  "(4 x LLM_MAX_ANSWER_BYTES + 64 KiB); not read further",
                                  retryable=False)
            if isinstance(cause, ForeignRedirect):
                return self._fail(f"The LLM API at {where} redirected the request to another "
                                  f"origin ({cause.origin}); Droid does not follow it",
                                  retryable=False)
        if isinstance(exc, (TimeoutError, openai.APITimeoutError)):
            return self._fail(f"LLM API timed out after {self.timeout_s:g}s", retryable=True)
        if isinstance(exc, openai.APIStatusError):
            return self._status_error(exc)
        if isinstance(exc, openai.APIConnectionError):
            return self._connection_error(exc, where)
        if isinstance(exc, openai.APIError):
            # An error event inside a stream (vLLM sends them when generation fails).
            return self._fail(f"LLM API reported an error: {self._scrub(exc.message, _DETAIL_MAX)}",
                              retryable=True)
        if isinstance(exc, ValueError):  # a body or an event that is not JSON
            return self._fail(f"{MALFORMED} (not JSON)", retryable=True)
        log.warning("LLM request to %s failed unexpectedly (%s)", where, type(exc).__name__)
        return self._fail(f"LLM API request failed ({type(exc).__name__})", retryable=True)

    def _status_error(self, exc: Any) -> AgentError:
        from .llm_http import retry_after_s

        code = exc.status_code
        media = exc.response.headers.get("content-type", "").lower()
        # `body` is the error object of a JSON body, else its text; an HTML error page (from a
        # proxy) has nothing readable in one line.
        detail = "" if "html" in media else _error_text(exc.body)
        detail = self._scrub(detail, _DETAIL_MAX)
        retryable = code in (408, 409, 429) or code >= 500
        wait = retry_after_s(exc.response.headers) if code in (429, 503) else None
        if wait is not None:
            self._paused_until = max(self._paused_until, time.monotonic() + wait)
        return self._fail(f"LLM API returned HTTP {code}" + (f": {detail}" if detail else ""),
                          retryable=retryable, retry_after_s=wait)

    def _connection_error(self, exc: Exception, where: str) -> AgentError:
        causes = _causes(exc)
        if any(isinstance(c, ssl.SSLCertVerificationError) for c in causes):
            return self._fail(f"Could not connect to the LLM API at {where}: TLS certificate "
                              "verification failed", retryable=False)
        dropped = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)
        failures = [c for c in causes if isinstance(c, OSError) and not isinstance(c, dropped)]
        if any(isinstance(c, dropped) for c in causes) or not failures:
            # Connected, then the server (or something on the way) hung up.
            return self._fail(f"The LLM API at {where} closed the connection before the answer "
                              "was complete", retryable=True)
        if any(isinstance(c, ConnectionRefusedError) for c in failures):
            reason = "connection refused"
        else:
            innermost = failures[-1]
            reason = innermost.strerror or str(innermost) or type(innermost).__name__
        return self._fail(f"Could not connect to the LLM API at {where}: {reason}",
                          retryable=True)


def make_provider(*, base_url: str | None, api_key: str | None, model: str | None,
                  timeout_s: float = 60.0, demo_delay_s: float = 1.5,
                  max_answer_bytes: int = MAX_ANSWER_BYTES,
                  max_tokens: int | None = None) -> Provider:
    """An OpenAIProvider when `base_url` is set, else the built-in DemoProvider."""
    if base_url:
        return OpenAIProvider(base_url, api_key, model, timeout_s=timeout_s,
                              max_answer_bytes=max_answer_bytes, max_tokens=max_tokens)
    return DemoProvider(delay_s=demo_delay_s)
