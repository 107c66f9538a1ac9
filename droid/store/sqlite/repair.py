"""The SQLite store's start-up repair (droid/store/repair.py says what is repaired and why): one
BEGIN IMMEDIATE transaction in the store's thread, the first time this version opens the file."""
from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from ..envelopes import envelope_of
from ..repair import FORMAT, cutoff, needed, report
from .rows import row_doc, to_ms

if TYPE_CHECKING:
    from .connection import SqliteBase

# Per task, the state of its last stored envelope (the bare column of the one max() aggregate
# comes from the row with the largest seq) and whether task.created is among them: one pass
# over the events, into a temporary table indexed for the join with the tasks.
_LAST = """
    CREATE TEMP TABLE repair_last AS
    SELECT userId, json_extract(envelope, '$.data.taskId') AS taskId,
           json_extract(envelope, '$.data.status') AS state, max(seq) AS seq,
           sum(event = 'task.created') > 0 AS hasCreated
    FROM events GROUP BY userId, taskId"""
_CANDIDATES = """
    SELECT tasks.*, repair_last.state AS repairState,
           coalesce(repair_last.hasCreated, 0) AS repairCreated
    FROM tasks LEFT JOIN repair_last ON repair_last.userId = tasks.userId
                                     AND repair_last.taskId = tasks.id
    WHERE tasks.updatedAt >= ?1
      AND (repair_last.state IS NOT tasks.status
           OR (coalesce(repair_last.hasCreated, 0) = 0 AND tasks.createdAt >= ?1))
    ORDER BY tasks.userId, tasks.createdAt, tasks.id"""
_ORPHAN_KEYS = """
    DELETE FROM idempotency WHERE NOT EXISTS (
        SELECT 1 FROM tasks WHERE tasks.id = idempotency.taskId
                              AND tasks.userId = idempotency.userId)"""


def repair(store: "SqliteBase", now: dt.datetime) -> None:
    """Run in the store's thread while it opens: check once, repair, mark the file checked."""
    conn = store._conn
    if conn.execute("SELECT 1 FROM meta WHERE key = 'format'").fetchone() is not None:
        return
    counts = store._write(_repair, store, now)
    if counts is not None:
        report(store, *counts)


def _repair(store: "SqliteBase", now: dt.datetime) -> tuple[int, int, int] | None:
    conn = store._conn
    # Inside the write lock: another process may have checked the file meanwhile.
    if conn.execute("SELECT 1 FROM meta WHERE key = 'format'").fetchone() is not None:
        return None
    keys = conn.execute(_ORPHAN_KEYS).rowcount
    since = cutoff(store, now)
    created = states = 0
    conn.execute(_LAST)
    try:
        conn.execute("CREATE INDEX temp.repair_last_task ON repair_last (userId, taskId)")
        cur = conn.execute(_CANDIDATES, (to_ms(since),))
        rows = cur.fetchall()
    finally:
        conn.execute("DROP TABLE temp.repair_last")
    for row in rows:
        doc = row_doc(cur, row)
        last_state, has_created = doc.pop("repairState"), bool(doc.pop("repairCreated"))
        event = needed(doc, last_state, has_created, since)
        if event is None:
            continue
        created += event == "task.created"
        states += event != "task.created"
        store._append(doc["userId"], event, envelope_of(event, doc, now), to_ms(now))
    conn.execute("INSERT INTO meta (key, value) VALUES ('format', ?)", (FORMAT,))
    return created, states, keys

