"""Which browser origins may use Socket.IO, and the one log line a refusal gets.

The rule: any origin when CORS_ORIGIN is `*`; else the origins it lists, plus the server's own
host (the demo page served by this process is not cross-origin, whatever CORS_ORIGIN says).
Requests without an Origin header (not from a browser) are not concerned.

Why this is done here and not left to the libraries: python-engineio checks the Origin of
long-polling requests itself and logs a refusal at ERROR, and, given `engineio_logger=False`, on
a logger it has given a handler of its own, so the line comes out twice; Tornado refuses a
cross-origin WebSocket handshake with a debug line only. `refuse_origins` checks first, in the
Tornado handler's `prepare` (Tornado's public hook, before python-engineio sees the request),
for both transports alike: one WARNING line with the origin, and a 403 in the JSON error shape.
python-engineio is given the same rule through its documented callable form of
`cors_allowed_origins`, so it never refuses on its own and still writes the CORS headers of the
requests it serves. No private API is used.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from .util import dumps

log = logging.getLogger("droid.cors")


class Origins:
    """The allowed origins of CORS_ORIGIN (already stripped of a trailing `/`)."""

    def __init__(self, allowed: tuple[str, ...]) -> None:
        self.any = "*" in allowed
        self.allowed = frozenset(allowed)

    def allows(self, origin: str, host: str | None) -> bool:
        if self.any or origin.rstrip("/") in self.allowed:
            return True
        try:
            netloc = urlsplit(origin).netloc.lower()
        except ValueError:
            return False
        return bool(host) and bool(netloc) and netloc == host.lower()

    def for_engineio(self) -> str | Callable[[str, Mapping[str, Any]], bool]:
        """The value of python-engineio's `cors_allowed_origins`."""
        if self.any:
            return "*"

        def allowed(origin: str, environ: Mapping[str, Any]) -> bool:
            return self.allows(origin, environ.get("HTTP_HOST"))
        return allowed


def refuse_origins(base: type, origins: Origins) -> type:
    """A subclass of python-engineio's Tornado handler that refuses a browser origin the rule
    does not allow, before python-engineio or Tornado's WebSocket code sees the request."""

    class Handler(base):  # type: ignore[misc, valid-type]
        def prepare(self) -> Any:
            origin = self.request.headers.get("Origin")
            if origin is None or origins.allows(origin, self.request.headers.get("Host")):
                return super().prepare()
            websocket = self.request.headers.get("Upgrade", "").lower() == "websocket"
            # repr() and a cut: the header is the client's, and so is this log line.
            log.warning("refused a Socket.IO %s request from origin %r (not in CORS_ORIGIN)",
                        "WebSocket" if websocket else "long-polling", origin[:200])
            self.set_status(403)
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.set_header("Cache-Control", "no-store")
            self.finish(dumps({"statusCode": 403, "error": "Forbidden",
                               "message": "Origin not allowed"}))
            return None

        def check_origin(self, origin: str) -> bool:
            # prepare() has refused every origin the rule does not allow; python-engineio's own
            # check_origin cannot take the callable form of cors_allowed_origins.
            return True

    return Handler
