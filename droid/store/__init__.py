"""Persistence behind one interface: SQLite (embedded default) or MongoDB (MONGODB_URI)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import (ACTIVE, FINAL, IDEMPOTENCY_TTL_S, PRIORITY_RANK, STATUSES, Change, Store,
                   StoreUnavailable)
from .health import StoreFailing

if TYPE_CHECKING:
    from ..config import Config


def store_from_config(config: "Config") -> Store:
    """The store the configuration names (not opened yet: `await store.open()`).

    MONGODB_URI set: MongoDB through PyMongo's AsyncMongoClient. Otherwise the SQLite file
    `droid.sqlite3` in DROID_DATA_DIR (`:memory:`: a throwaway in-memory database).
    """
    if config.mongodb_uri:
        from .mongo import MongoStore

        return MongoStore(config.mongodb_uri, config.mongodb_db,
                          event_retention_s=config.event_retention_s)
    from .sqlite import SqliteStore

    return SqliteStore(config.sqlite_path, event_retention_s=config.event_retention_s)


__all__ = ["ACTIVE", "FINAL", "IDEMPOTENCY_TTL_S", "PRIORITY_RANK", "STATUSES", "Change", "Store",
           "StoreFailing", "StoreUnavailable", "store_from_config"]
