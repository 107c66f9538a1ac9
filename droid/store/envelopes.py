"""What a task looks like to clients, and what the envelope of each of its state changes holds.

Pure functions of a stored task document, shared by the task service (which says which change
happened) and the stores (which build the envelope inside the write that makes the change, and
at start-up when they repair a log an older version left incomplete).
"""
from __future__ import annotations

import datetime as dt

from ..util import iso, loads

TASK_FIELDS = ("id", "userId", "agentId", "status", "priority", "prompt", "response", "error",
               "tokensUsed", "executionTimeMs", "retryCount", "metadata", "createdAt",
               "updatedAt", "startedAt", "completedAt")
_DATES = ("createdAt", "updatedAt", "startedAt", "completedAt")
_BASE = ("taskId", "userId", "agentId", "status")
EVENT_FIELDS = {
    "task.processing": _BASE + ("retryCount", "startedAt", "updatedAt"),
    "task.completed": _BASE + ("response", "tokensUsed", "executionTimeMs", "completedAt",
                               "updatedAt"),
    "task.failed": _BASE + ("error", "retryCount", "completedAt", "updatedAt"),
    "task.cancelled": _BASE + ("completedAt", "updatedAt"),
    # An addition to the contract: a task went back to `pending` (a retry, a lost worker, or a
    # shutdown), so that every state change is seen live.
    "task.pending": _BASE + ("error", "retryCount", "updatedAt"),
}
# The event that says a task is in a status (what a repair writes when the log lacks it).
STATUS_EVENT = {"pending": "task.pending", "processing": "task.processing",
                "completed": "task.completed", "failed": "task.failed",
                "cancelled": "task.cancelled"}


def task_json(doc: dict) -> dict:
    """The public form of a stored task (the contract's field list, ISO dates)."""
    out = {f: doc.get(f) for f in TASK_FIELDS}
    out["id"] = doc["_id"]
    for f in _DATES:
        out[f] = iso(doc.get(f))
    out["retryCount"] = doc.get("retryCount", 0)
    # Stored as JSON text: user keys may hold anything ('$', '.', NUL) that BSON field names may not.
    raw = doc.get("metadataJson")
    out["metadata"] = loads(raw) if raw is not None else None
    return out


def event_data(event: str, task: dict) -> dict:
    """The `data` of an envelope, from the public form of the task after the change."""
    if event == "task.created":
        return {**task, "taskId": task["id"]}
    full = {**task, "taskId": task["id"]}
    return {k: full.get(k) for k in EVENT_FIELDS[event]}


def envelope_of(event: str, doc: dict, at: dt.datetime) -> dict:
    """The envelope of `event` for the stored task `doc` as it is after the change, not numbered
    yet (`seq` None): the store numbers it in the same write."""
    return {"event": event, "data": event_data(event, task_json(doc)), "timestamp": iso(at),
            "seq": None}


def state_of(envelope: dict) -> str | None:
    """The status a stored envelope says its task is in (every task event carries it)."""
    data = envelope.get("data")
    return data.get("status") if isinstance(data, dict) else None
