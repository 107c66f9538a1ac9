"""How a store fails, and says so: `StoreFailing` (a 503 with Retry-After), the store's health
(`ok`, `failing` until a write succeeds again, `down`), logged once each way (droid/outage.py),
and the watch that finds out by itself (a probe write every WATCH_EVERY_S while failing; each
store adds its own checks: a SQLite file replaced, envelopes left pending on MongoDB).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from ..errors import Unavailable
from ..outage import Outage

RETRY_AFTER_S = 5
# How often a store looks at its database while running: a SQLite file replaced or deleted, and
# whether failing writes succeed again (so that /health recovers without traffic).
WATCH_EVERY_S = 2.0

log = logging.getLogger(__name__)


class StoreFailing(Unavailable):
    """The database cannot do what was asked now (disk full, read-only, locked beyond its
    timeout, gone, or its file replaced): a 503 in the error shape with Retry-After, so that a
    client is never told 201 for what was not stored, and never gets a bare 500."""

    retry_after = RETRY_AFTER_S

    def __init__(self, message: str = "The database cannot store or read this now; "
                                       "try again later") -> None:
        super().__init__(message)


class Health:
    """The health part of a Store (its base class)."""

    kind = "store"

    def __init__(self) -> None:
        self._writes: Outage | None = None
        self._recovered_listeners: list[Callable[[list[dict]], None]] = []

    async def ping(self) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        """The database in a log line (never its credentials)."""
        return self.kind

    @property
    def writes(self) -> Outage:
        """Whether writes fail now, logged once when they start failing and once when they
        succeed again."""
        if self._writes is None:
            where = self.describe()
            self._writes = Outage(where.replace("%", "%%") + ": writes fail (%s); "
                                  "answering 503 with Retry-After until they succeed again",
                                  f"{where}: writes succeed again", logger=log)
        return self._writes

    @property
    def failing(self) -> str | None:
        """Why the database refuses writes now; None while they succeed."""
        writes = self._writes
        return writes.reason if writes is not None and writes.down else None

    async def health(self) -> str:
        """`ok`; `failing` while writes fail (or the file was replaced); `down` when the
        database does not answer at all."""
        if not await self.ping():
            return "down"
        return "failing" if self.failing is not None else "ok"

    async def probe(self) -> None:
        """A small real write (raises StoreFailing when it fails): how a failing store sees
        that writes succeed again without waiting for traffic."""

    async def watch(self) -> None:
        """Every WATCH_EVERY_S while open: while writes fail, probe whether they succeed again.
        Stores add their own checks."""
        if self.failing is not None:
            try:
                await self.probe()
            except StoreFailing:
                pass

    async def _watch_forever(self) -> None:
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            try:
                await self.watch()
            except Exception:
                log.warning("%s: the periodic check failed; will try again", self.describe(),
                            exc_info=True)

    def on_recovered(self, listener: Callable[[list[dict]], None]) -> None:
        """Call `listener(envelopes)` with the envelopes the store numbered on its own, after a
        write that left them pending (MongoDB without transactions): they are delivered then."""
        self._recovered_listeners.append(listener)

    def _recovered(self, envelopes: list[dict]) -> None:
        if envelopes:
            for listener in self._recovered_listeners:
                listener(envelopes)
