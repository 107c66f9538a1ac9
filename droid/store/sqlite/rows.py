"""The SQLite store's tables, and rows as the documents the layers above know (dates as
milliseconds since the epoch in the file, naive UTC datetimes above; `id` as `_id`)."""
from __future__ import annotations

import datetime as dt
import sqlite3
from typing import Any

_EPOCH = dt.datetime(1970, 1, 1)
_MS = dt.timedelta(milliseconds=1)

SCHEMA = """
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
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
"""
DATES = frozenset(("createdAt", "updatedAt", "startedAt", "completedAt", "runAfter",
                   "leaseExpiresAt"))
TASK_COLUMNS = frozenset((
    "userId", "agentId", "status", "priority", "priorityRank", "prompt", "response", "error",
    "tokensUsed", "executionTimeMs", "retryCount", "metadataJson", "createdAt", "updatedAt",
    "startedAt", "completedAt", "runAfter", "attempt", "leaseOwner", "leaseExpiresAt", "vkey"))
COLUMNS = {
    "users": frozenset(("email", "name", "passwordHash", "createdAt", "emailKey",
                        "emailSkeleton")),
    "agents": frozenset(("name", "model", "systemPrompt", "description", "ownerId", "createdAt")),
    "tasks": TASK_COLUMNS,
}


def to_ms(value: dt.datetime | None) -> int | None:
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return (value - _EPOCH) // _MS


def from_ms(value: int | None) -> dt.datetime | None:
    return None if value is None else _EPOCH + value * _MS


def page_filter(owner: tuple[str, str], filters: dict[str, str | None],
                after: tuple[dt.datetime, str] | None) -> tuple[str, list[Any]]:
    """The WHERE clause of a page, newest first: the owner's column always equal to its value,
    each filter that is set too, then only rows strictly older than the cursor's (createdAt,
    id). Column names are the caller's constants, never input."""
    where, args = [f"{owner[0]} = ?"], [owner[1]]
    for column, value in filters.items():
        if value:
            where.append(f"{column} = ?")
            args.append(value)
    if after:
        created, last_id = after
        where.append("(createdAt < ? OR (createdAt = ? AND id < ?))")
        args += [to_ms(created), to_ms(created), last_id]
    return " AND ".join(where), args


def row_doc(cursor: sqlite3.Cursor, row: tuple) -> dict:
    """A row as the document the layers above know: `_id`, dates as datetimes."""
    out: dict[str, Any] = {}
    for (name, *_), value in zip(cursor.description, row):
        if name == "id":
            out["_id"] = value
        elif name in DATES:
            out[name] = from_ms(value)
        else:
            out[name] = value
    return out


def row_values(table: str, doc: dict) -> tuple[list[str], list[Any]]:
    """Columns and values of a document to insert; unknown fields are a programming error."""
    allowed = COLUMNS[table]
    names, values = ["id"], [doc["_id"]]
    for key, value in doc.items():
        if key == "_id":
            continue
        if key not in allowed:
            raise ValueError(f"{table} has no field {key!r}")
        names.append(key)
        values.append(to_ms(value) if key in DATES else value)
    return names, values

