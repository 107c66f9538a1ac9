"""Outage: the state of something Droid depends on that may fail for a while and come back (a
database that refuses writes, Redis), logged once when it starts failing and once when it is
back, never once per request."""
from __future__ import annotations

import logging
import threading


class Outage:
    """`failed(reason)` and `recovered()` may be called as often as wanted, from any thread:
    only the changes are logged (`lost % reason` at WARNING, unless given a level, then `back`
    as it is, at INFO)."""

    def __init__(self, log: logging.Logger, lost: str, back: str, *,
                 level: int = logging.WARNING) -> None:
        self.log = log
        self.lost = lost
        self.back = back
        self.level = level
        self.down = False
        self.reason: str | None = None
        self._lock = threading.Lock()  # a store's thread and the event loop may both report

    def failed(self, reason: object) -> bool:
        """Record a failure; True when it starts an outage (and was logged)."""
        with self._lock:
            if self.down:
                return False
            self.down = True
            self.reason = str(reason)
        self.log.log(self.level, self.lost, reason)
        return True

    def recovered(self) -> bool:
        """Record a success; True when it ends an outage (and was logged)."""
        if not self.down:  # the common case, without the lock
            return False
        with self._lock:
            if not self.down:
                return False
            self.down = False
            self.reason = None
        self.log.info("%s", self.back)
        return True
