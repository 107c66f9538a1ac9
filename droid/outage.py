"""A lost dependency logged once when it goes and once when it returns."""
from __future__ import annotations

import logging

log = logging.getLogger("droid.outage")


class Outage:
    """Logs the loss of a dependency once, and its return once, for one use of it."""

    def __init__(self, what: str, meanwhile: str, *, dependency: str = "Redis",
                 logger: logging.Logger = log) -> None:
        self.log = logger
        self.what = what
        self.meanwhile = meanwhile
        self.dependency = dependency
        self.down = False

    def failed(self, exc: BaseException) -> None:
        if not self.down:
            self.down = True
            self.log.warning("%s unavailable for %s (%s: %s); %s until it is back", self.dependency,
                        self.what, type(exc).__name__, exc, self.meanwhile)

    def recovered(self) -> None:
        if self.down:
            self.down = False
            self.log.info("%s is back for %s", self.dependency, self.what)
