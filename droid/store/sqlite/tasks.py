"""Tasks in the SQLite store: creation, reads, claims and the moves of an attempt."""
from __future__ import annotations

import datetime as dt

from ..base import ACTIVE, STATUSES
from .connection import SqliteBase
from .rows import DATES, TASK_COLUMNS, to_ms


class TasksMixin(SqliteBase):
    async def insert_task(self, doc: dict) -> None:
        await self._run(self._insert, "tasks", doc)

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

    async def claim_task(self, owner: str, now: dt.datetime,
                         lease_until: dt.datetime) -> dict | None:
        ms = to_ms(now)
        # One statement: SQLite holds the write lock from the choice to the change. The partial
        # index walks pending tasks in claim order, so a long backlog is not sorted per claim.
        return await self._run(self._one, """
            UPDATE tasks SET status = 'processing', startedAt = ?1, updatedAt = ?1,
                             leaseOwner = ?2, leaseExpiresAt = ?3, attempt = attempt + 1
            WHERE id = (SELECT id FROM tasks INDEXED BY tasks_claim
                        WHERE status = 'pending' AND runAfter <= ?1
                        ORDER BY priorityRank DESC, createdAt LIMIT 1)
              AND status = 'pending'
            RETURNING *""", (ms, owner, to_ms(lease_until)))

    async def cancel_task(self, task_id: str, user_id: str, now: dt.datetime) -> dict | None:
        ms = to_ms(now)
        return await self._run(self._one, f"""
            UPDATE tasks SET status = 'cancelled', updatedAt = ?1, completedAt = ?1,
                             leaseOwner = NULL, leaseExpiresAt = NULL
            WHERE id = ?2 AND userId = ?3 AND status IN {ACTIVE!r}
            RETURNING *""", (ms, task_id, user_id))

    async def update_attempt(self, task_id: str, attempt: int, fields: dict, *,
                             count_retry: bool = False) -> dict | None:
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
        return await self._run(self._one, sql, (*args, task_id, attempt))

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

