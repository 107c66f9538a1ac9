"""LLM providers: the built-in demo agent and any OpenAI-compatible chat-completions API.

A provider turns one prompt into one answer. It writes the answer piece by piece through an
`on_delta` coroutine (the worker publishes each piece as `task.progress`) and returns the whole
answer with a token count. The concatenation of the pieces is always the final answer.

Every failure is an `AgentError` whose `message` is safe to show the task's owner: it never holds
the API key or the Authorization header, and `retryable` says whether another attempt may succeed.

This module knows nothing of the web layer, Socket.IO or the database; it only speaks HTTP, through
Tornado's pure-Python `SimpleAsyncHTTPClient`. Prompts and keys are never logged.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson
from tornado.httpclient import HTTPClientError, HTTPRequest, HTTPResponse
from tornado.httputil import HTTPHeaders, HTTPInputError
from tornado.simple_httpclient import (HTTPStreamClosedError, HTTPTimeoutError,
                                       SimpleAsyncHTTPClient, _HTTPConnection)

from droid import __version__

log = logging.getLogger(__name__)

OnDelta = Callable[[str], Awaitable[None]]

MALFORMED = "LLM returned a malformed response"
_DETAIL_MAX = 200
_ERROR_BODY_MAX = 64 * 1024  # enough for any error message; the rest is dropped
_BODY_MAX = 16 * 1024 * 1024  # a non-streamed answer larger than this is refused
_REDACTED = "[redacted]"
# Keys shorter than this are not secrets worth scrubbing, and replacing a one- or two-letter
# "key" (Ollama accepts anything) everywhere would garble every message.
_MIN_SCRUB_LEN = 4
_BEARER_RE = re.compile(r"(?i)\b(bearer)\s+[^\s\"',;}]+")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")


class AgentError(Exception):
    """An attempt failed. `message` is user-visible; `retryable` says whether to try again."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable

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
    words = re.findall(r"\S+\s*|\s+", text)
    n = max(1, min(pieces, len(words)))
    return [p for p in ("".join(words[i * len(words) // n:(i + 1) * len(words) // n])
                        for i in range(n)) if p]


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


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _usage_tokens(usage: Any) -> int | None:
    """`usage.total_tokens`, else prompt + completion tokens, else None."""
    if not isinstance(usage, dict):
        return None
    total = _int_or_none(usage.get("total_tokens"))
    if total is not None:
        return total
    prompt, completion = (_int_or_none(usage.get("prompt_tokens")),
                          _int_or_none(usage.get("completion_tokens")))
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


class _StopReading(HTTPInputError):
    """Raised into Tornado's read loop to drop a response's connection.

    Tornado logs any other exception from a streaming callback as "Uncaught exception" (ERROR);
    an HTTPInputError passes through quietly (one INFO line) and closes the connection.
    """


class _HTTPClient(SimpleAsyncHTTPClient):
    """Tornado's simple client, plus `abort`: drop a request's connection now.

    Tornado has no public way to stop a fetch. Without this, a cancelled attempt (a user's cancel,
    a shutdown, the task timeout) would leave its request open until `timeout_s`, and an LLM
    server that has not sent its first byte yet would go on working for nobody. Closing the
    connection tells it to stop (vLLM, Ollama and OpenAI abort a request whose client left).
    This leans on two internals of `tornado.simple_httpclient` that have been stable since
    Tornado 5 (`_connection_class`, `_HTTPConnection._handle_exception`); if they change,
    `abort` does nothing and the request ends by its own timeout, as before.
    """

    def initialize(self, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(**kwargs)
        self.live: dict[HTTPRequest, Any] = {}

    def _connection_class(self) -> type:
        return _TrackedConnection

    def abort(self, request: HTTPRequest) -> None:
        """End `request` at once with a closed-stream error, closing its connection."""
        connection = self.live.pop(request, None)
        if connection is None or getattr(connection, "final_callback", None) is None:
            return
        try:
            connection._handle_exception(HTTPStreamClosedError,
                                         HTTPStreamClosedError("Request abandoned"), None)
        except Exception:  # a Tornado whose internals differ: the request times out instead
            log.debug("could not abort an LLM request", exc_info=True)

    def abort_all(self) -> None:
        for request in list(self.live):
            self.abort(request)


class _TrackedConnection(_HTTPConnection):
    """A connection that the client can find (by its request) until it is released."""

    def __init__(self, client: _HTTPClient, request: Any, release_callback: Callable[[], None],
                 *args: Any, **kwargs: Any) -> None:
        original = getattr(request, "request", request)  # Tornado wraps it in a _RequestProxy

        def release() -> None:
            client.live.pop(original, None)
            release_callback()

        client.live[original] = self  # before __init__, which starts the request
        super().__init__(client, request, release, *args, **kwargs)


class _Exchange:
    """One request's response, read as it arrives.

    Tornado calls `on_header` for each header line and `on_chunk` for each piece of the body
    (with the simple client a coroutine, so the next piece is not read until `on_delta` is done).
    A `200 text/event-stream` body is parsed as Server-Sent Events line by line; anything else is
    buffered and read at the end.
    """

    def __init__(self, on_delta: OnDelta, detail: Callable[[str], str]) -> None:
        self.on_delta = on_delta
        self.detail = detail  # makes upstream text safe to quote in a message
        self.code = 0
        self.headers = HTTPHeaders()
        self.buffer = bytearray()
        self.line = bytearray()
        self.data_lines: list[str] = []
        self.parts: list[str] = []
        self.tokens: int | None = None
        self.events = 0
        self.done = False
        self.too_large = False
        self.error: BaseException | None = None
        self.abandoned = False

    # Tornado callbacks -------------------------------------------------------------------------
    def on_header(self, line: str) -> None:
        if line.startswith("HTTP/"):
            # A new start line (after an interim 1xx) starts a new set of headers.
            self.headers = HTTPHeaders()
            fields = line.split(None, 2)
            self.code = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0
        elif line.strip():
            self.headers.parse_line(line)

    async def on_chunk(self, chunk: bytes) -> None:
        if self.abandoned:
            raise _StopReading("Droid stopped reading the LLM answer: nobody waits for it")
        try:
            if self.streaming:
                await self._feed(chunk)
            else:
                limit = _BODY_MAX if 200 <= self.code < 300 else _ERROR_BODY_MAX
                room = limit - len(self.buffer)
                if len(chunk) > room:
                    self.too_large = 200 <= self.code < 300
                self.buffer += chunk[:max(0, room)]
        except Exception as exc:
            # Kept for run() to raise: what reaches fetch() is only a closed connection.
            self.error = exc
            raise _StopReading(f"Droid stopped reading the LLM answer ({type(exc).__name__})"
                               ) from exc

    # Server-Sent Events ------------------------------------------------------------------------
    @property
    def streaming(self) -> bool:
        media = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        return self.code == 200 and media == "text/event-stream"

    async def _feed(self, chunk: bytes) -> None:
        self.line += chunk
        while True:
            end = self.line.find(b"\n")
            if end < 0:
                return
            # Splitting bytes at b"\n" is safe: no UTF-8 multi-byte sequence contains 0x0A.
            raw = bytes(self.line[:end]).rstrip(b"\r")
            del self.line[:end + 1]
            await self._line(raw.decode("utf-8", "replace"))

    async def _line(self, line: str) -> None:
        if line == "":
            await self._dispatch()
            return
        if line.startswith(":"):
            return  # a comment (keep-alive)
        field, _, value = line.partition(":")
        if field == "data":
            self.data_lines.append(value[1:] if value.startswith(" ") else value)

    async def _dispatch(self) -> None:
        if not self.data_lines:
            return
        data = "\n".join(self.data_lines)
        self.data_lines = []
        if self.done:
            return
        if data.strip() == "[DONE]":
            self.done = True
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise AgentError(f"{MALFORMED} (an event is not JSON)", retryable=True) from None
        await self._chunk(chunk)

    async def _chunk(self, chunk: Any) -> None:
        if not isinstance(chunk, dict):
            raise AgentError(f"{MALFORMED} (an event is not a JSON object)", retryable=True)
        choices = chunk.get("choices")
        if chunk.get("error") and not choices:
            raise AgentError(f"LLM API reported an error: {self.detail(_error_text(chunk))}",
                             retryable=True)
        self.events += 1
        tokens = _usage_tokens(chunk.get("usage"))
        if tokens is not None:
            self.tokens = tokens
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            delta = choices[0].get("delta")
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str) and content:
                self.parts.append(content)
                await self.on_delta(content)

    async def finish_stream(self) -> None:
        """Read what is left after the body ended (a last line with no newline)."""
        if self.line:
            await self._feed(b"\n")
        await self._dispatch()


class OpenAIProvider:
    """Any OpenAI-compatible chat-completions API (OpenAI, Ollama, vLLM, llama.cpp server, …).

    `base_url` is the API root, such as `https://api.openai.com/v1` or `http://localhost:11434/v1`;
    requests go to `{base_url}/chat/completions`. `timeout_s` bounds each whole request,
    connection and streamed body included.
    """

    name = "openai"

    def __init__(self, base_url: str, api_key: str | None, model: str | None,
                 timeout_s: float = 60.0, stream: bool = True) -> None:
        root = base_url.rstrip("/")
        self.url = root if root.endswith("/chat/completions") else f"{root}/chat/completions"
        self.base_url = root
        self.model = model or None
        self.timeout_s = timeout_s
        self.stream = stream
        self._api_key = api_key or None
        self._client: _HTTPClient | None = None

    def __repr__(self) -> str:
        # Never the key.
        return (f"OpenAIProvider(base_url={_display_url(self.base_url)!r}, model={self.model!r}, "
                f"key={'set' if self._api_key else 'unset'})")

    def _http(self) -> _HTTPClient:
        # Created on first use, inside the event loop that will run it.
        if self._client is None:
            self._client = _HTTPClient(force_instance=True, max_clients=64)
        return self._client

    async def close(self) -> None:
        """Release the HTTP client, dropping any request still open (an abandoned one)."""
        if self._client is not None:
            self._client.abort_all()
            self._client.close()
            self._client = None

    def _scrub(self, text: str, limit: int | None = None) -> str:
        """`text` on one line, without the key or any bearer token, at most `limit` characters."""
        if self._api_key and len(self._api_key) >= _MIN_SCRUB_LEN:
            text = text.replace(self._api_key, _REDACTED)
        text = _BEARER_RE.sub(lambda m: f"{m.group(1)} {_REDACTED}", text)
        text = " ".join(_CONTROL_RE.sub(" ", _printable(text)).split())
        if limit is not None and len(text) > limit:
            text = text[: limit - 1].rstrip() + "…"
        return text

    def _detail(self, text: str) -> str:
        return self._scrub(text, _DETAIL_MAX)

    def _fail(self, message: str, *, retryable: bool) -> AgentError:
        return AgentError(self._scrub(message), retryable=retryable)

    async def run(self, *, model: str, system_prompt: str, prompt: str,
                  on_delta: OnDelta) -> AgentResult:
        """Ask the API, writing the answer through `on_delta` as it streams in.

        `model` (the agent's) overrides the configured default. Raises AgentError: retryable for
        timeouts, connection failures, HTTP 408/409/429/5xx and malformed answers; not retryable
        for other HTTP 4xx, redirects and a missing model.
        """
        chosen = model or self.model
        if not chosen:
            raise AgentError("No LLM model is configured: set LLM_MODEL or give the agent a model",
                             retryable=False)
        messages = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": prompt})
        body: dict[str, Any] = {"model": chosen, "messages": messages, "stream": self.stream}
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream, application/json" if self.stream else "application/json",
            "User-Agent": f"droid/{__version__}",
        }
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"

        exchange = _Exchange(on_delta, self._detail)
        request = HTTPRequest(
            self.url, method="POST", headers=headers, body=orjson.dumps(body),
            connect_timeout=self.timeout_s, request_timeout=self.timeout_s,
            follow_redirects=False, header_callback=exchange.on_header,
            streaming_callback=exchange.on_chunk,
        )
        log.debug("LLM request to %s (model %s, stream %s)", _display_url(self.url), chosen,
                  self.stream)
        client = self._http()
        future = client.fetch(request, raise_error=False)
        try:
            # Shielded: if the caller is cancelled, Tornado's future must not be, or Tornado logs
            # the request's later end as an error. The request is abandoned instead.
            response = await asyncio.shield(future)
        except asyncio.CancelledError:
            exchange.abandoned = True
            future.add_done_callback(_retrieve)
            client.abort(request)
            raise
        except Exception as exc:
            failure = exchange.error  # raised inside Tornado's read loop, by us or by on_delta
            if isinstance(failure, AgentError):
                raise self._fail(failure.message, retryable=failure.retryable) from None
            if failure is not None:
                raise failure from None
            raise self._network_error(exc) from exc
        return await self._result(exchange, response, prompt)

    def _network_error(self, exc: Exception) -> AgentError:
        where = _display_url(self.base_url)
        if isinstance(exc, HTTPTimeoutError):
            return self._fail(f"LLM API timed out after {self.timeout_s:g}s", retryable=True)
        if isinstance(exc, HTTPStreamClosedError):
            return self._fail(f"The LLM API at {where} closed the connection before the answer "
                              "was complete", retryable=True)
        if isinstance(exc, HTTPInputError):
            return self._fail(f"{MALFORMED} (invalid HTTP)", retryable=True)
        if isinstance(exc, ssl.SSLCertVerificationError):
            return self._fail(f"Could not connect to the LLM API at {where}: TLS certificate "
                              "verification failed", retryable=False)
        if isinstance(exc, OSError):
            reason = exc.strerror or type(exc).__name__
            if isinstance(exc, ConnectionRefusedError):
                reason = "connection refused"
            return self._fail(f"Could not connect to the LLM API at {where}: {reason}",
                              retryable=True)
        if isinstance(exc, HTTPClientError):
            return self._fail(f"LLM API request failed: {exc.message or exc.code}", retryable=True)
        log.warning("LLM request to %s failed unexpectedly (%s)", where, type(exc).__name__,
                    exc_info=exc)
        return self._fail(f"LLM API request failed ({type(exc).__name__})", retryable=True)

    def _status_error(self, exchange: _Exchange, code: int) -> AgentError:
        detail = bytes(exchange.buffer).decode("utf-8", "replace")
        try:
            detail = _error_text(orjson.loads(exchange.buffer)) or ""
        except orjson.JSONDecodeError:
            if "html" in exchange.headers.get("Content-Type", "").lower():
                detail = ""  # an error page from a proxy: nothing readable in one line
        detail = self._detail(detail)
        if 300 <= code < 400:
            detail = detail or "redirects are not followed; check LLM_BASE_URL"
        retryable = code in (408, 409, 429) or code >= 500
        message = f"LLM API returned HTTP {code}" + (f": {detail}" if detail else "")
        return self._fail(message, retryable=retryable)

    async def _result(self, exchange: _Exchange, response: HTTPResponse,
                      prompt: str) -> AgentResult:
        code = exchange.code or response.code
        if not 200 <= code < 300:
            raise self._status_error(exchange, code)
        if exchange.too_large:
            raise self._fail(f"LLM response is larger than {_BODY_MAX // (1024 * 1024)} MiB",
                             retryable=False)
        try:
            if exchange.streaming:
                await exchange.finish_stream()
                return self._from_stream(exchange, prompt)
            body = bytes(exchange.buffer)
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                if body.lstrip().startswith(b"data:"):
                    # SSE sent with the wrong Content-Type: read it all now.
                    await exchange._feed(body)
                    await exchange.finish_stream()
                    return self._from_stream(exchange, prompt)
                raise AgentError(f"{MALFORMED} (not JSON)", retryable=True) from None
            return await self._from_json(parsed, exchange.on_delta, prompt)
        except AgentError as exc:
            raise self._fail(exc.message, retryable=exc.retryable) from None

    @staticmethod
    def _from_stream(exchange: _Exchange, prompt: str) -> AgentResult:
        text = "".join(exchange.parts)
        if not text:
            reason = "no content in the stream" if exchange.events else "no events"
            raise AgentError(f"{MALFORMED} ({reason})", retryable=True)
        tokens = exchange.tokens if exchange.tokens is not None else estimate_tokens(prompt, text)
        return AgentResult(response=text, tokens_used=tokens)

    async def _from_json(self, parsed: Any, on_delta: OnDelta, prompt: str) -> AgentResult:
        if not isinstance(parsed, dict):
            raise AgentError(f"{MALFORMED} (not a JSON object)", retryable=True)
        choices = parsed.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            if parsed.get("error"):
                raise AgentError(f"LLM API reported an error: {self._detail(_error_text(parsed))}",
                                 retryable=True)
            raise AgentError(f"{MALFORMED} (no choices)", retryable=True)
        message = choices[0].get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str) or not content:
            raise AgentError(f"{MALFORMED} (no content)", retryable=True)
        await on_delta(content)
        tokens = _usage_tokens(parsed.get("usage"))
        return AgentResult(response=content,
                           tokens_used=tokens if tokens is not None
                           else estimate_tokens(prompt, content))


def _retrieve(future: asyncio.Future[HTTPResponse]) -> None:
    """Mark an abandoned request's outcome as seen, so asyncio does not log it."""
    if not future.cancelled():
        future.exception()


def make_provider(*, base_url: str | None, api_key: str | None, model: str | None,
                  timeout_s: float = 60.0, demo_delay_s: float = 1.5) -> Provider:
    """An OpenAIProvider when `base_url` is set, else the built-in DemoProvider."""
    if base_url:
        return OpenAIProvider(base_url, api_key, model, timeout_s=timeout_s)
    return DemoProvider(delay_s=demo_delay_s)
