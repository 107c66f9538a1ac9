"""The embedded store: one SQLite file (or `:memory:`), the default when MONGODB_URI is unset.

The file is in WAL mode, so readers never wait for the writer, and several Droid processes on one
machine may share it: every change that must be atomic is one statement (`UPDATE ... RETURNING`
for a claim or a move of an attempt, `INSERT ... ON CONFLICT ... RETURNING` for `seq`) or one
`BEGIN IMMEDIATE` transaction, and SQLite's file lock orders them across processes
(`busy_timeout` waits for it).

Nothing here runs on the event loop. Each store owns one thread and one connection, and every
method runs whole in that thread: one hop per intent, with its transaction inside it. (aiosqlite
would hop once per statement and need a lock around multi-statement transactions on its shared
connection.) Expired envelopes and idempotency keys are deleted by a background task of the store.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import queue
import sqlite3
import threading
from typing import Any, Callable, TypeVar

from ..errors import Conflict
from ..util import dumps, loads
from .base import ACTIVE, STATUSES, Store, StoreUnavailable
from .slim import Page, pack, row_size, task_of, text_size, unpack
from .sqlite_accounts import SqliteAccounts
from .sqlite_hooks import HOOKS_SCHEMA, SqliteHooks
from .sqlite_quotas import SqliteQuotas

log = logging.getLogger(__name__)
T = TypeVar("T")

_EPOCH = dt.datetime(1970, 1, 1)
_MS = dt.timedelta(milliseconds=1)
EXPIRE_EVERY_S = 60.0
_EXPIRE_BATCH = 5000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY, email TEXT NOT NULL UNIQUE, name TEXT, passwordHash TEXT,
    createdAt INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, model TEXT, systemPrompt TEXT, description TEXT,
    ownerId TEXT, createdAt INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS agents_owner ON agents (ownerId, createdAt, id);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, userId TEXT NOT NULL, agentId TEXT, status TEXT NOT NULL,
    priority TEXT NOT NULL, priorityRank INTEGER NOT NULL, prompt TEXT NOT NULL, response TEXT,
    error TEXT, tokensUsed INTEGER, executionTimeMs INTEGER, retryCount INTEGER NOT NULL DEFAULT 0,
    metadataJson TEXT, createdAt INTEGER NOT NULL, updatedAt INTEGER NOT NULL,
    startedAt INTEGER, completedAt INTEGER, runAfter INTEGER NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0, leaseOwner TEXT, leaseExpiresAt INTEGER);
CREATE INDEX IF NOT EXISTS tasks_owner ON tasks (userId, createdAt DESC, id DESC);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks (status, runAfter);
CREATE INDEX IF NOT EXISTS tasks_lease ON tasks (leaseExpiresAt) WHERE status = 'processing';
CREATE TABLE IF NOT EXISTS counters (userId TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    userId TEXT NOT NULL, seq INTEGER NOT NULL, event TEXT NOT NULL, envelope TEXT NOT NULL,
    createdAt INTEGER NOT NULL, UNIQUE (userId, seq));
CREATE INDEX IF NOT EXISTS events_created ON events (createdAt);
CREATE TABLE IF NOT EXISTS idempotency (
    userId TEXT NOT NULL, key TEXT NOT NULL, taskId TEXT NOT NULL, createdAt INTEGER NOT NULL,
    PRIMARY KEY (userId, key));
CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency (createdAt);
"""
_DATES = frozenset(("createdAt", "updatedAt", "startedAt", "completedAt", "runAfter",
                    "leaseExpiresAt"))
_TASK_COLUMNS = frozenset((
    "userId", "agentId", "status", "priority", "priorityRank", "prompt", "response", "error",
    "tokensUsed", "executionTimeMs", "retryCount", "metadataJson", "createdAt", "updatedAt",
    "startedAt", "completedAt", "runAfter", "attempt", "leaseOwner", "leaseExpiresAt", "vkey"))
_COLUMNS = {
    "users": frozenset(("email", "name", "passwordHash", "createdAt", "emailKey",
                        "emailSkeleton")),
    "agents": frozenset(("name", "model", "systemPrompt", "description", "ownerId", "createdAt")),
    "tasks": _TASK_COLUMNS,
}


def to_ms(value: dt.datetime | None) -> int | None:
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return (value - _EPOCH) // _MS


def from_ms(value: int | None) -> dt.datetime | None:
    return None if value is None else _EPOCH + value * _MS


def _doc(cursor: sqlite3.Cursor, row: tuple) -> dict:
    """A row as the document the layers above know: `_id`, dates as datetimes."""
    out: dict[str, Any] = {}
    for (name, *_), value in zip(cursor.description, row):
        if name == "id":
            out["_id"] = value
        elif name in _DATES:
            out[name] = from_ms(value)
        else:
            out[name] = value
    return out


def _values(table: str, doc: dict) -> tuple[list[str], list[Any]]:
    """Columns and values of a document to insert; unknown fields are a programming error."""
    allowed = _COLUMNS[table]
    names, values = ["id"], [doc["_id"]]
    for key, value in doc.items():
        if key == "_id":
            continue
        if key not in allowed:
            raise ValueError(f"{table} has no field {key!r}")
        names.append(key)
        values.append(to_ms(value) if key in _DATES else value)
    return names, values


class _StoreThread:
    """The store's one thread, and the hop of a call to it and of its answer back to the loop.

    Hand-written rather than a one-thread ThreadPoolExecutor with `loop.run_in_executor`: a task
    makes six store calls, and that pair spends about half as much CPU again per call as this
    (a concurrent Future with its Condition, a work item, and the chaining of both Futures; ~45
    against ~30 us per hop on one core, bench/RESULTS.md). What it keeps of the executor: calls
    run one at a time in the order they were made; a call whose caller was cancelled before it
    started is skipped; an exception reaches the caller. The thread is a daemon: a process that
    exits without closing the store leaves at most an unfinished transaction, which SQLite rolls
    back (tests/test_store.py covers the hop).
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., T], args: tuple) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        self._calls.put((loop, answer, fn, args))
        return answer

    def stop(self) -> None:
        """Let the thread end once the calls made before this one have run."""
        self._calls.put(None)

    def _serve(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            self._answer(*item)
            del item  # hold nothing of a call while waiting for the next

    @staticmethod
    def _answer(loop: asyncio.AbstractEventLoop, answer: asyncio.Future, fn: Callable[..., T],
                args: tuple) -> None:
        if answer.cancelled():
            return
        try:
            value: Any = fn(*args)
            reply = _succeed
        except BaseException as exc:  # as the executor does: the caller gets it
            value, reply = exc, _fail
        try:
            loop.call_soon_threadsafe(reply, answer, value)
        except RuntimeError:  # the loop is closed: nobody waits for the answer any more
            pass


def _succeed(answer: asyncio.Future, result: Any) -> None:
    if not answer.done():
        answer.set_result(result)


def _fail(answer: asyncio.Future, exc: BaseException) -> None:
    if not answer.done():
        answer.set_exception(exc)


class SqliteStore(SqliteHooks, SqliteAccounts, SqliteQuotas, Store):
    kind = "sqlite"

    def __init__(self, path: str, **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.path = path
        self._thread: _StoreThread | None = None
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
        self._thread = _StoreThread("droid-sqlite")
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
        conn.executescript(_SCHEMA + HOOKS_SCHEMA)
        self._accounts_schema(conn)
        self._quotas_schema(conn)
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
        await self.expire_webhooks(now)

    # helpers (run in the store's thread) -----------------------------------------------------

    def _one(self, sql: str, args: tuple = ()) -> dict | None:
        cur = self._conn.execute(sql, args)
        row = cur.fetchone()
        return _doc(cur, row) if row is not None else None

    def _all(self, sql: str, args: tuple = ()) -> list[dict]:
        cur = self._conn.execute(sql, args)
        return [_doc(cur, row) for row in cur.fetchall()]

    def _insert(self, table: str, doc: dict) -> None:
        names, values = _values(table, doc)
        self._conn.execute(
            f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
            values)

    # users -----------------------------------------------------------------------------------

    async def insert_user(self, doc: dict) -> None:
        await self._run(self._insert_user, doc)

    async def user_by_email(self, email: str) -> dict | None:
        return await self._run(self._one, "SELECT * FROM users WHERE email = ?", (email,))

    async def user_by_id(self, user_id: str) -> dict | None:
        return await self._run(self._one, "SELECT * FROM users WHERE id = ?", (user_id,))

    # agents ----------------------------------------------------------------------------------

    async def insert_agent(self, doc: dict) -> None:
        await self._run(self._insert, "agents", doc)

    async def agents_of(self, owner_id: str) -> list[dict]:
        return await self._run(
            self._all, "SELECT * FROM agents WHERE ownerId = ? ORDER BY createdAt, id",
            (owner_id,))

    async def agent_by_id(self, agent_id: str) -> dict | None:
        return await self._run(self._one, "SELECT * FROM agents WHERE id = ?", (agent_id,))

    # tasks -----------------------------------------------------------------------------------

    async def insert_task(self, doc: dict) -> None:
        await self._run(self._insert, "tasks", doc)

    async def task_by_id(self, task_id: str, user_id: str | None = None) -> dict | None:
        if user_id is None:
            return await self._run(self._one, "SELECT * FROM tasks WHERE id = ?", (task_id,))
        return await self._run(self._one, "SELECT * FROM tasks WHERE id = ? AND userId = ?",
                               (task_id, user_id))

    async def tasks_page(self, user_id: str, *, status: str | None, agent_id: str | None,
                         limit: int, after: tuple[dt.datetime, str] | None,
                         max_bytes: int | None = None) -> list[dict]:
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

        def run() -> Page:
            out, size = Page(), 0
            cur = self._conn.execute(sql, (*args, limit))
            for row in cur:
                out.append(doc := _doc(cur, row))
                size += row_size(doc)
                if max_bytes and size >= max_bytes:
                    out.truncated = len(out) < limit
                    break
            return out

        return await self._run(run)

    async def claim_task(self, owner: str, now: dt.datetime,
                         lease_until: dt.datetime) -> dict | None:
        # One transaction (sqlite_quotas.py): users take turns, each user's most urgent first.
        claimed = await self._run(self._claim_fair, to_ms(now), owner, to_ms(lease_until))
        return None if claimed is None else _doc(*claimed)

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
            if key not in _TASK_COLUMNS:
                raise ValueError(f"tasks have no field {key!r}")
            sets.append(f"{key} = ?")
            args.append(to_ms(value) if key in _DATES else value)
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

    # events ----------------------------------------------------------------------------------

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
        row = (doc["userId"], doc["seq"], doc["event"], dumps(pack(doc["envelope"])).decode(),
               to_ms(doc["createdAt"]))
        try:
            await self._run(self._conn.execute,
                            "INSERT INTO events (userId, seq, event, envelope, createdAt) "
                            "VALUES (?, ?, ?, ?, ?)", row)
        except sqlite3.IntegrityError:
            raise Conflict(f"event {doc['seq']} of this user is already stored") from None

    async def append_event(self, user_id: str, event: str, envelope: dict,
                           created_at: dt.datetime) -> int:
        created = to_ms(created_at)

        def run() -> int:
            # One transaction in one hop: no seq is ever numbered but not stored (a crash rolls
            # both back), and a publish costs one thread hop and one commit instead of two.
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                seq = conn.execute(
                    "INSERT INTO counters (userId, value) VALUES (?, 1) "
                    "ON CONFLICT (userId) DO UPDATE SET value = value + 1 RETURNING value",
                    (user_id,)).fetchone()[0]
                envelope["seq"] = seq
                conn.execute("INSERT INTO events (userId, seq, event, envelope, createdAt) "
                             "VALUES (?, ?, ?, ?, ?)",
                             (user_id, seq, event, dumps(pack(envelope)).decode(), created))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return seq

        try:
            return await self._run(run)
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

    # idempotency -----------------------------------------------------------------------------

    async def claim_key(self, user_id: str, key: str, task_id: str, now: dt.datetime,
                        since: dt.datetime) -> str:
        def run() -> str:
            # Insert, or take over a key last used before `since`; else read who has it.
            row = self._conn.execute(
                "INSERT INTO idempotency (userId, key, taskId, createdAt) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (userId, key) DO UPDATE SET taskId = excluded.taskId, "
                "createdAt = excluded.createdAt WHERE idempotency.createdAt < ? "
                "RETURNING taskId", (user_id, key, task_id, to_ms(now), to_ms(since))).fetchone()
            if row is not None:
                return row[0]
            row = self._conn.execute("SELECT taskId FROM idempotency WHERE userId = ? AND key = ?",
                                     (user_id, key)).fetchone()
            return row[0] if row else task_id

        return await self._run(run)
