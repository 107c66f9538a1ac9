"""Event envelopes in the SQLite store: each user's numbered log (Idempotency-Keys are claimed
with their task, droid/store/sqlite/tasks.py)."""
from __future__ import annotations

import datetime as dt
import sqlite3

from ...errors import Conflict
from ...util import loads
from ..slim import Page, task_of, text_size, unpack
from .connection import SqliteBase
from .rows import from_ms, to_ms


class EventsMixin(SqliteBase):
    async def next_seq(self, user_id: str) -> int:
        return await self._run(lambda: self._conn.execute(
            "INSERT INTO counters (userId, value) VALUES (?, 1) "
            "ON CONFLICT (userId) DO UPDATE SET value = value + 1 RETURNING value",
            (user_id,)).fetchone()[0])

    async def last_seq(self, user_id: str) -> int:
        def run() -> int:
            row = self._conn.execute("SELECT value FROM counters WHERE userId = ?",
                                     (user_id,)).fetchone()
            return row[0] if row else 0

        return await self._run(run)

    async def insert_event(self, doc: dict) -> None:
        try:
            await self._run(self._store_event, doc["userId"], doc["seq"], doc["event"],
                            doc["envelope"], to_ms(doc["createdAt"]))
        except sqlite3.IntegrityError:
            raise Conflict(f"event {doc['seq']} of this user is already stored") from None

    async def append_event(self, user_id: str, event: str, envelope: dict,
                           created_at: dt.datetime) -> int:
        # One transaction in one hop: no seq is ever numbered but not stored (a crash rolls
        # both back).
        try:
            return await self._run(self._write, self._append, user_id, event, envelope,
                                   to_ms(created_at))
        except sqlite3.IntegrityError:
            raise Conflict("an event of this user with the next seq is already stored") from None

    async def events_after(self, user_id: str, after: int, limit: int,
                           max_bytes: int | None = None) -> list[dict]:
        def run() -> list[dict]:
            out, size = Page(), 0
            rows = self._conn.execute(
                "SELECT seq, event, envelope, createdAt FROM events WHERE userId = ? AND seq > ? "
                "ORDER BY seq LIMIT ?", (user_id, after, limit))
            for seq, event, envelope, created in rows:
                stored = loads(envelope)
                task_id = task_of(stored)
                row = None
                if task_id is not None:  # put back what the task's row holds (slim.py)
                    row = self._one("SELECT prompt, metadataJson, response FROM tasks "
                                    "WHERE id = ?", (task_id,))
                out.append({"userId": user_id, "seq": seq, "event": event,
                            "envelope": unpack(stored, row), "createdAt": from_ms(created)})
                size += text_size(envelope, *(row or {}).values())
                if max_bytes and size >= max_bytes:
                    out.truncated = True
                    break
            return out

        return await self._run(run)

    async def oldest_seq(self, user_id: str) -> int | None:
        return await self._run(lambda: self._conn.execute(
            "SELECT min(seq) FROM events WHERE userId = ?", (user_id,)).fetchone()[0])

    async def delete_events(self, user_id: str, up_to_seq: int | None = None) -> int:
        if up_to_seq is None:
            sql, args = "DELETE FROM events WHERE userId = ?", (user_id,)
        else:
            sql, args = "DELETE FROM events WHERE userId = ? AND seq <= ?", (user_id, up_to_seq)
        return await self._run(lambda: self._conn.execute(sql, args).rowcount)
