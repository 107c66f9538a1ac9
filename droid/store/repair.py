"""Start-up repair: what an older version, or a crash of one, left in a database is put right
when a store opens, and one log line says what was repaired.

Before issue 19 a task's state and its envelope were two writes (and an Idempotency-Key a third),
so a crash between them could leave:

- a task without `task.created` (stored, then the process died before its envelope): repaired by
  writing `task.created` now, at the user's next `seq`, carrying the task as it is now (its
  `status` included), so that a client following events learns of it and of its state;
- a task whose stored status is not the state of its last stored envelope (its change was
  stored, its envelope was not): repaired by writing the envelope of the status it is in
  (`task.completed` for a completed task, `task.pending` for a pending one, ...), built from the
  task as it is now, at the user's next `seq`;
- an Idempotency-Key naming a task that does not exist (the key was claimed, the task never
  inserted): released, so that the request it was sent with creates the task. (The stores also
  take such a key over when a request brings it: droid/store/*/tasks.py.)

Only tasks updated within the event retention (DROID_EVENT_RETENTION_S, less a margin for the
expiry's period) are looked at: older envelopes have expired anyway. A seq numbered and never
stored by an older version (a hole) is left as it is: there is nothing to fill it with, and
Delivery skips a hole after 3 s.

This version's writes leave none of this behind (a change and its envelope are one transaction;
on MongoDB without transactions, see droid/store/mongo/outbox.py), so the full check runs once
per database, the first time this version opens it; a marker in the database records that it
ran. Run an older version on the same database again and it is not checked again: stop older
versions before starting this one.
"""
from __future__ import annotations

import datetime as dt
import logging

from .envelopes import STATUS_EVENT
from .base import Store

log = logging.getLogger(__name__)

FORMAT = "2"  # the marker's value: state and envelope written together
MARGIN = dt.timedelta(minutes=10)


def cutoff(store: Store, now: dt.datetime) -> dt.datetime:
    """Tasks updated before this are not checked: their envelopes may have expired."""
    return now - dt.timedelta(seconds=store.event_retention_s) + MARGIN


def needed(doc: dict, last_state: str | None, has_created: bool,
           since: dt.datetime) -> str | None:
    """The event to write for a task whose last stored envelope says `last_state` (None: no
    envelope within the retention), or None when its log is whole."""
    if not has_created and doc["createdAt"] >= since:
        return "task.created"
    if last_state != doc["status"]:
        return STATUS_EVENT.get(doc["status"])
    return None


def report(store: Store, created: int, states: int, keys: int) -> None:
    """The one log line (at INFO when something was repaired)."""
    if created or states or keys:
        log.info("%s: repaired what an older version left: %d tasks without task.created "
                 "(written now), %d tasks whose last envelope was not their state (their "
                 "state's envelope written now), %d Idempotency-Keys naming no task (released)",
                 store.describe(), created, states, keys)
    else:
        log.debug("%s: checked once for what an older version left; nothing to repair",
                  store.describe())
