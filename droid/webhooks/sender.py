"""One HTTP POST of a webhook: Tornado's simple HTTP client, redirects not followed, connected
only to addresses that passed the SSRF check (ssrf.CheckedResolver), a time limit on the whole
attempt, and at most RESPONSE_READ_MAX bytes of the answer read (the connection is dropped once
more comes)."""
from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import logging
import ssl
import time

from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.simple_httpclient import HTTPStreamClosedError, HTTPTimeoutError, \
    SimpleAsyncHTTPClient

from .. import __version__
from .ssrf import CheckedResolver, Refused

log = logging.getLogger(__name__)

RESPONSE_READ_MAX = 64 * 1024
RESPONSE_KEPT = 1024
USER_AGENT = f"Droid-Webhooks/{__version__}"


class _Enough(Exception):
    """The answer's body passed RESPONSE_READ_MAX: stop reading it."""


@dataclasses.dataclass
class Answer:
    status: int | None          # None: no HTTP answer (timeout, connection error, refused);
    #                             when set, it decides the outcome, whatever `error` says
    duration_ms: int
    error: str | None = None
    body: bytes = b""           # the first RESPONSE_READ_MAX bytes at most
    retry_after: float | None = None  # seconds, from Retry-After
    refused: bool = False       # the SSRF check refused the address

    @property
    def response(self) -> str:
        """The first RESPONSE_KEPT bytes of the body, as text (the delivery log keeps it)."""
        return self.body[:RESPONSE_KEPT].decode("utf-8", errors="replace")


def retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date; None when absent or
    unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class Sender:
    def __init__(self, *, allow_private: bool, timeout_s: float, max_clients: int) -> None:
        self.timeout_s = timeout_s
        self.resolver = CheckedResolver(allow_private=allow_private)
        self.client = SimpleAsyncHTTPClient(force_instance=True, resolver=self.resolver,
                                            max_clients=max(1, max_clients))

    def close(self) -> None:
        self.client.close()

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Answer:
        status: list[int] = []
        after: list[str] = []
        chunks: list[bytes] = []
        size = 0

        def on_header(line: str) -> None:
            if not status:
                parts = line.split(None, 2)
                if len(parts) >= 2 and parts[1].isdigit():
                    status.append(int(parts[1]))
                return
            name, _, value = line.partition(":")
            if name.strip().lower() == "retry-after":
                after.append(value.strip())

        def on_chunk(chunk: bytes) -> None:
            nonlocal size
            if size < RESPONSE_READ_MAX:
                chunks.append(chunk[:RESPONSE_READ_MAX - size])
            size += len(chunk)
            if size > RESPONSE_READ_MAX:
                raise _Enough

        request = HTTPRequest(
            url, method="POST", body=body,
            headers={"Content-Type": "application/json", "User-Agent": USER_AGENT, **headers},
            follow_redirects=False, connect_timeout=self.timeout_s,
            request_timeout=self.timeout_s, header_callback=on_header,
            streaming_callback=on_chunk, decompress_response=False, allow_ipv6=True)
        started = time.monotonic()
        error: str | None = None
        refused = False
        try:
            # The client's own timeouts bound the request; this bounds everything around it.
            async with asyncio.timeout(self.timeout_s + 1):
                await self.client.fetch(request, raise_error=False)
        except _Enough:
            pass  # the status and headers came; the rest of the body is not read
        except Refused as exc:
            error, refused = str(exc), True
        except (HTTPTimeoutError, asyncio.TimeoutError, TimeoutError):
            error = f"timed out after {self.timeout_s:g} s"
        except HTTPStreamClosedError:
            error = "connection closed before the answer ended"
        except ssl.SSLError as exc:
            error = f"TLS error: {exc.reason or exc}"
        except ConnectionRefusedError:
            error = "connection refused"
        except OSError as exc:
            error = f"connection error: {exc.strerror or exc}"
        except HTTPClientError as exc:
            error = f"HTTP error: {exc.message}"
        duration = int((time.monotonic() - started) * 1000)
        if status and error is not None:  # the answer came, its end did not: it counts
            error = f"{error} (reading the answer)"
        code = status[0] if status else None
        if code is None and error is None:
            error = "no answer"
        return Answer(code, duration, error, b"".join(chunks),
                      retry_after(after[0]) if after else None, refused)
