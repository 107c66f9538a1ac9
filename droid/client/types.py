"""The shapes the Droid API answers with, as TypedDicts (the JSON as sent: camelCase keys,
ISO-8601 UTC timestamps as strings, `None` for a field with no value yet), and `Resync`."""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, TypedDict

TaskStatus = Literal["pending", "processing", "completed", "failed", "cancelled"]
Priority = Literal["low", "normal", "high", "urgent"]
FINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


class User(TypedDict):
    id: str
    email: str | None
    name: str | None
    createdAt: str | None


class AuthReply(TypedDict):
    accessToken: str
    tokenType: str
    expiresIn: int
    user: User


class Agent(TypedDict):
    id: str
    name: str
    description: str | None
    model: str | None
    systemPrompt: str | None
    ownerId: str | None
    createdAt: str | None


class Task(TypedDict):
    id: str
    userId: str
    agentId: str
    status: TaskStatus
    priority: Priority
    prompt: str
    response: str | None
    error: str | None
    tokensUsed: int | None
    executionTimeMs: int | None
    retryCount: int
    metadata: dict[str, Any] | None
    createdAt: str
    updatedAt: str
    startedAt: str | None
    completedAt: str | None


class TaskPage(TypedDict):
    items: list[Task]
    nextCursor: str | None


class Envelope(TypedDict):
    """One event of the user: `seq` numbers the stored ones (None for live `task.progress`)."""

    event: str
    data: dict[str, Any]
    timestamp: str
    seq: int | None


class ApiKey(TypedDict):
    id: str
    name: str
    prefix: str
    scope: Literal["read", "write"]
    createdAt: str
    lastUsedAt: str | None


class NewApiKey(ApiKey):
    """An API key as created: `key` is shown only this once."""

    key: str


class WebhookEndpoint(TypedDict):
    id: str
    url: str
    events: list[str]
    description: str | None
    enabled: bool
    disabledReason: str | None
    createdAt: str
    updatedAt: str


class NewWebhookEndpoint(WebhookEndpoint):
    """An endpoint as created or after rotate-secret: `secret` is shown only then."""

    secret: str


class DeliveryAttempt(TypedDict):
    at: str
    statusCode: int | None
    durationMs: int | None
    error: str | None
    response: str | None


class WebhookDelivery(TypedDict):
    id: str
    endpointId: str
    event: str
    seq: int | None
    webhookId: str
    status: Literal["pending", "succeeded", "failed"]
    attempts: list[DeliveryAttempt]
    nextAttemptAt: str | None
    createdAt: str
    updatedAt: str


@dataclasses.dataclass(frozen=True)
class Resync:
    """Yielded by `events()` when the server no longer keeps what followed `after`: the
    envelopes numbered `after + 1` to `oldest_seq - 1` are lost to this client (refetch the
    state they described, `tasks.list` for instance). The iterator then goes on with what is
    kept, from `oldest_seq`, read over `GET /events`."""

    after: int
    oldest_seq: int
    event: str = "resync"
