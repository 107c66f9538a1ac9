"""Delivering webhooks: claim a due delivery under a lease, POST it signed, record the attempt.

Any process delivers. A claim is atomic and pushes the delivery's due time to the end of the
lease, so two processes never make one attempt at once, and a process that dies mid-attempt
leaves a delivery that falls due again (for any process) when its lease runs out: at least once.
The lease (2 x the attempt's time limit + 1 s) outlasts the attempt, which is bounded by that
limit; the result is recorded only by the claim that made it.

Outcomes: a 2xx succeeds; a timeout, a connection error, 408, 429 and 5xx are retried on the
schedule (DROID_WEBHOOK_RETRY_SCHEDULE; Retry-After on 429 and 503 is honoured when it asks for
longer, up to a day); anything else (3xx: redirects are not followed, other 4xx, an address the
SSRF check refuses) fails at once. 410 Gone also disables the endpoint at once; so does failing
for DROID_WEBHOOK_DISABLE_AFTER_S (5 days) without a success. Either way the owner's sockets get
`webhook.disabled`.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import uuid
from typing import Any, Awaitable, Callable

from ..store import Store
from ..util import iso, now_iso, utcnow
from .sender import Answer, Sender
from .signing import headers as signed_headers
from .ssrf import Refused, check_url

log = logging.getLogger(__name__)

POLL_S = 0.5
RETRY_AFTER_MAX_S = 86400.0
RETRYABLE = frozenset((408, 429))


def outcome(answer: Answer) -> str:
    """succeeded | gone | retry | failed."""
    code = answer.status
    if code is None:
        return "failed" if answer.refused else "retry"
    if 200 <= code < 300:
        return "succeeded"
    if code == 410:
        return "gone"
    if code in RETRYABLE or code >= 500:
        return "retry"
    return "failed"


class Deliverer:
    def __init__(self, store: Store, sender: Sender, *, schedule: tuple[float, ...],
                 concurrency: int, instance: str, production: bool, disable_after_s: float,
                 metrics: Any = None,
                 on_disabled: Callable[[dict], Awaitable[None]] | None = None) -> None:
        self.store = store
        self.sender = sender
        self.schedule = schedule
        self.concurrency = concurrency
        self.instance = instance
        self.production = production
        self.disable_after = dt.timedelta(seconds=disable_after_s)
        self.lease = dt.timedelta(seconds=2 * sender.timeout_s + 1)
        self.metrics = metrics
        self.on_disabled = on_disabled
        self._wakeup = asyncio.Event()
        self._running: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None

    def wake(self) -> None:
        """A delivery was made due in this process."""
        self._wakeup.set()

    async def start(self) -> None:
        if self._loop_task is None and self.concurrency > 0:
            self._loop_task = asyncio.get_running_loop().create_task(
                self._run(), name="droid-webhook-deliver")

    async def stop(self) -> None:
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        # Attempts in flight are given up: their deliveries fall due again when the lease ends.
        for attempt in list(self._running):
            attempt.cancel()
        if self._running:
            await asyncio.wait(list(self._running), timeout=5)

    async def _run(self) -> None:
        slots = asyncio.Semaphore(self.concurrency)
        while True:
            await slots.acquire()
            try:
                delivery = await self.store.claim_delivery(uuid.uuid4().hex, utcnow(),
                                                           utcnow() + self.lease)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("claiming a webhook delivery failed; will try again", exc_info=True)
                delivery = None
            if delivery is None:
                slots.release()
                await self._idle()
                continue
            task = asyncio.get_running_loop().create_task(self._attempt(delivery))
            self._running.add(task)
            task.add_done_callback(lambda t: (self._running.discard(t), slots.release()))

    async def _idle(self) -> None:
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), POLL_S)
        except asyncio.TimeoutError:
            pass

    # one attempt -----------------------------------------------------------------------------

    async def _attempt(self, delivery: dict) -> None:
        try:
            await self.attempt(delivery)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("webhook delivery %s failed unexpectedly; it is due again once its "
                          "lease ends", delivery["_id"])

    async def attempt(self, delivery: dict) -> dict | None:
        """Make one attempt of a claimed delivery and record it; the delivery as recorded."""
        endpoint = await self.store.webhook_by_id(delivery["endpointId"])
        now = utcnow()
        if endpoint is None:
            return None  # deleted with its deliveries
        if not endpoint["enabled"]:
            return await self._record(delivery, {
                "at": iso(now), "statusCode": None, "durationMs": 0,
                "error": "endpoint is disabled", "response": None, "instance": self.instance},
                "failed", None)
        body = delivery["payload"].encode()
        secrets_ = [endpoint["secret"]]
        if endpoint.get("previousSecret") and endpoint.get("previousSecretUntil") and \
                endpoint["previousSecretUntil"] > now:
            secrets_.append(endpoint["previousSecret"])
        try:
            check_url(endpoint["url"], production=self.production)
        except Refused as exc:
            answer = Answer(None, 0, str(exc), refused=True)
        else:
            answer = await self.sender.post(endpoint["url"], body, signed_headers(
                secrets_, delivery["webhookId"], int(time.time()), body))
        return await self._finish(delivery, endpoint, answer)

    async def _finish(self, delivery: dict, endpoint: dict, answer: Answer) -> dict | None:
        now = utcnow()
        result = outcome(answer)
        attempt = {"at": iso(now), "statusCode": answer.status, "durationMs": answer.duration_ms,
                   "error": answer.error, "response": answer.response, "instance": self.instance}
        left = delivery["attemptsLeft"] - 1
        if result == "retry" and left > 0:
            done = len(self.schedule) - left
            delay = self.schedule[min(max(done, 1), len(self.schedule) - 1)]
            if answer.retry_after is not None and answer.status in (429, 503):
                delay = max(delay, min(answer.retry_after, RETRY_AFTER_MAX_S))
            status, next_at = "pending", now + dt.timedelta(seconds=delay)
            if delay < POLL_S:  # sooner than the next poll (short test schedules)
                asyncio.get_running_loop().call_later(delay, self._wakeup.set)
        else:
            status = "succeeded" if result == "succeeded" else "failed"
            next_at = None
        if self.metrics is not None:
            label = "retrying" if status == "pending" else result
            self.metrics.webhook_deliveries.labels(outcome=label).inc()
            self.metrics.webhook_attempt_seconds.labels(outcome=label).observe(
                answer.duration_ms / 1000)
        recorded = await self._record(delivery, attempt, status, next_at, left)
        log.info("webhook %s %s to endpoint %s: %s%s", delivery["event"], delivery["webhookId"],
                 endpoint["_id"], answer.status if answer.status is not None else answer.error,
                 f"; next attempt at {iso(next_at)}" if next_at else "")
        if result == "succeeded":
            if endpoint.get("failingSince") is not None:
                await self.store.update_webhook(endpoint["_id"], None, {"failingSince": None})
        else:
            since = await self.store.webhook_failing(endpoint["_id"], now)
            if result == "gone":
                await self.disable(endpoint, "The endpoint answered 410 Gone")
            elif since is not None and now - since >= self.disable_after:
                await self.disable(endpoint, f"Failing since {iso(since)} "
                                             f"({self.disable_after.total_seconds():g} s)")
        return recorded

    async def _record(self, delivery: dict, attempt: dict, status: str,
                      next_at: dt.datetime | None, left: int = 0) -> dict | None:
        recorded = await self.store.finish_attempt(
            delivery["_id"], delivery["claim"], attempt,
            {"status": status, "nextAttemptAt": next_at, "attemptsLeft": max(left, 0),
             "updatedAt": utcnow()})
        if recorded is None:
            log.warning("webhook delivery %s: its lease ran out before the attempt was "
                        "recorded", delivery["_id"])
        return recorded

    async def disable(self, endpoint: dict, reason: str) -> None:
        doc = await self.store.update_webhook(endpoint["_id"], None, {
            "enabled": False, "disabledReason": reason, "updatedAt": utcnow()}, if_enabled=True)
        if doc is None:
            return  # disabled already (by another attempt, or its owner)
        log.warning("webhook endpoint %s of user %s disabled: %s", doc["_id"], doc["userId"],
                    reason)
        if self.on_disabled is not None:
            try:
                await self.on_disabled(doc)
            except Exception:
                log.warning("telling user %s that endpoint %s was disabled failed",
                            doc["userId"], doc["_id"], exc_info=True)


def disabled_event(doc: dict) -> dict:
    """The `webhook.disabled` event's data."""
    return {"id": doc["_id"], "url": doc["url"], "disabledReason": doc["disabledReason"],
            "timestamp": now_iso()}
