"""SqliteBase: the SQLite store's connection, its thread, and the store's lifecycle (open, close,
expiry, ping); the mixins of each group of tables build on it."""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import sqlite3
from typing import Any, Callable, TypeVar

from ..base import Store, StoreUnavailable
from .rows import SCHEMA, row_doc, row_values, to_ms
from .thread import StoreThread

log = logging.getLogger(__name__)
T = TypeVar("T")

EXPIRE_EVERY_S = 60.0
_EXPIRE_BATCH = 5000


class SqliteBase(Store):
    kind = "sqlite"

    def __init__(self, path: str, **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.path = path
        self._thread: StoreThread | None = None
        self._conn: sqlite3.Connection | None = None
        self._expiry: asyncio.Task | None = None

    @property
    def in_memory(self) -> bool:
        return self.path == ":memory:"

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._thread is None:
            raise RuntimeError("the store is not open")
        return await self._thread.call(fn, args)

    # lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        if self._thread is not None:
            return
        self._thread = StoreThread("droid-sqlite")
        try:
            await self._run(self._connect)
        except BaseException as exc:
            self._thread.stop()
            self._thread = None
            if isinstance(exc, (OSError, sqlite3.Error)):
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                raise StoreUnavailable(f"cannot open the SQLite store {self.path} "
                                       f"(DROID_DATA_DIR): {reason}") from None
            raise
        self._expiry = asyncio.create_task(self._expire_forever(), name="droid-sqlite-expiry")

    def _connect(self) -> None:
        if not self.in_memory:
            folder = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(folder, mode=0o700, exist_ok=True)
        # Autocommit (isolation_level None): statements commit on their own, and transactions
        # are explicit (BEGIN IMMEDIATE takes the write lock first, so two processes never
        # deadlock upgrading a read lock).
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=10.0)
        conn.execute("PRAGMA busy_timeout = 10000")
        if not self.in_memory:
            conn.execute("PRAGMA journal_mode = WAL")
            # WAL + NORMAL: a crash of the process loses nothing; a power cut may lose the last
            # transactions, never the file's consistency.
            conn.execute("PRAGMA synchronous = NORMAL")
        conn.executescript(SCHEMA)
        self._conn = conn

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._expiry is not None:
            self._expiry.cancel()
            try:
                await self._expiry
            except asyncio.CancelledError:
                pass
            self._expiry = None
        conn, self._conn = self._conn, None
        if conn is not None:
            await thread.call(conn.close, ())
        thread.stop()

    async def _expire_forever(self) -> None:
        while True:
            try:
                await self.expire(dt.datetime.now(dt.timezone.utc).replace(tzinfo=None))
            except Exception:
                log.warning("deleting expired events failed; will try again", exc_info=True)
            await asyncio.sleep(EXPIRE_EVERY_S)

    async def ping(self) -> bool:
        try:
            return await self._run(lambda: self._conn.execute("SELECT 1").fetchone()[0] == 1)
        except (sqlite3.Error, RuntimeError):
            return False

    async def expire(self, now: dt.datetime) -> None:
        events_before = to_ms(now - dt.timedelta(seconds=self.event_retention_s))
        keys_before = to_ms(now - dt.timedelta(seconds=self.idempotency_ttl_s))

        def run() -> None:
            # In batches, so that no one transaction holds the write lock for long.
            for sql, before in (
                    ("DELETE FROM events WHERE rowid IN (SELECT rowid FROM events "
                     "WHERE createdAt < ? LIMIT ?)", events_before),
                    ("DELETE FROM idempotency WHERE rowid IN (SELECT rowid FROM idempotency "
                     "WHERE createdAt < ? LIMIT ?)", keys_before)):
                while self._conn.execute(sql, (before, _EXPIRE_BATCH)).rowcount == _EXPIRE_BATCH:
                    pass

        await self._run(run)

    # helpers (run in the store's thread) -----------------------------------------------------

    def _one(self, sql: str, args: tuple = ()) -> dict | None:
        cur = self._conn.execute(sql, args)
        row = cur.fetchone()
        return row_doc(cur, row) if row is not None else None

    def _all(self, sql: str, args: tuple = ()) -> list[dict]:
        cur = self._conn.execute(sql, args)
        return [row_doc(cur, row) for row in cur.fetchall()]

    def _insert(self, table: str, doc: dict) -> None:
        names, values = row_values(table, doc)
        self._conn.execute(
            f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
            values)

