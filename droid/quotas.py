"""Per-user quotas on tasks (README "Limits"): what a user may create and keep, kept in the
store so that every process enforces the same counts.

- DROID_QUOTA_TASKS_PER_MINUTE: tasks created in a window of 60 s that starts with the first
  of them (429, Retry-After: the seconds until the window ends).
- DROID_QUOTA_PENDING_TASKS: tasks pending at once (429, Retry-After: PENDING_RETRY_S).
- DROID_QUOTA_STORED_BYTES: bytes a user's tasks hold, counted as they are stored: the prompt
  (UTF-8) and the metadata (JSON) of each task created, and its answer once completed (413;
  tasks are never deleted, so only the operator can raise it).

0 turns a quota off. The store checks all three and counts the task in one step
(Store.admit_task, which Store.insert_task takes first: on SQLite in the transaction of the
insert; on MongoDB the step before it, where concurrent creations of one user may pass the
pending quota by the number that were between that step and their insert at the same moment).
A process remembers a per-minute refusal until its window ends (FullUsers), so that a flood is
answered without a store call.
"""
from __future__ import annotations

import dataclasses
import math
import time

from .errors import ApiError

PENDING_RETRY_S = 5


@dataclasses.dataclass(frozen=True)
class Quota:
    tasks_per_minute: int = 600
    pending_tasks: int = 1000
    stored_bytes: int = 1024 ** 3


class QuotaExceeded(ApiError):
    """A quota refused a task: 429 (with Retry-After) or 413, the rule named in the message."""

    def __init__(self, message: str, status: int, retry_after: int | None = None,
                 rule: str = "") -> None:
        super().__init__(message, status)
        self.retry_after = retry_after
        self.rule = rule  # "per-minute", "pending" or "bytes"

    @property
    def reason(self) -> str:
        return "Payload Too Large" if self.status == 413 else super().reason


def too_many_per_minute(quota: Quota, retry_after: int) -> QuotaExceeded:
    return QuotaExceeded(
        f"Quota exceeded: at most {quota.tasks_per_minute} tasks created per minute "
        f"(DROID_QUOTA_TASKS_PER_MINUTE); retry in {retry_after} seconds", 429, retry_after,
        "per-minute")


def too_many_pending(quota: Quota) -> QuotaExceeded:
    return QuotaExceeded(
        f"Quota exceeded: at most {quota.pending_tasks} tasks pending at once "
        "(DROID_QUOTA_PENDING_TASKS); retry once some have run", 429, PENDING_RETRY_S,
        "pending")


def too_many_bytes(quota: Quota, used: int, size: int) -> QuotaExceeded:
    return QuotaExceeded(
        f"Quota exceeded: at most {quota.stored_bytes} bytes stored per user "
        f"(DROID_QUOTA_STORED_BYTES); {used} are used and this task needs {size}", 413,
        rule="bytes")


def task_size(prompt: str, metadata_json: str | None) -> int:
    """What a new task adds to its user's stored bytes."""
    return len(prompt.encode("utf-8", "surrogatepass")) + len(metadata_json or "")


class FullUsers:
    """Users the per-minute quota refused, until their window ends (time.monotonic()), as one
    process last heard it from the store; bounded (the expired go first, else the oldest)."""

    MAX = 1024

    def __init__(self, quota: Quota) -> None:
        self.quota = quota
        self._until: dict[str, float] = {}

    def refused(self, user_id: str) -> QuotaExceeded | None:
        until = self._until.get(user_id)
        if until is None:
            return None
        left = until - time.monotonic()
        if left <= 0:
            del self._until[user_id]
            return None
        return too_many_per_minute(self.quota, max(1, math.ceil(left)))

    def remember(self, user_id: str, refusal: QuotaExceeded) -> None:
        """Remember a per-minute refusal (the other rules are not remembered)."""
        if refusal.rule != "per-minute":
            return
        full = self._until
        if len(full) >= self.MAX:
            now = time.monotonic()
            for key in [k for k, t in full.items() if t <= now] or [next(iter(full))]:
                del full[key]
        # The store rounds the rest of the window up to whole seconds: remember a little less.
        full[user_id] = time.monotonic() + (refusal.retry_after or 1) - 1
