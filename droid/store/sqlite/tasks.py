"""Tasks in the SQLite store: creation, reads, claims and the moves of an attempt.

Every change of a task's state is one transaction in one hop to the store's thread: the change
(an `UPDATE ... RETURNING *`; the fair claim, droid/store/sqlite/quotas.py; or the insert with
its quota admission and its Idempotency-Key), then its envelope built from the row it returned,
numbered and stored (SqliteBase._record).
"""
from __future__ import annotations

import datetime as dt

from ...quotas import Quota
from ..base import ACTIVE, STATUSES, Change
from ..slim import Page, row_size
from .quotas import QuotasMixin
from .rows import DATES, TASK_COLUMNS, page_filter, row_doc, to_ms

# Take the key when it is free, was claimed before `since` (?5), or names a task that does not
# exist (an older version's crash between the key and its task); else leave it as it is.
_CLAIM_KEY = """
    INSERT INTO idempotency (userId, key, taskId, createdAt) VALUES (?1, ?2, ?3, ?4)
    ON CONFLICT (userId, key) DO UPDATE SET taskId = excluded.taskId,
                                            createdAt = excluded.createdAt
    WHERE idempotency.createdAt < ?5 OR NOT EXISTS (
        SELECT 1 FROM tasks WHERE tasks.id = idempotency.taskId
                              AND tasks.userId = idempotency.userId)
    RETURNING taskId"""
_KEY_HOLDER = """
    SELECT tasks.* FROM idempotency JOIN tasks ON tasks.id = idempotency.taskId
                                               AND tasks.userId = idempotency.userId
    WHERE idempotency.userId = ? AND idempotency.key = ?"""
_CANCEL = f"""
    UPDATE tasks SET status = 'cancelled', updatedAt = ?1, completedAt = ?1,
                     leaseOwner = NULL, leaseExpiresAt = NULL
    WHERE id = ?2 AND userId = ?3 AND status IN {ACTIVE!r}
    RETURNING *"""


class TasksMixin(QuotasMixin):
    async def insert_task(self, doc: dict, change: Change | None = None, *,
                          key: str | None = None, key_since: dt.datetime | None = None,
                          quota: Quota | None = None, size: int = 0) -> dict:
        if change is None and key is None and quota is None:
            await self._run(self._insert, "tasks", doc)
            return doc
        stored, envelope = await self._run(self._write, self._insert_task, doc, change, key,
                                           key_since, quota, size)
        if change is not None:
            change.envelope = envelope
        return stored

    def _insert_task(self, doc: dict, change: Change | None, key: str | None,
                     since: dt.datetime | None, quota: Quota | None,
                     size: int) -> tuple[dict, dict | None]:
        user_id = doc["userId"]
        if quota is not None:  # QuotaExceeded rolls the whole write back
            doc["vkey"] = self._admit(self._conn, user_id, to_ms(doc["createdAt"]), size, quota)
        if key is not None:
            claimed = self._conn.execute(_CLAIM_KEY, (
                user_id, key, doc["_id"], to_ms(doc["createdAt"]),
                to_ms(since) if since is not None else -1)).fetchone()
            if claimed is None:
                if quota is not None:
                    # A replay stores nothing: its bytes go back; it still counts in its minute.
                    self._add_stored(user_id, -size)
                return self._one(_KEY_HOLDER, (user_id, key)), None
        self._insert("tasks", doc)
        return doc, (self._record(change, doc) if change is not None else None)

    async def task_by_id(self, task_id: str, user_id: str | None = None) -> dict | None:
        if user_id is None:
            return await self._run(self._one, "SELECT * FROM tasks WHERE id = ?", (task_id,))
        return await self._run(self._one, "SELECT * FROM tasks WHERE id = ? AND userId = ?",
                               (task_id, user_id))

    async def tasks_page(self, user_id: str, *, status: str | None, agent_id: str | None,
                         limit: int, after: tuple[dt.datetime, str] | None,
                         max_bytes: int | None = None) -> list[dict]:
        where, args = page_filter(("userId", user_id),
                                  {"status": status, "agentId": agent_id}, after)
        sql = f"SELECT * FROM tasks WHERE {where} ORDER BY createdAt DESC, id DESC LIMIT ?"

        def run() -> Page:
            out, size = Page(), 0
            cur = self._conn.execute(sql, (*args, limit))
            for row in cur:
                out.append(doc := row_doc(cur, row))
                size += row_size(doc)
                if max_bytes and size >= max_bytes:
                    out.truncated = len(out) < limit
                    break
            return out

        return await self._run(run)

    async def claim_task(self, owner: str, now: dt.datetime, lease_until: dt.datetime,
                         change: Change | None = None) -> dict | None:
        # One transaction: users take turns, each user's most urgent first (quotas.py), and
        # the claimed task's envelope.
        def claim() -> tuple[dict | None, dict | None]:
            doc = self._claim_fair(to_ms(now), owner, to_ms(lease_until))
            if doc is None or change is None:
                return doc, None
            return doc, self._record(change, doc)

        doc, envelope = await self._run(self._write, claim)
        if change is not None:
            change.envelope = envelope
        return doc

    async def cancel_task(self, task_id: str, user_id: str, now: dt.datetime,
                          change: Change | None = None) -> dict | None:
        return await self._change(change, _CANCEL, (to_ms(now), task_id, user_id))

    async def update_attempt(self, task_id: str, attempt: int, fields: dict, *,
                             count_retry: bool = False, change: Change | None = None,
                             stored_bytes: int = 0) -> dict | None:
        sets, args = [], []
        for key, value in fields.items():
            if key not in TASK_COLUMNS:
                raise ValueError(f"tasks have no field {key!r}")
            sets.append(f"{key} = ?")
            args.append(to_ms(value) if key in DATES else value)
        if count_retry:
            sets.append("retryCount = retryCount + 1")
        if not sets:  # nothing to change: the attempt as it is, if it is still current
            sets.append("id = id")
        sql = (f"UPDATE tasks SET {', '.join(sets)} "
               "WHERE id = ? AND status = 'processing' AND attempt = ? RETURNING *")
        return await self._change(change, sql, (*args, task_id, attempt), stored_bytes)

    async def _change(self, change: Change | None, sql: str, args: tuple,
                      stored_bytes: int = 0) -> dict | None:
        if change is None and not stored_bytes:
            return await self._run(self._one, sql, args)
        doc, envelope = await self._run(self._write, self._changed, change, sql, args,
                                        stored_bytes)
        if change is not None:
            change.envelope = envelope
        return doc

    async def renew_lease(self, task_id: str, attempt: int, owner: str,
                          until: dt.datetime) -> bool:
        def run() -> bool:
            return self._conn.execute(
                "UPDATE tasks SET leaseExpiresAt = ? WHERE id = ? AND status = 'processing' "
                "AND attempt = ? AND leaseOwner = ?",
                (to_ms(until), task_id, attempt, owner)).rowcount == 1

        return await self._run(run)

    async def expired_leases(self, now: dt.datetime, limit: int = 100) -> list[dict]:
        return await self._run(
            self._all, "SELECT * FROM tasks WHERE status = 'processing' AND leaseExpiresAt < ? "
            "LIMIT ?", (to_ms(now), limit))

    async def count_by_status(self) -> dict[str, int]:
        def run() -> dict[str, int]:
            counts = dict.fromkeys(STATUSES, 0)
            for status, n in self._conn.execute(
                    "SELECT status, count(*) FROM tasks GROUP BY status"):
                if status in counts:
                    counts[status] = n
            return counts

        return await self._run(run)

    async def count_due(self, now: dt.datetime) -> int:
        return await self._run(lambda: self._conn.execute(
            "SELECT count(*) FROM tasks WHERE status = 'pending' AND runAfter <= ?",
            (to_ms(now),)).fetchone()[0])

