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

Mixins: users.py and accounts.py (users, their e-mail forms, agents), tasks.py and quotas.py
(tasks, quotas, fair claims), events.py (the event log), hooks.py (API keys, webhooks).
"""
from __future__ import annotations

from .accounts import AccountsMixin
from .events import EventsMixin
from .hooks import HooksMixin
from .rows import from_ms, to_ms
from .tasks import TasksMixin
from .users import UsersMixin


class SqliteStore(UsersMixin, AccountsMixin, TasksMixin, EventsMixin, HooksMixin):
    """The embedded store: one mixin per group of tables (droid/store/sqlite/), on SqliteBase
    (the connection, its thread and the store's lifecycle)."""


__all__ = ["SqliteStore", "from_ms", "to_ms"]
