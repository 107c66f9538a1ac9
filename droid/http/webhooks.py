"""REST routes of webhook endpoints and their delivery log (droid/webhooks/)."""
from __future__ import annotations

from .schemas import DeliveriesQuery, WebhookBody, WebhookPatch
from .base import ApiHandler


class _Base(ApiHandler):
    webhooks = property(lambda self: self.settings["webhooks"].service)


class WebhooksHandler(_Base):
    async def get(self) -> None:
        self.reply(await self.webhooks.list(self.user_id))

    async def post(self) -> None:
        user_id = self.user_id
        body = self.body(WebhookBody)
        self.reply(await self.webhooks.create(user_id, url=body.url, events=body.events,
                                              description=body.description), 201)


class WebhookHandler(_Base):
    async def get(self, webhook_id: str) -> None:
        self.reply(await self.webhooks.get(self.user_id, webhook_id))

    async def patch(self, webhook_id: str) -> None:
        user_id = self.user_id
        body = self.body(WebhookPatch)
        self.reply(await self.webhooks.update(
            user_id, webhook_id, url=body.url, events=body.events, description=body.description,
            enabled=body.enabled, fields_set=body.model_fields_set))

    async def delete(self, webhook_id: str) -> None:
        await self.webhooks.delete(self.user_id, webhook_id)
        self.set_status(204)
        self.finish()


class RotateSecretHandler(_Base):
    async def post(self, webhook_id: str) -> None:
        self.reply(await self.webhooks.rotate(self.user_id, webhook_id))


class SendTestHandler(_Base):
    async def post(self, webhook_id: str) -> None:
        self.reply(await self.webhooks.test(self.user_id, webhook_id), 202)


class DeliveriesHandler(_Base):
    async def get(self, webhook_id: str) -> None:
        user_id = self.user_id
        q = self.query(DeliveriesQuery)
        self.reply(await self.webhooks.deliveries(user_id, webhook_id, status=q.status,
                                                  limit=q.limit, cursor=q.cursor))


class RetryDeliveryHandler(_Base):
    async def post(self, webhook_id: str, delivery_id: str) -> None:
        self.reply(await self.webhooks.retry(self.user_id, webhook_id, delivery_id), 202)
