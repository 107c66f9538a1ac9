"""The `Store` interface: every read and write Droid makes, named by what it means.

Layers above speak only these methods (no query or update documents), so the embedded SQLite
store and the MongoDB store are interchangeable; one conformance suite (tests/test_store.py)
runs on both. Documents are plain dicts keyed as the MongoDB collections are (`_id`, camelCase
fields); dates are naive UTC datetimes with millisecond precision (`util.utcnow()`).

Task documents hold: _id, userId, agentId, status, priority, priorityRank, prompt, response,
error, tokensUsed, executionTimeMs, retryCount, metadataJson, createdAt, updatedAt, startedAt,
completedAt, runAfter, attempt, leaseOwner, leaseExpiresAt, vkey (a place in the fair queue).

Nothing lost (issue 19): a change of a task's state and its envelope are one atomic write (the
intent methods that change a task take a `Change` and number and store its envelope with the
change); a write the database cannot make raises `StoreFailing` (a 503 with Retry-After), the
store reports it in `health()` until writes succeed again, and logs it once each way
(droid/store/health.py); and `open()` repairs what an older version or a crash left
(droid/store/repair.py says how).
"""
from __future__ import annotations

import abc
import datetime as dt

from ..quotas import Quota
from .health import Health

PRIORITY_RANK = {"low": 0, "normal": 1, "high": 2, "urgent": 3}
ACTIVE = ("pending", "processing")
FINAL = ("completed", "failed", "cancelled")
STATUSES = ACTIVE + FINAL
IDEMPOTENCY_TTL_S = 24 * 3600


class StoreUnavailable(Exception):
    """The database cannot be opened (unreachable, refused, not a database): start-up says why
    in one line."""


class Change:
    """A change of a task's state, and the envelope it is recorded with in the same write.

    Given to the intent methods that change a task: the store builds the envelope of `event`
    from the task as it is after the change (droid/store/envelopes.py; `at` is its timestamp and when
    it was stored), numbers it with the user's next `seq` and stores it atomically with the
    change. Afterwards `envelope` is the numbered envelope as stored, to be delivered; None when
    the store changed nothing (and stored nothing).
    """

    __slots__ = ("event", "at", "envelope")

    def __init__(self, event: str, at: dt.datetime) -> None:
        self.event = event
        self.at = at
        self.envelope: dict | None = None


class Store(Health, abc.ABC):
    """All of Droid's persistent state. Methods never block the event loop.

    `event_retention_s` bounds how long stored envelopes are kept, `idempotency_ttl_s` how long
    an Idempotency-Key is remembered; both are enforced by the store itself.
    """

    kind = "store"

    def __init__(self, *, event_retention_s: int = 48 * 3600,
                 idempotency_ttl_s: int = IDEMPOTENCY_TTL_S) -> None:
        super().__init__()
        self.event_retention_s = event_retention_s
        self.idempotency_ttl_s = idempotency_ttl_s

    # lifecycle -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, create tables/collections and indexes, and repair what an older version or
        a crash left (droid/store/repair.py); idempotent."""

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
    async def insert_task(self, doc: dict, change: Change | None = None, *,
                          key: str | None = None, key_since: dt.datetime | None = None,
                          quota: Quota | None = None, size: int = 0) -> dict:
        """Store a new task with the envelope of `change` (task.created), atomically; the task
        stored (`doc`).

        With `key` (an Idempotency-Key of the task's user), the key is claimed in the same
        write: when it already names a task of the user, claimed at or after `key_since`, that
        task is returned instead and nothing is stored. A key claimed before `key_since`, or
        naming a task that does not exist (left by an older version's crash), is taken over.

        With `quota`, the task of `size` bytes is admitted first (admit_task, which sets
        doc["vkey"]; QuotaExceeded stores nothing); a replayed key gives its bytes back. On
        SQLite the admission is in the same transaction as the insert; on MongoDB it is the
        step before (a failed insert leaves it counted)."""

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
    async def claim_task(self, owner: str, now: dt.datetime, lease_until: dt.datetime,
                         change: Change | None = None) -> dict | None:
        """Atomically take a pending task whose runAfter <= now, fairly between users: the user
        whose turn it is (the due task with the smallest `vkey`, admit_task's place in the fair
        queue), and of that user's due tasks the most urgent (priorityRank desc), oldest
        (createdAt asc), which takes that place. Status processing, startedAt = updatedAt = now,
        leaseOwner, leaseExpiresAt = lease_until, attempt + 1, with the envelope of `change`. The
        updated task, or None when none is due. Concurrent callers, in any process, never get
        the same attempt."""

    @abc.abstractmethod
    async def cancel_task(self, task_id: str, user_id: str, now: dt.datetime,
                          change: Change | None = None) -> dict | None:
        """Cancel the user's task when pending or processing (completedAt = updatedAt = now, lease
        cleared), with the envelope of `change`; the updated task, or None when it is not the
        user's or already finished."""

    @abc.abstractmethod
    async def update_attempt(self, task_id: str, attempt: int, fields: dict, *,
                             count_retry: bool = False, change: Change | None = None,
                             stored_bytes: int = 0) -> dict | None:
        """Set `fields` on the task if attempt `attempt` is still its current one (status
        processing, same attempt number); with `count_retry`, retryCount + 1 as well; with the
        envelope of `change`; and `stored_bytes` more counted for its owner when it changed (an
        answer, as add_stored_bytes: on SQLite in the same transaction, on MongoDB right after).
        The updated task, or None when the attempt is no longer current (a stale attempt never
        overwrites a newer one, a cancel, or an end already recorded). With nothing to set (and
        no change), the task as it is, under the same condition."""

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
        """Count `size` more bytes stored for the user (an answer), or fewer when negative (a
        replayed Idempotency-Key: admit_task counted a task that was not stored)."""

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
        """Number the user's next envelope and store it, with no change of a task: sets
        `envelope["seq"]` to next_seq's number, stores it as insert_event does, and returns the
        number (tests and tools; a task's changes record theirs through `Change`). This default
        takes the two steps; a store that can take both at once overrides it."""
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

    # API keys (droid/apikeys.py) -------------------------------------------------------------
    # {_id, userId, name, prefix, scope, keyHash, createdAt, lastUsedAt}; only a hash of the key.

    @abc.abstractmethod
    async def insert_api_key(self, doc: dict, limit: int) -> None:
        """Store a new key; raises errors.Conflict when the user would have more than `limit`
        (also under concurrent inserts: the ones past the limit are refused)."""

    @abc.abstractmethod
    async def api_keys_of(self, user_id: str) -> list[dict]:
        """A user's keys, oldest first (createdAt, then _id)."""

    @abc.abstractmethod
    async def api_key_by_hash(self, key_hash: str) -> dict | None:
        """The key whose keyHash this is (indexed: one read per request that carries a key)."""

    @abc.abstractmethod
    async def delete_api_key(self, key_id: str, user_id: str) -> bool:
        """Forget the user's key; False when it is not the user's."""

    @abc.abstractmethod
    async def touch_api_key(self, key_id: str, now: dt.datetime) -> None:
        """Set lastUsedAt (callers do it at most about once a minute per key)."""

    @abc.abstractmethod
    async def api_keys_existing(self, key_ids: list[str]) -> set[str]:
        """Which of these keys still exist."""

    # webhook endpoints (droid/webhooks/) -----------------------------------------------------
    # {_id, userId, url, events, description, enabled, disabledReason, secret, previousSecret,
    #  previousSecretUntil, cursor, failingSince, createdAt, updatedAt}. `cursor` is the last
    # seq of the owner's event log already turned into deliveries for this endpoint.

    @abc.abstractmethod
    async def insert_webhook(self, doc: dict, limit: int) -> None:
        """Store a new endpoint; errors.Conflict past `limit` endpoints of the user (as
        insert_api_key)."""

    @abc.abstractmethod
    async def webhooks_of(self, user_id: str) -> list[dict]:
        """A user's endpoints, oldest first."""

    @abc.abstractmethod
    async def webhook_by_id(self, webhook_id: str, user_id: str | None = None) -> dict | None:
        """The endpoint, or None (also when `user_id` is given and does not own it)."""

    @abc.abstractmethod
    async def update_webhook(self, webhook_id: str, user_id: str | None, fields: dict, *,
                             if_enabled: bool = False) -> dict | None:
        """Set `fields` on the endpoint (of `user_id` when given; only while it is enabled with
        `if_enabled`); the updated endpoint, or None when nothing matched."""

    @abc.abstractmethod
    async def delete_webhook(self, webhook_id: str, user_id: str) -> bool:
        """Forget the user's endpoint and its deliveries; False when it is not the user's."""

    @abc.abstractmethod
    async def webhooks_behind(self, limit: int = 100) -> list[dict]:
        """Enabled endpoints whose cursor is behind the last seq of their owner's event log.
        SQLite keeps each enabled endpoint's owner's last seq by a trigger on the event log, so
        this reads the endpoints behind and nothing else; MongoDB (no triggers) reads two small
        fields per enabled endpoint and the owners' counters in batches."""

    @abc.abstractmethod
    async def advance_webhook(self, webhook_id: str, cursor: int, new_cursor: int,
                              deliveries: list[dict]) -> bool:
        """Move the endpoint's cursor from `cursor` to `new_cursor` and store `deliveries`, as
        one change: False (and nothing stored) when the cursor is no longer `cursor` (another
        process got there first). Deliveries have deterministic ids, so a delivery stored twice
        (a process that stored it and died before moving the cursor) is stored once."""

    @abc.abstractmethod
    async def webhook_failing(self, webhook_id: str, now: dt.datetime) -> dt.datetime | None:
        """Record a failed delivery: failingSince = now unless already set. failingSince as it
        is now, or None when the endpoint is gone."""

    # webhook deliveries ----------------------------------------------------------------------
    # {_id, endpointId, userId, event, seq, webhookId, payload (the body, JSON text), status
    #  (pending | succeeded | failed), attempts [{at, statusCode, durationMs, error, response,
    #  instance}], attemptsLeft, nextAttemptAt, claim, createdAt, updatedAt}

    @abc.abstractmethod
    async def insert_delivery(self, doc: dict) -> None: ...

    @abc.abstractmethod
    async def claim_delivery(self, claim: str, now: dt.datetime,
                             lease_until: dt.datetime) -> dict | None:
        """Atomically take the pending delivery due first (nextAttemptAt <= now): claim = `claim`,
        nextAttemptAt = lease_until (so that it is due again, for any process, only once the
        lease has run out). The claimed delivery, or None. Two callers never get one claim."""

    @abc.abstractmethod
    async def finish_attempt(self, delivery_id: str, claim: str, attempt: dict,
                             fields: dict) -> dict | None:
        """Append `attempt` (the last MAX_ATTEMPTS_KEPT are kept) and set `fields`, if the
        delivery is still claimed by `claim`; clears the claim. The updated delivery or None."""

    @abc.abstractmethod
    async def delivery_by_id(self, delivery_id: str, endpoint_id: str) -> dict | None: ...

    @abc.abstractmethod
    async def deliveries_page(self, endpoint_id: str, *, status: str | None, limit: int,
                              after: tuple[dt.datetime, str] | None) -> list[dict]:
        """An endpoint's deliveries, newest first (createdAt, _id descending), after `after`."""

    @abc.abstractmethod
    async def retry_delivery(self, delivery_id: str, endpoint_id: str, now: dt.datetime,
                             attempts_left: int) -> dict | None:
        """Make a finished delivery due now again with `attempts_left`; None when it is not the
        endpoint's or still pending."""

    @abc.abstractmethod
    async def expire_webhooks(self, now: dt.datetime) -> None:
        """Delete finished deliveries last updated before the event retention."""


MAX_ATTEMPTS_KEPT = 20
