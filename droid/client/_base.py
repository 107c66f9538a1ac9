"""What the synchronous and the asynchronous client share: settings, the description of each
call (`Call`), error mapping, the retry policy, and the bookkeeping of an event stream
(`EventCursor`). No I/O here: `sync.py` and `aio.py` perform the calls."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import time
import uuid
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from .. import __version__
from ._sse import SSEEvent
from .errors import (ApiError, ConnectionFailed, DroidError, Timeout, error_for,
                     parse_retry_after)
from .types import Resync

DEFAULT_URL = "http://localhost:3000"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_RETRIES = 3
DEFAULT_MAX_RETRY_WAIT_S = 30.0
# The server writes a keepalive after 15 s of silence: three missed ones mean a dead connection.
STREAM_IDLE_S = 45.0
STREAM_STABLE_S = 5.0
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 15.0
EVENTS_PAGE = 1000
# `after` beyond any seq: GET /events then answers only with the user's last seq.
_BEYOND = 2**53
RETRY_STATUSES = frozenset({429, 503})
USER_AGENT = f"droid-python/{__version__}"


@dataclasses.dataclass(frozen=True)
class Settings:
    base_url: str
    credential: str | None
    timeout: float
    max_retries: int
    max_retry_wait: float

    def headers(self) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self.credential:
            headers["Authorization"] = f"Bearer {self.credential}"
        return headers


def resolve(base_url: str | None, api_key: str | None, token: str | None, timeout: float,
            max_retries: int, max_retry_wait: float) -> Settings:
    """Arguments first, then DROID_URL and DROID_API_KEY, then http://localhost:3000."""
    if api_key and token:
        raise ValueError("give an API key or a token, not both")
    url = (base_url or os.environ.get("DROID_URL") or DEFAULT_URL).strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"the Droid URL must be http(s)://host[:port], not {url!r}")
    credential = token or api_key or os.environ.get("DROID_API_KEY") or None
    if timeout <= 0 or max_retries < 0 or max_retry_wait < 0:
        raise ValueError("timeout must be > 0, max_retries and max_retry_wait >= 0")
    return Settings(url, credential, float(timeout), int(max_retries), float(max_retry_wait))


@dataclasses.dataclass(frozen=True)
class Call:
    """One REST call. `idempotent`: sending it twice does no harm, so it may be retried after
    a connection lost mid-way (a call that never left is always retried)."""

    method: str
    path: str
    json: Any = None
    params: dict[str, Any] | None = None
    headers: dict[str, str] | None = None
    idempotent: bool = True
    empty: bool = False  # the answer has no body (204)


def seg(value: str) -> str:
    """An id as one path segment (nothing of it can change the path)."""
    return quote(str(value), safe="")


def _params(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


# The routes, as calls ----------------------------------------------------------------------


def register(email: str, password: str, name: str | None) -> Call:
    body = {"email": email, "password": password, **({"name": name} if name else {})}
    return Call("POST", "/auth/register", json=body, idempotent=False)


def login(email: str, password: str) -> Call:
    return Call("POST", "/auth/login", json={"email": email, "password": password})


def create_task(prompt: str, agent: str | None, priority: str | None,
                metadata: dict[str, Any] | None, idempotency_key: str | None) -> Call:
    body: dict[str, Any] = {"prompt": prompt}
    if agent is not None:
        body["agentId"] = agent
    if priority is not None:
        body["priority"] = priority
    if metadata is not None:
        body["metadata"] = metadata
    # A key of its own makes a retry after a lost answer return the same task, not a second one.
    key = idempotency_key or f"droid-python-{uuid.uuid4()}"
    return Call("POST", "/tasks", json=body, headers={"Idempotency-Key": key})


def list_tasks(status: str | None, agent: str | None, limit: int | None,
               cursor: str | None) -> Call:
    return Call("GET", "/tasks", params=_params(status=status, agentId=agent, limit=limit,
                                                cursor=cursor))


def create_agent(name: str, model: str | None, system_prompt: str | None,
                 description: str | None) -> Call:
    body = _params(name=name, model=model, systemPrompt=system_prompt, description=description)
    return Call("POST", "/agents", json=body, idempotent=False)


def create_webhook(url: str, events: list[str] | None, description: str | None) -> Call:
    return Call("POST", "/webhooks", json=_params(url=url, events=events,
                                                  description=description), idempotent=False)


def update_webhook(endpoint_id: str, url: str | None, events: list[str] | None,
                   description: str | None, enabled: bool | None) -> Call:
    body = _params(url=url, events=events, description=description, enabled=enabled)
    return Call("PATCH", f"/webhooks/{seg(endpoint_id)}", json=body)


def list_deliveries(endpoint_id: str, status: str | None, limit: int | None,
                    cursor: str | None) -> Call:
    return Call("GET", f"/webhooks/{seg(endpoint_id)}/deliveries",
                params=_params(status=status, limit=limit, cursor=cursor))


def events_page(after: int, limit: int = EVENTS_PAGE) -> Call:
    return Call("GET", "/events", params={"after": after, "limit": limit})


def last_seq() -> Call:
    return Call("GET", "/events", params={"after": _BEYOND, "limit": 1})


# Answers and failures ----------------------------------------------------------------------


def parse(response: httpx.Response, call: Call) -> Any:
    """The decoded answer of a 2xx, or the typed error of anything else."""
    if response.status_code >= 400 or response.status_code < 200:
        raise error_of(response)
    if call.empty or response.status_code == 204 or not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        raise ConnectionFailed(f"{call.method} {call.path}: the answer is not JSON "
                               f"(is {response.request.url.host} a Droid server?)") from None


def error_of(response: httpx.Response) -> ApiError:
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return error_for(response.status_code, body, dict(response.headers))


def transport_error(exc: httpx.HTTPError, base_url: str, timeout: float) -> DroidError:
    """httpx's failure as the client's: Timeout or ConnectionFailed, one line, no traceback."""
    if isinstance(exc, httpx.TimeoutException):
        return Timeout(f"no answer from {base_url} within {timeout:g} s")
    reason = str(exc) or type(exc).__name__
    cause: BaseException | None = exc
    while cause is not None:  # httpx wraps httpcore's error, which wraps the OSError
        if isinstance(cause, OSError) and cause.strerror:
            reason = cause.strerror.lower()
            break
        cause = cause.__cause__ or cause.__context__
    return ConnectionFailed(f"cannot reach {base_url}: {reason}")


def stream_error(exc: httpx.HTTPError, settings: Settings, read: float) -> DroidError:
    """Why an event stream was lost, in one line."""
    if isinstance(exc, httpx.ReadTimeout):
        return Timeout(f"the event stream of {settings.base_url} was silent for {read:g} s")
    return transport_error(exc, settings.base_url, settings.timeout)


def retry_delay(attempt: int, settings: Settings, *, response: httpx.Response | None = None,
                exc: Exception | None = None, call: Call | None = None) -> float | None:
    """Seconds to wait before retrying attempt number `attempt` (0 first), or None: give up.

    429 and 503 wait what Retry-After says (else the backoff), unless that is more than
    `max_retry_wait`; a connection that failed before the request left is retried, one lost
    mid-way only for an idempotent call; timeouts are not retried (the timeout is the limit)."""
    if attempt >= settings.max_retries:
        return None
    if response is not None:
        if response.status_code not in RETRY_STATUSES:
            return None
        wait = parse_retry_after(response.headers.get("retry-after"))
        wait = backoff(attempt) if wait is None else wait
        return wait if wait <= settings.max_retry_wait else None
    if isinstance(exc, httpx.TimeoutException):
        return None
    if isinstance(exc, httpx.ConnectError) or (
            isinstance(exc, httpx.TransportError) and (call is None or call.idempotent)):
        return backoff(attempt)
    return None


def backoff(attempt: int) -> float:
    """Exponential backoff with jitter: between half and all of min(cap, base * 2^attempt), so
    that clients that lost the same server do not come back in step."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(attempt, 16))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


# Event streams -----------------------------------------------------------------------------


class EventCursor:
    """Where an event stream stands: the last seq handed to the caller (`after`), so that a
    reconnect resumes right after it and an envelope seen twice is dropped."""

    def __init__(self, after: int, progress: bool, deadline: float | None) -> None:
        if after < 0:
            raise ValueError("after must be >= 0")
        self.after = after
        self.progress = progress
        self.deadline = deadline
        self.failures = 0
        self._opened_at = 0.0
        self._after_at_open = after

    def opening(self) -> None:
        self._opened_at = time.monotonic()
        self._after_at_open = self.after

    def alive(self) -> None:
        """A chunk came. The backoff starts over once the stream has proved itself (an
        envelope, or STABLE_S open), not on its first bytes: a server that accepts and drops
        at once is not retried in a tight loop."""
        if self.after != self._after_at_open or \
                time.monotonic() - self._opened_at >= STREAM_STABLE_S:
            self.failures = 0

    def accept(self, sse: SSEEvent) -> dict | Resync | None:
        """What to hand to the caller for one SSE event: an envelope, a Resync, or nothing."""
        if not sse.data:
            return None  # the stream's opening `retry:`
        if sse.event == "resync":
            oldest = json.loads(sse.data).get("oldestSeq")
            return Resync(after=self.after, oldest_seq=int(oldest))
        return self.take(json.loads(sse.data))

    def take(self, envelope: dict) -> dict | None:
        seq = envelope.get("seq")
        if seq is None:
            return envelope if self.progress else None
        if seq <= self.after:
            return None  # already handed over (a replay after a reconnect)
        self.after = seq
        return envelope

    def stream_headers(self) -> dict[str, str]:
        return {"Last-Event-ID": str(self.after), "Accept": "text/event-stream",
                "Cache-Control": "no-store"}

    def read_timeout(self) -> float:
        """The longest a read of the stream may wait: a dead connection's limit, and no later
        than the deadline."""
        remaining = self.remaining()
        return STREAM_IDLE_S if remaining is None else max(0.05, min(STREAM_IDLE_S, remaining))

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def expired(self) -> bool:
        remaining = self.remaining()
        return remaining is not None and remaining <= 0

    def reopen_for_deadline(self, read_timeout: float) -> bool:
        """Whether to reopen the stream with a shorter read timeout: a read now could outlast
        the deadline by more than a second (Last-Event-ID makes the reopen lossless)."""
        remaining = self.remaining()
        return remaining is not None and remaining < read_timeout - 1.0

    def next_delay(self) -> float:
        delay = backoff(self.failures)
        self.failures += 1
        remaining = self.remaining()
        return delay if remaining is None else max(0.0, min(delay, remaining))


def retry_after_of(error: ApiError, failures: int, settings: Settings) -> float | None:
    """How long to wait before reopening a stream refused with `error`, or None (give up):
    429/503 and other 5xx are passing states of a server; everything else is the caller's."""
    if error.status_code in RETRY_STATUSES or error.status_code >= 500:
        wait = parse_retry_after(error.headers.get("retry-after"))
        return backoff(failures) if wait is None else min(wait, settings.max_retry_wait)
    return None


def stream_timeout(settings: Settings, cursor: EventCursor, read: float) -> httpx.Timeout:
    """The stream's timeouts: the client's for connecting (no later than the deadline), and
    `read` between two chunks."""
    remaining = cursor.remaining()
    connect = settings.timeout if remaining is None else max(0.05, min(settings.timeout,
                                                                       remaining))
    return httpx.Timeout(connect, read=read)


FINAL_EVENTS = frozenset({"task.completed", "task.failed", "task.cancelled"})


def deadline(timeout: float | None) -> float | None:
    """The monotonic time a wait of `timeout` seconds ends (None: never)."""
    if timeout is not None and timeout < 0:
        raise ValueError("timeout must be >= 0")
    return None if timeout is None else time.monotonic() + timeout
