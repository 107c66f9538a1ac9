"""Checking that a webhook request came from Droid: `verify_webhook`.

Droid signs its deliveries the Standard Webhooks way (headers `webhook-id`, `webhook-timestamp`,
`webhook-signature`: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, several separated by
spaces while a rotated secret still signs). The check is the `standardwebhooks` package's.
"""
from __future__ import annotations

from typing import Any, Mapping

from standardwebhooks.webhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError as _Invalid

from .errors import WebhookVerificationError


def verify_webhook(headers: Mapping[str, str], body: bytes | str, secret: str) -> dict[str, Any]:
    """Check a webhook request and return its payload (`{"type", "timestamp", "data"}`).

    `headers`: the request's headers (any mapping; names are matched without regard to case).
    `body`: the raw body exactly as received (bytes; a str is taken as its UTF-8 encoding):
    parse it only after this check, since re-encoding JSON changes the bytes that were signed.
    `secret`: the endpoint's `whsec_...` secret. Raises `WebhookVerificationError` when a
    header is missing, the timestamp is more than 5 minutes away from now (a replay), no
    signature matches, or the body is not a JSON object.
    """
    if not secret:
        raise WebhookVerificationError("the webhook secret is empty")
    try:
        hook = Webhook(secret)
    except Exception as exc:  # a secret that is not base64
        raise WebhookVerificationError(f"the webhook secret is not valid: {exc}") from None
    plain = {str(k).lower(): str(v) for k, v in headers.items()}
    try:
        payload = hook.verify(body, plain)
    except _Invalid as exc:
        raise WebhookVerificationError(str(exc)) from None
    except (ValueError, TypeError) as exc:  # a body that is not JSON, or not bytes
        raise WebhookVerificationError(f"the body is not valid: {exc}") from None
    if not isinstance(payload, dict):
        raise WebhookVerificationError("the body is not a JSON object")
    return payload


__all__ = ["verify_webhook", "WebhookVerificationError"]
