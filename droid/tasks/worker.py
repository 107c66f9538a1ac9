"""The in-process worker: claims pending tasks, runs them on an agent, ends each attempt.

It never changes a task on its own: every transition goes through TaskService, which stores and
publishes it. How an attempt stays safe:

- Claiming is one atomic find-and-modify (most urgent first, oldest first within a priority), so
  two workers, in one process or in several sharing the database, never take the same attempt.
- A claimed attempt holds a lease (`lease_s`), renewed by its guard while it runs. When the
  process dies, the lease runs out and any worker's reaper hands the task back (see
  TaskService.reap_expired): no task stays `processing` forever.
- Attempts are fenced by the task's `attempt` number: an attempt that lost its lease or was
  cancelled can no longer complete, fail or requeue the task. Its guard also notices (it polls
  the task) and stops it, so a cancel made through another process stops the LLM call too.
- stop() stops claiming, lets running attempts finish within `shutdown_grace_s`, and returns the
  others to `pending` without using a retry.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from ..store import StoreFailing
from .agents import AgentService
from .llm import AgentError
from .service import TaskService

log = logging.getLogger(__name__)


class Worker:
    """Runs up to `concurrency` task attempts at once (none when it is 0)."""

    def __init__(self, tasks: TaskService, agents: AgentService, provider: Any, *,
                 concurrency: int, timeout_s: float, lease_s: float, owner: str,
                 metrics: Any = None, poll_s: float = 0.5, cancel_check_s: float = 0.5,
                 shutdown_grace_s: float = 5.0, retry_after_max_s: float = 600.0) -> None:
        self.tasks = tasks
        self.agents = agents
        self.provider = provider
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.lease_s = lease_s
        self.owner = owner
        self.metrics = metrics
        # Tasks created here and retries scheduled here wake the loop at once; polling finds the
        # tasks created by other processes.
        self.poll_s = poll_s
        # The guard looks at its task every `cancel_check_s` and renews the lease about every
        # quarter of it, so a lease survives a stall of the event loop of up to 3/4 of its length.
        self.cancel_check_s = min(cancel_check_s, lease_s / 4)
        self.renew_every_s = max(lease_s / 4 - self.cancel_check_s / 2, 0.0)
        self.reap_every_s = min(lease_s / 2, 5.0)
        self.shutdown_grace_s = shutdown_grace_s
        # A 429's Retry-After is honoured up to this (LLM_RETRY_AFTER_MAX_S); a longer wait fails
        # the task rather than hold it.
        self.retry_after_max_s = retry_after_max_s
        # Running attempts by (task id, attempt number): a retry may be claimed while the attempt
        # before it is still finishing (publishing its end).
        self.running: dict[tuple[str, int], asyncio.Task] = {}
        self._wake = asyncio.Event()
        self._timers: set[asyncio.TimerHandle] = set()
        self._loop_task: asyncio.Task | None = None
        self._stopping = False
        self._db_failing = False
        tasks.on_created(self.wake)
        tasks.on_cancelled(self._cancel_local)
        tasks.on_requeued(self._wake_later)

    def wake(self) -> None:
        """Look for pending tasks now."""
        self._wake.set()

    async def start(self) -> None:
        if self.concurrency > 0 and self._loop_task is None and not self._stopping:
            self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name="worker")
            log.info("worker %s started: %d attempts at once, lease %gs, timeout %gs",
                     self.owner, self.concurrency, self.lease_s, self.timeout_s)

    async def stop(self) -> None:
        """Stop claiming; let running attempts finish within the grace period, else requeue."""
        self._stopping = True
        self.wake()
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        if self._loop_task is not None:
            # Let the loop leave at its next turn rather than cancel it inside a claim: with a
            # real MongoDB a claim cancelled in flight may be applied yet never run (its task
            # would then wait for its lease to run out).
            done, _ = await asyncio.wait([self._loop_task], timeout=self.shutdown_grace_s)
            if not done:
                self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        attempts = list(self.running.values())
        if attempts:
            log.info("waiting up to %gs for %d running attempts", self.shutdown_grace_s,
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
        last_reap = float("-inf")
        while not self._stopping:
            self._wake.clear()
            try:
                if time.monotonic() - last_reap >= self.reap_every_s:
                    last_reap = time.monotonic()
                    await self.tasks.reap_expired()
                # While the LLM API has asked to wait (a 429's Retry-After), nothing is claimed:
                # the tasks wait as `pending`, and no request goes to it before then.
                while (len(self.running) < self.concurrency and not self._stopping
                       and self._llm_ready()):
                    doc = await self.tasks.claim(self.owner, self.lease_s)
                    if doc is None:
                        break
                    self._spawn(doc)
                if self._db_failing:
                    log.info("worker %s: database reachable again", self.owner)
                    self._db_failing = False
            except Exception as exc:
                if not self._db_failing:
                    if isinstance(exc, StoreFailing):  # the store logs why, once
                        log.warning("worker %s: claiming tasks failed (the database is "
                                    "failing); retrying", self.owner)
                    else:
                        log.exception("worker %s: claiming tasks failed; retrying", self.owner)
                    self._db_failing = True
            if self._stopping:
                break
            try:
                async with asyncio.timeout(self.poll_s):  # no task per wait, as wait_for makes
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _llm_ready(self) -> bool:
        ready_in = getattr(self.provider, "ready_in", None)
        return ready_in is None or ready_in() <= 0

    def _spawn(self, doc: dict) -> None:
        attempt = asyncio.get_running_loop().create_task(
            self._attempt(doc), name=f"attempt:{doc['_id']}:{doc['attempt']}")
        self.running[doc["_id"], doc["attempt"]] = attempt

    def _cancel_local(self, task_id: str) -> None:
        for (running_id, _), attempt in list(self.running.items()):
            if running_id == task_id:
                attempt.cancel()

    def _wake_later(self, delay_s: float) -> None:
        """Wake the loop when a task handed back to pending becomes due."""
        if self._stopping or self._loop_task is None:
            return
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            self.wake()

        # A little late rather than early: `runAfter` and the claim's clock are in milliseconds.
        handle = loop.call_later(delay_s + 0.005, fire)
        self._timers.add(handle)

    # one attempt -----------------------------------------------------------------------------

    async def _attempt(self, doc: dict) -> None:
        started = time.monotonic()
        outcome = "error"
        guard = _Guard(self.cancel_check_s, self._guard, doc, asyncio.current_task(), started)
        try:
            outcome = await self._run(doc, started, guard)
        except asyncio.CancelledError:
            # Cancelled by the user (the task is already `cancelled`), by the guard (the attempt
            # is no longer current) or by stop(): only the last gives the task back.
            outcome = "interrupted"
            if self._stopping:
                await self._settle(doc, self.tasks.requeue(doc))
                log.info("task %s returned to pending at shutdown", doc["_id"])
        except Exception:
            log.exception("task %s: attempt crashed", doc["_id"])
            guard.cancel()
            await self._settle(doc, self.tasks.fail_attempt(
                doc, "Internal error while running the task", execution_time_ms=_ms(started)))
        finally:
            guard.cancel()
            self.running.pop((doc["_id"], doc["attempt"]), None)
            if self.metrics is not None:
                self.metrics.attempts.labels(outcome=outcome).observe(time.monotonic() - started)
            self.wake()

    async def _run(self, doc: dict, started: float, guard: _Guard) -> str:
        """Run the agent and record the attempt's end; returns the outcome (for metrics)."""
        agent = await self.agents.for_task(doc["agentId"])
        # The default agent runs on the provider's own model (LLM_MODEL); its `model` field is
        # only a label ("droid-demo" with no LLM_MODEL) and must not reach a real API.
        model = "" if agent is self.agents.default else agent.get("model") or ""

        async def on_delta(delta: str) -> None:
            await self.tasks.progress(doc, delta)

        try:
            # asyncio.timeout, not wait_for: no task of its own per attempt
            async with asyncio.timeout(self.timeout_s):
                result = await self.provider.run(
                    model=model, system_prompt=agent.get("systemPrompt") or "",
                    prompt=doc["prompt"], on_delta=on_delta)
        except TimeoutError:
            outcome, end = "timeout", self.tasks.fail_attempt(
                doc, f"The attempt timed out after {self.timeout_s:g} s (TASK_TIMEOUT_S)",
                execution_time_ms=_ms(started))
        except AgentError as exc:
            message, retryable, wait = exc.message, exc.retryable, exc.retry_after_s
            if retryable and wait is not None and wait > self.retry_after_max_s:
                retryable = False
                message += (f" (it asked to wait {math.ceil(wait)} s, more than "
                            f"LLM_RETRY_AFTER_MAX_S, {self.retry_after_max_s:g} s)")
            outcome, end = "error", self.tasks.fail_attempt(
                doc, message, retryable=retryable, not_before_s=wait,
                execution_time_ms=_ms(started))
        else:
            outcome, end = "completed", self.tasks.complete(
                doc, response=result.response, tokens_used=result.tokens_used,
                execution_time_ms=_ms(started))
        # From here the attempt ends itself: its guard, seeing the task move on, must not take
        # that for a cancel and interrupt the recording (or the publishing) of the end.
        guard.cancel()
        await self._settle(doc, end)
        return outcome

    async def _settle(self, doc: dict, change: Any) -> None:
        """Record an attempt's end. If the database refuses, the lease will run out and the
        reaper hands the task back; the error is logged, not raised into an unwatched task."""
        try:
            await change
        except StoreFailing:  # the store logs why, once
            log.warning("task %s: recording the end of attempt %s failed (the database is "
                        "failing); its lease will run out and the task will be retried",
                        doc["_id"], doc["attempt"])
        except Exception:
            log.exception("task %s: recording the end of attempt %s failed; its lease will "
                          "run out and the task will be retried", doc["_id"], doc["attempt"])

    async def _guard(self, doc: dict, attempt: asyncio.Task | None, started: float) -> None:
        """Renew the lease; stop the attempt when it is no longer current (cancelled elsewhere).

        Started by _Guard `cancel_check_s` after the attempt (`started`): it checks at once, then
        every `cancel_check_s`."""
        last_renew = started
        while True:
            try:
                if time.monotonic() - last_renew >= self.renew_every_s:
                    current = await self.tasks.renew(doc, self.owner, self.lease_s)
                    last_renew = time.monotonic()
                else:
                    state = await self.tasks.current_status(doc["_id"])
                    current = state == ("processing", doc["attempt"])
            except Exception:
                log.warning("task %s: lease check failed", doc["_id"], exc_info=True)
                current = True  # not known otherwise: look again after the pause
            if not current:
                log.info("task %s: attempt %s is no longer current; stopping it", doc["_id"],
                         doc["attempt"])
                if attempt is not None:
                    attempt.cancel()
                return
            await asyncio.sleep(self.cancel_check_s)


class _Guard:
    """An attempt's guard (Worker._guard), as a timer until the attempt has run `delay_s`: most
    attempts of a fast agent end before that, and a timer costs a fraction of a task that
    would start, sleep and be cancelled."""

    __slots__ = ("_handle", "_task")

    def __init__(self, delay_s: float, guard: Any, *args: Any) -> None:
        self._task: asyncio.Task | None = None
        self._handle: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            delay_s, self._start, guard, args)

    def _start(self, guard: Any, args: tuple) -> None:
        self._handle = None
        self._task = asyncio.get_running_loop().create_task(guard(*args))

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._task is not None:
            self._task.cancel()


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
