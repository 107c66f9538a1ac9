"""The `Store` interface: every read and write Droid makes, named by what it means.

Layers above speak only these methods (no query or update documents), so the embedded SQLite
store and the MongoDB store are interchangeable; one conformance suite (tests/test_store.py)
runs on both. Documents are plain dicts keyed as the MongoDB collections are (`_id`, camelCase
fields); dates are naive UTC datetimes with millisecond precision (`util.utcnow()`).

Task documents hold: _id, userId, agentId, status, priority, priorityRank, prompt, response,
error, tokensUsed, executionTimeMs, retryCount, metadataJson, createdAt, updatedAt, startedAt,
completedAt, runAfter, attempt, leaseOwner, leaseExpiresAt, vkey (a place in the fair queue).
"""
from __future__ import annotations

import abc
import datetime as dt

from ..quotas import Quota

PRIORITY_RANK = {"low": 0, "normal": 1, "high": 2, "urgent": 3}
ACTIVE = ("pending", "processing")
FINAL = ("completed", "failed", "cancelled")
STATUSES = ACTIVE + FINAL
IDEMPOTENCY_TTL_S = 24 * 3600


class StoreUnavailable(Exception):
    """The database cannot be opened (unreachable, refused, not a database): start-up says why
    in one line."""


class Store(abc.ABC):
    """All of Droid's persistent state. Methods never block the event loop.

    `event_retention_s` bounds how long stored envelopes are kept, `idempotency_ttl_s` how long
    an Idempotency-Key is remembered; both are enforced by the store itself.
    """

    kind = "store"

    def __init__(self, *, event_retention_s: int = 48 * 3600,
                 idempotency_ttl_s: int = IDEMPOTENCY_TTL_S) -> None:
        self.event_retention_s = event_retention_s
        self.idempotency_ttl_s = idempotency_ttl_s

    # lifecycle -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, create tables/collections and indexes; idempotent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and background work; idempotent."""

    @abc.abstractmethod
    async def ping(self) -> bool:
        """True when the database answers."""

    @abc.abstractmethod
    async def expire(self, now: dt.datetime) -> None:
        """Delete envelopes older than the retention and idempotency keys older than their TTL."""

    # users -----------------------------------------------------------------------------------

    @abc.abstractmethod
    async def insert_user(self, doc: dict) -> None:
        """Store a new user; raises errors.Conflict when the e-mail is taken."""

    @abc.abstractmethod
    async def user_by_email(self, email: str) -> dict | None: ...

    @abc.abstractmethod
    async def user_by_email_key(self, key: str) -> dict | None:
        """The user whose normalised e-mail (`emailKey`, droid/emails.py) is `key`. Users also
        hold a unique `emailSkeleton`; insert_user's Conflict says which of the two was taken."""

    @abc.abstractmethod
    async def user_by_id(self, user_id: str) -> dict | None: ...

    # agents ----------------------------------------------------------------------------------

    @abc.abstractmethod
    async def insert_agent(self, doc: dict) -> None: ...

    @abc.abstractmethod
    async def agents_of(self, owner_id: str) -> list[dict]:
        """A user's agents, oldest first."""

    @abc.abstractmethod
    async def agent_by_id(self, agent_id: str) -> dict | None: ...

    # tasks -----------------------------------------------------------------------------------

    @abc.abstractmethod
    async def insert_task(self, doc: dict) -> None: ...

    @abc.abstractmethod
    async def task_by_id(self, task_id: str, user_id: str | None = None) -> dict | None:
        """The task, or None (also when `user_id` is given and does not own it)."""

    @abc.abstractmethod
    async def tasks_page(self, user_id: str, *, status: str | None, agent_id: str | None,
                         limit: int, after: tuple[dt.datetime, str] | None,
                         max_bytes: int | None = None) -> list[dict]:
        """A user's tasks, newest first (createdAt, then _id, descending), strictly after the
        (createdAt, _id) position `after`, at most `limit`, and no more once they weigh
        `max_bytes` (slim.row_size; at least one): a slim.Page, `truncated` when that bound
        ended it."""

    @abc.abstractmethod
    async def claim_task(self, owner: str, now: dt.datetime,
                         lease_until: dt.datetime) -> dict | None:
        """Atomically take a pending task whose runAfter <= now, fairly between users: the user
        whose turn it is (the due task with the smallest `vkey`, admit_task's place in the fair
        queue), and of that user's due tasks the most urgent (priorityRank desc), oldest
        (createdAt asc), which takes that place. Status processing, startedAt = updatedAt = now,
        leaseOwner, leaseExpiresAt = lease_until, attempt + 1. The updated task, or None when
        none is due. Concurrent callers, in any process, never get the same attempt."""

    @abc.abstractmethod
    async def cancel_task(self, task_id: str, user_id: str, now: dt.datetime) -> dict | None:
        """Cancel the user's task when pending or processing (completedAt = updatedAt = now, lease
        cleared); the updated task, or None when it is not the user's or already finished."""

    @abc.abstractmethod
    async def update_attempt(self, task_id: str, attempt: int, fields: dict, *,
                             count_retry: bool = False) -> dict | None:
        """Set `fields` on the task if attempt `attempt` is still its current one (status
        processing, same attempt number); with `count_retry`, retryCount + 1 as well.
        The updated task, or None when the attempt is no longer current (a stale attempt never
        overwrites a newer one, a cancel, or an end already recorded). With nothing to set, the
        task as it is, under the same condition."""

    @abc.abstractmethod
    async def renew_lease(self, task_id: str, attempt: int, owner: str,
                          until: dt.datetime) -> bool:
        """Extend the lease of a current attempt held by `owner`; False when it is not."""

    @abc.abstractmethod
    async def expired_leases(self, now: dt.datetime, limit: int = 100) -> list[dict]:
        """Processing tasks whose lease ran out before `now`."""

    @abc.abstractmethod
    async def count_by_status(self) -> dict[str, int]:
        """How many tasks are in each status (every status present, 0 when none)."""

    @abc.abstractmethod
    async def count_due(self, now: dt.datetime) -> int:
        """Pending tasks whose runAfter <= now (the queue depth)."""

    # quotas (droid/quotas.py) --------------------------------------------------------------

    @abc.abstractmethod
    async def admit_task(self, user_id: str, now_ms: int, size: int, quota: Quota) -> int:
        """Check the user's quotas for one more task of `size` bytes and count it, in one step
        (every process sees the same counts); raises quotas.QuotaExceeded. Returns the task's
        place in the fair queue (`vkey`, see claim_task)."""

    @abc.abstractmethod
    async def add_stored_bytes(self, user_id: str, size: int) -> None:
        """Count `size` more bytes stored for the user (an answer)."""

    @abc.abstractmethod
    async def stored_bytes(self, user_id: str) -> int:
        """The bytes counted for the user."""

    # events ----------------------------------------------------------------------------------

    @abc.abstractmethod
    async def next_seq(self, user_id: str) -> int:
        """The user's next event number: 1, 2, 3, ... with no gap or repeat, across processes."""

    @abc.abstractmethod
    async def last_seq(self, user_id: str) -> int:
        """The last number next_seq handed out for the user (0 before the first)."""

    @abc.abstractmethod
    async def insert_event(self, doc: dict) -> None:
        """Store {userId, seq, event, envelope, createdAt}; (userId, seq) is unique: a second
        envelope with a stored seq raises errors.Conflict."""

    async def append_event(self, user_id: str, event: str, envelope: dict,
                           created_at: dt.datetime) -> int:
        """Number the user's next envelope and store it: sets `envelope["seq"]` to next_seq's
        number, stores it as insert_event does, and returns the number. This default takes the
        two steps; a store that can take both at once (one transaction, one call) overrides it."""
        seq = await self.next_seq(user_id)
        envelope["seq"] = seq
        await self.insert_event({"userId": user_id, "seq": seq, "event": event,
                                 "envelope": envelope, "createdAt": created_at})
        return seq

    @abc.abstractmethod
    async def events_after(self, user_id: str, after: int, limit: int,
                           max_bytes: int | None = None) -> list[dict]:
        """The user's stored events with seq > after, ascending, at most `limit`, and no more
        once they weigh `max_bytes` (at least one; a slim.Page, `truncated` when that bound ended
        it). Envelopes are stored without what their task's row holds (slim.py) and read back
        whole."""

    @abc.abstractmethod
    async def oldest_seq(self, user_id: str) -> int | None:
        """The smallest seq still stored for the user, or None."""

    @abc.abstractmethod
    async def delete_events(self, user_id: str, up_to_seq: int | None = None) -> int:
        """Forget the user's events with seq <= up_to_seq (all when None); how many."""

    # idempotency -----------------------------------------------------------------------------

    @abc.abstractmethod
    async def claim_key(self, user_id: str, key: str, task_id: str, now: dt.datetime,
                        since: dt.datetime) -> str:
        """Record that `key` of the user names `task_id`, atomically: returns `task_id` when the
        key was free (or last used before `since`, then it is taken over), else the task id
        recorded by the request that used it first."""
