"""Tasks in the SQLite store: creation, reads, claims and the moves of an attempt.

Every change of a task's state is one transaction in one hop to the store's thread: the change
(an `UPDATE ... RETURNING *`, or the insert with its Idempotency-Key), then its envelope built
from the row it returned, numbered and stored (SqliteBase._changed).
"""
from __future__ import annotations

import datetime as dt

from ..base import ACTIVE, STATUSES, Change
from .connection import SqliteBase
from .rows import DATES, TASK_COLUMNS, to_ms

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
# One statement: SQLite holds the write lock from the choice to the change. The partial index
# walks pending tasks in claim order, so a long backlog is not sorted per claim.
_CLAIM = """
    UPDATE tasks SET status = 'processing', startedAt = ?1, updatedAt = ?1,
                     leaseOwner = ?2, leaseExpiresAt = ?3, attempt = attempt + 1
    WHERE id = (SELECT id FROM tasks INDEXED BY tasks_claim
                WHERE status = 'pending' AND runAfter <= ?1
                ORDER BY priorityRank DESC, createdAt LIMIT 1)
      AND status = 'pending'
    RETURNING *"""
_CANCEL = f"""
    UPDATE tasks SET status = 'cancelled', updatedAt = ?1, completedAt = ?1,
                     leaseOwner = NULL, leaseExpiresAt = NULL
    WHERE id = ?2 AND userId = ?3 AND status IN {ACTIVE!r}
    RETURNING *"""


class TasksMixin(SqliteBase):
    async def insert_task(self, doc: dict, change: Change | None = None, *,
                          key: str | None = None, key_since: dt.datetime | None = None) -> dict:
        if change is None and key is None:
            await self._run(self._insert, "tasks", doc)
            return doc
        stored, envelope = await self._run(self._write, self._insert_task, doc, change, key,
                                           key_since)
        if change is not None:
            change.envelope = envelope
        return stored

    def _insert_task(self, doc: dict, change: Change | None, key: str | None,
                     since: dt.datetime | None) -> tuple[dict, dict | None]:
        if key is not None:
            claimed = self._conn.execute(_CLAIM_KEY, (
                doc["userId"], key, doc["_id"], to_ms(doc["createdAt"]),
                to_ms(since) if since is not None else -1)).fetchone()
            if claimed is None:
                return self._one(_KEY_HOLDER, (doc["userId"], key)), None
        self._insert("tasks", doc)
        return doc, (self._record(change, doc) if change is not None else None)

    async def task_by_id(self, task_id: str, user_id: str | None = None) -> dict | None:
        if user_id is None:
            return await self._run(self._one, "SELECT * FROM tasks WHERE id = ?", (task_id,))
        return await self._run(self._one, "SELECT * FROM tasks WHERE id = ? AND userId = ?",
                               (task_id, user_id))

    async def tasks_page(self, user_id: str, *, status: str | None, agent_id: str | None,
                         limit: int, after: tuple[dt.datetime, str] | None) -> list[dict]:
        where, args = ["userId = ?"], [user_id]
        if status:
            where.append("status = ?")
            args.append(status)
        if agent_id:
            where.append("agentId = ?")
            args.append(agent_id)
        if after:
            created, last_id = after
            where.append("(createdAt < ? OR (createdAt = ? AND id < ?))")
            args += [to_ms(created), to_ms(created), last_id]
        sql = (f"SELECT * FROM tasks WHERE {' AND '.join(where)} "
               "ORDER BY createdAt DESC, id DESC LIMIT ?")
        return await self._run(self._all, sql, (*args, limit))

    async def claim_task(self, owner: str, now: dt.datetime, lease_until: dt.datetime,
                         change: Change | None = None) -> dict | None:
        return await self._change(change, _CLAIM, (to_ms(now), owner, to_ms(lease_until)))

    async def cancel_task(self, task_id: str, user_id: str, now: dt.datetime,
                          change: Change | None = None) -> dict | None:
        return await self._change(change, _CANCEL, (to_ms(now), task_id, user_id))

    async def update_attempt(self, task_id: str, attempt: int, fields: dict, *,
                             count_retry: bool = False,
                             change: Change | None = None) -> dict | None:
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
        return await self._change(change, sql, (*args, task_id, attempt))

    async def _change(self, change: Change | None, sql: str, args: tuple) -> dict | None:
        if change is None:
            return await self._run(self._one, sql, args)
        doc, change.envelope = await self._run(self._write, self._changed, change, sql, args)
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

