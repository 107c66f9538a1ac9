"""The synchronous client's groups of calls: `client.auth`, `.tasks`, `.agents`, `.api_keys`
and `.webhooks` (`aio.py` has the same methods, awaitable)."""
from __future__ import annotations

import builtins
from typing import TYPE_CHECKING, Any, Iterator, cast

from . import _base as b
from .errors import WaitTimeout
from .types import (FINAL_STATUSES, Agent, ApiKey, AuthReply, Envelope, NewApiKey,
                    NewWebhookEndpoint, Resync, Task, TaskPage, User, WebhookDelivery,
                    WebhookEndpoint)

if TYPE_CHECKING:
    from .sync import Client, OnReconnect


class _Group:
    def __init__(self, client: Client) -> None:
        self._client = client

    def _call(self, call: b.Call) -> Any:
        return self._client.request(call)


class Auth(_Group):
    def register(self, email: str, password: str, name: str | None = None) -> AuthReply:
        """POST /auth/register: a new account and its first token (`accessToken`)."""
        return self._call(b.register(email, password, name))

    def login(self, email: str, password: str) -> AuthReply:
        """POST /auth/login: a token (`accessToken`, a JWT) for e-mail and password."""
        return self._call(b.login(email, password))

    def me(self) -> User:
        """GET /auth/me: whom the client's credential belongs to."""
        return self._call(b.Call("GET", "/auth/me"))


class Tasks(_Group):
    def create(self, prompt: str, *, agent: str | None = None, priority: str | None = None,
               metadata: dict[str, Any] | None = None,
               idempotency_key: str | None = None) -> Task:
        """POST /tasks. `agent` is an agent id (default: the default agent); `priority` one of
        low, normal, high, urgent. Without `idempotency_key` the client makes one, so that a
        retry after a lost answer cannot create the task twice."""
        return self._call(b.create_task(prompt, agent, priority, metadata, idempotency_key))

    def get(self, task_id: str) -> Task:
        """GET /tasks/:id (`NotFound` when it is not the caller's)."""
        return self._call(b.Call("GET", f"/tasks/{b.seg(task_id)}"))

    def page(self, *, status: str | None = None, agent: str | None = None,
             limit: int | None = None, cursor: str | None = None) -> TaskPage:
        """One page of GET /tasks: `{items, nextCursor}`, newest first."""
        return self._call(b.list_tasks(status, agent, limit, cursor))

    def list(self, *, status: str | None = None, agent: str | None = None,
             page_size: int | None = None) -> Iterator[Task]:
        """Every task of the caller (newest first), following `nextCursor` page by page."""
        cursor = None
        while True:
            page = self.page(status=status, agent=agent, limit=page_size, cursor=cursor)
            yield from page["items"]
            cursor = page.get("nextCursor")
            if not cursor:
                return

    def cancel(self, task_id: str) -> Task:
        """POST /tasks/:id/cancel: the task, now cancelled (`Conflict` when it had finished)."""
        return self._call(b.Call("POST", f"/tasks/{b.seg(task_id)}/cancel", idempotent=False))

    def watch(self, task_id: str, *, after: int | None = None, progress: bool = True,
              timeout: float | None = None,
              on_reconnect: OnReconnect | None = None) -> Iterator[Envelope | Task]:
        """The task's envelopes after seq `after` (default: from now on; `task.progress` too
        with `progress`), then the finished task (a Task, read once its final envelope came).
        Resumes across drops and restarts as `events()` does. Raises `WaitTimeout` when
        `timeout` seconds pass first.

        To miss none of a new task's envelopes, take `after = client.last_seq()` before
        creating it."""
        deadline = b.deadline(timeout)
        start = self._client.last_seq() if after is None else after
        cursor = b.EventCursor(start, progress, deadline)
        task = self.get(task_id)
        if task["status"] in FINAL_STATUSES:
            yield task
            return
        for item in self._client._events(cursor, on_reconnect):
            if isinstance(item, Resync):  # its envelopes may be among the lost ones
                task = self.get(task_id)
                if task["status"] in FINAL_STATUSES:
                    yield task
                    return
                continue
            if item["data"].get("taskId") != task_id:
                continue
            yield item
            if item["event"] in b.FINAL_EVENTS:
                yield self.get(task_id)
                return
        raise WaitTimeout(f"task {task_id} did not finish within {timeout or 0:g} s", task_id)

    def wait(self, task_id: str, *, timeout: float | None = None,
             after: int | None = None) -> Task:
        """Block until the task is completed, failed or cancelled, and return it. Raises
        `WaitTimeout` after `timeout` seconds (None: no limit)."""
        last: Any = None
        for last in self.watch(task_id, after=after, progress=False, timeout=timeout):
            pass
        return last

    def stream(self, task_id: str, *, timeout: float | None = None,
               after: int | None = None) -> Iterator[str | Task]:
        """The answer's pieces (str) as the agent writes them, then the finished task (a Task
        dict, whose `response` is the whole answer: pieces published while the connection was
        down are not replayed). Raises `WaitTimeout` after `timeout` seconds."""
        for item in self.watch(task_id, after=after, progress=True, timeout=timeout):
            if "event" not in item:
                yield cast(Task, item)
            else:
                envelope = cast(Envelope, item)
                if envelope["event"] == "task.progress":
                    yield envelope["data"].get("delta") or ""


class Agents(_Group):
    def list(self) -> builtins.list[Agent]:
        """GET /agents: the built-in default agent, then the caller's own."""
        return self._call(b.Call("GET", "/agents"))

    def create(self, name: str, *, model: str | None = None, system_prompt: str | None = None,
               description: str | None = None) -> Agent:
        """POST /agents."""
        return self._call(b.create_agent(name, model, system_prompt, description))


class ApiKeys(_Group):
    def create(self, name: str, *, scope: str = "write") -> NewApiKey:
        """POST /api-keys: a new key (`key` is in this answer only). `scope`: read or write."""
        return self._call(b.Call("POST", "/api-keys", json={"name": name, "scope": scope},
                                 idempotent=False))

    def list(self) -> builtins.list[ApiKey]:
        """GET /api-keys: the caller's keys (without their secret), oldest first."""
        return self._call(b.Call("GET", "/api-keys"))

    def revoke(self, key_id: str) -> None:
        """DELETE /api-keys/:id: the key stops working at once."""
        self._call(b.Call("DELETE", f"/api-keys/{b.seg(key_id)}", empty=True))


class Webhooks(_Group):
    def create(self, url: str, *, events: builtins.list[str] | None = None,
               description: str | None = None) -> NewWebhookEndpoint:
        """POST /webhooks: a new endpoint with its signing `secret` (shown only here)."""
        return self._call(b.create_webhook(url, events, description))

    def list(self) -> builtins.list[WebhookEndpoint]:
        """GET /webhooks."""
        return self._call(b.Call("GET", "/webhooks"))

    def get(self, endpoint_id: str) -> WebhookEndpoint:
        """GET /webhooks/:id."""
        return self._call(b.Call("GET", f"/webhooks/{b.seg(endpoint_id)}"))

    def update(self, endpoint_id: str, *, url: str | None = None,
               events: builtins.list[str] | None = None, description: str | None = None,
               enabled: bool | None = None) -> WebhookEndpoint:
        """PATCH /webhooks/:id (only the fields given; re-enabling clears `disabledReason`)."""
        return self._call(b.update_webhook(endpoint_id, url, events, description, enabled))

    def delete(self, endpoint_id: str) -> None:
        """DELETE /webhooks/:id."""
        self._call(b.Call("DELETE", f"/webhooks/{b.seg(endpoint_id)}", empty=True))

    def rotate_secret(self, endpoint_id: str) -> NewWebhookEndpoint:
        """POST /webhooks/:id/rotate-secret: a new secret (the old one signs too for 24 h)."""
        return self._call(b.Call("POST", f"/webhooks/{b.seg(endpoint_id)}/rotate-secret",
                                 idempotent=False))

    def test(self, endpoint_id: str) -> WebhookDelivery:
        """POST /webhooks/:id/test: sends a `webhook.test` event; returns its delivery."""
        return self._call(b.Call("POST", f"/webhooks/{b.seg(endpoint_id)}/test",
                                 idempotent=False))

    def delivery_page(self, endpoint_id: str, *, status: str | None = None,
                      limit: int | None = None, cursor: str | None = None) -> dict[str, Any]:
        """One page of GET /webhooks/:id/deliveries: `{items, nextCursor}`, newest first."""
        return self._call(b.list_deliveries(endpoint_id, status, limit, cursor))

    def deliveries(self, endpoint_id: str, *, status: str | None = None,
                   page_size: int | None = None) -> Iterator[WebhookDelivery]:
        """Every delivery of the endpoint (newest first), following `nextCursor`."""
        cursor = None
        while True:
            page = self.delivery_page(endpoint_id, status=status, limit=page_size,
                                      cursor=cursor)
            yield from page["items"]
            cursor = page.get("nextCursor")
            if not cursor:
                return

    def retry(self, endpoint_id: str, delivery_id: str) -> WebhookDelivery:
        """POST /webhooks/:id/deliveries/:deliveryId/retry: send that delivery again now."""
        return self._call(b.Call(
            "POST", f"/webhooks/{b.seg(endpoint_id)}/deliveries/{b.seg(delivery_id)}/retry",
            idempotent=False))
