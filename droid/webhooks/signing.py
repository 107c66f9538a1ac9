"""Signing secrets and signatures, per the Standard Webhooks spec, through the
`standardwebhooks` package (MIT): `webhook-signature` is `v1,` + base64 of HMAC-SHA256 over
`{webhook-id}.{webhook-timestamp}.{body}`, one such signature per secret, space-separated.
"""
from __future__ import annotations

import base64
import datetime as dt
import functools
import secrets

from standardwebhooks import Webhook

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """`whsec_` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


@functools.lru_cache(maxsize=1024)
def _signer(secret: str) -> Webhook:
    return Webhook(secret)  # decodes the secret once, not at every delivery


def signature(secrets_: list[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: a signature by each secret (the current one first)."""
    when = dt.datetime.fromtimestamp(timestamp, dt.timezone.utc)
    text = body.decode()
    return " ".join(_signer(secret).sign(msg_id, when, text) for secret in secrets_)


def headers(secrets_: list[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers of one attempt (the timestamp is the attempt's)."""
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(secrets_, msg_id, timestamp, body)}
