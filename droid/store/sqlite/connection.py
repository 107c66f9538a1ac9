"""SqliteBase: the SQLite store's connection, its thread, and the store's lifecycle (open, close,
expiry, ping); the write path every change takes (one transaction, its envelope numbered inside
it); and how the store fails: loudly, once, and by itself back.

A call the database cannot make (disk full, read-only, locked beyond the busy timeout, an I/O
error) raises StoreFailing, a 503, and marks the store failing until a write succeeds again
(a small probe write every WATCH_EVERY_S finds out without traffic). The file's device and inode
are checked as often, after every failure and before every transaction commits: a file deleted
or replaced under the process is never written into (its writes would vanish at the next
start); every call is refused with a 503 until the process restarts on the file now there.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import sqlite3
import time
from typing import Any, Callable, TypeVar

from ..envelopes import envelope_of
from ..slim import pack
from ...util import dumps
from ..base import Change, Store, StoreUnavailable
from ..health import StoreFailing
from .rows import SCHEMA, row_doc, row_values, to_ms
from .thread import StoreThread

log = logging.getLogger(__name__)
T = TypeVar("T")

EXPIRE_EVERY_S = 60.0
_EXPIRE_BATCH = 5000
_PROBE_BYTES = 16 * 1024  # a probe writes a few pages, not one: "writes succeed again"
_NEXT_SEQ = ("INSERT INTO counters (userId, value) VALUES (?, 1) "
             "ON CONFLICT (userId) DO UPDATE SET value = value + 1 RETURNING value")
_INSERT_EVENT = ("INSERT INTO events (userId, seq, event, envelope, createdAt) "
                 "VALUES (?, ?, ?, ?, ?)")


def _unavailable(exc: sqlite3.Error) -> bool:
    """An error of the database's state (full, read-only, locked, I/O, corrupt), not of the
    call (a constraint, a programming error)."""
    return isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError


_OPEN_TIMEOUT_S = 10.0  # as long as the busy timeout: how long open waits for other processes


def _to_wal(conn: sqlite3.Connection) -> None:
    """PRAGMA journal_mode = WAL, waiting for other processes as a write would. SQLite answers
    "database is locked" at once, without its busy handler, while another connection is
    switching the same new file to WAL (processes started together on one data folder)."""
    deadline = time.monotonic() + _OPEN_TIMEOUT_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class SqliteBase(Store):
    kind = "sqlite"

    def __init__(self, path: str, **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.path = path
        self._thread: StoreThread | None = None
        self._conn: sqlite3.Connection | None = None
        self._background: list[asyncio.Task] = []
        self._file: tuple[int, int] | None = None  # (st_dev, st_ino) of the file opened
        self._lost: str | None = None  # why the file is no longer the one opened

    @property
    def in_memory(self) -> bool:
        return self.path == ":memory:"

    def describe(self) -> str:
        return f"SQLite store {os.path.abspath(self.path) if not self.in_memory else ':memory:'}"

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._thread is None:
            raise RuntimeError("the store is not open")
        return await self._thread.call(self._guarded, (fn, args))

    def _guarded(self, fn: Callable[..., T], args: tuple) -> T:
        """Run one call in the store's thread: refused when the file is lost; an error of the
        database's state is a StoreFailing (and the store is failing until a write succeeds)."""
        if self._lost is not None:
            raise StoreFailing()
        writes = self.writes
        failing = writes.down
        before = self._conn.total_changes if failing else 0
        try:
            result = fn(*args)
        except sqlite3.Error as exc:
            if not _unavailable(exc):
                raise
            self._check_file()
            writes.failed(str(exc))
            raise StoreFailing() from exc
        if failing and self._conn.total_changes != before:
            writes.recovered()
        return result

    # lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        if self._thread is not None:
            return
        self._thread = StoreThread("droid-sqlite")
        self.writes  # created here, before the store's thread may report a failure
        try:
            await self._thread.call(self._connect, ())
        except BaseException as exc:
            self._thread.stop()
            self._thread = None
            if isinstance(exc, (OSError, sqlite3.Error)):
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                raise StoreUnavailable(f"cannot open the SQLite store {self.path} "
                                       f"(DROID_DATA_DIR): {reason}") from None
            raise
        self._background = [
            asyncio.create_task(self._expire_forever(), name="droid-sqlite-expiry"),
            asyncio.create_task(self._watch_forever(), name="droid-sqlite-watch")]

    def _connect(self) -> None:
        if not self.in_memory:
            folder = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(folder, mode=0o700, exist_ok=True)
        # Autocommit (isolation_level None): statements commit on their own, and transactions
        # are explicit (BEGIN IMMEDIATE takes the write lock first, so two processes never
        # deadlock upgrading a read lock).
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=_OPEN_TIMEOUT_S)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(_OPEN_TIMEOUT_S * 1000)}")
            if not self.in_memory:
                _to_wal(conn)
                # WAL + NORMAL: a crash of the process loses nothing; a power cut may lose the
                # last transactions, never the file's consistency.
                conn.execute("PRAGMA synchronous = NORMAL")
                stat = os.stat(self.path)
                self._file = (stat.st_dev, stat.st_ino)
            self._create_schema(conn)
            self._conn = conn
            from .repair import repair  # the start-up repair reads and writes through this store

            repair(self, dt.datetime.now(dt.timezone.utc).replace(tzinfo=None))
        except BaseException:
            self._conn = None
            conn.close()
            raise

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        """Create the tables (each mixin adds its own, calling this first); idempotent."""
        conn.executescript(SCHEMA)

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        for task in self._background:
            task.cancel()
        for task in self._background:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._background = []
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
        # Straight to the thread: a lost file still answers (the store is failing, not down).
        if self._thread is None:
            return False
        try:
            return await self._thread.call(
                lambda: self._conn.execute("SELECT 1").fetchone()[0] == 1, ())
        except (sqlite3.Error, AttributeError):
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

    # health ----------------------------------------------------------------------------------

    async def watch(self) -> None:
        if self._thread is not None and self._file is not None:
            await self._thread.call(self._check_file, ())
        await super().watch()

    async def probe(self) -> None:
        await self._run(lambda: self._conn.execute(
            "INSERT INTO meta (key, value) VALUES ('probe', zeroblob(?)) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (_PROBE_BYTES,)))

    def _check_file(self) -> None:
        """Is the file at the path still the one opened? (in the store's thread)"""
        if self._file is None or self._lost is not None:
            return
        try:
            stat = os.stat(self.path)
            lost = None if (stat.st_dev, stat.st_ino) == self._file else "replaced"
        except FileNotFoundError:
            lost = "deleted"
        except OSError:
            return  # the folder cannot be read now: not a proof that the file is gone
        if lost is not None:
            self._lost = lost
            log.error("%s was %s while Droid had it open: refusing reads and writes (503) "
                      "until Droid is restarted on the file now there", self.describe(), lost)
            self.writes.failed(f"the file was {lost}")

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

    def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in one BEGIN IMMEDIATE transaction: all of it is stored, or none; and
        never into a file deleted or replaced meanwhile (a stat, ~2 us, before the commit)."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(*args)
            if self._file is not None:
                self._check_file()
                if self._lost is not None:
                    raise StoreFailing()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the error that got us here is the one to report
            raise
        return result

    def _append(self, user_id: str, event: str, envelope: dict, created_ms: int) -> int:
        """Number an envelope with the user's next seq and store it (inside a transaction)."""
        seq = self._conn.execute(_NEXT_SEQ, (user_id,)).fetchone()[0]
        envelope["seq"] = seq
        self._store_event(user_id, seq, event, envelope, created_ms)
        return seq

    def _store_event(self, user_id: str, seq: int, event: str, envelope: dict,
                     created_ms: int) -> None:
        """The one place an envelope is written to the log: without what its task's row holds
        (droid/store/slim.py); the webhooks' trigger on the table runs in the same transaction
        (droid/store/sqlite/hooks.py)."""
        self._conn.execute(_INSERT_EVENT, (user_id, seq, event, dumps(pack(envelope)).decode(),
                                           created_ms))

    def _record(self, change: Change, doc: dict) -> dict:
        """The envelope of `change` for the task as it now is, numbered and stored."""
        envelope = envelope_of(change.event, doc, change.at)
        self._append(doc["userId"], change.event, envelope, to_ms(change.at))
        return envelope

    def _changed(self, change: Change | None, sql: str, args: tuple,
                 stored_bytes: int = 0) -> tuple[dict | None, dict | None]:
        """One `UPDATE ... RETURNING *` of a task and, when it changed one, its envelope and
        the bytes it stored counted for its owner (droid/store/sqlite/quotas.py)."""
        doc = self._one(sql, args)
        if doc is None:
            return None, None
        if stored_bytes:
            self._add_stored(doc["userId"], stored_bytes)
        return doc, (self._record(change, doc) if change is not None else None)

    def _add_stored(self, user_id: str, size: int) -> None:
        """Count `size` more bytes stored for the user (droid/store/sqlite/quotas.py)."""
        raise NotImplementedError
