"""Webhook endpoints and their delivery log, as the REST routes see them.

An endpoint belongs to one user, who sees only their own (404 otherwise). Its secret is shown
when it is created and when it is rotated; after a rotation the old secret signs beside the new
one for ROTATION_OVERLAP_S. An endpoint starts at the present: its cursor is its owner's last
seq, and only envelopes after it become deliveries (droid/webhooks/dispatcher.py); so does an
endpoint enabled again.
"""
from __future__ import annotations

import datetime as dt
import logging
import uuid
from typing import Any, Callable

from ..errors import Conflict, Invalid, NotFound
from ..store import Store
from ..tasks.service import decode_cursor, encode_cursor
from ..util import dumps, iso, new_id, utcnow
from .signing import new_secret
from .ssrf import Refused, check_url, checked_addresses

log = logging.getLogger(__name__)

MAX_ENDPOINTS = 10
ROTATION_OVERLAP_S = 24 * 3600
TEST_EVENT = "webhook.test"
_IDS = uuid.UUID("1b0f3c1e-63d5-4b0e-9a55-2f1d2f4c8e11")  # namespace of deliveries' ids


def endpoint_json(doc: dict) -> dict:
    return {"id": doc["_id"], "url": doc["url"], "events": list(doc["events"]),
            "description": doc.get("description"), "enabled": bool(doc["enabled"]),
            "disabledReason": doc.get("disabledReason"), "createdAt": iso(doc["createdAt"]),
            "updatedAt": iso(doc["updatedAt"])}


def delivery_json(doc: dict) -> dict:
    return {"id": doc["_id"], "endpointId": doc["endpointId"], "event": doc["event"],
            "seq": doc.get("seq"), "webhookId": doc["webhookId"], "status": doc["status"],
            "attempts": list(doc.get("attempts") or ()),
            "nextAttemptAt": iso(doc.get("nextAttemptAt")) if doc["status"] == "pending"
            else None,
            "createdAt": iso(doc["createdAt"]), "updatedAt": iso(doc["updatedAt"])}


def new_delivery(endpoint: dict, event: str, seq: int | None, timestamp: str, data: dict, *,
                 attempts_left: int, now: dt.datetime, due: dt.datetime | None = None) -> dict:
    """A pending delivery, due now. One of an event has an id made from (endpoint, seq): the
    same delivery whoever makes it, so it is stored once (Store.advance_webhook)."""
    ident = uuid.uuid5(_IDS, f"{endpoint['_id']}:{seq}") if seq is not None else uuid.uuid4()
    payload = {"type": event, "timestamp": timestamp,
               "data": {**data, "seq": seq} if seq is not None else data}
    return {"_id": str(ident), "endpointId": endpoint["_id"], "userId": endpoint["userId"],
            "event": event, "seq": seq, "webhookId": f"msg_{ident.hex}",
            "payload": dumps(payload).decode(), "status": "pending", "attempts": [],
            "attemptsLeft": attempts_left, "nextAttemptAt": due or now, "claim": None,
            "createdAt": now, "updatedAt": now}


class WebhookService:
    """Endpoint CRUD, secret rotation, test events and the delivery log.

    `changed(user_id)` is called when a user's endpoints change here (the dispatcher forgets
    what it knew of them), `due()` when a delivery is made due here (the deliverer wakes up).
    """

    def __init__(self, store: Store, *, production: bool, allow_private: bool,
                 attempts: int, changed: Callable[[str], None] | None = None,
                 due: Callable[[], None] | None = None) -> None:
        self.store = store
        self.production = production
        self.allow_private = allow_private
        self.attempts = attempts
        self.lookup: Any = None  # the name lookup of the SSRF check (tests replace it)
        self.changed: Callable[[str], None] = changed or (lambda user_id: None)
        self.due: Callable[[], None] = due or (lambda: None)

    async def check(self, url: str) -> str:
        """The URL, once it and every address of its host are fit for webhooks (400 if not)."""
        try:
            parts = check_url(url, production=self.production)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            await checked_addresses(parts.hostname or "", port,
                                    allow_private=self.allow_private, lookup=self.lookup)
        except Refused as exc:
            raise Invalid(str(exc)) from None
        except (OSError, TimeoutError, UnicodeError):
            raise Invalid(f"url host {parts.hostname} cannot be resolved") from None
        return url.strip()

    async def create(self, user_id: str, *, url: str, events: list[str],
                     description: str | None) -> dict:
        url = await self.check(url)
        now = utcnow()
        doc = {"_id": new_id(), "userId": user_id, "url": url, "events": events,
               "description": description, "enabled": True, "disabledReason": None,
               "secret": new_secret(), "previousSecret": None, "previousSecretUntil": None,
               "cursor": await self.store.last_seq(user_id), "failingSince": None,
               "createdAt": now, "updatedAt": now}
        try:
            await self.store.insert_webhook(doc, MAX_ENDPOINTS)
        except Conflict:
            raise Conflict(f"Webhook endpoint limit reached ({MAX_ENDPOINTS})") from None
        log.info("user %s added webhook endpoint %s", user_id, doc["_id"])
        self.changed(user_id)
        return {**endpoint_json(doc), "secret": doc["secret"]}

    async def list(self, user_id: str) -> list[dict]:
        return [endpoint_json(d) for d in await self.store.webhooks_of(user_id)]

    async def _own(self, user_id: str, webhook_id: str) -> dict:
        doc = await self.store.webhook_by_id(webhook_id, user_id)
        if doc is None:
            raise NotFound("Webhook endpoint not found")
        return doc

    async def get(self, user_id: str, webhook_id: str) -> dict:
        return endpoint_json(await self._own(user_id, webhook_id))

    async def update(self, user_id: str, webhook_id: str, *, url: str | None = None,
                     events: list[str] | None = None, description: str | None = None,
                     enabled: bool | None = None, fields_set: set[str] = frozenset()) -> dict:
        current = await self._own(user_id, webhook_id)
        fields: dict[str, Any] = {}
        if url is not None:
            fields["url"] = await self.check(url)
        if events is not None:
            fields["events"] = events
        if "description" in fields_set:
            fields["description"] = description
        if enabled is True and not current["enabled"]:
            # From the present on, as a new endpoint: what happened while it was off is not sent.
            fields.update(enabled=True, disabledReason=None, failingSince=None,
                          cursor=await self.store.last_seq(user_id))
        elif enabled is False and current["enabled"]:
            fields.update(enabled=False, disabledReason="Disabled by its owner")
        if fields:
            fields["updatedAt"] = utcnow()
        doc = await self.store.update_webhook(webhook_id, user_id, fields)
        if doc is None:
            raise NotFound("Webhook endpoint not found")
        self.changed(user_id)
        return endpoint_json(doc)

    async def delete(self, user_id: str, webhook_id: str) -> None:
        if not await self.store.delete_webhook(webhook_id, user_id):
            raise NotFound("Webhook endpoint not found")
        log.info("user %s deleted webhook endpoint %s", user_id, webhook_id)
        self.changed(user_id)

    async def rotate(self, user_id: str, webhook_id: str) -> dict:
        current = await self._own(user_id, webhook_id)
        now = utcnow()
        doc = await self.store.update_webhook(webhook_id, user_id, {
            "secret": new_secret(), "previousSecret": current["secret"],
            "previousSecretUntil": now + dt.timedelta(seconds=ROTATION_OVERLAP_S),
            "updatedAt": now})
        if doc is None:
            raise NotFound("Webhook endpoint not found")
        log.info("user %s rotated the secret of webhook endpoint %s", user_id, webhook_id)
        return {**endpoint_json(doc), "secret": doc["secret"]}

    async def test(self, user_id: str, webhook_id: str) -> dict:
        endpoint = await self._own(user_id, webhook_id)
        if not endpoint["enabled"]:
            raise Conflict("Webhook endpoint is disabled")
        now = utcnow()
        doc = new_delivery(endpoint, TEST_EVENT, None, iso(now) or "", {
            "endpointId": endpoint["_id"], "message": "A test event from Droid"},
            attempts_left=1, now=now)
        await self.store.insert_delivery(doc)
        self.due()
        return delivery_json(doc)

    async def deliveries(self, user_id: str, webhook_id: str, *, status: str | None,
                         limit: int, cursor: str | None) -> dict:
        await self._own(user_id, webhook_id)
        after = decode_cursor(cursor) if cursor else None
        docs = await self.store.deliveries_page(webhook_id, status=status, limit=limit + 1,
                                                after=after)
        more = len(docs) > limit
        docs = docs[:limit]
        return {"items": [delivery_json(d) for d in docs],
                "nextCursor": encode_cursor(docs[-1]) if more else None}

    async def retry(self, user_id: str, webhook_id: str, delivery_id: str) -> dict:
        """One more attempt of a finished delivery, now (no automatic retries after it)."""
        endpoint = await self._own(user_id, webhook_id)
        if not endpoint["enabled"]:
            raise Conflict("Webhook endpoint is disabled")
        doc = await self.store.retry_delivery(delivery_id, webhook_id, utcnow(), 1)
        if doc is None:
            if await self.store.delivery_by_id(delivery_id, webhook_id) is None:
                raise NotFound("Delivery not found")
            raise Conflict("Delivery is still pending")
        self.due()
        return delivery_json(doc)
