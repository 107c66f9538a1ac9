"""Signed webhooks (Standard Webhooks) that nothing loses: endpoints and their delivery log
(service), deliveries derived from the stored event log (dispatcher), delivered under a lease by
any process (deliverer), signed (signing), sent by an HTTP client that cannot be pointed at the
inside of the network (sender, ssrf). `Webhooks` wires them for one process.

May import droid.tasks (the publisher, cursors), droid.store, droid.auth, droid.config,
droid.errors, droid.web, droid.util; never droid.http or droid.realtime (what a user's sockets
are told comes in as `notify`).
"""
from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

from ..config import Config
from ..store import Store
from ..tasks.service import EventsService
from .deliverer import Deliverer, disabled_event
from .dispatcher import Dispatcher
from .sender import Sender
from .service import WebhookService, delivery_json, endpoint_json

log = logging.getLogger(__name__)


class Webhooks:
    """Everything webhooks need in one process. With DROID_WEBHOOK_CONCURRENCY=0 the process
    serves the REST routes but neither makes nor sends deliveries (others must)."""

    def __init__(self, config: Config, store: Store, *, publisher: EventsService | None = None,
                 metrics: Any = None,
                 notify: Callable[[str, str, dict], Awaitable[None]] | None = None) -> None:
        """`publisher`: its envelopes stored here wake the dispatcher (`stored`); `notify(user_id,
        event, data)`: tells every socket of the user, on every process (webhook.disabled)."""
        self.config = config
        attempts = len(config.webhook_retry_schedule)
        self.sender = Sender(allow_private=config.webhook_allow_private,
                             timeout_s=config.webhook_timeout_s,
                             max_clients=config.webhook_concurrency)

        async def on_disabled(doc: dict) -> None:
            if notify is not None:
                await notify(doc["userId"], "webhook.disabled", disabled_event(doc))

        self.deliverer = Deliverer(store, self.sender, schedule=config.webhook_retry_schedule,
                                   concurrency=config.webhook_concurrency,
                                   instance=config.instance_id, production=config.production,
                                   disable_after_s=config.webhook_disable_after_s,
                                   metrics=metrics, on_disabled=on_disabled)
        self.dispatcher = Dispatcher(store, attempts=attempts,
                                     first_delay_s=config.webhook_retry_schedule[0],
                                     on_created=self.deliverer.wake,
                                     max_bytes=config.max_page_bytes)
        self.active = config.webhook_concurrency > 0
        self.service = WebhookService(store, production=config.production,
                                      allow_private=config.webhook_allow_private,
                                      attempts=attempts,
                                      changed=self.dispatcher.changed if self.active else None,
                                      due=self.deliverer.wake if self.active else None)
        if publisher is not None:
            publisher.listen_stored(self.stored)

    @property
    def lookup(self) -> Any:
        return self.service.lookup

    @lookup.setter
    def lookup(self, fn: Any) -> None:
        """Replace the name lookup of the SSRF check, at creation and at delivery (tests)."""
        self.service.lookup = fn
        self.sender.resolver.lookup = fn

    def stored(self, user_id: str, event: str, seq: int) -> None:
        """The publisher stored an envelope of the user (EventsService.listen_stored)."""
        if self.active:
            self.dispatcher.stored(user_id, event, seq)

    async def start(self) -> None:
        if self.config.webhook_allow_private:
            log.warning("DROID_WEBHOOK_ALLOW_PRIVATE=true: webhook endpoints may point at "
                        "loopback and private addresses (tests and on-premises only)")
        if self.active:
            await self.dispatcher.start()
            await self.deliverer.start()

    async def stop(self) -> None:
        await self.dispatcher.stop()
        await self.deliverer.stop()
        self.sender.close()


__all__ = ["Webhooks", "WebhookService", "delivery_json", "endpoint_json"]
