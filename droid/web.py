"""What every Tornado handler of Droid shares, REST, SSE, long-polling and WebSocket alike: the
one writer of the error shape, the one CORS rule, and request bodies read with a bound.

It sits below droid.http and droid.realtime (which never import each other), so both answer
refusals the same way and decide origins by the same rule.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import tornado.web

from .errors import ApiError, Invalid, error_body
from .util import dumps

MAX_BODY = 1024 * 1024
# What is left of an oversized body is read and dropped, up to this much, before the 413 is sent:
# Tornado closes a connection whose answer ends before its body, and a client still sending
# then gets a reset instead of the answer.
DISCARD_MAX = 16 * MAX_BODY
_UNBOUNDED = 2**62  # Tornado's own body limit for handlers that bound theirs (BoundedBody)


# the error shape -------------------------------------------------------------------------------

def write_error(handler: tornado.web.RequestHandler, status: int, message: str | list[str], *,
                error: str | None = None, retry_after: int | None = None) -> None:
    """Answer `handler`'s request with the error shape, and finish it."""
    handler.set_status(status)
    if status == 401:
        handler.set_header("WWW-Authenticate", 'Bearer realm="droid"')
    if retry_after is not None:
        handler.set_header("Retry-After", str(retry_after))
    handler.set_header("Content-Type", "application/json; charset=utf-8")
    handler.set_header("Cache-Control", "no-store")
    handler.clear_header("Content-Disposition")
    handler.finish(dumps(error_body(status, message, error)))


def write_api_error(handler: tornado.web.RequestHandler, exc: ApiError) -> None:
    """Answer with a typed error (its status, message, and Retry-After when it has one)."""
    write_error(handler, exc.status, exc.message, error=exc.reason,
                retry_after=getattr(exc, "retry_after", None))


# CORS ------------------------------------------------------------------------------------------

class Origins:
    """The one rule for browser origins (CORS_ORIGIN, entries already without a trailing `/`):
    any origin with `*`; else the listed ones, plus the server's own host (the demo page served
    by this process is not cross-origin, whatever CORS_ORIGIN says). Requests without an Origin
    header (not from a browser) are not concerned."""

    def __init__(self, allowed: tuple[str, ...]) -> None:
        self.any = "*" in allowed
        self.allowed = frozenset(allowed)

    def allows(self, origin: str, host: str | None) -> bool:
        if self.any or origin.rstrip("/").lower() in self.allowed:
            return True
        try:
            netloc = urlsplit(origin).netloc.lower()
        except ValueError:
            return False
        return bool(host) and bool(netloc) and netloc == host.lower()

    def allow_header(self, origin: str | None, host: str | None) -> str | None:
        """The Access-Control-Allow-Origin a response to this origin gets, or None."""
        if not origin:
            return None
        if self.any:
            return "*"
        return origin if self.allows(origin, host) else None


# request bodies --------------------------------------------------------------------------------

class BoundedBody:
    """Mixin of a `@stream_request_body` handler: keeps a request body of at most `body_limit`
    bytes, Content-Length or chunked alike, and answers a larger one with `refuse_body()`.

    The answer is given once the body has ended (Tornado then keeps the connection), with what
    came after the limit dropped as it arrives; at once when the client waits for
    `100-continue` or announces more than DISCARD_MAX, or when that much has come. Subclasses
    call `start_body()` from prepare(), read the body with `take_body()`, and may override
    `body_too_large()` (called once, when the limit is passed) and `refuse_body()` (the answer).
    """

    body_limit = MAX_BODY
    answered = False
    _chunks: list[bytes] | None = None
    _size = 0
    _oversized = False

    def finish(self, *args: Any, **kwargs: Any) -> Any:
        self.answered = True
        return super().finish(*args, **kwargs)  # type: ignore[misc]

    def start_body(self) -> None:
        self._chunks = []
        # Tornado's limit (HTTPServer max_body_size) is for handlers that buffer their body.
        self.request.connection.set_max_body_size(_UNBOUNDED)  # type: ignore[attr-defined]
        length = self.request.headers.get("Content-Length")  # type: ignore[attr-defined]
        if length is None:
            return
        try:
            size = int(length)
        except ValueError:
            raise Invalid("Content-Length is invalid") from None
        if size > self.body_limit:
            self._overflow()
            if size > DISCARD_MAX or \
                    self.request.headers.get("Expect", "").lower() == "100-continue":  # type: ignore[attr-defined]
                self.refuse_body()

    def data_received(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._oversized or self._size > self.body_limit:
            if not self._oversized:
                self._overflow()
            if self._size > DISCARD_MAX and not self.answered:
                self.refuse_body()
            return
        if self._chunks is not None:
            self._chunks.append(chunk)

    def take_body(self) -> bytes:
        chunks, self._chunks = self._chunks or [], []
        return b"".join(chunks)

    @property
    def streaming_body(self) -> bool:
        """True while a body is being read (or dropped)."""
        return self._chunks is not None or self._oversized

    def _overflow(self) -> None:
        self._oversized = True
        self._chunks = None
        self.body_too_large()
        # Tornado calls the handler's method once the body has ended: have it answer instead.
        setattr(self, self.request.method.lower(), self._refused_method)  # type: ignore[attr-defined]

    def _refused_method(self, *args: Any, **kwargs: Any) -> None:
        if not self.answered:
            self.refuse_body()

    def body_too_large(self) -> None:
        """The body has passed the limit (it is being dropped)."""

    def refuse_body(self) -> None:
        write_error(self, 413, f"Request body is larger than {self.body_limit} bytes",  # type: ignore[arg-type]
                    error="Payload Too Large")
