"""SQLite: per-user quotas (droid/quotas.py) and fair claims, a mixin of SqliteStore.

Quotas: a `usage` row per user (the current minute's window, stored bytes) checked and counted
in one transaction with the count of the user's pending tasks (an index range, bounded by the
quota itself).

Fair claims: one user's 10,000 pending tasks must not starve another's one. Each task gets a
place in a fair queue when it is created, `vkey`: one after the later of the user's previous task
and the queue's head (the smallest `vkey` still pending, or the largest ever given when none is),
so that users take turns: a user who just arrived waits for at most one task of each user ahead.
A claim takes the head of that queue (an index seek on `vkey`), then the most urgent, oldest due
task of the same user (an index seek on that user's pending tasks), and the two swap places: the
user's turn is used, and within a user priority still decides. Tasks stored by an older version
have no `vkey` and come first. Both run inside the transaction of the task's write
(droid/store/sqlite/tasks.py: the insert with its task.created, the claim with its
task.processing).
"""
from __future__ import annotations

import sqlite3

from ...quotas import Quota, too_many_bytes, too_many_pending, too_many_per_minute
from .connection import SqliteBase
from .rows import row_doc

WINDOW_MS = 60_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    userId TEXT PRIMARY KEY, windowStart INTEGER NOT NULL, windowCount INTEGER NOT NULL,
    storedBytes INTEGER NOT NULL, lastVkey INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS fairness (id INTEGER PRIMARY KEY CHECK (id = 1),
                                     maxVkey INTEGER NOT NULL);
"""
_INDEXES = """
CREATE INDEX IF NOT EXISTS tasks_fair ON tasks (vkey) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS tasks_user_pending ON tasks (userId, priorityRank DESC, createdAt)
    WHERE status = 'pending';
DROP INDEX IF EXISTS tasks_claim;
"""
_HEAD = ("SELECT id, userId, vkey FROM tasks INDEXED BY tasks_fair "
         "WHERE status = 'pending' AND runAfter <= ? ORDER BY vkey LIMIT 1")
_USERS_NEXT = ("SELECT id, vkey FROM tasks INDEXED BY tasks_user_pending "
               "WHERE userId = ? AND status = 'pending' AND runAfter <= ? "
               "ORDER BY priorityRank DESC, createdAt LIMIT 1")
_CLAIM = """
    UPDATE tasks SET status = 'processing', startedAt = ?1, updatedAt = ?1,
                     leaseOwner = ?2, leaseExpiresAt = ?3, attempt = attempt + 1, vkey = ?5
    WHERE id = ?4 AND status = 'pending'
    RETURNING *"""


class QuotasMixin(SqliteBase):
    def _create_schema(self, conn: sqlite3.Connection) -> None:
        super()._create_schema(conn)
        self._quotas_schema(conn)

    def _quotas_schema(self, conn: sqlite3.Connection) -> None:
        conn.executescript(SCHEMA)
        conn.execute("BEGIN IMMEDIATE")
        try:
            columns = {row[1] for row in conn.execute("PRAGMA table_info(tasks)")}
            if "vkey" not in columns:
                conn.execute("ALTER TABLE tasks ADD COLUMN vkey INTEGER")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.executescript(_INDEXES)

    async def admit_task(self, user_id: str, now_ms: int, size: int, quota: Quota) -> int:
        return await self._run(self._write, self._admit, self._conn, user_id, now_ms, size,
                               quota)

    @staticmethod
    def _admit(conn: sqlite3.Connection, user_id: str, now_ms: int, size: int,
               quota: Quota) -> int:
        row = conn.execute("SELECT windowStart, windowCount, storedBytes, lastVkey FROM usage "
                           "WHERE userId = ?", (user_id,)).fetchone()
        start, count, stored, last = row or (now_ms, 0, 0, 0)
        if now_ms - start >= WINDOW_MS:
            start, count = now_ms, 0
        if quota.tasks_per_minute and count >= quota.tasks_per_minute:
            raise too_many_per_minute(quota, max(1, -(-(start + WINDOW_MS - now_ms) // 1000)))
        if quota.stored_bytes and stored + size > quota.stored_bytes:
            raise too_many_bytes(quota, stored, size)
        if quota.pending_tasks:
            pending = conn.execute(
                "SELECT count(*) FROM (SELECT 1 FROM tasks INDEXED BY tasks_user_pending "
                "WHERE userId = ? AND status = 'pending' LIMIT ?)",
                (user_id, quota.pending_tasks)).fetchone()[0]
            if pending >= quota.pending_tasks:
                raise too_many_pending(quota)
        head = conn.execute("SELECT vkey FROM tasks INDEXED BY tasks_fair WHERE status = "
                            "'pending' AND vkey IS NOT NULL ORDER BY vkey LIMIT 1").fetchone()
        if head is None:
            head = conn.execute("SELECT maxVkey FROM fairness WHERE id = 1").fetchone()
        vkey = max(head[0] if head else 0, last) + 1
        conn.execute(
            "INSERT INTO usage (userId, windowStart, windowCount, storedBytes, lastVkey) "
            "VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (userId) DO UPDATE SET windowStart = ?2, "
            "windowCount = ?3, storedBytes = ?4, lastVkey = ?5",
            (user_id, start, count + 1, stored + size, vkey))
        conn.execute("INSERT INTO fairness (id, maxVkey) VALUES (1, ?1) ON CONFLICT (id) "
                     "DO UPDATE SET maxVkey = max(maxVkey, ?1)", (vkey,))
        return vkey

    async def add_stored_bytes(self, user_id: str, size: int) -> None:
        await self._run(self._add_stored, user_id, size)

    def _add_stored(self, user_id: str, size: int) -> None:
        self._conn.execute("UPDATE usage SET storedBytes = storedBytes + ? WHERE userId = ?",
                           (size, user_id))

    async def stored_bytes(self, user_id: str) -> int:
        def run() -> int:
            row = self._conn.execute("SELECT storedBytes FROM usage WHERE userId = ?",
                                     (user_id,)).fetchone()
            return row[0] if row else 0

        return await self._run(run)

    def _claim_fair(self, now_ms: int, owner: str, lease_ms: int) -> dict | None:
        """One claim (inside the caller's transaction): the claimed task, or None when none is
        due."""
        conn = self._conn
        head = conn.execute(_HEAD, (now_ms,)).fetchone()
        if head is None:
            return None
        head_id, user_id, head_vkey = head
        task_id, task_vkey = conn.execute(_USERS_NEXT, (user_id, now_ms)).fetchone()
        if task_id != head_id:  # the user's turn goes to its most urgent task
            conn.execute("UPDATE tasks SET vkey = ? WHERE id = ?", (task_vkey, head_id))
        cur = conn.execute(_CLAIM, (now_ms, owner, lease_ms, task_id, head_vkey))
        row = cur.fetchone()
        return row_doc(cur, row) if row is not None else None
