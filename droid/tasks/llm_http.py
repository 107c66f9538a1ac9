"""The HTTP client under the OpenAI SDK: what an LLM API may send back, and where a prompt may go.

The SDK reads whatever the server sends: a whole JSON body (an answer, or an error) into memory,
an SSE line until its end, and it follows redirects wherever they point. Droid hands the SDK an
`httpx2.AsyncClient` (through the SDK's public `DefaultAsyncHttpx2Client`, so its defaults stay)
whose transport (`BoundedTransport`, httpx2's public transport API) adds three rules:

- A body that is not an event stream (a JSON answer, an error, an HTML page) is read up to
  `body_max` bytes; past that the read fails with `BodyTooLarge`, and the connection is closed.
- In an event stream, one event (the bytes between two blank lines) is at most `event_max`
  bytes. The answer itself is bounded by its text (LLM_MAX_ANSWER_BYTES, droid.tasks.llm), and
  the whole request by LLM_TIMEOUT_S.
- Every request, redirected ones included, goes to the origin (scheme, host, port) of
  LLM_BASE_URL: a redirect elsewhere raises `ForeignRedirect` before anything is sent there, so
  a prompt never leaves for another host. Redirects within the origin are followed as before.

It also reads a 429's wait (`retry_after_s`): `retry-after-ms`, else `Retry-After` in seconds or
as an HTTP date.
"""
from __future__ import annotations

import email.utils
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx2

_EVENT_END = (b"\n\n", b"\r\n\r\n", b"\r\r")


class BodyTooLarge(Exception):
    """The LLM API sent more than Droid reads (`limit` bytes; `what` says of what)."""

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(f"{what} larger than {limit} bytes")
        self.what = what
        self.limit = limit


class ForeignRedirect(Exception):
    """The LLM API redirected a request to another origin; it was not sent there."""

    def __init__(self, origin: str) -> None:
        super().__init__(f"redirect to {origin} refused")
        self.origin = origin


def origin_of(url: httpx2.URL) -> str:
    port = url.port
    host = url.host if ":" not in url.host else f"[{url.host}]"
    return f"{url.scheme}://{host}" + (f":{port}" if port is not None else "")


class _BoundedStream(httpx2.AsyncByteStream):
    """A response body that stops with BodyTooLarge once it passes its bound."""

    def __init__(self, inner: Any, *, event_stream: bool, body_max: int,
                 event_max: int) -> None:
        self._inner = inner
        self._event_stream = event_stream
        self._body_max = body_max
        self._event_max = event_max

    async def __aiter__(self) -> AsyncIterator[bytes]:
        total = 0  # of the body, or of the current event in an event stream
        tail = b""
        async for chunk in self._inner:
            if self._event_stream:
                # Bytes since the last blank line; the last 3 bytes of the previous chunk are
                # kept so that a boundary split between two chunks is still seen.
                window = tail + chunk
                ends = [window.rfind(end) + len(end) for end in _EVENT_END if end in window]
                if ends:
                    total = len(window) - max(ends)
                else:
                    total += len(chunk)
                tail = window[-3:]
                if total > self._event_max:
                    raise BodyTooLarge("an event of the answer's stream", self._event_max)
            else:
                total += len(chunk)
                if total > self._body_max:
                    raise BodyTooLarge("the answer's body", self._body_max)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class BoundedTransport(httpx2.AsyncBaseTransport):
    """httpx2's own transport, with the bounds and the origin rule of this module."""

    def __init__(self, origin: str, *, body_max: int, event_max: int,
                 inner: httpx2.AsyncBaseTransport | None = None) -> None:
        self.origin = origin
        self.body_max = body_max
        self.event_max = event_max
        self._inner = inner or httpx2.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        target = origin_of(request.url)
        if target != self.origin:
            raise ForeignRedirect(target)
        response = await self._inner.handle_async_request(request)
        media = response.headers.get("content-type", "").split(";")[0].strip().lower()
        stream = _BoundedStream(response.stream, event_stream=media == "text/event-stream",
                                body_max=self.body_max, event_max=self.event_max)
        return httpx2.Response(status_code=response.status_code, headers=response.headers,
                               stream=stream, extensions=response.extensions)

    async def aclose(self) -> None:
        await self._inner.aclose()


def retry_after_s(headers: Any, now: float | None = None) -> float | None:
    """How long a 429 (or 503) asks to wait, in seconds, or None when it does not say."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            value = float(raw_ms) / 1000
            if math.isfinite(value) and value >= 0:
                return value
        except ValueError:
            pass
    raw = (headers.get("retry-after") or "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
        return value if math.isfinite(value) and value >= 0 else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
