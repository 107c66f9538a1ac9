"""Request and response models: they validate requests and generate /openapi.json."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, EmailStr, Field, StringConstraints, field_validator

Text = Annotated[str, StringConstraints(strip_whitespace=True)]
Priority = Literal["low", "normal", "high", "urgent"]
Status = Literal["pending", "processing", "completed", "failed", "cancelled"]


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
        default=None, description="Any JSON object; returned as given")

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
