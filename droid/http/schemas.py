"""Request and response models: they validate requests and generate /openapi.json.

They also bound what a user may store (`metadata`): whatever is accepted here must be storable
by both stores (SQLite keeps it as JSON text, MongoDB keeps envelopes as BSON), publishable, and
readable back, for good.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, EmailStr, Field, StringConstraints, field_validator

Text = Annotated[str, StringConstraints(strip_whitespace=True)]
Priority = Literal["low", "normal", "high", "urgent"]
Status = Literal["pending", "processing", "completed", "failed", "cancelled"]


METADATA_MAX_DEPTH = 32          # objects and arrays nested in metadata, metadata itself included
METADATA_MAX_BYTES = 16 * 1024   # metadata encoded as compact JSON
_INT64 = (-2**63, 2**63 - 1)     # what BSON can hold; orjson also reads integers up to 2**64 - 1


def check_metadata(value: dict[str, Any]) -> dict[str, Any]:
    """Refuse metadata that some layer could not take (ValueError says which rule).

    Depth: orjson refuses to encode more than 254 levels, so deeper metadata would be accepted
    and then make every later read of the task or its events fail. Keys: BSON keys are C strings
    (no NUL), and MongoDB reads an object with `$ref`/`$id` keys back as a DBRef, which has no
    JSON form, so keys starting with `$` are refused. Integers: BSON holds 64-bit signed ones.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > METADATA_MAX_DEPTH:
            raise ValueError(f"metadata must be nested at most {METADATA_MAX_DEPTH} levels deep")
        if isinstance(node, dict):
            for key, item in node.items():
                if "\x00" in key:
                    raise ValueError("metadata keys must not contain NUL characters")
                if key.startswith("$"):
                    raise ValueError("metadata keys must not start with $")
                if isinstance(item, (dict, list)):
                    stack.append((item, depth + 1))
                elif isinstance(item, int) and not isinstance(item, bool):
                    _check_int(item)
        else:
            for item in node:
                if isinstance(item, (dict, list)):
                    stack.append((item, depth + 1))
                elif isinstance(item, int) and not isinstance(item, bool):
                    _check_int(item)
    if len(orjson.dumps(value)) > METADATA_MAX_BYTES:
        raise ValueError(f"metadata must be at most {METADATA_MAX_BYTES} bytes as JSON")
    return value


def _check_int(value: int) -> None:
    if not _INT64[0] <= value <= _INT64[1]:
        raise ValueError("metadata integers must fit in 64 bits (-2^63 to 2^63-1)")


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class RegisterBody(Strict):
    email: EmailStr = Field(max_length=254)
    password: str = Field(min_length=8, max_length=256)
    name: Annotated[Text, Field(min_length=1, max_length=100)] | None = None


class LoginBody(Strict):
    email: str = Field(min_length=1, max_length=254)
    password: str = Field(min_length=1, max_length=256)


class AgentBody(Strict):
    name: Annotated[Text, Field(min_length=1, max_length=100)]
    model: Annotated[Text, Field(min_length=1, max_length=200)] | None = None
    systemPrompt: str | None = Field(default=None, max_length=32000)
    description: str | None = Field(default=None, max_length=1000)


class TaskBody(Strict):
    prompt: str = Field(min_length=1, max_length=32000)
    agentId: str | None = Field(default=None, max_length=64)
    priority: Priority = "normal"
    metadata: dict[str, Any] | None = Field(
        default=None, description=(
            f"Any JSON object, returned as given: at most {METADATA_MAX_BYTES} bytes as JSON, "
            f"nested at most {METADATA_MAX_DEPTH} levels, keys without NUL and not starting "
            "with $, integers within 64 bits"))

    @field_validator("metadata")
    @classmethod
    def storable(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else check_metadata(value)

    @field_validator("prompt")
    @classmethod
    def not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must be a non-empty string")
        return value


class TaskQuery(Strict):
    model_config = ConfigDict(strict=False, extra="ignore")
    status: Status | None = None
    agentId: str | None = Field(default=None, max_length=64)
    limit: int = Field(default=20, ge=1, le=100)
    cursor: str | None = Field(default=None, max_length=512)


class EventsQuery(Strict):
    model_config = ConfigDict(strict=False, extra="ignore")
    after: int = Field(default=0, ge=0, le=2**53)
    limit: int = Field(default=100, ge=1, le=1000)


class ApiKeyBody(Strict):
    name: Annotated[Text, Field(min_length=1, max_length=100)]
    scope: Literal["read", "write"] = "write"


WebhookEvent = Literal["task.created", "task.processing", "task.pending", "task.completed",
                       "task.failed", "task.cancelled"]
TERMINAL_EVENTS = ["task.completed", "task.failed", "task.cancelled"]
WEBHOOK_URL_MAX = 2048


def _unique(events: list[str] | None) -> list[str] | None:
    return None if events is None else list(dict.fromkeys(events))


class WebhookBody(Strict):
    url: str = Field(min_length=1, max_length=WEBHOOK_URL_MAX)
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list(TERMINAL_EVENTS), min_length=1, max_length=10,
        description="task.* events to deliver (task.progress is live only and never "
                    "delivered); default: the terminal ones")
    description: str | None = Field(default=None, max_length=500)

    @field_validator("events")
    @classmethod
    def once_each(cls, value: list[str]) -> list[str]:
        return _unique(value)


class WebhookPatch(Strict):
    url: str | None = Field(default=None, min_length=1, max_length=WEBHOOK_URL_MAX)
    events: list[WebhookEvent] | None = Field(default=None, min_length=1, max_length=10)
    description: str | None = Field(default=None, max_length=500)
    enabled: bool | None = None

    @field_validator("events")
    @classmethod
    def once_each(cls, value: list[str] | None) -> list[str] | None:
        return _unique(value)


class DeliveriesQuery(Strict):
    model_config = ConfigDict(strict=False, extra="ignore")
    status: Literal["pending", "succeeded", "failed"] | None = None
    limit: int = Field(default=20, ge=1, le=100)
    cursor: str | None = Field(default=None, max_length=512)


# responses (documentation only) ----------------------------------------------------------------

class User(BaseModel):
    id: str
    email: str
    name: str | None
    createdAt: str | None


class AuthReply(BaseModel):
    accessToken: str
    tokenType: Literal["Bearer"]
    expiresIn: int
    user: User


class Agent(BaseModel):
    id: str
    name: str
    description: str | None
    model: str | None
    systemPrompt: str | None
    ownerId: str | None
    createdAt: str


class Task(BaseModel):
    id: str
    userId: str
    agentId: str
    status: Status
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


class TaskPage(BaseModel):
    items: list[Task]
    nextCursor: str | None


class Envelope(BaseModel):
    event: str
    data: dict[str, Any]
    timestamp: str
    seq: int | None


class EventPage(BaseModel):
    items: list[Envelope]
    lastSeq: int


class Health(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: str
    db: str


class ErrorReply(BaseModel):
    statusCode: int
    error: str
    message: str | list[str]


class ApiKey(BaseModel):
    id: str
    name: str
    prefix: str
    scope: Literal["read", "write"]
    createdAt: str
    lastUsedAt: str | None


class ApiKeyCreated(ApiKey):
    key: str = Field(description="droid_sk_ + base64url of 32 random bytes; shown only here")


class WebhookEndpoint(BaseModel):
    id: str
    url: str
    events: list[str]
    description: str | None
    enabled: bool
    disabledReason: str | None
    createdAt: str
    updatedAt: str


class WebhookEndpointSecret(WebhookEndpoint):
    secret: str = Field(description="whsec_ + base64 of 32 random bytes; shown only when "
                                    "created and by rotate-secret")


class DeliveryAttempt(BaseModel):
    at: str
    statusCode: int | None
    durationMs: int
    error: str | None
    response: str | None = Field(description="the first 1 KiB of the answer's body")


class Delivery(BaseModel):
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


class DeliveryPage(BaseModel):
    items: list[Delivery]
    nextCursor: str | None


class WebhookPayload(BaseModel):
    """The body of a delivery: one envelope of a task event (or webhook.test)."""
    type: str = Field(description="the event: task.completed, ..., or webhook.test")
    timestamp: str = Field(description="when the event happened (the envelope's timestamp)")
    data: dict[str, Any] = Field(description="the envelope's data plus its seq")
