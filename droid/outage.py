"""A lost dependency (Redis, a database that refuses writes) logged once when it goes and once
when it returns, never once per request."""
from __future__ import annotations

import logging
import threading

log = logging.getLogger("droid.outage")


class Outage:
    """The state of one use of a dependency that may fail for a while and come back.

    `failed(reason)` and `recovered()` may be called as often as wanted, from any thread (a
    store's thread and the event loop may both report): only the changes are logged, `lost %
    reason` at WARNING (or `level`) and `back` at INFO. A reason that is an exception is logged
    as `Type: message`.
    """

    def __init__(self, lost: str, back: str, *, logger: logging.Logger = log,
                 level: int = logging.WARNING) -> None:
        self.log = logger
        self.lost = lost
        self.back = back
        self.level = level
        self.down = False
        self.reason: str | None = None
        self._lock = threading.Lock()

    @classmethod
    def of(cls, dependency: str, what: str, meanwhile: str, *,
           logger: logging.Logger = log) -> "Outage":
        """`{dependency} unavailable for {what} (reason); {meanwhile} until it is back`, then
        `{dependency} is back for {what}`."""
        lost = f"{dependency} unavailable for {what}".replace("%", "%%")
        return cls(lost + " (%s); " + meanwhile.replace("%", "%%") + " until it is back",
                   f"{dependency} is back for {what}", logger=logger)

    def failed(self, reason: object) -> bool:
        """Record a failure; True when it starts an outage (and was logged)."""
        text = (f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException)
                else str(reason))
        with self._lock:
            if self.down:
                return False
            self.down = True
            self.reason = text
        self.log.log(self.level, self.lost, text)
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
