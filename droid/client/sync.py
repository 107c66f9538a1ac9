"""The synchronous client: `Client`, its REST calls with retries, and `events()`, the user's
envelopes exactly once and in order across dropped connections and server restarts."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator

import httpx

from . import _base as b
from ._sse import SSEParser
from .errors import ApiError, ConnectionFailed, DroidError, Timeout
from .resources import Agents, ApiKeys, Auth, Tasks, Webhooks
from .types import Envelope, Resync

log = logging.getLogger(__name__)

OnReconnect = Callable[[DroidError, float], None]


class Client:
    """A Droid server, called synchronously.

    `Client(base_url, api_key)`; without arguments, `DROID_URL` (else http://localhost:3000)
    and `DROID_API_KEY`. `token=` takes a JWT instead of an API key. Every call gives up after
    `timeout` seconds (`Timeout`); 429 and 503 are retried after their Retry-After, at most
    `max_retries` times and only when it asks for no more than `max_retry_wait` seconds; a
    connection refused (a restarting server) is retried with backoff as well.

    Use it as a context manager, or call `close()`.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 token: str | None = None, timeout: float = b.DEFAULT_TIMEOUT_S,
                 max_retries: int = b.DEFAULT_MAX_RETRIES,
                 max_retry_wait: float = b.DEFAULT_MAX_RETRY_WAIT_S) -> None:
        self._settings = b.resolve(base_url, api_key, token, timeout, max_retries,
                                   max_retry_wait)
        self._http = httpx.Client(base_url=self._settings.base_url, timeout=timeout,
                                  headers=self._settings.headers(), follow_redirects=False)
        self.auth = Auth(self)
        """Register, log in, and who the credential belongs to."""
        self.tasks = Tasks(self)
        """Create, read, list, cancel, wait for and stream tasks."""
        self.agents = Agents(self)
        """The default agent and the caller's own."""
        self.api_keys = ApiKeys(self)
        """The caller's API keys."""
        self.webhooks = Webhooks(self)
        """Webhook endpoints and their deliveries."""

    @property
    def base_url(self) -> str:
        return self._settings.base_url

    def close(self) -> None:
        """Close the connections (the client cannot be used afterwards)."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def request(self, call: b.Call) -> Any:
        """Perform one call, with the retry policy; returns the decoded answer."""
        settings = self._settings
        attempt = 0
        while True:
            try:
                response = self._http.request(call.method, call.path, json=call.json,
                                              params=call.params, headers=call.headers)
            except httpx.HTTPError as exc:
                delay = b.retry_delay(attempt, settings, exc=exc, call=call)
                if delay is None:
                    raise b.transport_error(exc, settings.base_url, settings.timeout) from exc
                log.info("%s %s failed (%s); retrying in %.1f s", call.method, call.path,
                         type(exc).__name__, delay)
            else:
                delay = None
                if response.status_code in b.RETRY_STATUSES:
                    delay = b.retry_delay(attempt, settings, response=response)
                if delay is None:
                    return b.parse(response, call)
                log.info("%s %s answered %d; retrying in %.1f s", call.method, call.path,
                         response.status_code, delay)
            time.sleep(delay)
            attempt += 1

    def health(self) -> dict[str, Any]:
        """GET /health (needs no credential)."""
        return self.request(b.Call("GET", "/health"))

    def last_seq(self) -> int:
        """The seq of the user's latest stored envelope (0 before the first): `events(after=
        client.last_seq())` is everything from now on."""
        return int(self.request(b.last_seq())["lastSeq"])

    def events_page(self, after: int = 0, limit: int = b.EVENTS_PAGE) -> dict[str, Any]:
        """GET /events: `{items, lastSeq}`, the stored envelopes after `after`, oldest first."""
        return self.request(b.events_page(after, limit))

    def events(self, after: int = 0, *, progress: bool = False,
               on_reconnect: OnReconnect | None = None) -> Iterator[Envelope | Resync]:
        """The user's envelopes with `seq > after`, in order, each exactly once, then live ones
        as they happen, until the caller stops iterating.

        Read from `GET /events/stream`. When the connection drops or the server restarts, it
        reconnects by itself (exponential backoff with jitter, up to 15 s apart) and resumes
        right after the last envelope it yielded (`Last-Event-ID`). When the server no longer
        keeps what followed that point, it yields a `Resync` and goes on with what is kept,
        read over `GET /events`. `progress=True` also yields the live `task.progress` pieces
        (`seq` None; pieces published while disconnected are lost). `on_reconnect(error,
        delay)` is called before each wait. Raises `Unauthorized`/`Forbidden` (and other
        refusals that waiting does not cure) instead of retrying them.
        """
        cursor = b.EventCursor(after, progress, None)
        return self._events(cursor, on_reconnect)

    def _events(self, cursor: b.EventCursor,
                on_reconnect: OnReconnect | None = None) -> Iterator[Envelope | Resync]:
        """events() over a cursor; returns (ends) when the cursor's deadline has passed."""
        settings = self._settings
        catching_up = False
        while not cursor.expired():
            try:
                if catching_up:
                    yield from self._catch_up(cursor)
                    catching_up = False
                read = cursor.read_timeout()
                cursor.opening()
                with self._http.stream("GET", "/events/stream", headers=cursor.stream_headers(),
                                       timeout=b.stream_timeout(settings, cursor, read)) as resp:
                    if resp.status_code != 200:
                        resp.read()
                        raise b.error_of(resp)  # retried below when waiting can cure it
                    parser = SSEParser()
                    for chunk in resp.iter_bytes():
                        cursor.alive()
                        for sse in parser.feed(chunk):
                            item = cursor.accept(sse)
                            if item is None:
                                continue
                            yield item  # type: ignore[misc]
                            if isinstance(item, Resync):
                                catching_up = True
                                break
                        if catching_up or cursor.expired() or cursor.reopen_for_deadline(read):
                            break
                    else:
                        raise ConnectionFailed("the server ended the event stream")
                continue
            except httpx.HTTPError as exc:
                if isinstance(exc, httpx.ReadTimeout) and cursor.expired():
                    return
                reason: DroidError = b.stream_error(exc, settings, read)
                delay = cursor.next_delay()
            except (ConnectionFailed, Timeout) as exc:
                reason, delay = exc, cursor.next_delay()
            except ApiError as exc:
                wait = b.retry_after_of(exc, cursor.failures, settings)
                if wait is None:
                    raise
                cursor.failures += 1
                reason, delay = exc, wait
            remaining = cursor.remaining()
            if remaining is not None:
                if remaining <= 0:
                    return
                delay = min(delay, remaining)
            log.info("event stream interrupted (%s); reconnecting in %.1f s after seq %d",
                     reason, delay, cursor.after)
            if on_reconnect is not None:
                on_reconnect(reason, delay)
            time.sleep(delay)

    def _catch_up(self, cursor: b.EventCursor) -> Iterator[Envelope]:
        """After a resync: what is kept, over GET /events, until the end of the history."""
        while True:
            items = self.request(b.events_page(cursor.after))["items"]
            for envelope in items:
                if cursor.take(envelope) is not None:
                    yield envelope
            if len(items) < b.EVENTS_PAGE:
                return
