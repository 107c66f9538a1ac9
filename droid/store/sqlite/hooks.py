"""The SQLite side of API keys, webhook endpoints and their deliveries (SqliteStore's mixin).

Same rules as the rest of the SQLite store (droid/store/sqlite/__init__.py): every method runs
whole in the store's thread, and every change that must be atomic is one statement or one
`BEGIN IMMEDIATE` transaction (SqliteBase._write). Lists (an endpoint's events, a delivery's
attempts) are JSON text columns.
"""
from __future__ import annotations

import datetime as dt
import sqlite3
from typing import Any

from ...errors import Conflict
from ...util import dumps, loads
from ..base import MAX_ATTEMPTS_KEPT
from .connection import SqliteBase
from .rows import from_ms, page_filter, to_ms as _ms

HOOKS_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY, userId TEXT NOT NULL, name TEXT NOT NULL, prefix TEXT NOT NULL,
    scope TEXT NOT NULL, keyHash TEXT NOT NULL UNIQUE, createdAt INTEGER NOT NULL,
    lastUsedAt INTEGER);
CREATE INDEX IF NOT EXISTS api_keys_owner ON api_keys (userId, createdAt, id);
CREATE TABLE IF NOT EXISTS webhooks (
    id TEXT PRIMARY KEY, userId TEXT NOT NULL, url TEXT NOT NULL, eventsJson TEXT NOT NULL,
    description TEXT, enabled INTEGER NOT NULL, disabledReason TEXT, secret TEXT NOT NULL,
    previousSecret TEXT, previousSecretUntil INTEGER, cursor INTEGER NOT NULL,
    failingSince INTEGER, createdAt INTEGER NOT NULL, updatedAt INTEGER NOT NULL,
    ownerSeq INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS webhooks_owner ON webhooks (userId, createdAt, id);
CREATE INDEX IF NOT EXISTS webhooks_enabled ON webhooks (userId) WHERE enabled = 1;
CREATE INDEX IF NOT EXISTS webhooks_behind ON webhooks (ownerSeq)
    WHERE enabled = 1 AND ownerSeq > cursor;
-- The last seq stored for an enabled endpoint's owner, kept by the write that stores it (in its
-- transaction, whoever writes it): endpoints behind their owner's log are then found through
-- an index of those alone. An envelope of a user without endpoints costs one index probe.
CREATE TRIGGER IF NOT EXISTS webhooks_owner_seq AFTER INSERT ON events
WHEN EXISTS (SELECT 1 FROM webhooks INDEXED BY webhooks_enabled
             WHERE userId = NEW.userId AND enabled = 1)
BEGIN
    UPDATE webhooks SET ownerSeq = max(ownerSeq, NEW.seq)
    WHERE userId = NEW.userId AND enabled = 1;
END;
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY, endpointId TEXT NOT NULL, userId TEXT NOT NULL, event TEXT NOT NULL,
    seq INTEGER, webhookId TEXT NOT NULL, payload TEXT NOT NULL, status TEXT NOT NULL,
    attemptsJson TEXT NOT NULL, attemptsLeft INTEGER NOT NULL, nextAttemptAt INTEGER,
    claim TEXT, createdAt INTEGER NOT NULL, updatedAt INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS deliveries_endpoint ON deliveries (endpointId, createdAt DESC, id DESC);
CREATE INDEX IF NOT EXISTS deliveries_endpoint_status
    ON deliveries (endpointId, status, createdAt DESC, id DESC);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (nextAttemptAt) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_finished ON deliveries (updatedAt)
    WHERE status != 'pending';
"""

_DATES = frozenset(("createdAt", "updatedAt", "lastUsedAt", "previousSecretUntil",
                    "failingSince", "nextAttemptAt"))
_JSON = {"eventsJson": "events", "attemptsJson": "attempts"}
_COLUMNS = {
    "api_keys": ("userId", "name", "prefix", "scope", "keyHash", "createdAt", "lastUsedAt"),
    "webhooks": ("userId", "url", "events", "description", "enabled", "disabledReason", "secret",
                 "previousSecret", "previousSecretUntil", "cursor", "failingSince", "createdAt",
                 "updatedAt", "ownerSeq"),
    "deliveries": ("endpointId", "userId", "event", "seq", "webhookId", "payload", "status",
                   "attempts", "attemptsLeft", "nextAttemptAt", "claim", "createdAt",
                   "updatedAt"),
}
_EXPIRE_BATCH = 5000


def _column(field: str, value: Any) -> tuple[str, Any]:
    """A document field as its column and value."""
    if field in _DATES:
        return field, _ms(value)
    if field == "events":
        return "eventsJson", dumps(value).decode()
    if field == "attempts":
        return "attemptsJson", dumps(value).decode()
    if field == "enabled":
        return field, int(bool(value))
    return field, value


def _doc(cursor: sqlite3.Cursor, row: tuple) -> dict:
    out: dict[str, Any] = {}
    for (name, *_), value in zip(cursor.description, row):
        if name == "id":
            out["_id"] = value
        elif name in _DATES:
            out[name] = from_ms(value)
        elif name in _JSON:
            out[_JSON[name]] = loads(value)
        elif name == "enabled":
            out[name] = bool(value)
        elif name == "ownerSeq":
            continue  # the store's own bookkeeping (webhooks_behind)
        else:
            out[name] = value
    return out


class HooksMixin(SqliteBase):
    """API keys, webhook endpoints and deliveries on SQLite."""

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        super()._create_schema(conn)
        conn.executescript(HOOKS_SCHEMA)

    async def expire(self, now: dt.datetime) -> None:
        await super().expire(now)
        await self.expire_webhooks(now)

    # helpers (in the store's thread) ---------------------------------------------------------

    def _h_one(self, sql: str, args: tuple = ()) -> dict | None:
        cur = self._conn.execute(sql, args)
        row = cur.fetchone()
        return _doc(cur, row) if row is not None else None

    def _h_all(self, sql: str, args: tuple = ()) -> list[dict]:
        cur = self._conn.execute(sql, args)
        return [_doc(cur, row) for row in cur.fetchall()]

    def _h_insert(self, table: str, doc: dict, *, or_ignore: bool = False) -> None:
        allowed = _COLUMNS[table]
        names, values = ["id"], [doc["_id"]]
        for field, value in doc.items():
            if field == "_id":
                continue
            if field not in allowed:
                raise ValueError(f"{table} has no field {field!r}")
            name, value = _column(field, value)
            names.append(name)
            values.append(value)
        verb = "INSERT OR IGNORE" if or_ignore else "INSERT"
        self._conn.execute(f"{verb} INTO {table} ({', '.join(names)}) "
                           f"VALUES ({', '.join('?' * len(names))})", values)

    def _h_sets(self, table: str, fields: dict) -> tuple[list[str], list[Any]]:
        sets, args = [], []
        for field, value in fields.items():
            if field not in _COLUMNS[table]:
                raise ValueError(f"{table} has no field {field!r}")
            name, value = _column(field, value)
            sets.append(f"{name} = ?")
            args.append(value)
        return sets, args

    def _h_insert_limited(self, table: str, doc: dict, limit: int) -> None:
        def run() -> None:
            count = self._conn.execute(f"SELECT count(*) FROM {table} WHERE userId = ?",
                                       (doc["userId"],)).fetchone()[0]
            if count >= limit:
                raise Conflict(f"limit of {limit} reached")
            self._h_insert(table, doc)

        self._write(run)

    # API keys --------------------------------------------------------------------------------

    async def insert_api_key(self, doc: dict, limit: int) -> None:
        await self._run(self._h_insert_limited, "api_keys", doc, limit)

    async def api_keys_of(self, user_id: str) -> list[dict]:
        return await self._run(self._h_all, "SELECT * FROM api_keys WHERE userId = ? "
                               "ORDER BY createdAt, id", (user_id,))

    async def api_key_by_hash(self, key_hash: str) -> dict | None:
        return await self._run(self._h_one, "SELECT * FROM api_keys WHERE keyHash = ?",
                               (key_hash,))

    async def delete_api_key(self, key_id: str, user_id: str) -> bool:
        return await self._run(lambda: self._conn.execute(
            "DELETE FROM api_keys WHERE id = ? AND userId = ?", (key_id, user_id)).rowcount == 1)

    async def touch_api_key(self, key_id: str, now: dt.datetime) -> None:
        await self._run(self._conn.execute, "UPDATE api_keys SET lastUsedAt = ? WHERE id = ?",
                        (_ms(now), key_id))

    async def api_keys_existing(self, key_ids: list[str]) -> set[str]:
        def run() -> set[str]:
            found: set[str] = set()
            for i in range(0, len(key_ids), 500):
                part = key_ids[i:i + 500]
                found.update(r[0] for r in self._conn.execute(
                    f"SELECT id FROM api_keys WHERE id IN ({', '.join('?' * len(part))})", part))
            return found

        return await self._run(run) if key_ids else set()

    # webhook endpoints -----------------------------------------------------------------------

    async def insert_webhook(self, doc: dict, limit: int) -> None:
        await self._run(self._h_insert_limited, "webhooks", {**doc, "ownerSeq": doc["cursor"]},
                        limit)

    async def webhooks_of(self, user_id: str) -> list[dict]:
        return await self._run(self._h_all, "SELECT * FROM webhooks WHERE userId = ? "
                               "ORDER BY createdAt, id", (user_id,))

    async def webhook_by_id(self, webhook_id: str, user_id: str | None = None) -> dict | None:
        if user_id is None:
            return await self._run(self._h_one, "SELECT * FROM webhooks WHERE id = ?",
                                   (webhook_id,))
        return await self._run(self._h_one, "SELECT * FROM webhooks WHERE id = ? AND userId = ?",
                               (webhook_id, user_id))

    async def update_webhook(self, webhook_id: str, user_id: str | None, fields: dict, *,
                             if_enabled: bool = False) -> dict | None:
        sets, args = self._h_sets("webhooks", fields)
        where, wargs = ["id = ?"], [webhook_id]
        if user_id is not None:
            where.append("userId = ?")
            wargs.append(user_id)
        if if_enabled:
            where.append("enabled = 1")
        if "cursor" in fields:  # enabled again, from the present
            sets.append("ownerSeq = max(ownerSeq, ?)")
            args.append(fields["cursor"])
        if not sets:
            sets.append("id = id")
        return await self._run(self._h_one, f"UPDATE webhooks SET {', '.join(sets)} "
                               f"WHERE {' AND '.join(where)} RETURNING *", (*args, *wargs))

    async def delete_webhook(self, webhook_id: str, user_id: str) -> bool:
        def run() -> bool:
            gone = self._conn.execute("DELETE FROM webhooks WHERE id = ? AND userId = ?",
                                      (webhook_id, user_id)).rowcount == 1
            if gone:
                self._conn.execute("DELETE FROM deliveries WHERE endpointId = ?", (webhook_id,))
            return gone

        return await self._run(self._write, run)

    async def webhooks_behind(self, limit: int = 100) -> list[dict]:
        # Only the endpoints behind: the partial index holds nothing else (ownerSeq, above).
        return await self._run(self._h_all, """
            SELECT * FROM webhooks INDEXED BY webhooks_behind
            WHERE enabled = 1 AND ownerSeq > cursor LIMIT ?""", (limit,))

    async def advance_webhook(self, webhook_id: str, cursor: int, new_cursor: int,
                              deliveries: list[dict]) -> bool:
        def run() -> bool:
            moved = self._conn.execute(
                "UPDATE webhooks SET cursor = ? WHERE id = ? AND cursor = ? AND enabled = 1",
                (new_cursor, webhook_id, cursor)).rowcount == 1
            if moved:
                for doc in deliveries:
                    self._h_insert("deliveries", doc, or_ignore=True)
            return moved

        return await self._run(self._write, run)

    async def webhook_failing(self, webhook_id: str, now: dt.datetime) -> dt.datetime | None:
        doc = await self._run(self._h_one, "UPDATE webhooks SET failingSince = "
                              "coalesce(failingSince, ?) WHERE id = ? RETURNING failingSince",
                              (_ms(now), webhook_id))
        return None if doc is None else doc["failingSince"]

    # deliveries ------------------------------------------------------------------------------

    async def insert_delivery(self, doc: dict) -> None:
        await self._run(self._h_insert, "deliveries", doc)

    async def claim_delivery(self, claim: str, now: dt.datetime,
                             lease_until: dt.datetime) -> dict | None:
        # One statement: the choice and the claim under SQLite's write lock.
        return await self._run(self._h_one, """
            UPDATE deliveries SET claim = ?1, nextAttemptAt = ?3
            WHERE id = (SELECT id FROM deliveries INDEXED BY deliveries_due
                        WHERE status = 'pending' AND nextAttemptAt <= ?2
                        ORDER BY nextAttemptAt LIMIT 1)
              AND status = 'pending' AND nextAttemptAt <= ?2
            RETURNING *""", (claim, _ms(now), _ms(lease_until)))

    async def finish_attempt(self, delivery_id: str, claim: str, attempt: dict,
                             fields: dict) -> dict | None:
        def run() -> dict | None:
            row = self._conn.execute("SELECT attemptsJson FROM deliveries WHERE id = ? AND "
                                     "claim = ?", (delivery_id, claim)).fetchone()
            if row is None:
                return None
            attempts = (loads(row[0]) + [attempt])[-MAX_ATTEMPTS_KEPT:]
            sets, args = self._h_sets("deliveries", {**fields, "attempts": attempts,
                                                     "claim": None})
            return self._h_one(f"UPDATE deliveries SET {', '.join(sets)} WHERE id = ? "
                               "RETURNING *", (*args, delivery_id))

        return await self._run(self._write, run)

    async def delivery_by_id(self, delivery_id: str, endpoint_id: str) -> dict | None:
        return await self._run(self._h_one, "SELECT * FROM deliveries WHERE id = ? AND "
                               "endpointId = ?", (delivery_id, endpoint_id))

    async def deliveries_page(self, endpoint_id: str, *, status: str | None, limit: int,
                              after: tuple[dt.datetime, str] | None) -> list[dict]:
        where, args = page_filter(("endpointId", endpoint_id), {"status": status}, after)
        return await self._run(self._h_all, f"SELECT * FROM deliveries WHERE {where} "
                               "ORDER BY createdAt DESC, id DESC LIMIT ?", (*args, limit))

    async def retry_delivery(self, delivery_id: str, endpoint_id: str, now: dt.datetime,
                             attempts_left: int) -> dict | None:
        return await self._run(self._h_one, """
            UPDATE deliveries SET status = 'pending', nextAttemptAt = ?1, attemptsLeft = ?2,
                                  updatedAt = ?1, claim = NULL
            WHERE id = ?3 AND endpointId = ?4 AND status != 'pending' RETURNING *""",
                               (_ms(now), attempts_left, delivery_id, endpoint_id))

    async def expire_webhooks(self, now: dt.datetime) -> None:
        before = _ms(now - dt.timedelta(seconds=self.event_retention_s))

        def run() -> None:
            sql = ("DELETE FROM deliveries WHERE rowid IN (SELECT rowid FROM deliveries "
                   "INDEXED BY deliveries_finished WHERE status != 'pending' AND updatedAt < ? "
                   "LIMIT ?)")
            while self._conn.execute(sql, (before, _EXPIRE_BATCH)).rowcount == _EXPIRE_BATCH:
                pass

        await self._run(run)
