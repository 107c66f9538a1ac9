"""Stored envelopes without what the task's row already holds, and the bounds of a page.

`task.created` carries the whole task and `task.completed` its answer (docs/contract.md), and
both go out whole. Stored for resume, they would hold the prompt, the metadata and the answer a
second time (the task's row has them, and they never change once written: a prompt and its
metadata from creation, an answer from completion, which is final). So the stores keep those
envelopes without them (`pack`, with the names left out under SLIM) and put them back from the
task's row when they are read (`unpack`): a resume, GET /events and the SSE stream see the
envelope as it was published, and a task costs its prompt once.

`row_size` is what a page counts of a row, against DROID_MAX_PAGE_BYTES.
"""
from __future__ import annotations

from typing import Any

from ..util import loads

SLIM = "_slim"
LEFT_OUT = {"task.created": ("prompt", "metadata"), "task.completed": ("response",)}
_COLUMN = {"prompt": "prompt", "metadata": "metadataJson", "response": "response"}
ROW_OVERHEAD = 256  # ids, dates and names of a task or an envelope, roughly


class Page(list):
    """Rows of a page; `truncated` when the page stopped at its byte bound, not its end."""

    truncated = False


def pack(envelope: dict) -> dict:
    """The envelope as stored: a copy without the fields its task's row holds."""
    fields = LEFT_OUT.get(envelope.get("event"))  # type: ignore[arg-type]
    data = envelope.get("data")
    if not fields or not isinstance(data, dict) or "taskId" not in data:
        return envelope
    kept = {k: v for k, v in data.items() if k not in fields}
    return {**envelope, "data": kept, SLIM: [f for f in fields if f in data]}


def task_of(stored: dict) -> str | None:
    """The task whose row completes a stored envelope, or None when it is whole."""
    return stored["data"]["taskId"] if SLIM in stored else None


def unpack(stored: dict, row: dict | None) -> dict:
    """The envelope as published, from its stored form and its task's row (prompt,
    metadataJson, response); a field whose row is gone is null."""
    fields = stored.pop(SLIM, None)
    if fields:
        data = stored["data"]
        for field in fields:
            value = (row or {}).get(_COLUMN[field])
            data[field] = loads(value) if field == "metadata" and value is not None else value
    return stored


def row_size(row: dict, columns: tuple[str, ...] = ("prompt", "response", "metadataJson",
                                                     "error")) -> int:
    """About what a task row weighs in a page."""
    return ROW_OVERHEAD + sum(len(v) for c in columns if isinstance(v := row.get(c), str))


def text_size(*parts: Any) -> int:
    return ROW_OVERHEAD + sum(len(p) for p in parts if isinstance(p, (str, bytes)))
