"""The in-process worker: claims pending tasks, runs them on an agent, ends each attempt.

It never changes a task on its own: every transition goes through TaskService, which stores and
publishes it. Attempts are fenced by the task's `attempt` number, so an attempt that lost its
lease or was cancelled can no longer complete the task.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .agents import AgentService
from .llm import AgentError
from .tasks import TaskService

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, tasks: TaskService, agents: AgentService, provider: Any, *,
                 concurrency: int, timeout_s: float, lease_s: float, owner: str,
                 metrics: Any = None, poll_s: float = 0.5, cancel_check_s: float = 0.5,
                 shutdown_grace_s: float = 5.0) -> None:
        self.tasks = tasks
        self.agents = agents
        self.provider = provider
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.lease_s = lease_s
        self.owner = owner
        self.metrics = metrics
        self.poll_s = poll_s
        self.cancel_check_s = min(cancel_check_s, lease_s / 3)
        self.shutdown_grace_s = shutdown_grace_s
        self.running: dict[str, asyncio.Task] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._stopping = False
        self._db_failing = False
        tasks.on_created(self.wake)
        tasks.on_cancelled(self._cancel_local)

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        if self.concurrency > 0 and self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name="worker")
            log.info("worker %s started: %d attempts at once", self.owner, self.concurrency)

    async def stop(self) -> None:
        """Stop claiming; let running attempts finish within the grace period, else requeue."""
        self._stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        attempts = list(self.running.values())
        if attempts:
            log.info("waiting up to %.1fs for %d running attempts", self.shutdown_grace_s,
                     len(attempts))
            _, still = await asyncio.wait(attempts, timeout=self.shutdown_grace_s)
            for attempt in still:
                attempt.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        close = getattr(self.provider, "close", None)
        if close is not None:
            await close()

    # claiming --------------------------------------------------------------------------------

    async def _loop(self) -> None:
        last_reap = 0.0
        while True:
            try:
                if time.monotonic() - last_reap >= min(self.lease_s / 2, 5.0):
                    last_reap = time.monotonic()
                    await self.tasks.reap_expired()
                while len(self.running) < self.concurrency:
                    doc = await self.tasks.claim(self.owner, self.lease_s)
                    if doc is None:
                        break
                    self._spawn(doc)
                if self._db_failing:
                    log.info("worker %s: database reachable again", self.owner)
                    self._db_failing = False
            except asyncio.CancelledError:
                raise
            except Exception:
                if not self._db_failing:
                    log.exception("worker %s: claiming tasks failed; retrying", self.owner)
                    self._db_failing = True
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except asyncio.TimeoutError:
                pass

    def _spawn(self, doc: dict) -> None:
        attempt = asyncio.get_running_loop().create_task(self._attempt(doc),
                                                         name=f"attempt:{doc['_id']}")
        self.running[doc["_id"]] = attempt

    def _cancel_local(self, task_id: str) -> None:
        attempt = self.running.get(task_id)
        if attempt is not None:
            attempt.cancel()

    # one attempt -----------------------------------------------------------------------------

    async def _attempt(self, doc: dict) -> None:
        started = time.monotonic()
        outcome = "error"
        current = asyncio.current_task()
        guard = asyncio.get_running_loop().create_task(self._guard(doc, current))
        try:
            agent = await self.agents.for_task(doc["agentId"])

            async def on_delta(delta: str) -> None:
                await self.tasks.progress(doc, delta)

            try:
                result = await asyncio.wait_for(
                    self.provider.run(model=agent.get("model") or "",
                                      system_prompt=agent.get("systemPrompt") or "",
                                      prompt=doc["prompt"], on_delta=on_delta),
                    self.timeout_s)
            except asyncio.TimeoutError:
                outcome = "timeout"
                await self.tasks.fail_attempt(
                    doc, f"The attempt timed out after {self.timeout_s:g} s",
                    execution_time_ms=_ms(started))
                return
            except AgentError as exc:
                outcome = "error"
                await self.tasks.fail_attempt(doc, exc.message, retryable=exc.retryable,
                                              execution_time_ms=_ms(started))
                return
            outcome = "completed"
            await self.tasks.complete(doc, response=result.response,
                                      tokens_used=result.tokens_used,
                                      execution_time_ms=_ms(started))
        except asyncio.CancelledError:
            outcome = "interrupted"
            if self._stopping:
                await self.tasks.requeue(doc)
                log.info("task %s returned to pending at shutdown", doc["_id"])
        except Exception:
            log.exception("task %s: attempt crashed", doc["_id"])
            await self.tasks.fail_attempt(doc, "Internal error while running the task",
                                          execution_time_ms=_ms(started))
        finally:
            guard.cancel()
            self.running.pop(doc["_id"], None)
            if self.metrics is not None:
                self.metrics.attempts.labels(outcome=outcome).observe(time.monotonic() - started)
            self.wake()

    async def _guard(self, doc: dict, attempt: asyncio.Task | None) -> None:
        """Renew the lease; stop the attempt when it is no longer current (cancelled elsewhere)."""
        last_renew = time.monotonic()
        while True:
            await asyncio.sleep(self.cancel_check_s)
            try:
                if time.monotonic() - last_renew >= self.lease_s / 3:
                    current = await self.tasks.renew(doc, self.owner, self.lease_s)
                    last_renew = time.monotonic()
                else:
                    state = await self.tasks.current_status(doc["_id"])
                    current = state == ("processing", doc["attempt"])
            except Exception:
                log.warning("task %s: lease check failed", doc["_id"], exc_info=True)
                continue
            if not current:
                log.info("task %s: attempt %s is no longer current; stopping it", doc["_id"],
                         doc["attempt"])
                if attempt is not None:
                    attempt.cancel()
                return


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
