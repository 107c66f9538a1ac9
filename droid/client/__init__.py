"""The Python client of Droid: `Client` (synchronous) and `AsyncClient` (asyncio), with the same
groups and methods, plus `verify_webhook` for webhook receivers.

    from droid.client import Client

    with Client() as droid:                  # DROID_URL and DROID_API_KEY
        task = droid.tasks.create("Write a haiku about the sea")
        for piece in droid.tasks.stream(task["id"]):
            print(piece if isinstance(piece, str) else "", end="", flush=True)

It imports nothing of the server (no Tornado, PyMongo or openai): httpx, and standardwebhooks
for webhook signatures. Errors are `droid.client.errors` exceptions (`NotFound`, `Conflict`,
`RateLimited` ...), all `DroidError`.
"""
from __future__ import annotations

from .aio import AsyncClient
from .errors import (ApiError, BadRequest, Conflict, ConnectionFailed, DroidError, Forbidden,
                     NotFound, PayloadTooLarge, RateLimited, ServerError, ServiceUnavailable,
                     Timeout, Unauthorized, WaitTimeout, WebhookVerificationError)
from .sync import Client
from .types import (FINAL_STATUSES, Agent, ApiKey, Envelope, NewApiKey, NewWebhookEndpoint,
                    Resync, Task, WebhookDelivery, WebhookEndpoint)
from .webhooks import verify_webhook

__all__ = [
    "Client", "AsyncClient", "verify_webhook", "Resync", "FINAL_STATUSES",
    "DroidError", "ApiError", "BadRequest", "Unauthorized", "Forbidden", "NotFound", "Conflict",
    "PayloadTooLarge", "RateLimited", "ServerError", "ServiceUnavailable", "ConnectionFailed",
    "Timeout", "WaitTimeout", "WebhookVerificationError",
    "Task", "Agent", "ApiKey", "NewApiKey", "Envelope", "WebhookEndpoint", "NewWebhookEndpoint",
    "WebhookDelivery",
]
