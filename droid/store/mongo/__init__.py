"""The MongoDB store: PyMongo's AsyncMongoClient, what production uses (MONGODB_URI).

Every method is one or two commands on indexed fields; atomic changes are single
`find_one_and_update` calls whose filter holds the precondition (a claim takes only a pending,
due task; an attempt is changed only while it is the current one).
"""
from __future__ import annotations

from .events import EventsMixin
from .tasks import TasksMixin
from .users import UsersMixin


class MongoStore(UsersMixin, TasksMixin, EventsMixin):
    """The MongoDB store: one mixin per group of collections (droid/store/mongo/), on MongoBase
    (the client, indexes and the store's lifecycle)."""


__all__ = ["MongoStore"]
