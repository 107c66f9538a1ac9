"""The MongoDB store: PyMongo's AsyncMongoClient, what production uses (MONGODB_URI).

Every method is a few commands on indexed fields. A change of a task and its envelope are one
atomic write: a multi-document transaction on a replica set or sharded cluster, else the
envelope written into the task's document with the change and numbered into the log right
after (droid/store/mongo/connection.py says which and how, outbox.py the numbering).

Mixins: users.py and accounts.py (users, their e-mail forms, agents), tasks.py, quotas.py and
outbox.py (tasks, quotas, fair claims, envelopes without transactions), events.py (the event
log), hooks.py (API keys, webhooks).
"""
from __future__ import annotations

from .accounts import AccountsMixin
from .connection import guarded
from .events import EventsMixin
from .hooks import HooksMixin
from .tasks import TasksMixin
from .users import UsersMixin


@guarded
class MongoStore(UsersMixin, AccountsMixin, TasksMixin, EventsMixin, HooksMixin):
    """The MongoDB store: one mixin per group of collections (droid/store/mongo/), on MongoBase
    (the client, indexes, the write path and the store's lifecycle)."""


__all__ = ["MongoStore"]
