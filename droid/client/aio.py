"""The asynchronous client: `AsyncClient`, with the same groups and methods as `Client`, each
awaitable (iterators are async iterators). See `sync.py` for what each call does."""
from __future__ import annotations

import asyncio
import builtins
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, cast

import httpx

from . import _base as b
from ._sse import SSEParser
from .errors import ApiError, ConnectionFailed, DroidError, Timeout, WaitTimeout
from .types import (FINAL_STATUSES, Agent, ApiKey, AuthReply, Envelope, NewApiKey,
                    NewWebhookEndpoint, Resync, Task, TaskPage, User, WebhookDelivery,
                    WebhookEndpoint)

log = logging.getLogger(__name__)

OnReconnect = Callable[[DroidError, float], "Awaitable[None] | None"]


class AsyncClient:
    """A Droid server, called from asyncio: the same arguments, groups and methods as
    `droid.client.Client`, awaitable. `async with AsyncClient() as client: ...`."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 token: str | None = None, timeout: float = b.DEFAULT_TIMEOUT_S,
                 max_retries: int = b.DEFAULT_MAX_RETRIES,
                 max_retry_wait: float = b.DEFAULT_MAX_RETRY_WAIT_S) -> None:
        self._settings = b.resolve(base_url, api_key, token, timeout, max_retries,
                                   max_retry_wait)
        self._http = httpx.AsyncClient(base_url=self._settings.base_url, timeout=timeout,
                                       headers=self._settings.headers(), follow_redirects=False)
        self.auth = AsyncAuth(self)
        self.tasks = AsyncTasks(self)
        self.agents = AsyncAgents(self)
        self.api_keys = AsyncApiKeys(self)
        self.webhooks = AsyncWebhooks(self)

    @property
    def base_url(self) -> str:
        return self._settings.base_url

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def request(self, call: b.Call) -> Any:
        """Perform one call, with the retry policy; returns the decoded answer."""
        settings = self._settings
        attempt = 0
        while True:
            try:
                response = await self._http.request(call.method, call.path, json=call.json,
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
            await asyncio.sleep(delay)
            attempt += 1

    async def health(self) -> dict[str, Any]:
        """GET /health."""
        return await self.request(b.Call("GET", "/health"))

    async def last_seq(self) -> int:
        """The seq of the user's latest stored envelope (0 before the first)."""
        return int((await self.request(b.last_seq()))["lastSeq"])

    async def events_page(self, after: int = 0, limit: int = b.EVENTS_PAGE) -> dict[str, Any]:
        """GET /events: `{items, lastSeq}`."""
        return await self.request(b.events_page(after, limit))

    def events(self, after: int = 0, *, progress: bool = False,
               on_reconnect: OnReconnect | None = None) -> AsyncIterator[Envelope | Resync]:
        """The user's envelopes after `after`, exactly once and in order, across drops and
        restarts (see `Client.events`). `on_reconnect` may be a coroutine function."""
        return self._events(b.EventCursor(after, progress, None), on_reconnect)

    async def _events(self, cursor: b.EventCursor, on_reconnect: OnReconnect | None = None
                      ) -> AsyncIterator[Envelope | Resync]:
        settings = self._settings
        catching_up = False
        while not cursor.expired():
            try:
                if catching_up:
                    async for envelope in self._catch_up(cursor):
                        yield envelope
                    catching_up = False
                read = cursor.read_timeout()
                cursor.opening()
                async with self._http.stream(
                        "GET", "/events/stream", headers=cursor.stream_headers(),
                        timeout=b.stream_timeout(settings, cursor, read)) as resp:
                    if resp.status_code != 200:
                        await resp.aread()
                        raise b.error_of(resp)  # retried below when waiting can cure it
                    parser = SSEParser()
                    ended = True
                    async for chunk in resp.aiter_bytes():
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
                            ended = False
                            break
                    if ended:
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
                outcome = on_reconnect(reason, delay)
                if asyncio.iscoroutine(outcome):
                    await outcome
            await asyncio.sleep(delay)

    async def _catch_up(self, cursor: b.EventCursor) -> AsyncIterator[Envelope]:
        while True:
            items = (await self.request(b.events_page(cursor.after)))["items"]
            for envelope in items:
                if cursor.take(envelope) is not None:
                    yield envelope
            if len(items) < b.EVENTS_PAGE:
                return


class _Group:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def _call(self, call: b.Call) -> Any:
        return await self._client.request(call)


class AsyncAuth(_Group):
    async def register(self, email: str, password: str, name: str | None = None) -> AuthReply:
        """POST /auth/register."""
        return await self._call(b.register(email, password, name))

    async def login(self, email: str, password: str) -> AuthReply:
        """POST /auth/login."""
        return await self._call(b.login(email, password))

    async def me(self) -> User:
        """GET /auth/me."""
        return await self._call(b.Call("GET", "/auth/me"))


class AsyncTasks(_Group):
    async def create(self, prompt: str, *, agent: str | None = None,
                     priority: str | None = None, metadata: dict[str, Any] | None = None,
                     idempotency_key: str | None = None) -> Task:
        """POST /tasks (see `Client.tasks.create`)."""
        return await self._call(b.create_task(prompt, agent, priority, metadata,
                                              idempotency_key))

    async def get(self, task_id: str) -> Task:
        """GET /tasks/:id."""
        return await self._call(b.Call("GET", f"/tasks/{b.seg(task_id)}"))

    async def page(self, *, status: str | None = None, agent: str | None = None,
                   limit: int | None = None, cursor: str | None = None) -> TaskPage:
        """One page of GET /tasks."""
        return await self._call(b.list_tasks(status, agent, limit, cursor))

    async def list(self, *, status: str | None = None, agent: str | None = None,
                   page_size: int | None = None) -> AsyncIterator[Task]:
        """Every task of the caller, newest first, following `nextCursor`."""
        cursor = None
        while True:
            page = await self.page(status=status, agent=agent, limit=page_size, cursor=cursor)
            for task in page["items"]:
                yield task
            cursor = page.get("nextCursor")
            if not cursor:
                return

    async def cancel(self, task_id: str) -> Task:
        """POST /tasks/:id/cancel."""
        return await self._call(b.Call("POST", f"/tasks/{b.seg(task_id)}/cancel",
                                       idempotent=False))

    async def watch(self, task_id: str, *, after: int | None = None, progress: bool = True,
                    timeout: float | None = None, on_reconnect: OnReconnect | None = None
                    ) -> AsyncIterator[Envelope | Task]:
        """The task's envelopes from now on, then the finished task (see `Client.tasks.watch`)."""
        deadline = b.deadline(timeout)
        start = await self._client.last_seq() if after is None else after
        cursor = b.EventCursor(start, progress, deadline)
        task = await self.get(task_id)
        if task["status"] in FINAL_STATUSES:
            yield task
            return
        async for item in self._client._events(cursor, on_reconnect):
            if isinstance(item, Resync):
                task = await self.get(task_id)
                if task["status"] in FINAL_STATUSES:
                    yield task
                    return
                continue
            if item["data"].get("taskId") != task_id:
                continue
            yield item
            if item["event"] in b.FINAL_EVENTS:
                yield await self.get(task_id)
                return
        raise WaitTimeout(f"task {task_id} did not finish within {timeout or 0:g} s", task_id)

    async def wait(self, task_id: str, *, timeout: float | None = None,
                   after: int | None = None) -> Task:
        """The task once completed, failed or cancelled; `WaitTimeout` after `timeout` s."""
        last: Any = None
        async for last in self.watch(task_id, after=after, progress=False, timeout=timeout):
            pass
        return last

    async def stream(self, task_id: str, *, timeout: float | None = None,
                     after: int | None = None) -> AsyncIterator[str | Task]:
        """The answer's pieces (str) as they come, then the finished task."""
        async for item in self.watch(task_id, after=after, progress=True, timeout=timeout):
            if "event" not in item:
                yield cast(Task, item)
            else:
                envelope = cast(Envelope, item)
                if envelope["event"] == "task.progress":
                    yield envelope["data"].get("delta") or ""


class AsyncAgents(_Group):
    async def list(self) -> builtins.list[Agent]:
        """GET /agents."""
        return await self._call(b.Call("GET", "/agents"))

    async def create(self, name: str, *, model: str | None = None,
                     system_prompt: str | None = None, description: str | None = None) -> Agent:
        """POST /agents."""
        return await self._call(b.create_agent(name, model, system_prompt, description))


class AsyncApiKeys(_Group):
    async def create(self, name: str, *, scope: str = "write") -> NewApiKey:
        """POST /api-keys (`key` is in this answer only)."""
        return await self._call(b.Call("POST", "/api-keys", json={"name": name, "scope": scope},
                                       idempotent=False))

    async def list(self) -> builtins.list[ApiKey]:
        """GET /api-keys."""
        return await self._call(b.Call("GET", "/api-keys"))

    async def revoke(self, key_id: str) -> None:
        """DELETE /api-keys/:id."""
        await self._call(b.Call("DELETE", f"/api-keys/{b.seg(key_id)}", empty=True))


class AsyncWebhooks(_Group):
    async def create(self, url: str, *, events: builtins.list[str] | None = None,
                     description: str | None = None) -> NewWebhookEndpoint:
        """POST /webhooks (`secret` is in this answer only)."""
        return await self._call(b.create_webhook(url, events, description))

    async def list(self) -> builtins.list[WebhookEndpoint]:
        """GET /webhooks."""
        return await self._call(b.Call("GET", "/webhooks"))

    async def get(self, endpoint_id: str) -> WebhookEndpoint:
        """GET /webhooks/:id."""
        return await self._call(b.Call("GET", f"/webhooks/{b.seg(endpoint_id)}"))

    async def update(self, endpoint_id: str, *, url: str | None = None,
                     events: builtins.list[str] | None = None, description: str | None = None,
                     enabled: bool | None = None) -> WebhookEndpoint:
        """PATCH /webhooks/:id."""
        return await self._call(b.update_webhook(endpoint_id, url, events, description,
                                                 enabled))

    async def delete(self, endpoint_id: str) -> None:
        """DELETE /webhooks/:id."""
        await self._call(b.Call("DELETE", f"/webhooks/{b.seg(endpoint_id)}", empty=True))

    async def rotate_secret(self, endpoint_id: str) -> NewWebhookEndpoint:
        """POST /webhooks/:id/rotate-secret."""
        return await self._call(b.Call("POST", f"/webhooks/{b.seg(endpoint_id)}/rotate-secret",
                                       idempotent=False))

    async def test(self, endpoint_id: str) -> WebhookDelivery:
        """POST /webhooks/:id/test."""
        return await self._call(b.Call("POST", f"/webhooks/{b.seg(endpoint_id)}/test",
                                       idempotent=False))

    async def delivery_page(self, endpoint_id: str, *, status: str | None = None,
                            limit: int | None = None, cursor: str | None = None
                            ) -> dict[str, Any]:
        """One page of GET /webhooks/:id/deliveries."""
        return await self._call(b.list_deliveries(endpoint_id, status, limit, cursor))

    async def deliveries(self, endpoint_id: str, *, status: str | None = None,
                         page_size: int | None = None) -> AsyncIterator[WebhookDelivery]:
        """Every delivery of the endpoint, newest first."""
        cursor = None
        while True:
            page = await self.delivery_page(endpoint_id, status=status, limit=page_size,
                                            cursor=cursor)
            for delivery in page["items"]:
                yield delivery
            cursor = page.get("nextCursor")
            if not cursor:
                return

    async def retry(self, endpoint_id: str, delivery_id: str) -> WebhookDelivery:
        """POST /webhooks/:id/deliveries/:deliveryId/retry."""
        return await self._call(b.Call(
            "POST", f"/webhooks/{b.seg(endpoint_id)}/deliveries/{b.seg(delivery_id)}/retry",
            idempotent=False))
